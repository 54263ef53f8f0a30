//! Sending one checked request: the host's own DNS lookup, the address
//! check, a connection to a checked address (TLS with rustls and the webpki
//! roots), and a response body capped in bytes and in time.
//!
//! Every wait ends at the execution's deadline: there the executor stops the
//! guest with `timeout` and drops its store, which aborts the call's tasks
//! and closes its connection. The guest's `request-options` may only shorten
//! a wait; a timeout it asks for that would end at or after the deadline sets
//! no timer of its own, so a call cut by the deadline always ends the
//! execution as `timeout`, never as a guest-visible error racing it.

use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll, ready};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use http_body_util::BodyExt;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio::time::{Instant, Sleep};
use wasmtime_wasi_http::io::TokioIo;
use wasmtime_wasi_http::{Error, RequestOptions, WasiBody};

use super::addr::classify;
use super::{IoFuture, MAX_REQUEST_BODY_BYTES, Target};
use crate::grants::file::{Reach, Scheme};
use crate::grants::log::Sanitized;

/// The bounds of one call.
#[derive(Debug, Clone, Copy)]
pub(super) struct Limits {
    pub(super) deadline: std::time::Instant,
    pub(super) max_response_bytes: u64,
}

/// Sends `request` to `target` and logs the outcome (method, destination,
/// status or error; never headers or the path, which may carry secrets).
pub(super) async fn send(
    request: http::Request<WasiBody>,
    options: Option<RequestOptions>,
    target: Target,
    limits: Limits,
    node_run_id: Arc<str>,
) -> Result<(http::Response<WasiBody>, IoFuture), Error> {
    let method = request.method().clone();
    let destination = target.describe();
    let result = connect_and_send(request, options, target, limits).await;
    match &result {
        Ok((response, _)) => tracing::debug!(
            node_run_id = %Sanitized(&node_run_id), %method, destination, status = response.status().as_u16(),
            "outbound request"
        ),
        Err(error) => tracing::debug!(
            node_run_id = %Sanitized(&node_run_id), %method, destination, %error,
            "outbound request failed"
        ),
    }
    result
}

/// When a wait of `wanted` started now must end, if before `deadline`
/// (otherwise the deadline ends it, see the module docs).
fn until(deadline: Instant, wanted: Option<Duration>) -> Option<Instant> {
    wanted
        .and_then(|d| Instant::now().checked_add(d))
        .filter(|at| *at < deadline)
}

/// `future`, failing with `timeout` at `at` if there is one.
async fn within<F: Future>(
    at: Option<Instant>,
    timeout: Error,
    future: F,
) -> Result<F::Output, Error> {
    match at {
        Some(at) => tokio::time::timeout_at(at, future)
            .await
            .map_err(|_| timeout),
        None => Ok(future.await),
    }
}

async fn connect_and_send(
    mut request: http::Request<WasiBody>,
    options: Option<RequestOptions>,
    target: Target,
    limits: Limits,
) -> Result<(http::Response<WasiBody>, IoFuture), Error> {
    let deadline = Instant::from_std(limits.deadline);
    let options = options.unwrap_or_default();
    let connected_by = until(deadline, options.connect_timeout);

    let stream = within(connected_by, Error::ConnectionTimeout, connect(&target)).await??;
    let (mut sender, conn) = within(
        connected_by,
        Error::ConnectionTimeout,
        hyper::client::conn::http1::handshake(TokioIo::new(stream)),
    )
    .await??;

    // The request goes out in origin form; Host is already set.
    let path = request
        .uri()
        .path_and_query()
        .map_or("/", |p| p.as_str())
        .to_owned();
    *request.uri_mut() = http::Uri::builder()
        .path_and_query(path)
        .build()
        .map_err(|_| Error::HttpRequestUriInvalid)?;
    let request = request.map(|body| CappedRequestBody { body, sent: 0 });

    // The connection is driven next to the request until the head arrives,
    // then handed to wasmtime-wasi-http, which drives it while the guest
    // reads the body.
    let mut conn = Box::pin(conn);
    let mut conn_done = false;
    let first_byte_by = until(deadline, options.first_byte_timeout);
    let response = {
        let send = sender.send_request(request);
        tokio::pin!(send);
        within(first_byte_by, Error::ConnectionReadTimeout, async {
            loop {
                tokio::select! {
                    biased;
                    response = &mut send => break response.map_err(Error::from),
                    done = conn.as_mut(), if !conn_done => {
                        conn_done = true;
                        done.map_err(Error::from)?;
                    }
                }
            }
        })
        .await??
    };
    let io: IoFuture = Box::new(async move {
        if !conn_done {
            conn.await.map_err(Error::from)?;
        }
        Ok(())
    });
    // A body announced larger than the cap fails here, with the error code
    // the guest can read; one that grows past it fails while it is read
    // (wasmtime-wasi-http 48 hands that error to the guest as text only).
    let announced = response
        .headers()
        .get(http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
    if announced.is_some_and(|n| n > limits.max_response_bytes) {
        return Err(Error::HttpResponseBodySize(Some(limits.max_response_bytes)));
    }
    let between = options.between_bytes_timeout;
    let response = response.map(|incoming| {
        CappedResponseBody {
            incoming,
            read: 0,
            cap: limits.max_response_bytes,
            idle: until(deadline, between).map(|at| Box::pin(tokio::time::sleep_until(at))),
            between,
            deadline,
        }
        .boxed_unsync()
    });
    Ok((response, io))
}

trait Stream: AsyncRead + AsyncWrite + Send + Sync + Unpin + 'static {}
impl<T: AsyncRead + AsyncWrite + Send + Sync + Unpin + 'static> Stream for T {}

/// Resolves the host (unless it is an address), checks every address, and
/// connects to the first checked address that answers.
async fn connect(target: &Target) -> Result<Box<dyn Stream>, Error> {
    let literal = target
        .host
        .trim_start_matches('[')
        .trim_end_matches(']')
        .parse::<IpAddr>()
        .ok();
    let addrs: Vec<SocketAddr> = match literal {
        Some(ip) => vec![SocketAddr::new(ip, target.port)],
        None => tokio::net::lookup_host((target.host.as_str(), target.port))
            .await
            .map_err(|e| Error::DnsError {
                rcode: Some(e.to_string()),
                info_code: None,
            })?
            .take(16)
            .collect(),
    };
    if addrs.is_empty() {
        return Err(Error::DestinationNotFound);
    }
    if target.reach != Reach::Explicit {
        for addr in &addrs {
            if let Some(kind) = classify(addr.ip()) {
                tracing::debug!(
                    destination = target.describe(),
                    address = %addr.ip(),
                    kind = kind.as_str(),
                    "outbound request refused: the address is not public and the grant does not name the host"
                );
                return Err(Error::DestinationIpProhibited);
            }
        }
    }
    let mut last = None;
    let mut tcp = None;
    for addr in &addrs {
        match TcpStream::connect(addr).await {
            Ok(stream) => {
                tcp = Some(stream);
                break;
            }
            Err(e) => last = Some(e),
        }
    }
    let tcp = match (tcp, last) {
        (Some(stream), _) => stream,
        (None, Some(e)) if e.kind() == std::io::ErrorKind::ConnectionRefused => {
            return Err(Error::ConnectionRefused);
        }
        (None, e) => {
            return Err(Error::Connect(
                e.unwrap_or_else(|| std::io::Error::other("no address")),
            ));
        }
    };
    let _ = tcp.set_nodelay(true);
    match target.scheme {
        Scheme::Http => Ok(Box::new(tcp)),
        Scheme::Https => {
            let name = match literal {
                Some(ip) => rustls::pki_types::ServerName::from(ip),
                None => rustls::pki_types::ServerName::try_from(target.host.clone())
                    .map_err(|_| Error::HttpRequestUriInvalid)?,
            };
            let tls = tokio_rustls::TlsConnector::from(tls_config())
                .connect(name, tcp)
                .await
                .map_err(Error::Tls)?;
            Ok(Box::new(tls))
        }
    }
}

/// One TLS client configuration for the process: ring, the webpki roots.
fn tls_config() -> Arc<rustls::ClientConfig> {
    static CONFIG: OnceLock<Arc<rustls::ClientConfig>> = OnceLock::new();
    CONFIG
        .get_or_init(|| {
            let roots = rustls::RootCertStore {
                roots: webpki_roots::TLS_SERVER_ROOTS.into(),
            };
            let config = rustls::ClientConfig::builder_with_provider(Arc::new(
                rustls::crypto::ring::default_provider(),
            ))
            .with_safe_default_protocol_versions()
            .expect("ring supports the default protocol versions")
            .with_root_certificates(roots)
            .with_no_client_auth();
            Arc::new(config)
        })
        .clone()
}

/// The guest's request body, failing past [`MAX_REQUEST_BODY_BYTES`].
struct CappedRequestBody {
    body: WasiBody,
    sent: u64,
}

impl Body for CappedRequestBody {
    type Data = Bytes;
    type Error = Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Error>>> {
        let frame = ready!(Pin::new(&mut self.body).poll_frame(cx));
        if let Some(Ok(frame)) = &frame
            && let Some(data) = frame.data_ref()
        {
            self.sent += data.len() as u64;
            if self.sent > MAX_REQUEST_BODY_BYTES {
                return Poll::Ready(Some(Err(Error::HttpRequestBodySize(Some(self.sent)))));
            }
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

/// The response body as the guest reads it: failing past the grant's
/// `max_response_bytes`, and when no bytes come for the guest's
/// between-bytes timeout (if it ends before the deadline).
struct CappedResponseBody {
    incoming: hyper::body::Incoming,
    read: u64,
    cap: u64,
    idle: Option<Pin<Box<Sleep>>>,
    between: Option<Duration>,
    deadline: Instant,
}

impl Body for CappedResponseBody {
    type Data = Bytes;
    type Error = Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Error>>> {
        match Pin::new(&mut self.incoming).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    self.read += data.len() as u64;
                    if self.read > self.cap {
                        let cap = self.cap;
                        return Poll::Ready(Some(Err(Error::HttpResponseBodySize(Some(cap)))));
                    }
                }
                let next = until(self.deadline, self.between);
                if let (Some(idle), Some(at)) = (self.idle.as_mut(), next) {
                    idle.as_mut().reset(at);
                } else {
                    self.idle = next.map(|at| Box::pin(tokio::time::sleep_until(at)));
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(error))) => Poll::Ready(Some(Err(Error::from(error)))),
            Poll::Ready(None) => Poll::Ready(None),
            Poll::Pending => match self.idle.as_mut() {
                Some(idle) => {
                    ready!(idle.as_mut().poll(cx));
                    self.idle = None;
                    Poll::Ready(Some(Err(Error::ConnectionReadTimeout)))
                }
                None => Poll::Pending,
            },
        }
    }

    fn is_end_stream(&self) -> bool {
        self.incoming.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.incoming.size_hint()
    }
}
