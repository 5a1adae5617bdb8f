//! Reclaiming what a gone host held, and `rustoverlay gc`, on the memory
//! store. Every write made for a gone host is fenced on its registration
//! still being absent, so a host that comes back keeps everything.

mod fake_host;

use fake_host::{eventually, store, Ep, HookStore, Host, SUBNET, VNI};
use futures::FutureExt;
use kvstore_backends::{KeyValue, KvStore};
use rustoverlay::control::ipam::Ipam;
use rustoverlay::control::reclaim::{census, gc, reclaim_host, Holdings, UnboundAddress};
use rustoverlay::driver::EndpointSpec;
use rustoverlay::error::PluginError;
use rustoverlay::state::codec::{decode, encode};
use rustoverlay::state::keys;
use rustoverlay::state::records::{AddressKind, AddressRecord, HostRecord, OverlayRecord};
use rustoverlay::util::clock::unix_now;
use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

const HOUR: Duration = Duration::from_secs(3600);

/// A registration's renewals that report no store revision (as on Consul):
/// the reaper's sweeps read the revision themselves.
fn without_revisions(
    lease: tokio::sync::watch::Receiver<Option<kvstore_backends::LeaseId>>,
) -> rustoverlay::sync::membership::Renewals {
    rustoverlay::sync::membership::Renewals {
        lease,
        revision: tokio::sync::watch::channel(None).1,
    }
}
const POOL: &str = "10.77.0.0/24";
const SEG: &str = "10.77.0.0_24";

/// Two hosts on one overlay, each with a running endpoint; `a` also holds
/// an address bound to no endpoint.
struct Cluster {
    store: Arc<dyn KvStore>,
    a: Host,
    b: Host,
    ea: Ep,
    eb: Ep,
    a_unbound: IpAddr,
}

async fn cluster() -> Cluster {
    let store = store();
    let a = Host::start(&store, "a", "192.0.2.1").await;
    let b = Host::start(&store, "b", "192.0.2.2").await;
    a.create_network("net-a", SUBNET).await;
    b.create_network("net-b", SUBNET).await;
    let ea = a.run("net-a", "eaaaaaaaaaaaaaaa").await;
    let eb = b.run("net-b", "ebbbbbbbbbbbbbbb").await;
    let a_unbound = a
        .ipam
        .request_address(POOL, None, false)
        .await
        .unwrap()
        .ip();
    Cluster {
        store,
        a,
        b,
        ea,
        eb,
        a_unbound,
    }
}

async fn everything(store: &dyn KvStore) -> Vec<KeyValue> {
    store.range(keys::ROOT).await.unwrap().kvs
}

/// Free: a host that holds nothing can take it. (Not `h` itself: a host
/// asking again for its own unbound address gets it back, as a retry does.)
async fn is_free(h: &Host, ip: IpAddr) -> bool {
    let probe = Ipam::new(
        h.store.clone(),
        "probe",
        "10.200.0.0/16".parse().unwrap(),
        24,
    );
    match probe.request_address(POOL, Some(ip), false).await {
        Ok(_) => {
            probe.release_address(POOL, ip).await.unwrap();
            true
        }
        Err(PluginError::Conflict(_)) => false,
        Err(e) => panic!("request {ip}: {e}"),
    }
}

async fn holdings_of(store: &dyn KvStore, host: &str) -> Holdings {
    census(store)
        .await
        .unwrap()
        .holdings
        .remove(host)
        .unwrap_or_default()
}

async fn pool_refs(h: &Host) -> BTreeMap<String, u32> {
    h.ipam.read_pool(SEG).await.unwrap().unwrap().0.refs
}

#[tokio::test]
async fn the_census_sees_what_each_host_holds() {
    let c = cluster().await;
    let census = census(c.store.as_ref()).await.unwrap();
    let held = &census.holdings["a"];
    assert_eq!(held.networks, vec!["net-a".to_string()]);
    assert_eq!(held.endpoints.len(), 1);
    assert_eq!(held.endpoints[0].1, c.ea.endpoint_id);
    let mut addrs: Vec<IpAddr> = held.addresses.iter().map(|(_, ip)| *ip).collect();
    addrs.sort();
    assert_eq!(addrs, vec![c.ea.ip(), c.a_unbound]);
    assert_eq!(held.pool_refs, BTreeMap::from([(POOL.to_string(), 1)]));
    assert_eq!(
        census.unbound.iter().map(|u| u.ip).collect::<Vec<_>>(),
        vec![c.a_unbound]
    );
    assert!(census.registered.contains("a") && census.registered.contains("b"));
}

#[tokio::test]
async fn reclaiming_a_gone_host_frees_its_endpoints_addresses_networks_and_pool_refs() {
    let c = cluster().await;
    c.a.unregister().await;
    let held = holdings_of(c.store.as_ref(), "a").await;
    assert!(!held.is_empty());

    reclaim_host(c.store.clone(), "a", &held).await.unwrap();

    assert!(
        holdings_of(c.store.as_ref(), "a").await.is_empty(),
        "a holds nothing any more"
    );
    let net_b = c.b.overlays.lookup("net-b").await.unwrap();
    assert!(c
        .b
        .overlays
        .get_endpoint(&net_b, &c.ea.endpoint_id)
        .await
        .unwrap()
        .is_none());
    assert!(
        is_free(&c.b, c.ea.ip()).await,
        "a's endpoint address is free"
    );
    assert!(
        is_free(&c.b, c.a_unbound).await,
        "a's other address is free"
    );
    assert!(c
        .store
        .get(&keys::host_network("a", "net-a"))
        .await
        .unwrap()
        .is_none());
    let overlay: OverlayRecord = decode(
        &c.store
            .get(&keys::overlay_record(&net_b.overlay))
            .await
            .unwrap()
            .unwrap(),
    )
    .unwrap();
    assert_eq!(
        overlay.hosts.keys().collect::<Vec<_>>(),
        vec!["b"],
        "a's network left the overlay"
    );
    assert_eq!(
        pool_refs(&c.b).await,
        BTreeMap::from([("b".to_string(), 1)])
    );

    // b keeps everything of its own.
    assert!(c
        .b
        .overlays
        .get_endpoint(&net_b, &c.eb.endpoint_id)
        .await
        .unwrap()
        .is_some());
    assert!(!is_free(&c.b, c.eb.ip()).await);
    // Reclaiming again finds nothing to do.
    reclaim_host(c.store.clone(), "a", &held).await.unwrap();
}

#[tokio::test]
async fn reclaiming_the_last_host_of_an_overlay_frees_the_overlay_and_its_subnet() {
    let s = store();
    let a = Host::start(&s, "a", "192.0.2.1").await;
    a.create_network("net-a", SUBNET).await;
    a.run("net-a", "eaaaaaaaaaaaaaaa").await;
    a.unregister().await;
    let held = holdings_of(s.as_ref(), "a").await;
    reclaim_host(s.clone(), "a", &held).await.unwrap();
    let left: Vec<String> = everything(s.as_ref())
        .await
        .into_iter()
        .map(|kv| kv.key)
        .collect();
    assert!(
        left.iter()
            .all(|k| k.ends_with("ipam/pools") || k.ends_with("vni/next")),
        "nothing of the overlay or its pool is left: {left:?}"
    );
    // Another host can claim the subnet afresh.
    let b = Host::start(&s, "b", "192.0.2.2").await;
    b.create_network("net-b", SUBNET).await;
}

#[tokio::test]
async fn a_registered_host_is_not_reclaimed() {
    let c = cluster().await;
    let held = holdings_of(c.store.as_ref(), "a").await;
    let before = everything(c.store.as_ref()).await;
    let err = reclaim_host(c.store.clone(), "a", &held).await.unwrap_err();
    assert!(matches!(err, PluginError::Conflict(_)), "{err:?}");
    assert_eq!(
        everything(c.store.as_ref()).await,
        before,
        "nothing changed"
    );
}

#[tokio::test]
async fn a_host_that_registers_again_between_census_and_reclaim_keeps_everything() {
    let c = cluster().await;
    c.a.unregister().await;
    let held = holdings_of(c.store.as_ref(), "a").await;
    c.a.register().await;
    let before = everything(c.store.as_ref()).await;

    let err = reclaim_host(c.store.clone(), "a", &held).await.unwrap_err();
    assert!(matches!(err, PluginError::Conflict(_)), "{err:?}");
    assert_eq!(
        everything(c.store.as_ref()).await,
        before,
        "nothing changed"
    );
}

#[tokio::test]
async fn a_host_that_registers_again_right_after_the_fence_is_read_keeps_everything() {
    let c = cluster().await;
    c.a.unregister().await;
    let held = holdings_of(c.store.as_ref(), "a").await;
    // a comes back right after the reclaimer read its (absent) registration
    // and before the reclaimer's first write: only the compare inside the
    // write's transaction can stop it now.
    let hooked = HookStore::new(c.store.clone());
    let record = HostRecord {
        host: "a".into(),
        vtep: c.a.vtep(),
        version: "test".into(),
    };
    hooked.after_get(
        &keys::host_registration("a"),
        Box::new(move |s: Arc<dyn KvStore>| {
            async move {
                s.put(&keys::host_registration("a"), encode(&record))
                    .await
                    .unwrap();
            }
            .boxed()
        }),
    );
    let before_but_registration: Vec<KeyValue> = everything(c.store.as_ref()).await;

    let err = reclaim_host(hooked.clone(), "a", &held).await.unwrap_err();
    assert!(hooked.fired(), "the reclaimer read the registration");
    assert!(matches!(err, PluginError::Conflict(_)), "{err:?}");
    let after: Vec<KeyValue> = everything(c.store.as_ref())
        .await
        .into_iter()
        .filter(|kv| kv.key != keys::host_registration("a"))
        .collect();
    assert_eq!(after, before_but_registration, "nothing reclaimed");
}

/// Make an address look handed out `age_secs` ago by its holder's clock
/// (negative: a clock ahead of ours).
async fn age_address(store: &dyn KvStore, ip: IpAddr, holder: &str, age_secs: i64) {
    let rec = AddressRecord {
        host: holder.into(),
        kind: AddressKind::Address,
        at: unix_now().saturating_add_signed(-age_secs),
    };
    store
        .put(&keys::pool_addr(SEG, ip), encode(&rec))
        .await
        .unwrap();
}

/// How long gc watches in these tests.
const WATCH: Duration = Duration::from_millis(800);

#[tokio::test]
async fn gc_frees_only_what_stayed_unbound_while_it_watched_whatever_the_holders_clock() {
    let c = cluster().await;
    // The holder's clock says the address is two hours old, or is yet to
    // be handed out: gc never reads it.
    age_address(c.store.as_ref(), c.a_unbound, "a", 2 * 3600).await;
    let ahead = c.b.ipam.request_address(POOL, None, false).await.unwrap();
    age_address(c.store.as_ref(), ahead.ip(), "b", -3600).await;

    // Listing: an address handed out while gc watches is not listed.
    let listing = tokio::spawn(gc(c.store.clone(), false, WATCH, false));
    tokio::time::sleep(WATCH / 4).await;
    let late = c.b.ipam.request_address(POOL, None, false).await.unwrap();
    let report = listing.await.unwrap().unwrap();
    for listed in [c.a_unbound, ahead.ip()] {
        assert!(report.contains(&format!("address {listed} ")), "{report}");
    }
    for spared in [late.ip(), c.ea.ip()] {
        assert!(!report.contains(&format!("address {spared} ")), "{report}");
    }
    assert!(report.contains("--apply"), "{report}");
    assert!(!is_free(&c.b, c.a_unbound).await, "listing frees nothing");

    // Applying: an address whose endpoint comes while gc watches stays.
    let applying = tokio::spawn(gc(c.store.clone(), true, WATCH, false));
    tokio::time::sleep(WATCH / 4).await;
    c.b.driver
        .create_endpoint(EndpointSpec {
            network_id: "net-b".into(),
            endpoint_id: "latebbbbbbbbbbbb".into(),
            ipv4: Some(late),
            ipv6: None,
            mac: None,
        })
        .await
        .unwrap();
    let report = applying.await.unwrap().unwrap();
    for freed in [c.a_unbound, ahead.ip()] {
        assert!(report.contains(&format!("freed {freed}")), "{report}");
        assert!(is_free(&c.b, freed).await);
    }
    assert!(
        !is_free(&c.b, late.ip()).await,
        "bound while gc watched: stays"
    );
    assert!(!is_free(&c.b, c.ea.ip()).await, "bound addresses stay");

    let report = gc(c.store.clone(), true, WATCH, false).await.unwrap();
    assert_eq!(report, "nothing to collect\n");
}

#[tokio::test]
async fn gc_reclaims_a_gone_host_only_when_told_it_is_gone_for_good() {
    let c = cluster().await;
    c.a.unregister().await;
    let report = gc(c.store.clone(), false, Duration::ZERO, false)
        .await
        .unwrap();
    assert!(report.contains("host a is gone"), "{report}");
    assert!(!holdings_of(c.store.as_ref(), "a").await.is_empty());

    // --apply alone leaves a gone host to the reaper: it may be restarting.
    let report = gc(c.store.clone(), true, Duration::ZERO, false)
        .await
        .unwrap();
    assert!(report.contains("left to the cluster's reaper"), "{report}");
    assert!(!holdings_of(c.store.as_ref(), "a").await.is_empty());
    let report = gc(c.store.clone(), true, Duration::ZERO, true)
        .await
        .unwrap();
    assert!(report.contains("reclaimed host a"), "{report}");
    assert!(holdings_of(c.store.as_ref(), "a").await.is_empty());
    assert!(is_free(&c.b, c.ea.ip()).await);
    assert!(!is_free(&c.b, c.eb.ip()).await);
}

/// `a` releases `ip` and takes it again for a new, joined endpoint: what
/// happens when an old unbound address is reused for a container.
async fn retake_for_a_new_endpoint(a: &Host, ip: IpAddr) {
    a.ipam.release_address(POOL, ip).await.unwrap();
    let again = a
        .create_endpoint_with("net-a", "againaaaaaaaaaaa", Some(ip), None)
        .await;
    a.driver.join("net-a", &again.endpoint_id).await.unwrap();
}

async fn endpoint_holds(h: &Host, network_id: &str, endpoint_id: &str, ip: IpAddr) -> bool {
    let net = h.overlays.lookup(network_id).await.unwrap();
    h.overlays
        .get_endpoint(&net, endpoint_id)
        .await
        .unwrap()
        .is_some_and(|(ep, _)| ep.ipv4.map(|a| a.ip()) == Some(ip))
}

#[tokio::test]
async fn gc_does_not_free_an_address_taken_again_after_its_census() {
    // Directly: the release step with a stale census entry.
    let c = cluster().await;
    let x = c.a_unbound;
    age_address(c.store.as_ref(), x, "a", 2 * 3600).await;
    let listed: UnboundAddress = census(c.store.as_ref())
        .await
        .unwrap()
        .unbound
        .into_iter()
        .find(|u| u.ip == x)
        .expect("the census lists the unbound address");
    assert_eq!(listed.holder, "a");
    retake_for_a_new_endpoint(&c.a, x).await;

    let err = Ipam::releasing_for(c.store.clone(), &listed.holder)
        .release_listed_address(&listed.pool, x, listed.revision)
        .await
        .unwrap_err();
    assert!(matches!(err, PluginError::Unknown(_)), "{err:?}");
    assert!(!is_free(&c.b, x).await, "{x} stays allocated");
    assert!(endpoint_holds(&c.a, "net-a", "againaaaaaaaaaaa", x).await);

    // Through gc: the address is released and taken again right after gc's
    // census, when the release step reads the pool.
    let c = cluster().await;
    let x = c.a_unbound;
    age_address(c.store.as_ref(), x, "a", 2 * 3600).await;
    let hooked = HookStore::new(c.store.clone());
    // a's own IPAM and driver, on the store the hook wraps.
    let (ipam, driver) = (c.a.ipam.clone(), c.a.driver.clone());
    hooked.after_get(
        &keys::pool_record(SEG),
        Box::new(move |_: Arc<dyn KvStore>| {
            async move {
                ipam.release_address(POOL, x).await.unwrap();
                let addr = ipam.request_address(POOL, Some(x), false).await.unwrap();
                driver
                    .create_endpoint(EndpointSpec {
                        network_id: "net-a".into(),
                        endpoint_id: "againaaaaaaaaaaa".into(),
                        ipv4: Some(addr),
                        ipv6: None,
                        mac: None,
                    })
                    .await
                    .unwrap();
                driver.join("net-a", "againaaaaaaaaaaa").await.unwrap();
            }
            .boxed()
        }),
    );

    let report = gc(hooked.clone(), true, Duration::ZERO, false)
        .await
        .unwrap();
    assert!(hooked.fired(), "gc read the pool after its census");
    assert!(
        report.contains(&format!("address {x} ")),
        "gc listed {x}: {report}"
    );
    assert!(!report.contains(&format!("freed {x}")), "{report}");
    assert!(report.contains("left alone"), "{report}");
    assert!(!is_free(&c.b, x).await, "{x} stays allocated");
    assert!(
        endpoint_holds(&c.a, "net-a", "againaaaaaaaaaaa", x).await,
        "the new endpoint keeps {x}"
    );
}

#[tokio::test]
async fn a_network_reclaimed_while_its_host_was_cut_off_is_unknown_to_it_afterwards() {
    let c = cluster().await;
    // a's network is in a's cache: a created it and ran an endpoint on it.
    c.a.overlays.lookup("net-a").await.unwrap();

    // a is cut off: its registration expires and b reclaims it.
    c.a.unregister().await;
    let held = holdings_of(c.store.as_ref(), "a").await;
    assert_eq!(held.networks, vec!["net-a".to_string()]);
    reclaim_host(c.store.clone(), "a", &held).await.unwrap();

    // a is back: it registers again and reconciles, as after a lost lease.
    c.a.register().await;
    c.a.reconciler.recover().await.unwrap();
    assert!(
        c.a.fake.network(VNI).is_none(),
        "the reclaimed endpoint's devices went"
    );

    let spec = EndpointSpec {
        network_id: "net-a".into(),
        endpoint_id: "newaaaaaaaaaaaaa".into(),
        ipv4: Some(format!("{}/24", c.a_unbound).parse().unwrap()),
        ipv6: None,
        mac: None,
    };
    let err = c.a.driver.create_endpoint(spec.clone()).await.unwrap_err();
    assert!(
        matches!(err, PluginError::Unknown(_)),
        "CreateEndpoint on a reclaimed network: {err:?}"
    );
    // Just as a freshly started plugin on a answers.
    let fresh = Host::unregistered(&c.store, "a", "192.0.2.1");
    let err = fresh.driver.create_endpoint(spec).await.unwrap_err();
    assert!(matches!(err, PluginError::Unknown(_)), "{err:?}");
    let net_b = c.b.overlays.lookup("net-b").await.unwrap();
    let (eps, _) = c.b.overlays.endpoints(&net_b.overlay).await.unwrap();
    assert_eq!(
        eps.iter().map(|e| e.host.as_str()).collect::<Vec<_>>(),
        vec!["b"],
        "no endpoint of a on the overlay"
    );
}

#[tokio::test]
async fn the_reaper_frees_an_address_that_stays_unbound_and_spares_young_and_bound_ones() {
    use rustoverlay::sync::readiness::Readiness;
    use rustoverlay::sync::reaper::{self, ReaperConfig};
    let s = store();
    let a = Host::start(&s, "a", "192.0.2.1").await;
    a.create_network("net-a", SUBNET).await;
    let bound = a.run("net-a", "eaaaaaaaaaaaaaaa").await;
    // A RequestAddress whose endpoint never came.
    let leaked = a
        .ipam
        .request_address(POOL, None, false)
        .await
        .unwrap()
        .ip();
    let orphan_age = Duration::from_millis(600);
    let lease = s.grant_lease(HOUR).await.unwrap();
    let (_registered, lease) = tokio::sync::watch::channel(Some(lease));
    let started = std::time::Instant::now();
    let task = tokio::spawn(reaper::run(
        s.clone(),
        "a".into(),
        Readiness::new(true),
        a.reconciler.clone(),
        ReaperConfig {
            period: Duration::from_millis(100),
            grace: HOUR,
            orphan_age,
        },
        a.live.clone(),
        without_revisions(lease),
    ));
    let addr_key = keys::pool_addr(SEG, leaked);
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while s.get(&addr_key).await.unwrap().is_some() {
        assert!(
            std::time::Instant::now() < deadline,
            "the leaked address was never freed"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        started.elapsed() >= orphan_age,
        "freed after {:?}, before it was unbound for {orphan_age:?}",
        started.elapsed()
    );
    // A new unbound address is young: left alone for now.
    let young = a
        .ipam
        .request_address(POOL, None, false)
        .await
        .unwrap()
        .ip();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        s.get(&keys::pool_addr(SEG, young)).await.unwrap().is_some(),
        "young address freed"
    );
    assert!(
        s.get(&keys::pool_addr(SEG, bound.ip()))
            .await
            .unwrap()
            .is_some(),
        "a bound address is never collected"
    );
    task.abort();
}

#[tokio::test]
async fn a_gone_host_whose_machine_still_answers_keeps_its_addresses_until_it_falls_silent() {
    use rustoverlay::dataplane::fake::FakeOp;
    use rustoverlay::sync::readiness::Readiness;
    use rustoverlay::sync::reaper::{self, ReaperConfig};
    let c = cluster().await;
    let lease = c.store.grant_lease(HOUR).await.unwrap();
    let (_registered, lease) = tokio::sync::watch::channel(Some(lease));
    let grace = Duration::from_millis(300);
    let task = tokio::spawn(reaper::run(
        c.store.clone(),
        "b".into(),
        Readiness::new(true),
        c.b.reconciler.clone(),
        ReaperConfig {
            period: Duration::from_millis(100),
            grace,
            orphan_age: HOUR,
        },
        c.b.live.clone(),
        without_revisions(lease),
    ));
    // a is cut off from the store, but its machine (and its containers)
    // are still on the underlay.
    c.b.fake.set_answering(c.a.vtep(), true);
    c.a.unregister().await;
    c.b.sees_registered("a", false).await;
    let held = holdings_of(c.store.as_ref(), "a").await;
    assert!(!held.is_empty());
    eventually("b probes a's machine after the grace", || {
        c.b.fake.calls(FakeOp::ProbeHost) >= 3
    })
    .await;
    assert_eq!(
        holdings_of(c.store.as_ref(), "a").await,
        held,
        "nothing of a host whose machine answers is reclaimed"
    );
    assert!(!is_free(&c.b, c.ea.ip()).await, "a's address stays a's");

    // a's machine falls silent: now it is gone, and reclaimed.
    c.b.fake.set_answering(c.a.vtep(), false);
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !holdings_of(c.store.as_ref(), "a").await.is_empty() {
        assert!(std::time::Instant::now() < deadline, "a never reclaimed");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(is_free(&c.b, c.ea.ip()).await);
    assert!(!is_free(&c.b, c.eb.ip()).await, "b's own address stays");
    task.abort();
}

#[tokio::test]
async fn a_record_that_cannot_be_read_does_not_stop_the_census() {
    let c = cluster().await;
    let net_b = c.b.overlays.lookup("net-b").await.unwrap();
    // Garbage where an endpoint and a network of host c would be.
    let bad_ep = keys::endpoint(&net_b.overlay, "brokenccccccccccc");
    c.store.put(&bad_ep, b"\xff".to_vec()).await.unwrap();
    let bad_net = keys::host_network("c", "net-c");
    c.store.put(&bad_net, b"{}".to_vec()).await.unwrap();

    let read = census(c.store.as_ref())
        .await
        .expect("the census skips what it cannot read");
    assert_eq!(read.holdings["a"].endpoints.len(), 1);
    assert_eq!(read.holdings["b"].endpoints.len(), 1);
    assert!(!read.holdings.contains_key("c"), "nothing read for c");
    // The unreadable endpoint may hold any address of its overlay's pool:
    // none is collected while it stays.
    assert!(read.unbound.is_empty(), "{:?}", read.unbound);
    c.store.delete(&bad_ep).await.unwrap();
    let unbound = census(c.store.as_ref()).await.unwrap().unbound;
    assert_eq!(
        unbound.iter().map(|u| u.ip).collect::<Vec<_>>(),
        vec![c.a_unbound]
    );
    c.store.put(&bad_ep, b"\xff".to_vec()).await.unwrap();
    // Reclaim and gc go on for everyone else.
    c.a.unregister().await;
    let report = gc(c.store.clone(), true, Duration::ZERO, true)
        .await
        .unwrap();
    assert!(report.contains("reclaimed host a"), "{report}");
    assert!(is_free(&c.b, c.ea.ip()).await);
    assert!(c.store.get(&bad_ep).await.unwrap().is_some(), "left alone");
}

/// A store that counts ranges by prefix and the open watches of the root.
struct Counted {
    inner: Arc<dyn KvStore>,
    ranges: std::sync::Mutex<BTreeMap<String, u64>>,
    root_watches: Arc<std::sync::atomic::AtomicI64>,
}

impl Counted {
    fn new(inner: Arc<dyn KvStore>) -> Arc<Counted> {
        Arc::new(Counted {
            inner,
            ranges: Default::default(),
            root_watches: Default::default(),
        })
    }

    fn ranges(&self, prefix: &str) -> u64 {
        self.ranges
            .lock()
            .unwrap()
            .get(prefix)
            .copied()
            .unwrap_or(0)
    }

    fn root_watches(&self) -> i64 {
        self.root_watches.load(std::sync::atomic::Ordering::SeqCst)
    }
}

/// Counts down an open watch when the stream goes.
struct Open(Arc<std::sync::atomic::AtomicI64>);

impl Drop for Open {
    fn drop(&mut self) {
        self.0.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
    }
}

#[async_trait::async_trait]
impl KvStore for Counted {
    fn backend_name(&self) -> &'static str {
        "counted"
    }
    fn watch_fidelity(&self) -> kvstore_backends::WatchFidelity {
        self.inner.watch_fidelity()
    }
    async fn get(&self, key: &str) -> kvstore_backends::Result<Option<KeyValue>> {
        self.inner.get(key).await
    }
    async fn range(
        &self,
        prefix: &str,
    ) -> kvstore_backends::Result<kvstore_backends::RangeResponse> {
        *self
            .ranges
            .lock()
            .unwrap()
            .entry(prefix.into())
            .or_default() += 1;
        self.inner.range(prefix).await
    }
    async fn txn(
        &self,
        txn: kvstore_backends::Txn,
    ) -> kvstore_backends::Result<kvstore_backends::TxnResponse> {
        self.inner.txn(txn).await
    }
    async fn watch(
        &self,
        prefix: &str,
        start: i64,
    ) -> kvstore_backends::Result<kvstore_backends::WatchStream> {
        use futures::StreamExt;
        let stream = self.inner.watch(prefix, start).await?;
        if prefix != keys::ROOT {
            return Ok(stream);
        }
        self.root_watches
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let open = Open(self.root_watches.clone());
        Ok(stream.map(move |e| (&open, e).1).boxed())
    }
    async fn grant_lease(
        &self,
        ttl: Duration,
    ) -> kvstore_backends::Result<kvstore_backends::LeaseId> {
        self.inner.grant_lease(ttl).await
    }
    async fn keep_alive(
        &self,
        lease: kvstore_backends::LeaseId,
    ) -> kvstore_backends::Result<Option<kvstore_backends::Revision>> {
        self.inner.keep_alive(lease).await
    }
    async fn revoke_lease(&self, lease: kvstore_backends::LeaseId) -> kvstore_backends::Result<()> {
        self.inner.revoke_lease(lease).await
    }
}

#[tokio::test]
async fn the_reaper_reads_the_whole_store_once_while_it_leads_and_stops_following_after() {
    use rustoverlay::sync::readiness::Readiness;
    use rustoverlay::sync::reaper::{self, ReaperConfig};
    let c = cluster().await;
    let counted = Counted::new(c.store.clone());
    let period = Duration::from_millis(50);
    let lease = c.store.grant_lease(HOUR).await.unwrap();
    let (registered, lease) = tokio::sync::watch::channel(Some(lease));
    let task = tokio::spawn(reaper::run(
        counted.clone(),
        "b".into(),
        Readiness::new(true),
        c.b.reconciler.clone(),
        ReaperConfig {
            period,
            grace: Duration::from_millis(300),
            orphan_age: HOUR,
        },
        c.b.live.clone(),
        without_revisions(lease),
    ));
    eventually("b leads and follows the store", || {
        counted.root_watches() == 1
    })
    .await;
    tokio::time::sleep(period * 10).await;
    assert_eq!(counted.ranges(keys::ROOT), 1, "no full read per round");

    // Rounds still work from the model: a gone host is reclaimed.
    c.a.unregister().await;
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !holdings_of(c.store.as_ref(), "a").await.is_empty() {
        assert!(std::time::Instant::now() < deadline, "a never reclaimed");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(counted.ranges(keys::ROOT), 1, "changes came by the watch");

    // The role ends (b's registration is lost): b stops following.
    registered.send_replace(None);
    eventually("b stops following", || counted.root_watches() == 0).await;
    // Registered again, b takes the role again with one fresh full read.
    let lease = c.store.grant_lease(HOUR).await.unwrap();
    c.store.delete(&keys::reaper()).await.unwrap();
    registered.send_replace(Some(lease));
    eventually("b follows again", || counted.root_watches() == 1).await;
    assert_eq!(counted.ranges(keys::ROOT), 2);
    task.abort();
    let _ = task.await;
    assert_eq!(counted.root_watches(), 0, "the watch goes with the reaper");
}

#[tokio::test]
async fn the_orphan_sweep_reads_the_store_again_only_after_a_change() {
    use rustoverlay::dataplane::names::short_id;
    use rustoverlay::dataplane::Dataplane;
    let counted = Counted::new(store());
    let s: Arc<dyn KvStore> = counted.clone();
    let a = Host::start(&s, "a", "192.0.2.1").await;
    let b = Host::start(&s, "b", "192.0.2.2").await;
    a.create_network("net-a", SUBNET).await;
    b.create_network("net-b", SUBNET).await;
    let running = a.run("net-a", "runningaaaaaaaaa").await;
    // Each sweep that reads the store starts with this host's networks.
    let reads = || counted.ranges(&keys::host_networks("a"));
    let age = Duration::from_secs(2);
    // No renewal revision: each sweep reads the store's revision itself.
    let sweep = || {
        a.reconciler
            .sweep_orphans_when_changed(s.as_ref(), age, None)
    };

    assert_eq!(sweep().await.unwrap(), 0);
    let first = reads();
    for _ in 0..5 {
        assert_eq!(sweep().await.unwrap(), 0);
    }
    assert_eq!(reads(), first, "nothing changed: nothing read");
    // A write anywhere in the store: read again, once.
    b.ipam.request_address(POOL, None, false).await.unwrap();
    for _ in 0..3 {
        assert_eq!(sweep().await.unwrap(), 0);
    }
    assert_eq!(reads(), first + 1);

    // Created, never joined (its container went while the store was
    // unreachable): young now, an orphan once old, with no other change.
    let orphan = a.create_endpoint("net-a", "orphanaaaaaaaaaa").await;
    assert_eq!(sweep().await.unwrap(), 0, "young");
    let before = reads();
    let (mut calls, deadline) = (0, std::time::Instant::now() + Duration::from_secs(10));
    while sweep().await.unwrap() == 0 {
        assert!(std::time::Instant::now() < deadline, "the orphan stayed");
        calls += 1;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // At least a few sweeps ran meanwhile (how many depends on the
    // machine's load: each waits 100 ms, the endpoint comes of age in 2 s).
    assert!(
        reads() - before <= 2 && calls >= 5,
        "{} reads in {calls} sweeps: read again only when an endpoint came of age",
        reads() - before
    );
    assert!(!endpoint_holds(&a, "net-a", &orphan.endpoint_id, orphan.ip()).await);

    // A bridge port that goes without any store write (a Leave whose
    // DeleteEndpoint never came): read again, and the endpoint is an orphan.
    assert_eq!(sweep().await.unwrap(), 0);
    let before = reads();
    assert_eq!(sweep().await.unwrap(), 0);
    assert_eq!(reads(), before);
    a.fake
        .remove_endpoint_link(VNI, short_id(&running.endpoint_id))
        .await
        .unwrap();
    assert_eq!(sweep().await.unwrap(), 1, "the endpoint whose port went");
    assert_eq!(reads(), before + 1);
}

#[tokio::test]
async fn an_idle_orphan_sweep_takes_the_store_revision_from_lease_renewals() {
    let counted = Counted::new(store());
    let s: Arc<dyn KvStore> = counted.clone();
    let a = Host::start(&s, "a", "192.0.2.1").await;
    let b = Host::start(&s, "b", "192.0.2.2").await;
    a.create_network("net-a", SUBNET).await;
    b.create_network("net-b", SUBNET).await;
    a.run("net-a", "runningaaaaaaaaa").await;
    let lease = s.grant_lease(HOUR).await.unwrap();
    let renew = || async { s.keep_alive(lease.clone()).await.unwrap() };
    let reads = || counted.ranges(&keys::host_networks("a"));
    let age = Duration::from_secs(1);
    let sweep = |renewed| {
        a.reconciler
            .sweep_orphans_when_changed(s.as_ref(), age, renewed)
    };

    let renewed = renew().await;
    assert!(renewed.is_some(), "the memory store reports its revision");
    assert_eq!(sweep(renewed).await.unwrap(), 0);
    let first = reads();
    for _ in 0..5 {
        assert_eq!(sweep(renewed).await.unwrap(), 0);
    }
    assert_eq!(reads(), first, "idle: nothing read");
    assert_eq!(
        counted.ranges(&keys::reaper()),
        0,
        "the revision came from the renewal, not from a read"
    );

    // An endpoint written after the renewal (a CreateEndpoint whose answer
    // was lost, its container gone): the next renewal reports the write,
    // the sweep reads again, and the endpoint is an orphan once old.
    let orphan = a.create_endpoint("net-a", "orphanaaaaaaaaaa").await;
    let renewed = renew().await;
    assert_eq!(sweep(renewed).await.unwrap(), 0, "young");
    assert_eq!(reads(), first + 1, "the write was noticed");
    tokio::time::sleep(age + Duration::from_millis(1100)).await;
    assert_eq!(sweep(renewed).await.unwrap(), 1, "of age: an orphan");
    assert!(!endpoint_holds(&a, "net-a", &orphan.endpoint_id, orphan.ip()).await);
    assert_eq!(counted.ranges(&keys::reaper()), 0);
}
