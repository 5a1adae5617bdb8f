//! Publishing this host's container names: the local Docker API says which
//! containers hold our endpoints and under which names; the store carries
//! them to every other host's resolver.
//!
//! Subscribe to Docker's events first, then read everything (so nothing
//! that happens in between is lost), then follow the events: each one only
//! says which container or network to read again, so handling one twice, or
//! late, does no harm. A new lease (after the registration was lost) or a
//! new Docker connection (a dockerd restart) means a full read again. No
//! Docker call is ever made from a plugin request: dockerd waits on those.
//! Without a Docker socket the overlay works as before, without names.

use super::engine::EngineLink;
use crate::control::names::Names;
use crate::control::overlay::Overlays;
use crate::dns::NameTable;
use crate::docker::{Change, Container, DockerApi, DockerError};
use crate::error::PluginError;
use crate::state::records::{LocalNetwork, NameRecord};
use futures::StreamExt;
use kvstore_backends::LeaseId;
use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, RwLock};
use tokio::sync::watch;

/// (overlay, endpoint ID).
type Slot = (String, String);

pub struct Publisher {
    docker: Arc<dyn DockerApi>,
    overlays: Arc<Overlays>,
    names: Names,
    table: Arc<RwLock<NameTable>>,
    lease: watch::Receiver<Option<LeaseId>>,
    /// This host's Docker networks of ours, by Docker network ID.
    nets: HashMap<String, LocalNetwork>,
    /// Docker network IDs seen not to be ours (an ID is never reused), so
    /// that events of other networks cost no store read.
    foreign: std::collections::HashSet<String>,
    /// What is in the store under the current lease.
    published: HashMap<Slot, NameRecord>,
    by_container: HashMap<String, BTreeSet<Slot>>,
}

#[derive(Debug, thiserror::Error)]
enum Failed {
    #[error(transparent)]
    Docker(#[from] DockerError),
    #[error(transparent)]
    Store(#[from] PluginError),
}

impl Publisher {
    pub fn new(
        docker: Arc<dyn DockerApi>,
        overlays: Arc<Overlays>,
        names: Names,
        table: Arc<RwLock<NameTable>>,
        lease: watch::Receiver<Option<LeaseId>>,
    ) -> Self {
        Publisher {
            docker,
            overlays,
            names,
            table,
            lease,
            nets: HashMap::new(),
            foreign: Default::default(),
            published: HashMap::new(),
            by_container: HashMap::new(),
        }
    }

    /// Publish forever: reconnect to Docker, and read everything again,
    /// whenever the engine, its event stream or the store let us down.
    pub async fn run(mut self) {
        let mut link = EngineLink::new(self.docker.clone(), "names across hosts");
        loop {
            let mut events = link.events().await;
            if let Err(e) = self.resync().await {
                tracing::warn!(error = %e, retry_in = ?link.retry_in(), "could not publish names; trying again");
                link.pause().await;
                continue;
            }
            link.settled();
            loop {
                tokio::select! {
                    event = events.next() => match event {
                        Some(Ok(change)) => {
                            if let Err(e) = self.handle(change).await {
                                tracing::warn!(error = %e, "a name change failed; reading everything again");
                                if self.resync().await.is_err() {
                                    break;
                                }
                            }
                        }
                        Some(Err(e)) => {
                            tracing::info!(error = %e, "Docker's event stream broke; reconnecting");
                            break;
                        }
                        None => {
                            tracing::info!("Docker's event stream ended (dockerd restarting?); reconnecting");
                            break;
                        }
                    },
                    changed = self.lease.changed() => {
                        if changed.is_err() {
                            return;
                        }
                        // Names under the old lease went with it.
                        self.published.clear();
                        if self.resync().await.is_err() {
                            break;
                        }
                    }
                }
            }
            link.pause().await;
        }
    }

    /// The lease names are written under, waiting while there is none.
    /// Waits on a clone: a lease change must still wake the main loop, which
    /// then publishes everything again under the new lease.
    async fn current_lease(&mut self) -> Option<LeaseId> {
        let mut lease = self.lease.clone();
        let current = lease.wait_for(|l| l.is_some()).await.ok()?;
        current.clone()
    }

    /// Read our networks and their containers, publish what is there and
    /// withdraw what is not.
    async fn resync(&mut self) -> Result<(), Failed> {
        let containers = self.refresh_networks().await?;
        let mut wanted: HashMap<Slot, NameRecord> = HashMap::new();
        let mut by_container: HashMap<String, BTreeSet<Slot>> = HashMap::new();
        for id in containers {
            if let Some(c) = self.docker.container(&id).await? {
                for (slot, rec) in self.slots_of(&c) {
                    by_container
                        .entry(c.id.clone())
                        .or_default()
                        .insert(slot.clone());
                    wanted.insert(slot, rec);
                }
            }
        }
        let overlays: BTreeSet<String> = self.nets.values().map(|n| n.overlay.clone()).collect();
        for overlay in &overlays {
            for endpoint in self.names.published(overlay).await?.into_keys() {
                if !wanted.contains_key(&(overlay.clone(), endpoint.clone())) {
                    self.names.withdraw(overlay, &endpoint).await?;
                }
            }
        }
        self.published.clear();
        for (slot, rec) in wanted {
            self.publish(slot, rec).await?;
        }
        self.by_container = by_container;
        tracing::info!(names = self.published.len(), "container names published");
        Ok(())
    }

    /// This host's networks of ours, and their Docker names for the table.
    /// Returns the containers on them (one Docker read per network).
    async fn refresh_networks(&mut self) -> Result<BTreeSet<String>, Failed> {
        self.nets = self
            .overlays
            .local_networks()
            .await?
            .into_iter()
            .map(|n| (n.network_id.clone(), n))
            .collect();
        let mut names: HashMap<String, BTreeSet<String>> = HashMap::new();
        let mut containers = BTreeSet::new();
        for (id, net) in &self.nets {
            if let Some(found) = self.docker.network(id).await? {
                containers.extend(found.containers);
                names
                    .entry(net.overlay.clone())
                    .or_default()
                    .insert(found.name);
            }
        }
        self.table
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .set_networks(names);
        Ok(containers)
    }

    /// The names a running container should have published, per endpoint.
    fn slots_of(&self, c: &Container) -> Vec<(Slot, NameRecord)> {
        if !c.running {
            return vec![];
        }
        c.attachments
            .iter()
            .filter_map(|a| {
                let net = self.nets.get(&a.network_id)?;
                Some((
                    (net.overlay.clone(), a.endpoint_id.clone()),
                    NameRecord {
                        container: c.id.clone(),
                        names: a.names.clone(),
                        addrs: a.addrs.clone(),
                    },
                ))
            })
            .collect()
    }

    async fn publish(&mut self, slot: Slot, rec: NameRecord) -> Result<(), Failed> {
        if self.published.get(&slot) == Some(&rec) {
            return Ok(());
        }
        let Some(lease) = self.current_lease().await else {
            return Ok(());
        };
        if self.names.publish(&slot.0, &slot.1, &rec, &lease).await? {
            self.published.insert(slot, rec);
        } else {
            // The endpoint is being deleted: its names went with it.
            self.published.remove(&slot);
        }
        Ok(())
    }

    async fn handle(&mut self, change: Change) -> Result<(), Failed> {
        match change {
            Change::Container(id) => self.refresh_container(&id).await,
            Change::Network { id, container } => {
                if !self.nets.contains_key(&id) && !self.foreign.contains(&id) {
                    // Possibly one of ours created just now.
                    self.refresh_networks().await?;
                    if !self.nets.contains_key(&id) {
                        self.foreign.insert(id.clone());
                    }
                }
                match container {
                    Some(c) if self.nets.contains_key(&id) => self.refresh_container(&c).await,
                    _ => Ok(()),
                }
            }
        }
    }

    /// Read one container again: publish its current names, withdraw the
    /// endpoints it no longer has.
    async fn refresh_container(&mut self, id: &str) -> Result<(), Failed> {
        let found = self.docker.container(id).await?;
        let key = found.as_ref().map_or(id.to_string(), |c| c.id.clone());
        let now: Vec<(Slot, NameRecord)> =
            found.as_ref().map(|c| self.slots_of(c)).unwrap_or_default();
        let slots: BTreeSet<Slot> = now.iter().map(|(s, _)| s.clone()).collect();
        let before = self.by_container.remove(&key).unwrap_or_default();
        for slot in before.difference(&slots) {
            self.names.withdraw(&slot.0, &slot.1).await?;
            self.published.remove(slot);
        }
        for (slot, rec) in now {
            self.publish(slot, rec).await?;
        }
        if !slots.is_empty() {
            self.by_container.insert(key, slots);
        }
        Ok(())
    }
}
