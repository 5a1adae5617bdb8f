//! `/v1/txn`: the body checked against Consul's limits (64 operations, 413
//! beyond), KV operations only, run all or nothing; 409 with per-operation
//! `Errors` (an unknown verb is one of them, next to the others), 200 with
//! `Results`. A txn without a
//! write is not a raft write: it takes no index and wakes nobody.

use std::sync::Arc;
use std::time::Instant;

use axum::body::Bytes;
use axum::extract::State as AxState;
use axum::http::StatusCode;
use axum::response::Response;
use base64::Engine;
use serde_json::{json, Value};

use super::common::{entry_json, json_response, text, MAX_VALUE};
use crate::shared::Shared;
use crate::state::{KvOp, Verb};

/// Consul's limits: operations per txn, txn body size.
const MAX_TXN_OPS: usize = 64;
const MAX_TXN_BODY: usize = 512 * 1024;

pub(super) async fn txn(AxState(shared): AxState<Arc<Shared>>, body: Bytes) -> Response {
    if body.len() > MAX_TXN_BODY {
        return text(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("Request body too large, max size: {MAX_TXN_BODY} bytes"),
        );
    }
    let raw: Vec<Value> = match serde_json::from_slice(&body) {
        Ok(v) => v,
        Err(e) => {
            return text(
                StatusCode::BAD_REQUEST,
                format!("Failed to parse body: {e}"),
            )
        }
    };
    if raw.len() > MAX_TXN_OPS {
        return text(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!(
                "Transaction contains too many operations ({} > {MAX_TXN_OPS})",
                raw.len()
            ),
        );
    }
    let mut ops = Vec::with_capacity(raw.len());
    for op in &raw {
        let Some(kv) = op.get("KV") else {
            return text(
                StatusCode::BAD_REQUEST,
                "test server: only KV operations are supported in /v1/txn",
            );
        };
        let field = |name: &str| kv.get(name).filter(|v| !v.is_null());
        let verb_name = field("Verb").and_then(Value::as_str).unwrap_or("");
        let value = match field("Value").map(|v| {
            v.as_str()
                .and_then(|s| base64::engine::general_purpose::STANDARD.decode(s).ok())
        }) {
            None => Vec::new(),
            Some(Some(v)) => v,
            Some(None) => {
                return text(
                    StatusCode::BAD_REQUEST,
                    "Failed to parse body: failed to decode value",
                )
            }
        };
        let key = field("Key")
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_owned();
        if value.len() > MAX_VALUE {
            return text(
                StatusCode::PAYLOAD_TOO_LARGE,
                format!(
                    "Value for key {key:?} is too large ({} > {MAX_VALUE} bytes)",
                    value.len()
                ),
            );
        }
        ops.push(KvOp {
            verb: Verb::parse(verb_name),
            verb_name: verb_name.to_owned(),
            key,
            value,
            flags: field("Flags").and_then(Value::as_u64).unwrap_or(0),
            index: field("Index").and_then(Value::as_u64).unwrap_or(0),
            session: field("Session")
                .and_then(Value::as_str)
                .unwrap_or("")
                .to_owned(),
        });
    }
    let write = ops.iter().any(|op| op.verb.is_write());
    let now = Instant::now();
    let result = if write {
        shared.mutate(|s| s.txn(&ops, true, now))
    } else {
        shared.mutate_quietly(|s| s.txn(&ops, false, now))
    };
    match result {
        Ok(results) => {
            let results: Vec<Value> = results
                .iter()
                .map(|e| json!({ "KV": entry_json(e) }))
                .collect();
            json_response(
                StatusCode::OK,
                None,
                json!({ "Results": results, "Errors": null }),
            )
        }
        Err(errors) => txn_errors(errors),
    }
}

fn txn_errors(errors: Vec<(usize, String)>) -> Response {
    let errors: Vec<Value> = errors
        .into_iter()
        .map(|(i, what)| json!({ "OpIndex": i, "What": what }))
        .collect();
    json_response(
        StatusCode::CONFLICT,
        None,
        json!({ "Results": null, "Errors": errors }),
    )
}
