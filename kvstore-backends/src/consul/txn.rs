//! Running a txn: each branch is one `/v1/txn` request, planned in
//! `txn_plan`. When Consul refuses the success branch because a compare
//! failed, the compared keys are read and the failure branch runs pinned to
//! what was read (so its ops apply only to a state in which the compares are
//! false); a state that moved meanwhile, a lock holder the plan did not
//! know or an expired writer session make it start over, a bounded number
//! of times with a short random pause.

use std::collections::{BTreeMap, HashMap};

use hyper::{Method, StatusCode};
use serde_json::Value;

use super::calls::Inner;
use super::keys::consul_key;
use super::txn_plan::{
    branch_ops, build_plan, classify, decode_results, kv_op, worst_case_ops, BranchOp, Decoded,
    Refusal, MAX_TXN_OPS,
};
use super::wire::{revision, Entry, TxnReply};
use crate::validate::{check_txn_len, validate_txn};
use crate::{Compare, OpResult, Result, Revision, StoreError, Txn, TxnResponse};

/// Attempts of one txn while it races with lock holders or a moving state.
/// Each retry after the first waits a short random pause, so a busy key
/// cannot starve one writer; the caller's timeout bounds the whole call.
const TXN_ATTEMPTS: usize = 64;

pub(super) async fn run(inner: &Inner, txn: Txn) -> Result<TxnResponse> {
    validate_txn(&txn)?;
    check_txn_len(&txn, "Consul", MAX_TXN_OPS)?;
    let compares = txn
        .compares
        .iter()
        .map(|c| match c {
            Compare::ModRevision { key, mod_revision } => {
                let index = u64::try_from(*mod_revision).map_err(|_| {
                    StoreError::Invalid(format!(
                        "compare on {key:?} with negative revision {mod_revision}"
                    ))
                })?;
                Ok((consul_key(key)?.to_owned(), index))
            }
        })
        .collect::<Result<Vec<_>>>()?;
    let success = branch_ops(&txn.success)?;
    let failure = branch_ops(&txn.failure)?;
    for (name, ops) in [("success", &success), ("failure", &failure)] {
        let n = worst_case_ops(compares.len(), ops);
        if n > MAX_TXN_OPS {
            return Err(StoreError::Invalid(format!(
                    "the txn's {name} branch can need {n} Consul operations (a put, delete or \
                     deleted prefix takes 2, a compare or get 1); Consul takes at most {MAX_TXN_OPS}"
                )));
        }
    }
    let near = compares
        .first()
        .map(|(k, _)| k.clone())
        .or_else(|| {
            success
                .iter()
                .chain(&failure)
                .map(|op| op.key().to_owned())
                .next()
        })
        .unwrap_or_default();
    let what = || {
        format!(
            "txn ({} compares, {}/{} ops, first key {:?})",
            txn.compares.len(),
            txn.success.len(),
            txn.failure.len(),
            format!("/{near}")
        )
    };
    let mut holders: HashMap<String, String> = HashMap::new();
    for attempt in 0..TXN_ATTEMPTS {
        if attempt > 0 {
            let ceiling_ms = (1u64 << attempt.min(6)).min(50);
            let pause = std::time::Duration::from_micros(rand_micros(ceiling_ms * 1000));
            tokio::time::sleep(pause).await;
        }
        match inner
            .run_branch(&what, &compares, &success, &mut holders)
            .await?
        {
            Outcome::Done(decoded) => {
                let revision = inner.branch_revision(&decoded, &near).await?;
                return Ok(TxnResponse {
                    succeeded: true,
                    revision,
                    results: decoded.results,
                });
            }
            Outcome::Retry => continue,
            Outcome::ComparesFailed => {}
        }
        // A compare failed. Read the compared keys (and the failure
        // branch's gets, when that is all it does) in one snapshot.
        let only_gets = failure.iter().all(|op| matches!(op, BranchOp::Get { .. }));
        let mut keys: Vec<String> = compares.iter().map(|(k, _)| k.clone()).collect();
        if only_gets {
            for op in &failure {
                if let BranchOp::Get { key } = op {
                    keys.push(key.clone());
                }
            }
        }
        keys.sort();
        keys.dedup();
        // The store revision is probed alongside (one round trip less
        // on the contention path) and raised to what the read returned.
        let (state, probed) =
            tokio::join!(inner.read_keys(&what, &keys), inner.store_revision(&near));
        let state = state?;
        if holds(&compares, &state) {
            // The state moved back under the compares: start over.
            continue;
        }
        if only_gets {
            let results = failure
                .iter()
                .map(|op| {
                    state
                        .get(op.key())
                        .and_then(|e| e.as_ref())
                        .map(Entry::to_kv)
                        .transpose()
                        .map(OpResult::Get)
                })
                .collect::<Result<Vec<_>>>()?;
            let read = state
                .values()
                .flatten()
                .map(|e| e.modify_index)
                .max()
                .map_or(Ok(0), revision)?;
            return Ok(TxnResponse {
                succeeded: false,
                revision: probed?.max(read),
                results,
            });
        }
        // Pin what was read: the failure ops apply only if the compares
        // are still false.
        let pins: Vec<(String, u64)> = compares
            .iter()
            .map(|(k, _)| {
                let index = state
                    .get(k)
                    .and_then(|e| e.as_ref())
                    .map_or(0, |e| e.modify_index);
                (k.clone(), index)
            })
            .collect::<BTreeMap<_, _>>()
            .into_iter()
            .collect();
        match inner
            .run_branch(&what, &pins, &failure, &mut holders)
            .await?
        {
            Outcome::Done(decoded) => {
                let revision = inner.branch_revision(&decoded, &near).await?;
                return Ok(TxnResponse {
                    succeeded: false,
                    revision,
                    results: decoded.results,
                });
            }
            Outcome::ComparesFailed | Outcome::Retry => continue,
        }
    }
    Err(StoreError::Conflict(format!(
        "{}: {}: gave up after {TXN_ATTEMPTS} attempts racing with concurrent changes",
        what(),
        inner.target
    )))
}

enum Outcome {
    Done(Decoded),
    ComparesFailed,
    Retry,
}

impl Inner {
    /// Sends one branch with its checks.
    async fn run_branch(
        &self,
        what: &(dyn Fn() -> String + Sync),
        checks: &[(String, u64)],
        ops: &[BranchOp],
        holders: &mut HashMap<String, String>,
    ) -> Result<Outcome> {
        let needs_writer = ops.iter().any(
            |op| matches!(op, BranchOp::Put { key, lease: None, .. } if !holders.contains_key(key)),
        );
        let writer = if needs_writer {
            Some(self.writer_session().await?)
        } else {
            None
        };
        let plan = build_plan(checks, ops, holders, writer.as_deref())?;
        if plan.ops.is_empty() {
            return Ok(Outcome::Done(Decoded {
                results: Vec::new(),
                written: None,
                deleted: None,
            }));
        }
        // A read-only txn is served without raft; ask for a consistent read.
        let path = if plan.writes {
            "/v1/txn"
        } else {
            "/v1/txn?consistent"
        };
        let body = serde_json::to_vec(&plan.ops)
            .map_err(|e| StoreError::backend(format!("{}: encoding", what()), e))?;
        let reply = self.request(what, Method::PUT, path, Some(body)).await?;
        match reply.status {
            StatusCode::OK => {
                let parsed: TxnReply = self.decode(&what(), &reply)?;
                let results = parsed
                    .results
                    .unwrap_or_default()
                    .into_iter()
                    .map(|r| r.kv)
                    .collect::<Option<Vec<Entry>>>()
                    .ok_or_else(|| {
                        StoreError::backend(
                            format!("{}: {}", what(), self.target),
                            "a txn result without a KV entry",
                        )
                    })?;
                let decoded = decode_results(&plan, ops, results).map_err(|e| {
                    StoreError::backend(
                        format!("{}: {}", what(), self.target),
                        format!("Consul's txn results do not match the operations: {e}"),
                    )
                })?;
                Ok(Outcome::Done(decoded))
            }
            StatusCode::CONFLICT => {
                let parsed: TxnReply = self.decode(&what(), &reply)?;
                let errors = parsed.errors.unwrap_or_default();
                if errors.is_empty() {
                    return Err(StoreError::backend(
                        format!("{}: {}", what(), self.target),
                        "HTTP 409 without errors",
                    ));
                }
                match classify(&plan, ops, &errors, writer.as_deref()) {
                    Refusal::ComparesFailed => Ok(Outcome::ComparesFailed),
                    Refusal::LeaseGone(lease) => Err(StoreError::LeaseNotFound(lease)),
                    Refusal::TooOld(e) => Err(StoreError::backend(
                        format!("{}: {}", what(), self.target),
                        format!("{e} (the Consul backend needs Consul 1.14 or later)"),
                    )),
                    Refusal::WriterGone(id) => {
                        self.forget_writer(&id).await;
                        Ok(Outcome::Retry)
                    }
                    Refusal::Held(keys) => {
                        for key in keys {
                            match self.read_key(&key).await?.1.and_then(|e| e.session) {
                                Some(s) if !s.is_empty() => {
                                    holders.insert(key, s);
                                }
                                _ => {
                                    holders.remove(&key);
                                }
                            }
                        }
                        Ok(Outcome::Retry)
                    }
                    Refusal::Other(e) => Err(StoreError::backend(
                        format!("{}: {}", what(), self.target),
                        format!("Consul refused the txn: {e}"),
                    )),
                }
            }
            _ => Err(self.status_error(&what(), &reply)),
        }
    }

    /// The revision to report for a branch that ran.
    async fn branch_revision(&self, decoded: &Decoded, near: &str) -> Result<Revision> {
        if let Some(index) = decoded.written {
            return revision(index);
        }
        if let Some(deleted) = &decoded.deleted {
            return self.prefix_revision(deleted).await;
        }
        self.store_revision(near).await
    }

    /// Reads keys in one consistent snapshot.
    async fn read_keys(
        &self,
        what: &(dyn Fn() -> String + Sync),
        keys: &[String],
    ) -> Result<HashMap<String, Option<Entry>>> {
        let ops: Vec<Value> = keys.iter().map(|k| kv_op("get-or-empty", k)).collect();
        let body = serde_json::to_vec(&ops)
            .map_err(|e| StoreError::backend(format!("{}: encoding", what()), e))?;
        let reply = self
            .request(what, Method::PUT, "/v1/txn?consistent", Some(body))
            .await?;
        if reply.status != StatusCode::OK {
            if reply.status == StatusCode::CONFLICT
                && String::from_utf8_lossy(&reply.body).contains("unknown KV verb")
            {
                return Err(StoreError::backend(
                    format!("{}: {}", what(), self.target),
                    "the Consul backend needs Consul 1.14 or later (txn verb get-or-empty)",
                ));
            }
            return Err(self.status_error(&what(), &reply));
        }
        let parsed: TxnReply = self.decode(&what(), &reply)?;
        let results = parsed.results.unwrap_or_default();
        if results.len() != keys.len() {
            return Err(StoreError::backend(
                format!("{}: {}", what(), self.target),
                format!("{} results for {} reads", results.len(), keys.len()),
            ));
        }
        keys.iter()
            .zip(results)
            .map(|(k, r)| match r.kv {
                Some(e) if e.key == *k => Ok((k.clone(), (e.modify_index != 0).then_some(e))),
                _ => Err(StoreError::backend(
                    format!("{}: {}", what(), self.target),
                    format!("unexpected result for key {k:?}"),
                )),
            })
            .collect()
    }
}

fn holds(compares: &[(String, u64)], state: &HashMap<String, Option<Entry>>) -> bool {
    compares.iter().all(|(key, want)| {
        let have = state
            .get(key)
            .and_then(|e| e.as_ref())
            .map_or(0, |e| e.modify_index);
        have == *want
    })
}

/// A pseudo-random number of microseconds below `below`, for retry jitter
/// (no need for a cryptographic or even a good generator here).
fn rand_micros(below: u64) -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0),
    );
    h.finish() % below.max(1)
}
