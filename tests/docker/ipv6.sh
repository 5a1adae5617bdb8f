#!/usr/bin/env bash
# IPv6 end to end on three simulated hosts sharing one etcd: the same
# `docker network create --ipv6 --subnet 10.79.0.0/24 --subnet fd00:77::/64`
# on every host is one overlay; every container gets a distinct address in
# fd00:77::/64; ping6 works across hosts, both ways, full-size too; neighbour
# discovery is answered by the plugin's entries with no flooding: the VXLAN
# device has proxy on and learning off, its FDB has no all-zeros (default
# destination) or multicast entry, only one permanent entry per remote MAC,
# its neighbour table holds a PERMANENT entry for every remote IPv6 address
# (and IPv4) with the remote container's MAC, the containers resolved each
# other's v6 address to the right MAC, and solicitations for an unknown
# address reach no other host. A removed container's v6 neighbour entry goes
# from the other hosts. `--ipv6 --subnet` without an IPv4 --subnet (Docker
# then picks the IPv4 pool per host) is refused on the second host, naming
# the shared subnet, instead of becoming a second overlay over the same IPv6
# pool. Nothing is left after removal.
set -euo pipefail
cd "$(dirname "$0")/../.."
# shellcheck source=tests/lib/harness.sh
source tests/lib/harness.sh
harness_init ipv6
# shellcheck source=tests/lib/scenarios.sh
source tests/lib/scenarios.sh

HOSTS=(1 2 3)
NET=v6net
SUBNET4=10.79.0.0/24
SUBNET6=fd00:77::/64
UNUSED6=fd00:77::dead:beef
mtu_expected=$((HARNESS_UL_MTU - 50))

# v6_in_subnet ADDR - ADDR is in fd00:77::/64 (prefix test on the text form).
v6_in_subnet() { [[ "$1" == fd00:77::* ]]; }

# vx_rx N VNI - packets received by host N's VXLAN device.
vx_rx() {
    sc_in_ovl "$1" "$2" ip -s link show "ro-vx-$2" | awk '/RX:/ { getline; print $2; exit }'
}

# has_fdb_to FDB MAC VTEP - exactly one permanent entry MAC -> VTEP in FDB
# (`bridge fdb show` output).
has_fdb_to() {
    printf '%s\n' "$1" | awk -v m="$2" -v d="dst $3 " \
        'tolower($1) == m && index($0, d) && /permanent/ { n++ } END { exit n != 1 }'
}

# has_neigh NEIGH IP MAC [STATE] - `ip neigh show dev X` output NEIGH has IP
# -> MAC (in STATE if given).
has_neigh() {
    printf '%s\n' "$1" | awk -v ip="$2" -v m="$3" -v st="${4:-}" '
        $1 == ip { for (i = 2; i < NF; i++) if ($i == "lladdr" && tolower($(i + 1)) == m && (st == "" || index($0, st))) f = 1 }
        END { exit !f }'
}

phase "boot: etcd and three hosts"
sc_boot_etcd_hosts "${HOSTS[@]}"

phase "one dual-stack network on three hosts, one container each"
for h in "${HOSTS[@]}"; do
    assert_ok "host $h: network create --ipv6 --subnet $SUBNET4 --subnet $SUBNET6 $NET" \
        sc_net_create "$h" "$NET" --ipv6 --subnet "$SUBNET4" --subnet "$SUBNET6"
done
harness_stop_if_failed "network creation failed"
for h in "${HOSTS[@]}"; do
    assert_eq "host $h: Docker says $NET has IPv6 enabled" true \
        "$(hdocker "$h" network inspect -f '{{.EnableIPv6}}' "$NET")"
done
declare -A IP4 IP6 MAC
for h in "${HOSTS[@]}"; do
    assert_ok "host $h: run c$h on $NET" sc_run "$h" "c$h" "$NET"
done
harness_stop_if_failed "containers did not start"
for h in "${HOSTS[@]}"; do
    IP4[$h]="$(hcontainer_ip "$h" "c$h" "$NET")"
    IP6[$h]="$(sc_ip6 "$h" "c$h" "$NET")"
    MAC[$h]="$(sc_mac "$h" "c$h" "$NET")"
    assert_ok "c$h has an IPv6 address in $SUBNET6 (${IP6[$h]:-none})" v6_in_subnet "${IP6[$h]}"
    assert_ok "c$h has an IPv4 address in $SUBNET4 (${IP4[$h]:-none})" test "${IP4[$h]%.*}" = 10.79.0
    assert_contains "c$h's eth0 carries ${IP6[$h]}/64 in the kernel" "${IP6[$h]}/64" \
        "$(hdocker "$h" exec "c$h" ip -6 addr show dev eth0 2>&1)"
done
assert_eq "three distinct IPv6 addresses" 3 "$(printf '%s\n' "${IP6[@]}" | sort -u | grep -c .)"
VNI="$(sc_vni_of_subnet etcd "$SUBNET6")"
assert_ok "the store has one overlay for both subnets, VNI ${VNI:-none}" test "${VNI:-0}" -ge 256
assert_eq "the IPv4 subnet names the same overlay" "$VNI" "$(sc_vni_of_subnet etcd "$SUBNET4")"
harness_stop_if_failed "no addresses or no VNI"

phase "ping6 across hosts, both ways"
t0=$SECONDS
for s in "${HOSTS[@]}"; do
    for d in "${HOSTS[@]}"; do
        [[ "$s" != "$d" ]] || continue
        assert_eventually "c$s (h$s) ping6 c$d (h$d, ${IP6[$d]})" 15 sc_ping6 "$s" "c$s" "${IP6[$d]}"
    done
done
echo "6 pairs answered within $((SECONDS - t0))s"
# 1402 bytes of ICMPv6 data + 8 ICMPv6 + 40 IPv6 = 1450 = the container MTU.
assert_eq "c1's eth0 MTU is $mtu_expected" "$mtu_expected" "$(hdocker 1 exec c1 cat /sys/class/net/eth0/mtu)"
assert_ok "full-size IPv6 packet: c1 ping6 -s 1402 c2" hdocker 1 exec c1 ping6 -c 1 -W 2 -s 1402 "${IP6[2]}"
assert_ok "full-size IPv6 packet: c3 ping6 -s 1402 c1" hdocker 3 exec c3 ping6 -c 1 -W 2 -s 1402 "${IP6[1]}"
assert_ok "IPv4 still works on the same network: c2 ping c3" sc_ping 2 c2 "${IP4[3]}"

phase "neighbour discovery: answered by the plugin's entries, nothing flooded"
for h in "${HOSTS[@]}"; do
    details="$(sc_in_ovl "$h" "$VNI" ip -d link show "ro-vx-$VNI")"
    assert_contains "host $h: ro-vx-$VNI has proxy on (ARP and ND answered from its neighbour table)" " proxy " "$details "
    assert_contains "host $h: ro-vx-$VNI has learning off" "nolearning" "$details"
    fdb="$(sc_in_ovl "$h" "$VNI" bridge fdb show dev "ro-vx-$VNI")"
    assert_empty "host $h: no all-zeros (default destination) FDB entry on ro-vx-$VNI" \
        "$(printf '%s\n' "$fdb" | grep -i '^00:00:00:00:00:00' || true)"
    assert_empty "host $h: no broadcast/multicast FDB entry on ro-vx-$VNI" \
        "$(printf '%s\n' "$fdb" | awk '{ b = substr($1, 2, 1) } $1 ~ /^..:/ && index("13579bdfBDF", b) && / dst /' || true)"
    neigh6="$(sc_in_ovl "$h" "$VNI" ip -6 neigh show dev "ro-vx-$VNI")"
    neigh4="$(sc_in_ovl "$h" "$VNI" ip -4 neigh show dev "ro-vx-$VNI")"
    for r in "${HOSTS[@]}"; do
        [[ "$r" != "$h" ]] || continue
        assert_ok "host $h: one permanent FDB entry ${MAC[$r]} -> host $r's VTEP" \
            has_fdb_to "$fdb" "${MAC[$r]}" "$(harness_host_ip "$r")"
        assert_ok "host $h: PERMANENT neighbour ${IP6[$r]} -> ${MAC[$r]} (c$r) on ro-vx-$VNI" \
            has_neigh "$neigh6" "${IP6[$r]}" "${MAC[$r]}" PERMANENT
        assert_ok "host $h: PERMANENT neighbour ${IP4[$r]} -> ${MAC[$r]} (c$r) on ro-vx-$VNI" \
            has_neigh "$neigh4" "${IP4[$r]}" "${MAC[$r]}" PERMANENT
    done
    assert_empty "host $h: no neighbour entry on ro-vx-$VNI for its own container" \
        "$(printf '%s\n%s\n' "$neigh6" "$neigh4" | awk -v a="${IP6[$h]}" -v b="${IP4[$h]}" '$1 == a || $1 == b')"
done
# The containers' own neighbour caches: the solicitation for each remote v6
# address was answered with the remote container's MAC.
for s in "${HOSTS[@]}"; do
    cn="$(hdocker "$s" exec "c$s" ip -6 neigh show dev eth0 2>&1)"
    for d in "${HOSTS[@]}"; do
        [[ "$s" != "$d" ]] || continue
        if ! has_neigh "$cn" "${IP6[$d]}" "${MAC[$d]}"; then
            printf '%s\n' "c$s's neighbours:" "$cn"
        fi
        assert_ok "c$s resolved ${IP6[$d]} to ${MAC[$d]} (c$d's MAC)" has_neigh "$cn" "${IP6[$d]}" "${MAC[$d]}"
    done
done
# Solicitations for an address nobody has: answered by nobody, sent nowhere.
# (Multicast NS is consumed by the proxy; without a default destination no
# frame can be flooded to another host.)
rx2="$(vx_rx 2 "$VNI")"
rx3="$(vx_rx 3 "$VNI")"
assert_fails "c1 ping6 $UNUSED6 (in the subnet, no container) gets no answer" \
    hdocker 1 exec c1 ping6 -c 3 -i 0.3 -W 1 "$UNUSED6"
assert_ok "c1 has no MAC for $UNUSED6" \
    eval "! hdocker 1 exec c1 ip -6 neigh show $UNUSED6 | grep -q lladdr"
rx2b="$(vx_rx 2 "$VNI")"
rx3b="$(vx_rx 3 "$VNI")"
echo "ro-vx-$VNI rx packets: host 2 $rx2 -> $rx2b, host 3 $rx3 -> $rx3b"
assert_ok "the VXLAN devices' rx counters are read ($rx2, $rx3)" test "${rx2:-x}${rx3:-x}" -ge 0
assert_eq "host 2's ro-vx-$VNI received nothing meanwhile (no flooded solicitation)" "$rx2" "$rx2b"
assert_eq "host 3's ro-vx-$VNI received nothing meanwhile (no flooded solicitation)" "$rx3" "$rx3b"

phase "a removed container's IPv6 entries leave the other hosts"
assert_ok "host 3: docker rm -f c3" hdocker 3 rm -f c3
for h in 1 2; do
    assert_eventually "host $h: neighbour ${IP6[3]} gone from ro-vx-$VNI" 5 \
        eval "! sc_in_ovl $h $VNI ip -6 neigh show dev ro-vx-$VNI | grep -q '^${IP6[3]} '"
    assert_eventually "host $h: FDB entry ${MAC[3]} gone from ro-vx-$VNI" 5 \
        eval "! sc_in_ovl $h $VNI bridge fdb show dev ro-vx-$VNI | grep -qi '^${MAC[3]} '"
done
assert_ok "host 3: a new container c3n on $NET" sc_run 3 c3n "$NET"
ip6n="$(sc_ip6 3 c3n "$NET")"
assert_ok "c3n has an IPv6 address in $SUBNET6 ($ip6n)" v6_in_subnet "$ip6n"
assert_eventually "c1 (h1) ping6 c3n (h3, $ip6n)" 15 sc_ping6 1 c1 "$ip6n"
assert_eventually "c3n (h3) ping6 c2 (h2)" 15 sc_ping6 3 c3n "${IP6[2]}"
FIXED6=fd00:77::1:100
assert_ok "host 2: docker run --ip6 $FIXED6" sc_run 2 c2f "$NET" --ip6 "$FIXED6"
assert_eq "c2f has $FIXED6" "$FIXED6" "$(sc_ip6 2 c2f "$NET")"
assert_eventually "c1 (h1) ping6 c2f (h2, $FIXED6)" 15 sc_ping6 1 c1 "$FIXED6"
out="$(sc_run 1 c1f "$NET" --ip6 "$FIXED6" 2>&1)" && rc=0 || rc=$?
assert_ok "host 1: docker run --ip6 $FIXED6 (taken on host 2) is refused" test "$rc" -ne 0
hdocker 1 rm -f c1f >/dev/null 2>&1 || true

phase "--ipv6 --subnet without an IPv4 --subnet: refused on the second host, not split in two"
# Docker picks the IPv4 pool of such a network on each host by itself: the
# hosts' networks cannot be one overlay. The second host must be refused (not
# get an overlay of its own over the shared IPv6 pool, where ping6 across
# hosts fails silently).
assert_ok "host 1: network create --ipv6 --subnet fd00:78::/64 v6only" sc_net_create 1 v6only --ipv6 --subnet fd00:78::/64
out="$(sc_net_create 2 v6only --ipv6 --subnet fd00:78::/64 2>&1)" && rc=0 || rc=$?
assert_ok "host 2: the same command is refused" test "$rc" -ne 0
assert_contains "the refusal names the shared IPv6 subnet" "subnet fd00:78::/64 already belongs to a rustoverlay network" "$out"
assert_contains "and asks for an IPv4 --subnet" "an IPv4 --subnet included" "$out"
assert_ok "host 1: network rm v6only" hdocker 1 network rm v6only
hdocker 2 network rm v6only >/dev/null 2>&1 || true

phase "remove everything; nothing is left"
for h in "${HOSTS[@]}"; do sc_rm_all "$h"; done
for h in "${HOSTS[@]}"; do
    assert_ok "host $h: network rm $NET" hdocker "$h" network rm "$NET"
done
for h in "${HOSTS[@]}"; do sc_assert_host_clean "$h"; done
assert_store_empty etcd
echo "total time: $((SECONDS - SC_T_START))s"
harness_summary
