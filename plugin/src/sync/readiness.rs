//! Whether this host may act on what it holds: shared by the supervisor,
//! which sets it, and the loops and the API, which read it.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

/// False while this host re-registers after losing its lease: it must not
/// act on ownership it may have lost until it has reconciled.
#[derive(Debug, Clone)]
pub struct Readiness(Arc<AtomicBool>);

impl Readiness {
    pub fn new(ready: bool) -> Self {
        Readiness(Arc::new(AtomicBool::new(ready)))
    }

    pub fn is_ready(&self) -> bool {
        self.0.load(Ordering::Acquire)
    }

    pub(super) fn set(&self, ready: bool) {
        self.0.store(ready, Ordering::Release);
    }
}
