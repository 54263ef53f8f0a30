#!/usr/bin/env bash
# Runs per second of the coordinator, end to end (POST /v1/runs, then the run's event
# stream to run_completed), at 64 clients: SQLite with one coordinator, PostgreSQL with
# one and with two coordinators sharing the database (in one process, beside the
# executor). Needs PostgreSQL at JARVIS_TEST_POSTGRES_URL (default the local server).
# Environment: BENCH_RUNS (default 10000), BENCH_CONCURRENCY (default 64),
# JARVIS_RUN_COORDINATOR_DURABILITY (flush, the default, or fast).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
export BENCH_RUNS="${BENCH_RUNS:-10000}" BENCH_CONCURRENCY="${BENCH_CONCURRENCY:-64}"
cargo bench --workspace --bench runs_per_second --no-run
for setup in "sqlite 1" "postgres 1" "postgres 2"; do
    read -r database coordinators <<<"$setup"
    BENCH_DATABASE=$database BENCH_COORDINATORS=$coordinators \
        cargo bench --workspace --bench runs_per_second 2>&1 | grep '^runs_per_second\|^Error\|ERROR'
done
