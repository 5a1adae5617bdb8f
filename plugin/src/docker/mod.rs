//! The local Docker engine's API, seen from the plugin: which containers
//! hold our endpoints and under which names, and the events that change it.
//!
//! Docker tells a network plugin neither container names nor network names;
//! only its HTTP API does. The plugin must never call it from inside a
//! plugin request, because dockerd waits on us there: every call here is
//! made by a background loop (`sync::names`), never by `driver` or `api`.
//!
//! [`DockerApi`] is the seam; [`client::Client`] (bollard over the unix
//! socket) the one real implementation.

pub mod client;
pub mod fake;

use async_trait::async_trait;
use futures::stream::BoxStream;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::net::IpAddr;

/// What went wrong talking to Docker.
#[derive(Debug, thiserror::Error)]
pub enum DockerError {
    #[error("the Docker socket {0} does not exist")]
    NoSocket(String),
    #[error("Docker API: {0}")]
    Api(String),
}

pub type Result<T> = std::result::Result<T, DockerError>;

/// A container's endpoint on one network, as Docker reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Attachment {
    pub network_id: String,
    /// Docker's EndpointID: the ID our CreateEndpoint was given.
    pub endpoint_id: String,
    /// The names Docker's own DNS gives the container on that network:
    /// name, aliases (compose service names are aliases), and on Docker 25+
    /// its short ID and hostname.
    pub names: Vec<String>,
    pub addrs: Vec<IpAddr>,
}

/// A container and its network endpoints.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Container {
    pub id: String,
    pub running: bool,
    pub attachments: Vec<Attachment>,
}

/// A network as this engine has it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Network {
    pub id: String,
    pub name: String,
    pub driver: String,
    /// IDs of this engine's containers on it.
    pub containers: Vec<String>,
}

/// Everything `docker network create` takes, as the engine reports it: what
/// a cluster network's replica on another host is created from.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetworkConfig {
    pub name: String,
    pub driver: String,
    #[serde(default)]
    pub options: BTreeMap<String, String>,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    #[serde(default)]
    pub internal: bool,
    #[serde(default)]
    pub attachable: bool,
    #[serde(default)]
    pub enable_ipv6: bool,
    pub ipam_driver: String,
    #[serde(default)]
    pub ipam_options: BTreeMap<String, String>,
    #[serde(default)]
    pub ipam: Vec<IpamPool>,
}

/// One `--subnet` of a network, with its `--ip-range`, `--gateway` and
/// `--aux-address` settings.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct IpamPool {
    pub subnet: String,
    pub ip_range: Option<String>,
    pub gateway: Option<String>,
    #[serde(default)]
    pub aux: BTreeMap<String, String>,
}

/// A network in the engine's list.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetworkSummary {
    pub id: String,
    pub name: String,
    pub driver: String,
}

/// Something happened that may change names: re-read that object.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    Container(String),
    /// A network was created, removed, or a container (de)attached to it.
    Network {
        id: String,
        container: Option<String>,
    },
}

#[async_trait]
pub trait DockerApi: Send + Sync + 'static {
    /// Agree on an API version with the engine; its version, for the log.
    async fn connect(&self) -> Result<String>;

    /// Container and network events from now on. The stream ends when the
    /// engine goes away (a dockerd restart).
    async fn events(&self) -> Result<BoxStream<'static, Result<Change>>>;

    /// The container, or `None` when it no longer exists.
    async fn container(&self, id: &str) -> Result<Option<Container>>;

    /// The network, or `None` when it no longer exists.
    async fn network(&self, id: &str) -> Result<Option<Network>>;

    /// How the network was created, or `None` when it no longer exists.
    async fn network_config(&self, id: &str) -> Result<Option<NetworkConfig>>;

    /// Every network the engine shows (networks being removed are hidden).
    async fn networks(&self) -> Result<Vec<NetworkSummary>>;

    /// Create a network; its ID.
    async fn create_network(&self, config: &NetworkConfig) -> Result<String>;

    /// Remove a network. Already gone is fine.
    async fn remove_network(&self, id: &str) -> Result<()>;
}

/// The names of a container on one network, as Docker's embedded DNS knows
/// them: `DNSNames` where the engine reports it (API 1.44+), else the
/// container's name and the endpoint's aliases. Lower case, no duplicates.
pub fn dns_names(
    container_name: &str,
    aliases: &[String],
    dns_names: Option<&[String]>,
) -> Vec<String> {
    let mut names: Vec<String> = match dns_names {
        Some(list) if !list.is_empty() => list.to_vec(),
        _ => std::iter::once(container_name.trim_start_matches('/').to_string())
            .chain(aliases.iter().cloned())
            .collect(),
    };
    for n in &mut names {
        *n = n.to_lowercase();
    }
    names.retain(|n| !n.is_empty());
    names.sort();
    names.dedup();
    names
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_follow_dns_names_when_the_engine_gives_them() {
        let aliases = vec!["Web".to_string(), "0123456789ab".to_string()];
        assert_eq!(
            dns_names("/app-web-1", &aliases, None),
            vec!["0123456789ab", "app-web-1", "web"]
        );
        let dns = vec![
            "app-web-1".to_string(),
            "web".to_string(),
            "web".to_string(),
        ];
        assert_eq!(
            dns_names("/app-web-1", &aliases, Some(&dns)),
            vec!["app-web-1", "web"]
        );
        assert_eq!(dns_names("/x", &[], Some(&[])), vec!["x"]);
    }
}
