//! Planning a txn branch as one `/v1/txn` request, and reading its answer.
//! Pure, no I/O: the ops of a branch with their Consul keys, the plan (checks
//! for the compares, `get-tree`s of deleted prefixes, then the ops: a put is
//! `lock` + `unlock` with the writer session or `lock` with its lease, a
//! delete reads the key first to count it), the Consul op budget, the
//! decoding of the results into the store's, and why a refused branch (409)
//! was refused.

use std::collections::{HashMap, HashSet};

use base64::Engine as _;
use serde_json::{json, Value};

use super::keys::{consul_key, consul_prefix, session_id};
use super::wire::{Entry, TxnError};
use crate::{Op, OpResult, Result, StoreError};

/// Consul's `maxTxnOps`.
pub(super) const MAX_TXN_OPS: usize = 64;

/// One op of a branch, with its Consul key.
#[derive(Clone, Debug)]
pub(super) enum BranchOp {
    Get {
        key: String,
    },
    Delete {
        key: String,
    },
    DeletePrefix {
        prefix: String,
    },
    Put {
        key: String,
        value: Vec<u8>,
        lease: Option<String>,
    },
}

impl BranchOp {
    /// The key, or the deleted prefix.
    pub(super) fn key(&self) -> &str {
        match self {
            BranchOp::Get { key } | BranchOp::Delete { key } | BranchOp::Put { key, .. } => key,
            BranchOp::DeletePrefix { prefix } => prefix,
        }
    }
}

pub(super) fn branch_ops(ops: &[Op]) -> Result<Vec<BranchOp>> {
    ops.iter()
        .map(|op| {
            Ok(match op {
                Op::Get { key } => BranchOp::Get {
                    key: consul_key(key)?.to_owned(),
                },
                Op::Delete { key } => BranchOp::Delete {
                    key: consul_key(key)?.to_owned(),
                },
                Op::DeletePrefix { prefix } => BranchOp::DeletePrefix {
                    prefix: consul_prefix(prefix)?.to_owned(),
                },
                Op::Put { key, value, lease } => BranchOp::Put {
                    key: consul_key(key)?.to_owned(),
                    value: value.clone(),
                    lease: match lease {
                        Some(l) => Some(
                            session_id(l)
                                .ok_or_else(|| StoreError::LeaseNotFound(l.0.clone()))?
                                .to_owned(),
                        ),
                        None => None,
                    },
                },
            })
        })
        .collect()
}

/// Consul operations a branch can need at most (a put or delete takes two).
pub(super) fn worst_case_ops(compares: usize, ops: &[BranchOp]) -> usize {
    compares
        + ops
            .iter()
            .map(|op| match op {
                BranchOp::Get { .. } => 1,
                _ => 2,
            })
            .sum::<usize>()
}

/// What one Consul op of a plan stands for.
#[derive(Clone, Debug)]
enum Slot {
    Check,
    TreeRead,
    Read,
    Delete,
    /// lock by the writer session / by a lease / unlock by the writer / by
    /// the known holder; `op` is the branch op.
    LockWriter {
        op: usize,
    },
    LockLease {
        op: usize,
        lease: String,
    },
    UnlockWriter {
        op: usize,
    },
    UnlockHolder {
        op: usize,
    },
}

pub(super) struct Plan {
    pub(super) ops: Vec<Value>,
    slots: Vec<Slot>,
    pub(super) writes: bool,
    /// Results of the check section (one per check-index).
    check_results: usize,
    /// Results after the get-tree section (fixed count).
    tail_results: usize,
    /// Branch op index of each get-tree, in order.
    tree_ops: Vec<usize>,
    /// Results each branch op produces in the tail.
    op_results: Vec<usize>,
}

pub(super) fn kv_op(verb: &str, key: &str) -> Value {
    json!({ "KV": { "Verb": verb, "Key": key } })
}

fn kv_write(verb: &str, key: &str, value: &[u8], session: &str) -> Value {
    let mut op = kv_op(verb, key);
    op["KV"]["Value"] = Value::String(base64::engine::general_purpose::STANDARD.encode(value));
    op["KV"]["Session"] = Value::String(session.to_owned());
    op
}

/// Builds a branch: checks first, then the get-trees of deleted prefixes
/// (so they all read the state the txn starts from), then the ops in order.
/// `holders`: keys known to be locked by a session (learned from a failed
/// attempt); `writer`: the writer session, needed for puts without a lease.
pub(super) fn build_plan(
    checks: &[(String, u64)],
    ops: &[BranchOp],
    holders: &HashMap<String, String>,
    writer: Option<&str>,
) -> Result<Plan> {
    let mut plan = Plan {
        ops: Vec::new(),
        slots: Vec::new(),
        writes: false,
        check_results: 0,
        tail_results: 0,
        tree_ops: Vec::new(),
        op_results: vec![0; ops.len()],
    };
    for (key, index) in checks {
        let op = if *index == 0 {
            kv_op("check-not-exists", key)
        } else {
            plan.check_results += 1;
            let mut op = kv_op("check-index", key);
            op["KV"]["Index"] = json!(index);
            op
        };
        plan.ops.push(op);
        plan.slots.push(Slot::Check);
    }
    for (i, op) in ops.iter().enumerate() {
        if let BranchOp::DeletePrefix { prefix } = op {
            plan.ops.push(kv_op("get-tree", prefix));
            plan.slots.push(Slot::TreeRead);
            plan.tree_ops.push(i);
        }
    }
    for (i, op) in ops.iter().enumerate() {
        let push = |plan: &mut Plan, value: Value, slot: Slot, results: usize| {
            plan.ops.push(value);
            plan.slots.push(slot);
            plan.op_results[i] += results;
            plan.tail_results += results;
        };
        match op {
            BranchOp::Get { key } => push(&mut plan, kv_op("get-or-empty", key), Slot::Read, 1),
            BranchOp::Delete { key } => {
                push(&mut plan, kv_op("get-or-empty", key), Slot::Read, 1);
                push(&mut plan, kv_op("delete", key), Slot::Delete, 0);
                plan.writes = true;
            }
            BranchOp::DeletePrefix { prefix } => {
                push(&mut plan, kv_op("delete-tree", prefix), Slot::Delete, 0);
                plan.writes = true;
            }
            BranchOp::Put { key, value, lease } => {
                plan.writes = true;
                if let Some(holder) = holders.get(key) {
                    push(
                        &mut plan,
                        kv_write("unlock", key, value, holder),
                        Slot::UnlockHolder { op: i },
                        1,
                    );
                }
                match (lease, holders.contains_key(key)) {
                    (Some(lease), _) => push(
                        &mut plan,
                        kv_write("lock", key, value, lease),
                        Slot::LockLease {
                            op: i,
                            lease: lease.clone(),
                        },
                        1,
                    ),
                    // Unlocked by the holder above: that was the put.
                    (None, true) => {}
                    (None, false) => {
                        let writer = writer.ok_or_else(|| {
                            StoreError::backend("planning a Consul txn", "no writer session")
                        })?;
                        push(
                            &mut plan,
                            kv_write("lock", key, value, writer),
                            Slot::LockWriter { op: i },
                            1,
                        );
                        push(
                            &mut plan,
                            kv_write("unlock", key, value, writer),
                            Slot::UnlockWriter { op: i },
                            1,
                        );
                    }
                }
            }
        }
    }
    if plan.ops.len() > MAX_TXN_OPS {
        return Err(StoreError::Invalid(format!(
            "txn needs {} Consul operations; Consul takes at most {MAX_TXN_OPS}",
            plan.ops.len()
        )));
    }
    Ok(plan)
}

/// What a branch's results say.
pub(super) struct Decoded {
    pub(super) results: Vec<OpResult>,
    /// The index the branch's puts were written at.
    pub(super) written: Option<u64>,
    /// A key or prefix the branch deleted something under.
    pub(super) deleted: Option<String>,
}

pub(super) fn decode_results(
    plan: &Plan,
    ops: &[BranchOp],
    results: Vec<Entry>,
) -> Result<Decoded, String> {
    let fixed = plan.check_results + plan.tail_results;
    if results.len() < fixed {
        return Err(format!(
            "{} results for {} operations that return at least {fixed}",
            results.len(),
            plan.ops.len()
        ));
    }
    let trees_end = results.len() - plan.tail_results;
    let trees = &results[plan.check_results..trees_end];
    let tail = &results[trees_end..];
    // The get-trees all read the same state, each in key order: the split is
    // unique.
    let mut tree_of: HashMap<usize, &[Entry]> = HashMap::new();
    let mut at = 0;
    for &i in &plan.tree_ops {
        let BranchOp::DeletePrefix { prefix } = &ops[i] else {
            return Err("planned read for an op that is not a deleted prefix".into());
        };
        let start = at;
        while at < trees.len()
            && trees[at].key.starts_with(prefix.as_str())
            && (at == start || trees[at].key > trees[at - 1].key)
        {
            at += 1;
        }
        tree_of.insert(i, &trees[start..at]);
    }
    if at != trees.len() {
        return Err(format!(
            "{} results not matching any operation",
            trees.len() - at
        ));
    }
    let mut tail = tail.iter();
    let mut gone: HashSet<&str> = HashSet::new();
    let mut decoded = Decoded {
        results: Vec::with_capacity(ops.len()),
        written: None,
        deleted: None,
    };
    for (i, op) in ops.iter().enumerate() {
        let mut mine = Vec::with_capacity(plan.op_results[i]);
        for _ in 0..plan.op_results[i] {
            mine.push(tail.next().ok_or("too few results")?);
        }
        let own_key = op.key();
        if let Some(e) = mine.iter().find(|e| e.key != own_key) {
            return Err(format!(
                "a result for key {:?} where {own_key:?} was expected",
                e.key
            ));
        }
        let result = match op {
            BranchOp::Get { .. } => {
                let e = mine.first().ok_or("missing get result")?;
                if e.modify_index == 0 {
                    OpResult::Get(None)
                } else {
                    OpResult::Get(Some(e.to_kv().map_err(|e| e.to_string())?))
                }
            }
            BranchOp::Delete { key } => {
                let e = mine.first().ok_or("missing read before delete")?;
                let existed = e.modify_index != 0;
                if existed {
                    gone.insert(key);
                    decoded.deleted = Some(key.clone());
                }
                OpResult::Delete {
                    deleted: u64::from(existed),
                }
            }
            BranchOp::DeletePrefix { prefix } => {
                let entries = tree_of.get(&i).copied().unwrap_or_default();
                let mut deleted = 0;
                for e in entries {
                    if gone.insert(e.key.as_str()) {
                        deleted += 1;
                    }
                }
                if deleted > 0 {
                    decoded.deleted = Some(prefix.clone());
                }
                OpResult::Delete { deleted }
            }
            BranchOp::Put { .. } => {
                for e in &mine {
                    decoded.written = decoded.written.max(Some(e.modify_index));
                }
                OpResult::Put
            }
        };
        decoded.results.push(result);
    }
    if tail.next().is_some() {
        return Err("more results than operations".into());
    }
    Ok(decoded)
}

/// Why a branch came back with 409.
pub(super) enum Refusal {
    ComparesFailed,
    LeaseGone(String),
    WriterGone(String),
    /// Keys whose lock holder is not what the plan assumed.
    Held(Vec<String>),
    TooOld(String),
    Other(String),
}

pub(super) fn classify(
    plan: &Plan,
    ops: &[BranchOp],
    errors: &[TxnError],
    writer: Option<&str>,
) -> Refusal {
    let slot = |e: &TxnError| plan.slots.get(e.op_index);
    let key_of = |op: usize| match &ops[op] {
        BranchOp::Put { key, .. } => key.clone(),
        _ => String::new(),
    };
    if errors.iter().any(|e| matches!(slot(e), Some(Slot::Check))) {
        return Refusal::ComparesFailed;
    }
    for e in errors {
        if let Some(Slot::LockLease { lease, .. }) = slot(e) {
            if e.what.contains("invalid session") {
                return Refusal::LeaseGone(lease.clone());
            }
        }
    }
    if let Some(e) = errors.iter().find(|e| e.what.contains("unknown KV verb")) {
        return Refusal::TooOld(e.what.clone());
    }
    if let Some(w) = writer {
        if errors.iter().any(|e| {
            matches!(slot(e), Some(Slot::LockWriter { .. })) && e.what.contains("invalid session")
        }) {
            return Refusal::WriterGone(w.to_owned());
        }
    }
    let mut held = Vec::new();
    let mut other = Vec::new();
    for e in errors {
        match slot(e) {
            Some(Slot::LockWriter { op } | Slot::LockLease { op, .. })
                if e.what.contains("already held") =>
            {
                held.push(key_of(*op))
            }
            Some(Slot::UnlockHolder { op }) => held.push(key_of(*op)),
            // Follows from its lock failing, or from a holder change.
            Some(Slot::UnlockWriter { op }) => held.push(key_of(*op)),
            _ => other.push(format!("operation {}: {}", e.op_index, e.what)),
        }
    }
    if !other.is_empty() {
        return Refusal::Other(other.join("; "));
    }
    held.sort();
    held.dedup();
    Refusal::Held(held)
}

#[cfg(test)]
mod tests {
    use super::super::wire::test_entry as entry;
    use super::*;

    #[test]
    fn results_split_between_tree_reads_and_ops() {
        let ops = vec![
            BranchOp::DeletePrefix {
                prefix: "a/".into(),
            },
            BranchOp::Delete { key: "a/1".into() },
            BranchOp::DeletePrefix {
                prefix: "a/b".into(),
            },
            BranchOp::Get { key: "a/1".into() },
            BranchOp::Put {
                key: "z".into(),
                value: b"v".to_vec(),
                lease: None,
            },
        ];
        let plan = build_plan(&[("c".into(), 5)], &ops, &HashMap::new(), Some("w")).unwrap();
        // check, 2 trees, [read, del-tree], [read, del], [del-tree], [read], [lock, unlock]
        assert_eq!(plan.ops.len(), 1 + 2 + 1 + 2 + 1 + 1 + 2);
        let results = vec![
            entry("c", 5),
            // get-tree a/ then get-tree a/b: same state.
            entry("a/1", 3),
            entry("a/b", 4),
            entry("a/bc", 4),
            entry("a/b", 4),
            entry("a/bc", 4),
            // get-or-empty a/1 before its delete: already gone.
            Entry {
                modify_index: 0,
                ..entry("a/1", 0)
            },
            Entry {
                modify_index: 0,
                ..entry("a/1", 0)
            },
            entry("z", 9),
            entry("z", 9),
        ];
        let d = decode_results(&plan, &ops, results).unwrap();
        assert_eq!(
            d.results,
            vec![
                OpResult::Delete { deleted: 3 },
                OpResult::Delete { deleted: 0 },
                OpResult::Delete { deleted: 0 },
                OpResult::Get(None),
                OpResult::Put,
            ]
        );
        assert_eq!(d.written, Some(9));
        assert_eq!(d.deleted.as_deref(), Some("a/"));
    }
}
