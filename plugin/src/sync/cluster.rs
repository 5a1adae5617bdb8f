//! Networks defined once (`-o cluster=true`), kept in step with the local
//! Docker engine: publish the definition of a cluster network created
//! here, create on this host every defined network it lacks, and remove
//! this host's copy of a network being removed everywhere.
//!
//! Every pass reads everything again (the store's definitions, this host's
//! networks, the engine's list), so a pass that fails or runs twice does no
//! harm. Passes run on a change of the definitions (a store watch), on a
//! network created or removed in Docker (its events), and when the driver
//! asks (a copy was removed here). Docker is only ever called from this
//! loop, never from a plugin request: dockerd waits on those.

use super::engine::EngineLink;
use super::follow::{follow, Follower};
use crate::control::cluster::Clusters;
use crate::control::overlay::Overlays;
use crate::docker::{Change, DockerApi, DockerError, NetworkConfig};
use crate::error::PluginError;
use crate::state::keys;
use crate::state::records::ClusterNetwork;
use async_trait::async_trait;
use futures::StreamExt;
use kvstore_backends::{KvStore, RangeResponse, WatchEvent};
use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::Arc;
use tokio::sync::Notify;

pub struct ClusterSync {
    docker: Arc<dyn DockerApi>,
    overlays: Arc<Overlays>,
    clusters: Arc<Clusters>,
    store: Arc<dyn KvStore>,
    host: String,
    changed: Arc<Notify>,
    /// Overlays whose name is held here by another network (said once).
    clashes: HashSet<String>,
}

#[derive(Debug, thiserror::Error)]
enum Failed {
    #[error(transparent)]
    Docker(#[from] DockerError),
    #[error(transparent)]
    Store(#[from] PluginError),
    #[error("a definition could not be stored: {0}")]
    Definition(#[from] serde_json::Error),
    #[error("{0}")]
    Incomplete(String),
}

impl ClusterSync {
    pub fn new(
        docker: Arc<dyn DockerApi>,
        overlays: Arc<Overlays>,
        clusters: Arc<Clusters>,
        store: Arc<dyn KvStore>,
        host: &str,
        changed: Arc<Notify>,
    ) -> Self {
        ClusterSync {
            docker,
            overlays,
            clusters,
            store,
            host: host.to_string(),
            changed,
            clashes: HashSet::new(),
        }
    }

    /// Keep in step forever: follow the definitions, and reconnect to
    /// Docker whenever it goes away.
    pub async fn run(mut self) {
        let store = self.store.clone();
        let mut wake = Wake(self.changed.clone());
        let prefix = keys::cluster_networks();
        tokio::select! {
            _ = follow(store.as_ref(), &prefix, &mut wake) => {}
            _ = self.follow_docker() => {}
        }
    }

    async fn follow_docker(&mut self) {
        let mut link = EngineLink::new(
            self.docker.clone(),
            "networks defined for every host (-o cluster=true)",
        );
        loop {
            let mut events = link.events().await;
            link.settled();
            self.changed.notify_one();
            loop {
                tokio::select! {
                    event = events.next() => match event {
                        // Created or removed (not a container's connect).
                        Some(Ok(Change::Network { container: None, .. })) => self.changed.notify_one(),
                        Some(Ok(_)) => {}
                        Some(Err(_)) | None => break,
                    },
                    _ = self.changed.notified() => {
                        if let Err(e) = self.pass().await {
                            tracing::warn!(error = %e, retry_in = ?link.retry_in(), "cluster networks not in step yet; trying again");
                            link.pause().await;
                            self.changed.notify_one();
                        } else {
                            link.settled();
                        }
                    }
                }
            }
            link.pause().await;
        }
    }

    /// One pass: publish, create, remove.
    async fn pass(&mut self) -> Result<(), Failed> {
        let locals: Vec<_> = self
            .overlays
            .local_networks()
            .await?
            .into_iter()
            .filter(|n| n.cluster)
            .collect();
        let mut defs: HashMap<String, ClusterNetwork> =
            self.clusters.all().await?.into_iter().collect();
        for net in &locals {
            if defs.contains_key(&net.overlay) {
                continue;
            }
            let Some(config) = self.docker.network_config(&net.network_id).await? else {
                continue;
            };
            // A name means one network on every host: a second subnet under
            // the same name would give each host a different network.
            if let Some((other, _)) = defs.iter().find(|(_, d)| d.name == config.name) {
                if self.clashes.insert(net.overlay.clone()) {
                    tracing::warn!(network = %config.name, subnet = %net.overlay, defined_on = %other, "not defined for every host: another subnet is defined under this name; remove this network and pick another name");
                }
                continue;
            }
            let def = ClusterNetwork {
                name: config.name.clone(),
                origin: self.host.clone(),
                definition: serde_json::to_value(&config)?,
                removing: false,
            };
            let stored = self.clusters.define(&net.overlay, &def).await?;
            defs.insert(net.overlay.clone(), stored);
        }
        let engine = self.docker.networks().await?;
        let mine: HashMap<&str, BTreeSet<&str>> = locals.iter().fold(HashMap::new(), |mut m, n| {
            m.entry(n.overlay.as_str())
                .or_default()
                .insert(n.network_id.as_str());
            m
        });
        // What failed is tried again (with back-off): no event may come.
        let mut failed = vec![];
        for (overlay, def) in &defs {
            let copies = mine.get(overlay.as_str());
            if def.removing {
                for id in copies.into_iter().flatten() {
                    match self.docker.remove_network(id).await {
                        Ok(()) => {
                            tracing::info!(network = %def.name, "removed this host's copy of a network removed everywhere")
                        }
                        Err(e) => {
                            tracing::warn!(network = %def.name, error = %e, "could not remove this host's copy of a network removed everywhere; trying again");
                            failed.push(def.name.clone());
                        }
                    }
                }
                if copies.is_none() {
                    // The last host's removal forgets the definition; this
                    // also does when that host was reclaimed or failed to.
                    self.clusters.forget_if_removed(overlay).await?;
                }
                continue;
            }
            if let Some(ids) = copies {
                // One name per subnet: a second network created here on it
                // is not the one the other hosts have.
                for n in engine.iter().filter(|n| ids.contains(n.id.as_str())) {
                    if n.name != def.name && self.clashes.insert(n.id.clone()) {
                        tracing::warn!(network = %n.name, defined = %def.name, "this network uses the subnet of another network defined for every host; only that one is defined everywhere, and removing either removes both");
                    }
                }
                continue;
            }
            if let Some(other) = engine.iter().find(|n| n.name == def.name) {
                if self.clashes.insert(overlay.clone()) {
                    tracing::warn!(
                        network = %def.name,
                        local = %other.id,
                        driver = %other.driver,
                        "a network defined for every host is not created here: a different network of this host has its name; rename or remove that one"
                    );
                }
                continue;
            }
            let config: NetworkConfig = match serde_json::from_value(def.definition.clone()) {
                Ok(c) => c,
                Err(e) => {
                    if self.clashes.insert(overlay.clone()) {
                        tracing::warn!(network = %def.name, error = %e, "the stored definition of a network defined for every host is unreadable (written by a newer version?); not created here");
                    }
                    continue;
                }
            };
            match self.docker.create_network(&config).await {
                Ok(id) => {
                    tracing::info!(network = %def.name, %id, origin = %def.origin, "created this host's copy of a network defined for every host")
                }
                Err(e) => {
                    tracing::warn!(network = %def.name, error = %e, "could not create this host's copy of a network defined for every host; trying again");
                    failed.push(def.name.clone());
                }
            }
        }
        if !failed.is_empty() {
            return Err(Failed::Incomplete(format!(
                "not yet in step: {}",
                failed.join(", ")
            )));
        }
        Ok(())
    }
}

/// Wakes the sync on every change of the definitions.
struct Wake(Arc<Notify>);

#[async_trait]
impl Follower for Wake {
    async fn resync(&mut self, _snapshot: RangeResponse) -> anyhow::Result<()> {
        self.0.notify_one();
        Ok(())
    }

    async fn apply(&mut self, _event: WatchEvent) -> anyhow::Result<()> {
        self.0.notify_one();
        Ok(())
    }
}
