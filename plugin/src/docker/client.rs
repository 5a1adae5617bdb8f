//! [`DockerApi`] over the engine's unix socket, with bollard.
//!
//! The API version is negotiated down to the engine's (Docker 20.10 speaks
//! 1.41, 26 speaks 1.45): bollard's own default is newer than either engine.

use super::{
    dns_names, Attachment, Change, Container, DockerApi, DockerError, IpamPool, Network,
    NetworkConfig, NetworkSummary, Result,
};
use async_trait::async_trait;
use bollard::query_parameters::EventsOptions;
use bollard::Docker;
use futures::stream::{BoxStream, StreamExt};
use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::sync::RwLock;

/// Bounds each request's answer (not the event stream, which stays open).
const REQUEST_TIMEOUT_S: u64 = 10;

pub struct Client {
    socket: String,
    docker: RwLock<Option<Docker>>,
}

impl Client {
    /// `socket` is a path or a `unix://` URL. Nothing is opened before
    /// [`DockerApi::connect`].
    pub fn new(socket: &str) -> Self {
        Client {
            socket: socket.trim_start_matches("unix://").to_string(),
            docker: RwLock::new(None),
        }
    }

    fn docker(&self) -> Result<Docker> {
        self.docker
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
            .ok_or_else(|| DockerError::Api("not connected".into()))
    }
}

fn api(e: bollard::errors::Error) -> DockerError {
    DockerError::Api(e.to_string())
}

fn not_found(e: &bollard::errors::Error) -> bool {
    matches!(
        e,
        bollard::errors::Error::DockerResponseServerError {
            status_code: 404,
            ..
        }
    )
}

fn parse_ip(s: Option<&String>) -> Option<IpAddr> {
    s.filter(|s| !s.is_empty()).and_then(|s| s.parse().ok())
}

#[async_trait]
impl DockerApi for Client {
    async fn connect(&self) -> Result<String> {
        if !std::path::Path::new(&self.socket).exists() {
            return Err(DockerError::NoSocket(self.socket.clone()));
        }
        let docker = Docker::connect_with_unix(
            &self.socket,
            REQUEST_TIMEOUT_S,
            bollard::API_DEFAULT_VERSION,
        )
        .map_err(api)?
        .negotiate_version()
        .await
        .map_err(api)?;
        let version = docker.version().await.map_err(api)?;
        *self.docker.write().unwrap_or_else(|p| p.into_inner()) = Some(docker);
        Ok(format!(
            "{} (API {})",
            version.version.unwrap_or_default(),
            version.api_version.unwrap_or_default()
        ))
    }

    async fn events(&self) -> Result<BoxStream<'static, Result<Change>>> {
        let docker = self.docker()?;
        let filters = HashMap::from([
            (
                "type".to_string(),
                vec!["container".to_string(), "network".to_string()],
            ),
            (
                "event".to_string(),
                [
                    "start",
                    "die",
                    "destroy",
                    "rename",
                    "connect",
                    "disconnect",
                    "create",
                ]
                .map(String::from)
                .to_vec(),
            ),
        ]);
        let options = EventsOptions {
            filters: Some(filters),
            ..Default::default()
        };
        let stream = docker.events(Some(options)).filter_map(|item| async move {
            let event = match item {
                Ok(e) => e,
                Err(e) => return Some(Err(api(e))),
            };
            let actor = event.actor?;
            let id = actor.id?;
            let typ = event.typ.map(|t| t.to_string()).unwrap_or_default();
            Some(Ok(match typ.as_str() {
                "container" => Change::Container(id),
                "network" => Change::Network {
                    id,
                    container: actor.attributes.and_then(|mut a| a.remove("container")),
                },
                _ => return None,
            }))
        });
        Ok(stream.boxed())
    }

    async fn container(&self, id: &str) -> Result<Option<Container>> {
        let found = match self.docker()?.inspect_container(id, None).await {
            Ok(c) => c,
            Err(e) if not_found(&e) => return Ok(None),
            Err(e) => return Err(api(e)),
        };
        let name = found.name.unwrap_or_default();
        let running = found
            .state
            .as_ref()
            .and_then(|s| s.running)
            .unwrap_or(false);
        let networks = found
            .network_settings
            .and_then(|s| s.networks)
            .unwrap_or_default();
        let attachments = networks
            .into_values()
            .filter_map(|ep| {
                let addrs = [
                    parse_ip(ep.ip_address.as_ref()),
                    parse_ip(ep.global_ipv6_address.as_ref()),
                ]
                .into_iter()
                .flatten()
                .collect();
                Some(Attachment {
                    network_id: ep.network_id.filter(|s| !s.is_empty())?,
                    endpoint_id: ep.endpoint_id.filter(|s| !s.is_empty())?,
                    names: dns_names(
                        &name,
                        ep.aliases.as_deref().unwrap_or_default(),
                        ep.dns_names.as_deref(),
                    ),
                    addrs,
                })
            })
            .collect();
        Ok(Some(Container {
            id: found.id.unwrap_or_else(|| id.to_string()),
            running,
            attachments,
        }))
    }

    async fn network(&self, id: &str) -> Result<Option<Network>> {
        let found = match self.docker()?.inspect_network(id, None).await {
            Ok(n) => n,
            Err(e) if not_found(&e) => return Ok(None),
            Err(e) => return Err(api(e)),
        };
        Ok(Some(Network {
            id: found.id.unwrap_or_else(|| id.to_string()),
            name: found.name.unwrap_or_default(),
            driver: found.driver.unwrap_or_default(),
            containers: found
                .containers
                .map(|c| c.into_keys().collect())
                .unwrap_or_default(),
        }))
    }

    async fn network_config(&self, id: &str) -> Result<Option<NetworkConfig>> {
        let found = match self.docker()?.inspect_network(id, None).await {
            Ok(n) => n,
            Err(e) if not_found(&e) => return Ok(None),
            Err(e) => return Err(api(e)),
        };
        let ipam = found.ipam.unwrap_or_default();
        Ok(Some(NetworkConfig {
            name: found.name.unwrap_or_default(),
            driver: found.driver.unwrap_or_default(),
            options: sorted(found.options),
            labels: sorted(found.labels),
            internal: found.internal.unwrap_or(false),
            attachable: found.attachable.unwrap_or(false),
            enable_ipv6: found.enable_ipv6.unwrap_or(false),
            ipam_driver: ipam.driver.unwrap_or_default(),
            ipam_options: sorted(ipam.options),
            ipam: ipam
                .config
                .unwrap_or_default()
                .into_iter()
                .map(|c| IpamPool {
                    subnet: c.subnet.unwrap_or_default(),
                    ip_range: c.ip_range.filter(|s| !s.is_empty()),
                    gateway: c.gateway.filter(|s| !s.is_empty()),
                    aux: sorted(c.auxiliary_addresses),
                })
                .collect(),
        }))
    }

    async fn networks(&self) -> Result<Vec<NetworkSummary>> {
        let list = self
            .docker()?
            .list_networks(None::<bollard::query_parameters::ListNetworksOptions>)
            .await
            .map_err(api)?;
        Ok(list
            .into_iter()
            .filter_map(|n| {
                Some(NetworkSummary {
                    id: n.id?,
                    name: n.name.unwrap_or_default(),
                    driver: n.driver.unwrap_or_default(),
                })
            })
            .collect())
    }

    async fn create_network(&self, config: &NetworkConfig) -> Result<String> {
        use bollard::models::{Ipam, IpamConfig, NetworkCreateRequest};
        let unsorted = |m: &BTreeMap<String, String>| -> HashMap<String, String> {
            m.iter().map(|(k, v)| (k.clone(), v.clone())).collect()
        };
        let request = NetworkCreateRequest {
            name: config.name.clone(),
            driver: Some(config.driver.clone()),
            internal: Some(config.internal),
            attachable: Some(config.attachable),
            enable_ipv6: Some(config.enable_ipv6),
            options: Some(unsorted(&config.options)),
            labels: Some(unsorted(&config.labels)),
            ipam: Some(Ipam {
                driver: Some(config.ipam_driver.clone()),
                options: Some(unsorted(&config.ipam_options)),
                config: Some(
                    config
                        .ipam
                        .iter()
                        .map(|p| IpamConfig {
                            subnet: Some(p.subnet.clone()),
                            ip_range: p.ip_range.clone(),
                            gateway: p.gateway.clone(),
                            auxiliary_addresses: Some(unsorted(&p.aux)),
                        })
                        .collect(),
                ),
            }),
            ..Default::default()
        };
        let created = self.docker()?.create_network(request).await.map_err(api)?;
        Ok(created.id)
    }

    async fn remove_network(&self, id: &str) -> Result<()> {
        match self.docker()?.remove_network(id).await {
            Ok(()) => Ok(()),
            Err(e) if not_found(&e) => Ok(()),
            Err(e) => Err(api(e)),
        }
    }
}

fn sorted(map: Option<HashMap<String, String>>) -> BTreeMap<String, String> {
    map.unwrap_or_default().into_iter().collect()
}
