#!/usr/bin/env bash
# `rustoverlay doctor` on three hosts sharing etcd, each dockerd with the
# plugin's resolver as its DNS: every check ok (exit 0) on a healthy host,
# with each peer answering the VXLAN path probe; then a failure (exit 2)
# that names its cause for each of: UDP 4789 dropped on host 2 (iptables in
# host 2's namespace: host 1's probe of host 2 gets no answer, and host 2's
# doctor names the rule), etcd unreachable (its link cut), and a duplicate
# host ID (host 3 checked as h1, which host 1 holds). A stateful firewall
# that lets in only UDP 4789 and established flows does not fail the probe.
set -euo pipefail
cd "$(dirname "$0")/../.."
# shellcheck source=tests/lib/harness.sh
source tests/lib/harness.sh

harness_init doctor
# shellcheck source=tests/lib/scenarios.sh
source tests/lib/scenarios.sh
T_START=$SECONDS
NET=appnet
DNS=169.254.53.53

phase "boot: etcd and three hosts, dockerd with dns $DNS"
harness_start_etcd
store="$(harness_etcd_url)"
for h in 1 2 3; do
    sc_dockerd_config "$h" "\"dns\": [\"$DNS\"]"
    harness_start_host "$h" --store "$store"
    harness_busybox_image "$h"
    assert_ok "host $h: create $NET" \
        hdocker "$h" network create -d rustoverlay --ipam-driver rustoverlay --subnet 10.77.0.0/24 "$NET"
    assert_ok "host $h: run c$h" hdocker "$h" run -d --network "$NET" --name "c$h" "$HARNESS_IMAGE" sleep 3600
done
harness_stop_if_failed "setup failed"

# doctor H [ARGS...] - run doctor in host H; sets OUT and RC.
doctor() {
    local n="$1"
    shift
    RC=0
    OUT="$(hexec_mnt "$n" "$(harness_bin)" doctor --store "$store" --store-timeout 2 \
        --docker-socket "unix://$(harness_host_dir "$n")/docker.sock" \
        --docker-config "$(harness_host_dir "$n")/daemon.json" "$@" 2>&1)" || RC=$?
    printf '%s\n' "$OUT" | sed "s/^/    h$n| /"
}

phase "a healthy host: every check ok"
for h in 1 2 3; do
    doctor "$h"
    assert_eq "host $h: doctor exits 0" 0 "$RC"
    assert_empty "host $h: no warn or FAIL line" "$(grep -E '^(warn|FAIL)' <<<"$OUT" || true)"
done
doctor 1
for p in 2 3; do
    assert_contains "host 1: h$p answers the VXLAN probe" \
        "vxlan path    h$p ($(harness_host_ip "$p")) answered over VXLAN (UDP 4789)" "$OUT"
done
for check in privileges vxlan plugin underlay store "host id" clock firewall docker; do
    assert_contains "host 1: the '$check' check ran and is ok" "ok    $check" "$OUT"
done

phase "UDP 4789 dropped on host 2: host 1's probe of h2 fails, and host 2 names the rule"
assert_ok "host 2: iptables drops UDP 4789 in" hexec 2 iptables -I INPUT -p udp --dport 4789 -j DROP
doctor 1
assert_eq "host 1: doctor exits 2" 2 "$RC"
assert_contains "host 1: the failure names h2 and UDP 4789" \
    "FAIL  vxlan path    h2 ($(harness_host_ip 2)): no answer over VXLAN (UDP 4789)" "$OUT"
assert_contains "host 1: and says what to do" "fix: open UDP 4789 from this host to $(harness_host_ip 2)" "$OUT"
assert_contains "host 1: h3 still answers" "h3 ($(harness_host_ip 3)) answered over VXLAN" "$OUT"
doctor 2
assert_eq "host 2: doctor exits 2" 2 "$RC"
assert_contains "host 2: the firewall check names the rule" "FAIL  firewall      a rule drops or rejects UDP 4789" "$OUT"
assert_ok "host 2: remove the rule" hexec 2 iptables -D INPUT -p udp --dport 4789 -j DROP
doctor 1
assert_eq "host 1: doctor exits 0 again" 0 "$RC"

phase "a stateful firewall on host 1 (UDP 4789 and established flows only): the probes' answers still come back"
# The answer comes from the peer's VTEP and port 4789: the request's flow
# reversed, which conntrack counts as established.
assert_ok "host 1: accept established UDP" \
    hexec 1 iptables -A INPUT -p udp -m conntrack --ctstate ESTABLISHED,RELATED -j ACCEPT
assert_ok "host 1: accept UDP 4789" hexec 1 iptables -A INPUT -p udp --dport 4789 -j ACCEPT
assert_ok "host 1: drop other UDP" hexec 1 iptables -A INPUT -p udp -j DROP
doctor 1
assert_eq "host 1: doctor exits 0" 0 "$RC"
assert_contains "host 1: h2 answers through the firewall" "h2 ($(harness_host_ip 2)) answered over VXLAN" "$OUT"
for rule in "-p udp -m conntrack --ctstate ESTABLISHED,RELATED -j ACCEPT" "-p udp --dport 4789 -j ACCEPT" "-p udp -j DROP"; do
    # shellcheck disable=SC2086 # the rule's words
    assert_ok "host 1: remove the rule '$rule'" hexec 1 iptables -D INPUT $rule
done

phase "etcd unreachable: the store check fails"
harness_shared_store_link etcd down
doctor 1
harness_shared_store_link etcd up
assert_eq "host 1: doctor exits 2" 2 "$RC"
assert_contains "host 1: the store check fails, naming the store" "FAIL  store         $store unreachable" "$OUT"
assert_contains "host 1: and says what to check" "fix: check --store" "$OUT"
assert_eventually "etcd answers again" 10 harness_shared_store_healthy etcd

# The cut outlasted the hosts' leases: they register again.
h1_registered() {
    hexec_mnt 1 "$(harness_bin)" status --json | jq -e '.cluster.hosts[] | select(.host == "h1") | .alive' >/dev/null
}
assert_eventually "h1 is registered again" 30 h1_registered

phase "a duplicate host ID: host 3 checked as h1"
doctor 3 --host-id h1
assert_eq "host 3 as h1: doctor exits 2" 2 "$RC"
assert_contains "the failure says duplicate host ID and names h1's VTEP" \
    "duplicate host ID: h1 is registered by another machine (VTEP $(harness_host_ip 1))" "$OUT"

phase "teardown"
for h in 1 2 3; do
    assert_ok "host $h: remove c$h" hdocker "$h" rm -f "c$h"
    assert_ok "host $h: remove $NET" hdocker "$h" network rm "$NET"
done
assert_store_empty etcd
echo "total time: $((SECONDS - T_START))s"
harness_summary
