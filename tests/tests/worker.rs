//! The background worker on a real cluster. The test cluster's worker works in the `postgres`
//! database (orphan_cleanup.database), so these tests set the app up there.

use std::time::Duration;

use e2e::*;

fn worker_cycles(c: &mut postgres::Client, status: &str) -> i64 {
    c.query_one(
        "SELECT count(*) FROM orphan_cleanup.cycle_log WHERE actor = 'worker' AND status = $1",
        &[&status],
    )
    .unwrap()
    .get(0)
}

fn pending(c: &mut postgres::Client) -> i64 {
    c.query_one(
        "SELECT count(*) FROM orphan_cleanup.deletion_queue WHERE state = 'pending'",
        &[],
    )
    .unwrap()
    .get(0)
}

#[test]
fn the_worker_runs_cycles_reloads_settings_pauses_survives_errors_and_restarts() {
    settings(&[
        ("allowed_buckets", "renders"),
        ("allowed_hosts", HOST),
        ("enabled", "off"),
    ]);
    let mut admin = connect("postgres");
    teardown_postgres_db(&mut admin);

    // Without the extension the worker waits quietly: it stays up, with the same pid.
    wait_for(Duration::from_secs(15), "the worker to be running", || {
        worker_pid(&mut admin).is_some()
    });
    let waiting_pid = worker_pid(&mut admin);
    settings(&[
        ("allowed_buckets", "renders"),
        ("allowed_hosts", HOST),
        ("interval", "1s"),
    ]);
    wait_worker(
        &mut admin,
        "waiting: run CREATE EXTENSION pg_orphan_cleanup",
    );
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(
        worker_pid(&mut admin),
        waiting_pid,
        "no crash loop while the extension is missing"
    );

    // With the extension, it runs cycles at the interval and fills the queue.
    let mut c = setup_postgres_db();
    job(
        &mut c,
        "completed",
        Some(&public_url("renders", "w/1.png")),
        "2 hours",
        "orphan",
    );
    wait_for(
        Duration::from_secs(60),
        "the worker to queue the orphan",
        || pending(&mut c) == 1,
    );
    wait_for(Duration::from_secs(60), "several worker cycles", || {
        worker_cycles(&mut c, "ok") >= 3
    });
    let health: String = c
        .query_one(
            "SELECT status FROM orphan_cleanup.health() WHERE check_name = 'scheduler'",
            &[],
        )
        .unwrap()
        .get(0);
    assert_eq!(health, "ok");

    // enabled = off pauses it.
    settings(&[
        ("allowed_buckets", "renders"),
        ("allowed_hosts", HOST),
        ("interval", "1s"),
        ("enabled", "off"),
    ]);
    // Once the worker says it is paused, it has read the reload: no cycle may start after that.
    wait_worker(&mut c, "paused: orphan_cleanup.enabled = off");
    let paused_at = worker_cycles(&mut c, "ok");
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(
        worker_cycles(&mut c, "ok"),
        paused_at,
        "no cycles while disabled"
    );

    // A failing cycle is recorded, and the worker carries on.
    settings(&[("interval", "1s")]);
    wait_for(
        Duration::from_secs(60),
        "a failed cycle (no allowed buckets)",
        || worker_cycles(&mut c, "failed") >= 2,
    );
    let pid = worker_pid(&mut c);
    settings(&[
        ("allowed_buckets", "renders"),
        ("allowed_hosts", HOST),
        ("interval", "1s"),
    ]);
    let before = worker_cycles(&mut c, "ok");
    wait_for(Duration::from_secs(60), "cycles to succeed again", || {
        worker_cycles(&mut c, "ok") > before
    });
    assert_eq!(
        worker_pid(&mut c),
        pid,
        "the same worker process survived the failing cycles"
    );

    // Terminated, it comes back.
    let old = pid.unwrap();
    let terminated: bool = c
        .query_one("SELECT pg_terminate_backend($1)", &[&old])
        .unwrap()
        .get(0);
    assert!(terminated);
    wait_for(Duration::from_secs(30), "the worker to come back", || {
        worker_pid(&mut c).is_some_and(|p| p != old)
    });
    let before = worker_cycles(&mut c, "ok");
    wait_for(Duration::from_secs(60), "cycles after the restart", || {
        worker_cycles(&mut c, "ok") > before
    });

    settings(&[]);
    teardown_postgres_db(&mut c);
}

#[test]
fn a_second_cycle_started_while_one_runs_is_skipped_at_once() {
    settings(BASE_SETTINGS);
    let db = TestDb::attached("worker_skip");
    let mut a = db.client();
    let mut b = db.client();
    let mut tx = a.transaction().unwrap();
    let first: String = tx
        .query_one("SELECT status FROM orphan_cleanup.run_cycle()", &[])
        .unwrap()
        .get(0);
    assert_eq!(first, "ok");
    // The first cycle's transaction is still open and holds the cycle lock.
    let second: String = b
        .query_one("SELECT status FROM orphan_cleanup.run_cycle()", &[])
        .unwrap()
        .get(0);
    assert_eq!(second, "skipped");
    tx.commit().unwrap();
    let logged: i64 = b
        .query_one(
            "SELECT count(*) FROM orphan_cleanup.cycle_log WHERE status = 'skipped'",
            &[],
        )
        .unwrap()
        .get(0);
    assert_eq!(logged, 1);
}

/// The worker's SIGTERM is PostgreSQL's own `die`: pg_terminate_backend and a fast shutdown end
/// a running cycle at the next interrupt check, its work rolls back as a crash's would, and the
/// worker started again completes the cycles that follow. The cycle is made long on purpose: a
/// backlog of 150,000 orphans and a time budget of an hour.
#[test]
fn a_long_cycle_ends_at_once_on_terminate_and_on_fast_shutdown_and_nothing_is_lost() {
    const N: i64 = 150_000;
    let long_cycles = || {
        let mut s = BASE_SETTINGS.to_vec();
        s.extend([
            ("interval", "1s"),
            ("max_per_cycle", "10000000"),
            ("cycle_time_budget", "1h"),
        ]);
        settings(&s);
    };
    let mut s = BASE_SETTINGS.to_vec();
    s.push(("enabled", "off"));
    settings(&s);
    let mut c = connect("postgres");
    teardown_postgres_db(&mut c);
    install_app(&mut c);
    backlog(&mut c, N, "long");
    c.query("SELECT * FROM orphan_cleanup.attach()", &[])
        .unwrap();
    let queued = |c: &mut postgres::Client| -> i64 {
        c.query_one("SELECT count(*) FROM orphan_cleanup.deletion_queue", &[])
            .unwrap()
            .get(0)
    };
    // Waits until the worker is a second into its cycle, then returns its pid.
    let in_a_long_cycle = |c: &mut postgres::Client| -> i32 {
        wait_worker(c, "running a cleanup cycle");
        std::thread::sleep(Duration::from_secs(1));
        worker_pid(c).unwrap()
    };

    // A fast shutdown while the cycle runs.
    long_cycles();
    in_a_long_cycle(&mut c);
    drop(c);
    let started = std::time::Instant::now();
    let stop = std::process::Command::new(repo_root().join("scripts/cluster.sh"))
        .arg("stop")
        .status()
        .unwrap();
    let took = started.elapsed();
    assert!(stop.success());
    assert!(
        took < Duration::from_secs(5),
        "a fast shutdown waited {took:?} for the cycle"
    );
    let start = std::process::Command::new(repo_root().join("scripts/cluster.sh"))
        .arg("start")
        .status()
        .unwrap();
    assert!(start.success());
    let mut c = connect("postgres");
    assert_eq!(queued(&mut c), 0, "the stopped cycle's work rolled back");

    // pg_terminate_backend while the cycle runs.
    let pid = in_a_long_cycle(&mut c);
    let started = std::time::Instant::now();
    assert!(c
        .query_one("SELECT pg_terminate_backend($1)", &[&pid])
        .unwrap()
        .get::<_, bool>(0));
    wait_for(
        Duration::from_secs(3),
        "the terminated worker to exit",
        || {
            c.query_one(
                "SELECT count(*) FROM pg_stat_activity WHERE pid = $1",
                &[&pid],
            )
            .unwrap()
            .get::<_, i64>(0)
                == 0
        },
    );
    let took = started.elapsed();
    assert_eq!(queued(&mut c), 0, "the terminated cycle's work rolled back");
    assert_eq!(
        c.query_one(
            "SELECT count(*) FROM orphan_cleanup.cycle_log WHERE status = 'running'",
            &[]
        )
        .unwrap()
        .get::<_, i64>(0),
        0,
        "no cycle is left looking as if it ran"
    );

    // The worker comes back, and its cycles (a second each now) queue every orphan once. The
    // interval is an hour: a cycle that ran out of time is carried on at the next tick.
    let mut s = BASE_SETTINGS.to_vec();
    s.extend([
        ("interval", "1h"),
        ("max_per_cycle", "10000000"),
        ("cycle_time_budget", "1s"),
    ]);
    settings(&s);
    wait_for(Duration::from_secs(600), "the backlog to be queued", || {
        queued(&mut c) == N
    });
    let (distinct, cycles): (i64, i64) = c
        .query_one(
            "SELECT (SELECT count(DISTINCT job_id) FROM orphan_cleanup.deletion_queue),
                    (SELECT count(*) FROM orphan_cleanup.cycle_log WHERE actor = 'worker' AND status = 'ok' AND enqueued > 0)",
            &[],
        )
        .map(|r| (r.get(0), r.get(1)))
        .unwrap();
    assert_eq!(distinct, N);
    // The work the terminated cycle had ahead of it took several one-second cycles: a worker
    // that ignored the signal would not have exited within the 3 s waited above.
    assert!(
        cycles >= 4,
        "the backlog took {cycles} cycles; make it longer"
    );
    eprintln!(
        "terminated worker exited after {took:?}; the backlog then took {cycles} cycles of 1 s"
    );

    settings(&[]);
    teardown_postgres_db(&mut c);
}

/// Without a usable index the worker starts no cycle: it says why once in the server log (with
/// the statement to run), shows it in pg_stat_activity, records no failed cycles, and resumes
/// by itself once the index exists.
#[test]
fn without_the_indexes_the_worker_says_so_once_waits_and_resumes_by_itself() {
    let mut s = BASE_SETTINGS.to_vec();
    s.push(("enabled", "off"));
    settings(&s);
    let mut c = setup_postgres_db();
    job(
        &mut c,
        "completed",
        Some(&public_url("renders", "w/idx.png")),
        "2 hours",
        "orphan",
    );
    c.batch_execute("DROP INDEX render_jobs_object_keys_idx")
        .unwrap();
    let log_path = std::env::var("PGOC_DIR")
        .map(|d| format!("{d}/postgres.log"))
        .unwrap_or_else(|_| format!("/tmp/pg_orphan_cleanup-{}/postgres.log", port()));
    let log_len = std::fs::metadata(&log_path).map(|m| m.len()).unwrap_or(0) as usize;
    let refusals = || {
        let log = std::fs::read(&log_path).unwrap_or_default();
        String::from_utf8_lossy(&log[log_len.min(log.len())..])
            .matches("pg_orphan_cleanup worker: cycles refused: the indexes pg_orphan_cleanup relies on are not usable (index: jobs by storage object: missing)")
            .count()
    };

    let mut s = BASE_SETTINGS.to_vec();
    s.push(("interval", "1s"));
    settings(&s);
    wait_worker(
        &mut c,
        "waiting: an index pg_orphan_cleanup relies on is missing or unusable",
    );
    // Ten chances to repeat itself (it looks again every 10 s; interval is 1 s).
    std::thread::sleep(Duration::from_secs(12));
    assert_eq!(refusals(), 1, "the refusal is logged once");
    let log = std::fs::read(&log_path).unwrap_or_default();
    assert!(String::from_utf8_lossy(&log[log_len.min(log.len())..]).contains(
        "CREATE INDEX CONCURRENTLY render_jobs_object_keys_idx ON public.render_jobs USING gin (orphan_cleanup.object_keys(output_url)) WITH (fastupdate = off);"
    ));
    let cycles: i64 = c
        .query_one("SELECT count(*) FROM orphan_cleanup.cycle_log", &[])
        .unwrap()
        .get(0);
    assert_eq!(cycles, 0, "no cycle was started, so none failed");

    c.batch_execute(
        "CREATE INDEX CONCURRENTLY render_jobs_object_keys_idx ON public.render_jobs USING gin (orphan_cleanup.object_keys(output_url)) WITH (fastupdate = off)",
    )
    .unwrap();
    wait_for(
        Duration::from_secs(60),
        "the worker to queue the orphan",
        || pending(&mut c) == 1,
    );
    settings(&[]);
    teardown_postgres_db(&mut c);
}

#[test]
fn what_the_worker_writes_is_counted_so_that_its_tables_get_analyzed() {
    // A backend reports what it inserted, updated and deleted when it goes idle; a background
    // worker never goes idle that way and reports only when it asks to. Until it does, autovacuum
    // and the extension's own _refresh_statistics() do not know that a backlog cycle wrote
    // 20,000 queue rows, and the queue keeps the statistics of an empty table.
    const N: i64 = 20_000;
    let mut s = BASE_SETTINGS.to_vec();
    s.push(("enabled", "off"));
    settings(&s);
    let mut c = setup_postgres_db();
    backlog(&mut c, N, "counted");
    let inserted = |c: &mut postgres::Client| -> i64 {
        c.query_one(
            "SELECT pg_stat_get_tuples_inserted('orphan_cleanup.deletion_queue'::regclass)",
            &[],
        )
        .unwrap()
        .get(0)
    };
    assert_eq!(inserted(&mut c), 0);

    let mut s = BASE_SETTINGS.to_vec();
    s.push(("interval", "1s"));
    s.push(("max_per_cycle", "1000000"));
    s.push(("cycle_time_budget", "1h"));
    settings(&s);
    wait_for(
        Duration::from_secs(60),
        "the worker to queue the backlog",
        || pending(&mut c) == N,
    );
    wait_for(
        Duration::from_secs(10),
        "the worker's inserts to be counted",
        || {
            c.batch_execute("SELECT pg_stat_clear_snapshot()").unwrap();
            inserted(&mut c) >= N
        },
    );
    // And so the queue's statistics are put right (by the worker's next cycle or autovacuum).
    wait_for(
        Duration::from_secs(30),
        "the queue's statistics to count its rows",
        || {
            c.query_one(
                "SELECT reltuples::bigint FROM pg_class WHERE oid = 'orphan_cleanup.deletion_queue'::regclass",
                &[],
            )
            .unwrap()
            .get::<_, i64>(0)
                >= N / 2
        },
    );
    settings(&[]);
    teardown_postgres_db(&mut c);
}
