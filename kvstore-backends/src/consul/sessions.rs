//! Sessions: leases are Consul sessions with `Behavior=delete`, no health
//! checks and no lock-delay, so Consul deletes the keys a session holds when
//! it is destroyed (revoke) or expires. A lease's session has half its TTL
//! (Consul expires a session at twice its TTL), raised to the servers'
//! `session_ttl_min`. Also the store's "writer" session, which holds no key
//! at rest and lets puts without a lease detach keys from leases: made on
//! first use, again after it expired, destroyed when the store goes.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use hyper::{Method, StatusCode};
use serde_json::json;

use super::calls::Inner;
use super::keys::session_id;
use super::wire::SessionCreated;
use crate::{LeaseId, Result, Revision, StoreError};

/// Consul's `SessionTTLMax`.
const SESSION_TTL_MAX_SECS: u64 = 86_400;

impl Inner {
    pub(super) async fn grant_lease(&self, ttl: Duration) -> Result<LeaseId> {
        if ttl.is_zero() {
            return Err(StoreError::Invalid("lease TTL is zero".into()));
        }
        // Consul invalidates a session twice its TTL after the last renewal
        // (its TTL is only a lower bound), so a lease asked for `ttl` is a
        // session of half that: gone `ttl` after its last renewal, as on
        // etcd. Consul counts whole seconds; round up so a lease never lives
        // shorter than asked.
        let half = ttl / 2;
        let mut secs = half
            .as_secs()
            .saturating_add(u64::from(half.subsec_nanos() > 0))
            .max(1);
        let min = self
            .session_ttl_min
            .as_secs()
            .saturating_add(u64::from(self.session_ttl_min.subsec_nanos() > 0))
            .max(1);
        if secs < min {
            if !self.warned_ttl.swap(true, Ordering::Relaxed) {
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
            .create_session("rustoverlay lease", secs, "delete")
            .await?;
        Ok(LeaseId(id))
    }

    pub(super) async fn keep_alive(&self, lease: LeaseId) -> Result<Option<Revision>> {
        let Some(id) = session_id(&lease) else {
            return Err(StoreError::LeaseNotFound(lease.0));
        };
        let what = || format!("renew lease {id}");
        let reply = self
            .request(&what, Method::PUT, &format!("/v1/session/renew/{id}"), None)
            .await?;
        match reply.status {
            // A renewal is no Raft write and says nothing of the KV index.
            StatusCode::OK => Ok(None),
            StatusCode::NOT_FOUND => Err(StoreError::LeaseNotFound(lease.0)),
            _ => Err(self.status_error(&what(), &reply)),
        }
    }

    pub(super) async fn revoke_lease(&self, lease: LeaseId) -> Result<()> {
        let Some(id) = session_id(&lease) else {
            return Ok(());
        };
        let what = || format!("revoke lease {id}");
        let reply = self
            .request(
                &what,
                Method::PUT,
                &format!("/v1/session/destroy/{id}"),
                None,
            )
            .await?;
        match reply.status {
            StatusCode::OK | StatusCode::NOT_FOUND => Ok(()),
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

    pub(super) async fn writer_session(&self) -> Result<String> {
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

    pub(super) async fn forget_writer(&self, id: &str) {
        let mut slot = self.writer.lock().await;
        if slot.as_deref() == Some(id) {
            *slot = None;
        }
    }
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
