//! The store behind rustoverlay: one small trait that every backend keeps, and
//! the backends themselves.
//!
//! The trait is deliberately narrow (get, range by prefix, an all-or-nothing
//! transaction with compares on a key's modification revision, watches from a
//! revision, leases) so that etcd v3, Consul and the embedded file store can all
//! keep the same promises. Watches are the one place where Consul, which keeps
//! no history, promises less: see [`WatchFidelity`]. Everything richer
//! (create-if-absent, compare-and-swap) is a provided method built on `txn`.
//! The conformance suite (feature `conformance`) proves each backend keeps
//! those promises.

mod consul;
mod counting;
mod engine;
mod error;
mod etcd;
mod memory;
mod redb_store;
mod timeout;
mod tls;
mod types;
mod validate;

#[cfg(feature = "conformance")]
pub mod conformance;

pub use consul::{ConsulConfig, ConsulStore};
pub use counting::CountingStore;
pub use error::{Result, StoreError};
pub use etcd::{EtcdConfig, EtcdStore};
pub use memory::MemoryStore;
pub use redb_store::RedbStore;
pub use timeout::TimeoutStore;
pub use tls::TlsFiles;
pub use types::{
    Compare, EventKind, KeyValue, LeaseId, Op, OpResult, RangeResponse, Revision, Txn, TxnResponse,
    WatchEvent, WatchFidelity, WatchStream,
};

use async_trait::async_trait;
use std::sync::Arc;
use std::time::Duration;

/// A key-value store with revisions, transactions, watches and leases.
///
/// Revisions are store-wide and strictly increasing: every successful write
/// (a put, a delete that removed something, or a transaction that changed
/// anything) gets a new revision, and every key remembers the revision that
/// created it and the one that last modified it. A `mod_revision` of 0 in a
/// [`Compare`] means "the key is absent".
#[async_trait]
pub trait KvStore: Send + Sync + 'static {
    /// A short name for logs and errors ("memory", "file", "etcd", "consul").
    fn backend_name(&self) -> &'static str;

    /// One key, read with linearizable consistency.
    async fn get(&self, key: &str) -> Result<Option<KeyValue>>;

    /// Every key that starts with `prefix`, sorted by key, and the revision
    /// the read was taken at: the read holds every change under `prefix` up
    /// to it and none after (the revision to start a watch from, plus one).
    /// That is the store revision, except for [`WatchFidelity::LatestState`]
    /// backends, which report the latest change under the prefix.
    async fn range(&self, prefix: &str) -> Result<RangeResponse>;

    /// Apply `success` ops if every compare holds, else `failure` ops, all or
    /// nothing, all at one revision. Ops run in order (a get sees the earlier
    /// writes of its branch). A branch may write each key at most once: two
    /// puts of a key, or a put and a delete (or deleted prefix) covering it,
    /// are [`StoreError::Invalid`], as etcd refuses them. Remote backends cap
    /// [`Txn::len`] (etcd at 128) and refuse bigger txns as invalid.
    async fn txn(&self, txn: Txn) -> Result<TxnResponse>;

    /// Every change under `prefix` with revision >= `start_revision`, in
    /// revision order, without gaps. `start_revision` 0 means "from now".
    /// When `start_revision` is older than the history the backend keeps,
    /// the call (or the stream's first item) is [`StoreError::Compacted`]
    /// and the caller must resync with `range`. Backends with
    /// [`WatchFidelity::LatestState`] deliver each changed key's latest state
    /// instead of every change; a consumer that keeps a map of key to value
    /// works the same on both.
    async fn watch(&self, prefix: &str, start_revision: Revision) -> Result<WatchStream>;

    /// What [`KvStore::watch`] promises on this backend. Decorators forward
    /// it.
    fn watch_fidelity(&self) -> WatchFidelity {
        WatchFidelity::EveryChange
    }

    /// A lease that expires `ttl` after its last renewal. Keys put with it are
    /// deleted when it expires or is revoked.
    async fn grant_lease(&self, ttl: Duration) -> Result<LeaseId>;

    /// Renew a lease once. [`StoreError::LeaseNotFound`] when it has expired.
    ///
    /// Answers the store's revision when the renewal's answer carries it
    /// (etcd's response header; the embedded stores): a caller that renews
    /// anyway learns, without a read, whether anything was written since a
    /// revision it saw. It is the answering member's: on an etcd cluster a
    /// lagging member may report an older one, never a newer one. `None`
    /// where the backend does not say (Consul, and etcd's first renewal on a
    /// new stream).
    async fn keep_alive(&self, lease: LeaseId) -> Result<Option<Revision>>;

    /// End a lease now and delete its keys. Revoking an unknown lease is not an
    /// error.
    async fn revoke_lease(&self, lease: LeaseId) -> Result<()>;

    /// Put unconditionally; returns the revision of the write.
    async fn put(&self, key: &str, value: Vec<u8>) -> Result<Revision> {
        let resp = self
            .txn(Txn::new().and_then(vec![Op::put(key, value)]))
            .await?;
        Ok(resp.revision)
    }

    /// Delete one key; true when it existed.
    async fn delete(&self, key: &str) -> Result<bool> {
        let resp = self.txn(Txn::new().and_then(vec![Op::delete(key)])).await?;
        Ok(matches!(resp.results.first(), Some(OpResult::Delete { deleted }) if *deleted > 0))
    }

    /// Create `key` only if it does not exist. `Ok(None)` when it was created,
    /// `Ok(Some(current))` when it already existed.
    async fn create_if_absent(&self, key: &str, value: Vec<u8>) -> Result<Option<KeyValue>> {
        let resp = self
            .txn(
                Txn::new()
                    .when(vec![Compare::absent(key)])
                    .and_then(vec![Op::put(key, value)])
                    .or_else(vec![Op::get(key)]),
            )
            .await?;
        if resp.succeeded {
            return Ok(None);
        }
        match resp.results.into_iter().next() {
            Some(OpResult::Get(Some(kv))) => Ok(Some(kv)),
            // Deleted between the compare and the read: report it as a lost
            // race with an absent key so the caller retries.
            _ => Err(StoreError::Conflict(format!(
                "key {key} changed during create"
            ))),
        }
    }

    /// Replace `key` only if its modification revision is still
    /// `expected_mod_revision` (0: only if absent). `Ok(Ok(rev))` with the new
    /// revision on success, `Ok(Err(current))` with the current value (None if
    /// absent) when someone else changed it first.
    async fn compare_and_swap(
        &self,
        key: &str,
        expected_mod_revision: Revision,
        value: Vec<u8>,
    ) -> Result<std::result::Result<Revision, Option<KeyValue>>> {
        let resp = self
            .txn(
                Txn::new()
                    .when(vec![Compare::mod_revision(key, expected_mod_revision)])
                    .and_then(vec![Op::put(key, value)])
                    .or_else(vec![Op::get(key)]),
            )
            .await?;
        if resp.succeeded {
            return Ok(Ok(resp.revision));
        }
        match resp.results.into_iter().next() {
            Some(OpResult::Get(current)) => Ok(Err(current)),
            _ => Ok(Err(None)),
        }
    }
}

/// A shared store is a store, so decorators such as [`TimeoutStore`] can wrap
/// an `Arc<dyn KvStore>`. Every method, provided ones included, is forwarded
/// so the inner backend's own versions are used.
#[async_trait]
impl<S: KvStore + ?Sized> KvStore for Arc<S> {
    fn backend_name(&self) -> &'static str {
        (**self).backend_name()
    }

    async fn get(&self, key: &str) -> Result<Option<KeyValue>> {
        (**self).get(key).await
    }

    async fn range(&self, prefix: &str) -> Result<RangeResponse> {
        (**self).range(prefix).await
    }

    async fn txn(&self, txn: Txn) -> Result<TxnResponse> {
        (**self).txn(txn).await
    }

    async fn watch(&self, prefix: &str, start_revision: Revision) -> Result<WatchStream> {
        (**self).watch(prefix, start_revision).await
    }

    fn watch_fidelity(&self) -> WatchFidelity {
        (**self).watch_fidelity()
    }

    async fn grant_lease(&self, ttl: Duration) -> Result<LeaseId> {
        (**self).grant_lease(ttl).await
    }

    async fn keep_alive(&self, lease: LeaseId) -> Result<Option<Revision>> {
        (**self).keep_alive(lease).await
    }

    async fn revoke_lease(&self, lease: LeaseId) -> Result<()> {
        (**self).revoke_lease(lease).await
    }

    async fn put(&self, key: &str, value: Vec<u8>) -> Result<Revision> {
        (**self).put(key, value).await
    }

    async fn delete(&self, key: &str) -> Result<bool> {
        (**self).delete(key).await
    }

    async fn create_if_absent(&self, key: &str, value: Vec<u8>) -> Result<Option<KeyValue>> {
        (**self).create_if_absent(key, value).await
    }

    async fn compare_and_swap(
        &self,
        key: &str,
        expected_mod_revision: Revision,
        value: Vec<u8>,
    ) -> Result<std::result::Result<Revision, Option<KeyValue>>> {
        (**self)
            .compare_and_swap(key, expected_mod_revision, value)
            .await
    }
}
