//! The supervisor: starts the long-running loops, owns this host's
//! readiness, and reacts to the registration's lease events. Loops get what
//! they need (a store, a reconciler, a channel), never the whole driver.

use super::membership::{LeaseEvent, Registration};
use super::readiness::Readiness;
use super::reaper::{self, ReaperConfig};
use super::reconcile::Reconciler;
use crate::util::task::spawn_supervised;
use kvstore_backends::KvStore;
use std::sync::Arc;
use tokio::sync::mpsc;

/// Start registration, start-up reconciliation and the reaper; returns the
/// readiness they maintain.
pub fn start(
    store: Arc<dyn KvStore>,
    host: String,
    registration: Registration,
    reconciler: Arc<Reconciler>,
    reaper_config: ReaperConfig,
) -> Readiness {
    let ready = Readiness::new(true);
    let (events_tx, events) = mpsc::channel(4);
    let events = Arc::new(tokio::sync::Mutex::new(events));
    spawn_supervised("registration", move || {
        let (registration, events_tx) = (registration.clone(), events_tx.clone());
        async move { registration.run(events_tx).await }
    });
    {
        let (ready, reconciler) = (ready.clone(), reconciler.clone());
        spawn_supervised("lease_events", move || {
            let (events, ready, reconciler) = (events.clone(), ready.clone(), reconciler.clone());
            async move { on_lease_events(&mut *events.lock().await, ready, reconciler).await }
        });
    }
    {
        let (ready, reconciler) = (ready.clone(), reconciler.clone());
        spawn_supervised("reaper", move || {
            reaper::run(
                store.clone(),
                host.clone(),
                ready.clone(),
                reconciler.clone(),
                reaper_config.clone(),
            )
        });
    }
    spawn_supervised("start-up reconciliation", move || {
        let reconciler = reconciler.clone();
        async move { reconciler.recover_until_done().await }
    });
    ready
}

/// A lost lease makes this host refuse Docker; a regained one serves again
/// once reconciled, since other hosts may have reclaimed what it held.
pub async fn on_lease_events(
    events: &mut mpsc::Receiver<LeaseEvent>,
    ready: Readiness,
    reconciler: Arc<Reconciler>,
) {
    while let Some(event) = events.recv().await {
        match event {
            LeaseEvent::Lost => ready.set(false),
            LeaseEvent::Regained(reply) => {
                let reconciled = match reconciler.recover().await {
                    Ok(()) => {
                        ready.set(true);
                        tracing::info!("reconciled after the lease loss; serving again");
                        true
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "reconciliation after the lease loss failed; retrying");
                        false
                    }
                };
                let _ = reply.send(reconciled);
            }
        }
    }
}
