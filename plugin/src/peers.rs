//! Peer sync: the kernel's FDB and neighbour entries follow the store.
//!
//! For each overlay with a local endpoint, one task watches the overlay's
//! endpoints. For every remote endpoint it installs a permanent FDB entry
//! (MAC -> the endpoint host's VTEP) and a permanent neighbour entry (IP ->
//! MAC) on the overlay's VXLAN device, and removes them when the endpoint goes.
//! At start and after any watch gap (a disconnect, a compacted revision) it
//! reconciles the kernel with a fresh read of the store, adding what is missing
//! and removing what is stale, instead of trusting what it remembered.

use crate::dataplane::{parse_mac, Dataplane, PeerEntry};
use crate::hosts::LiveSet;
use crate::keys;
use crate::overlay::EndpointRecord;
use futures::StreamExt;
use kvstore_backends::{EventKind, KvStore};
use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::task::JoinHandle;
use tracing::Instrument;

/// Back-off after a failed resync, doubling up to the maximum.
const RETRY_MIN: Duration = Duration::from_millis(200);
const RETRY_MAX: Duration = Duration::from_secs(5);

pub struct PeerSync {
    store: Arc<dyn KvStore>,
    dataplane: Arc<Dataplane>,
    host: String,
    live: tokio::sync::watch::Receiver<LiveSet>,
    tasks: Mutex<HashMap<String, JoinHandle<()>>>,
}

impl PeerSync {
    pub fn new(
        store: Arc<dyn KvStore>,
        dataplane: Arc<Dataplane>,
        host: String,
        live: tokio::sync::watch::Receiver<LiveSet>,
    ) -> Self {
        PeerSync {
            store,
            dataplane,
            host,
            live,
            tasks: Mutex::new(HashMap::new()),
        }
    }

    /// Start syncing an overlay if it is not synced yet.
    pub fn ensure(&self, overlay: &str, vni: u32) {
        let mut tasks = self.tasks.lock().unwrap_or_else(|e| e.into_inner());
        if tasks.get(overlay).is_some_and(|t| !t.is_finished()) {
            return;
        }
        let worker = Worker {
            store: self.store.clone(),
            dataplane: self.dataplane.clone(),
            host: self.host.clone(),
            live: self.live.clone(),
            overlay: overlay.to_string(),
            vni,
        };
        // A root span: the task outlives the request that started it.
        let span = tracing::info_span!(parent: None, "peer_sync", overlay = %overlay, vni);
        tasks.insert(
            overlay.to_string(),
            tokio::spawn(worker.run().instrument(span)),
        );
    }

    /// Stop syncing an overlay (its devices are gone from this host).
    pub fn stop(&self, overlay: &str) {
        if let Some(t) = self
            .tasks
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(overlay)
        {
            t.abort();
        }
    }
}

impl Drop for PeerSync {
    fn drop(&mut self) {
        for (_, t) in self.tasks.lock().unwrap_or_else(|e| e.into_inner()).drain() {
            t.abort();
        }
    }
}

struct Worker {
    store: Arc<dyn KvStore>,
    dataplane: Arc<Dataplane>,
    host: String,
    /// Registered hosts: a remote endpoint's entries exist only while its
    /// host is registered, so a dead host's entries go with its lease.
    live: tokio::sync::watch::Receiver<LiveSet>,
    overlay: String,
    vni: u32,
}

impl Worker {
    async fn run(mut self) {
        let prefix = keys::overlay_endpoints(&self.overlay);
        let mut backoff = RETRY_MIN;
        loop {
            let (mut known, start) = match self.resync(&prefix).await {
                Ok(v) => v,
                Err(e) => {
                    tracing::warn!(error = %e, retry_in = ?backoff, "peer resync failed");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(RETRY_MAX);
                    continue;
                }
            };
            backoff = RETRY_MIN;
            let mut stream = match self.store.watch(&prefix, start).await {
                Ok(s) => s,
                Err(e) => {
                    tracing::warn!(error = %e, "could not watch the overlay's endpoints; resyncing");
                    tokio::time::sleep(RETRY_MIN).await;
                    continue;
                }
            };
            self.live.mark_unchanged();
            loop {
                let item = tokio::select! {
                    item = stream.next() => item,
                    changed = self.live.changed() => {
                        if changed.is_err() {
                            return;
                        }
                        // A host came or went: the wanted entries changed.
                        break;
                    }
                };
                let event = match item {
                    Some(Ok(ev)) => ev,
                    Some(Err(e)) => {
                        tracing::info!(error = %e, "endpoint watch ended; resyncing");
                        break;
                    }
                    None => break,
                };
                let id = event.kv.key.trim_start_matches(&prefix).to_string();
                let result = match event.kind {
                    EventKind::Put => {
                        match serde_json::from_slice::<EndpointRecord>(&event.kv.value) {
                            Ok(ep) => {
                                let r = self.apply_put(known.get(&id), &ep).await;
                                known.insert(id, ep);
                                r
                            }
                            Err(e) => {
                                tracing::warn!(key = %event.kv.key, error = %e, "unreadable endpoint record");
                                Ok(())
                            }
                        }
                    }
                    EventKind::Delete => match known.remove(&id) {
                        Some(old) => self.apply_delete(&old).await,
                        None => Ok(()),
                    },
                };
                if let Err(e) = result {
                    // The kernel and the store may now differ: start over.
                    tracing::warn!(error = %e, "applying an endpoint change failed; resyncing");
                    break;
                }
            }
            tokio::time::sleep(RETRY_MIN).await;
        }
    }

    /// Entries are wanted for endpoints of other hosts that are registered
    /// (all of them until the registrations have been read once).
    fn is_remote(&self, ep: &EndpointRecord) -> bool {
        ep.host != self.host
            && match &*self.live.borrow() {
                Some(live) => live.contains(&ep.host),
                None => true,
            }
    }

    async fn apply_put(
        &self,
        old: Option<&EndpointRecord>,
        ep: &EndpointRecord,
    ) -> anyhow::Result<()> {
        if let Some(old) = old {
            if old.host != self.host
                && (old.mac != ep.mac || old.ipv4 != ep.ipv4 || !self.is_remote(ep))
            {
                self.apply_delete(old).await?;
            }
        }
        if !self.is_remote(ep) {
            return Ok(());
        }
        for entry in entries(ep) {
            self.dataplane.add_peer(self.vni, &entry).await?;
        }
        tracing::debug!(endpoint = %ep.endpoint_id, host = %ep.host, "peer added");
        Ok(())
    }

    async fn apply_delete(&self, ep: &EndpointRecord) -> anyhow::Result<()> {
        // Whatever the host's liveness: a local endpoint has no entries, a
        // remote one's must go.
        if ep.host == self.host {
            return Ok(());
        }
        for entry in entries(ep) {
            self.dataplane
                .remove_peer(self.vni, entry.mac, entry.ip)
                .await?;
        }
        tracing::debug!(endpoint = %ep.endpoint_id, host = %ep.host, "peer removed");
        Ok(())
    }

    /// Make the kernel match the store; returns the endpoints read and the
    /// revision to watch from.
    async fn resync(&self, prefix: &str) -> anyhow::Result<(HashMap<String, EndpointRecord>, i64)> {
        let resp = self.store.range(prefix).await?;
        let mut known = HashMap::new();
        for kv in &resp.kvs {
            match serde_json::from_slice::<EndpointRecord>(&kv.value) {
                Ok(ep) => {
                    known.insert(kv.key.trim_start_matches(prefix).to_string(), ep);
                }
                Err(e) => tracing::warn!(key = %kv.key, error = %e, "unreadable endpoint record"),
            }
        }
        let wanted: Vec<PeerEntry> = known
            .values()
            .filter(|ep| self.is_remote(ep))
            .flat_map(entries)
            .collect();
        let have = self.dataplane.peers(self.vni).await?;
        let (mut added, mut removed) = (0, 0);
        let wanted_macs: HashSet<[u8; 6]> = wanted.iter().map(|e| e.mac).collect();
        let wanted_ips: HashSet<std::net::IpAddr> = wanted.iter().filter_map(|e| e.ip).collect();
        for (mac, _) in have.fdb.iter().filter(|(m, _)| !wanted_macs.contains(*m)) {
            self.dataplane.remove_peer(self.vni, *mac, None).await?;
            removed += 1;
        }
        for ip in have.neigh.keys().filter(|ip| !wanted_ips.contains(*ip)) {
            self.dataplane.remove_neighbour(self.vni, *ip).await?;
            removed += 1;
        }
        for e in &wanted {
            let fdb_ok = have.fdb.get(&e.mac) == Some(&e.vtep);
            let neigh_ok = e.ip.is_none_or(|ip| have.neigh.get(&ip) == Some(&e.mac));
            if !(fdb_ok && neigh_ok) {
                self.dataplane.add_peer(self.vni, e).await?;
                added += 1;
            }
        }
        tracing::info!(
            endpoints = known.len(),
            added,
            removed,
            revision = resp.revision,
            "peers reconciled"
        );
        Ok((known, resp.revision + 1))
    }
}

/// The kernel entries of one endpoint (IPv4 and IPv6 share the MAC).
fn entries(ep: &EndpointRecord) -> Vec<PeerEntry> {
    let Some(mac) = parse_mac(&ep.mac) else {
        tracing::warn!(endpoint = %ep.endpoint_id, mac = %ep.mac, "endpoint with an invalid MAC");
        return vec![];
    };
    let ips: Vec<Option<std::net::IpAddr>> = match (ep.ipv4, ep.ipv6) {
        (None, None) => vec![None],
        (a, b) => [a, b].into_iter().flatten().map(|n| Some(n.ip())).collect(),
    };
    ips.into_iter()
        .map(|ip| PeerEntry {
            mac,
            ip,
            vtep: ep.vtep,
        })
        .collect()
}
