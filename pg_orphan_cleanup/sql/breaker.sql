-- The blast-radius circuit breaker: a cycle that would suddenly enqueue far more than usual
-- (a renamed JSON key, an assets table restored from an old backup, a new asset type that
-- references jobs differently) enqueues nothing, and cycles stay stopped until a DBA looks.
--
-- A cycle is compared with two limits, whichever is lower, never below breaker_min_rows:
--   breaker_factor       x the median of the last 10 cycles (since attach()) that were not
--                        working off a backlog (a cycle that enqueued max_per_cycle rows, or
--                        ran out of cycle_time_budget, stopped early, so its count says nothing
--                        about the usual rate);
--   breaker_max_fraction x the completed jobs with an output URL, as the planner estimates them
--                        (reltuples and column statistics: no count(*) per cycle).
-- The breaker arms itself once 3 such cycles exist: the first backlog after installation runs
-- under max_per_cycle alone.

-- The circuit breaker's limit for the next cycle. max_rows is NULL when no check applies (not
-- armed yet, or both checks turned off).
CREATE FUNCTION orphan_cleanup._breaker_limits(
    att orphan_cleanup.attachment,
    OUT armed boolean, OUT history integer, OUT median numeric, OUT completed_estimate bigint,
    OUT max_rows bigint, OUT explanation text)
-- VOLATILE only because PostgreSQL allows EXPLAIN in no other kind of function: it writes nothing.
LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp SET jit = off
AS $$
DECLARE
    cfg record;
    v_plan json;
    by_median bigint;
    by_fraction bigint;
BEGIN
    SELECT * INTO cfg FROM orphan_cleanup._config();
    SELECT count(*), percentile_cont(0.5) WITHIN GROUP (ORDER BY h.enqueued)
      INTO history, median
      FROM (SELECT l.enqueued
            FROM orphan_cleanup.cycle_log AS l
            WHERE l.status = 'ok' AND l.started_at >= att.attached_at AND l.enqueued < cfg.max_per_cycle
              AND NOT l.out_of_time
            ORDER BY l.id DESC
            LIMIT 10) AS h;
    armed := history >= 3;
    -- The planner's estimate of the deletable population: planning only, nothing is read.
    EXECUTE format('EXPLAIN (FORMAT JSON) SELECT 1 FROM %s AS j WHERE j.status = ''completed'' AND j.output_url IS NOT NULL',
                   att.jobs_oid::regclass)
    INTO v_plan;
    completed_estimate := (v_plan -> 0 -> 'Plan' ->> 'Plan Rows')::numeric::bigint;
    IF armed AND cfg.breaker_factor > 0 THEN
        by_median := ceil(cfg.breaker_factor * median);
    END IF;
    IF armed AND cfg.breaker_max_fraction < 1 AND completed_estimate > 0 THEN
        by_fraction := floor(cfg.breaker_max_fraction * completed_estimate);
    END IF;
    IF by_median IS NOT NULL OR by_fraction IS NOT NULL THEN
        max_rows := greatest(cfg.breaker_min_rows, least(by_median, by_fraction));
    END IF;
    explanation := CASE
        WHEN NOT armed THEN format('not armed yet: %s of the 3 cycles it needs as history (the first backlog runs under max_per_cycle alone)', history)
        WHEN max_rows IS NULL THEN 'off: breaker_factor = 0 and breaker_max_fraction = 1'
        ELSE format('a cycle may enqueue at most %s rows: %s', max_rows,
                    concat_ws(', ', format('breaker_min_rows %s', cfg.breaker_min_rows),
                              CASE WHEN by_median IS NOT NULL
                                   THEN format('breaker_factor %s x median %s of the last %s cycles', cfg.breaker_factor, round(median, 1), history) END,
                              CASE WHEN by_fraction IS NOT NULL
                                   THEN format('breaker_max_fraction %s of about %s completed jobs', cfg.breaker_max_fraction, completed_estimate) END))
    END;
END
$$;

-- Raises OC002 when a cycle has enqueued more than its limit: run_cycle() rolls the cycle back
-- and records the trip. Checked after every chunk, so a runaway cycle stops early.
CREATE FUNCTION orphan_cleanup._check_breaker(p_limit bigint, p_enqueued bigint, p_scanned bigint,
                                              p_rechecked bigint, p_limits text) RETURNS void
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    IF p_limit IS NOT NULL AND p_enqueued > p_limit THEN
        RAISE EXCEPTION 'this cycle would enqueue % rows or more, over its limit of % (% jobs looked at, % of them rechecked because their assets changed); %',
            p_enqueued, p_limit, p_scanned, p_rechecked, p_limits
            USING ERRCODE = 'OC002';
    END IF;
END
$$;

-- The breaker's settings as one value: a trip holds until a DBA resets it or changes these.
CREATE FUNCTION orphan_cleanup._breaker_settings() RETURNS text
LANGUAGE sql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp
RETURN (SELECT format('breaker_factor %s, breaker_min_rows %s, breaker_max_fraction %s',
                      c.breaker_factor, c.breaker_min_rows, c.breaker_max_fraction)
        FROM orphan_cleanup._config() AS c);

-- Records a trip: cycles stay stopped, health() is critical, the audit log says what was seen.
CREATE FUNCTION orphan_cleanup._trip_breaker(p_cycle bigint, p_actor text, p_detail text) RETURNS void
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp SET jit = off
AS $$
BEGIN
    INSERT INTO orphan_cleanup.detector_state DEFAULT VALUES ON CONFLICT (singleton) DO NOTHING;
    UPDATE orphan_cleanup.detector_state
       SET breaker_tripped_at = now(), breaker_detail = p_detail,
           breaker_settings = orphan_cleanup._breaker_settings(), breaker_approved = false;
    INSERT INTO orphan_cleanup.audit_log (action, actor, detail, cycle_id)
    VALUES ('breaker_tripped', p_actor, p_detail, p_cycle);
END
$$;

-- Whether cycles are stopped by a trip. A trip whose limits have since been changed is lifted
-- here (audited): the next cycle runs under the new limits, and trips again if they still hold.
CREATE FUNCTION orphan_cleanup._breaker_tripped(p_actor text, OUT tripped_at timestamptz, OUT detail text)
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp SET jit = off
AS $$
DECLARE
    st orphan_cleanup.detector_state;
    v_now text := orphan_cleanup._breaker_settings();
BEGIN
    SELECT * INTO st FROM orphan_cleanup.detector_state;
    IF st.breaker_tripped_at IS NULL THEN
        RETURN;
    END IF;
    IF st.breaker_settings IS DISTINCT FROM v_now THEN
        UPDATE orphan_cleanup.detector_state
           SET breaker_tripped_at = NULL, breaker_detail = NULL, breaker_settings = NULL;
        INSERT INTO orphan_cleanup.audit_log (action, actor, detail)
        VALUES ('breaker_reset', p_actor,
                format('limits changed from (%s) to (%s); the trip at %s is lifted: %s',
                       st.breaker_settings, v_now, st.breaker_tripped_at, st.breaker_detail));
        RETURN;
    END IF;
    tripped_at := st.breaker_tripped_at;
    detail := st.breaker_detail;
END
$$;

-- DBA: lifts a trip after looking (preview(), validation_report()). The next cycle runs without
-- the breaker, under max_per_cycle alone; audited with who and why.
CREATE FUNCTION orphan_cleanup.reset_breaker(reason text) RETURNS text
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp SET jit = off
AS $$
DECLARE
    st orphan_cleanup.detector_state;
BEGIN
    IF reason IS NULL OR btrim(reason) = '' THEN
        RAISE EXCEPTION 'reset_breaker() needs a reason, for the audit log'
            USING ERRCODE = 'invalid_parameter_value',
                  HINT = 'SELECT orphan_cleanup.reset_breaker(''checked preview(): the assets migration really removed these references'');';
    END IF;
    SELECT * INTO st FROM orphan_cleanup.detector_state FOR UPDATE;
    IF st.breaker_tripped_at IS NULL THEN
        RETURN 'the circuit breaker is not tripped; nothing to reset';
    END IF;
    UPDATE orphan_cleanup.detector_state
       SET breaker_tripped_at = NULL, breaker_detail = NULL, breaker_settings = NULL, breaker_approved = true;
    INSERT INTO orphan_cleanup.audit_log (action, actor, detail)
    VALUES ('breaker_reset', session_user,
            format('%s (the trip at %s: %s)', left(reason, 2000), st.breaker_tripped_at, st.breaker_detail));
    RETURN format('circuit breaker reset by %s; the next cycle runs without it, and so do the cycles that carry on its backlog while they run out of cycle_time_budget (max_per_cycle still applies)', session_user);
END
$$;
