//! Liveness across hosts with the real plugin and a real store (tier 2): a
//! host whose machine dies is reclaimed after its TTL and grace; a host cut
//! off from the store only (its machine still on the underlay) keeps what it
//! holds, however long the cut, and comes back whole.

mod support;

use serde_json::json;
use std::time::{Duration, Instant};
use support::calls::{fdb, join, wait_until, TwoHosts, FIRST_VNI, POOL};
use support::Store;

/// Short liveness timings: TTL 2 s, grace 2 s.
const FAST: &[&str] = &["--host-ttl", "2", "--reclaim-grace", "2"];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs root: scripts/test runs this tier"]
async fn a_gone_hosts_addresses_come_back_after_the_grace_and_never_a_live_hosts_on_etcd() {
    a_gone_hosts_addresses_come_back_after_the_grace_and_never_a_live_hosts(Store::Etcd).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs root: scripts/test runs this tier"]
async fn a_gone_hosts_addresses_come_back_after_the_grace_and_never_a_live_hosts_on_consul() {
    a_gone_hosts_addresses_come_back_after_the_grace_and_never_a_live_hosts(Store::Consul).await;
}

async fn a_gone_hosts_addresses_come_back_after_the_grace_and_never_a_live_hosts(store: Store) {
    let mut h = TwoHosts::start(store, "gr", FAST).await;
    let (c1, c2) = (h.p1.client(), h.p2.client());
    let (a1, _, _) = join(&c1, "n1", "gonehostendpoint").await;
    join(&c2, "n2", "livehostendpoint").await;
    let ip1 = a1.split('/').next().unwrap().to_string();

    // While h1 lives, its address stays its own.
    let e = c2.request_address(POOL, &ip1).await.err();
    assert!(e.contains("already in use"), "{e}");

    // h1's machine dies: plugin killed, cable cut (its containers would be
    // gone with it, so reclaim finds nothing answering at its VTEP).
    h.p1.kill();
    h.ns1.cable(false);
    let start = Instant::now();
    // The registration is gone at most the TTL after the last renewal, on
    // both stores (Consul gets a session of half the TTL).
    let lease_max = Duration::from_secs(2);
    let limit = lease_max + Duration::from_secs(2 + 3);
    loop {
        let r = c2.request_address(POOL, &ip1).await;
        if r.status == 200 {
            break;
        }
        assert!(
            start.elapsed() <= limit,
            "h1's address not free within lease expiry + grace 2 s + 3 s ({limit:?}): {}",
            r.err()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    eprintln!(
        "gone host's address free again {:?} after its death (lease expiry {lease_max:?} + grace 2 s; limit {limit:?})",
        start.elapsed()
    );
    // The live host lost nothing.
    c2.call(
        "NetworkDriver.EndpointOperInfo",
        json!({"NetworkID": "n2", "EndpointID": "livehostendpoint"}),
    )
    .await
    .ok();

    // h1 comes back: it re-registers, and its reclaimed endpoint's devices go.
    h.ns1.cable(true);
    h.p1.restart(&h.ns1).await;
    wait_until(
        "h1 removes devices of its reclaimed endpoint",
        Duration::from_secs(10),
        || !h.p1.has_overlay(FIRST_VNI),
    )
    .await;
    let e = c1
        .call(
            "NetworkDriver.EndpointOperInfo",
            json!({"NetworkID": "n1", "EndpointID": "gonehostendpoint"}),
        )
        .await
        .err();
    assert!(
        e.contains("not a rustoverlay network") || e.contains("does not exist"),
        "{e}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs root: scripts/test runs this tier"]
async fn a_host_cut_off_from_the_store_past_ttl_and_grace_keeps_its_addresses_on_etcd() {
    a_host_cut_off_from_the_store_past_ttl_and_grace_keeps_its_addresses(Store::Etcd).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs root: scripts/test runs this tier"]
async fn a_host_cut_off_from_the_store_past_ttl_and_grace_keeps_its_addresses_on_consul() {
    a_host_cut_off_from_the_store_past_ttl_and_grace_keeps_its_addresses(Store::Consul).await;
}

/// The store is up for h2 but not for h1, longer than TTL + grace. h1's
/// registration expires, but its machine (and container) is still on the
/// underlay: h2's reaper finds it answering and reclaims nothing, so its
/// address is never live on two hosts. When the cut heals, h1 registers
/// again with everything it had, and nothing is held twice.
async fn a_host_cut_off_from_the_store_past_ttl_and_grace_keeps_its_addresses(store: Store) {
    let h = TwoHosts::start(store, "cut", FAST).await;
    let (p1, p2) = (&h.p1, &h.p2);
    let (c1, c2) = (p1.client(), p2.client());
    let (a1, _, mac1) = join(&c1, "n1", "cutoffcutoffcut1").await;
    join(&c2, "n2", "stayedstayedsta2").await;
    let ip1 = a1.split('/').next().unwrap().to_string();
    wait_until("h2 learns h1's endpoint", Duration::from_secs(10), || {
        fdb(p2, FIRST_VNI).contains(&mac1)
    })
    .await;

    h.ns1.block(support::LAN_GATEWAY);
    let cut = Instant::now();
    wait_until(
        "h1's registration expires (h2 drops its entries)",
        Duration::from_secs(15),
        || !fdb(p2, FIRST_VNI).contains(&mac1),
    )
    .await;
    // Past TTL + grace, the reaper (h2: the only host that reaches the
    // store) probes h1's machine, finds it answering, and keeps its
    // addresses. Meanwhile h1's address is never h2's to take.
    let start = Instant::now();
    loop {
        let e = c2.request_address(POOL, &ip1).await.err();
        assert!(e.contains("already in use"), "h1's address handed out: {e}");
        if p2.log_text().contains("keeping its addresses") {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(40),
            "h2's reaper never decided about h1:\n{}",
            p2.log_text()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // And it goes on keeping them for a while.
    for _ in 0..10 {
        let e = c2.request_address(POOL, &ip1).await.err();
        assert!(e.contains("already in use"), "h1's address handed out: {e}");
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    eprintln!(
        "h1 cut off from the store for {:?} (TTL 2 s + grace 2 s): nothing reclaimed",
        cut.elapsed()
    );

    h.ns1.unblock(support::LAN_GATEWAY);
    wait_until(
        "h1 registers again and h2 re-learns its endpoint",
        Duration::from_secs(20),
        || fdb(p2, FIRST_VNI).contains(&mac1),
    )
    .await;
    assert!(p1.has_overlay(FIRST_VNI), "h1 kept its endpoint's devices");
    c1.call(
        "NetworkDriver.EndpointOperInfo",
        json!({"NetworkID": "n1", "EndpointID": "cutoffcutoffcut1"}),
    )
    .await
    .ok();
    let e = c2.request_address(POOL, &ip1).await.err();
    assert!(e.contains("already in use"), "{e}");
    let eps = support::dump_keys(&h.ns2, &h.url, "overlay/");
    assert_eq!(
        eps.iter().filter(|k| k.contains("/ep/")).count(),
        2,
        "one endpoint record each, nothing twice: {eps:?}"
    );
}
