//! Cluster-wide IPAM on the store.
//!
//! Uniqueness comes from store transactions alone: an address is taken by
//! creating its key under a compare that it is absent, in the same transaction
//! that advances the pool's allocation cursor. Nothing relies on a
//! process-local lock for correctness; the per-pool local mutex only keeps this
//! host's own requests from racing each other for the same cursor revision.
//!
//! Cost: a pool keeps a cursor (`next`, the lowest offset never handed out)
//! and a FIFO queue of released addresses. A fresh address is one transaction;
//! a reused one is a read of the queue head plus one transaction. Neither scans
//! the pool or the taken addresses, so a /16 with 10,000 addresses taken costs
//! what an empty /24 costs. Released addresses are reused only once the pool
//! has no never-used address left, oldest release first, so peers' ARP caches
//! have the longest time to forget them.

use crate::error::{PluginError, Result, StoreContext};
use crate::keys;
use crate::reclaim::Guard;
use ipnetwork::{IpNetwork, Ipv4Network};
use kvstore_backends::{Compare, KeyValue, KvStore, Op, OpResult, Revision, Txn};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::sync::{Arc, Mutex};

/// The address spaces we report to Docker.
pub const LOCAL_ADDRESS_SPACE: &str = "RustOverlayLocal";
pub const GLOBAL_ADDRESS_SPACE: &str = "RustOverlayGlobal";

/// The subnets claimed cluster-wide, changed only by compare-and-swap so that
/// two hosts can never claim overlapping subnets at once.
#[derive(Debug, Default, Clone, Serialize, Deserialize)]
struct PoolIndex {
    /// Pool ID (the canonical CIDR) of every claimed subnet.
    pools: BTreeSet<String>,
}

/// One claimed subnet.
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

/// The allocation cursor and the bounds of the released-address queue.
#[derive(Debug, Default, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
struct AllocState {
    /// Offset (within the dynamic range) of the lowest never-used address.
    next: u128,
    free_head: u64,
    free_tail: u64,
}

/// Who holds an address, for `gc` and for people reading the store.
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
    Address,
}

/// What RequestPool asks for, parsed and validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PoolRequest {
    pub subnet: Option<IpNetwork>,
    pub range: Option<IpNetwork>,
    pub v6: bool,
}

/// The dynamic range of a pool as integer bounds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Span {
    first: u128,
    len: u128,
    v6: bool,
}

impl Span {
    fn of(record: &PoolRecord) -> Span {
        let (first, last) = host_bounds(&record.subnet);
        let (first, last) = match record.range {
            Some(r) => {
                let (rf, rl) = net_bounds(&r);
                (first.max(rf), last.min(rl))
            }
            None => (first, last),
        };
        Span {
            first,
            len: if last >= first { last - first + 1 } else { 0 },
            v6: record.subnet.is_ipv6(),
        }
    }

    fn ip(&self, offset: u128) -> IpAddr {
        to_ip(self.first + offset, self.v6)
    }

    fn offset(&self, ip: IpAddr) -> Option<u128> {
        let n = to_u128(ip);
        (n >= self.first && n - self.first < self.len).then(|| n - self.first)
    }
}

/// Cached knowledge about one pool on this host: immutable facts (subnet and
/// range never change while the pool exists) and the last cursor we saw.
#[derive(Debug, Clone, Copy)]
struct Cursor {
    span: Span,
    subnet: IpNetwork,
    state: AllocState,
    revision: Revision,
    /// Create revision of the cursor key: tells a re-claimed pool (whose
    /// range may differ) from the one cached.
    created: Revision,
}

/// Builds compares and ops that ride along in an allocating transaction.
type ExtraOps<'a> = dyn Fn(IpAddr) -> (Vec<Compare>, Vec<Op>) + Send + Sync + 'a;

type CursorCell = Arc<tokio::sync::Mutex<Option<Cursor>>>;

pub struct Ipam {
    store: Arc<dyn KvStore>,
    host: String,
    default_pool: Ipv4Network,
    default_pool_size: u8,
    cursors: Mutex<HashMap<String, CursorCell>>,
    /// Set when acting for a gone host (reclaim): its releases only happen
    /// while the host is still unregistered.
    guard: Option<Guard>,
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
            guard: None,
        }
    }

    /// An IPAM that releases on behalf of `host`, a host that is gone: every
    /// write it makes requires that `host` is still unregistered.
    pub fn acting_for_gone_host(store: Arc<dyn KvStore>, host: &str) -> Self {
        let mut ipam = Ipam::releasing_for(store, host);
        ipam.guard = Some(Guard::host_gone(host));
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

    /// Validate a RequestPool's fields into a [`PoolRequest`].
    pub fn parse_pool_request(pool: &str, sub_pool: &str, v6: bool) -> Result<PoolRequest> {
        let parse = |what: &str, s: &str| -> Result<IpNetwork> {
            let net: IpNetwork = s
                .contains('/')
                .then(|| s.parse().ok())
                .flatten()
                .ok_or_else(|| {
                    PluginError::BadRequest(format!(
                        "{what} {s:?} is not a valid subnet in CIDR form (e.g. 10.77.0.0/24)"
                    ))
                })?;
            IpNetwork::new(net.network(), net.prefix())
                .map_err(|e| PluginError::BadRequest(format!("{what} {s:?}: {e}")))
        };
        let subnet = match pool.trim() {
            "" => None,
            s => Some(parse("subnet", s)?),
        };
        let range = match sub_pool.trim() {
            "" => None,
            s => Some(parse("ip-range", s)?),
        };
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

    /// Claim a subnet (or take another reference on it). Returns the pool's
    /// record as it stands after the call.
    #[tracing::instrument(skip(self), fields(host = %self.host))]
    pub async fn request_pool(&self, req: &PoolRequest) -> Result<PoolRecord> {
        let mut retry = crate::backoff::Retry::new();
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
            let resp = self
                .store
                .txn(txn)
                .await
                .ctx(|| format!("claim subnet {id}"))?;
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
        let mut retry = crate::backoff::Retry::new();
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
            *rec.refs.entry(self.host.clone()).or_insert(0) += 1;
            let resp = self
                .store
                .compare_and_swap(&keys::pool_record(seg), rev, encode(&rec))
                .await
                .ctx(|| format!("add a reference to pool {}", pool_id(&rec.subnet)))?;
            if resp.is_ok() {
                return Ok(Some(rec));
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

    /// Drop this host's reference; the last reference frees the subnet and
    /// everything allocated in it.
    #[tracing::instrument(skip(self), fields(host = %self.host))]
    pub async fn release_pool(&self, pool_id: &str) -> Result<()> {
        let mut retry = crate::backoff::Retry::new();
        while retry.next().await {
            Guard::check(&self.guard, self.store.as_ref()).await?;
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
                index.pools.remove(&crate::ipam::pool_id(&subnet));
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
            let resp = self
                .store
                .txn(Guard::apply(&self.guard, txn))
                .await
                .ctx(|| format!("release pool {pool_id}"))?;
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

    /// RequestAddress: the pool's gateway, a given address (`--ip`, aux) or
    /// the next free one. Returns the address with the pool's prefix length.
    #[tracing::instrument(skip(self), fields(host = %self.host))]
    pub async fn request_address(
        &self,
        pool_id: &str,
        wanted: Option<IpAddr>,
        gateway: bool,
    ) -> Result<IpNetwork> {
        let subnet = parse_pool_id(pool_id)?;
        if let Some(ip) = wanted {
            check_usable(&subnet, ip)?;
        }
        let ip = if gateway {
            self.request_gateway(pool_id, wanted).await?
        } else if let Some(ip) = wanted {
            self.request_specific(pool_id, ip).await?
        } else {
            let seg = keys::subnet_segment(&subnet);
            self.allocate(&seg, None)
                .await?
                .ok_or_else(|| too_contended("allocate an address"))?
        };
        IpNetwork::new(ip, subnet.prefix()).map_err(|e| PluginError::Internal(e.to_string()))
    }

    async fn request_gateway(&self, pool_id: &str, wanted: Option<IpAddr>) -> Result<IpAddr> {
        let mut retry = crate::backoff::Retry::new();
        while retry.next().await {
            let (_, seg, rec, rev) = self.read_known_pool(pool_id).await?;
            if let Some(gw) = rec.gateway {
                return match wanted {
                    Some(w) if w != gw => Err(PluginError::Conflict(format!(
                        "the network on subnet {pool_id} already has gateway {gw}; \
                         use --gateway {gw} on every host, or leave --gateway out"
                    ))),
                    _ => Ok(gw),
                };
            }
            let record_with = |gw: IpAddr| {
                let mut r = rec.clone();
                r.gateway = Some(gw);
                (
                    vec![Compare::mod_revision(keys::pool_record(&seg), rev)],
                    vec![Op::put(keys::pool_record(&seg), encode(&r))],
                )
            };
            let outcome = match wanted {
                Some(ip) => {
                    let (compares, ops) = record_with(ip);
                    self.take_specific(&seg, ip, AddressKind::Gateway, compares, ops)
                        .await?
                        .map(|_| ip)
                }
                None => self.allocate(&seg, Some(&record_with)).await?,
            };
            if let Some(ip) = outcome {
                tracing::info!(pool = %pool_id, gateway = %ip, "set the network's gateway");
                return Ok(ip);
            }
            // The record changed under us (another host set the gateway or took
            // a reference): read it again.
        }
        Err(too_contended("allocate the gateway"))
    }

    async fn request_specific(&self, pool_id: &str, ip: IpAddr) -> Result<IpAddr> {
        let mut retry = crate::backoff::Retry::new();
        while retry.next().await {
            let (_, seg, rec, rev) = self.read_known_pool(pool_id).await?;
            if rec.gateway == Some(ip) {
                return Err(PluginError::Conflict(format!(
                    "address {ip} is the gateway of the network on {pool_id}; pick another --ip"
                )));
            }
            if rec.aux.contains(&ip) {
                // Aux addresses are shared by every host of the network.
                return Ok(ip);
            }
            let compares = vec![Compare::mod_revision(keys::pool_record(&seg), rev)];
            if self
                .take_specific(&seg, ip, AddressKind::Address, compares, vec![])
                .await?
                .is_some()
            {
                return Ok(ip);
            }
        }
        Err(too_contended("allocate a given address"))
    }

    /// Take one given address. `Ok(None)` when the extra compares failed (the
    /// caller re-reads and retries); a conflict when the address is taken.
    async fn take_specific(
        &self,
        seg: &str,
        ip: IpAddr,
        kind: AddressKind,
        mut compares: Vec<Compare>,
        mut ops: Vec<Op>,
    ) -> Result<Option<()>> {
        let addr_key = keys::pool_addr(seg, ip);
        compares.push(Compare::absent(&addr_key));
        ops.push(Op::put(&addr_key, self.address_record(kind)));
        let resp = self
            .store
            .txn(
                Txn::new()
                    .when(compares)
                    .and_then(ops)
                    .or_else(vec![Op::get(&addr_key)]),
            )
            .await
            .ctx(|| format!("allocate address {ip}"))?;
        if resp.succeeded {
            return Ok(Some(()));
        }
        if let Some(OpResult::Get(Some(kv))) = resp.results.first() {
            let holder = decode::<AddressRecord>(kv)
                .map(|r| format!(" (held by host {})", r.host))
                .unwrap_or_default();
            return Err(PluginError::Conflict(format!(
                "address {ip} is already in use{holder}; pick another --ip or leave --ip out"
            )));
        }
        Ok(None)
    }

    fn address_record(&self, kind: AddressKind) -> Vec<u8> {
        encode(&AddressRecord {
            host: self.host.clone(),
            kind,
            at: crate::reclaim::unix_now(),
        })
    }

    async fn load_cursor(&self, seg: &str) -> Result<Cursor> {
        let resp = self
            .store
            .txn(Txn::new().and_then(vec![
                Op::get(keys::pool_record(seg)),
                Op::get(keys::pool_alloc(seg)),
            ]))
            .await
            .ctx(|| format!("read pool {seg}"))?;
        let mut results = resp.results.into_iter();
        match (results.next(), results.next()) {
            (Some(OpResult::Get(Some(rec))), Some(OpResult::Get(Some(alloc)))) => {
                let rec: PoolRecord = decode(&rec)?;
                Ok(Cursor {
                    span: Span::of(&rec),
                    subnet: rec.subnet,
                    state: decode(&alloc)?,
                    revision: alloc.mod_revision,
                    created: alloc.create_revision,
                })
            }
            _ => Err(unclaimed(&seg.replace('_', "/"))),
        }
    }

    /// Hand out the next free address of a pool. `extra` adds compares and ops
    /// to the allocating transaction (the gateway request records the gateway
    /// in the same step); `Ok(None)` when only those compares failed, so the
    /// caller re-reads what they were built from and retries.
    async fn allocate(&self, seg: &str, extra: Option<&ExtraOps<'_>>) -> Result<Option<IpAddr>> {
        let cell = self.cursor_cell(seg);
        let mut guard = cell.lock().await;
        let mut skip: u128 = 0;
        let mut retry = crate::backoff::Retry::new();
        while retry.next().await {
            let cur = match *guard {
                Some(c) => c,
                None => {
                    let c = self.load_cursor(seg).await?;
                    *guard = Some(c);
                    c
                }
            };
            let st = cur.state;
            let alloc_key = keys::pool_alloc(seg);
            let (ip, mut compares, mut ops, new_state, free_key) =
                if st.next.saturating_add(skip) < cur.span.len {
                    let offset = st.next + skip;
                    let new_state = AllocState {
                        next: offset + 1,
                        ..st
                    };
                    (cur.span.ip(offset), vec![], vec![], new_state, None)
                } else if st.free_head < st.free_tail {
                    let free_key = keys::pool_free(seg, st.free_head);
                    let kv = self
                        .store
                        .get(&free_key)
                        .await
                        .ctx(|| format!("read the free queue of pool {seg}"))?;
                    let new_state = AllocState {
                        free_head: st.free_head + 1,
                        ..st
                    };
                    let ip = kv.as_ref().and_then(|kv| {
                        std::str::from_utf8(&kv.value)
                            .ok()
                            .and_then(|s| s.parse::<IpAddr>().ok())
                    });
                    match ip {
                        Some(ip) => (
                            ip,
                            vec![],
                            vec![Op::delete(&free_key)],
                            new_state,
                            Some(free_key),
                        ),
                        None => {
                            // A damaged or missing queue entry: drop it and move on.
                            self.advance_free_head(seg, &cur, &free_key, &mut guard)
                                .await?;
                            continue;
                        }
                    }
                } else {
                    return Err(PluginError::Exhausted(format!(
                        "no free address left in subnet {} ({} addresses, all in use); remove \
                         containers from the network or recreate it with a larger --subnet",
                        pool_id(&cur.subnet),
                        cur.span.len
                    )));
                };
            let addr_key = keys::pool_addr(seg, ip);
            let (extra_compares, extra_ops) = extra.map(|f| f(ip)).unwrap_or_default();
            let extra_used = !extra_compares.is_empty();
            compares.push(Compare::mod_revision(&alloc_key, cur.revision));
            compares.push(Compare::absent(&addr_key));
            compares.extend(extra_compares);
            ops.push(Op::put(
                &addr_key,
                self.address_record(if extra.is_some() {
                    AddressKind::Gateway
                } else {
                    AddressKind::Address
                }),
            ));
            ops.push(Op::put(&alloc_key, encode(&new_state)));
            ops.extend(extra_ops);
            let resp = self
                .store
                .txn(
                    Txn::new()
                        .when(compares)
                        .and_then(ops)
                        .or_else(vec![Op::get(&alloc_key), Op::get(&addr_key)]),
                )
                .await
                .ctx(|| format!("allocate an address in pool {seg}"))?;
            if resp.succeeded {
                *guard = Some(Cursor {
                    state: new_state,
                    revision: resp.revision,
                    ..cur
                });
                return Ok(Some(ip));
            }
            let mut results = resp.results.into_iter();
            let alloc_now = match results.next() {
                Some(OpResult::Get(kv)) => kv,
                _ => None,
            };
            let addr_taken = matches!(results.next(), Some(OpResult::Get(Some(_))));
            let Some(alloc_now) = alloc_now else {
                *guard = None;
                return Err(pool_gone(seg));
            };
            if alloc_now.create_revision != cur.created {
                // The pool was released and claimed again: start over.
                *guard = None;
                skip = 0;
            } else if alloc_now.mod_revision != cur.revision {
                // Another host allocated: continue from its cursor.
                *guard = Some(Cursor {
                    state: decode(&alloc_now)?,
                    revision: alloc_now.mod_revision,
                    ..cur
                });
                skip = 0;
            } else if addr_taken {
                match free_key {
                    // A queued address someone took with --ip meanwhile.
                    Some(k) => self.advance_free_head(seg, &cur, &k, &mut guard).await?,
                    // An address given out by --ip ahead of the cursor.
                    None => skip += 1,
                }
            } else if extra_used {
                // Only the caller's compares failed: it must re-read and retry.
                return Ok(None);
            }
        }
        Err(too_contended("allocate an address"))
    }

    async fn advance_free_head(
        &self,
        seg: &str,
        cur: &Cursor,
        free_key: &str,
        guard: &mut Option<Cursor>,
    ) -> Result<()> {
        let alloc_key = keys::pool_alloc(seg);
        let new_state = AllocState {
            free_head: cur.state.free_head + 1,
            ..cur.state
        };
        let resp = self
            .store
            .txn(
                Txn::new()
                    .when(vec![Compare::mod_revision(&alloc_key, cur.revision)])
                    .and_then(vec![
                        Op::delete(free_key),
                        Op::put(&alloc_key, encode(&new_state)),
                    ]),
            )
            .await
            .ctx(|| format!("skip a stale free-queue entry of pool {seg}"))?;
        *guard = resp.succeeded.then_some(Cursor {
            state: new_state,
            revision: resp.revision,
            ..*cur
        });
        Ok(())
    }

    /// ReleaseAddress. The gateway and aux addresses are shared by every host
    /// and freed with the pool, so releasing them is a no-op.
    #[tracing::instrument(skip(self), fields(host = %self.host))]
    pub async fn release_address(&self, pool_id: &str, ip: IpAddr) -> Result<()> {
        Guard::check(&self.guard, self.store.as_ref()).await?;
        let (subnet, seg, rec, _) = self.read_known_pool(pool_id).await?;
        if !subnet.contains(ip) {
            return Err(PluginError::BadRequest(format!(
                "address {ip} is not in pool {pool_id}"
            )));
        }
        if rec.gateway == Some(ip) || rec.aux.contains(&ip) {
            return Ok(());
        }
        let addr_key = keys::pool_addr(&seg, ip);
        let alloc_key = keys::pool_alloc(&seg);
        let mut addr = self
            .store
            .get(&addr_key)
            .await
            .ctx(|| format!("read address {ip}"))?;
        let cell = self.cursor_cell(&seg);
        let mut guard = cell.lock().await;
        let mut retry = crate::backoff::Retry::new();
        while retry.next().await {
            let Some(held) = &addr else {
                return Err(PluginError::Unknown(format!(
                    "address {ip} is not allocated in pool {pool_id} (released twice?)"
                )));
            };
            // Only the holder releases: a host back after its addresses were
            // reclaimed (and handed out again) must not free another's.
            let holder = decode::<AddressRecord>(held)?.host;
            if holder != self.host {
                return Err(PluginError::Unknown(format!(
                    "address {ip} in pool {pool_id} is held by host {holder}, not by this host ({}); nothing released",
                    self.host
                )));
            }
            let cur = match *guard {
                Some(c) => c,
                None => self.load_cursor(&seg).await?,
            };
            // Queue the address for reuse only if the cursor has passed it; one
            // ahead of the cursor (a --ip) will be reached by the cursor anyway.
            let queue = cur.span.offset(ip).is_some_and(|o| o < cur.state.next);
            let new_state = AllocState {
                free_tail: cur.state.free_tail + 1,
                ..cur.state
            };
            let mut compares = vec![Compare::mod_revision(&addr_key, held.mod_revision)];
            let mut ops = vec![Op::delete(&addr_key)];
            if queue {
                compares.push(Compare::mod_revision(&alloc_key, cur.revision));
                ops.push(Op::put(
                    keys::pool_free(&seg, cur.state.free_tail),
                    ip.to_string(),
                ));
                ops.push(Op::put(&alloc_key, encode(&new_state)));
            }
            let txn = Txn::new()
                .when(compares)
                .and_then(ops)
                .or_else(vec![Op::get(&alloc_key), Op::get(&addr_key)]);
            let resp = self
                .store
                .txn(Guard::apply(&self.guard, txn))
                .await
                .ctx(|| format!("release address {ip}"))?;
            if resp.succeeded {
                *guard = Some(if queue {
                    Cursor {
                        state: new_state,
                        revision: resp.revision,
                        ..cur
                    }
                } else {
                    cur
                });
                return Ok(());
            }
            // Lost a race: continue from what the failure branch read, not
            // from a fresh round of reads.
            Guard::check(&self.guard, self.store.as_ref()).await?;
            let mut results = resp.results.into_iter();
            *guard = match results.next() {
                Some(OpResult::Get(Some(alloc))) if alloc.create_revision == cur.created => {
                    Some(Cursor {
                        state: decode(&alloc)?,
                        revision: alloc.mod_revision,
                        ..cur
                    })
                }
                _ => None,
            };
            if let Some(OpResult::Get(now)) = results.next() {
                addr = now;
            }
        }
        Err(too_contended("release an address"))
    }

    /// Record a network's aux addresses as shared reservations of its pool, so
    /// that every other host's request for them succeeds and releasing them
    /// frees nothing until the pool goes.
    pub async fn mark_aux(&self, pool_id: &str, aux: &[IpAddr]) -> Result<()> {
        if aux.is_empty() {
            return Ok(());
        }
        let mut retry = crate::backoff::Retry::new();
        while retry.next().await {
            let (_, seg, mut rec, rev) = self.read_known_pool(pool_id).await?;
            if aux.iter().all(|ip| rec.aux.contains(ip)) {
                return Ok(());
            }
            rec.aux.extend(aux.iter().copied());
            let resp = self
                .store
                .compare_and_swap(&keys::pool_record(&seg), rev, encode(&rec))
                .await
                .ctx(|| format!("record aux addresses of pool {pool_id}"))?;
            if resp.is_ok() {
                return Ok(());
            }
        }
        Err(too_contended("record aux addresses"))
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

/// Reject addresses Docker should never ask for: outside the subnet, the
/// network address or the IPv4 broadcast address.
fn check_usable(subnet: &IpNetwork, ip: IpAddr) -> Result<()> {
    let (first, last) = host_bounds(subnet);
    let n = to_u128(ip);
    if ip.is_ipv4() != subnet.is_ipv4() || !subnet.contains(ip) {
        return Err(PluginError::BadRequest(format!(
            "address {ip} is not in subnet {}",
            pool_id(subnet)
        )));
    }
    if n < first || n > last {
        return Err(PluginError::BadRequest(format!(
            "address {ip} is the network or broadcast address of {}; pick an address between {} and {}",
            pool_id(subnet),
            to_ip(first, subnet.is_ipv6()),
            to_ip(last, subnet.is_ipv6())
        )));
    }
    Ok(())
}

fn to_u128(ip: IpAddr) -> u128 {
    match ip {
        IpAddr::V4(v4) => u32::from(v4) as u128,
        IpAddr::V6(v6) => u128::from(v6),
    }
}

fn to_ip(n: u128, v6: bool) -> IpAddr {
    if v6 {
        IpAddr::V6(Ipv6Addr::from(n))
    } else {
        IpAddr::V4(Ipv4Addr::from(n as u32))
    }
}

/// First and last address of a subnet.
fn net_bounds(net: &IpNetwork) -> (u128, u128) {
    let bits: u32 = if net.is_ipv4() { 32 } else { 128 };
    let host_bits = bits - net.prefix() as u32;
    let first = to_u128(net.network());
    let span = if host_bits == 128 {
        u128::MAX
    } else {
        (1u128 << host_bits) - 1
    };
    (first, first + span)
}

/// First and last address containers may get: without the network address,
/// and for IPv4 without broadcast (except on /31 and /32).
fn host_bounds(net: &IpNetwork) -> (u128, u128) {
    let (first, last) = net_bounds(net);
    match net {
        IpNetwork::V4(n) if n.prefix() >= 31 => (first, last),
        IpNetwork::V4(_) => (first + 1, last - 1),
        IpNetwork::V6(n) if n.prefix() >= 127 => (first, last),
        IpNetwork::V6(_) => (first + 1, last),
    }
}

fn overlaps(a: &IpNetwork, b: &IpNetwork) -> bool {
    if a.is_ipv4() != b.is_ipv4() {
        return false;
    }
    let (af, al) = net_bounds(a);
    let (bf, bl) = net_bounds(b);
    af <= bl && bf <= al
}

pub(crate) fn encode<T: Serialize>(v: &T) -> Vec<u8> {
    serde_json::to_vec(v).expect("plain data always serializes")
}

pub(crate) fn decode<T: serde::de::DeserializeOwned>(kv: &KeyValue) -> Result<T> {
    serde_json::from_slice(&kv.value).map_err(|e| {
        PluginError::Internal(format!(
            "store key {} holds data this version cannot read: {e}",
            kv.key
        ))
    })
}

fn decode_or_default<T: serde::de::DeserializeOwned + Default>(
    kv: Option<&KeyValue>,
) -> Result<(T, Revision)> {
    match kv {
        Some(kv) => Ok((decode(kv)?, kv.mod_revision)),
        None => Ok((T::default(), 0)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn net(s: &str) -> IpNetwork {
        s.parse().unwrap()
    }

    #[test]
    fn host_bounds_skip_network_and_broadcast() {
        let (f, l) = host_bounds(&net("10.77.0.0/24"));
        assert_eq!(to_ip(f, false).to_string(), "10.77.0.1");
        assert_eq!(to_ip(l, false).to_string(), "10.77.0.254");
        let (f, l) = host_bounds(&net("10.77.0.0/31"));
        assert_eq!(l - f, 1);
        let (f, _) = host_bounds(&net("fd00::/64"));
        assert_eq!(to_ip(f, true).to_string(), "fd00::1");
    }

    #[test]
    fn overlap_detection() {
        assert!(overlaps(&net("10.0.0.0/16"), &net("10.0.1.0/24")));
        assert!(overlaps(&net("10.0.1.0/24"), &net("10.0.0.0/16")));
        assert!(!overlaps(&net("10.0.0.0/24"), &net("10.0.1.0/24")));
        assert!(!overlaps(&net("10.0.0.0/8"), &net("fd00::/8")));
    }

    #[test]
    fn span_honours_ip_range() {
        let rec = PoolRecord {
            subnet: net("10.77.0.0/24"),
            range: Some(net("10.77.0.128/25")),
            gateway: None,
            aux: BTreeSet::new(),
            refs: BTreeMap::new(),
        };
        let span = Span::of(&rec);
        assert_eq!(span.ip(0).to_string(), "10.77.0.128");
        // The subnet's broadcast address stays out even inside the range.
        assert_eq!(span.len, 127);
        assert_eq!(span.offset("10.77.0.127".parse().unwrap()), None);
    }

    #[test]
    fn pool_request_validation() {
        assert!(Ipam::parse_pool_request("", "10.0.0.0/24", false).is_err());
        assert!(Ipam::parse_pool_request("10.0.0.0/24", "10.0.1.0/25", false).is_err());
        assert!(Ipam::parse_pool_request("10.0.0.0/24", "", true).is_err());
        assert!(Ipam::parse_pool_request("bogus", "", false).is_err());
        assert!(Ipam::parse_pool_request("", "", true).is_err());
        let r = Ipam::parse_pool_request("10.0.0.7/24", "10.0.0.128/25", false).unwrap();
        assert_eq!(r.subnet, Some(net("10.0.0.0/24")));
    }
}
