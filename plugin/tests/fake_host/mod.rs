//! Simulated hosts without root: each host is wired the way `cmd::serve`
//! wires one (IPAM, overlays, live hosts, peer sync, devices, reconciler,
//! driver), but on a shared in-memory store and with its own in-memory data
//! plane ([`FakeDataplane`]). Several hosts in one test share one store, so a
//! test can play a small cluster, drive Docker's calls on each host, and
//! read each host's "kernel" from its fake.
#![allow(dead_code)]

use futures::future::BoxFuture;
use ipnetwork::IpNetwork;
use kvstore_backends::{
    KeyValue, KvStore, LeaseId, MemoryStore, RangeResponse, Revision, Txn, TxnResponse,
    WatchFidelity, WatchStream,
};
use rustoverlay::api::parse::pool_request;
use rustoverlay::cmd::{HostParts, HostSettings};
use rustoverlay::control::cluster::Clusters;
use rustoverlay::control::ipam::{pool_id, Ipam};
use rustoverlay::control::overlay::Overlays;
use rustoverlay::dataplane::fake::FakeDataplane;
use rustoverlay::dataplane::{Dataplane, KernelPeers, PeerEntry};
use rustoverlay::driver::{ClusterHooks, Driver, EndpointSpec, NetworkSpec, PoolSpec};
use rustoverlay::state::codec::encode;
use rustoverlay::state::keys;
use rustoverlay::state::records::{HostRecord, LocalNetwork};
use rustoverlay::sync::devices::Devices;
use rustoverlay::sync::membership::LiveSet;
use rustoverlay::sync::reconcile::Reconciler;
use rustoverlay::util::mac::parse_mac;
use std::future::Future;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::watch;

/// How long an eventual condition may take. Generous: these are
/// correctness tests, not timing tests.
pub const PATIENCE: Duration = Duration::from_secs(10);

pub const SUBNET: &str = "10.77.0.0/24";
pub const SUBNET_2: &str = "10.78.0.0/24";
/// The VNIs the first two overlays of a fresh store get.
pub const VNI: u32 = 256;
pub const VNI_2: u32 = 257;

/// A fresh store for a cluster of simulated hosts.
pub fn store() -> Arc<dyn KvStore> {
    Arc::new(MemoryStore::new())
}

/// One simulated host: every layer of the plugin, on a fake kernel.
pub struct Host {
    pub name: String,
    pub store: Arc<dyn KvStore>,
    pub fake: Arc<FakeDataplane>,
    pub ipam: Arc<Ipam>,
    pub overlays: Arc<Overlays>,
    pub devices: Arc<Devices>,
    pub driver: Arc<Driver>,
    pub reconciler: Arc<Reconciler>,
    /// This host's view of the registered hosts (the one its peer sync uses).
    pub live: watch::Receiver<LiveSet>,
    /// What its driver shares with the cluster sync.
    pub cluster: ClusterHooks,
}

/// A kernel that holds exactly these endpoints' entries.
pub fn exactly(eps: &[&Ep]) -> KernelPeers {
    KernelPeers {
        fdb: eps.iter().map(|e| (e.mac, e.vtep)).collect(),
        neigh: eps.iter().map(|e| (e.ip(), e.mac)).collect(),
    }
}

/// An endpoint as a test made it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ep {
    pub network_id: String,
    pub endpoint_id: String,
    pub pool: String,
    pub addr: IpNetwork,
    pub mac: [u8; 6],
    pub vtep: IpAddr,
}

impl Ep {
    pub fn ip(&self) -> IpAddr {
        self.addr.ip()
    }

    /// The entries a remote host's kernel should hold for this endpoint.
    pub fn peer(&self) -> PeerEntry {
        PeerEntry {
            mac: self.mac,
            ip: Some(self.ip()),
            vtep: self.vtep,
        }
    }
}

impl Host {
    /// A registered host, wired as `serve` wires one.
    pub async fn start(store: &Arc<dyn KvStore>, name: &str, vtep: &str) -> Host {
        let h = Host::unregistered(store, name, vtep);
        h.register().await;
        h
    }

    /// A host that has not written its registration.
    pub fn unregistered(store: &Arc<dyn KvStore>, name: &str, vtep: &str) -> Host {
        Host::on(store, name, FakeDataplane::new(vtep.parse().unwrap()))
    }

    /// The plugin started again on the same kernel (the fake keeps its
    /// devices and entries) and the same store: what a restart looks like.
    pub fn restart(self) -> Host {
        let Host {
            name, store, fake, ..
        } = self;
        Host::on(&store, &name, fake)
    }

    fn on(store: &Arc<dyn KvStore>, name: &str, fake: Arc<FakeDataplane>) -> Host {
        let cluster = ClusterHooks {
            clusters: Arc::new(Clusters::new(store.clone(), name)),
            changed: Arc::new(tokio::sync::Notify::new()),
        };
        let parts = HostParts::with_names(
            store.clone(),
            fake.clone(),
            name,
            HostSettings {
                default_pool: "10.200.0.0/16".parse().unwrap(),
                default_pool_size: 24,
                linger: Duration::ZERO,
            },
            None,
            Some(cluster.clone()),
        );
        Host {
            name: name.to_string(),
            store: store.clone(),
            fake,
            ipam: parts.ipam,
            overlays: parts.overlays,
            devices: parts.devices,
            driver: parts.driver,
            reconciler: parts.reconciler,
            live: parts.live,
            cluster,
        }
    }

    pub fn vtep(&self) -> IpAddr {
        self.fake.vtep()
    }

    /// Write this host's registration (without a lease: it stays until
    /// [`Host::unregister`]).
    pub async fn register(&self) {
        let record = HostRecord {
            host: self.name.clone(),
            vtep: self.vtep(),
            version: "test".into(),
        };
        self.store
            .put(&keys::host_registration(&self.name), encode(&record))
            .await
            .unwrap();
    }

    /// Delete this host's registration, as an expired lease does.
    pub async fn unregister(&self) {
        self.store
            .delete(&keys::host_registration(&self.name))
            .await
            .unwrap();
    }

    /// Wait until this host's live set says `host` is (or is not) registered.
    pub async fn sees_registered(&self, host: &str, registered: bool) {
        let live = self.live.clone();
        let host = host.to_string();
        eventually(
            &format!("{} sees {host} registered = {registered}", self.name),
            || {
                live.borrow()
                    .as_ref()
                    .is_some_and(|l| l.contains(&host) == registered)
            },
        )
        .await;
    }

    /// What Docker does for `docker network create`: claim the pool (one
    /// reference), its gateway, then CreateNetwork.
    pub async fn create_network(&self, network_id: &str, subnet: &str) -> LocalNetwork {
        self.create_network_as(network_id, subnet, false).await
    }

    /// RequestPool, the gateway and CreateNetwork, with `-o cluster=true`
    /// when `cluster` is set.
    pub async fn create_network_as(
        &self,
        network_id: &str,
        subnet: &str,
        cluster: bool,
    ) -> LocalNetwork {
        let rec = self
            .ipam
            .request_pool(&pool_request(subnet, "", false).unwrap())
            .await
            .unwrap();
        let pool = pool_id(&rec.subnet);
        self.ipam.request_address(&pool, None, true).await.unwrap();
        self.driver
            .create_network(NetworkSpec {
                network_id: network_id.into(),
                ipv4: vec![PoolSpec {
                    subnet: rec.subnet,
                    aux: vec![],
                }],
                ipv6: vec![],
                cluster,
            })
            .await
            .unwrap();
        self.overlays.lookup(network_id).await.unwrap()
    }

    /// RequestAddress then CreateEndpoint, with a derived MAC.
    pub async fn create_endpoint(&self, network_id: &str, endpoint_id: &str) -> Ep {
        self.create_endpoint_with(network_id, endpoint_id, None, None)
            .await
    }

    /// RequestAddress (`--ip` when `ip` is given) then CreateEndpoint (with
    /// `mac` when given).
    pub async fn create_endpoint_with(
        &self,
        network_id: &str,
        endpoint_id: &str,
        ip: Option<IpAddr>,
        mac: Option<[u8; 6]>,
    ) -> Ep {
        let net = self.overlays.lookup(network_id).await.unwrap();
        let pool = pool_id(&net.subnets[0]);
        let addr = self.ipam.request_address(&pool, ip, false).await.unwrap();
        let spec = EndpointSpec {
            network_id: network_id.into(),
            endpoint_id: endpoint_id.into(),
            ipv4: Some(addr),
            ipv6: None,
            mac,
        };
        let given = self.driver.create_endpoint(spec).await.unwrap();
        let mac = mac.unwrap_or_else(|| parse_mac(&given.expect("a derived MAC")).unwrap());
        Ep {
            network_id: network_id.into(),
            endpoint_id: endpoint_id.into(),
            pool,
            addr,
            mac,
            vtep: self.vtep(),
        }
    }

    /// CreateEndpoint then Join: a running container.
    pub async fn run(&self, network_id: &str, endpoint_id: &str) -> Ep {
        let ep = self.create_endpoint(network_id, endpoint_id).await;
        self.driver.join(network_id, endpoint_id).await.unwrap();
        ep
    }

    /// Leave, DeleteEndpoint and ReleaseAddress: the container removed.
    pub async fn stop(&self, ep: &Ep) {
        self.driver
            .leave(&ep.network_id, &ep.endpoint_id)
            .await
            .unwrap();
        self.driver
            .delete_endpoint(&ep.network_id, &ep.endpoint_id)
            .await
            .unwrap();
        self.ipam.release_address(&ep.pool, ep.ip()).await.unwrap();
    }

    /// The permanent remote entries this host's kernel holds for an overlay.
    pub fn kernel_peers(&self, vni: u32) -> KernelPeers {
        self.fake.network(vni).map(|n| n.peers).unwrap_or_default()
    }

    /// True when this host's kernel holds exactly the endpoint's entries.
    pub fn has_peer(&self, vni: u32, ep: &Ep) -> bool {
        let k = self.kernel_peers(vni);
        k.fdb.get(&ep.mac) == Some(&ep.vtep) && k.neigh.get(&ep.ip()) == Some(&ep.mac)
    }

    /// True when this host's kernel holds neither of the endpoint's entries.
    pub fn lacks_peer(&self, vni: u32, ep: &Ep) -> bool {
        let k = self.kernel_peers(vni);
        !k.fdb.contains_key(&ep.mac) && !k.neigh.contains_key(&ep.ip())
    }

    /// True when the overlay's devices exist and hold the endpoint's port.
    pub fn has_port(&self, vni: u32, endpoint_id: &str) -> bool {
        self.fake.network(vni).is_some_and(|n| {
            n.ports
                .contains(rustoverlay::dataplane::names::short_id(endpoint_id))
        })
    }
}

/// Poll `check` until it holds, failing the test after [`PATIENCE`].
pub async fn eventually(what: &str, mut check: impl FnMut() -> bool) {
    let start = Instant::now();
    loop {
        if check() {
            return;
        }
        assert!(
            start.elapsed() < PATIENCE,
            "{what}: not within {PATIENCE:?}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Wait for a held call of the fake to arrive.
pub async fn entered(rx: tokio::sync::oneshot::Receiver<()>, what: &str) {
    tokio::time::timeout(PATIENCE, rx)
        .await
        .unwrap_or_else(|_| panic!("{what}: the held call never came"))
        .unwrap_or_else(|_| panic!("{what}: the hold was dropped"));
}

/// Await a spawned task, failing the test after [`PATIENCE`].
pub async fn finish<T>(what: &str, task: impl Future<Output = T>) -> T {
    tokio::time::timeout(PATIENCE, task)
        .await
        .unwrap_or_else(|_| panic!("{what}: did not finish within {PATIENCE:?}"))
}

type Action = Box<dyn FnOnce(Arc<dyn KvStore>) -> BoxFuture<'static, ()> + Send>;

/// A store that runs a test's action once, right after a given key has been
/// read: "another writer acted just after this read", at exactly that point.
pub struct HookStore {
    inner: Arc<dyn KvStore>,
    hook: Mutex<Option<(String, Action)>>,
    /// Transactions still to apply whose answer is then lost (a timeout).
    lost_answers: std::sync::atomic::AtomicUsize,
}

impl HookStore {
    pub fn new(inner: Arc<dyn KvStore>) -> Arc<HookStore> {
        Arc::new(HookStore {
            inner,
            hook: Mutex::new(None),
            lost_answers: std::sync::atomic::AtomicUsize::new(0),
        })
    }

    /// Run `action` on the inner store once, after the next read of `key`
    /// (the read returns what it saw before the action).
    pub fn after_get(&self, key: &str, action: Action) {
        *self.hook.lock().unwrap() = Some((key.to_string(), action));
    }

    /// The next `n` writing transactions are applied, and then time out: a
    /// commit whose answer was lost on the way back.
    pub fn lose_answers(&self, n: usize) {
        self.lost_answers
            .store(n, std::sync::atomic::Ordering::SeqCst);
    }

    /// True once the hook has run.
    pub fn fired(&self) -> bool {
        self.hook.lock().unwrap().is_none()
    }
}

#[async_trait::async_trait]
impl KvStore for HookStore {
    fn backend_name(&self) -> &'static str {
        "hook"
    }

    async fn get(&self, key: &str) -> kvstore_backends::Result<Option<KeyValue>> {
        let got = self.inner.get(key).await;
        let action = {
            let mut hook = self.hook.lock().unwrap();
            match hook.as_ref() {
                Some((k, _)) if k == key => hook.take().map(|(_, a)| a),
                _ => None,
            }
        };
        if let Some(action) = action {
            action(self.inner.clone()).await;
        }
        got
    }

    async fn range(&self, prefix: &str) -> kvstore_backends::Result<RangeResponse> {
        self.inner.range(prefix).await
    }

    async fn txn(&self, txn: Txn) -> kvstore_backends::Result<TxnResponse> {
        let writes = txn
            .success
            .iter()
            .any(|op| !matches!(op, kvstore_backends::Op::Get { .. }));
        let resp = self.inner.txn(txn).await;
        let lost = writes
            && self
                .lost_answers
                .fetch_update(
                    std::sync::atomic::Ordering::SeqCst,
                    std::sync::atomic::Ordering::SeqCst,
                    |n| n.checked_sub(1),
                )
                .is_ok();
        if lost {
            return Err(kvstore_backends::StoreError::Timeout(Duration::from_secs(
                5,
            )));
        }
        resp
    }

    async fn watch(
        &self,
        prefix: &str,
        start_revision: Revision,
    ) -> kvstore_backends::Result<WatchStream> {
        self.inner.watch(prefix, start_revision).await
    }

    fn watch_fidelity(&self) -> WatchFidelity {
        self.inner.watch_fidelity()
    }

    async fn grant_lease(&self, ttl: Duration) -> kvstore_backends::Result<LeaseId> {
        self.inner.grant_lease(ttl).await
    }

    async fn keep_alive(
        &self,
        lease: LeaseId,
    ) -> kvstore_backends::Result<Option<kvstore_backends::Revision>> {
        self.inner.keep_alive(lease).await
    }

    async fn revoke_lease(&self, lease: LeaseId) -> kvstore_backends::Result<()> {
        self.inner.revoke_lease(lease).await
    }
}
