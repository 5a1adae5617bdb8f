//! Handing out the next free address: the pool's cursor (lowest offset never
//! handed out) first, then the FIFO queue of released addresses. The cursor
//! is cached per pool on this host and corrected from each lost race's
//! failure branch, so a fresh address costs one transaction.

use super::math::Span;
use super::{pool_gone, too_contended, unclaimed, Ipam};
use crate::error::{Result, StoreContext};
use crate::state::codec::{decode, encode};
use crate::state::keys;
use crate::state::records::{AddressKind, AllocState, PoolRecord};
use crate::util::backoff::{until_read, Retry};
use ipnetwork::IpNetwork;
use kvstore_backends::{Compare, Op, OpResult, Revision, Txn};
use std::net::IpAddr;
use std::sync::Arc;

/// Cached knowledge about one pool on this host: immutable facts (subnet and
/// range never change while the pool exists) and the last cursor we saw.
#[derive(Debug, Clone, Copy)]
pub(super) struct Cursor {
    pub(super) span: Span,
    pub(super) subnet: IpNetwork,
    pub(super) state: AllocState,
    pub(super) revision: Revision,
    /// Create revision of the cursor key: tells a re-claimed pool (whose
    /// range may differ) from the one cached.
    pub(super) created: Revision,
}

/// Builds compares and ops that ride along in an allocating transaction.
pub(super) type ExtraOps<'a> = dyn Fn(IpAddr) -> (Vec<Compare>, Vec<Op>) + Send + Sync + 'a;

pub(super) type CursorCell = Arc<tokio::sync::Mutex<Option<Cursor>>>;

impl Ipam {
    pub(super) async fn load_cursor(&self, seg: &str) -> Result<Cursor> {
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
    pub(super) async fn allocate(
        &self,
        seg: &str,
        extra: Option<&ExtraOps<'_>>,
    ) -> Result<Option<IpAddr>> {
        let cell = self.cursor_cell(seg);
        let mut guard = cell.lock().await;
        let mut skip: u128 = 0;
        let mut retry = Retry::new();
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
                    return Err(cur.span.exhausted(&cur.subnet));
                };
            let addr_key = keys::pool_addr(seg, ip);
            let (extra_compares, extra_ops) = extra.map(|f| f(ip)).unwrap_or_default();
            let extra_used = !extra_compares.is_empty();
            compares.push(Compare::mod_revision(&alloc_key, cur.revision));
            compares.push(Compare::absent(&addr_key));
            compares.extend(extra_compares);
            let record = self.address_record(if extra.is_some() {
                AddressKind::Gateway
            } else {
                AddressKind::Address
            });
            ops.push(Op::put(&addr_key, record.clone()));
            ops.push(Op::put(&alloc_key, encode(&new_state)));
            ops.extend(extra_ops);
            let written = self
                .store
                .txn(
                    Txn::new()
                        .when(compares)
                        .and_then(ops)
                        .or_else(vec![Op::get(&alloc_key), Op::get(&addr_key)]),
                )
                .await;
            let resp = match written {
                Ok(resp) => resp,
                // The answer was lost. The record as written (this host, this
                // second, under the pool's cursor lock) says it applied, and
                // the address is the caller's; else try again.
                Err(e) if e.may_have_applied() => {
                    *guard = None;
                    let now = until_read(|| self.store.get(&addr_key))
                        .await
                        .ctx(|| format!("check an allocation in pool {seg}"))?;
                    if now.is_some_and(|kv| kv.value == record) {
                        return Ok(Some(ip));
                    }
                    continue;
                }
                Err(e) => return Err(e).ctx(|| format!("allocate an address in pool {seg}")),
            };
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
                // Another host allocated: continue from its cursor, at once.
                // The failed transaction read the winner's state; a pause
                // would only let fresh requests in first, and a host that
                // kept losing would wait longer each time until its budget
                // ran out (seen on Consul: eight hosts, one pool).
                *guard = Some(Cursor {
                    state: decode(&alloc_now)?,
                    revision: alloc_now.mod_revision,
                    ..cur
                });
                skip = 0;
                retry.at_once();
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

    pub(super) async fn advance_free_head(
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
}
