//! Declaring a pack's nodes, and answering `describe` and `invoke` from them.

use std::borrow::Cow;
use std::fmt;
use std::time::{Duration, SystemTime};

use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::Value;

use crate::bindings::{Invocation, NodeError, NodeSpec, PackInfo, SideEffect};

type Handler = Box<dyn Fn(&str, &Context) -> Result<String, NodeError>>;
type SchemaFn = Box<dyn Fn() -> Value>;

/// Text that is usually a literal: borrowed for free, owned when built.
type Text = Cow<'static, str>;

/// A node pack: an id, a version and the nodes it serves.
pub struct Pack {
    id: Text,
    version: Text,
    nodes: Vec<Node>,
}

impl Pack {
    /// A pack with no nodes yet. Nodes inherit `version` unless they set
    /// their own.
    pub fn new(id: impl Into<Text>, version: impl Into<Text>) -> Self {
        Self {
            id: id.into(),
            version: version.into(),
            nodes: Vec::new(),
        }
    }

    /// Add a node.
    pub fn node(mut self, node: Node) -> Self {
        self.nodes.push(node);
        self
    }

    fn node_version<'a>(&'a self, node: &'a Node) -> &'a str {
        node.version.as_deref().unwrap_or(&self.version)
    }
}

impl fmt::Debug for Pack {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Pack")
            .field("id", &self.id)
            .field("version", &self.version)
            .field("nodes", &self.nodes)
            .finish()
    }
}

/// One node: what `describe` says about it and the function that runs it.
///
/// Every call runs in a fresh instance that builds the pack again, so what
/// only `describe` needs — the schemas — is given as functions and built only
/// for `describe`; `invoke` pays for the node list and nothing more.
pub struct Node {
    id: Text,
    version: Option<Text>,
    description: Text,
    input_schema: SchemaFn,
    output_schema: SchemaFn,
    side_effect: SideEffect,
    trust_tier: Text,
    egress_policy: Option<String>,
    tags: Vec<String>,
    max_wall_time_ms: Option<u32>,
    handler: Option<Handler>,
}

impl Node {
    /// A node that reads only, trusted as `first_party`, accepting any object
    /// and producing any object, until told otherwise. Set its function with
    /// [`Node::run`].
    pub fn new(id: impl Into<Text>, description: impl Into<Text>) -> Self {
        Self {
            id: id.into(),
            version: None,
            description: description.into(),
            input_schema: Box::new(|| serde_json::json!({"type": "object"})),
            output_schema: Box::new(|| serde_json::json!({"type": "object"})),
            side_effect: SideEffect::Read,
            trust_tier: Cow::Borrowed("first_party"),
            egress_policy: None,
            tags: Vec::new(),
            max_wall_time_ms: None,
            handler: None,
        }
    }

    /// This node's own version, instead of the pack's.
    pub fn version(mut self, version: impl Into<Text>) -> Self {
        self.version = Some(version.into());
        self
    }

    /// JSON Schema of the inputs object, e.g. `|| json!({...})`; the host
    /// validates against it. Called only for `describe`.
    pub fn input_schema(mut self, schema: impl Fn() -> Value + 'static) -> Self {
        self.input_schema = Box::new(schema);
        self
    }

    /// JSON Schema of the outputs object, e.g. `|| json!({...})`; the host
    /// validates against it. Called only for `describe`.
    pub fn output_schema(mut self, schema: impl Fn() -> Value + 'static) -> Self {
        self.output_schema = Box::new(schema);
        self
    }

    /// What running the node may change in the world.
    pub fn side_effect(mut self, side_effect: SideEffect) -> Self {
        self.side_effect = side_effect;
        self
    }

    /// Who vouches for this code, e.g. `first_party`, `third_party`.
    pub fn trust_tier(mut self, trust_tier: impl Into<Text>) -> Self {
        self.trust_tier = trust_tier.into();
        self
    }

    /// The network egress the node needs, in words.
    pub fn egress_policy(mut self, egress_policy: impl Into<String>) -> Self {
        self.egress_policy = Some(egress_policy.into());
        self
    }

    /// Labels for discovery.
    pub fn tags<I, S>(mut self, tags: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.tags = tags.into_iter().map(Into::into).collect();
        self
    }

    /// A wall-clock limit this node never needs more than.
    pub fn max_wall_time(mut self, limit: Duration) -> Self {
        self.max_wall_time_ms = Some(u32::try_from(limit.as_millis()).unwrap_or(u32::MAX));
        self
    }

    /// The function that runs the node. Its inputs are deserialized from the
    /// (already schema-checked) inputs object and its outputs serialized back;
    /// use [`Value`] for either to work with raw JSON.
    pub fn run<I, O, F>(mut self, handler: F) -> Self
    where
        I: DeserializeOwned,
        O: Serialize,
        F: Fn(I, &Context) -> Result<O, NodeError> + 'static,
    {
        self.handler = Some(Box::new(move |inputs, context| {
            let inputs: I = serde_json::from_str(inputs).map_err(|error| {
                NodeError::new(
                    "invalid_inputs",
                    format!("inputs do not fit the node: {error}"),
                )
            })?;
            let outputs = handler(inputs, context)?;
            serde_json::to_string(&outputs).map_err(|error| {
                NodeError::new("invalid_outputs", format!("outputs are not JSON: {error}"))
            })
        }));
        self
    }
}

impl fmt::Debug for Node {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Node")
            .field("id", &self.id)
            .field("version", &self.version)
            .finish_non_exhaustive()
    }
}

/// What a handler knows about the execution it serves.
#[derive(Debug)]
pub struct Context {
    run_id: String,
    node_run_id: String,
    trace_id: Option<String>,
    span_id: Option<String>,
    deadline: SystemTime,
}

impl Context {
    /// The ARP run this execution belongs to.
    pub fn run_id(&self) -> &str {
        &self.run_id
    }

    /// The ARP NodeRun being executed; unique per attempt.
    pub fn node_run_id(&self) -> &str {
        &self.node_run_id
    }

    /// The caller's distributed-tracing trace id, if any.
    pub fn trace_id(&self) -> Option<&str> {
        self.trace_id.as_deref()
    }

    /// The caller's distributed-tracing span id, if any.
    pub fn span_id(&self) -> Option<&str> {
        self.span_id.as_deref()
    }

    /// When the host will stop this execution.
    pub fn deadline(&self) -> SystemTime {
        self.deadline
    }

    /// Time left before the deadline (zero once it has passed).
    pub fn remaining(&self) -> Duration {
        self.deadline
            .duration_since(crate::time::now())
            .unwrap_or_default()
    }
}

/// The world's `describe`, answered from `pack`.
pub fn describe(pack: &Pack) -> PackInfo {
    PackInfo {
        pack_id: pack.id.to_string(),
        pack_version: pack.version.to_string(),
        nodes: pack
            .nodes
            .iter()
            .map(|node| NodeSpec {
                node_type_id: node.id.to_string(),
                version: pack.node_version(node).to_owned(),
                description: node.description.to_string(),
                input_schema: (node.input_schema)().to_string(),
                output_schema: (node.output_schema)().to_string(),
                side_effect: node.side_effect,
                trust_tier: node.trust_tier.to_string(),
                egress_policy: node.egress_policy.clone(),
                tags: node.tags.clone(),
                max_wall_time_ms: node.max_wall_time_ms,
            })
            .collect(),
    }
}

/// The world's `invoke`: find the node `call` names and run it.
pub fn invoke(pack: &Pack, call: Invocation) -> Result<String, NodeError> {
    let node = pack
        .nodes
        .iter()
        .find(|node| node.id == call.node_type_id && pack.node_version(node) == call.version)
        .ok_or_else(|| {
            NodeError::new(
                "unknown_node_type",
                format!(
                    "pack {} has no node {}@{}",
                    pack.id, call.node_type_id, call.version
                ),
            )
        })?;
    let handler = node.handler.as_ref().ok_or_else(|| {
        NodeError::new(
            "not_implemented",
            format!("node {} declares no function to run", node.id),
        )
    })?;
    let context = Context {
        run_id: call.run_id,
        node_run_id: call.node_run_id,
        trace_id: call.trace_id,
        span_id: call.span_id,
        deadline: SystemTime::UNIX_EPOCH + Duration::from_millis(call.deadline_unix_ms),
    };
    handler(&call.inputs, &context)
}
