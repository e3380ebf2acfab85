//! Roles and settings: the reaper's role can use the queue API and nothing else, PUBLIC gets
//! nothing, and no session can change a setting with SET.

use e2e::*;

fn reaper_db(name: &str) -> TestDb {
    settings(BASE_SETTINGS);
    let db = TestDb::attached(name);
    let mut c = db.client();
    c.batch_execute(
        "DO $$ BEGIN
             IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'reaper_login') THEN
                 CREATE ROLE reaper_login LOGIN IN ROLE orphan_cleanup_reaper;
             END IF;
             IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'app_user') THEN
                 CREATE ROLE app_user LOGIN;
             END IF;
         END $$;",
    )
    .unwrap();
    for i in 0..3 {
        job(
            &mut c,
            "completed",
            Some(&public_url("renders", &format!("p/{i}.png"))),
            "2 hours",
            "orphan",
        );
    }
    cycle(&mut c);
    db
}

#[test]
fn no_session_can_set_a_setting() {
    let mut c = connect("postgres");
    c.batch_execute("LOAD 'pg_orphan_cleanup'").unwrap();
    for (name, value) in [
        ("jobs_table", "public.other"),
        ("allowed_buckets", "avatars"),
        ("min_age", "0"),
        ("reaping_enabled", "on"),
    ] {
        let err = c
            .batch_execute(&format!("SET orphan_cleanup.{name} = '{value}'"))
            .unwrap_err();
        assert!(
            db_error(&err).contains("cannot be changed now"),
            "{name}: {}",
            db_error(&err)
        );
    }
    let err = c
        .batch_execute("SET orphan_cleanup.database = 'x'")
        .unwrap_err();
    assert!(
        db_error(&err).contains("cannot be changed without restarting the server"),
        "{}",
        db_error(&err)
    );
    // SHOW works for every setting.
    for name in [
        "database",
        "enabled",
        "reaping_enabled",
        "interval",
        "min_age",
        "age_column",
        "grace",
        "max_per_cycle",
        "jobs_table",
        "assets_table",
        "allowed_buckets",
        "allowed_prefixes",
        "allowed_hosts",
        "on_confirm",
        "dry_run",
        "max_attempts",
        "history_retention",
        "full_sweep_interval",
    ] {
        c.query_one(&format!("SHOW orphan_cleanup.{name}"), &[])
            .unwrap();
    }
}

#[test]
fn bad_setting_values_are_refused_with_a_message() {
    let mut c = connect("postgres");
    for (name, value, msg) in [
        (
            "interval",
            "soon",
            "invalid value for parameter \"orphan_cleanup.interval\"",
        ),
        (
            "on_confirm",
            "truncate",
            "Available values: delete, clear_url",
        ),
        (
            "allowed_hosts",
            "https://abcd.supabase.co",
            "must be a bare host",
        ),
        ("allowed_buckets", "a/b", "not a valid bucket name"),
        (
            "jobs_table",
            "public.jobs; drop table x",
            "is not a table name",
        ),
    ] {
        let err = c
            .batch_execute(&format!(
                "ALTER SYSTEM SET orphan_cleanup.{name} = '{value}'"
            ))
            .unwrap_err();
        assert!(db_error(&err).contains(msg), "{name}: {}", db_error(&err));
    }
}

#[test]
fn the_reaper_role_uses_the_queue_api_and_nothing_else() {
    let db = reaper_db("priv_reaper");
    let mut r = connect_as(&db.name, "reaper_login");
    let ids = claim(&mut r, "r1", 2);
    assert_eq!(ids.len(), 2);
    r.query(
        "SELECT * FROM orphan_cleanup.confirm('r1', $1, $2, 'deleted')",
        &[&ids.lease, &vec![ids[0]]],
    )
    .unwrap();
    r.query(
        "SELECT * FROM orphan_cleanup.fail('r1', $1, $2, 'HTTP 500', true)",
        &[&ids.lease, &vec![ids[1]]],
    )
    .unwrap();
    r.query_one(
        "SELECT orphan_cleanup.release('r1', $1, NULL, NULL)",
        &[&ids.lease],
    )
    .unwrap();
    r.query("SELECT * FROM orphan_cleanup.peek()", &[]).unwrap();
    r.query_one("SELECT * FROM orphan_cleanup.queue_status()", &[])
        .unwrap();

    for sql in [
        "SELECT count(*) FROM public.render_jobs",
        "SELECT count(*) FROM public.user_assets",
        "DELETE FROM public.render_jobs",
        "SELECT count(*) FROM orphan_cleanup.deletion_queue",
        "UPDATE orphan_cleanup.deletion_queue SET state = 'pending'",
        "SELECT * FROM orphan_cleanup.run_cycle()",
        "SELECT * FROM orphan_cleanup.attach()",
        "SELECT * FROM orphan_cleanup.cancel('{1}')",
        "SELECT orphan_cleanup.requeue_dead()",
        "SELECT orphan_cleanup.enqueue_orphans()",
        "ALTER SYSTEM SET orphan_cleanup.reaping_enabled = off",
    ] {
        let err = r.batch_execute(sql).unwrap_err();
        assert!(
            db_error(&err).contains("permission denied")
                || db_error(&err).contains("must be superuser"),
            "{sql}: {}",
            db_error(&err)
        );
    }
}

#[test]
fn public_gets_nothing() {
    let db = reaper_db("priv_public");
    let mut app = connect_as(&db.name, "app_user");
    for sql in [
        "SELECT * FROM orphan_cleanup.claim('x')",
        "SELECT * FROM orphan_cleanup.health()",
        "SELECT * FROM orphan_cleanup.audit_log",
    ] {
        let err = app.batch_execute(sql).unwrap_err();
        assert!(
            db_error(&err).contains("permission denied"),
            "{sql}: {}",
            db_error(&err)
        );
    }
    let mut c = db.client();
    let granted: Vec<String> = c
        .query(
            "SELECT p.oid::regprocedure::text FROM pg_proc p
             WHERE p.pronamespace = 'orphan_cleanup'::regnamespace
               AND has_function_privilege('app_user', p.oid, 'EXECUTE')",
            &[],
        )
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    let mut granted = granted;
    granted.sort();
    assert_eq!(
        granted,
        vec![
            "orphan_cleanup.job_ref_key(text)".to_string(),
            "orphan_cleanup.object_key(text)".to_string(),
            "orphan_cleanup.object_keys(text)".to_string()
        ],
        "only the index functions are executable by PUBLIC"
    );
    let usage: bool = c
        .query_one(
            "SELECT has_schema_privilege('app_user', 'orphan_cleanup', 'USAGE')",
            &[],
        )
        .unwrap()
        .get(0);
    assert!(!usage);
    let tables: i64 = c
        .query_one(
            "SELECT count(*) FROM pg_class WHERE relnamespace = 'orphan_cleanup'::regnamespace AND relkind IN ('r', 'S')
               AND (has_table_privilege('app_user', oid, 'SELECT') OR has_table_privilege('orphan_cleanup_reaper', oid, 'SELECT'))",
            &[],
        )
        .unwrap()
        .get(0);
    assert_eq!(tables, 0);
}

#[test]
fn the_app_can_still_write_its_tables() {
    let db = reaper_db("priv_app_writes");
    let mut c = db.client();
    c.batch_execute("GRANT ALL ON public.render_jobs, public.user_assets TO app_user")
        .unwrap();
    let mut app = connect_as(&db.name, "app_user");
    let id: String = app
        .query_one(
            "INSERT INTO render_jobs (status, output_url) VALUES ('completed', 'renders/app.png') RETURNING id::text",
            &[],
        )
        .unwrap()
        .get(0);
    save(&mut app, "generated_saved", &id)
        .expect("the save guard runs with the extension's rights");
    // Rescue works for the app's role too.
    let queued: String = app
        .query_one(
            "SELECT id::text FROM render_jobs WHERE prompt = 'orphan' LIMIT 1",
            &[],
        )
        .unwrap()
        .get(0);
    save(&mut app, "generated_saved", &queued).unwrap();
    let state: String = c
        .query_one(
            "SELECT state FROM orphan_cleanup.deletion_queue WHERE job_id = $1::text::uuid",
            &[&queued],
        )
        .unwrap()
        .get(0);
    assert_eq!(state, "rescued");
}

#[test]
fn every_security_definer_function_pins_its_search_path() {
    let db = reaper_db("priv_search_path");
    let mut c = db.client();
    let unpinned: Vec<String> = c
        .query(
            "SELECT p.oid::regprocedure::text FROM pg_proc p
             WHERE p.pronamespace = 'orphan_cleanup'::regnamespace AND p.prosecdef
               AND NOT EXISTS (SELECT 1 FROM unnest(p.proconfig) AS c WHERE c LIKE 'search_path=%')",
            &[],
        )
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert!(unpinned.is_empty(), "{unpinned:?}");
    let definers: i64 = c
        .query_one("SELECT count(*) FROM pg_proc WHERE pronamespace = 'orphan_cleanup'::regnamespace AND prosecdef", &[])
        .unwrap()
        .get(0);
    assert!(
        definers >= 20,
        "the API runs with the extension's rights: {definers}"
    );
}
