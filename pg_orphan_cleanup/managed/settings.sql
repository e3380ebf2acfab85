-- The managed edition's settings. The extension keeps its settings as GUCs (orphan_cleanup.*,
-- changed with ALTER SYSTEM and a reload), which a managed platform does not let a user define.
-- Here they live in a table with the same names, defaults, units, ranges and checks, changed
-- with set_setting(), which refuses a bad value with the message PostgreSQL gives for the
-- extension's GUC and audits every change. Only the table's owner (who installed the edition)
-- can change a setting; a session cannot SET one to point the queue functions, which run with
-- the owner's rights, at another table or bucket.
--
-- tests/tests/managed_settings.rs compares every message and every parsed value with the
-- extension's GUCs.

-- What can be set: one row per setting, in the GUCs' order, with its default as _config()
-- reads it.
CREATE FUNCTION orphan_cleanup._setting_defs()
RETURNS TABLE (name text, kind text, unit text, min_value float8, max_value float8, default_value text, description text)
LANGUAGE sql IMMUTABLE PARALLEL SAFE
BEGIN ATOMIC
    SELECT * FROM (VALUES
        ('enabled', 'bool', NULL, NULL::float8, NULL::float8, 'on', 'Whether scheduled cleanup cycles run.'),
        ('reaping_enabled', 'bool', NULL, NULL, NULL, 'on', 'Whether claim() hands queued rows to reapers.'),
        ('interval', 'int', 's', 1, 31536000, '3600', 'Time between cleanup cycles; health() calls a schedule late past it.'),
        ('min_age', 'int', 's', 0, 31536000, '3600', 'How old a completed job must be before it can count as an orphan.'),
        ('age_column', 'column', NULL, NULL, NULL, 'created_at', 'Column of the jobs table that orphan age is measured from.'),
        ('grace', 'int', 's', 0, 31536000, '0', 'How long a queued row waits before a reaper may claim it.'),
        ('max_per_cycle', 'int', NULL, 1, 10000000, '10000', 'Most rows one cleanup cycle enqueues.'),
        ('cycle_time_budget', 'int', 'ms', 100, 3600000, '5000', 'How long one cleanup cycle may work before it commits.'),
        ('jobs_table', 'table', NULL, NULL, NULL, 'public.render_jobs', 'The render jobs table (schema-qualified).'),
        ('assets_table', 'table', NULL, NULL, NULL, 'public.user_assets', 'The saved assets table (schema-qualified).'),
        ('allowed_buckets', 'buckets', NULL, NULL, NULL, '', 'Comma-separated buckets whose objects may be deleted. Empty: none may be.'),
        ('allowed_prefixes', 'prefixes', NULL, NULL, NULL, '', 'Comma-separated object key prefixes allowed inside the allowed buckets.'),
        ('allowed_hosts', 'hosts', NULL, NULL, NULL, '', 'Comma-separated hosts an output URL may name. Empty: only bare bucket/path values.'),
        ('on_confirm', 'enum', NULL, NULL, NULL, 'delete', 'What confirm() does to the job row once its file is gone: delete or clear_url.'),
        ('dry_run', 'bool', NULL, NULL, NULL, 'off', 'Cycles find and log orphans but enqueue nothing.'),
        ('max_attempts', 'int', NULL, 1, 1000, '10', 'Failed deletes before a row is dead-lettered.'),
        ('retry_backoff', 'int', 's', 1, 3600, '30', 'How long a failed delete waits before its first retry.'),
        ('history_retention', 'int', 's', 3600, 630720000, '2592000', 'Finished queue rows, audit and cycle history older than this are pruned.'),
        ('full_sweep_interval', 'int', 's', 0, 31536000, '86400', 'How often a cycle re-examines the whole jobs table.'),
        ('breaker_factor', 'real', NULL, 0, 1000000, '10', 'A cycle enqueuing more than this many times the recent median trips the breaker.'),
        ('breaker_min_rows', 'int', NULL, 0, 10000000, '1000', 'The breaker never trips on a cycle enqueuing fewer rows than this.'),
        ('breaker_max_fraction', 'real', NULL, 0, 1, '0.5', 'A cycle enqueuing more than this fraction of the jobs trips the breaker.'),
        ('stray_min_age', 'int', 's', 3600, 315360000, '604800', 'How old an object in storage must be before it can count as a stray (named by no job).'),
        ('storage_price_per_gb_month', 'real', NULL, 0, 1000, '0.021', 'Storage price in dollars per GB per month, for the projected saving in savings_report().'),
        ('reclaim_strays', 'bool', NULL, NULL, NULL, 'off', 'Strays (objects in storage no job names) may be queued and deleted.')
    ) AS d(name, kind, unit, min_value, max_value, default_value, description);
END;

-- The values set, as _config() reads them (integers in the setting's base unit, on/off, text).
-- A setting with no row has its default.
CREATE TABLE orphan_cleanup.settings (
    name       text PRIMARY KEY,
    value      text NOT NULL,
    changed_at timestamptz NOT NULL DEFAULT now(),
    changed_by text NOT NULL DEFAULT current_user
);

-- A number as PostgreSQL's own printf prints it with %g (range messages and pg_settings use
-- it for real settings): six significant digits, an exponent below 1e-4 and from 1e6 on.
CREATE FUNCTION orphan_cleanup._printf_g(x float8) RETURNS text
LANGUAGE plpgsql IMMUTABLE STRICT PARALLEL SAFE AS $$
DECLARE
    e int;
    m numeric;
    t text;
BEGIN
    IF x = 'Infinity'::float8 THEN
        RETURN 'Infinity';
    ELSIF x = '-Infinity'::float8 THEN
        RETURN '-Infinity';
    ELSIF x = 0 THEN
        RETURN '0';
    END IF;
    e := pg_catalog.floor(pg_catalog.log(pg_catalog.abs(x::numeric)));
    m := pg_catalog.round(x::numeric / (10::numeric ^ e), 5);
    IF pg_catalog.abs(m) >= 10 THEN
        e := e + 1;
        m := pg_catalog.round(x::numeric / (10::numeric ^ e), 5);
    END IF;
    IF e < -4 OR e >= 6 THEN
        t := m::text;
        IF pg_catalog.strpos(t, '.') > 0 THEN
            t := pg_catalog.rtrim(pg_catalog.rtrim(t, '0'), '.');
        END IF;
        RETURN t || 'e' || CASE WHEN e < 0 THEN '-' ELSE '+' END || pg_catalog.lpad(pg_catalog.abs(e)::text, 2, '0');
    END IF;
    t := pg_catalog.round(x::numeric, 5 - e)::text;
    IF pg_catalog.strpos(t, '.') > 0 THEN
        t := pg_catalog.rtrim(pg_catalog.rtrim(t, '0'), '.');
    END IF;
    RETURN t;
END
$$;

-- A string as Rust's {:?} prints it (the extension's check hooks quote values that way).
CREATE FUNCTION orphan_cleanup._rust_debug(s text) RETURNS text
LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE
RETURN '"' || pg_catalog.replace(pg_catalog.replace(pg_catalog.replace(pg_catalog.replace(pg_catalog.replace(
    s, '\', '\\'), '"', '\"'), E'\n', '\n'), E'\r', '\r'), E'\t', '\t') || '"';

-- The identifiers of `a.b` / `"A"."b.c"` as PostgreSQL reads them, or NULL for anything else
-- (the extension's split_qualified_name).
CREATE FUNCTION orphan_cleanup._split_qualified_name(s text) RETURNS text[]
LANGUAGE plpgsql IMMUTABLE STRICT PARALLEL SAFE AS $$
DECLARE
    rest text := pg_catalog.regexp_replace(s, '^[\u0009-\u000d \u0085\u00a0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000]+|[\u0009-\u000d \u0085\u00a0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000]+$', '', 'g');
    m text[];
    parts text[] := '{}';
BEGIN
    LOOP
        m := pg_catalog.regexp_match(rest, '^(?:"((?:[^"]|"")+)"|([[:alpha:]_][[:alnum:]_$]*))(\.|$)(.*)$');
        IF m IS NULL THEN
            RETURN NULL;
        END IF;
        parts := parts || coalesce(pg_catalog.replace(m[1], '""', '"'), orphan_cleanup._ascii_lower(m[2]));
        IF m[3] = '' THEN
            RETURN parts;
        END IF;
        rest := m[4];
    END LOOP;
END
$$;

-- Why an allow-list's entries cannot be used, or NULL (object-url's Policy::from_lists):
-- `kind` is buckets, prefixes or hosts.
CREATE FUNCTION orphan_cleanup._list_error(kind text, list text) RETURNS text
LANGUAGE plpgsql IMMUTABLE PARALLEL SAFE AS $$
DECLARE
    entry text;
BEGIN
    FOREACH entry IN ARRAY orphan_cleanup._list_entries(list) LOOP
        IF kind = 'buckets' AND (entry IN ('.', '..') OR entry !~ '^[A-Za-z0-9_!.*''() &$=@;:+,?-]+$') THEN
            RETURN pg_catalog.format('bucket %s is not a valid bucket name (letters, digits and _.-! etc., no ''/'')',
                                     orphan_cleanup._rust_debug(entry));
        ELSIF kind = 'prefixes' AND (pg_catalog.left(entry, 1) = '/'
                                     OR '.' = ANY (pg_catalog.string_to_array(entry, '/'))
                                     OR '..' = ANY (pg_catalog.string_to_array(entry, '/'))
                                     OR pg_catalog.strpos(entry, '\') > 0) THEN
            RETURN pg_catalog.format('prefix %s must be a relative key prefix such as renders/ (no leading ''/'', no ''..'')',
                                     orphan_cleanup._rust_debug(entry));
        ELSIF kind = 'hosts' AND (orphan_cleanup._plain_authority(entry, 'https')).error IS NOT NULL THEN
            RETURN pg_catalog.format('host %s must be a bare host or host:port, e.g. abcd.supabase.co (no scheme, path or ''@'')',
                                     orphan_cleanup._rust_debug(orphan_cleanup._ascii_lower(entry)));
        END IF;
    END LOOP;
    RETURN NULL;
END
$$;

-- The entries of a comma-separated list, trimmed (of Unicode's White_Space, as Rust's trim()),
-- empty ones dropped.
CREATE FUNCTION orphan_cleanup._list_entries(list text) RETURNS text[]
LANGUAGE plpgsql IMMUTABLE PARALLEL SAFE AS $$
DECLARE
    e text;
    entries text[] := '{}';
BEGIN
    FOREACH e IN ARRAY pg_catalog.string_to_array(coalesce(list, ''), ',') LOOP
        e := pg_catalog.btrim(e, E' \t\n\u000b\f\r\u0085\u00a0\u1680\u2000\u2001\u2002\u2003\u2004\u2005\u2006\u2007\u2008\u2009\u200a\u2028\u2029\u202f\u205f\u3000');
        IF e <> '' THEN
            entries := entries || e;
        END IF;
    END LOOP;
    RETURN entries;
END
$$;

-- An integer setting's value as PostgreSQL's parse_int reads it (decimal, octal or hex, a
-- fraction, a time unit for settings that have one), in the setting's base unit; or the hint
-- ('' for none) when it cannot be read.
CREATE FUNCTION orphan_cleanup._parse_int(value text, unit text, OUT result int, OUT hint text)
LANGUAGE plpgsql IMMUTABLE PARALLEL SAFE AS $$
DECLARE
    m text[];
    num text;
    rest text;
    val float8;
    mult float8;
    smaller float8;
BEGIN
    -- strtol (base 0) then, when it stops at '.', 'e' or 'E' or overflows, strtod.
    m := pg_catalog.regexp_match(value, '^[ \t\n\v\f\r]*([+-]?)(0[xX][0-9A-Fa-f]+|0[0-7]*|[1-9][0-9]*)(.*)$', 's');
    IF m IS NULL THEN
        hint := '';
        RETURN;
    END IF;
    rest := m[3];
    IF pg_catalog.left(rest, 1) IN ('.', 'e', 'E') OR pg_catalog.length(m[2]) > 18 THEN
        m := pg_catalog.regexp_match(value, '^[ \t\n\v\f\r]*([+-]?(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][+-]?[0-9]+)?)(.*)$', 's');
        IF m IS NULL THEN
            hint := '';
            RETURN;
        END IF;
        val := m[1]::float8;
        rest := m[2];
    ELSIF pg_catalog.left(m[2], 2) IN ('0x', '0X') THEN
        val := (m[1] || ('x' || pg_catalog.lpad(pg_catalog.substr(m[2], 3), 16, '0'))::bit(64)::bigint::text)::float8;
    ELSIF pg_catalog.left(m[2], 1) = '0' THEN
        val := 0;
        FOR i IN 2 .. pg_catalog.length(m[2]) LOOP
            val := val * 8 + pg_catalog.substr(m[2], i, 1)::int;
        END LOOP;
        IF m[1] = '-' THEN
            val := -val;
        END IF;
    ELSE
        val := (m[1] || m[2])::float8;
    END IF;
    rest := pg_catalog.ltrim(rest, E' \t\n\v\f\r');
    IF rest <> '' THEN
        IF unit IS NULL THEN
            hint := '';
            RETURN;
        END IF;
        m := pg_catalog.regexp_match(rest, '^([^ \t\n\v\f\r]{1,3})[ \t\n\v\f\r]*$', 's');
        SELECT u.mult, u.smaller INTO mult, smaller
        FROM (VALUES ('d', 86400.0, 3600.0), ('h', 3600, 60), ('min', 60, 1), ('s', 1, 0.001),
                     ('ms', 0.001, 0.000001), ('us', 0.000001, NULL)) AS u(name, mult, smaller)
        WHERE u.name = m[1];
        IF m IS NULL OR mult IS NULL THEN
            hint := 'Valid units for this parameter are "us", "ms", "s", "min", "h", and "d".';
            RETURN;
        END IF;
        IF unit = 'ms' THEN
            mult := mult * 1000;
            smaller := smaller * 1000;
        END IF;
        val := val * mult;
        IF smaller IS NOT NULL THEN
            val := pg_catalog.round(val / smaller) * smaller;   -- rint(), as PostgreSQL
        END IF;
    END IF;
    val := pg_catalog.round(val);
    IF val > 2147483647 OR val < -2147483648 THEN
        hint := 'Value exceeds integer range.';
        RETURN;
    END IF;
    result := val::int;
END
$$;

-- PostgreSQL's parse_bool: a case-insensitive prefix of true, false, yes, no, on or off (at
-- least "on" or "of"), or 1 or 0.
CREATE FUNCTION orphan_cleanup._parse_bool(value text) RETURNS boolean
LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE
RETURN CASE
    WHEN value = '' THEN NULL
    WHEN value IN ('1', '0') THEN value = '1'
    WHEN pg_catalog.lower(value) IN ('on', 'of', 'off') THEN pg_catalog.lower(value) = 'on'
    WHEN pg_catalog.starts_with('true', pg_catalog.lower(value)) OR pg_catalog.starts_with('yes', pg_catalog.lower(value)) THEN true
    WHEN pg_catalog.starts_with('false', pg_catalog.lower(value)) OR pg_catalog.starts_with('no', pg_catalog.lower(value)) THEN false
END;

-- A value as _config() reads it, or raises what PostgreSQL raises for the extension's GUC.
CREATE FUNCTION orphan_cleanup._setting_value(setting text, value text) RETURNS text
LANGUAGE plpgsql IMMUTABLE PARALLEL SAFE AS $$
DECLARE
    d record;
    guc text := 'orphan_cleanup.' || setting;
    i record;
    r float8;
    b boolean;
    detail text;
BEGIN
    SELECT * INTO d FROM orphan_cleanup._setting_defs() AS s WHERE s.name = setting;
    IF d.kind = 'bool' THEN
        b := orphan_cleanup._parse_bool(value);
        IF b IS NULL THEN
            RAISE EXCEPTION 'parameter "%" requires a Boolean value', guc USING ERRCODE = 'invalid_parameter_value';
        END IF;
        RETURN CASE WHEN b THEN 'on' ELSE 'off' END;
    ELSIF d.kind = 'int' THEN
        i := orphan_cleanup._parse_int(value, d.unit);
        IF i.hint = '' THEN
            RAISE EXCEPTION 'invalid value for parameter "%": "%"', guc, value
                USING ERRCODE = 'invalid_parameter_value';
        ELSIF i.hint IS NOT NULL THEN
            RAISE EXCEPTION 'invalid value for parameter "%": "%"', guc, value
                USING ERRCODE = 'invalid_parameter_value', HINT = i.hint;
        END IF;
        IF i.result < d.min_value OR i.result > d.max_value THEN
            RAISE EXCEPTION USING ERRCODE = 'invalid_parameter_value',
                MESSAGE = pg_catalog.format('%s%s is outside the valid range for parameter "%s" (%s .. %s)',
                    i.result, coalesce(' ' || d.unit, ''), guc, d.min_value::bigint, d.max_value::bigint);
        END IF;
        RETURN i.result::text;
    ELSIF d.kind = 'real' THEN
        IF value ~* '^[ \t\n\v\f\r]*[+-]?(inf|infinity)[ \t\n\v\f\r]*$' THEN
            r := CASE WHEN pg_catalog.strpos(value, '-') > 0 THEN '-Infinity' ELSE 'Infinity' END;
        ELSIF value ~ '^[ \t\n\v\f\r]*[+-]?(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][+-]?[0-9]+)?[ \t\n\v\f\r]*$' THEN
            r := pg_catalog.btrim(value, E' \t\n\v\f\r')::float8;
        ELSE
            RAISE EXCEPTION 'invalid value for parameter "%": "%"', guc, value USING ERRCODE = 'invalid_parameter_value';
        END IF;
        IF r < d.min_value OR r > d.max_value THEN
            RAISE EXCEPTION '% is outside the valid range for parameter "%" (% .. %)',
                orphan_cleanup._printf_g(r), guc, orphan_cleanup._printf_g(d.min_value), orphan_cleanup._printf_g(d.max_value)
                USING ERRCODE = 'invalid_parameter_value';
        END IF;
        RETURN orphan_cleanup._printf_g(r);
    ELSIF d.kind = 'enum' THEN
        IF pg_catalog.lower(value) NOT IN ('delete', 'clear_url') THEN
            RAISE EXCEPTION 'invalid value for parameter "%": "%"', guc, value
                USING ERRCODE = 'invalid_parameter_value', HINT = 'Available values: delete, clear_url.';
        END IF;
        RETURN pg_catalog.lower(value);
    ELSIF d.kind = 'table' AND coalesce(pg_catalog.cardinality(orphan_cleanup._split_qualified_name(value)), 0) NOT BETWEEN 1 AND 2 THEN
        detail := pg_catalog.format('%s is not a table name; use schema.table, e.g. public.render_jobs (double-quote mixed-case names).',
                                    orphan_cleanup._rust_debug(value));
    ELSIF d.kind = 'column' AND pg_catalog.cardinality(orphan_cleanup._split_qualified_name(value)) IS DISTINCT FROM 1 THEN
        detail := pg_catalog.format('%s is not a column name; use e.g. created_at or completed_at.',
                                    orphan_cleanup._rust_debug(value));
    ELSIF d.kind IN ('buckets', 'prefixes', 'hosts') THEN
        detail := orphan_cleanup._list_error(d.kind, value);
        IF detail IS NOT NULL THEN
            detail := pg_catalog.format('%s: %s. Example: ''%s''.', guc, detail,
                CASE d.kind WHEN 'buckets' THEN 'renders,thumbnails' WHEN 'prefixes' THEN 'renders/,previews/'
                            ELSE 'abcd.supabase.co,cdn.example.com' END);
        END IF;
    END IF;
    IF detail IS NOT NULL THEN
        RAISE EXCEPTION 'invalid value for parameter "%": "%"', guc, value
            USING ERRCODE = 'invalid_parameter_value', DETAIL = detail;
    END IF;
    RETURN value;
END
$$;

-- Changes a setting (NULL resets it to its default), checked as the extension's GUC is, and
-- audited. The name may carry the orphan_cleanup. prefix. Only the owner of
-- orphan_cleanup.settings may: everyone else lacks the rights on the table.
--   SELECT orphan_cleanup.set_setting('allowed_buckets', 'renders');
CREATE FUNCTION orphan_cleanup.set_setting(name text, value text) RETURNS text
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp SET standard_conforming_strings = on AS $$
DECLARE
    setting text := pg_catalog.regexp_replace(set_setting.name, '^orphan_cleanup\.', '');
    old text;
    new text;
BEGIN
    IF NOT EXISTS (SELECT FROM orphan_cleanup._setting_defs() AS d WHERE d.name = setting) THEN
        RAISE EXCEPTION 'unrecognized configuration parameter "orphan_cleanup.%"', setting
            USING ERRCODE = 'undefined_object',
                  HINT = 'The settings are: ' || (SELECT pg_catalog.string_agg(d.name, ', ') FROM orphan_cleanup._setting_defs() AS d) || '.';
    END IF;
    SELECT s.value INTO old FROM orphan_cleanup.settings AS s WHERE s.name = setting FOR UPDATE;
    IF set_setting.value IS NULL THEN
        DELETE FROM orphan_cleanup.settings AS s WHERE s.name = setting;
        new := (SELECT d.default_value FROM orphan_cleanup._setting_defs() AS d WHERE d.name = setting);
    ELSE
        new := orphan_cleanup._setting_value(setting, set_setting.value);
        INSERT INTO orphan_cleanup.settings AS s (name, value) VALUES (setting, new)
        ON CONFLICT ON CONSTRAINT settings_pkey
        DO UPDATE SET value = EXCLUDED.value, changed_at = now(), changed_by = current_user;
    END IF;
    INSERT INTO orphan_cleanup.audit_log (action, actor, detail)
    VALUES ('setting_changed', current_user,
            pg_catalog.format('orphan_cleanup.%s: %L -> %L', setting,
                coalesce(old, (SELECT d.default_value FROM orphan_cleanup._setting_defs() AS d WHERE d.name = setting)),
                CASE WHEN set_setting.value IS NULL THEN new || ' (the default)' ELSE new END));
    RETURN new;
END
$$;

-- Every setting with its value, default, unit and when it was last changed, like pg_settings.
CREATE VIEW orphan_cleanup.current_settings AS
SELECT 'orphan_cleanup.' || d.name AS name,
       coalesce(s.value, d.default_value) AS value,
       d.unit,
       d.default_value,
       s.changed_at,
       s.changed_by,
       d.description
FROM orphan_cleanup._setting_defs() AS d
LEFT JOIN orphan_cleanup.settings AS s ON s.name = d.name;

-- The settings as typed values for the SQL functions (the extension's _config(), read from
-- the settings table instead of GUCs). `database` is this database: there is no worker.
CREATE FUNCTION orphan_cleanup._config()
RETURNS TABLE (enabled boolean, reaping_enabled boolean, interval_s integer, min_age_s integer,
               age_column text, grace_s integer, max_per_cycle integer, jobs_table text,
               assets_table text, allowed_buckets text, allowed_prefixes text, allowed_hosts text,
               on_confirm text, dry_run boolean, max_attempts integer, history_retention_s integer,
               full_sweep_interval_s integer, database text, breaker_factor double precision,
               breaker_min_rows integer, breaker_max_fraction double precision,
               retry_backoff_s integer, cycle_time_budget_ms integer, stray_min_age_s integer,
               storage_price_per_gb_month double precision, reclaim_strays boolean)
LANGUAGE sql STRICT STABLE PARALLEL SAFE
BEGIN ATOMIC
    WITH v AS (SELECT pg_catalog.jsonb_object_agg(c.name, c.value) AS j
               FROM (SELECT d.name, coalesce(s.value, d.default_value) AS value
                     FROM orphan_cleanup._setting_defs() AS d
                     LEFT JOIN orphan_cleanup.settings AS s ON s.name = d.name) AS c)
    SELECT (j->>'enabled')::boolean, (j->>'reaping_enabled')::boolean, (j->>'interval')::integer,
           (j->>'min_age')::integer, j->>'age_column', (j->>'grace')::integer,
           (j->>'max_per_cycle')::integer, j->>'jobs_table', j->>'assets_table',
           j->>'allowed_buckets', j->>'allowed_prefixes', j->>'allowed_hosts', j->>'on_confirm',
           (j->>'dry_run')::boolean, (j->>'max_attempts')::integer,
           (j->>'history_retention')::integer, (j->>'full_sweep_interval')::integer,
           pg_catalog.current_database()::text, (j->>'breaker_factor')::double precision,
           (j->>'breaker_min_rows')::integer, (j->>'breaker_max_fraction')::double precision,
           (j->>'retry_backoff')::integer, (j->>'cycle_time_budget')::integer,
           (j->>'stray_min_age')::integer, (j->>'storage_price_per_gb_month')::double precision,
           (j->>'reclaim_strays')::boolean
    FROM v;
END;

-- The allow-lists as arrays, hosts spelled as the parser spells a URL's host: what
-- check_output_url() needs for every row a cycle looks at, so it reads the three rows and
-- nothing else (_config() reads every setting). set_setting() has checked the lists.
CREATE FUNCTION orphan_cleanup._policy(OUT buckets text[], OUT prefixes text[], OUT hosts text[])
LANGUAGE plpgsql STABLE PARALLEL SAFE AS $$
DECLARE
    v_hosts text;
BEGIN
    SELECT orphan_cleanup._list_entries(max(s.value) FILTER (WHERE s.name = 'allowed_buckets')),
           orphan_cleanup._list_entries(max(s.value) FILTER (WHERE s.name = 'allowed_prefixes')),
           max(s.value) FILTER (WHERE s.name = 'allowed_hosts')
    INTO buckets, prefixes, v_hosts
    FROM orphan_cleanup.settings AS s
    WHERE s.name IN ('allowed_buckets', 'allowed_prefixes', 'allowed_hosts');
    hosts := ARRAY(SELECT (orphan_cleanup._plain_authority(h, 'https')).host
                   FROM pg_catalog.unnest(orphan_cleanup._list_entries(v_hosts)) WITH ORDINALITY AS l(h, n)
                   ORDER BY n);
END
$$;

-- The hosts of allowed_hosts, spelled as the parser spells a URL's host, for claim() to tell
-- whether a reaper's own host is this project's.
CREATE FUNCTION orphan_cleanup._allowed_hosts() RETURNS text[]
LANGUAGE sql STRICT STABLE PARALLEL SAFE
RETURN (orphan_cleanup._policy()).hosts;

-- A reaper's hosts, spelled as the parser spells a URL's host; anything that is not one bare
-- host or host:port is refused, naming the argument (`what`) and the value.
CREATE FUNCTION orphan_cleanup._normalize_hosts(hosts text[], what text) RETURNS text[]
LANGUAGE plpgsql IMMUTABLE STRICT PARALLEL SAFE AS $$
DECLARE
    h text;
    entries text[];
    out_ text[] := '{}';
    why text;
BEGIN
    FOREACH h IN ARRAY hosts LOOP
        IF h IS NULL OR pg_catalog.btrim(h) = '' THEN
            RAISE EXCEPTION '% is not a list of hosts a reaper can serve: an entry is empty or NULL', what
                USING ERRCODE = 'invalid_parameter_value', HINT = orphan_cleanup._hosts_hint();
        END IF;
        why := orphan_cleanup._list_error('hosts', h);
        entries := orphan_cleanup._list_entries(h);
        IF why IS NULL AND pg_catalog.cardinality(entries) <> 1 THEN
            why := 'it must be one host';
        END IF;
        IF why IS NOT NULL THEN
            RAISE EXCEPTION '% % is not a host a reaper can serve: %', what, orphan_cleanup._rust_debug(h), why
                USING ERRCODE = 'invalid_parameter_value', HINT = orphan_cleanup._hosts_hint();
        END IF;
        out_ := out_ || (orphan_cleanup._plain_authority(entries[1], 'https')).host;
    END LOOP;
    RETURN out_;
END
$$;

CREATE FUNCTION orphan_cleanup._hosts_hint() RETURNS text
LANGUAGE sql IMMUTABLE PARALLEL SAFE
RETURN 'Pass bare hosts as the reaper does, e.g. hosts ARRAY[''abcd.supabase.co''] and home_host ''abcd.supabase.co'' (no scheme, path, port 443 or empty entries needed); NULL hosts means any.';

-- Parses the URL and checks it against the allow-list settings. `error` is the reason a row is
-- rejected; NULL means this project may delete the object.
CREATE FUNCTION orphan_cleanup.check_output_url(url text)
RETURNS TABLE (host text, bucket text, object_path text, error text)
LANGUAGE plpgsql STABLE PARALLEL SAFE SET search_path = pg_catalog, pg_temp SET standard_conforming_strings = on AS $$
DECLARE
    p record;
    pol record;
BEGIN
    IF url IS NULL THEN
        RETURN QUERY SELECT NULL::text, NULL::text, NULL::text, 'output_url is NULL'::text;
        RETURN;
    END IF;
    p := orphan_cleanup._parse_url(url);
    IF p.error IS NOT NULL THEN
        RETURN QUERY SELECT NULL::text, NULL::text, NULL::text, 'malformed URL: ' || p.error;
        RETURN;
    END IF;
    pol := orphan_cleanup._policy();
    RETURN QUERY SELECT p.host, p.bucket, p.object_path,
        'not allowed: ' || orphan_cleanup._url_refusal(p.host, p.bucket, p.object_path, pol.buckets, pol.prefixes, pol.hosts);
END
$$;
