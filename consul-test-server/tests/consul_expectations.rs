//! The test server held to what Consul's own tests expect of the calls the
//! Consul backend makes (KV reads and writes with `cas`, `acquire` and
//! `release`, deletes, `/v1/txn`, sessions, blocking queries). The facts come
//! from hashicorp/consul's API tests (`api/kv_test.go`, `api/txn_test.go`,
//! `api/session_test.go`, `api/lock_test.go`) and state-store tests
//! (`agent/consul/state/kvs_test.go`, `txn_test.go`, `session_test.go`),
//! restated here as HTTP calls, one test per fact.
//!
//! Expectations of those tests the test server does not meet, and why:
//!
//! - Sessions belong to a node and its health checks in Consul: a session
//!   made without `NodeChecks` gets the node's `serfHealth` check, a session
//!   on an unknown node is refused, and deregistering the node or failing a
//!   check invalidates the session. The test server has no catalog (one
//!   implicit node, no checks): its sessions end only by TTL or destroy,
//!   which is all the backend uses (it sends `NodeChecks: []`).
//! - Txn operations on nodes, services, checks and intentions: KV only (the
//!   server answers 400 for the others; the backend sends none).
//! - Tombstones are reaped by raft index through the leader's garbage
//!   collector (`ReapTombstones(index)`, in batches of `tombstone_ttl`
//!   granularity); the test server reaps each tombstone by its age alone.
//!   What clients see is the same: a prefix's index falls back afterwards.
//! - Snapshot and restore of the KV store and its tombstones: not modelled
//!   (`TestServer::restart` keeps everything, `TestServer::wipe` forgets
//!   everything, as a rebuilt cluster).
//! - A read-only txn that contains a write verb fails in Consul's state store
//!   ("cannot insert in read-only transaction"); over HTTP a txn with a write
//!   verb always goes through raft, so clients cannot meet this case, and the
//!   test server does not model it.
//! - `RequestTime` metadata, `RenewPeriodic`, `Lock` and `Semaphore` are the
//!   Go client's own; only the KV and session calls under them are checked.

mod common;

use std::time::{Duration, Instant};

use common::{call, server, Reply};
use consul_test_server::{Config, TestServer};
use serde_json::{json, Value};

async fn put(s: &TestServer, path: &str, value: &str) -> Value {
    let r = call(s, "PUT", &format!("/v1/kv/{path}"), value, None).await;
    assert_eq!(r.status, 200, "PUT {path}: {}", r.text);
    r.body
}

/// A key's entry (Null when absent) and the read's X-Consul-Index.
async fn entry(s: &TestServer, key: &str) -> (Value, u64) {
    let r = call(s, "GET", &format!("/v1/kv/{key}"), "", None).await;
    let index = r.index.expect("X-Consul-Index");
    match r.status {
        200 => (r.body[0].clone(), index),
        404 => (Value::Null, index),
        other => panic!("GET {key}: {other} {}", r.text),
    }
}

/// The keys of a recursive list of `prefix`, in order, and its X-Consul-Index.
async fn listed(s: &TestServer, prefix: &str) -> (Vec<String>, u64) {
    let r = call(s, "GET", &format!("/v1/kv/{prefix}?recurse"), "", None).await;
    let keys = r.body.as_array().into_iter().flatten();
    let keys = keys.filter_map(|e| e["Key"].as_str().map(str::to_owned));
    (keys.collect(), r.index.expect("X-Consul-Index"))
}

/// A prefix's X-Consul-Index (recursive list).
async fn list_index(s: &TestServer, prefix: &str) -> u64 {
    call(s, "GET", &format!("/v1/kv/{prefix}?recurse"), "", None)
        .await
        .index
        .expect("X-Consul-Index")
}

async fn session(s: &TestServer, body: &str) -> String {
    let r = call(s, "PUT", "/v1/session/create", body, None).await;
    assert_eq!(r.status, 200, "{}", r.text);
    r.body["ID"].as_str().expect("ID").to_owned()
}

async fn txn(s: &TestServer, ops: Value) -> Reply {
    call(s, "PUT", "/v1/txn", &ops.to_string(), None).await
}

/// A txn result as compared: key, value, indexes, session.
type Seen<'a> = (&'a str, Value, (u64, u64, u64), Value);

fn indexes(e: &Value) -> (u64, u64, u64) {
    let n = |f: &str| e[f].as_u64().unwrap_or_else(|| panic!("{f} in {e}"));
    (n("CreateIndex"), n("ModifyIndex"), n("LockIndex"))
}

fn b64(s: &str) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(s)
}

/// A new session (default settings) holding `key` with `value`; the
/// session's ID and the key's (CreateIndex, ModifyIndex, LockIndex).
async fn held(s: &TestServer, key: &str, value: &str) -> (String, (u64, u64, u64)) {
    let id = session(s, "{}").await;
    assert_eq!(
        put(s, &format!("{key}?acquire={id}"), value).await,
        json!(true)
    );
    (id, indexes(&entry(s, key).await.0))
}

/// PUTs `value` to `key` with `query` (`acquire=ID`, `cas=N`...), expects
/// `true`, and reads the key back: its entry and indexes.
async fn done(s: &TestServer, key: &str, query: &str, value: &str) -> (Value, (u64, u64, u64)) {
    assert_eq!(put(s, &format!("{key}?{query}"), value).await, json!(true));
    let e = entry(s, key).await.0;
    let i = indexes(&e);
    (e, i)
}

async fn fresh() -> TestServer {
    server(Config::default()).await
}

// --- KV: reads and plain writes ---------------------------------------------

#[tokio::test]
async fn a_missing_key_is_404_with_a_nonzero_index_even_on_an_empty_store() {
    let s = fresh().await;
    let r = call(&s, "GET", "/v1/kv/nothing", "", None).await;
    assert_eq!(r.status, 404);
    assert!(
        r.index.expect("index") >= 1,
        "never 0: that would not block"
    );
}

#[tokio::test]
async fn a_key_beginning_with_a_slash_is_refused() {
    let s = fresh().await;
    assert_eq!(call(&s, "PUT", "/v1/kv//test", "v", None).await.status, 400);
}

#[tokio::test]
async fn value_and_flags_round_trip_and_a_delete_makes_the_key_missing() {
    let s = fresh().await;
    assert_eq!(put(&s, "k?flags=42", "test").await, json!(true));
    let (e, index) = entry(&s, "k").await;
    assert_eq!(
        (e["Value"].clone(), e["Flags"].clone()),
        (json!(b64("test")), json!(42))
    );
    assert!(index > 0);
    assert_eq!(
        call(&s, "DELETE", "/v1/kv/k", "", None).await.body,
        json!(true)
    );
    assert_eq!(entry(&s, "k").await.0, Value::Null);
}

#[tokio::test]
async fn a_set_keeps_create_index_moves_modify_index_and_a_key_read_reports_it() {
    let s = fresh().await;
    put(&s, "k", "bar").await;
    let (e, index) = entry(&s, "k").await;
    let (create, modify, _) = indexes(&e);
    assert_eq!((create, index), (modify, modify));
    put(&s, "k", "baz").await;
    let (e, index) = entry(&s, "k").await;
    let (create2, modify2, _) = indexes(&e);
    assert_eq!(create2, create);
    assert!(modify2 > modify);
    assert_eq!(index, modify2, "a key's read is at its ModifyIndex");
}

#[tokio::test]
async fn a_plain_put_changes_a_locked_value_but_keeps_its_holder_and_ignores_a_given_session() {
    let s = fresh().await;
    let (id, _) = held(&s, "k", "locked").await;
    put(&s, "k", "stoleit").await;
    let (e, _) = entry(&s, "k").await;
    assert_eq!(
        (e["Value"].clone(), e["Session"].clone()),
        (json!(b64("stoleit")), json!(id))
    );
    // A set naming a session (in a txn, the only place one can be given)
    // does not lock anything.
    let r = txn(
        &s,
        json!([{"KV": {"Verb": "set", "Key": "free", "Value": b64("v"), "Session": id}}]),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(entry(&s, "free").await.0.get("Session"), None);
}

#[tokio::test]
async fn a_missing_key_reads_at_the_kv_tables_index() {
    let s = fresh().await;
    put(&s, "a", "1").await;
    put(&s, "other", "yup").await;
    let (_, other) = entry(&s, "other").await;
    assert_eq!(entry(&s, "nope").await.1, other);
}

#[tokio::test]
async fn listing_everything_is_at_the_tables_index_and_a_prefix_at_its_newest_entry() {
    let s = fresh().await;
    for k in [
        "foo",
        "foo/bar",
        "foo/bar/zip",
        "foo/bar/zip/zorp",
        "foo/bar/baz",
    ] {
        put(&s, k, "v").await;
    }
    let newest = entry(&s, "foo/bar/baz").await.1;
    let zorp = entry(&s, "foo/bar/zip/zorp").await.1;
    let r = call(&s, "GET", "/v1/kv/?recurse", "", None).await;
    assert_eq!(
        (r.index, r.body.as_array().map(Vec::len)),
        (Some(newest), Some(5))
    );
    let (keys, index) = listed(&s, "foo/bar/zip").await;
    assert_eq!(
        keys,
        ["foo/bar/zip", "foo/bar/zip/zorp"],
        "a string prefix, in key order"
    );
    assert_eq!(index, zorp);
}

#[tokio::test]
async fn keys_with_a_separator_fold_what_lies_below_into_one_entry() {
    let s = fresh().await;
    for k in [
        "foo",
        "foo/bar",
        "foo/bar/baz",
        "foo/bar/zip",
        "foo/bar/zip/zam",
        "foo/bar/zip/zorp",
        "some/other",
    ] {
        put(&s, k, "v").await;
    }
    let r = call(&s, "GET", "/v1/kv/foo/bar/?keys&separator=/", "", None).await;
    assert_eq!(
        r.body,
        json!(["foo/bar/baz", "foo/bar/zip", "foo/bar/zip/"])
    );
    assert_eq!(r.index, Some(entry(&s, "foo/bar/zip/zorp").await.1));
    let r = call(&s, "GET", "/v1/kv/foo?keys", "", None).await;
    assert_eq!(
        r.body.as_array().map(Vec::len),
        Some(6),
        "no separator: every key"
    );
}

// --- KV: deletes and tombstones -------------------------------------------------

#[tokio::test]
async fn a_delete_leaves_a_tombstone_that_holds_the_prefix_index_until_reaped() {
    let s = fresh().await;
    put(&s, "foo/bar/baz", "v").await;
    put(&s, "foo/bar/zip", "v").await;
    let zip = entry(&s, "foo/bar/zip").await.1;
    call(&s, "DELETE", "/v1/kv/foo/bar/baz", "", None).await;
    let deleted = list_index(&s, "foo/bar/baz").await;
    assert!(deleted > zip, "the prefix's index is the delete's");
    put(&s, "some/other/key", "v").await;
    let other = entry(&s, "some/other/key").await.1;
    assert_eq!(
        list_index(&s, "foo/bar/baz").await,
        deleted,
        "a write elsewhere does not move it"
    );
    assert_eq!(list_index(&s, "foo/bar/").await, deleted);
    assert_eq!(s.reap_tombstones(), 1);
    assert_eq!(
        list_index(&s, "foo/bar/").await,
        zip,
        "back to its newest key"
    );
    assert_eq!(
        list_index(&s, "foo/bar/baz").await,
        other,
        "nothing left: the table's index"
    );
    assert_eq!(list_index(&s, "").await, other);
}

#[tokio::test]
async fn deleting_a_missing_key_succeeds_and_moves_no_index() {
    let s = fresh().await;
    put(&s, "foo", "v").await;
    let before = entry(&s, "nope").await.1;
    assert_eq!(
        call(&s, "DELETE", "/v1/kv/nope", "", None).await.body,
        json!(true)
    );
    assert_eq!(entry(&s, "nope").await.1, before);
    assert_eq!(list_index(&s, "").await, before);
}

#[tokio::test]
async fn a_cas_delete_needs_the_current_modify_index_and_succeeds_on_a_missing_key() {
    let s = fresh().await;
    put(&s, "bar", "v").await;
    let (e, _) = entry(&s, "bar").await;
    let modify = indexes(&e).1;
    let stale = format!("/v1/kv/bar?cas={}", modify - 1);
    assert_eq!(
        call(&s, "DELETE", &stale, "", None).await.body,
        json!(false)
    );
    assert_eq!(entry(&s, "bar").await.0, e, "untouched");
    let right = format!("/v1/kv/bar?cas={modify}");
    assert_eq!(call(&s, "DELETE", &right, "", None).await.body, json!(true));
    let (gone, deleted) = entry(&s, "bar").await;
    assert_eq!(gone, Value::Null);
    assert!(deleted > modify);
    assert_eq!(
        call(&s, "DELETE", &right, "", None).await.body,
        json!(true),
        "already gone"
    );
    assert_eq!(entry(&s, "bar").await.1, deleted);
}

#[tokio::test]
async fn a_recursive_delete_takes_the_string_prefix_and_an_empty_one_moves_nothing() {
    let s = fresh().await;
    for k in ["foo/bar", "foo/bar/baz", "foo/bar/zip", "foo/zorp"] {
        put(&s, k, "v").await;
    }
    let zorp = entry(&s, "foo/zorp").await.1;
    assert_eq!(
        call(&s, "DELETE", "/v1/kv/bar?recurse", "", None)
            .await
            .body,
        json!(true)
    );
    assert_eq!(
        list_index(&s, "").await,
        zorp,
        "nothing deleted: no index moved"
    );
    call(&s, "DELETE", "/v1/kv/foo/bar?recurse", "", None).await;
    let (keys, deleted) = listed(&s, "foo").await;
    assert_eq!(keys, ["foo/zorp"]);
    assert!(deleted > zorp, "the tombstone holds the prefix's index");
    s.reap_tombstones();
    assert_eq!(list_index(&s, "foo").await, zorp);
}

#[tokio::test]
async fn deleting_the_whole_store_leaves_no_tombstone_but_dates_every_list() {
    let s = fresh().await;
    put(&s, "foo/bar", "v").await;
    put(&s, "x", "v").await;
    let before = list_index(&s, "").await;
    call(&s, "DELETE", "/v1/kv/?recurse", "", None).await;
    let everything = list_index(&s, "").await;
    assert!(everything > before);
    assert_eq!(s.reap_tombstones(), 0, "no tombstone");
    assert_eq!(
        list_index(&s, "foo/bar").await,
        everything,
        "every list at the delete's index"
    );
}

// --- KV: check-and-set -------------------------------------------------------------

#[tokio::test]
async fn cas_zero_creates_a_missing_key_and_refuses_an_existing_one() {
    let s = fresh().await;
    assert_eq!(put(&s, "foo?cas=0", "foo").await, json!(true));
    let (e, index) = entry(&s, "foo").await;
    let (create, modify, _) = indexes(&e);
    assert_eq!((create, modify), (index, index));
    assert_eq!(put(&s, "foo?cas=0", "bar").await, json!(false));
    assert_eq!(entry(&s, "foo").await.0, e);
}

#[tokio::test]
async fn cas_with_an_index_fails_on_a_missing_key_or_a_stale_index() {
    let s = fresh().await;
    let before = list_index(&s, "").await;
    assert_eq!(put(&s, "foo?cas=1", "foo").await, json!(false));
    assert_eq!(entry(&s, "foo").await.0, Value::Null, "nothing stored");
    assert_eq!(list_index(&s, "").await, before, "no table index moved");
    put(&s, "foo", "foo").await;
    let (e, _) = entry(&s, "foo").await;
    let (create, modify, _) = indexes(&e);
    assert_eq!(
        put(&s, &format!("foo?cas={}", modify + 1), "bar").await,
        json!(false)
    );
    assert_eq!(
        put(&s, &format!("foo?cas={modify}"), "bar").await,
        json!(true)
    );
    let (e, index) = entry(&s, "foo").await;
    assert_eq!(e["Value"], json!(b64("bar")));
    assert_eq!(indexes(&e).0, create);
    assert!(index > modify);
}

#[tokio::test]
async fn cas_keeps_the_lock_holder() {
    let s = fresh().await;
    let (id, (_, modify, _)) = held(&s, "foo", "locked").await;
    assert_eq!(
        put(&s, &format!("foo?cas={modify}"), "new").await,
        json!(true)
    );
    let (e, _) = entry(&s, "foo").await;
    assert_eq!(
        (e["Value"].clone(), e["Session"].clone()),
        (json!(b64("new")), json!(id))
    );
}

// --- KV: acquire and release -------------------------------------------------------

#[tokio::test]
async fn acquire_needs_a_live_session() {
    let s = fresh().await;
    let r = call(
        &s,
        "PUT",
        "/v1/kv/foo?acquire=00000000-0000-4000-a000-000000000000",
        "v",
        None,
    )
    .await;
    assert_eq!(r.status, 500);
    assert!(r.text.contains("invalid session"), "{}", r.text);
    assert_eq!(entry(&s, "foo").await.0, Value::Null);
}

#[tokio::test]
async fn acquiring_a_missing_key_creates_it_with_lock_index_one() {
    let s = fresh().await;
    let id = session(&s, "{}").await;
    assert_eq!(
        put(&s, &format!("foo?acquire={id}"), "foo").await,
        json!(true)
    );
    let (e, index) = entry(&s, "foo").await;
    assert_eq!(indexes(&e), (index, index, 1));
    assert_eq!(e["Session"], json!(id));
}

#[tokio::test]
async fn the_holder_acquiring_again_updates_the_value_without_a_new_lock_index() {
    let s = fresh().await;
    let (id, (create, first, _)) = held(&s, "foo", "foo").await;
    let (e, (c, m, l)) = done(&s, "foo", &format!("acquire={id}"), "bar").await;
    assert_eq!((c, l, e["Value"].clone()), (create, 1, json!(b64("bar"))));
    assert!(m > first);
}

#[tokio::test]
async fn every_new_acquisition_counts_in_lock_index() {
    let s = fresh().await;
    let id = session(&s, "{}").await;
    put(&s, &format!("foo?acquire={id}"), "a").await;
    put(&s, &format!("foo?release={id}"), "b").await;
    put(&s, &format!("foo?acquire={id}"), "c").await;
    assert_eq!(indexes(&entry(&s, "foo").await.0).2, 2);
    // An existing key never locked: its first lock, its CreateIndex kept.
    put(&s, "bar", "plain").await;
    let (create, ..) = indexes(&entry(&s, "bar").await.0);
    put(&s, &format!("bar?acquire={id}"), "xxx").await;
    let (c, _, l) = indexes(&entry(&s, "bar").await.0);
    assert_eq!((c, l), (create, 1));
}

#[tokio::test]
async fn another_session_can_neither_acquire_nor_release_a_held_key() {
    let s = fresh().await;
    let one = session(&s, "{}").await;
    let two = session(&s, "{}").await;
    put(&s, &format!("bar?acquire={one}"), "xxx").await;
    let (held, _) = entry(&s, "bar").await;
    assert_eq!(
        put(&s, &format!("bar?acquire={two}"), "nope").await,
        json!(false)
    );
    assert_eq!(
        put(&s, &format!("bar?release={two}"), "nope").await,
        json!(false)
    );
    assert_eq!(entry(&s, "bar").await.0, held, "unchanged");
}

#[tokio::test]
async fn release_clears_the_holder_keeps_lock_index_and_works_once() {
    let s = fresh().await;
    let (id, (create, locked, _)) = held(&s, "foo", "bar").await;
    let (e, (c, m, l)) = done(&s, "foo", &format!("release={id}"), "zoo").await;
    assert_eq!(
        (c, l, e.get("Session"), e["Value"].clone()),
        (create, 1, None, json!(b64("zoo")))
    );
    assert!(m > locked);
    assert_eq!(
        put(&s, &format!("foo?release={id}"), "nope").await,
        json!(false)
    );
    assert_eq!(
        entry(&s, "foo").await.0,
        e,
        "a second release changes nothing"
    );
}

#[tokio::test]
async fn releasing_a_missing_or_unlocked_key_reports_false_and_changes_nothing() {
    let s = fresh().await;
    let id = session(&s, "{}").await;
    assert_eq!(
        put(&s, &format!("foo?release={id}"), "bar").await,
        json!(false)
    );
    assert_eq!(entry(&s, "foo").await.0, Value::Null);
    put(&s, "foo", "bar").await;
    let (e, _) = entry(&s, "foo").await;
    assert_eq!(
        put(&s, &format!("foo?release={id}"), "baz").await,
        json!(false)
    );
    assert_eq!(entry(&s, "foo").await.0, e);
    assert_eq!(indexes(&e).2, 0);
}

// --- txn -------------------------------------------------------------------------------

#[tokio::test]
async fn a_txn_lock_without_a_session_fails_and_every_failing_op_is_reported() {
    let s = fresh().await;
    let r = txn(
        &s,
        json!([
            {"KV": {"Verb": "lock", "Key": "k", "Value": b64("test")}},
            {"KV": {"Verb": "get", "Key": "k"}},
        ]),
    )
    .await;
    assert_eq!(r.status, 409);
    assert_eq!(r.body["Results"], Value::Null);
    let errors = r.body["Errors"].as_array().expect("errors");
    assert_eq!(errors.len(), 2);
    assert_eq!(errors[0]["OpIndex"], 0);
    assert!(errors[0]["What"]
        .as_str()
        .unwrap_or("")
        .contains("missing session"));
    assert!(errors[1]["What"]
        .as_str()
        .unwrap_or("")
        .contains("doesn't exist"));
}

#[tokio::test]
async fn a_failing_txn_reports_each_op_with_its_reason_and_applies_nothing() {
    let s = fresh().await;
    put(&s, "foo/delete", "bar").await;
    put(&s, "foo/update", "stale").await;
    let holder = session(&s, "{}").await;
    let bogus = session(&s, "{}").await;
    put(&s, &format!("foo/lock?acquire={holder}"), "foo").await;
    let before = call(&s, "GET", "/v1/kv/?recurse", "", None).await;
    let lock_index = indexes(&entry(&s, "foo/lock").await.0).1;
    let r = txn(
        &s,
        json!([
            {"KV": {"Verb": "cas", "Key": "foo/update", "Value": b64("new"), "Index": 1}},
            {"KV": {"Verb": "lock", "Key": "foo/lock", "Session": bogus}},
            {"KV": {"Verb": "unlock", "Key": "foo/lock", "Session": bogus}},
            {"KV": {"Verb": "check-session", "Key": "foo/lock", "Session": bogus}},
            {"KV": {"Verb": "get", "Key": "nope"}},
            {"KV": {"Verb": "check-session", "Key": "nope", "Session": bogus}},
            {"KV": {"Verb": "check-index", "Key": "foo/lock", "Index": lock_index + 1}},
            {"KV": {"Verb": "check-index", "Key": "nope", "Index": 6}},
            {"KV": {"Verb": "nope", "Key": "foo/delete"}},
        ]),
    )
    .await;
    assert_eq!(r.status, 409, "{}", r.text);
    let reasons = [
        "index is stale",
        "lock is already held",
        "lock isn't held, or is held by another session",
        "current session",
        "\"nope\" doesn't exist",
        "\"nope\" doesn't exist",
        "current modify index",
        "\"nope\" doesn't exist",
        "unknown KV verb",
    ];
    let errors = r.body["Errors"].as_array().expect("errors");
    assert_eq!(errors.len(), reasons.len(), "{}", r.text);
    for (i, (e, why)) in errors.iter().zip(reasons).enumerate() {
        assert_eq!(e["OpIndex"], i);
        assert!(
            e["What"].as_str().unwrap_or("").contains(why),
            "op {i}: {e}"
        );
    }
    let after = call(&s, "GET", "/v1/kv/?recurse", "", None).await;
    assert_eq!(
        (after.index, after.body),
        (before.index, before.body),
        "nothing applied"
    );
}

#[tokio::test]
async fn txn_results_carry_indexes_for_every_op_and_values_only_for_reads() {
    let s = fresh().await;
    for (k, v) in [
        ("foo/delete", "bar"),
        ("foo/bar/baz", "baz"),
        ("foo/bar/zip", "zip"),
        ("foo/zorp", "zorp"),
        ("foo/update", "stale"),
    ] {
        put(&s, k, v).await;
    }
    let delete_index = indexes(&entry(&s, "foo/delete").await.0).1;
    let (update_create, update_modify, _) = indexes(&entry(&s, "foo/update").await.0);
    let id = session(&s, "{}").await;
    let r = txn(&s, json!([
        {"KV": {"Verb": "get-tree", "Key": "foo/bar"}},
        {"KV": {"Verb": "set", "Key": "foo/new", "Value": b64("one")}},
        {"KV": {"Verb": "delete", "Key": "foo/zorp"}},
        {"KV": {"Verb": "delete-cas", "Key": "foo/delete", "Index": delete_index}},
        {"KV": {"Verb": "delete-tree", "Key": "foo/bar"}},
        {"KV": {"Verb": "get", "Key": "foo/update"}},
        {"KV": {"Verb": "check-index", "Key": "foo/update", "Index": update_modify}},
        {"KV": {"Verb": "cas", "Key": "foo/update", "Value": b64("new"), "Index": update_modify}},
        {"KV": {"Verb": "get", "Key": "foo/update"}},
        {"KV": {"Verb": "lock", "Key": "foo/lock", "Session": id}},
        {"KV": {"Verb": "check-session", "Key": "foo/lock", "Session": id}},
        {"KV": {"Verb": "unlock", "Key": "foo/lock", "Session": id}},
        {"KV": {"Verb": "check-session", "Key": "foo/lock", "Session": ""}},
    ])).await;
    assert_eq!(r.status, 200, "{}", r.text);
    let results: Vec<&Value> = r.body["Results"]
        .as_array()
        .expect("results")
        .iter()
        .map(|x| &x["KV"])
        .collect();
    let t = indexes(results[2]).1;
    let got: Vec<Seen> = results
        .iter()
        .map(|e| {
            (
                e["Key"].as_str().unwrap_or(""),
                e["Value"].clone(),
                indexes(e),
                e.get("Session").cloned().unwrap_or(Value::Null),
            )
        })
        .collect();
    let sid = json!(id);
    let up = (update_create, update_modify, 0);
    let want: Vec<Seen> = vec![
        (
            "foo/bar/baz",
            json!(b64("baz")),
            indexes(results[0]),
            Value::Null,
        ),
        (
            "foo/bar/zip",
            json!(b64("zip")),
            indexes(results[1]),
            Value::Null,
        ),
        ("foo/new", Value::Null, (t, t, 0), Value::Null),
        ("foo/update", json!(b64("stale")), up, Value::Null),
        ("foo/update", Value::Null, up, Value::Null),
        (
            "foo/update",
            Value::Null,
            (update_create, t, 0),
            Value::Null,
        ),
        (
            "foo/update",
            json!(b64("new")),
            (update_create, t, 0),
            Value::Null,
        ),
        ("foo/lock", Value::Null, (t, t, 1), sid.clone()),
        ("foo/lock", Value::Null, (t, t, 1), sid),
        ("foo/lock", Value::Null, (t, t, 1), Value::Null),
        ("foo/lock", Value::Null, (t, t, 1), Value::Null),
    ];
    assert_eq!(got, want);
    assert!(t > update_modify);
    let r = call(&s, "GET", "/v1/kv/?keys", "", None).await;
    assert_eq!(r.body, json!(["foo/lock", "foo/new", "foo/update"]));
    assert_eq!(r.index, Some(t), "one raft index for the whole txn");
}

#[tokio::test]
async fn a_txn_cas_that_changes_nothing_keeps_the_modify_index() {
    let s = fresh().await;
    put(&s, "foo/a", "bar").await;
    put(&s, "foo/b", "bar").await;
    let a = indexes(&entry(&s, "foo/a").await.0);
    let b = indexes(&entry(&s, "foo/b").await.0);
    let r = txn(
        &s,
        json!([
            {"KV": {"Verb": "cas", "Key": "foo/a", "Value": b64("new"), "Index": a.1}},
            {"KV": {"Verb": "cas", "Key": "foo/b", "Value": b64("bar"), "Index": b.1}},
        ]),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text);
    let after_a = indexes(&entry(&s, "foo/a").await.0);
    assert!(after_a.1 > a.1);
    assert_eq!(
        indexes(&entry(&s, "foo/b").await.0),
        b,
        "same value: not written"
    );
    assert_eq!(list_index(&s, "").await, after_a.1);
}

#[tokio::test]
async fn a_read_only_txn_gets_trees_and_keys_and_checks_sessions() {
    let s = fresh().await;
    for k in ["foo", "foo/bar/baz", "foo/bar/zip"] {
        put(&s, k, "v").await;
    }
    let index = s.raft_index();
    let r = txn(
        &s,
        json!([
            {"KV": {"Verb": "get-tree", "Key": "foo/bar"}},
            {"KV": {"Verb": "get", "Key": "foo"}},
            {"KV": {"Verb": "check-session", "Key": "foo/bar/baz", "Session": ""}},
            {"KV": {"Verb": "check-session", "Key": "foo/bar/zip"}},
        ]),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text);
    let keys: Vec<&str> = r.body["Results"]
        .as_array()
        .expect("results")
        .iter()
        .filter_map(|x| x["KV"]["Key"].as_str())
        .collect();
    assert_eq!(
        keys,
        [
            "foo/bar/baz",
            "foo/bar/zip",
            "foo",
            "foo/bar/baz",
            "foo/bar/zip"
        ]
    );
    assert_eq!(s.raft_index(), index, "no raft write");
}

// --- sessions --------------------------------------------------------------------------

#[tokio::test]
async fn renewing_returns_the_session_with_its_ttl_as_written() {
    let s = fresh().await;
    let id = session(&s, r#"{"TTL": "10s"}"#).await;
    let r = call(&s, "PUT", &format!("/v1/session/renew/{id}"), "", None).await;
    assert_eq!(r.status, 200);
    assert_eq!(
        (r.body[0]["ID"].clone(), r.body[0]["TTL"].clone()),
        (json!(id), json!("10s"))
    );
}

#[tokio::test]
async fn renewing_a_destroyed_session_is_404() {
    let s = fresh().await;
    let id = session(&s, r#"{"Behavior": "delete", "TTL": "500s"}"#).await;
    assert_eq!(
        call(&s, "PUT", &format!("/v1/session/renew/{id}"), "", None)
            .await
            .status,
        200
    );
    assert_eq!(
        call(&s, "PUT", &format!("/v1/session/destroy/{id}"), "", None)
            .await
            .body,
        json!(true)
    );
    assert_eq!(
        call(&s, "PUT", &format!("/v1/session/renew/{id}"), "", None)
            .await
            .status,
        404
    );
}

#[tokio::test]
async fn a_session_defaults_to_release_and_a_15_s_lock_delay() {
    let s = fresh().await;
    let id = session(&s, r#"{"NodeChecks": []}"#).await;
    let r = call(&s, "GET", &format!("/v1/session/info/{id}"), "", None).await;
    let info = &r.body[0];
    assert_eq!(
        (info["ID"].clone(), info["Behavior"].clone()),
        (json!(id), json!("release"))
    );
    assert_eq!(info["LockDelay"], json!(15_000_000_000u64));
    assert!(info["CreateIndex"].as_u64().expect("CreateIndex") > 0);
    assert!(r.index.expect("index") > 0);
}

#[tokio::test]
async fn the_session_list_shows_the_live_sessions_at_a_nonzero_index() {
    let s = fresh().await;
    let id = session(&s, "{}").await;
    let r = call(&s, "GET", "/v1/session/list", "", None).await;
    assert_eq!(r.body.as_array().map(Vec::len), Some(1));
    assert_eq!(r.body[0]["ID"], json!(id));
    assert!(r.index.expect("index") > 0);
}

#[tokio::test]
async fn an_ended_release_session_frees_its_keys_keeping_value_and_lock_index() {
    let s = fresh().await;
    let id = session(&s, r#"{"LockDelay": "50ms"}"#).await;
    put(&s, &format!("foo?acquire={id}&flags=42"), "test").await;
    put(&s, "later", "v").await;
    call(&s, "PUT", &format!("/v1/session/destroy/{id}"), "", None).await;
    let (e, index) = entry(&s, "foo").await;
    let (_, modify, lock) = indexes(&e);
    assert_eq!(
        (
            lock,
            e.get("Session"),
            e["Flags"].clone(),
            e["Value"].clone()
        ),
        (1, None, json!(42), json!(b64("test")))
    );
    assert!(
        modify > entry(&s, "later").await.1,
        "rewritten at the destroy's index"
    );
    assert_eq!(index, modify);
    let r = call(&s, "GET", &format!("/v1/session/info/{id}"), "", None).await;
    assert_eq!(
        (r.body, r.index),
        (json!([]), Some(modify)),
        "gone, at the destroy's index"
    );
}

#[tokio::test]
async fn an_ended_delete_session_deletes_its_keys_leaving_tombstones() {
    let s = fresh().await;
    let id = session(&s, r#"{"Behavior": "delete", "LockDelay": "50ms"}"#).await;
    put(&s, &format!("bar/k?acquire={id}"), "test").await;
    put(&s, "later", "v").await;
    let later = entry(&s, "later").await.1;
    call(&s, "PUT", &format!("/v1/session/destroy/{id}"), "", None).await;
    let (e, index) = entry(&s, "bar/k").await;
    assert_eq!(e, Value::Null);
    assert!(index > later);
    assert_eq!(
        list_index(&s, "bar/").await,
        index,
        "the tombstone dates the prefix"
    );
    assert_eq!(s.reap_tombstones(), 1);
}

#[tokio::test]
async fn an_ended_session_leaves_its_lock_delay_on_its_keys() {
    let s = fresh().await;
    for behavior in ["release", "delete"] {
        let key = format!("delayed-{behavior}");
        let one = session(
            &s,
            &json!({"Behavior": behavior, "LockDelay": "1s"}).to_string(),
        )
        .await;
        let two = session(&s, "{}").await;
        put(&s, &format!("{key}?acquire={one}"), "v").await;
        call(&s, "PUT", &format!("/v1/session/destroy/{one}"), "", None).await;
        let ended = Instant::now();
        assert_eq!(
            put(&s, &format!("{key}?acquire={two}"), "w").await,
            json!(false),
            "{behavior}"
        );
        while put(&s, &format!("{key}?acquire={two}"), "w").await != json!(true) {
            assert!(
                ended.elapsed() < Duration::from_secs(3),
                "{behavior}: the delay never ended"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert!(ended.elapsed() >= Duration::from_millis(900), "{behavior}");
    }
}

#[tokio::test]
async fn a_release_leaves_no_lock_delay() {
    let s = fresh().await;
    let one = session(&s, r#"{"LockDelay": "10s"}"#).await;
    let two = session(&s, "{}").await;
    put(&s, &format!("k?acquire={one}"), "v").await;
    put(&s, &format!("k?release={one}"), "v").await;
    assert_eq!(put(&s, &format!("k?acquire={two}"), "w").await, json!(true));
}

// --- blocking queries -----------------------------------------------------------------

/// A blocking GET of `path` at `index`, and a write made 100 ms after it
/// started.
async fn block_then(
    s: &TestServer,
    path: &str,
    index: u64,
    write: impl std::future::Future<Output = ()>,
) -> (Reply, Duration) {
    let started = Instant::now();
    let path = format!(
        "{path}{}index={index}&wait=5s",
        if path.contains('?') { '&' } else { '?' }
    );
    let later = async {
        tokio::time::sleep(Duration::from_millis(100)).await;
        write.await;
    };
    let (r, ()) = tokio::join!(call(s, "GET", &path, "", None), later);
    (r, started.elapsed())
}

#[tokio::test]
async fn a_blocking_read_of_a_missing_key_returns_it_once_written_at_a_higher_index() {
    let s = fresh().await;
    let (_, index) = entry(&s, "k").await;
    let (r, took) = block_then(&s, "/v1/kv/k", index, async {
        put(&s, "k?flags=42", "test").await;
    })
    .await;
    assert!(took < Duration::from_secs(4));
    assert_eq!((r.status, r.body[0]["Flags"].clone()), (200, json!(42)));
    assert!(r.index.expect("index") > index);
}

#[tokio::test]
async fn a_blocking_list_of_an_empty_prefix_returns_when_a_key_appears_below() {
    let s = fresh().await;
    let index = list_index(&s, "p/").await;
    let (r, took) = block_then(&s, "/v1/kv/p/?recurse", index, async {
        put(&s, "p/k", "test").await;
    })
    .await;
    assert!(took < Duration::from_secs(4));
    assert_eq!(r.body.as_array().map(Vec::len), Some(1));
    assert!(r.index.expect("index") > index);
}

#[tokio::test]
async fn a_write_to_another_key_does_not_end_a_blocking_read() {
    let s = fresh().await;
    put(&s, "foo", "v").await;
    let (_, index) = entry(&s, "foo").await;
    let path = format!("/v1/kv/foo?index={index}&wait=400ms");
    let later = async {
        tokio::time::sleep(Duration::from_millis(100)).await;
        put(&s, "other", "yup").await;
    };
    let started = Instant::now();
    let (r, ()) = tokio::join!(call(&s, "GET", &path, "", None), later);
    assert!(
        started.elapsed() >= Duration::from_millis(400),
        "woken by another key"
    );
    assert_eq!(r.index, Some(index));
}

#[tokio::test]
async fn a_blocking_read_of_a_locked_key_returns_when_its_session_is_destroyed() {
    let s = fresh().await;
    let id = session(&s, "{}").await;
    put(&s, &format!("lock?acquire={id}"), "v").await;
    let (_, index) = entry(&s, "lock").await;
    let (r, took) = block_then(&s, "/v1/kv/lock", index, async {
        call(&s, "PUT", &format!("/v1/session/destroy/{id}"), "", None).await;
    })
    .await;
    assert!(took < Duration::from_secs(4));
    assert_eq!(r.body[0].get("Session"), None, "released");
}

#[tokio::test]
async fn a_blocking_read_of_a_locked_key_returns_when_the_key_is_deleted() {
    let s = fresh().await;
    let id = session(&s, "{}").await;
    put(&s, &format!("lock?acquire={id}"), "v").await;
    let (_, index) = entry(&s, "lock").await;
    let (r, took) = block_then(&s, "/v1/kv/lock", index, async {
        call(&s, "DELETE", "/v1/kv/lock", "", None).await;
    })
    .await;
    assert!(took < Duration::from_secs(4));
    assert_eq!(r.status, 404, "a plain delete ignores the lock");
}
