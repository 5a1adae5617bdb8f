//! Host registration: each plugin announces its host (ID, VTEP) under a lease
//! that it keeps alive. Peers read VTEPs here, and a host whose lease expired
//! is known to be gone.

use crate::keys;
use kvstore_backends::{KvStore, LeaseId, Op, StoreError, Txn};
use serde::{Deserialize, Serialize};
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;
use tracing::Instrument;

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct HostRecord {
    pub host: String,
    pub vtep: IpAddr,
    pub version: String,
}

pub struct Registration {
    store: Arc<dyn KvStore>,
    record: HostRecord,
    ttl: Duration,
}

impl Registration {
    pub fn new(store: Arc<dyn KvStore>, host: String, vtep: IpAddr, ttl: Duration) -> Self {
        Registration {
            store,
            record: HostRecord {
                host,
                vtep,
                version: env!("CARGO_PKG_VERSION").to_string(),
            },
            ttl,
        }
    }

    /// Write the registration under a fresh lease.
    pub async fn register(&self) -> Result<LeaseId, StoreError> {
        let lease = self.store.grant_lease(self.ttl).await?;
        let value = serde_json::to_vec(&self.record).expect("plain data always serializes");
        self.store
            .txn(Txn::new().and_then(vec![Op::put_with_lease(
                keys::host_registration(&self.record.host),
                value,
                lease.clone(),
            )]))
            .await?;
        tracing::info!(host = %self.record.host, vtep = %self.record.vtep, lease = %lease, "host registered");
        Ok(lease)
    }

    /// Register, then renew at a third of the TTL forever. When the lease was
    /// lost (cut off from the store longer than the TTL), stop answering
    /// Docker, register again and reconcile before answering again: other
    /// hosts may have reclaimed what this host held.
    pub async fn run(self, driver: Arc<crate::driver::Driver>) {
        let mut lease: Option<LeaseId> = None;
        let mut lost = false;
        let tick = self.ttl / 3;
        loop {
            match &lease {
                None => match self.register().await {
                    Ok(l) => {
                        lease = Some(l);
                        if lost {
                            match driver.recover().await {
                                Ok(()) => {
                                    lost = false;
                                    driver.set_ready(true);
                                    tracing::info!(
                                        "reconciled after the lease loss; serving again"
                                    );
                                }
                                Err(e) => {
                                    tracing::warn!(error = %e, "reconciliation after the lease loss failed; retrying");
                                    lease = None;
                                }
                            }
                        }
                    }
                    Err(e) => tracing::warn!(error = %e, "host registration failed; retrying"),
                },
                Some(l) => match self.store.keep_alive(l.clone()).await {
                    Ok(()) => {}
                    Err(StoreError::LeaseNotFound(_)) => {
                        tracing::warn!("host lease expired; refusing Docker until re-registered and reconciled");
                        driver.set_ready(false);
                        lost = true;
                        lease = None;
                        continue;
                    }
                    Err(e) => tracing::warn!(error = %e, "host lease renewal failed; retrying"),
                },
            }
            tokio::time::sleep(tick).await;
        }
    }
}

/// Which hosts are registered now, kept current by watching the
/// registrations. `None` until the first read succeeded: until then nobody
/// is treated as gone.
pub type LiveSet = Option<Arc<std::collections::HashSet<String>>>;

/// Watch the registrations and publish the live set on a channel.
pub fn watch_live_hosts(store: Arc<dyn KvStore>) -> tokio::sync::watch::Receiver<LiveSet> {
    let (tx, rx) = tokio::sync::watch::channel(None);
    let span = tracing::info_span!(parent: None, "live_hosts");
    tokio::spawn(
        async move {
            use futures::StreamExt;
            let prefix = keys::hosts();
            loop {
                let resp = match store.range(&prefix).await {
                    Ok(r) => r,
                    Err(e) => {
                        tracing::warn!(error = %e, "could not read host registrations; retrying");
                        tokio::time::sleep(Duration::from_secs(1)).await;
                        continue;
                    }
                };
                let mut live: std::collections::HashSet<String> = resp
                    .kvs
                    .iter()
                    .map(|kv| kv.key.trim_start_matches(&prefix).to_string())
                    .collect();
                tx.send_replace(Some(Arc::new(live.clone())));
                let mut stream = match store.watch(&prefix, resp.revision + 1).await {
                    Ok(s) => s,
                    Err(e) => {
                        tracing::warn!(error = %e, "could not watch host registrations; retrying");
                        tokio::time::sleep(Duration::from_secs(1)).await;
                        continue;
                    }
                };
                while let Some(Ok(ev)) = stream.next().await {
                    let host = ev.kv.key.trim_start_matches(&prefix).to_string();
                    let changed = match ev.kind {
                        kvstore_backends::EventKind::Put => live.insert(host.clone()),
                        kvstore_backends::EventKind::Delete => live.remove(&host),
                    };
                    if changed {
                        tracing::info!(host = %host, alive = matches!(ev.kind, kvstore_backends::EventKind::Put), "host liveness changed");
                        tx.send_replace(Some(Arc::new(live.clone())));
                    }
                }
                // The watch ended (store outage, compaction): read again.
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
        .instrument(span),
    );
    rx
}
