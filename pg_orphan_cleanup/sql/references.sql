-- Extra references (issue 15): columns of other tables that name objects, for apps that keep
-- thumbnails, copies or attachments outside the jobs table. An object one of them names is never
-- a stray. Each is a column of a table, or a JSON path inside a json/jsonb column; its values
-- are read as the jobs table's output_url is (object_keys(): a URL wrapped in JSON, a proxy's
-- query, a bare `bucket/key`, a bucket-relative path; at a JSON path, a string). An object one
-- names is not handed out as a job orphan's either (the review of extra references: a thumbnail
-- row pointing at a job's file keeps that file).
--
-- The same protocol as the jobs table's (sql/guard.sql): a write naming objects holds their
-- rows (orphan_cleanup.objects, FOR SHARE), so a claim of one of them and the write are ordered;
-- a claim re-checks every reference in its own snapshot after its locks; and a write naming an
-- object already handed out is refused (OC002), since the file may already be deleted. A claim
-- takes each reference table in ROW EXCLUSIVE mode without waiting (a transaction changing its
-- triggers holds a lock that conflicts) and a shared hold on the set of references, which
-- add_reference() takes exclusively; the guard watcher refuses DDL that leaves a reference not in
-- force while reapers hold claims.

CREATE TABLE orphan_cleanup.extra_references (
    table_oid   oid NOT NULL,
    column_name name NOT NULL,
    -- A path inside a json/jsonb column ('{}': the whole value).
    json_path   text[] NOT NULL DEFAULT '{}',
    -- The GIN index on the value's object_keys() every lookup goes through.
    index_oid   oid NOT NULL,
    added_at    timestamptz NOT NULL DEFAULT now(),
    added_by    text NOT NULL DEFAULT current_user,
    PRIMARY KEY (table_oid, column_name, json_path)
);
SELECT pg_catalog.pg_extension_config_dump('orphan_cleanup.extra_references', '');

-- The partitions of reference tables whose rows were looked at: a table attached as a partition
-- (ATTACH PARTITION) brings its rows in without the guard trigger firing, so each new partition
-- has its rows checked as the guard checks a row written (and the objects they name held) by the
-- DDL watch, or by the next cycle where none runs; until then it is not in force (the fifth
-- review of partitions).
CREATE TABLE orphan_cleanup.reference_partitions (
    relid     oid PRIMARY KEY,
    name      text NOT NULL,
    seen_at   timestamptz NOT NULL DEFAULT now()
);
SELECT pg_catalog.pg_extension_config_dump('orphan_cleanup.reference_partitions', '');

-- The partitions (at every level) of the reference tables, each with a reference table it is in.
CREATE FUNCTION orphan_cleanup._reference_partitions() RETURNS TABLE (relid oid, root oid)
LANGUAGE sql STABLE SET search_path = pg_catalog, pg_temp
BEGIN ATOMIC
    SELECT DISTINCT pt.relid, r.table_oid
    FROM orphan_cleanup.extra_references AS r
    JOIN pg_catalog.pg_class AS c ON c.oid = r.table_oid
    CROSS JOIN LATERAL pg_catalog.pg_partition_tree(r.table_oid) AS pt
    WHERE pt.relid <> r.table_oid;
END;

-- The value a reference reads, as SQL over alias `x`: the column, or the text at its JSON path.
CREATE FUNCTION orphan_cleanup._reference_value(col name, json_path text[], is_text boolean, x text) RETURNS text
LANGUAGE sql IMMUTABLE SET search_path = pg_catalog, pg_temp
RETURN CASE
    WHEN cardinality(json_path) > 0 THEN format('%s.%I #>> %L::text[]', x, col, json_path)
    WHEN is_text THEN format('%s.%I', x, col)
    ELSE format('%s.%I::text', x, col) END;

-- The references, each with how to read it; `problem` says why one cannot be relied on (its
-- table, column, index or guard trigger gone or changed).
CREATE FUNCTION orphan_cleanup._reference_list()
RETURNS TABLE (table_oid oid, column_name name, json_path text[], label text, value_sql text, problem text)
LANGUAGE plpgsql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    r orphan_cleanup.extra_references;
    v_type text;
    t record;
BEGIN
    FOR r IN SELECT * FROM orphan_cleanup.extra_references ORDER BY table_oid, column_name, json_path LOOP
        table_oid := r.table_oid;
        column_name := r.column_name;
        json_path := r.json_path;
        problem := NULL;
        value_sql := NULL;
        IF NOT EXISTS (SELECT 1 FROM pg_catalog.pg_class AS c WHERE c.oid = r.table_oid) THEN
            label := format('a dropped table (oid %s).%s', r.table_oid, r.column_name);
            problem := format('%s: the table is gone (fix: SELECT orphan_cleanup.remove_reference(%s, %L))',
                              label, r.table_oid, r.column_name);
            RETURN NEXT;
            CONTINUE;
        END IF;
        label := format('%s.%I', r.table_oid::regclass, r.column_name)
                 || CASE WHEN cardinality(r.json_path) > 0 THEN format(' #>> %L', r.json_path) ELSE '' END;
        SELECT pg_catalog.format_type(a.atttypid, NULL) INTO v_type FROM pg_catalog.pg_attribute AS a
        WHERE a.attrelid = r.table_oid AND a.attname = r.column_name AND a.attnum > 0 AND NOT a.attisdropped;
        IF v_type IS NULL THEN
            problem := format('%s: the column is gone', label);
        ELSIF NOT orphan_cleanup._reference_type_ok(v_type, r.json_path) THEN
            problem := format('%s: the column is %s now', label, v_type);
        ELSE
            value_sql := orphan_cleanup._reference_value(r.column_name, r.json_path, v_type = 'text', 'x');
            IF NOT EXISTS (SELECT 1 FROM pg_catalog.pg_index AS i
                           WHERE i.indexrelid = r.index_oid AND i.indrelid = r.table_oid
                             AND i.indisvalid AND i.indisready AND i.indislive) THEN
                problem := format('%s: its index on orphan_cleanup.object_keys() is gone or not valid (fix: %s, then SELECT orphan_cleanup.add_reference(%L, %L%s))',
                                  label, orphan_cleanup._reference_index_statement(r.table_oid, r.column_name, r.json_path, v_type = 'text'),
                                  r.table_oid::regclass::text, r.column_name,
                                  CASE WHEN cardinality(r.json_path) > 0 THEN format(', %L', array_to_string(r.json_path, '.')) ELSE '' END);
            ELSE
                problem := orphan_cleanup._reference_table_problem(r.table_oid, label, r.column_name);
            END IF;
        END IF;
        RETURN NEXT;
    END LOOP;
END
$$;

-- Why the guard of reference table `rel` is not in force, or NULL: its trigger missing,
-- changed (a WHEN clause, a column list) or not enabled ALWAYS on the table or on any of its
-- partitions (a row trigger fires through each partition's clone); inheritance children, which
-- no trigger of the parent covers; or row-level security applying to the role these functions
-- run as (it would not see every row).
CREATE FUNCTION orphan_cleanup._reference_table_problem(rel oid, label text, col name) RETURNS text
LANGUAGE plpgsql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    part oid;
    t record;
BEGIN
    IF EXISTS (SELECT 1 FROM pg_catalog.pg_inherits AS i JOIN pg_catalog.pg_class AS c ON c.oid = i.inhrelid
               WHERE i.inhparent = rel AND NOT c.relispartition) THEN
        RETURN format('%s: %s has inheritance children, which its guard trigger does not cover (use a partitioned table, or reference each child)', label, rel::regclass);
    END IF;
    FOR part IN SELECT rel UNION SELECT pt.relid FROM pg_catalog.pg_partition_tree(rel) AS pt LOOP
        SELECT tg.tgenabled, tg.tgfoid, tg.tgtype, tg.tgqual IS NOT NULL AS has_when, tg.tgattr::text AS cols INTO t
        FROM pg_catalog.pg_trigger AS tg
        WHERE tg.tgrelid = part AND tg.tgname = 'orphan_cleanup_reference_guard';
        IF NOT FOUND OR t.tgfoid <> 'orphan_cleanup.reference_guard()'::regprocedure OR t.tgtype <> 21 OR t.has_when OR t.cols <> '' THEN
            RETURN format('%s: the guard trigger orphan_cleanup_reference_guard on %s is missing or changed (it must be AFTER INSERT OR UPDATE ... FOR EACH ROW EXECUTE FUNCTION orphan_cleanup.reference_guard(), with no WHEN clause or column list; fix: SELECT orphan_cleanup.add_reference(%L, %L, ...) again)',
                          label, part::regclass, rel::regclass::text, col);
        ELSIF t.tgenabled <> 'A' THEN
            RETURN format('%s: the guard trigger orphan_cleanup_reference_guard on %s is not enabled ALWAYS (ALTER TABLE %s ENABLE ALWAYS TRIGGER orphan_cleanup_reference_guard)',
                          label, part::regclass, part::regclass);
        END IF;
    END LOOP;
    IF pg_catalog.row_security_active(rel) THEN
        RETURN format('%s: row-level security on %s applies to %s, the role pg_orphan_cleanup''s functions run as: it would not see every row (fix, as a superuser: ALTER ROLE %I BYPASSRLS)',
                      label, rel::regclass, current_user, current_user);
    END IF;
    RETURN NULL;
END
$$;

-- Whether a column of type `col_type` can be read as a reference with `json_path`: text or
-- varchar as a whole, json or jsonb at a path only (bare keys inside a document or an array are
-- not read as objects: the whole document would protect nothing, silently).
CREATE FUNCTION orphan_cleanup._reference_type_ok(col_type text, json_path text[]) RETURNS boolean
LANGUAGE sql IMMUTABLE SET search_path = pg_catalog, pg_temp
RETURN CASE WHEN cardinality(json_path) > 0 THEN col_type IN ('jsonb', 'json')
            ELSE col_type IN ('text', 'character varying') END;

-- The statement that creates the index a reference needs.
CREATE FUNCTION orphan_cleanup._reference_index_statement(rel oid, col name, json_path text[], is_text boolean) RETURNS text
LANGUAGE sql STABLE SET search_path = pg_catalog, pg_temp
RETURN format('CREATE INDEX CONCURRENTLY %I ON %s USING gin (orphan_cleanup.object_keys(%s)) WITH (fastupdate = off);',
              left((SELECT c.relname FROM pg_catalog.pg_class AS c WHERE c.oid = rel) || '_' || col || '_object_keys_idx', 63),
              rel::regclass,
              CASE WHEN cardinality(json_path) > 0 THEN format('%I #>> %L::text[]', col, json_path)
                   WHEN is_text THEN quote_ident(col) ELSE format('%I::text', col) END);

-- Why strays cannot be judged now because of a reference, or NULL: while one is not in force,
-- cycles queue no stray and claims hand none out (they wait).
CREATE FUNCTION orphan_cleanup._reference_problem() RETURNS text
LANGUAGE sql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp
BEGIN ATOMIC
    SELECT string_agg(p.problem, '; ')
    FROM (SELECT l.problem FROM orphan_cleanup._reference_list() AS l WHERE l.problem IS NOT NULL
          UNION ALL
          (SELECT format('partition %s of reference table %s joined it and has not been looked at yet (the next cycle does; if it keeps saying this, SELECT * FROM orphan_cleanup.run_cycle() shows why in a warning)',
                         rp.relid::regclass, rp.root::regclass)
           FROM orphan_cleanup._reference_partitions() AS rp
           WHERE rp.relid NOT IN (SELECT x.relid FROM orphan_cleanup.reference_partitions AS x)
           LIMIT 1)) AS p;
END;

-- Looks at the reference tables' partitions not looked at yet: their rows were not written
-- through the guard (a table attached as a partition), so each value is checked as the guard
-- checks it (readable, a string at a JSON path; OC003), and each object it names is held and
-- refused if it was handed out (OC002). Held, the objects are not handed out by a claim until
-- this transaction ends, and then the claim sees the rows. Then the partition is recorded.
-- Records of partitions that left are dropped (rows leaving a reference table name nothing).
CREATE FUNCTION orphan_cleanup._look_at_reference_partitions() RETURNS void
LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp SET jit = off
AS $$
DECLARE
    part oid;
    l record;
    o record;
    ob orphan_cleanup.objects;
    v_bad text;
BEGIN
    IF NOT EXISTS (SELECT 1 FROM orphan_cleanup.extra_references)
       AND NOT EXISTS (SELECT 1 FROM orphan_cleanup.reference_partitions) THEN
        RETURN;
    END IF;
    DELETE FROM orphan_cleanup.reference_partitions AS x
    WHERE x.relid NOT IN (SELECT rp.relid FROM orphan_cleanup._reference_partitions() AS rp);
    FOR part IN SELECT DISTINCT rp.relid FROM orphan_cleanup._reference_partitions() AS rp
                WHERE rp.relid NOT IN (SELECT x.relid FROM orphan_cleanup.reference_partitions AS x)
                ORDER BY 1 LOOP
        -- An older snapshot would miss rows committed into it meanwhile (the sixth review).
        IF current_setting('transaction_isolation') <> 'read committed' THEN
            RAISE EXCEPTION 'partition % joined a reference table: its rows are checked in a READ COMMITTED transaction only, not %',
                            part::regclass, current_setting('transaction_isolation')
                USING ERRCODE = 'invalid_transaction_state',
                      HINT = 'Run the ATTACH PARTITION or CREATE TABLE ... PARTITION OF (or the cycle) in its own READ COMMITTED transaction.';
        END IF;
        FOR l IN SELECT * FROM orphan_cleanup._reference_list() AS rl
                 WHERE rl.value_sql IS NOT NULL
                   AND rl.table_oid IN (SELECT rp.root FROM orphan_cleanup._reference_partitions() AS rp WHERE rp.relid = part) LOOP
            IF cardinality(l.json_path) > 0 THEN
                EXECUTE format('SELECT x.%I::text FROM %s AS x WHERE jsonb_typeof(x.%I::jsonb #> %L::text[]) NOT IN (''string'', ''null'') LIMIT 1',
                               l.column_name, part::regclass, l.column_name, l.json_path) INTO v_bad;
            END IF;
            IF v_bad IS NULL THEN
                EXECUTE format('SELECT x.v FROM (SELECT %s AS v FROM %s AS x) AS x WHERE orphan_cleanup._unread_url(x.v) IS NOT NULL LIMIT 1',
                               l.value_sql, part::regclass) INTO v_bad;
            END IF;
            IF v_bad IS NOT NULL THEN
                RAISE EXCEPTION 'partition % of a reference table holds a value in % that cannot be read as naming storage objects: %', part::regclass, l.label, left(v_bad, 300)
                    USING ERRCODE = 'OC003',
                          HINT = 'Fix the rows (one URL or path per value; a string at a JSON path), or remove the reference; until then strays and claims wait.';
            END IF;
            FOR o IN EXECUTE format('SELECT DISTINCT k.bucket, k.object_path FROM %s AS x CROSS JOIN LATERAL orphan_cleanup._objects_of(%s) AS k ORDER BY 1, 2',
                                    part::regclass, l.value_sql) LOOP
                ob := orphan_cleanup._hold_object(o.bucket, o.object_path);
                IF ob.handouts > 0 THEN
                    RAISE EXCEPTION 'partition % of a reference table holds a row naming %/% in %: that object was handed to a reaper and may already be deleted from storage',
                                    part::regclass, ob.bucket, ob.object_path, l.label
                        USING ERRCODE = 'OC002',
                              DETAIL = format('Object %s/%s was handed out %s time(s), last by %s at %s (deletion queue row %s).',
                                              ob.bucket, ob.object_path, ob.handouts, ob.last_handed_to, ob.last_handed_out_at, ob.last_queue_id),
                              HINT = 'Upload the file again under a new name and reference that, or remove the row; until then strays and claims wait.';
                END IF;
            END LOOP;
        END LOOP;
        INSERT INTO orphan_cleanup.reference_partitions (relid, name) VALUES (part, part::regclass::text)
        ON CONFLICT (relid) DO NOTHING;
    END LOOP;
END
$$;

-- SQL over `key_sql` (an object as `bucket/name`): the label of the first reference naming that
-- object, or NULL. NULL::text when there are no references.
CREATE FUNCTION orphan_cleanup._referenced_by_sql(key_sql text) RETURNS text
LANGUAGE plpgsql STABLE SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v text;
BEGIN
    SELECT string_agg(format('WHEN EXISTS (SELECT 1 FROM %s AS x WHERE orphan_cleanup.object_keys(%s) && orphan_cleanup._names_of(%s)) THEN %L',
                             l.table_oid::regclass, l.value_sql, key_sql, l.label), ' ')
      INTO v
    FROM orphan_cleanup._reference_list() AS l WHERE l.problem IS NULL;
    RETURN coalesce('CASE ' || v || ' END', 'NULL::text');
END
$$;

-- The guard on a reference table: a row written naming objects (INSERT, or an UPDATE) holds
-- their rows, so that a claim and this write are ordered; naming an object already handed out
-- is refused, since the file may already be deleted. A value whose objects cannot all be read
-- is refused too (OC003), as in the jobs table.
CREATE FUNCTION orphan_cleanup.reference_guard() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp SET jit = off
AS $$
DECLARE
    r record;
    v_new text;
    v_old text;
    v_unread text;
    v_type text;
    o record;
    ob orphan_cleanup.objects;
BEGIN
    -- A partition's row fires the clone of its ancestors' triggers: the references are the
    -- table's own and its ancestors' (a reference may name a partition, or a partitioned table).
    FOR r IN SELECT * FROM orphan_cleanup._reference_list() AS l
             WHERE l.table_oid IN (SELECT pg_catalog.pg_partition_ancestors(TG_RELID) UNION SELECT TG_RELID)
               AND l.value_sql IS NOT NULL LOOP
        IF cardinality(r.json_path) > 0 THEN
            EXECUTE format('SELECT jsonb_typeof(x.%I::jsonb #> %L::text[]) FROM (SELECT ($1).*) AS x', r.column_name, r.json_path)
                INTO v_type USING NEW;
            IF v_type IS DISTINCT FROM 'string' AND v_type IS DISTINCT FROM 'null' AND v_type IS NOT NULL THEN
                RAISE EXCEPTION 'a row of % cannot hold a JSON % at %: pg_orphan_cleanup reads it as naming a storage object, and reads strings only', TG_TABLE_NAME, v_type, r.label
                    USING ERRCODE = 'OC003',
                          HINT = 'Store one URL or path per JSON path (add a reference per path), or remove the reference.';
            END IF;
        END IF;
        EXECUTE format('SELECT %s FROM (SELECT ($1).*) AS x', r.value_sql) INTO v_new USING NEW;
        IF TG_OP = 'UPDATE' THEN
            EXECUTE format('SELECT %s FROM (SELECT ($1).*) AS x', r.value_sql) INTO v_old USING OLD;
            CONTINUE WHEN v_new IS NOT DISTINCT FROM v_old;
        END IF;
        CONTINUE WHEN v_new IS NULL;
        v_unread := orphan_cleanup._unread_url(v_new);
        IF v_unread IS NOT NULL THEN
            RAISE EXCEPTION 'a row of % cannot hold this value in %: %', TG_TABLE_NAME, r.label, v_unread
                USING ERRCODE = 'OC003',
                      HINT = 'pg_orphan_cleanup reads this column as naming storage objects (orphan_cleanup.extra_references); store one URL or path per value, or remove the reference.';
        END IF;
        FOR o IN SELECT k.bucket, k.object_path FROM orphan_cleanup._objects_of(v_new) AS k LOOP
            ob := orphan_cleanup._hold_object(o.bucket, o.object_path);
            IF ob.handouts > 0 THEN
                RAISE EXCEPTION 'a row of % cannot name %/% in %: that object was handed to a reaper and may already be deleted from storage',
                                TG_TABLE_NAME, ob.bucket, ob.object_path, r.label
                    USING ERRCODE = 'OC002',
                          DETAIL = format('Object %s/%s was handed out %s time(s), last by %s at %s (deletion queue row %s).',
                                          ob.bucket, ob.object_path, ob.handouts, ob.last_handed_to, ob.last_handed_out_at, ob.last_queue_id),
                          HINT = 'Upload the file again under a new name and reference that.';
            END IF;
        END LOOP;
    END LOOP;
    RETURN NULL;
END
$$;

-- Adds a reference: `column_name` of `table_name` (text, varchar, json or jsonb), or the value at
-- `json_path` (dotted, e.g. 'thumbnails.large') inside a json/jsonb column. Needs a GIN index on
-- the value's object_keys() (every stray is looked up there; the error gives the statement),
-- and every value already stored must be readable. Installs the guard trigger. Idempotent.
CREATE FUNCTION orphan_cleanup.add_reference(table_name text, column_name text, json_path text DEFAULT NULL)
RETURNS text
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp SET jit = off SET lock_timeout = '10s'
AS $$
DECLARE
    v_rel oid;
    v_type text;
    v_path text[];
    v_value text;
    v_expr text;
    v_index oid;
    v_bad text;
    v_empty boolean;
    v_problem text;
    v_part oid;
    v_marked boolean;
BEGIN
    v_rel := pg_catalog.to_regclass(table_name);
    IF v_rel IS NULL THEN
        RAISE EXCEPTION 'table % does not exist', coalesce(quote_literal(table_name), 'NULL')
            USING ERRCODE = 'undefined_table', HINT = 'Give a schema-qualified name, e.g. public.thumbnails.';
    END IF;
    -- Claims in flight built their re-check without this reference: wait for them, and refuse
    -- while reapers hold claims (a claimed object this table names may be being deleted). Writes
    -- to the table wait until the trigger is in place, so no row slips between the scan and it.
    PERFORM pg_catalog.pg_advisory_xact_lock(7310246, 3);
    EXECUTE format('LOCK TABLE %s IN SHARE ROW EXCLUSIVE MODE', v_rel::regclass);
    IF EXISTS (SELECT 1 FROM orphan_cleanup.deletion_queue AS d WHERE d.state = 'claimed') THEN
        RAISE EXCEPTION 'add_reference() refused: % queue row(s) are claimed by reapers, and objects this table names may be among them',
                        (SELECT count(*) FROM orphan_cleanup.deletion_queue AS d WHERE d.state = 'claimed')
            USING ERRCODE = 'object_in_use',
                  HINT = 'ALTER SYSTEM SET orphan_cleanup.reaping_enabled = off; SELECT pg_reload_conf(); then wait until queue_status() shows no claimed rows (or their leases expire), add the reference, and turn reaping on again.';
    END IF;
    v_path := CASE WHEN coalesce(json_path, '') = '' THEN '{}'::text[] ELSE string_to_array(json_path, '.') END;
    SELECT pg_catalog.format_type(a.atttypid, NULL) INTO v_type FROM pg_catalog.pg_attribute AS a
    WHERE a.attrelid = v_rel AND a.attname = column_name AND a.attnum > 0 AND NOT a.attisdropped;
    IF v_type IS NULL THEN
        RAISE EXCEPTION 'column % is missing from %', coalesce(quote_ident(column_name), 'NULL'), v_rel::regclass
            USING ERRCODE = 'undefined_column';
    ELSIF NOT orphan_cleanup._reference_type_ok(v_type, v_path) AND v_type IN ('json', 'jsonb') THEN
        RAISE EXCEPTION 'column % of % is %: a reference reads a text or varchar column, or a string at a JSON path inside a json or jsonb column', quote_ident(column_name), v_rel::regclass, v_type
            USING ERRCODE = 'wrong_object_type',
                  HINT = 'Name the path of the string that holds the URL or path, e.g. add_reference(''public.galleries'', ''data'', ''images.large''); one reference per path.';
    ELSIF NOT orphan_cleanup._reference_type_ok(v_type, v_path) THEN
        RAISE EXCEPTION 'column % of % is %: a reference reads a text or varchar column, or a string at a JSON path inside a json or jsonb column', quote_ident(column_name), v_rel::regclass, v_type
            USING ERRCODE = 'wrong_object_type';
    END IF;
    IF cardinality(v_path) > 0 THEN
        EXECUTE format('SELECT x.%I::text FROM %s AS x WHERE jsonb_typeof(x.%I::jsonb #> %L::text[]) NOT IN (''string'', ''null'') LIMIT 1',
                       column_name, v_rel::regclass, column_name, v_path) INTO v_bad;
        IF v_bad IS NOT NULL THEN
            RAISE EXCEPTION 'add_reference(): at % inside %.% a row holds something other than a string: %', array_to_string(v_path, '.'), v_rel::regclass, quote_ident(column_name), left(v_bad, 300)
                USING ERRCODE = 'OC003',
                      HINT = 'A reference reads one string (a URL or path) per row at its JSON path; add one reference per path.';
        END IF;
        EXECUTE format('SELECT EXISTS (SELECT 1 FROM %s AS x) AND NOT EXISTS (SELECT 1 FROM %s AS x WHERE x.%I::jsonb #> %L::text[] IS NOT NULL)',
                       v_rel::regclass, v_rel::regclass, column_name, v_path) INTO v_empty;
        IF v_empty THEN
            RAISE WARNING 'no row of % holds a value at % inside %: check the path (keys separated by dots)', v_rel::regclass, array_to_string(v_path, '.'), quote_ident(column_name);
        END IF;
    END IF;
    v_value := orphan_cleanup._reference_value(column_name, v_path, v_type = 'text', 'x');
    -- The index: a GIN index whose only column is this value's object_keys(), compared as
    -- PostgreSQL deparses both (an expression index stores the parsed expression).
    v_expr := pg_catalog.regexp_replace(
        format('orphan_cleanup.object_keys(%s)', orphan_cleanup._reference_value(column_name, v_path, v_type = 'text', 'x')),
        '\mx\.', '', 'g');
    SELECT i.indexrelid INTO v_index
    FROM pg_catalog.pg_index AS i
    JOIN pg_catalog.pg_class AS c ON c.oid = i.indexrelid
    JOIN pg_catalog.pg_am AS am ON am.oid = c.relam
    WHERE i.indrelid = v_rel AND am.amname = 'gin' AND i.indnkeyatts = 1 AND i.indkey[0] = 0 AND i.indpred IS NULL
      AND i.indisvalid AND i.indisready AND i.indislive
      AND orphan_cleanup._same_expression(pg_catalog.pg_get_indexdef(i.indexrelid, 1, false), v_expr)
    LIMIT 1;
    IF v_index IS NULL THEN
        RAISE EXCEPTION 'add_reference(): % has no index to look objects up by, and every stray would read the whole table', v_rel::regclass
            USING ERRCODE = 'object_not_in_prerequisite_state',
                  HINT = 'Run, outside a transaction block: ' || orphan_cleanup._reference_index_statement(v_rel, column_name, v_path, v_type = 'text')
                         || ' Then run add_reference() again.';
    END IF;
    EXECUTE format('SELECT x::text FROM (SELECT %s AS v FROM %s AS x) AS x WHERE orphan_cleanup._unread_url(x.v) IS NOT NULL LIMIT 1',
                   v_value, v_rel::regclass) INTO v_bad;
    IF v_bad IS NOT NULL THEN
        RAISE EXCEPTION 'add_reference(): a value of %.% cannot be read as naming storage objects: %', v_rel::regclass, quote_ident(column_name), left(v_bad, 300)
            USING ERRCODE = 'OC003',
                  HINT = 'Such a value may name more objects than can be read; fix the rows, or keep reclaim_strays off.';
    END IF;
    INSERT INTO orphan_cleanup.extra_references (table_oid, column_name, json_path, index_oid)
    VALUES (v_rel, column_name, v_path, v_index)
    ON CONFLICT ON CONSTRAINT extra_references_pkey DO UPDATE SET index_oid = excluded.index_oid;
    -- The trigger as it must be (one changed since, a WHEN clause say, is made again).
    v_marked := orphan_cleanup._guards_changing();
    IF orphan_cleanup._reference_table_problem(v_rel, '', column_name) IS NOT NULL
       AND EXISTS (SELECT 1 FROM pg_catalog.pg_trigger AS t WHERE t.tgrelid = v_rel AND t.tgname = 'orphan_cleanup_reference_guard') THEN
        EXECUTE format('DROP TRIGGER orphan_cleanup_reference_guard ON %s', v_rel::regclass);
    END IF;
    IF NOT EXISTS (SELECT 1 FROM pg_catalog.pg_trigger AS t WHERE t.tgrelid = v_rel AND t.tgname = 'orphan_cleanup_reference_guard') THEN
        EXECUTE format('CREATE TRIGGER orphan_cleanup_reference_guard AFTER INSERT OR UPDATE ON %s FOR EACH ROW EXECUTE FUNCTION orphan_cleanup.reference_guard()', v_rel::regclass);
    END IF;
    FOR v_part IN SELECT v_rel UNION SELECT pt.relid FROM pg_catalog.pg_partition_tree(v_rel) AS pt LOOP
        EXECUTE format('ALTER TABLE %s ENABLE ALWAYS TRIGGER orphan_cleanup_reference_guard', v_part::regclass);
    END LOOP;
    PERFORM orphan_cleanup._guards_changed(v_marked);
    v_problem := orphan_cleanup._reference_table_problem(v_rel, format('%s.%I', v_rel::regclass, column_name), column_name);
    IF v_problem IS NOT NULL THEN
        RAISE EXCEPTION 'add_reference() refused: %', v_problem
            USING ERRCODE = 'object_not_in_prerequisite_state';
    END IF;
    -- Its partitions' rows were read through it above: looked at.
    INSERT INTO orphan_cleanup.reference_partitions (relid, name)
    SELECT pt.relid, pt.relid::regclass::text FROM pg_catalog.pg_partition_tree(v_rel) AS pt WHERE pt.relid <> v_rel
    ON CONFLICT (relid) DO NOTHING;
    INSERT INTO orphan_cleanup.audit_log (action, actor, detail)
    VALUES ('setting_changed', session_user, format('extra reference added: %s.%I%s', v_rel::regclass, column_name,
                                                     CASE WHEN cardinality(v_path) > 0 THEN format(' #>> %L', v_path) ELSE '' END));
    RETURN format('objects named by %s.%I%s are never strays', v_rel::regclass, column_name,
                  CASE WHEN cardinality(v_path) > 0 THEN format(' at %s', array_to_string(v_path, '.')) ELSE '' END);
END
$$;

-- Whether two deparsed index expressions are the same, spaces and redundant parentheses aside.
CREATE FUNCTION orphan_cleanup._same_expression(a text, b text) RETURNS boolean
LANGUAGE sql IMMUTABLE SET search_path = pg_catalog, pg_temp
RETURN pg_catalog.translate(a, ' ()', '') = pg_catalog.translate(b, ' ()', '');

-- Removes a reference (by table and column; all its JSON paths), and the guard trigger once the
-- table has none left. Objects only it named become strays at the next reconciliation.
CREATE FUNCTION orphan_cleanup.remove_reference(table_name text, column_name text) RETURNS text
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_rel oid;
    n integer;
BEGIN
    v_rel := coalesce(pg_catalog.to_regclass(table_name)::oid,
                      CASE WHEN table_name ~ '^[0-9]+$' THEN table_name::oid END);
    DELETE FROM orphan_cleanup.extra_references AS r WHERE r.table_oid = v_rel AND r.column_name = remove_reference.column_name;
    GET DIAGNOSTICS n = ROW_COUNT;
    IF n = 0 THEN
        RAISE EXCEPTION 'no extra reference on %.% (SELECT * FROM orphan_cleanup.list_references() lists them)', table_name, column_name
            USING ERRCODE = 'undefined_object';
    END IF;
    IF NOT EXISTS (SELECT 1 FROM orphan_cleanup.extra_references AS r WHERE r.table_oid = v_rel)
       AND EXISTS (SELECT 1 FROM pg_catalog.pg_trigger AS t WHERE t.tgrelid = v_rel AND t.tgname = 'orphan_cleanup_reference_guard') THEN
        EXECUTE format('DROP TRIGGER orphan_cleanup_reference_guard ON %s', v_rel::regclass);
    END IF;
    DELETE FROM orphan_cleanup.reference_partitions AS x
    WHERE x.relid NOT IN (SELECT rp.relid FROM orphan_cleanup._reference_partitions() AS rp);
    INSERT INTO orphan_cleanup.audit_log (action, actor, detail)
    VALUES ('setting_changed', session_user, format('extra reference removed: %s.%s', table_name, column_name));
    RETURN format('removed %s reference(s) on %s.%s', n, table_name, column_name);
END
$$;

-- The references, for a DBA: what each reads, and whether it is in force.
CREATE FUNCTION orphan_cleanup.list_references()
RETURNS TABLE (reference text, status text, detail text)
LANGUAGE sql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp
BEGIN ATOMIC
    SELECT l.label, CASE WHEN l.problem IS NULL THEN 'ok' ELSE 'problem' END,
           coalesce(l.problem, 'in force: objects it names are never strays')
    FROM orphan_cleanup._reference_list() AS l;
END;

-- claim()'s hold on the references: the set of them (shared; add_reference() takes it
-- exclusively) and each table in ROW EXCLUSIVE mode without waiting. False when a transaction is
-- changing a reference table's triggers (it holds a lock that conflicts): that claim hands out
-- nothing.
CREATE FUNCTION orphan_cleanup._hold_references() RETURNS boolean
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    rel oid;
BEGIN
    PERFORM pg_catalog.pg_advisory_xact_lock_shared(7310246, 3);
    FOR rel IN SELECT DISTINCT r.table_oid FROM orphan_cleanup.extra_references AS r
               JOIN pg_catalog.pg_class AS c ON c.oid = r.table_oid ORDER BY 1 LOOP
        BEGIN
            EXECUTE format('LOCK TABLE %s IN ROW EXCLUSIVE MODE NOWAIT', rel::regclass);
        EXCEPTION WHEN lock_not_available OR undefined_table THEN
            RETURN false;
        END;
    END LOOP;
    RETURN true;
END
$$;
