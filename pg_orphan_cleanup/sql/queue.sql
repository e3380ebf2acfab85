-- The queue API the reaper drains: claim, confirm, fail, release, peek, queue_status.
-- And the DBA's levers on it: cancel, requeue_dead.
--
-- A row moves pending -> claimed -> deleted | absent, or back to pending on fail/release/lease
-- expiry, or to dead once out of attempts. Only the holder of a claim can confirm, fail, release
-- or refuse it: each claim() returns a secret lease token (a fencing token) that those calls
-- require; the queue keeps only its hash. Once an object has been handed out, its file may be
-- gone: the save guard refuses saves of every job naming it (see guard.sql), unless the holder
-- gives the claim back saying that nothing was sent (release(..., nothing_sent => true), refuse()).

CREATE FUNCTION orphan_cleanup._check_worker(worker text) RETURNS void
LANGUAGE plpgsql IMMUTABLE SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    IF worker IS NULL OR btrim(worker) = '' OR length(worker) > 200 THEN
        RAISE EXCEPTION 'worker must be a non-empty id of at most 200 characters, got %', coalesce(quote_literal(worker), 'NULL')
            USING ERRCODE = 'invalid_parameter_value',
                  HINT = 'Pass a stable id per reaper process, e.g. host:pid:random.';
    END IF;
END
$$;

-- The hash a claim's lease token is kept as. The token is a uuid from gen_random_uuid() (122
-- random bits from the server's strong random source), passed as text; anything else is refused.
CREATE FUNCTION orphan_cleanup._lease_hash(lease_token text) RETURNS bytea
LANGUAGE plpgsql IMMUTABLE SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    IF lease_token IS NULL OR lease_token !~* '^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$' THEN
        RAISE EXCEPTION 'lease_token must be the lease_token that claim() returned with these rows'
            USING ERRCODE = 'invalid_parameter_value',
                  HINT = 'Each claim() returns one lease_token for all of its rows; confirm, fail, release and refuse need it.';
    END IF;
    RETURN sha256(uuid_send(lease_token::uuid));
END
$$;

-- A reaper older than 0.2.0 calls confirm, fail, release and refuse without a lease token: those
-- signatures are kept only to say so. (The new ones take more arguments, none of them optional
-- up to that count, so that a call of either kind resolves to exactly one function.)
CREATE FUNCTION orphan_cleanup._needs_lease_token(fn text) RETURNS void
LANGUAGE plpgsql IMMUTABLE SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    RAISE EXCEPTION '%() needs the lease token that claim() returned: call orphan_cleanup.%(worker, lease_token, ids, ...)', fn, fn
        USING ERRCODE = 'undefined_function',
              HINT = 'A reaper older than pg_orphan_cleanup 0.2.0 cannot work with this version: stop it and run reaper 0.2.0 or later. Rows it holds come back when their lease ends.';
END
$$;

CREATE FUNCTION orphan_cleanup.confirm(worker text, ids bigint[], outcome text DEFAULT 'deleted')
RETURNS TABLE (id bigint, result text)
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp
AS $$ BEGIN PERFORM orphan_cleanup._needs_lease_token('confirm'); END $$;

CREATE FUNCTION orphan_cleanup.fail(worker text, ids bigint[], error text, retryable boolean DEFAULT true)
RETURNS TABLE (id bigint, result text)
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp
AS $$ BEGIN PERFORM orphan_cleanup._needs_lease_token('fail'); END $$;

CREATE FUNCTION orphan_cleanup.release(worker text, ids bigint[] DEFAULT NULL, reason text DEFAULT NULL) RETURNS bigint
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp
AS $$ BEGIN PERFORM orphan_cleanup._needs_lease_token('release'); RETURN NULL; END $$;

CREATE FUNCTION orphan_cleanup.refuse(worker text, ids bigint[], reason text)
RETURNS TABLE (id bigint, result text)
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp
AS $$ BEGIN PERFORM orphan_cleanup._needs_lease_token('refuse'); END $$;

-- Retry back-off: base (orphan_cleanup.retry_backoff, 30 s) doubling per attempt, at most 1 h,
-- with +-20% jitter so that rows failed together do not come back together. Callers read the
-- base once per statement, not once per row.
CREATE FUNCTION orphan_cleanup._backoff(attempt integer, base_s integer) RETURNS interval
LANGUAGE sql VOLATILE SET search_path = pg_catalog, pg_temp
RETURN least(interval '1 hour', make_interval(secs => base_s) * power(2, least(greatest(attempt, 1), 20) - 1))
       * (0.8 + random() * 0.4);

-- Claims whose lease ran out come back as pending, and the expiry counts as an attempt: a row
-- that crashes every reaper ends up dead-lettered instead of looping forever. At most 5,000 per
-- call, the longest-expired first (every cycle and every claim() calls this): a fleet of reapers
-- that died holding big batches is worked off over a few calls instead of in one long statement
-- inside a cycle's time budget or a reaper's claim.
CREATE FUNCTION orphan_cleanup._expire_leases(actor text) RETURNS bigint
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp SET jit = off SET enable_seqscan = off
AS $$
DECLARE
    v_max integer := (SELECT max_attempts FROM orphan_cleanup._config());
    v_backoff_s integer := (SELECT retry_backoff_s FROM orphan_cleanup._config());
    n bigint;
BEGIN
    WITH expired AS (
        SELECT d.id FROM orphan_cleanup.deletion_queue AS d
        WHERE d.state = 'claimed' AND d.lease_until < now()
        ORDER BY d.lease_until
        LIMIT 5000
        FOR UPDATE SKIP LOCKED
    ),
    moved AS (
        UPDATE orphan_cleanup.deletion_queue AS d
           SET attempts = d.attempts + 1,
               state = CASE WHEN d.attempts + 1 >= v_max THEN 'dead' ELSE 'pending' END,
               available_at = now() + orphan_cleanup._backoff(d.attempts + 1, v_backoff_s),
               last_error = format('lease expired: %s claimed it at %s and never confirmed', d.claimed_by, d.claimed_at),
               lease_until = NULL, lease_hash = NULL,
               finished_at = CASE WHEN d.attempts + 1 >= v_max THEN now() END,
               updated_at = now()
          FROM expired
         WHERE d.id = expired.id
        RETURNING d.id, d.job_id, d.output_url, d.state, d.last_error, d.attempts
    ),
    audited AS (
        INSERT INTO orphan_cleanup.audit_log (action, job_id, queue_id, output_url, actor, detail)
        SELECT 'failed', m.job_id, m.id, m.output_url, actor, format('%s (attempt %s)', m.last_error, m.attempts) FROM moved AS m
        UNION ALL
        SELECT 'dead_lettered', m.job_id, m.id, m.output_url, actor, format('out of attempts (%s): %s', m.attempts, m.last_error)
        FROM moved AS m WHERE m.state = 'dead'
    )
    SELECT count(*) INTO n FROM moved;
    RETURN n;
END
$$;

-- Whether a reaper is this database's project's: its own host (its SUPABASE_URL's, `home`) is one
-- of orphan_cleanup.allowed_hosts. A reaper deletes every object through its own SUPABASE_URL,
-- whatever host the row names, so a reaper of another project (a staging reaper pointed at
-- production's database, even one that lists production's host) must be handed nothing: it would
-- delete its own project's objects of the same names and close this project's rows. Undecidable,
-- and so allowed, when allowed_hosts names no host (only bare bucket/key values are queued then;
-- health() warns when reapers of several hosts claim) or when the caller names no hosts at all
-- (a reaper older than 0.2.0; health() names it).
CREATE FUNCTION orphan_cleanup._home_ok(hosts text[], home text) RETURNS boolean
LANGUAGE sql STABLE SET search_path = pg_catalog, pg_temp
RETURN hosts IS NULL
    OR orphan_cleanup._no_entries((SELECT c.allowed_hosts FROM orphan_cleanup._config() AS c))
    OR coalesce(home = ANY (orphan_cleanup._allowed_hosts()), false);

-- Whether a reaper that serves these buckets and hosts (NULL: any), and is this project's
-- (home_ok, see _home_ok()), may delete an object in `bucket` named through `host`. A bare
-- bucket/key value names no host: every reaper of this project serves it.
CREATE FUNCTION orphan_cleanup._serves(buckets text[], hosts text[], home_ok boolean, bucket text, host text) RETURNS boolean
LANGUAGE sql IMMUTABLE PARALLEL SAFE
RETURN home_ok
   AND (buckets IS NULL OR bucket OPERATOR(pg_catalog.=) ANY (buckets))
   AND (host IS NULL OR hosts IS NULL OR host OPERATOR(pg_catalog.=) ANY (hosts));

-- The reapers registry is bookkeeping: a claim never waits for it. Whoever writes a reaper's
-- row first takes this transaction-scoped advisory lock without waiting; a claim that cannot
-- get it (the reaper's second connection claiming at the same moment, or anyone holding a
-- transaction open under its worker id) skips the bookkeeping, and the other claim records the
-- same. Without it, the first claim of a new worker id, left uncommitted, made every other
-- claim under that id wait on its INSERT.
CREATE FUNCTION orphan_cleanup._lock_reaper_row(p_reaper text) RETURNS boolean
LANGUAGE sql VOLATILE SET search_path = pg_catalog, pg_temp
RETURN pg_try_advisory_xact_lock(7310248, hashtext(p_reaper));

-- Records what a reaper serves. A reaper whose lists changed (restarted with a fixed
-- --storage-hosts under the same --worker-id) may be handed the rows it refused before again.
CREATE FUNCTION orphan_cleanup._note_reaper(p_reaper text, p_buckets text[], p_hosts text[], p_home text) RETURNS void
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp SET jit = off
AS $$
BEGIN
    IF NOT orphan_cleanup._lock_reaper_row(p_reaper) THEN
        RETURN;
    END IF;
    IF EXISTS (SELECT 1 FROM orphan_cleanup.reapers AS r
               WHERE r.reaper = p_reaper
                 AND (r.buckets IS DISTINCT FROM p_buckets OR r.hosts IS DISTINCT FROM p_hosts OR r.home IS DISTINCT FROM p_home)) THEN
        DELETE FROM orphan_cleanup.refusals AS f WHERE f.refused_by = p_reaper;
    END IF;
    INSERT INTO orphan_cleanup.reapers AS r (reaper, buckets, hosts, home)
    VALUES (p_reaper, p_buckets, p_hosts, p_home)
    ON CONFLICT (reaper) DO UPDATE
       SET buckets = EXCLUDED.buckets, hosts = EXCLUDED.hosts, home = EXCLUDED.home, last_claim_at = now();
END
$$;

-- Notes which ready rows a claim that came back short left to other reapers, looking among the
-- oldest max_rows ready rows (the ones it would otherwise have taken). Only short claims look:
-- a reaper that gets all it asks for is not waiting on rows it cannot serve, and a full claim
-- pays nothing for this. Skipped, like _note_reaper(), while another claim writes the row.
CREATE FUNCTION orphan_cleanup._note_passed_over(p_reaper text, p_max integer, p_buckets text[], p_hosts text[], p_home_ok boolean) RETURNS void
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp SET jit = off
AS $$
DECLARE
    v_passed bigint;
    v_what text;
BEGIN
    IF NOT orphan_cleanup._lock_reaper_row(p_reaper) THEN
        RETURN;
    END IF;
    SELECT count(*), string_agg(DISTINCT format('%s @ %s', s.bucket, coalesce(s.host, '(no host: a bare bucket/key value)')), ', ')
      INTO v_passed, v_what
    FROM (SELECT d.bucket, d.host FROM orphan_cleanup.deletion_queue AS d
          WHERE d.state = 'pending' AND d.available_at <= now()
          ORDER BY d.available_at, d.id
          LIMIT p_max) AS s
    WHERE NOT orphan_cleanup._serves(p_buckets, p_hosts, p_home_ok, s.bucket, s.host);
    UPDATE orphan_cleanup.reapers AS r
       SET passed_over = v_passed,
           passed_over_what = CASE WHEN v_passed > 0 THEN v_what ELSE r.passed_over_what END,
           passed_over_at = CASE WHEN v_passed > 0 THEN now() ELSE r.passed_over_at END
     WHERE r.reaper = p_reaper;
END
$$;

-- Creates the rows of objects that have none yet, for claim(), and returns the ones it created
-- (which this transaction now holds). A save or job write of the same object in flight may be
-- creating the row at this moment: a claim never waits for the app, so it gives up on such an
-- object after a short lock_timeout (retrying the others one by one) and leaves its queue row
-- for a later claim. ON CONFLICT DO NOTHING skips rows another transaction committed meanwhile.
CREATE FUNCTION orphan_cleanup._new_objects(p_buckets text[], p_paths text[]) RETURNS text[]
LANGUAGE plpgsql VOLATILE SET search_path = pg_catalog, pg_temp SET lock_timeout = '20ms'
AS $$
DECLARE
    v_made text[];
    v_one text;
    i integer;
BEGIN
    BEGIN
        WITH made AS (
            INSERT INTO orphan_cleanup.objects AS o (bucket, object_path)
            SELECT * FROM unnest(p_buckets, p_paths)
            ON CONFLICT (bucket, object_path) DO NOTHING
            RETURNING o.bucket || '/' || o.object_path AS key)
        SELECT array_agg(m.key) INTO v_made FROM made AS m;
    EXCEPTION WHEN lock_not_available THEN
        v_made := '{}';
        FOR i IN 1 .. cardinality(p_paths) LOOP
            BEGIN
                v_one := NULL;
                INSERT INTO orphan_cleanup.objects AS o (bucket, object_path) VALUES (p_buckets[i], p_paths[i])
                ON CONFLICT (bucket, object_path) DO NOTHING
                RETURNING o.bucket || '/' || o.object_path INTO v_one;
                IF v_one IS NOT NULL THEN
                    v_made := v_made || v_one;
                END IF;
            EXCEPTION WHEN lock_not_available THEN
                NULL;  -- being created by a save or job write in flight: skipped this time
            END;
        END LOOP;
    END;
    RETURN coalesce(v_made, '{}');
END
$$;

-- Hands up to max_rows queued objects to a reaper for lease. Each row is re-checked under the
-- save-guard protocol first; a row that fails a check is never handed out.
--
-- buckets and hosts are what the reaper serves (its own allow-list: --buckets, and the hosts of
-- SUPABASE_URL and --storage-hosts); home_host is its SUPABASE_URL's host. A reaper of another
-- project (_home_ok()) is handed nothing; a row naming another bucket or host is never handed to
-- it and waits for a reaper that serves it. NULL lists serve every bucket or host (the call of a
-- reaper older than 0.2.0). Rows this reaper refused before (refuse()) are never
-- handed to it again while its lists stay the same.
CREATE FUNCTION orphan_cleanup.claim(
    worker text,
    max_rows integer DEFAULT 1000,
    lease interval DEFAULT '5 minutes',
    buckets text[] DEFAULT NULL,
    hosts text[] DEFAULT NULL,
    home_host text DEFAULT NULL)
RETURNS TABLE (id bigint, job_id uuid, host text, bucket text, object_path text, attempts integer, lease_token text)
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp SET jit = off
AS $$
DECLARE
    -- The fencing token of this claim: returned with its rows, kept only as a hash.
    v_token text := gen_random_uuid()::text;
    v_lease bytea := orphan_cleanup._lease_hash(v_token);
    cfg record;
    att orphan_cleanup.attachment;
    v_ids bigint[];
    v_locked uuid[];
    v_objs text[];
    v_kept text[];
    v_buckets text[];
    v_paths text[];
    v_new_buckets text[];
    v_new_paths text[];
    v_ok bigint[];
    v_bad bigint[];
    v_bad_state text[];
    v_bad_reason text[];
    v_wait bigint[];
    v_wait_until timestamptz[];
    v_busy bigint[];
    v_home_ok boolean;
    v_n bigint;
    v_inventory boolean;
    v_refs_ok boolean;
    v_stored_sql text;
BEGIN
    PERFORM orphan_cleanup._check_worker(worker);
    IF max_rows IS NULL OR max_rows < 1 OR max_rows > 10000 THEN
        RAISE EXCEPTION 'max_rows must be between 1 and 10000, got %', coalesce(max_rows::text, 'NULL')
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF lease IS NULL OR lease < interval '1 second' OR lease > interval '1 day' THEN
        RAISE EXCEPTION 'lease must be between 1 second and 1 day, got %', coalesce(lease::text, 'NULL')
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF current_setting('transaction_isolation') <> 'read committed' THEN
        RAISE EXCEPTION 'claim() must run at READ COMMITTED isolation, not %', current_setting('transaction_isolation')
            USING ERRCODE = 'invalid_transaction_state',
                  HINT = 'Its re-check needs a fresh snapshot after taking its locks; call it in its own transaction.';
    END IF;
    IF current_setting('transaction_read_only')::boolean THEN
        RAISE EXCEPTION 'claim() needs a read-write transaction: %',
            CASE WHEN pg_catalog.pg_is_in_recovery() THEN 'this server is a standby, and claims run on the primary'
                 ELSE 'this one is read-only' END
            USING ERRCODE = 'read_only_sql_transaction',
                  HINT = 'Connect to the primary (with a multi-host connection string, target_session_attrs=read-write), or SET TRANSACTION READ WRITE.';
    END IF;
    IF cardinality(buckets) = 0 OR array_position(buckets, NULL) IS NOT NULL
       OR EXISTS (SELECT 1 FROM unnest(buckets) AS x WHERE btrim(x) = '') THEN
        RAISE EXCEPTION 'buckets must name at least one bucket, with no NULL or empty entries, got %', buckets
            USING ERRCODE = 'invalid_parameter_value',
                  HINT = 'Pass the reaper''s own list, e.g. ARRAY[''renders''], or NULL for any.';
    END IF;
    -- Spelled as the parser spells a URL's host; anything else is refused, naming it.
    hosts := orphan_cleanup._normalize_hosts(hosts, 'hosts');
    IF home_host IS NOT NULL THEN
        home_host := (orphan_cleanup._normalize_hosts(ARRAY[home_host], 'home_host'))[1];
    END IF;
    SELECT * INTO cfg FROM orphan_cleanup._config();
    IF NOT cfg.reaping_enabled THEN
        RETURN;
    END IF;
    -- The app's tables in ROW EXCLUSIVE mode, without waiting: a transaction that is changing
    -- their triggers (ALTER TABLE ... DISABLE TRIGGER, pg_restore --disable-triggers) holds a
    -- lock that conflicts, and its saves are not guarded until it commits. Such a claim hands out
    -- nothing; the guard check below then reads the catalog as of after the lock.
    SELECT * INTO att FROM orphan_cleanup.attachment;
    -- (Tables that no longer exist, e.g. after a restore, are left to _require_attached().)
    IF FOUND AND (SELECT count(*) FROM pg_catalog.pg_class AS c WHERE c.oid IN (att.jobs_oid, att.assets_oid)) = 2 THEN
        BEGIN
            EXECUTE format('LOCK TABLE %s, %s IN ROW EXCLUSIVE MODE NOWAIT', att.jobs_oid::regclass, att.assets_oid::regclass);
        EXCEPTION WHEN lock_not_available OR undefined_table THEN
            RETURN;
        END;
    END IF;
    IF NOT orphan_cleanup._hold_references() THEN
        RETURN;
    END IF;
    att := orphan_cleanup._require_attached('claim()');
    -- An empty allow-list is a configuration mistake, not a policy: rejecting every row it
    -- re-checks would empty the queue into 'rejected' until the next full sweep.
    IF orphan_cleanup._no_entries(cfg.allowed_buckets) THEN
        RAISE EXCEPTION 'claim() refused: orphan_cleanup.allowed_buckets is empty, so no object may be deleted; the queue is left as it is'
            USING ERRCODE = 'object_not_in_prerequisite_state',
                  HINT = 'ALTER SYSTEM SET orphan_cleanup.allowed_buckets = ''renders''; SELECT pg_reload_conf();';
    END IF;
    -- The queue's and the objects' statistics (see _refresh_statistics), once nothing above
    -- refused the claim.
    PERFORM orphan_cleanup._refresh_statistics(worker, for_cycle => false);
    -- A claim must be durable before the reaper deletes anything: with synchronous_commit off,
    -- a crash could forget a claim whose files are already gone, and a later save would then
    -- "rescue" a row whose file no longer exists. Lasts until this transaction commits.
    PERFORM pg_catalog.set_config('synchronous_commit', 'on', true);
    PERFORM orphan_cleanup._expire_leases(worker);
    v_home_ok := orphan_cleanup._home_ok(hosts, home_host);
    PERFORM orphan_cleanup._note_reaper(worker, buckets, hosts, home_host);

    -- 1. Queue rows this reaper serves, oldest first; rows another transaction holds are
    --    skipped, never waited on. Rows a claim found busy in the last seconds (see busy in
    --    schema.sql) come after the others, so that they cannot fill every claim.
    SELECT array_agg(r.id), array_agg(r.bucket), array_agg(r.object_path) INTO v_ids, v_buckets, v_paths
    FROM (SELECT d.id, d.bucket, d.object_path FROM orphan_cleanup.deletion_queue AS d
          WHERE d.state = 'pending' AND d.available_at <= now()
            AND orphan_cleanup._serves(buckets, hosts, v_home_ok, d.bucket, d.host)
            AND (d.job_id IS NOT NULL OR cfg.reclaim_strays)
            AND NOT EXISTS (SELECT 1 FROM orphan_cleanup.refusals AS f
                            WHERE f.queue_id = d.id AND f.refused_by = worker)
            AND NOT EXISTS (SELECT 1 FROM orphan_cleanup.busy AS b
                            WHERE b.queue_id = d.id AND b.until > now())
          ORDER BY d.available_at, d.id
          LIMIT max_rows
          FOR UPDATE SKIP LOCKED) AS r;
    IF coalesce(cardinality(v_ids), 0) < max_rows THEN
        SELECT v_ids || array_agg(r.id), v_buckets || array_agg(r.bucket), v_paths || array_agg(r.object_path)
          INTO v_ids, v_buckets, v_paths
        FROM (SELECT d.id, d.bucket, d.object_path
              FROM orphan_cleanup.busy AS b
              JOIN orphan_cleanup.deletion_queue AS d ON d.id = b.queue_id
              WHERE b.until > now() AND d.state = 'pending' AND d.available_at <= now()
                AND orphan_cleanup._serves(buckets, hosts, v_home_ok, d.bucket, d.host)
                AND (d.job_id IS NOT NULL OR cfg.reclaim_strays)
                AND NOT EXISTS (SELECT 1 FROM orphan_cleanup.refusals AS f
                                WHERE f.queue_id = d.id AND f.refused_by = worker)
              ORDER BY d.available_at, d.id
              LIMIT max_rows - coalesce(cardinality(v_ids), 0)
              FOR UPDATE OF d SKIP LOCKED) AS r;
    END IF;
    IF coalesce(cardinality(v_ids), 0) < max_rows AND (buckets IS NOT NULL OR hosts IS NOT NULL) THEN
        PERFORM orphan_cleanup._note_passed_over(worker, max_rows, buckets, hosts, v_home_ok);
    END IF;
    IF v_ids IS NULL THEN
        RETURN;
    END IF;

    -- 2. Their job rows, and every job row naming the same objects. A row held by a save in
    --    flight (FOR KEY SHARE) is skipped, and with it the queue row.
    --    Two index lookups joined by UNION: written as `id IN (...) OR object_keys(...) && (...)`
    --    the planner could only scan the whole jobs table (2.8 s per claim at 1M jobs).
    EXECUTE format($sql$
        SELECT array_agg(l.id)
        FROM (SELECT d.job_id FROM orphan_cleanup.deletion_queue AS d WHERE d.id = ANY ($1)
              UNION
              SELECT s.id
              FROM (SELECT DISTINCT d.bucket || '/' || d.object_path AS object_key
                    FROM orphan_cleanup.deletion_queue AS d WHERE d.id = ANY ($1)) AS k
              CROSS JOIN LATERAL (SELECT j2.id FROM %1$s AS j2
                                  WHERE orphan_cleanup.object_keys(j2.output_url) && orphan_cleanup._names_of(k.object_key)
                                  OFFSET 0) AS s) AS w(id)
        -- Each lookup an index probe, whatever the statistics say: OFFSET 0 and FOR UPDATE keep
        -- these subqueries per row, where a join let the planner read the whole jobs table.
        CROSS JOIN LATERAL (SELECT j.id FROM %1$s AS j WHERE j.id = w.id FOR UPDATE SKIP LOCKED) AS l
        $sql$, att.jobs_oid::regclass)
    INTO v_locked USING v_ids;
    v_locked := coalesce(v_locked, '{}');

    -- 2b. Their objects' rows, the rows every save and job write naming the object locks too
    --    (see guard.sql). A row a save or job write holds is skipped, and with it the queue row.
    --    A kept object (cancel()) is noted: its rows are retired below.
    SELECT array_agg(l.key) FILTER (WHERE NOT l.kept), array_agg(l.key) FILTER (WHERE l.kept)
      INTO v_objs, v_kept
    FROM (SELECT o.bucket || '/' || o.object_path AS key, o.kept_at IS NOT NULL AS kept
          FROM (SELECT DISTINCT k.bucket, k.object_path FROM unnest(v_buckets, v_paths) AS k(bucket, object_path)) AS k
          CROSS JOIN LATERAL (SELECT o.* FROM orphan_cleanup.objects AS o
                              WHERE o.bucket = k.bucket AND o.object_path = k.object_path
                              FOR UPDATE SKIP LOCKED) AS o) AS l;
    --    An object with no row yet gets one, created by this claim (and so held by it). Looked
    --    for only when some object was not locked above (skipped, or without a row).
    IF coalesce(cardinality(v_objs), 0) + coalesce(cardinality(v_kept), 0) < cardinality(v_ids) THEN
        SELECT array_agg(m.bucket), array_agg(m.object_path) INTO v_new_buckets, v_new_paths
        FROM (SELECT DISTINCT k.bucket, k.object_path FROM unnest(v_buckets, v_paths) AS k(bucket, object_path)
              WHERE NOT EXISTS (SELECT 1 FROM orphan_cleanup.objects AS o
                                WHERE o.bucket = k.bucket AND o.object_path = k.object_path)) AS m;
        IF v_new_paths IS NOT NULL THEN
            v_objs := coalesce(v_objs, '{}') || orphan_cleanup._new_objects(v_new_buckets, v_new_paths);
        END IF;
    END IF;
    v_objs := coalesce(v_objs, '{}');
    v_kept := coalesce(v_kept, '{}');

    -- 3. Re-check in a new statement, so with a snapshot taken after the locks: saves that
    --    committed meanwhile are visible here. A stray (no job) is handed out only while no job
    --    names its object (a job written since is visible here, and one being written holds the
    --    object's row, so the row is busy), and only as the upload it was queued for: still in
    --    the inventory (storage.objects, or the Storage API's listing) with the same id and
    --    version, still older than stray_min_age, still allowed. Where the inventory cannot be
    --    read now, it waits. (Read only for strays.)
    --    While an extra reference is not in force, nothing is handed out (every row waits);
    --    otherwise an object one names is kept, a stray's or a job orphan's.
    v_refs_ok := orphan_cleanup._reference_problem() IS NULL;
    -- Likewise while a saved job's row may be out of sight in the jobs table's partitions (one
    -- dropped, being detached, or detached and not looked at: sql/partitions.sql), and with it
    -- the keeper of a shared object: checked in the re-check's own statement below, so with its
    -- snapshot. Strays wait for any partition problem (a new one without its TRUNCATE guard);
    -- what strays need is looked at only when the rows include one.
    v_inventory := EXISTS (SELECT 1 FROM unnest(v_ids) AS k(id)
                           JOIN orphan_cleanup.deletion_queue AS d ON d.id = k.id WHERE d.job_id IS NULL);
    IF v_inventory THEN
        v_inventory := v_refs_ok AND orphan_cleanup._inventory_problem() IS NULL
                       AND orphan_cleanup._partition_problem() IS NULL;
    END IF;
    v_stored_sql := CASE WHEN v_inventory THEN format($sql$
            LEFT JOIN LATERAL (
                SELECT o.id, o.version::text AS version, greatest(o.created_at, o.updated_at) AS created_at
                FROM %s AS o
                WHERE d.job_id IS NULL AND o.bucket_id = d.bucket AND o.name = d.object_path %s
                LIMIT 1) AS st ON true$sql$, orphan_cleanup._inventory(), orphan_cleanup._current_objects_only())
        ELSE ' CROSS JOIN (SELECT NULL::uuid AS id, NULL::text AS version, NULL::timestamptz AS created_at) AS st' END
        -- The extra reference naming a stray's object now, if any (sql/references.sql).
        || CASE WHEN v_refs_ok THEN format($sql$
            LEFT JOIN LATERAL (SELECT %s AS name) AS rf ON true$sql$,
            orphan_cleanup._referenced_by_sql($k$d.bucket || '/' || d.object_path$k$))
           ELSE ' CROSS JOIN (SELECT NULL::text AS name) AS rf' END;
    EXECUTE format($sql$
        -- Whether another job naming a row's object is not held by this claim, or keeps the
        -- object (not an orphan): looked at once per object, not once per row, so that K rows
        -- of one object (a render cache's hits) cost K probes, not K x K. A row's own job is
        -- held (or the row is 'busy' before this is looked at) and is never a keeper when this
        -- is looked at (completed, old enough, unreferenced), so it need not be left out.
        -- Whether saved jobs' rows may be out of sight (sql/partitions.sql): once per claim, in
        -- this statement's snapshot.
        WITH okp AS MATERIALIZED (SELECT orphan_cleanup._partition_gone_problem() IS NULL AS fine),
        shared AS MATERIALIZED (
            SELECT k.key, s.unlocked, s.named, s.named_by, s.keeper
            FROM (SELECT DISTINCT d.bucket || '/' || d.object_path AS key
                  FROM unnest($1::bigint[]) AS wanted(id)
                  JOIN orphan_cleanup.deletion_queue AS d ON d.id = wanted.id) AS k
            CROSS JOIN LATERAL (
                -- `= ANY ($2)`: EXECUTE folds $2 into a constant, so this is a hashed lookup;
                -- a join with unnest($2) read all the locked ids once per object.
                SELECT bool_or(NOT (j2.id = ANY ($2))) AS unlocked, bool_or(true) AS named,
                       (array_agg(j2.id) FILTER (WHERE j2.id IS NOT NULL))[1] AS named_by,
                       (array_agg(j2.id) FILTER (
                           WHERE NOT coalesce(j2.status::text = 'completed' AND j2.%3$I < $3
                                      AND NOT EXISTS (SELECT 1 FROM %2$s AS a2
                                                      WHERE orphan_cleanup.job_ref_key(a2.metadata ->> 'render_job_id') = j2.id::text
                                                      OFFSET 0), false)))[1] AS keeper
                FROM %1$s AS j2
                WHERE orphan_cleanup.object_keys(j2.output_url) && orphan_cleanup._names_of(k.key)
            ) AS s
        ),
        v AS (
            SELECT d.id,
                   CASE
                       WHEN NOT ($9 AND okp.fine) THEN 'wait'
                       WHEN d.job_id IS NULL THEN CASE
                           WHEN kp.key IS NOT NULL THEN 'cancelled'
                           WHEN ob.key IS NULL THEN 'busy'
                           WHEN s.named THEN 'stale'
                           WHEN NOT $7 THEN 'wait'
                           WHEN rf.name IS NOT NULL THEN 'stale'
                           WHEN st.id IS NULL OR st.created_at IS NULL THEN 'stale'
                           WHEN st.id IS DISTINCT FROM d.stored_id OR st.version IS DISTINCT FROM d.stored_version THEN 'stale'
                           WHEN st.created_at >= now() - $8 THEN 'wait'
                           WHEN strpos(d.object_path, '/') = 0 THEN 'rejected'
                           WHEN u.error IS NOT NULL OR u.bucket IS DISTINCT FROM d.bucket
                                OR u.object_path IS DISTINCT FROM d.object_path THEN 'rejected'
                           ELSE 'ok' END
                       WHEN j.id IS NULL THEN 'stale'
                       WHEN kp.key IS NOT NULL THEN 'cancelled'
                       WHEN lk.id IS NULL OR ob.key IS NULL THEN 'busy'
                       WHEN NOT so.same_object THEN 'stale'
                       -- Unknown (NULL) status or age keeps the object.
                       WHEN j.status::text IS DISTINCT FROM 'completed' OR j.%3$I IS NULL THEN 'stale'
                       WHEN j.%3$I >= $3 THEN 'wait'
                       WHEN r.referenced IS NOT NULL THEN 'stale'
                       WHEN u.error IS NOT NULL THEN 'rejected'
                       WHEN rf.name IS NOT NULL THEN 'stale'
                       WHEN s.unlocked THEN 'busy'
                       WHEN s.keeper IS NOT NULL THEN 'stale'
                       ELSE 'ok'
                   END AS verdict,
                   CASE
                       WHEN d.job_id IS NULL THEN CASE
                           WHEN kp.key IS NOT NULL THEN 'its object is kept (by cancel(), or because a saved job naming it was deleted)'
                           WHEN s.named THEN format('job %%s names its object now: no longer a stray', coalesce(s.named_by::text, '(with a NULL id)'))
                           WHEN rf.name IS NOT NULL THEN format('%%s names its object now (an extra reference): no longer a stray', rf.name)
                           WHEN st.id IS NULL THEN 'no longer in storage''s inventory (storage.objects, or the last listing through the Storage API): deleted by someone else'
                           WHEN st.created_at IS NULL THEN 'storage''s inventory gives no created_at for it'
                           WHEN st.id IS DISTINCT FROM d.stored_id OR st.version IS DISTINCT FROM d.stored_version
                               THEN 'uploaded again since it was queued: storage''s inventory holds another upload of that name'
                           WHEN strpos(d.object_path, '/') = 0 THEN 'at the bucket''s root: a job may name it by its bare file name, which no reading takes as an object'
                           ELSE coalesce(u.error, 'the allow-lists no longer name it as it is stored') END
                       WHEN j.id IS NULL THEN 'the job row no longer exists'
                       WHEN kp.key IS NOT NULL THEN 'its object is kept (by cancel(), or because a saved job naming it was deleted)'
                       WHEN NOT so.same_object THEN 'the job''s output_url names another object now'
                       WHEN j.status::text IS DISTINCT FROM 'completed' THEN format('the job''s status is now %%s', coalesce(j.status::text, 'NULL'))
                       WHEN j.%3$I IS NULL THEN format('the job''s %%s is NULL', %4$L)
                       WHEN r.referenced IS NOT NULL THEN 'the job is referenced by an asset'
                       WHEN u.error IS NOT NULL THEN u.error
                       WHEN rf.name IS NOT NULL THEN format('%%s names its object (an extra reference): kept', rf.name)
                       WHEN s.keeper IS NOT NULL THEN format('shares its object with job %%s, which is not an orphan', s.keeper)
                   END AS reason,
                   CASE WHEN NOT ($9 AND okp.fine) THEN now() + interval '10 minutes'
                        WHEN d.job_id IS NULL
                        THEN CASE WHEN $7 THEN st.created_at + $8 ELSE now() + interval '10 minutes' END
                        ELSE j.%3$I + $4 END AS wait_until
            -- Arrays joined as sets: `= ANY ($n)` on a parameter is a linear search per row.
            FROM unnest($1::bigint[]) AS wanted(id)
            CROSS JOIN okp
            JOIN orphan_cleanup.deletion_queue AS d ON d.id = wanted.id
            LEFT JOIN %1$s AS j ON j.id = d.job_id
            LEFT JOIN unnest($2::uuid[]) AS lk(id) ON lk.id = j.id
            LEFT JOIN unnest($5::text[]) AS ob(key) ON ob.key = d.bucket || '/' || d.object_path
            LEFT JOIN unnest($6::text[]) AS kp(key) ON kp.key = d.bucket || '/' || d.object_path
            -- Objects, not URL text: a refreshed signed-URL token names the same object. The URL
            -- is parsed only when its text changed (the CASE keeps that order).
            CROSS JOIN LATERAL (
                SELECT CASE WHEN md5(j.output_url) = d.url_hash THEN true
                            ELSE coalesce(orphan_cleanup.object_key(j.output_url) = d.bucket || '/' || d.object_path, false)
                       END AS same_object
            ) AS so
            -- Once per row, as an index probe (LIMIT keeps the planner from hashing the whole
            -- assets table instead, 2 s per claim when the queue had no statistics yet): the
            -- verdict and its reason both need it.
            LEFT JOIN LATERAL (
                SELECT true AS referenced
                FROM %2$s AS a
                WHERE orphan_cleanup.job_ref_key(a.metadata ->> 'render_job_id') = j.id::text
                LIMIT 1
            ) AS r ON true
            LEFT JOIN LATERAL orphan_cleanup.check_output_url(
                CASE WHEN d.job_id IS NULL THEN d.output_url ELSE j.output_url END) AS u ON true
            LEFT JOIN shared AS s ON s.key = d.bucket || '/' || d.object_path
            %5$s
        )
        SELECT array_agg(v.id) FILTER (WHERE v.verdict = 'ok'),
               array_agg(v.id) FILTER (WHERE v.verdict IN ('stale', 'rejected', 'cancelled')),
               array_agg(v.verdict) FILTER (WHERE v.verdict IN ('stale', 'rejected', 'cancelled')),
               array_agg(v.reason) FILTER (WHERE v.verdict IN ('stale', 'rejected', 'cancelled')),
               array_agg(v.id) FILTER (WHERE v.verdict = 'wait'),
               array_agg(v.wait_until) FILTER (WHERE v.verdict = 'wait'),
               array_agg(v.id) FILTER (WHERE v.verdict = 'busy')
        FROM v
        $sql$, att.jobs_oid::regclass, att.assets_oid::regclass, att.age_column, att.age_column, v_stored_sql)
    INTO v_ok, v_bad, v_bad_state, v_bad_reason, v_wait, v_wait_until, v_busy
    USING v_ids, v_locked, now() - make_interval(secs => cfg.min_age_s), make_interval(secs => cfg.min_age_s), v_objs, v_kept,
          v_inventory, make_interval(secs => cfg.stray_min_age_s), v_refs_ok;

    IF v_bad IS NOT NULL THEN
        WITH b AS (SELECT * FROM unnest(v_bad, v_bad_state, v_bad_reason) AS b(id, state, reason)),
        moved AS (
            UPDATE orphan_cleanup.deletion_queue AS d
               SET state = b.state, reason = b.reason, finished_at = now(), updated_at = now()
              FROM b WHERE d.id = b.id
            RETURNING d.id, d.job_id, d.output_url, d.state, d.reason, d.claim_count)
        INSERT INTO orphan_cleanup.audit_log (action, job_id, queue_id, output_url, actor, detail)
        SELECT CASE WHEN m.state = 'rejected' THEN 'rejected' ELSE 'cancelled' END,
               m.job_id, m.id, m.output_url, worker,
               CASE WHEN m.claim_count > 0
                    THEN 'retired at claim without a confirmed deletion, after it had been handed out (the object may be deleted; no job naming it can be saved): '
                    ELSE 'at claim: ' END || m.reason
        FROM moved AS m;
    END IF;
    IF v_wait IS NOT NULL THEN
        UPDATE orphan_cleanup.deletion_queue AS d
           SET available_at = w.until, updated_at = now()
          FROM unnest(v_wait, v_wait_until) AS w(id, until)
         WHERE d.id = w.id;
    END IF;
    -- Busy rows (a job or object held by a save or job write in flight) are passed over by the
    -- next claims for a few seconds: left at the head, max_rows of them (K rows of one object
    -- whose job an app transaction holds) made every claim hand out nothing while the rest of
    -- the queue waited. Noted beside the queue, never on the row itself: the save in flight
    -- locks that row, and at REPEATABLE READ a write to it by the claim made the save fail.
    IF v_busy IS NOT NULL THEN
        INSERT INTO orphan_cleanup.busy (queue_id, until)
        SELECT b.id, now() + interval '5 seconds' FROM unnest(v_busy) AS b(id)
        ON CONFLICT (queue_id) DO UPDATE SET until = EXCLUDED.until;
    END IF;
    IF v_ok IS NULL THEN
        RETURN;
    END IF;

    RETURN QUERY
    WITH claimed AS (
        UPDATE orphan_cleanup.deletion_queue AS d
           SET state = 'claimed', claim_count = d.claim_count + 1, claimed_by = worker,
               claimed_at = now(), lease_until = now() + lease, lease_hash = v_lease,
               updated_at = now()
         WHERE d.id = ANY (v_ok)
        RETURNING d.id, d.job_id, d.host, d.bucket, d.object_path, d.attempts, d.output_url
    ),
    audited AS (
        INSERT INTO orphan_cleanup.audit_log (action, job_id, queue_id, output_url, actor, detail)
        SELECT 'claimed', c.job_id, c.id, c.output_url, worker, format('lease %s', lease) FROM claimed AS c
    )
    SELECT c.id, c.job_id, c.host, c.bucket, c.object_path, c.attempts, v_token FROM claimed AS c ORDER BY c.id;
    GET DIAGNOSTICS v_n = ROW_COUNT;
    -- The hand-out, recorded on the objects in this transaction: from its commit on, no job
    -- naming them can be saved. (A row per object, probed by its key: the arrays keep the
    -- planner's estimate small, so it never reads the whole table.)
    UPDATE orphan_cleanup.objects AS o
       SET handouts = o.handouts + t.n, first_handed_out_at = coalesce(o.first_handed_out_at, now()),
           last_handed_out_at = now(), last_handed_to = worker, last_queue_id = t.last_id, touched_at = now(),
           forget_at = now() + interval '30 days'
      FROM (SELECT d.bucket, d.object_path, count(*) AS n, max(d.id) AS last_id
            FROM unnest(v_ok) AS k(id)
            JOIN orphan_cleanup.deletion_queue AS d ON d.id = k.id
            GROUP BY 1, 2) AS t
     WHERE o.bucket = t.bucket AND o.object_path = t.object_path;
    IF orphan_cleanup._lock_reaper_row(worker) THEN
        UPDATE orphan_cleanup.reapers AS r SET claimed = r.claimed + v_n WHERE r.reaper = worker;
    END IF;
    PERFORM orphan_cleanup._pause_point('claim');
END
$$;

-- The one write to the application's jobs table: deletes the given jobs, or clears their
-- output_url. It runs as the jobs table's owner, never as the extension's owner (a superuser):
-- _own_job_writer() makes it SECURITY DEFINER and owned by that role before every use, so the
-- app's own triggers, rules and index expressions on the table run with that role's rights.
-- Whoever owns it can only ever act as themselves through it.
CREATE FUNCTION orphan_cleanup._write_jobs(rel regclass, mode text, ids uuid[]) RETURNS bigint
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    n bigint;
BEGIN
    IF mode = 'delete' THEN
        EXECUTE format('DELETE FROM %s AS j USING unnest($1::uuid[]) AS k(id) WHERE j.id = k.id', rel) USING ids;
    ELSE
        EXECUTE format('UPDATE %s AS j SET output_url = NULL FROM unnest($1::uuid[]) AS k(id) WHERE j.id = k.id', rel) USING ids;
    END IF;
    GET DIAGNOSTICS n = ROW_COUNT;
    RETURN n;
END
$$;

-- Makes _write_jobs() SECURITY DEFINER and owned by the owner of `rel`, if it is not (after
-- attach(), a change of the table's owner, a restore), and keeps it so until commit.
CREATE FUNCTION orphan_cleanup._own_job_writer(rel regclass) RETURNS void
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp SET jit = off
AS $$
DECLARE
    fn regprocedure := 'orphan_cleanup._write_jobs(regclass, text, uuid[])'::regprocedure;
    v_owner oid := (SELECT c.relowner FROM pg_catalog.pg_class AS c WHERE c.oid = rel);
BEGIN
    -- Its catalog row, locked until this transaction ends: whoever owns the function (a role
    -- that would also need USAGE on this schema) cannot make it SECURITY INVOKER between this
    -- check and the write that follows, which would then run as the caller, a superuser. An
    -- owner who is no superuser (the managed edition on a hosted platform) may not lock catalog
    -- rows, and needs no such lock: the caller is then that owner, with no more rights.
    IF pg_catalog.has_table_privilege('pg_catalog.pg_proc', 'UPDATE') THEN
        PERFORM 1 FROM pg_catalog.pg_proc AS p WHERE p.oid = fn FOR SHARE;
    END IF;
    IF NOT (SELECT p.prosecdef FROM pg_catalog.pg_proc AS p WHERE p.oid = fn) THEN
        EXECUTE format('ALTER FUNCTION %s SECURITY DEFINER', fn);
    END IF;
    IF (SELECT p.proowner FROM pg_catalog.pg_proc AS p WHERE p.oid = fn) IS DISTINCT FROM v_owner THEN
        EXECUTE format('ALTER FUNCTION %s OWNER TO %I', fn, v_owner::regrole::text);
    END IF;
END
$$;

-- What confirm() does to the job rows of confirmed queue rows: delete them (or clear their
-- output_url, per orphan_cleanup.on_confirm), if each is still the completed, unreferenced job
-- naming that object (a job re-run since, or saved, keeps its row; _keep_jobs() says why). A
-- job row a save is holding is left for the next cycle; a delete that fails (a foreign key)
-- falls back to clearing the URL, and says why. The writes go through _write_jobs(), with the
-- jobs table owner's rights.
-- A lock the app's triggers or cascades wait for is waited for 2 s at most (lock_timeout), and
-- then no further row is tried this time: the rows stay 'pending' and the next cycle retries
-- them, instead of the confirm that called this running into the reaper's statement_timeout.
CREATE FUNCTION orphan_cleanup._cleanup_jobs(ids bigint[], mode text, actor text) RETURNS void
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp SET jit = off SET lock_timeout = '2s'
AS $$
DECLARE
    v_busy boolean := false;
    att orphan_cleanup.attachment;
    v_named uuid[];
    v_locked uuid[];
    v_exist uuid[];
    v_qids bigint[];
    v_jids uuid[];
    r record;
    v_msg text;
    v_done text := CASE WHEN mode = 'delete' THEN 'job row deleted' ELSE 'output_url cleared' END;
BEGIN
    IF ids IS NULL OR cardinality(ids) = 0 THEN
        RETURN;
    END IF;
    SELECT * INTO att FROM orphan_cleanup.attachment;
    IF NOT FOUND THEN
        UPDATE orphan_cleanup.deletion_queue AS d SET job_cleanup = 'pending: not attached'
         WHERE d.id = ANY (ids) AND d.job_cleanup LIKE 'pending%';
        RETURN;
    END IF;
    -- Without the indexes the re-check below reads the assets table for every job: the rows wait
    -- (the deletions themselves are recorded), and the first cycle once the indexes exist does it.
    IF orphan_cleanup._index_problem(att.jobs_oid, att.assets_oid, att.age_column, with_scan => false) IS NOT NULL THEN
        UPDATE orphan_cleanup.deletion_queue AS d
           SET job_cleanup = 'pending: waiting for the indexes pg_orphan_cleanup relies on (see health())'
         WHERE d.id = ANY (ids) AND d.job_cleanup LIKE 'pending%';
        RETURN;
    END IF;
    -- The jobs first, then their rows: each statement reads one table by key. As one join, with
    -- statistics taken while both tables were being filled, the planner read the whole queue
    -- for every job (195 s for a 1,000-row confirm of a 30,000-row queue).
    SELECT array_agg(DISTINCT d.job_id) INTO v_named
    FROM orphan_cleanup.deletion_queue AS d WHERE d.id = ANY (ids);
    EXECUTE format($sql$
        SELECT array_agg(l.id) FROM (
            SELECT j.id FROM %s AS j WHERE j.id = ANY ($1)
            FOR UPDATE SKIP LOCKED) AS l
        $sql$, att.jobs_oid::regclass) INTO v_locked USING v_named;
    EXECUTE format($sql$
        SELECT array_agg(j.id) FROM %s AS j WHERE j.id = ANY ($1)
        $sql$, att.jobs_oid::regclass) INTO v_exist USING v_named;
    v_locked := coalesce(v_locked, '{}');
    v_exist := coalesce(v_exist, '{}');

    -- The locked jobs that are still the completed, unreferenced jobs naming the confirmed
    -- objects. Sets are joined, never searched: `j.id = ANY ($2)` in an index condition
    -- re-sorted the whole array on every probe (3 to 4 s for a 4,000-row confirm at 1M jobs).
    EXECUTE format($sql$
        SELECT array_agg(q.id ORDER BY q.id), array_agg(q.job_id ORDER BY q.id)
        FROM orphan_cleanup.deletion_queue AS q
        JOIN unnest($2::uuid[]) AS lk(id) ON lk.id = q.job_id
        JOIN %1$s AS j ON j.id = lk.id
        WHERE q.id = ANY ($1) AND q.job_cleanup LIKE 'pending%%'
          AND orphan_cleanup.object_key(j.output_url) = q.bucket || '/' || q.object_path
          AND j.status::text = 'completed'
          AND NOT EXISTS (SELECT 1 FROM %2$s AS a WHERE orphan_cleanup.job_ref_key(a.metadata ->> 'render_job_id') = j.id::text)
        $sql$, att.jobs_oid::regclass, att.assets_oid::regclass)
    INTO v_qids, v_jids USING ids, v_locked;
    -- The other locked jobs keep their rows, and the queue rows say why.
    PERFORM orphan_cleanup._keep_jobs(att, ids, ARRAY(SELECT unnest(v_locked) EXCEPT SELECT unnest(v_jids)), actor);

    -- The whole batch in one write; row by row, with the fallback, only if it fails.
    IF v_jids IS NOT NULL THEN
        PERFORM orphan_cleanup._own_job_writer(att.jobs_oid);
        BEGIN
            PERFORM orphan_cleanup._write_jobs(att.jobs_oid, mode, v_jids);
            WITH done AS (
                UPDATE orphan_cleanup.deletion_queue AS d SET job_cleanup = v_done
                  FROM unnest(v_qids) AS k(id) WHERE d.id = k.id
                RETURNING d.id, d.job_id, d.output_url)
            INSERT INTO orphan_cleanup.audit_log (action, job_id, queue_id, output_url, actor, detail)
            SELECT 'job_cleanup', x.job_id, x.id, x.output_url, actor, v_done FROM done AS x;
        EXCEPTION WHEN OTHERS THEN
            NULL;  -- some row cannot be cleaned up this way (a foreign key): the loop below says which
        END;
        FOR r IN
            SELECT x.qid, x.jid, d.output_url
            FROM unnest(v_qids, v_jids) AS x(qid, jid)
            JOIN orphan_cleanup.deletion_queue AS d ON d.id = x.qid
            WHERE d.job_cleanup LIKE 'pending%'
            ORDER BY x.qid
        LOOP
            CONTINUE WHEN v_busy;
            BEGIN
                PERFORM orphan_cleanup._write_jobs(att.jobs_oid, mode, ARRAY[r.jid]);
                UPDATE orphan_cleanup.deletion_queue AS d SET job_cleanup = v_done WHERE d.id = r.qid;
                INSERT INTO orphan_cleanup.audit_log (action, job_id, queue_id, output_url, actor, detail)
                VALUES ('job_cleanup', r.jid, r.qid, r.output_url, actor, v_done);
            EXCEPTION WHEN lock_not_available OR deadlock_detected OR serialization_failure THEN
                -- Transient (a lock the app's triggers or cascades wait for): the cycles retry it.
                GET STACKED DIAGNOSTICS v_msg = MESSAGE_TEXT;
                UPDATE orphan_cleanup.deletion_queue AS d SET job_cleanup = 'pending: retried after ' || v_msg
                 WHERE d.id = r.qid;
                v_busy := true;
            WHEN OTHERS THEN
                GET STACKED DIAGNOSTICS v_msg = MESSAGE_TEXT;
                BEGIN
                    PERFORM orphan_cleanup._write_jobs(att.jobs_oid, 'clear_url', ARRAY[r.jid]);
                    UPDATE orphan_cleanup.deletion_queue AS d
                       SET job_cleanup = 'output_url cleared because ' || lower(mode) || ' failed: ' || v_msg
                     WHERE d.id = r.qid;
                    INSERT INTO orphan_cleanup.audit_log (action, job_id, queue_id, output_url, actor, detail)
                    VALUES ('job_cleanup', r.jid, r.qid, r.output_url, actor,
                            'job row not deleted (' || v_msg || '); its output_url was cleared instead');
                EXCEPTION WHEN OTHERS THEN
                    GET STACKED DIAGNOSTICS v_msg = MESSAGE_TEXT;
                    UPDATE orphan_cleanup.deletion_queue AS d SET job_cleanup = 'failed: ' || v_msg WHERE d.id = r.qid;
                    INSERT INTO orphan_cleanup.audit_log (action, job_id, queue_id, output_url, actor, detail)
                    VALUES ('job_cleanup', r.jid, r.qid, r.output_url, actor, 'job row cleanup failed: ' || v_msg);
                END;
            END;
        END LOOP;
    END IF;
    UPDATE orphan_cleanup.deletion_queue AS d SET job_cleanup = 'nothing to do: the job row no longer exists'
     WHERE d.id = ANY (ids) AND d.job_cleanup LIKE 'pending%' AND NOT (d.job_id = ANY (v_exist));
    -- The rest are held by another transaction (a save in flight): the next cycle retries them.
END
$$;

-- Confirmed rows whose (locked) job row is no longer the completed, unreferenced orphan it was:
-- the job row is kept, and the queue row and the audit log say why.
CREATE FUNCTION orphan_cleanup._keep_jobs(att orphan_cleanup.attachment, ids bigint[], locked uuid[], actor text) RETURNS void
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp SET jit = off
AS $$
BEGIN
    EXECUTE format($sql$
        WITH why AS (
            SELECT q.id,
                   CASE WHEN orphan_cleanup.object_key(j.output_url) IS DISTINCT FROM q.bucket || '/' || q.object_path
                        THEN 'the job''s output_url names another object now'
                        WHEN j.status::text IS DISTINCT FROM 'completed'
                        THEN format('the job is no longer completed (status %%s)', coalesce(j.status::text, 'NULL'))
                        ELSE 'the job is referenced by an asset' END AS reason
            FROM orphan_cleanup.deletion_queue AS q
            JOIN unnest($2::uuid[]) AS lk(id) ON lk.id = q.job_id
            JOIN %1$s AS j ON j.id = lk.id
            WHERE q.id = ANY ($1) AND q.job_cleanup LIKE 'pending%%'
        ),
        kept AS (
            UPDATE orphan_cleanup.deletion_queue AS d
               SET job_cleanup = 'nothing to do: ' || w.reason
              FROM why AS w
             WHERE d.id = w.id
            RETURNING d.id, d.job_id, d.output_url, w.reason
        )
        INSERT INTO orphan_cleanup.audit_log (action, job_id, queue_id, output_url, actor, detail)
        SELECT 'job_cleanup', k.job_id, k.id, k.output_url, $3, 'job row kept: ' || k.reason FROM kept AS k
        $sql$, att.jobs_oid::regclass)
    USING ids, locked, actor;
END
$$;

-- Confirmed rows whose job row was busy get their cleanup retried by every cycle.
-- enable_seqscan = off here, in _expire_leases() and in _prune(): every cycle runs them, they
-- look for a handful of rows through partial or time-ordered indexes, and right after a big
-- first cycle the queue's statistics still say it is empty, so the planner would read all of
-- it instead (110 ms per idle cycle at 550k queue rows).
CREATE FUNCTION orphan_cleanup._retry_job_cleanup(actor text) RETURNS void
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp SET jit = off SET enable_seqscan = off
AS $$
DECLARE
    v_ids bigint[];
BEGIN
    SELECT array_agg(r.id) INTO v_ids
    FROM (SELECT d.id FROM orphan_cleanup.deletion_queue AS d
          WHERE d.job_cleanup LIKE 'pending%' AND d.state IN ('deleted', 'absent')
          ORDER BY d.id LIMIT 2000) AS r;
    PERFORM orphan_cleanup._cleanup_jobs(v_ids, (SELECT on_confirm FROM orphan_cleanup._config()), actor);
END
$$;

-- Why a row is not this claim's to confirm, fail, release or refuse.
CREATE FUNCTION orphan_cleanup._not_held(d orphan_cleanup.deletion_queue, worker text, lease bytea) RETURNS text
LANGUAGE sql STABLE SET search_path = pg_catalog, pg_temp
RETURN CASE WHEN d.id IS NULL THEN 'no such queue row'
            WHEN d.state = 'claimed' AND d.claimed_by = worker AND d.lease_hash IS DISTINCT FROM lease
                THEN 'the lease token does not match this claim (a later claim holds it, or the token is wrong)'
            WHEN d.state = 'claimed' THEN format('lease lost, the row is now claimed by %s', d.claimed_by)
            WHEN d.state = 'pending' THEN 'lease lost, the row was requeued'
            ELSE format('the row is already %s', d.state) END;

-- Claims given back by their holder with nothing sent to storage (released unsent, refused by
-- the reaper's own allow-list): as good as never handed out. Each row takes back its own
-- hand-out from its object, so an object another claim handed out stays handed out. An object
-- whose row a save holds right now is left counted (never waited for): safe, only stricter.
CREATE FUNCTION orphan_cleanup._unsent(ids bigint[], actor text) RETURNS void
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    WITH t AS (
        SELECT d.bucket, d.object_path, array_agg(d.id) AS ids, count(*)::integer AS n
        FROM orphan_cleanup.deletion_queue AS d
        WHERE d.id = ANY (ids) AND d.bucket IS NOT NULL AND d.claim_count > 0
        GROUP BY d.bucket, d.object_path
    ),
    locked AS (
        SELECT t.* FROM t
        CROSS JOIN LATERAL (SELECT 1 FROM orphan_cleanup.objects AS o
                            WHERE o.bucket = t.bucket AND o.object_path = t.object_path
                            FOR UPDATE SKIP LOCKED) AS o
    ),
    untainted AS (
        UPDATE orphan_cleanup.objects AS o
           SET handouts = greatest(o.handouts - l.n, 0), touched_at = now()
          FROM locked AS l
         WHERE o.bucket = l.bucket AND o.object_path = l.object_path
    )
    UPDATE orphan_cleanup.deletion_queue AS d
       SET claim_count = d.claim_count - 1
      FROM locked AS l
     WHERE d.id = ANY (l.ids);
END
$$;

-- Where Supabase Storage keeps its object metadata in this database (storage.objects, as on
-- every Supabase project, hosted or self-hosted), whether the extension's owner can read it:
-- then confirm() checks every object the reaper reports gone against it. The reaper asks once
-- per connection; without this evidence it stops after a run of "already absent" answers. Not
-- where row-level security applies to the owner there (the managed edition's owner may lack
-- BYPASSRLS): it would see no rows, and every object would look gone (the sixth review).
CREATE FUNCTION orphan_cleanup.verifies_absence() RETURNS boolean
LANGUAGE plpgsql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    RETURN pg_catalog.to_regclass('storage.objects') IS NOT NULL
       AND pg_catalog.has_table_privilege('storage.objects', 'SELECT')
       AND NOT pg_catalog.row_security_active('storage.objects');
END
$$;

-- Of these queue rows, the ones whose object storage.objects still lists: the storage server
-- deletes that row before it answers, so an object it reported deleted, or already absent, that
-- is still listed was not deleted (a key without delete rights, a proxy or cache answering
-- for the server, another project's storage). A delete marker or an archived version of a
-- versioned bucket is not the object. Empty when storage.objects cannot be read.
CREATE FUNCTION orphan_cleanup._still_stored(ids bigint[]) RETURNS bigint[]
LANGUAGE plpgsql STABLE SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_ids bigint[];
BEGIN
    IF NOT orphan_cleanup.verifies_absence() OR coalesce(cardinality(ids), 0) = 0 THEN
        RETURN '{}';
    END IF;
    EXECUTE format($sql$
        SELECT array_agg(d.id) FROM orphan_cleanup.deletion_queue AS d
        WHERE d.id = ANY ($1)
          AND EXISTS (SELECT 1 FROM storage.objects AS o
                      WHERE o.bucket_id = d.bucket AND o.name = d.object_path %s)
        $sql$, orphan_cleanup._current_objects_only())
    INTO v_ids USING ids;
    RETURN coalesce(v_ids, '{}');
END
$$;

-- The reaper reports objects gone: outcome 'deleted' (storage listed it as deleted) or 'absent'
-- (it was already gone). The file is recorded as gone first, then the job row is cleaned up.
-- Only rows this worker still holds are confirmed; the others come back with the reason. Where
-- storage.objects is in this database, a row whose object it still lists is not confirmed
-- (result 'not confirmed: still in storage.objects ...'): the row stays claimed, for the reaper
-- to give back, and its job row stays.
CREATE FUNCTION orphan_cleanup.confirm(worker text, lease_token text, ids bigint[], outcome text,
                                       sizes bigint[] DEFAULT NULL)
RETURNS TABLE (id bigint, result text)
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp SET jit = off
AS $$
DECLARE
    v_lease bytea;
    v_done bigint[];
    v_stored bigint[];
BEGIN
    PERFORM orphan_cleanup._check_worker(worker);
    v_lease := orphan_cleanup._lease_hash(lease_token);
    IF outcome IS NULL OR outcome NOT IN ('deleted', 'absent') THEN
        RAISE EXCEPTION 'outcome must be ''deleted'' or ''absent'', got %', coalesce(quote_literal(outcome), 'NULL')
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF ids IS NULL THEN
        RAISE EXCEPTION 'ids must not be NULL' USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF cardinality(sizes) <> cardinality(ids) OR 0 > ANY (sizes) THEN
        RAISE EXCEPTION 'sizes must hold one size in bytes per id (NULL where unknown), got % for % ids', sizes, cardinality(ids)
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    v_stored := orphan_cleanup._still_stored(ids);
    WITH mine AS (
        UPDATE orphan_cleanup.deletion_queue AS d
           SET state = outcome, finished_at = now(), updated_at = now(), lease_until = NULL, lease_hash = NULL,
               job_cleanup = CASE WHEN d.job_id IS NULL THEN 'nothing to do: a stray has no job row' ELSE 'pending' END,
               -- The savings ledger: what this deletion reclaimed, as storage's answer said.
               bytes = CASE WHEN outcome = 'deleted' THEN sizes[array_position(ids, d.id)] END
         WHERE d.id = ANY (ids) AND d.state = 'claimed' AND d.claimed_by = worker AND d.lease_hash = v_lease
           AND d.id <> ALL (v_stored)
        RETURNING d.id, d.job_id, d.output_url, d.bucket, d.object_path
    ),
    audited AS (
        INSERT INTO orphan_cleanup.audit_log (action, job_id, queue_id, output_url, actor)
        SELECT outcome, m.job_id, m.id, m.output_url, worker FROM mine AS m
    ),
    -- The Storage API's listing (sql/inventory.sql) forgets the objects gone, as the storage
    -- server deletes their storage.objects rows: else a gone object would look like a stray.
    forgotten AS (
        DELETE FROM orphan_cleanup.object_inventory AS i USING mine AS m
        WHERE i.bucket_id = m.bucket AND i.name = m.object_path
    )
    SELECT array_agg(m.id) INTO v_done FROM mine AS m;
    v_done := coalesce(v_done, '{}');
    PERFORM orphan_cleanup._cleanup_jobs(v_done, (SELECT on_confirm FROM orphan_cleanup._config()), worker);
    RETURN QUERY
    SELECT i.id,
           CASE WHEN i.id = ANY (v_done) THEN 'confirmed'
                WHEN i.id = ANY (v_stored) AND d.state = 'claimed' AND d.claimed_by = worker AND d.lease_hash = v_lease
                THEN format('not confirmed: still in storage.objects (%s/%s): storage answered %s without deleting it',
                            d.bucket, d.object_path,
                            CASE outcome WHEN 'deleted' THEN 'that it deleted it' ELSE 'that it was already absent' END)
                ELSE 'not confirmed: ' || orphan_cleanup._not_held(d, worker, v_lease)
           END
    FROM unnest(ids) WITH ORDINALITY AS i(id, n)
    LEFT JOIN orphan_cleanup.deletion_queue AS d ON d.id = i.id
    ORDER BY i.n;
END
$$;

-- The reaper could not delete these objects. Counts an attempt and retries with back-off; after
-- orphan_cleanup.max_attempts, or at once when retryable is false, the row is dead-lettered.
CREATE FUNCTION orphan_cleanup.fail(worker text, lease_token text, ids bigint[], error text, retryable boolean)
RETURNS TABLE (id bigint, result text)
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp SET jit = off
AS $$
DECLARE
    v_max integer := (SELECT max_attempts FROM orphan_cleanup._config());
    v_backoff_s integer := (SELECT retry_backoff_s FROM orphan_cleanup._config());
    v_lease bytea;
    v_moved bigint[];
BEGIN
    PERFORM orphan_cleanup._check_worker(worker);
    v_lease := orphan_cleanup._lease_hash(lease_token);
    IF ids IS NULL THEN
        RAISE EXCEPTION 'ids must not be NULL' USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF error IS NULL OR btrim(error) = '' THEN
        RAISE EXCEPTION 'error must say what went wrong' USING ERRCODE = 'invalid_parameter_value';
    END IF;
    WITH moved AS (
        UPDATE orphan_cleanup.deletion_queue AS d
           SET attempts = d.attempts + 1,
               state = CASE WHEN NOT coalesce(retryable, true) OR d.attempts + 1 >= v_max THEN 'dead' ELSE 'pending' END,
               available_at = now() + orphan_cleanup._backoff(d.attempts + 1, v_backoff_s),
               last_error = left(orphan_cleanup.redact_url(error), 2000),
               lease_until = NULL, lease_hash = NULL,
               finished_at = CASE WHEN NOT coalesce(retryable, true) OR d.attempts + 1 >= v_max THEN now() END,
               updated_at = now()
         WHERE d.id = ANY (ids) AND d.state = 'claimed' AND d.claimed_by = worker AND d.lease_hash = v_lease
        RETURNING d.id, d.job_id, d.output_url, d.state, d.attempts, d.last_error
    ),
    audited AS (
        INSERT INTO orphan_cleanup.audit_log (action, job_id, queue_id, output_url, actor, detail)
        SELECT 'failed', m.job_id, m.id, m.output_url, worker,
               format('%s (attempt %s%s)', m.last_error, m.attempts, CASE WHEN NOT coalesce(retryable, true) THEN ', not retryable' ELSE '' END)
        FROM moved AS m
        UNION ALL
        SELECT 'dead_lettered', m.job_id, m.id, m.output_url, worker,
               CASE WHEN NOT coalesce(retryable, true) THEN 'not retryable: ' ELSE format('out of attempts (%s): ', m.attempts) END || m.last_error
        FROM moved AS m WHERE m.state = 'dead'
    )
    SELECT array_agg(m.id) INTO v_moved FROM moved AS m;
    v_moved := coalesce(v_moved, '{}');
    RETURN QUERY
    SELECT i.id,
           CASE WHEN i.id = ANY (v_moved) AND d.state = 'dead' THEN 'dead-lettered'
                WHEN i.id = ANY (v_moved) THEN format('retry after %s', to_char(d.available_at, 'YYYY-MM-DD HH24:MI:SS TZ'))
                ELSE 'not failed: ' || orphan_cleanup._not_held(d, worker, v_lease) END
    FROM unnest(ids) WITH ORDINALITY AS i(id, n)
    LEFT JOIN orphan_cleanup.deletion_queue AS d ON d.id = i.id
    ORDER BY i.n;
END
$$;

-- Gives claims back without counting an attempt (clean shutdown, storage overload, a storage
-- configuration error). With ids NULL, every row this worker holds. A reason is audited, and
-- the latest one shows in queue_status() and health(): how a reaper that storage refuses makes
-- itself heard in the database.
CREATE FUNCTION orphan_cleanup.release(worker text, lease_token text, ids bigint[], reason text,
                                       nothing_sent boolean DEFAULT false) RETURNS bigint
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp SET jit = off
AS $$
DECLARE
    v_lease bytea;
    v_back bigint[];
BEGIN
    PERFORM orphan_cleanup._check_worker(worker);
    v_lease := orphan_cleanup._lease_hash(lease_token);
    IF nothing_sent IS NULL THEN
        RAISE EXCEPTION 'nothing_sent must be true or false' USING ERRCODE = 'invalid_parameter_value';
    END IF;
    WITH released AS (
        UPDATE orphan_cleanup.deletion_queue AS d
           SET state = 'pending', lease_until = NULL, lease_hash = NULL, available_at = now(), updated_at = now()
         WHERE d.state = 'claimed' AND d.claimed_by = worker AND d.lease_hash = v_lease
           AND (ids IS NULL OR d.id = ANY (ids))
        RETURNING d.id, d.job_id, d.output_url
    ),
    audited AS (
        INSERT INTO orphan_cleanup.audit_log (action, job_id, queue_id, output_url, actor, detail)
        SELECT 'released', r.job_id, r.id, r.output_url, worker,
               CASE WHEN nothing_sent THEN coalesce(left(orphan_cleanup.redact_url(reason), 2000) || ' ', '') || '(nothing was sent)'
                    -- A reason (upstream text among it) never passes for the nothing-sent mark.
                    ELSE replace(left(orphan_cleanup.redact_url(reason), 2000), '(nothing was sent)', '(nothing was sent?)') END
        FROM released AS r
    )
    SELECT array_agg(r.id) INTO v_back FROM released AS r;
    IF nothing_sent AND v_back IS NOT NULL THEN
        PERFORM orphan_cleanup._unsent(v_back, worker);
    END IF;
    RETURN coalesce(cardinality(v_back), 0);
END
$$;

-- The reaper's own allow-list refuses these rows (its SUPABASE_URL, --storage-hosts or
-- --buckets do not cover them): they go back to the queue at once for another reaper, without
-- counting an attempt, and are not handed to this reaper again while its lists stay the same
-- (orphan_cleanup.refusals, kept for history_retention). Refusing says something about the
-- reaper, not about the row, so it must not dead-letter rows a well-configured reaper would
-- delete. Audited (as 'released', with the reason), and named by health() and queue_status().
CREATE FUNCTION orphan_cleanup.refuse(worker text, lease_token text, ids bigint[], reason text)
RETURNS TABLE (id bigint, result text)
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp SET jit = off
AS $$
DECLARE
    v_back bigint[];
    v_reason text;
    v_lease bytea;
BEGIN
    PERFORM orphan_cleanup._check_worker(worker);
    v_lease := orphan_cleanup._lease_hash(lease_token);
    IF ids IS NULL THEN
        RAISE EXCEPTION 'ids must not be NULL' USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF reason IS NULL OR btrim(reason) = '' THEN
        RAISE EXCEPTION 'reason must say why the reaper refuses the rows' USING ERRCODE = 'invalid_parameter_value';
    END IF;
    v_reason := left(orphan_cleanup.redact_url(reason), 2000);
    WITH back AS (
        UPDATE orphan_cleanup.deletion_queue AS d
           SET state = 'pending', lease_until = NULL, lease_hash = NULL, available_at = now(), updated_at = now()
         WHERE d.id = ANY (ids) AND d.state = 'claimed' AND d.claimed_by = worker AND d.lease_hash = v_lease
        RETURNING d.id, d.job_id, d.output_url
    ),
    noted AS (
        INSERT INTO orphan_cleanup.refusals AS f (queue_id, refused_by, reason)
        SELECT b.id, worker, v_reason FROM back AS b
        ON CONFLICT (queue_id, refused_by) DO UPDATE SET reason = EXCLUDED.reason, at = now()
    ),
    audited AS (
        INSERT INTO orphan_cleanup.audit_log (action, job_id, queue_id, output_url, actor, detail)
        SELECT 'released', b.job_id, b.id, b.output_url, worker,
               'refused by the reaper''s own allow-list, given back for another reaper: ' || v_reason
        FROM back AS b
    )
    SELECT array_agg(b.id) INTO v_back FROM back AS b;
    v_back := coalesce(v_back, '{}');
    -- Refused rows never reach storage: as good as never handed out.
    IF cardinality(v_back) > 0 THEN
        PERFORM orphan_cleanup._unsent(v_back, worker);
    END IF;
    RETURN QUERY
    SELECT i.id,
           CASE WHEN i.id = ANY (v_back) THEN 'given back'
                ELSE 'not given back: ' || orphan_cleanup._not_held(d, worker, v_lease) END
    FROM unnest(ids) WITH ORDINALITY AS i(id, n)
    LEFT JOIN orphan_cleanup.deletion_queue AS d ON d.id = i.id
    ORDER BY i.n;
END
$$;

-- The latest reason a reaper gave for releasing claims, within the last hour (a release that
-- only says nothing was sent, a batch claimed ahead and given back, is no alert).
CREATE FUNCTION orphan_cleanup._reaper_alert(OUT alert text, OUT alert_at timestamptz, OUT alert_by text)
LANGUAGE sql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp
BEGIN ATOMIC
    SELECT a.detail, a.at, a.actor
    FROM orphan_cleanup.audit_log AS a
    WHERE a.action = 'released' AND a.detail IS NOT NULL AND a.detail <> '(nothing was sent)'
      AND a.at > now() - interval '1 hour'
    ORDER BY a.id DESC
    LIMIT 1;
END;

-- What the reaper `worker` sent for deletion within the last `within`, per second of claiming,
-- read from the audit log: its claims, less the rows it gave back with nothing sent (released
-- unsent, or refused by its own allow-list) from that very claim. A reaper with
-- --max-deletes-per-hour starts from this, so a restart does not reset its budget. Each second's
-- age is that of its latest claim, so the budget comes back no earlier than it should.
CREATE FUNCTION orphan_cleanup.sent_by_reaper(worker text, within interval)
RETURNS TABLE (age_s double precision, objects bigint)
LANGUAGE sql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp
BEGIN ATOMIC
    WITH mine AS (
        SELECT a.at, a.action, a.queue_id, a.detail
        FROM orphan_cleanup.audit_log AS a
        WHERE a.at > now() - within AND a.action IN ('claimed', 'released') AND a.actor = worker
    ),
    claims AS (
        SELECT m.at, m.queue_id,
               lead(m.at) OVER (PARTITION BY m.queue_id ORDER BY m.at) AS next_claim
        FROM mine AS m WHERE m.action = 'claimed'
    )
    SELECT extract(epoch FROM now() - max(c.at))::double precision, count(*)
    FROM claims AS c
    WHERE NOT EXISTS (
        SELECT 1 FROM mine AS b
        WHERE b.action = 'released' AND b.queue_id = c.queue_id
          AND b.at >= c.at AND (c.next_claim IS NULL OR b.at < c.next_claim)
          AND (b.detail LIKE '%(nothing was sent)' OR b.detail LIKE 'refused by the reaper''s own allow-list%'))
    GROUP BY date_trunc('second', c.at)
    ORDER BY 1 DESC;
END;

-- What a claim would hand out now, without claiming: for the reaper's --dry-run.
CREATE FUNCTION orphan_cleanup.peek(max_rows integer DEFAULT 100)
RETURNS TABLE (id bigint, job_id uuid, host text, bucket text, object_path text, attempts integer,
               available_at timestamptz, output_url text)
LANGUAGE sql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp
BEGIN ATOMIC
    SELECT d.id, d.job_id, d.host, d.bucket, d.object_path, d.attempts, d.available_at, d.output_url
    FROM orphan_cleanup.deletion_queue AS d
    WHERE d.state = 'pending'
    ORDER BY d.available_at, d.id
    LIMIT greatest(coalesce(max_rows, 100), 0);
END;

-- DBA: keeps objects from being deleted. Cancels the given pending or dead rows and every other
-- pending or dead row naming the same objects, and marks the objects kept, so that no row of
-- any job naming them is handed out later (claim() retires such rows). The jobs are not queued
-- again for the same URL. An object already handed to a reaper cannot be kept: it may be gone.
CREATE FUNCTION orphan_cleanup.cancel(ids bigint[])
RETURNS TABLE (id bigint, result text)
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp SET jit = off
AS $$
DECLARE
    v_keep text[];
    v_done bigint[];
BEGIN
    IF ids IS NULL THEN
        RAISE EXCEPTION 'ids must not be NULL' USING ERRCODE = 'invalid_parameter_value';
    END IF;
    -- The objects' rows, locked: a claim of them waits for this, or this for the claim.
    INSERT INTO orphan_cleanup.objects AS o (bucket, object_path)
    SELECT DISTINCT d.bucket, d.object_path FROM orphan_cleanup.deletion_queue AS d
    WHERE d.id = ANY (ids) AND d.state IN ('pending', 'dead') AND d.bucket IS NOT NULL
    ON CONFLICT (bucket, object_path) DO NOTHING;
    WITH locked AS (
        SELECT o.bucket, o.object_path, o.handouts
        FROM orphan_cleanup.objects AS o
        WHERE (o.bucket, o.object_path) IN (SELECT d.bucket, d.object_path FROM orphan_cleanup.deletion_queue AS d
                                            WHERE d.id = ANY (ids) AND d.state IN ('pending', 'dead'))
        ORDER BY o.bucket, o.object_path
        FOR UPDATE OF o
    ),
    kept AS (
        UPDATE orphan_cleanup.objects AS o
           SET kept_at = coalesce(o.kept_at, now()), kept_by = coalesce(o.kept_by, session_user::text), touched_at = now()
          FROM locked AS l
         WHERE o.bucket = l.bucket AND o.object_path = l.object_path AND l.handouts = 0
        RETURNING o.bucket || '/' || o.object_path AS key
    )
    SELECT array_agg(k.key) INTO v_keep FROM kept AS k;
    v_keep := coalesce(v_keep, '{}');
    WITH cancelled AS (
        UPDATE orphan_cleanup.deletion_queue AS d
           SET state = 'cancelled', reason = format('cancelled by %s', session_user), finished_at = now(), updated_at = now()
         WHERE d.state IN ('pending', 'dead')
           AND (d.id = ANY (ids) OR (d.bucket || '/' || d.object_path) = ANY (v_keep))
        RETURNING d.id, d.job_id, d.output_url, (d.bucket || '/' || d.object_path) = ANY (v_keep) AS kept
    ),
    audited AS (
        INSERT INTO orphan_cleanup.audit_log (action, job_id, queue_id, output_url, actor, detail)
        SELECT 'cancelled', c.job_id, c.id, c.output_url, session_user,
               CASE WHEN NOT c.kept THEN 'cancelled by a DBA after its object had been handed to a reaper: it may be deleted, and no job naming it can be saved'
                    WHEN c.id = ANY (ids) THEN 'cancelled by a DBA; its object is kept'
                    ELSE 'cancelled by a DBA with a row naming the same object; the object is kept' END
        FROM cancelled AS c
    )
    SELECT array_agg(c.id) INTO v_done FROM cancelled AS c;
    v_done := coalesce(v_done, '{}');
    RETURN QUERY
    SELECT i.id,
           CASE WHEN i.id = ANY (v_done) AND o.handouts > 0
                THEN format('cancelled, but its object %s/%s was already handed to a reaper (row %s, by %s at %s) and may be deleted; no job naming it can be saved',
                            o.bucket, o.object_path, o.last_queue_id, o.last_handed_to, o.last_handed_out_at)
                WHEN i.id = ANY (v_done) THEN 'cancelled'
                WHEN d.id IS NULL THEN 'not cancelled: no such queue row'
                WHEN d.state = 'claimed' THEN format('not cancelled: claimed by %s until %s; its object may already be deleted', d.claimed_by, d.lease_until)
                ELSE format('not cancelled: the row is already %s', d.state) END
    FROM unnest(ids) WITH ORDINALITY AS i(id, n)
    LEFT JOIN orphan_cleanup.deletion_queue AS d ON d.id = i.id
    LEFT JOIN orphan_cleanup.objects AS o ON o.bucket = d.bucket AND o.object_path = d.object_path
    UNION ALL
    SELECT x.id, 'cancelled: names the same object as a row you cancelled'
    FROM unnest(v_done) AS x(id)
    WHERE NOT (x.id = ANY (ids));
END
$$;

-- DBA: cancel() of every row of `bucket` whose object name starts with `prefix` ('' for the
-- whole bucket; the prefix is literal, '_' and '%' included), when a folder must be kept (a
-- campaign's renders, a customer's export): pending and dead rows are cancelled and their
-- objects kept as cancel() keeps them; a claimed row is named as not cancelled, with the reaper
-- that holds it. One row per row, as cancel() answers; none when nothing matched.
CREATE FUNCTION orphan_cleanup.cancel_prefix(bucket text, prefix text)
RETURNS TABLE (id bigint, result text)
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp SET jit = off
AS $$
BEGIN
    IF bucket IS NULL OR prefix IS NULL THEN
        RAISE EXCEPTION 'bucket and prefix must not be NULL (use '''' as the prefix for the whole bucket)'
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    RETURN QUERY
    SELECT c.id, c.result
    FROM orphan_cleanup.cancel(ARRAY(SELECT d.id FROM orphan_cleanup.deletion_queue AS d
                                     WHERE d.bucket = cancel_prefix.bucket AND d.state IN ('pending', 'dead', 'claimed')
                                       AND pg_catalog.starts_with(d.object_path, cancel_prefix.prefix)
                                     ORDER BY d.id)) AS c;
END
$$;

-- DBA: puts dead-lettered rows back in the queue with fresh attempts. NULL: all of them. A job
-- has one live row at a time: a dead row whose job has a live (pending or claimed) row already,
-- or another dead row requeued now, is skipped, named in a NOTICE, and left dead.
CREATE FUNCTION orphan_cleanup.requeue_dead(ids bigint[] DEFAULT NULL) RETURNS bigint
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp SET jit = off
AS $$
DECLARE
    n bigint;
    skipped text;
BEGIN
    WITH candidate AS (
        -- Each dead row asked for, with what keeps it dead: a live row of its job, or a dead row
        -- of its job with a smaller id that is requeued now. One rule for both the update and
        -- the NOTICE.
        SELECT d.id, d.job_id, b.id AS blocker, b.state AS blocker_state
        FROM orphan_cleanup.deletion_queue AS d
        LEFT JOIN LATERAL (SELECT l.id, l.state FROM orphan_cleanup.deletion_queue AS l
                           WHERE (l.job_id = d.job_id
                                  OR (d.job_id IS NULL AND l.job_id IS NULL AND l.bucket = d.bucket AND l.object_path = d.object_path))
                             AND (l.state IN ('pending', 'claimed')
                                  OR (l.state = 'dead' AND l.id < d.id AND (ids IS NULL OR l.id = ANY (ids))))
                           ORDER BY l.state = 'dead', l.id LIMIT 1) AS b ON true
        WHERE d.state = 'dead' AND (ids IS NULL OR d.id = ANY (ids))
    ),
    requeued AS (
        UPDATE orphan_cleanup.deletion_queue AS d
           SET state = 'pending', attempts = 0, available_at = now(), finished_at = NULL, updated_at = now()
          FROM candidate AS c
         WHERE d.id = c.id AND c.blocker IS NULL
        RETURNING d.id, d.job_id, d.output_url, d.last_error
    ),
    audited AS (
        INSERT INTO orphan_cleanup.audit_log (action, job_id, queue_id, output_url, actor, detail)
        SELECT 'requeued', r.job_id, r.id, r.output_url, session_user, 'last error: ' || coalesce(r.last_error, 'none')
        FROM requeued AS r
    )
    SELECT (SELECT count(*) FROM requeued),
           (SELECT string_agg(format('row %s (%s already has row %s %s)', c.id,
                                     coalesce('job ' || c.job_id, 'its stray object'), c.blocker,
                                     CASE WHEN c.blocker_state = 'dead' THEN 'requeued' ELSE c.blocker_state END),
                              ', ' ORDER BY c.id)
            FROM candidate AS c WHERE c.blocker IS NOT NULL)
      INTO n, skipped;
    IF skipped IS NOT NULL THEN
        RAISE NOTICE 'requeue_dead() skipped %', skipped
            USING HINT = 'A job has one live row at a time; these stay dead.';
    END IF;
    IF n > 0 THEN
        PERFORM pg_catalog.pg_notify('orphan_cleanup_queue', n::text);
    END IF;
    RETURN n;
END
$$;
