//! Concurrency storm: eight plugin processes (simulated hosts) on one etcd
//! allocate 2,000 addresses from one pool at once. No address twice, and
//! after releasing all, nothing left.

mod support;

use std::collections::HashSet;
use support::{Lan, Plugin, Store};

const POOL: &str = "10.66.0.0/20";
const HOSTS: u8 = 8;
const PER_HOST: usize = 250;
const CLIENTS_PER_HOST: usize = 5;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "needs root: scripts/test runs this tier"]
async fn storm_on_etcd() {
    storm(Store::Etcd).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "needs root: scripts/test runs this tier"]
async fn storm_on_consul() {
    storm(Store::Consul).await;
}

/// The two storms run one after the other: each is meant to load the machine
/// with its own eight plugins, not with the other's.
static ONE_STORM_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Eight plugins allocate two thousand addresses at once: no duplicates, no
/// leaks.
async fn storm(store: Store) {
    let _one = ONE_STORM_AT_A_TIME.lock().await;
    let mut lan = Lan::new();
    let url = lan.start_store(store).await;
    let hosts: Vec<_> = (1..=HOSTS).map(|n| lan.host(n)).collect();
    let mut plugins = vec![];
    for (i, ns) in hosts.iter().enumerate() {
        let dir = Plugin::dir_for(&format!("storm{i}"));
        let id = format!("h{}", i + 1);
        plugins.push(Plugin::start_with(ns, &dir, &id, &url, &Lan::plugin_args(store)).await);
    }
    // Every host claims the pool (one reference each) and asks for the gateway.
    for p in &plugins {
        let c = p.client();
        c.request_pool(POOL).await.ok();
        assert_eq!(
            c.request_gateway(POOL).await.ok()["Address"],
            "10.66.0.1/20"
        );
    }
    let mut tasks = vec![];
    for p in &plugins {
        for _ in 0..CLIENTS_PER_HOST {
            let c = p.client();
            tasks.push(tokio::spawn(async move {
                let mut got = vec![];
                for _ in 0..PER_HOST / CLIENTS_PER_HOST {
                    got.push(
                        c.request_address(POOL, "").await.ok()["Address"]
                            .as_str()
                            .unwrap()
                            .to_string(),
                    );
                }
                (c, got)
            }));
        }
    }
    let mut all = HashSet::new();
    let mut by_client = vec![];
    for t in tasks {
        let (c, got) = t.await.unwrap();
        for a in &got {
            assert!(all.insert(a.clone()), "{a} handed out twice");
        }
        by_client.push((c, got));
    }
    assert_eq!(all.len(), HOSTS as usize * PER_HOST);
    let held = support::dump_keys(&hosts[0], &url, "ipam/pool/10.66.0.0_20/addr/");
    assert_eq!(
        held.len(),
        all.len() + 1,
        "the store holds every address and the gateway, nothing more"
    );

    // Release everything, all hosts at once.
    let mut tasks = vec![];
    for (c, got) in by_client {
        tasks.push(tokio::spawn(async move {
            for a in got {
                c.release_address(POOL, a.split('/').next().unwrap())
                    .await
                    .ok();
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let held = support::dump_keys(&hosts[0], &url, "ipam/pool/10.66.0.0_20/addr/");
    assert_eq!(
        held,
        vec!["/rustoverlay/v1/ipam/pool/10.66.0.0_20/addr/10.66.0.1".to_string()],
        "only the gateway stays"
    );
    for p in &plugins {
        p.client().release_pool(POOL).await.ok();
    }
    let left = support::dump_keys(&hosts[0], &url, "ipam/");
    assert!(
        left.iter().all(|k| k.ends_with("ipam/pools")),
        "the last release leaves nothing of the pool: {left:?}"
    );
}
