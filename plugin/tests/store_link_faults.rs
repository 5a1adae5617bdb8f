//! Docker's calls over a store link that keeps breaking (tier 2: the real
//! plugin and a real etcd, the link cut and mended with iptables in the
//! host's own namespace). A request that reached etcd may be applied while
//! its answer is lost with the cut: the plugin must find out what happened
//! (read back) instead of leaving an allocation nobody owns.
//!
//! The test drives the calls as Docker and its user do: a failed
//! `docker network create` or `docker run` is rolled back the way Docker
//! rolls it back and run again until it succeeds; clean-up calls are made
//! once, as Docker makes them (it logs a failure and goes on). Afterwards
//! the store holds nothing but the registration: nothing leaked, and no
//! address was ever on two live endpoints.

mod support;

use serde_json::json;
use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use support::{Client, Lan, Plugin, Store, LAN_GATEWAY};

const POOL: &str = "10.77.0.0/24";
/// Docker calls, tries each until success: far more than a flapping link
/// with sub-second cuts needs, but bounded.
const TRIES: usize = 40;

/// `docker network create`: RequestPool, the gateway, CreateNetwork; on a
/// failure Docker releases what it got, and the user runs it again.
async fn network_create(c: &Client, network_id: &str) -> usize {
    for attempt in 1..=TRIES {
        if c.request_pool(POOL).await.status != 200 {
            continue;
        }
        let gw = c.request_gateway(POOL).await;
        if gw.status != 200 {
            c.release_pool(POOL).await;
            continue;
        }
        let gw = gw.body["Address"].as_str().unwrap_or_default().to_string();
        let created = c
            .call(
                "NetworkDriver.CreateNetwork",
                json!({"NetworkID": network_id, "IPv4Data": [{"AddressSpace": "RustOverlayLocal", "Pool": POOL, "Gateway": gw}]}),
            )
            .await;
        if created.status == 200 {
            return attempt;
        }
        c.release_address(POOL, gw.split('/').next().unwrap_or_default())
            .await;
        c.release_pool(POOL).await;
    }
    panic!("docker network create {network_id} never succeeded");
}

/// `docker run` (with `--ip` when `ip` is given): RequestAddress,
/// CreateEndpoint, Join; on a failure Docker undoes the steps that
/// succeeded, and the user runs it again. Returns the address.
async fn run(c: &Client, network_id: &str, endpoint_id: &str, ip: &str) -> (String, usize) {
    for attempt in 1..=TRIES {
        let got = c.request_address(POOL, ip).await;
        if got.status != 200 {
            continue;
        }
        let addr = got.body["Address"].as_str().unwrap().to_string();
        let bare = addr.split('/').next().unwrap().to_string();
        let created = c
            .call(
                "NetworkDriver.CreateEndpoint",
                json!({"NetworkID": network_id, "EndpointID": endpoint_id, "Interface": {"Address": addr}}),
            )
            .await;
        if created.status != 200 {
            c.release_address(POOL, &bare).await;
            continue;
        }
        let joined = c
            .call(
                "NetworkDriver.Join",
                json!({"NetworkID": network_id, "EndpointID": endpoint_id, "SandboxKey": "/x"}),
            )
            .await;
        if joined.status == 200 {
            return (bare, attempt);
        }
        delete_endpoint(c, network_id, endpoint_id).await;
        c.release_address(POOL, &bare).await;
    }
    panic!("docker run {endpoint_id} never succeeded");
}

async fn delete_endpoint(c: &Client, network_id: &str, endpoint_id: &str) {
    c.call(
        "NetworkDriver.DeleteEndpoint",
        json!({"NetworkID": network_id, "EndpointID": endpoint_id}),
    )
    .await;
}

/// `docker rm`: Leave, DeleteEndpoint, ReleaseAddress, once each.
async fn rm(c: &Client, network_id: &str, endpoint_id: &str, ip: &str) {
    c.call(
        "NetworkDriver.Leave",
        json!({"NetworkID": network_id, "EndpointID": endpoint_id}),
    )
    .await;
    delete_endpoint(c, network_id, endpoint_id).await;
    c.release_address(POOL, ip).await;
}

/// `docker network rm`: DeleteNetwork, the gateway, ReleasePool, once each.
async fn network_rm(c: &Client, network_id: &str, gateway: &str) {
    c.call(
        "NetworkDriver.DeleteNetwork",
        json!({"NetworkID": network_id}),
    )
    .await;
    c.release_address(POOL, gateway).await;
    c.release_pool(POOL).await;
}

/// Cut and mend the host's link to the store at random, until told to stop.
fn flap(ns: String, stop: Arc<AtomicBool>) -> std::thread::JoinHandle<usize> {
    std::thread::spawn(move || {
        let mut cuts = 0;
        while !stop.load(Ordering::SeqCst) {
            std::thread::sleep(Duration::from_millis(rand_ms(30, 400)));
            support::block_ip(&ns, LAN_GATEWAY, true);
            cuts += 1;
            std::thread::sleep(Duration::from_millis(rand_ms(30, 400)));
            support::block_ip(&ns, LAN_GATEWAY, false);
        }
        cuts
    })
}

fn rand_ms(lo: u64, hi: u64) -> u64 {
    use std::hash::{BuildHasher, RandomState};
    lo + RandomState::new().hash_one(Instant::now()) % (hi - lo)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs root: scripts/test runs this tier"]
async fn docker_calls_over_a_flapping_store_link_succeed_on_retry_and_leave_nothing() {
    let mut lan = Lan::new();
    let url = lan.start_store(Store::Etcd).await;
    let ns1 = lan.host(1);
    let args = [
        "--store-timeout",
        "0.3",
        "--request-timeout",
        "10",
        "--host-ttl",
        "5",
        "--orphan-age",
        "3",
    ];
    let p1 = Plugin::start_with(&ns1, &Plugin::dir_for("flap1"), "h1", &url, &args).await;
    let c1 = p1.client();

    let stop = Arc::new(AtomicBool::new(false));
    let flapper = flap(ns1.name.clone(), stop.clone());
    let mut retries = 0;
    let mut calls = 0;
    for round in 0..4 {
        let net = format!("flapnet{round}");
        retries += network_create(&c1, &net).await - 1;
        calls += 1;
        let gateway = "10.77.0.1";
        // Two containers at a time, one of them by --ip, so that two live
        // endpoints could collide.
        let mut live: Vec<(String, String)> = vec![];
        for i in 0..10 {
            let ep = format!("flap{round}ep{i:02}aaaaaaaaaaaaaaaa");
            let ip = if i % 2 == 0 {
                format!("10.77.0.{}", 100 + i)
            } else {
                String::new()
            };
            let (addr, attempts) = run(&c1, &net, &ep, &ip).await;
            retries += attempts - 1;
            calls += 1;
            if !ip.is_empty() {
                assert_eq!(addr, ip, "--ip {ip} got {addr}");
            }
            assert!(
                live.iter().all(|(_, a)| *a != addr),
                "{addr} handed to {ep} while a live endpoint has it: {live:?}"
            );
            live.push((ep, addr));
            if live.len() > 2 {
                let (ep, addr) = live.remove(0);
                rm(&c1, &net, &ep, &addr).await;
            }
        }
        for (ep, addr) in live {
            rm(&c1, &net, &ep, &addr).await;
        }
        network_rm(&c1, &net, gateway).await;
    }
    stop.store(true, Ordering::SeqCst);
    let cuts = flapper.join().unwrap();
    let read_backs = p1.log_text().matches("answer was lost").count();
    eprintln!(
        "{calls} Docker operations over {cuts} link cuts: {retries} run again, \
         {read_backs} store writes read back after a lost answer"
    );
    assert!(cuts >= 5, "the link was cut only {cuts} times");

    // Clean-up calls that failed for good are Docker's to forget and the
    // plugin's to finish: the orphan sweep and the unbound-address
    // collection (--orphan-age 3 s, looked at every 5 s).
    let start = Instant::now();
    loop {
        // What stays for good: registrations, the reaper role, the VNI
        // cursor, and the index of claimed subnets (empty).
        let left: BTreeSet<String> = support::dump(&ns1, &url, "")
            .into_iter()
            .filter(|(k, v)| {
                !(k.contains("/hosts/")
                    || k.ends_with("/reaper")
                    || k.ends_with("/vni/next")
                    || (k.ends_with("/ipam/pools") && !v.contains('/')))
            })
            .map(|(k, v)| format!("{k} {v}"))
            .collect();
        if left.is_empty() {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "left in the store after Docker's clean-up: {left:#?}\n{}",
            p1.log_text()
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    eprintln!("store clean {:?} after the last call", start.elapsed());
}
