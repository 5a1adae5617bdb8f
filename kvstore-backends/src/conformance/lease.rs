//! Leases: expiry deletes a lease's keys on its own, keep-alive keeps them,
//! revoke deletes them at once, a dead lease cannot be written with, and a
//! put without a lease detaches a key from its lease.

use std::sync::Arc;
use std::time::Duration;

use super::support::{
    collect, current_revision, expect_sentinel_next, next_event, unique_prefix, wait_until_absent,
};
use crate::{EventKind, KvStore, Op, Revision, StoreError, Txn};

/// Whole seconds, so that etcd and Consul, which count in seconds, can
/// pass too.
const LEASE_TTL: Duration = Duration::from_secs(2);

pub async fn lease_expiry_deletes_keys(store: Arc<dyn KvStore>) {
    let p = unique_prefix("lease_expiry");
    let (leased, plain) = (format!("{p}leased"), format!("{p}plain"));
    let lease = store.grant_lease(LEASE_TTL).await.expect("grant");
    let start = current_revision(&*store).await + 1;
    let mut watch = store.watch(&p, start).await.expect("watch");
    let r = store
        .txn(Txn::new().and_then(vec![
            Op::put_with_lease(&leased, b"v".to_vec(), lease.clone()),
            Op::put(&plain, b"v".to_vec()),
        ]))
        .await
        .expect("put")
        .revision;
    let kv = store.get(&leased).await.expect("get").expect("leased key");
    assert_eq!(kv.lease.as_ref(), Some(&lease), "the key reports its lease");
    assert_eq!(kv.mod_revision, r);

    // Nobody touches the store meanwhile: expiry must happen on its own.
    wait_until_absent(&*store, &leased, LEASE_TTL * 3 + Duration::from_secs(2)).await;
    assert!(
        store.get(&plain).await.expect("get").is_some(),
        "unleased key stays"
    );

    let puts = collect(&mut watch, 2, "puts").await;
    assert!(puts
        .iter()
        .all(|e| e.kind == EventKind::Put && e.revision() == r));
    let ev = next_event(&mut watch, "expiry delete").await;
    assert_eq!(
        (ev.kv.key.as_str(), ev.kind),
        (leased.as_str(), EventKind::Delete)
    );
    assert!(ev.revision() > r);
    expect_sentinel_next(&*store, &mut watch, &p).await;
}

/// A renewal that reports the store's revision reports the latest write's
/// (the conformance stores have one member): the orphan sweep relies on it
/// to notice writes without reading. Consul does not report one; etcd not on
/// a stream's opening renewal.
pub async fn lease_renewal_reports_the_revision(store: Arc<dyn KvStore>) {
    let p = unique_prefix("lease_renewal_revision");
    let lease = store.grant_lease(LEASE_TTL).await.expect("grant");
    store.keep_alive(lease.clone()).await.expect("keep_alive");
    let reports = store.backend_name() != "consul";
    for i in 0..3 {
        let written = store
            .put(&format!("{p}k{i}"), b"v".to_vec())
            .await
            .expect("put");
        let renewed = store.keep_alive(lease.clone()).await.expect("keep_alive");
        if reports {
            assert_eq!(renewed, Some(written), "a renewal after write {i}");
        } else {
            assert_eq!(
                renewed,
                None,
                "{} reports no revision",
                store.backend_name()
            );
        }
    }
    store.revoke_lease(lease).await.expect("revoke");
}

pub async fn lease_keep_alive_keeps_keys(store: Arc<dyn KvStore>) {
    let p = unique_prefix("lease_keep_alive");
    let key = format!("{p}k");
    let lease = store.grant_lease(LEASE_TTL).await.expect("grant");
    store
        .txn(Txn::new().and_then(vec![Op::put_with_lease(&key, b"v".to_vec(), lease.clone())]))
        .await
        .expect("put");
    // Renew at a quarter of the TTL for well over two TTLs.
    let until = tokio::time::Instant::now() + LEASE_TTL * 5 / 2;
    while tokio::time::Instant::now() < until {
        tokio::time::sleep(LEASE_TTL / 4).await;
        store.keep_alive(lease.clone()).await.expect("keep_alive");
        assert!(
            store.get(&key).await.expect("get").is_some(),
            "a renewed lease keeps its key"
        );
    }
    // Once renewals stop, it expires like any lease.
    wait_until_absent(&*store, &key, LEASE_TTL * 3 + Duration::from_secs(2)).await;
    match store.keep_alive(lease.clone()).await {
        Err(StoreError::LeaseNotFound(_)) => {}
        other => panic!("keep_alive of an expired lease: expected LeaseNotFound, got {other:?}"),
    }
}

pub async fn lease_revoke_deletes_at_once(store: Arc<dyn KvStore>) {
    let p = unique_prefix("lease_revoke");
    let lease = store
        .grant_lease(Duration::from_secs(60))
        .await
        .expect("grant");
    let other = store
        .grant_lease(Duration::from_secs(60))
        .await
        .expect("grant");
    assert_ne!(lease, other, "lease ids are unique");
    let leased: Vec<String> = (0..3).map(|i| format!("{p}leased/{i}")).collect();
    let mut ops: Vec<Op> = leased
        .iter()
        .map(|k| Op::put_with_lease(k, b"v".to_vec(), lease.clone()))
        .collect();
    ops.push(Op::put(format!("{p}plain"), b"v".to_vec()));
    ops.push(Op::put_with_lease(
        format!("{p}other"),
        b"v".to_vec(),
        other.clone(),
    ));
    store.txn(Txn::new().and_then(ops)).await.expect("put");
    let start = current_revision(&*store).await + 1;
    let mut watch = store.watch(&p, start).await.expect("watch");

    store.revoke_lease(lease.clone()).await.expect("revoke");
    // At once: no waiting.
    for key in &leased {
        assert_eq!(
            store.get(key).await.expect("get"),
            None,
            "{key} deleted by revoke"
        );
    }
    assert!(store
        .get(&format!("{p}plain"))
        .await
        .expect("get")
        .is_some());
    assert!(store
        .get(&format!("{p}other"))
        .await
        .expect("get")
        .is_some());
    let mut events: Vec<(String, EventKind, Revision)> = collect(&mut watch, 3, "revoke deletes")
        .await
        .into_iter()
        .map(|e| (e.kv.key, e.kind, e.kv.mod_revision))
        .collect();
    events.sort_by(|x, y| x.0.cmp(&y.0));
    let rev = events[0].2;
    assert!(
        rev >= start,
        "revision {rev} before the watch's start {start}"
    );
    let want: Vec<_> = leased
        .iter()
        .map(|k| (k.clone(), EventKind::Delete, rev))
        .collect();
    assert_eq!(events, want, "one delete per key, all at one revision");
    expect_sentinel_next(&*store, &mut watch, &p).await;

    store
        .revoke_lease(lease.clone())
        .await
        .expect("revoking twice is not an error");
    match store.keep_alive(lease.clone()).await {
        Err(StoreError::LeaseNotFound(_)) => {}
        other => panic!("keep_alive of a revoked lease: expected LeaseNotFound, got {other:?}"),
    }
    let late = format!("{p}late");
    match store
        .txn(Txn::new().and_then(vec![
            Op::put(format!("{p}late-plain"), b"v".to_vec()),
            Op::put_with_lease(&late, b"v".to_vec(), lease.clone()),
        ]))
        .await
    {
        Err(StoreError::LeaseNotFound(_)) => {}
        other => panic!("put with a revoked lease: expected LeaseNotFound, got {other:?}"),
    }
    assert_eq!(store.get(&late).await.expect("get"), None);
    assert_eq!(
        store.get(&format!("{p}late-plain")).await.expect("get"),
        None,
        "the txn with a bad lease applied nothing"
    );
    store
        .keep_alive(other.clone())
        .await
        .expect("the other lease lives");
    store.revoke_lease(other).await.expect("revoke");
}

pub async fn lease_expired_put_fails(store: Arc<dyn KvStore>) {
    let p = unique_prefix("lease_expired_put");
    let key = format!("{p}k");
    let lease = store.grant_lease(LEASE_TTL).await.expect("grant");
    store
        .txn(Txn::new().and_then(vec![Op::put_with_lease(&key, b"v".to_vec(), lease.clone())]))
        .await
        .expect("put with a live lease");
    wait_until_absent(&*store, &key, LEASE_TTL * 3 + Duration::from_secs(2)).await;
    match store
        .txn(Txn::new().and_then(vec![Op::put_with_lease(
            &key,
            b"again".to_vec(),
            lease.clone(),
        )]))
        .await
    {
        Err(StoreError::LeaseNotFound(id)) => assert_eq!(id, lease.0),
        other => panic!("put with an expired lease: expected LeaseNotFound, got {other:?}"),
    }
    assert_eq!(store.get(&key).await.expect("get"), None);
    match store.keep_alive(lease).await {
        Err(StoreError::LeaseNotFound(_)) => {}
        other => panic!("keep_alive of an expired lease: expected LeaseNotFound, got {other:?}"),
    }
}

pub async fn lease_put_without_lease_detaches(store: Arc<dyn KvStore>) {
    let p = unique_prefix("lease_detach");
    let (moved, detached, stays) = (
        format!("{p}moved"),
        format!("{p}detached"),
        format!("{p}stays"),
    );
    let first = store
        .grant_lease(Duration::from_secs(60))
        .await
        .expect("grant");
    let second = store
        .grant_lease(Duration::from_secs(60))
        .await
        .expect("grant");
    store
        .txn(Txn::new().and_then(vec![
            Op::put_with_lease(&moved, b"v".to_vec(), first.clone()),
            Op::put_with_lease(&detached, b"v".to_vec(), first.clone()),
            Op::put_with_lease(&stays, b"v".to_vec(), first.clone()),
        ]))
        .await
        .expect("put");
    // Rewriting a key replaces its lease binding.
    store
        .txn(Txn::new().and_then(vec![
            Op::put_with_lease(&moved, b"v2".to_vec(), second.clone()),
            Op::put(&detached, b"v2".to_vec()),
            Op::put_with_lease(&stays, b"v2".to_vec(), first.clone()),
        ]))
        .await
        .expect("rewrite");
    assert_eq!(
        store
            .get(&detached)
            .await
            .expect("get")
            .and_then(|kv| kv.lease),
        None
    );
    assert_eq!(
        store
            .get(&moved)
            .await
            .expect("get")
            .and_then(|kv| kv.lease),
        Some(second.clone())
    );
    store.revoke_lease(first).await.expect("revoke first");
    assert_eq!(
        store.get(&stays).await.expect("get"),
        None,
        "still on the first lease"
    );
    assert!(
        store.get(&moved).await.expect("get").is_some(),
        "moved to the second lease"
    );
    assert!(
        store.get(&detached).await.expect("get").is_some(),
        "no lease any more"
    );
    store.revoke_lease(second).await.expect("revoke second");
    assert_eq!(store.get(&moved).await.expect("get"), None);
    assert!(store.get(&detached).await.expect("get").is_some());
}
