#!/usr/bin/env bash
# rustoverlay installed and upgraded as a managed plugin through a real
# registry, as the install notes say: Debian's docker-registry (distribution
# 2.8) in its own namespace on the underlay (harness_start_registry: plain
# HTTP on 10.250.0.210:5000 only, no auth, storage in the run's temp dir,
# never in the root namespace), listed in every host's insecure-registries
# (daemon.json, checked with `docker info`). Host 1 is the build machine:
# scripts/build-plugin, `docker plugin create REG/rustoverlay:1 DIR`,
# `docker plugin push`; then the same directory with one marker file more in
# its rootfs as REG/rustoverlay:2 (the registry's manifest digests of the two
# tags must differ). Hosts 2 and 3 (shared /run, as on systemd hosts) get it
# with `docker plugin install --grant-all-permissions --alias
# rustoverlay:latest REG/rustoverlay:1 RUSTOVERLAY_STORE=etcd://...
# RUSTOVERLAY_HOST_ID=... RUSTOVERLAY_VTEP_IP=...` (enabled, the settings
# taken), a network `-d/--ipam-driver rustoverlay:latest` on both, and
# containers ping across hosts. Host 2 is then upgraded with a container
# running, under a 100 ms ping both ways: `docker plugin disable -f`,
# `docker plugin upgrade --skip-remote-check` (without it the CLI asks for a
# confirmation because the tag differs, and without an answer changes
# nothing: exit status 1 on Docker 20.10, 0 on Docker 26), `enable`.
# Afterwards the plugin reports REG/rustoverlay:2, dockerd holds tag 2's
# manifest digest, the running plugin has the new rootfs (marker) and the
# same settings, the overlay namespace is the same, the container kept
# running and pings across hosts (at most MAX_LOST pings lost; the gap is
# printed), and a new container gets an address no other container has and
# talks to host 3, still on version 1. Then containers, networks and plugins
# are removed: no network, namespace, link, plugin process or cgroup, and no
# store allocation is left; the registry is stopped and its storage removed
# by a cleanup hook, also on failure (about 20 s).
set -euo pipefail
cd "$(dirname "$0")/../.."
# shellcheck source=tests/lib/harness.sh
source tests/lib/harness.sh
harness_init plugin_registry
# shellcheck source=tests/lib/scenarios.sh
source tests/lib/scenarios.sh

PLUGIN=rustoverlay:latest
NET=regnet
SUB=10.86.0.0/24
MAX_LOST="${MAX_LOST:-2}"
REG="$(harness_registry_addr)"
REPO=rustoverlay
MARKER=rotest-release # a file in the plugin's rootfs: "1" or "2"
USERS=(2 3)           # the hosts that install the plugin

# plugin_pid N - pid of host N's running plugin.
plugin_pid() { harness_managed_plugin_pid "$1" "$PLUGIN"; }

# plugin_marker N - the marker file of the rootfs host N's plugin runs in.
plugin_marker() {
    local pid
    pid="$(plugin_pid "$1")" || return 1
    cat "/proc/$pid/root/$MARKER"
}

# plugin_log N - host N's plugin output (dockerd's lines tagged with its id).
plugin_log() { harness_managed_plugin_log "$1" "$(harness_managed_plugin_id "$1" "$PLUGIN")"; }

# plugin_manifest N - the manifest digest dockerd keeps for host N's plugin
# (its plugins/ID/config.json; `docker plugin inspect` shows no digest).
plugin_manifest() {
    local id
    id="$(harness_managed_plugin_id "$1" "$PLUGIN")" || return 1
    sed -n 's/.*"Manifest":"\(sha256:[0-9a-f]*\)".*/\1/p' \
        "$(harness_host_dir "$1")/data/plugins/$id/config.json"
}

# ns_inode N NAME - "nsfs:<inode>" of the namespace mounted on host N's
# /run/rustoverlay/netns/NAME (fails if it is not a namespace mount).
ns_inode() {
    local f="/run/rustoverlay/netns/$2"
    [[ "$(hexec_mnt "$1" stat -f -c %T "$f")" == nsfs ]] || return 1
    printf 'nsfs:%s\n' "$(hexec_mnt "$1" stat -L -c %i "$f")"
}

# --- boot -----------------------------------------------------------------
phase "boot: registry and etcd on the underlay, three hosts trusting the registry over plain HTTP"
harness_start_registry
reg_pid="$(harness_registry_pid)"
reg_netns="$(readlink "/proc/$reg_pid/ns/net")"
assert_eq "the registry runs in the namespace $(harness_registry_ns)" \
    "net:[$(stat -L -c %i "/run/netns/$(harness_registry_ns)")]" "$reg_netns"
assert_ok "the registry's namespace is not the root one ($reg_netns)" \
    test "$reg_netns" != "$(readlink /proc/1/ns/net)" -a "$reg_netns" != "$(readlink /proc/$$/ns/net)"
assert_eq "the registry listens on $REG only" "$REG" \
    "$(nsenter --net="/run/netns/$(harness_registry_ns)" ss -Htln | awk '{ print $4 }' | sort -u | xargs)"
harness_start_etcd
for h in 1 "${USERS[@]}"; do
    sc_dockerd_config "$h" "\"insecure-registries\": [\"$REG\"]"
    harness_start_host "$h" --no-plugin
    assert_eq "host $h: docker info lists $REG as an insecure registry" false \
        "$(hdocker "$h" info -f "{{(index .RegistryConfig.IndexConfigs \"$REG\").Secure}}" 2>&1)"
done
for h in "${USERS[@]}"; do
    harness_share_run "$h"
    harness_busybox_image "$h"
done
harness_stop_if_failed "the hosts do not trust the registry"

# --- build and push two versions ---------------------------------------------
phase "host 1: build, create and push $REG/$REPO:1 and :2"
pdir="$(harness_plugin_dir)"
echo 1 >"$pdir/rootfs/$MARKER"
pdir2="$HARNESS_TMP/plugin-dir-2"
cp -a "$pdir" "$pdir2"
echo 2 >"$pdir2/rootfs/$MARKER"
declare -A DIGEST
for v in 1 2; do
    dir="$pdir"
    [[ "$v" == 1 ]] || dir="$pdir2"
    assert_ok "host 1: docker plugin create $REG/$REPO:$v" harness_managed_plugin_create 1 "$REG/$REPO:$v" "$dir"
    t0="$(now_ms)"
    assert_ok "host 1: docker plugin push $REG/$REPO:$v" hdocker 1 plugin push "$REG/$REPO:$v"
    echo "pushed $REG/$REPO:$v in $(ms_since "$t0") ms"
    DIGEST[$v]="$(harness_registry_digest "$REPO" "$v")" || DIGEST[$v]=""
    assert_ok "the registry serves a manifest for $REPO:$v (${DIGEST[$v]:-none})" test -n "${DIGEST[$v]}"
done
assert_ok "the two versions have different manifest digests" test "${DIGEST[1]}" != "${DIGEST[2]}"
for v in 1 2; do
    assert_ok "host 1: docker plugin rm $REG/$REPO:$v (the build machine keeps nothing)" \
        hdocker 1 plugin rm "$REG/$REPO:$v"
done
harness_stop_if_failed "the plugin could not be pushed"

# --- install on hosts 2 and 3 ------------------------------------------------
phase "hosts ${USERS[*]}: docker plugin install --alias $PLUGIN $REG/$REPO:1 with the settings"
store="$(harness_etcd_url)"
for h in "${USERS[@]}"; do
    t0="$(now_ms)"
    assert_ok "host $h: docker plugin install --grant-all-permissions --alias $PLUGIN $REG/$REPO:1 (store, host id, VTEP, log)" \
        harness_managed_plugin_install "$h" "$PLUGIN" "$REG/$REPO:1" \
        RUSTOVERLAY_STORE="$store" RUSTOVERLAY_HOST_ID="h$h" \
        RUSTOVERLAY_VTEP_IP="$(harness_host_ip "$h")" RUSTOVERLAY_LOG="info,rustoverlay=debug"
    echo "host $h: installed and enabled in $(ms_since "$t0") ms"
    assert_eq "host $h: the plugin is enabled and comes from $REG/$REPO:1" "true $REG/$REPO:1" \
        "$(hdocker "$h" plugin inspect -f '{{.Enabled}} {{.PluginReference}}' "$PLUGIN" 2>&1)"
    assert_eq "host $h: dockerd keeps the manifest digest of $REPO:1" "${DIGEST[1]}" "$(plugin_manifest "$h" 2>&1)"
    assert_eq "host $h: the running plugin is version 1 (marker in its rootfs)" 1 "$(plugin_marker "$h" 2>&1)"
    assert_eventually "host $h: the plugin logs 'serving' as h$h on etcd" 10 \
        eval "plugin_log $h | grep 'serving' | grep -q 'host=h$h.*store=.*etcd'"
done
harness_stop_if_failed "the plugin could not be installed from the registry"

# --- network and containers ----------------------------------------------------
phase "one network on hosts ${USERS[*]}, containers talk across hosts"
for h in "${USERS[@]}"; do
    assert_ok "host $h: network create -d $PLUGIN --ipam-driver $PLUGIN --subnet $SUB $NET" \
        hdocker "$h" network create -d "$PLUGIN" --ipam-driver "$PLUGIN" --subnet "$SUB" "$NET"
    assert_ok "host $h: run c$h on $NET" sc_run "$h" "c$h" "$NET"
done
harness_stop_if_failed "network or containers could not be created"
declare -A IP_OF
for h in "${USERS[@]}"; do
    IP_OF[c$h]="$(hcontainer_ip "$h" "c$h" "$NET")"
    assert_ok "c$h has an address in $SUB (${IP_OF[c$h]})" test "${IP_OF[c$h]%.*}" = "${SUB%.*}"
done
assert_ok "c2 and c3 have distinct addresses" test "${IP_OF[c2]}" != "${IP_OF[c3]}"
assert_eventually "c2 (h2) pings c3 (h3)" 15 sc_ping 2 c2 "${IP_OF[c3]}"
assert_eventually "c3 (h3) pings c2 (h2)" 15 sc_ping 3 c3 "${IP_OF[c2]}"
VNI_NS="$(ovl_namespaces 2)"
ns_before="$(ns_inode 2 "$VNI_NS")" || ns_before=none
assert_ok "host 2: the overlay namespace $VNI_NS is mounted in the host's /run ($ns_before)" \
    test "$ns_before" != none
harness_stop_if_failed "no connectivity across hosts before the upgrade"

# --- upgrade through the registry ------------------------------------------------
phase "host 2: disable -f, upgrade to $REG/$REPO:2, enable, with c2 running under a 100 ms ping both ways"
c2_pid="$(hdocker 2 inspect -f '{{.State.Pid}}' c2)"
diff_ids_before="$(hdocker 2 plugin inspect -f '{{json .Config.Rootfs.DiffIds}}' "$PLUGIN")"
env_before="$(hdocker 2 plugin inspect -f '{{json .Settings.Env}}' "$PLUGIN")"
id_before="$(harness_managed_plugin_id 2 "$PLUGIN")"
reconciled_before="$(plugin_log 2 | grep -c 'peers reconciled' || true)"
harness_ping_start 3 c3 "${IP_OF[c2]}" c3-to-c2
harness_ping_start 2 c2 "${IP_OF[c3]}" c2-to-c3
sleep 1.5 # answered pings before the upgrade
t0="$(now_ms)"
assert_ok "host 2: docker plugin disable -f $PLUGIN" hdocker 2 plugin disable -f "$PLUGIN"
# The reference's tag differs from the installed one: the CLI asks "Plugin
# images do not match, are you sure?" and cancels without an answer. Docker
# 20.10's CLI then exits 1 ("canceling upgrade request"), Docker 26's exits 0
# (a cancelled prompt is no error there): scripts need --skip-remote-check.
rc=0
out="$(hdocker 2 plugin upgrade --grant-all-permissions "$PLUGIN" "$REG/$REPO:2" </dev/null 2>&1)" || rc=$?
echo "upgrade without --skip-remote-check, no answer: exit status $rc"
assert_contains "host 2: docker plugin upgrade to another tag without --skip-remote-check asks for a confirmation" \
    "Plugin images do not match, are you sure?" "$out"
assert_eq "host 2: the cancelled upgrade left the plugin at $REPO:1" "$REG/$REPO:1" \
    "$(hdocker 2 plugin inspect -f '{{.PluginReference}}' "$PLUGIN" 2>&1)"
assert_ok "host 2: docker plugin upgrade --grant-all-permissions --skip-remote-check $PLUGIN $REG/$REPO:2" \
    hdocker 2 plugin upgrade --grant-all-permissions --skip-remote-check "$PLUGIN" "$REG/$REPO:2"
assert_ok "host 2: docker plugin enable $PLUGIN" hdocker 2 plugin enable "$PLUGIN"
up_ms="$(ms_since "$t0")"
assert_eventually "host 2: the upgraded plugin reconciled its peers" 20 \
    eval "(( \$(plugin_log 2 | grep -c 'peers reconciled') > $reconciled_before ))"
sleep 1.5 # answered pings after the upgrade
harness_ping_stop c3-to-c2
harness_ping_stop c2-to-c3
echo "upgrade: disable -f to enabled in $up_ms ms"
for p in c3-to-c2 c2-to-c3; do
    read -r sent nlost longest < <(harness_ping_lost "$p")
    echo "    $p: $sent pings between the first and last answer, $nlost lost, longest gap $longest (about $((longest * 100)) ms without an answer)"
    assert_ok "$p: pings ran through the upgrade ($sent >= 20)" test "$sent" -ge 20
    assert_ok "$p: at most $MAX_LOST of $sent pings lost ($nlost lost)" test "$nlost" -ge 0 -a "$nlost" -le "$MAX_LOST"
done

assert_eq "host 2: the plugin is enabled and comes from $REG/$REPO:2" "true $REG/$REPO:2" \
    "$(hdocker 2 plugin inspect -f '{{.Enabled}} {{.PluginReference}}' "$PLUGIN" 2>&1)"
assert_eq "host 2: dockerd keeps the manifest digest of $REPO:2" "${DIGEST[2]}" "$(plugin_manifest 2 2>&1)"
assert_ok "host 2: the plugin's rootfs layers changed" \
    test "$(hdocker 2 plugin inspect -f '{{json .Config.Rootfs.DiffIds}}' "$PLUGIN")" != "$diff_ids_before"
assert_eq "host 2: the running plugin is version 2 (marker in its rootfs)" 2 "$(plugin_marker 2 2>&1)"
assert_eq "host 2: the upgrade kept the settings (store, host id, VTEP, log)" "$env_before" \
    "$(hdocker 2 plugin inspect -f '{{json .Settings.Env}}' "$PLUGIN" 2>&1)"
assert_eq "host 2: the upgrade kept the plugin's id" "$id_before" "$(harness_managed_plugin_id 2 "$PLUGIN" 2>&1)"
assert_eq "host 3 is still on $REPO:1" "$REG/$REPO:1 1" \
    "$(hdocker 3 plugin inspect -f '{{.PluginReference}}' "$PLUGIN" 2>&1) $(plugin_marker 3 2>&1)"
assert_eq "host 2: the overlay namespace is the same one" "$ns_before" "$(ns_inode 2 "$VNI_NS" 2>&1)"
assert_eq "c2 kept running (same pid)" "true $c2_pid" \
    "$(hdocker 2 inspect -f '{{.State.Running}} {{.State.Pid}}' c2 2>&1)"
assert_ok "c2 (h2, v2) pings c3 (h3, v1)" sc_ping 2 c2 "${IP_OF[c3]}"
assert_ok "c3 (h3, v1) pings c2 (h2, v2)" sc_ping 3 c3 "${IP_OF[c2]}"

phase "host 2: a new container after the upgrade"
assert_ok "host 2: run c2b" sc_run 2 c2b "$NET"
IP_OF[c2b]="$(hcontainer_ip 2 c2b "$NET")"
assert_ok "c2b has an address in $SUB (${IP_OF[c2b]})" test "${IP_OF[c2b]%.*}" = "${SUB%.*}"
assert_eq "c2b's address is no other container's (c2 ${IP_OF[c2]}, c3 ${IP_OF[c3]})" 3 \
    "$(printf '%s\n' "${IP_OF[@]}" | sort -u | grep -c .)"
assert_eventually "c2b (h2) pings c3 (h3)" 15 sc_ping 2 c2b "${IP_OF[c3]}"
assert_eventually "c3 (h3) pings c2b (h2)" 15 sc_ping 3 c3 "${IP_OF[c2b]}"

# --- teardown ---------------------------------------------------------------------
phase "remove containers and networks, disable and remove the plugins: nothing is left"
for h in "${USERS[@]}"; do
    sc_rm_all "$h"
    assert_ok "host $h: network rm $NET" hdocker "$h" network rm "$NET"
done
for h in "${USERS[@]}"; do
    id="$(harness_managed_plugin_id "$h" "$PLUGIN")" || id=none
    assert_empty "host $h: no overlay namespace left in /run/rustoverlay/netns" "$(ovl_namespaces "$h")"
    assert_empty "host $h: no ro-*/rc-* link left" "$(host_ro_links "$h")"
    assert_empty "host $h: no plugin line under level=error (the plugin logs to stdout)" \
        "$(plugin_log "$h" | grep -- 'level=error' || true)"
    assert_ok "host $h: docker plugin disable" hdocker "$h" plugin disable "$PLUGIN"
    assert_ok "host $h: docker plugin rm" hdocker "$h" plugin rm "$PLUGIN"
    assert_empty "host $h: no rustoverlay process in the host's namespace" \
        "$(for p in $(ip netns pids "$(harness_host_ns "$h")"); do grep -lx rustoverlay "/proc/$p/comm" 2>/dev/null; done)"
    assert_empty "host $h: no cgroup of the plugin left" \
        "$(find /sys/fs/cgroup -maxdepth 2 -type d -name "$id" 2>/dev/null)"
done
for h in 1 "${USERS[@]}"; do
    assert_empty "host $h: docker plugin ls is empty" "$(hdocker "$h" plugin ls -q)"
    assert_empty "host $h: no rustoverlay network in Docker" \
        "$(hdocker "$h" network ls -q --filter driver="$PLUGIN")"
done
assert_store_empty etcd

echo "total time: $((SECONDS - SC_T_START))s"
harness_summary
