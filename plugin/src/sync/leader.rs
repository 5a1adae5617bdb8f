//! One reaper for the whole cluster, elected through the store: a key held
//! under the leader's own lease. Only the leader reads the census and
//! reclaims, so the cost of reclaiming does not grow with the number of
//! hosts; if the leader dies, its lease ends and another host takes over.

use crate::state::keys;
use kvstore_backends::{Compare, KvStore, LeaseId, Op, StoreError, Txn};
use std::sync::Arc;
use std::time::Duration;

pub struct Leadership {
    store: Arc<dyn KvStore>,
    me: String,
    ttl: Duration,
    lease: Option<LeaseId>,
}

impl Leadership {
    pub fn new(store: Arc<dyn KvStore>, me: String, ttl: Duration) -> Self {
        Leadership {
            store,
            me,
            ttl,
            lease: None,
        }
    }

    /// Renew this host's claim, or make one if nobody holds the role. True
    /// while this host is the reaper; false on any doubt (a store error).
    pub async fn hold(&mut self) -> bool {
        match self.try_hold().await {
            Ok(leader) => leader,
            Err(e) => {
                tracing::warn!(error = %e, "could not check the reaper role");
                false
            }
        }
    }

    async fn try_hold(&mut self) -> Result<bool, StoreError> {
        if let Some(lease) = &self.lease {
            match self.store.keep_alive(lease.clone()).await {
                Ok(()) => {}
                Err(StoreError::LeaseNotFound(_)) => self.lease = None,
                Err(e) => return Err(e),
            }
        }
        let key = keys::reaper();
        if let Some(kv) = self.store.get(&key).await? {
            // Ours only under our live lease: a claim left by an earlier run
            // of this plugin lapses with that run's lease.
            return Ok(kv.value == self.me.as_bytes() && self.lease.is_some());
        }
        let lease = match &self.lease {
            Some(l) => l.clone(),
            None => {
                let l = self.store.grant_lease(self.ttl).await?;
                self.lease = Some(l.clone());
                l
            }
        };
        let taken =
            self.store
                .txn(Txn::new().when(vec![Compare::absent(&key)]).and_then(vec![
                    Op::put_with_lease(&key, self.me.as_bytes().to_vec(), lease),
                ]))
                .await?
                .succeeded;
        if taken {
            tracing::info!(host = %self.me, "this host is the cluster's reaper");
        }
        Ok(taken)
    }
}
