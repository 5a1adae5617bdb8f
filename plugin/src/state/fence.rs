//! The write fence for acting on behalf of a gone host (reclaim, gc).
//!
//! Every write made for a host that is gone carries a compare that the
//! host's registration is still absent, in the same transaction. A host that
//! registers again therefore wins every race against its reclaimer: the
//! store, not a clock or a process-local view, decides.

use crate::error::{PluginError, Result, StoreContext};
use crate::state::keys;
use kvstore_backends::{Compare, KvStore, Txn};

/// "Host X is still unregistered": the condition of every write for X.
#[derive(Debug, Clone)]
pub struct GoneHostFence {
    registration: String,
    host: String,
}

impl GoneHostFence {
    pub fn new(host: &str) -> GoneHostFence {
        GoneHostFence {
            registration: keys::host_registration(host),
            host: host.to_string(),
        }
    }

    /// Add the fence's compare to a transaction (no fence: unchanged).
    pub fn apply(fence: &Option<GoneHostFence>, mut txn: Txn) -> Txn {
        if let Some(f) = fence {
            txn.compares.push(Compare::absent(&f.registration));
        }
        txn
    }

    /// Fail fast when the host is registered again.
    pub async fn check(fence: &Option<GoneHostFence>, store: &dyn KvStore) -> Result<()> {
        let Some(f) = fence else { return Ok(()) };
        let reg = store
            .get(&f.registration)
            .await
            .ctx(|| format!("read the registration of host {}", f.host))?;
        if reg.is_some() {
            return Err(PluginError::Conflict(format!(
                "host {} is registered again; nothing of it is reclaimed",
                f.host
            )));
        }
        Ok(())
    }
}
