//! Networks defined once (`-o cluster=true`): their definitions in the
//! store, and the one cluster-wide decision about removing them.
//!
//! A definition lives at `cluster/<overlay>` until every host has removed
//! its copy. Removal is all or nothing: it starts only when no host has a
//! container on the overlay, and a container created meanwhile either comes
//! first (and stops the removal) or fails. Every CreateEndpoint on a cluster
//! network touches `overlay/<overlay>/epgen`, so the removal's compare sees it.

use crate::error::{PluginError, Result, StoreContext};
use crate::state::codec::{decode, encode, take_gets};
use crate::state::keys;
use crate::state::records::{ClusterNetwork, EndpointRecord};
use crate::util::backoff::Retry;
use kvstore_backends::{Compare, KvStore, Op, RangeResponse, Revision, Txn};
use std::collections::BTreeSet;
use std::sync::Arc;

/// What a host's removal of its copy means for the whole cluster.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Removal {
    /// The network is being removed from every host.
    Everywhere,
    /// Containers on these hosts use it: it stays everywhere.
    InUse(Vec<String>),
    /// Not a network defined once (or its definition is already gone).
    NotDefined,
}

pub struct Clusters {
    store: Arc<dyn KvStore>,
    host: String,
}

impl Clusters {
    pub fn new(store: Arc<dyn KvStore>, host: &str) -> Self {
        Clusters {
            store,
            host: host.to_string(),
        }
    }

    /// The definition on an overlay, with its revision.
    pub async fn get(&self, overlay: &str) -> Result<Option<(ClusterNetwork, Revision)>> {
        let kv = self
            .store
            .get(&keys::cluster_network(overlay))
            .await
            .ctx(|| format!("read the cluster definition of {overlay}"))?;
        kv.map(|kv| Ok((decode(&kv)?, kv.mod_revision))).transpose()
    }

    /// Store a definition unless the overlay has one; the one that is there
    /// afterwards (ours, or an earlier host's).
    pub async fn define(&self, overlay: &str, def: &ClusterNetwork) -> Result<ClusterNetwork> {
        let key = keys::cluster_network(overlay);
        let txn = Txn::new()
            .when(vec![Compare::absent(&key)])
            .and_then(vec![Op::put(&key, encode(def))])
            .or_else(vec![Op::get(&key)]);
        let resp = self
            .store
            .txn(txn)
            .await
            .ctx(|| format!("define cluster network {}", def.name))?;
        if resp.succeeded {
            tracing::info!(network = %def.name, %overlay, "network defined for every host");
            return Ok(def.clone());
        }
        let [current] = take_gets::<1>(resp.results);
        match current {
            Some(kv) => decode(&kv),
            None => Err(PluginError::Conflict(format!(
                "the definition of cluster network {} changed while it was stored; it is \
                 stored again on the next change",
                def.name
            ))),
        }
    }

    /// The compares and writes a CreateEndpoint on a cluster network adds
    /// to its transaction, or an error when the network is being removed.
    pub async fn endpoint_fence(&self, overlay: &str) -> Result<(Vec<Compare>, Vec<Op>)> {
        let epgen = Op::put(keys::overlay_epgen(overlay), self.host.clone());
        match self.get(overlay).await? {
            Some((def, _)) if def.removing => Err(PluginError::Conflict(format!(
                "network {} is being removed from every host; wait until it is gone and \
                 create it again",
                def.name
            ))),
            Some((_, rev)) => Ok((
                vec![Compare::mod_revision(keys::cluster_network(overlay), rev)],
                vec![epgen],
            )),
            // Not defined yet (its creator publishes it in a moment): no
            // removal can be under way either.
            None => Ok((vec![], vec![epgen])),
        }
    }

    /// This host removed its copy: start the removal everywhere, unless
    /// another host has containers on the overlay.
    pub async fn removal(&self, overlay: &str) -> Result<Removal> {
        let def_key = keys::cluster_network(overlay);
        let gen_key = keys::overlay_epgen(overlay);
        let mut retry = Retry::new();
        while retry.next().await {
            // epgen first, then the endpoints: an endpoint created after
            // the list changes epgen, and the write below fails.
            let epgen = self
                .store
                .get(&gen_key)
                .await
                .ctx(|| format!("read the endpoint generation of {overlay}"))?;
            let eps = self
                .store
                .range(&keys::overlay_endpoints(overlay))
                .await
                .ctx(|| format!("list the endpoints of {overlay}"))?;
            let Some(def_kv) = self
                .store
                .get(&def_key)
                .await
                .ctx(|| format!("read the cluster definition of {overlay}"))?
            else {
                return Ok(Removal::NotDefined);
            };
            let mut def: ClusterNetwork = decode(&def_kv)?;
            if def.removing {
                return Ok(Removal::Everywhere);
            }
            let users = self.other_hosts(&eps)?;
            if !users.is_empty() {
                return Ok(Removal::InUse(users));
            }
            def.removing = true;
            let gen_compare = match &epgen {
                Some(kv) => Compare::mod_revision(&gen_key, kv.mod_revision),
                None => Compare::absent(&gen_key),
            };
            let txn = Txn::new()
                .when(vec![
                    Compare::mod_revision(&def_key, def_kv.mod_revision),
                    gen_compare,
                ])
                .and_then(vec![Op::put(&def_key, encode(&def))]);
            match self.store.txn(txn).await {
                Ok(resp) if resp.succeeded => {
                    tracing::info!(network = %def.name, %overlay, "network is being removed from every host");
                    return Ok(Removal::Everywhere);
                }
                // Changed meanwhile, or the answer was lost: read again.
                Ok(_) => {}
                Err(e) if e.may_have_applied() => {}
                Err(e) => return Err(e).ctx(|| format!("remove cluster network {}", def.name)),
            }
        }
        Err(PluginError::Conflict(format!(
            "could not decide the removal of the network on {overlay}: the store kept \
             changing; remove it again"
        )))
    }

    /// The hosts other than this one with containers on an overlay.
    pub async fn users(&self, overlay: &str) -> Result<Vec<String>> {
        let eps = self
            .store
            .range(&keys::overlay_endpoints(overlay))
            .await
            .ctx(|| format!("list the endpoints of {overlay}"))?;
        self.other_hosts(&eps)
    }

    fn other_hosts(&self, eps: &RangeResponse) -> Result<Vec<String>> {
        let hosts: BTreeSet<String> = eps
            .kvs
            .iter()
            .map(decode::<EndpointRecord>)
            .collect::<Result<Vec<_>>>()?
            .into_iter()
            .map(|ep| ep.host)
            .filter(|h| *h != self.host)
            .collect();
        Ok(hosts.into_iter().collect())
    }

    /// Delete a definition being removed once no host has the overlay any
    /// more (the overlay's record goes with the last host's network).
    pub async fn forget_if_removed(&self, overlay: &str) -> Result<()> {
        let Some((def, rev)) = self.get(overlay).await? else {
            return Ok(());
        };
        if !def.removing {
            return Ok(());
        }
        let txn = Txn::new()
            .when(vec![
                Compare::mod_revision(keys::cluster_network(overlay), rev),
                Compare::absent(keys::overlay_record(overlay)),
            ])
            .and_then(vec![
                Op::delete(keys::cluster_network(overlay)),
                Op::delete(keys::overlay_epgen(overlay)),
            ]);
        let resp = self
            .store
            .txn(txn)
            .await
            .ctx(|| format!("forget cluster network {}", def.name))?;
        if resp.succeeded {
            tracing::info!(network = %def.name, %overlay, "network removed from every host");
        }
        Ok(())
    }

    /// Every definition, by overlay.
    pub async fn all(&self) -> Result<Vec<(String, ClusterNetwork)>> {
        let resp = self
            .store
            .range(&keys::cluster_networks())
            .await
            .ctx(|| "list cluster networks".into())?;
        // One unreadable record (a newer version's) must not hide the rest.
        Ok(resp
            .kvs
            .iter()
            .filter_map(|kv| {
                let overlay = kv
                    .key
                    .strip_prefix(&keys::cluster_networks())
                    .unwrap_or(&kv.key)
                    .to_string();
                match decode(kv) {
                    Ok(def) => Some((overlay, def)),
                    Err(e) => {
                        tracing::warn!(key = %kv.key, error = %e, "unreadable cluster definition skipped");
                        None
                    }
                }
            })
            .collect())
    }
}
