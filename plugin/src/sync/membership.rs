//! Host membership: each plugin announces its host (ID, VTEP) under a lease
//! that it keeps alive, and follows which hosts are registered. Peers read
//! VTEPs here, and a host whose lease expired is known to be gone.

use super::follow::{follow, Follower};
use crate::state::codec::{encode, take_gets};
use crate::state::keys;
use crate::state::records::HostRecord;
use crate::telemetry;
use crate::util::backoff::Retry;
use crate::util::task::spawn_supervised;
use async_trait::async_trait;
use kvstore_backends::{
    Compare, EventKind, KvStore, LeaseId, Op, RangeResponse, Revision, StoreError, Txn, WatchEvent,
};
use std::collections::{HashMap, HashSet};
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, oneshot, watch};
use tracing::Instrument;

/// What the registration loop tells the supervisor.
#[derive(Debug)]
pub enum LeaseEvent {
    /// The lease expired: other hosts may reclaim what this host held.
    Lost,
    /// Registered again after a loss. The supervisor answers whether this
    /// host has reconciled; on `false` the registration is dropped and tried
    /// again.
    Regained(oneshot::Sender<bool>),
    /// Another machine holds this host ID: this plugin must not run.
    Clash(String),
}

#[derive(Debug, thiserror::Error)]
pub enum RegisterError {
    #[error("{0}")]
    Store(#[from] StoreError),
    /// A live registration of this host ID has another VTEP: two machines
    /// share the ID (a cloned VM keeps its hostname). Each would take the
    /// other's endpoints for its own orphans.
    #[error(
        "host ID {host:?} is already registered by a live plugin with VTEP {theirs}, and this \
         host's VTEP is {mine}: two machines share one host ID (a cloned VM keeps its hostname). \
         Give this host its own --host-id (RUSTOVERLAY_HOST_ID); if the other machine is gone, \
         its registration expires {ttl} s after its plugin stopped"
    )]
    Clash {
        host: String,
        theirs: IpAddr,
        mine: IpAddr,
        ttl: u64,
    },
}

/// What the registration loop publishes as it renews.
#[derive(Clone)]
pub struct Renewals {
    /// See [`Registration::lease`].
    pub lease: watch::Receiver<Option<LeaseId>>,
    /// The store's revision as the latest renewal reported it.
    pub revision: watch::Receiver<Option<Revision>>,
}

#[derive(Clone)]
pub struct Registration {
    store: Arc<dyn KvStore>,
    record: HostRecord,
    ttl: Duration,
    /// The lease of the registration in force (None while lost, or not yet
    /// reconciled after a loss): the reaper role is held under it.
    current: Arc<watch::Sender<Option<LeaseId>>>,
    /// The store's revision as the latest renewal reported it (None when it
    /// did not, or failed): lets the orphan sweep see that nothing was
    /// written without reading the store.
    renewed: Arc<watch::Sender<Option<Revision>>>,
}

impl Registration {
    pub fn new(store: Arc<dyn KvStore>, host: String, vtep: IpAddr, ttl: Duration) -> Self {
        Registration {
            store,
            record: HostRecord {
                host,
                vtep,
                version: env!("CARGO_PKG_VERSION").to_string(),
            },
            ttl,
            current: Arc::new(watch::channel(None).0),
            renewed: Arc::new(watch::channel(None).0),
        }
    }

    /// Follow the lease of the registration in force.
    pub fn lease(&self) -> watch::Receiver<Option<LeaseId>> {
        self.current.subscribe()
    }

    /// Follow the lease and the store revision that renewals report.
    pub fn renewals(&self) -> Renewals {
        Renewals {
            lease: self.lease(),
            revision: self.renewed.subscribe(),
        }
    }

    /// Write the registration under a fresh lease. A registration of this
    /// host ID that is alive with another VTEP is refused ([`RegisterError::Clash`]);
    /// one with this host's VTEP is this host's own (a restarted plugin) and
    /// is taken over.
    pub async fn register(&self) -> Result<LeaseId, RegisterError> {
        let key = keys::host_registration(&self.record.host);
        let lease = self.store.grant_lease(self.ttl).await?;
        let mut expected = None;
        let mut retry = Retry::new();
        while retry.next().await {
            let put = Op::put_with_lease(&key, encode(&self.record), lease.clone());
            let guard = match expected {
                None => Compare::absent(&key),
                Some(rev) => Compare::mod_revision(&key, rev),
            };
            let written = self
                .store
                .txn(
                    Txn::new()
                        .when(vec![guard])
                        .and_then(vec![put])
                        .or_else(vec![Op::get(&key)]),
                )
                .await;
            let resp = match written {
                Ok(resp) => resp,
                Err(e) => {
                    // Best effort: a lease nobody uses only lasts its TTL.
                    let _ = self.store.revoke_lease(lease).await;
                    return Err(e.into());
                }
            };
            if resp.succeeded {
                tracing::info!(host = %self.record.host, vtep = %self.record.vtep, lease = %lease, "host registered");
                return Ok(lease);
            }
            let [current] = take_gets::<1>(resp.results);
            let Some(current) = current else {
                expected = None;
                continue;
            };
            let theirs = serde_json::from_slice::<HostRecord>(&current.value)
                .map(|r| r.vtep)
                .ok();
            if let Some(theirs) = theirs.filter(|v| *v != self.record.vtep) {
                let _ = self.store.revoke_lease(lease).await;
                return Err(RegisterError::Clash {
                    host: self.record.host.clone(),
                    theirs,
                    mine: self.record.vtep,
                    ttl: self.ttl.as_secs(),
                });
            }
            expected = Some(current.mod_revision);
        }
        let _ = self.store.revoke_lease(lease).await;
        Err(RegisterError::Store(StoreError::Conflict(
            "the host registration kept changing; retrying".into(),
        )))
    }

    /// Register, then renew at a third of the TTL forever. When the lease was
    /// lost (cut off from the store longer than the TTL), say so, register
    /// again, and keep the new registration only once the supervisor has
    /// reconciled: other hosts may have reclaimed what this host held.
    pub async fn run(&self, events: mpsc::Sender<LeaseEvent>) {
        let mut lease: Option<LeaseId> = None;
        let mut lost = false;
        let tick = self.ttl / 3;
        loop {
            match &lease {
                None => match self.register().await {
                    Ok(l) => {
                        lease = Some(l);
                        if lost {
                            let (reply, reconciled) = oneshot::channel();
                            if events.send(LeaseEvent::Regained(reply)).await.is_err() {
                                return;
                            }
                            if reconciled.await.unwrap_or(false) {
                                lost = false;
                            } else {
                                lease = None;
                            }
                        }
                        self.current.send_replace(lease.clone());
                    }
                    Err(e @ RegisterError::Clash { .. }) => {
                        tracing::error!(error = %e, "refusing to run");
                        let _ = events.send(LeaseEvent::Clash(e.to_string())).await;
                        return;
                    }
                    Err(e) => tracing::warn!(error = %e, "host registration failed; retrying"),
                },
                Some(l) => match self.store.keep_alive(l.clone()).await {
                    Ok(revision) => {
                        telemetry::lease_renewal("ok");
                        self.renewed.send_replace(revision);
                    }
                    Err(StoreError::LeaseNotFound(_)) => {
                        self.renewed.send_replace(None);
                        telemetry::lease_renewal("expired");
                        tracing::warn!("host lease expired; refusing Docker until re-registered and reconciled");
                        if events.send(LeaseEvent::Lost).await.is_err() {
                            return;
                        }
                        lost = true;
                        lease = None;
                        self.current.send_replace(None);
                        continue;
                    }
                    Err(e) => {
                        self.renewed.send_replace(None);
                        telemetry::lease_renewal("failed");
                        tracing::warn!(error = %e, "host lease renewal failed; retrying");
                    }
                },
            }
            tokio::time::sleep(tick).await;
        }
    }
}

/// Which hosts are registered now, kept current by watching the
/// registrations. `None` until the first read succeeded: until then nobody
/// is treated as gone.
pub type LiveSet = Option<Arc<HashSet<String>>>;

/// Follow the registrations and publish the live set on a channel.
pub fn watch_live_hosts(store: Arc<dyn KvStore>) -> watch::Receiver<LiveSet> {
    let (tx, rx) = watch::channel(None);
    let span = tracing::info_span!(parent: None, "live_hosts");
    spawn_supervised("live_hosts", move || {
        let mut follower = LiveHosts {
            prefix: keys::hosts(),
            live: HashSet::new(),
            tx: tx.clone(),
        };
        let store = store.clone();
        async move {
            let prefix = follower.prefix.clone();
            follow(store.as_ref(), &prefix, &mut follower).await
        }
        .instrument(span.clone())
    });
    rx
}

struct LiveHosts {
    prefix: String,
    live: HashSet<String>,
    tx: watch::Sender<LiveSet>,
}

impl LiveHosts {
    fn host_of<'a>(&self, key: &'a str) -> &'a str {
        key.strip_prefix(self.prefix.as_str()).unwrap_or(key)
    }
}

#[async_trait]
impl Follower for LiveHosts {
    async fn resync(&mut self, snapshot: RangeResponse) -> anyhow::Result<()> {
        self.live = snapshot
            .kvs
            .iter()
            .map(|kv| self.host_of(&kv.key).to_string())
            .collect();
        telemetry::hosts_alive(self.live.len());
        self.tx.send_replace(Some(Arc::new(self.live.clone())));
        Ok(())
    }

    async fn apply(&mut self, event: WatchEvent) -> anyhow::Result<()> {
        let host = self.host_of(&event.kv.key).to_string();
        let alive = matches!(event.kind, EventKind::Put);
        let changed = if alive {
            self.live.insert(host.clone())
        } else {
            self.live.remove(&host)
        };
        if changed {
            telemetry::hosts_alive(self.live.len());
            tracing::info!(host = %host, alive, "host liveness changed");
            self.tx.send_replace(Some(Arc::new(self.live.clone())));
        }
        Ok(())
    }
}

/// When each host was seen to leave the live set (Unix seconds), for
/// `status`. Only hosts that left while this plugin watched have a time.
#[derive(Clone, Default)]
pub struct GoneClock(Arc<std::sync::Mutex<HashMap<String, u64>>>);

impl GoneClock {
    /// Follow the live set for as long as the process runs.
    pub fn follow(mut live: watch::Receiver<LiveSet>) -> GoneClock {
        let clock = GoneClock::default();
        let board = clock.0.clone();
        tokio::spawn(async move {
            let mut before: LiveSet = live.borrow_and_update().clone();
            while live.changed().await.is_ok() {
                let now: LiveSet = live.borrow_and_update().clone();
                if let (Some(was), Some(is)) = (&before, &now) {
                    let mut board = board.lock().unwrap_or_else(|p| p.into_inner());
                    for host in was.iter().filter(|h| !is.contains(*h)) {
                        board.insert(host.clone(), crate::util::clock::unix_now());
                    }
                    board.retain(|h, _| !is.contains(h));
                }
                before = now;
            }
        });
        clock
    }

    pub fn since(&self, host: &str) -> Option<u64> {
        self.0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(host)
            .copied()
    }
}
