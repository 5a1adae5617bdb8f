//! Several simulated hosts sharing a real etcd, driven through their plugin
//! sockets the way Docker drives them, with the test playing Docker's part of
//! moving interfaces into sandboxes. Proves peer sync and the data plane
//! across hosts without Docker in the loop.

mod support;

use serde_json::json;
use std::time::{Duration, Instant};
use support::calls::{create_network, join, wait_until, POOL};
use support::{Lan, Netns, Plugin, Sandbox, Store};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs root: scripts/test runs this tier"]
async fn two_hosts_learn_each_other_and_containers_talk_on_etcd() {
    two_hosts_learn_each_other_and_containers_talk(Store::Etcd).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs root: scripts/test runs this tier"]
async fn two_hosts_learn_each_other_and_containers_talk_on_consul() {
    two_hosts_learn_each_other_and_containers_talk(Store::Consul).await;
}

async fn two_hosts_learn_each_other_and_containers_talk(store: Store) {
    let mut lan = Lan::new();
    let url = lan.start_store(store).await;
    let extra = Lan::plugin_args(store);
    let (ns1, ns2): (Netns, Netns) = (lan.host(1), lan.host(2));
    let p1 = Plugin::start_with(&ns1, &Plugin::dir_for("mh1"), "h1", &url, &extra).await;
    let p2 = Plugin::start_with(&ns2, &Plugin::dir_for("mh2"), "h2", &url, &extra).await;
    let (c1, c2) = (p1.client(), p2.client());
    create_network(&c1, "net-on-h1").await;
    create_network(&c2, "net-on-h2").await;

    let (a1, src1, mac1) = join(&c1, "net-on-h1", "ep1aaaaaaaaaaaa").await;
    let (a2, src2, mac2) = join(&c2, "net-on-h2", "ep2bbbbbbbbbbbb").await;
    assert_ne!(a1, a2, "the two hosts got the same address");
    let (s1, s2) = (Sandbox::new(), Sandbox::new());
    s1.take(&ns1, &src1, &a1);
    s2.take(&ns2, &src2, &a2);

    // Each host holds the other's endpoint: FDB to its VTEP, neighbour to its MAC.
    let vni = 256;
    wait_until("h2 learns h1's endpoint", Duration::from_secs(5), || {
        let fdb = p2.in_overlay(
            vni,
            &["bridge", "fdb", "show", "dev", &format!("ro-vx-{vni}")],
        );
        fdb.contains(&mac1) && fdb.contains("dst 10.251.0.1")
    })
    .await;
    wait_until("h1 learns h2's endpoint", Duration::from_secs(5), || {
        let neigh = p1.in_overlay(
            vni,
            &["ip", "neigh", "show", "dev", &format!("ro-vx-{vni}")],
        );
        neigh.contains(&mac2) && neigh.contains(a2.split('/').next().unwrap())
    })
    .await;
    let ip2 = a2.split('/').next().unwrap();
    let ip1 = a1.split('/').next().unwrap();
    if !s1.ping(ip2) {
        for (name, p) in [("h1", &p1), ("h2", &p2)] {
            eprintln!(
                "--- {name} overlay links\n{}",
                p.in_overlay(vni, &["ip", "-d", "link"])
            );
            eprintln!(
                "--- {name} fdb\n{}",
                p.in_overlay(vni, &["bridge", "fdb", "show"])
            );
            eprintln!(
                "--- {name} neigh\n{}",
                p.in_overlay(vni, &["ip", "neigh", "show"])
            );
        }
        let out = std::process::Command::new("ip")
            .args(["-n", &s1.name, "-d", "addr"])
            .output()
            .unwrap();
        eprintln!("--- sandbox 1\n{}", String::from_utf8_lossy(&out.stdout));
        let out = std::process::Command::new("ip")
            .args(["-n", &ns1.name, "-d", "link"])
            .output()
            .unwrap();
        eprintln!("--- host 1\n{}", String::from_utf8_lossy(&out.stdout));
        if std::env::var("ROTEST_PAUSE").is_ok() {
            eprintln!("PAUSED: sandboxes {} {}", s1.name, s2.name);
            std::thread::sleep(Duration::from_secs(240));
        }
        panic!("h1's container cannot reach h2's");
    }
    assert!(s2.ping(ip1), "h2's container cannot reach h1's");

    // The bridge has one MAC, whatever ports come and go: containers keep
    // it in their neighbour cache for the resolver's address on the bridge.
    let bridge = |p: &Plugin| p.in_overlay(vni, &["ip", "-br", "link", "show", "ro-br-256"]);
    assert!(
        bridge(&p2).contains("02:53:0a:fb:00:02"),
        "h2's bridge has no fixed MAC: {}",
        bridge(&p2)
    );
    join(&c2, "net-on-h2", "ep4dddddddddddd").await;
    assert!(
        bridge(&p2).contains("02:53:0a:fb:00:02"),
        "h2's bridge changed its MAC when a port joined: {}",
        bridge(&p2)
    );

    // An endpoint removed on h1 disappears from h2's kernel.
    c1.call(
        "NetworkDriver.Leave",
        json!({"NetworkID": "net-on-h1", "EndpointID": "ep1aaaaaaaaaaaa"}),
    )
    .await
    .ok();
    c1.call(
        "NetworkDriver.DeleteEndpoint",
        json!({"NetworkID": "net-on-h1", "EndpointID": "ep1aaaaaaaaaaaa"}),
    )
    .await
    .ok();
    let took = wait_until("h2 forgets h1's endpoint", Duration::from_secs(2), || {
        let fdb = p2.in_overlay(
            vni,
            &["bridge", "fdb", "show", "dev", &format!("ro-vx-{vni}")],
        );
        let neigh = p2.in_overlay(
            vni,
            &["ip", "neigh", "show", "dev", &format!("ro-vx-{vni}")],
        );
        let gone = !fdb.contains(&mac1) && !neigh.contains(ip1);
        if !gone {
            eprintln!("still there: fdb={fdb:?} neigh={neigh:?}");
        }
        gone
    })
    .await;
    eprintln!("peer removal reached the other host in {took:?}");
    // h1 has no endpoint left: no devices for the network.
    assert!(
        !p1.has_overlay(vni),
        "h1 keeps devices without a local endpoint"
    );
    assert!(p2.has_overlay(vni));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs root: scripts/test runs this tier"]
async fn a_restarted_plugin_reconciles_stale_and_missing_entries_on_etcd() {
    a_restarted_plugin_reconciles_stale_and_missing_entries(Store::Etcd).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs root: scripts/test runs this tier"]
async fn a_restarted_plugin_reconciles_stale_and_missing_entries_on_consul() {
    a_restarted_plugin_reconciles_stale_and_missing_entries(Store::Consul).await;
}

async fn a_restarted_plugin_reconciles_stale_and_missing_entries(store: Store) {
    let mut lan = Lan::new();
    let url = lan.start_store(store).await;
    let extra = Lan::plugin_args(store);
    let (ns1, ns2) = (lan.host(1), lan.host(2));
    let p1 = Plugin::start_with(&ns1, &Plugin::dir_for("rc1"), "h1", &url, &extra).await;
    let mut p2 = Plugin::start_with(&ns2, &Plugin::dir_for("rc2"), "h2", &url, &extra).await;
    let (c1, c2) = (p1.client(), p2.client());
    create_network(&c1, "n1").await;
    create_network(&c2, "n2").await;
    let (_, _, mac_keep) = join(&c1, "n1", "keepkeepkeepkeep").await;
    let (_, _, mac_gone) = join(&c1, "n1", "gonegonegonegone").await;
    join(&c2, "n2", "h2h2h2h2h2h2h2h2").await;
    let vni = 256;
    let fdb = |p: &Plugin| {
        p.in_overlay(
            vni,
            &["bridge", "fdb", "show", "dev", &format!("ro-vx-{vni}")],
        )
    };
    wait_until("h2 learns both", Duration::from_secs(5), || {
        let f = fdb(&p2);
        f.contains(&mac_keep) && f.contains(&mac_gone)
    })
    .await;

    // While h2's plugin is down, one endpoint goes and another comes.
    p2.kill();
    c1.call(
        "NetworkDriver.DeleteEndpoint",
        json!({"NetworkID": "n1", "EndpointID": "gonegonegonegone"}),
    )
    .await
    .ok();
    let (_, _, mac_new) = join(&c1, "n1", "newnewnewnewnewn").await;
    p2.restart(&ns2).await;
    wait_until("h2 reconciles", Duration::from_secs(5), || {
        let f = fdb(&p2);
        let ok = f.contains(&mac_keep) && f.contains(&mac_new) && !f.contains(&mac_gone);
        if !ok {
            eprintln!("h2 fdb now: {f:?} (keep {mac_keep}, new {mac_new}, gone {mac_gone})");
        }
        ok
    })
    .await;
    assert!(p2.log_text().contains("peers reconciled"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs root: scripts/test runs this tier"]
async fn a_dead_hosts_entries_go_with_its_lease_and_come_back_with_it_on_etcd() {
    a_dead_hosts_entries_go_with_its_lease_and_come_back_with_it(Store::Etcd).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs root: scripts/test runs this tier"]
async fn a_dead_hosts_entries_go_with_its_lease_and_come_back_with_it_on_consul() {
    a_dead_hosts_entries_go_with_its_lease_and_come_back_with_it(Store::Consul).await;
}

async fn a_dead_hosts_entries_go_with_its_lease_and_come_back_with_it(store: Store) {
    let mut lan = Lan::new();
    let url = lan.start_store(store).await;
    let extra = Lan::plugin_args(store);
    let (ns1, ns2) = (lan.host(1), lan.host(2));
    let ttl: Vec<&str> = ["--host-ttl", "2"]
        .into_iter()
        .chain(extra.iter().copied())
        .collect();
    let mut p1 = Plugin::start_with(&ns1, &Plugin::dir_for("lv1"), "h1", &url, &ttl).await;
    let p2 = Plugin::start_with(&ns2, &Plugin::dir_for("lv2"), "h2", &url, &ttl).await;
    let (c1, c2) = (p1.client(), p2.client());
    create_network(&c1, "n1").await;
    create_network(&c2, "n2").await;
    let (_, _, mac1) = join(&c1, "n1", "deaddeaddeaddead").await;
    join(&c2, "n2", "alivealivealive1").await;
    let vni = 256;
    let fdb = |p: &Plugin| {
        p.in_overlay(
            vni,
            &["bridge", "fdb", "show", "dev", &format!("ro-vx-{vni}")],
        )
    };
    wait_until("h2 learns h1's endpoint", Duration::from_secs(5), || {
        fdb(&p2).contains(&mac1)
    })
    .await;

    // h1 stops renewing: within TTL + 2 s h2 drops its entries.
    p1.kill();
    let took = wait_until(
        "h2 drops the dead host's entries",
        Duration::from_secs(2 + 2 + 2),
        || !fdb(&p2).contains(&mac1),
    )
    .await;
    eprintln!("dead host's entries dropped {took:?} after the kill (TTL 2 s)");
    // The endpoint itself is not reclaimed: the host may come back.
    p1.restart(&ns1).await;
    wait_until(
        "h2 re-adds the host's entries when it registers again",
        Duration::from_secs(5),
        || fdb(&p2).contains(&mac1),
    )
    .await;
}

fn gc(ns: &Netns, url: &str, extra: &[&str]) -> String {
    let out = std::process::Command::new("ip")
        .args([
            "netns",
            "exec",
            &ns.name,
            env!("CARGO_BIN_EXE_rustoverlay"),
            "gc",
            "--store",
            url,
        ])
        .args(extra)
        .output()
        .expect("run rustoverlay gc");
    assert!(
        out.status.success(),
        "gc failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs root: scripts/test runs this tier"]
async fn gc_lists_and_frees_unbound_addresses_on_etcd() {
    gc_lists_and_frees_unbound_addresses(Store::Etcd).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs root: scripts/test runs this tier"]
async fn gc_lists_and_frees_unbound_addresses_on_consul() {
    gc_lists_and_frees_unbound_addresses(Store::Consul).await;
}

async fn gc_lists_and_frees_unbound_addresses(store: Store) {
    let mut lan = Lan::new();
    let url = lan.start_store(store).await;
    let extra = Lan::plugin_args(store);
    let ns1 = lan.host(1);
    let p1 = Plugin::start_with(&ns1, &Plugin::dir_for("gc1"), "h1", &url, &extra).await;
    let c1 = p1.client();
    create_network(&c1, "n1").await;
    join(&c1, "n1", "boundboundbound1").await;
    // An address whose endpoint never came (a crash between the two calls).
    let leaked = c1.request_address(POOL, "").await.ok()["Address"]
        .as_str()
        .unwrap()
        .to_string();
    let leaked_ip = leaked.split('/').next().unwrap();

    // gc watches for --min-age before it lists (unit tests show that what
    // changes meanwhile is spared).
    let listed = gc(&ns1, &url, &["--min-age", "1"]);
    assert!(
        listed.contains(&format!("address {leaked_ip} ")),
        "{listed}"
    );
    assert_eq!(
        listed.matches("bound to no endpoint").count(),
        1,
        "only the leaked one: {listed}"
    );
    assert!(listed.contains("--apply"));
    // Listing changed nothing.
    assert!(
        !support::dump_keys(
            &ns1,
            &url,
            &format!("ipam/pool/10.77.0.0_24/addr/{leaked_ip}")
        )
        .is_empty(),
        "gc without --apply freed {leaked_ip}"
    );
    let applied = gc(&ns1, &url, &["--min-age", "1", "--apply"]);
    assert!(applied.contains(&format!("freed {leaked_ip}")), "{applied}");
    c1.request_address(POOL, leaked_ip).await.ok();
    c1.release_address(POOL, leaked_ip).await.ok();
    let after = gc(&ns1, &url, &["--min-age", "0"]);
    assert!(after.contains("nothing to collect"), "{after}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs root: scripts/test runs this tier"]
async fn orphaned_endpoints_are_removed_and_their_addresses_freed() {
    let mut lan = Lan::new();
    let url = lan.start_store(Store::Etcd).await;
    let ns1 = lan.host(1);
    let args = ["--host-ttl", "2", "--orphan-age", "1"];
    let p1 = Plugin::start_with(&ns1, &Plugin::dir_for("orph"), "h1", &url, &args).await;
    let c1 = p1.client();
    create_network(&c1, "n1").await;
    let (joined, _, _) = join(&c1, "n1", "joinedjoinedjoin").await;
    // An endpoint whose container went while the store was unreachable: Docker
    // never joins it again nor deletes it.
    let orphan = c1.request_address(POOL, "").await.ok()["Address"]
        .as_str()
        .unwrap()
        .to_string();
    c1.call(
        "NetworkDriver.CreateEndpoint",
        json!({"NetworkID": "n1", "EndpointID": "orphanorphanorph", "Interface": {"Address": orphan}}),
    )
    .await
    .ok();
    let orphan_ip = orphan.split('/').next().unwrap().to_string();
    let start = Instant::now();
    loop {
        let r = c1
            .call(
                "NetworkDriver.EndpointOperInfo",
                json!({"NetworkID": "n1", "EndpointID": "orphanorphanorph"}),
            )
            .await;
        if r.status != 200 {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "the orphan was never removed"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    // Its address is free again; the joined endpoint is untouched.
    c1.request_address(POOL, &orphan_ip).await.ok();
    c1.call(
        "NetworkDriver.EndpointOperInfo",
        json!({"NetworkID": "n1", "EndpointID": "joinedjoinedjoin"}),
    )
    .await
    .ok();
    let e = c1
        .request_address(POOL, joined.split('/').next().unwrap())
        .await
        .err();
    assert!(e.contains("already in use"), "{e}");
}

#[tokio::test]
#[ignore = "needs root: scripts/test runs this tier"]
async fn a_second_plugin_with_a_live_hosts_id_and_another_vtep_refuses_to_run() {
    support::require_root();
    let mut lan = Lan::new();
    let url = lan.start_store(Store::Etcd).await;
    let extra = Lan::plugin_args(Store::Etcd);
    let (ns1, ns2) = (lan.host(1), lan.host(2));
    // A cloned machine: the same host ID on another VTEP.
    let p1 = Plugin::start_with(&ns1, &Plugin::dir_for("id1"), "clone", &url, &extra).await;
    let registered = || !support::dump_keys(&ns1, &url, "hosts/clone").is_empty();
    wait_until("h1 registers", Duration::from_secs(10), registered).await;
    let (status, log, ran) = Plugin::run_to_exit(
        &ns2,
        &Plugin::dir_for("id2"),
        "clone",
        &url,
        &extra,
        Duration::from_secs(30),
    )
    .await;
    eprintln!("the clone exited with {status} after {ran:?}");
    assert!(!status.success(), "the clone must exit non-zero:\n{log}");
    assert!(
        log.contains("already registered by a live plugin with VTEP") && log.contains("--host-id"),
        "the clone's message says what clashes and what to do:\n{log}"
    );
    // The first host is untouched: still registered, still serving.
    assert!(registered(), "h1 keeps its registration");
    p1.client().call("Plugin.Activate", json!({})).await.ok();
    // A restart of the same machine (same VTEP) takes its registration over.
    drop(p1);
    let p1 = Plugin::start_with(&ns1, &Plugin::dir_for("id1b"), "clone", &url, &extra).await;
    p1.client().call("Plugin.Activate", json!({})).await.ok();
}
