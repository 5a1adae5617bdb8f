//! Store calls of an idle cluster (a program that prints figures, not a
//! test).
//!
//! Three hosts, each wired as `serve` wires one (`cmd::HostParts` and the
//! supervisor's loops) with an in-memory data plane, share one memory store
//! through a counting decorator per host. Endpoints are spread over the
//! hosts, then the cluster idles; each host's store calls per minute are
//! printed, with 100 and with 1,000 endpoints. The baseline is the same
//! cluster with 10x fewer keys, in the same run: an idle host's calls should
//! not grow with the number of keys (watches deliver changes; only the
//! elected reaper reads the census).
//!
//! Run: `cargo bench -p rustoverlay --bench idle_reads` (about a minute).

use kvstore_backends::{CountingStore, KvStore, MemoryStore};
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

/// Calls per host per minute while idle, with `endpoints` endpoints.
async fn idle_calls_per_minute(endpoints: usize) -> Vec<f64> {
    let shared: Arc<dyn KvStore> = Arc::new(MemoryStore::new());
    let mut counters: Vec<Arc<AtomicU64>> = vec![];
    let mut hosts = vec![];
    for h in 0..HOSTS {
        let counting = CountingStore::new(shared.clone());
        counters.push(counting.counter());
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
    // Let peer sync catch up, then count.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let before: Vec<u64> = counters.iter().map(|c| c.load(Ordering::Relaxed)).collect();
    tokio::time::sleep(WINDOW).await;
    counters
        .iter()
        .zip(before)
        .map(|(c, b)| (c.load(Ordering::Relaxed) - b) as f64 * 60.0 / WINDOW.as_secs_f64())
        .collect()
}

#[tokio::main]
async fn main() {
    println!(
        "store calls per host per minute, idle cluster of {HOSTS} hosts (reaper period 5 s, TTL 10 s), {WINDOW:?} window"
    );
    let small = idle_calls_per_minute(100).await;
    let large = idle_calls_per_minute(1_000).await;
    println!(
        "{:>10} {:>14} {:>14} {:>8}",
        "host", "100 endpoints", "1000 endpoints", "ratio"
    );
    for h in 0..HOSTS {
        println!(
            "{:>10} {:>14.1} {:>14.1} {:>7.2}x",
            format!("h{h}"),
            small[h],
            large[h],
            large[h] / small[h].max(1.0)
        );
    }
}
