-- The save guard and attach(): no saved asset ever loses its file.
--
-- The protocol. A save (an asset row that starts referencing job J) runs the trigger below, which
--   1. locks J's job row FOR KEY SHARE, then
--   2. locks every queue row that could hand out J's file (J's own rows, and rows of other jobs
--      naming the same object) FOR UPDATE.
-- claim() locks queue rows, then job rows, both with SKIP LOCKED, and only then re-checks the
-- references in a new statement (a fresh snapshot). So:
--   - a save in flight holds J's row: claim() skips the row and hands out nothing for J;
--   - a claim in flight holds J's row FOR UPDATE: the save waits for it, then finds the row
--     claimed and is refused (the file may be gone by now);
--   - a save that committed before claim() re-checked is seen by the re-check: the row goes stale.
-- A queue row that was never claimed is rescued by the save (cancelled in the same transaction).

CREATE FUNCTION orphan_cleanup.save_guard() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp SET jit = off
AS $$
DECLARE
    v_new uuid;
    v_old uuid;
    att orphan_cleanup.attachment;
    v_url text;
    v_rows bigint;
    v_bucket text;
    v_path text;
    q record;
    v_refuse_id bigint;
    v_refuse_detail text;
    v_rescue bigint[] := '{}';
BEGIN
    IF TG_OP <> 'DELETE' THEN
        v_new := orphan_cleanup.job_ref_key(NEW.metadata ->> 'render_job_id')::uuid;
    END IF;
    IF TG_OP <> 'INSERT' THEN
        v_old := orphan_cleanup.job_ref_key(OLD.metadata ->> 'render_job_id')::uuid;
    END IF;
    -- An asset stopped referencing a job: look at that job again in the next cycle.
    IF v_old IS NOT NULL AND v_old IS DISTINCT FROM v_new THEN
        INSERT INTO orphan_cleanup.recheck (job_id, reason)
        VALUES (v_old, 'asset ' || lower(TG_OP))
        ON CONFLICT (job_id) DO NOTHING;
    END IF;
    IF v_new IS NULL OR v_new IS NOT DISTINCT FROM v_old THEN
        RETURN NULL;
    END IF;
    SELECT * INTO att FROM orphan_cleanup.attachment;
    IF NOT FOUND THEN
        RETURN NULL;
    END IF;

    -- 1. The job row first: a claim that has not locked it yet will now skip it.
    EXECUTE format('SELECT j.output_url FROM %s AS j WHERE j.id = $1 FOR KEY SHARE', att.jobs_oid::regclass)
       INTO v_url USING v_new;
    GET DIAGNOSTICS v_rows = ROW_COUNT;
    IF v_url IS NOT NULL THEN
        SELECT p.bucket, p.object_path INTO v_bucket, v_path FROM orphan_cleanup.parse_output_url(v_url) AS p;
    END IF;

    -- 2. Then every queue row that could hand out this job's file.
    FOR q IN
        SELECT d.id, d.job_id, d.state, d.claim_count, d.claimed_by, d.url_hash, d.output_url
        FROM orphan_cleanup.deletion_queue AS d
        WHERE (d.job_id = v_new OR (d.bucket = v_bucket AND d.object_path = v_path))
          AND d.state IN ('pending', 'claimed', 'dead', 'deleted', 'absent')
        ORDER BY d.id
        FOR UPDATE
    LOOP
        IF (q.state IN ('pending', 'claimed', 'dead') AND q.claim_count > 0)
           OR (q.state IN ('deleted', 'absent') AND q.job_id = v_new
               AND (v_rows = 0 OR q.url_hash = md5(v_url))) THEN
            v_refuse_id := q.id;
            v_refuse_detail := format('Deletion queue row %s (state %s) handed %s to a reaper (%s).',
                                      q.id, q.state, q.output_url,
                                      coalesce('last claimed by ' || q.claimed_by, 'claimed before'));
            EXIT;
        ELSIF q.state = 'pending' THEN
            v_rescue := v_rescue || q.id;
        END IF;
    END LOOP;

    IF v_refuse_id IS NOT NULL THEN
        -- The refusal rolls back this transaction, audit row included. The sequence and the
        -- shared-memory note survive it; the worker or the next cycle writes the audit row.
        PERFORM pg_catalog.nextval('orphan_cleanup.refused_saves');
        PERFORM orphan_cleanup._note_refusal(v_new, v_refuse_id, session_user::text);
        RAISE EXCEPTION 'render job % cannot be saved: its output expired as an orphan and may already be deleted from storage', v_new
            USING ERRCODE = 'OC001',
                  DETAIL = v_refuse_detail,
                  HINT = 'Render the job again to save it; the database cannot bring the old file back.';
    END IF;

    IF cardinality(v_rescue) > 0 THEN
        WITH rescued AS (
            UPDATE orphan_cleanup.deletion_queue AS d
               SET state = 'rescued', reason = format('job %s was saved before any reaper claimed it', v_new),
                   finished_at = now(), updated_at = now()
             WHERE d.id = ANY (v_rescue)
            RETURNING d.id, d.job_id, d.output_url)
        INSERT INTO orphan_cleanup.audit_log (action, job_id, queue_id, output_url, actor, detail)
        SELECT 'rescued', r.job_id, r.id, r.output_url, session_user,
               CASE WHEN r.job_id = v_new THEN 'saved by an asset'
                    ELSE format('its object is also the output of job %s, which was saved', v_new) END
        FROM rescued AS r;
    END IF;
    RETURN NULL;
END
$$;

-- Moves refused saves noted in shared memory into the audit log.
CREATE FUNCTION orphan_cleanup._flush_refusals() RETURNS bigint
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp SET jit = off
AS $$
DECLARE
    n bigint;
BEGIN
    WITH taken AS (
        SELECT * FROM orphan_cleanup._take_refusals()
    ),
    audited AS (
        INSERT INTO orphan_cleanup.audit_log (at, action, job_id, queue_id, output_url, actor, detail)
        SELECT to_timestamp(t.unix_micros / 1e6), 'refused', t.job_id, t.queue_id, q.output_url, t.actor,
               'save refused (SQLSTATE OC001): the job''s output expired as an orphan and may already be deleted'
        FROM taken AS t
        LEFT JOIN orphan_cleanup.deletion_queue AS q ON q.id = t.queue_id
        RETURNING 1
    )
    SELECT count(*) INTO n FROM audited;
    RETURN n;
END
$$;

-- TRUNCATE of the assets table may make every job an orphan: the next cycle sweeps everything.
CREATE FUNCTION orphan_cleanup.truncate_guard() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp SET jit = off
AS $$
BEGIN
    UPDATE orphan_cleanup.detector_state SET sweep_started_at = NULL;
    RETURN NULL;
END
$$;

-- The indexes the design relies on, each with its CREATE INDEX CONCURRENTLY statement.
CREATE FUNCTION orphan_cleanup._index_report(v_jobs oid, v_assets oid, v_age_column text)
RETURNS TABLE (item text, status text, detail text)
LANGUAGE plpgsql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp SET jit = off
AS $$
DECLARE
    v_age_attnum smallint;
    v_jobs_name text;
    v_assets_name text;
BEGIN
    SELECT c.relname INTO v_jobs_name FROM pg_catalog.pg_class AS c WHERE c.oid = v_jobs;
    SELECT c.relname INTO v_assets_name FROM pg_catalog.pg_class AS c WHERE c.oid = v_assets;
    SELECT a.attnum INTO v_age_attnum FROM pg_catalog.pg_attribute AS a
    WHERE a.attrelid = v_jobs AND a.attname = v_age_column AND NOT a.attisdropped;

    item := 'index: assets by job reference';
    IF EXISTS (SELECT 1 FROM pg_catalog.pg_index AS i
               WHERE i.indrelid = v_assets AND i.indisvalid
                 AND pg_catalog.pg_get_indexdef(i.indexrelid) LIKE '%job_ref_key(%render_job_id%') THEN
        status := 'ok';
        detail := 'detection and claims find referencing assets by index';
    ELSE
        status := 'warning';
        detail := format('missing; every cycle and claim would scan the assets table. Run: CREATE INDEX CONCURRENTLY %I ON %s (orphan_cleanup.job_ref_key(metadata ->> %L));',
                         left(v_assets_name || '_render_job_ref_idx', 63), v_assets::regclass, 'render_job_id');
    END IF;
    RETURN NEXT;

    item := 'index: completed jobs by age';
    IF EXISTS (SELECT 1 FROM pg_catalog.pg_index AS i
               WHERE i.indrelid = v_jobs AND i.indisvalid AND i.indkey[0] = v_age_attnum) THEN
        status := 'ok';
        detail := 'incremental detection reads only new jobs';
    ELSE
        status := 'warning';
        detail := format('missing; every cycle would scan the jobs table. Run: CREATE INDEX CONCURRENTLY %I ON %s (%I, id) WHERE status = %L AND output_url IS NOT NULL;',
                         left(v_jobs_name || '_orphan_scan_idx', 63), v_jobs::regclass, v_age_column, 'completed');
    END IF;
    RETURN NEXT;

    item := 'index: jobs by storage object';
    IF EXISTS (SELECT 1 FROM pg_catalog.pg_index AS i
               WHERE i.indrelid = v_jobs AND i.indisvalid
                 AND pg_catalog.pg_get_indexdef(i.indexrelid) LIKE '%object_key(%output_url%') THEN
        status := 'ok';
        detail := 'jobs sharing one object are found by index';
    ELSE
        status := 'warning';
        detail := format('missing; the shared-object check would scan the jobs table. Run: CREATE INDEX CONCURRENTLY %I ON %s (orphan_cleanup.object_key(output_url));',
                         left(v_jobs_name || '_object_key_idx', 63), v_jobs::regclass);
    END IF;
    RETURN NEXT;
END
$$;

-- Drops the guard triggers from a table, if the table and the triggers still exist.
CREATE FUNCTION orphan_cleanup._drop_guards(rel oid) RETURNS void
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp SET jit = off
AS $$
DECLARE
    tg name;
BEGIN
    FOR tg IN
        SELECT t.tgname FROM pg_catalog.pg_trigger AS t
        WHERE t.tgrelid = rel AND t.tgname IN ('orphan_cleanup_save_guard', 'orphan_cleanup_truncate_guard')
    LOOP
        EXECUTE format('DROP TRIGGER %I ON %s', tg, rel::regclass);
    END LOOP;
END
$$;

-- Checks the configured tables, installs the save guard, and records the tables so that later
-- setting changes cannot silently redirect cycles and claims. Idempotent.
CREATE FUNCTION orphan_cleanup.attach()
RETURNS TABLE (item text, status text, detail text)
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp SET jit = off
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
            (v_jobs, cfg.age_column, ARRAY['timestamp with time zone', 'timestamp without time zone'], 'orphan_cleanup.age_column'),
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

    SELECT * INTO prev FROM orphan_cleanup.attachment;
    IF FOUND AND prev.assets_oid <> v_assets THEN
        PERFORM orphan_cleanup._drop_guards(prev.assets_oid);
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

    PERFORM orphan_cleanup._drop_guards(v_assets);
    EXECUTE format('CREATE TRIGGER orphan_cleanup_save_guard AFTER INSERT OR UPDATE OR DELETE ON %s FOR EACH ROW EXECUTE FUNCTION orphan_cleanup.save_guard()', v_assets::regclass);
    -- ALWAYS: the guard fires under session_replication_role = replica too (logical replication).
    EXECUTE format('ALTER TABLE %s ENABLE ALWAYS TRIGGER orphan_cleanup_save_guard', v_assets::regclass);
    EXECUTE format('CREATE TRIGGER orphan_cleanup_truncate_guard AFTER TRUNCATE ON %s FOR EACH STATEMENT EXECUTE FUNCTION orphan_cleanup.truncate_guard()', v_assets::regclass);

    INSERT INTO orphan_cleanup.audit_log (action, actor, detail)
    VALUES ('attached', session_user, format('jobs %s, assets %s, age column %I', v_jobs::regclass, v_assets::regclass, cfg.age_column));

    item := 'jobs table'; status := 'ok'; detail := v_jobs::regclass::text; RETURN NEXT;
    item := 'assets table'; status := 'ok'; detail := v_assets::regclass::text; RETURN NEXT;
    item := 'save guard'; status := 'ok';
    detail := format('trigger orphan_cleanup_save_guard installed on %s (enabled ALWAYS)', v_assets::regclass); RETURN NEXT;
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

-- Removes what attach() added. The queue and the history stay; cycles and claims stop.
CREATE FUNCTION orphan_cleanup.detach() RETURNS text
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp SET jit = off
AS $$
DECLARE
    prev orphan_cleanup.attachment;
BEGIN
    SELECT * INTO prev FROM orphan_cleanup.attachment;
    IF NOT FOUND THEN
        RETURN 'not attached; nothing to do';
    END IF;
    PERFORM orphan_cleanup._drop_guards(prev.assets_oid);
    DELETE FROM orphan_cleanup.attachment;
    INSERT INTO orphan_cleanup.audit_log (action, actor, detail)
    VALUES ('detached', session_user, format('from jobs %s, assets %s', prev.jobs_table, prev.assets_table));
    RETURN format('detached from %s and %s; cycles and claims stop until attach() runs again', prev.jobs_table, prev.assets_table);
END
$$;
