-- Stray objects (issue 15): objects in storage that no job row names. The guide's emergency
-- DELETE FROM render_jobs, jobs the app deleted, an upload whose job row was never written: the
-- files stay, and no cycle finds them, since cycles start from job rows. On Supabase (hosted or
-- self-hosted) storage keeps a row per object in storage.objects, in this database; that is the
-- inventory read here, read-only (the storage server refuses direct deletes there, and a row
-- deleted there would leave its file behind anyway). Where it is not in this database, the
-- Storage API's listing in orphan_cleanup.object_inventory is read instead, the same way
-- (sql/inventory.sql, `reaper inventory`): _inventory() names the one read.
--
-- An object is a stray when all of these hold:
--   - it is older than orphan_cleanup.stray_min_age (7 days by default): a render service that
--     uploads first writes the job row naming the file minutes later;
--   - no row of the jobs table names it, by any reading object_keys() makes of its output_url
--     (the save guard's lenient readings), whatever the job's status;
--   - no extra reference names it (sql/references.sql), read the same way;
--   - its bucket and name pass the allow-lists, and its name is one a cycle could queue exactly
--     (check_output_url() reads `bucket/name`, a bare value it takes as written, back as
--     itself);
--   - it is not already in the deletion queue (pending, claimed or dead).

-- Why strays cannot be read in this database, or NULL: storage.objects is missing and no bucket
-- has been listed through the Storage API (`reaper inventory`, sql/inventory.sql), or it cannot
-- be read, or row-level security on it applies to the role these functions run as (it would see
-- only the objects its policies let through).
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

-- The rows of storage.objects that are objects, in SQL over alias `o`: with object versioning on
-- (off by default) a delete leaves a delete marker and archived versions, which are not.
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

-- One page of the inventory (_inventory()), at most page_rows rows past a cursor, each with whether it is a
-- stray: uploaded before `cutoff` (created, and last uploaded again: an upsert keeps created_at
-- and moves updated_at, the review of stray queueing), in an allowed bucket and prefix, named by no job (by any
-- reading object_keys() makes of its output_url), not queued (a live or dead row of any kind)
-- and not kept by cancel(). With the storage.objects row each was seen as (stored_id,
-- stored_version): a claim hands out that upload only. by_name: in (bucket_id, name) order,
-- after (after_bucket, after_name), through the unique index every storage.objects has (a full
-- pass); otherwise in (created_at, id) order after (after_ts, after_id), older than `cutoff`
-- only (a pass by creation time). The page bounds what one call reads, strays or not. The
-- caller has checked _inventory_problem().
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

-- One chunk of reconciliation: a page of storage.objects (see _stray_page()), and its strays
-- queued with no job (kind 'stray'), audited, at most max_enqueue of them (NULL: all); a capped
-- chunk ends at the last one it queued, so that the next goes on from there. A dry run queues
-- nothing and counts what it would have queued. Returns where the chunk ended.
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

-- Saved assets that reference a job whose row is gone: the files they showed are named by no job,
-- and may be among the strays. A deletion of jobs from before pg_orphan_cleanup was attached
-- (the guide's emergency DELETE joins on the exact id text and deletes saved jobs whose assets
-- spell the id otherwise) leaves such references; since attach() the guard keeps what a deleted
-- saved job named. preview_strays() and enqueue_strays() warn about them (one read of the
-- assets, a key lookup of each reference), with the query that lists them.
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

-- What preview_strays() and enqueue_strays() check first: their arguments, that storage.objects
-- can be read, and the indexes the job lookups need.
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

-- The strays, oldest first: objects in storage.objects that are older than `min_age`
-- (orphan_cleanup.stray_min_age by default), in an allowed bucket and prefix, named by no job
-- and not queued. Their size comes from the object's metadata. Writes nothing: what a DBA looks
-- at before turning reconciliation on.
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

-- DBA: queues up to max_rows strays (preview_strays()'s, oldest first) for the reaper, once
-- orphan_cleanup.reclaim_strays is on. Each is queued with no job (kind 'stray'), as the upload
-- storage.objects holds now; claim() re-checks it (see there) before handing it out. Audited.
-- Cycles do the same on their own (_reconcile_strays()); this is for a DBA who wants a batch now.
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

-- Whether the inventory (_inventory()) has a usable index that starts with created_at: what lets a cycle look
-- at the objects that became old enough since its last look without reading the whole table.
CREATE FUNCTION orphan_cleanup._stray_index_ok() RETURNS boolean
LANGUAGE sql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp
RETURN EXISTS (
    SELECT 1 FROM pg_catalog.pg_index AS i
    JOIN pg_catalog.pg_attribute AS a ON a.attrelid = i.indrelid AND a.attnum = i.indkey[0]
    WHERE i.indrelid = orphan_cleanup._inventory() AND a.attname = 'created_at'
      AND i.indisvalid AND i.indisready AND i.indpred IS NULL);

-- Reconciliation, in a cycle, while orphan_cleanup.reclaim_strays is on: strays are queued as
-- orphans are, within the cycle's max_per_cycle (max_enqueue here), its time budget (deadline)
-- and its circuit breaker (p_limit, counting the p_already rows the cycle queued before). Two
-- passes, neither reading all of storage.objects in one cycle:
--   - a full pass every full_sweep_interval, a chunk at a time in (bucket_id, name) order
--     through the unique index every storage.objects has, over as many cycles as it takes. It
--     finds the objects whose job rows went after an earlier look (the guide's emergency
--     DELETE, jobs the app deleted). Its cost is the cycle log's stray columns;
--   - between full passes, the objects that became older than stray_min_age since the last
--     look, in (created_at, id) order from where that look stopped: only where storage.objects
--     has an index on created_at (_stray_index_ok(); health() gives the statement). Without
--     one, each look would read the whole table, and new strays wait for the next full pass.
-- A dry run queues nothing, counts what it would queue, and moves no cursor.
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

-- The circuit breaker, after each chunk of strays: a flood of strays (a jobs table restored
-- empty, or emptied, makes every object one) stops the cycle with OC002, and run_cycle() rolls
-- it back and records the trip.
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
