//! Cluster-wide IPAM on the store.
//!
//! Uniqueness comes from store transactions alone: an address is taken by
//! creating its key under a compare that it is absent. Nothing relies on a
//! process-local lock for correctness; the per-pool local mutex only keeps this
//! host's own requests from racing each other for the same cursor revision.
//!
//! Cost: a pool keeps a cursor (`next`, the lowest offset never claimed), each
//! host's claimed run of it (a few offsets taken from the cursor in one step,
//! handed out without writing the cursor: see `alloc`), and a FIFO queue of
//! released addresses. A fresh address is one transaction; a reused one is a
//! read of the queue head plus one transaction. Neither scans the pool or the
//! taken addresses, so a /16 with 10,000 addresses taken costs what an empty
//! /24 costs. Released addresses are reused only once the cursor has none
//! left, oldest release first, so peers' ARP caches have the longest time to
//! forget them.

mod address;
mod alloc;
mod math;
mod pool;

pub use pool::PoolRequest;

use crate::error::{PluginError, Result, StoreContext};
use crate::state::codec::decode;
use crate::state::fence::GoneHostFence;
use crate::state::keys;
use crate::state::records::PoolRecord;
use alloc::CursorCell;
use ipnetwork::{IpNetwork, Ipv4Network};
use kvstore_backends::{KvStore, Revision};
use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr};
use std::sync::{Arc, Mutex};

pub struct Ipam {
    store: Arc<dyn KvStore>,
    host: String,
    default_pool: Ipv4Network,
    default_pool_size: u8,
    cursors: Mutex<HashMap<String, CursorCell>>,
    /// Serialises this host's changes to its pool references, so that after
    /// a lost answer the count says whether the change applied: nobody else
    /// changes this host's count.
    refs_lock: tokio::sync::Mutex<()>,
    /// Set when acting for a gone host (reclaim): its releases only happen
    /// while the host is still unregistered.
    fence: Option<GoneHostFence>,
}

/// How full a pool is (see [`Ipam::usage`]).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct PoolUsage {
    pub pool: String,
    pub used: u64,
    pub size: u128,
}

impl PoolUsage {
    pub fn free(&self) -> u128 {
        self.size.saturating_sub(u128::from(self.used))
    }
}

/// How full a pool is: its dynamic addresses (the `--ip-range`, or the
/// subnet without network and broadcast: what `docker run` without `--ip`
/// can get) and how many of them are taken cluster-wide, by containers, the
/// gateway or aux addresses (`taken`: the pool's `addr/` keys).
pub fn usage_of(rec: &PoolRecord, taken: impl Iterator<Item = IpAddr>) -> PoolUsage {
    let span = math::Span::of(rec);
    PoolUsage {
        pool: pool_id(&rec.subnet),
        used: taken.filter(|ip| span.offset(*ip).is_some()).count() as u64,
        size: span.len,
    }
}

/// The canonical pool ID of a subnet: its CIDR with host bits cleared.
pub fn pool_id(subnet: &IpNetwork) -> String {
    format!("{}/{}", subnet.network(), subnet.prefix())
}

/// Parse a PoolID we handed out.
pub fn parse_pool_id(pool_id: &str) -> Result<IpNetwork> {
    let net: IpNetwork = pool_id.parse().map_err(|_| {
        PluginError::BadRequest(format!(
            "PoolID {pool_id:?} is not a rustoverlay pool (expected a subnet such as 10.77.0.0/24)"
        ))
    })?;
    if net.ip() != net.network() {
        return Err(PluginError::BadRequest(format!(
            "PoolID {pool_id:?} is not a rustoverlay pool (host bits set)"
        )));
    }
    Ok(net)
}

impl Ipam {
    pub fn new(
        store: Arc<dyn KvStore>,
        host: impl Into<String>,
        default_pool: Ipv4Network,
        default_pool_size: u8,
    ) -> Self {
        Ipam {
            store,
            host: host.into(),
            default_pool,
            default_pool_size,
            cursors: Mutex::new(HashMap::new()),
            refs_lock: tokio::sync::Mutex::new(()),
            fence: None,
        }
    }

    /// An IPAM that releases on behalf of `host`, a host that is gone: every
    /// write it makes requires that `host` is still unregistered.
    pub fn acting_for_gone_host(store: Arc<dyn KvStore>, host: &str) -> Self {
        let mut ipam = Ipam::releasing_for(store, host);
        ipam.fence = Some(GoneHostFence::new(host));
        ipam
    }

    /// An IPAM used only to release on behalf of `host` (gc, reclaim): it
    /// never hands out subnets, so it needs no default pool.
    pub fn releasing_for(store: Arc<dyn KvStore>, host: &str) -> Self {
        let unused = Ipv4Network::new(Ipv4Addr::UNSPECIFIED, 0).expect("0.0.0.0/0 is valid");
        Ipam::new(store, host, unused, 24)
    }

    pub fn host(&self) -> &str {
        &self.host
    }

    fn cursor_cell(&self, pool: &str) -> CursorCell {
        let mut map = self.cursors.lock().unwrap_or_else(|e| e.into_inner());
        map.entry(pool.to_string()).or_default().clone()
    }

    fn forget_cursor(&self, pool: &str) {
        let mut map = self.cursors.lock().unwrap_or_else(|e| e.into_inner());
        map.remove(pool);
    }

    /// Read and decode a pool record with its revision.
    pub async fn read_pool(&self, seg: &str) -> Result<Option<(PoolRecord, Revision)>> {
        let kv = self
            .store
            .get(&keys::pool_record(seg))
            .await
            .ctx(|| format!("read pool {seg}"))?;
        kv.map(|kv| Ok((decode::<PoolRecord>(&kv)?, kv.mod_revision)))
            .transpose()
    }

    /// How full a pool is (see [`usage_of`]). Two reads. `None` when the
    /// pool is not claimed.
    pub async fn usage(&self, subnet: &IpNetwork) -> Result<Option<PoolUsage>> {
        let seg = keys::subnet_segment(subnet);
        let Some((rec, _)) = self.read_pool(&seg).await? else {
            return Ok(None);
        };
        let prefix = keys::pool_addr_prefix(&seg);
        let taken = self
            .store
            .range(&prefix)
            .await
            .ctx(|| format!("list the addresses of pool {seg}"))?;
        let ips = taken
            .kvs
            .iter()
            .filter_map(|kv| kv.key.strip_prefix(prefix.as_str())?.parse().ok());
        Ok(Some(usage_of(&rec, ips)))
    }

    async fn read_known_pool(
        &self,
        pool_id: &str,
    ) -> Result<(IpNetwork, String, PoolRecord, Revision)> {
        let subnet = parse_pool_id(pool_id)?;
        let seg = keys::subnet_segment(&subnet);
        match self.read_pool(&seg).await? {
            Some((rec, rev)) => Ok((subnet, seg, rec, rev)),
            None => Err(unclaimed(pool_id)),
        }
    }
}

fn unclaimed(pool_id: &str) -> PluginError {
    PluginError::Unknown(format!(
        "pool {pool_id} is not claimed (never requested, or already released); recreate the network"
    ))
}

fn pool_gone(seg: &str) -> PluginError {
    PluginError::Unknown(format!(
        "pool {} was released while in use; recreate the network",
        seg.replace('_', "/")
    ))
}

fn too_contended(what: &str) -> PluginError {
    PluginError::Conflict(format!(
        "could not {what}: the store kept changing under heavy contention; retry"
    ))
}
