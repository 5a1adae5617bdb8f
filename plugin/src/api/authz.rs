//! Docker's authorization hook (`dockerd --authorization-plugin
//! rustoverlay`, optional): the one place where `docker network rm` of a
//! network defined once can be turned down while other hosts use it. Docker
//! asks before it starts removing; once it calls the network driver it has
//! decided, and ignores the driver's errors.
//!
//! Every other request of the engine's API comes here too, so the answer is
//! "allow" at once, and also whenever the store cannot say in time: a hook
//! that fails denies the whole API.

use super::AppState;
use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::Json;
use futures::StreamExt;
use serde::{Deserialize, Serialize};
use std::time::Duration;

/// The longest a removal check may take before the removal is allowed.
const CHECK_LIMIT: Duration = Duration::from_secs(2);

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "PascalCase", default)]
struct AuthZRequest {
    request_method: String,
    /// Docker's key is `RequestUri`.
    #[serde(alias = "RequestURI")]
    request_uri: String,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "PascalCase")]
pub(super) struct AuthZResponse {
    allow: bool,
    #[serde(skip_serializing_if = "String::is_empty")]
    msg: String,
}

fn allow() -> Json<AuthZResponse> {
    Json(AuthZResponse {
        allow: true,
        msg: String::new(),
    })
}

/// `AuthZPlugin.AuthZReq`: allow, unless it removes a network defined once
/// that containers on other hosts use.
pub(super) async fn request(State(state): State<AppState>, body: Bytes) -> Json<AuthZResponse> {
    let req: AuthZRequest = match serde_json::from_slice(&body) {
        Ok(r) => r,
        Err(e) => {
            tracing::debug!(error = %e, body = %String::from_utf8_lossy(&body[..body.len().min(400)]), "unreadable authorization request; allowed");
            return allow();
        }
    };
    let Some(target) = network_removal(&req.request_method, &req.request_uri) else {
        return allow();
    };
    tracing::debug!(network = %target, uri = %req.request_uri, "network removal to authorize");
    match tokio::time::timeout(CHECK_LIMIT, state.driver.removal_veto(target)).await {
        Ok(Ok(None)) => allow(),
        Ok(Ok(Some(msg))) => {
            tracing::info!(network = %target, reason = %msg, "network removal turned down");
            Json(AuthZResponse { allow: false, msg })
        }
        Ok(Err(e)) => {
            tracing::warn!(network = %target, error = %e, "cannot tell whether other hosts use the network; its removal is allowed");
            allow()
        }
        Err(_) => {
            tracing::warn!(network = %target, limit = ?CHECK_LIMIT, "the store did not say in time whether other hosts use the network; its removal is allowed");
            allow()
        }
    }
}

/// `AuthZPlugin.AuthZRes`: answers are never held back. Docker sends the
/// whole answer it checks (a `docker ps -a` of a busy host can be large):
/// read and drop it as it comes, never buffered, never refused for size.
pub(super) async fn response(body: Body) -> Json<AuthZResponse> {
    let mut chunks = body.into_data_stream();
    while let Some(Ok(_)) = chunks.next().await {}
    allow()
}

/// The network `DELETE /v1.45/networks/NAME` removes (any API version, or
/// none; a query string is ignored).
fn network_removal<'a>(method: &str, uri: &'a str) -> Option<&'a str> {
    if !method.eq_ignore_ascii_case("DELETE") {
        return None;
    }
    let path = uri.split('?').next()?;
    let path = match path.strip_prefix("/v") {
        Some(rest) if rest.starts_with(|c: char| c.is_ascii_digit()) => &rest[rest.find('/')?..],
        _ => path,
    };
    let target = path.strip_prefix("/networks/")?;
    (!target.is_empty() && !target.contains('/')).then_some(target)
}

#[cfg(test)]
mod tests {
    use super::{network_removal, AuthZRequest};

    #[test]
    fn docker_s_request_is_read() {
        let body = br#"{"User":"","RequestMethod":"DELETE","RequestUri":"/v1.45/networks/appnet",
            "RequestHeaders":{"User-Agent":"Docker-Client/26.1.5"},"RequestBody":null}"#;
        let req: AuthZRequest = serde_json::from_slice(body).unwrap();
        assert_eq!(req.request_method, "DELETE");
        assert_eq!(req.request_uri, "/v1.45/networks/appnet");
    }

    #[test]
    fn only_a_network_removal_is_looked_at() {
        assert_eq!(
            network_removal("DELETE", "/v1.45/networks/appnet"),
            Some("appnet")
        );
        assert_eq!(network_removal("DELETE", "/networks/ab12"), Some("ab12"));
        assert_eq!(
            network_removal("DELETE", "/v1.41/networks/appnet?force=1"),
            Some("appnet")
        );
        assert_eq!(network_removal("GET", "/v1.45/networks/appnet"), None);
        assert_eq!(network_removal("DELETE", "/v1.45/containers/web"), None);
        assert_eq!(network_removal("DELETE", "/v1.45/networks/"), None);
        assert_eq!(network_removal("DELETE", "/v1.45/networks/a/b"), None);
        assert_eq!(network_removal("POST", "/v1.45/networks/prune"), None);
        assert_eq!(network_removal("DELETE", "/volumes/x"), None);
        assert_eq!(network_removal("DELETE", ""), None);
    }
}
