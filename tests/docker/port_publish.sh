#!/usr/bin/env bash
# Port publishing on a rustoverlay network, two simulated hosts sharing one
# etcd: `docker run -p 8080:80` (busybox httpd) on host 1, attached only to a
# rustoverlay network, answers on host 1's underlay address from the world,
# from host 2's namespace and from host 1 itself (Docker's docker_gwbridge
# and its NAT, as with Docker's own overlay); the same server answers across
# the overlay on port 80 from a container on host 2; removing the container
# removes the NAT rule, and nothing is left.
set -euo pipefail
cd "$(dirname "$0")/../.."
# shellcheck source=tests/lib/harness.sh
source tests/lib/harness.sh

harness_init port_publish
T_START=$SECONDS

img="$HARNESS_IMAGE"
NET=appnet
NET_SUBNET=10.77.0.0/24
PORT=8080
H1_IP="$(harness_host_ip 1)"

# fetch CMD-PREFIX... URL - busybox wget (timeouts through busybox `timeout`:
# busybox 1.35's `wget -T` crashes) run through a command prefix.
fetch() {
    local url="${*: -1}"
    "${@:1:$#-1}" timeout 5 busybox wget -q -O - "$url"
}

dnat_rules() { hexec 1 iptables -w 5 -t nat -S DOCKER 2>/dev/null | grep -- "--dport $PORT" || true; }
phase "boot: etcd and two hosts"
harness_start_etcd
for h in 1 2; do
    harness_start_host "$h" --store "$(harness_etcd_url)"
    harness_busybox_image "$h"
    assert_ok "host $h: create $NET" \
        hdocker "$h" network create -d rustoverlay --ipam-driver rustoverlay --subnet "$NET_SUBNET" "$NET"
done
harness_stop_if_failed "setup failed"

phase "host 1: docker run -p $PORT:80 busybox httpd on $NET"
# shellcheck disable=SC2016 # expanded in the container
assert_ok "host 1: run web -p $PORT:80" \
    hdocker 1 run -d --stop-timeout 1 --network "$NET" --name web -p "$PORT:80" "$img" \
    sh -c 'mkdir -p /www && echo "hello from web" >/www/index.html && exec httpd -f -p 80 -h /www'
harness_stop_if_failed "web did not start"
assert_contains "web's port 80 is published on $PORT" "0.0.0.0:$PORT" \
    "$(hdocker 1 port web 80 2>&1)"
web_ip="$(hcontainer_ip 1 web "$NET")"
assert_ok "web is on $NET ($web_ip)" test "${web_ip%.*}" = 10.77.0
assert_eq "web's only Docker network is $NET" "$NET" \
    "$(hdocker 1 inspect -f '{{range $k, $v := .NetworkSettings.Networks}}{{$k}} {{end}}' web | xargs)"
gw_if="$(hdocker 1 exec web ip -o -4 addr show 2>/dev/null | awk '$2 != "lo" && $4 !~ /^10\.77\.0\./ { print $2, $4 }')"
assert_ok "web also has Docker's docker_gwbridge interface for egress and publishing ($gw_if)" \
    test -n "$gw_if"
assert_ok "host 1 has the docker_gwbridge network" hdocker 1 network inspect docker_gwbridge
assert_ok "host 1's NAT has a DNAT rule for $PORT" test -n "$(dnat_rules)"

assert_eventually "the world fetches http://$H1_IP:$PORT/ (underlay address of host 1)" 15 \
    eval "[[ \"\$(fetch hworld http://$H1_IP:$PORT/)\" == 'hello from web' ]]"
assert_eventually "host 2's namespace fetches http://$H1_IP:$PORT/" 15 \
    eval "[[ \"\$(fetch hexec 2 http://$H1_IP:$PORT/)\" == 'hello from web' ]]"
assert_eventually "host 1 itself fetches http://127.0.0.1:$PORT/" 15 \
    eval "[[ \"\$(fetch hexec 1 http://127.0.0.1:$PORT/)\" == 'hello from web' ]]"
assert_ok "host 2: run c2 on $NET" \
    hdocker 2 run -d --stop-timeout 1 --network "$NET" --name c2 "$img" sleep 3600
assert_eventually "c2 (h2) fetches http://$web_ip/ across the overlay (port 80)" 15 \
    eval "[[ \"\$(hdocker 2 exec c2 timeout 5 wget -q -O - http://$web_ip/)\" == 'hello from web' ]]"
assert_eventually "c2 (h2) fetches http://$H1_IP:$PORT/ (through its own gwbridge and the underlay)" 15 \
    eval "[[ \"\$(hdocker 2 exec c2 timeout 5 wget -q -O - http://$H1_IP:$PORT/)\" == 'hello from web' ]]"
assert_fails "nothing answers on host 2's address at $PORT (published on host 1 only)" \
    fetch hworld "http://$(harness_host_ip 2):$PORT/"

phase "remove everything; the published port and the NAT rule go with it"
assert_ok "host 1: remove web" hdocker 1 rm -f web
assert_ok "host 2: remove c2" hdocker 2 rm -f c2
assert_empty "host 1's NAT has no DNAT rule for $PORT any more" "$(dnat_rules)"
assert_fails "the world gets no answer at $H1_IP:$PORT any more" fetch hworld "http://$H1_IP:$PORT/"
for h in 1 2; do
    assert_ok "host $h: network rm $NET" hdocker "$h" network rm "$NET"
    assert_empty "host $h: no overlay namespace left" "$(ovl_namespaces "$h")"
    assert_empty "host $h: no ro-*/rc-* link left" "$(host_ro_links "$h")"
done
assert_store_empty etcd

echo "total time: $((SECONDS - T_START))s"
harness_summary
