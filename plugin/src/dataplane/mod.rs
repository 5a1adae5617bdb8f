//! The kernel side of an overlay, behind one trait.
//!
//! Per overlay with a local endpoint, a namespace `ro-<vni>` holds a bridge
//! `ro-br-<vni>` and a VXLAN device `ro-vx-<vni>` (learning off, proxy ARP on,
//! UDP 4789); each endpoint is a veth pair. Remote endpoints are permanent
//! FDB (MAC -> VTEP) and neighbour (IP -> MAC) entries on the VXLAN device.
//!
//! [`Dataplane`] is the seam: [`Netlink`] is the real implementation (root,
//! rtnetlink only, never `ip`), [`fake::FakeDataplane`] an in-memory one so
//! that the logic above it is tested without root. Every write is idempotent
//! and every removal treats "already gone" as done, in both.

pub mod dns;
pub mod error;
pub mod fake;
mod fdb;
mod links;
pub mod names;
mod netlink;
pub mod netns;
pub mod path_probe;
pub mod probe;
mod underlay;

pub use dns::DnsSockets;
pub use error::DataplaneError;
pub use netlink::Netlink;
pub use probe::Probe;
pub use underlay::Underlay;

use async_trait::async_trait;
use error::Result;
use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr};
use std::path::Path;
use std::time::Duration;

pub const VXLAN_PORT: u16 = 4789;
/// Outer Ethernet, IPv4, UDP and VXLAN headers.
pub const VXLAN_OVERHEAD: u32 = 50;

/// A remote endpoint as the kernel needs it: FDB (MAC -> VTEP) and
/// neighbour (IP -> MAC) entries on the overlay's VXLAN device.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct PeerEntry {
    pub mac: [u8; 6],
    pub ip: Option<IpAddr>,
    pub vtep: IpAddr,
}

/// What the kernel holds for an overlay: FDB MAC -> VTEP, neighbour IP -> MAC.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct KernelPeers {
    pub fdb: HashMap<[u8; 6], IpAddr>,
    pub neigh: HashMap<IpAddr, [u8; 6]>,
}

/// This host's overlay devices and peer entries.
#[async_trait]
pub trait Dataplane: Send + Sync + 'static {
    /// The address other hosts send this host's overlay traffic to.
    fn vtep(&self) -> IpAddr;

    /// True when the overlay's namespace exists on this host.
    fn has_network(&self, vni: u32) -> bool;

    /// VNIs whose namespace exists on this host.
    fn local_vnis(&self) -> Vec<u32>;

    /// Make sure the overlay's namespace, bridge and VXLAN device exist and
    /// are up. A failure removes what this call created.
    async fn ensure_network(&self, vni: u32) -> Result<()>;

    /// Remove the overlay's devices and namespace from this host.
    async fn remove_network(&self, vni: u32) -> Result<()>;

    /// Create the endpoint's veth pair, its bridge side attached to the
    /// overlay's bridge. Returns the container side's name, for Docker.
    async fn create_endpoint_link(
        &self,
        vni: u32,
        endpoint_id: &str,
        mac: [u8; 6],
    ) -> Result<String>;

    /// Short IDs ([`names::short_id`]) of the endpoints with a bridge port.
    async fn endpoint_ports(&self, vni: u32) -> Result<Vec<String>>;

    /// Remove the endpoint's veth pair wherever it still is. `endpoint_id`
    /// may be a short ID.
    async fn remove_endpoint_link(&self, vni: u32, endpoint_id: &str) -> Result<()>;

    /// Install a remote endpoint's permanent FDB and neighbour entries,
    /// replacing what the kernel held for that MAC and IP.
    async fn add_peer(&self, vni: u32, peer: &PeerEntry) -> Result<()>;

    /// Remove a remote endpoint's entries.
    async fn remove_peer(&self, vni: u32, mac: [u8; 6], ip: Option<IpAddr>) -> Result<()>;

    /// Remove one neighbour entry.
    async fn remove_neighbour(&self, vni: u32, ip: IpAddr) -> Result<()>;

    /// The permanent remote entries on the overlay's VXLAN device.
    async fn peers(&self, vni: u32) -> Result<KernelPeers>;

    /// Whether the machine at this underlay address answers (ICMP echo),
    /// within `window`.
    async fn probe_host(&self, underlay: IpAddr, window: Duration) -> Probe;

    /// The resolver's sockets inside the overlay's namespace, on `addr`
    /// (put on the overlay's bridge, with a route for the answers).
    async fn dns_listener(&self, vni: u32, addr: Ipv4Addr) -> Result<DnsSockets>;

    /// The resolver's sockets on the host, on `addr` (put on loopback).
    async fn host_dns_listener(&self, addr: Ipv4Addr) -> Result<DnsSockets>;

    /// Whether a container's namespace (Join's SandboxKey) already has a
    /// route to `dst`: a second one would make Docker's Join fail.
    async fn sandbox_has_route(&self, sandbox: &Path, dst: Ipv4Addr) -> Result<bool>;

    /// The VXLAN path probe's responder (`path_probe`): its device and
    /// namespace, made if missing, and the socket its requests arrive on.
    async fn path_probe_listener(&self) -> Result<std::net::UdpSocket>;

    /// Remove the responder's device and namespace (at shutdown).
    async fn remove_path_probe(&self) -> Result<()>;
}
