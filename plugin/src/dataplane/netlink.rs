//! [`Netlink`]: the real data plane, through rtnetlink.
//!
//! The VXLAN device is created in the host namespace, so its UDP socket stays
//! on the underlay, and then moved into the overlay's namespace. Each
//! endpoint is a veth pair: `ro-<id>` on the bridge inside the overlay
//! namespace, `rc-<id>` in the host namespace for Docker to move into the
//! container.

use super::dns::{self, DnsSockets};
use super::error::{DataplaneError, Result};
use super::links::{add_link, delete_by_name, link_address, link_index, require_index, set_link};
use super::names::{
    bridge_name, bridge_port_name, container_link_name, netns_name, port_endpoint, vni_of_netns,
    vxlan_name,
};
use super::netns::{connect_in, NetnsDir};
use super::path_probe;
use super::probe::{probe, Probe};
use super::underlay::{detect_underlay, Underlay};
use super::{Dataplane, KernelPeers, PeerEntry, VXLAN_OVERHEAD, VXLAN_PORT};
use async_trait::async_trait;
use futures::TryStreamExt;
use rtnetlink::packet_route::link::{InfoData, InfoVeth, LinkAttribute};
use rtnetlink::{Handle, LinkBridge, LinkMessageBuilder, LinkUnspec, LinkVeth, LinkVxlan};
use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr};
use std::os::fd::AsRawFd;
use std::path::Path;
use std::sync::Mutex;
use std::time::Duration;

pub struct Netlink {
    host: Handle,
    underlay: Underlay,
    netns: NetnsDir,
    state_dir: std::path::PathBuf,
    /// Netlink connections inside overlay namespaces, by VNI.
    handles: Mutex<HashMap<u32, Handle>>,
}

impl Netlink {
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
        Ok(Netlink {
            host,
            underlay,
            netns: NetnsDir::new(state_dir),
            state_dir: state_dir.to_path_buf(),
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

    pub(super) fn handle_in(&self, vni: u32) -> Result<Handle> {
        let mut handles = self.handles.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(h) = handles.get(&vni) {
            return Ok(h.clone());
        }
        let h = connect_in(&self.netns.path(&netns_name(vni)))?;
        handles.insert(vni, h.clone());
        Ok(h)
    }

    async fn build_network(&self, vni: u32) -> Result<()> {
        let ns_path = self.netns.create(&netns_name(vni))?;
        let ns = self.handle_in(vni)?;
        let mtu = self.overlay_mtu();
        let (br, vx) = (bridge_name(vni), vxlan_name(vni));

        // A bridge left to itself takes the lowest MAC of its ports, so a
        // new container's port could change it. Containers keep the old MAC
        // for the resolver's address in their neighbour cache and lose DNS
        // until it expires (~30 s): the bridge gets a fixed MAC instead.
        let br_mac = bridge_mac(self.underlay.vtep);
        let br_index = match link_address(&ns, &br).await? {
            // Set only when it differs (a bridge of an older version): every
            // change of address flushes the bridge's neighbour entries.
            Some((i, mac)) => {
                if mac.as_deref() != Some(&br_mac[..]) {
                    set_link(
                        &ns,
                        LinkUnspec::new_with_index(i)
                            .address(br_mac.to_vec())
                            .build(),
                        &br,
                    )
                    .await?;
                }
                i
            }
            None => {
                add_link(
                    &ns,
                    LinkBridge::new(&br)
                        .mtu(mtu)
                        .address(br_mac.to_vec())
                        .up()
                        .build(),
                    &br,
                )
                .await?;
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
}

#[async_trait]
impl Dataplane for Netlink {
    fn vtep(&self) -> IpAddr {
        IpAddr::V4(self.underlay.vtep)
    }

    fn has_network(&self, vni: u32) -> bool {
        self.netns.exists(&netns_name(vni))
    }

    /// VNIs whose namespace exists on this host.
    fn local_vnis(&self) -> Vec<u32> {
        self.netns
            .list()
            .iter()
            .filter_map(|n| vni_of_netns(n))
            .collect()
    }

    /// Make sure the overlay's namespace, bridge and VXLAN device exist and are
    /// up. A failure removes what this call created.
    #[tracing::instrument(skip(self))]
    async fn ensure_network(&self, vni: u32) -> Result<()> {
        let fresh = !self.has_network(vni);
        let result = self.build_network(vni).await;
        if result.is_err() && fresh {
            if let Err(e) = self.remove_network(vni).await {
                tracing::warn!(error = %e, "rollback of a half-built network failed");
            }
        }
        result
    }

    /// Remove the overlay's devices and namespace from this host.
    #[tracing::instrument(skip(self))]
    async fn remove_network(&self, vni: u32) -> Result<()> {
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
    async fn create_endpoint_link(
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
    async fn endpoint_ports(&self, vni: u32) -> Result<Vec<String>> {
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
                    if let Some(id) = port_endpoint(name) {
                        out.push(id.to_string());
                    }
                }
            }
        }
        Ok(out)
    }

    /// Remove the endpoint's veth pair wherever it still is.
    #[tracing::instrument(skip(self))]
    async fn remove_endpoint_link(&self, vni: u32, endpoint_id: &str) -> Result<()> {
        delete_by_name(&self.host, &container_link_name(endpoint_id)).await?;
        if self.has_network(vni) {
            let ns = self.handle_in(vni)?;
            delete_by_name(&ns, &bridge_port_name(endpoint_id)).await?;
        }
        Ok(())
    }

    async fn add_peer(&self, vni: u32, peer: &PeerEntry) -> Result<()> {
        self.install_peer(vni, peer).await
    }

    async fn remove_peer(&self, vni: u32, mac: [u8; 6], ip: Option<IpAddr>) -> Result<()> {
        self.uninstall_peer(vni, mac, ip).await
    }

    async fn remove_neighbour(&self, vni: u32, ip: IpAddr) -> Result<()> {
        self.delete_neighbour(vni, ip).await
    }

    async fn peers(&self, vni: u32) -> Result<KernelPeers> {
        self.read_peers(vni).await
    }

    async fn probe_host(&self, underlay: IpAddr, window: Duration) -> Probe {
        probe(underlay, window).await
    }

    #[tracing::instrument(skip(self))]
    async fn dns_listener(&self, vni: u32, addr: Ipv4Addr) -> Result<DnsSockets> {
        let ns = self.handle_in(vni)?;
        let bridge = require_index(&ns, &bridge_name(vni)).await?;
        dns::ensure_address(&ns, bridge, addr).await?;
        dns::ensure_reply_route(&ns, bridge, addr).await?;
        dns::bind_in(&self.netns.path(&netns_name(vni)), addr)
    }

    async fn host_dns_listener(&self, addr: Ipv4Addr) -> Result<DnsSockets> {
        dns::ensure_host_address(&self.host, addr).await?;
        dns::bind(addr).map_err(|e| DataplaneError::io(format!("bind {addr}:53 on the host"), e))
    }

    async fn sandbox_has_route(&self, sandbox: &Path, dst: Ipv4Addr) -> Result<bool> {
        dns::sandbox_has_route(sandbox, dst).await
    }

    async fn path_probe_listener(&self) -> Result<std::net::UdpSocket> {
        path_probe::set_up(
            &self.host,
            &self.state_dir,
            self.underlay.ifindex,
            self.underlay.vtep,
            self.overlay_mtu(),
        )
        .await
    }

    async fn remove_path_probe(&self) -> Result<()> {
        path_probe::tear_down(&self.state_dir).await
    }
}

/// The fixed MAC of this host's overlay bridges: locally administered,
/// unique per host (its VTEP), and apart from container MACs (`02:52:…`).
fn bridge_mac(vtep: std::net::Ipv4Addr) -> [u8; 6] {
    let o = vtep.octets();
    [0x02, 0x53, o[0], o[1], o[2], o[3]]
}
