//! Test support: a simulated host (a network namespace the test makes, with
//! the real plugin binary serving inside it) and a client for the plugin's
//! unix socket. Everything a test makes is removed when it is dropped, also
//! when the test fails.
#![allow(dead_code)]

pub mod calls;
pub mod proxy;

use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;

static COUNTER: AtomicUsize = AtomicUsize::new(0);

/// Fail loudly when the tier cannot run.
pub fn require_root() {
    assert!(
        nix::unistd::Uid::effective().is_root(),
        "this test needs root (network namespaces); run it through scripts/test"
    );
}

/// [`Netns::block`] by the namespace's name (for a thread that cuts and
/// mends a link while the test goes on).
pub fn block_ip(ns: &str, ip: &str, blocked: bool) {
    if blocked {
        iptables_drop(ns, "-I", &["INPUT", "1", "-s", ip]);
        iptables_drop(ns, "-I", &["OUTPUT", "1", "-d", ip]);
    } else {
        iptables_drop(ns, "-D", &["INPUT", "-s", ip]);
        iptables_drop(ns, "-D", &["OUTPUT", "-d", ip]);
    }
}

/// Drop only what comes from `ip` into namespace `ns` (iptables INPUT): the
/// host's requests still get there and are acted on, their answers are
/// lost.
pub fn block_answers_from(ns: &str, ip: &str, blocked: bool) {
    if blocked {
        iptables_drop(ns, "-I", &["INPUT", "1", "-s", ip]);
    } else {
        iptables_drop(ns, "-D", &["INPUT", "-s", ip]);
    }
}

fn iptables_drop(ns: &str, op: &str, rule: &[&str]) {
    let mut args = vec!["netns", "exec", ns, "iptables", "-w", "5", op];
    args.extend_from_slice(rule);
    args.extend_from_slice(&["-j", "DROP"]);
    run("ip", &args);
}

fn run(cmd: &str, args: &[&str]) {
    let out = Command::new(cmd)
        .args(args)
        .output()
        .expect("spawn a setup command");
    assert!(
        out.status.success(),
        "{cmd} {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A network namespace with an underlay veth (10.250.<n>.1/24, MTU 1500) and
/// a default route, like a host on a LAN.
pub struct Netns {
    pub name: String,
    pub vtep: String,
}

impl Netns {
    pub fn new() -> Netns {
        require_root();
        let n = COUNTER.fetch_add(1, Ordering::SeqCst);
        let name = format!("rotest-{}-{n}", std::process::id());
        run("ip", &["netns", "add", &name]);
        let octet = n % 250;
        let ns = Netns {
            name,
            vtep: format!("10.250.{octet}.1"),
        };
        let net = ns.name.clone();
        run("ip", &["-n", &net, "link", "set", "lo", "up"]);
        run(
            "ip",
            &[
                "-n", &net, "link", "add", "ul0", "mtu", "1500", "type", "veth", "peer", "name",
                "ul1",
            ],
        );
        run(
            "ip",
            &[
                "-n",
                &net,
                "addr",
                "add",
                &format!("{}/24", ns.vtep),
                "dev",
                "ul0",
            ],
        );
        run("ip", &["-n", &net, "link", "set", "ul0", "up"]);
        run("ip", &["-n", &net, "link", "set", "ul1", "up"]);
        let gw = format!("10.250.{octet}.254");
        run(
            "ip",
            &[
                "-n", &net, "route", "add", "default", "via", &gw, "dev", "ul0",
            ],
        );
        ns
    }

    /// Drop every packet between this host and `ip`, both ways (iptables
    /// in this namespace only): a partition between the two while the rest
    /// of the underlay stays reachable. TCP hangs and times out.
    pub fn block(&self, ip: &str) {
        block_ip(&self.name, ip, true);
    }

    pub fn unblock(&self, ip: &str) {
        block_ip(&self.name, ip, false);
    }

    /// Cut (or mend) this host's underlay cable: nothing in or out on
    /// `ul0`, as if the machine were off, while its processes live on.
    pub fn cable(&self, connected: bool) {
        let (op, at): (&str, &[&str]) = if connected {
            ("-D", &[])
        } else {
            ("-I", &["1"])
        };
        for (chain, dir) in [("INPUT", "-i"), ("OUTPUT", "-o")] {
            let mut rule = vec![chain];
            rule.extend_from_slice(at);
            rule.extend([dir, "ul0"]);
            self.iptables(op, &rule);
        }
    }

    fn iptables(&self, op: &str, rule: &[&str]) {
        iptables_drop(&self.name, op, rule);
    }

    /// Names of the links in the namespace.
    pub fn links(&self) -> Vec<String> {
        let out = Command::new("ip")
            .args(["-n", &self.name, "-o", "link", "show"])
            .output()
            .expect("ip link");
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|l| l.split(':').nth(1))
            .map(|s| s.trim().split('@').next().unwrap_or("").to_string())
            .collect()
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

/// The real plugin binary serving inside a namespace, in a private mount
/// namespace with its own tmpfs for runtime state.
pub struct Plugin {
    child: Option<Child>,
    /// Owns the private mount namespace the plugin runs in, so that the
    /// overlays' namespace mounts outlive a plugin restart, as on a real host.
    holder: Option<Child>,
    pub socket: PathBuf,
    pub store_url: String,
    pub host_id: String,
    dir: PathBuf,
    netns: String,
    log: PathBuf,
}

impl Plugin {
    pub fn dir_for(label: &str) -> PathBuf {
        let n = COUNTER.fetch_add(1, Ordering::SeqCst);
        let dir = std::env::temp_dir().join(format!("rotest-{label}-{}-{n}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    /// Start with the embedded store in `dir` (so a restart finds its state).
    pub async fn start(ns: &Netns, dir: &Path, host_id: &str) -> Plugin {
        let store_url = format!("file://{}/state.redb", dir.display());
        Self::start_with(ns, dir, host_id, &store_url, &[]).await
    }

    pub async fn start_with(
        ns: &Netns,
        dir: &Path,
        host_id: &str,
        store_url: &str,
        extra: &[&str],
    ) -> Plugin {
        let mut p = Plugin::unstarted(ns, dir, host_id, store_url);
        p.spawn(extra).await;
        p
    }

    /// A plugin not started yet.
    fn unstarted(ns: &Netns, dir: &Path, host_id: &str, store_url: &str) -> Plugin {
        Plugin {
            child: None,
            holder: None,
            socket: dir.join("plugin.sock"),
            store_url: store_url.to_string(),
            host_id: host_id.to_string(),
            dir: dir.to_path_buf(),
            netns: ns.name.clone(),
            log: dir.join(format!("plugin-{host_id}.log")),
        }
    }

    async fn spawn(&mut self, extra: &[&str]) {
        self.launch(extra);
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if UnixStream::connect(&self.socket).await.is_ok() {
                return;
            }
            if let Some(status) = self.child.as_mut().unwrap().try_wait().unwrap() {
                panic!("plugin exited with {status} at start:\n{}", self.log_text());
            }
            assert!(
                Instant::now() < deadline,
                "plugin did not listen within 20 s:\n{}",
                self.log_text()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Start a plugin that is expected to refuse to run: wait (up to
    /// `within`) for it to exit; returns its status, its log and how long
    /// it ran. Panics if it is still running after `within`.
    pub async fn run_to_exit(
        ns: &Netns,
        dir: &Path,
        host_id: &str,
        store_url: &str,
        extra: &[&str],
        within: Duration,
    ) -> (std::process::ExitStatus, String, Duration) {
        let mut p = Plugin::unstarted(ns, dir, host_id, store_url);
        let started = Instant::now();
        p.launch(extra);
        loop {
            if let Some(status) = p.child.as_mut().unwrap().try_wait().unwrap() {
                p.child = None;
                return (status, p.log_text(), started.elapsed());
            }
            assert!(
                started.elapsed() < within,
                "plugin still runs after {within:?}:\n{}",
                p.log_text()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Start the plugin process (in the holder's mount namespace and the
    /// host's network namespace) without waiting for it.
    fn launch(&mut self, extra: &[&str]) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .unwrap();
        if self.holder.is_none() {
            let holder = Command::new("unshare")
                .args([
                    "--mount",
                    "--propagation",
                    "private",
                    "--",
                    "sleep",
                    "1000000",
                ])
                .stdin(Stdio::null())
                .spawn()
                .expect("start the mount namespace holder");
            let ns = format!("/proc/{}/ns/mnt", holder.id());
            self.holder = Some(holder);
            // Wait until the holder has entered its own mount namespace.
            let own = std::fs::read_link("/proc/self/ns/mnt").ok();
            let deadline = Instant::now() + Duration::from_secs(5);
            while std::fs::read_link(&ns).ok() == own {
                assert!(
                    Instant::now() < deadline,
                    "mount namespace holder did not start"
                );
                std::thread::sleep(Duration::from_millis(5));
            }
        }
        let holder = self.holder.as_ref().unwrap().id();
        let mut args: Vec<String> = vec![
            "-t".into(),
            holder.to_string(),
            "-m".into(),
            format!("--net=/run/netns/{}", self.netns),
            "--".into(),
            env!("CARGO_BIN_EXE_rustoverlay").into(),
            "serve".into(),
            "--socket".into(),
            self.socket.display().to_string(),
            "--store".into(),
            self.store_url.clone(),
            "--host-id".into(),
            self.host_id.clone(),
            "--state-dir".into(),
            self.dir.join("run").display().to_string(),
        ];
        // Devices go with a host's last endpoint (the tests check that),
        // unless a test asks for the linger users get by default.
        if !extra.iter().any(|a| a.starts_with("--linger")) {
            args.extend(["--linger".into(), "0".into()]);
        }
        args.extend(extra.iter().map(|s| s.to_string()));
        let child = Command::new("nsenter")
            .args(&args)
            .env(
                "RUSTOVERLAY_LOG",
                std::env::var("ROTEST_LOG").unwrap_or_else(|_| "info".into()),
            )
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("start the plugin");
        self.child = Some(child);
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("running").id()
    }

    /// SIGKILL, as a crash.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM and wait, as a clean stop.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(c.id() as i32),
                nix::sys::signal::Signal::SIGTERM,
            );
            let deadline = Instant::now() + Duration::from_secs(10);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = c.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub async fn restart(&mut self, ns: &Netns) {
        assert!(self.child.is_none(), "stop or kill the plugin first");
        let _ = ns;
        self.spawn(&[]).await;
    }

    pub fn client(&self) -> Client {
        Client {
            socket: self.socket.clone(),
        }
    }
}

impl Drop for Plugin {
    fn drop(&mut self) {
        self.kill();
        if let Some(mut h) = self.holder.take() {
            let _ = h.kill();
            let _ = h.wait();
        }
        if std::thread::panicking() {
            eprintln!("--- plugin log ({}) ---\n{}", self.host_id, self.log_text());
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A minimal HTTP/1.1 client for the plugin socket, as Docker's: POST, JSON
/// body, no Content-Type.
#[derive(Clone)]
pub struct Client {
    pub socket: PathBuf,
}

pub struct Reply {
    pub status: u16,
    pub body: Value,
}

impl Reply {
    pub fn ok(self) -> Value {
        assert_eq!(
            self.status, 200,
            "expected success, got {} {}",
            self.status, self.body
        );
        self.body
    }

    /// The error message, asserting a non-200 status and Docker's shape.
    pub fn err(self) -> String {
        assert_ne!(self.status, 200, "expected an error, got {}", self.body);
        self.body["Err"]
            .as_str()
            .unwrap_or_else(|| panic!("error without Err field: {}", self.body))
            .to_string()
    }
}

impl Client {
    pub async fn raw(&self, method: &str, body: &[u8]) -> Reply {
        let mut s =
            tokio::time::timeout(Duration::from_secs(30), UnixStream::connect(&self.socket))
                .await
                .expect("connect in time")
                .expect("connect to the plugin socket");
        let head = format!(
            "POST /{method} HTTP/1.1\r\nHost: plugin\r\nAccept: application/vnd.docker.plugins.v1.2+json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
            body.len()
        );
        s.write_all(head.as_bytes()).await.unwrap();
        s.write_all(body).await.unwrap();
        let mut buf = Vec::new();
        tokio::time::timeout(Duration::from_secs(60), s.read_to_end(&mut buf))
            .await
            .expect("the plugin answered in time")
            .expect("read the reply");
        let text = String::from_utf8_lossy(&buf);
        let (head, body) = text.split_once("\r\n\r\n").expect("an HTTP reply");
        let status: u16 = head.split_whitespace().nth(1).unwrap().parse().unwrap();
        let body = if body.trim().is_empty() {
            Value::Null
        } else {
            serde_json::from_str(body).unwrap_or_else(|_| Value::String(body.to_string()))
        };
        Reply { status, body }
    }

    pub async fn call(&self, method: &str, body: Value) -> Reply {
        self.raw(method, body.to_string().as_bytes()).await
    }

    pub async fn request_pool(&self, pool: &str) -> Reply {
        self.call(
            "IpamDriver.RequestPool",
            serde_json::json!({"AddressSpace": "RustOverlayLocal", "Pool": pool, "SubPool": "", "Options": {}, "V6": false}),
        )
        .await
    }

    /// A container's address, as Docker 20.10 asks for it (no options).
    pub async fn request_address(&self, pool_id: &str, address: &str) -> Reply {
        self.call(
            "IpamDriver.RequestAddress",
            serde_json::json!({"PoolID": pool_id, "Address": address, "Options": {}}),
        )
        .await
    }

    /// A network's aux address, as Docker reserves it before CreateNetwork:
    /// no options.
    pub async fn request_aux(&self, pool_id: &str, address: &str) -> Reply {
        self.call(
            "IpamDriver.RequestAddress",
            serde_json::json!({"PoolID": pool_id, "Address": address, "Options": null}),
        )
        .await
    }

    pub async fn request_gateway(&self, pool_id: &str) -> Reply {
        self.call(
            "IpamDriver.RequestAddress",
            serde_json::json!({"PoolID": pool_id, "Address": "", "Options": {"RequestAddressType": "com.docker.network.gateway"}}),
        )
        .await
    }

    pub async fn release_address(&self, pool_id: &str, address: &str) -> Reply {
        self.call(
            "IpamDriver.ReleaseAddress",
            serde_json::json!({"PoolID": pool_id, "Address": address}),
        )
        .await
    }

    pub async fn release_pool(&self, pool_id: &str) -> Reply {
        self.call(
            "IpamDriver.ReleasePool",
            serde_json::json!({"PoolID": pool_id}),
        )
        .await
    }
}

/// Every key under rustoverlay's prefix in an embedded store file (the plugin
/// owning it must be stopped).
pub async fn store_keys(dir: &Path) -> Vec<String> {
    let store =
        kvstore_backends::RedbStore::open(dir.join("state.redb")).expect("open the store file");
    use kvstore_backends::KvStore;
    store
        .range(rustoverlay::state::keys::ROOT)
        .await
        .unwrap()
        .kvs
        .into_iter()
        .map(|kv| kv.key)
        .collect()
}

/// A LAN: a namespace holding a bridge (10.251.0.254/24) that simulated
/// hosts join, with a real etcd listening on the bridge address.
pub struct Lan {
    pub name: String,
    dir: PathBuf,
    etcd: Option<Child>,
    consul: Option<Child>,
}

/// Which shared store a multi-host test runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Store {
    Etcd,
    /// The test-only Consul server (consul-test-server), following Consul's
    /// documented HTTP API.
    Consul,
}

pub const LAN_GATEWAY: &str = "10.251.0.254";

impl Lan {
    pub fn new() -> Lan {
        require_root();
        let n = COUNTER.fetch_add(1, Ordering::SeqCst);
        let name = format!("rolan-{}-{n}", std::process::id());
        run("ip", &["netns", "add", &name]);
        let lan = Lan {
            dir: Plugin::dir_for("lan"),
            name,
            etcd: None,
            consul: None,
        };
        run("ip", &["-n", &lan.name, "link", "set", "lo", "up"]);
        run(
            "ip",
            &["-n", &lan.name, "link", "add", "br0", "type", "bridge"],
        );
        run(
            "ip",
            &[
                "-n",
                &lan.name,
                "addr",
                "add",
                &format!("{LAN_GATEWAY}/24"),
                "dev",
                "br0",
            ],
        );
        run("ip", &["-n", &lan.name, "link", "set", "br0", "up"]);
        lan
    }

    /// Move this process onto the LAN, to reach its stores and hosts as
    /// they reach each other (benchmarks). Call it before a runtime starts,
    /// so that every runtime thread inherits the namespace.
    pub fn enter(&self) {
        let ns = std::fs::File::open(format!("/run/netns/{}", self.name)).unwrap();
        nix::sched::setns(&ns, nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
    }

    pub fn etcd_url(&self) -> String {
        format!("etcd://{LAN_GATEWAY}:2379")
    }

    /// The running etcd's process (`ip netns exec` execs it) and data
    /// directory: for benchmarks of its CPU time and database size.
    pub fn etcd_process(&self) -> Option<(u32, PathBuf)> {
        let pid = self.etcd.as_ref()?.id();
        Some((pid, self.dir.join("etcd-data")))
    }

    /// Start the given store on the LAN and return its URL for the plugins.
    pub async fn start_store(&mut self, store: Store) -> String {
        match store {
            Store::Etcd => {
                self.start_etcd().await;
                self.etcd_url()
            }
            Store::Consul => {
                self.start_consul().await;
                format!("consul://{LAN_GATEWAY}:8500")
            }
        }
    }

    /// The extra plugin arguments a store needs (Consul's minimum session
    /// TTL, configured low on the test server so liveness tests stay short).
    pub fn plugin_args(store: Store) -> Vec<&'static str> {
        match store {
            Store::Etcd => vec![],
            Store::Consul => vec!["--consul-session-ttl-min", "1"],
        }
    }

    /// The test-only Consul server on the LAN.
    pub async fn start_consul(&mut self) {
        assert!(self.consul.is_none(), "consul already runs");
        // Next to this test's executable: target/<profile>/consul-test-server.
        let exe = std::env::current_exe().unwrap();
        let bin = exe
            .parent()
            .and_then(|d| d.parent())
            .unwrap()
            .join("consul-test-server");
        assert!(
            bin.exists(),
            "{} is missing: build it with `cargo build -p consul-test-server` (scripts/test does)",
            bin.display()
        );
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("consul.log"))
            .unwrap();
        let child = Command::new("ip")
            .args(["netns", "exec", &self.name])
            .arg(&bin)
            .args([
                "--listen",
                &format!("{LAN_GATEWAY}:8500"),
                "--in-test-namespace",
                "--session-ttl-min",
                "1s",
                // Consul reaps tombstones 15 s after a delete; sooner here,
                // so that list indexes go backwards during the tests too.
                "--tombstone-ttl",
                "2s",
            ])
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("start consul-test-server");
        self.consul = Some(child);
        let deadline = Instant::now() + Duration::from_secs(20);
        let probe = format!("exec 3<>/dev/tcp/{LAN_GATEWAY}/8500");
        while !Command::new("ip")
            .args(["netns", "exec", &self.name, "bash", "-c", &probe])
            .stderr(Stdio::null())
            .status()
            .map(|s| s.success())
            .unwrap_or(false)
        {
            assert!(
                Instant::now() < deadline,
                "consul-test-server did not listen within 20 s"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Start (or restart, on the same data) etcd on the LAN.
    pub async fn start_etcd(&mut self) {
        assert!(self.etcd.is_none(), "etcd already runs");
        let bin = std::env::var("ETCD_BIN").unwrap_or_else(|_| "etcd".into());
        let client = format!("http://{LAN_GATEWAY}:2379");
        let peer = format!("http://{LAN_GATEWAY}:2380");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("etcd.log"))
            .unwrap();
        let child = Command::new("ip")
            .args(["netns", "exec", &self.name, &bin])
            .args(["--name", "lan", "--data-dir"])
            .arg(self.dir.join("etcd-data"))
            .args([
                "--listen-client-urls",
                &client,
                "--advertise-client-urls",
                &client,
            ])
            .args([
                "--listen-peer-urls",
                &peer,
                "--initial-advertise-peer-urls",
                &peer,
            ])
            .args(["--initial-cluster", &format!("lan={peer}")])
            .args(["--logger", "zap", "--log-level", "error"])
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("start {bin} (install Debian's etcd-server): {e}"));
        self.etcd = Some(child);
        let deadline = Instant::now() + Duration::from_secs(20);
        let probe = format!("exec 3<>/dev/tcp/{LAN_GATEWAY}/2379");
        loop {
            let ok = Command::new("ip")
                .args(["netns", "exec", &self.name, "bash", "-c", &probe])
                .stderr(Stdio::null())
                .status()
                .map(|s| s.success())
                .unwrap_or(false);
            if ok {
                return;
            }
            if let Some(status) = self.etcd.as_mut().unwrap().try_wait().unwrap() {
                panic!(
                    "etcd exited with {status}:\n{}",
                    std::fs::read_to_string(self.dir.join("etcd.log")).unwrap_or_default()
                );
            }
            assert!(Instant::now() < deadline, "etcd did not listen within 20 s");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Freeze (SIGSTOP) or thaw (SIGCONT) the store that runs on this LAN,
    /// etcd or Consul: frozen, it keeps every connection open and answers
    /// nothing, as a hung store; its clock goes on, so what expired meanwhile
    /// expires when it thaws.
    pub fn freeze_store(&self, frozen: bool) {
        let child = self
            .etcd
            .as_ref()
            .or(self.consul.as_ref())
            .expect("a store runs on the LAN");
        let signal = if frozen {
            nix::sys::signal::Signal::SIGSTOP
        } else {
            nix::sys::signal::Signal::SIGCONT
        };
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(child.id() as i32), signal)
            .expect("signal the store");
    }

    pub fn stop_etcd(&mut self) {
        if let Some(mut c) = self.etcd.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// A host namespace on this LAN at 10.251.0.<n>/24 (MTU 1500).
    pub fn host(&self, n: u8) -> Netns {
        let name = format!(
            "rohost-{}-{n}-{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::SeqCst)
        );
        run("ip", &["netns", "add", &name]);
        let ns = Netns {
            name: name.clone(),
            vtep: format!("10.251.0.{n}"),
        };
        let peer = format!("rl{n}-{}", COUNTER.fetch_add(1, Ordering::SeqCst));
        run("ip", &["-n", &name, "link", "set", "lo", "up"]);
        run(
            "ip",
            &[
                "-n", &name, "link", "add", "ul0", "mtu", "1500", "type", "veth", "peer", "name",
                &peer,
            ],
        );
        run(
            "ip",
            &["-n", &name, "link", "set", &peer, "netns", &self.name],
        );
        run(
            "ip",
            &[
                "-n", &self.name, "link", "set", &peer, "master", "br0", "up",
            ],
        );
        run(
            "ip",
            &[
                "-n",
                &name,
                "addr",
                "add",
                &format!("{}/24", ns.vtep),
                "dev",
                "ul0",
            ],
        );
        run("ip", &["-n", &name, "link", "set", "ul0", "up"]);
        run(
            "ip",
            &["-n", &name, "route", "add", "default", "via", LAN_GATEWAY],
        );
        ns
    }
}

impl Drop for Lan {
    fn drop(&mut self) {
        self.stop_etcd();
        if let Some(mut c) = self.consul.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A bare namespace standing in for a container's sandbox.
pub struct Sandbox {
    pub name: String,
}

impl Sandbox {
    pub fn new() -> Sandbox {
        let name = format!(
            "rosbx-{}-{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::SeqCst)
        );
        run("ip", &["netns", "add", &name]);
        run("ip", &["-n", &name, "link", "set", "lo", "up"]);
        Sandbox { name }
    }

    /// Do what Docker does after Join: move the interface in, name it eth0,
    /// give it its address.
    pub fn take(&self, host: &Netns, src: &str, cidr: &str) {
        run(
            "ip",
            &["-n", &host.name, "link", "set", src, "netns", &self.name],
        );
        run(
            "ip",
            &["-n", &self.name, "link", "set", src, "name", "eth0"],
        );
        run(
            "ip",
            &["-n", &self.name, "addr", "add", cidr, "dev", "eth0"],
        );
        run("ip", &["-n", &self.name, "link", "set", "eth0", "up"]);
    }

    pub fn ping(&self, ip: &str) -> bool {
        Command::new("ip")
            .args([
                "netns", "exec", &self.name, "busybox", "ping", "-c", "1", "-W", "2", ip,
            ])
            .stdout(Stdio::null())
            .status()
            .map(|s| s.success())
            .unwrap_or(false)
    }
}

impl Drop for Sandbox {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

impl Plugin {
    /// Run a command inside the overlay namespace this plugin made for `vni`
    /// (the namespace's mount is only visible in the plugin's mount namespace).
    pub fn in_overlay(&self, vni: u32, cmd: &[&str]) -> String {
        let ns = self.dir.join("run").join("netns").join(format!("ro-{vni}"));
        let out = Command::new("nsenter")
            .arg("-t")
            .arg(self.holder.as_ref().expect("started").id().to_string())
            .arg("-m")
            .arg("--")
            .arg("nsenter")
            .arg(format!("--net={}", ns.display()))
            .arg("--")
            .args(cmd)
            .output()
            .expect("nsenter");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// The overlay namespace for `vni` as a path any process can open: seen
    /// through the mount namespace that holds its bind mount.
    pub fn overlay_ns_path(&self, vni: u32) -> PathBuf {
        let holder = self.holder.as_ref().expect("started").id();
        let inner = self.dir.join("run").join("netns").join(format!("ro-{vni}"));
        PathBuf::from(format!("/proc/{holder}/root{}", inner.display()))
    }

    /// Whether this plugin has devices for `vni`.
    pub fn has_overlay(&self, vni: u32) -> bool {
        let ns = self.dir.join("run").join("netns").join(format!("ro-{vni}"));
        Command::new("nsenter")
            .arg("-t")
            .arg(self.holder.as_ref().expect("started").id().to_string())
            .arg("-m")
            .arg("--")
            .arg("nsenter")
            .arg(format!("--net={}", ns.display()))
            .arg("true")
            .stderr(Stdio::null())
            .status()
            .map(|s| s.success())
            .unwrap_or(false)
    }
}

/// Keys under `prefix` (relative to rustoverlay's root) in a networked store,
/// read with `rustoverlay dump` from inside a host namespace.
pub fn dump_keys(ns: &Netns, store_url: &str, prefix: &str) -> Vec<String> {
    dump(ns, store_url, prefix)
        .into_iter()
        .map(|(k, _)| k)
        .collect()
}

/// `rustoverlay dump`: (key, value) pairs under `prefix`.
pub fn dump(ns: &Netns, store_url: &str, prefix: &str) -> Vec<(String, String)> {
    let out = Command::new("ip")
        .args([
            "netns",
            "exec",
            &ns.name,
            env!("CARGO_BIN_EXE_rustoverlay"),
            "dump",
            "--store",
            store_url,
            "--prefix",
            prefix,
        ])
        .output()
        .expect("run rustoverlay dump");
    assert!(
        out.status.success(),
        "dump failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| {
            let (k, v) = l.split_once(' ').unwrap_or((l, ""));
            (!k.is_empty()).then(|| (k.to_string(), v.to_string()))
        })
        .collect()
}
