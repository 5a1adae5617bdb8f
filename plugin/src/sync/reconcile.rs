//! Reconciling this host's kernel with the store: at start, after a lost
//! lease, and for orphaned endpoints. The store is the truth; the kernel is
//! made to match it, never the other way round.

use super::devices::Devices;
use crate::control::ipam::{pool_id, Ipam};
use crate::control::overlay::Overlays;
use crate::dataplane::names::short_id;
use crate::dataplane::Dataplane;
use crate::error::{PluginError, Result};
use crate::state::records::EndpointRecord;
use crate::util::backoff::Backoff;
use crate::util::clock::unix_now;
use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

pub struct Reconciler {
    host: String,
    overlays: Arc<Overlays>,
    ipam: Arc<Ipam>,
    devices: Arc<Devices>,
}

impl Reconciler {
    pub fn new(
        host: String,
        overlays: Arc<Overlays>,
        ipam: Arc<Ipam>,
        devices: Arc<Devices>,
    ) -> Self {
        Reconciler {
            host,
            overlays,
            ipam,
            devices,
        }
    }

    /// This host's data plane (the reaper probes gone hosts through it).
    pub fn dataplane(&self) -> &dyn Dataplane {
        self.devices.dataplane()
    }

    /// Bring the kernel in line with the store: resume peer sync for
    /// overlays with local endpoints and devices, remove ports of endpoints
    /// this host no longer owns, and remove devices of overlays that have no
    /// local endpoint any more.
    #[tracing::instrument(skip_all, fields(host = %self.host))]
    pub async fn recover(&self) -> Result<()> {
        // Cached network mappings may name networks reclaimed meanwhile.
        self.overlays.forget_all();
        let mut wanted = HashMap::new();
        for net in self.overlays.local_networks().await? {
            let (eps, _) = self.overlays.endpoints(&net.overlay).await?;
            if eps.iter().any(|e| e.host == self.host) {
                wanted.insert(net.vni, net.overlay.clone());
            }
        }
        for vni in self.devices.dataplane().local_vnis() {
            match wanted.get(&vni) {
                Some(overlay) => {
                    self.remove_stale_ports(vni, overlay).await?;
                    self.devices.resume(overlay, vni);
                }
                None => {
                    // Re-check under the overlay's lock: a Join may be adding
                    // the first endpoint right now.
                    let lock = self.devices.lock(vni).await;
                    if !self.has_local_endpoint(vni).await? {
                        tracing::info!(vni, "removing devices of a network with no local endpoint");
                        self.devices.remove(vni, &lock).await?;
                    }
                }
            }
        }
        Ok(())
    }

    /// [`Reconciler::recover`] until it succeeds (the store may be down at
    /// start).
    pub async fn recover_until_done(&self) {
        let mut backoff = Backoff::new(Duration::from_millis(500), Duration::from_secs(10));
        while let Err(e) = self.recover().await {
            tracing::warn!(error = %e, retry_in = ?backoff.peek(), "start-up reconciliation failed");
            backoff.wait().await;
        }
    }

    /// Remove bridge ports of endpoints the store no longer holds for this
    /// host (reclaimed while this host was cut off): their addresses may
    /// belong to someone else now.
    async fn remove_stale_ports(&self, vni: u32, overlay: &str) -> Result<()> {
        let (eps, _) = self.overlays.endpoints(overlay).await?;
        let mine: HashSet<String> = eps
            .iter()
            .filter(|e| e.host == self.host)
            .map(|e| short_id(&e.endpoint_id).to_string())
            .collect();
        let _lock = self.devices.lock(vni).await;
        let dataplane = self.devices.dataplane();
        for port in dataplane.endpoint_ports(vni).await? {
            if !mine.contains(&port) {
                tracing::warn!(vni, endpoint = %port, "removing an endpoint this host no longer owns");
                dataplane.remove_endpoint_link(vni, &port).await?;
            }
        }
        Ok(())
    }

    async fn has_local_endpoint(&self, vni: u32) -> Result<bool> {
        for net in self.overlays.local_networks().await? {
            if net.vni == vni {
                let (eps, _) = self.overlays.endpoints(&net.overlay).await?;
                if eps.iter().any(|e| e.host == self.host) {
                    return Ok(true);
                }
            }
        }
        Ok(false)
    }

    /// Remove this host's endpoints that have had no bridge port for longer
    /// than `min_age` since their creation: Docker removed their containers
    /// while the store was unreachable and will not ask again. Their
    /// addresses are freed. Young endpoints are left alone: Docker joins an
    /// endpoint right after creating it.
    pub async fn sweep_orphans(&self, min_age: Duration) -> Result<usize> {
        let now = unix_now();
        let mut removed = 0;
        for net in self.overlays.local_networks().await? {
            let (eps, _) = self.overlays.endpoints(&net.overlay).await?;
            let old: Vec<EndpointRecord> = eps
                .into_iter()
                .filter(|e| e.host == self.host && e.network_id == net.network_id)
                .filter(|e| {
                    e.created_at > 0 && now.saturating_sub(e.created_at) >= min_age.as_secs()
                })
                .collect();
            if old.is_empty() {
                continue;
            }
            let lock = self.devices.lock(net.vni).await;
            let dataplane = self.devices.dataplane();
            let ports: HashSet<String> = if dataplane.has_network(net.vni) {
                dataplane
                    .endpoint_ports(net.vni)
                    .await?
                    .into_iter()
                    .collect()
            } else {
                Default::default()
            };
            for ep in old {
                if ports.contains(short_id(&ep.endpoint_id)) {
                    continue;
                }
                tracing::warn!(endpoint = %ep.endpoint_id, network = %net.network_id, "removing an orphaned endpoint (no bridge port) and freeing its addresses");
                self.overlays.delete_endpoint(&net, &ep.endpoint_id).await?;
                for addr in [ep.ipv4, ep.ipv6].into_iter().flatten() {
                    let pool = net
                        .subnets
                        .iter()
                        .find(|s| s.contains(addr.ip()))
                        .map(pool_id)
                        .unwrap_or_default();
                    match self.ipam.release_address(&pool, addr.ip()).await {
                        Ok(()) | Err(PluginError::Unknown(_)) => {}
                        Err(e) => return Err(e),
                    }
                }
                removed += 1;
            }
            if self.devices.dataplane().has_network(net.vni) {
                self.devices
                    .remove_if_unused(&net.overlay, net.vni, &lock)
                    .await?;
            }
        }
        Ok(removed)
    }
}
