//! Pauses between optimistic-concurrency retries.
//!
//! Hosts that lose a compare-and-swap race retry at once on the first loss,
//! then after a random pause that grows with each further loss. Without the
//! jitter, hosts racing on one pool cursor keep colliding in lock step.

use std::time::Duration;

/// Longest single pause.
const MAX_PAUSE_MS: u64 = 100;

/// Sleep before retry number `attempt` (0 = the first try, no pause).
pub async fn contention_pause(attempt: usize) {
    if attempt == 0 {
        return;
    }
    let ceiling = (1u64 << (attempt - 1).min(10)).min(MAX_PAUSE_MS);
    let micros = rand::random_range(0..ceiling * 1000);
    tokio::time::sleep(Duration::from_micros(micros)).await;
}
