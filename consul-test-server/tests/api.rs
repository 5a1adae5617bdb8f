//! The test server against Consul's documented HTTP behaviour, over raw
//! HTTP (the backend's own tests cover it through `ConsulStore`).

mod common;

use std::time::{Duration, Instant};

use common::{call, server};
use consul_test_server::{Config, Failure};
use serde_json::{json, Value};

#[tokio::test]
async fn kv_reads_writes_and_indexes() {
    let s = server(Config::default()).await;
    assert_eq!(
        call(&s, "PUT", "/v1/kv/a/1", "one", None).await.body,
        json!(true)
    );
    let r = call(&s, "GET", "/v1/kv/a/1", "", None).await;
    assert_eq!(r.status, 200);
    let e = &r.body[0];
    assert_eq!(e["Key"], "a/1");
    assert_eq!(e["Value"], "b25l"); // base64("one")
    assert_eq!(
        r.index,
        e["ModifyIndex"].as_u64(),
        "a key's index is its ModifyIndex"
    );
    let modify = r.index.expect("index");

    // Absent: 404 with the table's index; a list of an unused prefix too.
    call(&s, "PUT", "/v1/kv/b", "", None).await;
    let absent = call(&s, "GET", "/v1/kv/zzz", "", None).await;
    assert_eq!(absent.status, 404);
    assert!(absent.index.expect("index") > modify);
    assert_eq!(
        call(&s, "GET", "/v1/kv/nothing/?recurse", "", None)
            .await
            .index,
        absent.index
    );
    // An empty value is null.
    assert_eq!(
        call(&s, "GET", "/v1/kv/b", "", None).await.body[0]["Value"],
        Value::Null
    );

    call(&s, "PUT", "/v1/kv/a/2/x", "two", None).await;
    let r = call(&s, "GET", "/v1/kv/a/?recurse", "", None).await;
    assert_eq!(r.body.as_array().map(Vec::len), Some(2));
    let r = call(&s, "GET", "/v1/kv/a/?keys&separator=/", "", None).await;
    assert_eq!(r.body, json!(["a/1", "a/2/"]));

    // cas: 0 only creates, a stale index loses.
    assert_eq!(
        call(&s, "PUT", "/v1/kv/a/1?cas=0", "x", None).await.body,
        json!(false)
    );
    let stale = format!("/v1/kv/a/1?cas={}", modify + 100);
    assert_eq!(call(&s, "PUT", &stale, "x", None).await.body, json!(false));
    let fresh = format!("/v1/kv/a/1?cas={modify}");
    assert_eq!(call(&s, "PUT", &fresh, "x", None).await.body, json!(true));

    // A delete leaves a tombstone: the prefix's index moves to it.
    let before = call(&s, "GET", "/v1/kv/a/?recurse", "", None)
        .await
        .index
        .expect("index");
    assert_eq!(
        call(&s, "DELETE", "/v1/kv/a/2/x", "", None).await.body,
        json!(true)
    );
    let after = call(&s, "GET", "/v1/kv/a/?recurse", "", None)
        .await
        .index
        .expect("index");
    assert!(after > before);
    assert_eq!(s.reap_tombstones(), 1);
    let reaped = call(&s, "GET", "/v1/kv/a/?recurse", "", None)
        .await
        .index
        .expect("index");
    assert!(reaped < after, "reaping moves a prefix's index back");
    assert_eq!(
        call(&s, "DELETE", "/v1/kv/a?recurse", "", None).await.body,
        json!(true)
    );
    assert_eq!(
        call(&s, "GET", "/v1/kv/a/?recurse", "", None).await.status,
        404
    );

    // What a real Consul's router would fold is refused.
    assert_eq!(call(&s, "GET", "/v1/kv//a", "", None).await.status, 400);
    assert_eq!(call(&s, "GET", "/v1/kv/a/../b", "", None).await.status, 400);
}

#[tokio::test]
async fn txn_is_all_or_nothing_with_409_errors_and_413_beyond_64_ops() {
    let s = server(Config::default()).await;
    call(&s, "PUT", "/v1/kv/k", "v", None).await;
    let index = s.raft_index();
    let ops = json!([
        {"KV": {"Verb": "set", "Key": "new", "Value": "bmV3"}},
        {"KV": {"Verb": "check-index", "Key": "k", "Index": 1}},
        {"KV": {"Verb": "check-not-exists", "Key": "k"}},
    ]);
    let r = call(&s, "PUT", "/v1/txn", &ops.to_string(), None).await;
    assert_eq!(r.status, 409);
    assert_eq!(r.body["Results"], Value::Null);
    let failed: Vec<u64> = r.body["Errors"]
        .as_array()
        .expect("errors")
        .iter()
        .map(|e| e["OpIndex"].as_u64().expect("index"))
        .collect();
    assert_eq!(failed, vec![1, 2], "every failing op is reported");
    assert_eq!(call(&s, "GET", "/v1/kv/new", "", None).await.status, 404);
    assert_eq!(
        s.raft_index(),
        index + 1,
        "a failed write txn still takes an index"
    );

    let ops = json!([
        {"KV": {"Verb": "get-or-empty", "Key": "absent"}},
        {"KV": {"Verb": "set", "Key": "new", "Value": "bmV3"}},
        {"KV": {"Verb": "get", "Key": "new"}},
        {"KV": {"Verb": "get-tree", "Key": ""}},
    ]);
    let r = call(&s, "PUT", "/v1/txn", &ops.to_string(), None).await;
    assert_eq!(r.status, 200, "{}", r.text);
    let results = r.body["Results"].as_array().expect("results");
    assert_eq!(results.len(), 1 + 1 + 1 + 2);
    assert_eq!(results[0]["KV"]["ModifyIndex"], 0);
    assert_eq!(
        results[1]["KV"]["Value"],
        Value::Null,
        "a set's result has no value"
    );
    assert_eq!(results[2]["KV"]["Value"], "bmV3");

    let many: Vec<Value> = (0..65)
        .map(|i| json!({"KV": {"Verb": "get-or-empty", "Key": format!("k{i}")}}))
        .collect();
    let r = call(&s, "PUT", "/v1/txn", &Value::Array(many).to_string(), None).await;
    assert_eq!(r.status, 413);
    assert!(r.text.contains("65 > 64"), "{}", r.text);
}

#[tokio::test]
async fn blocking_queries_wait_for_a_change_or_the_wait() {
    let s = server(Config::default()).await;
    call(&s, "PUT", "/v1/kv/w/a", "1", None).await;
    let index = call(&s, "GET", "/v1/kv/w/?recurse", "", None)
        .await
        .index
        .expect("index");

    let started = Instant::now();
    let r = call(
        &s,
        "GET",
        &format!("/v1/kv/w/?recurse&index={index}&wait=300ms"),
        "",
        None,
    )
    .await;
    assert!(started.elapsed() >= Duration::from_millis(300));
    assert_eq!(
        r.index,
        Some(index),
        "no change: the same index after the wait"
    );

    let path = format!("/v1/kv/w/?recurse&index={index}&wait=30s");
    let write = async {
        tokio::time::sleep(Duration::from_millis(100)).await;
        call(&s, "PUT", "/v1/kv/w/b", "2", None).await;
    };
    let (r, ()) = tokio::join!(call(&s, "GET", &path, "", None), write);
    assert!(r.index.expect("index") > index);
    assert_eq!(r.body.as_array().map(Vec::len), Some(2));
}

#[tokio::test]
async fn sessions_expire_at_twice_their_ttl_and_delete_their_keys() {
    let s = server(Config {
        session_ttl_min: Duration::from_secs(1),
        ..Config::default()
    })
    .await;
    let r = call(&s, "PUT", "/v1/session/create", r#"{"TTL": "500ms"}"#, None).await;
    assert_eq!(r.status, 500);
    assert!(r.text.contains("Invalid Session TTL"), "{}", r.text);

    let body = r#"{"TTL": "1s", "Behavior": "delete", "LockDelay": "0s"}"#;
    let id = call(&s, "PUT", "/v1/session/create", body, None).await.body["ID"]
        .as_str()
        .expect("id")
        .to_owned();
    let created = Instant::now();
    let acquire = format!("/v1/kv/held?acquire={id}");
    assert_eq!(call(&s, "PUT", &acquire, "v", None).await.body, json!(true));
    let info = call(&s, "GET", &format!("/v1/session/info/{id}"), "", None).await;
    assert_eq!(info.body[0]["Behavior"], "delete");
    while call(&s, "GET", "/v1/kv/held", "", None).await.status == 200 {
        assert!(created.elapsed() < Duration::from_secs(5), "never expired");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Consul's worst case, 2x TTL, exactly (the slack is for the polling).
    let lived = created.elapsed();
    assert!(
        lived >= Duration::from_secs(2) && lived < Duration::from_millis(2300),
        "{lived:?}"
    );
    let r = call(&s, "PUT", &format!("/v1/session/renew/{id}"), "", None).await;
    assert_eq!(r.status, 404);
    assert!(r.text.contains("not found"));
    assert_eq!(
        call(&s, "GET", &format!("/v1/session/info/{id}"), "", None)
            .await
            .body,
        json!([])
    );
    assert_eq!(
        call(&s, "PUT", &format!("/v1/session/destroy/{id}"), "", None)
            .await
            .body,
        json!(true)
    );
}

/// A renewed session expires 2x TTL after its LAST renewal, not after its
/// creation (nor a TTL after the renewal): renewed three times, each renewal
/// more than a TTL after the one before and the last one well past 2x TTL
/// after creation, it still holds its key; then it holds it for at least 2x
/// TTL after that last renewal, and is gone some time later.
#[tokio::test]
async fn a_renewed_session_expires_twice_its_ttl_after_the_last_renewal() {
    let s = server(Config {
        session_ttl_min: Duration::from_secs(1),
        ..Config::default()
    })
    .await;
    let ttl = Duration::from_secs(1);
    let body = r#"{"TTL": "1s", "Behavior": "delete", "LockDelay": "0s"}"#;
    let id = call(&s, "PUT", "/v1/session/create", body, None).await.body["ID"]
        .as_str()
        .expect("id")
        .to_owned();
    let created = Instant::now();
    let acquire = format!("/v1/kv/held?acquire={id}");
    assert_eq!(call(&s, "PUT", &acquire, "v", None).await.body, json!(true));
    let held = || async { call(&s, "GET", "/v1/kv/held", "", None).await.status == 200 };
    let renew = format!("/v1/session/renew/{id}");

    // Renewed every 1.2 s: past the TTL since the previous renewal (or the
    // creation), well inside 2x TTL.
    let mut last = created;
    for n in 1..=3 {
        tokio::time::sleep(ttl * 6 / 5).await;
        assert!(held().await, "the key went before renewal {n}");
        let sent = Instant::now();
        let r = call(&s, "PUT", &renew, "", None).await;
        assert_eq!(
            r.status,
            200,
            "renewal {n}, {:?} after the previous one (2x TTL is {:?}): {}",
            sent.duration_since(last),
            ttl * 2,
            r.text
        );
        assert_eq!(r.body[0]["ID"], json!(id), "{}", r.text);
        last = sent;
    }
    assert!(
        last.duration_since(created) > ttl * 2,
        "the last renewal came past 2x TTL after the creation"
    );

    // Never before 2x TTL after the last renewal (`last` is taken before
    // the renewal was sent, so the server's renewal is no earlier), and
    // gone some time after (the bound is generous: the point is that it
    // does go).
    let gone_by = ttl * 2 + Duration::from_secs(3);
    while held().await {
        assert!(
            last.elapsed() < gone_by,
            "the session still holds its key {gone_by:?} after its last renewal"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let lived = last.elapsed();
    assert!(
        lived >= ttl * 2,
        "the key went {lived:?} after the last renewal, before 2x TTL ({:?})",
        ttl * 2
    );
    eprintln!(
        "expired {lived:?} after the last renewal, {:?} after the creation",
        created.elapsed()
    );
    assert_eq!(call(&s, "PUT", &renew, "", None).await.status, 404);
    assert_eq!(
        call(&s, "GET", &format!("/v1/session/info/{id}"), "", None)
            .await
            .body,
        json!([])
    );
}

#[tokio::test]
async fn the_acl_token_is_checked() {
    let s = server(Config {
        acl_token: Some("t0ken".into()),
        ..Config::default()
    })
    .await;
    assert_eq!(call(&s, "GET", "/v1/kv/x", "", None).await.status, 403);
    assert_eq!(
        call(&s, "GET", "/v1/kv/x", "", Some("wrong")).await.status,
        403
    );
    assert_eq!(
        call(&s, "GET", "/v1/kv/x", "", Some("t0ken")).await.status,
        404
    );
    assert_eq!(
        call(&s, "GET", "/v1/kv/x?token=t0ken", "", None)
            .await
            .status,
        404
    );
    assert_eq!(call(&s, "PUT", "/v1/txn", "[]", None).await.status, 403);
}

#[tokio::test]
async fn failures_on_demand_answer_like_a_leaderless_or_rate_limited_consul() {
    let s = server(Config::default()).await;
    call(&s, "PUT", "/v1/kv/k", "v", None).await;

    // From the test: the next two requests, whatever they are.
    s.fail_next(2, Failure::NoLeader);
    let r = call(&s, "GET", "/v1/kv/k", "", None).await;
    assert_eq!((r.status, r.text.as_str()), (500, "No cluster leader"));
    let r = call(&s, "PUT", "/v1/txn", "[]", None).await;
    assert_eq!(r.status, 500);
    assert_eq!(call(&s, "GET", "/v1/kv/k", "", None).await.status, 200);

    // Over HTTP, for shell tests: a count, or a time.
    let admin = "/test-server/fail?failure=too-many-requests&count=1";
    assert_eq!(call(&s, "PUT", admin, "", None).await.status, 200);
    let index = s.raft_index();
    let r = call(&s, "PUT", "/v1/kv/k", "w", None).await;
    assert_eq!(r.status, 429, "{}", r.text);
    assert_eq!(s.raft_index(), index, "a refused write applies nothing");
    assert_eq!(call(&s, "PUT", "/v1/kv/k", "w", None).await.status, 200);

    let admin = "/test-server/fail?failure=no-leader&for=300ms";
    assert_eq!(call(&s, "PUT", admin, "", None).await.status, 200);
    let r = call(&s, "GET", "/v1/status/leader", "", None).await;
    assert_eq!(
        (r.status, r.body.clone()),
        (200, json!("")),
        "no leader known"
    );
    assert_eq!(call(&s, "GET", "/v1/kv/k", "", None).await.status, 500);
    tokio::time::sleep(Duration::from_millis(350)).await;
    assert_eq!(call(&s, "GET", "/v1/kv/k", "", None).await.status, 200);

    s.fail_for(Duration::from_secs(60), Failure::TooManyRequests);
    assert_eq!(call(&s, "GET", "/v1/kv/k", "", None).await.status, 429);
    assert_eq!(
        call(&s, "DELETE", "/test-server/fail", "", None)
            .await
            .status,
        200
    );
    assert_eq!(call(&s, "GET", "/v1/kv/k", "", None).await.status, 200);
    for bad in [
        "/test-server/fail?failure=nope&count=1",
        "/test-server/fail?failure=no-leader",
        "/test-server/fail?failure=no-leader&count=1&for=1s",
    ] {
        assert_eq!(call(&s, "PUT", bad, "", None).await.status, 400, "{bad}");
    }
}
