-- The indexes pg_orphan_cleanup relies on, for the default tables. orphan_cleanup.attach() prints
-- the same statements for your own table names. Run after CREATE EXTENSION pg_orphan_cleanup,
-- outside a transaction (CONCURRENTLY does not block the app's writes).

-- Assets by job reference, whatever the spelling of the id (detection, claims, the save guard).
CREATE INDEX CONCURRENTLY IF NOT EXISTS user_assets_render_job_ref_idx
    ON public.user_assets (orphan_cleanup.job_ref_key(metadata ->> 'render_job_id'));

-- Completed jobs by age: incremental detection reads only jobs past its cursor.
CREATE INDEX CONCURRENTLY IF NOT EXISTS render_jobs_orphan_scan_idx
    ON public.render_jobs (created_at, id) WHERE status = 'completed' AND output_url IS NOT NULL;

-- Jobs by the storage objects their URL could name (GIN over object_keys(): a URL can be read
-- more than one way, and each reading is protected): jobs sharing an object are found cheaply.
-- fastupdate off: with GIN's pending list every lookup would read all of it.
CREATE INDEX CONCURRENTLY IF NOT EXISTS render_jobs_object_keys_idx
    ON public.render_jobs USING gin (orphan_cleanup.object_keys(output_url)) WITH (fastupdate = off);
