//! Reads: one key, and every key under a prefix with the revision the read
//! was taken at; and the conversion of etcd's key-values (keys are bytes
//! there) into the store's, which the txn and watch answers use too.

use etcd_client::proto::PbKeyValue;
use etcd_client::GetOptions;

use super::connection::Connections;
use super::error::missing_header;
use crate::validate::check_key;
use crate::{KeyValue, LeaseId, RangeResponse, Result, StoreError};

pub(super) async fn get(conns: &Connections, key: &str) -> Result<Option<KeyValue>> {
    check_key(key)?;
    let what = || format!("get {key:?}");
    let resp = conns
        .read(what, |mut c| async move { c.kv.get(key, None).await })
        .await?;
    let kv = resp.0.kvs.into_iter().next();
    kv.map(|kv| key_value(kv).ok_or_else(|| bad_key(&conns.target, &what())))
        .transpose()
}

pub(super) async fn range(conns: &Connections, prefix: &str) -> Result<RangeResponse> {
    let what = || format!("range over prefix {prefix:?}");
    let resp = conns
        .read(what, |mut c| async move {
            c.kv.get(prefix, Some(GetOptions::new().with_prefix()))
                .await
        })
        .await?;
    let resp = resp.0;
    let revision = resp
        .header
        .map(|h| h.revision)
        .ok_or_else(|| missing_header(&conns.target, &what()))?;
    let kvs = resp
        .kvs
        .into_iter()
        .filter_map(|kv| {
            if std::str::from_utf8(&kv.key).is_err() {
                // Not written by us (our keys are strings); cannot be represented.
                let key = String::from_utf8_lossy(&kv.key);
                tracing::warn!(%key, "skipping an etcd key that is not UTF-8");
            }
            key_value(kv)
        })
        .collect();
    Ok(RangeResponse { kvs, revision })
}

/// None when the key is not UTF-8 (never the case for keys we wrote).
pub(super) fn key_value(kv: PbKeyValue) -> Option<KeyValue> {
    Some(KeyValue {
        key: String::from_utf8(kv.key).ok()?,
        value: kv.value,
        create_revision: kv.create_revision,
        mod_revision: kv.mod_revision,
        lease: (kv.lease != 0).then(|| LeaseId(kv.lease.to_string())),
    })
}

fn bad_key(target: &str, what: &str) -> StoreError {
    StoreError::backend(format!("{target}: {what}"), "etcd returned a non-UTF-8 key")
}
