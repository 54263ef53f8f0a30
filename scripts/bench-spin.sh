#!/usr/bin/env bash
# Containment figures: N concurrent calls to a guest that spins forever against
# the release executor, while /v1/health is polled. Prints health latency and
# deadline overshoot (p50/p99/max). Targets on 2 cores: health p99 <= 5 ms,
# overshoot p99 <= 50 ms. Only 127.0.0.1; the server is stopped on exit.
# Usage: scripts/bench-spin.sh [-n CALLS=1000] [--limit-ms MS=2000] [--port PORT=18086]
#        (env passes through to the executor, e.g. JARVIS_LONG_CALL_NICE=0).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
calls=1000 limit=2000 port=18086
while [[ $# -gt 0 ]]; do
  case "$1" in
    -n) calls=$2; shift 2 ;;
    --limit-ms) limit=$2; shift 2 ;;
    --port) port=$2; shift 2 ;;
    *) echo "unknown option: $1" >&2; exit 2 ;;
  esac
done
cargo build --release -p jarvis-atomic-executor --bin jarvis-atomic-executor --example spin_pack >&2
packs=$(mktemp -d)
server=
cleanup() {
  [[ -n $server ]] && kill "$server" 2>/dev/null && wait "$server" 2>/dev/null
  rm -rf "$packs"
}
trap cleanup EXIT
target/release/examples/spin_pack "$packs/spin.wasm"
slots=$((calls + 64))
ARP_AUTH_PROFILE=dev-insecure target/release/jarvis-atomic-executor \
  --host 127.0.0.1 --port "$port" --packs "$packs" --no-compile-cache \
  --max-concurrency "$slots" --max-queue "$slots" --max-memory-mib 64 \
  --default-timeout-secs 30 >/tmp/bench-spin-server.log 2>&1 &
server=$!
for _ in $(seq 100); do
  if curl -fsS "http://127.0.0.1:$port/v1/node-types" 2>/dev/null | grep -q bench.spin; then break; fi
  sleep 0.1
done
curl -fsS "http://127.0.0.1:$port/v1/node-types" | grep -q bench.spin || {
  echo "the executor did not serve bench.spin; see /tmp/bench-spin-server.log" >&2; exit 1; }
timeout $((limit / 1000 + 120)) python3 scripts/bench_spin.py --port "$port" --calls "$calls" --limit-ms "$limit"
