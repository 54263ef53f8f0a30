//! `check`: does a component serve the `jarvis:node` world, and does what its
//! `describe` says make sense?

use std::collections::HashSet;
use std::fmt;

use wasmtime::component::{Component, Linker, Val};
use wasmtime::{Engine, Store};
use wit_parser::Resolve;

/// The contract, as the tool was built against it.
pub const NODE_PACK_WIT: &str = include_str!("../../wit/node-pack.wit");

/// Why a component is not a usable node pack.
#[derive(Debug, thiserror::Error)]
pub enum CheckError {
    #[error("not a WebAssembly component: {0:#}")]
    NotAComponent(anyhow::Error),
    #[error("does not fit the jarvis:node/node-pack world: {0:#}")]
    WrongWorld(anyhow::Error),
    #[error("`describe` failed (it must not use clock, random, timer or log): {0:#}")]
    DescribeFailed(anyhow::Error),
    #[error("`describe` returned an unusable pack: {0}")]
    BadDescription(String),
}

/// What a pack says about itself, checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PackSummary {
    pub pack_id: String,
    pub pack_version: String,
    pub nodes: Vec<NodeSummary>,
}

/// One node of a [`PackSummary`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeSummary {
    pub node_type_id: String,
    pub version: String,
    pub side_effect: String,
}

impl fmt::Display for PackSummary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}@{}", self.pack_id, self.pack_version)?;
        for node in &self.nodes {
            write!(
                f,
                "\n  {}@{} ({})",
                node.node_type_id, node.version, node.side_effect
            )?;
        }
        Ok(())
    }
}

/// Check `component` against the world, then call its `describe` and check
/// the answer.
pub fn check(component: &[u8]) -> Result<PackSummary, CheckError> {
    check_world(component)?;
    let info = call_describe(component)?;
    summarize(&info)
}

/// Type-level check: the component imports nothing the world does not offer
/// and exports what the world requires, with the same types.
fn check_world(component: &[u8]) -> Result<(), CheckError> {
    wasmparser::Validator::new()
        .validate_all(component)
        .map_err(|error| CheckError::NotAComponent(error.into()))?;
    if !wasmparser::Parser::is_component(component) {
        return Err(CheckError::NotAComponent(anyhow::anyhow!(
            "this is a core module; build it into a component with `jarvis-pack build`"
        )));
    }
    let mut resolve = Resolve::default();
    let package = resolve
        .push_str("node-pack.wit", NODE_PACK_WIT)
        .map_err(CheckError::WrongWorld)?;
    let world = resolve
        .select_world(&[package], Some("node-pack"))
        .map_err(CheckError::WrongWorld)?;
    wit_component::targets(&resolve, world, component, false).map_err(CheckError::WrongWorld)
}

/// Run `describe` with every import trapping: the WIT says it must depend on
/// neither time nor randomness, and this proves it.
fn call_describe(component: &[u8]) -> Result<Val, CheckError> {
    // One call of `describe`: compile fast rather than well (an 18 MB
    // Python component takes a fraction of the time at opt-level none).
    let mut config = wasmtime::Config::new();
    config.cranelift_opt_level(wasmtime::OptLevel::None);
    let engine =
        Engine::new(&config).map_err(|error| CheckError::NotAComponent(from_wasmtime(error)))?;
    let component = Component::new(&engine, component)
        .map_err(|error| CheckError::NotAComponent(from_wasmtime(error)))?;
    let mut linker: Linker<()> = Linker::new(&engine);
    linker
        .define_unknown_imports_as_traps(&component)
        .map_err(|error| CheckError::WrongWorld(from_wasmtime(error)))?;
    let mut store = Store::new(&engine, ());
    let instance = linker
        .instantiate(&mut store, &component)
        .map_err(|error| CheckError::DescribeFailed(from_wasmtime(error)))?;
    let describe = instance
        .get_func(&mut store, "describe")
        .ok_or_else(|| CheckError::WrongWorld(anyhow::anyhow!("no `describe` export")))?;
    let mut results = [Val::Bool(false)];
    describe
        .call(&mut store, &[], &mut results)
        .map_err(|error| CheckError::DescribeFailed(from_wasmtime(error)))?;
    let [info] = results;
    Ok(info)
}

/// wasmtime 48 has its own error type; keep its whole chain in the message.
fn from_wasmtime(error: wasmtime::Error) -> anyhow::Error {
    anyhow::anyhow!("{error:#}")
}

fn summarize(info: &Val) -> Result<PackSummary, CheckError> {
    let bad = |message: String| CheckError::BadDescription(message);
    let pack_id = string_field(info, "pack-id")?;
    let pack_version = string_field(info, "pack-version")?;
    if pack_id.is_empty() || pack_version.is_empty() {
        return Err(bad("pack-id and pack-version must not be empty".into()));
    }
    let Some(Val::List(nodes)) = field(info, "nodes") else {
        return Err(bad("no nodes list".into()));
    };
    if nodes.is_empty() {
        return Err(bad(format!("pack {pack_id} describes no nodes")));
    }
    let mut seen = HashSet::new();
    let mut summaries = Vec::with_capacity(nodes.len());
    for node in nodes {
        let node_type_id = string_field(node, "node-type-id")?;
        let version = string_field(node, "version")?;
        if node_type_id.is_empty() || version.is_empty() {
            return Err(bad("a node has an empty node-type-id or version".into()));
        }
        if !seen.insert((node_type_id.clone(), version.clone())) {
            return Err(bad(format!(
                "node {node_type_id}@{version} is described twice"
            )));
        }
        for schema in ["input-schema", "output-schema"] {
            let text = string_field(node, schema)?;
            let value: serde_json::Value = serde_json::from_str(&text)
                .map_err(|error| bad(format!("{schema} of {node_type_id} is not JSON: {error}")))?;
            if !value.is_object() {
                return Err(bad(format!(
                    "{schema} of {node_type_id} is not a JSON Schema object"
                )));
            }
            if schema == "input-schema" && value.get("type").is_some_and(|t| t != "object") {
                return Err(bad(format!(
                    "input-schema of {node_type_id} must describe an object"
                )));
            }
        }
        let side_effect = match field(node, "side-effect") {
            Some(Val::Enum(name)) => name.clone(),
            _ => return Err(bad(format!("{node_type_id} has no side-effect"))),
        };
        summaries.push(NodeSummary {
            node_type_id,
            version,
            side_effect,
        });
    }
    Ok(PackSummary {
        pack_id,
        pack_version,
        nodes: summaries,
    })
}

fn field<'a>(record: &'a Val, name: &str) -> Option<&'a Val> {
    let Val::Record(fields) = record else {
        return None;
    };
    fields
        .iter()
        .find(|(key, _)| key == name)
        .map(|(_, value)| value)
}

fn string_field(record: &Val, name: &str) -> Result<String, CheckError> {
    match field(record, name) {
        Some(Val::String(text)) => Ok(text.clone()),
        _ => Err(CheckError::BadDescription(format!(
            "field {name} is missing or not a string"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rejects_a_core_module() {
        let module = wat::parse_str("(module)").unwrap();
        assert!(matches!(check(&module), Err(CheckError::NotAComponent(_))));
    }

    #[test]
    fn rejects_a_component_of_another_world() {
        let component = wat::parse_str("(component)").unwrap();
        assert!(matches!(check(&component), Err(CheckError::WrongWorld(_))));
    }
}
