#!/usr/bin/env bash
# Starts a built service on a free port and runs the official ARP conformance
# CLI (../shared/arp-conformance.sh) against it, smoke and surface tiers.
# Usage: scripts/conformance.sh atomic-executor|run-coordinator [BINARY]
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
service=${1:?usage: scripts/conformance.sh atomic-executor|run-coordinator [BINARY]}
scratch=$(mktemp -d)
case "$service" in
  atomic-executor) package=jarvis-atomic-executor; args=(--packs nodepacks) ;;
  run-coordinator) package=jarvis-run-coordinator; args=(--db "$scratch/coordinator.sqlite3") ;;
  *) echo "unknown service: $service" >&2; exit 2 ;;
esac
binary=${2:-}
if [[ -z $binary ]]; then
  cargo build -q -p "$package"
  binary=${CARGO_TARGET_DIR:-target}/debug/$package
fi
shared=${SHARED_DIR:-../shared}
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
log=$scratch/service.log
# Authentication is required by default (as in the reference); conformance runs without tokens.
ARP_AUTH_PROFILE=dev-insecure "$binary" --port "$port" "${args[@]}" >"$log" 2>&1 &
pid=$!
trap 'kill $pid 2>/dev/null || true; rm -rf "$scratch"' EXIT
for _ in $(seq 100); do
  curl -fsS "http://127.0.0.1:$port/v1/health" >/dev/null 2>&1 && break
  kill -0 $pid 2>/dev/null || { echo "$service exited:"; cat "$log"; exit 1; }
  sleep 0.1
done
bash "$shared/arp-conformance.sh" "$service" "http://127.0.0.1:$port"
