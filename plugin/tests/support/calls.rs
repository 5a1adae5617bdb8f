//! Docker's calls through the plugin socket, made the way Docker makes
//! them, and a two-host setup on one LAN and store.

use super::{Client, Lan, Netns, Plugin, Store};
use serde_json::json;
use std::time::{Duration, Instant};

pub const POOL: &str = "10.77.0.0/24";

/// `docker network create` on [`POOL`]: RequestPool, the gateway,
/// CreateNetwork (each asserted to succeed).
pub async fn create_network(c: &Client, network_id: &str) {
    c.request_pool(POOL).await.ok();
    c.request_gateway(POOL).await.ok();
    c.call(
        "NetworkDriver.CreateNetwork",
        json!({"NetworkID": network_id, "IPv4Data": [{"AddressSpace": "RustOverlayLocal", "Pool": POOL}]}),
    )
    .await
    .ok();
}

/// RequestAddress + CreateEndpoint + Join in [`POOL`]; returns (address/24,
/// SrcName, MAC).
pub async fn join(c: &Client, network_id: &str, endpoint_id: &str) -> (String, String, String) {
    join_in(c, POOL, network_id, endpoint_id).await
}

/// [`join`] in another pool.
pub async fn join_in(
    c: &Client,
    pool: &str,
    network_id: &str,
    endpoint_id: &str,
) -> (String, String, String) {
    let addr = c.request_address(pool, "").await.ok()["Address"]
        .as_str()
        .unwrap()
        .to_string();
    let created = c
        .call(
            "NetworkDriver.CreateEndpoint",
            json!({"NetworkID": network_id, "EndpointID": endpoint_id, "Interface": {"Address": addr}}),
        )
        .await
        .ok();
    let mac = created["Interface"]["MacAddress"]
        .as_str()
        .unwrap()
        .to_string();
    let joined = c
        .call(
            "NetworkDriver.Join",
            json!({"NetworkID": network_id, "EndpointID": endpoint_id, "SandboxKey": "/x"}),
        )
        .await
        .ok();
    let src = joined["InterfaceName"]["SrcName"]
        .as_str()
        .unwrap()
        .to_string();
    (addr, src, mac)
}

/// Poll `check` every 20 ms until it holds (returns how long that took), or
/// fail the test after `limit`.
pub async fn wait_until(what: &str, limit: Duration, mut check: impl FnMut() -> bool) -> Duration {
    let start = Instant::now();
    loop {
        if check() {
            return start.elapsed();
        }
        assert!(start.elapsed() < limit, "{what}: not within {limit:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The remote entries of overlay `vni` on the plugin's host, as `bridge fdb
/// show` prints them.
pub fn fdb(p: &Plugin, vni: u32) -> String {
    p.in_overlay(
        vni,
        &["bridge", "fdb", "show", "dev", &format!("ro-vx-{vni}")],
    )
}

/// The VNI the first overlay gets.
pub const FIRST_VNI: u32 = 256;

/// Two hosts on one LAN and store, each serving a network on [`POOL`]
/// (`n1` on h1, `n2` on h2). Fields drop in order: plugins, then their
/// namespaces, then the LAN and its store.
pub struct TwoHosts {
    pub p1: Plugin,
    pub p2: Plugin,
    pub ns1: Netns,
    pub ns2: Netns,
    pub url: String,
    pub lan: Lan,
}

impl TwoHosts {
    /// `label` names the plugins' directories; `args` go to both plugins
    /// (after the store's own).
    pub async fn start(store: Store, label: &str, args: &[&str]) -> TwoHosts {
        let mut lan = Lan::new();
        let url = lan.start_store(store).await;
        let args: Vec<&str> = args
            .iter()
            .copied()
            .chain(Lan::plugin_args(store))
            .collect();
        let (ns1, ns2) = (lan.host(1), lan.host(2));
        let dir = |n: u8| Plugin::dir_for(&format!("{label}{n}"));
        let p1 = Plugin::start_with(&ns1, &dir(1), "h1", &url, &args).await;
        let p2 = Plugin::start_with(&ns2, &dir(2), "h2", &url, &args).await;
        create_network(&p1.client(), "n1").await;
        create_network(&p2.client(), "n2").await;
        TwoHosts {
            p1,
            p2,
            ns1,
            ns2,
            url,
            lan,
        }
    }
}
