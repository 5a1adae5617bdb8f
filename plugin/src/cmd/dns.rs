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
use crate::util::task::spawn_supervised;
use kvstore_backends::{KvStore, LeaseId};
use std::sync::{Arc, RwLock};
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
    dataplane: &dyn Dataplane,
    overlays: Arc<Overlays>,
    store: Arc<dyn KvStore>,
    host: &str,
    lease: watch::Receiver<Option<LeaseId>>,
) {
    let resolver = names.resolver().clone();
    match dataplane.host_dns_listener(args.dns_address).await {
        Ok(sockets) => {
            let acl: Arc<dyn dns::Acl> = Arc::new(DockerBridges {
                extra: args.dns_interface.clone(),
            });
            match (
                tokio::net::UdpSocket::from_std(sockets.udp),
                tokio::net::TcpListener::from_std(sockets.tcp),
            ) {
                (Ok(udp), Ok(tcp)) => {
                    tokio::spawn(dns::server::serve_udp_filtered(
                        resolver.clone(),
                        udp,
                        acl.clone(),
                    ));
                    tokio::spawn(dns::server::serve_tcp(
                        resolver,
                        Scope::Host,
                        tcp,
                        Some(acl),
                    ));
                    tracing::info!(address = %args.dns_address, "resolver listening on the host");
                }
                (Err(e), _) | (_, Err(e)) => {
                    tracing::error!(error = %e, "cannot register the host resolver's sockets")
                }
            }
        }
        Err(e) => tracing::error!(
            address = %args.dns_address,
            error = %e,
            "no resolver on the host: containers outside our overlays that use it as their DNS server get no answers; \
             is another DNS server bound to port 53 on all addresses? (or choose --dns-address)"
        ),
    }
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
