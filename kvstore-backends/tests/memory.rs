//! The conformance suite and memory-specific behaviour of `MemoryStore`.

use std::sync::Arc;

use kvstore_backends::{KvStore, MemoryStore, Op, StoreError, Txn};

kvstore_backends::conformance_tests!(Arc::new(MemoryStore::new()));

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

#[tokio::test]
async fn run_all_runs_every_check() {
    // The plain-function runner, for callers that cannot use the macro.
    // Only the quick checks, to keep the test run short.
    for (name, check) in kvstore_backends::conformance::CHECKS {
        if !name.starts_with("lease_") {
            check(Arc::new(MemoryStore::new())).await;
        }
    }
}

#[tokio::test]
async fn watch_before_kept_history_is_compacted() {
    let store = MemoryStore::with_history_limit(5);
    for i in 1..=10u8 {
        assert_eq!(store.put("k", vec![i]).await.unwrap(), i64::from(i));
    }
    // Revisions 6..=10 are kept: 6 is the oldest start that works.
    for start in [1, 5] {
        match store.watch("", start).await.map(drop) {
            Err(StoreError::Compacted { requested, oldest }) => {
                assert_eq!((requested, oldest), (start, 6));
            }
            other => panic!("watch from {start}: expected Compacted, got {other:?}"),
        }
    }
    let mut watch = store.watch("", 6).await.unwrap();
    for rev in 6..=10 {
        let ev = next(&mut watch).await.unwrap().unwrap();
        assert_eq!(ev.revision(), rev);
    }
    // Revision 0 (from now) and future starts are always fine.
    drop(store.watch("", 0).await.unwrap());
    drop(store.watch("", 100).await.unwrap());
}

#[tokio::test]
async fn history_of_a_fresh_store_is_complete() {
    let store = MemoryStore::new();
    for i in 0..100u8 {
        store.put(&format!("k{}", i % 4), vec![i]).await.unwrap();
    }
    let mut watch = store.watch("", 1).await.unwrap();
    let mut revs = Vec::new();
    for _ in 0..100 {
        revs.push(next(&mut watch).await.unwrap().unwrap().revision());
    }
    assert_eq!(revs, (1..=100).collect::<Vec<_>>());
}

#[tokio::test]
async fn a_lagging_watch_ends_with_an_error_not_a_gap() {
    let store = MemoryStore::new();
    let mut watch = store.watch("", 0).await.unwrap();
    // Far more writes than a live watcher may fall behind, without reading.
    const WRITES: i64 = 10_000;
    for i in 0..WRITES {
        store.put("k", i.to_le_bytes().to_vec()).await.unwrap();
    }
    let mut expected = 1;
    loop {
        match next(&mut watch).await {
            Some(Ok(ev)) => {
                assert_eq!(ev.revision(), expected, "no gap before the error");
                expected += 1;
            }
            Some(Err(StoreError::Unavailable(msg))) => {
                assert!(msg.contains("behind"), "{msg}");
                break;
            }
            other => panic!("expected events then an error, got {other:?}"),
        }
    }
    assert!(expected <= WRITES, "the watch did fall behind");
    assert!(
        next(&mut watch).await.is_none(),
        "the error ends the stream"
    );
    // The caller recovers by watching again from the next revision.
    let mut again = store.watch("", expected).await.unwrap();
    assert_eq!(
        next(&mut again).await.unwrap().unwrap().revision(),
        expected
    );
}

#[tokio::test]
async fn watch_ends_when_the_store_is_dropped() {
    let store = MemoryStore::new();
    let mut watch = store.watch("", 0).await.unwrap();
    store.put("k", b"v".to_vec()).await.unwrap();
    drop(store);
    assert!(
        next(&mut watch).await.unwrap().is_ok(),
        "delivered before the drop"
    );
    assert!(matches!(
        next(&mut watch).await,
        Some(Err(StoreError::Unavailable(_)))
    ));
    assert!(next(&mut watch).await.is_none());
}

#[tokio::test]
async fn bad_requests_are_invalid_not_panics() {
    let store = MemoryStore::new();
    let invalid =
        |r: Result<(), StoreError>| assert!(matches!(r, Err(StoreError::Invalid(_))), "{r:?}");
    invalid(
        store
            .txn(Txn::new().and_then(vec![Op::delete_prefix("")]))
            .await
            .map(drop),
    );
    invalid(store.watch("", -1).await.map(drop));
    invalid(store.grant_lease(std::time::Duration::ZERO).await.map(drop));
    invalid(store.grant_lease(std::time::Duration::MAX).await.map(drop));
    match store
        .txn(Txn::new().and_then(vec![Op::put_with_lease(
            "k",
            b"v".to_vec(),
            kvstore_backends::LeaseId("no-such-lease".into()),
        )]))
        .await
    {
        Err(StoreError::LeaseNotFound(id)) => assert_eq!(id, "no-such-lease"),
        other => panic!("expected LeaseNotFound, got {other:?}"),
    }
    assert_eq!(
        store.range("").await.unwrap().revision,
        0,
        "nothing was written"
    );
}
