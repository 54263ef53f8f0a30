//! The ARP Atomic Executor HTTP API (axum): routes, request parsing and the
//! mapping of every error to an ARP `ErrorEnvelope` with a stable code.

use std::sync::Arc;

use arp_types::time::now_rfc3339;
use arp_types::{
    AtomicExecuteRequest, ErrorEnvelope, Health, JsonObject, Status, VersionInfo,
    common::HealthCheck,
};
use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::rejection::BytesRejection;
use axum::extract::{Path, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use jarvis_auth::Principal;
use serde_json::{Value, json};

use crate::executor::{ExecuteError, Executor};

pub const SERVICE_NAME: &str = "jarvis-atomic-executor";

/// Where Prometheus scrapes the executor's metrics; exempt from
/// authentication unless `--metrics-require-auth`.
pub const METRICS_PATH: &str = "/metrics";

/// The service's router over `executor`.
pub fn router(executor: Arc<Executor>) -> Router {
    Router::new()
        .route("/v1/health", get(health))
        .route("/v1/version", get(version))
        .route("/v1/node-types", get(node_types))
        .route(METRICS_PATH, get(metrics))
        .route("/v1/atomic-node-runs:execute", post(execute))
        .route("/v1/atomic-node-runs/{action}", post(node_run_action))
        .fallback(|| async { ApiError::NotFound })
        .method_not_allowed_fallback(|| async { ApiError::MethodNotAllowed })
        .with_state(executor)
}

/// Every way a request can fail before (or instead of) an execution result.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("{message}")]
    InvalidRequest {
        message: String,
        details: Option<JsonObject>,
    },
    #[error("request body too large")]
    PayloadTooLarge,
    #[error("not found")]
    NotFound,
    #[error("method not allowed")]
    MethodNotAllowed,
    #[error(transparent)]
    Execute(#[from] ExecuteError),
    /// A fault inside the executor outside any execution; the detail is logged.
    #[error("internal error")]
    Internal,
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let message = self.to_string();
        let (status, code, details, retry_after) = match self {
            ApiError::InvalidRequest { details, .. } => {
                (StatusCode::BAD_REQUEST, "invalid_request", details, None)
            }
            ApiError::PayloadTooLarge => (
                StatusCode::PAYLOAD_TOO_LARGE,
                "payload_too_large",
                None,
                None,
            ),
            ApiError::NotFound => (StatusCode::NOT_FOUND, "not_found", None, None),
            ApiError::MethodNotAllowed => (
                StatusCode::METHOD_NOT_ALLOWED,
                "method_not_allowed",
                None,
                None,
            ),
            ApiError::Execute(ExecuteError::Overloaded { retry_after }) => (
                StatusCode::SERVICE_UNAVAILABLE,
                "overloaded",
                None,
                Some(retry_after),
            ),
            ApiError::Execute(ExecuteError::Conflict(_)) => {
                (StatusCode::CONFLICT, "node_run_id_conflict", None, None)
            }
            ApiError::Execute(ExecuteError::Internal) | ApiError::Internal => (
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal_error",
                None,
                None,
            ),
        };
        let mut envelope = ErrorEnvelope::new(code, message);
        envelope.error.details = details;
        if retry_after.is_some() {
            envelope.error.retryable = Some(true);
        }
        let mut response = json_response(
            status,
            serde_json::to_vec(&envelope).expect("envelopes serialize"),
        );
        if let Some(after) = retry_after {
            let secs = after.as_secs().max(1).to_string();
            response.headers_mut().insert(
                header::RETRY_AFTER,
                HeaderValue::from_str(&secs).expect("digits"),
            );
        }
        response
    }
}

fn json_response(status: StatusCode, body: impl Into<Body>) -> Response {
    let mut response = Response::new(body.into());
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    response
}

/// Pack files named in `/v1/health`, at most; the rest are counted.
const MAX_FAILED_CHECKS: usize = 100;
/// Characters of a failure's reason shown in `/v1/health`.
const MAX_REASON_CHARS: usize = 500;

/// `GET /v1/health`: `degraded` while any pack file failed to load, with a
/// check naming each (until it is fixed or removed), while any node a
/// loaded pack describes is not served for want of grants (a check per
/// node), or while packs load.
async fn health(State(executor): State<Arc<Executor>>) -> Response {
    let registry = executor.registry();
    let pending = registry.pending();
    let failed = registry.skipped();
    let mut checks = Vec::with_capacity(failed.len().min(MAX_FAILED_CHECKS) + 2);
    checks.push(if pending == 0 {
        HealthCheck {
            name: "packs".into(),
            status: Status::Ok,
            message: None,
            details: None,
        }
    } else {
        HealthCheck {
            name: "packs".into(),
            status: Status::Degraded,
            message: Some(format!("{pending} pack file(s) still loading")),
            details: None,
        }
    });
    for (file, reason) in failed.iter().take(MAX_FAILED_CHECKS) {
        let mut details = JsonObject::new();
        details.insert("file".into(), Value::from(truncate(file, 255)));
        details.insert(
            "reason".into(),
            Value::from(truncate(reason, MAX_REASON_CHARS)),
        );
        checks.push(HealthCheck {
            name: format!("pack:{}", truncate(file, 255)),
            status: Status::Degraded,
            message: Some(format!(
                "{} failed to load: {}",
                truncate(file, 255),
                truncate(reason, MAX_REASON_CHARS)
            )),
            details: Some(details),
        });
    }
    if failed.len() > MAX_FAILED_CHECKS {
        checks.push(HealthCheck {
            name: "pack:more".into(),
            status: Status::Degraded,
            message: Some(format!(
                "{} more pack file(s) failed to load",
                failed.len() - MAX_FAILED_CHECKS
            )),
            details: None,
        });
    }
    let (not_served, not_served_total) = registry.not_served(MAX_FAILED_CHECKS);
    for (file, node) in &not_served {
        let file = truncate(file, 255);
        let reason = truncate(&node.reason, MAX_REASON_CHARS);
        let mut details = JsonObject::new();
        details.insert("file".into(), Value::from(file.clone()));
        details.insert(
            "node_type_id".into(),
            Value::from(node.node_type_id.clone()),
        );
        details.insert("version".into(), Value::from(node.version.clone()));
        details.insert("reason".into(), Value::from(reason.clone()));
        checks.push(HealthCheck {
            name: format!("node:{}@{}", node.node_type_id, node.version),
            status: Status::Degraded,
            message: Some(format!(
                "{} {} of {file} is not served: {reason}",
                node.node_type_id, node.version
            )),
            details: Some(details),
        });
    }
    if not_served_total > not_served.len() {
        checks.push(HealthCheck {
            name: "node:more".into(),
            status: Status::Degraded,
            message: Some(format!(
                "{} more node(s) not served",
                not_served_total - not_served.len()
            )),
            details: None,
        });
    }
    let status = if checks.iter().any(|c| c.status != Status::Ok) {
        Status::Degraded
    } else {
        Status::Ok
    };
    let health = Health {
        status,
        time: now_rfc3339(),
        checks: Some(checks),
        extensions: None,
    };
    json_response(
        StatusCode::OK,
        serde_json::to_vec(&health).expect("health serializes"),
    )
}

/// The first `max` characters of `text`, control characters replaced, with
/// an ellipsis when cut.
fn truncate(text: &str, max: usize) -> String {
    let mut short: String = text
        .chars()
        .take(max)
        .map(|c| if c.is_control() { '\u{fffd}' } else { c })
        .collect();
    if text.chars().nth(max).is_some() {
        short.push('…');
    }
    short
}

async fn version() -> Response {
    let info = VersionInfo {
        service_name: SERVICE_NAME.into(),
        service_version: env!("CARGO_PKG_VERSION").into(),
        supported_api_versions: vec!["v1".into()],
        build: None,
        extensions: None,
    };
    json_response(
        StatusCode::OK,
        serde_json::to_vec(&info).expect("version serializes"),
    )
}

async fn node_types(State(executor): State<Arc<Executor>>) -> Response {
    // Prepared when the served nodes last changed: a refcount bump here.
    json_response(StatusCode::OK, executor.registry().catalogue())
}

/// `GET /metrics`: the Prometheus text format.
async fn metrics(State(executor): State<Arc<Executor>>) -> Result<Response, ApiError> {
    let text = executor.metrics_text().map_err(|e| {
        tracing::error!(error = %e, "the metrics could not be written");
        ApiError::Internal
    })?;
    let mut response = Response::new(Body::from(text));
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static(crate::metrics::CONTENT_TYPE),
    );
    Ok(response)
}

async fn execute(
    State(executor): State<Arc<Executor>>,
    principal: Option<Principal>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let body = body.map_err(|rejection| match rejection.status() {
        StatusCode::PAYLOAD_TOO_LARGE => ApiError::PayloadTooLarge,
        _ => ApiError::InvalidRequest {
            message: rejection.body_text(),
            details: None,
        },
    })?;
    let request = parse_execute_request(&body)?;
    // The execution's log line names who asked for it.
    let sub = principal.as_ref().map_or("anonymous", Principal::sub);
    let completed = executor.execute(request, sub).await?;
    Ok(json_response(StatusCode::OK, completed.body()))
}

/// `POST /v1/atomic-node-runs/{node_run_id}:cancel`. The id and the action
/// share one path segment, so the split happens here.
async fn node_run_action(
    State(executor): State<Arc<Executor>>,
    Path(action): Path<String>,
) -> Response {
    match action.rsplit_once(':') {
        Some((node_run_id, "cancel")) if !node_run_id.is_empty() => {
            if executor.cancel(node_run_id) {
                tracing::info!(node_run_id, "cancellation requested");
            }
            StatusCode::NO_CONTENT.into_response()
        }
        _ => ApiError::NotFound.into_response(),
    }
}

/// Parses and checks an `AtomicExecuteRequest`, reporting where it is wrong.
pub fn parse_execute_request(body: &[u8]) -> Result<AtomicExecuteRequest, ApiError> {
    // Well-formed requests take the plain parser; only a failed parse pays
    // for a second pass that tracks the path to the error.
    let request = match serde_json::from_slice::<AtomicExecuteRequest>(body) {
        Ok(request) => request,
        Err(plain) => return Err(explain_parse_error(body, plain)),
    };
    if let Some(constraints) = &request.constraints
        && let Err((path, message)) = constraints.validate()
    {
        return Err(invalid(
            "request body is not a valid AtomicExecuteRequest",
            path,
            message,
        ));
    }
    if request.node_run_id.is_empty() {
        return Err(invalid(
            "node_run_id must not be empty",
            "node_run_id",
            "must not be empty",
        ));
    }
    Ok(request)
}

/// The error of an unparseable request, with the JSON path where it went wrong.
fn explain_parse_error(body: &[u8], plain: serde_json::Error) -> ApiError {
    const MESSAGE: &str = "request body is not a valid AtomicExecuteRequest";
    let mut de = serde_json::Deserializer::from_slice(body);
    match serde_path_to_error::deserialize::<_, AtomicExecuteRequest>(&mut de) {
        Err(e) => invalid(MESSAGE, &e.path().to_string(), &e.inner().to_string()),
        // The value parsed; what failed is what follows it.
        Ok(_) => invalid(MESSAGE, "$", &plain.to_string()),
    }
}

fn invalid(message: &str, path: &str, reason: &str) -> ApiError {
    let path = if matches!(path, "" | "." | "?") {
        "$".to_owned()
    } else {
        path.to_owned()
    };
    let details = json!({ "errors": [{ "path": path, "message": reason }] });
    ApiError::InvalidRequest {
        message: message.into(),
        details: match details {
            Value::Object(map) => Some(map),
            _ => None,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::truncate;

    #[test]
    fn health_text_is_cut_and_has_no_control_characters() {
        assert_eq!(truncate("ok.wasm", 10), "ok.wasm");
        assert_eq!(truncate("a\nb\u{1b}c", 10), "a\u{fffd}b\u{fffd}c");
        assert_eq!(truncate("ééééé", 3), "ééé…");
        assert_eq!(truncate("abc", 3), "abc");
    }
}
