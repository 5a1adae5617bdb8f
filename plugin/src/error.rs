//! The plugin's error type and how it reaches Docker: a non-200 status with
//! `{"Err": "..."}`, which Docker shows to the user as is.

use crate::protocol::ErrorResponse;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
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

    pub fn status(&self) -> StatusCode {
        match self {
            PluginError::BadRequest(_) => StatusCode::BAD_REQUEST,
            // Not 404: Docker reads 404 as "method not implemented".
            PluginError::Unknown(_) => StatusCode::UNPROCESSABLE_ENTITY,
            PluginError::Conflict(_) | PluginError::Exhausted(_) => StatusCode::CONFLICT,
            PluginError::Store { .. } => StatusCode::SERVICE_UNAVAILABLE,
            PluginError::Dataplane(_) | PluginError::Internal(_) => {
                StatusCode::INTERNAL_SERVER_ERROR
            }
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

impl IntoResponse for PluginError {
    fn into_response(self) -> Response {
        let status = self.status();
        if status.is_server_error() {
            tracing::warn!(status = status.as_u16(), error = %self, "request failed");
        } else {
            tracing::info!(status = status.as_u16(), error = %self, "request refused");
        }
        (
            status,
            axum::Json(ErrorResponse {
                err: self.to_string(),
            }),
        )
            .into_response()
    }
}
