-- pg_orphan_cleanup 0.1.0 -> 0.2.0
--
-- A reaper is handed only the rows it serves (its buckets and hosts), and gives back what its
-- own allow-list still refuses instead of dead-lettering it; the reapers are recorded, and
-- health() and queue_status() name a misconfigured one. Cycles gain a pause point for tests.
-- The save guarantee becomes per object (orphan_cleanup.objects): a hand-out is recorded on the
-- object and outlives the queue row; saves, job writes and claims conflict on the object's row
-- at every isolation level; the jobs table gets a guard of its own; cancel() keeps the object.
-- Run by ALTER EXTENSION pg_orphan_cleanup UPDATE; the queue and its history are kept.
-- tests/tests/upgrade.rs checks that the result equals a fresh install of 0.2.0.

\echo Use "ALTER EXTENSION pg_orphan_cleanup UPDATE TO '0.2.0'" to load this file. \quit

-- The update changes guards itself: the DDL watch it creates stays out of its way (a mark in a
-- table only the extension writes, sql/guard.sql; removed at the end).

CREATE TABLE orphan_cleanup.guards_changing (
    txid  xid8 PRIMARY KEY,
    since timestamptz NOT NULL DEFAULT now()
);

REVOKE ALL ON orphan_cleanup.guards_changing FROM PUBLIC;

CREATE FUNCTION orphan_cleanup._guards_changing() RETURNS boolean
LANGUAGE plpgsql VOLATILE SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    INSERT INTO orphan_cleanup.guards_changing (txid) VALUES (pg_catalog.pg_current_xact_id())
    ON CONFLICT (txid) DO NOTHING;
    RETURN FOUND;
END
$$;

CREATE FUNCTION orphan_cleanup._guards_changed(marked boolean) RETURNS void
LANGUAGE plpgsql VOLATILE SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    IF marked THEN
        DELETE FROM orphan_cleanup.guards_changing WHERE txid = pg_catalog.pg_current_xact_id();
    END IF;
END
$$;

INSERT INTO orphan_cleanup.guards_changing (txid) VALUES (pg_catalog.pg_current_xact_id());

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

CREATE INDEX deletion_queue_prunable ON orphan_cleanup.deletion_queue (finished_at)
    WHERE state IN ('deleted', 'absent', 'cancelled', 'rescued', 'stale', 'rejected');


-- Rechecks are taken oldest first by an index, not a sort of the whole table per chunk.

CREATE INDEX recheck_queued_at ON orphan_cleanup.recheck (queued_at);


-- Busy rows are noted beside the queue, for claims to take them after the others.

CREATE UNLOGGED TABLE orphan_cleanup.busy (
    queue_id bigint PRIMARY KEY,
    until    timestamptz NOT NULL
);

REVOKE ALL ON orphan_cleanup.busy FROM PUBLIC;



-- New tables: the reapers registry and their refusals.

CREATE TABLE orphan_cleanup.reapers (
    reaper             text PRIMARY KEY,     -- the worker id it claims with
    buckets            text[],               -- NULL: it did not say (serves every bucket)
    hosts              text[],               -- NULL: it did not say (an older reaper: every host)
    home               text,                 -- its SUPABASE_URL's host; NULL: it did not say
    first_seen_at      timestamptz NOT NULL DEFAULT now(),
    last_claim_at      timestamptz NOT NULL DEFAULT now(),
    claimed            bigint NOT NULL DEFAULT 0,   -- rows handed to it (bookkeeping a busy row skips)
    passed_over        bigint NOT NULL DEFAULT 0,   -- ready rows its latest short claim left: not its bucket or host
    passed_over_what   text,                        -- which, e.g. 'renders @ staging.example.com'
    passed_over_at     timestamptz                  -- when a claim last left any
);

-- Rows a reaper refused with refuse(): claim() never hands them to that reaper again, so a
-- misconfigured reaper cannot take the same rows over and over, and another reaper gets them.
CREATE TABLE orphan_cleanup.refusals (
    queue_id   bigint NOT NULL,
    refused_by text NOT NULL,
    reason     text NOT NULL,
    at         timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (queue_id, refused_by)
);
CREATE INDEX refusals_at ON orphan_cleanup.refusals (at);


-- The per-object record of the save guarantee, and the jobs' fence rows.

CREATE TABLE orphan_cleanup.objects (
    bucket              text NOT NULL,
    object_path         text NOT NULL,
    handouts            integer NOT NULL DEFAULT 0,   -- claims that may have sent a delete
    first_handed_out_at timestamptz,
    last_handed_out_at  timestamptz,
    last_handed_to      text,                         -- the worker id of the latest claim
    last_queue_id       bigint,                       -- the queue row it handed out
    kept_at             timestamptz,                  -- cancel() kept the object: never handed out
    kept_by             text,
    touched_at          timestamptz NOT NULL DEFAULT now(),
    forget_at           timestamptz,                  -- handed out: when _prune_objects() looks at it next
    PRIMARY KEY (bucket, object_path)
);
CREATE INDEX objects_untainted ON orphan_cleanup.objects (touched_at) WHERE handouts = 0 AND kept_at IS NULL;
-- Handed-out objects by when _prune_objects() looks at them next (30 days after the latest
-- hand-out, then daily while something still names them), so that it never walks past the ones
-- it is not due to look at. Kept ones (cancel()) are never forgotten and are not in it.
CREATE INDEX objects_handed_out ON orphan_cleanup.objects (forget_at) WHERE handouts > 0 AND kept_at IS NULL;

-- The row a save of a job, an INSERT of the job, and a write that points the job at a
-- handed-out object all write: their conflict is what stops a saved job from being pointed at a
-- deleted file, at every isolation level, even when the save comes before the job row exists.
-- Pruned after a day.
CREATE TABLE orphan_cleanup.job_fences (
    job_id     uuid PRIMARY KEY,
    touched_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX job_fences_touched_at ON orphan_cleanup.job_fences (touched_at);

SELECT pg_catalog.pg_extension_config_dump('orphan_cleanup.objects', '');
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

SELECT pg_catalog.pg_extension_config_dump('orphan_cleanup.reapers', '');
SELECT pg_catalog.pg_extension_config_dump('orphan_cleanup.refusals', '');
REVOKE ALL ON orphan_cleanup.reapers, orphan_cleanup.refusals FROM PUBLIC;

-- Pause points (sql/pause.sql) and the cycle's use of one; pruning of the new tables.

CREATE FUNCTION orphan_cleanup._pause_point(point text) RETURNS void
LANGUAGE plpgsql VOLATILE SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    IF point = ANY (string_to_array(replace(current_setting('orphan_cleanup.pause_points', true), ' ', ''), ',')) THEN
        PERFORM pg_advisory_xact_lock_shared(7310247, hashtext(point));
    END IF;
END
$$;

-- An allow-list of only spaces and commas reads as empty everywhere, as the parser reads it.

CREATE FUNCTION orphan_cleanup._no_entries(list text) RETURNS boolean
LANGUAGE sql IMMUTABLE PARALLEL SAFE
RETURN pg_catalog.translate(COALESCE(list, ''), E', \t\r\n', '') OPERATOR(pg_catalog.=) '';

CREATE FUNCTION orphan_cleanup._another_chunk_fits(started timestamptz, deadline timestamptz) RETURNS boolean
LANGUAGE sql VOLATILE SET search_path = pg_catalog, pg_temp
RETURN clock_timestamp() + 1.5 * (clock_timestamp() - started) < deadline;

CREATE FUNCTION orphan_cleanup._statistics_stale(rel oid, counted real) RETURNS boolean
LANGUAGE sql STABLE SET search_path = pg_catalog, pg_temp
RETURN pg_catalog.pg_stat_get_mod_since_analyze(rel) > greatest(counted, 1000);

CREATE FUNCTION orphan_cleanup._refresh_statistics(actor text, for_cycle boolean) RETURNS void
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    t record;
BEGIN
    FOR t IN
        SELECT c.oid::regclass AS rel, pg_stat_get_mod_since_analyze(c.oid) AS changed,
               greatest(c.reltuples, 0)::bigint AS counted
        FROM pg_catalog.pg_class AS c
        WHERE (c.oid IN ('orphan_cleanup.deletion_queue'::regclass, 'orphan_cleanup.objects'::regclass)
               OR (for_cycle AND c.oid IN ('orphan_cleanup.audit_log'::regclass, 'orphan_cleanup.job_fences'::regclass,
                                           'orphan_cleanup.cycle_log'::regclass, 'orphan_cleanup.recheck'::regclass))
               OR (for_cycle AND c.oid IN (SELECT a.jobs_oid FROM orphan_cleanup.attachment AS a
                                           UNION ALL SELECT a.assets_oid FROM orphan_cleanup.attachment AS a)))
          AND c.relkind = 'r'
          AND orphan_cleanup._statistics_stale(c.oid, c.reltuples)
          AND (pg_catalog.pg_has_role(c.relowner, 'USAGE')
               OR (SELECT r.rolsuper FROM pg_catalog.pg_roles AS r WHERE r.rolname = current_user))
    LOOP
        BEGIN
            -- ANALYZE's own lock, without waiting and without SKIP_LOCKED's warning to the
            -- caller: an autovacuum or another claim already at work on the table goes on.
            EXECUTE format('LOCK TABLE %s IN SHARE UPDATE EXCLUSIVE MODE NOWAIT', t.rel);
            RAISE LOG 'pg_orphan_cleanup: ANALYZE %, whose statistics count % rows while % rows changed since its last ANALYZE (%)',
                t.rel, t.counted, t.changed, actor;
            EXECUTE format('ANALYZE %s', t.rel);
        EXCEPTION WHEN lock_not_available THEN
            NULL;
        END;
    END LOOP;
END
$$;

-- _cycle_body() reports its stray reconciliation too (its OUT columns change).
DROP FUNCTION orphan_cleanup._cycle_body(bigint, text);

CREATE FUNCTION orphan_cleanup._cycle_body(
    p_cycle bigint, p_actor text,
    OUT full_sweep boolean, OUT dry boolean, OUT scanned bigint, OUT rechecked bigint,
    OUT n_found bigint, OUT n_enqueued bigint, OUT n_protected bigint, OUT n_rejected bigint,
    OUT strays_scanned bigint, OUT strays_enqueued bigint, OUT stray_pass text, OUT stray_ms numeric)
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp SET jit = off
AS $$
DECLARE
    att orphan_cleanup.attachment;
    cfg record;
    st orphan_cleanup.detector_state;
    cutoff timestamptz;
    fingerprint text;
    cur_ts timestamptz;
    cur_id uuid;
    budget bigint;
    chunk record;
    v_recheck uuid[];
    v_grace interval;
    brk record;
    v_limit bigint;
    v_limits text;
    deadline timestamptz;
    v_out_of_time boolean := false;
    v_chunk_started timestamptz;
    v_caught_up boolean;
    v_carried bigint;
    v_strays record;
    v_strays_started timestamptz;
    -- Jobs per chunk: small enough that the time budget is kept to within a chunk or so.
    chunk_rows CONSTANT integer := 2000;
BEGIN
    att := orphan_cleanup._require_attached('run_cycle()');
    -- The jobs table's partitions, every cycle whatever the settings (sql/partitions.sql): where
    -- no DDL watch runs, this is what records a new partition and keeps a detached one's saved
    -- files, and until it has, claims wait. A failure here stops no cycle; health() says why.
    BEGIN
        PERFORM orphan_cleanup._look_at_partitions(att);
    EXCEPTION WHEN OTHERS THEN
        RAISE WARNING 'pg_orphan_cleanup could not look at the jobs table''s partitions: %', SQLERRM;
    END;
    BEGIN
        PERFORM orphan_cleanup._look_at_asset_partitions(att);
    EXCEPTION WHEN OTHERS THEN
        RAISE WARNING 'pg_orphan_cleanup could not look at the assets table''s partitions: %', SQLERRM;
    END;
    -- Likewise the reference tables' partitions (sql/references.sql).
    BEGIN
        PERFORM orphan_cleanup._look_at_reference_partitions();
    EXCEPTION WHEN OTHERS THEN
        RAISE WARNING 'pg_orphan_cleanup could not look at the reference tables'' partitions: %', SQLERRM;
    END;
    SELECT * INTO cfg FROM orphan_cleanup._config();
    dry := cfg.dry_run;
    IF orphan_cleanup._no_entries(cfg.allowed_buckets) AND NOT dry THEN
        RAISE EXCEPTION 'orphan_cleanup.allowed_buckets is empty, so no object may be deleted and a cycle would only reject every URL'
            USING ERRCODE = 'invalid_parameter_value',
                  HINT = 'ALTER SYSTEM SET orphan_cleanup.allowed_buckets = ''renders''; SELECT pg_reload_conf();  -- preview() shows what cycles would find meanwhile';
    END IF;
    cutoff := now() - make_interval(secs => cfg.min_age_s);
    v_grace := make_interval(secs => cfg.grace_s);
    -- The time budget: chunks run while another one like the last fits in it
    -- (_another_chunk_fits), at least one of each kind so that every cycle makes progress; then
    -- the cycle commits where it got to. Counted from the cycle's start (its cycle_log row), so
    -- that what run_cycle() did before this (ANALYZE of stale tables: half a second at 1M jobs)
    -- is inside it.
    SELECT l.started_at + make_interval(secs => cfg.cycle_time_budget_ms / 1000.0) INTO deadline
    FROM orphan_cleanup.cycle_log AS l WHERE l.id = p_cycle;
    scanned := 0; rechecked := 0; n_found := 0; n_enqueued := 0; n_protected := 0; n_rejected := 0;
    strays_scanned := 0; strays_enqueued := 0;

    IF NOT dry THEN
        PERFORM orphan_cleanup._expire_leases(p_actor);
        PERFORM orphan_cleanup._retry_job_cleanup(p_actor);
    END IF;

    -- A full sweep re-reads all history: when due, on the first cycle after attach(), and when
    -- the allow-lists or min_age changed (a rejected URL may be allowed now).
    INSERT INTO orphan_cleanup.detector_state DEFAULT VALUES ON CONFLICT (singleton) DO NOTHING;
    SELECT * INTO st FROM orphan_cleanup.detector_state FOR UPDATE;
    fingerprint := md5(concat_ws('|', cfg.allowed_buckets, cfg.allowed_prefixes, cfg.allowed_hosts, cfg.min_age_s));
    -- A periodic sweep starts only once the cursor has reached the end of the history: the last
    -- cycle neither ran out of time nor stopped at max_per_cycle. Otherwise a sweep longer than
    -- a day of cycles would start again before it ended, and the newest jobs would never be read.
    SELECT NOT (l.out_of_time OR l.enqueued >= cfg.max_per_cycle) INTO v_caught_up
    FROM orphan_cleanup.cycle_log AS l
    WHERE l.status = 'ok' AND l.id < p_cycle
    ORDER BY l.id DESC LIMIT 1;
    full_sweep := st.sweep_started_at IS NULL
               OR st.policy_fingerprint IS DISTINCT FROM fingerprint
               OR (now() - st.sweep_started_at >= make_interval(secs => cfg.full_sweep_interval_s)
                   AND coalesce(v_caught_up, true));
    IF full_sweep THEN
        cur_ts := '-infinity';
        cur_id := '00000000-0000-0000-0000-000000000000';
        IF NOT dry THEN
            UPDATE orphan_cleanup.detector_state
               SET sweep_started_at = now(), policy_fingerprint = fingerprint,
                   cursor_ts = cur_ts, cursor_id = cur_id;
        END IF;
    ELSE
        cur_ts := st.cursor_ts;
        cur_id := st.cursor_id;
    END IF;

    -- The circuit breaker's limit, unless a DBA's reset_breaker() let this cycle through.
    IF NOT dry AND NOT st.breaker_approved THEN
        brk := orphan_cleanup._breaker_limits(att);
        v_limit := brk.max_rows;
        v_limits := brk.explanation;
        -- Cycles that ran out of time work off one backlog together: what the ones just before
        -- this one queued counts against this one's limit, so that a runaway spread over many
        -- short cycles trips the breaker as one long cycle would have.
        SELECT coalesce(sum(l.enqueued), 0) INTO v_carried
        FROM orphan_cleanup.cycle_log AS l
        WHERE l.status = 'ok' AND l.out_of_time AND l.id < p_cycle
          AND l.id > coalesce((SELECT max(l2.id) FROM orphan_cleanup.cycle_log AS l2
                               WHERE l2.status IN ('ok', 'tripped') AND NOT l2.out_of_time AND l2.id < p_cycle), 0);
        IF v_carried > 0 AND v_limit IS NOT NULL THEN
            v_limit := greatest(v_limit - v_carried, 0);
            v_limits := v_limits || format(' (of which the cycles just before this one, which ran out of time on the same backlog, queued %s)', v_carried);
        END IF;
    END IF;

    -- Jobs whose assets were deleted or changed since the last cycle. A dry run takes none of
    -- them, so it looks at the oldest chunk only.
    LOOP
        IF dry THEN
            SELECT array_agg(r.job_id) INTO v_recheck
            FROM (SELECT job_id FROM orphan_cleanup.recheck ORDER BY queued_at LIMIT chunk_rows) AS r;
        ELSE
            -- The oldest by the recheck_queued_at index, deleted by key: no chunk reads the
            -- whole table (a sort of all of it per chunk made a large recheck backlog quadratic).
            -- Rechecks an asset change in flight holds (save_guard) are left for a later cycle.
            WITH taken AS (
                DELETE FROM orphan_cleanup.recheck
                WHERE job_id = ANY (ARRAY(SELECT job_id FROM orphan_cleanup.recheck ORDER BY queued_at
                                          LIMIT chunk_rows FOR UPDATE SKIP LOCKED))
                RETURNING job_id)
            SELECT array_agg(taken.job_id) INTO v_recheck FROM taken;
        END IF;
        EXIT WHEN v_recheck IS NULL;
        v_chunk_started := clock_timestamp();
        chunk := orphan_cleanup._process_chunk(att, p_cycle, p_actor, cutoff, NULL, NULL, NULL, v_recheck, v_grace, dry, NULL);
        rechecked := rechecked + cardinality(v_recheck);
        scanned := scanned + chunk.seen; n_found := n_found + chunk.n_found; n_enqueued := n_enqueued + chunk.n_enqueued;
        n_protected := n_protected + chunk.n_protected; n_rejected := n_rejected + chunk.n_rejected;
        PERFORM orphan_cleanup._check_breaker(v_limit, n_enqueued, scanned, rechecked, v_limits);
        EXIT WHEN dry OR cardinality(v_recheck) < chunk_rows;
        IF NOT orphan_cleanup._another_chunk_fits(v_chunk_started, deadline) THEN
            v_out_of_time := true;
            EXIT;
        END IF;
    END LOOP;

    -- New history since the cursor, in chunks, until max_per_cycle or the time budget is spent.
    LOOP
        budget := cfg.max_per_cycle - n_enqueued;
        EXIT WHEN budget <= 0;
        v_chunk_started := clock_timestamp();
        chunk := orphan_cleanup._process_chunk(att, p_cycle, p_actor, cutoff, cur_ts, cur_id,
                                               chunk_rows, NULL, v_grace, dry, budget);
        scanned := scanned + chunk.seen; n_found := n_found + chunk.n_found; n_enqueued := n_enqueued + chunk.n_enqueued;
        n_protected := n_protected + chunk.n_protected; n_rejected := n_rejected + chunk.n_rejected;
        PERFORM orphan_cleanup._check_breaker(v_limit, n_enqueued, scanned, rechecked, v_limits);
        IF chunk.seen > 0 THEN
            cur_ts := chunk.last_ts;
            cur_id := chunk.last_id;
        END IF;
        -- The end of the history; a capped chunk goes on while the budget lasts. A cycle that
        -- reached max_per_cycle stopped there, not at its time budget (it waits the interval).
        EXIT WHEN chunk.seen < chunk_rows AND NOT chunk.capped;
        EXIT WHEN n_enqueued >= cfg.max_per_cycle;
        IF NOT orphan_cleanup._another_chunk_fits(v_chunk_started, deadline) THEN
            v_out_of_time := true;
            EXIT;
        END IF;
    END LOOP;

    -- Strays (strays.sql), once the jobs are done, in what is left of the budget.
    IF cfg.reclaim_strays THEN
        IF v_out_of_time OR n_enqueued >= cfg.max_per_cycle THEN
            stray_pass := 'not run: the jobs took this cycle''s budget';
        ELSE
            v_strays_started := clock_timestamp();
            v_strays := orphan_cleanup._reconcile_strays(att, p_cycle, p_actor, v_grace, dry, deadline,
                                                         cfg.max_per_cycle - n_enqueued, v_limit, n_enqueued, v_limits);
            strays_scanned := v_strays.scanned;
            strays_enqueued := v_strays.n_enqueued;
            stray_pass := v_strays.pass;
            stray_ms := round(extract(epoch FROM clock_timestamp() - v_strays_started) * 1000, 1);
            n_enqueued := n_enqueued + v_strays.n_enqueued;
            v_out_of_time := v_out_of_time OR v_strays.out_of_time;
        END IF;
    END IF;
    IF v_out_of_time THEN
        UPDATE orphan_cleanup.cycle_log AS l SET out_of_time = true WHERE l.id = p_cycle;
        RAISE LOG 'pg_orphan_cleanup cycle %: stopped at its time budget (orphan_cleanup.cycle_time_budget = % ms) after % jobs; the next cycle goes on from there',
            p_cycle, cfg.cycle_time_budget_ms, scanned;
    END IF;

    IF NOT dry THEN
        -- A DBA's reset_breaker() lets one backlog through: the approved cycle, and the cycles
        -- that carry on its work while they run out of time.
        UPDATE orphan_cleanup.detector_state
           SET cursor_ts = cur_ts, cursor_id = cur_id, breaker_approved = breaker_approved AND v_out_of_time;
        PERFORM orphan_cleanup._prune(make_interval(secs => cfg.history_retention_s));
        PERFORM orphan_cleanup._prune_objects(att, p_actor, deadline);
        IF n_enqueued > 0 THEN
            PERFORM pg_catalog.pg_notify('orphan_cleanup_queue', n_enqueued::text);
        END IF;
    END IF;
END
$$;

CREATE OR REPLACE FUNCTION orphan_cleanup.enqueue_orphans(min_age interval DEFAULT NULL, max_rows integer DEFAULT 100)
RETURNS bigint
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp SET jit = off
AS $$
DECLARE
    att orphan_cleanup.attachment;
    cfg record;
    cutoff timestamptz;
    cur_ts timestamptz := '-infinity';
    cur_id uuid := '00000000-0000-0000-0000-000000000000';
    total bigint := 0;
    chunk record;
    budget bigint;
BEGIN
    IF max_rows IS NULL OR max_rows < 1 THEN
        RAISE EXCEPTION 'max_rows must be at least 1, got %', max_rows USING ERRCODE = 'invalid_parameter_value';
    END IF;
    att := orphan_cleanup._require_attached('enqueue_orphans()');
    SELECT * INTO cfg FROM orphan_cleanup._config();
    IF orphan_cleanup._no_entries(cfg.allowed_buckets) THEN
        RAISE EXCEPTION 'orphan_cleanup.allowed_buckets is empty, so no object may be deleted'
            USING ERRCODE = 'invalid_parameter_value',
                  HINT = 'ALTER SYSTEM SET orphan_cleanup.allowed_buckets = ''renders''; SELECT pg_reload_conf();';
    END IF;
    cutoff := now() - coalesce(min_age, make_interval(secs => cfg.min_age_s));
    LOOP
        budget := max_rows - total;
        EXIT WHEN budget <= 0;
        chunk := orphan_cleanup._process_chunk(att, NULL, session_user::text, cutoff, cur_ts, cur_id,
                                               10000, NULL, make_interval(secs => cfg.grace_s), false, budget);
        total := total + chunk.n_enqueued;
        EXIT WHEN chunk.seen < 10000 AND NOT chunk.capped;
        cur_ts := chunk.last_ts;
        cur_id := chunk.last_id;
    END LOOP;
    IF total > 0 THEN
        PERFORM pg_catalog.pg_notify('orphan_cleanup_queue', total::text);
    END IF;
    RETURN total;
END
$$;

CREATE OR REPLACE FUNCTION orphan_cleanup.attach()
RETURNS TABLE (item text, status text, detail text)
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp SET jit = off SET lock_timeout = '10s'
AS $$
DECLARE
    cfg record;
    v_jobs oid;
    v_assets oid;
    problems text[] := '{}';
    prev orphan_cleanup.attachment;
    want record;
    v_type text;
    v_typtype "char";
    fk record;
    v_marked boolean;
BEGIN
    SELECT * INTO cfg FROM orphan_cleanup._config();
    v_jobs := pg_catalog.to_regclass(cfg.jobs_table);
    v_assets := pg_catalog.to_regclass(cfg.assets_table);
    IF v_jobs IS NULL THEN
        problems := problems || format('jobs table %s (orphan_cleanup.jobs_table) does not exist; set a schema-qualified name such as public.render_jobs', cfg.jobs_table);
    END IF;
    IF v_assets IS NULL THEN
        problems := problems || format('assets table %s (orphan_cleanup.assets_table) does not exist; set a schema-qualified name such as public.user_assets', cfg.assets_table);
    END IF;
    FOR want IN
        SELECT * FROM (VALUES
            (v_jobs, 'id', ARRAY['uuid'], 'the job id the assets reference'),
            (v_jobs, 'status', ARRAY['text', 'character varying', 'enum'], 'completed jobs have status ''completed'''),
            (v_jobs, 'output_url', ARRAY['text', 'character varying'], 'the storage URL of the job''s file'),
            (v_jobs, cfg.age_column, ARRAY['timestamp with time zone'], 'orphan_cleanup.age_column'),
            (v_assets, 'id', NULL, 'the guide''s orphan query joins on it'),
            (v_assets, 'metadata', ARRAY['jsonb', 'json'], 'holds render_job_id')
        ) AS w(rel, col, types, why)
        WHERE w.rel IS NOT NULL
    LOOP
        SELECT pg_catalog.format_type(a.atttypid, NULL), t.typtype INTO v_type, v_typtype
        FROM pg_catalog.pg_attribute AS a JOIN pg_catalog.pg_type AS t ON t.oid = a.atttypid
        WHERE a.attrelid = want.rel AND a.attname = want.col AND a.attnum > 0 AND NOT a.attisdropped;
        IF NOT FOUND THEN
            problems := problems || format('column %I is missing from %s (%s)', want.col, want.rel::regclass, want.why);
        ELSIF want.col = cfg.age_column AND want.rel = v_jobs AND v_type = 'timestamp without time zone' THEN
            -- Read in each session's TimeZone: a DBA in UTC+9 would age every job by nine hours.
            problems := problems || format('column %I of %s is timestamp without time zone, whose values each session reads in its own TimeZone (a cycle run from a session in UTC+9 would age every job by nine hours); store it as timestamptz: ALTER TABLE %s ALTER COLUMN %I TYPE timestamptz USING %I AT TIME ZONE %L',
                                           want.col, want.rel::regclass, want.rel::regclass, want.col, want.col, 'UTC');
        ELSIF want.types IS NOT NULL AND NOT (v_type = ANY (want.types) OR (v_typtype = 'e' AND 'enum' = ANY (want.types))) THEN
            problems := problems || format('column %I of %s is %s, expected %s (%s)', want.col, want.rel::regclass, v_type,
                                           array_to_string(want.types, ' or '), want.why);
        END IF;
    END LOOP;
    IF cardinality(problems) > 0 THEN
        RAISE EXCEPTION 'attach() found % problem(s) with the configured tables; nothing was changed', cardinality(problems)
            USING ERRCODE = 'undefined_object',
                  DETAIL = array_to_string(problems, E'\n'),
                  HINT = 'Fix the tables or the orphan_cleanup.jobs_table / assets_table / age_column settings (ALTER SYSTEM SET ...; SELECT pg_reload_conf();), then run attach() again.';
    END IF;

    v_marked := orphan_cleanup._guards_changing();
    SELECT * INTO prev FROM orphan_cleanup.attachment;
    IF FOUND AND (prev.assets_oid <> v_assets OR prev.jobs_oid <> v_jobs) THEN
        PERFORM orphan_cleanup._refuse_while_claimed('attach() to other tables', ARRAY[prev.assets_oid, prev.jobs_oid]);
    END IF;
    IF FOUND AND prev.assets_oid <> v_assets THEN
        PERFORM orphan_cleanup._drop_guards(prev.assets_oid);
    END IF;
    IF FOUND AND prev.jobs_oid <> v_jobs THEN
        PERFORM orphan_cleanup._drop_partition_guards();
        DELETE FROM orphan_cleanup.job_partitions;
        PERFORM orphan_cleanup._drop_guards(prev.jobs_oid);
    END IF;
    INSERT INTO orphan_cleanup.attachment AS a (singleton, jobs_table, jobs_oid, assets_table, assets_oid, age_column)
    VALUES (true, cfg.jobs_table, v_jobs, cfg.assets_table, v_assets, cfg.age_column)
    ON CONFLICT (singleton) DO UPDATE
       SET jobs_table = excluded.jobs_table, jobs_oid = excluded.jobs_oid,
           assets_table = excluded.assets_table, assets_oid = excluded.assets_oid,
           age_column = excluded.age_column, attached_at = now(), attached_by = current_user;
    IF prev IS NULL OR prev.jobs_oid <> v_jobs OR prev.assets_oid <> v_assets OR prev.age_column <> cfg.age_column THEN
        UPDATE orphan_cleanup.detector_state SET sweep_started_at = NULL;
    END IF;

    -- The triggers need a brief SHARE ROW EXCLUSIVE lock on the app's tables. Waiting behind a
    -- long transaction would stall every write of the app queued behind this one: give up after
    -- lock_timeout (10 s, set on this function) instead, and say so.
    BEGIN
        PERFORM orphan_cleanup._drop_guards(v_assets);
        EXECUTE format('CREATE TRIGGER orphan_cleanup_save_guard AFTER INSERT OR UPDATE OR DELETE ON %s FOR EACH ROW EXECUTE FUNCTION orphan_cleanup.save_guard()', v_assets::regclass);
        -- ALWAYS: the guard fires under session_replication_role = replica too (logical replication).
        EXECUTE format('ALTER TABLE %s ENABLE ALWAYS TRIGGER orphan_cleanup_save_guard', v_assets::regclass);
        EXECUTE format('CREATE TRIGGER orphan_cleanup_truncate_guard AFTER TRUNCATE ON %s FOR EACH STATEMENT EXECUTE FUNCTION orphan_cleanup.truncate_guard()', v_assets::regclass);
        EXECUTE format('ALTER TABLE %s ENABLE ALWAYS TRIGGER orphan_cleanup_truncate_guard', v_assets::regclass);
        -- The jobs table's half: every write that points a job at an object (no column list: an
        -- app's own BEFORE trigger may set output_url without naming it).
        PERFORM orphan_cleanup._drop_guards(v_jobs);
        EXECUTE format('CREATE TRIGGER orphan_cleanup_job_guard AFTER INSERT OR UPDATE OR DELETE ON %s FOR EACH ROW EXECUTE FUNCTION orphan_cleanup.job_guard()', v_jobs::regclass);
        EXECUTE format('ALTER TABLE %s ENABLE ALWAYS TRIGGER orphan_cleanup_job_guard', v_jobs::regclass);
        EXECUTE format('CREATE TRIGGER orphan_cleanup_truncate_guard BEFORE TRUNCATE ON %s FOR EACH STATEMENT EXECUTE FUNCTION orphan_cleanup.job_truncate_guard()', v_jobs::regclass);
        EXECUTE format('ALTER TABLE %s ENABLE ALWAYS TRIGGER orphan_cleanup_truncate_guard', v_jobs::regclass);
        -- confirm()'s writes to the jobs table run as its owner.
        PERFORM orphan_cleanup._own_job_writer(v_jobs);
    EXCEPTION WHEN lock_not_available THEN
        RAISE EXCEPTION 'attach() gave up waiting for a lock on % or %: a long transaction is using them; nothing was changed', v_jobs::regclass, v_assets::regclass
            USING ERRCODE = 'lock_not_available',
                  HINT = 'Find it in pg_stat_activity (SELECT pid, xact_start, query FROM pg_stat_activity WHERE xact_start < now() - interval ''10 seconds''), let it finish, and run attach() again.';
    END;

    -- No saved job may have a URL that cannot be read in full (see _unread_url).
    PERFORM orphan_cleanup._refuse_unread_saved(v_jobs, v_assets, 'attach()');
    -- Nor may row-level security hide rows from the role these functions run as.
    IF (SELECT orphan_cleanup._rls_problem(a) FROM orphan_cleanup.attachment AS a) IS NOT NULL THEN
        RAISE EXCEPTION 'attach() refused: %; nothing was changed',
                        (SELECT orphan_cleanup._rls_problem(a) FROM orphan_cleanup.attachment AS a)
            USING ERRCODE = 'insufficient_privilege',
                  HINT = 'Fix it, then run attach() again.';
    END IF;

    INSERT INTO orphan_cleanup.audit_log (action, actor, detail)
    VALUES ('attached', session_user, format('jobs %s, assets %s, age column %I', v_jobs::regclass, v_assets::regclass, cfg.age_column));
    -- A partitioned jobs table: each partition's TRUNCATE guard, and the record of them. A
    -- partition not recorded yet has its saved jobs checked as the DDL watch checks them (one
    -- whose look failed must not be recorded by running attach() again: the fifth review).
    PERFORM orphan_cleanup._look_at_partitions(a) FROM orphan_cleanup.attachment AS a;
    -- A partitioned assets table: its partitions recorded; those that joined since a previous
    -- attach() to this table have their assets' jobs saved first, as the DDL watch would have.
    PERFORM orphan_cleanup._look_at_asset_partitions(a, check_saves => prev.assets_oid IS NOT DISTINCT FROM v_assets)
    FROM orphan_cleanup.attachment AS a;
    -- The DDL watch applies again to what the rest of the caller's transaction does.
    PERFORM orphan_cleanup._guards_changed(v_marked);

    item := 'jobs table'; status := 'ok'; detail := v_jobs::regclass::text; RETURN NEXT;
    item := 'assets table'; status := 'ok'; detail := v_assets::regclass::text; RETURN NEXT;
    item := 'save guard'; status := 'ok';
    detail := format('trigger orphan_cleanup_save_guard installed on %s (enabled ALWAYS)', v_assets::regclass); RETURN NEXT;
    item := 'job guard'; status := 'ok';
    detail := format('triggers orphan_cleanup_job_guard and orphan_cleanup_truncate_guard installed on %s (enabled ALWAYS)', v_jobs::regclass); RETURN NEXT;
    FOR fk IN
        SELECT c.conname, c.conrelid::regclass AS tbl, c.confdeltype
        FROM pg_catalog.pg_constraint AS c
        WHERE c.confrelid = v_jobs AND c.contype = 'f'
    LOOP
        item := 'foreign key ' || fk.conname;
        status := 'warning';
        detail := format('%s references the jobs table ON DELETE %s: %s', fk.tbl,
                         CASE fk.confdeltype WHEN 'c' THEN 'CASCADE' WHEN 'n' THEN 'SET NULL' WHEN 'd' THEN 'SET DEFAULT'
                                             WHEN 'r' THEN 'RESTRICT' ELSE 'NO ACTION' END,
                         CASE WHEN fk.confdeltype IN ('c', 'n', 'd')
                              THEN 'with on_confirm = delete, confirm() also changes the referencing rows; set orphan_cleanup.on_confirm = clear_url to keep them'
                              ELSE 'confirm() cannot delete referenced jobs and clears their output_url instead (audited)' END);
        RETURN NEXT;
    END LOOP;
    IF orphan_cleanup._no_entries(cfg.allowed_buckets) THEN
        item := 'allowed_buckets'; status := 'warning';
        detail := 'empty: cycles will refuse to run until you set orphan_cleanup.allowed_buckets'; RETURN NEXT;
    END IF;
    RETURN QUERY SELECT * FROM orphan_cleanup._index_report(v_jobs, v_assets, cfg.age_column);
END
$$;

CREATE OR REPLACE FUNCTION orphan_cleanup.run_cycle()
RETURNS TABLE (cycle_id bigint, status text, found bigint, enqueued bigint, protected bigint,
               rejected bigint, duration_ms numeric)
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp SET jit = off
AS $$
DECLARE
    v_id bigint;
    v_actor text := orphan_cleanup._actor();
    v_started timestamptz := clock_timestamp();
    v_ms numeric;
    r record;
    v_msg text;
    v_detail text;
    v_hint text;
    brk record;
BEGIN
    IF NOT pg_catalog.pg_try_advisory_xact_lock(7310246, 1) THEN
        INSERT INTO orphan_cleanup.cycle_log (status, actor, finished_at, duration_ms, error)
        VALUES ('skipped', v_actor, clock_timestamp(), 0, 'another cleanup cycle was running')
        RETURNING id INTO v_id;
        RAISE NOTICE 'pg_orphan_cleanup: another cleanup cycle is running; cycle % skipped', v_id;
        RETURN QUERY SELECT v_id, 'skipped'::text, 0::bigint, 0::bigint, 0::bigint, 0::bigint, 0::numeric;
        RETURN;
    END IF;
    IF pg_catalog.pg_is_in_recovery() THEN
        RAISE NOTICE 'pg_orphan_cleanup: this server is a standby; cleanup cycles run on the primary';
        RETURN;
    END IF;

    PERFORM orphan_cleanup._flush_refusals();
    INSERT INTO orphan_cleanup.cycle_log (status, actor) VALUES ('running', v_actor) RETURNING id INTO v_id;
    brk := orphan_cleanup._breaker_tripped(v_actor);
    IF brk.tripped_at IS NOT NULL THEN
        v_msg := format('the circuit breaker tripped at %s and stops every cycle: %s', brk.tripped_at, brk.detail);
        UPDATE orphan_cleanup.cycle_log AS l
           SET status = 'tripped', finished_at = clock_timestamp(), duration_ms = 0, error = v_msg
         WHERE l.id = v_id;
        RAISE WARNING 'Cleanup cycle not run (pg_orphan_cleanup cycle %): %', v_id, v_msg
            USING HINT = 'Look first: SELECT * FROM orphan_cleanup.preview(); SELECT * FROM orphan_cleanup.validation_report(); '
                         'then SELECT orphan_cleanup.reset_breaker(''why''); or raise orphan_cleanup.breaker_* limits.';
        RETURN QUERY SELECT v_id, 'tripped'::text, 0::bigint, 0::bigint, 0::bigint, 0::bigint, 0::numeric;
        RETURN;
    END IF;
    RAISE LOG 'Starting comprehensive cleanup cycle (pg_orphan_cleanup cycle %, by %)', v_id, v_actor;
    -- Before the part a failed cycle rolls back: statistics it puts right stay right.
    PERFORM orphan_cleanup._refresh_statistics(v_actor, for_cycle => true);
    PERFORM orphan_cleanup._pause_point('analyzed');
    BEGIN
        r := orphan_cleanup._cycle_body(v_id, v_actor);
        PERFORM orphan_cleanup._pause_point('cycle');
    EXCEPTION WHEN SQLSTATE 'OC002' THEN
        -- The breaker tripped: everything this cycle did is rolled back (nothing enqueued, the
        -- cursor and the rechecks as they were), and the trip is recorded.
        GET STACKED DIAGNOSTICS v_msg = MESSAGE_TEXT;
        v_ms := round(extract(epoch FROM clock_timestamp() - v_started) * 1000, 1);
        PERFORM orphan_cleanup._trip_breaker(v_id, v_actor, v_msg);
        UPDATE orphan_cleanup.cycle_log AS l
           SET status = 'tripped', finished_at = clock_timestamp(), duration_ms = v_ms, error = v_msg
         WHERE l.id = v_id;
        RAISE WARNING 'Circuit breaker tripped (pg_orphan_cleanup cycle %): %; nothing was enqueued, and cycles stay stopped', v_id, v_msg
            USING HINT = 'Look first: SELECT * FROM orphan_cleanup.preview(); SELECT * FROM orphan_cleanup.validation_report(); '
                         'if the orphans are real, SELECT orphan_cleanup.reset_breaker(''why''); otherwise fix the data (a renamed key, a restored table) and reset.';
        RETURN QUERY SELECT v_id, 'tripped'::text, 0::bigint, 0::bigint, 0::bigint, 0::bigint, v_ms;
        RETURN;
    WHEN OTHERS THEN
        GET STACKED DIAGNOSTICS v_msg = MESSAGE_TEXT, v_detail = PG_EXCEPTION_DETAIL, v_hint = PG_EXCEPTION_HINT;
        v_ms := round(extract(epoch FROM clock_timestamp() - v_started) * 1000, 1);
        UPDATE orphan_cleanup.cycle_log AS l
           SET status = 'failed', finished_at = clock_timestamp(), duration_ms = v_ms,
               error = v_msg || coalesce(E'\nDETAIL: ' || nullif(v_detail, ''), '') || coalesce(E'\nHINT: ' || nullif(v_hint, ''), '')
         WHERE l.id = v_id;
        RAISE WARNING 'Comprehensive cleanup cycle failed (pg_orphan_cleanup cycle %): %', v_id,
            v_msg || coalesce(E'\nDETAIL: ' || nullif(v_detail, ''), '') || coalesce(E'\nHINT: ' || nullif(v_hint, ''), '');
        RETURN QUERY SELECT v_id, 'failed'::text, 0::bigint, 0::bigint, 0::bigint, 0::bigint, v_ms;
        RETURN;
    END;
    v_ms := round(extract(epoch FROM clock_timestamp() - v_started) * 1000, 1);
    UPDATE orphan_cleanup.cycle_log AS l
       SET status = CASE WHEN r.dry THEN 'dry_run' ELSE 'ok' END, finished_at = clock_timestamp(),
           duration_ms = v_ms, full_sweep = r.full_sweep, scanned = r.scanned, rechecked = r.rechecked,
           found = r.n_found, enqueued = r.n_enqueued, protected = r.n_protected, rejected = r.n_rejected,
           strays_scanned = r.strays_scanned, strays_enqueued = r.strays_enqueued, stray_pass = r.stray_pass,
           stray_ms = r.stray_ms
     WHERE l.id = v_id;
    RAISE LOG 'Comprehensive cleanup cycle completed (pg_orphan_cleanup cycle %): found %, %enqueued %, protected %, rejected %, scanned %, % ms%',
        v_id, r.n_found, CASE WHEN r.dry THEN 'dry run, would have ' ELSE '' END, r.n_enqueued, r.n_protected, r.n_rejected,
        r.scanned, v_ms, CASE WHEN r.full_sweep THEN ', full sweep' ELSE '' END;
    RETURN QUERY SELECT v_id, CASE WHEN r.dry THEN 'dry_run' ELSE 'ok' END, r.n_found, r.n_enqueued, r.n_protected, r.n_rejected, v_ms;
END
$$;

CREATE OR REPLACE FUNCTION orphan_cleanup._prune(retention interval) RETURNS void
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp SET jit = off
    SET enable_seqscan = off SET enable_bitmapscan = off
AS $$
BEGIN
    -- Marks of transactions long over (a function unmarks its own; this is only a backstop).
    DELETE FROM orphan_cleanup.guards_changing AS g WHERE g.since < now() - interval '1 day';
    IF (SELECT d.finished_at FROM orphan_cleanup.deletion_queue AS d
        WHERE d.state IN ('deleted', 'absent', 'cancelled', 'rescued', 'stale', 'rejected')
        ORDER BY d.finished_at LIMIT 1) < now() - retention THEN
        -- What the pruned rows said goes into the savings ledger first, in the same statement.
        WITH gone AS (
            DELETE FROM orphan_cleanup.deletion_queue
            WHERE id IN (SELECT id FROM orphan_cleanup.deletion_queue
                         WHERE finished_at < now() - retention
                           AND state IN ('deleted', 'absent', 'cancelled', 'rescued', 'stale', 'rejected')
                         ORDER BY finished_at LIMIT 10000)
            RETURNING enqueued_at, finished_at, state, bytes, kind)
        INSERT INTO orphan_cleanup.savings_ledger AS l (day, kind, found, found_bytes, deleted, deleted_bytes)
        SELECT x.day, x.kind, sum(x.found), sum(x.found_bytes), sum(x.deleted), sum(x.deleted_bytes)
        FROM (SELECT (g.enqueued_at AT TIME ZONE 'UTC')::date AS day, g.kind, 1 AS found,
                     coalesce(g.bytes, 0) AS found_bytes, 0 AS deleted, 0 AS deleted_bytes
              FROM gone AS g
              UNION ALL
              SELECT (g.finished_at AT TIME ZONE 'UTC')::date, g.kind, 0, 0, 1, coalesce(g.bytes, 0)
              FROM gone AS g WHERE g.state = 'deleted') AS x
        GROUP BY x.day, x.kind
        ON CONFLICT (day, kind) DO UPDATE
            SET found = l.found + EXCLUDED.found, found_bytes = l.found_bytes + EXCLUDED.found_bytes,
                deleted = l.deleted + EXCLUDED.deleted, deleted_bytes = l.deleted_bytes + EXCLUDED.deleted_bytes;
    END IF;
    IF (SELECT a.at FROM orphan_cleanup.audit_log AS a ORDER BY a.at LIMIT 1) < now() - retention THEN
        DELETE FROM orphan_cleanup.audit_log
        WHERE id IN (SELECT id FROM orphan_cleanup.audit_log WHERE at < now() - retention ORDER BY at LIMIT 10000);
    END IF;
    -- Reapers that have not claimed for that long, and old refusals: small tables.
    DELETE FROM orphan_cleanup.reapers AS r
     WHERE r.last_claim_at < now() - retention AND orphan_cleanup._lock_reaper_row(r.reaper);
    DELETE FROM orphan_cleanup.refusals WHERE at < now() - retention;
    -- Busy hints past their few seconds (a small table: the rows claims found busy lately).
    DELETE FROM orphan_cleanup.busy WHERE until < now();
    IF (SELECT l.started_at FROM orphan_cleanup.cycle_log AS l ORDER BY l.started_at LIMIT 1) < now() - retention THEN
        DELETE FROM orphan_cleanup.cycle_log
        WHERE id IN (SELECT id FROM orphan_cleanup.cycle_log WHERE started_at < now() - retention ORDER BY started_at LIMIT 10000);
    END IF;
END
$$;

-- claim() takes the reaper's hosts: the old signature goes, the new one replaces it.
DROP FUNCTION orphan_cleanup.claim(text, integer, interval, text[]);

-- The allow-list's hosts and a reaper's hosts, spelled as the URL parser spells them (Rust).
CREATE FUNCTION orphan_cleanup."_allowed_hosts"() RETURNS TEXT[]
STRICT STABLE PARALLEL SAFE
LANGUAGE c
AS 'MODULE_PATHNAME', '_allowed_hosts_wrapper';
CREATE FUNCTION orphan_cleanup."_normalize_hosts"("hosts" TEXT[], "what" TEXT) RETURNS TEXT[]
IMMUTABLE STRICT PARALLEL SAFE
LANGUAGE c
AS 'MODULE_PATHNAME', '_normalize_hosts_wrapper';

CREATE FUNCTION orphan_cleanup._serves(buckets text[], hosts text[], home_ok boolean, bucket text, host text) RETURNS boolean
LANGUAGE sql IMMUTABLE PARALLEL SAFE
RETURN home_ok
   AND (buckets IS NULL OR bucket OPERATOR(pg_catalog.=) ANY (buckets))
   AND (host IS NULL OR hosts IS NULL OR host OPERATOR(pg_catalog.=) ANY (hosts));

CREATE FUNCTION orphan_cleanup._home_ok(hosts text[], home text) RETURNS boolean
LANGUAGE sql STABLE SET search_path = pg_catalog, pg_temp
RETURN hosts IS NULL
    OR orphan_cleanup._no_entries((SELECT c.allowed_hosts FROM orphan_cleanup._config() AS c))
    OR coalesce(home = ANY (orphan_cleanup._allowed_hosts()), false);

CREATE FUNCTION orphan_cleanup._lock_reaper_row(p_reaper text) RETURNS boolean
LANGUAGE sql VOLATILE SET search_path = pg_catalog, pg_temp
RETURN pg_try_advisory_xact_lock(7310248, hashtext(p_reaper));

CREATE FUNCTION orphan_cleanup._note_reaper(p_reaper text, p_buckets text[], p_hosts text[], p_home text) RETURNS void
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp SET jit = off
AS $$
BEGIN
    IF NOT orphan_cleanup._lock_reaper_row(p_reaper) THEN
        RETURN;
    END IF;
    IF EXISTS (SELECT 1 FROM orphan_cleanup.reapers AS r
               WHERE r.reaper = p_reaper
                 AND (r.buckets IS DISTINCT FROM p_buckets OR r.hosts IS DISTINCT FROM p_hosts OR r.home IS DISTINCT FROM p_home)) THEN
        DELETE FROM orphan_cleanup.refusals AS f WHERE f.refused_by = p_reaper;
    END IF;
    INSERT INTO orphan_cleanup.reapers AS r (reaper, buckets, hosts, home)
    VALUES (p_reaper, p_buckets, p_hosts, p_home)
    ON CONFLICT (reaper) DO UPDATE
       SET buckets = EXCLUDED.buckets, hosts = EXCLUDED.hosts, home = EXCLUDED.home, last_claim_at = now();
END
$$;

CREATE FUNCTION orphan_cleanup._note_passed_over(p_reaper text, p_max integer, p_buckets text[], p_hosts text[], p_home_ok boolean) RETURNS void
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp SET jit = off
AS $$
DECLARE
    v_passed bigint;
    v_what text;
BEGIN
    IF NOT orphan_cleanup._lock_reaper_row(p_reaper) THEN
        RETURN;
    END IF;
    SELECT count(*), string_agg(DISTINCT format('%s @ %s', s.bucket, coalesce(s.host, '(no host: a bare bucket/key value)')), ', ')
      INTO v_passed, v_what
    FROM (SELECT d.bucket, d.host FROM orphan_cleanup.deletion_queue AS d
          WHERE d.state = 'pending' AND d.available_at <= now()
          ORDER BY d.available_at, d.id
          LIMIT p_max) AS s
    WHERE NOT orphan_cleanup._serves(p_buckets, p_hosts, p_home_ok, s.bucket, s.host);
    UPDATE orphan_cleanup.reapers AS r
       SET passed_over = v_passed,
           passed_over_what = CASE WHEN v_passed > 0 THEN v_what ELSE r.passed_over_what END,
           passed_over_at = CASE WHEN v_passed > 0 THEN now() ELSE r.passed_over_at END
     WHERE r.reaper = p_reaper;
END
$$;

CREATE FUNCTION orphan_cleanup._new_objects(p_buckets text[], p_paths text[]) RETURNS text[]
LANGUAGE plpgsql VOLATILE SET search_path = pg_catalog, pg_temp SET lock_timeout = '20ms'
AS $$
DECLARE
    v_made text[];
    v_one text;
    i integer;
BEGIN
    BEGIN
        WITH made AS (
            INSERT INTO orphan_cleanup.objects AS o (bucket, object_path)
            SELECT * FROM unnest(p_buckets, p_paths)
            ON CONFLICT (bucket, object_path) DO NOTHING
            RETURNING o.bucket || '/' || o.object_path AS key)
        SELECT array_agg(m.key) INTO v_made FROM made AS m;
    EXCEPTION WHEN lock_not_available THEN
        v_made := '{}';
        FOR i IN 1 .. cardinality(p_paths) LOOP
            BEGIN
                v_one := NULL;
                INSERT INTO orphan_cleanup.objects AS o (bucket, object_path) VALUES (p_buckets[i], p_paths[i])
                ON CONFLICT (bucket, object_path) DO NOTHING
                RETURNING o.bucket || '/' || o.object_path INTO v_one;
                IF v_one IS NOT NULL THEN
                    v_made := v_made || v_one;
                END IF;
            EXCEPTION WHEN lock_not_available THEN
                NULL;  -- being created by a save or job write in flight: skipped this time
            END;
        END LOOP;
    END;
    RETURN coalesce(v_made, '{}');
END
$$;

-- Lease tokens: claim() returns one per claim (the queue keeps its hash); confirm, fail, release
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

CREATE UNIQUE INDEX deletion_queue_one_live_row_per_stray
    ON orphan_cleanup.deletion_queue (bucket, object_path) WHERE job_id IS NULL AND state IN ('pending', 'claimed');

CREATE FUNCTION orphan_cleanup._lease_hash(lease_token text) RETURNS bytea
LANGUAGE plpgsql IMMUTABLE SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    IF lease_token IS NULL OR lease_token !~* '^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$' THEN
        RAISE EXCEPTION 'lease_token must be the lease_token that claim() returned with these rows'
            USING ERRCODE = 'invalid_parameter_value',
                  HINT = 'Each claim() returns one lease_token for all of its rows; confirm, fail, release and refuse need it.';
    END IF;
    RETURN sha256(uuid_send(lease_token::uuid));
END
$$;

CREATE FUNCTION orphan_cleanup._needs_lease_token(fn text) RETURNS void
LANGUAGE plpgsql IMMUTABLE SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    RAISE EXCEPTION '%() needs the lease token that claim() returned: call orphan_cleanup.%(worker, lease_token, ids, ...)', fn, fn
        USING ERRCODE = 'undefined_function',
              HINT = 'A reaper older than pg_orphan_cleanup 0.2.0 cannot work with this version: stop it and run reaper 0.2.0 or later. Rows it holds come back when their lease ends.';
END
$$;

CREATE OR REPLACE FUNCTION orphan_cleanup.confirm(worker text, ids bigint[], outcome text DEFAULT 'deleted')
RETURNS TABLE (id bigint, result text)
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp
AS $$ BEGIN PERFORM orphan_cleanup._needs_lease_token('confirm'); END $$;

CREATE OR REPLACE FUNCTION orphan_cleanup.fail(worker text, ids bigint[], error text, retryable boolean DEFAULT true)
RETURNS TABLE (id bigint, result text)
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp
AS $$ BEGIN PERFORM orphan_cleanup._needs_lease_token('fail'); END $$;

CREATE OR REPLACE FUNCTION orphan_cleanup.release(worker text, ids bigint[] DEFAULT NULL, reason text DEFAULT NULL) RETURNS bigint
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp
AS $$ BEGIN PERFORM orphan_cleanup._needs_lease_token('release'); RETURN NULL; END $$;

CREATE FUNCTION orphan_cleanup.refuse(worker text, ids bigint[], reason text)
RETURNS TABLE (id bigint, result text)
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp
AS $$ BEGIN PERFORM orphan_cleanup._needs_lease_token('refuse'); END $$;

CREATE OR REPLACE FUNCTION orphan_cleanup._expire_leases(actor text) RETURNS bigint
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp SET jit = off SET enable_seqscan = off
AS $$
DECLARE
    v_max integer := (SELECT max_attempts FROM orphan_cleanup._config());
    v_backoff_s integer := (SELECT retry_backoff_s FROM orphan_cleanup._config());
    n bigint;
BEGIN
    WITH expired AS (
        SELECT d.id FROM orphan_cleanup.deletion_queue AS d
        WHERE d.state = 'claimed' AND d.lease_until < now()
        ORDER BY d.lease_until
        LIMIT 5000
        FOR UPDATE SKIP LOCKED
    ),
    moved AS (
        UPDATE orphan_cleanup.deletion_queue AS d
           SET attempts = d.attempts + 1,
               state = CASE WHEN d.attempts + 1 >= v_max THEN 'dead' ELSE 'pending' END,
               available_at = now() + orphan_cleanup._backoff(d.attempts + 1, v_backoff_s),
               last_error = format('lease expired: %s claimed it at %s and never confirmed', d.claimed_by, d.claimed_at),
               lease_until = NULL, lease_hash = NULL,
               finished_at = CASE WHEN d.attempts + 1 >= v_max THEN now() END,
               updated_at = now()
          FROM expired
         WHERE d.id = expired.id
        RETURNING d.id, d.job_id, d.output_url, d.state, d.last_error, d.attempts
    ),
    audited AS (
        INSERT INTO orphan_cleanup.audit_log (action, job_id, queue_id, output_url, actor, detail)
        SELECT 'failed', m.job_id, m.id, m.output_url, actor, format('%s (attempt %s)', m.last_error, m.attempts) FROM moved AS m
        UNION ALL
        SELECT 'dead_lettered', m.job_id, m.id, m.output_url, actor, format('out of attempts (%s): %s', m.attempts, m.last_error)
        FROM moved AS m WHERE m.state = 'dead'
    )
    SELECT count(*) INTO n FROM moved;
    RETURN n;
END
$$;

CREATE OR REPLACE FUNCTION orphan_cleanup._reaper_alert(OUT alert text, OUT alert_at timestamptz, OUT alert_by text)
LANGUAGE sql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp
BEGIN ATOMIC
    SELECT a.detail, a.at, a.actor
    FROM orphan_cleanup.audit_log AS a
    WHERE a.action = 'released' AND a.detail IS NOT NULL AND a.detail <> '(nothing was sent)'
      AND a.at > now() - interval '1 hour'
    ORDER BY a.id DESC
    LIMIT 1;
END;

CREATE FUNCTION orphan_cleanup._not_held(d orphan_cleanup.deletion_queue, worker text, lease bytea) RETURNS text
LANGUAGE sql STABLE SET search_path = pg_catalog, pg_temp
RETURN CASE WHEN d.id IS NULL THEN 'no such queue row'
            WHEN d.state = 'claimed' AND d.claimed_by = worker AND d.lease_hash IS DISTINCT FROM lease
                THEN 'the lease token does not match this claim (a later claim holds it, or the token is wrong)'
            WHEN d.state = 'claimed' THEN format('lease lost, the row is now claimed by %s', d.claimed_by)
            WHEN d.state = 'pending' THEN 'lease lost, the row was requeued'
            ELSE format('the row is already %s', d.state) END;

CREATE FUNCTION orphan_cleanup._unsent(ids bigint[], actor text) RETURNS void
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    WITH t AS (
        SELECT d.bucket, d.object_path, array_agg(d.id) AS ids, count(*)::integer AS n
        FROM orphan_cleanup.deletion_queue AS d
        WHERE d.id = ANY (ids) AND d.bucket IS NOT NULL AND d.claim_count > 0
        GROUP BY d.bucket, d.object_path
    ),
    locked AS (
        SELECT t.* FROM t
        CROSS JOIN LATERAL (SELECT 1 FROM orphan_cleanup.objects AS o
                            WHERE o.bucket = t.bucket AND o.object_path = t.object_path
                            FOR UPDATE SKIP LOCKED) AS o
    ),
    untainted AS (
        UPDATE orphan_cleanup.objects AS o
           SET handouts = greatest(o.handouts - l.n, 0), touched_at = now()
          FROM locked AS l
         WHERE o.bucket = l.bucket AND o.object_path = l.object_path
    )
    UPDATE orphan_cleanup.deletion_queue AS d
       SET claim_count = d.claim_count - 1
      FROM locked AS l
     WHERE d.id = ANY (l.ids);
END
$$;

CREATE FUNCTION orphan_cleanup.claim(
    worker text,
    max_rows integer DEFAULT 1000,
    lease interval DEFAULT '5 minutes',
    buckets text[] DEFAULT NULL,
    hosts text[] DEFAULT NULL,
    home_host text DEFAULT NULL)
RETURNS TABLE (id bigint, job_id uuid, host text, bucket text, object_path text, attempts integer, lease_token text)
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp SET jit = off
AS $$
DECLARE
    -- The fencing token of this claim: returned with its rows, kept only as a hash.
    v_token text := gen_random_uuid()::text;
    v_lease bytea := orphan_cleanup._lease_hash(v_token);
    cfg record;
    att orphan_cleanup.attachment;
    v_ids bigint[];
    v_locked uuid[];
    v_objs text[];
    v_kept text[];
    v_buckets text[];
    v_paths text[];
    v_new_buckets text[];
    v_new_paths text[];
    v_ok bigint[];
    v_bad bigint[];
    v_bad_state text[];
    v_bad_reason text[];
    v_wait bigint[];
    v_wait_until timestamptz[];
    v_busy bigint[];
    v_home_ok boolean;
    v_n bigint;
    v_inventory boolean;
    v_refs_ok boolean;
    v_stored_sql text;
BEGIN
    PERFORM orphan_cleanup._check_worker(worker);
    IF max_rows IS NULL OR max_rows < 1 OR max_rows > 10000 THEN
        RAISE EXCEPTION 'max_rows must be between 1 and 10000, got %', coalesce(max_rows::text, 'NULL')
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF lease IS NULL OR lease < interval '1 second' OR lease > interval '1 day' THEN
        RAISE EXCEPTION 'lease must be between 1 second and 1 day, got %', coalesce(lease::text, 'NULL')
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF current_setting('transaction_isolation') <> 'read committed' THEN
        RAISE EXCEPTION 'claim() must run at READ COMMITTED isolation, not %', current_setting('transaction_isolation')
            USING ERRCODE = 'invalid_transaction_state',
                  HINT = 'Its re-check needs a fresh snapshot after taking its locks; call it in its own transaction.';
    END IF;
    IF current_setting('transaction_read_only')::boolean THEN
        RAISE EXCEPTION 'claim() needs a read-write transaction: %',
            CASE WHEN pg_catalog.pg_is_in_recovery() THEN 'this server is a standby, and claims run on the primary'
                 ELSE 'this one is read-only' END
            USING ERRCODE = 'read_only_sql_transaction',
                  HINT = 'Connect to the primary (with a multi-host connection string, target_session_attrs=read-write), or SET TRANSACTION READ WRITE.';
    END IF;
    IF cardinality(buckets) = 0 OR array_position(buckets, NULL) IS NOT NULL
       OR EXISTS (SELECT 1 FROM unnest(buckets) AS x WHERE btrim(x) = '') THEN
        RAISE EXCEPTION 'buckets must name at least one bucket, with no NULL or empty entries, got %', buckets
            USING ERRCODE = 'invalid_parameter_value',
                  HINT = 'Pass the reaper''s own list, e.g. ARRAY[''renders''], or NULL for any.';
    END IF;
    -- Spelled as the parser spells a URL's host; anything else is refused, naming it.
    hosts := orphan_cleanup._normalize_hosts(hosts, 'hosts');
    IF home_host IS NOT NULL THEN
        home_host := (orphan_cleanup._normalize_hosts(ARRAY[home_host], 'home_host'))[1];
    END IF;
    SELECT * INTO cfg FROM orphan_cleanup._config();
    IF NOT cfg.reaping_enabled THEN
        RETURN;
    END IF;
    -- The app's tables in ROW EXCLUSIVE mode, without waiting: a transaction that is changing
    -- their triggers (ALTER TABLE ... DISABLE TRIGGER, pg_restore --disable-triggers) holds a
    -- lock that conflicts, and its saves are not guarded until it commits. Such a claim hands out
    -- nothing; the guard check below then reads the catalog as of after the lock.
    SELECT * INTO att FROM orphan_cleanup.attachment;
    -- (Tables that no longer exist, e.g. after a restore, are left to _require_attached().)
    IF FOUND AND (SELECT count(*) FROM pg_catalog.pg_class AS c WHERE c.oid IN (att.jobs_oid, att.assets_oid)) = 2 THEN
        BEGIN
            EXECUTE format('LOCK TABLE %s, %s IN ROW EXCLUSIVE MODE NOWAIT', att.jobs_oid::regclass, att.assets_oid::regclass);
        EXCEPTION WHEN lock_not_available OR undefined_table THEN
            RETURN;
        END;
    END IF;
    IF NOT orphan_cleanup._hold_references() THEN
        RETURN;
    END IF;
    att := orphan_cleanup._require_attached('claim()');
    -- An empty allow-list is a configuration mistake, not a policy: rejecting every row it
    -- re-checks would empty the queue into 'rejected' until the next full sweep.
    IF orphan_cleanup._no_entries(cfg.allowed_buckets) THEN
        RAISE EXCEPTION 'claim() refused: orphan_cleanup.allowed_buckets is empty, so no object may be deleted; the queue is left as it is'
            USING ERRCODE = 'object_not_in_prerequisite_state',
                  HINT = 'ALTER SYSTEM SET orphan_cleanup.allowed_buckets = ''renders''; SELECT pg_reload_conf();';
    END IF;
    -- The queue's and the objects' statistics (see _refresh_statistics), once nothing above
    -- refused the claim.
    PERFORM orphan_cleanup._refresh_statistics(worker, for_cycle => false);
    -- A claim must be durable before the reaper deletes anything: with synchronous_commit off,
    -- a crash could forget a claim whose files are already gone, and a later save would then
    -- "rescue" a row whose file no longer exists. Lasts until this transaction commits.
    PERFORM pg_catalog.set_config('synchronous_commit', 'on', true);
    PERFORM orphan_cleanup._expire_leases(worker);
    v_home_ok := orphan_cleanup._home_ok(hosts, home_host);
    PERFORM orphan_cleanup._note_reaper(worker, buckets, hosts, home_host);

    -- 1. Queue rows this reaper serves, oldest first; rows another transaction holds are
    --    skipped, never waited on. Rows a claim found busy in the last seconds (see busy in
    --    schema.sql) come after the others, so that they cannot fill every claim.
    SELECT array_agg(r.id), array_agg(r.bucket), array_agg(r.object_path) INTO v_ids, v_buckets, v_paths
    FROM (SELECT d.id, d.bucket, d.object_path FROM orphan_cleanup.deletion_queue AS d
          WHERE d.state = 'pending' AND d.available_at <= now()
            AND orphan_cleanup._serves(buckets, hosts, v_home_ok, d.bucket, d.host)
            AND (d.job_id IS NOT NULL OR cfg.reclaim_strays)
            AND NOT EXISTS (SELECT 1 FROM orphan_cleanup.refusals AS f
                            WHERE f.queue_id = d.id AND f.refused_by = worker)
            AND NOT EXISTS (SELECT 1 FROM orphan_cleanup.busy AS b
                            WHERE b.queue_id = d.id AND b.until > now())
          ORDER BY d.available_at, d.id
          LIMIT max_rows
          FOR UPDATE SKIP LOCKED) AS r;
    IF coalesce(cardinality(v_ids), 0) < max_rows THEN
        SELECT v_ids || array_agg(r.id), v_buckets || array_agg(r.bucket), v_paths || array_agg(r.object_path)
          INTO v_ids, v_buckets, v_paths
        FROM (SELECT d.id, d.bucket, d.object_path
              FROM orphan_cleanup.busy AS b
              JOIN orphan_cleanup.deletion_queue AS d ON d.id = b.queue_id
              WHERE b.until > now() AND d.state = 'pending' AND d.available_at <= now()
                AND orphan_cleanup._serves(buckets, hosts, v_home_ok, d.bucket, d.host)
                AND (d.job_id IS NOT NULL OR cfg.reclaim_strays)
                AND NOT EXISTS (SELECT 1 FROM orphan_cleanup.refusals AS f
                                WHERE f.queue_id = d.id AND f.refused_by = worker)
              ORDER BY d.available_at, d.id
              LIMIT max_rows - coalesce(cardinality(v_ids), 0)
              FOR UPDATE OF d SKIP LOCKED) AS r;
    END IF;
    IF coalesce(cardinality(v_ids), 0) < max_rows AND (buckets IS NOT NULL OR hosts IS NOT NULL) THEN
        PERFORM orphan_cleanup._note_passed_over(worker, max_rows, buckets, hosts, v_home_ok);
    END IF;
    IF v_ids IS NULL THEN
        RETURN;
    END IF;

    -- 2. Their job rows, and every job row naming the same objects. A row held by a save in
    --    flight (FOR KEY SHARE) is skipped, and with it the queue row.
    --    Two index lookups joined by UNION: written as `id IN (...) OR object_keys(...) && (...)`
    --    the planner could only scan the whole jobs table (2.8 s per claim at 1M jobs).
    EXECUTE format($sql$
        SELECT array_agg(l.id)
        FROM (SELECT d.job_id FROM orphan_cleanup.deletion_queue AS d WHERE d.id = ANY ($1)
              UNION
              SELECT s.id
              FROM (SELECT DISTINCT d.bucket || '/' || d.object_path AS object_key
                    FROM orphan_cleanup.deletion_queue AS d WHERE d.id = ANY ($1)) AS k
              CROSS JOIN LATERAL (SELECT j2.id FROM %1$s AS j2
                                  WHERE orphan_cleanup.object_keys(j2.output_url) && orphan_cleanup._names_of(k.object_key)
                                  OFFSET 0) AS s) AS w(id)
        -- Each lookup an index probe, whatever the statistics say: OFFSET 0 and FOR UPDATE keep
        -- these subqueries per row, where a join let the planner read the whole jobs table.
        CROSS JOIN LATERAL (SELECT j.id FROM %1$s AS j WHERE j.id = w.id FOR UPDATE SKIP LOCKED) AS l
        $sql$, att.jobs_oid::regclass)
    INTO v_locked USING v_ids;
    v_locked := coalesce(v_locked, '{}');

    -- 2b. Their objects' rows, the rows every save and job write naming the object locks too
    --    (see guard.sql). A row a save or job write holds is skipped, and with it the queue row.
    --    A kept object (cancel()) is noted: its rows are retired below.
    SELECT array_agg(l.key) FILTER (WHERE NOT l.kept), array_agg(l.key) FILTER (WHERE l.kept)
      INTO v_objs, v_kept
    FROM (SELECT o.bucket || '/' || o.object_path AS key, o.kept_at IS NOT NULL AS kept
          FROM (SELECT DISTINCT k.bucket, k.object_path FROM unnest(v_buckets, v_paths) AS k(bucket, object_path)) AS k
          CROSS JOIN LATERAL (SELECT o.* FROM orphan_cleanup.objects AS o
                              WHERE o.bucket = k.bucket AND o.object_path = k.object_path
                              FOR UPDATE SKIP LOCKED) AS o) AS l;
    --    An object with no row yet gets one, created by this claim (and so held by it). Looked
    --    for only when some object was not locked above (skipped, or without a row).
    IF coalesce(cardinality(v_objs), 0) + coalesce(cardinality(v_kept), 0) < cardinality(v_ids) THEN
        SELECT array_agg(m.bucket), array_agg(m.object_path) INTO v_new_buckets, v_new_paths
        FROM (SELECT DISTINCT k.bucket, k.object_path FROM unnest(v_buckets, v_paths) AS k(bucket, object_path)
              WHERE NOT EXISTS (SELECT 1 FROM orphan_cleanup.objects AS o
                                WHERE o.bucket = k.bucket AND o.object_path = k.object_path)) AS m;
        IF v_new_paths IS NOT NULL THEN
            v_objs := coalesce(v_objs, '{}') || orphan_cleanup._new_objects(v_new_buckets, v_new_paths);
        END IF;
    END IF;
    v_objs := coalesce(v_objs, '{}');
    v_kept := coalesce(v_kept, '{}');

    -- 3. Re-check in a new statement, so with a snapshot taken after the locks: saves that
    --    committed meanwhile are visible here. A stray (no job) is handed out only while no job
    --    names its object (a job written since is visible here, and one being written holds the
    --    object's row, so the row is busy), and only as the upload it was queued for: still in
    --    the inventory (storage.objects, or the Storage API's listing) with the same id and
    --    version, still older than stray_min_age, still allowed. Where the inventory cannot be
    --    read now, it waits. (Read only for strays.)
    --    While an extra reference is not in force, nothing is handed out (every row waits);
    --    otherwise an object one names is kept, a stray's or a job orphan's.
    v_refs_ok := orphan_cleanup._reference_problem() IS NULL;
    -- Likewise while a saved job's row may be out of sight in the jobs table's partitions (one
    -- dropped, being detached, or detached and not looked at: sql/partitions.sql), and with it
    -- the keeper of a shared object: checked in the re-check's own statement below, so with its
    -- snapshot. Strays wait for any partition problem (a new one without its TRUNCATE guard);
    -- what strays need is looked at only when the rows include one.
    v_inventory := EXISTS (SELECT 1 FROM unnest(v_ids) AS k(id)
                           JOIN orphan_cleanup.deletion_queue AS d ON d.id = k.id WHERE d.job_id IS NULL);
    IF v_inventory THEN
        v_inventory := v_refs_ok AND orphan_cleanup._inventory_problem() IS NULL
                       AND orphan_cleanup._partition_problem() IS NULL;
    END IF;
    v_stored_sql := CASE WHEN v_inventory THEN format($sql$
            LEFT JOIN LATERAL (
                SELECT o.id, o.version::text AS version, greatest(o.created_at, o.updated_at) AS created_at
                FROM %s AS o
                WHERE d.job_id IS NULL AND o.bucket_id = d.bucket AND o.name = d.object_path %s
                LIMIT 1) AS st ON true$sql$, orphan_cleanup._inventory(), orphan_cleanup._current_objects_only())
        ELSE ' CROSS JOIN (SELECT NULL::uuid AS id, NULL::text AS version, NULL::timestamptz AS created_at) AS st' END
        -- The extra reference naming a stray's object now, if any (sql/references.sql).
        || CASE WHEN v_refs_ok THEN format($sql$
            LEFT JOIN LATERAL (SELECT %s AS name) AS rf ON true$sql$,
            orphan_cleanup._referenced_by_sql($k$d.bucket || '/' || d.object_path$k$))
           ELSE ' CROSS JOIN (SELECT NULL::text AS name) AS rf' END;
    EXECUTE format($sql$
        -- Whether another job naming a row's object is not held by this claim, or keeps the
        -- object (not an orphan): looked at once per object, not once per row, so that K rows
        -- of one object (a render cache's hits) cost K probes, not K x K. A row's own job is
        -- held (or the row is 'busy' before this is looked at) and is never a keeper when this
        -- is looked at (completed, old enough, unreferenced), so it need not be left out.
        -- Whether saved jobs' rows may be out of sight (sql/partitions.sql): once per claim, in
        -- this statement's snapshot.
        WITH okp AS MATERIALIZED (SELECT orphan_cleanup._partition_gone_problem() IS NULL AS fine),
        shared AS MATERIALIZED (
            SELECT k.key, s.unlocked, s.named, s.named_by, s.keeper
            FROM (SELECT DISTINCT d.bucket || '/' || d.object_path AS key
                  FROM unnest($1::bigint[]) AS wanted(id)
                  JOIN orphan_cleanup.deletion_queue AS d ON d.id = wanted.id) AS k
            CROSS JOIN LATERAL (
                -- `= ANY ($2)`: EXECUTE folds $2 into a constant, so this is a hashed lookup;
                -- a join with unnest($2) read all the locked ids once per object.
                SELECT bool_or(NOT (j2.id = ANY ($2))) AS unlocked, bool_or(true) AS named,
                       (array_agg(j2.id) FILTER (WHERE j2.id IS NOT NULL))[1] AS named_by,
                       (array_agg(j2.id) FILTER (
                           WHERE NOT coalesce(j2.status::text = 'completed' AND j2.%3$I < $3
                                      AND NOT EXISTS (SELECT 1 FROM %2$s AS a2
                                                      WHERE orphan_cleanup.job_ref_key(a2.metadata ->> 'render_job_id') = j2.id::text
                                                      OFFSET 0), false)))[1] AS keeper
                FROM %1$s AS j2
                WHERE orphan_cleanup.object_keys(j2.output_url) && orphan_cleanup._names_of(k.key)
            ) AS s
        ),
        v AS (
            SELECT d.id,
                   CASE
                       WHEN NOT ($9 AND okp.fine) THEN 'wait'
                       WHEN d.job_id IS NULL THEN CASE
                           WHEN kp.key IS NOT NULL THEN 'cancelled'
                           WHEN ob.key IS NULL THEN 'busy'
                           WHEN s.named THEN 'stale'
                           WHEN NOT $7 THEN 'wait'
                           WHEN rf.name IS NOT NULL THEN 'stale'
                           WHEN st.id IS NULL OR st.created_at IS NULL THEN 'stale'
                           WHEN st.id IS DISTINCT FROM d.stored_id OR st.version IS DISTINCT FROM d.stored_version THEN 'stale'
                           WHEN st.created_at >= now() - $8 THEN 'wait'
                           WHEN strpos(d.object_path, '/') = 0 THEN 'rejected'
                           WHEN u.error IS NOT NULL OR u.bucket IS DISTINCT FROM d.bucket
                                OR u.object_path IS DISTINCT FROM d.object_path THEN 'rejected'
                           ELSE 'ok' END
                       WHEN j.id IS NULL THEN 'stale'
                       WHEN kp.key IS NOT NULL THEN 'cancelled'
                       WHEN lk.id IS NULL OR ob.key IS NULL THEN 'busy'
                       WHEN NOT so.same_object THEN 'stale'
                       -- Unknown (NULL) status or age keeps the object.
                       WHEN j.status::text IS DISTINCT FROM 'completed' OR j.%3$I IS NULL THEN 'stale'
                       WHEN j.%3$I >= $3 THEN 'wait'
                       WHEN r.referenced IS NOT NULL THEN 'stale'
                       WHEN u.error IS NOT NULL THEN 'rejected'
                       WHEN rf.name IS NOT NULL THEN 'stale'
                       WHEN s.unlocked THEN 'busy'
                       WHEN s.keeper IS NOT NULL THEN 'stale'
                       ELSE 'ok'
                   END AS verdict,
                   CASE
                       WHEN d.job_id IS NULL THEN CASE
                           WHEN kp.key IS NOT NULL THEN 'its object is kept (by cancel(), or because a saved job naming it was deleted)'
                           WHEN s.named THEN format('job %%s names its object now: no longer a stray', coalesce(s.named_by::text, '(with a NULL id)'))
                           WHEN rf.name IS NOT NULL THEN format('%%s names its object now (an extra reference): no longer a stray', rf.name)
                           WHEN st.id IS NULL THEN 'no longer in storage''s inventory (storage.objects, or the last listing through the Storage API): deleted by someone else'
                           WHEN st.created_at IS NULL THEN 'storage''s inventory gives no created_at for it'
                           WHEN st.id IS DISTINCT FROM d.stored_id OR st.version IS DISTINCT FROM d.stored_version
                               THEN 'uploaded again since it was queued: storage''s inventory holds another upload of that name'
                           WHEN strpos(d.object_path, '/') = 0 THEN 'at the bucket''s root: a job may name it by its bare file name, which no reading takes as an object'
                           ELSE coalesce(u.error, 'the allow-lists no longer name it as it is stored') END
                       WHEN j.id IS NULL THEN 'the job row no longer exists'
                       WHEN kp.key IS NOT NULL THEN 'its object is kept (by cancel(), or because a saved job naming it was deleted)'
                       WHEN NOT so.same_object THEN 'the job''s output_url names another object now'
                       WHEN j.status::text IS DISTINCT FROM 'completed' THEN format('the job''s status is now %%s', coalesce(j.status::text, 'NULL'))
                       WHEN j.%3$I IS NULL THEN format('the job''s %%s is NULL', %4$L)
                       WHEN r.referenced IS NOT NULL THEN 'the job is referenced by an asset'
                       WHEN u.error IS NOT NULL THEN u.error
                       WHEN rf.name IS NOT NULL THEN format('%%s names its object (an extra reference): kept', rf.name)
                       WHEN s.keeper IS NOT NULL THEN format('shares its object with job %%s, which is not an orphan', s.keeper)
                   END AS reason,
                   CASE WHEN NOT ($9 AND okp.fine) THEN now() + interval '10 minutes'
                        WHEN d.job_id IS NULL
                        THEN CASE WHEN $7 THEN st.created_at + $8 ELSE now() + interval '10 minutes' END
                        ELSE j.%3$I + $4 END AS wait_until
            -- Arrays joined as sets: `= ANY ($n)` on a parameter is a linear search per row.
            FROM unnest($1::bigint[]) AS wanted(id)
            CROSS JOIN okp
            JOIN orphan_cleanup.deletion_queue AS d ON d.id = wanted.id
            LEFT JOIN %1$s AS j ON j.id = d.job_id
            LEFT JOIN unnest($2::uuid[]) AS lk(id) ON lk.id = j.id
            LEFT JOIN unnest($5::text[]) AS ob(key) ON ob.key = d.bucket || '/' || d.object_path
            LEFT JOIN unnest($6::text[]) AS kp(key) ON kp.key = d.bucket || '/' || d.object_path
            -- Objects, not URL text: a refreshed signed-URL token names the same object. The URL
            -- is parsed only when its text changed (the CASE keeps that order).
            CROSS JOIN LATERAL (
                SELECT CASE WHEN md5(j.output_url) = d.url_hash THEN true
                            ELSE coalesce(orphan_cleanup.object_key(j.output_url) = d.bucket || '/' || d.object_path, false)
                       END AS same_object
            ) AS so
            -- Once per row, as an index probe (LIMIT keeps the planner from hashing the whole
            -- assets table instead, 2 s per claim when the queue had no statistics yet): the
            -- verdict and its reason both need it.
            LEFT JOIN LATERAL (
                SELECT true AS referenced
                FROM %2$s AS a
                WHERE orphan_cleanup.job_ref_key(a.metadata ->> 'render_job_id') = j.id::text
                LIMIT 1
            ) AS r ON true
            LEFT JOIN LATERAL orphan_cleanup.check_output_url(
                CASE WHEN d.job_id IS NULL THEN d.output_url ELSE j.output_url END) AS u ON true
            LEFT JOIN shared AS s ON s.key = d.bucket || '/' || d.object_path
            %5$s
        )
        SELECT array_agg(v.id) FILTER (WHERE v.verdict = 'ok'),
               array_agg(v.id) FILTER (WHERE v.verdict IN ('stale', 'rejected', 'cancelled')),
               array_agg(v.verdict) FILTER (WHERE v.verdict IN ('stale', 'rejected', 'cancelled')),
               array_agg(v.reason) FILTER (WHERE v.verdict IN ('stale', 'rejected', 'cancelled')),
               array_agg(v.id) FILTER (WHERE v.verdict = 'wait'),
               array_agg(v.wait_until) FILTER (WHERE v.verdict = 'wait'),
               array_agg(v.id) FILTER (WHERE v.verdict = 'busy')
        FROM v
        $sql$, att.jobs_oid::regclass, att.assets_oid::regclass, att.age_column, att.age_column, v_stored_sql)
    INTO v_ok, v_bad, v_bad_state, v_bad_reason, v_wait, v_wait_until, v_busy
    USING v_ids, v_locked, now() - make_interval(secs => cfg.min_age_s), make_interval(secs => cfg.min_age_s), v_objs, v_kept,
          v_inventory, make_interval(secs => cfg.stray_min_age_s), v_refs_ok;

    IF v_bad IS NOT NULL THEN
        WITH b AS (SELECT * FROM unnest(v_bad, v_bad_state, v_bad_reason) AS b(id, state, reason)),
        moved AS (
            UPDATE orphan_cleanup.deletion_queue AS d
               SET state = b.state, reason = b.reason, finished_at = now(), updated_at = now()
              FROM b WHERE d.id = b.id
            RETURNING d.id, d.job_id, d.output_url, d.state, d.reason, d.claim_count)
        INSERT INTO orphan_cleanup.audit_log (action, job_id, queue_id, output_url, actor, detail)
        SELECT CASE WHEN m.state = 'rejected' THEN 'rejected' ELSE 'cancelled' END,
               m.job_id, m.id, m.output_url, worker,
               CASE WHEN m.claim_count > 0
                    THEN 'retired at claim without a confirmed deletion, after it had been handed out (the object may be deleted; no job naming it can be saved): '
                    ELSE 'at claim: ' END || m.reason
        FROM moved AS m;
    END IF;
    IF v_wait IS NOT NULL THEN
        UPDATE orphan_cleanup.deletion_queue AS d
           SET available_at = w.until, updated_at = now()
          FROM unnest(v_wait, v_wait_until) AS w(id, until)
         WHERE d.id = w.id;
    END IF;
    -- Busy rows (a job or object held by a save or job write in flight) are passed over by the
    -- next claims for a few seconds: left at the head, max_rows of them (K rows of one object
    -- whose job an app transaction holds) made every claim hand out nothing while the rest of
    -- the queue waited. Noted beside the queue, never on the row itself: the save in flight
    -- locks that row, and at REPEATABLE READ a write to it by the claim made the save fail.
    IF v_busy IS NOT NULL THEN
        INSERT INTO orphan_cleanup.busy (queue_id, until)
        SELECT b.id, now() + interval '5 seconds' FROM unnest(v_busy) AS b(id)
        ON CONFLICT (queue_id) DO UPDATE SET until = EXCLUDED.until;
    END IF;
    IF v_ok IS NULL THEN
        RETURN;
    END IF;

    RETURN QUERY
    WITH claimed AS (
        UPDATE orphan_cleanup.deletion_queue AS d
           SET state = 'claimed', claim_count = d.claim_count + 1, claimed_by = worker,
               claimed_at = now(), lease_until = now() + lease, lease_hash = v_lease,
               updated_at = now()
         WHERE d.id = ANY (v_ok)
        RETURNING d.id, d.job_id, d.host, d.bucket, d.object_path, d.attempts, d.output_url
    ),
    audited AS (
        INSERT INTO orphan_cleanup.audit_log (action, job_id, queue_id, output_url, actor, detail)
        SELECT 'claimed', c.job_id, c.id, c.output_url, worker, format('lease %s', lease) FROM claimed AS c
    )
    SELECT c.id, c.job_id, c.host, c.bucket, c.object_path, c.attempts, v_token FROM claimed AS c ORDER BY c.id;
    GET DIAGNOSTICS v_n = ROW_COUNT;
    -- The hand-out, recorded on the objects in this transaction: from its commit on, no job
    -- naming them can be saved. (A row per object, probed by its key: the arrays keep the
    -- planner's estimate small, so it never reads the whole table.)
    UPDATE orphan_cleanup.objects AS o
       SET handouts = o.handouts + t.n, first_handed_out_at = coalesce(o.first_handed_out_at, now()),
           last_handed_out_at = now(), last_handed_to = worker, last_queue_id = t.last_id, touched_at = now(),
           forget_at = now() + interval '30 days'
      FROM (SELECT d.bucket, d.object_path, count(*) AS n, max(d.id) AS last_id
            FROM unnest(v_ok) AS k(id)
            JOIN orphan_cleanup.deletion_queue AS d ON d.id = k.id
            GROUP BY 1, 2) AS t
     WHERE o.bucket = t.bucket AND o.object_path = t.object_path;
    IF orphan_cleanup._lock_reaper_row(worker) THEN
        UPDATE orphan_cleanup.reapers AS r SET claimed = r.claimed + v_n WHERE r.reaper = worker;
    END IF;
    PERFORM orphan_cleanup._pause_point('claim');
END
$$;

CREATE FUNCTION orphan_cleanup.verifies_absence() RETURNS boolean
LANGUAGE plpgsql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    RETURN pg_catalog.to_regclass('storage.objects') IS NOT NULL
       AND pg_catalog.has_table_privilege('storage.objects', 'SELECT')
       AND NOT pg_catalog.row_security_active('storage.objects');
END
$$;

CREATE FUNCTION orphan_cleanup._still_stored(ids bigint[]) RETURNS bigint[]
LANGUAGE plpgsql STABLE SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_ids bigint[];
BEGIN
    IF NOT orphan_cleanup.verifies_absence() OR coalesce(cardinality(ids), 0) = 0 THEN
        RETURN '{}';
    END IF;
    EXECUTE format($sql$
        SELECT array_agg(d.id) FROM orphan_cleanup.deletion_queue AS d
        WHERE d.id = ANY ($1)
          AND EXISTS (SELECT 1 FROM storage.objects AS o
                      WHERE o.bucket_id = d.bucket AND o.name = d.object_path %s)
        $sql$, orphan_cleanup._current_objects_only())
    INTO v_ids USING ids;
    RETURN coalesce(v_ids, '{}');
END
$$;

CREATE FUNCTION orphan_cleanup.sent_by_reaper(worker text, within interval)
RETURNS TABLE (age_s double precision, objects bigint)
LANGUAGE sql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp
BEGIN ATOMIC
    WITH mine AS (
        SELECT a.at, a.action, a.queue_id, a.detail
        FROM orphan_cleanup.audit_log AS a
        WHERE a.at > now() - within AND a.action IN ('claimed', 'released') AND a.actor = worker
    ),
    claims AS (
        SELECT m.at, m.queue_id,
               lead(m.at) OVER (PARTITION BY m.queue_id ORDER BY m.at) AS next_claim
        FROM mine AS m WHERE m.action = 'claimed'
    )
    SELECT extract(epoch FROM now() - max(c.at))::double precision, count(*)
    FROM claims AS c
    WHERE NOT EXISTS (
        SELECT 1 FROM mine AS b
        WHERE b.action = 'released' AND b.queue_id = c.queue_id
          AND b.at >= c.at AND (c.next_claim IS NULL OR b.at < c.next_claim)
          AND (b.detail LIKE '%(nothing was sent)' OR b.detail LIKE 'refused by the reaper''s own allow-list%'))
    GROUP BY date_trunc('second', c.at)
    ORDER BY 1 DESC;
END;

CREATE FUNCTION orphan_cleanup.confirm(worker text, lease_token text, ids bigint[], outcome text,
                                       sizes bigint[] DEFAULT NULL)
RETURNS TABLE (id bigint, result text)
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp SET jit = off
AS $$
DECLARE
    v_lease bytea;
    v_done bigint[];
    v_stored bigint[];
BEGIN
    PERFORM orphan_cleanup._check_worker(worker);
    v_lease := orphan_cleanup._lease_hash(lease_token);
    IF outcome IS NULL OR outcome NOT IN ('deleted', 'absent') THEN
        RAISE EXCEPTION 'outcome must be ''deleted'' or ''absent'', got %', coalesce(quote_literal(outcome), 'NULL')
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF ids IS NULL THEN
        RAISE EXCEPTION 'ids must not be NULL' USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF cardinality(sizes) <> cardinality(ids) OR 0 > ANY (sizes) THEN
        RAISE EXCEPTION 'sizes must hold one size in bytes per id (NULL where unknown), got % for % ids', sizes, cardinality(ids)
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    v_stored := orphan_cleanup._still_stored(ids);
    WITH mine AS (
        UPDATE orphan_cleanup.deletion_queue AS d
           SET state = outcome, finished_at = now(), updated_at = now(), lease_until = NULL, lease_hash = NULL,
               job_cleanup = CASE WHEN d.job_id IS NULL THEN 'nothing to do: a stray has no job row' ELSE 'pending' END,
               -- The savings ledger: what this deletion reclaimed, as storage's answer said.
               bytes = CASE WHEN outcome = 'deleted' THEN sizes[array_position(ids, d.id)] END
         WHERE d.id = ANY (ids) AND d.state = 'claimed' AND d.claimed_by = worker AND d.lease_hash = v_lease
           AND d.id <> ALL (v_stored)
        RETURNING d.id, d.job_id, d.output_url, d.bucket, d.object_path
    ),
    audited AS (
        INSERT INTO orphan_cleanup.audit_log (action, job_id, queue_id, output_url, actor)
        SELECT outcome, m.job_id, m.id, m.output_url, worker FROM mine AS m
    ),
    -- The Storage API's listing (sql/inventory.sql) forgets the objects gone, as the storage
    -- server deletes their storage.objects rows: else a gone object would look like a stray.
    forgotten AS (
        DELETE FROM orphan_cleanup.object_inventory AS i USING mine AS m
        WHERE i.bucket_id = m.bucket AND i.name = m.object_path
    )
    SELECT array_agg(m.id) INTO v_done FROM mine AS m;
    v_done := coalesce(v_done, '{}');
    PERFORM orphan_cleanup._cleanup_jobs(v_done, (SELECT on_confirm FROM orphan_cleanup._config()), worker);
    RETURN QUERY
    SELECT i.id,
           CASE WHEN i.id = ANY (v_done) THEN 'confirmed'
                WHEN i.id = ANY (v_stored) AND d.state = 'claimed' AND d.claimed_by = worker AND d.lease_hash = v_lease
                THEN format('not confirmed: still in storage.objects (%s/%s): storage answered %s without deleting it',
                            d.bucket, d.object_path,
                            CASE outcome WHEN 'deleted' THEN 'that it deleted it' ELSE 'that it was already absent' END)
                ELSE 'not confirmed: ' || orphan_cleanup._not_held(d, worker, v_lease)
           END
    FROM unnest(ids) WITH ORDINALITY AS i(id, n)
    LEFT JOIN orphan_cleanup.deletion_queue AS d ON d.id = i.id
    ORDER BY i.n;
END
$$;

CREATE FUNCTION orphan_cleanup.fail(worker text, lease_token text, ids bigint[], error text, retryable boolean)
RETURNS TABLE (id bigint, result text)
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp SET jit = off
AS $$
DECLARE
    v_max integer := (SELECT max_attempts FROM orphan_cleanup._config());
    v_backoff_s integer := (SELECT retry_backoff_s FROM orphan_cleanup._config());
    v_lease bytea;
    v_moved bigint[];
BEGIN
    PERFORM orphan_cleanup._check_worker(worker);
    v_lease := orphan_cleanup._lease_hash(lease_token);
    IF ids IS NULL THEN
        RAISE EXCEPTION 'ids must not be NULL' USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF error IS NULL OR btrim(error) = '' THEN
        RAISE EXCEPTION 'error must say what went wrong' USING ERRCODE = 'invalid_parameter_value';
    END IF;
    WITH moved AS (
        UPDATE orphan_cleanup.deletion_queue AS d
           SET attempts = d.attempts + 1,
               state = CASE WHEN NOT coalesce(retryable, true) OR d.attempts + 1 >= v_max THEN 'dead' ELSE 'pending' END,
               available_at = now() + orphan_cleanup._backoff(d.attempts + 1, v_backoff_s),
               last_error = left(orphan_cleanup.redact_url(error), 2000),
               lease_until = NULL, lease_hash = NULL,
               finished_at = CASE WHEN NOT coalesce(retryable, true) OR d.attempts + 1 >= v_max THEN now() END,
               updated_at = now()
         WHERE d.id = ANY (ids) AND d.state = 'claimed' AND d.claimed_by = worker AND d.lease_hash = v_lease
        RETURNING d.id, d.job_id, d.output_url, d.state, d.attempts, d.last_error
    ),
    audited AS (
        INSERT INTO orphan_cleanup.audit_log (action, job_id, queue_id, output_url, actor, detail)
        SELECT 'failed', m.job_id, m.id, m.output_url, worker,
               format('%s (attempt %s%s)', m.last_error, m.attempts, CASE WHEN NOT coalesce(retryable, true) THEN ', not retryable' ELSE '' END)
        FROM moved AS m
        UNION ALL
        SELECT 'dead_lettered', m.job_id, m.id, m.output_url, worker,
               CASE WHEN NOT coalesce(retryable, true) THEN 'not retryable: ' ELSE format('out of attempts (%s): ', m.attempts) END || m.last_error
        FROM moved AS m WHERE m.state = 'dead'
    )
    SELECT array_agg(m.id) INTO v_moved FROM moved AS m;
    v_moved := coalesce(v_moved, '{}');
    RETURN QUERY
    SELECT i.id,
           CASE WHEN i.id = ANY (v_moved) AND d.state = 'dead' THEN 'dead-lettered'
                WHEN i.id = ANY (v_moved) THEN format('retry after %s', to_char(d.available_at, 'YYYY-MM-DD HH24:MI:SS TZ'))
                ELSE 'not failed: ' || orphan_cleanup._not_held(d, worker, v_lease) END
    FROM unnest(ids) WITH ORDINALITY AS i(id, n)
    LEFT JOIN orphan_cleanup.deletion_queue AS d ON d.id = i.id
    ORDER BY i.n;
END
$$;

CREATE FUNCTION orphan_cleanup.release(worker text, lease_token text, ids bigint[], reason text,
                                       nothing_sent boolean DEFAULT false) RETURNS bigint
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp SET jit = off
AS $$
DECLARE
    v_lease bytea;
    v_back bigint[];
BEGIN
    PERFORM orphan_cleanup._check_worker(worker);
    v_lease := orphan_cleanup._lease_hash(lease_token);
    IF nothing_sent IS NULL THEN
        RAISE EXCEPTION 'nothing_sent must be true or false' USING ERRCODE = 'invalid_parameter_value';
    END IF;
    WITH released AS (
        UPDATE orphan_cleanup.deletion_queue AS d
           SET state = 'pending', lease_until = NULL, lease_hash = NULL, available_at = now(), updated_at = now()
         WHERE d.state = 'claimed' AND d.claimed_by = worker AND d.lease_hash = v_lease
           AND (ids IS NULL OR d.id = ANY (ids))
        RETURNING d.id, d.job_id, d.output_url
    ),
    audited AS (
        INSERT INTO orphan_cleanup.audit_log (action, job_id, queue_id, output_url, actor, detail)
        SELECT 'released', r.job_id, r.id, r.output_url, worker,
               CASE WHEN nothing_sent THEN coalesce(left(orphan_cleanup.redact_url(reason), 2000) || ' ', '') || '(nothing was sent)'
                    -- A reason (upstream text among it) never passes for the nothing-sent mark.
                    ELSE replace(left(orphan_cleanup.redact_url(reason), 2000), '(nothing was sent)', '(nothing was sent?)') END
        FROM released AS r
    )
    SELECT array_agg(r.id) INTO v_back FROM released AS r;
    IF nothing_sent AND v_back IS NOT NULL THEN
        PERFORM orphan_cleanup._unsent(v_back, worker);
    END IF;
    RETURN coalesce(cardinality(v_back), 0);
END
$$;

CREATE FUNCTION orphan_cleanup.refuse(worker text, lease_token text, ids bigint[], reason text)
RETURNS TABLE (id bigint, result text)
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp SET jit = off
AS $$
DECLARE
    v_back bigint[];
    v_reason text;
    v_lease bytea;
BEGIN
    PERFORM orphan_cleanup._check_worker(worker);
    v_lease := orphan_cleanup._lease_hash(lease_token);
    IF ids IS NULL THEN
        RAISE EXCEPTION 'ids must not be NULL' USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF reason IS NULL OR btrim(reason) = '' THEN
        RAISE EXCEPTION 'reason must say why the reaper refuses the rows' USING ERRCODE = 'invalid_parameter_value';
    END IF;
    v_reason := left(orphan_cleanup.redact_url(reason), 2000);
    WITH back AS (
        UPDATE orphan_cleanup.deletion_queue AS d
           SET state = 'pending', lease_until = NULL, lease_hash = NULL, available_at = now(), updated_at = now()
         WHERE d.id = ANY (ids) AND d.state = 'claimed' AND d.claimed_by = worker AND d.lease_hash = v_lease
        RETURNING d.id, d.job_id, d.output_url
    ),
    noted AS (
        INSERT INTO orphan_cleanup.refusals AS f (queue_id, refused_by, reason)
        SELECT b.id, worker, v_reason FROM back AS b
        ON CONFLICT (queue_id, refused_by) DO UPDATE SET reason = EXCLUDED.reason, at = now()
    ),
    audited AS (
        INSERT INTO orphan_cleanup.audit_log (action, job_id, queue_id, output_url, actor, detail)
        SELECT 'released', b.job_id, b.id, b.output_url, worker,
               'refused by the reaper''s own allow-list, given back for another reaper: ' || v_reason
        FROM back AS b
    )
    SELECT array_agg(b.id) INTO v_back FROM back AS b;
    v_back := coalesce(v_back, '{}');
    -- Refused rows never reach storage: as good as never handed out.
    IF cardinality(v_back) > 0 THEN
        PERFORM orphan_cleanup._unsent(v_back, worker);
    END IF;
    RETURN QUERY
    SELECT i.id,
           CASE WHEN i.id = ANY (v_back) THEN 'given back'
                ELSE 'not given back: ' || orphan_cleanup._not_held(d, worker, v_lease) END
    FROM unnest(ids) WITH ORDINALITY AS i(id, n)
    LEFT JOIN orphan_cleanup.deletion_queue AS d ON d.id = i.id
    ORDER BY i.n;
END
$$;

-- health() and queue_status() report the reapers; queue_status() returns more columns.

CREATE TYPE orphan_cleanup.reaper_coverage AS (
    active            integer,   -- reapers that claimed in the last 15 minutes
    unserved          bigint,    -- ready rows none of them serves, or every one that could refused
    unserved_what     text,      -- which buckets and hosts
    refused_last_hour bigint,    -- rows reapers gave back with refuse()
    misconfigured     text       -- the reapers to blame, by name, and why
);

CREATE FUNCTION orphan_cleanup._reaper_coverage() RETURNS orphan_cleanup.reaper_coverage
LANGUAGE plpgsql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp SET jit = off
AS $$
DECLARE
    v_any_host boolean := orphan_cleanup._no_entries((SELECT c.allowed_hosts FROM orphan_cleanup._config() AS c));
    v_homes text;
    v_active orphan_cleanup.reapers[];
    by_refusals record;
    c orphan_cleanup.reaper_coverage;
BEGIN
    SELECT coalesce(array_agg(r), '{}') INTO v_active
    FROM orphan_cleanup.reapers AS r WHERE r.last_claim_at > now() - interval '15 minutes';
    c.active := cardinality(v_active);
    c.unserved := 0;
    IF c.active > 0 THEN
        -- By the lists: one pass over the ready rows, grouped by bucket and host.
        SELECT coalesce(sum(g.n), 0), string_agg(format('%s @ %s', g.bucket, coalesce(g.host, '(no host)')), ', ' ORDER BY g.bucket, g.host)
          INTO c.unserved, c.unserved_what
        FROM (SELECT q.bucket, q.host, count(*) AS n
              FROM orphan_cleanup.deletion_queue AS q
              WHERE q.state = 'pending' AND q.available_at <= now()
              GROUP BY q.bucket, q.host) AS g
        WHERE NOT EXISTS (SELECT 1 FROM unnest(v_active) AS a
                          WHERE orphan_cleanup._serves(a.buckets, a.hosts, orphan_cleanup._home_ok(a.hosts, a.home), g.bucket, g.host));
        -- By refusals: rows some active reaper serves, but every one that does refused.
        SELECT count(DISTINCT q.id) AS n, string_agg(DISTINCT format('%s @ %s', q.bucket, coalesce(q.host, '(no host)')), ', ') AS what
          INTO by_refusals
        FROM orphan_cleanup.refusals AS f
        JOIN orphan_cleanup.deletion_queue AS q ON q.id = f.queue_id
        WHERE q.state = 'pending' AND q.available_at <= now()
          AND EXISTS (SELECT 1 FROM unnest(v_active) AS a
                      WHERE orphan_cleanup._serves(a.buckets, a.hosts, orphan_cleanup._home_ok(a.hosts, a.home), q.bucket, q.host))
          AND NOT EXISTS (SELECT 1 FROM unnest(v_active) AS a
                          WHERE orphan_cleanup._serves(a.buckets, a.hosts, orphan_cleanup._home_ok(a.hosts, a.home), q.bucket, q.host)
                            AND NOT EXISTS (SELECT 1 FROM orphan_cleanup.refusals AS f2
                                            WHERE f2.queue_id = q.id AND f2.refused_by = a.reaper));
        IF by_refusals.n > 0 THEN
            c.unserved := c.unserved + by_refusals.n;
            c.unserved_what := concat_ws(', ', c.unserved_what, by_refusals.what || ' (refused by every reaper that serves it)');
        END IF;
        IF v_any_host THEN
            SELECT string_agg(format('%s at %s', a.reaper, a.home), ', ' ORDER BY a.reaper) INTO v_homes
            FROM unnest(v_active) AS a
            WHERE a.home IS NOT NULL
            HAVING count(DISTINCT a.home) > 1;
        END IF;
    END IF;
    SELECT count(*) INTO c.refused_last_hour FROM orphan_cleanup.refusals AS f WHERE f.at > now() - interval '1 hour';
    SELECT string_agg(format('reaper %s (buckets %s; hosts %s) %s', x.reaper,
                             coalesce(array_to_string(r.buckets, ','), 'any'), coalesce(array_to_string(r.hosts, ','), 'any'),
                             concat_ws(' and ',
                                 CASE WHEN NOT orphan_cleanup._home_ok(r.hosts, r.home)
                                      THEN format('is another project''s: its own host %s is not one of orphan_cleanup.allowed_hosts, so it is handed nothing', coalesce(r.home, '(unsaid)')) END,
                                 CASE WHEN r.hosts IS NULL AND NOT v_any_host
                                      THEN 'says nothing of the hosts it serves (a reaper older than 0.2.0), so it is handed rows of every host: upgrade it' END,
                                 CASE WHEN r.passed_over_at > now() - interval '15 minutes' AND orphan_cleanup._home_ok(r.hosts, r.home)
                                      THEN format('left ready rows it does not serve (%s) to other reapers', r.passed_over_what) END,
                                 CASE WHEN f.n IS NOT NULL
                                      THEN format('refused %s rows it was handed (%s)', f.n, f.reason) END)),
                      '; ' ORDER BY x.reaper)
      INTO c.misconfigured
    FROM (SELECT r.reaper FROM orphan_cleanup.reapers AS r WHERE r.passed_over_at > now() - interval '15 minutes'
          UNION
          SELECT a.reaper FROM unnest(v_active) AS a
          WHERE NOT orphan_cleanup._home_ok(a.hosts, a.home) OR (a.hosts IS NULL AND NOT v_any_host)
          UNION
          SELECT f.refused_by FROM orphan_cleanup.refusals AS f WHERE f.at > now() - interval '1 hour') AS x
    LEFT JOIN orphan_cleanup.reapers AS r ON r.reaper = x.reaper
    LEFT JOIN (SELECT f.refused_by, count(*) AS n, (array_agg(f.reason ORDER BY f.at DESC))[1] AS reason
               FROM orphan_cleanup.refusals AS f WHERE f.at > now() - interval '1 hour'
               GROUP BY f.refused_by) AS f ON f.refused_by = x.reaper;
    IF v_homes IS NOT NULL THEN
        c.misconfigured := concat_ws('; ', c.misconfigured,
            format('reapers of different projects claim from this queue (%s), and with orphan_cleanup.allowed_hosts empty the database cannot tell which one serves its bare bucket/key rows: set allowed_hosts to this project''s host', v_homes));
    END IF;
    RETURN c;
END
$$;

CREATE FUNCTION orphan_cleanup._cron_jobs() RETURNS text
LANGUAGE plpgsql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    jobs text;
BEGIN
    IF pg_catalog.to_regclass('cron.job') IS NULL THEN
        RETURN NULL;
    END IF;
    EXECUTE $q$SELECT string_agg(format('pg_cron job %s (%s, schedule %L, as %s)', j.jobid, j.jobname, j.schedule, j.username), '; ' ORDER BY j.jobid)
               FROM cron.job AS j
               WHERE j.active AND j.database = pg_catalog.current_database() AND j.command ILIKE '%orphan_cleanup.run_cycle%'$q$
        INTO jobs;
    RETURN jobs;
EXCEPTION WHEN insufficient_privilege THEN
    RETURN NULL;
END
$$;

CREATE FUNCTION orphan_cleanup._health(cov orphan_cleanup.reaper_coverage)
RETURNS TABLE (check_name text, status text, detail text)
LANGUAGE plpgsql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp SET jit = off
AS $$
DECLARE
    cfg record;
    att orphan_cleanup.attachment;
    drift text;
    guard_problem text;
    last orphan_cleanup.cycle_log;
    last_ok timestamptz;
    v_interval interval;
    v_preloaded boolean;
    v_workers integer;
    v_cron text;
    v_actor text;
    v_actor_at timestamptz;
    v_late boolean;
    n bigint;
    ix record;
    v_ready_since timestamptz;
    v_analyze text;
    v_inventory text;
    v_stray_wait text;
    v_parts_gone text;
BEGIN
    SELECT * INTO cfg FROM orphan_cleanup._config();
    v_interval := make_interval(secs => cfg.interval_s);

    check_name := 'attached';
    SELECT * INTO att FROM orphan_cleanup.attachment;
    IF att.jobs_oid IS NULL THEN
        status := 'critical'; detail := 'not attached: run SELECT * FROM orphan_cleanup.attach();';
    ELSE
        drift := orphan_cleanup._drift(att);
        IF drift IS NULL THEN
            status := 'ok'; detail := format('jobs %s, assets %s, age column %s', att.jobs_table, att.assets_table, att.age_column);
        ELSE
            status := 'critical'; detail := drift || '; cycles and claims are stopped until attach() runs again';
        END IF;
    END IF;
    RETURN NEXT;

    check_name := 'save guard';
    IF att.jobs_oid IS NOT NULL THEN
        guard_problem := orphan_cleanup._guard_problem(att);
    END IF;
    IF att.jobs_oid IS NULL THEN
        status := 'critical'; detail := 'not installed (not attached)';
    ELSIF guard_problem IS NOT NULL THEN
        status := 'critical'; detail := guard_problem || ': claims are refused; run SELECT * FROM orphan_cleanup.attach(); to reinstall the guards';
    ELSE
        status := 'ok'; detail := 'triggers orphan_cleanup_save_guard, orphan_cleanup_job_guard and orphan_cleanup_truncate_guard present and enabled ALWAYS';
    END IF;
    RETURN NEXT;

    -- The DDL watch (an event trigger): part of the extension; the managed edition has it only
    -- where the installing role could create it, and says what that leaves to the DBA.
    check_name := 'DDL watch';
    IF EXISTS (SELECT FROM pg_catalog.pg_event_trigger AS e
               WHERE e.evtname = 'orphan_cleanup_guard_watch' AND e.evtenabled = 'A') THEN
        status := 'ok'; detail := 'event trigger orphan_cleanup_guard_watch refuses DDL that would leave the save guard off while rows are claimed';
    ELSIF pg_catalog.to_regprocedure('orphan_cleanup.managed_version()') IS NOT NULL
          AND NOT EXISTS (SELECT FROM pg_catalog.pg_event_trigger AS e WHERE e.evtname = 'orphan_cleanup_guard_watch') THEN
        status := 'ok'; detail := 'not installed (an event trigger needs a superuser here): before ALTER TABLE ... DISABLE TRIGGER, DROP TRIGGER or pg_restore --disable-triggers on the attached tables, turn reaping_enabled off and wait until no rows are claimed';
    ELSE
        status := 'warning'; detail := 'event trigger orphan_cleanup_guard_watch is missing or not enabled ALWAYS: DDL that switches the save guard off while rows are claimed is not refused; reinstall, or ALTER EVENT TRIGGER orphan_cleanup_guard_watch ENABLE ALWAYS';
    END IF;
    RETURN NEXT;

    check_name := 'allowed buckets';
    IF orphan_cleanup._no_entries(cfg.allowed_buckets) THEN
        status := 'critical'; detail := 'orphan_cleanup.allowed_buckets is empty: nothing may be deleted and cycles refuse to run';
    ELSE
        status := 'ok'; detail := format('buckets %s; prefixes %s; hosts %s', cfg.allowed_buckets,
                                         coalesce(nullif(cfg.allowed_prefixes, ''), '(whole buckets)'),
                                         coalesce(nullif(cfg.allowed_hosts, ''), '(none: bare bucket/path values only)'));
    END IF;
    RETURN NEXT;

    -- Which scheduler runs the cycles, and whether it is late: the background worker, a pg_cron
    -- job, or whoever ran the recent cycles (a reaper's --cycle-every, the DBA's own cron).
    check_name := 'scheduler';
    -- orphan_cleanup.database exists only where the library was preloaded (reading
    -- shared_preload_libraries itself needs pg_read_all_settings, which a managed platform's
    -- owner may lack).
    v_preloaded := EXISTS (SELECT FROM pg_catalog.pg_settings WHERE name = 'orphan_cleanup.database');
    SELECT count(*) INTO v_workers FROM pg_catalog.pg_stat_activity WHERE backend_type = 'pg_orphan_cleanup';
    v_cron := orphan_cleanup._cron_jobs();
    SELECT l.actor, l.started_at INTO v_actor, v_actor_at
    FROM orphan_cleanup.cycle_log AS l WHERE l.status IN ('ok', 'dry_run') ORDER BY l.id DESC LIMIT 1;
    v_late := v_actor_at IS NOT NULL AND v_actor_at < now() - 2 * v_interval - interval '1 minute';
    IF v_preloaded AND v_workers = 0 THEN
        status := 'critical'; detail := 'preloaded, but no pg_orphan_cleanup worker is running; see the server log';
    ELSIF NOT cfg.enabled THEN
        status := 'warning'; detail := 'orphan_cleanup.enabled = off: cycles are paused';
    ELSIF v_preloaded THEN
        status := 'ok'; detail := format('the background worker, in database %s, every %s', cfg.database, v_interval);
    ELSIF v_cron IS NOT NULL THEN
        status := CASE WHEN v_late THEN 'warning' ELSE 'ok' END;
        detail := v_cron || CASE WHEN v_late THEN format('; late: the last successful cycle started at %s, interval is %s (see cron.job_run_details)',
                                                        to_char(v_actor_at, 'YYYY-MM-DD HH24:MI:SS TZ'), v_interval) ELSE '' END;
    ELSIF v_actor_at IS NOT NULL AND NOT v_late THEN
        status := 'ok';
        detail := format('cycles run by %s (a reaper''s --cycle-every, or a scheduler of your own), the last at %s; interval is %s',
                         v_actor, to_char(v_actor_at, 'YYYY-MM-DD HH24:MI:SS TZ'), v_interval);
    ELSE
        status := 'warning';
        detail := format('no scheduler found: no background worker, no pg_cron job calling orphan_cleanup.run_cycle() here, and %s; '
                         'schedule one: SELECT cron.schedule(''orphan-cleanup'', ''*/5 * * * *'', ''SELECT orphan_cleanup.run_cycle()''); '
                         'or run the reaper with --cycle-every %s',
                         CASE WHEN v_actor_at IS NULL THEN 'no cycle has run yet'
                              ELSE format('the last successful cycle (by %s) started at %s, more than twice the interval (%s) ago',
                                          v_actor, to_char(v_actor_at, 'YYYY-MM-DD HH24:MI:SS TZ'), v_interval) END,
                         v_interval);
    END IF;
    RETURN NEXT;

    check_name := 'last cycle';
    SELECT * INTO last FROM orphan_cleanup.cycle_log AS l WHERE l.status <> 'skipped' ORDER BY l.id DESC LIMIT 1;
    SELECT max(l.started_at) INTO last_ok FROM orphan_cleanup.cycle_log AS l WHERE l.status IN ('ok', 'dry_run');
    IF last.id IS NULL THEN
        status := 'warning'; detail := 'no cycle has run yet';
    ELSIF last.status = 'failed' THEN
        status := 'critical'; detail := format('cycle %s failed at %s: %s', last.id, to_char(last.started_at, 'YYYY-MM-DD HH24:MI:SS TZ'), last.error);
    ELSIF last.status = 'running' AND last.started_at < now() - v_interval THEN
        status := 'warning'; detail := format('cycle %s has been running since %s', last.id, last.started_at);
    ELSIF (v_preloaded AND cfg.enabled OR NOT v_preloaded) AND last_ok < now() - 2 * v_interval - interval '1 minute' THEN
        status := CASE WHEN last_ok < now() - 4 * v_interval THEN 'critical' ELSE 'warning' END;
        detail := format('overdue: the last successful cycle started at %s, interval is %s', to_char(last_ok, 'YYYY-MM-DD HH24:MI:SS TZ'), v_interval);
    ELSE
        status := 'ok';
        detail := format('cycle %s (%s) at %s: %s found, %s enqueued', last.id, last.status,
                         to_char(last.started_at, 'YYYY-MM-DD HH24:MI:SS TZ'), last.found, last.enqueued);
    END IF;
    RETURN NEXT;

    check_name := 'circuit breaker';
    SELECT st.breaker_tripped_at, st.breaker_detail INTO ix FROM orphan_cleanup.detector_state AS st;
    IF ix.breaker_tripped_at IS NOT NULL THEN
        status := 'critical';
        detail := format('tripped at %s, cycles are stopped: %s. Look with preview() and validation_report(), then SELECT orphan_cleanup.reset_breaker(''why''); or raise the orphan_cleanup.breaker_* limits',
                         to_char(ix.breaker_tripped_at, 'YYYY-MM-DD HH24:MI:SS TZ'), ix.breaker_detail);
    ELSIF att.jobs_oid IS NULL OR drift IS NOT NULL THEN
        status := 'ok'; detail := 'not tripped';
    ELSE
        status := 'ok'; detail := 'not tripped; ' || (SELECT b.explanation FROM orphan_cleanup._breaker_limits(att) AS b);
    END IF;
    RETURN NEXT;

    -- Stray reconciliation: off, unable to read the inventory, or on (by which passes).
    check_name := 'strays';
    v_inventory := CASE WHEN cfg.reclaim_strays THEN orphan_cleanup._inventory_problem() END;
    IF cfg.reclaim_strays AND v_inventory IS NULL THEN
        v_stray_wait := coalesce('no stray is queued or handed out until then: ' || orphan_cleanup._partition_problem(),
                                 'no stray is queued or handed out while an extra reference is not in force: ' || orphan_cleanup._reference_problem());
    END IF;
    IF NOT cfg.reclaim_strays THEN
        status := 'ok'; detail := 'orphan_cleanup.reclaim_strays = off: strays are not queued (preview_strays() lists them)';
    ELSIF v_inventory IS NOT NULL THEN
        status := 'warning'; detail := 'orphan_cleanup.reclaim_strays = on, but cycles cannot reconcile strays: ' || v_inventory;
    ELSIF v_stray_wait IS NOT NULL THEN
        status := 'warning'; detail := 'orphan_cleanup.reclaim_strays = on, but ' || v_stray_wait;
    ELSIF pg_catalog.to_regclass('storage.objects') IS NULL THEN
        SELECT h.status, h.detail INTO status, detail FROM orphan_cleanup._listing_health() AS h;
    ELSIF orphan_cleanup._stray_index_ok() THEN
        status := 'ok'; detail := 'reconciled by a full pass every full_sweep_interval and, in between, by creation time';
    ELSE
        status := 'ok'; detail := 'reconciled by a full pass every full_sweep_interval only: a new stray waits for the next one. Where your role may, CREATE INDEX CONCURRENTLY objects_created_at ON storage.objects (created_at); lets every cycle find them';
    END IF;
    RETURN NEXT;

    check_name := 'reaping';
    SELECT count(*) INTO n FROM orphan_cleanup.deletion_queue WHERE state = 'claimed' AND lease_until < now();
    v_parts_gone := orphan_cleanup._partition_gone_problem();
    IF NOT cfg.reaping_enabled THEN
        status := 'warning'; detail := 'orphan_cleanup.reaping_enabled = off: claim() hands out nothing';
    ELSIF v_parts_gone IS NOT NULL THEN
        status := 'warning'; detail := 'claim() hands out nothing: ' || v_parts_gone;
    ELSIF n > 0 THEN
        status := 'warning'; detail := format('%s claimed rows are past their lease (a reaper died?); they are retried as attempts', n);
    ELSE
        status := 'ok'; detail := 'claims are handed out';
    END IF;
    RETURN NEXT;

    check_name := 'reapers';
    SELECT * INTO ix FROM orphan_cleanup._reaper_alert();
    IF ix.alert IS NOT NULL AND ix.alert_at > now() - interval '15 minutes' THEN
        status := CASE WHEN ix.alert LIKE 'storage refused%' THEN 'critical' ELSE 'warning' END;
        detail := format('%s at %s: %s', ix.alert_by, to_char(ix.alert_at, 'YYYY-MM-DD HH24:MI:SS TZ'), ix.alert);
    ELSE
        status := 'ok'; detail := 'no reaper reported trouble in the last 15 minutes';
    END IF;
    RETURN NEXT;

    check_name := 'reaper allow-lists';
    IF cov.misconfigured IS NOT NULL OR cov.unserved > 0 THEN
        status := 'warning';
        detail := concat_ws('; ',
                      CASE WHEN cov.unserved > 0 THEN format('%s ready rows are served by no reaper active in the last 15 minutes (%s)', cov.unserved, cov.unserved_what) END,
                      cov.misconfigured)
                  || '. Check each reaper''s SUPABASE_URL, --storage-hosts and --buckets against orphan_cleanup.allowed_hosts and allowed_buckets';
    ELSIF cov.active = 0 THEN
        SELECT min(q.available_at) INTO v_ready_since FROM orphan_cleanup.deletion_queue AS q
        WHERE q.state = 'pending' AND q.available_at <= now();
        IF v_ready_since < now() - interval '1 hour'
           AND NOT EXISTS (SELECT 1 FROM orphan_cleanup.reapers AS r WHERE r.last_claim_at > now() - interval '1 hour') THEN
            status := 'warning';
            detail := format('rows have been ready since %s and no reaper has claimed in the last hour: is a reaper running (reaper run, or reaper drain on a schedule)?',
                             to_char(v_ready_since, 'YYYY-MM-DD HH24:MI:SS TZ'));
        ELSE
            status := 'ok'; detail := 'no reaper has claimed in the last 15 minutes';
        END IF;
    ELSE
        status := 'ok'; detail := format('%s reapers active in the last 15 minutes; between them they serve every ready row', cov.active);
    END IF;
    RETURN NEXT;

    check_name := 'dead letters';
    SELECT count(*) INTO n FROM orphan_cleanup.deletion_queue WHERE state = 'dead';
    status := CASE WHEN n > 0 THEN 'warning' ELSE 'ok' END;
    detail := CASE WHEN n > 0 THEN format('%s rows are dead-lettered; inspect last_error in deletion_queue, then SELECT orphan_cleanup.requeue_dead();', n)
                   ELSE 'none' END;
    RETURN NEXT;

    check_name := 'rejected URLs';
    SELECT count(*) INTO n FROM orphan_cleanup.deletion_queue WHERE state = 'rejected';
    status := CASE WHEN n > 0 THEN 'warning' ELSE 'ok' END;
    detail := CASE WHEN n > 0 THEN format('%s orphans have URLs that are malformed or not allowed; their files are never deleted. See SELECT reason, count(*) FROM orphan_cleanup.deletion_queue WHERE state = ''rejected'' GROUP BY 1;', n)
                   ELSE 'none' END;
    RETURN NEXT;

    check_name := 'non-canonical references';
    n := coalesce(last.protected, 0);
    status := CASE WHEN n > 0 THEN 'warning' ELSE 'ok' END;
    detail := CASE WHEN n > 0 THEN format('the last cycle protected %s jobs referenced through a differently spelled id (case, spaces, braces) or sharing an object; the guide''s query counts them as orphans. See audit_log action ''protected''.', n)
                   ELSE 'none in the last cycle' END;
    RETURN NEXT;

    check_name := 'refused saves';
    SELECT CASE WHEN is_called THEN last_value ELSE 0 END INTO n FROM orphan_cleanup.refused_saves;
    status := CASE WHEN n > 0 THEN 'warning' ELSE 'ok' END;
    detail := CASE WHEN n > 0 THEN format('%s saves were refused because the job''s file may already be deleted; consider a larger min_age or grace', n)
                   ELSE 'none' END;
    RETURN NEXT;

    IF att.jobs_oid IS NOT NULL AND drift IS NULL THEN
        FOR ix IN SELECT * FROM orphan_cleanup._index_report(att.jobs_oid, att.assets_oid, att.age_column) LOOP
            check_name := ix.item; status := ix.status; detail := ix.detail;
            RETURN NEXT;
        END LOOP;
        -- Cycles analyze these when autovacuum is behind (_refresh_statistics); this names them
        -- meanwhile, and always where the extension may not analyze them.
        check_name := 'app table statistics';
        SELECT string_agg(format('%s: its statistics count %s rows while %s rows changed since its last ANALYZE',
                                 c.oid::regclass, greatest(c.reltuples, 0)::bigint, pg_stat_get_mod_since_analyze(c.oid)), '; '),
               string_agg(format('ANALYZE %s;', c.oid::regclass), ' ')
          INTO detail, v_analyze
          FROM pg_catalog.pg_class AS c
         WHERE c.oid IN (att.jobs_oid, att.assets_oid)
           AND orphan_cleanup._statistics_stale(c.oid, c.reltuples);
        IF detail IS NULL THEN
            status := 'ok'; detail := 'current';
        ELSE
            status := 'warning';
            detail := detail || format('. Until it is analyzed (the next cycle does it, where the extension may analyze it), claims and confirms may read the whole table; run %s', v_analyze);
        END IF;
        RETURN NEXT;
    END IF;

    check_name := 'pause points';
    IF coalesce(current_setting('orphan_cleanup.pause_points', true), '') <> '' THEN
        status := 'warning';
        detail := format('orphan_cleanup.pause_points = %L is a test hook: any session holding its advisory lock holds cycles open; ALTER SYSTEM RESET orphan_cleanup.pause_points; SELECT pg_reload_conf();',
                         current_setting('orphan_cleanup.pause_points', true));
    ELSE
        status := 'ok'; detail := 'none (test hooks off)';
    END IF;
    RETURN NEXT;

    check_name := 'standby';
    IF pg_catalog.pg_is_in_recovery() THEN
        status := 'warning'; detail := 'this server is a standby: cycles and claims run on the primary';
    ELSE
        status := 'ok'; detail := 'primary';
    END IF;
    RETURN NEXT;
END
$$;

CREATE OR REPLACE FUNCTION orphan_cleanup.health()
RETURNS TABLE (check_name text, status text, detail text)
LANGUAGE sql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp SET jit = off
AS $$ SELECT * FROM orphan_cleanup._health(orphan_cleanup._reaper_coverage()) $$;

DROP FUNCTION orphan_cleanup.queue_status();

CREATE FUNCTION orphan_cleanup.queue_status()
RETURNS TABLE (pending bigint, ready bigint, claimed bigint, dead bigint, rejected bigint,
               deleted bigint, absent bigint, oldest_pending timestamptz,
               last_cycle_at timestamptz, last_cycle_status text, last_cycle_error text,
               health text, reaping_enabled boolean, attached boolean,
               reaper_alert text, reaper_alert_at timestamptz,
               reapers integer, unserved bigint, refused_by_reapers bigint, misconfigured_reapers text,
               breaker_tripped boolean, refused_saves bigint,
               reclaimed_orphan_bytes numeric, reclaimed_stray_bytes numeric)
LANGUAGE plpgsql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp SET jit = off
AS $$
BEGIN
    -- The bytes reclaimed since installation, by kind: the savings ledger (rows history_retention
    -- pruned) and the deleted rows still in the queue, read in the one pass over the queue the
    -- counts make.
    RETURN QUERY
    SELECT c.pending, c.ready, c.claimed, c.dead, c.rejected, c.deleted, c.absent, c.oldest_pending,
           l.started_at, l.status, l.error,
           (SELECT CASE WHEN bool_or(h.status = 'critical') THEN 'critical'
                        WHEN bool_or(h.status = 'warning') THEN 'warning' ELSE 'ok' END
            FROM orphan_cleanup._health(v) AS h),
           (SELECT g.reaping_enabled FROM orphan_cleanup._config() AS g),
           EXISTS (SELECT 1 FROM orphan_cleanup.attachment),
           r.alert, r.alert_at,
           v.active, v.unserved, v.refused_last_hour, v.misconfigured,
           EXISTS (SELECT 1 FROM orphan_cleanup.detector_state AS st WHERE st.breaker_tripped_at IS NOT NULL),
           (SELECT CASE WHEN s.is_called THEN s.last_value ELSE 0 END FROM orphan_cleanup.refused_saves AS s),
           c.orphan_bytes + (SELECT coalesce(sum(g.deleted_bytes), 0) FROM orphan_cleanup.savings_ledger AS g WHERE g.kind = 'orphan'),
           c.stray_bytes + (SELECT coalesce(sum(g.deleted_bytes), 0) FROM orphan_cleanup.savings_ledger AS g WHERE g.kind = 'stray')
    FROM (SELECT count(*) FILTER (WHERE q.state = 'pending') AS pending,
                 count(*) FILTER (WHERE q.state = 'pending' AND q.available_at <= now()) AS ready,
                 count(*) FILTER (WHERE q.state = 'claimed') AS claimed,
                 count(*) FILTER (WHERE q.state = 'dead') AS dead,
                 count(*) FILTER (WHERE q.state = 'rejected') AS rejected,
                 count(*) FILTER (WHERE q.state = 'deleted') AS deleted,
                 count(*) FILTER (WHERE q.state = 'absent') AS absent,
                 min(q.enqueued_at) FILTER (WHERE q.state = 'pending') AS oldest_pending,
                 coalesce(sum(q.bytes) FILTER (WHERE q.state = 'deleted' AND q.kind = 'orphan'), 0)::numeric AS orphan_bytes,
                 coalesce(sum(q.bytes) FILTER (WHERE q.state = 'deleted' AND q.kind = 'stray'), 0)::numeric AS stray_bytes
          FROM orphan_cleanup.deletion_queue AS q) AS c
    LEFT JOIN LATERAL (SELECT * FROM orphan_cleanup.cycle_log AS x WHERE x.status <> 'skipped' ORDER BY x.id DESC LIMIT 1) AS l ON true
    CROSS JOIN orphan_cleanup._reaper_alert() AS r
    -- Computed once, for these columns and for the health checks above (it reads every ready row).
    CROSS JOIN orphan_cleanup._reaper_coverage() AS v;
END
$$;

-- The per-object save guard: saves, job writes, claims, job cleanup and cancel().

CREATE FUNCTION orphan_cleanup._fence_job(p_job uuid) RETURNS void
LANGUAGE sql VOLATILE SET search_path = pg_catalog, pg_temp
BEGIN ATOMIC
    INSERT INTO orphan_cleanup.job_fences AS f (job_id, touched_at) VALUES (p_job, clock_timestamp())
    ON CONFLICT (job_id) DO UPDATE SET touched_at = clock_timestamp();
END;

CREATE FUNCTION orphan_cleanup._hold_object(p_bucket text, p_path text) RETURNS orphan_cleanup.objects
LANGUAGE plpgsql VOLATILE SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    ob orphan_cleanup.objects;
BEGIN
    FOR attempt IN 1 .. 3 LOOP
        INSERT INTO orphan_cleanup.objects AS o (bucket, object_path) VALUES (p_bucket, p_path)
        ON CONFLICT (bucket, object_path) DO NOTHING;
        SELECT * INTO ob FROM orphan_cleanup.objects AS o
        WHERE o.bucket = p_bucket AND o.object_path = p_path
        FOR SHARE;
        IF FOUND THEN
            RETURN ob;
        END IF;
    END LOOP;
    RAISE EXCEPTION 'the row of object %/% was deleted under this transaction three times; try again', p_bucket, p_path
        USING ERRCODE = 'serialization_failure';
END
$$;

CREATE FUNCTION orphan_cleanup._refuse_save(p_job uuid, p_queue_id bigint, p_detail text) RETURNS void
LANGUAGE plpgsql VOLATILE SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    PERFORM pg_catalog.nextval('orphan_cleanup.refused_saves');
    PERFORM orphan_cleanup._note_refusal(p_job, p_queue_id, session_user::text);
    RAISE EXCEPTION 'render job % cannot be saved: its output expired as an orphan and may already be deleted from storage', p_job
        USING ERRCODE = 'OC001',
              DETAIL = p_detail,
              HINT = 'Render the job again to save it; the database cannot bring the old file back.';
END
$$;

-- Every object a URL could name (Rust): a saved job protects each reading, and the jobs table
-- is indexed by the set (GIN). See the notice at the end about that index.
CREATE FUNCTION orphan_cleanup."object_keys"("url" TEXT) RETURNS TEXT[]
IMMUTABLE STRICT PARALLEL SAFE
LANGUAGE c
AS 'MODULE_PATHNAME', 'object_keys_wrapper';

CREATE FUNCTION orphan_cleanup._allowed_bucket_list() RETURNS text[]
LANGUAGE plpgsql STABLE SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    RETURN ARRAY(SELECT DISTINCT btrim(b)
                 FROM unnest(string_to_array((SELECT c.allowed_buckets FROM orphan_cleanup._config() AS c), ',')) AS b
                 WHERE btrim(b) <> '' ORDER BY 1);
END
$$;

CREATE FUNCTION orphan_cleanup._objects_of(url text, OUT bucket text, OUT object_path text)
RETURNS SETOF record
LANGUAGE sql STABLE SET search_path = pg_catalog, pg_temp
BEGIN ATOMIC
    -- object_keys() once per call (every save and job write calls this), the buckets once.
    SELECT DISTINCT x.bucket, x.object_path
    FROM unnest(orphan_cleanup.object_keys(url)) AS k(key)
    CROSS JOIN (SELECT orphan_cleanup._allowed_bucket_list() AS buckets) AS a
    CROSS JOIN LATERAL (SELECT split_part(k.key, '/', 1), substr(k.key, strpos(k.key, '/') + 1)
                        UNION ALL
                        SELECT b, k.key FROM unnest(a.buckets) AS b) AS x(bucket, object_path)
    ORDER BY x.bucket, x.object_path;
END;

CREATE FUNCTION orphan_cleanup._names_of(key text) RETURNS text[]
LANGUAGE sql IMMUTABLE PARALLEL SAFE
RETURN ARRAY[key, pg_catalog.substr(key, pg_catalog.strpos(key, '/') OPERATOR(pg_catalog.+) 1)];

-- The most storage routes any layer of a URL's readings holds (Rust): the save guard's limit.
CREATE FUNCTION orphan_cleanup."_route_count"("url" TEXT) RETURNS INT
IMMUTABLE STRICT PARALLEL SAFE
LANGUAGE c
AS 'MODULE_PATHNAME', '_route_count_wrapper';

-- How many bytes the readings of a URL read, or -1 past their bound (Rust): the save guard's limit.
CREATE FUNCTION orphan_cleanup."_reading_size"("url" TEXT) RETURNS INT
IMMUTABLE STRICT PARALLEL SAFE
LANGUAGE c
AS 'MODULE_PATHNAME', '_reading_size_wrapper';

CREATE FUNCTION orphan_cleanup._unread_url(url text) RETURNS text
LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE SET search_path = pg_catalog, pg_temp
-- (The route count, which takes the value's layers off, once per call, and not for a value too
-- long to read: every save and job write calls this.)
RETURN (SELECT CASE
            WHEN octet_length(url) > 65536 THEN
                format('its output_url is %s bytes long, and pg_orphan_cleanup reads values of up to 65,536 bytes', octet_length(url))
            WHEN r.n < 0 THEN
                'its output_url is escaped or encoded more than 6 times over (JSON inside JSON, or URLs encoded into URLs), and pg_orphan_cleanup reads 6 layers'
            WHEN r.n > 16 THEN
                format('its output_url holds %s URLs and storage routes (a storage URL is two), and pg_orphan_cleanup reads up to 16 in one value', r.n)
            WHEN orphan_cleanup._reading_size(url) < 0 THEN
                'reading its output_url every way it could be meant (each URL in it cut at each space, ''&'', '','' and '')'', each layer of encoding) takes more than 32,768 bytes, and pg_orphan_cleanup reads up to that much of one value'
        END
        FROM (SELECT CASE WHEN octet_length(url) <= 65536 THEN orphan_cleanup._route_count(url) END AS n) AS r);

CREATE FUNCTION orphan_cleanup._refuse_unread(p_job uuid, p_why text) RETURNS void
LANGUAGE plpgsql VOLATILE SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    RAISE EXCEPTION 'render job % cannot be saved: % (it cannot tell which files the value names, so it could not keep them)', p_job, p_why
        USING ERRCODE = 'OC003',
              HINT = 'Store the file''s URL as Supabase Storage returns it (getPublicUrl() or createSignedUrl()) in output_url, and anything else in another column.';
END
$$;

CREATE FUNCTION orphan_cleanup._job_is_saved(att orphan_cleanup.attachment, p_job uuid) RETURNS boolean
LANGUAGE plpgsql STABLE SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_saved boolean;
BEGIN
    EXECUTE format('SELECT EXISTS (SELECT 1 FROM %s AS a WHERE orphan_cleanup.job_ref_key(a.metadata ->> %L) = $1)',
                   att.assets_oid::regclass, 'render_job_id')
       INTO v_saved USING p_job::text;
    -- Where row-level security hides assets from the role this runs as, whether the job is
    -- saved cannot be told: it is taken as saved, the answer that refuses more (see
    -- _rls_problem(); claims and cycles stop meanwhile). Looked at after the read, which holds
    -- the table: a policy committed while the read waited applied to it (the sixth review).
    IF pg_catalog.row_security_active(att.assets_oid) THEN
        RETURN true;
    END IF;
    RETURN v_saved;
END
$$;

CREATE FUNCTION orphan_cleanup._refuse_unread_saved(p_jobs oid, p_assets oid, p_what text) RETURNS void
LANGUAGE plpgsql VOLATILE SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_job uuid;
    v_why text;
BEGIN
    EXECUTE format('SELECT j.id, orphan_cleanup._unread_url(j.output_url) FROM %s AS j
                    WHERE orphan_cleanup._unread_url(j.output_url) IS NOT NULL
                      AND EXISTS (SELECT 1 FROM %s AS a WHERE orphan_cleanup.job_ref_key(a.metadata ->> %L) = j.id::text)
                    LIMIT 1', p_jobs::regclass, p_assets::regclass, 'render_job_id')
       INTO v_job, v_why;
    IF v_job IS NOT NULL THEN
        RAISE EXCEPTION '% found saved render job % whose files cannot be protected: %; nothing was changed', p_what, v_job, v_why
            USING ERRCODE = 'OC003',
                  HINT = format('Set that job''s output_url to the URL Supabase Storage returned for its file (UPDATE %s SET output_url = ... WHERE id = %L), look for others (SELECT id FROM %s WHERE orphan_cleanup._unread_url(output_url) IS NOT NULL), then run %s again.',
                                p_jobs::regclass, v_job, p_jobs::regclass, p_what);
    END IF;
END
$$;

CREATE FUNCTION orphan_cleanup._rls_problem(att orphan_cleanup.attachment) RETURNS text
LANGUAGE sql STABLE SET search_path = pg_catalog, pg_temp
RETURN (SELECT format('row-level security on %s applies to %s, the role pg_orphan_cleanup''s functions run as: they would see only the rows its policies let through, and saved assets as none (fix: ALTER TABLE %s NO FORCE ROW LEVEL SECURITY if %s owns it, or, as a superuser, ALTER ROLE %I BYPASSRLS)',
                      t.rel::regclass, current_user, t.rel::regclass, current_user, current_user)
        FROM unnest(ARRAY[att.jobs_oid, att.assets_oid]) WITH ORDINALITY AS t(rel, n)
        WHERE pg_catalog.row_security_active(t.rel)
        ORDER BY t.n LIMIT 1);

CREATE FUNCTION orphan_cleanup._refuse_under_rls(att orphan_cleanup.attachment, what text) RETURNS void
LANGUAGE plpgsql STABLE SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    problem text := orphan_cleanup._rls_problem(att);
BEGIN
    IF problem IS NOT NULL THEN
        RAISE EXCEPTION 'pg_orphan_cleanup cannot guard this %: %', what, problem
            USING ERRCODE = 'insufficient_privilege',
                  HINT = 'Until then no object is handed out and this write is refused; after the fix, SELECT * FROM orphan_cleanup.health();';
    END IF;
END
$$;

CREATE OR REPLACE FUNCTION orphan_cleanup.save_guard() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp SET jit = off SET enable_seqscan = off
AS $$
DECLARE
    v_new uuid;
    v_old uuid;
    att orphan_cleanup.attachment;
BEGIN
    IF TG_OP <> 'DELETE' THEN
        v_new := orphan_cleanup.job_ref_key(NEW.metadata ->> 'render_job_id')::uuid;
    END IF;
    IF TG_OP <> 'INSERT' THEN
        v_old := orphan_cleanup.job_ref_key(OLD.metadata ->> 'render_job_id')::uuid;
    END IF;
    -- An asset stopped referencing a job: look at that job again in the next cycle. An existing
    -- recheck row is updated, not left alone: the row lock, held to this transaction's end,
    -- keeps a cycle (which skips locked rechecks) from taking the recheck while this change is
    -- not committed, judging the job still referenced, and losing it until the next full sweep.
    IF v_old IS NOT NULL AND v_old IS DISTINCT FROM v_new THEN
        INSERT INTO orphan_cleanup.recheck (job_id, reason)
        VALUES (v_old, 'asset ' || lower(TG_OP))
        ON CONFLICT (job_id) DO UPDATE SET reason = EXCLUDED.reason;
    END IF;
    IF v_new IS NULL OR v_new IS NOT DISTINCT FROM v_old THEN
        RETURN NULL;
    END IF;
    SELECT * INTO att FROM orphan_cleanup.attachment;
    IF NOT FOUND THEN
        RETURN NULL;
    END IF;

    PERFORM orphan_cleanup._save_job(att, v_new);
    RETURN NULL;
END
$$;

CREATE FUNCTION orphan_cleanup._save_job(att orphan_cleanup.attachment, v_new uuid) RETURNS void
LANGUAGE plpgsql VOLATILE SET search_path = pg_catalog, pg_temp SET jit = off SET enable_seqscan = off
AS $$
DECLARE
    v_url text;
    v_buckets text[];
    v_paths text[];
    ob orphan_cleanup.objects;
    q record;
    v_ids bigint[];
BEGIN
    -- 1. The job's fence row, which a write pointing the job at a handed-out object (and any
    --    INSERT of the job) writes too; then the job row, read after it (FOR KEY SHARE: a claim
    --    skips the job while this save is in flight).
    PERFORM orphan_cleanup._fence_job(v_new);
    EXECUTE format('SELECT j.output_url FROM %s AS j WHERE j.id = $1 FOR KEY SHARE', att.jobs_oid::regclass)
       INTO v_url USING v_new;
    -- Row-level security, looked at once both tables are locked (the INSERT holds the assets
    -- table, the read above the jobs table): a policy committed before the read hid its row,
    -- and one committed later waits for this transaction (the sixth review).
    PERFORM orphan_cleanup._refuse_under_rls(att, 'save');
    IF orphan_cleanup._unread_url(v_url) IS NOT NULL THEN
        PERFORM orphan_cleanup._refuse_unread(v_new, orphan_cleanup._unread_url(v_url));
    END IF;
    IF v_url IS NOT NULL THEN
        SELECT array_agg(k.bucket), array_agg(k.object_path) INTO v_buckets, v_paths
        FROM orphan_cleanup._objects_of(v_url) AS k;
    END IF;

    -- 2. The rows of the objects it could name: refused if a claim ever handed one out.
    FOR i IN 1 .. coalesce(cardinality(v_paths), 0) LOOP
        ob := orphan_cleanup._hold_object(v_buckets[i], v_paths[i]);
        IF ob.handouts > 0 THEN
            PERFORM orphan_cleanup._refuse_save(v_new, ob.last_queue_id,
                format('Object %s/%s was handed to a reaper %s time(s), last by %s at %s (deletion queue row %s).',
                       ob.bucket, ob.object_path, ob.handouts, ob.last_handed_to, ob.last_handed_out_at, ob.last_queue_id));
        END IF;
    END LOOP;
    IF v_paths IS NULL OR (SELECT p.error IS NOT NULL FROM orphan_cleanup.parse_output_url(v_url) AS p) THEN
        -- The job names no object now (its row is gone, or confirm() cleared its output_url), or
        -- names it in a spelling only the lenient reading understands (which may be misread):
        -- refused if an object it named before was handed out.
        SELECT d.id, d.state, d.output_url, o.last_handed_to INTO q
        FROM orphan_cleanup.deletion_queue AS d
        JOIN orphan_cleanup.objects AS o ON o.bucket = d.bucket AND o.object_path = d.object_path
        WHERE d.job_id = v_new AND d.claim_count > 0 AND o.handouts > 0
        ORDER BY d.id DESC LIMIT 1;
        IF FOUND THEN
            PERFORM orphan_cleanup._refuse_save(v_new, q.id,
                format('Deletion queue row %s (state %s) handed %s to a reaper (last claimed by %s), and the job names no file now, or none the strict parser reads.',
                       q.id, q.state, q.output_url, q.last_handed_to));
        END IF;
    END IF;

    -- 3. Rows that would still hand out this job's file (any object it could name), never
    --    claimed: rescued. Found by index probes, then locked and changed by id, each a statement of its own: written as one
    --    statement (with OR, or with IN and UNION), the planner read the whole queue for every
    --    save, or rescanned a spilled copy of it, during a backlog (minutes for 100 saves with
    --    550,000 rows queued), inside the app's own transaction. `state || ''` keeps the planner
    --    off the partial index of pending rows: with statistics from an emptier queue it took
    --    that index for a one-row probe and read every pending row per save (auto_explain, 1M
    --    jobs: 250 ms per save).
    SELECT array_agg(x.id ORDER BY x.id) INTO v_ids
    FROM (SELECT d3.id FROM orphan_cleanup.deletion_queue AS d3
          WHERE d3.job_id = v_new AND d3.state || '' = 'pending'
          UNION
          SELECT d4.id
          FROM unnest(v_buckets, v_paths) AS k(bucket, object_path)
          CROSS JOIN LATERAL (SELECT d4.id FROM orphan_cleanup.deletion_queue AS d4
                              WHERE d4.bucket = k.bucket AND d4.object_path = k.object_path
                                AND d4.state || '' = 'pending'
                              OFFSET 0) AS d4) AS x;
    IF v_ids IS NULL THEN
        RETURN;
    END IF;
    -- Locked in id order, so that two saves rescuing the same rows cannot deadlock. A row that
    -- is no longer pending (a claim retired it meanwhile: a claim never hands out a row of a job
    -- or object this save holds) stays as it is.
    PERFORM 1 FROM orphan_cleanup.deletion_queue AS d
    WHERE d.id = ANY (v_ids) AND d.state || '' = 'pending'
    ORDER BY d.id
    FOR UPDATE;
    WITH rescued AS (
        UPDATE orphan_cleanup.deletion_queue AS d
           SET state = 'rescued', reason = format('job %s was saved before any reaper claimed it', v_new),
               finished_at = now(), updated_at = now()
          FROM unnest(v_ids) AS k(id)
         WHERE d.id = k.id AND d.state || '' = 'pending'
        RETURNING d.id, d.job_id, d.output_url)
    INSERT INTO orphan_cleanup.audit_log (action, job_id, queue_id, output_url, actor, detail)
    SELECT 'rescued', r.job_id, r.id, r.output_url, session_user,
           CASE WHEN r.job_id = v_new THEN 'saved by an asset'
                ELSE format('its object is also the output of job %s, which was saved', v_new) END
    FROM rescued AS r;
END
$$;

CREATE FUNCTION orphan_cleanup._keep_if_saved(att orphan_cleanup.attachment, p_job uuid, p_url text, p_why text) RETURNS void
LANGUAGE plpgsql VOLATILE SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    IF p_url IS NOT NULL AND p_job IS NOT NULL AND orphan_cleanup._job_is_saved(att, p_job) THEN
        PERFORM orphan_cleanup._keep_saved(p_job, p_url, p_why);
    END IF;
END
$$;

CREATE FUNCTION orphan_cleanup._keep_saved(p_job uuid, p_url text, p_why text) RETURNS void
LANGUAGE plpgsql VOLATILE SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_kept text[];
BEGIN
    WITH kept AS (
        INSERT INTO orphan_cleanup.objects AS x (bucket, object_path, kept_at, kept_by)
        SELECT DISTINCT k.bucket, k.object_path, now(), left(format('%s: saved job %s %s', session_user, p_job, p_why), 200)
        FROM orphan_cleanup._objects_of(p_url) AS k
        ON CONFLICT (bucket, object_path) DO UPDATE
           SET kept_at = coalesce(x.kept_at, now()), kept_by = coalesce(x.kept_by, EXCLUDED.kept_by), touched_at = now()
        RETURNING x.bucket || '/' || x.object_path AS key)
    SELECT array_agg(kept.key ORDER BY kept.key) INTO v_kept FROM kept;
    INSERT INTO orphan_cleanup.audit_log (action, job_id, output_url, actor, detail)
    VALUES ('protected', p_job, orphan_cleanup.redact_url(p_url), session_user,
            format('saved job %s while an asset still references it: its objects are kept (%s)', p_why, array_to_string(v_kept, ', ')));
END
$$;

CREATE FUNCTION orphan_cleanup.job_truncate_guard() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp SET jit = off
AS $$
DECLARE
    att orphan_cleanup.attachment;
    r record;
BEGIN
    SELECT * INTO att FROM orphan_cleanup.attachment;
    IF NOT FOUND THEN
        RETURN NULL;
    END IF;
    -- Its read of the saved jobs must see every committed save: a snapshot older than the
    -- TRUNCATE's lock would miss a save committed while it waited.
    IF current_setting('transaction_isolation') <> 'read committed' THEN
        RAISE EXCEPTION 'TRUNCATE of % must run at READ COMMITTED, not %: its guard keeps the files of the saved jobs it removes, and must see every save committed before it',
                        att.jobs_oid::regclass, current_setting('transaction_isolation')
            USING ERRCODE = 'invalid_transaction_state',
                  HINT = 'Run the TRUNCATE in its own READ COMMITTED transaction.';
    END IF;
    -- TG_RELID: the jobs table, or one of its partitions truncated alone (each carries this
    -- guard: sql/partitions.sql); its saved jobs only.
    FOR r IN EXECUTE format($sql$
        SELECT j.id, j.output_url FROM %s AS j
        WHERE j.output_url IS NOT NULL
          AND EXISTS (SELECT 1 FROM %s AS a WHERE orphan_cleanup.job_ref_key(a.metadata ->> 'render_job_id') = j.id::text)
        $sql$, TG_RELID::regclass, att.assets_oid::regclass)
    LOOP
        PERFORM orphan_cleanup._keep_saved(r.id, r.output_url, 'truncated');
    END LOOP;
    RETURN NULL;
END
$$;

CREATE FUNCTION orphan_cleanup.job_guard() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp SET jit = off
AS $$
DECLARE
    att orphan_cleanup.attachment;
    o record;
    ob orphan_cleanup.objects;
    v_out orphan_cleanup.objects;
    v_fenced boolean := false;
    v_unread text;
    v_moved boolean := false;
BEGIN
    SELECT * INTO att FROM orphan_cleanup.attachment;
    IF NOT FOUND THEN
        RETURN NULL;
    END IF;
    -- A saved job's row goes, or its id changes: what it named is kept. At REPEATABLE READ or
    -- SERIALIZABLE the job's fence row is written first, as every save of the job writes it: a
    -- save committed after this transaction's snapshot fails this write with 40001, where
    -- _job_is_saved() would not see it (the second review of stray queueing). Not at READ
    -- COMMITTED: a save in flight holds the job row, this write waited for it, and
    -- _job_is_saved() reads with a fresh snapshot; and a save takes the fence before the job row
    -- while a DELETE holds the job row first, so the fence there made them deadlock (the chaos
    -- suite's racing saves against confirm()'s job cleanup).
    IF TG_OP = 'DELETE' OR (TG_OP = 'UPDATE' AND NEW.id IS DISTINCT FROM OLD.id) THEN
        IF current_setting('transaction_isolation') <> 'read committed' THEN
            PERFORM orphan_cleanup._fence_job(OLD.id);
        END IF;
        -- A row of a partition (TG_RELID is not the jobs table) may be moving to another one:
        -- an UPDATE of its partition key is a DELETE here and an INSERT there, and this runs
        -- after both. The job still names the same objects: nothing to keep (kept, they could
        -- never be deleted: the fifth review of partitions). The row it moved to is locked: a
        -- partitioned table's id need not be unique, and two transactions each deleting one of
        -- two rows of a saved job must not each count on the other's (the sixth review).
        -- (Not with a foreign partition, where the lock would reach the other server, which may
        -- refuse it: the objects are kept, the safe answer; claims wait for such a table anyway.)
        IF TG_OP = 'DELETE' AND TG_RELID <> att.jobs_oid AND OLD.output_url IS NOT NULL
           AND NOT EXISTS (SELECT 1 FROM pg_catalog.pg_class AS c
                           WHERE c.relkind = 'f' AND c.oid IN (SELECT orphan_cleanup._job_partitions(att))) THEN
            EXECUTE format('SELECT true FROM %s AS j WHERE j.id = $1 AND orphan_cleanup.object_keys(j.output_url) @> orphan_cleanup.object_keys($2) LIMIT 1 FOR KEY SHARE',
                           att.jobs_oid::regclass)
               INTO v_moved USING OLD.id, OLD.output_url;
            v_moved := coalesce(v_moved, false);
        END IF;
        IF NOT v_moved THEN
            PERFORM orphan_cleanup._keep_if_saved(att, OLD.id, OLD.output_url,
                CASE TG_OP WHEN 'DELETE' THEN 'deleted' ELSE format('renumbered to %s', NEW.id) END);
        END IF;
        IF TG_OP = 'DELETE' THEN
            RETURN NULL;
        END IF;
    END IF;
    -- A new job id (an INSERT, or an UPDATE of id): a save of that id may have come before the
    -- job existed, and found no row to lock. Meet it on the fence row.
    v_unread := orphan_cleanup._unread_url(NEW.output_url);
    IF TG_OP = 'INSERT' OR NEW.id IS DISTINCT FROM OLD.id THEN
        PERFORM orphan_cleanup._fence_job(NEW.id);
        v_fenced := true;
    ELSIF v_unread IS NULL
          AND orphan_cleanup.object_keys(NEW.output_url) IS NOT DISTINCT FROM orphan_cleanup.object_keys(OLD.output_url) THEN
        RETURN NULL;  -- the same objects (a refreshed signed-URL token), or still none
    END IF;
    IF NEW.output_url IS NULL THEN
        RETURN NULL;
    END IF;
    -- A value whose objects cannot all be read: a saved job may not have it. Met on the fence
    -- row, like a save (which refuses to save a job with such a value).
    IF v_unread IS NOT NULL THEN
        IF NOT v_fenced THEN
            PERFORM orphan_cleanup._fence_job(NEW.id);
            v_fenced := true;
        END IF;
        IF orphan_cleanup._job_is_saved(att, NEW.id) THEN
            PERFORM orphan_cleanup._refuse_unread(NEW.id, v_unread);
        END IF;
    END IF;
    FOR o IN SELECT k.bucket, k.object_path FROM orphan_cleanup._objects_of(NEW.output_url) AS k LOOP
        ob := orphan_cleanup._hold_object(o.bucket, o.object_path);
        IF ob.handouts > 0 AND v_out.bucket IS NULL THEN
            v_out := ob;
        END IF;
    END LOOP;
    -- The job now names other objects: write its fence row whether or not one is handed out
    -- yet. A save whose snapshot predates this write (REPEATABLE READ, SERIALIZABLE) would read
    -- the old URL and hold the old objects, while a claim after this commit hands the new one
    -- out; its write of the same fence row fails instead, and its retry reads the new URL (the
    -- twelfth review).
    IF NOT v_fenced THEN
        PERFORM orphan_cleanup._fence_job(NEW.id);
    END IF;
    IF v_out.bucket IS NULL THEN
        RETURN NULL;
    END IF;
    IF orphan_cleanup._job_is_saved(att, NEW.id) THEN
        RAISE EXCEPTION 'render job % is saved and cannot point at %/%: that object was handed to a reaper and may already be deleted from storage',
                        NEW.id, v_out.bucket, v_out.object_path
            USING ERRCODE = 'OC002',
                  DETAIL = format('Object %s/%s was handed out %s time(s), last by %s at %s (deletion queue row %s).',
                                  v_out.bucket, v_out.object_path, v_out.handouts, v_out.last_handed_to, v_out.last_handed_out_at, v_out.last_queue_id),
                  HINT = 'Render the job again to a new object path; a saved job must keep a file that exists.';
    END IF;
    RETURN NULL;
END
$$;

CREATE OR REPLACE FUNCTION orphan_cleanup._drop_guards(rel oid) RETURNS void
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp SET jit = off
AS $$
DECLARE
    tg name;
    v_marked boolean;
BEGIN
    v_marked := orphan_cleanup._guards_changing();
    FOR tg IN
        SELECT t.tgname FROM pg_catalog.pg_trigger AS t
        WHERE t.tgrelid = rel AND t.tgname IN ('orphan_cleanup_save_guard', 'orphan_cleanup_truncate_guard', 'orphan_cleanup_job_guard')
    LOOP
        EXECUTE format('DROP TRIGGER %I ON %s', tg, rel::regclass);
    END LOOP;
    PERFORM orphan_cleanup._guards_changed(v_marked);
END
$$;

CREATE FUNCTION orphan_cleanup._drop_partition_guards() RETURNS void
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    rel oid;
    v_marked boolean;
BEGIN
    v_marked := orphan_cleanup._guards_changing();
    FOR rel IN SELECT x.relid FROM orphan_cleanup.job_partitions AS x
               JOIN pg_catalog.pg_trigger AS t ON t.tgrelid = x.relid AND t.tgname = 'orphan_cleanup_truncate_guard' AND t.tgparentid = 0
               ORDER BY 1 LOOP
        EXECUTE format('DROP TRIGGER orphan_cleanup_truncate_guard ON %s', rel::regclass);
    END LOOP;
    DELETE FROM orphan_cleanup.job_partitions;
    PERFORM orphan_cleanup._guards_changed(v_marked);
END
$$;

CREATE FUNCTION orphan_cleanup._refuse_while_claimed(what text, rels oid[]) RETURNS void
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    rel oid;
    n bigint;
BEGIN
    -- Only tables that still carry a guard matter (after a restore the recorded ones are gone).
    rels := ARRAY(SELECT DISTINCT t.tgrelid FROM pg_catalog.pg_trigger AS t
                  WHERE t.tgrelid = ANY (rels)
                    AND t.tgname IN ('orphan_cleanup_save_guard', 'orphan_cleanup_truncate_guard', 'orphan_cleanup_job_guard')
                  ORDER BY 1);
    IF cardinality(rels) = 0 THEN
        RETURN;
    END IF;
    FOREACH rel IN ARRAY rels LOOP
        EXECUTE format('LOCK TABLE %s IN SHARE ROW EXCLUSIVE MODE', rel::regclass);
    END LOOP;
    SELECT count(*) INTO n FROM orphan_cleanup.deletion_queue AS d WHERE d.state = 'claimed';
    IF n > 0 THEN
        RAISE EXCEPTION '% refused: % queue row(s) are claimed by reapers, whose files may be being deleted; the save guard must stay until they are done', what, n
            USING ERRCODE = 'object_in_use',
                  HINT = 'ALTER SYSTEM SET orphan_cleanup.reaping_enabled = off; SELECT pg_reload_conf(); then wait until queue_status() shows no claimed rows (or their leases expire), and try again.';
    END IF;
END
$$;

CREATE FUNCTION orphan_cleanup._ddl_touches(rels oid[]) RETURNS boolean
LANGUAGE sql STABLE SET search_path = pg_catalog, pg_temp
RETURN EXISTS (SELECT 1 FROM pg_catalog.pg_event_trigger_ddl_commands() AS e WHERE e.objid = ANY (rels));

CREATE FUNCTION orphan_cleanup._watch_guards() RETURNS event_trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    att orphan_cleanup.attachment;
    problem text;
BEGIN
    -- CREATE EXTENSION itself, creating the tables this reads after creating this watch.
    IF pg_catalog.to_regclass('orphan_cleanup.extra_references') IS NULL
       OR pg_catalog.to_regclass('orphan_cleanup.job_partitions') IS NULL
       OR pg_catalog.to_regclass('orphan_cleanup.guards_changing') IS NULL
       OR pg_catalog.to_regclass('orphan_cleanup.asset_partitions') IS NULL
       OR pg_catalog.to_regclass('orphan_cleanup.reference_partitions') IS NULL THEN
        RETURN;
    END IF;
    IF EXISTS (SELECT 1 FROM orphan_cleanup.guards_changing AS g WHERE g.txid = pg_catalog.pg_current_xact_id()) THEN
        RETURN;  -- attach(), detach(), add_reference() or the update, which check the claims themselves
    END IF;
    -- A partition created, attached or detached (sql/partitions.sql): guarded, or its saved
    -- jobs' files kept, now rather than at the next cycle.
    -- A command on the jobs table or one of its partitions (an ATTACH, a DETACH, a CREATE TABLE
    -- ... PARTITION OF) stops on any failure of the look: a refusal, a lock timeout while it
    -- waits for a claim in flight (the fifth review). Any other DDL only warns: it changed no
    -- partition, the next look (or health()) says what is wrong, and claims wait meanwhile,
    -- rather than every DDL in the database failing (the seventh review). Likewise below for
    -- the assets table and the reference tables.
    SELECT * INTO att FROM orphan_cleanup.attachment;
    IF FOUND AND EXISTS (SELECT 1 FROM pg_catalog.pg_class AS c WHERE c.oid = att.jobs_oid AND c.relkind = 'p') THEN
        BEGIN
            PERFORM orphan_cleanup._look_at_partitions(att, in_ddl => true);
        EXCEPTION WHEN OTHERS THEN
            IF orphan_cleanup._ddl_touches(att.jobs_oid || ARRAY(SELECT orphan_cleanup._job_partitions(att))) THEN
                RAISE;
            END IF;
            RAISE WARNING 'pg_orphan_cleanup could not look at the jobs table''s partitions (%); strays wait until a cycle does', SQLERRM;
        END;
    END IF;
    -- The assets table's new partitions (sql/partitions.sql): their assets saved now, in the
    -- transaction that attached them.
    IF att.assets_oid IS NOT NULL AND (EXISTS (SELECT 1 FROM pg_catalog.pg_inherits AS i WHERE i.inhparent = att.assets_oid)
                                       OR EXISTS (SELECT 1 FROM orphan_cleanup.asset_partitions)) THEN
        BEGIN
            PERFORM orphan_cleanup._look_at_asset_partitions(att);
        EXCEPTION WHEN OTHERS THEN
            IF orphan_cleanup._ddl_touches(att.assets_oid || ARRAY(SELECT orphan_cleanup._inheritors(att.assets_oid))) THEN
                RAISE;
            END IF;
            RAISE WARNING 'pg_orphan_cleanup could not look at the assets table''s partitions (%); claims wait until a cycle does', SQLERRM;
        END;
    END IF;
    -- A reference table's new partitions (sql/references.sql): their rows checked and their
    -- objects held now.
    IF EXISTS (SELECT 1 FROM orphan_cleanup.extra_references) THEN
        BEGIN
            PERFORM orphan_cleanup._look_at_reference_partitions();
        EXCEPTION WHEN OTHERS THEN
            IF orphan_cleanup._ddl_touches(ARRAY(SELECT r.table_oid FROM orphan_cleanup.extra_references AS r
                                                 UNION SELECT rp.relid FROM orphan_cleanup._reference_partitions() AS rp)) THEN
                RAISE;
            END IF;
            RAISE WARNING 'pg_orphan_cleanup could not look at the reference tables'' partitions (%); strays and claims wait until a cycle does', SQLERRM;
        END;
    END IF;
    -- An extra reference's guard (sql/references.sql) likewise. (A CREATE TABLE matters only
    -- when the new table inherits from a reference table, or is a partition of one.)
    IF (tg_tag <> 'CREATE TABLE'
        OR EXISTS (SELECT 1 FROM pg_catalog.pg_event_trigger_ddl_commands() AS e
                   JOIN pg_catalog.pg_inherits AS i ON i.inhrelid = e.objid
                   JOIN orphan_cleanup.extra_references AS r ON r.table_oid = i.inhparent))
       AND EXISTS (SELECT 1 FROM orphan_cleanup.deletion_queue AS d WHERE d.state = 'claimed') THEN
        problem := orphan_cleanup._reference_problem();
        IF problem IS NOT NULL THEN
            RAISE EXCEPTION '% refused: it would leave an extra reference not in force (%) while reapers hold claims', tg_tag, problem
                USING ERRCODE = 'object_in_use',
                      HINT = 'Rows written meanwhile could name files a reaper is deleting. Stop the reapers first (ALTER SYSTEM SET orphan_cleanup.reaping_enabled = off; SELECT pg_reload_conf();), wait until queue_status() shows no claimed rows, then run this again.';
        END IF;
    END IF;
    SELECT * INTO att FROM orphan_cleanup.attachment;
    IF NOT FOUND OR (SELECT count(*) FROM pg_catalog.pg_class AS c WHERE c.oid IN (att.jobs_oid, att.assets_oid)) < 2 THEN
        RETURN;
    END IF;
    problem := orphan_cleanup._guard_problem(att);
    IF problem IS NOT NULL AND EXISTS (SELECT 1 FROM orphan_cleanup.deletion_queue AS d WHERE d.state = 'claimed') THEN
        RAISE EXCEPTION '% refused: it would leave the save guard not in force (%) while reapers hold claims', tg_tag, problem
            USING ERRCODE = 'object_in_use',
                  HINT = 'Saves made meanwhile could keep files a reaper is deleting. Stop the reapers first (ALTER SYSTEM SET orphan_cleanup.reaping_enabled = off; SELECT pg_reload_conf();), wait until queue_status() shows no claimed rows, then run this again; afterwards run SELECT * FROM orphan_cleanup.attach();';
    END IF;
END
$$;

CREATE OR REPLACE FUNCTION orphan_cleanup.detach() RETURNS text
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp SET jit = off
AS $$
DECLARE
    prev orphan_cleanup.attachment;
BEGIN
    SELECT * INTO prev FROM orphan_cleanup.attachment;
    IF NOT FOUND THEN
        RETURN 'not attached; nothing to do';
    END IF;
    PERFORM orphan_cleanup._refuse_while_claimed('detach()', ARRAY[prev.assets_oid, prev.jobs_oid]);
    PERFORM orphan_cleanup._drop_guards(prev.assets_oid);
    PERFORM orphan_cleanup._drop_partition_guards();
    DELETE FROM orphan_cleanup.job_partitions;
    DELETE FROM orphan_cleanup.asset_partitions;
    PERFORM orphan_cleanup._drop_guards(prev.jobs_oid);
    -- (Dropped: with nothing attached, the watch has no guard to keep.)
    DELETE FROM orphan_cleanup.attachment;
    INSERT INTO orphan_cleanup.audit_log (action, actor, detail)
    VALUES ('detached', session_user, format('from jobs %s, assets %s', prev.jobs_table, prev.assets_table));
    RETURN format('detached from %s and %s; cycles and claims stop until attach() runs again', prev.jobs_table, prev.assets_table);
END
$$;

CREATE FUNCTION orphan_cleanup._guard_problem(att orphan_cleanup.attachment) RETURNS text
LANGUAGE plpgsql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp SET jit = off
AS $$
DECLARE
    want record;
    t record;
    rel regclass;
BEGIN
    FOR want IN
        SELECT * FROM (VALUES
            (att.assets_oid, 'orphan_cleanup_save_guard', 'orphan_cleanup.save_guard()'::regprocedure, 29::int2, 'AFTER INSERT OR UPDATE OR DELETE ... FOR EACH ROW'),
            (att.jobs_oid, 'orphan_cleanup_job_guard', 'orphan_cleanup.job_guard()'::regprocedure, 29::int2, 'AFTER INSERT OR UPDATE OR DELETE ... FOR EACH ROW'),
            (att.jobs_oid, 'orphan_cleanup_truncate_guard', 'orphan_cleanup.job_truncate_guard()'::regprocedure, 34::int2, 'BEFORE TRUNCATE ... FOR EACH STATEMENT'),
            (att.assets_oid, 'orphan_cleanup_truncate_guard', 'orphan_cleanup.truncate_guard()'::regprocedure, 32::int2, 'AFTER TRUNCATE ... FOR EACH STATEMENT')
        ) AS w(rel, name, fn, tgtype, events)
    LOOP
        -- A row trigger of a partitioned table fires through its clone on each partition, which
        -- can be disabled on its own: every table of the tree is checked.
        FOR rel IN
            SELECT want.rel
            UNION
            SELECT pt.relid FROM pg_catalog.pg_partition_tree(want.rel) AS pt WHERE (want.tgtype & 1) = 1
        LOOP
            SELECT tg.tgfoid, tg.tgtype, tg.tgenabled, tg.tgqual IS NOT NULL AS has_when, tg.tgattr::text AS cols INTO t
            FROM pg_catalog.pg_trigger AS tg
            WHERE tg.tgrelid = rel AND tg.tgname = want.name;
            IF NOT FOUND THEN
                RETURN format('the guard trigger %s is missing on %s', want.name, rel::regclass);
            ELSIF t.tgfoid <> want.fn OR t.tgtype <> want.tgtype OR t.has_when OR t.cols <> '' THEN
                RETURN format('the trigger %s on %s is not the guard attach() installs (it must be %s EXECUTE FUNCTION %s, with no WHEN clause or column list)',
                              want.name, rel::regclass, want.events, want.fn);
            ELSIF t.tgenabled <> 'A' THEN
                RETURN format('the guard trigger %s on %s is %s, not enabled ALWAYS (ALTER TABLE %s ENABLE ALWAYS TRIGGER %s)',
                              want.name, rel::regclass,
                              CASE t.tgenabled WHEN 'D' THEN 'disabled' WHEN 'R' THEN 'enabled REPLICA only'
                                               ELSE 'enabled ORIGIN only (skipped under session_replication_role = replica)' END,
                              rel::regclass, want.name);
            END IF;
        END LOOP;
    END LOOP;
    RETURN orphan_cleanup._rls_problem(att);
END
$$;

CREATE OR REPLACE FUNCTION orphan_cleanup._drift(att orphan_cleanup.attachment) RETURNS text
LANGUAGE plpgsql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp SET jit = off
AS $$
DECLARE
    cfg record;
    v_jobs oid;
    v_assets oid;
    problem text;
BEGIN
    SELECT * INTO cfg FROM orphan_cleanup._config();
    v_jobs := pg_catalog.to_regclass(cfg.jobs_table);
    IF v_jobs IS DISTINCT FROM att.jobs_oid THEN
        RETURN format('orphan_cleanup.jobs_table is %L (%s), but attach() recorded %s (oid %s)',
                      cfg.jobs_table, coalesce(v_jobs::regclass::text, 'no such table'), att.jobs_table, att.jobs_oid);
    END IF;
    v_assets := pg_catalog.to_regclass(cfg.assets_table);
    IF v_assets IS DISTINCT FROM att.assets_oid THEN
        RETURN format('orphan_cleanup.assets_table is %L (%s), but attach() recorded %s (oid %s)',
                      cfg.assets_table, coalesce(v_assets::regclass::text, 'no such table'), att.assets_table, att.assets_oid);
    END IF;
    IF cfg.age_column IS DISTINCT FROM att.age_column THEN
        RETURN format('orphan_cleanup.age_column is %L, but attach() recorded %L', cfg.age_column, att.age_column);
    END IF;
    -- A migration that renamed or dropped a column would otherwise read as a missing index.
    problem := (SELECT string_agg(format('%s.%I', w.rel::regclass, w.col), ', ')
                FROM (VALUES (att.jobs_oid, 'id'), (att.jobs_oid, 'status'), (att.jobs_oid, 'output_url'),
                             (att.jobs_oid, att.age_column), (att.assets_oid, 'metadata')) AS w(rel, col)
                WHERE NOT EXISTS (SELECT 1 FROM pg_catalog.pg_attribute AS a
                                  WHERE a.attrelid = w.rel AND a.attname = w.col AND a.attnum > 0 AND NOT a.attisdropped));
    IF problem IS NOT NULL THEN
        RETURN format('column %s no longer exists (renamed or dropped since attach())', problem);
    END IF;
    IF EXISTS (SELECT 1 FROM pg_catalog.pg_attribute AS a
               WHERE a.attrelid = att.jobs_oid AND a.attname = att.age_column AND NOT a.attisdropped
                 AND a.atttypid <> 'timestamptz'::regtype) THEN
        RETURN format('the age column %I of %s is no longer timestamptz (a timestamp without time zone is read in each session''s TimeZone)',
                      att.age_column, att.jobs_oid::regclass);
    END IF;
    RETURN orphan_cleanup._guard_problem(att);
    RETURN NULL;
END
$$;

-- Cycles, claims and previews refuse to run without the indexes their lookups need.

CREATE FUNCTION orphan_cleanup._required_indexes(v_jobs oid, v_assets oid, v_age_column text)
RETURNS TABLE (item text, usable boolean, problem text, statement text, for_claims boolean)
LANGUAGE plpgsql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp SET jit = off
AS $$
DECLARE
    v_age smallint;
    v_id smallint;
    v_status_is_text boolean;
    v_partitioned boolean;
    want record;
    ix record;
    v_defect text;
    v_pred text;
BEGIN
    SELECT a.attnum INTO v_age FROM pg_catalog.pg_attribute AS a
    WHERE a.attrelid = v_jobs AND a.attname = v_age_column AND NOT a.attisdropped;
    SELECT a.attnum INTO v_id FROM pg_catalog.pg_attribute AS a
    WHERE a.attrelid = v_jobs AND a.attname = 'id' AND NOT a.attisdropped;
    SELECT t.typcategory = 'S' INTO v_status_is_text
    FROM pg_catalog.pg_attribute AS a JOIN pg_catalog.pg_type AS t ON t.oid = a.atttypid
    WHERE a.attrelid = v_jobs AND a.attname = 'status' AND NOT a.attisdropped;
    FOR want IN
        SELECT * FROM (VALUES
            (1, 'index: assets by job reference', v_assets, 'render_job_id',
             'orphan_cleanup.job_ref_key((metadata ->> ''render_job_id''::text))', '_render_job_ref_idx',
             format('(orphan_cleanup.job_ref_key(metadata ->> %L))', 'render_job_id'), true),
            -- Only cycles and previews scan jobs by age; claims and confirms never do.
            (2, 'index: completed jobs by age', v_jobs, NULL, NULL, '_orphan_scan_idx',
             format('(%I, id) WHERE status = %L AND output_url IS NOT NULL', v_age_column, 'completed'), false),
            -- GIN: a job names a set of objects (object_keys()), and lookups ask which sets
            -- contain one. Without its pending list (fastupdate off): every lookup would read
            -- all of it, up to gin_pending_list_limit (claims 30 times slower at 10,000 jobs).
            (3, 'index: jobs by storage object', v_jobs, 'output_url',
             'orphan_cleanup.object_keys(output_url)', '_object_keys_idx',
             'USING gin (orphan_cleanup.object_keys(output_url)) WITH (fastupdate = off)', true),
            -- Every claim, confirm and save looks jobs up by id: a primary key usually is it.
            (4, 'index: jobs by id', v_jobs, NULL, NULL, '_id_idx', '(id)', true)
        ) AS w(n, item, rel, mentions, expr, suffix, def, for_claims)
        ORDER BY w.n
    LOOP
        item := want.item;
        for_claims := want.for_claims;
        usable := false;
        problem := NULL;
        v_partitioned := (SELECT c.relkind = 'p' FROM pg_catalog.pg_class AS c WHERE c.oid = want.rel);
        FOR ix IN
            -- Every cycle and claim runs this: lookups by oid, and the deparsing (the costly
            -- part) only where a column is an expression or there is a WHERE clause.
            SELECT i.indexrelid::regclass AS name,
                   i.indisvalid AND i.indisready AND i.indislive AS valid,
                   (SELECT am.amname FROM pg_catalog.pg_class AS c JOIN pg_catalog.pg_am AS am ON am.oid = c.relam
                    WHERE c.oid = i.indexrelid) AS amname,
                   CASE WHEN i.indpred IS NOT NULL THEN pg_catalog.pg_get_expr(i.indpred, i.indrelid) END AS pred,
                   CASE WHEN i.indkey[0] = 0 THEN pg_catalog.pg_get_indexdef(i.indexrelid, 1, false)
                        ELSE (SELECT a.attname::text FROM pg_catalog.pg_attribute AS a
                              WHERE a.attrelid = i.indrelid AND a.attnum = i.indkey[0]) END AS col1,
                   i.indkey[0] AS key1, i.indkey[1] AS key2, i.indnkeyatts AS nkeys,
                   NOT EXISTS (SELECT 1 FROM unnest(i.indclass::oid[]) AS k(opc)
                               JOIN pg_catalog.pg_opclass AS opc ON opc.oid = k.opc
                               WHERE NOT opc.opcdefault) AS default_opclass,
                   i.indcollation[0] IN (0, 100) AS default_collation,
                   EXISTS (SELECT 1 FROM pg_catalog.pg_class AS c, unnest(c.reloptions) AS o(opt)
                           WHERE c.oid = i.indexrelid
                             AND o.opt ~* '^fastupdate=(f|fa|fal|fals|false|n|no|of|off|0)$') AS no_pending_list
            FROM pg_catalog.pg_index AS i
            WHERE i.indrelid = want.rel
            ORDER BY i.indexrelid
        LOOP
            IF want.expr IS NOT NULL THEN
                -- Another index on the same column (the guide's, or another expression) is
                -- named, so that the DBA does not take it for the one these lookups need.
                IF ix.key1 <> 0 OR ix.col1 <> want.expr THEN
                    IF problem IS NULL AND ix.col1 LIKE '%' || want.mentions || '%' THEN
                        problem := format('%s indexes %s, which these lookups (on %s) cannot use', ix.name, ix.col1, want.expr);
                    END IF;
                    CONTINUE;
                END IF;
            ELSIF want.n = 2 THEN
                CONTINUE WHEN ix.key1 IS DISTINCT FROM v_age OR (ix.nkeys > 1 AND ix.key2 IS DISTINCT FROM v_id);
            ELSE
                CONTINUE WHEN ix.key1 IS DISTINCT FROM v_id;
            END IF;
            -- The predicate as the cycle's scan can match it: casts of the literal dropped (text,
            -- varchar, an enum in any schema), the column's implicit cast to text only when status
            -- is a string type (an enum's status::text = 'completed' cannot serve status = 'completed').
            v_pred := regexp_replace(ix.pred, '(''[^'']*'')::(character varying|[a-zA-Z0-9_."$]+)', '\1', 'g');
            IF v_status_is_text THEN
                v_pred := replace(v_pred, '(status)::text', 'status');
            END IF;
            v_pred := translate(v_pred, '()', '');
            v_defect := CASE
                WHEN NOT ix.valid AND v_partitioned THEN
                    format('%s is not valid: a partition lacks its index (build it there with CREATE INDEX CONCURRENTLY, then ALTER INDEX %s ATTACH PARTITION that index)', ix.name, ix.name)
                WHEN NOT ix.valid THEN format('%s is invalid (a CREATE INDEX CONCURRENTLY that failed or is still running; DROP INDEX CONCURRENTLY %s; first)', ix.name, ix.name)
                WHEN ix.amname <> CASE WHEN want.n = 3 THEN 'gin' ELSE 'btree' END THEN
                    format('%s is a %s index, not %s', ix.name, ix.amname, CASE WHEN want.n = 3 THEN 'gin' ELSE 'btree' END)
                WHEN NOT ix.default_opclass OR NOT ix.default_collation THEN format('%s uses a non-default operator class or collation', ix.name)
                WHEN want.n = 3 AND NOT ix.no_pending_list THEN
                    format('%s keeps a pending list (fastupdate, on by default for GIN), which every lookup reads whole: ALTER INDEX %s SET (fastupdate = off); SELECT pg_catalog.gin_clean_pending_list(%L::regclass); instead of building another',
                           ix.name, ix.name, ix.name::text)
                WHEN ix.pred IS NULL THEN NULL
                WHEN want.n = 2 AND v_pred IN ('status = ''completed'' AND output_url IS NOT NULL',
                                               'output_url IS NOT NULL AND status = ''completed''') THEN NULL
                ELSE format('%s is partial (WHERE %s)', ix.name, ix.pred)
            END;
            IF v_defect IS NULL THEN
                usable := true;
                EXIT;
            END IF;
            problem := v_defect;
        END LOOP;
        IF usable THEN
            problem := NULL;
            statement := NULL;
        ELSE
            problem := coalesce(problem, 'missing');
            -- CONCURRENTLY does not block the app's writes, but PostgreSQL refuses it on a
            -- partitioned table: there the plain statement builds it on every partition.
            IF v_partitioned THEN
                problem := problem || format(' (%s is partitioned: the statement below holds its writes while it builds; to avoid that, CREATE INDEX ... ON ONLY %s, CREATE INDEX CONCURRENTLY on each partition, and ALTER INDEX ... ATTACH PARTITION each)',
                                             want.rel::regclass, want.rel::regclass);
            END IF;
            statement := format('CREATE INDEX %s%I ON %s %s;',
                                CASE WHEN v_partitioned THEN '' ELSE 'CONCURRENTLY ' END,
                                left((SELECT c.relname FROM pg_catalog.pg_class AS c WHERE c.oid = want.rel) || want.suffix, 63),
                                want.rel::regclass, want.def);
        END IF;
        RETURN NEXT;
    END LOOP;
END
$$;

CREATE FUNCTION orphan_cleanup._index_problem(v_jobs oid, v_assets oid, v_age_column text, with_scan boolean DEFAULT true) RETURNS text
LANGUAGE sql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp SET jit = off
AS $$
    SELECT format('the indexes pg_orphan_cleanup relies on are not usable (%s): without them each lookup reads a whole table, for every row, which takes hours on a large table and holds a transaction open all that time. Run, outside a transaction block: %s',
                  string_agg(r.item || ': ' || r.problem, '; '), string_agg(r.statement, ' '))
    FROM orphan_cleanup._required_indexes(v_jobs, v_assets, v_age_column) AS r
    WHERE NOT r.usable AND (with_scan OR r.for_claims)
    HAVING count(*) > 0
$$;

CREATE OR REPLACE FUNCTION orphan_cleanup._index_report(v_jobs oid, v_assets oid, v_age_column text)
RETURNS TABLE (item text, status text, detail text)
LANGUAGE sql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp SET jit = off
AS $$
    SELECT r.item,
           CASE WHEN r.usable THEN 'ok' ELSE 'critical' END,
           CASE WHEN r.usable THEN 'present and valid'
                ELSE format('%s; %s refuse to run until it exists. Run: %s', r.problem,
                            CASE WHEN r.for_claims THEN 'cycles, claims and preview()'
                                 ELSE 'cycles and preview()' END,
                            r.statement)
           END
    FROM orphan_cleanup._required_indexes(v_jobs, v_assets, v_age_column) AS r
$$;

CREATE OR REPLACE FUNCTION orphan_cleanup._require_attached(purpose text) RETURNS orphan_cleanup.attachment
LANGUAGE plpgsql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp SET jit = off
AS $$
DECLARE
    att orphan_cleanup.attachment;
    problem text;
BEGIN
    SELECT * INTO att FROM orphan_cleanup.attachment;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'pg_orphan_cleanup is not attached to any tables, so % cannot run', purpose
            USING ERRCODE = 'object_not_in_prerequisite_state',
                  HINT = 'Check orphan_cleanup.jobs_table and orphan_cleanup.assets_table, then run SELECT * FROM orphan_cleanup.attach();';
    END IF;
    problem := orphan_cleanup._drift(att);
    IF problem IS NOT NULL THEN
        RAISE EXCEPTION '% refused: %', purpose, problem
            USING ERRCODE = 'object_not_in_prerequisite_state',
                  HINT = 'Fix the setting or the table, then run SELECT * FROM orphan_cleanup.attach(); to confirm the tables again.';
    END IF;
    -- Checked on every call, not only by attach(): an index dropped by a migration tool, or
    -- left invalid by a failed rebuild, must stop the next cycle or claim, not make it run for hours.
    problem := orphan_cleanup._index_problem(att.jobs_oid, att.assets_oid, att.age_column,
                                             with_scan => purpose <> 'claim()');
    IF problem IS NOT NULL THEN
        RAISE EXCEPTION '% refused: %', purpose, problem
            USING ERRCODE = 'object_not_in_prerequisite_state',
                  HINT = 'SELECT * FROM orphan_cleanup.health(); shows each index. Cycles and claims resume by themselves once the indexes exist.';
    END IF;
    RETURN att;
END
$$;

CREATE OR REPLACE FUNCTION orphan_cleanup.preview(min_age interval DEFAULT NULL, max_rows integer DEFAULT 100)
RETURNS TABLE (job_id uuid, age timestamptz, output_url text, host text, bucket text, object_path text,
               verdict text, queue_state text)
LANGUAGE plpgsql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp SET jit = off
AS $$
DECLARE
    t record;
    att orphan_cleanup.attachment;
    cur_ts timestamptz := '-infinity';
    cur_id uuid := '00000000-0000-0000-0000-000000000000';
    cutoff timestamptz;
    got integer := 0;
    seen integer;
    r record;
    v_problem text;
BEGIN
    IF max_rows IS NULL OR max_rows < 1 THEN
        RAISE EXCEPTION 'max_rows must be at least 1, got %', max_rows USING ERRCODE = 'invalid_parameter_value';
    END IF;
    t := orphan_cleanup._tables();
    v_problem := orphan_cleanup._index_problem(t.jobs_oid, t.assets_oid, t.age_column);
    IF v_problem IS NOT NULL THEN
        RAISE EXCEPTION 'preview() refused: %', v_problem
            USING ERRCODE = 'object_not_in_prerequisite_state',
                  HINT = 'orphan_count() and validation_report() run the guide''s own queries and need no index.';
    END IF;
    att := ROW(true, '', t.jobs_oid, '', t.assets_oid, t.age_column, now(), '')::orphan_cleanup.attachment;
    cutoff := now() - coalesce(min_age, make_interval(secs => t.min_age_s));
    LOOP
        seen := 0;
        FOR r IN SELECT * FROM orphan_cleanup._candidates(att, cutoff, cur_ts, cur_id, 5000) LOOP
            seen := seen + 1;
            cur_ts := r.age_ts;
            cur_id := r.job_id;
            CONTINUE WHEN r.ref_state = 'canonical';
            job_id := r.job_id;
            age := r.age_ts;
            output_url := orphan_cleanup.redact_url(r.output_url);
            host := r.host;
            bucket := r.bucket;
            object_path := r.object_path;
            verdict := CASE
                WHEN r.ref_state = 'noncanonical' THEN 'protected: referenced by an asset through a non-canonical spelling of the job id'
                WHEN r.url_error IS NOT NULL THEN 'rejected: ' || r.url_error
                WHEN r.shared_with IS NOT NULL THEN format('protected: shares its object with job %s, which is not an orphan', r.shared_with)
                WHEN r.named_by IS NOT NULL THEN format('protected: %s names its object (an extra reference)', r.named_by)
                ELSE 'orphan'
            END;
            SELECT q.state INTO queue_state FROM orphan_cleanup.deletion_queue AS q
            WHERE q.job_id = r.job_id ORDER BY q.id DESC LIMIT 1;
            RETURN NEXT;
            got := got + 1;
            EXIT WHEN got >= max_rows;
        END LOOP;
        EXIT WHEN got >= max_rows OR seen < 5000;
    END LOOP;
END
$$;

CREATE OR REPLACE FUNCTION orphan_cleanup._breaker_limits(
    att orphan_cleanup.attachment,
    OUT armed boolean, OUT history integer, OUT median numeric, OUT completed_estimate bigint,
    OUT max_rows bigint, OUT explanation text)
-- VOLATILE only because PostgreSQL allows EXPLAIN in no other kind of function: it writes nothing.
LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp SET jit = off
AS $$
DECLARE
    cfg record;
    v_plan json;
    by_median bigint;
    by_fraction bigint;
BEGIN
    SELECT * INTO cfg FROM orphan_cleanup._config();
    SELECT count(*), percentile_cont(0.5) WITHIN GROUP (ORDER BY h.enqueued)
      INTO history, median
      FROM (SELECT l.enqueued
            FROM orphan_cleanup.cycle_log AS l
            WHERE l.status = 'ok' AND l.started_at >= att.attached_at AND l.enqueued < cfg.max_per_cycle
              AND NOT l.out_of_time
            ORDER BY l.id DESC
            LIMIT 10) AS h;
    armed := history >= 3;
    -- The planner's estimate of the deletable population: planning only, nothing is read.
    EXECUTE format('EXPLAIN (FORMAT JSON) SELECT 1 FROM %s AS j WHERE j.status = ''completed'' AND j.output_url IS NOT NULL',
                   att.jobs_oid::regclass)
    INTO v_plan;
    completed_estimate := (v_plan -> 0 -> 'Plan' ->> 'Plan Rows')::numeric::bigint;
    IF armed AND cfg.breaker_factor > 0 THEN
        by_median := ceil(cfg.breaker_factor * median);
    END IF;
    IF armed AND cfg.breaker_max_fraction < 1 AND completed_estimate > 0 THEN
        by_fraction := floor(cfg.breaker_max_fraction * completed_estimate);
    END IF;
    IF by_median IS NOT NULL OR by_fraction IS NOT NULL THEN
        max_rows := greatest(cfg.breaker_min_rows, least(by_median, by_fraction));
    END IF;
    explanation := CASE
        WHEN NOT armed THEN format('not armed yet: %s of the 3 cycles it needs as history (the first backlog runs under max_per_cycle alone)', history)
        WHEN max_rows IS NULL THEN 'off: breaker_factor = 0 and breaker_max_fraction = 1'
        ELSE format('a cycle may enqueue at most %s rows: %s', max_rows,
                    concat_ws(', ', format('breaker_min_rows %s', cfg.breaker_min_rows),
                              CASE WHEN by_median IS NOT NULL
                                   THEN format('breaker_factor %s x median %s of the last %s cycles', cfg.breaker_factor, round(median, 1), history) END,
                              CASE WHEN by_fraction IS NOT NULL
                                   THEN format('breaker_max_fraction %s of about %s completed jobs', cfg.breaker_max_fraction, completed_estimate) END))
    END;
END
$$;

CREATE FUNCTION orphan_cleanup._breaker_settings() RETURNS text
LANGUAGE sql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp
RETURN (SELECT format('breaker_factor %s, breaker_min_rows %s, breaker_max_fraction %s',
                      c.breaker_factor, c.breaker_min_rows, c.breaker_max_fraction)
        FROM orphan_cleanup._config() AS c);

CREATE OR REPLACE FUNCTION orphan_cleanup.reset_breaker(reason text) RETURNS text
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp SET jit = off
AS $$
DECLARE
    st orphan_cleanup.detector_state;
BEGIN
    IF reason IS NULL OR btrim(reason) = '' THEN
        RAISE EXCEPTION 'reset_breaker() needs a reason, for the audit log'
            USING ERRCODE = 'invalid_parameter_value',
                  HINT = 'SELECT orphan_cleanup.reset_breaker(''checked preview(): the assets migration really removed these references'');';
    END IF;
    SELECT * INTO st FROM orphan_cleanup.detector_state FOR UPDATE;
    IF st.breaker_tripped_at IS NULL THEN
        RETURN 'the circuit breaker is not tripped; nothing to reset';
    END IF;
    UPDATE orphan_cleanup.detector_state
       SET breaker_tripped_at = NULL, breaker_detail = NULL, breaker_settings = NULL, breaker_approved = true;
    INSERT INTO orphan_cleanup.audit_log (action, actor, detail)
    VALUES ('breaker_reset', session_user,
            format('%s (the trip at %s: %s)', left(reason, 2000), st.breaker_tripped_at, st.breaker_detail));
    RETURN format('circuit breaker reset by %s; the next cycle runs without it, and so do the cycles that carry on its backlog while they run out of cycle_time_budget (max_per_cycle still applies)', session_user);
END
$$;

CREATE OR REPLACE FUNCTION orphan_cleanup._retry_job_cleanup(actor text) RETURNS void
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp SET jit = off SET enable_seqscan = off
AS $$
DECLARE
    v_ids bigint[];
BEGIN
    SELECT array_agg(r.id) INTO v_ids
    FROM (SELECT d.id FROM orphan_cleanup.deletion_queue AS d
          WHERE d.job_cleanup LIKE 'pending%' AND d.state IN ('deleted', 'absent')
          ORDER BY d.id LIMIT 2000) AS r;
    PERFORM orphan_cleanup._cleanup_jobs(v_ids, (SELECT on_confirm FROM orphan_cleanup._config()), actor);
END
$$;

-- Candidates say which extra reference names their object (sql/references.sql).
DROP FUNCTION orphan_cleanup._candidates(orphan_cleanup.attachment, timestamptz, timestamptz, uuid, integer, uuid[]);

CREATE FUNCTION orphan_cleanup._candidates(
    att orphan_cleanup.attachment,
    cutoff timestamptz,
    after_ts timestamptz,
    after_id uuid,
    max_rows integer,
    job_ids uuid[] DEFAULT NULL
) RETURNS TABLE (job_id uuid, age_ts timestamptz, output_url text, ref_state text,
                 host text, bucket text, object_path text, url_error text, shared_with uuid,
                 named_by text)
LANGUAGE plpgsql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp SET jit = off
AS $$
DECLARE
    scope text;
BEGIN
    IF job_ids IS NULL THEN
        scope := format('(j.%1$I, j.id) > ($2, $3) ORDER BY j.%1$I, j.id LIMIT $4', att.age_column);
    ELSE
        scope := format('j.id = ANY ($5) ORDER BY j.%1$I, j.id', att.age_column);
    END IF;
    RETURN QUERY EXECUTE format($sql$
        WITH cand AS (
            SELECT j.id, j.%1$I::timestamptz AS age_ts, j.output_url
            FROM %2$s AS j
            WHERE j.status = 'completed'
              AND j.output_url IS NOT NULL
              AND j.%1$I < $1
              AND %4$s
        ),
        judged AS MATERIALIZED (
            SELECT c.id, c.age_ts, c.output_url, r.ref_state, u.host, u.bucket, u.object_path, u.error
            FROM cand AS c
            CROSS JOIN LATERAL (
                SELECT CASE WHEN bool_or(a.metadata ->> 'render_job_id' = c.id::text) THEN 'canonical'
                            WHEN count(*) > 0 THEN 'noncanonical'
                            ELSE 'none'
                       END AS ref_state
                FROM %3$s AS a
                WHERE orphan_cleanup.job_ref_key(a.metadata ->> 'render_job_id') = c.id::text
            ) AS r
            -- A job the guide's own join finds saved goes no further (callers skip 'canonical'),
            -- so its URL is not read: most of a cycle's candidates in a mature app, and in the
            -- managed edition, where URLs are read in PL/pgSQL, most of a cycle's time.
            CROSS JOIN LATERAL orphan_cleanup.check_output_url(
                CASE WHEN r.ref_state <> 'canonical' THEN c.output_url END) AS u
        ),
        -- A job that is not an orphan and could name the same object (object_keys()) keeps it: looked for once per
        -- object, not once per job. Per job, K jobs naming one object (a render cache's hits)
        -- cost K x K probes when all are orphans. The orphan itself can never be its object's
        -- keeper (it is completed, old enough and unreferenced), so it need not be left out.
        keepers AS MATERIALIZED (
            SELECT o.key, k.id AS keeper, CASE WHEN k.id IS NULL THEN %5$s END AS named_by
            FROM (SELECT DISTINCT g.bucket || '/' || g.object_path AS key
                  FROM judged AS g WHERE g.error IS NULL AND g.ref_state = 'none') AS o
            LEFT JOIN LATERAL (
                SELECT j2.id
                FROM %2$s AS j2
                WHERE orphan_cleanup.object_keys(j2.output_url) && orphan_cleanup._names_of(o.key)
                  -- coalesce: a NULL status or age is unknown, and unknown keeps the object.
                  AND NOT coalesce(j2.status = 'completed'
                           AND j2.%1$I < $1
                           -- OFFSET 0: an index probe per job, never a hash of every asset.
                           AND NOT EXISTS (
                               SELECT 1 FROM %3$s AS a2
                               WHERE orphan_cleanup.job_ref_key(a2.metadata ->> 'render_job_id') = j2.id::text
                               OFFSET 0), false)
                LIMIT 1) AS k ON true
        )
        SELECT g.id, g.age_ts, g.output_url, g.ref_state, g.host, g.bucket, g.object_path, g.error,
               CASE WHEN g.error IS NULL AND g.ref_state = 'none' THEN k.keeper END,
               CASE WHEN g.error IS NULL AND g.ref_state = 'none' THEN k.named_by END
        FROM judged AS g
        LEFT JOIN keepers AS k ON k.key = g.bucket || '/' || g.object_path
        $sql$, att.age_column, att.jobs_oid::regclass, att.assets_oid::regclass, scope,
        orphan_cleanup._referenced_by_sql('o.key'))
    USING cutoff, after_ts, after_id, max_rows, job_ids;
END
$$;

-- A chunk caps what it queues itself (max_enqueue) instead of shrinking to the rows left.

DROP FUNCTION orphan_cleanup._process_chunk(orphan_cleanup.attachment, bigint, text, timestamptz, timestamptz, uuid, integer, uuid[], interval, boolean);

CREATE FUNCTION orphan_cleanup._process_chunk(
    att orphan_cleanup.attachment,
    p_cycle bigint,
    p_actor text,
    cutoff timestamptz,
    after_ts timestamptz,
    after_id uuid,
    max_rows integer,
    job_ids uuid[],
    p_grace interval,
    p_dry boolean,
    max_enqueue bigint,
    OUT seen bigint, OUT last_ts timestamptz, OUT last_id uuid,
    OUT n_found bigint, OUT n_enqueued bigint, OUT n_protected bigint, OUT n_rejected bigint,
    OUT capped boolean)
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp SET jit = off
    SET plan_cache_mode = force_custom_plan
AS $$
BEGIN
    WITH c_all AS MATERIALIZED (
        SELECT * FROM orphan_cleanup._candidates(att, cutoff, after_ts, after_id, max_rows, job_ids)
    ),
    fresh_all AS (
        -- Orphans whose URL has no queue history that settles it already. A LATERAL ... LIMIT 1
        -- rather than NOT EXISTS: the planner turned NOT EXISTS into a hash anti-join that read
        -- the whole queue once per chunk, which made a first cycle over 1M jobs quadratic. This
        -- form can only be an index probe per orphan (deletion_queue_job).
        SELECT o.*, h.url_hash
        FROM c_all AS o
        CROSS JOIN LATERAL (SELECT md5(o.output_url) AS url_hash) AS h
        LEFT JOIN LATERAL (
            SELECT true AS settled
            FROM orphan_cleanup.deletion_queue AS q
            WHERE q.job_id = o.job_id
              AND q.url_hash = h.url_hash
              AND (q.state IN ('pending', 'claimed', 'deleted', 'absent', 'dead', 'cancelled')
                   OR (q.state = 'rejected' AND q.reason = o.url_error))
            LIMIT 1
        ) AS s ON true
        WHERE s.settled IS NULL AND o.ref_state <> 'canonical'
    ),
    -- The first orphan past the cap, in scan order: where this chunk ends.
    stop_at AS (
        SELECT f.age_ts, f.job_id
        FROM fresh_all AS f
        WHERE max_enqueue IS NOT NULL
          AND f.ref_state = 'none' AND f.url_error IS NULL AND f.shared_with IS NULL AND f.named_by IS NULL
        ORDER BY f.age_ts, f.job_id
        OFFSET max_enqueue LIMIT 1
    ),
    c AS (
        SELECT * FROM c_all AS a
        WHERE NOT EXISTS (SELECT 1 FROM stop_at AS x WHERE (a.age_ts, a.job_id) >= (x.age_ts, x.job_id))
    ),
    orphans AS (
        -- The guide's orphans: no asset references the job by its exact id text.
        SELECT * FROM c WHERE c.ref_state <> 'canonical'
    ),
    fresh AS (
        SELECT * FROM fresh_all AS a
        WHERE NOT EXISTS (SELECT 1 FROM stop_at AS x WHERE (a.age_ts, a.job_id) >= (x.age_ts, x.job_id))
    ),
    ins_queue AS (
        INSERT INTO orphan_cleanup.deletion_queue
            (job_id, output_url, url_hash, host, bucket, object_path, state, available_at, cycle_id)
        SELECT f.job_id, orphan_cleanup.redact_url(f.output_url), f.url_hash, f.host, f.bucket, f.object_path,
               'pending', now() + p_grace, p_cycle
        FROM fresh AS f
        WHERE NOT p_dry AND f.ref_state = 'none' AND f.url_error IS NULL AND f.shared_with IS NULL AND f.named_by IS NULL
        ON CONFLICT (job_id) WHERE state IN ('pending', 'claimed') DO NOTHING
        RETURNING id, job_id, output_url
    ),
    ins_rejected AS (
        INSERT INTO orphan_cleanup.deletion_queue
            (job_id, output_url, url_hash, host, bucket, object_path, state, reason, cycle_id, finished_at)
        SELECT f.job_id, orphan_cleanup.redact_url(f.output_url), f.url_hash, f.host, f.bucket, f.object_path,
               'rejected', f.url_error, p_cycle, now()
        FROM fresh AS f
        WHERE NOT p_dry AND f.ref_state = 'none' AND f.url_error IS NOT NULL
        RETURNING id, job_id, output_url, reason
    ),
    audited AS (
        INSERT INTO orphan_cleanup.audit_log (action, job_id, queue_id, output_url, actor, detail, cycle_id)
        SELECT 'enqueued', i.job_id, i.id, i.output_url, p_actor, NULL, p_cycle FROM ins_queue AS i
        UNION ALL
        SELECT 'rejected', r.job_id, r.id, r.output_url, p_actor, r.reason, p_cycle FROM ins_rejected AS r
        UNION ALL
        SELECT 'protected', f.job_id, NULL, orphan_cleanup.redact_url(f.output_url), p_actor,
               CASE WHEN f.ref_state = 'noncanonical'
                    THEN 'referenced by an asset through a non-canonical spelling of the job id'
                    WHEN f.shared_with IS NOT NULL
                    THEN format('shares its object with job %s, which is not an orphan', f.shared_with)
                    ELSE format('%s names its object (an extra reference)', f.named_by)
               END,
               p_cycle
        FROM fresh AS f
        WHERE NOT p_dry AND (f.ref_state = 'noncanonical' OR f.shared_with IS NOT NULL OR f.named_by IS NOT NULL)
        RETURNING 1
    )
    SELECT (SELECT count(*) FROM c),
           (SELECT c.age_ts FROM c ORDER BY c.age_ts DESC, c.job_id DESC LIMIT 1),
           (SELECT c.job_id FROM c ORDER BY c.age_ts DESC, c.job_id DESC LIMIT 1),
           (SELECT count(*) FROM orphans),
           CASE WHEN p_dry
                THEN (SELECT count(*) FROM fresh AS f
                      WHERE f.ref_state = 'none' AND f.url_error IS NULL AND f.shared_with IS NULL AND f.named_by IS NULL)
                ELSE (SELECT count(*) FROM ins_queue)
           END,
           (SELECT count(*) FROM orphans AS o WHERE o.ref_state = 'noncanonical' OR o.shared_with IS NOT NULL OR o.named_by IS NOT NULL),
           (SELECT count(*) FROM orphans AS o WHERE o.ref_state = 'none' AND o.url_error IS NOT NULL),
           EXISTS (SELECT 1 FROM stop_at)
      INTO seen, last_ts, last_id, n_found, n_enqueued, n_protected, n_rejected, capped;
END
$$;

CREATE FUNCTION orphan_cleanup._prune_objects(att orphan_cleanup.attachment, actor text, deadline timestamptz) RETURNS void
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp SET jit = off
    SET enable_seqscan = off SET enable_bitmapscan = off
AS $$
DECLARE
    v_buckets text[];
    v_paths text[];
    v_n bigint;
BEGIN
    FOR batch IN 1 .. 40 LOOP
        EXIT WHEN batch > 1 AND clock_timestamp() >= deadline;
        EXIT WHEN NOT coalesce((SELECT o.touched_at FROM orphan_cleanup.objects AS o
                                WHERE o.handouts = 0 AND o.kept_at IS NULL
                                ORDER BY o.touched_at LIMIT 1) < now() - interval '1 day', false);
        DELETE FROM orphan_cleanup.objects AS o
        WHERE (o.bucket, o.object_path) IN (
            SELECT o2.bucket, o2.object_path FROM orphan_cleanup.objects AS o2
            WHERE o2.handouts = 0 AND o2.kept_at IS NULL AND o2.touched_at < now() - interval '1 day'
            ORDER BY o2.touched_at LIMIT 10000
            FOR UPDATE SKIP LOCKED);
        GET DIAGNOSTICS v_n = ROW_COUNT;
        EXIT WHEN v_n < 10000;
    END LOOP;

    -- Handed-out objects due for a look (forget_at): only those are read, so objects that stay
    -- named for months (by dead letters, say) cost one look a day each, not one per cycle.
    -- Batches of 10,000 while the budget lasts, as above: one batch a cycle fell behind a busy
    -- day's hand-outs (240,000 a day at hourly cycles), and the table grew for good.
    FOR batch IN 1 .. 40 LOOP
        EXIT WHEN batch > 1 AND clock_timestamp() >= deadline;
        EXIT WHEN NOT coalesce((SELECT o.forget_at FROM orphan_cleanup.objects AS o
                                WHERE o.handouts > 0 AND o.kept_at IS NULL
                                ORDER BY o.forget_at LIMIT 1) < now(), false);
        -- Locked first, checked in a second statement: its snapshot is taken after the locks, so
        -- a job write that committed before them is seen (one in flight holds the row: skipped).
        SELECT array_agg(l.bucket), array_agg(l.object_path) INTO v_buckets, v_paths
        FROM (SELECT o2.bucket, o2.object_path FROM orphan_cleanup.objects AS o2
              WHERE o2.handouts > 0 AND o2.kept_at IS NULL AND o2.forget_at < now()
              ORDER BY o2.forget_at LIMIT 10000
              FOR UPDATE SKIP LOCKED) AS l;
        IF v_paths IS NOT NULL THEN
            -- Audited: from now on a job naming the object can be saved again.
            EXECUTE format($sql$
                WITH forgotten AS (
                    DELETE FROM orphan_cleanup.objects AS o
                    USING unnest($1::text[], $2::text[]) AS k(bucket, object_path)
                    WHERE o.bucket = k.bucket AND o.object_path = k.object_path
                      AND o.last_handed_out_at < now() - interval '30 days'
                      AND o.touched_at < now() - interval '1 day'
                      AND NOT EXISTS (SELECT 1 FROM orphan_cleanup.deletion_queue AS d
                                      WHERE d.bucket = o.bucket AND d.object_path = o.object_path
                                        AND d.state IN ('pending', 'claimed', 'dead'))
                      AND NOT EXISTS (SELECT 1 FROM %s AS j
                                      WHERE orphan_cleanup.object_keys(j.output_url) && orphan_cleanup._names_of(o.bucket || '/' || o.object_path))
                    RETURNING o.*)
                INSERT INTO orphan_cleanup.audit_log (action, queue_id, output_url, actor, detail)
                SELECT 'forgotten', f.last_queue_id, f.bucket || '/' || f.object_path, $3,
                       format('the record of object %%s/%%s (handed out %%s time(s), last by %%s at %%s) is pruned after 30 days with no job naming it: a job naming it can be saved again',
                              f.bucket, f.object_path, f.handouts, f.last_handed_to, f.last_handed_out_at)
                FROM forgotten AS f
                $sql$, att.jobs_oid::regclass)
            USING v_buckets, v_paths, actor;
            -- The ones something still names (or touched in the last day): looked at a day on.
            UPDATE orphan_cleanup.objects AS o SET forget_at = now() + interval '1 day'
            FROM unnest(v_buckets, v_paths) AS k(bucket, object_path)
            WHERE o.bucket = k.bucket AND o.object_path = k.object_path;
        END IF;
        EXIT WHEN coalesce(cardinality(v_paths), 0) < 10000;
    END LOOP;

    FOR batch IN 1 .. 40 LOOP
        EXIT WHEN batch > 1 AND clock_timestamp() >= deadline;
        EXIT WHEN NOT coalesce((SELECT f.touched_at FROM orphan_cleanup.job_fences AS f
                                ORDER BY f.touched_at LIMIT 1) < now() - interval '1 day', false);
        DELETE FROM orphan_cleanup.job_fences AS f
        WHERE f.job_id IN (SELECT f2.job_id FROM orphan_cleanup.job_fences AS f2
                           WHERE f2.touched_at < now() - interval '1 day'
                           ORDER BY f2.touched_at LIMIT 10000 FOR UPDATE SKIP LOCKED);
        GET DIAGNOSTICS v_n = ROW_COUNT;
        EXIT WHEN v_n < 10000;
    END LOOP;
END
$$;

CREATE FUNCTION orphan_cleanup._keep_jobs(att orphan_cleanup.attachment, ids bigint[], locked uuid[], actor text) RETURNS void
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp SET jit = off
AS $$
BEGIN
    EXECUTE format($sql$
        WITH why AS (
            SELECT q.id,
                   CASE WHEN orphan_cleanup.object_key(j.output_url) IS DISTINCT FROM q.bucket || '/' || q.object_path
                        THEN 'the job''s output_url names another object now'
                        WHEN j.status::text IS DISTINCT FROM 'completed'
                        THEN format('the job is no longer completed (status %%s)', coalesce(j.status::text, 'NULL'))
                        ELSE 'the job is referenced by an asset' END AS reason
            FROM orphan_cleanup.deletion_queue AS q
            JOIN unnest($2::uuid[]) AS lk(id) ON lk.id = q.job_id
            JOIN %1$s AS j ON j.id = lk.id
            WHERE q.id = ANY ($1) AND q.job_cleanup LIKE 'pending%%'
        ),
        kept AS (
            UPDATE orphan_cleanup.deletion_queue AS d
               SET job_cleanup = 'nothing to do: ' || w.reason
              FROM why AS w
             WHERE d.id = w.id
            RETURNING d.id, d.job_id, d.output_url, w.reason
        )
        INSERT INTO orphan_cleanup.audit_log (action, job_id, queue_id, output_url, actor, detail)
        SELECT 'job_cleanup', k.job_id, k.id, k.output_url, $3, 'job row kept: ' || k.reason FROM kept AS k
        $sql$, att.jobs_oid::regclass)
    USING ids, locked, actor;
END
$$;

CREATE FUNCTION orphan_cleanup._write_jobs(rel regclass, mode text, ids uuid[]) RETURNS bigint
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    n bigint;
BEGIN
    IF mode = 'delete' THEN
        EXECUTE format('DELETE FROM %s AS j USING unnest($1::uuid[]) AS k(id) WHERE j.id = k.id', rel) USING ids;
    ELSE
        EXECUTE format('UPDATE %s AS j SET output_url = NULL FROM unnest($1::uuid[]) AS k(id) WHERE j.id = k.id', rel) USING ids;
    END IF;
    GET DIAGNOSTICS n = ROW_COUNT;
    RETURN n;
END
$$;

CREATE FUNCTION orphan_cleanup._own_job_writer(rel regclass) RETURNS void
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp SET jit = off
AS $$
DECLARE
    fn regprocedure := 'orphan_cleanup._write_jobs(regclass, text, uuid[])'::regprocedure;
    v_owner oid := (SELECT c.relowner FROM pg_catalog.pg_class AS c WHERE c.oid = rel);
BEGIN
    -- Its catalog row, locked until this transaction ends: whoever owns the function (a role
    -- that would also need USAGE on this schema) cannot make it SECURITY INVOKER between this
    -- check and the write that follows, which would then run as the caller, a superuser. An
    -- owner who is no superuser (the managed edition on a hosted platform) may not lock catalog
    -- rows, and needs no such lock: the caller is then that owner, with no more rights.
    IF pg_catalog.has_table_privilege('pg_catalog.pg_proc', 'UPDATE') THEN
        PERFORM 1 FROM pg_catalog.pg_proc AS p WHERE p.oid = fn FOR SHARE;
    END IF;
    IF NOT (SELECT p.prosecdef FROM pg_catalog.pg_proc AS p WHERE p.oid = fn) THEN
        EXECUTE format('ALTER FUNCTION %s SECURITY DEFINER', fn);
    END IF;
    IF (SELECT p.proowner FROM pg_catalog.pg_proc AS p WHERE p.oid = fn) IS DISTINCT FROM v_owner THEN
        EXECUTE format('ALTER FUNCTION %s OWNER TO %I', fn, v_owner::regrole::text);
    END IF;
END
$$;

CREATE OR REPLACE FUNCTION orphan_cleanup._cleanup_jobs(ids bigint[], mode text, actor text) RETURNS void
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp SET jit = off SET lock_timeout = '2s'
AS $$
DECLARE
    v_busy boolean := false;
    att orphan_cleanup.attachment;
    v_named uuid[];
    v_locked uuid[];
    v_exist uuid[];
    v_qids bigint[];
    v_jids uuid[];
    r record;
    v_msg text;
    v_done text := CASE WHEN mode = 'delete' THEN 'job row deleted' ELSE 'output_url cleared' END;
BEGIN
    IF ids IS NULL OR cardinality(ids) = 0 THEN
        RETURN;
    END IF;
    SELECT * INTO att FROM orphan_cleanup.attachment;
    IF NOT FOUND THEN
        UPDATE orphan_cleanup.deletion_queue AS d SET job_cleanup = 'pending: not attached'
         WHERE d.id = ANY (ids) AND d.job_cleanup LIKE 'pending%';
        RETURN;
    END IF;
    -- Without the indexes the re-check below reads the assets table for every job: the rows wait
    -- (the deletions themselves are recorded), and the first cycle once the indexes exist does it.
    IF orphan_cleanup._index_problem(att.jobs_oid, att.assets_oid, att.age_column, with_scan => false) IS NOT NULL THEN
        UPDATE orphan_cleanup.deletion_queue AS d
           SET job_cleanup = 'pending: waiting for the indexes pg_orphan_cleanup relies on (see health())'
         WHERE d.id = ANY (ids) AND d.job_cleanup LIKE 'pending%';
        RETURN;
    END IF;
    -- The jobs first, then their rows: each statement reads one table by key. As one join, with
    -- statistics taken while both tables were being filled, the planner read the whole queue
    -- for every job (195 s for a 1,000-row confirm of a 30,000-row queue).
    SELECT array_agg(DISTINCT d.job_id) INTO v_named
    FROM orphan_cleanup.deletion_queue AS d WHERE d.id = ANY (ids);
    EXECUTE format($sql$
        SELECT array_agg(l.id) FROM (
            SELECT j.id FROM %s AS j WHERE j.id = ANY ($1)
            FOR UPDATE SKIP LOCKED) AS l
        $sql$, att.jobs_oid::regclass) INTO v_locked USING v_named;
    EXECUTE format($sql$
        SELECT array_agg(j.id) FROM %s AS j WHERE j.id = ANY ($1)
        $sql$, att.jobs_oid::regclass) INTO v_exist USING v_named;
    v_locked := coalesce(v_locked, '{}');
    v_exist := coalesce(v_exist, '{}');

    -- The locked jobs that are still the completed, unreferenced jobs naming the confirmed
    -- objects. Sets are joined, never searched: `j.id = ANY ($2)` in an index condition
    -- re-sorted the whole array on every probe (3 to 4 s for a 4,000-row confirm at 1M jobs).
    EXECUTE format($sql$
        SELECT array_agg(q.id ORDER BY q.id), array_agg(q.job_id ORDER BY q.id)
        FROM orphan_cleanup.deletion_queue AS q
        JOIN unnest($2::uuid[]) AS lk(id) ON lk.id = q.job_id
        JOIN %1$s AS j ON j.id = lk.id
        WHERE q.id = ANY ($1) AND q.job_cleanup LIKE 'pending%%'
          AND orphan_cleanup.object_key(j.output_url) = q.bucket || '/' || q.object_path
          AND j.status::text = 'completed'
          AND NOT EXISTS (SELECT 1 FROM %2$s AS a WHERE orphan_cleanup.job_ref_key(a.metadata ->> 'render_job_id') = j.id::text)
        $sql$, att.jobs_oid::regclass, att.assets_oid::regclass)
    INTO v_qids, v_jids USING ids, v_locked;
    -- The other locked jobs keep their rows, and the queue rows say why.
    PERFORM orphan_cleanup._keep_jobs(att, ids, ARRAY(SELECT unnest(v_locked) EXCEPT SELECT unnest(v_jids)), actor);

    -- The whole batch in one write; row by row, with the fallback, only if it fails.
    IF v_jids IS NOT NULL THEN
        PERFORM orphan_cleanup._own_job_writer(att.jobs_oid);
        BEGIN
            PERFORM orphan_cleanup._write_jobs(att.jobs_oid, mode, v_jids);
            WITH done AS (
                UPDATE orphan_cleanup.deletion_queue AS d SET job_cleanup = v_done
                  FROM unnest(v_qids) AS k(id) WHERE d.id = k.id
                RETURNING d.id, d.job_id, d.output_url)
            INSERT INTO orphan_cleanup.audit_log (action, job_id, queue_id, output_url, actor, detail)
            SELECT 'job_cleanup', x.job_id, x.id, x.output_url, actor, v_done FROM done AS x;
        EXCEPTION WHEN OTHERS THEN
            NULL;  -- some row cannot be cleaned up this way (a foreign key): the loop below says which
        END;
        FOR r IN
            SELECT x.qid, x.jid, d.output_url
            FROM unnest(v_qids, v_jids) AS x(qid, jid)
            JOIN orphan_cleanup.deletion_queue AS d ON d.id = x.qid
            WHERE d.job_cleanup LIKE 'pending%'
            ORDER BY x.qid
        LOOP
            CONTINUE WHEN v_busy;
            BEGIN
                PERFORM orphan_cleanup._write_jobs(att.jobs_oid, mode, ARRAY[r.jid]);
                UPDATE orphan_cleanup.deletion_queue AS d SET job_cleanup = v_done WHERE d.id = r.qid;
                INSERT INTO orphan_cleanup.audit_log (action, job_id, queue_id, output_url, actor, detail)
                VALUES ('job_cleanup', r.jid, r.qid, r.output_url, actor, v_done);
            EXCEPTION WHEN lock_not_available OR deadlock_detected OR serialization_failure THEN
                -- Transient (a lock the app's triggers or cascades wait for): the cycles retry it.
                GET STACKED DIAGNOSTICS v_msg = MESSAGE_TEXT;
                UPDATE orphan_cleanup.deletion_queue AS d SET job_cleanup = 'pending: retried after ' || v_msg
                 WHERE d.id = r.qid;
                v_busy := true;
            WHEN OTHERS THEN
                GET STACKED DIAGNOSTICS v_msg = MESSAGE_TEXT;
                BEGIN
                    PERFORM orphan_cleanup._write_jobs(att.jobs_oid, 'clear_url', ARRAY[r.jid]);
                    UPDATE orphan_cleanup.deletion_queue AS d
                       SET job_cleanup = 'output_url cleared because ' || lower(mode) || ' failed: ' || v_msg
                     WHERE d.id = r.qid;
                    INSERT INTO orphan_cleanup.audit_log (action, job_id, queue_id, output_url, actor, detail)
                    VALUES ('job_cleanup', r.jid, r.qid, r.output_url, actor,
                            'job row not deleted (' || v_msg || '); its output_url was cleared instead');
                EXCEPTION WHEN OTHERS THEN
                    GET STACKED DIAGNOSTICS v_msg = MESSAGE_TEXT;
                    UPDATE orphan_cleanup.deletion_queue AS d SET job_cleanup = 'failed: ' || v_msg WHERE d.id = r.qid;
                    INSERT INTO orphan_cleanup.audit_log (action, job_id, queue_id, output_url, actor, detail)
                    VALUES ('job_cleanup', r.jid, r.qid, r.output_url, actor, 'job row cleanup failed: ' || v_msg);
                END;
            END;
        END LOOP;
    END IF;
    UPDATE orphan_cleanup.deletion_queue AS d SET job_cleanup = 'nothing to do: the job row no longer exists'
     WHERE d.id = ANY (ids) AND d.job_cleanup LIKE 'pending%' AND NOT (d.job_id = ANY (v_exist));
    -- The rest are held by another transaction (a save in flight): the next cycle retries them.
END
$$;

CREATE OR REPLACE FUNCTION orphan_cleanup.cancel(ids bigint[])
RETURNS TABLE (id bigint, result text)
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp SET jit = off
AS $$
DECLARE
    v_keep text[];
    v_done bigint[];
BEGIN
    IF ids IS NULL THEN
        RAISE EXCEPTION 'ids must not be NULL' USING ERRCODE = 'invalid_parameter_value';
    END IF;
    -- The objects' rows, locked: a claim of them waits for this, or this for the claim.
    INSERT INTO orphan_cleanup.objects AS o (bucket, object_path)
    SELECT DISTINCT d.bucket, d.object_path FROM orphan_cleanup.deletion_queue AS d
    WHERE d.id = ANY (ids) AND d.state IN ('pending', 'dead') AND d.bucket IS NOT NULL
    ON CONFLICT (bucket, object_path) DO NOTHING;
    WITH locked AS (
        SELECT o.bucket, o.object_path, o.handouts
        FROM orphan_cleanup.objects AS o
        WHERE (o.bucket, o.object_path) IN (SELECT d.bucket, d.object_path FROM orphan_cleanup.deletion_queue AS d
                                            WHERE d.id = ANY (ids) AND d.state IN ('pending', 'dead'))
        ORDER BY o.bucket, o.object_path
        FOR UPDATE OF o
    ),
    kept AS (
        UPDATE orphan_cleanup.objects AS o
           SET kept_at = coalesce(o.kept_at, now()), kept_by = coalesce(o.kept_by, session_user::text), touched_at = now()
          FROM locked AS l
         WHERE o.bucket = l.bucket AND o.object_path = l.object_path AND l.handouts = 0
        RETURNING o.bucket || '/' || o.object_path AS key
    )
    SELECT array_agg(k.key) INTO v_keep FROM kept AS k;
    v_keep := coalesce(v_keep, '{}');
    WITH cancelled AS (
        UPDATE orphan_cleanup.deletion_queue AS d
           SET state = 'cancelled', reason = format('cancelled by %s', session_user), finished_at = now(), updated_at = now()
         WHERE d.state IN ('pending', 'dead')
           AND (d.id = ANY (ids) OR (d.bucket || '/' || d.object_path) = ANY (v_keep))
        RETURNING d.id, d.job_id, d.output_url, (d.bucket || '/' || d.object_path) = ANY (v_keep) AS kept
    ),
    audited AS (
        INSERT INTO orphan_cleanup.audit_log (action, job_id, queue_id, output_url, actor, detail)
        SELECT 'cancelled', c.job_id, c.id, c.output_url, session_user,
               CASE WHEN NOT c.kept THEN 'cancelled by a DBA after its object had been handed to a reaper: it may be deleted, and no job naming it can be saved'
                    WHEN c.id = ANY (ids) THEN 'cancelled by a DBA; its object is kept'
                    ELSE 'cancelled by a DBA with a row naming the same object; the object is kept' END
        FROM cancelled AS c
    )
    SELECT array_agg(c.id) INTO v_done FROM cancelled AS c;
    v_done := coalesce(v_done, '{}');
    RETURN QUERY
    SELECT i.id,
           CASE WHEN i.id = ANY (v_done) AND o.handouts > 0
                THEN format('cancelled, but its object %s/%s was already handed to a reaper (row %s, by %s at %s) and may be deleted; no job naming it can be saved',
                            o.bucket, o.object_path, o.last_queue_id, o.last_handed_to, o.last_handed_out_at)
                WHEN i.id = ANY (v_done) THEN 'cancelled'
                WHEN d.id IS NULL THEN 'not cancelled: no such queue row'
                WHEN d.state = 'claimed' THEN format('not cancelled: claimed by %s until %s; its object may already be deleted', d.claimed_by, d.lease_until)
                ELSE format('not cancelled: the row is already %s', d.state) END
    FROM unnest(ids) WITH ORDINALITY AS i(id, n)
    LEFT JOIN orphan_cleanup.deletion_queue AS d ON d.id = i.id
    LEFT JOIN orphan_cleanup.objects AS o ON o.bucket = d.bucket AND o.object_path = d.object_path
    UNION ALL
    SELECT x.id, 'cancelled: names the same object as a row you cancelled'
    FROM unnest(v_done) AS x(id)
    WHERE NOT (x.id = ANY (ids));
END
$$;

CREATE FUNCTION orphan_cleanup.cancel_prefix(bucket text, prefix text)
RETURNS TABLE (id bigint, result text)
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp SET jit = off
AS $$
BEGIN
    IF bucket IS NULL OR prefix IS NULL THEN
        RAISE EXCEPTION 'bucket and prefix must not be NULL (use '''' as the prefix for the whole bucket)'
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    RETURN QUERY
    SELECT c.id, c.result
    FROM orphan_cleanup.cancel(ARRAY(SELECT d.id FROM orphan_cleanup.deletion_queue AS d
                                     WHERE d.bucket = cancel_prefix.bucket AND d.state IN ('pending', 'dead', 'claimed')
                                       AND pg_catalog.starts_with(d.object_path, cancel_prefix.prefix)
                                     ORDER BY d.id)) AS c;
END
$$;

CREATE OR REPLACE FUNCTION orphan_cleanup.requeue_dead(ids bigint[] DEFAULT NULL) RETURNS bigint
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp SET jit = off
AS $$
DECLARE
    n bigint;
    skipped text;
BEGIN
    WITH candidate AS (
        -- Each dead row asked for, with what keeps it dead: a live row of its job, or a dead row
        -- of its job with a smaller id that is requeued now. One rule for both the update and
        -- the NOTICE.
        SELECT d.id, d.job_id, b.id AS blocker, b.state AS blocker_state
        FROM orphan_cleanup.deletion_queue AS d
        LEFT JOIN LATERAL (SELECT l.id, l.state FROM orphan_cleanup.deletion_queue AS l
                           WHERE (l.job_id = d.job_id
                                  OR (d.job_id IS NULL AND l.job_id IS NULL AND l.bucket = d.bucket AND l.object_path = d.object_path))
                             AND (l.state IN ('pending', 'claimed')
                                  OR (l.state = 'dead' AND l.id < d.id AND (ids IS NULL OR l.id = ANY (ids))))
                           ORDER BY l.state = 'dead', l.id LIMIT 1) AS b ON true
        WHERE d.state = 'dead' AND (ids IS NULL OR d.id = ANY (ids))
    ),
    requeued AS (
        UPDATE orphan_cleanup.deletion_queue AS d
           SET state = 'pending', attempts = 0, available_at = now(), finished_at = NULL, updated_at = now()
          FROM candidate AS c
         WHERE d.id = c.id AND c.blocker IS NULL
        RETURNING d.id, d.job_id, d.output_url, d.last_error
    ),
    audited AS (
        INSERT INTO orphan_cleanup.audit_log (action, job_id, queue_id, output_url, actor, detail)
        SELECT 'requeued', r.job_id, r.id, r.output_url, session_user, 'last error: ' || coalesce(r.last_error, 'none')
        FROM requeued AS r
    )
    SELECT (SELECT count(*) FROM requeued),
           (SELECT string_agg(format('row %s (%s already has row %s %s)', c.id,
                                     coalesce('job ' || c.job_id, 'its stray object'), c.blocker,
                                     CASE WHEN c.blocker_state = 'dead' THEN 'requeued' ELSE c.blocker_state END),
                              ', ' ORDER BY c.id)
            FROM candidate AS c WHERE c.blocker IS NOT NULL)
      INTO n, skipped;
    IF skipped IS NOT NULL THEN
        RAISE NOTICE 'requeue_dead() skipped %', skipped
            USING HINT = 'A job has one live row at a time; these stay dead.';
    END IF;
    IF n > 0 THEN
        PERFORM pg_catalog.pg_notify('orphan_cleanup_queue', n::text);
    END IF;
    RETURN n;
END
$$;

-- An attached database gets the jobs table's guard now, as attach() installs it, its truncate
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

-- A pruned hand-out record is audited ('forgotten'); the managed edition audits setting
-- changes ('setting_changed'), and both editions share this table.
ALTER TABLE orphan_cleanup.audit_log DROP CONSTRAINT audit_log_action_check;
ALTER TABLE orphan_cleanup.audit_log ADD CONSTRAINT audit_log_action_check
    CHECK (action IN ('enqueued', 'protected', 'rejected', 'claimed', 'deleted',
                      'absent', 'failed', 'dead_lettered', 'rescued', 'refused',
                      'cancelled', 'released', 'requeued', 'job_cleanup', 'attached', 'detached',
                      'breaker_tripped', 'breaker_reset', 'forgotten', 'setting_changed'));


-- The guard watcher: no DDL may leave the attached tables without their exact guards while
-- reapers hold claims.
CREATE EVENT TRIGGER orphan_cleanup_guard_watch ON ddl_command_end
    WHEN TAG IN ('ALTER TABLE', 'DROP TRIGGER', 'CREATE TRIGGER', 'ALTER TRIGGER', 'CREATE TABLE', 'CREATE SCHEMA', 'CREATE FOREIGN TABLE')
    EXECUTE FUNCTION orphan_cleanup._watch_guards();
ALTER EVENT TRIGGER orphan_cleanup_guard_watch ENABLE ALWAYS;


CREATE OR REPLACE FUNCTION orphan_cleanup.job_ref_key(ref text) RETURNS text
LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE
RETURN pg_catalog.regexp_replace(
    coalesce(
        pg_catalog.replace(
            (pg_catalog.regexp_match(pg_catalog.lower(ref),
                '(?:^|[^0-9a-f])([0-9a-f]{8}-?[0-9a-f]{4}-?[0-9a-f]{4}-?[0-9a-f]{4}-?[0-9a-f]{12})(?![0-9a-f])'))[1],
            '-', ''),
        (pg_catalog.regexp_match(pg_catalog.replace(pg_catalog.lower(ref), '-', ''), '[0-9a-f]{32}'))[1]),
    '^(.{8})(.{4})(.{4})(.{4})(.{12})$', '\1-\2-\3-\4-\5');

-- job_ref_key() now finds a job's id in more spellings (a no-break space, urn:uuid:, an id
-- JSON-encoded twice), where 0.1.0 returned NULL: rebuild the assets table's indexes on it when
-- any row is read differently now, or the keeper checks would miss those references.
DO $reindex_refs$
DECLARE
    att orphan_cleanup.attachment;
    stale boolean;
    ix regclass;
BEGIN
    SELECT * INTO att FROM orphan_cleanup.attachment;
    IF NOT FOUND OR NOT EXISTS (SELECT 1 FROM pg_catalog.pg_class WHERE oid = att.assets_oid) THEN
        RETURN;
    END IF;
    EXECUTE format($q$SELECT EXISTS (SELECT 1 FROM %s AS a
                                     WHERE orphan_cleanup.job_ref_key(a.metadata ->> 'render_job_id') IS NOT NULL
                                       AND pg_catalog.replace(pg_catalog.lower(pg_catalog.btrim(a.metadata ->> 'render_job_id', E' \t\r\n{}')), '-', '')
                                           !~ '^[0-9a-f]{32}$')$q$, att.assets_oid::regclass)
       INTO stale;
    IF NOT stale THEN
        RETURN;
    END IF;
    -- A partitioned table's index cannot be rebuilt in a transaction: its partitions' can.
    FOR ix IN SELECT coalesce(t.relid, i.indexrelid)::regclass FROM pg_catalog.pg_index AS i
              LEFT JOIN LATERAL pg_catalog.pg_partition_tree(i.indexrelid) AS t ON true
              WHERE i.indrelid = att.assets_oid AND pg_catalog.pg_get_indexdef(i.indexrelid) LIKE '%job_ref_key(%'
                AND (t.relid IS NULL OR t.isleaf)
    LOOP
        RAISE NOTICE 'rebuilding index % (job_ref_key() now reads more spellings of a job id)', ix;
        EXECUTE format('REINDEX INDEX %s', ix);
    END LOOP;
END
$reindex_refs$;


-- object_key() now reads a URL the strict parser refuses leniently (the object it could name),
-- where 0.1.0 returned NULL. An index on it built by 0.1.0 holds NULL for such rows, and the
-- keeper checks would miss them: rebuild the jobs table's object_key() indexes when it has any
-- such row. (REINDEX holds writes to the jobs table while it runs: a few seconds per million
-- rows; the lock_timeout above still applies to taking the lock.)
DO $reindex$
DECLARE
    att orphan_cleanup.attachment;
    stale boolean;
    ix regclass;
BEGIN
    SELECT * INTO att FROM orphan_cleanup.attachment;
    IF NOT FOUND OR NOT EXISTS (SELECT 1 FROM pg_catalog.pg_class WHERE oid = att.jobs_oid) THEN
        RETURN;
    END IF;
    EXECUTE format('SELECT EXISTS (SELECT 1 FROM %s AS j CROSS JOIN LATERAL orphan_cleanup.parse_output_url(j.output_url) AS p
                                   WHERE j.output_url IS NOT NULL AND p.error IS NOT NULL
                                     AND orphan_cleanup.object_key(j.output_url) IS NOT NULL)', att.jobs_oid::regclass)
       INTO stale;
    IF NOT stale THEN
        RETURN;
    END IF;
    -- A partitioned table's index cannot be rebuilt in a transaction: its partitions' can.
    FOR ix IN SELECT coalesce(t.relid, i.indexrelid)::regclass FROM pg_catalog.pg_index AS i
              LEFT JOIN LATERAL pg_catalog.pg_partition_tree(i.indexrelid) AS t ON true
              WHERE i.indrelid = att.jobs_oid AND pg_catalog.pg_get_indexdef(i.indexrelid) LIKE '%object_key(%'
                AND (t.relid IS NULL OR t.isleaf)
    LOOP
        RAISE NOTICE 'rebuilding index % (object_key() now names the object of URLs the strict parser refuses)', ix;
        EXECUTE format('REINDEX INDEX %s', ix);
    END LOOP;
END
$reindex$;



-- The savings ledger (issue 15).

CREATE TABLE orphan_cleanup.savings_ledger (
    day           date NOT NULL,
    kind          text NOT NULL CHECK (kind IN ('orphan', 'stray')),
    found         bigint NOT NULL DEFAULT 0,
    found_bytes   bigint NOT NULL DEFAULT 0,
    deleted       bigint NOT NULL DEFAULT 0,
    deleted_bytes bigint NOT NULL DEFAULT 0,
    PRIMARY KEY (day, kind)
);

SELECT pg_catalog.pg_extension_config_dump('orphan_cleanup.savings_ledger', '');
REVOKE ALL ON orphan_cleanup.savings_ledger FROM PUBLIC;

CREATE FUNCTION orphan_cleanup.savings_report(period text DEFAULT 'week', periods integer DEFAULT 8)
RETURNS TABLE (period_start date, objects_reclaimed bigint, bytes_reclaimed numeric, orphans_found bigint,
               strays_found bigint, leak_bytes_per_day numeric, bytes_still_queued numeric, monthly_saving numeric,
               queue_depth bigint)
LANGUAGE plpgsql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp SET jit = off
AS $$
DECLARE
    v_price float8 := (SELECT c.storage_price_per_gb_month FROM orphan_cleanup._config() AS c);
    v_unit interval;
    v_today date := (now() AT TIME ZONE 'UTC')::date;
    v_first date;
    v_since timestamptz;
    v_queued numeric;
BEGIN
    IF period IS NULL OR period NOT IN ('day', 'week') THEN
        RAISE EXCEPTION 'period must be ''day'' or ''week'', got %', coalesce(quote_literal(period), 'NULL')
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF periods IS NULL OR periods < 1 OR periods > 3660 THEN
        RAISE EXCEPTION 'periods must be between 1 and 3660, got %', coalesce(periods::text, 'NULL')
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    v_unit := CASE period WHEN 'day' THEN interval '1 day' ELSE interval '7 days' END;
    v_first := (date_trunc(period, v_today::timestamp) - v_unit * (periods - 1))::date;
    v_since := v_first::timestamp AT TIME ZONE 'UTC';
    IF orphan_cleanup._inventory_problem() IS NULL THEN
        EXECUTE format($sql$
            SELECT sum((o.metadata ->> 'size')::bigint)
            FROM orphan_cleanup.deletion_queue AS d
            JOIN %s AS o ON o.bucket_id = d.bucket AND o.name = d.object_path
            WHERE d.state IN ('pending', 'claimed', 'dead')
            $sql$, orphan_cleanup._inventory()) INTO v_queued;
        v_queued := coalesce(v_queued, 0);
    END IF;
    RETURN QUERY
    WITH days AS (
        SELECT l.day, l.kind, l.found, l.found_bytes, l.deleted, l.deleted_bytes
        FROM orphan_cleanup.savings_ledger AS l WHERE l.day >= v_first
        UNION ALL
        SELECT (d.enqueued_at AT TIME ZONE 'UTC')::date, d.kind, 1, coalesce(d.bytes, 0), 0, 0
        FROM orphan_cleanup.deletion_queue AS d WHERE d.enqueued_at >= v_since
        UNION ALL
        SELECT (d.finished_at AT TIME ZONE 'UTC')::date, d.kind, 0, 0, 1, coalesce(d.bytes, 0)
        FROM orphan_cleanup.deletion_queue AS d WHERE d.state = 'deleted' AND d.finished_at >= v_since
    ), p AS (
        SELECT g::date AS start FROM generate_series(v_first::timestamp, v_today::timestamp, v_unit) AS g
    ), waiting AS (
        -- Waiting when the report starts, then +1 for each row queued and -1 for each finished.
        SELECT count(*) AS n FROM orphan_cleanup.deletion_queue AS d
        WHERE d.state <> 'rejected' AND d.enqueued_at < v_since AND (d.finished_at IS NULL OR d.finished_at >= v_since)
    ), moves AS (
        SELECT (d.enqueued_at AT TIME ZONE 'UTC')::date AS day, 1 AS n
        FROM orphan_cleanup.deletion_queue AS d WHERE d.state <> 'rejected' AND d.enqueued_at >= v_since
        UNION ALL
        SELECT (d.finished_at AT TIME ZONE 'UTC')::date, -1
        FROM orphan_cleanup.deletion_queue AS d WHERE d.state <> 'rejected' AND d.finished_at >= v_since
    ), depth AS (
        SELECT p.start, (SELECT w.n FROM waiting AS w) + sum(coalesce(sum(m.n), 0)) OVER (ORDER BY p.start) AS n
        FROM p LEFT JOIN moves AS m ON m.day >= p.start AND m.day < p.start + v_unit
        GROUP BY p.start
    )
    SELECT p.start,
           coalesce(sum(x.deleted), 0)::bigint,
           coalesce(sum(x.deleted_bytes), 0)::numeric,
           coalesce(sum(x.found) FILTER (WHERE x.kind = 'orphan'), 0)::bigint,
           coalesce(sum(x.found) FILTER (WHERE x.kind = 'stray'), 0)::bigint,
           -- The leak is new orphans: strays are what leaked before.
           round(coalesce(sum(x.found_bytes) FILTER (WHERE x.kind = 'orphan'), 0)::numeric
                 / LEAST(extract(day FROM v_unit)::int, v_today - p.start + 1), 1),
           CASE WHEN p.start + v_unit > v_today THEN v_queued END,
           round(coalesce(sum(x.deleted_bytes), 0)::numeric / 1073741824 * v_price::numeric, 2),
           (SELECT dp.n FROM depth AS dp WHERE dp.start = p.start)::bigint
    FROM p
    LEFT JOIN days AS x ON x.day >= p.start AND x.day < p.start + v_unit
    GROUP BY p.start
    ORDER BY p.start;
END
$$;

-- Stray objects (issue 15): preview_strays() reads storage.objects.

-- Cycles reconcile strays: where their passes have got to, and what each cycle did.
ALTER TABLE orphan_cleanup.detector_state
    ADD COLUMN stray_pass_started_at timestamptz, ADD COLUMN stray_pass_bucket text, ADD COLUMN stray_pass_name text,
    ADD COLUMN stray_seen_ts timestamptz, ADD COLUMN stray_seen_id uuid;
ALTER TABLE orphan_cleanup.cycle_log
    ADD COLUMN strays_scanned bigint NOT NULL DEFAULT 0, ADD COLUMN strays_enqueued bigint NOT NULL DEFAULT 0,
    ADD COLUMN stray_pass text, ADD COLUMN stray_ms numeric;

-- The Storage API's inventory, where storage.objects is not in this database (sql/inventory.sql).

CREATE TABLE orphan_cleanup.inventory_listings (
    id          bigserial PRIMARY KEY,
    bucket      text NOT NULL,
    listed_by   text NOT NULL,
    started_at  timestamptz NOT NULL DEFAULT now(),
    finished_at timestamptz,
    objects     bigint NOT NULL DEFAULT 0,
    removed     bigint
);

-- The objects the listings saw, as storage.objects would hold them. `version` is not in the
-- API's answer: it is the eTag and the time of the last upload, so that an object uploaded again
-- (an upsert keeps its id) is another version, and a queued stray of the old one goes stale.
CREATE TABLE orphan_cleanup.object_inventory (
    bucket_id  text NOT NULL,
    name       text NOT NULL,
    id         uuid NOT NULL,
    version    text,
    metadata   jsonb,
    created_at timestamptz NOT NULL,
    updated_at timestamptz,
    listing    bigint NOT NULL,
    PRIMARY KEY (bucket_id, name)
);
-- Looks by creation time between full passes (see _reconcile_strays()).
CREATE INDEX object_inventory_created_at ON orphan_cleanup.object_inventory (created_at, id);

SELECT pg_catalog.pg_extension_config_dump('orphan_cleanup.inventory_listings', '');
SELECT pg_catalog.pg_extension_config_dump('orphan_cleanup.inventory_listings_id_seq', '');
SELECT pg_catalog.pg_extension_config_dump('orphan_cleanup.object_inventory', '');

REVOKE ALL ON orphan_cleanup.inventory_listings, orphan_cleanup.object_inventory FROM PUBLIC;
REVOKE ALL ON SEQUENCE orphan_cleanup.inventory_listings_id_seq FROM PUBLIC;

CREATE FUNCTION orphan_cleanup.inventory_buckets() RETURNS SETOF text
LANGUAGE plpgsql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    PERFORM orphan_cleanup._no_api_inventory_here();
    RETURN QUERY SELECT unnest(orphan_cleanup._allowed_bucket_list());
END
$$;

CREATE FUNCTION orphan_cleanup._no_api_inventory_here() RETURNS void
LANGUAGE plpgsql STABLE SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    IF pg_catalog.to_regclass('storage.objects') IS NOT NULL THEN
        RAISE EXCEPTION 'storage.objects is in this database: reconciliation reads it, and needs no listing through the Storage API'
            USING ERRCODE = 'object_not_in_prerequisite_state',
                  HINT = 'Stop `reaper inventory`; SELECT * FROM orphan_cleanup.health() shows whether strays can be read.';
    END IF;
END
$$;

CREATE FUNCTION orphan_cleanup.inventory_begin(worker text, bucket text) RETURNS bigint
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_id bigint;
BEGIN
    PERFORM orphan_cleanup._check_worker(worker);
    PERFORM orphan_cleanup._no_api_inventory_here();
    IF bucket IS NULL OR NOT bucket = ANY (orphan_cleanup._allowed_bucket_list()) THEN
        RAISE EXCEPTION 'bucket % is not in orphan_cleanup.allowed_buckets (%): only allowed buckets are listed',
                        coalesce(quote_literal(bucket), 'NULL'), array_to_string(orphan_cleanup._allowed_bucket_list(), ', ')
            USING ERRCODE = 'invalid_parameter_value',
                  HINT = 'List the buckets SELECT * FROM orphan_cleanup.inventory_buckets() returns (reaper inventory does).';
    END IF;
    INSERT INTO orphan_cleanup.inventory_listings (bucket, listed_by) VALUES (bucket, worker) RETURNING id INTO v_id;
    RETURN v_id;
END
$$;

CREATE FUNCTION orphan_cleanup._open_listing(listing bigint) RETURNS orphan_cleanup.inventory_listings
LANGUAGE plpgsql STABLE SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    l orphan_cleanup.inventory_listings;
BEGIN
    SELECT * INTO l FROM orphan_cleanup.inventory_listings AS i WHERE i.id = listing;
    IF NOT FOUND OR l.finished_at IS NOT NULL THEN
        RAISE EXCEPTION 'listing % is %', coalesce(listing::text, 'NULL'), CASE WHEN l.id IS NULL THEN 'unknown' ELSE 'finished' END
            USING ERRCODE = 'invalid_parameter_value',
                  HINT = 'Begin a listing with inventory_begin(worker, bucket) and pass the id it returns.';
    END IF;
    RETURN l;
END
$$;

CREATE FUNCTION orphan_cleanup.inventory_add(listing bigint, objects jsonb) RETURNS integer
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    l orphan_cleanup.inventory_listings;
    v_bad jsonb;
    n integer;
BEGIN
    l := orphan_cleanup._open_listing(listing);
    IF current_setting('transaction_isolation') <> 'read committed' THEN
        RAISE EXCEPTION 'inventory_add() must run at READ COMMITTED isolation, not %', current_setting('transaction_isolation')
            USING ERRCODE = 'invalid_transaction_state',
                  HINT = 'Its check of what was deleted meanwhile needs a snapshot taken after its lock; call it in its own transaction.';
    END IF;
    IF jsonb_typeof(objects) IS DISTINCT FROM 'array' THEN
        RAISE EXCEPTION 'objects must be a JSON array of objects as POST /object/list answers them, got %',
                        coalesce(jsonb_typeof(objects), 'NULL') USING ERRCODE = 'invalid_parameter_value';
    END IF;
    SELECT o INTO v_bad FROM jsonb_array_elements(objects) AS o
    WHERE jsonb_typeof(o) IS DISTINCT FROM 'object'
       OR coalesce(o ->> 'name', '') = '' OR o ->> 'name' LIKE '%/' OR o ->> 'name' LIKE '/%'
       OR coalesce(o ->> 'id', '') !~* '^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$'
       OR o ->> 'created_at' IS NULL
    LIMIT 1;
    IF v_bad IS NOT NULL THEN
        RAISE EXCEPTION 'not an object of bucket %''s listing (it needs a full name, a uuid id and created_at): %', l.bucket, left(v_bad::text, 300)
            USING ERRCODE = 'invalid_parameter_value',
                  HINT = 'Folders (id null) are listed by their own prefix, not added.';
    END IF;
    -- A confirm() in flight forgets the objects it deleted (a ROW EXCLUSIVE lock on this table):
    -- wait for it, so that the INSERT below, with a snapshot taken after this lock, sees its
    -- deletions and does not bring those objects back (the review of extra references).
    LOCK TABLE orphan_cleanup.object_inventory IN SHARE ROW EXCLUSIVE MODE;
    BEGIN
        INSERT INTO orphan_cleanup.object_inventory AS i (bucket_id, name, id, version, metadata, created_at, updated_at, listing)
        SELECT l.bucket, o ->> 'name', (o ->> 'id')::uuid,
               concat_ws('@', o -> 'metadata' ->> 'eTag', extract(epoch FROM coalesce(o ->> 'updated_at', o ->> 'created_at')::timestamptz)::text),
               o -> 'metadata', (o ->> 'created_at')::timestamptz, (o ->> 'updated_at')::timestamptz, l.id
        FROM (SELECT DISTINCT ON (o ->> 'name') o FROM jsonb_array_elements(objects) AS o) AS p(o)
        WHERE NOT EXISTS (SELECT 1 FROM orphan_cleanup.deletion_queue AS d
                          WHERE d.bucket = l.bucket AND d.object_path = p.o ->> 'name'
                            AND d.state IN ('deleted', 'absent') AND d.finished_at >= l.started_at
                            AND d.finished_at >= greatest((p.o ->> 'created_at')::timestamptz, (p.o ->> 'updated_at')::timestamptz))
        ON CONFLICT (bucket_id, name) DO UPDATE
            SET id = excluded.id, version = excluded.version, metadata = excluded.metadata,
                created_at = excluded.created_at, updated_at = excluded.updated_at, listing = excluded.listing;
        GET DIAGNOSTICS n = ROW_COUNT;
    EXCEPTION WHEN invalid_datetime_format OR datetime_field_overflow OR invalid_text_representation THEN
        RAISE EXCEPTION 'objects of bucket %''s listing must give created_at and updated_at as timestamps: %', l.bucket, SQLERRM
            USING ERRCODE = 'invalid_parameter_value';
    END;
    UPDATE orphan_cleanup.inventory_listings AS i SET objects = i.objects + n WHERE i.id = l.id;
    RETURN n;
END
$$;

CREATE FUNCTION orphan_cleanup.inventory_finish(listing bigint) RETURNS bigint
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    l orphan_cleanup.inventory_listings;
    n bigint;
BEGIN
    l := orphan_cleanup._open_listing(listing);
    DELETE FROM orphan_cleanup.object_inventory AS i WHERE i.bucket_id = l.bucket AND i.listing < l.id;
    GET DIAGNOSTICS n = ROW_COUNT;
    UPDATE orphan_cleanup.inventory_listings AS i
       SET finished_at = now(), removed = CASE WHEN i.id = l.id THEN n END
     WHERE i.bucket = l.bucket AND i.finished_at IS NULL AND i.id <= l.id;
    RETURN n;
END
$$;

CREATE FUNCTION orphan_cleanup._inventory() RETURNS regclass
LANGUAGE plpgsql STABLE SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    IF pg_catalog.to_regclass('storage.objects') IS NOT NULL THEN
        RETURN pg_catalog.to_regclass('storage.objects');
    ELSIF EXISTS (SELECT 1 FROM orphan_cleanup.inventory_listings WHERE finished_at IS NOT NULL) THEN
        RETURN 'orphan_cleanup.object_inventory'::regclass;
    END IF;
    RETURN NULL;
END
$$;

CREATE FUNCTION orphan_cleanup._listing_health(OUT status text, OUT detail text)
LANGUAGE plpgsql STABLE SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_never text;
    v_stale text;
    v_last text;
BEGIN
    SELECT string_agg(b.bucket, ', ') FILTER (WHERE l.finished_at IS NULL),
           string_agg(b.bucket, ', ') FILTER (WHERE l.finished_at < now() - interval '2 days'),
           string_agg(format('%s at %s (%s objects)', b.bucket, date_trunc('second', l.finished_at), l.objects), ', ')
               FILTER (WHERE l.finished_at IS NOT NULL)
      INTO v_never, v_stale, v_last
    FROM unnest(orphan_cleanup._allowed_bucket_list()) AS b(bucket)
    LEFT JOIN LATERAL (SELECT i.finished_at, i.objects FROM orphan_cleanup.inventory_listings AS i
                       WHERE i.bucket = b.bucket AND i.finished_at IS NOT NULL AND i.removed IS NOT NULL
                       ORDER BY i.id DESC LIMIT 1) AS l ON true;
    status := CASE WHEN v_never IS NULL AND v_stale IS NULL THEN 'ok' ELSE 'warning' END;
    detail := concat_ws('; ',
        'reconciled from the listing through the Storage API (reaper inventory), storage.objects not being in this database'
            || coalesce(': last listed ' || v_last, ''),
        'never listed: ' || v_never || ' (run `reaper inventory`)',
        'not listed for two days: ' || v_stale || ' (run `reaper inventory` daily, e.g. from cron)');
END
$$;

-- Extra references: other tables' columns that name objects (sql/references.sql).

CREATE TABLE orphan_cleanup.extra_references (
    table_oid   oid NOT NULL,
    column_name name NOT NULL,
    -- A path inside a json/jsonb column ('{}': the whole value).
    json_path   text[] NOT NULL DEFAULT '{}',
    -- The GIN index on the value's object_keys() every lookup goes through.
    index_oid   oid NOT NULL,
    added_at    timestamptz NOT NULL DEFAULT now(),
    added_by    text NOT NULL DEFAULT current_user,
    PRIMARY KEY (table_oid, column_name, json_path)
);
SELECT pg_catalog.pg_extension_config_dump('orphan_cleanup.extra_references', '');

-- The partitions of reference tables whose rows were looked at: a table attached as a partition
-- (ATTACH PARTITION) brings its rows in without the guard trigger firing, so each new partition
-- has its rows checked as the guard checks a row written (and the objects they name held) by the
-- DDL watch, or by the next cycle where none runs; until then it is not in force (the fifth
-- review of partitions).
CREATE TABLE orphan_cleanup.reference_partitions (
    relid     oid PRIMARY KEY,
    name      text NOT NULL,
    seen_at   timestamptz NOT NULL DEFAULT now()
);
SELECT pg_catalog.pg_extension_config_dump('orphan_cleanup.reference_partitions', '');

REVOKE ALL ON orphan_cleanup.extra_references, orphan_cleanup.reference_partitions FROM PUBLIC;

CREATE FUNCTION orphan_cleanup._reference_partitions() RETURNS TABLE (relid oid, root oid)
LANGUAGE sql STABLE SET search_path = pg_catalog, pg_temp
BEGIN ATOMIC
    SELECT DISTINCT pt.relid, r.table_oid
    FROM orphan_cleanup.extra_references AS r
    JOIN pg_catalog.pg_class AS c ON c.oid = r.table_oid
    CROSS JOIN LATERAL pg_catalog.pg_partition_tree(r.table_oid) AS pt
    WHERE pt.relid <> r.table_oid;
END;

CREATE FUNCTION orphan_cleanup._reference_value(col name, json_path text[], is_text boolean, x text) RETURNS text
LANGUAGE sql IMMUTABLE SET search_path = pg_catalog, pg_temp
RETURN CASE
    WHEN cardinality(json_path) > 0 THEN format('%s.%I #>> %L::text[]', x, col, json_path)
    WHEN is_text THEN format('%s.%I', x, col)
    ELSE format('%s.%I::text', x, col) END;

CREATE FUNCTION orphan_cleanup._reference_list()
RETURNS TABLE (table_oid oid, column_name name, json_path text[], label text, value_sql text, problem text)
LANGUAGE plpgsql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    r orphan_cleanup.extra_references;
    v_type text;
    t record;
BEGIN
    FOR r IN SELECT * FROM orphan_cleanup.extra_references ORDER BY table_oid, column_name, json_path LOOP
        table_oid := r.table_oid;
        column_name := r.column_name;
        json_path := r.json_path;
        problem := NULL;
        value_sql := NULL;
        IF NOT EXISTS (SELECT 1 FROM pg_catalog.pg_class AS c WHERE c.oid = r.table_oid) THEN
            label := format('a dropped table (oid %s).%s', r.table_oid, r.column_name);
            problem := format('%s: the table is gone (fix: SELECT orphan_cleanup.remove_reference(%s, %L))',
                              label, r.table_oid, r.column_name);
            RETURN NEXT;
            CONTINUE;
        END IF;
        label := format('%s.%I', r.table_oid::regclass, r.column_name)
                 || CASE WHEN cardinality(r.json_path) > 0 THEN format(' #>> %L', r.json_path) ELSE '' END;
        SELECT pg_catalog.format_type(a.atttypid, NULL) INTO v_type FROM pg_catalog.pg_attribute AS a
        WHERE a.attrelid = r.table_oid AND a.attname = r.column_name AND a.attnum > 0 AND NOT a.attisdropped;
        IF v_type IS NULL THEN
            problem := format('%s: the column is gone', label);
        ELSIF NOT orphan_cleanup._reference_type_ok(v_type, r.json_path) THEN
            problem := format('%s: the column is %s now', label, v_type);
        ELSE
            value_sql := orphan_cleanup._reference_value(r.column_name, r.json_path, v_type = 'text', 'x');
            IF NOT EXISTS (SELECT 1 FROM pg_catalog.pg_index AS i
                           WHERE i.indexrelid = r.index_oid AND i.indrelid = r.table_oid
                             AND i.indisvalid AND i.indisready AND i.indislive) THEN
                problem := format('%s: its index on orphan_cleanup.object_keys() is gone or not valid (fix: %s, then SELECT orphan_cleanup.add_reference(%L, %L%s))',
                                  label, orphan_cleanup._reference_index_statement(r.table_oid, r.column_name, r.json_path, v_type = 'text'),
                                  r.table_oid::regclass::text, r.column_name,
                                  CASE WHEN cardinality(r.json_path) > 0 THEN format(', %L', array_to_string(r.json_path, '.')) ELSE '' END);
            ELSE
                problem := orphan_cleanup._reference_table_problem(r.table_oid, label, r.column_name);
            END IF;
        END IF;
        RETURN NEXT;
    END LOOP;
END
$$;

CREATE FUNCTION orphan_cleanup._reference_type_ok(col_type text, json_path text[]) RETURNS boolean
LANGUAGE sql IMMUTABLE SET search_path = pg_catalog, pg_temp
RETURN CASE WHEN cardinality(json_path) > 0 THEN col_type IN ('jsonb', 'json')
            ELSE col_type IN ('text', 'character varying') END;

CREATE FUNCTION orphan_cleanup._reference_index_statement(rel oid, col name, json_path text[], is_text boolean) RETURNS text
LANGUAGE sql STABLE SET search_path = pg_catalog, pg_temp
RETURN format('CREATE INDEX CONCURRENTLY %I ON %s USING gin (orphan_cleanup.object_keys(%s)) WITH (fastupdate = off);',
              left((SELECT c.relname FROM pg_catalog.pg_class AS c WHERE c.oid = rel) || '_' || col || '_object_keys_idx', 63),
              rel::regclass,
              CASE WHEN cardinality(json_path) > 0 THEN format('%I #>> %L::text[]', col, json_path)
                   WHEN is_text THEN quote_ident(col) ELSE format('%I::text', col) END);

CREATE FUNCTION orphan_cleanup._reference_problem() RETURNS text
LANGUAGE sql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp
BEGIN ATOMIC
    SELECT string_agg(p.problem, '; ')
    FROM (SELECT l.problem FROM orphan_cleanup._reference_list() AS l WHERE l.problem IS NOT NULL
          UNION ALL
          (SELECT format('partition %s of reference table %s joined it and has not been looked at yet (the next cycle does; if it keeps saying this, SELECT * FROM orphan_cleanup.run_cycle() shows why in a warning)',
                         rp.relid::regclass, rp.root::regclass)
           FROM orphan_cleanup._reference_partitions() AS rp
           WHERE rp.relid NOT IN (SELECT x.relid FROM orphan_cleanup.reference_partitions AS x)
           LIMIT 1)) AS p;
END;

CREATE FUNCTION orphan_cleanup._referenced_by_sql(key_sql text) RETURNS text
LANGUAGE plpgsql STABLE SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v text;
BEGIN
    SELECT string_agg(format('WHEN EXISTS (SELECT 1 FROM %s AS x WHERE orphan_cleanup.object_keys(%s) && orphan_cleanup._names_of(%s)) THEN %L',
                             l.table_oid::regclass, l.value_sql, key_sql, l.label), ' ')
      INTO v
    FROM orphan_cleanup._reference_list() AS l WHERE l.problem IS NULL;
    RETURN coalesce('CASE ' || v || ' END', 'NULL::text');
END
$$;

CREATE FUNCTION orphan_cleanup.reference_guard() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp SET jit = off
AS $$
DECLARE
    r record;
    v_new text;
    v_old text;
    v_unread text;
    v_type text;
    o record;
    ob orphan_cleanup.objects;
BEGIN
    -- A partition's row fires the clone of its ancestors' triggers: the references are the
    -- table's own and its ancestors' (a reference may name a partition, or a partitioned table).
    FOR r IN SELECT * FROM orphan_cleanup._reference_list() AS l
             WHERE l.table_oid IN (SELECT pg_catalog.pg_partition_ancestors(TG_RELID) UNION SELECT TG_RELID)
               AND l.value_sql IS NOT NULL LOOP
        IF cardinality(r.json_path) > 0 THEN
            EXECUTE format('SELECT jsonb_typeof(x.%I::jsonb #> %L::text[]) FROM (SELECT ($1).*) AS x', r.column_name, r.json_path)
                INTO v_type USING NEW;
            IF v_type IS DISTINCT FROM 'string' AND v_type IS DISTINCT FROM 'null' AND v_type IS NOT NULL THEN
                RAISE EXCEPTION 'a row of % cannot hold a JSON % at %: pg_orphan_cleanup reads it as naming a storage object, and reads strings only', TG_TABLE_NAME, v_type, r.label
                    USING ERRCODE = 'OC003',
                          HINT = 'Store one URL or path per JSON path (add a reference per path), or remove the reference.';
            END IF;
        END IF;
        EXECUTE format('SELECT %s FROM (SELECT ($1).*) AS x', r.value_sql) INTO v_new USING NEW;
        IF TG_OP = 'UPDATE' THEN
            EXECUTE format('SELECT %s FROM (SELECT ($1).*) AS x', r.value_sql) INTO v_old USING OLD;
            CONTINUE WHEN v_new IS NOT DISTINCT FROM v_old;
        END IF;
        CONTINUE WHEN v_new IS NULL;
        v_unread := orphan_cleanup._unread_url(v_new);
        IF v_unread IS NOT NULL THEN
            RAISE EXCEPTION 'a row of % cannot hold this value in %: %', TG_TABLE_NAME, r.label, v_unread
                USING ERRCODE = 'OC003',
                      HINT = 'pg_orphan_cleanup reads this column as naming storage objects (orphan_cleanup.extra_references); store one URL or path per value, or remove the reference.';
        END IF;
        FOR o IN SELECT k.bucket, k.object_path FROM orphan_cleanup._objects_of(v_new) AS k LOOP
            ob := orphan_cleanup._hold_object(o.bucket, o.object_path);
            IF ob.handouts > 0 THEN
                RAISE EXCEPTION 'a row of % cannot name %/% in %: that object was handed to a reaper and may already be deleted from storage',
                                TG_TABLE_NAME, ob.bucket, ob.object_path, r.label
                    USING ERRCODE = 'OC002',
                          DETAIL = format('Object %s/%s was handed out %s time(s), last by %s at %s (deletion queue row %s).',
                                          ob.bucket, ob.object_path, ob.handouts, ob.last_handed_to, ob.last_handed_out_at, ob.last_queue_id),
                          HINT = 'Upload the file again under a new name and reference that.';
            END IF;
        END LOOP;
    END LOOP;
    RETURN NULL;
END
$$;

CREATE FUNCTION orphan_cleanup.add_reference(table_name text, column_name text, json_path text DEFAULT NULL)
RETURNS text
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp SET jit = off SET lock_timeout = '10s'
AS $$
DECLARE
    v_rel oid;
    v_type text;
    v_path text[];
    v_value text;
    v_expr text;
    v_index oid;
    v_bad text;
    v_empty boolean;
    v_problem text;
    v_part oid;
    v_marked boolean;
BEGIN
    v_rel := pg_catalog.to_regclass(table_name);
    IF v_rel IS NULL THEN
        RAISE EXCEPTION 'table % does not exist', coalesce(quote_literal(table_name), 'NULL')
            USING ERRCODE = 'undefined_table', HINT = 'Give a schema-qualified name, e.g. public.thumbnails.';
    END IF;
    -- Claims in flight built their re-check without this reference: wait for them, and refuse
    -- while reapers hold claims (a claimed object this table names may be being deleted). Writes
    -- to the table wait until the trigger is in place, so no row slips between the scan and it.
    PERFORM pg_catalog.pg_advisory_xact_lock(7310246, 3);
    EXECUTE format('LOCK TABLE %s IN SHARE ROW EXCLUSIVE MODE', v_rel::regclass);
    IF EXISTS (SELECT 1 FROM orphan_cleanup.deletion_queue AS d WHERE d.state = 'claimed') THEN
        RAISE EXCEPTION 'add_reference() refused: % queue row(s) are claimed by reapers, and objects this table names may be among them',
                        (SELECT count(*) FROM orphan_cleanup.deletion_queue AS d WHERE d.state = 'claimed')
            USING ERRCODE = 'object_in_use',
                  HINT = 'ALTER SYSTEM SET orphan_cleanup.reaping_enabled = off; SELECT pg_reload_conf(); then wait until queue_status() shows no claimed rows (or their leases expire), add the reference, and turn reaping on again.';
    END IF;
    v_path := CASE WHEN coalesce(json_path, '') = '' THEN '{}'::text[] ELSE string_to_array(json_path, '.') END;
    SELECT pg_catalog.format_type(a.atttypid, NULL) INTO v_type FROM pg_catalog.pg_attribute AS a
    WHERE a.attrelid = v_rel AND a.attname = column_name AND a.attnum > 0 AND NOT a.attisdropped;
    IF v_type IS NULL THEN
        RAISE EXCEPTION 'column % is missing from %', coalesce(quote_ident(column_name), 'NULL'), v_rel::regclass
            USING ERRCODE = 'undefined_column';
    ELSIF NOT orphan_cleanup._reference_type_ok(v_type, v_path) AND v_type IN ('json', 'jsonb') THEN
        RAISE EXCEPTION 'column % of % is %: a reference reads a text or varchar column, or a string at a JSON path inside a json or jsonb column', quote_ident(column_name), v_rel::regclass, v_type
            USING ERRCODE = 'wrong_object_type',
                  HINT = 'Name the path of the string that holds the URL or path, e.g. add_reference(''public.galleries'', ''data'', ''images.large''); one reference per path.';
    ELSIF NOT orphan_cleanup._reference_type_ok(v_type, v_path) THEN
        RAISE EXCEPTION 'column % of % is %: a reference reads a text or varchar column, or a string at a JSON path inside a json or jsonb column', quote_ident(column_name), v_rel::regclass, v_type
            USING ERRCODE = 'wrong_object_type';
    END IF;
    IF cardinality(v_path) > 0 THEN
        EXECUTE format('SELECT x.%I::text FROM %s AS x WHERE jsonb_typeof(x.%I::jsonb #> %L::text[]) NOT IN (''string'', ''null'') LIMIT 1',
                       column_name, v_rel::regclass, column_name, v_path) INTO v_bad;
        IF v_bad IS NOT NULL THEN
            RAISE EXCEPTION 'add_reference(): at % inside %.% a row holds something other than a string: %', array_to_string(v_path, '.'), v_rel::regclass, quote_ident(column_name), left(v_bad, 300)
                USING ERRCODE = 'OC003',
                      HINT = 'A reference reads one string (a URL or path) per row at its JSON path; add one reference per path.';
        END IF;
        EXECUTE format('SELECT EXISTS (SELECT 1 FROM %s AS x) AND NOT EXISTS (SELECT 1 FROM %s AS x WHERE x.%I::jsonb #> %L::text[] IS NOT NULL)',
                       v_rel::regclass, v_rel::regclass, column_name, v_path) INTO v_empty;
        IF v_empty THEN
            RAISE WARNING 'no row of % holds a value at % inside %: check the path (keys separated by dots)', v_rel::regclass, array_to_string(v_path, '.'), quote_ident(column_name);
        END IF;
    END IF;
    v_value := orphan_cleanup._reference_value(column_name, v_path, v_type = 'text', 'x');
    -- The index: a GIN index whose only column is this value's object_keys(), compared as
    -- PostgreSQL deparses both (an expression index stores the parsed expression).
    v_expr := pg_catalog.regexp_replace(
        format('orphan_cleanup.object_keys(%s)', orphan_cleanup._reference_value(column_name, v_path, v_type = 'text', 'x')),
        '\mx\.', '', 'g');
    SELECT i.indexrelid INTO v_index
    FROM pg_catalog.pg_index AS i
    JOIN pg_catalog.pg_class AS c ON c.oid = i.indexrelid
    JOIN pg_catalog.pg_am AS am ON am.oid = c.relam
    WHERE i.indrelid = v_rel AND am.amname = 'gin' AND i.indnkeyatts = 1 AND i.indkey[0] = 0 AND i.indpred IS NULL
      AND i.indisvalid AND i.indisready AND i.indislive
      AND orphan_cleanup._same_expression(pg_catalog.pg_get_indexdef(i.indexrelid, 1, false), v_expr)
    LIMIT 1;
    IF v_index IS NULL THEN
        RAISE EXCEPTION 'add_reference(): % has no index to look objects up by, and every stray would read the whole table', v_rel::regclass
            USING ERRCODE = 'object_not_in_prerequisite_state',
                  HINT = 'Run, outside a transaction block: ' || orphan_cleanup._reference_index_statement(v_rel, column_name, v_path, v_type = 'text')
                         || ' Then run add_reference() again.';
    END IF;
    EXECUTE format('SELECT x::text FROM (SELECT %s AS v FROM %s AS x) AS x WHERE orphan_cleanup._unread_url(x.v) IS NOT NULL LIMIT 1',
                   v_value, v_rel::regclass) INTO v_bad;
    IF v_bad IS NOT NULL THEN
        RAISE EXCEPTION 'add_reference(): a value of %.% cannot be read as naming storage objects: %', v_rel::regclass, quote_ident(column_name), left(v_bad, 300)
            USING ERRCODE = 'OC003',
                  HINT = 'Such a value may name more objects than can be read; fix the rows, or keep reclaim_strays off.';
    END IF;
    INSERT INTO orphan_cleanup.extra_references (table_oid, column_name, json_path, index_oid)
    VALUES (v_rel, column_name, v_path, v_index)
    ON CONFLICT ON CONSTRAINT extra_references_pkey DO UPDATE SET index_oid = excluded.index_oid;
    -- The trigger as it must be (one changed since, a WHEN clause say, is made again).
    v_marked := orphan_cleanup._guards_changing();
    IF orphan_cleanup._reference_table_problem(v_rel, '', column_name) IS NOT NULL
       AND EXISTS (SELECT 1 FROM pg_catalog.pg_trigger AS t WHERE t.tgrelid = v_rel AND t.tgname = 'orphan_cleanup_reference_guard') THEN
        EXECUTE format('DROP TRIGGER orphan_cleanup_reference_guard ON %s', v_rel::regclass);
    END IF;
    IF NOT EXISTS (SELECT 1 FROM pg_catalog.pg_trigger AS t WHERE t.tgrelid = v_rel AND t.tgname = 'orphan_cleanup_reference_guard') THEN
        EXECUTE format('CREATE TRIGGER orphan_cleanup_reference_guard AFTER INSERT OR UPDATE ON %s FOR EACH ROW EXECUTE FUNCTION orphan_cleanup.reference_guard()', v_rel::regclass);
    END IF;
    FOR v_part IN SELECT v_rel UNION SELECT pt.relid FROM pg_catalog.pg_partition_tree(v_rel) AS pt LOOP
        EXECUTE format('ALTER TABLE %s ENABLE ALWAYS TRIGGER orphan_cleanup_reference_guard', v_part::regclass);
    END LOOP;
    PERFORM orphan_cleanup._guards_changed(v_marked);
    v_problem := orphan_cleanup._reference_table_problem(v_rel, format('%s.%I', v_rel::regclass, column_name), column_name);
    IF v_problem IS NOT NULL THEN
        RAISE EXCEPTION 'add_reference() refused: %', v_problem
            USING ERRCODE = 'object_not_in_prerequisite_state';
    END IF;
    -- Its partitions' rows were read through it above: looked at.
    INSERT INTO orphan_cleanup.reference_partitions (relid, name)
    SELECT pt.relid, pt.relid::regclass::text FROM pg_catalog.pg_partition_tree(v_rel) AS pt WHERE pt.relid <> v_rel
    ON CONFLICT (relid) DO NOTHING;
    INSERT INTO orphan_cleanup.audit_log (action, actor, detail)
    VALUES ('setting_changed', session_user, format('extra reference added: %s.%I%s', v_rel::regclass, column_name,
                                                     CASE WHEN cardinality(v_path) > 0 THEN format(' #>> %L', v_path) ELSE '' END));
    RETURN format('objects named by %s.%I%s are never strays', v_rel::regclass, column_name,
                  CASE WHEN cardinality(v_path) > 0 THEN format(' at %s', array_to_string(v_path, '.')) ELSE '' END);
END
$$;

CREATE FUNCTION orphan_cleanup._same_expression(a text, b text) RETURNS boolean
LANGUAGE sql IMMUTABLE SET search_path = pg_catalog, pg_temp
RETURN pg_catalog.translate(a, ' ()', '') = pg_catalog.translate(b, ' ()', '');

CREATE FUNCTION orphan_cleanup.remove_reference(table_name text, column_name text) RETURNS text
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_rel oid;
    n integer;
BEGIN
    v_rel := coalesce(pg_catalog.to_regclass(table_name)::oid,
                      CASE WHEN table_name ~ '^[0-9]+$' THEN table_name::oid END);
    DELETE FROM orphan_cleanup.extra_references AS r WHERE r.table_oid = v_rel AND r.column_name = remove_reference.column_name;
    GET DIAGNOSTICS n = ROW_COUNT;
    IF n = 0 THEN
        RAISE EXCEPTION 'no extra reference on %.% (SELECT * FROM orphan_cleanup.list_references() lists them)', table_name, column_name
            USING ERRCODE = 'undefined_object';
    END IF;
    IF NOT EXISTS (SELECT 1 FROM orphan_cleanup.extra_references AS r WHERE r.table_oid = v_rel)
       AND EXISTS (SELECT 1 FROM pg_catalog.pg_trigger AS t WHERE t.tgrelid = v_rel AND t.tgname = 'orphan_cleanup_reference_guard') THEN
        EXECUTE format('DROP TRIGGER orphan_cleanup_reference_guard ON %s', v_rel::regclass);
    END IF;
    DELETE FROM orphan_cleanup.reference_partitions AS x
    WHERE x.relid NOT IN (SELECT rp.relid FROM orphan_cleanup._reference_partitions() AS rp);
    INSERT INTO orphan_cleanup.audit_log (action, actor, detail)
    VALUES ('setting_changed', session_user, format('extra reference removed: %s.%s', table_name, column_name));
    RETURN format('removed %s reference(s) on %s.%s', n, table_name, column_name);
END
$$;

CREATE FUNCTION orphan_cleanup.list_references()
RETURNS TABLE (reference text, status text, detail text)
LANGUAGE sql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp
BEGIN ATOMIC
    SELECT l.label, CASE WHEN l.problem IS NULL THEN 'ok' ELSE 'problem' END,
           coalesce(l.problem, 'in force: objects it names are never strays')
    FROM orphan_cleanup._reference_list() AS l;
END;

CREATE FUNCTION orphan_cleanup._reference_table_problem(rel oid, label text, col name) RETURNS text
LANGUAGE plpgsql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    part oid;
    t record;
BEGIN
    IF EXISTS (SELECT 1 FROM pg_catalog.pg_inherits AS i JOIN pg_catalog.pg_class AS c ON c.oid = i.inhrelid
               WHERE i.inhparent = rel AND NOT c.relispartition) THEN
        RETURN format('%s: %s has inheritance children, which its guard trigger does not cover (use a partitioned table, or reference each child)', label, rel::regclass);
    END IF;
    FOR part IN SELECT rel UNION SELECT pt.relid FROM pg_catalog.pg_partition_tree(rel) AS pt LOOP
        SELECT tg.tgenabled, tg.tgfoid, tg.tgtype, tg.tgqual IS NOT NULL AS has_when, tg.tgattr::text AS cols INTO t
        FROM pg_catalog.pg_trigger AS tg
        WHERE tg.tgrelid = part AND tg.tgname = 'orphan_cleanup_reference_guard';
        IF NOT FOUND OR t.tgfoid <> 'orphan_cleanup.reference_guard()'::regprocedure OR t.tgtype <> 21 OR t.has_when OR t.cols <> '' THEN
            RETURN format('%s: the guard trigger orphan_cleanup_reference_guard on %s is missing or changed (it must be AFTER INSERT OR UPDATE ... FOR EACH ROW EXECUTE FUNCTION orphan_cleanup.reference_guard(), with no WHEN clause or column list; fix: SELECT orphan_cleanup.add_reference(%L, %L, ...) again)',
                          label, part::regclass, rel::regclass::text, col);
        ELSIF t.tgenabled <> 'A' THEN
            RETURN format('%s: the guard trigger orphan_cleanup_reference_guard on %s is not enabled ALWAYS (ALTER TABLE %s ENABLE ALWAYS TRIGGER orphan_cleanup_reference_guard)',
                          label, part::regclass, part::regclass);
        END IF;
    END LOOP;
    IF pg_catalog.row_security_active(rel) THEN
        RETURN format('%s: row-level security on %s applies to %s, the role pg_orphan_cleanup''s functions run as: it would not see every row (fix, as a superuser: ALTER ROLE %I BYPASSRLS)',
                      label, rel::regclass, current_user, current_user);
    END IF;
    RETURN NULL;
END
$$;

CREATE FUNCTION orphan_cleanup._hold_references() RETURNS boolean
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    rel oid;
BEGIN
    PERFORM pg_catalog.pg_advisory_xact_lock_shared(7310246, 3);
    FOR rel IN SELECT DISTINCT r.table_oid FROM orphan_cleanup.extra_references AS r
               JOIN pg_catalog.pg_class AS c ON c.oid = r.table_oid ORDER BY 1 LOOP
        BEGIN
            EXECUTE format('LOCK TABLE %s IN ROW EXCLUSIVE MODE NOWAIT', rel::regclass);
        EXCEPTION WHEN lock_not_available OR undefined_table THEN
            RETURN false;
        END;
    END LOOP;
    RETURN true;
END
$$;

CREATE FUNCTION orphan_cleanup._look_at_reference_partitions() RETURNS void
LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp SET jit = off
AS $$
DECLARE
    part oid;
    l record;
    o record;
    ob orphan_cleanup.objects;
    v_bad text;
BEGIN
    IF NOT EXISTS (SELECT 1 FROM orphan_cleanup.extra_references)
       AND NOT EXISTS (SELECT 1 FROM orphan_cleanup.reference_partitions) THEN
        RETURN;
    END IF;
    DELETE FROM orphan_cleanup.reference_partitions AS x
    WHERE x.relid NOT IN (SELECT rp.relid FROM orphan_cleanup._reference_partitions() AS rp);
    FOR part IN SELECT DISTINCT rp.relid FROM orphan_cleanup._reference_partitions() AS rp
                WHERE rp.relid NOT IN (SELECT x.relid FROM orphan_cleanup.reference_partitions AS x)
                ORDER BY 1 LOOP
        -- An older snapshot would miss rows committed into it meanwhile (the sixth review).
        IF current_setting('transaction_isolation') <> 'read committed' THEN
            RAISE EXCEPTION 'partition % joined a reference table: its rows are checked in a READ COMMITTED transaction only, not %',
                            part::regclass, current_setting('transaction_isolation')
                USING ERRCODE = 'invalid_transaction_state',
                      HINT = 'Run the ATTACH PARTITION or CREATE TABLE ... PARTITION OF (or the cycle) in its own READ COMMITTED transaction.';
        END IF;
        FOR l IN SELECT * FROM orphan_cleanup._reference_list() AS rl
                 WHERE rl.value_sql IS NOT NULL
                   AND rl.table_oid IN (SELECT rp.root FROM orphan_cleanup._reference_partitions() AS rp WHERE rp.relid = part) LOOP
            IF cardinality(l.json_path) > 0 THEN
                EXECUTE format('SELECT x.%I::text FROM %s AS x WHERE jsonb_typeof(x.%I::jsonb #> %L::text[]) NOT IN (''string'', ''null'') LIMIT 1',
                               l.column_name, part::regclass, l.column_name, l.json_path) INTO v_bad;
            END IF;
            IF v_bad IS NULL THEN
                EXECUTE format('SELECT x.v FROM (SELECT %s AS v FROM %s AS x) AS x WHERE orphan_cleanup._unread_url(x.v) IS NOT NULL LIMIT 1',
                               l.value_sql, part::regclass) INTO v_bad;
            END IF;
            IF v_bad IS NOT NULL THEN
                RAISE EXCEPTION 'partition % of a reference table holds a value in % that cannot be read as naming storage objects: %', part::regclass, l.label, left(v_bad, 300)
                    USING ERRCODE = 'OC003',
                          HINT = 'Fix the rows (one URL or path per value; a string at a JSON path), or remove the reference; until then strays and claims wait.';
            END IF;
            FOR o IN EXECUTE format('SELECT DISTINCT k.bucket, k.object_path FROM %s AS x CROSS JOIN LATERAL orphan_cleanup._objects_of(%s) AS k ORDER BY 1, 2',
                                    part::regclass, l.value_sql) LOOP
                ob := orphan_cleanup._hold_object(o.bucket, o.object_path);
                IF ob.handouts > 0 THEN
                    RAISE EXCEPTION 'partition % of a reference table holds a row naming %/% in %: that object was handed to a reaper and may already be deleted from storage',
                                    part::regclass, ob.bucket, ob.object_path, l.label
                        USING ERRCODE = 'OC002',
                              DETAIL = format('Object %s/%s was handed out %s time(s), last by %s at %s (deletion queue row %s).',
                                              ob.bucket, ob.object_path, ob.handouts, ob.last_handed_to, ob.last_handed_out_at, ob.last_queue_id),
                              HINT = 'Upload the file again under a new name and reference that, or remove the row; until then strays and claims wait.';
                END IF;
            END LOOP;
        END LOOP;
        INSERT INTO orphan_cleanup.reference_partitions (relid, name) VALUES (part, part::regclass::text)
        ON CONFLICT (relid) DO NOTHING;
    END LOOP;
END
$$;

-- A partitioned jobs table: each partition's TRUNCATE guard, and the record of them (sql/partitions.sql).

CREATE TABLE orphan_cleanup.job_partitions (
    relid     oid PRIMARY KEY,
    name      text NOT NULL,
    seen_at   timestamptz NOT NULL DEFAULT now()
);
SELECT pg_catalog.pg_extension_config_dump('orphan_cleanup.job_partitions', '');

REVOKE ALL ON orphan_cleanup.job_partitions FROM PUBLIC;

CREATE FUNCTION orphan_cleanup._inheritors(rel oid) RETURNS SETOF oid
LANGUAGE sql STABLE SET search_path = pg_catalog, pg_temp
BEGIN ATOMIC
    WITH RECURSIVE tree(relid) AS (
        SELECT i.inhrelid FROM pg_catalog.pg_inherits AS i WHERE i.inhparent = rel
        UNION
        SELECT i.inhrelid FROM pg_catalog.pg_inherits AS i JOIN tree AS t ON i.inhparent = t.relid)
    SELECT tree.relid FROM tree;
END;

CREATE FUNCTION orphan_cleanup._job_partitions(att orphan_cleanup.attachment) RETURNS SETOF oid
LANGUAGE sql STABLE SET search_path = pg_catalog, pg_temp
BEGIN ATOMIC
    SELECT orphan_cleanup._inheritors(att.jobs_oid);
END;

CREATE FUNCTION orphan_cleanup._partition_gone_problem() RETURNS text
LANGUAGE plpgsql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    att orphan_cleanup.attachment;
    p record;
BEGIN
    SELECT * INTO att FROM orphan_cleanup.attachment;
    IF NOT FOUND THEN
        RETURN NULL;
    END IF;
    SELECT r.relid, r.name INTO p FROM orphan_cleanup.job_partitions AS r
    WHERE NOT EXISTS (SELECT 1 FROM pg_catalog.pg_class AS c WHERE c.oid = r.relid) LIMIT 1;
    IF FOUND THEN
        RETURN format('partition %s (oid %s) of the jobs table was dropped: the files of the saved jobs it held can no longer be told from strays (list the saves whose jobs are gone: SELECT * FROM %s AS a WHERE NOT EXISTS (SELECT 1 FROM %s AS j WHERE j.id::text = orphan_cleanup.job_ref_key(a.metadata ->> ''render_job_id'')); keep their files with cancel(), then SELECT orphan_cleanup.forget_partition(%s))',
                      p.name, p.relid, att.assets_oid::regclass, att.jobs_oid::regclass, p.relid);
    END IF;
    SELECT i.inhrelid::regclass::text AS name INTO p FROM pg_catalog.pg_inherits AS i
    WHERE i.inhrelid IN (SELECT orphan_cleanup._job_partitions(att)) AND i.inhdetachpending LIMIT 1;
    IF FOUND THEN
        RETURN format('partition %s of the jobs table is being detached (a DETACH PARTITION ... CONCURRENTLY that did not finish: its rows are hidden from the jobs table); finish it: ALTER TABLE %s DETACH PARTITION %s FINALIZE',
                      p.name, att.jobs_oid::regclass, p.name);
    END IF;
    IF EXISTS (SELECT 1 FROM orphan_cleanup.job_partitions AS r
               WHERE r.relid NOT IN (SELECT orphan_cleanup._job_partitions(att))) THEN
        RETURN 'a partition left the jobs table since the last look (DETACH PARTITION): the next cycle, or any DDL, looks at it and keeps the files of its saved jobs';
    END IF;
    -- Joined and not looked at (or its look failed: a saved job it brought in names a handed-out
    -- object, or a URL that cannot be read): such a saved job keeps nothing yet.
    -- A foreign partition: its rows are written, deleted and truncated on another server, past
    -- every guard, and postgres_fdw reads them in one snapshot per local transaction, older than
    -- a claim's locks, so its re-check cannot see a save that committed meanwhile (the sixth
    -- review of partitions).
    SELECT c.oid::regclass::text AS name INTO p FROM pg_catalog.pg_class AS c
    WHERE c.oid IN (SELECT orphan_cleanup._job_partitions(att)) AND c.relkind = 'f' LIMIT 1;
    IF FOUND THEN
        RETURN format('partition %s of the jobs table is a foreign table: its rows change on another server, past every guard, and are read in a snapshot older than a claim''s locks; nothing is handed out while it is a partition (detach it: ALTER TABLE %s DETACH PARTITION %s)',
                      p.name, att.jobs_oid::regclass, p.name);
    END IF;
    SELECT pt.relid::regclass::text AS name INTO p FROM orphan_cleanup._job_partitions(att) AS pt(relid)
    WHERE pt.relid NOT IN (SELECT r.relid FROM orphan_cleanup.job_partitions AS r) LIMIT 1;
    IF FOUND THEN
        RETURN format('partition %s joined the jobs table and has not been looked at yet (the next cycle does; if it keeps saying this, SELECT * FROM orphan_cleanup.run_cycle() shows why in a warning)', p.name);
    END IF;
    -- The assets table's partitions (below): one that joined with assets saved their jobs past
    -- the save guard until a look has saved them again; a foreign one is written past it.
    SELECT c.oid::regclass::text AS name, c.relkind INTO p
    FROM orphan_cleanup._inheritors(att.assets_oid) AS pt(relid) JOIN pg_catalog.pg_class AS c ON c.oid = pt.relid
    WHERE c.relkind = 'f' OR pt.relid NOT IN (SELECT x.relid FROM orphan_cleanup.asset_partitions AS x) LIMIT 1;
    IF FOUND THEN
        RETURN CASE WHEN p.relkind = 'f'
                    THEN format('partition %s of the assets table is a foreign table: its assets are written on another server, past the save guard; nothing is handed out while it is a partition', p.name)
                    ELSE format('partition %s joined the assets table and has not been looked at yet (the next cycle does; if it keeps saying this, SELECT * FROM orphan_cleanup.run_cycle() shows why in a warning)', p.name) END;
    END IF;
    RETURN NULL;
END
$$;

CREATE FUNCTION orphan_cleanup._partition_problem() RETURNS text
LANGUAGE plpgsql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    att orphan_cleanup.attachment;
    v text;
BEGIN
    v := orphan_cleanup._partition_gone_problem();
    IF v IS NOT NULL THEN
        RETURN v;
    END IF;
    SELECT * INTO att FROM orphan_cleanup.attachment;
    IF NOT FOUND THEN
        RETURN NULL;
    END IF;
    IF EXISTS (SELECT 1 FROM orphan_cleanup._job_partitions(att) AS pt(relid)
                  WHERE pt.relid NOT IN (SELECT r.relid FROM orphan_cleanup.job_partitions AS r)
                     OR NOT EXISTS (SELECT 1 FROM pg_catalog.pg_trigger AS t
                                    WHERE t.tgrelid = pt.relid AND t.tgname = 'orphan_cleanup_truncate_guard'
                                      AND t.tgfoid = 'orphan_cleanup.job_truncate_guard()'::regprocedure
                                      AND t.tgenabled = 'A')) THEN
        RETURN 'a partition of the jobs table has no TRUNCATE guard (or it is not enabled ALWAYS): the next cycle, or any DDL, adds it';
    END IF;
    RETURN NULL;
END
$$;

CREATE FUNCTION orphan_cleanup._look_at_partitions(att orphan_cleanup.attachment, check_saved boolean DEFAULT true,
                                                   in_ddl boolean DEFAULT false) RETURNS text
LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp SET jit = off
AS $$
DECLARE
    p record;
    r record;
    rel oid;
    v_marked boolean;
BEGIN
    -- An unpartitioned jobs table, nothing recorded (the default): nothing to look at, every
    -- cycle (what follows would find no partition and no problem).
    IF NOT EXISTS (SELECT 1 FROM orphan_cleanup.job_partitions)
       AND NOT EXISTS (SELECT 1 FROM pg_catalog.pg_inherits AS i WHERE i.inhparent = att.jobs_oid) THEN
        RETURN NULL;
    END IF;
    -- Detached: still a table, no longer in the tree. Its saved jobs' objects are kept, read in a
    -- snapshot that sees every save committed before the detach (READ COMMITTED only: an older
    -- snapshot would miss a save committed meanwhile, the second review of partitions).
    FOR p IN SELECT x.relid, x.name FROM orphan_cleanup.job_partitions AS x
             WHERE EXISTS (SELECT 1 FROM pg_catalog.pg_class AS c WHERE c.oid = x.relid)
               AND x.relid NOT IN (SELECT orphan_cleanup._job_partitions(att)) LOOP
        IF current_setting('transaction_isolation') <> 'read committed' THEN
            RAISE EXCEPTION 'partition % left the jobs table %: the files of its saved jobs are kept in a READ COMMITTED transaction only, not %',
                            p.name, att.jobs_oid::regclass, current_setting('transaction_isolation')
                USING ERRCODE = 'invalid_transaction_state',
                      HINT = 'Run the DETACH PARTITION (or this call) in its own READ COMMITTED transaction.';
        END IF;
        FOR r IN EXECUTE format($sql$
            SELECT j.id, j.output_url FROM %s AS j
            WHERE j.output_url IS NOT NULL
              AND EXISTS (SELECT 1 FROM %s AS a WHERE orphan_cleanup.job_ref_key(a.metadata ->> 'render_job_id') = j.id::text)
            $sql$, p.relid::regclass, att.assets_oid::regclass)
        LOOP
            PERFORM orphan_cleanup._keep_saved(r.id, r.output_url, format('detached from the jobs table in partition %s', p.name));
        END LOOP;
        DELETE FROM orphan_cleanup.job_partitions AS x WHERE x.relid = p.relid;
    END LOOP;
    -- New: guarded and recorded.
    v_marked := orphan_cleanup._guards_changing();
    FOR rel IN SELECT pt.relid FROM orphan_cleanup._job_partitions(att) AS pt(relid)
               JOIN pg_catalog.pg_class AS c ON c.oid = pt.relid WHERE c.relkind <> 'f' LOOP
        -- A partition attached with saved jobs in it brought them in past job_guard: they must
        -- pass what it checks (a URL read in full; no object already handed out).
        IF check_saved AND NOT EXISTS (SELECT 1 FROM orphan_cleanup.job_partitions AS x WHERE x.relid = rel) THEN
            -- Its saved objects are held, and a hand-out after an older snapshot would not be
            -- seen: READ COMMITTED only, as for a detach.
            IF current_setting('transaction_isolation') <> 'read committed' THEN
                RAISE EXCEPTION 'partition % joined the jobs table %: its saved jobs are checked in a READ COMMITTED transaction only, not %',
                                rel::regclass, att.jobs_oid::regclass, current_setting('transaction_isolation')
                    USING ERRCODE = 'invalid_transaction_state',
                          HINT = 'Run the ATTACH PARTITION or CREATE TABLE ... PARTITION OF in its own READ COMMITTED transaction.';
            END IF;
            IF in_ddl THEN
                EXECUTE format($sql$
                    INSERT INTO orphan_cleanup.job_fences AS f (job_id, touched_at)
                    SELECT DISTINCT j.id, clock_timestamp() FROM %s AS j WHERE j.id IS NOT NULL
                    ON CONFLICT (job_id) DO UPDATE SET touched_at = clock_timestamp()$sql$, rel::regclass);
            END IF;
            PERFORM orphan_cleanup._refuse_unread_saved(rel, att.assets_oid, format('a look at partition %s', rel::regclass));
            PERFORM orphan_cleanup._refuse_handed_out_saved(rel, att.assets_oid);
        END IF;
        IF NOT EXISTS (SELECT 1 FROM pg_catalog.pg_trigger AS t WHERE t.tgrelid = rel AND t.tgname = 'orphan_cleanup_truncate_guard') THEN
            EXECUTE format('CREATE TRIGGER orphan_cleanup_truncate_guard BEFORE TRUNCATE ON %s FOR EACH STATEMENT EXECUTE FUNCTION orphan_cleanup.job_truncate_guard()', rel::regclass);
        END IF;
        IF NOT EXISTS (SELECT 1 FROM pg_catalog.pg_trigger AS t WHERE t.tgrelid = rel AND t.tgname = 'orphan_cleanup_truncate_guard' AND t.tgenabled = 'A') THEN
            EXECUTE format('ALTER TABLE %s ENABLE ALWAYS TRIGGER orphan_cleanup_truncate_guard', rel::regclass);
        END IF;
        INSERT INTO orphan_cleanup.job_partitions (relid, name) VALUES (rel, rel::regclass::text)
        ON CONFLICT (relid) DO NOTHING;
    END LOOP;
    PERFORM orphan_cleanup._guards_changed(v_marked);
    RETURN orphan_cleanup._partition_problem();
END
$$;

CREATE FUNCTION orphan_cleanup.forget_partition(relid oid) RETURNS text
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_name text;
BEGIN
    DELETE FROM orphan_cleanup.job_partitions AS x
    WHERE x.relid = forget_partition.relid AND NOT EXISTS (SELECT 1 FROM pg_catalog.pg_class AS c WHERE c.oid = x.relid)
    RETURNING x.name INTO v_name;
    IF v_name IS NULL THEN
        RAISE EXCEPTION 'no dropped partition with oid % is recorded', coalesce(relid::text, 'NULL')
            USING ERRCODE = 'undefined_object',
                  HINT = 'SELECT * FROM orphan_cleanup.job_partitions lists the recorded partitions.';
    END IF;
    INSERT INTO orphan_cleanup.audit_log (action, actor, detail)
    VALUES ('setting_changed', session_user, format('dropped partition %s (oid %s) of the jobs table forgotten', v_name, relid));
    RETURN format('forgotten: %s; strays are judged again', v_name);
END
$$;

CREATE FUNCTION orphan_cleanup._refuse_handed_out_saved(rel oid, assets oid) RETURNS void
LANGUAGE plpgsql VOLATILE SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_job uuid;
    v_key text;
    r record;
    ob orphan_cleanup.objects;
BEGIN
    -- Each object held (in sorted order, as saves hold them): a claim in flight of one of them
    -- finishes first, and its hand-out is then seen (the third review of partitions).
    FOR r IN EXECUTE format($sql$
        SELECT DISTINCT k.bucket, k.object_path, min(j.id::text) OVER (PARTITION BY k.bucket, k.object_path) AS job
        FROM %s AS j
        CROSS JOIN LATERAL orphan_cleanup._objects_of(j.output_url) AS k
        WHERE j.output_url IS NOT NULL
          AND EXISTS (SELECT 1 FROM %s AS a WHERE orphan_cleanup.job_ref_key(a.metadata ->> 'render_job_id') = j.id::text)
        ORDER BY 1, 2$sql$, rel::regclass, assets::regclass)
    LOOP
        ob := orphan_cleanup._hold_object(r.bucket, r.object_path);
        IF ob.handouts > 0 THEN
            v_job := r.job::uuid;
            v_key := r.bucket || '/' || r.object_path;
            EXIT;
        END IF;
    END LOOP;
    IF v_job IS NOT NULL THEN
        RAISE EXCEPTION 'partition % holds saved render job %, which names %: that object was handed to a reaper and may already be deleted from storage', rel::regclass, v_job, v_key
            USING ERRCODE = 'OC002',
                  HINT = 'Render that job again to a new object path (or remove the save); a partition that joined the jobs table with it stops strays until then.';
    END IF;
END
$$;

CREATE TABLE orphan_cleanup.asset_partitions (
    relid     oid PRIMARY KEY,
    name      text NOT NULL,
    seen_at   timestamptz NOT NULL DEFAULT now()
);
SELECT pg_catalog.pg_extension_config_dump('orphan_cleanup.asset_partitions', '');

REVOKE ALL ON orphan_cleanup.asset_partitions FROM PUBLIC;

CREATE FUNCTION orphan_cleanup._look_at_asset_partitions(att orphan_cleanup.attachment, check_saves boolean DEFAULT true) RETURNS void
LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp SET jit = off
AS $$
DECLARE
    v_new oid[];
    v_read text;
    v_job uuid;
BEGIN
    IF NOT EXISTS (SELECT 1 FROM orphan_cleanup.asset_partitions)
       AND NOT EXISTS (SELECT 1 FROM pg_catalog.pg_inherits AS i WHERE i.inhparent = att.assets_oid) THEN
        RETURN;
    END IF;
    DELETE FROM orphan_cleanup.asset_partitions AS x
    WHERE x.relid NOT IN (SELECT orphan_cleanup._inheritors(att.assets_oid));
    IF FOUND THEN
        UPDATE orphan_cleanup.detector_state SET sweep_started_at = NULL;
    END IF;
    v_new := ARRAY(SELECT pt.relid FROM orphan_cleanup._inheritors(att.assets_oid) AS pt(relid)
                   JOIN pg_catalog.pg_class AS c ON c.oid = pt.relid AND c.relkind <> 'f'
                   WHERE pt.relid NOT IN (SELECT x.relid FROM orphan_cleanup.asset_partitions AS x)
                   ORDER BY 1);
    IF cardinality(v_new) = 0 THEN
        RETURN;
    END IF;
    IF check_saves THEN
        -- An older snapshot would miss assets committed into them meanwhile.
        IF current_setting('transaction_isolation') <> 'read committed' THEN
            RAISE EXCEPTION 'partition % joined the assets table %: its assets are checked in a READ COMMITTED transaction only, not %',
                            v_new[1]::regclass, att.assets_oid::regclass, current_setting('transaction_isolation')
                USING ERRCODE = 'invalid_transaction_state',
                      HINT = 'Run the ATTACH PARTITION or CREATE TABLE ... PARTITION OF (or the cycle) in its own READ COMMITTED transaction.';
        END IF;
        SELECT string_agg(format('SELECT orphan_cleanup.job_ref_key(a.metadata ->> ''render_job_id'') AS ref FROM ONLY %s AS a', c.oid::regclass), ' UNION ALL ')
          INTO v_read
        FROM unnest(v_new) AS n(relid) JOIN pg_catalog.pg_class AS c ON c.oid = n.relid AND c.relkind = 'r';
        IF v_read IS NOT NULL THEN
            FOR v_job IN EXECUTE format('SELECT DISTINCT r.ref::uuid FROM (%s) AS r WHERE r.ref IS NOT NULL ORDER BY 1', v_read) LOOP
                PERFORM orphan_cleanup._save_job(att, v_job);
            END LOOP;
        END IF;
    END IF;
    INSERT INTO orphan_cleanup.asset_partitions (relid, name)
    SELECT n.relid, n.relid::regclass::text FROM unnest(v_new) AS n(relid)
    ON CONFLICT (relid) DO NOTHING;
END
$$;

CREATE FUNCTION orphan_cleanup._inventory_problem() RETURNS text
LANGUAGE plpgsql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    RETURN CASE
        WHEN to_regclass('storage.objects') IS NULL THEN
            CASE WHEN orphan_cleanup._inventory() IS NULL THEN
                'this database has no storage.objects table, the inventory Supabase Storage keeps of every object (hosted and self-hosted Supabase keep it in the project''s database: connect to that one), and no bucket has been listed through the Storage API yet (fix, where storage keeps it elsewhere: run `reaper inventory` now and then, e.g. daily, to list the allowed buckets into orphan_cleanup.object_inventory)'
            END
        WHEN NOT has_table_privilege('storage.objects', 'SELECT') THEN
            format('%s, the role pg_orphan_cleanup''s functions run as, cannot read storage.objects (fix: GRANT SELECT ON storage.objects TO %I)', current_user, current_user)
        WHEN row_security_active('storage.objects') THEN
            format('row-level security on storage.objects applies to %s, the role pg_orphan_cleanup''s functions run as: it would see only the objects its policies let through (fix, as a superuser: ALTER ROLE %I BYPASSRLS)', current_user, current_user)
    END;
END
$$;

CREATE FUNCTION orphan_cleanup._current_objects_only() RETURNS text
LANGUAGE plpgsql STABLE SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    RETURN concat(
        CASE WHEN EXISTS (SELECT 1 FROM pg_catalog.pg_attribute WHERE attrelid = to_regclass('storage.objects')
                          AND attname = 'is_delete_marker' AND NOT attisdropped)
             THEN ' AND o.is_delete_marker IS NOT TRUE' END,
        CASE WHEN EXISTS (SELECT 1 FROM pg_catalog.pg_attribute WHERE attrelid = to_regclass('storage.objects')
                          AND attname = 'archived_at' AND NOT attisdropped)
             THEN ' AND o.archived_at IS NULL' END);
END
$$;

CREATE FUNCTION orphan_cleanup._warn_dangling(fn text) RETURNS void
LANGUAGE plpgsql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp SET jit = off
AS $$
DECLARE
    t record;
    n bigint;
BEGIN
    t := orphan_cleanup._tables();
    EXECUTE format($sql$
        SELECT count(*) FROM %s AS a
        WHERE orphan_cleanup.job_ref_key(a.metadata ->> 'render_job_id') IS NOT NULL
          AND NOT EXISTS (SELECT 1 FROM %s AS j WHERE j.id = orphan_cleanup.job_ref_key(a.metadata ->> 'render_job_id')::uuid)
        $sql$, t.assets_oid::regclass, t.jobs_oid::regclass)
    INTO n;
    IF n > 0 THEN
        RAISE WARNING '% saved assets reference render jobs whose rows no longer exist: the files they showed are named by no job, and may be among the strays %', n, fn
            USING HINT = format('List them: SELECT a.* FROM %s AS a WHERE NOT EXISTS (SELECT 1 FROM %s AS j WHERE j.id = orphan_cleanup.job_ref_key(a.metadata ->> ''render_job_id'')::uuid); '
                                'restore those job rows from a backup (guide step 7C) before turning orphan_cleanup.reclaim_strays on, or accept that their files go.',
                                t.assets_oid::regclass, t.jobs_oid::regclass);
    END IF;
END
$$;

CREATE FUNCTION orphan_cleanup._stray_page(jobs regclass, cutoff timestamptz, by_name boolean,
                                           after_ts timestamptz, after_id uuid, after_bucket text, after_name text,
                                           page_rows integer)
RETURNS TABLE (bucket text, object_path text, bytes bigint, created_at timestamptz,
               stored_id uuid, stored_version text, stray boolean, uploaded_at timestamptz)
-- enable_seqscan = off: object_keys() is declared cheap, so the planner would read the whole jobs
-- table for each object (computing every job's readings: 10 minutes for the demo's 7,500 objects
-- and 5,000 jobs) instead of probing the GIN index. The page of storage.objects itself is read
-- by its unique index (a full pass) or, without an index on created_at, by a scan all the same.
LANGUAGE plpgsql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp SET jit = off SET enable_seqscan = off
AS $$
BEGIN
    RETURN QUERY EXECUTE format($sql$
        WITH page AS MATERIALIZED (
            SELECT o.bucket_id, o.name, o.metadata, o.created_at, o.id, o.version,
                   greatest(o.created_at, o.updated_at) AS uploaded_at
            FROM %5$s AS o
            WHERE %1$s %2$s
            ORDER BY %3$s
            LIMIT $8)
        SELECT p.bucket_id::text, p.name::text, (p.metadata ->> 'size')::bigint, p.created_at, p.id, p.version::text,
               coalesce(p.uploaded_at < $1
                        -- At a bucket's root a job may name the object by its bare file name,
                        -- which no reading takes as an object: never a stray (the second review).
                        AND strpos(p.name, '/') > 0
                        AND u.error IS NULL AND u.bucket = p.bucket_id AND u.object_path = p.name
                        AND NOT EXISTS (SELECT 1 FROM %4$s AS j
                                        WHERE orphan_cleanup.object_keys(j.output_url) && orphan_cleanup._names_of(p.bucket_id || '/' || p.name))
                        -- Nor by an extra reference (sql/references.sql).
                        AND %6$s IS NULL
                        AND NOT EXISTS (SELECT 1 FROM orphan_cleanup.deletion_queue AS d
                                        WHERE d.bucket = p.bucket_id AND d.object_path = p.name
                                          AND d.state IN ('pending', 'claimed', 'dead'))
                        AND NOT EXISTS (SELECT 1 FROM orphan_cleanup.objects AS k
                                        WHERE k.bucket = p.bucket_id AND k.object_path = p.name AND k.kept_at IS NOT NULL),
                        false),
               p.uploaded_at
        FROM page AS p
        CROSS JOIN LATERAL orphan_cleanup.check_output_url(p.bucket_id || '/' || p.name) AS u
        ORDER BY %3$s
        $sql$,
        CASE WHEN by_name THEN '(o.bucket_id, o.name) > ($6, $7)'
             ELSE 'o.created_at < $1 AND (o.created_at, o.id) > ($4, $5)' END,
        orphan_cleanup._current_objects_only(),
        CASE WHEN by_name THEN '1, 2' ELSE '4, 5' END,
        jobs, orphan_cleanup._inventory(), orphan_cleanup._referenced_by_sql($k$p.bucket_id || '/' || p.name$k$))
    USING cutoff, by_name, NULL::text, after_ts, after_id, after_bucket, after_name, page_rows;
END
$$;

CREATE FUNCTION orphan_cleanup._stray_chunk(
    att orphan_cleanup.attachment, p_cycle bigint, p_actor text, cutoff timestamptz, by_name boolean,
    after_ts timestamptz, after_id uuid, after_bucket text, after_name text, page_rows integer,
    p_grace interval, p_dry boolean, max_enqueue bigint,
    OUT seen bigint, OUT n_strays bigint, OUT n_enqueued bigint, OUT capped boolean,
    OUT last_ts timestamptz, OUT last_id uuid, OUT last_bucket text, OUT last_name text)
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp SET jit = off
AS $$
BEGIN
    WITH page AS MATERIALIZED (
        SELECT g.*, count(*) FILTER (WHERE g.stray) OVER (ORDER BY g.n) AS k
        FROM orphan_cleanup._stray_page(att.jobs_oid::regclass, cutoff, by_name, after_ts, after_id,
                                        after_bucket, after_name, page_rows)
             WITH ORDINALITY AS g(bucket, object_path, bytes, created_at, stored_id, stored_version, stray, uploaded_at, n)
    ),
    -- The stray past the cap, in page order: where this chunk ends.
    stop_at AS (
        SELECT min(x.n) AS n FROM page AS x WHERE max_enqueue IS NOT NULL AND x.stray AND x.k > max_enqueue
    ),
    taken AS (
        SELECT x.* FROM page AS x WHERE x.n < coalesce((SELECT s.n FROM stop_at AS s), 'Infinity'::numeric)
    ),
    ins AS (
        INSERT INTO orphan_cleanup.deletion_queue AS d
            (job_id, kind, output_url, url_hash, host, bucket, object_path, state, available_at,
             stored_id, stored_version, cycle_id)
        SELECT NULL, 'stray', t.bucket || '/' || t.object_path, md5(t.bucket || '/' || t.object_path), NULL,
               t.bucket, t.object_path, 'pending', now() + p_grace, t.stored_id, t.stored_version, p_cycle
        FROM taken AS t
        WHERE t.stray AND NOT p_dry
        ON CONFLICT (bucket, object_path) WHERE job_id IS NULL AND state IN ('pending', 'claimed') DO NOTHING
        RETURNING d.id, d.bucket, d.object_path, d.output_url
    ),
    audited AS (
        INSERT INTO orphan_cleanup.audit_log (action, queue_id, output_url, actor, detail, cycle_id)
        SELECT 'enqueued', i.id, i.output_url, p_actor,
               format('a stray: no job names it (%s bytes, uploaded %s)', coalesce(t.bytes::text, 'unknown'), t.uploaded_at),
               p_cycle
        FROM ins AS i JOIN taken AS t ON t.bucket = i.bucket AND t.object_path = i.object_path
        RETURNING 1
    )
    SELECT (SELECT count(*) FROM taken),
           (SELECT count(*) FROM taken AS t WHERE t.stray),
           CASE WHEN p_dry THEN (SELECT count(*) FROM taken AS t WHERE t.stray) ELSE (SELECT count(*) FROM ins) END,
           EXISTS (SELECT 1 FROM stop_at AS s WHERE s.n IS NOT NULL),
           l.created_at, l.stored_id, l.bucket, l.object_path
      INTO seen, n_strays, n_enqueued, capped, last_ts, last_id, last_bucket, last_name
      FROM (SELECT 1) AS one
      LEFT JOIN LATERAL (SELECT t.* FROM taken AS t ORDER BY t.n DESC LIMIT 1) AS l ON true;
    -- A capped chunk that stopped at its first row saw nothing: it ends where it started.
    IF seen = 0 THEN
        last_ts := after_ts; last_id := after_id; last_bucket := after_bucket; last_name := after_name;
    END IF;
END
$$;

CREATE FUNCTION orphan_cleanup._strays_ready(fn text, min_age interval, max_rows integer) RETURNS void
LANGUAGE plpgsql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp SET jit = off
AS $$
DECLARE
    t record;
    v_problem text;
BEGIN
    IF max_rows IS NULL OR max_rows < 1 THEN
        RAISE EXCEPTION 'max_rows must be at least 1, got %', max_rows USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF min_age < interval '0' THEN
        RAISE EXCEPTION 'min_age must not be negative, got %', min_age USING ERRCODE = 'invalid_parameter_value';
    END IF;
    v_problem := orphan_cleanup._inventory_problem();
    IF v_problem IS NOT NULL THEN
        RAISE EXCEPTION '% cannot read the objects in storage: %', fn, v_problem
            USING ERRCODE = 'object_not_in_prerequisite_state';
    END IF;
    t := orphan_cleanup._tables();
    v_problem := coalesce(orphan_cleanup._index_problem(t.jobs_oid, t.assets_oid, t.age_column, with_scan => false),
                          'an extra reference is not in force: ' || orphan_cleanup._reference_problem(),
                          orphan_cleanup._partition_problem());
    IF v_problem IS NOT NULL THEN
        RAISE EXCEPTION '% refused: %', fn, v_problem
            USING ERRCODE = 'object_not_in_prerequisite_state';
    END IF;
    PERFORM orphan_cleanup._warn_dangling(CASE WHEN fn = 'preview_strays()' THEN 'listed here' ELSE 'queued now' END);
END
$$;

CREATE FUNCTION orphan_cleanup.preview_strays(min_age interval DEFAULT NULL, max_rows integer DEFAULT 100)
RETURNS TABLE (bucket text, object_path text, bytes bigint, created_at timestamptz, age interval)
LANGUAGE plpgsql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp SET jit = off
AS $$
DECLARE
    v_jobs regclass;
    cutoff timestamptz;
    cur_ts timestamptz := '-infinity';
    cur_id uuid := '00000000-0000-0000-0000-000000000000';
    got integer := 0;
    seen integer;
    r record;
BEGIN
    PERFORM orphan_cleanup._strays_ready('preview_strays()', min_age, max_rows);
    v_jobs := (SELECT t.jobs_oid::regclass FROM orphan_cleanup._tables() AS t);
    cutoff := now() - coalesce(min_age, make_interval(secs => (SELECT c.stray_min_age_s FROM orphan_cleanup._config() AS c)));
    LOOP
        seen := 0;
        FOR r IN SELECT * FROM orphan_cleanup._stray_page(v_jobs, cutoff, false, cur_ts, cur_id, NULL, NULL, 5000) LOOP
            seen := seen + 1;
            cur_ts := r.created_at;
            cur_id := r.stored_id;
            CONTINUE WHEN NOT r.stray;
            bucket := r.bucket;
            object_path := r.object_path;
            bytes := r.bytes;
            created_at := r.created_at;
            age := date_trunc('second', now() - r.uploaded_at);
            RETURN NEXT;
            got := got + 1;
            EXIT WHEN got >= max_rows;
        END LOOP;
        EXIT WHEN got >= max_rows OR seen < 5000;
    END LOOP;
END
$$;

CREATE FUNCTION orphan_cleanup.enqueue_strays(min_age interval DEFAULT NULL, max_rows integer DEFAULT 1000)
RETURNS bigint
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp SET jit = off
AS $$
DECLARE
    att orphan_cleanup.attachment;
    cfg record;
    cutoff timestamptz;
    cur_ts timestamptz := '-infinity';
    cur_id uuid := '00000000-0000-0000-0000-000000000000';
    total bigint := 0;
    chunk record;
BEGIN
    -- The jobs table's partitions first (sql/partitions.sql): a detached one's saved jobs' files
    -- are kept before any of them could be taken for a stray.
    SELECT * INTO att FROM orphan_cleanup.attachment;
    IF FOUND THEN
        PERFORM orphan_cleanup._look_at_partitions(att);
    END IF;
    PERFORM orphan_cleanup._look_at_reference_partitions();
    PERFORM orphan_cleanup._strays_ready('enqueue_strays()', min_age, max_rows);
    att := orphan_cleanup._require_attached('enqueue_strays()');
    -- One queueing of strays at a time: a cycle's pass in another order could deadlock with it
    -- (the one-live-row-per-stray index); a cycle that finds this held skips its strays.
    PERFORM pg_catalog.pg_advisory_xact_lock(7310246, 2);
    SELECT * INTO cfg FROM orphan_cleanup._config();
    IF NOT cfg.reclaim_strays THEN
        RAISE EXCEPTION 'enqueue_strays() refused: orphan_cleanup.reclaim_strays is off, so strays are not deleted'
            USING ERRCODE = 'object_not_in_prerequisite_state',
                  HINT = 'Look at preview_strays() first; then ALTER SYSTEM SET orphan_cleanup.reclaim_strays = on; SELECT pg_reload_conf();';
    END IF;
    IF orphan_cleanup._no_entries(cfg.allowed_buckets) THEN
        RAISE EXCEPTION 'orphan_cleanup.allowed_buckets is empty, so no object may be deleted'
            USING ERRCODE = 'invalid_parameter_value',
                  HINT = 'ALTER SYSTEM SET orphan_cleanup.allowed_buckets = ''renders''; SELECT pg_reload_conf();';
    END IF;
    IF min_age < make_interval(secs => cfg.stray_min_age_s) THEN
        RAISE EXCEPTION 'min_age % is shorter than orphan_cleanup.stray_min_age (%): claims hand out no younger stray',
            min_age, make_interval(secs => cfg.stray_min_age_s)
            USING ERRCODE = 'invalid_parameter_value',
                  HINT = 'Leave min_age out, or lower orphan_cleanup.stray_min_age (at least 1h) if your render service writes its job rows sooner.';
    END IF;
    cutoff := now() - coalesce(min_age, make_interval(secs => cfg.stray_min_age_s));
    LOOP
        EXIT WHEN total >= max_rows;
        chunk := orphan_cleanup._stray_chunk(att, NULL, session_user::text, cutoff, false, cur_ts, cur_id, NULL, NULL,
                                             5000, make_interval(secs => cfg.grace_s), false, max_rows - total);
        total := total + chunk.n_enqueued;
        EXIT WHEN chunk.seen < 5000 AND NOT chunk.capped;
        cur_ts := chunk.last_ts;
        cur_id := chunk.last_id;
    END LOOP;
    IF total > 0 THEN
        PERFORM pg_catalog.pg_notify('orphan_cleanup_queue', total::text);
    END IF;
    RETURN total;
END
$$;

CREATE FUNCTION orphan_cleanup._stray_index_ok() RETURNS boolean
LANGUAGE sql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp
RETURN EXISTS (
    SELECT 1 FROM pg_catalog.pg_index AS i
    JOIN pg_catalog.pg_attribute AS a ON a.attrelid = i.indrelid AND a.attnum = i.indkey[0]
    WHERE i.indrelid = orphan_cleanup._inventory() AND a.attname = 'created_at'
      AND i.indisvalid AND i.indisready AND i.indpred IS NULL);

CREATE FUNCTION orphan_cleanup._reconcile_strays(
    att orphan_cleanup.attachment, p_cycle bigint, p_actor text, p_grace interval, p_dry boolean,
    deadline timestamptz, max_enqueue bigint, p_limit bigint, p_already bigint, p_limits text,
    OUT scanned bigint, OUT n_strays bigint, OUT n_enqueued bigint, OUT pass text, OUT out_of_time boolean)
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp SET jit = off
AS $$
DECLARE
    cfg record;
    st orphan_cleanup.detector_state;
    cutoff timestamptz;
    chunk record;
    v_problem text;
    v_started timestamptz;
    v_passes text[] := '{}';
    page CONSTANT integer := 2000;
BEGIN
    scanned := 0; n_strays := 0; n_enqueued := 0; out_of_time := false;
    IF NOT pg_catalog.pg_try_advisory_xact_lock(7310246, 2) THEN
        pass := 'not run: a DBA''s enqueue_strays() is queueing strays';
        RETURN;
    END IF;
    v_problem := coalesce(orphan_cleanup._inventory_problem(),
                          orphan_cleanup._index_problem(att.jobs_oid, att.assets_oid, att.age_column, with_scan => false),
                          'an extra reference is not in force: ' || orphan_cleanup._reference_problem(),
                          orphan_cleanup._partition_problem());
    IF v_problem IS NOT NULL THEN
        pass := 'not run: ' || v_problem;
        RETURN;
    END IF;
    SELECT * INTO cfg FROM orphan_cleanup._config();
    cutoff := now() - make_interval(secs => cfg.stray_min_age_s);
    SELECT * INTO st FROM orphan_cleanup.detector_state;
    -- A full pass is due: none yet, or the last began full_sweep_interval ago and has ended.
    -- The objects created before now's cutoff are its to look at; the looks by creation time
    -- go on after them.
    IF st.stray_pass_bucket IS NULL
       AND (st.stray_pass_started_at IS NULL
            OR now() - st.stray_pass_started_at >= make_interval(secs => cfg.full_sweep_interval_s)) THEN
        st.stray_pass_started_at := now();
        st.stray_pass_bucket := '';
        st.stray_pass_name := '';
        IF st.stray_seen_ts IS NULL OR st.stray_seen_ts < cutoff THEN
            st.stray_seen_ts := cutoff;
            st.stray_seen_id := '00000000-0000-0000-0000-000000000000';
        END IF;
    END IF;

    WHILE st.stray_pass_bucket IS NOT NULL AND n_enqueued < max_enqueue AND NOT out_of_time LOOP
        v_started := clock_timestamp();
        chunk := orphan_cleanup._stray_chunk(att, p_cycle, p_actor, cutoff, true, NULL, NULL,
                                             st.stray_pass_bucket, st.stray_pass_name, page, p_grace, p_dry,
                                             max_enqueue - n_enqueued);
        scanned := scanned + chunk.seen; n_strays := n_strays + chunk.n_strays; n_enqueued := n_enqueued + chunk.n_enqueued;
        PERFORM orphan_cleanup._check_stray_breaker(p_limit, p_already + n_enqueued, n_enqueued, scanned, p_limits);
        st.stray_pass_bucket := chunk.last_bucket;
        st.stray_pass_name := chunk.last_name;
        IF chunk.seen < page AND NOT chunk.capped THEN
            st.stray_pass_bucket := NULL;  -- the pass has ended
            st.stray_pass_name := NULL;
        END IF;
        out_of_time := NOT orphan_cleanup._another_chunk_fits(v_started, deadline);
        v_passes := array_append(array_remove(v_passes, 'full'), 'full');
    END LOOP;

    IF orphan_cleanup._stray_index_ok() THEN
        LOOP
            EXIT WHEN n_enqueued >= max_enqueue OR out_of_time;
            v_started := clock_timestamp();
            chunk := orphan_cleanup._stray_chunk(att, p_cycle, p_actor, cutoff, false,
                                                 st.stray_seen_ts, st.stray_seen_id, NULL, NULL, page, p_grace, p_dry,
                                                 max_enqueue - n_enqueued);
            scanned := scanned + chunk.seen; n_strays := n_strays + chunk.n_strays; n_enqueued := n_enqueued + chunk.n_enqueued;
            PERFORM orphan_cleanup._check_stray_breaker(p_limit, p_already + n_enqueued, n_enqueued, scanned, p_limits);
            st.stray_seen_ts := chunk.last_ts;
            st.stray_seen_id := chunk.last_id;
            v_passes := array_append(array_remove(v_passes, 'by creation time'), 'by creation time');
            EXIT WHEN chunk.seen < page AND NOT chunk.capped;
            out_of_time := NOT orphan_cleanup._another_chunk_fits(v_started, deadline);
        END LOOP;
    END IF;
    pass := nullif(array_to_string(v_passes, ', '), '');
    IF NOT p_dry THEN
        UPDATE orphan_cleanup.detector_state AS d
           SET stray_pass_started_at = st.stray_pass_started_at, stray_pass_bucket = st.stray_pass_bucket,
               stray_pass_name = st.stray_pass_name, stray_seen_ts = st.stray_seen_ts, stray_seen_id = st.stray_seen_id;
    END IF;
END
$$;

CREATE FUNCTION orphan_cleanup._check_stray_breaker(p_limit bigint, p_total bigint, p_strays bigint, p_scanned bigint,
                                                    p_limits text) RETURNS void
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    IF p_limit IS NOT NULL AND p_total > p_limit THEN
        RAISE EXCEPTION 'this cycle would enqueue % rows or more, over its limit of %: % of them strays, objects in storage that no job names (% objects looked at); a jobs table restored empty or emptied makes every object a stray; %',
            p_total, p_limit, p_strays, p_scanned, p_limits
            USING ERRCODE = 'OC002';
    END IF;
END
$$;

-- Grants, as sql/grants.sql gives them: new functions are not for PUBLIC.
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
