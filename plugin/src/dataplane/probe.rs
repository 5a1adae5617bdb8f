//! Whether a machine answers on the underlay (ICMP echo). Reclaim needs this
//! evidence before it frees a gone host's addresses: a host cut off from the
//! store but still on the underlay may still have containers using them.

use std::net::IpAddr;
use std::time::Duration;
use surge_ping::{Client, Config, PingIdentifier, PingSequence, ICMP};

/// What a probe found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Probe {
    /// An echo reply came back.
    Answers,
    /// No reply to any request within the window.
    Silent,
    /// This host could not probe (no ICMP socket: CAP_NET_RAW missing).
    Unknown(String),
}

/// Echo requests per probe; the window is shared among them.
const TRIES: u16 = 3;

/// Send up to [`TRIES`] echo requests to `addr` within `window`; stop at the
/// first reply.
pub async fn probe(addr: IpAddr, window: Duration) -> Probe {
    let config = match addr {
        IpAddr::V4(_) => Config::default(),
        IpAddr::V6(_) => Config::builder().kind(ICMP::V6).build(),
    };
    let client = match Client::new(&config) {
        Ok(c) => c,
        Err(e) => return Probe::Unknown(format!("open an ICMP socket: {e}")),
    };
    let mut pinger = client.pinger(addr, PingIdentifier(rand::random())).await;
    pinger.timeout(window / u32::from(TRIES));
    for seq in 0..TRIES {
        // A send error (no route, ARP failed) is silence too.
        if pinger.ping(PingSequence(seq), &[0; 16]).await.is_ok() {
            return Probe::Answers;
        }
    }
    Probe::Silent
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Root (tier 2): an ICMP socket needs CAP_NET_RAW or a ping group.
    #[tokio::test]
    #[ignore]
    async fn loopback_answers() {
        let found = probe("127.0.0.1".parse().unwrap(), Duration::from_secs(1)).await;
        assert_eq!(found, Probe::Answers);
    }
}
