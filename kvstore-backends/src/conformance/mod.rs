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
//! [`WatchFidelity`](crate::WatchFidelity): exact event sequences for `EveryChange`, and for
//! `LatestState` (Consul) what that promises: ordered, never repeated,
//! converging on the store's state, past starts refused as compacted. Lease TTLs are whole seconds (2 s) so
//! that etcd and Consul, which count in seconds, can pass too.
//!
//! The checks are grouped by what they promise, one file each: `kv` (get,
//! put, delete, range, revisions, create-if-absent, compare-and-swap),
//! `concurrency` (racing compare-and-swaps), `txn`, `watch` and `lease`;
//! `support` holds what they share (unique prefixes, waiting for events,
//! sentinels, the latest-state convergence check). This file holds the
//! fixture trait, the list of checks, the macros and [`run_all`].

mod concurrency;
mod kv;
mod lease;
mod support;
mod txn;
mod watch;

use std::future::Future;
use std::sync::Arc;

use futures::future::BoxFuture;

use crate::KvStore;

// Every check, where the list and the macros below name them:
// `conformance::<check>`.
pub use self::concurrency::*;
pub use self::kv::*;
pub use self::lease::*;
pub use self::txn::*;
pub use self::watch::*;

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
            lease_renewal_reports_the_revision
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
