//! The one API error type: every failure a client sees becomes an ARP `ErrorEnvelope`.

use arp_types::{ErrorDetail, ErrorEnvelope, JsonObject};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};

use crate::runs::error::RunError;
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

    fn retryable(mut self) -> Self {
        self.detail.retryable = Some(true);
        self
    }
}

/// The one place a domain error becomes an HTTP status and an envelope.
impl From<RunError> for ApiError {
    fn from(err: RunError) -> Self {
        let status = match &err {
            RunError::Store(_) => return Self::from_store(&err),
            RunError::InvalidRequest(_) => StatusCode::BAD_REQUEST,
            RunError::RunNotFound(_)
            | RunError::NodeRunNotFound(_)
            | RunError::ParentNotFound(_) => StatusCode::NOT_FOUND,
            RunError::RunAlreadyExists(_)
            | RunError::ParentMismatch
            | RunError::ParentNotComposite
            | RunError::RunNotActive { .. }
            | RunError::ParentTerminal(_)
            | RunError::ConstraintViolation(_)
            | RunError::IdempotencyConflict(_)
            | RunError::NodeRunAlreadyTerminal { .. } => StatusCode::CONFLICT,
        };
        Self::new(status, err.code(), err.to_string())
    }
}

impl From<StoreError> for ApiError {
    fn from(err: StoreError) -> Self {
        Self::from_store(&err)
    }
}

impl ApiError {
    fn from_store(err: &dyn std::error::Error) -> Self {
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
