//! The conformance suite and file-specific behaviour of `RedbStore`.

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use kvstore_backends::{KvStore, Op, RedbStore, StoreError, Txn};

kvstore_backends::conformance_tests!({
    let dir = tempfile::tempdir().expect("tempdir");
    let store = RedbStore::open(dir.path().join("store.redb")).expect("open");
    // The directory lives as long as the store (dropped after it).
    (Arc::new(store), dir)
});

/// The next watch item, or a failure instead of a hang.
async fn next(
    watch: &mut kvstore_backends::WatchStream,
) -> Option<kvstore_backends::Result<kvstore_backends::WatchEvent>> {
    tokio::time::timeout(
        std::time::Duration::from_secs(10),
        futures::StreamExt::next(watch),
    )
    .await
    .expect("no watch item within 10 s")
}

#[tokio::test(flavor = "multi_thread")]
async fn data_and_revision_survive_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("nested/dirs/store.redb");
    let (kept, lease, last_rev) = {
        let store = RedbStore::open(&path).unwrap();
        assert_eq!(store.path(), path);
        store.put("a", b"1".to_vec()).await.unwrap();
        store.put("a", b"2".to_vec()).await.unwrap();
        store.put("b", b"gone".to_vec()).await.unwrap();
        store.delete("b").await.unwrap();
        let lease = store.grant_lease(Duration::from_secs(60)).await.unwrap();
        let last = store
            .txn(Txn::new().and_then(vec![
                Op::put_with_lease("leased", b"l".to_vec(), lease.clone()),
                Op::put("bin", vec![0, 255, 1]),
            ]))
            .await
            .unwrap()
            .revision;
        (store.range("").await.unwrap(), lease, last)
    };
    assert_eq!(kept.revision, last_rev);

    let store = RedbStore::open(&path).unwrap();
    let reopened = store.range("").await.unwrap();
    assert_eq!(
        reopened, kept,
        "keys, values, revisions and leases are back"
    );
    assert_eq!(store.get("b").await.unwrap(), None);

    // Revisions keep increasing, history before the open is gone.
    let rev = store.put("c", b"3".to_vec()).await.unwrap();
    assert_eq!(rev, last_rev + 1);
    match store.watch("", last_rev).await.map(drop) {
        Err(StoreError::Compacted { requested, oldest }) => {
            assert_eq!((requested, oldest), (last_rev, last_rev + 1));
        }
        other => panic!("expected Compacted, got {other:?}"),
    }
    let mut watch = store.watch("", last_rev + 1).await.unwrap();
    assert_eq!(next(&mut watch).await.unwrap().unwrap().kv.key, "c");

    // The lease survived with its keys, and new leases get new ids.
    store.keep_alive(lease.clone()).await.unwrap();
    let newer = store.grant_lease(Duration::from_secs(60)).await.unwrap();
    assert_ne!(newer, lease);
    store.revoke_lease(lease).await.unwrap();
    assert_eq!(store.get("leased").await.unwrap(), None);
    drop(store);

    let store = RedbStore::open(&path).unwrap();
    assert_eq!(
        store.get("leased").await.unwrap(),
        None,
        "the revoke was persisted"
    );
    assert_eq!(store.range("").await.unwrap().revision, last_rev + 2);
}

#[tokio::test(flavor = "multi_thread")]
async fn leases_restart_their_ttl_after_reopen_then_expire() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("store.redb");
    {
        let store = RedbStore::open(&path).unwrap();
        let lease = store.grant_lease(Duration::from_secs(1)).await.unwrap();
        store
            .txn(Txn::new().and_then(vec![Op::put_with_lease("k", b"v".to_vec(), lease)]))
            .await
            .unwrap();
    }
    let store = RedbStore::open(&path).unwrap();
    let start = store.range("").await.unwrap().revision + 1;
    let mut watch = store.watch("", start).await.unwrap();
    // Bounded wait for the expiry, which must also be persisted.
    let ev = tokio::time::timeout(Duration::from_secs(10), watch.next())
        .await
        .expect("lease expired")
        .unwrap()
        .unwrap();
    assert_eq!((ev.kv.key.as_str(), ev.revision()), ("k", start));
    assert_eq!(store.get("k").await.unwrap(), None);
    drop(store);
    let store = RedbStore::open(&path).unwrap();
    assert_eq!(store.get("k").await.unwrap(), None);
    assert!(store.range("").await.unwrap().kvs.is_empty());
}

#[tokio::test]
async fn a_second_open_of_the_same_file_fails_clearly() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("store.redb");
    let first = RedbStore::open(&path).unwrap();
    let err = RedbStore::open(&path).expect_err("the file is locked");
    let msg = err.to_string();
    assert!(
        msg.contains("locked") && msg.contains("store.redb"),
        "{msg}"
    );
    assert!(matches!(err, StoreError::Backend { .. }));
    drop(first);
    // Dropping the store releases the lock at once.
    RedbStore::open(&path).expect("reopen after drop");
}

#[tokio::test]
async fn unreadable_files_are_errors() {
    let dir = tempfile::tempdir().unwrap();
    let garbage = dir.path().join("garbage.redb");
    std::fs::write(&garbage, vec![0x5a; 64 * 1024]).unwrap();
    let err = RedbStore::open(&garbage).expect_err("not a redb file");
    assert!(err.to_string().contains("garbage.redb"), "{err}");

    // A directory where the file should be.
    let err = RedbStore::open(dir.path()).expect_err("a directory");
    assert!(err.to_string().contains("opening store file"), "{err}");

    // A parent that cannot be created (it is a file).
    let err = RedbStore::open(garbage.join("store.redb")).expect_err("parent is a file");
    assert!(err.to_string().contains("creating directory"), "{err}");
}
