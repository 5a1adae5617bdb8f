//! The listeners: UDP and TCP on the resolver's address, one pair inside each
//! overlay's namespace and one pair on the host.
//!
//! An overlay's listener answers that overlay's names (and those of the
//! querying container's other overlays) and forwards the rest. The host's
//! listener serves containers on Docker's bridges and the host network (the
//! daemon's `dns` setting sends them here too) and only forwards. Nothing on
//! the underlay may use it: Linux takes packets for any local address on any
//! interface, so it only answers UDP that came in on loopback or a Docker
//! bridge (the ingress interface, from IP_PKTINFO) and TCP from an address
//! on one of those (a TCP peer cannot spoof its address and finish the
//! handshake).

use super::forward::{self, Forwarder, NoAnswer};
use super::message::{self, Unusable};
use super::table::NameTable;
use crate::telemetry;
use hickory_proto::op::ResponseCode;
use std::io::IoSliceMut;
use std::net::{IpAddr, SocketAddr};
use std::os::fd::AsRawFd;
use std::sync::{Arc, RwLock};
use std::time::Duration;
use tokio::io::Interest;
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio::time::timeout;

/// A TCP client that sends nothing for this long is dropped.
const TCP_IDLE: Duration = Duration::from_secs(3);
/// One TCP exchange (answer and write) may take no longer: a client that
/// does not read its answers cannot hold a task and a socket for ever.
const TCP_EXCHANGE: Duration = Duration::from_secs(5);
/// TCP clients served at once per listener; more wait in the backlog.
const MAX_TCP: usize = 128;
/// Pause after a failed accept (out of file descriptors, say).
const ACCEPT_PAUSE: Duration = Duration::from_millis(200);

/// Which listener a query came to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Scope {
    /// The host's listener: forward only.
    Host,
    /// The listener in this overlay's namespace.
    Overlay(String),
}

/// The shared answering logic of every listener.
#[derive(Debug)]
pub struct Resolver {
    pub table: Arc<RwLock<NameTable>>,
    pub forwarder: Forwarder,
    pub ttl: u32,
}

#[derive(Clone, Copy)]
enum Transport {
    Udp,
    Tcp,
}

impl Resolver {
    /// The answer to one packet, or `None` when it deserves none.
    async fn answer(
        &self,
        scope: &Scope,
        source: IpAddr,
        packet: &[u8],
        transport: Transport,
    ) -> Option<Vec<u8>> {
        let query = match message::parse(packet) {
            Ok(q) => q,
            Err(Unusable::Garbage) => {
                telemetry::dns_query("refused");
                return None;
            }
            Err(Unusable::Refuse(id, code)) => {
                telemetry::dns_query("refused");
                return Some(message::refusal(id, code));
            }
        };
        if let Scope::Overlay(overlay) = scope {
            let found = self.table.read().unwrap_or_else(|p| p.into_inner()).lookup(
                overlay,
                source,
                &query.name,
            );
            if let Some(addrs) = found {
                tracing::trace!(name = %query.name, ?addrs, %source, "answered");
                telemetry::dns_query("answered");
                let limit = match transport {
                    Transport::Udp => query.udp_limit(),
                    Transport::Tcp => u16::MAX as usize,
                };
                return Some(query.answer_within(&addrs, self.ttl, limit));
            }
        }
        let relayed = match transport {
            Transport::Udp => self.forwarder.udp(packet).await,
            Transport::Tcp => self.forwarder.tcp(packet).await,
        };
        tracing::trace!(name = %query.name, %source, ?scope, ok = relayed.is_ok(), "forwarded");
        telemetry::dns_query("forwarded");
        Some(match relayed {
            Ok(bytes) => {
                telemetry::dns_forward("ok");
                bytes
            }
            Err(NoAnswer::Busy) => {
                telemetry::dns_forward("busy");
                query.failure(ResponseCode::Refused)
            }
            Err(NoAnswer::Failed) => {
                telemetry::dns_forward("failed");
                query.failure(ResponseCode::ServFail)
            }
        })
    }
}

/// Which interfaces the host's listener serves.
pub trait Acl: Send + Sync + 'static {
    fn allows_interface(&self, name: &str) -> bool;
}

/// Loopback and Docker's bridges (`docker0`, `docker_gwbridge`, and
/// `br-<first 12 hex digits of the network ID>`), plus any names the
/// operator adds (`--dns-interface`, e.g. a bridge network with its own
/// `com.docker.network.bridge.name`). Other `br-*` names (`br-lan`,
/// `br-ex`) often face the underlay and are not allowed.
#[derive(Debug, Default)]
pub struct DockerBridges {
    pub extra: Vec<String>,
}

impl Acl for DockerBridges {
    fn allows_interface(&self, name: &str) -> bool {
        name == "lo"
            || name == "docker0"
            || name == "docker_gwbridge"
            || name
                .strip_prefix("br-")
                .is_some_and(|id| id.len() == 12 && id.bytes().all(|b| b.is_ascii_hexdigit()))
            || self.extra.iter().any(|e| e == name)
    }
}

/// Answer UDP queries on an overlay's listener until the socket fails.
/// Dropping the future stops the replies in flight too.
pub async fn serve_udp(resolver: Arc<Resolver>, scope: Scope, socket: UdpSocket) {
    let socket = Arc::new(socket);
    let mut replies = JoinSet::new();
    let mut buf = vec![0u8; 4096];
    loop {
        while replies.try_join_next().is_some() {}
        let (n, from) = match socket.recv_from(&mut buf).await {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!(error = %e, ?scope, "DNS listener stopped");
                return;
            }
        };
        spawn_reply(
            &mut replies,
            &resolver,
            &scope,
            &socket,
            buf[..n].to_vec(),
            from,
        );
    }
}

/// Answer UDP queries on the host's listener, only from allowed interfaces.
pub async fn serve_udp_filtered(resolver: Arc<Resolver>, socket: UdpSocket, acl: Arc<dyn Acl>) {
    if let Err(e) =
        nix::sys::socket::setsockopt(&socket, nix::sys::socket::sockopt::Ipv4PacketInfo, &true)
    {
        tracing::error!(error = %e, "cannot learn the ingress interface of DNS queries; the host's DNS listener is off");
        return;
    }
    let socket = Arc::new(socket);
    let mut replies = JoinSet::new();
    let mut buf = vec![0u8; 4096];
    loop {
        while replies.try_join_next().is_some() {}
        let received = socket
            .async_io(Interest::READABLE, || {
                recv_with_interface(&socket, &mut buf)
            })
            .await;
        let (n, from, ifindex) = match received {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!(error = %e, "the host's DNS listener stopped");
                return;
            }
        };
        let name = ifindex.and_then(|i| nix::net::if_::if_indextoname(i).ok());
        let allowed = name
            .as_ref()
            .and_then(|n| n.to_str().ok())
            .is_some_and(|n| acl.allows_interface(n));
        if !allowed {
            tracing::debug!(%from, interface = ?name, "DNS query from outside Docker's bridges dropped");
            continue;
        }
        spawn_reply(
            &mut replies,
            &resolver,
            &Scope::Host,
            &socket,
            buf[..n].to_vec(),
            from,
        );
    }
}

fn spawn_reply(
    replies: &mut JoinSet<()>,
    resolver: &Arc<Resolver>,
    scope: &Scope,
    socket: &Arc<UdpSocket>,
    packet: Vec<u8>,
    from: SocketAddr,
) {
    let (resolver, scope, socket) = (resolver.clone(), scope.clone(), socket.clone());
    replies.spawn(async move {
        if let Some(answer) = resolver
            .answer(&scope, from.ip(), &packet, Transport::Udp)
            .await
        {
            if let Err(e) = socket.send_to(&answer, from).await {
                tracing::debug!(%from, error = %e, ?scope, "DNS answer not sent");
            }
        }
    });
}

fn recv_with_interface(
    socket: &UdpSocket,
    buf: &mut [u8],
) -> std::io::Result<(usize, SocketAddr, Option<u32>)> {
    use nix::sys::socket::{recvmsg, ControlMessageOwned, MsgFlags, SockaddrIn};
    let mut cmsg = nix::cmsg_space!(libc::in_pktinfo);
    let mut iov = [IoSliceMut::new(buf)];
    let msg = recvmsg::<SockaddrIn>(
        socket.as_raw_fd(),
        &mut iov,
        Some(&mut cmsg),
        MsgFlags::MSG_DONTWAIT,
    )
    .map_err(std::io::Error::from)?;
    let ifindex = msg.cmsgs().ok().and_then(|mut c| {
        c.find_map(|m| match m {
            ControlMessageOwned::Ipv4PacketInfo(info) => Some(info.ipi_ifindex as u32),
            _ => None,
        })
    });
    let from = msg
        .address
        .map(|a| SocketAddr::from((a.ip(), a.port())))
        .ok_or_else(|| std::io::Error::other("a datagram without a source address"))?;
    Ok((msg.bytes, from, ifindex))
}

/// Answer TCP queries for as long as the future runs (dropping it stops
/// every connection too). `acl` decides which peers are served (the host's
/// listener); an overlay's listener allows all.
pub async fn serve_tcp(
    resolver: Arc<Resolver>,
    scope: Scope,
    listener: TcpListener,
    acl: Option<Arc<dyn Acl>>,
) {
    let slots = Arc::new(Semaphore::new(MAX_TCP));
    let mut connections = JoinSet::new();
    loop {
        while connections.try_join_next().is_some() {}
        let Ok(slot) = slots.clone().acquire_owned().await else {
            return;
        };
        let (stream, peer) = match listener.accept().await {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!(error = %e, ?scope, "DNS TCP accept failed; going on");
                tokio::time::sleep(ACCEPT_PAUSE).await;
                continue;
            }
        };
        if let Some(acl) = &acl {
            if !peer_on_allowed_interface(peer.ip(), acl.as_ref()) {
                tracing::debug!(%peer, "DNS TCP client from outside Docker's bridges dropped");
                continue;
            }
        }
        let (resolver, scope) = (resolver.clone(), scope.clone());
        connections.spawn(async move {
            serve_connection(resolver, scope, stream, peer).await;
            drop(slot);
        });
    }
}

async fn serve_connection(
    resolver: Arc<Resolver>,
    scope: Scope,
    mut stream: TcpStream,
    peer: SocketAddr,
) {
    loop {
        let query = match timeout(TCP_IDLE, forward::read_framed(&mut stream)).await {
            Ok(Ok(q)) => q,
            _ => return,
        };
        let exchange = async {
            let answer = resolver
                .answer(&scope, peer.ip(), &query, Transport::Tcp)
                .await?;
            forward::write_framed(&mut stream, &answer).await.ok()
        };
        if !matches!(timeout(TCP_EXCHANGE, exchange).await, Ok(Some(()))) {
            return;
        }
    }
}

/// True when the peer's address is on the same subnet as an address of an
/// allowed interface (or is loopback).
fn peer_on_allowed_interface(peer: IpAddr, acl: &dyn Acl) -> bool {
    if peer.is_loopback() {
        return true;
    }
    let Ok(addrs) = nix::ifaddrs::getifaddrs() else {
        return false;
    };
    addrs
        .filter(|a| acl.allows_interface(&a.interface_name))
        .any(|a| {
            let (Some(addr), Some(mask)) = (
                a.address.as_ref().and_then(|s| s.as_sockaddr_in()),
                a.netmask.as_ref().and_then(|s| s.as_sockaddr_in()),
            ) else {
                return false;
            };
            let IpAddr::V4(peer) = peer else {
                return false;
            };
            let mask = u32::from(mask.ip());
            u32::from(addr.ip()) & mask == u32::from(peer) & mask
        })
}

#[cfg(test)]
mod tests {
    use super::super::message::tests::{decode, query_bytes};
    use super::super::table::NameEntry;
    use super::super::upstreams::{Files, Upstreams};
    use super::*;
    use hickory_proto::rr::RecordType;

    fn resolver() -> Arc<Resolver> {
        let mut table = NameTable::new("b");
        table.put(
            "ov1",
            NameEntry {
                host: "a".into(),
                endpoint: "e1".into(),
                container: "c1".into(),
                names: vec!["web".into()],
                addrs: vec!["10.77.0.2".parse().unwrap()],
            },
        );
        let up = Upstreams::new(vec![], Files::none(), "169.254.53.53".parse().unwrap());
        Arc::new(Resolver {
            table: Arc::new(RwLock::new(table)),
            forwarder: Forwarder::new(Arc::new(up)),
            ttl: 2,
        })
    }

    #[tokio::test]
    async fn an_overlay_listener_answers_its_names_over_udp_and_tcp() {
        let udp = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let tcp = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let (ua, ta) = (udp.local_addr().unwrap(), tcp.local_addr().unwrap());
        let scope = Scope::Overlay("ov1".into());
        tokio::spawn(serve_udp(resolver(), scope.clone(), udp));
        tokio::spawn(serve_tcp(resolver(), scope, tcp, None));

        let client = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        client
            .send_to(&query_bytes("WEB", RecordType::A, 3), ua)
            .await
            .unwrap();
        let mut buf = [0u8; 512];
        let (n, _) = client.recv_from(&mut buf).await.unwrap();
        let m = decode(&buf[..n]);
        assert_eq!((m.id(), m.answers().len()), (3, 1));
        assert_eq!(m.answers()[0].ttl(), 2);

        let mut s = TcpStream::connect(ta).await.unwrap();
        forward::write_framed(&mut s, &query_bytes("web", RecordType::A, 4))
            .await
            .unwrap();
        let m = decode(&forward::read_framed(&mut s).await.unwrap());
        assert_eq!((m.id(), m.answers().len()), (4, 1));

        // Not ours and no upstream: SERVFAIL at once, not a silence.
        client
            .send_to(&query_bytes("example.org", RecordType::A, 5), ua)
            .await
            .unwrap();
        let (n, _) = client.recv_from(&mut buf).await.unwrap();
        assert_eq!(decode(&buf[..n]).response_code(), ResponseCode::ServFail);
    }

    #[test]
    fn the_host_listener_serves_loopback_and_dockers_bridges_only() {
        let acl = DockerBridges {
            extra: vec!["cni0".into()],
        };
        for ok in [
            "lo",
            "docker0",
            "docker_gwbridge",
            "br-0123456789ab",
            "cni0",
        ] {
            assert!(acl.allows_interface(ok), "{ok}");
        }
        for no in ["eth0", "ens3", "ro-dns0", "wlan0", "bond0"] {
            assert!(!acl.allows_interface(no), "{no}");
        }
        assert!(peer_on_allowed_interface(
            "127.0.0.1".parse().unwrap(),
            &acl
        ));
        assert!(!peer_on_allowed_interface(
            "192.0.2.77".parse().unwrap(),
            &acl
        ));
    }
}
