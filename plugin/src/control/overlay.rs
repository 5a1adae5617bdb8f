//! The network and endpoint model in the store.
//!
//! Docker gives every host its own NetworkID for what the user sees as one
//! network (the driver's Scope is local). We tie them together by subnet: one
//! overlay per pool, named by that pool, with one VNI allocated cluster-wide.
//! Each host maps its Docker NetworkIDs onto the overlay; endpoints live under
//! the overlay so that every host can watch one prefix per network.

use crate::error::{PluginError, Result, StoreContext};
use crate::state::codec::{decode, encode, take_gets};
use crate::state::fence::GoneHostFence;
use crate::state::keys;
use crate::state::records::{EndpointRecord, LocalNetwork, OverlayRecord};
use crate::util::backoff::{until_read, Retry};
use ipnetwork::IpNetwork;
use kvstore_backends::{Compare, KvStore, Op, OpResult, Revision, Txn};
use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};

/// VNIs we hand out; below 256 is left to hand-made setups, as Docker does.
pub const VNI_MIN: u32 = 256;
pub const VNI_MAX: u32 = (1 << 24) - 1;

pub struct Overlays {
    store: Arc<dyn KvStore>,
    host: String,
    /// Docker NetworkID -> overlay, filled from the store on a miss.
    cache: Mutex<HashMap<String, LocalNetwork>>,
    /// Set when acting for a gone host (reclaim).
    fence: Option<GoneHostFence>,
}

impl Overlays {
    pub fn new(store: Arc<dyn KvStore>, host: impl Into<String>) -> Self {
        Overlays {
            store,
            host: host.into(),
            cache: Mutex::new(HashMap::new()),
            fence: None,
        }
    }

    /// Overlays as seen by `host`, a host that is gone: every removal it makes
    /// requires that `host` is still unregistered.
    pub fn acting_for_gone_host(store: Arc<dyn KvStore>, host: &str) -> Self {
        let mut o = Overlays::new(store, host);
        o.fence = Some(GoneHostFence::new(host));
        o
    }

    fn cached(&self, network_id: &str) -> Option<LocalNetwork> {
        self.cache
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(network_id)
            .cloned()
    }

    fn remember(&self, net: &LocalNetwork) {
        self.cache
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(net.network_id.clone(), net.clone());
    }

    /// Drop every cached mapping: after a lost lease the store may no longer
    /// hold them (reclaimed while this host was cut off).
    pub fn forget_all(&self) {
        self.cache.lock().unwrap_or_else(|e| e.into_inner()).clear();
    }

    fn forget(&self, network_id: &str) {
        self.cache
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(network_id);
    }

    /// Join this host's Docker network to the overlay of its subnets, creating
    /// the overlay (and its VNI) if this is the first host. Idempotent.
    pub async fn create_network(
        &self,
        network_id: &str,
        subnets: Vec<IpNetwork>,
    ) -> Result<LocalNetwork> {
        self.create_network_as(network_id, subnets, false).await
    }

    /// [`Overlays::create_network`], for a network defined once for every
    /// host when `cluster` is set.
    #[tracing::instrument(skip(self, subnets), fields(host = %self.host))]
    pub async fn create_network_as(
        &self,
        network_id: &str,
        subnets: Vec<IpNetwork>,
        cluster: bool,
    ) -> Result<LocalNetwork> {
        let first = subnets
            .first()
            .ok_or_else(|| PluginError::BadRequest("the network has no subnet".into()))?;
        let overlay = keys::subnet_segment(first);
        let map_key = keys::host_network(&self.host, network_id);
        let rec_key = keys::overlay_record(&overlay);
        let mut retry = Retry::new();
        // Set after a write whose answer was lost: the next read must get
        // through, since it alone tells whether that write applied.
        let mut lost_answer = false;
        while retry.next().await {
            let read = || {
                self.store.txn(Txn::new().and_then(vec![
                    Op::get(&map_key),
                    Op::get(&rec_key),
                    Op::get(keys::vni_next()),
                ]))
            };
            let resp = if lost_answer {
                until_read(read).await
            } else {
                read().await
            }
            .ctx(|| format!("read overlay {overlay}"))?;
            let [mapping, record, next] = take_gets::<3>(resp.results);
            if let Some(kv) = mapping {
                let net: LocalNetwork = decode(&kv)?;
                if net.overlay != overlay {
                    return Err(PluginError::Conflict(format!(
                        "network {network_id} already exists on this host with subnet {}",
                        net.subnets
                            .first()
                            .map(|s| s.to_string())
                            .unwrap_or_default()
                    )));
                }
                self.remember(&net);
                return Ok(net);
            }
            let (mut rec, rec_rev, mut extra_compares, mut extra_ops) = match record {
                Some(kv) => {
                    let rec: OverlayRecord = decode(&kv)?;
                    if rec.subnets != subnets {
                        return Err(PluginError::Conflict(format!(
                            "subnet {first} already belongs to a rustoverlay network with subnets {}; \
                             create the network with exactly the same --subnet options on every host",
                            join(&rec.subnets)
                        )));
                    }
                    (rec, kv.mod_revision, vec![], vec![])
                }
                None => {
                    self.refuse_subnets_of_other_overlays(&overlay, &subnets)
                        .await?;
                    let (vni, next_rev) = match &next {
                        Some(kv) => (decode::<u32>(kv)?, kv.mod_revision),
                        None => (VNI_MIN, 0),
                    };
                    let vni = if (VNI_MIN..=VNI_MAX).contains(&vni) {
                        vni
                    } else {
                        VNI_MIN
                    };
                    let following = if vni == VNI_MAX { VNI_MIN } else { vni + 1 };
                    let rec = OverlayRecord {
                        vni,
                        subnets: subnets.clone(),
                        hosts: BTreeMap::new(),
                    };
                    (
                        rec,
                        0,
                        vec![
                            Compare::mod_revision(keys::vni_next(), next_rev),
                            Compare::absent(keys::vni_claim(vni)),
                        ],
                        vec![
                            Op::put(keys::vni_next(), encode(&following)),
                            Op::put(keys::vni_claim(vni), overlay.clone()),
                        ],
                    )
                }
            };
            rec.hosts
                .entry(self.host.clone())
                .or_default()
                .insert(network_id.to_string());
            let net = LocalNetwork {
                network_id: network_id.to_string(),
                overlay: overlay.clone(),
                vni: rec.vni,
                subnets: subnets.clone(),
                cluster,
            };
            let mut compares = vec![
                Compare::absent(&map_key),
                Compare::mod_revision(&rec_key, rec_rev),
            ];
            compares.append(&mut extra_compares);
            let mut ops = vec![
                Op::put(&map_key, encode(&net)),
                Op::put(&rec_key, encode(&rec)),
            ];
            ops.append(&mut extra_ops);
            let written = self
                .store
                .txn(
                    Txn::new()
                        .when(compares)
                        .and_then(ops)
                        .or_else(vec![Op::get(keys::vni_claim(rec.vni))]),
                )
                .await;
            let resp = match written {
                Ok(resp) => resp,
                // The answer was lost: the next round's read shows whether
                // the mapping was written (and returns it) or not.
                Err(e) if e.may_have_applied() => {
                    lost_answer = true;
                    continue;
                }
                Err(e) => return Err(e).ctx(|| format!("create overlay {overlay}")),
            };
            if resp.succeeded {
                tracing::info!(overlay = %overlay, vni = rec.vni, "network joined its overlay");
                self.remember(&net);
                return Ok(net);
            }
            if rec_rev == 0 {
                if let Some(OpResult::Get(Some(_))) = resp.results.first() {
                    // The VNI under the cursor is taken (the cursor wrapped):
                    // move the cursor past it and try again.
                    let skip = if rec.vni == VNI_MAX {
                        VNI_MIN
                    } else {
                        rec.vni + 1
                    };
                    let next_rev = next.map(|kv| kv.mod_revision).unwrap_or(0);
                    self.store
                        .compare_and_swap(&keys::vni_next(), next_rev, encode(&skip))
                        .await
                        .ctx(|| "advance the VNI cursor".into())?
                        .ok();
                }
            }
        }
        Err(PluginError::Conflict(
            "could not create the network: the store kept changing under contention; retry".into(),
        ))
    }

    /// A new overlay must not take a subnet of another overlay: two overlays
    /// over one address pool would be two data planes that cannot reach each
    /// other (e.g. `--ipv6 --subnet fd00::/64` without an IPv4 --subnet,
    /// for which Docker picks an IPv4 pool on each host by itself, so the
    /// overlays' first subnets differ). Every overlay creation moves the VNI
    /// cursor, which the creating transaction compares against the revision
    /// read before this check: an overlay created after it makes that
    /// transaction fail and the check run again.
    async fn refuse_subnets_of_other_overlays(
        &self,
        overlay: &str,
        subnets: &[IpNetwork],
    ) -> Result<()> {
        let claims = self
            .store
            .range(&keys::vni_prefix())
            .await
            .ctx(|| "list the overlays".into())?;
        let next = keys::vni_next();
        let others: Vec<String> = claims
            .kvs
            .into_iter()
            .filter(|kv| kv.key != next)
            .filter_map(|kv| String::from_utf8(kv.value).ok())
            .filter(|o| o != overlay)
            .collect();
        // Small batches: stores limit the operations of one transaction.
        for batch in others.chunks(32) {
            let ops = batch.iter().map(|o| Op::get(keys::overlay_record(o)));
            let resp = self
                .store
                .txn(Txn::new().and_then(ops.collect()))
                .await
                .ctx(|| "read the overlays".into())?;
            for result in resp.results {
                let OpResult::Get(Some(kv)) = result else {
                    continue;
                };
                let rec: OverlayRecord = decode(&kv)?;
                if let Some(s) = subnets.iter().find(|s| rec.subnets.contains(s)) {
                    return Err(PluginError::Conflict(format!(
                        "subnet {s} already belongs to a rustoverlay network with subnets {}; \
                         create the network with exactly the same --subnet options on every \
                         host, an IPv4 --subnet included (without one, Docker picks an IPv4 \
                         subnet on each host by itself)",
                        join(&rec.subnets)
                    )));
                }
            }
        }
        Ok(())
    }

    /// Find this host's Docker network.
    pub async fn lookup(&self, network_id: &str) -> Result<LocalNetwork> {
        if let Some(net) = self.cached(network_id) {
            return Ok(net);
        }
        let kv = self
            .store
            .get(&keys::host_network(&self.host, network_id))
            .await
            .ctx(|| format!("look up network {network_id}"))?
            .ok_or_else(|| {
                PluginError::Unknown(format!(
                    "network {network_id} is not a rustoverlay network on this host; \
                     remove it and create it again with -d rustoverlay --ipam-driver rustoverlay"
                ))
            })?;
        let net: LocalNetwork = decode(&kv)?;
        self.remember(&net);
        Ok(net)
    }

    /// This host's Docker networks, from the store.
    pub async fn local_networks(&self) -> Result<Vec<LocalNetwork>> {
        let resp = self
            .store
            .range(&keys::host_networks(&self.host))
            .await
            .ctx(|| "list this host's networks".into())?;
        resp.kvs.iter().map(decode).collect()
    }

    /// Detach this host's Docker network from its overlay; the last network
    /// of the overlay removes it and frees its VNI. `Ok(None)` when the network
    /// was already gone.
    #[tracing::instrument(skip(self), fields(host = %self.host))]
    pub async fn delete_network(&self, network_id: &str) -> Result<Option<LocalNetwork>> {
        let map_key = keys::host_network(&self.host, network_id);
        let mut retry = Retry::new();
        while retry.next().await {
            GoneHostFence::check(&self.fence, self.store.as_ref()).await?;
            let Some(kv) = self
                .store
                .get(&map_key)
                .await
                .ctx(|| format!("look up network {network_id}"))?
            else {
                self.forget(network_id);
                return Ok(None);
            };
            let net: LocalNetwork = decode(&kv)?;
            let rec_key = keys::overlay_record(&net.overlay);
            let rec_kv = self
                .store
                .get(&rec_key)
                .await
                .ctx(|| format!("read overlay {}", net.overlay))?;
            let mut compares = vec![Compare::mod_revision(&map_key, kv.mod_revision)];
            let mut ops = vec![Op::delete(&map_key)];
            if let Some(rec_kv) = rec_kv {
                let mut rec: OverlayRecord = decode(&rec_kv)?;
                if let Some(ids) = rec.hosts.get_mut(&self.host) {
                    ids.remove(network_id);
                    if ids.is_empty() {
                        rec.hosts.remove(&self.host);
                    }
                }
                compares.push(Compare::mod_revision(&rec_key, rec_kv.mod_revision));
                if rec.hosts.is_empty() {
                    ops.push(Op::delete(&rec_key));
                    ops.push(Op::delete(keys::vni_claim(rec.vni)));
                    ops.push(Op::delete_prefix(keys::overlay_endpoints(&net.overlay)));
                } else {
                    ops.push(Op::put(&rec_key, encode(&rec)));
                }
            }
            let resp = self
                .store
                .txn(GoneHostFence::apply(
                    &self.fence,
                    Txn::new().when(compares).and_then(ops),
                ))
                .await
                .ctx(|| format!("delete network {network_id}"))?;
            if resp.succeeded {
                self.forget(network_id);
                return Ok(Some(net));
            }
        }
        Err(PluginError::Conflict(
            "could not delete the network: the store kept changing under contention; retry".into(),
        ))
    }

    /// Store an endpoint, bound to its addresses in the same transaction.
    /// Idempotent for the same endpoint; refuses an ID that is already used
    /// differently, and an address bound to another endpoint.
    pub async fn create_endpoint(&self, net: &LocalNetwork, ep: &EndpointRecord) -> Result<()> {
        self.create_endpoint_fenced(net, ep, (vec![], vec![])).await
    }

    /// [`Overlays::create_endpoint`], with extra compares and writes in the
    /// same transaction (a cluster network's removal fence).
    pub async fn create_endpoint_fenced(
        &self,
        net: &LocalNetwork,
        ep: &EndpointRecord,
        fence: (Vec<Compare>, Vec<Op>),
    ) -> Result<()> {
        let key = keys::endpoint(&net.overlay, &ep.endpoint_id);
        let bound = bound_keys(net, ep);
        let (mut compares, mut ops) = fence;
        compares.push(Compare::absent(&key));
        ops.push(Op::put(&key, encode(ep)));
        let mut reads = vec![Op::get(&key)];
        for b in &bound {
            compares.push(Compare::absent(b));
            ops.push(Op::put(b, ep.endpoint_id.clone()));
            reads.push(Op::get(b));
        }
        let resp = match self
            .store
            .txn(Txn::new().when(compares).and_then(ops).or_else(reads))
            .await
        {
            Ok(resp) => resp,
            // The answer was lost: if the record is there as written, the
            // call applied, and Docker (which would not delete it) must
            // hear so.
            Err(e) if e.may_have_applied() => {
                let applied = until_read(|| self.get_endpoint(net, &ep.endpoint_id)).await;
                return match applied {
                    Ok(Some((current, _))) if current == *ep => Ok(()),
                    _ => Err(e).ctx(|| format!("store endpoint {}", ep.endpoint_id)),
                };
            }
            Err(e) => return Err(e).ctx(|| format!("store endpoint {}", ep.endpoint_id)),
        };
        if resp.succeeded {
            return Ok(());
        }
        let mut results = resp.results.into_iter().map(|r| match r {
            OpResult::Get(kv) => kv,
            _ => None,
        });
        if let Some(kv) = results.next().flatten() {
            let current: EndpointRecord = decode(&kv)?;
            // A replay: the same endpoint, only created at another time.
            let replay = EndpointRecord {
                created_at: current.created_at,
                created_ms: current.created_ms,
                ..ep.clone()
            };
            return if current == replay {
                Ok(())
            } else {
                Err(PluginError::Conflict(format!(
                    "endpoint {} already exists with other settings (host {}, address {}); \
                     remove the container and start it again",
                    ep.endpoint_id,
                    current.host,
                    current.ipv4.map(|a| a.to_string()).unwrap_or_default()
                )))
            };
        }
        for (kv, addr) in results.zip([ep.ipv4, ep.ipv6].into_iter().flatten()) {
            if let Some(kv) = kv {
                return Err(PluginError::Conflict(format!(
                    "address {} is bound to endpoint {}, whose record was not removed; it is \
                     freed with that endpoint (the orphan sweep removes it after --orphan-age)",
                    addr.ip(),
                    String::from_utf8_lossy(&kv.value)
                )));
            }
        }
        Err(PluginError::Conflict(format!(
            "endpoint {} changed while it was stored; retry",
            ep.endpoint_id
        )))
    }

    pub async fn get_endpoint(
        &self,
        net: &LocalNetwork,
        endpoint_id: &str,
    ) -> Result<Option<(EndpointRecord, Revision)>> {
        let kv = self
            .store
            .get(&keys::endpoint(&net.overlay, endpoint_id))
            .await
            .ctx(|| format!("read endpoint {endpoint_id}"))?;
        kv.map(|kv| Ok((decode(&kv)?, kv.mod_revision))).transpose()
    }

    /// Delete an endpoint (and its address bindings); true when it existed.
    pub async fn delete_endpoint(&self, net: &LocalNetwork, endpoint_id: &str) -> Result<bool> {
        let mut retry = Retry::new();
        while retry.next().await {
            let Some((ep, rev)) = self.get_endpoint(net, endpoint_id).await? else {
                return Ok(false);
            };
            if self.delete_endpoint_record(net, &ep, rev).await? {
                return Ok(true);
            }
        }
        Err(PluginError::Conflict(format!(
            "could not delete endpoint {endpoint_id}: its record kept changing; retry"
        )))
    }

    /// Delete an endpoint record read at revision `rev`, with its address
    /// bindings. False when the record changed since (the caller re-reads).
    pub async fn delete_endpoint_record(
        &self,
        net: &LocalNetwork,
        ep: &EndpointRecord,
        rev: Revision,
    ) -> Result<bool> {
        GoneHostFence::check(&self.fence, self.store.as_ref()).await?;
        let key = keys::endpoint(&net.overlay, &ep.endpoint_id);
        let mut ops = vec![
            Op::delete(&key),
            // Its names go in the same step: no name outlives its endpoint.
            Op::delete(keys::endpoint_names(
                &net.overlay,
                &ep.host,
                &ep.endpoint_id,
            )),
        ];
        ops.extend(bound_keys(net, ep).into_iter().map(Op::delete));
        let txn = Txn::new()
            .when(vec![Compare::mod_revision(&key, rev)])
            .and_then(ops);
        let resp = match self.store.txn(GoneHostFence::apply(&self.fence, txn)).await {
            Ok(resp) => resp,
            // The answer was lost: gone means deleted (by this call or
            // another); still there unchanged means the caller tries again.
            Err(e) if e.may_have_applied() => {
                let now = until_read(|| self.store.get(&key))
                    .await
                    .ctx(|| format!("read endpoint {}", ep.endpoint_id))?;
                return Ok(now.is_none());
            }
            Err(e) => return Err(e).ctx(|| format!("delete endpoint {}", ep.endpoint_id)),
        };
        if resp.succeeded {
            return Ok(true);
        }
        GoneHostFence::check(&self.fence, self.store.as_ref()).await?;
        Ok(false)
    }

    /// Every endpoint of an overlay, on all hosts.
    pub async fn endpoints(&self, overlay: &str) -> Result<(Vec<EndpointRecord>, Revision)> {
        let resp = self
            .store
            .range(&keys::overlay_endpoints(overlay))
            .await
            .ctx(|| format!("list endpoints of {overlay}"))?;
        let eps = resp.kvs.iter().map(decode).collect::<Result<Vec<_>>>()?;
        Ok((eps, resp.revision))
    }
}

/// The binding keys of an endpoint's addresses, in the pools of the
/// network's subnets (IPv4 first, as the record lists them).
fn bound_keys(net: &LocalNetwork, ep: &EndpointRecord) -> Vec<String> {
    [ep.ipv4, ep.ipv6]
        .into_iter()
        .flatten()
        .filter_map(|a| {
            let subnet = net.subnets.iter().find(|s| s.contains(a.ip()))?;
            Some(keys::pool_bound(&keys::subnet_segment(subnet), a.ip()))
        })
        .collect()
}

fn join(nets: &[IpNetwork]) -> String {
    nets.iter()
        .map(|n| n.to_string())
        .collect::<Vec<_>>()
        .join(", ")
}
