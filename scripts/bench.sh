#!/usr/bin/env bash
# The benchmarks (`make bench`): detection cost as tables grow, drain throughput against the
# storage API's limit, memory.
# BENCH_SCALE=tiny|small|full (default small: 100,000 jobs and 10,000 queued objects, about a
# minute on 2 cores; full: 100,000 and 1,000,000 jobs and 100,000 queued objects). BENCH_PROFILE=
# release (default) or debug. BENCH_GUIDE_DELETE_SECONDS (300): how long the guide's emergency
# DELETE may run before it is stopped and reported unfinished. BENCH_ONLY=detection runs the
# detection half alone (for profiling), BENCH_ONLY=queue the per-row claim and confirm costs, BENCH_ONLY=strays stray reconciliation (10,000 / 100,000 / 1,000,000 objects in storage.objects by scale). BENCH_AUTO_EXPLAIN=100ms logs the plan of every statement,
# nested ones too, that runs longer than that (auto_explain) into target/bench/postgres.log. Results: target/bench/results.json. See BENCHMARKS.md.
set -euo pipefail
cd "$(dirname "$0")/.."
PROFILE="${BENCH_PROFILE:-release}"
export BENCH_PROFILE="$PROFILE"
scripts/setup.sh >/dev/null
if [ "$PROFILE" = release ]; then
  PROFILE=release scripts/install.sh >/dev/null
  cargo build -q --release -p reaper -p storage-emulator -p bench
else
  scripts/install.sh >/dev/null
  cargo build -q -p reaper -p storage-emulator -p bench
fi
export PGOC_PORT="${BENCH_PORT:-25450}"
scripts/cluster.sh destroy >/dev/null
LOG_COPY=""
if [ -n "${BENCH_AUTO_EXPLAIN:-}" ]; then
  export PGOC_EXTRA_CONF="session_preload_libraries = 'auto_explain'
auto_explain.log_min_duration = '$BENCH_AUTO_EXPLAIN'
auto_explain.log_nested_statements = on"
  mkdir -p target/bench
  LOG_COPY="cp '${PGOC_DIR:-/tmp/pg_orphan_cleanup-$PGOC_PORT}/postgres.log' target/bench/postgres.log 2>/dev/null;"
fi
trap "$LOG_COPY scripts/cluster.sh destroy >/dev/null 2>&1 || true" EXIT
scripts/cluster.sh start >/dev/null
"target/$PROFILE/bench"
