//! `rustoverlay doctor`: checks of this host, each ok, warn or FAIL with a
//! one-line fix. The checks read; the only thing sent anywhere is one VXLAN
//! probe per live peer (`dataplane::path_probe`).

use super::secs;
use super::status::{from_plugin, plugin_socket};
use crate::api::operator::StatusReport;
use crate::cli::DoctorArgs;
use crate::control::status::{cluster_view, ClusterView};
use crate::dataplane::path_probe::{probe_path, PathProbe};
use crate::dataplane::{Netlink, VXLAN_OVERHEAD, VXLAN_PORT};
use crate::docker::{client::Client, DockerApi};
use crate::state::{keys, open};
use std::fmt;
use std::net::{IpAddr, Ipv4Addr};
use std::path::Path;
use std::time::{Duration, Instant};

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Level {
    Ok,
    Warn,
    Fail,
}

#[derive(Debug, Clone)]
pub struct Check {
    pub level: Level,
    pub name: &'static str,
    pub detail: String,
    pub fix: Option<String>,
}

impl Check {
    fn ok(name: &'static str, detail: impl Into<String>) -> Check {
        Check {
            level: Level::Ok,
            name,
            detail: detail.into(),
            fix: None,
        }
    }
    fn warn(name: &'static str, detail: impl Into<String>, fix: impl Into<String>) -> Check {
        Check {
            level: Level::Warn,
            name,
            detail: detail.into(),
            fix: Some(fix.into()),
        }
    }
    fn fail(name: &'static str, detail: impl Into<String>, fix: impl Into<String>) -> Check {
        Check {
            level: Level::Fail,
            name,
            detail: detail.into(),
            fix: Some(fix.into()),
        }
    }
}

impl fmt::Display for Check {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let tag = match self.level {
            Level::Ok => "ok  ",
            Level::Warn => "warn",
            Level::Fail => "FAIL",
        };
        write!(f, "{tag}  {:<13} {}", self.name, self.detail)?;
        if let Some(fix) = &self.fix {
            write!(f, "\n                    fix: {fix}")?;
        }
        Ok(())
    }
}

/// Run every check, print them, and return the exit status: 0 all ok, 1
/// warnings, 2 a failure.
pub async fn doctor(args: DoctorArgs) -> anyhow::Result<u8> {
    let mut checks = vec![privileges(), vxlan_kernel()];
    let (socket, managed) = plugin_socket(&args.plugin.socket);
    let plugin = from_plugin(&socket).await;
    checks.push(match &plugin {
        Ok(r) => Check::ok("plugin", format!("answers at {} (version {}, store {})", socket.display(), r.version, r.store)),
        Err(e) if format!("{e:#}").contains("the plugin answered") => Check::fail(
            "plugin",
            format!("runs, but could not report: {e:#}"),
            "the store check below says more; the plugin's log has the rest",
        ),
        Err(e) => Check::fail(
            "plugin",
            format!("{e:#}"),
            "start it (systemctl start rustoverlay, or docker plugin enable rustoverlay), then run doctor again",
        ),
    });
    checks.push(propagation(managed));
    let plugin = plugin.ok();
    let local = plugin.as_ref().and_then(|r| r.local.as_ref());
    let host = args
        .host_id
        .clone()
        .or_else(|| local.map(|l| l.host.clone()))
        .or_else(|| {
            nix::unistd::gethostname()
                .ok()
                .map(|h| h.to_string_lossy().into_owned())
        })
        .unwrap_or_default();
    let wanted_vtep = args.vtep_ip.or(match local.map(|l| l.vtep) {
        Some(IpAddr::V4(v)) => Some(v),
        _ => None,
    });
    let vtep = match Netlink::new(wanted_vtep, Path::new("/run/rustoverlay")).await {
        Ok(net) => {
            checks.push(underlay(&net));
            Some(net.underlay().vtep)
        }
        Err(e) => {
            checks.push(Check::fail(
                "underlay",
                format!("{e}"),
                "give --vtep-ip (the address other hosts reach this one at) to the plugin and to doctor",
            ));
            None
        }
    };
    let (store_check, cluster) = store(&args, plugin.as_ref()).await;
    checks.push(store_check);
    if cluster.is_none() || vtep.is_none() {
        checks.push(Check::warn(
            "vxlan path",
            "not probed: no list of live hosts (store) or no VTEP (underlay)",
            "fix the checks above first",
        ));
    }
    if let (Some(cluster), Some(vtep)) = (&cluster, vtep) {
        let mut found = identity(cluster, &host, vtep);
        if wanted_vtep.is_none() {
            // Neither the plugin nor --vtep-ip said which VTEP: a guess.
            for c in found.iter_mut().filter(|c| c.level != Level::Ok) {
                c.detail.push_str(" (this host's VTEP as doctor guessed it from the default route: give --vtep-ip if the plugin uses another)");
            }
        }
        checks.extend(found);
        if checks
            .iter()
            .all(|c| c.name != "host id" || c.level == Level::Ok)
        {
            checks.extend(
                paths(
                    cluster,
                    &host,
                    vtep,
                    secs(args.probe_window, "--probe-window")?,
                )
                .await,
            );
        } else {
            checks.push(Check::warn(
                "vxlan path",
                "not probed: peers answer only a registered host's VTEP",
                "fix the host ID or the registration first",
            ));
        }
    }
    checks.push(firewall());
    checks.push(docker(&args).await);
    for c in &checks {
        println!("{c}");
    }
    let worst = checks.iter().map(|c| c.level).max().unwrap_or(Level::Ok);
    Ok(match worst {
        Level::Ok => 0,
        Level::Warn => 1,
        Level::Fail => 2,
    })
}

/// Root, or the capabilities the plugin uses.
fn privileges() -> Check {
    let caps = std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("CapEff:"))
                .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
        })
        .unwrap_or(0);
    let missing: Vec<&str> = [
        (12, "CAP_NET_ADMIN"),
        (13, "CAP_NET_RAW"),
        (21, "CAP_SYS_ADMIN"),
    ]
    .iter()
    .filter(|(bit, _)| caps & (1 << bit) == 0)
    .map(|(_, name)| *name)
    .collect();
    if missing.is_empty() {
        Check::ok(
            "privileges",
            "CAP_NET_ADMIN, CAP_NET_RAW and CAP_SYS_ADMIN held",
        )
    } else {
        Check::fail(
            "privileges",
            format!("missing {}", missing.join(", ")),
            "run as root (sudo rustoverlay doctor); the plugin needs the same",
        )
    }
}

/// The kernel's VXLAN driver: loaded, or a module that loads on first use.
fn vxlan_kernel() -> Check {
    if Path::new("/sys/module/vxlan").exists() {
        return Check::ok("vxlan", "the kernel's vxlan driver is loaded");
    }
    let release = nix::sys::utsname::uname()
        .map(|u| u.release().to_string_lossy().into_owned())
        .unwrap_or_default();
    let dir = Path::new("/lib/modules").join(&release);
    let listed = ["modules.dep", "modules.builtin"]
        .iter()
        .any(|f| std::fs::read_to_string(dir.join(f)).is_ok_and(|t| t.contains("/vxlan.ko")));
    if listed {
        Check::ok(
            "vxlan",
            format!("the vxlan module of kernel {release} loads on first use"),
        )
    } else {
        Check::fail(
            "vxlan",
            format!("no vxlan driver in kernel {release}"),
            "install the kernel's extra modules (e.g. linux-modules-extra) or a kernel with CONFIG_VXLAN",
        )
    }
}

/// The managed plugin's overlay namespaces must reach dockerd through /run.
fn propagation(managed: bool) -> Check {
    let shared = std::fs::read_to_string("/proc/self/mountinfo")
        .ok()
        .and_then(|info| {
            // The mount that holds /run: the longest mount point above it.
            info.lines()
                .filter_map(|l| {
                    let fields: Vec<&str> = l.split(' ').collect();
                    let point = *fields.get(4)?;
                    let holds =
                        point == "/" || point == "/run" || "/run".starts_with(&format!("{point}/"));
                    holds.then(|| (point.len(), l.contains(" shared:")))
                })
                .max_by_key(|(len, _)| *len)
        })
        .is_some_and(|(_, shared)| shared);
    match (shared, managed) {
        (true, _) => Check::ok("/run", "/run is a shared mount"),
        (false, false) => Check::ok("/run", "not shared; only the managed plugin needs it shared"),
        (false, true) => Check::fail(
            "/run",
            "/run is not a shared mount, and the plugin is the managed one: its overlay namespaces do not reach dockerd",
            "mount --make-rshared /run (and make it permanent, e.g. in a systemd unit)",
        ),
    }
}

fn underlay(net: &Netlink) -> Check {
    let u = net.underlay();
    let inner = u.mtu.saturating_sub(VXLAN_OVERHEAD);
    let detail = format!(
        "VTEP {} on {}, MTU {}: containers get MTU {inner}",
        u.vtep, u.ifname, u.mtu
    );
    if inner < 1400 {
        Check::warn(
            "underlay",
            detail,
            "raise the underlay's MTU (jumbo frames) if the network allows: small container MTUs cost throughput",
        )
    } else {
        Check::ok("underlay", detail)
    }
}

/// Reach the store and time it; read the cluster (through the plugin for
/// the embedded store, which it locks).
async fn store(args: &DoctorArgs, plugin: Option<&StatusReport>) -> (Check, Option<ClusterView>) {
    if args.store.store.starts_with("file://") || args.store.store.starts_with("memory://") {
        return match plugin {
            Some(r) => (Check::ok("store", format!("{} store, read through the plugin", r.store)), Some(r.cluster.clone())),
            None => (
                Check::fail(
                    "store",
                    "not read: the plugin did not answer (above), and without --store only it can read its store",
                    "start the plugin; for etcd or Consul, give --store to check the store directly",
                ),
                None,
            ),
        };
    }
    let fix = "check --store (and its TLS and credentials), that the store runs, and that this host reaches it (routes, firewalls)";
    let store = match open::open(
        &args.store,
        Duration::from_secs_f64(args.store.store_timeout.clamp(0.1, 60.0)),
    ) {
        Ok(s) => s,
        Err(e) => return (Check::fail("store", format!("{e}"), fix), None),
    };
    let mut times = Vec::new();
    for _ in 0..3 {
        let t0 = Instant::now();
        if let Err(e) = store.get(&keys::reaper()).await {
            return (
                Check::fail(
                    "store",
                    format!("{} unreachable: {e}", args.store.store),
                    fix,
                ),
                None,
            );
        }
        times.push(t0.elapsed());
    }
    times.sort();
    let median = times[1];
    let cluster = cluster_view(store.as_ref()).await.ok();
    let detail = format!(
        "{} answers in {:.1} ms (median of 3 reads)",
        args.store.store,
        median.as_secs_f64() * 1000.0
    );
    let check = if median > Duration::from_millis(100) {
        Check::warn(
            "store",
            detail,
            "a slow store slows every docker run: check its disk (fsync) and the network to it",
        )
    } else {
        Check::ok("store", detail)
    };
    (check, cluster)
}

/// This host's registration, and no other machine under its ID or VTEP.
fn identity(cluster: &ClusterView, host: &str, vtep: Ipv4Addr) -> Vec<Check> {
    let mut checks = Vec::new();
    let me = cluster.hosts.iter().find(|h| h.host == host);
    checks.push(match me {
        Some(h) if h.alive && h.vtep == Some(IpAddr::V4(vtep)) => {
            Check::ok("host id", format!("{host} is registered with this host's VTEP {vtep}"))
        }
        Some(h) if h.alive => Check::fail(
            "host id",
            format!(
                "duplicate host ID: {host} is registered by another machine (VTEP {}), not by this one ({vtep})",
                h.vtep.map(|v| v.to_string()).unwrap_or_default()
            ),
            "give every host its own --host-id (cloned machines share a hostname)",
        ),
        _ => Check::fail(
            "host id",
            format!("{host} is not registered"),
            "start the plugin (it registers at start), check its log for store errors",
        ),
    });
    // Another ID on this VTEP is an anomaly only once this ID is ours (run
    // with another machine's --host-id, this machine's own would show).
    if checks[0].level != Level::Ok {
        return checks;
    }
    let clones: Vec<&str> = cluster
        .hosts
        .iter()
        .filter(|h| h.alive && h.host != host && h.vtep == Some(IpAddr::V4(vtep)))
        .map(|h| h.host.as_str())
        .collect();
    if !clones.is_empty() {
        checks.push(Check::fail(
            "host id",
            format!(
                "host(s) {} registered with this host's VTEP {vtep}",
                clones.join(", ")
            ),
            "each machine needs its own VTEP address and host ID",
        ));
    }
    checks
}

/// One VXLAN probe per live peer, and the clocks from their answers.
async fn paths(cluster: &ClusterView, host: &str, vtep: Ipv4Addr, window: Duration) -> Vec<Check> {
    let peers: Vec<(String, Ipv4Addr)> = cluster
        .hosts
        .iter()
        .filter(|h| h.alive && h.host != host)
        .filter_map(|h| match h.vtep {
            Some(IpAddr::V4(v)) => Some((h.host.clone(), v)),
            _ => None,
        })
        .collect();
    if peers.is_empty() {
        return vec![Check::ok("vxlan path", "no other live host to probe")];
    }
    let probes = peers.iter().map(|(name, ip)| async move {
        (name.clone(), *ip, probe_path(host, vtep, *ip, window).await)
    });
    let mut checks = Vec::new();
    let mut skews = Vec::new();
    for (name, ip, probe) in futures::future::join_all(probes).await {
        checks.push(match probe {
            PathProbe::Answered { answer, rtt, skew_ms } if answer.host == name => {
                skews.push((name.clone(), skew_ms));
                Check::ok("vxlan path", format!("{name} ({ip}) answered over VXLAN (UDP {VXLAN_PORT}) in {:.1} ms", rtt.as_secs_f64() * 1000.0))
            }
            PathProbe::Answered { answer, .. } => Check::fail(
                "vxlan path",
                format!("{ip}, registered as {name}, answered as {}", answer.host),
                "two machines share a VTEP address or a host ID: give each its own",
            ),
            PathProbe::Silent => Check::fail(
                "vxlan path",
                format!("{name} ({ip}): no answer over VXLAN (UDP {VXLAN_PORT}) within {window:?}"),
                format!("open UDP {VXLAN_PORT} from this host to {ip} (firewall, security group), and UDP from {ip} back; run doctor on {name} too"),
            ),
            PathProbe::Failed(why) => Check::fail("vxlan path", format!("{name} ({ip}): {why}"), "check this host's VTEP (--vtep-ip)"),
        });
    }
    if let Some((name, skew)) = skews.iter().max_by_key(|(_, s)| s.abs()) {
        let detail = format!(
            "largest skew {skew} ms ({name}), across {} peer(s)",
            skews.len()
        );
        checks.push(if skew.abs() > 1000 {
            Check::warn("clock", detail, "run NTP (systemd-timesyncd, chrony) on every host: peer-sync lag and logs compare clocks")
        } else {
            Check::ok("clock", detail)
        });
    }
    checks
}

/// Rules that drop or reject UDP 4789, in iptables or nftables.
fn firewall() -> Check {
    let mut seen = Vec::new();
    let mut read_any = false;
    for (tool, args) in [
        ("iptables-save", &[][..]),
        ("ip6tables-save", &[][..]),
        ("nft", &["list", "ruleset"][..]),
    ] {
        let Ok(out) = std::process::Command::new(tool).args(args).output() else {
            continue;
        };
        if !out.status.success() {
            continue;
        }
        read_any = true;
        let text = String::from_utf8_lossy(&out.stdout);
        for line in text.lines() {
            let l = line.to_ascii_lowercase();
            if l.contains(&VXLAN_PORT.to_string()) && (l.contains("drop") || l.contains("reject")) {
                seen.push(format!("{tool}: {}", line.trim()));
            }
        }
    }
    match (read_any, seen.is_empty()) {
        (false, _) => Check::ok("firewall", "no iptables or nft here to read"),
        (true, true) => Check::ok(
            "firewall",
            format!("no rule drops or rejects UDP {VXLAN_PORT}"),
        ),
        (true, false) => Check::fail(
            "firewall",
            format!(
                "a rule drops or rejects UDP {VXLAN_PORT}: {}",
                seen.join("; ")
            ),
            format!("allow UDP {VXLAN_PORT} from the other hosts' VTEPs"),
        ),
    }
}

/// The engine's version, and whether its containers ask our resolver.
async fn docker(args: &DoctorArgs) -> Check {
    let client = Client::new(&args.docker_socket);
    let version = match client.connect().await {
        Ok(v) => v,
        Err(e) => {
            return Check::warn(
                "docker",
                format!("no engine at {}: {e}", args.docker_socket),
                "start dockerd (or give --docker-socket)",
            )
        }
    };
    let dns = std::fs::read_to_string(&args.docker_config)
        .ok()
        .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
        .and_then(|v| v.get("dns").cloned())
        .and_then(|d| d.as_array().cloned())
        .unwrap_or_default();
    let resolver = args.dns_address.to_string();
    if dns.iter().any(|d| d.as_str() == Some(resolver.as_str())) {
        Check::ok(
            "docker",
            format!(
                "{version}; {} sends containers' DNS to the plugin's resolver",
                args.docker_config.display()
            ),
        )
    } else {
        Check::warn(
            "docker",
            format!("{version}; {} has no \"dns\": [\"{resolver}\"]: names on other hosts do not resolve", args.docker_config.display()),
            format!("add \"dns\": [\"{resolver}\"] to {} and restart dockerd", args.docker_config.display()),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::control::status::HostView;

    fn host(name: &str, alive: bool, vtep: &str) -> HostView {
        HostView {
            host: name.into(),
            alive,
            vtep: Some(vtep.parse().unwrap()),
            version: Some("0.1.0".into()),
            endpoints: 0,
            gone_since: None,
        }
    }

    #[test]
    fn a_host_id_registered_by_another_vtep_is_a_duplicate() {
        let cluster = ClusterView {
            revision: 1,
            hosts: vec![host("h1", true, "10.0.0.1"), host("h2", true, "10.0.0.2")],
            overlays: vec![],
        };
        let mine = identity(&cluster, "h1", "10.0.0.1".parse().unwrap());
        assert_eq!(mine.len(), 1);
        assert_eq!(mine[0].level, Level::Ok);
        let clone = identity(&cluster, "h1", "10.0.0.3".parse().unwrap());
        assert_eq!(clone[0].level, Level::Fail);
        assert!(
            clone[0].detail.contains("duplicate host ID"),
            "{}",
            clone[0]
        );
        let unregistered = identity(&cluster, "h9", "10.0.0.9".parse().unwrap());
        assert_eq!(unregistered[0].level, Level::Fail);
        // Another ID on this machine's VTEP.
        let mut cluster = cluster;
        cluster.hosts.push(host("h1b", true, "10.0.0.1"));
        let twin = identity(&cluster, "h1", "10.0.0.1".parse().unwrap());
        assert!(twin
            .iter()
            .any(|c| c.detail.contains("h1b") && c.level == Level::Fail));
    }

    #[test]
    fn a_check_prints_its_level_name_detail_and_fix() {
        let c = Check::fail("store", "etcd unreachable", "start etcd");
        assert_eq!(
            c.to_string(),
            "FAIL  store         etcd unreachable\n                    fix: start etcd"
        );
    }
}
