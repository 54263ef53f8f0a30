//! A small blocking HTTP client over `wasi:http/outgoing-handler`: what the
//! host lets a pack reach, and nothing more.
//!
//! ```ignore
//! use std::time::Duration;
//! use jarvis_pack_sdk::http::{Error, Request};
//!
//! let response = Request::get("https://api.example.com/v1/items?limit=5")
//!     .header("accept", "application/json")
//!     .timeout(Duration::from_secs(5))
//!     .send(1 << 20)?; // read at most 1 MiB of body
//! assert_eq!(response.status, 200);
//! let items: serde_json::Value = serde_json::from_slice(&response.body)?;
//! ```
//!
//! The host checks every request when it is sent (see the grants file in the
//! executor's README): a destination not granted fails with
//! [`Error::Http`]`(`[`ErrorCode::HttpRequestDenied`]`)`, a private address
//! the grant does not name with `DestinationIpProhibited`, the call past the
//! execution's budget with `ConnectionLimitReached`, a body over the grant's
//! cap with `HttpResponseBodySize`. Redirects are returned, not followed: to
//! follow one, send a new request to its `location` (checked again).

use std::time::Duration;

use crate::bindings::wasi::http::outgoing_handler;
pub use crate::bindings::wasi::http::types::ErrorCode;
use crate::bindings::wasi::http::types::{
    self as wasi, Fields, IncomingBody, Method, OutgoingBody, OutgoingRequest, RequestOptions,
    Scheme,
};
use crate::bindings::wasi::io::streams::StreamError;

/// Bytes handed to the host per write (the most `blocking-write-and-flush`
/// takes at once).
const WRITE_CHUNK: usize = 4096;
/// Bytes asked for per read.
const READ_CHUNK: u64 = 64 << 10;

/// One outgoing request, built step by step and sent with [`Request::send`].
#[derive(Debug, Clone)]
pub struct Request {
    method: String,
    url: String,
    headers: Vec<(String, Vec<u8>)>,
    body: Option<Vec<u8>>,
    timeout: Option<Duration>,
}

/// A response whose body has been read.
#[derive(Debug, Clone)]
pub struct Response {
    pub status: u16,
    /// Header names as the host gives them (lowercase), in order, repeated
    /// names repeated.
    pub headers: Vec<(String, Vec<u8>)>,
    pub body: Vec<u8>,
}

impl Response {
    /// The values of header `name` (any case), joined with `, `, if present.
    pub fn header(&self, name: &str) -> Option<String> {
        let values: Vec<String> = self
            .headers
            .iter()
            .filter(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| String::from_utf8_lossy(v).into_owned())
            .collect();
        (!values.is_empty()).then(|| values.join(", "))
    }
}

/// Why a call failed.
#[derive(Debug, Clone)]
pub enum Error {
    /// The URL is not `http(s)://host[:port][/path][?query]`.
    InvalidUrl(String),
    /// The host refused the method.
    InvalidMethod(String),
    /// A header name or value is not valid (or the host forbids it).
    InvalidHeader(String),
    /// The host refused or failed the call: the wasi:http error code.
    Http(ErrorCode),
    /// The body is longer than the `max_bytes` given to [`Request::send`].
    TooLarge { max_bytes: u64 },
}

impl std::fmt::Display for Error {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::InvalidUrl(url) => write!(f, "invalid URL {url:?}"),
            Self::InvalidMethod(m) => write!(f, "invalid method {m:?}"),
            Self::InvalidHeader(h) => write!(f, "invalid header {h:?}"),
            Self::Http(code) => write!(f, "{}", describe(code)),
            Self::TooLarge { max_bytes } => write!(f, "response body over {max_bytes} bytes"),
        }
    }
}

impl std::error::Error for Error {}

/// A short text for a wasi:http error code.
pub fn describe(code: &ErrorCode) -> String {
    match code {
        ErrorCode::HttpRequestDenied => "the host denied the request: destination not granted or blocked".into(),
        ErrorCode::DestinationIpProhibited => "the host refused the destination: its address is not public and the grant does not name the host".into(),
        ErrorCode::ConnectionLimitReached => "the host refused the request: the execution's outbound call budget is spent".into(),
        ErrorCode::HttpResponseBodySize(Some(n)) => format!("the response body is over the granted {n} bytes"),
        ErrorCode::HttpResponseBodySize(None) => "the response body is over the granted size".into(),
        ErrorCode::HttpRequestBodySize(_) => "the request body is over the host's limit".into(),
        ErrorCode::ConnectionTimeout => "timed out connecting".into(),
        ErrorCode::ConnectionReadTimeout | ErrorCode::HttpResponseTimeout => "timed out waiting for the response".into(),
        ErrorCode::ConnectionRefused => "connection refused".into(),
        ErrorCode::DnsError(e) => format!("DNS lookup failed: {}", e.rcode.clone().unwrap_or_default()),
        ErrorCode::DestinationNotFound => "destination not found".into(),
        ErrorCode::InternalError(Some(m)) => format!("internal error: {m}"),
        other => format!("{other:?}"),
    }
}

impl Request {
    /// A request with `method` (any case; sent uppercase) to `url`.
    pub fn new(method: &str, url: &str) -> Self {
        Self {
            method: method.to_ascii_uppercase(),
            url: url.to_owned(),
            headers: Vec::new(),
            body: None,
            timeout: None,
        }
    }

    pub fn get(url: &str) -> Self {
        Self::new("GET", url)
    }

    pub fn post(url: &str) -> Self {
        Self::new("POST", url)
    }

    /// Adds a header (a repeated name is sent repeated).
    pub fn header(mut self, name: &str, value: impl Into<Vec<u8>>) -> Self {
        self.headers.push((name.to_ascii_lowercase(), value.into()));
        self
    }

    /// The request body.
    pub fn body(mut self, body: impl Into<Vec<u8>>) -> Self {
        self.body = Some(body.into());
        self
    }

    /// The longest wait to connect, for the response to start, and between
    /// two reads of its body. The host also ends every wait at the
    /// execution's deadline.
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = Some(timeout);
        self
    }

    /// Sends the request and reads the whole response body, failing with
    /// [`Error::TooLarge`] past `max_bytes`.
    pub fn send(&self, max_bytes: u64) -> Result<Response, Error> {
        let parts =
            UrlParts::parse(&self.url).ok_or_else(|| Error::InvalidUrl(self.url.clone()))?;
        let headers = Fields::from_list(&self.headers).map_err(|_| {
            let names: Vec<&str> = self.headers.iter().map(|(n, _)| n.as_str()).collect();
            Error::InvalidHeader(names.join(", "))
        })?;
        let request = OutgoingRequest::new(headers);
        request
            .set_method(&method(&self.method))
            .map_err(|()| Error::InvalidMethod(self.method.clone()))?;
        let invalid = |_| Error::InvalidUrl(self.url.clone());
        request.set_scheme(Some(&parts.scheme)).map_err(invalid)?;
        request
            .set_authority(Some(&parts.authority))
            .map_err(invalid)?;
        request
            .set_path_with_query(Some(&parts.path_with_query))
            .map_err(invalid)?;
        let body = request.body().expect("a new request's body is taken once");
        let options = self.timeout.map(|t| {
            let nanos = u64::try_from(t.as_nanos()).unwrap_or(u64::MAX);
            let options = RequestOptions::new();
            // Setting a timeout the host does not support only loses it.
            let _ = options.set_connect_timeout(Some(nanos));
            let _ = options.set_first_byte_timeout(Some(nanos));
            let _ = options.set_between_bytes_timeout(Some(nanos));
            options
        });
        let pending = outgoing_handler::handle(request, options).map_err(Error::Http)?;

        // The body goes out while the host sends the request; a refused
        // request's future holds the reason, which wins over a failed write.
        let written = write_body(&body, self.body.as_deref().unwrap_or_default());
        let finished = written.and_then(|()| OutgoingBody::finish(body, None).map_err(Error::Http));
        let response = loop {
            if let Some(result) = pending.get() {
                break result;
            }
            pending.subscribe().block();
        };
        let response = response
            .expect("the response is taken once")
            .map_err(Error::Http)?;
        finished?;

        let status = response.status();
        let headers = response.headers().entries();
        let incoming = response.consume().expect("the body is taken once");
        let body = read_body(&incoming, max_bytes)?;
        drop(incoming);
        Ok(Response {
            status,
            headers,
            body,
        })
    }
}

fn method(name: &str) -> Method {
    match name {
        "GET" => Method::Get,
        "HEAD" => Method::Head,
        "POST" => Method::Post,
        "PUT" => Method::Put,
        "DELETE" => Method::Delete,
        "CONNECT" => Method::Connect,
        "OPTIONS" => Method::Options,
        "TRACE" => Method::Trace,
        "PATCH" => Method::Patch,
        other => Method::Other(other.to_owned()),
    }
}

fn write_body(body: &OutgoingBody, bytes: &[u8]) -> Result<(), Error> {
    if bytes.is_empty() {
        return Ok(());
    }
    let stream = body.write().expect("the body's stream is taken once");
    for chunk in bytes.chunks(WRITE_CHUNK) {
        stream
            .blocking_write_and_flush(chunk)
            .map_err(|e| Error::Http(stream_error(e)))?;
    }
    Ok(())
}

fn read_body(incoming: &IncomingBody, max_bytes: u64) -> Result<Vec<u8>, Error> {
    let stream = incoming.stream().expect("the body's stream is taken once");
    let mut body = Vec::new();
    loop {
        match stream.blocking_read(READ_CHUNK) {
            Ok(chunk) => {
                body.extend_from_slice(&chunk);
                if body.len() as u64 > max_bytes {
                    return Err(Error::TooLarge { max_bytes });
                }
            }
            Err(StreamError::Closed) => return Ok(body),
            Err(e) => return Err(Error::Http(stream_error(e))),
        }
    }
}

fn stream_error(error: StreamError) -> ErrorCode {
    match error {
        StreamError::LastOperationFailed(e) => {
            wasi::http_error_code(&e).unwrap_or_else(|| error_from_text(e.to_debug_string()))
        }
        StreamError::Closed => ErrorCode::HttpResponseIncomplete,
    }
}

/// The code of a body error the host gave as text only (wasmtime-wasi-http
/// 48 does so for errors that arise while a response body is read).
fn error_from_text(text: String) -> ErrorCode {
    if text.contains("HTTP response body size exceeds limit") {
        ErrorCode::HttpResponseBodySize(None)
    } else if text.contains("connection read timeout") {
        ErrorCode::ConnectionReadTimeout
    } else {
        ErrorCode::InternalError(Some(text))
    }
}

/// `scheme://authority/path?query` split for wasi:http (the fragment dropped).
struct UrlParts {
    scheme: Scheme,
    authority: String,
    path_with_query: String,
}

impl UrlParts {
    fn parse(url: &str) -> Option<Self> {
        let (scheme, rest) = url.split_once("://")?;
        let scheme = match scheme.to_ascii_lowercase().as_str() {
            "http" => Scheme::Http,
            "https" => Scheme::Https,
            _ => return None,
        };
        let rest = rest.split('#').next().unwrap_or_default();
        let end = rest.find(['/', '?']).unwrap_or(rest.len());
        let (authority, path) = rest.split_at(end);
        // User info is not sent; the host it hides behind `@` is the host.
        let authority = authority.rsplit('@').next().unwrap_or_default();
        if authority.is_empty() {
            return None;
        }
        let path_with_query = match path {
            "" => "/".to_owned(),
            p if p.starts_with('?') => format!("/{p}"),
            p => p.to_owned(),
        };
        Some(Self {
            scheme,
            authority: authority.to_owned(),
            path_with_query,
        })
    }
}
