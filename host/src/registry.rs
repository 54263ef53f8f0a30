//! The pack registry: loads components, asks them to describe themselves and
//! indexes their nodes by `(node_type_id, version)`.
//!
//! Loading never stops the service: a broken file is logged with its reason
//! and skipped. Packs load in the background (big components take seconds to
//! compile), so the executor serves what is ready and lookups of unknown nodes
//! wait for loading to finish rather than fail early.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use arp_types::{ConstraintEnvelope, Extensions, NodeKind, NodeType};
use bytes::Bytes;
use tokio::sync::watch;
use wasmtime::Engine;
use wasmtime::component::{Component, Linker};

use crate::grants::log::Sanitized;
use crate::packs::spec::{self, PackLimits};
use crate::runtime::{RuntimeLimits, StoreState, new_store};
use crate::world::{InvokeExport, NodePackPre, NodeSpec, PackInfo, SideEffect};

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
    #[error("{0}")]
    InvalidPack(String),
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
    /// How `GET /v1/node-types` presents the node, serialised once at load.
    catalogue_json: Box<str>,
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

/// The served nodes and the `GET /v1/node-types` body listing them, swapped
/// in together so that a request for the catalogue only bumps a refcount.
#[derive(Default)]
struct Snapshot {
    nodes: NodeIndex,
    catalogue: Bytes,
}

/// Every node the executor serves.
pub struct PackRegistry {
    engine: Engine,
    linker: Linker<StoreState>,
    limits: RuntimeLimits,
    pack_limits: PackLimits,
    index: RwLock<Arc<Snapshot>>,
    /// Held by whoever builds the next snapshot, so readers of the current one
    /// never wait for the catalogue to be rebuilt.
    writer: Mutex<()>,
    /// Pack files still loading.
    pending: watch::Sender<usize>,
    /// Files skipped, with their reasons (one entry per file).
    skipped: Mutex<Vec<(String, String)>>,
}

impl std::fmt::Debug for PackRegistry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PackRegistry")
            .field("pending", &*self.pending.borrow())
            .finish_non_exhaustive()
    }
}

impl PackRegistry {
    pub fn new(
        engine: Engine,
        limits: RuntimeLimits,
        pack_limits: PackLimits,
    ) -> anyhow::Result<Self> {
        let mut linker = Linker::new(&engine);
        crate::runtime::add_grants(&mut linker)?;
        let empty = Snapshot {
            nodes: HashMap::new(),
            catalogue: Bytes::from_static(b"[]"),
        };
        Ok(Self {
            engine,
            linker,
            limits,
            pack_limits,
            index: RwLock::new(Arc::new(empty)),
            writer: Mutex::new(()),
            pending: watch::channel(0).0,
            skipped: Mutex::new(Vec::new()),
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
                let file = path
                    .file_name()
                    .map(|n| n.to_string_lossy().into_owned())
                    .unwrap_or_default();
                match registry.load_file(&path).await {
                    Ok(nodes) => {
                        tracing::info!(file = %Sanitized(&file), nodes = ?nodes, "pack loaded")
                    }
                    Err(e) => registry.skip(file, e.to_string()),
                }
            });
        }
        count
    }

    /// Logs a skipped file and remembers why.
    fn skip(&self, file: String, reason: String) {
        tracing::error!(file = %Sanitized(&file), reason = %Sanitized(&reason), "pack skipped");
        let mut skipped = self.skipped.lock().unwrap_or_else(|e| e.into_inner());
        skipped.retain(|(f, _)| *f != file);
        skipped.push((file, reason));
    }

    /// Files skipped so far, each with the reason.
    pub fn skipped(&self) -> Vec<(String, String)> {
        self.skipped
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
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
        let Some(entries) = index.nodes.get(node_type_id) else {
            return Lookup::UnknownNode;
        };
        match entries.iter().find(|e| e.version == version) {
            Some(entry) => Lookup::Found(entry.clone()),
            None => Lookup::UnknownVersion {
                available: entries.iter().map(|e| e.version.clone()).collect(),
            },
        }
    }

    /// `GET /v1/node-types`: every served node as a JSON array, sorted by id
    /// then version, built when the served nodes last changed.
    pub fn catalogue(&self) -> Bytes {
        self.snapshot().catalogue.clone()
    }

    fn snapshot(&self) -> Arc<Snapshot> {
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
        spec::check_pack(&info, &self.pack_limits).map_err(PackLoadError::InvalidPack)?;
        let pack = Arc::new(LoadedPack {
            source: source.to_owned(),
            pack_id: info.pack_id.clone(),
            pack_version: info.pack_version.clone(),
            pre,
            invoke,
        });
        // Parsing and compiling up to megabytes of schemas is CPU work: it
        // runs where it cannot hold up the API's requests.
        let limits = self.pack_limits.clone();
        let loaded = pack.clone();
        let entries = tokio::task::spawn_blocking(move || {
            info.nodes
                .into_iter()
                .map(|spec| node_entry(&loaded, spec, &limits).map(Arc::new))
                .collect::<Result<Vec<_>, _>>()
        })
        .await
        .map_err(|e| PackLoadError::Describe(format!("checking the nodes failed: {e}")))??;
        self.insert(&pack, entries)
    }

    async fn describe(
        &self,
        pre: &NodePackPre<StoreState>,
    ) -> Result<(PackInfo, InvokeExport), PackLoadError> {
        let state = StoreState::new(
            &self.limits,
            Arc::from("<describe>"),
            Arc::from("<describe>"),
        );
        let deadline = std::time::Instant::now() + DESCRIBE_TIME_LIMIT;
        let mut store = new_store(&self.engine, state, deadline, None);
        let call = async {
            let instance = pre
                .instance_pre()
                .instantiate_async(&mut store)
                .await
                .map_err(|e| PackLoadError::Describe(format!("{e:#}")))?;
            let invoke = InvokeExport::check(&mut store, &instance)
                .map_err(|e| PackLoadError::WrongWorld(format!("{e:#}")))?;
            let info = crate::packs::load::describe(&mut store, &instance, &self.pack_limits)
                .await
                .map_err(PackLoadError::Describe)?;
            Ok::<_, PackLoadError>((info, invoke))
        };
        match tokio::time::timeout(DESCRIBE_TIME_LIMIT, call).await {
            Ok(described) => described,
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
        let _writer = self.writer.lock().unwrap_or_else(|e| e.into_inner());
        let mut index = self.snapshot().nodes.clone();
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
                tracing::info!(node = %entry.node_type_id, version = %entry.version, file = %Sanitized(&pack.source), "pack replaces the built-in node");
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
            self.skip(
                source.clone(),
                format!("declares a node also served by {}", pack.source),
            );
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
        let catalogue = catalogue(&index);
        let next = Arc::new(Snapshot {
            nodes: index,
            catalogue,
        });
        *self.index.write().unwrap_or_else(|e| e.into_inner()) = next;
        Ok(names)
    }
}

/// The JSON array of every node in `index`, sorted by id then version, joined
/// from the entries' serialised forms.
fn catalogue(index: &NodeIndex) -> Bytes {
    let mut ids: Vec<&String> = index.keys().collect();
    ids.sort();
    let entries = ids.iter().flat_map(|id| &index[*id]);
    let len = entries
        .clone()
        .map(|e| e.catalogue_json.len() + 1)
        .sum::<usize>();
    let mut body = Vec::with_capacity(len + 2);
    body.push(b'[');
    for (i, entry) in entries.enumerate() {
        if i > 0 {
            body.push(b',');
        }
        body.extend_from_slice(entry.catalogue_json.as_bytes());
    }
    body.push(b']');
    Bytes::from(body)
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

fn node_entry(
    pack: &Arc<LoadedPack>,
    spec: NodeSpec,
    limits: &PackLimits,
) -> Result<NodeEntry, PackLoadError> {
    let spec::CheckedNode { input, output } =
        spec::check_node(&spec, limits).map_err(|reason| PackLoadError::InvalidNode {
            node: spec::quote(&spec.node_type_id),
            reason,
        })?;
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
        input_schema: Some(input.value),
        output_schema: Some(output.value),
        constraints,
        evaluation: None,
        preferred_executor_types: None,
        metadata: None,
        extensions: Some(extensions),
    };
    let catalogue_json = serde_json::to_string(&node_type)
        .expect("node types serialize")
        .into_boxed_str();
    Ok(NodeEntry {
        pack: pack.clone(),
        node_type_id: Arc::from(spec.node_type_id.as_str()),
        version: spec.version,
        max_wall_time: spec
            .max_wall_time_ms
            .map(|ms| Duration::from_millis(ms.into())),
        input_schema: input.validator,
        output_schema: output.validator,
        catalogue_json,
    })
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
