#!/usr/bin/env bash
# --ip-range, --gateway and --aux-address through Docker, on two simulated
# hosts sharing one etcd. The network is created on host 1 with all three; on
# host 2 a different --gateway or --ip-range is refused (naming the one in
# use), the same options are accepted and Docker shows the same IPAM config
# on both hosts. Containers of both hosts get addresses inside the range only,
# never the gateway or the aux address (which lies inside the range), all
# distinct, until the range is exhausted (range size minus the aux address:
# the next docker run fails on either host with a clear error); they ping
# each other across hosts. `docker run --ip` of the gateway or the aux
# address is refused on both hosts; `--ip` outside the range but inside the
# subnet works and is reachable across hosts. A network without --gateway
# gets one gateway shared by both hosts. A --subnet with host bits set is
# refused by Docker 26 itself and passed on (normalised by the plugin) by
# Docker 20.10. After removal the store is empty and the subnet can be
# created again with another gateway and range.
set -euo pipefail
cd "$(dirname "$0")/../.."
# shellcheck source=tests/lib/harness.sh
source tests/lib/harness.sh
harness_init ipam_options
# shellcheck source=tests/lib/scenarios.sh
source tests/lib/scenarios.sh

NET=rangenet
SUB=10.83.0.0/24
RANGE=10.83.0.128/29 # 10.83.0.128 - 10.83.0.135
RANGE_LO=128
RANGE_HI=135
GW=10.83.0.1
AUX=10.83.0.129 # inside the range
OUTSIDE=10.83.0.50
NET2=plainnet
SUB2=10.84.0.0/24

# ipam_of N NETWORK - "subnet range gateway aux" as Docker shows them.
ipam_of() {
    hdocker "$1" network inspect -f \
        '{{range .IPAM.Config}}{{.Subnet}} {{.IPRange}} {{.Gateway}} {{range $k, $v := .AuxiliaryAddresses}}{{$k}}={{$v}}{{end}}{{end}}' "$2"
}

# in_range IP - IP lies in $RANGE.
in_range() {
    local last="${1##*.}"
    [[ "${1%.*}" == 10.83.0 && "$last" -ge "$RANGE_LO" && "$last" -le "$RANGE_HI" ]]
}

phase "boot: etcd and two hosts"
sc_boot_etcd_hosts 1 2

phase "$NET: --subnet $SUB --ip-range $RANGE --gateway $GW --aux-address rtr=$AUX"
OPTS=(--subnet "$SUB" --ip-range "$RANGE" --gateway "$GW" --aux-address "rtr=$AUX")
assert_ok "host 1: network create ${OPTS[*]} $NET" sc_net_create 1 "$NET" "${OPTS[@]}"
harness_stop_if_failed "network creation failed"
out="$(sc_net_create 2 "$NET" --subnet "$SUB" --ip-range "$RANGE" --gateway 10.83.0.2 --aux-address "rtr=$AUX" 2>&1)" && rc=0 || rc=$?
assert_ok "host 2: a different --gateway (10.83.0.2) is refused" test "$rc" -ne 0
assert_contains "the refusal names the gateway in use" "already has gateway $GW" "$out"
out="$(sc_net_create 2 "$NET" --subnet "$SUB" --ip-range 10.83.0.136/29 --gateway "$GW" --aux-address "rtr=$AUX" 2>&1)" && rc=0 || rc=$?
assert_ok "host 2: a different --ip-range (10.83.0.136/29) is refused" test "$rc" -ne 0
assert_contains "the refusal names the range in use" "--ip-range $RANGE" "$out"
assert_ok "host 2: network create with the same options" sc_net_create 2 "$NET" "${OPTS[@]}"
harness_stop_if_failed "network creation on host 2 failed"
expected_ipam="$SUB $RANGE $GW rtr=$AUX"
for h in 1 2; do
    assert_eq "host $h: Docker shows subnet, range, gateway and aux address" "$expected_ipam" "$(ipam_of "$h" "$NET")"
done
assert_contains "the store keeps $GW as the network's gateway" '"kind":"gateway"' \
    "$(harness_store_dump etcd | awk -v k="/rustoverlay/v1/ipam/pool/10.83.0.0_24/addr/$GW" '$1 == k')"
assert_contains "the store keeps $AUX as the network's aux address" '"kind":"aux"' \
    "$(harness_store_dump etcd | awk -v k="/rustoverlay/v1/ipam/pool/10.83.0.0_24/addr/$AUX" '$1 == k')"

phase "--ip of the gateway or the aux address is refused on both hosts"
for h in 1 2; do
    out="$(sc_run "$h" "gw$h" "$NET" --ip "$GW" 2>&1)" && rc=0 || rc=$?
    assert_ok "host $h: docker run --ip $GW (gateway) is refused" test "$rc" -ne 0
    assert_contains "host $h: the refusal says it is the gateway" "address $GW is the gateway" "$out"
    out="$(sc_run "$h" "aux$h" "$NET" --ip "$AUX" 2>&1)" && rc=0 || rc=$?
    assert_ok "host $h: docker run --ip $AUX (aux address) is refused" test "$rc" -ne 0
    assert_contains "host $h: the refusal says it is an aux address" "address $AUX is an aux address" "$out"
    hdocker "$h" rm -f "gw$h" "aux$h" >/dev/null 2>&1 || true
done

phase "containers of both hosts fill the range: inside it, never the gateway or aux address"
# 8 addresses in the range, one of them the aux address: 7 containers.
capacity=$((RANGE_HI - RANGE_LO + 1 - 1))
declare -A HOST_OF IP_OF
CS=()
for i in $(seq 1 "$capacity"); do
    h=$((i % 2 + 1))
    c="r$i"
    assert_ok "host $h: run $c on $NET" sc_run "$h" "$c" "$NET"
    HOST_OF[$c]=$h
    IP_OF[$c]="$(hcontainer_ip "$h" "$c" "$NET")"
    CS+=("$c")
done
ips="$(for c in "${CS[@]}"; do echo "${IP_OF[$c]}"; done | sort -V)"
echo "addresses: $(printf '%s' "$ips" | tr '\n' ' ')"
for c in "${CS[@]}"; do
    assert_ok "$c (h${HOST_OF[$c]}) got ${IP_OF[$c]}, inside $RANGE" in_range "${IP_OF[$c]}"
done
assert_eq "$capacity distinct addresses" "$capacity" "$(printf '%s\n' "$ips" | grep . | sort -u | grep -c .)"
assert_empty "none is the aux address or the gateway" "$(printf '%s\n' "$ips" | grep -Fx -e "$AUX" -e "$GW" || true)"
for h in 1 2; do
    out="$(sc_run "$h" "full$h" "$NET" 2>&1)" && rc=0 || rc=$?
    assert_ok "host $h: one more container is refused: the range is full" test "$rc" -ne 0
    assert_contains "host $h: the error names the exhausted range, not the subnet's size" \
        "no free address left in the --ip-range of subnet $SUB (10.83.0.$RANGE_LO to 10.83.0.$RANGE_HI, 8 addresses" "$out"
    hdocker "$h" rm -f "full$h" >/dev/null 2>&1 || true
done
assert_eventually "r1 (h${HOST_OF[r1]}) pings r2 (h${HOST_OF[r2]}) across hosts" 15 sc_ping "${HOST_OF[r1]}" r1 "${IP_OF[r2]}"
assert_eventually "r2 (h${HOST_OF[r2]}) pings r$capacity (h${HOST_OF[r$capacity]})" 15 \
    sc_ping "${HOST_OF[r2]}" r2 "${IP_OF[r$capacity]}"

phase "--ip outside the range, inside the subnet"
assert_ok "host 1: docker run --ip $OUTSIDE" sc_run 1 fixed "$NET" --ip "$OUTSIDE"
assert_eq "fixed has $OUTSIDE" "$OUTSIDE" "$(hcontainer_ip 1 fixed "$NET")"
assert_eventually "r1 (h${HOST_OF[r1]}) pings fixed (h1, $OUTSIDE)" 15 sc_ping "${HOST_OF[r1]}" r1 "$OUTSIDE"
assert_eventually "fixed (h1) pings r1 (h${HOST_OF[r1]})" 15 sc_ping 1 fixed "${IP_OF[r1]}"
out="$(sc_run 2 fixed2 "$NET" --ip "$OUTSIDE" 2>&1)" && rc=0 || rc=$?
assert_ok "host 2: docker run --ip $OUTSIDE (taken on host 1) is refused" test "$rc" -ne 0
hdocker 2 rm -f fixed2 >/dev/null 2>&1 || true

phase "$NET2 without --gateway: one gateway for both hosts"
for h in 1 2; do
    assert_ok "host $h: network create --subnet $SUB2 $NET2" sc_net_create "$h" "$NET2" --subnet "$SUB2"
done
# Docker shows no gateway it was not given; the store holds the one both
# hosts' RequestAddress(gateway) calls got: one address of kind gateway.
gws="$(harness_store_dump etcd | awk '$1 ~ /^\/rustoverlay\/v1\/ipam\/pool\/10\.84\.0\.0_24\/addr\// && /"kind":"gateway"/ { sub(/.*\//, "", $1); print $1 }')"
assert_eq "the store holds one gateway address for $SUB2, shared by both hosts" 1 "$(printf '%s\n' "$gws" | grep -c .)"
gw1="$(printf '%s\n' "$gws" | head -n 1)"
assert_ok "that gateway lies in $SUB2 ($gw1)" test "${gw1%.*}" = 10.84.0
assert_ok "host 1: run p1 on $NET2" sc_run 1 p1 "$NET2"
assert_ok "host 2: run p2 on $NET2" sc_run 2 p2 "$NET2"
p1="$(hcontainer_ip 1 p1 "$NET2")"
p2="$(hcontainer_ip 2 p2 "$NET2")"
assert_ok "neither container got the gateway ($p1, $p2)" test "$p1" != "$gw1" -a "$p2" != "$gw1"
assert_eventually "p1 (h1) pings p2 (h2)" 15 sc_ping 1 p1 "$p2"

# pool_claimed SEGMENT - the shared store holds the pool's record (grep -c
# reads all its input: no SIGPIPE for the pipeline).
pool_claimed() { harness_store_dump etcd | awk '{ print $1 }' | grep -c "/ipam/pool/$1/record\$" >/dev/null; }

phase "a --subnet with host bits set: Docker 26 refuses it itself, Docker 20.10 passes it on normalised"
HB=10.86.0.5/24
if [[ "$HARNESS_ENGINE" == docker26 ]]; then
    hb_out="$(sc_net_create 1 hostbits --subnet "$HB" 2>&1)" && hb_rc=0 || hb_rc=$?
    assert_ok "Docker 26 refuses --subnet $HB" test "$hb_rc" -ne 0
    assert_contains "its message names the subnet it should be" "should be 10.86.0.0/24" "$hb_out"
    assert_fails "no pool was claimed for it" pool_claimed 10.86.0.0_24
else
    assert_ok "Docker 20.10 creates --subnet $HB" sc_net_create 1 hostbits --subnet "$HB"
    assert_ok "host 1: run hb1 on it" sc_run 1 hb1 hostbits
    assert_contains "hb1's address lies in 10.86.0.0/24" 10.86.0. "$(hcontainer_ip 1 hb1 hostbits)"
    assert_ok "the plugin claimed the pool 10.86.0.0/24" pool_claimed 10.86.0.0_24
    assert_ok "host 1: remove hb1" hdocker 1 rm -f hb1
    assert_ok "host 1: network rm hostbits" hdocker 1 network rm hostbits
fi

phase "remove everything; nothing is left; the subnet is free for other options"
for h in 1 2; do sc_rm_all "$h"; done
for h in 1 2; do
    assert_ok "host $h: network rm $NET $NET2" hdocker "$h" network rm "$NET" "$NET2"
done
for h in 1 2; do sc_assert_host_clean "$h"; done
assert_store_empty etcd
for h in 1 2; do
    assert_ok "host $h: $SUB again with --gateway 10.83.0.254 --ip-range 10.83.0.0/25" \
        sc_net_create "$h" "$NET" --subnet "$SUB" --gateway 10.83.0.254 --ip-range 10.83.0.0/25
done
assert_ok "host 1: run n1" sc_run 1 n1 "$NET"
n1="$(hcontainer_ip 1 n1 "$NET")"
assert_ok "n1 got an address in the new range ($n1)" test "${n1%.*}" = 10.83.0 -a "${n1##*.}" -lt 128
assert_ok "host 1: docker run --ip $AUX (no longer an aux address) works" sc_run 1 n2 "$NET" --ip "$AUX"
sc_rm_all 1
for h in 1 2; do
    assert_ok "host $h: network rm $NET" hdocker "$h" network rm "$NET"
done
assert_store_empty etcd
echo "total time: $((SECONDS - SC_T_START))s"
harness_summary
