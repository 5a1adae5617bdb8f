//! Addresses: the shared gateway, a given address (`--ip`, aux), the next
//! free one, and releasing. Only the holding host releases an address.

use super::alloc::Cursor;
use super::math::check_usable;
use super::{parse_pool_id, too_contended, Ipam};
use crate::error::{PluginError, Result, StoreContext};
use crate::state::codec::{decode, encode};
use crate::state::fence::GoneHostFence;
use crate::state::keys;
use crate::state::records::{AddressKind, AddressRecord, AllocState};
use crate::util::backoff::{until_read, Retry};
use crate::util::clock::unix_now;
use ipnetwork::IpNetwork;
use kvstore_backends::{Compare, Op, OpResult, Revision, Txn};
use std::net::IpAddr;

impl Ipam {
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
        let mut retry = Retry::new();
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
        let mut retry = Retry::new();
        while retry.next().await {
            let (_, seg, rec, rev) = self.read_known_pool(pool_id).await?;
            if rec.gateway == Some(ip) {
                return Err(PluginError::Conflict(format!(
                    "address {ip} is the gateway of the network on {pool_id}; pick another --ip"
                )));
            }
            if rec.aux.contains(&ip) {
                return Err(PluginError::Conflict(format!(
                    "address {ip} is an aux address (--aux-address) of the network on {pool_id}, \
                     which is never given to a container; pick another --ip"
                )));
            }
            let compares = vec![Compare::mod_revision(keys::pool_record(&seg), rev)];
            match self
                .take_specific(&seg, ip, AddressKind::Address, compares, vec![])
                .await
            {
                Ok(Some(())) => return Ok(ip),
                Ok(None) => {}
                Err(taken @ PluginError::Conflict(_)) => {
                    return match self.retake_own_unbound(&seg, ip).await? {
                        true => Ok(ip),
                        false => Err(taken),
                    };
                }
                Err(e) => return Err(e),
            }
        }
        Err(too_contended("allocate a given address"))
    }

    /// A retried `--ip`: the address is already this host's, and no endpoint
    /// is bound to it (the first try applied but its answer was lost). It is
    /// handed out again, with a fresh record so that nothing that listed the
    /// old one (gc, the reaper's unbound collection) frees it. Safe even for
    /// a second container asking for the same address: only one endpoint
    /// can bind it.
    async fn retake_own_unbound(&self, seg: &str, ip: IpAddr) -> Result<bool> {
        let addr_key = keys::pool_addr(seg, ip);
        let bound_key = keys::pool_bound(seg, ip);
        let Some(kv) = self
            .store
            .get(&addr_key)
            .await
            .ctx(|| format!("read address {ip}"))?
        else {
            return Ok(false);
        };
        let held = decode::<AddressRecord>(&kv)?;
        if held.host != self.host || held.kind != AddressKind::Address {
            return Ok(false);
        }
        let resp = self
            .store
            .txn(
                Txn::new()
                    .when(vec![
                        Compare::mod_revision(&addr_key, kv.mod_revision),
                        Compare::absent(&bound_key),
                    ])
                    .and_then(vec![Op::put(
                        &addr_key,
                        self.address_record(AddressKind::Address),
                    )]),
            )
            .await
            .ctx(|| format!("take address {ip} again"))?;
        if resp.succeeded {
            tracing::info!(address = %ip, "a retried request: the address is this host's and bound to no endpoint");
        }
        Ok(resp.succeeded)
    }

    /// Reserve one of a network's aux addresses (`--aux-address`); Docker
    /// asks for each while it creates the network on a host. The
    /// reservation is shared by every host of the network, freed with the
    /// pool, and never handed to a container (its address key keeps the
    /// allocator off it). Idempotent.
    #[tracing::instrument(skip(self), fields(host = %self.host))]
    pub async fn reserve_aux(&self, pool_id: &str, ip: IpAddr) -> Result<IpNetwork> {
        let subnet = parse_pool_id(pool_id)?;
        check_usable(&subnet, ip)?;
        let mut retry = Retry::new();
        while retry.next().await {
            let (_, seg, rec, rev) = self.read_known_pool(pool_id).await?;
            if rec.gateway == Some(ip) {
                return Err(PluginError::Conflict(format!(
                    "address {ip} is the gateway of the network on {pool_id}; it cannot be an \
                     aux address too: pick another --aux-address"
                )));
            }
            if !rec.aux.contains(&ip) {
                let mut with = rec.clone();
                with.aux.insert(ip);
                let compares = vec![Compare::mod_revision(keys::pool_record(&seg), rev)];
                let ops = vec![Op::put(keys::pool_record(&seg), encode(&with))];
                if self
                    .take_specific(&seg, ip, AddressKind::Aux, compares, ops)
                    .await?
                    .is_none()
                {
                    continue;
                }
                tracing::info!(pool = %pool_id, aux = %ip, "reserved an aux address");
            }
            return IpNetwork::new(ip, subnet.prefix())
                .map_err(|e| PluginError::Internal(e.to_string()));
        }
        Err(too_contended("reserve an aux address"))
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
            let hint = match kind {
                AddressKind::Aux => "it cannot be an aux address too: pick another --aux-address",
                AddressKind::Gateway => "pick another --gateway or leave --gateway out",
                AddressKind::Address => "pick another --ip or leave --ip out",
            };
            return Err(PluginError::Conflict(format!(
                "address {ip} is already in use{holder}; {hint}"
            )));
        }
        Ok(None)
    }

    pub(super) fn address_record(&self, kind: AddressKind) -> Vec<u8> {
        encode(&AddressRecord {
            host: self.host.clone(),
            kind,
            at: unix_now(),
        })
    }

    /// ReleaseAddress. The gateway and aux addresses are shared by every host
    /// and freed with the pool, so releasing them is a no-op.
    pub async fn release_address(&self, pool_id: &str, ip: IpAddr) -> Result<()> {
        self.release(pool_id, ip, None).await
    }

    /// Release an address only if its record is still the one listed at
    /// revision `listed` (gc: it may have been freed and taken again since).
    pub async fn release_listed_address(
        &self,
        pool_id: &str,
        ip: IpAddr,
        listed: Revision,
    ) -> Result<()> {
        self.release(pool_id, ip, Some(listed)).await
    }

    #[tracing::instrument(skip(self), fields(host = %self.host))]
    async fn release(&self, pool_id: &str, ip: IpAddr, listed: Option<Revision>) -> Result<()> {
        GoneHostFence::check(&self.fence, self.store.as_ref()).await?;
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
        let bound_key = keys::pool_bound(&seg, ip);
        let mut addr = self
            .store
            .get(&addr_key)
            .await
            .ctx(|| format!("read address {ip}"))?;
        let cell = self.cursor_cell(&seg);
        let mut guard = cell.lock().await;
        let mut retry = Retry::new();
        while retry.next().await {
            let Some(held) = &addr else {
                return Err(PluginError::Unknown(format!(
                    "address {ip} is not allocated in pool {pool_id} (released twice?)"
                )));
            };
            if listed.is_some_and(|rev| rev != held.mod_revision) {
                return Err(PluginError::Unknown(format!(
                    "address {ip} in pool {pool_id} changed since it was listed (taken again?); nothing released"
                )));
            }
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
            // Never while an endpoint record is bound to it: its DeleteEndpoint
            // did not complete, and the address would go to a second one.
            compares.push(Compare::absent(&bound_key));
            let txn = Txn::new().when(compares).and_then(ops).or_else(vec![
                Op::get(&alloc_key),
                Op::get(&addr_key),
                Op::get(&bound_key),
            ]);
            let held_revision = held.mod_revision;
            let resp = match self.store.txn(GoneHostFence::apply(&self.fence, txn)).await {
                Ok(resp) => resp,
                // The answer was lost: unless the record is still the one
                // this call deleted, the release applied.
                Err(e) if e.may_have_applied() => {
                    *guard = None;
                    addr = until_read(|| self.store.get(&addr_key))
                        .await
                        .ctx(|| format!("read address {ip}"))?;
                    if addr
                        .as_ref()
                        .is_some_and(|kv| kv.mod_revision == held_revision)
                    {
                        continue;
                    }
                    return Ok(());
                }
                Err(e) => return Err(e).ctx(|| format!("release address {ip}")),
            };
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
            GoneHostFence::check(&self.fence, self.store.as_ref()).await?;
            let mut results = resp.results.into_iter();
            *guard = match results.next() {
                Some(OpResult::Get(Some(alloc))) if alloc.create_revision == cur.created => {
                    retry.at_once();
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
            if let Some(OpResult::Get(Some(bound))) = results.next() {
                return Err(PluginError::Conflict(format!(
                    "address {ip} in pool {pool_id} is still bound to endpoint {}, whose record was \
                     not removed (a DeleteEndpoint that did not complete); it is freed with that \
                     endpoint (the orphan sweep removes it after --orphan-age)",
                    String::from_utf8_lossy(&bound.value)
                )));
            }
        }
        Err(too_contended("release an address"))
    }

    /// Record a network's aux addresses as shared reservations of its pool, so
    /// that every other host's request for them succeeds and releasing them
    /// frees nothing until the pool goes.
    pub async fn mark_aux(&self, pool_id: &str, aux: &[IpAddr]) -> Result<()> {
        for ip in aux {
            self.reserve_aux(pool_id, *ip).await?;
        }
        Ok(())
    }
}
