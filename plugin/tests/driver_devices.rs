//! The driver on one host, through the fake data plane: an overlay's devices
//! follow its local endpoints, failed Joins undo what they built, and every
//! Docker call can be replayed.

mod fake_host;

use fake_host::{store, Host, SUBNET, VNI};
use rustoverlay::dataplane::fake::FakeOp;
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
