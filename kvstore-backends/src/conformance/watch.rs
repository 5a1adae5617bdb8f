//! Watches: every change in order without gaps or duplicates (or, for
//! latest-state backends, converging on the store's state), concurrent
//! writers with a watch opened mid-stream, replay from history, and
//! filtering by prefix.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use super::support::{
    collect, current_revision, expect_compacted, expect_convergence, expect_sentinel_next,
    expect_sentinel_next_all, latest_state, next_event, seen, unique_prefix, Seen, PATIENCE,
};
use crate::{EventKind, KvStore, Op, OpResult, Revision, Txn, WatchStream};

pub async fn watch_sees_every_change_in_order(store: Arc<dyn KvStore>) {
    const WRITES: usize = 500;
    let p = unique_prefix("watch_in_order");
    // Unrelated writes must not show up.
    let noise = unique_prefix("watch_in_order_noise");
    let start = current_revision(&*store).await + 1;
    let mut from_rev = store.watch(&p, start).await.expect("watch from revision");
    let mut from_now = store.watch(&p, 0).await.expect("watch from now");

    let mut expected: Vec<Seen> = Vec::new();
    let mut last = start - 1;
    for i in 0..WRITES {
        let key = format!("{p}k{}", i % 7);
        let value = format!("v{i}").into_bytes();
        let resp = match i % 5 {
            // A put, or a delete (that may find nothing to delete).
            0..=2 => store.txn(Txn::new().and_then(vec![Op::put(&key, value.clone())])),
            3 => store.txn(Txn::new().and_then(vec![Op::delete(&key)])),
            // Two changes in one txn, and one write outside the prefix.
            _ => store.txn(Txn::new().and_then(vec![
                Op::put(&key, value.clone()),
                Op::put(format!("{noise}{i}"), value.clone()),
                Op::put(format!("{p}pair"), value.clone()),
            ])),
        }
        .await
        .expect("write");
        match i % 5 {
            0..=2 => expected.push((key, EventKind::Put, resp.revision, value)),
            3 => {
                if resp.results == vec![OpResult::Delete { deleted: 1 }] {
                    expected.push((key, EventKind::Delete, resp.revision, vec![]));
                } else {
                    assert_eq!(resp.revision, last, "a delete of nothing takes no revision");
                    continue;
                }
            }
            _ => {
                expected.push((key, EventKind::Put, resp.revision, value.clone()));
                expected.push((format!("{p}pair"), EventKind::Put, resp.revision, value));
            }
        }
        assert!(resp.revision > last, "revisions increase");
        last = resp.revision;
    }

    if latest_state(&*store) {
        let watches = &mut [(&mut from_rev, p.as_str()), (&mut from_now, p.as_str())];
        expect_convergence(&*store, watches, &expected, start, &p).await;
        return;
    }
    for (name, watch) in [
        ("from revision", &mut from_rev),
        ("from now", &mut from_now),
    ] {
        let got: Vec<Seen> = collect(watch, expected.len(), name)
            .await
            .iter()
            .map(seen)
            .collect();
        assert_eq!(got, expected, "watch {name} must see exactly the writes");
    }
    expect_sentinel_next_all(&*store, &mut [&mut from_rev, &mut from_now], &p).await;
}

pub async fn watch_concurrent_writers_and_late_start(store: Arc<dyn KvStore>) {
    const WRITERS: usize = 4;
    const WRITES: usize = 100;
    let p = unique_prefix("watch_concurrent");
    let start = current_revision(&*store).await + 1;
    let mut early = store.watch(&p, start).await.expect("watch");
    let done = Arc::new(AtomicUsize::new(0));
    let mut writers = Vec::new();
    for w in 0..WRITERS {
        let (store, p, done) = (Arc::clone(&store), p.clone(), Arc::clone(&done));
        writers.push(tokio::spawn(async move {
            let mut written = Vec::new();
            for i in 0..WRITES {
                let key = format!("{p}w{w}/{i}");
                let rev = store.put(&key, vec![w as u8]).await.expect("put");
                written.push((key, rev));
                done.fetch_add(1, Ordering::Relaxed);
                // Spread the writes out so the late watch opens mid-stream.
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            written
        }));
    }
    // Open a watch from the start while the writers are busy: it must replay
    // what is done and then follow live, with no seam.
    let deadline = tokio::time::Instant::now() + PATIENCE;
    while done.load(Ordering::Relaxed) < WRITERS * WRITES / 4 {
        assert!(tokio::time::Instant::now() < deadline, "writers stalled");
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    // A latest-state store has no history to replay: it refuses the late
    // start, and a caller resyncs with a range instead.
    let mut late = if latest_state(&*store) {
        expect_compacted(&*store, &p, start, "late watch without history").await;
        None
    } else {
        Some(store.watch(&p, start).await.expect("late watch"))
    };
    let mut expected = Vec::new();
    for writer in writers {
        expected.extend(writer.await.expect("writer"));
    }
    expected.sort_by_key(|(_, rev)| *rev);
    let mut watches: Vec<(&str, &mut WatchStream)> = vec![("early", &mut early)];
    if let Some(late) = late.as_mut() {
        watches.push(("late", late));
    }
    for (name, watch) in watches {
        let got: Vec<(String, Revision)> = collect(watch, expected.len(), name)
            .await
            .into_iter()
            .map(|e| {
                assert_eq!(e.kind, EventKind::Put);
                (e.kv.key, e.kv.mod_revision)
            })
            .collect();
        assert_eq!(
            got, expected,
            "{name} watch: every put once, in revision order"
        );
    }
    match late.as_mut() {
        Some(late) => expect_sentinel_next_all(&*store, &mut [&mut early, late], &p).await,
        None => expect_sentinel_next(&*store, &mut early, &p).await,
    }
}

pub async fn watch_replays_history(store: Arc<dyn KvStore>) {
    let p = unique_prefix("watch_history");
    let mut writes: Vec<Seen> = Vec::new();
    for i in 0..10u8 {
        let key = format!("{p}k{}", i % 3);
        if i == 6 {
            store.delete(&key).await.expect("delete");
            let rev = current_revision(&*store).await;
            writes.push((key, EventKind::Delete, rev, vec![]));
        } else {
            let rev = store.put(&key, vec![i]).await.expect("put");
            writes.push((key, EventKind::Put, rev, vec![i]));
        }
    }
    if latest_state(&*store) {
        // No history: starts in the past are refused, "from now" works.
        expect_compacted(&*store, &p, writes[2].2, "watch from the past").await;
        expect_compacted(&*store, &p, writes[9].2, "watch from the last write").await;
        let mut future_only = store.watch(&p, 0).await.expect("watch from now");
        expect_sentinel_next(&*store, &mut future_only, &p).await;
    } else {
        replay_from_history(&*store, &p, &writes).await;
    }

    // Every backend: a watch from a range's revision + 1 sees exactly what
    // changed after the read (what a consumer does after a resync).
    let read = store.range(&p).await.expect("range");
    let (added, removed) = (format!("{p}after-range"), format!("{p}k0"));
    let put_rev = store.put(&added, b"a".to_vec()).await.expect("put");
    assert!(store.delete(&removed).await.expect("delete"), "k0 exists");
    let del_rev = current_revision(&*store).await;
    let mut resumed = store
        .watch(&p, read.revision + 1)
        .await
        .expect("watch from a range's revision + 1");
    let got: Vec<Seen> = collect(&mut resumed, 2, "after the range")
        .await
        .iter()
        .map(seen)
        .collect();
    assert_eq!(
        got,
        vec![
            (added, EventKind::Put, put_rev, b"a".to_vec()),
            (removed, EventKind::Delete, del_rev, vec![]),
        ]
    );
    expect_sentinel_next(&*store, &mut resumed, &p).await;
}

async fn replay_from_history(store: &dyn KvStore, p: &str, writes: &[Seen]) {
    // From the third write: history, then live, nothing twice.
    let from = writes[2].2;
    let mut watch = store.watch(p, from).await.expect("watch from the past");
    let got: Vec<Seen> = collect(&mut watch, 8, "replay")
        .await
        .iter()
        .map(seen)
        .collect();
    assert_eq!(got, writes[2..].to_vec());
    let rev = store
        .put(&format!("{p}live"), b"l".to_vec())
        .await
        .expect("put");
    let ev = next_event(&mut watch, "live after replay").await;
    assert_eq!(
        seen(&ev),
        (format!("{p}live"), EventKind::Put, rev, b"l".to_vec())
    );

    // From revision 0: only what happens after the call.
    let mut future_only = store.watch(p, 0).await.expect("watch from now");
    expect_sentinel_next(store, &mut future_only, p).await;

    // A start between two writes of the prefix replays from the next one.
    let mut mid = store.watch(p, writes[9].2).await.expect("watch");
    let ev = next_event(&mut mid, "replay of the last write").await;
    assert_eq!(seen(&ev), writes[9]);
}

pub async fn watch_filters_by_prefix(store: Arc<dyn KvStore>) {
    let p = unique_prefix("watch_prefix");
    let dir = format!("{p}a/");
    let start = current_revision(&*store).await + 1;
    let mut watch = store.watch(&dir, start).await.expect("watch");
    let mut everything = store.watch(&p, start).await.expect("watch parent");
    let keys = [
        format!("{p}a"),
        format!("{p}ab"),
        format!("{dir}1"),
        format!("{p}b/1"),
        format!("{dir}sub/2"),
        format!("{p}a/"),
    ];
    let mut want = Vec::new();
    let mut writes: Vec<Seen> = Vec::new();
    for key in &keys {
        let rev = store.put(key, b"v".to_vec()).await.expect("put");
        writes.push((key.clone(), EventKind::Put, rev, b"v".to_vec()));
        if key.starts_with(&dir) {
            want.push((key.clone(), rev));
        }
    }
    store.delete(&format!("{p}ab")).await.expect("delete");
    let del_rev = current_revision(&*store).await;
    writes.push((format!("{p}ab"), EventKind::Delete, del_rev, vec![]));
    let dir_del = store.delete(&format!("{dir}1")).await.expect("delete");
    assert!(dir_del);
    let dir_del_rev = current_revision(&*store).await;
    want.push((format!("{dir}1"), dir_del_rev));
    writes.push((format!("{dir}1"), EventKind::Delete, dir_del_rev, vec![]));

    if latest_state(&*store) {
        // Each watch converges on its own prefix; the sentinel is in both.
        let watches = &mut [(&mut watch, dir.as_str()), (&mut everything, p.as_str())];
        expect_convergence(&*store, watches, &writes, start, &dir).await;
        return;
    }

    let got: Vec<(String, Revision)> = collect(&mut watch, want.len(), "prefix watch")
        .await
        .into_iter()
        .map(|e| (e.kv.key, e.kv.mod_revision))
        .collect();
    assert_eq!(got, want, "only keys under {dir}");
    expect_sentinel_next(&*store, &mut watch, &dir).await;

    let all = collect(&mut everything, keys.len() + 3, "parent watch").await;
    assert!(all.iter().any(|e| e.kv.key == format!("{p}ab")
        && e.kind == EventKind::Delete
        && e.revision() == del_rev));
}
