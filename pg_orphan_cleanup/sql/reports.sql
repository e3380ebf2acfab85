-- The deployment guide's validation queries as functions, plus health() and queue_status().

-- The guide's pre- and post-deployment validation, in one report. The guide's orphan count is
-- split by what this system is doing about each orphan.
CREATE FUNCTION orphan_cleanup.validation_report()
RETURNS TABLE (metric text, value bigint, detail text)
LANGUAGE plpgsql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp SET jit = off
AS $$
DECLARE
    t record;
    s record;
    last orphan_cleanup.cycle_log;
    v_saved bigint;
    v_refused bigint;
BEGIN
    t := orphan_cleanup._tables();
    EXECUTE format($sql$
        WITH o AS (
            SELECT rj.id, rj.output_url, rj.%3$I < now() - $1 AS old_enough
            FROM %1$s AS rj
            LEFT JOIN %2$s AS ua ON ua.metadata ->> 'render_job_id' = rj.id::text
            WHERE rj.status = 'completed' AND rj.output_url IS NOT NULL AND ua.id IS NULL
        ),
        refs AS (
            -- Every job any asset references, however spelled: one pass, hashed below, so the
            -- report is cheap even before the recommended indexes exist.
            SELECT orphan_cleanup.job_ref_key(a.metadata ->> 'render_job_id') AS job_key
            FROM %2$s AS a
            WHERE (a.metadata ->> 'render_job_id') IS NOT NULL
        ),
        s AS (
            SELECT o.old_enough,
                   (SELECT q.state FROM orphan_cleanup.deletion_queue AS q
                    WHERE q.job_id = o.id AND q.url_hash = md5(o.output_url)
                    ORDER BY q.id DESC LIMIT 1) AS qstate,
                   o.id::text IN (SELECT r.job_key FROM refs AS r WHERE r.job_key IS NOT NULL) AS noncanonical
            FROM o
        )
        SELECT count(*) AS total,
               count(*) FILTER (WHERE noncanonical) AS protected,
               count(*) FILTER (WHERE NOT noncanonical AND qstate IS NULL AND NOT old_enough) AS too_young,
               count(*) FILTER (WHERE NOT noncanonical AND (qstate IS NULL OR qstate IN ('stale', 'rescued')) AND old_enough) AS not_queued,
               count(*) FILTER (WHERE NOT noncanonical AND qstate = 'pending') AS queued,
               count(*) FILTER (WHERE NOT noncanonical AND qstate = 'claimed') AS in_flight,
               count(*) FILTER (WHERE NOT noncanonical AND qstate = 'rejected') AS rejected,
               count(*) FILTER (WHERE NOT noncanonical AND qstate = 'dead') AS dead,
               count(*) FILTER (WHERE NOT noncanonical AND qstate = 'cancelled') AS cancelled,
               count(*) FILTER (WHERE NOT noncanonical AND qstate IN ('deleted', 'absent')) AS file_gone
        FROM s
        $sql$, t.jobs_oid::regclass, t.assets_oid::regclass, t.age_column)
    INTO s USING make_interval(secs => t.min_age_s);

    metric := 'orphaned jobs (guide definition)'; value := s.total;
    detail := 'completed, with output_url, no user_assets row with that exact render_job_id'; RETURN NEXT;
    metric := '  not yet queued'; value := s.not_queued;
    detail := 'old enough; the next cycle (or a shared object) decides'; RETURN NEXT;
    metric := '  younger than min_age'; value := s.too_young;
    detail := format('created less than %s ago', make_interval(secs => t.min_age_s)); RETURN NEXT;
    metric := '  queued'; value := s.queued; detail := 'waiting for a reaper'; RETURN NEXT;
    metric := '  in flight'; value := s.in_flight; detail := 'claimed by a reaper'; RETURN NEXT;
    metric := '  protected'; value := s.protected;
    detail := 'an asset references the job through a differently spelled id; never deleted'; RETURN NEXT;
    metric := '  rejected'; value := s.rejected; detail := 'URL malformed or not allowed; never sent to storage'; RETURN NEXT;
    metric := '  dead-lettered'; value := s.dead; detail := 'out of attempts; see requeue_dead()'; RETURN NEXT;
    metric := '  cancelled'; value := s.cancelled; detail := 'cancelled by a DBA; kept'; RETURN NEXT;
    metric := '  file deleted, job row kept'; value := s.file_gone;
    detail := 'job row cleanup pending or failed; see deletion_queue.job_cleanup'; RETURN NEXT;

    IF EXISTS (SELECT 1 FROM pg_catalog.pg_attribute WHERE attrelid = t.assets_oid AND attname = 'asset_type' AND NOT attisdropped) THEN
        EXECUTE format($sql$
            SELECT count(*) FROM %s
            WHERE asset_type = 'generated_saved' AND metadata ->> 'render_job_id' IS NOT NULL
            $sql$, t.assets_oid::regclass) INTO v_saved;
        metric := 'saved assets'; value := v_saved; detail := 'asset_type generated_saved with a render_job_id'; RETURN NEXT;
    END IF;
    EXECUTE format('SELECT count(*) FROM %s WHERE %I > now() - interval ''1 hour''', t.jobs_oid::regclass, t.age_column)
       INTO value;
    metric := 'jobs in the last hour'; detail := format('by %I', t.age_column); RETURN NEXT;
    metric := 'orphans older than 5 minutes'; value := orphan_cleanup.orphan_count(interval '5 minutes');
    detail := 'the guide''s post-deployment check; near zero once the reaper keeps up'; RETURN NEXT;
    SELECT CASE WHEN is_called THEN last_value ELSE 0 END INTO v_refused FROM orphan_cleanup.refused_saves;
    metric := 'saves refused'; value := v_refused;
    detail := 'saves of jobs whose file a reaper may already have deleted (since install)'; RETURN NEXT;

    SELECT * INTO last FROM orphan_cleanup.cycle_log AS l WHERE l.status <> 'skipped' ORDER BY l.id DESC LIMIT 1;
    metric := 'last cycle';
    IF last.id IS NULL THEN
        value := NULL; detail := 'no cycle has run yet';
    ELSE
        value := last.id;
        detail := format('%s at %s: %s found, %s enqueued, %s protected, %s rejected%s', last.status,
                         to_char(last.started_at, 'YYYY-MM-DD HH24:MI:SS TZ'), last.found, last.enqueued,
                         last.protected, last.rejected, coalesce(' - ' || last.error, ''));
    END IF;
    RETURN NEXT;
END
$$;

-- The guide's weekly health check: orphaned jobs per day (guide definition).
CREATE FUNCTION orphan_cleanup.daily_orphans(days integer DEFAULT 7)
RETURNS TABLE (day date, orphaned_jobs bigint)
LANGUAGE plpgsql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp SET jit = off
AS $$
DECLARE
    t record;
BEGIN
    IF days IS NULL OR days < 1 OR days > 3660 THEN
        RAISE EXCEPTION 'days must be between 1 and 3660, got %', coalesce(days::text, 'NULL') USING ERRCODE = 'invalid_parameter_value';
    END IF;
    t := orphan_cleanup._tables();
    RETURN QUERY EXECUTE format($sql$
        SELECT date_trunc('day', rj.%3$I)::date AS day, count(*) AS orphaned_jobs
        FROM %1$s AS rj
        LEFT JOIN %2$s AS ua ON ua.metadata ->> 'render_job_id' = rj.id::text
        WHERE rj.status = 'completed'
          AND rj.output_url IS NOT NULL
          AND ua.id IS NULL
          AND rj.%3$I > now() - make_interval(days => $1)
        GROUP BY 1
        ORDER BY 1 DESC
        $sql$, t.jobs_oid::regclass, t.assets_oid::regclass, t.age_column)
    USING days;
END
$$;

-- The guide's storage usage trend: assets and bytes per asset type.
CREATE FUNCTION orphan_cleanup.storage_usage()
RETURNS TABLE (asset_type text, total_assets bigint, total_bytes numeric)
LANGUAGE plpgsql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp SET jit = off
AS $$
DECLARE
    t record;
    missing text[];
BEGIN
    t := orphan_cleanup._tables();
    SELECT array_agg(c) INTO missing FROM unnest(ARRAY['asset_type', 'file_size']) AS c
    WHERE NOT EXISTS (SELECT 1 FROM pg_catalog.pg_attribute
                      WHERE attrelid = t.assets_oid AND attname = c AND attnum > 0 AND NOT attisdropped);
    IF missing IS NOT NULL THEN
        RAISE EXCEPTION 'storage_usage() needs column(s) % on %', array_to_string(missing, ', '), t.assets_oid::regclass
            USING ERRCODE = 'undefined_column', HINT = 'The guide''s query groups assets by asset_type and sums file_size.';
    END IF;
    RETURN QUERY EXECUTE format($sql$
        SELECT ua.asset_type::text, count(*), sum(ua.file_size)::numeric
        FROM %s AS ua
        GROUP BY ua.asset_type
        ORDER BY 3 DESC NULLS LAST
        $sql$, t.assets_oid::regclass);
END
$$;

-- The savings report (issue 15): per UTC day or week, what cleanup reclaimed and what it found,
-- from the queue and, for rows history_retention has pruned, the savings ledger, so a report
-- reads the same before and after a prune.
--   objects_reclaimed, bytes_reclaimed: deleted in the period (bytes as storage's answer gave them);
--   orphans_found: queued in the period;
--   leak_bytes_per_day: the bytes of the orphans queued in the period (an object's size is known
--     once it is deleted), per day of the period so far;
--   monthly_saving: what the period's reclaimed bytes would cost per month at
--     orphan_cleanup.storage_price_per_gb_month (a GB being 2^30 bytes), in dollars;
--   bytes_still_queued, in the current period only: the size of the objects the queue still
--     holds (pending, claimed, dead), where storage.objects is in this database (or, else, as
--     the last listing through the Storage API saw them);
--   queue_depth: the rows waiting at the end of the period (now, for the current one): queued
--     and not yet finished (deleted, absent, dead-lettered, cancelled), rejected rows aside.
--     Counted from the rows in the queue: exact for every period that ended after the oldest
--     row history_retention pruned had finished.
CREATE FUNCTION orphan_cleanup.savings_report(period text DEFAULT 'week', periods integer DEFAULT 8)
RETURNS TABLE (period_start date, objects_reclaimed bigint, bytes_reclaimed numeric, orphans_found bigint,
               strays_found bigint, leak_bytes_per_day numeric, bytes_still_queued numeric, monthly_saving numeric,
               queue_depth bigint)
LANGUAGE plpgsql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp SET jit = off
AS $$
DECLARE
    v_price float8 := (SELECT c.storage_price_per_gb_month FROM orphan_cleanup._config() AS c);
    v_unit interval;
    v_today date := (now() AT TIME ZONE 'UTC')::date;
    v_first date;
    v_since timestamptz;
    v_queued numeric;
BEGIN
    IF period IS NULL OR period NOT IN ('day', 'week') THEN
        RAISE EXCEPTION 'period must be ''day'' or ''week'', got %', coalesce(quote_literal(period), 'NULL')
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF periods IS NULL OR periods < 1 OR periods > 3660 THEN
        RAISE EXCEPTION 'periods must be between 1 and 3660, got %', coalesce(periods::text, 'NULL')
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    v_unit := CASE period WHEN 'day' THEN interval '1 day' ELSE interval '7 days' END;
    v_first := (date_trunc(period, v_today::timestamp) - v_unit * (periods - 1))::date;
    v_since := v_first::timestamp AT TIME ZONE 'UTC';
    IF orphan_cleanup._inventory_problem() IS NULL THEN
        EXECUTE format($sql$
            SELECT sum((o.metadata ->> 'size')::bigint)
            FROM orphan_cleanup.deletion_queue AS d
            JOIN %s AS o ON o.bucket_id = d.bucket AND o.name = d.object_path
            WHERE d.state IN ('pending', 'claimed', 'dead')
            $sql$, orphan_cleanup._inventory()) INTO v_queued;
        v_queued := coalesce(v_queued, 0);
    END IF;
    RETURN QUERY
    WITH days AS (
        SELECT l.day, l.kind, l.found, l.found_bytes, l.deleted, l.deleted_bytes
        FROM orphan_cleanup.savings_ledger AS l WHERE l.day >= v_first
        UNION ALL
        SELECT (d.enqueued_at AT TIME ZONE 'UTC')::date, d.kind, 1, coalesce(d.bytes, 0), 0, 0
        FROM orphan_cleanup.deletion_queue AS d WHERE d.enqueued_at >= v_since
        UNION ALL
        SELECT (d.finished_at AT TIME ZONE 'UTC')::date, d.kind, 0, 0, 1, coalesce(d.bytes, 0)
        FROM orphan_cleanup.deletion_queue AS d WHERE d.state = 'deleted' AND d.finished_at >= v_since
    ), p AS (
        SELECT g::date AS start FROM generate_series(v_first::timestamp, v_today::timestamp, v_unit) AS g
    ), waiting AS (
        -- Waiting when the report starts, then +1 for each row queued and -1 for each finished.
        SELECT count(*) AS n FROM orphan_cleanup.deletion_queue AS d
        WHERE d.state <> 'rejected' AND d.enqueued_at < v_since AND (d.finished_at IS NULL OR d.finished_at >= v_since)
    ), moves AS (
        SELECT (d.enqueued_at AT TIME ZONE 'UTC')::date AS day, 1 AS n
        FROM orphan_cleanup.deletion_queue AS d WHERE d.state <> 'rejected' AND d.enqueued_at >= v_since
        UNION ALL
        SELECT (d.finished_at AT TIME ZONE 'UTC')::date, -1
        FROM orphan_cleanup.deletion_queue AS d WHERE d.state <> 'rejected' AND d.finished_at >= v_since
    ), depth AS (
        SELECT p.start, (SELECT w.n FROM waiting AS w) + sum(coalesce(sum(m.n), 0)) OVER (ORDER BY p.start) AS n
        FROM p LEFT JOIN moves AS m ON m.day >= p.start AND m.day < p.start + v_unit
        GROUP BY p.start
    )
    SELECT p.start,
           coalesce(sum(x.deleted), 0)::bigint,
           coalesce(sum(x.deleted_bytes), 0)::numeric,
           coalesce(sum(x.found) FILTER (WHERE x.kind = 'orphan'), 0)::bigint,
           coalesce(sum(x.found) FILTER (WHERE x.kind = 'stray'), 0)::bigint,
           -- The leak is new orphans: strays are what leaked before.
           round(coalesce(sum(x.found_bytes) FILTER (WHERE x.kind = 'orphan'), 0)::numeric
                 / LEAST(extract(day FROM v_unit)::int, v_today - p.start + 1), 1),
           CASE WHEN p.start + v_unit > v_today THEN v_queued END,
           round(coalesce(sum(x.deleted_bytes), 0)::numeric / 1073741824 * v_price::numeric, 2),
           (SELECT dp.n FROM depth AS dp WHERE dp.start = p.start)::bigint
    FROM p
    LEFT JOIN days AS x ON x.day >= p.start AND x.day < p.start + v_unit
    GROUP BY p.start
    ORDER BY p.start;
END
$$;

-- What _reaper_coverage() finds, passed on to _health() so that queue_status() reads the ready
-- rows once, not once for its own columns and again inside health().
CREATE TYPE orphan_cleanup.reaper_coverage AS (
    active            integer,   -- reapers that claimed in the last 15 minutes
    unserved          bigint,    -- ready rows none of them serves, or every one that could refused
    unserved_what     text,      -- which buckets and hosts
    refused_last_hour bigint,    -- rows reapers gave back with refuse()
    misconfigured     text       -- the reapers to blame, by name, and why
);

-- What the reapers that claimed in the last 15 minutes leave undone: ready rows none of them
-- serves (by its buckets and hosts) or that every one that could serve refused (however long
-- ago), rows refused in the last hour, and the reapers to blame, by name: those whose lists left
-- ready rows to others, those of another project (own host not in allowed_hosts), those whose own
-- allow-list refused rows, reapers older than 0.2.0 that say nothing of their hosts, and, while
-- orphan_cleanup.allowed_hosts is empty, reapers of several hosts claiming from one queue.
CREATE FUNCTION orphan_cleanup._reaper_coverage() RETURNS orphan_cleanup.reaper_coverage
LANGUAGE plpgsql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp SET jit = off
AS $$
DECLARE
    v_any_host boolean := orphan_cleanup._no_entries((SELECT c.allowed_hosts FROM orphan_cleanup._config() AS c));
    v_homes text;
    v_active orphan_cleanup.reapers[];
    by_refusals record;
    c orphan_cleanup.reaper_coverage;
BEGIN
    SELECT coalesce(array_agg(r), '{}') INTO v_active
    FROM orphan_cleanup.reapers AS r WHERE r.last_claim_at > now() - interval '15 minutes';
    c.active := cardinality(v_active);
    c.unserved := 0;
    IF c.active > 0 THEN
        -- By the lists: one pass over the ready rows, grouped by bucket and host.
        SELECT coalesce(sum(g.n), 0), string_agg(format('%s @ %s', g.bucket, coalesce(g.host, '(no host)')), ', ' ORDER BY g.bucket, g.host)
          INTO c.unserved, c.unserved_what
        FROM (SELECT q.bucket, q.host, count(*) AS n
              FROM orphan_cleanup.deletion_queue AS q
              WHERE q.state = 'pending' AND q.available_at <= now()
              GROUP BY q.bucket, q.host) AS g
        WHERE NOT EXISTS (SELECT 1 FROM unnest(v_active) AS a
                          WHERE orphan_cleanup._serves(a.buckets, a.hosts, orphan_cleanup._home_ok(a.hosts, a.home), g.bucket, g.host));
        -- By refusals: rows some active reaper serves, but every one that does refused.
        SELECT count(DISTINCT q.id) AS n, string_agg(DISTINCT format('%s @ %s', q.bucket, coalesce(q.host, '(no host)')), ', ') AS what
          INTO by_refusals
        FROM orphan_cleanup.refusals AS f
        JOIN orphan_cleanup.deletion_queue AS q ON q.id = f.queue_id
        WHERE q.state = 'pending' AND q.available_at <= now()
          AND EXISTS (SELECT 1 FROM unnest(v_active) AS a
                      WHERE orphan_cleanup._serves(a.buckets, a.hosts, orphan_cleanup._home_ok(a.hosts, a.home), q.bucket, q.host))
          AND NOT EXISTS (SELECT 1 FROM unnest(v_active) AS a
                          WHERE orphan_cleanup._serves(a.buckets, a.hosts, orphan_cleanup._home_ok(a.hosts, a.home), q.bucket, q.host)
                            AND NOT EXISTS (SELECT 1 FROM orphan_cleanup.refusals AS f2
                                            WHERE f2.queue_id = q.id AND f2.refused_by = a.reaper));
        IF by_refusals.n > 0 THEN
            c.unserved := c.unserved + by_refusals.n;
            c.unserved_what := concat_ws(', ', c.unserved_what, by_refusals.what || ' (refused by every reaper that serves it)');
        END IF;
        IF v_any_host THEN
            SELECT string_agg(format('%s at %s', a.reaper, a.home), ', ' ORDER BY a.reaper) INTO v_homes
            FROM unnest(v_active) AS a
            WHERE a.home IS NOT NULL
            HAVING count(DISTINCT a.home) > 1;
        END IF;
    END IF;
    SELECT count(*) INTO c.refused_last_hour FROM orphan_cleanup.refusals AS f WHERE f.at > now() - interval '1 hour';
    SELECT string_agg(format('reaper %s (buckets %s; hosts %s) %s', x.reaper,
                             coalesce(array_to_string(r.buckets, ','), 'any'), coalesce(array_to_string(r.hosts, ','), 'any'),
                             concat_ws(' and ',
                                 CASE WHEN NOT orphan_cleanup._home_ok(r.hosts, r.home)
                                      THEN format('is another project''s: its own host %s is not one of orphan_cleanup.allowed_hosts, so it is handed nothing', coalesce(r.home, '(unsaid)')) END,
                                 CASE WHEN r.hosts IS NULL AND NOT v_any_host
                                      THEN 'says nothing of the hosts it serves (a reaper older than 0.2.0), so it is handed rows of every host: upgrade it' END,
                                 CASE WHEN r.passed_over_at > now() - interval '15 minutes' AND orphan_cleanup._home_ok(r.hosts, r.home)
                                      THEN format('left ready rows it does not serve (%s) to other reapers', r.passed_over_what) END,
                                 CASE WHEN f.n IS NOT NULL
                                      THEN format('refused %s rows it was handed (%s)', f.n, f.reason) END)),
                      '; ' ORDER BY x.reaper)
      INTO c.misconfigured
    FROM (SELECT r.reaper FROM orphan_cleanup.reapers AS r WHERE r.passed_over_at > now() - interval '15 minutes'
          UNION
          SELECT a.reaper FROM unnest(v_active) AS a
          WHERE NOT orphan_cleanup._home_ok(a.hosts, a.home) OR (a.hosts IS NULL AND NOT v_any_host)
          UNION
          SELECT f.refused_by FROM orphan_cleanup.refusals AS f WHERE f.at > now() - interval '1 hour') AS x
    LEFT JOIN orphan_cleanup.reapers AS r ON r.reaper = x.reaper
    LEFT JOIN (SELECT f.refused_by, count(*) AS n, (array_agg(f.reason ORDER BY f.at DESC))[1] AS reason
               FROM orphan_cleanup.refusals AS f WHERE f.at > now() - interval '1 hour'
               GROUP BY f.refused_by) AS f ON f.refused_by = x.reaper;
    IF v_homes IS NOT NULL THEN
        c.misconfigured := concat_ws('; ', c.misconfigured,
            format('reapers of different projects claim from this queue (%s), and with orphan_cleanup.allowed_hosts empty the database cannot tell which one serves its bare bucket/key rows: set allowed_hosts to this project''s host', v_homes));
    END IF;
    RETURN c;
END
$$;

-- The active pg_cron jobs in this database that run cycles, described, or NULL (no pg_cron, no
-- such job, or no right to read cron.job: it shows each role its own jobs).
CREATE FUNCTION orphan_cleanup._cron_jobs() RETURNS text
LANGUAGE plpgsql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    jobs text;
BEGIN
    IF pg_catalog.to_regclass('cron.job') IS NULL THEN
        RETURN NULL;
    END IF;
    EXECUTE $q$SELECT string_agg(format('pg_cron job %s (%s, schedule %L, as %s)', j.jobid, j.jobname, j.schedule, j.username), '; ' ORDER BY j.jobid)
               FROM cron.job AS j
               WHERE j.active AND j.database = pg_catalog.current_database() AND j.command ILIKE '%orphan_cleanup.run_cycle%'$q$
        INTO jobs;
    RETURN jobs;
EXCEPTION WHEN insufficient_privilege THEN
    RETURN NULL;
END
$$;

-- health()'s checks, given what _reaper_coverage() found.
CREATE FUNCTION orphan_cleanup._health(cov orphan_cleanup.reaper_coverage)
RETURNS TABLE (check_name text, status text, detail text)
LANGUAGE plpgsql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp SET jit = off
AS $$
DECLARE
    cfg record;
    att orphan_cleanup.attachment;
    drift text;
    guard_problem text;
    last orphan_cleanup.cycle_log;
    last_ok timestamptz;
    v_interval interval;
    v_preloaded boolean;
    v_workers integer;
    v_cron text;
    v_actor text;
    v_actor_at timestamptz;
    v_late boolean;
    n bigint;
    ix record;
    v_ready_since timestamptz;
    v_analyze text;
    v_inventory text;
    v_stray_wait text;
    v_parts_gone text;
BEGIN
    SELECT * INTO cfg FROM orphan_cleanup._config();
    v_interval := make_interval(secs => cfg.interval_s);

    check_name := 'attached';
    SELECT * INTO att FROM orphan_cleanup.attachment;
    IF att.jobs_oid IS NULL THEN
        status := 'critical'; detail := 'not attached: run SELECT * FROM orphan_cleanup.attach();';
    ELSE
        drift := orphan_cleanup._drift(att);
        IF drift IS NULL THEN
            status := 'ok'; detail := format('jobs %s, assets %s, age column %s', att.jobs_table, att.assets_table, att.age_column);
        ELSE
            status := 'critical'; detail := drift || '; cycles and claims are stopped until attach() runs again';
        END IF;
    END IF;
    RETURN NEXT;

    check_name := 'save guard';
    IF att.jobs_oid IS NOT NULL THEN
        guard_problem := orphan_cleanup._guard_problem(att);
    END IF;
    IF att.jobs_oid IS NULL THEN
        status := 'critical'; detail := 'not installed (not attached)';
    ELSIF guard_problem IS NOT NULL THEN
        status := 'critical'; detail := guard_problem || ': claims are refused; run SELECT * FROM orphan_cleanup.attach(); to reinstall the guards';
    ELSE
        status := 'ok'; detail := 'triggers orphan_cleanup_save_guard, orphan_cleanup_job_guard and orphan_cleanup_truncate_guard present and enabled ALWAYS';
    END IF;
    RETURN NEXT;

    -- The DDL watch (an event trigger): part of the extension; the managed edition has it only
    -- where the installing role could create it, and says what that leaves to the DBA.
    check_name := 'DDL watch';
    IF EXISTS (SELECT FROM pg_catalog.pg_event_trigger AS e
               WHERE e.evtname = 'orphan_cleanup_guard_watch' AND e.evtenabled = 'A') THEN
        status := 'ok'; detail := 'event trigger orphan_cleanup_guard_watch refuses DDL that would leave the save guard off while rows are claimed';
    ELSIF pg_catalog.to_regprocedure('orphan_cleanup.managed_version()') IS NOT NULL
          AND NOT EXISTS (SELECT FROM pg_catalog.pg_event_trigger AS e WHERE e.evtname = 'orphan_cleanup_guard_watch') THEN
        status := 'ok'; detail := 'not installed (an event trigger needs a superuser here): before ALTER TABLE ... DISABLE TRIGGER, DROP TRIGGER or pg_restore --disable-triggers on the attached tables, turn reaping_enabled off and wait until no rows are claimed';
    ELSE
        status := 'warning'; detail := 'event trigger orphan_cleanup_guard_watch is missing or not enabled ALWAYS: DDL that switches the save guard off while rows are claimed is not refused; reinstall, or ALTER EVENT TRIGGER orphan_cleanup_guard_watch ENABLE ALWAYS';
    END IF;
    RETURN NEXT;

    check_name := 'allowed buckets';
    IF orphan_cleanup._no_entries(cfg.allowed_buckets) THEN
        status := 'critical'; detail := 'orphan_cleanup.allowed_buckets is empty: nothing may be deleted and cycles refuse to run';
    ELSE
        status := 'ok'; detail := format('buckets %s; prefixes %s; hosts %s', cfg.allowed_buckets,
                                         coalesce(nullif(cfg.allowed_prefixes, ''), '(whole buckets)'),
                                         coalesce(nullif(cfg.allowed_hosts, ''), '(none: bare bucket/path values only)'));
    END IF;
    RETURN NEXT;

    -- Which scheduler runs the cycles, and whether it is late: the background worker, a pg_cron
    -- job, or whoever ran the recent cycles (a reaper's --cycle-every, the DBA's own cron).
    check_name := 'scheduler';
    -- orphan_cleanup.database exists only where the library was preloaded (reading
    -- shared_preload_libraries itself needs pg_read_all_settings, which a managed platform's
    -- owner may lack).
    v_preloaded := EXISTS (SELECT FROM pg_catalog.pg_settings WHERE name = 'orphan_cleanup.database');
    SELECT count(*) INTO v_workers FROM pg_catalog.pg_stat_activity WHERE backend_type = 'pg_orphan_cleanup';
    v_cron := orphan_cleanup._cron_jobs();
    SELECT l.actor, l.started_at INTO v_actor, v_actor_at
    FROM orphan_cleanup.cycle_log AS l WHERE l.status IN ('ok', 'dry_run') ORDER BY l.id DESC LIMIT 1;
    v_late := v_actor_at IS NOT NULL AND v_actor_at < now() - 2 * v_interval - interval '1 minute';
    IF v_preloaded AND v_workers = 0 THEN
        status := 'critical'; detail := 'preloaded, but no pg_orphan_cleanup worker is running; see the server log';
    ELSIF NOT cfg.enabled THEN
        status := 'warning'; detail := 'orphan_cleanup.enabled = off: cycles are paused';
    ELSIF v_preloaded THEN
        status := 'ok'; detail := format('the background worker, in database %s, every %s', cfg.database, v_interval);
    ELSIF v_cron IS NOT NULL THEN
        status := CASE WHEN v_late THEN 'warning' ELSE 'ok' END;
        detail := v_cron || CASE WHEN v_late THEN format('; late: the last successful cycle started at %s, interval is %s (see cron.job_run_details)',
                                                        to_char(v_actor_at, 'YYYY-MM-DD HH24:MI:SS TZ'), v_interval) ELSE '' END;
    ELSIF v_actor_at IS NOT NULL AND NOT v_late THEN
        status := 'ok';
        detail := format('cycles run by %s (a reaper''s --cycle-every, or a scheduler of your own), the last at %s; interval is %s',
                         v_actor, to_char(v_actor_at, 'YYYY-MM-DD HH24:MI:SS TZ'), v_interval);
    ELSE
        status := 'warning';
        detail := format('no scheduler found: no background worker, no pg_cron job calling orphan_cleanup.run_cycle() here, and %s; '
                         'schedule one: SELECT cron.schedule(''orphan-cleanup'', ''*/5 * * * *'', ''SELECT orphan_cleanup.run_cycle()''); '
                         'or run the reaper with --cycle-every %s',
                         CASE WHEN v_actor_at IS NULL THEN 'no cycle has run yet'
                              ELSE format('the last successful cycle (by %s) started at %s, more than twice the interval (%s) ago',
                                          v_actor, to_char(v_actor_at, 'YYYY-MM-DD HH24:MI:SS TZ'), v_interval) END,
                         v_interval);
    END IF;
    RETURN NEXT;

    check_name := 'last cycle';
    SELECT * INTO last FROM orphan_cleanup.cycle_log AS l WHERE l.status <> 'skipped' ORDER BY l.id DESC LIMIT 1;
    SELECT max(l.started_at) INTO last_ok FROM orphan_cleanup.cycle_log AS l WHERE l.status IN ('ok', 'dry_run');
    IF last.id IS NULL THEN
        status := 'warning'; detail := 'no cycle has run yet';
    ELSIF last.status = 'failed' THEN
        status := 'critical'; detail := format('cycle %s failed at %s: %s', last.id, to_char(last.started_at, 'YYYY-MM-DD HH24:MI:SS TZ'), last.error);
    ELSIF last.status = 'running' AND last.started_at < now() - v_interval THEN
        status := 'warning'; detail := format('cycle %s has been running since %s', last.id, last.started_at);
    ELSIF (v_preloaded AND cfg.enabled OR NOT v_preloaded) AND last_ok < now() - 2 * v_interval - interval '1 minute' THEN
        status := CASE WHEN last_ok < now() - 4 * v_interval THEN 'critical' ELSE 'warning' END;
        detail := format('overdue: the last successful cycle started at %s, interval is %s', to_char(last_ok, 'YYYY-MM-DD HH24:MI:SS TZ'), v_interval);
    ELSE
        status := 'ok';
        detail := format('cycle %s (%s) at %s: %s found, %s enqueued', last.id, last.status,
                         to_char(last.started_at, 'YYYY-MM-DD HH24:MI:SS TZ'), last.found, last.enqueued);
    END IF;
    RETURN NEXT;

    check_name := 'circuit breaker';
    SELECT st.breaker_tripped_at, st.breaker_detail INTO ix FROM orphan_cleanup.detector_state AS st;
    IF ix.breaker_tripped_at IS NOT NULL THEN
        status := 'critical';
        detail := format('tripped at %s, cycles are stopped: %s. Look with preview() and validation_report(), then SELECT orphan_cleanup.reset_breaker(''why''); or raise the orphan_cleanup.breaker_* limits',
                         to_char(ix.breaker_tripped_at, 'YYYY-MM-DD HH24:MI:SS TZ'), ix.breaker_detail);
    ELSIF att.jobs_oid IS NULL OR drift IS NOT NULL THEN
        status := 'ok'; detail := 'not tripped';
    ELSE
        status := 'ok'; detail := 'not tripped; ' || (SELECT b.explanation FROM orphan_cleanup._breaker_limits(att) AS b);
    END IF;
    RETURN NEXT;

    -- Stray reconciliation: off, unable to read the inventory, or on (by which passes).
    check_name := 'strays';
    v_inventory := CASE WHEN cfg.reclaim_strays THEN orphan_cleanup._inventory_problem() END;
    IF cfg.reclaim_strays AND v_inventory IS NULL THEN
        v_stray_wait := coalesce('no stray is queued or handed out until then: ' || orphan_cleanup._partition_problem(),
                                 'no stray is queued or handed out while an extra reference is not in force: ' || orphan_cleanup._reference_problem());
    END IF;
    IF NOT cfg.reclaim_strays THEN
        status := 'ok'; detail := 'orphan_cleanup.reclaim_strays = off: strays are not queued (preview_strays() lists them)';
    ELSIF v_inventory IS NOT NULL THEN
        status := 'warning'; detail := 'orphan_cleanup.reclaim_strays = on, but cycles cannot reconcile strays: ' || v_inventory;
    ELSIF v_stray_wait IS NOT NULL THEN
        status := 'warning'; detail := 'orphan_cleanup.reclaim_strays = on, but ' || v_stray_wait;
    ELSIF pg_catalog.to_regclass('storage.objects') IS NULL THEN
        SELECT h.status, h.detail INTO status, detail FROM orphan_cleanup._listing_health() AS h;
    ELSIF orphan_cleanup._stray_index_ok() THEN
        status := 'ok'; detail := 'reconciled by a full pass every full_sweep_interval and, in between, by creation time';
    ELSE
        status := 'ok'; detail := 'reconciled by a full pass every full_sweep_interval only: a new stray waits for the next one. Where your role may, CREATE INDEX CONCURRENTLY objects_created_at ON storage.objects (created_at); lets every cycle find them';
    END IF;
    RETURN NEXT;

    check_name := 'reaping';
    SELECT count(*) INTO n FROM orphan_cleanup.deletion_queue WHERE state = 'claimed' AND lease_until < now();
    v_parts_gone := orphan_cleanup._partition_gone_problem();
    IF NOT cfg.reaping_enabled THEN
        status := 'warning'; detail := 'orphan_cleanup.reaping_enabled = off: claim() hands out nothing';
    ELSIF v_parts_gone IS NOT NULL THEN
        status := 'warning'; detail := 'claim() hands out nothing: ' || v_parts_gone;
    ELSIF n > 0 THEN
        status := 'warning'; detail := format('%s claimed rows are past their lease (a reaper died?); they are retried as attempts', n);
    ELSE
        status := 'ok'; detail := 'claims are handed out';
    END IF;
    RETURN NEXT;

    check_name := 'reapers';
    SELECT * INTO ix FROM orphan_cleanup._reaper_alert();
    IF ix.alert IS NOT NULL AND ix.alert_at > now() - interval '15 minutes' THEN
        status := CASE WHEN ix.alert LIKE 'storage refused%' THEN 'critical' ELSE 'warning' END;
        detail := format('%s at %s: %s', ix.alert_by, to_char(ix.alert_at, 'YYYY-MM-DD HH24:MI:SS TZ'), ix.alert);
    ELSE
        status := 'ok'; detail := 'no reaper reported trouble in the last 15 minutes';
    END IF;
    RETURN NEXT;

    check_name := 'reaper allow-lists';
    IF cov.misconfigured IS NOT NULL OR cov.unserved > 0 THEN
        status := 'warning';
        detail := concat_ws('; ',
                      CASE WHEN cov.unserved > 0 THEN format('%s ready rows are served by no reaper active in the last 15 minutes (%s)', cov.unserved, cov.unserved_what) END,
                      cov.misconfigured)
                  || '. Check each reaper''s SUPABASE_URL, --storage-hosts and --buckets against orphan_cleanup.allowed_hosts and allowed_buckets';
    ELSIF cov.active = 0 THEN
        SELECT min(q.available_at) INTO v_ready_since FROM orphan_cleanup.deletion_queue AS q
        WHERE q.state = 'pending' AND q.available_at <= now();
        IF v_ready_since < now() - interval '1 hour'
           AND NOT EXISTS (SELECT 1 FROM orphan_cleanup.reapers AS r WHERE r.last_claim_at > now() - interval '1 hour') THEN
            status := 'warning';
            detail := format('rows have been ready since %s and no reaper has claimed in the last hour: is a reaper running (reaper run, or reaper drain on a schedule)?',
                             to_char(v_ready_since, 'YYYY-MM-DD HH24:MI:SS TZ'));
        ELSE
            status := 'ok'; detail := 'no reaper has claimed in the last 15 minutes';
        END IF;
    ELSE
        status := 'ok'; detail := format('%s reapers active in the last 15 minutes; between them they serve every ready row', cov.active);
    END IF;
    RETURN NEXT;

    check_name := 'dead letters';
    SELECT count(*) INTO n FROM orphan_cleanup.deletion_queue WHERE state = 'dead';
    status := CASE WHEN n > 0 THEN 'warning' ELSE 'ok' END;
    detail := CASE WHEN n > 0 THEN format('%s rows are dead-lettered; inspect last_error in deletion_queue, then SELECT orphan_cleanup.requeue_dead();', n)
                   ELSE 'none' END;
    RETURN NEXT;

    check_name := 'rejected URLs';
    SELECT count(*) INTO n FROM orphan_cleanup.deletion_queue WHERE state = 'rejected';
    status := CASE WHEN n > 0 THEN 'warning' ELSE 'ok' END;
    detail := CASE WHEN n > 0 THEN format('%s orphans have URLs that are malformed or not allowed; their files are never deleted. See SELECT reason, count(*) FROM orphan_cleanup.deletion_queue WHERE state = ''rejected'' GROUP BY 1;', n)
                   ELSE 'none' END;
    RETURN NEXT;

    check_name := 'non-canonical references';
    n := coalesce(last.protected, 0);
    status := CASE WHEN n > 0 THEN 'warning' ELSE 'ok' END;
    detail := CASE WHEN n > 0 THEN format('the last cycle protected %s jobs referenced through a differently spelled id (case, spaces, braces) or sharing an object; the guide''s query counts them as orphans. See audit_log action ''protected''.', n)
                   ELSE 'none in the last cycle' END;
    RETURN NEXT;

    check_name := 'refused saves';
    SELECT CASE WHEN is_called THEN last_value ELSE 0 END INTO n FROM orphan_cleanup.refused_saves;
    status := CASE WHEN n > 0 THEN 'warning' ELSE 'ok' END;
    detail := CASE WHEN n > 0 THEN format('%s saves were refused because the job''s file may already be deleted; consider a larger min_age or grace', n)
                   ELSE 'none' END;
    RETURN NEXT;

    IF att.jobs_oid IS NOT NULL AND drift IS NULL THEN
        FOR ix IN SELECT * FROM orphan_cleanup._index_report(att.jobs_oid, att.assets_oid, att.age_column) LOOP
            check_name := ix.item; status := ix.status; detail := ix.detail;
            RETURN NEXT;
        END LOOP;
        -- Cycles analyze these when autovacuum is behind (_refresh_statistics); this names them
        -- meanwhile, and always where the extension may not analyze them.
        check_name := 'app table statistics';
        SELECT string_agg(format('%s: its statistics count %s rows while %s rows changed since its last ANALYZE',
                                 c.oid::regclass, greatest(c.reltuples, 0)::bigint, pg_stat_get_mod_since_analyze(c.oid)), '; '),
               string_agg(format('ANALYZE %s;', c.oid::regclass), ' ')
          INTO detail, v_analyze
          FROM pg_catalog.pg_class AS c
         WHERE c.oid IN (att.jobs_oid, att.assets_oid)
           AND orphan_cleanup._statistics_stale(c.oid, c.reltuples);
        IF detail IS NULL THEN
            status := 'ok'; detail := 'current';
        ELSE
            status := 'warning';
            detail := detail || format('. Until it is analyzed (the next cycle does it, where the extension may analyze it), claims and confirms may read the whole table; run %s', v_analyze);
        END IF;
        RETURN NEXT;
    END IF;

    check_name := 'pause points';
    IF coalesce(current_setting('orphan_cleanup.pause_points', true), '') <> '' THEN
        status := 'warning';
        detail := format('orphan_cleanup.pause_points = %L is a test hook: any session holding its advisory lock holds cycles open; ALTER SYSTEM RESET orphan_cleanup.pause_points; SELECT pg_reload_conf();',
                         current_setting('orphan_cleanup.pause_points', true));
    ELSE
        status := 'ok'; detail := 'none (test hooks off)';
    END IF;
    RETURN NEXT;

    check_name := 'standby';
    IF pg_catalog.pg_is_in_recovery() THEN
        status := 'warning'; detail := 'this server is a standby: cycles and claims run on the primary';
    ELSE
        status := 'ok'; detail := 'primary';
    END IF;
    RETURN NEXT;
END
$$;

-- One row per check, each ok / warning / critical with a reason that says what to do.
CREATE FUNCTION orphan_cleanup.health()
RETURNS TABLE (check_name text, status text, detail text)
LANGUAGE sql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp SET jit = off
AS $$ SELECT * FROM orphan_cleanup._health(orphan_cleanup._reaper_coverage()) $$;

-- What a reaper's status screen needs, in one row.
CREATE FUNCTION orphan_cleanup.queue_status()
RETURNS TABLE (pending bigint, ready bigint, claimed bigint, dead bigint, rejected bigint,
               deleted bigint, absent bigint, oldest_pending timestamptz,
               last_cycle_at timestamptz, last_cycle_status text, last_cycle_error text,
               health text, reaping_enabled boolean, attached boolean,
               reaper_alert text, reaper_alert_at timestamptz,
               reapers integer, unserved bigint, refused_by_reapers bigint, misconfigured_reapers text,
               breaker_tripped boolean, refused_saves bigint,
               reclaimed_orphan_bytes numeric, reclaimed_stray_bytes numeric)
LANGUAGE plpgsql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp SET jit = off
AS $$
BEGIN
    -- The bytes reclaimed since installation, by kind: the savings ledger (rows history_retention
    -- pruned) and the deleted rows still in the queue, read in the one pass over the queue the
    -- counts make.
    RETURN QUERY
    SELECT c.pending, c.ready, c.claimed, c.dead, c.rejected, c.deleted, c.absent, c.oldest_pending,
           l.started_at, l.status, l.error,
           (SELECT CASE WHEN bool_or(h.status = 'critical') THEN 'critical'
                        WHEN bool_or(h.status = 'warning') THEN 'warning' ELSE 'ok' END
            FROM orphan_cleanup._health(v) AS h),
           (SELECT g.reaping_enabled FROM orphan_cleanup._config() AS g),
           EXISTS (SELECT 1 FROM orphan_cleanup.attachment),
           r.alert, r.alert_at,
           v.active, v.unserved, v.refused_last_hour, v.misconfigured,
           EXISTS (SELECT 1 FROM orphan_cleanup.detector_state AS st WHERE st.breaker_tripped_at IS NOT NULL),
           (SELECT CASE WHEN s.is_called THEN s.last_value ELSE 0 END FROM orphan_cleanup.refused_saves AS s),
           c.orphan_bytes + (SELECT coalesce(sum(g.deleted_bytes), 0) FROM orphan_cleanup.savings_ledger AS g WHERE g.kind = 'orphan'),
           c.stray_bytes + (SELECT coalesce(sum(g.deleted_bytes), 0) FROM orphan_cleanup.savings_ledger AS g WHERE g.kind = 'stray')
    FROM (SELECT count(*) FILTER (WHERE q.state = 'pending') AS pending,
                 count(*) FILTER (WHERE q.state = 'pending' AND q.available_at <= now()) AS ready,
                 count(*) FILTER (WHERE q.state = 'claimed') AS claimed,
                 count(*) FILTER (WHERE q.state = 'dead') AS dead,
                 count(*) FILTER (WHERE q.state = 'rejected') AS rejected,
                 count(*) FILTER (WHERE q.state = 'deleted') AS deleted,
                 count(*) FILTER (WHERE q.state = 'absent') AS absent,
                 min(q.enqueued_at) FILTER (WHERE q.state = 'pending') AS oldest_pending,
                 coalesce(sum(q.bytes) FILTER (WHERE q.state = 'deleted' AND q.kind = 'orphan'), 0)::numeric AS orphan_bytes,
                 coalesce(sum(q.bytes) FILTER (WHERE q.state = 'deleted' AND q.kind = 'stray'), 0)::numeric AS stray_bytes
          FROM orphan_cleanup.deletion_queue AS q) AS c
    LEFT JOIN LATERAL (SELECT * FROM orphan_cleanup.cycle_log AS x WHERE x.status <> 'skipped' ORDER BY x.id DESC LIMIT 1) AS l ON true
    CROSS JOIN orphan_cleanup._reaper_alert() AS r
    -- Computed once, for these columns and for the health checks above (it reads every ready row).
    CROSS JOIN orphan_cleanup._reaper_coverage() AS v;
END
$$;
