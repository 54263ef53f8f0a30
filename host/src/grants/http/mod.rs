//! Outbound HTTP for guests: `wasi:http/outgoing-handler` and the interfaces
//! it needs (`wasi:http/types`, `wasi:io`, `wasi:clocks/monotonic-clock`),
//! served by wasmtime-wasi-http, with every request checked by this host
//! before it leaves (see [`Outbound`]).
//!
//! # What a request must pass
//! 1. The execution's call budget: the call past the smaller of the grant's
//!    `max_outbound_calls` and the request's `constraints.budgets.max_external_calls`
//!    fails with `connection-limit-reached`. Every request the guest hands
//!    to the handler counts, refused ones included.
//! 2. The blocklist (`JARVIS_ATOMIC_HTTP_BLOCKED_HOSTS`), then the grants:
//!    `scheme://host:port` must match a destination granted to the node,
//!    else `HTTP-request-denied`.
//! 3. The addresses ([`send`]): the host resolves the name itself, and
//!    unless the grant names that host, every address must be public
//!    ([`addr`]), else `destination-IP-prohibited`; it connects to an
//!    address it checked, so a second lookup cannot rebind the name.
//!
//! Redirects are not followed here: a guest that follows one sends a new
//! request, which is checked again from step 1.

pub mod addr;
mod send;

use std::future::Future;
use std::sync::Arc;
use std::time::Instant;

use wasmtime::component::{Linker, ResourceTable};
use wasmtime_wasi_http::p2::bindings::http::types::ErrorCode;
use wasmtime_wasi_http::{
    Error, RequestOptions, WasiBody, WasiHttpCtx, WasiHttpCtxView, WasiHttpHooks, WasiHttpView,
};

use super::NodeGrants;
use super::file::{Reach, Scheme, normalize_host};
use super::log::Sanitized;
use crate::runtime::StoreState;

/// Request body bytes one outbound call may send: a fixed cap, since a
/// grant's `max_response_bytes` is about what comes back.
pub const MAX_REQUEST_BODY_BYTES: u64 = 16 << 20;
/// wasi resources (fields, requests, bodies, streams, pollables) one
/// execution may hold at once. One call holds about ten; the table's own
/// default (a million) would let a guest grow the host's memory by creating
/// resources in a loop, outside its linear-memory limit.
pub const MAX_RESOURCES: usize = 512;
/// Bytes one `fields` resource (a header set) may hold, as wasmtime-wasi-http
/// counts them (names, values and their in-memory overhead).
pub const MAX_FIELDS_BYTES: usize = 64 << 10;

/// HTTP's slice of store state: the guest's wasi resources (requests,
/// responses, streams) and the checks of its outbound calls. Empty until the
/// guest makes a call: an execution that makes none pays for two empty
/// structs.
pub struct HttpState {
    table: ResourceTable,
    ctx: WasiHttpCtx,
    hooks: Outbound,
}

impl std::fmt::Debug for HttpState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HttpState")
            .field("hooks", &self.hooks)
            .finish_non_exhaustive()
    }
}

impl HttpState {
    pub(crate) fn new(grants: Arc<NodeGrants>, deadline: Instant, node_run_id: Arc<str>) -> Self {
        let budget = grants.max_outbound_calls;
        let mut table = ResourceTable::new();
        table.set_max_capacity(MAX_RESOURCES);
        let mut ctx = WasiHttpCtx::new();
        ctx.set_field_size_limit(MAX_FIELDS_BYTES);
        Self {
            table,
            ctx,
            hooks: Outbound {
                grants,
                deadline,
                node_run_id,
                budget,
                made: 0,
            },
        }
    }

    /// Lowers the call budget to the request's `max_external_calls`.
    pub(crate) fn limit_calls(&mut self, max_external_calls: Option<u64>) {
        if let Some(max) = max_external_calls {
            let max = u32::try_from(max).unwrap_or(u32::MAX);
            self.hooks.budget = self.hooks.budget.min(max);
        }
    }

    /// The execution's wasi resources, shared with [`super::wasi`].
    pub(crate) fn table(&mut self) -> &mut ResourceTable {
        &mut self.table
    }

    /// Outbound calls the guest has made (refused ones included).
    pub fn calls_made(&self) -> u32 {
        self.hooks.made
    }
}

/// Adds `wasi:http`; `wasi:io` and the clocks its types use come with the
/// rest of WASI ([`super::wasi`]), over the same resource table.
pub(crate) fn add_to_linker(linker: &mut Linker<StoreState>) -> wasmtime::Result<()> {
    wasmtime_wasi_http::p2::add_only_http_to_linker_async(linker)
}

impl WasiHttpView for StoreState {
    fn http(&mut self) -> WasiHttpCtxView<'_> {
        let http = &mut self.http;
        WasiHttpCtxView {
            hooks: &mut http.hooks,
            table: &mut http.table,
            ctx: &mut http.ctx,
        }
    }
}

/// The checks of one execution's outbound calls, and the call itself.
#[derive(Debug)]
struct Outbound {
    grants: Arc<NodeGrants>,
    /// The execution's deadline: no timeout of a call goes past it.
    deadline: Instant,
    node_run_id: Arc<str>,
    /// Calls this execution may make.
    budget: u32,
    /// Calls it has made.
    made: u32,
}

/// Why a request was refused before any connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Refusal {
    Budget,
    Blocked,
    NotGranted,
    BadUri,
}

impl Refusal {
    fn reason(self) -> &'static str {
        match self {
            Self::Budget => "outbound call budget exhausted",
            Self::Blocked => "host blocked",
            Self::NotGranted => "destination not granted",
            Self::BadUri => "not an http(s) URL with a host",
        }
    }

    fn error(self) -> Error {
        match self {
            Self::Budget => Error::ConnectionLimitReached,
            Self::Blocked | Self::NotGranted => Error::HttpRequestDenied,
            Self::BadUri => Error::HttpRequestUriInvalid,
        }
    }
}

/// Where a checked request goes.
#[derive(Debug, Clone)]
struct Target {
    scheme: Scheme,
    /// Normalized by [`normalize_host`] (IPv6 in brackets).
    host: String,
    port: u16,
    reach: Reach,
}

impl Target {
    fn describe(&self) -> String {
        let scheme = match self.scheme {
            Scheme::Http => "http",
            Scheme::Https => "https",
        };
        format!("{scheme}://{}:{}", self.host, self.port)
    }
}

impl Outbound {
    fn check(&mut self, request: &http::Request<WasiBody>) -> Result<Target, Refusal> {
        self.made = self.made.saturating_add(1);
        if self.made > self.budget {
            return Err(Refusal::Budget);
        }
        let uri = request.uri();
        let scheme = uri
            .scheme_str()
            .and_then(Scheme::parse)
            .ok_or(Refusal::BadUri)?;
        let host = uri
            .host()
            .filter(|h| !h.is_empty())
            .ok_or(Refusal::BadUri)?;
        // `0x7f.1` is 127.0.0.1: the name is judged, looked up and dialled
        // in the one spelling the grants were matched in.
        let host = normalize_host(host).map_err(|_| Refusal::BadUri)?;
        let port = uri.port_u16().unwrap_or(scheme.default_port());
        if self.grants.is_blocked(&host, port) {
            return Err(Refusal::Blocked);
        }
        let reach = self
            .grants
            .destination(scheme, &host, port)
            .ok_or(Refusal::NotGranted)?;
        Ok(Target {
            scheme,
            host,
            port,
            reach,
        })
    }
}

type IoFuture = Box<dyn Future<Output = Result<(), Error>> + Send>;
type SendFuture =
    Box<dyn Future<Output = Result<(http::Response<WasiBody>, IoFuture), Error>> + Send>;

impl WasiHttpHooks for Outbound {
    fn send_request(
        &mut self,
        request: http::Request<WasiBody>,
        options: Option<RequestOptions>,
        _fut: IoFuture,
    ) -> SendFuture {
        let method = request.method().clone();
        match self.check(&request) {
            Err(refusal) => {
                let host = request.uri().host().unwrap_or("");
                tracing::debug!(
                    node_run_id = %Sanitized(&self.node_run_id),
                    %method,
                    host = %Sanitized(host),
                    refused = refusal.reason(),
                    "outbound request refused"
                );
                Box::new(std::future::ready(Err(refusal.error())))
            }
            Ok(target) => Box::new(send::send(
                request,
                options,
                target,
                send::Limits {
                    deadline: self.deadline,
                    max_response_bytes: self.grants.max_response_bytes,
                },
                self.node_run_id.clone(),
            )),
        }
    }

    fn p2_error_from_hyper(&mut self, err: &hyper::Error) -> ErrorCode {
        tracing::debug!(node_run_id = %Sanitized(&self.node_run_id), error = %err, "outbound request failed");
        ErrorCode::HttpProtocolError
    }
}
