//! The engine shared by the in-process and the file backends: keys with
//! revisions, leases, a bounded event history and live watch fan-out.
//!
//! Writes are planned against the current state without changing it, handed to
//! an optional [`Persist`] layer (the file backend commits them to disk there),
//! and only then applied and published. A dedicated writer lock serializes that
//! sequence, so the state cannot change between planning and applying, while
//! readers only ever take the state lock and never wait for a disk commit.
//!
//! The parts: `state` (the data, and planning and applying a write: pure),
//! `watch` (the stream a watcher reads). This file holds the [`Core`] the
//! backends use, with its locks, the persistence hook and the lease reaper.

mod state;
mod watch;

use std::collections::VecDeque;
use std::sync::{mpsc, Arc, Mutex, MutexGuard, Weak};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use self::state::{plan_lease_end, plan_txn, prefixed, State, MAX_TTL};
use self::watch::watch_stream;
use crate::validate::{check_key, check_watch_start, validate_txn};
use crate::{
    KeyValue, LeaseId, RangeResponse, Result, Revision, StoreError, Txn, TxnResponse, WatchEvent,
    WatchStream,
};

pub(crate) use self::state::{Batch, Snapshot};

/// Events kept for watches that start in the past.
pub(crate) const DEFAULT_HISTORY_LIMIT: usize = 10_000;
/// How often expired leases are looked for; bounds how late keys disappear.
const REAP_INTERVAL: Duration = Duration::from_millis(100);

/// Makes a write durable before it is applied in memory. An error aborts the
/// write and leaves the store unchanged.
pub(crate) trait Persist: Send + Sync + 'static {
    fn persist(&self, batch: &Batch) -> Result<()>;
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
        Core {
            writer: Mutex::new(()),
            state: Mutex::new(State::new(snapshot, history_limit)),
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
        check_watch_start(start_revision)?;
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

    pub(crate) fn keep_alive(&self, lease: &LeaseId) -> Result<Revision> {
        // Renewal is not persisted: after a restart every lease gets a full
        // TTL anyway. A lease past its deadline stays dead even if the reaper
        // has not removed it yet.
        let now = Instant::now();
        let mut st = self.state()?;
        match st.leases.get_mut(&lease.0) {
            Some(l) if l.deadline > now => {
                l.deadline = now + l.ttl;
                Ok(st.revision)
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
fn poisoned() -> StoreError {
    StoreError::Unavailable("store state is unusable after a panic in another task".into())
}
