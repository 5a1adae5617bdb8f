//! The calls every part of the backend makes: the state a store shares with
//! its watches ([`Inner`]), requests bounded by the request timeout with
//! transport failures turned into store errors, Consul's error answers
//! mapped to [`StoreError`] variants, and the KV reads (a key, a prefix,
//! the index of the store or of a prefix). Also the cache of recent range
//! results, which lets a watch start exactly where a read left off.

use std::collections::{BTreeMap, VecDeque};
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hyper::{Method, StatusCode};

use super::http::{Http, HttpError, Reply};
use super::keys::kv_path;
use super::wire::{revision, Entry};
use crate::{Result, Revision, StoreError};

/// Recent `range` results kept so that a watch from a range's revision + 1
/// can start exactly where the read left off (Consul has no history).
const RANGE_CACHE: usize = 16;
const RANGE_CACHE_MAX_KEYS: usize = 4096;

/// Pauses between retries of a request Consul refused unapplied.
const REFUSED_PAUSE_MIN: Duration = Duration::from_millis(50);
const REFUSED_PAUSE_MAX: Duration = Duration::from_millis(800);

/// An answer by which Consul says it applied nothing and the same request
/// may simply be sent again: 429 and 503 (its rate limiter: "try again
/// later", "try another server") and 500 "No cluster leader" (no leader to
/// apply or read through). Other 500s (an RPC that broke mid-way, a leader
/// lost while committing) may have applied and are not retried here.
fn refused_unapplied(reply: &Reply) -> bool {
    match reply.status {
        StatusCode::TOO_MANY_REQUESTS | StatusCode::SERVICE_UNAVAILABLE => true,
        StatusCode::INTERNAL_SERVER_ERROR => {
            String::from_utf8_lossy(&reply.body).contains("No cluster leader")
        }
        _ => false,
    }
}

/// What a store shares with its watches.
pub(super) struct Inner {
    pub(super) http: Arc<Http>,
    /// For messages: "Consul at 127.0.0.1:8500".
    pub(super) target: String,
    pub(super) request_timeout: Duration,
    pub(super) session_ttl_min: Duration,
    pub(super) watch_wait: Duration,
    /// The session that puts without a lease lock and unlock with (it never
    /// holds a key at rest); made on first use, again when it expired, and
    /// destroyed when the store goes (see `sessions`).
    pub(super) writer: tokio::sync::Mutex<Option<String>>,
    ranges: Mutex<VecDeque<Snapshot>>,
    pub(super) warned_ttl: AtomicBool,
}

/// A prefix's entries as one read saw them, at the read's index.
#[derive(Clone)]
pub(super) struct Snapshot {
    pub(super) prefix: String,
    pub(super) index: u64,
    pub(super) entries: Arc<BTreeMap<String, Entry>>,
}

impl Inner {
    pub(super) fn new(
        http: Http,
        request_timeout: Duration,
        session_ttl_min: Duration,
        watch_wait: Duration,
    ) -> Self {
        Inner {
            target: format!("Consul at {}", http.authority),
            http: Arc::new(http),
            request_timeout,
            session_ttl_min,
            watch_wait,
            writer: tokio::sync::Mutex::new(None),
            ranges: Mutex::new(VecDeque::new()),
            warned_ttl: AtomicBool::new(false),
        }
    }

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
            Err(HttpError::Rejected(e)) => Err(StoreError::Rejected(format!(
                "{}: {}: {e}",
                what(),
                self.target
            ))),
            Err(HttpError::Broken(e)) => Err(StoreError::Unavailable(format!(
                "{}: {}: the connection broke: {e}",
                what(),
                self.target
            ))),
        }
    }

    /// A request bounded by the request timeout. Answers that say Consul
    /// refused it without applying anything (no leader, rate limited; see
    /// [`refused_unapplied`]) are retried after a short pause while half the
    /// timeout is left unused, so a short election or burst costs a delay
    /// rather than an error; after that the caller gets the last answer and
    /// maps it to [`StoreError::Unavailable`]. The whole call stays within
    /// the request timeout.
    pub(super) async fn request(
        &self,
        what: &(dyn Fn() -> String + Sync),
        method: Method,
        path: &str,
        body: Option<Vec<u8>>,
    ) -> Result<Reply> {
        let start = tokio::time::Instant::now();
        let deadline = start + self.request_timeout;
        let retry_until = start + self.request_timeout / 2;
        let mut pause = REFUSED_PAUSE_MIN;
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            if left.is_zero() {
                return Err(StoreError::Timeout(self.request_timeout));
            }
            let reply = self
                .call(what, method.clone(), path, body.clone(), left)
                .await?;
            if !refused_unapplied(&reply) || tokio::time::Instant::now() + pause > retry_until {
                return Ok(reply);
            }
            tracing::debug!(
                status = reply.status.as_u16(),
                "{}: {} refused the request; retrying",
                what(),
                self.target
            );
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(REFUSED_PAUSE_MAX);
        }
    }

    /// The error for an answer that is not a success the caller expects.
    pub(super) fn status_error(&self, what: &str, reply: &Reply) -> StoreError {
        let body = String::from_utf8_lossy(&reply.body);
        let body = body.trim();
        let body: String = body.chars().take(500).collect();
        let context = format!("{what}: {}", self.target);
        let detail = format!("HTTP {}: {body}", reply.status.as_u16());
        match reply.status {
            StatusCode::FORBIDDEN => StoreError::Rejected(format!(
                "{context}: {detail} (the ACL token is missing, unknown or lacks permissions: \
                 it needs key_prefix read/write on the keys and session write)"
            )),
            StatusCode::BAD_REQUEST | StatusCode::PAYLOAD_TOO_LARGE => StoreError::Invalid(
                format!("{context}: {detail} (Consul's limits: 64 operations per txn, 512 KiB per value and per txn)"),
            ),
            StatusCode::TOO_MANY_REQUESTS => StoreError::Unavailable(format!(
                "{context}: {detail} (Consul's request rate limit refused it; nothing was applied)"
            )),
            StatusCode::BAD_GATEWAY | StatusCode::SERVICE_UNAVAILABLE | StatusCode::GATEWAY_TIMEOUT => {
                StoreError::Unavailable(format!("{context}: {detail}"))
            }
            StatusCode::INTERNAL_SERVER_ERROR
                if body.contains("Permission denied") || body.contains("ACL not found") =>
            {
                StoreError::Rejected(format!("{context}: {detail} (check the ACL token)"))
            }
            StatusCode::INTERNAL_SERVER_ERROR if body.contains("No cluster leader") => {
                StoreError::Unavailable(format!(
                    "{context}: {detail} (the Consul servers have no leader: an election, or \
                     quorum lost; nothing was applied)"
                ))
            }
            // The agent could not reach a server.
            StatusCode::INTERNAL_SERVER_ERROR
                if body.contains("no leader")
                    || body.contains("rpc error")
                    || body.contains("i/o timeout") =>
            {
                StoreError::Unavailable(format!("{context}: {detail}"))
            }
            _ => StoreError::backend(context, detail),
        }
    }

    pub(super) fn decode<T: serde::de::DeserializeOwned>(
        &self,
        what: &str,
        reply: &Reply,
    ) -> Result<T> {
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
    pub(super) async fn list(
        &self,
        prefix: &str,
        block: Option<(u64, Duration)>,
    ) -> Result<(u64, BTreeMap<String, Entry>)> {
        let what = || format!("list prefix {:?}", format!("/{prefix}"));
        let reply = match block {
            // A watch retries a refused blocking query itself, with its own
            // back-off.
            Some((index, wait)) => {
                let path = format!(
                    "{}?recurse&index={index}&wait={}ms",
                    kv_path(prefix),
                    wait.as_millis()
                );
                let timeout = wait + wait / 16 + self.request_timeout;
                self.call(&what, Method::GET, &path, None, timeout).await?
            }
            None => {
                let path = format!("{}?recurse&consistent", kv_path(prefix));
                self.request(&what, Method::GET, &path, None).await?
            }
        };
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
    pub(super) async fn read_key(&self, key: &str) -> Result<(u64, Option<Entry>)> {
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
    pub(super) async fn store_revision(&self, near: &str) -> Result<Revision> {
        let probe = format!("{near}-rustoverlay-revision-probe");
        revision(self.read_key(&probe).await?.0)
    }

    /// The index of the latest change under `prefix` (its list index): after
    /// a delete there, the delete's own index unless something under it
    /// changed since.
    pub(super) async fn prefix_revision(&self, prefix: &str) -> Result<Revision> {
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

    pub(super) fn remember_range(&self, snapshot: Snapshot) {
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

    pub(super) fn remembered_range(&self, prefix: &str, index: u64) -> Option<Snapshot> {
        let ranges = self.ranges.lock().unwrap_or_else(|e| e.into_inner());
        ranges
            .iter()
            .rev()
            .find(|s| s.prefix == prefix && s.index == index)
            .cloned()
    }
}
