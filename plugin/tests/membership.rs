//! Host registration on the memory store: one live registration per host ID.

use kvstore_backends::{KvStore, MemoryStore};
use rustoverlay::state::keys;
use rustoverlay::state::records::HostRecord;
use rustoverlay::sync::membership::{RegisterError, Registration};
use std::sync::Arc;
use std::time::Duration;

fn registration(store: &Arc<dyn KvStore>, host: &str, vtep: &str) -> Registration {
    Registration::new(
        store.clone(),
        host.into(),
        vtep.parse().unwrap(),
        Duration::from_secs(10),
    )
}

async fn registered_vtep(store: &Arc<dyn KvStore>, host: &str) -> Option<String> {
    let kv = store.get(&keys::host_registration(host)).await.unwrap()?;
    let rec: HostRecord = serde_json::from_slice(&kv.value).unwrap();
    Some(rec.vtep.to_string())
}

#[tokio::test]
async fn a_live_host_id_with_another_vtep_is_refused_and_left_alone() {
    let store: Arc<dyn KvStore> = Arc::new(MemoryStore::new());
    registration(&store, "clone", "192.0.2.1")
        .register()
        .await
        .unwrap();
    let err = registration(&store, "clone", "192.0.2.2")
        .register()
        .await
        .unwrap_err();
    assert!(
        matches!(err, RegisterError::Clash { .. }),
        "a second machine with the same host ID: {err}"
    );
    let message = err.to_string();
    assert!(
        message.contains("192.0.2.1") && message.contains("--host-id"),
        "{message}"
    );
    assert_eq!(
        registered_vtep(&store, "clone").await.as_deref(),
        Some("192.0.2.1"),
        "the first host keeps its registration"
    );
}

#[tokio::test]
async fn the_same_machine_takes_its_own_registration_over_after_a_restart() {
    let store: Arc<dyn KvStore> = Arc::new(MemoryStore::new());
    let first = registration(&store, "h1", "192.0.2.1")
        .register()
        .await
        .unwrap();
    let second = registration(&store, "h1", "192.0.2.1")
        .register()
        .await
        .unwrap();
    assert_ne!(first, second, "a fresh lease");
    // The old lease ending must not take the new registration with it.
    store.revoke_lease(first).await.unwrap();
    assert_eq!(
        registered_vtep(&store, "h1").await.as_deref(),
        Some("192.0.2.1")
    );
}

#[tokio::test]
async fn a_host_id_whose_registration_expired_can_be_taken_by_another_vtep() {
    let store: Arc<dyn KvStore> = Arc::new(MemoryStore::new());
    let lease = registration(&store, "moved", "192.0.2.1")
        .register()
        .await
        .unwrap();
    store.revoke_lease(lease).await.unwrap();
    registration(&store, "moved", "192.0.2.9")
        .register()
        .await
        .unwrap();
    assert_eq!(
        registered_vtep(&store, "moved").await.as_deref(),
        Some("192.0.2.9")
    );
}

#[tokio::test]
async fn one_host_is_the_reaper_and_the_role_ends_with_its_registration() {
    use rustoverlay::sync::leader::Leadership;
    use tokio::sync::watch;
    let store: Arc<dyn KvStore> = Arc::new(MemoryStore::new());
    let ttl = Duration::from_secs(60);
    let lease_a = store.grant_lease(ttl).await.unwrap();
    let lease_b = store.grant_lease(ttl).await.unwrap();
    let (tx_a, rx_a) = watch::channel(Some(lease_a.clone()));
    let (_tx_b, rx_b) = watch::channel(Some(lease_b));
    let mut a = Leadership::new(store.clone(), "a".into(), rx_a);
    let mut b = Leadership::new(store.clone(), "b".into(), rx_b);
    assert!(a.hold().await, "the first to ask becomes the reaper");
    assert!(!b.hold().await, "one reaper at a time");
    assert!(a.hold().await, "the reaper keeps the role while registered");
    assert!(!b.hold().await);
    // a's registration ends (its lease expires): the role goes with it in
    // the same expiry, so b takes it at its very next try.
    store.revoke_lease(lease_a).await.unwrap();
    assert!(b.hold().await, "b takes the role as soon as a's lease ends");
    // a registered again (a fresh lease) does not take the role back, and
    // an unregistered host never holds it.
    let lease_a2 = store.grant_lease(ttl).await.unwrap();
    tx_a.send_replace(Some(lease_a2));
    assert!(!a.hold().await);
    tx_a.send_replace(None);
    assert!(!a.hold().await);
}

#[tokio::test]
async fn the_reaper_role_is_checked_without_reads_until_its_key_changes() {
    use kvstore_backends::CountingStore;
    use rustoverlay::sync::leader::Leadership;
    use std::sync::atomic::Ordering;
    use tokio::sync::watch;
    let counting = CountingStore::new(Arc::new(MemoryStore::new()));
    let calls = counting.counter();
    let store: Arc<dyn KvStore> = Arc::new(counting);
    let ttl = Duration::from_secs(60);
    let lease_a = store.grant_lease(ttl).await.unwrap();
    let lease_b = store.grant_lease(ttl).await.unwrap();
    let (_tx_a, rx_a) = watch::channel(Some(lease_a.clone()));
    let (_tx_b, rx_b) = watch::channel(Some(lease_b));
    let mut a = Leadership::new(store.clone(), "a".into(), rx_a);
    let mut b = Leadership::new(store.clone(), "b".into(), rx_b);
    assert!(a.hold().await);
    assert!(!b.hold().await);
    // a's claim is read back once; from then on both know their role.
    assert!(a.hold().await);
    let before = calls.load(Ordering::Relaxed);
    for _ in 0..10 {
        assert!(a.hold().await);
        assert!(!b.hold().await);
    }
    assert_eq!(
        calls.load(Ordering::Relaxed),
        before,
        "checks of an unchanged role read nothing"
    );
    // a's registration ends: b is told by its watch, without polling, and
    // takes the role.
    store.revoke_lease(lease_a).await.unwrap();
    tokio::time::timeout(Duration::from_secs(5), b.changed())
        .await
        .expect("b hears that the role is free");
    assert!(b.hold().await);
    assert!(!a.hold().await, "a's knowledge went with its key");
}
