//! Consul's JSON, as far as the backend reads it: KV entries (`DirEntry`),
//! txn answers and session IDs, and how an entry (base64 value, raft
//! indexes, holding session) becomes the store's [`KeyValue`].

use base64::Engine as _;
use serde::Deserialize;

use crate::{KeyValue, LeaseId, Result, Revision, StoreError};

/// A KV entry as Consul sends it (`DirEntry`).
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "PascalCase")]
pub(super) struct Entry {
    pub(super) key: String,
    #[serde(default)]
    pub(super) value: Option<String>,
    #[serde(default)]
    pub(super) session: Option<String>,
    #[serde(default)]
    pub(super) create_index: u64,
    #[serde(default)]
    pub(super) modify_index: u64,
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
pub(super) struct TxnReply {
    #[serde(default)]
    pub(super) results: Option<Vec<TxnResult>>,
    #[serde(default)]
    pub(super) errors: Option<Vec<TxnError>>,
}

#[derive(Deserialize)]
pub(super) struct TxnResult {
    #[serde(rename = "KV")]
    pub(super) kv: Option<Entry>,
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
pub(super) struct TxnError {
    pub(super) op_index: usize,
    pub(super) what: String,
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
pub(super) struct SessionCreated {
    #[serde(rename = "ID")]
    pub(super) id: String,
}

pub(super) fn revision(index: u64) -> Result<Revision> {
    Revision::try_from(index).map_err(|_| {
        StoreError::backend(
            "reading Consul's answer",
            format!("index {index} is out of range"),
        )
    })
}

impl Entry {
    /// The store's view; an error when the value is not base64 (a broken
    /// answer).
    pub(super) fn to_kv(&self) -> Result<KeyValue> {
        let value = match self.value.as_deref() {
            None | Some("") => Vec::new(),
            Some(v) => base64::engine::general_purpose::STANDARD
                .decode(v)
                .map_err(|e| {
                    StoreError::backend(
                        format!("reading Consul key {:?}", self.key),
                        format!("the value is not base64: {e}"),
                    )
                })?,
        };
        Ok(KeyValue {
            key: format!("/{}", self.key),
            value,
            create_revision: revision(self.create_index)?,
            mod_revision: revision(self.modify_index)?,
            lease: self
                .session
                .as_ref()
                .filter(|s| !s.is_empty())
                .map(|s| LeaseId(s.clone())),
        })
    }
}

/// An entry whose value is its key, for the unit tests.
#[cfg(test)]
pub(super) fn test_entry(key: &str, modify: u64) -> Entry {
    Entry {
        key: key.into(),
        value: Some(base64::engine::general_purpose::STANDARD.encode(key)),
        session: None,
        create_index: modify,
        modify_index: modify,
    }
}
