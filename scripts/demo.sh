#!/usr/bin/env bash
# The demo (`make demo`): the deployment guide's checklist, coming true on a throwaway cluster
# and a local Supabase Storage (the storage emulator).
#
#   1. install everything, build, start PostgreSQL 15 (extension preloaded) and the storage
#   2. the app: render history (DEMO_JOBS jobs, default 5000), a real object for every completed job,
#      kept in storage.objects as Supabase keeps it; and months of leak: the app deleted its old
#      job rows and left their files behind (strays)
#   3. the guide's pre-deployment validation (step 2A)
#   4. deploy: CREATE EXTENSION, indexes, settings, attach(), the reaper's role; the strays
#      previewed, and reconciliation turned on
#   5. the background worker runs cleanup cycles every 3 seconds; `reaper run` deletes what they queue
#   6. the validation report again, the savings report, storage before and after in bytes and
#      dollars a month, and every saved asset's file checked
#
# DEMO_EDITION=managed tells the same story with the managed edition, on a simulated managed
# platform (scripts/cluster.sh PGOC_PLATFORM=managed): no pg_orphan_cleanup preloaded, pg_cron
# preloaded and created by the platform's superuser, and the app's database owned by app_owner,
# a role that is no superuser. app_owner installs the edition, sets it up and schedules it with
# pg_cron, as the README's "Hosted Supabase and other managed PostgreSQL" says.
# Nothing is left running.
set -euo pipefail
cd "$(dirname "$0")/.."

JOBS="${DEMO_JOBS:-5000}"
EDITION="${DEMO_EDITION:-extension}"
case "$EDITION" in extension|managed) ;; *) echo "DEMO_EDITION must be extension or managed, not '$EDITION'" >&2; exit 2;; esac
export PGOC_PORT="${DEMO_PORT:-25440}"
EMU_PORT="${DEMO_STORAGE_PORT:-25441}"
BASE="http://127.0.0.1:${EMU_PORT}"
STORAGE_DIR="/tmp/pg_orphan_cleanup-demo-storage"
JWT_SECRET="demo-jwt-secret-for-the-local-storage-emulator"
export PGHOST=127.0.0.1 PGPORT="$PGOC_PORT" PGUSER=postgres PGDATABASE=postgres
if [ "$EDITION" = managed ]; then
  # The app's database and its owner; the platform's superuser does only what a platform does.
  export PGOC_PLATFORM=managed PGOC_CRON_DB=app PGUSER=app_owner PGDATABASE=app
fi
as_admin() { PGUSER=postgres psql -X -v ON_ERROR_STOP=1 -q "$@"; }
step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }
psql_q() { psql -X -v ON_ERROR_STOP=1 -q "$@"; }

EMU_PID=""
REAPER_PID=""
cleanup() {
  [ -n "$REAPER_PID" ] && kill "$REAPER_PID" 2>/dev/null || true
  [ -n "$EMU_PID" ] && kill "$EMU_PID" 2>/dev/null || true
  scripts/cluster.sh destroy >/dev/null 2>&1 || true
  rm -rf "$STORAGE_DIR"
}
trap cleanup EXIT

step "1. Install, build, and start a throwaway cluster (port $PGOC_PORT, the $EDITION edition) and storage ($BASE)"
scripts/setup.sh >/dev/null
if [ "$EDITION" = managed ]; then
  MANAGED_SQL=$(scripts/managed.py)
else
  scripts/install.sh >/dev/null
fi
cargo build -q -p reaper -p storage-emulator
EMU=target/debug/storage-emulator
REAPER=target/debug/reaper
scripts/cluster.sh destroy >/dev/null
scripts/cluster.sh start
LOG="/tmp/pg_orphan_cleanup-${PGOC_PORT}/postgres.log"
rm -rf "$STORAGE_DIR"
if [ "$EDITION" = managed ]; then
  echo "the platform: app_owner (no superuser) owns database app; pg_cron is there; the reaper's login role is made by the admin"
  as_admin -d postgres -c "CREATE ROLE app_owner LOGIN NOSUPERUSER NOCREATEROLE NOCREATEDB" \
    -c "CREATE ROLE orphan_cleanup_reaper NOLOGIN" -c "CREATE ROLE demo_reaper LOGIN IN ROLE orphan_cleanup_reaper" \
    -c "CREATE DATABASE app OWNER app_owner"
  as_admin -d app -c "ALTER SCHEMA public OWNER TO app_owner" -c "CREATE EXTENSION pg_cron" -c "GRANT USAGE ON SCHEMA cron TO app_owner"
fi

step "2. The app: render_jobs and user_assets with $JOBS jobs of history, and their files in storage"
psql_q -f sql/app_schema.sql
if [ "$EDITION" = managed ]; then
  psql_q -f "$MANAGED_SQL"   # as app_owner: a migration's worth of SQL
else
  psql_q -c "CREATE EXTENSION pg_orphan_cleanup"
fi
psql_q -v jobs="$JOBS" -v base="$BASE" -f sql/generate_data.sql
# Months of leak: the jobs of the last three months, which the app has since deleted (below),
# leaving their files in the bucket. None was saved (users keep a few; those are in the history).
LEAKED=$(( JOBS / 2 ))
psql_q -c "INSERT INTO render_jobs (user_id, status, output_url, prompt, created_at, updated_at, completed_at)
           SELECT u, 'completed', format('%s/storage/v1/object/public/renders/%s/%s.png', '$BASE', u, gen_random_uuid()),
                  'an old render', t, t, t
           FROM (SELECT ('00000000-0000-4000-8000-' || lpad((g % 200)::text, 12, '0'))::uuid AS u,
                        now() - interval '20 days' - random() * interval '70 days' AS t
                 FROM generate_series(1, $LEAKED) AS g) AS s"
# One object per completed job (sizes 2-20 KB), and the uploads and avatars of other asset types.
psql_q -tA -c "SELECT orphan_cleanup.object_key(output_url) || E'\t' || (2000 + abs(hashtext(id::text)) % 18000)
               FROM render_jobs WHERE output_url IS NOT NULL
               UNION ALL
               SELECT 'uploads/' || (metadata->>'path') || E'\t' || 5000 FROM user_assets WHERE metadata ? 'path'" \
  | "$EMU" seed --data-dir "$STORAGE_DIR"
# Storage keeps storage.objects in the app's database, as Supabase Storage does.
"$EMU" serve --listen "127.0.0.1:${EMU_PORT}" --data-dir "$STORAGE_DIR" --jwt-secret "$JWT_SECRET" \
  --database-url "postgres://postgres@127.0.0.1:${PGOC_PORT}/${PGDATABASE}" >/tmp/pg_orphan_cleanup-demo-storage.log 2>&1 &
EMU_PID=$!
SERVICE_KEY=$("$EMU" keys --jwt-secret "$JWT_SECRET" | sed -n 's/^SERVICE_ROLE_KEY=//p')
for _ in $(seq 1 50); do curl -sf "$BASE/__emulator/health" >/dev/null && break; sleep 0.1; done
# Each file as old as its job (the seed wrote them all just now); the uploads a month old. On
# Supabase the project's roles may read storage.objects; here the app's owner is granted it.
as_admin -d "$PGDATABASE" <<'SQL'
UPDATE storage.objects AS o SET created_at = j.created_at, updated_at = j.created_at
FROM render_jobs AS j WHERE o.bucket_id || '/' || o.name = orphan_cleanup.object_key(j.output_url);
UPDATE storage.objects SET created_at = now() - interval '30 days', updated_at = now() - interval '30 days' WHERE bucket_id = 'uploads';
SQL
if [ "$EDITION" = managed ]; then
  as_admin -d "$PGDATABASE" -c "GRANT USAGE ON SCHEMA storage TO app_owner" -c "GRANT SELECT ON storage.objects TO app_owner"
fi
# The leak: the app deleted its old job rows, and nothing deleted their files.
psql_q -c "DELETE FROM render_jobs WHERE prompt = 'an old render'"
echo "the app deleted $LEAKED old job rows; their files stayed in storage"
# What the guide's emergency DELETE (step 7B) would have deleted besides: saved jobs whose assets
# spell the job id otherwise, which its exact-text join does not see.
psql_q -c "SELECT count(*) AS \"saved jobs the guide's step 7B DELETE would delete\"
           FROM render_jobs rj
           WHERE rj.status = 'completed'
             AND NOT EXISTS (SELECT 1 FROM user_assets ua WHERE ua.metadata->>'render_job_id' = rj.id::text)
             AND EXISTS (SELECT 1 FROM user_assets ua WHERE orphan_cleanup.job_ref_key(ua.metadata->>'render_job_id') = rj.id::text)"
storage_snapshot() {  # $1: table name; loads the emulator's object list into it
  psql_q -c "SET client_min_messages = warning; DROP TABLE IF EXISTS $1; CREATE TABLE $1 (object text PRIMARY KEY, size bigint)"
  curl -sf "$BASE/__emulator/objects.tsv" | psql_q -c "COPY $1 FROM STDIN"
}
storage_snapshot demo_storage_before
psql_q -c "SELECT status, count(*) AS jobs FROM render_jobs GROUP BY 1 ORDER BY 2 DESC"
psql_q -c "SELECT split_part(object, '/', 1) AS bucket, count(*) AS objects, pg_size_pretty(sum(size)) AS size FROM demo_storage_before GROUP BY 1"

step "3. Pre-deployment verification (guide step 2A)"
psql_q -c "SELECT metric, value FROM orphan_cleanup.validation_report() WHERE metric IN ('orphaned jobs (guide definition)', 'saved assets', 'jobs in the last hour', 'orphans older than 5 minutes')"

step "4. Deploy: indexes, settings, attach(), the reaper's role"
psql_q -f sql/indexes.sql
if [ "$EDITION" = managed ]; then
  psql_q <<SQL
SELECT orphan_cleanup.set_setting('allowed_buckets', 'renders');
SELECT orphan_cleanup.set_setting('allowed_hosts', '127.0.0.1:${EMU_PORT}');
SELECT orphan_cleanup.set_setting('min_age', '1h');
SELECT orphan_cleanup.set_setting('interval', '1min');  -- pg_cron's finest schedule here
SELECT orphan_cleanup.set_setting('max_per_cycle', '10000');
SQL
else
  psql_q <<SQL
ALTER SYSTEM SET orphan_cleanup.allowed_buckets = 'renders';
ALTER SYSTEM SET orphan_cleanup.allowed_hosts = '127.0.0.1:${EMU_PORT}';
ALTER SYSTEM SET orphan_cleanup.min_age = '1h';
ALTER SYSTEM SET orphan_cleanup.interval = '3s';   -- the guide tests with 3 minutes; 3 seconds here
ALTER SYSTEM SET orphan_cleanup.max_per_cycle = 1000;
SELECT pg_reload_conf();
CREATE ROLE demo_reaper LOGIN IN ROLE orphan_cleanup_reaper;
SQL
  sleep 1
fi
psql_q -c "SELECT * FROM orphan_cleanup.attach()"
orphans=$(psql_q -tAc "SELECT count(*) FROM orphan_cleanup.preview(NULL, 1000000) WHERE verdict = 'orphan'")
echo "deletable orphans: $orphans"
echo "strays: files no job names, older than stray_min_age (7 days), previewed before reconciliation runs:"
psql_q -c "SELECT count(*) AS strays, pg_size_pretty(sum(bytes)) AS size, min(age) AS youngest, max(age) AS oldest FROM orphan_cleanup.preview_strays(NULL, 1000000)"
psql_q -c "SELECT bucket, object_path, bytes, age FROM orphan_cleanup.preview_strays(NULL, 3)"
strays=$(psql_q -tAc "SELECT count(*) FROM orphan_cleanup.preview_strays(NULL, 1000000)")
expected=$(( orphans + strays ))
echo "looked at: turning reconciliation on"
if [ "$EDITION" = managed ]; then
  psql_q -c "SELECT orphan_cleanup.set_setting('reclaim_strays', 'on')"
else
  psql_q -c "ALTER SYSTEM SET orphan_cleanup.reclaim_strays = on" -c "SELECT pg_reload_conf()"
fi

if [ "$EDITION" = managed ]; then
  step "5. Cleanup cycles every minute (pg_cron, as app_owner) and the reaper deleting in bulk"
  psql_q -c "SELECT cron.schedule('orphan-cleanup', '* * * * *', 'SELECT orphan_cleanup.run_cycle()')"
  psql_q -c "SELECT check_name, status, detail FROM orphan_cleanup.health() WHERE check_name = 'scheduler'"
else
  step "5. Cleanup cycles every 3 seconds (the worker) and the reaper deleting in bulk"
fi
DATABASE_URL="postgres://demo_reaper@127.0.0.1:${PGOC_PORT}/${PGDATABASE}" SUPABASE_URL="$BASE" SUPABASE_SERVICE_ROLE_KEY="$SERVICE_KEY" \
  "$REAPER" run --buckets renders --poll-interval 2s >/tmp/pg_orphan_cleanup-demo-reaper.log 2>&1 &
REAPER_PID=$!
for _ in $(seq 1 200); do
  done_rows=$(psql_q -tAc "SELECT count(*) FROM orphan_cleanup.deletion_queue WHERE state IN ('deleted', 'absent')")
  [ "$done_rows" -ge "$expected" ] && break
  sleep 1
done
kill -TERM "$REAPER_PID"; wait "$REAPER_PID" || true; REAPER_PID=""
grep -E "Starting comprehensive cleanup cycle|Comprehensive cleanup cycle completed" "$LOG" | sed 's/^[0-9-]* //' | head -6
echo "--- reaper log (last lines) ---"
sed -E 's/\x1b\[[0-9;]*m//g' /tmp/pg_orphan_cleanup-demo-reaper.log | tail -4

step "6. Post-deployment validation"
psql_q -c "SELECT * FROM orphan_cleanup.validation_report()"
psql_q -c "SELECT check_name, status, detail FROM orphan_cleanup.health() WHERE status <> 'ok' OR check_name IN ('scheduler', 'last cycle', 'save guard')"
storage_snapshot demo_storage_after
psql_q <<'SQL'
SELECT b.bucket, b.objects AS objects_before, coalesce(a.objects, 0) AS objects_after,
       pg_size_pretty(b.bytes) AS size_before, pg_size_pretty(coalesce(a.bytes, 0)) AS size_after
FROM (SELECT split_part(object, '/', 1) AS bucket, count(*) AS objects, sum(size) AS bytes FROM demo_storage_before GROUP BY 1) b
LEFT JOIN (SELECT split_part(object, '/', 1) AS bucket, count(*) AS objects, sum(size) AS bytes FROM demo_storage_after GROUP BY 1) a USING (bucket)
ORDER BY 1;
SQL
read -r saved saved_missing <<<"$(psql_q -tA -F ' ' -c "
  SELECT count(*), count(*) FILTER (WHERE s.object IS NULL)
  FROM user_assets a
  JOIN render_jobs j ON j.id::text = orphan_cleanup.job_ref_key(a.metadata->>'render_job_id')
  LEFT JOIN demo_storage_after s ON s.object = orphan_cleanup.object_key(j.output_url)")"
read -r deleted_objects reclaimed orphan_bytes <<<"$(psql_q -tA -F ' ' -c "
  SELECT (SELECT count(*) FROM demo_storage_before b WHERE NOT EXISTS (SELECT 1 FROM demo_storage_after a WHERE a.object = b.object)),
         (SELECT sum(size) FROM demo_storage_before) - (SELECT sum(size) FROM demo_storage_after),
         (SELECT sum(b.size) FROM demo_storage_before b JOIN orphan_cleanup.deletion_queue q
                 ON q.state = 'deleted' AND b.object = q.bucket || '/' || q.object_path)")"
left=$(psql_q -tAc "SELECT count(*) FROM orphan_cleanup.preview(NULL, 1000000) WHERE verdict = 'orphan'")
strays_left=$(psql_q -tAc "SELECT count(*) FROM orphan_cleanup.preview_strays(NULL, 1000000)")
echo "--- the savings report (reaper report: what a DBA pastes into the weekly review) ---"
DATABASE_URL="postgres://demo_reaper@127.0.0.1:${PGOC_PORT}/${PGDATABASE}" SUPABASE_URL="$BASE" SUPABASE_SERVICE_ROLE_KEY="$SERVICE_KEY" \
  "$REAPER" report --period day --periods 3
psql_q <<'SQL'
SELECT pg_size_pretty((SELECT sum(size) FROM demo_storage_before)) AS storage_before,
       pg_size_pretty((SELECT sum(size) FROM demo_storage_after)) AS storage_after,
       to_char((SELECT sum(size) FROM demo_storage_before) / 1073741824.0 * c.storage_price_per_gb_month, 'FM$990.0000') AS per_month_before,
       to_char((SELECT sum(size) FROM demo_storage_after) / 1073741824.0 * c.storage_price_per_gb_month, 'FM$990.0000') AS per_month_after
FROM orphan_cleanup._config() AS c;
SQL
echo
echo "Saved assets: $saved, their files missing from storage: $saved_missing."
echo "Objects deleted from storage: $deleted_objects (deletable orphans found: $orphans, strays: $strays); deletable orphans left: $left, strays left: $strays_left."
echo "Storage reclaimed: $reclaimed bytes; the deleted rows' bytes: $orphan_bytes."
if [ "$saved_missing" != 0 ] || [ "$deleted_objects" != "$expected" ] || [ "$left" != 0 ] || [ "$strays_left" != 0 ] || [ "$reclaimed" != "$orphan_bytes" ]; then
  echo "DEMO FAILED" >&2
  exit 1
fi
echo "Demo complete: every deletable orphan's and every stray's file is gone, and every saved asset's file is still there."
