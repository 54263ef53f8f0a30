//! The HTTP surface of `run-coordinator.openapi.yaml`: routes, body parsing, responses.

pub mod error;

use std::collections::HashMap;
use std::sync::Arc;

use arp_types::common::{Health, Status, VersionInfo};
use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{Path, Query, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde::Serialize;
use serde::de::DeserializeOwned;

use self::error::ApiError;
use crate::coordinator::Coordinator;
use crate::events::{self, Scope, StreamRequest};

pub fn router(coord: Arc<Coordinator>) -> Router {
    Router::new()
        .route("/v1/health", get(health))
        .route("/v1/version", get(version))
        .route("/v1/runs", post(start_run))
        // `{run_id}:cancel` shares the segment with `{run_id}`; split it ourselves.
        .route("/v1/runs/{segment}", get(get_run).post(run_action))
        .route("/v1/runs/{run_id}/events", get(run_events))
        .route("/v1/node-runs", post(create_node_runs))
        .route(
            "/v1/node-runs/{segment}",
            get(get_node_run).post(node_run_action),
        )
        .route("/v1/node-runs/{node_run_id}/events", get(node_run_events))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .with_state(coord)
}

type AppState = State<Arc<Coordinator>>;

fn json<T: Serialize>(status: StatusCode, value: &T) -> Response {
    match serde_json::to_vec(value) {
        Ok(body) => (status, [(header::CONTENT_TYPE, "application/json")], body).into_response(),
        Err(err) => {
            tracing::error!(error = %err, "response serialization failed");
            ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal_error",
                "Internal error",
            )
            .into_response()
        }
    }
}

/// Parses a JSON body, naming the offending field in the error.
fn parse<T: DeserializeOwned>(body: &Bytes) -> Result<T, ApiError> {
    if body.is_empty() {
        return Err(ApiError::invalid_request("request body is required"));
    }
    let de = &mut serde_json::Deserializer::from_slice(body);
    serde_path_to_error::deserialize(de).map_err(|err| {
        let path = err.path().to_string();
        let inner = err.into_inner();
        if path == "." || path.is_empty() {
            ApiError::invalid_request(inner.to_string())
        } else {
            ApiError::invalid_request(format!("{path}: {inner}"))
        }
    })
}

async fn health() -> Response {
    json(
        StatusCode::OK,
        &Health {
            status: Status::Ok,
            time: arp_types::time::now_rfc3339(),
            checks: None,
            extensions: None,
        },
    )
}

async fn version() -> Response {
    json(
        StatusCode::OK,
        &VersionInfo {
            service_name: "jarvis-run-coordinator".into(),
            service_version: env!("CARGO_PKG_VERSION").into(),
            supported_api_versions: vec!["v1".into()],
            build: None,
            extensions: None,
        },
    )
}

async fn start_run(State(coord): AppState, body: Bytes) -> Result<Response, ApiError> {
    let run = coord.start_run(parse(&body)?).await?;
    Ok(json(StatusCode::OK, &run))
}

async fn get_run(
    State(coord): AppState,
    Path(segment): Path<String>,
) -> Result<Response, ApiError> {
    if segment.contains(':') {
        return Err(method_not_allowed_error());
    }
    Ok(json(StatusCode::OK, &coord.get_run(&segment).await?))
}

async fn run_action(
    State(coord): AppState,
    Path(segment): Path<String>,
) -> Result<Response, ApiError> {
    match segment.rsplit_once(':') {
        Some((run_id, "cancel")) => Ok(json(
            StatusCode::OK,
            &coord.cancel_run(run_id.to_owned()).await?,
        )),
        _ => Err(not_found_error()),
    }
}

async fn create_node_runs(State(coord): AppState, body: Bytes) -> Result<Response, ApiError> {
    let created = coord.create_node_runs(parse(&body)?).await?;
    Ok(json(StatusCode::OK, &created))
}

async fn get_node_run(
    State(coord): AppState,
    Path(segment): Path<String>,
) -> Result<Response, ApiError> {
    if segment.contains(':') {
        return Err(method_not_allowed_error());
    }
    Ok(json(StatusCode::OK, &coord.get_node_run(&segment).await?))
}

async fn node_run_action(
    State(coord): AppState,
    Path(segment): Path<String>,
    body: Bytes,
) -> Result<Response, ApiError> {
    match segment.rsplit_once(':') {
        Some((id, "complete")) => {
            coord
                .complete_node_run(id.to_owned(), parse(&body)?)
                .await?
        }
        Some((id, "evaluation")) => {
            coord
                .report_evaluation(id.to_owned(), parse(&body)?)
                .await?
        }
        _ => return Err(not_found_error()),
    }
    Ok(StatusCode::NO_CONTENT.into_response())
}

/// Query of the event streams: `after_seq=N` resumes after event N;
/// `follow=false` returns the stored events without waiting for more.
fn stream_options(query: &HashMap<String, String>) -> Result<(Option<u64>, bool), ApiError> {
    let after_seq =
        match query.get("after_seq") {
            None => None,
            Some(v) => Some(v.parse::<u64>().map_err(|_| {
                ApiError::invalid_request("after_seq: must be a non-negative integer")
            })?),
        };
    let follow = match query.get("follow").map(String::as_str) {
        None | Some("true") | Some("1") => true,
        Some("false") | Some("0") => false,
        Some(_) => return Err(ApiError::invalid_request("follow: must be true or false")),
    };
    Ok((after_seq, follow))
}

async fn run_events(
    State(coord): AppState,
    Path(run_id): Path<String>,
    Query(query): Query<HashMap<String, String>>,
) -> Result<Response, ApiError> {
    let (after_seq, follow) = stream_options(&query)?;
    coord.ensure_run(&run_id).await?;
    Ok(ndjson(
        coord,
        StreamRequest {
            run_id,
            scope: Scope::Run,
            after_seq,
            follow,
        },
    ))
}

async fn node_run_events(
    State(coord): AppState,
    Path(node_run_id): Path<String>,
    Query(query): Query<HashMap<String, String>>,
) -> Result<Response, ApiError> {
    let (after_seq, follow) = stream_options(&query)?;
    let node_run = coord.get_node_run(&node_run_id).await?;
    let req = StreamRequest {
        run_id: node_run.run_id,
        scope: Scope::NodeRun(node_run_id),
        after_seq,
        follow,
    };
    Ok(ndjson(coord, req))
}

fn ndjson(coord: Arc<Coordinator>, req: StreamRequest) -> Response {
    let body = Body::from_stream(events::ndjson(coord, req));
    (
        StatusCode::OK,
        [(header::CONTENT_TYPE, "application/x-ndjson")],
        body,
    )
        .into_response()
}

fn not_found_error() -> ApiError {
    ApiError::not_found("not_found", "No such endpoint")
}

fn method_not_allowed_error() -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        "Method not allowed on this endpoint",
    )
}

async fn not_found() -> ApiError {
    not_found_error()
}

async fn method_not_allowed() -> ApiError {
    method_not_allowed_error()
}
