//! The blast-radius circuit breaker: a cycle that would suddenly enqueue far more than usual
//! enqueues nothing, and cycles stay stopped until a DBA resets the breaker or raises its limits.

use e2e::*;

/// Queue rows in the database, whatever their state.
fn queued(c: &mut postgres::Client) -> i64 {
    c.query_one("SELECT count(*) FROM orphan_cleanup.deletion_queue", &[])
        .unwrap()
        .get(0)
}

fn audited(c: &mut postgres::Client, action: &str) -> Vec<(String, String)> {
    c.query(
        "SELECT actor, coalesce(detail, '') FROM orphan_cleanup.audit_log WHERE action = $1 ORDER BY id",
        &[&action],
    )
    .unwrap()
    .iter()
    .map(|r| (r.get(0), r.get(1)))
    .collect()
}

fn breaker_health(c: &mut postgres::Client) -> (String, String) {
    let r = c
        .query_one(
            "SELECT status, detail FROM orphan_cleanup.health() WHERE check_name = 'circuit breaker'",
            &[],
        )
        .unwrap();
    (r.get(0), r.get(1))
}

/// `n` orphans, two hours old: past the cursor of the next cycle.
fn orphans(c: &mut postgres::Client, tag: &str, n: usize) {
    for i in 0..n {
        job(
            c,
            "completed",
            Some(&public_url("renders", &format!("{tag}/{i}.png"))),
            "2 hours",
            tag,
        );
    }
}

/// An app with 100 saved renders and three quiet cycles behind it (2 new orphans each): the
/// breaker is armed, with a median of 2.
fn armed(name: &str, extra: &[(&str, &str)]) -> TestDb {
    let mut s = BASE_SETTINGS.to_vec();
    s.extend_from_slice(extra);
    settings(&s);
    let db = TestDb::attached(name);
    let mut c = db.client();
    for i in 0..100 {
        let j = job(
            &mut c,
            "completed",
            Some(&public_url("renders", &format!("saved/{i}.png"))),
            "2 hours",
            "saved",
        );
        save(&mut c, "generated_saved", &j.0).unwrap();
    }
    c.batch_execute("ANALYZE render_jobs").unwrap();
    for round in 0..3 {
        orphans(&mut c, &format!("quiet{round}"), 2);
        let (status, _, enqueued, _, _) = cycle(&mut c);
        assert_eq!(
            (status.as_str(), enqueued),
            ("ok", 2),
            "quiet cycle {round}"
        );
    }
    db
}

/// The bad migration: the assets' JSON key is renamed, so no asset references a job any more.
fn rename_the_reference_key(c: &mut postgres::Client) {
    c.batch_execute(
        "UPDATE user_assets
            SET metadata = (metadata - 'render_job_id') || jsonb_build_object('job_ref', metadata -> 'render_job_id')
          WHERE asset_type = 'generated_saved'",
    )
    .unwrap();
}

#[test]
fn the_first_backlog_runs_under_max_per_cycle_alone() {
    settings(&[
        BASE_SETTINGS[0],
        BASE_SETTINGS[1],
        ("breaker_min_rows", "5"),
        ("max_per_cycle", "30"),
    ]);
    let db = TestDb::attached("breaker_backlog");
    let mut c = db.client();
    orphans(&mut c, "backlog", 50);
    let (status, _, enqueued, _, _) = cycle(&mut c);
    assert_eq!(
        (status.as_str(), enqueued),
        ("ok", 30),
        "no history: no breaker"
    );
    let (status, _, enqueued, _, _) = cycle(&mut c);
    assert_eq!((status.as_str(), enqueued), ("ok", 20));
    let (status, detail) = breaker_health(&mut c);
    assert_eq!(status, "ok");
    assert!(detail.contains("not armed yet"), "{detail}");
}

#[test]
fn a_mass_of_new_orphans_trips_the_breaker_and_enqueues_nothing() {
    let db = armed("breaker_trip", &[("breaker_min_rows", "10")]);
    let mut c = db.client();
    assert!(breaker_health(&mut c).1.contains("at most 20 rows"));
    rename_the_reference_key(&mut c);
    let rechecks: i64 = c
        .query_one("SELECT count(*) FROM orphan_cleanup.recheck", &[])
        .unwrap()
        .get(0);
    assert_eq!(
        rechecks, 100,
        "the save guard asked for every job to be rechecked"
    );

    let (status, _, enqueued, _, _) = cycle(&mut c);
    assert_eq!((status.as_str(), enqueued), ("tripped", 0));
    assert_eq!(
        queued(&mut c),
        6,
        "nothing enqueued: only the quiet cycles' rows"
    );
    let rechecks_after: i64 = c
        .query_one("SELECT count(*) FROM orphan_cleanup.recheck", &[])
        .unwrap()
        .get(0);
    assert_eq!(
        rechecks_after, 100,
        "the rechecks wait for the next real cycle"
    );
    let error: String = c
        .query_one(
            "SELECT error FROM orphan_cleanup.cycle_log WHERE status = 'tripped' ORDER BY id DESC LIMIT 1",
            &[],
        )
        .unwrap()
        .get(0);
    assert!(error.contains("over its limit of 20"), "{error}");
    let trips = audited(&mut c, "breaker_tripped");
    assert_eq!(trips.len(), 1);
    assert!(
        trips[0].1.contains("median 2.0 of the last 3 cycles"),
        "{trips:?}"
    );
    let (status, detail) = breaker_health(&mut c);
    assert_eq!(status, "critical");
    assert!(detail.contains("reset_breaker"), "{detail}");

    // Stays tripped, cycle after cycle.
    let (status, _, enqueued, _, _) = cycle(&mut c);
    assert_eq!((status.as_str(), enqueued), ("tripped", 0));
    assert_eq!(queued(&mut c), 6);

    // The DBA can still look before deciding.
    let would: i64 = c
        .query_one(
            "SELECT count(*) FROM orphan_cleanup.preview(max_rows => 1000) WHERE verdict = 'orphan'",
            &[],
        )
        .unwrap()
        .get(0);
    assert_eq!(
        would, 106,
        "the renamed key makes every saved render look orphaned"
    );
    c.query("SELECT * FROM orphan_cleanup.validation_report()", &[])
        .unwrap();

    // A reset needs a reason, and says who gave it.
    for bad in ["''", "NULL", "'  '"] {
        let e = c
            .query_one(&format!("SELECT orphan_cleanup.reset_breaker({bad})"), &[])
            .unwrap_err();
        assert!(db_error(&e).contains("needs a reason"), "{}", db_error(&e));
    }
    let said: String = c
        .query_one(
            "SELECT orphan_cleanup.reset_breaker('the orphans are real: old renders were purged from the app')",
            &[],
        )
        .unwrap()
        .get(0);
    assert!(said.contains("reset by postgres"), "{said}");
    let resets = audited(&mut c, "breaker_reset");
    assert_eq!(resets.len(), 1);
    assert_eq!(resets[0].0, "postgres");
    assert!(
        resets[0].1.contains("old renders were purged"),
        "{resets:?}"
    );
    assert_eq!(breaker_health(&mut c).0, "ok");

    let (status, _, enqueued, _, _) = cycle(&mut c);
    assert_eq!(
        (status.as_str(), enqueued),
        ("ok", 100),
        "the approved cycle runs"
    );
    let (status, _, enqueued, _, _) = cycle(&mut c);
    assert_eq!(
        (status.as_str(), enqueued),
        ("ok", 0),
        "and the breaker is armed again"
    );
    assert_eq!(
        c.query_one("SELECT orphan_cleanup.reset_breaker('just in case')", &[])
            .unwrap()
            .get::<_, String>(0),
        "the circuit breaker is not tripped; nothing to reset"
    );
}

#[test]
fn raising_the_limits_lifts_a_trip_and_the_fraction_check_trips_on_its_own() {
    // Only the fraction check: at most 30% of the ~106 completed jobs.
    let extra = [
        ("breaker_min_rows", "1"),
        ("breaker_factor", "0"),
        ("breaker_max_fraction", "0.3"),
    ];
    let db = armed("breaker_limits", &extra);
    let mut c = db.client();
    let detail = breaker_health(&mut c).1;
    assert!(
        detail.contains("breaker_max_fraction 0.3 of about") && !detail.contains("breaker_factor"),
        "only the fraction check applies: {detail}"
    );
    rename_the_reference_key(&mut c);
    let (status, _, enqueued, _, _) = cycle(&mut c);
    assert_eq!((status.as_str(), enqueued), ("tripped", 0));

    // The DBA raises the limit instead of resetting: the next cycle runs under the new one.
    let mut s = BASE_SETTINGS.to_vec();
    s.extend_from_slice(&[
        ("breaker_min_rows", "1"),
        ("breaker_factor", "0"),
        ("breaker_max_fraction", "1"),
    ]);
    settings(&s);
    let (status, _, enqueued, _, _) = cycle(&mut c);
    assert_eq!((status.as_str(), enqueued), ("ok", 100));
    let resets = audited(&mut c, "breaker_reset");
    assert_eq!(resets.len(), 1);
    assert!(resets[0].1.contains("limits changed"), "{resets:?}");
}
