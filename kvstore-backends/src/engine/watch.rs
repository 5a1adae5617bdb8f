//! The stream a watcher of the engine reads: first the events replayed from
//! the history, then the live batches, filtered by prefix and start
//! revision. A watcher that falls too far behind gets an error instead of a
//! silent gap, and re-watches from where it was.

use std::collections::VecDeque;
use std::sync::Arc;

use futures::StreamExt;
use tokio::sync::broadcast;

use crate::{Revision, StoreError, WatchEvent, WatchStream};

struct Watcher {
    prefix: String,
    start: Revision,
    backlog: VecDeque<WatchEvent>,
    rx: broadcast::Receiver<Arc<[WatchEvent]>>,
    last: Revision,
    done: bool,
}

pub(super) fn watch_stream(
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
