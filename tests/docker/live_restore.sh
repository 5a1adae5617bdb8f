#!/usr/bin/env bash
# dockerd --live-restore on two simulated hosts sharing one etcd. Host 1's
# dockerd runs with live-restore (checked in `docker info`). Its dockerd is
# restarted twice while its containers run: stopped with SIGTERM, then
# SIGKILLed; each time the containers keep running (same pid, same start
# time, never restarted), keep their addresses, and a ping every 100 ms from
# host 2 to a host-1 container loses at most MAX_LOST (0 expected: nothing of
# the data plane depends on dockerd); host 1's endpoints stay in the store
# and host 2 keeps their entries; the plugin gets no Leave or DeleteEndpoint
# and logs no ERROR; both directions ping afterwards, a new container starts.
# After the restarts `docker rm` of the restored containers releases
# everything: their endpoints, addresses and peer entries go (the addresses
# checked before `network rm`, whose ReleasePool would free them anyway), the
# overlay namespace goes with the last one, and after `network rm` on both
# hosts the store holds nothing.
set -euo pipefail
cd "$(dirname "$0")/../.."
# shellcheck source=tests/lib/harness.sh
source tests/lib/harness.sh
harness_init live_restore
# shellcheck source=tests/lib/scenarios.sh
source tests/lib/scenarios.sh

NET=lrnet
SUB=10.85.0.0/24
# For the harness's store_addresses: NET's segment in the store's keys, and
# the store it reads.
NET_OVERLAY=10.85.0.0_24
store_dump() { harness_store_dump etcd; }
MAX_LOST="${MAX_LOST:-2}"

# log_lines N / log_since N LINE - host N's plugin log: its length; what follows.
log_lines() { wc -l <"$(harness_host_dir "$1")/plugin.log"; }
log_since() { tail -n "+$(($2 + 1))" "$(harness_host_dir "$1")/plugin.log"; }

# calls_since N LINE - the Docker calls host N's plugin answered since LINE,
# "Method xCount, ...".
calls_since() {
    log_since "$1" "$2" | grep 'done status=' | grep -oE 'method=[A-Za-z.]+' | sed 's/method=//' |
        sort | uniq -c | sort -rn | awk '{ printf "%s%s x%s", (NR > 1 ? ", " : ""), $2, $1 }'
}

# state N CONTAINER - "running pid started-at restart-count".
state() {
    hdocker "$1" inspect -f '{{.State.Running}} {{.State.Pid}} {{.State.StartedAt}} {{.RestartCount}}' "$2"
}

# ep_keys - the store's endpoint keys, sorted.
ep_keys() { harness_store_dump etcd | awk '{ print $1 }' | grep '/overlay/[^/]*/ep/' | sort || true; }

# has_neigh N VNI IP - host N has a neighbour entry for IP on ro-vx-VNI.
has_neigh() {
    sc_has_ovl_ns "$1" "$2" 2>/dev/null || return 1
    sc_in_ovl "$1" "$2" ip neigh show dev "ro-vx-$2" | awk -v ip="$3" '$1 == ip { f = 1 } END { exit !f }'
}

phase "boot: etcd, host 1 with dockerd --live-restore, host 2 without"
sc_dockerd_config 1 '"live-restore": true'
sc_boot_etcd_hosts 1 2
assert_eq "host 1: docker info says live restore is enabled" true "$(hdocker 1 info -f '{{.LiveRestoreEnabled}}')"
harness_stop_if_failed "live restore could not be enabled on host 1"
for h in 1 2; do
    assert_ok "host $h: create $NET ($SUB)" sc_net_create "$h" "$NET" --subnet "$SUB"
done
assert_ok "host 1: run l1" sc_run 1 l1 "$NET"
assert_ok "host 1: run l2" sc_run 1 l2 "$NET"
assert_ok "host 2: run r2" sc_run 2 r2 "$NET"
harness_stop_if_failed "setup failed"
declare -A IP
for c in l1 l2; do IP[$c]="$(hcontainer_ip 1 "$c" "$NET")"; done
IP[r2]="$(hcontainer_ip 2 r2 "$NET")"
VNI="$(sc_vni_of_subnet etcd "$SUB")"
assert_eventually "r2 (h2) pings l1 (h1)" 15 sc_ping 2 r2 "${IP[l1]}"
assert_eventually "l2 (h1) pings r2 (h2)" 15 sc_ping 1 l2 "${IP[r2]}"
eps="$(ep_keys)"
assert_eq "the store holds three endpoints" 3 "$(printf '%s\n' "$eps" | grep -c .)"

for how in TERM KILL; do
    args=()
    [[ "$how" == TERM ]] || args=(--kill)
    phase "host 1: dockerd restarted (SIG$how) with live-restore while l1 and l2 run"
    before_l1="$(state 1 l1)"
    before_l2="$(state 1 l2)"
    mark="$(log_lines 1)"
    harness_ping_start 2 r2 "${IP[l1]}" "lr-$how"
    sleep 1
    t0_ms="$(now_ms)"
    harness_restart_dockerd 1 "${args[@]}"
    restart_ms=$(($(now_ms) - t0_ms))
    sleep 1
    harness_ping_stop "lr-$how"
    read -r sent lost longest < <(harness_ping_lost "lr-$how")
    echo "dockerd down and up again in ${restart_ms} ms; r2 -> l1 meanwhile: $sent pings, $lost lost (longest run $longest)"
    assert_eq "host 1: live restore still enabled after the restart" true "$(hdocker 1 info -f '{{.LiveRestoreEnabled}}')"
    assert_eq "l1 kept running: same pid and start time, not restarted" "$before_l1" "$(state 1 l1)"
    assert_eq "l2 kept running: same pid and start time, not restarted" "$before_l2" "$(state 1 l2)"
    assert_ok "pings from host 2 to l1 were answered across the restart ($sent sent)" test "$sent" -ge 10
    assert_ok "at most $MAX_LOST of them lost ($lost)" test "$lost" -ge 0 -a "$lost" -le "$MAX_LOST"
    assert_eq "l1 keeps its address" "${IP[l1]}" "$(hcontainer_ip 1 l1 "$NET")"
    assert_eq "l2 keeps its address" "${IP[l2]}" "$(hcontainer_ip 1 l2 "$NET")"
    assert_eq "the store holds the same endpoints" "$eps" "$(ep_keys)"
    assert_ok "host 2 keeps its neighbour entry for l1" has_neigh 2 "$VNI" "${IP[l1]}"
    assert_eventually "l2 (h1) pings r2 (h2) after the restart" 15 sc_ping 1 l2 "${IP[r2]}"
    assert_eventually "r2 (h2) pings l2 (h1) after the restart" 15 sc_ping 2 r2 "${IP[l2]}"
    calls="$(calls_since 1 "$mark")"
    echo "    calls to host 1's plugin since the restart: ${calls:-none}"
    assert_ok "the plugin got no Leave or DeleteEndpoint for the restored containers" \
        eval "! log_since 1 $mark | grep 'done status=' | grep -qE 'method=NetworkDriver\\.(Leave|DeleteEndpoint)'"
    assert_empty "host 1's plugin logged no ERROR since the restart" "$(log_since 1 "$mark" | grep -E '^[^ ]+ +ERROR ' || true)"
done

phase "after the restarts: a new container; docker rm releases everything"
assert_ok "host 1: run l3" sc_run 1 l3 "$NET"
l3="$(hcontainer_ip 1 l3 "$NET")"
assert_eventually "r2 (h2) pings l3 (h1)" 15 sc_ping 2 r2 "$l3"
assert_eq "the store holds the four containers' addresses (address holder)" \
    "$({ printf '%s h1\n' "${IP[l1]}" "${IP[l2]}" "$l3"; printf '%s h2\n' "${IP[r2]}"; } | sort)" \
    "$(store_addresses | sort)"
assert_ok "host 1: docker rm -f l1 l2 l3 (two of them restored by live-restore)" hdocker 1 rm -f l1 l2 l3
for ip in "${IP[l1]}" "${IP[l2]}" "$l3"; do
    assert_eventually "host 2 dropped its neighbour entry for $ip" 5 eval "! has_neigh 2 $VNI $ip"
done
assert_eq "the store holds r2's endpoint only" 1 "$(ep_keys | grep -c .)"
# Before `network rm`: its ReleasePool frees the whole pool and would hide an
# address that docker rm leaked.
assert_eq "the store holds r2's address only: l1's, l2's and l3's were released" \
    "${IP[r2]} h2" "$(store_addresses)"
assert_eventually "host 1 removed ro-$VNI with its last container" 10 eval "! sc_has_ovl_ns 1 $VNI"
assert_empty "host 1: no ro-*/rc-* link left" "$(host_ro_links 1)"
sc_rm_all 2
for h in 1 2; do
    assert_ok "host $h: network rm $NET" hdocker "$h" network rm "$NET"
done
for h in 1 2; do sc_assert_host_clean "$h"; done
assert_store_empty etcd
echo "total time: $((SECONDS - SC_T_START))s"
harness_summary
