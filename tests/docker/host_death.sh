#!/usr/bin/env bash
# Liveness end to end on three simulated hosts sharing one store (README, "How
# it works" -> Liveness): a host that dies outright, a host cut off from the
# store only, and a clean teardown afterwards. Measured times are printed.
#
#   1. host death: host 3 loses power (plugin, dockerd and containers
#      SIGKILLed, underlay cable cut). Hosts 1 and 2 drop its FDB/neighbour
#      entries once its lease expires (waited for, time printed); its
#      endpoints and addresses are reclaimed after TTL + grace, within lease
#      expiry + grace + 3 s, and its address can be taken with `docker run
#      --ip` on host 1; a ping every 200 ms between containers of hosts 1
#      and 2 loses nothing meanwhile. Host 3 then boots again: its dockerd
#      cleaning up its dead containers must not free what was reclaimed and
#      handed out to host 1.
#   2. partition: host 2 cannot reach the store (iptables in its own
#      namespace), the other hosts still can, for longer than its TTL + grace.
#      The other hosts drop its entries; `docker run` on host 2 fails with a
#      store error and allocates nothing. Past TTL + grace the reaper finds
#      host 2's machine answering on the underlay and reclaims nothing: its
#      container's address cannot be taken with `docker run --ip` on host 1.
#      After the cut host 2 re-registers and reconciles, its entries come
#      back, its containers talk again, a new container works, no address is
#      held twice, and every host's FDB/neighbour entries are exactly the live
#      remote containers.
#   3. teardown: nothing left in Docker, the kernel or the store.
#
# STORE=etcd (default) picks the shared store; see "the store" below for how
# another store plugs in. HOST_TTL, GRACE, PART_GRACE and CUT_S override the
# timings. About a minute.
set -euo pipefail
cd "$(dirname "$0")/../.."
# shellcheck source=tests/lib/harness.sh
source tests/lib/harness.sh

STORE="${STORE:-etcd}"
HOST_TTL="${HOST_TTL:-4}"
GRACE="${GRACE:-10}"
PART_GRACE="${PART_GRACE:-$GRACE}"

# --- the store: everything store-specific is here -----------------------------
#
# start_store         start it (its namespace cabled to the underlay on first use)
# store_url           the --store URL of the plugins
# store_serve_args    extra `serve` args the plugins need with this store
# store_ip            its underlay address (what the partition blocks)
# store_lease_max_s   how long after its last renewal the store may still keep
#                     a host's registration: the TTL on both (the plugin asks
#                     Consul for half the TTL, since Consul expires a session
#                     at twice its TTL), unless Consul raises it to its
#                     session_ttl_min (1 s here: the test server and the
#                     plugins run with --session-ttl-min 1s /
#                     --consul-session-ttl-min 1)
# store_dump          `rustoverlay dump` of it ("key value" lines)
# store_assert_empty  assert_store_empty on it
#
case "$STORE" in
    etcd | consul) ;;
    *)
        echo "STORE=$STORE is not supported by $0 (supported: etcd, consul)" >&2
        exit 1
        ;;
esac

start_store() { harness_shared_store_start "$STORE"; }
store_url() { harness_shared_store_url "$STORE"; }
store_serve_args() { harness_shared_store_args "$STORE"; }
store_ip() { harness_shared_store_ip "$STORE"; printf '\n'; }
# Consul: a session of half the TTL, at least session_ttl_min, expires at
# twice its TTL.
store_lease_max_s() {
    local min
    case "$STORE" in
        etcd) printf '%s\n' "$HOST_TTL" ;;
        consul)
            min="$(harness_consul_session_ttl_min)"
            printf '%s\n' "$((HOST_TTL > 2 * min ? HOST_TTL : 2 * min))"
            ;;
    esac
}
store_dump() { harness_store_dump "$STORE"; }
store_assert_empty() { assert_store_empty "$STORE"; }

# A registration is gone at most LEASE_MAX_S after its host's last renewal,
# and the other hosts drop its entries when their watch says so. How soon
# after the expiry depends on the machine's load, not on the design: the time
# is printed, and DROP_LIMIT_S is only how long the test waits.
LEASE_MAX_S="$(store_lease_max_s)"
DROP_LIMIT_S=$((LEASE_MAX_S + 15))
# Phase 2: host 2 is cut off from the store this long (18 s on etcd with the
# 4 s TTL): past the lease expiry and the grace (PART_GRACE), so that the
# reaper decides about host 2 while it is cut off.
CUT_S="${CUT_S:-$((LEASE_MAX_S + PART_GRACE + 4))}"

harness_init "death_$STORE"
T_START=$SECONDS

img="$HARNESS_IMAGE"
HOSTS=(1 2 3)
NET=appnet
NET_SUBNET=10.77.0.0/24
NET_OVERLAY=10.77.0.0_24

# --- helpers ------------------------------------------------------------------

run_c() {
    hdocker "$1" run -d --stop-timeout 1 --network "$NET" --name "$2" "${@:3}" "$img" sleep 3600
}

cmac() {
    hdocker "$1" inspect -f "{{with index .NetworkSettings.Networks \"$NET\"}}{{.MacAddress}}{{end}}" "$2" |
        tr 'A-F' 'a-f'
}

cping() { hdocker "$1" exec "$2" ping -c 1 -W 2 "$3"; }

overlay_vni() {
    store_dump | awk -v k="/rustoverlay/v1/overlay/$NET_OVERLAY/record" '$1 == k { print $2 }' |
        sed -n 's/.*"vni":\([0-9]*\).*/\1/p'
}

# peer_entries N - host N's remote entries on the overlay's VXLAN device, one
# per line: "fdb MAC VTEP" and "neigh IP MAC" (nothing when the host has no
# namespace for the overlay). One round trip into the host, so that polls
# are fine-grained.
peer_entries() {
    # shellcheck disable=SC2016 # expanded by the inner sh
    hexec_mnt "$1" sh -c '
        ns=/run/rustoverlay/netns/ro-$0
        [ -e "$ns" ] || exit 0
        nsenter --net="$ns" -- bridge fdb show dev "ro-vx-$0"
        echo "--neigh--"
        nsenter --net="$ns" -- ip neigh show dev "ro-vx-$0"' "$VNI" 2>/dev/null |
        awk '/^--neigh--$/ { n = 1; next }
             !n && $2 == "dst" { print "fdb", tolower($1), $3 }
             n && $2 == "lladdr" { print "neigh", $1, tolower($3) }' || true
}

# fdb_entries N - "mac vtep" of the remote FDB entries on host N, sorted.
fdb_entries() { peer_entries "$1" | awk '$1 == "fdb" { print $2, $3 }' | sort; }

# neigh_entries N - "ip mac" of the neighbour entries on host N, sorted.
neigh_entries() { peer_entries "$1" | awk '$1 == "neigh" { print $2, $3 }' | sort; }

# entry_state ENTRIES MAC IP - "fdb neigh", "fdb ", "neigh" or nothing: which
# of a remote endpoint's entries are among ENTRIES (peer_entries output).
entry_state() {
    printf '%s\n' "$1" | awk -v m="$2" -v ip="$3" '
        $1 == "fdb" && $2 == m { f = 1 }
        $1 == "neigh" && $2 == ip && $3 == m { n = 1 }
        END { printf "%s%s", (f ? "fdb " : ""), (n ? "neigh" : "") }'
}

# peer_state N MAC IP - entry_state on host N now.
peer_state() { entry_state "$(peer_entries "$1")" "$2" "$3"; }

# peer_vtep N MAC - the VTEP host N's FDB sends MAC to.
peer_vtep() { fdb_entries "$1" | awk -v m="$2" '$1 == m { print $2 }'; }

# wait_entries gone|present T0_MS LIMIT_S "N MAC IP"... - poll until none /
# all of the given endpoints' entries (FDB and neighbour) are on the given
# hosts, for up to LIMIT_S after T0_MS. Prints the ms from T0_MS to when that
# was seen, or "never: <what differs>".
wait_entries() {
    local mode="$1" t0="$2" limit="$3" bad spec n mac ip st h
    shift 3
    local -A snap
    while true; do
        bad=""
        snap=()
        for spec in "$@"; do
            read -r n mac ip <<<"$spec"
            [[ -n "${snap[$n]+x}" ]] || snap[$n]="$(peer_entries "$n")"
        done
        for spec in "$@"; do
            read -r n mac ip <<<"$spec"
            st="$(entry_state "${snap[$n]}" "$mac" "$ip")"
            if [[ "$mode" == gone && -n "$st" ]] || [[ "$mode" == present && "$st" != "fdb neigh" ]]; then
                bad+="host $n has '$st' for $mac/$ip; "
            fi
        done
        if [[ -z "$bad" ]]; then
            ms_since "$t0"
            return 0
        fi
        if (($(ms_since "$t0") > limit * 1000)); then
            printf 'never: %s\n' "$bad"
            for h in "${!snap[@]}"; do
                printf '%s\n' "${snap[$h]}" | sed "s/^/    host $h: /"
            done
            return 0
        fi
        sleep 0.05
    done
}

# alloc_keys - the store's address and endpoint keys with their values, sorted.
alloc_keys() {
    store_dump | grep -E '/ipam/pool/[^/ ]+/addr/|/overlay/[^/ ]+/ep/' | sed 's/"at":[0-9]*//' | sort || true
}

# held_by HOST - every key naming HOST as holder: its endpoints, addresses,
# networks (host/HOST/net/*, the overlay record's per-host map) and pool
# references.
held_by() {
    local h="$1"
    store_dump | awk -v h="$h" '
        index($1, "/rustoverlay/v1/host/" h "/") == 1 { print; next }
        $1 ~ /\/overlay\/[^\/]+\/ep\// && index($2, "\"host\":\"" h "\"") { print; next }
        $1 ~ /\/ipam\/pool\/[^\/]+\/addr\// && index($2, "\"host\":\"" h "\"") { print; next }
        $1 ~ /\/ipam\/pool\/[^\/]+\/record$/ && index($2, "\"" h "\":") { print; next }
        $1 ~ /\/overlay\/[^\/]+\/record$/ && index($2, "\"" h "\":") { print; next }
    ' || true
}

# expected_entries N fdb|neigh CONTAINERS - what host N's VXLAN device must
# hold for the containers ("host name ip mac" lines) of the other hosts.
expected_entries() {
    local n="$1" kind="$2"
    printf '%s\n' "$3" | awk -v n="$n" -v k="$kind" -v net="$HARNESS_UL_NET" '
        NF == 4 && $1 != n { if (k == "fdb") print $4, net "." $1; else print $3, $4 }' | sort
}

# entries_match N CONTAINERS - host N's FDB and neighbour entries are exactly
# the other hosts' live containers (prints the differences otherwise).
entries_match() {
    local n="$1" c="$2" want have rc=0
    want="$(expected_entries "$n" fdb "$c")"
    have="$(fdb_entries "$n")"
    if [[ "$want" != "$have" ]]; then
        echo "host $n FDB (- wanted, + present):"
        diff <(printf '%s\n' "$want") <(printf '%s\n' "$have") | grep '^[<>]' | sed 's/^</-/; s/^>/+/'
        rc=1
    fi
    want="$(expected_entries "$n" neigh "$c")"
    have="$(neigh_entries "$n")"
    if [[ "$want" != "$have" ]]; then
        echo "host $n neighbours (- wanted, + present):"
        diff <(printf '%s\n' "$want") <(printf '%s\n' "$have") | grep '^[<>]' | sed 's/^</-/; s/^>/+/'
        rc=1
    fi
    return "$rc"
}

# all_entries_match - every host with a local container passes entries_match.
all_entries_match() {
    local c h rc=0
    c="$(containers_on "${HOSTS[@]}")"
    for h in "${HOSTS[@]}"; do
        grep -q "^$h " <<<"$c" || continue
        entries_match "$h" "$c" || rc=1
    done
    return "$rc"
}

# A ping every 200 ms from a container, in the background, until ping_stop.
# ping_start NAME N CONTAINER IP
ping_start() {
    local name="$1" n="$2" c="$3" ip="$4"
    harness_bg "$(harness_host_ns "$n")" "ping-$name" \
        "$HARNESS_DOCKER_CLI" -H "unix://$(harness_host_dir "$n")/docker.sock" \
        exec "$c" ping -i 0.2 "$ip" >"$HARNESS_TMP/ping-$name.bgpid"
}

# ping_stop NAME N CONTAINER - SIGINT the container's ping (it prints its
# statistics), wait for it; prints "sent received missing-seqs".
ping_stop() {
    local name="$1" n="$2" c="$3" pid log sent recv seqs missing
    pid="$(cat "$HARNESS_TMP/ping-$name.bgpid")"
    hdocker "$n" exec "$c" killall -INT ping >/dev/null 2>&1 || true
    _harness_wait 10 eval "! _harness_pid_alive $pid" || kill "$pid" 2>/dev/null || true
    log="$HARNESS_TMP/ping-$name.log"
    read -r sent recv < <(sed -n 's/^\([0-9]*\) packets transmitted, \([0-9]*\) packets received.*/\1 \2/p' "$log" | tail -n 1) || true
    seqs="$(grep -o 'seq=[0-9]*' "$log" | cut -d= -f2 | sort -n | uniq)" || seqs=""
    if [[ -n "$seqs" ]]; then
        missing=$(($(tail -n 1 <<<"$seqs") + 1 - $(grep -c . <<<"$seqs")))
    else
        missing=-1
    fi
    printf '%s %s %s\n' "${sent:-0}" "${recv:-0}" "$missing"
}

# --- boot ---------------------------------------------------------------------
phase "boot: $STORE and three hosts (--host-ttl $HOST_TTL --reclaim-grace $GRACE)"
start_store
STORE_URL="$(store_url)"
STORE_ARGS=()
mapfile -t STORE_ARGS < <(store_serve_args)
for h in "${HOSTS[@]}"; do
    harness_start_host "$h" --store "$STORE_URL" "${STORE_ARGS[@]}" --host-ttl "$HOST_TTL" --reclaim-grace "$GRACE"
    harness_busybox_image "$h"
done
echo "booted in $((SECONDS - T_START))s"

for h in "${HOSTS[@]}"; do
    assert_ok "host $h: create $NET ($NET_SUBNET)" \
        hdocker "$h" network create -d rustoverlay --ipam-driver rustoverlay --subnet "$NET_SUBNET" "$NET"
done
harness_stop_if_failed "network creation failed"

declare -A HOST_OF IP_OF MAC_OF
add_c() {
    local h="$1" c="$2"
    shift 2
    assert_ok "host $h: run $c on $NET $*" run_c "$h" "$c" "$@"
    HOST_OF[$c]=$h
    IP_OF[$c]="$(hcontainer_ip "$h" "$c" "$NET" 2>/dev/null || true)"
    MAC_OF[$c]="$(cmac "$h" "$c" 2>/dev/null || true)"
}
# pa1/pa2 carry the background pings; the others the checks.
for c in pa1 c1a; do add_c 1 "$c"; done
for c in pa2 c2a; do add_c 2 "$c"; done
for c in c3a c3b; do add_c 3 "$c"; done
harness_stop_if_failed "containers did not start"
VNI="$(overlay_vni)"
assert_ok "$NET has a VNI ($VNI)" test "${VNI:-0}" -ge 256
harness_stop_if_failed "no VNI for $NET"

t0=$SECONDS
MESH=(pa1 c1a pa2 c2a c3a c3b)
for src in "${MESH[@]}"; do
    for dst in "${MESH[@]}"; do
        [[ "${HOST_OF[$src]}" != "${HOST_OF[$dst]}" ]] || continue
        assert_eventually "$src (h${HOST_OF[$src]}) pings $dst (h${HOST_OF[$dst]}, ${IP_OF[$dst]})" 15 \
            cping "${HOST_OF[$src]}" "$src" "${IP_OF[$dst]}"
    done
done
echo "full mesh checked in $((SECONDS - t0))s"
harness_stop_if_failed "no full mesh to start from"

# --- 1. host death ------------------------------------------------------------
phase "1. host 3 dies: power loss and cable cut"
ping_start 12 1 pa1 "${IP_OF[pa2]}"
ping_start 21 2 pa2 "${IP_OF[pa1]}"
assert_eventually "the background pings run (pa1 -> pa2, pa2 -> pa1, every 200 ms)" 10 \
    eval "hdocker 1 exec pa1 pidof ping && hdocker 2 exec pa2 pidof ping"
pings_t0=$SECONDS

gone_specs=()
for h in 1 2; do
    for c in c3a c3b; do
        gone_specs+=("$h ${MAC_OF[$c]} ${IP_OF[$c]}")
        assert_ok "before: host $h has FDB + neighbour entries for $c (${MAC_OF[$c]}, ${IP_OF[$c]})" \
            test "$(peer_state "$h" "${MAC_OF[$c]}" "${IP_OF[$c]}")" = "fdb neigh"
    done
done

death_ms="$(now_ms)"
harness_host_link 3 down
harness_crash_host 3
echo "host 3 crashed in $(ms_since "$death_ms") ms (cable cut, every process SIGKILLed)"
assert_fails "host 3's plugin is gone" harness_plugin_pid 3

gone="$(wait_entries gone "$death_ms" "$DROP_LIMIT_S" "${gone_specs[@]}")"
echo "hosts 1 and 2 dropped host 3's entries: $gone ms after the crash (lease expiry at most ${LEASE_MAX_S} s)"
assert_ok "hosts 1 and 2 drop host 3's FDB and neighbour entries (waited up to ${DROP_LIMIT_S} s: ${gone%%:*})" \
    test "${gone%%:*}" != never
for h in 1 2; do
    assert_eventually "host $h's plugin logs host 3's liveness change" 5 \
        eval "plugin_log_since_start $h | grep -q 'host liveness changed.*host=h3.*alive=false'"
done

reclaim_limit=$((LEASE_MAX_S + GRACE + 3))
phase "1b. reclaim: host 3's endpoints and addresses freed after TTL + grace (limit ${reclaim_limit}s)"
assert_ok "the store still holds host 3's endpoints and addresses right after the crash" \
    test -n "$(held_by h3)"
reclaimed=never
while (($(ms_since "$death_ms") <= reclaim_limit * 1000 + 10000)); do
    if [[ -z "$(held_by h3)" ]]; then
        reclaimed="$(ms_since "$death_ms")"
        break
    fi
    sleep 0.5
done
echo "host 3's store entries reclaimed $reclaimed ms after the crash (lease expiry $LEASE_MAX_S s + grace $GRACE s; limit $reclaim_limit s)"
assert_ok "host 3 holds nothing in the store any more ($reclaimed ms)" test "$reclaimed" != never
[[ "$reclaimed" != never ]] || held_by h3 | _harness_indent
assert_ok "not before TTL + grace ($reclaimed ms >= $((GRACE * 1000)))" \
    test "$reclaimed" != never -a "$reclaimed" -ge $((GRACE * 1000))
assert_ok "within lease expiry + grace + 3 s ($reclaimed ms <= $((reclaim_limit * 1000)))" \
    test "$reclaimed" != never -a "$reclaimed" -le $((reclaim_limit * 1000))
reclaimer="$(for h in 1 2; do
    if plugin_log_since_start "$h" | grep -q 'reclaimed a gone host'; then echo "host $h"; fi
done | tr '\n' ' ')"
assert_ok "a surviving host logs 'reclaimed a gone host' (${reclaimer:-none})" test -n "$reclaimer"
for h in 1 2; do plugin_log_since_start "$h" | grep 'reclaimed a gone host' | sed "s/^/    h$h: /" || true; done

reuse_ip="${IP_OF[c3a]}"
assert_ok "host 1: docker run --ip $reuse_ip (host 3's c3a's address) succeeds" run_c 1 r1 --ip "$reuse_ip"
HOST_OF[r1]=1
IP_OF[r1]="$(hcontainer_ip 1 r1 "$NET" 2>/dev/null || true)"
MAC_OF[r1]="$(cmac 1 r1 2>/dev/null || true)"
assert_eq "r1 has the reclaimed address" "$reuse_ip" "${IP_OF[r1]}"
assert_eventually "c2a (h2) pings r1 (h1) at the reclaimed address" 15 cping 2 c2a "$reuse_ip"
assert_eq "host 2 sends r1's MAC (${MAC_OF[r1]}) to host 1's VTEP" "$(harness_host_ip 1)" "$(peer_vtep 2 "${MAC_OF[r1]}")"

pings_s=$((SECONDS - pings_t0))
for spec in "12 1 pa1 pa2" "21 2 pa2 pa1"; do
    read -r name n src dst <<<"$spec"
    read -r sent recv missing < <(ping_stop "$name" "$n" "$src")
    echo "$src (h$n) -> $dst: $sent sent, $recv received, $missing missing sequence numbers over ${pings_s}s"
    assert_ok "$src -> $dst pinged all along (${sent} pings over ${pings_s}s, >= $((pings_s * 5 * 7 / 10)))" \
        test "$sent" -ge $((pings_s * 5 * 7 / 10))
    assert_eq "$src (h$n) -> $dst: no ping lost during host 3's death and reclaim" 0 "$missing"
done
unset "HOST_OF[c3a]" "HOST_OF[c3b]"

# --- 1c. host 3 boots again --------------------------------------------------
phase "1c. host 3 boots again (its dead containers still known to its Docker)"
harness_host_link 3 up
harness_start_host 3 --store "$STORE_URL" "${STORE_ARGS[@]}" --host-ttl "$HOST_TTL" --reclaim-grace "$PART_GRACE"
assert_eventually "host 3 registers again" 15 \
    eval "store_dump | grep -q '^/rustoverlay/v1/hosts/h3 '"
# Docker releases the dead containers' endpoints and addresses at boot: the
# address now held by host 1 (r1) must stay host 1's. Wait until host 3's
# plugin has been asked (and refused: the address is host 1's now).
assert_eventually "host 3's dockerd released its dead containers' addresses" 20 \
    eval "plugin_log_since_start 3 | grep 'IpamDriver.ReleaseAddress' | grep -q 'held by host h1'"
assert_eq "the reclaimed address $reuse_ip is still held by host 1 (r1) after host 3's dockerd cleaned up" \
    "$reuse_ip h1" "$(store_addresses | awk -v ip="$reuse_ip" '$1 == ip')"
assert_empty "host 3 holds no address or endpoint after its boot" \
    "$(held_by h3 | grep -E '/addr/|/ep/' || true)"
# What a freed-by-mistake address leads to: a second container with it.
assert_fails "host 2: docker run --ip $reuse_ip is refused (r1 on host 1 has that address)" \
    run_c 2 dup2 --ip "$reuse_ip"
hdocker 2 rm -f dup2 >/dev/null 2>&1 || true
out="$(hdocker 3 run -d --stop-timeout 1 --network "$NET" --name stale3 "$img" sleep 3600 2>&1)" && rc=0 || rc=$?
echo "docker run on host 3's pre-crash $NET (its network reclaimed meanwhile): exit $rc"
printf '%s\n' "$out" | tail -n 3 | sed 's/^/    /'
hdocker 3 rm -f stale3 c3a c3b >/dev/null 2>&1 || true
assert_ok "host 3: remove its pre-crash $NET" hdocker 3 network rm "$NET"
assert_ok "host 3: create $NET again" \
    hdocker 3 network create -d rustoverlay --ipam-driver rustoverlay --subnet "$NET_SUBNET" "$NET"
add_c 3 c3n

phase "hosts 1 and 2: plugin restarted with --reclaim-grace $PART_GRACE for the partition"
failed_before=$HARNESS_FAILED
for h in 1 2; do
    harness_set_plugin_args "$h" --store "$STORE_URL" "${STORE_ARGS[@]}" --host-ttl "$HOST_TTL" --reclaim-grace "$PART_GRACE"
    harness_kill_plugin "$h" TERM
    harness_restart_plugin "$h"
done
for pair in "1 c1a c3n" "2 c2a c3n" "3 c3n c1a" "3 c3n c2a" "3 c3n r1" "1 c1a c2a" "2 c2a c1a"; do
    read -r n src dst <<<"$pair"
    assert_eventually "$src (h$n) pings $dst (h${HOST_OF[$dst]})" 15 cping "$n" "$src" "${IP_OF[$dst]}"
done
assert_eventually "every host's FDB/neighbour entries are exactly the other hosts' live containers" 10 \
    all_entries_match
if ((HARNESS_FAILED > failed_before)); then
    printf 'stopping: three working hosts are needed for the partition\n'
    harness_summary || exit 1
fi

# --- 2. partition -------------------------------------------------------------
phase "2. host 2 cut off from the store for ${CUT_S}s (iptables in host 2's namespace; hosts still reach each other)"
keys_before="$(alloc_keys)"
part_specs=()
for h in 1 3; do
    for c in pa2 c2a; do part_specs+=("$h ${MAC_OF[$c]} ${IP_OF[$c]}"); done
done
cut_ms="$(now_ms)"
harness_host_block 2 "$(store_ip)"
(
    t="$(now_ms)"
    rc=0
    timeout 120 "$HARNESS_DOCKER_CLI" -H "unix://$(harness_host_dir 2)/docker.sock" \
        run -d --stop-timeout 1 --network "$NET" --name cut2 "$img" sleep 3600 >"$HARNESS_TMP/cut2.out" 2>&1 || rc=$?
    echo "$rc $(ms_since "$t")" >"$HARNESS_TMP/cut2.rc"
) &
cut_run_pid=$!
assert_ok "host 2 still reaches host 1 on the underlay during the cut" hexec 2 busybox ping -c 1 -W 2 "$(harness_host_ip 1)"
dropped="$(wait_entries gone "$cut_ms" "$DROP_LIMIT_S" "${part_specs[@]}")"
echo "hosts 1 and 3 dropped host 2's entries $dropped ms after the cut (expected: its lease expired, at most ${LEASE_MAX_S} s)"
assert_ok "hosts 1 and 3 drop host 2's entries once its lease expires (waited up to ${DROP_LIMIT_S} s: ${dropped%%:*})" \
    test "${dropped%%:*}" != never
assert_fails "during the cut c1a (h1) does not reach c2a (h2) (expected: host 2 looks gone)" cping 1 c1a "${IP_OF[c2a]}"
wait "$cut_run_pid" || true
read -r cut_rc cut_run_ms <"$HARNESS_TMP/cut2.rc"
cut_out="$(cat "$HARNESS_TMP/cut2.out")"
echo "docker run on host 2 during the cut: exit $cut_rc after $cut_run_ms ms"
printf '%s\n' "$cut_out" | tail -n 3 | sed 's/^/    /'
assert_ok "docker run on host 2 fails during the cut (exit $cut_rc)" test "$cut_rc" -ne 0 -a "$cut_rc" -ne 124
assert_ok "in bounded time ($cut_run_ms ms <= 30000)" test "$cut_run_ms" -le 30000
assert_ok "with a store error" eval 'grep -Eq "store is running and reachable|lost its store registration" <<<"$cut_out"'
assert_eq "it allocated nothing (address and endpoint keys unchanged)" "$keys_before" "$(alloc_keys)"
kept=never
while true; do
    if [[ "$kept" == never ]] && for h in 1 3; do plugin_log_since_start "$h"; done | grep 'keeping its addresses' | grep -q 'host=h2'; then
        kept="$(ms_since "$cut_ms")"
    fi
    (($(ms_since "$cut_ms") < CUT_S * 1000)) || break
    sleep 0.2
done
echo "the reaper decided to keep host 2's addresses $kept ms after the cut (its machine answers)"
assert_ok "past lease expiry + grace, the reaper keeps host 2's addresses: its machine answers ($kept ms)" \
    test "$kept" != never
assert_fails "host 1: docker run --ip ${IP_OF[c2a]} (c2a's, on cut-off host 2) is refused" \
    run_c 1 steal1 --ip "${IP_OF[c2a]}"
hdocker 1 rm -f steal1 >/dev/null 2>&1 || true
assert_fails "host 2's lease is gone from the store" eval "store_dump | grep -q '^/rustoverlay/v1/hosts/h2 '"
heal_ms="$(now_ms)"
harness_host_unblock 2 "$(store_ip)"
echo "cut lasted $((heal_ms - cut_ms)) ms"

phase "2b. host 2 reconnects: re-registers, reconciles, its entries come back"
recon=never
while (($(ms_since "$heal_ms") <= 40000)); do
    if plugin_log_since_start 2 | grep -q 'reconciled after the lease loss'; then
        recon="$(ms_since "$heal_ms")"
        break
    fi
    sleep 0.2
done
echo "host 2 reconciled $recon ms after the cut ended"
assert_ok "host 2's plugin logs 'reconciled after the lease loss' ($recon ms)" test "$recon" != never
plugin_log_since_start 2 | grep -E 'lease expired|reconciled after the lease loss|host registered' | tail -n 4 | sed 's/^/    /' || true
back="$(wait_entries present "$heal_ms" 30 "${part_specs[@]}")"
echo "hosts 1 and 3 have host 2's entries again $back ms after the cut ended"
assert_ok "hosts 1 and 3 re-add host 2's entries ($back ms)" test "${back%%:*}" != never
for pair in "2 c2a c1a" "2 c2a c3n" "2 c2a r1" "1 c1a c2a" "3 c3n c2a" "1 pa1 pa2" "2 pa2 pa1"; do
    read -r n src dst <<<"$pair"
    assert_eventually "after the cut: $src (h$n) pings $dst (h${HOST_OF[$dst]})" 15 cping "$n" "$src" "${IP_OF[$dst]}"
done
hdocker 2 rm -f cut2 >/dev/null 2>&1 || true
add_c 2 c2n
for pair in "2 c2n c1a" "2 c2n c3n" "1 c1a c2n" "3 c3n c2n"; do
    read -r n src dst <<<"$pair"
    assert_eventually "new container: $src (h$n) pings $dst (h${HOST_OF[$dst]})" 15 cping "$n" "$src" "${IP_OF[$dst]}"
done

CONTAINERS_NOW="$(containers_on "${HOSTS[@]}")"
echo "containers on $NET (host name ip mac):"
printf '%s\n' "$CONTAINERS_NOW" | sed 's/^/    /'
assert_empty "no address is held by two containers" "$(awk '{ print $3 }' <<<"$CONTAINERS_NOW" | sort | uniq -d)"
assert_eq "the store's addresses are exactly the containers' (address holder)" \
    "$(awk '{ print $3, "h" $1 }' <<<"$CONTAINERS_NOW" | sort -V)" "$(store_addresses)"
assert_eventually "no stale entry: every host's FDB/neighbour entries are exactly the other hosts' live containers" 10 \
    all_entries_match
assert_eq "nothing of host 2 was reclaimed (cut off past TTL + grace $PART_GRACE s): c2a's address still host 2's" \
    "${IP_OF[c2a]} h2" "$(store_addresses | awk -v ip="${IP_OF[c2a]}" '$1 == ip')"

# --- 3. teardown --------------------------------------------------------------
phase "3. remove everything; nothing is left"
for h in "${HOSTS[@]}"; do
    ids="$(hdocker "$h" ps -aq)"
    # shellcheck disable=SC2086 # one id per word
    [[ -z "$ids" ]] || assert_ok "host $h: remove all containers" hdocker "$h" rm -f $ids
done
for h in "${HOSTS[@]}"; do
    assert_ok "host $h: remove $NET" hdocker "$h" network rm "$NET"
done
for h in "${HOSTS[@]}"; do
    assert_empty "host $h: no rustoverlay network left in Docker" \
        "$(hdocker "$h" network ls -q --filter driver=rustoverlay)"
    assert_empty "host $h: no overlay namespace left" "$(ovl_namespaces "$h")"
    assert_empty "host $h: no ro-*/rc-* link left in its namespace" "$(host_ro_links "$h")"
    assert_ok "host $h: the plugin is still running" harness_plugin_pid "$h"
done
store_assert_empty

echo "total time: $((SECONDS - T_START))s"
harness_summary
