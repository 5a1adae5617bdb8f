//! One reaper for the whole cluster, elected through the store: a key held
//! under the leader's registration lease. Only the leader keeps the census
//! and reclaims, so the cost of reclaiming does not grow with the number of
//! hosts. The role ends in the same expiry as the leader's registration, so
//! the hosts that see the leader leave the live set can take over at once:
//! reclaim is never late because the leader itself was the host that died.
//! Each host knows the role from one read and a watch of its key, so an
//! idle host checks it without reading the store, and hears at once when
//! the holder's lease ends.
//! While this host leads, the reaper keeps the census in memory
//! (`census_feed`).

use crate::state::keys;
use futures::{FutureExt, StreamExt};
use kvstore_backends::{Compare, KvStore, LeaseId, Op, Revision, StoreError, Txn, WatchStream};
use std::sync::Arc;
use tokio::sync::watch;

/// This host's part, as [`Leadership::check`] found it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// This host is the cluster's reaper.
    Reaper,
    /// Another host is, or this host is not registered.
    Other,
    /// The store could not say (an error): not the reaper for now, but the
    /// reaper's census model is kept, so that a short outage costs no second
    /// full read.
    Unknown,
}

pub struct Leadership {
    store: Arc<dyn KvStore>,
    me: String,
    /// This host's registration lease, while it is registered (and
    /// reconciled); kept alive by the registration loop.
    lease: watch::Receiver<Option<LeaseId>>,
    /// The role as the last read found it, under which lease, and a watch
    /// of the role's key from that read on. While the watch is quiet and
    /// the lease the same, the role is what it was: an idle host checks
    /// without reading the store.
    known: Option<Known>,
}

struct Known {
    lease: LeaseId,
    role: Role,
    key: WatchStream,
}

impl Leadership {
    pub fn new(
        store: Arc<dyn KvStore>,
        me: String,
        lease: watch::Receiver<Option<LeaseId>>,
    ) -> Self {
        Leadership {
            store,
            me,
            lease,
            known: None,
        }
    }

    /// Wait until the role's key changes (a claim, or the holder's lease
    /// ending), so that the role is checked again at once. Pending while
    /// nothing is known. Cancel-safe.
    pub async fn changed(&mut self) {
        match self.known.as_mut() {
            Some(known) => {
                let _ = known.key.next().await;
                self.known = None;
            }
            None => std::future::pending().await,
        }
    }

    /// The role last read, if neither the lease nor the role's key changed
    /// since.
    fn still_known(&mut self, lease: &LeaseId) -> Option<Role> {
        let known = self.known.as_mut()?;
        // Any event, error or end of the watch: read again.
        let quiet = known.key.next().now_or_never().is_none();
        if quiet && &known.lease == lease {
            return Some(known.role);
        }
        self.known = None;
        None
    }

    /// Claim the role if nobody holds it. True while this host is the
    /// reaper; false on any doubt (unregistered, a store error).
    pub async fn hold(&mut self) -> bool {
        self.check().await == Role::Reaper
    }

    /// Claim the role if nobody holds it, and say whether this host has it.
    pub async fn check(&mut self) -> Role {
        let Some(lease) = self.lease.borrow().clone() else {
            self.known = None;
            return Role::Other;
        };
        if let Some(role) = self.still_known(&lease) {
            return role;
        }
        match try_hold(self.store.as_ref(), &self.me, &lease).await {
            Ok((held, key)) => {
                let role = if held { Role::Reaper } else { Role::Other };
                self.known = key.map(|key| Known { lease, role, key });
                role
            }
            Err(e) => {
                tracing::warn!(error = %e, "could not check the reaper role");
                Role::Unknown
            }
        }
    }
}

/// Whether this host holds the role (claiming it if free), and a watch
/// of the role's key from the read that decided it (None when the role
/// was claimed just now: the claim's own event would end it at once).
async fn try_hold(
    store: &dyn KvStore,
    me: &str,
    lease: &LeaseId,
) -> Result<(bool, Option<WatchStream>), StoreError> {
    let key = keys::reaper();
    let read = store.range(&key).await?;
    if let Some(kv) = read.kvs.iter().find(|kv| kv.key == key) {
        // Ours only under our current lease: a claim of an earlier
        // registration (or run) lapses with that lease.
        let ours = kv.value == me.as_bytes() && kv.lease.as_ref() == Some(lease);
        return Ok((ours, watch_from(store, &key, read.revision).await));
    }
    let taken = store
        .txn(
            Txn::new()
                .when(vec![Compare::absent(&key)])
                .and_then(vec![Op::put_with_lease(
                    &key,
                    me.as_bytes().to_vec(),
                    lease.clone(),
                )]),
        )
        .await?
        .succeeded;
    if taken {
        tracing::info!(host = %me, "this host is the cluster's reaper");
    }
    Ok((taken, None))
}

/// A watch of the role's key after `revision`; None if it cannot be
/// opened (the next check reads again).
async fn watch_from(store: &dyn KvStore, key: &str, revision: Revision) -> Option<WatchStream> {
    match store.watch(key, revision + 1).await {
        Ok(stream) => Some(stream),
        Err(e) => {
            tracing::debug!(error = %e, "could not watch the reaper role; reading it at each check");
            None
        }
    }
}
