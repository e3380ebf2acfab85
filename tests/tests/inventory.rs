//! Strays where `storage.objects` is not in the database (issue 15): `reaper inventory` lists
//! the allowed buckets through the Storage API (`POST /object/list`, page by page, folder by
//! folder) into `orphan_cleanup.object_inventory`, and strays are reconciled against that
//! listing as against `storage.objects`. The emulator here keeps no `storage.objects`.

// Sequences, each a test:
//   1. leak, list, reconcile in a cycle, reap; an object deleted by someone else, then listed
//      again                       -> strays_are_found_through_the_api_inventory_and_reclaimed
//   2. the render service writes the job row after the listing, before the claim
//                                  -> a_job_written_after_the_listing_keeps_its_file
//   3. an object deleted by the reaper while a listing that read it earlier is still running
//                                  -> a_listing_does_not_bring_back_what_was_deleted_while_it_ran
//   4. bad input: storage.objects present, a folder or an unknown listing given to the SQL API
//                                  -> inventory_refuses_what_it_cannot_record_truthfully
//   5. a listing records a page while a confirm() of one of its objects is in flight
//                                  -> a_listing_waits_for_a_confirm_in_flight

use std::collections::BTreeSet;

use e2e::storage::*;
use e2e::*;

const SETTINGS: &[(&str, &str)] = &[
    ("allowed_buckets", "renders"),
    ("allowed_prefixes", "out/"),
    ("reclaim_strays", "on"),
];

/// A database without storage.objects, and an emulator keeping none.
fn setup(name: &str) -> (TestDb, Emulator) {
    let db = TestDb::attached(name);
    let emu = Emulator::start();
    let mut pairs = SETTINGS.to_vec();
    pairs.push(("allowed_hosts", emu.host.as_str()));
    settings(&pairs);
    emu.create_bucket("renders");
    reaper_role();
    (db, emu)
}

/// `reaper inventory` with `args`: whether it succeeded, and what it printed.
fn inventory(db: &TestDb, emu: &Emulator, args: &[&str]) -> (bool, String) {
    let out = run(&mut reaper(&db.name, emu, &[&["inventory"], args].concat()));
    (out.status.success(), output_text(&out))
}

fn preview(c: &mut postgres::Client) -> BTreeSet<String> {
    c.query(
        "SELECT object_path FROM orphan_cleanup.preview_strays()",
        &[],
    )
    .unwrap()
    .iter()
    .map(|r| r.get(0))
    .collect()
}

fn set(keys: &[&str]) -> BTreeSet<String> {
    keys.iter().map(|k| k.to_string()).collect()
}

fn listed(c: &mut postgres::Client) -> BTreeSet<String> {
    c.query("SELECT name FROM orphan_cleanup.object_inventory", &[])
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect()
}

/// Sequence 1. Nothing is a stray before a listing, and preview_strays() says to run one. A
/// listing with pages of two finds every object in nested folders, leaves out folders whose
/// names differ only in case, and a cycle queues exactly the old objects no job names; the reaper
/// deletes them, the ledger has their bytes, and the listing forgets them. An object deleted by
/// someone else is forgotten by the next listing.
#[test]
fn strays_are_found_through_the_api_inventory_and_reclaimed() {
    let (db, emu) = setup("inventory_reclaim");
    let mut c = db.client();
    let no_table: bool = c
        .query_one("SELECT to_regclass('storage.objects') IS NULL", &[])
        .unwrap()
        .get(0);
    assert!(
        no_table,
        "this test is about databases without storage.objects"
    );
    let e = c
        .query("SELECT * FROM orphan_cleanup.preview_strays()", &[])
        .unwrap_err();
    assert!(
        db_error(&e).contains("no bucket has been listed through the Storage API yet")
            && db_error(&e).contains("reaper inventory"),
        "{}",
        db_error(&e)
    );

    let mut leaked: Vec<String> = (1..=5)
        .map(|i| format!("out/2026/11/leak-{i}.png"))
        .collect();
    leaked.push("out/a&b done+1.png".into());
    leaked.push("out/deep/er/x.png".into());
    for k in &leaked {
        emu.upload("renders", k, k.as_bytes());
    }
    emu.upload("renders", "out/named.png", b"named by a job");
    emu.upload("renders", "thumbs/t.png", b"outside the prefixes");
    emu.upload("renders", "out/cache/a.png", b"a");
    emu.upload("renders", "out/Cache/b.png", b"b");
    emu.age("renders", "", 8);
    emu.upload("renders", "out/young.png", b"uploaded just now");
    job(
        &mut c,
        "completed",
        Some(&emu.public_url("renders", "out/named.png")),
        "30 minutes",
        "n",
    );

    let (ok, text) = inventory(&db, &emu, &["--page-size", "2"]);
    assert!(ok, "{text}");
    assert!(
        text.contains("renders: 10 objects listed in 7 folders; 0 no longer in storage forgotten"),
        "{text}"
    );
    assert!(
        text.contains("renders: not listed, names differing only in case: out/Cache/, out/cache/"),
        "{text}"
    );
    let leaked_set: BTreeSet<String> = leaked.iter().cloned().collect();
    assert_eq!(preview(&mut c), leaked_set);
    let health: (String, String) = {
        let r = c
            .query_one(
                "SELECT status, detail FROM orphan_cleanup.health() WHERE check_name = 'strays'",
                &[],
            )
            .unwrap();
        (r.get(0), r.get(1))
    };
    assert_eq!(health.0, "ok", "{}", health.1);
    assert!(
        health.1.contains("last listed renders at") && health.1.contains("(10 objects)"),
        "{}",
        health.1
    );

    // A cycle reconciles against the listing as it would against storage.objects.
    cycle(&mut c);
    let queued: BTreeSet<String> = c
        .query(
            "SELECT object_path FROM orphan_cleanup.deletion_queue WHERE kind = 'stray'",
            &[],
        )
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(queued, leaked_set);

    let out = run(&mut reaper(&db.name, &emu, &["drain"]));
    assert!(out.status.success(), "{}", output_text(&out));
    assert_eq!(
        emu.objects(),
        set(&[
            "renders/out/named.png",
            "renders/thumbs/t.png",
            "renders/out/cache/a.png",
            "renders/out/Cache/b.png",
            "renders/out/young.png",
        ])
    );
    let r = c
        .query_one(
            "SELECT count(*) FILTER (WHERE state = 'deleted'), sum(bytes)::bigint FROM orphan_cleanup.deletion_queue",
            &[],
        )
        .unwrap();
    let bytes: usize = leaked.iter().map(String::len).sum();
    assert_eq!(
        (r.get::<_, i64>(0), r.get::<_, Option<i64>>(1)),
        (7, Some(bytes as i64))
    );
    assert_eq!(
        listed(&mut c),
        set(&["out/named.png", "thumbs/t.png", "out/young.png"]),
        "confirm() forgets what the reaper deleted"
    );

    emu.delete_one("renders", "thumbs/t.png");
    let (ok, text) = inventory(&db, &emu, &[]);
    assert!(ok, "{text}");
    assert!(
        text.contains("renders: 2 objects listed in 2 folders; 1 no longer in storage forgotten"),
        "{text}"
    );
    assert_eq!(listed(&mut c), set(&["out/named.png", "out/young.png"]));
    assert!(preview(&mut c).is_empty());
}

/// Sequence 2: the render service uploads first and writes the job row naming the file later,
/// after the listing and after the stray was queued, before the claim. The claim re-checks the
/// jobs table in its own snapshot: the row goes stale, naming the job, and the file stays.
#[test]
fn a_job_written_after_the_listing_keeps_its_file() {
    let (db, emu) = setup("inventory_late_job");
    let mut c = db.client();
    for k in ["out/late.png", "out/leak.png"] {
        emu.upload("renders", k, k.as_bytes());
    }
    emu.age("renders", "", 8);
    let (ok, text) = inventory(&db, &emu, &[]);
    assert!(ok, "{text}");
    let n: i64 = c
        .query_one("SELECT orphan_cleanup.enqueue_strays()", &[])
        .unwrap()
        .get(0);
    assert_eq!(n, 2);
    job(
        &mut c,
        "completed",
        Some(&format!(
            r#"{{"url":"{}"}}"#,
            emu.public_url("renders", "out/late.png")
        )),
        "1 minute",
        "late",
    );
    let out = run(&mut reaper(&db.name, &emu, &["drain"]));
    assert!(out.status.success(), "{}", output_text(&out));
    assert_eq!(emu.objects(), set(&["renders/out/late.png"]));
    let r = c
        .query_one(
            "SELECT state, reason FROM orphan_cleanup.deletion_queue WHERE object_path = 'out/late.png'",
            &[],
        )
        .unwrap();
    let (state, reason): (String, String) = (r.get(0), r.get(1));
    assert_eq!(state, "stale");
    assert!(
        reason.starts_with("job ") && reason.ends_with("names its object now: no longer a stray"),
        "{reason}"
    );
}

/// Sequence 3: a listing reads a page, the reaper deletes an object of that page and confirms
/// it, and then the listing records the page. The object must not come back as a stray (its
/// claim would find it absent, and a run of absent answers stops a reaper): inventory_add()
/// skips what was deleted after the listing began, unless it was uploaded again since.
#[test]
fn a_listing_does_not_bring_back_what_was_deleted_while_it_ran() {
    let (db, emu) = setup("inventory_while_deleting");
    let mut c = db.client();
    emu.upload("renders", "out/gone.png", b"gone");
    emu.age("renders", "", 8);
    let (ok, text) = inventory(&db, &emu, &[]);
    assert!(ok, "{text}");
    assert_eq!(
        c.query_one("SELECT orphan_cleanup.enqueue_strays()", &[])
            .unwrap()
            .get::<_, i64>(0),
        1
    );
    // A second listing begins and reads its page before the delete.
    let listing: i64 = c
        .query_one(
            "SELECT orphan_cleanup.inventory_begin('test-lister', 'renders')",
            &[],
        )
        .unwrap()
        .get(0);
    let page = ureq::post(&format!("{}/storage/v1/object/list/renders", emu.base))
        .set("Authorization", &format!("Bearer {}", emu.service_key))
        .send_json(serde_json::json!({"prefix": "out/", "limit": 100, "offset": 0}))
        .unwrap()
        .into_string()
        .unwrap();
    let mut page: serde_json::Value = serde_json::from_str(&page).unwrap();
    for o in page.as_array_mut().unwrap() {
        o["name"] = format!("out/{}", o["name"].as_str().unwrap()).into();
    }
    let out = run(&mut reaper(&db.name, &emu, &["drain"]));
    assert!(out.status.success(), "{}", output_text(&out));
    assert!(emu.objects().is_empty());
    let added: i32 = c
        .query_one(
            "SELECT orphan_cleanup.inventory_add($1, $2::text::jsonb)",
            &[&listing, &page.to_string()],
        )
        .unwrap()
        .get(0);
    assert_eq!(added, 0, "the page was read before the delete");
    c.query_one("SELECT orphan_cleanup.inventory_finish($1)", &[&listing])
        .unwrap();
    assert!(listed(&mut c).is_empty());
    assert!(preview(&mut c).is_empty());
}

/// Sequence 4, bad input. Where storage.objects is in the database, a listing is refused (it
/// would never be read) and `reaper inventory` says so and fails. Given to the SQL API: a folder,
/// an object without created_at or with a time that is no time, an unknown or finished listing,
/// and a bucket outside the allow-list, each refused with what to do, recording nothing.
#[test]
fn inventory_refuses_what_it_cannot_record_truthfully() {
    let db = TestDb::attached("inventory_refused");
    let emu = Emulator::start_keeping("inventory_refused");
    let mut pairs = SETTINGS.to_vec();
    pairs.push(("allowed_hosts", emu.host.as_str()));
    settings(&pairs);
    emu.create_bucket("renders");
    reaper_role();
    let (ok, text) = inventory(&db, &emu, &[]);
    assert!(!ok, "{text}");
    assert!(
        text.contains("storage.objects is in this database: reconciliation reads it, and needs no listing through the Storage API"),
        "{text}"
    );
    drop(emu);

    let (db, _emu) = setup("inventory_bad_input");
    let mut c = db.client();
    let refused = |c: &mut postgres::Client, sql: &str| -> String {
        db_error(&c.query(sql, &[]).unwrap_err())
    };
    assert!(refused(
        &mut c,
        "SELECT orphan_cleanup.inventory_begin('w', 'avatars')"
    )
    .contains("bucket 'avatars' is not in orphan_cleanup.allowed_buckets (renders)"));
    let listing: i64 = c
        .query_one("SELECT orphan_cleanup.inventory_begin('w', 'renders')", &[])
        .unwrap()
        .get(0);
    let id = "6f1c1d8e-0000-4000-8000-000000000001";
    for (objects, says) in [
        (
            r#"[{"name": "out", "id": null}]"#.to_string(),
            "not an object of bucket renders's listing",
        ),
        (
            format!(r#"[{{"name": "out/a.png", "id": "{id}"}}]"#),
            "it needs a full name, a uuid id and created_at",
        ),
        (
            format!(r#"[{{"name": "out/a.png", "id": "{id}", "created_at": "last week"}}]"#),
            "must give created_at and updated_at as timestamps",
        ),
        (
            r#"{"name": "out/a.png"}"#.to_string(),
            "must be a JSON array",
        ),
    ] {
        let msg = refused(
            &mut c,
            &format!(
                "SELECT orphan_cleanup.inventory_add({listing}, '{}')",
                objects.replace('\'', "''")
            ),
        );
        assert!(msg.contains(says), "{objects}: {msg}");
    }
    assert!(
        refused(&mut c, "SELECT orphan_cleanup.inventory_add(999999, '[]')")
            .contains("listing 999999 is unknown")
    );
    c.query_one("SELECT orphan_cleanup.inventory_finish($1)", &[&listing])
        .unwrap();
    assert!(refused(
        &mut c,
        &format!("SELECT orphan_cleanup.inventory_add({listing}, '[]')")
    )
    .contains(&format!("listing {listing} is finished")));
    assert!(listed(&mut c).is_empty());
}

/// Sequence 5 (the review of extra references): a listing records a page while a confirm() of
/// one of its objects is in flight. The record waits for the confirm, then skips the object: it
/// was deleted after the listing began.
#[test]
fn a_listing_waits_for_a_confirm_in_flight() {
    let (db, emu) = setup("inventory_confirm_in_flight");
    let mut c = db.client();
    emu.upload("renders", "out/g1.png", b"g1");
    emu.age("renders", "", 8);
    let (ok, text) = inventory(&db, &emu, &[]);
    assert!(ok, "{text}");
    assert_eq!(
        c.query_one("SELECT orphan_cleanup.enqueue_strays()", &[])
            .unwrap()
            .get::<_, i64>(0),
        1
    );
    let claimed = claim(&mut c, "w1", 10);
    assert_eq!(claimed.len(), 1);
    let page: String = c
        .query_one(
            "SELECT jsonb_agg(jsonb_build_object('name', name, 'id', id, 'created_at', created_at,
                                                 'updated_at', updated_at, 'metadata', metadata))::text
             FROM orphan_cleanup.object_inventory",
            &[],
        )
        .unwrap()
        .get(0);
    let listing: i64 = c
        .query_one(
            "SELECT orphan_cleanup.inventory_begin('test-lister', 'renders')",
            &[],
        )
        .unwrap()
        .get(0);
    let mut reaper_session = db.client();
    let mut tx = reaper_session.transaction().unwrap();
    tx.query(
        "SELECT * FROM orphan_cleanup.confirm('w1', $1, $2, 'deleted')",
        &[&claimed.lease, &claimed.ids],
    )
    .unwrap();
    let (adder, pid) = session_in_thread(&db.name, move |s| -> i32 {
        s.query_one(
            "SELECT orphan_cleanup.inventory_add($1, $2::text::jsonb)",
            &[&listing, &page],
        )
        .unwrap()
        .get(0)
    });
    wait_until_blocked(&mut c, pid);
    tx.commit().unwrap();
    assert_eq!(adder.join().unwrap(), 0, "deleted while the listing ran");
    c.query_one("SELECT orphan_cleanup.inventory_finish($1)", &[&listing])
        .unwrap();
    assert!(listed(&mut c).is_empty());
}
