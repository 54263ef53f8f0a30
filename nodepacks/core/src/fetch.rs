//! `jarvis.web.fetch`: the reference's `http_nodes.web_fetch` (same schemas,
//! validation order and messages, defaults and outputs) over the host's
//! checked `wasi:http`.
//!
//! The reference reads `JARVIS_ATOMIC_HTTP_*` from its environment; here the
//! executor hands the same raw values to this pack as config values
//! (`jarvis.http.allowed_hosts`, `.blocked_hosts`, `.timeout_seconds`,
//! `.max_bytes`). An allowed entry may also be `host:port`, `*.suffix` or
//! `*`. The host enforces the same lists (and the grants file) on every
//! request, redirect hops included; this node's checks give the
//! reference's messages for the first URL.
//!
//! Where the reference's httpx raises, this returns `handler_error` with a
//! message; refusals of the host have codes of their own ([`host_error`]).

use std::time::Duration;

use ::base64::Engine as _;
use jarvis_pack_sdk::http::{self, ErrorCode, Request};
use jarvis_pack_sdk::{Context, NodeError, Value, json};
use serde::{Deserialize, Serialize};

const ALLOWED_METHODS: [&str; 7] = ["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"];
const DEFAULT_TIMEOUT: f64 = 10.0;
const DEFAULT_MAX_BYTES: i64 = 1024 * 1024;
/// httpx's `DEFAULT_MAX_REDIRECTS`.
const MAX_REDIRECTS: usize = 20;

fn key_value_schema() -> Value {
    json!({
        "type": "object",
        "additionalProperties": false,
        "properties": {"key": {"type": "string"}, "value": {"type": "string"}},
        "required": ["key", "value"],
    })
}

pub(crate) fn input_schema() -> Value {
    crate::closed_object(&[
        ("url", json!({"type": "string"})),
        ("method", json!({"type": ["string", "null"]})),
        (
            "headers",
            json!({"type": ["array", "null"], "items": key_value_schema()}),
        ),
        (
            "params",
            json!({"type": ["array", "null"], "items": key_value_schema()}),
        ),
        ("json", json!({"type": ["string", "null"]})),
        ("body", json!({"type": ["string", "null"]})),
        ("timeout_seconds", json!({"type": ["number", "null"]})),
        ("max_bytes", json!({"type": ["integer", "null"]})),
        ("follow_redirects", json!({"type": ["boolean", "null"]})),
    ])
}

pub(crate) fn output_schema() -> Value {
    crate::closed_object(&[
        ("status_code", json!({"type": "integer"})),
        (
            "headers",
            json!({"type": "array", "items": key_value_schema()}),
        ),
        ("content_type", json!({"type": ["string", "null"]})),
        ("content_base64", json!({"type": "string"})),
        ("final_url", json!({"type": "string"})),
        ("content_bytes", json!({"type": "integer"})),
    ])
}

#[derive(Deserialize, Serialize, Clone)]
pub(crate) struct KeyValue {
    key: String,
    value: String,
}

#[derive(Deserialize)]
pub(crate) struct FetchInputs {
    url: String,
    method: Option<String>,
    headers: Option<Vec<KeyValue>>,
    params: Option<Vec<KeyValue>>,
    json: Option<String>,
    body: Option<String>,
    timeout_seconds: Option<f64>,
    /// A JSON number the schema calls an integer may still be `1.0`, which
    /// the reference refuses.
    max_bytes: Option<Value>,
    follow_redirects: Option<bool>,
}

#[derive(Serialize)]
pub(crate) struct FetchOutputs {
    status_code: u16,
    headers: Vec<KeyValue>,
    content_type: Option<String>,
    content_base64: String,
    final_url: String,
    content_bytes: usize,
}

fn fail(message: &str) -> NodeError {
    NodeError::handler(message)
}

pub(crate) fn web_fetch(inputs: FetchInputs, _: &Context) -> Result<FetchOutputs, NodeError> {
    let parsed = UrlSplit::parse(&inputs.url);
    if parsed.scheme != "http" && parsed.scheme != "https" {
        return Err(fail("url scheme must be http or https"));
    }
    let Some(host) = parsed.hostname() else {
        return Err(fail("url must include a hostname"));
    };
    let port = parsed
        .port()
        .unwrap_or(if parsed.scheme == "https" { 443 } else { 80 });

    let allowed = config_csv("jarvis.http.allowed_hosts");
    if !allowed.is_empty() && !allowed.iter().any(|e| host_matches(e, &host, port, true)) {
        return Err(fail("host not allowed"));
    }
    let blocked = config_csv("jarvis.http.blocked_hosts");
    if blocked.iter().any(|e| host_matches(e, &host, port, false)) {
        return Err(fail("host blocked"));
    }

    // `inputs.get("method") or "GET"`: an empty method is GET too.
    let method = inputs
        .method
        .filter(|m| !m.is_empty())
        .unwrap_or_else(|| "GET".to_owned());
    let method = python_upper(&method);
    if !ALLOWED_METHODS.contains(&method.as_str()) {
        return Err(fail(&format!("method {method} not allowed")));
    }

    let headers = pairs_to_dict(inputs.headers.unwrap_or_default());
    let params = pairs_to_dict(inputs.params.unwrap_or_default());
    let json_payload = match &inputs.json {
        None => None,
        Some(text) => {
            Some(serde_json::from_str::<Value>(text).map_err(|_| fail("json must be valid JSON"))?)
        }
    };

    let timeout_seconds = match inputs.timeout_seconds {
        Some(t) => t,
        None => config_f64("jarvis.http.timeout_seconds")
            .filter(|t| *t != 0.0)
            .unwrap_or(DEFAULT_TIMEOUT),
    };
    let max_bytes = match inputs.max_bytes {
        None => config_i64("jarvis.http.max_bytes")
            .filter(|n| *n != 0)
            .unwrap_or(DEFAULT_MAX_BYTES),
        Some(Value::Number(n)) if n.is_i64() || n.is_u64() => n.as_i64().unwrap_or(i64::MAX),
        Some(_) => return Err(fail("max_bytes must be an integer")),
    };
    let follow_redirects = inputs.follow_redirects.unwrap_or(false);

    // httpx: `content` wins over `json`; `json` is sent compact, as
    // application/json unless the caller set a content type.
    let (body, json_type) = match (inputs.body, json_payload) {
        (Some(body), _) => (Some(body.into_bytes()), false),
        (None, Some(payload)) => (
            Some(serde_json::to_vec(&payload).expect("JSON serializes")),
            true,
        ),
        (None, None) => (None, false),
    };
    let url = with_params(&inputs.url, &params);
    let timeout = Duration::try_from_secs_f64(timeout_seconds.max(0.0)).unwrap_or(Duration::MAX);
    // A negative max_bytes fails every response, as in the reference.
    let read_limit = u64::try_from(max_bytes).unwrap_or(0);

    let mut request = Hop {
        method,
        url,
        headers,
        body,
        json_type,
    };
    let mut redirects = 0;
    let response = loop {
        let response = request.send(timeout, read_limit)?;
        if !follow_redirects {
            break response;
        }
        let location = response.header("location");
        let Some(location) = location.filter(|_| is_redirect(response.status)) else {
            break response;
        };
        if redirects == MAX_REDIRECTS {
            return Err(fail("Exceeded maximum allowed redirects."));
        }
        redirects += 1;
        request = request.redirect(response.status, &location);
    };

    if response.body.len() as i128 > i128::from(max_bytes) {
        return Err(fail("response too large"));
    }
    let mut headers: Vec<KeyValue> = Vec::new();
    for (name, value) in &response.headers {
        let value = String::from_utf8_lossy(value);
        match headers.iter_mut().find(|h| h.key == *name) {
            Some(h) => {
                h.value.push_str(", ");
                h.value.push_str(&value);
            }
            None => headers.push(KeyValue {
                key: name.to_ascii_lowercase(),
                value: value.into_owned(),
            }),
        }
    }
    headers.sort_by(|a, b| (&a.key, &a.value).cmp(&(&b.key, &b.value)));
    let content_type = headers
        .iter()
        .find(|h| h.key == "content-type")
        .map(|h| h.value.clone());
    Ok(FetchOutputs {
        status_code: response.status,
        headers,
        content_type,
        content_base64: ::base64::engine::general_purpose::STANDARD.encode(&response.body),
        final_url: request.url,
        content_bytes: response.body.len(),
    })
}

/// One request of a (possibly redirected) fetch.
struct Hop {
    method: String,
    url: String,
    headers: Vec<(String, String)>,
    body: Option<Vec<u8>>,
    json_type: bool,
}

impl Hop {
    fn send(&self, timeout: Duration, read_limit: u64) -> Result<http::Response, NodeError> {
        let mut request = Request::new(&self.method, &self.url).timeout(timeout);
        let has = |name: &str| {
            self.headers
                .iter()
                .any(|(k, _)| k.eq_ignore_ascii_case(name))
        };
        if !has("accept") {
            request = request.header("accept", "*/*");
        }
        if !has("user-agent") {
            request = request.header("user-agent", concat!("jarvis-web-fetch/", "0.3.8"));
        }
        if self.json_type && !has("content-type") {
            request = request.header("content-type", "application/json");
        }
        for (name, value) in &self.headers {
            request = request.header(name, value.as_bytes());
        }
        if let Some(body) = &self.body {
            request = request.body(body.clone());
        }
        request.send(read_limit).map_err(host_error)
    }

    /// httpx's redirect request: 303 (but HEAD), and 301/302 after POST,
    /// become GET without a body; Authorization is dropped when the origin
    /// changes.
    fn redirect(self, status: u16, location: &str) -> Self {
        let url = join_url(&self.url, location);
        let method = match (status, self.method.as_str()) {
            (303, m) if m != "HEAD" => "GET".to_owned(),
            (301 | 302, "POST") => "GET".to_owned(),
            (_, m) => m.to_owned(),
        };
        let to_get = method == "GET" && self.method != "GET";
        let same_origin = origin(&url) == origin(&self.url);
        let headers = self
            .headers
            .into_iter()
            .filter(|(k, _)| same_origin || !k.eq_ignore_ascii_case("authorization"))
            .filter(|(k, _)| {
                !to_get
                    || !(k.eq_ignore_ascii_case("content-length")
                        || k.eq_ignore_ascii_case("transfer-encoding"))
            })
            .collect();
        Self {
            method,
            url,
            headers,
            body: if to_get { None } else { self.body },
            json_type: self.json_type && !to_get,
        }
    }
}

fn is_redirect(status: u16) -> bool {
    matches!(status, 301 | 302 | 303 | 307 | 308)
}

/// The node error for a failed call: the host's refusals by code, anything
/// else `handler_error` like an exception in the reference.
fn host_error(error: http::Error) -> NodeError {
    let message = error.to_string();
    match error {
        http::Error::TooLarge { .. } => fail("response too large"),
        http::Error::Http(code) => match code {
            ErrorCode::HttpRequestDenied => NodeError::new("http_denied", message),
            ErrorCode::DestinationIpProhibited => {
                NodeError::new("http_address_not_public", message)
            }
            ErrorCode::ConnectionLimitReached => {
                NodeError::new("http_call_budget_exceeded", message)
            }
            ErrorCode::HttpResponseBodySize(_) => {
                NodeError::new("http_response_too_large", message)
            }
            ErrorCode::ConnectionTimeout
            | ErrorCode::ConnectionReadTimeout
            | ErrorCode::ConnectionWriteTimeout
            | ErrorCode::HttpResponseTimeout => NodeError::new("http_timeout", message),
            _ => fail(&message),
        },
        _ => fail(&message),
    }
}

/// `dict(...)` of the pairs: a later key replaces an earlier one in place.
fn pairs_to_dict(pairs: Vec<KeyValue>) -> Vec<(String, String)> {
    let mut dict: Vec<(String, String)> = Vec::new();
    for KeyValue { key, value } in pairs {
        match dict.iter_mut().find(|(k, _)| *k == key) {
            Some(entry) => entry.1 = value,
            None => dict.push((key, value)),
        }
    }
    dict
}

/// Python's `str.upper` for the method names that can pass: ASCII, plus
/// the characters whose uppercase is ASCII (`ı` → `I`, `ſ` → `S`).
fn python_upper(text: &str) -> String {
    text.chars().flat_map(char::to_uppercase).collect()
}

fn config_csv(key: &str) -> Vec<String> {
    jarvis_pack_sdk::config::get(key)
        .unwrap_or_default()
        .split(',')
        .map(|e| e.trim().to_lowercase())
        .filter(|e| !e.is_empty())
        .collect()
}

fn config_f64(key: &str) -> Option<f64> {
    jarvis_pack_sdk::config::get(key)?.trim().parse().ok()
}

fn config_i64(key: &str) -> Option<i64> {
    let text = jarvis_pack_sdk::config::get(key)?;
    text.trim().replace('_', "").parse().ok()
}

/// Whether list entry `entry` names `host` (lowercase, IPv6 without
/// brackets) on `port`: the host itself (the reference's rule), `host:port`,
/// and in the allowlist `*.suffix` and `*`.
fn host_matches(entry: &str, host: &str, port: u16, wildcards: bool) -> bool {
    let bracketed = if host.contains(':') {
        format!("[{host}]")
    } else {
        host.to_owned()
    };
    if entry == host || entry == bracketed || entry == format!("{bracketed}:{port}") {
        return true;
    }
    if !wildcards {
        return false;
    }
    let (pattern, entry_port) = match entry.rsplit_once(':') {
        Some((p, _)) if !p.ends_with(']') && p.contains(':') => (entry, None),
        Some((p, n)) => (p, n.parse::<u16>().ok()),
        None => (entry, None),
    };
    if entry_port.is_some_and(|p| p != port) {
        return false;
    }
    pattern == "*"
        || pattern.strip_prefix("*.").is_some_and(|suffix| {
            host.len() > suffix.len() + 1 && host.ends_with(&format!(".{suffix}"))
        })
}

/// `urllib.parse.urlsplit` of CPython 3.11, far enough for `scheme` and
/// `hostname`.
struct UrlSplit<'a> {
    scheme: String,
    netloc: &'a str,
}

impl<'a> UrlSplit<'a> {
    fn parse(url: &'a str) -> Self {
        const SCHEME_CHARS: &str =
            "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789+-.";
        let url = url.trim_start_matches(|c: char| c <= ' ');
        let mut scheme = String::new();
        let mut rest = url;
        if let Some(i) = url.find(':')
            && i > 0
            && url.as_bytes()[0].is_ascii_alphabetic()
            && url[..i].chars().all(|c| SCHEME_CHARS.contains(c))
        {
            scheme = url[..i].to_ascii_lowercase();
            rest = &url[i + 1..];
        }
        let netloc = match rest.strip_prefix("//") {
            Some(after) => {
                let end = after.find(['/', '?', '#']).unwrap_or(after.len());
                &after[..end]
            }
            None => "",
        };
        Self { scheme, netloc }
    }

    /// The host after any user info, without port or brackets, lowercased.
    fn hostname(&self) -> Option<String> {
        let host_port = self.netloc.rsplit_once('@').map_or(self.netloc, |(_, h)| h);
        let host = if let Some(inner) = host_port.strip_prefix('[') {
            inner.split(']').next().unwrap_or_default()
        } else {
            host_port.split(':').next().unwrap_or_default()
        };
        (!host.is_empty()).then(|| host.to_lowercase())
    }

    fn port(&self) -> Option<u16> {
        let host_port = self.netloc.rsplit_once('@').map_or(self.netloc, |(_, h)| h);
        let after = match host_port.strip_prefix('[') {
            Some(inner) => inner.split_once(']')?.1,
            None => host_port.find(':').map_or("", |i| &host_port[i..]),
        };
        after.strip_prefix(':')?.parse().ok()
    }
}

/// The URL with `params` merged into its query (`quote_plus` encoding, as
/// httpx writes them), its fragment dropped.
fn with_params(url: &str, params: &[(String, String)]) -> String {
    if params.is_empty() {
        return url.to_owned();
    }
    let base = url.split('#').next().unwrap_or(url);
    let encoded: Vec<String> = params
        .iter()
        .map(|(k, v)| format!("{}={}", quote_plus(k), quote_plus(v)))
        .collect();
    let separator = match base.split_once('?') {
        Some((_, "")) => "",
        Some(_) => "&",
        None => "?",
    };
    format!("{base}{separator}{}", encoded.join("&"))
}

fn quote_plus(text: &str) -> String {
    let mut out = String::new();
    for byte in text.bytes() {
        match byte {
            b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'_' | b'.' | b'-' | b'~' => {
                out.push(byte as char)
            }
            b' ' => out.push('+'),
            other => out.push_str(&format!("%{other:02X}")),
        }
    }
    out
}

/// `scheme://authority` of an absolute URL.
fn origin(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return String::new();
    };
    let end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    format!(
        "{}://{}",
        scheme.to_ascii_lowercase(),
        rest[..end].to_ascii_lowercase()
    )
}

/// `location` resolved against `base` (RFC 3986 for the forms servers send).
fn join_url(base: &str, location: &str) -> String {
    if location.contains("://") {
        return location.to_owned();
    }
    let scheme = base.split_once("://").map_or("http", |(s, _)| s);
    if let Some(rest) = location.strip_prefix("//") {
        return format!("{scheme}://{rest}");
    }
    let origin = origin(base);
    if location.starts_with('/') {
        return format!("{origin}{location}");
    }
    let path = &base[origin.len()..];
    let path = path.split(['?', '#']).next().unwrap_or("");
    if location.starts_with('?') {
        return format!("{origin}{path}{location}");
    }
    let dir = path.rsplit_once('/').map_or("", |(d, _)| d);
    format!("{origin}{dir}/{location}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urlsplit_finds_scheme_and_hostname_like_python() {
        let cases = [
            (
                "http://Example.COM:8080/x",
                "http",
                Some("example.com"),
                Some(8080),
            ),
            (
                "HTTPS://user:pw@[::1]:443/",
                "https",
                Some("::1"),
                Some(443),
            ),
            ("ftp://h/", "ftp", Some("h"), None),
            ("example.com/x", "", None, None),
            ("http:example.com", "http", None, None),
            ("http://:80/", "http", None, Some(80)),
            ("http:///path", "http", None, None),
        ];
        for (url, scheme, host, port) in cases {
            let split = UrlSplit::parse(url);
            assert_eq!(split.scheme, scheme, "{url}");
            assert_eq!(split.hostname().as_deref(), host, "{url}");
            assert_eq!(split.port(), port, "{url}");
        }
    }

    #[test]
    fn list_entries_match_host_host_port_and_wildcards() {
        assert!(host_matches("example.com", "example.com", 443, true));
        assert!(host_matches("127.0.0.1:8080", "127.0.0.1", 8080, true));
        assert!(!host_matches("127.0.0.1:8080", "127.0.0.1", 8081, true));
        assert!(host_matches("*.example.com", "a.example.com", 80, true));
        assert!(!host_matches("*.example.com", "example.com", 80, true));
        assert!(!host_matches("*.example.com", "a.example.com", 80, false));
        assert!(host_matches("*", "anything", 1, true));
        assert!(host_matches("[::1]:8080", "::1", 8080, true));
    }

    #[test]
    fn params_are_appended_with_quote_plus() {
        let params = vec![
            ("q".to_owned(), "a b&c".to_owned()),
            ("n".to_owned(), "1".to_owned()),
        ];
        assert_eq!(
            with_params("http://h/p#f", &params),
            "http://h/p?q=a+b%26c&n=1"
        );
        assert_eq!(
            with_params("http://h/p?x=1", &params),
            "http://h/p?x=1&q=a+b%26c&n=1"
        );
        assert_eq!(with_params("http://h/p", &[]), "http://h/p");
    }

    #[test]
    fn redirect_locations_resolve_against_the_request_url() {
        assert_eq!(join_url("http://h:1/a/b?q", "/c"), "http://h:1/c");
        assert_eq!(join_url("http://h:1/a/b?q", "c"), "http://h:1/a/c");
        assert_eq!(join_url("http://h:1/a/b", "//g:2/x"), "http://g:2/x");
        assert_eq!(join_url("http://h/a", "https://g/"), "https://g/");
        assert_eq!(join_url("http://h/a", "?z=1"), "http://h/a?z=1");
    }
}
