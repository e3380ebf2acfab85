//! Scenario 8: a randomized history (issue 11), in the spirit of Jepsen. A seeded generator
//! drives app connections that write jobs naming a small pool of objects through every spelling
//! (public, bare, signed with tokens they refresh, authenticated, and spellings only the lenient
//! reading understands), save and unsave them at every isolation level, flip statuses, re-run,
//! re-point, delete and re-insert jobs; the worker runs a cycle every second with `min_age` 0;
//! two reapers claim with short leases, one of them stopped (SIGSTOP) past its lease and
//! resumed, the other killed (`kill -9`) and restarted; storage loses some responses after
//! deleting; a DBA cancels rows and requeues dead letters. Then a checker reads the emulator's
//! own object list and request log:
//!
//! 1. every committed asset's job's object is present;
//! 2. every object the emulator deleted was handed out by a claim before; and no save of a job
//!    naming an object committed while a hand-out of it stood: from the claim's audit row until
//!    its holder gave it back saying nothing was sent (forever, otherwise). A save counts from
//!    the moment its INSERT had run (the guard then holds the object's row), on the database's
//!    clock, so a save in flight when the claim came is checked too;
//! 3. every deletable orphan's object is gone;
//! 4. every queue row's final state is explained by its audit rows, and none is lost.
//!
//! A failure prints the seed (`HISTORY_SEED=<n>` replays the generator's choices; the
//! interleaving is the machine's) and the history of the object involved.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use e2e::chaos::*;
use e2e::storage::*;
use e2e::*;
use postgres::IsolationLevel;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::json;

use super::{reaper_run, WorkerStage};

/// The pool of objects every job names one of: few, so that jobs share objects all the time.
fn pool(n: usize) -> Vec<String> {
    (0..n)
        .map(|i| {
            if i % 4 == 0 {
                format!("h/{i} shot.png")
            } else {
                format!("h/{i}.png")
            }
        })
        .collect()
}

/// One way to write `renders/<key>` as an output_url. Two only the lenient reading understands:
/// such a job is never queued, but it keeps its object. The last four the strict parser reads as
/// *another* object than the app means (a URL that lost its scheme, quotes, a cache-busting query
/// on a bare value, the S3 endpoint): such a job keeps both.
fn spell(rng: &mut StdRng, base: &str, key: &str) -> String {
    let enc = key.replace(' ', "%20");
    let schemeless = base.split_once("://").map_or(base, |(_, rest)| rest);
    match rng.random_range(0..11) {
        7 => format!("{schemeless}/storage/v1/object/public/renders/{enc}"),
        8 => format!("'renders/{key}'"),
        9 => format!("renders/{key}?v={}", rng.random_range(0..3)),
        10 => format!("{base}/storage/v1/s3/renders/{enc}"),
        0 | 1 => format!("{base}/storage/v1/object/public/renders/{enc}"),
        2 => format!("renders/{key}"),
        3 => format!(
            "{base}/storage/v1/object/sign/renders/{enc}?token=t{}",
            rng.random::<u32>()
        ),
        4 => format!("{base}/storage/v1/object/authenticated/renders/{enc}"),
        5 => format!("{base}/storage/v1/object/renders/{enc}"),
        _ => format!("{base}/storage/v1/object/public/renders/{key}\n"),
    }
}

/// A job an app connection owns, as that connection last wrote it.
#[derive(Clone)]
struct Job {
    id: String,
    url: String,
    key: String,
}

/// A save that committed: its job, the object the job named, and the moment its INSERT had run.
struct Saved {
    job: String,
    object: String,
    held_ms: f64,
}

#[derive(Default)]
struct Tally {
    ops: AtomicU64,
    saves: AtomicU64,
    refused: AtomicU64,
    serialization: AtomicU64,
    job_writes_refused: AtomicU64,
    committed: Mutex<Vec<Saved>>,
    /// What each connection did, per object: printed when a check fails.
    log: Mutex<BTreeMap<String, Vec<String>>>,
    /// Anything but success, OC001, OC002 or 40001: a bug.
    other_errors: Mutex<Vec<String>>,
}

impl Tally {
    fn note(&self, object: &str, what: String) {
        self.log
            .lock()
            .unwrap()
            .entry(format!("renders/{object}"))
            .or_default()
            .push(what);
    }

    fn unexpected(&self, what: &str, e: &postgres::Error) {
        self.other_errors
            .lock()
            .unwrap()
            .push(format!("{what}: {}", db_error(e)));
    }
}

fn sqlstate(e: &postgres::Error) -> &str {
    e.code().map(|c| c.code()).unwrap_or("")
}

/// One app connection: `steps` operations on jobs of its own, drawn from `rng`.
fn app(n: usize, mut rng: StdRng, base: &str, keys: &[String], tally: &Tally, stop: &AtomicBool) {
    let mut c = connect("postgres");
    let mut jobs: Vec<Job> = Vec::new();
    while !stop.load(Ordering::Relaxed) {
        tally.ops.fetch_add(1, Ordering::Relaxed);
        let roll = rng.random_range(0..100);
        if jobs.is_empty() || roll < 35 {
            let key = keys[rng.random_range(0..keys.len())].clone();
            let url = spell(&mut rng, base, &key);
            let status = if rng.random_bool(0.9) {
                "completed"
            } else {
                "running"
            };
            if rng.random_bool(0.1) {
                // Rendered and saved in one transaction.
                if let Some(id) = render_and_save(&mut c, &url, tally) {
                    tally.note(&key, format!("app{n}: job {id} inserted and saved at once"));
                    jobs.push(Job { id, url, key });
                }
                continue;
            }
            match c.query_one(
                "INSERT INTO render_jobs (status, output_url, prompt) VALUES ($2, $1, 'history') RETURNING id::text",
                &[&url, &status],
            ) {
                Ok(r) => {
                    let id: String = r.get(0);
                    tally.note(&key, format!("app{n}: job {id} inserted naming it"));
                    jobs.push(Job { id, url, key });
                }
                Err(e) => tally.unexpected("insert", &e),
            }
            continue;
        }
        let i = rng.random_range(0..jobs.len());
        let j = jobs[i].clone();
        match roll {
            35..=54 => save_at(&mut c, &mut rng, n, &j, tally),
            55..=69 => {
                if let Err(e) = c.execute(
                    "DELETE FROM user_assets WHERE orphan_cleanup.job_ref_key(metadata ->> 'render_job_id') = $1",
                    &[&j.id],
                ) {
                    tally.unexpected("unsave", &e);
                }
                tally.note(&j.key, format!("app{n}: job {} unsaved", j.id));
            }
            70..=76 if j.url.contains("?token=") => {
                let url = format!(
                    "{}?token=t{}",
                    j.url.split('?').next().unwrap(),
                    rng.random::<u32>()
                );
                match c.execute(
                    "UPDATE render_jobs SET output_url = $1 WHERE id = $2::text::uuid",
                    &[&url, &j.id],
                ) {
                    Ok(_) => jobs[i].url = url,
                    Err(e) => tally.unexpected("token refresh", &e),
                }
            }
            77..=84 => {
                // Re-run (back to running) or complete again.
                let sql = if rng.random_bool(0.3) {
                    "UPDATE render_jobs SET status = 'running' WHERE id = $1::text::uuid"
                } else {
                    "UPDATE render_jobs SET status = 'completed', created_at = now() WHERE id = $1::text::uuid"
                };
                if let Err(e) = c.execute(sql, &[&j.id]) {
                    tally.unexpected("status flip", &e);
                }
            }
            85..=91 => {
                // Deleted, then inserted again with the same id and URL.
                let r = c.batch_execute("BEGIN").and_then(|_| {
                    c.execute("DELETE FROM render_jobs WHERE id = $1::text::uuid", &[&j.id])?;
                    c.execute(
                        "INSERT INTO render_jobs (id, status, output_url, prompt) VALUES ($1::text::uuid, 'completed', $2, 'history again')",
                        &[&j.id, &j.url],
                    )?;
                    c.batch_execute("COMMIT")
                });
                match r {
                    Ok(()) => {
                        tally.note(
                            &j.key,
                            format!("app{n}: job {} deleted and inserted again", j.id),
                        );
                    }
                    Err(e) => {
                        let _ = c.batch_execute("ROLLBACK");
                        if sqlstate(&e) == "OC002" {
                            // A saved job inserted again naming a handed-out object.
                            tally.job_writes_refused.fetch_add(1, Ordering::Relaxed);
                        } else {
                            tally.unexpected("delete and insert again", &e);
                        }
                    }
                }
            }
            _ => {
                // Re-pointed at another object (a cache hit on a different file).
                let key = keys[rng.random_range(0..keys.len())].clone();
                let url = spell(&mut rng, base, &key);
                match c.execute(
                    "UPDATE render_jobs SET output_url = $1 WHERE id = $2::text::uuid",
                    &[&url, &j.id],
                ) {
                    Ok(_) => {
                        tally.note(
                            &key,
                            format!("app{n}: job {} re-pointed here from {}", j.id, j.key),
                        );
                        jobs[i].url = url;
                        jobs[i].key = key;
                    }
                    Err(e) if sqlstate(&e) == "OC002" => {
                        tally.job_writes_refused.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(e) => tally.unexpected("re-point", &e),
                }
            }
        }
        std::thread::sleep(Duration::from_millis(rng.random_range(0..15)));
    }
}

/// Saves job `j` at a random isolation level. At REPEATABLE READ and SERIALIZABLE the snapshot
/// is taken first and the INSERT comes a moment later, so that claims land in between; a
/// serialization failure is retried once, at READ COMMITTED, as an app would.
fn save_at(c: &mut postgres::Client, rng: &mut StdRng, n: usize, j: &Job, tally: &Tally) {
    let level = match rng.random_range(0..3) {
        0 => IsolationLevel::ReadCommitted,
        1 => IsolationLevel::RepeatableRead,
        _ => IsolationLevel::Serializable,
    };
    let pause = Duration::from_millis(rng.random_range(0..40));
    // The id as apps write it: mostly canonical, sometimes upper-case, braced or padded.
    let reference = match rng.random_range(0..6) {
        0 => j.id.to_uppercase(),
        1 => format!("{{{}}}", j.id),
        2 => format!(" {} ", j.id),
        _ => j.id.clone(),
    };
    for attempt in 0..2 {
        tally.saves.fetch_add(1, Ordering::Relaxed);
        let level = if attempt == 0 {
            level
        } else {
            IsolationLevel::ReadCommitted
        };
        let result = (|| -> Result<f64, postgres::Error> {
            let mut tx = c.build_transaction().isolation_level(level).start()?;
            tx.query_one("SELECT count(*) FROM user_assets", &[])?;
            std::thread::sleep(pause);
            tx.execute(
                "INSERT INTO user_assets (asset_type, metadata, file_size) VALUES ('generated_saved', jsonb_build_object('render_job_id', $1::text), 1)",
                &[&reference],
            )?;
            let held: f64 = tx
                .query_one(
                    "SELECT extract(epoch FROM clock_timestamp())::float8 * 1000",
                    &[],
                )?
                .get(0);
            tx.commit()?;
            Ok(held)
        })();
        match result {
            Ok(held_ms) => {
                tally.note(
                    &j.key,
                    format!("app{n}: job {} saved ({level:?}) at {held_ms:.0}", j.id),
                );
                tally.committed.lock().unwrap().push(Saved {
                    job: j.id.clone(),
                    object: format!("renders/{}", j.key),
                    held_ms,
                });
                return;
            }
            Err(e) if sqlstate(&e) == "OC001" => {
                tally.refused.fetch_add(1, Ordering::Relaxed);
                return;
            }
            Err(e) if sqlstate(&e) == "40001" => {
                tally.serialization.fetch_add(1, Ordering::Relaxed);
            }
            Err(e) => {
                tally.unexpected("save", &e);
                return;
            }
        }
    }
}

/// Inserts a completed job and saves it in the same transaction; returns its id if it committed.
fn render_and_save(c: &mut postgres::Client, url: &str, tally: &Tally) -> Option<String> {
    let result = (|| -> Result<String, postgres::Error> {
        let mut tx = c.transaction()?;
        let id: String = tx
            .query_one(
                "INSERT INTO render_jobs (status, output_url, prompt) VALUES ('completed', $1, 'history, saved at once') RETURNING id::text",
                &[&url],
            )?
            .get(0);
        tx.execute(
            "INSERT INTO user_assets (asset_type, metadata, file_size) VALUES ('generated_saved', jsonb_build_object('render_job_id', $1::text), 1)",
            &[&id],
        )?;
        tx.commit()?;
        Ok(id)
    })();
    match result {
        Ok(id) => Some(id),
        Err(e) if sqlstate(&e) == "OC001" || sqlstate(&e) == "OC002" => {
            tally.refused.fetch_add(1, Ordering::Relaxed);
            None
        }
        Err(e) => {
            tally.unexpected("render and save", &e);
            None
        }
    }
}

/// The DBA: now and then cancels a pending row, and requeues dead letters.
fn dba(mut rng: StdRng, stop: &AtomicBool, cancelled: &AtomicU64) {
    let mut c = connect("postgres");
    while !stop.load(Ordering::Relaxed) {
        std::thread::sleep(Duration::from_millis(rng.random_range(500..1500)));
        if rng.random_bool(0.3) {
            let row = c
                .query_opt(
                    "SELECT id FROM orphan_cleanup.deletion_queue WHERE state = 'pending' ORDER BY random() LIMIT 1",
                    &[],
                )
                .unwrap();
            if let Some(r) = row {
                let id: i64 = r.get(0);
                c.query("SELECT * FROM orphan_cleanup.cancel($1)", &[&vec![id]])
                    .unwrap();
                cancelled.fetch_add(1, Ordering::Relaxed);
            }
        }
        c.query_one("SELECT orphan_cleanup.requeue_dead()", &[])
            .unwrap();
    }
}

/// Sets the flag when dropped, panicking or not.
struct StopOnDrop<'a>(&'a AtomicBool);

impl Drop for StopOnDrop<'_> {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

/// The seed: HISTORY_SEED, or a fresh one.
fn seed() -> u64 {
    std::env::var("HISTORY_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| rand::rng().random())
}

#[test]
fn chaos_8_a_randomized_history_never_deletes_a_saved_file() {
    let seed = seed();
    eprintln!("history seed {seed} (replay the generator's choices with HISTORY_SEED={seed})");
    let seconds = by_scale(25, 150) as u64;
    let apps = 4;
    let keys = pool(by_scale(80, 200));
    let st = WorkerStage::new(
        "chaos_history",
        &[
            ("min_age", "0"),
            ("breaker_factor", "0"),
            ("breaker_max_fraction", "1"),
            // A full sweep every 10 s finds re-pointed jobs behind the cursor. (Every sweep
            // audits each protected job again: every cycle would write millions of rows.)
            ("full_sweep_interval", "10s"),
            ("max_attempts", "3"),
        ],
    );
    for key in &keys {
        st.emu.upload("renders", key, b"history");
    }
    st.emu.set_faults(
        json!({"lost_response_rate": 0.05, "rate_500": 0.02, "rate_429": 0.02, "latency_ms": 5}),
    );
    let lease = 10;
    let spawn = |i: usize| {
        reaper_run(
            "postgres",
            &st.emu,
            st.logs.0.join(format!("reaper-{i}.log")),
            &[
                "--batch-size",
                "5",
                "--concurrency",
                "2",
                "--lease",
                &format!("{lease}s"),
                "--request-timeout",
                "2s",
            ],
        )
    };
    let tally = Tally::default();
    let cancelled = AtomicU64::new(0);
    let stop = AtomicBool::new(false);
    let mut master = StdRng::seed_from_u64(seed);
    let app_rngs: Vec<StdRng> = (0..apps)
        .map(|_| StdRng::seed_from_u64(master.random()))
        .collect();
    let dba_rng = StdRng::seed_from_u64(master.random());
    let stop_at = Duration::from_secs(master.random_range(2..seconds / 2));
    let kill_at = Duration::from_secs(master.random_range(seconds / 2..seconds - 2));
    st.go();
    let mut stopped = spawn(0);
    let mut killed = spawn(1);
    let mut restarts = 0;
    std::thread::scope(|s| {
        // Whatever happens below (a reaper found dead panics), the app threads stop, or the
        // scope would wait for them forever.
        let _stop = StopOnDrop(&stop);
        for (n, rng) in app_rngs.into_iter().enumerate() {
            let (base, keys, tally, stop) = (&st.emu.base, &keys, &tally, &stop);
            s.spawn(move || app(n, rng, base, keys, tally, stop));
        }
        s.spawn(|| dba(dba_rng, &stop, &cancelled));
        let started = Instant::now();
        let (mut stop_done, mut kill_done) = (false, false);
        while started.elapsed() < Duration::from_secs(seconds) {
            if !stop_done && started.elapsed() >= stop_at {
                // Stalled past its lease: a long pause, SIGSTOP, a partition from the database.
                stopped.child.signal(libc::SIGSTOP);
                std::thread::sleep(Duration::from_secs(lease + 2));
                stopped.child.signal(libc::SIGCONT);
                stop_done = true;
            }
            if !kill_done && started.elapsed() >= kill_at {
                std::mem::replace(&mut killed, spawn(2)).kill();
                restarts += 1;
                kill_done = true;
            }
            stopped.assert_running();
            killed.assert_running();
            std::thread::sleep(Duration::from_millis(200));
        }
        stop.store(true, Ordering::Relaxed);
    });

    // Quiet now: the worker queues what is left, the reapers drain it, dead letters come back.
    let mut c = connect("postgres");
    st.emu.set_faults(json!({}));
    let last_cycle = one(
        &mut c,
        "SELECT coalesce(max(id), 0) FROM orphan_cleanup.cycle_log",
    );
    wait_for(
        Duration::from_secs(180),
        "the drain, then a full sweep after it that finds nothing new",
        || {
            stopped.assert_running();
            killed.assert_running();
            c.query_one("SELECT orphan_cleanup.requeue_dead()", &[])
                .unwrap();
            unfinished(&mut c) == 0
                && one(&mut c, "SELECT count(*) FROM orphan_cleanup.deletion_queue WHERE state = 'dead'") == 0
                && one(
                    &mut c,
                    &format!(
                        "SELECT count(*) FROM orphan_cleanup.cycle_log AS l
                         WHERE l.id > {last_cycle} AND l.full_sweep AND l.status = 'ok' AND l.enqueued = 0
                           AND l.started_at > (SELECT coalesce(max(d.finished_at), '-infinity') FROM orphan_cleanup.deletion_queue AS d)"
                    ),
                ) > 0
        },
    );
    stopped.stop();
    killed.stop();

    let other = tally.other_errors.lock().unwrap().clone();
    assert!(
        other.is_empty(),
        "history seed {seed}: app operations failed unexpectedly: {other:?}"
    );
    let problems = check_history(&mut c, &st.emu, &tally, &keys);
    let o = check(&mut c, &st.emu, &Ledger::default());
    if !problems.is_empty() {
        let log = tally.log.lock().unwrap();
        let mut text = format!("history seed {seed}: {} violation(s)\n", problems.len());
        for (object, what) in problems.iter().take(5) {
            text.push_str(&format!("\n{what}\n  the object's history:\n"));
            for line in object_history(&mut c, &st.emu, object) {
                text.push_str(&format!("    {line}\n"));
            }
            for line in log.get(object).into_iter().flatten() {
                text.push_str(&format!("    {line}\n"));
            }
        }
        panic!("{text}");
    }
    let claims = handouts(&mut c).len();
    let committed = tally.committed.lock().unwrap().len();
    assert!(
        claims > 0 && committed > 0 && tally.refused.load(Ordering::Relaxed) > 0,
        "history seed {seed}: the run must hand objects out, commit saves and refuse some ({claims} hand-outs, {committed} saves)"
    );
    let deleted = st
        .emu
        .requests()
        .iter()
        .map(|r| r["deleted"].as_u64().unwrap_or(0))
        .sum::<u64>();
    record(
        Report {
            number: 8,
            scenario: "Randomized history",
            load: format!(
                "seed {seed}: {} operations over {seconds} s by {apps} app connections on {} objects (inserts in 11 spellings, token refreshes, saves and unsaves at all 3 isolation levels, status flips, re-runs, re-points, deletes and re-inserts); the worker every 1 s, `min_age` 0; two reapers with {lease} s leases",
                tally.ops.load(Ordering::Relaxed),
                keys.len()
            ),
            faults: format!(
                "one reaper SIGSTOPped for {} s (past its lease) and resumed, the other `kill -9`ed and restarted ({restarts}); 5% of responses lost after the delete, 2% HTTP 500, 2% HTTP 429; a DBA cancelling rows ({}) and requeueing dead letters",
                lease + 2,
                cancelled.load(Ordering::Relaxed)
            ),
            notes: format!(
                "{} saves attempted: {} committed, {} refused (OC001), {} serialization failures retried; {} job writes refused (OC002: a saved job pointed at a handed-out object); {deleted} objects deleted by storage, each after a claim; no save committed while a hand-out of its object stood ({claims} hand-outs checked); every saved asset's object present",
                tally.saves.load(Ordering::Relaxed),
                tally.committed.lock().unwrap().len(),
                tally.refused.load(Ordering::Relaxed),
                tally.serialization.load(Ordering::Relaxed),
                tally.job_writes_refused.load(Ordering::Relaxed),
            ),
        },
        &o,
    );
}

/// Checks 1 to 3 of the module's list (4 is `check()`'s); returns (object, what is wrong).
fn check_history(
    c: &mut postgres::Client,
    emu: &Emulator,
    tally: &Tally,
    keys: &[String],
) -> Vec<(String, String)> {
    let mut problems = Vec::new();
    let pool_objects: Vec<String> = keys.iter().map(|k| format!("renders/{k}")).collect();
    let present = emu.objects();
    // 1. Every committed asset's job's object is present: every reading of its URL that names
    //    an object of the pool (the one the app means is always one of them).
    for r in c
        .query(
            "SELECT DISTINCT j.id::text, k.object
             FROM user_assets AS a
             JOIN render_jobs AS j ON j.id::text = orphan_cleanup.job_ref_key(a.metadata ->> 'render_job_id')
             CROSS JOIN LATERAL unnest(orphan_cleanup.object_keys(j.output_url)) AS k(object)
             WHERE j.output_url IS NOT NULL AND k.object = ANY ($1)",
            &[&pool_objects],
        )
        .unwrap()
    {
        let (job, object): (String, Option<String>) = (r.get(0), r.get(1));
        if let Some(object) = object {
            if !present.contains(&object) {
                problems.push((object.clone(), format!("saved job {job} names {object}, which storage no longer has")));
            }
        }
    }
    // 2a. Every deleted object was handed out by a claim before it was deleted.
    let handouts = handouts(c);
    for entry in emu.requests() {
        let at = entry["unix_ms"].as_f64().unwrap_or(0.0);
        for object in entry["deleted_names"].as_array().into_iter().flatten() {
            let object = object.as_str().unwrap_or("").to_string();
            // The reaper's own canary, which it uploads and deletes to check an "already absent".
            if object.contains("/.pg_orphan_cleanup-probe/") {
                continue;
            }
            if !handouts
                .iter()
                .any(|h| h.object == object && h.from_ms <= at)
            {
                problems.push((
                    object.clone(),
                    format!("{object} was deleted at {at:.0} without a claim before it"),
                ));
            }
        }
    }
    // 2b. No save committed while a hand-out of its object stood.
    let committed = tally.committed.lock().unwrap();
    for h in &handouts {
        for s in committed.iter().filter(|s| {
            s.object == h.object
                && s.held_ms > h.from_ms
                && h.until_ms.is_none_or(|u| s.held_ms < u)
        }) {
            problems.push((
                h.object.clone(),
                format!(
                    "a save of job {} committed at {:.0}, while {} was handed out (row {}, claimed at {:.0}{})",
                    s.job,
                    s.held_ms,
                    h.object,
                    h.queue_id,
                    h.from_ms,
                    h.until_ms
                        .map(|u| format!(", given back unsent at {u:.0}"))
                        .unwrap_or_default()
                ),
            ));
        }
    }
    // 3. Every deletable orphan's object is gone: a completed, unsaved job whose URL the strict
    //    parser and the allow-lists accept, whose object no other job keeps, no DBA kept, and
    //    whose rows no DBA cancelled.
    for r in c
        .query(
            "WITH jobs AS (
                 SELECT j.id, orphan_cleanup.object_key(j.output_url) AS object,
                        orphan_cleanup.object_keys(j.output_url) AS readings,
                        j.status = 'completed'
                        AND NOT EXISTS (SELECT 1 FROM user_assets AS a WHERE a.metadata ->> 'render_job_id' = j.id::text) AS orphan,
                        (orphan_cleanup.check_output_url(j.output_url)).error IS NULL AS deletable
                 FROM render_jobs AS j WHERE j.output_url IS NOT NULL)
             SELECT DISTINCT o.object, o.id::text FROM jobs AS o
             WHERE o.orphan AND o.deletable
               AND NOT EXISTS (SELECT 1 FROM jobs AS k WHERE k.readings @> ARRAY[o.object] AND NOT k.orphan)
               AND NOT EXISTS (SELECT 1 FROM orphan_cleanup.objects AS ob
                               WHERE ob.bucket || '/' || ob.object_path = o.object AND ob.kept_at IS NOT NULL)
               AND NOT EXISTS (SELECT 1 FROM orphan_cleanup.deletion_queue AS d
                               WHERE d.job_id = o.id AND d.state = 'cancelled')",
            &[],
        )
        .unwrap()
    {
        let (object, job): (String, String) = (r.get(0), r.get(1));
        if present.contains(&object) {
            problems.push((object.clone(), format!("orphan job {job}'s object {object} is still in storage")));
        }
    }
    problems
}

/// One hand-out: a claim of a queue row naming `object`, from its audit row until its holder gave
/// it back saying nothing was sent (a release with "(nothing was sent)", or a refusal) before any
/// later claim of the row.
struct Handout {
    object: String,
    queue_id: i64,
    from_ms: f64,
    until_ms: Option<f64>,
}

fn handouts(c: &mut postgres::Client) -> Vec<Handout> {
    // One pass over the audit log (it has no index by queue row, and need not have one).
    let rows = c
        .query(
            "SELECT a.queue_id, d.bucket || '/' || d.object_path, a.action = 'claimed',
                    extract(epoch FROM a.at)::float8 * 1000,
                    a.action = 'released' AND (a.detail LIKE '%(nothing was sent)'
                                               OR a.detail LIKE 'refused by the reaper''s own allow-list%')
             FROM orphan_cleanup.audit_log AS a JOIN orphan_cleanup.deletion_queue AS d ON d.id = a.queue_id
             WHERE a.action IN ('claimed', 'released')
             ORDER BY a.queue_id, a.id",
            &[],
        )
        .unwrap();
    let mut out: Vec<Handout> = Vec::new();
    let mut open: Option<usize> = None;
    let mut row_of_open = -1i64;
    for r in rows {
        let (queue_id, object, claimed, at, unsent): (i64, String, bool, f64, bool) =
            (r.get(0), r.get(1), r.get(2), r.get(3), r.get(4));
        if queue_id != row_of_open {
            open = None;
        }
        if claimed {
            out.push(Handout {
                object,
                queue_id,
                from_ms: at,
                until_ms: None,
            });
            open = Some(out.len() - 1);
            row_of_open = queue_id;
        } else if unsent {
            if let Some(i) = open.take() {
                out[i].until_ms = Some(at);
            }
        }
    }
    out
}

/// What the database and storage recorded about one object.
fn object_history(c: &mut postgres::Client, emu: &Emulator, object: &str) -> Vec<String> {
    let mut lines: Vec<String> = c
        .query(
            "SELECT to_char(a.at, 'HH24:MI:SS.MS') || ' ' || a.action || ' row ' || a.queue_id || ' (' || d.state || ') by ' || a.actor
                    || coalesce(': ' || a.detail, '')
             FROM orphan_cleanup.audit_log AS a JOIN orphan_cleanup.deletion_queue AS d ON d.id = a.queue_id
             WHERE d.bucket || '/' || d.object_path = $1 ORDER BY a.id",
            &[&object],
        )
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    for e in emu.requests() {
        if e["deleted_names"]
            .as_array()
            .into_iter()
            .flatten()
            .any(|n| n == object)
        {
            lines.push(format!(
                "storage deleted it at {} ({} {})",
                e["unix_ms"], e["method"], e["status"]
            ));
        }
    }
    lines
}
