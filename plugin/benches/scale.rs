//! Scale benchmark (a program that prints figures; needs root).
//!
//! 20 simulated hosts (plugins in network namespaces, no dockerd) on one
//! etcd, one overlay, 250 endpoints per host: 5,000 endpoints, and 4,750
//! remote FDB and neighbour entries in every host's kernel. Each host joins
//! one endpoint (so it has devices and a watch) and creates the other 249
//! without a Join (their records are what the peers learn; no veth needed).
//! It prints:
//! - the plugins' resident memory;
//! - the cold install of all entries on a 21st host, from its first Join
//!   until its kernel holds them all;
//! - that host's plugin restarted with its kernel full: time until it
//!   serves, and how many entries were removed or added meanwhile (kernel
//!   events; the goal is none);
//! - one idle minute: store calls per host by operation, and the peer-sync
//!   updates applied;
//! - etcd's CPU time and database size.
//!
//! Run: `cargo bench -p rustoverlay --bench scale` (as root)

#[path = "common/figures.rs"]
mod figures;
#[path = "../tests/support/mod.rs"]
mod support;

use futures::{StreamExt, TryStreamExt};
use rtnetlink::packet_core::{NetlinkMessage, NetlinkPayload};
use rtnetlink::packet_route::neighbour::NeighbourAttribute;
use rtnetlink::packet_route::{AddressFamily, RouteNetlinkMessage};
use rtnetlink::sys::{AsyncSocket, SocketAddr};
use serde_json::json;
use std::collections::BTreeMap;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use support::{Lan, Plugin};

const HOSTS: u8 = 20;
const PER_HOST: usize = 250;
const POOL: &str = "10.90.0.0/16";
const VNI: u32 = 256;
const METRICS_PORT: u16 = 9653;
/// RTMGRP_NEIGH: neighbour (and FDB) changes.
const NEIGH_GROUP: u32 = 1 << 2;
const BENCH: &str = "scale";

/// A figure of this bench with no baseline.
fn record(figure: &str, value: f64, unit: &str, goal: Option<&str>) {
    figures::record(BENCH, figure, value, unit, None, goal);
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

/// RequestAddress + CreateEndpoint (what Docker does before Join).
async fn endpoint(c: &support::Client, network: &str, ep: &str) {
    let addr = c.request_address(POOL, "").await.ok()["Address"]
        .as_str()
        .unwrap()
        .to_string();
    c.call(
        "NetworkDriver.CreateEndpoint",
        json!({"NetworkID": network, "EndpointID": ep, "Interface": {"Address": addr}}),
    )
    .await
    .ok();
}

async fn join(c: &support::Client, network: &str, ep: &str) {
    endpoint(c, network, ep).await;
    c.call(
        "NetworkDriver.Join",
        json!({"NetworkID": network, "EndpointID": ep, "SandboxKey": "/x"}),
    )
    .await
    .ok();
}

/// Remote FDB entries (with a VTEP) and IPv4 neighbour entries in the
/// overlay namespace.
async fn entries(handle: &rtnetlink::Handle) -> (usize, usize) {
    let mut fdb = 0;
    let mut dump = handle
        .neighbours()
        .get()
        .set_address_family(AddressFamily::Bridge)
        .execute();
    while let Ok(Some(msg)) = dump.try_next().await {
        if msg
            .attributes
            .iter()
            .any(|a| matches!(a, NeighbourAttribute::Destination(_)))
        {
            fdb += 1;
        }
    }
    let mut neigh = 0;
    let mut dump = handle
        .neighbours()
        .get()
        .set_address_family(AddressFamily::Inet)
        .execute();
    while let Ok(Some(msg)) = dump.try_next().await {
        if msg
            .attributes
            .iter()
            .any(|a| matches!(a, NeighbourAttribute::LinkLayerAddress(_)))
        {
            neigh += 1;
        }
    }
    (fdb, neigh)
}

/// A netlink connection in the namespace at `path`; with `events`, also
/// counts every neighbour change announced there.
fn netlink_in(path: &Path, events: Option<Arc<AtomicU64>>) -> rtnetlink::Handle {
    let ns = std::fs::File::open(path).expect("overlay namespace");
    let runtime = tokio::runtime::Handle::current();
    let subscribe = events.is_some();
    let (conn, handle, mut messages) = std::thread::spawn(move || {
        let _enter = runtime.enter();
        nix::sched::setns(&ns, nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
        let (mut conn, handle, messages) = rtnetlink::new_connection().unwrap();
        if subscribe {
            conn.socket_mut()
                .socket_mut()
                .bind(&SocketAddr::new(0, NEIGH_GROUP))
                .unwrap();
        }
        (conn, handle, messages)
    })
    .join()
    .unwrap();
    tokio::spawn(conn);
    if let Some(count) = events {
        tokio::spawn(async move {
            while let Some((msg, _)) = messages.next().await {
                if let NetlinkMessage {
                    payload:
                        NetlinkPayload::InnerMessage(
                            RouteNetlinkMessage::NewNeighbour(_)
                            | RouteNetlinkMessage::DelNeighbour(_),
                        ),
                    ..
                } = msg
                {
                    count.fetch_add(1, Ordering::Relaxed);
                }
            }
        });
    }
    handle
}

async fn wait_for_entries(handle: &rtnetlink::Handle, want: usize, limit: Duration) -> Duration {
    let t0 = Instant::now();
    loop {
        let (fdb, neigh) = entries(handle).await;
        if fdb >= want && neigh >= want {
            return t0.elapsed();
        }
        assert!(
            t0.elapsed() < limit,
            "only {fdb} FDB and {neigh} neighbour entries of {want} after {limit:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The host that holds the reaper role.
async fn reaper_host(url: &str) -> Option<String> {
    use kvstore_backends::{EtcdConfig, EtcdStore, KvStore};
    let endpoint = url.strip_prefix("etcd://")?;
    let store = EtcdStore::new(EtcdConfig::new([endpoint.to_string()])).ok()?;
    let kv = store
        .get(&rustoverlay::state::keys::reaper())
        .await
        .ok()??;
    String::from_utf8(kv.value).ok()
}

fn rss_mb(pid: u32) -> f64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse::<f64>().ok())
        .unwrap_or(0.0)
        / 1024.0
}

/// utime + stime of a process, in seconds.
fn cpu_secs(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let after = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let f: Vec<&str> = after.split_whitespace().collect();
    let ticks: f64 = f.get(11).and_then(|v| v.parse().ok()).unwrap_or(0.0)
        + f.get(12).and_then(|v| v.parse().ok()).unwrap_or(0.0);
    ticks / 100.0
}

fn dir_mb(dir: &Path) -> f64 {
    fn walk(p: &Path) -> u64 {
        std::fs::read_dir(p)
            .map(|d| {
                d.flatten()
                    .map(|e| match e.metadata() {
                        Ok(m) if m.is_dir() => walk(&e.path()),
                        Ok(m) => m.len(),
                        Err(_) => 0,
                    })
                    .sum()
            })
            .unwrap_or(0)
    }
    walk(dir) as f64 / 1e6
}

/// Counter sums of one scrape of host `n`'s metrics: (store calls by op,
/// peer-sync updates applied).
fn scrape(n: u8) -> (BTreeMap<String, f64>, f64) {
    let out = std::process::Command::new("curl")
        .args([
            "-fsS",
            &format!("http://10.251.0.{n}:{METRICS_PORT}/metrics"),
        ])
        .output()
        .expect("curl");
    let text = String::from_utf8_lossy(&out.stdout);
    let mut calls = BTreeMap::new();
    let mut applied = 0.0;
    for line in text.lines() {
        let value = || line.rsplit(' ').next()?.parse::<f64>().ok();
        // The bench's own scrapes read the store (pool gauges): not idle load.
        if line.contains("source=\"scrape\"") {
            continue;
        }
        if let Some(rest) = line.strip_prefix("rustoverlay_store_calls_total{") {
            let op = rest
                .split("op=\"")
                .nth(1)
                .and_then(|r| r.split('"').next())
                .unwrap_or("?");
            *calls.entry(op.to_string()).or_default() += value().unwrap_or(0.0);
        } else if line.starts_with("rustoverlay_peer_sync_lag_seconds_count") {
            applied += value().unwrap_or(0.0);
        }
    }
    (calls, applied)
}

async fn run(mut lan: Lan) {
    lan.start_etcd().await;
    let url = lan.etcd_url();
    let (etcd_pid, etcd_dir) = lan.etcd_process().expect("etcd runs");
    let hosts: Vec<_> = (1..=HOSTS).map(|n| lan.host(n)).collect();
    let t_boot = Instant::now();
    let mut plugins = vec![];
    for (i, ns) in hosts.iter().enumerate() {
        let addr = format!("--metrics-addr=10.251.0.{}:{METRICS_PORT}", i + 1);
        let dir = Plugin::dir_for(&format!("scale{i}"));
        plugins.push(Plugin::start_with(ns, &dir, &format!("h{}", i + 1), &url, &[&addr]).await);
    }
    let boot = t_boot.elapsed().as_secs_f64();
    println!("{HOSTS} plugins up in {boot:.1} s");
    record(&format!("{HOSTS} plugins up"), boot, "s", None);

    let t_fill = Instant::now();
    let fills: Vec<_> = plugins
        .iter()
        .enumerate()
        .map(|(i, p)| {
            let c = p.client();
            tokio::spawn(async move {
                let net = format!("net{i}");
                network(&c, &net).await;
                join(&c, &net, &format!("j{i:02}x{:0>12}", 0)).await;
                for e in 1..PER_HOST {
                    endpoint(&c, &net, &format!("e{i:02}x{e:0>12}")).await;
                }
            })
        })
        .collect();
    for f in fills {
        f.await.unwrap();
    }
    let total = HOSTS as usize * PER_HOST;
    let fill = t_fill.elapsed().as_secs_f64();
    println!(
        "{total} endpoints created through the plugins in {fill:.1} s ({:.0}/s)",
        total as f64 / fill
    );
    record(
        &format!("{total} endpoints created through the plugins, {HOSTS} hosts at once"),
        total as f64 / fill,
        "endpoints/s",
        None,
    );
    let remote = total - PER_HOST;
    let handles: Vec<_> = plugins
        .iter()
        .map(|p| netlink_in(&p.overlay_ns_path(VNI), None))
        .collect();
    for (i, h) in handles.iter().enumerate() {
        let took = wait_for_entries(h, remote, Duration::from_secs(300)).await;
        if i == 0 {
            println!(
                "host 1 holds its {remote} remote entries {:.1} s later",
                took.as_secs_f64()
            );
            record(
                &format!("host 1 holds its {remote} remote entries, after the last create"),
                took.as_secs_f64(),
                "s",
                None,
            );
        }
    }
    // The elected reaper keeps a census of every record: wait until one is
    // elected (its first round comes a --host-ttl after start) and has read
    // the store, and print its memory apart from the others'.
    let t_reaper = Instant::now();
    let mut reaper = reaper_host(&url).await;
    while reaper.is_none() && t_reaper.elapsed() < Duration::from_secs(60) {
        tokio::time::sleep(Duration::from_millis(200)).await;
        reaper = reaper_host(&url).await;
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    let rss: Vec<f64> = plugins.iter().map(|p| rss_mb(p.pid())).collect();

    // The 21st host: a cold install of every entry.
    let ns21 = lan.host(HOSTS + 1);
    let mut p21 = Plugin::start_with(&ns21, &Plugin::dir_for("scale21"), "h21", &url, &[]).await;
    let c21 = p21.client();
    network(&c21, "net21").await;
    let t_cold = Instant::now();
    join(&c21, "net21", "j21x000000000000").await;
    let h21 = netlink_in(&p21.overlay_ns_path(VNI), None);
    let want = total; // every other host's endpoints, all of them remote here
    wait_for_entries(&h21, want, Duration::from_secs(120)).await;
    let cold = t_cold.elapsed();

    // Restart with the kernel full: nothing should be removed or re-added.
    let events = Arc::new(AtomicU64::new(0));
    let _watch = netlink_in(&p21.overlay_ns_path(VNI), Some(events.clone()));
    tokio::time::sleep(Duration::from_millis(200)).await;
    let before = events.load(Ordering::Relaxed);
    p21.kill();
    let t_restart = Instant::now();
    p21.restart(&ns21).await;
    let serving = t_restart.elapsed();
    tokio::time::sleep(Duration::from_secs(5)).await;
    let changed = events.load(Ordering::Relaxed) - before;
    let (fdb, neigh) = entries(&h21).await;

    // One idle minute on the 20 hosts, once host 21's restart has settled:
    // its writes change the store's revision, so every host's orphan sweep
    // reads once more within a renewal tick and a reaper period (10 s).
    tokio::time::sleep(Duration::from_secs(12)).await;
    let cpu0 = cpu_secs(etcd_pid);
    let s0: Vec<_> = (1..=HOSTS).map(scrape).collect();
    tokio::time::sleep(Duration::from_secs(60)).await;
    let s1: Vec<_> = (1..=HOSTS).map(scrape).collect();
    let idle_cpu = cpu_secs(etcd_pid) - cpu0;
    let mut per_op: BTreeMap<String, f64> = BTreeMap::new();
    let mut applied = 0.0;
    for (a, b) in s0.iter().zip(&s1) {
        for (op, v) in &b.0 {
            *per_op.entry(op.clone()).or_default() += v - a.0.get(op).copied().unwrap_or(0.0);
        }
        applied += b.1 - a.1;
    }

    let mean = rss.iter().sum::<f64>() / rss.len() as f64;
    let max = rss.iter().cloned().fold(0.0, f64::max);
    // Host hN is plugins[N - 1].
    let reaper_index = reaper
        .as_deref()
        .and_then(|h| h.strip_prefix('h')?.parse::<usize>().ok()?.checked_sub(1));
    let reaper_rss = reaper_index.and_then(|i| rss.get(i).copied());
    let others_max = rss
        .iter()
        .enumerate()
        .filter(|(i, _)| Some(*i) != reaper_index)
        .map(|(_, r)| *r)
        .fold(0.0, f64::max);
    println!();
    println!("Scale: {HOSTS} hosts + 1, one etcd, one overlay, {total} endpoints (all on one 2-core machine)");
    println!(
        "{:<58} mean {mean:.1} MB, max {max:.1} MB (goal < 30 MB); the reaper ({}) {:.1} MB, the others at most {others_max:.1} MB",
        "plugin resident memory, 20 hosts",
        reaper.as_deref().unwrap_or("unknown"),
        reaper_rss.unwrap_or(0.0),
    );
    println!(
        "{:<58} {:.2} s (goal < 2 s)",
        format!("cold install of {want} FDB + neighbour entries, host 21"),
        cold.as_secs_f64()
    );
    println!(
        "{:<58} serving after {:.2} s; {changed} neighbour/FDB changes in 5 s (goal 0); kernel holds {fdb} FDB, {neigh} neighbour",
        "plugin restart on host 21, kernel full",
        serving.as_secs_f64()
    );
    let ops: Vec<String> = per_op
        .iter()
        .filter(|(_, v)| **v > 0.0)
        .map(|(op, v)| format!("{op} {:.1}", v / HOSTS as f64))
        .collect();
    println!(
        "{:<58} {} (peer-sync updates applied: {:.1}/host)",
        "idle minute: store calls per host",
        if ops.is_empty() {
            "none".to_string()
        } else {
            ops.join(", ")
        },
        applied / HOSTS as f64
    );
    let run_cpu = cpu_secs(etcd_pid);
    let db_mb = std::fs::metadata(etcd_dir.join("member/snap/db"))
        .map(|m| m.len() as f64 / 1e6)
        .unwrap_or(0.0);
    let data_mb = dir_mb(&etcd_dir);
    println!(
        "{:<58} {:.2} s CPU in the idle minute, {:.1} s over the whole run; database {:.1} MB (data dir {:.1} MB, WAL preallocated)",
        "etcd",
        idle_cpu,
        run_cpu,
        db_mb,
        data_mb
    );

    let memory = format!("plugin resident memory, {HOSTS} hosts");
    record(&format!("{memory}: mean"), mean, "MB", Some("< 30 MB"));
    record(&format!("{memory}: max"), max, "MB", Some("< 30 MB"));
    if let (Some(host), Some(rss)) = (&reaper, reaper_rss) {
        record(&format!("{memory}: the reaper ({host})"), rss, "MB", None);
    }
    record(
        &format!("{memory}: the others' max"),
        others_max,
        "MB",
        None,
    );
    let restart = "plugin restart on host 21, kernel full";
    record(
        &format!("cold install of {want} FDB + neighbour entries, host 21"),
        cold.as_secs_f64(),
        "s",
        Some("< 2 s"),
    );
    record(
        &format!("{restart}: serving after"),
        serving.as_secs_f64(),
        "s",
        None,
    );
    record(
        &format!("{restart}: neighbour/FDB changes in 5 s"),
        changed as f64,
        "changes",
        Some("0"),
    );
    let all = want.to_string();
    record(
        &format!("{restart}: FDB entries after"),
        fdb as f64,
        "entries",
        Some(&all),
    );
    record(
        &format!("{restart}: neighbour entries after"),
        neigh as f64,
        "entries",
        Some(&all),
    );
    for (op, v) in &per_op {
        // Lease renewals are the only calls an idle host should make.
        let goal = (op != "keep_alive").then_some("0");
        record(
            &format!("idle minute: {op} store calls per host"),
            v / HOSTS as f64,
            "calls",
            goal,
        );
    }
    record(
        "idle minute: peer-sync updates applied per host",
        applied / HOSTS as f64,
        "updates",
        None,
    );
    record("etcd: CPU in the idle minute", idle_cpu, "s", None);
    record("etcd: CPU over the whole run", run_cpu, "s", None);
    record("etcd: database", db_mb, "MB", None);
    record("etcd: data dir (WAL preallocated)", data_mb, "MB", None);
    drop(p21);
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
