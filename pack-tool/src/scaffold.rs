//! `new`: a pack crate that builds as it is, to start editing from.

use std::path::{Path, PathBuf};

use anyhow::{Context as _, bail};

const CARGO_TOML: &str = include_str!("../templates/Cargo.toml.tmpl");
const LIB_RS: &str = include_str!("../templates/lib.rs.tmpl");

/// The SDK next to this tool's sources, for a tool run from the repository.
pub fn default_sdk_path() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../nodepacks/sdk")
}

/// The dotted pack id a directory name suggests: `acme-crm` → `acme.crm`.
pub fn pack_id_for(name: &str) -> String {
    name.to_lowercase().replace(['-', '_', ' '], ".")
}

/// Create the pack crate `dir` (which must not exist yet) for `pack_id`,
/// depending on the SDK at `sdk`.
pub fn scaffold(dir: &Path, pack_id: &str, sdk: &Path) -> anyhow::Result<()> {
    if dir.exists() {
        bail!("{} already exists", dir.display());
    }
    let valid_id = |c: char| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '.' || c == '_';
    if pack_id.is_empty() || !pack_id.chars().all(valid_id) {
        bail!("pack id `{pack_id}` must be dotted lowercase, e.g. `acme.crm`");
    }
    let sdk = sdk.canonicalize().with_context(|| {
        format!(
            "the SDK is not at {}: pass --sdk PATH/TO/nodepacks/sdk",
            sdk.display()
        )
    })?;
    let name = dir
        .file_name()
        .and_then(|name| name.to_str())
        .context("the pack directory needs a UTF-8 name")?;
    let crate_name = name.to_lowercase().replace(['.', ' '], "-");
    // TOML basic strings treat backslashes as escapes.
    let sdk = sdk.to_string_lossy().replace('\\', "/");
    let fill = |template: &str| {
        template
            .replace("{{crate}}", &crate_name)
            .replace("{{pack_id}}", pack_id)
            .replace("{{sdk}}", &sdk)
    };
    std::fs::create_dir_all(dir.join("src"))
        .with_context(|| format!("creating {}", dir.display()))?;
    std::fs::write(dir.join("Cargo.toml"), fill(CARGO_TOML))?;
    std::fs::write(dir.join("src/lib.rs"), fill(LIB_RS))?;
    std::fs::write(dir.join(".gitignore"), "/target\n")?;
    Ok(())
}
