//! The `jarvis.core` node pack: the core nodes of arp-jarvis-atomic-nodes
//! 0.3.8 (echo, sleep, uuid4, time.now, hash.sha256) and its HTTP node
//! (web.fetch) with the same schemas, outputs and failures, as a WebAssembly
//! component.
//!
//! Where the Python nodes raise `ValueError` (or any exception), these return
//! a node error with the code the Python executor reports for it,
//! `handler_error`, and the message the exception carried. Inputs the schema
//! rejects never reach the nodes: the executor answers `invalid_inputs`.
//!
//! # Layout
//! - this file: the pack, its schemas and the five nodes.
//! - `base64`: Python's strict base64 decoding, error for error.
//! - `encoding`: the text encodings `hash.sha256` accepts, named as Python names them.
//! - `fetch`: `jarvis.web.fetch` over the host's checked wasi:http.

mod base64;
mod encoding;
mod fetch;

use std::time::Duration;

use jarvis_pack_sdk::{Context, Node, NodeError, Pack, SideEffect, Value, json};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// The version of arp-jarvis-atomic-nodes whose core nodes this pack ports.
const PACK_VERSION: &str = "0.3.8";

fn pack() -> Pack {
    Pack::new("jarvis.core", PACK_VERSION)
        .node(
            Node::new(
                "jarvis.core.echo",
                "Return the provided `echo` string (deterministic baseline node).",
            )
            .input_schema(|| closed_object(&[("echo", json!({"type": "string"}))]))
            .output_schema(|| closed_object(&[("echo", json!({"type": "string"}))]))
            .side_effect(SideEffect::Read)
            .run(echo),
        )
        .node(
            Node::new(
                "jarvis.core.sleep",
                "Sleep for a number of seconds (best-effort).",
            )
            .input_schema(|| {
                closed_object(&[
                    ("seconds", json!({"type": ["number", "null"]})),
                    ("duration_seconds", json!({"type": ["number", "null"]})),
                ])
            })
            .output_schema(|| closed_object(&[("slept_seconds", json!({"type": "number"}))]))
            .side_effect(SideEffect::Read)
            .run(sleep),
        )
        .node(
            Node::new("jarvis.core.uuid4", "Generate a UUIDv4 string.")
                .input_schema(|| closed_object(&[]))
                .output_schema(|| closed_object(&[("uuid4", json!({"type": "string"}))]))
                .side_effect(SideEffect::Read)
                .run(uuid4),
        )
        .node(
            Node::new(
                "jarvis.core.time.now",
                "Return the current UTC time in ISO-8601 format.",
            )
            .input_schema(|| closed_object(&[]))
            .output_schema(|| closed_object(&[("time", json!({"type": "string"}))]))
            .side_effect(SideEffect::Read)
            .run(time_now),
        )
        .node(
            Node::new(
                "jarvis.core.hash.sha256",
                "Compute SHA-256 for text or base64 content.",
            )
            .input_schema(|| {
                closed_object(&[
                    ("content_base64", json!({"type": ["string", "null"]})),
                    ("text", json!({"type": ["string", "null"]})),
                    ("encoding", json!({"type": ["string", "null"]})),
                ])
            })
            .output_schema(|| closed_object(&[("sha256", json!({"type": "string"}))]))
            .side_effect(SideEffect::Read)
            .run(hash_sha256),
        )
        .node(
            Node::new(
                "jarvis.web.fetch",
                "Fetch a URL over HTTP(S) and return response bytes (base64).",
            )
            .input_schema(fetch::input_schema)
            .output_schema(fetch::output_schema)
            .side_effect(SideEffect::Read)
            .egress_policy("external_http")
            .run(fetch::web_fetch),
        )
}

jarvis_pack_sdk::export_pack!(pack());

/// The reference's schema shape: an object with exactly these properties,
/// all required, listed in the reference's order.
fn closed_object(properties: &[(&str, Value)]) -> Value {
    let required: Vec<&str> = properties.iter().map(|(name, _)| *name).collect();
    let properties: serde_json::Map<String, Value> = properties
        .iter()
        .map(|(name, schema)| ((*name).to_owned(), schema.clone()))
        .collect();
    json!({
        "type": "object",
        "additionalProperties": false,
        "properties": properties,
        "required": required,
    })
}

#[derive(Deserialize, Serialize)]
struct Echo {
    echo: String,
}

fn echo(inputs: Echo, _: &Context) -> Result<Echo, NodeError> {
    Ok(inputs)
}

#[derive(Deserialize)]
struct SleepInputs {
    seconds: Option<f64>,
    duration_seconds: Option<f64>,
}

#[derive(Serialize)]
struct SleepOutputs {
    slept_seconds: f64,
}

fn sleep(inputs: SleepInputs, _: &Context) -> Result<SleepOutputs, NodeError> {
    // `seconds or duration_seconds or 0.0`, with Python's truthiness: an
    // explicit `seconds` wins even when it is zero.
    let seconds = inputs
        .seconds
        .unwrap_or_else(|| inputs.duration_seconds.filter(|d| *d != 0.0).unwrap_or(0.0));
    if seconds < 0.0 {
        return Err(NodeError::handler("seconds must be >= 0"));
    }
    if seconds != 0.0 {
        // Longer than any time limit: the host ends the call with `timeout`.
        let duration = Duration::try_from_secs_f64(seconds).unwrap_or(Duration::MAX);
        jarvis_pack_sdk::time::sleep(duration);
    }
    Ok(SleepOutputs {
        slept_seconds: seconds,
    })
}

#[derive(Deserialize)]
struct NoInputs {}

#[derive(Serialize)]
struct Uuid4 {
    uuid4: String,
}

fn uuid4(_: NoInputs, _: &Context) -> Result<Uuid4, NodeError> {
    let mut bytes = [0u8; 16];
    bytes.copy_from_slice(&jarvis_pack_sdk::random::bytes(16));
    let uuid = uuid::Builder::from_random_bytes(bytes).into_uuid();
    Ok(Uuid4 {
        uuid4: uuid.hyphenated().to_string(),
    })
}

#[derive(Serialize)]
struct TimeNow {
    time: String,
}

fn time_now(_: NoInputs, _: &Context) -> Result<TimeNow, NodeError> {
    let since_epoch = jarvis_pack_sdk::time::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_err(|_| NodeError::handler("the host clock is before 1970"))?;
    Ok(TimeNow {
        time: isoformat_utc(since_epoch)?,
    })
}

/// `datetime.now(timezone.utc).isoformat()`: microseconds, omitted when zero.
fn isoformat_utc(since_epoch: Duration) -> Result<String, NodeError> {
    let seconds = i64::try_from(since_epoch.as_secs())
        .map_err(|_| NodeError::handler("the host clock is out of range"))?;
    let at = time::OffsetDateTime::from_unix_timestamp(seconds)
        .map_err(|error| NodeError::handler(format!("the host clock is out of range: {error}")))?;
    let mut text = format!(
        "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}",
        at.year(),
        u8::from(at.month()),
        at.day(),
        at.hour(),
        at.minute(),
        at.second()
    );
    let micros = since_epoch.subsec_micros();
    if micros != 0 {
        text.push_str(&format!(".{micros:06}"));
    }
    text.push_str("+00:00");
    Ok(text)
}

#[derive(Deserialize)]
struct HashInputs {
    content_base64: Option<String>,
    text: Option<String>,
    encoding: Option<String>,
}

#[derive(Serialize)]
struct HashOutputs {
    sha256: String,
}

fn hash_sha256(inputs: HashInputs, _: &Context) -> Result<HashOutputs, NodeError> {
    let data = match (inputs.content_base64, inputs.text) {
        (None, None) => {
            return Err(NodeError::handler("Provide either content_base64 or text"));
        }
        // Like the reference, content wins over text and then the encoding
        // is never looked at.
        (Some(content), _) => base64::decode_strict(&content).map_err(|error| {
            NodeError::handler(format!("content_base64 is not valid base64: {error}"))
        })?,
        (None, Some(text)) => {
            let name = inputs
                .encoding
                .filter(|name| !name.is_empty())
                .unwrap_or_else(|| "utf-8".to_owned());
            encoding::encode(&text, &name).map_err(|error| NodeError::handler(error.to_string()))?
        }
    };
    Ok(HashOutputs {
        sha256: format!("{:x}", Sha256::digest(&data)),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn isoformat_matches_python() {
        assert_eq!(
            isoformat_utc(Duration::new(1_704_164_645, 0)).unwrap(),
            "2024-01-02T03:04:05+00:00"
        );
        assert_eq!(
            isoformat_utc(Duration::new(1_704_164_645, 120_999)).unwrap(),
            "2024-01-02T03:04:05.000120+00:00"
        );
    }

    #[test]
    fn schemas_list_every_property_as_required() {
        let schema = closed_object(&[("b", json!({})), ("a", json!({}))]);
        assert_eq!(schema["required"], json!(["b", "a"]));
        assert_eq!(schema["additionalProperties"], json!(false));
    }
}
