//! `orphan_cleanup._config()`: the settings as typed values for the SQL functions.
//!
//! The PL/pgSQL half reads settings only through this function. Calling it also loads the
//! library, so the settings are defined even in a session that has not loaded it yet.

use crate::guc;
use pgrx::prelude::*;

#[pg_extern(stable, parallel_safe)]
fn _config() -> TableIterator<
    'static,
    (
        name!(enabled, bool),
        name!(reaping_enabled, bool),
        name!(interval_s, i32),
        name!(min_age_s, i32),
        name!(age_column, String),
        name!(grace_s, i32),
        name!(max_per_cycle, i32),
        name!(jobs_table, String),
        name!(assets_table, String),
        name!(allowed_buckets, String),
        name!(allowed_prefixes, String),
        name!(allowed_hosts, String),
        name!(on_confirm, String),
        name!(dry_run, bool),
        name!(max_attempts, i32),
        name!(history_retention_s, i32),
        name!(full_sweep_interval_s, i32),
        name!(database, String),
        name!(breaker_factor, f64),
        name!(breaker_min_rows, i32),
        name!(breaker_max_fraction, f64),
        name!(retry_backoff_s, i32),
        name!(cycle_time_budget_ms, i32),
        name!(stray_min_age_s, i32),
        name!(storage_price_per_gb_month, f64),
        name!(reclaim_strays, bool),
    ),
> {
    TableIterator::once((
        guc::ENABLED.get(),
        guc::REAPING_ENABLED.get(),
        guc::INTERVAL.get(),
        guc::MIN_AGE.get(),
        guc::text(&guc::AGE_COLUMN),
        guc::GRACE.get(),
        guc::MAX_PER_CYCLE.get(),
        guc::text(&guc::JOBS_TABLE),
        guc::text(&guc::ASSETS_TABLE),
        guc::text(&guc::ALLOWED_BUCKETS),
        guc::text(&guc::ALLOWED_PREFIXES),
        guc::text(&guc::ALLOWED_HOSTS),
        guc::ON_CONFIRM.get().as_str().to_string(),
        guc::DRY_RUN.get(),
        guc::MAX_ATTEMPTS.get(),
        guc::HISTORY_RETENTION.get(),
        guc::FULL_SWEEP_INTERVAL.get(),
        guc::text(&guc::DATABASE),
        guc::BREAKER_FACTOR.get(),
        guc::BREAKER_MIN_ROWS.get(),
        guc::BREAKER_MAX_FRACTION.get(),
        guc::RETRY_BACKOFF.get(),
        guc::CYCLE_TIME_BUDGET.get(),
        guc::STRAY_MIN_AGE.get(),
        guc::STORAGE_PRICE_PER_GB_MONTH.get(),
        guc::RECLAIM_STRAYS.get(),
    ))
}

/// The hosts of `orphan_cleanup.allowed_hosts`, spelled as the parser spells a URL's host, for
/// claim() to tell whether a reaper's own host is this project's.
#[pg_extern(stable, parallel_safe)]
fn _allowed_hosts() -> Vec<String> {
    guc::policy().map(|p| p.hosts).unwrap_or_default()
}

/// A reaper's hosts, spelled as the parser spells a URL's host (lower case, default port
/// dropped, IDNA), so that claim() compares like with like. Anything that is not one bare host
/// or `host:port` is refused, naming the argument (`what`) and the value.
#[pg_extern(immutable, parallel_safe)]
fn _normalize_hosts(hosts: Vec<Option<String>>, what: &str) -> Vec<String> {
    hosts
        .into_iter()
        .map(|h| {
            let Some(h) = h.filter(|h| !h.trim().is_empty()) else {
                bad_host(what, None, "an entry is empty or NULL")
            };
            match object_url::Policy::from_lists("", "", &h) {
                Ok(p) if p.hosts.len() == 1 => p.hosts[0].clone(),
                Ok(_) => bad_host(what, Some(&h), "it must be one host"),
                Err(e) => bad_host(what, Some(&h), &e.to_string()),
            }
        })
        .collect()
}

fn bad_host(what: &str, host: Option<&str>, why: &str) -> ! {
    let message = match host {
        Some(h) => format!("{what} {h:?} is not a host a reaper can serve: {why}"),
        None => format!("{what} is not a list of hosts a reaper can serve: {why}"),
    };
    pgrx::pg_sys::panic::ErrorReport::new(
        PgSqlErrorCode::ERRCODE_INVALID_PARAMETER_VALUE,
        message,
        "_normalize_hosts",
    )
    .set_hint("Pass bare hosts as the reaper does, e.g. hosts ARRAY['abcd.supabase.co'] and home_host 'abcd.supabase.co' (no scheme, path, port 443 or empty entries needed); NULL hosts means any.")
    .report(PgLogLevel::ERROR);
    unreachable!("an ERROR does not return")
}
