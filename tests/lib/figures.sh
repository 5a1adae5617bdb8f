# shellcheck shell=bash
# Sourced by the shell benchmarks (tests/bench/*.sh): records a figure they
# print as one JSON line in $ROBENCH_OUT, the file the Rust benchmarks append
# to (plugin/benches/common/figures.rs has the schema); without ROBENCH_OUT
# nothing is written. Lives here, not in tests/bench, because scripts/bench
# runs every tests/bench/*.sh.

# _figure_json_string S - S as a JSON string (the names here hold no control
# characters; backslashes and quotes are escaped).
_figure_json_string() {
    local s="${1//\\/\\\\}"
    printf '"%s"' "${s//\"/\\\"}"
}

# bench_figure BENCH FIGURE VALUE UNIT [BASELINE_WHAT BASELINE_VALUE] - the
# baseline, in the figure's unit, is one measured in the same run. A value
# that is not a plain decimal number fails (set -e: the benchmark with it):
# a broken figure must not slip into the results as a broken line.
bench_figure() {
    [[ -n "${ROBENCH_OUT:-}" ]] || return 0
    local n baseline=null
    for n in "$3" "${@:6:1}"; do
        if [[ ! "$n" =~ ^-?(0|[1-9][0-9]*)(\.[0-9]+)?$ ]]; then
            echo "bench_figure: $2: not a number: '$n'" >&2
            return 1
        fi
    done
    if (($# >= 6)); then
        baseline="{\"what\": $(_figure_json_string "$5"), \"value\": $6}"
    fi
    printf '{"bench": %s, "figure": %s, "value": %s, "unit": %s, "baseline": %s, "goal": null}\n' \
        "$(_figure_json_string "$1")" "$(_figure_json_string "$2")" "$3" \
        "$(_figure_json_string "$4")" "$baseline" >>"$ROBENCH_OUT"
}
