//! The reaper's census, kept in memory while this host holds the role
//! (`leader`): one full read of the store root when the role starts (and
//! after any gap in the watch, through `follow`), then only the watch's
//! changes. Each round
//! the reaper computes the census from this model without reading the
//! store, so its reads grow with the changes, not with the number of keys.
//! Following stops when the role ends, and with it the memory the model
//! took. What the model may be behind on (a change still on its way, a gap
//! not resynced yet) costs nothing unsafe: every reclaim write carries the
//! gone-host fence, and unbound addresses are freed only if their records
//! are unchanged and bound to no endpoint, both checked in the store.

use super::follow::{follow, Follower};
use crate::control::reclaim::{Census, CensusIndex};
use crate::state::keys;
use crate::util::task::spawn_supervised;
use async_trait::async_trait;
use kvstore_backends::{KvStore, RangeResponse, Revision, WatchEvent};
use std::sync::{Arc, Mutex, MutexGuard};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tracing::Instrument;

/// The model of one run of following, and the revision it is current to.
#[derive(Debug, Default)]
struct Model {
    index: CensusIndex,
    revision: Revision,
}

/// What the following task and the reaper share during one run.
struct Shared {
    /// `None` until the run's first full read.
    model: Mutex<Option<Model>>,
    /// Full reads of the root in this run.
    full_reads: watch::Sender<u64>,
}

impl Shared {
    fn model(&self) -> MutexGuard<'_, Option<Model>> {
        // A panic elsewhere while holding the lock leaves a model that is
        // still a set of decoded records: keep using it.
        self.model.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// One run: from the role's start to its end.
struct Run {
    shared: Arc<Shared>,
    full_reads: watch::Receiver<u64>,
    task: JoinHandle<()>,
}

/// The census model, followed while [`CensusFeed::start`]ed.
pub struct CensusFeed {
    store: Arc<dyn KvStore>,
    run: Option<Run>,
}

impl CensusFeed {
    pub fn new(store: Arc<dyn KvStore>) -> Self {
        CensusFeed { store, run: None }
    }

    /// Start following the store root, unless already following.
    pub fn start(&mut self) {
        if self.run.as_ref().is_some_and(|r| !r.task.is_finished()) {
            return;
        }
        let (full_reads_tx, full_reads) = watch::channel(0);
        let shared = Arc::new(Shared {
            model: Mutex::new(None),
            full_reads: full_reads_tx,
        });
        let store = self.store.clone();
        let for_task = shared.clone();
        let span = tracing::info_span!(parent: None, "census");
        let task = spawn_supervised("census", move || {
            let (store, shared) = (store.clone(), for_task.clone());
            async move {
                let mut follower = CensusFollower { shared };
                follow(store.as_ref(), keys::ROOT, &mut follower).await
            }
            .instrument(span.clone())
        });
        tracing::info!("following the store for the census while this host is the reaper");
        self.run = Some(Run {
            shared,
            full_reads,
            task,
        });
    }

    /// Stop following and drop the model. A new start reads the root again.
    pub fn stop(&mut self) {
        if let Some(run) = self.run.take() {
            run.task.abort();
            tracing::info!("stopped following the store for the census");
        }
    }

    pub fn is_following(&self) -> bool {
        self.run.as_ref().is_some_and(|r| !r.task.is_finished())
    }

    /// Whether the model holds a full read of this run.
    pub fn is_synced(&self) -> bool {
        self.run
            .as_ref()
            .is_some_and(|r| *r.full_reads.borrow() > 0)
    }

    /// Resolves once the model holds a full read of this run; never while
    /// not following. Cancel-safe.
    pub async fn synced(&mut self) {
        match self.run.as_mut() {
            Some(run) => {
                if run.full_reads.wait_for(|n| *n > 0).await.is_err() {
                    std::future::pending::<()>().await;
                }
            }
            None => std::future::pending().await,
        }
    }

    /// The census of the model, without a store read; `None` before the
    /// run's first full read.
    pub fn census(&self) -> Option<Census> {
        let run = self.run.as_ref()?;
        let model = run.shared.model();
        model.as_ref().map(|m| m.index.census())
    }

    /// The store revision the model is current to (`None` as for
    /// [`CensusFeed::census`]).
    pub fn revision(&self) -> Option<Revision> {
        let run = self.run.as_ref()?;
        let model = run.shared.model();
        model.as_ref().map(|m| m.revision)
    }

    /// Full reads of the root since the last start.
    pub fn full_reads(&self) -> u64 {
        self.run.as_ref().map_or(0, |r| *r.full_reads.borrow())
    }
}

impl Drop for CensusFeed {
    fn drop(&mut self) {
        if let Some(run) = self.run.take() {
            run.task.abort();
        }
    }
}

/// Keeps one run's model equal to the store root.
struct CensusFollower {
    shared: Arc<Shared>,
}

#[async_trait]
impl Follower for CensusFollower {
    async fn resync(&mut self, snapshot: RangeResponse) -> anyhow::Result<()> {
        {
            let mut model = self.shared.model();
            // The same index, so a record that cannot be read is not warned
            // about again after a gap.
            let model = model.get_or_insert_with(Model::default);
            model.index.resync(&snapshot.kvs);
            model.revision = snapshot.revision;
        }
        self.shared.full_reads.send_modify(|n| *n += 1);
        Ok(())
    }

    async fn apply(&mut self, event: WatchEvent) -> anyhow::Result<()> {
        if let Some(model) = self.shared.model().as_mut() {
            model.index.apply(&event);
            model.revision = model.revision.max(event.revision());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::control::reclaim::census;
    use crate::state::codec::encode;
    use crate::state::records::{
        AddressKind, AddressRecord, EndpointRecord, HostRecord, LocalNetwork, PoolRecord,
    };
    use futures::StreamExt;
    use kvstore_backends::{KeyValue, LeaseId, MemoryStore, Op, Txn, TxnResponse, WatchStream};
    use std::collections::BTreeMap;
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::time::Duration;

    /// A memory store that counts full reads of the root and open watches
    /// of it, and can end every open watch (a gap, as an outage makes).
    struct Observed {
        inner: Arc<MemoryStore>,
        root_reads: AtomicU64,
        open_watches: Arc<AtomicU64>,
        gaps: watch::Sender<u64>,
    }

    struct OpenWatch(Arc<AtomicU64>);

    impl Drop for OpenWatch {
        fn drop(&mut self) {
            self.0.fetch_sub(1, Ordering::SeqCst);
        }
    }

    impl Observed {
        fn new() -> Arc<Observed> {
            Arc::new(Observed {
                inner: Arc::new(MemoryStore::new()),
                root_reads: AtomicU64::new(0),
                open_watches: Arc::new(AtomicU64::new(0)),
                gaps: watch::channel(0).0,
            })
        }

        fn root_reads(&self) -> u64 {
            self.root_reads.load(Ordering::SeqCst)
        }

        fn open_watches(&self) -> u64 {
            self.open_watches.load(Ordering::SeqCst)
        }

        fn gap(&self) {
            self.gaps.send_modify(|n| *n += 1);
        }
    }

    #[async_trait]
    impl KvStore for Observed {
        fn backend_name(&self) -> &'static str {
            "observed"
        }
        async fn get(&self, key: &str) -> kvstore_backends::Result<Option<KeyValue>> {
            self.inner.get(key).await
        }
        async fn range(&self, prefix: &str) -> kvstore_backends::Result<RangeResponse> {
            if prefix == keys::ROOT {
                self.root_reads.fetch_add(1, Ordering::SeqCst);
            }
            self.inner.range(prefix).await
        }
        async fn txn(&self, txn: Txn) -> kvstore_backends::Result<TxnResponse> {
            self.inner.txn(txn).await
        }
        async fn watch(
            &self,
            prefix: &str,
            start: Revision,
        ) -> kvstore_backends::Result<WatchStream> {
            let stream = self.inner.watch(prefix, start).await?;
            if prefix != keys::ROOT {
                return Ok(stream);
            }
            self.open_watches.fetch_add(1, Ordering::SeqCst);
            let open = OpenWatch(self.open_watches.clone());
            let mut gaps = self.gaps.subscribe();
            let gap = async move {
                let _ = gaps.changed().await;
            };
            Ok(stream
                .take_until(gap)
                .map(move |e| {
                    let _open = &open;
                    e
                })
                .boxed())
        }
        async fn grant_lease(&self, ttl: Duration) -> kvstore_backends::Result<LeaseId> {
            self.inner.grant_lease(ttl).await
        }
        async fn keep_alive(
            &self,
            lease: LeaseId,
        ) -> kvstore_backends::Result<Option<kvstore_backends::Revision>> {
            self.inner.keep_alive(lease).await
        }
        async fn revoke_lease(&self, lease: LeaseId) -> kvstore_backends::Result<()> {
            self.inner.revoke_lease(lease).await
        }
    }

    async fn eventually(what: &str, mut check: impl FnMut() -> bool) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while !check() {
            assert!(tokio::time::Instant::now() < deadline, "never: {what}");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// Wait until the feed has seen the store as it is now, then compare
    /// its census with a full read's.
    async fn same_as_a_full_read(feed: &CensusFeed, store: &MemoryStore, step: &str) {
        let now = store.range(keys::ROOT).await.unwrap().revision;
        eventually(step, || feed.revision().is_some_and(|r| r >= now)).await;
        let full = census(store).await.unwrap();
        assert_eq!(feed.census().as_ref(), Some(&full), "after {step}");
    }

    /// One write of a small cluster's records, chosen by `n`: every kind
    /// the census reads, values it cannot read, and deletes.
    fn write(n: u64) -> (String, Txn) {
        let host = ["a", "b", "c"][(n % 3) as usize];
        let ip = format!("10.77.0.{}", 2 + (n / 3) % 4);
        let ep_id = format!("ep{}", (n / 3) % 4);
        let endpoint = EndpointRecord {
            endpoint_id: ep_id.clone(),
            network_id: format!("net-{host}"),
            host: host.into(),
            vtep: format!("192.0.2.{}", 1 + n % 3).parse().unwrap(),
            mac: "02:42:0a:4d:00:02".into(),
            ipv4: Some(format!("{ip}/24").parse().unwrap()),
            ipv6: None,
            created_at: 1,
            created_ms: 0,
        };
        let address = AddressRecord {
            host: host.into(),
            kind: if n.is_multiple_of(11) {
                AddressKind::Aux
            } else {
                AddressKind::Address
            },
            at: 1,
        };
        let net = LocalNetwork {
            network_id: format!("net-{host}"),
            overlay: "10.77.0.0_24".into(),
            vni: 256,
            subnets: vec!["10.77.0.0/24".parse().unwrap()],
            cluster: false,
        };
        let pool = PoolRecord {
            subnet: "10.77.0.0/24".parse().unwrap(),
            range: None,
            gateway: None,
            aux: Default::default(),
            refs: BTreeMap::from([(host.to_string(), (n % 3) as u32)]),
        };
        let registration = HostRecord {
            host: host.into(),
            vtep: endpoint.vtep,
            version: "test".into(),
        };
        let seg = "10.77.0.0_24";
        let ip: std::net::IpAddr = ip.parse().unwrap();
        let (what, op) = match (n / 7) % 10 {
            0 => (
                "register",
                Op::put(keys::host_registration(host), encode(&registration)),
            ),
            1 => ("unregister", Op::delete(keys::host_registration(host))),
            2 => (
                "network",
                Op::put(keys::host_network(host, &net.network_id), encode(&net)),
            ),
            3 => (
                "endpoint",
                Op::put(keys::endpoint(seg, &ep_id), encode(&endpoint)),
            ),
            4 => ("endpoint gone", Op::delete(keys::endpoint(seg, &ep_id))),
            5 => (
                "address",
                Op::put(keys::pool_addr(seg, ip), encode(&address)),
            ),
            6 => (
                "binding",
                Op::put(keys::pool_bound(seg, ip), ep_id.into_bytes()),
            ),
            7 => ("pool", Op::put(keys::pool_record(seg), encode(&pool))),
            8 => (
                "garbage",
                Op::put(keys::endpoint(seg, &ep_id), b"{not json".to_vec()),
            ),
            _ => ("pool gone", Op::delete_prefix(keys::pool_prefix(seg))),
        };
        (format!("write {n} ({what})"), Txn::new().and_then(vec![op]))
    }

    #[tokio::test]
    async fn the_census_of_the_model_equals_a_full_read_after_every_change() {
        let store = Observed::new();
        for n in 0..20 {
            store.inner.txn(write(n * 5).1).await.unwrap();
        }
        let mut feed = CensusFeed::new(store.clone());
        feed.start();
        same_as_a_full_read(&feed, &store.inner, "the first read").await;
        // Xorshift: the same long series of writes every run.
        let mut x: u64 = 0x2545_f491_4f6c_dd1d;
        for _ in 0..300 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let (step, txn) = write(x % 1000);
            store.inner.txn(txn).await.unwrap();
            same_as_a_full_read(&feed, &store.inner, &step).await;
        }
        // A registration that goes with its lease.
        let lease = store
            .inner
            .grant_lease(Duration::from_secs(60))
            .await
            .unwrap();
        let key = keys::host_registration("d");
        store
            .inner
            .txn(Txn::new().and_then(vec![Op::put_with_lease(
                &key,
                b"{}".to_vec(),
                lease.clone(),
            )]))
            .await
            .unwrap();
        same_as_a_full_read(&feed, &store.inner, "a registration").await;
        store.inner.revoke_lease(lease).await.unwrap();
        same_as_a_full_read(&feed, &store.inner, "its lease ends").await;
        assert_eq!(store.root_reads(), 1, "one full read, then only changes");
    }

    #[tokio::test]
    async fn following_starts_and_stops_with_the_role() {
        let store = Observed::new();
        store.inner.txn(write(0).1).await.unwrap();
        let mut feed = CensusFeed::new(store.clone());
        assert!(!feed.is_following() && feed.census().is_none());
        assert_eq!(store.root_reads(), 0, "no read before the role");

        feed.start();
        feed.start(); // the role goes on: nothing new
        tokio::time::timeout(Duration::from_secs(10), feed.synced())
            .await
            .expect("the first full read");
        assert!(feed.is_synced());
        same_as_a_full_read(&feed, &store.inner, "the first read").await;
        for n in 1..30 {
            store.inner.txn(write(n * 7).1).await.unwrap();
        }
        same_as_a_full_read(&feed, &store.inner, "changes").await;
        assert_eq!((store.root_reads(), store.open_watches()), (1, 1));

        // The role ends: no model, no watch.
        feed.stop();
        assert!(!feed.is_following() && !feed.is_synced() && feed.census().is_none());
        eventually("the watch is closed", || store.open_watches() == 0).await;

        // Changes while not leading are in the next run's first read.
        for n in 30..40 {
            store.inner.txn(write(n * 7).1).await.unwrap();
        }
        feed.start();
        same_as_a_full_read(&feed, &store.inner, "the role again").await;
        assert_eq!((store.root_reads(), feed.full_reads()), (2, 1));
        drop(feed);
        eventually("dropping the feed closes its watch", || {
            store.open_watches() == 0
        })
        .await;
    }

    #[tokio::test]
    async fn a_gap_in_the_watch_is_read_again_in_full() {
        let store = Observed::new();
        let mut feed = CensusFeed::new(store.clone());
        feed.start();
        same_as_a_full_read(&feed, &store.inner, "the first read").await;
        // The watch ends (an outage); the writes land while `follow` waits
        // before reading again, and the old watch delivers none of them.
        store.gap();
        for n in 0..30 {
            store.inner.txn(write(n * 7).1).await.unwrap();
        }
        eventually("a second full read", || feed.full_reads() == 2).await;
        same_as_a_full_read(&feed, &store.inner, "the gap").await;
        assert_eq!(store.root_reads(), 2);
        assert_eq!(store.open_watches(), 1, "watching again");
    }
}
