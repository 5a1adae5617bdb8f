//! IPAM benchmark (a program that prints figures, not a test).
//!
//! For an empty /24 and for a /16 with 10,000 addresses already taken, on the
//! in-memory and the embedded file store: allocations per second and store
//! round trips per allocation. The baseline, measured in the same run on the
//! same store, is the floor any store-backed IPAM pays: one create-if-absent
//! transaction per address, with no cursor and no pool logic.
//!
//! Run: `cargo bench -p rustoverlay --bench ipam`

use ipnetwork::Ipv4Network;
use kvstore_backends::{CountingStore, KvStore, MemoryStore, RedbStore};
use rustoverlay::api::parse::pool_request;
use rustoverlay::control::ipam::Ipam;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

const MEASURED: u64 = 1_000;

struct Figures {
    per_sec: f64,
    round_trips: f64,
}

async fn measure_ipam(
    store: Arc<dyn KvStore>,
    counter: &AtomicU64,
    subnet: &str,
    pre_taken: u64,
) -> Figures {
    let default: Ipv4Network = "10.200.0.0/16".parse().unwrap();
    let ipam = Ipam::new(store, "bench", default, 24);
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

async fn measure_floor(store: Arc<dyn KvStore>, prefix: &str) -> f64 {
    let t = Instant::now();
    for i in 0..MEASURED {
        store
            .create_if_absent(&format!("/bench-floor/{prefix}/{i}"), b"x".to_vec())
            .await
            .unwrap();
    }
    MEASURED as f64 / t.elapsed().as_secs_f64()
}

fn make(kind: &str, dir: &std::path::Path, tag: &str) -> (Arc<dyn KvStore>, Arc<AtomicU64>) {
    let inner: Arc<dyn KvStore> = match kind {
        "memory" => Arc::new(MemoryStore::new()),
        _ => Arc::new(RedbStore::open(dir.join(format!("{tag}.redb"))).unwrap()),
    };
    let counting = CountingStore::new(inner);
    let counter = counting.counter();
    (Arc::new(counting), counter)
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let dir = tempfile::tempdir().unwrap();
    println!("IPAM allocation benchmark ({MEASURED} measured allocations max, one client)");
    println!(
        "{:<8} {:<26} {:>12} {:>14} {:>16} {:>8}",
        "store", "pool", "allocs/s", "round trips", "floor txn/s", "ratio"
    );
    for kind in ["memory", "file"] {
        for (label, subnet, taken) in [
            ("empty /24", "10.1.0.0/24", 0u64),
            ("/16 with 10,000 taken", "10.2.0.0/16", 10_000),
        ] {
            let (store, counter) = make(kind, dir.path(), &format!("{kind}-{taken}"));
            let fig = measure_ipam(store, &counter, subnet, taken).await;
            let (floor_store, _) = make(kind, dir.path(), &format!("{kind}-{taken}-floor"));
            let floor = measure_floor(floor_store, kind).await;
            println!(
                "{:<8} {:<26} {:>12.0} {:>14.2} {:>16.0} {:>7.2}x",
                kind,
                label,
                fig.per_sec,
                fig.round_trips,
                floor,
                fig.per_sec / floor
            );
        }
    }
    println!("ratio = IPAM allocations/s divided by the floor (one bare create-if-absent per address) on the same store");
}
