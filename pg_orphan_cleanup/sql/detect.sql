-- Detection: which completed jobs are orphans, and cleanup cycles that queue their objects.
--
-- Every function that touches the application tables is SECURITY DEFINER with a pinned
-- search_path and builds its SQL with format(): table names come from attach() as regclass
-- (which quotes itself) and column names go through %I.

-- The tables to act on, as attach() recorded them. Raises, naming the fix, when attach() has not
-- run, when the settings, the tables or the save guard no longer match what it recorded, or
-- when an index the per-row lookups need is missing or unusable.
CREATE FUNCTION orphan_cleanup._require_attached(purpose text) RETURNS orphan_cleanup.attachment
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

-- Row-level security that applies to the role this runs as (the owner of the functions that
-- call it, all SECURITY DEFINER), on the jobs or the assets table, said with the fix; or NULL.
-- Under it every read of those tables would see only the rows its policies let through: saved
-- assets would look like none, and their jobs' files like orphans. Never the extension's (a
-- superuser owns it); the managed edition's owner is a platform's role: a table owner without
-- BYPASSRLS under FORCE ROW LEVEL SECURITY, or a role that is not the table's owner.
CREATE FUNCTION orphan_cleanup._rls_problem(att orphan_cleanup.attachment) RETURNS text
LANGUAGE sql STABLE SET search_path = pg_catalog, pg_temp
RETURN (SELECT format('row-level security on %s applies to %s, the role pg_orphan_cleanup''s functions run as: they would see only the rows its policies let through, and saved assets as none (fix: ALTER TABLE %s NO FORCE ROW LEVEL SECURITY if %s owns it, or, as a superuser, ALTER ROLE %I BYPASSRLS)',
                      t.rel::regclass, current_user, t.rel::regclass, current_user, current_user)
        FROM unnest(ARRAY[att.jobs_oid, att.assets_oid]) WITH ORDINALITY AS t(rel, n)
        WHERE pg_catalog.row_security_active(t.rel)
        ORDER BY t.n LIMIT 1);

-- What is wrong with the guard triggers, or NULL. Only the exact triggers attach() creates
-- count: the right table, events and function, fired for each row, no WHEN clause, and enabled
-- ALWAYS. Enabled ORIGIN ('O', what DISABLE/ENABLE TRIGGER ALL leaves) does not fire under
-- session_replication_role = replica (logical replication); REPLICA fires only there.
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

-- Why the recorded attachment no longer matches the settings and the catalog, or NULL.
CREATE FUNCTION orphan_cleanup._drift(att orphan_cleanup.attachment) RETURNS text
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

-- Completed jobs older than cutoff, in (age, id) order after the cursor, or exactly the jobs in
-- job_ids. For each: how assets reference it (canonical: the guide's exact text join finds it;
-- noncanonical: only a differently spelled id does; none), the object its URL names and why it
-- may not be deleted (not read for a canonical one: every caller skips those), a job that is
-- not an orphan and shares the object, if any, and else the extra reference naming the object,
-- if any (sql/references.sql). Claims check both again; looking here too keeps an object a
-- reference names from being queued, and retired at its claim, on every full sweep.
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

-- Judges one chunk of candidates and, unless dry, queues the orphans, records the rejected URLs
-- and audits every decision. Returns what it saw and where the scan got to.
-- At most max_enqueue orphans are queued (NULL: no cap): the chunk then ends just before the
-- first orphan past the cap (capped), so the scan's cursor stops there and the next cycle
-- starts with it. A cycle near max_per_cycle therefore still reads whole chunks: shrinking the
-- chunk to the few rows left in the budget made it read a saved history one job per statement.
-- Planned afresh for every chunk (plan_cache_mode): a plan cached by the first chunk of a
-- cycle over an empty queue read the whole queue for every orphan once the cycle had filled
-- it (at 1M jobs, chunks of 2,000 grew from 0.6 to 41 s within one backlog cycle); planned per
-- chunk, the queue's size as it grows is seen, and the lookup stays a probe.

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

-- Who is running a cycle: the background worker, or the session user (pg_cron, psql).
CREATE FUNCTION orphan_cleanup._actor() RETURNS text
LANGUAGE sql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp
RETURN coalesce(
    (SELECT 'worker' FROM pg_catalog.pg_stat_activity
     WHERE pid = pg_catalog.pg_backend_pid() AND backend_type = 'pg_orphan_cleanup'),
    session_user::text);

-- Whether another chunk like the one that started at `started` ends before `deadline`, with half
-- a chunk to spare (chunks vary, and pruning comes after them): how a cycle keeps to its budget.
CREATE FUNCTION orphan_cleanup._another_chunk_fits(started timestamptz, deadline timestamptz) RETURNS boolean
LANGUAGE sql VOLATILE SET search_path = pg_catalog, pg_temp
RETURN clock_timestamp() + 1.5 * (clock_timestamp() - started) < deadline;

-- The body of one cycle. Raises on any problem; run_cycle() records it.
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

-- One cleanup cycle: the same one the background worker runs every orphan_cleanup.interval, so a
-- DBA can schedule it with pg_cron instead. A cycle that fails is recorded with its error; a
-- cycle started while another runs returns at once with status 'skipped'.
CREATE FUNCTION orphan_cleanup.run_cycle()
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

-- The guide's orphan definition, exactly (its step 7B query with min_age), so a DBA can compare
-- it with their own query. Jobs referenced only through a differently spelled id count here,
-- as they do in the guide; cycles protect them.
CREATE FUNCTION orphan_cleanup.orphan_count(min_age interval DEFAULT NULL) RETURNS bigint
LANGUAGE plpgsql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp SET jit = off
AS $$
DECLARE
    t record;
    n bigint;
BEGIN
    t := orphan_cleanup._tables();
    EXECUTE format($sql$
        SELECT count(*)
        FROM %1$s AS rj
        LEFT JOIN %2$s AS ua ON ua.metadata ->> 'render_job_id' = rj.id::text
        WHERE rj.status = 'completed'
          AND rj.output_url IS NOT NULL
          AND ua.id IS NULL
          AND rj.%3$I < now() - $1
        $sql$, t.jobs_oid::regclass, t.assets_oid::regclass, t.age_column)
    INTO n
    USING coalesce(min_age, make_interval(secs => t.min_age_s));
    RETURN n;
END
$$;

-- The tables the read-only functions look at: attach()'s when attached, otherwise the settings'
-- (so a DBA can count and preview before attaching).
CREATE FUNCTION orphan_cleanup._tables(OUT jobs_oid oid, OUT assets_oid oid, OUT age_column text, OUT min_age_s integer)
LANGUAGE plpgsql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp SET jit = off
AS $$
DECLARE
    cfg record;
BEGIN
    SELECT * INTO cfg FROM orphan_cleanup._config();
    min_age_s := cfg.min_age_s;
    SELECT a.jobs_oid, a.assets_oid, a.age_column INTO jobs_oid, assets_oid, age_column FROM orphan_cleanup.attachment AS a;
    IF FOUND THEN
        RETURN;
    END IF;
    jobs_oid := pg_catalog.to_regclass(cfg.jobs_table);
    assets_oid := pg_catalog.to_regclass(cfg.assets_table);
    age_column := cfg.age_column;
    IF jobs_oid IS NULL OR assets_oid IS NULL THEN
        RAISE EXCEPTION 'table % does not exist', CASE WHEN jobs_oid IS NULL THEN cfg.jobs_table ELSE cfg.assets_table END
            USING ERRCODE = 'undefined_table',
                  HINT = 'Set orphan_cleanup.jobs_table / orphan_cleanup.assets_table to schema-qualified names of existing tables (ALTER SYSTEM SET ...; SELECT pg_reload_conf();).';
    END IF;
END
$$;

-- A dry run: the orphans a cycle would take, oldest first, with the object each URL names and a
-- verdict. Writes nothing.
CREATE FUNCTION orphan_cleanup.preview(min_age interval DEFAULT NULL, max_rows integer DEFAULT 100)
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

-- The safe replacement for the guide's "emergency manual cleanup" DELETE: it queues up to
-- max_rows orphans for the reaper, where the guide deleted job rows and left their files behind.
CREATE FUNCTION orphan_cleanup.enqueue_orphans(min_age interval DEFAULT NULL, max_rows integer DEFAULT 100)
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

-- Statistics for the tables cycles and claims read, when autovacuum has not caught up with
-- them. A backlog cycle writes hundreds of thousands of rows in one transaction, an app loads
-- jobs in bulk; an autovacuum or ANALYZE that runs meanwhile does not count rows still being
-- inserted and records a table of many pages and almost no rows. Until its next ANALYZE (a minute
-- on an idle server, hours when autovacuum is busy elsewhere) the planner takes a scan of a whole
-- table or index for a probe: a claim read the whole queue, a confirm the queue once per job,
-- and a claim the whole jobs table once per object (13 minutes for 500 rows of 60,000 jobs).
-- So every claim looks (a catalog read) at the two tables it reads (the queue and the objects),
-- and every cycle (for_cycle) at every table it reads or writes, the attached jobs and assets
-- tables too, for one changed more since its last ANALYZE than the rows its statistics count
-- (and at least 1,000), and analyzes it: a sample of at most 30,000 rows, about a tenth of a
-- second at a million. Not the app's tables, nor the audit log, in a claim: their lock (SHARE
-- UPDATE EXCLUSIVE, held to the end of the transaction) would make the app's DDL and vacuum
-- wait for every claim, a claim that fails would take the statistics back with it (while the
-- count of changes stays reset), and the reaper's statement timeout would be spent on tables
-- the claim does not read. A claim does it after its own checks, so that a refused claim
-- analyzes nothing. A cycle does it before its work, outside the part a failed cycle rolls
-- back, inside its time budget, and holds that lock until it commits. Tables it may not analyze
-- (not their owner) are left to health()'s warning.
-- The test both _refresh_statistics() and health() apply: changed more since the last ANALYZE
-- than the statistics count, and at least 1,000 rows.
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

-- Deletes finished history older than the retention, a bounded batch per call.
-- Every cycle calls this and _prune_objects(), and usually nothing is old enough. Each DELETE
-- runs only when the oldest row says there is something to prune: `ORDER BY t LIMIT 1` on the
-- time column's index, with sequential and bitmap scans off, which leaves the planner one plan,
-- a probe at the index's start, whatever the statistics say. (`min(t)` was not enough: with
-- statistics taken while a table was empty the planner costs a bitmap scan of the whole index
-- below the probe; at 1M jobs, just after a backlog cycle had written 1.1M audit rows, that made
-- every cycle 180 ms longer.)
CREATE FUNCTION orphan_cleanup._prune(retention interval) RETURNS void
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

-- How long the save guarantee's records live, a bounded batch per call (every cycle):
--   - an object never handed out and not kept: a day after it was created. Its row only ever
--     carries locks, and whoever needs it next (a save, a job write, a claim) creates it again;
--   - an object handed out: 30 days after the latest hand-out, once no live (pending, claimed,
--     dead) queue row and no job row names it. While a job names it, that job can never be
--     saved; such a row is looked at again a day later. After that, a job the app creates with
--     the URL of an object deleted that long ago can be saved, pointing at a file that has long
--     been gone; nothing is deleted because of it;
--   - an object kept by cancel(): never;
--   - a job's fence row: a day after the save or job write that wrote it.
-- Batches of 10,000 rows, up to 40 per kind and call while the cycle's time budget (deadline)
-- lasts: millions a day at the default interval.
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
