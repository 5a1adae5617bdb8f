//! The cluster as the store sees it, for `rustoverlay status`: hosts (alive
//! or gone), overlays with their networks, endpoints per host and pool
//! usage. One read of the whole prefix, so the view is one revision's.
//!
//! The JSON form of [`ClusterView`] is `status --json`'s `cluster` object,
//! documented in the README: fields are only ever added.

use super::ipam::{usage_of, PoolUsage};
use crate::error::{Result, StoreContext};
use crate::state::keys;
use crate::state::records::{
    ClusterNetwork, EndpointRecord, HostRecord, LocalNetwork, OverlayRecord, PoolRecord,
};
use ipnetwork::IpNetwork;
use kvstore_backends::KvStore;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ClusterView {
    /// The store revision the view was read at.
    pub revision: i64,
    pub hosts: Vec<HostView>,
    pub overlays: Vec<OverlayView>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct HostView {
    pub host: String,
    /// Registered now (its plugin renews its lease).
    pub alive: bool,
    /// From the registration: unknown for a gone host.
    pub vtep: Option<IpAddr>,
    pub version: Option<String>,
    /// Endpoints the host holds, on every overlay.
    pub endpoints: usize,
    /// When the host was seen to leave (Unix seconds), by the plugin that
    /// answered; absent when not known (read from the store directly, or
    /// gone before that plugin started).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub gone_since: Option<u64>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct OverlayView {
    /// The overlay's key: its first subnet, `/` as `_`.
    pub overlay: String,
    pub vni: u32,
    pub subnets: Vec<IpNetwork>,
    /// Docker NetworkIDs per host.
    pub networks: BTreeMap<String, BTreeSet<String>>,
    /// Docker network names where known (networks defined once).
    pub names: Vec<String>,
    /// Endpoints per host (hosts with none are left out).
    pub endpoints: BTreeMap<String, usize>,
    pub pools: Vec<PoolUsage>,
}

/// Read the view: one range over the whole prefix.
pub async fn cluster_view(store: &dyn KvStore) -> Result<ClusterView> {
    let resp = store
        .range(keys::ROOT)
        .await
        .ctx(|| "read the store".into())?;
    let mut registered: BTreeMap<String, HostRecord> = BTreeMap::new();
    let mut overlays: BTreeMap<String, OverlayRecord> = BTreeMap::new();
    let mut endpoints: BTreeMap<String, Vec<EndpointRecord>> = BTreeMap::new();
    let mut pools: BTreeMap<String, PoolRecord> = BTreeMap::new();
    let mut taken: BTreeMap<String, Vec<IpAddr>> = BTreeMap::new();
    let mut names: BTreeMap<String, String> = BTreeMap::new();
    let mut holders: BTreeSet<String> = BTreeSet::new();
    for kv in &resp.kvs {
        let Some(rest) = kv.key.strip_prefix(keys::ROOT) else {
            continue;
        };
        let parts: Vec<&str> = rest.split('/').collect();
        // An unreadable record is left out of the view, not fatal to it:
        // status is what an operator runs when something is wrong.
        match parts.as_slice() {
            ["hosts", host] => {
                if let Ok(rec) = serde_json::from_slice(&kv.value) {
                    registered.insert(host.to_string(), rec);
                }
            }
            ["overlay", overlay, "record"] => {
                if let Ok(rec) = serde_json::from_slice(&kv.value) {
                    overlays.insert(overlay.to_string(), rec);
                }
            }
            ["overlay", overlay, "ep", _] => {
                if let Ok(ep) = serde_json::from_slice::<EndpointRecord>(&kv.value) {
                    holders.insert(ep.host.clone());
                    endpoints.entry(overlay.to_string()).or_default().push(ep);
                }
            }
            ["ipam", "pool", pool, "record"] => {
                if let Ok(rec) = serde_json::from_slice::<PoolRecord>(&kv.value) {
                    holders.extend(rec.refs.keys().cloned());
                    pools.insert(pool.to_string(), rec);
                }
            }
            ["ipam", "pool", pool, "addr", ip] => {
                if let Ok(ip) = ip.parse() {
                    taken.entry(pool.to_string()).or_default().push(ip);
                }
            }
            ["cluster", overlay] => {
                if let Ok(def) = serde_json::from_slice::<ClusterNetwork>(&kv.value) {
                    names.insert(overlay.to_string(), def.name);
                }
            }
            ["host", host, "net", _]
                if serde_json::from_slice::<LocalNetwork>(&kv.value).is_ok() =>
            {
                holders.insert(host.to_string());
            }
            _ => {}
        }
    }
    let mut per_host: BTreeMap<&str, usize> = BTreeMap::new();
    for ep in endpoints.values().flatten() {
        *per_host.entry(ep.host.as_str()).or_default() += 1;
    }
    let mut hosts: Vec<HostView> = registered
        .iter()
        .map(|(host, rec)| HostView {
            host: host.clone(),
            alive: true,
            vtep: Some(rec.vtep),
            version: Some(rec.version.clone()),
            endpoints: per_host.get(host.as_str()).copied().unwrap_or(0),
            gone_since: None,
        })
        .collect();
    for host in holders.iter().filter(|h| !registered.contains_key(*h)) {
        hosts.push(HostView {
            host: host.clone(),
            alive: false,
            vtep: None,
            version: None,
            endpoints: per_host.get(host.as_str()).copied().unwrap_or(0),
            gone_since: None,
        });
    }
    hosts.sort_by(|a, b| a.host.cmp(&b.host));
    let overlays = overlays
        .into_iter()
        .map(|(overlay, rec)| {
            let mut counts: BTreeMap<String, usize> = BTreeMap::new();
            for ep in endpoints.get(&overlay).into_iter().flatten() {
                *counts.entry(ep.host.clone()).or_default() += 1;
            }
            let usage = rec
                .subnets
                .iter()
                .filter_map(|subnet| {
                    let seg = keys::subnet_segment(subnet);
                    let pool = pools.get(&seg)?;
                    let ips = taken.get(&seg).into_iter().flatten().copied();
                    Some(usage_of(pool, ips))
                })
                .collect();
            OverlayView {
                names: names.get(&overlay).cloned().into_iter().collect(),
                overlay,
                vni: rec.vni,
                subnets: rec.subnets,
                networks: rec.hosts,
                endpoints: counts,
                pools: usage,
            }
        })
        .collect();
    Ok(ClusterView {
        revision: resp.revision,
        hosts,
        overlays,
    })
}
