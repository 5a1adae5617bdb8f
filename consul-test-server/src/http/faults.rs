//! Failures on demand: the answers a Consul cluster gives while it has no
//! leader (500 "No cluster leader") or while its rate limit refuses requests
//! (429), for the next N requests or for a while. Set from a test through
//! `TestServer`, or over HTTP for shell tests with this server's own
//! `/test-server/fail` endpoint (not part of Consul's API).

use std::sync::Arc;
use std::time::Instant;

use axum::extract::{Request, State as AxState};
use axum::http::{Method, StatusCode};
use axum::middleware::Next;
use axum::response::Response;

use super::common::{parse_go_duration, query, text};
use crate::shared::{Fault, Shared};
use crate::Failure;

const ADMIN: &str = "/test-server/fail";

/// In front of everything (ACL included: a cluster without a leader cannot
/// resolve tokens either). Serves `/test-server/fail` itself.
pub(super) async fn inject(
    AxState(shared): AxState<Arc<Shared>>,
    req: Request,
    next: Next,
) -> Response {
    if req.uri().path() == ADMIN {
        return admin(&shared, &req);
    }
    match shared.take_fault() {
        None => next.run(req).await,
        // A leaderless cluster still answers this one, with no leader.
        Some(Failure::NoLeader) if req.uri().path() == "/v1/status/leader" => {
            text(StatusCode::OK, "\"\"")
        }
        Some(Failure::NoLeader) => text(StatusCode::INTERNAL_SERVER_ERROR, "No cluster leader"),
        Some(Failure::TooManyRequests) => text(
            StatusCode::TOO_MANY_REQUESTS,
            "rate limit exceeded, try again later",
        ),
    }
}

/// `PUT /test-server/fail?failure=no-leader|too-many-requests&count=N` or
/// `...&for=2s`; `DELETE /test-server/fail` ends it.
fn admin(shared: &Shared, req: &Request) -> Response {
    if req.method() == Method::DELETE {
        shared.set_fault(None);
        return text(StatusCode::OK, "true");
    }
    if req.method() != Method::PUT {
        return text(StatusCode::METHOD_NOT_ALLOWED, "PUT or DELETE");
    }
    let q = query(req.uri());
    let Some(failure) = q.get("failure").and_then(|f| Failure::parse(f)) else {
        return text(
            StatusCode::BAD_REQUEST,
            "failure=no-leader or failure=too-many-requests",
        );
    };
    let remaining = match q.get("count").map(|c| c.parse::<usize>()) {
        None => None,
        Some(Ok(n)) => Some(n),
        Some(Err(_)) => return text(StatusCode::BAD_REQUEST, "count: a number"),
    };
    let until = match q.get("for").map(|d| parse_go_duration(d)) {
        None => None,
        Some(Some(d)) => Some(Instant::now() + d),
        Some(None) => return text(StatusCode::BAD_REQUEST, "for: a duration such as 2s"),
    };
    if remaining.is_some() == until.is_some() {
        return text(StatusCode::BAD_REQUEST, "give count=N or for=DURATION");
    }
    shared.set_fault(Some(Fault {
        failure,
        remaining,
        until,
    }));
    text(StatusCode::OK, "true")
}
