//! The conformance suite and Consul-specific behaviour of `ConsulStore`.
//!
//! Every check runs against its own in-process `consul-test-server` (test
//! support, never part of the product), so none is skipped for want of a
//! Consul binary. With `CONSUL_HTTP_ADDR` set (and `CONSUL_HTTP_TOKEN`,
//! `CONSUL_CACERT`, `CONSUL_CLIENT_CERT`, `CONSUL_CLIENT_KEY` as needed),
//! `real_consul_conformance` also runs the whole suite, one check after the
//! other, against that Consul; its agents need `session_ttl_min = "1s"` for
//! the suite's 2 s leases (`CONSUL_SESSION_TTL_MIN` tells the store
//! otherwise). All traffic stays on 127.0.0.1 unless that variable says so.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use consul_test_server::{Config, Failure, TestServer, TlsConfig};
use futures::StreamExt;
use kvstore_backends::{
    Compare, ConsulConfig, ConsulStore, EventKind, KvStore, LeaseId, Op, OpResult, Revision,
    StoreError, TlsFiles, Txn, WatchEvent, WatchFidelity, WatchStream,
};

/// Bound for anything that should happen soon; only turns hangs into failures.
const PATIENCE: Duration = Duration::from_secs(30);

fn test_config() -> Config {
    Config {
        // Like a Consul agent configured with session_ttl_min = "1s", so the
        // suite's 2 s leases are not raised to Consul's default 10 s.
        session_ttl_min: Duration::from_secs(1),
        ..Config::default()
    }
}

async fn server() -> TestServer {
    TestServer::start(test_config())
        .await
        .expect("start the Consul test server")
}

fn config(address: String) -> ConsulConfig {
    let mut config = ConsulConfig::new(address);
    config.session_ttl_min = Duration::from_secs(1);
    config.request_timeout = Duration::from_secs(5);
    config
}

fn store(server: &TestServer) -> ConsulStore {
    ConsulStore::new(config(server.address())).expect("store config")
}

kvstore_backends::conformance_tests!({
    let server = server().await;
    // The store is dropped before the server (tuple fields drop in order).
    (Arc::new(store(&server)), server)
});

/// A port nobody listens on right now.
fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("bind a free port on 127.0.0.1")
        .port()
}

async fn next(watch: &mut WatchStream, what: &str) -> Option<kvstore_backends::Result<WatchEvent>> {
    tokio::time::timeout(PATIENCE, watch.next())
        .await
        .unwrap_or_else(|_| panic!("{what}: no watch item within {PATIENCE:?}"))
}

async fn next_event(watch: &mut WatchStream, what: &str) -> WatchEvent {
    match next(watch, what).await {
        Some(Ok(ev)) => ev,
        other => panic!("{what}: expected an event, got {other:?}"),
    }
}

/// Retries `call` while Consul is unreachable (just restarted), within PATIENCE.
async fn when_available<T, F, Fut>(what: &str, mut call: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = kvstore_backends::Result<T>>,
{
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        match call().await {
            Ok(v) => return v,
            Err(e) if e.is_transient() && tokio::time::Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(e) => panic!("{what}: {e}"),
        }
    }
}

/// Puts `key` and checks that the watch's next event is exactly that put:
/// nothing invented before it (by a reap, say), nothing missed.
async fn put_comes_next(store: &ConsulStore, watch: &mut WatchStream, key: &str, what: &str) {
    let rev = store.put(key, b"v".to_vec()).await.expect("put");
    let ev = next_event(watch, what).await;
    assert_eq!(
        (ev.kv.key.as_str(), ev.kind, ev.revision()),
        (key, EventKind::Put, rev),
        "{what}"
    );
}

fn kinds(events: &[WatchEvent]) -> Vec<(String, EventKind, Revision)> {
    events
        .iter()
        .map(|e| (e.kv.key.clone(), e.kind, e.kv.mod_revision))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn real_consul_conformance() {
    let Ok(address) = std::env::var("CONSUL_HTTP_ADDR") else {
        eprintln!("CONSUL_HTTP_ADDR is not set: the suite ran against the test server only");
        return;
    };
    let env = |name: &str| std::env::var(name).ok().filter(|v| !v.is_empty());
    let mut config = ConsulConfig::new(address);
    config.token = env("CONSUL_HTTP_TOKEN");
    config.session_ttl_min = env("CONSUL_SESSION_TTL_MIN")
        .map(|s| Duration::from_secs(s.trim_end_matches('s').parse().expect("seconds")))
        .unwrap_or(Duration::from_secs(1));
    if let Some(ca) = env("CONSUL_CACERT") {
        config.tls = Some(TlsFiles {
            ca: ca.into(),
            cert: env("CONSUL_CLIENT_CERT").map(PathBuf::from),
            key: env("CONSUL_CLIENT_KEY").map(PathBuf::from),
        });
    }
    // One check after the other: the checks expect nobody else to write
    // meanwhile, and each keeps to its own unique prefix.
    kvstore_backends::conformance::run_all(|| {
        let config = config.clone();
        async move { Arc::new(ConsulStore::new(config).expect("store config")) }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn is_a_latest_state_store_also_behind_decorators() {
    let server = server().await;
    let store: Arc<dyn KvStore> = Arc::new(store(&server));
    assert_eq!(store.backend_name(), "consul");
    assert_eq!(store.watch_fidelity(), WatchFidelity::LatestState);
    let wrapped = kvstore_backends::TimeoutStore::new(
        kvstore_backends::CountingStore::new(Arc::clone(&store)),
        Duration::from_secs(5),
    );
    assert_eq!(wrapped.watch_fidelity(), WatchFidelity::LatestState);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lazy_connect_then_consul_comes_up() {
    let port = free_port();
    let mut config = config(format!("127.0.0.1:{port}"));
    config.dial_timeout = Duration::from_secs(1);
    config.request_timeout = Duration::from_secs(2);
    // Building never connects, so it works with nothing listening.
    let store = ConsulStore::new(config).expect("config");
    for (what, result) in [
        ("get", store.get("/k").await.map(drop)),
        ("put", store.put("/k", b"v".to_vec()).await.map(drop)),
        ("range", store.range("/").await.map(drop)),
        ("watch", store.watch("/", 0).await.map(drop)),
        (
            "grant",
            store.grant_lease(Duration::from_secs(5)).await.map(drop),
        ),
    ] {
        match result {
            Err(StoreError::Unavailable(msg)) => {
                assert!(
                    msg.contains(&format!("127.0.0.1:{port}")),
                    "{what}: the message names the address: {msg}"
                );
                assert!(
                    msg.contains("connect"),
                    "{what}: the message says what failed: {msg}"
                );
            }
            other => panic!("{what} with Consul down: expected Unavailable, got {other:?}"),
        }
    }
    let addr = format!("127.0.0.1:{port}").parse().expect("address");
    let _server = TestServer::start_on(addr, test_config())
        .await
        .expect("server");
    let rev = store
        .put("/k", b"v".to_vec())
        .await
        .expect("put once Consul runs");
    let kv = store.get("/k").await.expect("get").expect("key");
    assert_eq!((kv.value.as_slice(), kv.mod_revision), (&b"v"[..], rev));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn cas_races_between_stores_lose_no_increment() {
    // Several stores are several hosts: each has its own writer session.
    const STORES: usize = 4;
    const INCREMENTS: usize = 25;
    let server = server().await;
    let stores: Vec<Arc<ConsulStore>> = (0..STORES).map(|_| Arc::new(store(&server))).collect();
    let conflicts = Arc::new(AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for store in &stores {
        let (store, conflicts) = (Arc::clone(store), Arc::clone(&conflicts));
        tasks.push(tokio::spawn(async move {
            let mut revisions = Vec::new();
            for _ in 0..INCREMENTS {
                let mut current = store.get("/race/n").await.expect("get");
                loop {
                    let (n, rev) = current.as_ref().map_or((0, 0), |kv| {
                        let n: u64 = String::from_utf8_lossy(&kv.value).parse().expect("number");
                        (n, kv.mod_revision)
                    });
                    match store
                        .compare_and_swap("/race/n", rev, (n + 1).to_string().into_bytes())
                        .await
                        .expect("cas")
                    {
                        Ok(new_rev) => {
                            revisions.push(new_rev);
                            break;
                        }
                        Err(now) => {
                            conflicts.fetch_add(1, Ordering::Relaxed);
                            current = now;
                        }
                    }
                }
            }
            revisions
        }));
    }
    let mut all = Vec::new();
    for task in tasks {
        all.extend(task.await.expect("task"));
    }
    let total = STORES * INCREMENTS;
    let kv = stores[0]
        .get("/race/n")
        .await
        .expect("get")
        .expect("counter");
    assert_eq!(
        kv.value,
        total.to_string().into_bytes(),
        "no lost increment"
    );
    all.sort_unstable();
    all.dedup();
    assert_eq!(all.len(), total, "every winning write has its own revision");
    assert_eq!(all.last().copied(), Some(kv.mod_revision));
    assert!(
        conflicts.load(Ordering::Relaxed) > 0,
        "the stores really raced"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_compares_run_the_failure_branch_with_exact_revisions() {
    let server = server().await;
    let store = store(&server);
    let a = store.put("/f/a", b"a".to_vec()).await.expect("put");
    store.put("/f/old", b"o".to_vec()).await.expect("put");
    // Consul answers 409 with per-operation errors; the failure branch then
    // runs and its writes get one revision, the one reported.
    let resp = store
        .txn(
            Txn::new()
                .when(vec![
                    Compare::mod_revision("/f/a", a + 100),
                    Compare::absent("/f/new"),
                ])
                .and_then(vec![Op::put("/f/new", b"n".to_vec())])
                .or_else(vec![
                    Op::put("/f/b", b"b".to_vec()),
                    Op::delete("/f/old"),
                    Op::get("/f/a"),
                    Op::get("/f/b"),
                ]),
        )
        .await
        .expect("txn");
    assert!(!resp.succeeded);
    let b = store.get("/f/b").await.expect("get").expect("b written");
    assert_eq!(b.mod_revision, resp.revision, "the revision the write got");
    let a_kv = store.get("/f/a").await.expect("get");
    assert_eq!(
        resp.results,
        vec![
            OpResult::Put,
            OpResult::Delete { deleted: 1 },
            OpResult::Get(a_kv),
            OpResult::Get(Some(b)),
        ]
    );
    assert_eq!(store.get("/f/new").await.expect("get"), None);
    assert_eq!(store.get("/f/old").await.expect("get"), None);

    // The success branch's revision is the ModifyIndex of what it wrote.
    let resp = store
        .txn(
            Txn::new()
                .when(vec![Compare::mod_revision("/f/a", a)])
                .and_then(vec![
                    Op::put("/f/a", b"a2".to_vec()),
                    Op::put("/f/c", b"c".to_vec()),
                ]),
        )
        .await
        .expect("txn");
    assert!(resp.succeeded);
    for key in ["/f/a", "/f/c"] {
        let kv = store.get(key).await.expect("get").expect("written");
        assert_eq!(kv.mod_revision, resp.revision, "{key}");
    }
    // Writing the same value again still takes a new revision (a plain
    // Consul set would keep the old ModifyIndex).
    let again = store.put("/f/c", b"c".to_vec()).await.expect("put");
    assert!(again > resp.revision);
    assert_eq!(
        store
            .get("/f/c")
            .await
            .expect("get")
            .map(|kv| kv.mod_revision),
        Some(again)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_failure_branch_never_applies_to_a_state_where_the_compares_hold() {
    // Two stores race: one flips /flip between two values (so a compare on
    // it keeps failing and holding), the other runs txns whose failure branch
    // records the value it saw. The failure branch must only ever see a value
    // for which the compare was false.
    let server = server().await;
    let flipper = Arc::new(store(&server));
    let checker = store(&server);
    let first = flipper.put("/flip", b"0".to_vec()).await.expect("put");
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let flipping = {
        let (flipper, stop) = (Arc::clone(&flipper), Arc::clone(&stop));
        tokio::spawn(async move {
            let mut i = 0u32;
            while !stop.load(Ordering::Relaxed) {
                i += 1;
                flipper
                    .put("/flip", (i % 2).to_string().into_bytes())
                    .await
                    .expect("flip");
            }
        })
    };
    let mut failures = 0;
    for round in 0..30 {
        let rev = checker
            .get("/flip")
            .await
            .expect("get")
            .map_or(first, |kv| kv.mod_revision);
        let resp = checker
            .txn(
                Txn::new()
                    .when(vec![Compare::mod_revision("/flip", rev)])
                    .and_then(vec![Op::put("/seen", b"success".to_vec())])
                    .or_else(vec![
                        Op::put("/seen", b"failure".to_vec()),
                        Op::get("/flip"),
                    ]),
            )
            .await
            .expect("txn");
        if !resp.succeeded {
            failures += 1;
            let Some(OpResult::Get(Some(flip))) = resp.results.get(1) else {
                panic!("round {round}: {:?}", resp.results);
            };
            assert_ne!(
                flip.mod_revision, rev,
                "round {round}: the failure branch ran on a state where the compare held"
            );
        }
    }
    stop.store(true, Ordering::Relaxed);
    flipping.await.expect("flipper");
    assert!(
        failures > 0,
        "the compares never failed: nothing was tested"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn txns_beyond_consuls_64_operations_are_refused_before_sending() {
    let server = server().await;
    let store = store(&server);
    let puts = |n: usize| -> Vec<Op> {
        (0..n)
            .map(|i| Op::put(format!("/big/{i}"), b"v".to_vec()))
            .collect()
    };
    // A put is two Consul operations (lock and unlock): 32 fit.
    let resp = store
        .txn(Txn::new().and_then(puts(32)))
        .await
        .expect("32 puts");
    assert_eq!(resp.results, vec![OpResult::Put; 32]);
    let index = server.raft_index();
    for (what, txn) in [
        ("33 puts", Txn::new().and_then(puts(33))),
        (
            "65 gets",
            Txn::new().and_then((0..65).map(|i| Op::get(format!("/big/{i}"))).collect()),
        ),
        (
            "compares and failure ops",
            Txn::new()
                .when(
                    (0..40)
                        .map(|i| Compare::absent(format!("/big/c{i}")))
                        .collect(),
                )
                .or_else(puts(13)),
        ),
    ] {
        match store.txn(txn).await {
            Err(StoreError::Invalid(msg)) => assert!(msg.contains("64"), "{what}: {msg}"),
            other => panic!("{what}: expected Invalid, got {other:?}"),
        }
    }
    assert_eq!(server.raft_index(), index, "nothing was sent");
    assert_eq!(store.get("/big/32").await.expect("get"), None);
    // Consul's value limit comes back as an invalid request too.
    match store.put("/big/value", vec![0; 600 * 1024]).await {
        Err(StoreError::Invalid(msg)) => assert!(msg.contains("413"), "{msg}"),
        other => panic!("600 KiB value: expected Invalid, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watches_and_calls_survive_a_server_restart() {
    let mut server = server().await;
    let store = store(&server);
    let before = store.put("/r/a", b"1".to_vec()).await.expect("put");
    let mut from_range = {
        let read = store.range("/r/").await.expect("range");
        store.watch("/r/", read.revision + 1).await.expect("watch")
    };
    let mut from_now = store.watch("/r/", 0).await.expect("watch from now");
    let lease = store
        .grant_lease(Duration::from_secs(60))
        .await
        .expect("grant");
    let r1 = store.put("/r/b", b"2".to_vec()).await.expect("put");
    for watch in [&mut from_range, &mut from_now] {
        let ev = next_event(watch, "before the restart").await;
        assert_eq!((ev.kv.key.as_str(), ev.revision()), ("/r/b", r1));
    }

    server.kill().await;
    match store.get("/r/a").await {
        Err(StoreError::Unavailable(_) | StoreError::Timeout(_)) => {}
        other => panic!("get with Consul down: expected Unavailable, got {other:?}"),
    }
    server.restart().await.expect("restart");

    let r2 = when_available("put after restart", || store.put("/r/c", b"3".to_vec())).await;
    assert!(store.delete("/r/a").await.expect("delete"));
    let del = store.range("/r/").await.expect("range").revision;
    for (name, watch) in [("from range", &mut from_range), ("from now", &mut from_now)] {
        let mut got = Vec::new();
        while got.len() < 2 {
            got.push(next_event(watch, name).await);
        }
        assert_eq!(
            kinds(&got),
            vec![
                ("/r/c".into(), EventKind::Put, r2),
                ("/r/a".into(), EventKind::Delete, del),
            ],
            "{name}: after the restart, exactly the changes made since"
        );
    }
    assert!(del > before);
    store
        .keep_alive(lease.clone())
        .await
        .expect("the lease survived the restart");
    store.revoke_lease(lease).await.expect("revoke");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_index_going_backwards_is_handled() {
    let server = server().await;
    let mut config = config(server.address());
    // Blocking queries whose index went backwards only return at the end of
    // their wait: keep it short.
    config.watch_wait = Duration::from_secs(1);
    let store = ConsulStore::new(config).expect("config");

    // Tombstones reaped: the prefix's index falls back to its newest key's.
    store.put("/b/keep", b"k".to_vec()).await.expect("put");
    store.put("/b/gone", b"g".to_vec()).await.expect("put");
    assert!(store.delete("/b/gone").await.expect("delete"));
    let mut watch = store.watch("/b/", 0).await.expect("watch");
    assert_eq!(server.reap_tombstones(), 1);
    // Let at least one blocking query come back with the lower index.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    put_comes_next(&store, &mut watch, "/b/new", "after the reap").await;

    // The whole cluster rebuilt: indexes start over. The watch reports what
    // disappeared, then ends with Compacted once the new history shows up.
    server.wipe();
    let mut deleted = Vec::new();
    let ended = tokio::time::timeout(PATIENCE, async {
        loop {
            match watch.next().await {
                Some(Ok(ev)) if ev.kind == EventKind::Delete => deleted.push(ev.kv.key),
                Some(Ok(ev)) => panic!("a put from another history: {ev:?}"),
                Some(Err(StoreError::Compacted { .. })) => return,
                Some(Err(e)) => panic!("expected Compacted, got {e}"),
                None => panic!("the watch ended without an error"),
            }
            if deleted.len() == 2 {
                // The new history's first write: older than what was seen.
                store
                    .put("/b/reborn", b"r".to_vec())
                    .await
                    .expect("put after the wipe");
            }
        }
    })
    .await;
    assert!(ended.is_ok(), "the watch did not end with Compacted");
    deleted.sort();
    assert_eq!(deleted, vec!["/b/keep".to_owned(), "/b/new".to_owned()]);
    assert!(next(&mut watch, "after Compacted").await.is_none());
    // A resync works in the new history.
    let read = store.range("/b/").await.expect("range");
    assert_eq!(read.kvs.len(), 1);
    let mut watch = store.watch("/b/", read.revision + 1).await.expect("watch");
    let rev = store.put("/b/again", b"a".to_vec()).await.expect("put");
    assert_eq!(next_event(&mut watch, "new history").await.revision(), rev);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lease_is_gone_its_ttl_after_the_last_renewal() {
    let server = server().await;
    let store = store(&server);
    // A session of half the lease's TTL: Consul expires it at twice that.
    let ttl = Duration::from_secs(2);
    let lease = store.grant_lease(ttl).await.expect("grant");
    assert_eq!(server.session_ttl(&lease.0).as_deref(), Some("1s"));
    let mut watch = store.watch("/s/", 0).await.expect("watch");
    let granted = Instant::now();
    let r = store
        .txn(Txn::new().and_then(vec![
            Op::put_with_lease("/s/leased", b"v".to_vec(), lease.clone()),
            Op::put("/s/plain", b"v".to_vec()),
        ]))
        .await
        .expect("put")
        .revision;
    let kv = store.get("/s/leased").await.expect("get").expect("key");
    assert_eq!(kv.lease.as_ref(), Some(&lease));
    for _ in 0..2 {
        let ev = next_event(&mut watch, "puts").await;
        assert_eq!((ev.kind, ev.revision()), (EventKind::Put, r));
    }
    let ev = next_event(&mut watch, "expiry").await;
    let gone_after = granted.elapsed();
    assert_eq!(
        (ev.kv.key.as_str(), ev.kind),
        ("/s/leased", EventKind::Delete)
    );
    assert!(ev.revision() > r);
    // Consul (and the test server) expires a session at twice its TTL:
    // the lease's TTL. The slack is for the polling.
    assert!(
        gone_after >= ttl,
        "deleted after {gone_after:?}, before the lease's TTL"
    );
    assert!(
        gone_after <= ttl + Duration::from_millis(500),
        "deleted after {gone_after:?}"
    );
    assert!(store.get("/s/plain").await.expect("get").is_some());
    assert!(matches!(
        store.keep_alive(lease.clone()).await,
        Err(StoreError::LeaseNotFound(id)) if id == lease.0
    ));
    assert!(server.session_ttl(&lease.0).is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn short_ttls_are_raised_to_session_ttl_min_and_bad_leases_refused() {
    // A server with Consul's default session_ttl_min of 10 s.
    let server = TestServer::start(Config::default()).await.expect("server");
    let store = ConsulStore::new(ConsulConfig::new(server.address())).expect("config");
    let lease = store
        .grant_lease(Duration::from_millis(1500))
        .await
        .expect("grant");
    assert_eq!(server.session_ttl(&lease.0).as_deref(), Some("10s"));
    // Above the minimum, a lease's session has half its TTL (rounded up):
    // Consul expires a session at twice its TTL.
    let lease = store
        .grant_lease(Duration::from_millis(21_000))
        .await
        .expect("grant");
    assert_eq!(server.session_ttl(&lease.0).as_deref(), Some("11s"));
    assert!(matches!(
        store.grant_lease(Duration::ZERO).await,
        Err(StoreError::Invalid(_))
    ));
    assert!(matches!(
        store.grant_lease(Duration::from_secs(2 * 86_400 + 2)).await,
        Err(StoreError::Invalid(_))
    ));
    // A store that believes the minimum is lower than the server's is told
    // what to change.
    let mut config = ConsulConfig::new(server.address());
    config.session_ttl_min = Duration::from_secs(1);
    let wrong = ConsulStore::new(config).expect("config");
    match wrong.grant_lease(Duration::from_secs(2)).await {
        Err(StoreError::Invalid(msg)) => assert!(msg.contains("session_ttl_min"), "{msg}"),
        other => panic!("expected Invalid, got {other:?}"),
    }

    for bogus in [
        "not-a-session",
        "",
        "../../v1/kv/x",
        "00000000-0000-0000-0000-000000000000",
    ] {
        let bogus = LeaseId(bogus.into());
        assert!(
            matches!(store.keep_alive(bogus.clone()).await, Err(StoreError::LeaseNotFound(id)) if id == bogus.0),
            "keep_alive({bogus})"
        );
        store
            .revoke_lease(bogus.clone())
            .await
            .expect("revoking an unknown lease is fine");
        match store
            .txn(Txn::new().and_then(vec![Op::put_with_lease(
                "/l/x",
                b"v".to_vec(),
                bogus.clone(),
            )]))
            .await
        {
            Err(StoreError::LeaseNotFound(id)) => assert_eq!(id, bogus.0),
            other => panic!("put with lease {bogus}: expected LeaseNotFound, got {other:?}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_store_destroys_its_writer_session() {
    let server = server().await;
    let store = store(&server);
    store.put("/w/k", b"v".to_vec()).await.expect("put");
    assert_eq!(server.session_ids().len(), 1, "the writer session");
    drop(store);
    let deadline = Instant::now() + PATIENCE;
    while !server.session_ids().is_empty() {
        assert!(
            Instant::now() < deadline,
            "the writer session outlived its store"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lease_can_take_over_a_key_held_by_another() {
    let server = server().await;
    let store = store(&server);
    let old = store
        .grant_lease(Duration::from_secs(60))
        .await
        .expect("grant");
    let new = store
        .grant_lease(Duration::from_secs(60))
        .await
        .expect("grant");
    store
        .txn(Txn::new().and_then(vec![Op::put_with_lease(
            "/h/host",
            b"1".to_vec(),
            old.clone(),
        )]))
        .await
        .expect("put");
    // A restarted plugin registers again under a new lease while the old
    // one still lives: the key moves to the new lease.
    let rev = store
        .txn(Txn::new().and_then(vec![Op::put_with_lease(
            "/h/host",
            b"2".to_vec(),
            new.clone(),
        )]))
        .await
        .expect("re-register")
        .revision;
    let kv = store.get("/h/host").await.expect("get").expect("key");
    assert_eq!((kv.lease.as_ref(), kv.mod_revision), (Some(&new), rev));
    store.revoke_lease(old).await.expect("revoke old");
    assert!(store.get("/h/host").await.expect("get").is_some());
    store.revoke_lease(new).await.expect("revoke new");
    assert_eq!(store.get("/h/host").await.expect("get"), None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_acl_token_is_required_when_consul_has_one() {
    let server = TestServer::start(Config {
        acl_token: Some("s3cret".into()),
        ..test_config()
    })
    .await
    .expect("server");
    let with_token = |token: Option<&str>| {
        let mut config = config(server.address());
        config.token = token.map(str::to_owned);
        ConsulStore::new(config).expect("config")
    };
    let good = with_token(Some("s3cret"));
    let rev = good
        .put("/acl/k", b"v".to_vec())
        .await
        .expect("put with the token");
    let mut watch = good.watch("/acl/", 0).await.expect("watch with the token");
    let lease = good
        .grant_lease(Duration::from_secs(10))
        .await
        .expect("grant");
    good.keep_alive(lease.clone()).await.expect("renew");

    for (name, store) in [
        ("no token", with_token(None)),
        ("wrong token", with_token(Some("nope"))),
    ] {
        match store.get("/acl/k").await {
            Err(e @ StoreError::Rejected(_)) => {
                let msg = e.to_string();
                assert!(
                    msg.contains("403") && msg.contains("ACL token"),
                    "{name}: {msg}"
                );
                assert!(!e.is_transient(), "{name}: retrying will not help");
            }
            other => panic!("{name}: expected a permission error, got {other:?}"),
        }
        assert!(store.put("/acl/k", b"x".to_vec()).await.is_err(), "{name}");
        assert!(store.watch("/acl/", 0).await.is_err(), "{name}");
        assert!(
            store.grant_lease(Duration::from_secs(10)).await.is_err(),
            "{name}"
        );
    }
    assert_eq!(
        good.get("/acl/k")
            .await
            .expect("get")
            .map(|kv| kv.mod_revision),
        Some(rev),
        "refused calls changed nothing"
    );
    let rev = good.put("/acl/k2", b"v".to_vec()).await.expect("put");
    assert_eq!(next_event(&mut watch, "acl watch").await.revision(), rev);
    // The token must not show in the configuration's debug output.
    let mut config = config(server.address());
    config.token = Some("s3cret".into());
    assert!(!format!("{config:?}").contains("s3cret"));
}

struct Certs {
    ca: PathBuf,
    server_cert: Vec<u8>,
    server_key: Vec<u8>,
    client_cert: PathBuf,
    client_key: PathBuf,
    ca_pem: Vec<u8>,
}

fn make_certs(dir: &Path) -> Certs {
    use rcgen::{BasicConstraints, CertificateParams, IsCa, KeyPair, KeyUsagePurpose};
    let ca_key = KeyPair::generate().expect("CA key");
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    ca_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "rustoverlay test CA");
    let ca = ca_params.self_signed(&ca_key).expect("CA cert");
    let leaf = |names: Vec<String>, usage: rcgen::ExtendedKeyUsagePurpose| {
        let key = KeyPair::generate().expect("key");
        let mut params = CertificateParams::new(names).expect("params");
        params.extended_key_usages = vec![usage];
        let cert = params.signed_by(&key, &ca, &ca_key).expect("sign");
        (cert.pem(), key.serialize_pem())
    };
    let (server_cert, server_key) = leaf(
        vec!["127.0.0.1".into()],
        rcgen::ExtendedKeyUsagePurpose::ServerAuth,
    );
    let (client_cert, client_key) = leaf(vec![], rcgen::ExtendedKeyUsagePurpose::ClientAuth);
    let write = |name: &str, pem: &str| {
        let path = dir.join(name);
        std::fs::write(&path, pem).expect("write PEM");
        path
    };
    Certs {
        ca: write("ca.pem", &ca.pem()),
        ca_pem: ca.pem().into_bytes(),
        server_cert: server_cert.into_bytes(),
        server_key: server_key.into_bytes(),
        client_cert: write("client.pem", &client_cert),
        client_key: write("client-key.pem", &client_key),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_with_client_certificates() {
    let dir = tempfile::tempdir().expect("dir");
    let certs = make_certs(dir.path());
    let server = TestServer::start(Config {
        tls: Some(TlsConfig {
            cert_pem: certs.server_cert.clone(),
            key_pem: certs.server_key.clone(),
            client_ca_pem: Some(certs.ca_pem.clone()),
        }),
        ..test_config()
    })
    .await
    .expect("server");
    let tls = |client: bool| TlsFiles {
        ca: certs.ca.clone(),
        cert: client.then(|| certs.client_cert.clone()),
        key: client.then(|| certs.client_key.clone()),
    };
    for address in [server.address(), format!("https://{}", server.address())] {
        let mut config = config(address.clone());
        config.tls = Some(tls(true));
        let store = ConsulStore::new(config).expect("config");
        let rev = store
            .put("/tls/k", b"v".to_vec())
            .await
            .expect("put over TLS");
        let mut watch = store.watch("/tls/", 0).await.expect("watch over TLS");
        let rev2 = store.put("/tls/k", b"w".to_vec()).await.expect("put");
        assert!(rev2 > rev);
        assert_eq!(next_event(&mut watch, "tls watch").await.revision(), rev2);
        let lease = store
            .grant_lease(Duration::from_secs(10))
            .await
            .expect("grant");
        store.keep_alive(lease).await.expect("keep_alive over TLS");
    }
    // Without a client certificate the server refuses the handshake.
    let mut config = config(server.address());
    config.tls = Some(tls(false));
    let anonymous = ConsulStore::new(config).expect("config");
    match anonymous.get("/tls/k").await {
        Err(e) => assert!(e.is_transient(), "{e}"),
        Ok(v) => panic!("no client certificate: expected an error, got {v:?}"),
    }
    // Plain http to a TLS server fails too, without hanging.
    let plain = ConsulStore::new(config_plain(&server)).expect("config");
    assert!(plain.get("/tls/k").await.is_err());
}

fn config_plain(server: &TestServer) -> ConsulConfig {
    let mut config = config(server.address());
    config.request_timeout = Duration::from_secs(2);
    config
}

#[tokio::test]
async fn bad_configurations_are_refused_up_front() {
    let invalid = |config: ConsulConfig, what: &str| match ConsulStore::new(config) {
        Err(StoreError::Invalid(_)) => {}
        other => panic!("{what}: expected Invalid, got {other:?}"),
    };
    invalid(ConsulConfig::new(""), "no address");
    invalid(
        ConsulConfig::new("https://127.0.0.1:8501"),
        "https without TLS",
    );
    invalid(
        ConsulConfig::new("unix:///tmp/consul.sock"),
        "unknown scheme",
    );
    invalid(ConsulConfig::new("127.0.0.1:8500/v1"), "a path");
    let mut config = ConsulConfig::new("127.0.0.1:8500");
    config.request_timeout = Duration::ZERO;
    invalid(config, "zero timeout");
    let mut config = ConsulConfig::new("127.0.0.1:8500");
    config.watch_wait = Duration::from_secs(3600);
    invalid(config, "a wait above Consul's 10 min");
    let mut config = ConsulConfig::new("127.0.0.1:8500");
    config.token = Some("bad\ntoken".into());
    invalid(config, "a token that is not a header value");

    let dir = tempfile::tempdir().expect("dir");
    let certs = make_certs(dir.path());
    let mut config = ConsulConfig::new("http://127.0.0.1:8500");
    config.tls = Some(TlsFiles {
        ca: certs.ca.clone(),
        cert: None,
        key: None,
    });
    invalid(config, "http address with TLS");
    let mut config = ConsulConfig::new("127.0.0.1:8501");
    config.tls = Some(TlsFiles {
        ca: certs.ca.clone(),
        cert: Some(certs.client_cert.clone()),
        key: None,
    });
    invalid(config, "certificate without key");
    let mut config = ConsulConfig::new("127.0.0.1:8501");
    config.tls = Some(TlsFiles {
        ca: dir.path().join("missing.pem"),
        cert: None,
        key: None,
    });
    let err = ConsulStore::new(config).expect_err("missing CA file");
    assert!(err.to_string().contains("missing.pem"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_consul_cannot_address_are_invalid_and_odd_ones_round_trip() {
    let server = server().await;
    let store = store(&server);
    for bad in ["relative/key", "/a//b", "/a/../b", "/"] {
        assert!(
            matches!(store.get(bad).await, Err(StoreError::Invalid(_))),
            "get {bad:?}"
        );
        assert!(
            matches!(
                store.put(bad, b"v".to_vec()).await,
                Err(StoreError::Invalid(_))
            ),
            "put {bad:?}"
        );
    }
    assert!(matches!(
        store.range("relative/").await,
        Err(StoreError::Invalid(_))
    ));
    // Characters that need escaping in a URL, an IPv6 pool name, UTF-8.
    for key in [
        "/odd/a b?c=d&e#f%20g+h",
        "/rustoverlay/v1/ipam/pool/fd00:77::_64/record",
        "/odd/é/ü",
        "/odd/trailing/",
    ] {
        let rev = store.put(key, key.as_bytes().to_vec()).await.expect(key);
        let kv = store.get(key).await.expect("get").expect(key);
        assert_eq!((kv.key.as_str(), kv.mod_revision), (key, rev));
        assert_eq!(kv.value, key.as_bytes());
    }
    let keys: Vec<String> = store
        .range("/odd/")
        .await
        .expect("range")
        .kvs
        .into_iter()
        .map(|kv| kv.key)
        .collect();
    assert_eq!(
        keys,
        vec!["/odd/a b?c=d&e#f%20g+h", "/odd/trailing/", "/odd/é/ü"]
    );
    // The whole store is the empty prefix.
    assert!(store.range("").await.expect("range").kvs.len() >= 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watch_delivers_changes_after_tombstones_are_reaped_on_their_own() {
    // Consul reaps tombstones tombstone_ttl after a delete (15 s there).
    let server = TestServer::start(Config {
        tombstone_ttl: Some(Duration::from_millis(300)),
        ..test_config()
    })
    .await
    .expect("server");
    let mut config = config(server.address());
    config.watch_wait = Duration::from_secs(1);
    let store = ConsulStore::new(config).expect("config");
    let kept = store.put("/t/kept", b"k".to_vec()).await.expect("put");
    let mut watch = store.watch("/t/", 0).await.expect("watch");
    for round in 0..3 {
        let key = format!("/t/gone{round}");
        // One change at a time: the watch compares snapshots, so a put and
        // delete that both land between two of them show as no change.
        let put = store.put(&key, b"g".to_vec()).await.expect("put");
        let ev = next_event(&mut watch, "put").await;
        assert_eq!(
            (ev.kv.key.as_str(), ev.kind),
            (key.as_str(), EventKind::Put)
        );
        assert!(store.delete(&key).await.expect("delete"));
        let deleted = store.range("/t/").await.expect("range").revision;
        assert!(deleted > put);
        let ev = next_event(&mut watch, "delete").await;
        assert_eq!(
            (ev.kv.key.as_str(), ev.kind),
            (key.as_str(), EventKind::Delete)
        );
        // Reaped: the prefix's index falls back to its newest key's.
        let deadline = Instant::now() + PATIENCE;
        while store.range("/t/").await.expect("range").revision != kept {
            assert!(Instant::now() < deadline, "round {round}: never reaped");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        // Let a blocking query come back with the lower index.
        tokio::time::sleep(Duration::from_millis(1200)).await;
    }
    put_comes_next(&store, &mut watch, "/t/late", "after the reaps").await;
}

/// Every kind of call the backend makes, once.
async fn one_of_each_call(store: &ConsulStore, n: usize) -> kvstore_backends::Result<()> {
    let key = format!("/f/k{n}");
    store.put(&key, b"v".to_vec()).await?;
    store.get(&key).await?;
    store.range("/f/").await?;
    let lease = store.grant_lease(Duration::from_secs(60)).await?;
    store.keep_alive(lease.clone()).await?;
    store
        .txn(Txn::new().and_then(vec![Op::put_with_lease(&key, b"l".to_vec(), lease.clone())]))
        .await?;
    store.revoke_lease(lease).await?;
    store.delete(&key).await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_short_leader_election_or_rate_limit_costs_a_delay_not_an_error() {
    let server = server().await;
    let store = store(&server);
    store.put("/f/warm", b"w".to_vec()).await.expect("put");
    for (n, failure) in [Failure::NoLeader, Failure::TooManyRequests]
        .into_iter()
        .enumerate()
    {
        // Three refused requests in a row, then Consul answers again: each
        // call that meets them is retried within its timeout.
        server.fail_next(3, failure);
        let started = Instant::now();
        one_of_each_call(&store, n)
            .await
            .unwrap_or_else(|e| panic!("{failure:?}: {e}"));
        assert!(started.elapsed() < Duration::from_secs(5), "{failure:?}");
        server.fail_for(Duration::from_millis(700), failure);
        one_of_each_call(&store, n + 10)
            .await
            .unwrap_or_else(|e| panic!("{failure:?} for 700 ms: {e}"));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_leaderless_or_rate_limited_spell_fails_calls_clearly_and_leaves_watches_alive() {
    let server = server().await;
    let store = store(&server);
    let lease = store
        .grant_lease(Duration::from_secs(60))
        .await
        .expect("grant");
    let before = store.put("/f/a", b"1".to_vec()).await.expect("put");
    let mut watch = store.watch("/f/", before + 1).await.expect("watch");
    for (failure, says) in [
        (Failure::NoLeader, "no leader"),
        (Failure::TooManyRequests, "rate limit"),
    ] {
        server.fail_for(Duration::from_secs(600), failure);
        let calls: Vec<(&str, kvstore_backends::Result<()>)> = vec![
            ("get", store.get("/f/a").await.map(drop)),
            ("range", store.range("/f/").await.map(drop)),
            ("put", store.put("/f/b", b"2".to_vec()).await.map(drop)),
            (
                "txn",
                store
                    .txn(Txn::new().and_then(vec![Op::delete("/f/a")]))
                    .await
                    .map(drop),
            ),
            (
                "keep_alive",
                store.keep_alive(lease.clone()).await.map(drop),
            ),
            (
                "grant_lease",
                store.grant_lease(Duration::from_secs(60)).await.map(drop),
            ),
        ];
        for (name, result) in calls {
            match result {
                Err(e @ StoreError::Unavailable(_)) => {
                    assert!(e.is_transient());
                    assert!(e.to_string().contains(says), "{failure:?} {name}: {e}");
                }
                other => panic!("{failure:?} {name}: expected Unavailable, got {other:?}"),
            }
        }
        // Bounded: half the request timeout of retries, then the error.
        let started = Instant::now();
        assert!(store.get("/f/a").await.is_err());
        let took = started.elapsed();
        assert!(
            took >= Duration::from_millis(2000) && took <= Duration::from_secs(5),
            "{failure:?}: a refused get took {took:?}"
        );
        server.stop_failing();
    }
    // Nothing was applied meanwhile; the watch retried and goes on.
    assert_eq!(store.get("/f/b").await.expect("get"), None);
    assert!(store.get("/f/a").await.expect("get").is_some());
    store.keep_alive(lease).await.expect("the lease lived on");
    let rev = store.put("/f/c", b"3".to_vec()).await.expect("put");
    let ev = next_event(&mut watch, "after the failures").await;
    assert_eq!((ev.kv.key.as_str(), ev.revision()), ("/f/c", rev));
}
