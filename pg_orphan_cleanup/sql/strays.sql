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

-- The strays, oldest first: objects in storage.objects that are older than `min_age`
-- (orphan_cleanup.stray_min_age by default), in an allowed bucket and prefix, named by no job
-- and not queued. Their size comes from the object's metadata. Writes nothing: what a DBA looks
-- at before turning reconciliation on.
CREATE FUNCTION orphan_cleanup.preview_strays(min_age interval DEFAULT NULL, max_rows integer DEFAULT 100)
RETURNS TABLE (bucket text, object_path text, bytes bigint, created_at timestamptz, age interval)
LANGUAGE plpgsql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp SET jit = off
AS $$
DECLARE
    t record;
    cfg record;
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
        RAISE EXCEPTION 'preview_strays() cannot read the objects in storage: %', v_problem
            USING ERRCODE = 'object_not_in_prerequisite_state';
    END IF;
    t := orphan_cleanup._tables();
    v_problem := orphan_cleanup._index_problem(t.jobs_oid, t.assets_oid, t.age_column, with_scan => false);
    IF v_problem IS NOT NULL THEN
        RAISE EXCEPTION 'preview_strays() refused: %', v_problem
            USING ERRCODE = 'object_not_in_prerequisite_state';
    END IF;
    SELECT * INTO cfg FROM orphan_cleanup._config();
    RETURN QUERY EXECUTE format($sql$
        SELECT o.bucket_id::text, o.name::text, (o.metadata ->> 'size')::bigint, o.created_at,
               date_trunc('second', now() - o.created_at)
        FROM storage.objects AS o
        CROSS JOIN LATERAL orphan_cleanup.check_output_url(o.bucket_id || '/' || o.name) AS u
        WHERE o.created_at < now() - $1
          AND u.error IS NULL AND u.bucket = o.bucket_id AND u.object_path = o.name
          AND NOT EXISTS (SELECT 1 FROM %s AS j
                          WHERE orphan_cleanup.object_keys(j.output_url) @> ARRAY[o.bucket_id || '/' || o.name])
          AND NOT EXISTS (SELECT 1 FROM orphan_cleanup.deletion_queue AS d
                          WHERE d.bucket = o.bucket_id AND d.object_path = o.name
                            AND d.state IN ('pending', 'claimed', 'dead'))
        ORDER BY o.created_at, o.bucket_id, o.name
        LIMIT $2
        $sql$, t.jobs_oid::regclass)
    USING coalesce(min_age, make_interval(secs => cfg.stray_min_age_s)), max_rows;
END
$$;
