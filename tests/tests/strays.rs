//! Stray objects (issue 15): files in storage that no job row names, found through
//! `storage.objects`, which the storage emulator keeps in the project's database as the real
//! server does. `preview_strays()` lists them and writes nothing.

use std::collections::BTreeSet;

use e2e::storage::*;
use e2e::*;

fn strays(c: &mut postgres::Client, sql: &str) -> BTreeSet<String> {
    c.query(sql, &[])
        .unwrap()
        .iter()
        .map(|r| format!("{}/{}", r.get::<_, String>(0), r.get::<_, String>(1)))
        .collect()
}

/// Ages every object in storage by `days`, as if uploaded that long ago.
fn age_storage(c: &mut postgres::Client, days: i32) {
    c.execute(
        "UPDATE storage.objects SET created_at = created_at - make_interval(days => $1), updated_at = updated_at - make_interval(days => $1)",
        &[&days],
    )
    .unwrap();
}

/// A leak as a DBA finds it: files whose job rows were deleted, beside files that jobs (saved,
/// orphaned, failed, spelled oddly) still name, files too young to judge, files outside the
/// allow-lists, and a file already queued. Only the first are strays, named exactly as stored,
/// with their size and age.
#[test]
fn preview_strays_lists_old_objects_no_job_names_and_writes_nothing() {
    let db = TestDb::attached("strays_preview");
    let emu = Emulator::start_keeping("strays_preview");
    settings(&[
        ("allowed_buckets", "renders"),
        ("allowed_prefixes", "out/"),
        ("allowed_hosts", emu.host.as_str()),
    ]);
    emu.create_bucket("renders");
    emu.create_bucket("avatars");
    let mut c = db.client();

    // Jobs that name their files in every way a job can: saved, an orphan not yet queued,
    // failed, with the URL wrapped in JSON or written bare.
    let named = [
        "out/saved.png",
        "out/orphan.png",
        "out/failed.png",
        "out/json.png",
        "out/bare.png",
    ];
    for key in named {
        emu.upload("renders", key, b"named");
    }
    let saved = job(
        &mut c,
        "completed",
        Some(&emu.public_url("renders", "out/saved.png")),
        "2 hours",
        "s",
    );
    save(&mut c, "generated_saved", &saved.0).unwrap();
    job(
        &mut c,
        "completed",
        Some(&emu.public_url("renders", "out/orphan.png")),
        "2 hours",
        "s",
    );
    job(
        &mut c,
        "failed",
        Some(&emu.public_url("renders", "out/failed.png")),
        "2 hours",
        "s",
    );
    let json = format!(
        r#"{{"publicUrl":"{}"}}"#,
        emu.public_url("renders", "out/json.png")
            .replace('/', "\\/")
    );
    job(&mut c, "completed", Some(&json), "2 hours", "s");
    job(
        &mut c,
        "running",
        Some("renders/out/bare.png"),
        "2 hours",
        "s",
    );

    // What the emergency DELETE left: files with no job row, one with a name that must be kept
    // exactly ('&', a space and '+', which a bare reading would take otherwise).
    let leaked = [
        ("out/leak-1.png", 1000usize),
        ("out/leak-2.png", 2500),
        ("out/a&b done+1.png", 7),
    ];
    for (key, size) in leaked {
        emu.upload("renders", key, &vec![b'x'; size]);
    }
    // Not strays whatever their age: another bucket, another prefix.
    emu.upload("avatars", "out/a.png", b"a");
    emu.upload("renders", "thumbs/t.png", b"t");
    // Already queued by a cycle: the queue has it.
    emu.upload("renders", "out/queued.png", b"q");
    job(
        &mut c,
        "completed",
        Some(&emu.public_url("renders", "out/queued.png")),
        "2 hours",
        "q",
    );
    assert_eq!(
        cycle(&mut c).2,
        2,
        "the cycle queues orphan.png and queued.png"
    );
    c.batch_execute("DELETE FROM render_jobs WHERE prompt = 'q'")
        .unwrap();

    let written = |c: &mut postgres::Client| -> (i64, i64) {
        let r = c
            .query_one(
                "SELECT (SELECT count(*) FROM orphan_cleanup.deletion_queue),
                        (SELECT count(*) FROM orphan_cleanup.audit_log WHERE action <> 'setting_changed')",
                &[],
            )
            .unwrap();
        (r.get(0), r.get(1))
    };
    let before = written(&mut c);

    // Uploaded just now: nothing is a stray yet (stray_min_age, 7 days by default).
    let preview = "SELECT bucket, object_path FROM orphan_cleanup.preview_strays()";
    assert!(strays(&mut c, preview).is_empty());

    age_storage(&mut c, 8);
    let expected: BTreeSet<String> = [
        "renders/out/leak-1.png",
        "renders/out/leak-2.png",
        "renders/out/a&b done+1.png",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    assert_eq!(strays(&mut c, preview), expected);

    // Size and age come with each; oldest first; max_rows bounds the list.
    let rows = c
        .query(
            "SELECT object_path, bytes, age >= interval '8 days', created_at
             FROM orphan_cleanup.preview_strays(max_rows => 2)",
            &[],
        )
        .unwrap();
    assert_eq!(rows.len(), 2);
    for r in &rows {
        let size = leaked
            .iter()
            .find(|(k, _)| *k == r.get::<_, String>(0))
            .unwrap()
            .1;
        assert_eq!(r.get::<_, i64>(1), size as i64);
        assert!(r.get::<_, bool>(2));
    }
    assert!(
        rows[0].get::<_, std::time::SystemTime>(3) <= rows[1].get::<_, std::time::SystemTime>(3)
    );

    // A shorter min_age than the setting's, and one longer than the objects' age.
    assert_eq!(
        strays(
            &mut c,
            "SELECT bucket, object_path FROM orphan_cleanup.preview_strays(interval '9 days')"
        ),
        BTreeSet::new()
    );
    settings(&[
        ("allowed_buckets", "renders"),
        ("allowed_prefixes", "out/"),
        ("allowed_hosts", emu.host.as_str()),
        ("stray_min_age", "10d"),
    ]);
    assert!(strays(&mut c, preview).is_empty(), "stray_min_age = 10d");
    assert_eq!(
        strays(
            &mut c,
            "SELECT bucket, object_path FROM orphan_cleanup.preview_strays(interval '1 day')"
        ),
        expected
    );

    // A job written for a leaked file makes it no stray.
    job(
        &mut c,
        "completed",
        Some(&emu.public_url("renders", "out/leak-2.png")),
        "1 minute",
        "late",
    );
    let mut without = expected.clone();
    without.remove("renders/out/leak-2.png");
    assert_eq!(
        strays(
            &mut c,
            "SELECT bucket, object_path FROM orphan_cleanup.preview_strays(interval '1 day')"
        ),
        without
    );

    // It wrote nothing: no queue row, no audit row, every file still there.
    assert_eq!(written(&mut c), before);
    assert_eq!(emu.objects().len(), named.len() + leaked.len() + 3);
}

/// Bad input gets a clear error: a database without storage.objects (storage elsewhere), a
/// max_rows below 1, a negative min_age.
#[test]
fn preview_strays_says_what_is_missing() {
    settings(BASE_SETTINGS);
    let db = TestDb::attached("strays_errors");
    let mut c = db.client();
    let e = c
        .query("SELECT * FROM orphan_cleanup.preview_strays()", &[])
        .unwrap_err();
    let msg = db_error(&e);
    assert!(
        msg.contains("no storage.objects table") && msg.contains("project's database"),
        "{msg}"
    );
    assert_eq!(e.code().unwrap().code(), "55000");
    c.batch_execute(
        "CREATE SCHEMA storage;
         CREATE TABLE storage.objects (id uuid, bucket_id text, name text, metadata jsonb, created_at timestamptz, updated_at timestamptz, version text)",
    )
    .unwrap();
    for (call, says) in [
        (
            "preview_strays(max_rows => 0)",
            "max_rows must be at least 1, got 0",
        ),
        (
            "preview_strays(interval '-1 day')",
            "min_age must not be negative",
        ),
    ] {
        let e = c
            .query(&format!("SELECT * FROM orphan_cleanup.{call}"), &[])
            .unwrap_err();
        assert!(db_error(&e).contains(says), "{call}: {}", db_error(&e));
    }
    assert!(c
        .query("SELECT * FROM orphan_cleanup.preview_strays()", &[])
        .unwrap()
        .is_empty());
}

// Queueing strays. The sequences that could delete a file a saved asset points to, or lose one,
// and the test of each:
//   1. upload, stray queued, then a job row naming the file written before the claim: the claim
//      sees the job (or, while the write is in flight, the object's row it holds) and keeps the
//      file                          -> a_job_written_for_a_queued_stray_before_its_claim_keeps_the_file
//   2. the same, the job row written after the claim: the file may be gone, so that job can
//      never be saved, at READ COMMITTED and REPEATABLE READ
//                                    -> a_job_written_for_a_stray_after_its_claim_can_never_be_saved
//   3. the object uploaded again under the same name, deleted by someone else, no longer
//      allowed, too young under a raised stray_min_age, or reclaim_strays turned off, between
//      enqueue and claim             -> a_stray_changed_since_it_was_queued_is_not_handed_out
//   4. a stray row (no job) through fail, dead letters, requeue_dead, cancel and cancel_prefix,
//      each audited                  -> a_stray_row_goes_through_every_queue_state_with_no_job
//   5. the reaper deletes strays and the ledger records exactly the bytes that left storage
//                                    -> strays_are_queued_once_turned_on_and_reclaimed_by_the_reaper

const STRAY_SETTINGS: &[(&str, &str)] = &[
    ("allowed_buckets", "renders"),
    ("allowed_prefixes", "out/"),
    ("reclaim_strays", "on"),
];

/// A database with a leak: `keys` uploaded to `renders` eight days ago, no job naming them.
fn leak(name: &str, keys: &[&str]) -> (TestDb, Emulator) {
    let db = TestDb::attached(name);
    let emu = Emulator::start_keeping(name);
    let mut pairs = STRAY_SETTINGS.to_vec();
    pairs.push(("allowed_hosts", emu.host.as_str()));
    settings(&pairs);
    emu.create_bucket("renders");
    for key in keys {
        emu.upload("renders", key, key.as_bytes());
    }
    age_storage(&mut db.client(), 8);
    (db, emu)
}

fn enqueue_strays(c: &mut postgres::Client) -> i64 {
    c.query_one("SELECT orphan_cleanup.enqueue_strays()", &[])
        .unwrap()
        .get(0)
}

/// (state, reason) of the stray row of `key`, the latest.
fn stray_row(c: &mut postgres::Client, key: &str) -> (String, Option<String>) {
    let r = c
        .query_one(
            "SELECT state, reason FROM orphan_cleanup.deletion_queue
             WHERE kind = 'stray' AND object_path = $1 ORDER BY id DESC LIMIT 1",
            &[&key],
        )
        .unwrap();
    (r.get(0), r.get(1))
}

fn code(e: &postgres::Error) -> String {
    e.code().map(|c| c.code().to_string()).unwrap_or_default()
}

/// Off by default: enqueue_strays() refuses, naming the setting, and queues nothing. Turned on,
/// it queues the old strays only (a young file is left alone, and so is a file a job names);
/// the real reaper deletes them; each row has no job, says it is a stray, and is audited with
/// no job; and the ledger holds exactly the bytes that left storage, as stray bytes.
#[test]
fn strays_are_queued_once_turned_on_and_reclaimed_by_the_reaper() {
    let (db, emu) = leak("strays_reclaim", &["out/leak-1.png", "out/leak-22.png"]);
    let mut c = db.client();
    reaper_role();
    emu.upload("renders", "out/named.png", b"named by a job");
    age_storage(&mut c, 8);
    job(
        &mut c,
        "completed",
        Some(&emu.public_url("renders", "out/named.png")),
        "30 minutes",
        "n",
    );
    emu.upload("renders", "out/young.png", b"uploaded just now");

    let mut off = STRAY_SETTINGS.to_vec();
    off.retain(|(n, _)| *n != "reclaim_strays");
    off.push(("allowed_hosts", emu.host.as_str()));
    settings(&off);
    let e = c
        .query_one("SELECT orphan_cleanup.enqueue_strays()", &[])
        .unwrap_err();
    let msg = db_error(&e);
    assert!(
        msg.contains("reclaim_strays is off") && msg.contains("preview_strays()"),
        "{msg}"
    );
    assert_eq!(code(&e), "55000");
    let queued = |c: &mut postgres::Client| -> i64 {
        c.query_one("SELECT count(*) FROM orphan_cleanup.deletion_queue", &[])
            .unwrap()
            .get(0)
    };
    assert_eq!(queued(&mut c), 0);

    off.push(("reclaim_strays", "on"));
    settings(&off);
    let e = c
        .query_one(
            "SELECT orphan_cleanup.enqueue_strays(min_age => '1 hour')",
            &[],
        )
        .unwrap_err();
    assert!(
        db_error(&e).contains("shorter than orphan_cleanup.stray_min_age"),
        "{}",
        db_error(&e)
    );
    assert_eq!(enqueue_strays(&mut c), 2);
    assert_eq!(enqueue_strays(&mut c), 0, "queued once");
    let rows = c
        .query(
            "SELECT job_id IS NULL, kind, output_url, stored_id IS NOT NULL, stored_version IS NOT NULL
             FROM orphan_cleanup.deletion_queue ORDER BY object_path",
            &[],
        )
        .unwrap();
    assert_eq!(rows.len(), 2);
    for (r, key) in rows.iter().zip(["out/leak-1.png", "out/leak-22.png"]) {
        assert!(r.get::<_, bool>(0));
        assert_eq!(r.get::<_, String>(1), "stray");
        assert_eq!(r.get::<_, String>(2), format!("renders/{key}"));
        assert!(r.get::<_, bool>(3) && r.get::<_, bool>(4));
    }

    let out = run(&mut reaper(&db.name, &emu, &["drain"]));
    assert!(out.status.success(), "{}", output_text(&out));
    let left = emu.objects();
    assert_eq!(
        left,
        ["renders/out/named.png", "renders/out/young.png"]
            .iter()
            .map(|s| s.to_string())
            .collect::<BTreeSet<_>>()
    );
    let r = c
        .query_one(
            "SELECT count(*) FILTER (WHERE state = 'deleted'), sum(bytes)::bigint,
                    string_agg(DISTINCT job_cleanup, ', ')
             FROM orphan_cleanup.deletion_queue",
            &[],
        )
        .unwrap();
    assert_eq!(r.get::<_, i64>(0), 2);
    let leaked_bytes = ("out/leak-1.png".len() + "out/leak-22.png".len()) as i64;
    assert_eq!(r.get::<_, Option<i64>>(1), Some(leaked_bytes));
    assert_eq!(
        r.get::<_, String>(2),
        "nothing to do: a stray has no job row"
    );
    let audited: Vec<String> = c
        .query(
            "SELECT action FROM orphan_cleanup.audit_log
             WHERE queue_id IS NOT NULL AND job_id IS NULL ORDER BY id",
            &[],
        )
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    for action in ["enqueued", "claimed", "deleted"] {
        assert_eq!(
            audited.iter().filter(|a| *a == action).count(),
            2,
            "{action}: {audited:?}"
        );
    }
    let (orphan, stray): (f64, f64) = {
        let r = c
            .query_one(
                "SELECT reclaimed_orphan_bytes::float8, reclaimed_stray_bytes::float8 FROM orphan_cleanup.queue_status()",
                &[],
            )
            .unwrap();
        (r.get(0), r.get(1))
    };
    assert_eq!((orphan, stray), (0.0, leaked_bytes as f64));
    // The savings report counts them as strays found, reclaimed, and no part of the leak rate.
    let today = |c: &mut postgres::Client| -> (i64, i64, i64, i64, f64) {
        let r = c
            .query_one(
                "SELECT sum(orphans_found)::bigint, sum(strays_found)::bigint, sum(objects_reclaimed)::bigint,
                        sum(bytes_reclaimed)::bigint, sum(leak_bytes_per_day)::float8
                 FROM orphan_cleanup.savings_report('day', 90)",
                &[],
            )
            .unwrap();
        (r.get(0), r.get(1), r.get(2), r.get(3), r.get(4))
    };
    assert_eq!(today(&mut c), (0, 2, 2, leaked_bytes, 0.0));
    // Pruned into the ledger, still stray bytes.
    c.batch_execute(
        "UPDATE orphan_cleanup.deletion_queue SET finished_at = now() - interval '60 days', enqueued_at = now() - interval '60 days'",
    )
    .unwrap();
    cycle(&mut c);
    let r = c
        .query_one(
            "SELECT (SELECT count(*) FROM orphan_cleanup.deletion_queue),
                    (SELECT sum(deleted_bytes)::bigint FROM orphan_cleanup.savings_ledger WHERE kind = 'stray'),
                    (SELECT reclaimed_stray_bytes::float8 FROM orphan_cleanup.queue_status())",
            &[],
        )
        .unwrap();
    assert_eq!(r.get::<_, i64>(0), 0, "pruned");
    assert_eq!(r.get::<_, Option<i64>>(1), Some(leaked_bytes));
    assert_eq!(r.get::<_, f64>(2), leaked_bytes as f64);
    assert_eq!(
        today(&mut c),
        (0, 2, 2, leaked_bytes, 0.0),
        "the same after the prune"
    );
}

/// Sequence 1: a render service that uploads first and writes the job row later. A stray is
/// queued; the job row naming its file (spelled another way: JSON around a signed URL) is
/// written before the claim, in flight during one claim and committed before the next. The
/// first claim passes over the busy row, the second retires it, and the file stays; the job
/// can be saved.
#[test]
fn a_job_written_for_a_queued_stray_before_its_claim_keeps_the_file() {
    let (db, emu) = leak("strays_late_job", &["out/late.png", "out/inflight.png"]);
    let mut c = db.client();
    assert_eq!(enqueue_strays(&mut c), 2);

    // Committed before the claim.
    let late = job(
        &mut c,
        "completed",
        Some(&format!(
            r#"{{"signedUrl":"{}?token=abc"}}"#,
            emu.public_url("renders", "out/late.png")
                .replace("/public/", "/sign/")
                .replace('/', "\\/")
        )),
        "1 minute",
        "late",
    );
    // In flight during the claim: the job row is not visible, but its write holds the object.
    let mut app = db.client();
    let mut tx = app.transaction().unwrap();
    let inflight = job(
        &mut tx,
        "running",
        Some(&emu.public_url("renders", "out/inflight.png")),
        "1 minute",
        "inflight",
    );
    assert!(claim(&mut c, "w1", 10).is_empty(), "nothing handed out");
    let (state, reason) = stray_row(&mut c, "out/late.png");
    assert_eq!(state, "stale");
    assert_eq!(
        reason.unwrap(),
        format!("job {} names its object now: no longer a stray", late.0)
    );
    assert_eq!(
        stray_row(&mut c, "out/inflight.png").0,
        "pending",
        "busy, passed over"
    );
    tx.commit().unwrap();
    c.batch_execute("DELETE FROM orphan_cleanup.busy").unwrap();
    assert!(claim(&mut c, "w1", 10).is_empty());
    let (state, reason) = stray_row(&mut c, "out/inflight.png");
    assert_eq!(state, "stale");
    assert!(reason.unwrap().contains(&inflight.0));
    assert_eq!(emu.objects().len(), 2, "both files stay");
    save(&mut c, "generated_saved", &late.0).unwrap();
    save(&mut c, "generated_saved", &inflight.0).unwrap();
    // Named by a job now, neither is a stray again.
    assert_eq!(enqueue_strays(&mut c), 0);
}

/// Sequence 2: the job row naming a stray's file is written after the claim handed the file
/// out (the reaper may have deleted it already). The write itself goes through (the render
/// service is never blocked), but the job can never be saved: at READ COMMITTED the save is
/// refused, and at REPEATABLE READ a transaction whose snapshot predates the claim cannot commit
/// the job and its save either.
#[test]
fn a_job_written_for_a_stray_after_its_claim_can_never_be_saved() {
    let (db, emu) = leak("strays_after_claim", &["out/rc.png", "out/rr.png"]);
    let mut c = db.client();
    let mut app = db.client();
    let mut rr = app
        .build_transaction()
        .isolation_level(postgres::IsolationLevel::RepeatableRead)
        .start()
        .unwrap();
    rr.query_one("SELECT count(*) FROM render_jobs", &[])
        .unwrap();
    assert_eq!(enqueue_strays(&mut c), 2);
    assert_eq!(claim(&mut c, "w1", 10).len(), 2);

    let rc = job(
        &mut c,
        "completed",
        Some(&emu.public_url("renders", "out/rc.png")),
        "1 minute",
        "rc",
    );
    let e = save(&mut c, "generated_saved", &rc.0).unwrap_err();
    assert_eq!(code(&e), "OC001", "{}", db_error(&e));

    let saved = (|| -> Result<(), postgres::Error> {
        let j: String = rr
            .query_one(
                "INSERT INTO render_jobs (status, output_url, prompt) VALUES ('completed', $1, 'rr') RETURNING id::text",
                &[&emu.public_url("renders", "out/rr.png")],
            )?
            .get(0);
        rr.execute(
            "INSERT INTO user_assets (asset_type, metadata) VALUES ('generated_saved', jsonb_build_object('render_job_id', $1::text))",
            &[&j],
        )?;
        rr.commit()
    })();
    let e = saved.expect_err("a job saved in a snapshot older than the claim must not commit");
    assert!(
        ["OC001", "40001"].contains(&code(&e).as_str()),
        "{}",
        db_error(&e)
    );
}

/// Sequence 3: what changed between enqueue and claim. An object uploaded again under the same
/// name is another file; one deleted by someone else is gone; a narrowed allow-list no longer
/// lets the name through; a raised stray_min_age makes it too young; reclaim_strays turned off
/// stops every stray. None is handed out, each says why, and every file stays.
#[test]
fn a_stray_changed_since_it_was_queued_is_not_handed_out() {
    let keys = [
        "out/again.png",
        "out/gone.png",
        "out/other/narrowed.png",
        "out/young.png",
    ];
    let (db, emu) = leak("strays_changed", &keys);
    let mut c = db.client();
    assert_eq!(enqueue_strays(&mut c), 4);
    let mut base = STRAY_SETTINGS.to_vec();
    base.push(("allowed_hosts", emu.host.as_str()));

    // Turned off: nothing is handed out, and the rows wait.
    let mut off = base.clone();
    off.retain(|(n, _)| *n != "reclaim_strays");
    settings(&off);
    assert!(claim(&mut c, "w1", 10).is_empty());
    let pending: i64 = c
        .query_one(
            "SELECT count(*) FROM orphan_cleanup.deletion_queue WHERE state = 'pending'",
            &[],
        )
        .unwrap()
        .get(0);
    assert_eq!(pending, 4);

    emu.upload(
        "renders",
        "out/again.png",
        b"a new render under the old name",
    );
    c.batch_execute(
        "SET storage.allow_delete_query = 'true';
         DELETE FROM storage.objects WHERE name = 'out/gone.png';
         UPDATE storage.objects SET created_at = now() - interval '2 days', updated_at = now() - interval '2 days' WHERE name = 'out/young.png';",
    )
    .unwrap();
    let mut changed = base.clone();
    changed.retain(|(n, _)| *n != "allowed_prefixes");
    changed.push(("allowed_prefixes", "out/leak,out/again,out/gone,out/young"));
    changed.push(("stray_min_age", "3d"));
    settings(&changed);
    assert!(claim(&mut c, "w1", 10).is_empty(), "nothing handed out");
    let (state, reason) = stray_row(&mut c, "out/again.png");
    assert_eq!(
        (state.as_str(), reason.as_deref()),
        (
            "stale",
            Some("uploaded again since it was queued: storage's inventory holds another upload of that name")
        )
    );
    let (state, reason) = stray_row(&mut c, "out/gone.png");
    assert_eq!(
        (state.as_str(), reason.as_deref()),
        (
            "stale",
            Some("no longer in storage's inventory (storage.objects, or the last listing through the Storage API): deleted by someone else")
        )
    );
    let (state, reason) = stray_row(&mut c, "out/other/narrowed.png");
    assert_eq!(state, "rejected");
    assert!(reason.unwrap().contains("outside the allowed prefixes"));
    let young = c
        .query_one(
            "SELECT state, available_at > now() + interval '20 hours' FROM orphan_cleanup.deletion_queue
             WHERE object_path = 'out/young.png'",
            &[],
        )
        .unwrap();
    assert_eq!(young.get::<_, String>(0), "pending");
    assert!(young.get::<_, bool>(1), "waits until it is 3 days old");
    assert_eq!(
        emu.objects().len(),
        4,
        "every file still stored (only gone.png's row in storage.objects was deleted)"
    );
    // The file uploaded again is queued anew once it is old enough, as that upload.
    c.batch_execute("UPDATE storage.objects SET created_at = now() - interval '4 days', updated_at = now() - interval '4 days' WHERE name = 'out/again.png'")
        .unwrap();
    assert_eq!(enqueue_strays(&mut c), 1);
    assert_eq!(claim(&mut c, "w1", 10).len(), 1);
}

/// Sequence 4: a stray row, which has no job, through fail, dead letters, requeue_dead, cancel
/// and cancel_prefix. Each step is audited with no job; a cancelled stray's object is kept, and
/// enqueue_strays() does not queue it again.
#[test]
fn a_stray_row_goes_through_every_queue_state_with_no_job() {
    let (db, _emu) = leak(
        "strays_states",
        &["out/a.png", "out/b.png", "out/keep/c.png"],
    );
    let mut c = db.client();
    // The kept one queued last, so that the claim of one row takes another.
    c.batch_execute("UPDATE storage.objects SET created_at = now() - interval '7 days 12 hours', updated_at = now() - interval '7 days 12 hours' WHERE name = 'out/keep/c.png'")
        .unwrap();
    assert_eq!(enqueue_strays(&mut c), 3);
    let got = claim(&mut c, "w1", 1);
    assert_eq!(got.len(), 1);
    c.execute(
        "SELECT * FROM orphan_cleanup.fail('w1', $1, $2, 'bucket policy denies delete', false)",
        &[&got.lease, &got.ids],
    )
    .unwrap();
    let state: String = c
        .query_one(
            "SELECT state FROM orphan_cleanup.deletion_queue WHERE id = $1",
            &[&got.ids[0]],
        )
        .unwrap()
        .get(0);
    assert_eq!(state, "dead");
    let requeued: i64 = c
        .query_one("SELECT orphan_cleanup.requeue_dead()", &[])
        .unwrap()
        .get(0);
    assert_eq!(requeued, 1);

    let cancelled: Vec<String> = c
        .query(
            "SELECT result FROM orphan_cleanup.cancel_prefix('renders', 'out/keep/')",
            &[],
        )
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(cancelled, vec!["cancelled".to_string()]);
    assert_eq!(
        enqueue_strays(&mut c),
        0,
        "a kept object is not a stray again"
    );
    let preview: i64 = c
        .query_one(
            "SELECT count(*) FROM orphan_cleanup.preview_strays() WHERE object_path = 'out/keep/c.png'",
            &[],
        )
        .unwrap()
        .get(0);
    assert_eq!(preview, 0);

    let actions: Vec<String> = c
        .query(
            "SELECT action FROM orphan_cleanup.audit_log WHERE queue_id IS NOT NULL AND job_id IS NULL ORDER BY id",
            &[],
        )
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    for action in [
        "enqueued",
        "claimed",
        "failed",
        "dead_lettered",
        "requeued",
        "cancelled",
    ] {
        assert!(actions.iter().any(|a| a == action), "{action}: {actions:?}");
    }
    let with_job: i64 = c
        .query_one(
            "SELECT count(*) FROM orphan_cleanup.audit_log WHERE job_id IS NOT NULL",
            &[],
        )
        .unwrap()
        .get(0);
    assert_eq!(with_job, 0);
}

// Reconciliation in cycles: the same strays, found by the cycles themselves once
// reclaim_strays is on, by a full pass (every full_sweep_interval) and, where storage.objects
// has an index on created_at, by looks at what became old enough since the last look.

/// As if `minutes` passed for the strays' clocks: objects were uploaded that much earlier, and
/// reconciliation's passes began and looked that much earlier.
fn time_passes(c: &mut postgres::Client, minutes: i32) {
    c.execute(
        "UPDATE storage.objects SET created_at = created_at - make_interval(mins => $1), updated_at = updated_at - make_interval(mins => $1)",
        &[&minutes],
    )
    .unwrap();
    c.execute(
        "UPDATE orphan_cleanup.detector_state
            SET stray_pass_started_at = stray_pass_started_at - make_interval(mins => $1),
                stray_seen_ts = stray_seen_ts - make_interval(mins => $1)",
        &[&minutes],
    )
    .unwrap();
}

/// (strays_scanned, strays_enqueued, stray_pass) of the latest cycle.
fn stray_log(c: &mut postgres::Client) -> (i64, i64, Option<String>) {
    let r = c
        .query_one(
            "SELECT strays_scanned, strays_enqueued, stray_pass FROM orphan_cleanup.cycle_log ORDER BY id DESC LIMIT 1",
            &[],
        )
        .unwrap();
    (r.get(0), r.get(1), r.get(2))
}

fn queued_strays(c: &mut postgres::Client) -> BTreeSet<String> {
    strays(
        c,
        "SELECT bucket, object_path FROM orphan_cleanup.deletion_queue WHERE kind = 'stray'",
    )
}

fn set(keys: &[&str]) -> BTreeSet<String> {
    keys.iter().map(|k| format!("renders/{k}")).collect()
}

/// Off, cycles leave strays alone. On, the first cycle's full pass queues them and the cycle log
/// says so apart from the orphans; a dry run counts without queueing. A file whose job row the
/// emergency DELETE removed later is found by the next full pass, not before. A file that became
/// old enough since is found by the look by creation time, once storage.objects has an index on
/// created_at.
#[test]
fn cycles_reconcile_strays_by_full_passes_and_by_creation_time() {
    let (db, emu) = leak("strays_cycles", &["out/leak-1.png", "out/leak-2.png"]);
    let mut c = db.client();
    emu.upload("renders", "out/kept-by-job.png", b"j");
    emu.upload("renders", "out/soon.png", b"s");
    c.batch_execute(
        "UPDATE storage.objects SET created_at = now() - interval '8 days', updated_at = now() - interval '8 days' WHERE name = 'out/kept-by-job.png';
         UPDATE storage.objects SET created_at = now() - interval '7 days' + interval '1 minute', updated_at = now() - interval '7 days' + interval '1 minute' WHERE name = 'out/soon.png';",
    )
    .unwrap();
    job(
        &mut c,
        "running",
        Some(&emu.public_url("renders", "out/kept-by-job.png")),
        "1 hour",
        "emergency",
    );
    let mut base = STRAY_SETTINGS.to_vec();
    base.push(("allowed_hosts", emu.host.as_str()));
    let mut off = base.clone();
    off.retain(|(n, _)| *n != "reclaim_strays");
    settings(&off);
    cycle(&mut c);
    assert!(queued_strays(&mut c).is_empty(), "off by default");
    let off_health: String = c
        .query_one(
            "SELECT detail FROM orphan_cleanup.health() WHERE check_name = 'strays'",
            &[],
        )
        .unwrap()
        .get(0);
    assert!(off_health.contains("reclaim_strays = off"), "{off_health}");
    assert_eq!(stray_log(&mut c), (0, 0, None));

    let mut dry = base.clone();
    dry.push(("dry_run", "on"));
    settings(&dry);
    let (status, _, enqueued, _, _) = cycle(&mut c);
    assert_eq!((status.as_str(), enqueued), ("dry_run", 2));
    assert!(queued_strays(&mut c).is_empty(), "a dry run queues nothing");

    settings(&base);
    let (_, _, enqueued, _, _) = cycle(&mut c);
    assert_eq!(enqueued, 2);
    assert_eq!(
        queued_strays(&mut c),
        set(&["out/leak-1.png", "out/leak-2.png"])
    );
    let (scanned, strays_enqueued, pass) = stray_log(&mut c);
    assert_eq!((scanned, strays_enqueued), (4, 2));
    assert_eq!(pass.as_deref(), Some("full"));

    // The emergency DELETE: the job row goes, its file stays, and nothing looks again until the
    // next full pass, a day after the last began.
    c.batch_execute("DELETE FROM render_jobs WHERE prompt = 'emergency'")
        .unwrap();
    time_passes(&mut c, 2);
    cycle(&mut c);
    assert_eq!(
        stray_log(&mut c),
        (0, 0, None),
        "no index on created_at: no look by creation time"
    );
    time_passes(&mut c, 24 * 60);
    cycle(&mut c);
    assert_eq!(
        queued_strays(&mut c),
        set(&[
            "out/leak-1.png",
            "out/leak-2.png",
            "out/kept-by-job.png",
            "out/soon.png"
        ]),
        "the full pass finds the file whose job went, and the one that became old enough"
    );
    assert_eq!(stray_log(&mut c).2.as_deref(), Some("full"));

    // With an index on created_at, a file that became old enough is found by the next cycle.
    let health = |c: &mut postgres::Client| -> String {
        c.query_one(
            "SELECT status || ': ' || detail FROM orphan_cleanup.health() WHERE check_name = 'strays'",
            &[],
        )
        .unwrap()
        .get(0)
    };
    let before = health(&mut c);
    assert!(
        before.starts_with("ok: ")
            && before.contains("full_sweep_interval only")
            && before.contains("CREATE INDEX CONCURRENTLY"),
        "{before}"
    );
    c.batch_execute("CREATE INDEX objects_created_at ON storage.objects (created_at)")
        .unwrap();
    assert!(health(&mut c).contains("in between, by creation time"));
    emu.upload("renders", "out/later.png", b"l");
    c.batch_execute(
        "UPDATE storage.objects SET created_at = now() - interval '7 days' + interval '1 minute', updated_at = now() - interval '7 days' + interval '1 minute' WHERE name = 'out/later.png'",
    )
    .unwrap();
    cycle(&mut c);
    assert!(
        !queued_strays(&mut c).contains("renders/out/later.png"),
        "still too young"
    );
    time_passes(&mut c, 2);
    cycle(&mut c);
    assert!(queued_strays(&mut c).contains("renders/out/later.png"));
    let (scanned, strays_enqueued, pass) = stray_log(&mut c);
    assert_eq!((scanned, strays_enqueued), (1, 1));
    assert_eq!(pass.as_deref(), Some("by creation time"));
}

/// The jobs table restored empty (or emptied) makes every object a stray: the cycle that would
/// queue them trips the circuit breaker, queues nothing, and says why; once a DBA has looked and
/// reset the breaker, the next cycle queues them.
#[test]
fn a_flood_of_strays_trips_the_breaker() {
    let keys: Vec<String> = (0..60).map(|i| format!("out/r{i}.png")).collect();
    let refs: Vec<&str> = keys.iter().map(|k| k.as_str()).collect();
    let (db, emu) = leak("strays_flood", &refs);
    let mut c = db.client();
    for k in &keys {
        job(
            &mut c,
            "completed",
            Some(&emu.public_url("renders", k)),
            "30 minutes",
            "restored",
        );
    }
    let mut pairs = STRAY_SETTINGS.to_vec();
    pairs.push(("allowed_hosts", emu.host.as_str()));
    pairs.push(("breaker_min_rows", "20"));
    settings(&pairs);
    for _ in 0..3 {
        assert_eq!(cycle(&mut c).0, "ok");
    }
    assert!(queued_strays(&mut c).is_empty());

    c.batch_execute("DELETE FROM render_jobs").unwrap();
    time_passes(&mut c, 25 * 60);
    let (status, ..) = cycle(&mut c);
    assert_eq!(status, "tripped");
    assert!(queued_strays(&mut c).is_empty(), "nothing queued");
    let detail: String = c
        .query_one(
            "SELECT detail FROM orphan_cleanup.audit_log WHERE action = 'breaker_tripped'",
            &[],
        )
        .unwrap()
        .get(0);
    assert!(
        detail.contains("strays, objects in storage that no job names")
            && detail.contains("a jobs table restored empty"),
        "{detail}"
    );
    assert_eq!(cycle(&mut c).0, "tripped", "cycles stay stopped");
    c.batch_execute("SELECT orphan_cleanup.reset_breaker('checked preview_strays(): the renders are really gone')")
        .unwrap();
    assert_eq!(cycle(&mut c).2, 60);
    assert_eq!(queued_strays(&mut c).len(), 60);
    assert_eq!(emu.objects().len(), 60, "queued, not yet deleted");
}

/// What reconciliation reads of storage.objects: an idle cycle reads nothing of it without an
/// index on created_at, and only the few index entries past its cursor with one; only a full
/// pass reads the table, a page at a time.
#[test]
fn idle_cycles_do_not_read_storage_objects() {
    let keys: Vec<String> = (0..300).map(|i| format!("out/n{i}.png")).collect();
    let refs: Vec<&str> = keys.iter().map(|k| k.as_str()).collect();
    let (db, _emu) = leak("strays_idle", &refs);
    let mut c = db.client();
    cycle(&mut c);
    assert_eq!(queued_strays(&mut c).len(), 300);
    let read = |c: &mut postgres::Client| -> i64 {
        c.batch_execute("SELECT pg_stat_force_next_flush()")
            .unwrap();
        c.query_one(
            "SELECT coalesce(seq_tup_read, 0) + coalesce(idx_tup_fetch, 0)
             FROM pg_stat_user_tables WHERE relid = 'storage.objects'::regclass",
            &[],
        )
        .unwrap()
        .get(0)
    };
    for index in [false, true] {
        if index {
            c.batch_execute("CREATE INDEX objects_created_at ON storage.objects (created_at)")
                .unwrap();
        }
        let before = read(&mut c);
        cycle(&mut c);
        cycle(&mut c);
        let after = read(&mut c);
        assert!(
            after - before <= 2,
            "index {index}: {} rows read",
            after - before
        );
    }
}

// The review of stray queueing (a reviewer helper, code only): its findings, each a test that
// failed before its fix.

/// Finding 1: the guide's emergency DELETE joins on the exact id text, so it deletes a saved
/// job whose asset spells the id otherwise (upper case here). Its asset still references it:
/// the file it named is kept, never a stray, and never handed out for another job naming it.
/// A TRUNCATE of the jobs table keeps every saved job's files the same way.
#[test]
fn the_files_of_a_saved_job_whose_row_is_deleted_are_kept() {
    let (db, emu) = leak("strays_saved_deleted", &["out/saved.png"]);
    let mut c = db.client();
    let saved = job(
        &mut c,
        "completed",
        Some(&emu.public_url("renders", "out/saved.png")),
        "2 hours",
        "saved",
    );
    save(&mut c, "generated_saved", &saved.0.to_uppercase()).unwrap();
    // Another job naming the same file, an orphan once the saved one is gone.
    job(
        &mut c,
        "completed",
        Some("renders/out/saved.png"),
        "2 hours",
        "twin",
    );
    let deleted = c
        .execute(
            "DELETE FROM render_jobs rj WHERE rj.status = 'completed' AND rj.prompt = 'saved'
               AND NOT EXISTS (SELECT 1 FROM user_assets ua WHERE ua.metadata->>'render_job_id' = rj.id::text)",
            &[],
        )
        .unwrap();
    assert_eq!(
        deleted, 1,
        "the guide's emergency DELETE misses the upper-case reference"
    );
    // preview_strays() warns that a saved asset references a job that is gone.
    let warned = std::sync::Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let seen = warned.clone();
    let mut watched = postgres::Config::new()
        .host("127.0.0.1")
        .port(port())
        .user("postgres")
        .dbname(&db.name)
        .notice_callback(move |n| {
            seen.lock()
                .unwrap()
                .push(format!("{} HINT: {}", n.message(), n.hint().unwrap_or("")))
        })
        .connect(postgres::NoTls)
        .unwrap();
    watched
        .query("SELECT * FROM orphan_cleanup.preview_strays()", &[])
        .unwrap();
    let warnings = warned.lock().unwrap().join("\n");
    assert!(
        warnings.contains("1 saved assets reference render jobs whose rows no longer exist")
            && warnings.contains("guide step 7C"),
        "{warnings}"
    );
    let detail: String = c
        .query_one(
            "SELECT detail FROM orphan_cleanup.audit_log WHERE action = 'protected' AND job_id = $1::text::uuid",
            &[&saved.0],
        )
        .unwrap()
        .get(0);
    assert!(detail.contains("renders/out/saved.png"), "{detail}");
    // The twin's orphan row is retired at its claim; no stray is queued.
    assert_eq!(cycle(&mut c).2, 1);
    assert!(claim(&mut c, "w1", 10).is_empty());
    let reason: String = c
        .query_one(
            "SELECT reason FROM orphan_cleanup.deletion_queue WHERE object_path = 'out/saved.png'",
            &[],
        )
        .unwrap()
        .get(0);
    assert!(reason.contains("is kept"), "{reason}");
    c.batch_execute("DELETE FROM render_jobs").unwrap();

    // A TRUNCATE keeps the saved jobs' files too.
    emu.upload("renders", "out/truncated.png", b"t");
    age_storage(&mut c, 8);
    let t = job(
        &mut c,
        "completed",
        Some(&emu.public_url("renders", "out/truncated.png")),
        "2 hours",
        "t",
    );
    save(&mut c, "generated_saved", &t.0).unwrap();
    c.batch_execute("TRUNCATE render_jobs").unwrap();
    assert_eq!(enqueue_strays(&mut c), 0, "no stray: both files are kept");
    assert_eq!(emu.objects().len(), 2);
}

/// Finding 2: an app that stores the bucket-relative path Storage's upload returns
/// (`u1/x.png` for renders/u1/x.png) names its file: the file is no stray, a queued stray is
/// retired once such a job is written, and a job being written with such a path holds the file
/// against a claim.
#[test]
fn a_job_naming_its_file_by_its_bucket_relative_path_keeps_it() {
    let (db, _emu) = leak(
        "strays_relative",
        &["out/u1/named.png", "out/u1/late.png", "out/u1/inflight.png"],
    );
    let mut c = db.client();
    job(
        &mut c,
        "completed",
        Some("out/u1/named.png"),
        "1 hour",
        "rel",
    );
    assert_eq!(enqueue_strays(&mut c), 2);
    assert_eq!(
        queued_strays(&mut c),
        set(&["out/u1/late.png", "out/u1/inflight.png"])
    );
    let late = job(
        &mut c,
        "completed",
        Some("out/u1/late.png"),
        "1 minute",
        "rel",
    );
    let mut app = db.client();
    let mut tx = app.transaction().unwrap();
    job(
        &mut tx,
        "running",
        Some("out/u1/inflight.png"),
        "1 minute",
        "rel",
    );
    assert!(claim(&mut c, "w1", 10).is_empty());
    let (state, reason) = stray_row(&mut c, "out/u1/late.png");
    assert_eq!(state, "stale");
    assert!(reason.unwrap().contains(&late.0));
    assert_eq!(
        stray_row(&mut c, "out/u1/inflight.png").0,
        "pending",
        "held by the job being written"
    );
    tx.commit().unwrap();
    c.batch_execute("DELETE FROM orphan_cleanup.busy").unwrap();
    assert!(claim(&mut c, "w1", 10).is_empty());
    assert_eq!(stray_row(&mut c, "out/u1/inflight.png").0, "stale");
}

/// Finding 3: an object uploaded again with upsert keeps its created_at; its age is counted
/// from the latest upload (updated_at), so a fresh render under an old name is no stray.
#[test]
fn an_object_uploaded_again_is_as_young_as_its_latest_upload() {
    let (db, emu) = leak("strays_reupload", &["out/cache/abc.png"]);
    let mut c = db.client();
    emu.upload("renders", "out/cache/abc.png", b"rendered again just now");
    let (created_old, updated_new): (bool, bool) = {
        let r = c
            .query_one(
                "SELECT created_at < now() - interval '7 days', updated_at > now() - interval '1 hour'
                 FROM storage.objects WHERE name = 'out/cache/abc.png'",
                &[],
            )
            .unwrap();
        (r.get(0), r.get(1))
    };
    assert!(
        created_old && updated_new,
        "as the real server keeps an upsert"
    );
    assert!(strays(
        &mut c,
        "SELECT bucket, object_path FROM orphan_cleanup.preview_strays()"
    )
    .is_empty());
    assert_eq!(enqueue_strays(&mut c), 0);
    cycle(&mut c);
    assert!(queued_strays(&mut c).is_empty());
}

// The second review of stray queueing (a reviewer helper, code only), each a test that failed
// before its fix.

/// A job deleted at REPEATABLE READ, in a snapshot older than a save of it: the delete must not
/// commit unseen by the save (40001 on the job's fence row), or else the file is kept. A
/// TRUNCATE of the jobs table must run at READ COMMITTED.
#[test]
fn a_saved_job_deleted_in_an_older_snapshot_keeps_its_file() {
    let (db, emu) = leak("strays_rr_delete", &["out/rr.png"]);
    let mut c = db.client();
    let j = job(
        &mut c,
        "completed",
        Some(&emu.public_url("renders", "out/rr.png")),
        "2 hours",
        "rr",
    );
    let mut app = db.client();
    let mut t2 = app
        .build_transaction()
        .isolation_level(postgres::IsolationLevel::RepeatableRead)
        .start()
        .unwrap();
    t2.query("SELECT count(*) FROM user_assets", &[]).unwrap();
    save(&mut c, "generated_saved", &j.0).unwrap();
    let deleted = t2
        .execute("DELETE FROM render_jobs WHERE id = $1::text::uuid", &[&j.0])
        .and_then(|_| t2.commit());
    match deleted {
        Err(e) => assert_eq!(code(&e), "40001", "{}", db_error(&e)),
        Ok(()) => {
            let kept: i64 = c
                .query_one(
                    "SELECT count(*) FROM orphan_cleanup.objects WHERE object_path = 'out/rr.png' AND kept_at IS NOT NULL",
                    &[],
                )
                .unwrap()
                .get(0);
            assert_eq!(kept, 1, "the delete committed: the file must be kept");
        }
    }
    assert_eq!(enqueue_strays(&mut c), 0);

    let mut t3 = app
        .build_transaction()
        .isolation_level(postgres::IsolationLevel::RepeatableRead)
        .start()
        .unwrap();
    let e = t3.batch_execute("TRUNCATE render_jobs").unwrap_err();
    assert!(
        db_error(&e).contains("must run at READ COMMITTED"),
        "{}",
        db_error(&e)
    );
}

/// A render stored at a bucket's root, saved by its bare file name (`x.png`, what upload
/// returns for it): no reading takes that as an object, so objects at a bucket's root are never
/// strays.
#[test]
fn an_object_at_a_buckets_root_is_never_a_stray() {
    let db = TestDb::attached("strays_root");
    let emu = Emulator::start_keeping("strays_root");
    settings(&[
        ("allowed_buckets", "renders"),
        ("allowed_hosts", emu.host.as_str()),
        ("reclaim_strays", "on"),
    ]);
    emu.create_bucket("renders");
    emu.upload("renders", "x.png", b"saved at the root");
    emu.upload("renders", "dir/leak.png", b"a stray");
    let mut c = db.client();
    age_storage(&mut c, 8);
    let j = job(&mut c, "completed", Some("x.png"), "2 hours", "root");
    save(&mut c, "generated_saved", &j.0).unwrap();
    assert_eq!(
        strays(
            &mut c,
            "SELECT bucket, object_path FROM orphan_cleanup.preview_strays()"
        ),
        set(&["dir/leak.png"])
    );
    assert_eq!(enqueue_strays(&mut c), 1);
    cycle(&mut c);
    assert_eq!(queued_strays(&mut c), set(&["dir/leak.png"]));
}
