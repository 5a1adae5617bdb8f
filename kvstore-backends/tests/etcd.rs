//! The conformance suite and etcd-specific behaviour of `EtcdStore`, against
//! real etcd servers that the tests start themselves (Debian: etcd-server).
//! Every check gets its own server, as the suite needs a store nobody else
//! writes to.

mod etcd_server;

use std::sync::Arc;
use std::time::Duration;

use etcd_server::{free_port, make_tls_files, EtcdServer};
use futures::StreamExt;
use kvstore_backends::{
    EtcdConfig, EtcdStore, EventKind, KvStore, LeaseId, Op, OpResult, Revision, StoreError,
    TlsFiles, Txn, WatchEvent, WatchStream,
};

kvstore_backends::conformance_tests!({
    let server = EtcdServer::start().await;
    let store = EtcdStore::new(server.config()).expect("store config");
    // The store is dropped before the server (tuple fields drop in order).
    (Arc::new(store), server)
});

/// Bound for anything that should happen soon; only turns hangs into failures.
const PATIENCE: Duration = Duration::from_secs(30);

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

/// Retries `call` while etcd is unreachable (just restarted), within PATIENCE.
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
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => panic!("{what}: {e}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lazy_connect_then_etcd_comes_up() {
    let port = free_port();
    let mut config = EtcdConfig::new([format!("127.0.0.1:{port}")]);
    config.dial_timeout = Duration::from_secs(1);
    config.request_timeout = Duration::from_secs(2);
    // Building never connects, so it works with nothing listening.
    let store = EtcdStore::new(config).expect("config");

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
                    "{what}: the message names the endpoint: {msg}"
                );
                assert!(
                    msg.to_lowercase().contains("connect"),
                    "{what}: the message says what failed: {msg}"
                );
            }
            other => panic!("{what} with etcd down: expected Unavailable, got {other:?}"),
        }
    }

    let _server = EtcdServer::start_on(port).await;
    // The same instance works now, without being rebuilt.
    let rev = store
        .put("/k", b"v".to_vec())
        .await
        .expect("put once etcd runs");
    let kv = store.get("/k").await.expect("get").expect("key");
    assert_eq!((kv.value.as_slice(), kv.mod_revision), (&b"v"[..], rev));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_lease_keeper_and_calls_survive_an_etcd_restart() {
    let mut server = EtcdServer::start().await;
    let store = EtcdStore::new(server.config()).expect("config");
    let p = "/restart/";
    let before = store
        .put(&format!("{p}a"), b"1".to_vec())
        .await
        .expect("put");
    let mut from_rev = store.watch(p, before).await.expect("watch from revision");
    let mut from_now = store.watch(p, 0).await.expect("watch from now");
    let lease = store
        .grant_lease(Duration::from_secs(60))
        .await
        .expect("grant");
    store.keep_alive(lease.clone()).await.expect("keep_alive");

    let r1 = store
        .put(&format!("{p}b"), b"2".to_vec())
        .await
        .expect("put");
    let ev = next_event(&mut from_rev, "replayed").await;
    assert_eq!((ev.kv.key.as_str(), ev.revision()), ("/restart/a", before));
    for watch in [&mut from_rev, &mut from_now] {
        let ev = next_event(watch, "before the restart").await;
        assert_eq!((ev.kv.key.as_str(), ev.revision()), ("/restart/b", r1));
    }

    server.kill();
    match store.get("/restart/a").await {
        Err(StoreError::Unavailable(_) | StoreError::Timeout(_)) => {}
        other => panic!("get with etcd killed: expected Unavailable, got {other:?}"),
    }
    server.restart().await;

    // Writes after the restart: puts, a delete, and a txn of several changes.
    let mut expected: Vec<(String, EventKind, Revision)> = Vec::new();
    for i in 0..5 {
        let key = format!("{p}after/{i}");
        let rev = when_available("put after restart", || store.put(&key, vec![i])).await;
        expected.push((key, EventKind::Put, rev));
    }
    let deleted = format!("{p}b");
    assert!(store.delete(&deleted).await.expect("delete"));
    let del_rev = store.range(p).await.expect("range").revision;
    expected.push((deleted, EventKind::Delete, del_rev));
    let resp = store
        .txn(Txn::new().and_then(vec![
            Op::put(format!("{p}t1"), b"t".to_vec()),
            Op::put(format!("{p}t2"), b"t".to_vec()),
        ]))
        .await
        .expect("txn");
    expected.push((format!("{p}t1"), EventKind::Put, resp.revision));
    expected.push((format!("{p}t2"), EventKind::Put, resp.revision));

    // The same streams deliver exactly those, once each, in order.
    for (name, watch) in [
        ("from revision", &mut from_rev),
        ("from now", &mut from_now),
    ] {
        let mut got = Vec::new();
        for _ in 0..expected.len() {
            let ev = next_event(watch, name).await;
            if ev.kind == EventKind::Delete {
                // The shape every backend uses for deletes.
                assert_eq!(
                    (
                        ev.kv.value.len(),
                        ev.kv.create_revision,
                        ev.kv.lease.as_ref()
                    ),
                    (0, 0, None)
                );
            }
            got.push((ev.kv.key, ev.kind, ev.kv.mod_revision));
        }
        assert_eq!(got, expected, "watch {name} across the restart");
    }
    let sentinel = store
        .put(&format!("{p}sentinel"), b"s".to_vec())
        .await
        .expect("put");
    for watch in [&mut from_rev, &mut from_now] {
        let ev = next_event(watch, "sentinel").await;
        assert_eq!(
            ev.revision(),
            sentinel,
            "nothing duplicated before the sentinel"
        );
    }

    // The cached keep-alive stream died with the connection; renewing opens
    // a new one. The lease itself survived the restart.
    store
        .keep_alive(lease.clone())
        .await
        .expect("keep_alive after restart");
    store.revoke_lease(lease.clone()).await.expect("revoke");
    assert!(matches!(
        store.keep_alive(lease).await,
        Err(StoreError::LeaseNotFound(_))
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_from_a_compacted_revision_is_compacted() {
    let mut server = EtcdServer::start().await;
    let store = EtcdStore::new(server.config()).expect("config");
    let first = store.put("/c/k", b"0".to_vec()).await.expect("put");
    let mut last = first;
    for i in 1..5u8 {
        last = store.put("/c/k", vec![i]).await.expect("put");
    }
    let mut admin = server.admin().await;
    admin.compact(last, None).await.expect("compact");

    // From before the compaction: the call or the first item says so, then
    // the stream ends.
    match store.watch("/c/", first).await {
        Err(StoreError::Compacted { requested, oldest }) => {
            assert_eq!((requested, oldest), (first, last))
        }
        Ok(mut watch) => {
            match next(&mut watch, "compacted watch").await {
                Some(Err(StoreError::Compacted { requested, oldest })) => {
                    assert_eq!((requested, oldest), (first, last))
                }
                other => panic!("expected Compacted, got {other:?}"),
            }
            assert!(next(&mut watch, "after Compacted").await.is_none());
        }
        Err(e) => panic!("expected Compacted, got {e}"),
    }
    // From the compaction revision on, history is there.
    let mut watch = store.watch("/c/", last).await.expect("watch");
    assert_eq!(next_event(&mut watch, "kept").await.revision(), last);

    // A watch that resumes after a disconnect into compacted history ends
    // with Compacted instead of skipping what it missed.
    let start = store.range("/c/").await.expect("range").revision + 1;
    let mut watch = store.watch("/c/", start).await.expect("watch");
    let seen = store.put("/c/k", b"seen".to_vec()).await.expect("put");
    assert_eq!(next_event(&mut watch, "live").await.revision(), seen);
    server.restart().await;
    let mut missed = 0;
    for i in 0..3u8 {
        missed = when_available("put", || store.put("/c/k", vec![i])).await;
    }
    let mut admin = server.admin().await;
    admin.compact(missed, None).await.expect("compact");
    match next(&mut watch, "resumed into compacted history").await {
        Some(Err(StoreError::Compacted { requested, oldest })) => {
            assert_eq!((requested, oldest), (seen + 1, missed))
        }
        other => panic!("expected Compacted, got {other:?}"),
    }
    assert!(next(&mut watch, "after Compacted").await.is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lease_expiry_ttl_rounding_and_unknown_leases() {
    let server = EtcdServer::start().await;
    let store = EtcdStore::new(server.config()).expect("config");
    // 1.2 s rounds up to 2 s (etcd's minimum with default timings is 2 s too).
    let lease = store
        .grant_lease(Duration::from_millis(1200))
        .await
        .expect("grant");
    let id: i64 = lease.0.parse().expect("lease IDs are decimal");
    let mut admin = server.admin().await;
    let ttl = admin
        .lease_time_to_live(id, None)
        .await
        .expect("time to live");
    assert_eq!(ttl.granted_ttl(), 2);

    store
        .txn(Txn::new().and_then(vec![Op::put_with_lease(
            "/l/k",
            b"v".to_vec(),
            lease.clone(),
        )]))
        .await
        .expect("put with lease");
    let kv = store.get("/l/k").await.expect("get").expect("key");
    assert_eq!(kv.lease.as_ref(), Some(&lease));
    let deadline = tokio::time::Instant::now() + PATIENCE;
    while store.get("/l/k").await.expect("get").is_some() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "lease never expired"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    match store.keep_alive(lease.clone()).await {
        Err(StoreError::LeaseNotFound(id)) => assert_eq!(id, lease.0),
        other => panic!("keep_alive after expiry: expected LeaseNotFound, got {other:?}"),
    }

    for bogus in ["not-a-number", "0", "-5", "123456789"] {
        let bogus = LeaseId(bogus.into());
        match store.keep_alive(bogus.clone()).await {
            Err(StoreError::LeaseNotFound(id)) => assert_eq!(id, bogus.0),
            other => panic!("keep_alive({bogus}): expected LeaseNotFound, got {other:?}"),
        }
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
    assert!(matches!(
        store.grant_lease(Duration::ZERO).await,
        Err(StoreError::Invalid(_))
    ));
    assert!(matches!(
        store.grant_lease(Duration::MAX).await,
        Err(StoreError::Invalid(_))
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn user_and_password_auth() {
    let mut server = EtcdServer::start().await;
    let mut admin = server.admin().await;
    admin.role_add("root").await.expect("add role root");
    admin
        .user_add("root", "root-secret", None)
        .await
        .expect("add user root");
    admin
        .user_grant_role("root", "root")
        .await
        .expect("grant root");
    admin.auth_enable().await.expect("enable auth");
    server.probe_user = Some(("root".into(), "root-secret".into()));

    let with_password = |password: Option<&str>| {
        let mut config = server.config();
        config.user = password.map(|_| "root".to_owned());
        config.password = password.map(str::to_owned);
        EtcdStore::new(config).expect("config")
    };

    let store = with_password(Some("root-secret"));
    let rev = store
        .put("/auth/k", b"v".to_vec())
        .await
        .expect("put with auth");
    assert_eq!(
        store
            .get("/auth/k")
            .await
            .expect("get")
            .map(|kv| kv.mod_revision),
        Some(rev)
    );
    let mut watch = store.watch("/auth/", 0).await.expect("watch with auth");

    let wrong = with_password(Some("wrong"));
    match wrong.get("/auth/k").await {
        Err(e @ StoreError::Rejected(_)) => {
            let msg = e.to_string();
            assert!(
                msg.contains("authenticating as user \"root\"")
                    && msg.contains("authentication failed"),
                "{msg}"
            );
            assert!(!e.is_transient(), "a wrong password is not worth retrying");
        }
        other => panic!("wrong password: expected an authentication error, got {other:?}"),
    }
    match with_password(None).get("/auth/k").await {
        Err(e) => {
            let msg = e.to_string();
            assert!(msg.contains("configure a user and password"), "{msg}");
            assert!(!e.is_transient(), "{msg}");
        }
        Ok(v) => panic!("no credentials: expected an error, got {v:?}"),
    }

    // etcd forgets its tokens when it restarts: the store authenticates
    // again by itself, and its watch resumes.
    server.restart().await;
    let rev = when_available("put after restart", || {
        store.put("/auth/after", b"v".to_vec())
    })
    .await;
    let ev = next_event(&mut watch, "auth watch after restart").await;
    assert_eq!((ev.kv.key.as_str(), ev.revision()), ("/auth/after", rev));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_with_client_certificates() {
    let certs = tempfile::tempdir().expect("dir");
    let server = EtcdServer::start_tls(make_tls_files(certs.path())).await;
    let store = EtcdStore::new(server.config()).expect("config");
    let rev = store
        .put("/tls/k", b"v".to_vec())
        .await
        .expect("put over TLS");
    let mut watch = store.watch("/tls/", rev).await.expect("watch over TLS");
    assert_eq!(next_event(&mut watch, "tls watch").await.revision(), rev);
    let lease = store
        .grant_lease(Duration::from_secs(10))
        .await
        .expect("grant");
    store.keep_alive(lease).await.expect("keep_alive over TLS");

    // The same with an explicit https:// endpoint.
    let mut config = server.config();
    config.endpoints = vec![format!("https://{}", server.endpoint())];
    let store = EtcdStore::new(config).expect("config");
    assert!(store.get("/tls/k").await.expect("get").is_some());

    // What an operator gets wrong is refused with a message that says what:
    // not retried as if the store were down.
    let other_dir = tempfile::tempdir().expect("dir");
    let other = make_tls_files(other_dir.path());
    let tls = server.config().tls.expect("tls");
    let with = |ca: &std::path::Path, pair: Option<(&std::path::Path, &std::path::Path)>| {
        let mut config = server.config();
        config.tls = Some(TlsFiles {
            ca: ca.to_path_buf(),
            cert: pair.map(|p| p.0.to_path_buf()),
            key: pair.map(|p| p.1.to_path_buf()),
        });
        config
    };
    let own_pair = Some((tls.cert.as_deref().unwrap(), tls.key.as_deref().unwrap()));
    let other_pair = Some((other.client_cert.as_path(), other.client_key.as_path()));
    // Under TLS 1.3 etcd checks a client certificate after the handshake:
    // its alert comes with the first answer, or the connection just closes.
    for (what, config) in [
        ("no client certificate", with(&tls.ca, None)),
        (
            "a client certificate of another CA",
            with(&tls.ca, other_pair),
        ),
    ] {
        let store = EtcdStore::new(config).expect("config");
        match store.get("/tls/k").await {
            Err(e @ StoreError::Rejected(_)) => {
                assert!(
                    e.to_string()
                        .contains("did not accept this client's certificate"),
                    "{what}: {e}"
                )
            }
            // The connection closed or broke before the alert was read.
            Err(StoreError::Unavailable(_)) => {}
            other => panic!("{what}: expected a rejection, got {other:?}"),
        }
    }
    for (what, config, expect) in [(
        "another CA",
        with(&other.ca, own_pair),
        "not signed by the given CA",
    )] {
        let store = EtcdStore::new(config).expect("config");
        match store.get("/tls/k").await {
            Err(e @ StoreError::Rejected(_)) => {
                assert!(e.to_string().contains(expect), "{what}: {e}");
                assert!(!e.is_transient() && !e.may_have_applied(), "{what}: {e}");
            }
            other => panic!("{what}: expected a rejection, got {other:?}"),
        }
    }
    // An expired client certificate is found before any connection.
    let expired = with(
        &other.ca,
        Some((
            other.expired_client_cert.as_path(),
            other.expired_client_key.as_path(),
        )),
    );
    match EtcdStore::new(expired) {
        Err(e @ StoreError::Invalid(_)) => {
            let msg = e.to_string();
            assert!(msg.contains("expired on") && msg.contains("2020"), "{msg}");
            assert!(msg.contains("expired.pem"), "names the file: {msg}");
        }
        other => panic!(
            "expired certificate: expected Invalid, got {:?}",
            other.map(|_| ())
        ),
    }
}

#[tokio::test]
async fn bad_configurations_are_refused_up_front() {
    let invalid = |config: EtcdConfig, what: &str| match EtcdStore::new(config) {
        Err(StoreError::Invalid(_)) => {}
        other => panic!("{what}: expected Invalid, got {other:?}"),
    };
    invalid(EtcdConfig::new(Vec::<String>::new()), "no endpoints");
    invalid(EtcdConfig::new([" "]), "blank endpoint");
    invalid(
        EtcdConfig::new(["https://127.0.0.1:1"]),
        "https without TLS",
    );
    invalid(EtcdConfig::new(["unix:///tmp/etcd.sock"]), "unknown scheme");
    let mut config = EtcdConfig::new(["127.0.0.1:1"]);
    config.user = Some("root".into());
    invalid(config, "user without password");
    let mut config = EtcdConfig::new(["127.0.0.1:1"]);
    config.dial_timeout = Duration::ZERO;
    invalid(config, "zero dial timeout");

    let dir = tempfile::tempdir().expect("dir");
    let files = make_tls_files(dir.path());
    let mut config = EtcdConfig::new(["http://127.0.0.1:1"]);
    config.tls = Some(TlsFiles {
        ca: files.ca.clone(),
        cert: None,
        key: None,
    });
    invalid(config, "http endpoint with TLS");
    let mut config = EtcdConfig::new(["127.0.0.1:1"]);
    config.tls = Some(TlsFiles {
        ca: files.ca.clone(),
        cert: Some(files.client_cert.clone()),
        key: None,
    });
    invalid(config, "certificate without key");
    let mut config = EtcdConfig::new(["127.0.0.1:1"]);
    config.tls = Some(TlsFiles {
        ca: dir.path().join("missing.pem"),
        cert: None,
        key: None,
    });
    let err = EtcdStore::new(config).expect_err("missing CA file");
    assert!(err.to_string().contains("missing.pem"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_endpoint_among_live_ones_is_skipped() {
    let server = EtcdServer::start().await;
    let mut config = server.config();
    config.endpoints = vec![format!("127.0.0.1:{}", free_port()), server.endpoint()];
    let store = EtcdStore::new(config).expect("config");
    for i in 0..50u8 {
        store
            .put("/multi/k", vec![i])
            .await
            .unwrap_or_else(|e| panic!("put {i} with one endpoint down: {e}"));
        store.get("/multi/k").await.expect("get");
    }
    let mut watch = store.watch("/multi/", 0).await.expect("watch");
    let rev = store.put("/multi/k", b"w".to_vec()).await.expect("put");
    assert_eq!(next_event(&mut watch, "multi").await.revision(), rev);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropping_a_watch_cancels_it_in_etcd() {
    const WATCHERS: &str = "etcd_debugging_mvcc_watcher_total";
    let server = EtcdServer::start().await;
    let store = EtcdStore::new(server.config()).expect("config");
    let base = server.metric(WATCHERS);
    let watches: Vec<WatchStream> =
        futures::future::try_join_all(["/w/a/", "/w/b/", "/w/c/"].map(|p| store.watch(p, 0)))
            .await
            .expect("watches");
    assert_eq!(server.metric(WATCHERS), base + 3.0);
    drop(watches);
    let deadline = tokio::time::Instant::now() + PATIENCE;
    while server.metric(WATCHERS) > base {
        assert!(
            tokio::time::Instant::now() < deadline,
            "etcd still has the dropped watchers"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keep_alive_renews_on_one_stream() {
    const STARTED: &str = "grpc_server_started_total{grpc_method=\"LeaseKeepAlive\",grpc_service=\"etcdserverpb.Lease\",grpc_type=\"bidi_stream\"}";
    let server = EtcdServer::start().await;
    let store = EtcdStore::new(server.config()).expect("config");
    let leases = [
        store
            .grant_lease(Duration::from_secs(30))
            .await
            .expect("grant"),
        store
            .grant_lease(Duration::from_secs(30))
            .await
            .expect("grant"),
    ];
    for _ in 0..10 {
        for lease in &leases {
            store.keep_alive(lease.clone()).await.expect("keep_alive");
        }
    }
    assert_eq!(
        server.metric(STARTED),
        2.0,
        "one keep-alive stream per lease"
    );
    // A revoked lease's stream is closed; renewing it again finds it gone.
    store.revoke_lease(leases[0].clone()).await.expect("revoke");
    assert!(matches!(
        store.keep_alive(leases[0].clone()).await,
        Err(StoreError::LeaseNotFound(_))
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_limits_are_invalid_requests() {
    let server = EtcdServer::start().await;
    let store = EtcdStore::new(server.config()).expect("config");
    let puts = |n: usize| -> Vec<Op> {
        (0..n)
            .map(|i| Op::put(format!("/big/{i}"), b"v".to_vec()))
            .collect()
    };
    let resp = store
        .txn(Txn::new().and_then(puts(128)))
        .await
        .expect("128 ops is etcd's limit");
    assert_eq!(resp.results, vec![OpResult::Put; 128]);
    match store.txn(Txn::new().and_then(puts(129))).await {
        Err(StoreError::Invalid(msg)) => assert!(msg.contains("128"), "{msg}"),
        other => panic!("129 ops: expected Invalid, got {other:?}"),
    }
    // etcd's request size limit is 1.5 MiB by default.
    match store.put("/big/value", vec![0; 3 << 20]).await {
        Err(StoreError::Invalid(msg)) => assert!(msg.contains("/big/value"), "{msg}"),
        other => panic!("3 MiB value: expected Invalid, got {other:?}"),
    }
    assert_eq!(store.get("/big/value").await.expect("get"), None);
    // Values up to the limit are fine, and so are large ranges.
    store
        .put("/big/value", vec![7; 1 << 20])
        .await
        .expect("1 MiB value");
    assert_eq!(store.range("/big/").await.expect("range").kvs.len(), 129);
}
