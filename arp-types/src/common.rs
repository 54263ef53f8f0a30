//! Types every ARP service speaks: errors, health, version, extensions.

use std::fmt;

use serde::{Deserialize, Deserializer, Serialize};

use crate::JsonObject;

/// The body of every non-2xx ARP response.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ErrorEnvelope {
    pub error: ErrorDetail,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub extensions: Option<Extensions>,
}

impl ErrorEnvelope {
    pub fn new(code: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            error: ErrorDetail::new(code, message),
            extensions: None,
        }
    }
}

/// The spec's `Error`: a stable machine-readable `code` and a human message.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ErrorDetail {
    pub code: String,
    pub message: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub details: Option<JsonObject>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retryable: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cause: Option<ErrorCause>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub extensions: Option<Extensions>,
}

impl ErrorDetail {
    pub fn new(code: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            code: code.into(),
            message: message.into(),
            details: None,
            retryable: None,
            cause: None,
            extensions: None,
        }
    }

    pub fn with_details(mut self, details: JsonObject) -> Self {
        self.details = Some(details);
        self
    }

    pub fn with_retryable(mut self, retryable: bool) -> Self {
        self.retryable = Some(retryable);
        self
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ErrorCause {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub code: Option<String>,
    pub message: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub details: Option<JsonObject>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub extensions: Option<Extensions>,
}

/// Service status in health reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    Ok,
    Degraded,
    Down,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Health {
    pub status: Status,
    pub time: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub checks: Option<Vec<HealthCheck>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub extensions: Option<Extensions>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HealthCheck {
    pub name: String,
    pub status: Status,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub details: Option<JsonObject>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VersionInfo {
    pub service_name: String,
    pub service_version: String,
    pub supported_api_versions: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub build: Option<BuildInfo>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub extensions: Option<Extensions>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BuildInfo {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub commit: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub built_at: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dirty: Option<bool>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ResourceRef {
    #[serde(rename = "type")]
    pub kind: String,
    pub id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uri: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub extensions: Option<Extensions>,
}

/// Vendor extensions. Every key must be namespaced (`<org>.<key>`), as the
/// spec's pattern `^[A-Za-z0-9][A-Za-z0-9_.-]*\.[A-Za-z0-9_.-]+$` requires;
/// deserializing rejects any other key.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
#[serde(transparent)]
pub struct Extensions(JsonObject);

impl Extensions {
    /// Wraps `map` if every key is namespaced; otherwise returns the first bad key.
    pub fn new(map: JsonObject) -> Result<Self, String> {
        match map.keys().find(|k| !is_namespaced_key(k)) {
            Some(bad) => Err(bad.clone()),
            None => Ok(Self(map)),
        }
    }

    pub fn as_map(&self) -> &JsonObject {
        &self.0
    }

    pub fn into_map(self) -> JsonObject {
        self.0
    }

    pub fn get(&self, key: &str) -> Option<&serde_json::Value> {
        self.0.get(key)
    }

    /// Inserts `key`, which must be namespaced.
    ///
    /// # Panics
    /// If `key` is not namespaced: keys are written by our own code, so a bad
    /// one is a programming error.
    pub fn insert(&mut self, key: &str, value: serde_json::Value) {
        assert!(
            is_namespaced_key(key),
            "extension key {key:?} is not namespaced"
        );
        self.0.insert(key.to_owned(), value);
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl<'de> Deserialize<'de> for Extensions {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let map = JsonObject::deserialize(deserializer)?;
        Extensions::new(map).map_err(|bad| {
            serde::de::Error::custom(format_args!(
                "extension key {bad:?} is not namespaced (expected <org>.<key>)"
            ))
        })
    }
}

impl fmt::Display for Extensions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        serde_json::Value::Object(self.0.clone()).fmt(f)
    }
}

/// `^[A-Za-z0-9][A-Za-z0-9_.-]*\.[A-Za-z0-9_.-]+$`, without a regex engine.
pub fn is_namespaced_key(key: &str) -> bool {
    let bytes = key.as_bytes();
    let allowed = |b: u8| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-');
    let Some((&first, rest)) = bytes.split_first() else {
        return false;
    };
    if !first.is_ascii_alphanumeric() || !rest.iter().copied().all(allowed) {
        return false;
    }
    // A dot after the first character with at least one character after it;
    // the first such dot is the most permissive choice.
    rest.iter()
        .position(|&b| b == b'.')
        .is_some_and(|i| i + 1 < rest.len())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn namespaced_keys_follow_the_spec_pattern() {
        // Checked against the spec's regex by hand: "a.b." is "a" + "." + "b.".
        for good in [
            "jarvis.constraints",
            "a.b",
            "com.example.x-y_z",
            "a..b",
            "a.b.",
            "a..",
        ] {
            assert!(is_namespaced_key(good), "{good}");
        }
        for bad in ["", "plain", ".a", "a.", "-a.b", "a b.c", "a.b c", "a/b.c"] {
            assert!(!is_namespaced_key(bad), "{bad}");
        }
    }

    #[test]
    fn extensions_reject_unnamespaced_keys() {
        let err = serde_json::from_str::<Extensions>(r#"{"plain": 1}"#).unwrap_err();
        assert!(err.to_string().contains("plain"), "{err}");
        let ok: Extensions = serde_json::from_str(r#"{"acme.x": 1}"#).unwrap();
        assert_eq!(ok.get("acme.x"), Some(&serde_json::json!(1)));
    }

    #[test]
    fn absent_optionals_are_omitted() {
        let json = serde_json::to_string(&ErrorEnvelope::new("x", "y")).unwrap();
        assert_eq!(json, r#"{"error":{"code":"x","message":"y"}}"#);
    }
}
