//! The background worker: runs `orphan_cleanup.run_cycle()` every `orphan_cleanup.interval`.
//!
//! It wakes once a second, so a reloaded `interval` or `enabled` takes effect within a second
//! rather than after the old interval ran out. It idles on a hot standby and waits quietly
//! while the extension does not exist in its database. Errors inside a cycle are caught and
//! recorded by `run_cycle()` itself; anything that escapes ends the process with exit code 1,
//! and the postmaster starts it again after `RESTART_AFTER`.
//!
//! It says what it is doing in `pg_stat_activity.query` (`paused: ...`, `idle: ...`, `running a
//! cleanup cycle`), so a DBA sees at a glance why no cycle runs, and a test can wait for the
//! worker to have taken a reloaded setting into account instead of sleeping and hoping.

use std::ffi::CString;
use std::time::{Duration, Instant};

use pgrx::bgworkers::{
    BackgroundWorker, BackgroundWorkerBuilder, BgWorkerStartTime, SignalWakeFlags,
};
use pgrx::prelude::*;

use crate::guc;

const RESTART_AFTER: Duration = Duration::from_secs(5);
const TICK: Duration = Duration::from_secs(1);
/// How often to look again for the extension while it is missing.
const MISSING_EXTENSION_RECHECK: Duration = Duration::from_secs(10);

pub fn register() {
    BackgroundWorkerBuilder::new("pg_orphan_cleanup worker")
        .set_type("pg_orphan_cleanup")
        .set_function("orphan_cleanup_worker_main")
        .set_library("pg_orphan_cleanup")
        .enable_spi_access()
        // Start on a hot standby too (and idle there): health() then sees the worker everywhere,
        // and after a promotion it simply starts running cycles.
        .set_start_time(BgWorkerStartTime::ConsistentState)
        .set_restart_time(Some(RESTART_AFTER))
        .load();
}

/// What the worker found when a cycle was due.
enum Tick {
    /// A cycle ran; `more` when it stopped at its time budget with work left, so that the next
    /// one follows at once instead of an interval later.
    Ran {
        more: bool,
    },
    Standby,
    NoExtension,
    NotAttached,
    /// An index the cycle's per-row lookups need is missing or unusable: why, and the statements
    /// that fix it. Every cycle would refuse, so none is started until the indexes exist.
    NoIndexes(String),
}

#[pg_guard]
#[unsafe(no_mangle)]
pub extern "C-unwind" fn orphan_cleanup_worker_main(_arg: pg_sys::Datum) {
    BackgroundWorker::attach_signal_handlers(SignalWakeFlags::SIGHUP);
    // SIGTERM (pg_terminate_backend, DROP DATABASE ... WITH (FORCE), a fast shutdown) is
    // handled the way a regular backend handles it: PostgreSQL's own `die` marks the process for
    // termination, and the next interrupt check (inside any query, lock wait or latch wait) ends
    // it. pgrx's handler only sets a flag the loop reads between cycles, so a worker in a long
    // cycle, or waiting on a lock, ignored pg_terminate_backend until the cycle ended.
    unsafe {
        #[cfg(not(feature = "pg18"))]
        pg_sys::pqsignal(libc_sigterm(), Some(postgres_die));
        #[cfg(feature = "pg18")]
        pg_sys::pqsignal_be(libc_sigterm(), Some(postgres_die));
    }
    let database = guc::text(&guc::DATABASE);
    BackgroundWorker::connect_worker_to_spi(Some(&database), None);
    log!("pg_orphan_cleanup worker started in database \"{database}\"");

    let mut next_run = Instant::now();
    let mut said_missing = false;
    let mut said_standby = false;
    let mut said_indexes: Option<String> = None;
    let mut activity = Activity::default();
    while BackgroundWorker::wait_latch(Some(TICK)) {
        pgrx::check_for_interrupts!();
        report_table_counts();
        if BackgroundWorker::sighup_received() {
            unsafe { pg_sys::ProcessConfigFile(pg_sys::GucContext::PGC_SIGHUP) };
        }
        if crate::refusals::pending(u32::from(unsafe { pg_sys::MyDatabaseId })) {
            BackgroundWorker::transaction(flush_refusals);
        }
        let interval = Duration::from_secs(guc::INTERVAL.get().max(1) as u64);
        // A shorter interval set by reload applies at once, not after the old one ran out.
        next_run = next_run.min(Instant::now() + interval);
        if !guc::ENABLED.get() {
            activity.idle("paused: orphan_cleanup.enabled = off".into());
            continue;
        }
        if Instant::now() < next_run {
            activity.idle(format!(
                "idle: cycles every {} s (orphan_cleanup.interval)",
                interval.as_secs()
            ));
            continue;
        }
        activity.running("running a cleanup cycle");
        match BackgroundWorker::transaction(run_due_cycle) {
            Tick::Ran { more } => {
                if said_indexes.take().is_some() {
                    log!("pg_orphan_cleanup worker: the indexes are usable now; cycles resume");
                }
                said_missing = false;
                said_standby = false;
                // A cycle that ran out of time (a backlog, a long full sweep) is carried on at
                // the next tick: each transaction stays short, and the work still gets done.
                next_run = Instant::now() + if more { TICK } else { interval };
            }
            Tick::Standby => {
                if !said_standby {
                    log!("pg_orphan_cleanup worker: this server is a standby; cycles run on the primary only");
                    said_standby = true;
                }
                activity.idle("standby: cycles run on the primary only".into());
                next_run = Instant::now() + MISSING_EXTENSION_RECHECK;
            }
            Tick::NoIndexes(problem) => {
                // Said once per distinct problem, not every 10 s; health() keeps saying it.
                if said_indexes.as_deref() != Some(problem.as_str()) {
                    warning!("pg_orphan_cleanup worker: cycles refused: {problem}");
                    said_indexes = Some(problem);
                }
                activity.idle("waiting: an index pg_orphan_cleanup relies on is missing or unusable; see SELECT * FROM orphan_cleanup.health()".into());
                next_run = Instant::now() + MISSING_EXTENSION_RECHECK;
            }
            Tick::NoExtension | Tick::NotAttached => {
                if !said_missing {
                    log!("pg_orphan_cleanup worker: waiting in database \"{database}\": run CREATE EXTENSION pg_orphan_cleanup and SELECT * FROM orphan_cleanup.attach() there");
                    said_missing = true;
                }
                activity.idle(format!("waiting: run CREATE EXTENSION pg_orphan_cleanup and SELECT * FROM orphan_cleanup.attach() in database \"{database}\""));
                next_run = Instant::now() + MISSING_EXTENSION_RECHECK;
            }
        }
    }
    // Only the postmaster's death ends the loop; SIGTERM ends the process through `die`.
    log!("pg_orphan_cleanup worker stopping");
    // Exit code 1 asks the postmaster to start the worker again (after pg_terminate_backend);
    // during a server shutdown it is simply not restarted.
    unsafe { pg_sys::proc_exit(1) };
}

unsafe extern "C-unwind" {
    /// PostgreSQL's SIGTERM handler for backends (tcop/postgres.c). pgrx's `pg_sys::die` is a
    /// Rust wrapper, not a signal handler.
    #[link_name = "die"]
    fn postgres_die(signal: std::ffi::c_int);
}

fn libc_sigterm() -> std::ffi::c_int {
    pg_sys::SIGTERM as std::ffi::c_int
}

/// What the worker shows in `pg_stat_activity` (`state` and `query`), reported only when it
/// changes.
#[derive(Default)]
struct Activity {
    shown: String,
}

impl Activity {
    fn idle(&mut self, text: String) {
        self.report(pg_sys::BackendState::STATE_IDLE, text);
    }

    fn running(&mut self, text: &str) {
        self.report(pg_sys::BackendState::STATE_RUNNING, text.to_string());
    }

    fn report(&mut self, state: pg_sys::BackendState::Type, text: String) {
        if self.shown == text {
            return;
        }
        let c = CString::new(text.clone()).unwrap_or_default();
        // SAFETY: copies the string into the backend's status entry; called outside any SPI use.
        unsafe { pg_sys::pgstat_report_activity(state, c.as_ptr()) };
        self.shown = text;
    }
}

/// Writes refused saves noted in shared memory to the audit log.
fn flush_refusals() {
    if select_bool("SELECT to_regproc('orphan_cleanup._flush_refusals') IS NOT NULL") {
        if let Err(e) = Spi::run("SELECT orphan_cleanup._flush_refusals()") {
            warning!("pg_orphan_cleanup worker: could not audit refused saves: {e}");
        }
    }
}

/// Reports what the last transactions inserted, updated and deleted to the cumulative statistics
/// (rate-limited by PostgreSQL to once a second). A regular backend does this when it goes idle;
/// a background worker only when it asks. Without it autovacuum, and the extension's own
/// `_refresh_statistics()`, never learned that a backlog cycle wrote 500,000 queue rows, and
/// the queue kept the statistics of an empty table. Outside any transaction, as required.
fn report_table_counts() {
    unsafe {
        pg_sys::pgstat_report_stat(false);
    }
}

fn run_due_cycle() -> Tick {
    if select_bool("SELECT pg_catalog.pg_is_in_recovery()") {
        return Tick::Standby;
    }
    if !select_bool(
        "SELECT EXISTS (SELECT 1 FROM pg_catalog.pg_extension WHERE extname = 'pg_orphan_cleanup')",
    ) {
        return Tick::NoExtension;
    }
    // Until a DBA runs attach(), a cycle could only fail; wait quietly like for the extension.
    if !select_bool("SELECT EXISTS (SELECT 1 FROM orphan_cleanup.attachment)") {
        return Tick::NotAttached;
    }
    // Looked at before the cycle rather than left to run_cycle()'s refusal: the worker then waits
    // quietly, instead of recording a failed cycle and a warning every interval. (An error in
    // a query here would end the worker: the function is looked for first, since an extension
    // not yet updated to this library's version lacks it.)
    let current = select_bool(
        "SELECT to_regprocedure('orphan_cleanup._index_problem(oid, oid, text, boolean)') IS NOT NULL",
    );
    if let Some(problem) = current
        .then(|| {
            select_text(
                "SELECT orphan_cleanup._index_problem(a.jobs_oid, a.assets_oid, a.age_column)
         FROM orphan_cleanup.attachment AS a
         WHERE orphan_cleanup._drift(a) IS NULL",
            )
        })
        .flatten()
    {
        return Tick::NoIndexes(problem);
    }
    let cycle = match Spi::get_one::<i64>("SELECT cycle_id FROM orphan_cleanup.run_cycle()") {
        Ok(id) => id,
        Err(e) => {
            warning!("pg_orphan_cleanup worker: run_cycle() failed: {e}");
            None
        }
    };
    // The cycle's own row says whether it ran out of time (a statement of its own: the one that
    // ran the cycle could not see the row the cycle wrote). A dry run moves no cursor, so its
    // next cycle would only read the same jobs again: it waits for the interval.
    let more = match cycle {
        Some(id) if current => select_bool(&format!(
            "SELECT out_of_time AND status = 'ok' FROM orphan_cleanup.cycle_log WHERE id = {id}"
        )),
        _ => false,
    };
    Tick::Ran { more }
}

/// Runs a read-only query that returns one text, or none.
fn select_text(sql: &str) -> Option<String> {
    Spi::connect(|client| {
        client
            .select(sql, Some(1), &[])?
            .first()
            .get_one::<String>()
    })
    .ok()
    .flatten()
}

/// Runs a read-only query that returns one boolean. Read-only matters: pgrx's `Spi::get_one`
/// takes the read-write path, which assigns a transaction id (an error on a standby, and a
/// wasted XID every tick on a primary).
fn select_bool(sql: &str) -> bool {
    Spi::connect(|client| client.select(sql, Some(1), &[])?.first().get_one::<bool>())
        .ok()
        .flatten()
        .unwrap_or(false)
}
