//! `TimeoutStore`: bounds every call, and passes the whole suite when the
//! inner store answers.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use kvstore_backends::{
    KeyValue, KvStore, LeaseId, MemoryStore, RangeResponse, Result, Revision, StoreError,
    TimeoutStore, Txn, TxnResponse, WatchStream,
};

kvstore_backends::conformance_tests!(Arc::new(TimeoutStore::new(
    MemoryStore::new(),
    Duration::from_secs(10)
)));

/// The next watch item, or a failure instead of a hang.
async fn next(
    watch: &mut kvstore_backends::WatchStream,
) -> Option<kvstore_backends::Result<kvstore_backends::WatchEvent>> {
    tokio::time::timeout(
        std::time::Duration::from_secs(10),
        futures::StreamExt::next(watch),
    )
    .await
    .expect("no watch item within 10 s")
}

/// A store that never answers.
struct Hung;

#[async_trait]
impl KvStore for Hung {
    fn backend_name(&self) -> &'static str {
        "hung"
    }
    async fn get(&self, _: &str) -> Result<Option<KeyValue>> {
        std::future::pending().await
    }
    async fn range(&self, _: &str) -> Result<RangeResponse> {
        std::future::pending().await
    }
    async fn txn(&self, _: Txn) -> Result<TxnResponse> {
        std::future::pending().await
    }
    async fn watch(&self, _: &str, _: Revision) -> Result<WatchStream> {
        std::future::pending().await
    }
    async fn grant_lease(&self, _: Duration) -> Result<LeaseId> {
        std::future::pending().await
    }
    async fn keep_alive(&self, _: LeaseId) -> Result<Option<Revision>> {
        std::future::pending().await
    }
    async fn revoke_lease(&self, _: LeaseId) -> Result<()> {
        std::future::pending().await
    }
}

fn assert_timeout<T: std::fmt::Debug>(what: &str, r: Result<T>, limit: Duration) {
    match r {
        Err(StoreError::Timeout(d)) => assert_eq!(d, limit, "{what}"),
        other => panic!("{what}: expected Timeout, got {other:?}"),
    }
}

#[tokio::test]
async fn every_call_to_a_hung_store_times_out() {
    let limit = Duration::from_millis(50);
    // Through an Arc<dyn KvStore>, as the plugin holds its store.
    let inner: Arc<dyn KvStore> = Arc::new(Hung);
    let store = TimeoutStore::new(inner, limit);
    assert_eq!(store.backend_name(), "hung");
    let lease = LeaseId("1".into());
    assert_timeout("get", store.get("k").await, limit);
    assert_timeout("range", store.range("k").await, limit);
    assert_timeout("txn", store.txn(Txn::new()).await, limit);
    assert_timeout("watch", store.watch("k", 0).await.map(drop), limit);
    assert_timeout("grant", store.grant_lease(limit).await, limit);
    assert_timeout("keep_alive", store.keep_alive(lease.clone()).await, limit);
    assert_timeout("revoke", store.revoke_lease(lease).await, limit);
    assert_timeout("put", store.put("k", vec![]).await, limit);
    assert_timeout("delete", store.delete("k").await, limit);
    assert_timeout("create", store.create_if_absent("k", vec![]).await, limit);
    assert_timeout("cas", store.compare_and_swap("k", 0, vec![]).await, limit);
    assert!(StoreError::Timeout(limit).is_transient());
}

#[tokio::test]
async fn a_watch_outlives_the_timeout() {
    let limit = Duration::from_millis(50);
    let store = TimeoutStore::new(MemoryStore::new(), limit);
    let mut watch = store.watch("k", 0).await.unwrap();
    tokio::time::sleep(limit * 4).await;
    let rev = store.put("k", b"v".to_vec()).await.unwrap();
    assert_eq!(next(&mut watch).await.unwrap().unwrap().revision(), rev);
}

#[tokio::test]
async fn counting_store_counts_round_trips() {
    use kvstore_backends::CountingStore;
    let inner: Arc<dyn KvStore> = Arc::new(MemoryStore::new());
    let store = CountingStore::new(inner);
    let counter = store.counter();
    store.put("k", b"1".to_vec()).await.unwrap();
    store.get("k").await.unwrap();
    store
        .compare_and_swap("k", 1, b"2".to_vec())
        .await
        .unwrap()
        .unwrap();
    store.range("").await.unwrap();
    assert_eq!(counter.load(std::sync::atomic::Ordering::Relaxed), 4);
    assert_eq!(store.calls(), 4);
    assert_eq!(store.backend_name(), "memory");
}
