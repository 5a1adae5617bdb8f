//! The records of the state: KV entries (Consul's `DirEntry`), sessions and
//! their behaviors, and the KV operations of a txn with their verbs.

use std::time::{Duration, Instant};

/// One KV entry (Consul's `DirEntry`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Entry {
    pub key: String,
    pub value: Vec<u8>,
    pub flags: u64,
    /// The session holding the key's lock; empty when unlocked.
    pub session: String,
    pub lock_index: u64,
    pub create_index: u64,
    pub modify_index: u64,
}

impl Entry {
    pub(super) fn new(key: &str, value: Vec<u8>, flags: u64) -> Self {
        Entry {
            key: key.to_owned(),
            value,
            flags,
            session: String::new(),
            lock_index: 0,
            create_index: 0,
            modify_index: 0,
        }
    }

    /// Consul's `DirEntry.Equal`: a set that changes none of these is not
    /// written and keeps the old ModifyIndex.
    pub(super) fn same_content(&self, o: &Entry) -> bool {
        self.lock_index == o.lock_index
            && self.key == o.key
            && self.flags == o.flags
            && self.value == o.value
            && self.session == o.session
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Behavior {
    Release,
    Delete,
}

impl Behavior {
    pub fn as_str(self) -> &'static str {
        match self {
            Behavior::Release => "release",
            Behavior::Delete => "delete",
        }
    }
}

#[derive(Clone, Debug)]
pub struct Session {
    pub id: String,
    pub name: String,
    pub behavior: Behavior,
    /// The TTL as the client wrote it ("10s"), empty for none.
    pub ttl: String,
    pub ttl_duration: Option<Duration>,
    pub lock_delay: Duration,
    pub create_index: u64,
    pub modify_index: u64,
    /// When the session expires unless renewed first.
    pub deadline: Option<Instant>,
}

/// A KV verb of `/v1/txn` (and of the plain KV endpoint, which uses the same
/// code as Consul does).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verb {
    Set,
    Cas,
    Lock,
    Unlock,
    Get,
    GetOrEmpty,
    GetTree,
    CheckIndex,
    CheckSession,
    CheckNotExists,
    Delete,
    DeleteCas,
    DeleteTree,
    /// A verb Consul does not know: the op fails (with the txn's other
    /// failures), as in Consul's state store.
    Unknown,
}

impl Verb {
    pub fn parse(s: &str) -> Verb {
        match s {
            "set" => Verb::Set,
            "cas" => Verb::Cas,
            "lock" => Verb::Lock,
            "unlock" => Verb::Unlock,
            "get" => Verb::Get,
            "get-or-empty" => Verb::GetOrEmpty,
            "get-tree" => Verb::GetTree,
            "check-index" => Verb::CheckIndex,
            "check-session" => Verb::CheckSession,
            "check-not-exists" => Verb::CheckNotExists,
            "delete" => Verb::Delete,
            "delete-cas" => Verb::DeleteCas,
            "delete-tree" => Verb::DeleteTree,
            _ => Verb::Unknown,
        }
    }

    /// Consul's `isWrite`: a txn with one of these goes through raft (an
    /// unknown verb does not make it a write).
    pub fn is_write(self) -> bool {
        matches!(
            self,
            Verb::Set
                | Verb::Cas
                | Verb::Lock
                | Verb::Unlock
                | Verb::Delete
                | Verb::DeleteCas
                | Verb::DeleteTree
        )
    }
}

#[derive(Clone, Debug)]
pub struct KvOp {
    pub verb: Verb,
    /// The verb as the client wrote it, for the error of an unknown one.
    pub verb_name: String,
    pub key: String,
    pub value: Vec<u8>,
    pub flags: u64,
    pub index: u64,
    pub session: String,
}

/// One result of a txn: the entry, its value blanked unless the verb reads.
pub type TxnResult = Entry;
