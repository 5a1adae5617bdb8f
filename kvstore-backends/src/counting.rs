//! A decorator that counts store round trips, for benchmarks and for tests
//! that check how many calls an operation costs (a count, never a time).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;

use crate::{
    KeyValue, KvStore, LeaseId, RangeResponse, Result, Revision, Txn, TxnResponse, WatchStream,
};

/// Counts every call that reaches the inner store. Clones share the counter.
#[derive(Debug, Clone)]
pub struct CountingStore<S> {
    inner: S,
    calls: Arc<AtomicU64>,
}

impl<S: KvStore> CountingStore<S> {
    pub fn new(inner: S) -> Self {
        CountingStore {
            inner,
            calls: Arc::new(AtomicU64::new(0)),
        }
    }

    /// Round trips so far.
    pub fn calls(&self) -> u64 {
        self.calls.load(Ordering::Relaxed)
    }

    /// A handle on the counter that outlives moving the store into an `Arc`.
    pub fn counter(&self) -> Arc<AtomicU64> {
        self.calls.clone()
    }

    fn tick(&self) {
        self.calls.fetch_add(1, Ordering::Relaxed);
    }
}

#[async_trait]
impl<S: KvStore> KvStore for CountingStore<S> {
    fn backend_name(&self) -> &'static str {
        self.inner.backend_name()
    }

    fn watch_fidelity(&self) -> crate::WatchFidelity {
        self.inner.watch_fidelity()
    }

    async fn get(&self, key: &str) -> Result<Option<KeyValue>> {
        self.tick();
        self.inner.get(key).await
    }

    async fn range(&self, prefix: &str) -> Result<RangeResponse> {
        self.tick();
        self.inner.range(prefix).await
    }

    async fn txn(&self, txn: Txn) -> Result<TxnResponse> {
        self.tick();
        self.inner.txn(txn).await
    }

    async fn watch(&self, prefix: &str, start_revision: Revision) -> Result<WatchStream> {
        self.tick();
        self.inner.watch(prefix, start_revision).await
    }

    async fn grant_lease(&self, ttl: Duration) -> Result<LeaseId> {
        self.tick();
        self.inner.grant_lease(ttl).await
    }

    async fn keep_alive(&self, lease: LeaseId) -> Result<Option<Revision>> {
        self.tick();
        self.inner.keep_alive(lease).await
    }

    async fn revoke_lease(&self, lease: LeaseId) -> Result<()> {
        self.tick();
        self.inner.revoke_lease(lease).await
    }
}
