//! Peer entries on an overlay's VXLAN device: permanent FDB entries (MAC ->
//! remote VTEP) and neighbour entries (IP -> MAC), and reading them back for
//! reconciliation.

use super::error::{DataplaneError, Result};
use super::links::{ignore_gone, require_index};
use super::names::vxlan_name;
use super::netlink::Netlink;
use super::{KernelPeers, PeerEntry};
use crate::util::mac::format_mac;
use futures::TryStreamExt;
use rtnetlink::packet_route::neighbour::{
    NeighbourAddress, NeighbourAttribute, NeighbourFlags, NeighbourMessage, NeighbourState,
};
use rtnetlink::packet_route::AddressFamily;
use rtnetlink::Handle;
use std::net::IpAddr;

impl Netlink {
    async fn vxlan_index(&self, vni: u32) -> Result<(Handle, u32)> {
        let ns = self.handle_in(vni)?;
        let idx = require_index(&ns, &vxlan_name(vni)).await?;
        Ok((ns, idx))
    }

    /// Install a remote endpoint's permanent FDB and neighbour entries.
    /// `replace` makes it idempotent and corrects a moved endpoint.
    pub(super) async fn install_peer(&self, vni: u32, peer: &PeerEntry) -> Result<()> {
        let (ns, vx) = self.vxlan_index(vni).await?;
        ns.neighbours()
            .add_bridge(vx, &peer.mac)
            .destination(peer.vtep)
            .flags(NeighbourFlags::Own)
            .state(NeighbourState::Permanent)
            .replace()
            .execute()
            .await
            .map_err(|e| {
                DataplaneError::netlink(
                    format!("add FDB entry {} -> {}", format_mac(&peer.mac), peer.vtep),
                    e,
                )
            })?;
        if let Some(ip) = peer.ip {
            ns.neighbours()
                .add(vx, ip)
                .link_layer_address(&peer.mac)
                .state(NeighbourState::Permanent)
                .replace()
                .execute()
                .await
                .map_err(|e| {
                    DataplaneError::netlink(
                        format!("add neighbour {ip} -> {}", format_mac(&peer.mac)),
                        e,
                    )
                })?;
        }
        Ok(())
    }

    /// Remove a remote endpoint's entries; "already gone" is success.
    pub(super) async fn uninstall_peer(
        &self,
        vni: u32,
        mac: [u8; 6],
        ip: Option<IpAddr>,
    ) -> Result<()> {
        let (ns, vx) = self.vxlan_index(vni).await?;
        // The VXLAN device's own entry (self), then what the bridge learned on
        // the VXLAN port from the peer's traffic (master): a stale learned
        // entry would misdirect frames if the MAC shows up on another port.
        for flags in [NeighbourFlags::Own, NeighbourFlags::Controller] {
            let mut fdb = NeighbourMessage::default();
            fdb.header.family = AddressFamily::Bridge;
            fdb.header.ifindex = vx;
            fdb.header.flags = flags;
            fdb.attributes
                .push(NeighbourAttribute::LinkLayerAddress(mac.to_vec()));
            ignore_gone(ns.neighbours().del(fdb).execute().await, || {
                format!("delete FDB entry {}", format_mac(&mac))
            })?;
        }
        if let Some(ip) = ip {
            self.delete_neighbour(vni, ip).await?;
        }
        Ok(())
    }

    /// Remove one neighbour entry; "already gone" is success.
    pub(super) async fn delete_neighbour(&self, vni: u32, ip: IpAddr) -> Result<()> {
        let (ns, vx) = self.vxlan_index(vni).await?;
        let mut n = NeighbourMessage::default();
        n.header.family = match ip {
            IpAddr::V4(_) => AddressFamily::Inet,
            IpAddr::V6(_) => AddressFamily::Inet6,
        };
        n.header.ifindex = vx;
        n.attributes.push(NeighbourAttribute::Destination(match ip {
            IpAddr::V4(v4) => NeighbourAddress::Inet(v4),
            IpAddr::V6(v6) => NeighbourAddress::Inet6(v6),
        }));
        ignore_gone(ns.neighbours().del(n).execute().await, || {
            format!("delete neighbour {ip}")
        })
    }

    /// The permanent remote entries the kernel holds on the overlay's VXLAN
    /// device (what reconciliation compares with the store).
    pub(super) async fn read_peers(&self, vni: u32) -> Result<KernelPeers> {
        let (ns, vx) = self.vxlan_index(vni).await?;
        let mut out = KernelPeers::default();
        for family in [
            AddressFamily::Bridge,
            AddressFamily::Inet,
            AddressFamily::Inet6,
        ] {
            let mut dump = ns.neighbours().get().set_address_family(family).execute();
            while let Some(msg) = dump
                .try_next()
                .await
                .map_err(|e| DataplaneError::netlink("list neighbour entries", e))?
            {
                if msg.header.ifindex != vx || msg.header.state != NeighbourState::Permanent {
                    continue;
                }
                let mut mac = None;
                let mut dst = None;
                for a in &msg.attributes {
                    match a {
                        NeighbourAttribute::LinkLayerAddress(l) if l.len() == 6 => {
                            mac = <[u8; 6]>::try_from(l.as_slice()).ok()
                        }
                        NeighbourAttribute::Destination(addr) => dst = neighbour_ip(addr),
                        _ => {}
                    }
                }
                match (family, mac, dst) {
                    (AddressFamily::Bridge, Some(m), Some(d)) => {
                        out.fdb.insert(m, d);
                    }
                    (AddressFamily::Inet | AddressFamily::Inet6, Some(m), Some(d)) => {
                        out.neigh.insert(d, m);
                    }
                    _ => {}
                }
            }
        }
        Ok(out)
    }
}

/// The IP in a neighbour or FDB destination. FDB dumps (family AF_BRIDGE)
/// carry the VTEP as raw bytes, since the family does not say which IP version.
fn neighbour_ip(addr: &NeighbourAddress) -> Option<IpAddr> {
    match addr {
        NeighbourAddress::Inet(v4) => Some(IpAddr::V4(*v4)),
        NeighbourAddress::Inet6(v6) => Some(IpAddr::V6(*v6)),
        NeighbourAddress::Other(b) => match b.len() {
            4 => <[u8; 4]>::try_from(b.as_slice()).ok().map(IpAddr::from),
            16 => <[u8; 16]>::try_from(b.as_slice()).ok().map(IpAddr::from),
            _ => None,
        },
        _ => None,
    }
}
