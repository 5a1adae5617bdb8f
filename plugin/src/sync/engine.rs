//! The link to the local Docker engine of a loop that follows it (names,
//! cluster networks): connect, subscribe to events, and wait with back-off
//! while the socket is missing or the engine does not answer (a dockerd
//! restart), saying so once instead of on every try.

use crate::docker::{Change, DockerApi, DockerError};
use crate::util::backoff::Backoff;
use futures::stream::BoxStream;
use std::sync::Arc;
use std::time::Duration;

pub struct EngineLink {
    pub docker: Arc<dyn DockerApi>,
    backoff: Backoff,
    said_missing: bool,
    /// What waits for the engine, for the log ("names across hosts").
    what: &'static str,
}

impl EngineLink {
    pub fn new(docker: Arc<dyn DockerApi>, what: &'static str) -> Self {
        EngineLink {
            docker,
            backoff: Backoff::new(Duration::from_millis(500), Duration::from_secs(10)),
            said_missing: false,
            what,
        }
    }

    /// Docker's events from now on, once connected: waits until both work.
    pub async fn events(&mut self) -> BoxStream<'static, crate::docker::Result<Change>> {
        let what = self.what;
        loop {
            match self.docker.connect().await {
                Ok(version) => {
                    self.said_missing = false;
                    tracing::info!(docker = %version, "following the Docker API for {what}");
                }
                Err(DockerError::NoSocket(path)) => {
                    if !self.said_missing {
                        tracing::warn!(socket = %path, "no Docker socket: {what} are off until it appears (set --docker-socket); overlays work without them");
                        self.said_missing = true;
                    }
                    self.backoff.wait().await;
                    continue;
                }
                Err(e) => {
                    tracing::warn!(error = %e, retry_in = ?self.backoff.peek(), "cannot reach the Docker API; {what} wait");
                    self.backoff.wait().await;
                    continue;
                }
            }
            match self.docker.events().await {
                Ok(events) => return events,
                Err(e) => {
                    tracing::warn!(error = %e, "cannot follow Docker's events");
                    self.backoff.wait().await;
                }
            }
        }
    }

    /// Wait before the next try (after a failure).
    pub async fn pause(&mut self) {
        self.backoff.wait().await;
    }

    /// How long the next pause lasts, for the log.
    pub fn retry_in(&self) -> Duration {
        self.backoff.peek()
    }

    /// A try succeeded: the next failure waits the shortest pause again.
    pub fn settled(&mut self) {
        self.backoff.reset();
    }
}
