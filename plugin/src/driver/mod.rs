//! Docker's NetworkDriver on this host: each call turned into store records
//! (through `control`) and kernel devices (through `sync::devices` and the
//! `dataplane` trait). Each method validates first, then applies, and undoes
//! what it applied when a later step fails. Requests come in as plain domain
//! values: the wire format is `api`'s business.

mod endpoint;
mod network;

pub use endpoint::{EndpointInfo, EndpointSpec};
pub use network::{NetworkSpec, PoolSpec};

use crate::control::cluster::Clusters;
use crate::control::ipam::Ipam;
use crate::control::overlay::Overlays;
use crate::error::{PluginError, Result};
use crate::state::records::{EndpointRecord, LocalNetwork};
use crate::sync::devices::Devices;
use std::sync::Arc;

/// The one command that makes a network every host can share.
pub const CREATE_HINT: &str =
    "docker network create -d rustoverlay --ipam-driver rustoverlay --subnet 10.77.0.0/24 NAME";

pub struct Driver {
    host: String,
    ipam: Arc<Ipam>,
    overlays: Arc<Overlays>,
    devices: Arc<Devices>,
    /// The resolver's address, when names across hosts are on: Join routes
    /// it into each container's namespace.
    dns: Option<std::net::Ipv4Addr>,
    /// Container namespaces (SandboxKey) given the resolver's route at a
    /// Join while their namespace did not exist yet, and the endpoint that
    /// carries it.
    dns_routes: std::sync::Mutex<std::collections::HashMap<String, String>>,
    /// Networks defined once for every host, when the cluster sync runs.
    cluster: Option<ClusterHooks>,
}

/// What the driver shares with the cluster sync (`sync::cluster`).
#[derive(Clone)]
pub struct ClusterHooks {
    pub clusters: Arc<Clusters>,
    /// Wakes the cluster sync: a copy was removed, or should be made again.
    pub changed: Arc<tokio::sync::Notify>,
}

impl Driver {
    pub fn new(
        host: String,
        ipam: Arc<Ipam>,
        overlays: Arc<Overlays>,
        devices: Arc<Devices>,
    ) -> Self {
        Driver {
            host,
            ipam,
            overlays,
            devices,
            dns: None,
            dns_routes: Default::default(),
            cluster: None,
        }
    }

    /// Take networks defined once (`-o cluster=true`).
    pub fn with_cluster(mut self, hooks: ClusterHooks) -> Self {
        self.cluster = Some(hooks);
        self
    }

    /// Route the resolver's address into every joining container.
    pub fn with_dns(mut self, address: std::net::Ipv4Addr) -> Self {
        self.dns = Some(address);
        self
    }

    /// This host's endpoint, or an error that says why it is not.
    async fn known_endpoint(
        &self,
        network_id: &str,
        endpoint_id: &str,
    ) -> Result<(LocalNetwork, EndpointRecord)> {
        let net = self.overlays.lookup(network_id).await?;
        let (ep, _) = self
            .overlays
            .get_endpoint(&net, endpoint_id)
            .await?
            .ok_or_else(|| {
                PluginError::Unknown(format!(
                    "endpoint {endpoint_id} does not exist on network {network_id}; remove the \
                     container and start it again"
                ))
            })?;
        if ep.host != self.host {
            return Err(PluginError::Conflict(format!(
                "endpoint {endpoint_id} belongs to host {}, not to this host ({})",
                ep.host, self.host
            )));
        }
        Ok((net, ep))
    }

    /// The overlay's devices go with its last local endpoint (after the
    /// linger). Best effort: a failure is logged and retried by the next
    /// removal or the orphan sweep.
    async fn remove_devices_if_unused(
        &self,
        net: &LocalNetwork,
        lock: &crate::sync::devices::DeviceLock,
    ) {
        if let Err(e) = self
            .devices
            .remove_if_unused(&net.overlay, net.vni, lock)
            .await
        {
            tracing::warn!(vni = net.vni, error = %e, "could not remove the network's devices");
        }
    }
}
