//! `jarvis-pack`: scaffold, build, list, inspect and check JARVIS node packs.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use jarvis_pack::{BuildOptions, BuiltPack, Toolchain};

/// Scaffold, build and check JARVIS node packs (jarvis:node WebAssembly components).
#[derive(Debug, Parser)]
#[command(version)]
struct Cli {
    #[command(subcommand)]
    command: Commands,
}

#[derive(Debug, Subcommand)]
enum Commands {
    /// Create a Rust pack crate that builds as it is.
    New {
        /// Directory of the new pack; its name names the crate.
        dir: PathBuf,
        /// Dotted pack id [default: from the directory name, `acme-crm` → `acme.crm`].
        #[arg(long)]
        id: Option<String>,
        /// Path to the jarvis-pack-sdk crate [default: nodepacks/sdk next to this tool's sources].
        #[arg(long)]
        sdk: Option<PathBuf>,
    },
    /// Build a pack (a Rust crate or workspace, or a Python `app.py`) into `<pack-id>.wasm`.
    Build {
        /// The pack's directory.
        #[arg(default_value = ".")]
        dir: PathBuf,
        #[command(flatten)]
        output: OutputArgs,
    },
    /// Build every pack under a nodepacks directory: its Cargo workspace and each Python pack.
    BuildAll {
        /// The nodepacks directory.
        #[arg(default_value = "nodepacks")]
        dir: PathBuf,
        #[command(flatten)]
        output: OutputArgs,
    },
    /// One line per pack file: would the executor load it, as which pack, size and sha256.
    List {
        /// Pack files, or packs directories (their top-level `*.wasm` files, as the executor
        /// reads them).
        #[arg(required = true)]
        paths: Vec<PathBuf>,
        #[command(flatten)]
        grants: GrantsArg,
    },
    /// Everything about each pack file: nodes, versions, side effects, declared needs,
    /// schemas, imports, size, sha256 and the verdict.
    Inspect {
        /// Pack files, or packs directories.
        #[arg(required = true)]
        paths: Vec<PathBuf>,
        /// JSON (one array of reports) instead of text.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        grants: GrantsArg,
    },
    /// The verdict for each pack file: served, or skipped and why (the reason the
    /// executor gives in `/v1/health`), and each node not served for want of grants.
    /// Exits 1 if any file would be skipped or any node not served.
    Check {
        /// Pack files, or packs directories.
        #[arg(required = true)]
        paths: Vec<PathBuf>,
        #[command(flatten)]
        grants: GrantsArg,
    },
}

#[derive(Debug, clap::Args)]
struct GrantsArg {
    /// The executor's grants file: judge the packs with what it grants [default: the file
    /// `JARVIS_GRANTS_FILE` names; without one nothing is granted, and every node declaring a
    /// need is reported with what would have to be granted].
    #[arg(long, value_name = "FILE")]
    grants: Option<PathBuf>,
}

#[derive(Debug, clap::Args)]
struct OutputArgs {
    /// Packs directory for the `.wasm` files [default: `build`: the directory holding the
    /// pack's directory; `build-all`: the nodepacks directory].
    #[arg(long, env = "JARVIS_PACKS_OUT")]
    out: Option<PathBuf>,
    /// Cargo target directory (share one to build std for wasm only once).
    #[arg(long, env = "CARGO_TARGET_DIR")]
    target_dir: Option<PathBuf>,
}

impl OutputArgs {
    fn options(self, default_out: &Path) -> anyhow::Result<BuildOptions> {
        Ok(BuildOptions {
            out_dir: self.out.unwrap_or_else(|| default_out.to_path_buf()),
            toolchain: Toolchain::detect()?,
            target_dir: self.target_dir,
        })
    }
}

fn main() -> anyhow::Result<ExitCode> {
    match Cli::parse().command {
        Commands::New { dir, id, sdk } => {
            let name = dir
                .file_name()
                .and_then(|name| name.to_str())
                .context("the pack directory needs a UTF-8 name")?;
            let pack_id = id.unwrap_or_else(|| jarvis_pack::pack_id_for(name));
            let sdk = sdk.unwrap_or_else(jarvis_pack::default_sdk_path);
            jarvis_pack::scaffold(&dir, &pack_id, &sdk)?;
            println!(
                "created pack {pack_id} in {}; build it with `jarvis-pack build {}`",
                dir.display(),
                dir.display()
            );
        }
        Commands::Build { dir, output } => {
            let dir = dir
                .canonicalize()
                .with_context(|| format!("{}", dir.display()))?;
            let parent = dir.parent().unwrap_or(&dir).to_path_buf();
            let built = jarvis_pack::build(&dir, &output.options(&parent)?)?;
            report(&built);
        }
        Commands::BuildAll { dir, output } => {
            let options = output.options(&dir)?;
            report(&jarvis_pack::build_all(&dir, &options)?);
        }
        Commands::List { paths, grants } => {
            let reports = jarvis_pack::inspect_paths_with_grants(&paths, grants.grants.as_deref())?;
            for report in &reports {
                println!("{}", jarvis_pack::list_line(report));
            }
            return Ok(verdict(&reports));
        }
        Commands::Inspect {
            paths,
            json,
            grants,
        } => {
            let reports = jarvis_pack::inspect_paths_with_grants(&paths, grants.grants.as_deref())?;
            if json {
                println!("{}", serde_json::to_string_pretty(&reports)?);
            } else {
                let texts: Vec<String> = reports.iter().map(jarvis_pack::inspect_text).collect();
                print!("{}", texts.join("\n"));
            }
            return Ok(verdict(&reports));
        }
        Commands::Check { paths, grants } => {
            let reports = jarvis_pack::inspect_paths_with_grants(&paths, grants.grants.as_deref())?;
            for report in &reports {
                println!("{}", jarvis_pack::check_line(report));
            }
            return Ok(verdict(&reports));
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// Failure when any file would be skipped or any node not served, or when
/// there was none to judge.
fn verdict(reports: &[jarvis_pack::PackReport]) -> ExitCode {
    if reports.is_empty() {
        eprintln!("no pack files found");
        return ExitCode::FAILURE;
    }
    if reports.iter().all(jarvis_pack::PackReport::all_served) {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

fn report(built: &[BuiltPack]) {
    for pack in built {
        println!("{}: {}", pack.path.display(), pack.summary);
    }
}
