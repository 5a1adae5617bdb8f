//! Reconciling this host's kernel with the store: at start, after a lost
//! lease, and for orphaned endpoints. The store is the truth; the kernel is
//! made to match it, never the other way round.
//!
//! The periodic orphan sweep reads the store again only after something it
//! reads changed ([`Reconciler::sweep_orphans_when_changed`]), so an idle
//! host's sweep reads nothing (the lease renewal tells the store's
//! revision), not every endpoint of its overlays.

use super::devices::Devices;
use crate::control::ipam::{pool_id, Ipam};
use crate::control::overlay::Overlays;
use crate::dataplane::names::short_id;
use crate::dataplane::Dataplane;
use crate::error::{PluginError, Result, StoreContext};
use crate::state::keys;
use crate::state::records::EndpointRecord;
use crate::telemetry;
use crate::util::backoff::Backoff;
use crate::util::clock::unix_now;
use kvstore_backends::{KvStore, Revision, WatchFidelity};
use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

pub struct Reconciler {
    host: String,
    overlays: Arc<Overlays>,
    ipam: Arc<Ipam>,
    devices: Arc<Devices>,
    /// What the last sweep that removed nothing read.
    swept: Mutex<Option<Swept>>,
}

/// Everything an orphan sweep's outcome depends on, but the clock.
#[derive(Debug, Clone, PartialEq, Eq)]
struct SweepInputs {
    /// The store's revision: every write anywhere in the store changes it.
    revision: Revision,
    min_age: Duration,
    /// Every VNI with devices on this host, with its bridge ports.
    kernel: Vec<(u32, Vec<String>)>,
}

/// A sweep that removed nothing: while its inputs stay the same, another
/// sweep would remove nothing either, until `next_due`.
#[derive(Debug)]
struct Swept {
    inputs: SweepInputs,
    /// When (Unix seconds, the sweep's own clock) the youngest endpoint of
    /// this host it saw becomes old enough to be an orphan.
    next_due: Option<u64>,
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
            swept: Mutex::new(None),
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
        Ok(self.sweep(min_age).await?.0)
    }

    /// [`Reconciler::sweep_orphans`], unless nothing it reads changed since
    /// the last sweep removed nothing: not the store (its revision), not
    /// this host's bridge ports, and no endpoint of this host came of age
    /// since. Then it would remove nothing again, and is skipped. The
    /// revision is `renewed`, what the lease renewal last reported, when it
    /// reported one: an idle host then sweeps without reading the store at
    /// all. Else it is read here with one small read. A renewal's revision
    /// predates this sweep's reads, so a write after them changes the next
    /// renewal's. On a store whose watches keep no history (Consul), whose
    /// reads give no store-wide revision, it always sweeps.
    pub async fn sweep_orphans_when_changed(
        &self,
        store: &dyn KvStore,
        min_age: Duration,
        renewed: Option<Revision>,
    ) -> Result<usize> {
        if store.watch_fidelity() != WatchFidelity::EveryChange {
            return self.sweep_orphans(min_age).await;
        }
        // Both read before the sweep reads anything: a change after them is
        // seen by the next call.
        let revision = match renewed {
            Some(revision) => revision,
            None => {
                store
                    .range(&keys::reaper())
                    .await
                    .ctx(|| "read the store's revision".into())?
                    .revision
            }
        };
        // Ports that cannot be listed now: sweep, and skip nothing next time.
        let inputs = self.kernel_ports().await.ok().map(|kernel| SweepInputs {
            revision,
            min_age,
            kernel,
        });
        let unchanged = self.swept().take().filter(|last| {
            inputs.as_ref() == Some(&last.inputs)
                && last.next_due.is_none_or(|due| unix_now() < due)
        });
        if let Some(last) = unchanged {
            *self.swept() = Some(last);
            return Ok(0);
        }
        let (removed, next_due) = self.sweep(min_age).await?;
        if let Some(inputs) = inputs.filter(|_| removed == 0) {
            *self.swept() = Some(Swept { inputs, next_due });
        }
        Ok(removed)
    }

    fn swept(&self) -> std::sync::MutexGuard<'_, Option<Swept>> {
        self.swept.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Every VNI with devices here and its bridge ports, in order.
    async fn kernel_ports(&self) -> Result<Vec<(u32, Vec<String>)>> {
        let dataplane = self.devices.dataplane();
        let mut vnis = dataplane.local_vnis();
        vnis.sort_unstable();
        let mut out = Vec::with_capacity(vnis.len());
        for vni in vnis {
            let mut ports = dataplane.endpoint_ports(vni).await?;
            ports.sort();
            out.push((vni, ports));
        }
        Ok(out)
    }

    /// The sweep: how many endpoints it removed, and when the youngest
    /// endpoint of this host it left alone comes of age.
    async fn sweep(&self, min_age: Duration) -> Result<(usize, Option<u64>)> {
        telemetry::orphan_sweep();
        let now = unix_now();
        let mut removed = 0;
        let mut next_due: Option<u64> = None;
        for net in self.overlays.local_networks().await? {
            let (eps, _) = self.overlays.endpoints(&net.overlay).await?;
            let (old, young): (Vec<EndpointRecord>, Vec<EndpointRecord>) = eps
                .into_iter()
                .filter(|e| e.host == self.host && e.network_id == net.network_id)
                .filter(|e| e.created_at > 0)
                .partition(|e| now.saturating_sub(e.created_at) >= min_age.as_secs());
            for e in young {
                let due = e.created_at.saturating_add(min_age.as_secs());
                next_due = Some(next_due.map_or(due, |d| d.min(due)));
            }
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
        Ok((removed, next_due))
    }
}
