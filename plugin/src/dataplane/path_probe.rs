//! The VXLAN path probe: proof that a frame sent from this host over UDP
//! 4789 reaches a peer's kernel and comes out of a VXLAN device there,
//! which ICMP echo cannot prove (firewalls and security groups often pass
//! ping and drop UDP 4789).
//!
//! Every plugin keeps a responder: a VXLAN device of [`PROBE_VNI`] (below
//! the VNIs overlays get, so never an overlay's) in a namespace of its own,
//! holding [`RESPONDER`], with a UDP socket on it. `rustoverlay doctor`
//! sends a VXLAN-encapsulated UDP datagram from its VTEP to the peer's port
//! 4789, addressed to the peer's device (its MAC is derived from the peer's
//! VTEP); the peer's kernel decapsulates it into the device, and the peer's
//! plugin answers over plain UDP to the address the request names. The
//! answer carries the peer's host ID and wall clock (duplicate IDs, clock
//! skew). Frames travel one way through the tunnel: the peer needs no FDB
//! entry for the prober, and no overlay is touched.

use super::dns::ensure_address;
use super::error::{DataplaneError, Result};
use super::links::{add_link, delete_by_name, link_address, require_index, set_link};
use super::netns::{connect_in, NetnsDir};
use super::VXLAN_PORT;
use rtnetlink::{Handle, LinkUnspec, LinkVxlan};
use serde::{Deserialize, Serialize};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::os::fd::AsRawFd;
use std::path::Path;
use std::time::{Duration, Instant};

/// The probe's VNI: overlays get 256 and up (`control::overlay::VNI_MIN`).
pub const PROBE_VNI: u32 = 255;
/// The responder's address on its device, and the prober's inner source.
pub const RESPONDER: Ipv4Addr = Ipv4Addr::new(169, 254, 47, 89);
const PROBER: Ipv4Addr = Ipv4Addr::new(169, 254, 47, 90);
/// The inner UDP port of requests.
pub const PROBE_PORT: u16 = 4790;
const NETNS: &str = "ro-probe";
const LINK: &str = "ro-vx-probe";

/// A request, inside the tunnel.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ProbeRequest {
    pub probe: u64,
    /// The prober's host ID; the answer goes only to that host's VTEP.
    pub from: String,
    /// Where to answer (the prober's VTEP and port), over plain UDP.
    pub reply: SocketAddrV4,
}

/// An answer, over plain UDP.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ProbeAnswer {
    pub probe: u64,
    pub host: String,
    /// The answering host's wall clock, Unix milliseconds.
    pub time_ms: u64,
}

/// The device's MAC: locally administered, derived from the VTEP, so a
/// prober knows it without asking.
pub fn responder_mac(vtep: Ipv4Addr) -> [u8; 6] {
    let o = vtep.octets();
    [0x02, 0x54, o[0], o[1], o[2], o[3]]
}

fn netns(state_dir: &Path) -> NetnsDir {
    NetnsDir::new(&state_dir.join("probe"))
}

/// Make the responder's device and namespace (idempotent) and bind its
/// socket there.
pub(super) async fn set_up(
    host: &Handle,
    state_dir: &Path,
    underlay_ifindex: u32,
    vtep: Ipv4Addr,
    mtu: u32,
) -> Result<std::net::UdpSocket> {
    let dir = netns(state_dir);
    let ns_path = dir.create(NETNS)?;
    let ns = connect_in(&ns_path)?;
    // A device left by an unclean exit is reused only if it is this VTEP's
    // (its MAC is derived from the VTEP): after an address change, peers
    // send to the new MAC.
    let mac = responder_mac(vtep);
    let existing = match link_address(&ns, LINK).await? {
        Some((i, found)) if found.as_deref() == Some(&mac[..]) => Some(i),
        Some(_) => {
            delete_by_name(&ns, LINK).await?;
            None
        }
        None => None,
    };
    let index = match existing {
        Some(i) => i,
        None => {
            // A leftover from a crash between create and move.
            delete_by_name(host, LINK).await?;
            let msg = LinkVxlan::new(LINK, PROBE_VNI)
                .dev(underlay_ifindex)
                .local(vtep)
                .port(VXLAN_PORT)
                .learning(false)
                .mtu(mtu)
                .address(mac.to_vec())
                .build();
            add_link(host, msg, LINK).await?;
            let idx = require_index(host, LINK).await?;
            let ns_file = std::fs::File::open(&ns_path).map_err(|e| {
                DataplaneError::io(format!("open namespace {}", ns_path.display()), e)
            })?;
            let moved = set_link(
                host,
                LinkUnspec::new_with_index(idx)
                    .setns_by_fd(ns_file.as_raw_fd())
                    .build(),
                LINK,
            )
            .await;
            if let Err(e) = moved {
                let _ = delete_by_name(host, LINK).await;
                return Err(e);
            }
            require_index(&ns, LINK).await?
        }
    };
    ensure_address(&ns, index, RESPONDER).await?;
    set_link(&ns, LinkUnspec::new_with_index(index).up().build(), LINK).await?;
    bind_in(&ns_path)
}

/// Remove the responder (at shutdown); "already gone" is success.
pub(super) async fn tear_down(state_dir: &Path) -> Result<()> {
    let dir = netns(state_dir);
    if dir.exists(NETNS) {
        let ns = connect_in(&dir.path(NETNS))?;
        delete_by_name(&ns, LINK).await?;
    }
    dir.delete(NETNS)
}

fn bind_in(ns_path: &Path) -> Result<std::net::UdpSocket> {
    let ns = std::fs::File::open(ns_path)
        .map_err(|e| DataplaneError::io(format!("open namespace {}", ns_path.display()), e))?;
    std::thread::spawn(move || {
        nix::sched::setns(&ns, nix::sched::CloneFlags::CLONE_NEWNET)
            .map_err(std::io::Error::from)?;
        let socket = std::net::UdpSocket::bind(SocketAddrV4::new(RESPONDER, PROBE_PORT))?;
        socket.set_nonblocking(true)?;
        Ok(socket)
    })
    .join()
    .map_err(|_| DataplaneError::Setup("socket thread panicked".into()))?
    .map_err(|e: std::io::Error| {
        DataplaneError::io(
            format!("bind {RESPONDER}:{PROBE_PORT} in {}", ns_path.display()),
            e,
        )
    })
}

/// A request as it goes on the wire to the peer's port 4789: the VXLAN
/// header, then an Ethernet frame to the peer's responder.
pub fn encapsulate(from_vtep: Ipv4Addr, to_vtep: Ipv4Addr, request: &ProbeRequest) -> Vec<u8> {
    let payload = serde_json::to_vec(request).expect("a probe request serialises");
    let builder =
        etherparse::PacketBuilder::ethernet2(responder_mac(from_vtep), responder_mac(to_vtep))
            .ipv4(PROBER.octets(), RESPONDER.octets(), 64)
            .udp(PROBE_PORT, PROBE_PORT);
    // The VXLAN header: the I flag, then the VNI in bytes 4..7.
    let vni = PROBE_VNI.to_be_bytes();
    let mut packet = vec![0x08, 0, 0, 0, vni[1], vni[2], vni[3], 0];
    packet.reserve(builder.size(payload.len()));
    builder
        .write(&mut packet, &payload)
        .expect("writing to a Vec cannot fail");
    packet
}

/// Send an answer to `to` as if from this host's `vtep`:4789, the reverse
/// of the request's own flow, so a stateful firewall (a security group, a
/// conntrack rule that allows UDP 4789 and established traffic) lets it
/// back to the prober. A raw socket does that (CAP_NET_RAW); without one,
/// a plain UDP datagram from any port.
pub fn answer(vtep: Ipv4Addr, to: SocketAddrV4, payload: &[u8]) -> std::io::Result<()> {
    use socket2::{Domain, Protocol, SockAddr, Socket, Type};
    let raw = Socket::new(
        Domain::IPV4,
        Type::RAW,
        Some(Protocol::from(libc::IPPROTO_RAW)),
    );
    match raw {
        Ok(socket) => {
            let builder = etherparse::PacketBuilder::ipv4(vtep.octets(), to.ip().octets(), 64)
                .udp(VXLAN_PORT, to.port());
            let mut packet = Vec::with_capacity(builder.size(payload.len()));
            builder
                .write(&mut packet, payload)
                .expect("writing to a Vec cannot fail");
            socket.set_nonblocking(true)?;
            socket.send_to(&packet, &SockAddr::from(to)).map(|_| ())
        }
        Err(_) => {
            let socket = std::net::UdpSocket::bind("0.0.0.0:0")?;
            socket.send_to(payload, to).map(|_| ())
        }
    }
}

/// What probing a peer found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PathProbe {
    Answered {
        answer: ProbeAnswer,
        rtt: Duration,
        /// The peer's clock minus ours at the moment it answered (half the
        /// round trip after we sent), in milliseconds.
        skew_ms: i64,
    },
    /// No answer within the window.
    Silent,
    /// This host could not send (no such local address, ...).
    Failed(String),
}

/// Probe `peer` from this host's VTEP: up to three requests within `window`.
pub async fn probe_path(me: &str, vtep: Ipv4Addr, peer: Ipv4Addr, window: Duration) -> PathProbe {
    let socket = match tokio::net::UdpSocket::bind(SocketAddrV4::new(vtep, 0)).await {
        Ok(s) => s,
        Err(e) => return PathProbe::Failed(format!("bind a UDP socket on {vtep}: {e}")),
    };
    let reply = match socket.local_addr() {
        Ok(SocketAddr::V4(a)) => a,
        other => return PathProbe::Failed(format!("the probe socket's address: {other:?}")),
    };
    let base: u64 = rand::random();
    let tries = 3u32;
    let mut buf = [0u8; 2048];
    for n in 0..tries {
        // Each try its own ID: a late answer to an earlier try must not be
        // timed from this one's send.
        let request = ProbeRequest {
            probe: base.wrapping_add(u64::from(n)),
            from: me.to_string(),
            reply,
        };
        let packet = encapsulate(vtep, peer, &request);
        let sent = Instant::now();
        let sent_ms = crate::util::clock::unix_now_ms();
        if let Err(e) = socket
            .send_to(&packet, SocketAddrV4::new(peer, VXLAN_PORT))
            .await
        {
            return PathProbe::Failed(format!("send to {peer}:{VXLAN_PORT}: {e}"));
        }
        let deadline = sent + window / tries;
        while let Ok(Ok((n, _))) =
            tokio::time::timeout_at(deadline.into(), socket.recv_from(&mut buf)).await
        {
            let Ok(answer) = serde_json::from_slice::<ProbeAnswer>(&buf[..n]) else {
                continue;
            };
            if answer.probe != request.probe {
                continue;
            }
            let rtt = sent.elapsed();
            let midpoint = sent_ms as i64 + (rtt.as_millis() as i64) / 2;
            return PathProbe::Answered {
                skew_ms: answer.time_ms as i64 - midpoint,
                answer,
                rtt,
            };
        }
    }
    PathProbe::Silent
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_request_is_a_vxlan_frame_to_the_peer_s_responder() {
        let req = ProbeRequest {
            probe: 7,
            from: "h1".into(),
            reply: "10.0.0.1:40000".parse().unwrap(),
        };
        let packet = encapsulate(
            "10.0.0.1".parse().unwrap(),
            "10.0.0.2".parse().unwrap(),
            &req,
        );
        assert_eq!(
            &packet[..8],
            &[0x08, 0, 0, 0, 0, 0, 255, 0],
            "VXLAN header, VNI 255"
        );
        let frame = etherparse::SlicedPacket::from_ethernet(&packet[8..]).unwrap();
        let Some(etherparse::LinkSlice::Ethernet2(eth)) = frame.link else {
            panic!("not Ethernet")
        };
        assert_eq!(eth.destination(), [0x02, 0x54, 10, 0, 0, 2]);
        let Some(etherparse::NetSlice::Ipv4(ip)) = frame.net else {
            panic!("not IPv4")
        };
        assert_eq!(ip.header().destination(), RESPONDER.octets());
        let Some(etherparse::TransportSlice::Udp(udp)) = frame.transport else {
            panic!("not UDP")
        };
        assert_eq!(udp.destination_port(), PROBE_PORT);
        let back: ProbeRequest = serde_json::from_slice(udp.payload()).unwrap();
        assert_eq!(back, req);
    }
}
