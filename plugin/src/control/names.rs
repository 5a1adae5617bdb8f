//! Containers' names in the store: what this host publishes per overlay, so
//! that every other host's resolver can answer for them.
//!
//! A name is written under the host's lease, so a dead host's names go when
//! its registration does, and only while the endpoint's record exists, so a
//! publication racing a DeleteEndpoint never leaves a name behind (the
//! endpoint's deletion removes its names in the same transaction).

use crate::error::{Result, StoreContext};
use crate::state::codec::{decode, encode};
use crate::state::keys;
use crate::state::records::NameRecord;
use kvstore_backends::{Compare, KvStore, LeaseId, Op, Txn};
use std::collections::HashMap;
use std::sync::Arc;

pub struct Names {
    store: Arc<dyn KvStore>,
    host: String,
}

impl Names {
    pub fn new(store: Arc<dyn KvStore>, host: &str) -> Self {
        Names {
            store,
            host: host.to_string(),
        }
    }

    /// Publish an endpoint's names. False when the endpoint has no record
    /// (deleted, or not created yet): nothing is written then.
    pub async fn publish(
        &self,
        overlay: &str,
        endpoint_id: &str,
        record: &NameRecord,
        lease: &LeaseId,
    ) -> Result<bool> {
        let endpoint = keys::endpoint(overlay, endpoint_id);
        let key = keys::endpoint_names(overlay, &self.host, endpoint_id);
        let txn = Txn::new()
            .when(vec![Compare::absent(&endpoint)])
            .or_else(vec![Op::put_with_lease(
                &key,
                encode(record),
                lease.clone(),
            )]);
        let resp = self
            .store
            .txn(txn)
            .await
            .ctx(|| format!("publish the names of endpoint {endpoint_id}"))?;
        Ok(!resp.succeeded)
    }

    /// Withdraw an endpoint's names (its container left, or was renamed
    /// away from them). Already gone is fine.
    pub async fn withdraw(&self, overlay: &str, endpoint_id: &str) -> Result<()> {
        let key = keys::endpoint_names(overlay, &self.host, endpoint_id);
        self.store
            .delete(&key)
            .await
            .ctx(|| format!("withdraw the names of endpoint {endpoint_id}"))?;
        Ok(())
    }

    /// What this host has published on the overlay, by endpoint ID.
    pub async fn published(&self, overlay: &str) -> Result<HashMap<String, NameRecord>> {
        let prefix = keys::host_names(overlay, &self.host);
        let resp = self
            .store
            .range(&prefix)
            .await
            .ctx(|| format!("list this host's names on {overlay}"))?;
        let mut out = HashMap::new();
        for kv in &resp.kvs {
            match decode::<NameRecord>(kv) {
                Ok(rec) => {
                    out.insert(kv.key[prefix.len()..].to_string(), rec);
                }
                // Withdrawn and written again by the next publication.
                Err(e) => tracing::warn!(key = %kv.key, error = %e, "unreadable name record"),
            }
        }
        Ok(out)
    }
}
