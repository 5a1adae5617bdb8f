//! Values in the store are JSON: readable with `rustoverlay dump` and
//! `etcdctl`, and tolerant of fields added by later versions.

use crate::error::{PluginError, Result};
use kvstore_backends::{KeyValue, OpResult, Revision};
use serde::Serialize;

pub fn encode<T: Serialize>(v: &T) -> Vec<u8> {
    serde_json::to_vec(v).expect("plain data always serializes")
}

pub fn decode<T: serde::de::DeserializeOwned>(kv: &KeyValue) -> Result<T> {
    serde_json::from_slice(&kv.value).map_err(|e| {
        PluginError::Internal(format!(
            "store key {} holds data this version cannot read: {e}",
            kv.key
        ))
    })
}

/// A value and its revision, or the default and revision 0 when absent.
pub fn decode_or_default<T: serde::de::DeserializeOwned + Default>(
    kv: Option<&KeyValue>,
) -> Result<(T, Revision)> {
    match kv {
        Some(kv) => Ok((decode(kv)?, kv.mod_revision)),
        None => Ok((T::default(), 0)),
    }
}

/// The values of `N` Get results, in order.
pub fn take_gets<const N: usize>(results: Vec<OpResult>) -> [Option<KeyValue>; N] {
    let mut out: [Option<KeyValue>; N] = std::array::from_fn(|_| None);
    for (slot, r) in out.iter_mut().zip(results) {
        if let OpResult::Get(kv) = r {
            *slot = kv;
        }
    }
    out
}
