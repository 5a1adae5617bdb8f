//! The NetworkDriver: Docker's calls turned into store records and kernel
//! devices. Each method validates first, then applies, and undoes what it
//! applied when a later step fails.

use crate::dataplane::{format_mac, parse_mac, Dataplane};
use crate::error::{PluginError, Result};
use crate::ipam::{self, Ipam, GLOBAL_ADDRESS_SPACE, LOCAL_ADDRESS_SPACE};
use crate::overlay::{mac_for, EndpointRecord, LocalNetwork, Overlays};
use crate::peers::PeerSync;
use crate::protocol::{
    CreateEndpointRequest, CreateNetworkRequest, EndpointInterface, IpamData, JoinRequest,
};
use ipnetwork::IpNetwork;
use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};

pub struct Driver {
    pub ipam: Ipam,
    pub overlays: Overlays,
    pub dataplane: Arc<Dataplane>,
    pub peers: PeerSync,
    host: String,
    /// Serializes device set-up and tear-down per overlay on this host, so a
    /// Join never races the removal of the last other endpoint's devices.
    /// Store state is never guarded by it.
    overlay_locks: Mutex<HashMap<u32, Arc<tokio::sync::Mutex<()>>>>,
    /// False while this host re-registers after losing its lease: it must
    /// not act on ownership it may have lost until it has reconciled.
    ready: std::sync::atomic::AtomicBool,
}

/// The one command that makes a network every host can share.
const CREATE_HINT: &str =
    "docker network create -d rustoverlay --ipam-driver rustoverlay --subnet 10.77.0.0/24 NAME";

impl Driver {
    pub fn new(
        ipam: Ipam,
        overlays: Overlays,
        dataplane: Arc<Dataplane>,
        peers: PeerSync,
        host: String,
    ) -> Self {
        Driver {
            ipam,
            overlays,
            dataplane,
            peers,
            host,
            overlay_locks: Mutex::new(HashMap::new()),
            ready: std::sync::atomic::AtomicBool::new(true),
        }
    }

    pub fn is_ready(&self) -> bool {
        self.ready.load(std::sync::atomic::Ordering::Acquire)
    }

    pub fn set_ready(&self, ready: bool) {
        self.ready
            .store(ready, std::sync::atomic::Ordering::Release);
    }

    pub fn host(&self) -> &str {
        &self.host
    }

    fn overlay_lock(&self, vni: u32) -> Arc<tokio::sync::Mutex<()>> {
        self.overlay_locks
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(vni)
            .or_default()
            .clone()
    }

    #[tracing::instrument(skip_all, fields(network = %req.network_id))]
    pub async fn create_network(&self, req: CreateNetworkRequest) -> Result<()> {
        require("NetworkID", &req.network_id)?;
        let v4 = pools_of(
            &req.network_id,
            req.ipv4_data.as_deref().unwrap_or_default(),
        )?;
        let v6 = pools_of(
            &req.network_id,
            req.ipv6_data.as_deref().unwrap_or_default(),
        )?;
        if v4.len() > 1 || v6.len() > 1 {
            return Err(PluginError::BadRequest(
                "rustoverlay networks take one subnet per address family; give at most one IPv4 \
                 and one IPv6 --subnet"
                    .into(),
            ));
        }
        let pools: Vec<&ParsedPool> = v4.iter().chain(v6.iter()).collect();
        if pools.is_empty() {
            return Err(PluginError::BadRequest(format!(
                "network {} has no subnet; create it with {CREATE_HINT}",
                req.network_id
            )));
        }
        for p in &pools {
            // The pool must have been claimed through our IPAM.
            let seg = crate::keys::subnet_segment(&p.subnet);
            if self.ipam.read_pool(&seg).await?.is_none() {
                return Err(PluginError::Unknown(format!(
                    "subnet {} is not claimed in the rustoverlay store; create the network with {CREATE_HINT}",
                    p.subnet
                )));
            }
        }
        let subnets = pools.iter().map(|p| p.subnet).collect();
        let net = self
            .overlays
            .create_network(&req.network_id, subnets)
            .await?;
        for p in &pools {
            if let Err(e) = self.ipam.mark_aux(&ipam::pool_id(&p.subnet), &p.aux).await {
                // Undo: Docker does not call DeleteNetwork after a failed create.
                let _ = self.overlays.delete_network(&net.network_id).await;
                return Err(e);
            }
        }
        Ok(())
    }

    #[tracing::instrument(skip_all, fields(network = %network_id))]
    pub async fn delete_network(&self, network_id: &str) -> Result<()> {
        require("NetworkID", network_id)?;
        let Some(net) = self.overlays.delete_network(network_id).await? else {
            return Ok(());
        };
        // Devices only exist while a local endpoint does; clear leftovers.
        let lock = self.overlay_lock(net.vni);
        let _guard = lock.lock().await;
        let still_used = self
            .overlays
            .local_networks()
            .await?
            .iter()
            .any(|n| n.vni == net.vni);
        if !still_used {
            self.peers.stop(&net.overlay);
            self.dataplane.remove_network(net.vni).await?;
        }
        Ok(())
    }

    #[tracing::instrument(skip_all, fields(network = %req.network_id, endpoint = %req.endpoint_id))]
    pub async fn create_endpoint(
        &self,
        req: CreateEndpointRequest,
    ) -> Result<Option<EndpointInterface>> {
        require("NetworkID", &req.network_id)?;
        require("EndpointID", &req.endpoint_id)?;
        let net = self.overlays.lookup(&req.network_id).await?;
        let iface = req.interface.unwrap_or_default();
        let ipv4 = parse_address("Address", &iface.address, &net)?;
        let ipv6 = parse_address("AddressIPv6", &iface.address_ipv6, &net)?;
        if ipv4.is_none() && ipv6.is_none() {
            return Err(PluginError::BadRequest(format!(
                "endpoint {} has no address; rustoverlay endpoints get theirs from rustoverlay IPAM",
                req.endpoint_id
            )));
        }
        let mac = match iface.mac_address.trim() {
            "" => mac_for(ipv4.map(|a| a.ip())),
            s => parse_mac(s).ok_or_else(|| {
                PluginError::BadRequest(format!("MacAddress {s:?} is not a MAC address"))
            })?,
        };
        let record = EndpointRecord {
            endpoint_id: req.endpoint_id.clone(),
            network_id: req.network_id.clone(),
            host: self.host.clone(),
            vtep: IpAddr::V4(self.dataplane.underlay().vtep),
            mac: format_mac(&mac),
            ipv4,
            ipv6,
            created_at: crate::reclaim::unix_now(),
        };
        self.overlays.create_endpoint(&net, &record).await?;
        tracing::info!(ip = ?ipv4, mac = %record.mac, "endpoint created");
        // Tell Docker only what it left empty.
        Ok(iface
            .mac_address
            .trim()
            .is_empty()
            .then(|| EndpointInterface {
                mac_address: record.mac,
                ..Default::default()
            }))
    }

    pub async fn endpoint_info(
        &self,
        network_id: &str,
        endpoint_id: &str,
    ) -> Result<serde_json::Map<String, serde_json::Value>> {
        let (net, ep) = self.known_endpoint(network_id, endpoint_id).await?;
        let mut value = serde_json::Map::new();
        value.insert("vni".into(), net.vni.into());
        value.insert("host".into(), ep.host.into());
        value.insert("vtep".into(), ep.vtep.to_string().into());
        value.insert("mac".into(), ep.mac.into());
        Ok(value)
    }

    async fn known_endpoint(
        &self,
        network_id: &str,
        endpoint_id: &str,
    ) -> Result<(LocalNetwork, EndpointRecord)> {
        require("NetworkID", network_id)?;
        require("EndpointID", endpoint_id)?;
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

    #[tracing::instrument(skip_all, fields(network = %req.network_id, endpoint = %req.endpoint_id))]
    pub async fn join(&self, req: &JoinRequest) -> Result<String> {
        let (net, ep) = self
            .known_endpoint(&req.network_id, &req.endpoint_id)
            .await?;
        let mac = parse_mac(&ep.mac)
            .ok_or_else(|| PluginError::Internal(format!("stored MAC {:?} is invalid", ep.mac)))?;
        let lock = self.overlay_lock(net.vni);
        let _guard = lock.lock().await;
        self.dataplane.ensure_network(net.vni).await?;
        self.peers.ensure(&net.overlay, net.vni);
        match self
            .dataplane
            .create_endpoint_link(net.vni, &ep.endpoint_id, mac)
            .await
        {
            Ok(name) => Ok(name),
            Err(e) => {
                self.remove_devices_if_unused(&net).await;
                Err(e.into())
            }
        }
    }

    #[tracing::instrument(skip_all, fields(network = %network_id, endpoint = %endpoint_id))]
    pub async fn leave(&self, network_id: &str, endpoint_id: &str) -> Result<()> {
        let (net, ep) = self.known_endpoint(network_id, endpoint_id).await?;
        let lock = self.overlay_lock(net.vni);
        let _guard = lock.lock().await;
        self.dataplane
            .remove_endpoint_link(net.vni, &ep.endpoint_id)
            .await?;
        Ok(())
    }

    #[tracing::instrument(skip_all, fields(network = %network_id, endpoint = %endpoint_id))]
    pub async fn delete_endpoint(&self, network_id: &str, endpoint_id: &str) -> Result<()> {
        require("NetworkID", network_id)?;
        require("EndpointID", endpoint_id)?;
        let net = match self.overlays.lookup(network_id).await {
            Ok(net) => net,
            // Already gone with its network: nothing left to delete.
            Err(PluginError::Unknown(_)) => return Ok(()),
            Err(e) => return Err(e),
        };
        if let Some((ep, _)) = self.overlays.get_endpoint(&net, endpoint_id).await? {
            if ep.host != self.host {
                return Err(PluginError::Conflict(format!(
                    "endpoint {endpoint_id} belongs to host {}, not to this host",
                    ep.host
                )));
            }
        }
        let lock = self.overlay_lock(net.vni);
        let _guard = lock.lock().await;
        self.dataplane
            .remove_endpoint_link(net.vni, endpoint_id)
            .await?;
        self.overlays.delete_endpoint(&net, endpoint_id).await?;
        self.remove_devices_if_unused(&net).await;
        Ok(())
    }

    /// The overlay's devices go with its last local endpoint. Best effort: a
    /// failure is logged and retried by the next removal.
    async fn remove_devices_if_unused(&self, net: &LocalNetwork) {
        let result = async {
            let (eps, _) = self.overlays.endpoints(&net.overlay).await?;
            if !eps.iter().any(|e| e.host == self.host) {
                self.peers.stop(&net.overlay);
                self.dataplane.remove_network(net.vni).await?;
            }
            Ok::<_, PluginError>(())
        }
        .await;
        if let Err(e) = result {
            tracing::warn!(vni = net.vni, error = %e, "could not remove the network's devices");
        }
    }
}

impl Driver {
    /// Bring the kernel in line with the store after a start: resume peer
    /// sync for overlays with local endpoints and devices, and remove devices
    /// of overlays that have no local endpoint any more.
    #[tracing::instrument(skip_all, fields(host = %self.host))]
    pub async fn recover(&self) -> Result<()> {
        let mut wanted = HashMap::new();
        for net in self.overlays.local_networks().await? {
            let (eps, _) = self.overlays.endpoints(&net.overlay).await?;
            if eps.iter().any(|e| e.host == self.host) {
                wanted.insert(net.vni, net.overlay.clone());
            }
        }
        for vni in self.dataplane.local_vnis() {
            match wanted.get(&vni) {
                Some(overlay) => {
                    self.remove_stale_ports(vni, overlay).await?;
                    self.peers.ensure(overlay, vni)
                }
                None => {
                    // Re-check under the overlay's lock: a Join may be adding
                    // the first endpoint right now.
                    let lock = self.overlay_lock(vni);
                    let _guard = lock.lock().await;
                    if !self.has_local_endpoint(vni).await? {
                        tracing::info!(vni, "removing devices of a network with no local endpoint");
                        self.dataplane.remove_network(vni).await?;
                    }
                }
            }
        }
        Ok(())
    }

    /// Remove bridge ports of endpoints the store no longer holds for this
    /// host (reclaimed while this host was cut off): their addresses may
    /// belong to someone else now.
    async fn remove_stale_ports(&self, vni: u32, overlay: &str) -> Result<()> {
        let (eps, _) = self.overlays.endpoints(overlay).await?;
        let mine: std::collections::HashSet<String> = eps
            .iter()
            .filter(|e| e.host == self.host)
            .map(|e| crate::dataplane::short_id(&e.endpoint_id).to_string())
            .collect();
        let lock = self.overlay_lock(vni);
        let _guard = lock.lock().await;
        for port in self.dataplane.endpoint_ports(vni).await? {
            if !mine.contains(&port) {
                tracing::warn!(vni, endpoint = %port, "removing an endpoint this host no longer owns");
                self.dataplane.remove_endpoint_link(vni, &port).await?;
            }
        }
        Ok(())
    }

    /// Remove this host's endpoints that have had no bridge port for longer
    /// than `min_age` since their creation: Docker removed their containers
    /// while the store was unreachable and will not ask again. Their
    /// addresses are freed. Young endpoints are left alone: Docker joins an
    /// endpoint right after creating it.
    pub async fn sweep_orphans(&self, min_age: std::time::Duration) -> Result<usize> {
        let now = crate::reclaim::unix_now();
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
            let lock = self.overlay_lock(net.vni);
            let _guard = lock.lock().await;
            let ports: std::collections::HashSet<String> = if self.dataplane.has_network(net.vni) {
                self.dataplane
                    .endpoint_ports(net.vni)
                    .await?
                    .into_iter()
                    .collect()
            } else {
                Default::default()
            };
            for ep in old {
                if ports.contains(crate::dataplane::short_id(&ep.endpoint_id)) {
                    continue;
                }
                tracing::warn!(endpoint = %ep.endpoint_id, network = %net.network_id, "removing an orphaned endpoint (no bridge port) and freeing its addresses");
                self.overlays.delete_endpoint(&net, &ep.endpoint_id).await?;
                for addr in [ep.ipv4, ep.ipv6].into_iter().flatten() {
                    let pool = net
                        .subnets
                        .iter()
                        .find(|s| s.contains(addr.ip()))
                        .map(ipam::pool_id)
                        .unwrap_or_default();
                    match self.ipam.release_address(&pool, addr.ip()).await {
                        Ok(()) | Err(PluginError::Unknown(_)) => {}
                        Err(e) => return Err(e),
                    }
                }
                removed += 1;
            }
        }
        Ok(removed)
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

    /// [`Driver::recover`] until it succeeds (the store may be down at start).
    pub async fn recover_until_done(self: Arc<Self>) {
        let mut delay = std::time::Duration::from_millis(500);
        loop {
            match self.recover().await {
                Ok(()) => return,
                Err(e) => {
                    tracing::warn!(error = %e, retry_in = ?delay, "start-up reconciliation failed");
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(std::time::Duration::from_secs(10));
                }
            }
        }
    }
}

struct ParsedPool {
    subnet: IpNetwork,
    aux: Vec<IpAddr>,
}

fn pools_of(network_id: &str, data: &[IpamData]) -> Result<Vec<ParsedPool>> {
    data.iter()
        .map(|d| {
            if d.address_space != LOCAL_ADDRESS_SPACE && d.address_space != GLOBAL_ADDRESS_SPACE {
                return Err(PluginError::BadRequest(format!(
                    "network {network_id} uses another IPAM driver (address space {:?}), which \
                     cannot keep addresses unique across hosts; create it with {CREATE_HINT}",
                    d.address_space
                )));
            }
            let subnet = ipam::parse_pool_id(&d.pool)?;
            let aux = d
                .aux_addresses
                .iter()
                .flatten()
                .map(|(name, cidr)| {
                    cidr.split('/')
                        .next()
                        .and_then(|ip| ip.parse::<IpAddr>().ok())
                        .ok_or_else(|| {
                            PluginError::BadRequest(format!(
                                "aux address {name}={cidr:?} is not an address"
                            ))
                        })
                })
                .collect::<Result<Vec<_>>>()?;
            Ok(ParsedPool { subnet, aux })
        })
        .collect()
}

fn require(field: &str, value: &str) -> Result<()> {
    if value.trim().is_empty() {
        return Err(PluginError::BadRequest(format!(
            "{field} is missing or empty in the request"
        )));
    }
    Ok(())
}

/// An endpoint address as Docker sends it ("10.77.0.2/24"), checked against
/// the network's subnets.
fn parse_address(field: &str, value: &str, net: &LocalNetwork) -> Result<Option<IpNetwork>> {
    let value = value.trim();
    if value.is_empty() {
        return Ok(None);
    }
    let addr: IpNetwork = value.parse().map_err(|_| {
        PluginError::BadRequest(format!("{field} {value:?} is not an address in CIDR form"))
    })?;
    if !net.subnets.iter().any(|s| s.contains(addr.ip())) {
        return Err(PluginError::BadRequest(format!(
            "{field} {value} is outside the network's subnets; addresses must come from rustoverlay IPAM"
        )));
    }
    Ok(Some(addr))
}
