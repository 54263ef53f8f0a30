//! HTTP clients for the services the coordinator calls, and how their failures are classified.

use std::time::Duration;

use arp_types::composite::{CompositeBeginRequest, CompositeBeginResponse};
use arp_types::pdp::{PolicyDecision, PolicyDecisionRequest};
use arp_types::peer::{
    PeerAtomicExecuteResult, PeerCompositeBeginResponse, PeerErrorEnvelope, PeerNodeType,
    PeerPolicyDecision,
};
use arp_types::{AtomicExecuteRequest, AtomicExecuteResult, ErrorDetail, NodeType};
use jarvis_auth::{OutboundAuth, TargetService};
use reqwest::{Method, RequestBuilder, StatusCode};
use serde::de::DeserializeOwned;

/// The largest answer read from a peer; a larger one is refused, not buffered.
const ANSWER_BYTES_MAX: usize = 64 << 20;
/// The largest node type listing read from an executor.
const LISTING_BYTES_MAX: usize = 16 << 20;
/// Node types kept from one listing; the rest are dropped with a warning.
pub const LISTING_TYPES_MAX: usize = 10_000;

/// The services the coordinator calls, named in error codes and logs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Peer {
    AtomicExecutor,
    CompositeExecutor,
    NodeRegistry,
    Pdp,
}

impl Peer {
    pub fn name(self) -> &'static str {
        match self {
            Self::AtomicExecutor => "atomic executor",
            Self::CompositeExecutor => "composite executor",
            Self::NodeRegistry => "node registry",
            Self::Pdp => "pdp",
        }
    }

    /// The code of a failure caused by an answer we cannot use.
    pub fn bad_response_code(self) -> &'static str {
        match self {
            Self::AtomicExecutor => "atomic_executor_bad_response",
            Self::CompositeExecutor => "composite_executor_bad_response",
            Self::NodeRegistry => "node_registry_bad_response",
            Self::Pdp => "pdp_bad_response",
        }
    }
}

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

    fn from_reqwest(err: reqwest::Error, peer: Peer) -> Self {
        // Connect refused, reset, timeouts and broken bodies are all worth retrying.
        Self::Transient {
            reason: format!("{}: {err}", peer.name()),
            retry_after: None,
        }
    }

    /// Classifies a non-2xx answer: overload and gateway errors are transient,
    /// anything else is the service's own verdict (its ErrorEnvelope code when it sent one).
    async fn from_status(resp: reqwest::Response, peer: Peer, fallback_code: &str) -> Self {
        let service = peer.name();
        let status = resp.status();
        let retry_after = resp
            .headers()
            .get(reqwest::header::RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<u64>().ok())
            .map(Duration::from_secs);
        let body = read_body(resp, peer, ANSWER_BYTES_MAX)
            .await
            .unwrap_or_default();
        let envelope = serde_json::from_slice::<PeerErrorEnvelope>(&body).ok();
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
            Some(envelope) => Self::Terminal(envelope.error.into()),
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
        peer: Peer,
    ) -> Result<RequestBuilder, CallError> {
        let request = self.client.request(method, url);
        match self.auth.authorization(self.target).await {
            Ok(Some(value)) => Ok(request.header(reqwest::header::AUTHORIZATION, value)),
            Ok(None) => Ok(request),
            Err(e) => Err(CallError::Transient {
                reason: format!("{}: no outbound token: {e}", peer.name()),
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
    peer: Peer,
    fallback_code: &str,
) -> Result<R, CallError> {
    let resp = http
        .request(Method::POST, url, peer)
        .await?
        .json(body)
        .timeout(timeout)
        .send()
        .await
        .map_err(|e| CallError::from_reqwest(e, peer))?;
    if !resp.status().is_success() {
        return Err(CallError::from_status(resp, peer, fallback_code).await);
    }
    read_json(resp, peer).await
}

/// An answer's body, at most `limit` bytes; a body cut short is transient.
async fn read_body(
    mut resp: reqwest::Response,
    peer: Peer,
    limit: usize,
) -> Result<Vec<u8>, CallError> {
    let mut body = Vec::new();
    while let Some(chunk) = resp
        .chunk()
        .await
        .map_err(|e| CallError::from_reqwest(e, peer))?
    {
        if body.len() + chunk.len() > limit {
            return Err(CallError::terminal(
                peer.bad_response_code(),
                format!("{} answered with more than {limit} bytes", peer.name()),
            ));
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body)
}

/// Reads a peer's answer into `T` (one of the liberal `arp_types::peer` types):
/// a body it cannot be read into fails with the peer's `*_bad_response` code,
/// and the log names the JSON path of the offending field.
async fn read_json<T: DeserializeOwned>(
    resp: reqwest::Response,
    peer: Peer,
) -> Result<T, CallError> {
    let body = read_body(resp, peer, ANSWER_BYTES_MAX).await?;
    let mut de = serde_json::Deserializer::from_slice(&body);
    serde_path_to_error::deserialize(&mut de).map_err(|err| {
        let path = err.path().to_string();
        let inner = err.into_inner();
        tracing::warn!(service = peer.name(), field = %path, error = %inner, "unusable answer");
        CallError::terminal(
            peer.bad_response_code(),
            format!(
                "{} sent an answer we cannot use: at `{path}`: {inner}",
                peer.name()
            ),
        )
    })
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
        post_json::<_, PeerAtomicExecuteResult>(
            &self.http,
            url,
            request,
            timeout,
            Peer::AtomicExecutor,
            "atomic_executor_error",
        )
        .await
        .map(Into::into)
    }

    pub async fn cancel(&self, node_run_id: &str) -> Result<(), CallError> {
        let url = format!("{}/v1/atomic-node-runs/{node_run_id}:cancel", self.base_url);
        cancel(&self.http, url, Peer::AtomicExecutor).await
    }

    pub async fn node_types(&self) -> Result<Vec<NodeType>, CallError> {
        list_node_types(&self.http, &self.base_url, Peer::AtomicExecutor).await
    }

    /// `GET /v1/health` within `timeout`: any answer below 500 means the executor
    /// is alive (one without the route answers 404); 5xx, no connection or no
    /// answer in time means it is not.
    pub async fn health(&self, timeout: Duration) -> Result<(), CallError> {
        let peer = Peer::AtomicExecutor;
        let resp = self
            .http
            .request(Method::GET, format!("{}/v1/health", self.base_url), peer)
            .await?
            .timeout(timeout)
            .send()
            .await
            .map_err(|e| CallError::from_reqwest(e, peer))?;
        if resp.status().is_server_error() {
            return Err(CallError::Transient {
                reason: format!("{} health answered {}", peer.name(), resp.status()),
                retry_after: None,
            });
        }
        Ok(())
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
        post_json::<_, PeerCompositeBeginResponse>(
            &self.http,
            url,
            request,
            timeout,
            Peer::CompositeExecutor,
            "composite_executor_error",
        )
        .await
        .map(Into::into)
    }

    pub async fn cancel(&self, node_run_id: &str) -> Result<(), CallError> {
        let url = format!(
            "{}/v1/composite-node-runs/{node_run_id}:cancel",
            self.base_url
        );
        cancel(&self.http, url, Peer::CompositeExecutor).await
    }

    pub async fn node_types(&self) -> Result<Vec<NodeType>, CallError> {
        list_node_types(&self.http, &self.base_url, Peer::CompositeExecutor).await
    }
}

async fn cancel(http: &Http, url: String, peer: Peer) -> Result<(), CallError> {
    let resp = http
        .request(Method::POST, url, peer)
        .await?
        .timeout(Duration::from_secs(10))
        .send()
        .await
        .map_err(|e| CallError::from_reqwest(e, peer))?;
    if resp.status().is_success() {
        Ok(())
    } else {
        Err(CallError::from_status(resp, peer, "cancel_failed").await)
    }
}

async fn list_node_types(
    http: &Http,
    base_url: &str,
    peer: Peer,
) -> Result<Vec<NodeType>, CallError> {
    let resp = http
        .request(Method::GET, format!("{base_url}/v1/node-types"), peer)
        .await?
        .timeout(Duration::from_secs(10))
        .send()
        .await
        .map_err(|e| CallError::from_reqwest(e, peer))?;
    if !resp.status().is_success() {
        return Err(CallError::from_status(resp, peer, "node_types_unavailable").await);
    }
    let body = read_body(resp, peer, LISTING_BYTES_MAX).await?;
    parse_listing(&body, peer).map_err(|message| {
        tracing::warn!(service = peer.name(), error = %message, "unusable node type listing");
        CallError::terminal(peer.bad_response_code(), message)
    })
}

/// A listing read liberally: an entry we cannot use is skipped (and logged with its
/// field), not the whole listing; at most [`LISTING_TYPES_MAX`] entries are kept.
fn parse_listing(body: &[u8], peer: Peer) -> Result<Vec<NodeType>, String> {
    let entries: Vec<serde_json::Value> = serde_json::from_slice(body).map_err(|err| {
        format!(
            "{} sent a node type listing we cannot use: {err}",
            peer.name()
        )
    })?;
    if entries.len() > LISTING_TYPES_MAX {
        tracing::warn!(
            service = peer.name(),
            listed = entries.len(),
            kept = LISTING_TYPES_MAX,
            "node type listing too long; the rest is ignored"
        );
    }
    let mut types = Vec::with_capacity(entries.len().min(LISTING_TYPES_MAX));
    for (i, entry) in entries.into_iter().take(LISTING_TYPES_MAX).enumerate() {
        match serde_path_to_error::deserialize::<_, PeerNodeType>(entry) {
            Ok(t) => types.push(t.into()),
            Err(err) => {
                tracing::warn!(service = peer.name(), entry = i, field = %err.path(), error = %err.inner(), "node type entry skipped");
            }
        }
    }
    Ok(types)
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
            .request(Method::GET, url, Peer::NodeRegistry)
            .await?
            .query(&[("version", version)])
            .timeout(Duration::from_secs(10))
            .send()
            .await
            .map_err(|e| CallError::from_reqwest(e, Peer::NodeRegistry))?;
        if !resp.status().is_success() {
            return Err(
                CallError::from_status(resp, Peer::NodeRegistry, "node_type_not_found").await,
            );
        }
        read_json::<PeerNodeType>(resp, Peer::NodeRegistry)
            .await
            .map(Into::into)
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
        post_json::<_, PeerPolicyDecision>(
            &self.http,
            url,
            request,
            Duration::from_secs(10),
            Peer::Pdp,
            "pdp_error",
        )
        .await
        .map(Into::into)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_listing_keeps_what_it_can_read_and_at_most_the_bound() {
        let body = serde_json::json!([
            {"node_type_id": "a", "version": "1", "kind": "atomic", "vendor": {"x": 1}},
            {"node_type_id": "b", "version": "1"},
            {"node_type_id": "c", "version": "2", "kind": "composite", "extensions": {"plain": 1}},
        ]);
        let types = parse_listing(body.to_string().as_bytes(), Peer::AtomicExecutor).unwrap();
        let ids: Vec<_> = types.iter().map(|t| t.node_type_id.as_str()).collect();
        assert_eq!(ids, ["a", "c"]);

        let many: Vec<_> = (0..LISTING_TYPES_MAX + 5)
            .map(|i| serde_json::json!({"node_type_id": format!("n{i}"), "version": "1", "kind": "atomic"}))
            .collect();
        let body = serde_json::to_vec(&many).unwrap();
        let types = parse_listing(&body, Peer::AtomicExecutor).unwrap();
        assert_eq!(types.len(), LISTING_TYPES_MAX);
        assert!(parse_listing(b"{\"not\": \"a list\"}", Peer::AtomicExecutor).is_err());
    }
}
