//! Transactions: our [`Txn`] and [`Op`]s translated into etcd's, sent, and
//! etcd's answer translated back, checked against the ops of the branch that
//! ran (a malformed answer is an error, not a panic). etcd's "lease not
//! found" does not say which lease; that is found out here too.

use etcd_client::proto::PbTxnOpResponse;
use etcd_client::{
    Compare as EtcdCompare, CompareOp, DeleteOptions, PutOptions, Txn as EtcdTxn, TxnOp,
};

use super::connection::Connections;
use super::error::missing_header;
use super::kv::key_value;
use super::lease::parse_lease;
use crate::validate::{check_txn_len, validate_txn};
use crate::{Compare, LeaseId, Op, OpResult, Result, StoreError, Txn, TxnResponse};

/// etcd's default `--max-txn-ops`.
const MAX_TXN_OPS: usize = 128;

pub(super) async fn run(conns: &Connections, txn: Txn) -> Result<TxnResponse> {
    validate_txn(&txn)?;
    check_txn_len(&txn, "etcd", MAX_TXN_OPS)?;
    let request = etcd_txn(&txn)?;
    let what = || {
        let first = txn
            .success
            .iter()
            .chain(&txn.failure)
            .map(op_key)
            .chain(txn.compares.iter().map(|c| match c {
                Compare::ModRevision { key, .. } => key.as_str(),
            }))
            .next()
            .unwrap_or("");
        format!(
            "txn ({} compares, {}/{} ops, first key {first:?})",
            txn.compares.len(),
            txn.success.len(),
            txn.failure.len()
        )
    };
    let result = conns
        .call(what, |mut c| {
            let request = request.clone();
            async move { c.kv.txn(request).await }
        })
        .await;
    let resp = match result {
        Ok(resp) => resp.0,
        Err(StoreError::LeaseNotFound(_)) => {
            return Err(StoreError::LeaseNotFound(missing_lease(conns, &txn).await))
        }
        Err(e) => return Err(e),
    };
    let revision = resp
        .header
        .map(|h| h.revision)
        .ok_or_else(|| missing_header(&conns.target, &what()))?;
    let ops = if resp.succeeded {
        &txn.success
    } else {
        &txn.failure
    };
    if resp.responses.len() != ops.len() {
        return Err(StoreError::backend(
            format!("{}: {}", conns.target, what()),
            format!(
                "etcd answered {} op results for {} ops",
                resp.responses.len(),
                ops.len()
            ),
        ));
    }
    let mut results = Vec::with_capacity(ops.len());
    for (op, answer) in ops.iter().zip(resp.responses) {
        let result = match (op, answer.response) {
            (Op::Put { .. }, Some(PbTxnOpResponse::ResponsePut(_))) => Some(OpResult::Put),
            (
                Op::Delete { .. } | Op::DeletePrefix { .. },
                Some(PbTxnOpResponse::ResponseDeleteRange(d)),
            ) => Some(OpResult::Delete {
                deleted: u64::try_from(d.deleted).unwrap_or(0),
            }),
            (Op::Get { .. }, Some(PbTxnOpResponse::ResponseRange(r))) => {
                match r.kvs.into_iter().next().map(key_value) {
                    None => Some(OpResult::Get(None)),
                    Some(Some(kv)) => Some(OpResult::Get(Some(kv))),
                    Some(None) => None,
                }
            }
            _ => None,
        };
        results.push(result.ok_or_else(|| {
            StoreError::backend(
                format!("{}: {}", conns.target, what()),
                format!("etcd answered {op:?} with an unexpected result"),
            )
        })?);
    }
    Ok(TxnResponse {
        succeeded: resp.succeeded,
        revision,
        results,
    })
}

/// etcd says "lease not found" without naming it: find out which lease of
/// the txn it meant (the txn usually has one).
async fn missing_lease(conns: &Connections, txn: &Txn) -> String {
    let mut leases: Vec<&str> = Vec::new();
    for op in txn.success.iter().chain(&txn.failure) {
        if let Op::Put {
            lease: Some(lease), ..
        } = op
        {
            if !leases.contains(&lease.0.as_str()) {
                leases.push(&lease.0);
            }
        }
    }
    if leases.len() > 1 {
        for lease in &leases {
            let Some(id) = parse_lease(&LeaseId((*lease).to_owned())) else {
                return (*lease).to_owned();
            };
            let alive = conns
                .call(String::new, |mut c| async move {
                    c.lease.time_to_live(id, None).await
                })
                .await;
            if matches!(&alive, Err(StoreError::LeaseNotFound(_)))
                || matches!(&alive, Ok(r) if r.ttl() <= 0)
            {
                return (*lease).to_owned();
            }
        }
    }
    leases.first().map_or_else(String::new, |l| (*l).to_owned())
}

fn etcd_txn(txn: &Txn) -> Result<EtcdTxn> {
    let compares: Vec<EtcdCompare> = txn
        .compares
        .iter()
        .map(|c| match c {
            // etcd compares an absent key as if all its fields were 0, so
            // mod_revision 0 means "absent" there too.
            Compare::ModRevision { key, mod_revision } => {
                EtcdCompare::mod_revision(key.as_str(), CompareOp::Equal, *mod_revision)
            }
        })
        .collect();
    Ok(EtcdTxn::new()
        .when(compares)
        .and_then(etcd_ops(&txn.success)?)
        .or_else(etcd_ops(&txn.failure)?))
}

fn etcd_ops(ops: &[Op]) -> Result<Vec<TxnOp>> {
    ops.iter()
        .map(|op| {
            Ok(match op {
                Op::Put { key, value, lease } => {
                    let options = match lease {
                        Some(lease) => Some(
                            PutOptions::new().with_lease(
                                parse_lease(lease)
                                    .ok_or_else(|| StoreError::LeaseNotFound(lease.0.clone()))?,
                            ),
                        ),
                        None => None,
                    };
                    TxnOp::put(key.as_str(), value.clone(), options)
                }
                Op::Delete { key } => TxnOp::delete(key.as_str(), None),
                Op::DeletePrefix { prefix } => {
                    TxnOp::delete(prefix.as_str(), Some(DeleteOptions::new().with_prefix()))
                }
                Op::Get { key } => TxnOp::get(key.as_str(), None),
            })
        })
        .collect()
}

fn op_key(op: &Op) -> &str {
    match op {
        Op::Put { key, .. } | Op::Delete { key } | Op::Get { key } => key,
        Op::DeletePrefix { prefix } => prefix,
    }
}
