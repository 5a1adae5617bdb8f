//! One address, one endpoint: an endpoint record binds its addresses in the
//! same transaction that stores it, and an address cannot be released (so
//! cannot go to a second endpoint) while a record bound to it stays.

mod fake_host;

use fake_host::{store, Host, SUBNET};
use rustoverlay::error::PluginError;
use rustoverlay::state::records::EndpointRecord;
use rustoverlay::util::clock::unix_now;
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
