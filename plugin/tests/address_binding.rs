//! One address, one endpoint: an endpoint record binds its addresses in the
//! same transaction that stores it, and an address cannot be released (so
//! cannot go to a second endpoint) while a record bound to it stays.

mod fake_host;

use fake_host::{store, HookStore, Host, SUBNET};
use kvstore_backends::KvStore;
use rustoverlay::error::PluginError;
use rustoverlay::state::records::EndpointRecord;
use rustoverlay::util::clock::unix_now;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

#[tokio::test]
async fn an_address_is_not_released_while_its_endpoint_record_stays() {
    let s = store();
    let a = Host::start(&s, "a", "192.0.2.1").await;
    let c = Host::start(&s, "c", "192.0.2.3").await;
    a.create_network("net-a", SUBNET).await;
    c.create_network("net-c", SUBNET).await;
    // The container went, but its DeleteEndpoint never reached the store:
    // the record (never joined, so no port) stays. Docker then releases X.
    let stale = a.create_endpoint("net-a", "eaaaaaaaaaaaaaaa").await;
    let err = a
        .ipam
        .release_address(&stale.pool, stale.ip())
        .await
        .unwrap_err();
    assert!(
        matches!(&err, PluginError::Conflict(m) if m.contains("still bound to endpoint eaaaaaaaaaaaaaaa")),
        "{err}"
    );
    // So nobody else gets X meanwhile.
    let taken = c
        .ipam
        .request_address(&stale.pool, Some(stale.ip()), false)
        .await
        .unwrap_err();
    assert!(matches!(taken, PluginError::Conflict(_)), "{taken}");
    // The orphan sweep removes the record and frees X; then X can be reused.
    assert_eq!(a.reconciler.sweep_orphans(Duration::ZERO).await.unwrap(), 1);
    let owner = c
        .create_endpoint_with("net-c", "ecccccccccccccccc", Some(stale.ip()), None)
        .await;
    assert_eq!(owner.ip(), stale.ip());
}

#[tokio::test]
async fn a_second_record_for_a_bound_address_is_refused() {
    let s = store();
    let a = Host::start(&s, "a", "192.0.2.1").await;
    let net = a.create_network("net-a", SUBNET).await;
    let first = a.create_endpoint("net-a", "e1aaaaaaaaaaaaaa").await;
    let second = EndpointRecord {
        endpoint_id: "e2aaaaaaaaaaaaaa".into(),
        network_id: "net-a".into(),
        host: "a".into(),
        vtep: first.vtep,
        mac: "02:52:00:00:00:09".into(),
        ipv4: Some(first.addr),
        ipv6: None,
        created_at: unix_now(),
        created_ms: 0,
    };
    let err = a.overlays.create_endpoint(&net, &second).await.unwrap_err();
    assert!(
        matches!(&err, PluginError::Conflict(m) if m.contains("bound to endpoint e1aaaaaaaaaaaaaa")),
        "{err}"
    );
    assert!(
        a.overlays
            .get_endpoint(&net, "e2aaaaaaaaaaaaaa")
            .await
            .unwrap()
            .is_none(),
        "nothing of the refused record is stored"
    );
    // Deleting the first endpoint unbinds the address: the release works.
    a.driver
        .delete_endpoint("net-a", &first.endpoint_id)
        .await
        .unwrap();
    a.ipam
        .release_address(&first.pool, first.ip())
        .await
        .unwrap();
}

#[tokio::test]
async fn calls_whose_answer_was_lost_are_retried_and_leave_nothing_behind() {
    let hooked = HookStore::new(store());
    let s: Arc<dyn KvStore> = hooked.clone();
    let a = Host::start(&s, "a", "192.0.2.1").await;
    let net = a.create_network("net-a", SUBNET).await;
    let pool = "10.77.0.0/24";
    assert_eq!(pool, SUBNET);
    let x: IpAddr = "10.77.0.9".parse().unwrap();

    // CreateNetwork (a second Docker network on the overlay): applied,
    // answer lost; the call finds its own mapping and succeeds.
    hooked.lose_answers(1);
    a.driver
        .create_network(rustoverlay::driver::NetworkSpec {
            network_id: "net-a2".into(),
            ipv4: vec![rustoverlay::driver::PoolSpec {
                subnet: pool.parse().unwrap(),
                aux: vec![],
            }],
            ipv6: vec![],
            cluster: false,
        })
        .await
        .unwrap();
    let mapping = rustoverlay::state::keys::host_network("a", "net-a2");
    assert!(
        s.get(&mapping).await.unwrap().is_some(),
        "CreateNetwork stored net-a2's overlay mapping"
    );
    a.driver.delete_network("net-a2").await.unwrap();
    assert!(
        s.get(&mapping).await.unwrap().is_none(),
        "DeleteNetwork left net-a2's overlay mapping behind"
    );
    assert!(
        s.get(&rustoverlay::state::keys::host_network("a", "net-a"))
            .await
            .unwrap()
            .is_some(),
        "net-a (same overlay) keeps its mapping"
    );

    // RequestAddress --ip: applied, answer lost; Docker's retry gets it.
    hooked.lose_answers(1);
    let err = a
        .ipam
        .request_address(pool, Some(x), false)
        .await
        .unwrap_err();
    assert!(matches!(err, PluginError::Store { .. }), "{err}");
    let again = a.ipam.request_address(pool, Some(x), false).await.unwrap();
    assert_eq!(
        again.ip(),
        x,
        "the retry gets the allocation the first try made"
    );

    // CreateEndpoint: applied, answer lost; the call still succeeds (it
    // checks what it wrote), so Docker goes on and later cleans up normally.
    hooked.lose_answers(1);
    let spec = rustoverlay::driver::EndpointSpec {
        network_id: "net-a".into(),
        endpoint_id: "e9aaaaaaaaaaaaaa".into(),
        ipv4: Some(again),
        ipv6: None,
        mac: None,
    };
    a.driver.create_endpoint(spec).await.unwrap();
    a.driver.join("net-a", "e9aaaaaaaaaaaaaa").await.unwrap();

    // DeleteEndpoint applied with its answer lost: it finds the record gone
    // and succeeds; then ReleaseAddress: Docker's clean-up leaves nothing.
    a.driver.leave("net-a", "e9aaaaaaaaaaaaaa").await.unwrap();
    hooked.lose_answers(1);
    a.driver
        .delete_endpoint("net-a", "e9aaaaaaaaaaaaaa")
        .await
        .unwrap();
    a.ipam.release_address(pool, x).await.unwrap();
    let left = s
        .range(&rustoverlay::state::keys::overlay_endpoints(&net.overlay))
        .await
        .unwrap();
    assert!(left.kvs.is_empty(), "endpoint records left: {:?}", left.kvs);
    let bound = s
        .get(&rustoverlay::state::keys::pool_bound("10.77.0.0_24", x))
        .await
        .unwrap();
    assert!(bound.is_none(), "a binding left behind");
    assert!(
        s.get(&rustoverlay::state::keys::pool_addr("10.77.0.0_24", x))
            .await
            .unwrap()
            .is_none(),
        "the address is free again"
    );
}

#[tokio::test]
async fn pool_and_dynamic_address_calls_whose_answer_was_lost_succeed_and_leave_nothing_behind() {
    use rustoverlay::api::parse::pool_request;
    use rustoverlay::state::keys;
    let hooked = HookStore::new(store());
    let s: Arc<dyn KvStore> = hooked.clone();
    let a = Host::start(&s, "a", "192.0.2.1").await;
    let b = Host::start(&s, "b", "192.0.2.2").await;
    let req = pool_request(SUBNET, "", false).unwrap();
    let seg = "10.77.0.0_24";
    let refs = || async {
        a.ipam
            .read_pool(seg)
            .await
            .unwrap()
            .map(|(rec, _)| rec.refs)
            .unwrap_or_default()
    };

    // RequestPool claiming the subnet, then one taking another reference:
    // both applied with their answers lost, both succeed, one reference each
    // (Docker calls ReleasePool once for each success, never for a failure).
    hooked.lose_answers(1);
    a.ipam.request_pool(&req).await.unwrap();
    hooked.lose_answers(1);
    b.ipam.request_pool(&req).await.unwrap();
    let both = refs().await;
    assert_eq!(both.get("a"), Some(&1), "{both:?}");
    assert_eq!(both.get("b"), Some(&1), "{both:?}");

    // A dynamic RequestAddress (and a gateway) applied with the answer lost:
    // the call finds its own allocation and returns it.
    hooked.lose_answers(1);
    let gw = a.ipam.request_address(SUBNET, None, true).await.unwrap();
    hooked.lose_answers(1);
    let x = a.ipam.request_address(SUBNET, None, false).await.unwrap();
    assert_ne!(gw.ip(), x.ip());
    let y = b.ipam.request_address(SUBNET, None, false).await.unwrap();
    assert_ne!(y.ip(), x.ip(), "no address handed out twice");

    // Docker's clean-up, with every release's answer lost too.
    for (h, ip) in [(&a, x.ip()), (&b, y.ip())] {
        hooked.lose_answers(1);
        h.ipam.release_address(SUBNET, ip).await.unwrap();
        let addr = s.get(&keys::pool_addr(seg, ip)).await.unwrap();
        assert!(addr.is_none(), "{ip} released");
    }
    hooked.lose_answers(1);
    a.ipam.release_pool(SUBNET).await.unwrap();
    assert_eq!(refs().await.get("a"), None, "a's one reference is gone");
    hooked.lose_answers(1);
    b.ipam.release_pool(SUBNET).await.unwrap();
    let left = s.range(&keys::pool_prefix(seg)).await.unwrap().kvs;
    assert!(left.is_empty(), "left in the store: {left:?}");
}
