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
