//! What the checks share: unique key prefixes, bounded waits for events and
//! expiries, the store revision, sentinel writes that prove nothing was left
//! over or duplicated, and the convergence check of latest-state watches.

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures::StreamExt;

use crate::{
    EventKind, KeyValue, KvStore, Revision, StoreError, WatchEvent, WatchFidelity, WatchStream,
};

/// Upper bound for anything that should happen "soon" (events, expiries).
/// Only there to turn a hang into a failure.
pub(super) const PATIENCE: Duration = Duration::from_secs(30);

/// A key prefix no other check (or earlier run on a shared store) uses.
pub(super) fn unique_prefix(check: &str) -> String {
    static SEQ: AtomicU64 = AtomicU64::new(0);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    format!(
        "/conformance/{check}/{}-{nanos}-{}/",
        std::process::id(),
        SEQ.fetch_add(1, Ordering::Relaxed)
    )
}

pub(super) async fn next_event(stream: &mut WatchStream, what: &str) -> WatchEvent {
    match tokio::time::timeout(PATIENCE, stream.next()).await {
        Ok(Some(Ok(ev))) => ev,
        Ok(Some(Err(e))) => panic!("{what}: watch failed: {e}"),
        Ok(None) => panic!("{what}: watch ended"),
        Err(_) => panic!("{what}: no event within {PATIENCE:?}"),
    }
}

pub(super) async fn collect(stream: &mut WatchStream, n: usize, what: &str) -> Vec<WatchEvent> {
    let mut out = Vec::with_capacity(n);
    for i in 0..n {
        out.push(next_event(stream, &format!("{what} (event {i} of {n})")).await);
    }
    out
}

/// (key, kind, revision, value): what a watcher must reproduce exactly.
pub(super) type Seen = (String, EventKind, Revision, Vec<u8>);

pub(super) fn seen(ev: &WatchEvent) -> Seen {
    (
        ev.kv.key.clone(),
        ev.kind,
        ev.revision(),
        ev.kv.value.clone(),
    )
}

/// Writes a sentinel key under `prefix` and checks that it is the very next
/// event of every stream: nothing was duplicated or left over after the
/// expected events.
pub(super) async fn expect_sentinel_next_all(
    store: &dyn KvStore,
    streams: &mut [&mut WatchStream],
    prefix: &str,
) {
    let key = format!("{prefix}~sentinel");
    let rev = store
        .put(&key, b"end".to_vec())
        .await
        .expect("put sentinel");
    for (i, stream) in streams.iter_mut().enumerate() {
        let ev = next_event(stream, "sentinel").await;
        assert_eq!(
            (ev.kv.key.as_str(), ev.kind, ev.revision()),
            (key.as_str(), EventKind::Put, rev),
            "watch {i}: the event after the expected ones must be the sentinel write"
        );
    }
}

pub(super) async fn expect_sentinel_next(
    store: &dyn KvStore,
    stream: &mut WatchStream,
    prefix: &str,
) {
    expect_sentinel_next_all(store, &mut [stream], prefix).await;
}

pub(super) async fn wait_until_absent(store: &dyn KvStore, key: &str, within: Duration) {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        if store.get(key).await.expect("get").is_none() {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{key} still present after {within:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

pub(super) async fn current_revision(store: &dyn KvStore) -> Revision {
    // A prefix nobody uses still reports the store revision.
    store
        .range("/conformance-revision-probe/")
        .await
        .expect("range")
        .revision
}

/// Keeps no history and reports latest states (Consul).
pub(super) fn latest_state(store: &dyn KvStore) -> bool {
    store.watch_fidelity() == WatchFidelity::LatestState
}

/// A watch from `start` must fail with Compacted, at the call or as the
/// stream's first item.
pub(super) async fn expect_compacted(
    store: &dyn KvStore,
    prefix: &str,
    start: Revision,
    what: &str,
) {
    match store.watch(prefix, start).await {
        Err(StoreError::Compacted { requested, .. }) => assert_eq!(requested, start, "{what}"),
        Err(e) => panic!("{what}: expected Compacted, got {e}"),
        Ok(mut watch) => match tokio::time::timeout(PATIENCE, watch.next()).await {
            Ok(Some(Err(StoreError::Compacted { requested, .. }))) => {
                assert_eq!(requested, start, "{what}")
            }
            other => panic!("{what}: expected Compacted, got {other:?}"),
        },
    }
}

/// For [`WatchFidelity::LatestState`]: writes a sentinel under
/// `sentinel_prefix` (inside every watched prefix) and follows each watch,
/// all started at `start` on a prefix that was empty then, until the
/// sentinel's put. Every event must be in revision order, at or after
/// `start`, and never repeated; a put must be one of `writes` exactly, a
/// delete must follow a delete of its key in `writes`. Then the state the
/// events build must be the store's.
pub(super) async fn expect_convergence(
    store: &dyn KvStore,
    watches: &mut [(&mut WatchStream, &str)],
    writes: &[Seen],
    start: Revision,
    sentinel_prefix: &str,
) {
    let sentinel = format!("{sentinel_prefix}~sentinel");
    let sentinel_rev = store
        .put(&sentinel, b"end".to_vec())
        .await
        .expect("put sentinel");
    for (stream, prefix) in watches.iter_mut() {
        let what = format!("latest-state watch on {prefix}");
        let mut state: std::collections::BTreeMap<String, (Vec<u8>, Revision)> = Default::default();
        let mut seen_puts = BTreeSet::new();
        let mut last = start;
        loop {
            let ev = next_event(stream, &what).await;
            let (key, rev) = (ev.kv.key.clone(), ev.revision());
            assert!(
                key.starts_with(*prefix),
                "{what}: event for {key} outside the prefix"
            );
            assert!(
                rev >= last,
                "{what}: {key} at revision {rev} after revision {last}"
            );
            last = rev;
            if key == sentinel {
                assert_eq!(
                    (ev.kind, rev),
                    (EventKind::Put, sentinel_rev),
                    "{what}: sentinel"
                );
                break;
            }
            match ev.kind {
                EventKind::Put => {
                    assert!(
                        writes.contains(&seen(&ev)),
                        "{what}: put {:?} is not a write that happened",
                        seen(&ev)
                    );
                    assert!(
                        seen_puts.insert((key.clone(), rev)),
                        "{what}: {key} at {rev} twice"
                    );
                    state.insert(key, (ev.kv.value, rev));
                }
                EventKind::Delete => {
                    assert!(
                        writes
                            .iter()
                            .any(|w| w.0 == key && w.1 == EventKind::Delete && w.2 <= rev),
                        "{what}: delete of {key} at {rev} before any delete of it"
                    );
                    state.remove(&key);
                }
            }
        }
        let now: std::collections::BTreeMap<String, (Vec<u8>, Revision)> = store
            .range(prefix)
            .await
            .expect("range")
            .kvs
            .into_iter()
            .filter(|kv| kv.key != sentinel)
            .map(|kv| (kv.key, (kv.value, kv.mod_revision)))
            .collect();
        assert_eq!(
            state, now,
            "{what}: the events must add up to the store's state"
        );
    }
}

pub(super) fn value_of(kv: &Option<KeyValue>) -> Option<&[u8]> {
    kv.as_ref().map(|kv| kv.value.as_slice())
}
