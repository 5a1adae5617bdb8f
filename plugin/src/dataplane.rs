//! The kernel side of an overlay, all through rtnetlink.
//!
//! Per overlay with a local endpoint, a namespace `ro-<vni>` holds a bridge
//! `ro-br-<vni>` and a VXLAN device `ro-vx-<vni>` (learning off, proxy ARP on,
//! UDP 4789). The VXLAN device is created in the host namespace, so its UDP
//! socket stays on the underlay, and then moved. Each endpoint is a veth pair:
//! `ro-<id>` on the bridge inside the overlay namespace, `rc-<id>` in the host
//! namespace for Docker to move into the container.
//!
//! Every write is idempotent (look up, create if missing) and every removal
//! treats "already gone" as done, so Docker's retries and replays are safe.

use crate::netns::{connect_in, NetnsDir};
use futures::TryStreamExt;
use rtnetlink::packet_route::address::AddressAttribute;
use rtnetlink::packet_route::link::{InfoData, InfoVeth, LinkAttribute, LinkMessage};
use rtnetlink::packet_route::neighbour::{
    NeighbourAddress, NeighbourAttribute, NeighbourFlags, NeighbourMessage, NeighbourState,
};
use rtnetlink::packet_route::route::{RouteAttribute, RouteHeader};
use rtnetlink::packet_route::AddressFamily;
use rtnetlink::{Handle, LinkBridge, LinkMessageBuilder, LinkUnspec, LinkVeth, LinkVxlan};
use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr};
use std::os::fd::AsRawFd;
use std::path::Path;
use std::sync::Mutex;

pub const VXLAN_PORT: u16 = 4789;
/// Outer Ethernet, IPv4, UDP and VXLAN headers.
pub const VXLAN_OVERHEAD: u32 = 50;

#[derive(Debug, thiserror::Error)]
pub enum DataplaneError {
    #[error("{context}: {source}")]
    Netlink {
        context: String,
        #[source]
        source: rtnetlink::Error,
    },
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{0}")]
    Setup(String),
}

impl DataplaneError {
    pub fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        DataplaneError::Io {
            context: context.into(),
            source,
        }
    }

    fn netlink(context: impl Into<String>, source: rtnetlink::Error) -> Self {
        DataplaneError::Netlink {
            context: context.into(),
            source,
        }
    }
}

type Result<T, E = DataplaneError> = std::result::Result<T, E>;

/// The errno of a netlink error, positive (libc::ENODEV, ...).
fn errno(e: &rtnetlink::Error) -> Option<i32> {
    match e {
        rtnetlink::Error::NetlinkError(m) => m.code.map(|c| -c.get()),
        _ => None,
    }
}

fn is_gone(e: &rtnetlink::Error) -> bool {
    matches!(errno(e), Some(libc::ENODEV) | Some(libc::ENOENT))
}

/// The host's link to the other hosts.
#[derive(Debug, Clone)]
pub struct Underlay {
    pub ifindex: u32,
    pub ifname: String,
    pub mtu: u32,
    pub vtep: Ipv4Addr,
}

pub fn netns_name(vni: u32) -> String {
    format!("ro-{vni}")
}

pub fn bridge_name(vni: u32) -> String {
    format!("ro-br-{vni}")
}

pub fn vxlan_name(vni: u32) -> String {
    format!("ro-vx-{vni}")
}

pub fn short_id(endpoint_id: &str) -> &str {
    &endpoint_id[..endpoint_id.len().min(12)]
}

/// Bridge-side name of an endpoint's veth (inside the overlay namespace).
pub fn bridge_port_name(endpoint_id: &str) -> String {
    format!("ro-{}", short_id(endpoint_id))
}

/// Container-side name (in the host namespace until Docker moves it).
pub fn container_link_name(endpoint_id: &str) -> String {
    format!("rc-{}", short_id(endpoint_id))
}

pub struct Dataplane {
    host: Handle,
    underlay: Underlay,
    netns: NetnsDir,
    /// Netlink connections inside overlay namespaces, by VNI.
    handles: Mutex<HashMap<u32, Handle>>,
}

impl Dataplane {
    /// Connect to the kernel and find the underlay: the interface holding
    /// `vtep`, or the one holding the default route when no VTEP is given.
    pub async fn new(vtep: Option<Ipv4Addr>, state_dir: &Path) -> Result<Self> {
        let (conn, host, _) = rtnetlink::new_connection()
            .map_err(|e| DataplaneError::io("open a netlink socket", e))?;
        tokio::spawn(conn);
        let underlay = detect_underlay(&host, vtep).await?;
        tracing::info!(
            interface = %underlay.ifname,
            vtep = %underlay.vtep,
            mtu = underlay.mtu,
            "underlay found"
        );
        Ok(Dataplane {
            host,
            underlay,
            netns: NetnsDir::new(state_dir),
            handles: Mutex::new(HashMap::new()),
        })
    }

    pub fn underlay(&self) -> &Underlay {
        &self.underlay
    }

    /// MTU of everything a container sees.
    pub fn overlay_mtu(&self) -> u32 {
        self.underlay.mtu.saturating_sub(VXLAN_OVERHEAD)
    }

    pub fn has_network(&self, vni: u32) -> bool {
        self.netns.exists(&netns_name(vni))
    }

    /// VNIs whose namespace exists on this host.
    pub fn local_vnis(&self) -> Vec<u32> {
        self.netns
            .list()
            .iter()
            .filter_map(|n| n.strip_prefix("ro-")?.parse().ok())
            .collect()
    }

    fn handle_in(&self, vni: u32) -> Result<Handle> {
        let mut handles = self.handles.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(h) = handles.get(&vni) {
            return Ok(h.clone());
        }
        let h = connect_in(&self.netns.path(&netns_name(vni)))?;
        handles.insert(vni, h.clone());
        Ok(h)
    }

    /// Make sure the overlay's namespace, bridge and VXLAN device exist and are
    /// up. A failure removes what this call created.
    #[tracing::instrument(skip(self))]
    pub async fn ensure_network(&self, vni: u32) -> Result<()> {
        let fresh = !self.has_network(vni);
        let result = self.build_network(vni).await;
        if result.is_err() && fresh {
            if let Err(e) = self.remove_network(vni).await {
                tracing::warn!(error = %e, "rollback of a half-built network failed");
            }
        }
        result
    }

    async fn build_network(&self, vni: u32) -> Result<()> {
        let ns_path = self.netns.create(&netns_name(vni))?;
        let ns = self.handle_in(vni)?;
        let mtu = self.overlay_mtu();
        let (br, vx) = (bridge_name(vni), vxlan_name(vni));

        let br_index = match link_index(&ns, &br).await? {
            Some(i) => i,
            None => {
                add_link(&ns, LinkBridge::new(&br).mtu(mtu).up().build(), &br).await?;
                require_index(&ns, &br).await?
            }
        };
        if link_index(&ns, "lo").await?.is_some() {
            set_link(&ns, LinkUnspec::new_with_name("lo").up().build(), "lo").await?;
        }

        let vx_index = match link_index(&ns, &vx).await? {
            Some(i) => i,
            None => {
                // A leftover from a crash between create and move.
                delete_by_name(&self.host, &vx).await?;
                let msg = LinkVxlan::new(&vx, vni)
                    .dev(self.underlay.ifindex)
                    .local(self.underlay.vtep)
                    .port(VXLAN_PORT)
                    .learning(false)
                    .proxy(true)
                    .mtu(mtu)
                    .build();
                add_link(&self.host, msg, &vx).await?;
                let idx = require_index(&self.host, &vx).await?;
                let ns_file = std::fs::File::open(&ns_path).map_err(|e| {
                    DataplaneError::io(format!("open namespace {}", ns_path.display()), e)
                })?;
                let moved = set_link(
                    &self.host,
                    LinkUnspec::new_with_index(idx)
                        .setns_by_fd(ns_file.as_raw_fd())
                        .build(),
                    &vx,
                )
                .await;
                if let Err(e) = moved {
                    let _ = delete_by_name(&self.host, &vx).await;
                    return Err(e);
                }
                require_index(&ns, &vx).await?
            }
        };
        set_link(
            &ns,
            LinkUnspec::new_with_index(vx_index)
                .controller(br_index)
                .mtu(mtu)
                .up()
                .build(),
            &vx,
        )
        .await?;
        Ok(())
    }

    /// Remove the overlay's devices and namespace from this host.
    #[tracing::instrument(skip(self))]
    pub async fn remove_network(&self, vni: u32) -> Result<()> {
        if self.has_network(vni) {
            // Delete the VXLAN device explicitly: a namespace dies
            // asynchronously, and a quick re-create of the same VNI must not
            // find the old device still registered.
            let ns = self.handle_in(vni)?;
            delete_by_name(&ns, &vxlan_name(vni)).await?;
            delete_by_name(&ns, &bridge_name(vni)).await?;
        }
        self.handles
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&vni);
        self.netns.delete(&netns_name(vni))
    }

    /// Create the endpoint's veth pair: the bridge side directly inside the
    /// overlay namespace (no move under load), the container side here with
    /// the endpoint's MAC. Returns the container side's name.
    #[tracing::instrument(skip(self, mac))]
    pub async fn create_endpoint_link(
        &self,
        vni: u32,
        endpoint_id: &str,
        mac: [u8; 6],
    ) -> Result<String> {
        let ns = self.handle_in(vni)?;
        let (port, cont) = (
            bridge_port_name(endpoint_id),
            container_link_name(endpoint_id),
        );
        let mtu = self.overlay_mtu();
        let br_index = require_index(&ns, &bridge_name(vni)).await?;

        let port_exists = link_index(&ns, &port).await?.is_some();
        let cont_exists = link_index(&self.host, &cont).await?.is_some();
        if !(port_exists && cont_exists) {
            // Half a pair is a leftover: start clean.
            delete_by_name(&ns, &port).await?;
            delete_by_name(&self.host, &cont).await?;
            let ns_path = self.netns.path(&netns_name(vni));
            let ns_file = std::fs::File::open(&ns_path).map_err(|e| {
                DataplaneError::io(format!("open namespace {}", ns_path.display()), e)
            })?;
            let peer = LinkMessageBuilder::<LinkUnspec>::new()
                .name(port.clone())
                .mtu(mtu)
                .setns_by_fd(ns_file.as_raw_fd())
                .build();
            let msg = LinkVeth::new(&cont, &port)
                .set_info_data(InfoData::Veth(InfoVeth::Peer(peer)))
                .mtu(mtu)
                .address(mac.to_vec())
                .build();
            add_link(&self.host, msg, &cont).await?;
        }
        let attach = async {
            let port_index = require_index(&ns, &port).await?;
            set_link(
                &ns,
                LinkUnspec::new_with_index(port_index)
                    .controller(br_index)
                    .up()
                    .build(),
                &port,
            )
            .await
        };
        if let Err(e) = attach.await {
            let _ = delete_by_name(&self.host, &cont).await;
            return Err(e);
        }
        Ok(cont)
    }

    /// Short IDs of the endpoints that have a bridge port in the overlay's
    /// namespace (reconciliation removes those the store no longer has).
    pub async fn endpoint_ports(&self, vni: u32) -> Result<Vec<String>> {
        let ns = self.handle_in(vni)?;
        let mut links = ns.link().get().execute();
        let mut out = vec![];
        while let Some(link) = links
            .try_next()
            .await
            .map_err(|e| DataplaneError::netlink("list links", e))?
        {
            for attr in &link.attributes {
                if let LinkAttribute::IfName(name) = attr {
                    if let Some(id) = name.strip_prefix("ro-") {
                        if !id.starts_with("br-") && !id.starts_with("vx-") {
                            out.push(id.to_string());
                        }
                    }
                }
            }
        }
        Ok(out)
    }

    /// Remove the endpoint's veth pair wherever it still is.
    #[tracing::instrument(skip(self))]
    pub async fn remove_endpoint_link(&self, vni: u32, endpoint_id: &str) -> Result<()> {
        delete_by_name(&self.host, &container_link_name(endpoint_id)).await?;
        if self.has_network(vni) {
            let ns = self.handle_in(vni)?;
            delete_by_name(&ns, &bridge_port_name(endpoint_id)).await?;
        }
        Ok(())
    }
}

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

impl Dataplane {
    async fn vxlan_index(&self, vni: u32) -> Result<(Handle, u32)> {
        let ns = self.handle_in(vni)?;
        let idx = require_index(&ns, &vxlan_name(vni)).await?;
        Ok((ns, idx))
    }

    /// Install a remote endpoint's permanent FDB and neighbour entries.
    /// `replace` makes it idempotent and corrects a moved endpoint.
    pub async fn add_peer(&self, vni: u32, peer: &PeerEntry) -> Result<()> {
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
    pub async fn remove_peer(&self, vni: u32, mac: [u8; 6], ip: Option<IpAddr>) -> Result<()> {
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
            self.remove_neighbour(vni, ip).await?;
        }
        Ok(())
    }

    /// Remove one neighbour entry; "already gone" is success.
    pub async fn remove_neighbour(&self, vni: u32, ip: IpAddr) -> Result<()> {
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
    pub async fn peers(&self, vni: u32) -> Result<KernelPeers> {
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

fn ignore_gone(
    r: std::result::Result<(), rtnetlink::Error>,
    context: impl FnOnce() -> String,
) -> Result<()> {
    match r {
        Ok(()) => Ok(()),
        Err(e) if is_gone(&e) => Ok(()),
        Err(e) => Err(DataplaneError::netlink(context(), e)),
    }
}

async fn add_link(handle: &Handle, msg: LinkMessage, name: &str) -> Result<()> {
    match handle.link().add(msg).execute().await {
        Ok(()) => Ok(()),
        Err(e) if errno(&e) == Some(libc::EEXIST) => Ok(()),
        Err(e) => Err(DataplaneError::netlink(format!("create link {name}"), e)),
    }
}

async fn set_link(handle: &Handle, msg: LinkMessage, name: &str) -> Result<()> {
    handle
        .link()
        .set(msg)
        .execute()
        .await
        .map_err(|e| DataplaneError::netlink(format!("configure link {name}"), e))
}

pub(crate) async fn link_index(handle: &Handle, name: &str) -> Result<Option<u32>> {
    let mut links = handle.link().get().match_name(name.to_string()).execute();
    match links.try_next().await {
        Ok(Some(link)) => Ok(Some(link.header.index)),
        Ok(None) => Ok(None),
        Err(e) if is_gone(&e) => Ok(None),
        Err(e) => Err(DataplaneError::netlink(format!("look up link {name}"), e)),
    }
}

async fn require_index(handle: &Handle, name: &str) -> Result<u32> {
    link_index(handle, name)
        .await?
        .ok_or_else(|| DataplaneError::Setup(format!("link {name} vanished right after creation")))
}

async fn delete_by_name(handle: &Handle, name: &str) -> Result<()> {
    let Some(index) = link_index(handle, name).await? else {
        return Ok(());
    };
    match handle.link().del(index).execute().await {
        Ok(()) => Ok(()),
        Err(e) if is_gone(&e) => Ok(()),
        Err(e) => Err(DataplaneError::netlink(format!("delete link {name}"), e)),
    }
}

async fn detect_underlay(handle: &Handle, vtep: Option<Ipv4Addr>) -> Result<Underlay> {
    let ifindex = match vtep {
        Some(_) => None,
        None => Some(default_route_interface(handle).await?),
    };
    let mut addrs = handle.address().get().execute();
    let mut found: Option<(u32, Ipv4Addr)> = None;
    while let Some(msg) = addrs
        .try_next()
        .await
        .map_err(|e| DataplaneError::netlink("list addresses", e))?
    {
        let index = msg.header.index;
        let ip = msg.attributes.iter().find_map(|a| match a {
            AddressAttribute::Local(IpAddr::V4(ip)) | AddressAttribute::Address(IpAddr::V4(ip)) => {
                Some(*ip)
            }
            _ => None,
        });
        let Some(ip) = ip else { continue };
        let wanted = match (vtep, ifindex) {
            (Some(v), _) => v == ip,
            (None, Some(i)) => i == index,
            (None, None) => false,
        };
        if wanted {
            found = Some((index, ip));
            break;
        }
    }
    let (index, ip) = found.ok_or_else(|| {
        DataplaneError::Setup(match vtep {
            Some(v) => format!(
                "--vtep-ip {v} is not an address of this host; give the IPv4 address other hosts reach this one at"
            ),
            None => "the interface of the default route has no IPv4 address; give --vtep-ip".into(),
        })
    })?;
    let mut links = handle.link().get().match_index(index).execute();
    let link = links
        .try_next()
        .await
        .map_err(|e| DataplaneError::netlink(format!("look up link {index}"), e))?
        .ok_or_else(|| DataplaneError::Setup(format!("link {index} vanished")))?;
    let mut mtu = 1500;
    let mut name = index.to_string();
    for attr in &link.attributes {
        match attr {
            LinkAttribute::Mtu(m) => mtu = *m,
            LinkAttribute::IfName(n) => name = n.clone(),
            _ => {}
        }
    }
    Ok(Underlay {
        ifindex: index,
        ifname: name,
        mtu,
        vtep: ip,
    })
}

async fn default_route_interface(handle: &Handle) -> Result<u32> {
    let mut routes = handle
        .route()
        .get(rtnetlink::RouteMessageBuilder::<Ipv4Addr>::new().build())
        .execute();
    while let Some(route) = routes
        .try_next()
        .await
        .map_err(|e| DataplaneError::netlink("list routes", e))?
    {
        if route.header.destination_prefix_length != 0
            || route.header.table != RouteHeader::RT_TABLE_MAIN
        {
            continue;
        }
        if let Some(oif) = route.attributes.iter().find_map(|a| match a {
            RouteAttribute::Oif(i) => Some(*i),
            _ => None,
        }) {
            return Ok(oif);
        }
    }
    Err(DataplaneError::Setup(
        "this host has no IPv4 default route to find the underlay by; give --vtep-ip".into(),
    ))
}

/// Parse a MAC in the usual `aa:bb:cc:dd:ee:ff` form.
pub fn parse_mac(s: &str) -> Option<[u8; 6]> {
    let mut out = [0u8; 6];
    let mut parts = s.split(':');
    for b in out.iter_mut() {
        let p = parts.next()?;
        if p.len() != 2 {
            return None;
        }
        *b = u8::from_str_radix(p, 16).ok()?;
    }
    parts.next().is_none().then_some(out)
}

pub fn format_mac(mac: &[u8; 6]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mac_round_trip() {
        let m = parse_mac("02:42:0a:4d:00:02").unwrap();
        assert_eq!(format_mac(&m), "02:42:0a:4d:00:02");
        assert!(parse_mac("02:42:0a:4d:00").is_none());
        assert!(parse_mac("02:42:0a:4d:00:02:03").is_none());
        assert!(parse_mac("zz:42:0a:4d:00:02").is_none());
    }

    #[test]
    fn names_fit_ifnamsiz() {
        let id = "0123456789abcdef0123456789abcdef";
        assert!(bridge_port_name(id).len() <= 15);
        assert!(container_link_name(id).len() <= 15);
        assert!(bridge_name(16_777_215).len() <= 15);
        assert!(vxlan_name(16_777_215).len() <= 15);
    }
}
