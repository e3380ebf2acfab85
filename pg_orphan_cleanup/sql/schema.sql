-- Tables of pg_orphan_cleanup. The extension lives in schema orphan_cleanup and is not
-- relocatable; every statement names the schema, so nothing depends on search_path.

-- The group role the reaper's login role joins. Roles are cluster-wide and survive
-- DROP EXTENSION, so create it only when it is missing.
DO $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_catalog.pg_roles WHERE rolname = 'orphan_cleanup_reaper') THEN
        CREATE ROLE orphan_cleanup_reaper NOLOGIN;
    END IF;
END
$$;

-- What attach() recorded: the tables cycles and claims act on. A setting that no longer
-- matches this row stops cycles and claims until attach() runs again.
CREATE TABLE orphan_cleanup.attachment (
    singleton    boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    jobs_table   text NOT NULL,
    jobs_oid     oid NOT NULL,
    assets_table text NOT NULL,
    assets_oid   oid NOT NULL,
    age_column   text NOT NULL,
    attached_at  timestamptz NOT NULL DEFAULT now(),
    attached_by  text NOT NULL DEFAULT current_user
);

-- Where incremental detection has got to: jobs are scanned in (age_column, id) order, and a
-- cycle only looks past the cursor. A full sweep starts the cursor again from the beginning.
CREATE TABLE orphan_cleanup.detector_state (
    singleton          boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    cursor_ts          timestamptz NOT NULL DEFAULT '-infinity',
    cursor_id          uuid NOT NULL DEFAULT '00000000-0000-0000-0000-000000000000',
    sweep_started_at   timestamptz,
    policy_fingerprint text,
    -- The circuit breaker (breaker.sql): set when a cycle tripped it, cleared by reset_breaker()
    -- or by a change of the breaker's settings. breaker_approved lets the next cycle through.
    breaker_tripped_at timestamptz,
    breaker_detail     text,
    breaker_settings   text,
    breaker_approved   boolean NOT NULL DEFAULT false,
    -- Stray reconciliation (_reconcile_strays() in strays.sql): when the latest full pass began,
    -- where the one in progress has got to in (bucket_id, name) order (NULL: none in progress),
    -- and up to where the looks by creation time have read storage.objects.
    stray_pass_started_at timestamptz,
    stray_pass_bucket     text,
    stray_pass_name       text,
    stray_seen_ts         timestamptz,
    stray_seen_id         uuid
);
-- No row yet: the first cycle creates it. (A row inserted here would collide with the dumped
-- row when pg_restore fills this table.)

-- Jobs to look at again in the next cycle, whatever the cursor says: the save guard adds a
-- job here when an asset that referenced it is deleted or changed.
CREATE TABLE orphan_cleanup.recheck (
    job_id    uuid PRIMARY KEY,
    reason    text NOT NULL,
    queued_at timestamptz NOT NULL DEFAULT now()
);
-- A cycle takes the oldest first, a chunk at a time.
CREATE INDEX recheck_queued_at ON orphan_cleanup.recheck (queued_at);

-- Queue rows a claim found busy (their job or object held by a save or job write in flight),
-- and until when claims take them only after every other row they could take. A hint: unlogged
-- (a crash empties it, and nothing is lost), written only by claims, never locked by a save;
-- expired entries are pruned by cycles.
CREATE UNLOGGED TABLE orphan_cleanup.busy (
    queue_id bigint PRIMARY KEY,
    until    timestamptz NOT NULL
);

CREATE TABLE orphan_cleanup.cycle_log (
    id          bigserial PRIMARY KEY,
    started_at  timestamptz NOT NULL DEFAULT clock_timestamp(),
    finished_at timestamptz,
    status      text NOT NULL CHECK (status IN ('running', 'ok', 'dry_run', 'failed', 'skipped', 'tripped')),
    actor       text NOT NULL,
    full_sweep  boolean NOT NULL DEFAULT false,
    scanned     bigint NOT NULL DEFAULT 0,
    found       bigint NOT NULL DEFAULT 0,
    enqueued    bigint NOT NULL DEFAULT 0,
    protected   bigint NOT NULL DEFAULT 0,
    rejected    bigint NOT NULL DEFAULT 0,
    rechecked   bigint NOT NULL DEFAULT 0,
    duration_ms numeric,
    error       text,
    -- The cycle stopped at orphan_cleanup.cycle_time_budget and left the rest to the next one.
    out_of_time boolean NOT NULL DEFAULT false,
    -- Its stray reconciliation, reported apart (enqueued counts strays too): objects in storage
    -- looked at, strays queued, which passes ran (or why none did), and how long they took.
    strays_scanned  bigint NOT NULL DEFAULT 0,
    strays_enqueued bigint NOT NULL DEFAULT 0,
    stray_pass      text,
    stray_ms        numeric
);
CREATE INDEX cycle_log_started_at ON orphan_cleanup.cycle_log (started_at);

-- The deletion queue. One row per (job, output URL) that a cycle judged an orphan, or
-- rejected; and one per stray (kind 'stray', no job: an object in storage no job row names,
-- see strays.sql). States:
--   pending   waiting to be claimed (after grace, or after a retry back-off)
--   claimed   handed to a reaper until lease_until
--   deleted   confirmed gone by the reaper (the object existed)
--   absent    confirmed gone by the reaper (it was already gone)
--   dead      out of attempts, or failed for good: needs a human (requeue_dead)
--   cancelled removed by a DBA with cancel(); the job is not queued again for this URL
--   rescued   the job was saved before any reaper saw the row
--   stale     claim() found the row no longer deletable (job changed, saved, shared object)
--   rejected  the URL is malformed or not allowed by the settings; never sent to storage
CREATE TABLE orphan_cleanup.deletion_queue (
    id           bigserial PRIMARY KEY,
    job_id       uuid,                   -- NULL for a stray
    output_url   text NOT NULL,          -- redacted: signed-URL tokens are never stored; a stray's bucket/name
    url_hash     text NOT NULL,          -- md5 of the raw URL, to notice a changed URL
    host         text,
    bucket       text,
    object_path  text,
    state        text NOT NULL CHECK (state IN ('pending', 'claimed', 'deleted', 'absent', 'dead',
                                                'cancelled', 'rescued', 'stale', 'rejected')),
    reason       text,
    attempts     integer NOT NULL DEFAULT 0,
    claim_count  integer NOT NULL DEFAULT 0,   -- > 0: the file may already be gone
    available_at timestamptz NOT NULL DEFAULT now(),
    claimed_by   text,
    claimed_at   timestamptz,
    lease_until  timestamptz,
    last_error   text,
    job_cleanup  text,                   -- what confirm() did to the job row
    cycle_id     bigint,
    enqueued_at  timestamptz NOT NULL DEFAULT now(),
    updated_at   timestamptz NOT NULL DEFAULT now(),
    finished_at  timestamptz,
    lease_hash   bytea,                  -- sha256 of the claim's lease token (never the token)
    bytes        bigint,                 -- deleted: the object's size, as storage's answer gave it
    kind         text NOT NULL DEFAULT 'orphan' CHECK (kind IN ('orphan', 'stray')),
    -- A stray: the storage.objects row it was queued for. A claim hands out only that upload:
    -- an object uploaded again under the same name since is another file.
    stored_id      uuid,
    stored_version text,
    CONSTRAINT deletion_queue_stray_has_no_job CHECK ((kind = 'stray') = (job_id IS NULL))
);
CREATE UNIQUE INDEX deletion_queue_one_live_row_per_job
    ON orphan_cleanup.deletion_queue (job_id) WHERE state IN ('pending', 'claimed');
-- A stray has one live row at a time too.
CREATE UNIQUE INDEX deletion_queue_one_live_row_per_stray
    ON orphan_cleanup.deletion_queue (bucket, object_path) WHERE job_id IS NULL AND state IN ('pending', 'claimed');
CREATE INDEX deletion_queue_job ON orphan_cleanup.deletion_queue (job_id);
CREATE INDEX deletion_queue_object ON orphan_cleanup.deletion_queue (bucket, object_path);
CREATE INDEX deletion_queue_ready ON orphan_cleanup.deletion_queue (available_at, id) WHERE state = 'pending';
CREATE INDEX deletion_queue_leases ON orphan_cleanup.deletion_queue (lease_until) WHERE state = 'claimed';
-- Finished rows that _prune() deletes after the retention, oldest first. Not dead letters: they
-- stay until a DBA acts, and with them in the index every cycle's look for something to prune
-- found an old dead row and walked past all of them to delete nothing.
CREATE INDEX deletion_queue_prunable ON orphan_cleanup.deletion_queue (finished_at)
    WHERE state IN ('deleted', 'absent', 'cancelled', 'rescued', 'stale', 'rejected');
-- Confirmed rows whose job row still needs cleaning up: every cycle looks for them, and without
-- this index that look read the whole queue (125 ms per idle cycle at 550k queue rows).
CREATE INDEX deletion_queue_job_cleanup_pending ON orphan_cleanup.deletion_queue (id) WHERE job_cleanup LIKE 'pending%';

-- One row per action, with the actor: the guide's "full audit trail for all cleanup operations".
CREATE TABLE orphan_cleanup.audit_log (
    id         bigserial PRIMARY KEY,
    at         timestamptz NOT NULL DEFAULT clock_timestamp(),
    action     text NOT NULL CHECK (action IN ('enqueued', 'protected', 'rejected', 'claimed', 'deleted',
                                               'absent', 'failed', 'dead_lettered', 'rescued', 'refused',
                                               'cancelled', 'released', 'requeued', 'job_cleanup', 'attached', 'detached',
                                               'breaker_tripped', 'breaker_reset', 'forgotten', 'setting_changed')),
    job_id     uuid,
    queue_id   bigint,
    output_url text,                     -- redacted
    actor      text NOT NULL,
    detail     text,
    cycle_id   bigint
);
CREATE INDEX audit_log_at ON orphan_cleanup.audit_log (at);
CREATE INDEX audit_log_job ON orphan_cleanup.audit_log (job_id);

-- The reapers that claim from this queue, as each last described itself to claim(): what it
-- serves (its buckets and hosts, and its own host), how many rows it was handed, and which ready
-- rows its latest short claim left to other reapers. With orphan_cleanup.refusals, health()
-- names a reaper whose lists leave ready rows to others or whose own allow-list refused rows:
-- a staging reaper pointed at production, an old deployment still running.
CREATE TABLE orphan_cleanup.reapers (
    reaper             text PRIMARY KEY,     -- the worker id it claims with
    buckets            text[],               -- NULL: it did not say (serves every bucket)
    hosts              text[],               -- NULL: it did not say (an older reaper: every host)
    home               text,                 -- its SUPABASE_URL's host; NULL: it did not say
    first_seen_at      timestamptz NOT NULL DEFAULT now(),
    last_claim_at      timestamptz NOT NULL DEFAULT now(),
    claimed            bigint NOT NULL DEFAULT 0,   -- rows handed to it (bookkeeping a busy row skips)
    passed_over        bigint NOT NULL DEFAULT 0,   -- ready rows its latest short claim left: not its bucket or host
    passed_over_what   text,                        -- which, e.g. 'renders @ staging.example.com'
    passed_over_at     timestamptz                  -- when a claim last left any
);

-- Rows a reaper refused with refuse(): claim() never hands them to that reaper again, so a
-- misconfigured reaper cannot take the same rows over and over, and another reaper gets them.
CREATE TABLE orphan_cleanup.refusals (
    queue_id   bigint NOT NULL,
    refused_by text NOT NULL,
    reason     text NOT NULL,
    at         timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (queue_id, refused_by)
);
CREATE INDEX refusals_at ON orphan_cleanup.refusals (at);

-- One row per storage object (bucket and key, however a URL spells it) that a claim, a save or a
-- job write has touched: the unit of the save guarantee. A save and a write that points a job at
-- an object create the row if it is missing and lock it; a claim locks it and writes the
-- hand-out. So they conflict at every isolation level (a snapshot read would not see a claim
-- that committed after the snapshot; a row version it cannot see fails it with 40001).
-- handouts > 0: a claim handed the object to a reaper, so a delete may have been sent; no job
-- naming it can be saved from then on. Retiring, re-queuing, job cleanup and history pruning
-- never lower it. How long a row lives: see _prune_objects() (detect.sql).
CREATE TABLE orphan_cleanup.objects (
    bucket              text NOT NULL,
    object_path         text NOT NULL,
    handouts            integer NOT NULL DEFAULT 0,   -- claims that may have sent a delete
    first_handed_out_at timestamptz,
    last_handed_out_at  timestamptz,
    last_handed_to      text,                         -- the worker id of the latest claim
    last_queue_id       bigint,                       -- the queue row it handed out
    kept_at             timestamptz,                  -- cancel() kept the object: never handed out
    kept_by             text,
    touched_at          timestamptz NOT NULL DEFAULT now(),
    forget_at           timestamptz,                  -- handed out: when _prune_objects() looks at it next
    PRIMARY KEY (bucket, object_path)
);
CREATE INDEX objects_untainted ON orphan_cleanup.objects (touched_at) WHERE handouts = 0 AND kept_at IS NULL;
-- Handed-out objects by when _prune_objects() looks at them next (30 days after the latest
-- hand-out, then daily while something still names them), so that it never walks past the ones
-- it is not due to look at. Kept ones (cancel()) are never forgotten and are not in it.
CREATE INDEX objects_handed_out ON orphan_cleanup.objects (forget_at) WHERE handouts > 0 AND kept_at IS NULL;

-- The row a save of a job, an INSERT of the job, and a write that points the job at a
-- handed-out object all write: their conflict is what stops a saved job from being pointed at a
-- deleted file, at every isolation level, even when the save comes before the job row exists.
-- Pruned after a day.
CREATE TABLE orphan_cleanup.job_fences (
    job_id     uuid PRIMARY KEY,
    touched_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX job_fences_touched_at ON orphan_cleanup.job_fences (touched_at);

-- The savings ledger: what queue rows said, per UTC day, once history_retention has pruned
-- them (savings_report() reads this and the rows still in the queue, so a report is the same
-- before and after a prune). `found` and `found_bytes` by the day a row was queued (the bytes of
-- the ones later deleted: an object's size is known once storage deletes it), `deleted` and
-- `deleted_bytes` by the day it was deleted.
CREATE TABLE orphan_cleanup.savings_ledger (
    day           date NOT NULL,
    kind          text NOT NULL CHECK (kind IN ('orphan', 'stray')),
    found         bigint NOT NULL DEFAULT 0,
    found_bytes   bigint NOT NULL DEFAULT 0,
    deleted       bigint NOT NULL DEFAULT 0,
    deleted_bytes bigint NOT NULL DEFAULT 0,
    PRIMARY KEY (day, kind)
);

-- Counts saves refused by the save guard. A refused save rolls its transaction back, audit row
-- included; a sequence is not transactional, so the count survives.
CREATE SEQUENCE orphan_cleanup.refused_saves;

-- The queue and the history are data, not extension objects: pg_dump must keep them.
SELECT pg_catalog.pg_extension_config_dump('orphan_cleanup.attachment', '');
SELECT pg_catalog.pg_extension_config_dump('orphan_cleanup.detector_state', '');
SELECT pg_catalog.pg_extension_config_dump('orphan_cleanup.recheck', '');
SELECT pg_catalog.pg_extension_config_dump('orphan_cleanup.cycle_log', '');
SELECT pg_catalog.pg_extension_config_dump('orphan_cleanup.cycle_log_id_seq', '');
SELECT pg_catalog.pg_extension_config_dump('orphan_cleanup.deletion_queue', '');
SELECT pg_catalog.pg_extension_config_dump('orphan_cleanup.deletion_queue_id_seq', '');
SELECT pg_catalog.pg_extension_config_dump('orphan_cleanup.audit_log', '');
SELECT pg_catalog.pg_extension_config_dump('orphan_cleanup.audit_log_id_seq', '');
SELECT pg_catalog.pg_extension_config_dump('orphan_cleanup.refused_saves', '');
SELECT pg_catalog.pg_extension_config_dump('orphan_cleanup.reapers', '');
SELECT pg_catalog.pg_extension_config_dump('orphan_cleanup.refusals', '');
SELECT pg_catalog.pg_extension_config_dump('orphan_cleanup.objects', '');
SELECT pg_catalog.pg_extension_config_dump('orphan_cleanup.job_fences', '');
SELECT pg_catalog.pg_extension_config_dump('orphan_cleanup.savings_ledger', '');

-- Whether a comma-separated list setting names nothing: '', ' ' and ' , ' all read as empty,
-- as the URL parser reads the allow-lists (a raw = '' test let ' ' through).
CREATE FUNCTION orphan_cleanup._no_entries(list text) RETURNS boolean
LANGUAGE sql IMMUTABLE PARALLEL SAFE
RETURN pg_catalog.translate(COALESCE(list, ''), E', \t\r\n', '') OPERATOR(pg_catalog.=) '';

-- A reference to a job, whatever its spelling: the first uuid in the text (32 hex digits, with or
-- without the hyphens of 8-4-4-4-12, and no hex digit right before or after), case folded, as
-- the canonical uuid text; failing that, the first 32 hex digits in a row with hyphens ignored;
-- NULL when there are none. So upper case, braces, spaces (a no-break space too), a `urn:uuid:`
-- prefix, an id JSON-encoded twice, or a prefix ending in a hex digit and a hyphen (`id-`,
-- `job-`, `v2-`) all name the job: a saved asset must protect its job's file however the app
-- spelled the id (the reviews of issue 14 found each of these read as no reference, or as
-- another job's). Reading too much as a reference only keeps a file. Plain SQL and fully
-- qualified, so the planner inlines it and an index on it is usable.
CREATE FUNCTION orphan_cleanup.job_ref_key(ref text) RETURNS text
LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE
RETURN pg_catalog.regexp_replace(
    coalesce(
        pg_catalog.replace(
            (pg_catalog.regexp_match(pg_catalog.lower(ref),
                '(?:^|[^0-9a-f])([0-9a-f]{8}-?[0-9a-f]{4}-?[0-9a-f]{4}-?[0-9a-f]{4}-?[0-9a-f]{12})(?![0-9a-f])'))[1],
            '-', ''),
        (pg_catalog.regexp_match(pg_catalog.replace(pg_catalog.lower(ref), '-', ''), '[0-9a-f]{32}'))[1]),
    '^(.{8})(.{4})(.{4})(.{4})(.{12})$', '\1-\2-\3-\4-\5');
