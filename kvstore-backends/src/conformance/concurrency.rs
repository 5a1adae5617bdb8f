//! Racing writers: of concurrent compare-and-swaps on one key exactly one
//! wins each round, and a counter incremented by many tasks loses nothing.

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use tokio::sync::Barrier;

use super::support::unique_prefix;
use crate::KvStore;

pub async fn cas_race_has_one_winner(store: Arc<dyn KvStore>) {
    const TASKS: usize = 20;
    const ROUNDS: usize = 5;
    let p = unique_prefix("cas_race");
    let key = format!("{p}k");
    let mut expected_rev = 0;
    for round in 0..ROUNDS {
        let barrier = Arc::new(Barrier::new(TASKS));
        let mut tasks = Vec::new();
        for t in 0..TASKS {
            let (store, key, barrier) = (Arc::clone(&store), key.clone(), Arc::clone(&barrier));
            tasks.push(tokio::spawn(async move {
                let value = format!("round {round} task {t}").into_bytes();
                barrier.wait().await;
                let outcome = store
                    .compare_and_swap(&key, expected_rev, value.clone())
                    .await
                    .expect("cas");
                (value, outcome)
            }));
        }
        let mut winners = Vec::new();
        let mut losers = Vec::new();
        for task in tasks {
            let (value, outcome) = task.await.expect("task");
            match outcome {
                Ok(rev) => winners.push((value, rev)),
                Err(current) => losers.push(current),
            }
        }
        assert_eq!(winners.len(), 1, "round {round}: exactly one CAS wins");
        let (value, rev) = winners.pop().expect("winner");
        let kv = store.get(&key).await.expect("get").expect("key");
        assert_eq!(
            (kv.value.as_slice(), kv.mod_revision),
            (value.as_slice(), rev)
        );
        for current in losers {
            assert_eq!(
                current.as_ref(),
                Some(&kv),
                "round {round}: a loser sees the winner's write"
            );
        }
        expected_rev = rev;
    }
}

pub async fn cas_counter_is_exact(store: Arc<dyn KvStore>) {
    const TASKS: usize = 16;
    const INCREMENTS: usize = 50;
    let p = unique_prefix("cas_counter");
    let key = format!("{p}counter");
    let wins = Arc::new(AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for _ in 0..TASKS {
        let (store, key, wins) = (Arc::clone(&store), key.clone(), Arc::clone(&wins));
        tasks.push(tokio::spawn(async move {
            let mut revisions = Vec::new();
            for _ in 0..INCREMENTS {
                let mut current = store.get(&key).await.expect("get");
                loop {
                    let (n, rev) = match &current {
                        Some(kv) => {
                            let n: u64 = std::str::from_utf8(&kv.value)
                                .expect("utf8")
                                .parse()
                                .expect("number");
                            (n, kv.mod_revision)
                        }
                        None => (0, 0),
                    };
                    match store
                        .compare_and_swap(&key, rev, (n + 1).to_string().into_bytes())
                        .await
                    {
                        Ok(Ok(new_rev)) => {
                            revisions.push(new_rev);
                            wins.fetch_add(1, Ordering::Relaxed);
                            break;
                        }
                        // Lost the race: retry from what the winner wrote.
                        Ok(Err(now)) => current = now,
                        Err(e) if e.is_transient() => {
                            current = store.get(&key).await.expect("get");
                        }
                        Err(e) => panic!("cas failed: {e}"),
                    }
                }
            }
            revisions
        }));
    }
    let mut all_revisions = BTreeSet::new();
    for task in tasks {
        for rev in task.await.expect("task") {
            assert!(all_revisions.insert(rev), "revision {rev} won twice");
        }
    }
    let total = TASKS * INCREMENTS;
    assert_eq!(wins.load(Ordering::Relaxed), total);
    let kv = store.get(&key).await.expect("get").expect("counter");
    assert_eq!(
        kv.value,
        total.to_string().into_bytes(),
        "no lost increments"
    );
    assert_eq!(all_revisions.last().copied(), Some(kv.mod_revision));
}
