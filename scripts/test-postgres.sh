#!/usr/bin/env bash
# Runs the coordinator's integration suite again with every coordinator on PostgreSQL
# (`JARVIS_TEST_DATABASE=postgres`): each test creates a database of its own on the
# server at JARVIS_TEST_POSTGRES_URL (default postgres://postgres@127.0.0.1:5432/test)
# and drops it. Extra arguments go to the test binary (e.g. a name filter).
#
# The binary is the one `cargo test --workspace` builds (run through cargo with
# --workspace so no dependency is rebuilt with other features), started from the
# crate's directory as cargo would.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

export JARVIS_TEST_POSTGRES_URL="${JARVIS_TEST_POSTGRES_URL:-postgres://postgres@127.0.0.1:5432/test}"
binary=$(cargo test --workspace --test all --no-run --message-format=json 2>/dev/null |
    python3 -c '
import json, sys
for line in sys.stdin:
    msg = json.loads(line)
    target = msg.get("target") or {}
    if (msg.get("executable") and target.get("name") == "all"
            and "/coordinator/" in target.get("src_path", "")):
        print(msg["executable"])
')
if [[ -z "$binary" ]]; then
    echo "the coordinator's test binary was not built" >&2
    exit 1
fi
cd coordinator
JARVIS_TEST_DATABASE=postgres "$binary" "$@"
