//! Bounded JSON fetches from the identity provider and the OIDC discovery document.

use std::time::Duration;

use reqwest::Url;
use serde::Deserialize;

use crate::settings::SettingsError;

/// Largest discovery/JWKS/token document accepted; real ones are a few KiB.
const MAX_DOCUMENT_BYTES: usize = 1 << 20;

/// The fields of `.well-known/openid-configuration` this crate uses.
#[derive(Debug, Clone, Deserialize)]
pub(crate) struct OidcDiscovery {
    pub(crate) jwks_uri: Option<String>,
    pub(crate) token_endpoint: Option<String>,
}

/// Why a document could not be had; rendered into logs, never to clients.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{url}: {reason}")]
pub(crate) struct FetchError {
    pub(crate) url: String,
    pub(crate) reason: String,
}

impl FetchError {
    fn new(url: &Url, reason: impl ToString) -> Self {
        Self {
            url: url.to_string(),
            reason: reason.to_string(),
        }
    }
}

/// One client per use, with a hard per-request deadline: a hung IdP must cost a bounded wait.
pub(crate) fn http_client(timeout: Duration) -> Result<reqwest::Client, SettingsError> {
    reqwest::Client::builder()
        .timeout(timeout)
        .connect_timeout(timeout)
        .user_agent(concat!("jarvis-auth/", env!("CARGO_PKG_VERSION")))
        .build()
        .map_err(|e| SettingsError::HttpClient(e.to_string()))
}

/// Reads a response body up to [`MAX_DOCUMENT_BYTES`].
pub(crate) async fn read_limited(
    url: &Url,
    mut response: reqwest::Response,
) -> Result<Vec<u8>, FetchError> {
    let mut body = Vec::new();
    while let Some(chunk) = response
        .chunk()
        .await
        .map_err(|e| FetchError::new(url, e))?
    {
        if body.len() + chunk.len() > MAX_DOCUMENT_BYTES {
            return Err(FetchError::new(url, "response larger than 1 MiB"));
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body)
}

/// GETs `url` and parses the JSON body as `T`.
pub(crate) async fn get_json<T: serde::de::DeserializeOwned>(
    client: &reqwest::Client,
    url: &Url,
) -> Result<T, FetchError> {
    let response = client
        .get(url.clone())
        .header(reqwest::header::ACCEPT, "application/json")
        .send()
        .await
        .map_err(|e| FetchError::new(url, error_chain(&e)))?;
    let status = response.status();
    if !status.is_success() {
        return Err(FetchError::new(url, format!("HTTP {status}")));
    }
    let body = read_limited(url, response).await?;
    serde_json::from_slice(&body).map_err(|e| FetchError::new(url, format!("bad JSON: {e}")))
}

/// Resolves an endpoint advertised by the discovery document at `discovery`.
pub(crate) async fn discover(
    client: &reqwest::Client,
    discovery: &Url,
    field: &'static str,
    pick: impl FnOnce(OidcDiscovery) -> Option<String>,
) -> Result<Url, FetchError> {
    let document: OidcDiscovery = get_json(client, discovery).await?;
    let raw = pick(document)
        .filter(|v| !v.trim().is_empty())
        .ok_or_else(|| FetchError::new(discovery, format!("discovery document missing {field}")))?;
    Url::parse(raw.trim()).map_err(|e| FetchError::new(discovery, format!("{field} {raw:?}: {e}")))
}

/// `reqwest::Error`'s Display omits the cause ("error sending request"); logs need it.
pub(crate) fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}
