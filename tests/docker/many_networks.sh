#!/usr/bin/env bash
# Many networks on one host, two simulated hosts sharing one etcd. Host 1
# creates MANY (50) rustoverlay networks and runs a container on each: 50
# distinct VNIs, one overlay namespace per network with its bridge and VXLAN
# device, nothing in the host's own namespace; a sample of the networks is
# also on host 2 and pings across hosts. Half the networks are removed: their
# namespaces, devices and VNI claims go, the others keep working. The VNI
# cursor is then moved to 10 below the top (2^24 - 1) in etcd and 25 new
# networks are created: they take the 10 top VNIs, wrap around, skip every
# VNI still claimed and reuse the freed ones (no collision), in fresh
# namespaces (no stale peer entry of the network that had the VNI before),
# and a reused VNI carries traffic across hosts. Finally everything is
# removed: no network, namespace, device or store key is left. Times are
# printed.
set -euo pipefail
cd "$(dirname "$0")/../.."
# shellcheck source=tests/lib/harness.sh
source tests/lib/harness.sh
harness_init many_networks
# shellcheck source=tests/lib/scenarios.sh
source tests/lib/scenarios.sh

MANY="${MANY:-50}"
HALF=$((MANY / 2))
PAR="${PAR:-4}"         # concurrent docker runs
VNI_MAX=$(((1 << 24) - 1))
TOP=10                  # VNIs left above the moved cursor
SAMPLE=(1 2 $((MANY / 2)) "$MANY")

# subnet_a I / subnet_b I - the subnets of the first and second batch.
subnet_a() { printf '10.100.%s.0/24' "$1"; }
subnet_b() { printf '10.101.%s.0/24' "$1"; }

# vni_map - "subnet vni" of every overlay in the store.
vni_map() {
    harness_store_dump etcd |
        awk '$1 ~ /^\/rustoverlay\/v1\/overlay\/[^/]+\/record$/ { print $2 }' |
        sed -n 's/.*"vni":\([0-9]*\).*"subnets":\["\([^"]*\)".*/\2 \1/p; s/.*"subnets":\["\([^"]*\)".*"vni":\([0-9]*\).*/\1 \2/p'
}

# claims - the VNI claim keys' numbers in the store, sorted.
claims() {
    harness_store_dump etcd | awk '{ print $1 }' | sed -n 's|^/rustoverlay/v1/vni/\([0-9][0-9]*\)$|\1|p' | sort -n
}

# ns_vnis N - the VNIs of host N's overlay namespaces, sorted.
ns_vnis() { ovl_namespaces "$1" | sed -n 's/^ro-//p' | sort -n; }

# etcd_put KEY VALUE - a raw put through etcd's JSON gateway (no etcdctl
# needed), from the etcd's own namespace.
etcd_put() {
    local body
    body="$(printf '{"key":"%s","value":"%s"}' "$(printf '%s' "$1" | base64 -w0)" "$(printf '%s' "$2" | base64 -w0)")"
    # shellcheck disable=SC2016 # expanded by the inner bash
    nsenter --net="/run/netns/$(harness_etcd_ns)" -- timeout 5 bash -c '
        exec 3<>"/dev/tcp/$0/$1" || exit 1
        printf "POST /v3/kv/put HTTP/1.0\r\nHost: %s\r\nContent-Type: application/json\r\nContent-Length: %s\r\n\r\n%s" \
            "$0" "${#2}" "$2" >&3
        cat <&3' "$HARNESS_ETCD_IP" "$HARNESS_ETCD_CLIENT_PORT" "$body" | grep -q '"revision"'
}

# par_run N PREFIX NETPREFIX I... - docker run PREFIX$I on network NETPREFIX$I
# on host N for every I, PAR at a time; one counted assertion for them all.
par_run() {
    local n="$1" prefix="$2" netprefix="$3" i failed="" dir="$HARNESS_TMP/par"
    shift 3
    mkdir -p "$dir"
    for i in "$@"; do
        while (($(jobs -rp | wc -l) >= PAR)); do wait -n || true; done
        (sc_run "$n" "$prefix$i" "$netprefix$i" >"$dir/$prefix$i.out" 2>&1 && : >"$dir/$prefix$i.ok") &
    done
    wait
    for i in "$@"; do
        [[ -f "$dir/$prefix$i.ok" ]] || failed+=" $prefix$i"
    done
    assert_empty "host $n: docker run of $# containers ($prefix$1 ...) succeeded" "$failed"
    for i in $failed; do _harness_indent <"$dir/$i.out"; done
}

# check_ns_devices N VNI... - each VNI's namespace on host N holds its bridge
# and VXLAN device; one counted assertion.
check_ns_devices() {
    local n="$1" v bad="" links
    shift
    for v in "$@"; do
        links="$(sc_in_ovl "$n" "$v" ip -o link show 2>/dev/null)" || links=""
        if [[ "$links" != *" ro-br-$v:"* ]] || [[ "$links" != *" ro-vx-$v:"* && "$links" != *" ro-vx-$v@"* ]]; then
            bad+=" $v"
        fi
    done
    assert_empty "host $n: every one of the $# overlay namespaces holds ro-br-VNI and ro-vx-VNI (bad:)" "$bad"
}

phase "boot: etcd and two hosts"
sc_boot_etcd_hosts 1 2

phase "host 1: $MANY networks, one container each"
t0=$SECONDS
failed=""
for i in $(seq 1 "$MANY"); do
    sc_net_create 1 "m$i" --subnet "$(subnet_a "$i")" >/dev/null 2>&1 || failed+=" m$i"
done
assert_empty "host 1: $MANY networks created" "$failed"
t_create=$((SECONDS - t0))
t0=$SECONDS
mapfile -t ALL < <(seq 1 "$MANY")
par_run 1 a m "${ALL[@]}"
t_run=$((SECONDS - t0))
echo "$MANY network creates: ${t_create}s; $MANY docker runs ($PAR at a time): ${t_run}s"
harness_stop_if_failed "networks or containers missing"

declare -A VNI_A
while read -r sub vni; do
    [[ "$sub" == 10.100.* ]] || continue
    i="${sub#10.100.}"
    VNI_A[${i%%.*}]="$vni"
done < <(vni_map)
assert_eq "the store has an overlay for each of the $MANY networks" "$MANY" "${#VNI_A[@]}"
all_vnis="$(printf '%s\n' "${VNI_A[@]}" | sort -n)"
assert_eq "$MANY distinct VNIs" "$MANY" "$(printf '%s\n' "$all_vnis" | sort -u | grep -c .)"
assert_ok "all VNIs >= 256 ($(head -n 1 <<<"$all_vnis") .. $(tail -n 1 <<<"$all_vnis"))" test "$(head -n 1 <<<"$all_vnis")" -ge 256
assert_eq "the store's VNI claims are exactly those" "$all_vnis" "$(claims)"
assert_eq "host 1 has one overlay namespace per network" "$all_vnis" "$(ns_vnis 1)"
# shellcheck disable=SC2086 # one VNI per word
check_ns_devices 1 $all_vnis
assert_empty "host 1: no ro-*/rc-* link in its own namespace" "$(host_ro_links 1)"
assert_eq "host 2 has no overlay namespace (no container there yet)" "" "$(ns_vnis 2)"

phase "a sample (${SAMPLE[*]}) also on host 2: traffic across hosts"
for i in "${SAMPLE[@]}"; do
    assert_ok "host 2: create m$i" sc_net_create 2 "m$i" --subnet "$(subnet_a "$i")"
done
par_run 2 b m "${SAMPLE[@]}"
for i in "${SAMPLE[@]}"; do
    assert_eventually "m$i: b$i (h2) pings a$i (h1)" 15 sc_ping 2 "b$i" "$(hcontainer_ip 1 "a$i" "m$i")"
done
old_mac_b2="$(sc_mac 2 b2 m2)"

phase "remove the $HALF even-numbered networks"
EVEN=()
ODD=()
for i in $(seq 1 "$MANY"); do
    if ((i % 2 == 0)); then EVEN+=("$i"); else ODD+=("$i"); fi
done
t0=$SECONDS
# shellcheck disable=SC2046 # one name per word
assert_ok "host 1: docker rm -f the even containers" hdocker 1 rm -f $(printf 'a%s ' "${EVEN[@]}")
# shellcheck disable=SC2046
assert_ok "host 1: network rm the even networks" hdocker 1 network rm $(printf 'm%s ' "${EVEN[@]}")
for i in "${SAMPLE[@]}"; do
    ((i % 2 == 0)) || continue
    assert_ok "host 2: remove b$i and m$i" eval "hdocker 2 rm -f b$i && hdocker 2 network rm m$i"
done
echo "removal of $HALF containers and networks: $((SECONDS - t0))s"
odd_vnis="$(for i in "${ODD[@]}"; do echo "${VNI_A[$i]}"; done | sort -n)"
freed="$(for i in "${EVEN[@]}"; do echo "${VNI_A[$i]}"; done | sort -n)"
assert_eq "the store's VNI claims: the odd networks' only" "$odd_vnis" "$(claims)"
assert_eventually "host 1's overlay namespaces: the odd networks' only" 10 \
    test "$odd_vnis" == "$(ns_vnis 1)"
assert_eq "host 2's overlay namespaces: its odd sample networks' only" \
    "$(for i in "${SAMPLE[@]}"; do ((i % 2 == 0)) || echo "${VNI_A[$i]}"; done | sort -n)" "$(ns_vnis 2)"
assert_empty "host 1: no ro-*/rc-* link in its own namespace" "$(host_ro_links 1)"
assert_ok "m1 still works: b1 (h2) pings a1 (h1)" sc_ping 2 b1 "$(hcontainer_ip 1 a1 m1)"

phase "VNI cursor moved to $((VNI_MAX - TOP + 1)); $HALF new networks wrap around and reuse freed VNIs"
assert_ok "etcd: put /rustoverlay/v1/vni/next = $((VNI_MAX - TOP + 1))" \
    etcd_put /rustoverlay/v1/vni/next "$((VNI_MAX - TOP + 1))"
t0=$SECONDS
failed=""
mapfile -t NEW < <(seq 1 "$HALF")
for i in "${NEW[@]}"; do
    sc_net_create 1 "n$i" --subnet "$(subnet_b "$i")" >/dev/null 2>&1 || failed+=" n$i"
done
assert_empty "host 1: $HALF new networks created" "$failed"
par_run 1 c n "${NEW[@]}"
echo "$HALF network creates and docker runs: $((SECONDS - t0))s"
declare -A VNI_B
while read -r sub vni; do
    [[ "$sub" == 10.101.* ]] || continue
    i="${sub#10.101.}"
    VNI_B[${i%%.*}]="$vni"
done < <(vni_map)
new_vnis="$(printf '%s\n' "${VNI_B[@]}" | sort -n)"
expected="$(
    {
        seq $((VNI_MAX - TOP + 1)) "$VNI_MAX"
        printf '%s\n' "$freed" | head -n $((HALF - TOP))
    } | sort -n
)"
echo "new VNIs: $(printf '%s' "$new_vnis" | tr '\n' ' ')"
assert_eq "the new networks got the $TOP top VNIs, then the lowest freed ones" "$expected" "$new_vnis"
assert_empty "no new VNI collides with a live network's" \
    "$(printf '%s\n%s\n' "$odd_vnis" "$new_vnis" | sort -n | uniq -d)"
assert_eq "the store's VNI claims: the odd and the new networks'" \
    "$(printf '%s\n%s\n' "$odd_vnis" "$new_vnis" | sort -n)" "$(claims)"
assert_eq "host 1: one overlay namespace per live network" \
    "$(printf '%s\n%s\n' "$odd_vnis" "$new_vnis" | sort -n)" "$(ns_vnis 1)"
# shellcheck disable=SC2086
check_ns_devices 1 $new_vnis
# The network that got m2's old VNI: fresh devices, none of m2's peers.
reused="${VNI_A[2]}"
k=""
for i in "${NEW[@]}"; do [[ "${VNI_B[$i]}" != "$reused" ]] || k="$i"; done
assert_ok "a new network reuses m2's VNI $reused (n${k:-?})" test -n "$k"
if [[ -n "$k" ]]; then
    assert_ok "host 2: create n$k (VNI $reused, m2's before)" sc_net_create 2 "n$k" --subnet "$(subnet_b "$k")"
    assert_ok "host 2: run d$k on n$k" sc_run 2 "d$k" "n$k"
    assert_eventually "n$k: d$k (h2) pings c$k (h1) over the reused VNI" 15 sc_ping 2 "d$k" "$(hcontainer_ip 1 "c$k" "n$k")"
    assert_eventually "n$k: c$k (h1) pings d$k (h2)" 15 sc_ping 1 "c$k" "$(hcontainer_ip 2 "d$k" "n$k")"
    fdb="$(sc_in_ovl 1 "$reused" bridge fdb show dev "ro-vx-$reused")"
    assert_empty "host 1: ro-vx-$reused has no entry of m2's old peer b2 ($old_mac_b2)" \
        "$(printf '%s\n' "$fdb" | grep -i "^$old_mac_b2 " || true)"
    assert_eq "host 1: ro-vx-$reused has exactly one peer (d$k)" 1 "$(printf '%s\n' "$fdb" | grep -c ' dst ' || true)"
fi

phase "remove everything; nothing is left"
t0=$SECONDS
for h in 1 2; do sc_rm_all "$h"; done
for h in 1 2; do
    nets="$(hdocker "$h" network ls -q --filter driver=rustoverlay)"
    # shellcheck disable=SC2086 # one id per word
    assert_ok "host $h: network rm of its $(grep -c . <<<"$nets") rustoverlay networks" hdocker "$h" network rm $nets
done
echo "removal: $((SECONDS - t0))s"
for h in 1 2; do sc_assert_host_clean "$h"; done
assert_store_empty etcd
assert_empty "no VNI claim left" "$(claims)"
echo "total time: $((SECONDS - SC_T_START))s"
harness_summary
