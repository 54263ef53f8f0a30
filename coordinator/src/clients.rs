//! HTTP clients for the services the coordinator calls, and how their failures are classified.

use std::time::Duration;

use arp_types::composite::{CompositeBeginRequest, CompositeBeginResponse};
use arp_types::pdp::{PolicyDecision, PolicyDecisionRequest};
use arp_types::{AtomicExecuteRequest, AtomicExecuteResult, ErrorDetail, ErrorEnvelope, NodeType};
use jarvis_auth::{OutboundAuth, TargetService};
use reqwest::{Method, RequestBuilder, StatusCode};
use serde::de::DeserializeOwned;

/// Why a call to another service failed, and what the caller should do about it.
#[derive(Debug, Clone, thiserror::Error)]
pub enum CallError {
    /// The service is unreachable, overloaded or not done yet: retry the same
    /// request later (the executor attaches a retry to the execution in flight).
    #[error("transient: {reason}")]
    Transient {
        reason: String,
        retry_after: Option<Duration>,
    },
    /// The service answered with a definitive error: record it, do not retry.
    #[error("{}: {}", .0.code, .0.message)]
    Terminal(ErrorDetail),
}

impl CallError {
    pub fn terminal(code: &str, message: impl Into<String>) -> Self {
        Self::Terminal(ErrorDetail::new(code, message))
    }

    fn from_reqwest(err: reqwest::Error, service: &str) -> Self {
        if err.is_decode() {
            return Self::terminal(
                "executor_bad_response",
                format!("{service} sent an invalid body: {err}"),
            );
        }
        // Connect refused, reset, timeouts and broken bodies are all worth retrying.
        Self::Transient {
            reason: format!("{service}: {err}"),
            retry_after: None,
        }
    }

    /// Classifies a non-2xx answer: overload and gateway errors are transient,
    /// anything else is the service's own verdict (its ErrorEnvelope code when it sent one).
    async fn from_status(resp: reqwest::Response, service: &str, fallback_code: &str) -> Self {
        let status = resp.status();
        let retry_after = resp
            .headers()
            .get(reqwest::header::RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<u64>().ok())
            .map(Duration::from_secs);
        let body = resp.bytes().await.unwrap_or_default();
        let envelope = serde_json::from_slice::<ErrorEnvelope>(&body).ok();
        let transient = matches!(
            status,
            StatusCode::SERVICE_UNAVAILABLE
                | StatusCode::TOO_MANY_REQUESTS
                | StatusCode::BAD_GATEWAY
                | StatusCode::GATEWAY_TIMEOUT
        );
        if transient {
            let code = envelope
                .as_ref()
                .map_or("unavailable", |e| e.error.code.as_str());
            return Self::Transient {
                reason: format!("{service} answered {status} ({code})"),
                retry_after,
            };
        }
        match envelope {
            Some(envelope) => Self::Terminal(envelope.error),
            None => Self::terminal(fallback_code, format!("{service} answered {status}")),
        }
    }
}

/// An HTTP client for one target service, carrying its outbound credentials.
#[derive(Debug, Clone)]
pub struct Http {
    client: reqwest::Client,
    auth: OutboundAuth,
    target: TargetService,
}

impl Http {
    pub fn new(client: reqwest::Client, auth: OutboundAuth, target: TargetService) -> Self {
        Self {
            client,
            auth,
            target,
        }
    }

    /// A request with `Authorization` set when outbound auth is on. A token
    /// endpoint that fails is treated as transient: the call is retried
    /// within the NodeRun's deadline like any other outage.
    async fn request(
        &self,
        method: Method,
        url: String,
        service: &str,
    ) -> Result<RequestBuilder, CallError> {
        let request = self.client.request(method, url);
        match self.auth.authorization(self.target).await {
            Ok(Some(value)) => Ok(request.header(reqwest::header::AUTHORIZATION, value)),
            Ok(None) => Ok(request),
            Err(e) => Err(CallError::Transient {
                reason: format!("{service}: no outbound token: {e}"),
                retry_after: None,
            }),
        }
    }
}

async fn post_json<B: serde::Serialize, R: DeserializeOwned>(
    http: &Http,
    url: String,
    body: &B,
    timeout: Duration,
    service: &str,
    fallback_code: &str,
) -> Result<R, CallError> {
    let resp = http
        .request(Method::POST, url, service)
        .await?
        .json(body)
        .timeout(timeout)
        .send()
        .await
        .map_err(|e| CallError::from_reqwest(e, service))?;
    if !resp.status().is_success() {
        return Err(CallError::from_status(resp, service, fallback_code).await);
    }
    resp.json::<R>()
        .await
        .map_err(|e| CallError::from_reqwest(e, service))
}

/// `POST /v1/atomic-node-runs:execute` and `:cancel` of an Atomic Executor.
#[derive(Debug, Clone)]
pub struct AtomicExecutorClient {
    pub base_url: String,
    http: Http,
}

impl AtomicExecutorClient {
    pub fn new(base_url: String, http: Http) -> Self {
        Self { base_url, http }
    }

    pub async fn execute(
        &self,
        request: &AtomicExecuteRequest,
        timeout: Duration,
    ) -> Result<AtomicExecuteResult, CallError> {
        let url = format!("{}/v1/atomic-node-runs:execute", self.base_url);
        post_json(
            &self.http,
            url,
            request,
            timeout,
            "atomic executor",
            "atomic_executor_error",
        )
        .await
    }

    pub async fn cancel(&self, node_run_id: &str) -> Result<(), CallError> {
        let url = format!("{}/v1/atomic-node-runs/{node_run_id}:cancel", self.base_url);
        cancel(&self.http, url, "atomic executor").await
    }

    pub async fn node_types(&self) -> Result<Vec<NodeType>, CallError> {
        list_node_types(&self.http, &self.base_url, "atomic executor").await
    }
}

/// `POST /v1/composite-node-runs:begin` and `:cancel` of a Composite Executor.
#[derive(Debug, Clone)]
pub struct CompositeExecutorClient {
    pub base_url: String,
    http: Http,
}

impl CompositeExecutorClient {
    pub fn new(base_url: String, http: Http) -> Self {
        Self { base_url, http }
    }

    pub async fn begin(
        &self,
        request: &CompositeBeginRequest,
        timeout: Duration,
    ) -> Result<CompositeBeginResponse, CallError> {
        let url = format!("{}/v1/composite-node-runs:begin", self.base_url);
        post_json(
            &self.http,
            url,
            request,
            timeout,
            "composite executor",
            "composite_executor_error",
        )
        .await
    }

    pub async fn cancel(&self, node_run_id: &str) -> Result<(), CallError> {
        let url = format!(
            "{}/v1/composite-node-runs/{node_run_id}:cancel",
            self.base_url
        );
        cancel(&self.http, url, "composite executor").await
    }

    pub async fn node_types(&self) -> Result<Vec<NodeType>, CallError> {
        list_node_types(&self.http, &self.base_url, "composite executor").await
    }
}

async fn cancel(http: &Http, url: String, service: &str) -> Result<(), CallError> {
    let resp = http
        .request(Method::POST, url, service)
        .await?
        .timeout(Duration::from_secs(10))
        .send()
        .await
        .map_err(|e| CallError::from_reqwest(e, service))?;
    if resp.status().is_success() {
        Ok(())
    } else {
        Err(CallError::from_status(resp, service, "cancel_failed").await)
    }
}

async fn list_node_types(
    http: &Http,
    base_url: &str,
    service: &str,
) -> Result<Vec<NodeType>, CallError> {
    let resp = http
        .request(Method::GET, format!("{base_url}/v1/node-types"), service)
        .await?
        .timeout(Duration::from_secs(10))
        .send()
        .await
        .map_err(|e| CallError::from_reqwest(e, service))?;
    if !resp.status().is_success() {
        return Err(CallError::from_status(resp, service, "node_types_unavailable").await);
    }
    resp.json()
        .await
        .map_err(|e| CallError::from_reqwest(e, service))
}

/// `GET /v1/node-types/{id}?version=` of a Node Registry.
#[derive(Debug, Clone)]
pub struct NodeRegistryClient {
    pub base_url: String,
    http: Http,
}

impl NodeRegistryClient {
    pub fn new(base_url: String, http: Http) -> Self {
        Self { base_url, http }
    }

    pub async fn node_type(
        &self,
        node_type_id: &str,
        version: &str,
    ) -> Result<NodeType, CallError> {
        let url = format!("{}/v1/node-types/{node_type_id}", self.base_url);
        let resp = self
            .http
            .request(Method::GET, url, "node registry")
            .await?
            .query(&[("version", version)])
            .timeout(Duration::from_secs(10))
            .send()
            .await
            .map_err(|e| CallError::from_reqwest(e, "node registry"))?;
        if !resp.status().is_success() {
            return Err(CallError::from_status(resp, "node registry", "node_type_not_found").await);
        }
        resp.json()
            .await
            .map_err(|e| CallError::from_reqwest(e, "node registry"))
    }
}

/// `POST /v1/policy:decide` of a Policy Decision Point.
#[derive(Debug, Clone)]
pub struct PdpClient {
    pub base_url: String,
    http: Http,
}

impl PdpClient {
    pub fn new(base_url: String, http: Http) -> Self {
        Self { base_url, http }
    }

    pub async fn decide(
        &self,
        request: &PolicyDecisionRequest,
    ) -> Result<PolicyDecision, CallError> {
        let url = format!("{}/v1/policy:decide", self.base_url);
        post_json(
            &self.http,
            url,
            request,
            Duration::from_secs(10),
            "pdp",
            "pdp_error",
        )
        .await
    }
}
