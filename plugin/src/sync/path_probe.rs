//! Answers VXLAN path probes (`dataplane::path_probe`): a request that came
//! out of this host's probe device proves the sender's frames reach this
//! kernel over UDP 4789. The answer goes back from this VTEP's port 4789
//! (the request's flow reversed, which stateful firewalls let through), and
//! only to the VTEP the sender's registration names: the responder cannot
//! be made to send anywhere but to a registered host. Registrations are
//! looked up at most 10 times a second and remembered for 30 s, so a flood
//! of made-up requests costs the store little.

use crate::dataplane::path_probe::{self, ProbeAnswer, ProbeRequest};
use crate::dataplane::Dataplane;
use crate::state::keys;
use crate::state::records::HostRecord;
use crate::util::backoff::Backoff;
use crate::util::clock::unix_now_ms;
use crate::util::task::spawn_supervised;
use kvstore_backends::KvStore;
use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::net::UdpSocket;
use tracing::Instrument;

/// Keep the responder up for as long as the process runs.
pub fn start(dataplane: Arc<dyn Dataplane>, store: Arc<dyn KvStore>, host: String) {
    let span = tracing::info_span!(parent: None, "path_probe");
    spawn_supervised("path_probe", move || {
        let (dataplane, store, host) = (dataplane.clone(), store.clone(), host.clone());
        async move {
            let mut backoff = Backoff::new(Duration::from_secs(1), Duration::from_secs(60));
            loop {
                if let Err(e) = serve(dataplane.as_ref(), store.as_ref(), &host).await {
                    tracing::warn!(error = %e, retry_in = ?backoff.peek(), "the VXLAN path probe's responder failed; `rustoverlay doctor` on other hosts cannot check their path to this one");
                }
                backoff.wait().await;
            }
        }
        .instrument(span.clone())
    });
}

/// Registrations looked up at most this often (a flood of requests with
/// made-up senders must not become store load).
const LOOKUPS_PER_SECOND: u32 = 10;
/// How long a sender's registered VTEP is trusted without a new lookup.
const REMEMBER: Duration = Duration::from_secs(30);

async fn serve(dataplane: &dyn Dataplane, store: &dyn KvStore, host: &str) -> anyhow::Result<()> {
    let listener = UdpSocket::from_std(dataplane.path_probe_listener().await?)?;
    let IpAddr::V4(vtep) = dataplane.vtep() else {
        anyhow::bail!("the VXLAN path probe needs an IPv4 VTEP");
    };
    tracing::info!("answering VXLAN path probes");
    let mut senders = Senders::default();
    let mut buf = [0u8; 2048];
    loop {
        let (n, _) = listener.recv_from(&mut buf).await?;
        let Ok(request) = serde_json::from_slice::<ProbeRequest>(&buf[..n]) else {
            tracing::debug!("an unreadable probe request");
            continue;
        };
        match senders.vtep_of(store, &request.from).await {
            Some(registered) if registered == *request.reply.ip() => {
                let answer = ProbeAnswer {
                    probe: request.probe,
                    host: host.to_string(),
                    time_ms: unix_now_ms(),
                };
                let bytes = serde_json::to_vec(&answer)?;
                if let Err(e) = path_probe::answer(vtep, request.reply, &bytes) {
                    tracing::debug!(to = %request.reply, error = %e, "could not answer a probe");
                }
                tracing::debug!(from = %request.from, "answered a VXLAN path probe");
            }
            _ => {
                tracing::debug!(from = %request.from, reply = %request.reply, "a probe whose answer address is not its sender's registered VTEP; not answered");
            }
        }
    }
}

/// The senders' registered VTEPs, looked up in the store at a bounded rate.
#[derive(Default)]
struct Senders {
    known: HashMap<String, (Ipv4Addr, Instant)>,
    window: Option<Instant>,
    lookups: u32,
}

impl Senders {
    async fn vtep_of(&mut self, store: &dyn KvStore, host: &str) -> Option<Ipv4Addr> {
        let now = Instant::now();
        if let Some((vtep, at)) = self.known.get(host) {
            if now.duration_since(*at) < REMEMBER {
                return Some(*vtep);
            }
        }
        if self
            .window
            .is_none_or(|w| now.duration_since(w) >= Duration::from_secs(1))
        {
            self.window = Some(now);
            self.lookups = 0;
        }
        if self.lookups >= LOOKUPS_PER_SECOND {
            return None;
        }
        self.lookups += 1;
        let kv = store.get(&keys::host_registration(host)).await.ok()??;
        let rec: HostRecord = serde_json::from_slice(&kv.value).ok()?;
        let IpAddr::V4(vtep) = rec.vtep else {
            return None;
        };
        // Bounded: only registered hosts are remembered, and stale ones go.
        self.known
            .retain(|_, (_, at)| now.duration_since(*at) < REMEMBER);
        self.known.insert(host.to_string(), (vtep, now));
        Some(vtep)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dataplane::fake::FakeDataplane;
    use crate::state::codec::encode;
    use kvstore_backends::MemoryStore;
    use std::net::SocketAddrV4;

    async fn ask(
        to: std::net::SocketAddr,
        from: &str,
        reply: &UdpSocket,
        reply_to: SocketAddrV4,
    ) -> Option<ProbeAnswer> {
        let req = ProbeRequest {
            probe: 42,
            from: from.into(),
            reply: reply_to,
        };
        let sender = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        sender
            .send_to(&serde_json::to_vec(&req).unwrap(), to)
            .await
            .unwrap();
        let mut buf = [0u8; 512];
        let got = tokio::time::timeout(Duration::from_millis(500), reply.recv_from(&mut buf)).await;
        got.ok()
            .map(|r| serde_json::from_slice(&buf[..r.unwrap().0]).unwrap())
    }

    #[tokio::test]
    async fn a_probe_is_answered_only_at_its_sender_s_registered_vtep() {
        let store: Arc<dyn KvStore> = Arc::new(MemoryStore::new());
        let rec = HostRecord {
            host: "h1".into(),
            vtep: "127.0.0.1".parse().unwrap(),
            version: "0".into(),
        };
        store
            .put(&keys::host_registration("h1"), encode(&rec))
            .await
            .unwrap();
        let fake = FakeDataplane::new("127.0.0.2".parse().unwrap());
        start(fake.clone(), store, "h2".into());
        let listener = loop {
            if let Some(a) = fake.probe_listener() {
                break a;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        };
        let reply = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let std::net::SocketAddr::V4(at) = reply.local_addr().unwrap() else {
            unreachable!()
        };

        let answer = ask(listener, "h1", &reply, at).await.expect("answered");
        assert_eq!((answer.probe, answer.host.as_str()), (42, "h2"));
        assert!(answer.time_ms > 0);

        // Not h1's VTEP: the responder must not send there.
        let elsewhere = UdpSocket::bind("127.0.0.3:0").await.unwrap();
        let std::net::SocketAddr::V4(other) = elsewhere.local_addr().unwrap() else {
            unreachable!()
        };
        assert!(ask(listener, "h1", &elsewhere, other).await.is_none());
        // An unknown sender gets nothing either.
        assert!(ask(listener, "nobody", &reply, at).await.is_none());
    }
}
