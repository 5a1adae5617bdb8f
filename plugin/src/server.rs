//! Docker's plugin HTTP API on the unix socket: one route per method, our own
//! JSON extractor so malformed bodies get Docker's error shape, and a time
//! limit on every request because Docker itself waits forever.

use crate::driver::Driver;
use crate::error::{PluginError, Result};
use crate::ipam::{Ipam, GLOBAL_ADDRESS_SPACE, LOCAL_ADDRESS_SPACE};
use crate::protocol::*;
use axum::body::Bytes;
use axum::extract::{FromRequest, Request, State};
use axum::http::{StatusCode, Uri};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Json, Router};
use serde::de::DeserializeOwned;
use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;
use tracing::Instrument;

type AppState = Arc<Driver>;

/// A JSON body parsed with serde_json whatever the Content-Type (Docker sends
/// none), with errors in Docker's shape.
pub struct DockerJson<T>(pub T);

impl<T: DeserializeOwned, S: Send + Sync> FromRequest<S> for DockerJson<T> {
    type Rejection = PluginError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        let method = req.uri().path().trim_start_matches('/').to_string();
        let bytes = Bytes::from_request(req, state).await.map_err(|e| {
            PluginError::BadRequest(format!("{method}: could not read the request body: {e}"))
        })?;
        if bytes.iter().all(|b| b.is_ascii_whitespace()) {
            return Err(PluginError::BadRequest(format!(
                "{method}: the request body is empty; expected a JSON object"
            )));
        }
        serde_json::from_slice(&bytes)
            .map(DockerJson)
            .map_err(|e| PluginError::BadRequest(format!("{method}: malformed JSON request: {e}")))
    }
}

pub fn router(driver: Arc<Driver>, request_timeout: Duration) -> Router {
    Router::new()
        .route("/Plugin.Activate", post(activate))
        .route("/NetworkDriver.GetCapabilities", post(net_capabilities))
        .route("/NetworkDriver.CreateNetwork", post(create_network))
        .route("/NetworkDriver.DeleteNetwork", post(delete_network))
        .route("/NetworkDriver.CreateEndpoint", post(create_endpoint))
        .route("/NetworkDriver.EndpointOperInfo", post(endpoint_info))
        .route("/NetworkDriver.DeleteEndpoint", post(delete_endpoint))
        .route("/NetworkDriver.Join", post(join))
        .route("/NetworkDriver.Leave", post(leave))
        .route("/NetworkDriver.ProgramExternalConnectivity", post(empty_ok))
        .route("/NetworkDriver.RevokeExternalConnectivity", post(empty_ok))
        .route("/NetworkDriver.DiscoverNew", post(empty_ok))
        .route("/NetworkDriver.DiscoverDelete", post(empty_ok))
        .route("/IpamDriver.GetCapabilities", post(ipam_capabilities))
        .route("/IpamDriver.GetDefaultAddressSpaces", post(address_spaces))
        .route("/IpamDriver.RequestPool", post(request_pool))
        .route("/IpamDriver.ReleasePool", post(release_pool))
        .route("/IpamDriver.RequestAddress", post(request_address))
        .route("/IpamDriver.ReleaseAddress", post(release_address))
        .fallback(unknown_method)
        .layer(middleware::from_fn_with_state(
            driver.clone(),
            move |state, req, next| bounded(state, req, next, request_timeout),
        ))
        .with_state(driver)
}

/// A span per request, and a time limit: a request that cannot finish (a
/// store that hangs past its own timeouts, a stuck kernel call) answers with
/// an error instead of hanging `docker run`.
async fn bounded(
    State(driver): State<AppState>,
    req: Request,
    next: Next,
    limit: Duration,
) -> Response {
    let method = req.uri().path().trim_start_matches('/').to_string();
    let span = tracing::info_span!("request", method = %method);
    if !driver.is_ready() && !method.starts_with("Plugin.") && !method.ends_with("Capabilities") {
        // Read the body before answering: see the note on the handlers.
        let _ = axum::body::to_bytes(req.into_body(), 1 << 20).await;
        return PluginError::Store {
            context: "this host lost its store registration".into(),
            source: kvstore_backends::StoreError::Unavailable(
                "re-registering and reconciling before serving again".into(),
            ),
        }
        .into_response();
    }
    async move {
        let started = std::time::Instant::now();
        let resp = match tokio::time::timeout(limit, next.run(req)).await {
            Ok(resp) => resp,
            Err(_) => PluginError::Internal(format!(
                "{method} did not finish within {limit:?}; the store or the kernel is not answering, \
                 check the plugin's log"
            ))
            .into_response(),
        };
        tracing::debug!(status = resp.status().as_u16(), elapsed_ms = started.elapsed().as_millis() as u64, "done");
        resp
    }
    .instrument(span)
    .await
}

async fn unknown_method(uri: Uri, _body: Bytes) -> Response {
    (
        StatusCode::NOT_FOUND,
        Json(ErrorResponse {
            err: format!(
                "{} is not a method of rustoverlay (it implements NetworkDriver and IpamDriver)",
                uri.path().trim_start_matches('/')
            ),
        }),
    )
        .into_response()
}

// Handlers without input still read the body: closing the connection while
// the client is still writing would fail Docker's call with a broken pipe.
async fn activate(_body: Bytes) -> Json<ActivateResponse> {
    Json(ActivateResponse {
        implements: vec![NETWORK_DRIVER, IPAM_DRIVER],
    })
}

async fn net_capabilities(_body: Bytes) -> Json<CapabilitiesResponse> {
    // Local: Docker without Swarm refuses global-scope drivers. Connectivity
    // is global: the network spans hosts.
    Json(CapabilitiesResponse {
        scope: "local",
        connectivity_scope: "global",
    })
}

async fn empty_ok(_body: Bytes) -> Json<Empty> {
    Json(Empty {})
}

async fn create_network(
    State(d): State<AppState>,
    DockerJson(req): DockerJson<CreateNetworkRequest>,
) -> Result<Json<Empty>> {
    d.create_network(req).await?;
    Ok(Json(Empty {}))
}

async fn delete_network(
    State(d): State<AppState>,
    DockerJson(req): DockerJson<NetworkRequest>,
) -> Result<Json<Empty>> {
    d.delete_network(&req.network_id).await?;
    Ok(Json(Empty {}))
}

async fn create_endpoint(
    State(d): State<AppState>,
    DockerJson(req): DockerJson<CreateEndpointRequest>,
) -> Result<Json<CreateEndpointResponse>> {
    let interface = d.create_endpoint(req).await?;
    Ok(Json(CreateEndpointResponse { interface }))
}

async fn endpoint_info(
    State(d): State<AppState>,
    DockerJson(req): DockerJson<EndpointRequest>,
) -> Result<Json<EndpointInfoResponse>> {
    let value = d.endpoint_info(&req.network_id, &req.endpoint_id).await?;
    Ok(Json(EndpointInfoResponse { value }))
}

async fn delete_endpoint(
    State(d): State<AppState>,
    DockerJson(req): DockerJson<EndpointRequest>,
) -> Result<Json<Empty>> {
    d.delete_endpoint(&req.network_id, &req.endpoint_id).await?;
    Ok(Json(Empty {}))
}

async fn join(
    State(d): State<AppState>,
    DockerJson(req): DockerJson<JoinRequest>,
) -> Result<Json<JoinResponse>> {
    let src_name = d.join(&req).await?;
    Ok(Json(JoinResponse {
        interface_name: InterfaceName {
            src_name,
            dst_prefix: "eth".into(),
        },
        gateway: String::new(),
        gateway_ipv6: String::new(),
        static_routes: vec![],
        disable_gateway_service: false,
    }))
}

async fn leave(
    State(d): State<AppState>,
    DockerJson(req): DockerJson<EndpointRequest>,
) -> Result<Json<Empty>> {
    d.leave(&req.network_id, &req.endpoint_id).await?;
    Ok(Json(Empty {}))
}

async fn ipam_capabilities(_body: Bytes) -> Json<IpamCapabilitiesResponse> {
    // No replay: pools and addresses live in the store and survive Docker's
    // restarts; a replay would only count references twice.
    Json(IpamCapabilitiesResponse {
        requires_mac_address: false,
        requires_request_replay: false,
    })
}

async fn address_spaces(_body: Bytes) -> Json<AddressSpacesResponse> {
    Json(AddressSpacesResponse {
        local_default_address_space: LOCAL_ADDRESS_SPACE,
        global_default_address_space: GLOBAL_ADDRESS_SPACE,
    })
}

async fn request_pool(
    State(d): State<AppState>,
    DockerJson(req): DockerJson<RequestPoolRequest>,
) -> Result<Json<RequestPoolResponse>> {
    check_address_space(&req.address_space)?;
    let parsed = Ipam::parse_pool_request(&req.pool, &req.sub_pool, req.v6)?;
    let record = d.ipam.request_pool(&parsed).await?;
    let id = crate::ipam::pool_id(&record.subnet);
    Ok(Json(RequestPoolResponse {
        pool_id: id.clone(),
        pool: id,
        data: HashMap::new(),
    }))
}

async fn release_pool(
    State(d): State<AppState>,
    DockerJson(req): DockerJson<ReleasePoolRequest>,
) -> Result<Json<Empty>> {
    require_pool_id(&req.pool_id)?;
    d.ipam.release_pool(&req.pool_id).await?;
    Ok(Json(Empty {}))
}

async fn request_address(
    State(d): State<AppState>,
    DockerJson(req): DockerJson<RequestAddressRequest>,
) -> Result<Json<RequestAddressResponse>> {
    require_pool_id(&req.pool_id)?;
    let wanted = parse_plain_ip(&req.address)?;
    let gateway = req
        .options
        .as_ref()
        .and_then(|o| o.get(REQUEST_ADDRESS_TYPE))
        .is_some_and(|t| t == GATEWAY_ADDRESS_TYPE);
    let addr = d
        .ipam
        .request_address(&req.pool_id, wanted, gateway)
        .await?;
    Ok(Json(RequestAddressResponse {
        address: addr.to_string(),
        data: HashMap::new(),
    }))
}

async fn release_address(
    State(d): State<AppState>,
    DockerJson(req): DockerJson<ReleaseAddressRequest>,
) -> Result<Json<Empty>> {
    require_pool_id(&req.pool_id)?;
    let ip = parse_plain_ip(&req.address)?.ok_or_else(|| {
        PluginError::BadRequest("ReleaseAddress: Address is missing or empty".into())
    })?;
    d.ipam.release_address(&req.pool_id, ip).await?;
    Ok(Json(Empty {}))
}

fn check_address_space(space: &str) -> Result<()> {
    match space {
        "" | LOCAL_ADDRESS_SPACE | GLOBAL_ADDRESS_SPACE => Ok(()),
        other => Err(PluginError::BadRequest(format!(
            "address space {other:?} is not one of rustoverlay's ({LOCAL_ADDRESS_SPACE}, {GLOBAL_ADDRESS_SPACE})"
        ))),
    }
}

fn require_pool_id(pool_id: &str) -> Result<()> {
    if pool_id.trim().is_empty() {
        return Err(PluginError::BadRequest(
            "PoolID is missing or empty in the request".into(),
        ));
    }
    Ok(())
}

/// Docker sends a plain IP; accept a CIDR too, since some tools do.
fn parse_plain_ip(s: &str) -> Result<Option<IpAddr>> {
    let s = s.trim();
    if s.is_empty() {
        return Ok(None);
    }
    let ip_part = s.split('/').next().unwrap_or(s);
    ip_part
        .parse()
        .map(Some)
        .map_err(|_| PluginError::BadRequest(format!("Address {s:?} is not an IP address")))
}
