//! IPAM on the store, without root: cost in store round trips, several hosts
//! sharing one store, and a property test against a simple model.

use ipnetwork::{IpNetwork, Ipv4Network};
use kvstore_backends::{CountingStore, KvStore, MemoryStore};
use proptest::prelude::*;
use rustoverlay::api::parse::pool_request;
use rustoverlay::control::ipam::{Ipam, PoolRequest};
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
    assert_eq!(
        h2.request_address(pool, None, false)
            .await
            .unwrap()
            .ip()
            .to_string(),
        "10.5.0.3"
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
