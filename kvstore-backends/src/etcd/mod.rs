//! The etcd v3 backend: the store shared by every host of a cluster.
//!
//! The connection is lazy and heals itself: building the store never touches
//! the network, the first call connects (and authenticates), and the gRPC
//! channel reconnects on its own after etcd comes back. Watches re-open
//! themselves after a disconnect from the last revision they delivered, so a
//! consumer sees neither gaps nor duplicates; only compaction ends them.
//!
//! The parts: `connection` (the clients per endpoint and how a call picks
//! one), `kv` (reads), `txn`, `lease`, `watch`, and `error` (what etcd's
//! errors mean to the store). This file holds the configuration, the store
//! and the [`KvStore`] impl that hands each call to its part.

mod connection;
mod error;
mod kv;
mod lease;
mod txn;
mod watch;

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;

use self::connection::Connections;
use self::lease::Keepers;
use crate::{
    KeyValue, KvStore, LeaseId, RangeResponse, Result, Revision, StoreError, TlsFiles, Txn,
    TxnResponse, WatchStream,
};

/// How to reach etcd.
#[derive(Clone)]
pub struct EtcdConfig {
    /// `host:port`, `http://host:port` or `https://host:port`. Bare ones use
    /// https when [`EtcdConfig::tls`] is set.
    pub endpoints: Vec<String>,
    /// TLS for every endpoint; `None` means plain http.
    pub tls: Option<TlsFiles>,
    /// User name and password, when etcd has authentication enabled.
    pub user: Option<String>,
    pub password: Option<String>,
    /// Bound on opening a TCP (and TLS) connection to one endpoint.
    pub dial_timeout: Duration,
    /// Bound on one request until etcd's answer starts.
    pub request_timeout: Duration,
}

impl EtcdConfig {
    pub fn new<S: Into<String>>(endpoints: impl IntoIterator<Item = S>) -> Self {
        EtcdConfig {
            endpoints: endpoints.into_iter().map(Into::into).collect(),
            tls: None,
            user: None,
            password: None,
            dial_timeout: Duration::from_secs(5),
            request_timeout: Duration::from_secs(10),
        }
    }
}

// By hand, so that the password never ends up in a log.
impl std::fmt::Debug for EtcdConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EtcdConfig")
            .field("endpoints", &self.endpoints)
            .field("tls", &self.tls)
            .field("user", &self.user)
            .field("password", &self.password.as_ref().map(|_| "<redacted>"))
            .field("dial_timeout", &self.dial_timeout)
            .field("request_timeout", &self.request_timeout)
            .finish()
    }
}

/// A [`KvStore`] on an etcd v3 cluster (3.4 or later).
pub struct EtcdStore {
    /// Shared with the watches, which re-open themselves through it.
    conns: Arc<Connections>,
    /// One open keep-alive stream per lease, so a renewal is one message.
    keepers: Keepers,
}

impl EtcdStore {
    /// Checks the configuration and reads the TLS files; does not connect.
    pub fn new(config: EtcdConfig) -> Result<Self> {
        let EtcdConfig {
            endpoints,
            tls,
            user,
            password,
            dial_timeout,
            request_timeout,
        } = config;
        let endpoints: Vec<String> = endpoints
            .iter()
            .map(|e| e.trim().to_owned())
            .filter(|e| !e.is_empty())
            .collect();
        if endpoints.is_empty() {
            return Err(StoreError::Invalid("etcd: no endpoints given".into()));
        }
        for e in &endpoints {
            let (https, http) = (e.starts_with("https://"), e.starts_with("http://"));
            if https && tls.is_none() {
                return Err(StoreError::Invalid(format!(
                    "etcd endpoint {e} is https but no TLS CA is configured"
                )));
            }
            if http && tls.is_some() {
                return Err(StoreError::Invalid(format!(
                    "etcd endpoint {e} is plain http but TLS is configured"
                )));
            }
            if e.contains("://") && !https && !http {
                return Err(StoreError::Invalid(format!(
                    "etcd endpoint {e}: only http:// and https:// are supported"
                )));
            }
        }
        if dial_timeout.is_zero() || request_timeout.is_zero() {
            return Err(StoreError::Invalid(
                "etcd dial and request timeouts must be above zero".into(),
            ));
        }
        let conns = Connections::new(
            endpoints,
            user,
            password,
            tls.as_ref(),
            dial_timeout,
            request_timeout,
        )?;
        Ok(EtcdStore {
            conns: Arc::new(conns),
            keepers: Keepers::default(),
        })
    }
}

impl std::fmt::Debug for EtcdStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EtcdStore")
            .field("endpoints", &self.conns.endpoints)
            .finish_non_exhaustive()
    }
}

#[async_trait]
impl KvStore for EtcdStore {
    fn backend_name(&self) -> &'static str {
        "etcd"
    }

    async fn get(&self, key: &str) -> Result<Option<KeyValue>> {
        kv::get(&self.conns, key).await
    }

    async fn range(&self, prefix: &str) -> Result<RangeResponse> {
        kv::range(&self.conns, prefix).await
    }

    async fn txn(&self, txn: Txn) -> Result<TxnResponse> {
        txn::run(&self.conns, txn).await
    }

    async fn watch(&self, prefix: &str, start_revision: Revision) -> Result<WatchStream> {
        watch::watch(&self.conns, prefix, start_revision).await
    }

    async fn grant_lease(&self, ttl: Duration) -> Result<LeaseId> {
        self.keepers.grant(&self.conns, ttl).await
    }

    async fn keep_alive(&self, lease: LeaseId) -> Result<Option<Revision>> {
        self.keepers.keep_alive(&self.conns, lease).await
    }

    async fn revoke_lease(&self, lease: LeaseId) -> Result<()> {
        self.keepers.revoke(&self.conns, lease).await
    }
}
