//! `rustoverlay status`'s view of the cluster, read from the memory store
//! that three hosts share: hosts alive and gone, overlays with their
//! networks, endpoints per host and pool usage, in one read.

mod fake_host;

use fake_host::{store, Host, SUBNET, SUBNET_2, VNI};
use kvstore_backends::CountingStore;
use rustoverlay::control::status::cluster_view;
use std::collections::BTreeMap;

#[tokio::test]
async fn the_view_lists_hosts_overlays_endpoints_and_pool_usage() {
    let store = store();
    let a = Host::start(&store, "a", "192.0.2.1").await;
    let b = Host::start(&store, "b", "192.0.2.2").await;
    let c = Host::start(&store, "c", "192.0.2.3").await;
    for (h, net) in [(&a, "na"), (&b, "nb"), (&c, "nc")] {
        h.create_network(net, SUBNET).await;
    }
    a.create_network("na2", SUBNET_2).await;
    a.run("na", "ea1aaaaaaaaaaaaa").await;
    a.run("na", "ea2aaaaaaaaaaaaa").await;
    b.run("nb", "eb1bbbbbbbbbbbbb").await;
    c.run("nc", "ec1ccccccccccccc").await;
    // c's plugin dies: its registration goes, its holdings stay.
    c.unregister().await;

    let counted = CountingStore::new(store.clone());
    let view = cluster_view(&counted).await.unwrap();
    assert_eq!(counted.calls(), 1, "one read of the whole prefix");

    let hosts: Vec<(&str, bool, usize)> = view
        .hosts
        .iter()
        .map(|h| (h.host.as_str(), h.alive, h.endpoints))
        .collect();
    assert_eq!(hosts, vec![("a", true, 2), ("b", true, 1), ("c", false, 1)]);
    assert_eq!(view.hosts[0].vtep, Some("192.0.2.1".parse().unwrap()));
    assert_eq!(
        view.hosts[2].vtep, None,
        "a gone host's registration is gone"
    );

    assert_eq!(view.overlays.len(), 2);
    let o = &view.overlays[0];
    assert_eq!(o.overlay, "10.77.0.0_24");
    assert_eq!(o.vni, VNI);
    assert_eq!(
        o.endpoints,
        BTreeMap::from([("a".into(), 2), ("b".into(), 1), ("c".into(), 1)])
    );
    assert_eq!(o.networks["a"].iter().collect::<Vec<_>>(), vec!["na"]);
    assert_eq!(o.networks.len(), 3);
    // The gateway and four containers, of 254.
    assert_eq!(o.pools.len(), 1);
    assert_eq!((o.pools[0].used, o.pools[0].size), (5, 254));
    assert_eq!(o.pools[0].free(), 249);

    let o2 = &view.overlays[1];
    assert_eq!(o2.overlay, "10.78.0.0_24");
    assert!(o2.endpoints.is_empty());
    assert_eq!(
        (o2.pools[0].used, o2.pools[0].size),
        (1, 254),
        "the gateway"
    );

    // The JSON keeps its documented shape.
    let json = serde_json::to_value(&view).unwrap();
    assert_eq!(json["hosts"][2]["alive"], false);
    assert_eq!(json["overlays"][0]["pools"][0]["used"], 5);
    assert!(json["hosts"][0].get("gone_since").is_none());
}
