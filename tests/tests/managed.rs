//! The managed edition is the extension without native code (issue 14): the same schema, the
//! same functions with the same signatures, the same tables, columns, constraints, indexes,
//! triggers and grants. This test installs both and compares their catalogs. Any difference
//! fails it unless it is listed below as edition-specific, with the reason.

use std::collections::BTreeSet;

use e2e::*;

/// Functions only the managed edition has: the settings API and the PL/pgSQL URL parser's parts.
const MANAGED_ONLY_FUNCTIONS: &[&str] = &[
    "managed_version",
    // settings (the extension's are GUCs)
    "set_setting",
    "_setting_defs",
    "_setting_value",
    "_parse_int",
    "_parse_bool",
    "_printf_g",
    "_rust_debug",
    "_split_qualified_name",
    "_list_error",
    "_list_entries",
    "_hosts_hint",
    "_policy",
    // the URL parser's parts (the extension's are in Rust)
    "_ascii_lower",
    "_char_debug",
    "_code_point",
    "_percent_bytes",
    "_utf8",
    "_plain_authority",
    "_url_segment",
    "_url_object",
    "_parse_url",
    "_normalized_segments",
    "_lenient_keys",
    "_lenient_keys_of",
    "_max_reading",
    "_texts_read",
    "_layer_texts",
    "_embedded_readings",
    "_cuts",
    "_key_of_path",
    "_decode_once",
    "_unescape_json",
    "_layers",
    "_routes_in",
    "_markers",
    "_decode_run",
    "_utf8_escapes",
    "_unescaped",
    "_dots_resolved",
    "_canonical_url",
    "_after_authority",
    "_url_refusal",
];

/// Relations only the managed edition has.
const MANAGED_ONLY_RELATIONS: &[&str] = &["settings", "settings_pkey", "current_settings"];

/// Functions both editions have, written in Rust in the extension and in SQL or PL/pgSQL in the
/// managed edition: their language differs, and nothing else may.
const REWRITTEN: &[&str] = &[
    "parse_output_url",
    "check_output_url",
    "object_key",
    "object_keys",
    "redact_url",
    "_route_count",
    "_reading_size",
    "_config",
    "_allowed_hosts",
    "_normalize_hosts",
    "_note_refusal",
    "_take_refusals",
];

/// Functions whose security and settings differ: the managed edition runs `object_key` and
/// `object_keys` as their owner (the app's roles run it to maintain an index and have no USAGE on the schema, and it
/// calls helpers), and pins search_path on the URL functions (their helpers' cached plans are
/// kept per search_path); the extension's are C and call nothing.
const DEFINER_IN_MANAGED: &[&str] = &[
    "object_key",
    "object_keys",
    "parse_output_url",
    "check_output_url",
    "redact_url",
];

fn strings(c: &mut postgres::Client, sql: &str) -> BTreeSet<String> {
    c.query(sql, &[])
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect()
}

fn sql_array(names: &[&str]) -> String {
    format!(
        "ARRAY[{}]::name[]",
        names
            .iter()
            .map(|f| format!("'{f}'"))
            .collect::<Vec<_>>()
            .join(",")
    )
}

/// One line per function, relation, column, constraint, index, trigger and grant.
fn catalog(c: &mut postgres::Client) -> BTreeSet<String> {
    let mut all = strings(
        c,
        "SELECT format('function %s(%s) returns %s; %s; volatility %s; strict %s; parallel %s; definer %s; config %s; rows %s; acl %s',
                       p.proname, pg_get_function_identity_arguments(p.oid), pg_get_function_result(p.oid),
                       CASE WHEN p.proname = ANY ($1) THEN 'language (rewritten)' ELSE 'language ' || l.lanname END,
                       p.provolatile, p.proisstrict, p.proparallel,
                       CASE WHEN p.proname = ANY ($2) THEN 'edition-specific' ELSE p.prosecdef::text END,
                       CASE WHEN p.proname = ANY ($2) THEN 'edition-specific' ELSE p.proconfig::text END,
                       p.prorows, p.proacl)
         FROM pg_proc p JOIN pg_language l ON l.oid = p.prolang
         WHERE p.pronamespace = 'orphan_cleanup'::regnamespace"
            .replace("$1", &sql_array(REWRITTEN))
            .replace("$2", &sql_array(DEFINER_IN_MANAGED))
            .as_str(),
    );
    all.extend(strings(
        c,
        "SELECT format('relation %s kind %s; acl %s', c.relname, c.relkind, c.relacl)
         FROM pg_class c WHERE c.relnamespace = 'orphan_cleanup'::regnamespace",
    ));
    all.extend(strings(
        c,
        "SELECT format('column %s.%s %s not null %s default %s', c.relname, a.attname,
                       format_type(a.atttypid, a.atttypmod), a.attnotnull, pg_get_expr(d.adbin, d.adrelid))
         FROM pg_class c JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped
         LEFT JOIN pg_attrdef d ON d.adrelid = c.oid AND d.adnum = a.attnum
         WHERE c.relnamespace = 'orphan_cleanup'::regnamespace AND c.relkind IN ('r', 'v', 'p', 'u')",
    ));
    all.extend(strings(
        c,
        "SELECT format('constraint %s on %s: %s', conname, conrelid::regclass, pg_get_constraintdef(oid))
         FROM pg_constraint WHERE connamespace = 'orphan_cleanup'::regnamespace",
    ));
    all.extend(strings(
        c,
        "SELECT 'index ' || pg_get_indexdef(i.indexrelid)
         FROM pg_index i JOIN pg_class c ON c.oid = i.indrelid
         WHERE c.relnamespace = 'orphan_cleanup'::regnamespace",
    ));
    all.extend(strings(
        c,
        "SELECT 'trigger ' || pg_get_triggerdef(t.oid)
         FROM pg_trigger t JOIN pg_class c ON c.oid = t.tgrelid
         WHERE c.relnamespace = 'orphan_cleanup'::regnamespace AND NOT t.tgisinternal",
    ));
    all.extend(strings(
        c,
        "SELECT format('schema acl %s', nspacl) FROM pg_namespace WHERE nspname = 'orphan_cleanup'",
    ));
    all
}

/// Whether a catalog line is about something only the managed edition has.
fn managed_only(line: &str) -> bool {
    let name = line
        .split_whitespace()
        .nth(1)
        .unwrap_or("")
        .split(['(', '.'])
        .next()
        .unwrap_or("");
    let constraint_on = line.split(" on ").nth(1).unwrap_or("");
    (line.starts_with("function ") && MANAGED_ONLY_FUNCTIONS.contains(&name))
        || ((line.starts_with("relation ") || line.starts_with("column "))
            && MANAGED_ONLY_RELATIONS.contains(&name))
        || (line.starts_with("constraint ")
            && constraint_on.starts_with("orphan_cleanup.settings:"))
        || (line.starts_with("index ") && line.contains(" ON orphan_cleanup.settings "))
}

#[test]
fn both_editions_have_the_same_catalog_but_for_the_listed_differences() {
    let ext = TestDb::create("catalog_ext");
    let managed = TestDb::create_managed("catalog_managed");
    let a = catalog(&mut ext.client());
    let b = catalog(&mut managed.client());
    let only_ext: Vec<&String> = a.difference(&b).collect();
    let only_managed: Vec<&String> = b.difference(&a).filter(|l| !managed_only(l)).collect();
    assert!(
        only_ext.is_empty() && only_managed.is_empty(),
        "the editions differ.\nonly in the extension:\n  {}\nonly in the managed edition:\n  {}",
        only_ext
            .iter()
            .map(|s| s.as_str())
            .collect::<Vec<_>>()
            .join("\n  "),
        only_managed
            .iter()
            .map(|s| s.as_str())
            .collect::<Vec<_>>()
            .join("\n  ")
    );
    // The listed differences are real: each managed-only name is there.
    for f in MANAGED_ONLY_FUNCTIONS {
        assert!(
            b.iter().any(|l| l.starts_with(&format!("function {f}("))),
            "{f} listed but missing"
        );
    }
    assert!(a.len() > 200, "the catalog is read: {} lines", a.len());
}

/// The app's own roles write jobs and assets; the recommended indexes make them run
/// object_key() and job_ref_key(). They have no rights on the schema, and need none, in either
/// edition. (The managed edition's object_key() calls helpers: it failed with "permission denied
/// for schema orphan_cleanup" until it ran as its owner.)
#[test]
fn an_app_role_with_no_rights_on_the_schema_can_write_jobs_and_assets() {
    for (db, edition) in [
        (TestDb::create("app_role_ext"), "extension"),
        (TestDb::create_managed("app_role_managed"), "managed"),
    ] {
        let mut c = db.client();
        c.batch_execute(
            "DO $$ BEGIN
                 IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'app_writer') THEN
                     CREATE ROLE app_writer LOGIN;
                 END IF;
             END $$;
             GRANT INSERT, UPDATE, SELECT ON render_jobs, user_assets TO app_writer;",
        )
        .unwrap();
        let mut app = connect_as(&db.name, "app_writer");
        // An app may run with the old string syntax (review of issue 14, finding 3: the managed
        // object_key() did not compile then, and every job write failed).
        app.batch_execute("SET standard_conforming_strings = off")
            .unwrap();
        let id: String = app
            .query_one(
                "INSERT INTO render_jobs (status, output_url, prompt)
                 VALUES ('completed', 'https://abcd.supabase.co/storage/v1/object/public/renders/a b.png', 'x')
                 RETURNING id::text",
                &[],
            )
            .unwrap_or_else(|e| panic!("{edition}: {}", db_error(&e)))
            .get(0);
        app.execute(
            "INSERT INTO user_assets (asset_type, metadata, file_size) VALUES ('generated_saved', jsonb_build_object('render_job_id', $1::text), 1)",
            &[&id],
        )
        .unwrap_or_else(|e| panic!("{edition}: {}", db_error(&e)));
        app.execute(
            "UPDATE render_jobs SET output_url = 'renders/b.png' WHERE id = $1::text::uuid",
            &[&id],
        )
        .unwrap_or_else(|e| panic!("{edition}: {}", db_error(&e)));
        let e = app
            .query_one("SELECT orphan_cleanup._parse_url('renders/a.png')", &[])
            .unwrap_err();
        assert_eq!(
            e.code(),
            Some(&postgres::error::SqlState::INSUFFICIENT_PRIVILEGE),
            "{edition}"
        );
    }
}

/// Review of issue 14, finding 6: on a database that is not UTF8 the install stopped at line 978
/// with "conversion between UTF8 and SQL_ASCII is not supported". It now says what it needs.
#[test]
fn the_managed_install_names_the_encoding_it_needs() {
    let mut admin = connect("postgres");
    admin
        .batch_execute("DROP DATABASE IF EXISTS managed_ascii WITH (FORCE)")
        .unwrap();
    admin
        .batch_execute("CREATE DATABASE managed_ascii ENCODING 'SQL_ASCII' LC_COLLATE 'C' LC_CTYPE 'C' TEMPLATE template0")
        .unwrap();
    let e = connect("managed_ascii")
        .batch_execute(&managed_script())
        .unwrap_err();
    let d = e.as_db_error().unwrap();
    assert_eq!(
        d.message(),
        "pg_orphan_cleanup (managed edition) needs a UTF8 database; this one is SQL_ASCII"
    );
    assert!(d.hint().unwrap().contains("ENCODING 'UTF8'"), "{d:?}");
}

/// Runs the managed install script, which must fail; rolls its transaction back as psql and
/// migration tools do; returns the error.
fn install_fails(c: &mut postgres::Client) -> String {
    let e = db_error(&c.batch_execute(&managed_script()).unwrap_err());
    c.batch_execute("ROLLBACK").unwrap();
    e
}

/// The install script runs once per database. A second run, an older install, the extension, or
/// a schema of the same name that is not this project's: each refused by name, with what to do,
/// and nothing changed (the queue and the audit trail of an install stay as they were).
#[test]
fn the_managed_install_refuses_a_database_that_already_has_it_naming_what_to_run() {
    let db = TestDb::create_managed("managed_twice");
    let mut c = db.client();
    c.batch_execute(
        "INSERT INTO orphan_cleanup.audit_log (action, actor, detail) VALUES ('attached', 'test', 'kept')",
    )
    .unwrap();
    let audit = |c: &mut postgres::Client| -> i64 {
        c.query_one("SELECT count(*) FROM orphan_cleanup.audit_log", &[])
            .unwrap()
            .get(0)
    };
    let before = audit(&mut c);
    let e = install_fails(&mut c);
    assert!(
        e.contains(
            "pg_orphan_cleanup (managed edition) 0.2.0 is already installed in this database"
        ) && e.contains("Nothing to do: this is the same version."),
        "{e}"
    );
    // An older install (its version function says so): the hint names the upgrade file.
    c.batch_execute("CREATE OR REPLACE FUNCTION orphan_cleanup.managed_version() RETURNS text LANGUAGE sql IMMUTABLE RETURN '0.1.9'")
        .unwrap();
    let e = install_fails(&mut c);
    assert!(
        e.contains("0.1.9 is already installed")
            && e.contains("run pg_orphan_cleanup_managed--0.1.9--0.2.0.sql"),
        "{e}"
    );
    assert_eq!(audit(&mut c), before, "nothing changed");

    // The extension installed: refused, and it stays.
    let ext = TestDb::create("managed_beside_ext");
    let e = install_fails(&mut ext.client());
    assert!(
        e.contains("the pg_orphan_cleanup extension is installed in this database"),
        "{e}"
    );

    // Somebody else's schema of the same name.
    let other = TestDb::empty("managed_other_schema");
    let mut o = other.client();
    o.batch_execute("CREATE SCHEMA orphan_cleanup; CREATE TABLE orphan_cleanup.mine (x int)")
        .unwrap();
    let e = install_fails(&mut o);
    assert!(e.contains("a schema named orphan_cleanup already exists in this database, and it is not pg_orphan_cleanup's"), "{e}");
    o.query_one("SELECT count(*) FROM orphan_cleanup.mine", &[])
        .unwrap();
}

/// Every version ships the managed edition's update beside the extension's: each
/// `pg_orphan_cleanup--A--B.sql` from a version that had a managed edition (0.2.0 on) has the
/// managed update's hand-written steps, `pg_orphan_cleanup/managed/updates/A--B.sql`, from which
/// `scripts/managed.py --update-from A` builds `pg_orphan_cleanup_managed--A--B.sql` (the test
/// below proves the generator). 0.1.0 had no managed edition, so its update to 0.2.0 needs none,
/// and no managed update is due yet: this test makes the next version's due.
#[test]
fn every_update_from_a_managed_version_has_its_managed_twin() {
    let version = |v: &str| -> Vec<u32> { v.split('.').map(|n| n.parse().unwrap()).collect() };
    let first_managed = version("0.2.0");
    let sql = repo_root().join("pg_orphan_cleanup/sql");
    let updates: Vec<(String, String)> = std::fs::read_dir(&sql)
        .unwrap()
        .filter_map(|e| {
            let name = e.unwrap().file_name().into_string().unwrap();
            let versions = name
                .strip_prefix("pg_orphan_cleanup--")?
                .strip_suffix(".sql")?;
            let (a, b) = versions.split_once("--")?;
            Some((a.to_string(), b.to_string()))
        })
        .collect();
    assert!(
        updates.contains(&("0.1.0".to_string(), "0.2.0".to_string())),
        "the extension's update scripts are found: {updates:?}"
    );
    let missing: Vec<String> = updates
        .iter()
        .filter(|(a, _)| version(a) >= first_managed)
        .map(|(a, b)| format!("{a}--{b}.sql"))
        .filter(|twin| {
            !repo_root()
                .join("pg_orphan_cleanup/managed/updates")
                .join(twin)
                .exists()
        })
        .collect();
    assert!(
        missing.is_empty(),
        "the managed edition's updates are missing: {missing:?} (the extension ships an update from a version the managed edition has)"
    );
}

/// Every function's body, by signature: the catalog above leaves bodies out (the editions'
/// differ), an update must not.
fn bodies(c: &mut postgres::Client) -> BTreeSet<String> {
    strings(
        c,
        "SELECT p.oid::regprocedure::text || ' ' || md5(p.prosrc) || ' ' || md5(coalesce(pg_get_function_sqlbody(p.oid), ''))
         FROM pg_proc p WHERE p.pronamespace = 'orphan_cleanup'::regnamespace",
    )
}

/// An older build of this version, as a DBA may have installed it: with a function and an
/// overload this version dropped, and a job_ref_key() (a SQL-standard body, whose text is not in
/// prosrc) that read only hyphenated ids, so the app's index on it holds old readings. (The
/// tables it lacked are dropped once it has run: its functions would need them.)
fn older_build(script: &str) -> String {
    let start = script
        .find("CREATE FUNCTION orphan_cleanup.job_ref_key(ref text) RETURNS text")
        .unwrap();
    let ret = start + script[start..].find("RETURN ").unwrap() + "RETURN ".len();
    let end = ret + script[ret..].find(";\n").unwrap();
    let s = format!(
        "{}CASE WHEN pg_catalog.strpos(ref, '-') = 0 THEN NULL ELSE {} END{}",
        &script[..ret],
        &script[ret..end],
        &script[end..]
    );
    s.replacen(
        "COMMIT;\n",
        "CREATE FUNCTION orphan_cleanup._gone_in_this_version() RETURNS int LANGUAGE sql RETURN 1;\n\
         CREATE FUNCTION orphan_cleanup.claim(worker text) RETURNS int LANGUAGE sql RETURN 1;\nCOMMIT;\n",
        1,
    )
}

/// The managed edition's update (`scripts/managed.py --update-from A`) applied over an older
/// build gives exactly a fresh install's catalog and function bodies, keeps the queue, the
/// hand-outs, the audit trail and the settings, rebuilds the app's index whose readings changed
/// (a saved job's object is found by the new reading), and claims go on. It refuses a database
/// at another version, naming the script to run.
#[test]
fn the_managed_update_gives_a_fresh_installs_catalog_and_keeps_the_queue() {
    let fresh = TestDb::create_managed("managed_update_fresh");
    let old = TestDb::create_managed_with("managed_update_old", &older_build(&managed_script()));
    let mut c = old.client();
    for (name, value) in [
        ("allowed_buckets", "renders"),
        ("allowed_hosts", HOST),
        ("cycle_time_budget", "1h"),
    ] {
        c.query(
            "SELECT orphan_cleanup.set_setting($1, $2)",
            &[&name, &value],
        )
        .unwrap();
    }
    c.query("SELECT * FROM orphan_cleanup.attach()", &[])
        .unwrap();
    for i in 0..20 {
        job(
            &mut c,
            "completed",
            Some(&public_url("renders", &format!("u/{i}.png"))),
            "2 hours",
            "update",
        );
    }
    c.query("SELECT * FROM orphan_cleanup.run_cycle()", &[])
        .unwrap();
    let claimed = c
        .query("SELECT id FROM orphan_cleanup.claim('w1', 5)", &[])
        .unwrap()
        .len();
    assert_eq!(claimed, 5, "the older build works");
    // A job saved with its id written without hyphens: the older build's job_ref_key() read no
    // reference there, so the app's index on it holds none.
    let saved = job(
        &mut c,
        "completed",
        Some(&public_url("renders", "u/saved.png")),
        "2 hours",
        "update",
    );
    save(&mut c, "generated_saved", &saved.0.replace('-', "")).unwrap();
    let by_index = |c: &mut postgres::Client| -> i64 {
        let mut t = c.transaction().unwrap();
        t.batch_execute("SET LOCAL enable_seqscan = off").unwrap();
        t.query_one(
            "SELECT count(*) FROM user_assets WHERE orphan_cleanup.job_ref_key(metadata ->> 'render_job_id') = $1",
            &[&saved.0],
        )
        .unwrap()
        .get(0)
    };
    assert_eq!(
        by_index(&mut c),
        0,
        "the older build's index lacks the new reading"
    );
    let keep = "SELECT (SELECT jsonb_agg(d ORDER BY d.id) FROM orphan_cleanup.deletion_queue AS d)::text,
                       (SELECT count(*) FROM orphan_cleanup.audit_log)::text,
                       (SELECT jsonb_agg(o ORDER BY o.bucket, o.object_path) FROM (SELECT bucket, object_path, handouts, last_queue_id FROM orphan_cleanup.objects) AS o)::text,
                       (SELECT jsonb_agg(s ORDER BY s.name) FROM (SELECT name, value FROM orphan_cleanup.settings) AS s)::text";
    let kept = |c: &mut postgres::Client| -> Vec<String> {
        let r = c.query_one(keep, &[]).unwrap();
        (0..4).map(|i| r.get(i)).collect()
    };
    // What the older build did not have yet: a table, a column (the last of its table) and an
    // index.
    c.batch_execute(
        "DROP TABLE orphan_cleanup.busy;
         DROP INDEX orphan_cleanup.refusals_at;
         ALTER TABLE orphan_cleanup.objects DROP COLUMN forget_at;",
    )
    .unwrap();
    let before = kept(&mut c);

    // Refused at another version, naming what to run; nothing changed.
    let steps = std::env::temp_dir().join(format!("pgoc-steps-{}.sql", std::process::id()));
    std::fs::write(&steps, "-- no hand-written steps\n").unwrap();
    let steps = steps.to_str().unwrap().to_string();
    let update = managed_py(&["--update-from", "0.2.0", "--steps", &steps]);
    let other = managed_py(&["--update-from", "0.1.9", "--steps", &steps]);
    let e = db_error(&c.batch_execute(&other).unwrap_err());
    c.batch_execute("ROLLBACK").unwrap();
    assert!(
        e.contains("this script updates the managed edition from 0.1.9; this database has 0.2.0")
            && e.contains("Run pg_orphan_cleanup_managed--0.2.0--0.2.0.sql"),
        "{e}"
    );
    let bare = TestDb::empty("managed_update_bare");
    let e = db_error(&bare.client().batch_execute(&update).unwrap_err());
    assert!(
        e.contains("pg_orphan_cleanup (managed edition) is not installed in this database"),
        "{e}"
    );

    c.batch_execute(&update).unwrap();
    let mut f = fresh.client();
    let (cat_old, cat_new) = (catalog(&mut c), catalog(&mut f));
    assert_eq!(
        cat_old.symmetric_difference(&cat_new).collect::<Vec<_>>(),
        Vec::<&String>::new(),
        "the updated catalog differs from a fresh install's"
    );
    assert_eq!(
        bodies(&mut c)
            .symmetric_difference(&bodies(&mut f))
            .collect::<Vec<_>>(),
        Vec::<&String>::new(),
        "function bodies differ"
    );
    assert_eq!(
        kept(&mut c),
        before,
        "queue, audit trail, hand-outs and settings kept"
    );
    assert_eq!(
        by_index(&mut c),
        1,
        "the app's index was rebuilt with the new readings"
    );
    let more = c
        .query("SELECT id FROM orphan_cleanup.claim('w2', 100)", &[])
        .unwrap()
        .len();
    assert_eq!(more, 15, "claims go on after the update");
}
