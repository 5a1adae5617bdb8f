//! Convergence benchmark (a program that prints figures; needs root).
//!
//! Three simulated hosts share a real etcd on a simulated LAN. Each of 100
//! endpoints is created and joined on host 1 through its plugin socket (what
//! Docker does for `docker run`); the clock runs from the CreateEndpoint call
//! until hosts 2 and 3 both hold the endpoint's FDB entry in the kernel,
//! polled over netlink inside their overlay namespaces every millisecond.
//! Baseline, measured in the same run: etcd's own watch latency (put until a
//! watcher sees it) from the same vantage point.
//!
//! Run: `cargo bench -p rustoverlay --bench convergence` (as root)

#[path = "../tests/support/mod.rs"]
mod support;

use futures::{StreamExt, TryStreamExt};
use kvstore_backends::{EtcdConfig, EtcdStore, KvStore};
use rtnetlink::packet_route::neighbour::NeighbourAttribute;
use rtnetlink::packet_route::AddressFamily;
use serde_json::json;
use std::time::{Duration, Instant};
use support::{Lan, Plugin, LAN_GATEWAY};

const ENDPOINTS: usize = 100;
const POOL: &str = "10.77.0.0/22";
const VNI: u32 = 256;

async fn fdb_has(handle: &rtnetlink::Handle, mac: &[u8]) -> bool {
    let mut dump = handle
        .neighbours()
        .get()
        .set_address_family(AddressFamily::Bridge)
        .execute();
    while let Ok(Some(msg)) = dump.try_next().await {
        if msg
            .attributes
            .iter()
            .any(|a| matches!(a, NeighbourAttribute::LinkLayerAddress(l) if l == mac))
        {
            return true;
        }
    }
    false
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let idx = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[idx]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

async fn network(c: &support::Client, id: &str) {
    c.request_pool(POOL).await.ok();
    c.request_gateway(POOL).await.ok();
    c.call(
        "NetworkDriver.CreateNetwork",
        json!({"NetworkID": id, "IPv4Data": [{"AddressSpace": "RustOverlayLocal", "Pool": POOL}]}),
    )
    .await
    .ok();
}

async fn run(mut lan: Lan) {
    lan.start_etcd().await;
    let url = lan.etcd_url();
    let hosts: Vec<_> = (1..=3).map(|n| lan.host(n)).collect();
    let mut plugins = vec![];
    for (i, ns) in hosts.iter().enumerate() {
        let id = format!("h{}", i + 1);
        plugins.push(
            Plugin::start_with(ns, &Plugin::dir_for(&format!("conv{i}")), &id, &url, &[]).await,
        );
    }
    for (i, p) in plugins.iter().enumerate() {
        network(&p.client(), &format!("net{i}")).await;
    }
    // Hosts 2 and 3 need a local endpoint to take part in the network.
    for (i, p) in plugins.iter().enumerate().skip(1) {
        let c = p.client();
        let addr = c.request_address(POOL, "").await.ok()["Address"]
            .as_str()
            .unwrap()
            .to_string();
        let ep = format!("anchor{i}anchor{i}");
        c.call("NetworkDriver.CreateEndpoint", json!({"NetworkID": format!("net{i}"), "EndpointID": ep, "Interface": {"Address": addr}}))
            .await
            .ok();
        c.call(
            "NetworkDriver.Join",
            json!({"NetworkID": format!("net{i}"), "EndpointID": ep, "SandboxKey": "/x"}),
        )
        .await
        .ok();
    }
    let watchers: Vec<rtnetlink::Handle> = plugins[1..]
        .iter()
        .map(|p| {
            rustoverlay::dataplane::netns::connect_in(&p.overlay_ns_path(VNI))
                .expect("netlink in the overlay namespace")
        })
        .collect();

    let c1 = plugins[0].client();
    let mut samples = vec![];
    for i in 0..ENDPOINTS {
        let addr = c1.request_address(POOL, "").await.ok()["Address"]
            .as_str()
            .unwrap()
            .to_string();
        let ep = format!("bench{i:04}bench{i:04}");
        let t0 = Instant::now();
        let created = c1
            .call(
                "NetworkDriver.CreateEndpoint",
                json!({"NetworkID": "net0", "EndpointID": ep, "Interface": {"Address": addr}}),
            )
            .await
            .ok();
        c1.call(
            "NetworkDriver.Join",
            json!({"NetworkID": "net0", "EndpointID": ep, "SandboxKey": "/x"}),
        )
        .await
        .ok();
        let mac =
            rustoverlay::util::mac::parse_mac(created["Interface"]["MacAddress"].as_str().unwrap())
                .unwrap();
        let mut pending: Vec<&rtnetlink::Handle> = watchers.iter().collect();
        while !pending.is_empty() {
            let mut still = vec![];
            for h in pending {
                if !fdb_has(h, &mac).await {
                    still.push(h);
                }
            }
            pending = still;
            if !pending.is_empty() {
                assert!(
                    t0.elapsed() < Duration::from_secs(30),
                    "endpoint {ep} never converged"
                );
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        }
        samples.push(t0.elapsed());
    }
    samples.sort();

    // Baseline: the store's own notification latency, from this vantage point.
    let store = EtcdStore::new(EtcdConfig::new([format!("{LAN_GATEWAY}:2379")])).unwrap();
    let mut watch = store.watch("/bench-baseline/", 0).await.unwrap();
    let mut base = vec![];
    for i in 0..ENDPOINTS {
        let t0 = Instant::now();
        store
            .put(&format!("/bench-baseline/{i}"), b"x".to_vec())
            .await
            .unwrap();
        watch.next().await.unwrap().unwrap();
        base.push(t0.elapsed());
    }
    base.sort();

    println!(
        "Endpoint convergence over {ENDPOINTS} endpoints, 3 hosts, one etcd (all on one machine)"
    );
    println!("{:<52} {:>9} {:>9} {:>9}", "", "p50 ms", "p99 ms", "max ms");
    println!(
        "{:<52} {:>9.2} {:>9.2} {:>9.2}",
        "CreateEndpoint+Join on h1 -> FDB entry on h2 and h3",
        ms(percentile(&samples, 0.5)),
        ms(percentile(&samples, 0.99)),
        ms(*samples.last().unwrap())
    );
    println!(
        "{:<52} {:>9.2} {:>9.2} {:>9.2}",
        "baseline: etcd put -> watch event",
        ms(percentile(&base, 0.5)),
        ms(percentile(&base, 0.99)),
        ms(*base.last().unwrap())
    );
    println!(
        "ratio (p50): {:.2}x the store's own notification latency",
        ms(percentile(&samples, 0.5)) / ms(percentile(&base, 0.5))
    );
    drop(plugins);
}

fn main() {
    support::require_root();
    let lan = Lan::new();
    // Live on the LAN so the baseline reaches etcd the way the hosts do. Set
    // before the runtime starts so every runtime thread inherits it.
    let ns = std::fs::File::open(format!("/run/netns/{}", lan.name)).unwrap();
    nix::sched::setns(&ns, nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(run(lan));
}
