#!/usr/bin/env bash
# Benchmark (prints figures, asserts nothing): `docker run` time on a
# rustoverlay network against Docker's own bridge network, on one simulated
# host, measured in the same run with runs interleaved so both see the same
# machine load.
#   ROBENCH_RUNS  runs per network and case (default 20)
set -euo pipefail
cd "$(dirname "$0")/../.."
# shellcheck source=tests/lib/harness.sh
source tests/lib/harness.sh
# shellcheck source=tests/lib/figures.sh
source tests/lib/figures.sh

runs="${ROBENCH_RUNS:-20}"
harness_init bench_run
# The plugin's default linger: devices outlive a network's last container by
# 60 s, so every run after the first finds them (what a host running
# containers sees).
harness_start_host 1 --linger 60 --metrics-addr 127.0.0.1:9653
harness_busybox_image 1
img="$HARNESS_IMAGE"
engine="Docker $(hdocker 1 version --format '{{.Server.Version}}')"

hdocker 1 network create -d rustoverlay --ipam-driver rustoverlay --subnet 10.77.0.0/24 ronet >/dev/null
hdocker 1 network create -d bridge --subnet 10.88.0.0/24 brnet >/dev/null
# Warm both paths once (image layers, docker_gwbridge creation).
hdocker 1 run --rm --network ronet "$img" true
hdocker 1 run --rm --network brnet "$img" true

ms_now() { echo $(($(date +%s%N) / 1000000)); }

stats() { # prints "median p90 mean" of the arguments (ms)
    printf '%s\n' "$@" | sort -n | awk '{ v[NR] = $1; s += $1 }
        END { m = v[int((NR + 1) / 2)]; p = v[int(NR * 0.9 + 0.5)]; printf "%d %d %.0f\n", m, p, s / NR }'
}

scrape() { hexec 1 curl -fsS http://127.0.0.1:9653/metrics; }

# breakdown BEFORE AFTER - per Docker call the plugin answered between two
# scrapes: how many, mean time, store round trips per call (one line each).
breakdown() {
    printf '%s\n--\n%s\n' "$1" "$2" | awk '
        /^--$/ { after = 1; next }
        /^rustoverlay_docker_request_(duration_seconds|store_calls)_(sum|count)\{/ {
            match($0, /method="[^"]*"/); m = substr($0, RSTART + 8, RLENGTH - 9)
            k = $1; sub(/\{.*/, "", k); v[k, m] += (after ? $NF : -$NF); seen[m] = 1
        }
        END {
            for (m in seen) {
                n = v["rustoverlay_docker_request_duration_seconds_count", m]
                if (n < 1) continue
                printf "%-42s %6d %9.2f %12.1f\n", m, n,
                    1000 * v["rustoverlay_docker_request_duration_seconds_sum", m] / n,
                    v["rustoverlay_docker_request_store_calls_sum", m] / n
            }
        }' | sort
}

# interleaved LABEL [PAUSE_S] - `runs` pairs of `docker run --rm` on ronet
# and brnet, one after the other (PAUSE_S seconds before each pair), and
# their figures.
interleaved() {
    local label="$1" pause="${2:-0}" i net t0 t1 ro_med ro_p90 ro_mean br_med br_p90 br_mean
    local -a ro=() br=()
    local m0
    m0="$(scrape)"
    for ((i = 0; i < runs; i++)); do
        sleep "$pause"
        for net in ronet brnet; do
            t0="$(ms_now)"
            hdocker 1 run --rm --network "$net" "$img" true
            t1="$(ms_now)"
            if [[ "$net" == ronet ]]; then ro+=($((t1 - t0))); else br+=($((t1 - t0))); fi
        done
    done
    read -r ro_med ro_p90 ro_mean <<<"$(stats "${ro[@]}")"
    read -r br_med br_p90 br_mean <<<"$(stats "${br[@]}")"
    printf '\n%s: docker run --rm IMAGE true, %d interleaved pairs, one simulated host, %s\n' "$label" "$runs" "$engine"
    printf '%-28s %10s %10s %10s\n' network "median ms" "p90 ms" "mean ms"
    printf '%-28s %10d %10d %10s\n' "rustoverlay (embedded store)" "$ro_med" "$ro_p90" "$ro_mean"
    printf '%-28s %10d %10d %10s\n' "Docker bridge (baseline)" "$br_med" "$br_p90" "$br_mean"
    awk -v a="$ro_med" -v b="$br_med" 'BEGIN { printf "ratio rustoverlay/bridge (median): %.2fx\n", a / b }'
    local what="docker run --rm on $engine, $label"
    bench_figure docker_run "$what: median" "$ro_med" ms "Docker bridge network, median" "$br_med"
    bench_figure docker_run "$what: p90" "$ro_p90" ms "Docker bridge network, p90" "$br_p90"
    bench_figure docker_run "$what: mean" "$ro_mean" ms "Docker bridge network, mean" "$br_mean"
    echo "where the plugin's share went (its own metrics):"
    printf '%-42s %6s %9s %12s\n' "plugin call" calls "mean ms" "store trips"
    local rows method n mean trips
    rows="$(breakdown "$m0" "$(scrape)")"
    printf '%s\n' "$rows"
    while read -r method n mean trips; do
        bench_figure docker_run "$what: the plugin's $method, mean" "$mean" ms
        bench_figure docker_run "$what: the plugin's $method, store round trips" "$trips" "round trips"
    done <<<"$rows"
}

interleaved "later containers (devices lingering, --linger 60)"
# Every run the host's first container on the network, as users get it: the
# devices are built for it, and removed off the critical path (a 1 s linger,
# over before the next pair, 1.5 s later).
harness_set_plugin_args 1 --linger 1 --metrics-addr 127.0.0.1:9653
harness_restart_plugin 1
interleaved "first container (devices built each run, removed 1 s after it, --linger 1)" 1.5
# The same with the removal on Docker's path, as before --linger.
harness_set_plugin_args 1 --linger 0 --metrics-addr 127.0.0.1:9653
harness_restart_plugin 1
interleaved "first container (devices built and removed each run, --linger 0)"
assert_ok "benchmark networks removed" hdocker 1 network rm ronet brnet
harness_summary
