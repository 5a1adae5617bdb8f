//! Store reads of an idle cluster (a program that prints figures, not a
//! test).
//!
//! Three hosts, each wired as `serve` wires one (`cmd::HostParts` and the
//! supervisor's loops) with an in-memory data plane, share one memory store
//! through a counting decorator per host. Endpoints are spread over the
//! hosts, then the cluster idles; each host's store calls, keys read and
//! bytes read per minute are printed, with 100 and with 1,000 endpoints, and
//! the ratio of the two. An idle host should make no call but its lease
//! renewals (18 a minute with a 10 s TTL): watches deliver changes, the
//! elected reaper keeps its census from a watch of the root, every host
//! knows the reaper role from a watch of its key, and the orphan sweep
//! takes the store's revision from the renewals and reads the store again
//! only after something changed.
//!
//! Run: `cargo bench -p rustoverlay --bench idle_reads` (about a minute).

#[path = "common/figures.rs"]
mod figures;

use async_trait::async_trait;
use futures::StreamExt;
use kvstore_backends::{
    CountingStore, KeyValue, KvStore, LeaseId, MemoryStore, OpResult, RangeResponse, Result,
    Revision, Txn, TxnResponse, WatchFidelity, WatchStream,
};
use rustoverlay::api::parse::pool_request;
use rustoverlay::cmd::HostParts;
use rustoverlay::dataplane::fake::FakeDataplane;
use rustoverlay::driver::{EndpointSpec, NetworkSpec, PoolSpec};
use rustoverlay::sync::membership::Registration;
use rustoverlay::sync::reaper::ReaperConfig;
use rustoverlay::sync::supervisor;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

const POOL: &str = "10.77.0.0/20";
const HOSTS: usize = 3;
/// How long the cluster idles while calls are counted.
const WINDOW: Duration = Duration::from_secs(30);

/// Keys and bytes (key plus value) that reads return: ranges, gets, the
/// gets of transactions, and watch events.
#[derive(Default)]
struct Read {
    keys: AtomicU64,
    bytes: AtomicU64,
}

impl Read {
    fn count<'a>(&self, kvs: impl IntoIterator<Item = &'a KeyValue>) {
        for kv in kvs {
            self.keys.fetch_add(1, Ordering::Relaxed);
            let bytes = (kv.key.len() + kv.value.len()) as u64;
            self.bytes.fetch_add(bytes, Ordering::Relaxed);
        }
    }
}

/// Counts what the inner store's reads return.
struct ReadCounting {
    inner: Arc<dyn KvStore>,
    read: Arc<Read>,
}

#[async_trait]
impl KvStore for ReadCounting {
    fn backend_name(&self) -> &'static str {
        self.inner.backend_name()
    }

    fn watch_fidelity(&self) -> WatchFidelity {
        self.inner.watch_fidelity()
    }

    async fn get(&self, key: &str) -> Result<Option<KeyValue>> {
        let kv = self.inner.get(key).await?;
        self.read.count(kv.iter());
        Ok(kv)
    }

    async fn range(&self, prefix: &str) -> Result<RangeResponse> {
        let resp = self.inner.range(prefix).await?;
        self.read.count(&resp.kvs);
        Ok(resp)
    }

    async fn txn(&self, txn: Txn) -> Result<TxnResponse> {
        let resp = self.inner.txn(txn).await?;
        self.read.count(resp.results.iter().filter_map(|r| match r {
            OpResult::Get(kv) => kv.as_ref(),
            _ => None,
        }));
        Ok(resp)
    }

    async fn watch(&self, prefix: &str, start_revision: Revision) -> Result<WatchStream> {
        let read = self.read.clone();
        let stream = self.inner.watch(prefix, start_revision).await?;
        Ok(stream
            .inspect(move |event| {
                if let Ok(event) = event {
                    read.count([&event.kv]);
                }
            })
            .boxed())
    }

    async fn grant_lease(&self, ttl: Duration) -> Result<LeaseId> {
        self.inner.grant_lease(ttl).await
    }

    async fn keep_alive(&self, lease: LeaseId) -> Result<Option<Revision>> {
        self.inner.keep_alive(lease).await
    }

    async fn revoke_lease(&self, lease: LeaseId) -> Result<()> {
        self.inner.revoke_lease(lease).await
    }
}

/// One host's counters.
struct Counters {
    calls: Arc<AtomicU64>,
    read: Arc<Read>,
}

impl Counters {
    fn now(&self) -> [u64; 3] {
        [
            self.calls.load(Ordering::Relaxed),
            self.read.keys.load(Ordering::Relaxed),
            self.read.bytes.load(Ordering::Relaxed),
        ]
    }
}

/// Per host, per minute while idle with `endpoints` endpoints: store calls,
/// keys read, bytes read.
async fn idle_reads_per_minute(endpoints: usize) -> Vec<[f64; 3]> {
    let shared: Arc<dyn KvStore> = Arc::new(MemoryStore::new());
    let mut counters: Vec<Counters> = vec![];
    let mut hosts = vec![];
    for h in 0..HOSTS {
        let read = Arc::new(Read::default());
        let reads: Arc<dyn KvStore> = Arc::new(ReadCounting {
            inner: shared.clone(),
            read: read.clone(),
        });
        let counting = CountingStore::new(reads);
        counters.push(Counters {
            calls: counting.counter(),
            read,
        });
        let store: Arc<dyn KvStore> = Arc::new(counting);
        let name = format!("h{h}");
        let vtep = format!("192.0.2.{}", h + 1).parse().unwrap();
        let parts = HostParts::new(
            store.clone(),
            FakeDataplane::new(vtep),
            &name,
            "10.200.0.0/16".parse().unwrap(),
            24,
        );
        let registration =
            Registration::new(store.clone(), name.clone(), vtep, Duration::from_secs(10));
        let running = supervisor::start(
            store.clone(),
            name.clone(),
            registration,
            parts.reconciler.clone(),
            ReaperConfig {
                period: Duration::from_secs(5),
                grace: Duration::from_secs(300),
                orphan_age: Duration::from_secs(600),
            },
            parts.live.clone(),
        );
        parts
            .ipam
            .request_pool(&pool_request(POOL, "", false).unwrap())
            .await
            .unwrap();
        parts.ipam.request_address(POOL, None, true).await.unwrap();
        parts
            .driver
            .create_network(NetworkSpec {
                network_id: format!("net-{h}"),
                ipv4: vec![PoolSpec {
                    subnet: POOL.parse().unwrap(),
                    aux: vec![],
                }],
                ipv6: vec![],
                cluster: false,
            })
            .await
            .unwrap();
        hosts.push((parts, running));
    }
    for i in 0..endpoints {
        let h = i % HOSTS;
        let (parts, _) = &hosts[h];
        let addr = parts.ipam.request_address(POOL, None, false).await.unwrap();
        let id = format!("ep{i:014}");
        parts
            .driver
            .create_endpoint(EndpointSpec {
                network_id: format!("net-{h}"),
                endpoint_id: id.clone(),
                ipv4: Some(addr),
                ipv6: None,
                mac: None,
            })
            .await
            .unwrap();
        parts.driver.join(&format!("net-{h}"), &id).await.unwrap();
    }
    // Let peer sync catch up, the reaper role be claimed (a write: every
    // host's next sweep reads once more) and each host sweep after the last
    // write, then count: two periods and a bit.
    tokio::time::sleep(Duration::from_secs(12)).await;
    let before: Vec<[u64; 3]> = counters.iter().map(Counters::now).collect();
    tokio::time::sleep(WINDOW).await;
    let per_minute = 60.0 / WINDOW.as_secs_f64();
    counters
        .iter()
        .zip(before)
        .map(|(c, b)| {
            let now = c.now();
            std::array::from_fn(|i| (now[i] - b[i]) as f64 * per_minute)
        })
        .collect()
}

#[tokio::main]
async fn main() {
    println!(
        "per host per minute, idle cluster of {HOSTS} hosts (reaper period 5 s, TTL 10 s), {WINDOW:?} window"
    );
    let small = idle_reads_per_minute(100).await;
    let large = idle_reads_per_minute(1_000).await;
    for (i, (what, unit)) in [
        ("store calls", "calls/minute"),
        ("keys read", "keys/minute"),
        ("bytes read", "bytes/minute"),
    ]
    .into_iter()
    .enumerate()
    {
        println!();
        println!(
            "{:>12} {:>6} {:>14} {:>14} {:>8}",
            what, "host", "100 endpoints", "1000 endpoints", "ratio"
        );
        for h in 0..HOSTS {
            println!(
                "{:>12} {:>6} {:>14.1} {:>14.1} {:>7.2}x",
                "",
                format!("h{h}"),
                small[h][i],
                large[h][i],
                large[h][i] / small[h][i].max(1.0)
            );
            figures::record(
                "idle_reads",
                &format!("{what}, idle host h{h} of {HOSTS}, 1,000 endpoints"),
                large[h][i],
                unit,
                Some(("the same cluster with 100 endpoints", small[h][i])),
                None,
            );
        }
    }
}
