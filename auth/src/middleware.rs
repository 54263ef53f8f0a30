//! The tower layer that puts [`Authenticator`] in front of axum routes, and the 401 response.

use std::task::{Context, Poll};

use arp_types::ErrorEnvelope;
use axum::body::Body;
use axum::extract::Request;
use axum::http::header::{AUTHORIZATION, CONTENT_TYPE, WWW_AUTHENTICATE};
use axum::http::{HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use futures_util::future::{BoxFuture, Either};
use tower::{Layer, Service};

use crate::settings::AuthMode;
use crate::verifier::{AuthError, Authenticator};

/// Layer produced by [`Authenticator::layer`].
#[derive(Clone, Debug)]
pub struct AuthLayer {
    auth: Authenticator,
}

impl AuthLayer {
    pub(crate) fn new(auth: Authenticator) -> Self {
        Self { auth }
    }
}

impl<S> Layer<S> for AuthLayer {
    type Service = AuthService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        AuthService {
            inner,
            auth: self.auth.clone(),
        }
    }
}

/// Service produced by [`AuthLayer`].
#[derive(Clone, Debug)]
pub struct AuthService<S> {
    inner: S,
    auth: Authenticator,
}

impl<S> Service<Request> for AuthService<S>
where
    S: Service<Request, Response = Response> + Clone + Send + 'static,
    S::Future: Send + 'static,
{
    type Response = Response;
    type Error = S::Error;
    // Exempt paths, `disabled` and anonymous requests go straight through without boxing, so
    // the layer costs next to nothing when no token has to be checked.
    type Future = Either<S::Future, BoxFuture<'static, Result<Response, S::Error>>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: Request) -> Self::Future {
        let auth = &self.auth.inner;
        if self.auth.is_exempt(request.uri().path()) {
            return Either::Left(self.inner.call(request));
        }
        let header = request.headers().get(AUTHORIZATION).cloned();
        match (auth.mode, &header) {
            (AuthMode::Disabled, _) => {
                request.extensions_mut().insert(auth.dev.clone());
                return Either::Left(self.inner.call(request));
            }
            (AuthMode::Required, None) => {
                let response = AuthError::MissingHeader.into_response();
                return Either::Right(Box::pin(async move { Ok(response) }));
            }
            _ => {}
        }
        // The service that was polled ready goes into the future; a clone stays behind.
        let ready = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, ready);
        let authenticator = self.auth.clone();
        Either::Right(Box::pin(async move {
            match authenticator
                .authenticate(header.as_ref().map(HeaderValue::as_bytes))
                .await
            {
                Ok(principal) => {
                    request.extensions_mut().insert(principal);
                    inner.call(request).await
                }
                Err(error) => {
                    tracing::debug!(%error, path = request.uri().path(), "request not authenticated");
                    Ok(error.into_response())
                }
            }
        }))
    }
}

impl IntoResponse for AuthError {
    fn into_response(self) -> Response {
        let envelope = ErrorEnvelope::new("unauthorized", self.client_message());
        let mut response = envelope_response(StatusCode::UNAUTHORIZED, &envelope);
        response.headers_mut().insert(
            WWW_AUTHENTICATE,
            HeaderValue::from_static(self.www_authenticate()),
        );
        response
    }
}

/// An ARP ErrorEnvelope as a JSON response.
pub(crate) fn envelope_response(status: StatusCode, envelope: &ErrorEnvelope) -> Response {
    let body = serde_json::to_vec(envelope).unwrap_or_else(|_| {
        br#"{"error":{"code":"internal_error","message":"Internal server error"}}"#.to_vec()
    });
    let mut response = Response::new(Body::from(body));
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    response
}
