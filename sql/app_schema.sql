-- The application tables of a Supabase-backed render app, as the deployment guide describes
-- them. Used by the demo and the tests; a real app has its own copy of these.

CREATE EXTENSION IF NOT EXISTS pgcrypto;  -- gen_random_uuid() on PostgreSQL < 13; harmless later

CREATE TABLE IF NOT EXISTS public.render_jobs (
    id           uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    user_id      uuid,
    status       text NOT NULL CHECK (status IN ('queued', 'running', 'completed', 'failed', 'cancelled')),
    output_url   text,
    prompt       text,
    error        text,
    created_at   timestamptz NOT NULL DEFAULT now(),
    updated_at   timestamptz,
    completed_at timestamptz
);

CREATE TABLE IF NOT EXISTS public.user_assets (
    id         uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    user_id    uuid,
    asset_type text NOT NULL,            -- generated_saved, upload, avatar, ...
    metadata   jsonb NOT NULL DEFAULT '{}',
    file_size  bigint,
    created_at timestamptz NOT NULL DEFAULT now()
);

-- The index the guide's own queries need (its exact-text join).
CREATE INDEX IF NOT EXISTS user_assets_render_job_id_idx ON public.user_assets ((metadata ->> 'render_job_id'));
CREATE INDEX IF NOT EXISTS render_jobs_created_at_idx ON public.render_jobs (created_at);
