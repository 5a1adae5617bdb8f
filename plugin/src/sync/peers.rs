//! Peer sync: the kernel's FDB and neighbour entries follow the store.
//!
//! For each overlay with a local endpoint, one task watches the overlay's
//! endpoints. For every remote endpoint it installs a permanent FDB entry
//! (MAC -> the endpoint host's VTEP) and a permanent neighbour entry (IP ->
//! MAC) on the overlay's VXLAN device, and removes them when the endpoint goes.
//! At start and after any watch gap (a disconnect, a compacted revision) it
//! reconciles the kernel with a fresh read of the store, adding what is missing
//! and removing what is stale, instead of trusting what it remembered.

use super::follow::{follow, Follower, Stale};
use super::membership::LiveSet;
use crate::dataplane::{Dataplane, PeerEntry};
use crate::state::keys;
use crate::state::records::EndpointRecord;
use crate::telemetry;
use crate::util::clock::unix_now_ms;
use crate::util::mac::parse_mac;
use crate::util::task::spawn_supervised;
use async_trait::async_trait;
use kvstore_backends::{EventKind, KvStore, RangeResponse, WatchEvent};
use std::collections::{HashMap, HashSet};
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tracing::Instrument;

pub struct PeerSync {
    store: Arc<dyn KvStore>,
    dataplane: Arc<dyn Dataplane>,
    host: String,
    live: watch::Receiver<LiveSet>,
    /// Overlay -> (VNI, the task following it).
    tasks: Mutex<HashMap<String, (u32, JoinHandle<()>)>>,
}

impl PeerSync {
    pub fn new(
        store: Arc<dyn KvStore>,
        dataplane: Arc<dyn Dataplane>,
        host: String,
        live: watch::Receiver<LiveSet>,
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
        if tasks
            .get(overlay)
            .is_some_and(|(v, t)| *v == vni && !t.is_finished())
        {
            return;
        }
        let (store, dataplane, host, live) = (
            self.store.clone(),
            self.dataplane.clone(),
            self.host.clone(),
            self.live.clone(),
        );
        let prefix = keys::overlay_endpoints(overlay);
        // A root span: the task outlives the request that started it.
        let span = tracing::info_span!(parent: None, "peer_sync", overlay = %overlay, vni);
        let task = spawn_supervised("peer_sync", move || {
            let mut worker = Worker {
                dataplane: dataplane.clone(),
                host: host.clone(),
                live: live.clone(),
                prefix: prefix.clone(),
                vni,
                known: HashMap::new(),
            };
            let store = store.clone();
            async move {
                let prefix = worker.prefix.clone();
                follow(store.as_ref(), &prefix, &mut worker).await
            }
            .instrument(span.clone())
        });
        if let Some((_, old)) = tasks.insert(overlay.to_string(), (vni, task)) {
            old.abort();
        }
    }

    /// Stop syncing the overlay with this VNI (its devices are gone from
    /// this host).
    pub fn stop(&self, vni: u32) {
        self.tasks
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .retain(|_, (v, t)| {
                if *v == vni {
                    t.abort();
                }
                *v != vni
            });
    }
}

impl Drop for PeerSync {
    fn drop(&mut self) {
        for (_, (_, t)) in self.tasks.lock().unwrap_or_else(|e| e.into_inner()).drain() {
            t.abort();
        }
    }
}

struct Worker {
    dataplane: Arc<dyn Dataplane>,
    host: String,
    /// Registered hosts: a remote endpoint's entries exist only while its
    /// host is registered, so a dead host's entries go with its lease.
    live: watch::Receiver<LiveSet>,
    prefix: String,
    vni: u32,
    /// The overlay's endpoints as last read, by endpoint ID.
    known: HashMap<String, EndpointRecord>,
}

#[async_trait]
impl Follower for Worker {
    /// Make the kernel match the store: add what is missing, remove what is
    /// stale, instead of trusting what was remembered.
    async fn resync(&mut self, snapshot: RangeResponse) -> anyhow::Result<()> {
        // A liveness change from here on triggers another resync.
        self.live.mark_unchanged();
        let mut known = HashMap::new();
        for kv in &snapshot.kvs {
            match serde_json::from_slice::<EndpointRecord>(&kv.value) {
                Ok(ep) => {
                    known.insert(self.id_of(&kv.key), ep);
                }
                Err(e) => tracing::warn!(key = %kv.key, error = %e, "unreadable endpoint record"),
            }
        }
        self.known = known;
        let want = self.desired();
        let have = self.dataplane.peers(self.vni).await?;
        let (mut added, mut removed) = (0, 0);
        for mac in have.fdb.keys().filter(|m| !want.fdb.contains_key(*m)) {
            self.dataplane.remove_peer(self.vni, *mac, None).await?;
            removed += 1;
        }
        for ip in have.neigh.keys().filter(|ip| !want.neigh.contains_key(*ip)) {
            self.dataplane.remove_neighbour(self.vni, *ip).await?;
            removed += 1;
        }
        for entry in want.entries() {
            let fdb_ok = have.fdb.get(&entry.mac) == Some(&entry.vtep);
            let neigh_ok = entry
                .ip
                .is_none_or(|ip| have.neigh.get(&ip) == Some(&entry.mac));
            if !(fdb_ok && neigh_ok) {
                self.dataplane.add_peer(self.vni, &entry).await?;
                added += 1;
            }
        }
        tracing::info!(
            endpoints = self.known.len(),
            added,
            removed,
            revision = snapshot.revision,
            "peers reconciled"
        );
        Ok(())
    }

    async fn apply(&mut self, event: WatchEvent) -> anyhow::Result<()> {
        let id = self.id_of(&event.kv.key);
        let (old, new) = match event.kind {
            EventKind::Put => match serde_json::from_slice::<EndpointRecord>(&event.kv.value) {
                Ok(ep) => (self.known.insert(id, ep.clone()), Some(ep)),
                Err(e) => {
                    tracing::warn!(key = %event.kv.key, error = %e, "unreadable endpoint record");
                    return Ok(());
                }
            },
            EventKind::Delete => (self.known.remove(&id), None),
        };
        // The entries of every MAC and IP the change touches are derived
        // again from all records: another record may share them.
        let touched: Vec<PeerEntry> = old.iter().chain(new.iter()).flat_map(entries).collect();
        self.settle(&touched).await?;
        // A remote endpoint seen for the first time, now in the kernel: how
        // long since its host committed it (clock skew included).
        if let (None, Some(ep)) = (&old, &new) {
            if ep.created_ms > 0 && self.is_remote(ep) {
                let lag = unix_now_ms().saturating_sub(ep.created_ms);
                telemetry::peer_sync_lag(Duration::from_millis(lag));
            }
        }
        Ok(())
    }

    /// A host came or went: the wanted entries changed.
    async fn stale(&mut self) -> Stale {
        match self.live.changed().await {
            Ok(()) => Stale::Resync,
            Err(_) => Stale::Stop,
        }
    }
}

impl Worker {
    fn id_of(&self, key: &str) -> String {
        key.strip_prefix(self.prefix.as_str())
            .unwrap_or(key)
            .to_string()
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

    /// What the kernel should hold: for every MAC and IP of a live remote
    /// endpoint, the entry of the newest record that has it. Two records can
    /// share an address for a moment (a stale record beside a re-issued
    /// one); deriving entries from all records means removing one record
    /// never removes the other's entries.
    fn desired(&self) -> Desired {
        let mut remote: Vec<&EndpointRecord> = self
            .known
            .values()
            .filter(|ep| self.is_remote(ep))
            .collect();
        remote.sort_by(|a, b| (a.created_at, &a.endpoint_id).cmp(&(b.created_at, &b.endpoint_id)));
        let mut want = Desired::default();
        for ep in remote {
            for entry in entries(ep) {
                want.fdb.insert(entry.mac, entry.vtep);
                if let Some(ip) = entry.ip {
                    want.neigh.insert(ip, entry.mac);
                }
            }
        }
        want
    }

    /// Make the kernel's entries for these MACs and IPs what the records
    /// say (see [`Worker::desired`]).
    async fn settle(&self, touched: &[PeerEntry]) -> anyhow::Result<()> {
        if touched.is_empty() {
            return Ok(());
        }
        let want = self.desired();
        let mut macs_done = HashSet::new();
        for ip in touched.iter().filter_map(|e| e.ip) {
            match want
                .neigh
                .get(&ip)
                .and_then(|mac| Some((*mac, *want.fdb.get(mac)?)))
            {
                Some((mac, vtep)) => {
                    let entry = PeerEntry {
                        mac,
                        ip: Some(ip),
                        vtep,
                    };
                    self.dataplane.add_peer(self.vni, &entry).await?;
                    macs_done.insert(mac);
                }
                None => self.dataplane.remove_neighbour(self.vni, ip).await?,
            }
        }
        for mac in touched.iter().map(|e| e.mac) {
            if !macs_done.insert(mac) {
                continue;
            }
            match want.fdb.get(&mac) {
                Some(vtep) => {
                    let entry = PeerEntry {
                        mac,
                        ip: None,
                        vtep: *vtep,
                    };
                    self.dataplane.add_peer(self.vni, &entry).await?
                }
                None => self.dataplane.remove_peer(self.vni, mac, None).await?,
            }
        }
        tracing::debug!(entries = touched.len(), "peers settled");
        Ok(())
    }
}

/// The entries the kernel should hold for an overlay.
#[derive(Debug, Default)]
struct Desired {
    fdb: HashMap<[u8; 6], IpAddr>,
    neigh: HashMap<IpAddr, [u8; 6]>,
}

impl Desired {
    /// As add operations: each IP with its MAC, then MACs without an IP.
    fn entries(&self) -> Vec<PeerEntry> {
        // Every neighbour's MAC has an FDB entry (both come from one record).
        let mut out: Vec<PeerEntry> = self
            .neigh
            .iter()
            .filter_map(|(ip, mac)| {
                Some(PeerEntry {
                    mac: *mac,
                    ip: Some(*ip),
                    vtep: *self.fdb.get(mac)?,
                })
            })
            .collect();
        let with_ip: HashSet<[u8; 6]> = out.iter().map(|e| e.mac).collect();
        out.extend(
            self.fdb
                .iter()
                .filter(|(mac, _)| !with_ip.contains(*mac))
                .map(|(mac, vtep)| PeerEntry {
                    mac: *mac,
                    ip: None,
                    vtep: *vtep,
                }),
        );
        out
    }
}

/// The kernel entries of one endpoint (IPv4 and IPv6 share the MAC).
fn entries(ep: &EndpointRecord) -> Vec<PeerEntry> {
    let Some(mac) = parse_mac(&ep.mac) else {
        tracing::warn!(endpoint = %ep.endpoint_id, mac = %ep.mac, "endpoint with an invalid MAC");
        return vec![];
    };
    let ips: Vec<Option<IpAddr>> = match (ep.ipv4, ep.ipv6) {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dataplane::fake::FakeDataplane;
    use kvstore_backends::KeyValue;

    const VNI: u32 = 300;
    const PREFIX: &str = "/rustoverlay/v1/overlay/o/ep/";

    fn record(id: &str, host: &str, vtep: &str, created_at: u64) -> EndpointRecord {
        EndpointRecord {
            endpoint_id: id.into(),
            network_id: "n".into(),
            host: host.into(),
            vtep: vtep.parse().unwrap(),
            mac: "02:52:0a:4d:00:09".into(),
            ipv4: Some("10.77.0.9/24".parse().unwrap()),
            ipv6: None,
            created_at,
            created_ms: 0,
        }
    }

    fn event(kind: EventKind, ep: &EndpointRecord, revision: i64) -> WatchEvent {
        let value = match kind {
            EventKind::Put => serde_json::to_vec(ep).unwrap(),
            EventKind::Delete => vec![],
        };
        WatchEvent {
            kind,
            kv: KeyValue {
                key: format!("{PREFIX}{}", ep.endpoint_id),
                value,
                create_revision: revision,
                mod_revision: revision,
                lease: None,
            },
        }
    }

    /// Consul's watch finds deletes by comparing two reads, and dates them
    /// at the second read's index: a re-created endpoint with the same
    /// address (and so the same MAC) can arrive before the delete of the old
    /// one. The delete must not take the new endpoint's entries with it.
    #[tokio::test]
    async fn a_late_delete_of_an_old_record_keeps_the_entries_of_a_new_one_with_its_address() {
        let fake = FakeDataplane::new("192.0.2.1".parse().unwrap());
        fake.ensure_network(VNI).await.unwrap();
        let (_live_tx, live) = watch::channel(None);
        let mut worker = Worker {
            dataplane: fake.clone(),
            host: "a".into(),
            live,
            prefix: PREFIX.into(),
            vni: VNI,
            known: HashMap::new(),
        };
        let old = record("old", "b", "192.0.2.2", 100);
        let new = record("new", "c", "192.0.2.3", 200);
        worker.apply(event(EventKind::Put, &old, 10)).await.unwrap();
        worker.apply(event(EventKind::Put, &new, 12)).await.unwrap();
        worker
            .apply(event(EventKind::Delete, &old, 12))
            .await
            .unwrap();
        let ip: IpAddr = "10.77.0.9".parse().unwrap();
        let mac = parse_mac(&new.mac).unwrap();
        let held = fake.peers(VNI).await.unwrap();
        assert_eq!(held.neigh.get(&ip), Some(&mac));
        assert_eq!(
            held.fdb.get(&mac),
            Some(&new.vtep),
            "the new endpoint's host"
        );
    }
}
