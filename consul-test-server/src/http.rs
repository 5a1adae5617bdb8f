//! The HTTP side: routes, ACL check, blocking queries, session timers and the
//! accept loop.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::{Path, Request, State as AxState};
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode, Uri};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, put};
use axum::Router;
use base64::Engine;
use hyper_util::rt::TokioIo;
use hyper_util::service::TowerToHyperService;
use serde_json::{json, Value};
use tokio::net::TcpListener;
use tokio::task::JoinSet;

use crate::state::{Behavior, Entry, KvOp, Session, State, Verb};
use crate::{lock, Config, TlsConfig};

/// Consul's limits: operations per txn, value size, txn body size.
const MAX_TXN_OPS: usize = 64;
const MAX_VALUE: usize = 512 * 1024;
const MAX_TXN_BODY: usize = 512 * 1024;
/// Consul's blocking-query wait: 5 min by default, 10 min at most.
const DEFAULT_WAIT: Duration = Duration::from_secs(300);
const MAX_WAIT: Duration = Duration::from_secs(600);
const SESSION_TTL_MAX: Duration = Duration::from_secs(86_400);
const MAX_LOCK_DELAY: Duration = Duration::from_secs(60);
const NODE: &str = "consul-test-server";

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
    fn mutate<T>(&self, f: impl FnOnce(&mut State) -> T) -> T {
        let out = f(&mut lock(&self.state));
        self.changed.send_modify(|n| *n += 1);
        out
    }

    /// xorshift: good enough for jitter and session IDs in tests.
    fn random(&self) -> u64 {
        let mut x = lock(&self.rng);
        *x ^= *x << 13;
        *x ^= *x >> 7;
        *x ^= *x << 17;
        *x
    }

    /// A session's next deadline: between TTL and 2x TTL from now, the range
    /// Consul documents (it uses 2x TTL; tests must cope with either end).
    fn deadline(&self, ttl: Option<Duration>, now: Instant) -> Option<Instant> {
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

pub(crate) fn tls_acceptor(tls: &TlsConfig) -> Result<tokio_rustls::TlsAcceptor, String> {
    use tokio_rustls::rustls::pki_types::pem::PemObject;
    use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};
    use tokio_rustls::rustls::{self, server::WebPkiClientVerifier, RootCertStore};
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let certs = CertificateDer::pem_slice_iter(&tls.cert_pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("server certificate: {e}"))?;
    let key =
        PrivateKeyDer::from_pem_slice(&tls.key_pem).map_err(|e| format!("server key: {e}"))?;
    let builder = rustls::ServerConfig::builder_with_provider(Arc::clone(&provider))
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?;
    let builder = match &tls.client_ca_pem {
        Some(ca) => {
            let mut roots = RootCertStore::empty();
            for cert in CertificateDer::pem_slice_iter(ca) {
                roots
                    .add(cert.map_err(|e| format!("client CA: {e}"))?)
                    .map_err(|e| format!("client CA: {e}"))?;
            }
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                .build()
                .map_err(|e| format!("client verifier: {e}"))?;
            builder.with_client_cert_verifier(verifier)
        }
        None => builder.with_no_client_auth(),
    };
    let mut config = builder
        .with_single_cert(certs, key)
        .map_err(|e| format!("server certificate: {e}"))?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(tokio_rustls::TlsAcceptor::from(Arc::new(config)))
}

/// Accepts connections until aborted, each served by a task in `conns`.
pub(crate) async fn accept_loop(
    listener: TcpListener,
    shared: Arc<Shared>,
    tls: Option<tokio_rustls::TlsAcceptor>,
    conns: Arc<Mutex<JoinSet<()>>>,
) {
    let app = router(shared);
    loop {
        let (stream, _) = match listener.accept().await {
            Ok(a) => a,
            Err(e) => {
                tracing::warn!(error = %e, "test server accept failed");
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let app = app.clone();
        let tls = tls.clone();
        let mut conns = lock(&conns);
        // Forget the connections that ended.
        while conns.try_join_next().is_some() {}
        conns.spawn(async move {
            let service = TowerToHyperService::new(app);
            let http = hyper::server::conn::http1::Builder::new();
            let result = match tls {
                Some(tls) => match tls.accept(stream).await {
                    Ok(s) => http.serve_connection(TokioIo::new(s), service).await,
                    Err(e) => {
                        tracing::debug!(error = %e, "test server TLS handshake failed");
                        return;
                    }
                },
                None => http.serve_connection(TokioIo::new(stream), service).await,
            };
            if let Err(e) = result {
                tracing::debug!(error = %e, "test server connection ended");
            }
        });
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

fn router(shared: Arc<Shared>) -> Router {
    Router::new()
        .route("/v1/txn", put(txn))
        .route("/v1/session/create", put(session_create))
        .route("/v1/session/renew/{id}", put(session_renew))
        .route("/v1/session/destroy/{id}", put(session_destroy))
        .route("/v1/session/info/{id}", get(session_info))
        .route("/v1/session/list", get(session_list))
        .route("/v1/status/leader", get(|| async { "\"127.0.0.1:8300\"" }))
        // The KV path is the key itself, read raw (see `kv`).
        .fallback(kv)
        .layer(middleware::from_fn_with_state(Arc::clone(&shared), acl))
        .with_state(shared)
}

// ---------------------------------------------------------------- helpers

fn query(uri: &Uri) -> HashMap<String, String> {
    let decode = |s: &str| {
        percent_encoding::percent_decode_str(&s.replace('+', " "))
            .decode_utf8_lossy()
            .into_owned()
    };
    uri.query()
        .unwrap_or("")
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|p| match p.split_once('=') {
            Some((k, v)) => (decode(k), decode(v)),
            None => (decode(p), String::new()),
        })
        .collect()
}

fn text(status: StatusCode, body: impl Into<String>) -> Response {
    (status, body.into()).into_response()
}

fn json_response(status: StatusCode, index: Option<u64>, body: Value) -> Response {
    let mut resp = (status, axum::Json(body)).into_response();
    if let Some(index) = index {
        add_index(resp.headers_mut(), index);
    }
    resp
}

fn add_index(headers: &mut HeaderMap, index: u64) {
    headers.insert("X-Consul-Index", HeaderValue::from(index.max(1)));
    headers.insert("X-Consul-KnownLeader", HeaderValue::from_static("true"));
    headers.insert("X-Consul-LastContact", HeaderValue::from_static("0"));
}

fn entry_json(e: &Entry) -> Value {
    let mut v = json!({
        "LockIndex": e.lock_index,
        "Key": e.key,
        "Flags": e.flags,
        // Consul stores an empty value as nil, which JSON shows as null.
        "Value": if e.value.is_empty() {
            Value::Null
        } else {
            Value::String(base64::engine::general_purpose::STANDARD.encode(&e.value))
        },
        "CreateIndex": e.create_index,
        "ModifyIndex": e.modify_index,
    });
    if !e.session.is_empty() {
        v["Session"] = Value::String(e.session.clone());
    }
    v
}

fn session_json(s: &Session) -> Value {
    json!({
        "ID": s.id,
        "Name": s.name,
        "Node": NODE,
        "LockDelay": s.lock_delay.as_nanos() as u64,
        "Behavior": s.behavior.as_str(),
        "TTL": s.ttl,
        "NodeChecks": [],
        "ServiceChecks": null,
        "CreateIndex": s.create_index,
        "ModifyIndex": s.modify_index,
    })
}

/// A Go duration ("10s", "1.5m", "100ms", "1h2m3s").
pub(crate) fn parse_go_duration(s: &str) -> Option<Duration> {
    if s == "0" {
        return Some(Duration::ZERO);
    }
    let mut total = 0f64;
    let mut rest = s;
    if rest.is_empty() {
        return None;
    }
    while !rest.is_empty() {
        let num_end = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(rest.len());
        let n: f64 = rest[..num_end].parse().ok()?;
        rest = &rest[num_end..];
        let unit_end = rest
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(rest.len());
        let secs = match &rest[..unit_end] {
            "ns" => 1e-9,
            "us" | "µs" => 1e-6,
            "ms" => 1e-3,
            "s" => 1.0,
            "m" => 60.0,
            "h" => 3600.0,
            _ => return None,
        };
        total += n * secs;
        rest = &rest[unit_end..];
    }
    Duration::try_from_secs_f64(total).ok()
}

/// Blocking-query parameters: `index` and `wait`.
struct Blocking {
    min_index: u64,
    wait: Duration,
}

impl Blocking {
    /// Err: the message of a 400.
    fn from(q: &HashMap<String, String>) -> Result<Self, String> {
        let min_index = match q.get("index") {
            Some(v) => v.parse().map_err(|_| format!("Invalid index: {v}"))?,
            None => 0,
        };
        let wait = match q.get("wait") {
            Some(v) => parse_go_duration(v)
                .ok_or_else(|| format!("Invalid wait time: {v}"))?
                .min(MAX_WAIT),
            None => DEFAULT_WAIT,
        };
        Ok(Blocking { min_index, wait })
    }
}

/// Runs `read` until its index is above the request's `index` or the wait
/// (plus up to 1/16 jitter, as Consul adds) is over.
async fn blocking_read<T>(
    shared: &Shared,
    b: &Blocking,
    read: impl Fn(&State) -> (u64, T),
) -> (u64, T) {
    let mut changes = shared.changed.subscribe();
    changes.borrow_and_update();
    let (index, value) = shared.with_state(&read);
    if b.min_index == 0 || index.max(1) > b.min_index {
        return (index.max(1), value);
    }
    let jitter = shared.random() % (b.wait.as_millis() as u64 / 16).max(1);
    let deadline = tokio::time::Instant::now() + b.wait + Duration::from_millis(jitter);
    loop {
        let woke = tokio::time::timeout_at(deadline, changes.changed()).await;
        changes.borrow_and_update();
        let (index, value) = shared.with_state(&read);
        if index.max(1) > b.min_index || !matches!(woke, Ok(Ok(()))) {
            return (index.max(1), value);
        }
    }
}

// ---------------------------------------------------------------- handlers

async fn acl(AxState(shared): AxState<Arc<Shared>>, req: Request, next: Next) -> Response {
    let Some(want) = &shared.config.acl_token else {
        return next.run(req).await;
    };
    let headers = req.headers();
    let given = headers
        .get("X-Consul-Token")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned)
        .or_else(|| {
            headers
                .get(header::AUTHORIZATION)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.strip_prefix("Bearer "))
                .map(str::to_owned)
        })
        .or_else(|| query(req.uri()).remove("token"));
    match given.as_deref() {
        Some(t) if t == want => next.run(req).await,
        None | Some("") => text(
            StatusCode::FORBIDDEN,
            "Permission denied: anonymous token lacks permission",
        ),
        Some(_) => text(StatusCode::FORBIDDEN, "ACL not found"),
    }
}

/// `/v1/kv/<key>`. The key is taken from the raw path and percent-decoded
/// here, so a key with an encoded `?` or `%` arrives intact.
async fn kv(
    AxState(shared): AxState<Arc<Shared>>,
    method: Method,
    uri: Uri,
    body: Bytes,
) -> Response {
    let Some(raw) = uri.path().strip_prefix("/v1/kv") else {
        return text(StatusCode::NOT_FOUND, "test server: no such endpoint");
    };
    let raw = raw.strip_prefix('/').unwrap_or(raw);
    let key = percent_encoding::percent_decode_str(raw)
        .decode_utf8_lossy()
        .into_owned();
    // A real Consul's HTTP router folds `//` and `.` segments (redirecting),
    // and its key validation refuses a leading `/` and `..`: a client that
    // sends them has a bug, so say so instead of storing an odd key.
    if key.starts_with('/') || key.contains("//") {
        return text(
            StatusCode::BAD_REQUEST,
            "key must not begin with a '/' or contain '//'",
        );
    }
    if key.split('/').any(|seg| seg == "." || seg == "..") {
        return text(
            StatusCode::BAD_REQUEST,
            "URL path contains invalid traversal sequence",
        );
    }
    let q = query(&uri);
    match method {
        Method::GET => kv_get(&shared, &key, &q).await,
        Method::PUT => kv_put(&shared, &key, &q, body),
        Method::DELETE => kv_delete(&shared, &key, &q),
        _ => text(StatusCode::METHOD_NOT_ALLOWED, "method not allowed"),
    }
}

async fn kv_get(shared: &Shared, key: &str, q: &HashMap<String, String>) -> Response {
    let b = match Blocking::from(q) {
        Ok(b) => b,
        Err(e) => return text(StatusCode::BAD_REQUEST, e),
    };
    if q.contains_key("keys") {
        let sep = q.get("separator").cloned().unwrap_or_default();
        let (index, keys) = blocking_read(shared, &b, |s| s.tables.keys(key, &sep)).await;
        if keys.is_empty() && !key.is_empty() {
            return json_response(StatusCode::NOT_FOUND, Some(index), Value::Null);
        }
        return json_response(StatusCode::OK, Some(index), json!(keys));
    }
    if q.contains_key("recurse") {
        let (index, entries) = blocking_read(shared, &b, |s| s.tables.list(key)).await;
        if entries.is_empty() {
            return not_found(index);
        }
        let body: Vec<Value> = entries.iter().map(entry_json).collect();
        return json_response(StatusCode::OK, Some(index), Value::Array(body));
    }
    if key.is_empty() {
        return text(StatusCode::BAD_REQUEST, "Missing key name");
    }
    let (index, entry) = blocking_read(shared, &b, |s| {
        (s.tables.get_index(key), s.tables.get(key).cloned())
    })
    .await;
    let Some(entry) = entry else {
        return not_found(index);
    };
    if q.contains_key("raw") {
        let mut resp = (StatusCode::OK, entry.value).into_response();
        add_index(resp.headers_mut(), index);
        return resp;
    }
    json_response(StatusCode::OK, Some(index), json!([entry_json(&entry)]))
}

fn not_found(index: u64) -> Response {
    let mut resp = StatusCode::NOT_FOUND.into_response();
    add_index(resp.headers_mut(), index);
    resp
}

fn conflicting(q: &HashMap<String, String>, flags: &[&str]) -> bool {
    flags.iter().filter(|f| q.contains_key(**f)).count() > 1
}

/// Err: the message of a 400.
fn parse_u64(q: &HashMap<String, String>, name: &str) -> Result<Option<u64>, String> {
    q.get(name)
        .map(|v| v.parse().map_err(|_| format!("invalid {name}: {v}")))
        .transpose()
}

fn kv_put(shared: &Shared, key: &str, q: &HashMap<String, String>, body: Bytes) -> Response {
    if key.is_empty() {
        return text(StatusCode::BAD_REQUEST, "Missing key name");
    }
    if conflicting(q, &["cas", "acquire", "release"]) {
        return text(StatusCode::BAD_REQUEST, "Conflicting flags");
    }
    if body.len() > MAX_VALUE {
        return text(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!(
                "Request body({} bytes) too large, max size: {MAX_VALUE} bytes",
                body.len()
            ),
        );
    }
    let (flags, cas) = match (parse_u64(q, "flags"), parse_u64(q, "cas")) {
        (Ok(f), Ok(c)) => (f.unwrap_or(0), c),
        (Err(e), _) | (_, Err(e)) => return text(StatusCode::BAD_REQUEST, e),
    };
    let value = body.to_vec();
    let now = Instant::now();
    let result: Result<bool, String> = shared.mutate(|s| {
        if let Some(session) = q.get("acquire") {
            return s.acquire(key, value, flags, session, now);
        }
        if let Some(session) = q.get("release") {
            return s.release(key, value, flags, session);
        }
        let idx = s.next_index();
        Ok(match cas {
            Some(index) => s
                .tables
                .cas(
                    idx,
                    crate::state::Tables::put_entry(key, value, flags, ""),
                    index,
                )
                .is_some(),
            None => {
                s.tables.put(idx, key, value, flags);
                true
            }
        })
    });
    match result {
        Ok(done) => json_response(StatusCode::OK, None, json!(done)),
        Err(e) => text(StatusCode::INTERNAL_SERVER_ERROR, e),
    }
}

fn kv_delete(shared: &Shared, key: &str, q: &HashMap<String, String>) -> Response {
    if conflicting(q, &["recurse", "cas"]) {
        return text(StatusCode::BAD_REQUEST, "Conflicting flags");
    }
    let recurse = q.contains_key("recurse");
    if key.is_empty() && !recurse {
        return text(StatusCode::BAD_REQUEST, "Missing key name");
    }
    let cas = match parse_u64(q, "cas") {
        Ok(c) => c,
        Err(e) => return text(StatusCode::BAD_REQUEST, e),
    };
    let now = Instant::now();
    let done = shared.mutate(|s| {
        let idx = s.next_index();
        if recurse {
            s.tables.delete_prefix(idx, key, now);
            true
        } else if let Some(index) = cas {
            s.tables.delete_cas(idx, key, index, now)
        } else {
            s.tables.delete_key(idx, key, now);
            true
        }
    });
    json_response(StatusCode::OK, None, json!(done))
}

async fn txn(AxState(shared): AxState<Arc<Shared>>, body: Bytes) -> Response {
    if body.len() > MAX_TXN_BODY {
        return text(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("Request body too large, max size: {MAX_TXN_BODY} bytes"),
        );
    }
    let raw: Vec<Value> = match serde_json::from_slice(&body) {
        Ok(v) => v,
        Err(e) => {
            return text(
                StatusCode::BAD_REQUEST,
                format!("Failed to parse body: {e}"),
            )
        }
    };
    if raw.len() > MAX_TXN_OPS {
        return text(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!(
                "Transaction contains too many operations ({} > {MAX_TXN_OPS})",
                raw.len()
            ),
        );
    }
    let mut ops = Vec::with_capacity(raw.len());
    let mut unknown = Vec::new();
    for (i, op) in raw.iter().enumerate() {
        let Some(kv) = op.get("KV") else {
            return text(
                StatusCode::BAD_REQUEST,
                "test server: only KV operations are supported in /v1/txn",
            );
        };
        let field = |name: &str| kv.get(name).filter(|v| !v.is_null());
        let verb_name = field("Verb").and_then(Value::as_str).unwrap_or("");
        let value = match field("Value").map(|v| {
            v.as_str()
                .and_then(|s| base64::engine::general_purpose::STANDARD.decode(s).ok())
        }) {
            None => Vec::new(),
            Some(Some(v)) => v,
            Some(None) => {
                return text(
                    StatusCode::BAD_REQUEST,
                    "Failed to parse body: failed to decode value",
                )
            }
        };
        let key = field("Key")
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_owned();
        if value.len() > MAX_VALUE {
            return text(
                StatusCode::PAYLOAD_TOO_LARGE,
                format!(
                    "Value for key {key:?} is too large ({} > {MAX_VALUE} bytes)",
                    value.len()
                ),
            );
        }
        let Some(verb) = Verb::parse(verb_name) else {
            unknown.push((i, format!("unknown KV verb {verb_name:?}")));
            continue;
        };
        ops.push(KvOp {
            verb,
            key,
            value,
            flags: field("Flags").and_then(Value::as_u64).unwrap_or(0),
            index: field("Index").and_then(Value::as_u64).unwrap_or(0),
            session: field("Session")
                .and_then(Value::as_str)
                .unwrap_or("")
                .to_owned(),
        });
    }
    if !unknown.is_empty() {
        return txn_errors(unknown);
    }
    let write = ops.iter().any(|op| op.verb.is_write());
    let now = Instant::now();
    let result = if write {
        shared.mutate(|s| s.txn(&ops, true, now))
    } else {
        lock(&shared.state).txn(&ops, false, now)
    };
    match result {
        Ok(results) => {
            let results: Vec<Value> = results
                .iter()
                .map(|e| json!({ "KV": entry_json(e) }))
                .collect();
            json_response(
                StatusCode::OK,
                None,
                json!({ "Results": results, "Errors": null }),
            )
        }
        Err(errors) => txn_errors(errors),
    }
}

fn txn_errors(errors: Vec<(usize, String)>) -> Response {
    let errors: Vec<Value> = errors
        .into_iter()
        .map(|(i, what)| json!({ "OpIndex": i, "What": what }))
        .collect();
    json_response(
        StatusCode::CONFLICT,
        None,
        json!({ "Results": null, "Errors": errors }),
    )
}

async fn session_create(AxState(shared): AxState<Arc<Shared>>, body: Bytes) -> Response {
    let req: Value = if body.is_empty() {
        json!({})
    } else {
        match serde_json::from_slice(&body) {
            Ok(v) => v,
            Err(e) => {
                return text(
                    StatusCode::BAD_REQUEST,
                    format!("Request decode failed: {e}"),
                )
            }
        }
    };
    let field = |name: &str| {
        req.as_object().and_then(|o| {
            o.iter()
                .find(|(k, _)| k.eq_ignore_ascii_case(name))
                .map(|(_, v)| v.clone())
        })
    };
    let behavior = match field("Behavior").as_ref().and_then(Value::as_str) {
        None | Some("") | Some("release") => Behavior::Release,
        Some("delete") => Behavior::Delete,
        Some(other) => {
            return text(
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("Invalid Behavior setting '{other}'"),
            )
        }
    };
    let ttl = field("TTL")
        .as_ref()
        .and_then(Value::as_str)
        .unwrap_or("")
        .to_owned();
    let ttl_duration = if ttl.is_empty() {
        None
    } else {
        let Some(d) = parse_go_duration(&ttl) else {
            return text(
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("Session TTL '{ttl}' invalid"),
            );
        };
        let min = shared.config.session_ttl_min;
        if !d.is_zero() && (d < min || d > SESSION_TTL_MAX) {
            return text(
                StatusCode::INTERNAL_SERVER_ERROR,
                format!(
                    "Invalid Session TTL '{}', must be between [{min:?}={SESSION_TTL_MAX:?}]",
                    d.as_nanos()
                ),
            );
        }
        (!d.is_zero()).then_some(d)
    };
    // Consul reads small numbers as seconds (users write 15 meaning 15 s).
    let lock_delay = match field("LockDelay") {
        None => Duration::from_secs(15),
        Some(Value::String(s)) => match parse_go_duration(&s) {
            Some(d) if d.as_nanos() < 1000 => Duration::from_secs(d.as_nanos() as u64),
            Some(d) => d,
            None => {
                return text(
                    StatusCode::BAD_REQUEST,
                    format!("Request decode failed: bad LockDelay {s:?}"),
                )
            }
        },
        Some(Value::Number(n)) => {
            let ns = n.as_u64().unwrap_or(0);
            if ns < 1000 {
                Duration::from_secs(ns)
            } else {
                Duration::from_nanos(ns)
            }
        }
        Some(_) => {
            return text(
                StatusCode::BAD_REQUEST,
                "Request decode failed: bad LockDelay",
            )
        }
    };
    if lock_delay > MAX_LOCK_DELAY {
        return text(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("Session lock delay '{lock_delay:?}' is too large"),
        );
    }
    let r = shared.random();
    let id = format!(
        "{:08x}-{:04x}-4{:03x}-a{:03x}-{:012x}",
        r >> 32,
        (r >> 16) & 0xffff,
        r & 0xfff,
        shared.random() & 0xfff,
        shared.random() & 0xffff_ffff_ffff
    );
    let deadline = shared.deadline(ttl_duration, Instant::now());
    let session = Session {
        id,
        name: field("Name")
            .as_ref()
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_owned(),
        behavior,
        ttl,
        ttl_duration,
        lock_delay,
        create_index: 0,
        modify_index: 0,
        deadline,
    };
    let id = shared.mutate(|s| s.create_session(session));
    json_response(StatusCode::OK, None, json!({ "ID": id }))
}

async fn session_renew(AxState(shared): AxState<Arc<Shared>>, Path(id): Path<String>) -> Response {
    let now = Instant::now();
    let ttl = shared.with_state(|s| s.sessions.get(&id).map(|s| s.ttl_duration));
    let Some(ttl) = ttl else {
        return text(
            StatusCode::NOT_FOUND,
            format!("Session id '{id}' not found"),
        );
    };
    let deadline = shared.deadline(ttl, now);
    // Renewal is not a raft write in Consul: no index, no wake-up.
    let session = {
        let mut state = lock(&shared.state);
        state.sessions.get_mut(&id).map(|s| {
            s.deadline = deadline;
            session_json(s)
        })
    };
    match session {
        Some(s) => json_response(StatusCode::OK, None, json!([s])),
        None => text(
            StatusCode::NOT_FOUND,
            format!("Session id '{id}' not found"),
        ),
    }
}

async fn session_destroy(
    AxState(shared): AxState<Arc<Shared>>,
    Path(id): Path<String>,
) -> Response {
    shared.mutate(|s| s.invalidate(&id, Instant::now()));
    json_response(StatusCode::OK, None, json!(true))
}

async fn session_info(AxState(shared): AxState<Arc<Shared>>, Path(id): Path<String>) -> Response {
    let (index, sessions) = shared.with_state(|s| {
        (
            s.index,
            s.sessions.get(&id).map(session_json).into_iter().collect(),
        )
    });
    json_response(StatusCode::OK, Some(index), Value::Array(sessions))
}

async fn session_list(AxState(shared): AxState<Arc<Shared>>) -> Response {
    let (index, sessions) =
        shared.with_state(|s| (s.index, s.sessions.values().map(session_json).collect()));
    json_response(StatusCode::OK, Some(index), Value::Array(sessions))
}

#[cfg(test)]
mod tests {
    use super::parse_go_duration;
    use std::time::Duration;

    #[test]
    fn go_durations() {
        assert_eq!(parse_go_duration("10s"), Some(Duration::from_secs(10)));
        assert_eq!(parse_go_duration("100ms"), Some(Duration::from_millis(100)));
        assert_eq!(parse_go_duration("1m30s"), Some(Duration::from_secs(90)));
        assert_eq!(parse_go_duration("1.5h"), Some(Duration::from_secs(5400)));
        assert_eq!(parse_go_duration("0"), Some(Duration::ZERO));
        assert_eq!(parse_go_duration("10"), None);
        assert_eq!(parse_go_duration(""), None);
        assert_eq!(parse_go_duration("5x"), None);
    }
}
