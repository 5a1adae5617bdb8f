//! Handing out the next free address: this host's claimed run first, then
//! the pool's cursor (lowest offset never handed out), then the FIFO queue
//! of released addresses, and last what other hosts claimed and did not
//! hand out. The cursor is cached per pool on this host and corrected from
//! each lost race's failure branch, so a fresh address costs one
//! transaction.
//!
//! Runs: taking an address from the cursor also claims the few after it for
//! this host (`records::ClaimedRun`, its own key), which it then hands out
//! without writing the cursor. Hosts allocating at once race for the shared
//! cursor once per run instead of once per address. Uniqueness never rests
//! on a run: every address is taken by creating its key under a compare that
//! it is absent, so another host may take an address of this host's run
//! (when the pool runs dry, or with --ip) and this host only skips it.

use super::math::Span;
use super::{pool_gone, too_contended, unclaimed, Ipam};
use crate::error::{Result, StoreContext};
use crate::state::codec::{decode, encode};
use crate::state::keys;
use crate::state::records::{AddressKind, AllocState, ClaimedRun, PoolRecord};
use crate::util::backoff::{until_read, Retry};
use ipnetwork::IpNetwork;
use kvstore_backends::{Compare, KeyValue, Op, OpResult, Revision, Txn};
use std::collections::VecDeque;
use std::net::IpAddr;
use std::sync::Arc;

/// Cached knowledge about one pool on this host: immutable facts (subnet and
/// range never change while the pool exists), the last cursor we saw, and
/// this host's claimed run.
#[derive(Debug, Clone, Copy)]
pub(super) struct Cursor {
    pub(super) span: Span,
    pub(super) subnet: IpNetwork,
    pub(super) state: AllocState,
    pub(super) revision: Revision,
    /// Create revision of the cursor key: tells a re-claimed pool (whose
    /// range may differ) from the one cached.
    pub(super) created: Revision,
    /// What is left of this host's claimed run, if anything.
    pub(super) run: Option<Run>,
}

/// This host's claimed run as cached: offsets `next..end`, and the mod
/// revision of its key (compared when an address is taken from it, which
/// also proves the pool was not released meanwhile).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Run {
    next: u128,
    end: u128,
    revision: Revision,
}

impl Run {
    fn of(kv: &KeyValue, span: &Span) -> Option<Run> {
        let claimed: ClaimedRun = decode(kv).ok()?;
        let end = claimed.end.min(span.len);
        (claimed.next < end).then_some(Run {
            next: claimed.next,
            end,
            revision: kv.mod_revision,
        })
    }
}

/// How many offsets one step takes from the cursor, with `left` never-used
/// offsets from there on: one while the pool is small or nearly full (so
/// runs never hold back a large share of it), up to 16 on large pools.
fn run_length(left: u128) -> u128 {
    (left / 64).clamp(1, 16)
}

/// Where one try takes its address from, and what it changes on success.
enum Source {
    Run(Run),
    Cursor {
        new_state: AllocState,
        end: u128,
    },
    Queue {
        new_state: AllocState,
        free_key: String,
    },
    /// An offset of a run claimed earlier (another host's, or this host's
    /// before a restart), found once the cursor and the queue ran dry.
    Claimed,
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
                Op::get(keys::pool_run(seg, &self.host)),
            ]))
            .await
            .ctx(|| format!("read pool {seg}"))?;
        let mut results = resp.results.into_iter();
        match (results.next(), results.next(), results.next()) {
            (
                Some(OpResult::Get(Some(rec))),
                Some(OpResult::Get(Some(alloc))),
                Some(OpResult::Get(run)),
            ) => {
                let rec: PoolRecord = decode(&rec)?;
                let span = Span::of(&rec);
                Ok(Cursor {
                    span,
                    subnet: rec.subnet,
                    state: decode(&alloc)?,
                    revision: alloc.mod_revision,
                    created: alloc.create_revision,
                    // A run this host claimed before a restart or a lost
                    // answer: carry on with it.
                    run: run.as_ref().and_then(|kv| Run::of(kv, &span)),
                })
            }
            _ => Err(unclaimed(&seg.replace('_', "/"))),
        }
    }

    /// Offsets of every claimed run of a pool (other hosts', gone ones'
    /// included) that their records do not know handed out: candidates once
    /// the cursor and the queue ran dry. One read, at most 16 per host.
    async fn claimed_offsets(&self, seg: &str, span: &Span) -> Result<VecDeque<u128>> {
        let runs = self
            .store
            .range(&keys::pool_runs(seg))
            .await
            .ctx(|| format!("read the claimed runs of pool {seg}"))?;
        Ok(runs
            .kvs
            .iter()
            .filter_map(|kv| Run::of(kv, span))
            .flat_map(|run| run.next..run.end)
            .collect())
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
        let alloc_key = keys::pool_alloc(seg);
        let run_key = keys::pool_run(seg, &self.host);
        let mut skip: u128 = 0;
        // Read once per call, when first needed.
        let mut claimed: Option<VecDeque<u128>> = None;
        // Whether this call read the cursor itself: a cached one may miss
        // addresses other hosts queued since, and must not say "exhausted".
        let mut fresh = false;
        let mut retry = Retry::new();
        while retry.next().await {
            let cur = match *guard {
                Some(c) => c,
                None => {
                    let c = self.load_cursor(seg).await?;
                    *guard = Some(c);
                    fresh = true;
                    c
                }
            };
            let st = cur.state;
            let (offset, mut compares, mut ops, source) = match cur.run {
                Some(run) if run.next < run.end => {
                    let left = ClaimedRun {
                        next: run.next + 1,
                        end: run.end,
                    };
                    let op = if left.next < left.end {
                        Op::put(&run_key, encode(&left))
                    } else {
                        Op::delete(&run_key)
                    };
                    let compare = Compare::mod_revision(&run_key, run.revision);
                    (run.next, vec![compare], vec![op], Source::Run(run))
                }
                _ if st.next.saturating_add(skip) < cur.span.len => {
                    let offset = st.next + skip;
                    let end = offset + run_length(cur.span.len - offset);
                    let new_state = AllocState { next: end, ..st };
                    let mut ops = vec![Op::put(&alloc_key, encode(&new_state))];
                    if end > offset + 1 {
                        let run = ClaimedRun {
                            next: offset + 1,
                            end,
                        };
                        ops.push(Op::put(&run_key, encode(&run)));
                    }
                    let compare = Compare::mod_revision(&alloc_key, cur.revision);
                    (
                        offset,
                        vec![compare],
                        ops,
                        Source::Cursor { new_state, end },
                    )
                }
                _ if st.free_head < st.free_tail => {
                    let free_key = keys::pool_free(seg, st.free_head);
                    let kv = self
                        .store
                        .get(&free_key)
                        .await
                        .ctx(|| format!("read the free queue of pool {seg}"))?;
                    let queued = kv.as_ref().and_then(|kv| {
                        std::str::from_utf8(&kv.value)
                            .ok()
                            .and_then(|s| s.parse::<IpAddr>().ok())
                            .and_then(|ip| cur.span.offset(ip))
                    });
                    let Some(offset) = queued else {
                        // A damaged or missing queue entry: drop it and move on.
                        self.advance_free_head(seg, &cur, &free_key, &mut guard)
                            .await?;
                        continue;
                    };
                    let new_state = AllocState {
                        free_head: st.free_head + 1,
                        ..st
                    };
                    let compare = Compare::mod_revision(&alloc_key, cur.revision);
                    let ops = vec![
                        Op::delete(&free_key),
                        Op::put(&alloc_key, encode(&new_state)),
                    ];
                    (
                        offset,
                        vec![compare],
                        ops,
                        Source::Queue {
                            new_state,
                            free_key,
                        },
                    )
                }
                _ => {
                    if claimed.is_none() {
                        claimed = Some(self.claimed_offsets(seg, &cur.span).await?);
                    }
                    let Some(&offset) = claimed.as_ref().and_then(|c| c.front()) else {
                        if fresh {
                            return Err(cur.span.exhausted(&cur.subnet));
                        }
                        *guard = None;
                        claimed = None;
                        retry.at_once();
                        continue;
                    };
                    // The compare on the cursor proves the pool still exists.
                    let compare = Compare::mod_revision(&alloc_key, cur.revision);
                    (offset, vec![compare], vec![], Source::Claimed)
                }
            };
            let ip = cur.span.ip(offset);
            let addr_key = keys::pool_addr(seg, ip);
            let (extra_compares, extra_ops) = extra.map(|f| f(ip)).unwrap_or_default();
            let extra_used = !extra_compares.is_empty();
            compares.push(Compare::absent(&addr_key));
            compares.extend(extra_compares);
            let record = self.address_record(if extra.is_some() {
                AddressKind::Gateway
            } else {
                AddressKind::Address
            });
            ops.push(Op::put(&addr_key, record.clone()));
            ops.extend(extra_ops);
            let written = self
                .store
                .txn(Txn::new().when(compares).and_then(ops).or_else(vec![
                    Op::get(&alloc_key),
                    Op::get(&addr_key),
                    Op::get(&run_key),
                ]))
                .await;
            let resp = match written {
                Ok(resp) => resp,
                // The answer was lost. The record as written (this host, this
                // second, under the pool's cursor lock) says it applied, and
                // the address is the caller's; else try again. The cursor and
                // the run are read again either way.
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
                *guard = Some(match source {
                    Source::Run(run) => Cursor {
                        run: Some(Run {
                            next: run.next + 1,
                            revision: resp.revision,
                            ..run
                        }),
                        ..cur
                    },
                    Source::Cursor { new_state, end } => Cursor {
                        state: new_state,
                        revision: resp.revision,
                        run: Some(Run {
                            next: offset + 1,
                            end,
                            revision: resp.revision,
                        }),
                        ..cur
                    },
                    Source::Queue { new_state, .. } => Cursor {
                        state: new_state,
                        revision: resp.revision,
                        ..cur
                    },
                    Source::Claimed => cur,
                });
                return Ok(Some(ip));
            }
            let mut results = resp.results.into_iter();
            let mut next_kv = || match results.next() {
                Some(OpResult::Get(kv)) => kv,
                _ => None,
            };
            let (alloc_now, addr_now, run_now) = (next_kv(), next_kv(), next_kv());
            let addr_taken = addr_now.is_some();
            let Some(alloc_now) = alloc_now else {
                *guard = None;
                return Err(pool_gone(seg));
            };
            if alloc_now.create_revision != cur.created {
                // The pool was released and claimed again: start over.
                *guard = None;
                skip = 0;
                claimed = None;
                continue;
            }
            match source {
                Source::Run(run) => {
                    if run_now.map(|kv| kv.mod_revision) != Some(run.revision) {
                        // Not the run we cached: read it (and the cursor) again.
                        *guard = None;
                    } else if addr_taken {
                        // Taken by another host (--ip, or a dry pool): skip it.
                        *guard = Some(Cursor {
                            run: Some(Run {
                                next: run.next + 1,
                                ..run
                            }),
                            ..cur
                        });
                    } else if extra_used {
                        return Ok(None);
                    } else {
                        *guard = None;
                    }
                    retry.at_once();
                    continue;
                }
                Source::Claimed => {
                    let cursor_moved = alloc_now.mod_revision != cur.revision;
                    if !addr_taken && !cursor_moved && extra_used {
                        return Ok(None);
                    }
                    if addr_taken || !cursor_moved {
                        if let Some(c) = claimed.as_mut() {
                            c.pop_front();
                        }
                    }
                    // A release may have queued an address meanwhile: the
                    // queue comes first again.
                    *guard = Some(Cursor {
                        state: decode(&alloc_now)?,
                        revision: alloc_now.mod_revision,
                        ..cur
                    });
                    retry.at_once();
                    continue;
                }
                Source::Cursor { .. } | Source::Queue { .. } => {}
            }
            if alloc_now.mod_revision != cur.revision {
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
                match source {
                    // A queued address someone took with --ip meanwhile.
                    Source::Queue { free_key, .. } => {
                        self.advance_free_head(seg, &cur, &free_key, &mut guard)
                            .await?
                    }
                    // An address given out by --ip ahead of the cursor.
                    _ => skip += 1,
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
