//! Endpoints: CreateEndpoint stores the record (address, MAC, host, VTEP),
//! Join builds the devices and the veth pair, Leave and DeleteEndpoint undo
//! them; EndpointOperInfo reports what the store holds.

use super::Driver;
use crate::error::{PluginError, Result};
use crate::state::records::{EndpointRecord, LocalNetwork};
use crate::util::clock::{unix_now, unix_now_ms};
use crate::util::mac::{format_mac, mac_for, parse_mac};
use ipnetwork::IpNetwork;
use std::net::{IpAddr, Ipv4Addr};
use std::path::{Path, PathBuf};

/// An endpoint as Docker asks for it, parsed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EndpointSpec {
    pub network_id: String,
    pub endpoint_id: String,
    pub ipv4: Option<IpNetwork>,
    pub ipv6: Option<IpNetwork>,
    /// None: derive one from the IPv4 address.
    pub mac: Option<[u8; 6]>,
}

/// What EndpointOperInfo reports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EndpointInfo {
    pub vni: u32,
    pub host: String,
    pub vtep: IpAddr,
    pub mac: String,
}

/// The address must come from one of the network's subnets.
fn check_in_network(field: &str, addr: Option<IpNetwork>, net: &LocalNetwork) -> Result<()> {
    match addr {
        Some(a) if !net.subnets.iter().any(|s| s.contains(a.ip())) => {
            Err(PluginError::BadRequest(format!(
                "{field} {a} is outside the network's subnets; addresses must come from rustoverlay IPAM"
            )))
        }
        _ => Ok(()),
    }
}

impl Driver {
    /// Store the endpoint. Returns the MAC it was given when Docker left
    /// the MAC to us (Docker is told only what it left empty).
    #[tracing::instrument(skip_all, fields(network = %spec.network_id, endpoint = %spec.endpoint_id))]
    pub async fn create_endpoint(&self, spec: EndpointSpec) -> Result<Option<String>> {
        let net = self.overlays.lookup(&spec.network_id).await?;
        check_in_network("Address", spec.ipv4, &net)?;
        check_in_network("AddressIPv6", spec.ipv6, &net)?;
        if spec.ipv4.is_none() && spec.ipv6.is_none() {
            return Err(PluginError::BadRequest(format!(
                "endpoint {} has no address; rustoverlay endpoints get theirs from rustoverlay IPAM",
                spec.endpoint_id
            )));
        }
        let mac = spec
            .mac
            .unwrap_or_else(|| mac_for(spec.ipv4.map(|a| a.ip())));
        let record = EndpointRecord {
            endpoint_id: spec.endpoint_id.clone(),
            network_id: spec.network_id.clone(),
            host: self.host.clone(),
            vtep: self.devices.dataplane().vtep(),
            mac: format_mac(&mac),
            ipv4: spec.ipv4,
            ipv6: spec.ipv6,
            created_at: unix_now(),
            created_ms: unix_now_ms(),
        };
        if let (true, Some(cluster)) = (net.cluster, &self.cluster) {
            let fence = cluster.clusters.endpoint_fence(&net.overlay).await?;
            if let Err(e) = self
                .overlays
                .create_endpoint_fenced(&net, &record, fence)
                .await
            {
                // A removal that began meanwhile explains the failure best.
                cluster.clusters.endpoint_fence(&net.overlay).await?;
                return Err(e);
            }
        } else {
            self.overlays.create_endpoint(&net, &record).await?;
        }
        tracing::info!(ip = ?spec.ipv4, mac = %record.mac, "endpoint created");
        Ok(spec.mac.is_none().then_some(record.mac))
    }

    pub async fn endpoint_info(&self, network_id: &str, endpoint_id: &str) -> Result<EndpointInfo> {
        let (net, ep) = self.known_endpoint(network_id, endpoint_id).await?;
        Ok(EndpointInfo {
            vni: net.vni,
            host: ep.host,
            vtep: ep.vtep,
            mac: ep.mac,
        })
    }

    /// The resolver's address when Docker should route it into the joining
    /// container (names across hosts are on, and the container has no such
    /// route yet). The route goes to a container once: Docker adds Join's
    /// routes with "exclusive", so a second network's copy of the same
    /// route would fail that network's Join. A running container's namespace
    /// is asked; a container being started has none yet (runc makes it
    /// after the Joins), so the Joins of one start are remembered. Docker
    /// joins one sandbox's endpoints one after another, so this is race
    /// free. Any doubt costs the route, never the Join.
    pub async fn dns_route(&self, sandbox_key: &str, endpoint_id: &str) -> Option<Ipv4Addr> {
        let dns = self.dns?;
        if let Some(sandbox) = sandbox_path(sandbox_key) {
            match self
                .devices
                .dataplane()
                .sandbox_has_route(&sandbox, dns)
                .await
            {
                Ok(true) => return None,
                Ok(false) => {}
                Err(e) => {
                    tracing::warn!(sandbox_key, error = %e, "cannot read the container's routes: no route to the resolver (names of other hosts will not resolve in it)");
                    return None;
                }
            }
        }
        let mut routes = self.dns_routes.lock().unwrap_or_else(|e| e.into_inner());
        match routes.get(sandbox_key) {
            Some(holder) if holder != endpoint_id && sandbox_path(sandbox_key).is_none() => None,
            _ => {
                routes.insert(sandbox_key.to_string(), endpoint_id.to_string());
                Some(dns)
            }
        }
    }

    /// The endpoint left its container: it no longer carries a route.
    fn forget_dns_route(&self, endpoint_id: &str) {
        self.dns_routes
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .retain(|_, holder| holder != endpoint_id);
    }

    /// Build the overlay's devices if this is its first local endpoint, and
    /// the endpoint's veth pair. Returns the container side's name.
    #[tracing::instrument(skip_all, fields(network = %network_id, endpoint = %endpoint_id))]
    pub async fn join(&self, network_id: &str, endpoint_id: &str) -> Result<String> {
        let (net, ep) = self.known_endpoint(network_id, endpoint_id).await?;
        let mac = parse_mac(&ep.mac)
            .ok_or_else(|| PluginError::Internal(format!("stored MAC {:?} is invalid", ep.mac)))?;
        let lock = self.devices.lock(net.vni).await;
        let built = self.devices.ensure(&net.overlay, net.vni, &lock).await?;
        let created = self
            .devices
            .dataplane()
            .create_endpoint_link(net.vni, &ep.endpoint_id, mac)
            .await;
        if created.is_err() && built {
            // Undo what this Join built: no other endpoint here is joined.
            if let Err(e) = self.devices.remove(net.vni, &lock).await {
                tracing::warn!(vni = net.vni, error = %e, "could not remove the devices of a failed Join");
            }
        }
        Ok(created?)
    }

    #[tracing::instrument(skip_all, fields(network = %network_id, endpoint = %endpoint_id))]
    pub async fn leave(&self, network_id: &str, endpoint_id: &str) -> Result<()> {
        self.forget_dns_route(endpoint_id);
        let (net, ep) = self.known_endpoint(network_id, endpoint_id).await?;
        let _lock = self.devices.lock(net.vni).await;
        self.devices
            .dataplane()
            .remove_endpoint_link(net.vni, &ep.endpoint_id)
            .await?;
        Ok(())
    }

    #[tracing::instrument(skip_all, fields(network = %network_id, endpoint = %endpoint_id))]
    pub async fn delete_endpoint(&self, network_id: &str, endpoint_id: &str) -> Result<()> {
        let net = match self.overlays.lookup(network_id).await {
            Ok(net) => net,
            // Already gone with its network: nothing left to delete.
            Err(PluginError::Unknown(_)) => return Ok(()),
            Err(e) => return Err(e),
        };
        let existing = self.overlays.get_endpoint(&net, endpoint_id).await?;
        if let Some((ep, _)) = &existing {
            if ep.host != self.host {
                return Err(PluginError::Conflict(format!(
                    "endpoint {endpoint_id} belongs to host {}, not to this host",
                    ep.host
                )));
            }
        }
        let lock = self.devices.lock(net.vni).await;
        self.devices
            .dataplane()
            .remove_endpoint_link(net.vni, endpoint_id)
            .await?;
        if let Some((ep, rev)) = existing {
            // With the revision just read: no second read in the common case.
            if !self.overlays.delete_endpoint_record(&net, &ep, rev).await? {
                self.overlays.delete_endpoint(&net, endpoint_id).await?;
            }
        }
        self.remove_devices_if_unused(&net, &lock).await;
        Ok(())
    }
}

/// Where a container's namespace file is, seen from this process: Docker's
/// path, or under /host/run for the managed plugin (which sees the host's
/// /run there; /var/run is a link to /run).
fn sandbox_path(key: &str) -> Option<PathBuf> {
    let direct = PathBuf::from(key);
    if direct.exists() {
        return Some(direct);
    }
    let rest = key
        .strip_prefix("/var/run/")
        .or_else(|| key.strip_prefix("/run/"))?;
    let mapped = Path::new("/host/run").join(rest);
    mapped.exists().then_some(mapped)
}
