//! Meters every store call: count, outcome, latency, and which request
//! caused it (see [`super::scoped`]).

use async_trait::async_trait;
use kvstore_backends::{
    KeyValue, KvStore, LeaseId, RangeResponse, Result, Revision, StoreError, Txn, TxnResponse,
    WatchFidelity, WatchStream,
};
use std::future::Future;
use std::time::{Duration, Instant};

/// A store that records each call it forwards.
pub struct MeteredStore<S> {
    inner: S,
}

impl<S: KvStore> MeteredStore<S> {
    pub fn new(inner: S) -> Self {
        MeteredStore { inner }
    }
}

/// Every `op` label value (each forwarded method's).
pub(super) const OPS: &[&str] = &[
    "get",
    "range",
    "put",
    "delete",
    "txn",
    "grant_lease",
    "keep_alive",
    "revoke_lease",
    "watch",
];

/// The outcomes that say the store is sick (not a lost race).
pub(super) const SICK: &[&str] = &["unavailable", "timeout"];

async fn metered<T>(op: &'static str, call: impl Future<Output = Result<T>>) -> Result<T> {
    let started = Instant::now();
    let result = call.await;
    super::store_call(op, outcome(&result), started.elapsed());
    result
}

fn outcome<T>(result: &Result<T>) -> &'static str {
    match result {
        Ok(_) => "ok",
        Err(StoreError::Unavailable(_)) => "unavailable",
        Err(StoreError::Timeout(_)) => "timeout",
        Err(StoreError::Conflict(_)) => "conflict",
        Err(StoreError::LeaseNotFound(_)) => "lease_not_found",
        Err(StoreError::Compacted { .. }) => "compacted",
        Err(_) => "error",
    }
}

// Every method is forwarded, provided ones included, so the inner store's
// own versions run and each counts as the one round trip it is.
#[async_trait]
impl<S: KvStore> KvStore for MeteredStore<S> {
    fn backend_name(&self) -> &'static str {
        self.inner.backend_name()
    }

    fn watch_fidelity(&self) -> WatchFidelity {
        self.inner.watch_fidelity()
    }

    async fn get(&self, key: &str) -> Result<Option<KeyValue>> {
        metered("get", self.inner.get(key)).await
    }

    async fn range(&self, prefix: &str) -> Result<RangeResponse> {
        metered("range", self.inner.range(prefix)).await
    }

    async fn txn(&self, txn: Txn) -> Result<TxnResponse> {
        metered("txn", self.inner.txn(txn)).await
    }

    async fn watch(&self, prefix: &str, start_revision: Revision) -> Result<WatchStream> {
        metered("watch", self.inner.watch(prefix, start_revision)).await
    }

    async fn grant_lease(&self, ttl: Duration) -> Result<LeaseId> {
        metered("grant_lease", self.inner.grant_lease(ttl)).await
    }

    async fn keep_alive(&self, lease: LeaseId) -> Result<Option<Revision>> {
        metered("keep_alive", self.inner.keep_alive(lease)).await
    }

    async fn revoke_lease(&self, lease: LeaseId) -> Result<()> {
        metered("revoke_lease", self.inner.revoke_lease(lease)).await
    }

    async fn put(&self, key: &str, value: Vec<u8>) -> Result<Revision> {
        metered("put", self.inner.put(key, value)).await
    }

    async fn delete(&self, key: &str) -> Result<bool> {
        metered("delete", self.inner.delete(key)).await
    }

    async fn create_if_absent(&self, key: &str, value: Vec<u8>) -> Result<Option<KeyValue>> {
        metered("txn", self.inner.create_if_absent(key, value)).await
    }

    async fn compare_and_swap(
        &self,
        key: &str,
        expected_mod_revision: Revision,
        value: Vec<u8>,
    ) -> Result<std::result::Result<Revision, Option<KeyValue>>> {
        metered(
            "txn",
            self.inner
                .compare_and_swap(key, expected_mod_revision, value),
        )
        .await
    }
}
