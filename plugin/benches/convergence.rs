//! Convergence benchmark (a program that prints figures; needs root).
//!
//! Three simulated hosts share a real etcd on a simulated LAN. Endpoints are
//! created and joined on host 1 through its plugin socket (what Docker does
//! for `docker run`); the clock runs from the CreateEndpoint call until hosts
//! 2 and 3 both hold the endpoint's FDB entry (MAC -> VTEP) and neighbour
//! entry (IP -> MAC) in the kernel. The kernel tells: each overlay namespace
//! has a netlink socket subscribed to neighbour events (RTM_NEWNEIGH), which
//! a task stamps as they arrive; nothing polls.
//!
//! Two runs: quiet (100 endpoints, one at a time), and under churn (hosts 2
//! and 3 create and delete 20 endpoints a second between them for 60 s while
//! host 1's endpoints are measured). Baseline, measured in the same run:
//! etcd's own watch latency (put until a watcher sees it) from the same
//! vantage point.
//!
//! Run: `cargo bench -p rustoverlay --bench convergence` (as root)

#[path = "common/figures.rs"]
mod figures;
#[path = "../tests/support/mod.rs"]
mod support;

use futures::StreamExt;
use kvstore_backends::{EtcdConfig, EtcdStore, KvStore};
use rtnetlink::packet_core::{NetlinkMessage, NetlinkPayload};
use rtnetlink::packet_route::neighbour::{NeighbourAddress, NeighbourAttribute};
use rtnetlink::packet_route::{AddressFamily, RouteNetlinkMessage};
use rtnetlink::sys::{AsyncSocket, SocketAddr};
use serde_json::json;
use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use support::{Lan, Plugin, LAN_GATEWAY};

const QUIET_ENDPOINTS: usize = 100;
const CHURN_SECONDS: u64 = 60;
/// Creates (and as many deletes) per second, cluster-wide, during churn.
const CHURN_RATE: u64 = 20;
const POOL: &str = "10.77.0.0/22";
const VNI: u32 = 256;
/// RTMGRP_NEIGH: the multicast group of neighbour (and FDB) changes.
const NEIGH_GROUP: u32 = 1 << 2;

/// When each peer's kernel first held an endpoint's entries.
#[derive(Default, Clone, Copy)]
struct Seen {
    fdb: Option<Instant>,
    neigh: Option<Instant>,
}

/// Per watched host: MAC -> when its entries appeared.
type Arrivals = Arc<Mutex<HashMap<[u8; 6], Seen>>>;

/// Subscribes to neighbour events in the namespace at `path` and stamps each
/// new FDB entry (bridge family) and neighbour entry (IPv4) by MAC.
fn watch_neighbours(path: &Path, arrivals: Arrivals) {
    let ns = std::fs::File::open(path).expect("overlay namespace");
    let runtime = tokio::runtime::Handle::current();
    let (conn, _handle, mut events) = std::thread::spawn(move || {
        let _enter = runtime.enter();
        nix::sched::setns(&ns, nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
        let (mut conn, handle, events) = rtnetlink::new_connection().unwrap();
        conn.socket_mut()
            .socket_mut()
            .bind(&SocketAddr::new(0, NEIGH_GROUP))
            .unwrap();
        (conn, handle, events)
    })
    .join()
    .unwrap();
    tokio::spawn(conn);
    tokio::spawn(async move {
        while let Some((msg, _)) = events.next().await {
            let at = Instant::now();
            let NetlinkMessage {
                payload: NetlinkPayload::InnerMessage(RouteNetlinkMessage::NewNeighbour(n)),
                ..
            } = msg
            else {
                continue;
            };
            let mac = n.attributes.iter().find_map(|a| match a {
                NeighbourAttribute::LinkLayerAddress(l) if l.len() == 6 => {
                    <[u8; 6]>::try_from(l.as_slice()).ok()
                }
                _ => None,
            });
            let Some(mac) = mac else { continue };
            let mut seen = arrivals.lock().unwrap();
            let entry = seen.entry(mac).or_default();
            match n.header.family {
                AddressFamily::Bridge => {
                    entry.fdb.get_or_insert(at);
                }
                AddressFamily::Inet
                    if n.attributes.iter().any(|a| {
                        matches!(
                            a,
                            NeighbourAttribute::Destination(NeighbourAddress::Inet(_))
                        )
                    }) =>
                {
                    entry.neigh.get_or_insert(at);
                }
                _ => {}
            }
        }
    });
}

/// How long after `t0` both peers held both entries of `mac`, once they do.
async fn converged(watchers: &[Arrivals], mac: [u8; 6], t0: Instant, ep: &str) -> Duration {
    loop {
        let done: Option<Vec<Instant>> = watchers
            .iter()
            .map(|w| {
                let s = w.lock().unwrap().get(&mac).copied().unwrap_or_default();
                Some(s.fdb?.max(s.neigh?))
            })
            .collect();
        if let Some(times) = done {
            return times
                .into_iter()
                .max()
                .unwrap()
                .saturating_duration_since(t0);
        }
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "endpoint {ep} never converged"
        );
        // Only how often this check looks: the times are the events' own.
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
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

/// Creates and joins one endpoint on `c`; its address and MAC.
async fn attach(c: &support::Client, network: &str, ep: &str) -> (String, [u8; 6]) {
    let (addr, _, mac) = support::calls::join_in(c, POOL, network, ep).await;
    (addr, rustoverlay::util::mac::parse_mac(&mac).unwrap())
}

/// What `docker rm` does to an endpoint `attach` made.
async fn detach(c: &support::Client, network: &str, ep: &str, addr: &str) {
    let ids = json!({"NetworkID": network, "EndpointID": ep});
    c.call("NetworkDriver.Leave", ids.clone()).await.ok();
    c.call("NetworkDriver.DeleteEndpoint", ids).await.ok();
    let ip = addr.split('/').next().unwrap();
    c.release_address(POOL, ip).await.ok();
}

/// `count` endpoints on host 1, one every `pace`: each one's convergence.
async fn measure(
    c1: &support::Client,
    watchers: &[Arrivals],
    label: &str,
    count: usize,
    pace: Duration,
) -> Vec<Duration> {
    let mut samples = vec![];
    for i in 0..count {
        let next = Instant::now() + pace;
        let ep = format!("{label}{i:04}{label}{i:04}");
        let t0 = Instant::now();
        let (_, mac) = attach(c1, "net0", &ep).await;
        samples.push(converged(watchers, mac, t0, &ep).await);
        tokio::time::sleep_until(next.into()).await;
    }
    samples.sort();
    samples
}

/// Until `stop`: `rate` attaches a second on `c`, each detached about a
/// second later. Returns how many it made.
async fn churn(
    c: support::Client,
    network: String,
    host: usize,
    rate: u64,
    stop: Arc<std::sync::atomic::AtomicBool>,
) -> usize {
    let mut live = std::collections::VecDeque::new();
    let mut made = 0;
    let mut tick = tokio::time::interval(Duration::from_millis(1000 / rate));
    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
        tick.tick().await;
        let ep = format!("churn{host}x{made:05}churn");
        let (addr, _) = attach(&c, &network, &ep).await;
        live.push_back((ep, addr));
        made += 1;
        if live.len() as u64 > rate {
            let (ep, addr) = live.pop_front().unwrap();
            detach(&c, &network, &ep, &addr).await;
        }
    }
    for (ep, addr) in live {
        detach(&c, &network, &ep, &addr).await;
    }
    made
}

fn row(label: &str, samples: &[Duration]) {
    println!(
        "{:<58} {:>8.2} {:>8.2} {:>8.2} {:>8.2}",
        label,
        ms(percentile(samples, 0.5)),
        ms(percentile(samples, 0.9)),
        ms(percentile(samples, 0.99)),
        ms(*samples.last().unwrap())
    );
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
        attach(
            &p.client(),
            &format!("net{i}"),
            &format!("anchor{i}anchor{i}"),
        )
        .await;
    }
    let watchers: Vec<Arrivals> = plugins[1..]
        .iter()
        .map(|p| {
            let arrivals = Arrivals::default();
            watch_neighbours(&p.overlay_ns_path(VNI), arrivals.clone());
            arrivals
        })
        .collect();

    let c1 = plugins[0].client();
    let quiet = measure(&c1, &watchers, "quiet", QUIET_ENDPOINTS, Duration::ZERO).await;

    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let churners: Vec<_> = plugins[1..]
        .iter()
        .enumerate()
        .map(|(i, p)| {
            let share = CHURN_RATE / 2;
            tokio::spawn(churn(
                p.client(),
                format!("net{}", i + 1),
                i + 2,
                share,
                stop.clone(),
            ))
        })
        .collect();
    let pace = Duration::from_millis(250);
    let count = (CHURN_SECONDS * 1000 / pace.as_millis() as u64) as usize;
    let t_churn = Instant::now();
    let busy = measure(&c1, &watchers, "churn", count, pace).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let churned: usize = futures::future::join_all(churners)
        .await
        .into_iter()
        .map(|r| r.unwrap())
        .sum();
    let churn_secs = t_churn.elapsed().as_secs_f64();

    // Baseline: the store's own notification latency, from this vantage point.
    let store = EtcdStore::new(EtcdConfig::new([format!("{LAN_GATEWAY}:2379")])).unwrap();
    let mut watch = store.watch("/bench-baseline/", 0).await.unwrap();
    let mut base = vec![];
    for i in 0..QUIET_ENDPOINTS {
        let t0 = Instant::now();
        store
            .put(&format!("/bench-baseline/{i}"), b"x".to_vec())
            .await
            .unwrap();
        watch.next().await.unwrap().unwrap();
        base.push(t0.elapsed());
    }
    base.sort();

    println!("Endpoint convergence: 3 hosts, one etcd (all on one machine); times from");
    println!("CreateEndpoint on h1 until h2's and h3's kernels announce (RTM_NEWNEIGH) both");
    println!("the FDB and the neighbour entry");
    println!(
        "{:<58} {:>8} {:>8} {:>8} {:>8}",
        "", "p50 ms", "p90 ms", "p99 ms", "max ms"
    );
    let quiet_label = format!("quiet: {QUIET_ENDPOINTS} endpoints, one at a time");
    let churn_rate = churned as f64 / churn_secs;
    let churn_label = format!(
        "churn: {} endpoints while h2+h3 churn {churn_rate:.1} creates/s",
        busy.len(),
    );
    row(&quiet_label, &quiet);
    row(&churn_label, &busy);
    row("baseline: etcd put -> watch event", &base);
    println!(
        "ratio (p50, quiet): {:.2}x the store's own notification latency",
        ms(percentile(&quiet, 0.5)) / ms(percentile(&base, 0.5))
    );
    for (label, samples) in [(&quiet_label, &quiet), (&churn_label, &busy)] {
        for (name, p) in [("p50", 0.5), ("p90", 0.9), ("p99", 0.99), ("max", 1.0)] {
            figures::record(
                "convergence",
                &format!("{label}: {name}"),
                ms(percentile(samples, p)),
                "ms",
                Some((
                    &format!("etcd put -> watch event, {name}"),
                    ms(percentile(&base, p)),
                )),
                None,
            );
        }
    }
    figures::record(
        "convergence",
        "churn: creates/s on h2+h3 while measured",
        churn_rate,
        "creates/s",
        None,
        None,
    );
    drop(plugins);
}

fn main() {
    support::require_root();
    let lan = Lan::new();
    lan.enter();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(run(lan));
}
