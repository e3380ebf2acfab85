//! The queue API as the reaper sees it: claim, confirm, fail, release, leases, dead letters,
//! and the DBA's cancel and requeue.

use std::collections::BTreeSet;

use e2e::process::Hermetic;
use e2e::*;

/// A database with `n` queued orphans; returns it and the job ids.
fn queued_db(name: &str, n: usize) -> (TestDb, Vec<uuid_text::Uuid>) {
    let db = TestDb::attached(name);
    let mut c = db.client();
    let jobs = (0..n)
        .map(|i| {
            job(
                &mut c,
                "completed",
                Some(&public_url("renders", &format!("q/{i}.png"))),
                "2 hours",
                "orphan",
            )
        })
        .collect();
    assert_eq!(cycle(&mut c).2, n as i64);
    (db, jobs)
}

fn state_of(c: &mut postgres::Client, id: i64) -> (String, i32) {
    let r = c
        .query_one(
            "SELECT state, attempts FROM orphan_cleanup.deletion_queue WHERE id = $1",
            &[&id],
        )
        .unwrap();
    (r.get(0), r.get(1))
}

fn results(rows: Vec<postgres::Row>) -> Vec<(i64, String)> {
    rows.iter().map(|r| (r.get(0), r.get(1))).collect()
}

fn job_exists(c: &mut postgres::Client, j: &uuid_text::Uuid) -> bool {
    c.query_one(
        "SELECT count(*) FROM render_jobs WHERE id = $1::text::uuid",
        &[&j.0],
    )
    .unwrap()
    .get::<_, i64>(0)
        == 1
}

#[test]
fn claim_then_confirm_deleted_and_absent_cleans_up_job_rows() {
    settings(BASE_SETTINGS);
    let (db, jobs) = queued_db("queue_confirm", 4);
    let mut c = db.client();
    let rows = c.query("SELECT id, job_id::text, host, bucket, object_path, attempts, lease_token FROM orphan_cleanup.claim('w1', 10)", &[]).unwrap();
    assert_eq!(rows.len(), 4);
    let r0 = &rows[0];
    assert_eq!(r0.get::<_, Option<String>>(2).as_deref(), Some(HOST));
    assert_eq!(r0.get::<_, String>(3), "renders");
    assert!(r0.get::<_, String>(4).starts_with("q/"));
    let ids: Vec<i64> = rows.iter().map(|r| r.get(0)).collect();
    let lease: String = r0.get(6);
    assert!(
        rows.iter().all(|r| r.get::<_, String>(6) == lease),
        "one lease token per claim"
    );

    let res = results(
        c.query(
            "SELECT * FROM orphan_cleanup.confirm('w1', $1, $2, 'deleted')",
            &[&lease, &ids[..2].to_vec()],
        )
        .unwrap(),
    );
    assert!(res.iter().all(|(_, r)| r == "confirmed"), "{res:?}");
    let res = results(
        c.query(
            "SELECT * FROM orphan_cleanup.confirm('w1', $1, $2, 'absent')",
            &[&lease, &ids[2..].to_vec()],
        )
        .unwrap(),
    );
    assert!(res.iter().all(|(_, r)| r == "confirmed"), "{res:?}");
    assert_eq!(state_of(&mut c, ids[0]).0, "deleted");
    assert_eq!(state_of(&mut c, ids[3]).0, "absent");
    for j in &jobs {
        assert!(
            !job_exists(&mut c, j),
            "on_confirm = delete removes the job row"
        );
    }
    let audited: i64 = c
        .query_one("SELECT count(*) FROM orphan_cleanup.audit_log WHERE action IN ('deleted', 'absent') AND actor = 'w1'", &[])
        .unwrap()
        .get(0);
    assert_eq!(audited, 4);
    // The app's job rows it deleted are audited too, one row each.
    let cleaned: i64 = c
        .query_one("SELECT count(*) FROM orphan_cleanup.audit_log WHERE action = 'job_cleanup' AND detail = 'job row deleted' AND actor = 'w1'", &[])
        .unwrap()
        .get(0);
    assert_eq!(cleaned, 4);
    // Confirming again is harmless and says why nothing happened.
    let res = results(
        c.query(
            "SELECT * FROM orphan_cleanup.confirm('w1', $1, $2, 'deleted')",
            &[&lease, &vec![ids[0], 999_999]],
        )
        .unwrap(),
    );
    assert_eq!(res[0].1, "not confirmed: the row is already deleted");
    assert_eq!(res[1].1, "not confirmed: no such queue row");
    let err = c
        .query(
            "SELECT * FROM orphan_cleanup.confirm('w1', $1, $2, 'gone')",
            &[&lease, &ids],
        )
        .unwrap_err();
    assert!(
        db_error(&err).contains("outcome must be 'deleted' or 'absent'"),
        "{err}"
    );
}

#[test]
fn on_confirm_clear_url_keeps_the_job_row() {
    settings(&[
        ("allowed_buckets", "renders"),
        ("allowed_hosts", HOST),
        ("on_confirm", "clear_url"),
    ]);
    let (db, jobs) = queued_db("queue_clear_url", 1);
    let mut c = db.client();
    let ids = claim(&mut c, "w1", 10);
    c.query(
        "SELECT * FROM orphan_cleanup.confirm('w1', $1, $2, 'deleted')",
        &[&ids.lease, &ids.ids],
    )
    .unwrap();
    let url: Option<String> = c
        .query_one(
            "SELECT output_url FROM render_jobs WHERE id = $1::text::uuid",
            &[&jobs[0].0],
        )
        .unwrap()
        .get(0);
    assert_eq!(url, None);
    let cleanup: String = c
        .query_one(
            "SELECT job_cleanup FROM orphan_cleanup.deletion_queue WHERE id = $1",
            &[&ids[0]],
        )
        .unwrap()
        .get(0);
    assert_eq!(cleanup, "output_url cleared");
}

#[test]
fn confirm_falls_back_to_clearing_the_url_when_a_foreign_key_blocks_the_delete() {
    settings(BASE_SETTINGS);
    let (db, jobs) = queued_db("queue_fk", 2);
    let mut c = db.client();
    c.batch_execute("CREATE TABLE job_events (id serial, job_id uuid REFERENCES render_jobs (id))")
        .unwrap();
    c.execute(
        "INSERT INTO job_events (job_id) VALUES ($1::text::uuid)",
        &[&jobs[0].0],
    )
    .unwrap();
    let warning: String = c
        .query_one("SELECT detail FROM orphan_cleanup.attach() WHERE item = 'foreign key job_events_job_id_fkey'", &[])
        .unwrap()
        .get(0);
    assert!(
        warning.contains("public.job_events references the jobs table ON DELETE NO ACTION"),
        "{warning}"
    );
    let ids = claim(&mut c, "w1", 10);
    let res = results(
        c.query(
            "SELECT * FROM orphan_cleanup.confirm('w1', $1, $2, 'deleted')",
            &[&ids.lease, &ids.ids],
        )
        .unwrap(),
    );
    assert!(res.iter().all(|(_, r)| r == "confirmed"), "{res:?}");
    assert!(job_exists(&mut c, &jobs[0]), "the referenced job row stays");
    assert!(!job_exists(&mut c, &jobs[1]));
    let url: Option<String> = c
        .query_one(
            "SELECT output_url FROM render_jobs WHERE id = $1::text::uuid",
            &[&jobs[0].0],
        )
        .unwrap()
        .get(0);
    assert_eq!(url, None, "its URL is cleared instead");
    let why: String = c
        .query_one("SELECT detail FROM orphan_cleanup.audit_log WHERE action = 'job_cleanup' AND job_id = $1::text::uuid", &[&jobs[0].0])
        .unwrap()
        .get(0);
    assert!(why.contains("foreign key"), "{why}");
    let states: BTreeSet<String> = c
        .query("SELECT state FROM orphan_cleanup.deletion_queue", &[])
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(
        states,
        BTreeSet::from(["deleted".to_string()]),
        "no row stays claimed"
    );
}

/// A job row whose cleanup waits for a lock (the app's trigger, a cascade) past the session's
/// lock_timeout is not marked failed for good, nor has its URL cleared: it stays pending, and the
/// next cycle deletes it once the lock is gone. (Found by the issue 12 review: such a row was
/// left "failed", never retried.)
#[test]
fn a_job_cleanup_that_waits_for_a_lock_is_retried_by_the_next_cycle() {
    settings(BASE_SETTINGS);
    let (db, jobs) = queued_db("queue_cleanup_lock", 1);
    let mut c = db.client();
    c.batch_execute(
        "CREATE TABLE job_archive (job_id uuid);
         CREATE FUNCTION archive_job() RETURNS trigger LANGUAGE plpgsql AS $$
         BEGIN INSERT INTO public.job_archive VALUES (OLD.id); RETURN OLD; END $$;
         CREATE TRIGGER archive BEFORE DELETE OR UPDATE ON render_jobs FOR EACH ROW EXECUTE FUNCTION archive_job();",
    )
    .unwrap();
    let mut holder = db.client();
    holder
        .batch_execute("BEGIN; LOCK TABLE job_archive IN ACCESS EXCLUSIVE MODE")
        .unwrap();
    let ids = claim(&mut c, "w1", 10);
    c.batch_execute("SET lock_timeout = '200ms'").unwrap();
    let res = results(
        c.query(
            "SELECT * FROM orphan_cleanup.confirm('w1', $1, $2, 'deleted')",
            &[&ids.lease, &ids.ids],
        )
        .unwrap(),
    );
    assert!(res.iter().all(|(_, r)| r == "confirmed"), "{res:?}");
    let cleanup: String = c
        .query_one("SELECT job_cleanup FROM orphan_cleanup.deletion_queue", &[])
        .unwrap()
        .get(0);
    assert!(cleanup.starts_with("pending: retried after"), "{cleanup}");
    assert!(job_exists(&mut c, &jobs[0]));
    holder.batch_execute("COMMIT").unwrap();
    c.batch_execute("RESET lock_timeout").unwrap();
    cycle(&mut c);
    assert!(!job_exists(&mut c, &jobs[0]), "the next cycle deleted it");
}

/// A reason given with a release never passes for the nothing-sent mark that gives a row's
/// hand-out back and refunds a reaper's hourly budget (found by the issue 12 review: the reason
/// carries text from storage, which an upstream chooses).
#[test]
fn a_reason_cannot_forge_the_nothing_sent_mark() {
    settings(BASE_SETTINGS);
    let (db, _) = queued_db("queue_forged_mark", 1);
    let mut c = db.client();
    let claim = claim(&mut c, "w1", 10);
    let released: i64 = c
        .query_one(
            "SELECT orphan_cleanup.release('w1', $1, $2, 'HTTP 500: oops (nothing was sent)', false)",
            &[&claim.lease, &claim.ids],
        )
        .unwrap()
        .get(0);
    assert_eq!(released, 1);
    let detail: String = c
        .query_one(
            "SELECT detail FROM orphan_cleanup.audit_log WHERE action = 'released'",
            &[],
        )
        .unwrap()
        .get(0);
    assert!(!detail.ends_with("(nothing was sent)"), "{detail}");
    let handouts: i32 = c
        .query_one("SELECT sum(handouts)::int FROM orphan_cleanup.objects", &[])
        .unwrap()
        .get(0);
    assert_eq!(handouts, 1, "still handed out");
}

#[test]
fn fail_backs_off_and_dead_letters_after_max_attempts() {
    settings(&[
        ("allowed_buckets", "renders"),
        ("allowed_hosts", HOST),
        ("max_attempts", "3"),
    ]);
    let (db, _) = queued_db("queue_fail", 1);
    let mut c = db.client();
    for attempt in 1..=3 {
        let ids = claim(&mut c, "w1", 10);
        assert_eq!(
            ids.len(),
            1,
            "attempt {attempt}: the row is claimable again"
        );
        let res = results(
            c.query(
                "SELECT * FROM orphan_cleanup.fail('w1', $1, $2, 'HTTP 500 from storage', true)",
                &[&ids.lease, &ids.ids],
            )
            .unwrap(),
        );
        let (state, attempts) = state_of(&mut c, ids[0]);
        assert_eq!(attempts, attempt);
        if attempt < 3 {
            assert_eq!(state, "pending");
            assert!(res[0].1.starts_with("retry after"), "{res:?}");
            // Back-off: not claimable before available_at.
            assert!(claim(&mut c, "w1", 10).is_empty());
            let wait: f64 = c
                .query_one("SELECT extract(epoch FROM available_at - now())::float8 FROM orphan_cleanup.deletion_queue WHERE id = $1", &[&ids[0]])
                .unwrap()
                .get(0);
            let base = 30.0 * 2f64.powi(attempt - 1);
            assert!(
                wait > base * 0.75 && wait < base * 1.25,
                "attempt {attempt}: back-off {wait}s, expected about {base}s"
            );
            c.execute(
                "UPDATE orphan_cleanup.deletion_queue SET available_at = now() WHERE id = $1",
                &[&ids[0]],
            )
            .unwrap();
        } else {
            assert_eq!(state, "dead");
            assert_eq!(res[0].1, "dead-lettered");
        }
    }
    let last: String = c
        .query_one("SELECT last_error FROM orphan_cleanup.deletion_queue", &[])
        .unwrap()
        .get(0);
    assert_eq!(last, "HTTP 500 from storage");
    let dead: i64 = c
        .query_one(
            "SELECT count(*) FROM orphan_cleanup.audit_log WHERE action = 'dead_lettered'",
            &[],
        )
        .unwrap()
        .get(0);
    assert_eq!(dead, 1);
    let warn: String = c
        .query_one(
            "SELECT status FROM orphan_cleanup.health() WHERE check_name = 'dead letters'",
            &[],
        )
        .unwrap()
        .get(0);
    assert_eq!(warn, "warning");

    // The DBA requeues it with fresh attempts.
    let n: i64 = c
        .query_one("SELECT orphan_cleanup.requeue_dead()", &[])
        .unwrap()
        .get(0);
    assert_eq!(n, 1);
    let (state, attempts) = c
        .query_one(
            "SELECT state, attempts FROM orphan_cleanup.deletion_queue",
            &[],
        )
        .map(|r| (r.get::<_, String>(0), r.get::<_, i32>(1)))
        .unwrap();
    assert_eq!((state.as_str(), attempts), ("pending", 0));
    assert_eq!(claim(&mut c, "w1", 10).len(), 1);
}

#[test]
fn a_non_retryable_failure_dead_letters_at_once() {
    settings(BASE_SETTINGS);
    let (db, _) = queued_db("queue_fatal", 1);
    let mut c = db.client();
    let ids = claim(&mut c, "w1", 10);
    let res = results(
        c.query(
            "SELECT * FROM orphan_cleanup.fail('w1', $1, $2, 'bucket not allowed by --buckets', false)",
            &[&ids.lease, &ids.ids],
        )
        .unwrap(),
    );
    assert_eq!(res[0].1, "dead-lettered");
    assert_eq!(state_of(&mut c, ids[0]), ("dead".to_string(), 1));
}

#[test]
fn an_expired_lease_counts_as_an_attempt_and_ends_dead() {
    settings(&[
        ("allowed_buckets", "renders"),
        ("allowed_hosts", HOST),
        ("max_attempts", "2"),
    ]);
    let (db, _) = queued_db("queue_lease", 1);
    let mut c = db.client();
    let crashed = claim_sql(
        &mut c,
        "SELECT id, lease_token FROM orphan_cleanup.claim('crashing', 10, '1 second')",
        &[],
    );
    let id: i64 = crashed[0];
    std::thread::sleep(std::time::Duration::from_millis(1100));
    // The next claim expires the lease: an attempt, with back-off.
    assert!(claim(&mut c, "w2", 10).is_empty());
    assert_eq!(state_of(&mut c, id), ("pending".to_string(), 1));
    let err: String = c
        .query_one(
            "SELECT last_error FROM orphan_cleanup.deletion_queue WHERE id = $1",
            &[&id],
        )
        .unwrap()
        .get(0);
    assert!(
        err.contains("lease expired") && err.contains("crashing"),
        "{err}"
    );
    // The crashed worker cannot confirm any more.
    let res = results(
        c.query(
            "SELECT * FROM orphan_cleanup.confirm('crashing', $1, $2, 'deleted')",
            &[&crashed.lease, &vec![id]],
        )
        .unwrap(),
    );
    assert_eq!(res[0].1, "not confirmed: lease lost, the row was requeued");
    c.execute(
        "UPDATE orphan_cleanup.deletion_queue SET available_at = now() WHERE id = $1",
        &[&id],
    )
    .unwrap();
    c.query(
        "SELECT id FROM orphan_cleanup.claim('crashing', 10, '1 second')",
        &[],
    )
    .unwrap();
    std::thread::sleep(std::time::Duration::from_millis(1100));
    let n: i64 = c
        .query_one("SELECT count(*) FROM orphan_cleanup.run_cycle()", &[])
        .unwrap()
        .get(0);
    assert_eq!(n, 1);
    assert_eq!(
        state_of(&mut c, id),
        ("dead".to_string(), 2),
        "a row that crashes every reaper ends dead-lettered"
    );
}

#[test]
fn release_gives_claims_back_without_an_attempt() {
    settings(BASE_SETTINGS);
    let (db, _) = queued_db("queue_release", 3);
    let mut c = db.client();
    let ids = claim(&mut c, "w1", 10);
    let n: i64 = c
        .query_one(
            "SELECT orphan_cleanup.release('w1', $1, $2, NULL)",
            &[&ids.lease, &vec![ids[0]]],
        )
        .unwrap()
        .get(0);
    assert_eq!(n, 1);
    let n: i64 = c
        .query_one(
            "SELECT orphan_cleanup.release('other-worker', $1, NULL, NULL)",
            &[&ids.lease],
        )
        .unwrap()
        .get(0);
    assert_eq!(n, 0, "a worker releases only its own claims");
    let n: i64 = c
        .query_one(
            "SELECT orphan_cleanup.release('w1', $1, NULL, NULL)",
            &[&ids.lease],
        )
        .unwrap()
        .get(0);
    assert_eq!(n, 2, "NULL ids: every row of the claim");
    for id in ids.iter() {
        assert_eq!(state_of(&mut c, *id), ("pending".to_string(), 0));
    }
    assert_eq!(claim(&mut c, "w2", 10).len(), 3);
}

#[test]
fn only_the_holder_can_confirm_or_fail() {
    settings(BASE_SETTINGS);
    let (db, _) = queued_db("queue_holder", 1);
    let mut c = db.client();
    let ids = claim(&mut c, "w1", 10);
    let res = results(
        c.query(
            "SELECT * FROM orphan_cleanup.confirm('w2', $1, $2, 'deleted')",
            &[&ids.lease, &ids.ids],
        )
        .unwrap(),
    );
    assert_eq!(
        res[0].1,
        "not confirmed: lease lost, the row is now claimed by w1"
    );
    let res = results(
        c.query(
            "SELECT * FROM orphan_cleanup.fail('w2', $1, $2, 'x', true)",
            &[&ids.lease, &ids.ids],
        )
        .unwrap(),
    );
    assert_eq!(
        res[0].1,
        "not failed: lease lost, the row is now claimed by w1"
    );
    assert_eq!(state_of(&mut c, ids[0]).0, "claimed");
}

#[test]
fn cancel_removes_pending_rows_for_good() {
    settings(BASE_SETTINGS);
    let (db, jobs) = queued_db("queue_cancel", 2);
    let mut c = db.client();
    let ids: Vec<i64> = c
        .query(
            "SELECT id FROM orphan_cleanup.deletion_queue ORDER BY id",
            &[],
        )
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    let claimed = claim(&mut c, "w1", 1);
    let res = results(
        c.query("SELECT * FROM orphan_cleanup.cancel($1)", &[&ids])
            .unwrap(),
    );
    assert!(
        res.iter()
            .any(|(id, r)| *id == claimed[0] && r.starts_with("not cancelled: claimed by w1")),
        "{res:?}"
    );
    assert!(
        res.iter()
            .any(|(id, r)| *id != claimed[0] && r == "cancelled"),
        "{res:?}"
    );
    // The next full sweep does not queue the cancelled job again.
    settings(&[
        ("allowed_buckets", "renders"),
        ("allowed_hosts", HOST),
        ("full_sweep_interval", "0"),
    ]);
    cycle(&mut c);
    let cancelled_job = jobs
        .iter()
        .find(|j| queue_states(&mut c, j).contains(&"cancelled".to_string()))
        .unwrap();
    assert_eq!(queue_states(&mut c, cancelled_job), vec!["cancelled"]);
}

#[test]
fn reaping_disabled_hands_out_nothing() {
    settings(&[
        ("allowed_buckets", "renders"),
        ("allowed_hosts", HOST),
        ("reaping_enabled", "off"),
    ]);
    let (db, _) = queued_db("queue_stop", 2);
    let mut c = db.client();
    assert!(claim(&mut c, "w1", 10).is_empty());
    let enabled: bool = c
        .query_one(
            "SELECT reaping_enabled FROM orphan_cleanup.queue_status()",
            &[],
        )
        .unwrap()
        .get(0);
    assert!(!enabled);
    settings(BASE_SETTINGS);
    assert_eq!(claim(&mut c, "w1", 10).len(), 2);
}

#[test]
fn grace_delays_claims() {
    settings(&[
        ("allowed_buckets", "renders"),
        ("allowed_hosts", HOST),
        ("grace", "1h"),
    ]);
    let (db, _) = queued_db("queue_grace", 2);
    let mut c = db.client();
    assert!(
        claim(&mut c, "w1", 10).is_empty(),
        "rows wait out the grace period"
    );
    let peek = c
        .query("SELECT id FROM orphan_cleanup.peek()", &[])
        .unwrap();
    assert_eq!(peek.len(), 2, "but peek shows them");
}

#[test]
fn two_workers_claiming_at_once_never_get_the_same_row() {
    settings(BASE_SETTINGS);
    let (db, _) = queued_db("queue_race", 300);
    let handles: Vec<_> = (0..4)
        .map(|w| {
            let name = db.name.clone();
            std::thread::spawn(move || {
                let mut c = connect(&name);
                let mut got = Vec::new();
                loop {
                    let ids = claim(&mut c, &format!("w{w}"), 7);
                    if ids.is_empty() {
                        break;
                    }
                    got.extend(ids.ids);
                }
                got
            })
        })
        .collect();
    let all: Vec<i64> = handles
        .into_iter()
        .flat_map(|h| h.join().unwrap())
        .collect();
    let unique: BTreeSet<i64> = all.iter().copied().collect();
    assert_eq!(all.len(), 300, "every row handed out");
    assert_eq!(unique.len(), 300, "no row handed out twice");
}

#[test]
fn claim_rejects_bad_arguments_and_needs_read_committed() {
    settings(BASE_SETTINGS);
    let (db, _) = queued_db("queue_args", 1);
    let mut c = db.client();
    for (sql, msg) in [
        (
            "SELECT * FROM orphan_cleanup.claim('', 10)",
            "worker must be a non-empty id",
        ),
        (
            "SELECT * FROM orphan_cleanup.claim('w', 0)",
            "max_rows must be between 1 and 10000",
        ),
        (
            "SELECT * FROM orphan_cleanup.claim('w', 10, '0 seconds')",
            "lease must be between 1 second and 1 day",
        ),
    ] {
        let err = c.query(sql, &[]).unwrap_err();
        assert!(db_error(&err).contains(msg), "{sql}: {}", db_error(&err));
    }
    let mut tx = c
        .build_transaction()
        .isolation_level(postgres::IsolationLevel::RepeatableRead)
        .start()
        .unwrap();
    let err = tx
        .query("SELECT * FROM orphan_cleanup.claim('w', 10)", &[])
        .unwrap_err();
    assert!(
        db_error(&err).contains("READ COMMITTED"),
        "{}",
        db_error(&err)
    );
}

#[test]
fn claims_refuse_until_attached_and_after_settings_drift() {
    settings(BASE_SETTINGS);
    let (db, _) = queued_db("queue_drift", 1);
    let mut c = db.client();
    c.batch_execute("CREATE TABLE other_jobs (LIKE render_jobs INCLUDING ALL)")
        .unwrap();
    settings(&[
        ("allowed_buckets", "renders"),
        ("allowed_hosts", HOST),
        ("jobs_table", "public.other_jobs"),
    ]);
    let err = c
        .query("SELECT * FROM orphan_cleanup.claim('w', 10)", &[])
        .unwrap_err();
    let msg = db_error(&err);
    assert!(
        msg.contains("orphan_cleanup.jobs_table is 'public.other_jobs'")
            && msg.contains("attach()"),
        "{msg}"
    );
    let (status, ..) = cycle(&mut c);
    assert_eq!(status, "failed", "cycles stop too");
    let health: String = c
        .query_one(
            "SELECT status FROM orphan_cleanup.health() WHERE check_name = 'attached'",
            &[],
        )
        .unwrap()
        .get(0);
    assert_eq!(health, "critical");
    settings(BASE_SETTINGS);
    c.query_one("SELECT orphan_cleanup.detach()", &[]).unwrap();
    let err = c
        .query("SELECT * FROM orphan_cleanup.claim('w', 10)", &[])
        .unwrap_err();
    assert!(
        db_error(&err).contains("not attached"),
        "{}",
        db_error(&err)
    );
    db.attach();
    assert_eq!(claim(&mut c, "w", 10).len(), 1);
}

#[test]
fn a_disabled_or_missing_save_guard_stops_claims() {
    settings(BASE_SETTINGS);
    let (db, _) = queued_db("queue_guard_off", 1);
    let mut c = db.client();
    c.batch_execute("ALTER TABLE user_assets DISABLE TRIGGER orphan_cleanup_save_guard")
        .unwrap();
    let err = c
        .query("SELECT * FROM orphan_cleanup.claim('w', 10)", &[])
        .unwrap_err();
    assert!(
        db_error(&err).contains(
            "the guard trigger orphan_cleanup_save_guard on public.user_assets is disabled, not enabled ALWAYS"
        ),
        "{}",
        db_error(&err)
    );
    let health: String = c
        .query_one(
            "SELECT status FROM orphan_cleanup.health() WHERE check_name = 'save guard'",
            &[],
        )
        .unwrap()
        .get(0);
    assert_eq!(health, "critical");
    c.batch_execute("DROP TRIGGER orphan_cleanup_save_guard ON user_assets")
        .unwrap();
    let err = c
        .query("SELECT * FROM orphan_cleanup.claim('w', 10)", &[])
        .unwrap_err();
    assert!(db_error(&err).contains("is missing"), "{}", db_error(&err));
    db.attach();
    assert_eq!(claim(&mut c, "w", 10).len(), 1);
}

#[test]
fn attach_names_every_problem_with_the_tables() {
    settings(&[
        ("allowed_buckets", "renders"),
        ("jobs_table", "public.nope"),
        ("age_column", "finished_at"),
    ]);
    let db = TestDb::create("queue_attach_errors");
    let mut c = db.client();
    let err = c
        .query("SELECT * FROM orphan_cleanup.attach()", &[])
        .unwrap_err();
    let msg = db_error(&err);
    assert!(
        msg.contains("jobs table public.nope (orphan_cleanup.jobs_table) does not exist"),
        "{msg}"
    );
    settings(&[
        ("allowed_buckets", "renders"),
        ("age_column", "finished_at"),
    ]);
    let err = c
        .query("SELECT * FROM orphan_cleanup.attach()", &[])
        .unwrap_err();
    assert!(
        db_error(&err).contains("column finished_at is missing from public.render_jobs"),
        "{}",
        db_error(&err)
    );
    settings(&[("allowed_buckets", "renders"), ("age_column", "prompt")]);
    let err = c
        .query("SELECT * FROM orphan_cleanup.attach()", &[])
        .unwrap_err();
    assert!(
        db_error(&err).contains("column prompt of public.render_jobs is text, expected timestamp"),
        "{}",
        db_error(&err)
    );
    settings(&[
        ("allowed_buckets", "renders"),
        ("age_column", "completed_at"),
    ]);
    let rows = c
        .query(
            "SELECT item, status, detail FROM orphan_cleanup.attach()",
            &[],
        )
        .unwrap();
    let missing_index = rows
        .iter()
        .find(|r| r.get::<_, String>(0) == "index: completed jobs by age")
        .unwrap();
    assert_eq!(missing_index.get::<_, String>(1), "critical");
    assert!(missing_index.get::<_, String>(2).contains("CREATE INDEX CONCURRENTLY render_jobs_orphan_scan_idx ON public.render_jobs (completed_at, id)"));
    // attach() is idempotent.
    c.query("SELECT * FROM orphan_cleanup.attach()", &[])
        .unwrap();
    let triggers: i64 = c
        .query_one("SELECT count(*) FROM pg_trigger WHERE tgrelid = 'user_assets'::regclass AND tgname LIKE 'orphan_cleanup%'", &[])
        .unwrap()
        .get(0);
    assert_eq!(triggers, 2);
}

#[test]
fn claim_can_be_limited_to_some_buckets() {
    settings(&[
        ("allowed_buckets", "renders,thumbs"),
        ("allowed_hosts", HOST),
    ]);
    let db = TestDb::attached("queue_buckets");
    let mut c = db.client();
    job(
        &mut c,
        "completed",
        Some(&public_url("renders", "b/1.png")),
        "2 hours",
        "orphan",
    );
    job(
        &mut c,
        "completed",
        Some(&public_url("thumbs", "b/1.png")),
        "2 hours",
        "orphan",
    );
    cycle(&mut c);
    let rows = c
        .query(
            "SELECT bucket FROM orphan_cleanup.claim('w1', 10, '5 minutes', ARRAY['thumbs'])",
            &[],
        )
        .unwrap();
    assert_eq!(
        rows.iter()
            .map(|r| r.get::<_, String>(0))
            .collect::<Vec<_>>(),
        vec!["thumbs"]
    );
}

#[test]
fn history_older_than_the_retention_is_pruned() {
    settings(&[
        ("allowed_buckets", "renders"),
        ("allowed_hosts", HOST),
        ("history_retention", "1h"),
    ]);
    let (db, _) = queued_db("queue_prune", 2);
    let mut c = db.client();
    let ids = claim(&mut c, "w1", 10);
    c.query(
        "SELECT * FROM orphan_cleanup.confirm('w1', $1, $2, 'deleted')",
        &[&ids.lease, &vec![ids[0]]],
    )
    .unwrap();
    c.batch_execute(&format!(
        "UPDATE orphan_cleanup.deletion_queue SET finished_at = now() - interval '2 hours' WHERE id = {};
         UPDATE orphan_cleanup.audit_log SET at = now() - interval '2 hours' WHERE queue_id = {};
         UPDATE orphan_cleanup.cycle_log SET started_at = now() - interval '2 hours';",
        ids[0], ids[0]
    ))
    .unwrap();
    cycle(&mut c);
    let queue: Vec<i64> = c
        .query("SELECT id FROM orphan_cleanup.deletion_queue", &[])
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(
        queue,
        vec![ids[1]],
        "the finished old row is pruned; the claimed one stays"
    );
    let old_audit: i64 = c
        .query_one(
            "SELECT count(*) FROM orphan_cleanup.audit_log WHERE queue_id = $1",
            &[&ids[0]],
        )
        .unwrap()
        .get(0);
    assert_eq!(old_audit, 0);
    let cycles: i64 = c
        .query_one("SELECT count(*) FROM orphan_cleanup.cycle_log", &[])
        .unwrap()
        .get(0);
    assert_eq!(cycles, 1, "only the cycle that just ran is left");
}

#[test]
fn the_queue_and_its_history_survive_pg_dump_and_restore() {
    settings(BASE_SETTINGS);
    let (db, _) = queued_db("queue_dump", 3);
    let mut c = db.client();
    claim(&mut c, "w1", 1);
    let before: Vec<(i64, String)> = c
        .query(
            "SELECT id, state FROM orphan_cleanup.deletion_queue ORDER BY id",
            &[],
        )
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    let audit_before: i64 = c
        .query_one("SELECT count(*) FROM orphan_cleanup.audit_log", &[])
        .unwrap()
        .get(0);

    let restored = TestDb {
        name: "queue_dump_restored".into(),
    };
    let mut admin = connect("postgres");
    admin
        .batch_execute("DROP DATABASE IF EXISTS queue_dump_restored WITH (FORCE)")
        .unwrap();
    admin
        .batch_execute("CREATE DATABASE queue_dump_restored")
        .unwrap();
    let port = port().to_string();
    let dump = std::process::Command::new("/usr/lib/postgresql/15/bin/pg_dump")
        .args([
            "-h",
            "127.0.0.1",
            "-p",
            &port,
            "-U",
            "postgres",
            "-Fc",
            "-d",
            &db.name,
        ])
        .run();
    assert!(
        dump.status.success(),
        "{}",
        String::from_utf8_lossy(&dump.stderr)
    );
    let dir = e2e::storage::TempDir::new("dump");
    let file = dir.0.join("queue.dump");
    std::fs::write(&file, &dump.stdout).unwrap();
    let out = std::process::Command::new("/usr/lib/postgresql/15/bin/pg_restore")
        .args([
            "-h",
            "127.0.0.1",
            "-p",
            &port,
            "-U",
            "postgres",
            "--exit-on-error",
            "-d",
            &restored.name,
        ])
        .arg(&file)
        .run();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let mut r = restored.client();
    let after: Vec<(i64, String)> = r
        .query(
            "SELECT id, state FROM orphan_cleanup.deletion_queue ORDER BY id",
            &[],
        )
        .unwrap()
        .iter()
        .map(|x| (x.get(0), x.get(1)))
        .collect();
    assert_eq!(after, before);
    let audit_after: i64 = r
        .query_one("SELECT count(*) FROM orphan_cleanup.audit_log", &[])
        .unwrap()
        .get(0);
    assert_eq!(audit_after, audit_before);
    // The restored database has new table OIDs: claims refuse until attach() confirms them.
    let err = r
        .query("SELECT * FROM orphan_cleanup.claim('w2', 10)", &[])
        .unwrap_err();
    assert!(db_error(&err).contains("attach()"), "{}", db_error(&err));
    restored.attach();
    assert_eq!(claim(&mut r, "w2", 10).len(), 2);
}

#[test]
fn a_claim_commits_durably_even_when_the_session_does_not() {
    // With synchronous_commit off, a crash could forget a claim whose files the reaper has
    // already deleted; a later save would then "rescue" a row whose file is gone.
    settings(BASE_SETTINGS);
    let (db, _) = queued_db("queue_durable_claim", 1);
    let mut c = db.client();
    c.batch_execute("SET synchronous_commit = off").unwrap();
    let mut tx = c.transaction().unwrap();
    let ids = claim(&mut tx, "w1", 10).ids;
    assert_eq!(ids.len(), 1);
    let during: String = tx.query_one("SHOW synchronous_commit", &[]).unwrap().get(0);
    assert_eq!(
        during, "on",
        "the claim's transaction commits synchronously"
    );
    tx.commit().unwrap();
    let after: String = c.query_one("SHOW synchronous_commit", &[]).unwrap().get(0);
    assert_eq!(
        after, "off",
        "the session's own setting comes back afterwards"
    );
}

/// Claims as the reaper does since 0.2.0: its buckets, its hosts, and its own (home) host.
fn claim_serving(
    c: &mut postgres::Client,
    worker: &str,
    buckets: Option<&[&str]>,
    hosts: Option<&[&str]>,
    home: Option<&str>,
) -> Vec<(i64, Option<String>)> {
    let buckets: Option<Vec<String>> = buckets.map(|b| b.iter().map(|s| s.to_string()).collect());
    let hosts: Option<Vec<String>> = hosts.map(|h| h.iter().map(|s| s.to_string()).collect());
    c.query(
        "SELECT id, host FROM orphan_cleanup.claim($1, 100, '5 minutes', $2, $3, $4)",
        &[&worker, &buckets, &hosts, &home],
    )
    .unwrap()
    .iter()
    .map(|r| (r.get(0), r.get(1)))
    .collect()
}

#[test]
fn claim_hands_a_reaper_only_the_rows_of_its_buckets_and_hosts() {
    let hosts = format!("{HOST},staging.example.com");
    settings(&[
        ("allowed_buckets", "renders,thumbs"),
        ("allowed_hosts", &hosts),
    ]);
    let db = TestDb::attached("queue_claim_hosts");
    let mut c = db.client();
    for (url, tag) in [
        (public_url("renders", "p.png"), "production"),
        (
            "https://staging.example.com/storage/v1/object/public/renders/s.png".to_string(),
            "staging",
        ),
        ("renders/bare.png".to_string(), "bare"),
        (public_url("thumbs", "t.png"), "other bucket"),
    ] {
        job(&mut c, "completed", Some(&url), "2 hours", tag);
    }
    assert_eq!(cycle(&mut c).2, 4);

    // Hosts are compared as the parser spells them (lower case), whatever the reaper sent.
    let got = claim_serving(
        &mut c,
        "prod",
        Some(&["renders"]),
        Some(&["ABCD.supabase.co"]),
        Some("abcd.supabase.co:443"),
    );
    let hosts_got: BTreeSet<Option<String>> = got.iter().map(|(_, h)| h.clone()).collect();
    assert_eq!(
        hosts_got,
        BTreeSet::from([Some(HOST.to_string()), None]),
        "its own host's row and the bare row, which every reaper serves"
    );
    let (left, what): (i64, String) = c
        .query_one(
            "SELECT passed_over, passed_over_what FROM orphan_cleanup.reapers WHERE reaper = 'prod'",
            &[],
        )
        .map(|r| (r.get(0), r.get(1)))
        .unwrap();
    assert_eq!(
        left, 2,
        "the staging row and the thumbs row were left to others"
    );
    assert_eq!(
        what,
        format!("renders @ staging.example.com, thumbs @ {HOST}")
    );
    let detail: String = c
        .query_one(
            "SELECT detail FROM orphan_cleanup.health() WHERE check_name = 'reaper allow-lists'",
            &[],
        )
        .unwrap()
        .get(0);
    assert!(
        detail.contains("2 ready rows are served by no reaper active in the last 15 minutes")
            && detail.contains("reaper prod (buckets renders; hosts abcd.supabase.co) left ready rows it does not serve"),
        "{detail}"
    );

    // A reaper that serves the rest takes it, and nothing is left unserved.
    let got = claim_serving(
        &mut c,
        "staging",
        Some(&["renders", "thumbs"]),
        Some(&["staging.example.com", HOST]),
        Some("staging.example.com"),
    );
    assert_eq!(got.len(), 2);
    let unserved: i64 = c
        .query_one("SELECT unserved FROM orphan_cleanup.queue_status()", &[])
        .unwrap()
        .get(0);
    assert_eq!(unserved, 0);

    // Hosts that are not bare hosts are refused, naming the argument, the value and the fix.
    for (args, named) in [
        (
            "ARRAY['']",
            "hosts is not a list of hosts a reaper can serve: an entry is empty or NULL",
        ),
        (
            "ARRAY[NULL]",
            "hosts is not a list of hosts a reaper can serve: an entry is empty or NULL",
        ),
        (
            "ARRAY['https://abcd.supabase.co/']",
            "hosts \"https://abcd.supabase.co/\" is not a host a reaper can serve",
        ),
        (
            "ARRAY['a.co,b.co']",
            "hosts \"a.co,b.co\" is not a host a reaper can serve",
        ),
        (
            "ARRAY['abcd.supabase.co'], 'https://abcd.supabase.co'",
            "home_host \"https://abcd.supabase.co\" is not a host a reaper can serve",
        ),
        (
            "ARRAY['abcd.supabase.co'], ''",
            "home_host is not a list of hosts a reaper can serve: an entry is empty or NULL",
        ),
    ] {
        let e = c
            .query(
                &format!("SELECT * FROM orphan_cleanup.claim('x', 10, '5 minutes', ARRAY['renders'], {args})"),
                &[],
            )
            .unwrap_err();
        let text = db_error(&e);
        assert!(
            text.contains(named) && text.contains("HINT: Pass bare hosts"),
            "{args}: {text}"
        );
    }
    let e = c
        .query(
            "SELECT * FROM orphan_cleanup.claim('x', 10, '5 minutes', '{}')",
            &[],
        )
        .unwrap_err();
    assert!(
        db_error(&e).contains("buckets must name at least one bucket"),
        "{}",
        db_error(&e)
    );
    let e = c
        .query(
            "SELECT * FROM orphan_cleanup.claim('x', 10, '5 minutes', ARRAY['renders', NULL])",
            &[],
        )
        .unwrap_err();
    assert!(
        db_error(&e)
            .contains("buckets must name at least one bucket, with no NULL or empty entries"),
        "{}",
        db_error(&e)
    );
}

#[test]
fn bare_rows_go_only_to_a_reaper_of_this_project() {
    // A bare bucket/key value names no host: it is this database's project's object. A staging
    // reaper pointed at production's database must not take it: it would delete staging's
    // object of the same name, or find none and close production's row, leaking its file.
    settings(BASE_SETTINGS);
    let db = TestDb::attached("queue_bare_rows");
    let mut c = db.client();
    job(
        &mut c,
        "completed",
        Some("renders/bare.png"),
        "2 hours",
        "bare",
    );
    assert_eq!(cycle(&mut c).2, 1);
    let staging = Some("staging.supabase.co");
    assert!(
        claim_serving(
            &mut c,
            "staging",
            Some(&["renders"]),
            Some(&["staging.supabase.co"]),
            staging
        )
        .is_empty(),
        "not the staging reaper's"
    );
    assert!(
        claim_serving(&mut c, "hostless", Some(&["renders"]), Some(&[]), None).is_empty(),
        "nor a caller that names hosts but not its own"
    );
    let (status, detail) = allow_list_health(&mut c);
    assert_eq!(status, "warning");
    assert!(
        detail.contains("reaper staging (buckets renders; hosts staging.supabase.co) is another project's: its own host staging.supabase.co is not one of orphan_cleanup.allowed_hosts, so it is handed nothing")
            && detail.contains("reaper hostless (buckets renders; hosts ) is another project's: its own host (unsaid)"),
        "{detail}"
    );
    assert_eq!(
        claim_serving(
            &mut c,
            "production",
            Some(&["renders"]),
            Some(&[HOST]),
            Some(HOST)
        )
        .len(),
        1,
        "the reaper whose own host is in allowed_hosts takes it"
    );
}

#[test]
fn with_no_allowed_hosts_reapers_of_two_projects_on_one_queue_are_named() {
    // allowed_hosts empty: only bare values are queued, and the database cannot tell which
    // project a reaper belongs to. It hands bare rows to any reaper, and says so when reapers
    // with different own hosts claim from the same queue.
    settings(&[("allowed_buckets", "renders")]);
    let db = TestDb::attached("queue_two_projects");
    let mut c = db.client();
    job(
        &mut c,
        "completed",
        Some("renders/bare.png"),
        "2 hours",
        "bare",
    );
    assert_eq!(cycle(&mut c).2, 1);
    assert_eq!(
        claim_serving(
            &mut c,
            "a",
            Some(&["renders"]),
            Some(&["abcd.supabase.co"]),
            Some("abcd.supabase.co")
        )
        .len(),
        1
    );
    let (status, _) = allow_list_health(&mut c);
    assert_eq!(status, "ok", "one project's reapers: nothing to say");
    claim_serving(
        &mut c,
        "b",
        Some(&["renders"]),
        Some(&["wxyz.supabase.co"]),
        Some("wxyz.supabase.co"),
    );
    let (status, detail) = allow_list_health(&mut c);
    assert_eq!(status, "warning");
    assert!(
        detail.contains("reapers of different projects claim from this queue (a at abcd.supabase.co, b at wxyz.supabase.co)")
            && detail.contains("set allowed_hosts to this project's host"),
        "{detail}"
    );
}

#[test]
fn a_claim_never_waits_for_the_reapers_bookkeeping() {
    // Anyone with the reaper role can name any worker id. A transaction left open after a claim
    // holds that reaper's bookkeeping row; the real reaper's claims must not wait for it.
    settings(BASE_SETTINGS);
    let (db, _) = queued_db("queue_registry_busy", 2);
    let mut squatter = db.client();
    let mut tx = squatter.transaction().unwrap();
    tx.query(
        "SELECT * FROM orphan_cleanup.claim('w', 1, '5 minutes', ARRAY['renders'], ARRAY['abcd.supabase.co'], 'abcd.supabase.co')",
        &[],
    )
    .unwrap();
    let mut c = db.client();
    c.batch_execute("SET statement_timeout = '5s'").unwrap();
    let got = claim_serving(&mut c, "w", Some(&["renders"]), Some(&[HOST]), Some(HOST));
    assert_eq!(got.len(), 1, "the other row, at once");
    tx.rollback().unwrap();
}

#[test]
fn stuck_rows_refused_by_every_reaper_are_reported_however_old_the_refusal() {
    settings(BASE_SETTINGS);
    let (db, _) = queued_db("queue_refused_stuck", 1);
    let mut c = db.client();
    let ids = claim_sql(
        &mut c,
        "SELECT id, lease_token FROM orphan_cleanup.claim('r', 100, '5 minutes', ARRAY['renders'], $1, $2)",
        &[&vec![HOST.to_string()], &HOST],
    );
    c.query(
        "SELECT * FROM orphan_cleanup.refuse('r', $1, $2, 'not today')",
        &[&ids.lease, &ids.ids],
    )
    .unwrap();
    // The refusal is a day old; the reaper still claims (and is still the only one).
    c.batch_execute("UPDATE orphan_cleanup.refusals SET at = now() - interval '1 day'")
        .unwrap();
    assert!(claim_serving(&mut c, "r", Some(&["renders"]), Some(&[HOST]), Some(HOST)).is_empty());
    let (status, detail) = allow_list_health(&mut c);
    assert_eq!(status, "warning", "{detail}");
    assert!(
        detail.contains("1 ready rows are served by no reaper active in the last 15 minutes")
            && detail.contains("refused by every reaper that serves it"),
        "{detail}"
    );
    let unserved: i64 = c
        .query_one("SELECT unserved FROM orphan_cleanup.queue_status()", &[])
        .unwrap()
        .get(0);
    assert_eq!(unserved, 1);
}

#[test]
fn a_reaper_refusing_rows_gives_them_back_and_is_never_handed_them_again() {
    settings(BASE_SETTINGS);
    let (db, _) = queued_db("queue_refuse", 3);
    let mut c = db.client();
    // A reaper that names no hosts (it serves any): its own allow-list refuses what it is handed.
    let old_claim = |c: &mut postgres::Client| -> Claim {
        let buckets = vec!["renders".to_string()];
        claim_sql(
            c,
            "SELECT id, lease_token FROM orphan_cleanup.claim($1, $2, $3::text::interval, $4)",
            &[&"old-reaper", &100i32, &"300 seconds", &buckets],
        )
    };
    let ids = old_claim(&mut c);
    assert_eq!(ids.len(), 3);
    let reason =
        format!("host \"{HOST}\" is not in the host allow-list (it may be another project's)");
    // What a reaper older than 0.2.0 sent, word for word: its refusal as a failure that is not
    // retryable, which dead-lettered rows a well-configured reaper would delete. It has no lease
    // token, and is told so; the rows stay its until their lease ends.
    let e = c
        .query(
            "SELECT id, result FROM orphan_cleanup.fail($1, $2, $3, $4)",
            &[
                &"old-reaper",
                &ids.ids,
                &format!("refused by the reaper: {reason}"),
                &false,
            ],
        )
        .unwrap_err();
    assert!(
        db_error(&e).contains("fail() needs the lease token that claim() returned")
            && db_error(&e).contains("reaper 0.2.0"),
        "{}",
        db_error(&e)
    );
    assert_eq!(state_of(&mut c, ids[0]), ("claimed".to_string(), 0));
    let res = results(
        c.query(
            "SELECT id, result FROM orphan_cleanup.refuse($1, $2, $3, $4)",
            &[&"old-reaper", &ids.lease, &ids.ids, &reason],
        )
        .unwrap(),
    );
    assert!(res.iter().all(|(_, r)| r == "given back"), "{res:?}");
    for id in ids.iter() {
        assert_eq!(
            state_of(&mut c, *id),
            ("pending".to_string(), 0),
            "no attempt counted"
        );
    }
    let dead: i64 = c
        .query_one(
            "SELECT count(*) FROM orphan_cleanup.audit_log WHERE action = 'dead_lettered'",
            &[],
        )
        .unwrap()
        .get(0);
    assert_eq!(dead, 0);
    let audited: i64 = c
        .query_one(
            "SELECT count(*) FROM orphan_cleanup.audit_log WHERE action = 'released' AND actor = 'old-reaper'
               AND detail LIKE 'refused by the reaper''s own allow-list, given back for another reaper: host %'",
            &[],
        )
        .unwrap()
        .get(0);
    assert_eq!(audited, 3, "every refusal is audited");

    // Never handed to that reaper again, so it cannot take them over and over...
    assert!(old_claim(&mut c).is_empty());
    // ...and the DBA sees who refused what.
    let (refused, named): (i64, Option<String>) = c
        .query_one(
            "SELECT refused_by_reapers, misconfigured_reapers FROM orphan_cleanup.queue_status()",
            &[],
        )
        .map(|r| (r.get(0), r.get(1)))
        .unwrap();
    assert_eq!(refused, 3);
    let named = named.unwrap_or_default();
    assert!(
        named.contains("reaper old-reaper (buckets renders; hosts any) says nothing of the hosts it serves")
            && named.contains("and refused 3 rows it was handed (host \"abcd.supabase.co\" is not in the host allow-list"),
        "{named}"
    );
    let (status, detail): (String, String) = c
        .query_one(
            "SELECT status, detail FROM orphan_cleanup.health() WHERE check_name = 'reaper allow-lists'",
            &[],
        )
        .map(|r| (r.get(0), r.get(1)))
        .unwrap();
    assert_eq!(status, "warning");
    assert!(
        detail.contains("old-reaper") && detail.contains("SUPABASE_URL"),
        "{detail}"
    );

    // Another reaper gets them at once, with no back-off.
    let new = claim(&mut c, "new-reaper", 100);
    assert_eq!(new.len(), 3);

    // refuse() itself: only the holder's claims, with a reason.
    let e = c
        .query(
            "SELECT * FROM orphan_cleanup.refuse('new-reaper', $1, $2, '')",
            &[&new.lease, &ids.ids],
        )
        .unwrap_err();
    assert!(
        db_error(&e).contains("reason must say why"),
        "{}",
        db_error(&e)
    );
    let res = results(
        c.query(
            "SELECT * FROM orphan_cleanup.refuse('someone-else', $1, $2, 'not mine')",
            &[&new.lease, &ids.ids],
        )
        .unwrap(),
    );
    assert!(
        res.iter()
            .all(|(_, r)| r == "not given back: lease lost, the row is now claimed by new-reaper"),
        "{res:?}"
    );
}

#[test]
fn a_reaper_whose_lists_change_may_be_handed_what_it_refused_before() {
    // A DBA fixes a reaper's --storage-hosts and restarts it under the same --worker-id: the
    // rows it refused with its old lists are its to delete now.
    settings(BASE_SETTINGS);
    let (db, _) = queued_db("queue_refuse_fixed", 2);
    let mut c = db.client();
    // Its old lists: every host (as a reaper older than 0.2.0 claims).
    let old_lists = None;
    let ids = claim_sql(
        &mut c,
        "SELECT id, lease_token FROM orphan_cleanup.claim('r', 100, '5 minutes', ARRAY['renders'], NULL, $1)",
        &[&HOST],
    );
    assert_eq!(ids.len(), 2);
    c.query(
        "SELECT * FROM orphan_cleanup.refuse('r', $1, $2, 'not my host')",
        &[&ids.lease, &ids.ids],
    )
    .unwrap();
    assert!(claim_serving(&mut c, "r", Some(&["renders"]), old_lists, Some(HOST)).is_empty());
    assert_eq!(
        claim_serving(&mut c, "r", Some(&["renders"]), Some(&[HOST]), Some(HOST)).len(),
        2
    );
}

#[test]
fn a_reaper_of_another_project_is_handed_nothing_even_rows_of_hosts_it_lists() {
    // A reaper deletes through its own SUPABASE_URL whatever host a row names. A staging reaper
    // whose --storage-hosts was copied from production would delete staging's objects of the
    // same names and close production's rows: its own host decides, not its list.
    settings(BASE_SETTINGS);
    let (db, _) = queued_db("queue_other_project", 3);
    let mut c = db.client();
    let staging = Some("staging.supabase.co");
    assert!(claim_serving(
        &mut c,
        "staging",
        Some(&["renders"]),
        Some(&["staging.supabase.co", HOST]),
        staging
    )
    .is_empty());
    let (_, detail) = allow_list_health(&mut c);
    assert!(
        detail.contains("3 ready rows are served by no reaper")
            && detail.contains("reaper staging (buckets renders; hosts staging.supabase.co,abcd.supabase.co) is another project's"),
        "{detail}"
    );
    assert_eq!(
        claim_serving(
            &mut c,
            "production",
            Some(&["renders"]),
            Some(&[HOST]),
            Some(HOST)
        )
        .len(),
        3
    );
}

#[test]
fn a_reaper_older_than_0_2_0_is_named_for_saying_nothing_of_its_hosts() {
    settings(BASE_SETTINGS);
    let (db, _) = queued_db("queue_legacy_named", 1);
    let mut c = db.client();
    let buckets = vec!["renders".to_string()];
    c.query(
        "SELECT id FROM orphan_cleanup.claim($1, $2, $3::text::interval, $4)",
        &[&"old-reaper", &100i32, &"300 seconds", &buckets],
    )
    .unwrap();
    let (status, detail) = allow_list_health(&mut c);
    assert_eq!(status, "warning");
    assert!(
        detail.contains("reaper old-reaper (buckets renders; hosts any) says nothing of the hosts it serves (a reaper older than 0.2.0), so it is handed rows of every host: upgrade it"),
        "{detail}"
    );
}

#[test]
fn allow_lists_of_only_spaces_and_commas_read_as_empty() {
    // ' , ' parses as no host at all: bare values only, as with ''; a raw = '' test stranded
    // every bare row. And ' ' for buckets must refuse like '' does, not reject the queue.
    settings(&[("allowed_buckets", "renders"), ("allowed_hosts", " , ")]);
    let db = TestDb::attached("queue_blank_lists");
    let mut c = db.client();
    job(
        &mut c,
        "completed",
        Some("renders/bare.png"),
        "2 hours",
        "bare",
    );
    assert_eq!(cycle(&mut c).2, 1);
    assert_eq!(
        claim_serving(&mut c, "r", Some(&["renders"]), Some(&[HOST]), Some(HOST)).len(),
        1
    );
    settings(&[("allowed_buckets", " "), ("allowed_hosts", " , ")]);
    let e = c
        .query("SELECT * FROM orphan_cleanup.claim('r', 10)", &[])
        .unwrap_err();
    assert!(
        db_error(&e).contains("orphan_cleanup.allowed_buckets is empty"),
        "{}",
        db_error(&e)
    );
    assert_eq!(cycle(&mut c).0, "failed", "a cycle refuses too");
}

#[test]
fn health_asks_whether_a_reaper_runs_when_rows_have_waited_an_hour() {
    settings(BASE_SETTINGS);
    let (db, _) = queued_db("queue_no_reaper", 2);
    let mut c = db.client();
    let (status, _) = allow_list_health(&mut c);
    assert_eq!(status, "ok", "rows just queued: nothing to say yet");
    c.batch_execute(
        "UPDATE orphan_cleanup.deletion_queue SET available_at = now() - interval '2 hours'",
    )
    .unwrap();
    let (status, detail) = allow_list_health(&mut c);
    assert_eq!(status, "warning");
    assert!(
        detail.contains("no reaper has claimed in the last hour: is a reaper running"),
        "{detail}"
    );
}

/// cancel_prefix() cancels the pending rows under a prefix, and only those: the prefix is literal
/// ('_' is no wildcard), other folders and buckets keep their rows, a claimed row under it is
/// named with its reaper, the objects are kept (a later cycle queues nothing for them), and each
/// cancellation is audited. NULL is refused by name.
#[test]
fn cancel_prefix_keeps_a_folder() {
    settings(BASE_SETTINGS);
    let db = TestDb::attached("queue_cancel_prefix");
    let mut c = db.client();
    for key in [
        "keep/a.png",
        "keep/b.png",
        "keep/sub/c.png",
        "kee_/d.png",
        "other/e.png",
    ] {
        job(
            &mut c,
            "completed",
            Some(&public_url("renders", key)),
            "2 hours",
            "prefix",
        );
    }
    assert_eq!(cycle(&mut c).2, 5);
    // The reaper holds keep/a.png's row (the first queued).
    let claimed = claim(&mut c, "w1", 1).ids;
    let held: String = c
        .query_one(
            "SELECT object_path FROM orphan_cleanup.deletion_queue WHERE id = $1",
            &[&claimed[0]],
        )
        .unwrap()
        .get(0);
    assert_eq!(held, "keep/a.png");
    let answers: Vec<(String, String)> = c
        .query(
            "SELECT d.object_path, c.result FROM orphan_cleanup.cancel_prefix('renders', 'keep/') AS c
               JOIN orphan_cleanup.deletion_queue AS d ON d.id = c.id ORDER BY d.object_path",
            &[],
        )
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    assert_eq!(answers.len(), 3, "{answers:?}");
    assert!(
        answers[0].1.starts_with("not cancelled: claimed by w1"),
        "{answers:?}"
    );
    assert_eq!(answers[1], ("keep/b.png".into(), "cancelled".into()));
    assert_eq!(answers[2], ("keep/sub/c.png".into(), "cancelled".into()));
    let states: Vec<(String, String)> = c
        .query(
            "SELECT object_path, state FROM orphan_cleanup.deletion_queue ORDER BY object_path",
            &[],
        )
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    assert_eq!(
        states,
        [
            ("kee_/d.png", "pending"),
            ("keep/a.png", "claimed"),
            ("keep/b.png", "cancelled"),
            ("keep/sub/c.png", "cancelled"),
            ("other/e.png", "pending"),
        ]
        .map(|(p, s)| (p.to_string(), s.to_string()))
    );
    let audited: i64 = c
        .query_one(
            "SELECT count(*) FROM orphan_cleanup.audit_log WHERE action = 'cancelled'",
            &[],
        )
        .unwrap()
        .get(0);
    assert_eq!(audited, 2);
    // Another bucket's prefix cancels nothing; NULL is refused.
    let none: i64 = c
        .query_one(
            "SELECT count(*) FROM orphan_cleanup.cancel_prefix('thumbs', 'keep/')",
            &[],
        )
        .unwrap()
        .get(0);
    assert_eq!(none, 0);
    let e = c
        .query(
            "SELECT * FROM orphan_cleanup.cancel_prefix('renders', NULL)",
            &[],
        )
        .unwrap_err();
    assert!(
        db_error(&e).contains("bucket and prefix must not be NULL"),
        "{}",
        db_error(&e)
    );
    // A later full sweep does not queue the kept objects again.
    settings(&[
        ("allowed_buckets", "renders"),
        ("allowed_hosts", HOST),
        ("full_sweep_interval", "0"),
    ]);
    cycle(&mut c);
    let pending_keep: i64 = c
        .query_one(
            "SELECT count(*) FROM orphan_cleanup.deletion_queue WHERE state = 'pending' AND object_path LIKE 'keep/%'",
            &[],
        )
        .unwrap()
        .get(0);
    assert_eq!(pending_keep, 0);
}
