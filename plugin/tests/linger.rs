//! `--linger`: an overlay's devices outlive the host's last endpoint on it by
//! the linger (so the next container attaches without building them), are
//! kept by an endpoint that comes meanwhile, counted from the newest
//! departure, and go at once with the network. Two hosts on a real etcd,
//! real netlink in namespaces.

mod support;

use serde_json::json;
use std::time::{Duration, Instant};
use support::calls::{create_network, join, wait_until};
use support::{Client, Lan, Plugin, Store};

const VNI: u32 = 256;
const LINGER: Duration = Duration::from_secs(3);

/// What `docker rm` does to an endpoint: Leave, then DeleteEndpoint.
async fn remove(c: &Client, network: &str, endpoint: &str) {
    let ids = json!({"NetworkID": network, "EndpointID": endpoint});
    c.call("NetworkDriver.Leave", ids.clone()).await.ok();
    c.call("NetworkDriver.DeleteEndpoint", ids).await.ok();
}

/// The VXLAN device's interface index in the overlay namespace: a rebuilt
/// device gets a new one.
fn vxlan_index(p: &Plugin) -> String {
    let out = p.in_overlay(VNI, &["ip", "-o", "link", "show", &format!("ro-vx-{VNI}")]);
    out.split(':').next().unwrap_or_default().trim().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs root: scripts/test runs this tier"]
async fn devices_outlive_the_last_endpoint_by_the_linger_and_go_with_the_network() {
    let mut lan = Lan::new();
    let url = lan.start_store(Store::Etcd).await;
    let linger = format!("--linger={}", LINGER.as_secs());
    let (ns1, ns2) = (lan.host(1), lan.host(2));
    let p1 = Plugin::start_with(&ns1, &Plugin::dir_for("lg1"), "h1", &url, &[&linger]).await;
    let p2 = Plugin::start_with(&ns2, &Plugin::dir_for("lg2"), "h2", &url, &[&linger]).await;
    let (c1, c2) = (p1.client(), p2.client());
    create_network(&c1, "net1").await;
    create_network(&c2, "net2").await;
    join(&c1, "net1", "ep1aaaaaaaaaaaa").await;
    let (_, _, mac2) = join(&c2, "net2", "ep2bbbbbbbbbbbb").await;
    let fdb = |p: &Plugin| {
        p.in_overlay(
            VNI,
            &["bridge", "fdb", "show", "dev", &format!("ro-vx-{VNI}")],
        )
    };
    wait_until("h1 learns h2's endpoint", Duration::from_secs(5), || {
        fdb(&p1).contains(&mac2)
    })
    .await;
    let index = vxlan_index(&p1);
    assert!(!index.is_empty(), "no VXLAN device on h1");

    // The last endpoint leaves: the devices stay, and peer sync with them.
    remove(&c1, "net1", "ep1aaaaaaaaaaaa").await;
    let left = Instant::now();
    tokio::time::sleep(LINGER / 2).await;
    assert!(
        p1.has_overlay(VNI),
        "h1 removed its devices before the linger ended"
    );
    assert!(
        fdb(&p1).contains(&mac2),
        "h1 dropped h2's entry while lingering"
    );

    // A container meanwhile finds them as they were, and ends that wait.
    join(&c1, "net1", "ep3ccccccccccccc").await;
    assert_eq!(
        vxlan_index(&p1),
        index,
        "the lingering VXLAN device was rebuilt"
    );
    tokio::time::sleep(LINGER.saturating_sub(left.elapsed()) + Duration::from_secs(1)).await;
    assert!(
        p1.has_overlay(VNI),
        "the first wait removed devices a new endpoint uses"
    );

    // The linger counts from the newest departure.
    remove(&c1, "net1", "ep3ccccccccccccc").await;
    let left = Instant::now();
    tokio::time::sleep(LINGER - Duration::from_secs(1)).await;
    assert!(
        p1.has_overlay(VNI),
        "h1 removed its devices before the linger ended"
    );
    let took = wait_until(
        "h1 removes the lingering devices",
        Duration::from_secs(5),
        || !p1.has_overlay(VNI),
    )
    .await;
    eprintln!(
        "devices removed {:?} after the last endpoint left",
        left.elapsed()
    );
    assert!(
        left.elapsed() >= LINGER,
        "removed after {:?}, before the linger of {LINGER:?} ({took:?} of polling)",
        left.elapsed()
    );
    assert!(
        p2.has_overlay(VNI),
        "h2, with its endpoint, kept its devices"
    );

    // Removing the network removes lingering devices at once.
    join(&c1, "net1", "ep4dddddddddddd").await;
    remove(&c1, "net1", "ep4dddddddddddd").await;
    assert!(p1.has_overlay(VNI), "the devices should linger after ep4");
    c1.call("NetworkDriver.DeleteNetwork", json!({"NetworkID": "net1"}))
        .await
        .ok();
    assert!(
        !p1.has_overlay(VNI),
        "DeleteNetwork left the lingering devices in place"
    );
    drop((p1, p2));
}
