//! Every value the plugin stores, next to the key layout in `keys`: together
//! they are the whole store schema. Fields added later must be
//! `#[serde(default)]` so that records of older versions stay readable.

use ipnetwork::IpNetwork;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

/// `hosts/<host>`: a live host, written under its lease.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct HostRecord {
    pub host: String,
    pub vtep: IpAddr,
    pub version: String,
}

/// `ipam/pools`: the subnets claimed cluster-wide, changed only by
/// compare-and-swap so that two hosts can never claim overlapping subnets.
#[derive(Debug, Default, Clone, Serialize, Deserialize)]
pub struct PoolIndex {
    /// Pool ID (the canonical CIDR) of every claimed subnet.
    pub pools: BTreeSet<String>,
}

/// `ipam/pool/<pool>/record`: one claimed subnet.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct PoolRecord {
    pub subnet: IpNetwork,
    /// `--ip-range`: where dynamic addresses come from.
    pub range: Option<IpNetwork>,
    /// The one gateway every host is given.
    pub gateway: Option<IpAddr>,
    /// Auxiliary addresses of the network: shared by every host, freed with
    /// the pool.
    #[serde(default)]
    pub aux: BTreeSet<IpAddr>,
    /// References per host (RequestPool minus ReleasePool).
    pub refs: BTreeMap<String, u32>,
}

/// `ipam/pool/<pool>/alloc`: the allocation cursor and the bounds of the
/// released-address queue.
#[derive(Debug, Default, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
pub struct AllocState {
    /// Offset (within the dynamic range) of the lowest address neither
    /// handed out nor claimed by a host's run (`ClaimedRun`).
    pub next: u128,
    pub free_head: u64,
    pub free_tail: u64,
}

/// `ipam/pool/<pool>/run/<host>`: offsets a host took from the cursor in
/// one step and hands out one by one without writing the cursor, so that
/// hosts allocating at once rarely race for it: from `next` (the first
/// this record knows not handed out) up to `end` (exclusive). Kept when its
/// host goes, so that what it did not hand out is found when the cursor and
/// the queue run dry; gone with the pool.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
pub struct ClaimedRun {
    pub next: u128,
    pub end: u128,
}

/// `ipam/pool/<pool>/addr/<ip>`: who holds an address, for `gc` and for
/// people reading the store.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AddressRecord {
    pub host: String,
    pub kind: AddressKind,
    /// When it was handed out (Unix seconds), so `gc` can leave young
    /// allocations alone: their endpoint may be being created right now.
    #[serde(default)]
    pub at: u64,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum AddressKind {
    Gateway,
    /// A container's address, held by one host.
    Address,
    /// A network's `--aux-address`: shared, freed with the pool.
    Aux,
}

/// `overlay/<overlay>/record`: one overlay (a subnet shared by hosts).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct OverlayRecord {
    pub vni: u32,
    pub subnets: Vec<IpNetwork>,
    /// Docker NetworkIDs of this overlay, per host.
    pub hosts: BTreeMap<String, BTreeSet<String>>,
}

/// `host/<host>/net/<docker-net>`: what a host knows of one of its Docker
/// networks.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct LocalNetwork {
    pub network_id: String,
    /// The overlay's key: its first subnet as a key segment.
    pub overlay: String,
    pub vni: u32,
    pub subnets: Vec<IpNetwork>,
    /// Created with `-o cluster=true`: defined once for every host.
    #[serde(default)]
    pub cluster: bool,
}

/// `cluster/<overlay>`: a network defined once (`-o cluster=true`). Every
/// host's plugin creates it through its Docker API, and removes it once it
/// is `removing`. The definition is the engine's own description of the
/// network (opaque here: `sync::cluster` reads and writes it).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ClusterNetwork {
    pub name: String,
    /// The host where `docker network create` ran.
    pub origin: String,
    pub definition: serde_json::Value,
    /// A removal was accepted: every host removes its copy, and the last
    /// one deletes this record.
    #[serde(default)]
    pub removing: bool,
}

/// `overlay/<overlay>/ep/<ep>`: an endpoint, on whichever host it lives.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct EndpointRecord {
    pub endpoint_id: String,
    /// The Docker NetworkID on the endpoint's own host.
    pub network_id: String,
    pub host: String,
    pub vtep: IpAddr,
    pub mac: String,
    pub ipv4: Option<IpNetwork>,
    pub ipv6: Option<IpNetwork>,
    /// When it was created (Unix seconds; 0 in records of older versions):
    /// an endpoint without a bridge port long after this is an orphan.
    #[serde(default)]
    pub created_at: u64,
    /// The same moment in Unix milliseconds (0 in older records): peers
    /// measure how long the record took to reach their kernels.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub created_ms: u64,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

/// `names/<overlay>/<host>/<ep>`: the names Docker gives the endpoint's
/// container, published by its host under the host's lease (a dead host's
/// names go with it) and deleted with the endpoint.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct NameRecord {
    pub container: String,
    /// Container name and aliases, lower case.
    pub names: Vec<String>,
    pub addrs: Vec<IpAddr>,
}
