#!/usr/bin/env bash
# examples/compose with the engine's docker-compose (harness_compose_bin:
# Compose v1 1.29 of bookworm with HARNESS_ENGINE=docker20, Compose v2 of
# trixie with docker26; HARNESS_COMPOSE picks another) on two simulated hosts
# sharing one etcd, each dockerd with "dns": ["169.254.53.53"] (the plugin's
# resolver): host 1 brings up profile host-a (web: busybox httpd), host 2
# profile host-b (client), each its own compose project through DOCKER_HOST;
# the client fetches http://web/ across hosts by the service name, web pings
# the client by name, with no fixed address and no extra_hosts; web's address
# cannot be taken on the other host; `docker-compose down` on each host
# leaves nothing: no container, no network, no namespace or device, no
# allocation in the store.
set -euo pipefail
cd "$(dirname "$0")/../.."
# shellcheck source=tests/lib/harness.sh
source tests/lib/harness.sh

COMPOSE="$(harness_compose_bin)"
command -v "$COMPOSE" >/dev/null 2>&1 || {
    echo "FAIL - $COMPOSE not found (Debian package docker-compose; scripts/test installs it and the trixie root)"
    echo "0 passed, 1 failed"
    exit 1
}

harness_init compose
# shellcheck source=tests/lib/scenarios.sh
source tests/lib/scenarios.sh
T_START=$SECONDS

EXAMPLE="$HARNESS_REPO_ROOT/examples/compose/docker-compose.yml"
PROJECT=demo
DNS=169.254.53.53

# hcompose N ARGS... - docker-compose against host N's dockerd, on the example
# file, with the test image (no registry here). (busybox 1.35's `wget -T`
# crashes: timeouts go through busybox's `timeout`.)
hcompose() {
    local n="$1"
    shift
    DOCKER_HOST="unix://$(harness_host_dir "$n")/docker.sock" IMAGE="$HARNESS_IMAGE" \
        COMPOSE_INTERACTIVE_NO_CLI=1 \
        timeout 120 "$COMPOSE" --ansi never -f "$EXAMPLE" -p "$PROJECT" "$@"
}

# cid N SERVICE - the id of the service's container on host N (empty if none).
cid() { hcompose "$1" ps -q "$2" 2>/dev/null || true; }

phase "boot: etcd, two hosts with the plugin on it, dockerd with --dns $DNS"
harness_start_etcd
for h in 1 2; do
    sc_dockerd_config "$h" "\"dns\": [\"$DNS\"]"
    harness_start_host "$h" --store "$(harness_etcd_url)"
    harness_busybox_image "$h"
done
assert_ok "docker-compose is installed ($COMPOSE: $("$COMPOSE" version --short 2>/dev/null))" "$COMPOSE" version
assert_ok "the example is a valid compose file" hcompose 1 config -q

phase "host 1: profile host-a (web); host 2: profile host-b (client)"
t0=$SECONDS
assert_ok "host 1: docker-compose --profile host-a up -d" hcompose 1 --profile host-a up -d
assert_ok "host 2: docker-compose --profile host-b up -d" hcompose 2 --profile host-b up -d
echo "both projects up in $((SECONDS - t0))s"
harness_stop_if_failed "docker-compose up failed"

web="$(cid 1 web)"
client="$(cid 2 client)"
assert_ok "host 1 runs web" test -n "$web"
assert_ok "host 2 runs client" test -n "$client"
assert_empty "host 1 runs no client (profile host-b only on host 2)" "$(cid 1 client)"
assert_empty "host 2 runs no web" "$(cid 2 web)"
harness_stop_if_failed "services not where expected"

net="${PROJECT}_appnet"
assert_eq "host 1: $net uses the rustoverlay driver" rustoverlay \
    "$(hdocker 1 network inspect -f '{{.Driver}}' "$net" 2>&1)"
assert_eq "host 2: $net has the subnet 10.77.10.0/24" 10.77.10.0/24 \
    "$(hdocker 2 network inspect -f '{{range .IPAM.Config}}{{.Subnet}}{{end}}' "$net" 2>&1)"
WEB_IP="$(hcontainer_ip 1 "$web" "$net")"
CLIENT_IP="$(hcontainer_ip 2 "$client" "$net")"
assert_ok "web has an address on $net ($WEB_IP)" test -n "$WEB_IP"
assert_ok "client has an address on $net ($CLIENT_IP)" test -n "$CLIENT_IP"

assert_eventually "client (h2) pings web (h1) by name" 15 \
    hcompose 2 exec -T client ping -c 1 -W 2 web
fetch_web() { hcompose 2 exec -T client timeout 5 wget -q -O - http://web/; }
assert_eventually "client (h2) fetches http://web/ across hosts by the service name" 15 \
    eval '[[ "$(fetch_web)" == "hello from web"* ]]'
echo "    client got: $(fetch_web 2>&1)"
assert_eventually "web (h1) pings client (h2) by name" 15 \
    hcompose 1 exec -T web ping -c 1 -W 2 client
assert_ok "a container on host 2 outside the project resolves web too" \
    hdocker 2 run --rm --network "$net" "$HARNESS_IMAGE" ping -c 1 -W 2 web
assert_fails "host 2 cannot give web's address $WEB_IP to another container" \
    hdocker 2 run --rm --network "$net" --ip "$WEB_IP" "$HARNESS_IMAGE" true

phase "docker-compose down on both hosts"
t0=$SECONDS
assert_ok "host 2: docker-compose --profile host-b down" hcompose 2 --profile host-b down
assert_ok "host 1: docker-compose --profile host-a down" hcompose 1 --profile host-a down
echo "both projects down in $((SECONDS - t0))s"
for h in 1 2; do
    assert_empty "host $h: no container left" "$(hdocker "$h" ps -aq)"
    assert_empty "host $h: no rustoverlay network left" "$(hdocker "$h" network ls -q --filter driver=rustoverlay)"
    assert_empty "host $h: no overlay namespace left" "$(ovl_namespaces "$h")"
    assert_empty "host $h: no ro-*/rc-* link left" "$(host_ro_links "$h")"
done
assert_store_empty etcd

echo "total time: $((SECONDS - T_START))s"
harness_summary
