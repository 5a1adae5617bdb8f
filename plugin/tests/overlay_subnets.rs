//! One subnet, one overlay: a network whose subnets share one with another
//! overlay (different first subnet) is refused, on the memory store. Docker
//! gives an `--ipv6 --subnet fd..::/64` network without an IPv4 --subnet an
//! IPv4 pool of its own choosing on each host; before this check every host
//! then got an overlay of its own over the one shared IPv6 pool, and ping6
//! across hosts failed without any error.

use ipnetwork::IpNetwork;
use kvstore_backends::{KvStore, MemoryStore};
use rustoverlay::control::overlay::Overlays;
use rustoverlay::error::PluginError;
use std::sync::Arc;

fn nets(s: &[&str]) -> Vec<IpNetwork> {
    s.iter().map(|n| n.parse().unwrap()).collect()
}

#[tokio::test]
async fn a_subnet_of_another_overlay_is_refused_with_that_overlays_subnets() {
    let store: Arc<dyn KvStore> = Arc::new(MemoryStore::new());
    let (a, b) = (
        Overlays::new(store.clone(), "a"),
        Overlays::new(store.clone(), "b"),
    );
    let first = a
        .create_network("net-a", nets(&["10.200.0.0/24", "fd00:78::/64"]))
        .await
        .unwrap();
    // Host b: Docker picked another IPv4 pool for the same IPv6 network.
    let err = b
        .create_network("net-b", nets(&["10.200.1.0/24", "fd00:78::/64"]))
        .await
        .unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, PluginError::Conflict(_)), "{msg}");
    assert!(
        msg.contains("subnet fd00:78::/64 already belongs to a rustoverlay network with subnets 10.200.0.0/24, fd00:78::/64")
            && msg.contains("an IPv4 --subnet included"),
        "{msg}"
    );
    // Nothing of the refused network was written: no second VNI claimed.
    let claims = store.range("/rustoverlay/v1/vni/").await.unwrap();
    let claimed: Vec<_> = claims
        .kvs
        .iter()
        .filter(|kv| !kv.key.ends_with("/next"))
        .collect();
    assert_eq!(claimed.len(), 1, "{claimed:?}");
    assert!(b.local_networks().await.unwrap().is_empty());

    // The same subnets as host a: the same overlay.
    let joined = b
        .create_network("net-b", nets(&["10.200.0.0/24", "fd00:78::/64"]))
        .await
        .unwrap();
    assert_eq!(joined.vni, first.vni);
    // A network sharing nothing is its own overlay.
    let other = b
        .create_network("net-c", nets(&["10.201.0.0/24", "fd00:79::/64"]))
        .await
        .unwrap();
    assert_ne!(other.vni, first.vni);
}

#[tokio::test]
async fn the_subnet_is_free_again_once_its_overlay_is_gone() {
    let store: Arc<dyn KvStore> = Arc::new(MemoryStore::new());
    let (a, b) = (
        Overlays::new(store.clone(), "a"),
        Overlays::new(store.clone(), "b"),
    );
    a.create_network("net-a", nets(&["10.200.0.0/24", "fd00:78::/64"]))
        .await
        .unwrap();
    assert!(b
        .create_network("net-b", nets(&["10.200.1.0/24", "fd00:78::/64"]))
        .await
        .is_err());
    a.delete_network("net-a").await.unwrap();
    b.create_network("net-b", nets(&["10.200.1.0/24", "fd00:78::/64"]))
        .await
        .unwrap();
}
