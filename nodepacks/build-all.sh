#!/usr/bin/env bash
# Build every node pack from source into nodepacks/*.wasm, on a fresh Debian
# machine of ours with only the package registries: installs Debian's
# rustc-web (std for wasm from source, no rustup target) and componentize-py,
# then runs `jarvis-pack build-all`.
#
#   nodepacks/build-all.sh            # install what is missing, build all
#   nodepacks/build-all.sh --core     # only the committed core pack, jarvis.core.wasm
#   SKIP_INSTALL=1 nodepacks/build-all.sh
#
# On a machine whose rustup has `wasm32-unknown-unknown`, the apt step is not
# needed: `cargo run -p jarvis-pack -- build-all` uses rustup's toolchain.
set -euo pipefail
core_only=
if [[ "${1:-}" == "--core" ]]; then
    core_only=1
    shift
fi

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(dirname "$here")"

if [[ -z "${SKIP_INSTALL:-}" ]]; then
    if ! command -v /usr/bin/rustc >/dev/null || [[ ! -e /usr/bin/rust-lld ]] || [[ ! -d /usr/lib/rustlib/src ]]; then
        sudo=""
        [[ "$(id -u)" -ne 0 ]] && sudo="sudo"
        $sudo apt-get update
        # lld-22 provides /usr/bin/rust-lld; nothing else pulls it in.
        $sudo apt-get install -y --no-install-recommends \
            rustc-web cargo-web rust-web-src rust-web-llvm lld-22
    fi
    if [[ -z "$core_only" ]] && ! command -v componentize-py >/dev/null; then
        python3 -m pip install --quiet 'componentize-py==0.25.1'
    fi
fi
# pip puts the script in the interpreter's scripts directory, which is not on
# PATH everywhere (pyenv shims appear only after a rehash): point at it.
if [[ -z "${JARVIS_COMPONENTIZE_PY:-}" ]] && ! command -v componentize-py >/dev/null; then
    scripts="$(python3 -c 'import sysconfig; print(sysconfig.get_path("scripts"))')"
    [[ -x "$scripts/componentize-py" ]] && export JARVIS_COMPONENTIZE_PY="$scripts/componentize-py"
fi

cd "$root"
if [[ -n "$core_only" ]]; then
    cargo run --quiet -p jarvis-pack -- build "$here/core" --out "$here" "$@"
else
    cargo run --quiet -p jarvis-pack -- build-all "$here" "$@"
fi
