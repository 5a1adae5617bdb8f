//! Watches. Opening one waits until etcd has created it, so nothing written
//! after the call returns can be missed. A watch re-opens itself after a
//! disconnect (with back-off while etcd is unreachable) from the first
//! revision it has not handed out, so a consumer sees neither gaps nor
//! duplicates; only compaction, or a watch etcd refuses, ends it. A watch
//! also re-opens on another member as soon as a call finds its member sick
//! (no leader, stalled): a member cut off from its peers keeps the stream
//! open but has nothing to deliver. etcd's events are turned into the
//! store's here.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use etcd_client::proto::{PbEvent, PbWatchResponse};
use etcd_client::WatchOptions;
use futures::StreamExt;

use super::connection::Connections;
use super::error::{describe, map_error, missing_header};
use super::kv::key_value;
use crate::validate::check_watch_start;
use crate::{EventKind, KeyValue, Result, Revision, StoreError, WatchEvent, WatchStream};

/// Re-opening a watch again waits this long at first, doubling up to the max.
const WATCH_RETRY_MIN: Duration = Duration::from_millis(100);
const WATCH_RETRY_MAX: Duration = Duration::from_secs(3);

pub(super) async fn watch(
    conns: &Arc<Connections>,
    prefix: &str,
    start_revision: Revision,
) -> Result<WatchStream> {
    check_watch_start(start_revision)?;
    let (stream, now, sick) = open_watch(conns, prefix, start_revision).await?;
    let watcher = Watcher {
        conns: Arc::clone(conns),
        prefix: prefix.to_owned(),
        next: now.map_or(start_revision, |rev| rev + 1),
        stream: Some(stream),
        sick,
        backlog: VecDeque::new(),
        done: false,
        delay: Duration::ZERO,
    };
    Ok(futures::stream::unfold(watcher, Watcher::next_item).boxed())
}

/// Opens a watch from `start` (0: now) and waits until etcd has created
/// it, so nothing written after this returns can be missed. Returns the
/// stream, for a watch from now the store revision it starts after, and
/// the sick signal of the member it is open on.
async fn open_watch(
    conns: &Connections,
    prefix: &str,
    start: Revision,
) -> Result<(etcd_client::WatchStream, Option<Revision>, Sick)> {
    let what = || format!("watch on prefix {prefix:?} from revision {start}");
    // Progress notifications move the resume point of a quiet prefix, so
    // a reconnect after a long calm does not land in compacted history.
    let options = WatchOptions::new()
        .with_prefix()
        .with_start_revision(start)
        .with_progress_notify();
    let (mut stream, at) = conns
        .call_at(
            what,
            conns.idempotent(conns.request_timeout / 2),
            |mut c| {
                let options = options.clone();
                async move { c.watch.watch(prefix, Some(options)).await }
            },
        )
        .await?;
    let sick = conns.sick_signal(at);
    let created = tokio::time::timeout(conns.request_timeout, async {
        loop {
            match stream.message().await {
                Ok(Some(resp)) => {
                    let resp = resp.0;
                    if resp.compact_revision != 0 {
                        return Err(StoreError::Compacted {
                            requested: start,
                            oldest: resp.compact_revision,
                        });
                    }
                    if resp.canceled {
                        return Err(StoreError::Backend {
                            context: format!("{}: {}", conns.target, what()),
                            source: format!("etcd refused the watch: {}", resp.cancel_reason)
                                .into(),
                        });
                    }
                    if resp.created {
                        return Ok(resp.header.map(|h| h.revision));
                    }
                }
                Ok(None) => {
                    return Err(StoreError::Unavailable(format!(
                        "{}: {}: the stream closed before the watch was created",
                        conns.target,
                        what()
                    )))
                }
                Err(e) => return Err(map_error(&conns.target, conns.request_timeout, &what(), e)),
            }
        }
    })
    .await
    .unwrap_or_else(|_| {
        conns.leave(at);
        Err(StoreError::Timeout(conns.request_timeout))
    })?;
    let now = if start == 0 {
        Some(created.ok_or_else(|| missing_header(&conns.target, &what()))?)
    } else {
        None
    };
    Ok((stream, now, sick))
}

/// Changes when the member a stream is open on is found sick.
type Sick = tokio::sync::watch::Receiver<u64>;

/// The state of one consumer's watch: the etcd stream (None while re-opening)
/// and the first revision not yet handed out.
struct Watcher {
    conns: Arc<Connections>,
    prefix: String,
    next: Revision,
    stream: Option<etcd_client::WatchStream>,
    /// The sick signal of the stream's member.
    sick: Sick,
    backlog: VecDeque<WatchEvent>,
    done: bool,
    /// Wait before the next re-open: zero once a stream delivered something,
    /// growing while re-opening fails or a re-opened stream breaks at once.
    delay: Duration,
}

impl Watcher {
    async fn next_item(mut self) -> Option<(Result<WatchEvent>, Self)> {
        loop {
            if let Some(ev) = self.backlog.pop_front() {
                return Some((Ok(ev), self));
            }
            if self.done {
                return None;
            }
            let Some(stream) = self.stream.as_mut() else {
                match self.reopen().await {
                    Ok((stream, sick)) => {
                        self.stream = Some(stream);
                        self.sick = sick;
                    }
                    Err(e) => return Some((Err(e), self.finish())),
                }
                continue;
            };
            let message = tokio::select! {
                message = stream.message() => message,
                Ok(()) = self.sick.changed() => {
                    tracing::warn!(prefix = %self.prefix, target = %self.conns.target, "the etcd member of this watch was found sick; re-opening the watch on another");
                    self.stream = None;
                    continue;
                }
            };
            match message {
                Ok(Some(resp)) => {
                    self.delay = Duration::ZERO;
                    if let Err(e) = self.absorb(resp.0) {
                        return Some((Err(e), self.finish()));
                    }
                }
                Ok(None) => {
                    tracing::warn!(prefix = %self.prefix, target = %self.conns.target, "etcd closed the watch; re-opening it");
                    self.stream = None;
                }
                Err(e) => {
                    tracing::warn!(prefix = %self.prefix, target = %self.conns.target, error = %describe(&e), "etcd watch broke; re-opening it");
                    self.stream = None;
                }
            }
        }
    }

    fn finish(mut self) -> Self {
        self.done = true;
        self.stream = None;
        self
    }

    /// Re-opens the watch from the first revision not handed out, retrying
    /// with back-off while etcd is unreachable. Errors that retrying cannot
    /// fix (compaction, a refused watch) end the stream.
    async fn reopen(&mut self) -> Result<(etcd_client::WatchStream, Sick)> {
        let mut failures = 0u32;
        loop {
            if !self.delay.is_zero() {
                tokio::time::sleep(self.delay).await;
            }
            self.delay = (self.delay * 2).clamp(WATCH_RETRY_MIN, WATCH_RETRY_MAX);
            match open_watch(&self.conns, &self.prefix, self.next).await {
                Ok((stream, _, sick)) => {
                    if failures > 0 {
                        tracing::info!(prefix = %self.prefix, from = self.next, "etcd watch re-opened");
                    }
                    return Ok((stream, sick));
                }
                Err(e) if e.is_transient() => {
                    failures += 1;
                    // Once, then every ~minute: the outage is already known.
                    if failures % 20 == 1 {
                        tracing::warn!(prefix = %self.prefix, error = %e, failures, "cannot re-open the etcd watch yet; retrying");
                    }
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Queues the events of one answer, or says why the watch must end.
    fn absorb(&mut self, resp: PbWatchResponse) -> Result<()> {
        if resp.compact_revision != 0 {
            return Err(StoreError::Compacted {
                requested: self.next,
                oldest: resp.compact_revision,
            });
        }
        if resp.canceled {
            // Not compaction: etcd dropped the watcher (e.g. it lost its
            // leader); re-opening from the next revision loses nothing.
            tracing::warn!(prefix = %self.prefix, reason = %resp.cancel_reason, "etcd canceled the watch; re-opening it");
            self.stream = None;
            return Ok(());
        }
        if resp.events.is_empty() && !resp.created {
            // A progress notification: every change up to the header
            // revision has been sent.
            if let Some(header) = resp.header {
                self.next = self.next.max(header.revision + 1);
            }
            return Ok(());
        }
        let mut last = None;
        for ev in resp.events {
            let Some(ev) = watch_event(ev) else {
                tracing::warn!(prefix = %self.prefix, "skipping a malformed etcd watch event");
                continue;
            };
            // Re-opened watches start at `next`; never hand out a change twice.
            if ev.revision() < self.next {
                continue;
            }
            last = Some(ev.revision());
            self.backlog.push_back(ev);
        }
        // etcd sends all changes of a revision in one answer (we do not ask
        // for fragments), so the revision after the last one is a safe resume
        // point.
        if let Some(last) = last {
            self.next = last + 1;
        }
        Ok(())
    }
}

/// A put, or a delete in the shape every backend uses. None for a malformed
/// event or a key that is not UTF-8.
fn watch_event(ev: PbEvent) -> Option<WatchEvent> {
    let kind = match ev.r#type {
        0 => EventKind::Put,
        1 => EventKind::Delete,
        _ => return None,
    };
    let kv = key_value(ev.kv?)?;
    Some(match kind {
        EventKind::Put => WatchEvent { kind, kv },
        EventKind::Delete => WatchEvent {
            kind,
            kv: KeyValue {
                key: kv.key,
                value: Vec::new(),
                create_revision: 0,
                mod_revision: kv.mod_revision,
                lease: None,
            },
        },
    })
}
