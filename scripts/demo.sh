#!/usr/bin/env bash
# The demo (`make demo`): the deployment guide's checklist, coming true on a throwaway cluster.
#
#   1. install everything, start a throwaway PostgreSQL 15 with the extension preloaded
#   2. load the app schema and a realistic render history (DEMO_JOBS jobs, default 5000)
#   3. the guide's pre-deployment validation (step 2A), as orphan_cleanup.validation_report()
#   4. deploy: CREATE EXTENSION, the indexes, the settings, attach()
#   5. watch the background worker run cleanup cycles (the guide's step 2B monitoring)
#   6. the validation report again, the queue, health()
#
# The storage half (the reaper deleting the queued objects from Supabase Storage) is the
# reaper's job; until it lands, the demo ends with every deletable orphan queued and every
# saved asset untouched. Nothing is left running.
set -euo pipefail
cd "$(dirname "$0")/.."

JOBS="${DEMO_JOBS:-5000}"
HOST_NAME="abcd.supabase.co"
export PGOC_PORT="${DEMO_PORT:-55440}"
export PGHOST=127.0.0.1 PGPORT="$PGOC_PORT" PGUSER=postgres PGDATABASE=postgres
step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }
psql_q() { psql -X -v ON_ERROR_STOP=1 -q "$@"; }

step "1. Install and start a throwaway cluster (port $PGOC_PORT)"
scripts/setup.sh >/dev/null
scripts/install.sh >/dev/null
scripts/cluster.sh destroy >/dev/null
trap 'scripts/cluster.sh destroy >/dev/null 2>&1 || true' EXIT
scripts/cluster.sh start
LOG="/tmp/pg_orphan_cleanup-${PGOC_PORT}/postgres.log"

step "2. The app: render_jobs and user_assets with $JOBS jobs of history"
psql_q -f sql/app_schema.sql
psql_q -v jobs="$JOBS" -v host="$HOST_NAME" -f sql/generate_data.sql
psql_q -c "SELECT status, count(*) AS jobs FROM render_jobs GROUP BY 1 ORDER BY 2 DESC"
psql_q -c "SELECT asset_type, count(*) AS assets FROM user_assets GROUP BY 1 ORDER BY 2 DESC"

step "3. Pre-deployment verification (guide step 2A)"
psql_q -c "CREATE EXTENSION pg_orphan_cleanup"
psql_q -c "SELECT metric, value FROM orphan_cleanup.validation_report() WHERE metric IN ('orphaned jobs (guide definition)', 'saved assets', 'jobs in the last hour', 'orphans older than 5 minutes')"
SAVED_BEFORE=$(psql_q -tAc "SELECT count(*) FROM user_assets WHERE asset_type = 'generated_saved'")

step "4. Deploy: indexes, settings, attach()"
time psql_q -f sql/indexes.sql
psql_q <<SQL
ALTER SYSTEM SET orphan_cleanup.allowed_buckets = 'renders';
ALTER SYSTEM SET orphan_cleanup.allowed_hosts = '$HOST_NAME';
ALTER SYSTEM SET orphan_cleanup.min_age = '1h';
ALTER SYSTEM SET orphan_cleanup.interval = '3s';   -- the guide tests with 3 minutes; 3 seconds here
ALTER SYSTEM SET orphan_cleanup.max_per_cycle = 1000;
SELECT pg_reload_conf();
SQL
sleep 1
psql_q -c "SELECT * FROM orphan_cleanup.attach()"

step "5. First cleanup cycles (guide step 2B): the worker, every 3 seconds"
expected=$(psql_q -tAc "SELECT count(*) FROM orphan_cleanup.preview(NULL, 1000000) WHERE verdict = 'orphan'")
for _ in $(seq 1 60); do
  queued=$(psql_q -tAc "SELECT count(*) FROM orphan_cleanup.deletion_queue WHERE state = 'pending'")
  [ "$queued" -ge "$expected" ] && break
  sleep 1
done
grep -E "Starting comprehensive cleanup cycle|Comprehensive cleanup cycle completed" "$LOG" | sed 's/^[0-9-]* //' | head -8
psql_q -c "SELECT id, status, actor, found, enqueued, protected, rejected, duration_ms FROM orphan_cleanup.cycle_log ORDER BY id LIMIT 8"

step "6. Post-deployment validation"
psql_q -c "SELECT * FROM orphan_cleanup.validation_report()"
psql_q -c "SELECT pending, ready, claimed, dead, rejected, health, reaping_enabled FROM orphan_cleanup.queue_status()"
psql_q -c "SELECT check_name, status, detail FROM orphan_cleanup.health() WHERE status <> 'ok' OR check_name IN ('worker', 'last cycle', 'save guard')"
SAVED_AFTER=$(psql_q -tAc "SELECT count(*) FROM user_assets WHERE asset_type = 'generated_saved'")
TOUCHED=$(psql_q -tAc "SELECT count(*) FROM orphan_cleanup.deletion_queue q JOIN user_assets a ON orphan_cleanup.job_ref_key(a.metadata->>'render_job_id') = q.job_id::text WHERE q.state IN ('pending', 'claimed')")

echo
echo "Deletable orphans queued: $queued of $expected. Saved assets: $SAVED_BEFORE before, $SAVED_AFTER after; queued rows of saved jobs: $TOUCHED."
if [ "$queued" -lt "$expected" ] || [ "$SAVED_BEFORE" != "$SAVED_AFTER" ] || [ "$TOUCHED" != 0 ]; then
  echo "DEMO FAILED" >&2
  exit 1
fi
echo "Demo complete: every deletable orphan is queued for the reaper, and no saved asset's job is."
