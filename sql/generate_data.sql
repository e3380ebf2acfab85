-- Realistic render history for the demo and the benchmarks. psql variables:
--   :jobs   how many render jobs (e.g. 5000)
--   :base   the project URL the output URLs start with (e.g. https://abcd.supabase.co)
-- About 80% of jobs complete; users save about 30% of completed ones; a few saves spell the
-- job id differently (upper case, braces); some jobs fail or are still running; uploads and
-- avatars exist in other buckets and reference no job. Jobs are spread over the last 7 days,
-- with some from the last half hour (too young to be orphans).

INSERT INTO public.render_jobs (id, user_id, status, output_url, prompt, created_at, updated_at, completed_at)
SELECT id, user_id, status,
       CASE WHEN status = 'completed'
            THEN format('%s/storage/v1/object/public/renders/%s/%s.png', :'base', user_id, id) END,
       'a render',
       created_at, created_at + interval '40 seconds',
       CASE WHEN status = 'completed' THEN created_at + interval '40 seconds' END
FROM (
    SELECT gen_random_uuid() AS id,
           ('00000000-0000-4000-8000-' || lpad((g % 200)::text, 12, '0'))::uuid AS user_id,
           CASE WHEN r < 0.80 THEN 'completed' WHEN r < 0.90 THEN 'failed'
                WHEN r < 0.95 THEN 'running' ELSE 'queued' END AS status,
           CASE WHEN g % 50 = 0 THEN now() - random() * interval '30 minutes'
                ELSE now() - interval '1 hour' - random() * interval '6 days' END AS created_at
    FROM (SELECT g, random() AS r FROM generate_series(1, :jobs) AS g) AS s
) AS j;

-- Saves: about 30% of completed jobs, one in a hundred with a differently spelled id.
INSERT INTO public.user_assets (user_id, asset_type, metadata, file_size, created_at)
SELECT rj.user_id, 'generated_saved',
       jsonb_build_object('render_job_id', CASE WHEN random() < 0.01 THEN upper(rj.id::text) ELSE rj.id::text END,
                          'title', 'saved render'),
       100000 + (random() * 900000)::bigint,
       rj.created_at + interval '5 minutes'
FROM public.render_jobs AS rj
WHERE rj.status = 'completed' AND random() < 0.30;

-- Other asset types, in other buckets, referencing no job.
INSERT INTO public.user_assets (user_id, asset_type, metadata, file_size)
SELECT ('00000000-0000-4000-8000-' || lpad((g % 200)::text, 12, '0'))::uuid,
       CASE WHEN g % 4 = 0 THEN 'avatar' ELSE 'upload' END,
       jsonb_build_object('path', format('uploads/%s.jpg', g)),
       20000 + (random() * 200000)::bigint
FROM generate_series(1, greatest(:jobs / 10, 1)) AS g;

ANALYZE public.render_jobs;
ANALYZE public.user_assets;
