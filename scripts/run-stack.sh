#!/usr/bin/env bash
# Starts the atomic executor (port 8082) and the run coordinator (port 8081)
# together, authentication off and policy open for local use; ctrl-c stops both.
# Usage: scripts/run-stack.sh [--release]   (extra env passes through)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
profile=debug
[[ ${1:-} == --release ]] && profile=release
cargo build ${1:+--release} -p jarvis-atomic-executor -p jarvis-run-coordinator
export ARP_AUTH_PROFILE=${ARP_AUTH_PROFILE:-dev-insecure}
target/$profile/jarvis-atomic-executor --port 8082 --packs nodepacks &
executor=$!
trap 'kill $executor 2>/dev/null || true' EXIT
JARVIS_ATOMIC_EXECUTOR_URL=http://127.0.0.1:8082 JARVIS_POLICY_PROFILE=${JARVIS_POLICY_PROFILE:-dev-allow} \
  target/$profile/jarvis-run-coordinator --port 8081 --db "${JARVIS_RUN_COORDINATOR_DB:-./coordinator.sqlite3}"
