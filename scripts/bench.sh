#!/usr/bin/env bash
# The benchmarks (`make bench`): drain throughput against the storage API's limit, and memory.
# BENCH_SCALE=tiny|small|full (default small: 10,000 queued objects, a few minutes on 2 cores;
# full: 100,000). BENCH_PROFILE=release (default) or debug. Results: target/bench/results.json.
# Detection at scale (issue 4's first part) is not measured yet.
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
trap 'scripts/cluster.sh destroy >/dev/null 2>&1 || true' EXIT
scripts/cluster.sh start >/dev/null
"target/$PROFILE/bench"
