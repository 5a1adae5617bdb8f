//! Names across hosts, wired for `serve`: the resolver shared by every
//! listener, the host's listener, and the publisher of this host's names.

use crate::cli::DnsArgs;
use crate::control::names::Names;
use crate::control::overlay::Overlays;
use crate::dataplane::Dataplane;
use crate::dns::{self, DockerBridges, Forwarder, NameTable, Resolver, Scope, Upstreams};
use crate::docker::client::Client;
use crate::sync::names::NameService;
use crate::sync::publish::Publisher;
use crate::util::backoff::Backoff;
use crate::util::task::spawn_supervised;
use kvstore_backends::{KvStore, LeaseId};
use std::sync::{Arc, RwLock};
use std::time::Duration;
use tokio::sync::watch;

/// The resolver and the per-overlay name service, or `None` with --no-dns.
pub fn name_service(
    args: &DnsArgs,
    store: Arc<dyn KvStore>,
    dataplane: Arc<dyn Dataplane>,
    host: &str,
) -> Option<Arc<NameService>> {
    if args.no_dns {
        tracing::info!("names across hosts are off (--no-dns)");
        return None;
    }
    let upstreams = Upstreams::new(
        args.dns_upstream.clone(),
        dns::upstreams::Files {
            resolv_conf: args.resolv_conf.clone(),
            resolved_conf: args.resolved_conf.clone(),
        },
        args.dns_address.into(),
    );
    let resolver = Arc::new(Resolver {
        table: Arc::new(RwLock::new(NameTable::new(host))),
        forwarder: Forwarder::new(Arc::new(upstreams)),
        ttl: args.dns_ttl,
    });
    Some(Arc::new(NameService::new(
        store,
        dataplane,
        resolver,
        args.dns_address,
    )))
}

/// The host's listener (for Docker's bridges and the host network) and the
/// publisher of this host's container names.
pub async fn start(
    args: &DnsArgs,
    names: &NameService,
    dataplane: Arc<dyn Dataplane>,
    overlays: Arc<Overlays>,
    store: Arc<dyn KvStore>,
    host: &str,
    lease: watch::Receiver<Option<LeaseId>>,
) {
    let resolver = names.resolver().clone();
    let acl: Arc<dyn dns::Acl> = Arc::new(DockerBridges {
        extra: args.dns_interface.clone(),
    });
    let address = args.dns_address;
    spawn_supervised("host_dns", move || {
        host_listener(dataplane.clone(), resolver.clone(), acl.clone(), address)
    });
    let docker: Arc<dyn crate::docker::DockerApi> = Arc::new(Client::new(&args.docker_socket));
    let (table, host) = (names.table().clone(), host.to_string());
    spawn_supervised("names_publish", move || {
        let publisher = Publisher::new(
            docker.clone(),
            overlays.clone(),
            Names::new(store.clone(), &host),
            table.clone(),
            lease.clone(),
        );
        publisher.run()
    });
}

/// Serve the host's listener, setting it up again (with back-off) whenever
/// that fails or a socket breaks: every container outside our overlays that
/// uses the address depends on it.
async fn host_listener(
    dataplane: Arc<dyn Dataplane>,
    resolver: Arc<Resolver>,
    acl: Arc<dyn dns::Acl>,
    address: std::net::Ipv4Addr,
) {
    let mut backoff = Backoff::new(Duration::from_millis(500), Duration::from_secs(30));
    let mut said = String::new();
    loop {
        let sockets = match dataplane.host_dns_listener(address).await {
            Ok(s) => s,
            Err(e) => {
                // Once per distinct cause, not once per try.
                if e.to_string() != said {
                    said = e.to_string();
                    tracing::error!(
                        %address,
                        error = %e,
                        "no resolver on the host yet: containers outside our overlays that use it as their DNS server get no answers; \
                         is another DNS server bound to port 53 on all addresses? (or choose --dns-address)"
                    );
                }
                backoff.wait().await;
                continue;
            }
        };
        let (udp, tcp) = match sockets.into_tokio() {
            Ok(pair) => pair,
            Err(e) => {
                tracing::error!(error = %e, "cannot register the host resolver's sockets");
                backoff.wait().await;
                continue;
            }
        };
        if !said.is_empty() {
            said.clear();
        }
        tracing::info!(%address, "resolver listening on the host");
        backoff.reset();
        tokio::select! {
            _ = dns::server::serve_udp_filtered(resolver.clone(), udp, acl.clone()) => {}
            _ = dns::server::serve_tcp(resolver.clone(), Scope::Host, tcp, Some(acl.clone())) => {}
        }
        backoff.wait().await;
    }
}
