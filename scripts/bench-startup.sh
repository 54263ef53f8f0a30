#!/usr/bin/env bash
# Startup figures: the release executor with 20 packs (copies of the core pack
# with distinct pack and node ids), time from process start to /v1/health `ok`
# (every pack loaded), cold (empty compile cache) and cached (second start with
# the same cache), alternated round by round. Target: cached <= 300 ms.
# Only 127.0.0.1; each server is stopped before the next starts.
# Usage: scripts/bench-startup.sh [--packs N=20] [--rounds N=5] [--port PORT=18087]
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
# JARVIS_EXECUTOR=PATH measures another build of the executor instead.
[[ -n ${JARVIS_EXECUTOR:-} ]] || cargo build --release -p jarvis-atomic-executor --bin jarvis-atomic-executor >&2
exec python3 scripts/bench_packs.py startup "$@"
