-- Pause points: named places where work waits while a session holds the point's advisory lock.
--
-- Tests that must act "in the middle of a cycle" (a power cut, a terminated backend) cannot
-- hope to catch that moment by polling: a cycle may finish before anyone looks. Instead the test
-- takes pg_advisory_lock(7310247, hashtext('cycle')), the cycle waits at that point with its
-- work done and not yet committed, the test sees it waiting (pg_locks), acts, and lets go.
--
-- Off unless orphan_cleanup.pause_points names the point, and even then a point waits only
-- while someone holds its lock. The points:
--   analyzed  run_cycle(), after it analyzed stale tables, before the cycle's work
--   cycle     run_cycle(), after the cycle's work, before it is recorded and committed
--   claim     claim(), after it handed rows out, before it returns (and its caller commits)
CREATE FUNCTION orphan_cleanup._pause_point(point text) RETURNS void
LANGUAGE plpgsql VOLATILE SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    IF point = ANY (string_to_array(replace(current_setting('orphan_cleanup.pause_points', true), ' ', ''), ',')) THEN
        PERFORM pg_advisory_xact_lock_shared(7310247, hashtext(point));
    END IF;
END
$$;
