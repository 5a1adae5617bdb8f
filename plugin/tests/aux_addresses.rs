//! A network's aux addresses (`--aux-address`) on the memory store: shared
//! by every host of the network, never handed to a container, never counted
//! as a host's holding.

use ipnetwork::Ipv4Network;
use kvstore_backends::{KvStore, MemoryStore};
use rustoverlay::api::parse::pool_request;
use rustoverlay::control::ipam::Ipam;
use rustoverlay::control::reclaim::census;
use rustoverlay::error::PluginError;
use std::net::IpAddr;
use std::sync::Arc;

const POOL: &str = "10.89.0.0/29"; // 6 usable addresses
const AUX: &str = "10.89.0.5";

fn host(store: &Arc<dyn KvStore>, name: &str) -> Ipam {
    let default: Ipv4Network = "10.200.0.0/16".parse().unwrap();
    Ipam::new(store.clone(), name, default, 24)
}

/// What Docker does on each host that creates the network: claim the pool,
/// the gateway, then reserve the aux address.
async fn create_network_on(ipam: &Ipam) {
    ipam.request_pool(&pool_request(POOL, "", false).unwrap())
        .await
        .unwrap();
    ipam.request_address(POOL, None, true).await.unwrap();
    let aux = ipam.reserve_aux(POOL, AUX.parse().unwrap()).await.unwrap();
    assert_eq!(aux.to_string(), format!("{AUX}/29"));
}

#[tokio::test]
async fn an_aux_address_is_refused_to_a_container_on_every_host() {
    let store: Arc<dyn KvStore> = Arc::new(MemoryStore::new());
    let (a, b) = (host(&store, "a"), host(&store, "b"));
    create_network_on(&a).await;
    create_network_on(&b).await;
    for ipam in [&a, &b] {
        let err = ipam
            .request_address(POOL, Some(AUX.parse().unwrap()), false)
            .await
            .unwrap_err();
        assert!(
            matches!(&err, PluginError::Conflict(m) if m.contains(AUX) && m.contains("aux address")),
            "host {}: {err}",
            ipam.host()
        );
    }
}

#[tokio::test]
async fn dynamic_allocation_never_hands_out_an_aux_address() {
    let store: Arc<dyn KvStore> = Arc::new(MemoryStore::new());
    let (a, b) = (host(&store, "a"), host(&store, "b"));
    create_network_on(&a).await;
    create_network_on(&b).await;
    let aux: IpAddr = AUX.parse().unwrap();
    let mut got = vec![];
    // 6 usable: the gateway and the aux address leave 4, on either host.
    for ipam in [&a, &b, &a, &b] {
        got.push(ipam.request_address(POOL, None, false).await.unwrap().ip());
    }
    assert!(!got.contains(&aux), "{got:?}");
    assert!(
        matches!(
            a.request_address(POOL, None, false).await,
            Err(PluginError::Exhausted(_))
        ),
        "the pool is full without the aux address"
    );
}

#[tokio::test]
async fn releasing_an_aux_address_frees_nothing_and_no_host_holds_it() {
    let store: Arc<dyn KvStore> = Arc::new(MemoryStore::new());
    let (a, b) = (host(&store, "a"), host(&store, "b"));
    create_network_on(&a).await;
    create_network_on(&b).await;
    let aux: IpAddr = AUX.parse().unwrap();
    // Docker releases aux addresses when it removes the network on a host.
    a.release_address(POOL, aux).await.unwrap();
    let err = b.request_address(POOL, Some(aux), false).await.unwrap_err();
    assert!(matches!(err, PluginError::Conflict(_)), "{err}");
    // Neither the census nor gc sees the aux address as anyone's address.
    let c = census(store.as_ref()).await.unwrap();
    for (h, held) in &c.holdings {
        assert!(
            !held.addresses.iter().any(|(_, ip)| *ip == aux),
            "host {h} holds the aux address: {held:?}"
        );
    }
    assert!(!c.unbound.iter().any(|u| u.ip == aux), "{:?}", c.unbound);
}

#[tokio::test]
async fn a_containers_address_cannot_become_an_aux_address() {
    let store: Arc<dyn KvStore> = Arc::new(MemoryStore::new());
    let a = host(&store, "a");
    a.request_pool(&pool_request(POOL, "", false).unwrap())
        .await
        .unwrap();
    let ip = a.request_address(POOL, None, false).await.unwrap().ip();
    let err = a.reserve_aux(POOL, ip).await.unwrap_err();
    assert!(
        matches!(&err, PluginError::Conflict(m) if m.contains("--aux-address")),
        "{err}"
    );
}
