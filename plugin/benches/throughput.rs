//! Data-plane throughput benchmark (a program that prints figures; needs root
//! and Debian's iperf3).
//!
//! Two simulated hosts on a simulated LAN share a real etcd. One TCP stream
//! (iperf3) between:
//! - two "containers" on a rustoverlay network (sandbox namespaces holding the
//!   interfaces the plugin hands to Docker: veth, bridge, VXLAN, across hosts);
//! - a hand-built static VXLAN (MTU 1450) between the same two host namespaces;
//! - the plain underlay between the same two host namespaces.
//!
//! All three are measured in the same run, interleaved, and reported as
//! ratios: the overlay should equal the hand-built VXLAN.
//!
//! Run: `cargo bench -p rustoverlay --bench throughput` (as root)

#[path = "common/figures.rs"]
mod figures;
#[path = "../tests/support/mod.rs"]
mod support;

use serde_json::json;
use std::process::{Command, Stdio};
use std::time::Duration;
use support::{Lan, Netns, Plugin, Sandbox};

const POOL: &str = "10.77.0.0/24";
const SECONDS: &str = "4";
const ROUNDS: usize = 2;

fn sh(args: &[&str]) {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .expect("spawn");
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// One iperf3 TCP stream from namespace `client` to `server_ip` served in
/// namespace `server`; Gbit/s received.
fn iperf(server: &str, client: &str, server_ip: &str) -> f64 {
    let mut srv = Command::new("ip")
        .args([
            "netns", "exec", server, "iperf3", "-s", "-1", "-B", server_ip,
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("iperf3 (install Debian's iperf3)");
    std::thread::sleep(Duration::from_millis(300));
    let out = Command::new("ip")
        .args([
            "netns", "exec", client, "iperf3", "-c", server_ip, "-t", SECONDS, "-J",
        ])
        .output()
        .expect("iperf3 client");
    let _ = srv.kill();
    let _ = srv.wait();
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("iperf3 JSON");
    v["end"]["sum_received"]["bits_per_second"]
        .as_f64()
        .unwrap_or_else(|| panic!("iperf3 gave no result: {v}"))
        / 1e9
}

fn link_mac(ns: &str, dev: &str) -> String {
    let out = Command::new("ip")
        .args(["-n", ns, "-j", "link", "show", dev])
        .output()
        .unwrap();
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    v[0]["address"].as_str().unwrap().to_string()
}

/// A static VXLAN (VNI 4242, MTU 1450) directly between the two host
/// namespaces, addresses 192.168.242.<n>/24, with static FDB and ARP entries.
fn hand_built_vxlan(h: &[&Netns; 2]) {
    for (i, ns) in h.iter().enumerate() {
        sh(&[
            "ip",
            "-n",
            &ns.name,
            "link",
            "add",
            "hvx",
            "type",
            "vxlan",
            "id",
            "4242",
            "local",
            &ns.vtep,
            "dstport",
            "4789",
            "nolearning",
            "dev",
            "ul0",
        ]);
        sh(&[
            "ip", "-n", &ns.name, "link", "set", "hvx", "mtu", "1450", "up",
        ]);
        sh(&[
            "ip",
            "-n",
            &ns.name,
            "addr",
            "add",
            &format!("192.168.242.{}/24", i + 1),
            "dev",
            "hvx",
        ]);
    }
    for (i, ns) in h.iter().enumerate() {
        let other = h[1 - i];
        let mac = link_mac(&other.name, "hvx");
        sh(&[
            "bridge",
            "-n",
            &ns.name,
            "fdb",
            "append",
            &mac,
            "dev",
            "hvx",
            "dst",
            &other.vtep,
        ]);
        sh(&[
            "ip",
            "-n",
            &ns.name,
            "neigh",
            "add",
            &format!("192.168.242.{}", 2 - i),
            "lladdr",
            &mac,
            "dev",
            "hvx",
            "nud",
            "permanent",
        ]);
    }
}

async fn run() {
    let mut lan = Lan::new();
    lan.start_etcd().await;
    let url = lan.etcd_url();
    let (n1, n2) = (lan.host(1), lan.host(2));
    let p1 = Plugin::start_with(&n1, &Plugin::dir_for("tp1"), "h1", &url, &[]).await;
    let p2 = Plugin::start_with(&n2, &Plugin::dir_for("tp2"), "h2", &url, &[]).await;
    let mut ends = vec![];
    for (i, (p, ns)) in [(&p1, &n1), (&p2, &n2)].into_iter().enumerate() {
        let c = p.client();
        c.request_pool(POOL).await.ok();
        c.request_gateway(POOL).await.ok();
        let net = format!("net{i}");
        c.call("NetworkDriver.CreateNetwork", json!({"NetworkID": net, "IPv4Data": [{"AddressSpace": "RustOverlayLocal", "Pool": POOL}]}))
            .await
            .ok();
        let addr = c.request_address(POOL, "").await.ok()["Address"]
            .as_str()
            .unwrap()
            .to_string();
        let ep = format!("iperf{i}iperf{i}iperf{i}");
        c.call(
            "NetworkDriver.CreateEndpoint",
            json!({"NetworkID": net, "EndpointID": ep, "Interface": {"Address": addr}}),
        )
        .await
        .ok();
        let joined = c
            .call(
                "NetworkDriver.Join",
                json!({"NetworkID": net, "EndpointID": ep, "SandboxKey": "/x"}),
            )
            .await
            .ok();
        let sbx = Sandbox::new();
        sbx.take(
            ns,
            joined["InterfaceName"]["SrcName"].as_str().unwrap(),
            &addr,
        );
        ends.push((sbx, addr.split('/').next().unwrap().to_string()));
    }
    // Wait until the overlay carries traffic both ways.
    for _ in 0..50 {
        if ends[0].0.ping(&ends[1].1) && ends[1].0.ping(&ends[0].1) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    hand_built_vxlan(&[&n1, &n2]);

    let (mut ov, mut hb, mut ul) = (vec![], vec![], vec![]);
    for _ in 0..ROUNDS {
        ov.push(iperf(&ends[1].0.name, &ends[0].0.name, &ends[1].1));
        hb.push(iperf(&n2.name, &n1.name, "192.168.242.2"));
        ul.push(iperf(&n2.name, &n1.name, &n2.vtep));
    }
    let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len() as f64;
    let (o, h, u) = (mean(&ov), mean(&hb), mean(&ul));
    println!("TCP throughput across two simulated hosts, one iperf3 stream, {SECONDS} s x {ROUNDS} rounds each, interleaved");
    println!("{:<44} {:>10} {:>14}", "path", "Gbit/s", "vs underlay");
    println!(
        "{:<44} {:>10.2} {:>13.2}x",
        "plain underlay (veth over a bridge)", u, 1.0
    );
    println!(
        "{:<44} {:>10.2} {:>13.2}x",
        "hand-built static VXLAN, MTU 1450",
        h,
        h / u
    );
    println!(
        "{:<44} {:>10.2} {:>13.2}x",
        "rustoverlay container to container",
        o,
        o / u
    );
    println!("rustoverlay / hand-built VXLAN: {:.2}x", o / h);
    let bench = "throughput";
    let underlay = "plain underlay (veth over a bridge)";
    figures::record(
        bench,
        "one TCP stream, rustoverlay container to container",
        o,
        "Gbit/s",
        Some(("hand-built static VXLAN, MTU 1450", h)),
        None,
    );
    figures::record(
        bench,
        "one TCP stream, hand-built static VXLAN, MTU 1450",
        h,
        "Gbit/s",
        Some((underlay, u)),
        None,
    );
    figures::record(
        bench,
        &format!("one TCP stream, {underlay}"),
        u,
        "Gbit/s",
        None,
        None,
    );
    drop((p1, p2));
}

fn main() {
    support::require_root();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(run());
}
