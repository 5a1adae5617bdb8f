//! Watches: blocking queries on the prefix, resumed from the last
//! `X-Consul-Index`, whose successive snapshots are compared into events.
//! Consul keeps no history, so a watch delivers each changed key's latest
//! state ([`WatchFidelity::LatestState`](crate::WatchFidelity)), starts
//! exactly where a recent range left off, and refuses other starts in the
//! past as compacted. A background task polls continuously, so a slow
//! consumer does not see states coalesced.

use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;

use super::calls::Inner;
use super::keys::consul_prefix;
use super::wire::{revision, Entry};
use crate::validate::check_watch_start;
use crate::{EventKind, KeyValue, Result, Revision, StoreError, WatchEvent, WatchStream};

/// Events a watch buffers for a consumer that is not reading.
const WATCH_BUFFER: usize = 1024;
/// Re-polling a watch after an error waits this long at first, doubling.
const WATCH_RETRY_MIN: Duration = Duration::from_millis(100);
const WATCH_RETRY_MAX: Duration = Duration::from_secs(3);

pub(super) async fn watch(
    inner: &Arc<Inner>,
    prefix: &str,
    start_revision: Revision,
) -> Result<WatchStream> {
    check_watch_start(start_revision)?;
    let p = consul_prefix(prefix)?.to_owned();
    let start = u64::try_from(start_revision).unwrap_or(0);
    let remembered = (start > 0)
        .then(|| inner.remembered_range(&p, start - 1))
        .flatten();
    let (index, entries, next) = match remembered {
        // Exactly where a recent range left off.
        Some(s) => (s.index, (*s.entries).clone(), start),
        None => {
            let (index, entries) = inner.list(&p, None).await?;
            if start == 0 {
                (index, entries, index + 1)
            } else if start > index {
                // Nothing under the prefix changed at or after `start`.
                (index, entries, start)
            } else {
                // Changes since `start` happened and Consul cannot replay
                // them (deletes leave no trace to diff against).
                return Err(StoreError::Compacted {
                    requested: start_revision,
                    oldest: revision(index + 1)?,
                });
            }
        }
    };
    let watcher = Watcher {
        inner: Arc::clone(inner),
        prefix: p,
        index,
        high: index,
        state: entries,
        next,
        backlog: VecDeque::new(),
        done: false,
        failures: 0,
    };
    Ok(watcher.spawn())
}

/// One consumer's watch: the last snapshot handed out and the first revision
/// not handed out yet.
struct Watcher {
    inner: Arc<Inner>,
    prefix: String,
    /// X-Consul-Index of `state`: the next blocking query waits for more.
    index: u64,
    /// The highest index seen, which `index` can fall below.
    high: u64,
    state: BTreeMap<String, Entry>,
    next: u64,
    backlog: VecDeque<WatchEvent>,
    done: bool,
    failures: u32,
}

impl Watcher {
    /// Polls in the background and hands events over a bounded channel:
    /// looking continuously, instead of only when the consumer asks, keeps
    /// the states that a slow consumer would otherwise see coalesced. Ends
    /// when the stream is dropped.
    fn spawn(mut self) -> WatchStream {
        let (tx, mut rx) = tokio::sync::mpsc::channel(WATCH_BUFFER);
        tokio::spawn(async move {
            loop {
                let item = tokio::select! {
                    _ = tx.closed() => return,
                    item = self.next() => item,
                };
                let Some(item) = item else { return };
                let end = item.is_err();
                if tx.send(item).await.is_err() || end {
                    return;
                }
            }
        });
        futures::stream::poll_fn(move |cx| rx.poll_recv(cx)).boxed()
    }

    async fn next(&mut self) -> Option<Result<WatchEvent>> {
        loop {
            if let Some(ev) = self.backlog.pop_front() {
                return Some(Ok(ev));
            }
            if self.done {
                return None;
            }
            let polled = self
                .inner
                .list(&self.prefix, Some((self.index, self.inner.watch_wait)))
                .await;
            match polled {
                Ok((index, entries)) => {
                    if self.failures > 0 {
                        tracing::info!(prefix = %self.prefix, "Consul watch resumed");
                    }
                    self.failures = 0;
                    if let Err(e) = self.absorb(index, entries) {
                        self.done = true;
                        return Some(Err(e));
                    }
                }
                Err(e) if e.is_transient() => {
                    self.failures += 1;
                    // Once, then every ~minute: the outage is already known.
                    if self.failures % 20 == 1 {
                        tracing::warn!(prefix = %self.prefix, error = %e, failures = self.failures, "Consul watch failed; retrying");
                    }
                    let delay = WATCH_RETRY_MIN
                        .saturating_mul(1 << self.failures.min(5))
                        .min(WATCH_RETRY_MAX);
                    tokio::time::sleep(delay).await;
                }
                Err(e) => {
                    self.done = true;
                    return Some(Err(e));
                }
            }
        }
    }

    /// Turns a new snapshot into events: keys whose ModifyIndex changed are
    /// puts at that index, keys gone are deletes at the snapshot's index (the
    /// first revision known to lack them).
    fn absorb(&mut self, index: u64, entries: BTreeMap<String, Entry>) -> Result<()> {
        // Normal after Consul reaped tombstones under the prefix (its index
        // then falls back to the newest entry's). Consul's docs: reset the
        // index to 0 when it goes backwards, so the next query does not
        // block on an index that may not come back soon. The snapshot just
        // read is the fresh one either way.
        let went_back = index < self.index;
        if went_back {
            tracing::debug!(prefix = %self.prefix, from = self.index, to = index, "Consul index went backwards; resetting the blocking query");
        }
        let mut events: Vec<(u64, WatchEvent)> = Vec::new();
        for (key, e) in &entries {
            let changed = self
                .state
                .get(key)
                .is_none_or(|old| old.modify_index != e.modify_index);
            if !changed {
                continue;
            }
            if e.modify_index <= self.high {
                // A change older than a snapshot that did not have it: this
                // is a different history (the cluster was rebuilt or
                // restored). Revisions mean nothing across that.
                return Err(StoreError::Compacted {
                    requested: revision(self.next)?,
                    oldest: revision(index.saturating_add(1))?,
                });
            }
            match e.to_kv() {
                Ok(kv) => events.push((
                    e.modify_index,
                    WatchEvent {
                        kind: EventKind::Put,
                        kv,
                    },
                )),
                Err(err) => {
                    tracing::warn!(key = %e.key, error = %err, "skipping an unreadable Consul entry")
                }
            }
        }
        let deleted_at = index.max(self.next);
        for key in self.state.keys() {
            if !entries.contains_key(key) {
                events.push((
                    deleted_at,
                    WatchEvent {
                        kind: EventKind::Delete,
                        kv: KeyValue {
                            key: format!("/{key}"),
                            value: Vec::new(),
                            create_revision: 0,
                            mod_revision: revision(deleted_at)?,
                            lease: None,
                        },
                    },
                ));
            }
        }
        events.sort_by(|a, b| (a.0, &a.1.kv.key).cmp(&(b.0, &b.1.kv.key)));
        for (rev, ev) in events {
            // Changes before the requested start are part of the baseline.
            if rev >= self.next {
                self.backlog.push_back(ev);
            }
        }
        self.state = entries;
        self.index = if went_back { 0 } else { index };
        self.high = self.high.max(index);
        self.next = self.next.max(index.saturating_add(1));
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::super::wire::test_entry as entry;
    use super::super::{ConsulConfig, ConsulStore};
    use super::*;

    #[test]
    fn watch_diff_orders_events_and_dates_deletes() {
        let store = ConsulStore::new(ConsulConfig::new("127.0.0.1:1")).unwrap();
        let mut w = Watcher {
            inner: Arc::clone(&store.inner),
            prefix: "p/".into(),
            index: 10,
            high: 10,
            state: [
                ("p/a".to_owned(), entry("p/a", 4)),
                ("p/b".to_owned(), entry("p/b", 10)),
            ]
            .into_iter()
            .collect(),
            next: 11,
            backlog: VecDeque::new(),
            done: false,
            failures: 0,
        };
        let new = [
            ("p/b".to_owned(), entry("p/b", 12)),
            ("p/c".to_owned(), entry("p/c", 11)),
        ]
        .into_iter()
        .collect();
        w.absorb(13, new).unwrap();
        let got: Vec<(String, EventKind, Revision)> = w
            .backlog
            .iter()
            .map(|e| (e.kv.key.clone(), e.kind, e.kv.mod_revision))
            .collect();
        assert_eq!(
            got,
            vec![
                ("/p/c".into(), EventKind::Put, 11),
                ("/p/b".into(), EventKind::Put, 12),
                ("/p/a".into(), EventKind::Delete, 13),
            ]
        );
        assert_eq!((w.index, w.next), (13, 14));
        // The index falls back (tombstones reaped) with nothing new: no event.
        let same = w.state.clone();
        w.backlog.clear();
        w.absorb(12, same.clone()).unwrap();
        assert!(w.backlog.is_empty());
        assert_eq!(
            (w.index, w.next),
            (0, 14),
            "reset: the next query does not block"
        );
        // The next (non-blocking) answer sets the index again.
        w.absorb(12, same).unwrap();
        assert!(w.backlog.is_empty());
        assert_eq!((w.index, w.next), (12, 14));
        // An older change that the previous snapshot did not have: another
        // history.
        let mut other = w.state.clone();
        other.insert("p/z".into(), entry("p/z", 3));
        assert!(matches!(
            w.absorb(5, other),
            Err(StoreError::Compacted { .. })
        ));
    }
}
