-- The Storage API's inventory (issue 15). Reconciliation needs the list of objects storage holds.
-- On Supabase that is storage.objects, in this database. Where it is not here (storage keeps its
-- metadata in another database, a restore without the storage schema, a storage server run
-- apart from this database), `reaper inventory` lists each allowed bucket through the Storage API
-- (POST /object/list, page by page, folder by folder) into object_inventory, and reconciliation
-- reads that instead. The table is shaped like storage.objects (the columns reconciliation and
-- claim() read), so that one query serves both.
--
-- A listing is a snapshot. What makes it safe to act on: claim() re-checks every stray against the
-- jobs table in its own snapshot and records the hand-out on the object, so a job naming the
-- object, written before or after the listing, keeps it or can never be saved (the per-object
-- record). What a listing cannot see: an object uploaded again under the same name after it was
-- listed keeps the listing's age until the next listing (README, Known limitations).

-- One listing of one bucket by `reaper inventory`: begun, finished (then rows it did not see are
-- removed: those objects are gone), or abandoned (a reaper stopped half-way; the rows it added
-- stay, and the next finished listing removes the ones it does not see).
CREATE TABLE orphan_cleanup.inventory_listings (
    id          bigserial PRIMARY KEY,
    bucket      text NOT NULL,
    listed_by   text NOT NULL,
    started_at  timestamptz NOT NULL DEFAULT now(),
    finished_at timestamptz,
    objects     bigint NOT NULL DEFAULT 0,
    removed     bigint
);

-- The objects the listings saw, as storage.objects would hold them. `version` is not in the
-- API's answer: it is the eTag and the time of the last upload, so that an object uploaded again
-- (an upsert keeps its id) is another version, and a queued stray of the old one goes stale.
CREATE TABLE orphan_cleanup.object_inventory (
    bucket_id  text NOT NULL,
    name       text NOT NULL,
    id         uuid NOT NULL,
    version    text,
    metadata   jsonb,
    created_at timestamptz NOT NULL,
    updated_at timestamptz,
    listing    bigint NOT NULL,
    PRIMARY KEY (bucket_id, name)
);
-- Looks by creation time between full passes (see _reconcile_strays()).
CREATE INDEX object_inventory_created_at ON orphan_cleanup.object_inventory (created_at, id);

SELECT pg_catalog.pg_extension_config_dump('orphan_cleanup.inventory_listings', '');
SELECT pg_catalog.pg_extension_config_dump('orphan_cleanup.inventory_listings_id_seq', '');
SELECT pg_catalog.pg_extension_config_dump('orphan_cleanup.object_inventory', '');

-- The buckets `reaper inventory` lists: the allowed ones (orphan_cleanup.allowed_buckets), since
-- only those hold objects a cycle may queue. Refused while storage.objects is in this database:
-- reconciliation reads that, and a listing would never be read.
CREATE FUNCTION orphan_cleanup.inventory_buckets() RETURNS SETOF text
LANGUAGE plpgsql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    PERFORM orphan_cleanup._no_api_inventory_here();
    RETURN QUERY SELECT unnest(orphan_cleanup._allowed_bucket_list());
END
$$;

-- Refuses an API listing where storage.objects is in this database.
CREATE FUNCTION orphan_cleanup._no_api_inventory_here() RETURNS void
LANGUAGE plpgsql STABLE SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    IF pg_catalog.to_regclass('storage.objects') IS NOT NULL THEN
        RAISE EXCEPTION 'storage.objects is in this database: reconciliation reads it, and needs no listing through the Storage API'
            USING ERRCODE = 'object_not_in_prerequisite_state',
                  HINT = 'Stop `reaper inventory`; SELECT * FROM orphan_cleanup.health() shows whether strays can be read.';
    END IF;
END
$$;

-- Begins a listing of `bucket` by `worker`; returns its id, for inventory_add() and
-- inventory_finish().
CREATE FUNCTION orphan_cleanup.inventory_begin(worker text, bucket text) RETURNS bigint
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_id bigint;
BEGIN
    PERFORM orphan_cleanup._check_worker(worker);
    PERFORM orphan_cleanup._no_api_inventory_here();
    IF bucket IS NULL OR NOT bucket = ANY (orphan_cleanup._allowed_bucket_list()) THEN
        RAISE EXCEPTION 'bucket % is not in orphan_cleanup.allowed_buckets (%): only allowed buckets are listed',
                        coalesce(quote_literal(bucket), 'NULL'), array_to_string(orphan_cleanup._allowed_bucket_list(), ', ')
            USING ERRCODE = 'invalid_parameter_value',
                  HINT = 'List the buckets SELECT * FROM orphan_cleanup.inventory_buckets() returns (reaper inventory does).';
    END IF;
    INSERT INTO orphan_cleanup.inventory_listings (bucket, listed_by) VALUES (bucket, worker) RETURNING id INTO v_id;
    RETURN v_id;
END
$$;

-- The listing `listing` if it is still open, else an error naming why.
CREATE FUNCTION orphan_cleanup._open_listing(listing bigint) RETURNS orphan_cleanup.inventory_listings
LANGUAGE plpgsql STABLE SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    l orphan_cleanup.inventory_listings;
BEGIN
    SELECT * INTO l FROM orphan_cleanup.inventory_listings AS i WHERE i.id = listing;
    IF NOT FOUND OR l.finished_at IS NOT NULL THEN
        RAISE EXCEPTION 'listing % is %', coalesce(listing::text, 'NULL'), CASE WHEN l.id IS NULL THEN 'unknown' ELSE 'finished' END
            USING ERRCODE = 'invalid_parameter_value',
                  HINT = 'Begin a listing with inventory_begin(worker, bucket) and pass the id it returns.';
    END IF;
    RETURN l;
END
$$;

-- Adds one page of a listing: a JSON array of objects as POST /object/list answers them, each
-- with its full `name` (the folder's prefix included), `id`, `created_at`, `updated_at` and
-- `metadata` (size, eTag). Folders (id null) are the caller's to walk, and refused here. An
-- object this extension saw deleted after the listing began, and not uploaded again since, is
-- skipped: the page was read before the delete. Returns how many objects it recorded.
CREATE FUNCTION orphan_cleanup.inventory_add(listing bigint, objects jsonb) RETURNS integer
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    l orphan_cleanup.inventory_listings;
    v_bad jsonb;
    n integer;
BEGIN
    l := orphan_cleanup._open_listing(listing);
    IF current_setting('transaction_isolation') <> 'read committed' THEN
        RAISE EXCEPTION 'inventory_add() must run at READ COMMITTED isolation, not %', current_setting('transaction_isolation')
            USING ERRCODE = 'invalid_transaction_state',
                  HINT = 'Its check of what was deleted meanwhile needs a snapshot taken after its lock; call it in its own transaction.';
    END IF;
    IF jsonb_typeof(objects) IS DISTINCT FROM 'array' THEN
        RAISE EXCEPTION 'objects must be a JSON array of objects as POST /object/list answers them, got %',
                        coalesce(jsonb_typeof(objects), 'NULL') USING ERRCODE = 'invalid_parameter_value';
    END IF;
    SELECT o INTO v_bad FROM jsonb_array_elements(objects) AS o
    WHERE jsonb_typeof(o) IS DISTINCT FROM 'object'
       OR coalesce(o ->> 'name', '') = '' OR o ->> 'name' LIKE '%/' OR o ->> 'name' LIKE '/%'
       OR coalesce(o ->> 'id', '') !~* '^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$'
       OR o ->> 'created_at' IS NULL
    LIMIT 1;
    IF v_bad IS NOT NULL THEN
        RAISE EXCEPTION 'not an object of bucket %''s listing (it needs a full name, a uuid id and created_at): %', l.bucket, left(v_bad::text, 300)
            USING ERRCODE = 'invalid_parameter_value',
                  HINT = 'Folders (id null) are listed by their own prefix, not added.';
    END IF;
    -- A confirm() in flight forgets the objects it deleted (a ROW EXCLUSIVE lock on this table):
    -- wait for it, so that the INSERT below, with a snapshot taken after this lock, sees its
    -- deletions and does not bring those objects back (the review of extra references).
    LOCK TABLE orphan_cleanup.object_inventory IN SHARE ROW EXCLUSIVE MODE;
    BEGIN
        INSERT INTO orphan_cleanup.object_inventory AS i (bucket_id, name, id, version, metadata, created_at, updated_at, listing)
        SELECT l.bucket, o ->> 'name', (o ->> 'id')::uuid,
               concat_ws('@', o -> 'metadata' ->> 'eTag', extract(epoch FROM coalesce(o ->> 'updated_at', o ->> 'created_at')::timestamptz)::text),
               o -> 'metadata', (o ->> 'created_at')::timestamptz, (o ->> 'updated_at')::timestamptz, l.id
        FROM (SELECT DISTINCT ON (o ->> 'name') o FROM jsonb_array_elements(objects) AS o) AS p(o)
        WHERE NOT EXISTS (SELECT 1 FROM orphan_cleanup.deletion_queue AS d
                          WHERE d.bucket = l.bucket AND d.object_path = p.o ->> 'name'
                            AND d.state IN ('deleted', 'absent') AND d.finished_at >= l.started_at
                            AND d.finished_at >= greatest((p.o ->> 'created_at')::timestamptz, (p.o ->> 'updated_at')::timestamptz))
        ON CONFLICT (bucket_id, name) DO UPDATE
            SET id = excluded.id, version = excluded.version, metadata = excluded.metadata,
                created_at = excluded.created_at, updated_at = excluded.updated_at, listing = excluded.listing;
        GET DIAGNOSTICS n = ROW_COUNT;
    EXCEPTION WHEN invalid_datetime_format OR datetime_field_overflow OR invalid_text_representation THEN
        RAISE EXCEPTION 'objects of bucket %''s listing must give created_at and updated_at as timestamps: %', l.bucket, SQLERRM
            USING ERRCODE = 'invalid_parameter_value';
    END;
    UPDATE orphan_cleanup.inventory_listings AS i SET objects = i.objects + n WHERE i.id = l.id;
    RETURN n;
END
$$;

-- Finishes a listing: the bucket's rows that no later listing saw are removed (storage no longer
-- holds them), and older listings of the bucket still open are closed. Returns how many rows it
-- removed.
CREATE FUNCTION orphan_cleanup.inventory_finish(listing bigint) RETURNS bigint
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    l orphan_cleanup.inventory_listings;
    n bigint;
BEGIN
    l := orphan_cleanup._open_listing(listing);
    DELETE FROM orphan_cleanup.object_inventory AS i WHERE i.bucket_id = l.bucket AND i.listing < l.id;
    GET DIAGNOSTICS n = ROW_COUNT;
    UPDATE orphan_cleanup.inventory_listings AS i
       SET finished_at = now(), removed = CASE WHEN i.id = l.id THEN n END
     WHERE i.bucket = l.bucket AND i.finished_at IS NULL AND i.id <= l.id;
    RETURN n;
END
$$;

-- The objects storage holds, for reconciliation: storage.objects where it is in this database,
-- else object_inventory once a listing of some bucket has finished; NULL before that.
CREATE FUNCTION orphan_cleanup._inventory() RETURNS regclass
LANGUAGE plpgsql STABLE SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    IF pg_catalog.to_regclass('storage.objects') IS NOT NULL THEN
        RETURN pg_catalog.to_regclass('storage.objects');
    ELSIF EXISTS (SELECT 1 FROM orphan_cleanup.inventory_listings WHERE finished_at IS NOT NULL) THEN
        RETURN 'orphan_cleanup.object_inventory'::regclass;
    END IF;
    RETURN NULL;
END
$$;

-- health()'s 'strays' check where strays are read from the Storage API's listing: when each
-- allowed bucket was last listed. A warning when one never was, or not for two days: a stray
-- waits for the listing after its upload, and a listing of a stale inventory reclaims nothing new.
CREATE FUNCTION orphan_cleanup._listing_health(OUT status text, OUT detail text)
LANGUAGE plpgsql STABLE SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_never text;
    v_stale text;
    v_last text;
BEGIN
    SELECT string_agg(b.bucket, ', ') FILTER (WHERE l.finished_at IS NULL),
           string_agg(b.bucket, ', ') FILTER (WHERE l.finished_at < now() - interval '2 days'),
           string_agg(format('%s at %s (%s objects)', b.bucket, date_trunc('second', l.finished_at), l.objects), ', ')
               FILTER (WHERE l.finished_at IS NOT NULL)
      INTO v_never, v_stale, v_last
    FROM unnest(orphan_cleanup._allowed_bucket_list()) AS b(bucket)
    LEFT JOIN LATERAL (SELECT i.finished_at, i.objects FROM orphan_cleanup.inventory_listings AS i
                       WHERE i.bucket = b.bucket AND i.finished_at IS NOT NULL AND i.removed IS NOT NULL
                       ORDER BY i.id DESC LIMIT 1) AS l ON true;
    status := CASE WHEN v_never IS NULL AND v_stale IS NULL THEN 'ok' ELSE 'warning' END;
    detail := concat_ws('; ',
        'reconciled from the listing through the Storage API (reaper inventory), storage.objects not being in this database'
            || coalesce(': last listed ' || v_last, ''),
        'never listed: ' || v_never || ' (run `reaper inventory`)',
        'not listed for two days: ' || v_stale || ' (run `reaper inventory` daily, e.g. from cron)');
END
$$;
