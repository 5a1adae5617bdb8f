//! Where the resolver listens, in the kernel.
//!
//! - In each overlay's namespace: the resolver's address (/32) on the
//!   overlay's bridge, and a link-scope default route out of the bridge for
//!   the replies (the namespace has nothing else to route to, and its
//!   containers may sit in any subnet of the overlay). Containers reach the
//!   address through a connected route that Join hands Docker.
//! - On the host: the address on `lo` (a dummy link would do, but not every
//!   kernel has the module), so that queries from Docker's bridges and the
//!   host network are delivered locally, and refused at once while the
//!   plugin is down instead of leaving the host by its default route.
//!
//! Sockets are bound inside a namespace on a short-lived thread (as in
//! `netns.rs`); a socket stays in the namespace it was made in.

use super::error::{DataplaneError, Result};
use super::links::require_index;
use super::netns::connect_in;
use futures::TryStreamExt;
use rtnetlink::packet_route::route::{RouteAttribute, RouteScope};
use rtnetlink::{Handle, RouteMessageBuilder};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener, UdpSocket};
use std::path::Path;

/// The host's link that carries the resolver's address.
pub const HOST_DNS_LINK: &str = "lo";
const DNS_PORT: u16 = 53;

/// A listener's sockets, still std (made on a thread inside a namespace).
#[derive(Debug)]
pub struct DnsSockets {
    pub udp: UdpSocket,
    pub tcp: TcpListener,
}

impl DnsSockets {
    /// Register both with the current tokio runtime.
    pub fn into_tokio(self) -> std::io::Result<(tokio::net::UdpSocket, tokio::net::TcpListener)> {
        Ok((
            tokio::net::UdpSocket::from_std(self.udp)?,
            tokio::net::TcpListener::from_std(self.tcp)?,
        ))
    }
}

fn errno(e: &rtnetlink::Error) -> Option<i32> {
    match e {
        rtnetlink::Error::NetlinkError(m) => m.code.map(|c| -c.get()),
        _ => None,
    }
}

/// Put `addr`/32 on the link; an address already there is fine.
pub(super) async fn ensure_address(handle: &Handle, index: u32, addr: Ipv4Addr) -> Result<()> {
    match handle
        .address()
        .add(index, IpAddr::V4(addr), 32)
        .execute()
        .await
    {
        Err(e) if errno(&e) != Some(libc::EEXIST) => Err(DataplaneError::netlink(
            format!("add the resolver address {addr}"),
            e,
        )),
        _ => Ok(()),
    }
}

/// A link-scope default route out of the bridge, from the resolver's
/// address: how the resolver's answers find containers of any subnet.
pub(super) async fn ensure_reply_route(handle: &Handle, bridge: u32, addr: Ipv4Addr) -> Result<()> {
    let route = RouteMessageBuilder::<Ipv4Addr>::new()
        .output_interface(bridge)
        .pref_source(addr)
        .scope(RouteScope::Link)
        .build();
    handle
        .route()
        .add(route)
        .replace()
        .execute()
        .await
        .map_err(|e| DataplaneError::netlink("add the resolver's reply route", e))
}

/// The resolver's address on the host's loopback link.
pub(super) async fn ensure_host_address(handle: &Handle, addr: Ipv4Addr) -> Result<()> {
    let index = require_index(handle, HOST_DNS_LINK).await?;
    ensure_address(handle, index, addr).await
}

/// Bind UDP and TCP on `addr`:53 in the current namespace.
pub(super) fn bind(addr: Ipv4Addr) -> std::io::Result<DnsSockets> {
    let at = SocketAddr::from((addr, DNS_PORT));
    let udp = UdpSocket::bind(at)?;
    udp.set_nonblocking(true)?;
    let tcp = TcpListener::bind(at)?;
    tcp.set_nonblocking(true)?;
    Ok(DnsSockets { udp, tcp })
}

/// Bind the listener's sockets inside the namespace at `ns_path`.
pub(super) fn bind_in(ns_path: &Path, addr: Ipv4Addr) -> Result<DnsSockets> {
    let ns = std::fs::File::open(ns_path)
        .map_err(|e| DataplaneError::io(format!("open namespace {}", ns_path.display()), e))?;
    std::thread::spawn(move || {
        nix::sched::setns(&ns, nix::sched::CloneFlags::CLONE_NEWNET)
            .map_err(std::io::Error::from)?;
        bind(addr)
    })
    .join()
    .map_err(|_| DataplaneError::Setup("socket thread panicked".into()))?
    .map_err(|e| DataplaneError::io(format!("bind {addr}:53 in {}", ns_path.display()), e))
}

/// Whether the namespace at `sandbox` (a container's, from Join's
/// SandboxKey) already has a route to `dst`/32.
pub(super) async fn sandbox_has_route(sandbox: &Path, dst: Ipv4Addr) -> Result<bool> {
    let handle = connect_in(sandbox)?;
    let mut routes = handle
        .route()
        .get(RouteMessageBuilder::<Ipv4Addr>::new().build())
        .execute();
    while let Some(route) = routes
        .try_next()
        .await
        .map_err(|e| DataplaneError::netlink("list the sandbox's routes", e))?
    {
        if route.header.destination_prefix_length != 32 {
            continue;
        }
        let to = route.attributes.iter().find_map(|a| match a {
            RouteAttribute::Destination(d) => Some(d.clone()),
            _ => None,
        });
        if matches!(to, Some(rtnetlink::packet_route::route::RouteAddress::Inet(ip)) if ip == dst) {
            return Ok(true);
        }
    }
    Ok(false)
}
