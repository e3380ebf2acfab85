//! The chaos suite: the whole system under crashes, storage faults, database restarts, racing
//! saves, hostile URLs, privilege attacks and bad configuration. Each scenario runs against the
//! real cluster, the real extension, real reaper processes and the storage emulator, and ends
//! with the same checks (`e2e::chaos::check`): every orphan's object gone, every saved asset's
//! object still there, no queue row lost, every row in a final state the audit log explains.
//!
//! `make test` runs these at CI scale; `make chaos` runs them at full scale (`CHAOS_SCALE=full`)
//! and writes the results table into RELIABILITY.md.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use e2e::chaos::*;
use e2e::process::Hermetic;
use e2e::storage::*;
use e2e::*;
use rand::Rng;
use serde_json::json;

#[path = "chaos/history.rs"]
mod history;

/// A database with `orphans` old renders in the queue, 20 saved renders and an avatar (in a
/// bucket no cleanup may touch), an emulator holding all their objects, and a folder for logs.
struct Stage {
    db: TestDb,
    emu: Emulator,
    ledger: Ledger,
    logs: TempDir,
}

/// Settings every chaos stage uses: the renders bucket on the emulator's host, one cycle for the
/// whole backlog, and retries after 1 s instead of 30 s so that a scenario's retries fit in
/// minutes (the back-off's doubling and the attempt count are unchanged).
fn chaos_settings<'a>(emu: &'a Emulator, extra: &[(&'a str, &'a str)]) -> Vec<(&'a str, &'a str)> {
    let mut s = vec![
        ("allowed_buckets", "renders"),
        ("allowed_hosts", emu.host.as_str()),
        ("max_per_cycle", "100000"),
        // One cycle for the whole backlog on a slow or busy machine too: under the default 5 s
        // budget a loaded CI machine's first cycle stopped after one chunk (2,000 of 12,000).
        ("cycle_time_budget", "10min"),
        ("retry_backoff", "1s"),
    ];
    s.extend_from_slice(extra);
    s
}

fn stage(name: &str, orphans: usize, extra: &[(&str, &str)]) -> Stage {
    let emu = Emulator::start();
    settings(&chaos_settings(&emu, extra));
    let db = TestDb::attached(name);
    reaper_role();
    let mut st = Stage {
        db,
        emu,
        ledger: Ledger::default(),
        logs: TempDir::new(name),
    };
    st.emu.create_bucket("renders");
    st.emu.create_bucket("avatars");
    let mut c = st.db.client();
    let keys: Vec<String> = (0..orphans).map(|i| format!("orphan/{i}.png")).collect();
    st.ledger.renders(&mut c, &st.emu, &keys, "2 hours");
    save_new_renders(&mut st.ledger, &mut c, &st.emu, "saved", 20);
    st.ledger.keep(&st.emu, "avatars", "a.png");
    let (status, _, enqueued, _, _) = cycle(&mut c);
    assert_eq!((status.as_str(), enqueued), ("ok", orphans as i64));
    st
}

/// Renders `n` jobs and saves every one of them.
fn save_new_renders(
    ledger: &mut Ledger,
    c: &mut postgres::Client,
    emu: &Emulator,
    tag: &str,
    n: usize,
) {
    let keys: Vec<String> = (0..n).map(|i| format!("{tag}/{i}.png")).collect();
    for id in ledger.renders(c, emu, &keys, "2 hours") {
        save(c, "generated_saved", &id).unwrap();
    }
}

fn state_count(o: &Outcome, state: &str) -> i64 {
    o.states.get(state).copied().unwrap_or(0)
}

/// A `reaper run` that polls every second and skips the start-up probe (the scenarios test the
/// drain, not the key), its output in `log`.
fn reaper_run(db: &str, emu: &Emulator, log: std::path::PathBuf, args: &[&str]) -> Running {
    let mut all = vec!["run", "--poll-interval", "1s", "--no-probe"];
    all.extend_from_slice(args);
    Running::spawn(reaper(db, emu, &all), log)
}

#[test]
fn chaos_1_a_crash_loop_of_kill_9s_loses_nothing() {
    let n = by_scale(6_000, 20_000);
    let kills = 20;
    let st = stage("chaos_crash", n, &[]);
    let mut c = st.db.client();
    // Storage as far away as a real one (the kills below do not depend on it: the gate times them).
    st.emu.set_faults(json!({"latency_ms": 30}));
    let spawn = |i: usize| {
        reaper_run(
            &st.db.name,
            &st.emu,
            st.logs.0.join(format!("reaper-{i}.log")),
            &[
                "--batch-size",
                "100",
                "--concurrency",
                "2",
                "--lease",
                "10s",
                "--request-timeout",
                "5s",
            ],
        )
    };
    let mut reapers = vec![spawn(0), spawn(1)];
    let mut rng = rand::rng();
    // Kills spread over the drain, each one while a bulk delete is held at the emulator's gate:
    // mid-drain by construction, however fast or slow the machine is. Before the k-th kill the
    // gate lets a random share of about 1/23 of the drain's requests through. The drain needs at
    // least n/100 requests and the kills let fewer through, so a request always reaches the gate.
    let requests = n / 100;
    let mut held = 0;
    for k in 0..kills {
        st.emu
            .gate(rng.random_range(1..=(requests / (kills + 3)).max(1)) as u64);
        held = st.emu.wait_for_held(held);
        reapers.iter_mut().for_each(Running::assert_running);
        let victim = rng.random_range(0..2);
        reapers.remove(victim).kill();
        reapers.insert(victim, spawn(kills + k));
    }
    st.emu.open_gate();
    // The claims the killed reapers held come back when their leases run out (an attempt
    // each) and the survivors finish them.
    wait_for(Duration::from_secs(300), "the drain to finish", || {
        unfinished(&mut c) == 0
    });
    for r in reapers {
        r.stop();
    }
    let expired = one(
        &mut c,
        "SELECT count(*) FROM orphan_cleanup.audit_log WHERE action = 'failed' AND detail LIKE 'lease expired%'",
    );
    let o = check(&mut c, &st.emu, &st.ledger);
    assert!(expired > 0, "some claims came back through lease expiry");
    record(
        Report {
            number: 1,
            scenario: "Crash loop",
            load: format!("{n} orphans, 20 saved, 1 protected; two reapers draining at once"),
            faults: format!("{kills} `kill -9`s, each while a bulk delete was in flight (held at the emulator's gate), of a random one of the two reapers, restarted at once; 10 s leases; 30 ms storage latency"),
            notes: format!(
                "{} rows came back through expired leases; {} confirmed deleted, {} confirmed already absent (deleted by a reaper killed before it confirmed)",
                expired,
                state_count(&o, "deleted"),
                state_count(&o, "absent")
            ),
        },
        &o,
    );
}

/// The ids in the reaper's "rows dead-lettered" log lines.
fn dead_letters_logged(log: &str) -> BTreeSet<i64> {
    log.lines()
        .filter(|l| l.contains("rows dead-lettered"))
        .filter_map(|l| {
            let ids = l.split("ids=[").nth(1)?.split(']').next()?;
            Some(
                ids.split(',')
                    .filter_map(|x| x.trim().parse().ok())
                    .collect::<Vec<i64>>(),
            )
        })
        .flatten()
        .collect()
}

#[test]
fn chaos_2_storage_faults_are_retried_until_the_drain_completes() {
    let n = by_scale(5_000, 20_000);
    // Two attempts only, so that some rows do run out of them under these fault rates.
    let max_attempts = 2;
    let st = stage("chaos_storage", n, &[("max_attempts", "2")]);
    let mut c = st.db.client();
    st.emu.set_faults(json!({
        "rate_500": 0.10, "rate_429": 0.05, "hang_rate": 0.02, "lost_response_rate": 0.01,
        "spike_rate": 0.05, "spike_ms": 1500, "latency_ms": 5
    }));
    st.emu.clear_requests();
    let mut r = reaper_run(
        &st.db.name,
        &st.emu,
        st.logs.0.join("reaper.log"),
        &[
            "--batch-size",
            "50",
            "--concurrency",
            "4",
            "--request-timeout",
            "2s",
            "--lease",
            "1m",
        ],
    );
    wait_for(
        Duration::from_secs(900),
        "the drain under faults to finish",
        || {
            r.assert_running();
            unfinished(&mut c) == 0
        },
    );
    let log = r.stop();
    let requests = st.emu.requests();
    let faulted = requests
        .iter()
        .filter(|r| r["status"].as_u64().is_some_and(|s| s >= 400))
        .count();

    // Dead letters: only rows that really ran out of attempts, each with its last error, each
    // named in the reaper's log.
    let dead: Vec<(i64, i32, Option<String>)> = c
        .query(
            "SELECT id, attempts, last_error FROM orphan_cleanup.deletion_queue WHERE state = 'dead' ORDER BY id",
            &[],
        )
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect();
    let logged = dead_letters_logged(&log);
    for (id, attempts, last_error) in &dead {
        assert_eq!(
            *attempts, max_attempts,
            "row {id} was dead-lettered before its attempts ran out"
        );
        let e = last_error.as_deref().unwrap_or("");
        assert!(
            e.contains("500")
                || e.contains("timed out")
                || e.contains("timeout")
                || e.contains("544"),
            "row {id}'s last error names the fault: {e:?}"
        );
        assert!(
            logged.contains(id),
            "row {id}'s dead letter is in the reaper's log"
        );
    }
    // Once storage is healthy again, the DBA requeues the dead letters and they are deleted too.
    st.emu.set_faults(json!({}));
    let requeued = one(&mut c, "SELECT orphan_cleanup.requeue_dead()");
    assert_eq!(requeued, dead.len() as i64);
    if requeued > 0 {
        let out = reaper(&st.db.name, &st.emu, &["drain", "--no-probe"]).run();
        assert!(out.status.success(), "{}", output_text(&out));
    }
    let absent = one(
        &mut c,
        "SELECT count(*) FROM orphan_cleanup.deletion_queue WHERE state = 'absent'",
    );
    let retried = one(
        &mut c,
        "SELECT count(*) FROM orphan_cleanup.audit_log WHERE action = 'failed'",
    );
    let released = one(
        &mut c,
        "SELECT count(*) FROM orphan_cleanup.audit_log WHERE action = 'released'",
    );
    let o = check(&mut c, &st.emu, &st.ledger);
    record(
        Report {
            number: 2,
            scenario: "Storage faults",
            load: format!("{n} orphans, 20 saved, 1 protected; one reaper, 4 requests of 50 names in flight; `max_attempts` 2"),
            faults: "10% HTTP 500, 5% HTTP 429, 2% hanging requests (2 s timeout), 1% responses lost after the delete, 5% latency spikes of 1.5 s".into(),
            notes: format!(
                "{} storage requests, {faulted} answered with an error; {retried} failed attempts retried; {released} rows handed back without an attempt (after a 429); {} dead letters, each after {max_attempts} attempts with its last error, named in the reaper's log, then requeued and deleted; {absent} confirmed absent (the lost responses)",
                requests.len(),
                dead.len()
            ),
        },
        &o,
    );
}

/// The hostile corpus, with `{HOST}` replaced by the host the test allows.
fn hostile_corpus(host: &str) -> Vec<(String, String)> {
    let text = std::fs::read_to_string(repo_root().join("tests/corpus/hostile_urls.txt")).unwrap();
    let mut group = String::new();
    let mut out = Vec::new();
    for line in text.lines() {
        if let Some(g) = line.strip_prefix("# ") {
            group = g.to_string();
        } else if !line.trim().is_empty() && !line.starts_with('#') {
            let v: String = serde_json::from_str(line).unwrap();
            out.push((group.clone(), v.replace("{HOST}", host)));
        }
    }
    out
}

#[test]
fn chaos_5_hostile_urls_are_rejected_with_a_reason_and_never_sent() {
    let emu = Emulator::start();
    settings(&chaos_settings(&emu, &[]));
    let db = TestDb::attached("chaos_hostile");
    reaper_role();
    let mut c = db.client();
    for b in ["renders", "avatars", "private"] {
        emu.create_bucket(b);
    }
    let mut ledger = Ledger::default();
    // Bait: the objects the hostile values point at, or near. None may go.
    for (bucket, key) in [
        ("renders", "a.png"),
        ("renders", "b.png"),
        ("renders", "x/a.png"),
        ("renders", "a/b.png"),
        ("avatars", "a.png"),
        ("private", "secret.png"),
        ("renders", "ab.png"),
        ("renders", "dir/a.png"),
    ] {
        ledger.keep(&emu, bucket, key);
    }
    // A control group of real orphans, deleted in the same run.
    let control: Vec<String> = (0..20).map(|i| format!("control/{i}.png")).collect();
    ledger.renders(&mut c, &emu, &control, "2 hours");
    save_new_renders(&mut ledger, &mut c, &emu, "saved", 5);

    let corpus = hostile_corpus(&emu.host);
    assert!(corpus.len() >= 200, "the corpus holds at least 200 values");
    let mut jobs = Vec::new();
    for (group, url) in &corpus {
        let id = job(&mut c, "completed", Some(url), "2 hours", "hostile");
        jobs.push((group.clone(), url.clone(), id));
    }
    let (status, _, enqueued, _, rejected) = cycle(&mut c);
    assert_eq!(status, "ok");
    assert_eq!(
        enqueued,
        control.len() as i64,
        "only the control group is queued"
    );

    // Each hostile value: exactly one queue row, rejected, with a reason.
    let mut reasons: BTreeMap<String, usize> = BTreeMap::new();
    let mut wrong = Vec::new();
    for (group, url, id) in &jobs {
        let rows: Vec<(String, Option<String>)> = c
            .query(
                "SELECT state, reason FROM orphan_cleanup.deletion_queue WHERE job_id = $1::text::uuid",
                &[&id.0],
            )
            .unwrap()
            .iter()
            .map(|r| (r.get(0), r.get(1)))
            .collect();
        match rows.as_slice() {
            [(state, Some(reason))] if state == "rejected" && !reason.trim().is_empty() => {
                // The message without its figures (lengths, code points): alike reasons count once.
                let shape: String = reason.chars().filter(|c| !c.is_ascii_digit()).collect();
                *reasons.entry(shape).or_default() += 1;
            }
            other => wrong.push(format!(
                "[{group}] {:?}: {other:?}",
                url.chars().take(120).collect::<String>()
            )),
        }
    }
    assert!(
        wrong.is_empty(),
        "{} hostile values were not rejected with a reason:\n{}",
        wrong.len(),
        wrong.join("\n")
    );
    assert_eq!(rejected, corpus.len() as i64);

    emu.clear_requests();
    let out = reaper(&db.name, &emu, &["drain", "--no-probe"]).run();
    assert!(out.status.success(), "{}", output_text(&out));
    // Storage saw the control group's 20 names and nothing else: every request a bulk delete
    // in the renders bucket, 20 names in all, 20 objects deleted (the control group, as the
    // ledger's check below confirms).
    let requests = emu.requests();
    assert!(
        requests
            .iter()
            .all(|r| r["method"] == "DELETE" && r["path"] == "/storage/v1/object/renders"),
        "only bulk deletes in the renders bucket: {requests:?}"
    );
    let names: u64 = requests.iter().map(|r| r["names"].as_u64().unwrap()).sum();
    let deleted: u64 = requests
        .iter()
        .map(|r| r["deleted"].as_u64().unwrap())
        .sum();
    assert_eq!(
        (names, deleted),
        (control.len() as u64, control.len() as u64)
    );
    let o = check(&mut c, &emu, &ledger);
    let groups: BTreeSet<&str> = corpus.iter().map(|(g, _)| g.as_str()).collect();
    record(
        Report {
            number: 5,
            scenario: "Hostile URLs",
            load: format!(
                "{} hostile `output_url` values in {} groups (tests/corpus/hostile_urls.txt), next to 20 real orphans, 5 saved renders and 8 bait objects",
                corpus.len(),
                groups.len()
            ),
            faults: "other hosts and buckets, `..` and `%2e%2e`, encoded slashes, empty keys, folders, query tricks, unicode, values up to 100 kB, `%00`, whitespace, `javascript:` and `file:`".into(),
            notes: format!(
                "all {} rejected by the cycle with a reason ({} different messages), none sent to storage; the 20 real orphans deleted; the URL parser's proptest properties run 2,000 cases each in `make test`",
                corpus.len(),
                reasons.len()
            ),
        },
        &o,
    );
}

/// The background worker works in the `postgres` database (`orphan_cleanup.database`), so the
/// scenarios that need it stage their world there. Cycles wait until `go()` turns them on.
struct WorkerStage {
    emu: Emulator,
    ledger: Ledger,
    logs: TempDir,
    settings: Vec<(String, String)>,
}

impl WorkerStage {
    fn new(name: &str, extra: &[(&str, &str)]) -> WorkerStage {
        let emu = Emulator::start();
        let all: Vec<(String, String)> = chaos_settings(&emu, &[("interval", "1s")])
            .iter()
            .chain(extra)
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let st = WorkerStage {
            emu,
            ledger: Ledger::default(),
            logs: TempDir::new(name),
            settings: all,
        };
        st.apply(&[("enabled", "off")]);
        // The worker must have seen `enabled = off` before the app appears in its database.
        wait_worker(&mut connect("postgres"), "paused");
        setup_postgres_db();
        reaper_role();
        st.emu.create_bucket("renders");
        st.emu.create_bucket("avatars");
        st
    }

    fn apply(&self, more: &[(&str, &str)]) {
        let mut s: Vec<(&str, &str)> = self
            .settings
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        s.extend_from_slice(more);
        settings(&s);
    }

    /// Turns the worker's cycles on.
    fn go(&self) {
        self.apply(&[]);
    }
}

impl Drop for WorkerStage {
    fn drop(&mut self) {
        if !std::thread::panicking() {
            teardown_postgres_db(&mut connect("postgres"));
        }
    }
}

/// Terminates backend `pid` and waits until it is gone.
fn terminate(c: &mut postgres::Client, pid: i32) {
    let killed: bool = c
        .query_one("SELECT pg_terminate_backend($1)", &[&pid])
        .unwrap()
        .get(0);
    assert!(killed, "backend {pid} was there to terminate");
    wait_for(
        Duration::from_secs(30),
        "the terminated backend to be gone",
        || {
            one(
                c,
                &format!("SELECT count(*) FROM pg_stat_activity WHERE pid = {pid}"),
            ) == 0
        },
    );
}

fn queued(c: &mut postgres::Client) -> i64 {
    one(c, "SELECT count(*) FROM orphan_cleanup.deletion_queue")
}

#[test]
fn chaos_3_database_restarts_and_killed_backends_lose_nothing() {
    let n = by_scale(10_000, 20_000);
    let wave = by_scale(4_000, 10_000);
    // The breaker is off here: a wave of new orphans is what it exists to stop, and its own
    // tests (tests/tests/breaker.rs) cover it.
    let mut st = WorkerStage::new(
        "chaos_database",
        &[
            ("breaker_factor", "0"),
            ("breaker_max_fraction", "1"),
            ("pause_points", "cycle"),
        ],
    );
    let mut c = connect("postgres");
    // The throwaway cluster runs with synchronous_commit = off; the app's saves here must survive
    // the power cut below, as they would on a production server.
    c.batch_execute("SET synchronous_commit = on").unwrap();
    let keys: Vec<String> = (0..n).map(|i| format!("orphan/{i}.png")).collect();
    st.ledger.renders(&mut c, &st.emu, &keys, "2 hours");
    save_new_renders(&mut st.ledger, &mut c, &st.emu, "saved", 20);
    st.ledger.keep(&st.emu, "avatars", "a.png");

    // 1. A power cut in the middle of the worker's first cycle over the backlog: the test holds
    //    the cycle's pause point, so the cycle waits there with its rows queued but not
    //    committed, and the crash comes while it waits.
    let mut gatekeeper = connect("postgres");
    hold_pause_point(&mut gatekeeper, "cycle");
    st.go();
    wait_paused_at(&mut c, "cycle", None);
    cluster("crash");
    drop(gatekeeper);
    let mut c = connect("postgres");
    assert_eq!(queued(&mut c), 0, "the crashed cycle left nothing behind");
    wait_for(
        Duration::from_secs(120),
        "the worker to redo the cycle after crash recovery",
        || queued(&mut c) == n as i64,
    );

    // 2. A restart in the middle of a drain: the emulator's gate lets a third of the drain's
    //    bulk deletes through and holds the next one, in flight, while the cluster restarts.
    st.emu.set_faults(json!({"latency_ms": 20}));
    let third = (n / 100 / 3) as u64;
    st.emu.gate(third);
    let mut r = reaper_run(
        "postgres",
        &st.emu,
        st.logs.0.join("reaper.log"),
        &[
            "--batch-size",
            "100",
            "--concurrency",
            "2",
            "--lease",
            "10s",
            "--request-timeout",
            "5s",
        ],
    );
    let held = st.emu.wait_for_held(0);
    r.assert_running();
    cluster("restart");
    let mut c = connect("postgres");

    // 3. The reaper's backends terminated in the middle of the drain: another third through,
    //    the next request held, and the backends terminated while it waits.
    st.emu.gate(third);
    st.emu.wait_for_held(held);
    r.assert_running();
    let terminated = one(
        &mut c,
        "SELECT count(*) FROM (SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = 'reaper_login') AS t",
    );
    assert!(terminated > 0, "the reaper's connections were terminated");
    st.emu.open_gate();

    // 4. A wave of new orphans, and the worker's backend terminated in the middle of the cycle
    //    that queues them. The test holds the pause point again; the first cycle to wait there
    //    started before the wave and is terminated too, so that the one after it (the restarted
    //    worker's) is sure to include the wave; that one is terminated while it waits.
    let mut gatekeeper = connect("postgres");
    hold_pause_point(&mut gatekeeper, "cycle");
    let before_wave = wait_paused_at(&mut c, "cycle", None);
    let keys: Vec<String> = (0..wave).map(|i| format!("wave/{i}.png")).collect();
    st.ledger.renders(&mut c, &st.emu, &keys, "2 hours");
    let queued_before = queued(&mut c);
    assert_eq!(queued_before, n as i64);
    terminate(&mut c, before_wave);
    let with_wave = wait_paused_at(&mut c, "cycle", Some(before_wave));
    assert_eq!(
        queued(&mut c),
        queued_before,
        "a cycle waiting at its pause point has committed nothing"
    );
    terminate(&mut c, with_wave);
    assert_eq!(
        queued(&mut c),
        queued_before,
        "the terminated cycle queued nothing"
    );
    release_pause_point(&mut gatekeeper, "cycle");
    wait_for(Duration::from_secs(60), "a new worker", || {
        worker_pid(&mut c).is_some_and(|p| p != with_wave)
    });
    wait_for(
        Duration::from_secs(300),
        "everything queued and drained",
        || {
            r.assert_running();
            queued(&mut c) == (n + wave) as i64 && unfinished(&mut c) == 0
        },
    );
    let log = r.stop();
    assert!(
        log.contains("database connection lost")
            || log.contains("reconnect")
            || log.contains("database unreachable"),
        "the reaper says it lost the database and reconnected: {log}"
    );
    let o = check(&mut c, &st.emu, &st.ledger);
    record(
        Report {
            number: 3,
            scenario: "Database faults",
            load: format!("{n} orphans, then a wave of {wave} more; 20 saved, 1 protected; the background worker (1 s interval) and one reaper"),
            faults: "power cut (`pg_ctl -m immediate`) mid-cycle; restart (`-m fast`) mid-drain; the reaper's backends terminated mid-drain; the worker's backend terminated mid-cycle, twice; each moment forced (a cycle held at its pause point, a bulk delete held at the emulator's gate)".into(),
            notes: format!(
                "the crashed cycle rolled back whole (0 rows) and the worker redid it after crash recovery; the reaper reconnected each time; the terminated cycle rolled back and the restarted worker queued the whole wave; {} confirmed deleted, {} already absent (deleted before a fault cut the confirmation)",
                state_count(&o, "deleted"),
                state_count(&o, "absent"),
            ),
        },
        &o,
    );
}

/// What the saving connections did.
#[derive(Default)]
struct Saves {
    attempted: AtomicU64,
    committed: AtomicU64,
    refused: AtomicU64,
    /// Saves aimed at a job that was queued or claimed at that moment.
    aimed_at_queue: AtomicU64,
    /// Anything but success or the guard's refusal (SQLSTATE OC001): a bug.
    other_errors: Mutex<Vec<String>>,
}

/// One saving connection: saves random completed jobs until `stop`, a third of them jobs that are
/// in the queue right now (pending or claimed), a third among the newest, a third among all.
fn saver(jobs: &Mutex<Vec<String>>, saves: &Saves, stop: &AtomicBool) {
    let mut c = connect("postgres");
    let mut rng = rand::rng();
    while !stop.load(Ordering::Relaxed) {
        let target = match rng.random_range(0..3) {
            0 => c
                .query_opt(
                    "SELECT job_id::text FROM orphan_cleanup.deletion_queue
                     WHERE id > (SELECT max(id) - 300 FROM orphan_cleanup.deletion_queue)
                       AND state IN ('pending', 'claimed')
                     ORDER BY random() LIMIT 1",
                    &[],
                )
                .unwrap()
                .map(|r| {
                    saves.aimed_at_queue.fetch_add(1, Ordering::Relaxed);
                    r.get::<_, String>(0)
                }),
            pick => {
                let jobs = jobs.lock().unwrap();
                let from = if pick == 1 {
                    jobs.len().saturating_sub(100)
                } else {
                    0
                };
                (from < jobs.len()).then(|| jobs[rng.random_range(from..jobs.len())].clone())
            }
        };
        let Some(job) = target else {
            std::thread::sleep(Duration::from_millis(10));
            continue;
        };
        saves.attempted.fetch_add(1, Ordering::Relaxed);
        match save(&mut c, "generated_saved", &job) {
            Ok(_) => {
                saves.committed.fetch_add(1, Ordering::Relaxed);
            }
            Err(e) if e.code().is_some_and(|s| s.code() == "OC001") => {
                saves.refused.fetch_add(1, Ordering::Relaxed);
            }
            Err(e) => saves.other_errors.lock().unwrap().push(db_error(&e)),
        }
        std::thread::sleep(Duration::from_millis(rng.random_range(0..20)));
    }
}

#[test]
fn chaos_4_racing_saves_never_lose_a_saved_file() {
    let seconds = by_scale(20, 60) as u64;
    let savers = 8;
    // min_age 0: a job is an orphan the moment it completes, so saves race the cycles and the
    // reapers on every job. The breaker is off: a steady stream is not what it watches for.
    let st = WorkerStage::new(
        "chaos_race",
        &[
            ("min_age", "0"),
            ("breaker_factor", "0"),
            ("breaker_max_fraction", "1"),
        ],
    );
    let ledger = Mutex::new(Ledger::default());
    let jobs: Mutex<Vec<String>> = Mutex::new(Vec::new());
    let saves = Saves::default();
    let stop = AtomicBool::new(false);
    st.go();
    let spawn = |i: usize| {
        reaper_run(
            "postgres",
            &st.emu,
            st.logs.0.join(format!("reaper-{i}.log")),
            &[
                "--batch-size",
                "50",
                "--concurrency",
                "2",
                "--lease",
                "10s",
                "--request-timeout",
                "5s",
            ],
        )
    };
    let mut reapers = vec![spawn(0), spawn(1)];
    let produced = AtomicU64::new(0);
    std::thread::scope(|s| {
        // The render service: 10 completed jobs every 50 ms, each with its file in storage.
        s.spawn(|| {
            let mut c = connect("postgres");
            let mut batch = 0;
            while !stop.load(Ordering::Relaxed) {
                let keys: Vec<String> = (0..10).map(|i| format!("race/{batch}/{i}.png")).collect();
                let ids = ledger
                    .lock()
                    .unwrap()
                    .renders(&mut c, &st.emu, &keys, "0 seconds");
                produced.fetch_add(ids.len() as u64, Ordering::Relaxed);
                jobs.lock().unwrap().extend(ids);
                batch += 1;
                std::thread::sleep(Duration::from_millis(50));
            }
        });
        for _ in 0..savers {
            s.spawn(|| saver(&jobs, &saves, &stop));
        }
        let started = Instant::now();
        while started.elapsed() < Duration::from_secs(seconds) {
            reapers.iter_mut().for_each(Running::assert_running);
            std::thread::sleep(Duration::from_millis(200));
        }
        stop.store(true, Ordering::Relaxed);
    });

    // Let the worker catch up with the last jobs and the reapers finish.
    let mut c = connect("postgres");
    let last_cycle = one(
        &mut c,
        "SELECT coalesce(max(id), 0) FROM orphan_cleanup.cycle_log",
    );
    wait_for(
        Duration::from_secs(120),
        "a cycle after the last save, and the drain",
        || {
            reapers.iter_mut().for_each(Running::assert_running);
            one(&mut c, &format!("SELECT count(*) FROM orphan_cleanup.cycle_log WHERE id > {last_cycle} + 1 AND status = 'ok'")) > 0
            && unfinished(&mut c) == 0
        },
    );
    for r in reapers {
        r.stop();
    }
    let other = saves.other_errors.lock().unwrap().clone();
    assert!(
        other.is_empty(),
        "saves failed for reasons other than the guard: {other:?}"
    );
    let ledger = ledger.into_inner().unwrap();
    let o = check(&mut c, &st.emu, &ledger);
    let rescued = one(
        &mut c,
        "SELECT count(*) FROM orphan_cleanup.audit_log WHERE action = 'rescued'",
    );
    let stale = state_count(&o, "stale");
    let refused_seq = one(
        &mut c,
        "SELECT CASE WHEN is_called THEN last_value ELSE 0 END FROM orphan_cleanup.refused_saves",
    );
    let refused = saves.refused.load(Ordering::Relaxed);
    assert_eq!(
        refused_seq, refused as i64,
        "the guard counted every refusal"
    );
    let attempted = saves.attempted.load(Ordering::Relaxed);
    assert!(
        rescued > 0 && refused > 0,
        "the race was run: saves rescued queued rows and were refused on claimed ones"
    );
    record(
        Report {
            number: 4,
            scenario: "The save race",
            load: format!(
                "{} jobs completed over {seconds} s (`min_age` 0: orphans at once); {savers} connections saving random jobs; the worker every 1 s; two reapers",
                produced.load(Ordering::Relaxed)
            ),
            faults: format!(
                "{attempted} saves attempted, {} of them aimed at a job queued or claimed at that moment",
                saves.aimed_at_queue.load(Ordering::Relaxed)
            ),
            notes: format!(
                "{} saves committed, {rescued} of them rescuing a queued row; {stale} rows dropped by claim()'s re-check; {refused} refused (SQLSTATE OC001: the job's file was already handed to a reaper); {} objects deleted, {} saved jobs' objects all present: deleted ∩ referenced = ∅",
                saves.committed.load(Ordering::Relaxed),
                o.deleted_objects,
                o.saved
            ),
        },
        &o,
    );
}

/// Runs `sql` and returns the server's error, panicking if it succeeded.
fn refused(c: &mut postgres::Client, sql: &str) -> String {
    match c.batch_execute(sql) {
        Ok(()) => panic!("{sql} succeeded"),
        Err(e) => db_error(&e),
    }
}

/// Functions, operators and tables in the public schema.
const PUBLIC_OBJECTS: &str = "SELECT (SELECT count(*) FROM pg_proc WHERE pronamespace = 'public'::regnamespace)
     + (SELECT count(*) FROM pg_operator WHERE oprnamespace = 'public'::regnamespace)
     + (SELECT count(*) FROM pg_class WHERE relnamespace = 'public'::regnamespace AND relkind = 'r')";

#[test]
fn chaos_6_privileges_hold_and_a_planted_object_hijacks_nothing() {
    let mut st = stage("chaos_priv", 300, &[]);
    let db = st.db.name.clone();
    let mut admin = st.db.client();
    admin
        .batch_execute(&format!(
            "DO $$ BEGIN
                 IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'app_user') THEN CREATE ROLE app_user LOGIN; END IF;
                 IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'nobody') THEN CREATE ROLE nobody LOGIN; END IF;
             END $$;
             GRANT SELECT, INSERT, UPDATE, DELETE ON public.render_jobs, public.user_assets TO app_user;
             -- A database set up before PostgreSQL 15: everyone may create objects in public.
             GRANT CREATE ON SCHEMA public TO app_user;
             ALTER ROLE reaper_login IN DATABASE {db} SET search_path = public, pg_catalog;
             ALTER ROLE app_user IN DATABASE {db} SET search_path = public, pg_catalog;
             ALTER ROLE postgres IN DATABASE {db} SET search_path = public, pg_catalog;"
        ))
        .unwrap();
    let mut attempts = 0;

    // 1. The reaper's role: the queue API and nothing else.
    let mut r = connect_as(&db, "reaper_login");
    for sql in [
        "SELECT count(*) FROM public.render_jobs",
        "SELECT count(*) FROM public.user_assets",
        "INSERT INTO public.user_assets (asset_type, metadata) VALUES ('x', '{}')",
        "UPDATE public.render_jobs SET status = 'failed'",
        "DELETE FROM public.user_assets",
        "SELECT count(*) FROM orphan_cleanup.deletion_queue",
        "UPDATE orphan_cleanup.deletion_queue SET state = 'deleted'",
        "DELETE FROM orphan_cleanup.audit_log",
        "SELECT * FROM orphan_cleanup.run_cycle()",
        "SELECT * FROM orphan_cleanup.enqueue_orphans()",
        "SELECT * FROM orphan_cleanup.attach()",
        "SELECT * FROM orphan_cleanup.reset_breaker('because')",
        "SELECT orphan_cleanup.requeue_dead()",
        "ALTER SYSTEM SET orphan_cleanup.allowed_buckets = 'avatars'",
        "ALTER SYSTEM SET orphan_cleanup.reaping_enabled = on",
    ] {
        attempts += 1;
        let e = refused(&mut r, sql);
        assert!(
            e.contains("permission denied") || e.contains("must be superuser"),
            "reaper_login: {sql}: {e}"
        );
    }
    for (name, value) in [
        ("allowed_buckets", "avatars"),
        ("min_age", "0"),
        ("jobs_table", "public.x"),
    ] {
        attempts += 1;
        let e = refused(&mut r, &format!("SET orphan_cleanup.{name} = '{value}'"));
        assert!(e.contains("cannot be changed now"), "SET {name}: {e}");
    }

    // 2. Rows claimed by one worker cannot be confirmed, failed or released by another: not by
    // a worker that has the claim's lease token under its own id, nor by one that knows the
    // holder's worker id (confirm's results name it) but not the token.
    let mine = claim(&mut r, "worker-a", 5);
    assert_eq!(mine.len(), 5);
    let mut other = connect_as(&db, "reaper_login");
    let guessed = "3f1e2d4c-5b6a-4978-8a9b-0c1d2e3f4a5b".to_string();
    for (worker, token) in [("worker-b", &mine.lease), ("worker-a", &guessed)] {
        for sql in [
            "SELECT result FROM orphan_cleanup.confirm($1, $2, $3, 'deleted')",
            "SELECT result FROM orphan_cleanup.fail($1, $2, $3, 'HTTP 500', true)",
        ] {
            attempts += 1;
            let results: Vec<String> = other
                .query(sql, &[&worker, token, &mine.ids])
                .unwrap()
                .iter()
                .map(|x| x.get(0))
                .collect();
            assert!(
                results.len() == 5
                    && results.iter().all(|x| !x.starts_with("confirmed")
                        && !x.contains("retry")
                        && !x.contains("dead")),
                "{sql} as {worker}: {results:?}"
            );
        }
        attempts += 1;
        let released: i64 = other
            .query_one(
                "SELECT orphan_cleanup.release($1, $2, $3, NULL, nothing_sent => true)",
                &[&worker, token, &mine.ids],
            )
            .unwrap()
            .get(0);
        assert_eq!(released, 0, "{worker} cannot release worker-a's claims");
    }
    let still: i64 = admin
        .query_one(
            "SELECT count(*) FROM orphan_cleanup.deletion_queue WHERE id = ANY($1) AND state = 'claimed' AND claimed_by = 'worker-a' AND attempts = 0",
            &[&mine.ids],
        )
        .unwrap()
        .get(0);
    assert_eq!(still, 5, "worker-a's claims are untouched");
    r.query_one(
        "SELECT orphan_cleanup.release('worker-a', $1, NULL, NULL)",
        &[&mine.lease],
    )
    .unwrap();

    // 3. PUBLIC (a role with no grants) gets nothing: no schema, no function, no table. The pure
    // functions the app's expression indexes are built on are the exception (grants.sql):
    // PostgreSQL checks EXECUTE when an app role's insert maintains the index, and without
    // USAGE on the schema nobody can call them by name.
    let public_grants: Vec<String> = admin
        .query(
            "SELECT p.oid::regprocedure::text FROM pg_proc AS p
             WHERE p.pronamespace = 'orphan_cleanup'::regnamespace AND has_function_privilege('nobody', p.oid, 'EXECUTE')
               AND p.oid NOT IN ('orphan_cleanup.object_key(text)'::regprocedure, 'orphan_cleanup.object_keys(text)'::regprocedure,
                                 'orphan_cleanup.job_ref_key(text)'::regprocedure)
             UNION ALL
             SELECT c.oid::regclass::text FROM pg_class AS c
             WHERE c.relnamespace = 'orphan_cleanup'::regnamespace
               AND has_table_privilege('nobody', c.oid, 'SELECT, INSERT, UPDATE, DELETE, TRUNCATE')
             UNION ALL
             SELECT 'schema usage' WHERE has_schema_privilege('nobody', 'orphan_cleanup', 'USAGE')",
            &[],
        )
        .unwrap()
        .iter()
        .map(|x| x.get(0))
        .collect();
    assert!(
        public_grants.is_empty(),
        "PUBLIC can use: {public_grants:?}"
    );
    attempts += 1;
    let e = refused(
        &mut connect_as(&db, "nobody"),
        "SELECT * FROM orphan_cleanup.claim('x', 1)",
    );
    assert!(e.contains("permission denied"), "{e}");

    // 4. Every SECURITY DEFINER function pins a search_path that starts with pg_catalog and has
    // no schema anyone else can write to.
    let unpinned: Vec<String> = admin
        .query(
            "SELECT p.oid::regprocedure::text FROM pg_proc AS p
             WHERE p.pronamespace = 'orphan_cleanup'::regnamespace AND p.prosecdef
               AND NOT EXISTS (SELECT 1 FROM unnest(p.proconfig) AS c
                               WHERE c IN ('search_path=pg_catalog, pg_temp', 'search_path=pg_catalog'))",
            &[],
        )
        .unwrap()
        .iter()
        .map(|x| x.get(0))
        .collect();
    assert!(
        unpinned.is_empty(),
        "SECURITY DEFINER without a safe search_path: {unpinned:?}"
    );
    let definers = one(
        &mut admin,
        "SELECT count(*) FROM pg_proc WHERE pronamespace = 'orphan_cleanup'::regnamespace AND prosecdef",
    );

    // 5. The hijack: the app's role plants look-alikes of the built-ins and the extension's tables
    // in public, which every session here searches first. Any call to one logs who ran it.
    let public_before = one(&mut admin, PUBLIC_OBJECTS);
    let mut app = connect_as(&db, "app_user");
    app.batch_execute(
        "CREATE TABLE public.hijack_log (who text, what text, at timestamptz DEFAULT clock_timestamp());
         GRANT INSERT ON public.hijack_log TO PUBLIC;
         CREATE FUNCTION public.now() RETURNS timestamptz LANGUAGE sql AS
           $f$ INSERT INTO public.hijack_log (who, what) VALUES (current_user, 'now()'); SELECT pg_catalog.now() $f$;
         CREATE FUNCTION public.md5(text) RETURNS text LANGUAGE sql AS
           $f$ INSERT INTO public.hijack_log (who, what) VALUES (current_user, 'md5()'); SELECT pg_catalog.md5($1) $f$;
         CREATE FUNCTION public.lower(text) RETURNS text LANGUAGE sql AS
           $f$ INSERT INTO public.hijack_log (who, what) VALUES (current_user, 'lower()'); SELECT pg_catalog.lower($1) $f$;
         CREATE FUNCTION public.btrim(text) RETURNS text LANGUAGE sql AS
           $f$ INSERT INTO public.hijack_log (who, what) VALUES (current_user, 'btrim()'); SELECT pg_catalog.btrim($1) $f$;
         CREATE FUNCTION public.length(text) RETURNS integer LANGUAGE sql AS
           $f$ INSERT INTO public.hijack_log (who, what) VALUES (current_user, 'length()'); SELECT pg_catalog.length($1) $f$;
         CREATE FUNCTION public.random() RETURNS double precision LANGUAGE sql AS
           $f$ INSERT INTO public.hijack_log (who, what) VALUES (current_user, 'random()'); SELECT pg_catalog.random() $f$;
         CREATE FUNCTION public.cardinality(anyarray) RETURNS integer LANGUAGE sql AS
           $f$ INSERT INTO public.hijack_log (who, what) VALUES (current_user, 'cardinality()'); SELECT pg_catalog.cardinality($1) $f$;
         CREATE FUNCTION public.hijack_eq(text, text) RETURNS boolean LANGUAGE sql AS
           $f$ INSERT INTO public.hijack_log (who, what) VALUES (current_user, '= on text'); SELECT pg_catalog.texteq($1, $2) $f$;
         CREATE OPERATOR public.= (LEFTARG = text, RIGHTARG = text, FUNCTION = public.hijack_eq);
         CREATE FUNCTION public.hijack_uuid_eq(uuid, uuid) RETURNS boolean LANGUAGE sql AS
           $f$ INSERT INTO public.hijack_log (who, what) VALUES (current_user, '= on uuid'); SELECT pg_catalog.uuid_eq($1, $2) $f$;
         CREATE OPERATOR public.= (LEFTARG = uuid, RIGHTARG = uuid, FUNCTION = public.hijack_uuid_eq);
         CREATE TABLE public.deletion_queue (id bigint);
         CREATE TABLE public.attachment (singleton boolean);
         CREATE TABLE public.pg_class (oid oid);",
    )
    .unwrap();
    let planted = one(&mut admin, PUBLIC_OBJECTS) - public_before;
    // The poisoned sessions exercise every path: the app saves (the guard trigger) and deletes
    // assets, the DBA runs cycles and reports, the reaper drains.
    let mut app = connect_as(&db, "app_user");
    let fresh: Vec<String> = (0..10).map(|i| format!("late/{i}.png")).collect();
    let ids = st.ledger.renders(&mut app, &st.emu, &fresh, "2 hours");
    save(&mut app, "generated_saved", &ids[0]).unwrap();
    let mut dba = st.db.client();
    assert_eq!(cycle(&mut dba).0, "ok");
    save(&mut app, "generated_saved", &ids[1]).unwrap(); // rescues a queued row
    for sql in [
        "SELECT * FROM orphan_cleanup.preview()",
        "SELECT * FROM orphan_cleanup.validation_report()",
        "SELECT * FROM orphan_cleanup.health()",
        "SELECT * FROM orphan_cleanup.queue_status()",
        "SELECT orphan_cleanup.orphan_count()",
    ] {
        dba.batch_execute(sql).unwrap();
    }
    let out = reaper(&db, &st.emu, &["drain", "--batch-size", "50"])
        .env("REAPER_LOG", "trace")
        .run();
    let drain_log = output_text(&out);
    assert!(out.status.success(), "{drain_log}");
    assert_eq!(cycle(&mut dba).0, "ok");
    let hijacked: Vec<(String, String)> = admin
        .query("SELECT who, what FROM public.hijack_log", &[])
        .unwrap()
        .iter()
        .map(|x| (x.get(0), x.get(1)))
        .collect();
    assert!(
        hijacked.is_empty(),
        "a planted object ran inside the extension: {hijacked:?}"
    );
    // The trap was armed: a plain query in the same poisoned session does run it.
    dba.batch_execute("SELECT now()").unwrap();
    assert_eq!(
        one(&mut admin, "SELECT count(*) FROM public.hijack_log"),
        1,
        "the planted now() is live"
    );

    // 6. The service key: in no log line at any level, success or failure.
    let (_, anon) = keys();
    let mut logs = vec![drain_log];
    for (args, key) in [
        (vec!["status"], st.emu.service_key.clone()),
        (vec!["drain", "--dry-run"], st.emu.service_key.clone()),
        (vec!["drain"], anon),
        (vec!["drain"], "not-a-key".to_string()),
    ] {
        let out = reaper(&db, &st.emu, &args)
            .env("REAPER_LOG", "trace")
            .env("SUPABASE_SERVICE_ROLE_KEY", &key)
            .run();
        let text = output_text(&out);
        assert!(!text.contains(&key), "{args:?} logged its key: {text}");
        logs.push(text);
    }
    let secret_part = st.emu.service_key.rsplit('.').next().unwrap().to_string();
    let server_log =
        std::fs::read_to_string(format!("/tmp/pg_orphan_cleanup-{}/postgres.log", port()))
            .unwrap_or_default();
    for text in logs.iter().chain([&server_log]) {
        assert!(
            !text.contains(&st.emu.service_key) && !text.contains(&secret_part),
            "the key leaked into a log"
        );
    }
    let lines: usize = logs.iter().map(|l| l.lines().count()).sum();
    assert!(lines > 100, "trace logging was on: {lines} lines");

    admin
        .batch_execute(&format!(
            "ALTER ROLE reaper_login IN DATABASE {db} RESET search_path;
             ALTER ROLE app_user IN DATABASE {db} RESET search_path;
             ALTER ROLE postgres IN DATABASE {db} RESET search_path;"
        ))
        .unwrap();
    let o = check(&mut admin, &st.emu, &st.ledger);
    record(
        Report {
            number: 6,
            scenario: "Privilege",
            load: "310 orphans, 22 saved, 1 protected; the reaper's login role, the app's role, a role with no grants; every session's search_path puts public first".into(),
            faults: format!(
                "{attempts} forbidden operations (app tables, queue tables, run_cycle, settings, other workers' claims); {planted} objects planted in public (look-alike built-ins, `=` operators, tables); the reaper at trace level with good, anon and garbage keys"
            ),
            notes: format!(
                "every forbidden operation refused; PUBLIC holds no privilege on the schema, its {definers} SECURITY DEFINER functions or its tables; all pin `search_path = pg_catalog, pg_temp`; no planted object ran inside the extension (one did run in a plain query, so the trap was live); the key in none of {lines} reaper log lines nor the server log"
            ),
        },
        &o,
    );
}

/// Nothing was deleted, claimed or charged an attempt: every queue row still pending and
/// untouched, every object still in storage.
fn untouched(c: &mut postgres::Client, emu: &Emulator, objects: usize, rows: i64, what: &str) {
    assert_eq!(
        emu.objects().len(),
        objects,
        "{what}: nothing deleted from storage"
    );
    let (pending, touched): (i64, i64) = {
        let r = c
            .query_one(
                "SELECT count(*) FILTER (WHERE state = 'pending'),
                        count(*) FILTER (WHERE attempts > 0 OR claim_count > 0)
                 FROM orphan_cleanup.deletion_queue",
                &[],
            )
            .unwrap();
        (r.get(0), r.get(1))
    };
    assert_eq!(
        (pending, touched),
        (rows, 0),
        "{what}: no row claimed or charged an attempt"
    );
}

/// `base` with the pairs in `extra` replacing or added.
fn with<'a>(base: &[(&'a str, &'a str)], extra: &[(&'a str, &'a str)]) -> Vec<(&'a str, &'a str)> {
    let mut s = base.to_vec();
    s.retain(|(k, _)| !extra.iter().any(|(e, _)| e == k));
    s.extend_from_slice(extra);
    s
}

#[test]
fn chaos_7_bad_configuration_fails_clearly_and_deletes_nothing() {
    let n = 500;
    let st = stage("chaos_config", n, &[]);
    let mut c = st.db.client();
    let objects = st.emu.objects().len();
    let rows = n as i64;
    let base = chaos_settings(&st.emu, &[]);
    let mut cases = Vec::new();
    // A reaper run that must delete nothing; returns its output.
    let drain = |env: &[(&str, &str)]| {
        let mut cmd = reaper(&st.db.name, &st.emu, &["drain"]);
        for (k, v) in env {
            cmd.env(k, v);
        }
        let out = cmd.run();
        (out.status.success(), output_text(&out))
    };
    // Fresh orphans that a working cycle would queue: they show whether a bad cycle queued any.
    let fresh: Vec<String> = (0..5).map(|i| format!("fresh/{i}.png")).collect();
    let mut ledger = st.ledger;
    ledger.renders(&mut c, &st.emu, &fresh, "2 hours");
    let objects = objects + fresh.len();

    // 1. The extension's side. Each bad setting: the cycle fails naming the fix and queues
    // nothing, attach() names every problem, and the reaper deletes nothing.
    c.batch_execute("CREATE TABLE public.assets_text (id bigserial PRIMARY KEY, asset_type text, metadata text)").unwrap();
    for (setting, value, expected_cycle, expected_attach) in [
        (
            "assets_table",
            "public.no_such_assets",
            "attach()",
            "does not exist; set a schema-qualified name",
        ),
        (
            "assets_table",
            "public.assets_text",
            "attach()",
            "is text, expected jsonb or json",
        ),
        (
            "jobs_table",
            "public.no_such_jobs",
            "attach()",
            "does not exist; set a schema-qualified name",
        ),
        ("allowed_buckets", "", "allowed_buckets is empty", ""),
    ] {
        settings(&with(&base, &[(setting, value)]));
        let status: String = c
            .query_one("SELECT status FROM orphan_cleanup.run_cycle()", &[])
            .unwrap()
            .get(0);
        assert_eq!(status, "failed", "{setting} = {value:?}");
        let cycle_error: String = c
            .query_one(
                "SELECT coalesce(error, '') FROM orphan_cleanup.cycle_log ORDER BY id DESC LIMIT 1",
                &[],
            )
            .unwrap()
            .get(0);
        assert!(
            cycle_error.contains(expected_cycle),
            "{setting} = {value:?}: the cycle says {cycle_error}"
        );
        if !expected_attach.is_empty() {
            let e = db_error(
                &c.query("SELECT * FROM orphan_cleanup.attach()", &[])
                    .unwrap_err(),
            );
            assert!(
                e.contains(expected_attach) && e.contains("HINT"),
                "{setting} = {value:?}: attach() says {e}"
            );
        }
        let (ok, text) = drain(&[]);
        untouched(
            &mut c,
            &st.emu,
            objects,
            rows,
            &format!("{setting} = {value:?}"),
        );
        cases.push(format!("`{setting} = '{value}'`"));
        eprintln!(
            "{setting} = {value:?}: cycle: {cycle_error}\n  reaper ({}): {}",
            if ok { "exit 0" } else { "failed" },
            text.lines().last().unwrap_or("")
        );
    }
    settings(&base);
    for (value, expected) in [
        ("soon", "invalid value for parameter"),
        ("0", "outside the valid range"),
    ] {
        let e = refused(
            &mut connect("postgres"),
            &format!("ALTER SYSTEM SET orphan_cleanup.interval = '{value}'"),
        );
        assert!(e.contains(expected), "interval = {value}: {e}");
        cases.push(format!("`interval = '{value}'`"));
    }

    // 2. The reaper's side: each fails at start, naming what to fix, and touches nothing.
    let foreign = foreign_key();
    let (_, anon) = keys();
    let db_url = |rest: &str| format!("postgres://{rest}");
    for (env, value, expected) in [
        (
            "DATABASE_URL",
            db_url(&format!("reaper_login@127.0.0.1:1/{}", st.db.name)),
            "Connection refused",
        ),
        (
            "DATABASE_URL",
            db_url(&format!("reaper_login@127.0.0.1:{}/no_such_db", port())),
            "cannot connect to the database",
        ),
        (
            "DATABASE_URL",
            db_url(&format!("no_such_role@127.0.0.1:{}/{}", port(), st.db.name)),
            "cannot connect to the database",
        ),
        ("DATABASE_URL", "not a url".to_string(), "DATABASE_URL"),
        (
            "SUPABASE_URL",
            "not a url".to_string(),
            "SUPABASE_URL is invalid",
        ),
        (
            "SUPABASE_URL",
            "http://127.0.0.1:1".to_string(),
            "check SUPABASE_URL and that storage is reachable",
        ),
        (
            "SUPABASE_URL",
            format!("{}/wrong/prefix", st.emu.base),
            "SUPABASE_URL",
        ),
        (
            "SUPABASE_SERVICE_ROLE_KEY",
            foreign,
            "check SUPABASE_SERVICE_ROLE_KEY: it must be this project's service_role key",
        ),
        (
            "SUPABASE_SERVICE_ROLE_KEY",
            anon,
            "use the service_role key, not the anon key",
        ),
        (
            "SUPABASE_SERVICE_ROLE_KEY",
            OPAQUE_PUBLISHABLE_KEY.to_string(),
            "use a secret key (sb_secret_...)",
        ),
        (
            "SUPABASE_SERVICE_ROLE_KEY",
            "garbage".to_string(),
            "neither a JWT (eyJ...) nor a secret key",
        ),
    ] {
        let (ok, text) = drain(&[(env, value.as_str())]);
        assert!(!ok, "{env}={value}: the reaper must fail: {text}");
        assert!(
            text.contains(expected),
            "{env}={value}: expected {expected:?} in: {text}"
        );
        assert!(
            text.lines().last().unwrap_or("").contains(env),
            "{env}={value}: the error names {env}: {text}"
        );
        untouched(&mut c, &st.emu, objects, rows, &format!("{env}={value}"));
        let shown = if env == "SUPABASE_SERVICE_ROLE_KEY" {
            "(a wrong key)".to_string()
        } else {
            value.clone()
        };
        cases.push(format!("`{env}` {shown}"));
        eprintln!("{env}={shown}: {}", text.lines().last().unwrap_or(""));
    }

    // 3. Fixed, everything goes through.
    assert_eq!(cycle(&mut c).2, fresh.len() as i64);
    let (ok, text) = drain(&[]);
    assert!(ok, "{text}");
    let o = check(&mut c, &st.emu, &ledger);
    record(
        Report {
            number: 7,
            scenario: "Bad configuration",
            load: format!("{n} orphans queued, 5 more waiting for a cycle, 20 saved, 1 protected"),
            faults: format!(
                "{} bad settings: a missing jobs table, a missing assets table, `metadata` of type text, `allowed_buckets` empty, `interval` 'soon' and '0'; `DATABASE_URL` with a closed port, an unknown database, an unknown role, not a URL; `SUPABASE_URL` not a URL, unreachable, with a path; another project's key, the anon key, a publishable key, garbage",
                cases.len()
            ),
            notes: "each refused with an error naming the fix (the cycle, attach() or the reaper at start); after each, no object deleted, no row claimed or charged an attempt; once fixed, the cycle and the drain finished the job".into(),
        },
        &o,
    );
}

/// Rows confirmed deleted so far.
fn deleted_rows(c: &mut postgres::Client) -> i64 {
    one(
        c,
        "SELECT count(*) FROM orphan_cleanup.deletion_queue WHERE state IN ('deleted', 'absent')",
    )
}

/// Issue 12, "a broken upstream": one reaper daemon drains while storage turns, in turn, into
/// everything a real upstream can be: down (500s, a CDN's HTML page, hanging), a redirect to
/// another host, a proxy answering for the server with what is not this bucket's objects, a
/// project with a lower bulk limit, a proxy refusing one name, a project over quota; and a
/// DBA's lock holds the queue. Healthy stretches come in between, so that the reaper meets every
/// behaviour (it backs off further after each trouble in a row). The usual checks follow (a
/// job row confirmed while its file remained would leave that object behind for good), and:
/// the other host received nothing (neither the key nor a delete), no row was charged an attempt
/// for an outage, and the one row dead-lettered is the one the proxy refuses, with the reason.
#[test]
fn chaos_9_a_broken_upstream_gets_nothing_wrong() {
    // Enough rows that the healthy stretches between eleven troubles never drain the queue.
    let n = by_scale(12_000, 30_000);
    let st = stage("chaos_upstream", n, &[("max_attempts", "2")]);
    let mut c = st.db.client();
    let catcher = Emulator::start();
    let addr = free_addr();
    let mut r = reaper_run(
        &st.db.name,
        &st.emu,
        st.logs.0.join("reaper.log"),
        &[
            "--batch-size",
            "50",
            "--concurrency",
            "4",
            "--request-timeout",
            "2s",
            "--lease",
            "1m",
            "--db-timeout",
            "2s",
            "--metrics-addr",
            &addr,
        ],
    );
    // The proxy refuses the name claimed next when its phase begins (set below).
    let refused_name = std::cell::RefCell::new(String::new());
    let troubles = [
        ("HTTP 500 on every request", json!({"rate_500": 1.0})),
        (
            "a CDN's HTML page with HTTP 200",
            json!({"answer_html": true}),
        ),
        (
            "a redirect to another host",
            json!({"redirect_to": catcher.base}),
        ),
        (
            "a 200 answer naming no object of this bucket",
            json!({"bulk_answer": ["orphan/1.png", {"name": "orphan/2.png", "bucket_id": "avatars"}]}),
        ),
        (
            "a 200 [] answer (a key or proxy that deletes nothing)",
            json!({"bulk_answer": []}),
        ),
        ("a bulk limit of 30 names", json!({"bulk_limit": 30})),
        (
            "a proxy refusing one name (403)",
            json!({"reject_http": 403}),
        ),
        (
            "HTTP 500 on every delete, while reads work",
            json!({"reject_names": "", "reject_http": 500}),
        ),
        (
            "the project over its quota (402)",
            json!({"over_quota": true}),
        ),
        ("requests that never answer", json!({"hang_rate": 1.0})),
    ];
    let mut met = Vec::new();
    for (what, faults) in &troubles {
        // A healthy stretch: the reaper deletes again (its back-off resets).
        st.emu.set_faults(json!({}));
        let before = deleted_rows(&mut c);
        wait_for(Duration::from_secs(120), "deletes to resume", || {
            r.assert_running();
            deleted_rows(&mut c) > before
        });
        let ready = one(
            &mut c,
            "SELECT count(*) FROM orphan_cleanup.deletion_queue WHERE state = 'pending'",
        );
        assert!(
            ready > 400,
            "the queue ran dry before {what} ({ready} left): raise n"
        );
        st.emu.clear_requests();
        if what.contains("refusing one name") {
            // The next row a claim takes; the phase lasts until that row alone is dead-lettered.
            let next: String = c
                .query_one(
                    "SELECT object_path FROM orphan_cleanup.deletion_queue WHERE state = 'pending'
                     ORDER BY available_at, id LIMIT 1",
                    &[],
                )
                .unwrap()
                .get(0);
            *refused_name.borrow_mut() = next.clone();
            let mut f = faults.clone();
            f["reject_names"] = json!(next);
            st.emu.set_faults(f);
            wait_for(
                Duration::from_secs(120),
                "the refused row to be dead-lettered",
                || {
                    r.assert_running();
                    one(
                    &mut c,
                    &format!("SELECT count(*) FROM orphan_cleanup.deletion_queue WHERE state = 'dead' AND object_path = '{next}'"),
                ) == 1
                },
            );
            met.push(*what);
            continue;
        }
        st.emu.set_faults(faults.clone());
        if what.contains("never answer") {
            std::thread::sleep(Duration::from_secs(6));
        } else {
            wait_for(Duration::from_secs(120), what, || {
                r.assert_running();
                st.emu.requests().iter().any(|q| q["method"] == "DELETE")
            });
        }
        if what.contains("500 on every request") {
            // An outage: /readyz says so (the reaper works; storage does not).
            wait_for(
                Duration::from_secs(60),
                "/readyz to name the outage",
                || {
                    http_get(&addr, "/readyz")
                        .is_ok_and(|(s, body)| s == 503 && body.contains("an outage"))
                },
            );
            assert_eq!(http_get(&addr, "/livez").unwrap().0, 200);
        }
        met.push(*what);
    }
    // A DBA's session locks the queue for a while: /readyz names it, nothing hangs.
    st.emu.set_faults(json!({}));
    let mut locker = st.db.client();
    locker
        .batch_execute("BEGIN; LOCK TABLE orphan_cleanup.deletion_queue IN ACCESS EXCLUSIVE MODE")
        .unwrap();
    wait_for(
        Duration::from_secs(60),
        "/readyz to name the lock's timeout",
        || {
            http_get(&addr, "/readyz")
                .is_ok_and(|(s, body)| s == 503 && body.contains("--db-timeout"))
        },
    );
    std::thread::sleep(Duration::from_secs(3));
    locker.batch_execute("COMMIT").unwrap();
    wait_for(Duration::from_secs(60), "/readyz to be ready again", || {
        http_get(&addr, "/readyz").is_ok_and(|(s, _)| s == 200)
    });
    met.push("a lock held on the queue");

    // Healthy to the end: everything but the refused name drains.
    wait_for(Duration::from_secs(600), "the drain to finish", || {
        r.assert_running();
        unfinished(&mut c) == 0
    });
    let log = r.stop();
    assert!(
        catcher.requests().is_empty(),
        "the redirect's target received: {:?}",
        catcher.requests()
    );
    let dead: Vec<(String, String)> = c
        .query(
            "SELECT object_path, last_error FROM orphan_cleanup.deletion_queue WHERE state = 'dead'",
            &[],
        )
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    let refused_name = refused_name.into_inner();
    assert_eq!(dead.len(), 1, "dead letters: {dead:?}");
    for (name, error) in &dead {
        assert_eq!(
            *name, refused_name,
            "only the refused name is dead-lettered: {error}"
        );
        assert!(error.contains("proxy or web firewall"), "{error}");
    }
    let charged = one(
        &mut c,
        &format!(
            "SELECT count(*) FROM orphan_cleanup.deletion_queue WHERE attempts > 0 AND object_path <> '{refused_name}'"
        ),
    );
    assert_eq!(
        charged, 0,
        "no row is charged an attempt for an outage or a refusal: {log}"
    );
    // The proxy lets it through; the DBA requeues; it is deleted too.
    let requeued = one(&mut c, "SELECT orphan_cleanup.requeue_dead()");
    if requeued > 0 {
        let out = reaper(&st.db.name, &st.emu, &["drain", "--no-probe"]).run();
        assert!(out.status.success(), "{}", output_text(&out));
    }
    let released = one(
        &mut c,
        "SELECT count(*) FROM orphan_cleanup.audit_log WHERE action = 'released'",
    );
    let o = check(&mut c, &st.emu, &st.ledger);
    record(
        Report {
            number: 9,
            scenario: "A broken upstream",
            load: format!("{n} orphans, 20 saved, 1 protected; one reaper daemon, 4 requests of 50 names in flight; `max_attempts` 2"),
            faults: format!("in turn, with healthy stretches between: {}", met.join("; ")),
            notes: format!(
                "the other host received nothing; {released} rows handed back without an attempt; no row charged an attempt except the one the proxy refuses ({} dead-lettered with the proxy's reason, then requeued and deleted)",
                dead.len()
            ),
        },
        &o,
    );
}
