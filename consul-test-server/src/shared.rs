//! The server's state behind its lock, shared by the connections: changes
//! wake the blocking queries (a renewal or a read-only txn, which are no
//! raft writes in Consul, do not); the random numbers for jitter and session
//! IDs; and the clock that expires sessions and reaps tombstones.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::state::State;
use crate::{lock, Config};

pub(crate) struct Shared {
    state: Mutex<State>,
    /// Bumped after every change, to wake blocking queries.
    changed: tokio::sync::watch::Sender<u64>,
    config: Config,
    rng: Mutex<u64>,
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

    /// A session's next deadline: between TTL and 2x TTL from now, the range
    /// Consul documents (it uses 2x TTL; tests must cope with either end).
    pub(crate) fn deadline(&self, ttl: Option<Duration>, now: Instant) -> Option<Instant> {
        ttl.map(|ttl| {
            let extra = ttl.as_nanos() as u64;
            let extra = if extra == 0 { 0 } else { self.random() % extra };
            now + ttl + Duration::from_nanos(extra)
        })
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
