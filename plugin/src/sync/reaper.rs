//! The reaper: reclaims a gone host once it has been gone for the grace
//! period without a break, and sweeps this host's orphaned endpoints. What
//! reclaiming writes, and its fence, is `control::reclaim`.
//!
//! "Gone since" follows the live-hosts watch, not samples: a host that
//! registers again, even briefly, starts its grace over, and a host is
//! reclaimed when its grace ends (a timer), not at the next sample after.
//! The period only paces the orphan sweep and the census round that finds
//! hosts holding state that were gone before this plugin started. Every
//! host follows liveness and sweeps its own orphans (reading the store again
//! only after something changed, `Reconciler::sweep_orphans_when_changed`);
//! only the elected reaper (`leader`) keeps the census, reclaims, and frees
//! addresses that stayed bound to no endpoint for `--orphan-age`. It keeps
//! the census in memory from a watch of the store while it leads
//! (`census_feed::CensusFeed`), so a round reads nothing from the store.
//!
//! An expired registration alone is no proof that a host is gone: before
//! reclaiming, the reaper pings the host's VTEPs, and a machine that answers
//! (cut off from the store, or its plugin down) keeps everything.

use super::census_feed::CensusFeed;
use super::leader::{Leadership, Role};
use super::membership::{LiveSet, Renewals};
use super::readiness::Readiness;
use super::reconcile::Reconciler;
use crate::control::ipam::Ipam;
use crate::control::reclaim::{reclaim_host, Census, Holdings, UnboundAddress};
use crate::dataplane::{Dataplane, Probe};
use crate::telemetry;
use kvstore_backends::{KvStore, Revision};
use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;
use tokio::time::Instant;

#[derive(Debug, Clone)]
pub struct ReaperConfig {
    pub period: Duration,
    pub grace: Duration,
    pub orphan_age: Duration,
}

/// A gone host: since when, when a failed or deferred reclaim may be tried
/// again, and whether we said that its machine still answers.
#[derive(Debug, Clone, Copy)]
struct Gone {
    since: Instant,
    retry_at: Option<Instant>,
    told_answers: bool,
}

/// How long a probe of a gone host's machine may take (within the 3 s that
/// reclaim may take after the grace).
const PROBE_WINDOW: Duration = Duration::from_millis(1500);

/// The gone hosts this plugin knows of.
#[derive(Debug, Default)]
struct GoneSince {
    hosts: HashMap<String, Gone>,
}

/// Addresses handed out but bound to no endpoint, by (pool, address, record
/// revision), with when this reaper first saw each so. Ages are measured on
/// this process's own monotonic clock, never by comparing hosts' clocks.
type Unbound = HashMap<(String, IpAddr, Revision), Instant>;

impl GoneSince {
    /// Follow a new live set: hosts in it are not gone; hosts that left it
    /// are gone from now on (unless already counted).
    fn update(&mut self, live: &LiveSet, before: &LiveSet, now: Instant) {
        let Some(live) = live else { return };
        self.hosts.retain(|h, _| !live.contains(h));
        if let Some(before) = before {
            for h in before.iter().filter(|h| !live.contains(*h)) {
                self.hosts.entry(h.clone()).or_insert(Gone {
                    since: now,
                    retry_at: None,
                    told_answers: false,
                });
            }
        }
    }

    /// The earliest moment a gone host may be reclaimed.
    fn next_due(&self, grace: Duration) -> Option<Instant> {
        self.hosts
            .values()
            .map(|g| match g.retry_at {
                Some(r) => r.max(g.since + grace),
                None => g.since + grace,
            })
            .min()
    }
}

pub async fn run(
    store: Arc<dyn KvStore>,
    me: String,
    ready: Readiness,
    reconciler: Arc<Reconciler>,
    config: ReaperConfig,
    mut live: watch::Receiver<LiveSet>,
    renewals: Renewals,
) {
    let mut gone = GoneSince::default();
    let mut seen: LiveSet = live.borrow_and_update().clone();
    let mut leader = Leadership::new(store.clone(), me.clone(), renewals.lease);
    let mut feed = CensusFeed::new(store.clone());
    let mut next_tick = Instant::now() + config.period;
    let mut leading = false;
    let mut unbound = Unbound::new();
    loop {
        // Only the reaper wakes for a grace's end, once its census is read;
        // the others just follow.
        let synced = feed.is_synced();
        let due = if leading && synced {
            gone.next_due(config.grace)
        } else {
            None
        };
        tokio::select! {
            changed = live.changed() => {
                if changed.is_err() {
                    return;
                }
                let now_live = live.borrow_and_update().clone();
                gone.update(&now_live, &seen, Instant::now());
                let left = left_the_live_set(&now_live, &seen);
                seen = now_live;
                // A host that left may have been the reaper: its role went
                // with its registration, so someone takes it over now.
                if !left || leading {
                    continue;
                }
            }
            _ = tokio::time::sleep_until(next_tick) => {
                next_tick = Instant::now() + config.period;
                if ready.is_ready() {
                    let renewed = *renewals.revision.borrow();
                    let swept = reconciler
                        .sweep_orphans_when_changed(store.as_ref(), config.orphan_age, renewed)
                        .await;
                    if let Err(e) = swept {
                        tracing::warn!(error = %e, "orphaned-endpoint sweep failed");
                    }
                }
            }
            _ = sleep_until_opt(due) => {}
            // Claimed, or freed by its holder's lease ending: check now.
            _ = leader.changed() => {}
            // The role's census has just been read: a first round now.
            _ = feed.synced(), if leading && !synced => {}
        }
        let role = leader.check().await;
        leading = role == Role::Reaper;
        match role {
            Role::Reaper => feed.start(),
            Role::Other => feed.stop(),
            // A store error: no round now, but keep the model.
            Role::Unknown => {}
        }
        if !leading {
            unbound.clear();
            continue;
        }
        // Before the role's first full read there is no census: that read
        // wakes the loop (`feed.synced()`).
        let Some(census) = feed.census() else {
            continue;
        };
        let probe = reconciler.dataplane();
        let ctx = ReapContext {
            store: &store,
            me: &me,
            config: &config,
            live: &seen,
            probe,
        };
        reap(&ctx, &census, &mut gone, &mut unbound).await;
    }
}

/// Free addresses that stayed bound to no endpoint, unchanged, for
/// `min_age` as this reaper saw them: a RequestAddress whose endpoint never
/// came (Docker gave up after a timeout that had committed, or crashed in
/// between). A young one is left alone: its endpoint may be on its way.
/// Addresses of gone hosts are left to reclaiming.
async fn collect_unbound(
    store: &Arc<dyn KvStore>,
    census: &Census,
    unbound: &mut Unbound,
    min_age: Duration,
    now: Instant,
) {
    let current: HashMap<(String, IpAddr, Revision), &UnboundAddress> = census
        .unbound
        .iter()
        .filter(|u| census.registered.contains(&u.holder))
        .map(|u| ((u.pool.clone(), u.ip, u.revision), u))
        .collect();
    unbound.retain(|k, _| current.contains_key(k));
    for (key, u) in current {
        let first_seen = *unbound.entry(key.clone()).or_insert(now);
        if now.duration_since(first_seen) < min_age {
            continue;
        }
        let ipam = Ipam::releasing_for(store.clone(), &u.holder);
        match ipam.release_listed_address(&u.pool, u.ip, u.revision).await {
            Ok(()) => {
                tracing::warn!(address = %u.ip, pool = %u.pool, holder = %u.holder, "freed an address bound to no endpoint");
                unbound.remove(&key);
            }
            Err(e) => tracing::info!(address = %u.ip, error = %e, "left an unbound address alone"),
        }
    }
}

fn left_the_live_set(live: &LiveSet, before: &LiveSet) -> bool {
    match (live, before) {
        (Some(live), Some(before)) => before.iter().any(|h| !live.contains(h)),
        _ => false,
    }
}

async fn sleep_until_opt(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// What one round of reaping works with.
struct ReapContext<'a> {
    store: &'a Arc<dyn KvStore>,
    me: &'a str,
    config: &'a ReaperConfig,
    live: &'a LiveSet,
    probe: &'a dyn Dataplane,
}

/// Whether a gone host's machine still answers at an underlay address its
/// endpoints used. Its registration expired, but if the machine is up (cut
/// off from the store only, or its plugin down) its containers may still
/// use their addresses, so nothing of it may be handed to anyone else.
/// Evidence that cannot be gathered counts as "answers": keeping addresses
/// too long costs a warning, handing one out twice breaks the promise.
async fn still_answers(probe: &dyn Dataplane, held: &Holdings) -> Option<(IpAddr, String)> {
    for vtep in &held.vteps {
        match probe.probe_host(*vtep, PROBE_WINDOW).await {
            Probe::Silent => {}
            Probe::Answers => return Some((*vtep, "its machine answers on the underlay".into())),
            Probe::Unknown(why) => {
                return Some((
                    *vtep,
                    format!("it cannot be probed ({why}; grant CAP_NET_RAW)"),
                ))
            }
        }
    }
    None
}

/// From the census of who holds what: count hosts holding state that are
/// not registered as gone (from now, if not counted yet); reclaim those past
/// their grace whose machines no longer answer.
async fn reap(ctx: &ReapContext<'_>, census: &Census, gone: &mut GoneSince, unbound: &mut Unbound) {
    let ReapContext {
        store,
        me,
        config,
        live,
        probe,
    } = *ctx;
    let now = Instant::now();
    for (host, held) in &census.holdings {
        // The live set, once known, decides: the census's model may be a
        // change behind it, and a host that has just left it must not
        // start its grace over at the next round. (Reclaim writes are
        // fenced on the registration in the store whatever this says.)
        let registered = match live {
            Some(live) => live.contains(host),
            None => census.registered.contains(host),
        };
        if host.as_str() == me || registered || held.is_empty() {
            gone.hosts.remove(host);
            continue;
        }
        let entry = gone.hosts.entry(host.clone()).or_insert_with(|| {
            tracing::warn!(host = %host, grace = ?config.grace, "host is gone; reclaiming after the grace period");
            Gone {
                since: now,
                retry_at: None,
                told_answers: false,
            }
        });
        if now.duration_since(entry.since) < config.grace || entry.retry_at.is_some_and(|r| now < r)
        {
            continue;
        }
        if let Some((vtep, why)) = still_answers(probe, held).await {
            entry.retry_at = Some(Instant::now() + config.period);
            if !entry.told_answers {
                entry.told_answers = true;
                tracing::warn!(host = %host, vtep = %vtep, "host is unregistered past its grace, but {why}: keeping its addresses. If the machine is gone for good, free them with `rustoverlay gc --apply --gone-hosts`");
            }
            continue;
        }
        // The fence in every write makes this safe even if the host
        // registers again right now.
        match reclaim_host(store.clone(), host, held).await {
            Ok(()) => {
                telemetry::reclaim();
                gone.hosts.remove(host);
            }
            Err(e) => {
                entry.retry_at = Some(now + config.period);
                tracing::warn!(host = %host, error = %e, retry_in = ?config.period, "reclaim stopped");
            }
        }
    }
    collect_unbound(store, census, unbound, config.orphan_age, now).await;
    // Hosts gone that hold nothing any more need no timer.
    gone.hosts
        .retain(|h, _| census.holdings.get(h).is_some_and(|held| !held.is_empty()));
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    fn set(hosts: &[&str]) -> LiveSet {
        Some(Arc::new(
            hosts.iter().map(|h| h.to_string()).collect::<HashSet<_>>(),
        ))
    }

    #[test]
    fn a_host_that_comes_back_starts_its_grace_over() {
        let t0 = Instant::now();
        let grace = Duration::from_secs(10);
        let mut gone = GoneSince::default();
        gone.update(&set(&["a"]), &set(&["a", "b"]), t0);
        assert_eq!(gone.next_due(grace), Some(t0 + grace));
        // b registers again briefly, then goes again 7 s later.
        gone.update(&set(&["a", "b"]), &set(&["a"]), t0 + Duration::from_secs(5));
        assert_eq!(gone.next_due(grace), None, "b is back: no timer");
        let t1 = t0 + Duration::from_secs(7);
        gone.update(&set(&["a"]), &set(&["a", "b"]), t1);
        assert_eq!(gone.next_due(grace), Some(t1 + grace), "a fresh grace");
    }

    #[test]
    fn an_unknown_live_set_changes_nothing() {
        let t0 = Instant::now();
        let mut gone = GoneSince::default();
        gone.update(&set(&["a"]), &set(&["a", "b"]), t0);
        gone.update(&None, &set(&["a"]), t0 + Duration::from_secs(1));
        assert_eq!(gone.hosts.len(), 1);
    }

    #[test]
    fn a_failed_reclaim_waits_before_the_next_try() {
        let t0 = Instant::now();
        let grace = Duration::from_secs(10);
        let mut gone = GoneSince::default();
        gone.update(&set(&[]), &set(&["b"]), t0);
        let retry = t0 + Duration::from_secs(15);
        gone.hosts.get_mut("b").unwrap().retry_at = Some(retry);
        assert_eq!(gone.next_due(grace), Some(retry));
    }
}
