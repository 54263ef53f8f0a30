//! Who made a request: the [`Principal`] the middleware puts into request extensions, and its
//! axum extractor.

use std::convert::Infallible;
use std::sync::Arc;

use arp_types::ErrorEnvelope;
use axum::extract::{FromRequestParts, OptionalFromRequestParts};
use axum::http::StatusCode;
use axum::http::request::Parts;
use axum::response::{IntoResponse, Response};
use serde_json::{Map, Value};

/// How a principal came to be.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PrincipalKind {
    /// From a verified bearer token.
    Authenticated,
    /// No token in `optional` mode (`ARP_AUTH_ANONYMOUS_SUBJECT`).
    Anonymous,
    /// Auth is `disabled` (`ARP_AUTH_DEV_SUBJECT`).
    AuthDisabled,
}

/// The caller of a request. Cheap to clone (one `Arc`).
///
/// Extract it in a handler as `principal: Principal` (500 if the auth layer is missing, a wiring
/// bug) or `principal: Option<Principal>` (for routes that may be exempt).
#[derive(Debug, Clone)]
pub struct Principal(Arc<PrincipalInner>);

#[derive(Debug)]
struct PrincipalInner {
    sub: String,
    claims: Map<String, Value>,
    kind: PrincipalKind,
}

impl Principal {
    pub(crate) fn from_claims(sub: String, claims: Map<String, Value>) -> Self {
        Self(Arc::new(PrincipalInner {
            sub,
            claims,
            kind: PrincipalKind::Authenticated,
        }))
    }

    /// A principal with only a `sub` claim, as the reference builds for dev and anonymous.
    pub(crate) fn synthetic(sub: &str, kind: PrincipalKind) -> Self {
        let mut claims = Map::new();
        claims.insert("sub".to_owned(), Value::String(sub.to_owned()));
        Self(Arc::new(PrincipalInner {
            sub: sub.to_owned(),
            claims,
            kind,
        }))
    }

    /// The `sub` claim: what the per-execution log line records.
    pub fn sub(&self) -> &str {
        &self.0.sub
    }

    /// Every claim of the verified token (only `sub` for synthetic principals).
    pub fn claims(&self) -> &Map<String, Value> {
        &self.0.claims
    }

    pub fn kind(&self) -> PrincipalKind {
        self.0.kind
    }
}

/// A handler asked for a [`Principal`] on a route the auth layer does not cover.
#[derive(Debug, Clone, Copy)]
pub struct MissingPrincipal;

impl IntoResponse for MissingPrincipal {
    fn into_response(self) -> Response {
        tracing::error!(
            "handler needs a Principal but the auth layer is not installed on its route"
        );
        let envelope = ErrorEnvelope::new("internal_error", "Internal server error");
        crate::middleware::envelope_response(StatusCode::INTERNAL_SERVER_ERROR, &envelope)
    }
}

impl<S: Send + Sync> FromRequestParts<S> for Principal {
    type Rejection = MissingPrincipal;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
        parts
            .extensions
            .get::<Principal>()
            .cloned()
            .ok_or(MissingPrincipal)
    }
}

impl<S: Send + Sync> OptionalFromRequestParts<S> for Principal {
    type Rejection = Infallible;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Option<Self>, Self::Rejection> {
        Ok(parts.extensions.get::<Principal>().cloned())
    }
}
