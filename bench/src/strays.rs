//! What reconciling stray objects costs as `storage.objects` grows (issue 15): a database
//! holding N objects, nine in ten named by a job and one in ten a stray, as a project that has
//! leaked for a while holds them. Cycles reconcile with `reclaim_strays` on:
//! - the full pass, spread over as many cycles as it takes, each within `cycle_time_budget`
//!   (its cost from `cycle_log.stray_ms`, apart from the cycle's jobs);
//! - a look by creation time after it, when 1,000 objects have just become old enough: it must
//!   read those, not the table;
//! - an idle cycle, nothing new.

use std::time::Instant;

use anyhow::{bail, Result};
use postgres::Client;
use serde::Serialize;

use crate::detection::reload;
use crate::{create_indexes, psql_client, Env, Install};

#[derive(Serialize, Debug)]
pub struct StrayResult {
    pub objects: u64,
    pub jobs: u64,
    pub strays: u64,
    pub budget_ms: i64,
    /// The full pass: cycles it took, their reconciliation time summed and the longest.
    pub full_pass_cycles: i64,
    pub full_pass_ms: f64,
    pub full_pass_objects_per_second: f64,
    pub longest_cycle_stray_ms: f64,
    pub full_pass_enqueued: i64,
    /// A look by creation time over `new_objects` just old enough.
    pub new_objects: i64,
    pub by_time_scanned: i64,
    pub by_time_enqueued: i64,
    pub by_time_ms: f64,
    pub idle_stray_ms: f64,
    /// preview_strays(max_rows => 100) on the full table, wall time.
    pub preview_ms: f64,
}

/// storage.objects as Supabase Storage keeps it (the columns reconciliation reads, and the
/// unique index every project has).
const STORAGE_SCHEMA: &str = "
CREATE SCHEMA storage;
CREATE TABLE storage.objects (
    id uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    bucket_id text,
    name text,
    owner uuid,
    owner_id text,
    metadata jsonb,
    version text,
    created_at timestamptz DEFAULT now(),
    updated_at timestamptz DEFAULT now(),
    last_accessed_at timestamptz DEFAULT now()
);
CREATE UNIQUE INDEX bucketid_objname ON storage.objects (bucket_id, name);
CREATE INDEX name_prefix_search ON storage.objects (name text_pattern_ops);";

/// One cycle: its status and its reconciliation (pass, objects looked at, queued, ms).
fn cycle(c: &mut Client) -> Result<(String, String, i64, i64, f64)> {
    let status: String = c
        .query_one("SELECT status FROM orphan_cleanup.run_cycle()", &[])?
        .get(0);
    let r = c.query_one(
        "SELECT coalesce(stray_pass, ''), strays_scanned, strays_enqueued, coalesce(stray_ms, 0)::float8
         FROM orphan_cleanup.cycle_log ORDER BY id DESC LIMIT 1",
        &[],
    )?;
    Ok((status, r.get(0), r.get(1), r.get(2), r.get(3)))
}

pub fn strays(env: &Env, objects: u64) -> Result<StrayResult> {
    let jobs = objects / 10 * 9;
    let strays = objects - jobs;
    let mut admin = psql_client(env, "postgres")?;
    admin.batch_execute("DROP DATABASE IF EXISTS bench_strays WITH (FORCE)")?;
    admin.batch_execute("CREATE DATABASE bench_strays")?;
    let settings = [
        ("allowed_buckets", "renders"),
        ("allowed_hosts", "bench.supabase.co"),
        ("enabled", "off"),
        ("reclaim_strays", "on"),
        ("max_per_cycle", "10000000"),
        ("breaker_min_rows", "10000000"),
        ("full_sweep_interval", "1d"),
    ];
    reload(&mut admin, &settings)?;
    let mut c = psql_client(env, "bench_strays")?;
    c.batch_execute(&std::fs::read_to_string(
        env.root.join("sql/app_schema.sql"),
    )?)?;
    c.batch_execute("CREATE EXTENSION pg_orphan_cleanup")?;
    c.batch_execute(STORAGE_SCHEMA)?;
    // Jobs still running (no orphans among them: the cycles' job side stays idle), each naming
    // its object; a month old, as their files are.
    c.batch_execute(&format!(
        "INSERT INTO render_jobs (status, output_url, created_at)
         SELECT 'running', format('https://bench.supabase.co/storage/v1/object/public/renders/out/%s/%s.png', g % 1000, g),
                now() - interval '30 days'
         FROM generate_series(1, {jobs}) AS g;
         INSERT INTO storage.objects (bucket_id, name, metadata, version, created_at, updated_at)
         SELECT 'renders', format('out/%s/%s.png', g % 1000, g), jsonb_build_object('size', 250000 + g % 1000),
                gen_random_uuid()::text, now() - interval '30 days' + g * interval '1 millisecond',
                now() - interval '30 days' + g * interval '1 millisecond'
         FROM generate_series(1, {objects}) AS g;
         CREATE INDEX objects_created_at ON storage.objects (created_at);
         ANALYZE;"
    ))?;
    c.query("SELECT * FROM orphan_cleanup.attach()", &[])?;
    create_indexes(env, &mut c, Install::Current)?;
    c.batch_execute("ANALYZE")?;
    let budget_ms: i64 = c
        .query_one(
            "SELECT (extract(epoch FROM current_setting('orphan_cleanup.cycle_time_budget')::interval) * 1000)::bigint",
            &[],
        )?
        .get(0);

    let mut preview_ms = 0.0;
    {
        let t = Instant::now();
        let n = c
            .query(
                "SELECT 1 FROM orphan_cleanup.preview_strays(max_rows => 100)",
                &[],
            )?
            .len();
        if n != 100.min(strays as usize) {
            bail!("preview_strays() listed {n} strays");
        }
        preview_ms += t.elapsed().as_secs_f64() * 1000.0;
    }
    let (mut cycles, mut total_ms, mut longest, mut enqueued) = (0i64, 0.0f64, 0.0f64, 0i64);
    loop {
        let (status, pass, _, n, ms) = cycle(&mut c)?;
        if status != "ok" {
            bail!("a cycle of the full pass: {status} ({pass})");
        }
        cycles += 1;
        total_ms += ms;
        longest = longest.max(ms);
        enqueued += n;
        let ended: bool = c
            .query_one(
                "SELECT stray_pass_bucket IS NULL FROM orphan_cleanup.detector_state",
                &[],
            )?
            .get(0);
        if ended {
            break;
        }
        if cycles > 100_000 {
            bail!("the full pass did not end");
        }
    }
    if enqueued != strays as i64 {
        bail!("the full pass queued {enqueued} strays, expected {strays}");
    }

    // Objects that have just become old enough since the pass began its looks by creation time.
    let new_objects = 1000i64;
    c.batch_execute(&format!(
        "INSERT INTO storage.objects (bucket_id, name, metadata, version, created_at, updated_at)
         SELECT 'renders', format('new/%s.png', g), jsonb_build_object('size', 1000), gen_random_uuid()::text,
                s.ts + g * interval '1 microsecond', s.ts + g * interval '1 microsecond'
         FROM generate_series(1, {new_objects}) AS g, (SELECT stray_seen_ts AS ts FROM orphan_cleanup.detector_state) AS s;
         ANALYZE storage.objects;"
    ))?;
    let (status, pass, by_time_scanned, by_time_enqueued, by_time_ms) = cycle(&mut c)?;
    if status != "ok" || pass != "by creation time" {
        bail!("the look by creation time: {status} ({pass})");
    }
    let (_, _, _, idle_enqueued, idle_stray_ms) = cycle(&mut c)?;
    if idle_enqueued != 0 {
        bail!("the idle cycle queued {idle_enqueued} strays");
    }
    admin.batch_execute("ALTER SYSTEM RESET ALL")?;
    admin.batch_execute("SELECT pg_reload_conf()")?;
    drop(c);
    admin.batch_execute("DROP DATABASE IF EXISTS bench_strays WITH (FORCE)")?;
    Ok(StrayResult {
        objects,
        jobs,
        strays,
        budget_ms,
        full_pass_cycles: cycles,
        full_pass_ms: total_ms,
        full_pass_objects_per_second: objects as f64 / (total_ms / 1000.0),
        longest_cycle_stray_ms: longest,
        full_pass_enqueued: enqueued,
        new_objects,
        by_time_scanned,
        by_time_enqueued,
        by_time_ms,
        idle_stray_ms,
        preview_ms,
    })
}
