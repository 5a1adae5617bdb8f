//! Prometheus metrics: every name in one place, the helpers that record
//! them, and the store decorator that meters each call ([`MeteredStore`]).
//!
//! Recording goes through the `metrics` facade, so it costs a few atomic
//! operations when `--metrics-addr` is off (no recorder installed: every
//! call is a no-op). Names follow the Prometheus docs: a `rustoverlay_`
//! prefix, base units (`_seconds`), `_total` on counters only.

mod store;

pub use store::MeteredStore;

use metrics::{counter, gauge, histogram};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use std::cell::Cell;
use std::future::Future;
use std::time::Duration;

pub const DOCKER_REQUESTS: &str = "rustoverlay_docker_requests_total";
pub const DOCKER_REQUEST_SECONDS: &str = "rustoverlay_docker_request_duration_seconds";
pub const DOCKER_REQUEST_STORE_CALLS: &str = "rustoverlay_docker_request_store_calls";
pub const STORE_CALLS: &str = "rustoverlay_store_calls_total";
pub const STORE_CALL_SECONDS: &str = "rustoverlay_store_call_duration_seconds";
pub const ALLOCATIONS: &str = "rustoverlay_ipam_allocations_total";
pub const RELEASES: &str = "rustoverlay_ipam_releases_total";
pub const POOL_USED: &str = "rustoverlay_pool_used_addresses";
pub const POOL_SIZE: &str = "rustoverlay_pool_size_addresses";
pub const ENDPOINTS: &str = "rustoverlay_endpoints";
pub const PEER_SYNC_LAG: &str = "rustoverlay_peer_sync_lag_seconds";
pub const WATCH_RESYNCS: &str = "rustoverlay_watch_resyncs_total";
pub const LEASE_RENEWALS: &str = "rustoverlay_lease_renewals_total";
pub const HOSTS_ALIVE: &str = "rustoverlay_hosts_alive";
pub const RECLAIMS: &str = "rustoverlay_reclaims_total";
pub const ORPHAN_SWEEPS: &str = "rustoverlay_orphan_sweeps_total";
pub const DNS_QUERIES: &str = "rustoverlay_dns_queries_total";
pub const DNS_FORWARDS: &str = "rustoverlay_dns_forwards_total";
pub const BUILD_INFO: &str = "rustoverlay_build_info";

/// Every metric, for checks that a dashboard or a document names only these.
pub const ALL: &[&str] = &[
    DOCKER_REQUESTS,
    DOCKER_REQUEST_SECONDS,
    DOCKER_REQUEST_STORE_CALLS,
    STORE_CALLS,
    STORE_CALL_SECONDS,
    ALLOCATIONS,
    RELEASES,
    POOL_USED,
    POOL_SIZE,
    ENDPOINTS,
    PEER_SYNC_LAG,
    WATCH_RESYNCS,
    LEASE_RENEWALS,
    HOSTS_ALIVE,
    RECLAIMS,
    ORPHAN_SWEEPS,
    DNS_QUERIES,
    DNS_FORWARDS,
    BUILD_INFO,
];

/// Buckets for latencies: a store round trip on loopback is ~0.2 ms, a
/// `docker run`'s CreateEndpoint a few ms, a timeout 5 s.
const SECONDS_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];
/// Buckets for peer-sync lag: a watch event is applied in milliseconds,
/// a resync after an outage in seconds.
const LAG_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];
/// Store calls per Docker request (the cost model: CreateEndpoint's is 2).
const CALL_COUNT_BUCKETS: &[f64] = &[0.0, 1.0, 2.0, 3.0, 4.0, 6.0, 8.0, 12.0, 16.0, 32.0];

/// Install the global recorder (once, for `serve --metrics-addr`) and
/// describe every metric. The handle renders the exposition text.
pub fn install() -> Result<PrometheusHandle, metrics_exporter_prometheus::BuildError> {
    let handle = PrometheusBuilder::new()
        .set_buckets_for_metric(Matcher::Full(PEER_SYNC_LAG.into()), LAG_BUCKETS)?
        .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), SECONDS_BUCKETS)?
        .set_buckets_for_metric(
            Matcher::Full(DOCKER_REQUEST_STORE_CALLS.into()),
            CALL_COUNT_BUCKETS,
        )?
        .install_recorder()?;
    describe();
    gauge!(BUILD_INFO, "version" => env!("CARGO_PKG_VERSION")).set(1.0);
    Ok(handle)
}

fn describe() {
    use metrics::{describe_counter, describe_gauge, describe_histogram, Unit};
    describe_counter!(
        DOCKER_REQUESTS,
        "Docker plugin requests answered, by method and outcome."
    );
    describe_histogram!(
        DOCKER_REQUEST_SECONDS,
        Unit::Seconds,
        "Time to answer a Docker plugin request, by method."
    );
    describe_histogram!(
        DOCKER_REQUEST_STORE_CALLS,
        "Store round trips made while answering one Docker request, by method."
    );
    describe_counter!(STORE_CALLS, "Store calls (each one round trip), by operation, outcome and source (docker, operator, scrape, background).");
    describe_histogram!(
        STORE_CALL_SECONDS,
        Unit::Seconds,
        "Store call latency, by operation."
    );
    describe_counter!(
        ALLOCATIONS,
        "Addresses handed out to containers by this host, by pool."
    );
    describe_counter!(RELEASES, "Addresses released by this host, by pool.");
    describe_gauge!(POOL_USED, "Addresses taken in a pool cluster-wide (containers, gateway, aux), for the pools this host uses.");
    describe_gauge!(
        POOL_SIZE,
        "Usable addresses of a pool (its range, or its subnet without network and broadcast)."
    );
    describe_gauge!(
        ENDPOINTS,
        "Endpoints per overlay this host has devices for, local (this host) or remote."
    );
    describe_histogram!(PEER_SYNC_LAG, Unit::Seconds, "Time from a remote endpoint's commit in the store to its FDB and neighbour entries in this host's kernel.");
    describe_counter!(
        WATCH_RESYNCS,
        "Full re-reads after a watch broke (outage, compaction, failed apply), by watched prefix."
    );
    describe_counter!(
        LEASE_RENEWALS,
        "Host lease renewals, by outcome (ok, failed, expired)."
    );
    describe_gauge!(HOSTS_ALIVE, "Hosts registered in the store now.");
    describe_counter!(
        RECLAIMS,
        "Gone hosts whose endpoints and addresses this host reclaimed."
    );
    describe_counter!(
        ORPHAN_SWEEPS,
        "Orphan sweeps run (endpoints without a port, addresses bound to nothing)."
    );
    describe_counter!(DNS_QUERIES, "DNS queries the plugin's resolver got, by outcome (answered from the names table, forwarded, refused as malformed).");
    describe_counter!(
        DNS_FORWARDS,
        "Queries forwarded to the host's resolvers, by outcome (ok, failed, busy: too many in flight)."
    );
    describe_gauge!(BUILD_INFO, "Always 1; the labels say which build runs.");
}

/// Start at 0 the series that alerts and the dashboard take `increase()` or
/// `rate()` of: a counter whose first sample is already 1 shows no increase,
/// so the first lease failure, Docker error or store timeout after a start
/// would go unseen (as it did in the dashboard's first real run).
pub fn zero_known_series(docker_methods: &[&'static str]) {
    for outcome in ["ok", "failed", "expired"] {
        counter!(LEASE_RENEWALS, "outcome" => outcome).increment(0);
    }
    for method in docker_methods {
        counter!(DOCKER_REQUESTS, "method" => *method, "outcome" => "error").increment(0);
    }
    for op in store::OPS {
        for outcome in store::SICK {
            for source in [Source::Docker.label(), "background"] {
                counter!(STORE_CALLS, "op" => *op, "outcome" => *outcome, "source" => source)
                    .increment(0);
            }
        }
    }
    counter!(RECLAIMS).increment(0);
    counter!(ORPHAN_SWEEPS).increment(0);
    for outcome in ["answered", "forwarded", "refused"] {
        counter!(DNS_QUERIES, "outcome" => outcome).increment(0);
    }
    for outcome in ["ok", "busy", "failed"] {
        counter!(DNS_FORWARDS, "outcome" => outcome).increment(0);
    }
}

/// Who caused a store call: the label that splits store load by cause.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// A Docker plugin request.
    Docker,
    /// An operator's request through the plugin (`status`, `doctor`).
    Operator,
    /// A scrape of `/metrics` (pool and endpoint gauges).
    Scrape,
}

impl Source {
    fn label(self) -> &'static str {
        match self {
            Source::Docker => "docker",
            Source::Operator => "operator",
            Source::Scrape => "scrape",
        }
    }
}

struct Scope {
    source: Source,
    store_calls: Cell<u64>,
}

tokio::task_local! {
    static SCOPE: Scope;
}

/// Run `f` with its store calls attributed to `source`; returns the output
/// and how many store calls it made. Tasks that `f` spawns are not counted.
pub async fn scoped<F: Future>(source: Source, f: F) -> (F::Output, u64) {
    let scope = Scope {
        source,
        store_calls: Cell::new(0),
    };
    SCOPE
        .scope(scope, async {
            let out = f.await;
            (out, SCOPE.with(|s| s.store_calls.get()))
        })
        .await
}

/// One Docker request answered.
pub fn docker_request(method: &str, ok: bool, elapsed: Duration, store_calls: u64) {
    let outcome = if ok { "ok" } else { "error" };
    counter!(DOCKER_REQUESTS, "method" => method.to_string(), "outcome" => outcome).increment(1);
    histogram!(DOCKER_REQUEST_SECONDS, "method" => method.to_string())
        .record(elapsed.as_secs_f64());
    histogram!(DOCKER_REQUEST_STORE_CALLS, "method" => method.to_string())
        .record(store_calls as f64);
}

/// One store call finished.
fn store_call(op: &'static str, outcome: &'static str, elapsed: Duration) {
    let source = SCOPE
        .try_with(|s| {
            s.store_calls.set(s.store_calls.get() + 1);
            s.source.label()
        })
        .unwrap_or("background");
    counter!(STORE_CALLS, "op" => op, "outcome" => outcome, "source" => source).increment(1);
    histogram!(STORE_CALL_SECONDS, "op" => op).record(elapsed.as_secs_f64());
}

/// `kind`: `container`, `gateway` or `aux`.
pub fn allocation(pool: &str, kind: &'static str) {
    counter!(ALLOCATIONS, "pool" => pool.to_string(), "kind" => kind).increment(1);
}

pub fn release(pool: &str) {
    counter!(RELEASES, "pool" => pool.to_string()).increment(1);
}

pub fn pool_usage(pool: &str, used: u64, size: u128) {
    gauge!(POOL_USED, "pool" => pool.to_string()).set(used as f64);
    gauge!(POOL_SIZE, "pool" => pool.to_string()).set(size as f64);
}

pub fn endpoints(overlay: &str, local: u64, remote: u64) {
    gauge!(ENDPOINTS, "overlay" => overlay.to_string(), "location" => "local").set(local as f64);
    gauge!(ENDPOINTS, "overlay" => overlay.to_string(), "location" => "remote").set(remote as f64);
}

pub fn peer_sync_lag(lag: Duration) {
    histogram!(PEER_SYNC_LAG).record(lag.as_secs_f64());
}

/// A follower re-read `prefix` after its watch broke.
pub fn watch_resync(prefix: &str) {
    counter!(WATCH_RESYNCS, "prefix" => watched(prefix)).increment(1);
}

/// `ok`, `failed` (the store did not answer) or `expired` (the lease was gone).
pub fn lease_renewal(outcome: &'static str) {
    counter!(LEASE_RENEWALS, "outcome" => outcome).increment(1);
}

pub fn hosts_alive(n: usize) {
    gauge!(HOSTS_ALIVE).set(n as f64);
}

pub fn reclaim() {
    counter!(RECLAIMS).increment(1);
}

pub fn orphan_sweep() {
    counter!(ORPHAN_SWEEPS).increment(1);
}

/// `answered`, `forwarded` or `refused`.
pub fn dns_query(outcome: &'static str) {
    counter!(DNS_QUERIES, "outcome" => outcome).increment(1);
}

/// `ok`, `failed` or `busy`.
pub fn dns_forward(outcome: &'static str) {
    counter!(DNS_FORWARDS, "outcome" => outcome).increment(1);
}

/// A watched prefix as a bounded label: its first segment under the root
/// (`hosts`, `overlay`, `names`, `cluster`), never a per-network value.
fn watched(prefix: &str) -> String {
    let rest = prefix.split("/v1/").nth(1).unwrap_or(prefix);
    rest.split('/').next().unwrap_or("").to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn watched_prefixes_are_bounded_labels() {
        assert_eq!(watched("/rustoverlay/v1/hosts/"), "hosts");
        assert_eq!(
            watched("/rustoverlay/v1/overlay/10.77.0.0_24/ep/"),
            "overlay"
        );
        assert_eq!(watched("/rustoverlay/v1/names/10.77.0.0_24/"), "names");
    }

    #[tokio::test]
    async fn scoped_counts_the_store_calls_of_its_future_only() {
        let (_, n) = scoped(Source::Operator, async {
            store_call("get", "ok", Duration::ZERO);
            store_call("txn", "ok", Duration::ZERO);
        })
        .await;
        assert_eq!(n, 2);
        // Outside a scope a call counts as background and panics nowhere.
        store_call("get", "ok", Duration::ZERO);
    }
}
