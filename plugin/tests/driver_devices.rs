//! The driver on one host, through the fake data plane: an overlay's devices
//! follow its local endpoints, failed Joins undo what they built, and every
//! Docker call can be replayed.

mod fake_host;

use fake_host::{store, Host, SUBNET, VNI};
use rustoverlay::dataplane::fake::FakeOp;
use rustoverlay::driver::EndpointSpec;
use rustoverlay::error::PluginError;
use rustoverlay::state::codec::encode;
use rustoverlay::state::keys;
use rustoverlay::util::mac::format_mac;
use std::collections::BTreeSet;

fn ports(h: &Host) -> BTreeSet<String> {
    h.fake.network(VNI).expect("the overlay's devices").ports
}

#[tokio::test]
async fn the_first_join_builds_the_overlays_devices_and_the_last_delete_endpoint_removes_them() {
    let h = Host::start(&store(), "h1", "192.0.2.1").await;
    h.create_network("net1", SUBNET).await;
    let e1 = h.create_endpoint("net1", "e1aaaaaaaaaaaaaa").await;
    assert!(
        h.fake.network(VNI).is_none(),
        "CreateEndpoint builds no devices"
    );

    h.driver.join("net1", &e1.endpoint_id).await.unwrap();
    assert_eq!(ports(&h), BTreeSet::from(["e1aaaaaaaaaa".to_string()]));

    let e2 = h.run("net1", "e2bbbbbbbbbbbbbb").await;
    assert_eq!(
        ports(&h),
        BTreeSet::from(["e1aaaaaaaaaa".to_string(), "e2bbbbbbbbbb".to_string()])
    );
    assert_eq!(
        h.fake.calls(FakeOp::RemoveNetwork),
        0,
        "nothing removed yet"
    );

    h.stop(&e1).await;
    assert_eq!(
        ports(&h),
        BTreeSet::from(["e2bbbbbbbbbb".to_string()]),
        "a second local endpoint keeps the devices"
    );

    h.stop(&e2).await;
    assert!(
        h.fake.network(VNI).is_none(),
        "the last local endpoint takes the devices with it"
    );
}

#[tokio::test]
async fn leave_removes_the_port_and_delete_endpoint_then_the_devices() {
    let h = Host::start(&store(), "h1", "192.0.2.1").await;
    h.create_network("net1", SUBNET).await;
    let e1 = h.run("net1", "e1aaaaaaaaaaaaaa").await;
    h.driver.leave("net1", &e1.endpoint_id).await.unwrap();
    assert!(ports(&h).is_empty(), "Leave removes the veth pair");
    h.driver
        .delete_endpoint("net1", &e1.endpoint_id)
        .await
        .unwrap();
    assert!(h.fake.network(VNI).is_none());
}

#[tokio::test]
async fn a_failed_first_join_leaves_no_devices_behind() {
    let h = Host::start(&store(), "h1", "192.0.2.1").await;
    h.create_network("net1", SUBNET).await;
    let e1 = h.create_endpoint("net1", "e1aaaaaaaaaaaaaa").await;
    h.fake.fail_next(FakeOp::CreateEndpointLink, 1);

    let err = h.driver.join("net1", &e1.endpoint_id).await.unwrap_err();
    assert!(matches!(err, PluginError::Dataplane(_)), "{err:?}");
    assert_eq!(
        h.fake.calls(FakeOp::EnsureNetwork),
        1,
        "the Join built the overlay's devices before its veth pair failed"
    );
    assert!(
        h.fake.network(VNI).is_none(),
        "the failed Join removed the devices it built: {:?}",
        h.fake.network(VNI)
    );
}

#[tokio::test]
async fn a_failed_join_keeps_the_devices_of_other_endpoints_and_delete_endpoint_cleans_up() {
    let h = Host::start(&store(), "h1", "192.0.2.1").await;
    let net = h.create_network("net1", SUBNET).await;
    let e1 = h.run("net1", "e1aaaaaaaaaaaaaa").await;
    let e2 = h.create_endpoint("net1", "e2bbbbbbbbbbbbbb").await;
    h.fake.fail_next(FakeOp::CreateEndpointLink, 1);

    let err = h.driver.join("net1", &e2.endpoint_id).await.unwrap_err();
    assert!(matches!(err, PluginError::Dataplane(_)), "{err:?}");
    assert_eq!(
        ports(&h),
        BTreeSet::from(["e1aaaaaaaaaa".to_string()]),
        "the joined endpoint keeps its port and the devices"
    );
    assert_eq!(
        h.fake.calls(FakeOp::RemoveNetwork),
        0,
        "a Join that built nothing removes nothing"
    );

    // Docker's clean-up after the failed Join.
    h.driver
        .delete_endpoint("net1", &e2.endpoint_id)
        .await
        .unwrap();
    h.ipam.release_address(&e2.pool, e2.ip()).await.unwrap();
    assert!(h
        .overlays
        .get_endpoint(&net, &e2.endpoint_id)
        .await
        .unwrap()
        .is_none());
    assert_eq!(
        ports(&h),
        BTreeSet::from(["e1aaaaaaaaaa".to_string()]),
        "the other endpoint still needs the devices"
    );

    h.stop(&e1).await;
    assert!(
        h.fake.network(VNI).is_none(),
        "the last local endpoint takes the devices with it"
    );
}

#[tokio::test]
async fn delete_endpoint_after_a_failed_first_join_removes_the_devices() {
    let h = Host::start(&store(), "h1", "192.0.2.1").await;
    let net = h.create_network("net1", SUBNET).await;

    // The failed Join cleaned up after itself: DeleteEndpoint leaves nothing.
    let e1 = h.create_endpoint("net1", "e1aaaaaaaaaaaaaa").await;
    h.fake.fail_next(FakeOp::CreateEndpointLink, 1);
    h.driver.join("net1", &e1.endpoint_id).await.unwrap_err();
    h.driver
        .delete_endpoint("net1", &e1.endpoint_id)
        .await
        .expect("DeleteEndpoint after a failed Join");
    assert!(h.fake.network(VNI).is_none(), "no devices left");
    assert!(
        h.overlays
            .get_endpoint(&net, &e1.endpoint_id)
            .await
            .unwrap()
            .is_none(),
        "no endpoint record left"
    );

    // The failed Join could not remove its devices either: DeleteEndpoint
    // removes them.
    let e2 = h.create_endpoint("net1", "e2bbbbbbbbbbbbbb").await;
    h.fake.fail_next(FakeOp::CreateEndpointLink, 1);
    h.fake.fail_next(FakeOp::RemoveNetwork, 1);
    h.driver.join("net1", &e2.endpoint_id).await.unwrap_err();
    assert_eq!(
        h.fake.network(VNI).map(|n| n.ports),
        Some(BTreeSet::new()),
        "the Join's own removal failed and left the devices"
    );
    h.driver
        .delete_endpoint("net1", &e2.endpoint_id)
        .await
        .expect("DeleteEndpoint after a failed Join");
    assert!(
        h.fake.network(VNI).is_none(),
        "DeleteEndpoint removed the devices the failed Join left"
    );
    assert!(
        h.overlays
            .get_endpoint(&net, &e2.endpoint_id)
            .await
            .unwrap()
            .is_none(),
        "no endpoint record left"
    );
}

#[tokio::test]
async fn create_endpoint_replayed_with_the_same_spec_succeeds_and_a_different_one_is_refused() {
    let s = store();
    let h = Host::start(&s, "h1", "192.0.2.1").await;
    let net = h.create_network("net1", SUBNET).await;
    let e1 = h.create_endpoint("net1", "e1aaaaaaaaaaaaaa").await;
    let spec = EndpointSpec {
        network_id: "net1".into(),
        endpoint_id: e1.endpoint_id.clone(),
        ipv4: Some(e1.addr),
        ipv6: None,
        mac: None,
    };
    // The replay comes later than the first call: only the creation time
    // differs.
    let (mut first, _) = h
        .overlays
        .get_endpoint(&net, &e1.endpoint_id)
        .await
        .unwrap()
        .unwrap();
    first.created_at -= 60;
    s.put(
        &keys::endpoint(&net.overlay, &e1.endpoint_id),
        encode(&first),
    )
    .await
    .unwrap();

    let given = h
        .driver
        .create_endpoint(spec.clone())
        .await
        .expect("a replay of CreateEndpoint succeeds");
    assert_eq!(
        given,
        Some(format_mac(&e1.mac)),
        "the replay gives the same MAC"
    );

    let other = h.ipam.request_address(&e1.pool, None, false).await.unwrap();
    let err = h
        .driver
        .create_endpoint(EndpointSpec {
            ipv4: Some(other),
            ..spec.clone()
        })
        .await
        .unwrap_err();
    assert!(
        matches!(err, PluginError::Conflict(_)),
        "the same endpoint ID with another address: {err:?}"
    );
    let err = h
        .driver
        .create_endpoint(EndpointSpec {
            mac: Some([0x02, 0, 0, 0, 0, 0x42]),
            ..spec
        })
        .await
        .unwrap_err();
    assert!(
        matches!(err, PluginError::Conflict(_)),
        "the same endpoint ID with another MAC: {err:?}"
    );

    let (kept, _) = h
        .overlays
        .get_endpoint(&net, &e1.endpoint_id)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(kept, first, "the endpoint's record is unchanged");
}

#[tokio::test]
async fn join_replayed_returns_the_same_name() {
    let h = Host::start(&store(), "h1", "192.0.2.1").await;
    h.create_network("net1", SUBNET).await;
    let e1 = h.create_endpoint("net1", "e1aaaaaaaaaaaaaa").await;
    let first = h.driver.join("net1", &e1.endpoint_id).await.unwrap();
    let again = h
        .driver
        .join("net1", &e1.endpoint_id)
        .await
        .expect("a replayed Join succeeds");
    assert_eq!(again, first, "the replay names the same interface");
    assert_eq!(ports(&h), BTreeSet::from(["e1aaaaaaaaaa".to_string()]));
    assert_eq!(
        h.fake.calls(FakeOp::RemoveNetwork),
        0,
        "nothing was removed"
    );
}

#[tokio::test]
async fn delete_endpoint_and_delete_network_twice_succeed() {
    let h = Host::start(&store(), "h1", "192.0.2.1").await;
    h.create_network("net1", SUBNET).await;
    let e1 = h.run("net1", "e1aaaaaaaaaaaaaa").await;
    h.driver.leave("net1", &e1.endpoint_id).await.unwrap();

    for attempt in 1..=2 {
        h.driver
            .delete_endpoint("net1", &e1.endpoint_id)
            .await
            .unwrap_or_else(|e| panic!("DeleteEndpoint #{attempt}: {e}"));
    }
    assert!(h.fake.network(VNI).is_none());
    h.ipam.release_address(&e1.pool, e1.ip()).await.unwrap();

    for attempt in 1..=2 {
        h.driver
            .delete_network("net1")
            .await
            .unwrap_or_else(|e| panic!("DeleteNetwork #{attempt}: {e}"));
    }
    let err = h.overlays.lookup("net1").await.unwrap_err();
    assert!(matches!(err, PluginError::Unknown(_)), "{err:?}");
    // A DeleteEndpoint that comes after its network is gone has nothing left
    // to do.
    h.driver
        .delete_endpoint("net1", &e1.endpoint_id)
        .await
        .expect("DeleteEndpoint after DeleteNetwork");
    assert!(h.fake.network(VNI).is_none());
}

#[tokio::test]
async fn an_endpoint_of_another_host_is_refused_on_join_and_delete() {
    let s = store();
    let a = Host::start(&s, "a", "192.0.2.1").await;
    let b = Host::start(&s, "b", "192.0.2.2").await;
    let net_a = a.create_network("net-a", SUBNET).await;
    let net_b = b.create_network("net-b", SUBNET).await;
    assert_eq!(net_a.overlay, net_b.overlay, "one subnet, one overlay");
    let ea = a.run("net-a", "eaaaaaaaaaaaaaaa").await;
    let before = a
        .overlays
        .get_endpoint(&net_a, &ea.endpoint_id)
        .await
        .unwrap();
    assert!(before.is_some());

    let err = b.driver.join("net-b", &ea.endpoint_id).await.unwrap_err();
    assert!(
        matches!(err, PluginError::Conflict(_)),
        "b's Join of a's endpoint: {err:?}"
    );
    let err = b
        .driver
        .delete_endpoint("net-b", &ea.endpoint_id)
        .await
        .unwrap_err();
    assert!(
        matches!(err, PluginError::Conflict(_)),
        "b's DeleteEndpoint of a's endpoint: {err:?}"
    );

    assert_eq!(
        a.overlays
            .get_endpoint(&net_a, &ea.endpoint_id)
            .await
            .unwrap(),
        before,
        "a's endpoint record is untouched"
    );
    assert!(
        a.has_port(VNI, &ea.endpoint_id),
        "a's devices are untouched"
    );
    assert!(
        b.fake.network(VNI).is_none(),
        "b built no devices for a's endpoint"
    );
    assert_eq!(b.fake.calls(FakeOp::RemoveEndpointLink), 0);
}

#[tokio::test]
async fn delete_network_keeps_the_devices_while_another_local_network_uses_the_overlay() {
    let h = Host::start(&store(), "h1", "192.0.2.1").await;
    let net1 = h.create_network("net1", SUBNET).await;
    let net2 = h.create_network("net2", SUBNET).await;
    assert_eq!(
        (net1.vni, net2.vni),
        (VNI, VNI),
        "two Docker networks of one subnet share one overlay"
    );
    let e2 = h.run("net2", "e2bbbbbbbbbbbbbb").await;

    h.driver.delete_network("net1").await.unwrap();
    assert_eq!(
        ports(&h),
        BTreeSet::from(["e2bbbbbbbbbb".to_string()]),
        "the other network's endpoint keeps its devices"
    );
    assert_eq!(h.fake.calls(FakeOp::RemoveNetwork), 0);

    h.stop(&e2).await;
    h.driver.delete_network("net2").await.unwrap();
    assert!(h.fake.network(VNI).is_none());
}

#[tokio::test]
async fn delete_network_removes_devices_left_behind_by_a_failed_removal() {
    let h = Host::start(&store(), "h1", "192.0.2.1").await;
    h.create_network("net1", SUBNET).await;
    let e1 = h.run("net1", "e1aaaaaaaaaaaaaa").await;

    // Removing the devices with the last endpoint is best effort:
    // DeleteEndpoint succeeds although the removal fails.
    h.fake.fail_next(FakeOp::RemoveNetwork, 1);
    h.stop(&e1).await;
    assert_eq!(
        h.fake.network(VNI).map(|n| n.ports),
        Some(BTreeSet::new()),
        "the failed removal left the devices"
    );

    h.driver.delete_network("net1").await.unwrap();
    assert!(
        h.fake.network(VNI).is_none(),
        "DeleteNetwork removed the leftover devices"
    );
    assert_eq!(h.fake.calls(FakeOp::RemoveNetwork), 2);
}
