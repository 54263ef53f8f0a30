//! The one API error type: every failure a client sees becomes an ARP `ErrorEnvelope`.

use arp_types::{ErrorDetail, ErrorEnvelope, JsonObject};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};

use crate::store::StoreError;

/// An error answered to a client with a stable `code`.
#[derive(Debug, Clone)]
pub struct ApiError {
    pub status: StatusCode,
    /// Boxed: an error travels through many `Result`s and should stay small.
    pub detail: Box<ErrorDetail>,
}

impl ApiError {
    pub fn new(status: StatusCode, code: &str, message: impl Into<String>) -> Self {
        Self {
            status,
            detail: Box::new(ErrorDetail::new(code, message)),
        }
    }

    pub fn not_found(code: &str, message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, code, message)
    }

    pub fn conflict(code: &str, message: impl Into<String>) -> Self {
        Self::new(StatusCode::CONFLICT, code, message)
    }

    pub fn invalid_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "invalid_request", message)
    }

    pub fn with_details(mut self, details: JsonObject) -> Self {
        self.detail.details = Some(details);
        self
    }

    pub fn code(&self) -> &str {
        &self.detail.code
    }
}

impl From<StoreError> for ApiError {
    fn from(err: StoreError) -> Self {
        // The detail goes to the log, never to the client.
        tracing::error!(error = %err, "store failure");
        Self::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal_error",
            "Internal storage error",
        )
        .retryable()
    }
}

impl ApiError {
    fn retryable(mut self) -> Self {
        self.detail.retryable = Some(true);
        self
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = serde_json::to_vec(&ErrorEnvelope {
            error: *self.detail,
            extensions: None,
        })
        .unwrap_or_else(|_| br#"{"error":{"code":"internal_error","message":"error"}}"#.to_vec());
        (
            self.status,
            [(axum::http::header::CONTENT_TYPE, "application/json")],
            body,
        )
            .into_response()
    }
}
