#!/usr/bin/env bash
# Baseline for the harness itself, without the plugin: one simulated host,
# Docker's own bridge network. If this fails, the environment (namespaces,
# dockerd, cgroups, iptables) is broken, not rustoverlay.
set -euo pipefail
cd "$(dirname "$0")/../.."
# shellcheck source=tests/lib/harness.sh
source tests/lib/harness.sh

harness_init bridge
harness_start_host 1 --no-plugin
harness_busybox_image 1

assert_eq "host 1 underlay MTU is $HARNESS_UL_MTU" "$HARNESS_UL_MTU" "$(hexec_mnt 1 cat /sys/class/net/ul0/mtu)"
assert_ok "host 1 pings the world" hexec 1 busybox ping -c 1 -W 2 "$HARNESS_WORLD_IP"

hdocker 1 run -d --name c1 "$HARNESS_IMAGE" sleep 3600 >/dev/null
hdocker 1 run -d --name c2 "$HARNESS_IMAGE" sleep 3600 >/dev/null
ip1="$(hcontainer_ip 1 c1 bridge)"
ip2="$(hcontainer_ip 1 c2 bridge)"
assert_ok "c1 has an address on the bridge network ($ip1)" test -n "$ip1"
assert_ok "c2 has an address on the bridge network ($ip2)" test -n "$ip2"
assert_eventually "c1 pings c2" 10 hdocker 1 exec c1 ping -c 1 -W 1 "$ip2"
assert_eventually "c2 pings c1" 10 hdocker 1 exec c2 ping -c 1 -W 1 "$ip1"
assert_eventually "c1 pings the world (NAT via docker0)" 10 hdocker 1 exec c1 ping -c 1 -W 1 "$HARNESS_WORLD_IP"
assert_eq "container eth0 MTU on the bridge network" 1500 "$(hdocker 1 exec c1 cat /sys/class/net/eth0/mtu)"

# The world can serve HTTP for later tests.
mkdir -p "$HARNESS_TMP/www"
echo hello-from-world >"$HARNESS_TMP/www/index.html"
harness_bg "$(harness_world_ns)" httpd busybox httpd -f -p 8080 -h "$HARNESS_TMP/www" >/dev/null
assert_eventually "c1 fetches a page from the world" 10 \
    hdocker 1 exec c1 wget -q -O - "http://$HARNESS_WORLD_IP:8080/index.html"

# Nothing of this host leaks into the root network namespace.
assert_fails "no docker0 in the root namespace" ip link show docker0
assert_fails "no ul0 in the root namespace" ip link show ul0

# Docker's own cleanup.
hdocker 1 rm -f c1 c2 >/dev/null
assert_empty "no containers left" "$(hdocker 1 ps -aq)"
assert_empty "no veth left on docker0" "$(hexec 1 ip -o link show master docker0)"

harness_summary
