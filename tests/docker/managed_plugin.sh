#!/usr/bin/env bash
# rustoverlay as a Docker managed plugin on simulated hosts whose /run is a
# shared mount (as on systemd hosts), without the legacy plugin:
# scripts/build-plugin, `docker plugin create/set/enable` on two hosts sharing
# one etcd, networks with `-d rustoverlay:latest --ipam-driver
# rustoverlay:latest`, containers talking across hosts, finding each other
# by name at the overlay's resolver, and a network defined once
# (-o cluster=true) created on the other host: the plugin reaches the
# engine's API at /host/run/docker.sock (config.json's run mount). The overlay
# namespaces are mounted in the host's /run (config.json's rshared "run"
# mount), so running containers stay connected through a SIGKILLed plugin
# (dockerd restarts it), a `disable -f` / `enable`, and an upgrade without a
# registry (`disable -f`, `rm -f`, `create` from a new directory, `set`,
# `enable`) measured with a 100 ms ping both ways. A third host, with
# neither /etc/rustoverlay nor /var/lib/rustoverlay, enables a freshly
# created plugin left at its default mounts and store: the plugin makes the
# host's /var/lib/rustoverlay, and its embedded store there keeps the
# addresses through the same re-create. The plugins log to stdout
# (config.json), so dockerd files none of their lines under level=error.
# Then everything is removed, the plugins disabled and removed, and nothing
# is left: no namespace, device, process, cgroup or store allocation.
set -euo pipefail
cd "$(dirname "$0")/../.."
# shellcheck source=tests/lib/harness.sh
source tests/lib/harness.sh

harness_init managed
T_START=$SECONDS

img="$HARNESS_IMAGE"
PLUGIN=rustoverlay:latest
HOSTS=(1 2)
NET=appnet
NET_SUBNET=10.77.0.0/24

# run_c N NAME - a sleeping busybox on host N, on $NET.
run_c() {
    hdocker "$1" run -d --stop-timeout 1 --network "$NET" --name "$2" "$img" sleep 3600
}

cping() { hdocker "$1" exec "$2" ping -c 1 -W 2 "$3"; }

# ns_inode N NAME - the network namespace mounted (in host N's own mount
# namespace) on /run/rustoverlay/netns/NAME: "nsfs:<inode>". A plain file
# there (the plugin's mount did not propagate to the host) fails.
ns_inode() {
    local f="/run/rustoverlay/netns/$2" fs
    fs="$(hexec_mnt "$1" stat -f -c %T "$f")" || return 1
    [[ "$fs" == nsfs ]] || {
        echo "$f on host $1 is on $fs, not a namespace mount" >&2
        return 1
    }
    printf 'nsfs:%s\n' "$(hexec_mnt "$1" stat -L -c %i "$f")"
}

# plugin_set_plain N [SETTING=VALUE...] - docker plugin set on host N: its
# host id, VTEP, a debug log and the given settings.
plugin_set_plain() {
    local n="$1"
    shift
    hdocker "$n" plugin set "$PLUGIN" \
        RUSTOVERLAY_HOST_ID="h$n" \
        RUSTOVERLAY_VTEP_IP="$(harness_host_ip "$n")" \
        RUSTOVERLAY_LOG="info,rustoverlay=debug" \
        "$@"
}

# plugin_set N [SETTING=VALUE...] - plugin_set_plain, and the mounts "certs"
# and "state" from directories of the test instead of the host's /etc and
# /var/lib.
plugin_set() {
    local n="$1" dir
    shift
    dir="$(harness_host_dir "$n")"
    plugin_set_plain "$n" certs.source="$dir/certs" state.source="$dir/state" "$@"
}

# plugin_log N - host N's managed plugin output so far.
plugin_log() { harness_managed_plugin_log "$1" "${PLUGIN_ID[$1]}"; }

# plugin_log_count N PATTERN - how many lines of it match PATTERN.
plugin_log_count() { plugin_log "$1" | grep -c -- "$2" || true; }

# plugin_log_errors N - the plugin's lines dockerd filed under level=error
# (what the plugin wrote to stderr).
plugin_log_errors() { plugin_log "$1" | grep -- 'level=error' || true; }

# --- boot -----------------------------------------------------------------
phase "boot: etcd, two hosts without the legacy plugin"
harness_start_etcd
store="$(harness_etcd_url)"
for h in "${HOSTS[@]}"; do
    harness_start_host "$h" --no-plugin
    # As on a systemd host: the host's /run is a shared mount, and the
    # engine's API is at /run/docker.sock (the plugin's default, through
    # config.json's run mount; the harness's dockerd listens in the run's
    # temp dir, so it is bound there in the host's own tmpfs /run).
    harness_share_run "$h"
    assert_ok "host $h: the engine's socket at /run/docker.sock" \
        hexec_mnt "$h" sh -c "touch /run/docker.sock && mount -n --bind '$(harness_host_dir "$h")/docker.sock' /run/docker.sock"
    harness_busybox_image "$h"
    # The host directories of the plugin's mounts "certs" and "state"; the
    # plugin's /etc/rustoverlay is certs.source's rustoverlay/.
    mkdir -p "$(harness_host_dir "$h")/certs/rustoverlay" "$(harness_host_dir "$h")/state"
    echo "h$h" >"$(harness_host_dir "$h")/certs/rustoverlay/marker"
done
assert_fails "host 1 has no legacy plugin socket" \
    hexec_mnt 1 test -e /run/docker/plugins/rustoverlay.sock

phase "build the plugin directory"
t0=$SECONDS
pdir="$(harness_plugin_dir)"
assert_ok "scripts/build-plugin wrote config.json" test -f "$pdir/config.json"
assert_ok "the rootfs holds the binary" test -x "$pdir/rootfs/rustoverlay"
assert_ok "the rootfs holds the dynamic loader" test -e "$pdir/rootfs/lib64/ld-linux-x86-64.so.2"
assert_ok "the binary runs inside the rootfs alone (chroot)" chroot "$pdir/rootfs" /rustoverlay --version
echo "plugin directory built in $((SECONDS - t0))s: $(du -sh "$pdir/rootfs" | cut -f1)"

phase "docker plugin create / set / enable on both hosts"
declare -A PLUGIN_ID
for h in "${HOSTS[@]}"; do
    assert_ok "host $h: docker plugin create $PLUGIN" harness_managed_plugin_create "$h" "$PLUGIN" "$pdir"
    PLUGIN_ID[$h]="$(harness_managed_plugin_id "$h" "$PLUGIN")" || PLUGIN_ID[$h]=none
    assert_eq "host $h: the new plugin is disabled" false \
        "$(hdocker "$h" plugin inspect -f '{{.Enabled}}' "$PLUGIN")"
    assert_ok "host $h: docker plugin set (store, host id, VTEP, log, certs and state dirs)" \
        plugin_set "$h" RUSTOVERLAY_STORE="$store"
    assert_fails "host $h: an unknown setting is refused" \
        hdocker "$h" plugin set "$PLUGIN" RUSTOVERLAY_NO_SUCH=1
    t0=$SECONDS
    assert_ok "host $h: docker plugin enable $PLUGIN" hdocker "$h" plugin enable "$PLUGIN"
    echo "host $h: enabled in $((SECONDS - t0))s"
    assert_eq "host $h: the plugin is enabled" true \
        "$(hdocker "$h" plugin inspect -f '{{.Enabled}}' "$PLUGIN")"
    assert_ok "host $h: the plugin process runs" harness_managed_plugin_pid "$h" "$PLUGIN"
    assert_eventually "host $h: the plugin logs 'serving' as h$h on etcd" 10 \
        eval "plugin_log $h | grep 'serving' | grep -q 'host=h$h.*store=.*etcd'"
    assert_ok "host $h: dockerd files 'serving' under level=info (the plugin logs to stdout)" \
        eval "plugin_log $h | grep 'serving' | grep -q 'level=info'"
    pid="$(harness_managed_plugin_pid "$h" "$PLUGIN")" || pid=none
    assert_eq "host $h: /etc/rustoverlay in the plugin links to the certs mount" \
        /host/etc/rustoverlay "$(readlink "/proc/$pid/root/etc/rustoverlay" 2>&1)"
    assert_eq "host $h: the certs mount is certs.source (its rustoverlay/marker)" \
        "h$h" "$(cat "/proc/$pid/root/host/etc/rustoverlay/marker" 2>&1)"
done
harness_stop_if_failed "the managed plugin did not start"

# --- networks and containers -----------------------------------------------
phase "one network on both hosts, containers talk across hosts"
for h in "${HOSTS[@]}"; do
    assert_ok "host $h: network create -d $PLUGIN --ipam-driver $PLUGIN --subnet $NET_SUBNET $NET" \
        hdocker "$h" network create -d "$PLUGIN" --ipam-driver "$PLUGIN" --subnet "$NET_SUBNET" "$NET"
done
assert_eq "host 1: the network's driver is $PLUGIN" "$PLUGIN" \
    "$(hdocker 1 network inspect -f '{{.Driver}}' "$NET" 2>&1)"
assert_fails "host 1: Docker's default IPAM with this driver is refused" \
    hdocker 1 network create -d "$PLUGIN" --subnet 10.79.0.0/24 badnet
harness_stop_if_failed "network creation failed"

declare -A IP_OF
for h in "${HOSTS[@]}"; do
    assert_ok "host $h: run c$h on $NET" run_c "$h" "c$h"
done
harness_stop_if_failed "containers did not start"
for h in "${HOSTS[@]}"; do
    IP_OF[c$h]="$(hcontainer_ip "$h" "c$h" "$NET")"
    assert_ok "c$h has an address in $NET_SUBNET (${IP_OF[c$h]})" test "${IP_OF[c$h]%.*}" = 10.77.0
done
assert_ok "c1 and c2 have distinct addresses" test "${IP_OF[c1]}" != "${IP_OF[c2]}"
assert_eventually "c1 (h1) pings c2 (h2)" 15 cping 1 c1 "${IP_OF[c2]}"
assert_eventually "c2 (h2) pings c1 (h1)" 15 cping 2 c2 "${IP_OF[c1]}"
assert_ok "c1 reaches the world (egress through docker_gwbridge)" \
    hdocker 1 exec c1 ping -c 1 -W 2 "$HARNESS_WORLD_IP"
# The plugin reads the Docker API through config.json's run mount
# (/host/run/docker.sock): host 1's container name reaches host 2's resolver.
assert_eventually "c2 (h2) resolves c1 by name at the overlay's resolver" 10 \
    eval "hdocker 2 exec c2 nslookup -type=a c1 169.254.53.53 | grep -c '${IP_OF[c1]}\$' >/dev/null"
assert_ok "host 1: a network defined once (-o cluster=true)" \
    hdocker 1 network create -d "$PLUGIN" --ipam-driver "$PLUGIN" --subnet 10.78.0.0/24 -o cluster=true cnet
assert_eventually "host 2: the managed plugin created cnet through its Docker socket" 5 \
    eval "hdocker 2 network inspect -f '{{.Driver}}' cnet | grep -c '^$PLUGIN\$' >/dev/null"
assert_ok "host 1: remove cnet" hdocker 1 network rm cnet
assert_eventually "host 2: cnet is gone too" 5 eval "! hdocker 2 network inspect cnet >/dev/null 2>&1"

VNI_NS="$(ovl_namespaces 1)"
assert_ok "host 1 has one overlay namespace file in /run/rustoverlay/netns ($VNI_NS)" \
    test -n "$VNI_NS" -a "$(printf '%s\n' "$VNI_NS" | grep -c .)" = 1
assert_eq "host 2 has the same one" "$VNI_NS" "$(ovl_namespaces 2)"
for h in "${HOSTS[@]}"; do
    assert_ok "host $h: it is a namespace mount in the HOST's mount namespace (propagated out of the plugin)" \
        ns_inode "$h" "$VNI_NS"
done
assert_empty "host 1: no ro-*/rc-* link left in the host namespace (bridge side is in $VNI_NS)" \
    "$(host_ro_links 1)"

# --- plugin killed: dockerd restarts it -------------------------------------
phase "host 1's plugin SIGKILLed: dockerd restarts it, containers stay connected"
ns_before="$(ns_inode 1 "$VNI_NS")" || ns_before=none
old_pid="$(harness_managed_plugin_pid 1 "$PLUGIN")"
reconciled_before="$(plugin_log_count 1 'peers reconciled')"
kill -9 "$old_pid"
assert_eventually "dockerd restarts the plugin (new pid, was $old_pid)" 30 \
    eval "p=\$(harness_managed_plugin_pid 1 $PLUGIN) && [[ \$p != $old_pid ]]"
assert_eq "the overlay namespace outlived the plugin's mount namespace (same netns)" \
    "$ns_before" "$(ns_inode 1 "$VNI_NS" 2>&1)"
assert_ok "c2 (h2) pings c1 (h1) after the restart" cping 2 c2 "${IP_OF[c1]}"
assert_eventually "the restarted plugin reconciled its peers" 20 \
    eval "(( \$(plugin_log_count 1 'peers reconciled') > $reconciled_before ))"
assert_ok "host 1: run c1b after the restart" run_c 1 c1b
IP_OF[c1b]="$(hcontainer_ip 1 c1b "$NET")"
assert_eventually "c1b (h1) pings c2 (h2)" 15 cping 1 c1b "${IP_OF[c2]}"
assert_eventually "c2 (h2) pings c1b (h1)" 15 cping 2 c2 "${IP_OF[c1b]}"

# --- disable -f / enable: what `docker plugin upgrade` goes through ---------
phase "host 2's plugin disabled (-f, in use) and enabled again: containers stay connected"
ns_before="$(ns_inode 2 "$VNI_NS")" || ns_before=none
assert_fails "host 2: disable without -f is refused while networks use the plugin" \
    hdocker 2 plugin disable "$PLUGIN"
t0=$SECONDS
assert_ok "host 2: docker plugin disable -f" hdocker 2 plugin disable -f "$PLUGIN"
assert_fails "host 2: no plugin process while disabled" harness_managed_plugin_pid 2 "$PLUGIN"
assert_ok "plugin disabled: c1 (h1) still pings c2 (h2) (kernel data plane untouched)" \
    cping 1 c1 "${IP_OF[c2]}"
assert_eq "plugin disabled: host 2's overlay namespace is still there" \
    "$ns_before" "$(ns_inode 2 "$VNI_NS" 2>&1)"
assert_ok "host 2: docker plugin enable" hdocker 2 plugin enable "$PLUGIN"
echo "host 2: disable -f + enable took $((SECONDS - t0))s"
assert_eq "the overlay namespace is the same one after enable" "$ns_before" "$(ns_inode 2 "$VNI_NS" 2>&1)"
assert_ok "c2 (h2) pings c1 (h1) after enable" cping 2 c2 "${IP_OF[c1]}"
assert_ok "host 2: run c2b after enable" run_c 2 c2b
IP_OF[c2b]="$(hcontainer_ip 2 c2b "$NET")"
assert_eventually "c2b (h2) pings c1 (h1)" 15 cping 2 c2b "${IP_OF[c1]}"
assert_eventually "c1b (h1) pings c2b (h2)" 15 cping 1 c1b "${IP_OF[c2b]}"
assert_eq "four containers, four addresses" 4 \
    "$(printf '%s\n' "${IP_OF[@]}" | sort -u | grep -c .)"

# --- upgrade without a registry ----------------------------------------------
phase "host 1: upgrade from a new plugin directory (disable -f, rm -f, create, set, enable) under a 100 ms ping"
newbin="$HARNESS_TMP/v2/rustoverlay"
mkdir -p "$(dirname "$newbin")"
cp "$(harness_bin)" "$newbin"
pdir2="$HARNESS_TMP/plugin-dir-v2"
assert_ok "scripts/build-plugin builds the new directory" \
    env RUSTOVERLAY_BIN="$newbin" scripts/build-plugin "$pdir2"
harness_ping_start 2 c2 "${IP_OF[c1]}" c2-to-c1
harness_ping_start 1 c1 "${IP_OF[c2]}" c1-to-c2
sleep 2 # answered pings before the upgrade
ns_before="$(ns_inode 1 "$VNI_NS")" || ns_before=none
t0_ms="$(($(date +%s%N) / 1000000))"
assert_ok "host 1: docker plugin disable -f" hdocker 1 plugin disable -f "$PLUGIN"
assert_ok "host 1: docker plugin rm -f" hdocker 1 plugin rm -f "$PLUGIN"
assert_ok "host 1: docker plugin create from the new directory" \
    harness_managed_plugin_create 1 "$PLUGIN" "$pdir2"
PLUGIN_ID[1]="$(harness_managed_plugin_id 1 "$PLUGIN")" || PLUGIN_ID[1]=none
assert_ok "host 1: docker plugin set (same settings)" plugin_set 1 RUSTOVERLAY_STORE="$store"
assert_ok "host 1: docker plugin enable" hdocker 1 plugin enable "$PLUGIN"
up_ms="$(($(date +%s%N) / 1000000))"
assert_eventually "the new plugin reconciled its peers" 20 \
    eval "plugin_log 1 | grep -q 'peers reconciled'"
sleep 2 # answered pings after the upgrade
harness_ping_stop c2-to-c1
harness_ping_stop c1-to-c2
echo "upgrade: disable -f to enabled $((up_ms - t0_ms)) ms"
# No ping may be lost: the kernel data plane stays while no plugin runs (see
# tests/docker/restarts.sh for the bound).
for p in c2-to-c1 c1-to-c2; do
    read -r sent nlost longest < <(harness_ping_lost "$p")
    echo "    $p: $sent pings between the first and last answer, $nlost lost, longest gap $longest"
    assert_ok "$p: pings ran through the upgrade ($sent >= 30)" test "$sent" -ge 30
    assert_ok "$p: at most 2 of $sent pings lost ($nlost lost)" test "$nlost" -ge 0 -a "$nlost" -le 2
done
assert_eq "host 1's overlay namespace is the same one after the upgrade" "$ns_before" \
    "$(ns_inode 1 "$VNI_NS" 2>&1)"
assert_ok "host 1: run c1c after the upgrade" run_c 1 c1c
IP_OF[c1c]="$(hcontainer_ip 1 c1c "$NET")"
assert_eventually "c2 (h2) pings c1c (h1)" 15 cping 2 c2 "${IP_OF[c1c]}"
assert_ok "host 1: remove c1b through the new plugin" hdocker 1 rm -f c1b
unset "IP_OF[c1b]"

# --- one host, no preparation, embedded store ----------------------------------
phase "host 3 with neither /etc/rustoverlay nor /var/lib/rustoverlay: a fresh plugin at its defaults enables; its embedded store survives rm -f / create"
harness_start_host 3 --no-plugin
harness_share_run 3
harness_busybox_image 3
h3dir="$(harness_host_dir 3)"
# Host 3's /var/lib is an empty directory of the test (in its own mount
# namespace only), so the plugin's store lands there and not in this
# machine's /var/lib. Its /etc is the machine's, or a copy without
# rustoverlay/ if the machine has one.
mkdir -p "$h3dir/varlib"
hexec_mnt 3 mount -n --bind "$h3dir/varlib" /var/lib
if hexec_mnt 3 test -e /etc/rustoverlay; then
    mkdir -p "$h3dir/etc"
    hexec_mnt 3 cp -a /etc/. "$h3dir/etc/"
    rm -rf "$h3dir/etc/rustoverlay"
    hexec_mnt 3 mount -n --bind "$h3dir/etc" /etc
fi
assert_fails "host 3 has no /etc/rustoverlay" hexec_mnt 3 test -e /etc/rustoverlay
assert_fails "host 3 has no /var/lib/rustoverlay" hexec_mnt 3 test -e /var/lib/rustoverlay
assert_ok "host 3: docker plugin create" harness_managed_plugin_create 3 "$PLUGIN" "$pdir"
PLUGIN_ID[3]="$(harness_managed_plugin_id 3 "$PLUGIN")" || PLUGIN_ID[3]=none
assert_ok "host 3: docker plugin set: host id, VTEP, log, args (mounts and store at their defaults)" \
    plugin_set_plain 3 args="--reclaim-grace 600"
assert_eq "host 3: the mounts are the host's /run, /var/lib and /etc" "/run /var/lib /etc" \
    "$(hdocker 3 plugin inspect -f '{{range .Settings.Mounts}}{{.Source}} {{end}}' "$PLUGIN" 2>&1 | xargs)"
assert_ok "host 3: docker plugin enable (nothing made on the host first)" hdocker 3 plugin enable "$PLUGIN"
harness_stop_if_failed "a fresh plugin at its defaults did not enable on a host without /etc/rustoverlay and /var/lib/rustoverlay"
assert_eventually "host 3: the plugin serves on the embedded store" 10 \
    eval "plugin_log 3 | grep 'serving' | grep -q 'store=.*file'"
assert_ok "host 3: args reach the plugin (--reclaim-grace 600 on its command line)" \
    eval "tr '\\0' ' ' </proc/\$(harness_managed_plugin_pid 3 $PLUGIN)/cmdline | grep -q -- '--reclaim-grace 600'"
assert_ok "host 3: the plugin made the host's /var/lib/rustoverlay, with the store file in it" \
    test -s "$h3dir/varlib/rustoverlay/state.redb"
assert_ok "host 3: network create solo" \
    hdocker 3 network create -d "$PLUGIN" --ipam-driver "$PLUGIN" --subnet 10.88.0.0/24 solo
assert_ok "host 3: run e1" hdocker 3 run -d --stop-timeout 1 --network solo --name e1 "$img" sleep 3600
e1_ip="$(hcontainer_ip 3 e1 solo)"
assert_empty "host 3: no plugin line under level=error (the plugin logs to stdout)" "$(plugin_log_errors 3)"
assert_ok "host 3: disable -f, rm -f, create from the new directory, set, enable" eval "
    hdocker 3 plugin disable -f $PLUGIN && hdocker 3 plugin rm -f $PLUGIN &&
    harness_managed_plugin_create 3 $PLUGIN $pdir2 && plugin_set_plain 3 && hdocker 3 plugin enable $PLUGIN"
PLUGIN_ID[3]="$(harness_managed_plugin_id 3 "$PLUGIN")" || PLUGIN_ID[3]=none
assert_ok "host 3: run e2 with the new plugin" \
    hdocker 3 run -d --stop-timeout 1 --network solo --name e2 "$img" sleep 3600
e2_ip="$(hcontainer_ip 3 e2 solo)"
assert_ok "e2 got another address than e1 ($e2_ip, e1 has $e1_ip): the store survived the re-create" \
    test -n "$e2_ip" -a "$e2_ip" != "$e1_ip"
assert_eventually "e2 pings e1" 10 hdocker 3 exec e2 ping -c 1 -W 2 "$e1_ip"
assert_ok "host 3: remove e1, e2 and solo" eval "hdocker 3 rm -f e1 e2 && hdocker 3 network rm solo"
assert_empty "host 3: no overlay namespace left" "$(ovl_namespaces 3)"
assert_empty "host 3: no plugin line under level=error" "$(plugin_log_errors 3)"
assert_ok "host 3: disable and rm the plugin" eval "hdocker 3 plugin disable $PLUGIN && hdocker 3 plugin rm $PLUGIN"
assert_empty "host 3: the embedded store (still on the host) holds no allocation" \
    "$(timeout 30 "$(harness_bin)" dump --store "file://$h3dir/varlib/rustoverlay/state.redb" 2>&1 |
        grep -E "$HARNESS_ALLOC_KEY_RE|rror" || true)"

# --- teardown ---------------------------------------------------------------
phase "remove containers and networks, disable and remove the plugin: nothing is left"
for h in "${HOSTS[@]}"; do
    ids="$(hdocker "$h" ps -aq)"
    # shellcheck disable=SC2086 # one id per word
    [[ -z "$ids" ]] || assert_ok "host $h: remove all containers" hdocker "$h" rm -f $ids
    assert_ok "host $h: network rm $NET" hdocker "$h" network rm "$NET"
done
for h in "${HOSTS[@]}"; do
    assert_empty "host $h: no overlay namespace left in /run/rustoverlay/netns" "$(ovl_namespaces "$h")"
    assert_empty "host $h: no ro-*/rc-* link left" "$(host_ro_links "$h")"
    assert_empty "host $h: no plugin line under level=error (the plugin logs to stdout)" \
        "$(plugin_log_errors "$h")"
    assert_ok "host $h: docker plugin disable" hdocker "$h" plugin disable "$PLUGIN"
    assert_ok "host $h: docker plugin rm" hdocker "$h" plugin rm "$PLUGIN"
    assert_empty "host $h: docker plugin ls is empty" "$(hdocker "$h" plugin ls -q)"
    assert_fails "host $h: no plugin process" eval "ip netns pids $(harness_host_ns "$h") | xargs -r -n1 -I{} cat /proc/{}/comm 2>/dev/null | grep -qx rustoverlay"
    assert_empty "host $h: no cgroup of the plugin left" \
        "$(find /sys/fs/cgroup -maxdepth 2 -type d -name "${PLUGIN_ID[$h]}" 2>/dev/null)"
    assert_empty "host $h: no rustoverlay network in Docker" \
        "$(hdocker "$h" network ls -q --filter driver="$PLUGIN")"
done
assert_store_empty etcd

echo "total time: $((SECONDS - T_START))s"
harness_summary
