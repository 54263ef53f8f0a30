//! `list`, `inspect`, `check`: pack files judged by the executor's own loading code
//! (`jarvis_atomic_executor::packs::PackInspector`), so a verdict here is the reason the
//! running executor would give in `/v1/health`.

use std::fmt::{self, Write as _};
use std::path::{Path, PathBuf};

use anyhow::Context as _;
pub use jarvis_atomic_executor::packs::{PackContents, PackInspector, PackReport};
use serde_json::Value;

/// The contract, as the tool was built against it.
pub const NODE_PACK_WIT: &str = include_str!("../../wit/node-pack.wit");

/// The wasi packages the contract imports from (`wit/deps/`), by file name.
pub const WIT_DEPS: [(&str, &str); 7] = [
    ("cli.wit", include_str!("../../wit/deps/cli.wit")),
    ("clocks.wit", include_str!("../../wit/deps/clocks.wit")),
    (
        "filesystem.wit",
        include_str!("../../wit/deps/filesystem.wit"),
    ),
    ("http.wit", include_str!("../../wit/deps/http.wit")),
    ("io.wit", include_str!("../../wit/deps/io.wit")),
    ("random.wit", include_str!("../../wit/deps/random.wit")),
    ("sockets.wit", include_str!("../../wit/deps/sockets.wit")),
];

/// Why a component is not a usable node pack: the reason the executor
/// would skip it with.
#[derive(Debug, thiserror::Error)]
#[error("the executor would skip it: {0}")]
pub struct CheckError(pub String);

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

impl From<&PackContents> for PackSummary {
    fn from(pack: &PackContents) -> Self {
        Self {
            pack_id: pack.pack_id.clone(),
            pack_version: pack.pack_version.clone(),
            nodes: pack
                .nodes
                .iter()
                .map(|node| NodeSummary {
                    node_type_id: node.node_type_id.clone(),
                    version: node.version.clone(),
                    side_effect: extension(node, "jarvis.side_effect").unwrap_or_default(),
                })
                .collect(),
        }
    }
}

/// Checks `component` exactly as the executor loads a pack file, with the
/// limits the executor would have in this environment.
pub fn check(component: &[u8]) -> Result<PackSummary, CheckError> {
    let bytes = component.to_vec();
    let report = with_inspector(None, move |inspector| async move {
        inspector.inspect("<component>", bytes).await
    })
    .map_err(|e| CheckError(format!("{e:#}")))?;
    match (&report.pack, report.skip_reason) {
        (Some(pack), None) => Ok(pack.into()),
        (_, reason) => Err(CheckError(reason.unwrap_or_default())),
    }
}

/// Reports on every pack file `paths` names: a file as it is, a directory
/// as the executor reads a packs directory (its top-level `*.wasm` files).
pub fn inspect_paths(paths: &[PathBuf]) -> anyhow::Result<Vec<PackReport>> {
    inspect_paths_with_grants(paths, None)
}

/// [`inspect_paths`] with the operator's grants file `grants` (instead of
/// `JARVIS_GRANTS_FILE`'s, if given), so the reports say which nodes those
/// grants would serve.
pub fn inspect_paths_with_grants(
    paths: &[PathBuf],
    grants: Option<&Path>,
) -> anyhow::Result<Vec<PackReport>> {
    let grants = grants.map(Path::to_path_buf);
    let mut files = Vec::new();
    for path in paths {
        if path.is_dir() {
            let found = jarvis_atomic_executor::packs::pack_files(path)
                .with_context(|| format!("listing {}", path.display()))?;
            files.extend(found);
        } else {
            files.push(path.clone());
        }
    }
    with_inspector(grants, move |inspector| async move {
        let mut reports = Vec::with_capacity(files.len());
        for file in &files {
            reports.push(inspector.inspect_file(file).await);
        }
        reports
    })
}

/// Runs `f` with an inspector on a thread and runtime of its own, so this
/// works from plain code, from blocking tasks and from within a runtime alike.
fn with_inspector<T, F, Fut>(grants: Option<PathBuf>, f: F) -> anyhow::Result<T>
where
    T: Send + 'static,
    F: FnOnce(PackInspector) -> Fut + Send + 'static,
    Fut: Future<Output = T>,
{
    std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .context("starting a runtime")?;
        runtime.block_on(async move {
            let inspector = PackInspector::from_env_with_grants(grants.as_deref())?;
            Ok(f(inspector).await)
        })
    })
    .join()
    .map_err(|_| anyhow::anyhow!("the inspecting thread panicked"))?
}

/// One line per file: verdict, pack, node count, size and hash.
pub fn list_line(report: &PackReport) -> String {
    let size = report.size.map_or("-".into(), |s| format!("{s} B"));
    let hash = report
        .sha256
        .as_deref()
        .map_or("-".into(), |h| format!("sha256:{}", &h[..12]));
    match (&report.pack, &report.skip_reason) {
        (Some(pack), None) if pack.not_served.is_empty() => format!(
            "ok    {}  {} {}  {} node(s)  {size}  {hash}",
            report.path.display(),
            pack.pack_id,
            pack.pack_version,
            pack.nodes.len()
        ),
        (Some(pack), None) => format!(
            "PART  {}  {} {}  {} of {} node(s) served  {size}  {hash}",
            report.path.display(),
            pack.pack_id,
            pack.pack_version,
            pack.nodes.len(),
            pack.nodes.len() + pack.not_served.len()
        ),
        (_, reason) => format!(
            "SKIP  {}  {size}  {hash}  {}",
            report.path.display(),
            reason.as_deref().unwrap_or_default()
        ),
    }
}

/// The verdict of `check`: one line, and one more per node not served.
pub fn check_line(report: &PackReport) -> String {
    match (&report.pack, &report.skip_reason) {
        (Some(pack), None) if pack.not_served.is_empty() => format!(
            "{}: ok: served as {} {} with {} node(s)",
            report.path.display(),
            pack.pack_id,
            pack.pack_version,
            pack.nodes.len()
        ),
        (Some(pack), None) => {
            let mut out = format!(
                "{}: partly served as {} {}: {} of {} node(s)",
                report.path.display(),
                pack.pack_id,
                pack.pack_version,
                pack.nodes.len(),
                pack.nodes.len() + pack.not_served.len()
            );
            for node in &pack.not_served {
                let _ = write!(
                    out,
                    "\n  not served: {} {}: {}",
                    node.node_type_id, node.version, node.reason
                );
            }
            let _ = write!(out, "\n  {}", grants_note(report));
            out
        }
        (_, reason) => format!(
            "{}: skipped: {}",
            report.path.display(),
            reason.as_deref().unwrap_or_default()
        ),
    }
}

/// Which grants a verdict assumes.
fn grants_note(report: &PackReport) -> String {
    match &report.grants_file {
        Some(file) => format!("(with the grants of {})", file.display()),
        None => {
            "(no grants file: nothing is granted; check against the operator's with --grants FILE)"
                .into()
        }
    }
}

/// What a node needs, as one line of text.
fn needs_text(needs: &jarvis_atomic_executor::packs::needs::Needs) -> String {
    let items: Vec<String> = needs
        .hosts
        .keys()
        .map(|h| format!("host {h}"))
        .chain(needs.config.iter().map(|k| format!("config {k}")))
        .chain(needs.secrets.iter().map(|s| format!("secret {s}")))
        .collect();
    if items.is_empty() {
        "none".into()
    } else {
        items.join(", ")
    }
}

/// Everything `inspect` shows of one file, for people.
pub fn inspect_text(report: &PackReport) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "file     {}", report.path.display());
    if let Some(size) = report.size {
        let _ = writeln!(out, "size     {size} bytes");
    }
    if let Some(hash) = &report.sha256 {
        let _ = writeln!(out, "sha256   {hash}");
    }
    let Some(pack) = report.pack.as_ref().filter(|_| report.ok()) else {
        let reason = report.skip_reason.as_deref().unwrap_or_default();
        let _ = writeln!(
            out,
            "verdict  SKIP: the executor would not load it: {reason}"
        );
        return out;
    };
    if pack.not_served.is_empty() {
        let _ = writeln!(
            out,
            "verdict  ok: the executor would serve its {} node(s)",
            pack.nodes.len()
        );
    } else {
        let _ = writeln!(
            out,
            "verdict  PART: the executor would serve {} of its {} node(s) {}",
            pack.nodes.len(),
            pack.nodes.len() + pack.not_served.len(),
            grants_note(report)
        );
    }
    let _ = writeln!(out, "pack     {} {}", pack.pack_id, pack.pack_version);
    if pack.imports.is_empty() {
        let _ = writeln!(out, "imports  none");
    } else {
        let _ = writeln!(out, "imports  {}", pack.imports.join(", "));
    }
    for node in &pack.not_served {
        let _ = writeln!(
            out,
            "node     {} {} NOT SERVED: {}",
            node.node_type_id, node.version, node.reason
        );
        let _ = writeln!(out, "  {:<14} {}", "needs", needs_text(&node.needs));
    }
    for node in &pack.nodes {
        let _ = writeln!(out, "node     {} {}", node.node_type_id, node.version);
        if let Some(description) = &node.description {
            let _ = writeln!(out, "  description    {description}");
        }
        for (label, key) in [
            ("side effect", "jarvis.side_effect"),
            ("trust tier", "jarvis.trust_tier"),
            ("egress policy", "jarvis.egress_policy"),
            ("tags", "jarvis.tags"),
        ] {
            let value = extension(node, key).unwrap_or_else(|| "none".into());
            let _ = writeln!(out, "  {label:<14} {value}");
        }
        let needs = pack
            .needs
            .iter()
            .find(|n| n.node_type_id == node.node_type_id && n.version == node.version)
            .map_or_else(|| "none".into(), |n| needs_text(&n.needs));
        let _ = writeln!(out, "  {:<14} {needs}", "needs");
        let wall = node
            .constraints
            .as_ref()
            .and_then(|c| c.max_wall_time_ms())
            .map_or("the executor's default".into(), |ms| format!("{ms} ms"));
        let _ = writeln!(out, "  {:<14} {wall}", "max wall time");
        for (label, schema) in [
            ("input schema", &node.input_schema),
            ("output schema", &node.output_schema),
        ] {
            let text = schema
                .as_ref()
                .map_or("none".into(), |s| Value::Object(s.clone()).to_string());
            let _ = writeln!(out, "  {label:<14} {text}");
        }
    }
    out
}

fn extension(node: &arp_types::NodeType, key: &str) -> Option<String> {
    let value = node.extensions.as_ref()?.as_map().get(key)?;
    Some(match value {
        Value::String(s) => s.clone(),
        Value::Array(items) => items
            .iter()
            .map(|i| i.as_str().map_or_else(|| i.to_string(), str::to_owned))
            .collect::<Vec<_>>()
            .join(", "),
        other => other.to_string(),
    })
}
