//! What a pack file holds and whether the executor would serve it, decided by the executor's own loading code: `jarvis-pack list|inspect|check` is built on this.
//!
//! A [`PackInspector`] is a registry that never serves: it reads a file
//! within the same size bound as the packs directory watcher, compiles,
//! instantiates against the same host grants, calls `describe` within the
//! same budgets and checks the answer with [`super::spec`], all through
//! [`PackRegistry::prepare`]. So its verdict is the reason the running
//! executor would record for the file in `/v1/health`, word for word.

use std::path::{Path, PathBuf};

use arp_types::NodeType;
use serde::Serialize;

use super::needs::{Needs, NotServed};
use super::registry::{Loaded, PackRegistry};
use super::watch::{self, PackFile};
use crate::config::{Args, Config};
use crate::runtime::{self, EpochTicker};

/// One pack file as the executor sees it.
#[derive(Debug, Clone, Serialize)]
pub struct PackReport {
    pub path: PathBuf,
    /// Bytes read; `None` when the file could not be read within the bound.
    pub size: Option<u64>,
    /// Hex SHA-256 of the bytes read.
    pub sha256: Option<String>,
    /// What the pack declares, when the executor would load it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pack: Option<PackContents>,
    /// Why the executor would skip the file: the reason `/v1/health` would
    /// give. `None` when the pack would load.
    pub skip_reason: Option<String>,
    /// The grants file the verdict assumes, when the inspector was given or
    /// found one (`--grants`, `JARVIS_GRANTS_FILE`); without one nothing is
    /// granted.
    pub grants_file: Option<PathBuf>,
}

impl PackReport {
    /// Whether the executor would load the file.
    pub fn ok(&self) -> bool {
        self.skip_reason.is_none()
    }

    /// Whether the executor would load the file and serve every node it
    /// describes.
    pub fn all_served(&self) -> bool {
        self.ok() && self.pack.as_ref().is_none_or(|p| p.not_served.is_empty())
    }
}

/// What a loadable pack declares and needs.
#[derive(Debug, Clone, Serialize)]
pub struct PackContents {
    pub pack_id: String,
    pub pack_version: String,
    /// The component's imports (host interfaces it links against), by name.
    pub imports: Vec<String>,
    /// Every node, as `GET /v1/node-types` would list it: schemas, side
    /// effect, trust tier, egress policy and time limit in `extensions` and
    /// `constraints`.
    pub nodes: Vec<NodeType>,
    /// What each node declares it needs granted (nodes needing nothing are
    /// left out), served or not.
    pub needs: Vec<NodeNeedsReport>,
    /// The nodes the executor would not serve with these grants, each with
    /// the reason `/v1/health` would give.
    pub not_served: Vec<NotServed>,
}

/// What one node declares it needs.
#[derive(Debug, Clone, Serialize)]
pub struct NodeNeedsReport {
    pub node_type_id: String,
    pub version: String,
    #[serde(flatten)]
    pub needs: Needs,
}

/// Checks pack files with the executor's own loading code and limits.
#[derive(Debug)]
pub struct PackInspector {
    registry: PackRegistry,
    max_file_bytes: u64,
    grants_file: Option<PathBuf>,
    _ticker: EpochTicker,
}

impl PackInspector {
    /// An inspector with the limits the executor would have in this
    /// environment (the `JARVIS_*` variables it reads, or their defaults),
    /// compiling without a cache; the grants of `JARVIS_GRANTS_FILE`, if set.
    pub fn from_env() -> anyhow::Result<Self> {
        Self::from_env_with_grants(None)
    }

    /// [`PackInspector::from_env`] with the grants file `grants` instead of
    /// `JARVIS_GRANTS_FILE`'s, if given.
    pub fn from_env_with_grants(grants: Option<&Path>) -> anyhow::Result<Self> {
        let auth = jarvis_auth::AuthSettings::from_vars([("ARP_AUTH_PROFILE", "dev-insecure")])
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        let mut argv = vec!["jarvis-pack".into(), "--no-compile-cache".into()];
        if let Some(path) = grants {
            argv.push("--grants".into());
            argv.push(path.as_os_str().to_owned());
        }
        let args = <Args as clap::Parser>::try_parse_from::<_, std::ffi::OsString>(argv)?;
        let grants_file = args.grants.clone();
        let config = args.validate_with(auth).map_err(|e| anyhow::anyhow!(e))?;
        let mut inspector = Self::new(&config)?;
        inspector.grants_file = grants_file;
        Ok(inspector)
    }

    /// An inspector with `config`'s pack limits, grants, file size bound
    /// and compile cache.
    pub fn new(config: &Config) -> anyhow::Result<Self> {
        let mut limits = config.runtime.clone();
        // One `describe` at a time: no need to reserve the executor's pool.
        limits.max_instances = 2;
        let engine = runtime::build_engine(&limits, config.compile_cache_dir.as_deref())?;
        let ticker = EpochTicker::start(engine.clone());
        // Offline: the counters are never read.
        let metrics = std::sync::Arc::new(crate::metrics::Metrics::new());
        let registry = PackRegistry::new(
            engine,
            limits,
            config.pack_limits.clone(),
            config.grants.clone(),
            metrics,
        )?;
        Ok(Self {
            registry,
            max_file_bytes: config.watch.max_file_bytes,
            grants_file: None,
            _ticker: ticker,
        })
    }

    /// Reads, compiles, describes and checks the pack at `path` as the
    /// packs directory watcher would.
    pub async fn inspect_file(&self, path: &Path) -> PackReport {
        let mut report = PackReport {
            path: path.to_owned(),
            size: None,
            sha256: None,
            pack: None,
            skip_reason: None,
            grants_file: self.grants_file.clone(),
        };
        let bytes = match watch::read_pack(path, self.max_file_bytes).await {
            PackFile::Bytes(bytes) => bytes,
            PackFile::Gone => {
                report.skip_reason = Some("cannot read the file: it does not exist".into());
                return report;
            }
            PackFile::Unreadable(reason) => {
                report.skip_reason = Some(reason);
                return report;
            }
        };
        let source = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        self.inspect_bytes(report, &source, bytes).await
    }

    /// [`PackInspector::inspect_file`] for bytes already in memory, e.g. a
    /// pack just built.
    pub async fn inspect(&self, name: &str, bytes: Vec<u8>) -> PackReport {
        let report = PackReport {
            path: PathBuf::from(name),
            size: None,
            sha256: None,
            pack: None,
            skip_reason: None,
            grants_file: self.grants_file.clone(),
        };
        self.inspect_bytes(report, name, bytes).await
    }

    async fn inspect_bytes(
        &self,
        mut report: PackReport,
        source: &str,
        bytes: Vec<u8>,
    ) -> PackReport {
        let hash = PackRegistry::hash(&bytes);
        report.size = Some(bytes.len() as u64);
        report.sha256 = Some(hash.iter().map(|b| format!("{b:02x}")).collect());
        match self.registry.prepare_hashed(source, bytes, hash).await {
            Ok(loaded) => report.pack = Some(self.contents(&loaded)),
            Err(e) => report.skip_reason = Some(e.to_string()),
        }
        report
    }

    fn contents(&self, loaded: &Loaded) -> PackContents {
        let component = loaded.pack.pre.instance_pre().component();
        let imports = component
            .component_type()
            .imports(self.registry.runtime().engine())
            .map(|(name, _)| name.to_owned())
            .collect();
        PackContents {
            pack_id: loaded.pack.pack_id.clone(),
            pack_version: loaded.pack.pack_version.clone(),
            imports,
            nodes: loaded.nodes.iter().map(|n| n.node_type()).collect(),
            needs: loaded
                .nodes
                .iter()
                .map(|n| NodeNeedsReport {
                    node_type_id: n.node_type_id.to_string(),
                    version: n.version.clone(),
                    needs: n.needs.clone(),
                })
                .chain(loaded.not_served.iter().map(|n| NodeNeedsReport {
                    node_type_id: n.node_type_id.clone(),
                    version: n.version.clone(),
                    needs: n.needs.clone(),
                }))
                .filter(|n| !n.needs.is_empty())
                .collect(),
            not_served: loaded.not_served.clone(),
        }
    }
}

/// The files of `dir` the executor would load: every `*.wasm` at its top
/// level, links followed, sorted by name.
pub fn pack_files(dir: &Path) -> std::io::Result<Vec<PathBuf>> {
    Ok(watch::list(dir)?
        .into_iter()
        .map(|(name, _)| dir.join(name))
        .collect())
}
