//! `reaper run --cycle-every`: the reaper runs the cleanup cycles itself, for a database with
//! no scheduler of its own (the managed edition without pg_cron: no background worker there).
//!
//! A cycle is `SELECT * FROM orphan_cleanup.run_cycle()`, exactly what the worker and a pg_cron
//! job run; the reaper's role needs `EXECUTE` on it, which it does not have by default (least
//! privilege: a reaper only drains). Running cycles from two places is harmless (cycles take
//! turns on a lock), only wasteful.

use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::database::Database;
use crate::queue::{Queue, QueueError};

/// How long one cycle may take at most, beyond --db-timeout: it keeps to its own budget
/// (cycle_time_budget) after any ANALYZE it needs.
const CYCLE_WITHIN: Duration = Duration::from_secs(600);

/// Runs a cycle now and then every `every`, until `shutdown`.
pub async fn run(
    database: Database,
    every: Duration,
    timeout: Duration,
    shutdown: CancellationToken,
) {
    let mut queue: Option<Queue> = None;
    loop {
        if queue.as_ref().is_none_or(Queue::is_closed) {
            queue = match Queue::connect(&database, "cycles", false, timeout).await {
                Ok(q) => Some(q),
                Err(e) => {
                    tracing::warn!(error = %e, "cannot connect to run a cleanup cycle; trying again at the next one");
                    None
                }
            };
        }
        if let Some(q) = &queue {
            match q.run_cycle(CYCLE_WITHIN).await {
                Ok(c) => tracing::info!(
                    cycle = c.id,
                    status = %c.status,
                    found = c.found,
                    enqueued = c.enqueued,
                    rejected = c.rejected,
                    duration_ms = c.duration_ms,
                    "cleanup cycle (--cycle-every)"
                ),
                Err(e) => {
                    tracing::error!(error = %explain(&e), "cleanup cycle failed (--cycle-every)")
                }
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(every) => {}
            _ = shutdown.cancelled() => return,
        }
    }
}

/// A refused call names the grant that --cycle-every needs.
fn explain(e: &QueueError) -> String {
    let text = e.to_string();
    if text.contains("permission denied for function run_cycle") {
        format!("{text}; --cycle-every needs: GRANT EXECUTE ON FUNCTION orphan_cleanup.run_cycle() TO orphan_cleanup_reaper; (or schedule cycles with pg_cron and drop --cycle-every)")
    } else {
        text
    }
}
