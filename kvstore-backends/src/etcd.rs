//! The etcd v3 backend: the store shared by every host of a cluster.
//!
//! The connection is lazy and heals itself: building the store never touches
//! the network, the first call connects (and authenticates), and the gRPC
//! channel reconnects on its own after etcd comes back. Watches re-open
//! themselves after a disconnect from the last revision they delivered, so a
//! consumer sees neither gaps nor duplicates; only compaction ends them.

use std::collections::{HashMap, VecDeque};
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use etcd_client::proto::{PbEvent, PbKeyValue, PbTxnOpResponse, PbWatchResponse};
use etcd_client::{
    Certificate, Client, Compare as EtcdCompare, CompareOp, ConnectOptions, DeleteOptions,
    GetOptions, Identity, KvClient, LeaseClient, LeaseKeepAliveStream, LeaseKeeper, PutOptions,
    TlsOptions, Txn as EtcdTxn, TxnOp, WatchClient, WatchOptions,
};
use futures::StreamExt;
use tonic::Code;

use crate::engine::validate_txn;
use crate::{
    Compare, EventKind, KeyValue, KvStore, LeaseId, Op, OpResult, RangeResponse, Result, Revision,
    StoreError, Txn, TxnResponse, WatchEvent, WatchStream,
};

/// etcd's default `--max-txn-ops`.
const MAX_TXN_OPS: usize = 128;
/// etcd's largest lease TTL, in seconds.
const MAX_LEASE_TTL_SECS: u64 = 9_000_000_000;
/// Answers bigger than tonic's 4 MiB default (a large range) must not fail.
const MAX_MESSAGE: usize = 256 * 1024 * 1024;
/// HTTP/2 pings find a silently dead connection. Only while streams are open:
/// etcd answers idle pings more often than its 5 s minimum with GOAWAY.
const PING_INTERVAL: Duration = Duration::from_secs(10);
const PING_TIMEOUT: Duration = Duration::from_secs(5);
/// Re-opening a watch again waits this long at first, doubling up to the max.
const WATCH_RETRY_MIN: Duration = Duration::from_millis(100);
const WATCH_RETRY_MAX: Duration = Duration::from_secs(3);

/// How to reach etcd.
#[derive(Clone)]
pub struct EtcdConfig {
    /// `host:port`, `http://host:port` or `https://host:port`. Bare ones use
    /// https when [`EtcdConfig::tls`] is set.
    pub endpoints: Vec<String>,
    /// TLS for every endpoint; `None` means plain http.
    pub tls: Option<EtcdTls>,
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

/// TLS files (PEM). The CA checks the server's certificate; a certificate and
/// key, both or neither, authenticate this client to etcd
/// (`--client-cert-auth`).
#[derive(Clone, Debug)]
pub struct EtcdTls {
    pub ca: PathBuf,
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
}

/// A [`KvStore`] on an etcd v3 cluster (3.4 or later).
pub struct EtcdStore {
    inner: Arc<Inner>,
}

struct Inner {
    endpoints: Vec<String>,
    /// For messages: "etcd at a:2379, b:2379".
    target: String,
    options: ConnectOptions,
    user: Option<String>,
    request_timeout: Duration,
    /// One client per endpoint, built by the first call that uses it; a failed
    /// attempt leaves it empty so a later call tries again. (Not one client
    /// over all endpoints: its balancer keeps sending requests to a dead one.)
    conns: Vec<tokio::sync::OnceCell<Conn>>,
    /// The endpoint that answered last: calls go there, and move on to the
    /// next endpoint only when it cannot be reached.
    preferred: AtomicUsize,
    /// One open keep-alive stream per lease, so a renewal is one message.
    keepers: Mutex<HashMap<i64, Arc<tokio::sync::Mutex<Option<Keeper>>>>>,
}

#[derive(Clone)]
struct Conn {
    kv: KvClient,
    watch: WatchClient,
    lease: LeaseClient,
}

struct Keeper {
    keeper: LeaseKeeper,
    stream: LeaseKeepAliveStream,
    /// A renewal was sent but its answer not read (the caller gave up): the
    /// next answer on this stream is not ours, so the stream is replaced.
    in_flight: bool,
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
        let mut options = ConnectOptions::new()
            .with_connect_timeout(dial_timeout)
            .with_timeout(request_timeout)
            .with_keep_alive(PING_INTERVAL, PING_TIMEOUT)
            .with_keep_alive_while_idle(false)
            // Without a leader etcd cannot answer linearizably: fail (and let
            // watches re-open elsewhere) instead of waiting.
            .with_require_leader(true);
        match (&user, password) {
            (Some(u), Some(p)) => {
                // Tokens expire (and die with an etcd restart): re-authenticate.
                options = options.with_user(u, p).with_auto_token_refresh(true);
            }
            (None, None) => {}
            _ => {
                return Err(StoreError::Invalid(
                    "etcd user and password must be given together".into(),
                ))
            }
        }
        if let Some(tls) = &tls {
            options = options.with_tls(tls_options(tls)?);
        }
        let target = format!("etcd at {}", endpoints.join(", "));
        Ok(EtcdStore {
            inner: Arc::new(Inner {
                conns: endpoints
                    .iter()
                    .map(|_| tokio::sync::OnceCell::new())
                    .collect(),
                endpoints,
                target,
                options,
                user,
                request_timeout,
                preferred: AtomicUsize::new(0),
                keepers: Mutex::new(HashMap::new()),
            }),
        })
    }
}

impl std::fmt::Debug for EtcdStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EtcdStore")
            .field("endpoints", &self.inner.endpoints)
            .finish_non_exhaustive()
    }
}

fn tls_options(tls: &EtcdTls) -> Result<TlsOptions> {
    let read = |what: &str, path: &PathBuf| {
        std::fs::read(path).map_err(|e| {
            StoreError::backend(format!("reading etcd TLS {what} {}", path.display()), e)
        })
    };
    // etcd 3.4 does not always negotiate HTTP/2 by ALPN; it speaks it anyway.
    let mut options = TlsOptions::new()
        .ca_certificate(Certificate::from_pem(read("CA", &tls.ca)?))
        .assume_http2(true);
    match (&tls.cert, &tls.key) {
        (Some(cert), Some(key)) => {
            options = options.identity(Identity::from_pem(
                read("certificate", cert)?,
                read("key", key)?,
            ));
        }
        (None, None) => {}
        _ => {
            return Err(StoreError::Invalid(
                "etcd TLS client certificate and key must be given together".into(),
            ))
        }
    }
    Ok(options)
}

impl Inner {
    /// The client of endpoint `i`, built on first use. Without credentials
    /// building does no I/O; with them it authenticates, which a later call
    /// repeats if it fails now.
    async fn conn(&self, i: usize) -> std::result::Result<&Conn, etcd_client::Error> {
        self.conns[i]
            .get_or_try_init(|| async {
                let client =
                    Client::connect([self.endpoints[i].as_str()], Some(self.options.clone()))
                        .await?;
                Ok(Conn {
                    kv: client.kv_client().max_decoding_message_size(MAX_MESSAGE),
                    watch: client.watch_client().max_decoding_message_size(MAX_MESSAGE),
                    lease: client.lease_client(),
                })
            })
            .await
    }

    /// One call, on the preferred endpoint or, when that cannot be reached,
    /// the next ones in turn. A request that got no connection was not sent,
    /// so repeating it elsewhere is safe.
    async fn call<T, F, Fut>(&self, what: impl FnOnce() -> String, call: F) -> Result<T>
    where
        F: Fn(Conn) -> Fut,
        Fut: std::future::Future<Output = std::result::Result<T, etcd_client::Error>>,
    {
        let n = self.endpoints.len();
        let first = self.preferred.load(Ordering::Relaxed) % n;
        let mut unreachable = Vec::new();
        for i in (first..n).chain(0..first) {
            let (result, connecting) = match self.conn(i).await {
                Ok(conn) => (call(conn.clone()).await, false),
                Err(e) => (Err(e), true),
            };
            match result {
                Ok(v) => {
                    self.preferred.store(i, Ordering::Relaxed);
                    return Ok(v);
                }
                Err(e) if is_connect_error(&e) => {
                    unreachable.push(format!("{}: {}", self.endpoints[i], describe(&e)));
                }
                Err(e) => {
                    return Err(match (&self.user, connecting) {
                        (Some(user), true) => self.auth_error(i, user, e),
                        _ => map_error(&self.at(i), self.request_timeout, &what(), e),
                    })
                }
            }
        }
        Err(StoreError::Unavailable(format!(
            "{}: cannot reach etcd at {}",
            what(),
            unreachable.join("; ")
        )))
    }

    /// "etcd at host:port", for messages about one endpoint.
    fn at(&self, i: usize) -> String {
        format!("etcd at {}", self.endpoints[i])
    }

    fn auth_error(&self, i: usize, user: &str, e: etcd_client::Error) -> StoreError {
        let context = format!("authenticating as user {user:?}");
        let detail = describe(&e);
        match map_error(&self.at(i), self.request_timeout, &context, e) {
            // Down or slow: worth retrying like any call.
            transient @ (StoreError::Unavailable(_) | StoreError::Timeout(_)) => transient,
            // Wrong password, unknown user, auth not enabled: retrying will not help.
            _ => StoreError::backend(format!("{}: {context}", self.at(i)), detail),
        }
    }

    fn forget_keeper(&self, id: i64) {
        if let Ok(mut keepers) = self.keepers.lock() {
            keepers.remove(&id);
        }
    }

    /// Opens a watch from `start` (0: now) and waits until etcd has created
    /// it, so nothing written after this returns can be missed. Returns the
    /// stream and, for a watch from now, the store revision it starts after.
    async fn open_watch(
        &self,
        prefix: &str,
        start: Revision,
    ) -> Result<(etcd_client::WatchStream, Option<Revision>)> {
        let what = || format!("watch on prefix {prefix:?} from revision {start}");
        // Progress notifications move the resume point of a quiet prefix, so
        // a reconnect after a long calm does not land in compacted history.
        let options = WatchOptions::new()
            .with_prefix()
            .with_start_revision(start)
            .with_progress_notify();
        let mut stream = self
            .call(what, |mut c| {
                let options = options.clone();
                async move { c.watch.watch(prefix, Some(options)).await }
            })
            .await?;
        let created = tokio::time::timeout(self.request_timeout, async {
            loop {
                match stream.message().await {
                    Ok(Some(resp)) => {
                        let resp = resp.0;
                        if resp.compact_revision != 0 {
                            return Err(StoreError::Compacted {
                                requested: start,
                                oldest: resp.compact_revision,
                            });
                        }
                        if resp.canceled {
                            return Err(StoreError::Backend {
                                context: format!("{}: {}", self.target, what()),
                                source: format!("etcd refused the watch: {}", resp.cancel_reason)
                                    .into(),
                            });
                        }
                        if resp.created {
                            return Ok(resp.header.map(|h| h.revision));
                        }
                    }
                    Ok(None) => {
                        return Err(StoreError::Unavailable(format!(
                            "{}: {}: the stream closed before the watch was created",
                            self.target,
                            what()
                        )))
                    }
                    Err(e) => {
                        return Err(map_error(&self.target, self.request_timeout, &what(), e))
                    }
                }
            }
        })
        .await
        .unwrap_or(Err(StoreError::Timeout(self.request_timeout)))?;
        let now = if start == 0 {
            Some(created.ok_or_else(|| missing_header(&self.target, &what()))?)
        } else {
            None
        };
        Ok((stream, now))
    }
}

#[async_trait]
impl KvStore for EtcdStore {
    fn backend_name(&self) -> &'static str {
        "etcd"
    }

    async fn get(&self, key: &str) -> Result<Option<KeyValue>> {
        crate::engine::check_key(key)?;
        let what = || format!("get {key:?}");
        let resp = self
            .inner
            .call(what, |mut c| async move { c.kv.get(key, None).await })
            .await?;
        let kv = resp.0.kvs.into_iter().next();
        kv.map(|kv| key_value(kv).ok_or_else(|| bad_key(&self.inner.target, &what())))
            .transpose()
    }

    async fn range(&self, prefix: &str) -> Result<RangeResponse> {
        let what = || format!("range over prefix {prefix:?}");
        let resp = self
            .inner
            .call(what, |mut c| async move {
                c.kv.get(prefix, Some(GetOptions::new().with_prefix()))
                    .await
            })
            .await?;
        let resp = resp.0;
        let revision = resp
            .header
            .map(|h| h.revision)
            .ok_or_else(|| missing_header(&self.inner.target, &what()))?;
        let kvs = resp
            .kvs
            .into_iter()
            .filter_map(|kv| {
                if std::str::from_utf8(&kv.key).is_err() {
                    // Not written by us (our keys are strings); cannot be represented.
                    let key = String::from_utf8_lossy(&kv.key);
                    tracing::warn!(%key, "skipping an etcd key that is not UTF-8");
                }
                key_value(kv)
            })
            .collect();
        Ok(RangeResponse { kvs, revision })
    }

    async fn txn(&self, txn: Txn) -> Result<TxnResponse> {
        validate_txn(&txn)?;
        if txn.len() > MAX_TXN_OPS {
            return Err(StoreError::Invalid(format!(
                "txn has {} compares and ops; etcd takes at most {MAX_TXN_OPS}",
                txn.len()
            )));
        }
        let request = etcd_txn(&txn)?;
        let what = || {
            let first = txn
                .success
                .iter()
                .chain(&txn.failure)
                .map(op_key)
                .chain(txn.compares.iter().map(|c| match c {
                    Compare::ModRevision { key, .. } => key.as_str(),
                }))
                .next()
                .unwrap_or("");
            format!(
                "txn ({} compares, {}/{} ops, first key {first:?})",
                txn.compares.len(),
                txn.success.len(),
                txn.failure.len()
            )
        };
        let result = self
            .inner
            .call(what, |mut c| {
                let request = request.clone();
                async move { c.kv.txn(request).await }
            })
            .await;
        let resp = match result {
            Ok(resp) => resp.0,
            Err(StoreError::LeaseNotFound(_)) => {
                return Err(StoreError::LeaseNotFound(self.missing_lease(&txn).await))
            }
            Err(e) => return Err(e),
        };
        let revision = resp
            .header
            .map(|h| h.revision)
            .ok_or_else(|| missing_header(&self.inner.target, &what()))?;
        let ops = if resp.succeeded {
            &txn.success
        } else {
            &txn.failure
        };
        if resp.responses.len() != ops.len() {
            return Err(StoreError::backend(
                format!("{}: {}", self.inner.target, what()),
                format!(
                    "etcd answered {} op results for {} ops",
                    resp.responses.len(),
                    ops.len()
                ),
            ));
        }
        let mut results = Vec::with_capacity(ops.len());
        for (op, answer) in ops.iter().zip(resp.responses) {
            let result = match (op, answer.response) {
                (Op::Put { .. }, Some(PbTxnOpResponse::ResponsePut(_))) => Some(OpResult::Put),
                (
                    Op::Delete { .. } | Op::DeletePrefix { .. },
                    Some(PbTxnOpResponse::ResponseDeleteRange(d)),
                ) => Some(OpResult::Delete {
                    deleted: u64::try_from(d.deleted).unwrap_or(0),
                }),
                (Op::Get { .. }, Some(PbTxnOpResponse::ResponseRange(r))) => {
                    match r.kvs.into_iter().next().map(key_value) {
                        None => Some(OpResult::Get(None)),
                        Some(Some(kv)) => Some(OpResult::Get(Some(kv))),
                        Some(None) => None,
                    }
                }
                _ => None,
            };
            results.push(result.ok_or_else(|| {
                StoreError::backend(
                    format!("{}: {}", self.inner.target, what()),
                    format!("etcd answered {op:?} with an unexpected result"),
                )
            })?);
        }
        Ok(TxnResponse {
            succeeded: resp.succeeded,
            revision,
            results,
        })
    }

    async fn watch(&self, prefix: &str, start_revision: Revision) -> Result<WatchStream> {
        if start_revision < 0 {
            return Err(StoreError::Invalid(format!(
                "watch start revision {start_revision} is negative"
            )));
        }
        let (stream, now) = self.inner.open_watch(prefix, start_revision).await?;
        let watcher = Watcher {
            inner: Arc::clone(&self.inner),
            prefix: prefix.to_owned(),
            next: now.map_or(start_revision, |rev| rev + 1),
            stream: Some(stream),
            backlog: VecDeque::new(),
            done: false,
            delay: Duration::ZERO,
        };
        Ok(futures::stream::unfold(watcher, Watcher::next_item).boxed())
    }

    async fn grant_lease(&self, ttl: Duration) -> Result<LeaseId> {
        if ttl.is_zero() {
            return Err(StoreError::Invalid("lease TTL is zero".into()));
        }
        // etcd counts whole seconds; round up so a lease never lives shorter
        // than asked. etcd itself raises TTLs below its minimum (about 2 s
        // with default timings) to that minimum.
        let secs = ttl
            .as_secs()
            .saturating_add(u64::from(ttl.subsec_nanos() > 0));
        if secs > MAX_LEASE_TTL_SECS {
            return Err(StoreError::Invalid(format!(
                "lease TTL {ttl:?} is above etcd's maximum of {MAX_LEASE_TTL_SECS} s"
            )));
        }
        let secs = i64::try_from(secs).unwrap_or(i64::MAX);
        let what = || format!("grant a lease of {secs} s");
        let resp = self
            .inner
            .call(what, |mut c| async move { c.lease.grant(secs, None).await })
            .await?;
        let resp = resp.0;
        if !resp.error.is_empty() || resp.id <= 0 {
            return Err(StoreError::backend(
                format!("{}: {}", self.inner.target, what()),
                format!("etcd refused: {:?} (lease id {})", resp.error, resp.id),
            ));
        }
        Ok(LeaseId(resp.id.to_string()))
    }

    async fn keep_alive(&self, lease: LeaseId) -> Result<()> {
        let not_found = || StoreError::LeaseNotFound(lease.0.clone());
        let id = parse_lease(&lease).ok_or_else(not_found)?;
        let slot = {
            let mut keepers = self
                .inner
                .keepers
                .lock()
                .map_err(|_| StoreError::Unavailable("etcd lease keepers poisoned".into()))?;
            Arc::clone(keepers.entry(id).or_default())
        };
        let mut slot = slot.lock().await;
        if let Some(k) = slot.as_mut().filter(|k| !k.in_flight) {
            k.in_flight = true;
            match renew(k, id, self.inner.request_timeout).await {
                Some(ttl) if ttl > 0 => {
                    k.in_flight = false;
                    return Ok(());
                }
                Some(_) => {
                    *slot = None;
                    self.inner.forget_keeper(id);
                    return Err(not_found());
                }
                // The stream broke (reconnect, etcd restart): open a new one.
                None => {}
            }
        }
        *slot = None;
        // Opening the stream sends the first renewal and reads its answer.
        let what = || format!("keep lease {id} alive");
        match self
            .inner
            .call(what, |mut c| async move { c.lease.keep_alive(id).await })
            .await
        {
            Ok((keeper, stream)) => {
                *slot = Some(Keeper {
                    keeper,
                    stream,
                    in_flight: false,
                });
                Ok(())
            }
            Err(StoreError::LeaseNotFound(_)) => {
                self.inner.forget_keeper(id);
                Err(not_found())
            }
            Err(e) => Err(e),
        }
    }

    async fn revoke_lease(&self, lease: LeaseId) -> Result<()> {
        // Not a lease etcd could have made: nothing to revoke.
        let Some(id) = parse_lease(&lease) else {
            return Ok(());
        };
        self.inner.forget_keeper(id);
        let what = || format!("revoke lease {id}");
        match self
            .inner
            .call(what, |mut c| async move { c.lease.revoke(id).await })
            .await
        {
            Ok(_) | Err(StoreError::LeaseNotFound(_)) => Ok(()),
            Err(e) => Err(e),
        }
    }
}

impl EtcdStore {
    /// etcd says "lease not found" without naming it: find out which lease of
    /// the txn it meant (the txn usually has one).
    async fn missing_lease(&self, txn: &Txn) -> String {
        let mut leases: Vec<&str> = Vec::new();
        for op in txn.success.iter().chain(&txn.failure) {
            if let Op::Put {
                lease: Some(lease), ..
            } = op
            {
                if !leases.contains(&lease.0.as_str()) {
                    leases.push(&lease.0);
                }
            }
        }
        if leases.len() > 1 {
            for lease in &leases {
                let Some(id) = parse_lease(&LeaseId((*lease).to_owned())) else {
                    return (*lease).to_owned();
                };
                let alive = self
                    .inner
                    .call(String::new, |mut c| async move {
                        c.lease.time_to_live(id, None).await
                    })
                    .await;
                if matches!(&alive, Err(StoreError::LeaseNotFound(_)))
                    || matches!(&alive, Ok(r) if r.ttl() <= 0)
                {
                    return (*lease).to_owned();
                }
            }
        }
        leases.first().map_or_else(String::new, |l| (*l).to_owned())
    }
}

/// One renewal on an open keep-alive stream: the TTL etcd answered, or None
/// when the stream is broken.
async fn renew(k: &mut Keeper, id: i64, timeout: Duration) -> Option<i64> {
    k.keeper.keep_alive().await.ok()?;
    match tokio::time::timeout(timeout, k.stream.message()).await {
        Ok(Ok(Some(resp))) if resp.id() == id => Some(resp.ttl()),
        Ok(Err(e)) if status_code(&e) == Some(Code::NotFound) => Some(0),
        _ => None,
    }
}

fn parse_lease(lease: &LeaseId) -> Option<i64> {
    // etcd lease IDs are positive; 0 would mean "no lease" to etcd.
    lease.0.parse::<i64>().ok().filter(|id| *id > 0)
}

fn etcd_txn(txn: &Txn) -> Result<EtcdTxn> {
    let compares: Vec<EtcdCompare> = txn
        .compares
        .iter()
        .map(|c| match c {
            // etcd compares an absent key as if all its fields were 0, so
            // mod_revision 0 means "absent" there too.
            Compare::ModRevision { key, mod_revision } => {
                EtcdCompare::mod_revision(key.as_str(), CompareOp::Equal, *mod_revision)
            }
        })
        .collect();
    Ok(EtcdTxn::new()
        .when(compares)
        .and_then(etcd_ops(&txn.success)?)
        .or_else(etcd_ops(&txn.failure)?))
}

fn etcd_ops(ops: &[Op]) -> Result<Vec<TxnOp>> {
    ops.iter()
        .map(|op| {
            Ok(match op {
                Op::Put { key, value, lease } => {
                    let options = match lease {
                        Some(lease) => Some(
                            PutOptions::new().with_lease(
                                parse_lease(lease)
                                    .ok_or_else(|| StoreError::LeaseNotFound(lease.0.clone()))?,
                            ),
                        ),
                        None => None,
                    };
                    TxnOp::put(key.as_str(), value.clone(), options)
                }
                Op::Delete { key } => TxnOp::delete(key.as_str(), None),
                Op::DeletePrefix { prefix } => {
                    TxnOp::delete(prefix.as_str(), Some(DeleteOptions::new().with_prefix()))
                }
                Op::Get { key } => TxnOp::get(key.as_str(), None),
            })
        })
        .collect()
}

fn op_key(op: &Op) -> &str {
    match op {
        Op::Put { key, .. } | Op::Delete { key } | Op::Get { key } => key,
        Op::DeletePrefix { prefix } => prefix,
    }
}

/// None when the key is not UTF-8 (never the case for keys we wrote).
fn key_value(kv: PbKeyValue) -> Option<KeyValue> {
    Some(KeyValue {
        key: String::from_utf8(kv.key).ok()?,
        value: kv.value,
        create_revision: kv.create_revision,
        mod_revision: kv.mod_revision,
        lease: (kv.lease != 0).then(|| LeaseId(kv.lease.to_string())),
    })
}

fn missing_header(target: &str, what: &str) -> StoreError {
    StoreError::backend(
        format!("{target}: {what}"),
        "etcd answered without a response header",
    )
}

fn bad_key(target: &str, what: &str) -> StoreError {
    StoreError::backend(format!("{target}: {what}"), "etcd returned a non-UTF-8 key")
}

fn status_code(e: &etcd_client::Error) -> Option<Code> {
    match e {
        etcd_client::Error::GRpcStatus(status) => Some(status.code()),
        _ => None,
    }
}

/// A request that failed to get a connection, so it was never sent.
fn is_connect_error(e: &etcd_client::Error) -> bool {
    let etcd_client::Error::GRpcStatus(status) = e else {
        return false;
    };
    if status.code() != Code::Unavailable {
        return false;
    }
    // tonic reports "connection refused / timed out" as Unavailable with the
    // connector's error as the source; etcd's own Unavailable answers have none.
    let mut source = std::error::Error::source(status);
    while let Some(e) = source {
        if let Some(io) = e.downcast_ref::<std::io::Error>() {
            use std::io::ErrorKind::*;
            return matches!(
                io.kind(),
                ConnectionRefused
                    | TimedOut
                    | AddrNotAvailable
                    | HostUnreachable
                    | NetworkUnreachable
            );
        }
        source = e.source();
    }
    false
}

/// The message of an error with its causes, without tonic's metadata dump.
fn describe(e: &etcd_client::Error) -> String {
    let mut text = match e {
        etcd_client::Error::GRpcStatus(status) => status.message().to_owned(),
        other => other.to_string(),
    };
    let mut source = match e {
        etcd_client::Error::GRpcStatus(status) => std::error::Error::source(status),
        other => std::error::Error::source(other),
    };
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !text.contains(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
    text
}

fn map_error(target: &str, timeout: Duration, what: &str, e: etcd_client::Error) -> StoreError {
    let what = if what.is_empty() {
        String::new()
    } else {
        format!("{what}: ")
    };
    let detail = describe(&e);
    let unavailable = || StoreError::Unavailable(format!("{what}{target}: {detail}"));
    // The detail, not the error itself: tonic's Display dumps the metadata.
    let backend = || StoreError::backend(format!("{what}{target}"), detail.clone());
    match &e {
        etcd_client::Error::GRpcStatus(status) => match status.code() {
            Code::Unavailable | Code::Unknown | Code::Aborted => unavailable(),
            // tonic's own request timeout comes back as Cancelled.
            Code::Cancelled if status.message().contains("Timeout expired") => {
                StoreError::Timeout(timeout)
            }
            Code::Cancelled => unavailable(),
            Code::DeadlineExceeded => StoreError::Timeout(timeout),
            // A configuration problem, not a bad request.
            Code::InvalidArgument if status.message().contains("user name is empty") => {
                StoreError::backend(
                    format!("{what}{target}"),
                    format!(
                        "{detail} (etcd has authentication enabled: configure a user and password)"
                    ),
                )
            }
            // etcd does not say which lease; the lease calls fill it in.
            Code::NotFound if status.message().contains("lease") => {
                StoreError::LeaseNotFound(String::new())
            }
            Code::InvalidArgument
            | Code::ResourceExhausted
            | Code::OutOfRange
            | Code::FailedPrecondition => StoreError::Invalid(format!("{what}{target}: {detail}")),
            code => StoreError::backend(format!("{what}{target}"), format!("{detail} ({code:?})")),
        },
        etcd_client::Error::TransportError(_)
        | etcd_client::Error::IoError(_)
        | etcd_client::Error::WatchError(_) => unavailable(),
        etcd_client::Error::LeaseKeepAliveError(msg) if msg.contains("not found") => {
            StoreError::LeaseNotFound(String::new())
        }
        etcd_client::Error::LeaseKeepAliveError(_) => unavailable(),
        etcd_client::Error::InvalidArgs(_) | etcd_client::Error::InvalidUri(_) => {
            StoreError::Invalid(format!("{what}{target}: {detail}"))
        }
        _ => backend(),
    }
}

/// The state of one consumer's watch: the etcd stream (None while re-opening)
/// and the first revision not yet handed out.
struct Watcher {
    inner: Arc<Inner>,
    prefix: String,
    next: Revision,
    stream: Option<etcd_client::WatchStream>,
    backlog: VecDeque<WatchEvent>,
    done: bool,
    /// Wait before the next re-open: zero once a stream delivered something,
    /// growing while re-opening fails or a re-opened stream breaks at once.
    delay: Duration,
}

impl Watcher {
    async fn next_item(mut self) -> Option<(Result<WatchEvent>, Self)> {
        loop {
            if let Some(ev) = self.backlog.pop_front() {
                return Some((Ok(ev), self));
            }
            if self.done {
                return None;
            }
            let Some(stream) = self.stream.as_mut() else {
                match self.reopen().await {
                    Ok(stream) => self.stream = Some(stream),
                    Err(e) => return Some((Err(e), self.finish())),
                }
                continue;
            };
            match stream.message().await {
                Ok(Some(resp)) => {
                    self.delay = Duration::ZERO;
                    if let Err(e) = self.absorb(resp.0) {
                        return Some((Err(e), self.finish()));
                    }
                }
                Ok(None) => {
                    tracing::warn!(prefix = %self.prefix, target = %self.inner.target, "etcd closed the watch; re-opening it");
                    self.stream = None;
                }
                Err(e) => {
                    tracing::warn!(prefix = %self.prefix, target = %self.inner.target, error = %describe(&e), "etcd watch broke; re-opening it");
                    self.stream = None;
                }
            }
        }
    }

    fn finish(mut self) -> Self {
        self.done = true;
        self.stream = None;
        self
    }

    /// Re-opens the watch from the first revision not handed out, retrying
    /// with back-off while etcd is unreachable. Errors that retrying cannot
    /// fix (compaction, a refused watch) end the stream.
    async fn reopen(&mut self) -> Result<etcd_client::WatchStream> {
        let mut failures = 0u32;
        loop {
            if !self.delay.is_zero() {
                tokio::time::sleep(self.delay).await;
            }
            self.delay = (self.delay * 2).clamp(WATCH_RETRY_MIN, WATCH_RETRY_MAX);
            match self.inner.open_watch(&self.prefix, self.next).await {
                Ok((stream, _)) => {
                    if failures > 0 {
                        tracing::info!(prefix = %self.prefix, from = self.next, "etcd watch re-opened");
                    }
                    return Ok(stream);
                }
                Err(e) if e.is_transient() => {
                    failures += 1;
                    // Once, then every ~minute: the outage is already known.
                    if failures % 20 == 1 {
                        tracing::warn!(prefix = %self.prefix, error = %e, failures, "cannot re-open the etcd watch yet; retrying");
                    }
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Queues the events of one answer, or says why the watch must end.
    fn absorb(&mut self, resp: PbWatchResponse) -> Result<()> {
        if resp.compact_revision != 0 {
            return Err(StoreError::Compacted {
                requested: self.next,
                oldest: resp.compact_revision,
            });
        }
        if resp.canceled {
            // Not compaction: etcd dropped the watcher (e.g. it lost its
            // leader); re-opening from the next revision loses nothing.
            tracing::warn!(prefix = %self.prefix, reason = %resp.cancel_reason, "etcd canceled the watch; re-opening it");
            self.stream = None;
            return Ok(());
        }
        if resp.events.is_empty() && !resp.created {
            // A progress notification: every change up to the header
            // revision has been sent.
            if let Some(header) = resp.header {
                self.next = self.next.max(header.revision + 1);
            }
            return Ok(());
        }
        let mut last = None;
        for ev in resp.events {
            let Some(ev) = watch_event(ev) else {
                tracing::warn!(prefix = %self.prefix, "skipping a malformed etcd watch event");
                continue;
            };
            // Re-opened watches start at `next`; never hand out a change twice.
            if ev.revision() < self.next {
                continue;
            }
            last = Some(ev.revision());
            self.backlog.push_back(ev);
        }
        // etcd sends all changes of a revision in one answer (we do not ask
        // for fragments), so the revision after the last one is a safe resume
        // point.
        if let Some(last) = last {
            self.next = last + 1;
        }
        Ok(())
    }
}

/// A put, or a delete in the shape every backend uses. None for a malformed
/// event or a key that is not UTF-8.
fn watch_event(ev: PbEvent) -> Option<WatchEvent> {
    let kind = match ev.r#type {
        0 => EventKind::Put,
        1 => EventKind::Delete,
        _ => return None,
    };
    let kv = key_value(ev.kv?)?;
    Some(match kind {
        EventKind::Put => WatchEvent { kind, kv },
        EventKind::Delete => WatchEvent {
            kind,
            kv: KeyValue {
                key: kv.key,
                value: Vec::new(),
                create_revision: 0,
                mod_revision: kv.mod_revision,
                lease: None,
            },
        },
    })
}
