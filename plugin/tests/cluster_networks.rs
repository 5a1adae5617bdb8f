//! Networks defined once (`-o cluster=true`): a removal goes to every host
//! or to none, and never while a container anywhere uses the network, even
//! one created while the removal is being decided.

mod fake_host;

use fake_host::{store, HookStore, Host, SUBNET};
use kvstore_backends::KvStore;
use rustoverlay::control::cluster::Removal;
use rustoverlay::error::PluginError;
use rustoverlay::state::keys;
use rustoverlay::state::records::ClusterNetwork;
use std::sync::Arc;
use std::time::Duration;

const OVERLAY: &str = "10.77.0.0_24";

fn definition(origin: &str) -> ClusterNetwork {
    ClusterNetwork {
        name: "appnet".into(),
        origin: origin.into(),
        definition: serde_json::json!({"name": "appnet"}),
        removing: false,
    }
}

async fn stored(s: &Arc<dyn KvStore>) -> Option<ClusterNetwork> {
    let kv = s.get(&keys::cluster_network(OVERLAY)).await.unwrap()?;
    Some(serde_json::from_slice(&kv.value).unwrap())
}

/// Hosts a (on store `sa`) and b (on `sb`, the same store or a view of it),
/// each with its copy of appnet (`net-a`, `net-b`), which a defined.
async fn appnet_on_two_hosts(sa: &Arc<dyn KvStore>, sb: &Arc<dyn KvStore>) -> (Host, Host) {
    let a = Host::start(sa, "a", "192.0.2.1").await;
    let b = Host::start(sb, "b", "192.0.2.2").await;
    a.create_network_as("net-a", SUBNET, true).await;
    b.create_network_as("net-b", SUBNET, true).await;
    a.cluster
        .clusters
        .define(OVERLAY, &definition("a"))
        .await
        .unwrap();
    (a, b)
}

/// The driver woke the cluster sync (which makes the copy again, or
/// removes the others).
async fn woke(h: &Host) -> bool {
    tokio::time::timeout(Duration::from_millis(200), h.cluster.changed.notified())
        .await
        .is_ok()
}

#[tokio::test]
async fn the_first_definition_stays() {
    let s = store();
    let a = Host::start(&s, "a", "192.0.2.1").await;
    let b = Host::start(&s, "b", "192.0.2.2").await;
    let first = a
        .cluster
        .clusters
        .define(OVERLAY, &definition("a"))
        .await
        .unwrap();
    let second = b
        .cluster
        .clusters
        .define(OVERLAY, &definition("b"))
        .await
        .unwrap();
    assert_eq!(first.origin, "a");
    assert_eq!(
        second.origin, "a",
        "a later host's definition replaced the first"
    );
}

#[tokio::test]
async fn a_removal_goes_everywhere_only_once_no_other_host_has_containers() {
    let s = store();
    let (a, b) = appnet_on_two_hosts(&s, &s).await;
    let web = b.run("net-b", "ebbbbbbbbbbbbbbb").await;

    // Removed on a while b has a container: a's copy goes (Docker gives a
    // driver no veto), the definition stays, and a's sync is woken to make
    // the copy again.
    a.driver.delete_network("net-a").await.unwrap();
    let def = stored(&s)
        .await
        .expect("the definition went with one host's copy");
    assert!(!def.removing);
    assert!(woke(&a).await);

    // Once b's container is gone, a removal on a goes everywhere: new
    // containers are refused, and the last host's removal forgets it.
    b.stop(&web).await;
    a.create_network_as("net-a2", SUBNET, true).await;
    a.driver.delete_network("net-a2").await.unwrap();
    assert!(stored(&s).await.unwrap().removing);
    let net = b.overlays.lookup("net-b").await.unwrap();
    let pool = rustoverlay::control::ipam::pool_id(&net.subnets[0]);
    let addr = b.ipam.request_address(&pool, None, false).await.unwrap();
    let refused = b
        .driver
        .create_endpoint(rustoverlay::driver::EndpointSpec {
            network_id: "net-b".into(),
            endpoint_id: "ecccccccccccccccc".into(),
            ipv4: Some(addr),
            ipv6: None,
            mac: None,
        })
        .await
        .unwrap_err();
    assert!(
        matches!(&refused, PluginError::Conflict(m) if m.contains("being removed from every host")),
        "{refused}"
    );
    b.driver.delete_network("net-b").await.unwrap();
    assert!(
        stored(&s).await.is_none(),
        "the last copy's removal kept the definition"
    );
}

#[tokio::test]
async fn a_container_created_while_the_removal_is_decided_stops_it() {
    // a's removal has listed no endpoint; b's container is created just
    // after that list and before a's decision is written. The decision
    // must fail and, read again, see the container.
    let inner = store();
    let hooked = HookStore::new(inner.clone());
    let s: Arc<dyn KvStore> = hooked.clone();
    let (a, b) = appnet_on_two_hosts(&s, &inner).await;
    let b = Arc::new(b);
    let b2 = b.clone();
    hooked.after_get(
        &keys::cluster_network(OVERLAY),
        Box::new(move |_| {
            Box::pin(async move {
                b2.run("net-b", "ebbbbbbbbbbbbbbb").await;
            })
        }),
    );
    let decided = a.cluster.clusters.removal(OVERLAY).await.unwrap();
    assert!(hooked.fired());
    assert_eq!(decided, Removal::InUse(vec!["b".into()]));
    assert!(!stored(&inner).await.unwrap().removing);
}

#[tokio::test]
async fn a_container_whose_check_came_before_the_removal_is_refused() {
    // b checked the definition (not being removed), then a's removal was
    // decided, then b's endpoint is written: the write must fail.
    let s = store();
    let (a, b) = appnet_on_two_hosts(&s, &s).await;
    let net = b.overlays.lookup("net-b").await.unwrap();
    let fence = b.cluster.clusters.endpoint_fence(OVERLAY).await.unwrap();
    assert_eq!(
        a.cluster.clusters.removal(OVERLAY).await.unwrap(),
        Removal::Everywhere
    );
    let record = rustoverlay::state::records::EndpointRecord {
        endpoint_id: "ebbbbbbbbbbbbbbb".into(),
        network_id: "net-b".into(),
        host: "b".into(),
        vtep: b.vtep(),
        mac: "02:52:0a:4d:00:09".into(),
        ipv4: Some("10.77.0.9/24".parse().unwrap()),
        ipv6: None,
        created_at: 0,
        created_ms: 0,
    };
    assert!(b
        .overlays
        .create_endpoint_fenced(&net, &record, fence)
        .await
        .is_err());
    assert!(b
        .overlays
        .get_endpoint(&net, "ebbbbbbbbbbbbbbb")
        .await
        .unwrap()
        .is_none());
}

#[tokio::test]
async fn a_subnet_defined_once_takes_no_plain_network_and_a_replayed_create_passes() {
    let s = store();
    let (a, b) = appnet_on_two_hosts(&s, &s).await;
    let spec = |id: &str, cluster: bool| rustoverlay::driver::NetworkSpec {
        network_id: id.into(),
        ipv4: vec![rustoverlay::driver::PoolSpec {
            subnet: SUBNET.parse().unwrap(),
            aux: vec![],
        }],
        ipv6: vec![],
        cluster,
    };
    b.ipam
        .request_pool(&rustoverlay::api::parse::pool_request(SUBNET, "", false).unwrap())
        .await
        .unwrap();
    let refused = b
        .driver
        .create_network(spec("plain-b", false))
        .await
        .unwrap_err();
    assert!(
        matches!(&refused, PluginError::Conflict(m) if m.contains("belongs to network appnet")),
        "{refused}"
    );
    // Docker replays a create that went through: still fine once the
    // network is being removed.
    a.cluster.clusters.removal(OVERLAY).await.unwrap();
    assert!(stored(&s).await.unwrap().removing);
    a.driver.create_network(spec("net-a", true)).await.unwrap();
    let late = b
        .driver
        .create_network(spec("net-b2", true))
        .await
        .unwrap_err();
    assert!(
        matches!(&late, PluginError::Conflict(m) if m.contains("being removed")),
        "{late}"
    );
}
