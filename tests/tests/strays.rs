//! Stray objects (issue 15): files in storage that no job row names, found through
//! `storage.objects`, which the storage emulator keeps in the project's database as the real
//! server does. `preview_strays()` lists them and writes nothing.

use std::collections::BTreeSet;

use e2e::storage::Emulator;
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
        "UPDATE storage.objects SET created_at = created_at - make_interval(days => $1)",
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
         CREATE TABLE storage.objects (bucket_id text, name text, metadata jsonb, created_at timestamptz)",
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
