-- Stray objects (issue 15): objects in storage that no job row names. The guide's emergency
-- DELETE FROM render_jobs, jobs the app deleted, an upload whose job row was never written: the
-- files stay, and no cycle finds them, since cycles start from job rows. On Supabase (hosted or
-- self-hosted) storage keeps a row per object in storage.objects, in this database; that is the
-- inventory read here, read-only (the storage server refuses direct deletes there, and a row
-- deleted there would leave its file behind anyway).
--
-- An object is a stray when all of these hold:
--   - it is older than orphan_cleanup.stray_min_age (7 days by default): a render service that
--     uploads first writes the job row naming the file minutes later;
--   - no row of the jobs table names it, by any reading object_keys() makes of its output_url
--     (the save guard's lenient readings), whatever the job's status;
--   - its bucket and name pass the allow-lists, and its name is one a cycle could queue exactly
--     (check_output_url() reads `bucket/name`, a bare value it takes as written, back as
--     itself);
--   - it is not already in the deletion queue (pending, claimed or dead).

-- Why strays cannot be read in this database, or NULL: storage.objects is missing, or
-- row-level security on it applies to the role these functions run as (it would see only the
-- objects its policies let through).
CREATE FUNCTION orphan_cleanup._inventory_problem() RETURNS text
LANGUAGE sql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp
RETURN CASE
    WHEN to_regclass('storage.objects') IS NULL THEN
        'this database has no storage.objects table, the inventory Supabase Storage keeps of every object (hosted and self-hosted Supabase keep it in the project''s database: connect to that one)'
    WHEN NOT has_table_privilege('storage.objects', 'SELECT') THEN
        format('%s, the role pg_orphan_cleanup''s functions run as, cannot read storage.objects (fix: GRANT SELECT ON storage.objects TO %I)', current_user, current_user)
    WHEN row_security_active('storage.objects') THEN
        format('row-level security on storage.objects applies to %s, the role pg_orphan_cleanup''s functions run as: it would see only the objects its policies let through (fix, as a superuser: ALTER ROLE %I BYPASSRLS)', current_user, current_user)
END;

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

-- The strays created before `cutoff`, after (after_ts, after_id) in (created_at, id) order, at
-- most max_rows: in an allowed bucket and prefix, named by no job, not queued (a live or dead
-- row of any kind) and not kept by cancel(). With the storage.objects row each was seen as
-- (stored_id, stored_version): a claim hands out that upload only. The caller has checked
-- _inventory_problem().
CREATE FUNCTION orphan_cleanup._strays(jobs regclass, cutoff timestamptz, after_ts timestamptz, after_id uuid,
                                       max_rows integer)
RETURNS TABLE (bucket text, object_path text, bytes bigint, created_at timestamptz,
               stored_id uuid, stored_version text)
LANGUAGE plpgsql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp SET jit = off
AS $$
BEGIN
    RETURN QUERY EXECUTE format($sql$
        SELECT o.bucket_id::text, o.name::text, (o.metadata ->> 'size')::bigint, o.created_at,
               o.id, o.version::text
        FROM storage.objects AS o
        CROSS JOIN LATERAL orphan_cleanup.check_output_url(o.bucket_id || '/' || o.name) AS u
        WHERE o.created_at < $1 AND (o.created_at, o.id) > ($2, $3) %s
          AND u.error IS NULL AND u.bucket = o.bucket_id AND u.object_path = o.name
          AND NOT EXISTS (SELECT 1 FROM %s AS j
                          WHERE orphan_cleanup.object_keys(j.output_url) @> ARRAY[o.bucket_id || '/' || o.name])
          AND NOT EXISTS (SELECT 1 FROM orphan_cleanup.deletion_queue AS d
                          WHERE d.bucket = o.bucket_id AND d.object_path = o.name
                            AND d.state IN ('pending', 'claimed', 'dead'))
          AND NOT EXISTS (SELECT 1 FROM orphan_cleanup.objects AS k
                          WHERE k.bucket = o.bucket_id AND k.object_path = o.name AND k.kept_at IS NOT NULL)
        ORDER BY o.created_at, o.id
        LIMIT $4
        $sql$, orphan_cleanup._current_objects_only(), jobs)
    USING cutoff, after_ts, after_id, max_rows;
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
    v_problem := orphan_cleanup._index_problem(t.jobs_oid, t.assets_oid, t.age_column, with_scan => false);
    IF v_problem IS NOT NULL THEN
        RAISE EXCEPTION '% refused: %', fn, v_problem
            USING ERRCODE = 'object_not_in_prerequisite_state';
    END IF;
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
BEGIN
    PERFORM orphan_cleanup._strays_ready('preview_strays()', min_age, max_rows);
    RETURN QUERY
    SELECT s.bucket, s.object_path, s.bytes, s.created_at, date_trunc('second', now() - s.created_at)
    FROM orphan_cleanup._strays(
        (SELECT t.jobs_oid::regclass FROM orphan_cleanup._tables() AS t),
        now() - coalesce(min_age, make_interval(secs => (SELECT c.stray_min_age_s FROM orphan_cleanup._config() AS c))),
        '-infinity', '00000000-0000-0000-0000-000000000000', max_rows) AS s;
END
$$;

-- DBA: queues up to max_rows strays (preview_strays()'s, oldest first) for the reaper, once
-- orphan_cleanup.reclaim_strays is on. Each is queued with no job (kind 'stray'), as the upload
-- storage.objects holds now; claim() re-checks it (see there) before handing it out. Audited.
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
    got integer;
    added bigint;
    chunk integer;
BEGIN
    PERFORM orphan_cleanup._strays_ready('enqueue_strays()', min_age, max_rows);
    att := orphan_cleanup._require_attached('enqueue_strays()');
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
    cutoff := now() - coalesce(min_age, make_interval(secs => cfg.stray_min_age_s));
    LOOP
        chunk := least(max_rows - total, 5000);
        EXIT WHEN chunk <= 0;
        WITH s AS MATERIALIZED (
            SELECT * FROM orphan_cleanup._strays(att.jobs_oid::regclass, cutoff, cur_ts, cur_id, chunk)
        ),
        ins AS (
            INSERT INTO orphan_cleanup.deletion_queue AS d
                (job_id, kind, output_url, url_hash, host, bucket, object_path, state, available_at,
                 stored_id, stored_version)
            SELECT NULL, 'stray', s.bucket || '/' || s.object_path, md5(s.bucket || '/' || s.object_path), NULL,
                   s.bucket, s.object_path, 'pending', now() + make_interval(secs => cfg.grace_s),
                   s.stored_id, s.stored_version
            FROM s
            ON CONFLICT (bucket, object_path) WHERE job_id IS NULL AND state IN ('pending', 'claimed') DO NOTHING
            RETURNING d.id, d.bucket, d.object_path, d.output_url
        ),
        audited AS (
            INSERT INTO orphan_cleanup.audit_log (action, queue_id, output_url, actor, detail)
            SELECT 'enqueued', i.id, i.output_url, session_user,
                   format('a stray: no job names it (%s bytes, uploaded %s)', coalesce(s.bytes::text, 'unknown'), s.created_at)
            FROM ins AS i JOIN s ON s.bucket = i.bucket AND s.object_path = i.object_path
            RETURNING 1
        )
        SELECT (SELECT count(*) FROM s), (SELECT count(*) FROM ins),
               (SELECT s.created_at FROM s ORDER BY s.created_at DESC, s.stored_id DESC LIMIT 1),
               (SELECT s.stored_id FROM s ORDER BY s.created_at DESC, s.stored_id DESC LIMIT 1)
          INTO got, added, cur_ts, cur_id;
        total := total + added;
        EXIT WHEN got < chunk;
    END LOOP;
    IF total > 0 THEN
        PERFORM pg_catalog.pg_notify('orphan_cleanup_queue', total::text);
    END IF;
    RETURN total;
END
$$;
