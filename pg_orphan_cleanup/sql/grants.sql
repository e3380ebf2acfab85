-- Privileges, last: nothing in the schema for PUBLIC, the queue API for the reaper's group role.

REVOKE ALL ON SCHEMA orphan_cleanup FROM PUBLIC;
REVOKE ALL ON ALL TABLES IN SCHEMA orphan_cleanup FROM PUBLIC;
REVOKE ALL ON ALL SEQUENCES IN SCHEMA orphan_cleanup FROM PUBLIC;
REVOKE ALL ON ALL FUNCTIONS IN SCHEMA orphan_cleanup FROM PUBLIC;

-- The one exception: the pure functions the recommended indexes on the application tables are
-- built on (object_key() too: the index 0.1.0 recommended may still exist after an upgrade).
-- PostgreSQL checks EXECUTE when it maintains an expression index, so the app's own roles must
-- be able to run them when they insert jobs and assets. Without USAGE on the schema nobody can
-- call them by name.
GRANT EXECUTE ON FUNCTION orphan_cleanup.object_key(text) TO PUBLIC;
GRANT EXECUTE ON FUNCTION orphan_cleanup.object_keys(text) TO PUBLIC;
GRANT EXECUTE ON FUNCTION orphan_cleanup.job_ref_key(text) TO PUBLIC;

GRANT USAGE ON SCHEMA orphan_cleanup TO orphan_cleanup_reaper;
GRANT EXECUTE ON FUNCTION
    orphan_cleanup.claim(text, integer, interval, text[], text[], text),
    orphan_cleanup.confirm(text, text, bigint[], text, bigint[]),
    orphan_cleanup.fail(text, text, bigint[], text, boolean),
    orphan_cleanup.release(text, text, bigint[], text, boolean),
    orphan_cleanup.refuse(text, text, bigint[], text),
    -- The signatures without a lease token only say that one is needed (a reaper older than 0.2.0).
    orphan_cleanup.confirm(text, bigint[], text),
    orphan_cleanup.fail(text, bigint[], text, boolean),
    orphan_cleanup.release(text, bigint[], text),
    orphan_cleanup.refuse(text, bigint[], text),
    orphan_cleanup.peek(integer),
    orphan_cleanup.queue_status(),
    orphan_cleanup.verifies_absence(),
    orphan_cleanup.sent_by_reaper(text, interval),
    -- `reaper report`: totals by day, nothing about single rows.
    orphan_cleanup.savings_report(text, integer),
    -- `reaper inventory`: the Storage API's listing, where storage.objects is not in this
    -- database. A listing can add objects as strays-to-be, but claim() hands a stray out only
    -- while no job names it, as for storage.objects' rows.
    orphan_cleanup.inventory_buckets(),
    orphan_cleanup.inventory_begin(text, text),
    orphan_cleanup.inventory_add(bigint, jsonb),
    orphan_cleanup.inventory_finish(bigint)
TO orphan_cleanup_reaper;

-- One row per call: without this the planner assumes 1000 and overestimates every cycle and
-- claim by orders of magnitude (enough to trigger JIT compilation, which costs more than the work).
ALTER FUNCTION orphan_cleanup.check_output_url(text) ROWS 1;
ALTER FUNCTION orphan_cleanup.parse_output_url(text) ROWS 1;
