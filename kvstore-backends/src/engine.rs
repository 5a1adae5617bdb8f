//! The engine shared by the in-process and the file backends: keys with
//! revisions, leases, a bounded event history and live watch fan-out.
//!
//! Writes are planned against the current state without changing it, handed to
//! an optional [`Persist`] layer (the file backend commits them to disk there),
//! and only then applied and published. A dedicated writer lock serializes that
//! sequence, so the state cannot change between planning and applying, while
//! readers only ever take the state lock and never wait for a disk commit.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::ops::Bound;
use std::sync::{mpsc, Arc, Mutex, MutexGuard, Weak};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use futures::StreamExt;
use tokio::sync::broadcast;

use crate::{
    Compare, EventKind, KeyValue, LeaseId, Op, OpResult, RangeResponse, Result, Revision,
    StoreError, Txn, TxnResponse, WatchEvent, WatchStream,
};

/// Events kept for watches that start in the past.
pub(crate) const DEFAULT_HISTORY_LIMIT: usize = 10_000;
/// Write batches a live watcher may fall behind before its stream is ended.
const WATCH_BUFFER: usize = 4096;
/// Longest lease accepted; also keeps `Instant + ttl` from overflowing.
pub(crate) const MAX_TTL: Duration = Duration::from_secs(365 * 24 * 3600);
/// How often expired leases are looked for; bounds how late keys disappear.
const REAP_INTERVAL: Duration = Duration::from_millis(100);

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
    fn is_noop(&self) -> bool {
        self.keys.is_empty() && self.granted.is_none() && self.revoked.is_empty()
    }
}

/// Makes a write durable before it is applied in memory. An error aborts the
/// write and leaves the store unchanged.
pub(crate) trait Persist: Send + Sync + 'static {
    fn persist(&self, batch: &Batch) -> Result<()>;
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
struct Lease {
    ttl: Duration,
    deadline: Instant,
    keys: BTreeSet<String>,
}

struct State {
    kvs: BTreeMap<String, KeyValue>,
    revision: Revision,
    leases: HashMap<String, Lease>,
    next_lease_id: u64,
    history: VecDeque<WatchEvent>,
    history_limit: usize,
    /// Smallest start revision the history can still replay completely.
    replayable_from: Revision,
    events: broadcast::Sender<Arc<[WatchEvent]>>,
}

pub(crate) struct Core {
    /// Serializes plan -> persist -> apply. Always taken before `state`.
    writer: Mutex<()>,
    state: Mutex<State>,
    persist: Option<Box<dyn Persist>>,
}

impl Core {
    pub(crate) fn new(
        snapshot: Snapshot,
        persist: Option<Box<dyn Persist>>,
        history_limit: usize,
    ) -> Self {
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
        Core {
            writer: Mutex::new(()),
            state: Mutex::new(State {
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
            }),
            persist,
        }
    }

    fn state(&self) -> Result<MutexGuard<'_, State>> {
        self.state.lock().map_err(|_| poisoned())
    }

    fn writer(&self) -> Result<MutexGuard<'_, ()>> {
        self.writer.lock().map_err(|_| poisoned())
    }

    pub(crate) fn get(&self, key: &str) -> Result<Option<KeyValue>> {
        check_key(key)?;
        Ok(self.state()?.kvs.get(key).cloned())
    }

    pub(crate) fn range(&self, prefix: &str) -> Result<RangeResponse> {
        let st = self.state()?;
        let kvs = prefixed(&st.kvs, prefix)
            .map(|(_, kv)| kv.clone())
            .collect();
        Ok(RangeResponse {
            kvs,
            revision: st.revision,
        })
    }

    pub(crate) fn txn(&self, txn: &Txn) -> Result<TxnResponse> {
        validate_txn(txn)?;
        let _w = self.writer()?;
        // Expire due leases first so the txn cannot see (or attach to) keys
        // that are already dead, even if the reaper thread is late.
        self.reap_locked(Instant::now())?;
        let (batch, succeeded, results) = plan_txn(&*self.state()?, txn, Instant::now())?;
        let revision = batch.revision;
        self.commit_locked(batch)?;
        Ok(TxnResponse {
            succeeded,
            revision,
            results,
        })
    }

    pub(crate) fn watch(&self, prefix: &str, start_revision: Revision) -> Result<WatchStream> {
        if start_revision < 0 {
            return Err(StoreError::Invalid(format!(
                "watch start revision {start_revision} is negative"
            )));
        }
        // Reading the history and subscribing under the same lock that
        // publishing holds: every event is either replayed or delivered live,
        // never both, never neither.
        let st = self.state()?;
        if start_revision > 0 && start_revision < st.replayable_from {
            return Err(StoreError::Compacted {
                requested: start_revision,
                oldest: st.replayable_from,
            });
        }
        let backlog: VecDeque<WatchEvent> = if start_revision > 0 {
            let from = st
                .history
                .partition_point(|e| e.revision() < start_revision);
            st.history
                .range(from..)
                .filter(|e| e.kv.key.starts_with(prefix))
                .cloned()
                .collect()
        } else {
            VecDeque::new()
        };
        let rx = st.events.subscribe();
        drop(st);
        Ok(watch_stream(prefix.to_owned(), start_revision, backlog, rx))
    }

    pub(crate) fn grant_lease(&self, ttl: Duration) -> Result<LeaseId> {
        if ttl.is_zero() || ttl > MAX_TTL {
            return Err(StoreError::Invalid(format!(
                "lease TTL {ttl:?} is outside (0, {MAX_TTL:?}]"
            )));
        }
        let _w = self.writer()?;
        let (id, batch) = {
            let st = self.state()?;
            let id = format!("{:x}", st.next_lease_id);
            let batch = Batch {
                revision: st.revision,
                granted: Some((id.clone(), ttl)),
                next_lease_id: st.next_lease_id + 1,
                ..Batch::default()
            };
            (id, batch)
        };
        self.commit_locked(batch)?;
        Ok(LeaseId(id))
    }

    pub(crate) fn keep_alive(&self, lease: &LeaseId) -> Result<()> {
        // Renewal is not persisted: after a restart every lease gets a full
        // TTL anyway. A lease past its deadline stays dead even if the reaper
        // has not removed it yet.
        let now = Instant::now();
        let mut st = self.state()?;
        match st.leases.get_mut(&lease.0) {
            Some(l) if l.deadline > now => {
                l.deadline = now + l.ttl;
                Ok(())
            }
            _ => Err(StoreError::LeaseNotFound(lease.0.clone())),
        }
    }

    pub(crate) fn revoke_lease(&self, lease: &LeaseId) -> Result<()> {
        let _w = self.writer()?;
        let batch = {
            let st = self.state()?;
            if !st.leases.contains_key(&lease.0) {
                return Ok(());
            }
            plan_lease_end(&st, [lease.0.as_str()])
        };
        self.commit_locked(batch)
    }

    /// Deletes the keys of every lease past its deadline.
    pub(crate) fn reap_expired(&self) -> Result<()> {
        let _w = self.writer()?;
        self.reap_locked(Instant::now())
    }

    fn reap_locked(&self, now: Instant) -> Result<()> {
        let batch = {
            let st = self.state()?;
            let mut expired: Vec<&str> = st
                .leases
                .iter()
                .filter(|(_, l)| l.deadline <= now)
                .map(|(id, _)| id.as_str())
                .collect();
            if expired.is_empty() {
                return Ok(());
            }
            // A stable order makes the delete events deterministic.
            expired.sort_unstable();
            plan_lease_end(&st, expired)
        };
        self.commit_locked(batch)
    }

    /// Persist, then apply and publish. The caller holds the writer lock.
    fn commit_locked(&self, batch: Batch) -> Result<()> {
        if batch.is_noop() {
            return Ok(());
        }
        if let Some(persist) = &self.persist {
            persist.persist(&batch)?;
        }
        self.state()?.apply(batch);
        Ok(())
    }

    /// Starts the thread that expires leases even when nobody calls the
    /// store. It holds only a weak reference, and the returned handle stops
    /// and joins it on drop.
    pub(crate) fn start_reaper(self: &Arc<Self>, name: &str) -> Reaper {
        let weak: Weak<Core> = Arc::downgrade(self);
        let (stop, stopped) = mpsc::channel::<()>();
        let spawned = std::thread::Builder::new()
            .name(format!("{name}-lease-reaper"))
            .spawn(move || loop {
                match stopped.recv_timeout(REAP_INTERVAL) {
                    Err(mpsc::RecvTimeoutError::Timeout) => {
                        let Some(core) = weak.upgrade() else { return };
                        if let Err(e) = core.reap_expired() {
                            tracing::warn!(error = %e, "expiring leases failed; retrying");
                        }
                    }
                    // The store is being dropped.
                    _ => return,
                }
            });
        match spawned {
            Ok(thread) => Reaper {
                stop: Some(stop),
                thread: Some(thread),
            },
            Err(e) => {
                // Writes still expire due leases first, so leases keep working,
                // only later than their TTL when the store is idle.
                tracing::error!(error = %e, "cannot start the lease reaper thread");
                Reaper {
                    stop: None,
                    thread: None,
                }
            }
        }
    }
}

/// Stops the lease reaper thread when dropped, and waits for it so that the
/// store (and its file lock) is really released once the store is dropped.
pub(crate) struct Reaper {
    stop: Option<mpsc::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl Drop for Reaper {
    fn drop(&mut self) {
        drop(self.stop.take());
        if let Some(thread) = self.thread.take() {
            // A panic in the reaper was already reported by the thread.
            let _ = thread.join();
        }
    }
}

impl State {
    fn apply(&mut self, batch: Batch) {
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
fn plan_txn(st: &State, txn: &Txn, now: Instant) -> Result<(Batch, bool, Vec<OpResult>)> {
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
fn plan_lease_end<'a>(st: &State, ids: impl IntoIterator<Item = &'a str>) -> Batch {
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
fn prefixed<'a, V>(
    map: &'a BTreeMap<String, V>,
    prefix: &'a str,
) -> impl Iterator<Item = (&'a String, &'a V)> + 'a {
    map.range::<str, _>((Bound::Included(prefix), Bound::Unbounded))
        .take_while(move |(k, _)| k.starts_with(prefix))
}

pub(crate) fn check_key(key: &str) -> Result<()> {
    if key.is_empty() {
        return Err(StoreError::Invalid("empty key".into()));
    }
    Ok(())
}

/// The checks every backend makes before running a txn (shared so that they
/// all reject the same requests).
pub(crate) fn validate_txn(txn: &Txn) -> Result<()> {
    for c in &txn.compares {
        match c {
            Compare::ModRevision { key, .. } => check_key(key)?,
        }
    }
    for op in txn.success.iter().chain(&txn.failure) {
        match op {
            Op::Put { key, .. } | Op::Delete { key } | Op::Get { key } => check_key(key)?,
            // An empty prefix would wipe the whole store; nobody means that.
            Op::DeletePrefix { prefix } if prefix.is_empty() => {
                return Err(StoreError::Invalid(
                    "delete with an empty prefix (would delete every key)".into(),
                ))
            }
            Op::DeletePrefix { .. } => {}
        }
    }
    check_single_writes(&txn.success)?;
    check_single_writes(&txn.failure)
}

/// etcd refuses a branch that writes one key twice (two puts, or a put and a
/// delete or deleted prefix covering it, in any order). Every backend refuses
/// it too, so that code tested on one backend does not fail on etcd.
/// Overlapping deletes are fine, as in etcd.
fn check_single_writes(ops: &[Op]) -> Result<()> {
    let mut puts = BTreeSet::new();
    for op in ops {
        if let Op::Put { key, .. } = op {
            if !puts.insert(key.as_str()) {
                return Err(StoreError::Invalid(format!(
                    "txn puts key {key:?} twice in one branch (etcd refuses that)"
                )));
            }
        }
    }
    for op in ops {
        let covered = |key: &str| match op {
            Op::Delete { key: deleted } => key == deleted,
            Op::DeletePrefix { prefix } => key.starts_with(prefix.as_str()),
            Op::Put { .. } | Op::Get { .. } => false,
        };
        if let Some(key) = puts.iter().find(|key| covered(key)) {
            return Err(StoreError::Invalid(format!(
                "txn both puts and deletes key {key:?} in one branch (etcd refuses that)"
            )));
        }
    }
    Ok(())
}

fn poisoned() -> StoreError {
    StoreError::Unavailable("store state is unusable after a panic in another task".into())
}

struct Watcher {
    prefix: String,
    start: Revision,
    backlog: VecDeque<WatchEvent>,
    rx: broadcast::Receiver<Arc<[WatchEvent]>>,
    last: Revision,
    done: bool,
}

fn watch_stream(
    prefix: String,
    start: Revision,
    backlog: VecDeque<WatchEvent>,
    rx: broadcast::Receiver<Arc<[WatchEvent]>>,
) -> WatchStream {
    let watcher = Watcher {
        prefix,
        start,
        backlog,
        rx,
        last: start.saturating_sub(1),
        done: false,
    };
    futures::stream::unfold(watcher, |mut w| async move {
        loop {
            if let Some(ev) = w.backlog.pop_front() {
                w.last = ev.revision();
                return Some((Ok(ev), w));
            }
            if w.done {
                return None;
            }
            match w.rx.recv().await {
                Ok(batch) => {
                    let (start, prefix) = (w.start, &w.prefix);
                    w.backlog.extend(
                        batch
                            .iter()
                            .filter(|e| e.revision() >= start && e.kv.key.starts_with(prefix))
                            .cloned(),
                    );
                }
                // Skipping would hand the caller a silent gap; end the stream
                // so it re-watches from the last revision it saw (+1).
                Err(broadcast::error::RecvError::Lagged(n)) => {
                    w.done = true;
                    let err = StoreError::Unavailable(format!(
                        "watch on {:?} fell {n} writes behind after revision {}; watch again from the next revision",
                        w.prefix, w.last
                    ));
                    return Some((Err(err), w));
                }
                Err(broadcast::error::RecvError::Closed) => {
                    w.done = true;
                    let err = StoreError::Unavailable("store closed".into());
                    return Some((Err(err), w));
                }
            }
        }
    })
    .boxed()
}
