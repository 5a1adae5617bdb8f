//! Docker's plugin HTTP API on the unix socket: the only code that knows
//! Docker's JSON and HTTP. One route per method (`handlers`), Docker's wire
//! types (`wire`), request parsing into domain values (`parse`), our own JSON
//! extractor so malformed bodies get Docker's error shape (`extract`), the
//! error -> response mapping (`response`) and the socket (`socket`). Every
//! request has a time limit because Docker itself waits forever.

mod authz;
mod extract;
mod handlers;
pub mod operator;
pub mod parse;
pub mod response;
pub mod socket;
pub mod wire;

pub use extract::DockerJson;

use crate::control::ipam::Ipam;
use crate::driver::Driver;
use crate::error::PluginError;
use crate::sync::readiness::Readiness;
use crate::telemetry::{self, Source};
use crate::util::backoff::with_request_deadline;
use axum::extract::{Request, State};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::Router;
use response::ApiError;
use std::sync::Arc;
use std::time::Duration;
use tracing::Instrument;

/// What the handlers work with.
#[derive(Clone)]
pub struct AppState {
    pub driver: Arc<Driver>,
    pub ipam: Arc<Ipam>,
    /// False while this host may not act on what it holds (lease lost).
    pub ready: Readiness,
}

/// Docker hands the authorization hook request and response bodies of up
/// to 1 MiB, base64-encoded inside JSON.
const AUTHZ_BODY_LIMIT: usize = 4 << 20;

pub fn router(state: AppState, request_timeout: Duration) -> Router {
    Router::new()
        .route("/Plugin.Activate", post(handlers::activate))
        .route(
            "/NetworkDriver.GetCapabilities",
            post(handlers::net_capabilities),
        )
        .route(
            "/NetworkDriver.CreateNetwork",
            post(handlers::create_network),
        )
        .route(
            "/NetworkDriver.DeleteNetwork",
            post(handlers::delete_network),
        )
        .route(
            "/NetworkDriver.CreateEndpoint",
            post(handlers::create_endpoint),
        )
        .route(
            "/NetworkDriver.EndpointOperInfo",
            post(handlers::endpoint_info),
        )
        .route(
            "/NetworkDriver.DeleteEndpoint",
            post(handlers::delete_endpoint),
        )
        .route("/NetworkDriver.Join", post(handlers::join))
        .route("/NetworkDriver.Leave", post(handlers::leave))
        .route(
            "/NetworkDriver.ProgramExternalConnectivity",
            post(handlers::empty_ok),
        )
        .route(
            "/NetworkDriver.RevokeExternalConnectivity",
            post(handlers::empty_ok),
        )
        .route("/NetworkDriver.DiscoverNew", post(handlers::empty_ok))
        .route("/NetworkDriver.DiscoverDelete", post(handlers::empty_ok))
        .route(
            "/IpamDriver.GetCapabilities",
            post(handlers::ipam_capabilities),
        )
        .route(
            "/IpamDriver.GetDefaultAddressSpaces",
            post(handlers::address_spaces),
        )
        .route("/IpamDriver.RequestPool", post(handlers::request_pool))
        .route("/IpamDriver.ReleasePool", post(handlers::release_pool))
        .route(
            "/IpamDriver.RequestAddress",
            post(handlers::request_address),
        )
        .route(
            "/IpamDriver.ReleaseAddress",
            post(handlers::release_address),
        )
        .route("/AuthZPlugin.AuthZReq", post(authz::request))
        .route("/AuthZPlugin.AuthZRes", post(authz::response))
        .layer(axum::extract::DefaultBodyLimit::max(AUTHZ_BODY_LIMIT))
        .fallback(handlers::unknown_method)
        .layer(middleware::from_fn_with_state(
            state.clone(),
            move |state, req, next| bounded(state, req, next, request_timeout),
        ))
        .with_state(state)
}

/// Every method Docker calls: the values of the metrics' `method` label
/// (any other path counts as `unknown`, so a stray path is not a new series).
pub const DOCKER_METHODS: &[&str] = &[
    "Plugin.Activate",
    "NetworkDriver.GetCapabilities",
    "NetworkDriver.CreateNetwork",
    "NetworkDriver.DeleteNetwork",
    "NetworkDriver.CreateEndpoint",
    "NetworkDriver.EndpointOperInfo",
    "NetworkDriver.DeleteEndpoint",
    "NetworkDriver.Join",
    "NetworkDriver.Leave",
    "NetworkDriver.ProgramExternalConnectivity",
    "NetworkDriver.RevokeExternalConnectivity",
    "NetworkDriver.DiscoverNew",
    "NetworkDriver.DiscoverDelete",
    "IpamDriver.GetCapabilities",
    "IpamDriver.GetDefaultAddressSpaces",
    "IpamDriver.RequestPool",
    "IpamDriver.ReleasePool",
    "IpamDriver.RequestAddress",
    "IpamDriver.ReleaseAddress",
    "AuthZPlugin.AuthZReq",
    "AuthZPlugin.AuthZRes",
];

fn method_label(method: &str) -> &'static str {
    DOCKER_METHODS
        .iter()
        .find(|m| **m == method)
        .copied()
        .unwrap_or("unknown")
}

/// Calls that only remove this host's own objects go ahead while the host
/// re-registers. Each removal compares what it removes (the holder, the
/// revision, the gone-host fence), so a host whose holdings were reclaimed
/// meanwhile frees nothing of another's. Refusing them would be worse than
/// useless: Docker keeps an endpoint whose DeleteEndpoint failed until
/// dockerd restarts, and `docker network rm` fails with "active endpoints"
/// until then.
const CLEAN_UP: &[&str] = &[
    "NetworkDriver.Leave",
    "NetworkDriver.DeleteEndpoint",
    "NetworkDriver.DeleteNetwork",
    "IpamDriver.ReleaseAddress",
    "IpamDriver.ReleasePool",
];

/// A span per request, and a time limit: a request that cannot finish (a
/// store that hangs past its own timeouts, a stuck kernel call) answers with
/// an error instead of hanging `docker run`.
async fn bounded(
    State(state): State<AppState>,
    req: Request,
    next: Next,
    limit: Duration,
) -> Response {
    let method = req.uri().path().trim_start_matches('/').to_string();
    let span = tracing::info_span!("request", method = %method);
    let started = tokio::time::Instant::now();
    // A host that lost its lease serves again once re-registered and
    // reconciled, usually seconds after the store is back: wait for that
    // (up to 40% of the limit) rather than refuse a call Docker will not repeat.
    // The authorization hook answers every API call of the engine: it must
    // never wait (it allows whatever it cannot check).
    if !method.starts_with("Plugin.")
        && !method.starts_with("AuthZPlugin.")
        && !method.ends_with("Capabilities")
        && !CLEAN_UP.contains(&method.as_str())
        && !state.ready.wait(limit.mul_f64(0.4)).await
    {
        // Read the body before answering: see the note on the handlers.
        let _ = axum::body::to_bytes(req.into_body(), 1 << 20).await;
        let _enter = span.enter();
        telemetry::docker_request(method_label(&method), false, started.elapsed(), 0);
        return ApiError(PluginError::Store {
            context: "this host lost its store registration".into(),
            source: kvstore_backends::StoreError::Unavailable(format!(
                "still re-registering and reconciling after {:?}; retry once the store is reachable",
                started.elapsed()
            )),
        })
        .into_response();
    }
    async move {
        // Retries stop at 60% of the limit: the last round's store calls
        // (each bounded by --store-timeout) then still fit before it.
        let retry_deadline = started + limit.mul_f64(0.6);
        let run = with_request_deadline(retry_deadline, next.run(req));
        let run = telemetry::scoped(Source::Docker, tokio::time::timeout_at(started + limit, run));
        let (resp, store_calls) = run.await;
        let resp = match resp {
            Ok(resp) => resp,
            Err(_) => ApiError(PluginError::Internal(format!(
                "{method} did not finish within {limit:?}; the store or the kernel is not answering, \
                 check the plugin's log"
            )))
            .into_response(),
        };
        let status = resp.status();
        telemetry::docker_request(method_label(&method), status.is_success(), started.elapsed(), store_calls);
        tracing::debug!(status = status.as_u16(), elapsed_ms = started.elapsed().as_millis() as u64, store_calls, "done");
        resp
    }
    .instrument(span)
    .await
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cmd::parts::HostParts;
    use crate::dataplane::fake::FakeDataplane;
    use axum::body::Body;
    use axum::http::{Request as HttpRequest, StatusCode};
    use kvstore_backends::MemoryStore;
    use tower::ServiceExt;

    fn app(ready: &Readiness, limit: Duration) -> Router {
        let parts = HostParts::new(
            Arc::new(MemoryStore::new()),
            FakeDataplane::new("10.0.0.1".parse().unwrap()),
            "h1",
            "10.128.0.0/9".parse().unwrap(),
            24,
        );
        router(
            AppState {
                driver: parts.driver,
                ipam: parts.ipam,
                ready: ready.clone(),
            },
            limit,
        )
    }

    async fn call(app: Router, method: &str) -> (StatusCode, String) {
        let req = HttpRequest::post(format!("/{method}"))
            .body(Body::from("{}"))
            .unwrap();
        let resp = app.oneshot(req).await.unwrap();
        let status = resp.status();
        let body = axum::body::to_bytes(resp.into_body(), 1 << 20)
            .await
            .unwrap();
        (status, String::from_utf8_lossy(&body).into_owned())
    }

    #[tokio::test]
    async fn a_call_during_re_registration_waits_for_it_then_is_served() {
        let ready = Readiness::new(false);
        let app = app(&ready, Duration::from_secs(5));
        let setter = ready.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(300)).await;
            setter.set(true);
        });
        let (status, body) = call(app, "IpamDriver.GetDefaultAddressSpaces").await;
        assert_eq!(status, StatusCode::OK, "{body}");
        assert!(body.contains("LocalDefaultAddressSpace"), "{body}");
    }

    #[tokio::test]
    async fn a_call_is_refused_when_re_registration_outlasts_its_wait() {
        let ready = Readiness::new(false);
        let app = app(&ready, Duration::from_millis(500));
        let t0 = std::time::Instant::now();
        let (status, body) = call(app.clone(), "IpamDriver.GetDefaultAddressSpaces").await;
        assert!(
            t0.elapsed() >= Duration::from_millis(200),
            "waited 40% of the limit"
        );
        assert_ne!(status, StatusCode::OK);
        assert!(body.contains("lost its store registration"), "{body}");
        // Handshakes are never held back: Docker needs them to activate us.
        let (status, _) = call(app, "NetworkDriver.GetCapabilities").await;
        assert_eq!(status, StatusCode::OK);
    }

    #[tokio::test]
    async fn every_method_label_is_a_route_and_other_paths_are_unknown() {
        let ready = Readiness::new(true);
        let app = app(&ready, Duration::from_secs(5));
        for method in DOCKER_METHODS {
            let (status, body) = call(app.clone(), method).await;
            assert_ne!(status, StatusCode::NOT_FOUND, "{method}: {body}");
        }
        let (status, _) = call(app, "NetworkDriver.Nonsense").await;
        assert_eq!(status, StatusCode::NOT_FOUND);
        assert_eq!(method_label("NetworkDriver.Nonsense"), "unknown");
    }

    #[tokio::test]
    async fn clean_up_calls_are_served_during_re_registration_without_waiting() {
        let ready = Readiness::new(false);
        let app = app(&ready, Duration::from_secs(10));
        for method in CLEAN_UP {
            let t0 = std::time::Instant::now();
            let (status, body) = call(app.clone(), method).await;
            assert!(
                t0.elapsed() < Duration::from_secs(2),
                "{method} waited for readiness"
            );
            // Served: refused for its empty body, not for the registration.
            assert!(
                !body.contains("lost its store registration"),
                "{method}: {body}"
            );
            assert_eq!(status, StatusCode::BAD_REQUEST, "{method}: {body}");
        }
    }
}
