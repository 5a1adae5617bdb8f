//! CreateNetwork and DeleteNetwork: a host's Docker network joins (or
//! leaves) the overlay of its subnets.

use super::{Driver, CREATE_HINT};
use crate::control::cluster::Removal;
use crate::control::ipam::pool_id;
use crate::error::{PluginError, Result};
use crate::state::keys;
use ipnetwork::IpNetwork;
use std::net::IpAddr;

/// A network as Docker asks for it, parsed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NetworkSpec {
    pub network_id: String,
    pub ipv4: Vec<PoolSpec>,
    pub ipv6: Vec<PoolSpec>,
    /// `-o cluster=true`: defined once, created by the plugin on every host.
    pub cluster: bool,
}

/// One of the network's pools: a subnet from rustoverlay IPAM and its aux
/// addresses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PoolSpec {
    pub subnet: IpNetwork,
    pub aux: Vec<IpAddr>,
}

impl Driver {
    #[tracing::instrument(skip_all, fields(network = %spec.network_id))]
    pub async fn create_network(&self, spec: NetworkSpec) -> Result<()> {
        if spec.ipv4.len() > 1 || spec.ipv6.len() > 1 {
            return Err(PluginError::BadRequest(
                "rustoverlay networks take one subnet per address family; give at most one IPv4 \
                 and one IPv6 --subnet"
                    .into(),
            ));
        }
        let pools: Vec<&PoolSpec> = spec.ipv4.iter().chain(spec.ipv6.iter()).collect();
        if pools.is_empty() {
            return Err(PluginError::BadRequest(format!(
                "network {} has no subnet; create it with {CREATE_HINT}",
                spec.network_id
            )));
        }
        for p in &pools {
            // The pool must have been claimed through our IPAM.
            let seg = keys::subnet_segment(&p.subnet);
            if self.ipam.read_pool(&seg).await?.is_none() {
                return Err(PluginError::Unknown(format!(
                    "subnet {} is not claimed in the rustoverlay store; create the network with {CREATE_HINT}",
                    p.subnet
                )));
            }
        }
        self.check_cluster_subnet(&spec, &pools[0].subnet).await?;
        let subnets = pools.iter().map(|p| p.subnet).collect();
        let net = self
            .overlays
            .create_network_as(&spec.network_id, subnets, spec.cluster)
            .await?;
        for p in &pools {
            if let Err(e) = self.ipam.mark_aux(&pool_id(&p.subnet), &p.aux).await {
                // Undo: Docker does not call DeleteNetwork after a failed create.
                let _ = self.overlays.delete_network(&net.network_id).await;
                return Err(e);
            }
        }
        Ok(())
    }

    /// True when one of this host's Docker networks uses the subnet.
    pub async fn has_network_on(&self, subnet: &IpNetwork) -> Result<bool> {
        Ok(self
            .overlays
            .local_networks()
            .await?
            .iter()
            .any(|n| n.subnets.contains(subnet)))
    }

    /// A cluster network needs the cluster sync, and cannot be created
    /// again on a subnet whose removal from every host is under way; a
    /// subnet defined once takes no plain network beside it (its removal
    /// everywhere waits for the overlay to be gone). A replay of a create
    /// that went through is let through.
    async fn check_cluster_subnet(&self, spec: &NetworkSpec, subnet: &IpNetwork) -> Result<()> {
        let Some(cluster) = &self.cluster else {
            if spec.cluster {
                return Err(PluginError::BadRequest(
                    "this plugin runs without networks defined once; leave out -o cluster=true"
                        .into(),
                ));
            }
            return Ok(());
        };
        if self.overlays.lookup(&spec.network_id).await.is_ok() {
            return Ok(());
        }
        let overlay = keys::subnet_segment(subnet);
        match cluster.clusters.get(&overlay).await? {
            Some((def, _)) if def.removing => Err(PluginError::Conflict(format!(
                "network {} on subnet {subnet} is being removed from every host; create it \
                 again once it is gone (docker network ls on each host)",
                def.name
            ))),
            Some((def, _)) if !spec.cluster => Err(PluginError::Conflict(format!(
                "subnet {subnet} belongs to network {}, defined for every host (-o cluster=true): \
                 the plugin creates it on this host by itself; use another subnet for this one",
                def.name
            ))),
            _ => Ok(()),
        }
    }

    #[tracing::instrument(skip_all, fields(network = %network_id))]
    pub async fn delete_network(&self, network_id: &str) -> Result<()> {
        let Some(net) = self.overlays.delete_network(network_id).await? else {
            return Ok(());
        };
        if net.cluster {
            self.cluster_network_removed(&net.overlay).await;
        }
        // Devices only exist while a local endpoint does; clear leftovers
        // unless another of this host's Docker networks uses the overlay.
        let lock = self.devices.lock(net.vni).await;
        let still_used = self
            .overlays
            .local_networks()
            .await?
            .iter()
            .any(|n| n.vni == net.vni);
        if !still_used {
            self.devices.remove(net.vni, &lock).await?;
        }
        Ok(())
    }

    /// This host's copy of a cluster network is gone (Docker gives a driver
    /// no way to refuse a removal). Either it goes from every host, or, while
    /// containers elsewhere use it, the cluster sync creates it here again.
    async fn cluster_network_removed(&self, overlay: &str) {
        let Some(cluster) = &self.cluster else {
            return;
        };
        match cluster.clusters.removal(overlay).await {
            Ok(Removal::InUse(hosts)) => tracing::warn!(
                %overlay,
                hosts = %hosts.join(", "),
                "a network defined for every host was removed here while containers on other \
                 hosts use it: it is created here again; remove those containers first to \
                 remove it everywhere"
            ),
            Ok(Removal::Everywhere) => {
                if let Err(e) = cluster.clusters.forget_if_removed(overlay).await {
                    tracing::warn!(%overlay, error = %e, "could not finish the cluster network's removal; the next host's removal does");
                }
            }
            Ok(Removal::NotDefined) => {}
            Err(e) => {
                tracing::warn!(%overlay, error = %e, "could not decide the cluster network's removal; it is created here again")
            }
        }
        cluster.changed.notify_one();
    }

    /// Why `docker network rm TARGET` (a name, an ID or an ID prefix) must
    /// be turned down, if it must: TARGET is this host's copy of a network
    /// defined once, and containers on other hosts use it. Asked by Docker's
    /// authorization hook, before Docker starts removing anything.
    pub async fn removal_veto(&self, target: &str) -> Result<Option<String>> {
        let Some(cluster) = &self.cluster else {
            return Ok(None);
        };
        let locals = self.overlays.local_networks().await?;
        let copies: Vec<_> = locals.iter().filter(|n| n.cluster).collect();
        if copies.is_empty() {
            return Ok(None);
        }
        let defs = cluster.clusters.all().await?;
        // Docker's order: a full ID, then a name, then an ID prefix.
        let by_id = copies.iter().find(|n| n.network_id == target);
        let by_name = defs
            .iter()
            .find(|(o, d)| d.name == target && copies.iter().any(|n| &n.overlay == o))
            .map(|(o, _)| o.clone());
        // A short target is a name (of another network, maybe) far more
        // often than an ID prefix: a wrong refusal is worse than none.
        let by_prefix = copies
            .iter()
            .find(|n| target.len() >= 12 && n.network_id.starts_with(target));
        let Some(overlay) = by_id
            .map(|n| n.overlay.clone())
            .or(by_name)
            .or_else(|| by_prefix.map(|n| n.overlay.clone()))
        else {
            return Ok(None);
        };
        let Some((_, def)) = defs.iter().find(|(o, _)| *o == overlay) else {
            return Ok(None);
        };
        if def.removing {
            return Ok(None);
        }
        let users = cluster.clusters.users(&overlay).await?;
        if users.is_empty() {
            return Ok(None);
        }
        Ok(Some(format!(
            "network {} is defined for every host and containers on host{} {} use it; remove \
             those containers first, then remove the network on any host",
            def.name,
            if users.len() == 1 { "" } else { "s" },
            users.join(", ")
        )))
    }
}
