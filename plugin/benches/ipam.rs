//! IPAM benchmark (a program that prints figures, not a test).
//!
//! For an empty /24 and for a /16 with 10,000 addresses already taken, on the
//! in-memory store, the embedded file store, a real etcd and the Consul test
//! server: allocations per second and store round trips per allocation. The
//! baseline, measured in the same run on the same store right after (the
//! 10,000 addresses still in it), is the floor any store-backed IPAM pays:
//! one create-if-absent transaction per address, with no cursor and no pool
//! logic.
//!
//! Then 8 hosts allocate from one pool at once, on etcd and on Consul:
//! allocations per second, and the extra round trips per allocation (a lost
//! race on the pool's cursor costs one more).
//!
//! etcd and Consul run on a LAN namespace, which needs root; without root
//! only the in-memory and file rows are printed, and the program says so.
//!
//! Run: `cargo bench -p rustoverlay --bench ipam`

#[path = "common/figures.rs"]
mod figures;
#[path = "../tests/support/mod.rs"]
mod support;

use ipnetwork::Ipv4Network;
use kvstore_backends::{
    ConsulConfig, ConsulStore, CountingStore, EtcdConfig, EtcdStore, KvStore, MemoryStore,
    RedbStore,
};
use rustoverlay::api::parse::pool_request;
use rustoverlay::control::ipam::Ipam;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use support::{Lan, LAN_GATEWAY};

const MEASURED: u64 = 1_000;
const HOSTS: usize = 8;
const PER_HOST: usize = 150;

struct Figures {
    per_sec: f64,
    round_trips: f64,
}

impl Figures {
    /// Records both figures of `case`, each with its same-run baseline.
    fn record(&self, case: &str, per_sec: Option<(&str, f64)>, round_trips: Option<(&str, f64)>) {
        let name = |what| format!("{case}: {what}");
        figures::record(
            "ipam",
            &name("allocations/s"),
            self.per_sec,
            "allocations/s",
            per_sec,
            None,
        );
        figures::record(
            "ipam",
            &name("store round trips per allocation"),
            self.round_trips,
            "round trips",
            round_trips,
            None,
        );
    }
}

fn ipam_on(store: Arc<dyn KvStore>, host: &str) -> Ipam {
    let default: Ipv4Network = "10.200.0.0/16".parse().unwrap();
    Ipam::new(store, host, default, 24)
}

async fn measure_ipam(
    store: Arc<dyn KvStore>,
    counter: &AtomicU64,
    subnet: &str,
    pre_taken: u64,
) -> Figures {
    let ipam = ipam_on(store, "bench");
    let req = pool_request(subnet, "", false).unwrap();
    ipam.request_pool(&req).await.unwrap();
    for _ in 0..pre_taken {
        ipam.request_address(subnet, None, false).await.unwrap();
    }
    // A /24 holds 253 addresses: measure 200 there, MEASURED elsewhere.
    let n = if subnet.ends_with("/24") {
        200
    } else {
        MEASURED
    };
    let calls0 = counter.load(Ordering::Relaxed);
    let t = Instant::now();
    for _ in 0..n {
        ipam.request_address(subnet, None, false).await.unwrap();
    }
    let secs = t.elapsed().as_secs_f64();
    Figures {
        per_sec: n as f64 / secs,
        round_trips: (counter.load(Ordering::Relaxed) - calls0) as f64 / n as f64,
    }
}

/// The floor, on the store the IPAM just used (with what it holds).
async fn measure_floor(store: &dyn KvStore, tag: &str) -> f64 {
    let t = Instant::now();
    for i in 0..MEASURED {
        store
            .create_if_absent(&format!("/bench-floor/{tag}/{i}"), b"x".to_vec())
            .await
            .unwrap();
    }
    MEASURED as f64 / t.elapsed().as_secs_f64()
}

fn counted(inner: Arc<dyn KvStore>) -> (Arc<dyn KvStore>, Arc<AtomicU64>) {
    let counting = CountingStore::new(inner);
    let counter = counting.counter();
    (Arc::new(counting), counter)
}

/// A store of `kind`; etcd and Consul are shared servers, so each case
/// uses subnets of its own there.
fn open(kind: &str, dir: &std::path::Path, tag: &str) -> Arc<dyn KvStore> {
    match kind {
        "memory" => Arc::new(MemoryStore::new()),
        "file" => Arc::new(RedbStore::open(dir.join(format!("{tag}.redb"))).unwrap()),
        "etcd" => {
            Arc::new(EtcdStore::new(EtcdConfig::new([format!("{LAN_GATEWAY}:2379")])).unwrap())
        }
        "consul" => {
            let mut config = ConsulConfig::new(format!("http://{LAN_GATEWAY}:8500"));
            config.session_ttl_min = Duration::from_secs(1);
            Arc::new(ConsulStore::new(config).unwrap())
        }
        other => unreachable!("store kind {other}"),
    }
}

/// `HOSTS` IPAMs (one per host) on one store and pool, each allocating
/// `PER_HOST` addresses at once: allocations/s and round trips each.
async fn measure_concurrent(kind: &str, dir: &std::path::Path, subnet: &str) -> Figures {
    let (store, counter) = counted(open(kind, dir, &format!("{kind}-concurrent")));
    let req = pool_request(subnet, "", false).unwrap();
    let mut hosts = vec![];
    for h in 0..HOSTS {
        let ipam = Arc::new(ipam_on(store.clone(), &format!("h{h}")));
        ipam.request_pool(&req).await.unwrap();
        hosts.push(ipam);
    }
    let calls0 = counter.load(Ordering::Relaxed);
    let t = Instant::now();
    let tasks: Vec<_> = hosts
        .into_iter()
        .map(|ipam| {
            let subnet = subnet.to_string();
            tokio::spawn(async move {
                for _ in 0..PER_HOST {
                    ipam.request_address(&subnet, None, false).await.unwrap();
                }
            })
        })
        .collect();
    for task in tasks {
        task.await.unwrap();
    }
    let n = (HOSTS * PER_HOST) as f64;
    Figures {
        per_sec: n / t.elapsed().as_secs_f64(),
        round_trips: (counter.load(Ordering::Relaxed) - calls0) as f64 / n,
    }
}

async fn run(lan: Option<Lan>) {
    let mut lan = lan;
    let mut kinds = vec!["memory", "file"];
    if let Some(lan) = lan.as_mut() {
        lan.start_etcd().await;
        lan.start_consul().await;
        kinds.extend(["etcd", "consul"]);
    } else {
        println!("(not root: etcd and Consul need a LAN namespace; their rows are left out)");
    }
    let dir = tempfile::tempdir().unwrap();
    println!("IPAM allocation benchmark ({MEASURED} measured allocations max, one client)");
    println!(
        "{:<8} {:<24} {:>10} {:>12} {:>13} {:>7}",
        "store", "pool", "allocs/s", "round trips", "floor txn/s", "ratio"
    );
    // One client on an empty pool, per store: the baseline of the 8 hosts.
    let mut one_client: HashMap<&str, Figures> = HashMap::new();
    for (k, kind) in kinds.iter().enumerate() {
        for (c, (label, prefix, taken)) in [
            ("empty /24", 24u8, 0u64),
            ("/16 with 10,000 taken", 16, 10_000),
        ]
        .into_iter()
        .enumerate()
        {
            let subnet = format!("10.{}.0.0/{prefix}", 10 + k * 2 + c);
            let (store, counter) = counted(open(kind, dir.path(), &format!("{kind}-{taken}")));
            let fig = measure_ipam(store.clone(), &counter, &subnet, taken).await;
            let floor = measure_floor(store.as_ref(), &format!("{kind}-{taken}")).await;
            println!(
                "{:<8} {:<24} {:>10.0} {:>12.2} {:>13.0} {:>6.2}x",
                kind,
                label,
                fig.per_sec,
                fig.round_trips,
                floor,
                fig.per_sec / floor
            );
            let floor_what = "bare create-if-absent transactions, same store and state";
            fig.record(
                &format!("one client, {kind} store, {label}"),
                Some((floor_what, floor)),
                None,
            );
            if taken == 0 {
                one_client.insert(*kind, fig);
            }
        }
    }
    println!("ratio = IPAM allocations/s over the floor (one bare create-if-absent per address) on the same store, in the same state");

    if lan.is_some() {
        println!();
        println!("{HOSTS} hosts allocating {PER_HOST} addresses each from one /16 at once");
        println!(
            "{:<8} {:>10} {:>24}",
            "store", "allocs/s", "round trips per alloc"
        );
        for (k, kind) in ["etcd", "consul"].into_iter().enumerate() {
            let fig = measure_concurrent(kind, dir.path(), &format!("10.{}.0.0/16", 40 + k)).await;
            println!(
                "{:<8} {:>10.0} {:>24.2}",
                kind, fig.per_sec, fig.round_trips
            );
            let alone = &one_client[kind];
            let what = "one client, same store, empty pool";
            fig.record(
                &format!("{HOSTS} hosts at once, {kind} store, one /16"),
                Some((what, alone.per_sec)),
                Some((what, alone.round_trips)),
            );
        }
        println!(
            "a round trip above 1.00 per allocation is a lost race on the pool's cursor, retried"
        );
    }
    drop(lan);
}

fn main() {
    let lan = nix::unistd::geteuid().is_root().then(|| {
        let lan = Lan::new();
        lan.enter();
        lan
    });
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(run(lan));
}
