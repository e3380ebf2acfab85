#!/usr/bin/env bash
# The test command (`make test`): unit and property tests, the #[pg_test] tests, then the
# end-to-end tests against a throwaway cluster with the extension installed. Installs whatever
# is missing first, so it works on a fresh machine.
set -euo pipefail
cd "$(dirname "$0")/.."

# Every cargo test run is teed here, so the last line can total them up.
RESULTS=$(mktemp)
trap 'rm -f "$RESULTS"' EXIT
ctest() { cargo test "$@" 2>&1 | tee -a "$RESULTS"; return "${PIPESTATUS[0]}"; }

# The e2e tests' cluster; +1 and +2 are clusters some tests start for themselves.
export PGOC_PORT="${PGOC_TEST_PORT:-25433}"
# Nothing from an earlier run may act on this run's cluster (issue 10): refuse, naming the pid.
scripts/leftovers.sh "$PGOC_PORT"

scripts/setup.sh

echo "==> unit and property tests (URL parser, reaper, storage emulator)"
ctest -p object-url -p reaper -p storage-emulator

echo "==> #[pg_test] tests (pgrx's own throwaway cluster, run as postgres)"
PGRX_TEST_DIR=/tmp/pg_orphan_cleanup-pgrx-test
mkdir -p "$PGRX_TEST_DIR"
chown postgres:postgres "$PGRX_TEST_DIR"
CARGO_PGRX_TEST_RUNAS=postgres CARGO_PGRX_TEST_PGDATA="$PGRX_TEST_DIR/data" \
  ctest -p pg_orphan_cleanup

echo "==> end-to-end tests (tests/) against a fresh cluster, the storage emulator and real reaper processes"
cargo build -p reaper -p storage-emulator
scripts/install.sh
scripts/cluster.sh destroy >/dev/null
cleanup() {
  scripts/cluster.sh stop >/dev/null || true
  # Clusters some tests start for themselves: one without preload, one hot standby.
  PGOC_PORT=$((PGOC_PORT + 1)) scripts/cluster.sh destroy >/dev/null 2>&1 || true
  standby="/tmp/pg_orphan_cleanup-standby-$((PGOC_PORT + 2))"
  [ -d "$standby/data" ] && runuser -u postgres -- /usr/lib/postgresql/15/bin/pg_ctl -D "$standby/data" -m immediate stop >/dev/null 2>&1 || true
  rm -rf "$standby" "$RESULTS"
}
trap cleanup EXIT
scripts/cluster.sh start
ctest -p e2e -- --test-threads=1
echo "==> the guarantees' suites again, against the managed edition (PGOC_EDITION=managed)"
PGOC_EDITION=managed ctest -p e2e --test detection --test queue --test save_guard --test object_guard \
  --test breaker --test reaper --test chaos --test strays --test inventory --test references --test partitions --test savings -- --test-threads=1

echo "==> the demo, at CI size (it must not rot)"
DEMO_JOBS="${DEMO_JOBS:-2000}" scripts/demo.sh >/tmp/pg_orphan_cleanup-demo.log 2>&1 || { cat /tmp/pg_orphan_cleanup-demo.log; exit 1; }
tail -n 2 /tmp/pg_orphan_cleanup-demo.log
echo "==> the demo in the managed edition, on a simulated managed platform, at CI size"
DEMO_EDITION=managed DEMO_JOBS="${DEMO_JOBS:-1000}" scripts/demo.sh >/tmp/pg_orphan_cleanup-demo-managed.log 2>&1 \
  || { cat /tmp/pg_orphan_cleanup-demo-managed.log; exit 1; }
tail -n 2 /tmp/pg_orphan_cleanup-demo-managed.log

echo "==> the benchmark harness, tiny and unoptimized (a smoke run so it cannot rot; its figures mean nothing)"
BENCH_PROFILE=debug BENCH_SCALE=tiny scripts/bench.sh >/tmp/pg_orphan_cleanup-bench-smoke.log 2>&1 \
  || { cat /tmp/pg_orphan_cleanup-bench-smoke.log; exit 1; }
grep -E "^\| reaper \(defaults\)" /tmp/pg_orphan_cleanup-bench-smoke.log

passed=$(grep -Eo '[0-9]+ passed' "$RESULTS" | awk '{s+=$1} END {print s+0}')
failed=$(grep -Eo '[0-9]+ failed' "$RESULTS" | awk '{s+=$1} END {print s+0}')
echo "tests: $passed passed, $failed failed"
