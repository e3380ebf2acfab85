//! The managed edition on a simulated managed platform (issue 14): no pg_orphan_cleanup
//! preloaded, pg_cron preloaded by the platform, the app owned by a role that is no superuser.
//! That role installs, configures, attaches and schedules the managed edition alone, as the
//! README's "Hosted Supabase and other managed PostgreSQL" section tells a new user, and the
//! reaper drains the queue as its own login role. Then the same without pg_cron: the reaper
//! runs the cycles (`reaper run --cycle-every`).

use std::collections::BTreeSet;
use std::io::{BufRead, BufReader};
use std::process::Stdio;
use std::time::Duration;

use e2e::platform::Platform;
use e2e::process::Hermetic;
use e2e::storage::{output_text, reaper, Emulator};
use e2e::*;

/// Orphans and one saved render, in storage and in the app's tables; returns the orphans'
/// objects and the saved one's.
fn renders(
    owner: &mut postgres::Client,
    emu: &Emulator,
    tag: &str,
    n: usize,
) -> (BTreeSet<String>, String) {
    let mut orphans = BTreeSet::new();
    for i in 0..n {
        let key = format!("{tag}/{i}.png");
        emu.upload("renders", &key, b"orphan");
        job(
            owner,
            "completed",
            Some(&emu.public_url("renders", &key)),
            "2 hours",
            tag,
        );
        orphans.insert(format!("renders/{key}"));
    }
    let key = format!("{tag}/saved.png");
    emu.upload("renders", &key, b"saved");
    let saved = job(
        owner,
        "completed",
        Some(&emu.public_url("renders", &key)),
        "2 hours",
        tag,
    );
    save(owner, "generated_saved", &saved.0).unwrap();
    (orphans, format!("renders/{key}"))
}

fn configure(owner: &mut postgres::Client, emu: &Emulator) {
    for (name, value) in [
        ("allowed_buckets", "renders"),
        ("allowed_hosts", emu.host.as_str()),
    ] {
        owner
            .query_one(
                "SELECT orphan_cleanup.set_setting($1, $2)",
                &[&name, &value],
            )
            .unwrap();
    }
    let checks: Vec<(String, String)> = owner
        .query("SELECT item, status FROM orphan_cleanup.attach()", &[])
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    assert!(checks.iter().all(|(_, s)| s == "ok"), "{checks:?}");
}

fn scheduler(owner: &mut postgres::Client) -> (String, String) {
    let r = owner
        .query_one(
            "SELECT status, detail FROM orphan_cleanup.health() WHERE check_name = 'scheduler'",
            &[],
        )
        .unwrap();
    (r.get(0), r.get(1))
}

fn cycles_by(owner: &mut postgres::Client, actor: &str) -> i64 {
    owner
        .query_one(
            "SELECT count(*) FROM orphan_cleanup.cycle_log WHERE actor = $1 AND status = 'ok'",
            &[&actor],
        )
        .unwrap()
        .get(0)
}

#[test]
fn the_owner_installs_schedules_with_pg_cron_and_the_reaper_deletes_only_orphans() {
    let platform = Platform::start();
    let emu = Emulator::start();
    emu.create_bucket("renders");
    let mut owner = platform.owner();
    configure(&mut owner, &emu);
    let (orphans, saved) = renders(&mut owner, &emu, "cron", 20);
    assert_eq!(scheduler(&mut owner).0, "warning", "no scheduler yet");

    owner
        .query_one(
            "SELECT cron.schedule('orphan-cleanup', '* * * * *', 'SELECT orphan_cleanup.run_cycle()')",
            &[],
        )
        .unwrap();
    let (status, detail) = scheduler(&mut owner);
    assert_eq!(status, "ok", "{detail}");
    assert!(detail.starts_with("pg_cron job"), "{detail}");
    // No superuser here: the DDL watch is not installed, and health() says what that means.
    let watch: String = owner
        .query_one(
            "SELECT detail FROM orphan_cleanup.health() WHERE check_name = 'DDL watch'",
            &[],
        )
        .unwrap()
        .get(0);
    assert!(watch.starts_with("not installed"), "{watch}");
    // pg_cron runs the job at the next minute, as app_owner.
    wait_for(Duration::from_secs(150), "a cycle run by pg_cron", || {
        cycles_by(&mut owner, "app_owner") > 0
    });
    let queued: i64 = owner
        .query_one(
            "SELECT count(*) FROM orphan_cleanup.deletion_queue WHERE state = 'pending'",
            &[],
        )
        .unwrap()
        .get(0);
    assert_eq!(queued, 20);

    let out = reaper("app", &emu, &["drain"])
        .env("DATABASE_URL", platform.reaper_url())
        .run();
    let text = output_text(&out);
    assert!(out.status.success(), "{text}");
    assert!(text.contains("deleted 20,"), "{text}");
    let objects = emu.objects();
    assert!(
        orphans.iter().all(|o| !objects.contains(o)),
        "every orphan deleted"
    );
    assert!(objects.contains(&saved), "the saved render's file stays");
    // A saved job's file is refused to the reaper's role as anywhere: it cannot write the queue.
    let mut r = platform.connect("app", "reaper_login");
    let e = r
        .batch_execute("UPDATE orphan_cleanup.deletion_queue SET state = 'pending'")
        .unwrap_err();
    assert_eq!(
        e.code(),
        Some(&postgres::error::SqlState::INSUFFICIENT_PRIVILEGE),
        "{e}"
    );
}

#[test]
fn without_pg_cron_the_reaper_runs_the_cycles_once_granted() {
    let platform = Platform::start();
    let emu = Emulator::start();
    emu.create_bucket("renders");
    let mut owner = platform.owner();
    configure(&mut owner, &emu);
    let mut proc = reaper(
        "app",
        &emu,
        &["run", "--cycle-every", "1s", "--poll-interval", "1s"],
    )
    .env("DATABASE_URL", platform.reaper_url())
    .stdout(Stdio::null())
    .stderr(Stdio::piped())
    .start();
    let (tx, rx) = std::sync::mpsc::channel();
    let err = proc.take_stderr().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(err).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    // Least privilege: the reaper's role may not run cycles until the owner grants it, and the
    // reaper says which grant.
    let mut seen = Vec::new();
    let needle = "GRANT EXECUTE ON FUNCTION orphan_cleanup.run_cycle() TO orphan_cleanup_reaper";
    while !seen.iter().any(|l: &String| l.contains(needle)) {
        let line = rx
            .recv_timeout(Duration::from_secs(60))
            .unwrap_or_else(|_| panic!("no line naming the grant:\n{}", seen.join("\n")));
        seen.push(line);
    }
    owner
        .batch_execute(
            "GRANT EXECUTE ON FUNCTION orphan_cleanup.run_cycle() TO orphan_cleanup_reaper",
        )
        .unwrap();
    let (orphans, saved) = renders(&mut owner, &emu, "every", 10);
    wait_for(Duration::from_secs(60), "the orphans to be deleted", || {
        let objects = emu.objects();
        orphans.iter().all(|o| !objects.contains(o))
    });
    assert!(
        emu.objects().contains(&saved),
        "the saved render's file stays"
    );
    assert!(cycles_by(&mut owner, "reaper_login") > 0);
    let (status, detail) = scheduler(&mut owner);
    assert_eq!(status, "ok", "{detail}");
    assert!(detail.starts_with("cycles run by reaper_login"), "{detail}");
    drop(proc);
}

/// Review of issue 14 (F1): the managed edition's functions run as their owner, here the app's
/// table owner, a role without BYPASSRLS. Under FORCE ROW LEVEL SECURITY every read of the
/// assets table saw only what the policy let through: a saved job looked unsaved, and its file
/// was queued and handed to a reaper. Now attach() refuses naming the fix, cycles and claims
/// stop, health() is critical, a save is refused rather than passed unguarded, and NO FORCE
/// puts everything back.
#[test]
fn row_level_security_over_the_owner_stops_cleanup_and_names_the_fix() {
    let platform = Platform::start();
    let emu = Emulator::start();
    emu.create_bucket("renders");
    let mut owner = platform.owner();
    configure(&mut owner, &emu);
    let (_orphans, saved) = renders(&mut owner, &emu, "rls", 3);
    owner
        .batch_execute(
            "ALTER TABLE user_assets ENABLE ROW LEVEL SECURITY;
             ALTER TABLE user_assets FORCE ROW LEVEL SECURITY;
             CREATE POLICY own_assets ON user_assets
                 USING (user_id = nullif(current_setting('app.user_id', true), '')::uuid)",
        )
        .unwrap();
    let fix = "ALTER TABLE public.user_assets NO FORCE ROW LEVEL SECURITY";
    let status: String = owner
        .query_one("SELECT status FROM orphan_cleanup.run_cycle()", &[])
        .unwrap()
        .get(0);
    assert_eq!(status, "failed");
    let e: String = owner
        .query_one(
            "SELECT error FROM orphan_cleanup.cycle_log ORDER BY id DESC LIMIT 1",
            &[],
        )
        .unwrap()
        .get(0);
    assert!(
        e.contains("row-level security on public.user_assets applies to app_owner")
            && e.contains(fix),
        "{e}"
    );
    let queued: i64 = owner
        .query_one("SELECT count(*) FROM orphan_cleanup.deletion_queue", &[])
        .unwrap()
        .get(0);
    assert_eq!(
        queued, 0,
        "nothing queued, the saved job's file least of all"
    );
    let mut r = platform.connect("app", "reaper_login");
    let e = db_error(
        &r.query("SELECT * FROM orphan_cleanup.claim('r1', 10)", &[])
            .unwrap_err(),
    );
    assert!(
        e.contains("row-level security on public.user_assets"),
        "{e}"
    );
    let (status, detail): (String, String) = {
        let row = owner
            .query_one("SELECT status, detail FROM orphan_cleanup.health() WHERE check_name = 'save guard'", &[])
            .unwrap();
        (row.get(0), row.get(1))
    };
    assert_eq!(status, "critical", "{detail}");
    let e = db_error(
        &owner
            .query("SELECT * FROM orphan_cleanup.attach()", &[])
            .unwrap_err(),
    );
    assert!(
        e.contains("attach() refused: row-level security on public.user_assets") && e.contains(fix),
        "{e}"
    );
    // A save is refused, not passed unguarded (the guard could not see the assets' rows).
    let job_id = job(
        &mut owner,
        "completed",
        Some(&emu.public_url("renders", "rls/x.png")),
        "2 hours",
        "rls",
    );
    let user = "aaaaaaaa-aaaa-aaaa-aaaa-aaaaaaaaaaaa";
    let mut t = owner.transaction().unwrap();
    t.batch_execute(&format!("SET LOCAL app.user_id = '{user}'"))
        .unwrap();
    let e = db_error(
        &t.execute(
            "INSERT INTO user_assets (user_id, asset_type, metadata)
             VALUES ($1::text::uuid, 'generated_saved', jsonb_build_object('render_job_id', $2::text))",
            &[&user, &job_id.0],
        )
        .unwrap_err(),
    );
    drop(t);
    assert!(
        e.contains(
            "pg_orphan_cleanup cannot guard this save: row-level security on public.user_assets"
        ),
        "{e}"
    );

    owner.batch_execute(fix).unwrap();
    owner
        .query("SELECT * FROM orphan_cleanup.attach()", &[])
        .unwrap();
    let enqueued: i64 = owner
        .query_one("SELECT enqueued FROM orphan_cleanup.run_cycle()", &[])
        .unwrap()
        .get(0);
    assert_eq!(
        enqueued, 4,
        "the three orphans and the job left unsaved above"
    );
    let out = reaper("app", &emu, &["drain"])
        .env("DATABASE_URL", platform.reaper_url())
        .run();
    assert!(out.status.success(), "{}", output_text(&out));
    assert!(
        emu.objects().contains(&saved),
        "the saved render's file stays"
    );
}

/// How many sessions of the platform's database wait on a lock.
fn lock_waiters(owner: &mut postgres::Client) -> i64 {
    owner
        .query_one(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND wait_event_type = 'Lock'",
            &[],
        )
        .unwrap()
        .get(0)
}

/// The sixth review (F4): the save guard looked at row-level security before it locked the jobs
/// table. A save waiting on the job's fence row (a write of that job in flight) passed the look;
/// a FORCE ROW LEVEL SECURITY committed while it waited then hid the job's row from its read, and
/// the save of a job naming a handed-out file committed. The guard now looks once both tables
/// are locked, and refuses.
#[test]
fn row_level_security_committed_while_a_save_waits_still_refuses_it() {
    let platform = Platform::start();
    let emu = Emulator::start();
    emu.create_bucket("renders");
    let mut owner = platform.owner();
    configure(&mut owner, &emu);
    let url = emu.public_url("renders", "race/x.png");
    emu.upload("renders", "race/x.png", b"x");
    job(&mut owner, "completed", Some(&url), "2 hours", "race");
    assert_eq!(
        owner
            .query_one("SELECT enqueued FROM orphan_cleanup.run_cycle()", &[])
            .unwrap()
            .get::<_, i64>(0),
        1
    );
    let mut r = platform.connect("app", "reaper_login");
    assert_eq!(
        r.query("SELECT * FROM orphan_cleanup.claim('r1', 10)", &[])
            .unwrap()
            .len(),
        1
    );

    // T0: a cache hit writes job J2 naming the handed-out file, and holds its fence row.
    let mut t0 = platform.owner();
    t0.batch_execute("BEGIN").unwrap();
    let j2: String = t0
        .query_one(
            "INSERT INTO render_jobs (status, output_url, created_at) VALUES ('completed', $1, now()) RETURNING id::text",
            &[&url],
        )
        .unwrap()
        .get(0);
    // T1: the user saves J2; it waits on the fence row.
    let saver = {
        let mut t1 = platform.owner();
        let j2 = j2.clone();
        std::thread::spawn(move || {
            t1.execute(
                "INSERT INTO user_assets (asset_type, metadata) VALUES ('generated_saved', jsonb_build_object('render_job_id', $1::text))",
                &[&j2],
            )
            .map_err(|e| db_error(&e))
        })
    };
    wait_for(
        Duration::from_secs(10),
        "the save to wait on the fence row",
        || lock_waiters(&mut owner) == 1,
    );
    // The DBA turns on row-level security for the jobs table; it waits for T0.
    let dba = {
        let mut t2 = platform.owner();
        std::thread::spawn(move || {
            t2.batch_execute(
                "ALTER TABLE render_jobs ENABLE ROW LEVEL SECURITY;
                 ALTER TABLE render_jobs FORCE ROW LEVEL SECURITY",
            )
            .unwrap()
        })
    };
    wait_for(Duration::from_secs(10), "the ALTER to wait", || {
        lock_waiters(&mut owner) == 2
    });
    t0.batch_execute("COMMIT").unwrap();
    dba.join().unwrap();
    let saved = saver.join().unwrap();
    let e = saved.expect_err("the save of a job naming a handed-out file is refused");
    assert!(
        e.contains(
            "pg_orphan_cleanup cannot guard this save: row-level security on public.render_jobs"
        ),
        "{e}"
    );
}
