#!/usr/bin/env bash
# Prometheus metrics (`serve --metrics-addr`) on two simulated hosts on etcd:
# the exposition passes `promtool check metrics`, and known traffic moves
# the counters by exactly that much: N `docker run`s (requests per method,
# allocations, every store call they cause attributed to Docker), M scrapes
# (each makes a known number of store reads), N removals (releases). The
# state gauges (endpoints per overlay, pool usage, live hosts) match Docker.
set -euo pipefail
cd "$(dirname "$0")/../.."
# shellcheck source=tests/lib/harness.sh
source tests/lib/harness.sh

harness_init metrics
T_START=$SECONDS
img="$HARNESS_IMAGE"
NET=appnet
SUBNET=10.77.0.0/24
OVERLAY=10.77.0.0_24
POOL="$SUBNET"
ADDR=127.0.0.1:9653
N=4
M=3

# scrape H - the metrics text of host H's plugin (from the host's own
# namespace; bash's /dev/tcp, no curl needed).
scrape() {
    # shellcheck disable=SC2016 # expanded by the inner bash
    hexec "$1" timeout 5 bash -c '
        exec 3<>"/dev/tcp/${0%:*}/${0#*:}" || exit 1
        printf "GET /metrics HTTP/1.0\r\nHost: %s\r\n\r\n" "$0" >&3
        cat <&3' "$ADDR" | tr -d '\r' | sed '1,/^$/d'
}

# value TEXT NAME [LABEL=VALUE...] - the sum of NAME's samples that carry
# every given label (0 when none does).
value() {
    local text="$1" name="$2"
    shift 2
    printf '%s\n' "$text" | awk -v name="$name" -v want="$*" '
        BEGIN { n = split(want, w, " ") }
        $0 !~ /^#/ {
            split($0, parts, /[{ ]/)
            if (parts[1] != name) next
            ok = 1
            for (i = 1; i <= n; i++) {
                split(w[i], kv, "=")
                if (index($0, kv[1] "=\"" kv[2] "\"") == 0) ok = 0
            }
            if (ok) sum += $NF
        }
        END { printf "%d\n", sum }'
}

delta() { echo $(($(value "$2" "${@:3}") - $(value "$1" "${@:3}"))); }

phase "boot: etcd and two hosts with --metrics-addr $ADDR"
harness_shared_store_start etcd
store="$(harness_shared_store_url etcd)"
for h in 1 2; do
    harness_start_host "$h" --store "$store" --metrics-addr "$ADDR"
    harness_busybox_image "$h"
    assert_ok "host $h: create $NET" \
        hdocker "$h" network create -d rustoverlay --ipam-driver rustoverlay --subnet "$SUBNET" "$NET"
done
assert_ok "host 2: run r1" hdocker 2 run -d --network "$NET" --name r1 "$img" sleep 3600
assert_ok "host 2: run r2" hdocker 2 run -d --network "$NET" --name r2 "$img" sleep 3600
harness_stop_if_failed "setup failed"

phase "the exposition is valid"
m0="$(scrape 1)"
assert_ok "host 1 answers /metrics" test -n "$m0"
lint="$(printf '%s\n' "$m0" | promtool check metrics 2>&1)" && rc=0 || rc=$?
printf '%s\n' "$lint" | sed 's/^/    promtool: /'
assert_eq "promtool check metrics: no error, no lint warning (exit $rc)" "0" "$rc"
assert_eq "build info: one sample, value 1" 1 "$(value "$m0" rustoverlay_build_info)"
assert_eq "two hosts alive" 2 "$(value "$m0" rustoverlay_hosts_alive)"
# Counters that alerts take increase() of exist at 0 before their first event:
# a series born at 1 shows no increase.
for series in 'rustoverlay_lease_renewals_total{outcome="failed"} 0' \
    'rustoverlay_docker_requests_total{method="NetworkDriver.Join",outcome="error"} 0' \
    'rustoverlay_store_calls_total{op="keep_alive",outcome="timeout",source="background"} 0' \
    'rustoverlay_reclaims_total 0'; do
    assert_eq "before any failure: $series" 1 "$(printf '%s\n' "$m0" | grep -cxF "$series" || true)"
done
# Renewed every --host-ttl / 3 (3.3 s by default).
renewed() { [[ "$(value "$(scrape 1)" rustoverlay_lease_renewals_total outcome=ok)" -ge 1 ]]; }
assert_eventually "the lease was renewed (counted)" 10 renewed

phase "$N docker runs on host 1 move the counters by exactly $N"
lag0="$(value "$(scrape 2)" rustoverlay_peer_sync_lag_seconds_count)"
b="$(scrape 1)"
for i in $(seq 1 "$N"); do
    assert_ok "host 1: run c$i" hdocker 1 run -d --network "$NET" --name "c$i" "$img" sleep 3600
done
a="$(scrape 1)"
for method in NetworkDriver.CreateEndpoint NetworkDriver.Join IpamDriver.RequestAddress; do
    assert_eq "$method ok: +$N" "$N" \
        "$(delta "$b" "$a" rustoverlay_docker_requests_total method="$method" outcome=ok)"
    assert_eq "$method answered $N times (latency histogram count)" "$N" \
        "$(delta "$b" "$a" rustoverlay_docker_request_duration_seconds_count method="$method")"
done
assert_eq "no request failed" 0 "$(delta "$b" "$a" rustoverlay_docker_requests_total outcome=error)"
assert_eq "container addresses allocated in $POOL: +$N" "$N" \
    "$(delta "$b" "$a" rustoverlay_ipam_allocations_total pool="$POOL" kind=container)"
docker_calls="$(delta "$b" "$a" rustoverlay_store_calls_total source=docker)"
per_request="$(delta "$b" "$a" rustoverlay_docker_request_store_calls_sum)"
echo "store calls caused by the $N runs: $docker_calls"
assert_ok "the runs made store calls ($docker_calls)" test "$docker_calls" -gt 0
assert_eq "every store call of a Docker request is counted once, under source=docker" \
    "$per_request" "$docker_calls"
assert_eq "endpoints on $OVERLAY seen from host 1: $N local" "$N" \
    "$(value "$a" rustoverlay_endpoints overlay="$OVERLAY" location=local)"
assert_eq "endpoints on $OVERLAY seen from host 1: 2 remote" 2 \
    "$(value "$a" rustoverlay_endpoints overlay="$OVERLAY" location=remote)"
# Gateway, r1, r2, c1..cN: what Docker shows.
in_docker=$((1 + $(hdocker 1 network inspect -f '{{len .Containers}}' "$NET") + \
    $(hdocker 2 network inspect -f '{{len .Containers}}' "$NET")))
assert_eq "pool used = gateway + containers on both hosts ($in_docker)" "$in_docker" \
    "$(value "$a" rustoverlay_pool_used_addresses pool="$POOL")"
assert_eq "pool size = 254" 254 "$(value "$a" rustoverlay_pool_size_addresses pool="$POOL")"
lag_count() { value "$(scrape 2)" rustoverlay_peer_sync_lag_seconds_count; }
lag_moved() { [[ $(($(lag_count) - lag0)) -ge "$N" ]]; }
assert_eventually "host 2 put the $N new remote endpoints in its kernel" 10 lag_moved
assert_eq "peer-sync lag observed once per new remote endpoint on host 2" "$N" $(($(lag_count) - lag0))

phase "$M scrapes make exactly $M x 4 store reads (networks, endpoints, pool record, pool addresses)"
s0="$(scrape 1)"
for _ in $(seq 2 "$M"); do scrape 1 >/dev/null; done
s1="$(scrape 1)"
assert_eq "store calls of source=scrape: +$((M * 4))" $((M * 4)) \
    "$(delta "$s0" "$s1" rustoverlay_store_calls_total source=scrape)"
assert_eq "no scrape caused a Docker-attributed call" 0 \
    "$(delta "$s0" "$s1" rustoverlay_store_calls_total source=docker)"

phase "removing the $N containers releases exactly $N addresses"
b="$(scrape 1)"
for i in $(seq 1 "$N"); do assert_ok "host 1: remove c$i" hdocker 1 rm -f "c$i"; done
a="$(scrape 1)"
assert_eq "IpamDriver.ReleaseAddress ok: +$N" "$N" \
    "$(delta "$b" "$a" rustoverlay_docker_requests_total method=IpamDriver.ReleaseAddress outcome=ok)"
assert_eq "NetworkDriver.DeleteEndpoint ok: +$N" "$N" \
    "$(delta "$b" "$a" rustoverlay_docker_requests_total method=NetworkDriver.DeleteEndpoint outcome=ok)"
assert_eq "releases in $POOL: +$N" "$N" "$(delta "$b" "$a" rustoverlay_ipam_releases_total pool="$POOL")"
assert_eq "endpoints on $OVERLAY seen from host 1: 0 local" 0 \
    "$(value "$a" rustoverlay_endpoints overlay="$OVERLAY" location=local)"
assert_eq "pool used = gateway + r1 + r2" 3 "$(value "$a" rustoverlay_pool_used_addresses pool="$POOL")"

phase "a refused request counts as an error"
b="$(scrape 1)"
assert_fails "host 1: docker run --ip <the gateway> is refused" \
    hdocker 1 run -d --network "$NET" --ip 10.77.0.1 --name bad "$img" sleep 1
hdocker 1 rm -f bad >/dev/null 2>&1 || true
a="$(scrape 1)"
assert_ok "some request answered with an error" \
    test "$(delta "$b" "$a" rustoverlay_docker_requests_total outcome=error)" -ge 1

phase "the Grafana dashboard's queries are valid PromQL (promtool check rules)"
# A rules file is YAML, and JSON is YAML: one recording rule per query.
rules="$HARNESS_TMP/dashboard-rules.yml"
jq '{groups: [{name: "dashboard", rules: ([.panels[].targets[].expr] | to_entries |
        map({record: "dashboard:q\(.key)", expr: (.value | gsub("\\$__rate_interval"; "1m"))}))}]}' \
    examples/grafana/rustoverlay-dashboard.json >"$rules"
assert_ok "the dashboard has queries" test "$(jq '.groups[0].rules | length' "$rules")" -ge 10
assert_ok "promtool check rules accepts every dashboard query" promtool check rules "$rules"

phase "teardown"
assert_ok "host 2: remove r1 r2" hdocker 2 rm -f r1 r2
for h in 1 2; do assert_ok "host $h: remove $NET" hdocker "$h" network rm "$NET"; done
assert_store_empty etcd
echo "total time: $((SECONDS - T_START))s"
harness_summary
