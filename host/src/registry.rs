//! The pack registry: loads components, asks them to describe themselves and
//! indexes their nodes by `(node_type_id, version)`.
//!
//! Loading never stops the service: a broken file is logged with its reason
//! and skipped. Packs load in the background (big components take seconds to
//! compile), so the executor serves what is ready and lookups of unknown nodes
//! wait for loading to finish rather than fail early.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use arp_types::{ConstraintEnvelope, Extensions, JsonObject, NodeKind, NodeType};
use serde_json::Value;
use tokio::sync::watch;
use wasmtime::Engine;
use wasmtime::component::{Component, Linker};

use crate::runtime::{RuntimeLimits, StoreState, new_store};
use crate::world::{InvokeExport, NodePack, NodePackPre, NodeSpec, SideEffect};

/// Longest a pack's `describe` may run at load time.
const DESCRIBE_TIME_LIMIT: Duration = Duration::from_secs(10);

/// Name under which the built-in echo is registered.
pub const BUILTIN_SOURCE: &str = "<builtin>";

/// Why a pack file was not loaded.
#[derive(Debug, thiserror::Error)]
pub enum PackLoadError {
    #[error("cannot read the file: {0}")]
    Read(#[from] std::io::Error),
    #[error("not a valid WebAssembly component: {0}")]
    NotAComponent(String),
    #[error("does not target the jarvis:node/node-pack world: {0}")]
    WrongWorld(String),
    #[error("describe failed: {0}")]
    Describe(String),
    #[error("node {node}: {reason}")]
    InvalidNode { node: String, reason: String },
    #[error("declares {node} {version}, already served by {other}")]
    Duplicate {
        node: String,
        version: String,
        other: String,
    },
}

/// A compiled pack, ready to instantiate.
pub struct LoadedPack {
    /// File name (or [`BUILTIN_SOURCE`]) the pack came from.
    pub source: String,
    pub pack_id: String,
    pub pack_version: String,
    pub pre: NodePackPre<StoreState>,
    /// The `invoke` export, its type checked when the pack loaded.
    pub invoke: InvokeExport,
}

impl std::fmt::Debug for LoadedPack {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LoadedPack")
            .field("source", &self.source)
            .field("pack_id", &self.pack_id)
            .finish()
    }
}

/// One servable node: its pack, declared spec and compiled schemas.
#[derive(Debug)]
pub struct NodeEntry {
    pub pack: Arc<LoadedPack>,
    pub node_type_id: Arc<str>,
    pub version: String,
    pub max_wall_time: Option<Duration>,
    pub input_schema: jsonschema::Validator,
    pub output_schema: jsonschema::Validator,
    /// How `GET /v1/node-types` presents the node.
    pub node_type: NodeType,
}

/// Result of looking a node up.
#[derive(Debug)]
pub enum Lookup {
    Found(Arc<NodeEntry>),
    UnknownNode,
    /// The id is served, but not at the requested version.
    UnknownVersion {
        available: Vec<String>,
    },
}

type NodeIndex = HashMap<String, Vec<Arc<NodeEntry>>>;

/// Every node the executor serves.
pub struct PackRegistry {
    engine: Engine,
    linker: Linker<StoreState>,
    limits: RuntimeLimits,
    index: RwLock<Arc<NodeIndex>>,
    /// Pack files still loading.
    pending: watch::Sender<usize>,
}

impl std::fmt::Debug for PackRegistry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PackRegistry")
            .field("pending", &*self.pending.borrow())
            .finish_non_exhaustive()
    }
}

impl PackRegistry {
    pub fn new(engine: Engine, limits: RuntimeLimits) -> anyhow::Result<Self> {
        let mut linker = Linker::new(&engine);
        crate::runtime::add_grants(&mut linker)?;
        Ok(Self {
            engine,
            linker,
            limits,
            index: RwLock::new(Arc::new(HashMap::new())),
            pending: watch::channel(0).0,
        })
    }

    pub fn engine(&self) -> &Engine {
        &self.engine
    }

    pub fn limits(&self) -> &RuntimeLimits {
        &self.limits
    }

    /// Compiles, describes and registers one pack.
    pub async fn load_bytes(
        &self,
        source: &str,
        bytes: &[u8],
    ) -> Result<Vec<String>, PackLoadError> {
        let component = compile(&self.engine, bytes)?;
        self.register_component(source, &component).await
    }

    /// Loads one `.wasm` file; compilation runs off the async workers.
    pub async fn load_file(&self, path: &Path) -> Result<Vec<String>, PackLoadError> {
        let source = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let bytes = tokio::fs::read(path).await?;
        let engine = self.engine.clone();
        let component = tokio::task::spawn_blocking(move || compile(&engine, &bytes))
            .await
            .map_err(|e| PackLoadError::NotAComponent(format!("compiler task failed: {e}")))??;
        self.register_component(&source, &component).await
    }

    /// Starts loading every `*.wasm` in `dir` in the background, several at a
    /// time. Returns how many files were found.
    pub fn load_dir_in_background(self: &Arc<Self>, dir: &Path) -> usize {
        let files = match list_packs(dir) {
            Ok(files) => files,
            Err(e) => {
                tracing::warn!(dir = %dir.display(), error = %e, "cannot read the packs directory; serving built-ins only");
                return 0;
            }
        };
        let count = files.len();
        self.pending.send_modify(|p| *p += count);
        for path in files {
            let registry = self.clone();
            tokio::spawn(async move {
                // Counted down even if loading panics, so lookups never wait in vain.
                let _done = PendingGuard(&registry.pending);
                match registry.load_file(&path).await {
                    Ok(nodes) => {
                        tracing::info!(file = %path.display(), nodes = ?nodes, "pack loaded")
                    }
                    Err(e) => tracing::error!(file = %path.display(), reason = %e, "pack skipped"),
                }
            });
        }
        count
    }

    /// Pack files not yet loaded (or skipped).
    pub fn pending(&self) -> usize {
        *self.pending.borrow()
    }

    /// Waits until no pack is loading, or until `deadline`.
    pub async fn wait_loaded(&self, deadline: tokio::time::Instant) {
        let mut rx = self.pending.subscribe();
        let _ = tokio::time::timeout_at(deadline, rx.wait_for(|p| *p == 0)).await;
    }

    pub fn lookup(&self, node_type_id: &str, version: &str) -> Lookup {
        let index = self.snapshot();
        let Some(entries) = index.get(node_type_id) else {
            return Lookup::UnknownNode;
        };
        match entries.iter().find(|e| e.version == version) {
            Some(entry) => Lookup::Found(entry.clone()),
            None => Lookup::UnknownVersion {
                available: entries.iter().map(|e| e.version.clone()).collect(),
            },
        }
    }

    /// Every served node, sorted by id then version.
    pub fn node_types(&self) -> Vec<NodeType> {
        let index = self.snapshot();
        let mut all: Vec<NodeType> = index
            .values()
            .flatten()
            .map(|e| e.node_type.clone())
            .collect();
        all.sort_by(|a, b| (&a.node_type_id, &a.version).cmp(&(&b.node_type_id, &b.version)));
        all
    }

    fn snapshot(&self) -> Arc<NodeIndex> {
        self.index.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    async fn register_component(
        &self,
        source: &str,
        component: &Component,
    ) -> Result<Vec<String>, PackLoadError> {
        let pre = self
            .linker
            .instantiate_pre(component)
            .map_err(|e| PackLoadError::WrongWorld(format!("{e:#}")))?;
        let pre = NodePackPre::new(pre).map_err(|e| PackLoadError::WrongWorld(format!("{e:#}")))?;
        let (info, invoke) = self.describe(&pre).await?;
        let pack = Arc::new(LoadedPack {
            source: source.to_owned(),
            pack_id: info.pack_id.clone(),
            pack_version: info.pack_version.clone(),
            pre,
            invoke,
        });
        if info.pack_id.trim().is_empty() {
            return Err(PackLoadError::Describe("empty pack-id".into()));
        }
        let entries = info
            .nodes
            .into_iter()
            .map(|spec| node_entry(&pack, spec).map(Arc::new))
            .collect::<Result<Vec<_>, _>>()?;
        self.insert(&pack, entries)
    }

    async fn describe(
        &self,
        pre: &NodePackPre<StoreState>,
    ) -> Result<(crate::world::PackInfo, InvokeExport), PackLoadError> {
        let state = StoreState::new(
            &self.limits,
            Arc::from("<describe>"),
            Arc::from("<describe>"),
        );
        let deadline = std::time::Instant::now() + DESCRIBE_TIME_LIMIT;
        let mut store = new_store(&self.engine, state, deadline, None);
        let call = async {
            let instance = pre.instance_pre().instantiate_async(&mut store).await?;
            let invoke = InvokeExport::check(&mut store, &instance)?;
            let bindings = NodePack::new(&mut store, &instance)?;
            let info = bindings.call_describe(&mut store).await?;
            Ok::<_, wasmtime::Error>((info, invoke))
        };
        match tokio::time::timeout(DESCRIBE_TIME_LIMIT, call).await {
            Ok(Ok(described)) => Ok(described),
            Ok(Err(e)) => Err(PackLoadError::Describe(format!("{e:#}"))),
            Err(_) => Err(PackLoadError::Describe(format!(
                "did not return within {DESCRIBE_TIME_LIMIT:?}"
            ))),
        }
    }

    /// Adds a pack's nodes all-or-nothing. Packs replace built-ins of the same
    /// id and version; between two files, the one whose name sorts first wins
    /// whatever order they finished loading in.
    fn insert(
        &self,
        pack: &Arc<LoadedPack>,
        entries: Vec<Arc<NodeEntry>>,
    ) -> Result<Vec<String>, PackLoadError> {
        let mut guard = self.index.write().unwrap_or_else(|e| e.into_inner());
        let mut index = (**guard).clone();
        let mut evict: Vec<String> = Vec::new();
        for entry in &entries {
            let Some(existing) = index
                .get(&*entry.node_type_id)
                .and_then(|v| v.iter().find(|e| e.version == entry.version))
            else {
                continue;
            };
            let other = &existing.pack.source;
            if other == BUILTIN_SOURCE {
                tracing::info!(node = %entry.node_type_id, version = %entry.version, file = %pack.source, "pack replaces the built-in node");
            } else if *other > pack.source {
                evict.push(other.clone());
            } else {
                return Err(PackLoadError::Duplicate {
                    node: entry.node_type_id.to_string(),
                    version: entry.version.clone(),
                    other: other.clone(),
                });
            }
        }
        for source in &evict {
            tracing::error!(file = %source, reason = %format!("declares a node also served by {}", pack.source), "pack skipped");
        }
        for list in index.values_mut() {
            list.retain(|e| !evict.contains(&e.pack.source));
        }
        let mut names = Vec::with_capacity(entries.len());
        for entry in entries {
            names.push(format!("{}@{}", entry.node_type_id, entry.version));
            let list = index.entry(entry.node_type_id.to_string()).or_default();
            list.retain(|e| e.version != entry.version);
            list.push(entry);
            list.sort_by(|a, b| version_order(&a.version, &b.version));
        }
        index.retain(|_, list| !list.is_empty());
        *guard = Arc::new(index);
        Ok(names)
    }
}

struct PendingGuard<'a>(&'a watch::Sender<usize>);

impl Drop for PendingGuard<'_> {
    fn drop(&mut self) {
        self.0.send_modify(|p| *p -= 1);
    }
}

fn compile(engine: &Engine, bytes: &[u8]) -> Result<Component, PackLoadError> {
    if !bytes.starts_with(b"\0asm") {
        return Err(PackLoadError::NotAComponent(
            "missing the \\0asm header".into(),
        ));
    }
    Component::from_binary(engine, bytes)
        .map_err(|e| PackLoadError::NotAComponent(format!("{e:#}")))
}

fn list_packs(dir: &Path) -> std::io::Result<Vec<PathBuf>> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        if path.extension().is_some_and(|e| e == "wasm") && path.is_file() {
            files.push(path);
        }
    }
    files.sort();
    Ok(files)
}

fn node_entry(pack: &Arc<LoadedPack>, spec: NodeSpec) -> Result<NodeEntry, PackLoadError> {
    let invalid = |reason: String| PackLoadError::InvalidNode {
        node: spec.node_type_id.clone(),
        reason,
    };
    if spec.node_type_id.trim().is_empty() {
        return Err(PackLoadError::Describe(
            "a node has an empty node-type-id".into(),
        ));
    }
    if spec.version.trim().is_empty() {
        return Err(invalid("empty version".into()));
    }
    let input =
        parse_schema(&spec.input_schema).map_err(|e| invalid(format!("input-schema: {e}")))?;
    let output =
        parse_schema(&spec.output_schema).map_err(|e| invalid(format!("output-schema: {e}")))?;
    let input_schema = jsonschema::validator_for(&Value::Object(input.clone()))
        .map_err(|e| invalid(format!("input-schema is not a valid JSON Schema: {e}")))?;
    let output_schema = jsonschema::validator_for(&Value::Object(output.clone()))
        .map_err(|e| invalid(format!("output-schema is not a valid JSON Schema: {e}")))?;

    let side_effect = match spec.side_effect {
        SideEffect::Read => "read",
        SideEffect::Write => "write",
        SideEffect::Irreversible => "irreversible",
    };
    let mut extensions = Extensions::default();
    extensions.insert("jarvis.pack_id", pack.pack_id.clone().into());
    extensions.insert("jarvis.pack_version", pack.pack_version.clone().into());
    extensions.insert("jarvis.side_effect", side_effect.into());
    extensions.insert("jarvis.trust_tier", spec.trust_tier.clone().into());
    if let Some(egress) = &spec.egress_policy {
        extensions.insert("jarvis.egress_policy", egress.clone().into());
    }
    if !spec.tags.is_empty() {
        extensions.insert("jarvis.tags", spec.tags.clone().into());
    }
    let constraints = spec.max_wall_time_ms.map(|ms| ConstraintEnvelope {
        budgets: Some(arp_types::core::BudgetConstraints {
            max_wall_time_ms: Some(ms.into()),
            ..Default::default()
        }),
        ..Default::default()
    });
    let node_type = NodeType {
        node_type_id: spec.node_type_id.clone(),
        version: spec.version.clone(),
        kind: NodeKind::Atomic,
        description: Some(spec.description.clone()),
        input_schema: Some(input),
        output_schema: Some(output),
        constraints,
        evaluation: None,
        preferred_executor_types: None,
        metadata: None,
        extensions: Some(extensions),
    };
    Ok(NodeEntry {
        pack: pack.clone(),
        node_type_id: Arc::from(spec.node_type_id.as_str()),
        version: spec.version,
        max_wall_time: spec
            .max_wall_time_ms
            .map(|ms| Duration::from_millis(ms.into())),
        input_schema,
        output_schema,
        node_type,
    })
}

fn parse_schema(text: &str) -> Result<JsonObject, String> {
    match serde_json::from_str::<Value>(text) {
        Ok(Value::Object(map)) => Ok(map),
        Ok(_) => Err("must be a JSON object".into()),
        Err(e) => Err(format!("not JSON: {e}")),
    }
}

/// Orders versions by their dot-separated parts, numerically where both
/// parts are numbers (`2.0.0` before `10.0.0`).
fn version_order(a: &str, b: &str) -> std::cmp::Ordering {
    let mut left = a.split(['.', '-', '+']);
    let mut right = b.split(['.', '-', '+']);
    loop {
        match (left.next(), right.next()) {
            (None, None) => return std::cmp::Ordering::Equal,
            (None, Some(_)) => return std::cmp::Ordering::Less,
            (Some(_), None) => return std::cmp::Ordering::Greater,
            (Some(x), Some(y)) => {
                let order = match (x.parse::<u64>(), y.parse::<u64>()) {
                    (Ok(x), Ok(y)) => x.cmp(&y),
                    _ => x.cmp(y),
                };
                if order.is_ne() {
                    return order;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::version_order;

    #[test]
    fn versions_order_numerically() {
        let mut v = vec!["10.0.0", "2.0.0", "2.0.0-rc1", "1.9", "a"];
        v.sort_by(|a, b| version_order(a, b));
        assert_eq!(v, ["1.9", "2.0.0", "2.0.0-rc1", "10.0.0", "a"]);
    }
}
