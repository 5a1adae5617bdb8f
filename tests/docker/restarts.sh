#!/usr/bin/env bash
# Restarts on two simulated hosts sharing one etcd.
#  (i)  dockerd restarted (SIGTERM, then SIGKILL) on host 1 with
#       `--restart always` containers: they come back on their network,
#       talk across hosts again, no address is used twice across hosts, and
#       the calls Docker replays at start (RequestPool, gateway, endpoints)
#       leave no error in the plugin's log and no leak once everything is
#       removed.
#  (ii) plugin upgrade on host 1 with running containers: SIGTERM, the binary
#       copied to a new path, started from there; a ping every 100 ms runs
#       between the hosts, both ways, through the whole upgrade. The kernel
#       data plane does not depend on the plugin process, so no ping may be
#       lost (bound: MAX_LOST, see below); the new plugin reconciles the
#       kernel state ("peers reconciled").
set -euo pipefail
cd "$(dirname "$0")/../.."
# shellcheck source=tests/lib/harness.sh
source tests/lib/harness.sh

harness_init restarts
T_START=$SECONDS

img="$HARNESS_IMAGE"
NET=appnet
NET_SUBNET=10.77.0.0/24
# Pings lost during the plugin upgrade. Expected 0: the VXLAN device, bridge,
# veths, FDB and neighbour entries stay in the kernel while the plugin is
# down, a stopping plugin removes nothing, and a starting one only adds what
# is missing. 2 (200 ms) leaves room for a reply that crosses the moment a
# reconciliation replaces an entry, and nothing for a real outage (a lease
# given up at stop, entries flushed and re-added, a namespace rebuilt: each
# of those costs seconds).
MAX_LOST="${MAX_LOST:-2}"

# run_c N NAME [docker run options...] - a sleeping busybox on host N, on $NET.
run_c() {
    local n="$1" name="$2"
    shift 2
    hdocker "$n" run -d --stop-timeout 1 --network "$NET" --name "$name" "$@" "$img" sleep 3600
}

cping() { hdocker "$1" exec "$2" ping -c 1 -W 2 "$3"; }

# log_lines N - host N's plugin log, line count so far (to read what follows).
log_lines() { wc -l <"$(harness_host_dir "$1")/plugin.log"; }

# log_since N LINE - host N's plugin log after line LINE.
log_since() { tail -n "+$(($2 + 1))" "$(harness_host_dir "$1")/plugin.log"; }

# problems - WARN and ERROR lines of a plugin log on stdin.
problems() { grep -E '^[^ ]+ +(WARN|ERROR) ' || true; }

# all_ips - "host container ip" of every container on $NET on both hosts.
all_ips() {
    local h c
    for h in 1 2; do
        for c in $(hdocker "$h" ps -q); do
            printf 'h%s %s %s\n' "$h" "$(hdocker "$h" inspect -f '{{.Name}}' "$c" | tr -d /)" \
                "$(hcontainer_ip "$h" "$c" "$NET")"
        done
    done
}

# check_mesh WHAT - the host-1 containers r1, r2 and host 2's s1 ping each
# other across hosts; no address twice.
check_mesh() {
    local what="$1" ips r ip_s1 ip_r
    ip_s1="$(hcontainer_ip 2 s1 "$NET")"
    for r in r1 r2; do
        ip_r="$(hcontainer_ip 1 "$r" "$NET" 2>/dev/null || true)"
        assert_ok "$what: $r is on $NET (${ip_r:-no address})" test -n "$ip_r"
        [[ -n "$ip_r" ]] || continue
        assert_eventually "$what: s1 (h2) pings $r (h1, $ip_r)" 15 cping 2 s1 "$ip_r"
        assert_eventually "$what: $r (h1) pings s1 (h2, $ip_s1)" 15 cping 1 "$r" "$ip_s1"
    done
    ips="$(all_ips)"
    printf '%s\n' "$ips" | sed 's/^/    /'
    assert_empty "$what: no address used twice across hosts" \
        "$(printf '%s\n' "$ips" | awk '{ print $3 }' | grep . | sort | uniq -d)"
}

# --- boot -----------------------------------------------------------------
phase "boot: etcd and two hosts"
harness_start_etcd
for h in 1 2; do
    harness_start_host "$h" --store "$(harness_etcd_url)"
    harness_busybox_image "$h"
    assert_ok "host $h: create $NET" \
        hdocker "$h" network create -d rustoverlay --ipam-driver rustoverlay --subnet "$NET_SUBNET" "$NET"
done
assert_ok "host 1: run r1 --restart always" run_c 1 r1 --restart always
assert_ok "host 1: run r2 --restart always" run_c 1 r2 --restart always
assert_ok "host 2: run s1" run_c 2 s1
harness_stop_if_failed "setup failed"
check_mesh "before any restart"

# --- (i) dockerd restarts ---------------------------------------------------
for how in TERM KILL; do
    if [[ "$how" == TERM ]]; then
        phase "(i) host 1: dockerd stopped (SIGTERM: containers stop) and started again"
        args=()
    else
        phase "(i) host 1: dockerd SIGKILLed (containers keep running) and started again"
        args=(--kill)
    fi
    mark="$(log_lines 1)"
    t0=$SECONDS
    harness_restart_dockerd 1 "${args[@]}"
    echo "dockerd restarted in $((SECONDS - t0))s"
    for r in r1 r2; do
        assert_eventually "after SIG$how: $r is running again (--restart always)" 30 \
            eval "[[ \$(hdocker 1 inspect -f '{{.State.Running}}' $r) == true ]]"
    done
    check_mesh "after SIG$how"
    replayed="$(log_since 1 "$mark" | grep 'done status=' | grep -oE 'method=[A-Za-z.]+' |
        sed 's/method=//' | sort | uniq -c | sort -rn | awk '{ printf "%s%s x%s", (NR > 1 ? ", " : ""), $2, $1 }')"
    echo "    calls to host 1's plugin since the restart: $replayed"
    warn="$(log_since 1 "$mark" | problems)"
    if [[ -n "$warn" ]]; then
        echo "    WARN/ERROR lines of host 1's plugin since the restart:"
        printf '%s\n' "$warn" | sed 's/^/      /'
    fi
    assert_empty "after SIG$how: host 1's plugin logged no ERROR while Docker replayed its calls" \
        "$(printf '%s\n' "$warn" | grep -E '^[^ ]+ +ERROR ' || true)"
done
assert_ok "host 1: run r3 after the restarts" run_c 1 r3
r3_ip="$(hcontainer_ip 1 r3 "$NET")"
assert_eventually "r3 (h1) is reached from s1 (h2)" 15 cping 2 s1 "$r3_ip"
assert_ok "host 1: remove r3" hdocker 1 rm -f r3

# --- (ii) plugin upgrade ----------------------------------------------------
phase "(ii) host 1: plugin upgrade (SIGTERM, new binary path, start) under a 100 ms ping both ways"
r1_ip="$(hcontainer_ip 1 r1 "$NET")"
s1_ip="$(hcontainer_ip 2 s1 "$NET")"
assert_ok "before: s1 (h2) pings r1 (h1)" cping 2 s1 "$r1_ip"
newbin="$HARNESS_TMP/upgrade/usr-local-bin/rustoverlay"
mkdir -p "$(dirname "$newbin")"
cp "$(harness_bin)" "$newbin"

harness_ping_start 2 s1 "$r1_ip" s1-to-r1
harness_ping_start 1 r1 "$s1_ip" r1-to-s1
sleep 2 # a baseline of answered pings before the upgrade

mark="$(log_lines 1)"
t0_ms="$(($(date +%s%N) / 1000000))"
harness_kill_plugin 1 TERM
stopped_ms="$(($(date +%s%N) / 1000000))"
assert_fails "host 1's old plugin is gone" harness_plugin_pid 1
stopped_log="$(log_since 1 "$mark")"
sleep 1 # the plugin stays down a moment, as during a package upgrade
export RUSTOVERLAY_BIN="$newbin"
harness_restart_plugin 1
up_ms="$(($(date +%s%N) / 1000000))"
assert_eq "host 1's plugin now runs the new binary" "$newbin" \
    "$(readlink "/proc/$(harness_plugin_pid 1)/exe" 2>&1)"
assert_eventually "the upgraded plugin reconciled its peers ('peers reconciled')" 20 \
    eval "log_since 1 $mark | grep -q 'peers reconciled'"
rec_ms="$(($(date +%s%N) / 1000000))"
sleep 2 # pings after the upgrade too
harness_ping_stop s1-to-r1
harness_ping_stop r1-to-s1
echo "upgrade: SIGTERM to exit $((stopped_ms - t0_ms)) ms, down $((up_ms - stopped_ms)) ms, start to reconciled $((rec_ms - up_ms)) ms"
printf '%s\n' "$stopped_log" | grep -E 'shutting down|stopped' | sed 's/^/    old plugin: /' || true
log_since 1 "$mark" | grep 'peers reconciled' | sed 's/^/    new plugin: /' || true

for p in s1-to-r1 r1-to-s1; do
    read -r sent nlost longest < <(harness_ping_lost "$p")
    tail -n 3 "$HARNESS_TMP/$p.ping" | grep -E 'transmitted|round-trip' | sed "s/^/    $p: /" || true
    echo "    $p: $sent pings between the first and last answer, $nlost lost, longest gap $longest"
    assert_ok "$p: pings ran through the whole upgrade ($sent >= 30)" test "$sent" -ge 30
    assert_ok "$p: at most $MAX_LOST of $sent pings lost during the upgrade ($nlost lost)" \
        test "$nlost" -ge 0 -a "$nlost" -le "$MAX_LOST"
done
assert_empty "the upgrade logged no WARN/ERROR on host 1" "$(log_since 1 "$mark" | problems)"
assert_ok "after the upgrade: host 1 runs r4" run_c 1 r4
r4_ip="$(hcontainer_ip 1 r4 "$NET")"
assert_eventually "r4 (h1) pings s1 (h2)" 15 cping 1 r4 "$s1_ip"
assert_eventually "s1 (h2) pings r4 (h1)" 15 cping 2 s1 "$r4_ip"

# --- teardown ---------------------------------------------------------------
phase "remove everything; nothing is left"
for h in 1 2; do
    ids="$(hdocker "$h" ps -aq)"
    # shellcheck disable=SC2086 # one id per word
    [[ -z "$ids" ]] || assert_ok "host $h: remove all containers" hdocker "$h" rm -f $ids
    assert_ok "host $h: network rm $NET" hdocker "$h" network rm "$NET"
done
for h in 1 2; do
    assert_empty "host $h: no overlay namespace left" "$(ovl_namespaces "$h")"
    assert_empty "host $h: no ro-*/rc-* link left" "$(host_ro_links "$h")"
    assert_ok "host $h: the plugin still runs" harness_plugin_pid "$h"
done
assert_store_empty etcd

echo "total time: $((SECONDS - T_START))s"
harness_summary
