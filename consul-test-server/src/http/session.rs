//! The session endpoints: create (TTL between the configured
//! `session_ttl_min` and 24 h, `Behavior` release or delete, `LockDelay` with
//! Consul's reading of small numbers as seconds), renew (no raft write: no
//! index, no wake-up), destroy, info and list (at the sessions table's
//! index). A session's deadline is 2x TTL after its last renewal, the late
//! end of what Consul allows.

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::{Path, State as AxState};
use axum::http::StatusCode;
use axum::response::Response;
use serde_json::{json, Value};

use super::common::{json_response, parse_go_duration, session_json, text};
use crate::shared::Shared;
use crate::state::{Behavior, Session};

const SESSION_TTL_MAX: Duration = Duration::from_secs(86_400);
const MAX_LOCK_DELAY: Duration = Duration::from_secs(60);

pub(super) async fn session_create(AxState(shared): AxState<Arc<Shared>>, body: Bytes) -> Response {
    let req: Value = if body.is_empty() {
        json!({})
    } else {
        match serde_json::from_slice(&body) {
            Ok(v) => v,
            Err(e) => {
                return text(
                    StatusCode::BAD_REQUEST,
                    format!("Request decode failed: {e}"),
                )
            }
        }
    };
    let field = |name: &str| {
        req.as_object().and_then(|o| {
            o.iter()
                .find(|(k, _)| k.eq_ignore_ascii_case(name))
                .map(|(_, v)| v.clone())
        })
    };
    let behavior = match field("Behavior").as_ref().and_then(Value::as_str) {
        None | Some("") | Some("release") => Behavior::Release,
        Some("delete") => Behavior::Delete,
        Some(other) => {
            return text(
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("Invalid Behavior setting '{other}'"),
            )
        }
    };
    let ttl = field("TTL")
        .as_ref()
        .and_then(Value::as_str)
        .unwrap_or("")
        .to_owned();
    let ttl_duration = if ttl.is_empty() {
        None
    } else {
        let Some(d) = parse_go_duration(&ttl) else {
            return text(
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("Session TTL '{ttl}' invalid"),
            );
        };
        let min = shared.config().session_ttl_min;
        if !d.is_zero() && (d < min || d > SESSION_TTL_MAX) {
            return text(
                StatusCode::INTERNAL_SERVER_ERROR,
                format!(
                    "Invalid Session TTL '{}', must be between [{min:?}={SESSION_TTL_MAX:?}]",
                    d.as_nanos()
                ),
            );
        }
        (!d.is_zero()).then_some(d)
    };
    // Consul reads small numbers as seconds (users write 15 meaning 15 s).
    let lock_delay = match field("LockDelay") {
        None => Duration::from_secs(15),
        Some(Value::String(s)) => match parse_go_duration(&s) {
            Some(d) if d.as_nanos() < 1000 => Duration::from_secs(d.as_nanos() as u64),
            Some(d) => d,
            None => {
                return text(
                    StatusCode::BAD_REQUEST,
                    format!("Request decode failed: bad LockDelay {s:?}"),
                )
            }
        },
        Some(Value::Number(n)) => {
            let ns = n.as_u64().unwrap_or(0);
            if ns < 1000 {
                Duration::from_secs(ns)
            } else {
                Duration::from_nanos(ns)
            }
        }
        Some(_) => {
            return text(
                StatusCode::BAD_REQUEST,
                "Request decode failed: bad LockDelay",
            )
        }
    };
    if lock_delay > MAX_LOCK_DELAY {
        return text(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("Session lock delay '{lock_delay:?}' is too large"),
        );
    }
    let r = shared.random();
    let id = format!(
        "{:08x}-{:04x}-4{:03x}-a{:03x}-{:012x}",
        r >> 32,
        (r >> 16) & 0xffff,
        r & 0xfff,
        shared.random() & 0xfff,
        shared.random() & 0xffff_ffff_ffff
    );
    let deadline = shared.deadline(ttl_duration, Instant::now());
    let session = Session {
        id,
        name: field("Name")
            .as_ref()
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_owned(),
        behavior,
        ttl,
        ttl_duration,
        lock_delay,
        create_index: 0,
        modify_index: 0,
        deadline,
    };
    let id = shared.mutate(|s| s.create_session(session));
    json_response(StatusCode::OK, None, json!({ "ID": id }))
}

pub(super) async fn session_renew(
    AxState(shared): AxState<Arc<Shared>>,
    Path(id): Path<String>,
) -> Response {
    let now = Instant::now();
    let ttl = shared.with_state(|s| s.sessions.get(&id).map(|s| s.ttl_duration));
    let Some(ttl) = ttl else {
        return text(
            StatusCode::NOT_FOUND,
            format!("Session id '{id}' not found"),
        );
    };
    let deadline = shared.deadline(ttl, now);
    // Renewal is not a raft write in Consul: no index, no wake-up.
    let session = shared.mutate_quietly(|state| {
        state.sessions.get_mut(&id).map(|s| {
            s.deadline = deadline;
            session_json(s)
        })
    });
    match session {
        Some(s) => json_response(StatusCode::OK, None, json!([s])),
        None => text(
            StatusCode::NOT_FOUND,
            format!("Session id '{id}' not found"),
        ),
    }
}

pub(super) async fn session_destroy(
    AxState(shared): AxState<Arc<Shared>>,
    Path(id): Path<String>,
) -> Response {
    shared.mutate(|s| s.invalidate(&id, Instant::now()));
    json_response(StatusCode::OK, None, json!(true))
}

pub(super) async fn session_info(
    AxState(shared): AxState<Arc<Shared>>,
    Path(id): Path<String>,
) -> Response {
    let (index, sessions) = shared.with_state(|s| {
        (
            s.sessions_index,
            s.sessions.get(&id).map(session_json).into_iter().collect(),
        )
    });
    json_response(StatusCode::OK, Some(index), Value::Array(sessions))
}

pub(super) async fn session_list(AxState(shared): AxState<Arc<Shared>>) -> Response {
    let (index, sessions) = shared.with_state(|s| {
        (
            s.sessions_index,
            s.sessions.values().map(session_json).collect(),
        )
    });
    json_response(StatusCode::OK, Some(index), Value::Array(sessions))
}
