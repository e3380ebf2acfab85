-- The managed edition's refused-save notes: none. The extension notes each refused save in
-- shared memory, which outlives the save's rolled-back transaction, and the next cycle writes a
-- `refused` audit row for it. A managed platform gives no shared memory and no autonomous
-- transaction, so here a refused save leaves:
--   - its count, in the sequence orphan_cleanup.refused_saves (a sequence is not rolled back),
--     which health() and the metrics report as the extension's do;
--   - its job id, in the server log: the OC001 error "render job <id> cannot be saved" that the
--     app received (hosted Supabase: Logs > Postgres).
-- No `refused` audit row is written per save. README, "What differs from the extension".

-- Notes nothing: there is nowhere to note it that survives the rollback.
CREATE FUNCTION orphan_cleanup._note_refusal(job uuid, queue_id bigint, actor text) RETURNS boolean
LANGUAGE sql STRICT VOLATILE PARALLEL UNSAFE
RETURN false;

-- Nothing noted, nothing to take.
CREATE FUNCTION orphan_cleanup._take_refusals()
RETURNS TABLE (job_id uuid, queue_id bigint, actor text, unix_micros bigint)
LANGUAGE sql STRICT VOLATILE PARALLEL UNSAFE
BEGIN ATOMIC
    SELECT NULL::uuid, NULL::bigint, NULL::text, NULL::bigint WHERE false;
END;
