//! Every part of one host, wired the way `serve` runs them: the one place
//! that knows how the layers fit together, so tests and benchmarks build a
//! host exactly as the plugin does.

use crate::control::ipam::Ipam;
use crate::control::overlay::Overlays;
use crate::dataplane::Dataplane;
use crate::driver::{ClusterHooks, Driver};
use crate::sync::devices::Devices;
use crate::sync::membership::{watch_live_hosts, LiveSet};
use crate::sync::names::NameService;
use crate::sync::peers::PeerSync;
use crate::sync::reconcile::Reconciler;
use ipnetwork::Ipv4Network;
use kvstore_backends::KvStore;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;

/// What `serve`'s flags set in the parts.
#[derive(Debug, Clone, Copy)]
pub struct HostSettings {
    /// Subnets for networks created without `--subnet`, and their size.
    pub default_pool: Ipv4Network,
    pub default_pool_size: u8,
    /// How long devices outlive the overlay's last local endpoint.
    pub linger: Duration,
}

pub struct HostParts {
    pub ipam: Arc<Ipam>,
    pub overlays: Arc<Overlays>,
    pub devices: Arc<Devices>,
    pub reconciler: Arc<Reconciler>,
    pub driver: Arc<Driver>,
    /// The registered hosts, as this host follows them.
    pub live: watch::Receiver<LiveSet>,
}

impl HostParts {
    /// Build the parts and start following the live hosts (the other loops
    /// start with `sync::supervisor::start`).
    pub fn new(
        store: Arc<dyn KvStore>,
        dataplane: Arc<dyn Dataplane>,
        host: &str,
        default_pool: Ipv4Network,
        default_pool_size: u8,
    ) -> Self {
        let settings = HostSettings {
            default_pool,
            default_pool_size,
            linger: Duration::ZERO,
        };
        Self::with_names(store, dataplane, host, settings, None, None)
    }

    /// The same, with a resolver on every local overlay when `names` is
    /// given (built on the same store and data plane).
    pub fn with_names(
        store: Arc<dyn KvStore>,
        dataplane: Arc<dyn Dataplane>,
        host: &str,
        settings: HostSettings,
        names: Option<Arc<NameService>>,
        cluster: Option<ClusterHooks>,
    ) -> Self {
        let ipam = Arc::new(Ipam::new(
            store.clone(),
            host,
            settings.default_pool,
            settings.default_pool_size,
        ));
        let overlays = Arc::new(Overlays::new(store.clone(), host));
        let live = watch_live_hosts(store.clone());
        let peers = PeerSync::new(store, dataplane.clone(), host.to_string(), live.clone());
        let mut devices = Devices::new(host.to_string(), overlays.clone(), dataplane, peers)
            .with_linger(settings.linger);
        let mut driver_dns = None;
        if let Some(names) = names {
            driver_dns = Some(names.address());
            devices = devices.with_names(names);
        }
        let devices = Arc::new(devices);
        let reconciler = Arc::new(Reconciler::new(
            host.to_string(),
            overlays.clone(),
            ipam.clone(),
            devices.clone(),
        ));
        let mut driver = Driver::new(
            host.to_string(),
            ipam.clone(),
            overlays.clone(),
            devices.clone(),
        );
        if let Some(address) = driver_dns {
            driver = driver.with_dns(address);
        }
        if let Some(hooks) = cluster {
            driver = driver.with_cluster(hooks);
        }
        let driver = Arc::new(driver);
        HostParts {
            ipam,
            overlays,
            devices,
            reconciler,
            driver,
            live,
        }
    }
}
