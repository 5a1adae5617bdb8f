//! Whether this host may act on what it holds: shared by the supervisor,
//! which sets it, and the loops and the API, which read it or wait for it.

use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;

/// False while this host re-registers after losing its lease: it must not
/// act on ownership it may have lost until it has reconciled.
#[derive(Debug, Clone)]
pub struct Readiness(Arc<watch::Sender<bool>>);

impl Readiness {
    pub fn new(ready: bool) -> Self {
        Readiness(Arc::new(watch::Sender::new(ready)))
    }

    pub fn is_ready(&self) -> bool {
        *self.0.borrow()
    }

    pub(crate) fn set(&self, ready: bool) {
        self.0.send_replace(ready);
    }

    /// Waits up to `within` for the host to be ready; true if it is. A
    /// request that arrives in the seconds between the store's return and
    /// the re-registration is served instead of refused: Docker does not
    /// repeat a refused Leave or DeleteEndpoint, it keeps the endpoint.
    pub async fn wait(&self, within: Duration) -> bool {
        let mut rx = self.0.subscribe();
        let waited = tokio::time::timeout(within, rx.wait_for(|ready| *ready)).await;
        matches!(waited, Ok(Ok(_)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn wait_returns_once_ready_or_after_the_bound() {
        let ready = Readiness::new(false);
        assert!(!ready.wait(Duration::from_secs(2)).await);
        let setter = ready.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_secs(1)).await;
            setter.set(true);
        });
        let t0 = tokio::time::Instant::now();
        assert!(ready.wait(Duration::from_secs(5)).await);
        assert_eq!(t0.elapsed(), Duration::from_secs(1));
        assert!(ready.wait(Duration::ZERO).await, "ready: no wait at all");
    }
}
