//! Finding the underlay: the interface other hosts reach this one through,
//! its IPv4 address (the VTEP) and its MTU (which sets the overlay's).

use super::error::{DataplaneError, Result};
use futures::TryStreamExt;
use rtnetlink::packet_route::address::AddressAttribute;
use rtnetlink::packet_route::link::LinkAttribute;
use rtnetlink::packet_route::route::{RouteAttribute, RouteHeader};
use rtnetlink::Handle;
use std::net::{IpAddr, Ipv4Addr};

/// The host's link to the other hosts.
#[derive(Debug, Clone)]
pub struct Underlay {
    pub ifindex: u32,
    pub ifname: String,
    pub mtu: u32,
    pub vtep: Ipv4Addr,
}

/// The interface holding `vtep`, or the one holding the default route when
/// no VTEP is given.
pub(super) async fn detect_underlay(handle: &Handle, vtep: Option<Ipv4Addr>) -> Result<Underlay> {
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
