//! What the handlers share: query parsing, responses with Consul's headers,
//! the JSON of KV entries and sessions, Go durations (Consul's TTLs and
//! waits are written that way), blocking queries, and Consul's limits.

use std::collections::HashMap;
use std::time::Duration;

use axum::http::{HeaderMap, HeaderValue, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use base64::Engine;
use serde_json::{json, Value};

use crate::shared::Shared;
use crate::state::{Entry, Session, State};

/// Consul's largest value (also per value in a txn).
pub(super) const MAX_VALUE: usize = 512 * 1024;
/// Consul's blocking-query wait: 5 min by default, 10 min at most.
const DEFAULT_WAIT: Duration = Duration::from_secs(300);
const MAX_WAIT: Duration = Duration::from_secs(600);
const NODE: &str = "consul-test-server";

pub(super) fn query(uri: &Uri) -> HashMap<String, String> {
    let decode = |s: &str| {
        percent_encoding::percent_decode_str(&s.replace('+', " "))
            .decode_utf8_lossy()
            .into_owned()
    };
    uri.query()
        .unwrap_or("")
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|p| match p.split_once('=') {
            Some((k, v)) => (decode(k), decode(v)),
            None => (decode(p), String::new()),
        })
        .collect()
}

pub(super) fn text(status: StatusCode, body: impl Into<String>) -> Response {
    (status, body.into()).into_response()
}

pub(super) fn json_response(status: StatusCode, index: Option<u64>, body: Value) -> Response {
    let mut resp = (status, axum::Json(body)).into_response();
    if let Some(index) = index {
        add_index(resp.headers_mut(), index);
    }
    resp
}

pub(super) fn add_index(headers: &mut HeaderMap, index: u64) {
    headers.insert("X-Consul-Index", HeaderValue::from(index.max(1)));
    headers.insert("X-Consul-KnownLeader", HeaderValue::from_static("true"));
    headers.insert("X-Consul-LastContact", HeaderValue::from_static("0"));
}

pub(super) fn entry_json(e: &Entry) -> Value {
    let mut v = json!({
        "LockIndex": e.lock_index,
        "Key": e.key,
        "Flags": e.flags,
        // Consul stores an empty value as nil, which JSON shows as null.
        "Value": if e.value.is_empty() {
            Value::Null
        } else {
            Value::String(base64::engine::general_purpose::STANDARD.encode(&e.value))
        },
        "CreateIndex": e.create_index,
        "ModifyIndex": e.modify_index,
    });
    if !e.session.is_empty() {
        v["Session"] = Value::String(e.session.clone());
    }
    v
}

pub(super) fn session_json(s: &Session) -> Value {
    json!({
        "ID": s.id,
        "Name": s.name,
        "Node": NODE,
        "LockDelay": s.lock_delay.as_nanos() as u64,
        "Behavior": s.behavior.as_str(),
        "TTL": s.ttl,
        "NodeChecks": [],
        "ServiceChecks": null,
        "CreateIndex": s.create_index,
        "ModifyIndex": s.modify_index,
    })
}

/// A Go duration ("10s", "1.5m", "100ms", "1h2m3s").
pub(super) fn parse_go_duration(s: &str) -> Option<Duration> {
    if s == "0" {
        return Some(Duration::ZERO);
    }
    let mut total = 0f64;
    let mut rest = s;
    if rest.is_empty() {
        return None;
    }
    while !rest.is_empty() {
        let num_end = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(rest.len());
        let n: f64 = rest[..num_end].parse().ok()?;
        rest = &rest[num_end..];
        let unit_end = rest
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(rest.len());
        let secs = match &rest[..unit_end] {
            "ns" => 1e-9,
            "us" | "µs" => 1e-6,
            "ms" => 1e-3,
            "s" => 1.0,
            "m" => 60.0,
            "h" => 3600.0,
            _ => return None,
        };
        total += n * secs;
        rest = &rest[unit_end..];
    }
    Duration::try_from_secs_f64(total).ok()
}

/// Blocking-query parameters: `index` and `wait`.
pub(super) struct Blocking {
    min_index: u64,
    wait: Duration,
}

impl Blocking {
    /// Err: the message of a 400.
    pub(super) fn from(q: &HashMap<String, String>) -> Result<Self, String> {
        let min_index = match q.get("index") {
            Some(v) => v.parse().map_err(|_| format!("Invalid index: {v}"))?,
            None => 0,
        };
        let wait = match q.get("wait") {
            Some(v) => parse_go_duration(v)
                .ok_or_else(|| format!("Invalid wait time: {v}"))?
                .min(MAX_WAIT),
            None => DEFAULT_WAIT,
        };
        Ok(Blocking { min_index, wait })
    }
}

/// Runs `read` until its index is above the request's `index` or the wait
/// (plus up to 1/16 jitter, as Consul adds) is over.
pub(super) async fn blocking_read<T>(
    shared: &Shared,
    b: &Blocking,
    read: impl Fn(&State) -> (u64, T),
) -> (u64, T) {
    let mut changes = shared.subscribe();
    changes.borrow_and_update();
    let (index, value) = shared.with_state(&read);
    if b.min_index == 0 || index.max(1) > b.min_index {
        return (index.max(1), value);
    }
    let jitter = shared.random() % (b.wait.as_millis() as u64 / 16).max(1);
    let deadline = tokio::time::Instant::now() + b.wait + Duration::from_millis(jitter);
    loop {
        let woke = tokio::time::timeout_at(deadline, changes.changed()).await;
        changes.borrow_and_update();
        let (index, value) = shared.with_state(&read);
        if index.max(1) > b.min_index || !matches!(woke, Ok(Ok(()))) {
            return (index.max(1), value);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::parse_go_duration;
    use std::time::Duration;

    #[test]
    fn go_durations() {
        assert_eq!(parse_go_duration("10s"), Some(Duration::from_secs(10)));
        assert_eq!(parse_go_duration("100ms"), Some(Duration::from_millis(100)));
        assert_eq!(parse_go_duration("1m30s"), Some(Duration::from_secs(90)));
        assert_eq!(parse_go_duration("1.5h"), Some(Duration::from_secs(5400)));
        assert_eq!(parse_go_duration("0"), Some(Duration::ZERO));
        assert_eq!(parse_go_duration("10"), None);
        assert_eq!(parse_go_duration(""), None);
        assert_eq!(parse_go_duration("5x"), None);
    }
}
