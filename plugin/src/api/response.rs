//! How errors reach Docker: a non-200 status with `{"Err": "..."}`, which
//! Docker shows to the user as is. The only place that maps an error kind
//! to a status.

use super::wire::ErrorResponse;
use crate::error::PluginError;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};

/// A [`PluginError`] on its way to Docker.
#[derive(Debug)]
pub struct ApiError(pub PluginError);

impl From<PluginError> for ApiError {
    fn from(e: PluginError) -> Self {
        ApiError(e)
    }
}

pub type ApiResult<T> = Result<T, ApiError>;

pub fn status(e: &PluginError) -> StatusCode {
    match e {
        PluginError::BadRequest(_) => StatusCode::BAD_REQUEST,
        // Not 404: Docker reads 404 as "method not implemented".
        PluginError::Unknown(_) => StatusCode::UNPROCESSABLE_ENTITY,
        PluginError::Conflict(_) | PluginError::Exhausted(_) => StatusCode::CONFLICT,
        PluginError::Store { .. } => StatusCode::SERVICE_UNAVAILABLE,
        PluginError::Dataplane(_) | PluginError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = status(&self.0);
        if status.is_server_error() {
            tracing::warn!(status = status.as_u16(), error = %self.0, "request failed");
        } else {
            tracing::info!(status = status.as_u16(), error = %self.0, "request refused");
        }
        (
            status,
            axum::Json(ErrorResponse {
                err: self.0.to_string(),
            }),
        )
            .into_response()
    }
}
