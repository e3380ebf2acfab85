//! The save guard, interleaving by interleaving. Each test drives two or three sessions step by
//! step; a step that must block is observed with pg_blocking_pids(), never with sleeps.
//!
//! The invariant: once a row has been handed to a reaper, no committed user_assets row
//! references its job, and none can commit afterwards.

use e2e::*;

const REFUSED: &str = "OC001";

/// One queued orphan; returns the database and its job.
fn one_queued(name: &str) -> (TestDb, uuid_text::Uuid) {
    settings(BASE_SETTINGS);
    let db = TestDb::attached(name);
    let mut c = db.client();
    let j = job(
        &mut c,
        "completed",
        Some(&public_url("renders", &format!("{name}/out.png"))),
        "2 hours",
        "orphan",
    );
    assert_eq!(cycle(&mut c).2, 1);
    (db, j)
}

fn saved_assets(c: &mut postgres::Client, j: &uuid_text::Uuid) -> i64 {
    c.query_one(
        "SELECT count(*) FROM user_assets WHERE orphan_cleanup.job_ref_key(metadata->>'render_job_id') = $1",
        &[&j.0],
    )
    .unwrap()
    .get(0)
}

fn audit_count(c: &mut impl postgres::GenericClient, j: &uuid_text::Uuid, action: &str) -> i64 {
    c.query_one("SELECT count(*) FROM orphan_cleanup.audit_log WHERE job_id = $1::text::uuid AND action = $2", &[&j.0, &action])
        .unwrap()
        .get(0)
}

fn refused_count(c: &mut postgres::Client) -> i64 {
    c.query_one(
        "SELECT value FROM orphan_cleanup.validation_report() WHERE metric = 'saves refused'",
        &[],
    )
    .unwrap()
    .get(0)
}

#[test]
fn a_save_before_any_claim_rescues_the_row() {
    let (db, j) = one_queued("guard_rescue");
    let mut c = db.client();
    save(&mut c, "generated_saved", &j.0).expect("the save succeeds");
    assert_eq!(queue_states(&mut c, &j), vec!["rescued"]);
    assert_eq!(audit_count(&mut c, &j, "rescued"), 1);
    assert!(
        claim(&mut c, "w1", 10).is_empty(),
        "a rescued row is never handed out"
    );
}

#[test]
fn a_save_spelled_differently_rescues_too() {
    let (db, j) = one_queued("guard_spelling");
    let mut c = db.client();
    save(
        &mut c,
        "generated_saved",
        &format!(" {{{}}} ", j.0.to_uppercase()),
    )
    .expect("the save succeeds");
    assert_eq!(queue_states(&mut c, &j), vec!["rescued"]);
}

#[test]
fn a_save_after_a_claim_is_refused_with_its_own_sqlstate() {
    let (db, j) = one_queued("guard_refuse");
    let mut c = db.client();
    let ids = claim(&mut c, "w1", 10);
    assert_eq!(ids.len(), 1);
    let err = save(&mut c, "generated_saved", &j.0).unwrap_err();
    let db_err = err.as_db_error().expect("a database error");
    assert_eq!(db_err.code().code(), REFUSED);
    assert!(
        db_err.message().contains(&j.0) && db_err.message().contains("expired as an orphan"),
        "{}",
        db_err.message()
    );
    assert!(db_err.hint().unwrap().contains("Render the job again"));
    assert_eq!(saved_assets(&mut c, &j), 0);
    assert_eq!(refused_count(&mut c), 1);
    // The refusal rolled back its own transaction, but it is audited: the next cycle writes the
    // row noted in shared memory. The managed edition has no shared memory: it counts the
    // refusal (above) and audits no row for it (README, "What differs from the extension").
    assert_eq!(audit_count(&mut c, &j, "refused"), 0);
    cycle(&mut c);
    if managed() {
        assert_eq!(audit_count(&mut c, &j, "refused"), 0);
    } else {
        assert_eq!(audit_count(&mut c, &j, "refused"), 1);
        let actor: String = c
            .query_one("SELECT actor FROM orphan_cleanup.audit_log WHERE action = 'refused' AND job_id = $1::text::uuid", &[&j.0])
            .unwrap()
            .get(0);
        assert_eq!(actor, "postgres");
    }

    // Released (file maybe gone), still refused. Confirmed and job row deleted: still refused.
    c.query_one(
        "SELECT orphan_cleanup.release('w1', $1, NULL, NULL)",
        &[&ids.lease],
    )
    .unwrap();
    assert_eq!(
        save(&mut c, "generated_saved", &j.0)
            .unwrap_err()
            .code()
            .unwrap()
            .code(),
        REFUSED
    );
    let ids = claim(&mut c, "w1", 10);
    c.query(
        "SELECT * FROM orphan_cleanup.confirm('w1', $1, $2, 'deleted')",
        &[&ids.lease, &ids.ids],
    )
    .unwrap();
    assert_eq!(
        save(&mut c, "generated_saved", &j.0)
            .unwrap_err()
            .code()
            .unwrap()
            .code(),
        REFUSED
    );
    assert_eq!(refused_count(&mut c), 3);
    let health: String = c
        .query_one(
            "SELECT status FROM orphan_cleanup.health() WHERE check_name = 'refused saves'",
            &[],
        )
        .unwrap()
        .get(0);
    assert_eq!(health, "warning");
}

#[test]
fn an_update_that_points_an_asset_at_a_claimed_job_is_refused() {
    let (db, j) = one_queued("guard_update");
    let mut c = db.client();
    c.execute("INSERT INTO user_assets (asset_type, metadata) VALUES ('generated_saved', '{\"render_job_id\": \"none\"}')", &[]).unwrap();
    claim(&mut c, "w1", 10);
    let err = c
        .execute(
            "UPDATE user_assets SET metadata = jsonb_build_object('render_job_id', $1::text)",
            &[&j.0],
        )
        .unwrap_err();
    assert_eq!(err.code().unwrap().code(), REFUSED);
}

#[test]
fn a_save_in_flight_makes_claims_skip_the_row() {
    let (db, j) = one_queued("guard_inflight_save");
    let mut saver = db.client();
    let mut reaper = db.client();
    let mut tx = saver.transaction().unwrap();
    tx.execute("INSERT INTO user_assets (asset_type, metadata) VALUES ('generated_saved', jsonb_build_object('render_job_id', $1::text))", &[&j.0])
        .unwrap();
    // The claim does not wait for the save: it skips the row.
    assert!(claim(&mut reaper, "w1", 10).is_empty());
    tx.commit().unwrap();
    assert!(claim(&mut reaper, "w1", 10).is_empty());
    assert_eq!(queue_states(&mut reaper, &j), vec!["rescued"]);
    assert_eq!(audit_count(&mut reaper, &j, "claimed"), 0);
}

#[test]
fn a_claim_that_finds_a_row_busy_leaves_a_repeatable_read_save_free_to_succeed() {
    // The app marks the job, then saves it, in one REPEATABLE READ transaction. A claim in
    // between finds the job held and passes the row over. It once moved the row's available_at
    // (so that busy rows could not block the queue's head): the save, which locks that row,
    // then failed with a serialization error although nothing had been handed out.
    let (db, j) = one_queued("guard_busy_rr");
    let mut app = db.client();
    let mut reaper = db.client();
    let mut tx = app
        .build_transaction()
        .isolation_level(postgres::IsolationLevel::RepeatableRead)
        .start()
        .unwrap();
    tx.execute(
        "UPDATE render_jobs SET prompt = prompt || ' (kept)' WHERE id = $1::text::uuid",
        &[&j.0],
    )
    .unwrap();
    assert!(claim(&mut reaper, "w1", 10).is_empty(), "the job is held");
    tx.execute("INSERT INTO user_assets (asset_type, metadata) VALUES ('generated_saved', jsonb_build_object('render_job_id', $1::text))", &[&j.0])
        .expect("the save succeeds: nothing was handed out");
    tx.commit().unwrap();
    assert_eq!(queue_states(&mut reaper, &j), vec!["rescued"]);
    assert_eq!(saved_assets(&mut reaper, &j), 1);
}

#[test]
fn a_save_that_began_before_the_cycle_cannot_slip_through() {
    settings(BASE_SETTINGS);
    let db = TestDb::attached("guard_before_cycle");
    let mut c = db.client();
    let j = job(
        &mut c,
        "completed",
        Some(&public_url("renders", "early/out.png")),
        "2 hours",
        "orphan",
    );
    // 1. The save starts before the cycle looks; it is not committed yet.
    let mut saver = db.client();
    let mut tx = saver.transaction().unwrap();
    tx.execute("INSERT INTO user_assets (asset_type, metadata) VALUES ('generated_saved', jsonb_build_object('render_job_id', $1::text))", &[&j.0])
        .unwrap();
    // 2. The cycle cannot see the save and queues the job.
    assert_eq!(cycle(&mut c).2, 1);
    // 3. A claim now skips it: the save holds the job row.
    assert!(claim(&mut c, "w1", 10).is_empty());
    // 4. The save commits; the next claim's re-check sees it and retires the row.
    tx.commit().unwrap();
    assert!(claim(&mut c, "w1", 10).is_empty());
    assert_eq!(queue_states(&mut c, &j), vec!["stale"]);
    let reason: String = c
        .query_one(
            "SELECT reason FROM orphan_cleanup.deletion_queue WHERE job_id = $1::text::uuid",
            &[&j.0],
        )
        .unwrap()
        .get(0);
    assert_eq!(reason, "the job is referenced by an asset");
    assert_eq!(
        audit_count(&mut c, &j, "claimed"),
        0,
        "never handed to a reaper"
    );
    assert_eq!(saved_assets(&mut c, &j), 1);
}

#[test]
fn a_claim_in_flight_makes_the_save_wait_then_refuses_it() {
    let (db, j) = one_queued("guard_inflight_claim");
    let mut reaper = db.client();
    let mut observer = db.client();
    let mut tx = reaper.transaction().unwrap();
    let ids = claim(&mut tx, "w1", 10).ids;
    assert_eq!(ids.len(), 1);

    let name = db.name.clone();
    let job_id = j.0.clone();
    let (saver, saver_pid) = session_in_thread(&name, move |s| save(s, "generated_saved", &job_id));
    wait_until_blocked(&mut observer, saver_pid);
    tx.commit().unwrap();
    let err = saver.join().unwrap().unwrap_err();
    assert_eq!(err.code().unwrap().code(), REFUSED);
    assert_eq!(saved_assets(&mut observer, &j), 0);
}

#[test]
fn a_claim_rolled_back_lets_the_waiting_save_rescue_the_row() {
    let (db, j) = one_queued("guard_claim_rollback");
    let mut reaper = db.client();
    let mut observer = db.client();
    let mut tx = reaper.transaction().unwrap();
    assert_eq!(
        tx.query("SELECT id FROM orphan_cleanup.claim('w1', 10)", &[])
            .unwrap()
            .len(),
        1
    );

    let name = db.name.clone();
    let job_id = j.0.clone();
    let (saver, saver_pid) = session_in_thread(&name, move |s| save(s, "generated_saved", &job_id));
    wait_until_blocked(&mut observer, saver_pid);
    tx.rollback().unwrap();
    saver
        .join()
        .unwrap()
        .expect("the claim never happened, so the save succeeds");
    assert_eq!(queue_states(&mut observer, &j), vec!["rescued"]);
}

#[test]
fn saving_one_of_two_jobs_sharing_an_object_keeps_the_object() {
    settings(BASE_SETTINGS);
    let db = TestDb::attached("guard_shared");
    let mut c = db.client();
    let url = public_url("renders", "shared/out.png");
    let a = job(&mut c, "completed", Some(&url), "2 hours", "orphan");
    let b = job(
        &mut c,
        "completed",
        Some(&format!("{url}?download")),
        "2 hours",
        "orphan",
    );
    assert_eq!(cycle(&mut c).2, 2, "both are orphans, so the object may go");
    save(&mut c, "generated_saved", &b.0).unwrap();
    assert_eq!(
        queue_states(&mut c, &a),
        vec!["rescued"],
        "the other job's row names the same object"
    );
    assert_eq!(queue_states(&mut c, &b), vec!["rescued"]);
    assert!(claim(&mut c, "w1", 10).is_empty());
}

#[test]
fn a_save_of_a_job_sharing_a_claimed_object_is_refused() {
    settings(BASE_SETTINGS);
    let db = TestDb::attached("guard_shared_claimed");
    let mut c = db.client();
    let url = public_url("renders", "shared2/out.png");
    job(&mut c, "completed", Some(&url), "2 hours", "orphan");
    let b = job(&mut c, "completed", Some(&url), "2 hours", "orphan");
    cycle(&mut c);
    assert_eq!(claim(&mut c, "w1", 1).len(), 1);
    // Whichever row was claimed, the object may be gone: saving either job is refused.
    assert_eq!(
        save(&mut c, "generated_saved", &b.0)
            .unwrap_err()
            .code()
            .unwrap()
            .code(),
        REFUSED
    );
}

#[test]
fn a_claim_skips_an_object_while_another_job_sharing_it_is_being_saved() {
    settings(&[
        ("allowed_buckets", "renders"),
        ("allowed_hosts", HOST),
        ("max_per_cycle", "1"),
    ]);
    let db = TestDb::attached("guard_shared_inflight");
    let mut c = db.client();
    let url = public_url("renders", "shared3/out.png");
    let a = job(&mut c, "completed", Some(&url), "3 hours", "orphan");
    let b = job(&mut c, "completed", Some(&url), "2 hours", "orphan");
    assert_eq!(
        cycle(&mut c).2,
        1,
        "only the older job is queued this cycle"
    );
    assert_eq!(queue_states(&mut c, &a), vec!["pending"]);
    let mut saver = db.client();
    let mut tx = saver.transaction().unwrap();
    tx.execute("INSERT INTO user_assets (asset_type, metadata) VALUES ('generated_saved', jsonb_build_object('render_job_id', $1::text))", &[&b.0])
        .unwrap();
    assert!(
        claim(&mut c, "w1", 10).is_empty(),
        "b's save holds the rows that could hand out its object"
    );
    tx.commit().unwrap();
    assert!(claim(&mut c, "w1", 10).is_empty());
    assert_eq!(queue_states(&mut c, &a), vec!["rescued"]);
}

#[test]
fn a_recheck_is_not_taken_while_another_asset_change_of_its_job_is_in_flight() {
    // A job saved twice. One asset is deleted (a recheck); the other's deletion is in flight
    // while a cycle runs. The cycle took the recheck, judged the job still saved, and the
    // job, an orphan once the second deletion committed, waited for the next full sweep.
    settings(BASE_SETTINGS);
    let db = TestDb::attached("guard_recheck_in_flight");
    let mut c = db.client();
    let j = job(
        &mut c,
        "completed",
        Some(&public_url("renders", "twice/out.png")),
        "2 hours",
        "saved twice",
    );
    save(&mut c, "generated_saved", &j.0).unwrap();
    save(&mut c, "generated_saved", &j.0).unwrap();
    assert_eq!(cycle(&mut c).2, 0);
    c.execute(
        "DELETE FROM user_assets WHERE id = (SELECT id FROM user_assets ORDER BY id LIMIT 1)",
        &[],
    )
    .unwrap();
    let mut app = db.client();
    let mut tx = app.transaction().unwrap();
    tx.execute("DELETE FROM user_assets", &[]).unwrap();
    assert_eq!(
        cycle(&mut c).2,
        0,
        "still saved, as far as the cycle can see"
    );
    tx.commit().unwrap();
    assert_eq!(cycle(&mut c).2, 1, "the next cycle looks at the job again");
    assert_eq!(queue_states(&mut c, &j), vec!["pending"]);
}

#[test]
fn deleting_an_asset_makes_its_job_an_orphan_again() {
    settings(BASE_SETTINGS);
    let db = TestDb::attached("guard_unsave");
    let mut c = db.client();
    let j = job(
        &mut c,
        "completed",
        Some(&public_url("renders", "unsave/out.png")),
        "2 hours",
        "saved",
    );
    save(&mut c, "generated_saved", &j.0).unwrap();
    assert_eq!(cycle(&mut c).2, 0);
    c.execute("DELETE FROM user_assets", &[]).unwrap();
    let rechecks: i64 = c
        .query_one("SELECT count(*) FROM orphan_cleanup.recheck", &[])
        .unwrap()
        .get(0);
    assert_eq!(rechecks, 1);
    assert_eq!(cycle(&mut c).2, 1);
    assert_eq!(queue_states(&mut c, &j), vec!["pending"]);
}

#[test]
fn the_guard_fires_under_session_replication_role_replica() {
    let (db, j) = one_queued("guard_replica");
    let mut c = db.client();
    claim(&mut c, "w1", 10);
    c.batch_execute("SET session_replication_role = replica")
        .unwrap();
    let err = save(&mut c, "generated_saved", &j.0).unwrap_err();
    assert_eq!(
        err.code().unwrap().code(),
        REFUSED,
        "the trigger is ENABLE ALWAYS"
    );
}

#[test]
fn a_refused_save_is_audited_even_when_the_cycle_that_took_its_note_rolls_back() {
    if managed() {
        return; // shared-memory notes of refused saves: the extension's alone (README)
    }
    // The note of a refused save leaves shared memory only with the commit of the transaction
    // that wrote its audit row: a cycle rolled back (a DBA's BEGIN ... ROLLBACK, a
    // statement_timeout, a worker terminated mid-cycle) gives it back for the next one.
    let (db, j) = one_queued("guard_refusal_rollback");
    let mut c = db.client();
    assert_eq!(claim(&mut c, "w1", 10).len(), 1);
    let e = save(&mut c, "generated_saved", &j.0).unwrap_err();
    assert_eq!(e.code().unwrap().code(), "OC001");
    let mut tx = c.transaction().unwrap();
    tx.query("SELECT * FROM orphan_cleanup.run_cycle()", &[])
        .unwrap();
    assert_eq!(
        audit_count(&mut tx, &j, "refused"),
        1,
        "the rolled-back cycle wrote it"
    );
    tx.rollback().unwrap();
    assert_eq!(audit_count(&mut c, &j, "refused"), 0);
    cycle(&mut c);
    assert_eq!(
        audit_count(&mut c, &j, "refused"),
        1,
        "the next cycle wrote it again"
    );
    cycle(&mut c);
    assert_eq!(audit_count(&mut c, &j, "refused"), 1, "once, not twice");
}

/// Claims every queued row and tries to save each job; returns the job ids refused.
fn refuse_saves(c: &mut postgres::Client, n: usize, tag: &str) -> Vec<String> {
    let jobs: Vec<String> = (0..n)
        .map(|i| {
            job(
                c,
                "completed",
                Some(&public_url("renders", &format!("{tag}/{i}.png"))),
                "2 hours",
                "orphan",
            )
            .0
        })
        .collect();
    cycle(c);
    claim(c, tag, 10_000);
    for j in &jobs {
        let e = save(c, "generated_saved", j).unwrap_err();
        assert_eq!(e.code().unwrap().code(), "OC001");
    }
    jobs
}

fn refused_audited(c: &mut impl postgres::GenericClient, jobs: &[String]) -> i64 {
    c.query_one(
        "SELECT count(*) FROM orphan_cleanup.audit_log WHERE action = 'refused' AND job_id::text = ANY ($1)",
        &[&jobs],
    )
    .unwrap()
    .get(0)
}

#[test]
fn a_flush_inside_a_savepoint_takes_no_refused_save_notes() {
    if managed() {
        return; // shared-memory notes of refused saves: the extension's alone (README)
    }
    // A savepoint rolled back after taking notes would undo their audit rows while the notes
    // stayed taken until the commit dropped them (psql's ON_ERROR_ROLLBACK does this).
    let (db, _) = one_queued("guard_refusal_savepoint");
    let mut c = db.client();
    let jobs = refuse_saves(&mut c, 1, "sp");
    let mut tx = c.transaction().unwrap();
    tx.batch_execute("SAVEPOINT s").unwrap();
    let taken: i64 = tx
        .query_one("SELECT orphan_cleanup._flush_refusals()", &[])
        .unwrap()
        .get(0);
    assert_eq!(taken, 0, "nothing taken inside a savepoint");
    tx.batch_execute("ROLLBACK TO SAVEPOINT s").unwrap();
    tx.commit().unwrap();
    cycle(&mut c);
    assert_eq!(refused_audited(&mut c, &jobs), 1);
}

#[test]
fn a_transaction_that_took_refused_save_notes_cannot_be_prepared() {
    if managed() {
        return; // shared-memory notes of refused saves: the extension's alone (README)
    }
    let (db, _) = one_queued("guard_refusal_prepare");
    let mut c = db.client();
    let jobs = refuse_saves(&mut c, 1, "prep");
    let mut tx = c.transaction().unwrap();
    let taken: i64 = tx
        .query_one("SELECT orphan_cleanup._flush_refusals()", &[])
        .unwrap()
        .get(0);
    assert_eq!(taken, 1);
    let e = tx
        .batch_execute("PREPARE TRANSACTION 'guard_refusal_prepare'")
        .unwrap_err();
    assert!(
        db_error(&e)
            .contains("cannot PREPARE a transaction that has written refused-save audit rows"),
        "{}",
        db_error(&e)
    );
    drop(tx);
    cycle(&mut c);
    assert_eq!(
        refused_audited(&mut c, &jobs),
        1,
        "the note came back and was written"
    );
}

#[test]
fn a_full_ring_of_notes_drops_one_nobody_is_writing() {
    if managed() {
        return; // shared-memory notes of refused saves: the extension's alone (README)
    }
    // 256 notes fit. A cycle that took the oldest and then rolls back must find it again, even
    // if the ring filled meanwhile: the ring drops an untaken note first.
    let (db, _) = one_queued("guard_refusal_ring");
    let mut c = db.client();
    let first = refuse_saves(&mut c, 1, "ring-first");
    let mut holder = db.client();
    let mut tx = holder.transaction().unwrap();
    let taken: i64 = tx
        .query_one("SELECT orphan_cleanup._flush_refusals()", &[])
        .unwrap()
        .get(0);
    assert_eq!(taken, 1);
    refuse_saves(&mut c, 256, "ring-fill");
    tx.rollback().unwrap();
    cycle(&mut c);
    assert_eq!(
        refused_audited(&mut c, &first),
        1,
        "the taken note survived the full ring"
    );
}

/// Review of issue 14, finding 2: an asset whose render_job_id carried the job's id in a
/// spelling job_ref_key() did not read (JSON-encoded twice, a trailing no-break space, a
/// `urn:uuid:` prefix) referenced no job: its job's file was queued and claimed, and a save
/// after the claim went through. Every spelling that carries the id now protects the file.
#[test]
fn every_spelling_of_a_job_id_in_an_asset_protects_its_file() {
    let spellings = [
        "\"{id}\"",
        "{id}\u{a0}",
        "urn:uuid:{id}",
        "{ID}",
        "job {id}.",
        "id-{id}",
        "job-{id}",
    ];
    settings(BASE_SETTINGS);
    let db = TestDb::attached("guard_ref_spellings");
    let mut c = db.client();
    let insert_asset = |c: &mut postgres::Client, value: &str| {
        c.execute(
            "INSERT INTO user_assets (asset_type, metadata, file_size) VALUES ('generated_saved', jsonb_build_object('render_job_id', $1::text), 1)",
            &[&value],
        )
    };
    let spell = |s: &str, id: &str| s.replace("{id}", id).replace("{ID}", &id.to_uppercase());
    for (i, s) in spellings.iter().enumerate() {
        let j = job(
            &mut c,
            "completed",
            Some(&public_url("renders", &format!("spell/{i}.png"))),
            "2 hours",
            "saved",
        );
        insert_asset(&mut c, &spell(s, &j.0)).unwrap();
    }
    // The guide's definition (an exact match of the id) counts them as orphans; the keeper check
    // reads the reference as the save guard does and keeps every file.
    let (status, _, enqueued, protected, _) = cycle(&mut c);
    assert_eq!(
        (status.as_str(), enqueued, protected),
        ("ok", 0, spellings.len() as i64)
    );

    // A save after the claim, in each spelling, is refused.
    for (i, s) in spellings.iter().enumerate() {
        let j = job(
            &mut c,
            "completed",
            Some(&public_url("renders", &format!("late/{i}.png"))),
            "2 hours",
            "orphan",
        );
        assert_eq!(cycle(&mut c).2, 1);
        assert_eq!(claim(&mut c, &format!("w{i}"), 10).len(), 1);
        let e = insert_asset(&mut c, &spell(s, &j.0)).unwrap_err();
        assert_eq!(e.code().unwrap().code(), "OC001", "{s}: {e}");
    }
}

/// A saved job's output_url in a spelling the strict parser reads as another object than the
/// app means (review of issue 14, finding 1): a URL that lost its scheme (strictly, a bare value
/// in a bucket named after the host; with a port, nothing at all), a route without its leading
/// slash, quotes around a bare
/// value, a bare value with a cache-busting query, a trailing space, the S3 endpoint, and a
/// signed URL whose token makes it longer than any URL the strict parser reads. Another job
/// naming the same file correctly is an orphan. The file must survive: the cycle keeps it, and
/// once the orphan's row is handed out first, the save is refused.
#[test]
fn every_reading_of_a_saved_jobs_url_protects_its_file() {
    let spellings = [
        format!("{HOST}/storage/v1/object/public/renders/{{k}}"),
        "storage/v1/object/public/renders/{k}".to_string(),
        "localhost:8000/storage/v1/object/public/renders/{k}".to_string(),
        "'renders/{k}'".to_string(),
        "renders/{k}?v=2".to_string(),
        format!("{HOST}/storage/v1/object/public/renders/{{k}} "),
        format!("https://{HOST}/storage/v1/s3/renders/{{k}}"),
        format!("https://{HOST}/storage/v1/object/sign/renders/{{k}}?token={}", "t".repeat(5000)),
        // The second review: a newline or a tab inside (a browser deletes them), `..` over an
        // empty segment, padding past 4,096 bytes, the S3 URI, a CDN's path, matrix parameters,
        // an image proxy's URL, markdown.
        format!("https://{HOST}/storage/v1/object/public/renders/{{k}}\n"),
        format!("https://{HOST}/storage/v1/object/pub\tlic/renders/{{k}}"),
        format!("https://{HOST}/storage/v1/object/public/renders//../{{k}}"),
        format!("https://{HOST}/storage/v1/object/public/renders/{}{{k}}", "./".repeat(2100)),
        "s3://renders/{k}".to_string(),
        "https://cdn.example.com/renders/{k}".to_string(),
        format!("https://{HOST}/storage/v1/object/public/renders/{{k}};v=2"),
        format!("https://app.example.com/_next/image?url=https%3A%2F%2F{HOST}%2Fstorage%2Fv1%2Fobject%2Fpublic%2Frenders%2F{{k}}&w=640"),
        format!("![render](https://{HOST}/storage/v1/object/public/renders/{{k}})"),
        // The third review: a name with a space, `&` or `?` inside an embedded URL (encoded
        // there), the browser's `..` inside one, a second URL in text, a raw `?` in a name.
        "see https://h.co/storage/v1/object/public/renders/{k} for the render".to_string(),
        format!("![r](https://{HOST}/storage/v1/object/public/renders//../{{k}})"),
        format!("a https://{HOST}/storage/v1/object/public/renders/other.png b https://{HOST}/storage/v1/object/public/renders/{{k}}"),
        // The storage server's own route, behind no gateway (a self-hosted project's).
        "http://storage:5000/object/public/renders/{k}".to_string(),
        // The fourth review: URLs in a list, markdown images side by side, a URL ending a
        // sentence, a bad escape elsewhere in an encoded URL.
        format!("https://{HOST}/storage/v1/object/public/renders/{{k}},https://{HOST}/storage/v1/object/public/renders/other.png"),
        format!("https://{HOST}/storage/v1/object/public/renders/other.png,https://{HOST}/storage/v1/object/public/renders/{{k}}"),
        format!("![a](https://{HOST}/storage/v1/object/public/renders/other.png)![b](https://{HOST}/storage/v1/object/public/renders/{{k}})"),
        format!("Done: https://{HOST}/storage/v1/object/public/renders/{{k}}."),
        format!("https://app.example.com/_next/image?url=https%3A%2F%2F{HOST}%2Fstorage%2Fv1%2Fobject%2Fpublic%2Frenders%2F{{k}}%3Ft%3Dcaf%E9&w=640"),
        // The fifth review: JSON's escapes (PHP's json_encode) and an encoding of an encoding
        // (an image CDN's URL inside an image proxy's) hid every route.
        format!(r#"{{"publicUrl":"https:\/\/{HOST}\/storage\/v1\/object\/public\/renders\/{{k}}"}}"#),
        format!("https://app.example.com/_next/image?url=https%3A%2F%2Fcdn.example.com%2Fimg%3Fsrc%3Dhttps%253A%252F%252F{HOST}%252Fstorage%252Fv1%252Fobject%252Fpublic%252Frenders%252F{{k}}&w=640"),
        // The sixth review: JSON inside JSON escapes the escapes.
        format!(r#"{{"data": "{{\"publicUrl\": \"https:\\/\\/{HOST}\\/storage\\/v1\\/object\\/public\\/renders\\/{{k}}\"}}"}}"#),
        // The seventh review: JSON five times over, an escaped backslash, URL-encoded JSON.
        php_json(5, &format!("https://{HOST}/storage/v1/object/public/renders/{{k}}")),
        format!("see https:\\u005c/\\u005c/{HOST}\\u005c/storage\\u005c/v1\\u005c/object\\u005c/public\\u005c/renders\\u005c/{{k}}"),
        format!("https://app.example/view?data=%7B%22publicUrl%22%3A%22https%3A%5C%2F%5C%2F{HOST}%5C%2Fstorage%5C%2Fv1%5C%2Fobject%5C%2Fpublic%5C%2Frenders%5C%2F{{k}}%22%7D"),
        // The ninth review: JSON's control escapes (a worker's stdout through json.dumps),
        // imgproxy's @extension, a CDN's URL (no route) inside a proxy's query and markdown,
        // '..' after an encoded slash, a route with a dot segment inside a wrapper; and the
        // eighth review's bad byte inside a run of escapes.
        format!(r#"{{"url": "https://{HOST}/storage/v1/object/public/renders/{{k}}\n"}}"#),
        r"renders/{k}\n".to_string(),
        format!("https://img.example.com/sig/rs:fill:300/plain/https://{HOST}/storage/v1/object/public/renders/{{k}}@webp"),
        "https://app.example.com/_next/image?url=https%3A%2F%2Fcdn.example.com%2Frenders%2F{k}&w=640".to_string(),
        "![r](https://cdn.example.com/renders/{k})".to_string(),
        format!("https://{HOST}/storage/v1/object/public/renders/job%2F123/../{{k}}"),
        format!("https://app.example.com/_next/image?url=https%3A%2F%2F{HOST}%2Fstorage%2F.%2Fv1%2Fobject%2Fpublic%2Frenders%2F{{k}}&w=640"),
        format!("https://{HOST}/storage/v1/object/public/renders/x%FF%2F..%2F{{k}}"),
    ];
    settings(BASE_SETTINGS);
    let db = TestDb::attached("guard_url_readings");

    let mut c = db.client();
    for (i, s) in spellings.iter().enumerate() {
        let saved = job(
            &mut c,
            "completed",
            Some(&s.replace("{k}", &format!("kept/{i}.png"))),
            "2 hours",
            "saved",
        );
        save(&mut c, "generated_saved", &saved.0).unwrap();
        job(
            &mut c,
            "completed",
            Some(&public_url("renders", &format!("kept/{i}.png"))),
            "2 hours",
            "orphan",
        );
    }
    let (status, _, enqueued, protected, _) = cycle(&mut c);
    assert_eq!(
        (status.as_str(), enqueued),
        ("ok", 0),
        "{protected} protected"
    );
    assert!(claim(&mut c, "w0", 100).is_empty());

    // The other order: the orphan's row is handed out first; then saving a job spelled either
    // way is refused, and so is pointing a saved job at the file.
    for (i, s) in spellings.iter().enumerate() {
        let url = s.replace("{k}", &format!("late/{i}.png"));
        job(
            &mut c,
            "completed",
            Some(&public_url("renders", &format!("late/{i}.png"))),
            "2 hours",
            "orphan",
        );
        assert_eq!(cycle(&mut c).2, 1, "{url:.80}");
        assert_eq!(
            claim(&mut c, &format!("w{}", i + 1), 10).len(),
            1,
            "{url:.80}"
        );
        let unsaved = job(&mut c, "completed", Some(&url), "1 minute", "cache hit");
        let e = save(&mut c, "generated_saved", &unsaved.0).unwrap_err();
        assert_eq!(e.code().unwrap().code(), "OC001", "{url:.80}: {e}");
        let saved = job(
            &mut c,
            "completed",
            Some(&public_url("renders", &format!("other/{i}.png"))),
            "1 minute",
            "saved",
        );
        save(&mut c, "generated_saved", &saved.0).unwrap();
        let e = c
            .execute(
                "UPDATE render_jobs SET output_url = $2 WHERE id = $1::text::uuid",
                &[&saved.0, &url],
            )
            .unwrap_err();
        assert_eq!(e.code().unwrap().code(), "OC002", "{url:.80}: {e}");
    }
}

/// Names with a space, `&` or `?` (storage allows them; the third review of issue 14): the saved
/// job's URL wraps the storage URL (text, an image proxy, markdown) or carries a raw `?` (as
/// supabase-js's `encodeURI` leaves it); the orphan job names the file with the name encoded.
/// Cut at the decoded space, `&` or `?`, the saved job protected `renders/t/my` and the like, and
/// the orphan's file was claimed.
#[test]
fn names_with_a_space_an_ampersand_or_a_question_mark_keep_their_files_in_every_wrapping() {
    settings(BASE_SETTINGS);
    let db = TestDb::attached("guard_odd_names");
    let mut c = db.client();
    let base = format!("https://{HOST}/storage/v1/object/public/renders");
    for (saved_url, key) in [
        (format!("see {base}/t/my%20file.png for the render"), "t/my%20file.png"),
        (
            format!("https://app.example.com/_next/image?url=https%3A%2F%2F{HOST}%2Fstorage%2Fv1%2Fobject%2Fpublic%2Frenders%2Fp%2Fa%2526b.png&w=640"),
            "p/a%26b.png",
        ),
        (format!("![r]({base}/m/what%3F.png)"), "m/what%3F.png"),
        (format!("{base}/q/what?.png"), "q/what%3F.png"),
        // Form-encoded into the proxy's query (URLSearchParams): the space is '+'.
        (
            format!("https://app.example.com/_next/image?url=https%3A%2F%2F{HOST}%2Fstorage%2Fv1%2Fobject%2Fpublic%2Frenders%2Ff%2Fmy+file.png&w=640"),
            "f/my%20file.png",
        ),
        // Not encoded, still in the query: '+' is a space there too (the fourth review).
        (format!("https://app.example.com/_next/image?url={base}/u/my+file.png&w=640"), "u/my%20file.png"),
        // The tenth review: a URL only a JSON layer reveals, with a %3F or a %20 of its own (the
        // layer decoded as well read `a` and `a b.png in 3s`); markdown's backslash escapes
        // (Turndown's); a raw '&' then a space or a comma; a JSON-escaped newline in a URL.
        (
            format!(r#"{{"publicUrl":"https:\/\/{HOST}\/storage\/v1\/object\/sign\/renders\/j\/a%3Fb.png?token=abc"}}"#),
            "j/a%3Fb.png",
        ),
        (
            format!(r#"{{"msg":"done: https:\/\/{HOST}\/storage\/v1\/object\/public\/renders\/j\/a%20b.png in 3s"}}"#),
            "j/a%20b.png",
        ),
        (format!(r"[render]({base}/d/photo%20\(1\).png)"), "d/photo%20(1).png"),
        (format!(r"[x]({base}/d/my\_file.png)"), "d/my_file.png"),
        (format!("Render complete: {base}/r/R&D.png (took 3.2s)"), "r/R%26D.png"),
        (format!("{base}/s/Tom%20&%20Jerry.png 1x, {base}/s/b.png 2x"), "s/Tom%20%26%20Jerry.png"),
        (format!("{base}/c/R&D.png,{base}/c/b.png"), "c/R%26D.png"),
        (format!(r#"{{"u":"{base}/n/new\nline.png"}}"#), "n/newline.png"),
        // The eleventh review: a Python dict's str(), BBCode, AsciiDoc; a name with a ',' or
        // parentheses in markdown followed by more text.
        (format!("{{'url': '{base}/e/dict.png'}}"), "e/dict.png"),
        (format!("[img]{base}/e/bb.png[/img]"), "e/bb.png"),
        (format!("image::{base}/e/adoc.png[Render,300,200]"), "e/adoc.png"),
        (format!("[![a]({base}/e/a,b.png)](https://example.com)"), "e/a,b.png"),
        (format!("![a]({base}/e/photo%20(1).png)![b]({base}/e/y.png)"), "e/photo%20(1).png"),
    ] {
        let saved = job(&mut c, "completed", Some(&saved_url), "2 hours", "saved");
        save(&mut c, "generated_saved", &saved.0).unwrap();
        job(&mut c, "completed", Some(&public_url("renders", key)), "2 hours", "orphan");
    }
    let (status, _, enqueued, protected, _) = cycle(&mut c);
    assert_eq!(
        (status.as_str(), enqueued),
        ("ok", 0),
        "{protected} protected"
    );
    assert!(claim(&mut c, "w0", 100).is_empty());
}

/// What object_keys() cannot read in full protects nothing it might mean (the third review of
/// issue 14, C4): a value over 65,536 bytes (object_keys() then skips the URLs embedded in it),
/// or one holding more than 8 storage URLs (it reads the first 8). Before, such a job was saved
/// and the orphan naming the same file was queued and handed out. Now the save is refused with
/// OC003, naming the limit, and so is pointing a saved job at such a value, or inserting the
/// job of a save that came first.
#[test]
fn a_job_whose_url_cannot_be_read_in_full_is_never_saved() {
    settings(BASE_SETTINGS);
    let db = TestDb::attached("guard_unread");
    let mut c = db.client();
    let proxied = |k: &str| {
        format!("https://app.example.com/_next/image?url=https%3A%2F%2F{HOST}%2Fstorage%2Fv1%2Fobject%2Fpublic%2Frenders%2F{k}&w=640")
    };
    let decoys = format!("https://{HOST}/storage/v1/object/public/renders/decoy.png ").repeat(8);
    let cases = [
        (
            format!("{}&pad={}", proxied("long.png"), "a".repeat(70_000)),
            "long.png",
            "65,536 bytes",
        ),
        (
            format!("{decoys}{}", proxied("ninth.png")),
            "ninth.png",
            "up to 16",
        ),
        // A tab splits the last route as written (16 there); a browser deletes it, and so does
        // the reading without tabs, which then stops at 16 (the fourth review).
        (
            format!(
                "{}{}",
                format!("https://{HOST}/storage/v1/object/public/renders/decoy.png ").repeat(7),
                proxied("tabbed.png").replace("storage%2Fv1", "stor\tage%2Fv1")
            ),
            "tabbed.png",
            "up to 16",
        ),
        // Sixteen routes only the percent-decoded layer reads (a letter escaped once), then a
        // URL encoded twice: that layer stopped at 16, and the count saw none (the sixth review).
        (
            format!(
                "x%25 {}https%253A%252F%252F{HOST}%252Fstorage%252Fv1%252Fobject%252Fpublic%252Frenders%252Fhidden.png",
                "%73torage/v1/object/public/renders/a.png ".repeat(16)
            ),
            "hidden.png",
            "up to 16",
        ),
        // Eight routes behind an escaped backslash, which a pattern did not count (the seventh
        // review), then a ninth.
        (
            format!(
                "x {}https://{HOST}/storage/v1/object/public/renders/escaped.png",
                format!("https:\\u005c/\\u005c/{HOST}\\u005c/storage\\u005c/v1\\u005c/object\\u005c/public\\u005c/renders\\u005c/d.png ").repeat(8)
            ),
            "escaped.png",
            "up to 16",
        ),
        // Readings of more than 32,768 bytes: six URLs, then 1.8 KB whose every cut is read
        // many ways (the tenth review: a crafted 2 KB value took 16 s to read in the managed
        // edition, on every write of its job).
        (
            format!(
                "{}{}{}",
                format!("https://{HOST}/storage/v1/object/public/renders/").repeat(6),
                "%2F..+\\(;".repeat(200),
                proxied("costly.png")
            ),
            "costly.png",
            "every way it could be meant",
        ),
        // JSON deeper than the readings go: counted once and never read (the seventh review).
        (
            php_json(9, &format!("https://{HOST}/storage/v1/object/public/renders/deep.png")),
            "deep.png",
            "more than 6 times over",
        ),
    ];
    for (i, (url, key, limit)) in cases.iter().enumerate() {
        let unread = job(&mut c, "completed", Some(url), "2 hours", "saved");
        let e = save(&mut c, "generated_saved", &unread.0).unwrap_err();
        let db_err = e.as_db_error().unwrap_or_else(|| panic!("{e}"));
        assert_eq!(db_err.code().code(), "OC003", "{}", db_err.message());
        assert!(
            db_err.message().contains(&unread.0) && db_err.message().contains(limit),
            "{}",
            db_err.message()
        );
        assert!(db_err.hint().unwrap().contains("getPublicUrl()"));
        assert_eq!(saved_assets(&mut c, &unread), 0);

        // A saved job pointed at such a value: refused.
        let saved = job(
            &mut c,
            "completed",
            Some(&public_url("renders", &format!("fine/{i}.png"))),
            "2 hours",
            "saved",
        );
        save(&mut c, "generated_saved", &saved.0).unwrap();
        let e = c
            .execute(
                "UPDATE render_jobs SET output_url = $2 WHERE id = $1::text::uuid",
                &[&saved.0, url],
            )
            .unwrap_err();
        assert_eq!(e.code().unwrap().code(), "OC003", "{e}");

        // The save first, the job after (an app that writes the asset row first): refused.
        let early = uuid_text::Uuid(format!("00000000-0000-4000-8000-00000000000{i}"));
        save(&mut c, "generated_saved", &early.0).unwrap();
        let e = c
            .execute(
                "INSERT INTO render_jobs (id, status, output_url, created_at, prompt) VALUES ($1::text::uuid, 'completed', $2, now() - interval '2 hours', 'early')",
                &[&early.0, url],
            )
            .unwrap_err();
        assert_eq!(e.code().unwrap().code(), "OC003", "{e}");

        // The unsaved job may keep its value; the orphan naming its file is an orphan.
        job(
            &mut c,
            "completed",
            Some(&public_url("renders", key)),
            "2 hours",
            "orphan",
        );
    }
    assert_eq!(cycle(&mut c).2, cases.len() as i64);
}

/// attach() finds a saved job whose URL cannot be read in full (saved before the guards were
/// there) and refuses, naming the job and the fix; nothing is attached.
#[test]
fn attach_refuses_while_a_saved_job_has_a_url_it_cannot_read_in_full() {
    settings(BASE_SETTINGS);
    let db = TestDb::create("guard_unread_attach");
    let mut c = db.client();
    let url = format!(
        "https://{HOST}/storage/v1/object/public/renders/x.png?pad={}",
        "a".repeat(70_000)
    );
    let j = job(&mut c, "completed", Some(&url), "2 hours", "saved");
    save(&mut c, "generated_saved", &j.0).unwrap();
    let e = c
        .query("SELECT * FROM orphan_cleanup.attach()", &[])
        .unwrap_err();
    let db_err = e.as_db_error().unwrap_or_else(|| panic!("{e}"));
    assert_eq!(db_err.code().code(), "OC003", "{}", db_err.message());
    assert!(db_err.message().contains(&j.0), "{}", db_err.message());
    assert!(
        db_err.hint().unwrap().contains("UPDATE"),
        "{:?}",
        db_err.hint()
    );
    let attached: i64 = c
        .query_one("SELECT count(*) FROM orphan_cleanup.attachment", &[])
        .unwrap()
        .get(0);
    assert_eq!(attached, 0);
    c.execute(
        "UPDATE render_jobs SET output_url = $2 WHERE id = $1::text::uuid",
        &[&j.0, &public_url("renders", "x.png")],
    )
    .unwrap();
    c.query("SELECT * FROM orphan_cleanup.attach()", &[])
        .unwrap();
}
