//! This host's devices per overlay follow its local endpoints: they exist,
//! with peer sync running, while the overlay has an endpoint on this host,
//! and go `--linger` after the last one left (at once when the network is
//! removed, or with `--linger 0`). The linger spares a container that comes
//! soon after the last one the cost of building the namespace, bridge and
//! VXLAN device and of learning every peer again; a new local endpoint
//! cancels it.
//!
//! Set-up and tear-down of one overlay's devices are serialized on this host
//! by a per-VNI lock, so a Join never races the removal of the last other
//! endpoint's devices, nor start-up reconciliation. The lock guards only the
//! kernel: store state is never guarded by it.

use super::names::NameService;
use super::peers::PeerSync;
use crate::control::overlay::Overlays;
use crate::dataplane::Dataplane;
use crate::error::Result;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;
use tokio::sync::OwnedMutexGuard;

pub struct Devices {
    host: String,
    overlays: Arc<Overlays>,
    dataplane: Arc<dyn Dataplane>,
    peers: PeerSync,
    /// The overlay's resolver, when names across hosts are on.
    names: Option<Arc<NameService>>,
    locks: Mutex<HashMap<u32, Arc<tokio::sync::Mutex<()>>>>,
    /// How long devices outlive the overlay's last local endpoint.
    linger: Duration,
    /// Overlays whose devices wait out their linger: VNI -> that wait's
    /// ticket. A Join or a removal takes the entry away, and a wait whose
    /// ticket is gone does nothing when it ends; so after a container came
    /// and went, only the wait of its departure removes.
    lingering: Mutex<HashMap<u32, u64>>,
    tickets: AtomicU64,
}

/// Held while an overlay's devices are changed.
pub type DeviceLock = OwnedMutexGuard<()>;

impl Devices {
    pub fn new(
        host: String,
        overlays: Arc<Overlays>,
        dataplane: Arc<dyn Dataplane>,
        peers: PeerSync,
    ) -> Self {
        Devices {
            host,
            overlays,
            dataplane,
            peers,
            names: None,
            locks: Mutex::new(HashMap::new()),
            linger: Duration::ZERO,
            lingering: Mutex::new(HashMap::new()),
            tickets: AtomicU64::new(0),
        }
    }

    /// Keep devices `linger` after the overlay's last local endpoint left.
    pub fn with_linger(mut self, linger: Duration) -> Self {
        self.linger = linger;
        self
    }

    /// VNIs whose devices have no local endpoint and wait out the linger.
    pub fn lingering(&self) -> Vec<u32> {
        let mut vnis: Vec<u32> = self.waits().keys().copied().collect();
        vnis.sort_unstable();
        vnis
    }

    fn waits(&self) -> std::sync::MutexGuard<'_, HashMap<u32, u64>> {
        self.lingering.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Serve names on every overlay whose devices exist here.
    pub fn with_names(mut self, names: Arc<NameService>) -> Self {
        self.names = Some(names);
        self
    }

    pub fn dataplane(&self) -> &dyn Dataplane {
        self.dataplane.as_ref()
    }

    /// Take the overlay's device lock.
    pub async fn lock(&self, vni: u32) -> DeviceLock {
        let lock = self
            .locks
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(vni)
            .or_default()
            .clone();
        lock.lock_owned().await
    }

    /// The overlay's devices exist and its peers are synced (under its lock).
    /// True when this call built the devices, so a caller whose later step
    /// fails knows to remove them again.
    pub async fn ensure(&self, overlay: &str, vni: u32, _lock: &DeviceLock) -> Result<bool> {
        self.waits().remove(&vni);
        let built = !self.dataplane.has_network(vni);
        self.dataplane.ensure_network(vni).await?;
        self.peers.ensure(overlay, vni);
        if let Some(names) = &self.names {
            names.ensure(overlay, vni);
        }
        Ok(built)
    }

    /// Keep peer sync running for devices that already exist (start-up).
    pub fn resume(&self, overlay: &str, vni: u32) {
        self.peers.ensure(overlay, vni);
        if let Some(names) = &self.names {
            names.ensure(overlay, vni);
        }
    }

    /// Stop the overlay's peer sync and remove its devices (under its lock).
    pub async fn remove(&self, vni: u32, _lock: &DeviceLock) -> Result<()> {
        self.waits().remove(&vni);
        self.peers.stop(vni);
        if let Some(names) = &self.names {
            names.stop(vni);
        }
        self.dataplane.remove_network(vni).await?;
        Ok(())
    }

    /// The overlay's last local endpoint may have gone (under its lock):
    /// if so, remove its devices, at once without a linger, else when the
    /// linger is over. True when they were removed now.
    pub async fn remove_if_unused(
        self: &Arc<Self>,
        overlay: &str,
        vni: u32,
        lock: &DeviceLock,
    ) -> Result<bool> {
        let (eps, _) = self.overlays.endpoints(overlay).await?;
        if eps.iter().any(|e| e.host == self.host) {
            return Ok(false);
        }
        if self.linger.is_zero() {
            self.remove(vni, lock).await?;
            return Ok(true);
        }
        self.remove_after_linger(overlay, vni);
        Ok(false)
    }

    fn remove_after_linger(self: &Arc<Self>, overlay: &str, vni: u32) {
        let ticket = self.tickets.fetch_add(1, Ordering::Relaxed);
        // A wait under way goes on: the orphan sweep asks again every few
        // seconds, and must not put the end off.
        match self.waits().entry(vni) {
            std::collections::hash_map::Entry::Occupied(_) => return,
            std::collections::hash_map::Entry::Vacant(slot) => {
                slot.insert(ticket);
            }
        }
        tracing::debug!(vni, linger = ?self.linger, "no local endpoint left: devices linger");
        let devices: Weak<Self> = Arc::downgrade(self);
        let (overlay, linger) = (overlay.to_string(), self.linger);
        tokio::spawn(async move {
            tokio::time::sleep(linger).await;
            // Gone with the plugin: start-up reconciliation removes them.
            let Some(devices) = devices.upgrade() else {
                return;
            };
            let lock = devices.lock(vni).await;
            if devices.waits().get(&vni) != Some(&ticket) {
                return;
            }
            // Ask the store, not memory: another path (reconciliation, a
            // Join that failed after its record) may have changed things.
            match devices.overlays.endpoints(&overlay).await {
                Ok((eps, _)) if eps.iter().any(|e| e.host == devices.host) => {
                    devices.waits().remove(&vni);
                }
                Ok(_) => match devices.remove(vni, &lock).await {
                    Ok(()) => tracing::info!(
                        vni,
                        "removed the devices of a network without local endpoints"
                    ),
                    Err(e) => {
                        tracing::warn!(vni, error = %e, "could not remove lingering devices; the orphan sweep tries again")
                    }
                },
                Err(e) => {
                    tracing::warn!(vni, error = %e, "store unreadable at the end of the linger; waiting once more");
                    devices.waits().remove(&vni);
                    drop(lock);
                    devices.remove_after_linger(&overlay, vni);
                }
            }
        });
    }
}
