#!/usr/bin/env bash
# Networks defined once (issue 11): three hosts on one etcd, each dockerd
# with "dns": ["169.254.53.53"], hosts 1 and 2 also with the plugin as their
# authorization hook. A network created with -o cluster=true on host 1
# appears on hosts 2 and 3 within 5 s (time printed) with the same subnet,
# range, gateway, options and labels, and carries traffic (and names)
# between them. Its removal on host 2 is refused, naming host 3, while host
# 3 has a container on it. Without the hook (host 3), Docker removes its
# copy anyway, and host 3's plugin creates it again and says why. Once no
# host has a container on it, a removal on host 2 removes it from every host
# and from the store. A name held by another local network is logged and
# skipped; a network without the option stays on its host; a plugin that
# was down when a network was defined creates it when it comes back; after
# a store outage, definitions are followed again.
set -euo pipefail
cd "$(dirname "$0")/../.."
# shellcheck source=tests/lib/harness.sh
source tests/lib/harness.sh
harness_init cluster
# shellcheck source=tests/lib/scenarios.sh
source tests/lib/scenarios.sh

NET=shared
SUB=10.86.0.0/24
RANGE=10.86.0.128/25
GW=10.86.0.1
DNS=169.254.53.53

# has_net N NAME - host N's dockerd has a network called NAME.
has_net() { [[ "$(hdocker "$1" network ls --filter "name=^$2\$" -q 2>/dev/null)" != "" ]]; }
lacks_net() { ! has_net "$@"; }

# net_shape N NAME - what must be equal on every host: driver, IPAM config,
# driver options, labels.
net_shape() {
    hdocker "$1" network inspect -f \
        '{{.Driver}} {{.IPAM.Driver}} {{json .IPAM.Config}} {{json .Options}} {{json .Labels}}' "$2"
}

# cluster_keys - the definitions in the store.
cluster_keys() { hetcdctl get --prefix --keys-only /rustoverlay/v1/cluster/ | grep . || true; }
no_definitions() { [[ -z "$(cluster_keys)" ]]; }

phase "boot: etcd, three hosts with dockerd --dns $DNS"
harness_start_etcd
for h in 1 2 3; do
    members="\"dns\": [\"$DNS\"]"
    ((h == 3)) || members+=", \"authorization-plugins\": [\"rustoverlay\"]"
    sc_dockerd_config "$h" "$members"
    harness_start_host "$h" --store "$(harness_etcd_url)"
    harness_busybox_image "$h"
done
for h in 1 2; do
    assert_contains "host $h: dockerd asks the plugin to authorize" rustoverlay \
        "$(hdocker "$h" info -f '{{json .Plugins.Authorization}}')"
done
harness_stop_if_failed

phase "created once on host 1 with -o cluster=true: on hosts 2 and 3 within 5 s, the same"
assert_ok "host 1: create $NET -o cluster=true" sc_net_create 1 "$NET" --subnet "$SUB" \
    --ip-range "$RANGE" --gateway "$GW" -o cluster=true --label team=blue
for h in 2 3; do
    if ms="$(sc_wait_ms 5 has_net "$h" "$NET")"; then
        harness_pass "host $h has $NET"
        printf 'figure: %s on host %s %s ms after docker network create returned on host 1\n' "$NET" "$h" "$ms"
    else
        harness_fail "host $h does not have $NET within 5 s"
    fi
done
SHAPE="$(net_shape 1 "$NET")"
printf '       | host 1: %s\n' "$SHAPE"
assert_contains "host 1: the definition has the range" "$RANGE" "$SHAPE"
for h in 2 3; do
    assert_eq "host $h: same driver, subnet, range, gateway, options, labels" "$SHAPE" "$(net_shape "$h" "$NET" 2>&1)"
done

phase "it carries traffic, and names, between hosts 2 and 3"
assert_ok "host 2: c2 on $NET" sc_run 2 c2 "$NET"
assert_ok "host 3: c3 on $NET" sc_run 3 c3 "$NET"
C3_IP="$(hcontainer_ip 3 c3 "$NET")"
assert_contains "host 3: c3's address is from the range" "10.86.0." "$C3_IP"
assert_eventually "host 2: c2 pings c3 ($C3_IP)" 10 sc_ping 2 c2 "$C3_IP"
assert_eventually "host 2: c2 pings c3 by name" 10 hdocker 2 exec c2 ping -c 1 -W 2 c3

phase "its removal on host 2 is refused while host 3 has a container on it"
assert_ok "host 2: docker rm -f c2" hdocker 2 rm -f c2
if out="$(hdocker 2 network rm "$NET" 2>&1)"; then
    harness_fail "host 2: docker network rm $NET succeeded while host 3 uses it"
else
    assert_contains "host 2: refused, naming host 3" "containers on host h3 use it" "$out"
    printf '       | %s\n' "$out"
fi
for h in 1 2 3; do
    assert_ok "host $h: still has $NET" has_net "$h" "$NET"
done
assert_ok "host 2: c2 again on $NET" sc_run 2 c2b "$NET"
assert_eventually "host 2: c2b pings c3" 10 sc_ping 2 c2b "$C3_IP"

phase "without the authorization hook (host 3), a removal while host 2 uses it: host 3's copy comes back"
assert_ok "host 3: docker rm -f c3" hdocker 3 rm -f c3
# Docker lets a network driver report an error on removal but never honours
# it, so this succeeds; host 3's plugin then creates its copy again.
assert_ok "host 3: docker network rm $NET (no hook: Docker goes ahead)" hdocker 3 network rm "$NET"
assert_eventually "host 3: $NET is back within 5 s" 5 has_net 3 "$NET"
assert_ok "host 1: still has $NET" has_net 1 "$NET"
assert_contains "host 3's plugin says which hosts use it" "hosts=h2" \
    "$(plugin_log_since_start 3 | grep 'created here again' || true)"
assert_eq "the definition stays in the store" "/rustoverlay/v1/cluster/10.86.0.0_24" "$(cluster_keys)"
assert_ok "host 3: c3 again on $NET" sc_run 3 c3 "$NET"
C3_IP="$(hcontainer_ip 3 c3 "$NET")"
assert_eventually "host 2: c2b pings the new c3" 10 sc_ping 2 c2b "$C3_IP"
assert_ok "host 2: docker rm -f c2b" hdocker 2 rm -f c2b

phase "once host 3's container is gone, removal on host 2 removes it everywhere"
assert_ok "host 3: docker rm -f c3" hdocker 3 rm -f c3
assert_ok "host 2: docker network rm $NET" hdocker 2 network rm "$NET"
for h in 1 2 3; do
    assert_eventually "host $h: $NET is gone within 5 s" 5 lacks_net "$h" "$NET"
done
assert_eventually "the store holds no definition" 5 no_definitions
assert_ok "host 2: $NET does not come back" eval 'sleep 1; lacks_net 2 '"$NET"

phase "a name held by another network on host 3 is logged and skipped"
assert_ok "host 3: a bridge network called clash" hdocker 3 network create clash
assert_ok "host 1: clash -o cluster=true" sc_net_create 1 clash --subnet 10.87.0.0/24 -o cluster=true
assert_eventually "host 2: has clash" 5 has_net 2 clash
assert_eventually "host 3: its plugin says why it skipped clash" 5 \
    eval 'plugin_log_since_start 3 | grep -c "a different network of this host has its name" >/dev/null'
assert_eq "host 3: clash is still its bridge network" bridge "$(hdocker 3 network inspect -f '{{.Driver}}' clash)"
assert_ok "host 1: remove clash (no containers anywhere)" hdocker 1 network rm clash
assert_eventually "host 2: clash is gone" 5 lacks_net 2 clash
assert_ok "host 3: its own clash stays" has_net 3 clash

phase "a network without -o cluster=true stays on its host"
assert_ok "host 1: create local" sc_net_create 1 local --subnet 10.88.0.0/24
sleep 1
assert_ok "host 2: has no local" lacks_net 2 local
assert_ok "host 1: remove local" hdocker 1 network rm local

phase "a plugin that was down when a network was defined creates it on its return"
harness_kill_plugin 3
assert_ok "host 1: create late -o cluster=true" sc_net_create 1 late --subnet 10.89.0.0/24 -o cluster=true
assert_eventually "host 2: has late" 5 has_net 2 late
assert_ok "host 3: has no late while its plugin is down" lacks_net 3 late
harness_restart_plugin 3
assert_eventually "host 3: has late within 5 s of its plugin's return" 5 has_net 3 late
assert_ok "host 2: remove late" hdocker 2 network rm late
for h in 1 2 3; do
    assert_eventually "host $h: late is gone" 5 lacks_net "$h" late
done

phase "after a store outage the definitions are followed again"
assert_ok "the store's link goes down for 6 s" harness_etcd_link down
sleep 6
assert_ok "the store's link comes back" harness_etcd_link up
assert_eventually "host 1: create after -o cluster=true once the store answers" 20 \
    sc_net_create 1 after --subnet 10.90.0.0/24 -o cluster=true
for h in 2 3; do
    assert_eventually "host $h: has after" 10 has_net "$h" after
done
assert_ok "host 1: remove after" hdocker 1 network rm after
for h in 1 2 3; do
    assert_eventually "host $h: after is gone" 10 lacks_net "$h" after
done

phase "nothing left behind"
assert_eq "no definitions in the store" "" "$(cluster_keys)"
for h in 1 2 3; do
    assert_empty "host $h: no ERROR in the plugin log" "$(sc_plugin_errors "$h")"
done
harness_summary
