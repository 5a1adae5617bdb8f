//! The reaper: every period, sweep this host's orphaned endpoints, notice
//! hosts that hold state but are not registered, and reclaim each once it
//! has been gone for the grace period without a break. What reclaiming
//! writes, and its fence, is `control::reclaim`.

use super::readiness::Readiness;
use super::reconcile::Reconciler;
use crate::control::reclaim::{census, reclaim_host};
use kvstore_backends::KvStore;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

#[derive(Debug, Clone)]
pub struct ReaperConfig {
    pub period: Duration,
    pub grace: Duration,
    pub orphan_age: Duration,
}

pub async fn run(
    store: Arc<dyn KvStore>,
    me: String,
    ready: Readiness,
    reconciler: Arc<Reconciler>,
    config: ReaperConfig,
) {
    let mut gone_since: HashMap<String, Instant> = HashMap::new();
    loop {
        tokio::time::sleep(config.period).await;
        if ready.is_ready() {
            if let Err(e) = reconciler.sweep_orphans(config.orphan_age).await {
                tracing::warn!(error = %e, "orphaned-endpoint sweep failed");
            }
        }
        let census = match census(store.as_ref()).await {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(error = %e, "reaper could not read the store");
                continue;
            }
        };
        gone_since.retain(|h, _| !census.registered.contains(h));
        for (host, held) in &census.holdings {
            if *host == me || census.registered.contains(host) || held.is_empty() {
                continue;
            }
            let since = *gone_since.entry(host.clone()).or_insert_with(|| {
                tracing::warn!(host = %host, grace = ?config.grace, "host is gone; reclaiming after the grace period");
                Instant::now()
            });
            if since.elapsed() < config.grace {
                continue;
            }
            match reclaim_host(store.clone(), host, held).await {
                Ok(()) => {
                    gone_since.remove(host);
                }
                Err(e) => tracing::warn!(host = %host, error = %e, "reclaim stopped"),
            }
        }
    }
}
