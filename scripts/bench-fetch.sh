#!/usr/bin/env bash
# One outbound GET through jarvis.web.fetch (release executor, the built core
# pack) to a local server, against the same GET from native reqwest: latency
# at 1 connection (p50/p99) and throughput at 64, measured by the same client
# (host/examples/bench_fetch.rs, which also serves the 512-byte upstream).
# Usage: scripts/bench-fetch.sh [--requests N=2000] [--seconds S=10] [-c C=64]
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
upstream=18095 port=18084
cargo build --release -p jarvis-atomic-executor --bin jarvis-atomic-executor --example bench_fetch >&2
env ARP_AUTH_PROFILE=dev-insecure JARVIS_ATOMIC_HTTP_ALLOWED_HOSTS="127.0.0.1:$upstream" \
  target/release/jarvis-atomic-executor --port "$port" --packs nodepacks >/tmp/bench-fetch-executor.log 2>&1 &
executor=$!
trap 'kill "$executor" 2>/dev/null || true' EXIT
for _ in $(seq 1 600); do
  curl -sf "http://127.0.0.1:$port/v1/health" | grep -q '"ok"' && break
  sleep 0.2
done
target/release/examples/bench_fetch --port "$upstream" --executor "http://127.0.0.1:$port" "$@"
