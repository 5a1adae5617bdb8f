//! Transactions: all or nothing at one revision, the failure branch only
//! when a compare is false, deleted prefixes, and the refusal of a branch
//! that writes one key twice.

use std::sync::Arc;

use super::support::{
    collect, current_revision, expect_sentinel_next, latest_state, unique_prefix, value_of,
};
use crate::{Compare, EventKind, KeyValue, KvStore, Op, OpResult, Revision, StoreError, Txn};

pub async fn txn_failure_applies_nothing(store: Arc<dyn KvStore>) {
    let p = unique_prefix("txn_failure");
    let (a, b, c, d) = (
        format!("{p}a"),
        format!("{p}b"),
        format!("{p}c"),
        format!("{p}d"),
    );
    let ra = store.put(&a, b"a".to_vec()).await.expect("put a");
    let rb = store.put(&b, b"b".to_vec()).await.expect("put b");
    let a_kv = store.get(&a).await.expect("get");

    // One true compare and one false one: the whole txn fails.
    let resp = store
        .txn(
            Txn::new()
                .when(vec![
                    Compare::mod_revision(&b, rb),
                    Compare::mod_revision(&a, ra + 1000),
                ])
                .and_then(vec![
                    Op::put(&c, b"c".to_vec()),
                    Op::delete(&a),
                    Op::delete_prefix(&b),
                ])
                .or_else(vec![Op::put(&d, b"d".to_vec()), Op::get(&a), Op::get(&d)]),
        )
        .await
        .expect("txn");
    assert!(!resp.succeeded, "a false compare fails the txn");
    assert!(resp.revision > rb, "the failure branch wrote d");
    let d_kv = store
        .get(&d)
        .await
        .expect("get")
        .expect("failure op applied");
    assert_eq!(d_kv.mod_revision, resp.revision);
    assert_eq!(
        resp.results,
        vec![
            OpResult::Put,
            OpResult::Get(a_kv.clone()),
            OpResult::Get(Some(d_kv)),
        ],
        "failure results, in order; a get sees the branch's earlier put"
    );
    assert_eq!(
        store.get(&c).await.expect("get"),
        None,
        "no success op applied"
    );
    assert_eq!(store.get(&a).await.expect("get"), a_kv, "a untouched");
    assert_eq!(store.range(&p).await.expect("range").kvs.len(), 3);

    // A compare on an absent key with a non-zero revision is false too.
    let resp = store
        .txn(
            Txn::new()
                .when(vec![Compare::mod_revision(format!("{p}absent"), ra)])
                .and_then(vec![Op::put(&c, b"c".to_vec())]),
        )
        .await
        .expect("txn");
    assert!(!resp.succeeded);
    assert!(resp.results.is_empty());
    assert_eq!(store.get(&c).await.expect("get"), None);
}

pub async fn txn_success_applies_all_at_one_revision(store: Arc<dyn KvStore>) {
    let p = unique_prefix("txn_success");
    let (a, b, c, gone) = (
        format!("{p}a"),
        format!("{p}b"),
        format!("{p}c"),
        format!("{p}gone"),
    );
    let dir = format!("{p}dir/");
    let ra = store.put(&a, b"a1".to_vec()).await.expect("put");
    store.put(&gone, b"x".to_vec()).await.expect("put");
    store
        .put(&format!("{dir}1"), b"d".to_vec())
        .await
        .expect("put");
    let before = current_revision(&*store).await;
    let mut watch = store.watch(&p, before + 1).await.expect("watch");

    let resp = store
        .txn(
            Txn::new()
                .when(vec![Compare::mod_revision(&a, ra), Compare::absent(&b)])
                .and_then(vec![
                    Op::put(&a, b"a2".to_vec()),
                    Op::put(&b, b"b1".to_vec()),
                    Op::get(&b),
                    Op::delete(&gone),
                    Op::get(&gone),
                    Op::put(&c, b"c1".to_vec()),
                    Op::delete_prefix(&dir),
                    // Deletes may overlap (only writes of one key twice are refused).
                    Op::delete(format!("{dir}1")),
                ])
                .or_else(vec![Op::put(format!("{p}failure"), b"!".to_vec())]),
        )
        .await
        .expect("txn");
    assert!(resp.succeeded);
    let rev = resp.revision;
    assert!(rev > before, "revision {rev} after {before}");
    let b_kv = KeyValue {
        key: b.clone(),
        value: b"b1".to_vec(),
        create_revision: rev,
        mod_revision: rev,
        lease: None,
    };
    assert_eq!(
        resp.results,
        vec![
            OpResult::Put,
            OpResult::Put,
            OpResult::Get(Some(b_kv.clone())),
            OpResult::Delete { deleted: 1 },
            OpResult::Get(None),
            OpResult::Put,
            OpResult::Delete { deleted: 1 },
            OpResult::Delete { deleted: 0 },
        ]
    );
    let a_kv = store.get(&a).await.expect("get").expect("a");
    assert_eq!(
        (
            a_kv.value.as_slice(),
            a_kv.create_revision,
            a_kv.mod_revision
        ),
        (&b"a2"[..], ra, rev)
    );
    assert_eq!(store.get(&b).await.expect("get"), Some(b_kv));
    assert_eq!(store.get(&gone).await.expect("get"), None);
    assert_eq!(
        value_of(&store.get(&c).await.expect("get")),
        Some(&b"c1"[..])
    );
    assert!(store.range(&dir).await.expect("range").kvs.is_empty());
    assert_eq!(store.get(&format!("{p}failure")).await.expect("get"), None);
    assert_eq!(current_revision(&*store).await, rev);

    // Watchers see the txn's changes in op order (key order for latest-state
    // backends, which cannot know the op order), all at its revision.
    let events: Vec<(String, EventKind, Revision)> = collect(&mut watch, 5, "txn events")
        .await
        .iter()
        .map(|e| (e.kv.key.clone(), e.kind, e.revision()))
        .collect();
    let mut want = vec![
        (a.clone(), EventKind::Put, rev),
        (b.clone(), EventKind::Put, rev),
        (gone.clone(), EventKind::Delete, rev),
        (c.clone(), EventKind::Put, rev),
        (format!("{dir}1"), EventKind::Delete, rev),
    ];
    if latest_state(&*store) {
        want.sort_by(|x, y| (x.2, &x.0).cmp(&(y.2, &y.0)));
    }
    assert_eq!(events, want);
    expect_sentinel_next(&*store, &mut watch, &p).await;
}

pub async fn txn_delete_prefix(store: Arc<dyn KvStore>) {
    let p = unique_prefix("txn_delete_prefix");
    let dir = format!("{p}dir/");
    let doomed = [format!("{dir}1"), format!("{dir}2"), format!("{dir}sub/3")];
    let kept = [format!("{p}dir"), format!("{p}dirt"), format!("{p}other/1")];
    for key in doomed.iter().chain(&kept) {
        store.put(key, b"v".to_vec()).await.expect("put");
    }
    let start = current_revision(&*store).await + 1;
    let mut watch = store.watch(&p, start).await.expect("watch");

    let resp = store
        .txn(Txn::new().and_then(vec![Op::delete_prefix(&dir)]))
        .await
        .expect("delete prefix");
    assert_eq!(resp.results, vec![OpResult::Delete { deleted: 3 }]);
    let rev = resp.revision;
    assert!(
        rev >= start,
        "revision {rev} before the watch's start {start}"
    );
    assert!(store.range(&dir).await.expect("range").kvs.is_empty());
    for key in &kept {
        assert!(store.get(key).await.expect("get").is_some(), "{key} kept");
    }
    let mut events: Vec<(String, EventKind, Revision)> = collect(&mut watch, 3, "deletes")
        .await
        .iter()
        .map(|e| (e.kv.key.clone(), e.kind, e.revision()))
        .collect();
    events.sort_by(|x, y| x.0.cmp(&y.0));
    let want: Vec<_> = doomed
        .iter()
        .map(|k| (k.clone(), EventKind::Delete, rev))
        .collect();
    assert_eq!(events, want, "all deletions at the txn's revision");

    // Nothing left to delete: no change, no revision.
    let resp = store
        .txn(Txn::new().and_then(vec![Op::delete_prefix(&dir)]))
        .await
        .expect("delete prefix");
    assert_eq!(resp.results, vec![OpResult::Delete { deleted: 0 }]);
    assert_eq!(resp.revision, rev);
    expect_sentinel_next(&*store, &mut watch, &p).await;
}

pub async fn txn_writing_a_key_twice_is_invalid(store: Arc<dyn KvStore>) {
    let p = unique_prefix("txn_write_twice");
    let (k, other) = (format!("{p}k"), format!("{p}other"));
    let rev = store.put(&k, b"v".to_vec()).await.expect("put");
    let bad_branches = [
        vec![Op::put(&k, b"1".to_vec()), Op::put(&k, b"2".to_vec())],
        vec![Op::put(&k, b"1".to_vec()), Op::delete(&k)],
        vec![Op::delete(&k), Op::put(&k, b"1".to_vec())],
        vec![Op::delete_prefix(&p), Op::put(&k, b"1".to_vec())],
        vec![Op::put(&k, b"1".to_vec()), Op::delete_prefix(&p)],
    ];
    for ops in bad_branches {
        for (name, txn) in [
            ("success", Txn::new().and_then(ops.clone())),
            // Refused even in the branch that would not run.
            (
                "failure",
                Txn::new()
                    .and_then(vec![Op::put(&other, b"o".to_vec())])
                    .or_else(ops.clone()),
            ),
        ] {
            match store.txn(txn).await {
                Err(StoreError::Invalid(_)) => {}
                result => panic!("{ops:?} in the {name} branch: expected Invalid, got {result:?}"),
            }
        }
    }
    assert_eq!(current_revision(&*store).await, rev, "nothing was applied");
    assert_eq!(store.get(&other).await.expect("get"), None);

    // Allowed: one write per key, overlapping deletes, gets anywhere, and the
    // same key in both branches (only one of them runs).
    let resp = store
        .txn(
            Txn::new()
                .when(vec![Compare::mod_revision(&k, rev)])
                .and_then(vec![
                    Op::get(&k),
                    Op::delete(&k),
                    Op::delete_prefix(&k),
                    Op::get(&k),
                    Op::put(&other, b"o".to_vec()),
                ])
                .or_else(vec![Op::put(&k, b"f".to_vec())]),
        )
        .await
        .expect("txn with one write per key");
    assert!(resp.succeeded);
    assert_eq!(resp.results.len(), 5);
    assert_eq!(resp.results[1], OpResult::Delete { deleted: 1 });
    assert_eq!(resp.results[2], OpResult::Delete { deleted: 0 });
    assert_eq!(resp.results[3], OpResult::Get(None));
    assert_eq!(store.get(&k).await.expect("get"), None);
    assert!(store.get(&other).await.expect("get").is_some());
}
