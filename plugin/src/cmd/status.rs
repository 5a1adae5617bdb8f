//! `rustoverlay status`: the report from the running plugin (or, with
//! `--from-store` or when the plugin does not answer, from the store
//! directly), as a compact table or as JSON.

use super::secs;
use crate::api::operator::{StatusReport, STATUS_PATH};
use crate::cli::StatusArgs;
use crate::control::status::{cluster_view, ClusterView};
use crate::state::open;
use crate::sync::drift::LocalView;
use anyhow::{bail, Context};
use http_body_util::{BodyExt, Empty};
use hyper::body::Bytes;
use hyper_util::rt::TokioIo;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// How long the plugin may take to answer (it bounds itself at 10 s).
const PLUGIN_LIMIT: Duration = Duration::from_secs(15);

pub async fn status(args: StatusArgs) -> anyhow::Result<()> {
    let report = if args.from_store {
        from_store(&args).await?
    } else {
        match from_plugin(&args.plugin.socket).await {
            Ok(report) => report,
            Err(e) if !args.store.store.starts_with("file://") => {
                eprintln!(
                    "rustoverlay: no report from the plugin at {} ({e:#}); reading {} directly, \
                     without checking this host's kernel",
                    args.plugin.socket.display(),
                    args.store.store
                );
                from_store(&args).await?
            }
            Err(e) => bail!(
                "{e:#}. The embedded store ({}) can only be read through its running plugin: \
                 start the plugin, or give --socket if it listens elsewhere",
                args.store.store
            ),
        }
    };
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{}", render(&report, crate::util::clock::unix_now()));
    }
    Ok(())
}

async fn from_store(args: &StatusArgs) -> anyhow::Result<StatusReport> {
    let store = open::open(
        &args.store,
        secs(args.store.store_timeout, "--store-timeout")?,
    )?;
    let cluster = cluster_view(store.as_ref())
        .await
        .with_context(|| format!("read {}", args.store.store))?;
    Ok(StatusReport {
        version: env!("CARGO_PKG_VERSION").to_string(),
        store: store.backend_name().to_string(),
        cluster,
        local: None,
    })
}

/// The plugin's socket: `given` if it exists, else a managed plugin's
/// (`/run/docker/plugins/<id>/rustoverlay.sock`); true for a managed one.
pub(super) fn plugin_socket(given: &Path) -> (PathBuf, bool) {
    if given.exists() {
        return (given.to_path_buf(), false);
    }
    let name = given.file_name().unwrap_or_default();
    let managed = given
        .parent()
        .and_then(|dir| std::fs::read_dir(dir).ok())
        .and_then(|entries| {
            entries
                .flatten()
                .map(|e| e.path().join(name))
                .find(|p| p.exists())
        });
    match managed {
        Some(p) => (p, true),
        None => (given.to_path_buf(), false),
    }
}

/// `GET /rustoverlay/status` on the plugin's unix socket.
pub(super) async fn from_plugin(socket: &Path) -> anyhow::Result<StatusReport> {
    let (socket, _) = plugin_socket(socket);
    let socket = socket.as_path();
    let ask = async {
        let stream = tokio::net::UnixStream::connect(socket)
            .await
            .with_context(|| format!("connect to the plugin at {}", socket.display()))?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .context("talk HTTP to the plugin")?;
        tokio::spawn(conn);
        let req = hyper::Request::get(STATUS_PATH)
            .header(hyper::header::HOST, "rustoverlay")
            .body(Empty::<Bytes>::new())?;
        let resp = sender.send_request(req).await.context("ask the plugin")?;
        let status = resp.status();
        let body = resp.into_body().collect().await?.to_bytes();
        if !status.is_success() {
            let why = serde_json::from_slice::<serde_json::Value>(&body)
                .ok()
                .and_then(|v| v["Err"].as_str().map(String::from))
                .unwrap_or_else(|| String::from_utf8_lossy(&body).into_owned());
            bail!("the plugin answered {status}: {why}");
        }
        serde_json::from_slice(&body)
            .context("read the plugin's report (is it older than this CLI?)")
    };
    tokio::time::timeout(PLUGIN_LIMIT, ask)
        .await
        .map_err(|_| anyhow::anyhow!("the plugin did not answer within {PLUGIN_LIMIT:?}"))?
}

/// The human form: three short tables and a verdict on this host.
pub fn render(report: &StatusReport, now: u64) -> String {
    let mut out = String::new();
    let c = &report.cluster;
    let _ = writeln!(out, "store: {} (revision {})", report.store, c.revision);
    out.push('\n');
    out.push_str(&hosts_table(c, now));
    out.push('\n');
    out.push_str(&overlays_table(c));
    out.push('\n');
    match &report.local {
        Some(local) => out.push_str(&local_lines(local)),
        None => {
            out.push_str("this host: not checked (read from the store, not through a plugin)\n")
        }
    }
    out
}

fn hosts_table(c: &ClusterView, now: u64) -> String {
    let mut rows = vec![[
        "HOST".to_string(),
        "STATE".into(),
        "VTEP".into(),
        "VERSION".into(),
        "ENDPOINTS".into(),
    ]];
    for h in &c.hosts {
        let state = match (h.alive, h.gone_since) {
            (true, _) => "alive".to_string(),
            (false, Some(t)) => format!("gone {} ago", ago(now.saturating_sub(t))),
            (false, None) => "gone".to_string(),
        };
        rows.push([
            h.host.clone(),
            state,
            h.vtep.map(|v| v.to_string()).unwrap_or_else(|| "-".into()),
            h.version.clone().unwrap_or_else(|| "-".into()),
            h.endpoints.to_string(),
        ]);
    }
    table(&rows)
}

fn overlays_table(c: &ClusterView) -> String {
    if c.overlays.is_empty() {
        return "no overlay\n".into();
    }
    let mut rows = vec![[
        "OVERLAY".to_string(),
        "VNI".into(),
        "NAME".into(),
        "ENDPOINTS".into(),
        "POOL USED/FREE/TOTAL".into(),
    ]];
    for o in &c.overlays {
        let endpoints = if o.endpoints.is_empty() {
            "-".to_string()
        } else {
            o.endpoints
                .iter()
                .map(|(h, n)| format!("{h}:{n}"))
                .collect::<Vec<_>>()
                .join(" ")
        };
        let pools = o
            .pools
            .iter()
            .map(|p| format!("{} {}/{}/{}", p.pool, p.used, p.free(), p.size))
            .collect::<Vec<_>>()
            .join(", ");
        let name = if o.names.is_empty() {
            "-".to_string()
        } else {
            o.names.join(",")
        };
        rows.push([o.overlay.clone(), o.vni.to_string(), name, endpoints, pools]);
    }
    table(&rows)
}

fn local_lines(local: &LocalView) -> String {
    let mut out = String::new();
    if local.in_step {
        let _ = writeln!(
            out,
            "this host ({}, VTEP {}): kernel in step with the store",
            local.host, local.vtep
        );
        lingering_lines(&mut out, local);
        return out;
    }
    let _ = writeln!(
        out,
        "this host ({}, VTEP {}): DRIFT between the kernel and the store",
        local.host, local.vtep
    );
    for d in local.overlays.iter().filter(|d| !d.is_empty()) {
        let _ = writeln!(out, "  {} (vni {}):", d.overlay, d.vni);
        for e in &d.missing_fdb {
            let _ = writeln!(out, "    missing fdb    {} -> {}", e.mac, e.vtep);
        }
        for e in &d.missing_neigh {
            let _ = writeln!(out, "    missing neigh  {} -> {}", e.ip, e.mac);
        }
        for m in &d.stale_fdb {
            let _ = writeln!(out, "    stale fdb      {m}");
        }
        for ip in &d.stale_neigh {
            let _ = writeln!(out, "    stale neigh    {ip}");
        }
    }
    for b in &local.broken {
        let _ = writeln!(out, "  {} (vni {}): BROKEN, {}", b.overlay, b.vni, b.why);
    }
    for vni in &local.namespaces_without_endpoints {
        let _ = writeln!(out, "  namespace ro-{vni} has no local endpoint");
    }
    lingering_lines(&mut out, local);
    out.push_str(
        "  peer sync repairs entries within seconds; if this stays, see the plugin's log\n",
    );
    out
}

fn lingering_lines(out: &mut String, local: &LocalView) {
    for vni in &local.lingering {
        let _ = writeln!(
            out,
            "  ro-{vni}: no local container; its devices linger (--linger), then go"
        );
    }
}

fn ago(secs: u64) -> String {
    match secs {
        0..=119 => format!("{secs}s"),
        120..=7199 => format!("{}m", secs / 60),
        _ => format!("{}h", secs / 3600),
    }
}

/// Left-aligned columns, two spaces apart.
fn table<const N: usize>(rows: &[[String; N]]) -> String {
    let mut widths = [0usize; N];
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    for row in rows {
        let line: Vec<String> = row
            .iter()
            .zip(widths)
            .map(|(cell, w)| format!("{cell:<w$}"))
            .collect();
        let _ = writeln!(out, "{}", line.join("  ").trim_end());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::control::ipam::PoolUsage;
    use crate::control::status::{HostView, OverlayView};
    use std::collections::BTreeMap;

    #[test]
    fn the_table_shows_hosts_overlays_and_the_verdict() {
        let report = StatusReport {
            version: "0.1.0".into(),
            store: "etcd".into(),
            cluster: ClusterView {
                revision: 42,
                hosts: vec![
                    HostView {
                        host: "h1".into(),
                        alive: true,
                        vtep: Some("10.0.0.1".parse().unwrap()),
                        version: Some("0.1.0".into()),
                        endpoints: 2,
                        gone_since: None,
                    },
                    HostView {
                        host: "h3".into(),
                        alive: false,
                        vtep: None,
                        version: None,
                        endpoints: 1,
                        gone_since: Some(1000),
                    },
                ],
                overlays: vec![OverlayView {
                    overlay: "10.77.0.0_24".into(),
                    vni: 256,
                    subnets: vec!["10.77.0.0/24".parse().unwrap()],
                    networks: BTreeMap::new(),
                    names: vec!["shared".into()],
                    endpoints: BTreeMap::from([("h1".into(), 2), ("h3".into(), 1)]),
                    pools: vec![PoolUsage {
                        pool: "10.77.0.0/24".into(),
                        used: 4,
                        size: 254,
                    }],
                }],
            },
            local: None,
        };
        let text = render(&report, 1300);
        assert!(text.contains("h3    gone 5m ago"), "{text}");
        assert!(
            text.contains("10.77.0.0_24  256  shared  h1:2 h3:1  10.77.0.0/24 4/250/254"),
            "{text}"
        );
        assert!(text.contains("this host: not checked"), "{text}");
    }
}
