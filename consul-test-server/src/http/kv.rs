//! The KV endpoint, `/v1/kv/<key>`: reads (a key, `?recurse`, `?keys`,
//! `?raw`, all as blocking queries), puts (`?cas`, `?acquire`, `?release`,
//! `?flags`) and deletes (`?recurse`, `?cas`), with the refusals of a real
//! Consul's router for paths it would fold.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

use axum::body::Bytes;
use axum::extract::State as AxState;
use axum::http::{Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use serde_json::{json, Value};

use super::common::{
    add_index, blocking_read, entry_json, json_response, query, text, Blocking, MAX_VALUE,
};
use crate::shared::Shared;
use crate::state::Tables;

/// `/v1/kv/<key>`. The key is taken from the raw path and percent-decoded
/// here, so a key with an encoded `?` or `%` arrives intact.
pub(super) async fn kv(
    AxState(shared): AxState<Arc<Shared>>,
    method: Method,
    uri: Uri,
    body: Bytes,
) -> Response {
    let Some(raw) = uri.path().strip_prefix("/v1/kv") else {
        return text(StatusCode::NOT_FOUND, "test server: no such endpoint");
    };
    let raw = raw.strip_prefix('/').unwrap_or(raw);
    let key = percent_encoding::percent_decode_str(raw)
        .decode_utf8_lossy()
        .into_owned();
    // A real Consul's HTTP router folds `//` and `.` segments (redirecting),
    // and its key validation refuses a leading `/` and `..`: a client that
    // sends them has a bug, so say so instead of storing an odd key.
    if key.starts_with('/') || key.contains("//") {
        return text(
            StatusCode::BAD_REQUEST,
            "key must not begin with a '/' or contain '//'",
        );
    }
    if key.split('/').any(|seg| seg == "." || seg == "..") {
        return text(
            StatusCode::BAD_REQUEST,
            "URL path contains invalid traversal sequence",
        );
    }
    let q = query(&uri);
    match method {
        Method::GET => kv_get(&shared, &key, &q).await,
        Method::PUT => kv_put(&shared, &key, &q, body),
        Method::DELETE => kv_delete(&shared, &key, &q),
        _ => text(StatusCode::METHOD_NOT_ALLOWED, "method not allowed"),
    }
}

async fn kv_get(shared: &Shared, key: &str, q: &HashMap<String, String>) -> Response {
    let b = match Blocking::from(q) {
        Ok(b) => b,
        Err(e) => return text(StatusCode::BAD_REQUEST, e),
    };
    if q.contains_key("keys") {
        let sep = q.get("separator").cloned().unwrap_or_default();
        let (index, keys) = blocking_read(shared, &b, |s| s.tables.keys(key, &sep)).await;
        if keys.is_empty() && !key.is_empty() {
            return json_response(StatusCode::NOT_FOUND, Some(index), Value::Null);
        }
        return json_response(StatusCode::OK, Some(index), json!(keys));
    }
    if q.contains_key("recurse") {
        let (index, entries) = blocking_read(shared, &b, |s| s.tables.list(key)).await;
        if entries.is_empty() {
            return not_found(index);
        }
        let body: Vec<Value> = entries.iter().map(entry_json).collect();
        return json_response(StatusCode::OK, Some(index), Value::Array(body));
    }
    if key.is_empty() {
        return text(StatusCode::BAD_REQUEST, "Missing key name");
    }
    let (index, entry) = blocking_read(shared, &b, |s| {
        (s.tables.get_index(key), s.tables.get(key).cloned())
    })
    .await;
    let Some(entry) = entry else {
        return not_found(index);
    };
    if q.contains_key("raw") {
        let mut resp = (StatusCode::OK, entry.value).into_response();
        add_index(resp.headers_mut(), index);
        return resp;
    }
    json_response(StatusCode::OK, Some(index), json!([entry_json(&entry)]))
}

fn not_found(index: u64) -> Response {
    let mut resp = StatusCode::NOT_FOUND.into_response();
    add_index(resp.headers_mut(), index);
    resp
}

fn conflicting(q: &HashMap<String, String>, flags: &[&str]) -> bool {
    flags.iter().filter(|f| q.contains_key(**f)).count() > 1
}

/// Err: the message of a 400.
fn parse_u64(q: &HashMap<String, String>, name: &str) -> Result<Option<u64>, String> {
    q.get(name)
        .map(|v| v.parse().map_err(|_| format!("invalid {name}: {v}")))
        .transpose()
}

fn kv_put(shared: &Shared, key: &str, q: &HashMap<String, String>, body: Bytes) -> Response {
    if key.is_empty() {
        return text(StatusCode::BAD_REQUEST, "Missing key name");
    }
    if conflicting(q, &["cas", "acquire", "release"]) {
        return text(StatusCode::BAD_REQUEST, "Conflicting flags");
    }
    if body.len() > MAX_VALUE {
        return text(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!(
                "Request body({} bytes) too large, max size: {MAX_VALUE} bytes",
                body.len()
            ),
        );
    }
    let (flags, cas) = match (parse_u64(q, "flags"), parse_u64(q, "cas")) {
        (Ok(f), Ok(c)) => (f.unwrap_or(0), c),
        (Err(e), _) | (_, Err(e)) => return text(StatusCode::BAD_REQUEST, e),
    };
    let value = body.to_vec();
    let now = Instant::now();
    let result: Result<bool, String> = shared.mutate(|s| {
        if let Some(session) = q.get("acquire") {
            return s.acquire(key, value, flags, session, now);
        }
        if let Some(session) = q.get("release") {
            return s.release(key, value, flags, session);
        }
        let idx = s.next_index();
        Ok(match cas {
            Some(index) => s
                .tables
                .cas(idx, Tables::put_entry(key, value, flags, ""), index)
                .is_some(),
            None => {
                s.tables.put(idx, key, value, flags);
                true
            }
        })
    });
    match result {
        Ok(done) => json_response(StatusCode::OK, None, json!(done)),
        Err(e) => text(StatusCode::INTERNAL_SERVER_ERROR, e),
    }
}

fn kv_delete(shared: &Shared, key: &str, q: &HashMap<String, String>) -> Response {
    if conflicting(q, &["recurse", "cas"]) {
        return text(StatusCode::BAD_REQUEST, "Conflicting flags");
    }
    let recurse = q.contains_key("recurse");
    if key.is_empty() && !recurse {
        return text(StatusCode::BAD_REQUEST, "Missing key name");
    }
    let cas = match parse_u64(q, "cas") {
        Ok(c) => c,
        Err(e) => return text(StatusCode::BAD_REQUEST, e),
    };
    let now = Instant::now();
    let done = shared.mutate(|s| {
        let idx = s.next_index();
        if recurse {
            s.tables.delete_prefix(idx, key, now);
            true
        } else if let Some(index) = cas {
            s.tables.delete_cas(idx, key, index, now)
        } else {
            s.tables.delete_key(idx, key, now);
            true
        }
    });
    json_response(StatusCode::OK, None, json!(done))
}
