//! Leases: granting one (TTLs rounded up to etcd's whole seconds), keeping it
//! alive over one open keep-alive stream per lease (so a renewal is one
//! message, and a broken stream is replaced by a new one), and revoking it.
//!
//! A renewal is waited for a quarter of the lease's TTL at most: a member
//! cut off from its peers keeps the stream open but renews nothing (it
//! forwards renewals to a leader it cannot reach), so after that the stream
//! is replaced by one on the next member. Renewing twice is harmless, so
//! every member may be tried within one call.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use etcd_client::{LeaseKeepAliveStream, LeaseKeeper};
use tonic::Code;

use super::connection::Connections;
use super::error::status_code;
use crate::{LeaseId, Result, Revision, StoreError};

/// etcd's largest lease TTL, in seconds.
const MAX_LEASE_TTL_SECS: u64 = 9_000_000_000;
/// The least a member gets to answer a renewal.
const MIN_RENEW_WAIT: Duration = Duration::from_millis(500);

/// One open keep-alive stream per lease, so a renewal is one message.
#[derive(Default)]
pub(super) struct Keepers(Mutex<HashMap<i64, Arc<tokio::sync::Mutex<Slot>>>>);

#[derive(Default)]
struct Slot {
    keeper: Option<Keeper>,
    /// The lease's TTL, from its grant or the last renewal's answer.
    ttl: Option<Duration>,
}

struct Keeper {
    keeper: LeaseKeeper,
    stream: LeaseKeepAliveStream,
    /// The endpoint the stream is open on.
    at: usize,
    /// A renewal was sent but its answer not read (the caller gave up): the
    /// next answer on this stream is not ours, so the stream is replaced.
    in_flight: bool,
}

impl Slot {
    /// How long one member may take to renew: a quarter of the TTL, so a
    /// silent member leaves time to renew on another before expiry.
    fn renew_wait(&self, conns: &Connections) -> Duration {
        let limit = conns.request_timeout;
        if conns.endpoints.len() == 1 {
            // Nowhere else to go: the member gets the whole limit.
            return limit;
        }
        match self.ttl {
            Some(ttl) => (ttl / 4).clamp(MIN_RENEW_WAIT.min(limit), limit),
            None => (limit / conns.endpoints.len().max(1) as u32).max(MIN_RENEW_WAIT.min(limit)),
        }
    }
}

async fn grant(conns: &Connections, ttl: Duration) -> Result<(i64, i64)> {
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
    let resp = conns
        .call(what, |mut c| async move { c.lease.grant(secs, None).await })
        .await?;
    let resp = resp.0;
    if !resp.error.is_empty() || resp.id <= 0 {
        return Err(StoreError::backend(
            format!("{}: {}", conns.target, what()),
            format!("etcd refused: {:?} (lease id {})", resp.error, resp.id),
        ));
    }
    Ok((resp.id, resp.ttl))
}

impl Keepers {
    /// A new lease; its TTL (as etcd granted it) bounds the renewals.
    pub(super) async fn grant(&self, conns: &Connections, ttl: Duration) -> Result<LeaseId> {
        let (id, granted) = grant(conns, ttl).await?;
        self.slot(id)?.lock().await.ttl = Some(ttl_of(granted).unwrap_or(ttl));
        Ok(LeaseId(id.to_string()))
    }

    fn slot(&self, id: i64) -> Result<Arc<tokio::sync::Mutex<Slot>>> {
        let mut keepers = self
            .0
            .lock()
            .map_err(|_| StoreError::Unavailable("etcd lease keepers poisoned".into()))?;
        Ok(Arc::clone(keepers.entry(id).or_default()))
    }

    pub(super) async fn keep_alive(
        &self,
        conns: &Connections,
        lease: LeaseId,
    ) -> Result<Option<Revision>> {
        let not_found = || StoreError::LeaseNotFound(lease.0.clone());
        let id = parse_lease(&lease).ok_or_else(not_found)?;
        let slot = self.slot(id)?;
        let mut slot = slot.lock().await;
        let wait = slot.renew_wait(conns);
        if let Some(k) = slot.keeper.as_mut() {
            if k.in_flight {
                // The last caller gave up waiting: that member is slow.
                conns.leave(k.at);
            } else {
                k.in_flight = true;
                match renew(k, id, wait).await {
                    Some((ttl, revision)) if ttl > 0 => {
                        k.in_flight = false;
                        slot.ttl = ttl_of(ttl).or(slot.ttl);
                        return Ok(revision);
                    }
                    Some(_) => {
                        slot.keeper = None;
                        self.forget(id);
                        return Err(not_found());
                    }
                    // The stream broke (reconnect, etcd restart) or the member
                    // did not answer in time: open a new one on the next member.
                    None => conns.leave(k.at),
                }
            }
        }
        slot.keeper = None;
        // Opening the stream sends the first renewal and reads its answer.
        let what = || format!("keep lease {id} alive");
        match conns
            .call_at(what, conns.idempotent(wait), |mut c| async move {
                c.lease.keep_alive(id).await
            })
            .await
        {
            Ok(((keeper, stream), at)) => {
                slot.keeper = Some(Keeper {
                    keeper,
                    stream,
                    at,
                    in_flight: false,
                });
                // etcd-client reads the opening answer itself: no header.
                Ok(None)
            }
            Err(StoreError::LeaseNotFound(_)) => {
                self.forget(id);
                Err(not_found())
            }
            Err(e) => Err(e),
        }
    }

    pub(super) async fn revoke(&self, conns: &Connections, lease: LeaseId) -> Result<()> {
        // Not a lease etcd could have made: nothing to revoke.
        let Some(id) = parse_lease(&lease) else {
            return Ok(());
        };
        self.forget(id);
        let what = || format!("revoke lease {id}");
        match conns
            .call(what, |mut c| async move { c.lease.revoke(id).await })
            .await
        {
            Ok(_) | Err(StoreError::LeaseNotFound(_)) => Ok(()),
            Err(e) => Err(e),
        }
    }

    fn forget(&self, id: i64) {
        if let Ok(mut keepers) = self.0.lock() {
            keepers.remove(&id);
        }
    }
}

/// One renewal on an open keep-alive stream: the TTL etcd answered and the
/// revision in its header, or None when the stream is broken.
async fn renew(k: &mut Keeper, id: i64, timeout: Duration) -> Option<(i64, Option<Revision>)> {
    k.keeper.keep_alive().await.ok()?;
    match tokio::time::timeout(timeout, k.stream.message()).await {
        Ok(Ok(Some(resp))) if resp.id() == id => {
            let revision = resp.header().map(|h| h.revision()).filter(|r| *r > 0);
            Some((resp.ttl(), revision))
        }
        Ok(Err(e)) if status_code(&e) == Some(Code::NotFound) => Some((0, None)),
        _ => None,
    }
}

/// etcd's TTL in seconds as a duration; None for "expired" or "unknown".
fn ttl_of(secs: i64) -> Option<Duration> {
    u64::try_from(secs)
        .ok()
        .filter(|s| *s > 0)
        .map(Duration::from_secs)
}

pub(super) fn parse_lease(lease: &LeaseId) -> Option<i64> {
    // etcd lease IDs are positive; 0 would mean "no lease" to etcd.
    lease.0.parse::<i64>().ok().filter(|id| *id > 0)
}
