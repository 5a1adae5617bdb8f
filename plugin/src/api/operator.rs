//! The operator's side of the plugin socket: `GET /rustoverlay/status`,
//! which `rustoverlay status` reads. Docker never calls it. It is served
//! outside Docker's time limit and readiness wait (an operator asks most
//! when the store is in trouble), with its own limit, and its store calls
//! count under `source="operator"`.

use crate::control::overlay::Overlays;
use crate::control::status::{cluster_view, ClusterView};
use crate::error::PluginError;
use crate::sync::devices::Devices;
use crate::sync::drift::{local_view, LocalView};
use crate::sync::membership::{GoneClock, LiveSet};
use crate::telemetry::{self, Source};
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use kvstore_backends::KvStore;
use serde::{Deserialize, Serialize};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;

pub const STATUS_PATH: &str = "/rustoverlay/status";
const LIMIT: Duration = Duration::from_secs(10);

/// `status --json`: stable, documented in the README; fields are only
/// ever added.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StatusReport {
    /// The version of the plugin (or CLI) that made the report.
    pub version: String,
    /// The store's backend (`file`, `etcd`, `consul`, `memory`).
    pub store: String,
    pub cluster: ClusterView,
    /// This host, through its running plugin; absent when the report was
    /// read from the store directly.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub local: Option<LocalView>,
}

/// What the status report is made from.
#[derive(Clone)]
pub struct Operator {
    pub store: Arc<dyn KvStore>,
    pub host: String,
    pub overlays: Arc<Overlays>,
    pub devices: Arc<Devices>,
    pub live: watch::Receiver<LiveSet>,
    pub gone: GoneClock,
}

pub fn router(operator: Operator) -> Router {
    Router::new()
        .route(STATUS_PATH, get(status))
        .with_state(Arc::new(operator))
}

async fn status(State(op): State<Arc<Operator>>) -> Response {
    let report = telemetry::scoped(Source::Operator, report(&op));
    match tokio::time::timeout(LIMIT, report).await {
        Ok((Ok(report), _)) => Json(report).into_response(),
        Ok((Err(e), _)) => failed(e.to_string()),
        Err(_) => failed(format!(
            "the store or the kernel did not answer within {LIMIT:?}; check the plugin's log"
        )),
    }
}

fn failed(why: String) -> Response {
    let body = serde_json::json!({ "Err": why });
    (StatusCode::SERVICE_UNAVAILABLE, Json(body)).into_response()
}

async fn report(op: &Operator) -> Result<StatusReport, PluginError> {
    let mut cluster = cluster_view(op.store.as_ref()).await?;
    for host in cluster.hosts.iter_mut().filter(|h| !h.alive) {
        host.gone_since = op.gone.since(&host.host);
    }
    let live = op.live.borrow().clone();
    let lingering = op.devices.lingering();
    let local = local_view(
        &op.host,
        &op.overlays,
        op.devices.dataplane(),
        &live,
        &lingering,
    )
    .await?;
    Ok(StatusReport {
        version: env!("CARGO_PKG_VERSION").to_string(),
        store: op.store.backend_name().to_string(),
        cluster,
        local: Some(local),
    })
}
