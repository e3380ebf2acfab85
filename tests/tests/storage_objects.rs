//! The storage emulator keeps `storage.objects` the way the real Supabase Storage server does
//! (issue 15): a row per object in the project's database, with the real table's columns,
//! written on upload and deleted with the object; a direct `DELETE` there refused as the server
//! refuses it. Tests, the demo and the bench then see what a Supabase database holds, and the
//! reaper's deletions are checked against it (`confirm()` reads `storage.objects`).

use std::collections::BTreeSet;

use e2e::process::Hermetic;
use e2e::storage::{output_text, reaper, Emulator};
use e2e::*;

fn rows(c: &mut postgres::Client) -> BTreeSet<String> {
    c.query("SELECT bucket_id || '/' || name FROM storage.objects", &[])
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect()
}

#[test]
fn the_emulator_keeps_storage_objects_and_the_reaper_empties_it_of_orphans_only() {
    let db = TestDb::attached("storage_objects_kept");
    let emu = Emulator::start_keeping("storage_objects_kept");
    settings(&[
        ("allowed_buckets", "renders"),
        ("allowed_hosts", emu.host.as_str()),
    ]);
    emu.create_bucket("renders");
    let mut c = db.client();
    let mut orphans = BTreeSet::new();
    for i in 0..5 {
        let key = format!("so/{i} render.png");
        emu.upload("renders", &key, b"0123456789");
        job(
            &mut c,
            "completed",
            Some(&emu.public_url("renders", &key)),
            "2 hours",
            "so",
        );
        orphans.insert(format!("renders/{key}"));
    }
    emu.upload("renders", "so/saved.png", b"kept");
    let saved = job(
        &mut c,
        "completed",
        Some(&emu.public_url("renders", "so/saved.png")),
        "2 hours",
        "so",
    );
    save(&mut c, "generated_saved", &saved.0).unwrap();

    // The real table's shape: one row per object, its size, type and eTag in metadata, the
    // name split into path_tokens, the bucket's row beside it.
    let all: BTreeSet<String> = orphans
        .iter()
        .cloned()
        .chain(["renders/so/saved.png".to_string()])
        .collect();
    assert_eq!(rows(&mut c), all);
    let r = c
        .query_one(
            "SELECT (metadata->>'size')::bigint, metadata->>'mimetype', metadata ? 'eTag', path_tokens, version IS NOT NULL,
                    (SELECT public FROM storage.buckets WHERE id = 'renders')
             FROM storage.objects WHERE name = 'so/saved.png'",
            &[],
        )
        .unwrap();
    assert_eq!(r.get::<_, i64>(0), 4);
    assert_eq!(r.get::<_, String>(1), "application/octet-stream");
    assert!(r.get::<_, bool>(2));
    assert_eq!(
        r.get::<_, Vec<String>>(3),
        vec!["so".to_string(), "saved.png".to_string()]
    );
    assert!(r.get::<_, bool>(4));
    assert!(r.get::<_, bool>(5));
    // Deleting a row directly would orphan the file: refused, as the server refuses it.
    let e = c
        .batch_execute("DELETE FROM storage.objects WHERE name = 'so/saved.png'")
        .unwrap_err();
    assert!(
        db_error(&e).contains(
            "Direct deletion from storage tables is not allowed. Use the Storage API instead."
        ),
        "{e}"
    );
    assert_eq!(e.code().unwrap().code(), "42501");

    // The reaper deletes the orphans: their rows go with their files, the saved one stays.
    let cycle: String = c
        .query_one("SELECT status FROM orphan_cleanup.run_cycle()", &[])
        .unwrap()
        .get(0);
    assert_eq!(cycle, "ok");
    let out = reaper(&db.name, &emu, &["drain", "--no-probe"]).run();
    let text = output_text(&out);
    assert!(out.status.success(), "{text}");
    assert!(text.contains("deleted 5,"), "{text}");
    let left: BTreeSet<String> = ["renders/so/saved.png".to_string()].into();
    assert_eq!(rows(&mut c), left);
    assert_eq!(emu.objects(), left);
}
