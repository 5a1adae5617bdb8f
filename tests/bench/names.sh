#!/usr/bin/env bash
# Benchmark (prints figures, asserts nothing): how long a name lookup takes
# in a container on a rustoverlay network, for
#   - a same-host name, answered by Docker's embedded DNS alone (baseline),
#   - a remote name, which dockerd forwards to the plugin's resolver,
#   - an outside name, which the resolver relays to the upstream,
# and from a container on Docker's default bridge, an outside name through
# the host's resolver and, for comparison, straight to the upstream. Two simulated hosts on etcd, dockerd --dns
# 169.254.53.53, dnsmasq as the upstream. Each figure is one `docker exec`
# running ROBENCH_QUERIES lookups (busybox nslookup), divided by their count,
# so exec's own cost is spread; rounds of the four are interleaved.
#   ROBENCH_QUERIES  lookups per measurement (default 200)
#   ROBENCH_ROUNDS   measurements per kind (default 5)
set -euo pipefail
cd "$(dirname "$0")/../.."
# shellcheck source=tests/lib/harness.sh
source tests/lib/harness.sh
# shellcheck source=tests/lib/figures.sh
source tests/lib/figures.sh
harness_init bench_names
# shellcheck source=tests/lib/scenarios.sh
source tests/lib/scenarios.sh

queries="${ROBENCH_QUERIES:-200}"
rounds="${ROBENCH_ROUNDS:-5}"
DNS=169.254.53.53

harness_bg "$(harness_world_ns)" dnsmasq dnsmasq --no-daemon --conf-file=/dev/null --no-resolv --no-hosts \
    --pid-file= --user=root --domain-needed --local=/#/ --listen-address="$HARNESS_WORLD_IP" --bind-interfaces --port=53 \
    --host-record=outside.test,192.0.2.10 >/dev/null
harness_start_etcd
for h in 1 2; do
    sc_dockerd_config "$h" "\"dns\": [\"$DNS\"]"
    harness_start_host "$h" --store "$(harness_etcd_url)" --dns-upstream "$HARNESS_WORLD_IP"
    harness_busybox_image "$h"
    sc_net_create "$h" appnet --subnet 10.85.0.0/24 >/dev/null
done
sc_run 1 remote appnet >/dev/null
sc_run 2 near appnet >/dev/null
sc_run 2 client appnet >/dev/null
hdocker 2 run -d --stop-timeout 1 --name bridged "$HARNESS_IMAGE" sleep 3600 >/dev/null
# Wait until each name resolves once.
for pair in "client near" "client remote" "client outside.test" "bridged outside.test"; do
    read -r c name <<<"$pair"
    for _ in $(seq 100); do
        hdocker 2 exec "$c" nslookup -type=a "$name" >/dev/null 2>&1 && break
        sleep 0.1
    done
done

# per_query CONTAINER NAME [SERVER] - microseconds per lookup over $queries
# lookups (through the container's resolv.conf, or SERVER).
per_query() {
    local t0 t1
    t0="$(date +%s%N)"
    hdocker 2 exec "$1" sh -c "i=0; while [ \$i -lt $queries ]; do nslookup -type=a $2 ${3:-} >/dev/null || exit 1; i=\$((i+1)); done"
    t1="$(date +%s%N)"
    echo $(((t1 - t0) / 1000 / queries))
}

declare -a local_ remote_ outside_ bridge_ direct_
for ((r = 0; r < rounds; r++)); do
    local_+=("$(per_query client near)")
    remote_+=("$(per_query client remote)")
    outside_+=("$(per_query client outside.test)")
    bridge_+=("$(per_query bridged outside.test)")
    direct_+=("$(per_query bridged outside.test "$HARNESS_WORLD_IP")")
done

median() { printf '%s\n' "$@" | sort -n | awk '{ v[NR] = $1 } END { print v[int((NR + 1) / 2)] }'; }
ml="$(median "${local_[@]}")"
mr="$(median "${remote_[@]}")"
mo="$(median "${outside_[@]}")"
mb="$(median "${bridge_[@]}")"
md="$(median "${direct_[@]}")"
engine="Docker $(hdocker 1 version --format '{{.Server.Version}}')"
printf 'name lookup on %s, median of %s x %s lookups, per lookup (docker exec and busybox nslookup included):\n' "$engine" "$rounds" "$queries"
printf '  same-host name (Docker embedded DNS, baseline)   %6d us\n' "$ml"
printf '  remote name (dockerd -> rustoverlay resolver)    %6d us   %s x baseline\n' "$mr" "$(awk -v a="$mr" -v b="$ml" 'BEGIN { printf "%.2f", a / b }')"
printf '  outside name (dockerd -> resolver -> upstream)   %6d us   %s x baseline\n' "$mo" "$(awk -v a="$mo" -v b="$ml" 'BEGIN { printf "%.2f", a / b }')"
printf '  outside name, default bridge (host resolver)     %6d us   %s x baseline\n' "$mb" "$(awk -v a="$mb" -v b="$ml" 'BEGIN { printf "%.2f", a / b }')"
printf '  outside name, default bridge, straight upstream %6d us   %s x baseline (what the bridge had without the dns setting)\n' "$md" "$(awk -v a="$md" -v b="$ml" 'BEGIN { printf "%.2f", a / b }')"
base="same-host name (Docker's embedded DNS alone)"
bench_figure names "lookup on $engine of a remote name (dockerd -> rustoverlay resolver)" "$mr" us "$base" "$ml"
bench_figure names "lookup on $engine of an outside name (dockerd -> resolver -> upstream)" "$mo" us "$base" "$ml"
bench_figure names "lookup on $engine of an outside name, default bridge (host resolver)" "$mb" us "$base" "$ml"
bench_figure names "lookup on $engine of an outside name, default bridge, straight upstream" "$md" us "$base" "$ml"
harness_summary >/dev/null 2>&1 || true
