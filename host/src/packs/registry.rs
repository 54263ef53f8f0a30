//! The pack registry: every loaded pack by source, and the node index built from them.
//!
//! Loading never stops the service: a broken file is recorded with its reason
//! and the previous version of that file, if any, keeps serving. Packs load
//! in the background (big components take seconds to compile), so the
//! executor serves what is ready and lookups of unknown nodes wait for
//! loading to finish rather than fail early. Each change swaps in a whole new
//! index: a request sees the old packs or the new ones, never a mix, and an
//! execution holds its entry (and pack) until it finishes.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use arp_types::core::SideEffectClass;
use arp_types::{ConstraintEnvelope, Extensions, NodeKind, NodeType};
use bytes::Bytes;
use sha2::{Digest, Sha256};
use tokio::sync::watch;
use wasmtime::Engine;
use wasmtime::component::Component;

use super::index::{IndexEntry, IndexedPack, NodeIndex};
use super::needs::{self, DeclaredNeeds, Needs, NotServed};
use super::spec::{self, PackLimits};
use crate::grants::file::to_hex;
use crate::grants::log::Sanitized;
use crate::grants::{Grants, NodeGrants};
use crate::metrics::{Metrics, NodeLabels};
use crate::runtime::{Runtime, RuntimeLimits, Sandbox, StoreState};
use crate::world::{
    InvokeExport, NEEDS_INTERFACE, NeedsExport, NodeNeeds, NodePackPre, NodeSpec, PackInfo,
    SideEffect,
};

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
    #[error("needs: {0}")]
    InvalidNeeds(String),
    #[error("pack {pack_id}: the file's sha256 is {actual}, the grants file pins {pinned}")]
    PinMismatch {
        pack_id: String,
        actual: String,
        pinned: String,
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
    /// What running the node may change, checked against the caller's gate.
    pub side_effect: SideEffectClass,
    pub input_schema: jsonschema::Validator,
    pub output_schema: jsonschema::Validator,
    /// What the operator grants this node (nothing unless the grants file
    /// names its pack).
    pub grants: Arc<NodeGrants>,
    /// What the node declares it needs (all of it granted, or it would not
    /// be served).
    pub needs: Needs,
    /// How `GET /v1/node-types` presents the node, serialised once at load.
    catalogue_json: Box<str>,
    /// The node's labels in the executor's metrics, built once at load.
    pub(crate) metric_labels: NodeLabels,
    /// Whether the node's last call that ran to its end, or past its first
    /// slice, ran past it: its next call then starts on the long-call
    /// threads (see `runtime::GuestRuntime`).
    pub(crate) runs_long: Arc<AtomicBool>,
}

impl NodeEntry {
    /// The node as `GET /v1/node-types` lists it.
    pub fn node_type(&self) -> NodeType {
        serde_json::from_str(&self.catalogue_json).expect("serialised from a NodeType")
    }
}

/// A pack and the nodes it declares, as loaded from one source.
#[derive(Debug)]
pub struct Loaded {
    pub pack: Arc<LoadedPack>,
    /// The nodes served.
    pub nodes: Vec<Arc<NodeEntry>>,
    /// The nodes the pack describes whose needs are not all granted.
    pub not_served: Vec<NotServed>,
    /// SHA-256 of the bytes the pack was compiled from, so an unchanged file
    /// is not loaded again.
    pub hash: [u8; 32],
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

impl IndexEntry for Arc<NodeEntry> {
    fn node_type_id(&self) -> &str {
        &self.node_type_id
    }
    fn version(&self) -> &str {
        &self.version
    }
}

/// The served nodes and the `GET /v1/node-types` body listing them, swapped
/// in together so that a request for the catalogue only bumps a refcount.
struct Snapshot {
    nodes: NodeIndex<Arc<NodeEntry>>,
    catalogue: Bytes,
}

/// Every pack loaded, shadowed ones included, and every file that failed.
#[derive(Default)]
struct Sources {
    packs: BTreeMap<String, Arc<Loaded>>,
    /// Files whose latest version failed to load, with the reason. A file
    /// listed here may still serve its previous good version from `packs`.
    failed: BTreeMap<String, String>,
}

/// Every node the executor serves.
pub struct PackRegistry {
    runtime: Runtime,
    pack_limits: PackLimits,
    grants: Arc<Grants>,
    index: RwLock<Arc<Snapshot>>,
    /// Held by whoever changes the sources and builds the next snapshot, so
    /// readers of the current one never wait for the catalogue to be rebuilt.
    sources: Mutex<Sources>,
    /// Pack files being loaded.
    pending: watch::Sender<usize>,
    metrics: Arc<Metrics>,
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
        grants: Arc<Grants>,
        metrics: Arc<Metrics>,
    ) -> anyhow::Result<Self> {
        let runtime = Runtime::new(engine, limits)?;
        let empty = Snapshot {
            nodes: NodeIndex::default(),
            catalogue: Bytes::from_static(b"[]"),
        };
        Ok(Self {
            runtime,
            pack_limits,
            grants,
            index: RwLock::new(Arc::new(empty)),
            sources: Mutex::new(Sources::default()),
            pending: watch::channel(0).0,
            metrics,
        })
    }

    /// The engine, linker and limits every pack runs with.
    pub fn runtime(&self) -> &Runtime {
        &self.runtime
    }

    pub(crate) fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    /// Compiles, describes and serves one pack under `source`, replacing
    /// what that source served before.
    pub async fn load_bytes(
        &self,
        source: &str,
        bytes: &[u8],
    ) -> Result<Vec<String>, PackLoadError> {
        let loaded = self.prepare(source, bytes.to_vec()).await?;
        Ok(self.install(loaded))
    }

    /// Loads one `.wasm` file under its file name.
    pub async fn load_file(&self, path: &Path) -> Result<Vec<String>, PackLoadError> {
        let source = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let bytes = tokio::fs::read(path).await?;
        let loaded = self.prepare(&source, bytes).await?;
        Ok(self.install(loaded))
    }

    /// Compiles and describes a pack without serving it yet; compilation
    /// runs off the async workers.
    pub async fn prepare(&self, source: &str, bytes: Vec<u8>) -> Result<Loaded, PackLoadError> {
        let hash = Self::hash(&bytes);
        self.prepare_hashed(source, bytes, hash).await
    }

    /// [`PackRegistry::prepare`] for bytes whose [`PackRegistry::hash`] is known.
    pub async fn prepare_hashed(
        &self,
        source: &str,
        bytes: Vec<u8>,
        hash: [u8; 32],
    ) -> Result<Loaded, PackLoadError> {
        let engine = self.runtime.engine().clone();
        let component = tokio::task::spawn_blocking(move || compile(&engine, &bytes))
            .await
            .map_err(|e| PackLoadError::NotAComponent(format!("compiler task failed: {e}")))??;
        let (pack, nodes, not_served) = self.register_component(source, &component, &hash).await?;
        Ok(Loaded {
            pack,
            nodes,
            not_served,
            hash,
        })
    }

    /// The content hash under which a pack's bytes are recognised.
    pub fn hash(bytes: &[u8]) -> [u8; 32] {
        Sha256::digest(bytes).into()
    }

    /// Serves `loaded` in place of whatever its source served before, and
    /// forgets an earlier failure of that source. Returns the nodes it
    /// declares as `id@version`.
    pub fn install(&self, loaded: Loaded) -> Vec<String> {
        let source = loaded.pack.source.clone();
        for node in &loaded.not_served {
            tracing::warn!(file = %Sanitized(&source), node = %node.node_type_id, version = %node.version, reason = %Sanitized(&node.reason), "pack node not served");
        }
        let names = loaded
            .nodes
            .iter()
            .map(|e| format!("{}@{}", e.node_type_id, e.version))
            .collect();
        let replaced = self.change(|sources| {
            sources.failed.remove(&source);
            sources.packs.insert(source.clone(), Arc::new(loaded))
        });
        drop(replaced);
        names
    }

    /// Stops serving what `source` served and forgets its failure, if any.
    /// Executions already running finish on the pack they started with.
    pub fn remove(&self, source: &str) -> bool {
        let (failed, pack) =
            self.change(|sources| (sources.failed.remove(source), sources.packs.remove(source)));
        failed.is_some() || pack.is_some()
    }

    /// Records that the latest version of `source` failed to load; whatever
    /// it served before keeps serving.
    pub fn record_failure(&self, source: &str, reason: String) {
        let serving = self.loaded_hash(source).is_some();
        tracing::error!(file = %Sanitized(source), reason = %Sanitized(&reason), keeps_previous_version = serving, "pack skipped");
        self.sources
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .failed
            .insert(source.to_owned(), reason);
        // Counted once the failure is visible, so a scrape that sees the
        // count also sees the file among the failures.
        self.metrics.pack_failed();
    }

    /// Forgets the failure of `source`: its file is back to a version that loaded.
    pub fn clear_failure(&self, source: &str) {
        self.sources
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .failed
            .remove(source);
    }

    /// The hash of the pack `source` serves, if it serves one.
    pub fn loaded_hash(&self, source: &str) -> Option<[u8; 32]> {
        let sources = self.sources.lock().unwrap_or_else(|e| e.into_inner());
        sources.packs.get(source).map(|l| l.hash)
    }

    /// Applies `f` to the sources and swaps in the index built from them.
    ///
    /// What `f` returns (packs it took out) is dropped, and new shadowings
    /// logged, after the lock is released.
    fn change<R>(&self, f: impl FnOnce(&mut Sources) -> R) -> R {
        let mut sources = self.sources.lock().unwrap_or_else(|e| e.into_inner());
        let taken = f(&mut sources);
        let nodes = NodeIndex::build(sources.packs.iter().map(|(source, loaded)| IndexedPack {
            source,
            builtin: source == BUILTIN_SOURCE,
            nodes: &loaded.nodes,
        }));
        let catalogue = catalogue(&nodes);
        let next = Arc::new(Snapshot { nodes, catalogue });
        let before = std::mem::replace(
            &mut *self.index.write().unwrap_or_else(|e| e.into_inner()),
            next.clone(),
        );
        drop(sources);
        // Logged when they start, not again at every change.
        for s in next.nodes.shadowed() {
            if before.nodes.shadowed().contains(s) {
                continue;
            }
            if s.source == BUILTIN_SOURCE {
                // A pack serving its own echo is the normal set-up (the
                // committed core pack does), not something to warn about.
                tracing::info!(node = %s.node, version = %s.version, served_by = %Sanitized(&s.by), "built-in node replaced by a pack");
            } else {
                tracing::warn!(file = %Sanitized(&s.source), node = %s.node, version = %s.version, served_by = %Sanitized(&s.by), "pack node shadowed");
            }
        }
        taken
    }

    /// Files whose latest version failed to load, each with the reason,
    /// sorted by file name.
    pub fn skipped(&self) -> Vec<(String, String)> {
        let sources = self.sources.lock().unwrap_or_else(|e| e.into_inner());
        sources
            .failed
            .iter()
            .map(|(f, r)| (f.clone(), r.clone()))
            .collect()
    }

    /// Nodes described by the packs loaded (shadowed ones included) but not
    /// served, each with its file, sorted by file: at most `max`, and how
    /// many there are in all.
    pub fn not_served(&self, max: usize) -> (Vec<(String, NotServed)>, usize) {
        let sources = self.sources.lock().unwrap_or_else(|e| e.into_inner());
        let all = sources
            .packs
            .iter()
            .flat_map(|(file, loaded)| loaded.not_served.iter().map(move |n| (file, n)));
        let total = all.clone().count();
        let some = all
            .take(max)
            .map(|(file, node)| (file.clone(), node.clone()))
            .collect();
        (some, total)
    }

    /// How many files' latest version failed to load.
    pub fn failed_count(&self) -> usize {
        let sources = self.sources.lock().unwrap_or_else(|e| e.into_inner());
        sources.failed.len()
    }

    /// Sources whose packs are loaded, shadowed ones included.
    pub fn sources(&self) -> Vec<String> {
        let sources = self.sources.lock().unwrap_or_else(|e| e.into_inner());
        sources.packs.keys().cloned().collect()
    }

    /// Counts `n` more pack files as loading until their guards drop.
    pub(crate) fn begin_loading(&self, n: usize) {
        self.pending.send_modify(|p| *p += n);
    }

    /// Counts one pack file as loaded (or skipped) when dropped, even if
    /// loading panicked, so lookups never wait in vain.
    pub(crate) fn loading_guard(&self) -> PendingGuard<'_> {
        PendingGuard(&self.pending)
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
        let Some(entries) = index.nodes.versions(node_type_id) else {
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
        hash: &[u8; 32],
    ) -> Result<(Arc<LoadedPack>, Vec<Arc<NodeEntry>>, Vec<NotServed>), PackLoadError> {
        let pre = self
            .runtime
            .linker()
            .instantiate_pre(component)
            .map_err(|e| PackLoadError::WrongWorld(format!("{e:#}")))?;
        let pre = NodePackPre::new(pre).map_err(|e| PackLoadError::WrongWorld(format!("{e:#}")))?;
        let (info, invoke, declared) = self.describe(&pre).await?;
        spec::check_pack(&info, &self.pack_limits).map_err(PackLoadError::InvalidPack)?;
        if let Some(pinned) = self.grants.pin(&info.pack_id)
            && pinned != *hash
        {
            return Err(PackLoadError::PinMismatch {
                pack_id: spec::quote(&info.pack_id),
                actual: to_hex(hash),
                pinned: to_hex(&pinned),
            });
        }
        let declared = match declared {
            Some(entries) => {
                spec::check_needs(&info, entries).map_err(PackLoadError::InvalidNeeds)?
            }
            None => DeclaredNeeds::default(),
        };
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
        let all_grants = self.grants.clone();
        let (entries, not_served) = tokio::task::spawn_blocking(move || {
            let mut entries = Vec::with_capacity(info.nodes.len());
            let mut not_served = Vec::new();
            for spec in info.nodes {
                let grants = all_grants.for_node(&loaded.pack_id, &spec.node_type_id);
                let needs = declared.for_node(&spec.node_type_id);
                let missing = needs.missing(&grants);
                // Checked whether served or not: a pack is valid or not
                // whatever the operator grants.
                let entry = node_entry(&loaded, spec, &limits, grants, needs)?;
                if missing.is_empty() {
                    entries.push(Arc::new(entry));
                } else {
                    not_served.push(NotServed {
                        node_type_id: entry.node_type_id.to_string(),
                        version: entry.version,
                        reason: needs::refusal(&missing),
                        needs: entry.needs,
                        missing,
                    });
                }
            }
            Ok::<_, PackLoadError>((entries, not_served))
        })
        .await
        .map_err(|e| PackLoadError::Describe(format!("checking the nodes failed: {e}")))??;
        Ok((pack, entries, not_served))
    }

    async fn describe(
        &self,
        pre: &NodePackPre<StoreState>,
    ) -> Result<(PackInfo, InvokeExport, Option<Vec<NodeNeeds>>), PackLoadError> {
        // `describe` must not depend on anything granted: it gets nothing.
        let mut store = self.runtime.sandbox(Sandbox {
            node_run_id: Arc::from("<describe>"),
            node_type_id: Arc::from("<describe>"),
            grants: Arc::new(NodeGrants::default()),
            deadline: std::time::Instant::now() + DESCRIBE_TIME_LIMIT,
            cancel: None,
            runs_long: None,
        });
        let call = async {
            let instance = pre
                .instance_pre()
                .instantiate_async(&mut store)
                .await
                .map_err(|e| PackLoadError::Describe(format!("{e:#}")))?;
            let invoke = InvokeExport::check(&mut store, &instance)
                .map_err(|e| PackLoadError::WrongWorld(format!("{e:#}")))?;
            // Both exports are type-checked before either is called.
            let needs = NeedsExport::find(&mut store, &instance).map_err(|e| {
                PackLoadError::InvalidNeeds(format!(
                    "the {NEEDS_INTERFACE} export does not match the WIT: {e:#}"
                ))
            })?;
            let info = crate::packs::load::describe(&mut store, &instance, &self.pack_limits)
                .await
                .map_err(PackLoadError::Describe)?;
            let needs = match needs {
                Some(func) => Some(
                    crate::packs::load::needs(&mut store, func, &self.pack_limits)
                        .await
                        .map_err(PackLoadError::InvalidNeeds)?,
                ),
                None => None,
            };
            Ok::<_, PackLoadError>((info, invoke, needs))
        };
        match tokio::time::timeout(DESCRIBE_TIME_LIMIT, call).await {
            Ok(described) => described,
            Err(_) => Err(PackLoadError::Describe(format!(
                "did not return within {DESCRIBE_TIME_LIMIT:?}"
            ))),
        }
    }
}

/// The JSON array of every node in `index`, sorted by id then version, joined
/// from the entries' serialised forms.
fn catalogue(index: &NodeIndex<Arc<NodeEntry>>) -> Bytes {
    let entries = index.sorted();
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

pub(crate) struct PendingGuard<'a>(&'a watch::Sender<usize>);

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

fn node_entry(
    pack: &Arc<LoadedPack>,
    spec: NodeSpec,
    limits: &PackLimits,
    grants: NodeGrants,
    needs: Needs,
) -> Result<NodeEntry, PackLoadError> {
    let spec::CheckedNode { input, output } =
        spec::check_node(&spec, limits).map_err(|reason| PackLoadError::InvalidNode {
            node: spec::quote(&spec.node_type_id),
            reason,
        })?;
    let side_effect = match spec.side_effect {
        SideEffect::Read => SideEffectClass::Read,
        SideEffect::Write => SideEffectClass::Write,
        SideEffect::Irreversible => SideEffectClass::Irreversible,
    };
    let mut extensions = Extensions::default();
    extensions.insert("jarvis.pack_id", pack.pack_id.clone().into());
    extensions.insert("jarvis.pack_version", pack.pack_version.clone().into());
    extensions.insert("jarvis.side_effect", side_effect.as_str().into());
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
    let node_type_id = Arc::<str>::from(spec.node_type_id.as_str());
    Ok(NodeEntry {
        pack: pack.clone(),
        metric_labels: NodeLabels::new(node_type_id.clone(), &spec.version),
        node_type_id,
        version: spec.version,
        max_wall_time: spec
            .max_wall_time_ms
            .map(|ms| Duration::from_millis(ms.into())),
        side_effect,
        input_schema: input.validator,
        output_schema: output.validator,
        grants: Arc::new(grants),
        needs,
        catalogue_json,
        runs_long: Arc::default(),
    })
}
