//! The server's state behind its lock, shared by the connections: changes
//! wake the blocking queries (a renewal or a read-only txn, which are no
//! raft writes in Consul, do not); the random numbers for jitter and session
//! IDs; the failures a test injects; and the clock that expires sessions
//! and reaps tombstones.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::state::State;
use crate::{lock, Config, Failure};

pub(crate) struct Shared {
    state: Mutex<State>,
    /// Bumped after every change, to wake blocking queries.
    changed: tokio::sync::watch::Sender<u64>,
    config: Config,
    rng: Mutex<u64>,
    /// Failures injected by the test (see [`crate::TestServer::fail_next`]).
    fault: Mutex<Option<Fault>>,
}

/// Requests failing on purpose: the next `remaining` ones, or all until
/// `until`.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Fault {
    pub failure: Failure,
    pub remaining: Option<usize>,
    pub until: Option<Instant>,
}

impl Shared {
    pub fn new(config: Config) -> Self {
        let seed = {
            use std::hash::{BuildHasher, Hasher};
            let mut h = std::collections::hash_map::RandomState::new().build_hasher();
            h.write_u64(0x5eed);
            h.finish() | 1
        };
        Shared {
            state: Mutex::new(State::new()),
            changed: tokio::sync::watch::channel(0).0,
            config,
            rng: Mutex::new(seed),
            fault: Mutex::new(None),
        }
    }

    pub fn with_state<T>(&self, f: impl FnOnce(&State) -> T) -> T {
        f(&lock(&self.state))
    }

    /// Changes the state and wakes the blocking queries.
    pub(crate) fn mutate<T>(&self, f: impl FnOnce(&mut State) -> T) -> T {
        let out = f(&mut lock(&self.state));
        self.changed.send_modify(|n| *n += 1);
        out
    }

    /// Changes the state without waking the blocking queries: for what is no
    /// raft write in Consul (a session renewal, a read-only txn).
    pub(crate) fn mutate_quietly<T>(&self, f: impl FnOnce(&mut State) -> T) -> T {
        f(&mut lock(&self.state))
    }

    /// Wakes up after every change of the state.
    pub(crate) fn subscribe(&self) -> tokio::sync::watch::Receiver<u64> {
        self.changed.subscribe()
    }

    pub(crate) fn config(&self) -> &Config {
        &self.config
    }

    /// xorshift: good enough for jitter and session IDs in tests.
    pub(crate) fn random(&self) -> u64 {
        let mut x = lock(&self.rng);
        *x ^= *x << 13;
        *x ^= *x >> 7;
        *x ^= *x << 17;
        *x
    }

    /// A session's next deadline: exactly 2x TTL from now. Consul documents
    /// the TTL as a lower bound and invalidates some time between TTL and 2x
    /// TTL (its timers run at 2x TTL); the latest end is the worst case a
    /// client must cope with, so that is what the tests see.
    pub(crate) fn deadline(&self, ttl: Option<Duration>, now: Instant) -> Option<Instant> {
        ttl.map(|ttl| now + ttl * 2)
    }

    /// Makes requests fail as `fault` says from now on (replacing any
    /// earlier fault).
    pub(crate) fn set_fault(&self, fault: Option<Fault>) {
        *lock(&self.fault) = fault;
    }

    /// The failure the next request gets, if a fault is active; counts it.
    pub(crate) fn take_fault(&self) -> Option<Failure> {
        let mut slot = lock(&self.fault);
        let fault = slot.as_mut()?;
        let failure = fault.failure;
        let active = match (&mut fault.remaining, fault.until) {
            (Some(n), _) if *n > 0 => {
                *n -= 1;
                true
            }
            (Some(_), _) => false,
            (None, Some(until)) => Instant::now() < until,
            (None, None) => true,
        };
        if active {
            Some(failure)
        } else {
            *slot = None;
            None
        }
    }

    pub fn reset_session_timers(&self) {
        let now = Instant::now();
        let ttls: Vec<(String, Option<Duration>)> = self.with_state(|s| {
            s.sessions
                .values()
                .map(|s| (s.id.clone(), s.ttl_duration))
                .collect()
        });
        let deadlines: Vec<(String, Option<Instant>)> = ttls
            .into_iter()
            .map(|(id, ttl)| (id, self.deadline(ttl, now)))
            .collect();
        self.mutate(|s| {
            for (id, d) in deadlines {
                if let Some(session) = s.sessions.get_mut(&id) {
                    session.deadline = d;
                }
            }
        });
    }

    pub fn wipe(&self) {
        self.mutate(|s| *s = State::new());
    }

    pub fn reap_now(&self) -> usize {
        self.mutate(|s| {
            let n = s.tables.reap(Instant::now(), None);
            if n > 0 {
                // Reaping is a raft write in Consul, but moves no table index.
                s.next_index();
            }
            n
        })
    }
}

/// Expires sessions and reaps tombstones.
pub(crate) async fn timers(shared: Arc<Shared>) {
    loop {
        tokio::time::sleep(Duration::from_millis(20)).await;
        let now = Instant::now();
        let expired = shared.with_state(|s| s.expired(now));
        if !expired.is_empty() {
            // One raft write per session, as Consul's leader does it.
            shared.mutate(|s| {
                for id in &expired {
                    s.invalidate(id, now);
                }
            });
        }
        if let Some(ttl) = shared.config.tombstone_ttl {
            shared.mutate(|s| {
                if s.tables.reap(now, Some(ttl)) > 0 {
                    s.next_index();
                }
            });
        }
    }
}
