#!/usr/bin/env bash
# Reload figures for the release executor:
#  1. latency: a pack with new node ids renamed into the packs directory ->
#     its node served (p50/max over --trials), with the default settle time;
#  2. under load: jarvis.core.echo at 64 connections with wrk (../shared/bench
#     load.sh; server on CPU 1, wrk on CPU 0) while the core pack serving it is
#     replaced 20 times (the same nodes in new bytes, 3 s apart): failed
#     requests (non-2xx, socket errors, results not `succeeded`) must be 0.
# Only 127.0.0.1; the server is stopped on exit. Needs wrk, jq, curl, taskset.
# Usage: scripts/bench-reload.sh [--trials N=20] [-c CONNECTIONS=64] [--replacements N=20]
#        [--interval SECONDS=3] (longer than a reload takes, or a replacement
#        lands while the previous one settles and only the last is loaded)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bench=${SHARED_DIR:-../shared}/bench
trials=20 conc=64 count=20 interval=3 port=18089
while [[ $# -gt 0 ]]; do
  case "$1" in
    --trials) trials=$2; shift 2 ;;
    -c) conc=$2; shift 2 ;;
    --replacements) count=$2; shift 2 ;;
    --interval) interval=$2; shift 2 ;;
    *) echo "unknown option: $1" >&2; exit 2 ;;
  esac
done
# JARVIS_EXECUTOR=PATH measures another build of the executor instead.
[[ -n ${JARVIS_EXECUTOR:-} ]] || cargo build --release -p jarvis-atomic-executor --bin jarvis-atomic-executor >&2

echo "== reload latency"
python3 scripts/bench_packs.py reload-latency --trials "$trials"

echo "== echo at $conc connections while the pack is replaced $count times"
work=$(mktemp -d)
server= replacer=
cleanup() {
  [[ -n $replacer ]] && kill "$replacer" 2>/dev/null && wait "$replacer" 2>/dev/null
  [[ -n $server ]] && kill "$server" 2>/dev/null && wait "$server" 2>/dev/null
  rm -rf "$work"
}
trap cleanup EXIT
mkdir "$work/packs"
python3 scripts/bench_packs.py install-core "$work/packs/jarvis.core.wasm"
server=$("$bench/start_server.sh" cmd --port "$port" --cpus 1 --log "$work/server.log" -- \
  env ARP_AUTH_PROFILE=dev-insecure "${JARVIS_EXECUTOR:-target/release/jarvis-atomic-executor}" \
  --port "$port" --packs "$work/packs" --compile-cache-dir "$work/cache" | tail -1)
until curl -sf "http://127.0.0.1:$port/v1/health" | grep -q '"status":"ok"'; do sleep 0.1; done
# The load runs for the replacements plus a margin on both sides.
duration=$((count * interval + 4))
python3 scripts/bench_packs.py replace "$work/packs/jarvis.core.wasm" --count "$count" --interval "$interval" \
  > "$work/replace.log" &
replacer=$!
"$bench/load.sh" -u "http://127.0.0.1:$port" -n jarvis.core.echo -i '{"echo":"hi"}' \
  -c "$conc" -d "$duration" -r 1 -w 0 --client-cpus 0 --server-pid "$server"
wait "$replacer"; replacer=
echo "replacements written: $(grep -c replaced "$work/replace.log")," \
  "reloads logged by the executor: $(grep -c 'pack reloaded' "$work/server.log")," \
  "load failures logged: $(grep -c 'pack skipped' "$work/server.log" || true)"
