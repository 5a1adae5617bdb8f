//! **Test support only — never part of the product.** An in-memory stand-in
//! for the small part of Consul's HTTP API that rustoverlay's Consul backend
//! (`kvstore_backends::ConsulStore`) uses, so that its tests run without a
//! Consul binary (Consul is not packaged for Debian). The same tests also run
//! against a real Consul when `CONSUL_HTTP_ADDR` is set.
//!
//! It follows Consul's documented semantics and, where the documentation is
//! silent, its source (`agent/consul/state/kvs.go`, `txn.go`, `graveyard.go`):
//!
//! - KV: `GET` (single key, `?recurse`, `?keys` with `?separator`, `?raw`),
//!   `PUT` (`?cas`, `?acquire`, `?release`, `?flags`), `DELETE` (`?recurse`,
//!   `?cas`); `?consistent` and `?stale` are accepted (there is one node).
//! - Blocking queries: `?index=N&wait=D` wait until the result's index is
//!   above N (or the wait, plus up to 1/16 jitter, is over) and answer with
//!   `X-Consul-Index`. A list's index is the highest ModifyIndex or tombstone
//!   under its prefix, else the table's, so it can go backwards when
//!   tombstones are reaped, as in Consul.
//! - `/v1/txn`: at most 64 operations (413 beyond), all or nothing, 409 with
//!   per-operation `Errors`, 200 with `Results`; only KV operations.
//! - Sessions: create (TTL between `session_ttl_min` and 24 h, `Behavior`
//!   release or delete, `LockDelay`), renew, destroy, info, list. A session
//!   expires exactly 2x TTL after its last renewal: Consul promises only
//!   "between TTL and 2x TTL", and the late end is the worst case.
//! - One raft-like index for everything, taken by every write (also a txn
//!   that fails, and session writes).
//! - ACL: when started with a token, every request without it gets 403.
//! - Failures on demand, as a cluster without a leader (500 "No cluster
//!   leader") or a rate-limiting server (429) answers them: for the next N
//!   requests or for a while, from the test ([`TestServer::fail_next`],
//!   [`TestServer::fail_for`]) or over HTTP for shell tests
//!   (`PUT /test-server/fail?failure=no-leader|too-many-requests&count=N` or
//!   `&for=2s`; `DELETE /test-server/fail` stops). Not part of Consul's API.
//!
//! Everything listens on 127.0.0.1 only.

mod http;
mod shared;
mod state;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::net::TcpListener;
use tokio::task::{JoinHandle, JoinSet};

pub use state::Behavior;

/// An answer a real Consul gives when it cannot serve a request, which
/// tests can make the server give on purpose.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Failure {
    /// 500 "No cluster leader": the servers are electing a leader (or have
    /// lost quorum). Nothing was applied.
    NoLeader,
    /// 429 "rate limit exceeded": the server's request rate limit refused
    /// the request. Nothing was applied.
    TooManyRequests,
}

impl Failure {
    pub fn parse(s: &str) -> Option<Failure> {
        match s {
            "no-leader" | "500" => Some(Failure::NoLeader),
            "too-many-requests" | "429" => Some(Failure::TooManyRequests),
            _ => None,
        }
    }
}

/// How the test server behaves.
#[derive(Clone, Debug)]
pub struct Config {
    /// When set, every request must carry this token (`X-Consul-Token`,
    /// `Authorization: Bearer` or `?token=`); others get 403.
    pub acl_token: Option<String>,
    /// Consul's `session_ttl_min` (10 s there by default; tests lower it the
    /// same way a Consul agent's configuration can).
    pub session_ttl_min: Duration,
    /// Consul reaps tombstones some time (`tombstone_ttl`, 15 s) after a
    /// delete. None: only [`TestServer::reap_tombstones`] reaps.
    pub tombstone_ttl: Option<Duration>,
    /// Serve https instead of http.
    pub tls: Option<TlsConfig>,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            acl_token: None,
            session_ttl_min: Duration::from_secs(10),
            tombstone_ttl: None,
            tls: None,
        }
    }
}

/// PEM material for https. With a client CA, clients must present a
/// certificate it signed (Consul's `verify_incoming`).
#[derive(Clone, Debug)]
pub struct TlsConfig {
    pub cert_pem: Vec<u8>,
    pub key_pem: Vec<u8>,
    pub client_ca_pem: Option<Vec<u8>>,
}

/// A running test server. Dropping it stops it.
pub struct TestServer {
    addr: SocketAddr,
    shared: Arc<shared::Shared>,
    tls: Option<tokio_rustls::TlsAcceptor>,
    tasks: Vec<JoinHandle<()>>,
    /// One task per open connection, so that a kill closes them all.
    conns: Arc<Mutex<JoinSet<()>>>,
}

impl TestServer {
    /// Starts on a free port of 127.0.0.1.
    pub async fn start(config: Config) -> std::io::Result<TestServer> {
        Self::start_on(SocketAddr::from(([127, 0, 0, 1], 0)), config).await
    }

    pub async fn start_on(addr: SocketAddr, config: Config) -> std::io::Result<TestServer> {
        let tls = config
            .tls
            .as_ref()
            .map(http::tls_acceptor)
            .transpose()
            .map_err(std::io::Error::other)?;
        let listener = TcpListener::bind(addr).await?;
        let addr = listener.local_addr()?;
        let shared = Arc::new(shared::Shared::new(config));
        let mut server = TestServer {
            addr,
            shared,
            tls,
            tasks: Vec::new(),
            conns: Arc::new(Mutex::new(JoinSet::new())),
        };
        server.serve(listener);
        Ok(server)
    }

    fn serve(&mut self, listener: TcpListener) {
        self.tasks = vec![
            tokio::spawn(http::accept_loop(
                listener,
                Arc::clone(&self.shared),
                self.tls.clone(),
                Arc::clone(&self.conns),
            )),
            tokio::spawn(shared::timers(Arc::clone(&self.shared))),
        ];
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `127.0.0.1:PORT`, what a client is configured with.
    pub fn address(&self) -> String {
        self.addr.to_string()
    }

    /// Stops answering, like a killed agent: when this returns, the listener
    /// and every open connection (blocking queries included) are closed. The
    /// data is kept for [`TestServer::restart`].
    pub async fn kill(&mut self) {
        for task in self.tasks.drain(..) {
            task.abort();
            let _ = task.await;
        }
        let mut conns = std::mem::take(&mut *lock(&self.conns));
        conns.abort_all();
        while conns.join_next().await.is_some() {}
    }

    /// Serves again on the same address with the data it had, like a Consul
    /// server restarted on its raft data. Session timers start over, as after
    /// a leader election.
    pub async fn restart(&mut self) -> std::io::Result<()> {
        self.kill().await;
        // The aborted listener may take a moment to be dropped.
        let deadline = Instant::now() + Duration::from_secs(5);
        let listener = loop {
            match TcpListener::bind(self.addr).await {
                Ok(l) => break l,
                Err(e) if Instant::now() < deadline => {
                    tracing::debug!(error = %e, "re-binding the test server");
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                Err(e) => return Err(e),
            }
        };
        self.shared.reset_session_timers();
        self.serve(listener);
        Ok(())
    }

    /// Forgets everything, as if the cluster had been rebuilt from scratch:
    /// indexes start over, so they go backwards for every client.
    pub fn wipe(&self) {
        self.shared.wipe();
    }

    /// Reaps every tombstone now (Consul does it `tombstone_ttl` after a
    /// delete); list indexes of prefixes with deletes can go backwards.
    pub fn reap_tombstones(&self) -> usize {
        self.shared.reap_now()
    }

    /// The next `n` requests (blocking queries included, this server's own
    /// `/test-server/` endpoints not) fail with `failure`.
    pub fn fail_next(&self, n: usize, failure: Failure) {
        self.shared.set_fault(Some(shared::Fault {
            failure,
            remaining: Some(n),
            until: None,
        }));
    }

    /// Every request fails with `failure` for `d` from now.
    pub fn fail_for(&self, d: Duration, failure: Failure) {
        self.shared.set_fault(Some(shared::Fault {
            failure,
            remaining: None,
            until: Some(Instant::now() + d),
        }));
    }

    /// Ends a fault started by [`TestServer::fail_next`] or
    /// [`TestServer::fail_for`].
    pub fn stop_failing(&self) {
        self.shared.set_fault(None);
    }

    /// IDs of the live sessions.
    pub fn session_ids(&self) -> Vec<String> {
        self.shared
            .with_state(|s| s.sessions.keys().cloned().collect())
    }

    /// The TTL a live session was created with, as its client wrote it.
    pub fn session_ttl(&self, id: &str) -> Option<String> {
        self.shared
            .with_state(|s| s.sessions.get(id).map(|s| s.ttl.clone()))
    }

    /// The last raft index used.
    pub fn raft_index(&self) -> u64 {
        self.shared.with_state(|s| s.index)
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        for task in self.tasks.drain(..) {
            task.abort();
        }
        // Dropping the set aborts the connection tasks.
        drop(std::mem::take(&mut *lock(&self.conns)));
    }
}

impl std::fmt::Debug for TestServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TestServer")
            .field("addr", &self.addr)
            .field("tls", &self.tls.is_some())
            .finish_non_exhaustive()
    }
}

/// A lock that a panicking handler cannot poison for the other tests.
pub(crate) fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}
