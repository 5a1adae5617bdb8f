//! `consul-test-server --listen 127.0.0.1:PORT [--acl-token T]
//! [--session-ttl-min D] [--tombstone-ttl D]`
//!
//! TEST SUPPORT ONLY: serves the subset of Consul's HTTP API that
//! rustoverlay's Consul backend uses, in memory, until interrupted. For
//! trying the backend by hand or from shell tests without a Consul binary;
//! never a store for real data.

use std::net::SocketAddr;
use std::process::ExitCode;
use std::time::Duration;

use consul_test_server::{Config, TestServer};

const USAGE: &str =
    "usage: consul-test-server --listen 127.0.0.1:PORT [--in-test-namespace] [--acl-token TOKEN] \
                     [--session-ttl-min 10s] [--tombstone-ttl 15s]";

fn parse_duration(flag: &str, v: &str) -> Result<Duration, String> {
    let (n, unit) = v.split_at(v.find(|c: char| !c.is_ascii_digit()).unwrap_or(v.len()));
    let n: u64 = n
        .parse()
        .map_err(|_| format!("{flag}: bad duration {v:?}"))?;
    match unit {
        "ms" => Ok(Duration::from_millis(n)),
        "s" | "" => Ok(Duration::from_secs(n)),
        "m" => Ok(Duration::from_secs(n * 60)),
        _ => Err(format!("{flag}: bad duration {v:?} (use ms, s or m)")),
    }
}

fn parse_args() -> Result<(SocketAddr, Config), String> {
    let mut listen: Option<SocketAddr> = None;
    let mut in_namespace = false;
    let mut config = Config::default();
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        let mut value = || args.next().ok_or_else(|| format!("{flag} needs a value"));
        match flag.as_str() {
            "--listen" => {
                let v = value()?;
                let addr: SocketAddr = v.parse().map_err(|e| format!("--listen {v}: {e}"))?;
                listen = Some(addr);
            }
            // Simulated hosts reach the server over a namespace's own network:
            // the test that made the namespace says so explicitly.
            "--in-test-namespace" => in_namespace = true,
            "--acl-token" => config.acl_token = Some(value()?),
            "--session-ttl-min" => config.session_ttl_min = parse_duration(&flag, &value()?)?,
            "--tombstone-ttl" => config.tombstone_ttl = Some(parse_duration(&flag, &value()?)?),
            "-h" | "--help" => return Err(USAGE.into()),
            other => return Err(format!("unknown argument {other:?}\n{USAGE}")),
        }
    }
    let listen = listen.ok_or_else(|| format!("--listen is required\n{USAGE}"))?;
    if !listen.ip().is_loopback() && !in_namespace {
        return Err(format!(
            "--listen {listen}: this test server listens on loopback only, or with \
             --in-test-namespace inside a network namespace a test made"
        ));
    }
    Ok((listen, config))
}

#[tokio::main]
async fn main() -> ExitCode {
    let (listen, config) = match parse_args() {
        Ok(v) => v,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::from(2);
        }
    };
    let server = match TestServer::start_on(listen, config).await {
        Ok(s) => s,
        Err(e) => {
            eprintln!("consul-test-server: cannot listen on {listen}: {e}");
            return ExitCode::FAILURE;
        }
    };
    eprintln!(
        "consul-test-server (test support only) listening on http://{}",
        server.address()
    );
    let _ = tokio::signal::ctrl_c().await;
    ExitCode::SUCCESS
}
