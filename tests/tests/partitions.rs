//! A partitioned jobs table and stray objects (the second review of stray queueing, finding C):
//! rows leave a partitioned table without a row trigger firing, by a TRUNCATE of one partition,
//! a DETACH PARTITION or a DROP TABLE of a partition. The files of the saved jobs among them must
//! not become strays.

// Sequences, each a test (each failed before sql/partitions.sql):
//   1. TRUNCATE of one partition      -> a_truncated_partitions_saved_files_are_kept
//   2. DETACH PARTITION               -> a_detached_partitions_saved_files_are_kept
//   3. DROP TABLE of a partition      -> a_dropped_partition_stops_strays_until_forgotten
//   4. a partition created after attach(), then truncated
//                                     -> a_new_partition_is_guarded_at_once

use std::collections::BTreeSet;

use e2e::storage::*;
use e2e::*;

const SETTINGS: &[(&str, &str)] = &[
    ("allowed_buckets", "renders"),
    ("allowed_prefixes", "out/"),
    ("reclaim_strays", "on"),
];

/// A database whose jobs table is partitioned by created_at (render_jobs_old before 2000,
/// render_jobs_now from 2020; 2000-2020 left for a partition made later), attached, with `keys`
/// uploaded eight days ago.
fn partitioned(name: &str, keys: &[&str]) -> (TestDb, Emulator) {
    let db = TestDb::create(name);
    let emu = Emulator::start_keeping(name);
    let mut pairs = SETTINGS.to_vec();
    pairs.push(("allowed_hosts", emu.host.as_str()));
    settings(&pairs);
    emu.create_bucket("renders");
    for key in keys {
        emu.upload("renders", key, key.as_bytes());
    }
    let mut c = db.client();
    c.batch_execute(
        "UPDATE storage.objects SET created_at = created_at - interval '8 days', updated_at = updated_at - interval '8 days';",
    )
    .unwrap();
    c.batch_execute(PARTITIONED_JOBS).unwrap();
    c.batch_execute(OBJECT_KEYS_INDEX).unwrap();
    db.attach();
    (db, emu)
}

/// A saved job naming out/saved.png and an unsaved one naming out/unsaved.png, both in
/// render_jobs_now.
fn two_jobs(c: &mut postgres::Client, emu: &Emulator) {
    let saved = job(
        c,
        "completed",
        Some(&emu.public_url("renders", "out/saved.png")),
        "2 hours",
        "s",
    );
    save(c, "generated_saved", &saved.0).unwrap();
    job(
        c,
        "running",
        Some(&emu.public_url("renders", "out/unsaved.png")),
        "2 hours",
        "u",
    );
}

fn queued(c: &mut postgres::Client) -> BTreeSet<String> {
    c.query(
        "SELECT object_path FROM orphan_cleanup.deletion_queue WHERE kind = 'stray'",
        &[],
    )
    .unwrap()
    .iter()
    .map(|r| r.get(0))
    .collect()
}

fn enqueue_strays(c: &mut postgres::Client) -> Result<i64, postgres::Error> {
    Ok(c.query_one("SELECT orphan_cleanup.enqueue_strays()", &[])?
        .get(0))
}

const KEYS: &[&str] = &["out/saved.png", "out/unsaved.png"];

fn only_unsaved() -> BTreeSet<String> {
    ["out/unsaved.png".to_string()].into_iter().collect()
}

/// Makes public.render_jobs_mid, not yet a partition, holding a job of 2010 naming `url`, saved.
fn mid_with_saved_job(c: &mut postgres::Client, url: &str) -> String {
    c.batch_execute(
        "CREATE TABLE public.render_jobs_mid (LIKE public.render_jobs INCLUDING DEFAULTS);",
    )
    .unwrap();
    let saved: String = c
        .query_one(
            "INSERT INTO public.render_jobs_mid (status, output_url, created_at) VALUES ('completed', $1, '2010-01-01') RETURNING id::text",
            &[&url],
        )
        .unwrap()
        .get(0);
    c.execute(
        "INSERT INTO user_assets (asset_type, metadata) VALUES ('generated_saved', jsonb_build_object('render_job_id', $1::text))",
        &[&saved],
    )
    .unwrap();
    saved
}

const ATTACH_MID: &str = "ALTER TABLE public.render_jobs ATTACH PARTITION public.render_jobs_mid FOR VALUES FROM ('2000-01-01') TO ('2020-01-01')";

/// health()'s status and detail for one check.
fn health(c: &mut postgres::Client, check: &str) -> (String, String) {
    let r = c
        .query_one(
            "SELECT status, detail FROM orphan_cleanup.health() WHERE check_name = $1",
            &[&check],
        )
        .unwrap();
    (r.get(0), r.get(1))
}

/// Runs `sql` as where no DDL watch runs (the managed edition installed without a superuser).
fn without_ddl_watch(c: &mut postgres::Client, sql: &str) {
    c.batch_execute("ALTER EVENT TRIGGER orphan_cleanup_guard_watch DISABLE")
        .unwrap();
    c.batch_execute(sql).unwrap();
    c.batch_execute("ALTER EVENT TRIGGER orphan_cleanup_guard_watch ENABLE ALWAYS")
        .unwrap();
}

fn code(e: &postgres::Error) -> String {
    e.code().map(|c| c.code().to_string()).unwrap_or_default()
}

/// Sequence 1: TRUNCATE render_jobs_now fires that partition's triggers only. Its guard keeps the
/// saved job's file; the unsaved job's file is a stray.
#[test]
fn a_truncated_partitions_saved_files_are_kept() {
    let (db, emu) = partitioned("partitions_truncate", KEYS);
    let mut c = db.client();
    two_jobs(&mut c, &emu);
    c.batch_execute("TRUNCATE public.render_jobs_now").unwrap();
    assert_eq!(enqueue_strays(&mut c).unwrap(), 1);
    assert_eq!(queued(&mut c), only_unsaved());
    let kept: i64 = c
        .query_one(
            "SELECT count(*) FROM orphan_cleanup.objects WHERE object_path = 'out/saved.png' AND kept_at IS NOT NULL",
            &[],
        )
        .unwrap()
        .get(0);
    assert_eq!(kept, 1);
}

/// Sequence 2: DETACH PARTITION moves the rows out of the jobs table. The detached table is
/// looked at (by the DDL watch, or else before strays are next queued): its saved job's file is
/// kept.
#[test]
fn a_detached_partitions_saved_files_are_kept() {
    let (db, emu) = partitioned("partitions_detach", KEYS);
    let mut c = db.client();
    two_jobs(&mut c, &emu);
    c.batch_execute("ALTER TABLE public.render_jobs DETACH PARTITION public.render_jobs_now")
        .unwrap();
    assert_eq!(enqueue_strays(&mut c).unwrap(), 1);
    assert_eq!(queued(&mut c), only_unsaved());
    let audited: i64 = c
        .query_one(
            "SELECT count(*) FROM orphan_cleanup.audit_log WHERE action = 'protected'
               AND detail LIKE '%detached from the jobs table in partition public.render_jobs_now%'",
            &[],
        )
        .unwrap()
        .get(0);
    assert_eq!(audited, 1);
}

/// Sequence 3: DROP TABLE of a partition leaves nothing to read. Until a DBA says it was dealt
/// with, no stray is queued (preview and enqueue refuse, naming the partition and the fix) and
/// none is handed out; forget_partition() lets strays be judged again.
#[test]
fn a_dropped_partition_stops_strays_until_forgotten() {
    let (db, emu) = partitioned("partitions_drop", KEYS);
    let mut c = db.client();
    two_jobs(&mut c, &emu);
    let oid: u32 = c
        .query_one("SELECT 'public.render_jobs_now'::regclass::oid", &[])
        .unwrap()
        .get(0);
    c.batch_execute("DROP TABLE public.render_jobs_now")
        .unwrap();
    let e = enqueue_strays(&mut c).unwrap_err();
    assert!(
        db_error(&e).contains(&format!(
            "partition public.render_jobs_now (oid {oid}) of the jobs table was dropped"
        )) && db_error(&e).contains(&format!("SELECT orphan_cleanup.forget_partition({oid})")),
        "{}",
        db_error(&e)
    );
    assert!(queued(&mut c).is_empty());
    let detail = health(&mut c, "strays").1;
    assert!(detail.contains("was dropped"), "{detail}");
    c.execute("SELECT orphan_cleanup.forget_partition($1)", &[&oid])
        .unwrap();
    assert_eq!(enqueue_strays(&mut c).unwrap(), 2, "the DBA let them go");
}

/// Sequence 4: a partition created after attach() gets its TRUNCATE guard at once (the DDL
/// watch), before any cycle runs.
#[test]
fn a_new_partition_is_guarded_at_once() {
    let (db, emu) = partitioned("partitions_new", KEYS);
    let mut c = db.client();
    c.batch_execute(
        "CREATE TABLE public.render_jobs_mid PARTITION OF public.render_jobs FOR VALUES FROM ('2000-01-01') TO ('2020-01-01')",
    )
    .unwrap();
    let saved: String = c
        .query_one(
            "INSERT INTO render_jobs (status, output_url, created_at) VALUES ('completed', $1, '2010-01-01') RETURNING id::text",
            &[&emu.public_url("renders", "out/saved.png")],
        )
        .unwrap()
        .get(0);
    save(&mut c, "generated_saved", &saved).unwrap();
    c.batch_execute("TRUNCATE public.render_jobs_mid").unwrap();
    assert_eq!(enqueue_strays(&mut c).unwrap(), 1);
    assert_eq!(queued(&mut c), only_unsaved());
}

// From the second review of partitions (a reviewer helper; each failed before its fix):
//   5. a DETACH at REPEATABLE READ whose snapshot predates a save
//                                     -> a_detach_not_at_read_committed_is_refused
//   6. a dropped partition held the saved job sharing an unsaved job's object
//                                     -> an_orphans_claim_waits_while_a_partition_is_gone
//   7. a table attached as a partition with a saved job naming a handed-out object
//                                     -> a_partition_bringing_a_handed_out_save_is_refused

/// Sequence 5: the detach's look at the saved jobs would read an old snapshot and miss a save
/// committed meanwhile; it is refused, naming the fix.
#[test]
fn a_detach_not_at_read_committed_is_refused() {
    let (db, emu) = partitioned("partitions_detach_rr", KEYS);
    let mut c = db.client();
    let saved = job(
        &mut c,
        "completed",
        Some(&emu.public_url("renders", "out/saved.png")),
        "2 hours",
        "s",
    );
    let mut a = db.client();
    let mut rr = a
        .build_transaction()
        .isolation_level(postgres::IsolationLevel::RepeatableRead)
        .start()
        .unwrap();
    rr.query_one("SELECT count(*) FROM user_assets", &[])
        .unwrap();
    save(&mut c, "generated_saved", &saved.0).unwrap();
    let e = rr
        .batch_execute("ALTER TABLE public.render_jobs DETACH PARTITION public.render_jobs_now")
        .unwrap_err();
    assert!(
        db_error(&e).contains("are kept in a READ COMMITTED transaction only, not repeatable read"),
        "{}",
        db_error(&e)
    );
    drop(rr);
    assert_eq!(enqueue_strays(&mut c).unwrap(), 1, "out/unsaved.png only");
}

/// Sequence 6: a saved job in render_jobs_old and an unsaved one in render_jobs_now name the
/// same object (a render cache hit). render_jobs_old is dropped: the unsaved job looks like an
/// orphan with no keeper, and is queued; no claim hands it out until the drop is dealt with.
#[test]
fn an_orphans_claim_waits_while_a_partition_is_gone() {
    let (db, emu) = partitioned("partitions_orphan_wait", &["out/shared.png"]);
    let mut c = db.client();
    let url = emu.public_url("renders", "out/shared.png");
    let saved: String = c
        .query_one(
            "INSERT INTO render_jobs (status, output_url, created_at) VALUES ('completed', $1, '1990-01-01') RETURNING id::text",
            &[&url],
        )
        .unwrap()
        .get(0);
    save(&mut c, "generated_saved", &saved).unwrap();
    job(&mut c, "completed", Some(&url), "2 hours", "cache hit");
    c.batch_execute("DROP TABLE public.render_jobs_old")
        .unwrap();
    cycle(&mut c);
    assert!(claim(&mut c, "w1", 10).is_empty(), "nothing handed out");
    assert_eq!(emu.objects().len(), 1);
}

/// Sequence 7: a table whose saved job names an object already handed out joins the jobs table
/// as a partition: refused, as job_guard refuses such a row written into the jobs table.
#[test]
fn a_partition_bringing_a_handed_out_save_is_refused() {
    let (db, emu) = partitioned("partitions_attach_handed_out", &["out/gone.png"]);
    let mut c = db.client();
    assert_eq!(enqueue_strays(&mut c).unwrap(), 1);
    assert_eq!(claim(&mut c, "w1", 10).len(), 1);
    mid_with_saved_job(&mut c, &emu.public_url("renders", "out/gone.png"));
    let e = c.batch_execute(ATTACH_MID).unwrap_err();
    assert!(
        db_error(&e).contains("that object was handed to a reaper and may already be deleted"),
        "{}",
        db_error(&e)
    );
}

// From the third review of partitions (a reviewer helper, reading only; each failed before):
//   8. detach() from a partitioned jobs table  -> detach_from_a_partitioned_table_works
//   9. with no DDL watch and reclaim_strays off, a new partition must not stop claims
//                                     -> a_new_partition_does_not_stop_claims_without_the_ddl_watch
//  10. a DETACH ... CONCURRENTLY cut short leaves the partition detach-pending, its rows hidden
//                                     -> claims_wait_while_a_detach_is_unfinished

/// Sequence 8: the partitions' TRUNCATE guards are dropped, the clones of the table's row
/// triggers go with the table's own.
#[test]
fn detach_from_a_partitioned_table_works() {
    let (db, _emu) = partitioned("partitions_detach_all", KEYS);
    let mut c = db.client();
    let said: String = c
        .query_one("SELECT orphan_cleanup.detach()", &[])
        .unwrap()
        .get(0);
    assert!(said.starts_with("detached from"), "{said}");
    let left: i64 = c
        .query_one(
            "SELECT count(*) FROM pg_trigger WHERE tgname LIKE 'orphan_cleanup%'
               AND tgrelid IN ('public.render_jobs'::regclass, 'public.render_jobs_old'::regclass, 'public.render_jobs_now'::regclass)",
            &[],
        )
        .unwrap()
        .get(0);
    assert_eq!(left, 0);
    db.attach();
}

/// Sequence 9: where no DDL watch runs (the managed edition installed without a superuser),
/// a partition created since the last look stops claims only until the next cycle, which looks
/// at the partitions whatever reclaim_strays says, records and guards it.
#[test]
fn a_new_partition_does_not_stop_claims_without_the_ddl_watch() {
    let (db, emu) = partitioned("partitions_no_watch", &["out/o.png"]);
    let mut c = db.client();
    let mut pairs = SETTINGS.to_vec();
    pairs.retain(|(n, _)| *n != "reclaim_strays");
    pairs.push(("allowed_hosts", emu.host.as_str()));
    settings(&pairs);
    c.batch_execute(
        "ALTER EVENT TRIGGER orphan_cleanup_guard_watch DISABLE;
         CREATE TABLE public.render_jobs_mid PARTITION OF public.render_jobs FOR VALUES FROM ('2000-01-01') TO ('2020-01-01');",
    )
    .unwrap();
    job(
        &mut c,
        "completed",
        Some(&emu.public_url("renders", "out/o.png")),
        "2 hours",
        "o",
    );
    // Not looked at yet: it could hold saved jobs that keep objects (the fourth review).
    let detail = health(&mut c, "reaping").1;
    assert!(detail.contains("has not been looked at yet"), "{detail}");
    assert_eq!(cycle(&mut c).2, 1);
    let status = health(&mut c, "reaping").0;
    assert_eq!(status, "ok", "the cycle looked at it");
    assert_eq!(claim(&mut c, "w1", 10).len(), 1, "the orphan is handed out");
    let guarded: i64 = c
        .query_one(
            "SELECT count(*) FROM pg_trigger WHERE tgrelid = 'public.render_jobs_mid'::regclass AND tgname = 'orphan_cleanup_truncate_guard'",
            &[],
        )
        .unwrap()
        .get(0);
    assert_eq!(guarded, 1, "the cycle guarded the new partition");
    c.batch_execute("ALTER EVENT TRIGGER orphan_cleanup_guard_watch ENABLE ALWAYS")
        .unwrap();
}

/// Sequence 10: a DETACH PARTITION ... CONCURRENTLY that is cancelled after its first step
/// leaves the partition detach-pending: its rows (a saved job sharing an unsaved job's object)
/// are hidden from the jobs table. Nothing is handed out until it is finished.
#[test]
fn claims_wait_while_a_detach_is_unfinished() {
    let (db, emu) = partitioned("partitions_detach_pending", &["out/shared.png"]);
    let mut c = db.client();
    let url = emu.public_url("renders", "out/shared.png");
    let saved: String = c
        .query_one(
            "INSERT INTO render_jobs (status, output_url, created_at) VALUES ('completed', $1, '1990-01-01') RETURNING id::text",
            &[&url],
        )
        .unwrap()
        .get(0);
    save(&mut c, "generated_saved", &saved).unwrap();
    job(&mut c, "completed", Some(&url), "2 hours", "cache hit");
    // An old snapshot makes the detach's second step wait; a statement timeout cuts it short.
    let mut holder = db.client();
    let mut old = holder
        .build_transaction()
        .isolation_level(postgres::IsolationLevel::RepeatableRead)
        .start()
        .unwrap();
    old.query_one("SELECT count(*) FROM public.render_jobs_old", &[])
        .unwrap();
    let mut d = db.client();
    d.batch_execute("SET statement_timeout = '1s'").unwrap();
    assert!(d
        .batch_execute(
            "ALTER TABLE public.render_jobs DETACH PARTITION public.render_jobs_old CONCURRENTLY"
        )
        .is_err());
    drop(old);
    let pending: bool = c
        .query_one(
            "SELECT inhdetachpending FROM pg_inherits WHERE inhrelid = 'public.render_jobs_old'::regclass",
            &[],
        )
        .unwrap()
        .get(0);
    assert!(pending);
    cycle(&mut c);
    assert!(claim(&mut c, "w1", 10).is_empty(), "nothing handed out");
    let detail = health(&mut c, "reaping").1;
    assert!(detail.contains("is being detached"), "{detail}");
    assert_eq!(emu.objects().len(), 1);
}

// From the fourth review (a reviewer helper, reading only):
//  11. a partition joins, without the DDL watch, bringing a saved job whose URL cannot be read
//      and that shares an unsaved job's object: the cycle's look fails, and claims must wait
//                                     -> claims_wait_while_a_joined_partitions_look_fails

/// Sequence 11.
#[test]
fn claims_wait_while_a_joined_partitions_look_fails() {
    let (db, emu) = partitioned("partitions_look_fails", &["out/x.png"]);
    let mut c = db.client();
    let url = emu.public_url("renders", "out/x.png");
    c.batch_execute(
        "ALTER EVENT TRIGGER orphan_cleanup_guard_watch DISABLE;
         CREATE TABLE public.render_jobs_mid (LIKE public.render_jobs INCLUDING DEFAULTS);",
    )
    .unwrap();
    let unread = format!("{} {}", url, "x".repeat(70_000));
    let saved: String = c
        .query_one(
            "INSERT INTO public.render_jobs_mid (status, output_url, created_at) VALUES ('completed', $1, '2010-01-01') RETURNING id::text",
            &[&unread],
        )
        .unwrap()
        .get(0);
    c.execute(
        "INSERT INTO user_assets (asset_type, metadata) VALUES ('generated_saved', jsonb_build_object('render_job_id', $1::text))",
        &[&saved],
    )
    .unwrap();
    c.batch_execute(
        "ALTER TABLE public.render_jobs ATTACH PARTITION public.render_jobs_mid FOR VALUES FROM ('2000-01-01') TO ('2020-01-01')",
    )
    .unwrap();
    job(&mut c, "completed", Some(&url), "2 hours", "cache hit");
    cycle(&mut c);
    assert!(claim(&mut c, "w1", 10).is_empty(), "nothing handed out");
    assert_eq!(emu.objects().len(), 1);
    c.batch_execute("ALTER EVENT TRIGGER orphan_cleanup_guard_watch ENABLE ALWAYS")
        .unwrap();
}

// Fixed by reading in f01b489 and 3558139, tested since (each fails without its fix):
//  12. a table joins as a partition, bringing a saved job that names the object of a claim in
//      flight: the join holds the object, waits for the claim, then sees its hand-out
//                                     -> an_attach_racing_a_claim_in_flight_is_refused
//  13. an ATTACH at REPEATABLE READ, whose snapshot predates a hand-out
//                                     -> an_attach_not_at_read_committed_is_refused

/// Sequence 12.
#[test]
fn an_attach_racing_a_claim_in_flight_is_refused() {
    let (db, emu) = partitioned("partitions_attach_race", &["out/gone.png"]);
    let mut pairs = SETTINGS.to_vec();
    pairs.push(("allowed_hosts", emu.host.as_str()));
    pairs.push(("pause_points", "claim"));
    settings(&pairs);
    let mut c = db.client();
    assert_eq!(enqueue_strays(&mut c).unwrap(), 1);
    mid_with_saved_job(&mut c, &emu.public_url("renders", "out/gone.png"));
    let mut holder = db.client();
    hold_pause_point(&mut holder, "claim");
    let (claimer, _) = session_in_thread(&db.name, |r| claim(r, "w1", 10).len());
    wait_paused_at(&mut c, "claim", None);
    let (attacher, pid) = session_in_thread(&db.name, |a| a.batch_execute(ATTACH_MID));
    // The join holds the saved job's object, which the claim in flight has updated.
    wait_until_blocked(&mut c, pid);
    release_pause_point(&mut holder, "claim");
    assert_eq!(claimer.join().unwrap(), 1, "the stray is handed out");
    let e = attacher.join().unwrap().unwrap_err();
    assert!(
        db_error(&e).contains("that object was handed to a reaper and may already be deleted"),
        "{}",
        db_error(&e)
    );
    let joined: i64 = c
        .query_one(
            "SELECT count(*) FROM pg_inherits WHERE inhrelid = 'public.render_jobs_mid'::regclass",
            &[],
        )
        .unwrap()
        .get(0);
    assert_eq!(joined, 0, "the ATTACH was rolled back");
}

/// Sequence 13: at REPEATABLE READ, a hand-out committed after the snapshot is out of sight;
/// the join is refused, naming the fix (not a bare serialization failure).
#[test]
fn an_attach_not_at_read_committed_is_refused() {
    let (db, emu) = partitioned("partitions_attach_rr", &["out/gone.png"]);
    let mut c = db.client();
    assert_eq!(enqueue_strays(&mut c).unwrap(), 1);
    mid_with_saved_job(&mut c, &emu.public_url("renders", "out/gone.png"));
    let mut a = db.client();
    let mut rr = a
        .build_transaction()
        .isolation_level(postgres::IsolationLevel::RepeatableRead)
        .start()
        .unwrap();
    rr.query_one("SELECT count(*) FROM orphan_cleanup.objects", &[])
        .unwrap();
    assert_eq!(claim(&mut c, "w1", 10).len(), 1);
    let e = rr.batch_execute(ATTACH_MID).unwrap_err();
    assert!(
        db_error(&e).contains(
            "its saved jobs are checked in a READ COMMITTED transaction only, not repeatable read"
        ),
        "{}",
        db_error(&e)
    );
}

// From the fifth review of partitions (a reviewer helper, reading only; each failed before):
//  14. a table joins as a partition, holding an unsaved job that shares an orphan's object; the
//      join is not committed yet when the app saves that job and a claim hands the object out
//                                     -> a_save_racing_an_uncommitted_attach_is_refused
//  15. the same race as 12 with a lock_timeout in the joining session: its look times out
//      waiting for the claim; the join must fail, not go through with a warning
//                                     -> an_attach_whose_look_times_out_fails
//  16. a foreign partition (a job orphan's claim first waited for it as "not looked at"; the
//      sixth review: it must, whatever the looks)
//                                     -> a_foreign_partition_stops_every_claim
//  17. a partition created by CREATE SCHEMA ... CREATE TABLE ... PARTITION OF
//                                     -> a_partition_made_in_create_schema_is_guarded_at_once
//  18. attach() run again after a joined partition's look failed (it brought a saved job naming
//      a handed-out object) must not record the partition
//                                     -> attach_does_not_record_a_partition_whose_look_failed
//  19. a saved job's row moved to another partition (an UPDATE of the partition key) is not
//      "deleted": its objects are not kept forever
//                                     -> a_saved_job_moved_between_partitions_is_not_kept

/// Sequence 14.
#[test]
fn a_save_racing_an_uncommitted_attach_is_refused() {
    let (db, emu) = partitioned("partitions_attach_window", &["out/x.png"]);
    let mut c = db.client();
    let url = emu.public_url("renders", "out/x.png");
    job(&mut c, "completed", Some(&url), "2 hours", "orphan");
    assert_eq!(cycle(&mut c).2, 1);
    let mut s1 = db.client();
    let mut tx = s1.transaction().unwrap();
    tx.batch_execute(
        "CREATE TABLE public.render_jobs_mid (LIKE public.render_jobs INCLUDING DEFAULTS);",
    )
    .unwrap();
    let a: String = tx
        .query_one(
            "INSERT INTO public.render_jobs_mid (status, output_url, created_at) VALUES ('completed', $1, '2010-01-01') RETURNING id::text",
            &[&url],
        )
        .unwrap()
        .get(0);
    tx.batch_execute(ATTACH_MID).unwrap();
    // The app saves job a: it cannot see it yet, and waits for the join.
    let (saver, pid) = session_in_thread(&db.name, move |s| save(s, "generated_saved", &a));
    wait_until_blocked(&mut c, pid);
    assert_eq!(claim(&mut c, "w1", 10).len(), 1, "the orphan is handed out");
    tx.commit().unwrap();
    let e = saver.join().unwrap().unwrap_err();
    assert_eq!(code(&e), "OC001", "{}", db_error(&e));
}

/// Sequence 15.
#[test]
fn an_attach_whose_look_times_out_fails() {
    let (db, emu) = partitioned("partitions_attach_timeout", &["out/gone.png"]);
    let mut pairs = SETTINGS.to_vec();
    pairs.push(("allowed_hosts", emu.host.as_str()));
    pairs.push(("pause_points", "claim"));
    settings(&pairs);
    let mut c = db.client();
    assert_eq!(enqueue_strays(&mut c).unwrap(), 1);
    mid_with_saved_job(&mut c, &emu.public_url("renders", "out/gone.png"));
    let mut holder = db.client();
    hold_pause_point(&mut holder, "claim");
    let (claimer, _) = session_in_thread(&db.name, |r| claim(r, "w1", 10).len());
    wait_paused_at(&mut c, "claim", None);
    let mut a = db.client();
    a.batch_execute("SET lock_timeout = '300ms'").unwrap();
    let e = a.batch_execute(ATTACH_MID).unwrap_err();
    assert_eq!(code(&e), "55P03", "{}", db_error(&e));
    release_pause_point(&mut holder, "claim");
    assert_eq!(claimer.join().unwrap(), 1);
    let joined: i64 = c
        .query_one(
            "SELECT count(*) FROM pg_inherits WHERE inhrelid = 'public.render_jobs_mid'::regclass",
            &[],
        )
        .unwrap()
        .get(0);
    assert_eq!(joined, 0, "the ATTACH failed");
}

/// Sequence 16: nothing is handed out while a foreign table is a partition (first fixed to
/// stop strays only; the sixth review showed a claim's re-check reads postgres_fdw rows in a
/// snapshot older than its locks).
#[test]
fn a_foreign_partition_stops_every_claim() {
    let (db, emu) = partitioned("partitions_foreign", &["out/o.png", "out/stray.png"]);
    let mut c = db.client();
    c.batch_execute(
        "ALTER TABLE public.render_jobs DROP CONSTRAINT render_jobs_pkey;
         CREATE EXTENSION IF NOT EXISTS file_fdw;
         CREATE SERVER files FOREIGN DATA WRAPPER file_fdw;
         CREATE FOREIGN TABLE public.render_jobs_ext PARTITION OF public.render_jobs
             FOR VALUES FROM ('2000-01-01') TO ('2020-01-01') SERVER files OPTIONS (filename '/dev/null', format 'csv');",
    )
    .unwrap();
    job(
        &mut c,
        "completed",
        Some(&emu.public_url("renders", "out/o.png")),
        "2 hours",
        "o",
    );
    assert_eq!(cycle(&mut c).2, 1, "the orphan; no stray");
    assert_eq!(queued(&mut c), BTreeSet::new());
    let detail = health(&mut c, "reaping").1;
    assert!(detail.contains("is a foreign table"), "{detail}");
    assert!(claim(&mut c, "w1", 10).is_empty(), "nothing handed out");
    c.batch_execute(
        "ALTER TABLE public.render_jobs DETACH PARTITION public.render_jobs_ext;
         UPDATE orphan_cleanup.deletion_queue SET available_at = now();",
    )
    .unwrap();
    assert_eq!(
        claim(&mut c, "w1", 10).len(),
        1,
        "detached: the orphan goes"
    );
}

/// Sequence 17.
#[test]
fn a_partition_made_in_create_schema_is_guarded_at_once() {
    let (db, _emu) = partitioned("partitions_create_schema", KEYS);
    let mut c = db.client();
    c.batch_execute(
        "CREATE SCHEMA archive
             CREATE TABLE mid PARTITION OF public.render_jobs FOR VALUES FROM ('2000-01-01') TO ('2020-01-01')",
    )
    .unwrap();
    let guarded: i64 = c
        .query_one(
            "SELECT count(*) FROM pg_trigger WHERE tgrelid = 'archive.mid'::regclass AND tgname = 'orphan_cleanup_truncate_guard'",
            &[],
        )
        .unwrap()
        .get(0);
    assert_eq!(guarded, 1);
}

/// Sequence 18.
#[test]
fn attach_does_not_record_a_partition_whose_look_failed() {
    let (db, emu) = partitioned("partitions_reattach", &["out/gone.png"]);
    let mut c = db.client();
    assert_eq!(enqueue_strays(&mut c).unwrap(), 1);
    assert_eq!(claim(&mut c, "w1", 10).len(), 1);
    mid_with_saved_job(&mut c, &emu.public_url("renders", "out/gone.png"));
    without_ddl_watch(&mut c, ATTACH_MID);
    cycle(&mut c);
    let e = c
        .query("SELECT * FROM orphan_cleanup.attach()", &[])
        .unwrap_err();
    assert_eq!(code(&e), "OC002", "{}", db_error(&e));
    let detail = health(&mut c, "reaping").1;
    assert!(detail.contains("has not been looked at yet"), "{detail}");
}

/// Sequence 19.
#[test]
fn a_saved_job_moved_between_partitions_is_not_kept() {
    let (db, emu) = partitioned("partitions_move", &["out/m.png"]);
    let mut c = db.client();
    let j = job(
        &mut c,
        "completed",
        Some(&emu.public_url("renders", "out/m.png")),
        "2 hours",
        "m",
    );
    save(&mut c, "generated_saved", &j.0).unwrap();
    c.execute(
        "UPDATE render_jobs SET created_at = '1990-01-01' WHERE id = $1::text::uuid",
        &[&j.0],
    )
    .unwrap();
    let kept: i64 = c
        .query_one(
            "SELECT count(*) FROM orphan_cleanup.objects WHERE kept_at IS NOT NULL",
            &[],
        )
        .unwrap()
        .get(0);
    assert_eq!(kept, 0, "moved, not deleted");
    // Unsaved later, it is an orphan like any other.
    c.execute("DELETE FROM user_assets", &[]).unwrap();
    assert_eq!(cycle(&mut c).2, 1);
    assert_eq!(claim(&mut c, "w1", 10).len(), 1);
}

// From the sixth review (a reviewer helper, reading only; each failed before):
//  20. a saved job with a row in each of two partitions (a partitioned table's id need not be
//      unique): two transactions each delete one; each must not count on the other's row
//                                     -> two_deletes_of_a_saved_jobs_two_rows_keep_its_file

/// Sequence 20.
#[test]
fn two_deletes_of_a_saved_jobs_two_rows_keep_its_file() {
    let (db, emu) = partitioned("partitions_two_rows", &["out/t.png"]);
    let mut c = db.client();
    let url = emu.public_url("renders", "out/t.png");
    let id: String = c
        .query_one(
            "INSERT INTO render_jobs (status, output_url, created_at) VALUES ('completed', $1, '1990-01-01') RETURNING id::text",
            &[&url],
        )
        .unwrap()
        .get(0);
    c.execute(
        "INSERT INTO render_jobs (id, status, output_url, created_at) VALUES ($1::text::uuid, 'completed', $2, now() - interval '2 hours')",
        &[&id, &url],
    )
    .unwrap();
    save(&mut c, "generated_saved", &id).unwrap();
    let mut s1 = db.client();
    let mut tx = s1.transaction().unwrap();
    tx.execute(
        "DELETE FROM render_jobs WHERE id = $1::text::uuid AND created_at < '2000-01-01'",
        &[&id],
    )
    .unwrap();
    let id2 = id.clone();
    let (other, pid) = session_in_thread(&db.name, move |s| {
        s.execute(
            "DELETE FROM render_jobs WHERE id = $1::text::uuid AND created_at > '2020-01-01'",
            &[&id2],
        )
    });
    wait_until_blocked(&mut c, pid);
    tx.commit().unwrap();
    assert_eq!(other.join().unwrap().unwrap(), 1);
    let kept: i64 = c
        .query_one(
            "SELECT count(*) FROM orphan_cleanup.objects WHERE object_path = 'out/t.png' AND kept_at IS NOT NULL",
            &[],
        )
        .unwrap()
        .get(0);
    assert_eq!(kept, 1, "the last row's delete keeps the saved job's file");
    assert_eq!(enqueue_strays(&mut c).unwrap(), 0);
}

// From the sixth review (the gap the README listed): a partitioned assets table. A table
// attached as its partition brings assets in without the save guard firing.
//  21. the table's asset saves a job whose object was handed out: refused (OC001)
//                                     -> an_assets_partition_saving_a_handed_out_job_is_refused
//  22. its asset saves an orphan that is queued; a claim runs before the ATTACH commits
//                                     -> a_claim_during_an_uncommitted_assets_attach_hands_nothing_out
//  23. the same where no DDL watch runs: claims wait for the next cycle's look
//                                     -> claims_wait_until_a_joined_assets_partition_is_looked_at

/// A database whose assets table is partitioned by created_at (user_assets_now from 2020;
/// earlier left for a partition attached later), attached, with an orphan job naming out/y.png
/// (uploaded), queued by a cycle. Returns the job's id.
fn partitioned_assets(name: &str) -> (TestDb, Emulator, String) {
    let db = TestDb::create(name);
    let emu = Emulator::start_keeping(name);
    let mut pairs = SETTINGS.to_vec();
    pairs.push(("allowed_hosts", emu.host.as_str()));
    settings(&pairs);
    emu.create_bucket("renders");
    emu.upload("renders", "out/y.png", b"y");
    let mut c = db.client();
    c.batch_execute(
        "DROP TABLE public.user_assets;
         CREATE TABLE public.user_assets (
             id uuid NOT NULL DEFAULT gen_random_uuid(), user_id uuid, asset_type text NOT NULL,
             metadata jsonb NOT NULL DEFAULT '{}', file_size bigint, created_at timestamptz NOT NULL DEFAULT now(),
             PRIMARY KEY (id, created_at)) PARTITION BY RANGE (created_at);
         CREATE TABLE public.user_assets_now PARTITION OF public.user_assets FOR VALUES FROM ('2020-01-01') TO (MAXVALUE);
         CREATE INDEX ON public.user_assets ((metadata ->> 'render_job_id'));
         CREATE INDEX ON public.user_assets (orphan_cleanup.job_ref_key(metadata ->> 'render_job_id'));
         CREATE TABLE public.user_assets_old (LIKE public.user_assets INCLUDING DEFAULTS);",
    )
    .unwrap();
    db.attach();
    let y = job(
        &mut c,
        "completed",
        Some(&emu.public_url("renders", "out/y.png")),
        "2 hours",
        "y",
    );
    assert_eq!(cycle(&mut c).2, 1);
    c.execute(
        "INSERT INTO public.user_assets_old (asset_type, metadata, created_at) VALUES ('generated_saved', jsonb_build_object('render_job_id', $1::text), '2010-01-01')",
        &[&y.0],
    )
    .unwrap();
    (db, emu, y.0)
}

const ATTACH_ASSETS_OLD: &str = "ALTER TABLE public.user_assets ATTACH PARTITION public.user_assets_old FOR VALUES FROM (MINVALUE) TO ('2020-01-01')";

fn queue_state(c: &mut postgres::Client, job: &str) -> String {
    c.query_one(
        "SELECT state FROM orphan_cleanup.deletion_queue WHERE job_id = $1::text::uuid ORDER BY id DESC LIMIT 1",
        &[&job],
    )
    .unwrap()
    .get(0)
}

/// Sequence 21.
#[test]
fn an_assets_partition_saving_a_handed_out_job_is_refused() {
    let (db, _emu, _y) = partitioned_assets("partitions_assets_handed_out");
    let mut c = db.client();
    assert_eq!(claim(&mut c, "w1", 10).len(), 1);
    let e = c.batch_execute(ATTACH_ASSETS_OLD).unwrap_err();
    assert_eq!(code(&e), "OC001", "{}", db_error(&e));
}

/// Sequence 22.
#[test]
fn a_claim_during_an_uncommitted_assets_attach_hands_nothing_out() {
    let (db, emu, y) = partitioned_assets("partitions_assets_window");
    let mut c = db.client();
    let mut s1 = db.client();
    let mut tx = s1.transaction().unwrap();
    tx.batch_execute(ATTACH_ASSETS_OLD).unwrap();
    assert!(claim(&mut c, "w1", 10).is_empty(), "held by the ATTACH");
    tx.commit().unwrap();
    assert!(claim(&mut c, "w1", 10).is_empty());
    assert_eq!(queue_state(&mut c, &y), "rescued");
    assert_eq!(emu.objects().len(), 1);
}

/// Sequence 23.
#[test]
fn claims_wait_until_a_joined_assets_partition_is_looked_at() {
    let (db, emu, y) = partitioned_assets("partitions_assets_no_watch");
    let mut c = db.client();
    without_ddl_watch(&mut c, ATTACH_ASSETS_OLD);
    let detail = health(&mut c, "reaping").1;
    assert!(
        detail.contains("joined the assets table and has not been looked at yet"),
        "{detail}"
    );
    assert!(claim(&mut c, "w1", 10).is_empty(), "nothing handed out");
    cycle(&mut c);
    assert_eq!(queue_state(&mut c, &y), "rescued");
    assert_eq!(emu.objects().len(), 1);
}

// From the seventh review (a reviewer helper, reading only; each failed before):
//  24. a partition joined the assets table where no DDL watch ran, and its look fails (an asset
//      saves a job whose file was handed out): DDL on other tables still works
//                                     -> unrelated_ddl_works_while_an_assets_partitions_look_fails
//  25. a partition leaves the assets table (DETACH): the jobs its assets saved are orphans from
//      now on, found by the next cycle, not the next day's full sweep
//                                     -> a_detached_assets_partitions_jobs_are_found_at_once

/// Sequence 24.
#[test]
fn unrelated_ddl_works_while_an_assets_partitions_look_fails() {
    let (db, _emu, _y) = partitioned_assets("partitions_assets_unrelated_ddl");
    let mut c = db.client();
    assert_eq!(claim(&mut c, "w1", 10).len(), 1);
    without_ddl_watch(&mut c, ATTACH_ASSETS_OLD);
    c.batch_execute(
        "CREATE TABLE public.unrelated (x int); ALTER TABLE public.unrelated ADD COLUMN y int",
    )
    .expect("DDL on another table");
    // A command on the assets table itself is refused, naming the job.
    let e = c
        .batch_execute("ALTER TABLE public.user_assets ALTER COLUMN file_size SET DEFAULT 0")
        .unwrap_err();
    assert_eq!(code(&e), "OC001", "{}", db_error(&e));
}

/// Sequence 25.
#[test]
fn a_detached_assets_partitions_jobs_are_found_at_once() {
    let (db, emu, _y) = partitioned_assets("partitions_assets_detach");
    let mut c = db.client();
    let z = job(
        &mut c,
        "completed",
        Some(&emu.public_url("renders", "out/z.png")),
        "2 hours",
        "z",
    );
    save(&mut c, "generated_saved", &z.0).unwrap();
    assert_eq!(cycle(&mut c).2, 0, "z is saved");
    c.batch_execute("ALTER TABLE public.user_assets DETACH PARTITION public.user_assets_now")
        .unwrap();
    assert_eq!(cycle(&mut c).2, 1, "z is an orphan now");
}
