#!/usr/bin/env bash
# `rustoverlay status` on three hosts sharing etcd (STORE=etcd, the default)
# or the Consul test server (status_consul.sh): `status --json` through
# host 1's plugin lists the three hosts, the overlays, endpoints per host and
# pool usage as Docker shows them, and so does `--from-store` without the
# plugin; the table says the same; after host 3's plugin is killed, status
# shows host 3 gone; an FDB entry deleted by hand on host 1 shows as drift
# on host 1, and none once peer sync has put it back.
set -euo pipefail
cd "$(dirname "$0")/../.."
# shellcheck source=tests/lib/harness.sh
source tests/lib/harness.sh

STORE="${STORE:-etcd}"
harness_init "status_$STORE"
T_START=$SECONDS
img="$HARNESS_IMAGE"
HOSTS=(1 2 3)
NET=appnet
SUBNET=10.77.0.0/24
OVERLAY=10.77.0.0_24
HOST_TTL=4

# status H ARGS... - `rustoverlay status` in host H (its mount namespace:
# the plugin's socket is there).
status() {
    local n="$1"
    shift
    hexec_mnt "$n" "$(harness_bin)" status "$@"
}

phase "boot: $STORE and three hosts (--host-ttl $HOST_TTL)"
harness_shared_store_start "$STORE"
store="$(harness_shared_store_url "$STORE")"
STORE_ARGS=()
mapfile -t STORE_ARGS < <(harness_shared_store_args "$STORE")
for h in "${HOSTS[@]}"; do
    harness_start_host "$h" --store "$store" "${STORE_ARGS[@]}" --host-ttl "$HOST_TTL"
    harness_busybox_image "$h"
    assert_ok "host $h: create $NET" \
        hdocker "$h" network create -d rustoverlay --ipam-driver rustoverlay --subnet "$SUBNET" "$NET"
done
declare -A RUNS=([1]=2 [2]=1 [3]=1)
for h in "${HOSTS[@]}"; do
    for i in $(seq 1 "${RUNS[$h]}"); do
        assert_ok "host $h: run c$h$i" hdocker "$h" run -d --network "$NET" --name "c$h$i" "$img" sleep 3600
    done
done
harness_stop_if_failed "setup failed"

# docker_count H - containers host H's Docker shows on $NET.
docker_count() { hdocker "$1" network inspect -f '{{len .Containers}}' "$NET"; }

check_report() {
    local what="$1" json="$2" h
    assert_eq "$what: three hosts, all alive" "h1 true,h2 true,h3 true" \
        "$(jq -r '[.cluster.hosts[] | "\(.host) \(.alive)"] | join(",")' <<<"$json")"
    assert_eq "$what: one overlay, $OVERLAY" "$OVERLAY" "$(jq -r '[.cluster.overlays[].overlay] | join(",")' <<<"$json")"
    for h in "${HOSTS[@]}"; do
        assert_eq "$what: endpoints of h$h on $OVERLAY = what host $h's Docker shows" "$(docker_count "$h")" \
            "$(jq -r --arg h "h$h" '.cluster.overlays[0].endpoints[$h] // 0' <<<"$json")"
        assert_eq "$what: h$h's VTEP" "$(harness_host_ip "$h")" \
            "$(jq -r --arg h "h$h" '.cluster.hosts[] | select(.host == $h) | .vtep' <<<"$json")"
        assert_eq "$what: h$h has one Docker network on the overlay" 1 \
            "$(jq -r --arg h "h$h" '.cluster.overlays[0].networks[$h] | length' <<<"$json")"
    done
    # The gateway and every container.
    local used=$((1 + $(docker_count 1) + $(docker_count 2) + $(docker_count 3)))
    assert_eq "$what: pool used = gateway + containers ($used)" "$used" \
        "$(jq -r '.cluster.overlays[0].pools[0].used' <<<"$json")"
    assert_eq "$what: pool size 254" 254 "$(jq -r '.cluster.overlays[0].pools[0].size' <<<"$json")"
}

phase "status --json through host 1's plugin matches Docker"
json="$(status 1 --json)"
check_report "plugin" "$json"
assert_eq "the report says which store" "$(jq -r '.store' <<<"$json")" \
    "$([[ "$STORE" == etcd ]] && echo etcd || echo consul)"
assert_eq "host 1's kernel is in step with the store" true "$(jq -r '.local.in_step' <<<"$json")"
assert_eq "host 1 expects entries for 2 remote endpoints" 2 \
    "$(jq -r '.local.overlays[0].remote_endpoints' <<<"$json")"

phase "status --from-store reads the store without the plugin"
json="$(hexec 1 "$(harness_bin)" status --json --from-store --store "$store" "${STORE_ARGS[@]}")"
check_report "from the store" "$json"
assert_eq "no kernel check without the plugin" null "$(jq -r '.local' <<<"$json")"

phase "the table"
table="$(status 2)"
printf '%s\n' "$table" | sed 's/^/    /'
assert_contains "the table lists h3 alive" "h3    alive" "$table"
assert_contains "the table shows endpoints per host" "h1:2 h2:1 h3:1" "$table"
assert_contains "the table shows pool usage" "$SUBNET 5/249/254" "$table"
assert_contains "the table gives the verdict on host 2" "kernel in step with the store" "$table"

phase "an FDB entry deleted by hand on host 1 is drift, until peer sync repairs it"
vni="$(jq -r '.local.overlays[0].vni' <<<"$(status 1 --json)")"
c2_mac="$(hdocker 2 inspect -f "{{(index .NetworkSettings.Networks \"$NET\").MacAddress}}" c21 | tr 'A-F' 'a-f')"
in_ovl() { hexec_mnt 1 nsenter --net="/run/rustoverlay/netns/ro-$vni" -- "$@"; }
# The repair runs every 5 s: a deletion it undoes before status reads is
# tried again (each try is ~0.1 s of a 5 s period).
shown=""
for _ in 1 2 3; do
    in_ovl bridge fdb del "$c2_mac" dev "ro-vx-$vni" 2>/dev/null || true
    json="$(status 1 --json)"
    if [[ "$(jq -r '.local.overlays[0].missing_fdb[].mac' <<<"$json")" == "$c2_mac" ]]; then
        shown=1
        break
    fi
done
assert_eq "status on host 1 names the missing FDB entry of c21 ($c2_mac)" 1 "$shown"
assert_eq "and says the kernel is not in step" false "$(jq -r '.local.in_step' <<<"$json")"
# The table, read right after a fresh deletion (the repair may run between
# two status calls).
table=""
for _ in 1 2 3; do
    in_ovl bridge fdb del "$c2_mac" dev "ro-vx-$vni" 2>/dev/null || true
    table="$(status 1)"
    [[ "$table" != *"missing fdb    $c2_mac"* ]] || break
done
assert_contains "the table says DRIFT and names the entry" "missing fdb    $c2_mac -> $(harness_host_ip 2)" "$table"
assert_contains "the table's verdict is DRIFT" "DRIFT between the kernel and the store" "$table"
in_step() { [[ "$(status 1 --json | jq -r '.local.in_step')" == true ]]; }
assert_eventually "status on host 1 shows no drift once peer sync repaired it" 15 in_step
assert_contains "the plugin logged the repair" "kernel entries had drifted" \
    "$(cat "$(harness_host_dir 1)/plugin.log")"
assert_eventually "c11 (h1) pings c21 (h2) again" 10 hdocker 1 exec c11 ping -c 1 -W 1 \
    "$(hcontainer_ip 2 c21 "$NET")"

phase "host 3's plugin killed: status shows it gone"
harness_kill_plugin 3
h3_gone() {
    [[ "$(status 1 --json | jq -r '.cluster.hosts[] | select(.host == "h3") | .alive')" == false ]]
}
assert_eventually "status on host 1 shows h3 gone (within 2 x --host-ttl)" $((HOST_TTL * 2 + 5)) h3_gone
json="$(status 1 --json)"
assert_eq "h3 still holds its endpoint (not reclaimed yet)" 1 \
    "$(jq -r '.cluster.hosts[] | select(.host == "h3") | .endpoints' <<<"$json")"
assert_ok "host 1's plugin saw when h3 left" \
    test "$(jq -r '.cluster.hosts[] | select(.host == "h3") | .gone_since' <<<"$json")" -gt 0
assert_contains "the table says h3 is gone, and since when" "h3    gone" "$(status 1)"
assert_eq "h1 and h2 still alive" "h1 true,h2 true" \
    "$(jq -r '[.cluster.hosts[] | select(.alive) | "\(.host) \(.alive)"] | join(",")' <<<"$json")"

phase "teardown"
harness_restart_plugin 3
for h in "${HOSTS[@]}"; do
    ids="$(hdocker "$h" ps -aq)"
    # shellcheck disable=SC2086 # one id per word
    [[ -z "$ids" ]] || assert_ok "host $h: remove its containers" hdocker "$h" rm -f $ids
    assert_ok "host $h: remove $NET" hdocker "$h" network rm "$NET"
done
assert_store_empty "$STORE"
echo "total time: $((SECONDS - T_START))s"
harness_summary
