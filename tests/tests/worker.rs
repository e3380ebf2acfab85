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
        || {
            c.query_one(
                "SELECT count(*) FROM orphan_cleanup.deletion_queue WHERE state = 'pending'",
                &[],
            )
            .unwrap()
            .get::<_, i64>(0)
                == 1
        },
    );
    wait_for(Duration::from_secs(60), "several worker cycles", || {
        worker_cycles(&mut c, "ok") >= 3
    });
    let health: String = c
        .query_one(
            "SELECT status FROM orphan_cleanup.health() WHERE check_name = 'worker'",
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
