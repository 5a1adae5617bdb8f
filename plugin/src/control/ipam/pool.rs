//! Subnets: claiming one cluster-wide (or taking another reference on it),
//! picking one from the default pool, and releasing the last reference.

use super::math::{host_bounds, overlaps};
use super::{pool_id, too_contended, Ipam};
use crate::error::{PluginError, Result, StoreContext};
use crate::state::codec::{decode_or_default, encode};
use crate::state::fence::GoneHostFence;
use crate::state::keys;
use crate::state::records::{AllocState, PoolIndex, PoolRecord};
use crate::util::backoff::{until_read, Retry};
use ipnetwork::{IpNetwork, Ipv4Network};
use kvstore_backends::{Compare, Op, Txn};
use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;

/// What RequestPool asks for, parsed and validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PoolRequest {
    pub subnet: Option<IpNetwork>,
    pub range: Option<IpNetwork>,
    pub v6: bool,
}

impl PoolRequest {
    /// Check what the subnets say together; `subnet` and `range` are
    /// canonical (host bits cleared).
    pub fn new(subnet: Option<IpNetwork>, range: Option<IpNetwork>, v6: bool) -> Result<Self> {
        match (subnet, range) {
            (None, Some(_)) => {
                return Err(PluginError::BadRequest(
                    "an --ip-range needs a --subnet that contains it".into(),
                ))
            }
            (Some(s), Some(r))
                if s.is_ipv4() != r.is_ipv4()
                    || !(s.contains(r.network()) && s.prefix() <= r.prefix()) =>
            {
                return Err(PluginError::BadRequest(format!(
                    "--ip-range {} is not inside --subnet {}",
                    pool_id(&r),
                    pool_id(&s)
                )));
            }
            _ => {}
        }
        if let Some(s) = subnet {
            if s.is_ipv6() != v6 {
                let fam = if v6 { "IPv6" } else { "IPv4" };
                return Err(PluginError::BadRequest(format!(
                    "subnet {} is not an {fam} subnet, but Docker asked for an {fam} pool",
                    pool_id(&s)
                )));
            }
            let (first, last) = host_bounds(&s);
            if last < first {
                return Err(PluginError::BadRequest(format!(
                    "subnet {} has no usable address",
                    pool_id(&s)
                )));
            }
        } else if v6 {
            return Err(PluginError::BadRequest(
                "IPv6 networks need an explicit subnet: add --ipv6 --subnet fdXX:XXXX::/64".into(),
            ));
        }
        Ok(PoolRequest { subnet, range, v6 })
    }
}

impl Ipam {
    /// Claim a subnet (or take another reference on it). Returns the pool's
    /// record as it stands after the call.
    #[tracing::instrument(skip(self), fields(host = %self.host))]
    pub async fn request_pool(&self, req: &PoolRequest) -> Result<PoolRecord> {
        let _refs = self.refs_lock.lock().await;
        let mut retry = Retry::new();
        while retry.next().await {
            let index_kv = self
                .store
                .get(&keys::pools_index())
                .await
                .ctx(|| "read the pool index".into())?;
            let (index, index_rev) = decode_or_default::<PoolIndex>(index_kv.as_ref())?;
            let claimed: Vec<IpNetwork> =
                index.pools.iter().filter_map(|p| p.parse().ok()).collect();

            let subnet = match req.subnet {
                Some(s) => s,
                None => self.next_free_subnet(&claimed)?,
            };
            let id = pool_id(&subnet);
            let seg = keys::subnet_segment(&subnet);

            if req.subnet.is_some() && index.pools.contains(&id) {
                if let Some(rec) = self.add_pool_ref(&seg, req).await? {
                    return Ok(rec);
                }
                continue;
            }
            if let Some(other) = claimed.iter().find(|c| overlaps(c, &subnet)) {
                return Err(PluginError::Conflict(format!(
                    "subnet {id} overlaps subnet {} already used by a rustoverlay network; \
                     pick a subnet that does not overlap it, or use exactly {} to join that network",
                    pool_id(other),
                    pool_id(other)
                )));
            }

            let record = PoolRecord {
                subnet,
                range: req.range,
                gateway: None,
                aux: BTreeSet::new(),
                refs: BTreeMap::from([(self.host.clone(), 1)]),
            };
            let mut new_index = index.clone();
            new_index.pools.insert(id.clone());
            let txn = Txn::new()
                .when(vec![
                    Compare::mod_revision(keys::pools_index(), index_rev),
                    Compare::absent(keys::pool_record(&seg)),
                ])
                .and_then(vec![
                    Op::put(keys::pools_index(), encode(&new_index)),
                    Op::put(keys::pool_record(&seg), encode(&record)),
                    Op::put(keys::pool_alloc(&seg), encode(&AllocState::default())),
                ]);
            let resp = match self.store.txn(txn).await {
                Ok(resp) => resp,
                // The answer was lost: a record with this host's reference
                // is this claim's (nobody else writes this host's count).
                Err(e) if e.may_have_applied() => {
                    match until_read(|| self.read_pool(&seg)).await? {
                        Some((rec, _)) if rec.refs.contains_key(&self.host) => return Ok(rec),
                        _ => continue,
                    }
                }
                Err(e) => return Err(e).ctx(|| format!("claim subnet {id}")),
            };
            if resp.succeeded {
                tracing::info!(pool = %id, "claimed subnet");
                return Ok(record);
            }
        }
        Err(too_contended("claim a subnet"))
    }

    /// One more reference on an existing pool. `Ok(None)` when the pool went
    /// away in between (the caller starts over).
    async fn add_pool_ref(&self, seg: &str, req: &PoolRequest) -> Result<Option<PoolRecord>> {
        let mut retry = Retry::new();
        while retry.next().await {
            let Some((mut rec, rev)) = self.read_pool(seg).await? else {
                return Ok(None);
            };
            if rec.range != req.range {
                return Err(PluginError::Conflict(format!(
                    "subnet {} is already used with {}; use the same --ip-range on every host",
                    pool_id(&rec.subnet),
                    match rec.range {
                        Some(r) => format!("--ip-range {}", pool_id(&r)),
                        None => "no --ip-range".into(),
                    }
                )));
            }
            let count = rec.refs.entry(self.host.clone()).or_insert(0);
            *count += 1;
            let wanted = *count;
            let written = self
                .store
                .compare_and_swap(&keys::pool_record(seg), rev, encode(&rec))
                .await;
            match written {
                Ok(Ok(_)) => return Ok(Some(rec)),
                Ok(Err(_)) => {}
                // The answer was lost: this host's count says whether it
                // applied (callers hold `refs_lock`).
                Err(e) if e.may_have_applied() => match until_read(|| self.read_pool(seg)).await? {
                    None => return Ok(None),
                    Some((now, _)) if now.refs.get(&self.host) == Some(&wanted) => {
                        return Ok(Some(now))
                    }
                    Some(_) => {}
                },
                Err(e) => {
                    return Err(e)
                        .ctx(|| format!("add a reference to pool {}", pool_id(&rec.subnet)))
                }
            }
        }
        Err(too_contended("reference a pool"))
    }

    fn next_free_subnet(&self, claimed: &[IpNetwork]) -> Result<IpNetwork> {
        let size = self.default_pool_size;
        let base = u32::from(self.default_pool.network());
        let count: u64 = 1u64 << (size - self.default_pool.prefix());
        let step: u64 = 1u64 << (32 - size as u32);
        for i in 0..count {
            let addr = Ipv4Addr::from((base as u64 + i * step) as u32);
            let cand = IpNetwork::V4(Ipv4Network::new(addr, size).map_err(|e| {
                PluginError::Internal(format!("default pool candidate {addr}/{size}: {e}"))
            })?);
            if !claimed.iter().any(|c| overlaps(c, &cand)) {
                return Ok(cand);
            }
        }
        Err(PluginError::Exhausted(format!(
            "no free /{size} subnet left in the default pool {}; give the network an explicit --subnet \
             or start the plugin with a larger --default-pool",
            self.default_pool
        )))
    }

    /// Drop this host's reference; the last reference frees the subnet and
    /// everything allocated in it.
    #[tracing::instrument(skip(self), fields(host = %self.host))]
    pub async fn release_pool(&self, pool_id: &str) -> Result<()> {
        let _refs = self.refs_lock.lock().await;
        let mut retry = Retry::new();
        while retry.next().await {
            GoneHostFence::check(&self.fence, self.store.as_ref()).await?;
            let (subnet, seg, mut rec, rev) = self.read_known_pool(pool_id).await?;
            match rec.refs.get_mut(&self.host) {
                None | Some(0) => {
                    return Err(PluginError::Unknown(format!(
                        "pool {pool_id} holds no reference from host {} (released twice?)",
                        self.host
                    )))
                }
                Some(n) if *n > 1 => *n -= 1,
                Some(_) => {
                    rec.refs.remove(&self.host);
                }
            }
            let txn = if rec.refs.is_empty() {
                let index_kv = self
                    .store
                    .get(&keys::pools_index())
                    .await
                    .ctx(|| "read the pool index".into())?;
                let (mut index, index_rev) = decode_or_default::<PoolIndex>(index_kv.as_ref())?;
                index.pools.remove(&super::pool_id(&subnet));
                Txn::new()
                    .when(vec![
                        Compare::mod_revision(keys::pools_index(), index_rev),
                        Compare::mod_revision(keys::pool_record(&seg), rev),
                    ])
                    .and_then(vec![
                        Op::put(keys::pools_index(), encode(&index)),
                        Op::delete_prefix(keys::pool_prefix(&seg)),
                    ])
            } else {
                Txn::new()
                    .when(vec![Compare::mod_revision(keys::pool_record(&seg), rev)])
                    .and_then(vec![Op::put(keys::pool_record(&seg), encode(&rec))])
            };
            let left = rec.refs.get(&self.host).copied();
            let resp = match self.store.txn(GoneHostFence::apply(&self.fence, txn)).await {
                Ok(resp) => resp,
                // The answer was lost: this host's count (or the pool gone
                // with its last reference) says whether it applied.
                Err(e) if e.may_have_applied() => {
                    match until_read(|| self.read_pool(&seg)).await? {
                        None => return Ok(()),
                        Some((now, _)) if now.refs.get(&self.host).copied() == left => {
                            return Ok(())
                        }
                        Some(_) => continue,
                    }
                }
                Err(e) => return Err(e).ctx(|| format!("release pool {pool_id}")),
            };
            if resp.succeeded {
                if rec.refs.is_empty() {
                    self.forget_cursor(&seg);
                    tracing::info!(pool = %pool_id, "released subnet");
                }
                return Ok(());
            }
        }
        Err(too_contended("release a pool"))
    }
}
