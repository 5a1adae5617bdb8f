//! The resolver on each overlay this host has containers on: a listener in
//! the overlay's namespace, and a follower that keeps the name table equal
//! to the names every host published for the overlay. Both start and stop
//! with the overlay's devices (`devices.rs`), so a host with no container on
//! an overlay has neither.

use super::follow::{follow, Follower};
use crate::dataplane::Dataplane;
use crate::dns::{server, NameEntry, NameTable, Resolver, Scope};
use crate::state::keys;
use crate::state::records::NameRecord;
use crate::util::backoff::Backoff;
use crate::util::task::spawn_supervised;
use async_trait::async_trait;
use kvstore_backends::{EventKind, KvStore, RangeResponse, WatchEvent};
use std::collections::HashMap;
use std::net::Ipv4Addr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;
use tokio::task::JoinHandle;
use tracing::Instrument;

/// An overlay's resolver tasks (its listener and its names follower), and
/// the flag that lets its follower write the table.
type Tasks = (u32, [JoinHandle<()>; 2], Arc<AtomicBool>);

pub struct NameService {
    store: Arc<dyn KvStore>,
    dataplane: Arc<dyn Dataplane>,
    resolver: Arc<Resolver>,
    address: Ipv4Addr,
    /// Overlay -> (VNI, its listener and follower tasks).
    tasks: Mutex<HashMap<String, Tasks>>,
}

impl NameService {
    pub fn new(
        store: Arc<dyn KvStore>,
        dataplane: Arc<dyn Dataplane>,
        resolver: Arc<Resolver>,
        address: Ipv4Addr,
    ) -> Self {
        NameService {
            store,
            dataplane,
            resolver,
            address,
            tasks: Mutex::new(HashMap::new()),
        }
    }

    /// The resolver's address (on every overlay and on the host).
    pub fn address(&self) -> Ipv4Addr {
        self.address
    }

    pub fn resolver(&self) -> &Arc<Resolver> {
        &self.resolver
    }

    pub fn table(&self) -> &Arc<RwLock<NameTable>> {
        &self.resolver.table
    }

    /// Serve the overlay's names if not served yet (its devices exist).
    pub fn ensure(&self, overlay: &str, vni: u32) {
        let mut tasks = self.tasks.lock().unwrap_or_else(|e| e.into_inner());
        if tasks
            .get(overlay)
            .is_some_and(|(v, t, _)| *v == vni && t.iter().all(|t| !t.is_finished()))
        {
            return;
        }
        let alive = Arc::new(AtomicBool::new(true));
        let span = tracing::info_span!(parent: None, "names", overlay = %overlay, vni);
        let listener = {
            let (dataplane, resolver, address, overlay) = (
                self.dataplane.clone(),
                self.resolver.clone(),
                self.address,
                overlay.to_string(),
            );
            let span = span.clone();
            spawn_supervised("dns_listener", move || {
                listen(
                    dataplane.clone(),
                    resolver.clone(),
                    vni,
                    address,
                    overlay.clone(),
                )
                .instrument(span.clone())
            })
        };
        let follower = {
            let (store, table, overlay, alive) = (
                self.store.clone(),
                self.resolver.table.clone(),
                overlay.to_string(),
                alive.clone(),
            );
            spawn_supervised("names_sync", move || {
                let (store, mut worker) = (
                    store.clone(),
                    Worker {
                        table: table.clone(),
                        overlay: overlay.clone(),
                        prefix: keys::overlay_names(&overlay),
                        alive: alive.clone(),
                    },
                );
                async move {
                    let prefix = worker.prefix.clone();
                    follow(store.as_ref(), &prefix, &mut worker).await
                }
                .instrument(span.clone())
            })
        };
        if let Some((_, old, old_alive)) =
            tasks.insert(overlay.to_string(), (vni, [listener, follower], alive))
        {
            old_alive.store(false, Ordering::SeqCst);
            old.iter().for_each(|t| t.abort());
        }
    }

    /// Stop serving the overlay with this VNI (its devices are gone).
    pub fn stop(&self, vni: u32) {
        let mut tasks = self.tasks.lock().unwrap_or_else(|e| e.into_inner());
        let mut table = self
            .resolver
            .table
            .write()
            .unwrap_or_else(|e| e.into_inner());
        tasks.retain(|overlay, (v, t, alive)| {
            if *v == vni {
                // Under the table's lock: a follower that has not seen the
                // abort yet finds the flag down and writes nothing more.
                alive.store(false, Ordering::SeqCst);
                t.iter().for_each(|t| t.abort());
                table.clear(overlay);
            }
            *v != vni
        });
    }
}

impl Drop for NameService {
    fn drop(&mut self) {
        for (_, (_, t, alive)) in self.tasks.lock().unwrap_or_else(|e| e.into_inner()).drain() {
            alive.store(false, Ordering::SeqCst);
            t.iter().for_each(|t| t.abort());
        }
    }
}

/// Set up the overlay's listener and serve it; a failed set-up is retried
/// (the devices may be mid-change), and is never a reason to fail a Join.
async fn listen(
    dataplane: Arc<dyn Dataplane>,
    resolver: Arc<Resolver>,
    vni: u32,
    address: Ipv4Addr,
    overlay: String,
) {
    let mut backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(10));
    loop {
        let sockets = match dataplane.dns_listener(vni, address).await {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(error = %e, retry_in = ?backoff.peek(), "no resolver on this overlay yet");
                backoff.wait().await;
                continue;
            }
        };
        let (udp, tcp) = match sockets.into_tokio() {
            Ok(pair) => pair,
            Err(e) => {
                tracing::warn!(error = %e, "could not register the resolver's sockets");
                backoff.wait().await;
                continue;
            }
        };
        tracing::debug!(%address, "resolver listening");
        let scope = Scope::Overlay(overlay.clone());
        // Either half ending (a socket error) sets both up again.
        tokio::select! {
            _ = server::serve_udp(resolver.clone(), scope.clone(), udp) => {}
            _ = server::serve_tcp(resolver.clone(), scope, tcp, None) => {}
        }
        backoff.wait().await;
    }
}

struct Worker {
    table: Arc<RwLock<NameTable>>,
    overlay: String,
    prefix: String,
    /// Down once the overlay is no longer served here.
    alive: Arc<AtomicBool>,
}

impl Worker {
    /// (host, endpoint) from `names/<overlay>/<host>/<ep>`.
    fn ids<'k>(&self, key: &'k str) -> Option<(&'k str, &'k str)> {
        key.strip_prefix(&self.prefix)?.split_once('/')
    }

    fn entry(&self, key: &str, value: &[u8]) -> Option<NameEntry> {
        let (host, endpoint) = self.ids(key)?;
        match serde_json::from_slice::<NameRecord>(value) {
            Ok(rec) => Some(NameEntry {
                host: host.to_string(),
                endpoint: endpoint.to_string(),
                container: rec.container,
                names: rec.names,
                addrs: rec.addrs,
            }),
            Err(e) => {
                tracing::warn!(key, error = %e, "unreadable name record");
                None
            }
        }
    }

    /// The table, to change it, unless the overlay was stopped meanwhile.
    fn table(&self) -> Option<std::sync::RwLockWriteGuard<'_, NameTable>> {
        let table = self.table.write().unwrap_or_else(|e| e.into_inner());
        self.alive.load(Ordering::SeqCst).then_some(table)
    }
}

#[async_trait]
impl Follower for Worker {
    async fn resync(&mut self, snapshot: RangeResponse) -> anyhow::Result<()> {
        let entries: Vec<NameEntry> = snapshot
            .kvs
            .iter()
            .filter_map(|kv| self.entry(&kv.key, &kv.value))
            .collect();
        tracing::debug!(records = entries.len(), "names resynced");
        if let Some(mut table) = self.table() {
            table.replace(&self.overlay, entries);
        }
        Ok(())
    }

    async fn apply(&mut self, event: WatchEvent) -> anyhow::Result<()> {
        match event.kind {
            EventKind::Put => {
                if let (Some(entry), Some(mut table)) =
                    (self.entry(&event.kv.key, &event.kv.value), self.table())
                {
                    table.put(&self.overlay, entry);
                }
            }
            EventKind::Delete => {
                if let Some((host, endpoint)) = self.ids(&event.kv.key) {
                    let (host, endpoint) = (host.to_string(), endpoint.to_string());
                    if let Some(mut table) = self.table() {
                        table.remove(&self.overlay, &host, &endpoint);
                    }
                }
            }
        }
        Ok(())
    }
}
