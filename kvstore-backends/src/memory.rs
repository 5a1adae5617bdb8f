//! The in-process store: for tests and single-process setups. Nothing
//! survives the process.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;

use crate::engine::{Core, Reaper, Snapshot, DEFAULT_HISTORY_LIMIT};
use crate::{
    KeyValue, KvStore, LeaseId, RangeResponse, Result, Revision, Txn, TxnResponse, WatchStream,
};

/// An in-memory [`KvStore`] with etcd-like revisions, watches and leases.
///
/// Leases expire on a background thread, so keys disappear on time even when
/// nobody calls the store; the thread stops when the store is dropped.
pub struct MemoryStore {
    // Dropped first: stops the reaper before the core goes away.
    _reaper: Reaper,
    core: Arc<Core>,
}

impl MemoryStore {
    pub fn new() -> Self {
        Self::with_history_limit(DEFAULT_HISTORY_LIMIT)
    }

    /// A store that keeps only the last `events` changes for watches that
    /// start in the past (older starts get [`crate::StoreError::Compacted`]).
    pub fn with_history_limit(events: usize) -> Self {
        let core = Arc::new(Core::new(Snapshot::default(), None, events));
        MemoryStore {
            _reaper: core.start_reaper("memory-store"),
            core,
        }
    }
}

impl Default for MemoryStore {
    fn default() -> Self {
        Self::new()
    }
}

impl std::fmt::Debug for MemoryStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemoryStore").finish_non_exhaustive()
    }
}

// Every call only takes in-memory locks for a short time, so it runs inline.
#[async_trait]
impl KvStore for MemoryStore {
    fn backend_name(&self) -> &'static str {
        "memory"
    }

    async fn get(&self, key: &str) -> Result<Option<KeyValue>> {
        self.core.get(key)
    }

    async fn range(&self, prefix: &str) -> Result<RangeResponse> {
        self.core.range(prefix)
    }

    async fn txn(&self, txn: Txn) -> Result<TxnResponse> {
        self.core.txn(&txn)
    }

    async fn watch(&self, prefix: &str, start_revision: Revision) -> Result<WatchStream> {
        self.core.watch(prefix, start_revision)
    }

    async fn grant_lease(&self, ttl: Duration) -> Result<LeaseId> {
        self.core.grant_lease(ttl)
    }

    async fn keep_alive(&self, lease: LeaseId) -> Result<Option<Revision>> {
        self.core.keep_alive(&lease).map(Some)
    }

    async fn revoke_lease(&self, lease: LeaseId) -> Result<()> {
        self.core.revoke_lease(&lease)
    }
}
