//! The three races of the per-host loops, each made deterministic by holding
//! one side in the fake data plane at the moment that matters:
//!
//! - a Join while start-up reconciliation removes an overlay's devices;
//! - a host's registration going away while peer sync resyncs;
//! - an address deleted and taken again while peer sync is busy, so the two
//!   events reach it back to back.

mod fake_host;

use fake_host::{entered, eventually, exactly, finish, store, Host, SUBNET, SUBNET_2, VNI, VNI_2};
use rustoverlay::dataplane::fake::FakeOp;
use rustoverlay::dataplane::Dataplane;
use std::collections::BTreeSet;

/// Start-up reconciliation decides from one read of the store which
/// overlays have a local endpoint, then visits the kernel's overlays one by
/// one. A Join that adds the first local endpoint of an overlay after that
/// read must keep its devices: the reconciler re-checks under the overlay's
/// lock before removing anything.
///
/// Deterministic: the reconciler is held in its first overlay (VNI 256, which
/// has a local endpoint: `EndpointPorts`, in `remove_stale_ports`) after it
/// has read the store; the whole Join on the second overlay (VNI 257, devices
/// left over, no local endpoint at that read) runs then; the reconciler is
/// released and reaches VNI 257 afterwards.
#[tokio::test]
async fn a_join_during_start_up_reconciliation_keeps_the_devices_it_built() {
    let s = store();
    let a = Host::start(&s, "a", "192.0.2.1").await;
    let b = Host::start(&s, "b", "192.0.2.2").await;
    a.create_network("net-a", SUBNET).await;
    a.create_network("net-a2", SUBNET_2).await;
    b.create_network("net-b", SUBNET).await;
    b.create_network("net-b2", SUBNET_2).await;
    let ea2 = a.run("net-a2", "ea2aaaaaaaaaaaaa").await;
    b.run("net-b", "ebbbbbbbbbbbbbbb").await;
    // Devices of the second overlay left over from an earlier run.
    b.fake.ensure_network(VNI_2).await.unwrap();

    let b = b.restart();
    let held = b.fake.hold_next(FakeOp::EndpointPorts);
    let reconciler = b.reconciler.clone();
    let recovery = tokio::spawn(async move { reconciler.recover().await });
    entered(held.entered, "the reconciler in the first overlay").await;

    // The Join of the second overlay's first local endpoint, start to end.
    let eb2 = b.create_endpoint("net-b2", "eb2bbbbbbbbbbbbb").await;
    finish("Join", b.driver.join("net-b2", &eb2.endpoint_id))
        .await
        .unwrap();
    assert!(b.has_port(VNI_2, &eb2.endpoint_id));

    held.release.send(()).unwrap();
    finish("recovery", recovery).await.unwrap().unwrap();

    assert_eq!(
        b.fake.calls(FakeOp::RemoveNetwork),
        0,
        "the reconciler removed devices"
    );
    assert_eq!(
        b.fake.network(VNI_2).map(|n| n.ports),
        Some(BTreeSet::from(["eb2bbbbbbbbb".to_string()])),
        "the Join's devices and port survived the reconciler"
    );
    eventually("peer sync runs for the joined overlay", || {
        b.has_peer(VNI_2, &ea2)
    })
    .await;
}

/// The other order: the reconciler has decided under the overlay's lock and
/// is removing the devices when the Join comes. The Join waits for the lock
/// and builds the devices again.
///
/// Deterministic: the reconciler is held inside `RemoveNetwork` (holding the
/// overlay's lock); the Join is spawned and given every chance to run (it
/// needs no I/O that could pend, only the lock); it must still be waiting.
#[tokio::test]
async fn a_join_waits_for_the_reconcilers_removal_and_builds_the_devices_again() {
    let s = store();
    let a = Host::start(&s, "a", "192.0.2.1").await;
    let b = Host::start(&s, "b", "192.0.2.2").await;
    a.create_network("net-a", SUBNET).await;
    b.create_network("net-b", SUBNET).await;
    let ea = a.run("net-a", "eaaaaaaaaaaaaaaa").await;
    b.fake.ensure_network(VNI).await.unwrap();

    let b = b.restart();
    let held = b.fake.hold_next(FakeOp::RemoveNetwork);
    let reconciler = b.reconciler.clone();
    let recovery = tokio::spawn(async move { reconciler.recover().await });
    entered(held.entered, "the reconciler removing the devices").await;

    let eb = b.create_endpoint("net-b", "ebbbbbbbbbbbbbbb").await;
    let driver = b.driver.clone();
    let id = eb.endpoint_id.clone();
    let join = tokio::spawn(async move { driver.join("net-b", &id).await });
    for _ in 0..100 {
        tokio::task::yield_now().await;
    }
    assert!(
        !join.is_finished(),
        "the Join ran while the reconciler held the overlay's lock"
    );
    assert_eq!(b.fake.calls(FakeOp::CreateEndpointLink), 0);

    held.release.send(()).unwrap();
    finish("recovery", recovery).await.unwrap().unwrap();
    finish("Join", join).await.unwrap().unwrap();

    assert!(b.has_port(VNI, &eb.endpoint_id), "devices and port exist");
    eventually("peer sync runs for the overlay", || b.has_peer(VNI, &ea)).await;
}

/// A resync computes the wanted entries from the live set, then reads the
/// kernel. A registration that goes away after the live set was read must
/// not be lost: the liveness change made during the resync triggers another
/// one (`mark_unchanged` comes first in `resync`, and `stale` answers it).
///
/// Deterministic: b's first resync is held in its kernel read (`Peers`),
/// after it computed that a's endpoint is wanted; a's registration is deleted
/// and b's live set has seen it; then the resync goes on and installs a's
/// entries from what it computed.
#[tokio::test]
async fn a_host_that_goes_away_during_a_resync_loses_its_entries() {
    let s = store();
    let a = Host::start(&s, "a", "192.0.2.1").await;
    let b = Host::start(&s, "b", "192.0.2.2").await;
    a.create_network("net-a", SUBNET).await;
    b.create_network("net-b", SUBNET).await;
    let ea = a.run("net-a", "eaaaaaaaaaaaaaaa").await;
    b.sees_registered("a", true).await;

    let held = b.fake.hold_next(FakeOp::Peers);
    b.run("net-b", "ebbbbbbbbbbbbbbb").await; // starts b's peer sync
    entered(held.entered, "b's first resync reading the kernel").await;
    a.unregister().await;
    b.sees_registered("a", false).await;
    held.release.send(()).unwrap();

    // The held resync installs a's entries from its stale view...
    eventually("the held resync finished", || {
        b.fake.calls(FakeOp::AddPeer) >= 1
    })
    .await;
    // ...and the liveness change it missed removes them again.
    eventually("a's entries go once a is unregistered", || {
        b.lacks_peer(VNI, &ea)
    })
    .await;

    a.register().await;
    eventually("a's entries come back with its registration", || {
        b.has_peer(VNI, &ea)
    })
    .await;
    assert_eq!(b.kernel_peers(VNI), exactly(&[&ea]));
}

/// Three hosts; `b` follows the overlay. `a`'s endpoint E1 (address X) is
/// deleted and X is taken again by E2, while b's peer sync is held removing
/// E1's entries, so b sees the delete and the put back to back. At the end
/// b holds exactly E2's entries for X. A marker endpoint created afterwards
/// shows b has applied everything before it.
async fn delete_and_retake_an_address_while_peer_sync_is_busy(retake_on_c: bool) {
    let s = store();
    let a = Host::start(&s, "a", "192.0.2.1").await;
    let b = Host::start(&s, "b", "192.0.2.2").await;
    let c = Host::start(&s, "c", "192.0.2.3").await;
    a.create_network("net-a", SUBNET).await;
    b.create_network("net-b", SUBNET).await;
    c.create_network("net-c", SUBNET).await;
    b.run("net-b", "ebbbbbbbbbbbbbbb").await;
    let e1 = a.run("net-a", "e1aaaaaaaaaaaaaa").await;
    eventually("b learns E1", || b.has_peer(VNI, &e1)).await;

    let held = b.fake.hold_next(FakeOp::RemovePeer);
    a.stop(&e1).await;
    entered(held.entered, "b removing E1's entries").await;
    let e2 = if retake_on_c {
        // Same address, so the same derived MAC, on another host's VTEP.
        let e2 = c
            .create_endpoint_with("net-c", "e2ccccccccccccccc", Some(e1.ip()), None)
            .await;
        c.driver.join("net-c", &e2.endpoint_id).await.unwrap();
        assert_eq!(e2.mac, e1.mac);
        e2
    } else {
        // Same address, another MAC, same host.
        let mac = [0x02, 0x42, 0, 0, 0, 0x22];
        let e2 = a
            .create_endpoint_with("net-a", "e2aaaaaaaaaaaaaa", Some(e1.ip()), Some(mac))
            .await;
        a.driver.join("net-a", &e2.endpoint_id).await.unwrap();
        e2
    };
    assert_eq!(e2.ip(), e1.ip());
    held.release.send(()).unwrap();

    let marker = a.run("net-a", "markerxxxxxxxxxx").await;
    eventually("b applied everything up to the marker", || {
        b.has_peer(VNI, &marker)
    })
    .await;
    assert_eq!(
        b.kernel_peers(VNI),
        exactly(&[&e2, &marker]),
        "b holds E2's entries for {}, nothing of E1",
        e1.ip()
    );
}

#[tokio::test]
async fn an_address_deleted_and_retaken_by_another_host_ends_with_the_new_hosts_entries() {
    delete_and_retake_an_address_while_peer_sync_is_busy(true).await;
}

#[tokio::test]
async fn an_address_deleted_and_retaken_with_another_mac_ends_with_only_the_new_macs_entries() {
    delete_and_retake_an_address_while_peer_sync_is_busy(false).await;
}

/// The same two events reaching b while its peer sync is held adding E1's
/// entries, so that E1's put, delete and E2's put are applied back to back.
#[tokio::test]
async fn an_address_deleted_and_retaken_while_its_first_owner_is_being_added() {
    let s = store();
    let a = Host::start(&s, "a", "192.0.2.1").await;
    let b = Host::start(&s, "b", "192.0.2.2").await;
    let c = Host::start(&s, "c", "192.0.2.3").await;
    a.create_network("net-a", SUBNET).await;
    b.create_network("net-b", SUBNET).await;
    c.create_network("net-c", SUBNET).await;
    b.run("net-b", "ebbbbbbbbbbbbbbb").await;
    eventually("b's first resync done", || b.fake.calls(FakeOp::Peers) >= 1).await;

    let held = b.fake.hold_next(FakeOp::AddPeer);
    let e1 = a.run("net-a", "e1aaaaaaaaaaaaaa").await;
    entered(held.entered, "b adding E1's entries").await;
    a.stop(&e1).await;
    let e2 = c
        .create_endpoint_with("net-c", "e2ccccccccccccccc", Some(e1.ip()), None)
        .await;
    held.release.send(()).unwrap();

    let marker = a.run("net-a", "markerxxxxxxxxxx").await;
    eventually("b applied everything up to the marker", || {
        b.has_peer(VNI, &marker)
    })
    .await;
    assert_eq!(b.kernel_peers(VNI), exactly(&[&e2, &marker]));
    assert!(b.fake.network(VNI).is_some());
    assert!(b.fake.local_vnis().contains(&VNI));
}
