//! The HTTP side: the accept loop (plain or TLS, one task per connection),
//! the routes, and the ACL check and the failures on demand in front of
//! them. The handlers live next to each other by endpoint: `kv`, `txn`,
//! `session`; the failures in `faults`; what they share is in `common`.

mod common;
mod faults;
mod kv;
mod session;
mod txn;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::{Request, State as AxState};
use axum::http::{header, StatusCode};
use axum::middleware::{self, Next};
use axum::response::Response;
use axum::routing::{get, put};
use axum::Router;
use hyper_util::rt::TokioIo;
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio::task::JoinSet;

use self::common::{query, text};
use self::session::{session_create, session_destroy, session_info, session_list, session_renew};
use crate::shared::Shared;
use crate::{lock, TlsConfig};

pub(crate) fn tls_acceptor(tls: &TlsConfig) -> Result<tokio_rustls::TlsAcceptor, String> {
    use tokio_rustls::rustls::pki_types::pem::PemObject;
    use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};
    use tokio_rustls::rustls::{self, server::WebPkiClientVerifier, RootCertStore};
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let certs = CertificateDer::pem_slice_iter(&tls.cert_pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("server certificate: {e}"))?;
    let key =
        PrivateKeyDer::from_pem_slice(&tls.key_pem).map_err(|e| format!("server key: {e}"))?;
    let builder = rustls::ServerConfig::builder_with_provider(Arc::clone(&provider))
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?;
    let builder = match &tls.client_ca_pem {
        Some(ca) => {
            let mut roots = RootCertStore::empty();
            for cert in CertificateDer::pem_slice_iter(ca) {
                roots
                    .add(cert.map_err(|e| format!("client CA: {e}"))?)
                    .map_err(|e| format!("client CA: {e}"))?;
            }
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                .build()
                .map_err(|e| format!("client verifier: {e}"))?;
            builder.with_client_cert_verifier(verifier)
        }
        None => builder.with_no_client_auth(),
    };
    let mut config = builder
        .with_single_cert(certs, key)
        .map_err(|e| format!("server certificate: {e}"))?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(tokio_rustls::TlsAcceptor::from(Arc::new(config)))
}

/// Accepts connections until aborted, each served by a task in `conns`.
pub(crate) async fn accept_loop(
    listener: TcpListener,
    shared: Arc<Shared>,
    tls: Option<tokio_rustls::TlsAcceptor>,
    conns: Arc<Mutex<JoinSet<()>>>,
) {
    let app = router(shared);
    loop {
        let (stream, _) = match listener.accept().await {
            Ok(a) => a,
            Err(e) => {
                tracing::warn!(error = %e, "test server accept failed");
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let app = app.clone();
        let tls = tls.clone();
        let mut conns = lock(&conns);
        // Forget the connections that ended.
        while conns.try_join_next().is_some() {}
        conns.spawn(async move {
            let service = TowerToHyperService::new(app);
            let http = hyper::server::conn::http1::Builder::new();
            let result = match tls {
                Some(tls) => match tls.accept(stream).await {
                    Ok(s) => http.serve_connection(TokioIo::new(s), service).await,
                    Err(e) => {
                        tracing::debug!(error = %e, "test server TLS handshake failed");
                        return;
                    }
                },
                None => http.serve_connection(TokioIo::new(stream), service).await,
            };
            if let Err(e) = result {
                tracing::debug!(error = %e, "test server connection ended");
            }
        });
    }
}

fn router(shared: Arc<Shared>) -> Router {
    Router::new()
        .route("/v1/txn", put(txn::txn))
        .route("/v1/session/create", put(session_create))
        .route("/v1/session/renew/{id}", put(session_renew))
        .route("/v1/session/destroy/{id}", put(session_destroy))
        .route("/v1/session/info/{id}", get(session_info))
        .route("/v1/session/list", get(session_list))
        .route("/v1/status/leader", get(|| async { "\"127.0.0.1:8300\"" }))
        // The KV path is the key itself, read raw (see `kv`).
        .fallback(kv::kv)
        .layer(middleware::from_fn_with_state(Arc::clone(&shared), acl))
        .layer(middleware::from_fn_with_state(
            Arc::clone(&shared),
            faults::inject,
        ))
        .with_state(shared)
}

async fn acl(AxState(shared): AxState<Arc<Shared>>, req: Request, next: Next) -> Response {
    let Some(want) = &shared.config().acl_token else {
        return next.run(req).await;
    };
    let headers = req.headers();
    let given = headers
        .get("X-Consul-Token")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned)
        .or_else(|| {
            headers
                .get(header::AUTHORIZATION)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.strip_prefix("Bearer "))
                .map(str::to_owned)
        })
        .or_else(|| query(req.uri()).remove("token"));
    match given.as_deref() {
        Some(t) if t == want => next.run(req).await,
        None | Some("") => text(
            StatusCode::FORBIDDEN,
            "Permission denied: anonymous token lacks permission",
        ),
        Some(_) => text(StatusCode::FORBIDDEN, "ACL not found"),
    }
}
