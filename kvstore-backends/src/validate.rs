//! The checks every backend makes before it touches its data, in one place
//! so that they all reject the same requests with the same errors (and code
//! tested on one backend does not fail on another).

use std::collections::BTreeSet;

use crate::{Compare, Op, Result, Revision, StoreError, Txn};

pub(crate) fn check_key(key: &str) -> Result<()> {
    if key.is_empty() {
        return Err(StoreError::Invalid("empty key".into()));
    }
    Ok(())
}

/// The checks every backend makes before running a txn (shared so that they
/// all reject the same requests).
pub(crate) fn validate_txn(txn: &Txn) -> Result<()> {
    for c in &txn.compares {
        match c {
            Compare::ModRevision { key, .. } => check_key(key)?,
        }
    }
    for op in txn.success.iter().chain(&txn.failure) {
        match op {
            Op::Put { key, .. } | Op::Delete { key } | Op::Get { key } => check_key(key)?,
            // An empty prefix would wipe the whole store; nobody means that.
            Op::DeletePrefix { prefix } if prefix.is_empty() => {
                return Err(StoreError::Invalid(
                    "delete with an empty prefix (would delete every key)".into(),
                ))
            }
            Op::DeletePrefix { .. } => {}
        }
    }
    check_single_writes(&txn.success)?;
    check_single_writes(&txn.failure)
}

/// A remote backend's cap on [`Txn::len`]: `backend` ("etcd", "Consul")
/// takes at most `max` compares and ops in one txn.
pub(crate) fn check_txn_len(txn: &Txn, backend: &str, max: usize) -> Result<()> {
    if txn.len() > max {
        return Err(StoreError::Invalid(format!(
            "txn has {} compares and ops; {backend} takes at most {max}",
            txn.len()
        )));
    }
    Ok(())
}

/// etcd refuses a branch that writes one key twice (two puts, or a put and a
/// delete or deleted prefix covering it, in any order). Every backend refuses
/// it too, so that code tested on one backend does not fail on etcd.
/// Overlapping deletes are fine, as in etcd.
fn check_single_writes(ops: &[Op]) -> Result<()> {
    let mut puts = BTreeSet::new();
    for op in ops {
        if let Op::Put { key, .. } = op {
            if !puts.insert(key.as_str()) {
                return Err(StoreError::Invalid(format!(
                    "txn puts key {key:?} twice in one branch (etcd refuses that)"
                )));
            }
        }
    }
    for op in ops {
        let covered = |key: &str| match op {
            Op::Delete { key: deleted } => key == deleted,
            Op::DeletePrefix { prefix } => key.starts_with(prefix.as_str()),
            Op::Put { .. } | Op::Get { .. } => false,
        };
        if let Some(key) = puts.iter().find(|key| covered(key)) {
            return Err(StoreError::Invalid(format!(
                "txn both puts and deletes key {key:?} in one branch (etcd refuses that)"
            )));
        }
    }
    Ok(())
}

/// A watch starts at revision 0 ("from now") or later.
pub(crate) fn check_watch_start(start_revision: Revision) -> Result<()> {
    if start_revision < 0 {
        return Err(StoreError::Invalid(format!(
            "watch start revision {start_revision} is negative"
        )));
    }
    Ok(())
}
