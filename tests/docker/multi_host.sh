#!/usr/bin/env bash
# Docker end-to-end on three simulated hosts sharing one etcd: one overlay
# across hosts (full mesh, full-size packets, MTU), 24 concurrent `docker run`
# with unique addresses, no devices on a host without a local container, a
# removed container's entries leaving the other hosts (waited for, time
# printed), a SIGKILLed plugin (data plane keeps working, restart reconciles
# what changed meanwhile), and etcd stopped, then cut off
# (docker run fails in bounded time with a store error and allocates nothing;
# everything works again once etcd is back; nothing leaks in Docker, the
# kernel or the store); a network's --aux-address is refused to docker run --ip
# on every host. Measured times are printed.
set -euo pipefail
cd "$(dirname "$0")/../.."
# shellcheck source=tests/lib/harness.sh
source tests/lib/harness.sh

# STORE=etcd (default) or consul (the test-only Consul server).
STORE="${STORE:-etcd}"
harness_init "multi_$STORE"
T_START=$SECONDS

img="$HARNESS_IMAGE"
HOSTS=(1 2 3)
NET=appnet
NET_SUBNET=10.77.0.0/24
NET_OVERLAY=10.77.0.0_24
OTHER=othernet
OTHER_SUBNET=10.78.0.0/24
OTHER_OVERLAY=10.78.0.0_24
mtu_expected=$((HARNESS_UL_MTU - 50))
# A SIGKILLed plugin's containers keep talking while its host registration
# lives (README, Limits: other hosts drop a host's entries once its lease
# expires). The hosts run with the default 10 s TTL, renewed every TTL/3, so a
# lease can expire 6.7 s after a kill: host 2's plugin stays down 5 s, a
# restart's worth plus missed renewals.
HOST_TTL="${HOST_TTL:-10}"
PLUGIN_DOWN_S="${PLUGIN_DOWN_S:-5}"
# How long a removed container's FDB/neighbour entries may take to leave the
# other hosts: a generous limit on a wait, not a timing claim (the time is
# printed; timing figures belong to the benchmarks).
PEER_REMOVAL_LIMIT_S=15

# --- helpers ------------------------------------------------------------------

# run_c N NAME [NETWORK] - docker run -d a sleeping busybox on host N.
run_c() {
    hdocker "$1" run -d --stop-timeout 1 --network "${3:-$NET}" --name "$2" "$img" sleep 3600
}

# cmac N CONTAINER [NETWORK] - the container's MAC on the network (lower case).
cmac() {
    hdocker "$1" inspect -f "{{with index .NetworkSettings.Networks \"${3:-$NET}\"}}{{.MacAddress}}{{end}}" "$2" |
        tr 'A-F' 'a-f'
}

# cping N CONTAINER IP [SIZE] - one ping from a container (2 s to answer).
cping() {
    if [[ -n "${4:-}" ]]; then
        hdocker "$1" exec "$2" ping -c 1 -W 2 -s "$4" "$3"
    else
        hdocker "$1" exec "$2" ping -c 1 -W 2 "$3"
    fi
}

# overlay_vni OVERLAY - the overlay's VNI, read from the shared store.
overlay_vni() {
    harness_store_dump "$STORE" |
        awk -v k="/rustoverlay/v1/overlay/$1/record" '$1 == k { print $2 }' |
        sed -n 's/.*"vni":\([0-9]*\).*/\1/p'
}

# has_ovl_ns N VNI - host N has the overlay namespace ro-VNI.
has_ovl_ns() { hexec_mnt "$1" test -e "/run/rustoverlay/netns/ro-$2"; }

# in_ovl N VNI CMD... - CMD inside host N's overlay namespace ro-VNI.
in_ovl() {
    local n="$1" vni="$2"
    shift 2
    hexec_mnt "$n" nsenter --net="/run/rustoverlay/netns/ro-$vni" -- "$@"
}

# peer_state N VNI MAC IP - prints "fdb" and/or "neigh" for the entries of a
# remote endpoint present on host N's VXLAN device (nothing if none, or if
# the host has no namespace for the overlay).
peer_state() {
    local n="$1" vni="$2" mac="$3" ip="$4" fdb neigh
    has_ovl_ns "$n" "$vni" 2>/dev/null || return 0
    fdb="$(in_ovl "$n" "$vni" bridge fdb show dev "ro-vx-$vni" 2>/dev/null)" || fdb=""
    neigh="$(in_ovl "$n" "$vni" ip neigh show dev "ro-vx-$vni" 2>/dev/null)" || neigh=""
    if printf '%s\n' "$fdb" | awk -v m="$mac" 'tolower($1) == m { f = 1 } END { exit !f }'; then
        printf 'fdb '
    fi
    if printf '%s\n' "$neigh" | awk -v ip="$ip" -v m="$mac" '$1 == ip && tolower($3) == m { f = 1 } END { exit !f }'; then
        printf 'neigh'
    fi
}

peer_present() { [[ "$(peer_state "$@")" == "fdb neigh" ]]; }

# alloc_keys - the store's address and endpoint keys, sorted.
alloc_keys() {
    harness_store_dump "$STORE" | awk '{ print $1 }' | grep -E '/ipam/pool/[^/]+/addr/|/overlay/[^/]+/ep/' | sort || true
}

# --- boot ---------------------------------------------------------------------
phase "boot: $STORE and three hosts"
harness_shared_store_start "$STORE"
store="$(harness_shared_store_url "$STORE")"
STORE_ARGS=()
mapfile -t STORE_ARGS < <(harness_shared_store_args "$STORE")
for h in "${HOSTS[@]}"; do
    harness_start_host "$h" --store "$store" "${STORE_ARGS[@]}" --host-ttl "$HOST_TTL"
    harness_busybox_image "$h"
done
echo "booted in $((SECONDS - T_START))s"

# --- 1. one overlay across three hosts --------------------------------------
phase "one network on three hosts, two containers each, full mesh"
for h in "${HOSTS[@]}"; do
    assert_ok "host $h: create $NET ($NET_SUBNET)" \
        hdocker "$h" network create -d rustoverlay --ipam-driver rustoverlay --subnet "$NET_SUBNET" "$NET"
done
harness_stop_if_failed "network creation failed"

declare -A HOST_OF IP_OF
CONTAINERS=()
for h in "${HOSTS[@]}"; do
    for s in a b; do
        c="c$h$s"
        assert_ok "host $h: run $c on $NET" run_c "$h" "$c"
        HOST_OF[$c]=$h
        CONTAINERS+=("$c")
    done
done
harness_stop_if_failed "containers did not start"
for c in "${CONTAINERS[@]}"; do
    IP_OF[$c]="$(hcontainer_ip "${HOST_OF[$c]}" "$c" "$NET")"
    assert_ok "$c has an address in $NET_SUBNET (${IP_OF[$c]})" test "${IP_OF[$c]%.*}" = 10.77.0
done
assert_eq "the six containers have six distinct addresses" 6 \
    "$(for c in "${CONTAINERS[@]}"; do echo "${IP_OF[$c]}"; done | sort -u | grep -c .)"

VNI="$(overlay_vni "$NET_OVERLAY")"
assert_ok "the store gives $NET's overlay a VNI >= 256 ($VNI)" test "${VNI:-0}" -ge 256
harness_stop_if_failed "no VNI for $NET"

t0=$SECONDS
for src in "${CONTAINERS[@]}"; do
    for dst in "${CONTAINERS[@]}"; do
        [[ "${HOST_OF[$src]}" != "${HOST_OF[$dst]}" ]] || continue
        assert_eventually "$src (h${HOST_OF[$src]}) pings $dst (h${HOST_OF[$dst]}, ${IP_OF[$dst]})" 15 \
            cping "${HOST_OF[$src]}" "$src" "${IP_OF[$dst]}"
    done
done
echo "full mesh (24 pairs) checked in $((SECONDS - t0))s"

for c in "${CONTAINERS[@]}"; do
    assert_eq "$c eth0 MTU is $mtu_expected (underlay $HARNESS_UL_MTU - 50)" "$mtu_expected" \
        "$(hdocker "${HOST_OF[$c]}" exec "$c" cat /sys/class/net/eth0/mtu 2>&1)"
done
# 1422 bytes of ICMP data + 8 ICMP + 20 IP = a 1450-byte packet, 1500 with
# the VXLAN encapsulation: exactly the underlay MTU.
for pair in "c1a c2a" "c2a c3a" "c3a c1a" "c2b c1b" "c3b c2b" "c1b c3b"; do
    read -r src dst <<<"$pair"
    assert_ok "full-size packet: $src (h${HOST_OF[$src]}) ping -s 1422 $dst (h${HOST_OF[$dst]})" \
        cping "${HOST_OF[$src]}" "$src" "${IP_OF[$dst]}" 1422
done

# --- 2. concurrent docker run ------------------------------------------------
phase "24 containers started concurrently on three hosts"
pdir="$HARNESS_TMP/parallel"
mkdir -p "$pdir"
PAR=()
t0_ms="$(now_ms)"
for h in "${HOSTS[@]}"; do
    for i in 1 2 3 4 5 6 7 8; do
        c="p$h-$i"
        PAR+=("$h:$c")
        (
            rc=0
            run_c "$h" "$c" >"$pdir/$c.out" 2>&1 || rc=$?
            echo "$rc" >"$pdir/$c.rc"
        ) &
    done
done
wait
par_ms=$(($(now_ms) - t0_ms))
echo "24 concurrent docker run took ${par_ms} ms"
started=0
for hc in "${PAR[@]}"; do
    c="${hc#*:}"
    if [[ "$(cat "$pdir/$c.rc" 2>/dev/null)" == 0 ]]; then
        started=$((started + 1))
    else
        harness_fail "docker run $c (host ${hc%%:*}) failed:"
        _harness_indent <"$pdir/$c.out"
    fi
done
assert_eq "all 24 concurrent docker run succeeded" 24 "$started"
par_ips=""
for hc in "${PAR[@]}"; do
    par_ips+="$(hcontainer_ip "${hc%%:*}" "${hc#*:}" "$NET" 2>/dev/null || true)"$'\n'
done
par_ips="$(printf '%s' "$par_ips" | grep . | sort -V || true)"
assert_eq "24 containers got 24 addresses" 24 "$(printf '%s\n' "$par_ips" | grep -c . || true)"
dups="$(
    {
        printf '%s\n' "$par_ips"
        for c in "${CONTAINERS[@]}"; do echo "${IP_OF[$c]}"; done
    } | grep . | sort | uniq -d
)"
assert_empty "the 24 addresses are distinct, also from the 6 earlier containers" "$dups"
echo "addresses: $(printf '%s' "$par_ips" | tr '\n' ' ')"
for h in "${HOSTS[@]}"; do
    (
        # shellcheck disable=SC2046 # one name per word
        hdocker "$h" rm -f $(for i in 1 2 3 4 5 6 7 8; do echo "p$h-$i"; done) >"$pdir/rm-$h.out" 2>&1
        echo $? >"$pdir/rm-$h.rc"
    ) &
done
wait
for h in "${HOSTS[@]}"; do
    assert_eq "host $h: the 8 concurrent containers removed" 0 "$(cat "$pdir/rm-$h.rc")"
done

# --- 3. no devices on a host without a local container ------------------------
phase "$OTHER: containers on hosts 1 and 2 only; host 3 has nothing for it"
for h in "${HOSTS[@]}"; do
    assert_ok "host $h: create $OTHER ($OTHER_SUBNET)" \
        hdocker "$h" network create -d rustoverlay --ipam-driver rustoverlay --subnet "$OTHER_SUBNET" "$OTHER"
done
assert_ok "host 1: run o1 on $OTHER" run_c 1 o1 "$OTHER"
assert_ok "host 2: run o2 on $OTHER" run_c 2 o2 "$OTHER"
o2_ip="$(hcontainer_ip 2 o2 "$OTHER")"
VNI2="$(overlay_vni "$OTHER_OVERLAY")"
assert_ok "$OTHER has its own VNI ($VNI2, $NET has $VNI)" test "${VNI2:-0}" -ge 256 -a "${VNI2:-0}" != "$VNI"
assert_eventually "o1 (h1) pings o2 (h2) on $OTHER" 15 cping 1 o1 "$o2_ip"
assert_ok "host 1 has overlay namespace ro-$VNI2" has_ovl_ns 1 "$VNI2"
assert_ok "host 2 has overlay namespace ro-$VNI2" has_ovl_ns 2 "$VNI2"
assert_ok "host 1 has ro-vx-$VNI2 in it" in_ovl 1 "$VNI2" ip link show "ro-vx-$VNI2"
assert_fails "host 3 has no overlay namespace ro-$VNI2" has_ovl_ns 3 "$VNI2"
assert_eq "host 3's overlay namespaces: only ro-$VNI ($NET)" "ro-$VNI" "$(ovl_namespaces 3 | tr '\n' ' ' | sed 's/ $//')"
assert_empty "host 3 has no ro-*/rc-* link in its own namespace" "$(host_ro_links 3)"
# What can be observed of "no watch": the plugin logs every peer sync inside a
# span peer_sync{overlay=...}; host 3's log must never name this overlay's.
assert_ok "host 3's plugin log shows a peer sync for $NET (the check below can see one)" \
    grep -q "peer_sync{overlay=$NET_OVERLAY" "$(harness_host_dir 3)/plugin.log"
assert_fails "host 3's plugin log shows no peer sync for $OTHER" \
    grep -q "peer_sync{overlay=$OTHER_OVERLAY" "$(harness_host_dir 3)/plugin.log"
assert_ok "host 1: remove o1" hdocker 1 rm -f o1
assert_ok "host 2: remove o2" hdocker 2 rm -f o2
assert_eventually "host 1 removed ro-$VNI2 with its last container" 10 eval "! has_ovl_ns 1 $VNI2"
assert_eventually "host 2 removed ro-$VNI2 with its last container" 10 eval "! has_ovl_ns 2 $VNI2"

# --- 3b. a network's aux address is never a container's ---------------------
AUXNET=auxnet
AUX_SUBNET=10.89.0.0/24
AUX_IP=10.89.0.50
phase "$AUXNET with --aux-address rtr=$AUX_IP on hosts 1 and 2: no container gets $AUX_IP"
for h in 1 2; do
    assert_ok "host $h: create $AUXNET with --aux-address rtr=$AUX_IP" \
        hdocker "$h" network create -d rustoverlay --ipam-driver rustoverlay \
        --subnet "$AUX_SUBNET" --aux-address "rtr=$AUX_IP" "$AUXNET"
done
assert_contains "the store keeps $AUX_IP as the network's shared aux reservation, held by no container" \
    '"kind":"aux"' "$(harness_store_dump "$STORE" | awk -v k="/rustoverlay/v1/ipam/pool/10.89.0.0_24/addr/$AUX_IP" '$1 == k')"
for h in 1 2; do
    out="$(hdocker "$h" run -d --network "$AUXNET" --ip "$AUX_IP" --name "aux$h" "$img" sleep 3600 2>&1)" && rc=0 || rc=$?
    assert_ok "host $h: docker run --ip $AUX_IP is refused" test "$rc" -ne 0
    assert_contains "host $h: the refusal names the aux address" "address $AUX_IP is an aux address" "$out"
    hdocker "$h" rm -f "aux$h" >/dev/null 2>&1 || true
done
assert_ok "host 1: a container without --ip on $AUXNET starts" run_c 1 auxd "$AUXNET"
assert_ok "and does not get $AUX_IP" test "$(hcontainer_ip 1 auxd "$AUXNET")" != "$AUX_IP"
assert_ok "host 1: remove auxd" hdocker 1 rm -f auxd
for h in 1 2; do
    assert_ok "host $h: remove $AUXNET" hdocker "$h" network rm "$AUXNET"
done

# --- 4. peer removal reaches the other hosts ---------------------------------
phase "container removed on host 1: its FDB/neighbour entries leave hosts 2 and 3"
gone="c1b"
gone_mac="$(cmac 1 "$gone")"
gone_ip="${IP_OF[$gone]}"
for h in 2 3; do
    assert_eventually "host $h has FDB + neighbour entries for $gone ($gone_mac, $gone_ip)" 10 \
        peer_present "$h" "$VNI" "$gone_mac" "$gone_ip"
done
rm_start="$(now_ms)"
assert_ok "host 1: docker rm -f $gone" hdocker 1 rm -f "$gone"
rm_done="$(now_ms)"
left=""
while true; do
    left="$(for h in 2 3; do
        st="$(peer_state "$h" "$VNI" "$gone_mac" "$gone_ip")"
        [[ -z "$st" ]] || echo "host $h: $st"
    done)"
    [[ -n "$left" ]] || break
    (($(now_ms) - rm_done < PEER_REMOVAL_LIMIT_S * 1000)) || break
    sleep 0.1
done
t_done="$(now_ms)"
if [[ -z "$left" ]]; then
    echo "docker rm -f took $((rm_done - rm_start)) ms; entries gone $((t_done - rm_done)) ms after it returned ($((t_done - rm_start)) ms after it started)"
else
    echo "docker rm -f took $((rm_done - rm_start)) ms; entries still there $((t_done - rm_done)) ms after it returned"
fi
assert_empty "the removed container's entries are gone from hosts 2 and 3 (within ${PEER_REMOVAL_LIMIT_S} s)" "$left"
if [[ -n "$left" ]]; then
    for h in 2 3; do
        echo "host $h, entries for $gone_mac / $gone_ip on ro-vx-$VNI:"
        { in_ovl "$h" "$VNI" bridge -s fdb show dev "ro-vx-$VNI" || true; } | awk -v m="$gone_mac" 'tolower($1) == m' | sed 's/^/    /'
        { in_ovl "$h" "$VNI" ip neigh show dev "ro-vx-$VNI" || true; } | awk -v ip="$gone_ip" '$1 == ip' | sed 's/^/    /'
    done
fi
unset "HOST_OF[$gone]" "IP_OF[$gone]"
CONTAINERS=(c1a c2a c2b c3a c3b)
assert_eventually "c2a (h2) still pings c1a (h1)" 10 cping 2 c2a "${IP_OF[c1a]}"

# --- 5. plugin SIGKILLed on host 2 ------------------------------------------
phase "plugin on host 2 killed: data plane keeps working; restart reconciles"
c3b_mac="$(cmac 3 c3b)"
c3b_ip="${IP_OF[c3b]}"
harness_kill_plugin 2 KILL
killed_at=$SECONDS
assert_fails "host 2's plugin is not running" harness_plugin_pid 2
for pair in "2 c2a 1 c1a" "2 c2b 3 c3a" "1 c1a 2 c2a" "3 c3a 2 c2b"; do
    read -r sh src dh dst <<<"$pair"
    assert_ok "plugin down: $src (h$sh) pings $dst (h$dh)" cping "$sh" "$src" "${IP_OF[$dst]}"
done
# Changes made while it is down must reach host 2 through reconciliation.
assert_ok "plugin down: host 3 runs c3n" run_c 3 c3n
c3n_ip="$(hcontainer_ip 3 c3n "$NET")"
assert_ok "plugin down: host 3 removes c3b" hdocker 3 rm -f c3b
# Still talking after several missed lease renewals (PLUGIN_DOWN_S).
while ((SECONDS - killed_at < PLUGIN_DOWN_S)); do sleep 0.5; done
for pair in "2 c2a 1 c1a" "2 c2b 3 c3a" "1 c1a 2 c2a" "3 c3a 2 c2b"; do
    read -r sh src dh dst <<<"$pair"
    assert_ok "plugin down $((SECONDS - killed_at)) s: $src (h$sh) pings $dst (h$dh)" \
        cping "$sh" "$src" "${IP_OF[$dst]}"
done
assert_ok "plugin still down on host 2" eval "! harness_plugin_pid 2"
t0=$SECONDS
harness_restart_plugin 2
assert_eventually "host 2's plugin logs 'peers reconciled' after its restart" 20 \
    eval "plugin_log_since_start 2 | grep -q 'peers reconciled'"
echo "plugin restart to reconciled: $((SECONDS - t0))s"
plugin_log_since_start 2 | awk '/peers reconciled/ && n < 3 { print "    " $0; n++ }'
assert_eventually "after reconcile: c2a (h2) pings c3n (h3, started while the plugin was down)" 15 \
    cping 2 c2a "$c3n_ip"
assert_eventually "after reconcile: host 2 dropped c3b (removed while the plugin was down)" 10 \
    test -z "$(peer_state 2 "$VNI" "$c3b_mac" "$c3b_ip")"
unset "HOST_OF[c3b]" "IP_OF[c3b]"
assert_ok "host 2: run c2n (new container after the restart)" run_c 2 c2n
c2n_ip="$(hcontainer_ip 2 c2n "$NET")"
assert_eventually "c2n (h2) pings c1a (h1)" 15 cping 2 c2n "${IP_OF[c1a]}"
assert_eventually "c2n (h2) pings c3a (h3)" 15 cping 2 c2n "${IP_OF[c3a]}"
assert_eventually "c1a (h1) pings c2n (h2)" 15 cping 1 c1a "$c2n_ip"
assert_eventually "c3n (h3) pings c2n (h2)" 15 cping 3 c3n "$c2n_ip"

# --- 6. store outage ----------------------------------------------------------
# etcd is stopped and started again on its data. The Consul test server keeps
# its data in memory, so it is frozen (SIGSTOP) and thawed instead: requests
# then time out rather than being refused.
store_down() {
    case "$STORE" in
        etcd) harness_stop_etcd ;;
        consul) kill -STOP "$(harness_consul_pid)" ;;
    esac
}
store_up() {
    case "$STORE" in
        etcd) harness_start_etcd ;;
        consul) kill -CONT "$(harness_consul_pid)" ;;
    esac
}
phase "$STORE stopped: docker run fails fast with a store error, allocates nothing"
keys_before="$(alloc_keys)"
assert_ok "the store lists addresses and endpoints before the outage" test -n "$keys_before"
store_down
[[ "$STORE" != etcd ]] || assert_fails "etcd is down" _harness_etcd_healthy
t0_ms="$(now_ms)"
rc=0
out="$(timeout 120 "$HARNESS_DOCKER_CLI" -H "unix://$(harness_host_dir 1)/docker.sock" \
    run -d --stop-timeout 1 --network "$NET" --name down1 "$img" sleep 3600 2>&1)" || rc=$?
down_ms=$(($(now_ms) - t0_ms))
echo "docker run with $STORE down: exit $rc after ${down_ms} ms"
printf '%s\n' "$out" | sed 's/^/    /'
assert_ok "docker run fails while $STORE is down (exit $rc)" test "$rc" -ne 0 -a "$rc" -ne 124
assert_ok "it fails well under 60 s (${down_ms} ms <= 30000)" test "$down_ms" -le 30000
assert_contains "the error says the store is unreachable" "store is running and reachable" "$out"
store_up
keys_after="$(alloc_keys)"
assert_eq "the failed docker run allocated nothing (address and endpoint keys unchanged)" \
    "$keys_before" "$keys_after"
assert_ok "remove the failed container" hdocker 1 rm -f down1

phase "$STORE unreachable (cable cut: packets dropped, not refused): docker run still fails in bounded time"
keys_before="$(alloc_keys)"
harness_shared_store_link "$STORE" down
cut_at=$SECONDS
t0_ms="$(now_ms)"
rc=0
out="$(timeout 120 "$HARNESS_DOCKER_CLI" -H "unix://$(harness_host_dir 3)/docker.sock" \
    run -d --stop-timeout 1 --network "$NET" --name down3 "$img" sleep 3600 2>&1)" || rc=$?
down_ms=$(($(now_ms) - t0_ms))
harness_shared_store_link "$STORE" up
echo "docker run with $STORE unreachable: exit $rc after ${down_ms} ms (cable cut for $((SECONDS - cut_at)) s)"
printf '%s\n' "$out" | sed 's/^/    /'
assert_ok "docker run fails while $STORE is unreachable (exit $rc)" test "$rc" -ne 0 -a "$rc" -ne 124
assert_ok "it fails well under 60 s (${down_ms} ms <= 30000)" test "$down_ms" -le 30000
assert_contains "the error says the store is unreachable" "store is running and reachable" "$out"
assert_eventually "$STORE answers again" 10 harness_shared_store_healthy "$STORE"
assert_eq "the failed docker run allocated nothing (address and endpoint keys unchanged)" \
    "$keys_before" "$(alloc_keys)"
assert_ok "remove the failed container" hdocker 3 rm -f down3

phase "$STORE back: everything works"
assert_ok "host 1: run after1" run_c 1 after1
after1_ip="$(hcontainer_ip 1 after1 "$NET")"
assert_eventually "after1 (h1) pings c2a (h2)" 30 cping 1 after1 "${IP_OF[c2a]}"
assert_eventually "after1 (h1) pings c3a (h3)" 30 cping 1 after1 "${IP_OF[c3a]}"
assert_eventually "c2n (h2) pings after1 (h1)" 30 cping 2 c2n "$after1_ip"
assert_eventually "c3n (h3) pings after1 (h1)" 30 cping 3 c3n "$after1_ip"

# --- teardown: nothing leaks --------------------------------------------------
phase "remove everything; nothing is left"
for h in "${HOSTS[@]}"; do
    ids="$(hdocker "$h" ps -aq)"
    # shellcheck disable=SC2086 # one id per word
    [[ -z "$ids" ]] || assert_ok "host $h: remove all containers" hdocker "$h" rm -f $ids
done
for h in "${HOSTS[@]}"; do
    assert_ok "host $h: remove $NET and $OTHER" hdocker "$h" network rm "$NET" "$OTHER"
done
for h in "${HOSTS[@]}"; do
    assert_empty "host $h: no rustoverlay network left in Docker" \
        "$(hdocker "$h" network ls -q --filter driver=rustoverlay)"
    assert_empty "host $h: no overlay namespace left under /run/rustoverlay/netns" "$(ovl_namespaces "$h")"
    assert_empty "host $h: no ro-*/rc-* link left in its namespace" "$(host_ro_links "$h")"
    assert_ok "host $h: the plugin is still running" harness_plugin_pid "$h"
done
assert_store_empty "$STORE"

echo "total time: $((SECONDS - T_START))s"
harness_summary
