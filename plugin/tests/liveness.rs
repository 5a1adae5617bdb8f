//! Liveness across hosts with the real plugin and a real store (tier 2): a
//! host whose machine dies is reclaimed after its TTL and grace; a host cut
//! off from the store only (its machine still on the underlay) keeps what it
//! holds, however long the cut, and comes back whole; a whole-store outage
//! cuts no container off and costs nothing.

mod support;

use serde_json::json;
use std::time::{Duration, Instant};
use support::calls::{fdb, join, wait_until, TwoHosts, FIRST_VNI, POOL};
use support::{Plugin, Sandbox, Store};

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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs root: scripts/test runs this tier"]
async fn a_whole_store_outage_past_ttl_and_grace_cuts_no_container_off_and_reclaims_nothing_on_etcd(
) {
    a_whole_store_outage_past_ttl_and_grace_cuts_no_container_off_and_reclaims_nothing(Store::Etcd)
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs root: scripts/test runs this tier"]
async fn a_whole_store_outage_past_ttl_and_grace_cuts_no_container_off_and_reclaims_nothing_on_consul(
) {
    a_whole_store_outage_past_ttl_and_grace_cuts_no_container_off_and_reclaims_nothing(
        Store::Consul,
    )
    .await;
}

/// The remote endpoint (`mac`, `ip` behind `vtep`) as `p`'s kernel has it:
/// a FDB entry to the VTEP and a neighbour entry, or what is missing.
fn peer_entries(p: &Plugin, mac: &str, ip: &str, vtep: &str) -> Result<(), String> {
    let fdb = fdb(p, FIRST_VNI);
    let neigh = p.in_overlay(
        FIRST_VNI,
        &["ip", "neigh", "show", "dev", &format!("ro-vx-{FIRST_VNI}")],
    );
    let fdb_ok = fdb
        .lines()
        .any(|l| l.contains(mac) && l.contains(&format!("dst {vtep}")));
    let neigh_ok = neigh
        .lines()
        .any(|l| l.starts_with(&format!("{ip} ")) && l.contains(mac));
    if fdb_ok && neigh_ok {
        Ok(())
    } else {
        Err(format!("fdb:\n{fdb}neigh:\n{neigh}"))
    }
}

/// What the hosts hold in the store: endpoint records, addresses, their
/// bindings and the hosts' network mappings (key and value).
fn holdings(h: &TwoHosts) -> std::collections::BTreeMap<String, String> {
    support::dump(&h.ns2, &h.url, "")
        .into_iter()
        .filter(|(k, _)| {
            k.contains("/ep/")
                || k.contains("/addr/")
                || k.contains("/bound/")
                || k.contains("/host/")
        })
        .collect()
}

/// The whole store hangs (SIGSTOP: connections stay open, nothing answers)
/// for three times TTL + grace, with a container on each of two hosts.
/// Meanwhile both hosts keep the other's FDB and neighbour entries and the
/// containers ping each other. After the store thaws (the registrations
/// expired meanwhile by its clock, so it drops them now), both hosts
/// register again, nothing was reclaimed (the same endpoint records,
/// addresses, bindings and network mappings), no address is held twice, and
/// both serve Docker again.
async fn a_whole_store_outage_past_ttl_and_grace_cuts_no_container_off_and_reclaims_nothing(
    store: Store,
) {
    // Short store calls too, so the plugins meet the outage often: failed
    // renewals, reads and watches every second or so.
    let args = [FAST, &["--store-timeout", "1"]].concat();
    let h = TwoHosts::start(store, "out", &args).await;
    let (p1, p2) = (&h.p1, &h.p2);
    let (c1, c2) = (p1.client(), p2.client());
    let (a1, src1, mac1) = join(&c1, "n1", "outageoutageout1").await;
    let (a2, src2, mac2) = join(&c2, "n2", "outageoutageout2").await;
    let ip1 = a1.split('/').next().unwrap().to_string();
    let ip2 = a2.split('/').next().unwrap().to_string();
    let (s1, s2) = (Sandbox::new(), Sandbox::new());
    s1.take(&h.ns1, &src1, &a1);
    s2.take(&h.ns2, &src2, &a2);
    let (v1, v2) = (h.ns1.vtep.clone(), h.ns2.vtep.clone());
    wait_until(
        "each host learns the other's endpoint",
        Duration::from_secs(10),
        || peer_entries(p1, &mac2, &ip2, &v2).is_ok() && peer_entries(p2, &mac1, &ip1, &v1).is_ok(),
    )
    .await;
    assert!(s1.ping(&ip2), "h1's container cannot reach h2's");
    assert!(s2.ping(&ip1), "h2's container cannot reach h1's");
    let before = holdings(&h);
    assert_eq!(
        before.keys().filter(|k| k.contains("/ep/")).count(),
        2,
        "{before:#?}"
    );
    let marks = (p1.log_text().len(), p2.log_text().len());

    // TTL 2 s + grace 2 s, three times over (and more than two reaper
    // periods).
    let outage = Duration::from_secs(12);
    h.lan.freeze_store(true);
    let frozen = Instant::now();
    let mut pings = 0;
    while frozen.elapsed() < outage {
        for (who, p, mac, ip, vtep) in [("h1", p1, &mac2, &ip2, &v2), ("h2", p2, &mac1, &ip1, &v1)]
        {
            if let Err(what) = peer_entries(p, mac, ip, vtep) {
                panic!(
                    "{who} lost its peer entries {:?} into the store outage:\n{what}",
                    frozen.elapsed()
                );
            }
        }
        assert!(
            s1.ping(&ip2),
            "h1's container cannot reach h2's {:?} into the store outage",
            frozen.elapsed()
        );
        assert!(
            s2.ping(&ip1),
            "h2's container cannot reach h1's {:?} into the store outage",
            frozen.elapsed()
        );
        pings += 2;
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    // The outage was one for both plugins.
    for (who, p, mark) in [("h1", p1, marks.0), ("h2", p2, marks.1)] {
        let log = p.log_text();
        assert!(
            log[mark..].contains("host lease renewal failed"),
            "{who} never noticed the store outage:\n{}",
            &log[mark..]
        );
    }
    h.lan.freeze_store(false);
    eprintln!(
        "store frozen for {:?} (TTL 2 s + grace 2 s): peer entries stayed, {pings} pings answered",
        frozen.elapsed()
    );
    let thawed = Instant::now();

    // Both hosts registered again: both registrations there, and staying
    // there for three TTLs (so renewed, not leftovers about to expire).
    // Meanwhile, how long each host's kernel lacks the other's entries
    // (printed, not asserted: past the outage the store expires both
    // registrations, and peers follow the live set).
    let mut steady_since: Option<Instant> = None;
    let mut missing: [(Option<Instant>, Duration); 2] = [(None, Duration::ZERO); 2];
    loop {
        for (i, (p, mac, ip, vtep)) in [(p1, &mac2, &ip2, &v2), (p2, &mac1, &ip1, &v1)]
            .into_iter()
            .enumerate()
        {
            let (since, longest) = &mut missing[i];
            match (peer_entries(p, mac, ip, vtep).is_ok(), *since) {
                (false, None) => *since = Some(Instant::now()),
                (true, Some(s)) => {
                    *longest = (*longest).max(s.elapsed());
                    *since = None;
                }
                _ => {}
            }
        }
        let hosts = support::dump_keys(&h.ns2, &h.url, "hosts/");
        let both = ["h1", "h2"]
            .iter()
            .all(|id| hosts.iter().any(|k| k.ends_with(&format!("/hosts/{id}"))));
        match (both, steady_since) {
            (true, None) => steady_since = Some(Instant::now()),
            (false, Some(_)) => steady_since = None,
            _ => {}
        }
        if steady_since.is_some_and(|s| s.elapsed() >= Duration::from_secs(6)) {
            break;
        }
        assert!(
            thawed.elapsed() < Duration::from_secs(45),
            "the hosts did not stay registered after the store came back: {hosts:?}\n--- h1\n{}\n--- h2\n{}",
            p1.log_text(),
            p2.log_text()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let lacked = |(still, longest): (Option<Instant>, Duration)| match (still, longest) {
        (Some(_), _) => "still missing".to_string(),
        (None, Duration::ZERO) => "never seen missing".to_string(),
        (None, longest) => format!("missing for at most {longest:?}"),
    };
    eprintln!(
        "both registrations steady from {:?} after the store came back; h2's entries on h1 {}, \
         h1's entries on h2 {} (sampled about every 50 ms)",
        steady_since.unwrap() - thawed,
        lacked(missing[0]),
        lacked(missing[1]),
    );

    // Nothing was reclaimed, nothing is held twice.
    for (who, p) in [("h1", p1), ("h2", p2)] {
        let log = p.log_text();
        assert!(
            !log.contains("reclaimed a gone host") && !log.contains("freed an address bound"),
            "{who} reclaimed or freed something:\n{log}"
        );
    }
    let after = holdings(&h);
    assert_eq!(
        after, before,
        "the store's endpoints, addresses, bindings or network mappings changed"
    );
    let records: Vec<&String> = after
        .iter()
        .filter(|(k, _)| k.contains("/ep/"))
        .map(|(_, v)| v)
        .collect();
    for ip in [&ip1, &ip2] {
        let with = records
            .iter()
            .filter(|v| v.contains(&format!("\"{ip}/")))
            .count();
        assert_eq!(with, 1, "{ip} is in {with} endpoint records: {records:#?}");
    }
    let e = c2.request_address(POOL, &ip1).await.err();
    assert!(e.contains("already in use"), "{e}");
    let e = c1.request_address(POOL, &ip2).await.err();
    assert!(e.contains("already in use"), "{e}");
    // Both serve Docker again; their kernels and containers are as before.
    for c in [&c1, &c2] {
        let got = c.request_address(POOL, "").await.ok()["Address"]
            .as_str()
            .unwrap()
            .to_string();
        let ip = got.split('/').next().unwrap();
        assert!(ip != ip1 && ip != ip2, "{ip} handed out again");
        c.release_address(POOL, ip).await.ok();
    }
    wait_until(
        "both hosts have the other's entries",
        Duration::from_secs(10),
        || peer_entries(p1, &mac2, &ip2, &v2).is_ok() && peer_entries(p2, &mac1, &ip1, &v1).is_ok(),
    )
    .await;
    assert!(
        s1.ping(&ip2),
        "h1's container cannot reach h2's after the outage"
    );
    assert!(
        s2.ping(&ip1),
        "h2's container cannot reach h1's after the outage"
    );
    for (who, p, mark) in [("h1", p1, marks.0), ("h2", p2, marks.1)] {
        let log = p.log_text();
        eprintln!(
            "{who}: {} lease expired, {} reconciled after the lease loss, {} liveness changes seen",
            log[mark..].matches("host lease expired").count(),
            log[mark..]
                .matches("reconciled after the lease loss")
                .count(),
            log[mark..].matches("host liveness changed").count(),
        );
    }
}
