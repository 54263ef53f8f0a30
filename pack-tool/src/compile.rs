//! `build`: turn a pack's sources (a Rust crate or a Python module) into a
//! checked component in a packs directory.

use std::ffi::OsString;
use std::io::BufRead;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{Context as _, bail};

use crate::check::{NODE_PACK_WIT, PackSummary, WIT_DEPS, check};

const WASM_TARGET: &str = "wasm32-unknown-unknown";
/// Linker settings for one-call instances. The executor's pooling allocator
/// resets the first MiB of a slot cheaply after each call (it rewrites only
/// the pages the call dirtied); memory past it costs page faults and unmaps,
/// and growing the memory costs a remap in and out on every call. So a pack
/// gets a 512 KiB stack (not Rust's 1 MiB) and its initial memory has 448 KiB
/// of heap after the static data, which the SDK's arena allocator serves
/// first: a typical call fits in the first MiB and never grows the memory.
const LINK_ARGS: [&str; 2] = ["-zstack-size=524288", "--initial-heap=458752"];

/// How to get a Rust compiler that targets wasm.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Toolchain {
    /// Debian's `rustc-web`: builds std for wasm from `rust-web-src`
    /// (`RUSTC_BOOTSTRAP=1`, `-Z build-std`). No rustup target needed.
    Debian,
    /// rustup with `rustup target add wasm32-unknown-unknown`: plain cargo.
    Rustup,
}

impl Toolchain {
    /// `JARVIS_PACK_TOOLCHAIN=debian|rustup` decides; otherwise a rustup
    /// toolchain that has the wasm target, else Debian's rustc-web.
    pub fn detect() -> anyhow::Result<Self> {
        match std::env::var("JARVIS_PACK_TOOLCHAIN").as_deref() {
            Ok("debian") => return Ok(Self::Debian),
            Ok("rustup") => return Ok(Self::Rustup),
            Ok(other) => bail!("JARVIS_PACK_TOOLCHAIN must be `debian` or `rustup`, not `{other}`"),
            Err(_) => {}
        }
        let rustup_has_target = Command::new("rustup")
            .args(["target", "list", "--installed"])
            .stderr(Stdio::null())
            .output()
            .is_ok_and(|out| {
                out.status.success()
                    && String::from_utf8_lossy(&out.stdout)
                        .lines()
                        .any(|line| line.trim() == WASM_TARGET)
            });
        if rustup_has_target {
            return Ok(Self::Rustup);
        }
        if Path::new("/usr/bin/rustc").exists() && Path::new("/usr/lib/rustlib/src").exists() {
            return Ok(Self::Debian);
        }
        bail!(
            "no Rust toolchain for {WASM_TARGET}: either `rustup target add {WASM_TARGET}`, or \
             `apt-get install rustc-web cargo-web rust-web-src rust-web-llvm lld-22` (Debian)"
        )
    }

    /// `cargo build --release` for wasm, whatever the project's own
    /// `.cargo/config.toml` says: command-line settings take precedence.
    fn cargo_build(self, manifest: &Path) -> Command {
        let mut cargo = match self {
            Self::Debian => {
                let mut cargo = Command::new("/usr/bin/cargo");
                cargo.env("RUSTC_BOOTSTRAP", "1");
                cargo
            }
            Self::Rustup => Command::new("cargo"),
        };
        // Set by rustup and cargo when we run under them; they would pick
        // the wrong compiler.
        for inherited in [
            "RUSTC",
            "RUSTC_WRAPPER",
            "RUSTUP_TOOLCHAIN",
            "CARGO_BUILD_TARGET",
        ] {
            cargo.env_remove(inherited);
        }
        cargo
            .arg("build")
            .arg("--release")
            .arg("--manifest-path")
            .arg(manifest);
        cargo.args([
            "--target",
            WASM_TARGET,
            "--message-format=json-render-diagnostics",
        ]);
        // Added to (not replacing) any rustflags the pack's own config sets.
        let mut rustflags: Vec<String> = LINK_ARGS
            .iter()
            .flat_map(|arg| ["\"-C\"".to_owned(), format!("\"link-arg={arg}\"")])
            .collect();
        // Panic locations name source files: those of dependencies lie under
        // CARGO_HOME, which differs between machines and users. Workspace
        // members are named relative to the workspace already. With this the
        // same sources and toolchain give the same bytes anywhere, which is
        // what lets CI check the committed core pack against its sources.
        if let Some(home) = cargo_home() {
            let flag = format!("--remap-path-prefix={}=/cargo", home.display());
            rustflags.push(format!("{:?}", flag));
        }
        cargo.args([
            "--config".to_owned(),
            format!("target.{WASM_TARGET}.rustflags=[{}]", rustflags.join(", ")),
        ]);
        match self {
            Self::Debian => {
                cargo.args(["--config", "build.rustc=\"/usr/bin/rustc\""]);
                cargo.args(["-Z", "build-std=std,panic_abort"]);
            }
            Self::Rustup => {
                cargo.args(["--config", "build.rustc=\"rustc\""]);
            }
        }
        cargo
    }
}

/// Cargo's home directory, where dependencies' sources are unpacked.
fn cargo_home() -> Option<PathBuf> {
    std::env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|home| PathBuf::from(home).join(".cargo")))
}

/// Where and how to build.
#[derive(Debug, Clone)]
pub struct BuildOptions {
    /// The packs directory the `.wasm` files land in.
    pub out_dir: PathBuf,
    pub toolchain: Toolchain,
    /// Cargo's target directory, to share a built std between packs.
    pub target_dir: Option<PathBuf>,
}

/// One pack written to the packs directory.
#[derive(Debug, Clone)]
pub struct BuiltPack {
    pub path: PathBuf,
    pub summary: PackSummary,
}

/// The kind of sources in a pack directory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PackSource {
    /// A crate (or a workspace of them) using jarvis-pack-sdk.
    Rust,
    /// `app.py` implementing the node-pack world, built with componentize-py.
    Python,
}

impl PackSource {
    pub fn of(dir: &Path) -> anyhow::Result<Self> {
        if dir.join("Cargo.toml").is_file() {
            Ok(Self::Rust)
        } else if dir.join("app.py").is_file() {
            Ok(Self::Python)
        } else {
            bail!(
                "{} holds neither Cargo.toml (a Rust pack) nor app.py (a Python pack)",
                dir.display()
            )
        }
    }
}

/// Build the pack in `dir` (or, for a Cargo workspace, every cdylib in it).
pub fn build(dir: &Path, options: &BuildOptions) -> anyhow::Result<Vec<BuiltPack>> {
    match PackSource::of(dir)? {
        PackSource::Rust => build_rust(dir, options),
        PackSource::Python => Ok(vec![build_python(dir, options)?]),
    }
}

/// Build every pack under `nodepacks`: the Cargo workspace there in one
/// cargo run, then each Python pack in a subdirectory.
pub fn build_all(nodepacks: &Path, options: &BuildOptions) -> anyhow::Result<Vec<BuiltPack>> {
    let mut built = Vec::new();
    if nodepacks.join("Cargo.toml").is_file() {
        built.extend(build_rust(nodepacks, options)?);
    }
    let mut dirs: Vec<PathBuf> = std::fs::read_dir(nodepacks)
        .with_context(|| format!("reading {}", nodepacks.display()))?
        .filter_map(|entry| entry.ok().map(|entry| entry.path()))
        .filter(|path| path.is_dir() && PackSource::of(path).ok() == Some(PackSource::Python))
        .collect();
    dirs.sort();
    for dir in dirs {
        built.push(build_python(&dir, options)?);
    }
    Ok(built)
}

fn build_rust(dir: &Path, options: &BuildOptions) -> anyhow::Result<Vec<BuiltPack>> {
    let manifest = dir.join("Cargo.toml");
    let mut cargo = options.toolchain.cargo_build(&manifest);
    if dir.join("Cargo.toml").is_file() && is_workspace_root(&manifest)? {
        cargo.arg("--workspace");
    }
    if let Some(target_dir) = &options.target_dir {
        cargo.arg("--target-dir").arg(target_dir);
    }
    eprintln!(
        "building {} ({:?} toolchain)",
        dir.display(),
        options.toolchain
    );
    let modules = run_cargo(cargo)?;
    if modules.is_empty() {
        bail!(
            "cargo built no cdylib in {}: a pack crate needs `crate-type = [\"cdylib\"]`",
            dir.display()
        );
    }
    modules
        .iter()
        .map(|module| {
            let core =
                std::fs::read(module).with_context(|| format!("reading {}", module.display()))?;
            let component = componentize(&core)
                .with_context(|| format!("componentizing {}", module.display()))?;
            install(&component, &options.out_dir)
        })
        .collect()
}

fn is_workspace_root(manifest: &Path) -> anyhow::Result<bool> {
    let text = std::fs::read_to_string(manifest)
        .with_context(|| format!("reading {}", manifest.display()))?;
    // A virtual manifest (no [package]) builds all of its members.
    Ok(text.lines().any(|line| line.trim() == "[workspace]")
        && !text.lines().any(|line| line.trim() == "[package]"))
}

/// Run cargo and collect the wasm files of the cdylibs it produced.
fn run_cargo(mut cargo: Command) -> anyhow::Result<Vec<PathBuf>> {
    let mut child = cargo
        .stdout(Stdio::piped())
        .spawn()
        .with_context(|| format!("starting {:?}", cargo.get_program()))?;
    let stdout = child.stdout.take().context("cargo stdout")?;
    let mut modules = Vec::new();
    for line in std::io::BufReader::new(stdout).lines() {
        let line = line.context("reading cargo output")?;
        let Ok(message) = serde_json::from_str::<serde_json::Value>(&line) else {
            continue;
        };
        if message["reason"] != "compiler-artifact" {
            continue;
        }
        let is_cdylib = message["target"]["kind"]
            .as_array()
            .is_some_and(|kinds| kinds.iter().any(|kind| kind == "cdylib"));
        if !is_cdylib {
            continue;
        }
        let wasm_files = message["filenames"].as_array().into_iter().flatten();
        modules.extend(
            wasm_files
                .filter_map(|file| file.as_str())
                .filter(|file| file.ends_with(".wasm"))
                .map(PathBuf::from),
        );
    }
    let status = child.wait().context("waiting for cargo")?;
    if !status.success() {
        bail!("cargo build failed ({status})");
    }
    Ok(modules)
}

/// Wrap a core module built with wit-bindgen (which embeds the world's
/// types in a custom section) into a component.
pub fn componentize(core_module: &[u8]) -> anyhow::Result<Vec<u8>> {
    wit_component::ComponentEncoder::default()
        .module(core_module)?
        .validate(true)
        .encode()
}

fn build_python(dir: &Path, options: &BuildOptions) -> anyhow::Result<BuiltPack> {
    let wit_dir = tempfile::tempdir().context("temporary WIT directory")?;
    std::fs::write(wit_dir.path().join("node-pack.wit"), NODE_PACK_WIT)?;
    let deps = wit_dir.path().join("deps");
    std::fs::create_dir(&deps)?;
    for (name, text) in WIT_DEPS {
        std::fs::write(deps.join(name), text)?;
    }
    let out = tempfile::Builder::new()
        .suffix(".wasm")
        .tempfile()
        .context("temporary component file")?;
    let componentize_py: OsString =
        std::env::var_os("JARVIS_COMPONENTIZE_PY").unwrap_or_else(|| "componentize-py".into());
    eprintln!("building {} (componentize-py)", dir.display());
    // No --stub-wasi: it would stub wasi:http along with CPython's own WASI
    // imports. The executor serves those empty (no files, environment or
    // sockets), so the pack keeps the network the operator grants.
    let status = Command::new(&componentize_py)
        .arg("--wit-path")
        .arg(wit_dir.path())
        .args(["--world", "node-pack", "componentize"])
        .arg("--python-path")
        .arg(dir)
        .arg("--output")
        .arg(out.path())
        .arg("app")
        .status()
        .with_context(|| {
            format!(
                "starting {} (install it with `pip install componentize-py`)",
                componentize_py.to_string_lossy()
            )
        })?;
    if !status.success() {
        bail!("componentize-py failed for {} ({status})", dir.display());
    }
    let component = std::fs::read(out.path())?;
    install(&component, &options.out_dir)
}

/// Check `component` and write it to `<out_dir>/<pack-id>.wasm`, atomically:
/// an executor reading the directory never sees half a file.
pub fn install(component: &[u8], out_dir: &Path) -> anyhow::Result<BuiltPack> {
    let summary = check(component)?;
    std::fs::create_dir_all(out_dir).with_context(|| format!("creating {}", out_dir.display()))?;
    let path = out_dir.join(format!("{}.wasm", summary.pack_id));
    let mut staged = tempfile::NamedTempFile::new_in(out_dir)
        .with_context(|| format!("writing into {}", out_dir.display()))?;
    std::io::Write::write_all(&mut staged, component)?;
    // Temporary files are private; a pack is as readable as any build output.
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        staged
            .as_file()
            .set_permissions(std::fs::Permissions::from_mode(0o644))?;
    }
    staged
        .persist(&path)
        .with_context(|| format!("writing {}", path.display()))?;
    Ok(BuiltPack { path, summary })
}
