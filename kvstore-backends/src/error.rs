use std::time::Duration;

pub type Result<T, E = StoreError> = std::result::Result<T, E>;

/// What a store call can fail with. Callers match on the variant; the message
/// is for people.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The store cannot be reached (connection refused, no leader, ...).
    #[error("store unreachable: {0}")]
    Unavailable(String),
    /// The call did not finish in time.
    #[error("store did not answer within {0:?}")]
    Timeout(Duration),
    /// A watch asked for history the store no longer keeps.
    #[error(
        "revision {requested} is compacted (oldest kept is {oldest}); resync from a fresh read"
    )]
    Compacted { requested: i64, oldest: i64 },
    /// The lease expired or never existed.
    #[error("lease {0} not found or expired")]
    LeaseNotFound(String),
    /// A concurrent change made the call impossible to complete; retry it.
    #[error("concurrent change: {0}")]
    Conflict(String),
    /// The request itself was wrong (a backend limit, an empty key, ...).
    #[error("invalid store request: {0}")]
    Invalid(String),
    /// The store refused this client: a TLS handshake that failed (a CA that
    /// did not sign the store's certificate, a client certificate the store
    /// does not accept) or credentials it does not know. Nothing was sent,
    /// and retrying without a configuration change will not help.
    #[error("the store refused this client: {0}")]
    Rejected(String),
    /// A backend failure with its context.
    #[error("{context}: {source}")]
    Backend {
        context: String,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
}

impl StoreError {
    pub fn backend(
        context: impl Into<String>,
        source: impl Into<Box<dyn std::error::Error + Send + Sync>>,
    ) -> Self {
        StoreError::Backend {
            context: context.into(),
            source: source.into(),
        }
    }

    /// True when a write that failed this way may still have been applied
    /// (sent, then the answer was lost: a timeout, a connection that broke,
    /// an unexpected reply). Only a read tells; "no leader" and refused
    /// connections are in here too, at the cost of that read.
    pub fn may_have_applied(&self) -> bool {
        matches!(
            self,
            StoreError::Timeout(_) | StoreError::Unavailable(_) | StoreError::Backend { .. }
        )
    }

    /// True for failures worth retrying later without changing the request.
    pub fn is_transient(&self) -> bool {
        matches!(
            self,
            StoreError::Unavailable(_) | StoreError::Timeout(_) | StoreError::Conflict(_)
        )
    }
}
