//! Extra references (issue 15): columns of other tables that name objects (thumbnails, copies),
//! configured with `add_reference()`. An object one of them names is never a stray, by the same
//! protocol as the jobs table: claims re-check them in their own snapshot, a write in flight
//! holds the object, and a write naming an object already handed out is refused.

// Sequences, each a test:
//   1. objects named by a varchar column (a full URL) and by a JSON path (a bare bucket/key) are
//      not strays; another JSON path is not a reference; removing a reference makes its objects
//      strays               -> an_object_an_extra_reference_names_is_never_a_stray
//   2. a reference written after the stray was queued: committed before the claim, and in
//      flight during one     -> a_reference_written_before_the_claim_keeps_the_file
//   3. a reference written after the claim handed the object out, at READ COMMITTED and in a
//      REPEATABLE READ snapshot older than the claim
//                            -> a_reference_to_a_handed_out_object_is_refused
//   4. a reference not in force (its guard trigger disabled, its index dropped): nothing is
//      queued or handed out, and health() says why
//                            -> strays_wait_while_a_reference_is_not_in_force
//   5. bad input to add_reference(): no index (the error gives the statement), a wrong column
//      type, a missing table or column, a stored value that cannot be read, a whole JSON
//      document, something other than a string at the path
//                            -> add_reference_refuses_what_it_cannot_enforce
// From the review of extra references (a reviewer helper, read-only; each failed before):
//   6. a partitioned reference table: rows written through a partition fire the clone of the
//      root's trigger        -> a_partitioned_reference_table_is_guarded
//   7. a transaction that disables the guard, writes, and enables it again before committing;
//      a committed DISABLE while reapers hold claims; a trigger given a WHEN clause
//                            -> a_reference_guard_turned_off_is_noticed
//   8. a job orphan whose file a reference names
//                            -> a_job_orphans_file_a_reference_names_is_kept
//   9. add_reference() while reapers hold claims
//                            -> add_reference_waits_for_no_claims
// From the end-of-issue review:
//  12. a job orphan whose file a reference names when the cycle looks: not queued (it was queued
//      and retired at its claim on every full sweep), protected and audited once per sweep;
//      queued once the reference lets go of it
//                            -> a_cycle_does_not_queue_a_job_orphan_a_reference_names
// From the fifth review of partitions (a reviewer helper, reading only; each failed before):
//  13. a table attached as a partition of a reference table, holding a row that names a
//      handed-out object      -> a_partition_naming_a_handed_out_object_is_refused
//  14. the same, not committed yet while a claim of the object it names runs; and where no DDL
//      watch runs, the partition is looked at by the next cycle, and nothing is handed out until
//      then                   -> a_reference_partition_is_looked_at_before_claims_go_on

use std::collections::BTreeSet;

use e2e::storage::*;
use e2e::*;

const SETTINGS: &[(&str, &str)] = &[
    ("allowed_buckets", "renders"),
    ("allowed_prefixes", "out/"),
    ("reclaim_strays", "on"),
];

/// A database with a leak (`keys` uploaded eight days ago, named by no job), and two tables of
/// the app that keep object names: thumbnails.url (varchar, full URLs) and galleries.data (jsonb,
/// `{"images": {"large": ..., "small": ...}}`), each with the index a reference needs.
fn leak(name: &str, keys: &[&str]) -> (TestDb, Emulator) {
    let db = TestDb::attached(name);
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
        "UPDATE storage.objects SET created_at = created_at - interval '8 days', updated_at = updated_at - interval '8 days';
         CREATE TABLE public.thumbnails (id serial PRIMARY KEY, url varchar(1000));
         CREATE TABLE public.galleries (id serial PRIMARY KEY, data jsonb);
         GRANT ALL ON public.thumbnails, public.galleries, public.thumbnails_id_seq, public.galleries_id_seq TO PUBLIC;
         CREATE INDEX thumbnails_url_keys ON public.thumbnails USING gin (orphan_cleanup.object_keys(url::text)) WITH (fastupdate = off);
         CREATE INDEX galleries_large_keys ON public.galleries USING gin (orphan_cleanup.object_keys(data #>> '{images,large}')) WITH (fastupdate = off);",
    )
    .unwrap();
    (db, emu)
}

fn add_references(c: &mut postgres::Client) {
    c.batch_execute(
        "SELECT orphan_cleanup.add_reference('public.thumbnails', 'url');
         SELECT orphan_cleanup.add_reference('public.galleries', 'data', 'images.large');",
    )
    .unwrap();
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

fn enqueue_strays(c: &mut postgres::Client) -> i64 {
    c.query_one("SELECT orphan_cleanup.enqueue_strays()", &[])
        .unwrap()
        .get(0)
}

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

/// Sequence 1.
#[test]
fn an_object_an_extra_reference_names_is_never_a_stray() {
    let keys = [
        "out/thumb.png",
        "out/large.png",
        "out/small.png",
        "out/plain.png",
    ];
    let (db, emu) = leak("references_never_strays", &keys);
    let mut c = db.client();
    reaper_role();
    c.execute(
        "INSERT INTO public.thumbnails (url) VALUES ($1)",
        &[&emu.public_url("renders", "out/thumb.png")],
    )
    .unwrap();
    c.batch_execute(
        r#"INSERT INTO public.galleries (data) VALUES ('{"images": {"large": "renders/out/large.png", "small": "renders/out/small.png"}}')"#,
    )
    .unwrap();
    assert_eq!(preview(&mut c), set(&keys), "no references yet");
    add_references(&mut c);
    let listed: Vec<(String, String)> = c
        .query(
            "SELECT reference, status FROM orphan_cleanup.list_references() ORDER BY 1",
            &[],
        )
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    assert_eq!(
        listed,
        vec![
            (
                "public.galleries.data #>> '{images,large}'".to_string(),
                "ok".to_string()
            ),
            ("public.thumbnails.url".to_string(), "ok".to_string()),
        ]
    );
    assert_eq!(preview(&mut c), set(&["out/small.png", "out/plain.png"]));
    assert_eq!(enqueue_strays(&mut c), 2);
    let out = run(&mut reaper(&db.name, &emu, &["drain"]));
    assert!(out.status.success(), "{}", output_text(&out));
    assert_eq!(
        emu.objects(),
        set(&["renders/out/thumb.png", "renders/out/large.png"])
    );

    // Removed, the reference protects nothing: its object is a stray again.
    c.batch_execute("SELECT orphan_cleanup.remove_reference('public.thumbnails', 'url')")
        .unwrap();
    assert_eq!(preview(&mut c), set(&["out/thumb.png"]));
    let triggers: i64 = c
        .query_one(
            "SELECT count(*) FROM pg_trigger WHERE tgrelid = 'public.thumbnails'::regclass AND tgname = 'orphan_cleanup_reference_guard'",
            &[],
        )
        .unwrap()
        .get(0);
    assert_eq!(
        triggers, 0,
        "the guard goes with the table's last reference"
    );
}

/// Sequence 2: the app writes the thumbnail row after the stray was queued. Committed before
/// the claim, the row retires the stray, naming the reference; in flight during a claim, it
/// holds the object, so the claim passes over it, and the next claim retires it. Both files stay.
#[test]
fn a_reference_written_before_the_claim_keeps_the_file() {
    let (db, emu) = leak(
        "references_before_claim",
        &["out/late.png", "out/inflight.png"],
    );
    let mut c = db.client();
    add_references(&mut c);
    assert_eq!(enqueue_strays(&mut c), 2);
    c.execute(
        "INSERT INTO public.thumbnails (url) VALUES ($1)",
        &[&format!(
            r#"{{"url": "{}"}}"#,
            emu.public_url("renders", "out/late.png")
        )],
    )
    .unwrap();
    let mut app = db.client();
    let mut tx = app.transaction().unwrap();
    tx.batch_execute(
        r#"INSERT INTO public.galleries (data) VALUES ('{"images": {"large": "renders/out/inflight.png"}}')"#,
    )
    .unwrap();
    assert!(claim(&mut c, "w1", 10).is_empty(), "nothing handed out");
    assert_eq!(
        stray_row(&mut c, "out/late.png"),
        (
            "stale".to_string(),
            Some(
                "public.thumbnails.url names its object now (an extra reference): no longer a stray"
                    .to_string()
            )
        )
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
    assert!(reason
        .unwrap()
        .starts_with("public.galleries.data #>> '{images,large}' names its object now"),);
    assert_eq!(emu.objects().len(), 2, "both files stay");
    assert_eq!(enqueue_strays(&mut c), 0);
}

/// Sequence 3: after the claim the file may be gone: a row naming it is refused (OC002), at
/// READ COMMITTED, and in a REPEATABLE READ transaction whose snapshot predates the claim (it
/// cannot see the hand-out, but its lock on the object's row meets the claim's update).
#[test]
fn a_reference_to_a_handed_out_object_is_refused() {
    let (db, emu) = leak("references_after_claim", &["out/rc.png", "out/rr.png"]);
    let mut c = db.client();
    add_references(&mut c);
    let mut app = db.client();
    let mut rr = app
        .build_transaction()
        .isolation_level(postgres::IsolationLevel::RepeatableRead)
        .start()
        .unwrap();
    rr.query_one("SELECT count(*) FROM public.thumbnails", &[])
        .unwrap();
    assert_eq!(enqueue_strays(&mut c), 2);
    assert_eq!(claim(&mut c, "w1", 10).len(), 2);
    let e = c
        .execute(
            "INSERT INTO public.thumbnails (url) VALUES ($1)",
            &[&emu.public_url("renders", "out/rc.png")],
        )
        .unwrap_err();
    assert_eq!(code(&e), "OC002", "{}", db_error(&e));
    assert!(
        db_error(&e).contains("cannot name renders/out/rc.png in public.thumbnails.url"),
        "{}",
        db_error(&e)
    );
    let e = rr
        .execute(
            "INSERT INTO public.thumbnails (url) VALUES ($1)",
            &[&emu.public_url("renders", "out/rr.png")],
        )
        .expect_err("a snapshot older than the claim must not add the reference");
    assert!(
        ["OC002", "40001"].contains(&code(&e).as_str()),
        "{}",
        db_error(&e)
    );
    let rows: i64 = c
        .query_one("SELECT count(*) FROM public.thumbnails", &[])
        .unwrap()
        .get(0);
    assert_eq!(rows, 0);
}

/// Sequence 4: a reference whose guard trigger is disabled, or whose index is gone, cannot be
/// relied on: preview_strays() and enqueue_strays() refuse, naming it and the fix; a queued stray
/// is not handed out (it waits); a cycle queues none; health() warns.
#[test]
fn strays_wait_while_a_reference_is_not_in_force() {
    let (db, _emu) = leak("references_not_in_force", &["out/a.png", "out/b.png"]);
    let mut c = db.client();
    add_references(&mut c);
    assert_eq!(enqueue_strays(&mut c), 2);
    c.batch_execute("ALTER TABLE public.thumbnails DISABLE TRIGGER orphan_cleanup_reference_guard")
        .unwrap();
    let e = c
        .query("SELECT * FROM orphan_cleanup.preview_strays()", &[])
        .unwrap_err();
    assert!(
        db_error(&e).contains("an extra reference is not in force: public.thumbnails.url: the guard trigger orphan_cleanup_reference_guard on public.thumbnails is not enabled ALWAYS (ALTER TABLE public.thumbnails ENABLE ALWAYS TRIGGER orphan_cleanup_reference_guard)"),
        "{}",
        db_error(&e)
    );
    assert!(claim(&mut c, "w1", 10).is_empty(), "the stray waits");
    assert_eq!(stray_row(&mut c, "out/a.png").0, "pending");
    let detail: String = c
        .query_one(
            "SELECT detail FROM orphan_cleanup.health() WHERE check_name = 'strays'",
            &[],
        )
        .unwrap()
        .get(0);
    assert!(
        detail.contains("while an extra reference is not in force"),
        "{detail}"
    );
    cycle(&mut c);
    let pass: String = c
        .query_one(
            "SELECT stray_pass FROM orphan_cleanup.cycle_log ORDER BY id DESC LIMIT 1",
            &[],
        )
        .unwrap()
        .get(0);
    assert!(
        pass.starts_with("not run: an extra reference is not in force"),
        "{pass}"
    );

    c.batch_execute(
        "ALTER TABLE public.thumbnails ENABLE ALWAYS TRIGGER orphan_cleanup_reference_guard;
         DROP INDEX public.galleries_large_keys;",
    )
    .unwrap();
    let e = c
        .query("SELECT * FROM orphan_cleanup.enqueue_strays()", &[])
        .unwrap_err();
    assert!(
        db_error(&e).contains("public.galleries.data #>> '{images,large}': its index on orphan_cleanup.object_keys() is gone or not valid (fix: CREATE INDEX CONCURRENTLY"),
        "{}",
        db_error(&e)
    );
    c.batch_execute("UPDATE orphan_cleanup.deletion_queue SET available_at = now()")
        .unwrap();
    assert!(claim(&mut c, "w1", 10).is_empty(), "the strays still wait");
    c.batch_execute(
        "CREATE INDEX galleries_large_keys ON public.galleries USING gin (orphan_cleanup.object_keys(data #>> '{images,large}')) WITH (fastupdate = off);
         SELECT orphan_cleanup.add_reference('public.galleries', 'data', 'images.large');
         UPDATE orphan_cleanup.deletion_queue SET available_at = now();",
    )
    .unwrap();
    assert_eq!(claim(&mut c, "w1", 10).len(), 2, "in force again");
}

/// Sequence 5, bad input: each refusal names the problem and the fix, and adds nothing.
#[test]
fn add_reference_refuses_what_it_cannot_enforce() {
    let db = TestDb::attached("references_bad_input");
    let mut c = db.client();
    c.batch_execute(
        "CREATE TABLE public.copies (id serial PRIMARY KEY, path text, n integer, doc jsonb);
         INSERT INTO public.copies (path) VALUES (repeat('https://a.supabase.co/storage/v1/object/public/renders/out/x.png ', 40));",
    )
    .unwrap();
    let refused = |c: &mut postgres::Client, sql: &str| -> (String, String) {
        let e = c.batch_execute(sql).unwrap_err();
        let hint = e
            .as_db_error()
            .and_then(|d| d.hint())
            .unwrap_or("")
            .to_string();
        (db_error(&e), hint)
    };
    let (msg, hint) = refused(
        &mut c,
        "SELECT orphan_cleanup.add_reference('public.copies', 'path')",
    );
    assert!(
        msg.contains("public.copies has no index to look objects up by"),
        "{msg}"
    );
    assert!(
        hint.contains("CREATE INDEX CONCURRENTLY copies_path_object_keys_idx ON public.copies USING gin (orphan_cleanup.object_keys(path)) WITH (fastupdate = off);"),
        "{hint}"
    );
    c.batch_execute("CREATE INDEX ON public.copies USING gin (orphan_cleanup.object_keys(path)) WITH (fastupdate = off)")
        .unwrap();
    let (msg, _) = refused(
        &mut c,
        "SELECT orphan_cleanup.add_reference('public.copies', 'path')",
    );
    assert!(
        msg.contains("a value of public.copies.path cannot be read as naming storage objects"),
        "{msg}"
    );
    let (msg, _) = refused(
        &mut c,
        "SELECT orphan_cleanup.add_reference('public.copies', 'n')",
    );
    assert!(
        msg.contains("column n of public.copies is integer"),
        "{msg}"
    );
    let (msg, _) = refused(
        &mut c,
        "SELECT orphan_cleanup.add_reference('public.copies', 'path', 'a.b')",
    );
    assert!(msg.contains("column path of public.copies is text: a reference reads a text or varchar column, or a string at a JSON path"), "{msg}");
    let (msg, _) = refused(
        &mut c,
        "SELECT orphan_cleanup.add_reference('public.nope', 'path')",
    );
    assert!(msg.contains("table 'public.nope' does not exist"), "{msg}");
    let (msg, _) = refused(
        &mut c,
        "SELECT orphan_cleanup.add_reference('public.copies', 'nope')",
    );
    assert!(
        msg.contains("column nope is missing from public.copies"),
        "{msg}"
    );
    // A whole JSON document: bare keys inside it are not read, so it would protect nothing.
    let (msg, hint) = refused(
        &mut c,
        "SELECT orphan_cleanup.add_reference('public.copies', 'doc')",
    );
    assert!(
        msg.contains("a string at a JSON path inside a json or jsonb column"),
        "{msg}"
    );
    assert!(hint.contains("Name the path of the string"), "{hint}");
    // Something other than a string at the path.
    c.batch_execute(
        r#"CREATE INDEX ON public.copies USING gin (orphan_cleanup.object_keys(doc #>> '{images}')) WITH (fastupdate = off);
           INSERT INTO public.copies (doc) VALUES ('{"images": ["renders/out/a.png", "renders/out/b.png"]}');"#,
    )
    .unwrap();
    let (msg, _) = refused(
        &mut c,
        "SELECT orphan_cleanup.add_reference('public.copies', 'doc', 'images')",
    );
    assert!(
        msg.contains(
            "at images inside public.copies.doc a row holds something other than a string"
        ),
        "{msg}"
    );
    let n: i64 = c
        .query_one("SELECT count(*) FROM orphan_cleanup.extra_references", &[])
        .unwrap()
        .get(0);
    assert_eq!(n, 0);
}

/// Sequence 6: `public.pthumbs` is partitioned; its rows live in a partition, whose trigger is
/// the clone of the root's. A row naming an object already handed out is refused there too, and
/// a row being written there makes a claim pass over the object.
#[test]
fn a_partitioned_reference_table_is_guarded() {
    let (db, emu) = leak("references_partitioned", &["out/p1.png", "out/p2.png"]);
    let mut c = db.client();
    c.batch_execute(
        "CREATE TABLE public.pthumbs (id int, url text) PARTITION BY RANGE (id);
         CREATE TABLE public.pthumbs_1 PARTITION OF public.pthumbs FOR VALUES FROM (0) TO (1000);
         GRANT ALL ON public.pthumbs, public.pthumbs_1 TO PUBLIC;
         CREATE INDEX pthumbs_keys ON public.pthumbs USING gin (orphan_cleanup.object_keys(url)) WITH (fastupdate = off);
         SELECT orphan_cleanup.add_reference('public.pthumbs', 'url');",
    )
    .unwrap();
    assert_eq!(enqueue_strays(&mut c), 2);
    let mut app = db.client();
    let mut tx = app.transaction().unwrap();
    tx.execute(
        "INSERT INTO public.pthumbs VALUES (1, $1)",
        &[&emu.public_url("renders", "out/p2.png")],
    )
    .unwrap();
    let claimed = claim(&mut c, "w1", 10);
    assert_eq!(claimed.len(), 1, "p1 handed out, p2 passed over");
    assert_eq!(stray_row(&mut c, "out/p2.png").0, "pending");
    tx.commit().unwrap();
    let e = c
        .execute(
            "INSERT INTO public.pthumbs VALUES (2, 'renders/out/p1.png')",
            &[],
        )
        .unwrap_err();
    assert_eq!(code(&e), "OC002", "{}", db_error(&e));
    c.batch_execute("DELETE FROM orphan_cleanup.busy").unwrap();
    assert!(claim(&mut c, "w1", 10).is_empty());
    assert_eq!(stray_row(&mut c, "out/p2.png").0, "stale");
}

/// Sequence 7. A transaction that turns the guard off, writes a row naming a queued stray and
/// turns it on again holds a lock on the table until it commits: claims meanwhile hand out
/// nothing, and the claim after it sees the row. A DISABLE committed while reapers hold claims is
/// refused. A guard given a WHEN clause is not in force (strays wait) until add_reference()
/// makes it again.
#[test]
fn a_reference_guard_turned_off_is_noticed() {
    let (db, emu) = leak("references_turned_off", &["out/t1.png", "out/t2.png"]);
    let mut c = db.client();
    add_references(&mut c);
    assert_eq!(enqueue_strays(&mut c), 2);
    let mut app = db.client();
    let mut tx = app.transaction().unwrap();
    tx.batch_execute(
        "ALTER TABLE public.thumbnails DISABLE TRIGGER orphan_cleanup_reference_guard",
    )
    .unwrap();
    tx.execute(
        "INSERT INTO public.thumbnails (url) VALUES ($1)",
        &[&emu.public_url("renders", "out/t1.png")],
    )
    .unwrap();
    tx.batch_execute(
        "ALTER TABLE public.thumbnails ENABLE ALWAYS TRIGGER orphan_cleanup_reference_guard",
    )
    .unwrap();
    assert!(
        claim(&mut c, "w1", 10).is_empty(),
        "nothing while the guard is being changed"
    );
    tx.commit().unwrap();
    let claimed = claim(&mut c, "w1", 10);
    assert_eq!(claimed.len(), 1, "t2 only");
    assert_eq!(stray_row(&mut c, "out/t1.png").0, "stale");

    let e = c
        .batch_execute(
            "ALTER TABLE public.thumbnails DISABLE TRIGGER orphan_cleanup_reference_guard",
        )
        .unwrap_err();
    assert!(
        db_error(&e).contains("it would leave an extra reference not in force"),
        "{}",
        db_error(&e)
    );
    c.batch_execute(
        "UPDATE orphan_cleanup.deletion_queue SET state = 'deleted', finished_at = now() WHERE state = 'claimed'",
    )
    .unwrap();

    c.batch_execute(
        "DROP TRIGGER orphan_cleanup_reference_guard ON public.thumbnails;
         CREATE TRIGGER orphan_cleanup_reference_guard AFTER INSERT OR UPDATE ON public.thumbnails
             FOR EACH ROW WHEN (NEW.id < 0) EXECUTE FUNCTION orphan_cleanup.reference_guard();
         ALTER TABLE public.thumbnails ENABLE ALWAYS TRIGGER orphan_cleanup_reference_guard;",
    )
    .unwrap();
    let detail: String = c
        .query_one(
            "SELECT detail FROM orphan_cleanup.list_references() WHERE reference = 'public.thumbnails.url'",
            &[],
        )
        .unwrap()
        .get(0);
    assert!(detail.contains("is missing or changed"), "{detail}");
    c.batch_execute("SELECT orphan_cleanup.add_reference('public.thumbnails', 'url')")
        .unwrap();
    let status: String = c
        .query_one(
            "SELECT status FROM orphan_cleanup.list_references() WHERE reference = 'public.thumbnails.url'",
            &[],
        )
        .unwrap()
        .get(0);
    assert_eq!(status, "ok");
    let e = c
        .execute(
            "INSERT INTO public.thumbnails (url) VALUES ('renders/out/t2.png')",
            &[],
        )
        .unwrap_err();
    assert_eq!(code(&e), "OC002", "{}", db_error(&e));
}

/// Sequence 8: a completed job nobody saved is an orphan, but a thumbnail row written after the
/// cycle queued it points at its file: the claim keeps the file.
#[test]
fn a_job_orphans_file_a_reference_names_is_kept() {
    let (db, emu) = leak("references_job_orphan", &["out/j1.png"]);
    let mut c = db.client();
    add_references(&mut c);
    let url = emu.public_url("renders", "out/j1.png");
    job(&mut c, "completed", Some(&url), "2 hours", "j");
    assert_eq!(cycle(&mut c).2, 1, "queued as an orphan");
    c.execute("INSERT INTO public.thumbnails (url) VALUES ($1)", &[&url])
        .unwrap();
    assert!(claim(&mut c, "w1", 10).is_empty());
    let r = c
        .query_one(
            "SELECT state, reason FROM orphan_cleanup.deletion_queue WHERE object_path = 'out/j1.png'",
            &[],
        )
        .unwrap();
    assert_eq!(
        (r.get::<_, String>(0), r.get::<_, String>(1)),
        (
            "stale".to_string(),
            "public.thumbnails.url names its object (an extra reference): kept".to_string()
        )
    );
    assert_eq!(emu.objects().len(), 1);
}

/// Sequence 9: while reapers hold claims, a new reference could name a file being deleted:
/// add_reference() refuses, saying how to stop the reapers first.
#[test]
fn add_reference_waits_for_no_claims() {
    let (db, _emu) = leak("references_while_claimed", &["out/c1.png"]);
    let mut c = db.client();
    c.batch_execute("INSERT INTO public.thumbnails (url) VALUES ('renders/out/c1.png')")
        .unwrap();
    assert_eq!(enqueue_strays(&mut c), 1);
    assert_eq!(claim(&mut c, "w1", 10).len(), 1);
    let e = c
        .batch_execute("SELECT orphan_cleanup.add_reference('public.thumbnails', 'url')")
        .unwrap_err();
    assert!(
        db_error(&e).contains("add_reference() refused: 1 queue row(s) are claimed by reapers"),
        "{}",
        db_error(&e)
    );
    let n: i64 = c
        .query_one("SELECT count(*) FROM orphan_cleanup.extra_references", &[])
        .unwrap()
        .get(0);
    assert_eq!(n, 0);
}

/// From the second review: a reference may name a partition itself; rows written there are
/// guarded like rows of a plain table.
#[test]
fn a_reference_on_a_partition_is_guarded() {
    let (db, _emu) = leak("references_on_partition", &["out/q1.png"]);
    let mut c = db.client();
    c.batch_execute(
        "CREATE TABLE public.qthumbs (id int, url text) PARTITION BY RANGE (id);
         CREATE TABLE public.qthumbs_1 PARTITION OF public.qthumbs FOR VALUES FROM (0) TO (1000);
         CREATE INDEX qthumbs_1_keys ON public.qthumbs_1 USING gin (orphan_cleanup.object_keys(url)) WITH (fastupdate = off);
         SELECT orphan_cleanup.add_reference('public.qthumbs_1', 'url');",
    )
    .unwrap();
    assert_eq!(enqueue_strays(&mut c), 1);
    assert_eq!(claim(&mut c, "w1", 10).len(), 1);
    let e = c
        .execute(
            "INSERT INTO public.qthumbs_1 VALUES (1, 'renders/out/q1.png')",
            &[],
        )
        .unwrap_err();
    assert_eq!(code(&e), "OC002", "{}", db_error(&e));
}

/// From the fourth review: while a reaper holds claims, a table made to inherit from a reference
/// table (rows written there fire no guard) is refused, as other DDL leaving a reference not in
/// force is.
#[test]
fn a_child_of_a_reference_table_is_refused_while_claimed() {
    let (db, _emu) = leak("references_child_while_claimed", &["out/k1.png"]);
    let mut c = db.client();
    add_references(&mut c);
    assert_eq!(enqueue_strays(&mut c), 1);
    assert_eq!(claim(&mut c, "w1", 10).len(), 1);
    let e = c
        .batch_execute("CREATE TABLE public.thumbnails_child () INHERITS (public.thumbnails)")
        .unwrap_err();
    assert!(
        db_error(&e).contains("it would leave an extra reference not in force"),
        "{}",
        db_error(&e)
    );
    c.batch_execute("CREATE TABLE public.unrelated (id int)")
        .unwrap();
}

/// Sequence 12.
#[test]
fn a_cycle_does_not_queue_a_job_orphan_a_reference_names() {
    let (db, emu) = leak("references_cycle_keeps", &["out/j2.png"]);
    let mut pairs = SETTINGS.to_vec();
    pairs.push(("allowed_hosts", emu.host.as_str()));
    pairs.push(("full_sweep_interval", "0"));
    settings(&pairs);
    let mut c = db.client();
    add_references(&mut c);
    let url = emu.public_url("renders", "out/j2.png");
    let j = job(&mut c, "completed", Some(&url), "2 hours", "j");
    c.execute(
        "INSERT INTO public.galleries (data) VALUES (jsonb_build_object('images', jsonb_build_object('large', 'renders/out/j2.png')))",
        &[],
    )
    .unwrap();
    let verdict: String = c
        .query_one(
            "SELECT verdict FROM orphan_cleanup.preview() WHERE job_id = $1::text::uuid",
            &[&j.0],
        )
        .unwrap()
        .get(0);
    assert_eq!(
        verdict,
        "protected: public.galleries.data #>> '{images,large}' names its object (an extra reference)"
    );
    for _ in 0..2 {
        let (_, found, enqueued, protected, _) = cycle(&mut c);
        assert_eq!((found, enqueued, protected), (1, 0, 1), "a full sweep");
    }
    let queued: i64 = c
        .query_one("SELECT count(*) FROM orphan_cleanup.deletion_queue", &[])
        .unwrap()
        .get(0);
    assert_eq!(queued, 0);
    let audited: Vec<String> = c
        .query(
            "SELECT action || ': ' || detail FROM orphan_cleanup.audit_log WHERE job_id = $1::text::uuid ORDER BY id",
            &[&j.0],
        )
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(
        audited,
        vec!["protected: public.galleries.data #>> '{images,large}' names its object (an extra reference)"; 2]
    );
    // The gallery lets go of it: the next sweep queues it, and the claim hands it out.
    c.execute("DELETE FROM public.galleries", &[]).unwrap();
    assert_eq!(cycle(&mut c).2, 1);
    assert_eq!(claim(&mut c, "w1", 10).len(), 1);
}

/// A partitioned reference table, public.pthumbs (partition pthumbs_1 for ids below 1000),
/// referenced by its url; and public.pthumbs_2, a table not attached yet, holding a row that
/// names `key`.
fn pthumbs(c: &mut postgres::Client, key: &str) {
    c.batch_execute(
        "CREATE TABLE public.pthumbs (id int, url text) PARTITION BY RANGE (id);
         CREATE TABLE public.pthumbs_1 PARTITION OF public.pthumbs FOR VALUES FROM (0) TO (1000);
         CREATE INDEX pthumbs_keys ON public.pthumbs USING gin (orphan_cleanup.object_keys(url)) WITH (fastupdate = off);
         SELECT orphan_cleanup.add_reference('public.pthumbs', 'url');
         CREATE TABLE public.pthumbs_2 (id int, url text);",
    )
    .unwrap();
    c.execute(
        "INSERT INTO public.pthumbs_2 VALUES (1500, $1)",
        &[&format!("renders/{key}")],
    )
    .unwrap();
}

const ATTACH_PTHUMBS_2: &str =
    "ALTER TABLE public.pthumbs ATTACH PARTITION public.pthumbs_2 FOR VALUES FROM (1000) TO (2000)";

/// Sequence 13.
#[test]
fn a_partition_naming_a_handed_out_object_is_refused() {
    let (db, _emu) = leak("references_attach_handed_out", &["out/h.png"]);
    let mut c = db.client();
    pthumbs(&mut c, "out/h.png");
    assert_eq!(enqueue_strays(&mut c), 1);
    assert_eq!(claim(&mut c, "w1", 10).len(), 1);
    let e = c.batch_execute(ATTACH_PTHUMBS_2).unwrap_err();
    assert_eq!(code(&e), "OC002", "{}", db_error(&e));
    assert!(
        db_error(&e).contains("holds a row naming renders/out/h.png"),
        "{}",
        db_error(&e)
    );
}

/// Sequence 14.
#[test]
fn a_reference_partition_is_looked_at_before_claims_go_on() {
    let (db, _emu) = leak("references_attach_window", &["out/w.png"]);
    let mut c = db.client();
    pthumbs(&mut c, "out/w.png");
    assert_eq!(enqueue_strays(&mut c), 1);
    // Not committed yet: the claim sees no row naming the object, but the object is held.
    let mut s1 = db.client();
    let mut tx = s1.transaction().unwrap();
    tx.batch_execute(ATTACH_PTHUMBS_2).unwrap();
    assert!(claim(&mut c, "w1", 10).is_empty(), "passed over");
    tx.rollback().unwrap();
    // Where no DDL watch runs: claims wait until a cycle has looked at the partition.
    c.batch_execute("DELETE FROM orphan_cleanup.busy").unwrap();
    c.batch_execute("ALTER EVENT TRIGGER orphan_cleanup_guard_watch DISABLE")
        .unwrap();
    c.batch_execute(ATTACH_PTHUMBS_2).unwrap();
    c.batch_execute("ALTER EVENT TRIGGER orphan_cleanup_guard_watch ENABLE ALWAYS")
        .unwrap();
    let detail: String = c
        .query_one(
            "SELECT detail FROM orphan_cleanup.list_references() WHERE reference = 'public.pthumbs.url'",
            &[],
        )
        .unwrap()
        .get(0);
    assert_eq!(detail, "in force: objects it names are never strays");
    let health: String = c
        .query_one(
            "SELECT detail FROM orphan_cleanup.health() WHERE check_name = 'strays'",
            &[],
        )
        .unwrap()
        .get(0);
    assert!(health.contains("has not been looked at yet"), "{health}");
    cycle(&mut c);
    assert!(claim(&mut c, "w1", 10).is_empty());
    assert_eq!(
        stray_row(&mut c, "out/w.png"),
        (
            "stale".to_string(),
            Some(
                "public.pthumbs.url names its object now (an extra reference): no longer a stray"
                    .to_string()
            )
        )
    );
}

/// From the sixth review: a partition joining a reference table at REPEATABLE READ would be
/// read in a snapshot missing rows committed into it meanwhile: refused, naming the fix.
#[test]
fn a_reference_partition_joins_at_read_committed_only() {
    let (db, _emu) = leak("references_attach_rr", &["out/rr.png"]);
    let mut c = db.client();
    pthumbs(&mut c, "out/rr.png");
    let mut a = db.client();
    let mut rr = a
        .build_transaction()
        .isolation_level(postgres::IsolationLevel::RepeatableRead)
        .start()
        .unwrap();
    rr.query_one("SELECT 1", &[]).unwrap();
    let e = rr.batch_execute(ATTACH_PTHUMBS_2).unwrap_err();
    assert!(
        db_error(&e).contains(
            "its rows are checked in a READ COMMITTED transaction only, not repeatable read"
        ),
        "{}",
        db_error(&e)
    );
}
