//! A decorator that bounds every store call, so a hung backend turns into a
//! [`StoreError::Timeout`] instead of a hung plugin request.

use std::future::Future;
use std::time::Duration;

use async_trait::async_trait;

use crate::{
    KeyValue, KvStore, LeaseId, RangeResponse, Result, Revision, StoreError, Txn, TxnResponse,
    WatchStream,
};

/// Wraps a store and fails any call that takes longer than `timeout` with
/// [`StoreError::Timeout`]. For a watch only opening the stream is bounded,
/// not its life.
///
/// A write that times out may still be applied by the backend (as with any
/// remote store); callers that retry should use compares.
///
/// Works on a concrete store or on an `Arc<dyn KvStore>`.
#[derive(Debug, Clone)]
pub struct TimeoutStore<S> {
    inner: S,
    timeout: Duration,
}

impl<S: KvStore> TimeoutStore<S> {
    pub fn new(inner: S, timeout: Duration) -> Self {
        TimeoutStore { inner, timeout }
    }

    pub fn inner(&self) -> &S {
        &self.inner
    }

    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    async fn bounded<T>(&self, call: impl Future<Output = Result<T>>) -> Result<T> {
        tokio::time::timeout(self.timeout, call)
            .await
            .unwrap_or(Err(StoreError::Timeout(self.timeout)))
    }
}

#[async_trait]
impl<S: KvStore> KvStore for TimeoutStore<S> {
    fn backend_name(&self) -> &'static str {
        self.inner.backend_name()
    }

    fn watch_fidelity(&self) -> crate::WatchFidelity {
        self.inner.watch_fidelity()
    }

    async fn get(&self, key: &str) -> Result<Option<KeyValue>> {
        self.bounded(self.inner.get(key)).await
    }

    async fn range(&self, prefix: &str) -> Result<RangeResponse> {
        self.bounded(self.inner.range(prefix)).await
    }

    async fn txn(&self, txn: Txn) -> Result<TxnResponse> {
        self.bounded(self.inner.txn(txn)).await
    }

    async fn watch(&self, prefix: &str, start_revision: Revision) -> Result<WatchStream> {
        self.bounded(self.inner.watch(prefix, start_revision)).await
    }

    async fn grant_lease(&self, ttl: Duration) -> Result<LeaseId> {
        self.bounded(self.inner.grant_lease(ttl)).await
    }

    async fn keep_alive(&self, lease: LeaseId) -> Result<Option<Revision>> {
        self.bounded(self.inner.keep_alive(lease)).await
    }

    async fn revoke_lease(&self, lease: LeaseId) -> Result<()> {
        self.bounded(self.inner.revoke_lease(lease)).await
    }

    // The provided methods are forwarded too, so a backend's own (possibly
    // cheaper) versions are used, each bounded as one call.
    async fn put(&self, key: &str, value: Vec<u8>) -> Result<Revision> {
        self.bounded(self.inner.put(key, value)).await
    }

    async fn delete(&self, key: &str) -> Result<bool> {
        self.bounded(self.inner.delete(key)).await
    }

    async fn create_if_absent(&self, key: &str, value: Vec<u8>) -> Result<Option<KeyValue>> {
        self.bounded(self.inner.create_if_absent(key, value)).await
    }

    async fn compare_and_swap(
        &self,
        key: &str,
        expected_mod_revision: Revision,
        value: Vec<u8>,
    ) -> Result<std::result::Result<Revision, Option<KeyValue>>> {
        self.bounded(
            self.inner
                .compare_and_swap(key, expected_mod_revision, value),
        )
        .await
    }
}
