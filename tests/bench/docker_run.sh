#!/usr/bin/env bash
# Benchmark (prints figures, asserts nothing): `docker run` time on a
# rustoverlay network against Docker's own bridge network, on one simulated
# host, measured in the same run with runs interleaved so both see the same
# machine load.
#   ROBENCH_RUNS  runs per network (default 20)
set -euo pipefail
cd "$(dirname "$0")/../.."
# shellcheck source=tests/lib/harness.sh
source tests/lib/harness.sh

runs="${ROBENCH_RUNS:-20}"
harness_init bench_run
harness_start_host 1
harness_busybox_image 1
img="$HARNESS_IMAGE"

hdocker 1 network create -d rustoverlay --ipam-driver rustoverlay --subnet 10.77.0.0/24 ronet >/dev/null
hdocker 1 network create -d bridge --subnet 10.88.0.0/24 brnet >/dev/null
# Warm both paths once (image layers, docker_gwbridge creation).
hdocker 1 run --rm --network ronet "$img" true
hdocker 1 run --rm --network brnet "$img" true

ms_now() { echo $(($(date +%s%N) / 1000000)); }

declare -a ro br
for ((i = 0; i < runs; i++)); do
    for net in ronet brnet; do
        t0="$(ms_now)"
        hdocker 1 run --rm --network "$net" "$img" true
        t1="$(ms_now)"
        if [[ "$net" == ronet ]]; then ro+=($((t1 - t0))); else br+=($((t1 - t0))); fi
    done
done

stats() { # prints "median p90 mean" of the arguments (ms)
    printf '%s\n' "$@" | sort -n | awk '{ v[NR] = $1; s += $1 }
        END { m = v[int((NR + 1) / 2)]; p = v[int(NR * 0.9 + 0.5)]; printf "%d %d %.0f\n", m, p, s / NR }'
}
read -r ro_med ro_p90 ro_mean <<<"$(stats "${ro[@]}")"
read -r br_med br_p90 br_mean <<<"$(stats "${br[@]}")"
printf '\ndocker run --rm IMAGE true, %d runs per network, one simulated host\n' "$runs"
printf '%-28s %10s %10s %10s\n' network "median ms" "p90 ms" "mean ms"
printf '%-28s %10d %10d %10s\n' "rustoverlay (embedded store)" "$ro_med" "$ro_p90" "$ro_mean"
printf '%-28s %10d %10d %10s\n' "Docker bridge (baseline)" "$br_med" "$br_p90" "$br_mean"
awk -v a="$ro_med" -v b="$br_med" 'BEGIN { printf "ratio rustoverlay/bridge (median): %.2fx\n", a / b }'
assert_ok "benchmark networks removed" hdocker 1 network rm ronet brnet
harness_summary
