//! The chaos suite's common ground (`tests/tests/chaos.rs`): the scale a run uses, a ledger of
//! every object a scenario put in storage and what must become of it, the checks every scenario
//! ends with, and the results row that `make chaos` collects into RELIABILITY.md.
//!
//! Every scenario ends with the same four checks, whatever it did to the system on the way:
//! every orphan's object is gone, every saved asset's object exists (and so does every object
//! no cleanup may touch), no queue row is lost, and every queue row is in a final state that the
//! audit log explains.

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use postgres::{Client, GenericClient};

use crate::process::{Hermetic, Proc};
use crate::storage::{output_text, Emulator};

/// `CHAOS_SCALE=full` (what `make chaos` runs) holds the loads the README's table reports;
/// anything else (what `make test` runs) holds smaller loads with the same faults.
pub fn full_scale() -> bool {
    std::env::var("CHAOS_SCALE").as_deref() == Ok("full")
}

pub fn by_scale(ci: usize, full: usize) -> usize {
    if full_scale() {
        full
    } else {
        ci
    }
}

/// What the scenario put in storage: which job's output each object is, and which objects no
/// cleanup may ever delete (other buckets, bait that hostile URLs point at).
#[derive(Default)]
pub struct Ledger {
    /// job id -> `bucket/key` of its output.
    jobs: BTreeMap<String, String>,
    keep: BTreeSet<String>,
    uploaded: BTreeSet<String>,
}

impl Ledger {
    /// Uploads `renders/<key>` for each key and inserts a completed job per object, created
    /// `age` ago, in one statement. Returns the job ids in the order of `keys`.
    pub fn renders(
        &mut self,
        c: &mut impl GenericClient,
        emu: &Emulator,
        keys: &[String],
        age: &str,
    ) -> Vec<String> {
        for key in keys {
            emu.upload("renders", key, b"render bytes");
            self.uploaded.insert(format!("renders/{key}"));
        }
        let urls: Vec<String> = keys.iter().map(|k| emu.public_url("renders", k)).collect();
        let rows = c
            .query(
                "INSERT INTO render_jobs (status, output_url, created_at, prompt)
                 SELECT 'completed', u, pg_catalog.now() - $2::text::interval, 'chaos'
                 FROM unnest($1::text[]) WITH ORDINALITY AS t(u, n) ORDER BY n
                 RETURNING id::text",
                &[&urls, &age],
            )
            .unwrap();
        let ids: Vec<String> = rows.iter().map(|r| r.get(0)).collect();
        for (id, key) in ids.iter().zip(keys) {
            self.jobs.insert(id.clone(), format!("renders/{key}"));
        }
        ids
    }

    /// Uploads an object that must survive whatever the scenario does.
    pub fn keep(&mut self, emu: &Emulator, bucket: &str, key: &str) {
        emu.upload(bucket, key, b"keep me");
        self.uploaded.insert(format!("{bucket}/{key}"));
        self.keep.insert(format!("{bucket}/{key}"));
    }

    pub fn jobs(&self) -> usize {
        self.jobs.len()
    }
}

/// What the checks found. Every `*_lost`, `*_left` and `unfinished`/`unexplained` count must be
/// zero.
#[derive(Debug, Default)]
pub struct Outcome {
    pub orphans: usize,
    pub orphans_left: BTreeSet<String>,
    pub saved: usize,
    pub saved_lost: BTreeSet<String>,
    pub kept: usize,
    pub kept_lost: BTreeSet<String>,
    /// Objects storage no longer has, of those the scenario uploaded.
    pub deleted_objects: usize,
    pub rows: i64,
    pub rows_lost: i64,
    pub rows_unfinished: i64,
    pub rows_unexplained: i64,
    pub states: BTreeMap<String, i64>,
}

impl Outcome {
    pub fn lost(&self) -> usize {
        self.orphans_left.len()
            + self.saved_lost.len()
            + self.kept_lost.len()
            + (self.rows_lost + self.rows_unfinished + self.rows_unexplained) as usize
    }

    /// The results table's "lost" cell.
    pub fn lost_cell(&self) -> String {
        format!(
            "**{}**: {} queue rows lost, {} unfinished, {} unexplained; {} saved files deleted; {} protected files deleted; {} orphans left",
            self.lost(),
            self.rows_lost,
            self.rows_unfinished,
            self.rows_unexplained,
            self.saved_lost.len(),
            self.kept_lost.len(),
            self.orphans_left.len()
        )
    }

    pub fn states_text(&self) -> String {
        self.states
            .iter()
            .map(|(s, n)| format!("{n} {s}"))
            .collect::<Vec<_>>()
            .join(", ")
    }
}

/// The four checks every scenario ends with. Call it once the scenario has stopped its reapers
/// and savers and has let the queue settle.
pub fn check(c: &mut Client, emu: &Emulator, ledger: &Ledger) -> Outcome {
    let present = emu.objects();
    let referenced: BTreeSet<String> = c
        .query(
            "SELECT DISTINCT metadata ->> 'render_job_id' FROM user_assets WHERE metadata ? 'render_job_id'",
            &[],
        )
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    let mut o = Outcome::default();
    for (job, object) in &ledger.jobs {
        if referenced.contains(job) {
            o.saved += 1;
            if !present.contains(object) {
                o.saved_lost.insert(object.clone());
            }
        } else if !ledger.keep.contains(object) {
            o.orphans += 1;
            if present.contains(object) {
                o.orphans_left.insert(object.clone());
            }
        }
    }
    for object in &ledger.keep {
        o.kept += 1;
        if !present.contains(object) {
            o.kept_lost.insert(object.clone());
        }
    }
    o.deleted_objects = ledger.uploaded.difference(&present).count();
    o.rows = one(c, "SELECT count(*) FROM orphan_cleanup.deletion_queue");
    // Lost: a row the audit log says was queued that is not in the queue, or a queue row no
    // audit row says was ever queued.
    o.rows_lost = one(
        c,
        "WITH queued AS (SELECT DISTINCT a.queue_id FROM orphan_cleanup.audit_log AS a
                         WHERE a.action IN ('enqueued', 'rejected') AND a.queue_id IS NOT NULL)
         SELECT (SELECT count(*) FROM queued AS q
                 WHERE NOT EXISTS (SELECT 1 FROM orphan_cleanup.deletion_queue AS d WHERE d.id = q.queue_id))
              + (SELECT count(*) FROM orphan_cleanup.deletion_queue AS d
                 WHERE NOT EXISTS (SELECT 1 FROM queued AS q WHERE q.queue_id = d.id))",
    );
    o.rows_unfinished = unfinished(c);
    // Unexplained: a final state without the audit row that records it, or a row confirmed
    // gone more than once. (The audit log is read once, grouped by queue row: it has no index
    // by queue row, and a correlated look-up per row would read it once per row.)
    o.rows_unexplained = one(
        c,
        "WITH a AS (SELECT a.queue_id, array_agg(DISTINCT a.action) AS actions,
                           count(*) FILTER (WHERE a.action IN ('deleted', 'absent')) AS gone
                    FROM orphan_cleanup.audit_log AS a WHERE a.queue_id IS NOT NULL GROUP BY a.queue_id)
         SELECT count(*) FROM orphan_cleanup.deletion_queue AS d LEFT JOIN a ON a.queue_id = d.id
         WHERE d.state NOT IN ('pending', 'claimed')
           AND (a.queue_id IS NULL
                OR NOT (CASE d.state WHEN 'dead' THEN 'dead_lettered' WHEN 'stale' THEN 'cancelled' ELSE d.state END = ANY (a.actions))
                OR a.gone > 1)",
    );
    o.states = c
        .query(
            "SELECT state, count(*) FROM orphan_cleanup.deletion_queue GROUP BY 1",
            &[],
        )
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    o
}

/// One row of the results table.
pub struct Report {
    pub number: u32,
    pub scenario: &'static str,
    pub load: String,
    pub faults: String,
    pub notes: String,
}

/// Writes the scenario's row (to `$CHAOS_RESULTS/NN.md` when set, and to stderr), then fails
/// the test if anything was lost, naming what.
pub fn record(report: Report, o: &Outcome) {
    let row = format!(
        "| {}. {} | {} | {} | {} | {} |\n",
        report.number,
        report.scenario,
        report.load,
        report.faults,
        o.lost_cell(),
        report.notes
    );
    eprint!("chaos result: {row}");
    if let Ok(dir) = std::env::var("CHAOS_RESULTS") {
        std::fs::create_dir_all(&dir).unwrap();
        let mut f = std::fs::File::create(format!("{dir}/{:02}.md", report.number)).unwrap();
        f.write_all(row.as_bytes()).unwrap();
    }
    assert_eq!(
        o.lost(),
        0,
        "scenario {} lost something: {o:#?}",
        report.scenario
    );
}

/// Restarts the cluster: `restart` (fast shutdown) or `crash` (immediate stop, then crash
/// recovery).
pub fn cluster(how: &str) {
    let out = Command::new(crate::repo_root().join("scripts/cluster.sh"))
        .arg(how)
        .env("PGOC_PORT", crate::port().to_string())
        .run();
    assert!(
        out.status.success(),
        "cluster.sh {how}: {}",
        output_text(&out)
    );
}

/// The one number a query returns.
pub fn one(c: &mut Client, sql: &str) -> i64 {
    c.query_one(sql, &[]).unwrap().get(0)
}

/// Rows not yet in a final state.
pub fn unfinished(c: &mut Client) -> i64 {
    one(
        c,
        "SELECT count(*) FROM orphan_cleanup.deletion_queue WHERE state IN ('pending', 'claimed')",
    )
}

/// A reaper child whose output goes to a file, so a long run cannot fill a pipe and block.
/// Killed with its test (see [`crate::process`]).
pub struct Running {
    pub child: Proc,
    pub log: std::path::PathBuf,
}

impl Running {
    pub fn spawn(mut cmd: Command, log: std::path::PathBuf) -> Running {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .unwrap();
        let child = Proc::spawn(
            cmd.stdout(Stdio::from(file.try_clone().unwrap()))
                .stderr(Stdio::from(file)),
        );
        Running { child, log }
    }

    /// Panics with the reaper's output if it has exited: a wait on its progress would only
    /// time out.
    pub fn assert_running(&mut self) {
        if let Some(status) = self.child.try_wait() {
            panic!("the reaper exited ({status}): {}", self.output());
        }
    }

    pub fn output(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// SIGTERM, then waits for a clean exit.
    pub fn stop(mut self) -> String {
        self.child.signal(libc::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(status) = self.child.try_wait() {
                let text = self.output();
                assert!(status.success(), "the reaper did not stop cleanly: {text}");
                return text;
            }
            assert!(
                Instant::now() < deadline,
                "the reaper ignored SIGTERM: {}",
                self.output()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// `kill -9`, as a crash would.
    pub fn kill(self) {
        self.child.kill();
    }
}
