//! The etcd backend against a real three-member cluster on loopback: a
//! member that stops answering (stalled, or the leader gone) costs one call
//! at most; the calls after it, and watches, go to the healthy members.

#[allow(dead_code)] // shared test support; this file uses two helpers of it
mod etcd_server;

use etcd_server::{etcd_binary, free_port};
use kvstore_backends::{EtcdConfig, EtcdStore, KvStore};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use tempfile::TempDir;

struct Member {
    child: Child,
    client_port: u16,
    stopped: bool,
}

/// Three etcd members, killed (and their directories removed) on drop.
struct Cluster {
    members: Vec<Member>,
    _dir: TempDir,
}

impl Cluster {
    async fn start() -> Cluster {
        let dir = tempfile::Builder::new()
            .prefix("etcd-cluster-")
            .tempdir_in(if std::path::Path::new("/dev/shm").is_dir() {
                "/dev/shm"
            } else {
                "/tmp"
            })
            .unwrap();
        let ports: Vec<(u16, u16)> = (0..3).map(|_| (free_port(), free_port())).collect();
        let initial = ports
            .iter()
            .enumerate()
            .map(|(i, (_, peer))| format!("m{i}=http://127.0.0.1:{peer}"))
            .collect::<Vec<_>>()
            .join(",");
        let members = ports
            .iter()
            .enumerate()
            .map(|(i, (client, peer))| {
                let log = std::fs::File::create(dir.path().join(format!("m{i}.log"))).unwrap();
                let child = Command::new(etcd_binary())
                    .arg(format!("--name=m{i}"))
                    .arg(format!("--data-dir={}/m{i}", dir.path().display()))
                    .arg(format!("--listen-client-urls=http://127.0.0.1:{client}"))
                    .arg(format!("--advertise-client-urls=http://127.0.0.1:{client}"))
                    .arg(format!("--listen-peer-urls=http://127.0.0.1:{peer}"))
                    .arg(format!(
                        "--initial-advertise-peer-urls=http://127.0.0.1:{peer}"
                    ))
                    .arg(format!("--initial-cluster={initial}"))
                    .arg("--initial-cluster-state=new")
                    .arg("--heartbeat-interval=100")
                    .arg("--election-timeout=500")
                    .arg("--log-level=error")
                    .env_clear()
                    .stdin(Stdio::null())
                    .stdout(Stdio::null())
                    .stderr(log)
                    .spawn()
                    .expect("spawn etcd");
                Member {
                    child,
                    client_port: *client,
                    stopped: false,
                }
            })
            .collect();
        let cluster = Cluster { members, _dir: dir };
        // Ready when a store over all three can write.
        let store = cluster.store();
        let deadline = Instant::now() + Duration::from_secs(30);
        while store.put("/probe", b"x".to_vec()).await.is_err() {
            assert!(Instant::now() < deadline, "the etcd cluster did not form");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        cluster
    }

    fn endpoints(&self) -> Vec<String> {
        self.members
            .iter()
            .map(|m| format!("127.0.0.1:{}", m.client_port))
            .collect()
    }

    fn store(&self) -> EtcdStore {
        let mut config = EtcdConfig::new(self.endpoints());
        config.dial_timeout = Duration::from_secs(1);
        config.request_timeout = Duration::from_secs(1);
        EtcdStore::new(config).unwrap()
    }

    /// SIGSTOP: the member keeps its connections but answers nothing.
    fn stall(&mut self, i: usize) {
        kill(
            Pid::from_raw(self.members[i].child.id() as i32),
            Signal::SIGSTOP,
        )
        .unwrap();
        self.members[i].stopped = true;
    }

    fn resume(&mut self, i: usize) {
        kill(
            Pid::from_raw(self.members[i].child.id() as i32),
            Signal::SIGCONT,
        )
        .unwrap();
        self.members[i].stopped = false;
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for m in &mut self.members {
            if m.stopped {
                let _ = kill(Pid::from_raw(m.child.id() as i32), Signal::SIGCONT);
            }
            let _ = m.child.kill();
            let _ = m.child.wait();
        }
    }
}

/// Calls until one succeeds; how many failed before it.
async fn failures_before_success(store: &EtcdStore, key: &str) -> usize {
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut failed = 0;
    loop {
        match store.put(key, b"v".to_vec()).await {
            Ok(_) => return failed,
            Err(e) => {
                failed += 1;
                eprintln!("call {failed} failed: {e}");
                assert!(Instant::now() < deadline, "no call succeeded within 20 s");
            }
        }
    }
}

#[tokio::test]
async fn a_stalled_member_costs_one_call_and_the_next_ones_go_elsewhere() {
    let mut cluster = Cluster::start().await;
    let store = cluster.store();
    store.put("/warm", b"x".to_vec()).await.unwrap(); // prefers member 0
    cluster.stall(0);
    let failed = failures_before_success(&store, "/after-stall").await;
    // One call times out on the stalled member; if it was the leader, calls
    // fail until the others elect a new one (election timeout 0.5 s), but
    // they never go back to the stalled member.
    assert!(failed >= 1, "the first call went to the stalled member");
    // A call sent to the stalled member would fail (1 s time limit): every
    // later call succeeding shows none goes back there.
    for i in 0..10 {
        store
            .put(&format!("/k{i}"), b"v".to_vec())
            .await
            .unwrap_or_else(|e| panic!("call {i} after the switch failed: {e}"));
    }
    assert_eq!(
        store.get("/k9").await.unwrap().map(|kv| kv.value),
        Some(b"v".to_vec())
    );
    cluster.resume(0);
}

#[tokio::test]
async fn a_watch_opened_after_a_member_stalled_sees_changes() {
    use futures::StreamExt;
    let mut cluster = Cluster::start().await;
    let store = cluster.store();
    store.put("/warm", b"x".to_vec()).await.unwrap();
    cluster.stall(0);
    failures_before_success(&store, "/after-stall").await;
    let mut watch = store
        .watch("/w/", 0)
        .await
        .expect("a watch on a healthy member");
    store.put("/w/a", b"1".to_vec()).await.unwrap();
    let ev = tokio::time::timeout(Duration::from_secs(5), watch.next())
        .await
        .expect("the watch delivers within 5 s")
        .expect("the watch is open")
        .expect("an event");
    assert_eq!(ev.kv.key, "/w/a");
    cluster.resume(0);
}
