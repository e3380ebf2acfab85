-- The save guard and attach(): no saved asset ever loses its file.
--
-- The unit of safety is the storage object (bucket and key), not the job and not the URL text.
-- The invariant: once a claim has handed an object to a reaper, no job naming that object can be
-- saved, and no saved job can be pointed at it. orphan_cleanup.objects records the hand-out, in
-- the claim's own transaction, and nothing but a proven-unsent release ever clears it.
--
-- The protocol. The object's row (orphan_cleanup.objects) is where saves and claims meet:
--   - a save (an asset row that starts referencing job J) writes J's fence row, locks J's row
--     FOR KEY SHARE, then creates the row of each object J's URL could name (object_keys(),
--     in sorted order) if it has none and locks it FOR SHARE, and is refused if one was handed
--     out;
--   - a write that points a job at objects (INSERT, or an UPDATE that changes them) holds their
--     rows the same way; if one was handed out, it writes the job's fence row and is refused if
--     the job is saved. An INSERT (or a change of id) writes the fence row
--     first in any case: a save may have come before the job existed;
--   - claim() locks the object rows FOR UPDATE SKIP LOCKED, re-checks every job naming the
--     object in a new statement (a fresh snapshot), and counts the hand-out in the object's row.
-- A save or job write in flight holds the object's row: the claim skips it. A claim in flight
-- holds it: the save waits, then sees the hand-out and is refused (OC001). At REPEATABLE READ or
-- SERIALIZABLE a save whose snapshot predates the claim cannot see the hand-out, but it meets a
-- row version it cannot see (the claim created the row, or updated it) and fails with a
-- serialization error (40001); the app's retry then sees the hand-out and gets OC001. Saves of
-- different jobs naming one object share its row's lock and do not wait for each other. A save
-- and a job write of the same job meet on the job's fence row, which both write: at READ
-- COMMITTED the later one sees the other's commit (the save reads the job row after writing
-- the fence), at REPEATABLE READ it fails with 40001.
-- A queue row that was never handed out is rescued by the save (retired in its transaction).

-- The buckets of orphan_cleanup.allowed_buckets, as a sorted array.
CREATE FUNCTION orphan_cleanup._allowed_bucket_list() RETURNS text[]
LANGUAGE plpgsql STABLE SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    RETURN ARRAY(SELECT DISTINCT btrim(b)
                 FROM unnest(string_to_array((SELECT c.allowed_buckets FROM orphan_cleanup._config() AS c), ',')) AS b
                 WHERE btrim(b) <> '' ORDER BY 1);
END
$$;

-- Every object a job's URL could name, for protection (object_keys(): the strict reading and
-- the lenient ones, so that a spelling the app reads otherwise than the strict parser still
-- protects the file it means), as bucket and path, in sorted order (so that two sessions
-- holding the rows of overlapping sets take them in the same order). Each reading also as a
-- key relative to each allowed bucket: an app may store the bucket-relative path Storage's
-- upload returns (`u1/x.png` for renders/u1/x.png), which the bare reading takes as bucket u1
-- (the review of stray queueing); claims and cycles look jobs up by both (see _names_of()).
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

-- The keys by which a job's object_keys() names the object `key` (bucket/path): that key, or its
-- path alone (a bucket-relative path, which the bare reading takes as another bucket/key). Jobs
-- are looked up by both (object_keys(output_url) && _names_of(key)), through the GIN index.
CREATE FUNCTION orphan_cleanup._names_of(key text) RETURNS text[]
LANGUAGE sql IMMUTABLE PARALLEL SAFE
RETURN ARRAY[key, pg_catalog.substr(key, pg_catalog.strpos(key, '/') OPERATOR(pg_catalog.+) 1)];

-- Why object_keys() cannot vouch for a value, or NULL: it reads values of up to 65,536 bytes,
-- up to 16 URLs and storage routes (counted by scheme and by route: a storage URL is two) in
-- each layer of a value, 6 layers of wrapping (JSON, percent-encoding) under the value as
-- written, and 32,768 bytes of readings in all (object-url's limits, which keep its work
-- bounded; _route_count() and _reading_size() are object-url's route_count() and
-- reading_size(), in Rust or PL/pgSQL as the edition has it). A value past them may name an
-- object no reading found, so a job with such a URL is never saved (save_guard, job_guard,
-- attach()): the third review of issue 14 padded a saved job's URL past 64 KiB, and the file it
-- named was claimed; the tenth crafted a 2 KB value that took 16 s to read. No render service
-- writes such a value.
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

-- Refuses to let job `p_job` be saved with a URL whose objects cannot all be read (OC003).
CREATE FUNCTION orphan_cleanup._refuse_unread(p_job uuid, p_why text) RETURNS void
LANGUAGE plpgsql VOLATILE SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    RAISE EXCEPTION 'render job % cannot be saved: % (it cannot tell which files the value names, so it could not keep them)', p_job, p_why
        USING ERRCODE = 'OC003',
              HINT = 'Store the file''s URL as Supabase Storage returns it (getPublicUrl() or createSignedUrl()) in output_url, and anything else in another column.';
END
$$;

-- Whether an asset references job `p_job` (any spelling job_ref_key() reads).
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

-- Refuses (OC003, naming the job and the fix) while a saved job has a URL object_keys() cannot
-- read in full: attach() and the update to 0.2.0 run it once the guards are in place (their
-- locks held), so that no job saved before them is left protecting nothing. One scan of the
-- jobs table's URL lengths.
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

-- Writes the fence row of a job (see job_fences), stamped with the time of the write, not the
-- transaction's start: a fence row is pruned a day after its stamp, and one written by a
-- transaction that had been open for a day must not be pruned the moment it commits (a
-- REPEATABLE READ write of the job older than that commit would then meet no row, and no
-- conflict; the fourth review).
CREATE FUNCTION orphan_cleanup._fence_job(p_job uuid) RETURNS void
LANGUAGE sql VOLATILE SET search_path = pg_catalog, pg_temp
BEGIN ATOMIC
    INSERT INTO orphan_cleanup.job_fences AS f (job_id, touched_at) VALUES (p_job, clock_timestamp())
    ON CONFLICT (job_id) DO UPDATE SET touched_at = clock_timestamp();
END;

-- Holds the row of an object (creating it if it has none) with a shared lock and returns it:
-- what a save and a job write do before they look at the object (see the protocol above). A row
-- pruned between the two statements is created again.
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

-- Refuses a save: counted and noted (the refusal rolls its transaction back, audit row included;
-- the sequence and the shared-memory note survive it, and the next cycle writes the audit row).
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

-- The save guard reads the app's tables as their owner: where row-level security applies to
-- it, it could not see the job a save names, and a save of a handed-out object would pass. Such
-- a save is refused, with the fix (claims and cycles stop too: see _rls_problem() in
-- _guard_problem(); the job guard takes every job as saved: see _job_is_saved()).
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

CREATE FUNCTION orphan_cleanup.save_guard() RETURNS trigger
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

-- What a save of job `v_new` does (save_guard(), and a look at a partition that joined the
-- assets table with its assets: sql/partitions.sql): meets job writes on the job's fence row,
-- holds the objects the job could name, refuses (OC001) if one was handed out, and rescues the
-- queue rows that would still hand its file out.
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

-- The other half of the guard, on the jobs table: a write that points a job at objects
-- (INSERT, or an UPDATE that changes the objects its output_url could name; a refreshed
-- signed-URL token names the same ones) holds their rows, so a claim of one of them and this
-- write are ordered. Pointing a saved job at a handed-out object is refused (OC002); an unsaved
-- job may name it (a render cache hit), but can then never be saved (OC001).
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

-- A saved job's row goes while an asset still references it (a DELETE such as the guide's
-- emergency DELETE, whose join misses a spelling of the id that job_ref_key() reads; a change of
-- its id; a TRUNCATE): the objects its URL names are kept as cancel() keeps them, so that none
-- becomes a stray, nor is handed out for another job naming it (the review of stray queueing).
-- Audited. Objects with a live hand-out cannot be named by a saved job (the save guard).
CREATE FUNCTION orphan_cleanup._keep_if_saved(att orphan_cleanup.attachment, p_job uuid, p_url text, p_why text) RETURNS void
LANGUAGE plpgsql VOLATILE SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    IF p_url IS NOT NULL AND p_job IS NOT NULL AND orphan_cleanup._job_is_saved(att, p_job) THEN
        PERFORM orphan_cleanup._keep_saved(p_job, p_url, p_why);
    END IF;
END
$$;

-- Keeps the objects saved job `p_job`'s URL names (see _keep_if_saved()), audited.
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

-- TRUNCATE of the jobs table (a restore into an emptied table, say): the objects of every saved
-- job are kept first (_keep_if_saved()), in one statement over the saved jobs.
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

-- The indexes the design relies on. Each row: whether a usable one exists, what is wrong with
-- the closest one when none is, and the statement that creates one. Usable is read from the
-- catalog, never guessed from a name: valid, ready and live (a failed or unfinished CREATE INDEX
-- CONCURRENTLY leaves an invalid index behind, which the planner never uses), btree (GIN for
-- the jobs' object sets) with the default operator classes and collation, the lookup's column or expression as the first key
-- column, and no WHERE clause (the scan index: none, or the recommended one). The guide's own
-- index on (metadata ->> 'render_job_id') does not count: lookups go through job_ref_key().
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

-- Why cycles, claims and previews must not run on these tables for want of indexes, with the
-- statements that fix it; NULL when nothing is missing. Without the indexes every per-row
-- lookup reads a whole table: a first cycle over 5,000 jobs took over three minutes, all of it
-- inside one transaction. Claims and confirms (with_scan false) look jobs up by reference, by
-- object and by id, never scan them by age.
CREATE FUNCTION orphan_cleanup._index_problem(v_jobs oid, v_assets oid, v_age_column text, with_scan boolean DEFAULT true) RETURNS text
LANGUAGE sql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp SET jit = off
AS $$
    SELECT format('the indexes pg_orphan_cleanup relies on are not usable (%s): without them each lookup reads a whole table, for every row, which takes hours on a large table and holds a transaction open all that time. Run, outside a transaction block: %s',
                  string_agg(r.item || ': ' || r.problem, '; '), string_agg(r.statement, ' '))
    FROM orphan_cleanup._required_indexes(v_jobs, v_assets, v_age_column) AS r
    WHERE NOT r.usable AND (with_scan OR r.for_claims)
    HAVING count(*) > 0
$$;

-- The indexes, as health() and attach() report them: critical while one is not usable, since
-- cycles and previews (and, for the lookup indexes, claims) refuse to run without it.
CREATE FUNCTION orphan_cleanup._index_report(v_jobs oid, v_assets oid, v_age_column text)
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

-- The transactions in which the extension's own functions are changing guards (attach(),
-- detach(), add_reference(), a look at the partitions, the update): the DDL watch stays out of
-- their way while such a function runs, and only then. A table that only the extension writes,
-- not a setting: any role may SET a custom setting, and one left on after attach() returned let
-- the rest of its transaction past the watch (the sixth review of partitions).
CREATE TABLE orphan_cleanup.guards_changing (
    txid  xid8 PRIMARY KEY,
    since timestamptz NOT NULL DEFAULT now()
);

-- Marks this transaction as changing guards. True when this call marked it: the caller unmarks
-- it when done (_guards_changed()); a nested call leaves that to the outer one.
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

-- Drops the guard triggers from a table, if the table and the triggers still exist (attach(),
-- detach() and the update, which mark themselves as changing guards).
CREATE FUNCTION orphan_cleanup._drop_guards(rel oid) RETURNS void
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

-- Drops the TRUNCATE guards sql/partitions.sql put on the recorded partitions of the jobs table
-- (statement triggers of their own, not clones of the table's row triggers, which go with it),
-- and forgets the partitions: detach(), or attach() to other tables.
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

-- Checks the configured tables, installs the save guard, and records the tables so that later
-- setting changes cannot silently redirect cycles and claims. Idempotent.
CREATE FUNCTION orphan_cleanup.attach()
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

-- Refuses to go on while reapers hold claims (`what` says who asks): without the guards a save
-- of a job whose file a reaper is deleting right now would commit. The tables are locked first
-- (SHARE ROW EXCLUSIVE): a claim in flight holds ROW EXCLUSIVE on them from its start, so this
-- waits for it, and the check, a statement of its own, then sees what it claimed.
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

-- Whether the DDL command the watch below is looking at acted on one of `rels` (for an ATTACH or
-- DETACH, the partitioned table; for a CREATE TABLE ... PARTITION OF, the new table).
CREATE FUNCTION orphan_cleanup._ddl_touches(rels oid[]) RETURNS boolean
LANGUAGE sql STABLE SET search_path = pg_catalog, pg_temp
RETURN EXISTS (SELECT 1 FROM pg_catalog.pg_event_trigger_ddl_commands() AS e WHERE e.objid = ANY (rels));

-- Keeps the guard triggers in place while reapers hold claims: an ALTER TABLE ... DISABLE TRIGGER
-- (a bulk load, pg_restore --disable-triggers), a DROP TRIGGER or a trigger replaced, that leaves
-- the attached tables without their exact guards while any row is claimed, is refused. (With
-- nothing claimed it goes through; claims then stop and health() is critical until attach().)
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

-- (CREATE SCHEMA: it may create a partition; CREATE FOREIGN TABLE: a foreign partition.)
CREATE EVENT TRIGGER orphan_cleanup_guard_watch ON ddl_command_end
    WHEN TAG IN ('ALTER TABLE', 'DROP TRIGGER', 'CREATE TRIGGER', 'ALTER TRIGGER', 'CREATE TABLE', 'CREATE SCHEMA', 'CREATE FOREIGN TABLE')
    EXECUTE FUNCTION orphan_cleanup._watch_guards();
-- ALWAYS: it fires under session_replication_role = replica too, as the guards do.
ALTER EVENT TRIGGER orphan_cleanup_guard_watch ENABLE ALWAYS;
