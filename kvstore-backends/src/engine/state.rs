//! The engine's data and the pure half of a write: the keys, leases and
//! event history behind the state lock; a write planned against them as a
//! [`Batch`] without changing anything (so that it can be made durable
//! first); and a batch applied to them and published to the live watches.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::ops::Bound;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::broadcast;

use crate::{
    Compare, EventKind, KeyValue, LeaseId, Op, OpResult, Result, Revision, StoreError, Txn,
    WatchEvent,
};

/// Write batches a live watcher may fall behind before its stream is ended.
const WATCH_BUFFER: usize = 4096;
/// Longest lease accepted; also keeps `Instant + ttl` from overflowing.
pub(super) const MAX_TTL: Duration = Duration::from_secs(365 * 24 * 3600);

/// Everything one write changes, in the form the persistence layer needs.
#[derive(Debug, Default)]
pub(crate) struct Batch {
    /// The store revision after the write (unchanged when no key changed).
    pub revision: Revision,
    /// The final state of every key the write touched: `None` = deleted.
    pub keys: BTreeMap<String, Option<KeyValue>>,
    /// A lease created by the write, with its TTL.
    pub granted: Option<(String, Duration)>,
    /// Leases ended by the write (their keys are in `keys` as deletions).
    pub revoked: Vec<String>,
    /// The lease id counter after the write.
    pub next_lease_id: u64,
    /// What watchers see, in the order the changes were made.
    pub events: Vec<WatchEvent>,
}

impl Batch {
    pub(super) fn is_noop(&self) -> bool {
        self.keys.is_empty() && self.granted.is_none() && self.revoked.is_empty()
    }
}

/// What a backend loaded from disk (or nothing, for a fresh store).
#[derive(Debug, Default)]
pub(crate) struct Snapshot {
    pub kvs: Vec<KeyValue>,
    pub revision: Revision,
    pub leases: Vec<(String, Duration)>,
    pub next_lease_id: u64,
}

#[derive(Debug)]
pub(super) struct Lease {
    pub(super) ttl: Duration,
    pub(super) deadline: Instant,
    keys: BTreeSet<String>,
}

pub(super) struct State {
    pub(super) kvs: BTreeMap<String, KeyValue>,
    pub(super) revision: Revision,
    pub(super) leases: HashMap<String, Lease>,
    pub(super) next_lease_id: u64,
    pub(super) history: VecDeque<WatchEvent>,
    history_limit: usize,
    /// Smallest start revision the history can still replay completely.
    pub(super) replayable_from: Revision,
    pub(super) events: broadcast::Sender<Arc<[WatchEvent]>>,
}

impl State {
    /// The state of a store opened on `snapshot`.
    pub(super) fn new(snapshot: Snapshot, history_limit: usize) -> Self {
        let now = Instant::now();
        // Surviving leases get a full TTL again, as etcd does after a restart.
        let mut leases: HashMap<String, Lease> = snapshot
            .leases
            .into_iter()
            .map(|(id, ttl)| {
                let lease = Lease {
                    ttl,
                    deadline: now + ttl.min(MAX_TTL),
                    keys: BTreeSet::new(),
                };
                (id, lease)
            })
            .collect();
        let mut kvs = BTreeMap::new();
        for kv in snapshot.kvs {
            if let Some(lease) = &kv.lease {
                let entry = leases.entry(lease.0.clone()).or_insert_with(|| {
                    // Cannot happen with our own writes (a key and its lease
                    // are committed together); if it does, the key outlived its
                    // lease, so let the reaper delete it right away.
                    tracing::warn!(key = %kv.key, lease = %lease, "key bound to a missing lease; deleting it");
                    Lease {
                        ttl: Duration::ZERO,
                        deadline: now,
                        keys: BTreeSet::new(),
                    }
                });
                entry.keys.insert(kv.key.clone());
            }
            kvs.insert(kv.key.clone(), kv);
        }
        let (events, _) = broadcast::channel(WATCH_BUFFER);
        State {
            kvs,
            revision: snapshot.revision,
            leases,
            next_lease_id: snapshot.next_lease_id.max(1),
            history: VecDeque::new(),
            history_limit: history_limit.max(1),
            // History is not persisted: a reopened store can only replay
            // what happened after the open.
            replayable_from: snapshot.revision + 1,
            events,
        }
    }

    pub(super) fn apply(&mut self, batch: Batch) {
        let Batch {
            revision,
            keys,
            granted,
            revoked,
            next_lease_id,
            events,
        } = batch;
        for (key, change) in keys {
            let old = match change {
                Some(kv) => {
                    if let Some(lease) = kv.lease.as_ref().and_then(|l| self.leases.get_mut(&l.0)) {
                        lease.keys.insert(key.clone());
                    }
                    self.kvs.insert(key.clone(), kv)
                }
                None => self.kvs.remove(&key),
            };
            // Detach from the former lease unless the key stays on it.
            let new_lease = self.kvs.get(&key).and_then(|kv| kv.lease.as_ref());
            if let Some(old_lease) = old.and_then(|kv| kv.lease) {
                if new_lease != Some(&old_lease) {
                    if let Some(l) = self.leases.get_mut(&old_lease.0) {
                        l.keys.remove(&key);
                    }
                }
            }
        }
        for id in revoked {
            self.leases.remove(&id);
        }
        if let Some((id, ttl)) = granted {
            let lease = Lease {
                ttl,
                deadline: Instant::now() + ttl,
                keys: BTreeSet::new(),
            };
            self.leases.insert(id, lease);
        }
        self.next_lease_id = next_lease_id;
        self.revision = revision;
        if events.is_empty() {
            return;
        }
        self.history.extend(events.iter().cloned());
        while self.history.len() > self.history_limit {
            if let Some(dropped) = self.history.pop_front() {
                self.replayable_from = self.replayable_from.max(dropped.revision() + 1);
            }
        }
        // No receivers is fine: nobody is watching.
        let _ = self.events.send(events.into());
    }

    fn current<'a>(
        &'a self,
        overlay: &'a BTreeMap<String, Option<KeyValue>>,
        key: &str,
    ) -> Option<&'a KeyValue> {
        match overlay.get(key) {
            Some(change) => change.as_ref(),
            None => self.kvs.get(key),
        }
    }

    fn check_lease(&self, lease: &LeaseId, now: Instant) -> Result<()> {
        match self.leases.get(&lease.0) {
            Some(l) if l.deadline > now => Ok(()),
            _ => Err(StoreError::LeaseNotFound(lease.0.clone())),
        }
    }
}

/// Works out what `txn` changes without changing anything. Ops run in order,
/// so a Get sees the earlier ops of the same branch.
pub(super) fn plan_txn(
    st: &State,
    txn: &Txn,
    now: Instant,
) -> Result<(Batch, bool, Vec<OpResult>)> {
    let succeeded = txn.compares.iter().all(|c| match c {
        Compare::ModRevision { key, mod_revision } => {
            st.kvs.get(key).map_or(0, |kv| kv.mod_revision) == *mod_revision
        }
    });
    let ops = if succeeded {
        &txn.success
    } else {
        &txn.failure
    };
    // Checked up front so a bad lease rejects the whole branch.
    for op in ops {
        if let Op::Put {
            lease: Some(lease), ..
        } = op
        {
            st.check_lease(lease, now)?;
        }
    }
    let rev = st.revision + 1;
    let mut overlay: BTreeMap<String, Option<KeyValue>> = BTreeMap::new();
    let mut events = Vec::new();
    let mut results = Vec::with_capacity(ops.len());
    for op in ops {
        match op {
            Op::Put { key, value, lease } => {
                let create_revision = st
                    .current(&overlay, key)
                    .map_or(rev, |kv| kv.create_revision);
                let kv = KeyValue {
                    key: key.clone(),
                    value: value.clone(),
                    create_revision,
                    mod_revision: rev,
                    lease: lease.clone(),
                };
                events.push(WatchEvent {
                    kind: EventKind::Put,
                    kv: kv.clone(),
                });
                overlay.insert(key.clone(), Some(kv));
                results.push(OpResult::Put);
            }
            Op::Delete { key } => {
                let deleted = delete_in(st, &mut overlay, &mut events, key, rev);
                results.push(OpResult::Delete {
                    deleted: u64::from(deleted),
                });
            }
            Op::DeletePrefix { prefix } => {
                let candidates: BTreeSet<String> = prefixed(&st.kvs, prefix)
                    .map(|(k, _)| k.clone())
                    .chain(prefixed(&overlay, prefix).map(|(k, _)| k.clone()))
                    .collect();
                let mut deleted = 0;
                for key in &candidates {
                    if delete_in(st, &mut overlay, &mut events, key, rev) {
                        deleted += 1;
                    }
                }
                results.push(OpResult::Delete { deleted });
            }
            Op::Get { key } => results.push(OpResult::Get(st.current(&overlay, key).cloned())),
        }
    }
    let batch = Batch {
        revision: if events.is_empty() { st.revision } else { rev },
        keys: overlay,
        next_lease_id: st.next_lease_id,
        events,
        ..Batch::default()
    };
    Ok((batch, succeeded, results))
}

fn delete_in(
    st: &State,
    overlay: &mut BTreeMap<String, Option<KeyValue>>,
    events: &mut Vec<WatchEvent>,
    key: &str,
    rev: Revision,
) -> bool {
    if st.current(overlay, key).is_none() {
        return false;
    }
    overlay.insert(key.to_owned(), None);
    events.push(delete_event(key, rev));
    true
}

/// Ends the given leases and deletes their keys, all at one revision.
pub(super) fn plan_lease_end<'a>(st: &State, ids: impl IntoIterator<Item = &'a str>) -> Batch {
    let rev = st.revision + 1;
    let mut batch = Batch {
        revision: st.revision,
        next_lease_id: st.next_lease_id,
        ..Batch::default()
    };
    for id in ids {
        if let Some(lease) = st.leases.get(id) {
            for key in &lease.keys {
                if st.kvs.contains_key(key) && !batch.keys.contains_key(key) {
                    batch.keys.insert(key.clone(), None);
                    batch.events.push(delete_event(key, rev));
                }
            }
        }
        batch.revoked.push(id.to_owned());
    }
    if !batch.events.is_empty() {
        batch.revision = rev;
    }
    batch
}

fn delete_event(key: &str, rev: Revision) -> WatchEvent {
    WatchEvent {
        kind: EventKind::Delete,
        kv: KeyValue {
            key: key.to_owned(),
            value: Vec::new(),
            create_revision: 0,
            mod_revision: rev,
            lease: None,
        },
    }
}

/// The entries of a sorted map whose keys start with `prefix`.
pub(super) fn prefixed<'a, V>(
    map: &'a BTreeMap<String, V>,
    prefix: &'a str,
) -> impl Iterator<Item = (&'a String, &'a V)> + 'a {
    map.range::<str, _>((Bound::Included(prefix), Bound::Unbounded))
        .take_while(move |(k, _)| k.starts_with(prefix))
}
