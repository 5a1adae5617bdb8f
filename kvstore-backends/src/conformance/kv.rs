//! The basic promises: get, put and delete with their revisions, binary
//! values, ranges by prefix, and the single-writer create-if-absent and
//! compare-and-swap.

use std::sync::Arc;

use super::support::{current_revision, latest_state, unique_prefix, value_of};
use crate::{Compare, KeyValue, KvStore, Op, StoreError, Txn};

pub async fn empty_key_is_invalid(store: Arc<dyn KvStore>) {
    let invalid = |r: Result<(), StoreError>, what: &str| match r {
        Err(StoreError::Invalid(_)) => {}
        other => panic!("{what} with an empty key: expected Invalid, got {other:?}"),
    };
    invalid(store.get("").await.map(drop), "get");
    invalid(store.put("", b"v".to_vec()).await.map(drop), "put");
    invalid(store.delete("").await.map(drop), "delete");
    invalid(
        store.create_if_absent("", b"v".to_vec()).await.map(drop),
        "create_if_absent",
    );
    let p = unique_prefix("empty_key_is_invalid");
    let ok_key = format!("{p}ok");
    // A bad op anywhere rejects the whole txn, even in the branch not taken.
    invalid(
        store
            .txn(
                Txn::new()
                    .when(vec![Compare::absent(&ok_key)])
                    .and_then(vec![Op::put(&ok_key, b"v".to_vec())])
                    .or_else(vec![Op::get("")]),
            )
            .await
            .map(drop),
        "txn with an empty key in the failure branch",
    );
    invalid(
        store
            .txn(Txn::new().when(vec![Compare::absent("")]))
            .await
            .map(drop),
        "compare",
    );
    assert_eq!(
        store.get(&ok_key).await.expect("get"),
        None,
        "a rejected txn must not apply anything"
    );
}

pub async fn get_put_delete(store: Arc<dyn KvStore>) {
    let p = unique_prefix("get_put_delete");
    let key = format!("{p}k");
    assert_eq!(store.get(&key).await.expect("get"), None);

    let r1 = store.put(&key, b"one".to_vec()).await.expect("put");
    assert!(r1 > 0, "revisions start above 0, got {r1}");
    let kv = store.get(&key).await.expect("get").expect("key after put");
    assert_eq!(
        kv,
        KeyValue {
            key: key.clone(),
            value: b"one".to_vec(),
            create_revision: r1,
            mod_revision: r1,
            lease: None,
        }
    );

    let r2 = store.put(&key, b"two".to_vec()).await.expect("put");
    assert!(r2 > r1, "second put revision {r2} must exceed {r1}");
    let kv = store.get(&key).await.expect("get").expect("key");
    assert_eq!(
        (kv.value.as_slice(), kv.create_revision, kv.mod_revision),
        (&b"two"[..], r1, r2)
    );

    // Binary values round-trip untouched.
    let binary: Vec<u8> = (0..=255u8).collect();
    let r3 = store.put(&key, binary.clone()).await.expect("put");
    assert_eq!(
        store.get(&key).await.expect("get").map(|kv| kv.value),
        Some(binary)
    );

    assert!(store.delete(&key).await.expect("delete"), "delete existing");
    assert_eq!(store.get(&key).await.expect("get"), None);
    let after_delete = current_revision(&*store).await;
    assert!(after_delete > r3, "a delete is a write");
    assert!(
        !store.delete(&key).await.expect("delete"),
        "delete of an absent key reports false"
    );

    let r4 = store.put(&key, b"again".to_vec()).await.expect("put");
    let kv = store.get(&key).await.expect("get").expect("key");
    assert!(r4 > after_delete);
    assert_eq!(
        (kv.create_revision, kv.mod_revision),
        (r4, r4),
        "a key recreated after a delete starts a new life"
    );
}

pub async fn revisions_increase(store: Arc<dyn KvStore>) {
    let p = unique_prefix("revisions_increase");
    let mut last = current_revision(&*store).await;
    for i in 0..20 {
        let rev = store
            .put(&format!("{p}{}", i % 3), vec![i])
            .await
            .expect("put");
        assert!(rev > last, "put {i}: revision {rev} after {last}");
        assert_eq!(
            current_revision(&*store).await,
            rev,
            "range reports the store revision"
        );
        last = rev;
    }
    // Writes that change nothing do not take a revision.
    assert!(!store.delete(&format!("{p}absent")).await.expect("delete"));
    let resp = store
        .txn(Txn::new().and_then(vec![
            Op::get(format!("{p}0")),
            Op::delete(format!("{p}absent")),
            Op::delete_prefix(format!("{p}nothing/")),
        ]))
        .await
        .expect("read-only txn");
    assert!(resp.succeeded);
    assert_eq!(
        resp.revision, last,
        "a txn that wrote nothing reports the current revision"
    );
    assert_eq!(
        current_revision(&*store).await,
        last,
        "no-op writes do not bump the revision"
    );
    let resp = store
        .txn(
            Txn::new()
                .when(vec![Compare::absent(format!("{p}0"))])
                .and_then(vec![Op::put(format!("{p}x"), b"x".to_vec())]),
        )
        .await
        .expect("failing txn without failure ops");
    assert!(!resp.succeeded);
    assert_eq!(resp.revision, last);
    assert_eq!(current_revision(&*store).await, last);
}

pub async fn range_by_prefix(store: Arc<dyn KvStore>) {
    let p = unique_prefix("range_by_prefix");
    let dir = format!("{p}dir/");
    let inside = ["m", "a", "z/deep", "b"];
    let outside = [format!("{p}dir"), format!("{p}dirt"), format!("{p}di")];
    let mut last = 0;
    for name in inside {
        last = store
            .put(&format!("{dir}{name}"), name.as_bytes().to_vec())
            .await
            .expect("put");
    }
    let last_inside = last;
    for key in &outside {
        last = store.put(key, b"out".to_vec()).await.expect("put");
    }
    let resp = store.range(&dir).await.expect("range");
    let keys: Vec<&str> = resp.kvs.iter().map(|kv| kv.key.as_str()).collect();
    let want: Vec<String> = ["a", "b", "m", "z/deep"]
        .iter()
        .map(|n| format!("{dir}{n}"))
        .collect();
    assert_eq!(keys, want, "exactly the prefixed keys, sorted");
    for kv in &resp.kvs {
        assert_eq!(
            kv.value,
            &kv.key.as_bytes()[dir.len()..],
            "value of {}",
            kv.key
        );
        assert!(kv.mod_revision > 0 && kv.create_revision == kv.mod_revision);
    }
    if latest_state(&*store) {
        assert_eq!(
            resp.revision, last_inside,
            "range reports the latest change under the prefix"
        );
    } else {
        assert_eq!(resp.revision, last, "range reports the store revision");
    }
    assert!(store
        .range(&format!("{p}nothing-here/"))
        .await
        .expect("range")
        .kvs
        .is_empty());
    // The whole check's keys, through the parent prefix.
    assert_eq!(store.range(&p).await.expect("range").kvs.len(), 7);
}

pub async fn create_if_absent(store: Arc<dyn KvStore>) {
    let p = unique_prefix("create_if_absent");
    let key = format!("{p}k");
    assert_eq!(
        store
            .create_if_absent(&key, b"first".to_vec())
            .await
            .expect("create"),
        None,
        "created"
    );
    let existing = store
        .create_if_absent(&key, b"second".to_vec())
        .await
        .expect("create")
        .expect("second create reports the existing key");
    assert_eq!(existing.value, b"first");
    let kv = store.get(&key).await.expect("get").expect("key");
    assert_eq!(kv, existing, "the losing create changed nothing");

    store.delete(&key).await.expect("delete");
    assert_eq!(
        store
            .create_if_absent(&key, b"third".to_vec())
            .await
            .expect("create"),
        None,
        "created again after delete"
    );
    assert_eq!(
        value_of(&store.get(&key).await.expect("get")),
        Some(&b"third"[..])
    );
}

pub async fn compare_and_swap(store: Arc<dyn KvStore>) {
    let p = unique_prefix("compare_and_swap");
    let key = format!("{p}k");
    // 0 means "only if absent".
    let r1 = store
        .compare_and_swap(&key, 0, b"v1".to_vec())
        .await
        .expect("cas")
        .expect("cas on absent key with 0 wins");
    let current = store.get(&key).await.expect("get");
    assert_eq!(current.as_ref().map(|kv| kv.mod_revision), Some(r1));

    let lost = store
        .compare_and_swap(&key, 0, b"nope".to_vec())
        .await
        .expect("cas");
    assert_eq!(lost, Err(current.clone()), "0 loses once the key exists");

    let lost = store
        .compare_and_swap(&key, r1 + 1000, b"nope".to_vec())
        .await
        .expect("cas");
    assert_eq!(lost, Err(current.clone()), "a wrong revision loses");

    let r2 = store
        .compare_and_swap(&key, r1, b"v2".to_vec())
        .await
        .expect("cas")
        .expect("the right revision wins");
    assert!(r2 > r1);
    let kv = store.get(&key).await.expect("get").expect("key");
    assert_eq!(
        (kv.value.as_slice(), kv.create_revision, kv.mod_revision),
        (&b"v2"[..], r1, r2)
    );

    let lost = store
        .compare_and_swap(&key, r1, b"stale".to_vec())
        .await
        .expect("cas");
    assert_eq!(lost, Err(Some(kv)), "a stale revision loses");

    store.delete(&key).await.expect("delete");
    let lost = store
        .compare_and_swap(&key, r2, b"gone".to_vec())
        .await
        .expect("cas");
    assert_eq!(lost, Err(None), "CAS on a deleted key reports it absent");
    assert_eq!(store.get(&key).await.expect("get"), None);
}
