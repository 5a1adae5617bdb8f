//! This host's devices per overlay follow its local endpoints: they exist,
//! with peer sync running, while the overlay has an endpoint on this host,
//! and go with the last one.
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
use std::sync::{Arc, Mutex};
use tokio::sync::OwnedMutexGuard;

pub struct Devices {
    host: String,
    overlays: Arc<Overlays>,
    dataplane: Arc<dyn Dataplane>,
    peers: PeerSync,
    /// The overlay's resolver, when names across hosts are on.
    names: Option<Arc<NameService>>,
    locks: Mutex<HashMap<u32, Arc<tokio::sync::Mutex<()>>>>,
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
        }
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
        self.peers.stop(vni);
        if let Some(names) = &self.names {
            names.stop(vni);
        }
        self.dataplane.remove_network(vni).await?;
        Ok(())
    }

    /// Remove the overlay's devices if it has no endpoint on this host any
    /// more (under its lock). True when they were removed.
    pub async fn remove_if_unused(
        &self,
        overlay: &str,
        vni: u32,
        lock: &DeviceLock,
    ) -> Result<bool> {
        let (eps, _) = self.overlays.endpoints(overlay).await?;
        if eps.iter().any(|e| e.host == self.host) {
            return Ok(false);
        }
        self.remove(vni, lock).await?;
        Ok(true)
    }
}
