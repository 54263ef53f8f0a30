//! JWT bearer authentication for the JARVIS Rust services, compatible with the auth profiles
//! of arp-standard-server 0.3.7 (`ARP_AUTH_PROFILE`, `ARP_AUTH_MODE`, `ARP_AUTH_*`), and
//! OAuth2 client-credentials tokens for the coordinator's outbound calls (arp-auth's
//! `AuthClient`, `JARVIS_*_AUDIENCE`).
//!
//! Inbound, an [`Authenticator`] checks `Authorization: Bearer <JWT>` against keys from the
//! IdP's JWKS (cached by `kid`, refreshed on an unknown `kid` at most once per cooldown, every
//! fetch bounded by a timeout), `exp`/`nbf` with leeway, issuer, audience and an allow-list of
//! asymmetric algorithms. Rejections answer 401 with `WWW-Authenticate: Bearer error="…"` and
//! an `unauthorized` ErrorEnvelope; accepted requests carry a [`Principal`] to the handler.
//!
//! # Wiring
//!
//! Inbound (executor and coordinator), at start:
//!
//! ```no_run
//! # use axum::{Router, routing::get};
//! # fn routes() -> Router { Router::new().route("/v1/x", get(|| async { "ok" })) }
//! # fn main() -> anyhow::Result<()> {
//! let auth = jarvis_auth::Authenticator::from_env()?; // misconfiguration fails here, with what to set
//! let app: Router = routes().layer(auth.layer());     // after all `.route(...)` calls
//! # Ok(()) }
//! ```
//!
//! In a handler, `principal: jarvis_auth::Principal` (or `Option<Principal>` on exempt
//! routes) gives `principal.sub()` for the per-execution log line.
//!
//! Outbound (coordinator):
//!
//! ```no_run
//! # async fn f(http: reqwest::Client) -> anyhow::Result<()> {
//! use jarvis_auth::{OutboundAuth, TargetService};
//! let outbound = OutboundAuth::from_env()?; // once, at start
//! let mut request = http.post("http://executor/v1/atomic-node-runs:execute");
//! if let Some(value) = outbound.authorization(TargetService::AtomicExecutor).await? {
//!     request = request.header(reqwest::header::AUTHORIZATION, value);
//! }
//! # Ok(()) }
//! ```
//!
//! # Layout
//! - [`settings`]: `ARP_AUTH_*` → validated [`AuthSettings`]; profiles, modes, defaults.
//! - `discovery`: bounded JSON fetches and OIDC discovery, shared by both directions.
//! - `jwks`: the key cache by `kid` with rate-limited refresh.
//! - `token_cache`: tokens already verified, so a reused token skips the signature check.
//! - `verifier`: [`Authenticator`] and [`AuthError`] (401 reasons, challenge strings).
//! - `middleware`: [`AuthLayer`], the tower layer for axum routers, and the 401 response.
//! - `principal`: [`Principal`] and its axum extractor.
//! - `outbound`: [`OutboundAuth`] / [`TokenProvider`], client-credentials tokens per audience.

mod discovery;
mod jwks;
mod middleware;
mod outbound;
mod principal;
pub mod settings;
mod token_cache;
mod verifier;

pub use middleware::{AuthLayer, AuthService};
pub use outbound::{OutboundAuth, TargetService, TokenEndpoint, TokenError, TokenProvider};
pub use principal::{MissingPrincipal, Principal, PrincipalKind};
pub use settings::{AuthMode, AuthProfile, AuthSettings, SettingsError};
pub use verifier::{AuthError, Authenticator};
