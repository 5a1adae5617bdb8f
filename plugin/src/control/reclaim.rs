//! Reclaiming what gone hosts held, and `rustoverlay gc`, from a census of
//! who holds what. The loop that decides when to reclaim lives in
//! `sync::reaper`.
//!
//! A host is gone when its registration (under a lease) has expired. After a
//! grace period, any live host removes the gone host's endpoints, frees their
//! addresses, detaches its networks and drops its pool references. Every one
//! of those writes carries the gone-host fence (`state::fence`), so nothing
//! is ever reclaimed from a host that came back.
//!
//! The census comes from a model ([`CensusIndex`]) that keeps, decoded, only
//! the records the census reads (registrations, each host's networks,
//! endpoints, pool references, addresses and their bindings), by store key.
//! It is built from one read of the root ([`census`], `gc`), or kept current
//! from a full read and then a watch's changes (the elected reaper,
//! `sync::leader`): the same census comes out of both. A record this
//! version cannot read is skipped with one warning naming its key, instead
//! of stopping reclaim and collection for the whole cluster. Skipping is
//! safe: what a skipped record held is left alone (kept, never handed out
//! twice): no address of a pool of an overlay with an unreadable endpoint
//! record is listed as unbound, and no address is released while its
//! endpoint binding stays.

use super::ipam::{pool_id, Ipam};
use super::overlay::Overlays;
use crate::error::{PluginError, Result, StoreContext};
use crate::state::codec::decode;
use crate::state::keys;
use crate::state::records::{
    AddressKind, AddressRecord, EndpointRecord, LocalNetwork, OverlayRecord, PoolRecord,
};
use kvstore_backends::{EventKind, KeyValue, KvStore, Revision, WatchEvent};
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

/// What every host holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Census {
    pub holdings: HashMap<String, Holdings>,
    /// Addresses handed out but bound to no endpoint.
    pub unbound: Vec<UnboundAddress>,
    pub registered: HashSet<String>,
}

/// One full read of the store root, as a census (`gc`, tests).
pub async fn census(store: &dyn KvStore) -> Result<Census> {
    let mut index = CensusIndex::default();
    index.reload(store).await?;
    Ok(index.census())
}

/// One stored record the census reads, decoded.
#[derive(Debug, Clone)]
enum Record {
    /// `hosts/<host>`.
    Registered(String),
    /// `host/<host>/net/<net>`.
    Network {
        host: String,
        net_id: String,
        net: LocalNetwork,
    },
    /// `overlay/<overlay>/ep/<ep>`.
    Endpoint(EndpointRecord),
    /// `overlay/<overlay>/record`: the pools of its subnets.
    Overlay { overlay: String, pools: Vec<String> },
    /// `ipam/pool/<pool>/record`: its references per host.
    Pool {
        id: String,
        refs: BTreeMap<String, u32>,
    },
    /// `ipam/pool/<pool>/addr/<ip>` of a plain address (not gateway or aux).
    Address {
        pool: String,
        ip: IpAddr,
        holder: String,
        revision: Revision,
    },
    /// `ipam/pool/<pool>/bound/<ip>`: the address has an endpoint.
    Bound { pool: String, ip: IpAddr },
}

/// The census's model: the records it reads, by key.
#[derive(Debug, Default)]
pub struct CensusIndex {
    records: BTreeMap<String, Record>,
    /// Keys holding a value this version cannot read, at the revision
    /// warned about (one warning per key and value).
    undecodable: HashMap<String, Revision>,
    /// Warnings given about such values.
    warnings: u64,
}

impl CensusIndex {
    /// Replace the model with one full read of the root.
    pub async fn reload(&mut self, store: &dyn KvStore) -> Result<()> {
        let all = store
            .range(keys::ROOT)
            .await
            .ctx(|| "read the whole rustoverlay state".into())?;
        self.resync(&all.kvs);
        Ok(())
    }

    /// Replace the model with a full read of the root (every key under
    /// `keys::ROOT`).
    pub fn resync(&mut self, kvs: &[KeyValue]) {
        self.records.clear();
        let warned = std::mem::take(&mut self.undecodable);
        for kv in kvs {
            match parse(kv) {
                Ok(Some(rec)) => {
                    self.records.insert(kv.key.clone(), rec);
                }
                Ok(None) => {}
                Err(e) => {
                    if warned.get(&kv.key) == Some(&kv.mod_revision) {
                        self.undecodable.insert(kv.key.clone(), kv.mod_revision);
                    } else {
                        self.skip(kv, &e);
                    }
                }
            }
        }
    }

    /// Apply one change seen by a watch of the root.
    pub fn apply(&mut self, event: &WatchEvent) {
        let kv = &event.kv;
        if event.kind == EventKind::Delete {
            self.records.remove(&kv.key);
            self.undecodable.remove(&kv.key);
            return;
        }
        match parse(kv) {
            Ok(rec) => {
                self.undecodable.remove(&kv.key);
                match rec {
                    Some(rec) => self.records.insert(kv.key.clone(), rec),
                    None => self.records.remove(&kv.key),
                };
            }
            Err(e) => {
                // Whatever the key held before is gone from the store.
                self.records.remove(&kv.key);
                if self.undecodable.get(&kv.key) != Some(&kv.mod_revision) {
                    self.skip(kv, &e);
                }
            }
        }
    }

    /// Keys skipped because their values cannot be read.
    pub fn undecodable(&self) -> impl Iterator<Item = &str> {
        self.undecodable.keys().map(String::as_str)
    }

    /// Warnings given so far about values that cannot be read.
    pub fn warnings(&self) -> u64 {
        self.warnings
    }

    fn skip(&mut self, kv: &KeyValue, error: &PluginError) {
        self.warnings += 1;
        tracing::warn!(key = %kv.key, error = %error, "skipping a stored record this version cannot read: the census goes on without it, and what it holds is left alone");
        self.undecodable.insert(kv.key.clone(), kv.mod_revision);
    }

    /// The census of what the model holds (no store read).
    pub fn census(&self) -> Census {
        let mut holdings: HashMap<String, Holdings> = HashMap::new();
        let mut registered = HashSet::new();
        let mut bound: HashSet<(&str, IpAddr)> = HashSet::new();
        let mut nets: HashMap<(&str, &str), &LocalNetwork> = HashMap::new();
        let mut endpoints = vec![];
        let mut addresses = vec![];
        let mut pools = vec![];
        let mut overlay_pools: HashMap<&str, &[String]> = HashMap::new();
        for rec in self.records.values() {
            match rec {
                Record::Registered(host) => {
                    registered.insert(host.clone());
                }
                Record::Network { host, net_id, net } => {
                    nets.insert((host, &net.network_id), net);
                    holdings
                        .entry(host.clone())
                        .or_default()
                        .networks
                        .push(net_id.clone());
                }
                Record::Endpoint(ep) => endpoints.push(ep),
                Record::Overlay { overlay, pools } => {
                    overlay_pools.insert(overlay, pools);
                }
                Record::Pool { id, refs } => pools.push((id, refs)),
                Record::Address {
                    pool,
                    ip,
                    holder,
                    revision,
                } => addresses.push((pool, *ip, holder, *revision)),
                Record::Bound { pool, ip } => {
                    bound.insert((pool, *ip));
                }
            }
        }
        for (id, refs) in pools {
            for (host, n) in refs {
                holdings
                    .entry(host.clone())
                    .or_default()
                    .pool_refs
                    .insert(id.clone(), *n);
            }
        }
        let mut bound_by_endpoint: HashSet<(String, IpAddr)> = HashSet::new();
        for ep in endpoints {
            for a in [ep.ipv4, ep.ipv6].into_iter().flatten() {
                let pool = ipnetwork::IpNetwork::new(a.network(), a.prefix())
                    .map(|n| pool_id(&n))
                    .unwrap_or_default();
                bound_by_endpoint.insert((pool, a.ip()));
            }
            let held = holdings.entry(ep.host.clone()).or_default();
            held.vteps.insert(ep.vtep);
            if let Some(net) = nets.get(&(ep.host.as_str(), ep.network_id.as_str())) {
                held.endpoints
                    .push(((*net).clone(), ep.endpoint_id.clone()));
            }
        }
        // An endpoint record that cannot be read may hold any address of its
        // overlay's pools (and records of older versions have no binding
        // key): none of those is collected while it stays.
        let mut uncertain: HashSet<String> = HashSet::new();
        for key in self.undecodable.keys() {
            let rest = key.strip_prefix(keys::ROOT).unwrap_or_default();
            if let ["overlay", overlay, "ep", _] = rest.split('/').collect::<Vec<_>>()[..] {
                uncertain.insert(overlay.replace('_', "/"));
                let theirs = overlay_pools.get(overlay).copied().unwrap_or_default();
                uncertain.extend(theirs.iter().cloned());
            }
        }
        let mut unbound = vec![];
        for (pool, ip, holder, revision) in addresses {
            // Bound by an endpoint record, or by a binding whose endpoint
            // record was skipped: either way not free to collect.
            let is_bound = bound.contains(&(pool.as_str(), ip))
                || bound_by_endpoint.contains(&(pool.clone(), ip))
                || uncertain.contains(pool);
            if !is_bound {
                unbound.push(UnboundAddress {
                    pool: pool.clone(),
                    ip,
                    holder: holder.clone(),
                    revision,
                });
            }
            holdings
                .entry(holder.clone())
                .or_default()
                .addresses
                .push((pool.clone(), ip));
        }
        Census {
            holdings,
            unbound,
            registered,
        }
    }
}

/// The record a key holds, if the census reads it; an error when its value
/// cannot be read.
fn parse(kv: &KeyValue) -> Result<Option<Record>> {
    let Some(rest) = kv.key.strip_prefix(keys::ROOT) else {
        return Ok(None);
    };
    let parts: Vec<&str> = rest.split('/').collect();
    let rec = match parts.as_slice() {
        ["hosts", host] => Record::Registered(host.to_string()),
        ["host", host, "net", net_id] => Record::Network {
            host: host.to_string(),
            net_id: net_id.to_string(),
            net: decode(kv)?,
        },
        ["overlay", _, "ep", _] => Record::Endpoint(decode(kv)?),
        ["overlay", overlay, "record"] => {
            let rec: OverlayRecord = decode(kv)?;
            Record::Overlay {
                overlay: overlay.to_string(),
                pools: rec.subnets.iter().map(pool_id).collect(),
            }
        }
        ["ipam", "pool", _, "record"] => {
            let rec: PoolRecord = decode(kv)?;
            Record::Pool {
                id: pool_id(&rec.subnet),
                refs: rec.refs,
            }
        }
        ["ipam", "pool", seg, "addr", ip] => {
            let rec: AddressRecord = decode(kv)?;
            let Ok(ip) = ip.parse::<IpAddr>() else {
                return Ok(None);
            };
            if rec.kind != AddressKind::Address {
                return Ok(None);
            }
            Record::Address {
                pool: seg.replace('_', "/"),
                ip,
                holder: rec.host,
                revision: kv.mod_revision,
            }
        }
        ["ipam", "pool", seg, "bound", ip] => match ip.parse::<IpAddr>() {
            Ok(ip) => Record::Bound {
                pool: seg.replace('_', "/"),
                ip,
            },
            Err(_) => return Ok(None),
        },
        _ => return Ok(None),
    };
    Ok(Some(rec))
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
    // One model for both reads, so a record that cannot be read is warned
    // about once.
    let mut index = CensusIndex::default();
    index.reload(store.as_ref()).await?;
    let first = index.census();
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
        index.reload(store.as_ref()).await?;
        index.census()
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

#[cfg(test)]
mod tests {
    use super::*;

    fn kv(key: &str, value: &[u8], revision: Revision) -> KeyValue {
        KeyValue {
            key: key.into(),
            value: value.to_vec(),
            create_revision: revision,
            mod_revision: revision,
            lease: None,
        }
    }

    fn put(key: &str, value: &[u8], revision: Revision) -> WatchEvent {
        WatchEvent {
            kind: EventKind::Put,
            kv: kv(key, value, revision),
        }
    }

    #[test]
    fn a_record_that_cannot_be_read_is_skipped_with_one_warning() {
        let registration = kv(&keys::host_registration("a"), b"{}", 1);
        let bad = keys::endpoint("10.77.0.0_24", "broken");
        let mut index = CensusIndex::default();
        let read = [registration, kv(&bad, b"\xff", 2)];
        index.resync(&read);
        let skipped = |i: &CensusIndex| {
            let keys: Vec<String> = i.undecodable().map(String::from).collect();
            (i.warnings(), keys)
        };
        assert_eq!(skipped(&index), (1, vec![bad.clone()]));
        assert!(index.census().registered.contains("a"), "the rest is read");
        // Rounds, a full read again, the same change replayed: no new warning.
        for _ in 0..3 {
            index.census();
        }
        index.resync(&read);
        index.apply(&put(&bad, b"\xff", 2));
        assert_eq!(skipped(&index).0, 1, "one warning per key");
        // Other garbage is worth a warning; a delete ends it.
        index.apply(&put(&bad, b"[]", 3));
        assert_eq!(skipped(&index), (2, vec![bad.clone()]));
        index.apply(&WatchEvent {
            kind: EventKind::Delete,
            kv: kv(&bad, b"", 4),
        });
        assert_eq!(skipped(&index), (2, vec![]));
    }
}
