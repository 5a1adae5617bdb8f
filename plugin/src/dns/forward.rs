//! Relaying queries for names that are not ours to the host's upstreams.
//!
//! The query's bytes go out unchanged and the first usable answer's bytes
//! come back unchanged (EDNS options, DNSSEC bits and the TC flag included):
//! a client that sees TC asks again over TCP, and that query is relayed over
//! TCP too. Upstreams are tried in order, each for at most `per_try`, all
//! within `deadline`, which is shorter than dockerd's own 4 s wait for an
//! external server, so dockerd gets SERVFAIL from us rather than a silence.
//! Each query has its own connected socket on a random port: the kernel then
//! drops answers from anywhere but the upstream asked.

use super::upstreams::Upstreams;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, UdpSocket};
use tokio::sync::Semaphore;
use tokio::time::{timeout, Instant};

/// Queries relayed at once; beyond that the resolver answers REFUSED at once.
const MAX_IN_FLIGHT: usize = 1024;
const MAX_UDP: usize = 65535;

#[derive(Debug)]
pub struct Forwarder {
    upstreams: Arc<Upstreams>,
    slots: Arc<Semaphore>,
    per_try: Duration,
    deadline: Duration,
}

/// Why no upstream answer came back.
#[derive(Debug, PartialEq, Eq)]
pub enum NoAnswer {
    /// Too many queries in flight.
    Busy,
    /// No upstream configured, or none answered in time.
    Failed,
}

impl Forwarder {
    pub fn new(upstreams: Arc<Upstreams>) -> Self {
        Forwarder::with_limits(upstreams, Duration::from_secs(1), Duration::from_secs(3))
    }

    pub fn with_limits(upstreams: Arc<Upstreams>, per_try: Duration, deadline: Duration) -> Self {
        Forwarder {
            upstreams,
            slots: Arc::new(Semaphore::new(MAX_IN_FLIGHT)),
            per_try,
            deadline,
        }
    }

    /// Relay a query over UDP; the answer's bytes, or why there is none.
    pub async fn udp(&self, query: &[u8]) -> Result<Vec<u8>, NoAnswer> {
        self.relay(query, Transport::Udp).await
    }

    /// Relay a query (without its length prefix) over TCP.
    pub async fn tcp(&self, query: &[u8]) -> Result<Vec<u8>, NoAnswer> {
        self.relay(query, Transport::Tcp).await
    }

    async fn relay(&self, query: &[u8], transport: Transport) -> Result<Vec<u8>, NoAnswer> {
        let _slot = self.slots.try_acquire().map_err(|_| NoAnswer::Busy)?;
        let end = Instant::now() + self.deadline;
        // An upstream's SERVFAIL or REFUSED is kept in case no other answers.
        let mut fallback = None;
        for upstream in self.upstreams.current() {
            let left = end.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            let limit = left.min(self.per_try);
            let answer = match transport {
                Transport::Udp => timeout(limit, exchange_udp(upstream, query)).await,
                Transport::Tcp => timeout(limit, exchange_tcp(upstream, query)).await,
            };
            match answer {
                Ok(Ok(bytes)) if !is_server_failure(&bytes) => return Ok(bytes),
                Ok(Ok(bytes)) => fallback = Some(bytes),
                Ok(Err(e)) => tracing::debug!(%upstream, error = %e, "upstream failed"),
                Err(_) => tracing::debug!(%upstream, ?limit, "upstream timed out"),
            }
        }
        fallback.ok_or(NoAnswer::Failed)
    }
}

#[derive(Clone, Copy)]
enum Transport {
    Udp,
    Tcp,
}

/// SERVFAIL (2) or REFUSED (5): worth asking the next upstream.
fn is_server_failure(answer: &[u8]) -> bool {
    answer.len() >= 4 && matches!(answer[3] & 0x0f, 2 | 5)
}

fn same_id(query: &[u8], answer: &[u8]) -> bool {
    query.len() >= 2 && answer.len() >= 12 && query[..2] == answer[..2]
}

async fn exchange_udp(upstream: SocketAddr, query: &[u8]) -> std::io::Result<Vec<u8>> {
    let local: SocketAddr = match upstream {
        SocketAddr::V4(_) => (Ipv4Addr::UNSPECIFIED, 0).into(),
        SocketAddr::V6(_) => (Ipv6Addr::UNSPECIFIED, 0).into(),
    };
    let socket = UdpSocket::bind(local).await?;
    socket.connect(upstream).await?;
    socket.send(query).await?;
    let mut buf = vec![0u8; MAX_UDP];
    loop {
        let n = socket.recv(&mut buf).await?;
        if same_id(query, &buf[..n]) {
            buf.truncate(n);
            return Ok(buf);
        }
    }
}

async fn exchange_tcp(upstream: SocketAddr, query: &[u8]) -> std::io::Result<Vec<u8>> {
    let len = u16::try_from(query.len())
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::InvalidInput, "query too long"))?;
    let mut stream = TcpStream::connect(upstream).await?;
    let mut framed = Vec::with_capacity(query.len() + 2);
    framed.extend_from_slice(&len.to_be_bytes());
    framed.extend_from_slice(query);
    stream.write_all(&framed).await?;
    read_framed(&mut stream).await
}

/// Read one length-prefixed DNS message from a TCP stream.
pub async fn read_framed<R: AsyncReadExt + Unpin>(stream: &mut R) -> std::io::Result<Vec<u8>> {
    let len = stream.read_u16().await? as usize;
    let mut buf = vec![0u8; len];
    stream.read_exact(&mut buf).await?;
    Ok(buf)
}

/// Write one length-prefixed DNS message to a TCP stream.
pub async fn write_framed<W: AsyncWriteExt + Unpin>(
    stream: &mut W,
    message: &[u8],
) -> std::io::Result<()> {
    let len = u16::try_from(message.len())
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::InvalidInput, "answer too long"))?;
    let mut framed = Vec::with_capacity(message.len() + 2);
    framed.extend_from_slice(&len.to_be_bytes());
    framed.extend_from_slice(message);
    stream.write_all(&framed).await
}

#[cfg(test)]
mod tests {
    use super::super::upstreams::Files;
    use super::*;
    use tokio::net::TcpListener;

    fn forwarder(servers: Vec<SocketAddr>) -> Forwarder {
        let up = Upstreams::new(servers, Files::none(), "169.254.53.53".parse().unwrap());
        Forwarder::with_limits(
            Arc::new(up),
            Duration::from_millis(300),
            Duration::from_millis(900),
        )
    }

    /// A UDP upstream on loopback that answers each query with `rcode`,
    /// echoing its ID, after a wrong-ID packet first.
    async fn udp_upstream(rcode: u8) -> SocketAddr {
        let socket = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let addr = socket.local_addr().unwrap();
        tokio::spawn(async move {
            let mut buf = [0u8; 512];
            while let Ok((n, from)) = socket.recv_from(&mut buf).await {
                let mut answer = buf[..n].to_vec();
                answer[2] |= 0x80;
                answer[3] = (answer[3] & 0xf0) | rcode;
                let mut stray = answer.clone();
                stray[0] ^= 0xff;
                let _ = socket.send_to(&stray, from).await;
                let _ = socket.send_to(&answer, from).await;
            }
        });
        addr
    }

    fn query(id: u16) -> Vec<u8> {
        super::super::message::tests::query_bytes(
            "example.org",
            hickory_proto::rr::RecordType::A,
            id,
        )
    }

    #[tokio::test]
    async fn the_answer_with_the_queries_id_comes_back_unchanged() {
        let up = udp_upstream(0).await;
        let q = query(0x1234);
        let answer = forwarder(vec![up]).udp(&q).await.unwrap();
        assert_eq!(&answer[..2], &[0x12, 0x34]);
        assert_eq!(answer.len(), q.len());
    }

    #[tokio::test]
    async fn a_silent_or_failing_upstream_gives_way_to_the_next() {
        let silent = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let failing = udp_upstream(2).await;
        let good = udp_upstream(0).await;
        let f = forwarder(vec![silent.local_addr().unwrap(), failing, good]);
        let answer = f.udp(&query(5)).await.unwrap();
        assert_eq!(answer[3] & 0x0f, 0);

        // Only failures: the last SERVFAIL is passed on, not a silence.
        let f = forwarder(vec![failing]);
        assert_eq!(f.udp(&query(6)).await.unwrap()[3] & 0x0f, 2);
        // Nothing answers: give up within the deadline.
        let f = forwarder(vec![silent.local_addr().unwrap()]);
        let started = std::time::Instant::now();
        assert_eq!(f.udp(&query(7)).await, Err(NoAnswer::Failed));
        assert!(started.elapsed() < Duration::from_secs(2));
        assert_eq!(
            forwarder(vec![]).udp(&query(8)).await,
            Err(NoAnswer::Failed)
        );
    }

    #[tokio::test]
    async fn tcp_queries_are_relayed_over_tcp() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.unwrap();
            let mut q = read_framed(&mut s).await.unwrap();
            q[2] |= 0x80;
            write_framed(&mut s, &q).await.unwrap();
        });
        let answer = forwarder(vec![addr]).tcp(&query(9)).await.unwrap();
        assert_eq!(&answer[..2], &[0, 9]);
        assert_ne!(answer[2] & 0x80, 0);
    }
}
