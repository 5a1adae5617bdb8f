//! Reclaiming what gone hosts held, and `rustoverlay gc`. The loop that
//! decides when to reclaim lives in `sync::reaper`.
//!
//! A host is gone when its registration (under a lease) has expired. After a
//! grace period, any live host removes the gone host's endpoints, frees their
//! addresses, detaches its networks and drops its pool references. Every one
//! of those writes carries the gone-host fence (`state::fence`), so nothing
//! is ever reclaimed from a host that came back.

use super::ipam::{pool_id, Ipam};
use super::overlay::Overlays;
use crate::error::{PluginError, Result, StoreContext};
use crate::state::codec::decode;
use crate::state::keys;
use crate::state::records::{AddressKind, AddressRecord, EndpointRecord, LocalNetwork, PoolRecord};
use kvstore_backends::{KvStore, Revision};
use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

/// What a host holds in the store.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Holdings {
    pub networks: Vec<String>,
    pub endpoints: Vec<(LocalNetwork, String)>,
    /// (PoolID, address) of plain addresses (not gateways or aux).
    pub addresses: Vec<(String, IpAddr)>,
    /// PoolID -> references.
    pub pool_refs: BTreeMap<String, u32>,
    /// The underlay addresses its endpoints were reached at: where to look
    /// for evidence that the machine is gone (`sync::reaper`).
    pub vteps: BTreeSet<IpAddr>,
}

impl Holdings {
    pub fn is_empty(&self) -> bool {
        self.networks.is_empty()
            && self.endpoints.is_empty()
            && self.addresses.is_empty()
            && self.pool_refs.is_empty()
    }
}

/// An address handed out but bound to no endpoint, as the census read it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnboundAddress {
    pub pool: String,
    pub ip: IpAddr,
    pub holder: String,
    /// The address record's revision: gc frees it only if still unchanged.
    pub revision: Revision,
}

/// A full read of what every host holds (gc and reclaim are rare; this scans).
pub struct Census {
    pub holdings: HashMap<String, Holdings>,
    /// Addresses handed out but bound to no endpoint.
    pub unbound: Vec<UnboundAddress>,
    pub registered: HashSet<String>,
}

pub async fn census(store: &dyn KvStore) -> Result<Census> {
    let root = keys::ROOT;
    let all = store
        .range(root)
        .await
        .ctx(|| "read the whole rustoverlay state".into())?;
    let mut holdings: HashMap<String, Holdings> = HashMap::new();
    let mut registered = HashSet::new();
    let mut bound: HashSet<(String, IpAddr)> = HashSet::new();
    let mut addresses = vec![];
    let mut overlays: HashMap<String, Vec<EndpointRecord>> = HashMap::new();
    let mut nets_by_overlay: HashMap<(String, String), LocalNetwork> = HashMap::new();
    for kv in &all.kvs {
        let rest = &kv.key[root.len()..];
        let parts: Vec<&str> = rest.split('/').collect();
        match parts.as_slice() {
            ["hosts", host] => {
                registered.insert(host.to_string());
            }
            ["host", host, "net", net_id] => {
                let net: LocalNetwork = decode(kv)?;
                nets_by_overlay.insert((host.to_string(), net.network_id.clone()), net);
                holdings
                    .entry(host.to_string())
                    .or_default()
                    .networks
                    .push(net_id.to_string());
            }
            ["overlay", overlay, "ep", _] => {
                let ep: EndpointRecord = decode(kv)?;
                overlays.entry(overlay.to_string()).or_default().push(ep);
            }
            ["ipam", "pool", _, "record"] => {
                let rec: PoolRecord = decode(kv)?;
                let id = pool_id(&rec.subnet);
                for (host, n) in rec.refs {
                    holdings
                        .entry(host)
                        .or_default()
                        .pool_refs
                        .insert(id.clone(), n);
                }
            }
            ["ipam", "pool", seg, "addr", ip] => {
                let rec: AddressRecord = decode(kv)?;
                if rec.kind == AddressKind::Address {
                    if let Ok(ip) = ip.parse::<IpAddr>() {
                        addresses.push((seg.replace('_', "/"), ip, rec, kv.mod_revision));
                    }
                }
            }
            _ => {}
        }
    }
    for eps in overlays.values() {
        for ep in eps {
            for a in [ep.ipv4, ep.ipv6].into_iter().flatten() {
                let pool = ipnetwork::IpNetwork::new(a.network(), a.prefix())
                    .map(|n| pool_id(&n))
                    .unwrap_or_default();
                bound.insert((pool, a.ip()));
            }
            let held = holdings.entry(ep.host.clone()).or_default();
            held.vteps.insert(ep.vtep);
            if let Some(net) = nets_by_overlay.get(&(ep.host.clone(), ep.network_id.clone())) {
                held.endpoints.push((net.clone(), ep.endpoint_id.clone()));
            }
        }
    }
    let mut unbound = vec![];
    for (pool, ip, rec, revision) in addresses {
        if !bound.contains(&(pool.clone(), ip)) {
            unbound.push(UnboundAddress {
                pool: pool.clone(),
                ip,
                holder: rec.host.clone(),
                revision,
            });
        }
        holdings
            .entry(rec.host)
            .or_default()
            .addresses
            .push((pool, ip));
    }
    Ok(Census {
        holdings,
        unbound,
        registered,
    })
}

/// Remove everything a gone host holds. Every write requires that the host is
/// still unregistered; the first failure of that kind stops the reclaim.
#[tracing::instrument(skip(store, held))]
pub async fn reclaim_host(store: Arc<dyn KvStore>, host: &str, held: &Holdings) -> Result<()> {
    let overlays = Overlays::acting_for_gone_host(store.clone(), host);
    let ipam = Ipam::acting_for_gone_host(store, host);
    for (net, ep) in &held.endpoints {
        overlays.delete_endpoint(net, ep).await?;
    }
    for (pool, ip) in &held.addresses {
        match ipam.release_address(pool, *ip).await {
            // Already released or its pool already gone: nothing to free.
            Ok(()) | Err(PluginError::Unknown(_)) => {}
            Err(e) => return Err(e),
        }
    }
    for net in &held.networks {
        overlays.delete_network(net).await?;
    }
    for (pool, refs) in &held.pool_refs {
        for _ in 0..*refs {
            match ipam.release_pool(pool).await {
                Ok(()) | Err(PluginError::Unknown(_)) => {}
                Err(e) => return Err(e),
            }
        }
    }
    tracing::info!(
        endpoints = held.endpoints.len(),
        addresses = held.addresses.len(),
        networks = held.networks.len(),
        "reclaimed a gone host"
    );
    Ok(())
}

/// `rustoverlay gc`: list (and with `apply` free) addresses that stayed
/// bound to no endpoint, and unchanged, for `min_age` as gc itself watched
/// them (two reads `min_age` apart on this process's clock, never the
/// holder's: a container being started is never touched), and everything of
/// hosts that are gone.
pub async fn gc(
    store: Arc<dyn KvStore>,
    apply: bool,
    min_age: Duration,
    gone_hosts: bool,
) -> Result<String> {
    let first = census(store.as_ref()).await?;
    let watched: HashSet<(String, IpAddr, Revision)> = first
        .unbound
        .iter()
        .map(|u| (u.pool.clone(), u.ip, u.revision))
        .collect();
    let census = if watched.is_empty() || min_age.is_zero() {
        first
    } else {
        tracing::info!(addresses = watched.len(), min_age = ?min_age, "watching addresses bound to no endpoint");
        tokio::time::sleep(min_age).await;
        census(store.as_ref()).await?
    };
    let mut out = String::new();
    let mut gone: Vec<(&String, &Holdings)> = census
        .holdings
        .iter()
        .filter(|(h, held)| !census.registered.contains(*h) && !held.is_empty())
        .collect();
    gone.sort_by(|a, b| a.0.cmp(b.0));
    for (host, held) in &gone {
        out.push_str(&format!(
            "host {host} is gone (not registered): {} networks, {} endpoints, {} addresses, {} pool references\n",
            held.networks.len(),
            held.endpoints.len(),
            held.addresses.len(),
            held.pool_refs.values().sum::<u32>()
        ));
        if apply && gone_hosts {
            reclaim_host(store.clone(), host, held).await?;
            out.push_str(&format!("  reclaimed host {host}\n"));
        } else {
            // A plugin that is down or restarting is not registered either:
            // the cluster's reaper reclaims after --reclaim-grace.
            out.push_str(&format!(
                "  left to the cluster's reaper (after --reclaim-grace); --apply --gone-hosts \
                 reclaims it now, only if host {host} is gone for good\n"
            ));
        }
    }
    let gone_hosts: HashSet<&String> = gone.iter().map(|(h, _)| *h).collect();
    for u in &census.unbound {
        if gone_hosts.contains(&u.holder) || !watched.contains(&(u.pool.clone(), u.ip, u.revision))
        {
            continue; // freed with its host above, or not watched long enough
        }
        let (ip, pool, holder) = (u.ip, &u.pool, &u.holder);
        out.push_str(&format!(
            "address {ip} in pool {pool} (held by {holder}) stayed bound to no endpoint for {} s\n",
            min_age.as_secs()
        ));
        if apply {
            // Only if the address record is still the one watched: it may
            // have been released and taken again meanwhile.
            let ipam = Ipam::releasing_for(store.clone(), holder);
            match ipam.release_listed_address(pool, ip, u.revision).await {
                Ok(()) => out.push_str(&format!("  freed {ip}\n")),
                Err(PluginError::Unknown(why)) => out.push_str(&format!("  left alone: {why}\n")),
                Err(e) => return Err(e),
            }
        }
    }
    if out.is_empty() {
        out.push_str("nothing to collect\n");
    } else if !apply {
        out.push_str("run again with --apply to free these\n");
    }
    Ok(out)
}
