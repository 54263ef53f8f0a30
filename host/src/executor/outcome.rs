//! How an execution ended: every failed or canceled code is a variant of
//! [`Failure`], and every bound on what a guest sends back lives here.

use std::time::Duration;

use arp_types::core::SideEffectClass;
use arp_types::{AtomicExecuteRequest, ErrorDetail, JsonObject, NodeRunState};
use serde_json::{Value, json};

use crate::runtime::{Interrupted, InterruptedError, MemoryLimitExceeded};
use crate::world::NodeError;

/// Most validation errors reported in `details.errors`.
const MAX_REPORTED_ERRORS: usize = 16;

/// Longest code a node error may carry; longer ones are replaced.
pub const MAX_ERROR_CODE_BYTES: usize = 128;

/// The code that replaces a node error's code when it is empty.
pub const NODE_ERROR: &str = "node_error";

/// The code that replaces a node error's code when it is too long or has
/// characters outside `[a-z0-9_.]`; the original is only previewed.
pub const NODE_ERROR_INVALID_CODE: &str = "node_error_invalid_code";

/// Bytes of a rejected code shown in `details.code_preview`.
const CODE_PREVIEW_BYTES: usize = 32;

/// Bounds on what a guest's result may carry back to the caller.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OutputLimits {
    /// Outputs JSON text, in bytes; larger outputs fail `invalid_outputs`.
    pub max_output_bytes: usize,
    /// A node error's message, in bytes; longer ones are truncated.
    pub max_error_message_bytes: usize,
    /// A node error's details JSON text, in bytes; larger ones are dropped.
    pub max_error_details_bytes: usize,
}

impl Default for OutputLimits {
    fn default() -> Self {
        Self {
            max_output_bytes: 4 << 20,
            max_error_message_bytes: 64 << 10,
            max_error_details_bytes: 64 << 10,
        }
    }
}

/// The outputs of a node that succeeded, or why there are none.
pub(super) type Outcome = Result<JsonObject, Failure>;

/// Why an execution produced no outputs. Each variant is one ARP error code.
#[derive(Debug)]
pub(super) enum Failure {
    /// `unknown_node_type`
    UnknownNodeType { node_type_id: String },
    /// `unknown_node_version`
    UnknownNodeVersion {
        node_type_id: String,
        requested: String,
        available: Vec<String>,
    },
    /// `side_effect_not_allowed`: the node may change more than the
    /// caller's `gates.side_effect_class` allows.
    SideEffectGate {
        node: SideEffectClass,
        allowed: SideEffectClass,
    },
    /// `invalid_inputs`
    InvalidInputs { details: JsonObject },
    /// The node's own error, its code checked by [`Failure::into_ended`].
    Node(NodeError),
    /// `node_trapped`
    Trapped,
    /// `invalid_outputs`
    InvalidOutputs {
        message: String,
        details: Option<JsonObject>,
    },
    /// `timeout`, with the limit that applied.
    Timeout { limit: Duration },
    /// `memory_limit_exceeded`
    MemoryLimit(String),
    /// `canceled`
    Canceled,
}

impl Failure {
    pub(super) fn interrupted(why: Interrupted, limit: Duration) -> Self {
        match why {
            Interrupted::Timeout => Self::Timeout { limit },
            Interrupted::Canceled => Self::Canceled,
        }
    }

    /// Classifies an error a guest call ended with.
    pub(super) fn from_trap(error: &wasmtime::Error, node_run_id: &str, limit: Duration) -> Self {
        if let Some(InterruptedError(why)) = error.downcast_ref::<InterruptedError>() {
            return Self::interrupted(*why, limit);
        }
        if let Some(memory) = error.downcast_ref::<MemoryLimitExceeded>() {
            return Self::MemoryLimit(memory.to_string());
        }
        // The detail stays in our log: guests must not learn host internals.
        tracing::warn!(node_run_id, error = %format!("{error:#}"), "guest trapped");
        Self::Trapped
    }

    /// The terminal state and error this failure is reported as: the one
    /// place a failure becomes an `ErrorDetail`.
    pub(super) fn into_ended(self, limits: &OutputLimits) -> (NodeRunState, ErrorDetail) {
        let detail = match self {
            Self::UnknownNodeType { node_type_id } => ErrorDetail::new(
                "unknown_node_type",
                format!("Unknown node_type_id: {node_type_id}"),
            ),
            Self::UnknownNodeVersion {
                node_type_id,
                requested,
                available,
            } => ErrorDetail::new(
                "unknown_node_version",
                format!("{node_type_id} is not served at version {requested}"),
            )
            .with_details(object(
                json!({ "requested": requested, "available": available }),
            )),
            Self::SideEffectGate { node, allowed } => ErrorDetail::new(
                "side_effect_not_allowed",
                format!(
                    "the node's side effect is {}, more than the {} the request allows",
                    node.as_str(),
                    allowed.as_str()
                ),
            )
            .with_details(object(json!({
                "side_effect": node.as_str(),
                "allowed": allowed.as_str(),
            }))),
            Self::InvalidInputs { details } => ErrorDetail::new(
                "invalid_inputs",
                "inputs do not match the node's input schema",
            )
            .with_details(details),
            Self::Node(error) => node_error(error, limits),
            Self::Trapped => {
                ErrorDetail::new("node_trapped", "the node crashed (WebAssembly trap)")
            }
            Self::InvalidOutputs { message, details } => {
                let detail = ErrorDetail::new("invalid_outputs", message);
                match details {
                    Some(d) => detail.with_details(d),
                    None => detail,
                }
            }
            Self::Timeout { limit } => {
                let message = format!(
                    "execution exceeded its time limit of {} ms",
                    limit.as_millis()
                );
                let details = object(json!({ "limit_ms": limit.as_millis() as u64 }));
                ErrorDetail::new("timeout", message).with_details(details)
            }
            Self::MemoryLimit(message) => ErrorDetail::new("memory_limit_exceeded", message),
            Self::Canceled => {
                return (
                    NodeRunState::Canceled,
                    ErrorDetail::new("canceled", "execution canceled"),
                );
            }
        };
        (NodeRunState::Failed, detail)
    }
}

/// A node's own error, bounded: its code checked, message truncated, details
/// dropped when too large. Each of them is bounded by the guest's memory
/// before it gets here (wasmtime lifts the whole result out of it).
fn node_error(error: NodeError, limits: &OutputLimits) -> ErrorDetail {
    let NodeError {
        code,
        mut message,
        details,
    } = error;
    let mut extra = JsonObject::new();
    let code = if code.is_empty() {
        NODE_ERROR.to_owned()
    } else if is_valid_code(&code) {
        code
    } else {
        let preview: String = truncate(&code, CODE_PREVIEW_BYTES)
            .chars()
            .map(|c| if c.is_ascii_graphic() { c } else { '?' })
            .collect();
        extra.insert("code_preview".into(), preview.into());
        extra.insert("code_bytes".into(), code.len().into());
        NODE_ERROR_INVALID_CODE.to_owned()
    };
    if message.len() > limits.max_error_message_bytes {
        let kept = truncate(&message, limits.max_error_message_bytes).len();
        extra.insert("message_bytes".into(), message.len().into());
        message.truncate(kept);
    }
    let mut detail = ErrorDetail::new(code, message);
    let mut details = match details {
        None => None,
        Some(text) if text.len() > limits.max_error_details_bytes => {
            extra.insert("details_bytes".into(), text.len().into());
            None
        }
        Some(text) => Some(match serde_json::from_str::<Value>(&text) {
            Ok(Value::Object(map)) => map,
            // Details a node sent that are not an object are kept, wrapped.
            _ => object(json!({ "raw": text })),
        }),
    };
    if !extra.is_empty() {
        // What the executor changed, apart from what the node said.
        details
            .get_or_insert_with(JsonObject::new)
            .insert("executor".into(), Value::Object(extra));
    }
    detail.details = details;
    detail
}

/// `[a-z0-9_.]+`, at most [`MAX_ERROR_CODE_BYTES`] long.
fn is_valid_code(code: &str) -> bool {
    !code.is_empty()
        && code.len() <= MAX_ERROR_CODE_BYTES
        && code
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'.')
}

/// The longest prefix of `s` of at most `max` bytes ending at a char boundary.
fn truncate(s: &str, max: usize) -> &str {
    &s[..s.floor_char_boundary(max)]
}

/// Refuses a node whose side effect is more than the request's
/// `constraints.gates.side_effect_class` allows, before it runs.
pub(super) fn check_gates(
    node: SideEffectClass,
    request: &AtomicExecuteRequest,
) -> Result<(), Failure> {
    let allowed = request
        .constraints
        .as_ref()
        .and_then(|c| c.gates.as_ref())
        .and_then(|g| g.side_effect_class);
    match allowed {
        Some(allowed) if node > allowed => Err(Failure::SideEffectGate { node, allowed }),
        _ => Ok(()),
    }
}

/// Parses a guest's outputs: a JSON object within the size cap that matches
/// the node's output schema.
pub(super) fn check_outputs(
    schema: &jsonschema::Validator,
    text: &str,
    limits: &OutputLimits,
) -> Outcome {
    if text.len() > limits.max_output_bytes {
        return Err(Failure::InvalidOutputs {
            message: format!(
                "outputs are {} bytes, more than the limit of {} bytes",
                text.len(),
                limits.max_output_bytes
            ),
            details: Some(object(json!({
                "bytes": text.len(),
                "limit_bytes": limits.max_output_bytes,
            }))),
        });
    }
    let value: Value = serde_json::from_str(text).map_err(|e| Failure::InvalidOutputs {
        message: format!("outputs are not valid JSON: {e}"),
        details: None,
    })?;
    let Value::Object(map) = value else {
        return Err(Failure::InvalidOutputs {
            message: "outputs must be a JSON object".into(),
            details: None,
        });
    };
    // Validated as the object it is, without rebuilding a `Value` around it.
    let value = Value::Object(map);
    if !schema.is_valid(&value) {
        return Err(Failure::InvalidOutputs {
            message: "outputs do not match the node's output schema".into(),
            details: Some(schema_errors(schema, &value)),
        });
    }
    match value {
        Value::Object(map) => Ok(map),
        _ => unreachable!("matched above"),
    }
}

/// Checks inputs against the node's input schema.
pub(super) fn check_inputs(schema: &jsonschema::Validator, inputs: &Value) -> Result<(), Failure> {
    if schema.is_valid(inputs) {
        Ok(())
    } else {
        Err(Failure::InvalidInputs {
            details: schema_errors(schema, inputs),
        })
    }
}

/// `{"errors": [{"path": "/echo", "message": "..."}]}` for a failed validation.
fn schema_errors(validator: &jsonschema::Validator, instance: &Value) -> JsonObject {
    let errors: Vec<Value> = validator
        .iter_errors(instance)
        .take(MAX_REPORTED_ERRORS)
        .map(|e| json!({ "path": e.instance_path().to_string(), "message": e.to_string() }))
        .collect();
    object(json!({ "errors": errors }))
}

fn object(value: Value) -> JsonObject {
    match value {
        Value::Object(map) => map,
        _ => JsonObject::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_are_lowercase_digits_underscores_and_dots() {
        assert!(is_valid_code("not_found"));
        assert!(is_valid_code("http.status_404"));
        assert!(!is_valid_code("NotFound"));
        assert!(!is_valid_code("bad code"));
        assert!(!is_valid_code(&"a".repeat(MAX_ERROR_CODE_BYTES + 1)));
        assert!(is_valid_code(&"a".repeat(MAX_ERROR_CODE_BYTES)));
    }

    fn limits() -> OutputLimits {
        OutputLimits {
            max_output_bytes: 64,
            max_error_message_bytes: 8,
            max_error_details_bytes: 32,
        }
    }

    #[test]
    fn node_error_details_over_the_cap_are_dropped_and_said_so() {
        let error = NodeError {
            code: "bad".into(),
            message: "short".into(),
            details: Some(format!(r#"{{"blob":"{}"}}"#, "x".repeat(100))),
        };
        let detail = node_error(error, &limits());
        let details = detail.details.unwrap();
        assert_eq!(details.get("blob"), None);
        assert_eq!(details["executor"]["details_bytes"], 111);
        assert_eq!(detail.code, "bad");
    }

    #[test]
    fn node_error_within_the_caps_is_passed_on_as_is() {
        let error = NodeError {
            code: "not_found".into(),
            message: "missing".into(),
            details: Some(r#"{"id":7}"#.into()),
        };
        let detail = node_error(error, &limits());
        assert_eq!(detail.message, "missing");
        assert_eq!(detail.details.unwrap(), object(json!({"id": 7})));
    }

    #[test]
    fn node_error_message_is_truncated_at_a_char_boundary() {
        let error = NodeError {
            code: String::new(),
            message: "ééééé".into(),
            details: None,
        };
        let detail = node_error(error, &limits());
        assert_eq!(detail.code, NODE_ERROR);
        assert_eq!(detail.message, "éééé");
        assert_eq!(detail.details.unwrap()["executor"]["message_bytes"], 10);
    }

    #[test]
    fn truncation_ends_at_a_char_boundary() {
        assert_eq!(truncate("héllo", 2), "h");
        assert_eq!(truncate("héllo", 3), "hé");
        assert_eq!(truncate("abc", 10), "abc");
    }
}
