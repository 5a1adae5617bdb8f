//! The Consul backend: the store shared by every host, on Consul's KV store
//! (Consul 1.14 or later).
//!
//! The mapping:
//!
//! - Keys: a store key `/a/b` is the Consul key `a/b`. Consul's HTTP API
//!   cannot address a leading `/`, an empty segment (`//`) or a `.`/`..`
//!   segment (its router folds them), so keys must start with `/` and such
//!   keys are refused as invalid.
//! - Revisions are Consul's raft indexes: `mod_revision` is the ModifyIndex,
//!   `create_revision` the CreateIndex. They increase strictly but are not
//!   consecutive (sessions and the catalog take indexes too).
//! - Reads that decisions depend on use `?consistent`.
//! - `txn` is one `/v1/txn` request per branch, all or nothing. Compares are
//!   `check-index` (`check-not-exists` for revision 0). A 409 whose errors
//!   name a compare means "compare failed": the backend reads the compared
//!   keys, and runs the failure branch as a second txn pinned to what it read
//!   (`check-index`/`check-not-exists` on every compared key), so the failure
//!   ops apply only to a state in which the compares are false; if the state
//!   moved meanwhile it starts over.
//! - Puts always take a new revision (etcd semantics; a plain Consul `set` of
//!   an unchanged value keeps the old ModifyIndex) and always set the lease
//!   binding: a put without a lease is `lock` + `unlock` with a session of
//!   this store that holds no key (the "writer" session), which also fails
//!   (and is then redone with `unlock` by the holder) when another session
//!   holds the key; a put with a lease is `lock` with that session.
//! - Gets and delete counts use `get-or-empty` (hence Consul 1.14); deleted
//!   prefixes are read with `get-tree` at the start of the txn.
//! - Consul takes at most 64 operations per txn; here a compare or get costs
//!   1, a put, delete or deleted prefix 2. Bigger txns are refused as invalid
//!   before anything is sent.
//! - Leases are sessions with `Behavior=delete`, no health checks and no
//!   lock-delay: Consul deletes the keys a session holds when it is destroyed
//!   (revoke) or expires. Consul expires a session twice its TTL after its
//!   last renewal (the TTL is a lower bound), so a lease's session gets half
//!   the lease's TTL, and the lease is gone when asked, as on etcd. Consul
//!   takes session TTLs between its `session_ttl_min` (10 s by default) and
//!   24 h: shorter ones are raised to [`ConsulConfig::session_ttl_min`] (with
//!   a warning), longer ones refused.
//! - Watches are blocking queries on the prefix, resumed from the last
//!   `X-Consul-Index`, whose successive snapshots are compared. Consul keeps
//!   no history, so watches have [`WatchFidelity::LatestState`]: see there.
//!
//! The connection is lazy and heals itself: building the store does no I/O,
//! each request takes an idle HTTP/1.1 connection or opens one, and a broken
//! connection is simply dropped. Every request is bounded by
//! [`ConsulConfig::request_timeout`] (a blocking query by its wait plus that).
//!
//! Not built on the `rs-consul` crate: its KV reads assume UTF-8 values and
//! unescaped keys, it has no txn or session renew/destroy API, and it brings a
//! second HTTP stack (ureq); this speaks the documented HTTP API through hyper,
//! which the workspace already has.
//!
//! The parts, each depending only on those before it: `wire` (Consul's
//! JSON), `keys` (store keys as Consul keys), `http` (the transport),
//! `calls` (requests, errors and KV reads), `sessions` (leases and the
//! writer session), `txn_plan` (a branch as one `/v1/txn` request, pure),
//! `txn` (running a txn), `watch`. This file holds the configuration, the
//! store and the [`KvStore`] impl that hands each call to its part.

mod calls;
mod http;
mod keys;
mod sessions;
mod txn;
mod txn_plan;
mod watch;
mod wire;

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;

use self::calls::{Inner, Snapshot};
use self::http::Http;
use self::keys::{consul_key, consul_prefix};
use self::wire::{revision, Entry};
use crate::{
    KeyValue, KvStore, LeaseId, RangeResponse, Result, Revision, StoreError, TlsFiles, Txn,
    TxnResponse, WatchFidelity, WatchStream,
};

/// How to reach Consul.
#[derive(Clone)]
pub struct ConsulConfig {
    /// `host:port`, `http://host:port` or `https://host:port` of a Consul
    /// agent (a client agent forwards to the servers). Bare ones use https
    /// when [`ConsulConfig::tls`] is set; the port defaults to 8500 (8501 for
    /// https).
    pub address: String,
    /// ACL token, sent as `X-Consul-Token`. It needs `key_prefix` read and
    /// write on the keys used, and `session` write on the agent's node.
    pub token: Option<String>,
    /// TLS; `None` means plain http.
    pub tls: Option<TlsFiles>,
    /// Bound on one request (a blocking query gets its wait on top).
    pub request_timeout: Duration,
    /// Bound on opening a TCP (and TLS) connection.
    pub dial_timeout: Duration,
    /// The Consul servers' `session_ttl_min` (10 s unless configured): lease
    /// TTLs below it are raised to it.
    pub session_ttl_min: Duration,
    /// How long one blocking query of a watch waits for a change before it
    /// is sent again (Consul's `wait`, at most 10 min).
    pub watch_wait: Duration,
}

impl ConsulConfig {
    pub fn new(address: impl Into<String>) -> Self {
        ConsulConfig {
            address: address.into(),
            token: None,
            tls: None,
            request_timeout: Duration::from_secs(10),
            dial_timeout: Duration::from_secs(5),
            session_ttl_min: Duration::from_secs(10),
            watch_wait: Duration::from_secs(60),
        }
    }
}

// By hand, so that the token never ends up in a log.
impl std::fmt::Debug for ConsulConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConsulConfig")
            .field("address", &self.address)
            .field("token", &self.token.as_ref().map(|_| "<redacted>"))
            .field("tls", &self.tls)
            .field("request_timeout", &self.request_timeout)
            .field("dial_timeout", &self.dial_timeout)
            .field("session_ttl_min", &self.session_ttl_min)
            .field("watch_wait", &self.watch_wait)
            .finish()
    }
}

/// A [`KvStore`] on Consul's KV store.
pub struct ConsulStore {
    inner: Arc<Inner>,
}

impl ConsulStore {
    /// Checks the configuration and reads the TLS files; does not connect.
    pub fn new(config: ConsulConfig) -> Result<Self> {
        let ConsulConfig {
            address,
            token,
            tls,
            request_timeout,
            dial_timeout,
            session_ttl_min,
            watch_wait,
        } = config;
        if request_timeout.is_zero() || dial_timeout.is_zero() {
            return Err(StoreError::Invalid(
                "Consul request and dial timeouts must be above zero".into(),
            ));
        }
        if watch_wait < Duration::from_secs(1) || watch_wait > Duration::from_secs(600) {
            return Err(StoreError::Invalid(format!(
                "Consul watch wait {watch_wait:?} must be between 1 s and 10 min"
            )));
        }
        let http = Http::new(&address, tls.as_ref(), token, dial_timeout)?;
        Ok(ConsulStore {
            inner: Arc::new(Inner::new(
                http,
                request_timeout,
                session_ttl_min,
                watch_wait,
            )),
        })
    }
}

impl std::fmt::Debug for ConsulStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConsulStore")
            .field("target", &self.inner.target)
            .finish_non_exhaustive()
    }
}

#[async_trait]
impl KvStore for ConsulStore {
    fn backend_name(&self) -> &'static str {
        "consul"
    }

    fn watch_fidelity(&self) -> WatchFidelity {
        WatchFidelity::LatestState
    }

    async fn get(&self, key: &str) -> Result<Option<KeyValue>> {
        let k = consul_key(key)?;
        self.inner
            .read_key(k)
            .await?
            .1
            .map(|e| e.to_kv())
            .transpose()
    }

    async fn range(&self, prefix: &str) -> Result<RangeResponse> {
        let p = consul_prefix(prefix)?;
        let (index, entries) = self.inner.list(p, None).await?;
        let kvs = entries
            .values()
            .map(Entry::to_kv)
            .collect::<Result<Vec<_>>>()?;
        self.inner.remember_range(Snapshot {
            prefix: p.to_owned(),
            index,
            entries: Arc::new(entries),
        });
        Ok(RangeResponse {
            kvs,
            revision: revision(index)?,
        })
    }

    async fn txn(&self, txn: Txn) -> Result<TxnResponse> {
        txn::run(&self.inner, txn).await
    }

    async fn watch(&self, prefix: &str, start_revision: Revision) -> Result<WatchStream> {
        watch::watch(&self.inner, prefix, start_revision).await
    }

    async fn grant_lease(&self, ttl: Duration) -> Result<LeaseId> {
        self.inner.grant_lease(ttl).await
    }

    async fn keep_alive(&self, lease: LeaseId) -> Result<Option<Revision>> {
        self.inner.keep_alive(lease).await
    }

    async fn revoke_lease(&self, lease: LeaseId) -> Result<()> {
        self.inner.revoke_lease(lease).await
    }
}
