#!/usr/bin/env bash
# docker network connect / disconnect on two simulated hosts sharing one
# etcd. A running container on rustoverlay network A is connected to a second
# rustoverlay network B (and with --ip to a fixed address): it is on both at
# once, talks to containers on both networks on the other host, the host gets
# B's overlay namespace; `docker restart` keeps both. Disconnected from B it
# loses B's interface and address (the store's endpoint and address go, the
# other host drops its entries, the host removes B's namespace), A keeps
# working. A container on a rustoverlay network and a Docker bridge network at
# once (connected either way round) reaches both; disconnecting the overlay
# leaves the bridge working. Nothing is left after removal.
set -euo pipefail
cd "$(dirname "$0")/../.."
# shellcheck source=tests/lib/harness.sh
source tests/lib/harness.sh
harness_init connect
# shellcheck source=tests/lib/scenarios.sh
source tests/lib/scenarios.sh

A=neta
A_SUB=10.81.0.0/24
B=netb
B_SUB=10.82.0.0/24
B_FIXED=10.82.0.77
BR=brnet
BR_SUB=172.30.0.0/24

# nets N CONTAINER - the Docker networks the container is on, sorted, one
# line (docker_gwbridge, Docker's egress for overlay-like drivers, left out).
nets() {
    hdocker "$1" inspect -f '{{range $k, $v := .NetworkSettings.Networks}}{{$k}}{{"\n"}}{{end}}' "$2" |
        grep -v '^docker_gwbridge$' | grep . | sort | tr '\n' ' ' | sed 's/ $//'
}

# kaddrs N CONTAINER PREFIX - the container's kernel IPv4 addresses that
# start with PREFIX (e.g. "10.81.0."), one line.
kaddrs() {
    hdocker "$1" exec "$2" ip -o -4 addr show | awk '{ sub(/\/.*/, "", $4); print $4 }' |
        grep -F "$3" | sort | tr '\n' ' ' | sed 's/ $//' || true
}

# store_has_addr IP - the shared store holds an address key for IP.
store_has_addr() { harness_store_dump etcd | awk '{ print $1 }' | grep -q "/addr/$1\$"; }

# store_ep_count - endpoint records in the shared store.
store_ep_count() { harness_store_dump etcd | awk '{ print $1 }' | grep -c '/overlay/[^/]*/ep/' || true; }

# peer_entries N VNI IP - host N's neighbour entry for IP on ro-vx-VNI (empty
# when there is none or no namespace).
peer_entries() {
    sc_has_ovl_ns "$1" "$2" 2>/dev/null || return 0
    sc_in_ovl "$1" "$2" ip neigh show dev "ro-vx-$2" 2>/dev/null | awk -v ip="$3" '$1 == ip' || true
}

phase "boot: etcd and two hosts"
sc_boot_etcd_hosts 1 2
for h in 1 2; do
    assert_ok "host $h: create $A ($A_SUB)" sc_net_create "$h" "$A" --subnet "$A_SUB"
    assert_ok "host $h: create $B ($B_SUB)" sc_net_create "$h" "$B" --subnet "$B_SUB"
done
assert_ok "host 2: run a2 on $A" sc_run 2 a2 "$A"
assert_ok "host 2: run b2 on $B" sc_run 2 b2 "$B"
assert_ok "host 1: run c1 on $A" sc_run 1 c1 "$A"
harness_stop_if_failed "setup failed"
a2="$(hcontainer_ip 2 a2 "$A")"
b2="$(hcontainer_ip 2 b2 "$B")"
c1a="$(hcontainer_ip 1 c1 "$A")"
assert_eventually "c1 (h1, $A) pings a2 (h2, $a2)" 15 sc_ping 1 c1 "$a2"
assert_fails "c1, not on $B yet, does not reach b2 ($b2)" sc_ping 1 c1 "$b2"
VNI_A="$(sc_vni_of_subnet etcd "$A_SUB")"
VNI_B="$(sc_vni_of_subnet etcd "$B_SUB")"
assert_ok "$A and $B have distinct VNIs ($VNI_A, $VNI_B)" test "${VNI_A:-0}" -ge 256 -a "${VNI_B:-0}" -ge 256 -a "$VNI_A" != "$VNI_B"
assert_fails "host 1 has no namespace for $B yet" sc_has_ovl_ns 1 "$VNI_B"
eps_before="$(store_ep_count)"

phase "docker network connect $B c1: on two rustoverlay networks at once"
assert_ok "host 1: docker network connect $B c1" hdocker 1 network connect "$B" c1
c1b="$(hcontainer_ip 1 c1 "$B")"
assert_ok "c1 got an address in $B_SUB ($c1b)" test "${c1b%.*}" = 10.82.0
assert_eq "Docker shows c1 on $A and $B" "$A $B" "$(nets 1 c1)"
assert_eq "c1's kernel has its $A address" "$c1a" "$(kaddrs 1 c1 10.81.0.)"
assert_eq "c1's kernel has its $B address" "$c1b" "$(kaddrs 1 c1 10.82.0.)"
assert_eq "the store has one endpoint more" $((eps_before + 1)) "$(store_ep_count)"
assert_ok "host 1 now has $B's namespace ro-$VNI_B" sc_has_ovl_ns 1 "$VNI_B"
assert_eventually "c1 (h1) pings b2 (h2, $B)" 15 sc_ping 1 c1 "$b2"
assert_eventually "b2 (h2) pings c1 on $B ($c1b)" 15 sc_ping 2 b2 "$c1b"
assert_ok "c1 (h1) still pings a2 (h2, $A)" sc_ping 1 c1 "$a2"
assert_ok "a2 (h2) pings c1 on $A ($c1a)" sc_ping 2 a2 "$c1a"
assert_fails "the networks stay apart: a2 ($A) does not reach c1's $B address" sc_ping 2 a2 "$c1b"

phase "docker restart c1: both networks come back"
assert_ok "host 1: docker restart c1" hdocker 1 restart -t 1 c1
# Docker asks for new addresses at every start (no --ip): they may change.
c1a="$(hcontainer_ip 1 c1 "$A")"
c1b="$(hcontainer_ip 1 c1 "$B")"
assert_eq "Docker shows c1 on $A and $B after the restart" "$A $B" "$(nets 1 c1)"
assert_eq "c1's kernel has its $A address ($c1a)" "$c1a" "$(kaddrs 1 c1 10.81.0.)"
assert_eq "c1's kernel has its $B address ($c1b)" "$c1b" "$(kaddrs 1 c1 10.82.0.)"
assert_eq "the store still has exactly one endpoint more than before the connect" $((eps_before + 1)) "$(store_ep_count)"
assert_eventually "after the restart: c1 pings a2 ($A)" 15 sc_ping 1 c1 "$a2"
assert_eventually "after the restart: c1 pings b2 ($B)" 15 sc_ping 1 c1 "$b2"

phase "docker network disconnect $B c1"
assert_eventually "host 2 has a neighbour entry for c1's $B address before" 10 \
    test -n "$(peer_entries 2 "$VNI_B" "$c1b")"
assert_ok "host 1: docker network disconnect $B c1" hdocker 1 network disconnect "$B" c1
assert_eq "Docker shows c1 on $A only" "$A" "$(nets 1 c1)"
assert_empty "c1's kernel has no $B address left" "$(kaddrs 1 c1 10.82.0.)"
assert_eq "the store has the endpoint count of before the connect" "$eps_before" "$(store_ep_count)"
assert_fails "the store no longer holds c1's $B address $c1b" store_has_addr "$c1b"
assert_eventually "host 2 dropped its neighbour entry for $c1b" 5 test -z "$(peer_entries 2 "$VNI_B" "$c1b")"
assert_eventually "host 1 removed $B's namespace with its last local endpoint" 10 eval "! sc_has_ovl_ns 1 $VNI_B"
assert_ok "c1 still pings a2 ($A)" sc_ping 1 c1 "$a2"
assert_fails "c1 no longer reaches b2 ($B)" sc_ping 1 c1 "$b2"

phase "docker network connect --ip $B_FIXED $B c1"
assert_ok "host 1: docker network connect --ip $B_FIXED $B c1" hdocker 1 network connect --ip "$B_FIXED" "$B" c1
assert_eq "c1's $B address is $B_FIXED" "$B_FIXED" "$(hcontainer_ip 1 c1 "$B")"
assert_contains "c1's kernel has $B_FIXED" "$B_FIXED/24" "$(hdocker 1 exec c1 ip -4 addr show 2>&1)"
assert_ok "the store holds $B_FIXED" store_has_addr "$B_FIXED"
assert_eventually "b2 (h2) pings c1 at $B_FIXED" 15 sc_ping 2 b2 "$B_FIXED"
assert_ok "host 1: disconnect $B c1 again" hdocker 1 network disconnect "$B" c1
assert_fails "the store no longer holds $B_FIXED" store_has_addr "$B_FIXED"

phase "a container on a rustoverlay network and a bridge network"
assert_ok "host 1: create bridge network $BR ($BR_SUB)" hdocker 1 network create --subnet "$BR_SUB" "$BR"
assert_ok "host 1: run d1 on $BR" sc_run 1 d1 "$BR"
d1="$(hcontainer_ip 1 d1 "$BR")"
# rustoverlay first, bridge connected afterwards
assert_ok "host 1: docker network connect $BR c1" hdocker 1 network connect "$BR" c1
c1br="$(hcontainer_ip 1 c1 "$BR")"
assert_ok "c1 got a $BR address ($c1br)" test "${c1br%.*}" = 172.30.0
assert_ok "c1 pings d1 over $BR ($d1)" sc_ping 1 c1 "$d1"
assert_ok "c1 pings a2 over $A across hosts ($a2)" sc_ping 1 c1 "$a2"
assert_ok "a2 (h2) pings c1 over $A ($c1a)" sc_ping 2 a2 "$c1a"
# bridge first, rustoverlay connected afterwards
assert_ok "host 1: docker network connect $A d1" hdocker 1 network connect "$A" d1
d1a="$(hcontainer_ip 1 d1 "$A")"
assert_ok "d1 got an $A address ($d1a)" test "${d1a%.*}" = 10.81.0
assert_eventually "d1 pings a2 over $A across hosts" 15 sc_ping 1 d1 "$a2"
assert_eventually "a2 (h2) pings d1 over $A ($d1a)" 15 sc_ping 2 a2 "$d1a"
assert_ok "d1 still pings c1 over $BR" sc_ping 1 d1 "$c1br"
assert_ok "host 1: docker network disconnect $A d1" hdocker 1 network disconnect "$A" d1
assert_fails "the store no longer holds d1's $A address $d1a" store_has_addr "$d1a"
assert_ok "d1 still pings c1 over $BR" sc_ping 1 d1 "$c1br"
assert_ok "host 1: docker network disconnect $A c1 (c1 keeps only $BR)" hdocker 1 network disconnect "$A" c1
assert_eq "Docker shows c1 on $BR only" "$BR" "$(nets 1 c1)"
assert_empty "c1's kernel has no $A address left" "$(kaddrs 1 c1 10.81.0.)"
assert_ok "c1 still pings d1 over $BR" sc_ping 1 c1 "$d1"
assert_eventually "host 1 removed $A's namespace with its last local endpoint" 10 eval "! sc_has_ovl_ns 1 $VNI_A"
assert_fails "a2 (h2) no longer reaches c1's former $A address" sc_ping 2 a2 "$c1a"

phase "remove everything; nothing is left"
for h in 1 2; do sc_rm_all "$h"; done
assert_ok "host 1: network rm $BR" hdocker 1 network rm "$BR"
for h in 1 2; do
    assert_ok "host $h: network rm $A $B" hdocker "$h" network rm "$A" "$B"
done
for h in 1 2; do sc_assert_host_clean "$h"; done
assert_store_empty etcd
for h in 1 2; do
    assert_empty "host $h: no ERROR in the plugin log" "$(sc_plugin_errors "$h")"
done
echo "total time: $((SECONDS - SC_T_START))s"
harness_summary
