-- A partitioned jobs table (the second review of stray queueing). Rows can leave it without any
-- row trigger firing: a TRUNCATE of one partition fires that partition's statement triggers
-- only, a DETACH PARTITION moves the rows out, a DROP TABLE of a partition removes them. The
-- files of the saved jobs among them would then be named by no job, and become strays. So:
--   - every partition carries the jobs table's TRUNCATE guard (orphan_cleanup_truncate_guard),
--     which keeps the objects of the saved jobs in the partition truncated;
--   - the partitions are recorded (job_partitions); one detached since is found by the next
--     look (every reconciliation and enqueue_strays() look first), and the objects of the saved
--     jobs in it, readable still, are kept;
--   - one dropped since cannot be read: until a DBA says so (forget_partition()), no stray is
--     queued or handed out, since its saved jobs' files cannot be told from strays.
-- Job orphans are concerned too: a saved job's row gone makes it no keeper of an object another,
-- unsaved job shares (a render cache hit). So while _partition_problem() is not NULL, claims hand
-- out nothing at all (the second review of partitions).

CREATE TABLE orphan_cleanup.job_partitions (
    relid     oid PRIMARY KEY,
    name      text NOT NULL,
    seen_at   timestamptz NOT NULL DEFAULT now()
);
SELECT pg_catalog.pg_extension_config_dump('orphan_cleanup.job_partitions', '');

-- The tables that inherit from `rel` (its partitions, or inheritance children), at every level,
-- those being detached (DETACH ... CONCURRENTLY not finished) included: pg_partition_tree()
-- leaves them out.
CREATE FUNCTION orphan_cleanup._inheritors(rel oid) RETURNS SETOF oid
LANGUAGE sql STABLE SET search_path = pg_catalog, pg_temp
BEGIN ATOMIC
    WITH RECURSIVE tree(relid) AS (
        SELECT i.inhrelid FROM pg_catalog.pg_inherits AS i WHERE i.inhparent = rel
        UNION
        SELECT i.inhrelid FROM pg_catalog.pg_inherits AS i JOIN tree AS t ON i.inhparent = t.relid)
    SELECT tree.relid FROM tree;
END;

-- The partitions of the attached jobs table (not the table itself).
CREATE FUNCTION orphan_cleanup._job_partitions(att orphan_cleanup.attachment) RETURNS SETOF oid
LANGUAGE sql STABLE SET search_path = pg_catalog, pg_temp
BEGIN ATOMIC
    SELECT orphan_cleanup._inheritors(att.jobs_oid);
END;

-- Why nothing may be handed out now because of the jobs table's partitions, or NULL: saved
-- jobs' rows out of sight (a partition dropped while recorded, one being detached, one detached
-- and not looked at yet): their objects, shared with an unsaved job, would not keep it.
CREATE FUNCTION orphan_cleanup._partition_gone_problem() RETURNS text
LANGUAGE plpgsql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    att orphan_cleanup.attachment;
    p record;
BEGIN
    SELECT * INTO att FROM orphan_cleanup.attachment;
    IF NOT FOUND THEN
        RETURN NULL;
    END IF;
    SELECT r.relid, r.name INTO p FROM orphan_cleanup.job_partitions AS r
    WHERE NOT EXISTS (SELECT 1 FROM pg_catalog.pg_class AS c WHERE c.oid = r.relid) LIMIT 1;
    IF FOUND THEN
        RETURN format('partition %s (oid %s) of the jobs table was dropped: the files of the saved jobs it held can no longer be told from strays (list the saves whose jobs are gone: SELECT * FROM %s AS a WHERE NOT EXISTS (SELECT 1 FROM %s AS j WHERE j.id::text = orphan_cleanup.job_ref_key(a.metadata ->> ''render_job_id'')); keep their files with cancel(), then SELECT orphan_cleanup.forget_partition(%s))',
                      p.name, p.relid, att.assets_oid::regclass, att.jobs_oid::regclass, p.relid);
    END IF;
    SELECT i.inhrelid::regclass::text AS name INTO p FROM pg_catalog.pg_inherits AS i
    WHERE i.inhrelid IN (SELECT orphan_cleanup._job_partitions(att)) AND i.inhdetachpending LIMIT 1;
    IF FOUND THEN
        RETURN format('partition %s of the jobs table is being detached (a DETACH PARTITION ... CONCURRENTLY that did not finish: its rows are hidden from the jobs table); finish it: ALTER TABLE %s DETACH PARTITION %s FINALIZE',
                      p.name, att.jobs_oid::regclass, p.name);
    END IF;
    IF EXISTS (SELECT 1 FROM orphan_cleanup.job_partitions AS r
               WHERE r.relid NOT IN (SELECT orphan_cleanup._job_partitions(att))) THEN
        RETURN 'a partition left the jobs table since the last look (DETACH PARTITION): the next cycle, or any DDL, looks at it and keeps the files of its saved jobs';
    END IF;
    -- Joined and not looked at (or its look failed: a saved job it brought in names a handed-out
    -- object, or a URL that cannot be read): such a saved job keeps nothing yet.
    -- A foreign partition: its rows are written, deleted and truncated on another server, past
    -- every guard, and postgres_fdw reads them in one snapshot per local transaction, older than
    -- a claim's locks, so its re-check cannot see a save that committed meanwhile (the sixth
    -- review of partitions).
    SELECT c.oid::regclass::text AS name INTO p FROM pg_catalog.pg_class AS c
    WHERE c.oid IN (SELECT orphan_cleanup._job_partitions(att)) AND c.relkind = 'f' LIMIT 1;
    IF FOUND THEN
        RETURN format('partition %s of the jobs table is a foreign table: its rows change on another server, past every guard, and are read in a snapshot older than a claim''s locks; nothing is handed out while it is a partition (detach it: ALTER TABLE %s DETACH PARTITION %s)',
                      p.name, att.jobs_oid::regclass, p.name);
    END IF;
    SELECT pt.relid::regclass::text AS name INTO p FROM orphan_cleanup._job_partitions(att) AS pt(relid)
    WHERE pt.relid NOT IN (SELECT r.relid FROM orphan_cleanup.job_partitions AS r) LIMIT 1;
    IF FOUND THEN
        RETURN format('partition %s joined the jobs table and has not been looked at yet (the next cycle does; if it keeps saying this, SELECT * FROM orphan_cleanup.run_cycle() shows why in a warning)', p.name);
    END IF;
    -- The assets table's partitions (below): one that joined with assets saved their jobs past
    -- the save guard until a look has saved them again; a foreign one is written past it.
    SELECT c.oid::regclass::text AS name, c.relkind INTO p
    FROM orphan_cleanup._inheritors(att.assets_oid) AS pt(relid) JOIN pg_catalog.pg_class AS c ON c.oid = pt.relid
    WHERE c.relkind = 'f' OR pt.relid NOT IN (SELECT x.relid FROM orphan_cleanup.asset_partitions AS x) LIMIT 1;
    IF FOUND THEN
        RETURN CASE WHEN p.relkind = 'f'
                    THEN format('partition %s of the assets table is a foreign table: its assets are written on another server, past the save guard; nothing is handed out while it is a partition', p.name)
                    ELSE format('partition %s joined the assets table and has not been looked at yet (the next cycle does; if it keeps saying this, SELECT * FROM orphan_cleanup.run_cycle() shows why in a warning)', p.name) END;
    END IF;
    RETURN NULL;
END
$$;

-- Why strays cannot be judged now because of the jobs table's partitions, or NULL: what stops
-- every claim (_partition_gone_problem(), a foreign partition among it), or a partition without
-- its TRUNCATE guard (the next cycle, or the DDL watch, adds it).
CREATE FUNCTION orphan_cleanup._partition_problem() RETURNS text
LANGUAGE plpgsql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    att orphan_cleanup.attachment;
    v text;
BEGIN
    v := orphan_cleanup._partition_gone_problem();
    IF v IS NOT NULL THEN
        RETURN v;
    END IF;
    SELECT * INTO att FROM orphan_cleanup.attachment;
    IF NOT FOUND THEN
        RETURN NULL;
    END IF;
    IF EXISTS (SELECT 1 FROM orphan_cleanup._job_partitions(att) AS pt(relid)
                  WHERE pt.relid NOT IN (SELECT r.relid FROM orphan_cleanup.job_partitions AS r)
                     OR NOT EXISTS (SELECT 1 FROM pg_catalog.pg_trigger AS t
                                    WHERE t.tgrelid = pt.relid AND t.tgname = 'orphan_cleanup_truncate_guard'
                                      AND t.tgfoid = 'orphan_cleanup.job_truncate_guard()'::regprocedure
                                      AND t.tgenabled = 'A')) THEN
        RETURN 'a partition of the jobs table has no TRUNCATE guard (or it is not enabled ALWAYS): the next cycle, or any DDL, adds it';
    END IF;
    RETURN NULL;
END
$$;

-- Looks at the jobs table's partitions, before strays are queued: a partition detached since
-- the last look has the objects of its saved jobs kept; a new one gets the TRUNCATE guard and is
-- recorded, once its saved jobs pass job_guard's checks (check_saved; attach() and the update
-- check the whole table their own way). Returns _partition_problem() after it (a dropped
-- partition stays a problem).
-- in_ddl: called by the DDL watch, in the transaction that attached or created the partition.
-- Until it commits, no other session sees the partition's jobs: a save of one finds no job row
-- to hold, and a claim sees no job naming its object. Each job's fence row is written first, as
-- an INSERT of the job writes it (sql/guard.sql): a save in flight is waited for (and then seen
-- by the checks below), and a later one waits for this commit, then sees the job (or, with an
-- older snapshot, fails to serialize) (the fifth review of partitions).
CREATE FUNCTION orphan_cleanup._look_at_partitions(att orphan_cleanup.attachment, check_saved boolean DEFAULT true,
                                                   in_ddl boolean DEFAULT false) RETURNS text
LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp SET jit = off
AS $$
DECLARE
    p record;
    r record;
    rel oid;
    v_marked boolean;
BEGIN
    -- An unpartitioned jobs table, nothing recorded (the default): nothing to look at, every
    -- cycle (what follows would find no partition and no problem).
    IF NOT EXISTS (SELECT 1 FROM orphan_cleanup.job_partitions)
       AND NOT EXISTS (SELECT 1 FROM pg_catalog.pg_inherits AS i WHERE i.inhparent = att.jobs_oid) THEN
        RETURN NULL;
    END IF;
    -- Detached: still a table, no longer in the tree. Its saved jobs' objects are kept, read in a
    -- snapshot that sees every save committed before the detach (READ COMMITTED only: an older
    -- snapshot would miss a save committed meanwhile, the second review of partitions).
    FOR p IN SELECT x.relid, x.name FROM orphan_cleanup.job_partitions AS x
             WHERE EXISTS (SELECT 1 FROM pg_catalog.pg_class AS c WHERE c.oid = x.relid)
               AND x.relid NOT IN (SELECT orphan_cleanup._job_partitions(att)) LOOP
        IF current_setting('transaction_isolation') <> 'read committed' THEN
            RAISE EXCEPTION 'partition % left the jobs table %: the files of its saved jobs are kept in a READ COMMITTED transaction only, not %',
                            p.name, att.jobs_oid::regclass, current_setting('transaction_isolation')
                USING ERRCODE = 'invalid_transaction_state',
                      HINT = 'Run the DETACH PARTITION (or this call) in its own READ COMMITTED transaction.';
        END IF;
        FOR r IN EXECUTE format($sql$
            SELECT j.id, j.output_url FROM %s AS j
            WHERE j.output_url IS NOT NULL
              AND EXISTS (SELECT 1 FROM %s AS a WHERE orphan_cleanup.job_ref_key(a.metadata ->> 'render_job_id') = j.id::text)
            $sql$, p.relid::regclass, att.assets_oid::regclass)
        LOOP
            PERFORM orphan_cleanup._keep_saved(r.id, r.output_url, format('detached from the jobs table in partition %s', p.name));
        END LOOP;
        DELETE FROM orphan_cleanup.job_partitions AS x WHERE x.relid = p.relid;
    END LOOP;
    -- New: guarded and recorded.
    v_marked := orphan_cleanup._guards_changing();
    FOR rel IN SELECT pt.relid FROM orphan_cleanup._job_partitions(att) AS pt(relid)
               JOIN pg_catalog.pg_class AS c ON c.oid = pt.relid WHERE c.relkind <> 'f' LOOP
        -- A partition attached with saved jobs in it brought them in past job_guard: they must
        -- pass what it checks (a URL read in full; no object already handed out).
        IF check_saved AND NOT EXISTS (SELECT 1 FROM orphan_cleanup.job_partitions AS x WHERE x.relid = rel) THEN
            -- Its saved objects are held, and a hand-out after an older snapshot would not be
            -- seen: READ COMMITTED only, as for a detach.
            IF current_setting('transaction_isolation') <> 'read committed' THEN
                RAISE EXCEPTION 'partition % joined the jobs table %: its saved jobs are checked in a READ COMMITTED transaction only, not %',
                                rel::regclass, att.jobs_oid::regclass, current_setting('transaction_isolation')
                    USING ERRCODE = 'invalid_transaction_state',
                          HINT = 'Run the ATTACH PARTITION or CREATE TABLE ... PARTITION OF in its own READ COMMITTED transaction.';
            END IF;
            IF in_ddl THEN
                EXECUTE format($sql$
                    INSERT INTO orphan_cleanup.job_fences AS f (job_id, touched_at)
                    SELECT DISTINCT j.id, clock_timestamp() FROM %s AS j WHERE j.id IS NOT NULL
                    ON CONFLICT (job_id) DO UPDATE SET touched_at = clock_timestamp()$sql$, rel::regclass);
            END IF;
            PERFORM orphan_cleanup._refuse_unread_saved(rel, att.assets_oid, format('a look at partition %s', rel::regclass));
            PERFORM orphan_cleanup._refuse_handed_out_saved(rel, att.assets_oid);
        END IF;
        IF NOT EXISTS (SELECT 1 FROM pg_catalog.pg_trigger AS t WHERE t.tgrelid = rel AND t.tgname = 'orphan_cleanup_truncate_guard') THEN
            EXECUTE format('CREATE TRIGGER orphan_cleanup_truncate_guard BEFORE TRUNCATE ON %s FOR EACH STATEMENT EXECUTE FUNCTION orphan_cleanup.job_truncate_guard()', rel::regclass);
        END IF;
        IF NOT EXISTS (SELECT 1 FROM pg_catalog.pg_trigger AS t WHERE t.tgrelid = rel AND t.tgname = 'orphan_cleanup_truncate_guard' AND t.tgenabled = 'A') THEN
            EXECUTE format('ALTER TABLE %s ENABLE ALWAYS TRIGGER orphan_cleanup_truncate_guard', rel::regclass);
        END IF;
        INSERT INTO orphan_cleanup.job_partitions (relid, name) VALUES (rel, rel::regclass::text)
        ON CONFLICT (relid) DO NOTHING;
    END LOOP;
    PERFORM orphan_cleanup._guards_changed(v_marked);
    RETURN orphan_cleanup._partition_problem();
END
$$;

-- A DBA's word that a dropped partition of the jobs table was dealt with (the files of its saved
-- jobs kept with cancel(), or let go): strays are judged again. Audited.
CREATE FUNCTION orphan_cleanup.forget_partition(relid oid) RETURNS text
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_name text;
BEGIN
    DELETE FROM orphan_cleanup.job_partitions AS x
    WHERE x.relid = forget_partition.relid AND NOT EXISTS (SELECT 1 FROM pg_catalog.pg_class AS c WHERE c.oid = x.relid)
    RETURNING x.name INTO v_name;
    IF v_name IS NULL THEN
        RAISE EXCEPTION 'no dropped partition with oid % is recorded', coalesce(relid::text, 'NULL')
            USING ERRCODE = 'undefined_object',
                  HINT = 'SELECT * FROM orphan_cleanup.job_partitions lists the recorded partitions.';
    END IF;
    INSERT INTO orphan_cleanup.audit_log (action, actor, detail)
    VALUES ('setting_changed', session_user, format('dropped partition %s (oid %s) of the jobs table forgotten', v_name, relid));
    RETURN format('forgotten: %s; strays are judged again', v_name);
END
$$;

-- Refuses (OC002) while a saved job in `rel` names an object already handed out to a reaper (the
-- file may be deleted): what job_guard refuses for a row written into the jobs table, for rows
-- that came in with an attached partition.
CREATE FUNCTION orphan_cleanup._refuse_handed_out_saved(rel oid, assets oid) RETURNS void
LANGUAGE plpgsql VOLATILE SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_job uuid;
    v_key text;
    r record;
    ob orphan_cleanup.objects;
BEGIN
    -- Each object held (in sorted order, as saves hold them): a claim in flight of one of them
    -- finishes first, and its hand-out is then seen (the third review of partitions).
    FOR r IN EXECUTE format($sql$
        SELECT DISTINCT k.bucket, k.object_path, min(j.id::text) OVER (PARTITION BY k.bucket, k.object_path) AS job
        FROM %s AS j
        CROSS JOIN LATERAL orphan_cleanup._objects_of(j.output_url) AS k
        WHERE j.output_url IS NOT NULL
          AND EXISTS (SELECT 1 FROM %s AS a WHERE orphan_cleanup.job_ref_key(a.metadata ->> 'render_job_id') = j.id::text)
        ORDER BY 1, 2$sql$, rel::regclass, assets::regclass)
    LOOP
        ob := orphan_cleanup._hold_object(r.bucket, r.object_path);
        IF ob.handouts > 0 THEN
            v_job := r.job::uuid;
            v_key := r.bucket || '/' || r.object_path;
            EXIT;
        END IF;
    END LOOP;
    IF v_job IS NOT NULL THEN
        RAISE EXCEPTION 'partition % holds saved render job %, which names %: that object was handed to a reaper and may already be deleted from storage', rel::regclass, v_job, v_key
            USING ERRCODE = 'OC002',
                  HINT = 'Render that job again to a new object path (or remove the save); a partition that joined the jobs table with it stops strays until then.';
    END IF;
END
$$;

-- A partitioned assets table. A table attached as a partition (ATTACH PARTITION) brings its
-- assets in without the save guard firing: the jobs they reference are saved from then on, yet
-- no save held their objects, and until the ATTACH commits no claim can see them (the sixth
-- review of partitions). So each partition that joined is looked at as a save of every job its
-- assets reference (_save_job(): the fence row, the objects held, OC001 if one was handed out, the
-- queue rows rescued), by the DDL watch in the ATTACH's own transaction, or by the next cycle
-- where none runs; until then, and while a foreign table is a partition, nothing is handed out.
CREATE TABLE orphan_cleanup.asset_partitions (
    relid     oid PRIMARY KEY,
    name      text NOT NULL,
    seen_at   timestamptz NOT NULL DEFAULT now()
);
SELECT pg_catalog.pg_extension_config_dump('orphan_cleanup.asset_partitions', '');

-- Looks at the assets table's partitions not looked at yet: each job their assets reference is
-- saved as save_guard() saves it (check_saves; attach() on a table it did not guard before, and
-- the update, take the assets as they are, as they do for an unpartitioned table), then the
-- partitions are recorded. The jobs of all new partitions are saved in one pass, in id order,
-- reading each table's own rows once (a partitioned one holds none). One save per job: an
-- ATTACH of a large historical partition takes as long as that many saves, holding what they
-- hold until it commits (README, Known limitations). Records of partitions that left are
-- dropped, and the next cycle sweeps every job again: assets leaving the table (a DETACH, a
-- DROP) may have made orphans (the seventh review).
CREATE FUNCTION orphan_cleanup._look_at_asset_partitions(att orphan_cleanup.attachment, check_saves boolean DEFAULT true) RETURNS void
LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp SET jit = off
AS $$
DECLARE
    v_new oid[];
    v_read text;
    v_job uuid;
BEGIN
    IF NOT EXISTS (SELECT 1 FROM orphan_cleanup.asset_partitions)
       AND NOT EXISTS (SELECT 1 FROM pg_catalog.pg_inherits AS i WHERE i.inhparent = att.assets_oid) THEN
        RETURN;
    END IF;
    DELETE FROM orphan_cleanup.asset_partitions AS x
    WHERE x.relid NOT IN (SELECT orphan_cleanup._inheritors(att.assets_oid));
    IF FOUND THEN
        UPDATE orphan_cleanup.detector_state SET sweep_started_at = NULL;
    END IF;
    v_new := ARRAY(SELECT pt.relid FROM orphan_cleanup._inheritors(att.assets_oid) AS pt(relid)
                   JOIN pg_catalog.pg_class AS c ON c.oid = pt.relid AND c.relkind <> 'f'
                   WHERE pt.relid NOT IN (SELECT x.relid FROM orphan_cleanup.asset_partitions AS x)
                   ORDER BY 1);
    IF cardinality(v_new) = 0 THEN
        RETURN;
    END IF;
    IF check_saves THEN
        -- An older snapshot would miss assets committed into them meanwhile.
        IF current_setting('transaction_isolation') <> 'read committed' THEN
            RAISE EXCEPTION 'partition % joined the assets table %: its assets are checked in a READ COMMITTED transaction only, not %',
                            v_new[1]::regclass, att.assets_oid::regclass, current_setting('transaction_isolation')
                USING ERRCODE = 'invalid_transaction_state',
                      HINT = 'Run the ATTACH PARTITION or CREATE TABLE ... PARTITION OF (or the cycle) in its own READ COMMITTED transaction.';
        END IF;
        SELECT string_agg(format('SELECT orphan_cleanup.job_ref_key(a.metadata ->> ''render_job_id'') AS ref FROM ONLY %s AS a', c.oid::regclass), ' UNION ALL ')
          INTO v_read
        FROM unnest(v_new) AS n(relid) JOIN pg_catalog.pg_class AS c ON c.oid = n.relid AND c.relkind = 'r';
        IF v_read IS NOT NULL THEN
            FOR v_job IN EXECUTE format('SELECT DISTINCT r.ref::uuid FROM (%s) AS r WHERE r.ref IS NOT NULL ORDER BY 1', v_read) LOOP
                PERFORM orphan_cleanup._save_job(att, v_job);
            END LOOP;
        END IF;
    END IF;
    INSERT INTO orphan_cleanup.asset_partitions (relid, name)
    SELECT n.relid, n.relid::regclass::text FROM unnest(v_new) AS n(relid)
    ON CONFLICT (relid) DO NOTHING;
END
$$;
