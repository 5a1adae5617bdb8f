#!/usr/bin/env bash
# scripts/demo as a newcomer runs it: it shows the cross-host traffic (a
# ping by name from host 2 to host 1, an HTTP answer from host 1 to host 3)
# and `rustoverlay status`, and leaves no namespace, process, mount or
# directory behind; nor does it when interrupted with Ctrl-C (SIGINT)
# halfway. It runs the demo's default engine (Docker 20.10) in either
# engine's loop, so scripts/test runs it once.
set -euo pipefail
cd "$(dirname "$0")/../.."
# shellcheck source=tests/lib/harness.sh
source tests/lib/harness.sh

T_START=$SECONDS

# leftovers - anything of a demo run still on the machine.
leftovers() {
    {
        ls -d /tmp/rot-demo.* 2>/dev/null || true
        ip netns list 2>/dev/null | grep '^rot-demo' || true
        grep 'rot-demo' /proc/mounts || true
        pgrep -af 'rot-demo' | grep -v -e pgrep -e 'tests/docker/demo.sh' || true
    } | sed 's/^/    /'
}

assert_empty "no demo run left over from before" "$(leftovers)"

phase "scripts/demo, to its end"
rc=0
# As a newcomer runs it: the default engine, whatever the caller's.
out="$(timeout 600 env -u HARNESS_ENGINE -u HARNESS_COMPOSE scripts/demo 2>&1)" || rc=$?
printf '%s\n' "$out" | sed 's/^/    | /' | tail -n 60
assert_eq "scripts/demo exits 0" 0 "$rc"
assert_contains "host 2 pings web on host 1 by name" "3 packets transmitted, 3 packets received" "$out"
assert_contains "host 3 gets web's page over HTTP" "hello from web on host 1" "$out"
assert_contains "it prints rustoverlay status with the three hosts" "h3    alive" "$out"
assert_contains "status says host 1's kernel is in step" "kernel in step with the store" "$out"
assert_empty "nothing left: namespaces, mounts, processes, directories" "$(leftovers)"

phase "scripts/demo interrupted with Ctrl-C once its hosts run"
log="$(mktemp)"
setsid timeout 600 env -u HARNESS_ENGINE -u HARNESS_COMPOSE scripts/demo >"$log" 2>&1 &
demo=$!
started() { grep -c 'on every host: docker network create' "$log" >/dev/null; }
assert_eventually "the demo reached its network step" 300 started
kill -INT -- "-$demo" 2>/dev/null || kill -INT "$demo"
rc=0
wait "$demo" || rc=$?
assert_ok "it ended on the signal (exit $rc)" test "$rc" -ne 0
no_leftovers() { [[ -z "$(leftovers)" ]]; }
assert_eventually "nothing left after Ctrl-C" 30 no_leftovers
assert_empty "nothing left: namespaces, mounts, processes, directories" "$(leftovers)"
rm -f "$log"

echo "total time: $((SECONDS - T_START))s"
harness_summary
