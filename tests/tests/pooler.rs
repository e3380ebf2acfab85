//! The reaper through a connection pooler (issue 14): PgBouncer in session mode and in
//! transaction mode, as hosted Supabase's Supavisor offers both.
//!
//! In transaction mode a client holds a server connection only for one transaction, and the
//! next transaction may run on another one that other clients use too. So nothing may outlive a
//! transaction: no named prepared statement, no session `SET`, no session advisory lock, no
//! `LISTEN`. These tests drive several reapers through a pool of two server connections, so
//! that their transactions really move between server connections, then look at what is left on
//! those connections.

use std::collections::BTreeSet;
use std::io::{BufRead, BufReader};
use std::process::Stdio;
use std::time::Duration;

use e2e::pooler::Pooler;
use e2e::process::Hermetic;
use e2e::storage::{output_text, reaper, reaper_role, Emulator};
use e2e::*;

struct World {
    db: TestDb,
    emu: Emulator,
    orphans: BTreeSet<String>,
}

/// `n` orphans queued in a database of its own, and one saved job whose object must stay.
fn world(name: &str, n: usize) -> World {
    let emu = Emulator::start();
    settings(&[("allowed_buckets", "renders"), ("allowed_hosts", &emu.host)]);
    let db = TestDb::attached(name);
    reaper_role();
    emu.create_bucket("renders");
    let mut c = db.client();
    let mut orphans = BTreeSet::new();
    let mut tx = c.transaction().unwrap();
    for i in 0..n {
        let key = format!("o/{i}.png");
        emu.upload("renders", &key, b"orphan");
        let url = emu.public_url("renders", &key);
        job(&mut tx, "completed", Some(&url), "2 hours", "orphan");
        orphans.insert(format!("renders/{key}"));
    }
    tx.commit().unwrap();
    emu.upload("renders", "saved.png", b"saved");
    let url = emu.public_url("renders", "saved.png");
    let saved = job(&mut c, "completed", Some(&url), "2 hours", "saved");
    save(&mut c, "generated_saved", &saved.0).unwrap();
    let (status, _, queued, _, _) = cycle(&mut c);
    assert_eq!((status.as_str(), queued), ("ok", n as i64));
    World { db, emu, orphans }
}

/// Every server connection of the pool, each held in a transaction at once (so that none is
/// shared), answers `sql` (one text value).
fn on_every_server_connection(pooler: &Pooler, db: &str, size: usize, sql: &str) -> Vec<String> {
    let mut clients: Vec<_> = (0..size)
        .map(|_| pooler.connect(db, "reaper_login"))
        .collect();
    let mut txs: Vec<_> = clients
        .iter_mut()
        .map(|c| c.transaction().unwrap())
        .collect();
    let mut pids = BTreeSet::new();
    let mut values = Vec::new();
    for tx in &mut txs {
        // The simple protocol: a prepared statement of the test's own would be counted.
        let rows = tx
            .simple_query(&format!("SELECT pg_backend_pid()::text, ({sql})::text"))
            .unwrap();
        let row = rows
            .iter()
            .find_map(|m| match m {
                postgres::SimpleQueryMessage::Row(r) => Some(r),
                _ => None,
            })
            .unwrap_or_else(|| panic!("no row from {sql}"));
        pids.insert(row.get(0).unwrap().to_string());
        values.push(row.get(1).unwrap().to_string());
    }
    assert_eq!(
        pids.len(),
        size,
        "each transaction holds a server connection of its own"
    );
    values
}

/// The locks reapers hold on their worker ids (pg_try_advisory_lock(7310249, ...)) in this
/// database. pg_locks lists the whole cluster's: a cycle of the background worker (its own
/// transaction-scoped lock, 7310246) once made this count 1 in CI.
fn advisory_locks(c: &mut postgres::Client) -> i64 {
    c.query_one(
        "SELECT count(*) FROM pg_locks
         WHERE locktype = 'advisory' AND classid = 7310249
           AND database = (SELECT oid FROM pg_database WHERE datname = current_database())",
        &[],
    )
    .unwrap()
    .get(0)
}

/// Three reapers at once, each with two connections (one claims ahead), through two server
/// connections in transaction mode: many small claims and confirms move between server
/// connections. Before, the reaper's named prepared statements met on one server connection
/// ("prepared statement already exists" / "does not exist"), its session `SET statement_timeout`
/// stayed behind for every other client of the pool, and --max-deletes-per-hour's advisory lock
/// on its worker id stayed held on a server connection after the reaper exited.
#[test]
fn through_a_transaction_pooler_reapers_drain_and_leave_nothing_on_the_server_connections() {
    let w = world("pooler_tx", 240);
    let pooler = Pooler::start(&w.db.name, "transaction", 2);
    let url = pooler.url(&w.db.name, "reaper_login");
    let reapers: Vec<_> = (0..3)
        .map(|i| {
            reaper(
                &w.db.name,
                &w.emu,
                &[
                    "drain",
                    "--batch-size",
                    "5",
                    "--concurrency",
                    "1",
                    "--max-deletes-per-hour",
                    "100000",
                    "--worker-id",
                    &format!("pooled-{i}"),
                ],
            )
            .env("DATABASE_URL", &url)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .start()
        })
        .collect();
    for r in reapers {
        let out = r.wait_with_deadline(Duration::from_secs(300));
        let text = output_text(&out);
        assert!(out.status.success(), "{text}\npgbouncer:\n{}", pooler.log());
        assert!(!text.contains("prepared statement"), "{text}");
    }
    let objects = w.emu.objects();
    assert!(
        w.orphans.iter().all(|o| !objects.contains(o)),
        "every orphan deleted through the pooler"
    );
    assert!(objects.contains("renders/saved.png"));
    let mut c = w.db.client();
    let deleted: i64 = c
        .query_one(
            "SELECT count(*) FROM orphan_cleanup.deletion_queue WHERE state = 'deleted'",
            &[],
        )
        .unwrap()
        .get(0);
    assert_eq!(deleted, 240);

    // What the reapers left on the pool's server connections: nothing.
    for setting in ["statement_timeout", "lock_timeout"] {
        assert_eq!(
            on_every_server_connection(
                &pooler,
                &w.db.name,
                2,
                &format!("current_setting('{setting}')")
            ),
            vec!["0", "0"],
            "{setting} of the reaper stays in its own transactions, not on the pool's connections"
        );
    }
    assert_eq!(
        on_every_server_connection(
            &pooler,
            &w.db.name,
            2,
            "(SELECT count(*) FROM pg_prepared_statements)"
        ),
        vec!["0", "0"],
        "no prepared statement left on a server connection"
    );
    assert_eq!(
        advisory_locks(&mut c),
        0,
        "no lock on a worker id left held after the reapers exited"
    );
    drop(pooler);
}

/// A reaper started with --max-deletes-per-hour through a transaction pooler cannot hold its
/// worker id's lock (a session lock would stay on a shared server connection). It says so, and a
/// second reaper with the same id afterwards starts normally.
#[test]
fn a_worker_id_is_not_locked_through_a_transaction_pooler_and_the_reaper_says_so() {
    let w = world("pooler_lock", 10);
    let pooler = Pooler::start(&w.db.name, "transaction", 1);
    let url = pooler.url(&w.db.name, "reaper_login");
    for round in 0..2 {
        let out = reaper(
            &w.db.name,
            &w.emu,
            &[
                "drain",
                "--max-deletes-per-hour",
                "1000",
                "--worker-id",
                "same-id",
            ],
        )
        .env("DATABASE_URL", &url)
        .run();
        let text = output_text(&out);
        assert!(out.status.success(), "round {round}: {text}");
        assert!(
            text.contains("cannot hold the lock on --worker-id same-id"),
            "round {round}: the reaper names what it cannot do through this pooler: {text}"
        );
        assert_eq!(advisory_locks(&mut w.db.client()), 0, "round {round}");
    }
    drop(pooler);
}

/// Starts `reaper run` with a log the test can read line by line.
fn daemon(
    w: &World,
    url: &str,
    poll: &str,
) -> (e2e::process::Proc, std::sync::mpsc::Receiver<String>) {
    let mut proc = reaper(&w.db.name, &w.emu, &["run", "--poll-interval", poll])
        .env("DATABASE_URL", url)
        .env("REAPER_LOG", "info")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .start();
    let out = proc.take_stderr().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(out).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    (proc, rx)
}

/// Reads the daemon's log until a line contains `what`; returns every line read.
fn log_until(rx: &std::sync::mpsc::Receiver<String>, what: &str, within: Duration) -> Vec<String> {
    let deadline = std::time::Instant::now() + within;
    let mut seen = Vec::new();
    while let Some(left) = deadline.checked_duration_since(std::time::Instant::now()) {
        match rx.recv_timeout(left) {
            Ok(line) => {
                let found = line.contains(what);
                seen.push(line);
                if found {
                    return seen;
                }
            }
            Err(_) => break,
        }
    }
    panic!(
        "no log line with {what:?} within {within:?}:\n{}",
        seen.join("\n")
    );
}

/// Queues `n` more orphans with a cycle, and waits until storage no longer has them.
fn more_orphans_are_deleted(w: &World, tag: &str, n: usize, within: Duration) {
    let mut c = w.db.client();
    let mut keys = Vec::new();
    for i in 0..n {
        let key = format!("{tag}/{i}.png");
        w.emu.upload("renders", &key, b"orphan");
        let url = w.emu.public_url("renders", &key);
        job(&mut c, "completed", Some(&url), "2 hours", tag);
        keys.push(format!("renders/{key}"));
    }
    let (status, _, queued, _, _) = cycle(&mut c);
    assert_eq!((status.as_str(), queued), ("ok", n as i64));
    wait_for(within, &format!("the {tag} orphans to be deleted"), || {
        let objects = w.emu.objects();
        keys.iter().all(|k| !objects.contains(k))
    });
}

/// In transaction mode a `NOTIFY` never reaches the reaper (its `LISTEN` ran on a server
/// connection it no longer holds). The reaper finds that out by itself at start, says so, and
/// polls: rows queued later are deleted within --poll-interval.
#[test]
fn through_a_transaction_pooler_the_daemon_notices_notify_cannot_reach_it_and_polls() {
    let w = world("pooler_poll", 5);
    let pooler = Pooler::start(&w.db.name, "transaction", 2);
    let (proc, rx) = daemon(&w, &pooler.url(&w.db.name, "reaper_login"), "2s");
    let seen = log_until(
        &rx,
        "NOTIFY does not reach this reaper",
        Duration::from_secs(60),
    );
    assert!(
        seen.iter().any(|l| l.contains("polling every 2s")),
        "{}",
        seen.join("\n")
    );
    more_orphans_are_deleted(&w, "later", 5, Duration::from_secs(60));
    drop(proc);
    drop(pooler);
}

/// In session mode the reaper keeps its server connection, and `NOTIFY` wakes it: with a poll
/// interval of an hour, rows queued after it started are still deleted within seconds. The
/// start-up check does not mistake this pooler for a transaction-mode one.
#[test]
fn through_a_session_pooler_notify_wakes_the_daemon() {
    let w = world("pooler_session", 5);
    let pooler = Pooler::start(&w.db.name, "session", 4);
    let (proc, rx) = daemon(&w, &pooler.url(&w.db.name, "reaper_login"), "1h");
    let seen = log_until(&rx, "listening for NOTIFY", Duration::from_secs(60));
    assert!(
        !seen.iter().any(|l| l.contains("NOTIFY does not reach")),
        "{}",
        seen.join("\n")
    );
    // The first five go on the reaper's first look at the queue; these need a NOTIFY.
    wait_for(
        Duration::from_secs(60),
        "the first orphans to be deleted",
        || {
            let objects = w.emu.objects();
            w.orphans.iter().all(|o| !objects.contains(o))
        },
    );
    more_orphans_are_deleted(&w, "later", 5, Duration::from_secs(30));
    drop(proc);
    drop(pooler);
}
