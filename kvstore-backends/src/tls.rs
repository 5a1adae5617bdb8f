//! The TLS settings of the networked backends (etcd and Consul): which PEM
//! files to use. Both take the same three files, so they share one type; each
//! backend turns it into its own client configuration (tonic's for etcd,
//! rustls for Consul).

use std::path::{Path, PathBuf};

use crate::{Result, StoreError};

/// TLS files (PEM). The CA checks the server's certificate; a certificate and
/// key, both or neither, authenticate this client to the server (etcd's
/// `--client-cert-auth`, Consul's `verify_incoming`).
#[derive(Clone, Debug)]
pub struct TlsFiles {
    pub ca: PathBuf,
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
}

impl TlsFiles {
    /// Reads one of the files; `backend` ("etcd", "Consul") and `what` ("CA",
    /// "certificate", "key") name it in the error.
    pub(crate) fn read(backend: &str, what: &str, path: &Path) -> Result<Vec<u8>> {
        std::fs::read(path).map_err(|e| {
            StoreError::backend(
                format!("reading {backend} TLS {what} {}", path.display()),
                e,
            )
        })
    }

    /// The client certificate and key when both are given, None when neither
    /// is; only one of them is invalid.
    pub(crate) fn client_pair(&self, backend: &str) -> Result<Option<(&Path, &Path)>> {
        match (&self.cert, &self.key) {
            (Some(cert), Some(key)) => Ok(Some((cert, key))),
            (None, None) => Ok(None),
            _ => Err(StoreError::Invalid(format!(
                "{backend} TLS client certificate and key must be given together"
            ))),
        }
    }
}

/// Checks that a client certificate (PEM) is valid now: a store answers an
/// expired one with a bare "bad certificate" alert, so say it here.
pub(crate) fn check_client_certificate(backend: &str, path: &Path, pem: &[u8]) -> Result<()> {
    use x509_parser::pem::Pem;
    let invalid = |why: String| {
        StoreError::Invalid(format!(
            "{backend} TLS client certificate {}: {why}",
            path.display()
        ))
    };
    let first = Pem::iter_from_buffer(pem)
        .next()
        .ok_or_else(|| invalid("no PEM certificate in the file".into()))?
        .map_err(|e| invalid(format!("not a PEM certificate: {e}")))?;
    let cert = first
        .parse_x509()
        .map_err(|e| invalid(format!("not an X.509 certificate: {e}")))?;
    let validity = cert.validity();
    let now = x509_parser::time::ASN1Time::now();
    if now > validity.not_after {
        return Err(invalid(format!(
            "expired on {} (valid from {}); renew it",
            validity.not_after, validity.not_before
        )));
    }
    if now < validity.not_before {
        return Err(invalid(format!(
            "not valid before {} (check this machine's clock)",
            validity.not_before
        )));
    }
    Ok(())
}

/// When `err` (or one of its causes) is a failed TLS handshake, what went
/// wrong in words an operator can act on.
pub(crate) fn rejection(err: &(dyn std::error::Error + 'static)) -> Option<String> {
    use tokio_rustls::rustls::{AlertDescription, CertificateError, Error as TlsError};
    let mut cause = Some(err);
    while let Some(e) = cause {
        let tls = e.downcast_ref::<TlsError>().or_else(|| {
            e.downcast_ref::<std::io::Error>()
                .and_then(|io| io.get_ref())
                .and_then(|inner| inner.downcast_ref::<TlsError>())
        });
        if let Some(tls) = tls {
            let hint = match tls {
                TlsError::InvalidCertificate(
                    CertificateError::UnknownIssuer | CertificateError::BadSignature,
                ) => "the store's certificate is not signed by the given CA: give the CA that signed it",
                TlsError::InvalidCertificate(CertificateError::Expired) => {
                    "the store's certificate expired: renew it on the store"
                }
                TlsError::InvalidCertificate(
                    CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
                ) => "the store's certificate does not name the address used to reach it",
                TlsError::AlertReceived(
                    AlertDescription::BadCertificate
                    | AlertDescription::CertificateExpired
                    | AlertDescription::UnknownCA
                    | AlertDescription::CertificateRequired
                    | AlertDescription::CertificateUnknown
                    | AlertDescription::AccessDenied,
                ) => {
                    "the store did not accept this client's certificate: give a client \
                     certificate and key signed by a CA the store trusts"
                }
                _ => "check the TLS files",
            };
            return Some(format!("TLS handshake failed: {tls} ({hint})"));
        }
        // h2 passes an alert received after the handshake (TLS 1.3 checks
        // client certificates then) on as text only.
        let text = e.to_string();
        if let Some(alert) = [
            "BadCertificate",
            "CertificateRequired",
            "UnknownCA",
            "CertificateExpired",
        ]
        .iter()
        .find(|a| text.contains(&format!("received fatal alert: {a}")))
        {
            return Some(format!(
                "the store refused the TLS connection (alert {alert}): it did not accept this \
                 client's certificate; give a client certificate and key signed by a CA the store trusts"
            ));
        }
        cause = e.source();
    }
    None
}
