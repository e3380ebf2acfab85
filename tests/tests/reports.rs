//! The guide's validation queries as functions, health(), the NOTIFY wake-up, the log lines the
//! guide's monitoring checklist looks for, and life without shared_preload_libraries.

use std::time::Duration;

use e2e::postgres::fallible_iterator::FallibleIterator;
use e2e::*;

fn seeded(name: &str) -> TestDb {
    settings(BASE_SETTINGS);
    let db = TestDb::attached(name);
    let mut c = db.client();
    for (i, age) in [
        "1 day", "1 day", "2 days", "3 days", "3 days", "3 days", "10 days",
    ]
    .iter()
    .enumerate()
    {
        job(
            &mut c,
            "completed",
            Some(&public_url("renders", &format!("r/{i}.png"))),
            age,
            "orphan",
        );
    }
    let saved = job(
        &mut c,
        "completed",
        Some(&public_url("renders", "r/saved.png")),
        "1 day",
        "saved",
    );
    save(&mut c, "generated_saved", &saved.0).unwrap();
    c.batch_execute("INSERT INTO user_assets (asset_type, file_size) VALUES ('avatar', 500), ('upload', 700), ('upload', 800)").unwrap();
    db
}

#[test]
fn daily_orphans_is_the_guides_weekly_query() {
    let db = seeded("reports_daily");
    let mut c = db.client();
    let guide: Vec<(i64, String)> = c
        .query(
            // The guide's step 6A query, with created_at qualified: as printed it is ambiguous
            // (user_assets has a created_at too) and PostgreSQL rejects it.
            "SELECT COUNT(*) as orphaned_jobs, DATE_TRUNC('day', rj.created_at)::date::text as day
             FROM render_jobs rj
             LEFT JOIN user_assets ua ON ua.metadata->>'render_job_id' = rj.id::text
             WHERE rj.status = 'completed' AND rj.output_url IS NOT NULL AND ua.id IS NULL
               AND rj.created_at > NOW() - INTERVAL '7 days'
             GROUP BY DATE_TRUNC('day', rj.created_at) ORDER BY day DESC",
            &[],
        )
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    let ours: Vec<(i64, String)> = c
        .query(
            "SELECT orphaned_jobs, day::text FROM orphan_cleanup.daily_orphans(7)",
            &[],
        )
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    assert_eq!(ours, guide);
    assert_eq!(
        ours.iter().map(|(n, _)| n).sum::<i64>(),
        6,
        "the 10-day-old orphan is outside the week"
    );
    let err = c
        .query("SELECT * FROM orphan_cleanup.daily_orphans(0)", &[])
        .unwrap_err();
    assert!(db_error(&err).contains("days must be between 1 and 3660"));
}

#[test]
fn storage_usage_is_the_guides_trend_query() {
    let db = seeded("reports_usage");
    let mut c = db.client();
    let rows: Vec<(String, i64, String)> = c
        .query("SELECT asset_type, total_assets, total_bytes::text FROM orphan_cleanup.storage_usage() ORDER BY asset_type", &[])
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect();
    assert_eq!(
        rows,
        vec![
            ("avatar".to_string(), 1, "500".to_string()),
            ("generated_saved".to_string(), 1, "1000".to_string()),
            ("upload".to_string(), 2, "1500".to_string())
        ]
    );
    c.batch_execute("ALTER TABLE user_assets DROP COLUMN file_size")
        .unwrap();
    let err = c
        .query("SELECT * FROM orphan_cleanup.storage_usage()", &[])
        .unwrap_err();
    assert!(
        db_error(&err).contains("needs column(s) file_size on public.user_assets"),
        "{}",
        db_error(&err)
    );
}

#[test]
fn validation_report_splits_the_guides_count() {
    let db = seeded("reports_validation");
    let mut c = db.client();
    let claimed_job = job(
        &mut c,
        "completed",
        Some(&public_url("renders", "r/claimed.png")),
        "2 hours",
        "orphan",
    );
    cycle(&mut c);
    let ids: Vec<i64> = c
        .query(
            "SELECT id FROM orphan_cleanup.deletion_queue WHERE job_id = $1::text::uuid",
            &[&claimed_job.0],
        )
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    c.execute("UPDATE orphan_cleanup.deletion_queue SET available_at = now() + interval '1 day' WHERE id <> $1", &[&ids[0]]).unwrap();
    assert_eq!(claim(&mut c, "w1", 10).ids, ids);
    let report: std::collections::HashMap<String, Option<i64>> = c
        .query(
            "SELECT metric, value FROM orphan_cleanup.validation_report()",
            &[],
        )
        .unwrap()
        .iter()
        .map(|r| (r.get::<_, String>(0).trim().to_string(), r.get(1)))
        .collect();
    assert_eq!(report["orphaned jobs (guide definition)"], Some(8));
    assert_eq!(report["queued"], Some(7));
    assert_eq!(report["in flight"], Some(1));
    assert_eq!(report["saved assets"], Some(1));
    assert_eq!(report["jobs in the last hour"], Some(0));
    assert_eq!(report["orphans older than 5 minutes"], Some(8));
}

#[test]
fn health_says_what_is_wrong() {
    settings(&[]);
    let db = TestDb::create("reports_health");
    let mut c = db.client();
    let status = |c: &mut postgres::Client, check: &str| -> (String, String) {
        let r = c
            .query_one(
                "SELECT status, detail FROM orphan_cleanup.health() WHERE check_name = $1",
                &[&check],
            )
            .unwrap();
        (r.get(0), r.get(1))
    };
    assert_eq!(status(&mut c, "attached").0, "critical");
    assert!(status(&mut c, "attached")
        .1
        .contains("orphan_cleanup.attach()"));
    assert_eq!(status(&mut c, "allowed buckets").0, "critical");
    assert_eq!(status(&mut c, "last cycle").0, "warning");
    db.attach();
    assert_eq!(status(&mut c, "DDL watch").0, "ok");
    c.batch_execute("ALTER EVENT TRIGGER orphan_cleanup_guard_watch DISABLE")
        .unwrap();
    assert_eq!(status(&mut c, "DDL watch").0, "warning");
    c.batch_execute("ALTER EVENT TRIGGER orphan_cleanup_guard_watch ENABLE ALWAYS")
        .unwrap();
    c.batch_execute("DROP INDEX render_jobs_object_keys_idx")
        .unwrap();
    let (st, detail) = status(&mut c, "index: jobs by storage object");
    assert_eq!(st, "critical");
    assert!(detail.contains("CREATE INDEX CONCURRENTLY render_jobs_object_keys_idx ON public.render_jobs USING gin (orphan_cleanup.object_keys(output_url)) WITH (fastupdate = off);"), "{detail}");
    c.batch_execute("CREATE INDEX CONCURRENTLY render_jobs_object_keys_idx ON public.render_jobs USING gin (orphan_cleanup.object_keys(output_url)) WITH (fastupdate = off)")
        .unwrap();
    settings(BASE_SETTINGS);
    job(
        &mut c,
        "completed",
        Some("https://other.example.com/storage/v1/object/public/renders/x.png"),
        "2 hours",
        "rejected",
    );
    cycle(&mut c);
    assert_eq!(status(&mut c, "rejected URLs").0, "warning");
    assert_eq!(status(&mut c, "last cycle").0, "ok");
    let worst: String = c
        .query_one("SELECT health FROM orphan_cleanup.queue_status()", &[])
        .unwrap()
        .get(0);
    assert_eq!(worst, "warning");
}

#[test]
fn cycles_that_enqueue_notify_the_reapers() {
    let db = seeded("reports_notify");
    let mut listener = db.client();
    listener
        .batch_execute("LISTEN orphan_cleanup_queue")
        .unwrap();
    let mut c = db.client();
    cycle(&mut c);
    let mut got = Vec::new();
    wait_for(Duration::from_secs(30), "the NOTIFY", || {
        listener.batch_execute("SELECT 1").unwrap();
        let mut notes = listener.notifications();
        let mut pending = notes.iter();
        while let Some(n) = pending.next().unwrap() {
            got.push((n.channel().to_string(), n.payload().to_string()));
        }
        !got.is_empty()
    });
    assert_eq!(
        got,
        vec![("orphan_cleanup_queue".to_string(), "7".to_string())]
    );
    cycle(&mut c);
    listener.batch_execute("SELECT 1").unwrap();
    assert_eq!(
        listener.notifications().iter().count().unwrap(),
        0,
        "a cycle that enqueues nothing stays quiet"
    );
}

#[test]
fn the_server_log_has_the_guides_cycle_lines() {
    let db = seeded("reports_log");
    let mut c = db.client();
    let id: i64 = c
        .query_one("SELECT cycle_id FROM orphan_cleanup.run_cycle()", &[])
        .unwrap()
        .get(0);
    let log_path = std::env::var("PGOC_DIR")
        .map(|d| format!("{d}/postgres.log"))
        .unwrap_or_else(|_| format!("/tmp/pg_orphan_cleanup-{}/postgres.log", port()));
    wait_for(Duration::from_secs(30), "the cycle's log lines", || {
        let log = std::fs::read_to_string(&log_path).unwrap_or_default();
        log.contains(&format!("Starting comprehensive cleanup cycle (pg_orphan_cleanup cycle {id}"))
            && log.contains(&format!("Comprehensive cleanup cycle completed (pg_orphan_cleanup cycle {id}): found 7, enqueued 7"))
    });
}

#[test]
fn without_shared_preload_libraries_everything_but_the_worker_works() {
    let port = port() + 1;
    let cluster = OwnCluster::start(port, &[("PGOC_PRELOAD", "0")]);
    let dsn = format!("host=127.0.0.1 port={port} user=postgres dbname=postgres");
    let mut c = postgres::Client::connect(&dsn, postgres::NoTls).unwrap();
    let preload: String = c
        .query_one("SHOW shared_preload_libraries", &[])
        .unwrap()
        .get(0);
    assert_eq!(preload, "");
    install_app(&mut c);
    c.batch_execute("ALTER SYSTEM SET orphan_cleanup.allowed_buckets = 'renders'")
        .unwrap();
    c.batch_execute(&format!(
        "ALTER SYSTEM SET orphan_cleanup.allowed_hosts = '{HOST}'"
    ))
    .unwrap();
    c.batch_execute("SELECT pg_reload_conf()").unwrap();
    // The library is not preloaded: load it so SHOW knows the setting, in a new session each
    // time until the reload has reached them.
    wait_for(
        Duration::from_secs(30),
        "the settings to be reloaded",
        || {
            let mut n = postgres::Client::connect(&dsn, postgres::NoTls).unwrap();
            n.batch_execute("LOAD 'pg_orphan_cleanup'").unwrap();
            n.query_one("SHOW orphan_cleanup.allowed_buckets", &[])
                .unwrap()
                .get::<_, String>(0)
                == "renders"
        },
    );
    let mut c = postgres::Client::connect(&dsn, postgres::NoTls).unwrap();
    c.query("SELECT * FROM orphan_cleanup.attach()", &[])
        .unwrap();
    let a = job(
        &mut c,
        "completed",
        Some(&public_url("renders", "np/a.png")),
        "2 hours",
        "orphan",
    );
    let b = job(
        &mut c,
        "completed",
        Some(&public_url("renders", "np/b.png")),
        "2 hours",
        "orphan",
    );
    assert_eq!(cycle(&mut c).2, 2);
    let ids = claim(&mut c, "w1", 1);
    assert_eq!(ids.len(), 1);
    let claimed: String = c
        .query_one(
            "SELECT job_id::text FROM orphan_cleanup.deletion_queue WHERE id = $1",
            &[&ids[0]],
        )
        .unwrap()
        .get(0);
    let (claimed_job, other) = if claimed == a.0 { (a, b) } else { (b, a) };
    assert_eq!(
        save(&mut c, "generated_saved", &claimed_job.0)
            .unwrap_err()
            .code()
            .unwrap()
            .code(),
        "OC001"
    );
    save(&mut c, "generated_saved", &other.0).unwrap();
    assert_eq!(queue_states(&mut c, &other), vec!["rescued"]);
    // No worker here: the scheduler is whoever ran the last cycle (this test).
    let scheduler: String = c
        .query_one(
            "SELECT detail FROM orphan_cleanup.health() WHERE check_name = 'scheduler'",
            &[],
        )
        .unwrap()
        .get(0);
    assert!(
        scheduler.starts_with("cycles run by postgres"),
        "{scheduler}"
    );
    let refused: i64 = c
        .query_one(
            "SELECT value FROM orphan_cleanup.validation_report() WHERE metric = 'saves refused'",
            &[],
        )
        .unwrap()
        .get(0);
    assert_eq!(refused, 1, "counted even without shared memory");
    drop(c);
    cluster.destroy();
}
