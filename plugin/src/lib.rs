//! rustoverlay: a Docker network and IPAM plugin that gives plain Docker hosts
//! shared multi-host VXLAN overlays, with a key-value store as the single
//! source of truth.

pub mod backoff;
pub mod cli;
pub mod dataplane;
pub mod driver;
pub mod error;
pub mod hosts;
pub mod ipam;
pub mod keys;
pub mod netns;
pub mod overlay;
pub mod peers;
pub mod protocol;
pub mod reclaim;
pub mod server;
pub mod socket;
pub mod store;

use anyhow::Context;
use cli::{DumpArgs, ServeArgs};
use std::sync::Arc;
use std::time::Duration;

/// Run the plugin until SIGTERM or SIGINT.
pub async fn serve(args: ServeArgs) -> anyhow::Result<()> {
    let host = match args.host_id.clone() {
        Some(h) if !h.trim().is_empty() => h,
        _ => nix::unistd::gethostname()
            .context("read the hostname (or give --host-id)")?
            .to_string_lossy()
            .into_owned(),
    };
    if host.contains('/') {
        anyhow::bail!("--host-id {host:?} must not contain '/'");
    }
    if !(8..=30).contains(&args.default_pool_size)
        || args.default_pool_size < args.default_pool.prefix()
    {
        anyhow::bail!(
            "--default-pool-size {} must be between the default pool's prefix ({}) and 30",
            args.default_pool_size,
            args.default_pool.prefix()
        );
    }
    let store = store::open(
        &args.store,
        secs(args.store.store_timeout, "--store-timeout")?,
    )?;
    let dataplane = Arc::new(
        dataplane::Dataplane::new(args.vtep_ip, &args.state_dir)
            .await
            .context("find the underlay")?,
    );
    let ipam = ipam::Ipam::new(
        store.clone(),
        &host,
        args.default_pool,
        args.default_pool_size,
    );
    let overlays = overlay::Overlays::new(store.clone(), &host);
    let live = hosts::watch_live_hosts(store.clone());
    let peers = peers::PeerSync::new(store.clone(), dataplane.clone(), host.clone(), live);
    let driver = Arc::new(driver::Driver::new(
        ipam,
        overlays,
        dataplane,
        peers,
        host.clone(),
    ));
    if args.host_ttl == 0 {
        anyhow::bail!("--host-ttl must be at least 1 second");
    }
    let registration = hosts::Registration::new(
        store.clone(),
        host.clone(),
        std::net::IpAddr::V4(driver.dataplane.underlay().vtep),
        Duration::from_secs(args.host_ttl),
    );
    tokio::spawn(registration.run(driver.clone()));
    tokio::spawn(reclaim::reaper(
        store.clone(),
        driver.clone(),
        Duration::from_secs(args.host_ttl.max(5)),
        Duration::from_secs(args.reclaim_grace),
        Duration::from_secs(args.orphan_age),
    ));
    tokio::spawn(driver.clone().recover_until_done());
    let listener = socket::bind(&args.socket).await?;
    let app = server::router(driver, secs(args.request_timeout, "--request-timeout")?);
    tracing::info!(
        socket = %args.socket.display(),
        host = %host,
        store = store.backend_name(),
        "serving"
    );
    let result = axum::serve(listener, app)
        .with_graceful_shutdown(shutdown_signal())
        .await
        .context("serve the plugin socket");
    let _ = std::fs::remove_file(&args.socket);
    tracing::info!("stopped");
    result
}

/// `rustoverlay gc`.
pub async fn gc(args: cli::GcArgs) -> anyhow::Result<()> {
    let store = store::open(
        &args.store,
        secs(args.store.store_timeout, "--store-timeout")?,
    )?;
    let report = reclaim::gc(store, args.apply, Duration::from_secs(args.min_age)).await?;
    print!("{report}");
    Ok(())
}

/// Print the store's keys and values, one per line.
pub async fn dump(args: DumpArgs) -> anyhow::Result<()> {
    let store = store::open(
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

fn secs(value: f64, flag: &str) -> anyhow::Result<Duration> {
    if !(value.is_finite() && value > 0.0) {
        anyhow::bail!("{flag} must be a positive number of seconds, not {value}");
    }
    Ok(Duration::from_secs_f64(value))
}

async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        // Without signal handlers we can only run until killed.
        return std::future::pending().await;
    };
    tokio::select! {
        _ = term.recv() => {},
        _ = int.recv() => {},
    }
    tracing::info!("shutting down");
}
