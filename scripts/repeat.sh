#!/usr/bin/env bash
# The repeat gate (`make repeat`, N=5 by default): runs the whole test suite (`make test`) N
# times in a row in a clean clone of this checkout's HEAD, while another process keeps one core
# busy, and reports how many runs passed. A suite that passes only on a quiet machine, or only
# after a clean reboot, fails here. Use it before calling the suite reliable and whenever a test
# proves flaky. It tests what is committed: uncommitted changes are not in the clone.
#
#   scripts/repeat.sh [N]     logs in /tmp/pg_orphan_cleanup-repeat.*/run-K.log
#
# The clone builds from scratch (the first run takes longer) and its clusters use their own
# ports (PGOC_TEST_PORT, default 25633), so a developer's clusters are left alone. It installs
# the clone's build of the extension into the system PostgreSQL, as `make test` does.
set -euo pipefail
N="${1:-${N:-5}}"
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
WORK="$(mktemp -d /tmp/pg_orphan_cleanup-repeat.XXXXXX)"
git clone --quiet "$ROOT" "$WORK/clone"
echo "repeat gate: $N runs of make test in $WORK/clone (commit $(git -C "$WORK/clone" rev-parse --short HEAD)), one core kept busy"

# The load: a shell busy loop, pinned to no core, for the whole gate.
( while :; do :; done ) &
HOG=$!
trap 'kill "$HOG" 2>/dev/null || true' EXIT

passed=0
for k in $(seq 1 "$N"); do
  start=$(date +%s)
  if (cd "$WORK/clone" && PGOC_TEST_PORT="${PGOC_TEST_PORT:-25633}" make test) >"$WORK/run-$k.log" 2>&1; then
    passed=$((passed + 1))
    result="passed ($(grep -Eo 'tests: [0-9]+ passed, [0-9]+ failed' "$WORK/run-$k.log" | tail -1))"
  else
    result="FAILED: $(grep -E '^test .* FAILED$|panicked at|^error' "$WORK/run-$k.log" | head -3 | tr '\n' ' ')"
  fi
  echo "run $k/$N: $result in $(($(date +%s) - start)) s (log $WORK/run-$k.log)"
done
echo "repeat gate: $passed of $N runs passed with one core kept busy"
[ "$passed" -eq "$N" ]
