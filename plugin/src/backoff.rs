//! Pauses between optimistic-concurrency retries.
//!
//! Hosts that lose a compare-and-swap race retry at once on the first loss,
//! then after a random pause that grows with each further loss. Without the
//! jitter, hosts racing on one pool cursor keep colliding in lock step.
//! Retries are bounded by time, not by count: with N hosts racing, a given
//! host wins a round with probability about 1/N, so any fixed count is too
//! small for some N, while the time bound keeps Docker's request bounded.

use std::time::Duration;
use tokio::time::Instant;

/// Longest single pause.
const MAX_PAUSE_MS: u64 = 50;
/// How long one operation keeps retrying; below the request time limit so
/// the caller still answers Docker with our own error.
pub const RETRY_BUDGET: Duration = Duration::from_secs(20);

pub struct Retry {
    attempt: usize,
    deadline: Instant,
}

impl Retry {
    pub fn new() -> Self {
        Retry {
            attempt: 0,
            deadline: Instant::now() + RETRY_BUDGET,
        }
    }

    /// Wait before the next try; false when the budget is spent.
    pub async fn next(&mut self) -> bool {
        if self.attempt > 0 {
            if Instant::now() >= self.deadline {
                return false;
            }
            let ceiling = (1u64 << (self.attempt - 1).min(10)).min(MAX_PAUSE_MS);
            let micros = rand::random_range(0..ceiling * 1000);
            tokio::time::sleep(Duration::from_micros(micros)).await;
        }
        self.attempt += 1;
        true
    }
}

impl Default for Retry {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn retries_until_the_budget_is_spent() {
        let mut r = Retry::new();
        let mut n = 0;
        while r.next().await {
            n += 1;
            if n > 100_000 {
                break;
            }
        }
        assert!(n > 10 && n < 100_000, "{n} tries");
    }
}
