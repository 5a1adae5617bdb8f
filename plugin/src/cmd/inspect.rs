//! `rustoverlay gc` and `rustoverlay dump`: operator tools over the store.

use super::secs;
use crate::cli::{DumpArgs, GcArgs};
use crate::control::reclaim;
use crate::state::{keys, open};
use anyhow::Context;
use std::time::Duration;

/// `rustoverlay gc`.
pub async fn gc(args: GcArgs) -> anyhow::Result<()> {
    let store = open::open(
        &args.store,
        secs(args.store.store_timeout, "--store-timeout")?,
    )?;
    let report = reclaim::gc(
        store,
        args.apply,
        Duration::from_secs(args.min_age),
        args.gone_hosts,
    )
    .await?;
    print!("{report}");
    Ok(())
}

/// Print the store's keys and values, one per line.
pub async fn dump(args: DumpArgs) -> anyhow::Result<()> {
    let store = open::open(
        &args.store,
        secs(args.store.store_timeout, "--store-timeout")?,
    )?;
    let prefix = format!("{}{}", keys::ROOT, args.prefix);
    let resp = store.range(&prefix).await.context("read the store")?;
    for kv in resp.kvs {
        println!("{} {}", kv.key, String::from_utf8_lossy(&kv.value));
    }
    Ok(())
}
