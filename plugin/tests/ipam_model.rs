//! IPAM on the store, without root: cost in store round trips, several hosts
//! sharing one store, and a property test against a simple model.

use ipnetwork::{IpNetwork, Ipv4Network};
use kvstore_backends::{CountingStore, KvStore, MemoryStore};
use proptest::prelude::*;
use rustoverlay::api::parse::pool_request;
use rustoverlay::control::ipam::{Ipam, PoolRequest};
use rustoverlay::state::keys;
use std::collections::{HashSet, VecDeque};
use std::net::IpAddr;
use std::sync::Arc;

fn default_pool() -> Ipv4Network {
    "10.200.0.0/16".parse().unwrap()
}

fn req(subnet: &str) -> PoolRequest {
    pool_request(subnet, "", false).unwrap()
}

fn host(store: Arc<dyn KvStore>, name: &str) -> Ipam {
    Ipam::new(store, name, default_pool(), 24)
}

async fn alloc(ipam: &Ipam, pool: &str) -> IpAddr {
    ipam.request_address(pool, None, false).await.unwrap().ip()
}

#[tokio::test]
async fn an_allocation_costs_one_transaction_whatever_the_pool_holds() {
    let counting = CountingStore::new(MemoryStore::new());
    let counter = counting.counter();
    let ipam = host(Arc::new(counting), "h1");
    let calls = || counter.load(std::sync::atomic::Ordering::Relaxed);

    ipam.request_pool(&req("10.1.0.0/24")).await.unwrap();
    alloc(&ipam, "10.1.0.0/24").await; // loads the cursor once
    let before = calls();
    alloc(&ipam, "10.1.0.0/24").await;
    let small = calls() - before;

    ipam.request_pool(&req("10.2.0.0/16")).await.unwrap();
    for _ in 0..10_000 {
        alloc(&ipam, "10.2.0.0/16").await;
    }
    let before = calls();
    alloc(&ipam, "10.2.0.0/16").await;
    let big = calls() - before;
    assert_eq!(small, 1, "a fresh address is one transaction");
    assert_eq!(big, small, "10,000 taken addresses cost nothing extra");

    // Reuse from the queue: a read of its head plus one transaction.
    ipam.request_pool(&req("10.3.0.0/30")).await.unwrap();
    let a = alloc(&ipam, "10.3.0.0/30").await;
    alloc(&ipam, "10.3.0.0/30").await;
    ipam.release_address("10.3.0.0/30", a).await.unwrap();
    let before = calls();
    assert_eq!(alloc(&ipam, "10.3.0.0/30").await, a);
    assert!(calls() - before <= 2);
}

#[tokio::test]
async fn released_addresses_wait_until_fresh_ones_run_out_then_come_back_oldest_first() {
    let ipam = host(Arc::new(MemoryStore::new()), "h1");
    let pool = "10.4.0.0/29"; // .1 - .6
    ipam.request_pool(&req(pool)).await.unwrap();
    let a = alloc(&ipam, pool).await;
    let b = alloc(&ipam, pool).await;
    ipam.release_address(pool, b).await.unwrap();
    ipam.release_address(pool, a).await.unwrap();
    let fresh: Vec<IpAddr> = [
        alloc(&ipam, pool).await,
        alloc(&ipam, pool).await,
        alloc(&ipam, pool).await,
        alloc(&ipam, pool).await,
    ]
    .to_vec();
    assert!(!fresh.contains(&a) && !fresh.contains(&b));
    assert_eq!(alloc(&ipam, pool).await, b, "oldest release first");
    assert_eq!(alloc(&ipam, pool).await, a);
    assert!(ipam.request_address(pool, None, false).await.is_err());
}

#[tokio::test]
async fn hosts_share_pools_gateways_and_references() {
    let store: Arc<dyn KvStore> = Arc::new(MemoryStore::new());
    let (h1, h2) = (host(store.clone(), "h1"), host(store.clone(), "h2"));
    let pool = "10.5.0.0/24";
    h1.request_pool(&req(pool)).await.unwrap();
    h2.request_pool(&req(pool)).await.unwrap();
    let g1 = h1.request_address(pool, None, true).await.unwrap();
    let g2 = h2.request_address(pool, None, true).await.unwrap();
    assert_eq!(g1, g2, "one gateway for every host");
    let err = h2
        .request_pool(&req("10.5.0.128/25"))
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("overlaps subnet 10.5.0.0/24"), "{err}");

    // An aux address is one reservation shared by every host's network,
    // and never a container's (tests/aux_addresses.rs has the details).
    let aux: IpAddr = "10.5.0.200".parse().unwrap();
    h1.reserve_aux(pool, aux).await.unwrap();
    h1.mark_aux(pool, &[aux]).await.unwrap();
    h2.reserve_aux(pool, aux).await.unwrap();
    assert!(
        h2.request_address(pool, Some(aux), false).await.is_err(),
        "a container never gets an aux address"
    );

    // Only the holder releases an address.
    let mine = h1.request_address(pool, None, false).await.unwrap().ip();
    let err = h2
        .release_address(pool, mine)
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("held by host h1"), "{err}");
    h1.release_address(pool, mine).await.unwrap();

    // The first release keeps the pool; the last frees it.
    h1.release_pool(pool).await.unwrap();
    assert!(h1.release_pool(pool).await.is_err(), "h1 released twice");
    let fresh = h2.request_address(pool, None, false).await.unwrap().ip();
    assert_ne!(
        fresh, mine,
        "a released address waits for fresh ones to run out"
    );
    h2.release_pool(pool).await.unwrap();
    let left = store.range("/rustoverlay/v1/ipam/pool/").await.unwrap();
    assert!(left.kvs.is_empty(), "{:?}", left.kvs);
    h1.request_pool(&req("10.5.0.128/25")).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn eight_hosts_racing_on_one_pool_never_share_an_address() {
    let store: Arc<dyn KvStore> = Arc::new(MemoryStore::new());
    let pool = "10.6.0.0/20";
    let mut tasks = vec![];
    for h in 0..8 {
        let ipam = host(store.clone(), &format!("h{h}"));
        tasks.push(tokio::spawn(async move {
            ipam.request_pool(&req(pool)).await.unwrap();
            let mut got = vec![];
            for _ in 0..250 {
                got.push(alloc(&ipam, pool).await);
            }
            got
        }));
    }
    let mut all = HashSet::new();
    for t in tasks {
        for a in t.await.unwrap() {
            assert!(all.insert(a), "{a} handed out twice");
        }
    }
    assert_eq!(all.len(), 2000);
}

#[tokio::test]
async fn a_host_hands_out_its_claimed_run_without_writing_the_cursor() {
    use std::sync::atomic::Ordering;
    let counting = CountingStore::new(MemoryStore::new());
    let counter = counting.counter();
    let store: Arc<dyn KvStore> = Arc::new(counting);
    let (h1, h2) = (host(store.clone(), "h1"), host(store.clone(), "h2"));
    let pool = "10.8.0.0/16";
    h1.request_pool(&req(pool)).await.unwrap();
    h2.request_pool(&req(pool)).await.unwrap();
    let cursor_key = keys::pool_alloc("10.8.0.0_16");
    let mut got = vec![alloc(&h1, pool).await]; // takes 16 from the cursor
    let cursor = store.get(&cursor_key).await.unwrap().unwrap().mod_revision;
    let before = counter.load(Ordering::Relaxed);
    for _ in 0..15 {
        got.push(alloc(&h1, pool).await);
    }
    assert_eq!(
        counter.load(Ordering::Relaxed) - before,
        15,
        "one transaction each"
    );
    let now = store.get(&cursor_key).await.unwrap().unwrap().mod_revision;
    assert_eq!(now, cursor, "the run's addresses leave the cursor alone");
    let run: Vec<IpAddr> = (1..=16)
        .map(|i| format!("10.8.0.{i}").parse().unwrap())
        .collect();
    assert_eq!(got, run, "a host's addresses come in order");
    // Another host meanwhile took the 16 after them; h1's next run follows.
    assert_eq!(alloc(&h2, pool).await.to_string(), "10.8.0.17");
    assert_eq!(alloc(&h1, pool).await.to_string(), "10.8.0.33");
}

#[tokio::test]
async fn a_restarted_host_carries_on_with_its_claimed_run() {
    let store: Arc<dyn KvStore> = Arc::new(MemoryStore::new());
    let pool = "10.9.0.0/16";
    let h1 = host(store.clone(), "h1");
    h1.request_pool(&req(pool)).await.unwrap();
    assert_eq!(alloc(&h1, pool).await.to_string(), "10.9.0.1");
    assert_eq!(alloc(&h1, pool).await.to_string(), "10.9.0.2");
    // A restart: nothing cached. The run is in the store.
    let h1 = host(store.clone(), "h1");
    assert_eq!(alloc(&h1, pool).await.to_string(), "10.9.0.3");
    let h2 = host(store.clone(), "h2");
    h2.request_pool(&req(pool)).await.unwrap();
    assert_eq!(alloc(&h2, pool).await.to_string(), "10.9.0.17");
}

#[tokio::test]
async fn what_a_gone_host_claimed_is_handed_out_once_the_pool_runs_dry() {
    let store: Arc<dyn KvStore> = Arc::new(MemoryStore::new());
    let pool = "10.10.0.0/24"; // 254 addresses, runs of 3 at first
    let (h1, h2) = (host(store.clone(), "h1"), host(store.clone(), "h2"));
    h1.request_pool(&req(pool)).await.unwrap();
    h2.request_pool(&req(pool)).await.unwrap();
    let mine = alloc(&h2, pool).await;
    drop(h2); // gone, with the two after its address claimed and unused
    let mut got = HashSet::new();
    let err = loop {
        match h1.request_address(pool, None, false).await {
            Ok(a) => assert!(got.insert(a.ip()), "{} handed out twice", a.ip()),
            Err(e) => break e.to_string(),
        }
    };
    assert!(err.contains("no free address left"), "{err}");
    assert_eq!(got.len(), 253, "every address but h2's");
    assert!(!got.contains(&mine));
    for ip in ["10.10.0.2", "10.10.0.3"] {
        assert!(got.contains(&ip.parse().unwrap()), "{ip}, h2's run");
    }
}

#[tokio::test]
async fn a_pool_that_looked_full_to_a_host_gives_it_an_address_another_host_released() {
    let store: Arc<dyn KvStore> = Arc::new(MemoryStore::new());
    let pool = "10.12.0.0/29"; // .1 - .6
    let (h1, h2) = (host(store.clone(), "h1"), host(store.clone(), "h2"));
    h1.request_pool(&req(pool)).await.unwrap();
    h2.request_pool(&req(pool)).await.unwrap();
    let theirs = alloc(&h2, pool).await;
    for _ in 0..5 {
        alloc(&h1, pool).await; // h1 takes the last one: full, as h1 sees it
    }
    assert!(h1.request_address(pool, None, false).await.is_err());
    h2.release_address(pool, theirs).await.unwrap();
    assert_eq!(
        alloc(&h1, pool).await,
        theirs,
        "h1 reads the pool again before it says it is full"
    );
}

#[derive(Debug, Clone)]
enum Step {
    Alloc,
    Release(usize),
    Take(u8),
}

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        4 => Just(Step::Alloc),
        2 => any::<usize>().prop_map(Step::Release),
        1 => (1u8..15).prop_map(Step::Take),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    /// Against a model of a /28 (14 usable): every live address is unique,
    /// allocation fails only when all 14 are live, releases reopen them.
    #[test]
    fn allocations_match_a_simple_model(steps in proptest::collection::vec(step(), 1..80)) {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(async {
            let ipam = host(Arc::new(MemoryStore::new()), "h1");
            let pool = "10.7.0.0/28";
            ipam.request_pool(&req(pool)).await.unwrap();
            let subnet: IpNetwork = pool.parse().unwrap();
            let mut live: VecDeque<IpAddr> = VecDeque::new();
            for s in steps {
                match s {
                    Step::Alloc => match ipam.request_address(pool, None, false).await {
                        Ok(a) => {
                            prop_assert!(subnet.contains(a.ip()));
                            prop_assert!(!live.contains(&a.ip()), "duplicate {}", a.ip());
                            live.push_back(a.ip());
                        }
                        Err(e) => {
                            prop_assert_eq!(live.len(), 14, "refused with room left: {}", e);
                        }
                    },
                    Step::Release(i) if !live.is_empty() => {
                        let a = live.remove(i % live.len()).unwrap();
                        ipam.release_address(pool, a).await.unwrap();
                        prop_assert!(ipam.release_address(pool, a).await.is_err());
                    }
                    Step::Release(_) => {}
                    Step::Take(n) => {
                        let ip: IpAddr = format!("10.7.0.{n}").parse().unwrap();
                        let r = ipam.request_address(pool, Some(ip), false).await;
                        // Free: taken. Already this host's and bound to no
                        // endpoint (none are, here): the same allocation
                        // again, as for a retried --ip.
                        prop_assert!(r.is_ok(), "{ip}: {:?}", r.err());
                        if !live.contains(&ip) {
                            live.push_back(ip);
                        }
                    }
                }
            }
            Ok(())
        })?;
    }
}

#[derive(Debug, Clone)]
enum HostStep {
    Alloc(bool),
    Release(usize),
    /// The host restarts: what it cached (its place in its run) is gone.
    Restart(bool),
}

fn host_step() -> impl Strategy<Value = HostStep> {
    prop_oneof![
        10 => any::<bool>().prop_map(HostStep::Alloc),
        1 => any::<usize>().prop_map(HostStep::Release),
        1 => any::<bool>().prop_map(HostStep::Restart),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]

    /// Two hosts on a /24 (254 usable, so hosts take runs of up to 3) that
    /// restart now and then, allocating past the pool's end: every live
    /// address is unique, and allocation fails only when all 254 are live,
    /// whatever the other host has claimed and not handed out.
    #[test]
    fn claimed_runs_never_hold_an_address_back(steps in proptest::collection::vec(host_step(), 300..500)) {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(async {
            let store: Arc<dyn KvStore> = Arc::new(MemoryStore::new());
            let pool = "10.11.0.0/24";
            let mut hosts = [host(store.clone(), "h1"), host(store.clone(), "h2")];
            for h in &hosts {
                h.request_pool(&req(pool)).await.unwrap();
            }
            let mut live: Vec<(IpAddr, usize)> = vec![];
            let mut refused = 0;
            for s in steps {
                match s {
                    HostStep::Alloc(second) => {
                        let h = usize::from(second);
                        match hosts[h].request_address(pool, None, false).await {
                            Ok(a) => {
                                prop_assert!(live.iter().all(|(ip, _)| *ip != a.ip()), "duplicate {}", a.ip());
                                live.push((a.ip(), h));
                            }
                            Err(e) => {
                                refused += 1;
                                prop_assert_eq!(live.len(), 254, "refused with room left: {}", e);
                            }
                        }
                    }
                    HostStep::Release(i) if !live.is_empty() => {
                        let (ip, h) = live.remove(i % live.len());
                        hosts[h].release_address(pool, ip).await.unwrap();
                    }
                    HostStep::Release(_) => {}
                    HostStep::Restart(second) => {
                        let h = usize::from(second);
                        hosts[h] = host(store.clone(), &format!("h{}", h + 1));
                    }
                }
            }
            // Most cases run the pool dry (the point of the test).
            prop_assume!(refused > 0 || live.len() < 254);
            Ok(())
        })?;
    }
}
