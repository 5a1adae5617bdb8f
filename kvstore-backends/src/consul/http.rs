//! The transport: a small HTTP/1.1 client for one Consul agent, with a pool
//! of idle connections, plain or over rustls (the TLS stack etcd-client
//! already brings in), and the parsing of the agent's address. It knows
//! nothing of KV or sessions: it sends a request and hands back the status,
//! the `X-Consul-Index` and the body, or says whether the request may have
//! been sent when it failed.

use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper::client::conn::http1::SendRequest;
use hyper::header::{HeaderValue, CONTENT_TYPE, HOST, USER_AGENT};
use hyper::{Method, Request, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_rustls::rustls;

use crate::{Result, StoreError, TlsFiles};

/// Idle connections kept for reuse.
const IDLE_CONNECTIONS: usize = 16;

/// A small HTTP/1.1 client with a pool of idle connections.
pub(super) struct Http {
    pub(super) authority: String,
    host_header: HeaderValue,
    tls: Option<(
        tokio_rustls::TlsConnector,
        rustls::pki_types::ServerName<'static>,
    )>,
    token: Option<HeaderValue>,
    dial_timeout: Duration,
    idle: Mutex<Vec<SendRequest<Full<Bytes>>>>,
}

pub(super) struct Reply {
    pub(super) status: StatusCode,
    pub(super) index: Option<u64>,
    pub(super) body: Bytes,
}

pub(super) enum HttpError {
    /// No connection: the request was not sent.
    Connect(String),
    Timeout,
    /// The connection broke while the request was under way: a write may or
    /// may not have been applied.
    Broken(String),
    /// The TLS handshake failed (CA, client certificate): not sent.
    Rejected(String),
}

impl Http {
    /// Checks the address and the token, and reads the TLS files; does not
    /// connect.
    pub(super) fn new(
        address: &str,
        tls: Option<&TlsFiles>,
        token: Option<String>,
        dial_timeout: Duration,
    ) -> Result<Self> {
        let (https, host, authority) = parse_address(address, tls.is_some())?;
        let tls = match (tls, https) {
            (Some(tls), true) => {
                let name = rustls::pki_types::ServerName::try_from(host.clone()).map_err(|e| {
                    StoreError::Invalid(format!("Consul address {address}: host {host:?}: {e}"))
                })?;
                Some((tls_connector(tls)?, name))
            }
            _ => None,
        };
        let token = token
            .filter(|t| !t.is_empty())
            .map(|t| {
                HeaderValue::from_str(&t)
                    .map(|mut v| {
                        v.set_sensitive(true);
                        v
                    })
                    .map_err(|_| {
                        StoreError::Invalid("the Consul ACL token is not a valid header".into())
                    })
            })
            .transpose()?;
        let host_header = HeaderValue::from_str(&authority)
            .map_err(|_| StoreError::Invalid(format!("Consul address {address} is malformed")))?;
        Ok(Http {
            authority,
            host_header,
            tls,
            token,
            dial_timeout,
            idle: Mutex::new(Vec::new()),
        })
    }

    pub(super) async fn send(
        &self,
        method: Method,
        path: &str,
        body: Option<Vec<u8>>,
        timeout: Duration,
    ) -> std::result::Result<Reply, HttpError> {
        tokio::time::timeout(timeout, self.send_once_or_twice(method, path, body))
            .await
            .unwrap_or(Err(HttpError::Timeout))
    }

    async fn send_once_or_twice(
        &self,
        method: Method,
        path: &str,
        body: Option<Vec<u8>>,
    ) -> std::result::Result<Reply, HttpError> {
        let body = Bytes::from(body.unwrap_or_default());
        let mut reused_failed = false;
        loop {
            let (mut sender, reused) = match self.take_idle() {
                Some(s) if !reused_failed => (s, true),
                _ => (self.dial().await?, false),
            };
            if sender.ready().await.is_err() {
                if reused {
                    continue;
                }
                return Err(HttpError::Connect("the connection closed at once".into()));
            }
            let mut req = Request::builder()
                .method(method.clone())
                .uri(path)
                .header(HOST, self.host_header.clone())
                .header(USER_AGENT, "rustoverlay-kvstore")
                .body(Full::new(body.clone()))
                .map_err(|e| HttpError::Connect(format!("bad request {path}: {e}")))?;
            if !body.is_empty() {
                req.headers_mut()
                    .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
            }
            if let Some(token) = &self.token {
                req.headers_mut().insert("X-Consul-Token", token.clone());
            }
            let resp = match sender.send_request(req).await {
                Ok(resp) => resp,
                // A pooled connection the server had closed: the request was
                // not sent (canceled), or was a read. Once, on a new one.
                Err(e) if reused && (e.is_canceled() || method == Method::GET) => {
                    reused_failed = true;
                    continue;
                }
                Err(e) => return Err(HttpError::Broken(describe_hyper(&e))),
            };
            let status = resp.status();
            let index = resp
                .headers()
                .get("X-Consul-Index")
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.parse().ok());
            let body = resp
                .into_body()
                .collect()
                .await
                .map_err(|e| HttpError::Broken(describe_hyper(&e)))?
                .to_bytes();
            self.put_idle(sender);
            return Ok(Reply {
                status,
                index,
                body,
            });
        }
    }

    fn take_idle(&self) -> Option<SendRequest<Full<Bytes>>> {
        let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
        while let Some(s) = idle.pop() {
            if !s.is_closed() {
                return Some(s);
            }
        }
        None
    }

    fn put_idle(&self, sender: SendRequest<Full<Bytes>>) {
        if sender.is_closed() {
            return;
        }
        let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
        if idle.len() < IDLE_CONNECTIONS {
            idle.push(sender);
        }
    }

    async fn dial(&self) -> std::result::Result<SendRequest<Full<Bytes>>, HttpError> {
        let tcp = tokio::time::timeout(
            self.dial_timeout,
            tokio::net::TcpStream::connect(&self.authority),
        )
        .await
        .map_err(|_| {
            HttpError::Connect(format!("connect timed out after {:?}", self.dial_timeout))
        })?
        .map_err(|e| HttpError::Connect(format!("connect: {e}")))?;
        let _ = tcp.set_nodelay(true);
        match &self.tls {
            None => handshake(tcp).await,
            Some((connector, name)) => {
                let stream =
                    tokio::time::timeout(self.dial_timeout, connector.connect(name.clone(), tcp))
                        .await
                        .map_err(|_| HttpError::Connect("TLS handshake timed out".into()))?
                        .map_err(|e| match crate::tls::rejection(&e) {
                            Some(why) => HttpError::Rejected(why),
                            None => HttpError::Connect(format!("TLS handshake: {e}")),
                        })?;
                handshake(stream).await
            }
        }
    }
}

async fn handshake<S>(io: S) -> std::result::Result<SendRequest<Full<Bytes>>, HttpError>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(io))
        .await
        .map_err(|e| HttpError::Connect(format!("HTTP handshake: {}", describe_hyper(&e))))?;
    // Ends when the sender is dropped or the peer closes.
    tokio::spawn(async move {
        if let Err(e) = conn.await {
            tracing::debug!(error = %e, "Consul connection ended");
        }
    });
    Ok(sender)
}

fn describe_hyper(e: &hyper::Error) -> String {
    let mut text = e.to_string();
    let mut source = std::error::Error::source(e);
    while let Some(cause) = source {
        let c = cause.to_string();
        if !text.contains(&c) {
            text.push_str(": ");
            text.push_str(&c);
        }
        source = cause.source();
    }
    text
}

/// (https, host, host:port) of an address.
fn parse_address(address: &str, tls: bool) -> Result<(bool, String, String)> {
    let invalid = |why: &str| StoreError::Invalid(format!("Consul address {address:?}: {why}"));
    let a = address.trim().trim_end_matches('/');
    let (https, rest) = if let Some(r) = a.strip_prefix("https://") {
        if !tls {
            return Err(invalid("https but no TLS CA is configured"));
        }
        (true, r)
    } else if let Some(r) = a.strip_prefix("http://") {
        if tls {
            return Err(invalid("plain http but TLS is configured"));
        }
        (false, r)
    } else if a.contains("://") {
        return Err(invalid("only http:// and https:// are supported"));
    } else {
        (tls, a)
    };
    if rest.is_empty() || rest.contains(['/', '?', '#', '@', ' ']) {
        return Err(invalid("expected host:port"));
    }
    let default_port: u16 = if https { 8501 } else { 8500 };
    let (host, port) = if let Some(v6) = rest.strip_prefix('[') {
        let (h, after) = v6.split_once(']').ok_or_else(|| invalid("unclosed '['"))?;
        let port = match after.strip_prefix(':') {
            Some(p) => p.parse().map_err(|_| invalid("bad port"))?,
            None if after.is_empty() => default_port,
            None => return Err(invalid("expected [v6]:port")),
        };
        (h.to_owned(), port)
    } else {
        match rest.rsplit_once(':') {
            Some((h, p)) => (h.to_owned(), p.parse().map_err(|_| invalid("bad port"))?),
            None => (rest.to_owned(), default_port),
        }
    };
    if host.is_empty() {
        return Err(invalid("no host"));
    }
    let authority = if host.contains(':') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    };
    Ok((https, host, authority))
}

fn tls_connector(tls: &TlsFiles) -> Result<tokio_rustls::TlsConnector> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let read = |what: &str, path: &Path| TlsFiles::read("Consul", what, path);
    let pem_error = |what: &str, path: &Path, e: rustls::pki_types::pem::Error| {
        StoreError::Invalid(format!("Consul TLS {what} {}: {e}", path.display()))
    };
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(&read("CA", &tls.ca)?) {
        let cert = cert.map_err(|e| pem_error("CA", &tls.ca, e))?;
        roots
            .add(cert)
            .map_err(|e| StoreError::Invalid(format!("Consul TLS CA {}: {e}", tls.ca.display())))?;
    }
    if roots.is_empty() {
        return Err(StoreError::Invalid(format!(
            "Consul TLS CA {} holds no certificate",
            tls.ca.display()
        )));
    }
    let builder = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| StoreError::backend("Consul TLS setup", e))?
    .with_root_certificates(roots);
    let mut config = match tls.client_pair("Consul")? {
        Some((cert, key)) => {
            let cert_pem = read("certificate", cert)?;
            crate::tls::check_client_certificate("Consul", cert, &cert_pem)?;
            let certs = CertificateDer::pem_slice_iter(&cert_pem)
                .collect::<std::result::Result<Vec<_>, _>>()
                .map_err(|e| pem_error("certificate", cert, e))?;
            let key_der = PrivateKeyDer::from_pem_slice(&read("key", key)?)
                .map_err(|e| pem_error("key", key, e))?;
            builder.with_client_auth_cert(certs, key_der).map_err(|e| {
                StoreError::Invalid(format!(
                    "Consul TLS certificate {} and key {}: {e}",
                    cert.display(),
                    key.display()
                ))
            })?
        }
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(tokio_rustls::TlsConnector::from(Arc::new(config)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses() {
        let ok = |a: &str, tls: bool| parse_address(a, tls).unwrap();
        assert_eq!(
            ok("127.0.0.1:8500", false),
            (false, "127.0.0.1".into(), "127.0.0.1:8500".into())
        );
        assert_eq!(ok("http://h:1/", false), (false, "h".into(), "h:1".into()));
        assert_eq!(ok("h", true), (true, "h".into(), "h:8501".into()));
        assert_eq!(
            ok("[::1]:9", false),
            (false, "::1".into(), "[::1]:9".into())
        );
        assert_eq!(
            ok("https://[::1]", true),
            (true, "::1".into(), "[::1]:8501".into())
        );
        for (bad, tls) in [
            ("https://h:1", false),
            ("http://h:1", true),
            ("unix:///x", false),
            ("h:port", false),
            ("h:1/path", false),
            ("", false),
            (":1", false),
        ] {
            assert!(parse_address(bad, tls).is_err(), "{bad:?} must be refused");
        }
    }
}
