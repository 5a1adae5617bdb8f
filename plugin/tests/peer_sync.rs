//! Peer sync between simulated hosts on one memory store: a remote endpoint
//! becomes FDB (MAC -> its host's VTEP) and neighbour (IP -> MAC) entries in
//! a host's kernel while that host has a local endpoint on the overlay, while
//! the remote host is registered, and not a moment after the store says
//! otherwise.

mod fake_host;

use fake_host::{eventually, exactly, store, Ep, Host, PATIENCE, SUBNET, VNI};
use rustoverlay::dataplane::{Dataplane, PeerEntry};
use rustoverlay::sync::membership::Registration;
use std::collections::HashMap;
use std::time::{Duration, Instant};

#[tokio::test]
async fn an_endpoint_joined_on_one_host_becomes_entries_on_another_host_with_a_local_endpoint() {
    let s = store();
    let a = Host::start(&s, "a", "192.0.2.1").await;
    let b = Host::start(&s, "b", "192.0.2.2").await;
    a.create_network("net-a", SUBNET).await;
    b.create_network("net-b", SUBNET).await;
    let ea = a.run("net-a", "eaaaaaaaaaaaaaaa").await;
    assert!(
        b.fake.network(VNI).is_none(),
        "b has no local endpoint: no devices, no entries"
    );

    // b's first local endpoint: its peer sync starts with a full read.
    let eb = b.run("net-b", "ebbbbbbbbbbbbbbb").await;
    eventually("b learns a's endpoint", || b.has_peer(VNI, &ea)).await;
    eventually("a learns b's endpoint", || a.has_peer(VNI, &eb)).await;
    assert_eq!(b.kernel_peers(VNI), exactly(&[&ea]), "no entry for b's own");

    // An endpoint joined while b is syncing comes through the watch.
    let ea2 = a.run("net-a", "ea2aaaaaaaaaaaaa").await;
    eventually("b learns a's second endpoint", || b.has_peer(VNI, &ea2)).await;

    // Deleting it on a removes it from b.
    a.stop(&ea).await;
    eventually("b forgets a's deleted endpoint", || b.lacks_peer(VNI, &ea)).await;
    assert_eq!(b.kernel_peers(VNI), exactly(&[&ea2]));
}

#[tokio::test]
async fn a_remote_endpoints_entries_exist_only_while_its_host_is_registered() {
    let s = store();
    let a = Host::unregistered(&s, "a", "192.0.2.1");
    let b = Host::start(&s, "b", "192.0.2.2").await;
    let c = Host::unregistered(&s, "c", "192.0.2.3");
    let registration = Registration::new(s.clone(), "a".into(), a.vtep(), Duration::from_secs(2));
    let lease = registration.register().await.unwrap();
    a.create_network("net-a", SUBNET).await;
    b.create_network("net-b", SUBNET).await;
    c.create_network("net-c", SUBNET).await;
    // c never registers: its endpoint gets no entries anywhere.
    let ec = c.run("net-c", "ecccccccccccccccc").await;
    let ea = a.run("net-a", "eaaaaaaaaaaaaaaa").await;
    b.sees_registered("a", true).await;
    b.run("net-b", "ebbbbbbbbbbbbbbb").await;

    // Keep a's lease alive until b holds a's endpoint.
    let start = Instant::now();
    while !b.has_peer(VNI, &ea) {
        assert!(start.elapsed() < PATIENCE, "b never learned a's endpoint");
        s.keep_alive(lease.clone()).await.unwrap();
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(
        b.lacks_peer(VNI, &ec),
        "an unregistered host's endpoint has no entries"
    );

    // a stops renewing: its lease expires and its entries go, although its
    // endpoint is still in the store.
    eventually("b forgets a's endpoint once a's lease expired", || {
        b.lacks_peer(VNI, &ea)
    })
    .await;
    let net = a.overlays.lookup("net-a").await.unwrap();
    assert!(a
        .overlays
        .get_endpoint(&net, &ea.endpoint_id)
        .await
        .unwrap()
        .is_some());

    // a registers again: its entries come back.
    registration.register().await.unwrap();
    eventually("b learns a's endpoint again", || b.has_peer(VNI, &ea)).await;
    assert_eq!(b.kernel_peers(VNI), exactly(&[&ea]));
}

#[tokio::test]
async fn the_first_resync_removes_stale_entries_and_corrects_wrong_ones() {
    let s = store();
    let a = Host::start(&s, "a", "192.0.2.1").await;
    let b = Host::start(&s, "b", "192.0.2.2").await;
    a.create_network("net-a", SUBNET).await;
    b.create_network("net-b", SUBNET).await;
    let ea = a.run("net-a", "eaaaaaaaaaaaaaaa").await;

    // Leftovers in b's kernel: an endpoint the store does not hold, and a's
    // endpoint with a wrong VTEP and its address on a wrong MAC.
    b.fake.ensure_network(VNI).await.unwrap();
    let ghost = PeerEntry {
        mac: [0x02, 0x52, 10, 77, 0, 99],
        ip: Some("10.77.0.99".parse().unwrap()),
        vtep: "192.0.2.99".parse().unwrap(),
    };
    b.fake.plant_peer(VNI, &ghost);
    b.fake.plant_peer(
        VNI,
        &PeerEntry {
            mac: ea.mac,
            ip: None,
            vtep: "192.0.2.98".parse().unwrap(),
        },
    );
    b.fake.plant_peer(
        VNI,
        &PeerEntry {
            mac: [0x02, 0, 0, 0, 0, 0x77],
            ip: Some(ea.ip()),
            vtep: "192.0.2.97".parse().unwrap(),
        },
    );

    b.run("net-b", "ebbbbbbbbbbbbbbb").await;
    eventually(
        "b's kernel holds what the store holds, nothing else",
        || b.kernel_peers(VNI) == exactly(&[&ea]),
    )
    .await;
}

#[tokio::test]
async fn a_peer_sync_started_again_removes_what_it_missed_while_stopped() {
    let s = store();
    let a = Host::start(&s, "a", "192.0.2.1").await;
    let b = Host::start(&s, "b", "192.0.2.2").await;
    a.create_network("net-a", SUBNET).await;
    b.create_network("net-b", SUBNET).await;
    let ea = a.run("net-a", "eaaaaaaaaaaaaaaa").await;
    let eb = b.run("net-b", "ebbbbbbbbbbbbbbb").await;
    eventually("b learns a's endpoint", || b.has_peer(VNI, &ea)).await;

    // b's plugin stops (its peer sync with it) and misses a's changes.
    let b = b.restart();
    a.stop(&ea).await;
    let ea2 = a.run("net-a", "ea2aaaaaaaaaaaaa").await;
    assert!(
        b.has_peer(VNI, &ea),
        "nothing follows the store while b is down"
    );

    // Start-up resumes peer sync through the devices (PeerSync::ensure).
    b.reconciler.recover().await.unwrap();
    eventually("b catches up", || b.kernel_peers(VNI) == exactly(&[&ea2])).await;
    assert!(b.has_port(VNI, &eb.endpoint_id));
}

#[tokio::test]
async fn every_host_holds_every_other_hosts_endpoints() {
    let s = store();
    let mut hosts = vec![];
    for i in 1..=3u8 {
        let h = Host::start(&s, &format!("h{i}"), &format!("192.0.2.{i}")).await;
        h.create_network(&format!("net{i}"), SUBNET).await;
        hosts.push(h);
    }
    let mut eps: HashMap<String, Vec<Ep>> = HashMap::new();
    for (i, h) in hosts.iter().enumerate() {
        for j in 0..2 {
            let ep = h
                .run(&format!("net{}", i + 1), &format!("ep{i}{j}xxxxxxxxxxxx"))
                .await;
            eps.entry(h.name.clone()).or_default().push(ep);
        }
    }
    for h in &hosts {
        let remote: Vec<&Ep> = eps
            .iter()
            .filter(|(owner, _)| **owner != h.name)
            .flat_map(|(_, e)| e.iter())
            .collect();
        eventually(&format!("{} holds the 4 remote endpoints", h.name), || {
            h.kernel_peers(VNI) == exactly(&remote)
        })
        .await;
    }
}

#[tokio::test]
async fn removing_a_stale_record_keeps_the_entries_of_the_address_s_new_owner() {
    use kvstore_backends::KvStore;
    use rustoverlay::state::keys;
    let s = store();
    let a = Host::start(&s, "a", "192.0.2.1").await;
    let b = Host::start(&s, "b", "192.0.2.2").await;
    let c = Host::start(&s, "c", "192.0.2.3").await;
    let net_a = a.create_network("net-a", SUBNET).await;
    b.create_network("net-b", SUBNET).await;
    c.create_network("net-c", SUBNET).await;
    let eb = b.run("net-b", "ebbbbbbbbbbbbbbb").await;
    let stale = a.run("net-a", "eaaaaaaaaaaaaaaa").await;
    eventually("b learns a's endpoint", || b.has_peer(VNI, &stale)).await;
    // Two records with one address: the address binding now prevents it
    // (tests/address_binding.rs), but records written before it existed,
    // or by another version, can still pair up. c's record is written as
    // such a record would be: same address, so the same derived MAC.
    let owner = fake_host::Ep {
        network_id: "net-c".into(),
        endpoint_id: "ecccccccccccccccc".into(),
        vtep: c.vtep(),
        ..stale.clone()
    };
    let record = rustoverlay::state::records::EndpointRecord {
        endpoint_id: owner.endpoint_id.clone(),
        network_id: owner.network_id.clone(),
        host: "c".into(),
        vtep: owner.vtep,
        mac: rustoverlay::util::mac::format_mac(&owner.mac),
        ipv4: Some(owner.addr),
        ipv6: None,
        created_at: rustoverlay::util::clock::unix_now(),
        created_ms: 0,
    };
    s.put(
        &keys::endpoint(&net_a.overlay, &owner.endpoint_id),
        rustoverlay::state::codec::encode(&record),
    )
    .await
    .unwrap();
    eventually("b sends the address to its new owner's host", || {
        b.has_peer(VNI, &owner)
    })
    .await;
    // The stale record goes (the orphan sweep, or a late DeleteEndpoint).
    s.delete(&keys::endpoint(&net_a.overlay, &stale.endpoint_id))
        .await
        .unwrap();
    // A marker endpoint after it: once b has it, b has applied the delete.
    let marker = a.run("net-a", "emmmmmmmmmmmmmmm").await;
    eventually("b applied everything up to the marker", || {
        b.has_peer(VNI, &marker)
    })
    .await;
    assert_eq!(
        b.kernel_peers(VNI),
        exactly(&[&owner, &marker]),
        "the new owner's entries survive the stale record's removal"
    );
    let _ = eb;
}
