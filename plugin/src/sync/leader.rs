//! One reaper for the whole cluster, elected through the store: a key held
//! under the leader's registration lease. Only the leader reads the census
//! and reclaims, so the cost of reclaiming does not grow with the number of
//! hosts. The role ends in the same expiry as the leader's registration, so
//! the hosts that see the leader leave the live set can take over at once:
//! reclaim is never late because the leader itself was the host that died.

use crate::state::keys;
use kvstore_backends::{Compare, KvStore, LeaseId, Op, StoreError, Txn};
use std::sync::Arc;
use tokio::sync::watch;

pub struct Leadership {
    store: Arc<dyn KvStore>,
    me: String,
    /// This host's registration lease, while it is registered (and
    /// reconciled); kept alive by the registration loop.
    lease: watch::Receiver<Option<LeaseId>>,
}

impl Leadership {
    pub fn new(
        store: Arc<dyn KvStore>,
        me: String,
        lease: watch::Receiver<Option<LeaseId>>,
    ) -> Self {
        Leadership { store, me, lease }
    }

    /// Claim the role if nobody holds it. True while this host is the
    /// reaper; false on any doubt (unregistered, a store error).
    pub async fn hold(&mut self) -> bool {
        let Some(lease) = self.lease.borrow().clone() else {
            return false;
        };
        match self.try_hold(lease).await {
            Ok(leader) => leader,
            Err(e) => {
                tracing::warn!(error = %e, "could not check the reaper role");
                false
            }
        }
    }

    async fn try_hold(&self, lease: LeaseId) -> Result<bool, StoreError> {
        let key = keys::reaper();
        if let Some(kv) = self.store.get(&key).await? {
            // Ours only under our current lease: a claim of an earlier
            // registration (or run) lapses with that lease.
            return Ok(kv.value == self.me.as_bytes() && kv.lease.as_ref() == Some(&lease));
        }
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
