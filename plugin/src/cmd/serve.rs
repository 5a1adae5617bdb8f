//! `rustoverlay serve`: build every layer for this host, start the loops,
//! and serve Docker on the plugin socket until SIGTERM or SIGINT.

use super::parts::{HostParts, HostSettings};
use super::secs;
use crate::api::operator::Operator;
use crate::api::{self, socket, AppState};
use crate::cli::ServeArgs;
use crate::control::cluster::Clusters;
use crate::dataplane::{Dataplane, Netlink};
use crate::docker::{client::Client, DockerApi};
use crate::driver::ClusterHooks;
use crate::state::open;
use crate::sync::cluster::ClusterSync;
use crate::sync::membership::{GoneClock, Registration};
use crate::sync::reaper::ReaperConfig;
use crate::sync::supervisor;
use crate::util::task::spawn_supervised;
use anyhow::Context;
use std::path::Path;
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
    if args.host_ttl == 0 {
        anyhow::bail!("--host-ttl must be at least 1 second");
    }
    // Before the store opens, so that its first calls are counted.
    let metrics = match args.metrics_addr {
        Some(addr) => Some(super::metrics::bind(addr).await?),
        None => None,
    };
    create_linked_store_dir(&args.store.store)?;
    let store = open::open(
        &args.store,
        secs(args.store.store_timeout, "--store-timeout")?,
    )?;
    open::first_contact(store.as_ref(), &args.store.store).await?;
    let dataplane: Arc<dyn Dataplane> = Arc::new(
        Netlink::new(args.vtep_ip, &args.state_dir)
            .await
            .context("find the underlay")?,
    );
    let names = super::dns::name_service(&args.dns, store.clone(), dataplane.clone(), &host);
    let cluster = ClusterHooks {
        clusters: Arc::new(Clusters::new(store.clone(), &host)),
        changed: Arc::new(tokio::sync::Notify::new()),
    };
    let parts = HostParts::with_names(
        store.clone(),
        dataplane.clone(),
        &host,
        HostSettings {
            default_pool: args.default_pool,
            default_pool_size: args.default_pool_size,
            linger: Duration::from_secs(args.linger),
        },
        names.clone(),
        Some(cluster.clone()),
    );
    let registration = Registration::new(
        store.clone(),
        host.clone(),
        dataplane.vtep(),
        Duration::from_secs(args.host_ttl),
    );
    if let Some(names) = &names {
        super::dns::start(
            &args.dns,
            names,
            dataplane.clone(),
            parts.overlays.clone(),
            store.clone(),
            &host,
            registration.lease(),
        )
        .await;
    }
    {
        let (overlays, store, host) = (parts.overlays.clone(), store.clone(), host.clone());
        let docker: Arc<dyn DockerApi> = Arc::new(Client::new(&args.dns.docker_socket));
        spawn_supervised("cluster_networks", move || {
            ClusterSync::new(
                docker.clone(),
                overlays.clone(),
                cluster.clusters.clone(),
                store.clone(),
                &host,
                cluster.changed.clone(),
            )
            .run()
        });
    }
    let running = supervisor::start(
        store.clone(),
        host.clone(),
        registration,
        parts.reconciler.clone(),
        ReaperConfig {
            period: Duration::from_secs(args.host_ttl.max(5)),
            grace: Duration::from_secs(args.reclaim_grace),
            orphan_age: Duration::from_secs(args.orphan_age),
        },
        parts.live.clone(),
    );
    crate::sync::path_probe::start(dataplane.clone(), store.clone(), host.clone());
    if let Some(metrics) = metrics {
        super::metrics::serve(metrics, parts.overlays.clone(), parts.ipam.clone());
    }
    let operator = Operator {
        store: store.clone(),
        host: host.clone(),
        overlays: parts.overlays.clone(),
        devices: parts.devices.clone(),
        live: parts.live.clone(),
        gone: GoneClock::follow(parts.live.clone()),
    };
    let listener = socket::bind(&args.socket).await?;
    let app = api::router(
        AppState {
            driver: parts.driver,
            ipam: parts.ipam,
            ready: running.ready,
        },
        secs(args.request_timeout, "--request-timeout")?,
    )
    .merge(api::operator::router(operator));
    tracing::info!(
        socket = %args.socket.display(),
        host = %host,
        store = store.backend_name(),
        "serving"
    );
    let mut fatal = running.fatal;
    let mut fatal_seen = fatal.clone();
    let stop = async move {
        tokio::select! {
            _ = shutdown_signal() => {}
            _ = fatal_seen.wait_for(|f| f.is_some()) => {}
        }
    };
    let result = axum::serve(listener, app)
        .with_graceful_shutdown(stop)
        .await
        .context("serve the plugin socket");
    let _ = std::fs::remove_file(&args.socket);
    if let Err(e) = dataplane.remove_path_probe().await {
        tracing::warn!(error = %e, "could not remove the VXLAN path probe's device");
    }
    tracing::info!("stopped");
    if let Some(why) = fatal.borrow_and_update().clone() {
        anyhow::bail!(why);
    }
    result
}

/// The embedded store's directory may be a link to a directory that does not
/// exist yet: in the managed plugin, /var/lib/rustoverlay links to
/// /host/var/lib/rustoverlay, the host's /var/lib/rustoverlay (config.json
/// mounts the host's /var/lib, which every host has). Create the directory
/// the link points to; the store creates any other missing directory.
fn create_linked_store_dir(store_url: &str) -> anyhow::Result<()> {
    let Some(dir) = store_url
        .strip_prefix("file://")
        .and_then(|path| Path::new(path).parent())
    else {
        return Ok(());
    };
    let is_link = std::fs::symlink_metadata(dir).is_ok_and(|m| m.file_type().is_symlink());
    if !is_link || dir.exists() {
        return Ok(());
    }
    let target =
        std::fs::read_link(dir).with_context(|| format!("read the link {}", dir.display()))?;
    let target = dir.parent().unwrap_or(Path::new("/")).join(target);
    std::fs::create_dir_all(&target).with_context(|| {
        format!(
            "create {} (where the store's directory {} points)",
            target.display(),
            dir.display()
        )
    })?;
    tracing::info!(directory = %target.display(), "created the store's directory");
    Ok(())
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

#[cfg(test)]
mod tests {
    use super::create_linked_store_dir;

    #[test]
    fn a_store_directory_that_is_a_dangling_link_is_created_where_it_points() {
        let tmp = tempfile::tempdir().unwrap();
        let host = tmp.path().join("host/var/lib");
        std::fs::create_dir_all(&host).unwrap();
        let link = tmp.path().join("rustoverlay");
        std::os::unix::fs::symlink(host.join("rustoverlay"), &link).unwrap();
        let url = format!("file://{}/state.redb", link.display());
        create_linked_store_dir(&url).unwrap();
        assert!(host.join("rustoverlay").is_dir());
        // Again: nothing to do.
        create_linked_store_dir(&url).unwrap();
        // Not a link, not a file store: untouched.
        let plain = tmp.path().join("plain");
        create_linked_store_dir(&format!("file://{}/state.redb", plain.display())).unwrap();
        assert!(!plain.exists());
        create_linked_store_dir("etcd://127.0.0.1:2379").unwrap();
    }
}
