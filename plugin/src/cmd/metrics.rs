//! `serve --metrics-addr`: Prometheus metrics over HTTP.
//!
//! Counters and histograms are recorded where things happen (see
//! `telemetry`). The gauges that describe state, endpoints per overlay and
//! pool usage, are read from the store at each scrape (one read for this
//! host's networks, one per overlay, two per pool), so they are never stale
//! and cost nothing between scrapes.

use crate::control::ipam::Ipam;
use crate::control::overlay::Overlays;
use crate::telemetry::{self, Source};
use anyhow::Context;
use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use metrics_exporter_prometheus::PrometheusHandle;
use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::net::TcpListener;

/// A scrape answers within this, with the gauges it could refresh.
const REFRESH_LIMIT: Duration = Duration::from_secs(3);

/// The listener and the recorder, made before anything records: a bad
/// address fails the start instead of a scrape later.
pub struct Metrics {
    listener: TcpListener,
    handle: PrometheusHandle,
}

pub async fn bind(addr: SocketAddr) -> anyhow::Result<Metrics> {
    let listener = TcpListener::bind(addr).await.with_context(|| {
        format!("listen for metrics on {addr} (--metrics-addr): is the port taken?")
    })?;
    let handle = telemetry::install().context("install the metrics recorder")?;
    telemetry::zero_known_series(crate::api::DOCKER_METHODS);
    Ok(Metrics { listener, handle })
}

#[derive(Clone)]
struct Scrape {
    handle: PrometheusHandle,
    overlays: Arc<Overlays>,
    ipam: Arc<Ipam>,
    /// Label values set at the last scrape, zeroed when they go away.
    shown: Arc<Mutex<Shown>>,
}

#[derive(Default)]
struct Shown {
    overlays: BTreeSet<String>,
    pools: BTreeSet<String>,
}

/// Serve `/metrics` until the process ends.
pub fn serve(metrics: Metrics, overlays: Arc<Overlays>, ipam: Arc<Ipam>) {
    let addr = metrics.listener.local_addr().ok();
    let upkeep = metrics.handle.clone();
    tokio::spawn(async move {
        // Histograms and summaries need it to drop what they no longer hold.
        let mut tick = tokio::time::interval(Duration::from_secs(5));
        loop {
            tick.tick().await;
            upkeep.run_upkeep();
        }
    });
    let state = Scrape {
        handle: metrics.handle,
        overlays,
        ipam,
        shown: Arc::default(),
    };
    let app = Router::new()
        .route("/metrics", get(scrape))
        .route("/", get(|| async { "rustoverlay: metrics at /metrics\n" }))
        .with_state(state);
    tracing::info!(address = ?addr, "serving metrics at /metrics");
    tokio::spawn(async move {
        if let Err(e) = axum::serve(metrics.listener, app).await {
            tracing::error!(error = %e, "the metrics listener stopped");
        }
    });
}

async fn scrape(State(s): State<Scrape>) -> Response {
    let refresh = telemetry::scoped(Source::Scrape, refresh(&s));
    match tokio::time::timeout(REFRESH_LIMIT, refresh).await {
        Ok((Ok(()), _)) => {}
        Ok((Err(e), _)) => tracing::warn!(error = %e, "metrics: could not read the store's state"),
        Err(_) => tracing::warn!("metrics: the store's state took longer than {REFRESH_LIMIT:?}"),
    }
    (
        StatusCode::OK,
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        s.handle.render(),
    )
        .into_response()
}

/// Endpoints per overlay and pool usage, for this host's networks.
async fn refresh(s: &Scrape) -> crate::error::Result<()> {
    let host = s.ipam.host().to_string();
    let mut counts: BTreeMap<String, (u64, u64)> = BTreeMap::new();
    let mut subnets = BTreeSet::new();
    for net in s.overlays.local_networks().await? {
        subnets.extend(net.subnets.iter().copied());
        if counts.contains_key(&net.overlay) {
            continue;
        }
        let (eps, _) = s.overlays.endpoints(&net.overlay).await?;
        let local = eps.iter().filter(|e| e.host == host).count() as u64;
        counts.insert(net.overlay, (local, eps.len() as u64 - local));
    }
    let mut pools = BTreeSet::new();
    for subnet in subnets {
        if let Some(usage) = s.ipam.usage(&subnet).await? {
            telemetry::pool_usage(&usage.pool, usage.used, usage.size);
            pools.insert(usage.pool);
        }
    }
    for (overlay, (local, remote)) in &counts {
        telemetry::endpoints(overlay, *local, *remote);
    }
    let mut shown = s.shown.lock().unwrap_or_else(|p| p.into_inner());
    for gone in shown.overlays.difference(&counts.keys().cloned().collect()) {
        telemetry::endpoints(gone, 0, 0);
    }
    for gone in shown.pools.difference(&pools) {
        telemetry::pool_usage(gone, 0, 0);
    }
    shown.overlays = counts.into_keys().collect();
    shown.pools = pools;
    Ok(())
}
