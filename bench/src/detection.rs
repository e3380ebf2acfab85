//! Detection at scale: the guide's count query against `orphan_count()`, the first cycle over the
//! whole backlog, the steady-state cycle that runs every few minutes forever, a full sweep, and
//! the CPU time of a cycle that finds nothing. And what issue 13 asks to keep honest: what a DBA
//! who skipped the indexes gets, how long building them takes, and the longest transaction a
//! cycle holds while it works off a backlog under the default time budget.

use std::time::Instant;

use anyhow::{bail, Result};
use postgres::Client;
use serde::Serialize;

use crate::Env;

#[derive(Serialize, Debug)]
pub struct DetectionResult {
    pub jobs: u64,
    pub guide_count_ms: f64,
    pub orphan_count_ms: f64,
    pub backlog_orphans: i64,
    pub first_cycle_ms: f64,
    pub first_cycle_orphans_per_second: f64,
    /// The cycle right after the backlog, which finds nothing new but analyzes the tables the
    /// backlog filled (once: their statistics then count the rows): kept apart from the
    /// steady state, which it would otherwise dominate.
    pub after_backlog_cycle_ms: f64,
    /// The 100 saves of the steady-state step (one INSERT, the save guard on every row), made
    /// while the whole backlog is queued: a save looks the queue up for rows to rescue.
    pub saves_during_backlog_ms: f64,
    /// 100 new orphans and 100 new saves since the last cycle.
    pub steady_cycle_ms: f64,
    pub steady_cycle_enqueued: i64,
    pub full_sweep_ms: f64,
    /// Wall time, and CPU time of the backend (10 ms clock ticks), of one cycle that finds nothing.
    pub idle_cycle_ms: f64,
    pub idle_cycle_cpu_ms: f64,
    /// The guide's step 7B emergency DELETE (100 job rows per statement), run until it deletes
    /// nothing or its time budget (BENCH_GUIDE_DELETE_SECONDS, default 300) is spent: the rows
    /// it removed of those its count found, the statements it took, and its wall time. It
    /// deletes job rows only, leaving their files behind: a baseline for detection speed alone.
    pub guide_delete_rows: i64,
    pub guide_delete_of: i64,
    pub guide_delete_finished: bool,
    pub guide_delete_statements: u64,
    pub guide_delete_ms: f64,
    pub guide_delete_rows_per_second: f64,
    pub no_indexes: NoIndexes,
    pub index_builds: Vec<IndexBuild>,
    pub budgeted_backlog: BudgetedBacklog,
}

/// The same data before the recommended indexes exist (the app's own, and the guide's index on
/// `metadata ->> 'render_job_id'`, are there): the guide's count, and how a cycle and a claim
/// answer.
#[derive(Serialize, Debug)]
pub struct NoIndexes {
    pub guide_count_ms: f64,
    /// The cycle's status ('failed': refused) and whether its error names the statements.
    pub cycle_status: String,
    pub cycle_ms: f64,
    pub cycle_names_statements: bool,
    /// Whether claim() refused, and how long it took to say so.
    pub claim_refused: bool,
    pub claim_ms: f64,
}

/// One `CREATE INDEX CONCURRENTLY` of `sql/indexes.sql`, timed.
#[derive(Serialize, Debug)]
pub struct IndexBuild {
    pub index: String,
    pub seconds: f64,
}

/// The backlog worked off by cycles under the default `cycle_time_budget` (and no row cap):
/// how many cycles it took, and the longest one (its transaction).
#[derive(Serialize, Debug)]
pub struct BudgetedBacklog {
    pub budget_ms: i64,
    pub cycles: i64,
    pub enqueued: i64,
    pub longest_cycle_ms: f64,
    pub total_ms: f64,
}

const GUIDE_COUNT: &str = "
    SELECT COUNT(*)
    FROM render_jobs rj
    LEFT JOIN user_assets ua ON ua.metadata->>'render_job_id' = rj.id::text
    WHERE rj.status = 'completed' AND rj.output_url IS NOT NULL AND ua.id IS NULL
      AND rj.created_at < NOW() - INTERVAL '1 hour'";

/// The guide's step 7B "emergency manual cleanup", verbatim.
const GUIDE_DELETE: &str = "
    DELETE FROM render_jobs
    WHERE id IN (
      SELECT rj.id
      FROM render_jobs rj
      LEFT JOIN user_assets ua ON ua.metadata->>'render_job_id' = rj.id::text
      WHERE rj.status = 'completed'
        AND rj.output_url IS NOT NULL
        AND ua.id IS NULL
        AND rj.created_at < NOW() - INTERVAL '1 hour'
      LIMIT 100
    )";

fn timed<T>(f: impl FnOnce() -> Result<T>) -> Result<(T, f64)> {
    let started = Instant::now();
    let v = f()?;
    Ok((v, started.elapsed().as_secs_f64() * 1000.0))
}

/// The settings detection runs under: no worker, no cap, the given full-sweep interval and
/// time budget (an hour: the first cycle is measured whole; the default: the budgeted backlog).
fn settings<'a>(full_sweep_interval: &'a str, budget: &'a str) -> [(&'a str, &'a str); 6] {
    [
        ("allowed_buckets", "renders"),
        ("allowed_hosts", "bench.supabase.co"),
        ("max_per_cycle", "10000000"),
        ("enabled", "off"),
        ("full_sweep_interval", full_sweep_interval),
        ("cycle_time_budget", budget),
    ]
}

/// What a cycle and a claim answer before the recommended indexes exist.
fn without_indexes(c: &mut Client) -> Result<NoIndexes> {
    let (_, guide_count_ms) = timed(|| Ok(c.query_one(GUIDE_COUNT, &[])?.get::<_, i64>(0)))?;
    let ((cycle_status, cycle_names_statements), cycle_ms) = timed(|| {
        let status: String = c
            .query_one("SELECT status FROM orphan_cleanup.run_cycle()", &[])?
            .get(0);
        let error: Option<String> = c
            .query_one(
                "SELECT error FROM orphan_cleanup.cycle_log ORDER BY id DESC LIMIT 1",
                &[],
            )?
            .get(0);
        Ok((
            status,
            error.is_some_and(|e| e.contains("CREATE INDEX CONCURRENTLY")),
        ))
    })?;
    let (claim_refused, claim_ms) = timed(|| {
        Ok(
            c.query("SELECT * FROM orphan_cleanup.claim('bench', 1000)", &[])
                .is_err_and(|e| {
                    e.as_db_error()
                        .is_some_and(|d| d.message().contains("CREATE INDEX CONCURRENTLY"))
                }),
        )
    })?;
    Ok(NoIndexes {
        guide_count_ms,
        cycle_status,
        cycle_ms,
        cycle_names_statements,
        claim_refused,
        claim_ms,
    })
}

/// The statements of `sql/indexes.sql`, each timed.
fn build_indexes(env: &Env, c: &mut Client) -> Result<Vec<IndexBuild>> {
    let mut out = Vec::new();
    for stmt in crate::index_statements(env, crate::Install::Current)? {
        let index = stmt
            .split_whitespace()
            .skip_while(|w| *w != "EXISTS")
            .nth(1)
            .unwrap_or("?")
            .to_string();
        let (_, ms) = timed(|| Ok(c.batch_execute(&stmt)?))?;
        out.push(IndexBuild {
            index,
            seconds: ms / 1000.0,
        });
    }
    Ok(out)
}

/// Cycles under the default time budget until the backlog is queued; then the queue is emptied
/// and a full sweep made due again, so that the first cycle is measured on the same backlog.
fn budgeted_backlog(admin: &mut Client, c: &mut Client) -> Result<BudgetedBacklog> {
    admin.batch_execute("ALTER SYSTEM RESET orphan_cleanup.cycle_time_budget")?;
    reload(admin, &[])?;
    let budget_ms: i64 = c
        .query_one(
            "SELECT cycle_time_budget_ms::bigint FROM orphan_cleanup._config()",
            &[],
        )?
        .get(0);
    let first: i64 = c
        .query_one(
            "SELECT coalesce(max(id), 0) FROM orphan_cleanup.cycle_log",
            &[],
        )?
        .get(0);
    let started = Instant::now();
    loop {
        let r = c.query_one(
            "SELECT status, cycle_id FROM orphan_cleanup.run_cycle()",
            &[],
        )?;
        let (status, id): (String, i64) = (r.get(0), r.get(1));
        if status != "ok" {
            bail!("a budgeted backlog cycle: {status}");
        }
        let out_of_time: bool = c
            .query_one(
                "SELECT out_of_time FROM orphan_cleanup.cycle_log WHERE id = $1",
                &[&id],
            )?
            .get(0);
        if !out_of_time {
            break;
        }
    }
    let total_ms = started.elapsed().as_secs_f64() * 1000.0;
    let r = c.query_one(
        "SELECT count(*), sum(enqueued)::bigint, max(duration_ms)::float8 FROM orphan_cleanup.cycle_log WHERE id > $1",
        &[&first],
    )?;
    c.batch_execute(
        "TRUNCATE orphan_cleanup.deletion_queue, orphan_cleanup.audit_log;
         UPDATE orphan_cleanup.detector_state SET sweep_started_at = NULL;",
    )?;
    Ok(BudgetedBacklog {
        budget_ms,
        cycles: r.get(0),
        enqueued: r.get(1),
        longest_cycle_ms: r.get(2),
        total_ms,
    })
}

pub(crate) fn reload(admin: &mut Client, settings: &[(&str, &str)]) -> Result<()> {
    for (name, value) in settings {
        let sql: String = admin
            .query_one(
                "SELECT format('ALTER SYSTEM SET %I = %L', $1::text, $2::text)",
                &[&format!("orphan_cleanup.{name}"), value],
            )?
            .get(0);
        admin.batch_execute(&sql)?;
    }
    admin.batch_execute("SELECT pg_reload_conf()")?;
    std::thread::sleep(std::time::Duration::from_millis(500));
    Ok(())
}

/// CPU time a backend has run, in milliseconds: the scheduler's nanosecond count from
/// /proc/PID/schedstat (the tick counts in /proc/PID/stat are 10 ms coarse).
fn backend_cpu_ms(pid: i32) -> Result<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/schedstat"))?;
    let ns: f64 = stat
        .split_whitespace()
        .next()
        .and_then(|v| v.parse().ok())
        .ok_or_else(|| anyhow::anyhow!("unreadable /proc/{pid}/schedstat: {stat:?}"))?;
    Ok(ns / 1e6)
}

pub fn detection(env: &Env, jobs: u64) -> Result<DetectionResult> {
    let mut admin = crate::psql_client(env, "postgres")?;
    admin.batch_execute("DROP DATABASE IF EXISTS bench_detect WITH (FORCE)")?;
    admin.batch_execute("CREATE DATABASE bench_detect")?;
    reload(&mut admin, &settings("1d", "1h"))?;
    let mut c = crate::psql_client(env, "bench_detect")?;
    c.batch_execute(&std::fs::read_to_string(
        env.root.join("sql/app_schema.sql"),
    )?)?;
    c.batch_execute("CREATE EXTENSION pg_orphan_cleanup")?;
    let data = std::fs::read_to_string(env.root.join("sql/generate_data.sql"))?
        .replace(":'base'", "'https://bench.supabase.co'")
        .replace(":jobs", &jobs.to_string());
    c.batch_execute(&data)?;
    c.batch_execute("ANALYZE")?;
    c.query("SELECT * FROM orphan_cleanup.attach()", &[])?;
    let no_indexes = without_indexes(&mut c)?;
    let index_builds = build_indexes(env, &mut c)?;
    c.batch_execute("ANALYZE")?;
    let budgeted = budgeted_backlog(&mut admin, &mut c)?;
    reload(&mut admin, &settings("1d", "1h"))?;

    let (guide, guide_count_ms) = timed(|| Ok(c.query_one(GUIDE_COUNT, &[])?.get::<_, i64>(0)))?;
    let (ours, orphan_count_ms) = timed(|| {
        Ok(c.query_one("SELECT orphan_cleanup.orphan_count()", &[])?
            .get::<_, i64>(0))
    })?;
    if guide != ours {
        bail!("orphan_count() = {ours}, the guide's query = {guide}");
    }

    let cycle = |c: &mut Client| -> Result<(String, i64)> {
        let r = c.query_one(
            "SELECT status, enqueued FROM orphan_cleanup.run_cycle()",
            &[],
        )?;
        Ok((r.get(0), r.get(1)))
    };
    let ((status, backlog), first_cycle_ms) = timed(|| cycle(&mut c))?;
    if status != "ok" {
        bail!("first cycle: {status}");
    }
    let (_, after_backlog_cycle_ms) = timed(|| cycle(&mut c))?;

    // Steady state: 100 new orphans just old enough, and 100 new saves, since the last cycle.
    c.batch_execute(
        "INSERT INTO render_jobs (status, output_url, created_at)
         SELECT 'completed', format('https://bench.supabase.co/storage/v1/object/public/renders/new/%s.png', g),
                now() - interval '1 hour 1 millisecond'
         FROM generate_series(1, 100) AS g;
         CREATE TEMP TABLE to_save AS
         SELECT id FROM render_jobs WHERE status = 'completed' ORDER BY random() LIMIT 100;",
    )?;
    let (_, saves_during_backlog_ms) = timed(|| {
        Ok(c.batch_execute(
            "INSERT INTO user_assets (asset_type, metadata)
             SELECT 'generated_saved', jsonb_build_object('render_job_id', id::text) FROM to_save",
        )?)
    })?;
    std::thread::sleep(std::time::Duration::from_millis(5));
    let ((_, steady_enqueued), steady_cycle_ms) = timed(|| cycle(&mut c))?;

    // Idle: nothing new; CPU time of this backend.
    let pid: i32 = c.query_one("SELECT pg_backend_pid()", &[])?.get(0);
    let before = backend_cpu_ms(pid)?;
    let ((_, idle_enqueued), idle_cycle_ms) = timed(|| cycle(&mut c))?;
    let idle_cycle_cpu_ms = backend_cpu_ms(pid)? - before;
    if idle_enqueued != 0 {
        bail!("the idle cycle queued {idle_enqueued} rows: it was not idle");
    }

    // A full sweep re-reads the whole history.
    reload(&mut admin, &settings("0", "1h"))?;
    let (_, full_sweep_ms) = timed(|| cycle(&mut c))?;
    admin.batch_execute("ALTER SYSTEM RESET ALL")?;
    reload(&mut admin, &[])?;

    // The guide's baseline last, since it deletes job rows: 100 per statement until none is left.
    let remaining: i64 = c.query_one(GUIDE_COUNT, &[])?.get(0);
    let budget = std::time::Duration::from_secs(
        std::env::var("BENCH_GUIDE_DELETE_SECONDS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(300),
    );
    let started = Instant::now();
    let ((guide_delete_rows, guide_delete_statements, guide_delete_finished), guide_delete_ms) =
        timed(|| {
            let (mut rows, mut statements) = (0i64, 0u64);
            loop {
                let n = c.execute(GUIDE_DELETE, &[])?;
                statements += 1;
                rows += n as i64;
                if n == 0 {
                    return Ok((rows, statements, true));
                }
                if started.elapsed() > budget {
                    return Ok((rows, statements, false));
                }
            }
        })?;
    if guide_delete_finished && guide_delete_rows != remaining {
        bail!("the guide's DELETE removed {guide_delete_rows} rows, its count said {remaining}");
    }

    Ok(DetectionResult {
        jobs,
        guide_count_ms,
        orphan_count_ms,
        backlog_orphans: backlog,
        first_cycle_ms,
        first_cycle_orphans_per_second: backlog as f64 / (first_cycle_ms / 1000.0),
        after_backlog_cycle_ms,
        saves_during_backlog_ms,
        steady_cycle_ms,
        steady_cycle_enqueued: steady_enqueued,
        full_sweep_ms,
        idle_cycle_ms,
        idle_cycle_cpu_ms,
        guide_delete_rows,
        guide_delete_of: remaining,
        guide_delete_finished,
        guide_delete_statements,
        guide_delete_ms,
        guide_delete_rows_per_second: guide_delete_rows as f64 / (guide_delete_ms / 1000.0),
        no_indexes,
        index_builds,
        budgeted_backlog: budgeted,
    })
}
