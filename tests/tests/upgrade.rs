//! Upgrades: a DBA who installed a released version runs `ALTER EXTENSION pg_orphan_cleanup
//! UPDATE` and must end up with exactly what a fresh install of the new version gives, with
//! their queue and history intact. The released versions' install scripts are kept, as they
//! shipped, in `pg_orphan_cleanup/released/`.

use std::collections::BTreeSet;

use e2e::process::Hermetic;
use e2e::*;

/// Everything of the extension a DBA or the reaper can tell apart, one row per object: function
/// signatures, results, bodies, flags, settings and grants; tables, columns, defaults,
/// constraints, indexes, sequences; the extension's members and dumped tables; triggers on the
/// app's tables that call the extension's functions.
const CATALOG: &str = r#"
WITH ns AS (SELECT 'orphan_cleanup'::regnamespace AS oid),
     ext AS (SELECT oid, extconfig, extcondition FROM pg_extension WHERE extname = 'pg_orphan_cleanup')
SELECT 'function', p.oid::regprocedure::text,
       concat_ws(' | ', pg_get_function_arguments(p.oid), pg_get_function_result(p.oid), p.prokind, p.prosecdef,
                 p.provolatile, p.proparallel, p.proisstrict, p.prorows, p.proconfig::text, p.proacl::text,
                 md5(p.prosrc), md5(coalesce(pg_get_function_sqlbody(p.oid), '')))
FROM pg_proc AS p, ns WHERE p.pronamespace = ns.oid
UNION ALL
SELECT 'relation', c.relname, concat_ws(' | ', c.relkind, c.relpersistence, c.relacl::text)
FROM pg_class AS c, ns WHERE c.relnamespace = ns.oid
UNION ALL
SELECT 'column', x.relname || '.' || x.attname, x.def
FROM (SELECT c.relname, a.attname,
             concat_ws(' | ', row_number() OVER (PARTITION BY c.oid ORDER BY a.attnum), format_type(a.atttypid, a.atttypmod),
                       a.attnotnull, pg_get_expr(d.adbin, d.adrelid), a.attidentity, a.attgenerated, a.attacl::text) AS def
      FROM pg_class AS c
      JOIN ns ON c.relnamespace = ns.oid
      JOIN pg_attribute AS a ON a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped
      LEFT JOIN pg_attrdef AS d ON d.adrelid = c.oid AND d.adnum = a.attnum) AS x
UNION ALL
SELECT 'constraint', co.conrelid::regclass::text || ' ' || co.conname, pg_get_constraintdef(co.oid)
FROM pg_constraint AS co, ns WHERE co.connamespace = ns.oid
UNION ALL
SELECT 'index', i.indexrelid::regclass::text, pg_get_indexdef(i.indexrelid)
FROM pg_index AS i JOIN pg_class AS c ON c.oid = i.indexrelid, ns WHERE c.relnamespace = ns.oid
UNION ALL
SELECT 'sequence', s.seqrelid::regclass::text, concat_ws(' | ', format_type(s.seqtypid, NULL), s.seqstart, s.seqincrement, s.seqmax, s.seqmin, s.seqcache, s.seqcycle)
FROM pg_sequence AS s JOIN pg_class AS c ON c.oid = s.seqrelid, ns WHERE c.relnamespace = ns.oid
UNION ALL
SELECT 'member', pg_describe_object(d.classid, d.objid, d.objsubid), ''
FROM pg_depend AS d, ext WHERE d.refclassid = 'pg_extension'::regclass AND d.refobjid = ext.oid AND d.deptype = 'e'
UNION ALL
SELECT 'dumped', t.rel::regclass::text, coalesce(t.cond, '')
FROM ext, unnest(ext.extconfig, ext.extcondition) AS t(rel, cond)
UNION ALL
SELECT 'schema', n.nspname, n.nspacl::text FROM pg_namespace AS n, ns WHERE n.oid = ns.oid
UNION ALL
SELECT 'trigger', t.tgrelid::regclass::text || ' ' || t.tgname, pg_get_triggerdef(t.oid)
FROM pg_trigger AS t JOIN pg_proc AS p ON p.oid = t.tgfoid, ns WHERE p.pronamespace = ns.oid
UNION ALL
SELECT 'event trigger', e.evtname, concat_ws(' | ', e.evtevent, e.evtenabled, e.evttags::text, e.evtfoid::regprocedure::text)
FROM pg_event_trigger AS e JOIN pg_proc AS p ON p.oid = e.evtfoid, ns WHERE p.pronamespace = ns.oid
"#;

fn catalog(c: &mut postgres::Client) -> BTreeSet<(String, String, String)> {
    c.query(CATALOG, &[])
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect()
}

fn states(c: &mut postgres::Client) -> Vec<(String, i64)> {
    c.query(
        "SELECT state, count(*) FROM orphan_cleanup.deletion_queue GROUP BY 1 ORDER BY 1",
        &[],
    )
    .unwrap()
    .iter()
    .map(|r| (r.get(0), r.get(1)))
    .collect()
}

#[test]
fn upgrading_from_0_1_0_gives_a_fresh_installs_catalog_and_keeps_the_queue() {
    settings(BASE_SETTINGS);
    let fresh = TestDb::attached("upgrade_fresh");
    let old = TestDb::create_at("upgrade_from_0_1_0", Some("0.1.0"));
    old.attach();
    let mut c = old.client();
    let version = |c: &mut postgres::Client| -> String {
        c.query_one(
            "SELECT extversion FROM pg_extension WHERE extname = 'pg_orphan_cleanup'",
            &[],
        )
        .unwrap()
        .get(0)
    };
    assert_eq!(version(&mut c), "0.1.0");

    // A queue as 0.1.0 leaves it: three orphans queued, one claimed by a running reaper.
    for i in 0..3 {
        job(
            &mut c,
            "completed",
            Some(&public_url("renders", &format!("u/{i}.png"))),
            "2 hours",
            "orphan",
        );
    }
    assert_eq!(cycle(&mut c).2, 3);
    let buckets = vec!["renders".to_string()];
    let held: i64 = c
        .query_one(
            "SELECT id FROM orphan_cleanup.claim($1, $2, $3::text::interval, $4)",
            &[&"reaper-0.1", &1i32, &"300 seconds", &buckets],
        )
        .unwrap()
        .get(0);
    let audit_before: i64 = c
        .query_one("SELECT count(*) FROM orphan_cleanup.audit_log", &[])
        .unwrap()
        .get(0);

    c.batch_execute("ALTER EXTENSION pg_orphan_cleanup UPDATE")
        .unwrap();
    let mut f = fresh.client();
    assert_eq!(version(&mut c), version(&mut f));
    assert_ne!(version(&mut c), "0.1.0");

    let (upgraded, installed) = (catalog(&mut c), catalog(&mut f));
    let missing: Vec<_> = installed.difference(&upgraded).collect();
    let extra: Vec<_> = upgraded.difference(&installed).collect();
    assert!(
        missing.is_empty() && extra.is_empty(),
        "the upgrade differs from a fresh install\nonly in a fresh install: {missing:#?}\nonly after the upgrade: {extra:#?}"
    );

    // The queue and its history came through, and the new API works on them.
    assert_eq!(
        states(&mut c),
        vec![("claimed".to_string(), 1), ("pending".to_string(), 2)]
    );
    let audit_after: i64 = c
        .query_one("SELECT count(*) FROM orphan_cleanup.audit_log", &[])
        .unwrap()
        .get(0);
    assert_eq!(audit_after, audit_before);
    // The save guarantee holds for a row a 0.1.0 reaper holds in flight: its object counts as
    // handed out, so its job cannot be saved, nor a job that names the same object.
    let held_job: String = c
        .query_one(
            "SELECT job_id::text FROM orphan_cleanup.deletion_queue WHERE id = $1",
            &[&held],
        )
        .unwrap()
        .get(0);
    let refused = save(&mut c, "generated_saved", &held_job).unwrap_err();
    assert_eq!(refused.code().unwrap().code(), "OC001", "{refused}");
    let twin_url: String = c
        .query_one(
            "SELECT bucket || '/' || object_path FROM orphan_cleanup.deletion_queue WHERE id = $1",
            &[&held],
        )
        .unwrap()
        .get(0);
    let twin = job(
        &mut c,
        "completed",
        Some(&twin_url),
        "1 minute",
        "cache hit",
    );
    let refused = save(&mut c, "generated_saved", &twin.0).unwrap_err();
    assert_eq!(refused.code().unwrap().code(), "OC001", "{refused}");
    // The 0.1.0 reaper has no lease token: it is told to upgrade, and its row comes back when
    // its lease ends, still handed out.
    let e = c
        .query_one(
            "SELECT result FROM orphan_cleanup.confirm('reaper-0.1', ARRAY[$1::bigint], 'deleted')",
            &[&held],
        )
        .unwrap_err();
    assert!(
        db_error(&e).contains("confirm() needs the lease token that claim() returned"),
        "{}",
        db_error(&e)
    );
    c.execute(
        "UPDATE orphan_cleanup.deletion_queue SET lease_until = now() - interval '1 second' WHERE id = $1",
        &[&held],
    )
    .unwrap();
    let hosts = vec![HOST.to_string()];
    // 0.2.0 looks jobs up by every object their URL could name, through an index 0.1.0 did not
    // recommend: until the DBA builds it, claims refuse, naming the statement, and health()
    // says the same. Nothing is handed out meanwhile.
    let statement = "CREATE INDEX CONCURRENTLY render_jobs_object_keys_idx ON public.render_jobs USING gin (orphan_cleanup.object_keys(output_url)) WITH (fastupdate = off);";
    let e = c
        .query(
            "SELECT id FROM orphan_cleanup.claim('reaper-0.2', 10, '5 minutes', $1, $2, $3)",
            &[&buckets, &hosts, &HOST],
        )
        .unwrap_err();
    assert!(
        db_error(&e)
            .contains("render_jobs_object_key_idx indexes orphan_cleanup.object_key(output_url)")
            && db_error(&e).contains(statement),
        "{}",
        db_error(&e)
    );
    let health: String = c
        .query_one(
            "SELECT status || ': ' || detail FROM orphan_cleanup.health() WHERE check_name = 'index: jobs by storage object'",
            &[],
        )
        .unwrap()
        .get(0);
    assert!(
        health.starts_with("critical: ") && health.contains(statement),
        "{health}"
    );
    c.batch_execute(statement.trim_end_matches(';')).unwrap();
    let claimed = c
        .query(
            "SELECT id FROM orphan_cleanup.claim('reaper-0.2', 10, '5 minutes', $1, $2, $3)",
            &[&buckets, &hosts, &HOST],
        )
        .unwrap();
    assert_eq!(claimed.len(), 2);
    let (state, attempts): (String, i32) = c
        .query_one(
            "SELECT state, attempts FROM orphan_cleanup.deletion_queue WHERE id = $1",
            &[&held],
        )
        .map(|r| (r.get(0), r.get(1)))
        .unwrap();
    assert_eq!(
        (state.as_str(), attempts),
        ("pending", 1),
        "its lease expired"
    );
    let refused = save(&mut c, "generated_saved", &twin.0).unwrap_err();
    assert_eq!(refused.code().unwrap().code(), "OC001", "{refused}");
    let (status, _, _, _, _) = cycle(&mut c);
    assert_eq!(status, "ok");
}

#[test]
fn a_reaper_refuses_a_database_whose_extension_is_missing_or_too_old() {
    let emu = e2e::storage::Emulator::start();
    settings(BASE_SETTINGS);
    e2e::storage::reaper_role();
    let old = TestDb::create_at("upgrade_old_for_reaper", Some("0.1.0"));
    old.client()
        .batch_execute("GRANT CONNECT ON DATABASE upgrade_old_for_reaper TO orphan_cleanup_reaper")
        .unwrap();
    let out = e2e::storage::reaper(&old.name, &emu, &["drain", "--no-probe"]).run();
    let text = e2e::storage::output_text(&out);
    assert_eq!(out.status.code(), Some(2), "{text}");
    assert!(
        text.contains("pg_orphan_cleanup 0.1.0 is installed, and this reaper needs 0.2.0 or later; run ALTER EXTENSION pg_orphan_cleanup UPDATE"),
        "{text}"
    );
    // Once updated, and given the index 0.2.0 asks for, the same reaper works.
    old.client()
        .batch_execute("ALTER EXTENSION pg_orphan_cleanup UPDATE")
        .unwrap();
    old.client()
        .batch_execute("CREATE INDEX CONCURRENTLY render_jobs_object_keys_idx ON public.render_jobs USING gin (orphan_cleanup.object_keys(output_url)) WITH (fastupdate = off)")
        .unwrap();
    old.attach();
    let out = e2e::storage::reaper(&old.name, &emu, &["drain", "--no-probe"]).run();
    assert!(out.status.success(), "{}", e2e::storage::output_text(&out));

    let mut admin = connect("postgres");
    for sql in [
        "DROP DATABASE IF EXISTS upgrade_no_extension WITH (FORCE)",
        "CREATE DATABASE upgrade_no_extension",
    ] {
        admin.batch_execute(sql).unwrap();
    }
    let out = e2e::storage::reaper("upgrade_no_extension", &emu, &["drain", "--no-probe"]).run();
    let text = e2e::storage::output_text(&out);
    assert_eq!(out.status.code(), Some(2), "{text}");
    assert!(
        text.contains("pg_orphan_cleanup is not installed in this database; run CREATE EXTENSION pg_orphan_cleanup there"),
        "{text}"
    );
}

/// A 0.1.0 reaper that claims while the update runs: its claim must count as a hand-out after
/// the update, or a save of its job would commit while the reaper deletes the file.
#[test]
fn a_claim_committing_during_the_upgrade_still_refuses_the_save() {
    settings(BASE_SETTINGS);
    let old = TestDb::create_at("upgrade_racing_claim", Some("0.1.0"));
    old.attach();
    let mut c = old.client();
    let j = job(
        &mut c,
        "completed",
        Some(&public_url("renders", "race.png")),
        "2 hours",
        "orphan",
    );
    assert_eq!(cycle(&mut c).2, 1);
    let mut reaper = old.client();
    let mut tx = reaper.transaction().unwrap();
    let claimed = tx
        .query("SELECT id FROM orphan_cleanup.claim('reaper-0.1', 10)", &[])
        .unwrap();
    assert_eq!(claimed.len(), 1);
    let name = old.name.clone();
    let (update, pid) = session_in_thread(&name, move |u| {
        u.batch_execute("ALTER EXTENSION pg_orphan_cleanup UPDATE")
    });
    // The update waits for the claim in flight...
    wait_until_blocked(&mut c, pid);
    tx.commit().unwrap();
    update.join().unwrap().unwrap();
    // ...and so knows about it.
    let err = save(&mut c, "generated_saved", &j.0).unwrap_err();
    assert_eq!(err.code().unwrap().code(), "OC001", "{err}");
}

/// 0.2.0's object_key() names the object of a URL the strict parser refuses (issue 11, sequence
/// 5), where 0.1.0's returned NULL: an index built by 0.1.0 would hide such a saved job from the
/// keeper checks. The update rebuilds the jobs table's object_key() index when the table holds
/// such a URL, and leaves it alone otherwise.
#[test]
fn the_upgrade_rebuilds_the_object_key_index_when_a_url_reads_differently() {
    settings(BASE_SETTINGS);
    let filenode = |c: &mut postgres::Client| -> u32 {
        c.query_one(
            "SELECT relfilenode FROM pg_class WHERE oid = 'public.render_jobs_object_key_idx'::regclass",
            &[],
        )
        .unwrap()
        .get::<_, postgres::types::Oid>(0)
    };
    for (name, odd) in [
        ("upgrade_reindex_odd", true),
        ("upgrade_reindex_plain", false),
    ] {
        let old = TestDb::create_at(name, Some("0.1.0"));
        old.attach();
        let mut c = old.client();
        let url = if odd {
            format!("https://{HOST}/storage/v1/object/public/renders/my render.png")
        } else {
            public_url("renders", "plain.png")
        };
        let j = job(&mut c, "completed", Some(&url), "2 days", "saved");
        save(&mut c, "generated_saved", &j.0).unwrap();
        let before = filenode(&mut c);
        c.batch_execute("ALTER EXTENSION pg_orphan_cleanup UPDATE")
            .unwrap();
        let after = filenode(&mut c);
        assert_eq!(
            before != after,
            odd,
            "{name}: rebuilt only when a URL reads differently"
        );
    }
}

/// A job saved under 0.1.0 with a URL 0.2.0 cannot read in full (over 64 KiB) would protect
/// nothing it might name: the update is refused (OC003), naming the job and the fix, and goes
/// through once the URL is fixed (the fourth review).
#[test]
fn the_upgrade_refuses_while_a_saved_job_has_a_url_too_long_to_read() {
    settings(BASE_SETTINGS);
    let old = TestDb::create_at("upgrade_unread", Some("0.1.0"));
    old.attach();
    let mut c = old.client();
    let url = format!(
        "https://{HOST}/storage/v1/object/public/renders/x.png?pad={}",
        "a".repeat(70_000)
    );
    let j = job(&mut c, "completed", Some(&url), "2 days", "saved");
    save(&mut c, "generated_saved", &j.0).unwrap();
    let e = c
        .batch_execute("ALTER EXTENSION pg_orphan_cleanup UPDATE")
        .unwrap_err();
    let db_err = e.as_db_error().unwrap_or_else(|| panic!("{e}"));
    assert_eq!(db_err.code().code(), "OC003", "{}", db_err.message());
    assert!(
        db_err.message().contains(&j.0) && db_err.message().contains("65,536"),
        "{}",
        db_err.message()
    );
    assert!(db_err
        .hint()
        .unwrap()
        .contains("ALTER EXTENSION pg_orphan_cleanup UPDATE again"));
    let version: String = c
        .query_one(
            "SELECT extversion FROM pg_extension WHERE extname = 'pg_orphan_cleanup'",
            &[],
        )
        .unwrap()
        .get(0);
    assert_eq!(version, "0.1.0");
    c.execute(
        "UPDATE render_jobs SET output_url = $2 WHERE id = $1::text::uuid",
        &[&j.0, &public_url("renders", "x.png")],
    )
    .unwrap();
    c.batch_execute("ALTER EXTENSION pg_orphan_cleanup UPDATE")
        .unwrap();
}

/// A partitioned jobs table attached under 0.1.0: the update guards each partition against
/// TRUNCATE and records it (sql/partitions.sql) at once, not at the first cycle. A hand-out that
/// 0.1.0 made of an object a saved job also names (spelled so that 0.1.0 read no object in the
/// saved job's URL) does not fail the update: refusing it would not bring that file back.
#[test]
fn the_update_guards_and_records_a_partitioned_jobs_tables_partitions() {
    settings(BASE_SETTINGS);
    let old = TestDb::create_at("upgrade_partitioned", Some("0.1.0"));
    let mut c = old.client();
    c.batch_execute(PARTITIONED_JOBS).unwrap();
    c.batch_execute("CREATE INDEX ON public.render_jobs (orphan_cleanup.object_key(output_url))")
        .unwrap();
    old.attach();
    job(
        &mut c,
        "completed",
        Some(&public_url("renders", "my%20render.png")),
        "2 hours",
        "orphan",
    );
    assert_eq!(cycle(&mut c).2, 1);
    let claimed = c
        .query("SELECT id FROM orphan_cleanup.claim('reaper-0.1', 10)", &[])
        .unwrap();
    assert_eq!(claimed.len(), 1);
    // 0.1.0's strict reading refuses an unencoded space, so its guard saw no object here.
    let raw = format!("https://{HOST}/storage/v1/object/public/renders/my render.png");
    let saved = job(&mut c, "completed", Some(&raw), "2 hours", "cache hit");
    save(&mut c, "generated_saved", &saved.0).unwrap();

    c.batch_execute("ALTER EXTENSION pg_orphan_cleanup UPDATE")
        .unwrap();
    c.batch_execute(OBJECT_KEYS_INDEX).unwrap();
    let guarded: Vec<String> = c
        .query(
            "SELECT p.name FROM orphan_cleanup.job_partitions AS p
             JOIN pg_trigger AS t ON t.tgrelid = p.relid AND t.tgname = 'orphan_cleanup_truncate_guard' AND t.tgenabled = 'A'
             ORDER BY 1",
            &[],
        )
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(
        guarded,
        ["public.render_jobs_now", "public.render_jobs_old"]
    );
    let (status, detail): (String, String) = c
        .query_one(
            "SELECT status, detail FROM orphan_cleanup.health() WHERE check_name = 'reaping'",
            &[],
        )
        .map(|r| (r.get(0), r.get(1)))
        .unwrap();
    assert_eq!(status, "ok", "{detail}");
    assert_eq!(
        states(&mut c),
        vec![("claimed".to_string(), 1)],
        "the 0.1.0 claim came through"
    );
}
