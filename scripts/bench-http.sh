#!/usr/bin/env bash
# HTTP load figures for the executor against the bare axum "limit" server, using
# ../shared/bench: each server pinned to CPU 1, wrk pinned to CPU 0, interleaved
# rounds so both see the same machine. Needs wrk, jq, curl, taskset.
# Usage: scripts/bench-http.sh [-c CONNECTIONS=64] [-d SECONDS=10] [--rounds N=3]
#        [-n NODE] [-i INPUTS] [--packs DIR=nodepacks] [--no-limit]
#        (env passes through, e.g. JARVIS_MAX_CONCURRENCY). With the core pack built,
#        jarvis.core.echo is the pack's Rust echo; `--packs /nonexistent` measures the built-in.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bench=${SHARED_DIR:-../shared}/bench
conc=64 dur=10 rounds=3 node=jarvis.core.echo inputs='{"echo":"hi"}' limit=1 packs=nodepacks
while [[ $# -gt 0 ]]; do
  case "$1" in
    -c) conc=$2; shift 2 ;;
    -d) dur=$2; shift 2 ;;
    --rounds) rounds=$2; shift 2 ;;
    -n) node=$2; shift 2 ;;
    -i) inputs=$2; shift 2 ;;
    --packs) packs=$2; shift 2 ;;
    --no-limit) limit=0; shift ;;
    *) echo "unknown option: $1" >&2; exit 2 ;;
  esac
done
cargo build --release -p jarvis-atomic-executor >&2
pids=()
trap 'kill "${pids[@]}" 2>/dev/null || true' EXIT
ours=$("$bench/start_server.sh" cmd --port 18084 --cpus 1 --log /tmp/bench-ours.log -- \
  env ARP_AUTH_PROFILE=dev-insecure target/release/jarvis-atomic-executor --port 18084 --packs "$packs" | tail -1)
pids+=("$ours")
targets=(--target "ours=http://127.0.0.1:18084@$ours")
if [[ $limit == 1 ]]; then
  # Built outside shared/, which is not ours to write into.
  lim=$(CARGO_TARGET_DIR=${LIMIT_TARGET_DIR:-/tmp/jarvis-limit-server-target} \
    "$bench/start_server.sh" limit --port 18090 --cpus 1 --log /tmp/bench-limit.log | tail -1)
  pids+=("$lim")
  targets+=(--target "limit=http://127.0.0.1:18090@$lim")
  "$bench/interleave.sh" "${targets[@]}" --rounds "$rounds" -c "$conc" -d "$dur" -n "$node" -i "$inputs" --client-cpus 0
else
  "$bench/load.sh" -u http://127.0.0.1:18084 -n "$node" -i "$inputs" -c "$conc" -d "$dur" -r "$rounds" \
    --client-cpus 0 --server-pid "$ours"
fi
