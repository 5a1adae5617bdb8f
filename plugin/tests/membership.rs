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
async fn one_host_is_the_reaper_and_another_takes_over_when_its_lease_ends() {
    use rustoverlay::sync::leader::Leadership;
    let store: Arc<dyn KvStore> = Arc::new(MemoryStore::new());
    let ttl = Duration::from_secs(1);
    let mut a = Leadership::new(store.clone(), "a".into(), ttl);
    let mut b = Leadership::new(store.clone(), "b".into(), ttl);
    assert!(a.hold().await, "the first to ask becomes the reaper");
    assert!(!b.hold().await, "one reaper at a time");
    assert!(a.hold().await, "the reaper keeps the role while it renews");
    assert!(!b.hold().await);
    // a stops renewing (dies): its lease ends, and b takes the role.
    drop(a);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !b.hold().await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "b never became the reaper after a's lease ended"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // A restarted a (a fresh lease) does not take the role back.
    let mut a = Leadership::new(store.clone(), "a".into(), ttl);
    assert!(!a.hold().await);
}
