#!/usr/bin/env bash
# Docker end-to-end on one simulated host: rustoverlay networks with Docker's
# CLI, isolation between networks, egress through docker_gwbridge, --internal,
# MTU, the IPAM guard, and that removing everything leaves nothing behind.
set -euo pipefail
cd "$(dirname "$0")/../.."
# shellcheck source=tests/lib/harness.sh
source tests/lib/harness.sh

harness_init single_host
harness_start_host 1
harness_busybox_image 1

world="$HARNESS_WORLD_IP"
img="$HARNESS_IMAGE"

# --- networks ---------------------------------------------------------------
assert_ok "create net_a (10.77.0.0/24)" \
    hdocker 1 network create -d rustoverlay --ipam-driver rustoverlay --subnet 10.77.0.0/24 net_a
assert_ok "create net_b (10.78.0.0/24)" \
    hdocker 1 network create -d rustoverlay --ipam-driver rustoverlay --subnet 10.78.0.0/24 net_b
assert_ok "create net_int (--internal, 10.79.0.0/24)" \
    hdocker 1 network create -d rustoverlay --ipam-driver rustoverlay --internal --subnet 10.79.0.0/24 net_int
harness_stop_if_failed "network creation failed"

# Docker's default IPAM cannot work for a multi-host overlay: the plugin must
# refuse it and tell the user what to do.
rc=0
out="$(hdocker 1 network create -d rustoverlay net_bad 2>&1)" || rc=$?
if [[ "$rc" -eq 0 ]]; then
    harness_fail "network with Docker's default IPAM is refused (it was created)"
    hdocker 1 network rm net_bad >/dev/null 2>&1 || true
else
    assert_contains "default-IPAM refusal tells the user to use --ipam-driver rustoverlay" \
        "--ipam-driver rustoverlay" "$out"
fi

# A driver option the plugin does not act on is refused, never ignored:
# `-o encrypted=true` taken in silence would carry the traffic in clear.
for opt in encrypted=true vxlan_id=42; do
    rc=0
    out="$(hdocker 1 network create -d rustoverlay --ipam-driver rustoverlay -o "$opt" \
        --subnet 10.80.0.0/24 net_opt 2>&1)" || rc=$?
    if [[ "$rc" -eq 0 ]]; then
        harness_fail "-o $opt is refused (the network was created)"
        hdocker 1 network rm net_opt >/dev/null 2>&1 || true
    elif [[ "$opt" == encrypted=* ]]; then
        assert_contains "-o $opt refused: the traffic would be unencrypted" "unencrypted" "$out"
    else
        assert_contains "-o $opt refused as an unknown driver option" "unknown driver option -o ${opt%%=*}" "$out"
    fi
done
assert_ok "the refused networks' pool was given back: 10.80.0.0/24 is free again" \
    hdocker 1 network create -d rustoverlay --ipam-driver rustoverlay --subnet 10.80.0.0/24 net_opt
assert_ok "remove net_opt" hdocker 1 network rm net_opt

# --- containers -------------------------------------------------------------
assert_ok "run a1 on net_a" hdocker 1 run -d --network net_a --name a1 "$img" sleep 3600
assert_ok "run a2 on net_a" hdocker 1 run -d --network net_a --name a2 "$img" sleep 3600
assert_ok "run b1 on net_b" hdocker 1 run -d --network net_b --name b1 "$img" sleep 3600
assert_ok "run i1 on net_int" hdocker 1 run -d --network net_int --name i1 "$img" sleep 3600
harness_stop_if_failed "containers did not start"

a1="$(hcontainer_ip 1 a1 net_a)"
a2="$(hcontainer_ip 1 a2 net_a)"
b1="$(hcontainer_ip 1 b1 net_b)"
i1="$(hcontainer_ip 1 i1 net_int)"
assert_ok "a1 has an address in 10.77.0.0/24 ($a1)" test "${a1%.*}" = 10.77.0
assert_ok "a2 has an address in 10.77.0.0/24 ($a2)" test "${a2%.*}" = 10.77.0
assert_ok "b1 has an address in 10.78.0.0/24 ($b1)" test "${b1%.*}" = 10.78.0
assert_ok "i1 has an address in 10.79.0.0/24 ($i1)" test "${i1%.*}" = 10.79.0
assert_ok "a1 and a2 have different addresses" test "$a1" != "$a2"

# --- data plane -------------------------------------------------------------
assert_eventually "a1 pings a2 on net_a" 10 hdocker 1 exec a1 ping -c 1 -W 1 "$a2"
assert_eventually "a2 pings a1 on net_a" 10 hdocker 1 exec a2 ping -c 1 -W 1 "$a1"
assert_fails "a1 cannot ping b1 (other network)" hdocker 1 exec a1 ping -c 2 -W 1 "$b1"
assert_fails "b1 cannot ping a1 (other network)" hdocker 1 exec b1 ping -c 2 -W 1 "$a1"
assert_eventually "a1 pings the world (egress via docker_gwbridge)" 10 hdocker 1 exec a1 ping -c 1 -W 1 "$world"
assert_eventually "b1 pings the world (egress via docker_gwbridge)" 10 hdocker 1 exec b1 ping -c 1 -W 1 "$world"
assert_fails "i1 (--internal) cannot reach the world" hdocker 1 exec i1 ping -c 2 -W 1 "$world"

mtu_expected=$((HARNESS_UL_MTU - 50))
assert_eq "a1 eth0 MTU is underlay MTU - 50" "$mtu_expected" \
    "$(hdocker 1 exec a1 cat /sys/class/net/eth0/mtu 2>&1)"
assert_eq "i1 eth0 MTU is underlay MTU - 50" "$mtu_expected" \
    "$(hdocker 1 exec i1 cat /sys/class/net/eth0/mtu 2>&1)"
assert_contains "a1's net_a address is on eth0" "inet $a1/24" \
    "$(hdocker 1 exec a1 ip -o -4 addr show dev eth0 2>&1)"

# --- teardown ---------------------------------------------------------------
assert_ok "remove the containers" hdocker 1 rm -f a1 a2 b1 i1
assert_ok "remove the networks" hdocker 1 network rm net_a net_b net_int
assert_empty "no rustoverlay network left in Docker" \
    "$(hdocker 1 network ls -q --filter driver=rustoverlay)"

ro_links="$(hexec 1 ip -o link | awk -F': ' '{ sub(/@.*/, "", $2); print $2 }' | grep '^ro-' || true)"
assert_empty "no ro-* link left in the host namespace" "$ro_links"
# The plugin keeps one namespace per overlay under its --state-dir
# (/run/rustoverlay, private to this host's mount namespace).
assert_empty "no overlay namespace left under /run/rustoverlay/netns" \
    "$(hexec_mnt 1 sh -c 'ls -A /run/rustoverlay/netns 2>/dev/null' || true)"
assert_ok "the plugin is still running" harness_plugin_pid 1
assert_store_empty 1

harness_summary
