//! One handler per Docker method: parse the request (`parse`), call the
//! driver or the IPAM, shape the answer (`wire`).

use super::parse::{self, AddressPurpose};
use super::response::ApiResult;
use super::wire::*;
use super::{AppState, DockerJson};
use crate::control::ipam::{parse_pool_id, pool_id};
use crate::error::PluginError;
use crate::telemetry;
use crate::util::backoff::until_done;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::Json;
use std::collections::HashMap;

fn endpoint_ids(network_id: &str, endpoint_id: &str) -> crate::error::Result<()> {
    parse::require_id("NetworkID", network_id)?;
    parse::require_id("EndpointID", endpoint_id)
}

pub(super) async fn unknown_method(uri: Uri, _body: Bytes) -> Response {
    (
        StatusCode::NOT_FOUND,
        Json(ErrorResponse {
            err: format!(
                "{} is not a method of rustoverlay (it implements NetworkDriver, IpamDriver and authz)",
                uri.path().trim_start_matches('/')
            ),
        }),
    )
        .into_response()
}

// Handlers without input still read the body: closing the connection while
// the client is still writing would fail Docker's call with a broken pipe.
pub(super) async fn activate(_body: Bytes) -> Json<ActivateResponse> {
    Json(ActivateResponse {
        implements: vec![NETWORK_DRIVER, IPAM_DRIVER, AUTHZ],
    })
}

pub(super) async fn net_capabilities(_body: Bytes) -> Json<CapabilitiesResponse> {
    // Local: Docker without Swarm refuses global-scope drivers. Connectivity
    // is global: the network spans hosts.
    Json(CapabilitiesResponse {
        scope: "local",
        connectivity_scope: "global",
    })
}

pub(super) async fn empty_ok(_body: Bytes) -> Json<Empty> {
    Json(Empty {})
}

pub(super) async fn create_network(
    State(s): State<AppState>,
    DockerJson(req): DockerJson<CreateNetworkRequest>,
) -> ApiResult<Json<Empty>> {
    s.driver.create_network(parse::network_spec(req)?).await?;
    Ok(Json(Empty {}))
}

pub(super) async fn delete_network(
    State(s): State<AppState>,
    DockerJson(req): DockerJson<NetworkRequest>,
) -> ApiResult<Json<Empty>> {
    parse::require_id("NetworkID", &req.network_id)?;
    persist(|| s.driver.delete_network(&req.network_id)).await?;
    Ok(Json(Empty {}))
}

pub(super) async fn create_endpoint(
    State(s): State<AppState>,
    DockerJson(req): DockerJson<CreateEndpointRequest>,
) -> ApiResult<Json<CreateEndpointResponse>> {
    let mac = s.driver.create_endpoint(parse::endpoint_spec(req)?).await?;
    // Tell Docker only what it left empty.
    let interface = mac.map(|mac_address| EndpointInterface {
        mac_address,
        ..Default::default()
    });
    Ok(Json(CreateEndpointResponse { interface }))
}

pub(super) async fn endpoint_info(
    State(s): State<AppState>,
    DockerJson(req): DockerJson<EndpointRequest>,
) -> ApiResult<Json<EndpointInfoResponse>> {
    endpoint_ids(&req.network_id, &req.endpoint_id)?;
    let info = s
        .driver
        .endpoint_info(&req.network_id, &req.endpoint_id)
        .await?;
    let mut value = serde_json::Map::new();
    value.insert("vni".into(), info.vni.into());
    value.insert("host".into(), info.host.into());
    value.insert("vtep".into(), info.vtep.to_string().into());
    value.insert("mac".into(), info.mac.into());
    Ok(Json(EndpointInfoResponse { value }))
}

pub(super) async fn delete_endpoint(
    State(s): State<AppState>,
    DockerJson(req): DockerJson<EndpointRequest>,
) -> ApiResult<Json<Empty>> {
    endpoint_ids(&req.network_id, &req.endpoint_id)?;
    persist(|| s.driver.delete_endpoint(&req.network_id, &req.endpoint_id)).await?;
    Ok(Json(Empty {}))
}

pub(super) async fn join(
    State(s): State<AppState>,
    DockerJson(req): DockerJson<JoinRequest>,
) -> ApiResult<Json<JoinResponse>> {
    endpoint_ids(&req.network_id, &req.endpoint_id)?;
    let src_name = s.driver.join(&req.network_id, &req.endpoint_id).await?;
    let dns = s.driver.dns_route(&req.sandbox_key, &req.endpoint_id).await;
    Ok(Json(JoinResponse {
        interface_name: InterfaceName {
            src_name,
            dst_prefix: "eth".into(),
        },
        gateway: String::new(),
        gateway_ipv6: String::new(),
        static_routes: dns.map(StaticRoute::connected).into_iter().collect(),
        disable_gateway_service: false,
    }))
}

pub(super) async fn leave(
    State(s): State<AppState>,
    DockerJson(req): DockerJson<EndpointRequest>,
) -> ApiResult<Json<Empty>> {
    endpoint_ids(&req.network_id, &req.endpoint_id)?;
    persist(|| s.driver.leave(&req.network_id, &req.endpoint_id)).await?;
    Ok(Json(Empty {}))
}

pub(super) async fn ipam_capabilities(_body: Bytes) -> Json<IpamCapabilitiesResponse> {
    // No replay: pools and addresses live in the store and survive Docker's
    // restarts; a replay would only count references twice. No MAC: the
    // driver derives each container's MAC from its IPv4 address, so an
    // address handed out again keeps its MAC and no container's ARP cache
    // goes stale (with a MAC from Docker it would be random).
    Json(IpamCapabilitiesResponse {
        requires_mac_address: false,
        requires_request_replay: false,
    })
}

pub(super) async fn address_spaces(_body: Bytes) -> Json<AddressSpacesResponse> {
    Json(AddressSpacesResponse {
        local_default_address_space: LOCAL_ADDRESS_SPACE,
        global_default_address_space: GLOBAL_ADDRESS_SPACE,
    })
}

pub(super) async fn request_pool(
    State(s): State<AppState>,
    DockerJson(req): DockerJson<RequestPoolRequest>,
) -> ApiResult<Json<RequestPoolResponse>> {
    parse::check_address_space(&req.address_space)?;
    let parsed = parse::pool_request(&req.pool, &req.sub_pool, req.v6)?;
    let record = s.ipam.request_pool(&parsed).await?;
    let id = pool_id(&record.subnet);
    Ok(Json(RequestPoolResponse {
        pool_id: id.clone(),
        pool: id,
        data: HashMap::new(),
    }))
}

pub(super) async fn release_pool(
    State(s): State<AppState>,
    DockerJson(req): DockerJson<ReleasePoolRequest>,
) -> ApiResult<Json<Empty>> {
    parse::require_pool_id(&req.pool_id)?;
    persist(|| s.ipam.release_pool(&req.pool_id)).await?;
    Ok(Json(Empty {}))
}

pub(super) async fn request_address(
    State(s): State<AppState>,
    DockerJson(req): DockerJson<RequestAddressRequest>,
) -> ApiResult<Json<RequestAddressResponse>> {
    parse::require_pool_id(&req.pool_id)?;
    let wanted = parse::plain_ip(&req.address)?;
    let purpose = parse::address_purpose(req.options.as_ref());
    let addr = match (purpose, wanted) {
        // Docker reserves a network's aux addresses while it creates the
        // network on this host, before CreateNetwork: an unmarked request
        // for a given address on a pool this host has no network on yet.
        (AddressPurpose::Unmarked, Some(ip))
            if !s
                .driver
                .has_network_on(&parse_pool_id(&req.pool_id)?)
                .await? =>
        {
            let addr = s.ipam.reserve_aux(&req.pool_id, ip).await?;
            telemetry::allocation(&req.pool_id, "aux");
            addr
        }
        (purpose, wanted) => {
            let gateway = purpose == AddressPurpose::Gateway;
            let addr = s
                .ipam
                .request_address(&req.pool_id, wanted, gateway)
                .await?;
            telemetry::allocation(&req.pool_id, if gateway { "gateway" } else { "container" });
            addr
        }
    };
    Ok(Json(RequestAddressResponse {
        address: addr.to_string(),
        data: HashMap::new(),
    }))
}

pub(super) async fn release_address(
    State(s): State<AppState>,
    DockerJson(req): DockerJson<ReleaseAddressRequest>,
) -> ApiResult<Json<Empty>> {
    parse::require_pool_id(&req.pool_id)?;
    let ip = parse::plain_ip(&req.address)?.ok_or_else(|| {
        PluginError::BadRequest("ReleaseAddress: Address is missing or empty".into())
    })?;
    persist(|| s.ipam.release_address(&req.pool_id, ip)).await?;
    telemetry::release(&req.pool_id);
    Ok(Json(Empty {}))
}

/// Docker does not repeat a clean-up call that failed: it logs the error
/// and forgets the object, and what the store still holds of it would stay
/// there. So clean-up calls keep trying while the store is out of reach, up
/// to the request's deadline. (Only store errors are retried; after a lost
/// answer the calls read back, so an error means "not applied".)
async fn persist<T, F, Fut>(op: F) -> Result<T, PluginError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, PluginError>>,
{
    until_done(op, |e| matches!(e, PluginError::Store { .. })).await
}
