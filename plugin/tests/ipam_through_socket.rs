//! IPAM promises through the real socket: concurrent clients never share an
//! address, exhaustion is clean, release leaves nothing, and a crash never
//! makes the plugin hand out an address twice.

mod support;

use std::collections::HashSet;
use support::{Netns, Plugin};

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "needs root: scripts/test runs this tier"]
async fn sixteen_concurrent_clients_exhaust_a_slash_22_without_duplicates() {
    let ns = Netns::new();
    let dir = Plugin::dir_for("conc");
    let mut plugin = Plugin::start(&ns, &dir, "h1").await;
    let c = plugin.client();
    let pool = "10.90.0.0/22";
    c.request_pool(pool).await.ok();
    let gw = c.request_gateway(pool).await.ok()["Address"]
        .as_str()
        .unwrap()
        .to_string();
    assert_eq!(gw, "10.90.0.1/22");

    let mut tasks = vec![];
    for _ in 0..16 {
        let c = c.clone();
        tasks.push(tokio::spawn(async move {
            let mut mine = vec![];
            loop {
                let r = c.request_address(pool, "").await;
                if r.status == 200 {
                    mine.push(r.body["Address"].as_str().unwrap().to_string());
                } else {
                    let e = r.err();
                    assert!(e.contains("no free address"), "unexpected error: {e}");
                    return mine;
                }
            }
        }));
    }
    let mut all = vec![];
    for t in tasks {
        all.extend(t.await.unwrap());
    }
    let distinct: HashSet<_> = all.iter().collect();
    assert_eq!(all.len(), 1021, "1,024 - network - broadcast - gateway");
    assert_eq!(distinct.len(), 1021, "an address was handed out twice");
    assert!(!distinct.contains(&gw));

    // Release everything concurrently too.
    let mut tasks = vec![];
    for chunk in all.chunks(64) {
        let c = c.clone();
        let chunk: Vec<String> = chunk.to_vec();
        tasks.push(tokio::spawn(async move {
            for a in chunk {
                c.release_address(pool, a.split('/').next().unwrap())
                    .await
                    .ok();
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    c.release_address(pool, "10.90.0.1").await.ok();
    plugin.stop();
    let keys = support::store_keys(&dir).await;
    let addrs: Vec<_> = keys.iter().filter(|k| k.contains("/addr/")).collect();
    // Only the gateway stays until the pool goes.
    assert_eq!(addrs.len(), 1, "left behind: {addrs:?}");
    assert!(addrs[0].ends_with("/addr/10.90.0.1"));

    plugin.restart(&ns).await;
    let c = plugin.client();
    c.release_pool(pool).await.ok();
    plugin.stop();
    let keys = support::store_keys(&dir).await;
    assert!(
        keys.iter().all(|k| !k.contains("/ipam/pool/")),
        "the pool left keys: {keys:?}"
    );
    plugin.restart(&ns).await;
    let c = plugin.client();
    // Free again: the same subnet can be claimed, and a different overlapping one too.
    c.request_pool("10.90.0.0/16").await.ok();
    c.release_pool("10.90.0.0/16").await.ok();
    c.request_pool(pool).await.ok();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs root: scripts/test runs this tier"]
async fn sigkill_and_restart_never_hands_out_an_address_twice() {
    let ns = Netns::new();
    let dir = Plugin::dir_for("crash");
    let mut plugin = Plugin::start(&ns, &dir, "h1").await;
    let pool = "10.91.0.0/24";
    let mut before = HashSet::new();
    {
        let c = plugin.client();
        c.request_pool(pool).await.ok();
        c.request_gateway(pool).await.ok();
        for _ in 0..50 {
            before.insert(
                c.request_address(pool, "").await.ok()["Address"]
                    .as_str()
                    .unwrap()
                    .to_string(),
            );
        }
        // Some released ones wait in the reuse queue.
        for a in ["10.91.0.10", "10.91.0.11"] {
            c.release_address(pool, a).await.ok();
            before.remove(&format!("{a}/24"));
        }
        // Fire a burst and crash in the middle of it.
        let mut inflight = vec![];
        for _ in 0..20 {
            let c = c.clone();
            inflight.push(tokio::spawn(
                async move { c.request_address(pool, "").await },
            ));
        }
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        plugin.kill();
        for t in inflight {
            // Answers that made it out before the crash are allocations too.
            if let Ok(r) = t.await {
                if r.status == 200 {
                    before.insert(r.body["Address"].as_str().unwrap().to_string());
                }
            }
        }
    }
    plugin.restart(&ns).await;
    let c = plugin.client();
    let mut after = HashSet::new();
    loop {
        let r = c.request_address(pool, "").await;
        if r.status != 200 {
            assert!(r.err().contains("no free address"));
            break;
        }
        let a = r.body["Address"].as_str().unwrap().to_string();
        assert!(
            !before.contains(&a),
            "{a} was handed out before the crash and again after it"
        );
        assert!(
            after.insert(a.clone()),
            "{a} handed out twice after the restart"
        );
    }
    assert!(
        after.contains("10.91.0.10/24") && after.contains("10.91.0.11/24"),
        "released addresses come back last"
    );
}
