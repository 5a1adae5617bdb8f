//! Backend-neutral request and response types.

use crate::StoreError;
use futures::stream::BoxStream;

/// A store-wide, strictly increasing version number.
pub type Revision = i64;

/// The identity of a lease (etcd lease ID, Consul session, or the embedded
/// store's own).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct LeaseId(pub String);

impl std::fmt::Display for LeaseId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// A key with its value and versions.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KeyValue {
    pub key: String,
    pub value: Vec<u8>,
    /// Revision of the write that created the key (since its last deletion).
    pub create_revision: Revision,
    /// Revision of the last write to the key.
    pub mod_revision: Revision,
    /// The lease the key is bound to, if any.
    pub lease: Option<LeaseId>,
}

/// A condition of a transaction.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Compare {
    /// The key's modification revision equals the given one; 0 means absent.
    ModRevision { key: String, mod_revision: Revision },
}

impl Compare {
    pub fn mod_revision(key: impl Into<String>, mod_revision: Revision) -> Self {
        Compare::ModRevision {
            key: key.into(),
            mod_revision,
        }
    }

    pub fn absent(key: impl Into<String>) -> Self {
        Self::mod_revision(key, 0)
    }
}

/// One operation of a transaction.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Op {
    Put {
        key: String,
        value: Vec<u8>,
        lease: Option<LeaseId>,
    },
    Delete {
        key: String,
    },
    /// Delete every key that starts with the prefix.
    DeletePrefix {
        prefix: String,
    },
    Get {
        key: String,
    },
}

impl Op {
    pub fn put(key: impl Into<String>, value: impl Into<Vec<u8>>) -> Self {
        Op::Put {
            key: key.into(),
            value: value.into(),
            lease: None,
        }
    }

    pub fn put_with_lease(
        key: impl Into<String>,
        value: impl Into<Vec<u8>>,
        lease: LeaseId,
    ) -> Self {
        Op::Put {
            key: key.into(),
            value: value.into(),
            lease: Some(lease),
        }
    }

    pub fn delete(key: impl Into<String>) -> Self {
        Op::Delete { key: key.into() }
    }

    pub fn delete_prefix(prefix: impl Into<String>) -> Self {
        Op::DeletePrefix {
            prefix: prefix.into(),
        }
    }

    pub fn get(key: impl Into<String>) -> Self {
        Op::Get { key: key.into() }
    }
}

/// The result of one [`Op`], in the order the ops were given.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum OpResult {
    Put,
    Delete { deleted: u64 },
    Get(Option<KeyValue>),
}

/// Compares, then the ops to apply when all hold and those to apply otherwise.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Txn {
    pub compares: Vec<Compare>,
    pub success: Vec<Op>,
    pub failure: Vec<Op>,
}

impl Txn {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn when(mut self, compares: Vec<Compare>) -> Self {
        self.compares = compares;
        self
    }

    pub fn and_then(mut self, ops: Vec<Op>) -> Self {
        self.success = ops;
        self
    }

    pub fn or_else(mut self, ops: Vec<Op>) -> Self {
        self.failure = ops;
        self
    }

    /// Number of operations (compares included), for backends with a limit
    /// per transaction (etcd 128, Consul 64).
    pub fn len(&self) -> usize {
        self.compares.len() + self.success.len().max(self.failure.len())
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TxnResponse {
    pub succeeded: bool,
    /// The store revision after the transaction (unchanged if it wrote nothing).
    pub revision: Revision,
    /// One result per op of the branch that ran.
    pub results: Vec<OpResult>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RangeResponse {
    pub kvs: Vec<KeyValue>,
    /// The store revision the read saw.
    pub revision: Revision,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EventKind {
    Put,
    Delete,
}

/// One change seen by a watch.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WatchEvent {
    pub kind: EventKind,
    /// For a put, the key as written; for a delete, the key with an empty
    /// value and `mod_revision` set to the revision of the delete.
    pub kv: KeyValue,
}

impl WatchEvent {
    pub fn revision(&self) -> Revision {
        self.kv.mod_revision
    }
}

/// How faithfully a backend's watches report changes (see
/// [`KvStore::watch`](crate::KvStore::watch)).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WatchFidelity {
    /// Every change once, with its own revision, in revision order and,
    /// within one revision, in op order; a watch can start at any revision
    /// the backend still keeps. etcd, the file store and memory.
    EveryChange,
    /// The backend keeps no history and watches by comparing snapshots
    /// (Consul's blocking queries). Its watches deliver the *latest state* of
    /// each key that changed, in revision order, never twice, and converge:
    /// applied to the state at `start_revision - 1`, the events give the
    /// store's current state. But they may skip intermediate states (a key
    /// written twice between two looks shows only its last write; one
    /// created and deleted in between may not show at all), a delete carries
    /// the revision at which the backend found the key gone (at or after the
    /// delete's own), and the events of one revision come in key order.
    ///
    /// A watch can start in the past only where nothing under the prefix
    /// changed since, or exactly at a recent `range(prefix).revision + 1` of
    /// the same store; elsewhere it is [`StoreError::Compacted`] and the
    /// caller resyncs with `range`. And `range` reports the revision of the
    /// latest change under the prefix rather than the store's revision.
    LatestState,
}

/// The changes a watch sees, in revision order. An `Err` item ends the stream.
pub type WatchStream = BoxStream<'static, Result<WatchEvent, StoreError>>;
