//! The promises every backend keeps, as one suite of checks.
//!
//! Each check is a `pub async fn(Arc<dyn KvStore>)` that panics on a broken
//! promise. A backend's test file runs them all with
//! [`conformance_tests!`](crate::conformance_tests), which makes one
//! `#[tokio::test]` per check (the calling crate needs `tokio` with the
//! `macros` and `rt-multi-thread` features), or with [`run_all`].
//!
//! Contract for the store a check gets: nobody else writes to it while the
//! check runs (the checks assert exact revisions). Fresh stores are simplest;
//! every check also keeps to its own unique key prefix.
//!
//! Waits are bounded so that a broken backend fails instead of hanging, and
//! nothing asserts how fast anything is.
//!
//! Revisions are only promised to increase, not to be consecutive (Consul's
//! raft index also counts sessions and catalog writes), so no check expects
//! the next write at `current + 1`. Watch checks follow the backend's
//! [`WatchFidelity`]: exact event sequences for `EveryChange`, and for
//! `LatestState` (Consul) what that promises: ordered, never repeated,
//! converging on the store's state, past starts refused as compacted. Lease TTLs are whole seconds (2 s) so
//! that etcd and Consul, which count in seconds, can pass too.

use std::collections::BTreeSet;
use std::future::Future;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures::future::BoxFuture;
use futures::StreamExt;
use tokio::sync::Barrier;

use crate::{
    Compare, EventKind, KeyValue, KvStore, Op, OpResult, Revision, StoreError, Txn, WatchEvent,
    WatchFidelity, WatchStream,
};

/// Upper bound for anything that should happen "soon" (events, expiries).
/// Only there to turn a hang into a failure.
const PATIENCE: Duration = Duration::from_secs(30);
const LEASE_TTL: Duration = Duration::from_secs(2);

/// What a store factory returns: the store, possibly with something that must
/// live as long as it (e.g. `(Arc<RedbStore>, TempDir)`).
pub trait StoreFixture {
    fn store(&self) -> Arc<dyn KvStore>;
}

impl StoreFixture for Arc<dyn KvStore> {
    fn store(&self) -> Arc<dyn KvStore> {
        Arc::clone(self)
    }
}

impl<S: KvStore> StoreFixture for Arc<S> {
    fn store(&self) -> Arc<dyn KvStore> {
        Arc::clone(self) as Arc<dyn KvStore>
    }
}

impl<F: StoreFixture, G> StoreFixture for (F, G) {
    fn store(&self) -> Arc<dyn KvStore> {
        self.0.store()
    }
}

pub type Check = fn(Arc<dyn KvStore>) -> BoxFuture<'static, ()>;

/// The list of checks, in one place for both [`CHECKS`] and
/// [`conformance_tests!`](crate::conformance_tests): it calls back `$cb` with
/// the extra tokens in brackets, then every check name.
#[doc(hidden)]
#[macro_export]
macro_rules! __kvstore_conformance_checks {
    ($cb:ident; $($args:tt)*) => {
        $crate::$cb! {
            [$($args)*]
            empty_key_is_invalid
            get_put_delete
            revisions_increase
            range_by_prefix
            create_if_absent
            compare_and_swap
            cas_race_has_one_winner
            cas_counter_is_exact
            txn_failure_applies_nothing
            txn_success_applies_all_at_one_revision
            txn_delete_prefix
            txn_writing_a_key_twice_is_invalid
            watch_sees_every_change_in_order
            watch_concurrent_writers_and_late_start
            watch_replays_history
            watch_filters_by_prefix
            lease_expiry_deletes_keys
            lease_keep_alive_keeps_keys
            lease_revoke_deletes_at_once
            lease_expired_put_fails
            lease_put_without_lease_detaches
        }
    };
}

#[doc(hidden)]
#[macro_export]
macro_rules! __kvstore_conformance_table {
    ([] $($name:ident)*) => {
        /// Every check with its name, for [`run_all`] or custom runners.
        pub const CHECKS: &[(&str, Check)] = &[
            $((stringify!($name), |store| -> BoxFuture<'static, ()> { Box::pin($name(store)) }),)*
        ];
    };
}

__kvstore_conformance_checks!(__kvstore_conformance_table;);

#[doc(hidden)]
#[macro_export]
macro_rules! __kvstore_conformance_tests {
    ([$make:expr] $($name:ident)*) => {
        $(
            #[::tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn $name() {
                let fixture = $make;
                let store = $crate::conformance::StoreFixture::store(&fixture);
                $crate::conformance::$name(store).await;
            }
        )*
    };
}

/// Expands to one `#[tokio::test]` per conformance check. `$make` is evaluated
/// in each test (it may use `.await`) and must give a fresh
/// [`StoreFixture`](crate::conformance::StoreFixture):
///
/// ```ignore
/// kvstore_backends::conformance_tests!(Arc::new(MemoryStore::new()));
/// ```
#[macro_export]
macro_rules! conformance_tests {
    ($make:expr) => {
        $crate::__kvstore_conformance_checks!(__kvstore_conformance_tests; $make);
    };
}

/// Runs every check in turn, each on a fresh store from `make_store`.
pub async fn run_all<F, Fut, X>(mut make_store: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = X>,
    X: StoreFixture,
{
    for (name, check) in CHECKS {
        let fixture = make_store().await;
        eprintln!("conformance check {name}");
        check(fixture.store()).await;
    }
}

// ---------------------------------------------------------------- helpers

/// A key prefix no other check (or earlier run on a shared store) uses.
fn unique_prefix(check: &str) -> String {
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

async fn next_event(stream: &mut WatchStream, what: &str) -> WatchEvent {
    match tokio::time::timeout(PATIENCE, stream.next()).await {
        Ok(Some(Ok(ev))) => ev,
        Ok(Some(Err(e))) => panic!("{what}: watch failed: {e}"),
        Ok(None) => panic!("{what}: watch ended"),
        Err(_) => panic!("{what}: no event within {PATIENCE:?}"),
    }
}

async fn collect(stream: &mut WatchStream, n: usize, what: &str) -> Vec<WatchEvent> {
    let mut out = Vec::with_capacity(n);
    for i in 0..n {
        out.push(next_event(stream, &format!("{what} (event {i} of {n})")).await);
    }
    out
}

/// (key, kind, revision, value): what a watcher must reproduce exactly.
type Seen = (String, EventKind, Revision, Vec<u8>);

fn seen(ev: &WatchEvent) -> Seen {
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
async fn expect_sentinel_next_all(
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

async fn expect_sentinel_next(store: &dyn KvStore, stream: &mut WatchStream, prefix: &str) {
    expect_sentinel_next_all(store, &mut [stream], prefix).await;
}

async fn wait_until_absent(store: &dyn KvStore, key: &str, within: Duration) {
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

async fn current_revision(store: &dyn KvStore) -> Revision {
    // A prefix nobody uses still reports the store revision.
    store
        .range("/conformance-revision-probe/")
        .await
        .expect("range")
        .revision
}

/// Keeps no history and reports latest states (Consul).
fn latest_state(store: &dyn KvStore) -> bool {
    store.watch_fidelity() == WatchFidelity::LatestState
}

/// A watch from `start` must fail with Compacted, at the call or as the
/// stream's first item.
async fn expect_compacted(store: &dyn KvStore, prefix: &str, start: Revision, what: &str) {
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
async fn expect_convergence(
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

fn value_of(kv: &Option<KeyValue>) -> Option<&[u8]> {
    kv.as_ref().map(|kv| kv.value.as_slice())
}

// ---------------------------------------------------------------- checks

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

pub async fn lease_expiry_deletes_keys(store: Arc<dyn KvStore>) {
    let p = unique_prefix("lease_expiry");
    let (leased, plain) = (format!("{p}leased"), format!("{p}plain"));
    let lease = store.grant_lease(LEASE_TTL).await.expect("grant");
    let start = current_revision(&*store).await + 1;
    let mut watch = store.watch(&p, start).await.expect("watch");
    let r = store
        .txn(Txn::new().and_then(vec![
            Op::put_with_lease(&leased, b"v".to_vec(), lease.clone()),
            Op::put(&plain, b"v".to_vec()),
        ]))
        .await
        .expect("put")
        .revision;
    let kv = store.get(&leased).await.expect("get").expect("leased key");
    assert_eq!(kv.lease.as_ref(), Some(&lease), "the key reports its lease");
    assert_eq!(kv.mod_revision, r);

    // Nobody touches the store meanwhile: expiry must happen on its own.
    wait_until_absent(&*store, &leased, LEASE_TTL * 3 + Duration::from_secs(2)).await;
    assert!(
        store.get(&plain).await.expect("get").is_some(),
        "unleased key stays"
    );

    let puts = collect(&mut watch, 2, "puts").await;
    assert!(puts
        .iter()
        .all(|e| e.kind == EventKind::Put && e.revision() == r));
    let ev = next_event(&mut watch, "expiry delete").await;
    assert_eq!(
        (ev.kv.key.as_str(), ev.kind),
        (leased.as_str(), EventKind::Delete)
    );
    assert!(ev.revision() > r);
    expect_sentinel_next(&*store, &mut watch, &p).await;
}

pub async fn lease_keep_alive_keeps_keys(store: Arc<dyn KvStore>) {
    let p = unique_prefix("lease_keep_alive");
    let key = format!("{p}k");
    let lease = store.grant_lease(LEASE_TTL).await.expect("grant");
    store
        .txn(Txn::new().and_then(vec![Op::put_with_lease(&key, b"v".to_vec(), lease.clone())]))
        .await
        .expect("put");
    // Renew at a quarter of the TTL for well over two TTLs.
    let until = tokio::time::Instant::now() + LEASE_TTL * 5 / 2;
    while tokio::time::Instant::now() < until {
        tokio::time::sleep(LEASE_TTL / 4).await;
        store.keep_alive(lease.clone()).await.expect("keep_alive");
        assert!(
            store.get(&key).await.expect("get").is_some(),
            "a renewed lease keeps its key"
        );
    }
    // Once renewals stop, it expires like any lease.
    wait_until_absent(&*store, &key, LEASE_TTL * 3 + Duration::from_secs(2)).await;
    match store.keep_alive(lease.clone()).await {
        Err(StoreError::LeaseNotFound(_)) => {}
        other => panic!("keep_alive of an expired lease: expected LeaseNotFound, got {other:?}"),
    }
}

pub async fn lease_revoke_deletes_at_once(store: Arc<dyn KvStore>) {
    let p = unique_prefix("lease_revoke");
    let lease = store
        .grant_lease(Duration::from_secs(60))
        .await
        .expect("grant");
    let other = store
        .grant_lease(Duration::from_secs(60))
        .await
        .expect("grant");
    assert_ne!(lease, other, "lease ids are unique");
    let leased: Vec<String> = (0..3).map(|i| format!("{p}leased/{i}")).collect();
    let mut ops: Vec<Op> = leased
        .iter()
        .map(|k| Op::put_with_lease(k, b"v".to_vec(), lease.clone()))
        .collect();
    ops.push(Op::put(format!("{p}plain"), b"v".to_vec()));
    ops.push(Op::put_with_lease(
        format!("{p}other"),
        b"v".to_vec(),
        other.clone(),
    ));
    store.txn(Txn::new().and_then(ops)).await.expect("put");
    let start = current_revision(&*store).await + 1;
    let mut watch = store.watch(&p, start).await.expect("watch");

    store.revoke_lease(lease.clone()).await.expect("revoke");
    // At once: no waiting.
    for key in &leased {
        assert_eq!(
            store.get(key).await.expect("get"),
            None,
            "{key} deleted by revoke"
        );
    }
    assert!(store
        .get(&format!("{p}plain"))
        .await
        .expect("get")
        .is_some());
    assert!(store
        .get(&format!("{p}other"))
        .await
        .expect("get")
        .is_some());
    let mut events: Vec<(String, EventKind, Revision)> = collect(&mut watch, 3, "revoke deletes")
        .await
        .into_iter()
        .map(|e| (e.kv.key, e.kind, e.kv.mod_revision))
        .collect();
    events.sort_by(|x, y| x.0.cmp(&y.0));
    let rev = events[0].2;
    assert!(
        rev >= start,
        "revision {rev} before the watch's start {start}"
    );
    let want: Vec<_> = leased
        .iter()
        .map(|k| (k.clone(), EventKind::Delete, rev))
        .collect();
    assert_eq!(events, want, "one delete per key, all at one revision");
    expect_sentinel_next(&*store, &mut watch, &p).await;

    store
        .revoke_lease(lease.clone())
        .await
        .expect("revoking twice is not an error");
    match store.keep_alive(lease.clone()).await {
        Err(StoreError::LeaseNotFound(_)) => {}
        other => panic!("keep_alive of a revoked lease: expected LeaseNotFound, got {other:?}"),
    }
    let late = format!("{p}late");
    match store
        .txn(Txn::new().and_then(vec![
            Op::put(format!("{p}late-plain"), b"v".to_vec()),
            Op::put_with_lease(&late, b"v".to_vec(), lease.clone()),
        ]))
        .await
    {
        Err(StoreError::LeaseNotFound(_)) => {}
        other => panic!("put with a revoked lease: expected LeaseNotFound, got {other:?}"),
    }
    assert_eq!(store.get(&late).await.expect("get"), None);
    assert_eq!(
        store.get(&format!("{p}late-plain")).await.expect("get"),
        None,
        "the txn with a bad lease applied nothing"
    );
    store
        .keep_alive(other.clone())
        .await
        .expect("the other lease lives");
    store.revoke_lease(other).await.expect("revoke");
}

pub async fn lease_expired_put_fails(store: Arc<dyn KvStore>) {
    let p = unique_prefix("lease_expired_put");
    let key = format!("{p}k");
    let lease = store.grant_lease(LEASE_TTL).await.expect("grant");
    store
        .txn(Txn::new().and_then(vec![Op::put_with_lease(&key, b"v".to_vec(), lease.clone())]))
        .await
        .expect("put with a live lease");
    wait_until_absent(&*store, &key, LEASE_TTL * 3 + Duration::from_secs(2)).await;
    match store
        .txn(Txn::new().and_then(vec![Op::put_with_lease(
            &key,
            b"again".to_vec(),
            lease.clone(),
        )]))
        .await
    {
        Err(StoreError::LeaseNotFound(id)) => assert_eq!(id, lease.0),
        other => panic!("put with an expired lease: expected LeaseNotFound, got {other:?}"),
    }
    assert_eq!(store.get(&key).await.expect("get"), None);
    match store.keep_alive(lease).await {
        Err(StoreError::LeaseNotFound(_)) => {}
        other => panic!("keep_alive of an expired lease: expected LeaseNotFound, got {other:?}"),
    }
}

pub async fn lease_put_without_lease_detaches(store: Arc<dyn KvStore>) {
    let p = unique_prefix("lease_detach");
    let (moved, detached, stays) = (
        format!("{p}moved"),
        format!("{p}detached"),
        format!("{p}stays"),
    );
    let first = store
        .grant_lease(Duration::from_secs(60))
        .await
        .expect("grant");
    let second = store
        .grant_lease(Duration::from_secs(60))
        .await
        .expect("grant");
    store
        .txn(Txn::new().and_then(vec![
            Op::put_with_lease(&moved, b"v".to_vec(), first.clone()),
            Op::put_with_lease(&detached, b"v".to_vec(), first.clone()),
            Op::put_with_lease(&stays, b"v".to_vec(), first.clone()),
        ]))
        .await
        .expect("put");
    // Rewriting a key replaces its lease binding.
    store
        .txn(Txn::new().and_then(vec![
            Op::put_with_lease(&moved, b"v2".to_vec(), second.clone()),
            Op::put(&detached, b"v2".to_vec()),
            Op::put_with_lease(&stays, b"v2".to_vec(), first.clone()),
        ]))
        .await
        .expect("rewrite");
    assert_eq!(
        store
            .get(&detached)
            .await
            .expect("get")
            .and_then(|kv| kv.lease),
        None
    );
    assert_eq!(
        store
            .get(&moved)
            .await
            .expect("get")
            .and_then(|kv| kv.lease),
        Some(second.clone())
    );
    store.revoke_lease(first).await.expect("revoke first");
    assert_eq!(
        store.get(&stays).await.expect("get"),
        None,
        "still on the first lease"
    );
    assert!(
        store.get(&moved).await.expect("get").is_some(),
        "moved to the second lease"
    );
    assert!(
        store.get(&detached).await.expect("get").is_some(),
        "no lease any more"
    );
    store.revoke_lease(second).await.expect("revoke second");
    assert_eq!(store.get(&moved).await.expect("get"), None);
    assert!(store.get(&detached).await.expect("get").is_some());
}
