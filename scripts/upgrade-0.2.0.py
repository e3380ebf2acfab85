#!/usr/bin/env python3
# Writes pg_orphan_cleanup/sql/pg_orphan_cleanup--0.1.0--0.2.0.sql from the sql/*.sql sources:
# every function the update creates or replaces is cut from its source file, so the upgrade
# script never drifts from a fresh install (tests/tests/upgrade.rs compares the two catalogs).
# Run it after changing any function the update touches:  python3 scripts/upgrade-0.2.0.py
import os
import re
ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), '..')
src={}
for f in ['schema','pause','detect','guard','queue','reports','breaker','strays','inventory','references','partitions']:
    src[f]=open(os.path.join(ROOT, f'pg_orphan_cleanup/sql/{f}.sql')).read()

def fn(file, name, replace=True, sig=None):
    s=src[file]
    i=s.index(f"CREATE FUNCTION orphan_cleanup.{name}(" + (sig or ""))
    j_dollar=s.find('\n$$;', i)
    j_return=s.find(';\n', i)
    k=s.find('AS $$', i)
    line_end=s.find('\n', k)
    atomic=s.find('BEGIN ATOMIC', i)
    if atomic!=-1 and atomic < j_return:
        j=s.index('\nEND;', i)+len('\nEND;')
    elif k!=-1 and k < j_return and s[k:line_end].rstrip().endswith('$$;') and s[k:line_end].count('$$')==2:
        j=line_end
    elif k!=-1 and k < j_return:
        j=j_dollar+len('\n$$;')
    else:
        j=j_return+1
    body=s[i:j]
    if replace:
        body=body.replace("CREATE FUNCTION","CREATE OR REPLACE FUNCTION",1)
    return body+"\n"

def section(file, start, end):
    s=src[file]
    i=s.index(start); j=s.index(end, i)+len(end)
    return s[i:j]+"\n"

out=[]
out.append("""-- pg_orphan_cleanup 0.1.0 -> 0.2.0
--
-- A reaper is handed only the rows it serves (its buckets and hosts), and gives back what its
-- own allow-list still refuses instead of dead-lettering it; the reapers are recorded, and
-- health() and queue_status() name a misconfigured one. Cycles gain a pause point for tests.
-- The save guarantee becomes per object (orphan_cleanup.objects): a hand-out is recorded on the
-- object and outlives the queue row; saves, job writes and claims conflict on the object's row
-- at every isolation level; the jobs table gets a guard of its own; cancel() keeps the object.
-- Run by ALTER EXTENSION pg_orphan_cleanup UPDATE; the queue and its history are kept.
-- tests/tests/upgrade.rs checks that the result equals a fresh install of 0.2.0.

\\echo Use "ALTER EXTENSION pg_orphan_cleanup UPDATE TO '0.2.0'" to load this file. \\quit

-- The update changes guards itself: the DDL watch it creates stays out of its way (a mark in a
-- table only the extension writes, sql/guard.sql; removed at the end).
""")
out.append(section('guard', "CREATE TABLE orphan_cleanup.guards_changing (", "since timestamptz NOT NULL DEFAULT now()\n);"))
out.append("REVOKE ALL ON orphan_cleanup.guards_changing FROM PUBLIC;\n")
out.append(fn('guard', '_guards_changing', replace=False))
out.append(fn('guard', '_guards_changed', replace=False))
out.append("""INSERT INTO orphan_cleanup.guards_changing (txid) VALUES (pg_catalog.pg_current_xact_id());

-- Every lock below is brief, but waiting behind a long transaction would stall the app's writes
-- queued behind this update: give up after 10 s instead (run the update again at a quieter time).
SET LOCAL lock_timeout = '10s';

-- This session must run the 0.2.0 library: a backend that loaded the previous build before it
-- was replaced keeps running it, and would rebuild indexes with the old object_key().
DO $probe$
BEGIN
    IF orphan_cleanup.object_key('renders/x.png ') IS NULL THEN
        RAISE EXCEPTION 'this session runs the pg_orphan_cleanup library of the previous version'
            USING HINT = 'Install the 0.2.0 build first; then reconnect (restart PostgreSQL if the library is preloaded) and run ALTER EXTENSION pg_orphan_cleanup UPDATE again.';
    END IF;
END
$probe$;

-- _config() returns the new settings cycle_time_budget, stray_min_age,
-- storage_price_per_gb_month and reclaim_strays too (Rust; its row type changes).
-- _breaker_settings() (a SQL-standard body, which depends on it) goes first and comes back below.
DROP FUNCTION orphan_cleanup._breaker_settings();
DROP FUNCTION orphan_cleanup._config();
CREATE FUNCTION orphan_cleanup."_config"() RETURNS TABLE (
	"enabled" bool,
	"reaping_enabled" bool,
	"interval_s" INT,
	"min_age_s" INT,
	"age_column" TEXT,
	"grace_s" INT,
	"max_per_cycle" INT,
	"jobs_table" TEXT,
	"assets_table" TEXT,
	"allowed_buckets" TEXT,
	"allowed_prefixes" TEXT,
	"allowed_hosts" TEXT,
	"on_confirm" TEXT,
	"dry_run" bool,
	"max_attempts" INT,
	"history_retention_s" INT,
	"full_sweep_interval_s" INT,
	"database" TEXT,
	"breaker_factor" double precision,
	"breaker_min_rows" INT,
	"breaker_max_fraction" double precision,
	"retry_backoff_s" INT,
	"cycle_time_budget_ms" INT,
	"stray_min_age_s" INT,
	"storage_price_per_gb_month" double precision,
	"reclaim_strays" bool
)
STRICT STABLE PARALLEL SAFE
LANGUAGE c
AS 'MODULE_PATHNAME', '_config_wrapper';

-- Cycles stop at orphan_cleanup.cycle_time_budget; the log says which did.
ALTER TABLE orphan_cleanup.cycle_log ADD COLUMN out_of_time boolean NOT NULL DEFAULT false;

-- The pruning's index leaves out dead letters, which are kept until a DBA acts.
DROP INDEX IF EXISTS orphan_cleanup.deletion_queue_finished;
""")
out.append(section('schema', "CREATE INDEX deletion_queue_prunable", "'stale', 'rejected');"))
out.append("\n-- Rechecks are taken oldest first by an index, not a sort of the whole table per chunk.\n")
out.append(section('schema', "CREATE INDEX recheck_queued_at", "(queued_at);"))
out.append("\n-- Busy rows are noted beside the queue, for claims to take them after the others.\n")
out.append(section('schema', "CREATE UNLOGGED TABLE orphan_cleanup.busy (", "until    timestamptz NOT NULL\n);"))
out.append("REVOKE ALL ON orphan_cleanup.busy FROM PUBLIC;\n")
out.append("""

-- New tables: the reapers registry and their refusals.
""")
out.append(section('schema', "CREATE TABLE orphan_cleanup.reapers (", "CREATE INDEX refusals_at ON orphan_cleanup.refusals (at);"))
out.append("\n-- The per-object record of the save guarantee, and the jobs' fence rows.\n")
out.append(section('schema', "CREATE TABLE orphan_cleanup.objects (", "CREATE INDEX job_fences_touched_at ON orphan_cleanup.job_fences (touched_at);"))
out.append("""SELECT pg_catalog.pg_extension_config_dump('orphan_cleanup.objects', '');
SELECT pg_catalog.pg_extension_config_dump('orphan_cleanup.job_fences', '');
REVOKE ALL ON orphan_cleanup.objects, orphan_cleanup.job_fences FROM PUBLIC;

-- Objects a 0.1.0 claim already handed out keep refusing saves: every claim counts as a
-- hand-out. The queue is locked against claims first (EXCLUSIVE: reads go on), so that no 0.1.0
-- claim can commit after this reads the queue and before the new save guard is in place; its
-- reaper's next claim waits for this update to commit.
LOCK TABLE orphan_cleanup.deletion_queue IN EXCLUSIVE MODE;
INSERT INTO orphan_cleanup.objects (bucket, object_path, handouts, first_handed_out_at, last_handed_out_at, last_handed_to, last_queue_id, forget_at)
SELECT d.bucket, d.object_path,
       sum(d.claim_count)::integer,
       min(d.claimed_at) FILTER (WHERE d.claim_count > 0),
       max(d.claimed_at) FILTER (WHERE d.claim_count > 0),
       (array_agg(d.claimed_by ORDER BY d.claimed_at DESC NULLS LAST) FILTER (WHERE d.claim_count > 0))[1],
       max(d.id) FILTER (WHERE d.claim_count > 0),
       coalesce(max(d.claimed_at) FILTER (WHERE d.claim_count > 0), now()) + interval '30 days'
FROM orphan_cleanup.deletion_queue AS d
WHERE d.bucket IS NOT NULL AND d.object_path IS NOT NULL
  AND (d.claim_count > 0 OR d.state IN ('pending', 'claimed', 'dead'))
GROUP BY d.bucket, d.object_path;
""")

out.append("""SELECT pg_catalog.pg_extension_config_dump('orphan_cleanup.reapers', '');
SELECT pg_catalog.pg_extension_config_dump('orphan_cleanup.refusals', '');
REVOKE ALL ON orphan_cleanup.reapers, orphan_cleanup.refusals FROM PUBLIC;

-- Pause points (sql/pause.sql) and the cycle's use of one; pruning of the new tables.
""")
out.append(fn('pause','_pause_point', replace=False))
out.append("""-- An allow-list of only spaces and commas reads as empty everywhere, as the parser reads it.
""")
out.append(fn('schema','_no_entries', replace=False))
out.append(fn('detect','_another_chunk_fits', replace=False))
out.append(fn('detect','_statistics_stale', replace=False))
out.append(fn('detect','_refresh_statistics', replace=False))
out.append("""-- _cycle_body() reports its stray reconciliation too (its OUT columns change).
DROP FUNCTION orphan_cleanup._cycle_body(bigint, text);
""")
out.append(fn('detect','_cycle_body', replace=False))
out.append(fn('detect','enqueue_orphans'))
out.append(fn('guard','attach'))
out.append(fn('detect','run_cycle'))
out.append(fn('detect','_prune'))
out.append("""-- claim() takes the reaper's hosts: the old signature goes, the new one replaces it.
DROP FUNCTION orphan_cleanup.claim(text, integer, interval, text[]);
""")
out.append("""-- The allow-list's hosts and a reaper's hosts, spelled as the URL parser spells them (Rust).
CREATE FUNCTION orphan_cleanup."_allowed_hosts"() RETURNS TEXT[]
STRICT STABLE PARALLEL SAFE
LANGUAGE c
AS 'MODULE_PATHNAME', '_allowed_hosts_wrapper';
CREATE FUNCTION orphan_cleanup."_normalize_hosts"("hosts" TEXT[], "what" TEXT) RETURNS TEXT[]
IMMUTABLE STRICT PARALLEL SAFE
LANGUAGE c
AS 'MODULE_PATHNAME', '_normalize_hosts_wrapper';
""")
out.append(fn('queue','_serves', replace=False))
out.append(fn('queue','_home_ok', replace=False))
out.append(fn('queue','_lock_reaper_row', replace=False))
out.append(fn('queue','_note_reaper', replace=False))
out.append(fn('queue','_note_passed_over', replace=False))
out.append(fn('queue','_new_objects', replace=False))
out.append("""-- Lease tokens: claim() returns one per claim (the queue keeps its hash); confirm, fail, release
-- and refuse require it. Their signatures without a token only say so (a 0.1.0 reaper): rows a
-- 0.1.0 reaper holds now cannot be confirmed after this update and come back when their lease
-- ends, still counted as handed out.
ALTER TABLE orphan_cleanup.deletion_queue ADD COLUMN lease_hash bytea;
-- The savings ledger: the bytes each deletion reclaimed.
ALTER TABLE orphan_cleanup.deletion_queue ADD COLUMN bytes bigint;
-- Strays (issue 15): rows with no job, marked as such, with the upload each was queued for.
ALTER TABLE orphan_cleanup.deletion_queue ALTER COLUMN job_id DROP NOT NULL;
ALTER TABLE orphan_cleanup.deletion_queue ADD COLUMN kind text NOT NULL DEFAULT 'orphan' CHECK (kind IN ('orphan', 'stray'));
ALTER TABLE orphan_cleanup.deletion_queue ADD COLUMN stored_id uuid;
ALTER TABLE orphan_cleanup.deletion_queue ADD COLUMN stored_version text;
ALTER TABLE orphan_cleanup.deletion_queue ADD CONSTRAINT deletion_queue_stray_has_no_job CHECK ((kind = 'stray') = (job_id IS NULL));
""")
out.append(section('schema', "CREATE UNIQUE INDEX deletion_queue_one_live_row_per_stray", "('pending', 'claimed');"))
out.append(fn('queue','_lease_hash', replace=False))
out.append(fn('queue','_needs_lease_token', replace=False))
out.append(fn('queue','confirm', sig='worker text, ids bigint[]'))
out.append(fn('queue','fail', sig='worker text, ids bigint[]'))
out.append(fn('queue','release', sig='worker text, ids bigint[]'))
out.append(fn('queue','refuse', replace=False, sig='worker text, ids bigint[]'))
out.append(fn('queue','_expire_leases'))
out.append(fn('queue','_reaper_alert'))
out.append(fn('queue','_not_held', replace=False))
out.append(fn('queue','_unsent', replace=False))
out.append(fn('queue','claim', replace=False))
out.append(fn('queue','verifies_absence', replace=False))
out.append(fn('queue','_still_stored', replace=False))
out.append(fn('queue','sent_by_reaper', replace=False))
out.append(fn('queue','confirm', replace=False, sig='worker text, lease_token text'))
out.append(fn('queue','fail', replace=False, sig='worker text, lease_token text'))
out.append(fn('queue','release', replace=False, sig='worker text, lease_token text'))
out.append(fn('queue','refuse', replace=False, sig='worker text, lease_token text'))
out.append("""-- health() and queue_status() report the reapers; queue_status() returns more columns.
""")
out.append(section('reports', "CREATE TYPE orphan_cleanup.reaper_coverage AS (", "\n);"))
out.append(fn('reports','_reaper_coverage', replace=False))
out.append(fn('reports','_cron_jobs', replace=False))
out.append(fn('reports','_health', replace=False))
out.append(fn('reports','health'))
out.append("DROP FUNCTION orphan_cleanup.queue_status();\n")
out.append(fn('reports','queue_status', replace=False))
out.append("-- The per-object save guard: saves, job writes, claims, job cleanup and cancel().\n")
out.append(fn('guard','_fence_job', replace=False))
out.append(fn('guard','_hold_object', replace=False))
out.append(fn('guard','_refuse_save', replace=False))
out.append("""-- Every object a URL could name (Rust): a saved job protects each reading, and the jobs table
-- is indexed by the set (GIN). See the notice at the end about that index.
CREATE FUNCTION orphan_cleanup."object_keys"("url" TEXT) RETURNS TEXT[]
IMMUTABLE STRICT PARALLEL SAFE
LANGUAGE c
AS 'MODULE_PATHNAME', 'object_keys_wrapper';
""")
out.append(fn('guard','_allowed_bucket_list', replace=False))
out.append(fn('guard','_objects_of', replace=False))
out.append(fn('guard','_names_of', replace=False))
out.append("""-- The most storage routes any layer of a URL's readings holds (Rust): the save guard's limit.
CREATE FUNCTION orphan_cleanup."_route_count"("url" TEXT) RETURNS INT
IMMUTABLE STRICT PARALLEL SAFE
LANGUAGE c
AS 'MODULE_PATHNAME', '_route_count_wrapper';
""")
out.append("""-- How many bytes the readings of a URL read, or -1 past their bound (Rust): the save guard's limit.
CREATE FUNCTION orphan_cleanup."_reading_size"("url" TEXT) RETURNS INT
IMMUTABLE STRICT PARALLEL SAFE
LANGUAGE c
AS 'MODULE_PATHNAME', '_reading_size_wrapper';
""")
out.append(fn('guard','_unread_url', replace=False))
out.append(fn('guard','_refuse_unread', replace=False))
out.append(fn('guard','_job_is_saved', replace=False))
out.append(fn('guard','_refuse_unread_saved', replace=False))
out.append(fn('detect','_rls_problem', replace=False))
out.append(fn('guard','_refuse_under_rls', replace=False))
out.append(fn('guard','save_guard'))
out.append(fn('guard','_save_job', replace=False))
out.append(fn('guard','_keep_if_saved', replace=False))
out.append(fn('guard','_keep_saved', replace=False))
out.append(fn('guard','job_truncate_guard', replace=False))
out.append(fn('guard','job_guard', replace=False))
out.append(fn('guard','_drop_guards'))
out.append(fn('guard','_drop_partition_guards', replace=False))
out.append(fn('guard','_refuse_while_claimed', replace=False))
out.append(fn('guard','_ddl_touches', replace=False))
out.append(fn('guard','_watch_guards', replace=False))
out.append(fn('guard','detach'))
out.append(fn('detect','_guard_problem', replace=False))
out.append(fn('detect','_drift'))
out.append("-- Cycles, claims and previews refuse to run without the indexes their lookups need.\n")
out.append(fn('guard','_required_indexes', replace=False))
out.append(fn('guard','_index_problem', replace=False))
out.append(fn('guard','_index_report'))
out.append(fn('detect','_require_attached'))
out.append(fn('detect','preview'))
out.append(fn('breaker','_breaker_limits'))
out.append(fn('breaker','_breaker_settings', replace=False))
out.append(fn('breaker','reset_breaker'))
out.append(fn('queue','_retry_job_cleanup'))
out.append("-- Candidates say which extra reference names their object (sql/references.sql).\nDROP FUNCTION orphan_cleanup._candidates(orphan_cleanup.attachment, timestamptz, timestamptz, uuid, integer, uuid[]);\n")
out.append(fn('detect','_candidates', replace=False))
out.append("-- A chunk caps what it queues itself (max_enqueue) instead of shrinking to the rows left.\n")
out.append("DROP FUNCTION orphan_cleanup._process_chunk(orphan_cleanup.attachment, bigint, text, timestamptz, timestamptz, uuid, integer, uuid[], interval, boolean);\n")
out.append(fn('detect','_process_chunk', replace=False))
out.append(fn('detect','_prune_objects', replace=False))
out.append(fn('queue','_keep_jobs', replace=False))
out.append(fn('queue','_write_jobs', replace=False))
out.append(fn('queue','_own_job_writer', replace=False))
out.append(fn('queue','_cleanup_jobs'))
out.append(fn('queue','cancel'))
out.append(fn('queue','cancel_prefix', replace=False))
out.append(fn('queue','requeue_dead'))
out.append("""-- An attached database gets the jobs table's guard now, as attach() installs it, its truncate
-- guard fires under session_replication_role = replica too, confirm()'s writes to the jobs
-- table run as that table's owner, and no saved job may have a URL too long to read.
DO $upgrade$
DECLARE
    att orphan_cleanup.attachment;
BEGIN
    SELECT * INTO att FROM orphan_cleanup.attachment;
    IF FOUND AND EXISTS (SELECT 1 FROM pg_catalog.pg_class WHERE oid = att.jobs_oid) THEN
        PERFORM orphan_cleanup._drop_guards(att.jobs_oid);
        EXECUTE format('CREATE TRIGGER orphan_cleanup_job_guard AFTER INSERT OR UPDATE OR DELETE ON %s FOR EACH ROW EXECUTE FUNCTION orphan_cleanup.job_guard()', att.jobs_oid::regclass);
        EXECUTE format('ALTER TABLE %s ENABLE ALWAYS TRIGGER orphan_cleanup_job_guard', att.jobs_oid::regclass);
        EXECUTE format('CREATE TRIGGER orphan_cleanup_truncate_guard BEFORE TRUNCATE ON %s FOR EACH STATEMENT EXECUTE FUNCTION orphan_cleanup.job_truncate_guard()', att.jobs_oid::regclass);
        EXECUTE format('ALTER TABLE %s ENABLE ALWAYS TRIGGER orphan_cleanup_truncate_guard', att.jobs_oid::regclass);
        PERFORM orphan_cleanup._own_job_writer(att.jobs_oid);
        -- A saved job whose URL cannot be read in full protects nothing it might name: the
        -- update is refused until it is fixed, as attach() refuses.
        IF EXISTS (SELECT 1 FROM pg_catalog.pg_class WHERE oid = att.assets_oid) THEN
            PERFORM orphan_cleanup._refuse_unread_saved(att.jobs_oid, att.assets_oid, 'ALTER EXTENSION pg_orphan_cleanup UPDATE');
        END IF;
    END IF;
    IF FOUND AND EXISTS (SELECT 1 FROM pg_catalog.pg_trigger WHERE tgrelid = att.assets_oid AND tgname = 'orphan_cleanup_truncate_guard') THEN
        EXECUTE format('ALTER TABLE %s ENABLE ALWAYS TRIGGER orphan_cleanup_truncate_guard', att.assets_oid::regclass);
    END IF;
END
$upgrade$;
""")
out.append("""-- A pruned hand-out record is audited ('forgotten'); the managed edition audits setting
-- changes ('setting_changed'), and both editions share this table.
ALTER TABLE orphan_cleanup.audit_log DROP CONSTRAINT audit_log_action_check;
ALTER TABLE orphan_cleanup.audit_log ADD CONSTRAINT audit_log_action_check
    CHECK (action IN ('enqueued', 'protected', 'rejected', 'claimed', 'deleted',
                      'absent', 'failed', 'dead_lettered', 'rescued', 'refused',
                      'cancelled', 'released', 'requeued', 'job_cleanup', 'attached', 'detached',
                      'breaker_tripped', 'breaker_reset', 'forgotten', 'setting_changed'));

""")
out.append("""-- The guard watcher: no DDL may leave the attached tables without their exact guards while
-- reapers hold claims.
CREATE EVENT TRIGGER orphan_cleanup_guard_watch ON ddl_command_end
    WHEN TAG IN ('ALTER TABLE', 'DROP TRIGGER', 'CREATE TRIGGER', 'ALTER TRIGGER', 'CREATE TABLE', 'CREATE SCHEMA', 'CREATE FOREIGN TABLE')
    EXECUTE FUNCTION orphan_cleanup._watch_guards();
ALTER EVENT TRIGGER orphan_cleanup_guard_watch ENABLE ALWAYS;

""")
def reindex(comment, tag, table, stale_query, function, why):
    """A DO block that rebuilds the attached `table`'s indexes on `function()` when any row
    matches `stale_query` (a format() string whose %s is the table): an immutable function whose
    answers changed leaves 0.1.0's indexes on it stale for those rows."""
    return f"""{comment}
DO ${tag}$
DECLARE
    att orphan_cleanup.attachment;
    stale boolean;
    ix regclass;
BEGIN
    SELECT * INTO att FROM orphan_cleanup.attachment;
    IF NOT FOUND OR NOT EXISTS (SELECT 1 FROM pg_catalog.pg_class WHERE oid = att.{table}) THEN
        RETURN;
    END IF;
    EXECUTE format({stale_query}, att.{table}::regclass)
       INTO stale;
    IF NOT stale THEN
        RETURN;
    END IF;
    -- A partitioned table's index cannot be rebuilt in a transaction: its partitions' can.
    FOR ix IN SELECT coalesce(t.relid, i.indexrelid)::regclass FROM pg_catalog.pg_index AS i
              LEFT JOIN LATERAL pg_catalog.pg_partition_tree(i.indexrelid) AS t ON true
              WHERE i.indrelid = att.{table} AND pg_catalog.pg_get_indexdef(i.indexrelid) LIKE '%{function}(%'
                AND (t.relid IS NULL OR t.isleaf)
    LOOP
        RAISE NOTICE 'rebuilding index % ({why})', ix;
        EXECUTE format('REINDEX INDEX %s', ix);
    END LOOP;
END
${tag}$;

"""

out.append(fn('schema','job_ref_key'))
out.append(reindex("""-- job_ref_key() now finds a job's id in more spellings (a no-break space, urn:uuid:, an id
-- JSON-encoded twice), where 0.1.0 returned NULL: rebuild the assets table's indexes on it when
-- any row is read differently now, or the keeper checks would miss those references.""",
    "reindex_refs", "assets_oid",
    """$q$SELECT EXISTS (SELECT 1 FROM %s AS a
                                     WHERE orphan_cleanup.job_ref_key(a.metadata ->> 'render_job_id') IS NOT NULL
                                       AND pg_catalog.replace(pg_catalog.lower(pg_catalog.btrim(a.metadata ->> 'render_job_id', E' \\t\\r\\n{}')), '-', '')
                                           !~ '^[0-9a-f]{32}$')$q$""",
    "job_ref_key", "job_ref_key() now reads more spellings of a job id"))
out.append(reindex("""-- object_key() now reads a URL the strict parser refuses leniently (the object it could name),
-- where 0.1.0 returned NULL. An index on it built by 0.1.0 holds NULL for such rows, and the
-- keeper checks would miss them: rebuild the jobs table's object_key() indexes when it has any
-- such row. (REINDEX holds writes to the jobs table while it runs: a few seconds per million
-- rows; the lock_timeout above still applies to taking the lock.)""",
    "reindex", "jobs_oid",
    """'SELECT EXISTS (SELECT 1 FROM %s AS j CROSS JOIN LATERAL orphan_cleanup.parse_output_url(j.output_url) AS p
                                   WHERE j.output_url IS NOT NULL AND p.error IS NOT NULL
                                     AND orphan_cleanup.object_key(j.output_url) IS NOT NULL)'""",
    "object_key", "object_key() now names the object of URLs the strict parser refuses"))
out.append("\n-- The savings ledger (issue 15).\n")
out.append(section('schema', "CREATE TABLE orphan_cleanup.savings_ledger (", "PRIMARY KEY (day, kind)\n);"))
out.append("""SELECT pg_catalog.pg_extension_config_dump('orphan_cleanup.savings_ledger', '');
REVOKE ALL ON orphan_cleanup.savings_ledger FROM PUBLIC;
""")
out.append(fn('reports', 'savings_report', replace=False))
out.append("-- Stray objects (issue 15): preview_strays() reads storage.objects.\n")
out.append("""-- Cycles reconcile strays: where their passes have got to, and what each cycle did.
ALTER TABLE orphan_cleanup.detector_state
    ADD COLUMN stray_pass_started_at timestamptz, ADD COLUMN stray_pass_bucket text, ADD COLUMN stray_pass_name text,
    ADD COLUMN stray_seen_ts timestamptz, ADD COLUMN stray_seen_id uuid;
ALTER TABLE orphan_cleanup.cycle_log
    ADD COLUMN strays_scanned bigint NOT NULL DEFAULT 0, ADD COLUMN strays_enqueued bigint NOT NULL DEFAULT 0,
    ADD COLUMN stray_pass text, ADD COLUMN stray_ms numeric;
""")
out.append("-- The Storage API's inventory, where storage.objects is not in this database (sql/inventory.sql).\n")
out.append(section('inventory', "CREATE TABLE orphan_cleanup.inventory_listings (",
                   "SELECT pg_catalog.pg_extension_config_dump('orphan_cleanup.object_inventory', '');"))
out.append("REVOKE ALL ON orphan_cleanup.inventory_listings, orphan_cleanup.object_inventory FROM PUBLIC;\nREVOKE ALL ON SEQUENCE orphan_cleanup.inventory_listings_id_seq FROM PUBLIC;\n")
for name in ['inventory_buckets', '_no_api_inventory_here', 'inventory_begin', '_open_listing', 'inventory_add',
             'inventory_finish', '_inventory', '_listing_health']:
    out.append(fn('inventory', name, replace=False))
out.append("-- Extra references: other tables' columns that name objects (sql/references.sql).\n")
out.append(section('references', "CREATE TABLE orphan_cleanup.extra_references (",
                   "SELECT pg_catalog.pg_extension_config_dump('orphan_cleanup.reference_partitions', '');"))
out.append("REVOKE ALL ON orphan_cleanup.extra_references, orphan_cleanup.reference_partitions FROM PUBLIC;\n")
for name in ['_reference_partitions', '_reference_value', '_reference_list', '_reference_type_ok', '_reference_index_statement',
             '_reference_problem', '_referenced_by_sql', 'reference_guard', 'add_reference', '_same_expression',
             'remove_reference', 'list_references', '_reference_table_problem', '_hold_references',
             '_look_at_reference_partitions']:
    out.append(fn('references', name, replace=False))
out.append("-- A partitioned jobs table: each partition's TRUNCATE guard, and the record of them (sql/partitions.sql).\n")
out.append(section('partitions', "CREATE TABLE orphan_cleanup.job_partitions (",
                   "SELECT pg_catalog.pg_extension_config_dump('orphan_cleanup.job_partitions', '');"))
out.append("REVOKE ALL ON orphan_cleanup.job_partitions FROM PUBLIC;\n")
for name in ['_inheritors', '_job_partitions', '_partition_gone_problem', '_partition_problem', '_look_at_partitions', 'forget_partition', '_refuse_handed_out_saved']:
    out.append(fn('partitions', name, replace=False))
out.append(section('partitions', "CREATE TABLE orphan_cleanup.asset_partitions (",
                   "SELECT pg_catalog.pg_extension_config_dump('orphan_cleanup.asset_partitions', '');"))
out.append("REVOKE ALL ON orphan_cleanup.asset_partitions FROM PUBLIC;\n")
for name in ['_look_at_asset_partitions']:
    out.append(fn('partitions', name, replace=False))
for name in ['_inventory_problem', '_current_objects_only', '_warn_dangling', '_stray_page', '_stray_chunk', '_strays_ready',
             'preview_strays', 'enqueue_strays', '_stray_index_ok', '_reconcile_strays', '_check_stray_breaker']:
    out.append(fn('strays', name, replace=False))
out.append("""-- Grants, as sql/grants.sql gives them: new functions are not for PUBLIC.
REVOKE ALL ON FUNCTION
    orphan_cleanup._pause_point(text),
    orphan_cleanup._cron_jobs(),
    orphan_cleanup._allowed_hosts(),
    orphan_cleanup._normalize_hosts(text[], text),
    orphan_cleanup._serves(text[], text[], boolean, text, text),
    orphan_cleanup._home_ok(text[], text),
    orphan_cleanup._no_entries(text),
    orphan_cleanup._lock_reaper_row(text),
    orphan_cleanup._note_reaper(text, text[], text[], text),
    orphan_cleanup._note_passed_over(text, integer, text[], text[], boolean),
    orphan_cleanup.claim(text, integer, interval, text[], text[], text),
    orphan_cleanup.refuse(text, bigint[], text),
    orphan_cleanup._lease_hash(text),
    orphan_cleanup._needs_lease_token(text),
    orphan_cleanup._not_held(orphan_cleanup.deletion_queue, text, bytea),
    orphan_cleanup._unsent(bigint[], text),
    orphan_cleanup._objects_of(text),
    orphan_cleanup._allowed_bucket_list(),
    orphan_cleanup._names_of(text),
    orphan_cleanup._keep_if_saved(orphan_cleanup.attachment, uuid, text, text),
    orphan_cleanup._keep_saved(uuid, text, text),
    orphan_cleanup.job_truncate_guard(),
    orphan_cleanup._route_count(text),
    orphan_cleanup._reading_size(text),
    orphan_cleanup._unread_url(text),
    orphan_cleanup._refuse_unread(uuid, text),
    orphan_cleanup._job_is_saved(orphan_cleanup.attachment, uuid),
    orphan_cleanup._refuse_unread_saved(oid, oid, text),
    orphan_cleanup.object_keys(text),
    orphan_cleanup._refuse_while_claimed(text, oid[]),
    orphan_cleanup._watch_guards(),
    orphan_cleanup._process_chunk(orphan_cleanup.attachment, bigint, text, timestamptz, timestamptz, uuid, integer, uuid[], interval, boolean, bigint),
    orphan_cleanup._candidates(orphan_cleanup.attachment, timestamptz, timestamptz, uuid, integer, uuid[]),
    orphan_cleanup.confirm(text, text, bigint[], text, bigint[]),
    orphan_cleanup.fail(text, text, bigint[], text, boolean),
    orphan_cleanup.release(text, text, bigint[], text, boolean),
    orphan_cleanup.refuse(text, text, bigint[], text),
    orphan_cleanup._reaper_coverage(),
    orphan_cleanup._health(orphan_cleanup.reaper_coverage),
    orphan_cleanup.health(),
    orphan_cleanup.queue_status(),
    orphan_cleanup._fence_job(uuid),
    orphan_cleanup._write_jobs(regclass, text, uuid[]),
    orphan_cleanup._own_job_writer(regclass),
    orphan_cleanup._new_objects(text[], text[]),
    orphan_cleanup._hold_object(text, text),
    orphan_cleanup._refuse_save(uuid, bigint, text),
    orphan_cleanup.job_guard(),
    orphan_cleanup._guard_problem(orphan_cleanup.attachment),
    orphan_cleanup._rls_problem(orphan_cleanup.attachment),
    orphan_cleanup._refuse_under_rls(orphan_cleanup.attachment, text),
    orphan_cleanup._prune_objects(orphan_cleanup.attachment, text, timestamptz),
    orphan_cleanup._config(),
    orphan_cleanup._another_chunk_fits(timestamptz, timestamptz),
    orphan_cleanup._statistics_stale(oid, real),
    orphan_cleanup._refresh_statistics(text, boolean),
    orphan_cleanup._breaker_settings(),
    orphan_cleanup._required_indexes(oid, oid, text),
    orphan_cleanup._index_problem(oid, oid, text, boolean),
    orphan_cleanup._keep_jobs(orphan_cleanup.attachment, bigint[], uuid[], text),
    orphan_cleanup.verifies_absence(),
    orphan_cleanup._still_stored(bigint[]),
    orphan_cleanup.sent_by_reaper(text, interval),
    orphan_cleanup._inventory_problem(),
    orphan_cleanup.preview_strays(interval, integer),
    orphan_cleanup._current_objects_only(),
    orphan_cleanup._stray_page(regclass, timestamptz, boolean, timestamptz, uuid, text, text, integer),
    orphan_cleanup._stray_chunk(orphan_cleanup.attachment, bigint, text, timestamptz, boolean, timestamptz, uuid, text, text, integer, interval, boolean, bigint),
    orphan_cleanup._stray_index_ok(),
    orphan_cleanup._warn_dangling(text),
    orphan_cleanup._cycle_body(bigint, text),
    orphan_cleanup._reconcile_strays(orphan_cleanup.attachment, bigint, text, interval, boolean, timestamptz, bigint, bigint, bigint, text),
    orphan_cleanup._check_stray_breaker(bigint, bigint, bigint, bigint, text),
    orphan_cleanup._strays_ready(text, interval, integer),
    orphan_cleanup.enqueue_strays(interval, integer),
    orphan_cleanup.cancel_prefix(text, text),
    orphan_cleanup.savings_report(text, integer),
    orphan_cleanup.inventory_buckets(),
    orphan_cleanup._no_api_inventory_here(),
    orphan_cleanup.inventory_begin(text, text),
    orphan_cleanup._open_listing(bigint),
    orphan_cleanup.inventory_add(bigint, jsonb),
    orphan_cleanup.inventory_finish(bigint),
    orphan_cleanup._inventory(),
    orphan_cleanup._listing_health(),
    orphan_cleanup._reference_value(name, text[], boolean, text),
    orphan_cleanup._reference_list(),
    orphan_cleanup._reference_type_ok(text, text[]),
    orphan_cleanup._reference_index_statement(oid, name, text[], boolean),
    orphan_cleanup._reference_problem(),
    orphan_cleanup._referenced_by_sql(text),
    orphan_cleanup.reference_guard(),
    orphan_cleanup.add_reference(text, text, text),
    orphan_cleanup._same_expression(text, text),
    orphan_cleanup.remove_reference(text, text),
    orphan_cleanup.list_references(),
    orphan_cleanup._reference_table_problem(oid, text, name),
    orphan_cleanup._hold_references(),
    orphan_cleanup._guards_changing(),
    orphan_cleanup._guards_changed(boolean),
    orphan_cleanup._save_job(orphan_cleanup.attachment, uuid),
    orphan_cleanup._inheritors(oid),
    orphan_cleanup._ddl_touches(oid[]),
    orphan_cleanup._look_at_asset_partitions(orphan_cleanup.attachment, boolean),
    orphan_cleanup._reference_partitions(),
    orphan_cleanup._look_at_reference_partitions(),
    orphan_cleanup._job_partitions(orphan_cleanup.attachment),
    orphan_cleanup._partition_problem(),
    orphan_cleanup._look_at_partitions(orphan_cleanup.attachment, boolean, boolean),
    orphan_cleanup.forget_partition(oid),
    orphan_cleanup._refuse_handed_out_saved(oid, oid),
    orphan_cleanup._partition_gone_problem(),
    orphan_cleanup._drop_partition_guards()
FROM PUBLIC;
GRANT EXECUTE ON FUNCTION
    orphan_cleanup.claim(text, integer, interval, text[], text[], text),
    orphan_cleanup.refuse(text, bigint[], text),
    orphan_cleanup.confirm(text, text, bigint[], text, bigint[]),
    orphan_cleanup.fail(text, text, bigint[], text, boolean),
    orphan_cleanup.release(text, text, bigint[], text, boolean),
    orphan_cleanup.refuse(text, text, bigint[], text),
    orphan_cleanup.queue_status(),
    orphan_cleanup.verifies_absence(),
    orphan_cleanup.sent_by_reaper(text, interval),
    orphan_cleanup.savings_report(text, integer),
    orphan_cleanup.inventory_buckets(),
    orphan_cleanup.inventory_begin(text, text),
    orphan_cleanup.inventory_add(bigint, jsonb),
    orphan_cleanup.inventory_finish(bigint)
TO orphan_cleanup_reaper;
GRANT EXECUTE ON FUNCTION orphan_cleanup.object_keys(text) TO PUBLIC;

-- Claims and cycles look jobs up by every object their URL could name, through a GIN index on
-- object_keys(output_url) that 0.1.0 did not recommend. Building it here would hold the app's
-- writes to the jobs table for as long as it takes; CREATE INDEX CONCURRENTLY cannot run inside
-- this update. Until it exists, cycles and claims refuse to run (nothing is deleted) and
-- health() shows the statement; the app's writes and saves go on as before.
DO $index_notice$
DECLARE
    att orphan_cleanup.attachment;
    r record;
BEGIN
    SELECT * INTO att FROM orphan_cleanup.attachment;
    IF NOT FOUND OR NOT EXISTS (SELECT 1 FROM pg_catalog.pg_class WHERE oid = att.jobs_oid) THEN
        RETURN;
    END IF;
    FOR r IN SELECT * FROM orphan_cleanup._required_indexes(att.jobs_oid, att.assets_oid, att.age_column)
             WHERE NOT usable LOOP
        RAISE WARNING 'cycles and claims wait for an index 0.2.0 needs (%): %', r.item, r.problem
            USING HINT = 'Run, outside a transaction block: ' || r.statement
                         || ' Then the index 0.1.0 recommended on orphan_cleanup.object_key(output_url) can be dropped (DROP INDEX CONCURRENTLY).';
    END LOOP;
END
$index_notice$;

-- A partitioned jobs table: its partitions get their TRUNCATE guards and are recorded now
-- (sql/partitions.sql), not at the first cycle.
DO $partitions$
BEGIN
    -- Its saved jobs were checked above with the whole jobs table (_refuse_unread_saved), and a
    -- hand-out recorded by 0.1.0 is no reason to refuse the update.
    PERFORM orphan_cleanup._look_at_partitions(a, check_saved => false) FROM orphan_cleanup.attachment AS a
    WHERE EXISTS (SELECT 1 FROM pg_catalog.pg_class AS c WHERE c.oid = a.jobs_oid AND c.relkind = 'p');
    -- A partitioned assets table's partitions, recorded with the assets they hold.
    PERFORM orphan_cleanup._look_at_asset_partitions(a, check_saves => false) FROM orphan_cleanup.attachment AS a
    WHERE EXISTS (SELECT 1 FROM pg_catalog.pg_class AS c WHERE c.oid = a.assets_oid);
END
$partitions$;
-- The DDL watch applies again to what the rest of this transaction does.
SELECT orphan_cleanup._guards_changed(true);
""")
open(os.path.join(ROOT, 'pg_orphan_cleanup/sql/pg_orphan_cleanup--0.1.0--0.2.0.sql'),'w').write("\n".join(out))
