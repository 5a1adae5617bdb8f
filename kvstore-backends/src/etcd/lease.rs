//! Leases: granting one (TTLs rounded up to etcd's whole seconds), keeping it
//! alive over one open keep-alive stream per lease (so a renewal is one
//! message, and a broken stream is replaced by a new one), and revoking it.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use etcd_client::{LeaseKeepAliveStream, LeaseKeeper};
use tonic::Code;

use super::connection::Connections;
use super::error::status_code;
use crate::{LeaseId, Result, StoreError};

/// etcd's largest lease TTL, in seconds.
const MAX_LEASE_TTL_SECS: u64 = 9_000_000_000;

/// One open keep-alive stream per lease, so a renewal is one message.
#[derive(Default)]
pub(super) struct Keepers(Mutex<HashMap<i64, Arc<tokio::sync::Mutex<Option<Keeper>>>>>);

struct Keeper {
    keeper: LeaseKeeper,
    stream: LeaseKeepAliveStream,
    /// A renewal was sent but its answer not read (the caller gave up): the
    /// next answer on this stream is not ours, so the stream is replaced.
    in_flight: bool,
}

pub(super) async fn grant(conns: &Connections, ttl: Duration) -> Result<LeaseId> {
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
    Ok(LeaseId(resp.id.to_string()))
}

impl Keepers {
    pub(super) async fn keep_alive(&self, conns: &Connections, lease: LeaseId) -> Result<()> {
        let not_found = || StoreError::LeaseNotFound(lease.0.clone());
        let id = parse_lease(&lease).ok_or_else(not_found)?;
        let slot = {
            let mut keepers = self
                .0
                .lock()
                .map_err(|_| StoreError::Unavailable("etcd lease keepers poisoned".into()))?;
            Arc::clone(keepers.entry(id).or_default())
        };
        let mut slot = slot.lock().await;
        if let Some(k) = slot.as_mut().filter(|k| !k.in_flight) {
            k.in_flight = true;
            match renew(k, id, conns.request_timeout).await {
                Some(ttl) if ttl > 0 => {
                    k.in_flight = false;
                    return Ok(());
                }
                Some(_) => {
                    *slot = None;
                    self.forget(id);
                    return Err(not_found());
                }
                // The stream broke (reconnect, etcd restart): open a new one.
                None => {}
            }
        }
        *slot = None;
        // Opening the stream sends the first renewal and reads its answer.
        let what = || format!("keep lease {id} alive");
        match conns
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

pub(super) fn parse_lease(lease: &LeaseId) -> Option<i64> {
    // etcd lease IDs are positive; 0 would mean "no lease" to etcd.
    lease.0.parse::<i64>().ok().filter(|id| *id > 0)
}
