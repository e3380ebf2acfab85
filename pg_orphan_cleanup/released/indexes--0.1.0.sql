-- The indexes pg_orphan_cleanup 0.1.0 recommended (sql/indexes.sql as released), for tests that
-- install 0.1.0 and upgrade it. 0.2.0 looks jobs up through a GIN index on object_keys() instead
-- of object_key() (see sql/indexes.sql).

-- Assets by job reference, whatever the spelling of the id (detection, claims, the save guard).
CREATE INDEX CONCURRENTLY IF NOT EXISTS user_assets_render_job_ref_idx
    ON public.user_assets (orphan_cleanup.job_ref_key(metadata ->> 'render_job_id'));

-- Completed jobs by age: incremental detection reads only jobs past its cursor.
CREATE INDEX CONCURRENTLY IF NOT EXISTS render_jobs_orphan_scan_idx
    ON public.render_jobs (created_at, id) WHERE status = 'completed' AND output_url IS NOT NULL;

-- Jobs by the storage object they point to: two jobs sharing one object are found cheaply.
CREATE INDEX CONCURRENTLY IF NOT EXISTS render_jobs_object_key_idx
    ON public.render_jobs (orphan_cleanup.object_key(output_url));
