//! An in-memory Docker engine for tests of the logic above the API (the
//! real client's own behaviour is tested against real dockerd in tier 3):
//! containers and networks a test sets, events it sends, and a socket that
//! can be missing.

use super::{
    Change, Container, DockerApi, DockerError, Network, NetworkConfig, NetworkSummary, Result,
};
use async_trait::async_trait;
use futures::stream::{BoxStream, StreamExt};
use std::collections::HashMap;
use std::sync::Mutex;
use tokio::sync::mpsc;

#[derive(Default)]
struct State {
    missing: bool,
    containers: HashMap<String, Container>,
    networks: HashMap<String, Network>,
    configs: HashMap<String, NetworkConfig>,
    created: usize,
    subscribers: Vec<mpsc::UnboundedSender<Result<Change>>>,
    connects: usize,
}

#[derive(Default)]
pub struct FakeDocker {
    state: Mutex<State>,
}

impl FakeDocker {
    pub fn new() -> Self {
        FakeDocker::default()
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// No socket: `connect` fails as on a host without dockerd.
    pub fn set_missing(&self, missing: bool) {
        self.state().missing = missing;
    }

    pub fn set_container(&self, container: Container) {
        self.state()
            .containers
            .insert(container.id.clone(), container);
    }

    pub fn remove_container(&self, id: &str) {
        self.state().containers.remove(id);
    }

    pub fn set_network(&self, network: Network) {
        self.state().networks.insert(network.id.clone(), network);
    }

    /// A network with the settings it was created with.
    pub fn set_network_config(&self, id: &str, config: NetworkConfig) {
        let mut st = self.state();
        st.networks.insert(
            id.to_string(),
            Network {
                id: id.to_string(),
                name: config.name.clone(),
                driver: config.driver.clone(),
                containers: vec![],
            },
        );
        st.configs.insert(id.to_string(), config);
    }

    /// The settings of every network, by ID.
    pub fn network_configs(&self) -> HashMap<String, NetworkConfig> {
        self.state().configs.clone()
    }

    /// Send an event to every open event stream.
    pub fn emit(&self, change: Change) {
        self.state()
            .subscribers
            .retain(|s| s.send(Ok(change.clone())).is_ok());
    }

    /// End every open event stream, as a dockerd restart does.
    pub fn restart(&self) {
        self.state().subscribers.clear();
    }

    /// How many times a client connected.
    pub fn connects(&self) -> usize {
        self.state().connects
    }
}

#[async_trait]
impl DockerApi for FakeDocker {
    async fn connect(&self) -> Result<String> {
        let mut st = self.state();
        if st.missing {
            return Err(DockerError::NoSocket("/fake/docker.sock".into()));
        }
        st.connects += 1;
        Ok("fake".into())
    }

    async fn events(&self) -> Result<BoxStream<'static, Result<Change>>> {
        let (tx, rx) = mpsc::unbounded_channel();
        self.state().subscribers.push(tx);
        Ok(tokio_stream_from(rx))
    }

    async fn container(&self, id: &str) -> Result<Option<Container>> {
        Ok(self.state().containers.get(id).cloned())
    }

    async fn network(&self, id: &str) -> Result<Option<Network>> {
        Ok(self.state().networks.get(id).cloned())
    }

    async fn network_config(&self, id: &str) -> Result<Option<NetworkConfig>> {
        Ok(self.state().configs.get(id).cloned())
    }

    async fn networks(&self) -> Result<Vec<NetworkSummary>> {
        Ok(self
            .state()
            .networks
            .values()
            .map(|n| NetworkSummary {
                id: n.id.clone(),
                name: n.name.clone(),
                driver: n.driver.clone(),
            })
            .collect())
    }

    async fn create_network(&self, config: &NetworkConfig) -> Result<String> {
        let id = {
            let mut st = self.state();
            if st.networks.values().any(|n| n.name == config.name) {
                return Err(DockerError::Api(format!(
                    "network with name {} already exists",
                    config.name
                )));
            }
            st.created += 1;
            format!("fake{:060}", st.created)
        };
        self.set_network_config(&id, config.clone());
        self.emit(Change::Network {
            id: id.clone(),
            container: None,
        });
        Ok(id)
    }

    async fn remove_network(&self, id: &str) -> Result<()> {
        let removed = {
            let mut st = self.state();
            st.configs.remove(id);
            st.networks.remove(id).is_some()
        };
        if removed {
            self.emit(Change::Network {
                id: id.to_string(),
                container: None,
            });
        }
        Ok(())
    }
}

fn tokio_stream_from(
    mut rx: mpsc::UnboundedReceiver<Result<Change>>,
) -> BoxStream<'static, Result<Change>> {
    futures::stream::poll_fn(move |cx| rx.poll_recv(cx)).boxed()
}
