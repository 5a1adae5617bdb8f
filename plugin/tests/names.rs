//! Names across hosts, above the Docker API and the kernel: what the
//! publisher writes to the store from what Docker says, and what the
//! resolver's table learns from the store. Docker is `FakeDocker`, the
//! kernel `FakeDataplane`, the store the memory store; the real client,
//! kernel and engines are tier 3 (tests/docker/names.sh).

mod fake_host;

use fake_host::{eventually, store, Host, SUBNET, VNI};
use kvstore_backends::{KvStore, LeaseId};
use rustoverlay::control::names::Names;
use rustoverlay::dataplane::Dataplane;
use rustoverlay::dns::{Forwarder, NameTable, Resolver, Upstreams};
use rustoverlay::docker::fake::FakeDocker;
use rustoverlay::docker::{Attachment, Change, Container, DockerApi, Network};
use rustoverlay::state::keys;
use rustoverlay::state::records::NameRecord;
use rustoverlay::sync::names::NameService;
use rustoverlay::sync::publish::Publisher;
use std::net::IpAddr;
use std::sync::{Arc, RwLock};
use std::time::Duration;
use tokio::sync::watch;

const OVERLAY: &str = "10.77.0.0_24";

struct Setup {
    host: Host,
    docker: Arc<FakeDocker>,
    table: Arc<RwLock<NameTable>>,
    lease: watch::Sender<Option<LeaseId>>,
    publisher: tokio::task::JoinHandle<()>,
}

impl Drop for Setup {
    fn drop(&mut self) {
        self.publisher.abort();
    }
}

fn web(endpoint: &str, ip: IpAddr, running: bool) -> Container {
    Container {
        id: "c-web".into(),
        running,
        attachments: vec![Attachment {
            network_id: "net-a".into(),
            endpoint_id: endpoint.into(),
            names: vec!["web".into(), "front".into()],
            addrs: vec![ip],
        }],
    }
}

async fn lease(store: &Arc<dyn KvStore>) -> LeaseId {
    store.grant_lease(Duration::from_secs(60)).await.unwrap()
}

/// Host "a" with network net-a ("appnet" in Docker), a publisher running
/// against `docker`, under a fresh lease.
async fn setup(docker: Arc<FakeDocker>) -> Setup {
    let s = store();
    let host = Host::start(&s, "a", "192.0.2.1").await;
    host.create_network("net-a", SUBNET).await;
    docker.set_network(Network {
        id: "net-a".into(),
        name: "appnet".into(),
        driver: "rustoverlay".into(),
        containers: vec!["c-web".into()],
    });
    let table = Arc::new(RwLock::new(NameTable::new("a")));
    let (lease_tx, lease_rx) = watch::channel(Some(lease(&s).await));
    let publisher = Publisher::new(
        docker.clone() as Arc<dyn DockerApi>,
        host.overlays.clone(),
        Names::new(s.clone(), "a"),
        table.clone(),
        lease_rx,
    );
    let publisher = tokio::spawn(publisher.run());
    Setup {
        host,
        docker,
        table,
        lease: lease_tx,
        publisher,
    }
}

async fn published(s: &Arc<dyn KvStore>, endpoint: &str) -> Option<NameRecord> {
    let kv = s
        .get(&keys::endpoint_names(OVERLAY, "a", endpoint))
        .await
        .unwrap()?;
    Some(serde_json::from_slice(&kv.value).unwrap())
}

async fn wait_published(s: &Arc<dyn KvStore>, endpoint: &str, want: bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while published(s, endpoint).await.is_some() != want {
        assert!(
            tokio::time::Instant::now() < deadline,
            "names of {endpoint} {} within 10 s",
            if want {
                "not published"
            } else {
                "still published"
            }
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn a_running_containers_names_are_published_and_withdrawn_when_it_stops() {
    let docker = Arc::new(FakeDocker::new());
    let ep = {
        let s = setup(docker.clone()).await;
        let ep = s.host.run("net-a", "ep1").await;
        s.docker.set_container(web("ep1", ep.ip(), true));
        s.docker.emit(Change::Container("c-web".into()));
        wait_published(&s.host.store, "ep1", true).await;
        let rec = published(&s.host.store, "ep1").await.unwrap();
        assert_eq!(rec.names, vec!["web", "front"]);
        assert_eq!(rec.addrs, vec![ep.ip()]);
        assert_eq!(rec.container, "c-web");
        // The table learned the overlay's Docker name, for `web.appnet`.
        s.table.write().unwrap().put(
            OVERLAY,
            rustoverlay::dns::NameEntry {
                host: "a".into(),
                endpoint: "ep1".into(),
                container: "c-web".into(),
                names: rec.names.clone(),
                addrs: rec.addrs.clone(),
            },
        );
        assert_eq!(
            s.table
                .read()
                .unwrap()
                .lookup(OVERLAY, "10.77.0.99".parse().unwrap(), "web.appnet"),
            Some(vec![ep.ip()])
        );

        // It dies: its names go, although the endpoint still exists.
        s.docker.set_container(web("ep1", ep.ip(), false));
        s.docker.emit(Change::Container("c-web".into()));
        wait_published(&s.host.store, "ep1", false).await;

        // It runs again, then is removed altogether.
        s.docker.set_container(web("ep1", ep.ip(), true));
        s.docker.emit(Change::Container("c-web".into()));
        wait_published(&s.host.store, "ep1", true).await;
        s.docker.remove_container("c-web");
        s.docker.emit(Change::Network {
            id: "net-a".into(),
            container: Some("c-web".into()),
        });
        wait_published(&s.host.store, "ep1", false).await;
        ep
    };
    assert_eq!(ep.endpoint_id, "ep1");
}

#[tokio::test]
async fn no_name_outlives_its_endpoint() {
    let docker = Arc::new(FakeDocker::new());
    let s = setup(docker).await;
    // A container whose endpoint has no record (being deleted): nothing.
    s.docker
        .set_container(web("ghost", "10.77.0.50".parse().unwrap(), true));
    s.docker.emit(Change::Container("c-web".into()));
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(published(&s.host.store, "ghost").await.is_none());

    // DeleteEndpoint takes the names with the record, in one transaction,
    // whatever the publisher does afterwards.
    let ep = s.host.run("net-a", "ep1").await;
    s.docker.set_container(web("ep1", ep.ip(), true));
    s.docker.emit(Change::Container("c-web".into()));
    wait_published(&s.host.store, "ep1", true).await;
    s.host.driver.leave("net-a", "ep1").await.unwrap();
    s.host.driver.delete_endpoint("net-a", "ep1").await.unwrap();
    assert!(published(&s.host.store, "ep1").await.is_none());
    s.docker.emit(Change::Container("c-web".into()));
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        published(&s.host.store, "ep1").await.is_none(),
        "a late event must not write the names of a deleted endpoint"
    );
}

#[tokio::test]
async fn a_new_lease_republishes_and_a_resync_withdraws_what_docker_no_longer_has() {
    let docker = Arc::new(FakeDocker::new());
    let s = setup(docker).await;
    let ep = s.host.run("net-a", "ep1").await;
    s.docker.set_container(web("ep1", ep.ip(), true));
    s.docker.emit(Change::Container("c-web".into()));
    wait_published(&s.host.store, "ep1", true).await;

    // The registration was lost: its lease and the names with it; a new
    // lease brings them back.
    let old = s.lease.borrow().clone().unwrap();
    s.host.store.revoke_lease(old).await.unwrap();
    wait_published(&s.host.store, "ep1", false).await;
    s.lease.send(Some(lease(&s.host.store).await)).unwrap();
    wait_published(&s.host.store, "ep1", true).await;

    // A record this host left behind (its container went while the plugin
    // was away) goes at the next full read: a dockerd restart.
    let stale = s.host.run("net-a", "ep-old").await;
    Names::new(s.host.store.clone(), "a")
        .publish(
            OVERLAY,
            "ep-old",
            &NameRecord {
                container: "c-gone".into(),
                names: vec!["gone".into()],
                addrs: vec![stale.ip()],
            },
            &lease(&s.host.store).await,
        )
        .await
        .unwrap();
    wait_published(&s.host.store, "ep-old", true).await;
    s.docker.restart();
    wait_published(&s.host.store, "ep-old", false).await;
    assert!(published(&s.host.store, "ep1").await.is_some());
}

#[tokio::test]
async fn without_a_docker_socket_the_overlay_works_and_names_start_when_it_appears() {
    let docker = Arc::new(FakeDocker::new());
    docker.set_missing(true);
    let s = setup(docker).await;
    let ep = s.host.run("net-a", "ep1").await;
    s.docker.set_container(web("ep1", ep.ip(), true));
    tokio::time::sleep(Duration::from_millis(700)).await;
    assert!(published(&s.host.store, "ep1").await.is_none());
    assert_eq!(s.docker.connects(), 0);
    s.docker.set_missing(false);
    wait_published(&s.host.store, "ep1", true).await;
}

#[tokio::test]
async fn the_resolver_table_follows_every_hosts_names_while_the_overlay_is_local() {
    let s = store();
    let host = Host::start(&s, "b", "192.0.2.2").await;
    // No upstream at all: nothing here is forwarded, and never outside.
    let nowhere = rustoverlay::dns::upstreams::Files {
        resolv_conf: "/nonexistent/resolv.conf".into(),
        resolved_conf: "/nonexistent/resolved.conf".into(),
    };
    let up = Upstreams::new(vec![], nowhere, "169.254.53.53".parse().unwrap());
    let resolver = Arc::new(Resolver {
        table: Arc::new(RwLock::new(NameTable::new("b"))),
        forwarder: Forwarder::new(Arc::new(up)),
        ttl: 2,
    });
    let names = NameService::new(
        s.clone(),
        host.fake.clone() as Arc<dyn Dataplane>,
        resolver.clone(),
        "169.254.53.53".parse().unwrap(),
    );
    let web: IpAddr = "10.77.0.2".parse().unwrap();
    let rec = NameRecord {
        container: "c1".into(),
        names: vec!["web".into()],
        addrs: vec![web],
    };
    let lease = lease(&s).await;
    s.put(
        &keys::endpoint_names(OVERLAY, "a", "ep1"),
        serde_json::to_vec(&rec).unwrap(),
    )
    .await
    .unwrap();
    host.fake.ensure_network(VNI).await.unwrap();
    names.ensure(OVERLAY, VNI);
    let client: IpAddr = "10.77.0.9".parse().unwrap();
    let lookup = |n: &str| resolver.table.read().unwrap().lookup(OVERLAY, client, n);
    eventually("web learned from the store", || {
        lookup("web") == Some(vec![web])
    })
    .await;

    // A second endpoint, on another host, under a lease.
    let rec2 = NameRecord {
        container: "c2".into(),
        names: vec!["api".into()],
        addrs: vec!["10.77.0.3".parse().unwrap()],
    };
    s.txn(
        kvstore_backends::Txn::new().and_then(vec![kvstore_backends::Op::put_with_lease(
            keys::endpoint_names(OVERLAY, "c", "ep2"),
            serde_json::to_vec(&rec2).unwrap(),
            lease.clone(),
        )]),
    )
    .await
    .unwrap();
    eventually("api learned from a watch event", || lookup("api").is_some()).await;
    s.revoke_lease(lease).await.unwrap();
    eventually("api gone with its host's lease", || lookup("api").is_none()).await;
    s.delete(&keys::endpoint_names(OVERLAY, "a", "ep1"))
        .await
        .unwrap();
    eventually("web gone with its record", || lookup("web").is_none()).await;

    // The overlay's devices go: no names are kept for it.
    s.put(
        &keys::endpoint_names(OVERLAY, "a", "ep1"),
        serde_json::to_vec(&rec).unwrap(),
    )
    .await
    .unwrap();
    eventually("web back", || lookup("web").is_some()).await;
    names.stop(VNI);
    assert_eq!(lookup("web"), None);
}
