//! Reconciliation on a fake kernel: start-up recovery makes the kernel match
//! the store, and the orphan sweep removes this host's endpoints that lost
//! their containers while the store was unreachable.

mod fake_host;

use fake_host::{eventually, store, Host, SUBNET, SUBNET_2, VNI, VNI_2};
use rustoverlay::dataplane::fake::FakeOp;
use rustoverlay::dataplane::{Dataplane, PeerEntry};
use rustoverlay::error::PluginError;
use rustoverlay::state::codec::encode;
use rustoverlay::state::keys;
use rustoverlay::state::records::{EndpointRecord, LocalNetwork};
use rustoverlay::util::clock::unix_now;
use rustoverlay::util::mac::{format_mac, mac_for};
use std::collections::BTreeSet;
use std::net::IpAddr;
use std::time::Duration;

const HOUR: Duration = Duration::from_secs(3600);

/// An endpoint record of `h` written straight into the store, created
/// `age_secs` ago, with a freshly allocated address.
async fn old_endpoint(h: &Host, net: &LocalNetwork, id: &str, age_secs: u64) -> IpAddr {
    let pool = rustoverlay::control::ipam::pool_id(&net.subnets[0]);
    let addr = h.ipam.request_address(&pool, None, false).await.unwrap();
    let rec = EndpointRecord {
        endpoint_id: id.into(),
        network_id: net.network_id.clone(),
        host: h.name.clone(),
        vtep: h.vtep(),
        mac: format_mac(&mac_for(Some(addr.ip()))),
        ipv4: Some(addr),
        ipv6: None,
        created_at: unix_now() - age_secs,
        created_ms: 0,
    };
    h.store
        .put(&keys::endpoint(&net.overlay, id), encode(&rec))
        .await
        .unwrap();
    addr.ip()
}

async fn endpoint_exists(h: &Host, net: &LocalNetwork, id: &str) -> bool {
    h.overlays.get_endpoint(net, id).await.unwrap().is_some()
}

#[tokio::test]
async fn recover_removes_unused_devices_and_stale_ports_and_resumes_peer_sync() {
    let s = store();
    let a = Host::start(&s, "a", "192.0.2.1").await;
    let b = Host::start(&s, "b", "192.0.2.2").await;
    a.create_network("net-a", SUBNET).await;
    b.create_network("net-b", SUBNET).await;
    b.create_network("net-b2", SUBNET_2).await;
    let ea = a.run("net-a", "eaaaaaaaaaaaaaaa").await;
    let eb = b.run("net-b", "ebbbbbbbbbbbbbbb").await;
    let eb2 = b.run("net-b2", "eb2bbbbbbbbbbbbb").await;
    eventually("b learns a's endpoint", || b.has_peer(VNI, &ea)).await;

    // b's plugin goes down. Meanwhile its endpoint on the second overlay is
    // removed from the store (reclaimed), a leftover port of an endpoint the
    // store never held sits on the first overlay's bridge, and a's endpoint
    // is replaced by another one.
    let b = b.restart();
    let net_b2 = b.overlays.lookup("net-b2").await.unwrap();
    assert!(b
        .overlays
        .delete_endpoint(&net_b2, &eb2.endpoint_id)
        .await
        .unwrap());
    b.fake.plant_port(VNI, "deadbeefdeadbeef");
    a.stop(&ea).await;
    let ea2 = a.run("net-a", "ea2aaaaaaaaaaaaa").await;

    b.reconciler.recover().await.unwrap();
    assert!(
        b.fake.network(VNI_2).is_none(),
        "the overlay without a local endpoint lost its devices"
    );
    assert_eq!(
        b.fake.network(VNI).unwrap().ports,
        BTreeSet::from(["ebbbbbbbbbbb".to_string()]),
        "only the ports of endpoints the store holds for b are left"
    );
    eventually("peer sync resumed: b follows a's changes again", || {
        b.has_peer(VNI, &ea2) && b.lacks_peer(VNI, &ea)
    })
    .await;
    assert!(b.has_port(VNI, &eb.endpoint_id));
}

#[tokio::test]
async fn recover_removes_devices_of_networks_this_host_no_longer_has() {
    let h = Host::start(&store(), "h1", "192.0.2.1").await;
    h.create_network("net1", SUBNET).await;
    // Devices of an overlay this host knows nothing about (any more).
    h.fake.ensure_network(VNI_2).await.unwrap();
    h.fake.plant_peer(
        VNI_2,
        &PeerEntry {
            mac: [2, 0, 0, 0, 0, 1],
            ip: None,
            vtep: "192.0.2.9".parse().unwrap(),
        },
    );
    h.reconciler.recover().await.unwrap();
    assert!(h.fake.network(VNI_2).is_none());
    assert_eq!(h.fake.local_vnis(), Vec::<u32>::new());
}

#[tokio::test]
async fn a_failed_recovery_is_retried_until_it_succeeds() {
    let h = Host::start(&store(), "h1", "192.0.2.1").await;
    h.fake.ensure_network(VNI).await.unwrap();
    h.fake.fail_next(FakeOp::RemoveNetwork, 2);
    let err = h.reconciler.recover().await.unwrap_err();
    assert!(matches!(err, PluginError::Dataplane(_)), "{err:?}");
    assert!(h.fake.network(VNI).is_some());
    // The first attempt fails too; the loop tries again after a pause.
    fake_host::finish("recovery", h.reconciler.recover_until_done()).await;
    assert!(h.fake.network(VNI).is_none());
    assert_eq!(h.fake.calls(FakeOp::RemoveNetwork), 3);
}

#[tokio::test]
async fn the_sweep_removes_an_old_endpoint_without_a_port_and_frees_its_address() {
    let s = store();
    let h = Host::start(&s, "h1", "192.0.2.1").await;
    let other = Host::start(&s, "h2", "192.0.2.2").await;
    let net = h.create_network("net1", SUBNET).await;
    other.create_network("net2", SUBNET).await;
    let pool = rustoverlay::control::ipam::pool_id(&net.subnets[0]);

    // Old, its container gone: an orphan.
    let orphan_ip = old_endpoint(&h, &net, "orphanxxxxxxxxxx", 2 * 3600).await;
    // Old but joined (it has a bridge port): a long-running container.
    old_endpoint(&h, &net, "runningxxxxxxxxx", 2 * 3600).await;
    h.driver.join("net1", "runningxxxxxxxxx").await.unwrap();
    // Young: Docker joins right after creating.
    let young = h.create_endpoint("net1", "youngxxxxxxxxxxx").await;
    // Old, but another host's: not this host's to sweep.
    let theirs = other.create_endpoint("net2", "theirsxxxxxxxxxx").await;
    let net2 = other.overlays.lookup("net2").await.unwrap();
    let mut rec = other
        .overlays
        .get_endpoint(&net2, &theirs.endpoint_id)
        .await
        .unwrap()
        .unwrap()
        .0;
    rec.created_at -= 2 * 3600;
    s.put(
        &keys::endpoint(&net2.overlay, &theirs.endpoint_id),
        encode(&rec),
    )
    .await
    .unwrap();

    let err = other
        .ipam
        .request_address(&pool, Some(orphan_ip), false)
        .await
        .unwrap_err();
    assert!(
        matches!(err, PluginError::Conflict(_)),
        "held before the sweep"
    );

    assert_eq!(h.reconciler.sweep_orphans(HOUR).await.unwrap(), 1);
    assert!(!endpoint_exists(&h, &net, "orphanxxxxxxxxxx").await);
    assert!(endpoint_exists(&h, &net, "runningxxxxxxxxx").await);
    assert!(endpoint_exists(&h, &net, &young.endpoint_id).await);
    assert!(endpoint_exists(&other, &net2, &theirs.endpoint_id).await);
    assert!(h.has_port(VNI, "runningxxxxxxxxx"));
    other
        .ipam
        .request_address(&pool, Some(orphan_ip), false)
        .await
        .expect("the orphan's address is free again");

    // A sweep with no age limit takes the young one too, never the joined.
    assert_eq!(h.reconciler.sweep_orphans(Duration::ZERO).await.unwrap(), 1);
    assert!(!endpoint_exists(&h, &net, &young.endpoint_id).await);
    assert!(endpoint_exists(&h, &net, "runningxxxxxxxxx").await);
    assert_eq!(h.reconciler.sweep_orphans(Duration::ZERO).await.unwrap(), 0);
}

/// Show that `h` runs no peer sync any more: `other` runs a new endpoint on
/// the overlay and, for a second, `h`'s kernel sees no peer call at all (`h`
/// has this one overlay only, so the fake's call counts are its calls). A
/// fixed wait, because it shows that something does NOT happen: a running
/// peer sync acts on the new endpoint within milliseconds.
async fn peer_sync_is_stopped(h: &Host, other: &Host, network_id: &str) {
    let ops = [FakeOp::Peers, FakeOp::AddPeer, FakeOp::RemovePeer];
    let before: Vec<usize> = ops.iter().map(|op| h.fake.calls(*op)).collect();
    other.run(network_id, "latexxxxxxxxxxxx").await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let after: Vec<usize> = ops.iter().map(|op| h.fake.calls(*op)).collect();
    assert_eq!(
        after, before,
        "calls of {ops:?}: a peer sync still acts on overlay {VNI} of {}",
        h.name
    );
}

#[tokio::test]
async fn sweeping_the_last_local_endpoint_removes_the_overlays_devices() {
    let s = store();
    let h = Host::start(&s, "h1", "192.0.2.1").await;
    let other = Host::start(&s, "h2", "192.0.2.2").await;
    let net = h.create_network("net1", SUBNET).await;
    other.create_network("net2", SUBNET).await;
    let theirs = other.run("net2", "theirsxxxxxxxxxx").await;
    let e1 = h.run("net1", "e1aaaaaaaaaaaaaa").await;
    // Created, never joined: its container went while the store was
    // unreachable.
    let orphan = h.create_endpoint("net1", "orphanxxxxxxxxxx").await;
    eventually("h1's peer sync installs h2's endpoint", || {
        h.has_peer(VNI, &theirs)
    })
    .await;
    h.stop(&e1).await;
    assert_eq!(
        h.fake.network(VNI).map(|n| n.ports),
        Some(BTreeSet::new()),
        "the orphan, a local endpoint, keeps the devices"
    );

    assert_eq!(h.reconciler.sweep_orphans(Duration::ZERO).await.unwrap(), 1);
    assert!(!endpoint_exists(&h, &net, &orphan.endpoint_id).await);
    assert!(
        h.fake.network(VNI).is_none(),
        "the devices went with the overlay's last local endpoint"
    );
    peer_sync_is_stopped(&h, &other, "net2").await;
}

#[tokio::test]
async fn recover_stops_the_peer_sync_of_an_overlay_whose_devices_it_removes() {
    let s = store();
    let h = Host::start(&s, "h1", "192.0.2.1").await;
    let other = Host::start(&s, "h2", "192.0.2.2").await;
    let net = h.create_network("net1", SUBNET).await;
    other.create_network("net2", SUBNET).await;
    let theirs = other.run("net2", "theirsxxxxxxxxxx").await;
    let e1 = h.run("net1", "e1aaaaaaaaaaaaaa").await;
    eventually("h1's peer sync installs h2's endpoint", || {
        h.has_peer(VNI, &theirs)
    })
    .await;

    // The endpoint goes from the store behind the driver's back (reclaimed
    // while h1 was cut off): devices and peer sync are left over.
    assert!(h
        .overlays
        .delete_endpoint(&net, &e1.endpoint_id)
        .await
        .unwrap());
    h.reconciler.recover().await.unwrap();
    assert!(
        h.fake.network(VNI).is_none(),
        "recovery removed the devices of the overlay without a local endpoint"
    );
    peer_sync_is_stopped(&h, &other, "net2").await;
}
