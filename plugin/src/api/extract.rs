//! Request bodies: Docker's JSON parsed whatever the Content-Type (Docker
//! sends none), with errors in Docker's shape.

use crate::error::PluginError;
use axum::body::Bytes;
use axum::extract::{FromRequest, Request};
use serde::de::DeserializeOwned;

use super::response::ApiError;

pub struct DockerJson<T>(pub T);

impl<T: DeserializeOwned, S: Send + Sync> FromRequest<S> for DockerJson<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        let method = req.uri().path().trim_start_matches('/').to_string();
        let bytes = Bytes::from_request(req, state).await.map_err(|e| {
            PluginError::BadRequest(format!("{method}: could not read the request body: {e}"))
        })?;
        if bytes.iter().all(|b| b.is_ascii_whitespace()) {
            return Err(PluginError::BadRequest(format!(
                "{method}: the request body is empty; expected a JSON object"
            ))
            .into());
        }
        serde_json::from_slice(&bytes).map(DockerJson).map_err(|e| {
            PluginError::BadRequest(format!("{method}: malformed JSON request: {e}")).into()
        })
    }
}
