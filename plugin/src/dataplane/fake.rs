//! [`FakeDataplane`]: the data plane in memory, for tests without root.
//!
//! It keeps the contract of [`Netlink`](super::Netlink) that the logic above
//! relies on: creating an endpoint link or a peer entry needs the overlay's
//! devices, writes are idempotent, removals of what is gone succeed. Tests can
//! make the next call of an operation fail, or hold it until released, to
//! drive rollbacks and races deterministically. The real implementation keeps
//! its own root tests in the namespace tier.

use super::error::{DataplaneError, Result};
use super::names::short_id;
use super::{Dataplane, DnsSockets, KernelPeers, PeerEntry, Probe};
use async_trait::async_trait;
use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::net::{IpAddr, Ipv4Addr};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::oneshot;

/// The operations a test can make fail or hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FakeOp {
    EnsureNetwork,
    RemoveNetwork,
    CreateEndpointLink,
    EndpointPorts,
    RemoveEndpointLink,
    AddPeer,
    RemovePeer,
    Peers,
    ProbeHost,
}

/// One overlay's devices as the fake holds them.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct FakeNetwork {
    /// Short IDs of the endpoints with a bridge port.
    pub ports: BTreeSet<String>,
    pub peers: KernelPeers,
}

/// A held call: `entered` fires when the call arrives, and the call goes on
/// once `release` is sent (or dropped).
pub struct Held {
    pub entered: oneshot::Receiver<()>,
    pub release: oneshot::Sender<()>,
}

#[derive(Default)]
struct State {
    networks: BTreeMap<u32, FakeNetwork>,
    failures: HashMap<FakeOp, usize>,
    holds: HashMap<FakeOp, (oneshot::Sender<()>, oneshot::Receiver<()>)>,
    calls: HashMap<FakeOp, usize>,
    /// Underlay addresses whose machines answer probes (none by default).
    answering: HashSet<IpAddr>,
    /// Container namespaces that already have the resolver's route.
    routed_sandboxes: HashSet<PathBuf>,
    /// Where the path probe's responder listens (on loopback).
    probe_listener: Option<std::net::SocketAddr>,
}

pub struct FakeDataplane {
    vtep: IpAddr,
    state: Mutex<State>,
}

impl FakeDataplane {
    pub fn new(vtep: IpAddr) -> Arc<Self> {
        Arc::new(FakeDataplane {
            vtep,
            state: Mutex::new(State::default()),
        })
    }

    /// Where the path probe's responder listens, once it does.
    pub fn probe_listener(&self) -> Option<std::net::SocketAddr> {
        self.state().probe_listener
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The next `times` calls of `op` fail (after any hold).
    pub fn fail_next(&self, op: FakeOp, times: usize) {
        *self.state().failures.entry(op).or_default() += times;
    }

    /// Hold the next call of `op` until the returned handle releases it.
    pub fn hold_next(&self, op: FakeOp) -> Held {
        let (entered_tx, entered) = oneshot::channel();
        let (release, release_rx) = oneshot::channel();
        self.state().holds.insert(op, (entered_tx, release_rx));
        Held { entered, release }
    }

    /// How many times `op` was called.
    pub fn calls(&self, op: FakeOp) -> usize {
        self.state().calls.get(&op).copied().unwrap_or(0)
    }

    /// The overlay's devices, if it has any.
    pub fn network(&self, vni: u32) -> Option<FakeNetwork> {
        self.state().networks.get(&vni).cloned()
    }

    /// Put a leftover port into an overlay (as after a crash).
    pub fn plant_port(&self, vni: u32, endpoint_id: &str) {
        self.state()
            .networks
            .entry(vni)
            .or_default()
            .ports
            .insert(short_id(endpoint_id).to_string());
    }

    /// Make the machine at `underlay` answer probes (or stop answering).
    /// Make a container namespace look as if it had the resolver's route.
    pub fn set_sandbox_routed(&self, sandbox: &Path) {
        self.state().routed_sandboxes.insert(sandbox.to_path_buf());
    }

    pub fn set_answering(&self, underlay: IpAddr, answers: bool) {
        let mut st = self.state();
        if answers {
            st.answering.insert(underlay);
        } else {
            st.answering.remove(&underlay);
        }
    }

    /// Put a stale peer entry into an overlay (as after a missed event).
    pub fn plant_peer(&self, vni: u32, peer: &PeerEntry) {
        let mut st = self.state();
        let net = st.networks.entry(vni).or_default();
        insert_peer(net, peer);
    }

    /// Count the call, wait out a hold, then apply an injected failure.
    async fn enter(&self, op: FakeOp) -> Result<()> {
        let hold = {
            let mut st = self.state();
            *st.calls.entry(op).or_default() += 1;
            st.holds.remove(&op)
        };
        if let Some((entered, release)) = hold {
            let _ = entered.send(());
            let _ = release.await;
        }
        let mut st = self.state();
        match st.failures.get_mut(&op) {
            Some(n) if *n > 0 => {
                *n -= 1;
                Err(DataplaneError::Setup(format!("injected failure of {op:?}")))
            }
            _ => Ok(()),
        }
    }

    fn with_network<T>(&self, vni: u32, f: impl FnOnce(&mut FakeNetwork) -> T) -> Result<T> {
        let mut st = self.state();
        let net = st
            .networks
            .get_mut(&vni)
            .ok_or_else(|| DataplaneError::Setup(format!("overlay {vni} has no devices")))?;
        Ok(f(net))
    }
}

fn insert_peer(net: &mut FakeNetwork, peer: &PeerEntry) {
    net.peers.fdb.insert(peer.mac, peer.vtep);
    if let Some(ip) = peer.ip {
        net.peers.neigh.insert(ip, peer.mac);
    }
}

#[async_trait]
impl Dataplane for FakeDataplane {
    fn vtep(&self) -> IpAddr {
        self.vtep
    }

    fn has_network(&self, vni: u32) -> bool {
        self.state().networks.contains_key(&vni)
    }

    fn local_vnis(&self) -> Vec<u32> {
        self.state().networks.keys().copied().collect()
    }

    async fn ensure_network(&self, vni: u32) -> Result<()> {
        self.enter(FakeOp::EnsureNetwork).await?;
        self.state().networks.entry(vni).or_default();
        Ok(())
    }

    async fn remove_network(&self, vni: u32) -> Result<()> {
        self.enter(FakeOp::RemoveNetwork).await?;
        self.state().networks.remove(&vni);
        Ok(())
    }

    async fn create_endpoint_link(
        &self,
        vni: u32,
        endpoint_id: &str,
        _mac: [u8; 6],
    ) -> Result<String> {
        self.enter(FakeOp::CreateEndpointLink).await?;
        let id = short_id(endpoint_id).to_string();
        self.with_network(vni, |net| net.ports.insert(id.clone()))?;
        Ok(format!("rc-{id}"))
    }

    async fn endpoint_ports(&self, vni: u32) -> Result<Vec<String>> {
        self.enter(FakeOp::EndpointPorts).await?;
        self.with_network(vni, |net| net.ports.iter().cloned().collect())
    }

    async fn remove_endpoint_link(&self, vni: u32, endpoint_id: &str) -> Result<()> {
        self.enter(FakeOp::RemoveEndpointLink).await?;
        if let Some(net) = self.state().networks.get_mut(&vni) {
            net.ports.remove(short_id(endpoint_id));
        }
        Ok(())
    }

    async fn add_peer(&self, vni: u32, peer: &PeerEntry) -> Result<()> {
        self.enter(FakeOp::AddPeer).await?;
        self.with_network(vni, |net| insert_peer(net, peer))
    }

    async fn remove_peer(&self, vni: u32, mac: [u8; 6], ip: Option<IpAddr>) -> Result<()> {
        self.enter(FakeOp::RemovePeer).await?;
        self.with_network(vni, |net| {
            net.peers.fdb.remove(&mac);
            if let Some(ip) = ip {
                net.peers.neigh.remove(&ip);
            }
        })
    }

    async fn remove_neighbour(&self, vni: u32, ip: IpAddr) -> Result<()> {
        self.enter(FakeOp::RemovePeer).await?;
        self.with_network(vni, |net| {
            net.peers.neigh.remove(&ip);
        })
    }

    async fn peers(&self, vni: u32) -> Result<KernelPeers> {
        self.enter(FakeOp::Peers).await?;
        self.with_network(vni, |net| net.peers.clone())
    }

    async fn probe_host(&self, underlay: IpAddr, _window: Duration) -> Probe {
        let mut st = self.state();
        *st.calls.entry(FakeOp::ProbeHost).or_default() += 1;
        if st.answering.contains(&underlay) {
            Probe::Answers
        } else {
            Probe::Silent
        }
    }

    /// Loopback sockets on free ports: the kernel part is the real
    /// dataplane's; what the resolver does with them is tested here.
    async fn dns_listener(&self, vni: u32, _addr: Ipv4Addr) -> Result<DnsSockets> {
        if !self.has_network(vni) {
            return Err(DataplaneError::Setup(format!("no devices for VNI {vni}")));
        }
        loopback_sockets()
    }

    async fn host_dns_listener(&self, _addr: Ipv4Addr) -> Result<DnsSockets> {
        loopback_sockets()
    }

    async fn sandbox_has_route(&self, sandbox: &Path, _dst: Ipv4Addr) -> Result<bool> {
        Ok(self.state().routed_sandboxes.contains(sandbox))
    }

    /// A socket on loopback: the requests of a test arrive there directly.
    async fn path_probe_listener(&self) -> Result<std::net::UdpSocket> {
        let socket = std::net::UdpSocket::bind("127.0.0.1:0")
            .map_err(|e| DataplaneError::io("bind a probe socket on loopback", e))?;
        socket
            .set_nonblocking(true)
            .map_err(|e| DataplaneError::io("make the probe socket non-blocking", e))?;
        self.state().probe_listener = socket.local_addr().ok();
        Ok(socket)
    }

    async fn remove_path_probe(&self) -> Result<()> {
        Ok(())
    }
}

fn loopback_sockets() -> Result<DnsSockets> {
    let io = |e| DataplaneError::io("bind a loopback socket", e);
    let udp = std::net::UdpSocket::bind("127.0.0.1:0").map_err(io)?;
    let tcp = std::net::TcpListener::bind("127.0.0.1:0").map_err(io)?;
    udp.set_nonblocking(true).map_err(io)?;
    tcp.set_nonblocking(true).map_err(io)?;
    Ok(DnsSockets { udp, tcp })
}
