//! The one "list, then watch, then resync after a gap" loop.
//!
//! A follower keeps some local state (a map, the kernel) equal to what the
//! store holds under one prefix. It is given a full read, then every change
//! after it; whenever the watch breaks (a store outage, a compacted revision,
//! a change it failed to apply) it is given a fresh full read instead of
//! being trusted to have missed nothing.

use crate::telemetry;
use crate::util::backoff::Backoff;
use async_trait::async_trait;
use futures::StreamExt;
use kvstore_backends::{KvStore, RangeResponse, WatchEvent};
use std::time::Duration;

/// Pause after a failed read or resync, doubling up to the maximum.
const RETRY_MIN: Duration = Duration::from_millis(200);
const RETRY_MAX: Duration = Duration::from_secs(5);

/// What [`Follower::stale`] asks of the loop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stale {
    /// Local conditions changed: start over with a full read.
    Resync,
    /// Stop following.
    Stop,
}

#[async_trait]
pub trait Follower: Send {
    /// Make the local state match a full read of the prefix.
    async fn resync(&mut self, snapshot: RangeResponse) -> anyhow::Result<()>;

    /// Apply one change made after the last full read.
    async fn apply(&mut self, event: WatchEvent) -> anyhow::Result<()>;

    /// Resolves when the follower needs a fresh full read for a reason of
    /// its own. Must be cancel-safe. The default never resolves.
    async fn stale(&mut self) -> Stale {
        std::future::pending().await
    }
}

enum Next {
    Event(Option<kvstore_backends::Result<WatchEvent>>),
    Stale(Stale),
}

/// Follow `prefix` until the follower asks to stop. Never gives up on the
/// store: a store that is down is retried with back-off.
pub async fn follow<F: Follower>(store: &dyn KvStore, prefix: &str, follower: &mut F) {
    let mut backoff = Backoff::new(RETRY_MIN, RETRY_MAX);
    // Set when the watch broke (not when the follower asked for a re-read):
    // what `rustoverlay_watch_resyncs_total` counts.
    let mut broke = false;
    loop {
        if std::mem::take(&mut broke) {
            telemetry::watch_resync(prefix);
        }
        let snapshot = match store.range(prefix).await {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(error = %e, retry_in = ?backoff.peek(), "store read failed; retrying");
                backoff.wait().await;
                continue;
            }
        };
        let start = snapshot.revision + 1;
        if let Err(e) = follower.resync(snapshot).await {
            tracing::warn!(error = %e, retry_in = ?backoff.peek(), "resync failed; retrying");
            backoff.wait().await;
            continue;
        }
        backoff.reset();
        let mut stream = match store.watch(prefix, start).await {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(error = %e, "could not start the watch; resyncing");
                broke = true;
                tokio::time::sleep(RETRY_MIN).await;
                continue;
            }
        };
        loop {
            let next = tokio::select! {
                item = stream.next() => Next::Event(item),
                stale = follower.stale() => Next::Stale(stale),
            };
            match next {
                Next::Event(Some(Ok(event))) => {
                    if let Err(e) = follower.apply(event).await {
                        // Local state and the store may now differ: start over.
                        tracing::warn!(error = %e, "applying a change failed; resyncing");
                        broke = true;
                        break;
                    }
                }
                Next::Event(Some(Err(e))) => {
                    tracing::info!(error = %e, "watch ended; resyncing");
                    broke = true;
                    break;
                }
                Next::Event(None) => {
                    tracing::info!("watch closed; resyncing");
                    broke = true;
                    break;
                }
                Next::Stale(Stale::Resync) => break,
                Next::Stale(Stale::Stop) => return,
            }
        }
        tokio::time::sleep(RETRY_MIN).await;
    }
}
