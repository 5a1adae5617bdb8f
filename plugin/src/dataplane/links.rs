//! Link primitives over one netlink handle: every creation tolerates "exists"
//! and every removal "already gone", so callers are idempotent by default.

use super::error::{DataplaneError, Result};
use futures::TryStreamExt;
use rtnetlink::packet_route::link::LinkMessage;
use rtnetlink::Handle;

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

/// A removal's result, with "already gone" counted as success.
pub(super) fn ignore_gone(
    r: std::result::Result<(), rtnetlink::Error>,
    context: impl FnOnce() -> String,
) -> Result<()> {
    match r {
        Ok(()) => Ok(()),
        Err(e) if is_gone(&e) => Ok(()),
        Err(e) => Err(DataplaneError::netlink(context(), e)),
    }
}

pub(super) async fn add_link(handle: &Handle, msg: LinkMessage, name: &str) -> Result<()> {
    match handle.link().add(msg).execute().await {
        Ok(()) => Ok(()),
        Err(e) if errno(&e) == Some(libc::EEXIST) => Ok(()),
        Err(e) => Err(DataplaneError::netlink(format!("create link {name}"), e)),
    }
}

pub(super) async fn set_link(handle: &Handle, msg: LinkMessage, name: &str) -> Result<()> {
    handle
        .link()
        .set(msg)
        .execute()
        .await
        .map_err(|e| DataplaneError::netlink(format!("configure link {name}"), e))
}

pub(super) async fn link_index(handle: &Handle, name: &str) -> Result<Option<u32>> {
    Ok(find_link(handle, name).await?.map(|link| link.header.index))
}

/// The link's index and hardware address.
pub(super) async fn link_address(
    handle: &Handle,
    name: &str,
) -> Result<Option<(u32, Option<Vec<u8>>)>> {
    Ok(find_link(handle, name).await?.map(|link| {
        let address = link.attributes.iter().find_map(|a| match a {
            rtnetlink::packet_route::link::LinkAttribute::Address(mac) => Some(mac.clone()),
            _ => None,
        });
        (link.header.index, address)
    }))
}

async fn find_link(handle: &Handle, name: &str) -> Result<Option<LinkMessage>> {
    let mut links = handle.link().get().match_name(name.to_string()).execute();
    match links.try_next().await {
        Ok(link) => Ok(link),
        Err(e) if is_gone(&e) => Ok(None),
        Err(e) => Err(DataplaneError::netlink(format!("look up link {name}"), e)),
    }
}

pub(super) async fn require_index(handle: &Handle, name: &str) -> Result<u32> {
    link_index(handle, name)
        .await?
        .ok_or_else(|| DataplaneError::Setup(format!("link {name} vanished right after creation")))
}

pub(super) async fn delete_by_name(handle: &Handle, name: &str) -> Result<()> {
    let Some(index) = link_index(handle, name).await? else {
        return Ok(());
    };
    ignore_gone(handle.link().del(index).execute().await, || {
        format!("delete link {name}")
    })
}
