#!/usr/bin/env bash
# Names across hosts (issue 11): three hosts on one etcd, each dockerd with
# "dns": ["169.254.53.53"], an upstream DNS server (dnsmasq) of the test's in
# the world namespace that knows only outside.test. A container on host 2
# finds `web` on host 1 by name within 2 s of `docker run` (time printed) and as web.appnet,
# pings it; an alias held on hosts 1 and 3 gives host 2 both addresses (as
# `tasks.front` where dockerd would answer a local holder itself); same-host
# names keep working; after `docker rm -f web` the name is gone on every
# host within 2 s; a container on another overlay is not resolvable; an
# outside name is answered through the upstream both from the overlay and
# from Docker's default bridge (latencies printed, against a direct query);
# the host's resolver answers nothing from the underlay; names keep
# resolving through a store outage longer than the lease and resync after;
# after the plugin on host 1 is killed and dockerd there restarted, host 1's
# names resolve on host 2 again within 5 s of the plugin's return.
set -euo pipefail
cd "$(dirname "$0")/../.."
# shellcheck source=tests/lib/harness.sh
source tests/lib/harness.sh
harness_init names
# shellcheck source=tests/lib/scenarios.sh
source tests/lib/scenarios.sh

NET=appnet
SUB=10.83.0.0/24
OTHER=othernet
OTHER_SUB=10.84.0.0/24
DNS=169.254.53.53
UPSTREAM="$HARNESS_WORLD_IP"
OUTSIDE_IP=192.0.2.10
# A short lease: a killed plugin's names go with its registration quickly.
TTL=4

command -v dnsmasq >/dev/null || _hdie "dnsmasq not found (Debian package dnsmasq-base)"

# lookup N CONTAINER NAME - the IPv4 addresses NAME resolves to in CONTAINER
# (through its resolv.conf: Docker's embedded DNS on user networks), sorted,
# one line; fails when it does not resolve.
lookup() {
    local answer
    answer="$(hdocker "$1" exec "$2" nslookup -type=a "$3" 2>/dev/null)" || return 1
    printf '%s\n' "$answer" | awk '/^Name:/ { seen = 1 } seen && /^Address/ { print $NF }' |
        grep -E '^[0-9.]+$' | sort | tr '\n' ' ' | sed 's/ $//' | grep .
}

# resolves_to N CONTAINER NAME ADDRS - NAME resolves to exactly ADDRS.
resolves_to() { [[ "$(lookup "$1" "$2" "$3")" == "$4" ]]; }

# unresolved N CONTAINER NAME - NAME does not resolve in CONTAINER.
# An answer that says so (NXDOMAIN), not a timeout: a resolver that is down
# must not pass for one that knows the name is gone.
unresolved() {
    local answer
    answer="$(hdocker "$1" exec "$2" nslookup -type=a "$3" 2>&1)" || true
    [[ "$answer" == *NXDOMAIN* ]]
}

# query_ms N CONTAINER NAME - milliseconds one lookup of NAME takes.
query_ms() {
    local t0
    t0="$(now_ms)"
    lookup "$1" "$2" "$3" >/dev/null
    ms_since "$t0"
}

# running N CONTAINER - the container runs.
running() { [[ "$(hdocker "$1" inspect -f '{{.State.Running}}' "$2" 2>/dev/null)" == true ]]; }

# median of the numbers on stdin
median() { sort -n | awk '{ v[NR] = $1 } END { print v[int((NR + 1) / 2)] }'; }

phase "boot: an upstream DNS server, etcd, three hosts with dockerd --dns $DNS"
harness_bg "$(harness_world_ns)" dnsmasq dnsmasq --no-daemon --conf-file=/dev/null --no-resolv --no-hosts \
    --pid-file= --user=root --domain-needed --local=/#/ --listen-address="$UPSTREAM" --bind-interfaces --port=53 \
    --host-record="outside.test,$OUTSIDE_IP" --log-queries >/dev/null
harness_start_etcd
for h in 1 2 3; do
    sc_dockerd_config "$h" "\"dns\": [\"$DNS\"]"
    harness_start_host "$h" --store "$(harness_etcd_url)" --dns-upstream "$UPSTREAM" --host-ttl "$TTL"
    harness_busybox_image "$h"
    assert_contains "host $h: dockerd has the resolver as its DNS server" "$DNS" \
        "$(hdocker "$h" info -f '{{json .}}' 2>/dev/null; cat "$(harness_host_dir "$h")/daemon.json")"
    assert_ok "host $h: create $NET" sc_net_create "$h" "$NET" --subnet "$SUB"
done
harness_stop_if_failed

phase "a name on host 1 resolves on host 2, also as name.network, and answers ping"
assert_ok "host 2: client" sc_run 2 client "$NET"
assert_ok "host 1: web" sc_run 1 web "$NET"
WEB_IP="$(hcontainer_ip 1 web "$NET")"
if ms="$(sc_wait_ms 2 resolves_to 2 client web "$WEB_IP")"; then
    harness_pass "host 2 resolves web ($WEB_IP) by name"
    printf 'figure: web resolved on host 2 %s ms after docker run on host 1 returned\n' "$ms"
else
    harness_fail "host 2 does not resolve web to $WEB_IP within 2 s of docker run (got '$(lookup 2 client web || true)')"
fi
assert_ok "host 2: web.$NET resolves to $WEB_IP" resolves_to 2 client "web.$NET" "$WEB_IP"
assert_ok "host 2: ping web by name" hdocker 2 exec client ping -c 1 -W 2 web
assert_ok "host 3: a client" sc_run 3 far "$NET"
assert_eventually "host 3 resolves web too" 10 resolves_to 3 far web "$WEB_IP"

phase "an alias held on hosts 1 and 3 resolves on host 2 to both"
assert_ok "host 1: front1 --network-alias front" sc_run 1 front1 "$NET" --network-alias front --restart always
assert_ok "host 3: front3 --network-alias front" sc_run 3 front3 "$NET" --network-alias front
F1="$(hcontainer_ip 1 front1 "$NET")"
F3="$(hcontainer_ip 3 front3 "$NET")"
BOTH="$(printf '%s\n%s\n' "$F1" "$F3" | sort | tr '\n' ' ' | sed 's/ $//')"
assert_eventually "host 2: front resolves to both ($BOTH)" 10 resolves_to 2 client front "$BOTH"
# dockerd answers a name one of its own containers holds without asking us;
# tasks.<alias> (Swarm's form) is never known to it, so it reaches us.
assert_ok "host 1 (a local holder): tasks.front resolves to both" resolves_to 1 web tasks.front "$BOTH"

phase "same-host names keep working"
assert_ok "host 2: neighbour" sc_run 2 neighbour "$NET"
assert_eventually "host 2: client resolves neighbour (dockerd's own answer)" 10 \
    resolves_to 2 client neighbour "$(hcontainer_ip 2 neighbour "$NET")"

phase "a container on another overlay is not resolvable from this one"
assert_ok "host 1: create $OTHER" sc_net_create 1 "$OTHER" --subnet "$OTHER_SUB"
assert_ok "host 1: secret on $OTHER" sc_run 1 secret "$OTHER"
assert_ok "host 1: web resolves nothing for secret" unresolved 1 web secret
assert_ok "host 2: client resolves nothing for secret" unresolved 2 client secret
assert_ok "host 2: nor secret.$OTHER" unresolved 2 client "secret.$OTHER"

phase "an outside name goes to the upstream, from the overlay and from Docker's default bridge"
assert_ok "host 2: bridged, on Docker's default bridge" \
    hdocker 2 run -d --stop-timeout 1 --name bridged "$HARNESS_IMAGE" sleep 3600
assert_ok "host 2 overlay: outside.test -> $OUTSIDE_IP" resolves_to 2 client outside.test "$OUTSIDE_IP"
assert_ok "host 2 default bridge: outside.test -> $OUTSIDE_IP" resolves_to 2 bridged outside.test "$OUTSIDE_IP"
assert_ok "host 2 default bridge: the resolver is its DNS server" \
    hdocker 2 exec bridged grep -q "nameserver $DNS" /etc/resolv.conf
ov=() br=() direct=()
for _ in 1 2 3 4 5 6 7; do
    ov+=("$(query_ms 2 client outside.test)")
    br+=("$(query_ms 2 bridged outside.test)")
    t0="$(now_ms)"
    hdocker 2 exec bridged nslookup -type=a outside.test "$UPSTREAM" >/dev/null
    direct+=("$(ms_since "$t0")")
done
printf 'figure: outside.test median of 7: overlay container %s ms, default-bridge container %s ms, default-bridge straight to the upstream %s ms (each includes docker exec)\n' \
    "$(printf '%s\n' "${ov[@]}" | median)" "$(printf '%s\n' "${br[@]}" | median)" "$(printf '%s\n' "${direct[@]}" | median)"

phase "the host's resolver answers nothing that comes from the underlay"
hworld ip route add "$DNS/32" via "$(harness_host_ip 2)"
assert_fails "a query from the underlay to host 2's $DNS gets no answer" \
    hworld timeout 8 busybox nslookup outside.test "$DNS"
hworld ip route del "$DNS/32" via "$(harness_host_ip 2)"

phase "docker rm -f web: the name is gone on every host within 2 s"
assert_ok "host 1: docker rm -f web" hdocker 1 rm -f web
for pair in "1 front1" "2 client" "3 far"; do
    read -r h c <<<"$pair"
    if ms="$(sc_wait_ms 2 unresolved "$h" "$c" web)"; then
        harness_pass "host $h: web no longer resolves (${ms} ms after docker rm returned)"
    else
        harness_fail "host $h: web still resolves 2 s after docker rm (to '$(lookup "$h" "$c" web || true)')"
    fi
done

phase "a store outage longer than the lease: names keep resolving, and resync after"
harness_stop_etcd
t0="$(now_ms)"
assert_ok "host 2: front resolves (both) while the store is down" resolves_to 2 client front "$BOTH"
sleep $((TTL + 2))
assert_ok "host 2: front still resolves $((TTL + 2)) s into the outage" resolves_to 2 client front "$BOTH"
harness_start_etcd
printf 'figure: the store was down %s ms\n' "$(ms_since "$t0")"
assert_ok "host 1: a container started after the outage" sc_run 1 late "$NET"
assert_eventually "host 2 resolves it" 15 resolves_to 2 client late "$(hcontainer_ip 1 late "$NET")"
assert_eventually "host 2: front resolves to both again" 15 resolves_to 2 client front "$BOTH"

phase "the plugin on host 1 killed, then dockerd restarted: host 1's names come back on host 2"
harness_kill_plugin 1 KILL
assert_eventually "host 2: front1's name goes with host 1's lease" $((TTL * 3)) \
    unresolved 2 client front1
harness_restart_plugin 1
if ms="$(sc_wait_ms 5 resolves_to 2 client front1 "$F1")"; then
    harness_pass "host 2 resolves front1 again ${ms} ms after host 1's plugin returned"
else
    harness_fail "host 2 does not resolve front1 within 5 s of host 1's plugin returning"
fi
harness_restart_dockerd 1
assert_eventually "host 1: front1 (--restart always) runs again" 30 running 1 front1
F1B="$(hcontainer_ip 1 front1 "$NET")"
if ms="$(sc_wait_ms 5 resolves_to 2 client front1 "$F1B")"; then
    harness_pass "host 2 resolves front1 ($F1B) after dockerd's restart on host 1"
    printf 'figure: front1 resolved on host 2 %s ms after it ran again\n' "$ms"
else
    harness_fail "host 2 does not resolve front1 to $F1B within 5 s of its restart (got '$(lookup 2 client front1 || true)')"
fi

phase "clean up: names go with their containers"
for h in 1 2 3; do
    sc_rm_all "$h"
done
for h in 1 2 3; do
    assert_ok "host $h: network rm $NET" hdocker "$h" network rm "$NET"
done
assert_ok "host 1: network rm $OTHER" hdocker 1 network rm "$OTHER"
assert_empty "no name record left in the store" \
    "$(harness_store_dump etcd | awk '{ print $1 }' | grep '/names/' || true)"
assert_empty "no ERROR line in any plugin log" "$(sc_plugin_errors 1)$(sc_plugin_errors 2)$(sc_plugin_errors 3)"

harness_summary
