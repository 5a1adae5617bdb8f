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
use super::peer_entries::{desired_of, diff, entries, Desired, Known};
use crate::dataplane::{Dataplane, PeerEntry};
use crate::state::keys;
use crate::state::records::EndpointRecord;
use crate::telemetry;
use crate::util::clock::unix_now_ms;
use crate::util::task::spawn_supervised;
use async_trait::async_trait;
use kvstore_backends::{EventKind, KvStore, RangeResponse, WatchEvent};
use std::collections::{HashMap, HashSet};
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
                known: Known::default(),
                repair: repair_interval(),
                synced: false,
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
    known: Known,
    /// When to compare the kernel with `known` again.
    repair: tokio::time::Interval,
    /// A first full read was applied (lag is measured from then on).
    synced: bool,
}

/// How often a worker checks the kernel's entries against what it read.
/// A netlink dump of one overlay's entries; no store call.
pub const REPAIR_PERIOD: Duration = Duration::from_secs(5);

fn repair_interval() -> tokio::time::Interval {
    let mut tick =
        tokio::time::interval_at(tokio::time::Instant::now() + REPAIR_PERIOD, REPAIR_PERIOD);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick
}

#[async_trait]
impl Follower for Worker {
    /// Make the kernel match the store: add what is missing, remove what is
    /// stale, instead of trusting what was remembered.
    async fn resync(&mut self, snapshot: RangeResponse) -> anyhow::Result<()> {
        // A liveness change from here on triggers another resync.
        self.live.mark_unchanged();
        let mut known = Known::default();
        for kv in &snapshot.kvs {
            match serde_json::from_slice::<EndpointRecord>(&kv.value) {
                Ok(ep) => {
                    known.insert(self.id_of(&kv.key), ep);
                }
                Err(e) => tracing::warn!(key = %kv.key, error = %e, "unreadable endpoint record"),
            }
        }
        let before = std::mem::replace(&mut self.known, known);
        let (added, removed) = self.converge().await?;
        // Remote endpoints that arrived by this re-read (after an outage or
        // a watch gap) count in the lag too; at start, everything is old.
        if std::mem::replace(&mut self.synced, true) {
            for (id, ep) in self.known.iter() {
                if !before.contains_key(id) {
                    self.observe_lag(ep);
                }
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
        if let (None, Some(ep)) = (&old, &new) {
            self.observe_lag(ep);
        }
        Ok(())
    }

    /// A host came or went: the wanted entries changed. Meanwhile, every
    /// [`REPAIR_PERIOD`], entries changed behind our back (by hand, by
    /// another program) are put back from what was read, without a store
    /// call.
    async fn stale(&mut self) -> Stale {
        loop {
            tokio::select! {
                changed = self.live.changed() => {
                    return match changed {
                        Ok(()) => Stale::Resync,
                        Err(_) => Stale::Stop,
                    }
                }
                _ = self.repair.tick() => match self.converge().await {
                    Ok((0, 0)) => {}
                    Ok((added, removed)) => {
                        tracing::warn!(added, removed, "kernel entries had drifted from the store; repaired");
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "could not repair the kernel's entries; resyncing");
                        return Stale::Resync;
                    }
                },
            }
        }
    }
}

impl Worker {
    fn id_of(&self, key: &str) -> String {
        key.strip_prefix(self.prefix.as_str())
            .unwrap_or(key)
            .to_string()
    }

    /// A remote endpoint seen for the first time, now in the kernel: how
    /// long since its host committed it (clock skew included).
    fn observe_lag(&self, ep: &EndpointRecord) {
        if ep.created_ms > 0 && self.is_remote(ep) {
            let lag = unix_now_ms().saturating_sub(ep.created_ms);
            telemetry::peer_sync_lag(Duration::from_millis(lag));
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

    /// What the kernel should hold: for every MAC and IP of a live remote
    /// endpoint, the entry of the newest record that has it. Two records can
    /// share an address for a moment (a stale record beside a re-issued
    /// one); deriving entries from all records means removing one record
    /// never removes the other's entries.
    fn desired(&self) -> Desired {
        desired_of(self.known.values().filter(|ep| self.is_remote(ep)))
    }

    /// Make the kernel hold exactly the desired entries; (added, removed).
    async fn converge(&self) -> anyhow::Result<(usize, usize)> {
        let want = self.desired();
        let have = self.dataplane.peers(self.vni).await?;
        let diff = diff(&want, &have);
        for mac in &diff.stale_fdb {
            self.dataplane.remove_peer(self.vni, *mac, None).await?;
        }
        for ip in &diff.stale_neigh {
            self.dataplane.remove_neighbour(self.vni, *ip).await?;
        }
        for entry in &diff.missing {
            self.dataplane.add_peer(self.vni, entry).await?;
        }
        Ok((
            diff.missing.len(),
            diff.stale_fdb.len() + diff.stale_neigh.len(),
        ))
    }

    /// Make the kernel's entries for these MACs and IPs what the records
    /// say (see [`Worker::desired`]), derived from the records that share
    /// them only.
    async fn settle(&self, touched: &[PeerEntry]) -> anyhow::Result<()> {
        if touched.is_empty() {
            return Ok(());
        }
        let sharing = self.known.sharing(touched);
        let want = desired_of(sharing.into_iter().filter(|ep| self.is_remote(ep)));
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dataplane::fake::FakeDataplane;
    use crate::util::mac::parse_mac;
    use kvstore_backends::KeyValue;
    use std::net::IpAddr;

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

    /// Host `a`'s worker for the overlay, on a fake kernel that has its
    /// devices; the sender moves the live set.
    async fn worker_on_a() -> (Arc<FakeDataplane>, Worker, watch::Sender<LiveSet>) {
        let fake = FakeDataplane::new("192.0.2.1".parse().unwrap());
        fake.ensure_network(VNI).await.unwrap();
        let (live_tx, live) = watch::channel(None);
        let worker = Worker {
            dataplane: fake.clone(),
            host: "a".into(),
            live,
            prefix: PREFIX.into(),
            vni: VNI,
            known: Known::default(),
            repair: repair_interval(),
            synced: false,
        };
        (fake, worker, live_tx)
    }

    /// Consul's watch finds deletes by comparing two reads, and dates them
    /// at the second read's index: a re-created endpoint with the same
    /// address (and so the same MAC) can arrive before the delete of the old
    /// one. The delete must not take the new endpoint's entries with it.
    #[tokio::test]
    async fn a_late_delete_of_an_old_record_keeps_the_entries_of_a_new_one_with_its_address() {
        let (fake, mut worker, _live_tx) = worker_on_a().await;
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

    /// An entry deleted by hand comes back at the next repair tick, without
    /// a store read: the worker converges on what it last read.
    #[tokio::test(start_paused = true)]
    async fn an_entry_deleted_by_hand_is_put_back_by_the_repair_tick() {
        let (fake, mut worker, live_tx) = worker_on_a().await;
        let ep = record("ep1", "b", "192.0.2.2", 100);
        worker.apply(event(EventKind::Put, &ep, 10)).await.unwrap();
        let mac = parse_mac(&ep.mac).unwrap();
        fake.remove_peer(VNI, mac, None).await.unwrap();
        assert!(!fake.peers(VNI).await.unwrap().fdb.contains_key(&mac));
        // The repair runs inside stale(); a liveness change ends it.
        let waiting = tokio::spawn(async move {
            let outcome = worker.stale().await;
            (worker, outcome)
        });
        tokio::time::sleep(REPAIR_PERIOD + Duration::from_millis(100)).await;
        assert_eq!(
            fake.peers(VNI).await.unwrap().fdb.get(&mac),
            Some(&"192.0.2.2".parse().unwrap()),
            "the FDB entry is back"
        );
        live_tx.send_replace(None);
        let (_, outcome) = waiting.await.unwrap();
        assert!(matches!(outcome, Stale::Resync));
    }
}
