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
//!   (revoke) or expires. Consul expires a session between TTL and 2x TTL
//!   after its last renewal, and takes TTLs between its `session_ttl_min`
//!   (10 s by default) and 24 h: shorter TTLs are raised to
//!   [`ConsulConfig::session_ttl_min`] (with a warning), longer ones refused.
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

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use base64::Engine as _;
use futures::StreamExt;
use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper::client::conn::http1::SendRequest;
use hyper::header::{HeaderValue, CONTENT_TYPE, HOST, USER_AGENT};
use hyper::{Method, Request, StatusCode};
use hyper_util::rt::TokioIo;
use percent_encoding::{utf8_percent_encode, AsciiSet, NON_ALPHANUMERIC};
use serde::Deserialize;
use serde_json::{json, Value};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_rustls::rustls;

use crate::engine::{check_key, validate_txn};
use crate::{
    Compare, EventKind, KeyValue, KvStore, LeaseId, Op, OpResult, RangeResponse, Result, Revision,
    StoreError, Txn, TxnResponse, WatchEvent, WatchFidelity, WatchStream,
};

/// Consul's `maxTxnOps`.
const MAX_TXN_OPS: usize = 64;
/// Consul's `SessionTTLMax`.
const SESSION_TTL_MAX_SECS: u64 = 86_400;
/// Attempts of one txn while it races with lock holders or a moving state.
/// Each retry after the first waits a short random pause, so a busy key
/// cannot starve one writer; the caller's timeout bounds the whole call.
const TXN_ATTEMPTS: usize = 64;
/// Idle connections kept for reuse.
const IDLE_CONNECTIONS: usize = 16;
/// Recent `range` results kept so that a watch from a range's revision + 1
/// can start exactly where the read left off (Consul has no history).
const RANGE_CACHE: usize = 16;
const RANGE_CACHE_MAX_KEYS: usize = 4096;
/// Events a watch buffers for a consumer that is not reading.
const WATCH_BUFFER: usize = 1024;
/// Re-polling a watch after an error waits this long at first, doubling.
const WATCH_RETRY_MIN: Duration = Duration::from_millis(100);
const WATCH_RETRY_MAX: Duration = Duration::from_secs(3);
/// Everything but unreserved characters and `/` is escaped in KV paths.
const PATH: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~')
    .remove(b'/');

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
    pub tls: Option<ConsulTls>,
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

/// TLS files (PEM). The CA checks Consul's certificate; a certificate and
/// key, both or neither, authenticate this client (Consul's
/// `verify_incoming`).
#[derive(Clone, Debug)]
pub struct ConsulTls {
    pub ca: PathBuf,
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
}

/// A [`KvStore`] on Consul's KV store.
pub struct ConsulStore {
    inner: Arc<Inner>,
}

struct Inner {
    http: Arc<Http>,
    /// For messages: "Consul at 127.0.0.1:8500".
    target: String,
    request_timeout: Duration,
    session_ttl_min: Duration,
    watch_wait: Duration,
    /// The session that puts without a lease lock and unlock with (it never
    /// holds a key at rest); made on first use, again when it expired.
    writer: tokio::sync::Mutex<Option<String>>,
    ranges: Mutex<VecDeque<Snapshot>>,
    warned_ttl: AtomicBool,
}

/// A prefix's entries as one read saw them, at the read's index.
#[derive(Clone)]
struct Snapshot {
    prefix: String,
    index: u64,
    entries: Arc<BTreeMap<String, Entry>>,
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
        let (https, host, authority) = parse_address(&address, tls.is_some())?;
        let tls = match (&tls, https) {
            (Some(tls), true) => {
                let name = rustls::pki_types::ServerName::try_from(host.clone()).map_err(|e| {
                    StoreError::Invalid(format!("Consul address {address}: host {host:?}: {e}"))
                })?;
                Some((tls_connector(tls)?, name))
            }
            _ => None,
        };
        let token = token
            .filter(|t| !t.is_empty())
            .map(|t| {
                HeaderValue::from_str(&t)
                    .map(|mut v| {
                        v.set_sensitive(true);
                        v
                    })
                    .map_err(|_| {
                        StoreError::Invalid("the Consul ACL token is not a valid header".into())
                    })
            })
            .transpose()?;
        let host_header = HeaderValue::from_str(&authority)
            .map_err(|_| StoreError::Invalid(format!("Consul address {address} is malformed")))?;
        Ok(ConsulStore {
            inner: Arc::new(Inner {
                target: format!("Consul at {authority}"),
                http: Arc::new(Http {
                    authority,
                    host_header,
                    tls,
                    token,
                    dial_timeout,
                    idle: Mutex::new(Vec::new()),
                }),
                request_timeout,
                session_ttl_min,
                watch_wait,
                writer: tokio::sync::Mutex::new(None),
                ranges: Mutex::new(VecDeque::new()),
                warned_ttl: AtomicBool::new(false),
            }),
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

/// (https, host, host:port) of an address.
fn parse_address(address: &str, tls: bool) -> Result<(bool, String, String)> {
    let invalid = |why: &str| StoreError::Invalid(format!("Consul address {address:?}: {why}"));
    let a = address.trim().trim_end_matches('/');
    let (https, rest) = if let Some(r) = a.strip_prefix("https://") {
        if !tls {
            return Err(invalid("https but no TLS CA is configured"));
        }
        (true, r)
    } else if let Some(r) = a.strip_prefix("http://") {
        if tls {
            return Err(invalid("plain http but TLS is configured"));
        }
        (false, r)
    } else if a.contains("://") {
        return Err(invalid("only http:// and https:// are supported"));
    } else {
        (tls, a)
    };
    if rest.is_empty() || rest.contains(['/', '?', '#', '@', ' ']) {
        return Err(invalid("expected host:port"));
    }
    let default_port: u16 = if https { 8501 } else { 8500 };
    let (host, port) = if let Some(v6) = rest.strip_prefix('[') {
        let (h, after) = v6.split_once(']').ok_or_else(|| invalid("unclosed '['"))?;
        let port = match after.strip_prefix(':') {
            Some(p) => p.parse().map_err(|_| invalid("bad port"))?,
            None if after.is_empty() => default_port,
            None => return Err(invalid("expected [v6]:port")),
        };
        (h.to_owned(), port)
    } else {
        match rest.rsplit_once(':') {
            Some((h, p)) => (h.to_owned(), p.parse().map_err(|_| invalid("bad port"))?),
            None => (rest.to_owned(), default_port),
        }
    };
    if host.is_empty() {
        return Err(invalid("no host"));
    }
    let authority = if host.contains(':') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    };
    Ok((https, host, authority))
}

fn tls_connector(tls: &ConsulTls) -> Result<tokio_rustls::TlsConnector> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let read = |what: &str, path: &PathBuf| {
        std::fs::read(path).map_err(|e| {
            StoreError::backend(format!("reading Consul TLS {what} {}", path.display()), e)
        })
    };
    let pem_error = |what: &str, path: &PathBuf, e: rustls::pki_types::pem::Error| {
        StoreError::Invalid(format!("Consul TLS {what} {}: {e}", path.display()))
    };
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(&read("CA", &tls.ca)?) {
        let cert = cert.map_err(|e| pem_error("CA", &tls.ca, e))?;
        roots
            .add(cert)
            .map_err(|e| StoreError::Invalid(format!("Consul TLS CA {}: {e}", tls.ca.display())))?;
    }
    if roots.is_empty() {
        return Err(StoreError::Invalid(format!(
            "Consul TLS CA {} holds no certificate",
            tls.ca.display()
        )));
    }
    let builder = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| StoreError::backend("Consul TLS setup", e))?
    .with_root_certificates(roots);
    let mut config = match (&tls.cert, &tls.key) {
        (Some(cert), Some(key)) => {
            let certs = CertificateDer::pem_slice_iter(&read("certificate", cert)?)
                .collect::<std::result::Result<Vec<_>, _>>()
                .map_err(|e| pem_error("certificate", cert, e))?;
            let key_der = PrivateKeyDer::from_pem_slice(&read("key", key)?)
                .map_err(|e| pem_error("key", key, e))?;
            builder.with_client_auth_cert(certs, key_der).map_err(|e| {
                StoreError::Invalid(format!(
                    "Consul TLS certificate {} and key {}: {e}",
                    cert.display(),
                    key.display()
                ))
            })?
        }
        (None, None) => builder.with_no_client_auth(),
        _ => {
            return Err(StoreError::Invalid(
                "Consul TLS client certificate and key must be given together".into(),
            ))
        }
    };
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(tokio_rustls::TlsConnector::from(Arc::new(config)))
}

impl Drop for Inner {
    /// Destroys the writer session in the background (best effort: with no
    /// runtime left, its 24 h TTL ends it).
    fn drop(&mut self) {
        let Some(id) = self.writer.get_mut().take() else {
            return;
        };
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let (http, timeout) = (Arc::clone(&self.http), self.request_timeout);
        runtime.spawn(async move {
            let path = format!("/v1/session/destroy/{id}");
            if http.send(Method::PUT, &path, None, timeout).await.is_err() {
                tracing::debug!(session = %id, "could not destroy the Consul writer session");
            }
        });
    }
}

// ---------------------------------------------------------------- HTTP

/// A small HTTP/1.1 client with a pool of idle connections.
struct Http {
    authority: String,
    host_header: HeaderValue,
    tls: Option<(
        tokio_rustls::TlsConnector,
        rustls::pki_types::ServerName<'static>,
    )>,
    token: Option<HeaderValue>,
    dial_timeout: Duration,
    idle: Mutex<Vec<SendRequest<Full<Bytes>>>>,
}

struct Reply {
    status: StatusCode,
    index: Option<u64>,
    body: Bytes,
}

enum HttpError {
    /// No connection: the request was not sent.
    Connect(String),
    Timeout,
    /// The connection broke while the request was under way: a write may or
    /// may not have been applied.
    Broken(String),
}

impl Http {
    async fn send(
        &self,
        method: Method,
        path: &str,
        body: Option<Vec<u8>>,
        timeout: Duration,
    ) -> std::result::Result<Reply, HttpError> {
        tokio::time::timeout(timeout, self.send_once_or_twice(method, path, body))
            .await
            .unwrap_or(Err(HttpError::Timeout))
    }

    async fn send_once_or_twice(
        &self,
        method: Method,
        path: &str,
        body: Option<Vec<u8>>,
    ) -> std::result::Result<Reply, HttpError> {
        let body = Bytes::from(body.unwrap_or_default());
        let mut reused_failed = false;
        loop {
            let (mut sender, reused) = match self.take_idle() {
                Some(s) if !reused_failed => (s, true),
                _ => (self.dial().await?, false),
            };
            if sender.ready().await.is_err() {
                if reused {
                    continue;
                }
                return Err(HttpError::Connect("the connection closed at once".into()));
            }
            let mut req = Request::builder()
                .method(method.clone())
                .uri(path)
                .header(HOST, self.host_header.clone())
                .header(USER_AGENT, "rustoverlay-kvstore")
                .body(Full::new(body.clone()))
                .map_err(|e| HttpError::Connect(format!("bad request {path}: {e}")))?;
            if !body.is_empty() {
                req.headers_mut()
                    .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
            }
            if let Some(token) = &self.token {
                req.headers_mut().insert("X-Consul-Token", token.clone());
            }
            let resp = match sender.send_request(req).await {
                Ok(resp) => resp,
                // A pooled connection the server had closed: the request was
                // not sent (canceled), or was a read. Once, on a new one.
                Err(e) if reused && (e.is_canceled() || method == Method::GET) => {
                    reused_failed = true;
                    continue;
                }
                Err(e) => return Err(HttpError::Broken(describe_hyper(&e))),
            };
            let status = resp.status();
            let index = resp
                .headers()
                .get("X-Consul-Index")
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.parse().ok());
            let body = resp
                .into_body()
                .collect()
                .await
                .map_err(|e| HttpError::Broken(describe_hyper(&e)))?
                .to_bytes();
            self.put_idle(sender);
            return Ok(Reply {
                status,
                index,
                body,
            });
        }
    }

    fn take_idle(&self) -> Option<SendRequest<Full<Bytes>>> {
        let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
        while let Some(s) = idle.pop() {
            if !s.is_closed() {
                return Some(s);
            }
        }
        None
    }

    fn put_idle(&self, sender: SendRequest<Full<Bytes>>) {
        if sender.is_closed() {
            return;
        }
        let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
        if idle.len() < IDLE_CONNECTIONS {
            idle.push(sender);
        }
    }

    async fn dial(&self) -> std::result::Result<SendRequest<Full<Bytes>>, HttpError> {
        let tcp = tokio::time::timeout(
            self.dial_timeout,
            tokio::net::TcpStream::connect(&self.authority),
        )
        .await
        .map_err(|_| {
            HttpError::Connect(format!("connect timed out after {:?}", self.dial_timeout))
        })?
        .map_err(|e| HttpError::Connect(format!("connect: {e}")))?;
        let _ = tcp.set_nodelay(true);
        match &self.tls {
            None => handshake(tcp).await,
            Some((connector, name)) => {
                let stream =
                    tokio::time::timeout(self.dial_timeout, connector.connect(name.clone(), tcp))
                        .await
                        .map_err(|_| HttpError::Connect("TLS handshake timed out".into()))?
                        .map_err(|e| HttpError::Connect(format!("TLS handshake: {e}")))?;
                handshake(stream).await
            }
        }
    }
}

async fn handshake<S>(io: S) -> std::result::Result<SendRequest<Full<Bytes>>, HttpError>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(io))
        .await
        .map_err(|e| HttpError::Connect(format!("HTTP handshake: {}", describe_hyper(&e))))?;
    // Ends when the sender is dropped or the peer closes.
    tokio::spawn(async move {
        if let Err(e) = conn.await {
            tracing::debug!(error = %e, "Consul connection ended");
        }
    });
    Ok(sender)
}

fn describe_hyper(e: &hyper::Error) -> String {
    let mut text = e.to_string();
    let mut source = std::error::Error::source(e);
    while let Some(cause) = source {
        let c = cause.to_string();
        if !text.contains(&c) {
            text.push_str(": ");
            text.push_str(&c);
        }
        source = cause.source();
    }
    text
}

// ---------------------------------------------------------------- wire types

/// A KV entry as Consul sends it (`DirEntry`).
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "PascalCase")]
struct Entry {
    key: String,
    #[serde(default)]
    value: Option<String>,
    #[serde(default)]
    session: Option<String>,
    #[serde(default)]
    create_index: u64,
    #[serde(default)]
    modify_index: u64,
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct TxnReply {
    #[serde(default)]
    results: Option<Vec<TxnResult>>,
    #[serde(default)]
    errors: Option<Vec<TxnError>>,
}

#[derive(Deserialize)]
struct TxnResult {
    #[serde(rename = "KV")]
    kv: Option<Entry>,
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct TxnError {
    op_index: usize,
    what: String,
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct SessionCreated {
    #[serde(rename = "ID")]
    id: String,
}

fn revision(index: u64) -> Result<Revision> {
    Revision::try_from(index).map_err(|_| {
        StoreError::backend(
            "reading Consul's answer",
            format!("index {index} is out of range"),
        )
    })
}

impl Entry {
    /// The store's view; an error when the value is not base64 (a broken
    /// answer).
    fn to_kv(&self) -> Result<KeyValue> {
        let value = match self.value.as_deref() {
            None | Some("") => Vec::new(),
            Some(v) => base64::engine::general_purpose::STANDARD
                .decode(v)
                .map_err(|e| {
                    StoreError::backend(
                        format!("reading Consul key {:?}", self.key),
                        format!("the value is not base64: {e}"),
                    )
                })?,
        };
        Ok(KeyValue {
            key: format!("/{}", self.key),
            value,
            create_revision: revision(self.create_index)?,
            mod_revision: revision(self.modify_index)?,
            lease: self
                .session
                .as_ref()
                .filter(|s| !s.is_empty())
                .map(|s| LeaseId(s.clone())),
        })
    }
}

// ---------------------------------------------------------------- keys

/// The Consul key of a store key: `/a/b` -> `a/b`.
fn consul_key(key: &str) -> Result<&str> {
    check_key(key)?;
    let k = key.strip_prefix('/').ok_or_else(|| {
        StoreError::Invalid(format!(
            "key {key:?}: the Consul backend takes keys that start with '/' (stored without it, \
             as Consul's HTTP API cannot address a leading slash)"
        ))
    })?;
    if k.is_empty() {
        return Err(StoreError::Invalid(
            "key \"/\" is Consul's root, not a key".into(),
        ));
    }
    check_path(key, k)?;
    Ok(k)
}

/// The Consul prefix of a store prefix ("" and "/" are everything).
fn consul_prefix(prefix: &str) -> Result<&str> {
    if prefix.is_empty() {
        return Ok("");
    }
    let p = prefix.strip_prefix('/').ok_or_else(|| {
        StoreError::Invalid(format!(
            "prefix {prefix:?}: the Consul backend takes keys that start with '/'"
        ))
    })?;
    check_path(prefix, p)?;
    Ok(p)
}

/// What Consul's HTTP layer would fold, redirect or refuse.
fn check_path(original: &str, k: &str) -> Result<()> {
    let bad = |why: &str| {
        Err(StoreError::Invalid(format!(
            "key {original:?} {why}, which Consul's HTTP API cannot address"
        )))
    };
    if k.starts_with('/') || k.contains("//") {
        return bad("has an empty path segment ('//')");
    }
    if k.split('/').any(|s| s == "." || s == "..") {
        return bad("has a '.' or '..' path segment");
    }
    if k.trim() != k || k.chars().any(char::is_control) {
        return bad("has leading or trailing white space or control characters");
    }
    Ok(())
}

fn kv_path(consul_key: &str) -> String {
    format!("/v1/kv/{}", utf8_percent_encode(consul_key, PATH))
}

/// Consul session IDs are UUIDs; anything else cannot be one of ours (and
/// must not reach a URL path).
fn session_id(lease: &LeaseId) -> Option<&str> {
    let id = lease.0.as_str();
    (id.len() == 36 && id.chars().all(|c| c.is_ascii_hexdigit() || c == '-')).then_some(id)
}

// ---------------------------------------------------------------- calls

impl Inner {
    async fn call(
        &self,
        what: &(dyn Fn() -> String + Sync),
        method: Method,
        path: &str,
        body: Option<Vec<u8>>,
        timeout: Duration,
    ) -> Result<Reply> {
        match self.http.send(method, path, body, timeout).await {
            Ok(reply) => Ok(reply),
            Err(HttpError::Connect(e)) => Err(StoreError::Unavailable(format!(
                "{}: cannot connect to {}: {e}",
                what(),
                self.target
            ))),
            Err(HttpError::Timeout) => Err(StoreError::Timeout(timeout)),
            Err(HttpError::Broken(e)) => Err(StoreError::Unavailable(format!(
                "{}: {}: the connection broke: {e}",
                what(),
                self.target
            ))),
        }
    }

    async fn request(
        &self,
        what: &(dyn Fn() -> String + Sync),
        method: Method,
        path: &str,
        body: Option<Vec<u8>>,
    ) -> Result<Reply> {
        self.call(what, method, path, body, self.request_timeout)
            .await
    }

    /// The error for an answer that is not a success the caller expects.
    fn status_error(&self, what: &str, reply: &Reply) -> StoreError {
        let body = String::from_utf8_lossy(&reply.body);
        let body = body.trim();
        let body: String = body.chars().take(500).collect();
        let context = format!("{what}: {}", self.target);
        let detail = format!("HTTP {}: {body}", reply.status.as_u16());
        match reply.status {
            StatusCode::FORBIDDEN => StoreError::backend(
                context,
                format!(
                    "{detail} (the ACL token is missing, unknown or lacks permissions: \
                     it needs key_prefix read/write on the keys and session write)"
                ),
            ),
            StatusCode::BAD_REQUEST | StatusCode::PAYLOAD_TOO_LARGE => StoreError::Invalid(
                format!("{context}: {detail} (Consul's limits: 64 operations per txn, 512 KiB per value and per txn)"),
            ),
            StatusCode::TOO_MANY_REQUESTS
            | StatusCode::BAD_GATEWAY
            | StatusCode::SERVICE_UNAVAILABLE
            | StatusCode::GATEWAY_TIMEOUT => StoreError::Unavailable(format!("{context}: {detail}")),
            StatusCode::INTERNAL_SERVER_ERROR
                if body.contains("Permission denied") || body.contains("ACL not found") =>
            {
                StoreError::backend(context, format!("{detail} (check the ACL token)"))
            }
            // The agent could not reach a server, or there is no leader.
            StatusCode::INTERNAL_SERVER_ERROR
                if body.contains("No cluster leader")
                    || body.contains("no leader")
                    || body.contains("rpc error")
                    || body.contains("i/o timeout") =>
            {
                StoreError::Unavailable(format!("{context}: {detail}"))
            }
            _ => StoreError::backend(context, detail),
        }
    }

    fn decode<T: serde::de::DeserializeOwned>(&self, what: &str, reply: &Reply) -> Result<T> {
        serde_json::from_slice(&reply.body).map_err(|e| {
            StoreError::backend(
                format!("{what}: {}", self.target),
                format!("unreadable answer: {e}"),
            )
        })
    }

    fn index(&self, what: &str, reply: &Reply) -> Result<u64> {
        reply.index.ok_or_else(|| {
            StoreError::backend(
                format!("{what}: {}", self.target),
                "the answer has no X-Consul-Index header",
            )
        })
    }

    /// A prefix's entries and the list's index. `block`: (index, wait) of a
    /// blocking query; otherwise a consistent read.
    async fn list(
        &self,
        prefix: &str,
        block: Option<(u64, Duration)>,
    ) -> Result<(u64, BTreeMap<String, Entry>)> {
        let what = || format!("list prefix {:?}", format!("/{prefix}"));
        let (path, timeout) = match block {
            Some((index, wait)) => (
                format!(
                    "{}?recurse&index={index}&wait={}ms",
                    kv_path(prefix),
                    wait.as_millis()
                ),
                wait + wait / 16 + self.request_timeout,
            ),
            None => (
                format!("{}?recurse&consistent", kv_path(prefix)),
                self.request_timeout,
            ),
        };
        let reply = self.call(&what, Method::GET, &path, None, timeout).await?;
        let entries: Vec<Entry> = match reply.status {
            StatusCode::OK => self.decode(&what(), &reply)?,
            StatusCode::NOT_FOUND => Vec::new(),
            _ => return Err(self.status_error(&what(), &reply)),
        };
        let index = self.index(&what(), &reply)?;
        let entries = entries
            .into_iter()
            .filter(|e| e.key.starts_with(prefix))
            .map(|e| (e.key.clone(), e))
            .collect();
        // Consul's docs: treat 0 as 1 so that a blocking query blocks.
        Ok((index.max(1), entries))
    }

    /// One key, consistently.
    async fn read_key(&self, key: &str) -> Result<(u64, Option<Entry>)> {
        let what = || format!("get {:?}", format!("/{key}"));
        let reply = self
            .request(
                &what,
                Method::GET,
                &format!("{}?consistent", kv_path(key)),
                None,
            )
            .await?;
        match reply.status {
            StatusCode::OK => {
                let entries: Vec<Entry> = self.decode(&what(), &reply)?;
                let index = self.index(&what(), &reply)?;
                Ok((index, entries.into_iter().find(|e| e.key == key)))
            }
            StatusCode::NOT_FOUND => Ok((self.index(&what(), &reply)?, None)),
            _ => Err(self.status_error(&what(), &reply)),
        }
    }

    /// The index of the KV store as a whole: a single-key read of an absent
    /// key answers with it (a present key answers with its own ModifyIndex),
    /// so ask for a name nobody uses next to `near` (same ACL prefix).
    async fn store_revision(&self, near: &str) -> Result<Revision> {
        let probe = format!("{near}-rustoverlay-revision-probe");
        revision(self.read_key(&probe).await?.0)
    }

    /// The index of the latest change under `prefix` (its list index): after
    /// a delete there, the delete's own index unless something under it
    /// changed since.
    async fn prefix_revision(&self, prefix: &str) -> Result<Revision> {
        let what = || format!("read the index of prefix {:?}", format!("/{prefix}"));
        let reply = self
            .request(
                &what,
                Method::GET,
                &format!("{}?keys&consistent", kv_path(prefix)),
                None,
            )
            .await?;
        match reply.status {
            StatusCode::OK | StatusCode::NOT_FOUND => revision(self.index(&what(), &reply)?),
            _ => Err(self.status_error(&what(), &reply)),
        }
    }

    async fn create_session(&self, name: &str, ttl_secs: u64, behavior: &str) -> Result<String> {
        let what = || format!("create a session with a TTL of {ttl_secs} s");
        // No node checks: only the TTL ends it, like an etcd lease. No
        // lock-delay: a key freed by an expiry can be written again at once.
        let body = json!({
            "Name": name,
            "TTL": format!("{ttl_secs}s"),
            "Behavior": behavior,
            "LockDelay": "0s",
            "NodeChecks": [],
        });
        let reply = self
            .request(
                &what,
                Method::PUT,
                "/v1/session/create",
                Some(body.to_string().into_bytes()),
            )
            .await?;
        if reply.status == StatusCode::INTERNAL_SERVER_ERROR
            && String::from_utf8_lossy(&reply.body).contains("Invalid Session TTL")
        {
            return Err(StoreError::Invalid(format!(
                "{}: {}: {} (set the store's session_ttl_min to the Consul servers' \
                 session_ttl_min)",
                what(),
                self.target,
                String::from_utf8_lossy(&reply.body).trim()
            )));
        }
        if reply.status != StatusCode::OK {
            return Err(self.status_error(&what(), &reply));
        }
        let created: SessionCreated = self.decode(&what(), &reply)?;
        if created.id.is_empty() {
            return Err(StoreError::backend(
                format!("{}: {}", what(), self.target),
                "Consul answered an empty session ID",
            ));
        }
        Ok(created.id)
    }

    async fn writer_session(&self) -> Result<String> {
        let mut slot = self.writer.lock().await;
        if let Some(id) = slot.as_ref() {
            return Ok(id.clone());
        }
        let id = self
            .create_session(
                "rustoverlay writer (holds no key; lets puts detach keys from leases)",
                SESSION_TTL_MAX_SECS,
                "release",
            )
            .await?;
        *slot = Some(id.clone());
        Ok(id)
    }

    async fn forget_writer(&self, id: &str) {
        let mut slot = self.writer.lock().await;
        if slot.as_deref() == Some(id) {
            *slot = None;
        }
    }

    fn remember_range(&self, snapshot: Snapshot) {
        if snapshot.entries.len() > RANGE_CACHE_MAX_KEYS {
            return;
        }
        let mut ranges = self.ranges.lock().unwrap_or_else(|e| e.into_inner());
        ranges.retain(|s| !(s.prefix == snapshot.prefix && s.index == snapshot.index));
        if ranges.len() >= RANGE_CACHE {
            ranges.pop_front();
        }
        ranges.push_back(snapshot);
    }

    fn remembered_range(&self, prefix: &str, index: u64) -> Option<Snapshot> {
        let ranges = self.ranges.lock().unwrap_or_else(|e| e.into_inner());
        ranges
            .iter()
            .rev()
            .find(|s| s.prefix == prefix && s.index == index)
            .cloned()
    }
}

// ---------------------------------------------------------------- txn plan

/// One op of a branch, with its Consul key.
#[derive(Clone, Debug)]
enum BranchOp {
    Get {
        key: String,
    },
    Delete {
        key: String,
    },
    DeletePrefix {
        prefix: String,
    },
    Put {
        key: String,
        value: Vec<u8>,
        lease: Option<String>,
    },
}

impl BranchOp {
    /// The key, or the deleted prefix.
    fn key(&self) -> &str {
        match self {
            BranchOp::Get { key } | BranchOp::Delete { key } | BranchOp::Put { key, .. } => key,
            BranchOp::DeletePrefix { prefix } => prefix,
        }
    }
}

fn branch_ops(ops: &[Op]) -> Result<Vec<BranchOp>> {
    ops.iter()
        .map(|op| {
            Ok(match op {
                Op::Get { key } => BranchOp::Get {
                    key: consul_key(key)?.to_owned(),
                },
                Op::Delete { key } => BranchOp::Delete {
                    key: consul_key(key)?.to_owned(),
                },
                Op::DeletePrefix { prefix } => BranchOp::DeletePrefix {
                    prefix: consul_prefix(prefix)?.to_owned(),
                },
                Op::Put { key, value, lease } => BranchOp::Put {
                    key: consul_key(key)?.to_owned(),
                    value: value.clone(),
                    lease: match lease {
                        Some(l) => Some(
                            session_id(l)
                                .ok_or_else(|| StoreError::LeaseNotFound(l.0.clone()))?
                                .to_owned(),
                        ),
                        None => None,
                    },
                },
            })
        })
        .collect()
}

/// Consul operations a branch can need at most (a put or delete takes two).
fn worst_case_ops(compares: usize, ops: &[BranchOp]) -> usize {
    compares
        + ops
            .iter()
            .map(|op| match op {
                BranchOp::Get { .. } => 1,
                _ => 2,
            })
            .sum::<usize>()
}

/// What one Consul op of a plan stands for.
#[derive(Clone, Debug)]
enum Slot {
    Check,
    TreeRead,
    Read,
    Delete,
    /// lock by the writer session / by a lease / unlock by the writer / by
    /// the known holder; `op` is the branch op.
    LockWriter {
        op: usize,
    },
    LockLease {
        op: usize,
        lease: String,
    },
    UnlockWriter {
        op: usize,
    },
    UnlockHolder {
        op: usize,
    },
}

struct Plan {
    ops: Vec<Value>,
    slots: Vec<Slot>,
    writes: bool,
    /// Results of the check section (one per check-index).
    check_results: usize,
    /// Results after the get-tree section (fixed count).
    tail_results: usize,
    /// Branch op index of each get-tree, in order.
    tree_ops: Vec<usize>,
    /// Results each branch op produces in the tail.
    op_results: Vec<usize>,
}

fn kv_op(verb: &str, key: &str) -> Value {
    json!({ "KV": { "Verb": verb, "Key": key } })
}

fn kv_write(verb: &str, key: &str, value: &[u8], session: &str) -> Value {
    let mut op = kv_op(verb, key);
    op["KV"]["Value"] = Value::String(base64::engine::general_purpose::STANDARD.encode(value));
    op["KV"]["Session"] = Value::String(session.to_owned());
    op
}

/// Builds a branch: checks first, then the get-trees of deleted prefixes
/// (so they all read the state the txn starts from), then the ops in order.
/// `holders`: keys known to be locked by a session (learned from a failed
/// attempt); `writer`: the writer session, needed for puts without a lease.
fn build_plan(
    checks: &[(String, u64)],
    ops: &[BranchOp],
    holders: &HashMap<String, String>,
    writer: Option<&str>,
) -> Result<Plan> {
    let mut plan = Plan {
        ops: Vec::new(),
        slots: Vec::new(),
        writes: false,
        check_results: 0,
        tail_results: 0,
        tree_ops: Vec::new(),
        op_results: vec![0; ops.len()],
    };
    for (key, index) in checks {
        let op = if *index == 0 {
            kv_op("check-not-exists", key)
        } else {
            plan.check_results += 1;
            let mut op = kv_op("check-index", key);
            op["KV"]["Index"] = json!(index);
            op
        };
        plan.ops.push(op);
        plan.slots.push(Slot::Check);
    }
    for (i, op) in ops.iter().enumerate() {
        if let BranchOp::DeletePrefix { prefix } = op {
            plan.ops.push(kv_op("get-tree", prefix));
            plan.slots.push(Slot::TreeRead);
            plan.tree_ops.push(i);
        }
    }
    for (i, op) in ops.iter().enumerate() {
        let push = |plan: &mut Plan, value: Value, slot: Slot, results: usize| {
            plan.ops.push(value);
            plan.slots.push(slot);
            plan.op_results[i] += results;
            plan.tail_results += results;
        };
        match op {
            BranchOp::Get { key } => push(&mut plan, kv_op("get-or-empty", key), Slot::Read, 1),
            BranchOp::Delete { key } => {
                push(&mut plan, kv_op("get-or-empty", key), Slot::Read, 1);
                push(&mut plan, kv_op("delete", key), Slot::Delete, 0);
                plan.writes = true;
            }
            BranchOp::DeletePrefix { prefix } => {
                push(&mut plan, kv_op("delete-tree", prefix), Slot::Delete, 0);
                plan.writes = true;
            }
            BranchOp::Put { key, value, lease } => {
                plan.writes = true;
                if let Some(holder) = holders.get(key) {
                    push(
                        &mut plan,
                        kv_write("unlock", key, value, holder),
                        Slot::UnlockHolder { op: i },
                        1,
                    );
                }
                match (lease, holders.contains_key(key)) {
                    (Some(lease), _) => push(
                        &mut plan,
                        kv_write("lock", key, value, lease),
                        Slot::LockLease {
                            op: i,
                            lease: lease.clone(),
                        },
                        1,
                    ),
                    // Unlocked by the holder above: that was the put.
                    (None, true) => {}
                    (None, false) => {
                        let writer = writer.ok_or_else(|| {
                            StoreError::backend("planning a Consul txn", "no writer session")
                        })?;
                        push(
                            &mut plan,
                            kv_write("lock", key, value, writer),
                            Slot::LockWriter { op: i },
                            1,
                        );
                        push(
                            &mut plan,
                            kv_write("unlock", key, value, writer),
                            Slot::UnlockWriter { op: i },
                            1,
                        );
                    }
                }
            }
        }
    }
    if plan.ops.len() > MAX_TXN_OPS {
        return Err(StoreError::Invalid(format!(
            "txn needs {} Consul operations; Consul takes at most {MAX_TXN_OPS}",
            plan.ops.len()
        )));
    }
    Ok(plan)
}

/// What a branch's results say.
struct Decoded {
    results: Vec<OpResult>,
    /// The index the branch's puts were written at.
    written: Option<u64>,
    /// A key or prefix the branch deleted something under.
    deleted: Option<String>,
}

fn decode_results(plan: &Plan, ops: &[BranchOp], results: Vec<Entry>) -> Result<Decoded, String> {
    let fixed = plan.check_results + plan.tail_results;
    if results.len() < fixed {
        return Err(format!(
            "{} results for {} operations that return at least {fixed}",
            results.len(),
            plan.ops.len()
        ));
    }
    let trees_end = results.len() - plan.tail_results;
    let trees = &results[plan.check_results..trees_end];
    let tail = &results[trees_end..];
    // The get-trees all read the same state, each in key order: the split is
    // unique.
    let mut tree_of: HashMap<usize, &[Entry]> = HashMap::new();
    let mut at = 0;
    for &i in &plan.tree_ops {
        let BranchOp::DeletePrefix { prefix } = &ops[i] else {
            return Err("planned read for an op that is not a deleted prefix".into());
        };
        let start = at;
        while at < trees.len()
            && trees[at].key.starts_with(prefix.as_str())
            && (at == start || trees[at].key > trees[at - 1].key)
        {
            at += 1;
        }
        tree_of.insert(i, &trees[start..at]);
    }
    if at != trees.len() {
        return Err(format!(
            "{} results not matching any operation",
            trees.len() - at
        ));
    }
    let mut tail = tail.iter();
    let mut gone: HashSet<&str> = HashSet::new();
    let mut decoded = Decoded {
        results: Vec::with_capacity(ops.len()),
        written: None,
        deleted: None,
    };
    for (i, op) in ops.iter().enumerate() {
        let mut mine = Vec::with_capacity(plan.op_results[i]);
        for _ in 0..plan.op_results[i] {
            mine.push(tail.next().ok_or("too few results")?);
        }
        let own_key = op.key();
        if let Some(e) = mine.iter().find(|e| e.key != own_key) {
            return Err(format!(
                "a result for key {:?} where {own_key:?} was expected",
                e.key
            ));
        }
        let result = match op {
            BranchOp::Get { .. } => {
                let e = mine.first().ok_or("missing get result")?;
                if e.modify_index == 0 {
                    OpResult::Get(None)
                } else {
                    OpResult::Get(Some(e.to_kv().map_err(|e| e.to_string())?))
                }
            }
            BranchOp::Delete { key } => {
                let e = mine.first().ok_or("missing read before delete")?;
                let existed = e.modify_index != 0;
                if existed {
                    gone.insert(key);
                    decoded.deleted = Some(key.clone());
                }
                OpResult::Delete {
                    deleted: u64::from(existed),
                }
            }
            BranchOp::DeletePrefix { prefix } => {
                let entries = tree_of.get(&i).copied().unwrap_or_default();
                let mut deleted = 0;
                for e in entries {
                    if gone.insert(e.key.as_str()) {
                        deleted += 1;
                    }
                }
                if deleted > 0 {
                    decoded.deleted = Some(prefix.clone());
                }
                OpResult::Delete { deleted }
            }
            BranchOp::Put { .. } => {
                for e in &mine {
                    decoded.written = decoded.written.max(Some(e.modify_index));
                }
                OpResult::Put
            }
        };
        decoded.results.push(result);
    }
    if tail.next().is_some() {
        return Err("more results than operations".into());
    }
    Ok(decoded)
}

/// Why a branch came back with 409.
enum Refusal {
    ComparesFailed,
    LeaseGone(String),
    WriterGone(String),
    /// Keys whose lock holder is not what the plan assumed.
    Held(Vec<String>),
    TooOld(String),
    Other(String),
}

fn classify(plan: &Plan, ops: &[BranchOp], errors: &[TxnError], writer: Option<&str>) -> Refusal {
    let slot = |e: &TxnError| plan.slots.get(e.op_index);
    let key_of = |op: usize| match &ops[op] {
        BranchOp::Put { key, .. } => key.clone(),
        _ => String::new(),
    };
    if errors.iter().any(|e| matches!(slot(e), Some(Slot::Check))) {
        return Refusal::ComparesFailed;
    }
    for e in errors {
        if let Some(Slot::LockLease { lease, .. }) = slot(e) {
            if e.what.contains("invalid session") {
                return Refusal::LeaseGone(lease.clone());
            }
        }
    }
    if let Some(e) = errors.iter().find(|e| e.what.contains("unknown KV verb")) {
        return Refusal::TooOld(e.what.clone());
    }
    if let Some(w) = writer {
        if errors.iter().any(|e| {
            matches!(slot(e), Some(Slot::LockWriter { .. })) && e.what.contains("invalid session")
        }) {
            return Refusal::WriterGone(w.to_owned());
        }
    }
    let mut held = Vec::new();
    let mut other = Vec::new();
    for e in errors {
        match slot(e) {
            Some(Slot::LockWriter { op } | Slot::LockLease { op, .. })
                if e.what.contains("already held") =>
            {
                held.push(key_of(*op))
            }
            Some(Slot::UnlockHolder { op }) => held.push(key_of(*op)),
            // Follows from its lock failing, or from a holder change.
            Some(Slot::UnlockWriter { op }) => held.push(key_of(*op)),
            _ => other.push(format!("operation {}: {}", e.op_index, e.what)),
        }
    }
    if !other.is_empty() {
        return Refusal::Other(other.join("; "));
    }
    held.sort();
    held.dedup();
    Refusal::Held(held)
}

enum Outcome {
    Done(Decoded),
    ComparesFailed,
    Retry,
}

impl Inner {
    /// Sends one branch with its checks.
    async fn run_branch(
        &self,
        what: &(dyn Fn() -> String + Sync),
        checks: &[(String, u64)],
        ops: &[BranchOp],
        holders: &mut HashMap<String, String>,
    ) -> Result<Outcome> {
        let needs_writer = ops.iter().any(
            |op| matches!(op, BranchOp::Put { key, lease: None, .. } if !holders.contains_key(key)),
        );
        let writer = if needs_writer {
            Some(self.writer_session().await?)
        } else {
            None
        };
        let plan = build_plan(checks, ops, holders, writer.as_deref())?;
        if plan.ops.is_empty() {
            return Ok(Outcome::Done(Decoded {
                results: Vec::new(),
                written: None,
                deleted: None,
            }));
        }
        // A read-only txn is served without raft; ask for a consistent read.
        let path = if plan.writes {
            "/v1/txn"
        } else {
            "/v1/txn?consistent"
        };
        let body = serde_json::to_vec(&plan.ops)
            .map_err(|e| StoreError::backend(format!("{}: encoding", what()), e))?;
        let reply = self.request(what, Method::PUT, path, Some(body)).await?;
        match reply.status {
            StatusCode::OK => {
                let parsed: TxnReply = self.decode(&what(), &reply)?;
                let results = parsed
                    .results
                    .unwrap_or_default()
                    .into_iter()
                    .map(|r| r.kv)
                    .collect::<Option<Vec<Entry>>>()
                    .ok_or_else(|| {
                        StoreError::backend(
                            format!("{}: {}", what(), self.target),
                            "a txn result without a KV entry",
                        )
                    })?;
                let decoded = decode_results(&plan, ops, results).map_err(|e| {
                    StoreError::backend(
                        format!("{}: {}", what(), self.target),
                        format!("Consul's txn results do not match the operations: {e}"),
                    )
                })?;
                Ok(Outcome::Done(decoded))
            }
            StatusCode::CONFLICT => {
                let parsed: TxnReply = self.decode(&what(), &reply)?;
                let errors = parsed.errors.unwrap_or_default();
                if errors.is_empty() {
                    return Err(StoreError::backend(
                        format!("{}: {}", what(), self.target),
                        "HTTP 409 without errors",
                    ));
                }
                match classify(&plan, ops, &errors, writer.as_deref()) {
                    Refusal::ComparesFailed => Ok(Outcome::ComparesFailed),
                    Refusal::LeaseGone(lease) => Err(StoreError::LeaseNotFound(lease)),
                    Refusal::TooOld(e) => Err(StoreError::backend(
                        format!("{}: {}", what(), self.target),
                        format!("{e} (the Consul backend needs Consul 1.14 or later)"),
                    )),
                    Refusal::WriterGone(id) => {
                        self.forget_writer(&id).await;
                        Ok(Outcome::Retry)
                    }
                    Refusal::Held(keys) => {
                        for key in keys {
                            match self.read_key(&key).await?.1.and_then(|e| e.session) {
                                Some(s) if !s.is_empty() => {
                                    holders.insert(key, s);
                                }
                                _ => {
                                    holders.remove(&key);
                                }
                            }
                        }
                        Ok(Outcome::Retry)
                    }
                    Refusal::Other(e) => Err(StoreError::backend(
                        format!("{}: {}", what(), self.target),
                        format!("Consul refused the txn: {e}"),
                    )),
                }
            }
            _ => Err(self.status_error(&what(), &reply)),
        }
    }

    /// The revision to report for a branch that ran.
    async fn branch_revision(&self, decoded: &Decoded, near: &str) -> Result<Revision> {
        if let Some(index) = decoded.written {
            return revision(index);
        }
        if let Some(deleted) = &decoded.deleted {
            return self.prefix_revision(deleted).await;
        }
        self.store_revision(near).await
    }

    /// Reads keys in one consistent snapshot.
    async fn read_keys(
        &self,
        what: &(dyn Fn() -> String + Sync),
        keys: &[String],
    ) -> Result<HashMap<String, Option<Entry>>> {
        let ops: Vec<Value> = keys.iter().map(|k| kv_op("get-or-empty", k)).collect();
        let body = serde_json::to_vec(&ops)
            .map_err(|e| StoreError::backend(format!("{}: encoding", what()), e))?;
        let reply = self
            .request(what, Method::PUT, "/v1/txn?consistent", Some(body))
            .await?;
        if reply.status != StatusCode::OK {
            if reply.status == StatusCode::CONFLICT
                && String::from_utf8_lossy(&reply.body).contains("unknown KV verb")
            {
                return Err(StoreError::backend(
                    format!("{}: {}", what(), self.target),
                    "the Consul backend needs Consul 1.14 or later (txn verb get-or-empty)",
                ));
            }
            return Err(self.status_error(&what(), &reply));
        }
        let parsed: TxnReply = self.decode(&what(), &reply)?;
        let results = parsed.results.unwrap_or_default();
        if results.len() != keys.len() {
            return Err(StoreError::backend(
                format!("{}: {}", what(), self.target),
                format!("{} results for {} reads", results.len(), keys.len()),
            ));
        }
        keys.iter()
            .zip(results)
            .map(|(k, r)| match r.kv {
                Some(e) if e.key == *k => Ok((k.clone(), (e.modify_index != 0).then_some(e))),
                _ => Err(StoreError::backend(
                    format!("{}: {}", what(), self.target),
                    format!("unexpected result for key {k:?}"),
                )),
            })
            .collect()
    }
}

fn holds(compares: &[(String, u64)], state: &HashMap<String, Option<Entry>>) -> bool {
    compares.iter().all(|(key, want)| {
        let have = state
            .get(key)
            .and_then(|e| e.as_ref())
            .map_or(0, |e| e.modify_index);
        have == *want
    })
}

// ---------------------------------------------------------------- the trait

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
        validate_txn(&txn)?;
        if txn.len() > MAX_TXN_OPS {
            return Err(StoreError::Invalid(format!(
                "txn has {} compares and ops; Consul takes at most {MAX_TXN_OPS}",
                txn.len()
            )));
        }
        let compares = txn
            .compares
            .iter()
            .map(|c| match c {
                Compare::ModRevision { key, mod_revision } => {
                    let index = u64::try_from(*mod_revision).map_err(|_| {
                        StoreError::Invalid(format!(
                            "compare on {key:?} with negative revision {mod_revision}"
                        ))
                    })?;
                    Ok((consul_key(key)?.to_owned(), index))
                }
            })
            .collect::<Result<Vec<_>>>()?;
        let success = branch_ops(&txn.success)?;
        let failure = branch_ops(&txn.failure)?;
        for (name, ops) in [("success", &success), ("failure", &failure)] {
            let n = worst_case_ops(compares.len(), ops);
            if n > MAX_TXN_OPS {
                return Err(StoreError::Invalid(format!(
                    "the txn's {name} branch can need {n} Consul operations (a put, delete or \
                     deleted prefix takes 2, a compare or get 1); Consul takes at most {MAX_TXN_OPS}"
                )));
            }
        }
        let near = compares
            .first()
            .map(|(k, _)| k.clone())
            .or_else(|| {
                success
                    .iter()
                    .chain(&failure)
                    .map(|op| op.key().to_owned())
                    .next()
            })
            .unwrap_or_default();
        let what = || {
            format!(
                "txn ({} compares, {}/{} ops, first key {:?})",
                txn.compares.len(),
                txn.success.len(),
                txn.failure.len(),
                format!("/{near}")
            )
        };
        let mut holders: HashMap<String, String> = HashMap::new();
        for attempt in 0..TXN_ATTEMPTS {
            if attempt > 0 {
                let ceiling_ms = (1u64 << attempt.min(6)).min(50);
                let pause = std::time::Duration::from_micros(rand_micros(ceiling_ms * 1000));
                tokio::time::sleep(pause).await;
            }
            match self
                .inner
                .run_branch(&what, &compares, &success, &mut holders)
                .await?
            {
                Outcome::Done(decoded) => {
                    let revision = self.inner.branch_revision(&decoded, &near).await?;
                    return Ok(TxnResponse {
                        succeeded: true,
                        revision,
                        results: decoded.results,
                    });
                }
                Outcome::Retry => continue,
                Outcome::ComparesFailed => {}
            }
            // A compare failed. Read the compared keys (and the failure
            // branch's gets, when that is all it does) in one snapshot.
            let only_gets = failure.iter().all(|op| matches!(op, BranchOp::Get { .. }));
            let mut keys: Vec<String> = compares.iter().map(|(k, _)| k.clone()).collect();
            if only_gets {
                for op in &failure {
                    if let BranchOp::Get { key } = op {
                        keys.push(key.clone());
                    }
                }
            }
            keys.sort();
            keys.dedup();
            // The store revision is probed alongside (one round trip less
            // on the contention path) and raised to what the read returned.
            let (state, probed) = tokio::join!(
                self.inner.read_keys(&what, &keys),
                self.inner.store_revision(&near)
            );
            let state = state?;
            if holds(&compares, &state) {
                // The state moved back under the compares: start over.
                continue;
            }
            if only_gets {
                let results = failure
                    .iter()
                    .map(|op| {
                        state
                            .get(op.key())
                            .and_then(|e| e.as_ref())
                            .map(Entry::to_kv)
                            .transpose()
                            .map(OpResult::Get)
                    })
                    .collect::<Result<Vec<_>>>()?;
                let read = state
                    .values()
                    .flatten()
                    .map(|e| e.modify_index)
                    .max()
                    .map_or(Ok(0), revision)?;
                return Ok(TxnResponse {
                    succeeded: false,
                    revision: probed?.max(read),
                    results,
                });
            }
            // Pin what was read: the failure ops apply only if the compares
            // are still false.
            let pins: Vec<(String, u64)> = compares
                .iter()
                .map(|(k, _)| {
                    let index = state
                        .get(k)
                        .and_then(|e| e.as_ref())
                        .map_or(0, |e| e.modify_index);
                    (k.clone(), index)
                })
                .collect::<BTreeMap<_, _>>()
                .into_iter()
                .collect();
            match self
                .inner
                .run_branch(&what, &pins, &failure, &mut holders)
                .await?
            {
                Outcome::Done(decoded) => {
                    let revision = self.inner.branch_revision(&decoded, &near).await?;
                    return Ok(TxnResponse {
                        succeeded: false,
                        revision,
                        results: decoded.results,
                    });
                }
                Outcome::ComparesFailed | Outcome::Retry => continue,
            }
        }
        Err(StoreError::Conflict(format!(
            "{}: {}: gave up after {TXN_ATTEMPTS} attempts racing with concurrent changes",
            what(),
            self.inner.target
        )))
    }

    async fn watch(&self, prefix: &str, start_revision: Revision) -> Result<WatchStream> {
        if start_revision < 0 {
            return Err(StoreError::Invalid(format!(
                "watch start revision {start_revision} is negative"
            )));
        }
        let p = consul_prefix(prefix)?.to_owned();
        let start = u64::try_from(start_revision).unwrap_or(0);
        let remembered = (start > 0)
            .then(|| self.inner.remembered_range(&p, start - 1))
            .flatten();
        let (index, entries, next) = match remembered {
            // Exactly where a recent range left off.
            Some(s) => (s.index, (*s.entries).clone(), start),
            None => {
                let (index, entries) = self.inner.list(&p, None).await?;
                if start == 0 {
                    (index, entries, index + 1)
                } else if start > index {
                    // Nothing under the prefix changed at or after `start`.
                    (index, entries, start)
                } else {
                    // Changes since `start` happened and Consul cannot replay
                    // them (deletes leave no trace to diff against).
                    return Err(StoreError::Compacted {
                        requested: start_revision,
                        oldest: revision(index + 1)?,
                    });
                }
            }
        };
        let watcher = Watcher {
            inner: Arc::clone(&self.inner),
            prefix: p,
            index,
            high: index,
            state: entries,
            next,
            backlog: VecDeque::new(),
            done: false,
            failures: 0,
        };
        Ok(watcher.spawn())
    }

    async fn grant_lease(&self, ttl: Duration) -> Result<LeaseId> {
        if ttl.is_zero() {
            return Err(StoreError::Invalid("lease TTL is zero".into()));
        }
        // Consul counts whole seconds; round up so a lease never lives
        // shorter than asked.
        let mut secs = ttl
            .as_secs()
            .saturating_add(u64::from(ttl.subsec_nanos() > 0));
        let min = self
            .inner
            .session_ttl_min
            .as_secs()
            .saturating_add(u64::from(self.inner.session_ttl_min.subsec_nanos() > 0))
            .max(1);
        if secs < min {
            if !self.inner.warned_ttl.swap(true, Ordering::Relaxed) {
                tracing::warn!(
                    requested = ?ttl, granted_secs = min,
                    "Consul takes session TTLs of at least session_ttl_min; leases live longer than asked"
                );
            }
            secs = min;
        }
        if secs > SESSION_TTL_MAX_SECS {
            return Err(StoreError::Invalid(format!(
                "lease TTL {ttl:?} is above Consul's maximum of {SESSION_TTL_MAX_SECS} s"
            )));
        }
        let id = self
            .inner
            .create_session("rustoverlay lease", secs, "delete")
            .await?;
        Ok(LeaseId(id))
    }

    async fn keep_alive(&self, lease: LeaseId) -> Result<()> {
        let Some(id) = session_id(&lease) else {
            return Err(StoreError::LeaseNotFound(lease.0));
        };
        let what = || format!("renew lease {id}");
        let reply = self
            .inner
            .request(&what, Method::PUT, &format!("/v1/session/renew/{id}"), None)
            .await?;
        match reply.status {
            StatusCode::OK => Ok(()),
            StatusCode::NOT_FOUND => Err(StoreError::LeaseNotFound(lease.0)),
            _ => Err(self.inner.status_error(&what(), &reply)),
        }
    }

    async fn revoke_lease(&self, lease: LeaseId) -> Result<()> {
        let Some(id) = session_id(&lease) else {
            return Ok(());
        };
        let what = || format!("revoke lease {id}");
        let reply = self
            .inner
            .request(
                &what,
                Method::PUT,
                &format!("/v1/session/destroy/{id}"),
                None,
            )
            .await?;
        match reply.status {
            StatusCode::OK | StatusCode::NOT_FOUND => Ok(()),
            _ => Err(self.inner.status_error(&what(), &reply)),
        }
    }
}

// ---------------------------------------------------------------- watches

/// One consumer's watch: the last snapshot handed out and the first revision
/// not handed out yet.
struct Watcher {
    inner: Arc<Inner>,
    prefix: String,
    /// X-Consul-Index of `state`: the next blocking query waits for more.
    index: u64,
    /// The highest index seen, which `index` can fall below.
    high: u64,
    state: BTreeMap<String, Entry>,
    next: u64,
    backlog: VecDeque<WatchEvent>,
    done: bool,
    failures: u32,
}

impl Watcher {
    /// Polls in the background and hands events over a bounded channel:
    /// looking continuously, instead of only when the consumer asks, keeps
    /// the states that a slow consumer would otherwise see coalesced. Ends
    /// when the stream is dropped.
    fn spawn(mut self) -> WatchStream {
        let (tx, mut rx) = tokio::sync::mpsc::channel(WATCH_BUFFER);
        tokio::spawn(async move {
            loop {
                let item = tokio::select! {
                    _ = tx.closed() => return,
                    item = self.next() => item,
                };
                let Some(item) = item else { return };
                let end = item.is_err();
                if tx.send(item).await.is_err() || end {
                    return;
                }
            }
        });
        futures::stream::poll_fn(move |cx| rx.poll_recv(cx)).boxed()
    }

    async fn next(&mut self) -> Option<Result<WatchEvent>> {
        loop {
            if let Some(ev) = self.backlog.pop_front() {
                return Some(Ok(ev));
            }
            if self.done {
                return None;
            }
            let polled = self
                .inner
                .list(&self.prefix, Some((self.index, self.inner.watch_wait)))
                .await;
            match polled {
                Ok((index, entries)) => {
                    if self.failures > 0 {
                        tracing::info!(prefix = %self.prefix, "Consul watch resumed");
                    }
                    self.failures = 0;
                    if let Err(e) = self.absorb(index, entries) {
                        self.done = true;
                        return Some(Err(e));
                    }
                }
                Err(e) if e.is_transient() => {
                    self.failures += 1;
                    // Once, then every ~minute: the outage is already known.
                    if self.failures % 20 == 1 {
                        tracing::warn!(prefix = %self.prefix, error = %e, failures = self.failures, "Consul watch failed; retrying");
                    }
                    let delay = WATCH_RETRY_MIN
                        .saturating_mul(1 << self.failures.min(5))
                        .min(WATCH_RETRY_MAX);
                    tokio::time::sleep(delay).await;
                }
                Err(e) => {
                    self.done = true;
                    return Some(Err(e));
                }
            }
        }
    }

    /// Turns a new snapshot into events: keys whose ModifyIndex changed are
    /// puts at that index, keys gone are deletes at the snapshot's index (the
    /// first revision known to lack them).
    fn absorb(&mut self, index: u64, entries: BTreeMap<String, Entry>) -> Result<()> {
        if index < self.index {
            // Normal after Consul reaped tombstones under the prefix (its
            // index then falls back to the newest entry's); Consul's docs
            // say to reset. The snapshot just read is the fresh one.
            tracing::debug!(prefix = %self.prefix, from = self.index, to = index, "Consul index went backwards");
        }
        let mut events: Vec<(u64, WatchEvent)> = Vec::new();
        for (key, e) in &entries {
            let changed = self
                .state
                .get(key)
                .is_none_or(|old| old.modify_index != e.modify_index);
            if !changed {
                continue;
            }
            if e.modify_index <= self.high {
                // A change older than a snapshot that did not have it: this
                // is a different history (the cluster was rebuilt or
                // restored). Revisions mean nothing across that.
                return Err(StoreError::Compacted {
                    requested: revision(self.next)?,
                    oldest: revision(index.saturating_add(1))?,
                });
            }
            match e.to_kv() {
                Ok(kv) => events.push((
                    e.modify_index,
                    WatchEvent {
                        kind: EventKind::Put,
                        kv,
                    },
                )),
                Err(err) => {
                    tracing::warn!(key = %e.key, error = %err, "skipping an unreadable Consul entry")
                }
            }
        }
        let deleted_at = index.max(self.next);
        for key in self.state.keys() {
            if !entries.contains_key(key) {
                events.push((
                    deleted_at,
                    WatchEvent {
                        kind: EventKind::Delete,
                        kv: KeyValue {
                            key: format!("/{key}"),
                            value: Vec::new(),
                            create_revision: 0,
                            mod_revision: revision(deleted_at)?,
                            lease: None,
                        },
                    },
                ));
            }
        }
        events.sort_by(|a, b| (a.0, &a.1.kv.key).cmp(&(b.0, &b.1.kv.key)));
        for (rev, ev) in events {
            // Changes before the requested start are part of the baseline.
            if rev >= self.next {
                self.backlog.push_back(ev);
            }
        }
        self.state = entries;
        self.index = index;
        self.high = self.high.max(index);
        self.next = self.next.max(index.saturating_add(1));
        Ok(())
    }
}

/// A pseudo-random number of microseconds below `below`, for retry jitter
/// (no need for a cryptographic or even a good generator here).
fn rand_micros(below: u64) -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0),
    );
    h.finish() % below.max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_map_to_consul_and_refuse_what_its_http_api_folds() {
        assert_eq!(consul_key("/a/b").unwrap(), "a/b");
        assert_eq!(consul_key("/a/").unwrap(), "a/");
        assert_eq!(consul_key("/fd00:77::_64/x").unwrap(), "fd00:77::_64/x");
        for bad in [
            "", "a/b", "/", "//a", "/a//b", "/a/../b", "/a/.", " /a", "/a ", "/a\n",
        ] {
            assert!(
                matches!(consul_key(bad), Err(StoreError::Invalid(_))),
                "{bad:?} must be refused"
            );
        }
        assert_eq!(consul_prefix("").unwrap(), "");
        assert_eq!(consul_prefix("/").unwrap(), "");
        assert_eq!(consul_prefix("/c/").unwrap(), "c/");
        assert!(consul_prefix("c/").is_err());
        assert_eq!(kv_path("a b/?%#x"), "/v1/kv/a%20b/%3F%25%23x");
    }

    #[test]
    fn addresses() {
        let ok = |a: &str, tls: bool| parse_address(a, tls).unwrap();
        assert_eq!(
            ok("127.0.0.1:8500", false),
            (false, "127.0.0.1".into(), "127.0.0.1:8500".into())
        );
        assert_eq!(ok("http://h:1/", false), (false, "h".into(), "h:1".into()));
        assert_eq!(ok("h", true), (true, "h".into(), "h:8501".into()));
        assert_eq!(
            ok("[::1]:9", false),
            (false, "::1".into(), "[::1]:9".into())
        );
        assert_eq!(
            ok("https://[::1]", true),
            (true, "::1".into(), "[::1]:8501".into())
        );
        for (bad, tls) in [
            ("https://h:1", false),
            ("http://h:1", true),
            ("unix:///x", false),
            ("h:port", false),
            ("h:1/path", false),
            ("", false),
            (":1", false),
        ] {
            assert!(parse_address(bad, tls).is_err(), "{bad:?} must be refused");
        }
    }

    fn entry(key: &str, modify: u64) -> Entry {
        Entry {
            key: key.into(),
            value: Some(base64::engine::general_purpose::STANDARD.encode(key)),
            session: None,
            create_index: modify,
            modify_index: modify,
        }
    }

    #[test]
    fn results_split_between_tree_reads_and_ops() {
        let ops = vec![
            BranchOp::DeletePrefix {
                prefix: "a/".into(),
            },
            BranchOp::Delete { key: "a/1".into() },
            BranchOp::DeletePrefix {
                prefix: "a/b".into(),
            },
            BranchOp::Get { key: "a/1".into() },
            BranchOp::Put {
                key: "z".into(),
                value: b"v".to_vec(),
                lease: None,
            },
        ];
        let plan = build_plan(&[("c".into(), 5)], &ops, &HashMap::new(), Some("w")).unwrap();
        // check, 2 trees, [read, del-tree], [read, del], [del-tree], [read], [lock, unlock]
        assert_eq!(plan.ops.len(), 1 + 2 + 1 + 2 + 1 + 1 + 2);
        let results = vec![
            entry("c", 5),
            // get-tree a/ then get-tree a/b: same state.
            entry("a/1", 3),
            entry("a/b", 4),
            entry("a/bc", 4),
            entry("a/b", 4),
            entry("a/bc", 4),
            // get-or-empty a/1 before its delete: already gone.
            Entry {
                modify_index: 0,
                ..entry("a/1", 0)
            },
            Entry {
                modify_index: 0,
                ..entry("a/1", 0)
            },
            entry("z", 9),
            entry("z", 9),
        ];
        let d = decode_results(&plan, &ops, results).unwrap();
        assert_eq!(
            d.results,
            vec![
                OpResult::Delete { deleted: 3 },
                OpResult::Delete { deleted: 0 },
                OpResult::Delete { deleted: 0 },
                OpResult::Get(None),
                OpResult::Put,
            ]
        );
        assert_eq!(d.written, Some(9));
        assert_eq!(d.deleted.as_deref(), Some("a/"));
    }

    #[test]
    fn watch_diff_orders_events_and_dates_deletes() {
        let store = ConsulStore::new(ConsulConfig::new("127.0.0.1:1")).unwrap();
        let mut w = Watcher {
            inner: Arc::clone(&store.inner),
            prefix: "p/".into(),
            index: 10,
            high: 10,
            state: [
                ("p/a".to_owned(), entry("p/a", 4)),
                ("p/b".to_owned(), entry("p/b", 10)),
            ]
            .into_iter()
            .collect(),
            next: 11,
            backlog: VecDeque::new(),
            done: false,
            failures: 0,
        };
        let new = [
            ("p/b".to_owned(), entry("p/b", 12)),
            ("p/c".to_owned(), entry("p/c", 11)),
        ]
        .into_iter()
        .collect();
        w.absorb(13, new).unwrap();
        let got: Vec<(String, EventKind, Revision)> = w
            .backlog
            .iter()
            .map(|e| (e.kv.key.clone(), e.kind, e.kv.mod_revision))
            .collect();
        assert_eq!(
            got,
            vec![
                ("/p/c".into(), EventKind::Put, 11),
                ("/p/b".into(), EventKind::Put, 12),
                ("/p/a".into(), EventKind::Delete, 13),
            ]
        );
        assert_eq!((w.index, w.next), (13, 14));
        // The index falls back (tombstones reaped) with nothing new: no event.
        let same = w.state.clone();
        w.backlog.clear();
        w.absorb(12, same).unwrap();
        assert!(w.backlog.is_empty());
        assert_eq!((w.index, w.next), (12, 14));
        // An older change that the previous snapshot did not have: another
        // history.
        let mut other = w.state.clone();
        other.insert("p/z".into(), entry("p/z", 3));
        assert!(matches!(
            w.absorb(5, other),
            Err(StoreError::Compacted { .. })
        ));
    }
}
