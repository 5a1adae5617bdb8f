//! The one back-off of the plugin, in two uses.
//!
//! [`Retry`]: pauses between optimistic-concurrency retries. Hosts that lose
//! a compare-and-swap race retry at once on the first loss, then after a
//! random pause that grows with each further loss, unless the failed
//! transaction already read the winner's state ([`Retry::at_once`]: a pool's
//! cursor, a release): then at once, since a pause only lets fresh requests
//! in first and starves the host that keeps losing. Retries are bounded
//! by time, not by count: with N hosts racing, a given host wins a round with
//! probability about 1/N, so any fixed count is too small for some N, while
//! the time bound keeps Docker's request bounded.
//!
//! [`Backoff`]: pauses of long-running loops after a failure (a store that is
//! down, a watch that broke), doubling from a minimum to a maximum and reset
//! by a success, so a dead store costs little and a live one is found fast.

use std::future::Future;
use std::time::Duration;
use tokio::time::Instant;

tokio::task_local! {
    /// When the Docker request this task serves must have an answer.
    static REQUEST_DEADLINE: Instant;
}

/// Run `f` with a request deadline: every [`Retry`] inside ends by it, so
/// retries nested in one request (a pool reference inside a pool claim, an
/// allocation inside a gateway request) share one budget and the request
/// answers with our own error instead of being cut off mid-transaction.
pub async fn with_request_deadline<F: Future>(deadline: Instant, f: F) -> F::Output {
    REQUEST_DEADLINE.scope(deadline, f).await
}

/// Longest single pause between CAS retries.
const MAX_PAUSE_MS: u64 = 50;
/// How long one operation keeps retrying; below the request time limit so
/// the caller still answers Docker with our own error.
pub const RETRY_BUDGET: Duration = Duration::from_secs(20);

pub struct Retry {
    attempt: usize,
    deadline: Instant,
    /// The next try goes without a pause.
    at_once: bool,
}

impl Retry {
    /// Retries for [`RETRY_BUDGET`], or until the request deadline if one
    /// is set and earlier.
    pub fn new() -> Self {
        let budget = Instant::now() + RETRY_BUDGET;
        let deadline = REQUEST_DEADLINE
            .try_with(|d| (*d).min(budget))
            .unwrap_or(budget);
        Retry {
            attempt: 0,
            deadline,
            at_once: false,
        }
    }

    /// The next try goes at once: the caller lost a race but already holds
    /// the winner's state (a failed transaction's reads), so waiting only
    /// lets the next winner change it again. Pausing there starved hosts
    /// whose state was always one change old (a release storm on Consul).
    pub fn at_once(&mut self) {
        self.at_once = true;
    }

    /// Wait before the next try; false when the budget is spent.
    pub async fn next(&mut self) -> bool {
        if self.attempt > 0 {
            if Instant::now() >= self.deadline {
                return false;
            }
            if !std::mem::take(&mut self.at_once) {
                let ceiling = (1u64 << (self.attempt - 1).min(10)).min(MAX_PAUSE_MS);
                let micros = rand::random_range(0..ceiling * 1000);
                tokio::time::sleep(Duration::from_micros(micros)).await;
            }
        }
        self.attempt += 1;
        true
    }
}

/// Repeat a read until it answers or the request's budget is spent. After a
/// write whose answer was lost only a read tells what happened, and giving
/// up at the first failed read would leave the write's effect owned by
/// nobody.
pub async fn until_read<T, E, F, Fut>(read: F) -> Result<T, E>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, E>>,
{
    tracing::info!("a store write's answer was lost; reading back whether it applied");
    until_done(read, |_| true).await
}

/// Repeat `op` while it fails with an error `retryable` accepts, pausing
/// 100 ms doubling to 1 s, until the request's budget is spent (then the
/// last error).
pub async fn until_done<T, E, F, Fut>(mut op: F, retryable: impl Fn(&E) -> bool) -> Result<T, E>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, E>>,
{
    let deadline = Retry::new().deadline;
    let mut pause = Backoff::new(Duration::from_millis(100), Duration::from_secs(1));
    loop {
        match op().await {
            Ok(v) => return Ok(v),
            Err(e) if !retryable(&e) || Instant::now() + pause.peek() >= deadline => return Err(e),
            Err(_) => pause.wait().await,
        }
    }
}

impl Default for Retry {
    fn default() -> Self {
        Self::new()
    }
}

/// Doubling pauses for loops, from `min` up to `max`.
#[derive(Debug, Clone)]
pub struct Backoff {
    min: Duration,
    max: Duration,
    next: Duration,
}

impl Backoff {
    pub fn new(min: Duration, max: Duration) -> Self {
        Backoff {
            min,
            max,
            next: min,
        }
    }

    /// The pause the next [`Backoff::wait`] takes.
    pub fn peek(&self) -> Duration {
        self.next
    }

    /// Sleep for the current pause, then double it (up to the maximum).
    pub async fn wait(&mut self) {
        tokio::time::sleep(self.next).await;
        self.next = (self.next * 2).min(self.max);
    }

    /// A success: the next failure waits the minimum again.
    pub fn reset(&mut self) {
        self.next = self.min;
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

    #[tokio::test(start_paused = true)]
    async fn nested_retries_share_the_request_deadline() {
        let start = Instant::now();
        let deadline = start + Duration::from_secs(3);
        with_request_deadline(deadline, async {
            let mut outer = Retry::new();
            while outer.next().await {
                let mut inner = Retry::new();
                while inner.next().await {}
            }
        })
        .await;
        let took = start.elapsed();
        assert!(
            took >= Duration::from_secs(3) && took < Duration::from_secs(4),
            "{took:?}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn backoff_doubles_to_the_maximum_and_resets() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_millis(350));
        let mut seen = vec![];
        for _ in 0..4 {
            seen.push(b.peek());
            b.wait().await;
        }
        assert_eq!(
            seen,
            [100, 200, 350, 350].map(Duration::from_millis).to_vec()
        );
        b.reset();
        assert_eq!(b.peek(), Duration::from_millis(100));
    }
}
