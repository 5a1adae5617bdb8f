//! A three-member etcd cluster in network namespaces the test makes, so a
//! member can be cut off from its peers while its clients still reach it.
//!
//! ```text
//! roetcd-<pid>-hub   bridge br0 10.79.0.254/24; the test's client runs here
//! roetcd-<pid>-mN    eth0 10.79.0.N/24 cabled to br0; etcd member mN with
//!                    client :2379 and peer :2380 on that address
//! ```
//!
//! Cutting member N drops every packet to or from a peer port (2380) with
//! iptables rules inside mN's own namespace; healing flushes them. Nothing
//! is added to the root namespace. [`Cluster`] (the owner) kills the members
//! and deletes the namespaces on drop, also when the test fails; the sweep at
//! the start removes what a killed run left.
//!
//! A socket belongs to the namespace it was made in, and the client must be
//! in the hub, so the scenario runs in a child process of the test binary
//! started inside the hub (see [`Cluster::run_inside`]); it reaches the
//! members through a [`Members`] handle described in an environment variable.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tempfile::TempDir;

/// Set in the child process that runs the scenario inside the hub.
pub const INSIDE: &str = "ROTEST_ETCD_NETNS_MEMBERS";
const PREFIX: &str = "roetcd-";
const SUBNET: &str = "10.79.0";

fn run(cmd: &str, args: &[&str]) {
    let out = Command::new(cmd)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("spawn {cmd}: {e}"));
    assert!(
        out.status.success(),
        "{cmd} {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Removes the namespaces (and the processes in them) of runs whose test
/// process is gone.
fn sweep_dead_runs() {
    let Ok(out) = Command::new("ip").args(["netns", "list"]).output() else {
        return;
    };
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let name = line.split_whitespace().next().unwrap_or("");
        let Some(pid) = name
            .strip_prefix(PREFIX)
            .and_then(|rest| rest.split('-').next())
        else {
            continue;
        };
        if std::path::Path::new(&format!("/proc/{pid}")).exists() {
            continue;
        }
        delete_netns(name);
    }
}

/// Kills what runs in a namespace, then deletes it.
fn delete_netns(name: &str) {
    if let Ok(out) = Command::new("ip").args(["netns", "pids", name]).output() {
        for pid in String::from_utf8_lossy(&out.stdout).split_whitespace() {
            let _ = Command::new("kill").args(["-KILL", pid]).status();
        }
    }
    let _ = Command::new("ip").args(["netns", "del", name]).status();
}

/// A temporary directory for etcd data, on tmpfs when there is one (cheap
/// fsyncs); removed on drop.
pub fn scratch_dir(prefix: &str) -> TempDir {
    let base = if std::path::Path::new("/dev/shm").is_dir() {
        "/dev/shm"
    } else {
        "/tmp"
    };
    tempfile::Builder::new()
        .prefix(prefix)
        .tempdir_in(base)
        .unwrap()
}

/// The members as the scenario sees them: addresses, namespaces and pids.
pub struct Members(Vec<(String, String, u32)>);

impl Members {
    /// Inside the hub: the members the owner described, or None when this
    /// process is not the scenario's child.
    pub fn from_env() -> Option<Members> {
        let text = std::env::var(INSIDE).ok()?;
        Some(Members(
            text.split(',')
                .map(|m| {
                    let mut parts = m.split(' ');
                    let mut next = || parts.next().expect("malformed member list").to_owned();
                    let (ns, ip, pid) = (next(), next(), next());
                    (ns, ip, pid.parse().expect("member pid"))
                })
                .collect(),
        ))
    }

    pub fn endpoints(&self) -> Vec<String> {
        self.0
            .iter()
            .map(|(_, ip, _)| format!("{ip}:2379"))
            .collect()
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    fn iptables(&self, i: usize, args: &[&str]) {
        let mut all = vec!["netns", "exec", &self.0[i].0, "iptables", "-w"];
        all.extend_from_slice(args);
        run("ip", &all);
    }

    /// Cuts member i off from its peers; its clients still reach it.
    pub fn cut(&self, i: usize) {
        for chain in ["INPUT", "OUTPUT"] {
            for port in ["--dport", "--sport"] {
                self.iptables(i, &["-A", chain, "-p", "tcp", port, "2380", "-j", "DROP"]);
            }
        }
    }

    pub fn heal(&self, i: usize) {
        self.iptables(i, &["-F", "INPUT"]);
        self.iptables(i, &["-F", "OUTPUT"]);
    }

    /// SIGKILL; the owner reaps it.
    pub fn kill(&self, i: usize) {
        run("kill", &["-KILL", &self.0[i].2.to_string()]);
    }
}

/// The owner of the namespaces and the member processes.
pub struct Cluster {
    hub: String,
    /// Namespace, address and etcd (None until started).
    members: Vec<(String, String, Option<Child>)>,
    dir: TempDir,
}

impl Cluster {
    pub fn start(etcd: &str) -> Cluster {
        assert!(
            std::os::unix::fs::MetadataExt::uid(&std::fs::metadata("/proc/self").unwrap()) == 0,
            "this test needs root (network namespaces); run it through scripts/test"
        );
        sweep_dead_runs();
        let tag = format!("{PREFIX}{}", std::process::id());
        let dir = scratch_dir("etcd-netns-");
        let hub = format!("{tag}-hub");
        let mut cluster = Cluster {
            hub: hub.clone(),
            members: Vec::new(),
            dir,
        };
        run("ip", &["netns", "add", &hub]);
        run("ip", &["-n", &hub, "link", "set", "lo", "up"]);
        run("ip", &["-n", &hub, "link", "add", "br0", "type", "bridge"]);
        run(
            "ip",
            &[
                "-n",
                &hub,
                "addr",
                "add",
                &format!("{SUBNET}.254/24"),
                "dev",
                "br0",
            ],
        );
        run("ip", &["-n", &hub, "link", "set", "br0", "up"]);
        let names: Vec<(String, String)> = (1..=3)
            .map(|n| (format!("{tag}-m{n}"), format!("{SUBNET}.{n}")))
            .collect();
        let initial = names
            .iter()
            .enumerate()
            .map(|(i, (_, ip))| format!("m{}=http://{ip}:2380", i + 1))
            .collect::<Vec<_>>()
            .join(",");
        for (i, (ns, ip)) in names.iter().enumerate() {
            let n = i + 1;
            run("ip", &["netns", "add", ns]);
            // Recorded before it is built: drop removes it even half made.
            cluster.members.push((ns.clone(), ip.clone(), None));
            run("ip", &["-n", ns, "link", "set", "lo", "up"]);
            let port = format!("m{n}");
            run(
                "ip",
                &[
                    "-n", ns, "link", "add", "eth0", "type", "veth", "peer", "name", &port,
                    "netns", &hub,
                ],
            );
            run(
                "ip",
                &["-n", &hub, "link", "set", &port, "master", "br0", "up"],
            );
            run(
                "ip",
                &["-n", ns, "addr", "add", &format!("{ip}/24"), "dev", "eth0"],
            );
            run("ip", &["-n", ns, "link", "set", "eth0", "up"]);
            let log = std::fs::File::create(cluster.dir.path().join(format!("m{n}.log"))).unwrap();
            // Default heartbeat (100 ms) and election timeout (1 s), as in
            // a real cluster.
            let child = Command::new("ip")
                .args(["netns", "exec", ns, etcd])
                .arg(format!("--name=m{n}"))
                .arg(format!("--data-dir={}/m{n}", cluster.dir.path().display()))
                .arg(format!("--listen-client-urls=http://{ip}:2379"))
                .arg(format!("--advertise-client-urls=http://{ip}:2379"))
                .arg(format!("--listen-peer-urls=http://{ip}:2380"))
                .arg(format!("--initial-advertise-peer-urls=http://{ip}:2380"))
                .arg(format!("--initial-cluster={initial}"))
                .arg("--initial-cluster-state=new")
                .arg("--log-level=warn")
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(log)
                .spawn()
                .expect("spawn etcd");
            cluster.members[i].2 = Some(child);
        }
        cluster
    }

    /// Runs test `name` of this binary again inside the hub, with the members
    /// described in [`INSIDE`]; panics (with the member logs) if it fails.
    pub fn run_inside(&self, name: &str, limit: Duration) {
        let members = self
            .members
            .iter()
            .map(|(ns, ip, child)| format!("{ns} {ip} {}", child.as_ref().map_or(0, Child::id)))
            .collect::<Vec<_>>()
            .join(",");
        let mut child = Command::new("ip")
            .args(["netns", "exec", &self.hub])
            .arg(std::env::current_exe().unwrap())
            .args([
                name,
                "--exact",
                "--ignored",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(INSIDE, members)
            .spawn()
            .expect("run the scenario inside the hub");
        let deadline = Instant::now() + limit;
        let status = loop {
            if let Some(status) = child.try_wait().unwrap() {
                break Some(status);
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                break None;
            }
            std::thread::sleep(Duration::from_millis(200));
        };
        if status.is_some_and(|s| s.success()) {
            return;
        }
        for n in 1..=self.members.len() {
            let log = std::fs::read_to_string(self.dir.path().join(format!("m{n}.log")));
            let log = log.unwrap_or_default();
            let tail: Vec<&str> = log.lines().rev().take(15).collect();
            eprintln!(
                "--- m{n}.log (last lines, newest first)\n{}",
                tail.join("\n")
            );
        }
        match status {
            Some(s) => panic!("the scenario failed inside the hub ({s})"),
            None => panic!("the scenario did not end within {limit:?}"),
        }
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for (ns, _, child) in &mut self.members {
            if let Some(child) = child {
                let _ = child.kill();
                let _ = child.wait();
            }
            delete_netns(ns);
        }
        delete_netns(&self.hub);
    }
}
