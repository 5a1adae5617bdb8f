//! The connections to etcd: one client per endpoint, built by the first call
//! that needs it; calls that go to the endpoint that answered last and move
//! on to the next when it cannot be reached or is sick (no leader, stalled);
//! a signal per endpoint that tells the streams open on it (watches) that it
//! was found sick; and the connect options (timeouts, keep-alive pings,
//! credentials, TLS) every client is built with. Every other part of the
//! backend talks to etcd through [`Connections::call`] or
//! [`Connections::call_at`].

use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use etcd_client::{
    Certificate, Client, ConnectOptions, Identity, KvClient, LeaseClient, TlsOptions, WatchClient,
};

use super::error::{
    describe, is_connect_error, is_member_trouble, is_refused_without_leader, map_error,
};
use crate::{Result, StoreError, TlsFiles};

/// Answers bigger than tonic's 4 MiB default (a large range) must not fail.
const MAX_MESSAGE: usize = 256 * 1024 * 1024;
/// HTTP/2 pings find a silently dead connection. Only while streams are open:
/// etcd answers idle pings more often than its 5 s minimum with GOAWAY.
const PING_INTERVAL: Duration = Duration::from_secs(10);
const PING_TIMEOUT: Duration = Duration::from_secs(5);

/// The endpoints of one store and their clients.
pub(super) struct Connections {
    pub(super) endpoints: Vec<String>,
    /// For messages: "etcd at a:2379, b:2379".
    pub(super) target: String,
    options: ConnectOptions,
    user: Option<String>,
    pub(super) request_timeout: Duration,
    /// One client per endpoint, built by the first call that uses it; a failed
    /// attempt leaves it empty so a later call tries again. (Not one client
    /// over all endpoints: its balancer keeps sending requests to a dead one.)
    conns: Vec<tokio::sync::OnceCell<Conn>>,
    /// The endpoint that answered last: calls go there, and move on to the
    /// next endpoint only when it cannot be reached or is sick.
    preferred: AtomicUsize,
    /// Per endpoint: how often a call found it sick. Streams open on it
    /// (watches) follow this and move elsewhere when it changes.
    sick: Vec<tokio::sync::watch::Sender<u64>>,
}

/// Which failures of one member send a request on to the next member.
#[derive(Clone, Copy, Debug)]
pub(super) enum Resend {
    /// Only a refusal for want of a leader (nothing was applied): a request
    /// that timed out may have been applied, so a write is never resent.
    Refused,
    /// The request may be repeated (a read, a lease renewal, opening a
    /// watch): a member that has not answered within this bound, or that
    /// fails for its own reasons (no leader, stalled), is left for the next.
    Idempotent(Duration),
}

#[derive(Clone)]
pub(super) struct Conn {
    pub(super) kv: KvClient,
    pub(super) watch: WatchClient,
    pub(super) lease: LeaseClient,
}

impl Connections {
    /// Builds the connect options, checking the credentials and reading the
    /// TLS files; does not connect.
    pub(super) fn new(
        endpoints: Vec<String>,
        user: Option<String>,
        password: Option<String>,
        tls: Option<&TlsFiles>,
        dial_timeout: Duration,
        request_timeout: Duration,
    ) -> Result<Self> {
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
        if let Some(tls) = tls {
            options = options.with_tls(tls_options(tls)?);
        }
        let target = format!("etcd at {}", endpoints.join(", "));
        let n = endpoints.len();
        Ok(Connections {
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
            sick: endpoints_sick(n),
        })
    }

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
    pub(super) async fn call<T, F, Fut>(&self, what: impl FnOnce() -> String, call: F) -> Result<T>
    where
        F: Fn(Conn) -> Fut,
        Fut: std::future::Future<Output = std::result::Result<T, etcd_client::Error>>,
    {
        self.call_at(what, Resend::Refused, call)
            .await
            .map(|(v, _)| v)
    }

    /// A call that changes nothing (a read): with more than one member, one
    /// that has not answered within half the request time limit is left and
    /// the next one asked; a lone member gets the whole limit.
    pub(super) async fn read<T, F, Fut>(&self, what: impl FnOnce() -> String, call: F) -> Result<T>
    where
        F: Fn(Conn) -> Fut,
        Fut: std::future::Future<Output = std::result::Result<T, etcd_client::Error>>,
    {
        self.call_at(what, self.idempotent(self.request_timeout / 2), call)
            .await
            .map(|(v, _)| v)
    }

    /// [`Resend::Idempotent`] with this bound per member when there is more
    /// than one member; [`Resend::Refused`] for a lone one, which gets the
    /// whole request time limit (there is nowhere else to go).
    pub(super) fn idempotent(&self, per_member: Duration) -> Resend {
        if self.endpoints.len() > 1 {
            Resend::Idempotent(per_member)
        } else {
            Resend::Refused
        }
    }

    /// [`Connections::call`] with a choice of what is resent; also says which
    /// endpoint answered (see [`Connections::sick_signal`]).
    pub(super) async fn call_at<T, F, Fut>(
        &self,
        what: impl FnOnce() -> String,
        resend: Resend,
        call: F,
    ) -> Result<(T, usize)>
    where
        F: Fn(Conn) -> Fut,
        Fut: std::future::Future<Output = std::result::Result<T, etcd_client::Error>>,
    {
        let n = self.endpoints.len();
        let first = self.preferred.load(Ordering::Relaxed) % n;
        let mut unreachable = Vec::new();
        for i in (first..n).chain(0..first) {
            let (result, connecting) = match self.conn(i).await {
                Ok(conn) => match resend {
                    Resend::Refused => (call(conn.clone()).await, false),
                    Resend::Idempotent(limit) => {
                        match tokio::time::timeout(limit, call(conn.clone())).await {
                            Ok(result) => (result, false),
                            Err(_) => {
                                self.leave(i);
                                unreachable.push(format!(
                                    "{}: no answer within {limit:?}",
                                    self.endpoints[i]
                                ));
                                continue;
                            }
                        }
                    }
                },
                Err(e) => (Err(e), true),
            };
            match result {
                Ok(v) => {
                    self.preferred.store(i, Ordering::Relaxed);
                    return Ok((v, i));
                }
                Err(e) if is_connect_error(&e) => {
                    unreachable.push(format!("{}: {}", self.endpoints[i], describe(&e)));
                }
                Err(e) if !connecting && is_member_trouble(&e) => {
                    // A sick member (no leader, stalled): leave it for the next
                    // calls and watches, whoever answered last.
                    self.leave(i);
                    if is_refused_without_leader(&e) || matches!(resend, Resend::Idempotent(_)) {
                        unreachable.push(format!("{}: {}", self.endpoints[i], describe(&e)));
                        continue;
                    }
                    return Err(map_error(&self.at(i), self.request_timeout, &what(), e));
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

    /// Endpoint `i` is sick (no leader, stalled, a stream on it broke or
    /// fell silent): the next calls start at the next endpoint, unless one
    /// answered meanwhile, and the streams open on it are told.
    pub(super) fn leave(&self, i: usize) {
        let n = self.endpoints.len();
        let _ =
            self.preferred
                .compare_exchange(i, (i + 1) % n, Ordering::Relaxed, Ordering::Relaxed);
        self.sick[i].send_modify(|count| *count += 1);
    }

    /// Changes when endpoint `i` is found sick from now on: a stream open
    /// there (a watch) moves to another member then.
    pub(super) fn sick_signal(&self, i: usize) -> tokio::sync::watch::Receiver<u64> {
        self.sick[i].subscribe()
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
            rejected @ StoreError::Rejected(_) => rejected,
            // Wrong password, unknown user, auth not enabled: retrying will not help.
            _ => StoreError::Rejected(format!("{}: {context}: {detail}", self.at(i))),
        }
    }
}

fn endpoints_sick(n: usize) -> Vec<tokio::sync::watch::Sender<u64>> {
    (0..n).map(|_| tokio::sync::watch::Sender::new(0)).collect()
}

fn tls_options(tls: &TlsFiles) -> Result<TlsOptions> {
    let read = |what: &str, path: &Path| TlsFiles::read("etcd", what, path);
    // etcd 3.4 does not always negotiate HTTP/2 by ALPN; it speaks it anyway.
    let mut options = TlsOptions::new()
        .ca_certificate(Certificate::from_pem(read("CA", &tls.ca)?))
        .assume_http2(true);
    if let Some((cert, key)) = tls.client_pair("etcd")? {
        let cert_pem = read("certificate", cert)?;
        crate::tls::check_client_certificate("etcd", cert, &cert_pem)?;
        options = options.identity(Identity::from_pem(cert_pem, read("key", key)?));
    }
    Ok(options)
}
