//! The etcd backend against a real three-member cluster: on loopback, a
//! member that stops answering (stalled, or the leader gone) costs one call
//! at most; the calls after it, and watches, go to the healthy members. In
//! network namespaces (root), members cut off from their peers in turn (they
//! still answer clients, "no leader", which the test checks by asking each
//! cut member alone) and then a killed one cost no lease and stall no call,
//! renewal or watch longer than one call's bound.

#[allow(dead_code)] // shared test support; this file uses two helpers of it
mod etcd_server;

mod etcd_netns;

use etcd_netns::{scratch_dir, Cluster as NsCluster, Members};
use etcd_server::{etcd_binary, free_port};
use kvstore_backends::{
    EtcdConfig, EtcdStore, KvStore, LeaseId, Op, StoreError, TimeoutStore, Txn,
};
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
        let dir = scratch_dir("etcd-cluster-");
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

// --- a member cut off from its peers (network namespaces, root) ------------

/// The lease of the partition test: short, so several TTLs pass per phase.
const TTL: Duration = Duration::from_secs(3);
/// Every call's bound, as the plugin's default `--store-timeout`.
const CALL_LIMIT: Duration = Duration::from_secs(5);
/// An election after a leader is lost (1 s timeout) and the call after it.
const ELECTION: Duration = Duration::from_secs(3);

/// What one phase measured.
#[derive(Default, Clone, Debug)]
struct Phase {
    name: String,
    rounds_ok: u32,
    rounds_failed: u32,
    /// Longest time without a write and its read-back both succeeding.
    longest_stall: Duration,
    renewals_failed: u32,
    /// Longest time without a renewal: the lease lives while it is below TTL.
    longest_unrenewed: Duration,
    /// The phase holds an election: a cut-off member rejoins (without
    /// pre-vote, etcd 3.4's default, its higher term makes the whole cluster
    /// elect a leader again) or the leader dies. Nobody can renew until a
    /// leader is elected (1 s timeout, longer under load), and the new leader
    /// extends every lease by its TTL: the lease must live, but a gap between
    /// renewals may exceed the TTL.
    election: bool,
    lease_lost: bool,
    /// Longest time from a write's success to its watch event.
    slowest_event: Duration,
}

#[derive(Default)]
struct Probe {
    phases: Vec<Phase>,
    /// Key written -> when its write succeeded, in which phase.
    written: std::collections::HashMap<String, (Instant, usize)>,
    /// Key -> when its watch event came.
    seen: std::collections::HashMap<String, Instant>,
}

impl Probe {
    fn now(&mut self) -> &mut Phase {
        self.phases.last_mut().expect("a phase")
    }
}

type Shared = std::sync::Arc<std::sync::Mutex<Probe>>;

/// The member index of the current leader, asked of every member that answers.
async fn leader(endpoints: &[String]) -> Option<usize> {
    let mut ids = Vec::new();
    let mut leader = None;
    for ep in endpoints {
        let status = async {
            let mut c = etcd_client::Client::connect([ep.as_str()], None)
                .await
                .ok()?;
            c.status().await.ok()
        };
        match tokio::time::timeout(Duration::from_secs(2), status).await {
            Ok(Some(s)) => {
                ids.push(s.header().map(|h| h.member_id()));
                if s.leader() != 0 {
                    leader = Some(s.leader());
                }
            }
            _ => ids.push(None),
        }
    }
    ids.iter().position(|id| id.is_some() && *id == leader)
}

/// Asks one member alone, through a client of its own that requires a leader
/// (as the store's does), for a key: Ok when it refuses with Unavailable "no
/// leader" (the state a member cut off from its peers must be in for the
/// scenario to mean anything), else what it answered instead.
async fn refuses_without_leader(endpoint: &str) -> Result<(), String> {
    let options = etcd_client::ConnectOptions::new()
        .with_connect_timeout(Duration::from_secs(2))
        .with_timeout(Duration::from_secs(2))
        .with_require_leader(true);
    let call = async {
        let mut c = etcd_client::Client::connect([endpoint], Some(options)).await?;
        c.get("/probe", None).await
    };
    match tokio::time::timeout(Duration::from_secs(5), call).await {
        Ok(Err(etcd_client::Error::GRpcStatus(s)))
            if s.code() == tonic::Code::Unavailable && s.message().contains("no leader") =>
        {
            Ok(())
        }
        Ok(Err(e)) => Err(format!("error {e}")),
        Ok(Ok(_)) => Err("an answer (it has a leader)".into()),
        Err(_) => Err("nothing within 5 s".into()),
    }
}

/// Polls member `i` until it refuses clients with "no leader"; fails the
/// test if it does not within `limit`.
async fn wait_until_leaderless(endpoints: &[String], i: usize, limit: Duration) -> Duration {
    let started = Instant::now();
    loop {
        match refuses_without_leader(&endpoints[i]).await {
            Ok(()) => return started.elapsed(),
            Err(what) => assert!(
                started.elapsed() < limit,
                "m{} cut off from its peers for {limit:?} still does not answer clients \
                 \"no leader\" (last: {what}): the scenario would test nothing",
                i + 1
            ),
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Polls every member until each serves a request that needs a leader: the
/// cluster has settled after a heal, so the next phase does not begin in the
/// middle of this one's election. Fails the test after `limit`.
async fn wait_until_led(endpoints: &[String], limit: Duration) -> Duration {
    let started = Instant::now();
    loop {
        let mut leaderless = Vec::new();
        for (i, ep) in endpoints.iter().enumerate() {
            let answered = matches!(
                refuses_without_leader(ep).await,
                Err(what) if what.starts_with("an answer")
            );
            if !answered {
                leaderless.push(i + 1);
            }
        }
        if leaderless.is_empty() {
            return started.elapsed();
        }
        assert!(
            started.elapsed() < limit,
            "members {leaderless:?} still serve no request that needs a leader {limit:?} after the heal"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

async fn renew_forever(store: std::sync::Arc<dyn KvStore>, lease: LeaseId, probe: Shared) {
    let mut last_ok = Instant::now();
    loop {
        tokio::time::sleep(TTL / 3).await;
        let result = store.keep_alive(lease.clone()).await.map(drop);
        let mut p = probe.lock().unwrap();
        match result {
            Ok(()) => {
                let gap = last_ok.elapsed();
                let phase = p.now();
                phase.longest_unrenewed = phase.longest_unrenewed.max(gap);
                last_ok = Instant::now();
            }
            Err(e) => {
                eprintln!("{:>6.1?} keep-alive failed: {e}", last_ok.elapsed());
                let phase = p.now();
                phase.renewals_failed += 1;
                if matches!(e, StoreError::LeaseNotFound(_)) {
                    phase.lease_lost = true;
                    return;
                }
            }
        }
    }
}

async fn write_and_read_forever(store: std::sync::Arc<dyn KvStore>, probe: Shared, tag: &str) {
    let mut last_ok = Instant::now();
    for n in 0u64.. {
        tokio::time::sleep(Duration::from_millis(200)).await;
        let key = format!("/w/{tag}{n:06}");
        let started = Instant::now();
        let round = async {
            store.put(&key, n.to_string().into_bytes()).await?;
            {
                let mut p = probe.lock().unwrap();
                let phase = p.phases.len() - 1;
                p.written.insert(key.clone(), (Instant::now(), phase));
            }
            let read = store.get(&key).await?;
            assert_eq!(read.map(|kv| kv.value), Some(n.to_string().into_bytes()));
            Ok::<_, StoreError>(())
        }
        .await;
        let mut p = probe.lock().unwrap();
        match round {
            Ok(()) => {
                let gap = last_ok.elapsed();
                let phase = p.now();
                phase.rounds_ok += 1;
                phase.longest_stall = phase.longest_stall.max(gap);
                last_ok = Instant::now();
            }
            Err(e) => {
                eprintln!(
                    "{:>6.1?} write/read of {key} failed: {e}",
                    started.elapsed()
                );
                p.now().rounds_failed += 1;
            }
        }
    }
}

async fn follow_forever(mut watch: kvstore_backends::WatchStream, probe: Shared) {
    use futures::StreamExt;
    while let Some(ev) = watch.next().await {
        let ev = ev.expect("the watch never ends while a majority lives");
        probe.lock().unwrap().seen.insert(ev.kv.key, Instant::now());
    }
}

async fn partition_scenario(members: Members) {
    let endpoints = members.endpoints();
    let open = |endpoints: Vec<String>| -> std::sync::Arc<dyn KvStore> {
        let mut config = EtcdConfig::new(endpoints);
        config.dial_timeout = Duration::from_secs(3);
        config.request_timeout = CALL_LIMIT;
        std::sync::Arc::new(TimeoutStore::new(
            EtcdStore::new(config).unwrap(),
            CALL_LIMIT,
        ))
    };
    // As two plugins: this one holds the lease and the watch (on the first
    // endpoint, the one cut first) and writes too; the other one writes
    // from the second endpoint on, so its writes land while this one's
    // watch may still sit on the cut member.
    let store = open(endpoints.clone());
    let mut rotated = endpoints.clone();
    rotated.rotate_left(1);
    let other = open(rotated);
    let deadline = Instant::now() + Duration::from_secs(30);
    while store.put("/probe", b"x".to_vec()).await.is_err() {
        assert!(Instant::now() < deadline, "the etcd cluster did not form");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let probe = Shared::default();
    probe.lock().unwrap().phases.push(Phase {
        name: "all healthy".into(),
        ..Phase::default()
    });
    let lease = store.grant_lease(TTL).await.unwrap();
    let leased = Txn::new().and_then(vec![Op::put_with_lease(
        "/leased",
        b"x".to_vec(),
        lease.clone(),
    )]);
    store.txn(leased).await.unwrap();
    // Opened now, on the member every call goes to first: the one cut first.
    let watch = store.watch("/w/", 0).await.unwrap();
    let tasks = [
        tokio::spawn(renew_forever(store.clone(), lease.clone(), probe.clone())),
        tokio::spawn(write_and_read_forever(store.clone(), probe.clone(), "a")),
        tokio::spawn(write_and_read_forever(other, probe.clone(), "b")),
        tokio::spawn(follow_forever(watch, probe.clone())),
    ];
    let phase = |name: String, election: bool| {
        eprintln!("=== {name}");
        probe.lock().unwrap().phases.push(Phase {
            name,
            election,
            ..Phase::default()
        });
    };
    tokio::time::sleep(Duration::from_secs(3)).await;
    // The store prefers the first endpoint until it fails: its streams are there.
    let (members, phase, eps) = (&members, &phase, &endpoints);
    let cut_then_heal = |i: usize| async move {
        // Cutting the leader off is an election too: the lease must live
        // (the new leader extends it), but renewals may pause past the TTL.
        let leads = leader(eps).await == Some(i);
        members.cut(i);
        let role = if leads { " (the leader)" } else { "" };
        phase(format!("m{}{role} cut from its peers", i + 1), leads);
        let cut = Instant::now();
        // The precondition: the member really is in a minority and says
        // so to its clients (a follower notices after an election timeout,
        // a leader steps down after one).
        let after = wait_until_leaderless(eps, i, Duration::from_secs(15)).await;
        eprintln!(
            "m{} answers clients \"no leader\" {after:.1?} after the cut",
            i + 1
        );
        tokio::time::sleep((TTL * 4).saturating_sub(cut.elapsed())).await;
        // And it stayed so for the whole cut.
        if let Err(what) = refuses_without_leader(&eps[i]).await {
            panic!(
                "m{} answered {what} at the end of its cut instead of \"no leader\"",
                i + 1
            );
        }
        members.heal(i);
        phase(format!("m{} healed", i + 1), true);
        let healed = Instant::now();
        let settled = wait_until_led(eps, Duration::from_secs(30)).await;
        eprintln!("every member has a leader {settled:.1?} after the heal");
        tokio::time::sleep(Duration::from_secs(6).saturating_sub(healed.elapsed())).await;
    };
    let a = 0;
    cut_then_heal(a).await;
    let b = match leader(&endpoints).await {
        Some(l) if l != a => l,
        _ => (a + 1) % members.len(),
    };
    cut_then_heal(b).await;
    let c = leader(&endpoints).await.unwrap_or(2);
    members.kill(c);
    phase(format!("m{} (the leader) killed", c + 1), true);
    tokio::time::sleep(TTL * 4).await;
    for task in &tasks[..3] {
        task.abort();
    }
    // The last events arrive.
    tokio::time::sleep(Duration::from_secs(2)).await;
    tasks[3].abort();
    // Every write that succeeded reaches the watch; the lease still holds.
    let still_leased = store.get("/leased").await.unwrap();
    let mut guard = probe.lock().unwrap();
    let p = &mut *guard;
    let mut missed = Vec::new();
    for (key, (written, phase)) in &p.written {
        match p.seen.get(key) {
            Some(seen) => {
                let ph = &mut p.phases[*phase];
                ph.slowest_event = ph
                    .slowest_event
                    .max(seen.saturating_duration_since(*written));
            }
            None => missed.push(key),
        }
    }
    for ph in &p.phases {
        eprintln!(
            "{:<28} rounds ok {:>3} failed {:>2}, longest stall {:>5.1?}; renewals failed {}, longest unrenewed {:>5.1?}{}; slowest watch event {:>5.1?}",
            ph.name, ph.rounds_ok, ph.rounds_failed, ph.longest_stall, ph.renewals_failed,
            ph.longest_unrenewed, if ph.lease_lost { " LEASE LOST" } else { "" }, ph.slowest_event
        );
    }
    let bound = CALL_LIMIT + ELECTION;
    for ph in &p.phases {
        assert!(!ph.lease_lost, "{}: the lease was lost", ph.name);
        assert!(
            ph.election || ph.longest_unrenewed < TTL,
            "{}: {:?} without a renewal (TTL {TTL:?})",
            ph.name,
            ph.longest_unrenewed
        );
        assert!(ph.rounds_ok > 0, "{}: no write succeeded", ph.name);
        assert!(
            ph.longest_stall < bound,
            "{}: {:?} without a successful write (bound {bound:?})",
            ph.name,
            ph.longest_stall
        );
        // A watch leaves a sick member as fast as the lease renewals do.
        assert!(
            ph.slowest_event < TTL,
            "{}: a watch event came {:?} after its write (bound {TTL:?})",
            ph.name,
            ph.slowest_event
        );
    }
    assert!(
        missed.is_empty(),
        "the watch missed written keys: {missed:?}"
    );
    assert!(still_leased.is_some(), "the leased key is gone");
}

#[test]
#[ignore = "needs root: network namespaces (scripts/test runs this tier)"]
fn a_member_cut_off_from_its_peers_costs_no_lease_and_no_progress() {
    const NAME: &str = "a_member_cut_off_from_its_peers_costs_no_lease_and_no_progress";
    match Members::from_env() {
        Some(members) => tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap()
            .block_on(partition_scenario(members)),
        None => NsCluster::start(&etcd_binary()).run_inside(NAME, Duration::from_secs(180)),
    }
}
