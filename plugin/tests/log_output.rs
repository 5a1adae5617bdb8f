//! The log of `rustoverlay serve` written to files, as systemd's journal,
//! a log collector or dockerd (a managed plugin's output comes through
//! pipes) get it: no ANSI escape character anywhere, not even from request
//! fields that carry one; with `--log-format json` every line is one JSON
//! object, the fatal error included; with `--log-target stdout` (what the
//! managed plugin's config.json sets) the log is on stdout and stderr stays
//! empty unless the plugin fails.
//!
//! The real binary serves in a network namespace the test makes (and a
//! mount namespace of its own), on the embedded store in a temporary
//! directory, and gets Docker's calls for a network and a container.

mod support;

use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};
use support::{calls, Client, Netns, Plugin};

const ESC: u8 = 0x1b;

/// One `rustoverlay serve` with stdout and stderr each going to a file.
struct Served {
    child: Option<Child>,
    dir: PathBuf,
    socket: PathBuf,
}

impl Served {
    fn launch(ns: &Netns, label: &str, extra: &[&str], env: &[(&str, &str)]) -> Served {
        let dir = Plugin::dir_for(label);
        let socket = dir.join("plugin.sock");
        let out = std::fs::File::create(dir.join("stdout")).unwrap();
        let err = std::fs::File::create(dir.join("stderr")).unwrap();
        let mut cmd = Command::new("unshare");
        cmd.args(["--mount", "--propagation", "private", "--", "nsenter"])
            .arg(format!("--net=/run/netns/{}", ns.name))
            .arg("--")
            .arg(env!("CARGO_BIN_EXE_rustoverlay"))
            .arg("serve")
            .arg("--socket")
            .arg(&socket)
            .arg("--store")
            .arg(format!("file://{}/state.redb", dir.display()))
            .arg("--host-id")
            .arg("h1")
            .arg("--state-dir")
            .arg(dir.join("run"))
            .args(extra)
            // Debug: every request's span and more lines to check.
            .env("RUSTOVERLAY_LOG", "info,rustoverlay=debug")
            .env_remove("NO_COLOR")
            .env_remove("RUSTOVERLAY_LOG_FORMAT")
            .env_remove("RUSTOVERLAY_LOG_TARGET")
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err);
        let child = cmd.spawn().expect("start rustoverlay serve");
        Served {
            child: Some(child),
            dir,
            socket,
        }
    }

    fn stdout(&self) -> Vec<u8> {
        std::fs::read(self.dir.join("stdout")).unwrap_or_default()
    }

    fn stderr(&self) -> Vec<u8> {
        std::fs::read(self.dir.join("stderr")).unwrap_or_default()
    }

    fn shown(&self) -> String {
        format!(
            "--- stdout ---\n{}\n--- stderr ---\n{}",
            String::from_utf8_lossy(&self.stdout()),
            String::from_utf8_lossy(&self.stderr())
        )
    }

    async fn wait_listening(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while tokio::net::UnixStream::connect(&self.socket).await.is_err() {
            if let Some(status) = self.child.as_mut().unwrap().try_wait().unwrap() {
                panic!("plugin exited with {status} at start:\n{}", self.shown());
            }
            assert!(
                Instant::now() < deadline,
                "plugin did not listen within 20 s:\n{}",
                self.shown()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Wait for the process to exit (it is expected to), up to 20 s.
    fn wait_exit(&mut self) -> ExitStatus {
        let child = self.child.as_mut().unwrap();
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                self.child = None;
                return status;
            }
            assert!(Instant::now() < deadline, "plugin still runs after 20 s");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGTERM, as systemd or dockerd stop it; returns how it exited.
    fn stop(&mut self) -> ExitStatus {
        let pid = self.child.as_ref().unwrap().id() as i32;
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGTERM,
        );
        self.wait_exit()
    }

    fn client(&self) -> Client {
        Client {
            socket: self.socket.clone(),
        }
    }
}

impl Drop for Served {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        if std::thread::panicking() {
            eprintln!("{}", self.shown());
        }
        remove_tree(&self.dir);
    }
}

/// Remove the test's directory (its state dir held namespace mounts only
/// in the plugin's own mount namespace, gone with the plugin).
fn remove_tree(dir: &Path) {
    let _ = std::fs::remove_dir_all(dir);
}

/// Docker's calls for a network and a container on it, one refused call
/// whose input carries an escape sequence, then everything removed: log
/// lines at info, debug and warn level, inside request spans.
async fn docker_calls(c: &Client) {
    c.call("Plugin.Activate", json!({})).await.ok();
    calls::create_network(c, "net1").await;
    let (addr, _, _) = calls::join(c, "net1", "ep1").await;
    // Refused, and logged with the offending value (tracing must escape it).
    let refused = c
        .call(
            "IpamDriver.RequestPool",
            json!({"Pool": "\u{1b}[31m10.78.0.0/24\u{1b}[0m"}),
        )
        .await
        .err();
    assert!(!refused.is_empty());
    c.call(
        "NetworkDriver.Leave",
        json!({"NetworkID": "net1", "EndpointID": "ep1"}),
    )
    .await
    .ok();
    c.call(
        "NetworkDriver.DeleteEndpoint",
        json!({"NetworkID": "net1", "EndpointID": "ep1"}),
    )
    .await
    .ok();
    c.release_address(calls::POOL, addr.split('/').next().unwrap())
        .await
        .ok();
    c.call("NetworkDriver.DeleteNetwork", json!({"NetworkID": "net1"}))
        .await
        .ok();
    c.release_pool(calls::POOL).await.ok();
}

fn assert_no_escape(what: &str, bytes: &[u8]) {
    if let Some(at) = bytes.iter().position(|&b| b == ESC) {
        let from = at.saturating_sub(120);
        panic!(
            "{what} holds an escape character (0x1b) at byte {at}: ...{}...",
            String::from_utf8_lossy(&bytes[from..(at + 40).min(bytes.len())])
        );
    }
}

/// Every line parses as a JSON object with a level and fields; returns them.
fn json_lines(what: &str, bytes: &[u8]) -> Vec<Value> {
    let text = std::str::from_utf8(bytes).unwrap_or_else(|e| panic!("{what} is not UTF-8: {e}"));
    assert!(text.ends_with('\n'), "{what} ends in a partial line");
    text.lines()
        .enumerate()
        .map(|(i, line)| {
            let v: Value = serde_json::from_str(line)
                .unwrap_or_else(|e| panic!("{what}, line {}: not JSON ({e}): {line:?}", i + 1));
            assert!(
                v.is_object() && v["level"].is_string() && v["fields"].is_object(),
                "{what}, line {}: not a log event: {line}",
                i + 1
            );
            v
        })
        .collect()
}

fn message(v: &Value) -> &str {
    v["fields"]["message"].as_str().unwrap_or("")
}

#[tokio::test]
#[ignore = "needs root: scripts/test runs this tier"]
async fn text_log_in_a_file_has_no_escape_character() {
    let ns = Netns::new();
    let mut p = Served::launch(&ns, "log-text", &[], &[]);
    p.wait_listening().await;
    docker_calls(&p.client()).await;
    let status = p.stop();
    assert!(status.success(), "exit {status}:\n{}", p.shown());

    let err = p.stderr();
    let text = String::from_utf8_lossy(&err).into_owned();
    for expected in ["serving", "request refused", "stopped"] {
        assert!(
            text.contains(expected),
            "no {expected:?} in the log:\n{text}"
        );
    }
    assert!(
        text.contains("10.78.0.0/24"),
        "the refused value is not in the log:\n{text}"
    );
    assert!(
        text.lines()
            .any(|l| l.contains("DEBUG") && l.contains("request")),
        "no debug line inside a request span:\n{text}"
    );
    assert_no_escape("the log file (stderr)", &err);
    assert!(
        p.stdout().is_empty(),
        "the default target is stderr, yet stdout got:\n{}",
        p.shown()
    );
}

#[tokio::test]
#[ignore = "needs root: scripts/test runs this tier"]
async fn json_log_every_line_is_json() {
    let ns = Netns::new();
    let mut p = Served::launch(&ns, "log-json", &["--log-format", "json"], &[]);
    p.wait_listening().await;
    docker_calls(&p.client()).await;
    let status = p.stop();
    assert!(status.success(), "exit {status}:\n{}", p.shown());

    let err = p.stderr();
    assert_no_escape("the JSON log", &err);
    let events = json_lines("the JSON log (stderr)", &err);
    for expected in ["serving", "request refused", "stopped"] {
        assert!(
            events.iter().any(|v| message(v) == expected),
            "no {expected:?} event in:\n{}",
            p.shown()
        );
    }
    let refused = events
        .iter()
        .find(|v| message(v) == "request refused")
        .unwrap();
    assert!(
        refused["fields"]["error"]
            .as_str()
            .unwrap_or("")
            .contains("10.78.0.0/24"),
        "the refusal's error field: {refused}"
    );
    assert!(
        events
            .iter()
            .any(|v| v["level"] == "DEBUG" && v["span"]["name"] == "request"),
        "no debug event inside a request span:\n{}",
        p.shown()
    );
    assert!(p.stdout().is_empty(), "stdout got:\n{}", p.shown());
}

#[tokio::test]
#[ignore = "needs root: scripts/test runs this tier"]
async fn json_log_of_a_plugin_that_fails_is_json_too() {
    let ns = Netns::new();
    // Exits at start: --host-ttl 0 is refused.
    let mut p = Served::launch(
        &ns,
        "log-json-fail",
        &["--log-format", "json", "--host-ttl", "0"],
        &[],
    );
    let status = p.wait_exit();
    assert!(!status.success(), "--host-ttl 0 was accepted");
    let err = p.stderr();
    let events = json_lines("the JSON log of a failed start (stderr)", &err);
    let fatal = events
        .iter()
        .find(|v| v["level"] == "ERROR" && message(v) == "exiting")
        .unwrap_or_else(|| panic!("no fatal error event:\n{}", p.shown()));
    assert!(
        fatal["fields"]["error"]
            .as_str()
            .unwrap_or("")
            .contains("--host-ttl must be at least 1 second"),
        "the fatal event names the cause: {fatal}"
    );
}

#[tokio::test]
#[ignore = "needs root: scripts/test runs this tier"]
async fn log_target_stdout_leaves_stderr_for_failures() {
    let ns = Netns::new();
    // As config.json sets it for the managed plugin: through the environment.
    let mut p = Served::launch(
        &ns,
        "log-stdout",
        &[],
        &[("RUSTOVERLAY_LOG_TARGET", "stdout")],
    );
    p.wait_listening().await;
    docker_calls(&p.client()).await;
    let status = p.stop();
    assert!(status.success(), "exit {status}:\n{}", p.shown());
    let out = p.stdout();
    let text = String::from_utf8_lossy(&out).into_owned();
    for expected in ["serving", "request refused", "stopped"] {
        assert!(
            text.contains(expected),
            "no {expected:?} on stdout:\n{}",
            p.shown()
        );
    }
    assert_no_escape("the log on stdout", &out);
    assert!(
        p.stderr().is_empty(),
        "stderr (dockerd files it under level=error) got:\n{}",
        p.shown()
    );

    // A fatal error: on stderr as plain text, and in the log on stdout.
    let mut f = Served::launch(
        &ns,
        "log-stdout-fail",
        &["--host-ttl", "0", "--log-format", "json"],
        &[("RUSTOVERLAY_LOG_TARGET", "stdout")],
    );
    assert!(!f.wait_exit().success(), "--host-ttl 0 was accepted");
    let err = String::from_utf8_lossy(&f.stderr()).into_owned();
    assert!(
        err.starts_with("rustoverlay: ") && err.contains("--host-ttl must be at least 1 second"),
        "stderr of a failed start: {err:?}"
    );
    let events = json_lines("the JSON log on stdout of a failed start", &f.stdout());
    assert!(
        events.iter().any(|v| message(v) == "exiting"),
        "no fatal event on stdout:\n{}",
        f.shown()
    );
}
