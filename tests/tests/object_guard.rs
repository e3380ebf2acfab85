//! The save guarantee, per object. Each test is one of the sequences that broke the job- and
//! URL-centric guard of 0.1.0 (issue 11), driven step by step between connections. The rule they
//! all check: once an object (bucket and key, however a URL spells it) has been handed to a
//! reaper, no job naming that object can be saved, and no saved job can be pointed at it.

use e2e::*;

const REFUSED: &str = "OC001";
const REPOINT_REFUSED: &str = "OC002";
const SERIALIZATION_FAILURE: &str = "40001";

fn signed_url(bucket: &str, key: &str, token: &str) -> String {
    format!("https://{HOST}/storage/v1/object/sign/{bucket}/{key}?token={token}")
}

/// A database attached to the default tables, with the settings.
fn db(name: &str) -> TestDb {
    settings(BASE_SETTINGS);
    TestDb::attached(name)
}

fn db_with(name: &str, extra: &[(&str, &str)]) -> TestDb {
    let mut all: Vec<(&str, &str)> = BASE_SETTINGS.to_vec();
    all.extend_from_slice(extra);
    settings(&all);
    TestDb::attached(name)
}

fn orphan(c: &mut postgres::Client, url: &str) -> uuid_text::Uuid {
    job(c, "completed", Some(url), "2 days", "orphan")
}

fn confirm(c: &mut postgres::Client, worker: &str, claimed: &Claim) {
    let rows = c
        .query(
            "SELECT result FROM orphan_cleanup.confirm($1, $2, $3, 'deleted')",
            &[&worker, &claimed.lease, &claimed.ids],
        )
        .unwrap();
    for r in rows {
        assert_eq!(r.get::<_, String>(0), "confirmed");
    }
}

/// The SQLSTATE of a failed statement.
fn code(r: Result<u64, postgres::Error>) -> String {
    r.expect_err("the statement must fail")
        .code()
        .expect("a database error")
        .code()
        .to_string()
}

fn assert_refused(c: &mut postgres::Client, j: &uuid_text::Uuid) {
    assert_eq!(code(save(c, "generated_saved", &j.0)), REFUSED);
}

fn queue_row(c: &mut postgres::Client, j: &uuid_text::Uuid) -> (i64, String) {
    let r = c
        .query_one(
            "SELECT id, state FROM orphan_cleanup.deletion_queue WHERE job_id = $1::text::uuid ORDER BY id DESC LIMIT 1",
            &[&j.0],
        )
        .unwrap();
    (r.get(0), r.get(1))
}

fn exec(c: &mut postgres::Client, sql: &str) {
    c.batch_execute(sql).unwrap();
}

// 1.
#[test]
fn seq01_a_shared_object_handed_out_through_one_job_cannot_be_saved_through_the_other() {
    let db = db("obj_shared");
    let mut c = db.client();
    let a = orphan(&mut c, "renders/x.png");
    let b = orphan(&mut c, &public_url("renders", "x.png"));
    assert_eq!(
        cycle(&mut c).2,
        2,
        "both jobs are orphans naming one object"
    );
    let ids = claim(&mut c, "r1", 1);
    assert_eq!(ids.len(), 1);
    confirm(&mut c, "r1", &ids);
    let other = if queue_row(&mut c, &a).0 == ids[0] {
        &b
    } else {
        &a
    };
    assert_refused(&mut c, other);
}

// 2.
#[test]
fn seq02_a_refreshed_signed_url_token_names_the_same_object() {
    let db = db("obj_token");
    let mut c = db.client();
    let a = orphan(&mut c, &signed_url("renders", "s.png", "T1"));
    cycle(&mut c);
    let ids = claim(&mut c, "r1", 10);
    assert_eq!(ids.len(), 1);
    c.execute(
        "UPDATE render_jobs SET output_url = $1 WHERE id = $2::text::uuid",
        &[&signed_url("renders", "s.png", "T2"), &a.0],
    )
    .unwrap();
    confirm(&mut c, "r1", &ids);
    assert_refused(&mut c, &a);
}

#[test]
fn seq02_a_token_refreshed_before_the_claim_does_not_make_the_row_stale() {
    let db = db("obj_token_early");
    let mut c = db.client();
    let a = orphan(&mut c, &signed_url("renders", "t.png", "T1"));
    cycle(&mut c);
    c.execute(
        "UPDATE render_jobs SET output_url = $1 WHERE id = $2::text::uuid",
        &[&signed_url("renders", "t.png", "T2"), &a.0],
    )
    .unwrap();
    assert_eq!(
        claim(&mut c, "r1", 10).len(),
        1,
        "a new token is not a new object: the orphan is still deleted"
    );
    assert_eq!(queue_row(&mut c, &a).1, "claimed");
}

// 3. Retired rows do not forget the hand-out.
fn claimed_then_released(name: &str, extra: &[(&str, &str)]) -> (TestDb, uuid_text::Uuid, i64) {
    let db = db_with(name, extra);
    let mut c = db.client();
    let a = orphan(&mut c, &public_url("renders", &format!("{name}.png")));
    cycle(&mut c);
    let ids = claim(&mut c, "r1", 10);
    assert_eq!(ids.len(), 1);
    c.query_one(
        "SELECT orphan_cleanup.release('r1', $1, NULL, NULL)",
        &[&ids.lease],
    )
    .unwrap();
    (db, a, ids[0])
}

#[test]
fn seq03_a_row_retired_stale_after_a_status_flip_still_refuses_the_save() {
    let (db, a, id) = claimed_then_released("obj_stale", &[]);
    let mut c = db.client();
    c.execute(
        "UPDATE render_jobs SET status = 'running' WHERE id = $1::text::uuid",
        &[&a.0],
    )
    .unwrap();
    assert!(claim(&mut c, "r1", 10).is_empty());
    assert_eq!(queue_row(&mut c, &a).1, "stale");
    c.execute(
        "UPDATE render_jobs SET status = 'completed' WHERE id = $1::text::uuid",
        &[&a.0],
    )
    .unwrap();
    assert_refused(&mut c, &a);
    // The audit trail says the row left without a deletion after a hand-out (15, last item).
    let detail: String = c
        .query_one(
            "SELECT detail FROM orphan_cleanup.audit_log WHERE queue_id = $1 AND action = 'cancelled'",
            &[&id],
        )
        .unwrap()
        .get(0);
    assert!(
        detail.contains("without a confirmed deletion, after it had been handed out"),
        "{detail}"
    );
}

#[test]
fn seq03_a_row_rejected_while_the_bucket_was_not_allowed_still_refuses_the_save() {
    let (db, a, _) = claimed_then_released("obj_rejected", &[]);
    let mut c = db.client();
    settings(&[("allowed_buckets", "other"), ("allowed_hosts", HOST)]);
    assert!(claim(&mut c, "r1", 10).is_empty());
    assert_eq!(queue_row(&mut c, &a).1, "rejected");
    settings(BASE_SETTINGS);
    assert_refused(&mut c, &a);
}

#[test]
fn seq03_a_dead_row_cancelled_by_a_dba_still_refuses_the_save() {
    let db = db("obj_dead_cancel");
    let mut c = db.client();
    let a = orphan(&mut c, &public_url("renders", "dead.png"));
    cycle(&mut c);
    let ids = claim(&mut c, "r1", 10);
    c.query(
        "SELECT * FROM orphan_cleanup.fail('r1', $1, $2, 'storage said 500', false)",
        &[&ids.lease, &ids.ids],
    )
    .unwrap();
    assert_eq!(queue_row(&mut c, &a).1, "dead");
    let result: String = c
        .query_one("SELECT result FROM orphan_cleanup.cancel($1)", &[&ids.ids])
        .unwrap()
        .get(0);
    assert!(result.starts_with("cancelled"), "{result}");
    assert!(result.contains("may be deleted"), "{result}");
    assert_eq!(queue_row(&mut c, &a).1, "cancelled");
    assert_refused(&mut c, &a);
}

/// Inserts job `j` again, completed two days ago, naming `url`.
fn insert_again(c: &mut postgres::Client, j: &uuid_text::Uuid, url: &str) {
    c.execute(
        "INSERT INTO render_jobs (id, status, output_url, created_at) VALUES ($1::text::uuid, 'completed', $2, now() - interval '2 days')",
        &[&j.0, &url],
    )
    .unwrap();
}

#[test]
fn seq03_a_job_deleted_and_inserted_again_cannot_be_saved() {
    let (db, a, _) = claimed_then_released("obj_reinsert", &[]);
    let mut c = db.client();
    let url: String = c
        .query_one(
            "DELETE FROM render_jobs WHERE id = $1::text::uuid RETURNING output_url",
            &[&a.0],
        )
        .unwrap()
        .get(0);
    // The next claim finds the job gone and retires the row.
    assert!(claim(&mut c, "r1", 10).is_empty());
    assert_eq!(queue_row(&mut c, &a).1, "stale");
    insert_again(&mut c, &a, &url);
    assert_refused(&mut c, &a);
}

#[test]
fn seq03_a_job_whose_row_confirm_deleted_cannot_be_saved_when_inserted_again() {
    let db = db("obj_reinsert_confirmed");
    let mut c = db.client();
    let url = public_url("renders", "reinsert.png");
    let a = orphan(&mut c, &url);
    cycle(&mut c);
    let ids = claim(&mut c, "r1", 10);
    confirm(&mut c, "r1", &ids);
    let gone: i64 = c
        .query_one(
            "SELECT count(*) FROM render_jobs WHERE id = $1::text::uuid",
            &[&a.0],
        )
        .unwrap()
        .get(0);
    assert_eq!(gone, 0, "on_confirm = delete removed the job row");
    assert_refused(&mut c, &a);
    insert_again(&mut c, &a, &url);
    assert_refused(&mut c, &a);
}

#[test]
fn seq03_history_pruned_after_retention_still_refuses_a_save() {
    let db = db_with("obj_pruned", &[("history_retention", "1h")]);
    let mut c = db.client();
    let url = public_url("renders", "pruned.png");
    orphan(&mut c, &url);
    cycle(&mut c);
    let ids = claim(&mut c, "r1", 10);
    confirm(&mut c, "r1", &ids);
    exec(
        &mut c,
        "UPDATE orphan_cleanup.deletion_queue SET finished_at = now() - interval '2 hours';
         UPDATE orphan_cleanup.audit_log SET at = now() - interval '2 hours';",
    );
    cycle(&mut c);
    let left: i64 = c
        .query_one("SELECT count(*) FROM orphan_cleanup.deletion_queue", &[])
        .unwrap()
        .get(0);
    assert_eq!(left, 0, "the queue's history was pruned");
    // A render cache hit hands out the same URL again; that job cannot be saved.
    let b = job(&mut c, "completed", Some(&url), "1 minute", "cache hit");
    assert_refused(&mut c, &b);
}

// 4.
/// The app's transaction at `level` (REPEATABLE READ or SERIALIZABLE), not yet holding a
/// snapshot.
fn snapshot_transaction<'a>(
    app: &'a mut postgres::Client,
    level: &str,
) -> postgres::Transaction<'a> {
    app.build_transaction()
        .isolation_level(match level {
            "REPEATABLE READ" => postgres::IsolationLevel::RepeatableRead,
            _ => postgres::IsolationLevel::Serializable,
        })
        .start()
        .unwrap()
}

/// Saves job `j` in `tx` and commits: the save or the commit must fail, refused or with a
/// serialization failure.
fn assert_save_does_not_commit(
    mut tx: postgres::Transaction<'_>,
    j: &uuid_text::Uuid,
    level: &str,
) {
    let saved = tx.execute(
        "INSERT INTO user_assets (asset_type, metadata) VALUES ('generated_saved', jsonb_build_object('render_job_id', $1::text))",
        &[&j.0],
    );
    let err = match saved {
        Err(e) => {
            drop(tx);
            e
        }
        Ok(_) => tx.commit().expect_err("the save must not commit"),
    };
    let got = err.code().unwrap().code().to_string();
    assert!(
        got == REFUSED || got == SERIALIZATION_FAILURE,
        "{level}: {got}: {err}"
    );
}

fn save_at_isolation_after_a_claim(level: &str) {
    let db = db(&format!("obj_{}", level.replace(' ', "_").to_lowercase()));
    let mut c = db.client();
    let a = orphan(&mut c, &public_url("renders", "rr.png"));
    let mut app = db.client();
    let mut tx = snapshot_transaction(&mut app, level);
    // The app's snapshot is taken now, before the cycle and the claim.
    tx.query_one("SELECT count(*) FROM user_assets", &[])
        .unwrap();
    assert_eq!(cycle(&mut c).2, 1);
    assert_eq!(claim(&mut c, "r1", 10).len(), 1);
    assert_save_does_not_commit(tx, &a, level);
    // The app's retry gets the refusal.
    assert_refused(&mut app, &a);
}

#[test]
fn seq04_a_repeatable_read_save_whose_snapshot_predates_the_claim_does_not_commit() {
    save_at_isolation_after_a_claim("REPEATABLE READ");
}

#[test]
fn seq04_a_serializable_save_whose_snapshot_predates_the_claim_does_not_commit() {
    save_at_isolation_after_a_claim("SERIALIZABLE");
}

/// Found by the twelfth review: the app's snapshot is taken; another session points job J at
/// object b (a render cache hit; b is not handed out yet); a cycle queues b and a claim hands
/// it out; then the app saves J. At READ COMMITTED the save reads J's new URL and is refused.
/// At REPEATABLE READ or SERIALIZABLE it read J's old URL (a FOR KEY SHARE lock meets no
/// conflict on a non-key update), held the old object, and committed: J saved, b deleted. The
/// job write now writes J's fence row whenever J comes to name an object, so the save's fence
/// write fails with a serialization error and its retry is refused.
fn save_at_isolation_after_a_repoint_and_a_claim(level: &str) {
    let db = db(&format!(
        "obj_repoint_{}",
        level.replace(' ', "_").to_lowercase()
    ));
    let mut c = db.client();
    orphan(&mut c, &public_url("renders", "repoint-b.png"));
    let j = orphan(&mut c, &public_url("renders", "repoint-a.png"));
    let mut app = db.client();
    let mut tx = snapshot_transaction(&mut app, level);
    tx.query_one("SELECT count(*) FROM render_jobs", &[])
        .unwrap();
    c.execute(
        "UPDATE render_jobs SET output_url = $2 WHERE id = $1::text::uuid",
        &[&j.0, &public_url("renders", "repoint-b.png")],
    )
    .unwrap();
    assert_eq!(cycle(&mut c).2, 2);
    assert_eq!(claim(&mut c, "r1", 10).len(), 2);
    assert_save_does_not_commit(tx, &j, level);
    assert_refused(&mut app, &j);
}

#[test]
fn seq04_a_repeatable_read_save_after_a_repoint_and_a_claim_does_not_commit() {
    save_at_isolation_after_a_repoint_and_a_claim("REPEATABLE READ");
}

#[test]
fn seq04_a_serializable_save_after_a_repoint_and_a_claim_does_not_commit() {
    save_at_isolation_after_a_repoint_and_a_claim("SERIALIZABLE");
}

// 6.
/// A saved job J, and an orphan naming `renders/<key>` queued by a cycle.
fn saved_job_beside_a_queued_orphan(name: &str, key: &str) -> (TestDb, uuid_text::Uuid) {
    let db = db(name);
    let mut c = db.client();
    orphan(&mut c, &public_url("renders", key));
    let j = job(
        &mut c,
        "completed",
        Some(&public_url("renders", &format!("saved-{key}"))),
        "2 days",
        "saved",
    );
    save(&mut c, "generated_saved", &j.0).unwrap();
    assert_eq!(cycle(&mut c).2, 1);
    (db, j)
}

#[test]
fn seq06_a_saved_job_cannot_be_pointed_at_a_claimed_object() {
    let (db, j) = saved_job_beside_a_queued_orphan("obj_repoint", "k.png");
    let mut c = db.client();
    assert_eq!(claim(&mut c, "r1", 10).len(), 1);
    let err = c
        .execute(
            "UPDATE render_jobs SET output_url = $1 WHERE id = $2::text::uuid",
            &[&public_url("renders", "k.png"), &j.0],
        )
        .unwrap_err();
    let db_err = err.as_db_error().unwrap();
    assert_eq!(db_err.code().code(), REPOINT_REFUSED);
    assert!(
        db_err
            .message()
            .contains("is saved and cannot point at renders/k.png"),
        "{}",
        db_err.message()
    );
}

#[test]
fn seq06_a_repoint_waits_for_a_claim_in_flight_then_is_refused() {
    let (db, j) = saved_job_beside_a_queued_orphan("obj_repoint_inflight", "k2.png");
    let mut c = db.client();
    let mut reaper = db.client();
    let mut tx = reaper.transaction().unwrap();
    assert_eq!(claim(&mut tx, "r1", 10).len(), 1);
    let name = db.name.clone();
    let jid = j.0.clone();
    let (writer, pid) = session_in_thread(&name, move |w| {
        w.execute(
            "UPDATE render_jobs SET output_url = $1 WHERE id = $2::text::uuid",
            &[&public_url("renders", "k2.png"), &jid],
        )
    });
    wait_until_blocked(&mut c, pid);
    tx.commit().unwrap();
    assert_eq!(code(writer.join().unwrap()), REPOINT_REFUSED);
}

#[test]
fn seq06_a_render_cache_hit_on_a_deleted_object_cannot_be_saved() {
    let db = db("obj_cache_hit");
    let mut c = db.client();
    let url = public_url("renders", "cached.png");
    orphan(&mut c, &url);
    cycle(&mut c);
    let ids = claim(&mut c, "r1", 10);
    confirm(&mut c, "r1", &ids);
    // The app may still create a job naming the object (it is not saved)...
    let hit = job(&mut c, "completed", Some(&url), "1 second", "cache hit");
    // ...but not save it.
    assert_refused(&mut c, &hit);
}

// 7.
#[test]
fn seq07_a_job_whose_url_confirm_cleared_cannot_be_saved() {
    let db = db_with("obj_clear_url", &[("on_confirm", "clear_url")]);
    let mut c = db.client();
    let a = orphan(&mut c, &public_url("renders", "cleared.png"));
    cycle(&mut c);
    let ids = claim(&mut c, "r1", 10);
    confirm(&mut c, "r1", &ids);
    let url: Option<String> = c
        .query_one(
            "SELECT output_url FROM render_jobs WHERE id = $1::text::uuid",
            &[&a.0],
        )
        .unwrap()
        .get(0);
    assert_eq!(url, None, "clear_url cleared it");
    assert_refused(&mut c, &a);
}

// 8.
fn guard_health(c: &mut postgres::Client) -> (String, String) {
    let r = c
        .query_one(
            "SELECT status, detail FROM orphan_cleanup.health() WHERE check_name = 'save guard'",
            &[],
        )
        .unwrap();
    (r.get(0), r.get(1))
}

fn claim_refusal(c: &mut postgres::Client) -> String {
    db_error(
        &c.query("SELECT * FROM orphan_cleanup.claim('r1', 10)", &[])
            .unwrap_err(),
    )
}

#[test]
fn seq08_any_guard_trigger_but_the_exact_one_enabled_always_stops_claims() {
    let db = db("obj_trigger_state");
    let mut c = db.client();
    orphan(&mut c, &public_url("renders", "trig.png"));
    cycle(&mut c);
    let cases: &[(&str, &str)] = &[
        (
            "ALTER TABLE user_assets ENABLE REPLICA TRIGGER orphan_cleanup_save_guard",
            "enabled REPLICA only",
        ),
        (
            "ALTER TABLE user_assets DISABLE TRIGGER ALL; ALTER TABLE user_assets ENABLE TRIGGER ALL",
            "enabled ORIGIN only",
        ),
        (
            "ALTER TABLE render_jobs DISABLE TRIGGER orphan_cleanup_job_guard",
            "disabled",
        ),
        (
            "DROP TRIGGER orphan_cleanup_save_guard ON user_assets;
             CREATE FUNCTION public.noop() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN RETURN NULL; END $$;
             CREATE TRIGGER orphan_cleanup_save_guard AFTER INSERT OR UPDATE OR DELETE ON user_assets
                 FOR EACH ROW EXECUTE FUNCTION public.noop();
             ALTER TABLE user_assets ENABLE ALWAYS TRIGGER orphan_cleanup_save_guard",
            "is not the guard attach() installs",
        ),
        (
            "DROP TRIGGER orphan_cleanup_job_guard ON render_jobs",
            "orphan_cleanup_job_guard is missing",
        ),
    ];
    for (breakage, says) in cases {
        db.attach();
        assert_eq!(guard_health(&mut c).0, "ok");
        exec(&mut c, breakage);
        let (status, detail) = guard_health(&mut c);
        assert_eq!(status, "critical", "{breakage}: {detail}");
        assert!(detail.contains(says), "{breakage}: {detail}");
        let refusal = claim_refusal(&mut c);
        assert!(refusal.contains(says), "{breakage}: {refusal}");
    }
    db.attach();
    assert_eq!(guard_health(&mut c).0, "ok");
    assert_eq!(claim(&mut c, "r1", 10).len(), 1, "attach() put it right");
}

// 9.
#[test]
fn seq09_a_job_with_an_unknown_age_or_status_keeps_a_shared_object() {
    let db = db_with("obj_nulls", &[("age_column", "completed_at")]);
    let mut c = db.client();
    exec(
        &mut c,
        "ALTER TABLE render_jobs ALTER COLUMN status DROP NOT NULL;
         CREATE INDEX render_jobs_completed_scan_idx ON render_jobs (completed_at, id) WHERE status = 'completed' AND output_url IS NOT NULL",
    );
    db.attach();
    for (key, keeper_sql) in [
        (
            "null-age.png",
            "INSERT INTO render_jobs (status, output_url, completed_at) VALUES ('completed', $1, NULL)",
        ),
        (
            "null-status.png",
            "INSERT INTO render_jobs (status, output_url, completed_at) VALUES (NULL, $1, now() - interval '2 days')",
        ),
    ] {
        let url = public_url("renders", key);
        c.execute(
            "INSERT INTO render_jobs (status, output_url, completed_at) VALUES ('completed', $1, now() - interval '2 days')",
            &[&format!("renders/{key}")],
        )
        .unwrap();
        // Queued first, then a job with an unknown age or status names the same object.
        cycle(&mut c);
        c.execute(keeper_sql, &[&url]).unwrap();
        assert!(
            claim(&mut c, "r1", 10).is_empty(),
            "{key}: unknown must keep the object"
        );
    }
    // And a cycle never queues an orphan whose object such a job names.
    let url = public_url("renders", "null-late.png");
    c.execute(
        "INSERT INTO render_jobs (status, output_url, completed_at) VALUES ('completed', $1, NULL)",
        &[&url],
    )
    .unwrap();
    c.execute(
        "INSERT INTO render_jobs (status, output_url, completed_at) VALUES ('completed', 'renders/null-late.png', now() - interval '2 days')",
        &[],
    )
    .unwrap();
    assert_eq!(cycle(&mut c).2, 0);
}

// 11.
/// The jobs table belongs to an ordinary role, `app_owner`.
fn jobs_owned_by_app_owner(c: &mut postgres::Client) {
    exec(
        c,
        "DO $$ BEGIN
             IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'app_owner') THEN
                 CREATE ROLE app_owner NOLOGIN NOSUPERUSER;
             END IF;
         END $$;
         ALTER TABLE render_jobs OWNER TO app_owner;",
    );
}

#[test]
fn seq11_confirm_writes_the_jobs_table_with_its_owners_rights_only() {
    let db = db("obj_owner_rights");
    let mut c = db.client();
    // The jobs table belongs to an ordinary role, which puts a trigger of its own on it that
    // records who runs it.
    jobs_owned_by_app_owner(&mut c);
    exec(
        &mut c,
        "CREATE TABLE public.who_ran (who text, superuser boolean);
         ALTER TABLE public.who_ran OWNER TO app_owner;
         CREATE FUNCTION public.record_who() RETURNS trigger LANGUAGE plpgsql AS $$
         BEGIN
             INSERT INTO public.who_ran SELECT current_user, r.rolsuper FROM pg_roles AS r WHERE r.rolname = current_user;
             RETURN OLD;
         END $$;
         ALTER FUNCTION public.record_who() OWNER TO app_owner;
         SET ROLE app_owner;
         CREATE TRIGGER record_who BEFORE DELETE ON render_jobs FOR EACH ROW EXECUTE FUNCTION public.record_who();
         RESET ROLE;",
    );
    db.attach();
    let a = orphan(&mut c, &public_url("renders", "owned.png"));
    cycle(&mut c);
    let ids = claim(&mut c, "r1", 10);
    confirm(&mut c, "r1", &ids);
    let ran: Vec<(String, bool)> = c
        .query("SELECT who, superuser FROM public.who_ran", &[])
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    assert_eq!(
        ran,
        vec![("app_owner".to_string(), false)],
        "the app's trigger ran with the table owner's rights, not a superuser's"
    );
    assert_eq!(queue_row(&mut c, &a).1, "deleted");
    let gone: i64 = c
        .query_one(
            "SELECT count(*) FROM render_jobs WHERE id = $1::text::uuid",
            &[&a.0],
        )
        .unwrap()
        .get(0);
    assert_eq!(gone, 0, "and the job row was deleted");
}

// 12.
#[test]
fn seq12_confirm_keeps_a_job_that_was_rerun_since_the_claim() {
    let db = db("obj_rerun");
    let mut c = db.client();
    let a = orphan(&mut c, &public_url("renders", "rerun.png"));
    cycle(&mut c);
    let ids = claim(&mut c, "r1", 10);
    c.execute(
        "UPDATE render_jobs SET status = 'running' WHERE id = $1::text::uuid",
        &[&a.0],
    )
    .unwrap();
    confirm(&mut c, "r1", &ids);
    let status: String = c
        .query_one(
            "SELECT status FROM render_jobs WHERE id = $1::text::uuid",
            &[&a.0],
        )
        .unwrap()
        .get(0);
    assert_eq!(status, "running", "the re-run job keeps its row");
    let (cleanup, audited): (String, i64) = {
        let r = c
            .query_one(
                "SELECT job_cleanup, (SELECT count(*) FROM orphan_cleanup.audit_log WHERE queue_id = d.id AND action = 'job_cleanup' AND detail LIKE 'job row kept: %')
                 FROM orphan_cleanup.deletion_queue AS d WHERE d.id = $1",
                &[&ids[0]],
            )
            .unwrap();
        (r.get(0), r.get(1))
    };
    assert_eq!(
        cleanup,
        "nothing to do: the job is no longer completed (status running)"
    );
    assert_eq!(audited, 1);
}

// 13.
#[test]
fn seq13_cancel_keeps_the_object_not_just_the_row() {
    let db = db("obj_cancel");
    let mut c = db.client();
    let a = orphan(&mut c, "renders/kept.png");
    let b = orphan(&mut c, &public_url("renders", "kept.png"));
    assert_eq!(cycle(&mut c).2, 2);
    let (b_row, _) = queue_row(&mut c, &b);
    let results: Vec<(i64, String)> = c
        .query(
            "SELECT id, result FROM orphan_cleanup.cancel($1)",
            &[&vec![b_row]],
        )
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    assert_eq!(results[0], (b_row, "cancelled".to_string()));
    assert_eq!(results.len(), 2, "{results:?}");
    assert_eq!(queue_row(&mut c, &a).1, "cancelled");
    assert!(claim(&mut c, "r1", 10).is_empty());
    // A later job naming the kept object is queued by a cycle but never handed out.
    let late = orphan(&mut c, &public_url("renders", "kept.png"));
    cycle(&mut c);
    assert!(claim(&mut c, "r1", 10).is_empty());
    assert_eq!(queue_row(&mut c, &late).1, "cancelled");
}

#[test]
fn seq13_cancel_of_a_row_whose_object_a_reaper_holds_says_so() {
    let db = db("obj_cancel_claimed");
    let mut c = db.client();
    orphan(&mut c, "renders/held.png");
    let b = orphan(&mut c, &public_url("renders", "held.png"));
    cycle(&mut c);
    let ids = claim(&mut c, "r1", 1);
    assert_eq!(ids.len(), 1);
    let (b_row, _) = queue_row(&mut c, &b);
    let target = if b_row == ids[0] {
        // The claim took B's row: cancel the other one.
        c.query_one(
            "SELECT id FROM orphan_cleanup.deletion_queue WHERE id <> $1",
            &[&b_row],
        )
        .unwrap()
        .get::<_, i64>(0)
    } else {
        b_row
    };
    let result: String = c
        .query_one(
            "SELECT result FROM orphan_cleanup.cancel($1)",
            &[&vec![target]],
        )
        .unwrap()
        .get(0);
    assert!(
        result.contains("already handed to a reaper") && result.contains("may be deleted"),
        "{result}"
    );
}

// 15, first item.
#[test]
fn seq15_requeue_dead_requeues_the_others_and_names_the_row_it_skips() {
    // Full sweeps: the cycle after A's URL changes looks at A again.
    let db = db_with("obj_requeue", &[("full_sweep_interval", "0")]);
    let mut c = db.client();
    let a = orphan(&mut c, &public_url("renders", "a-old.png"));
    let b = orphan(&mut c, &public_url("renders", "b.png"));
    cycle(&mut c);
    let ids = claim(&mut c, "r1", 10);
    c.query(
        "SELECT * FROM orphan_cleanup.fail('r1', $1, $2, 'storage said 500', false)",
        &[&ids.lease, &ids.ids],
    )
    .unwrap();
    let (a_dead, _) = queue_row(&mut c, &a);
    // A's job now names another object, which a cycle queues: A has a live row.
    c.execute(
        "UPDATE render_jobs SET output_url = $1 WHERE id = $2::text::uuid",
        &[&public_url("renders", "a-new.png"), &a.0],
    )
    .unwrap();
    assert_eq!(cycle(&mut c).2, 1);

    let notices = std::sync::Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let sink = notices.clone();
    let mut dba = postgres::Config::new()
        .host("127.0.0.1")
        .port(port())
        .user("postgres")
        .dbname(&db.name)
        .notice_callback(move |n| sink.lock().unwrap().push(n.message().to_string()))
        .connect(postgres::NoTls)
        .unwrap();
    let n: i64 = dba
        .query_one("SELECT orphan_cleanup.requeue_dead(NULL)", &[])
        .unwrap()
        .get(0);
    assert_eq!(n, 1, "B's dead row is requeued");
    assert_eq!(queue_row(&mut c, &b).1, "pending");
    let a_state: String = c
        .query_one(
            "SELECT state FROM orphan_cleanup.deletion_queue WHERE id = $1",
            &[&a_dead],
        )
        .unwrap()
        .get(0);
    assert_eq!(a_state, "dead");
    let said = notices.lock().unwrap().join("\n");
    assert!(
        said.contains(&format!("row {a_dead} (job {} already has row", a.0)),
        "{said}"
    );
}

// 15, third item.
#[test]
fn seq15_attach_refuses_an_age_column_without_time_zone() {
    let db = db_with("obj_tz", &[("age_column", "completed_at")]);
    let mut c = db.client();
    exec(
        &mut c,
        "ALTER TABLE render_jobs ALTER COLUMN completed_at TYPE timestamp",
    );
    // Attached before: cycles and claims stop, naming the column.
    let err = c
        .query("SELECT * FROM orphan_cleanup.run_cycle()", &[])
        .map(|rows| rows[0].get::<_, String>(1))
        .unwrap();
    assert_eq!(err, "failed");
    let why: String = c
        .query_one(
            "SELECT error FROM orphan_cleanup.cycle_log ORDER BY id DESC LIMIT 1",
            &[],
        )
        .unwrap()
        .get(0);
    assert!(why.contains("no longer timestamptz"), "{why}");
    let err = c
        .query("SELECT * FROM orphan_cleanup.attach()", &[])
        .unwrap_err();
    let msg = db_error(&err);
    assert!(
        msg.contains("is timestamp without time zone")
            && msg.contains(
                "ALTER COLUMN completed_at TYPE timestamptz USING completed_at AT TIME ZONE 'UTC'"
            ),
        "{msg}"
    );
}

// Found by the adversarial review of this change.

/// Whether a saved asset points at a job whose object a claim handed out: the property, read
/// off the tables.
fn saved_job_names_a_handed_out_object(c: &mut postgres::Client, j: &uuid_text::Uuid) -> bool {
    c.query_one(
        "SELECT EXISTS (
             SELECT 1 FROM render_jobs AS r
             JOIN orphan_cleanup.objects AS o ON o.bucket || '/' || o.object_path = orphan_cleanup.object_key(r.output_url)
             WHERE r.id = $1::text::uuid AND o.handouts > 0
               AND EXISTS (SELECT 1 FROM user_assets AS a
                           WHERE orphan_cleanup.job_ref_key(a.metadata ->> 'render_job_id') = r.id::text))",
        &[&j.0],
    )
    .unwrap()
    .get(0)
}

#[test]
fn review_an_asset_saved_before_its_job_exists_keeps_the_object() {
    let db = db("obj_asset_first");
    let mut c = db.client();
    let url = public_url("renders", "early-asset.png");
    orphan(&mut c, &url);
    assert_eq!(cycle(&mut c).2, 1);
    let j = uuid_text::Uuid(
        c.query_one("SELECT gen_random_uuid()::text", &[])
            .unwrap()
            .get(0),
    );
    // 1. The app saves an asset for job J before J's row exists; not committed yet.
    let mut saver = db.client();
    let mut tx = saver.transaction().unwrap();
    tx.execute("INSERT INTO user_assets (asset_type, metadata) VALUES ('generated_saved', jsonb_build_object('render_job_id', $1::text))", &[&j.0])
        .unwrap();
    // 2. Another session inserts J, completed and old, naming the queued object.
    let (name, jid, jurl) = (db.name.clone(), j.0.clone(), url.clone());
    let (writer, pid) = session_in_thread(&name, move |w| {
        w.execute(
        "INSERT INTO render_jobs (id, status, output_url, created_at) VALUES ($1::text::uuid, 'completed', $2, now() - interval '2 days')",
        &[&jid, &jurl],
    )
    });
    wait_for(
        std::time::Duration::from_secs(10),
        "the job insert to finish or to wait",
        || {
            writer.is_finished()
                || c.query_one("SELECT cardinality(pg_blocking_pids($1)) > 0", &[&pid])
                    .unwrap()
                    .get::<_, bool>(0)
        },
    );
    // 3. A reaper claims; 4. the save commits; then the job insert ends, one way or the other.
    claim(&mut c, "r1", 10);
    tx.commit().unwrap();
    let inserted = writer.join().unwrap();
    assert!(
        !saved_job_names_a_handed_out_object(&mut c, &j),
        "a saved asset points at job {} whose object was handed out (insert: {inserted:?})",
        j.0
    );
}

#[test]
fn review_two_saves_of_one_job_and_an_update_of_it_do_not_deadlock() {
    let db = db("obj_two_saves");
    let mut c = db.client();
    let j = job(
        &mut c,
        "completed",
        Some(&public_url("renders", "twice.png")),
        "1 minute",
        "fresh",
    );
    let mut first = db.client();
    let mut tx = first.transaction().unwrap();
    tx.execute("INSERT INTO user_assets (asset_type, metadata) VALUES ('generated_saved', jsonb_build_object('render_job_id', $1::text))", &[&j.0])
        .unwrap();
    let (name, jid) = (db.name.clone(), j.0.clone());
    let (second, pid) = session_in_thread(&name, move |s| save(s, "generated_saved", &jid));
    wait_until_blocked(&mut c, pid);
    // The first saver's app also updates the job in the same transaction.
    tx.execute(
        "UPDATE render_jobs SET prompt = 'saved' WHERE id = $1::text::uuid",
        &[&j.0],
    )
    .expect("no deadlock with the second save");
    tx.commit().unwrap();
    second.join().unwrap().expect("the second save commits");
}

#[test]
fn review_claims_hand_out_nothing_while_a_transaction_disables_the_guard() {
    let db = db("obj_disable_in_tx");
    let mut c = db.client();
    orphan(&mut c, &public_url("renders", "restore.png"));
    cycle(&mut c);
    let mut dba = db.client();
    let mut tx = dba.transaction().unwrap();
    tx.batch_execute("ALTER TABLE user_assets DISABLE TRIGGER orphan_cleanup_save_guard")
        .unwrap();
    // The claim neither waits nor hands anything out while the guard is off, uncommitted.
    assert!(claim(&mut c, "r1", 10).is_empty());
    tx.rollback().unwrap();
    assert_eq!(claim(&mut c, "r1", 10).len(), 1);
}

#[test]
fn review_detach_is_refused_while_rows_are_claimed() {
    let db = db("obj_detach_claimed");
    let mut c = db.client();
    orphan(&mut c, &public_url("renders", "detach.png"));
    cycle(&mut c);
    let ids = claim(&mut c, "r1", 10);
    let err = c
        .query_one("SELECT orphan_cleanup.detach()", &[])
        .unwrap_err();
    let msg = db_error(&err);
    assert!(
        msg.contains("detach() refused: 1 queue row(s) are claimed")
            && msg.contains(&how_to_set("reaping_enabled")),
        "{msg}"
    );
    confirm(&mut c, "r1", &ids);
    c.query_one("SELECT orphan_cleanup.detach()", &[]).unwrap();
}

/// Sequence 11, the race: the function that writes the jobs table belongs to the table's owner.
/// Were that role to make it SECURITY INVOKER between the check and the write, the write would
/// run as the superuser calling it. The check locks the function's catalog row until commit.
#[test]
fn seq11_the_jobs_writer_cannot_be_altered_while_a_cleanup_uses_it() {
    let db = db("obj_writer_race");
    let mut c = db.client();
    jobs_owned_by_app_owner(&mut c);
    exec(&mut c, "GRANT USAGE ON SCHEMA orphan_cleanup TO app_owner");
    db.attach();
    let mut cleanup = db.client();
    let mut tx = cleanup.transaction().unwrap();
    tx.execute(
        "SELECT orphan_cleanup._own_job_writer('render_jobs'::regclass)",
        &[],
    )
    .unwrap();
    let (alter, pid) = session_in_thread(&db.name, |s| {
        s.batch_execute(
            "SET ROLE app_owner;
             ALTER FUNCTION orphan_cleanup._write_jobs(regclass, text, uuid[]) SECURITY INVOKER",
        )
    });
    wait_until_blocked(&mut c, pid);
    tx.commit().unwrap();
    alter.join().unwrap().unwrap();
    // The next cleanup puts it right before it writes.
    let mut tx = cleanup.transaction().unwrap();
    tx.execute(
        "SELECT orphan_cleanup._own_job_writer('render_jobs'::regclass)",
        &[],
    )
    .unwrap();
    let definer: bool = tx
        .query_one(
            "SELECT prosecdef FROM pg_proc WHERE oid = 'orphan_cleanup._write_jobs(regclass,text,uuid[])'::regprocedure",
            &[],
        )
        .unwrap()
        .get(0);
    assert!(definer);
    tx.commit().unwrap();
}

/// Sequence 8 on a partitioned assets table: the save guard fires through its clone on each
/// partition, and a clone disabled on one partition stops claims like the parent's would.
#[test]
fn seq08_a_guard_disabled_on_one_partition_stops_claims() {
    let mut all: Vec<(&str, &str)> = BASE_SETTINGS.to_vec();
    all.push(("assets_table", "public.assets_by_type"));
    settings(&all);
    let db = TestDb::create("obj_partitioned");
    let mut c = db.client();
    exec(
        &mut c,
        "CREATE TABLE public.assets_by_type (
             id uuid NOT NULL DEFAULT gen_random_uuid(),
             asset_type text NOT NULL,
             metadata jsonb NOT NULL DEFAULT '{}'
         ) PARTITION BY LIST (asset_type);
         CREATE TABLE public.assets_saved PARTITION OF public.assets_by_type FOR VALUES IN ('generated_saved');
         CREATE TABLE public.assets_other PARTITION OF public.assets_by_type DEFAULT;
         -- What the refusal without it names: plain CREATE INDEX on a partitioned table.
         CREATE INDEX assets_by_type_render_job_ref_idx ON public.assets_by_type (orphan_cleanup.job_ref_key(metadata ->> 'render_job_id'));",
    );
    db.attach();
    let a = orphan(&mut c, &public_url("renders", "part.png"));
    cycle(&mut c);
    assert_eq!(guard_health(&mut c).0, "ok");
    exec(
        &mut c,
        "ALTER TABLE public.assets_saved DISABLE TRIGGER orphan_cleanup_save_guard",
    );
    let (status, detail) = guard_health(&mut c);
    assert_eq!(status, "critical", "{detail}");
    assert!(
        detail.contains("orphan_cleanup_save_guard on public.assets_saved is disabled"),
        "{detail}"
    );
    assert!(claim_refusal(&mut c).contains("assets_saved"));
    exec(
        &mut c,
        "ALTER TABLE public.assets_saved ENABLE ALWAYS TRIGGER orphan_cleanup_save_guard",
    );
    assert_eq!(claim(&mut c, "r1", 10).len(), 1);
    // And the guard holds through the partition: the job cannot be saved now.
    let err = c
        .execute(
            "INSERT INTO public.assets_by_type (asset_type, metadata) VALUES ('generated_saved', jsonb_build_object('render_job_id', $1::text))",
            &[&a.0],
        )
        .unwrap_err();
    assert_eq!(err.code().unwrap().code(), REFUSED);
}

// 14. "Handed out" means "a delete may have been sent".
fn handouts(c: &mut postgres::Client, key: &str) -> i32 {
    c.query_one(
        "SELECT coalesce(max(handouts), 0) FROM orphan_cleanup.objects WHERE bucket || '/' || object_path = $1",
        &[&key],
    )
    .unwrap()
    .get(0)
}

#[test]
fn seq14_a_claim_given_back_with_nothing_sent_leaves_the_job_savable() {
    let db = db("obj_unsent");
    let mut c = db.client();
    let a = orphan(&mut c, &public_url("renders", "unsent.png"));
    cycle(&mut c);
    let ids = claim(&mut c, "r1", 10);
    assert_eq!(ids.len(), 1);
    assert_eq!(handouts(&mut c, "renders/unsent.png"), 1);
    let n: i64 = c
        .query_one(
            "SELECT orphan_cleanup.release('r1', $1, $2, 'storage refused the key', nothing_sent => true)",
            &[&ids.lease, &ids.ids],
        )
        .unwrap()
        .get(0);
    assert_eq!(n, 1);
    assert_eq!(handouts(&mut c, "renders/unsent.png"), 0);
    let (state, claims): (String, i32) = c
        .query_one(
            "SELECT state, claim_count FROM orphan_cleanup.deletion_queue WHERE id = $1",
            &[&ids[0]],
        )
        .map(|r| (r.get(0), r.get(1)))
        .unwrap();
    assert_eq!(
        (state.as_str(), claims),
        ("pending", 0),
        "as good as never claimed"
    );
    let detail: String = c
        .query_one(
            "SELECT detail FROM orphan_cleanup.audit_log WHERE action = 'released' AND queue_id = $1",
            &[&ids[0]],
        )
        .unwrap()
        .get(0);
    assert_eq!(detail, "storage refused the key (nothing was sent)");
    save(&mut c, "generated_saved", &a.0)
        .expect("nothing was sent, so the file is there: the save commits");
}

#[test]
fn seq14_an_unsent_release_takes_back_only_its_own_hand_out() {
    // Two jobs name one object; each row is handed out by its own claim. One reaper sent its
    // delete, the other gives its claim back unsent: the object stays handed out.
    let db = db("obj_unsent_shared");
    let mut c = db.client();
    let a = orphan(&mut c, "renders/twice.png");
    let b = orphan(&mut c, &public_url("renders", "twice.png"));
    cycle(&mut c);
    let first = claim(&mut c, "r1", 1);
    let second = claim(&mut c, "r2", 1);
    assert_eq!((first.len(), second.len()), (1, 1));
    assert_eq!(handouts(&mut c, "renders/twice.png"), 2);
    c.query_one(
        "SELECT orphan_cleanup.release('r2', $1, NULL, NULL, nothing_sent => true)",
        &[&second.lease],
    )
    .unwrap();
    assert_eq!(handouts(&mut c, "renders/twice.png"), 1);
    assert_refused(&mut c, &a);
    assert_refused(&mut c, &b);
}

#[test]
fn seq14_a_lease_that_expired_counts_as_sent_whatever_the_reaper_says_later() {
    let db = db("obj_unsent_late");
    let mut c = db.client();
    let a = orphan(&mut c, &public_url("renders", "late.png"));
    cycle(&mut c);
    let stalled = claim_sql(
        &mut c,
        "SELECT id, lease_token FROM orphan_cleanup.claim('r1', 10, '1 second')",
        &[],
    );
    assert_eq!(stalled.len(), 1);
    std::thread::sleep(std::time::Duration::from_millis(1100));
    // Another claim expires the lease (the row goes back, with back-off).
    assert!(claim(&mut c, "r2", 10).is_empty());
    let n: i64 = c
        .query_one(
            "SELECT orphan_cleanup.release('r1', $1, NULL, NULL, nothing_sent => true)",
            &[&stalled.lease],
        )
        .unwrap()
        .get(0);
    assert_eq!(n, 0, "the lease is over: nothing of it to give back");
    assert_eq!(handouts(&mut c, "renders/late.png"), 1);
    assert_refused(&mut c, &a);
}

#[test]
fn seq14_rows_a_reaper_refuses_count_as_never_handed_out() {
    let db = db("obj_refused_unsent");
    let mut c = db.client();
    let a = orphan(&mut c, &public_url("renders", "refused.png"));
    cycle(&mut c);
    let ids = claim(&mut c, "r1", 10);
    let res: String = c
        .query_one(
            "SELECT result FROM orphan_cleanup.refuse('r1', $1, $2, 'not my bucket')",
            &[&ids.lease, &ids.ids],
        )
        .unwrap()
        .get(0);
    assert_eq!(res, "given back");
    assert_eq!(handouts(&mut c, "renders/refused.png"), 0);
    save(&mut c, "generated_saved", &a.0).expect("refused rows were never sent");
}

// 15, second item: a fencing token per claim.
#[test]
fn seq15_only_the_claims_lease_token_confirms_fails_releases_or_refuses() {
    let db = db("obj_lease_token");
    let mut c = db.client();
    orphan(&mut c, &public_url("renders", "fenced.png"));
    cycle(&mut c);
    let held = claim_sql(
        &mut c,
        "SELECT id, lease_token FROM orphan_cleanup.claim('r1', 10, '1 second')",
        &[],
    );
    assert_eq!(held.len(), 1);
    let guessed = "9b2f7c1e-0d3a-4e5f-8a6b-7c8d9e0f1a2b".to_string();
    // Another role that learned the worker id (confirm's results name it) but not the token.
    for sql in [
        "SELECT result FROM orphan_cleanup.confirm('r1', $1, $2, 'deleted')",
        "SELECT result FROM orphan_cleanup.fail('r1', $1, $2, 'HTTP 500', true)",
        "SELECT result FROM orphan_cleanup.refuse('r1', $1, $2, 'not mine')",
    ] {
        let r: String = c.query_one(sql, &[&guessed, &held.ids]).unwrap().get(0);
        assert!(
            r.ends_with("the lease token does not match this claim (a later claim holds it, or the token is wrong)"),
            "{sql}: {r}"
        );
    }
    let n: i64 = c
        .query_one(
            "SELECT orphan_cleanup.release('r1', $1, NULL, NULL)",
            &[&guessed],
        )
        .unwrap()
        .get(0);
    assert_eq!(n, 0);
    assert_eq!(queue_row_state(&mut c, held[0]), "claimed");
    // Not a token at all, or none: a clear error. The 0.1.0 signature says what is missing.
    let e = c
        .query(
            "SELECT * FROM orphan_cleanup.confirm('r1', 'r1', $1, 'deleted')",
            &[&held.ids],
        )
        .unwrap_err();
    assert!(
        db_error(&e).contains("lease_token must be the lease_token that claim() returned"),
        "{}",
        db_error(&e)
    );
    let e = c
        .query(
            "SELECT * FROM orphan_cleanup.confirm('r1', $1)",
            &[&held.ids],
        )
        .unwrap_err();
    assert!(
        db_error(&e).contains("confirm() needs the lease token that claim() returned")
            && e.as_db_error()
                .unwrap()
                .hint()
                .unwrap()
                .contains("reaper 0.2.0 or later"),
        "{}",
        db_error(&e)
    );
    // The same worker id claims the row again after its lease ran out: the old token is fenced off.
    std::thread::sleep(std::time::Duration::from_millis(1100));
    c.execute("SELECT orphan_cleanup._expire_leases('test')", &[])
        .unwrap();
    c.execute(
        "UPDATE orphan_cleanup.deletion_queue SET available_at = now()",
        &[],
    )
    .unwrap();
    let again = claim(&mut c, "r1", 10);
    assert_eq!(again.ids, held.ids);
    assert_ne!(again.lease, held.lease, "a new token per claim");
    // The queue keeps a hash, never the token; the audit trail neither.
    let (hashed, plain): (i64, i64) = c
        .query_one(
            "SELECT (SELECT count(*) FROM orphan_cleanup.deletion_queue WHERE lease_hash IS NOT NULL),
                    (SELECT count(*) FROM orphan_cleanup.deletion_queue AS d WHERE strpos(d::text, $1) > 0)
                  + (SELECT count(*) FROM orphan_cleanup.audit_log AS a WHERE strpos(a::text, $1) > 0)",
            &[&again.lease],
        )
        .map(|r| (r.get(0), r.get(1)))
        .unwrap();
    assert_eq!((hashed, plain), (1, 0));
    let r: String = c
        .query_one(
            "SELECT result FROM orphan_cleanup.confirm('r1', $1, $2, 'deleted')",
            &[&held.lease, &held.ids],
        )
        .unwrap()
        .get(0);
    assert_eq!(r, "not confirmed: the lease token does not match this claim (a later claim holds it, or the token is wrong)");
    let r: String = c
        .query_one(
            "SELECT result FROM orphan_cleanup.confirm('r1', $1, $2, 'deleted')",
            &[&again.lease, &again.ids],
        )
        .unwrap()
        .get(0);
    assert_eq!(r, "confirmed");
}

fn queue_row_state(c: &mut postgres::Client, id: i64) -> String {
    c.query_one(
        "SELECT state FROM orphan_cleanup.deletion_queue WHERE id = $1",
        &[&id],
    )
    .unwrap()
    .get(0)
}

// 5. Spellings the strict parser refuses still protect the object they could name.
fn odd_spellings(n: usize) -> Vec<(String, String)> {
    // (A's URL, spelled as the strict parser accepts it; B's URL, naming the same object another way)
    let h = format!("https://{HOST}/storage/v1/object");
    let upper = format!("https://{}/storage/v1/object", HOST.to_uppercase());
    (0..n)
        .map(|i| {
            let a = format!("{h}/public/renders/k{i}/my%20render.png");
            let b = match i % 5 {
                0 => format!("{h}/public/renders/k{i}/my render.png"),
                1 => format!("{h}/renders/k{i}/my%20render.png"),
                2 => format!("{h}/public/renders/k{i}/my%20render.png\n"),
                3 => format!("{upper}/public/renders/k{i}/my render.png"),
                _ => format!("{h}/public/renders/k{i}/x/../my%20render.png"),
            };
            (a, b)
        })
        .collect()
}

fn strict_error(c: &mut postgres::Client, url: &str) -> Option<String> {
    c.query_one(
        "SELECT (orphan_cleanup.parse_output_url($1)).error",
        &[&url],
    )
    .unwrap()
    .get(0)
}

#[test]
fn seq05_a_saved_job_keeps_its_object_whatever_its_urls_spelling() {
    let db = db("obj_spellings");
    let mut c = db.client();
    let pairs = odd_spellings(5);
    for (a, b) in &pairs {
        assert!(strict_error(&mut c, a).is_none(), "{a}");
        assert!(
            strict_error(&mut c, b).is_some(),
            "the strict parser refuses {b:?}"
        );
        let saved = job(
            &mut c,
            "completed",
            Some(b),
            "2 days",
            "saved, odd spelling",
        );
        save(&mut c, "generated_saved", &saved.0).unwrap();
        orphan(&mut c, a);
    }
    cycle(&mut c);
    assert!(
        claim(&mut c, "r1", 10).is_empty(),
        "an object a saved job names is never handed out"
    );
    let queued: i64 = c
        .query_one(
            "SELECT count(*) FROM orphan_cleanup.deletion_queue WHERE state IN ('pending', 'claimed')",
            &[],
        )
        .unwrap()
        .get(0);
    assert_eq!(queued, 0);
}

#[test]
fn seq05_saving_a_job_with_an_odd_spelling_rescues_the_object_or_is_refused() {
    let db = db("obj_spellings_later");
    let mut c = db.client();
    let pairs = odd_spellings(10);
    let mut orphans = Vec::new();
    for (a, _) in &pairs {
        orphans.push(orphan(&mut c, a));
    }
    assert_eq!(cycle(&mut c).2, 10);
    // The first five objects are handed out; the others stay queued.
    let handed = claim(&mut c, "r1", 5);
    assert_eq!(handed.len(), 5);
    let handed_jobs: Vec<String> = c
        .query(
            "SELECT job_id::text FROM orphan_cleanup.deletion_queue WHERE id = ANY($1)",
            &[&handed.ids],
        )
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    for ((_, b), a_job) in pairs.iter().zip(&orphans) {
        // A render cache hit: another job with the same file, spelled differently; a user saves it.
        let hit = job(
            &mut c,
            "completed",
            Some(b),
            "1 minute",
            "cache hit, odd spelling",
        );
        let result = save(&mut c, "generated_saved", &hit.0);
        if handed_jobs.contains(&a_job.0) {
            assert_eq!(code(result), REFUSED, "{b:?} names a handed-out object");
        } else {
            result.unwrap_or_else(|e| panic!("{b:?}: {e}"));
            assert_eq!(queue_row(&mut c, a_job).1, "rescued", "{b:?}");
        }
    }
    assert!(claim(&mut c, "r2", 10).is_empty());
}

#[test]
fn review_a_handed_out_job_pointed_at_a_spelling_only_the_lenient_reading_understands_stays_unsavable(
) {
    // The lenient reading may misread such a spelling (review finding): a job that was handed
    // out once keeps refusing saves while its URL is one the strict parser refuses.
    let db = db("obj_lenient_fallback");
    let mut c = db.client();
    let a = orphan(&mut c, &public_url("renders", "before.png"));
    cycle(&mut c);
    assert_eq!(claim(&mut c, "r1", 10).len(), 1);
    let odd = format!("https://{HOST}/storage/v1/object/public/renders/after pic.png");
    c.execute(
        "UPDATE render_jobs SET output_url = $1 WHERE id = $2::text::uuid",
        &[&odd, &a.0],
    )
    .unwrap();
    assert_refused(&mut c, &a);
    // Spelled so that the strict parser reads it, the new object is the job's, and it saves.
    c.execute(
        "UPDATE render_jobs SET output_url = $1 WHERE id = $2::text::uuid",
        &[&public_url("renders", "after%20pic.png"), &a.0],
    )
    .unwrap();
    save(&mut c, "generated_saved", &a.0).expect("the job names an object never handed out");
}

#[test]
fn review_detach_waits_for_a_claim_in_flight_then_refuses() {
    // detach() checked for claimed rows before it dropped the guards: a claim committing in
    // between left the reaper deleting a file that nothing guarded any more.
    let db = db_with("obj_detach_race", &[("pause_points", "claim")]);
    let mut c = db.client();
    let a = orphan(&mut c, &public_url("renders", "race.png"));
    cycle(&mut c);
    let mut holder = db.client();
    hold_pause_point(&mut holder, "claim");
    let (claimer, _) = session_in_thread(&db.name, |r| claim(r, "r1", 10).len());
    wait_paused_at(&mut c, "claim", None);
    let (detacher, pid) = session_in_thread(&db.name, |d| {
        d.query_one("SELECT orphan_cleanup.detach()", &[])
            .map(|r| r.get::<_, String>(0))
    });
    wait_until_blocked(&mut c, pid);
    release_pause_point(&mut holder, "claim");
    assert_eq!(claimer.join().unwrap(), 1);
    let e = detacher.join().unwrap().unwrap_err();
    assert!(
        db_error(&e).contains("detach() refused: 1 queue row(s) are claimed"),
        "{}",
        db_error(&e)
    );
    assert_refused(&mut c, &a);
}

#[test]
fn review_the_guards_cannot_be_disabled_while_rows_are_claimed() {
    // A bulk load or pg_restore --disable-triggers while a reaper holds claims: saves made
    // meanwhile would keep files being deleted.
    let db = db("obj_guard_watch");
    let mut c = db.client();
    let a = orphan(&mut c, &public_url("renders", "watched.png"));
    cycle(&mut c);
    let ids = claim(&mut c, "r1", 10);
    assert_eq!(ids.len(), 1);
    for sql in [
        "ALTER TABLE user_assets DISABLE TRIGGER ALL",
        "ALTER TABLE user_assets DISABLE TRIGGER orphan_cleanup_save_guard",
        "ALTER TABLE user_assets ENABLE REPLICA TRIGGER orphan_cleanup_save_guard",
        "DROP TRIGGER orphan_cleanup_save_guard ON user_assets",
        "ALTER TABLE render_jobs DISABLE TRIGGER ALL",
        "SET session_replication_role = replica; ALTER TABLE user_assets DISABLE TRIGGER ALL",
    ] {
        let e = c.batch_execute(sql).expect_err(sql);
        assert!(
            db_error(&e).contains("refused: it would leave the save guard not in force"),
            "{sql}: {}",
            db_error(&e)
        );
        c.batch_execute("RESET session_replication_role").unwrap();
    }
    assert_refused(&mut c, &a);
    // Nothing claimed: the DBA may (claims then stop until attach() puts the guards back).
    confirm(&mut c, "r1", &ids);
    exec(
        &mut c,
        "ALTER TABLE user_assets DISABLE TRIGGER ALL; ALTER TABLE user_assets ENABLE TRIGGER ALL",
    );
    assert!(claim_refusal(&mut c).contains("orphan_cleanup_save_guard"));
    c.query("SELECT * FROM orphan_cleanup.attach()", &[])
        .unwrap();
    assert_refused(&mut c, &a);
}

#[test]
fn seq03_a_hand_out_record_lives_while_a_job_names_it_and_30_days_after_and_its_end_is_audited() {
    let db = db("obj_forgotten");
    let mut c = db.client();
    let url = public_url("renders", "old.png");
    orphan(&mut c, &url);
    cycle(&mut c);
    let ids = claim(&mut c, "r1", 10);
    confirm(&mut c, "r1", &ids);
    let age = "UPDATE orphan_cleanup.objects SET last_handed_out_at = last_handed_out_at - interval '31 days',
                                              forget_at = forget_at - interval '31 days',
                                              touched_at = touched_at - interval '2 days'";
    // A render cache hit names the object: however old the hand-out, the record stays.
    let hit = job(&mut c, "completed", Some(&url), "1 minute", "cache hit");
    exec(&mut c, age);
    cycle(&mut c);
    assert_refused(&mut c, &hit);
    // Nothing names it any more, 31 days on: the record goes, and the audit log says so.
    exec(&mut c, "DELETE FROM render_jobs");
    exec(&mut c, age);
    cycle(&mut c);
    let detail: String = c
        .query_one(
            "SELECT detail FROM orphan_cleanup.audit_log WHERE action = 'forgotten'",
            &[],
        )
        .unwrap()
        .get(0);
    assert!(
        detail.contains("renders/old.png") && detail.contains("can be saved again"),
        "{detail}"
    );
    let late = job(&mut c, "completed", Some(&url), "1 minute", "much later");
    save(&mut c, "generated_saved", &late.0)
        .expect("the documented limit: 30 days with no job naming it");
}

// 16. A URL object_keys() cannot read in full (OC003, the third review of issue 14): a save and a
// job write of such a URL meet on the job's fence row, whichever comes first.

const UNREAD: &str = "OC003";

fn unreadable_url(key: &str) -> String {
    format!(
        "https://{HOST}/storage/v1/object/public/renders/{key}?pad={}",
        "a".repeat(70_000)
    )
}

#[test]
fn seq16_a_save_in_flight_makes_a_write_of_an_unreadable_url_wait_then_refuses_it() {
    let db = db("obj_unread_save_first");
    let mut c = db.client();
    let j = job(
        &mut c,
        "completed",
        Some(&public_url("renders", "u1.png")),
        "1 minute",
        "fresh",
    );
    let mut app = db.client();
    let mut tx = app.transaction().unwrap();
    tx.execute(
        "INSERT INTO user_assets (asset_type, metadata) VALUES ('generated_saved', jsonb_build_object('render_job_id', $1::text))",
        &[&j.0],
    )
    .unwrap();
    let (name, jid) = (db.name.clone(), j.0.clone());
    let (writer, pid) = session_in_thread(&name, move |w| {
        w.execute(
            "UPDATE render_jobs SET output_url = $1 WHERE id = $2::text::uuid",
            &[&unreadable_url("u1.png"), &jid],
        )
    });
    wait_until_blocked(&mut c, pid);
    tx.commit().unwrap();
    assert_eq!(code(writer.join().unwrap()), UNREAD);
}

#[test]
fn seq16_a_write_of_an_unreadable_url_in_flight_makes_the_save_wait_then_refuses_it() {
    let db = db("obj_unread_write_first");
    let mut c = db.client();
    let j = job(
        &mut c,
        "completed",
        Some(&public_url("renders", "u2.png")),
        "1 minute",
        "fresh",
    );
    let mut app = db.client();
    let mut tx = app.transaction().unwrap();
    tx.execute(
        "UPDATE render_jobs SET output_url = $1 WHERE id = $2::text::uuid",
        &[&unreadable_url("u2.png"), &j.0],
    )
    .unwrap();
    let (name, jid) = (db.name.clone(), j.0.clone());
    let (saver, pid) = session_in_thread(&name, move |s| save(s, "generated_saved", &jid));
    wait_until_blocked(&mut c, pid);
    tx.commit().unwrap();
    assert_eq!(code(saver.join().unwrap()), UNREAD);
}

#[test]
fn seq16_a_repeatable_read_save_whose_snapshot_predates_the_unreadable_write_does_not_commit() {
    let db = db("obj_unread_rr");
    let mut c = db.client();
    let j = job(
        &mut c,
        "completed",
        Some(&public_url("renders", "u3.png")),
        "1 minute",
        "fresh",
    );
    let mut app = db.client();
    let mut tx = app
        .build_transaction()
        .isolation_level(postgres::IsolationLevel::RepeatableRead)
        .start()
        .unwrap();
    tx.query_one("SELECT count(*) FROM user_assets", &[])
        .unwrap();
    c.execute(
        "UPDATE render_jobs SET output_url = $1 WHERE id = $2::text::uuid",
        &[&unreadable_url("u3.png"), &j.0],
    )
    .unwrap();
    let saved = tx.execute(
        "INSERT INTO user_assets (asset_type, metadata) VALUES ('generated_saved', jsonb_build_object('render_job_id', $1::text))",
        &[&j.0],
    );
    let err = match saved {
        Err(e) => {
            drop(tx);
            e
        }
        Ok(_) => tx.commit().expect_err("the save must not commit"),
    };
    let got = err.code().unwrap().code().to_string();
    assert!(
        got == UNREAD || got == SERIALIZATION_FAILURE,
        "{got}: {err}"
    );
    assert_eq!(code(save(&mut app, "generated_saved", &j.0)), UNREAD);
}

/// A fence row is stamped when it is written, not when its transaction began: one written by a
/// transaction open for a day was pruned by the next cycle the moment it committed, and a
/// REPEATABLE READ write of the job older than that commit then met no conflict (the fourth
/// review). The stamp must be later than the transaction's start by the time it waited.
#[test]
fn seq16_a_fence_row_is_stamped_when_written_not_when_its_transaction_began() {
    let db = db("obj_fence_stamp");
    let mut c = db.client();
    let j = job(
        &mut c,
        "completed",
        Some(&public_url("renders", "f.png")),
        "1 minute",
        "fresh",
    );
    let mut tx = c.transaction().unwrap();
    tx.batch_execute("SELECT pg_sleep(1.2)").unwrap();
    tx.execute(
        "INSERT INTO user_assets (asset_type, metadata) VALUES ('generated_saved', jsonb_build_object('render_job_id', $1::text))",
        &[&j.0],
    )
    .unwrap();
    let late: bool = tx
        .query_one(
            "SELECT touched_at >= now() + interval '1 second' FROM orphan_cleanup.job_fences WHERE job_id = $1::text::uuid",
            &[&j.0],
        )
        .unwrap()
        .get(0);
    assert!(late, "the fence row carries the transaction's start");
    tx.commit().unwrap();
}

#[test]
fn review_the_watch_applies_after_attach_returns_and_no_setting_turns_it_off() {
    // The sixth review of partitions: attach() (through _drop_guards) turned the DDL watch off
    // until its transaction ended, and the switch was a custom setting any role could SET.
    let db = db("obj_watch_after_attach");
    let mut c = db.client();
    let a = orphan(&mut c, &public_url("renders", "watched-after.png"));
    cycle(&mut c);
    assert_eq!(claim(&mut c, "r1", 10).len(), 1);
    let disable = "ALTER TABLE user_assets DISABLE TRIGGER orphan_cleanup_save_guard";
    let mut tx = c.transaction().unwrap();
    tx.query("SELECT * FROM orphan_cleanup.attach()", &[])
        .unwrap();
    let e = tx.batch_execute(disable).unwrap_err();
    assert!(
        db_error(&e).contains("refused: it would leave the save guard not in force"),
        "{}",
        db_error(&e)
    );
    tx.rollback().unwrap();
    let e = c
        .batch_execute(&format!(
            "SET pg_orphan_cleanup_internal.guards_changing = on; {disable}"
        ))
        .unwrap_err();
    assert!(
        db_error(&e).contains("refused: it would leave the save guard not in force"),
        "{}",
        db_error(&e)
    );
    assert_refused(&mut c, &a);
}
