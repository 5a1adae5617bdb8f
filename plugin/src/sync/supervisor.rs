//! The supervisor: starts the long-running loops, owns this host's
//! readiness, and reacts to the registration's lease events. Loops get what
//! they need (a store, a reconciler, a channel), never the whole driver.

use super::membership::{LeaseEvent, LiveSet, Registration};
use super::readiness::Readiness;
use super::reaper::{self, ReaperConfig};
use super::reconcile::Reconciler;
use crate::util::task::spawn_supervised;
use kvstore_backends::KvStore;
use std::sync::Arc;
use tokio::sync::{mpsc, watch};

/// What the supervisor hands back to the server.
pub struct Running {
    /// Whether this host may serve Docker now.
    pub ready: Readiness,
    /// Set when this plugin must stop (another machine holds its host ID).
    pub fatal: watch::Receiver<Option<String>>,
}

/// Start registration, start-up reconciliation and the reaper.
pub fn start(
    store: Arc<dyn KvStore>,
    host: String,
    registration: Registration,
    reconciler: Arc<Reconciler>,
    reaper_config: ReaperConfig,
    live: watch::Receiver<LiveSet>,
) -> Running {
    let ready = Readiness::new(true);
    let (fatal_tx, fatal) = watch::channel(None);
    let fatal_tx = Arc::new(fatal_tx);
    let (events_tx, events) = mpsc::channel(4);
    let events = Arc::new(tokio::sync::Mutex::new(events));
    // The reaper role is held under the registration's lease.
    let renewals = registration.renewals();
    spawn_supervised("registration", move || {
        let (registration, events_tx) = (registration.clone(), events_tx.clone());
        async move { registration.run(events_tx).await }
    });
    {
        let (ready, reconciler) = (ready.clone(), reconciler.clone());
        spawn_supervised("lease_events", move || {
            let (events, ready, reconciler, fatal) = (
                events.clone(),
                ready.clone(),
                reconciler.clone(),
                fatal_tx.clone(),
            );
            async move { on_lease_events(&mut *events.lock().await, ready, reconciler, &fatal).await }
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
                live.clone(),
                renewals.clone(),
            )
        });
    }
    spawn_supervised("start-up reconciliation", move || {
        let reconciler = reconciler.clone();
        async move { reconciler.recover_until_done().await }
    });
    Running { ready, fatal }
}

/// A lost lease makes this host refuse Docker; a regained one serves again
/// once reconciled, since other hosts may have reclaimed what it held.
pub async fn on_lease_events(
    events: &mut mpsc::Receiver<LeaseEvent>,
    ready: Readiness,
    reconciler: Arc<Reconciler>,
    fatal: &watch::Sender<Option<String>>,
) {
    while let Some(event) = events.recv().await {
        match event {
            LeaseEvent::Lost => ready.set(false),
            LeaseEvent::Clash(why) => {
                ready.set(false);
                fatal.send_replace(Some(why));
            }
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
