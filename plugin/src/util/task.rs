//! Background tasks that outlive a panic: a loop that panics is logged and
//! started afresh after a pause, instead of ending silently while the
//! plugin goes on serving without it.

use super::backoff::Backoff;
use futures::FutureExt;
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::time::Duration;
use tokio::task::JoinHandle;

/// Spawn `make()`; whenever the future it made panics, log the panic and
/// spawn a fresh one. Ends when a future returns. Aborting the handle stops
/// the current future too (it runs inside the supervising task).
pub fn spawn_supervised<F, Fut>(name: &'static str, mut make: F) -> JoinHandle<()>
where
    F: FnMut() -> Fut + Send + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    tokio::spawn(async move {
        let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(10));
        while let Err(panic) = AssertUnwindSafe(make()).catch_unwind().await {
            let message = panic
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "a non-text panic".into());
            tracing::error!(task = name, panic = %message, restart_in = ?backoff.peek(), "background task panicked; restarting it");
            backoff.wait().await;
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;

    #[tokio::test(start_paused = true)]
    async fn a_panicking_task_is_restarted_until_it_returns() {
        let runs = Arc::new(AtomicUsize::new(0));
        let counter = runs.clone();
        let handle = spawn_supervised("test", move || {
            let counter = counter.clone();
            async move {
                if counter.fetch_add(1, Ordering::SeqCst) < 2 {
                    panic!("boom");
                }
            }
        });
        handle.await.expect("the supervisor itself does not panic");
        assert_eq!(runs.load(Ordering::SeqCst), 3);
    }
}
