//! The managed edition's settings (issue 14) behave as the extension's GUCs: the same names,
//! defaults, units, ranges and checks, and the same error for a bad value. Every case below is
//! given to both: `ALTER SYSTEM SET orphan_cleanup.<name>` on the extension (which validates the
//! value as a reload would) and `orphan_cleanup.set_setting(<name>, <value>)` on the managed
//! edition. A refused value must be refused by both with the same message, detail and hint; an
//! accepted one must become the same value (what `pg_settings.setting` shows after a reload).

use std::time::Duration;

use e2e::*;

/// (setting, value) pairs: valid spellings, edge cases of PostgreSQL's parsers, bad values.
const CASES: &[(&str, &str)] = &[
    ("interval", "3min"),
    ("interval", "1h"),
    ("interval", "90"),
    ("interval", "1.5min"),
    ("interval", " 10 s"),
    ("interval", "10s "),
    ("interval", "500ms"),
    ("interval", "1.7s"),
    ("interval", "2.5"),
    ("interval", "0x10"),
    ("interval", "010"),
    ("interval", "08"),
    ("interval", "1e3"),
    ("interval", "abc"),
    ("interval", ""),
    ("interval", "10 x"),
    ("interval", "10 minutes"),
    ("interval", "99999999999"),
    ("interval", "-5"),
    ("interval", "1d"),
    ("interval", "366d"),
    ("min_age", "0"),
    ("min_age", "30d"),
    ("min_age", "1 h"),
    ("grace", "10us"),
    ("grace", "-1"),
    ("cycle_time_budget", "5s"),
    ("cycle_time_budget", "100"),
    ("cycle_time_budget", "99"),
    ("cycle_time_budget", "1.5s"),
    ("cycle_time_budget", "0.5ms"),
    ("cycle_time_budget", "1min"),
    ("max_per_cycle", "10x"),
    ("max_per_cycle", "0"),
    ("max_per_cycle", "5000"),
    ("max_attempts", "1001"),
    ("max_attempts", "3"),
    ("retry_backoff", "2h"),
    ("history_retention", "7d"),
    ("history_retention", "59min"),
    ("full_sweep_interval", "0"),
    ("breaker_min_rows", "-1"),
    ("enabled", "on"),
    ("enabled", "off"),
    ("enabled", "yes"),
    ("enabled", "n"),
    ("enabled", "t"),
    ("enabled", "tr"),
    ("enabled", "o"),
    ("enabled", "of"),
    ("enabled", "1"),
    ("enabled", "0"),
    ("enabled", "2"),
    ("enabled", "true "),
    ("enabled", "TRUE"),
    ("enabled", "Of"),
    ("reaping_enabled", "false"),
    ("dry_run", "maybe"),
    ("on_confirm", "delete"),
    ("on_confirm", "CLEAR_URL"),
    ("on_confirm", "clear"),
    ("on_confirm", "drop"),
    ("breaker_factor", "2.5"),
    ("breaker_factor", "-1"),
    ("breaker_factor", "1e7"),
    ("breaker_factor", "1500000"),
    ("breaker_factor", "abc"),
    ("breaker_factor", "inf"),
    ("breaker_factor", "1e6"),
    ("breaker_factor", " 3 "),
    ("breaker_max_fraction", "0.25"),
    ("breaker_max_fraction", "1.5"),
    ("breaker_max_fraction", "2"),
    ("breaker_max_fraction", "0.0001"),
    ("breaker_max_fraction", "-0.00001"),
    ("jobs_table", "public.render_jobs"),
    ("jobs_table", "render_jobs"),
    ("jobs_table", "a.b.c"),
    ("jobs_table", "x y"),
    ("jobs_table", "\"My Schema\".\"Jobs\""),
    ("jobs_table", "1abc"),
    ("jobs_table", ""),
    ("jobs_table", "public.jobs; drop table x"),
    ("jobs_table", "Public.Render_Jobs"),
    ("assets_table", "a..b"),
    ("age_column", "completed_at"),
    ("age_column", "public.created_at"),
    ("age_column", "x-y"),
    ("allowed_buckets", "renders,thumbs"),
    ("allowed_buckets", "a/b"),
    ("allowed_buckets", " renders , "),
    ("allowed_buckets", ".."),
    ("allowed_buckets", "ren\"ders"),
    ("allowed_prefixes", "renders/,previews/"),
    ("allowed_prefixes", "/x"),
    ("allowed_prefixes", "a/../b"),
    ("allowed_prefixes", "a\\b"),
    ("allowed_hosts", "abcd.supabase.co"),
    ("allowed_hosts", "https://abcd.supabase.co"),
    ("allowed_hosts", "ABCD.supabase.co:443"),
    ("allowed_hosts", "[::1]"),
    ("allowed_hosts", "h.co:0"),
    ("allowed_hosts", "a.com, b.com"),
];

#[derive(Debug, PartialEq)]
enum Verdict {
    /// The value as `pg_settings.setting` (extension) or `set_setting()` (managed) gives it.
    Accepted(String),
    /// (message, detail, hint)
    Refused(String, Option<String>, Option<String>),
}

fn refused(e: &postgres::Error) -> Verdict {
    let d = e
        .as_db_error()
        .unwrap_or_else(|| panic!("not a server error: {e}"));
    Verdict::Refused(
        d.message().to_string(),
        d.detail().map(str::to_string),
        d.hint().map(str::to_string),
    )
}

/// The extension's verdicts: ALTER SYSTEM validates each value; the accepted ones are then read
/// back from pg_settings after a reload, one round per setting name at a time.
fn extension_verdicts() -> Vec<Verdict> {
    reset_settings();
    let mut admin = connect("postgres");
    let mut verdicts: Vec<Option<Verdict>> = Vec::new();
    let mut accepted: Vec<usize> = Vec::new();
    for (name, value) in CASES {
        match alter_system_set(&mut admin, name, value) {
            Ok(()) => {
                verdicts.push(None);
                accepted.push(verdicts.len() - 1);
            }
            Err(e) => verdicts.push(Some(refused(&e))),
        }
    }
    // Read the accepted values back: each round sets one value per setting and reloads.
    let mut rounds: Vec<Vec<usize>> = Vec::new();
    for i in accepted {
        let name = CASES[i].0;
        match rounds
            .iter_mut()
            .find(|r| r.iter().all(|&j| CASES[j].0 != name))
        {
            Some(r) => r.push(i),
            None => rounds.push(vec![i]),
        }
    }
    for round in rounds {
        admin.batch_execute("ALTER SYSTEM RESET ALL").unwrap();
        for &i in &round {
            alter_system_set(&mut admin, CASES[i].0, CASES[i].1).unwrap();
        }
        admin.batch_execute("SELECT pg_reload_conf()").unwrap();
        let mut values = Vec::new();
        wait_for(Duration::from_secs(30), "the reload", || {
            let mut c = connect("postgres");
            let loaded: i64 = c
                .query_one(
                    "SELECT count(*) FROM pg_settings WHERE sourcefile LIKE '%/postgresql.auto.conf'",
                    &[],
                )
                .unwrap()
                .get(0);
            if loaded as usize != round.len() {
                return false;
            }
            values = round
                .iter()
                .map(|&i| {
                    c.query_one(
                        "SELECT setting FROM pg_settings WHERE name = $1",
                        &[&format!("orphan_cleanup.{}", CASES[i].0)],
                    )
                    .unwrap()
                    .get::<_, String>(0)
                })
                .collect();
            true
        });
        for (&i, v) in round.iter().zip(values) {
            verdicts[i] = Some(Verdict::Accepted(v));
        }
    }
    reset_settings();
    verdicts.into_iter().map(Option::unwrap).collect()
}

fn managed_verdicts(c: &mut postgres::Client) -> Vec<Verdict> {
    CASES
        .iter()
        .map(|(name, value)| {
            match c.query_one("SELECT orphan_cleanup.set_setting($1, $2)", &[name, value]) {
                Ok(r) => Verdict::Accepted(r.get(0)),
                Err(e) => refused(&e),
            }
        })
        .collect()
}

#[test]
fn every_value_is_accepted_or_refused_as_the_extension_does() {
    let _ext = TestDb::create("settings_ext");
    let managed = TestDb::create_managed("settings_managed");
    let expected = extension_verdicts();
    let got = managed_verdicts(&mut managed.client());
    let differences: Vec<String> = CASES
        .iter()
        .zip(expected.iter().zip(&got))
        .filter(|(_, (e, g))| e != g)
        .map(|((name, value), (e, g))| {
            format!("{name} = {value:?}\n  extension: {e:?}\n  managed:   {g:?}")
        })
        .collect();
    assert!(
        differences.is_empty(),
        "{} of {} cases differ:\n{}",
        differences.len(),
        CASES.len(),
        differences.join("\n")
    );
    let refusals = expected
        .iter()
        .filter(|v| matches!(v, Verdict::Refused(..)))
        .count();
    assert!(
        refusals > 30 && refusals < CASES.len() - 30,
        "{refusals} refused: the cases cover both"
    );
}

#[test]
fn a_change_is_audited_and_only_the_owner_can_make_it() {
    let db = TestDb::create_managed("settings_owner");
    let mut c = db.client();
    let new: String = c
        .query_one(
            "SELECT orphan_cleanup.set_setting('orphan_cleanup.allowed_buckets', 'renders')",
            &[],
        )
        .unwrap()
        .get(0);
    assert_eq!(new, "renders");
    c.query_one("SELECT orphan_cleanup.set_setting('interval', '3min')", &[])
        .unwrap();
    c.query_one("SELECT orphan_cleanup.set_setting('interval', NULL)", &[])
        .unwrap();
    let audit: Vec<String> = c
        .query(
            "SELECT actor || ': ' || detail FROM orphan_cleanup.audit_log WHERE action = 'setting_changed' ORDER BY id",
            &[],
        )
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(
        audit,
        vec![
            "postgres: orphan_cleanup.allowed_buckets: '' -> 'renders'",
            "postgres: orphan_cleanup.interval: '3600' -> '180'",
            "postgres: orphan_cleanup.interval: '180' -> '3600 (the default)'",
        ]
    );
    let config: (String, i32) = c
        .query_one(
            "SELECT allowed_buckets, interval_s FROM orphan_cleanup._config()",
            &[],
        )
        .map(|r| (r.get(0), r.get(1)))
        .unwrap();
    assert_eq!(config, ("renders".to_string(), 3600));

    // An unknown name is refused, naming the settings there are.
    let e = c
        .query_one(
            "SELECT orphan_cleanup.set_setting('allowed_bucket', 'x')",
            &[],
        )
        .unwrap_err();
    let d = e.as_db_error().unwrap();
    assert_eq!(
        d.message(),
        "unrecognized configuration parameter \"orphan_cleanup.allowed_bucket\""
    );
    assert!(d.hint().unwrap().contains("allowed_buckets"), "{d:?}");

    // Another role (the reaper's, or an app role) can change nothing.
    storage::reaper_role();
    let mut other = connect_as(&db.name, "reaper_login");
    let e = other
        .query_one(
            "SELECT orphan_cleanup.set_setting('allowed_buckets', 'avatars')",
            &[],
        )
        .unwrap_err();
    assert_eq!(
        e.code(),
        Some(&postgres::error::SqlState::INSUFFICIENT_PRIVILEGE),
        "{e}"
    );
    for sql in [
        "UPDATE orphan_cleanup.settings SET value = 'avatars'",
        "INSERT INTO orphan_cleanup.settings (name, value) VALUES ('allowed_hosts', 'evil.example')",
    ] {
        let e = other.batch_execute(sql).unwrap_err();
        assert_eq!(e.code(), Some(&postgres::error::SqlState::INSUFFICIENT_PRIVILEGE), "{sql}: {e}");
    }
    // A session's own SET of the name changes nothing the queue functions read. (On this
    // cluster the extension's library is preloaded and refuses the SET itself; on a managed
    // platform it would set a placeholder.)
    let _ = c.batch_execute("SET orphan_cleanup.allowed_buckets = 'avatars'");
    let buckets: String = c
        .query_one("SELECT allowed_buckets FROM orphan_cleanup._config()", &[])
        .unwrap()
        .get(0);
    assert_eq!(buckets, "renders");
}
