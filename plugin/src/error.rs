//! The error of every operation below the API: what went wrong, in words a
//! Docker user can act on. `api::response` alone decides how each kind
//! reaches Docker (status and body).

use kvstore_backends::StoreError;

pub type Result<T, E = PluginError> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum PluginError {
    /// The request is malformed or asks for something impossible.
    #[error("{0}")]
    BadRequest(String),
    /// The request names a network, endpoint, pool or address we do not know.
    #[error("{0}")]
    Unknown(String),
    /// The request conflicts with the cluster's state (overlapping subnet,
    /// address in use).
    #[error("{0}")]
    Conflict(String),
    /// No address or subnet left.
    #[error("{0}")]
    Exhausted(String),
    /// The store failed or did not answer; nothing was changed.
    #[error("{context}: {source}; check that the store is running and reachable from this host, then retry")]
    Store {
        context: String,
        #[source]
        source: StoreError,
    },
    /// A kernel (netlink) operation failed.
    #[error("{0}")]
    Dataplane(#[from] crate::dataplane::DataplaneError),
    /// Something that should not happen; the message says where.
    #[error("internal error: {0}")]
    Internal(String),
}

impl PluginError {
    pub fn store(context: impl Into<String>, source: StoreError) -> Self {
        PluginError::Store {
            context: context.into(),
            source,
        }
    }
}

/// Adds context to store errors at the call site.
pub trait StoreContext<T> {
    fn ctx(self, context: impl FnOnce() -> String) -> Result<T>;
}

impl<T> StoreContext<T> for std::result::Result<T, StoreError> {
    fn ctx(self, context: impl FnOnce() -> String) -> Result<T> {
        self.map_err(|e| PluginError::store(context(), e))
    }
}
