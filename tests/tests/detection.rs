//! Detection against the deployment guide's definition, on data with every kind of job.

use std::collections::BTreeSet;

use e2e::*;

/// The guide's own count query (step 2A with the 7B age filter), verbatim but for the interval.
const GUIDE_COUNT: &str = "
    SELECT COUNT(*)
    FROM render_jobs rj
    LEFT JOIN user_assets ua ON ua.metadata->>'render_job_id' = rj.id::text
    WHERE rj.status = 'completed'
      AND rj.output_url IS NOT NULL
      AND ua.id IS NULL
      AND rj.created_at < NOW() - INTERVAL '1 hour'";

/// Seeds one or more jobs of every kind, tagged in `prompt` with what should become of them.
fn seed(c: &mut postgres::Client) {
    for i in 0..20 {
        job(
            c,
            "completed",
            Some(&public_url("renders", &format!("u1/orphan-{i}.png"))),
            "2 hours",
            "orphan",
        );
    }
    job(
        c,
        "completed",
        Some("renders/u2/bare.png"),
        "3 hours",
        "orphan",
    );
    job(
        c,
        "completed",
        Some(&format!("https://{HOST}/storage/v1/object/sign/renders/u2/signed.png?token=eyJhbGciOiJIUzI1NiJ9.x.y")),
        "3 hours",
        "orphan",
    );
    for i in 0..5 {
        let j = job(
            c,
            "completed",
            Some(&public_url("renders", &format!("u3/saved-{i}.png"))),
            "2 hours",
            "saved",
        );
        save(c, "generated_saved", &j.0).unwrap();
    }
    let j = job(
        c,
        "completed",
        Some(&public_url("renders", "u3/upload-ref.png")),
        "2 hours",
        "saved",
    );
    save(c, "upload", &j.0).unwrap();
    for spelling in [
        |id: &str| id.to_uppercase(),
        |id: &str| format!(" {id} "),
        |id: &str| format!("{{{id}}}"),
        |id: &str| id.replace('-', ""),
    ] {
        let j = job(
            c,
            "completed",
            Some(&public_url("renders", &format!("u4/{}.png", rand_tag()))),
            "2 hours",
            "noncanonical",
        );
        save(c, "generated_saved", &spelling(&j.0)).unwrap();
    }
    job(
        c,
        "failed",
        Some(&public_url("renders", "u5/failed.png")),
        "2 hours",
        "failed",
    );
    job(c, "running", None, "2 hours", "running");
    job(c, "completed", None, "2 hours", "no_url");
    job(
        c,
        "completed",
        Some(&public_url("renders", "u6/young.png")),
        "10 minutes",
        "young",
    );
    job(
        c,
        "completed",
        Some(&public_url("renders", "u7/../../avatars/x.png")),
        "2 hours",
        "rejected",
    );
    job(
        c,
        "completed",
        Some(&public_url("avatars", "u7/face.png")),
        "2 hours",
        "rejected",
    );
    job(
        c,
        "completed",
        Some("https://staging.supabase.co/storage/v1/object/public/renders/u7/x.png"),
        "2 hours",
        "rejected",
    );
    job(
        c,
        "completed",
        Some("javascript:alert(1)"),
        "2 hours",
        "rejected",
    );
    // Two jobs, one object: one saved, so the other's file must stay.
    let shared = public_url("renders", "u8/shared.png");
    let keeper = job(c, "completed", Some(&shared), "2 hours", "saved");
    save(c, "generated_saved", &keeper.0).unwrap();
    job(
        c,
        "completed",
        Some(&format!("{shared}?download")),
        "2 hours",
        "shared",
    );
    // Two orphans sharing one object: both may go.
    let both = public_url("renders", "u8/both.png");
    job(c, "completed", Some(&both), "2 hours", "orphan");
    job(c, "completed", Some(&both), "2 hours", "orphan");
    // A young job sharing an object with an old orphan keeps it.
    let young_shared = public_url("renders", "u8/young-shared.png");
    job(c, "completed", Some(&young_shared), "2 hours", "shared");
    job(c, "completed", Some(&young_shared), "5 minutes", "young");
}

fn rand_tag() -> String {
    use std::sync::atomic::{AtomicU32, Ordering};
    static N: AtomicU32 = AtomicU32::new(0);
    format!("n{}", N.fetch_add(1, Ordering::Relaxed))
}

fn tagged(c: &mut postgres::Client, tag: &str) -> BTreeSet<String> {
    c.query(
        "SELECT id::text FROM render_jobs WHERE prompt = $1",
        &[&tag],
    )
    .unwrap()
    .iter()
    .map(|r| r.get(0))
    .collect()
}

fn queued(c: &mut postgres::Client, state: &str) -> BTreeSet<String> {
    c.query(
        "SELECT job_id::text FROM orphan_cleanup.deletion_queue WHERE state = $1",
        &[&state],
    )
    .unwrap()
    .iter()
    .map(|r| r.get(0))
    .collect()
}

#[test]
fn orphan_count_is_the_guides_count() {
    settings(BASE_SETTINGS);
    let db = TestDb::attached("detect_count");
    let mut c = db.client();
    seed(&mut c);
    let guide: i64 = c.query_one(GUIDE_COUNT, &[]).unwrap().get(0);
    let ours: i64 = c
        .query_one("SELECT orphan_cleanup.orphan_count()", &[])
        .unwrap()
        .get(0);
    assert_eq!(ours, guide);
    // orphans + noncanonical + rejected + shared: the guide counts all of them.
    let expected = ["orphan", "noncanonical", "rejected", "shared"]
        .iter()
        .map(|t| tagged(&mut c, t).len() as i64)
        .sum::<i64>();
    assert_eq!(guide, expected);
    let with_arg: i64 = c
        .query_one("SELECT orphan_cleanup.orphan_count('1 minute')", &[])
        .unwrap()
        .get(0);
    let young = tagged(&mut c, "young").len() as i64;
    assert_eq!(
        with_arg,
        expected + young,
        "the young jobs count with min_age 1 minute"
    );
}

#[test]
fn a_cycle_enqueues_exactly_the_deletable_orphans() {
    settings(BASE_SETTINGS);
    let db = TestDb::attached("detect_cycle");
    let mut c = db.client();
    seed(&mut c);
    let (status, found, enqueued, protected, rejected) = cycle(&mut c);
    assert_eq!(status, "ok");
    let orphans = tagged(&mut c, "orphan");
    assert_eq!(
        queued(&mut c, "pending"),
        orphans,
        "exactly the deletable orphans are queued"
    );
    assert_eq!(enqueued, orphans.len() as i64);
    assert_eq!(queued(&mut c, "rejected"), tagged(&mut c, "rejected"));
    assert_eq!(rejected, 4);
    assert_eq!(
        protected,
        (tagged(&mut c, "noncanonical").len() + tagged(&mut c, "shared").len()) as i64
    );
    let guide: i64 = c.query_one(GUIDE_COUNT, &[]).unwrap().get(0);
    assert_eq!(found, guide);

    // Nothing saved, young, failed or of another asset type is ever queued.
    for tag in [
        "saved",
        "noncanonical",
        "failed",
        "running",
        "no_url",
        "young",
        "shared",
    ] {
        for id in tagged(&mut c, tag) {
            let states = queue_states(&mut c, &uuid_text::Uuid(id.clone()));
            assert!(states.is_empty(), "{tag} job {id} was queued: {states:?}");
        }
    }
    // The signed URL's token is not stored.
    let leaked: i64 = c
        .query_one("SELECT count(*) FROM orphan_cleanup.deletion_queue WHERE output_url LIKE '%eyJhbGciOiJIUzI1NiJ9%'", &[])
        .unwrap()
        .get(0);
    assert_eq!(leaked, 0);
    let audit: i64 = c.query_one("SELECT count(*) FROM orphan_cleanup.audit_log WHERE output_url LIKE '%token=REDACTED%'", &[]).unwrap().get(0);
    assert!(audit >= 1);

    // Rejections say why; protections are audited.
    let reasons: Vec<String> = c
        .query("SELECT reason FROM orphan_cleanup.deletion_queue WHERE state = 'rejected' ORDER BY reason", &[])
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert!(reasons.iter().any(|r| r.contains("'..'")), "{reasons:?}");
    assert!(
        reasons
            .iter()
            .any(|r| r.contains("\"avatars\" is not in the bucket allow-list")),
        "{reasons:?}"
    );
    assert!(
        reasons.iter().any(|r| r.contains("staging.supabase.co")),
        "{reasons:?}"
    );
    assert!(
        reasons.iter().any(|r| r.contains("javascript")),
        "{reasons:?}"
    );
    let protected_audit: i64 = c
        .query_one(
            "SELECT count(*) FROM orphan_cleanup.audit_log WHERE action = 'protected'",
            &[],
        )
        .unwrap()
        .get(0);
    assert_eq!(protected_audit, protected);

    // A second cycle finds nothing new and queues nothing twice.
    let (_, _, again, _, _) = cycle(&mut c);
    assert_eq!(again, 0);
    let rows: i64 = c
        .query_one("SELECT count(*) FROM orphan_cleanup.deletion_queue", &[])
        .unwrap()
        .get(0);
    assert_eq!(rows as usize, orphans.len() + 4);
}

#[test]
fn preview_shows_verdicts_and_writes_nothing() {
    settings(BASE_SETTINGS);
    let db = TestDb::attached("detect_preview");
    let mut c = db.client();
    seed(&mut c);
    let rows = c
        .query(
            "SELECT job_id::text, verdict FROM orphan_cleanup.preview(NULL, 1000)",
            &[],
        )
        .unwrap();
    let verdict = |tag: &str, c: &mut postgres::Client| -> BTreeSet<String> {
        let ids = tagged(c, tag);
        rows.iter()
            .filter(|r| ids.contains(&r.get::<_, String>(0)))
            .map(|r| r.get::<_, String>(1))
            .collect()
    };
    assert_eq!(
        verdict("orphan", &mut c),
        BTreeSet::from(["orphan".to_string()])
    );
    assert!(verdict("noncanonical", &mut c)
        .iter()
        .all(|v| v.starts_with("protected: referenced")));
    assert!(verdict("shared", &mut c)
        .iter()
        .all(|v| v.starts_with("protected: shares its object")));
    assert!(verdict("rejected", &mut c)
        .iter()
        .all(|v| v.starts_with("rejected: ")));
    assert!(verdict("saved", &mut c).is_empty());
    let n: i64 = c
        .query_one("SELECT count(*) FROM orphan_cleanup.deletion_queue", &[])
        .unwrap()
        .get(0);
    assert_eq!(n, 0, "preview wrote nothing");
    let limited = c
        .query("SELECT * FROM orphan_cleanup.preview(NULL, 3)", &[])
        .unwrap();
    assert_eq!(limited.len(), 3);
}

#[test]
fn cycles_are_incremental_but_catch_deleted_assets_and_late_completions() {
    settings(&[
        ("allowed_buckets", "renders"),
        ("allowed_hosts", HOST),
        ("full_sweep_interval", "1d"),
    ]);
    let db = TestDb::attached("detect_incremental");
    let mut c = db.client();
    let saved = job(
        &mut c,
        "completed",
        Some(&public_url("renders", "a/saved.png")),
        "3 hours",
        "saved",
    );
    save(&mut c, "generated_saved", &saved.0).unwrap();
    let late = job(
        &mut c,
        "running",
        Some(&public_url("renders", "a/late.png")),
        "3 hours",
        "late",
    );
    job(
        &mut c,
        "completed",
        Some(&public_url("renders", "a/first.png")),
        "3 hours",
        "orphan",
    );
    assert_eq!(cycle(&mut c).2, 1);

    // New work after the cursor is found by the next cycle.
    let newer = job(
        &mut c,
        "completed",
        Some(&public_url("renders", "a/newer.png")),
        "61 minutes",
        "orphan",
    );
    let r: (i64, i64) = {
        let row = c.query_one("SELECT enqueued, (SELECT scanned FROM orphan_cleanup.cycle_log ORDER BY id DESC LIMIT 1) FROM orphan_cleanup.run_cycle()", &[]).unwrap();
        (row.get(0), 0)
    };
    assert_eq!(r.0, 1);
    assert_eq!(queue_states(&mut c, &newer), vec!["pending"]);
    let scanned: i64 = c
        .query_one(
            "SELECT scanned FROM orphan_cleanup.cycle_log ORDER BY id DESC LIMIT 1",
            &[],
        )
        .unwrap()
        .get(0);
    assert_eq!(
        scanned, 1,
        "the steady-state cycle looked only past its cursor"
    );

    // The saved job's asset is deleted: the job is rechecked and queued.
    c.execute(
        "DELETE FROM user_assets WHERE metadata->>'render_job_id' = $1",
        &[&saved.0],
    )
    .unwrap();
    assert_eq!(cycle(&mut c).2, 1);
    assert_eq!(queue_states(&mut c, &saved), vec!["pending"]);

    // A job that completes after the cursor passed it waits for the full sweep.
    c.execute(
        "UPDATE render_jobs SET status = 'completed' WHERE id = $1::text::uuid",
        &[&late.0],
    )
    .unwrap();
    assert_eq!(
        cycle(&mut c).2,
        0,
        "incremental cycles do not re-read old history"
    );
    settings(&[
        ("allowed_buckets", "renders"),
        ("allowed_hosts", HOST),
        ("full_sweep_interval", "0"),
    ]);
    assert_eq!(
        cycle(&mut c).2,
        1,
        "the full sweep catches the late completion"
    );
    assert_eq!(queue_states(&mut c, &late), vec!["pending"]);
    let sweep: bool = c
        .query_one(
            "SELECT full_sweep FROM orphan_cleanup.cycle_log ORDER BY id DESC LIMIT 1",
            &[],
        )
        .unwrap()
        .get(0);
    assert!(sweep);
}

#[test]
fn max_per_cycle_caps_a_cycle_and_the_rest_waits() {
    settings(&[
        ("allowed_buckets", "renders"),
        ("allowed_hosts", HOST),
        ("max_per_cycle", "7"),
    ]);
    let db = TestDb::attached("detect_cap");
    let mut c = db.client();
    for i in 0..20 {
        job(
            &mut c,
            "completed",
            Some(&public_url("renders", &format!("cap/{i}.png"))),
            "2 hours",
            "orphan",
        );
    }
    assert_eq!(cycle(&mut c).2, 7);
    assert_eq!(cycle(&mut c).2, 7);
    assert_eq!(cycle(&mut c).2, 6);
    assert_eq!(cycle(&mut c).2, 0);
    let n: i64 = c.query_one("SELECT count(DISTINCT job_id) FROM orphan_cleanup.deletion_queue WHERE state = 'pending'", &[]).unwrap().get(0);
    assert_eq!(n, 20);
}

#[test]
fn dry_run_cycles_find_but_enqueue_nothing() {
    settings(&[
        ("allowed_buckets", "renders"),
        ("allowed_hosts", HOST),
        ("dry_run", "on"),
    ]);
    let db = TestDb::attached("detect_dry");
    let mut c = db.client();
    for i in 0..3 {
        job(
            &mut c,
            "completed",
            Some(&public_url("renders", &format!("dry/{i}.png"))),
            "2 hours",
            "orphan",
        );
    }
    let (status, found, would, _, _) = cycle(&mut c);
    assert_eq!((status.as_str(), found, would), ("dry_run", 3, 3));
    let n: i64 = c
        .query_one("SELECT count(*) FROM orphan_cleanup.deletion_queue", &[])
        .unwrap()
        .get(0);
    assert_eq!(n, 0);
    // Turning dry run off finds the same orphans: the dry run did not move the cursor.
    settings(BASE_SETTINGS);
    assert_eq!(cycle(&mut c).2, 3);
}

#[test]
fn enqueue_orphans_is_the_safe_emergency_cleanup() {
    settings(BASE_SETTINGS);
    let db = TestDb::attached("detect_emergency");
    let mut c = db.client();
    seed(&mut c);
    let n: i64 = c
        .query_one("SELECT orphan_cleanup.enqueue_orphans(NULL, 5)", &[])
        .unwrap()
        .get(0);
    assert_eq!(n, 5);
    let rest: i64 = c
        .query_one("SELECT orphan_cleanup.enqueue_orphans('1 hour', 1000)", &[])
        .unwrap()
        .get(0);
    assert_eq!((n + rest) as usize, tagged(&mut c, "orphan").len());
    let jobs_left: i64 = c
        .query_one("SELECT count(*) FROM render_jobs", &[])
        .unwrap()
        .get(0);
    assert!(
        jobs_left > 0,
        "unlike the guide's DELETE, no job row is touched before its file is gone"
    );
    let err = c
        .query_one("SELECT orphan_cleanup.enqueue_orphans(NULL, 0)", &[])
        .unwrap_err();
    assert!(
        db_error(&err).contains("max_rows must be at least 1"),
        "{err}"
    );
}

#[test]
fn a_cycle_without_allowed_buckets_fails_clearly_and_is_recorded() {
    settings(&[]);
    let db = TestDb::attached("detect_nobuckets");
    let mut c = db.client();
    job(
        &mut c,
        "completed",
        Some("renders/a.png"),
        "2 hours",
        "orphan",
    );
    let (status, ..) = cycle(&mut c);
    assert_eq!(status, "failed");
    let err: String = c
        .query_one(
            "SELECT error FROM orphan_cleanup.cycle_log ORDER BY id DESC LIMIT 1",
            &[],
        )
        .unwrap()
        .get(0);
    assert!(
        err.contains("allowed_buckets is empty") && err.contains(&how_to_set("allowed_buckets")),
        "{err}"
    );
    let n: i64 = c
        .query_one("SELECT count(*) FROM orphan_cleanup.deletion_queue", &[])
        .unwrap()
        .get(0);
    assert_eq!(n, 0);
}
