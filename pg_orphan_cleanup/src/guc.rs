//! The `orphan_cleanup.*` settings.
//!
//! Every setting is `PGC_SIGHUP` (reload) or `PGC_POSTMASTER` (startup): the queue functions run
//! with the extension owner's rights, so a session must never be able to `SET` them and point
//! those functions at another table or bucket. Durations are integers in seconds with
//! PostgreSQL's own unit parsing, so `'3min'`, `'1h'` and `'30d'` work and nonsense is refused
//! by the server itself. List settings are checked by hooks, so a bad value is refused at
//! reload with a message, and the previous value stays in force.

use std::ffi::{c_char, c_void, CStr, CString};

use pgrx::guc::{GucContext, GucFlags, GucRegistry, GucSetting};
use pgrx::{pg_sys, PostgresGucEnum};

pub static DATABASE: GucSetting<Option<CString>> =
    GucSetting::<Option<CString>>::new(Some(c"postgres"));
pub static ENABLED: GucSetting<bool> = GucSetting::<bool>::new(true);
pub static REAPING_ENABLED: GucSetting<bool> = GucSetting::<bool>::new(true);
pub static INTERVAL: GucSetting<i32> = GucSetting::<i32>::new(3600);
pub static MIN_AGE: GucSetting<i32> = GucSetting::<i32>::new(3600);
pub static AGE_COLUMN: GucSetting<Option<CString>> =
    GucSetting::<Option<CString>>::new(Some(c"created_at"));
pub static GRACE: GucSetting<i32> = GucSetting::<i32>::new(0);
pub static MAX_PER_CYCLE: GucSetting<i32> = GucSetting::<i32>::new(10_000);
/// Milliseconds. A cycle's transaction ends once this much time is spent: it holds a snapshot
/// (and so holds back vacuum) for at most about this long, and the next cycle goes on from
/// where it stopped.
pub static CYCLE_TIME_BUDGET: GucSetting<i32> = GucSetting::<i32>::new(5_000);
pub static JOBS_TABLE: GucSetting<Option<CString>> =
    GucSetting::<Option<CString>>::new(Some(c"public.render_jobs"));
pub static ASSETS_TABLE: GucSetting<Option<CString>> =
    GucSetting::<Option<CString>>::new(Some(c"public.user_assets"));
pub static ALLOWED_BUCKETS: GucSetting<Option<CString>> = GucSetting::<Option<CString>>::new(None);
pub static ALLOWED_PREFIXES: GucSetting<Option<CString>> = GucSetting::<Option<CString>>::new(None);
pub static ALLOWED_HOSTS: GucSetting<Option<CString>> = GucSetting::<Option<CString>>::new(None);
pub static ON_CONFIRM: GucSetting<OnConfirm> = GucSetting::<OnConfirm>::new(OnConfirm::Delete);
pub static DRY_RUN: GucSetting<bool> = GucSetting::<bool>::new(false);
pub static MAX_ATTEMPTS: GucSetting<i32> = GucSetting::<i32>::new(10);
pub static RETRY_BACKOFF: GucSetting<i32> = GucSetting::<i32>::new(30);
pub static HISTORY_RETENTION: GucSetting<i32> = GucSetting::<i32>::new(30 * 86_400);
/// Seconds. An object in storage younger than this is never a stray: a render service that
/// uploads first writes the job row naming the file after (Iceberg's remove_orphan_files waits
/// 3 days, Delta's VACUUM 7).
pub static STRAY_MIN_AGE: GucSetting<i32> = GucSetting::<i32>::new(7 * 86_400);
/// Off by default: strays are queued (enqueue_strays()) and handed out only once a DBA who has
/// looked at preview_strays() turns this on.
pub static RECLAIM_STRAYS: GucSetting<bool> = GucSetting::<bool>::new(false);
/// Dollars per GB-month of storage, for savings_report()'s projected saving: Supabase's
/// published price past the plan's included storage (https://supabase.com/pricing).
pub static STORAGE_PRICE_PER_GB_MONTH: GucSetting<f64> = GucSetting::<f64>::new(0.021);
pub static FULL_SWEEP_INTERVAL: GucSetting<i32> = GucSetting::<i32>::new(86_400);
pub static BREAKER_FACTOR: GucSetting<f64> = GucSetting::<f64>::new(10.0);
pub static BREAKER_MIN_ROWS: GucSetting<i32> = GucSetting::<i32>::new(1_000);
pub static BREAKER_MAX_FRACTION: GucSetting<f64> = GucSetting::<f64>::new(0.5);
/// Read by SQL (`_pause_point()` in sql/pause.sql) through current_setting().
pub static PAUSE_POINTS: GucSetting<Option<CString>> = GucSetting::<Option<CString>>::new(None);

/// What `confirm()` does to the job row once its file is gone.
#[derive(PostgresGucEnum, Clone, Copy, PartialEq, Eq, Debug)]
pub enum OnConfirm {
    #[name = c"delete"]
    Delete,
    #[name = c"clear_url"]
    ClearUrl,
}

impl OnConfirm {
    pub fn as_str(self) -> &'static str {
        match self {
            OnConfirm::Delete => "delete",
            OnConfirm::ClearUrl => "clear_url",
        }
    }
}

const DAY: i32 = 86_400;

/// Registers every setting. Called from `_PG_init`, in every process that loads the library.
pub fn init() {
    // A startup-only setting can only be defined while the server starts; without
    // shared_preload_libraries there is no worker, so there is nothing for it to configure.
    if unsafe { pg_sys::process_shared_preload_libraries_in_progress } {
        GucRegistry::define_string_guc(
            c"orphan_cleanup.database",
            c"Database the background worker runs cleanup cycles in (startup only).",
            c"The worker waits quietly until CREATE EXTENSION pg_orphan_cleanup has run there.",
            &DATABASE,
            GucContext::Postmaster,
            GucFlags::default(),
        );
    }
    GucRegistry::define_bool_guc(
        c"orphan_cleanup.enabled",
        c"Whether the background worker runs cleanup cycles.",
        c"Off pauses detection without uninstalling anything: the rollback lever.",
        &ENABLED,
        GucContext::Sighup,
        GucFlags::default(),
    );
    GucRegistry::define_bool_guc(
        c"orphan_cleanup.reaping_enabled",
        c"Whether claim() hands queued rows to reapers.",
        c"Off is the stop-deleting-now switch: reapers get nothing until it is on again.",
        &REAPING_ENABLED,
        GucContext::Sighup,
        GucFlags::default(),
    );
    GucRegistry::define_int_guc(
        c"orphan_cleanup.interval",
        c"Time between cleanup cycles of the background worker.",
        c"Accepts units: '3min' while testing, '1h' in production.",
        &INTERVAL,
        1,
        365 * DAY,
        GucContext::Sighup,
        GucFlags::UNIT_S,
    );
    GucRegistry::define_int_guc(
        c"orphan_cleanup.min_age",
        c"How old a completed job must be before it can count as an orphan.",
        c"Measured from orphan_cleanup.age_column.",
        &MIN_AGE,
        0,
        365 * DAY,
        GucContext::Sighup,
        GucFlags::UNIT_S,
    );
    unsafe {
        GucRegistry::define_string_guc_with_hooks(
            c"orphan_cleanup.age_column",
            c"Column of the jobs table that orphan age is measured from.",
            c"created_at by default, as in the deployment guide; a completion timestamp is safer for long renders.",
            &AGE_COLUMN,
            GucContext::Sighup,
            GucFlags::default(),
            Some(check_column),
            None,
            None,
        );
    }
    GucRegistry::define_int_guc(
        c"orphan_cleanup.grace",
        c"How long a queued row waits before a reaper may claim it.",
        c"A window to inspect the queue and cancel rows before anything is deleted.",
        &GRACE,
        0,
        365 * DAY,
        GucContext::Sighup,
        GucFlags::UNIT_S,
    );
    GucRegistry::define_int_guc(
        c"orphan_cleanup.max_per_cycle",
        c"Most rows one cleanup cycle enqueues; the rest wait for the next cycle.",
        c"",
        &MAX_PER_CYCLE,
        1,
        10_000_000,
        GucContext::Sighup,
        GucFlags::default(),
    );
    GucRegistry::define_int_guc(
        c"orphan_cleanup.cycle_time_budget",
        c"How long one cleanup cycle may work before it commits and leaves the rest to the next cycle.",
        c"Bounds the cycle's transaction, and so how long it holds back vacuum and how long a cycle runs at all.",
        &CYCLE_TIME_BUDGET,
        100,
        3_600_000,
        GucContext::Sighup,
        GucFlags::UNIT_MS,
    );
    unsafe {
        GucRegistry::define_string_guc_with_hooks(
            c"orphan_cleanup.jobs_table",
            c"The render jobs table (schema-qualified).",
            c"Changing it stops cycles and claims until orphan_cleanup.attach() runs again.",
            &JOBS_TABLE,
            GucContext::Sighup,
            GucFlags::default(),
            Some(check_table_name),
            None,
            None,
        );
        GucRegistry::define_string_guc_with_hooks(
            c"orphan_cleanup.assets_table",
            c"The saved assets table (schema-qualified).",
            c"Changing it stops cycles and claims until orphan_cleanup.attach() runs again.",
            &ASSETS_TABLE,
            GucContext::Sighup,
            GucFlags::default(),
            Some(check_table_name),
            None,
            None,
        );
        GucRegistry::define_string_guc_with_hooks(
            c"orphan_cleanup.allowed_buckets",
            c"Comma-separated buckets whose objects may be deleted. Empty: none may be.",
            c"",
            &ALLOWED_BUCKETS,
            GucContext::Sighup,
            GucFlags::default(),
            Some(check_buckets),
            None,
            None,
        );
        GucRegistry::define_string_guc_with_hooks(
            c"orphan_cleanup.allowed_prefixes",
            c"Comma-separated object key prefixes allowed inside the allowed buckets. Empty: the whole bucket.",
            c"",
            &ALLOWED_PREFIXES,
            GucContext::Sighup,
            GucFlags::default(),
            Some(check_prefixes),
            None,
            None,
        );
        GucRegistry::define_string_guc_with_hooks(
            c"orphan_cleanup.allowed_hosts",
            c"Comma-separated hosts (host or host:port) an output URL may name. Empty: only bare bucket/path values.",
            c"A URL naming another project's host must never delete an object in this project.",
            &ALLOWED_HOSTS,
            GucContext::Sighup,
            GucFlags::default(),
            Some(check_hosts),
            None,
            None,
        );
    }
    GucRegistry::define_enum_guc(
        c"orphan_cleanup.on_confirm",
        c"What confirm() does to the job row once its file is gone: delete or clear_url.",
        c"",
        &ON_CONFIRM,
        GucContext::Sighup,
        GucFlags::default(),
    );
    GucRegistry::define_bool_guc(
        c"orphan_cleanup.dry_run",
        c"Cycles find and log orphans but enqueue nothing.",
        c"",
        &DRY_RUN,
        GucContext::Sighup,
        GucFlags::default(),
    );
    GucRegistry::define_int_guc(
        c"orphan_cleanup.max_attempts",
        c"Failed deletes (expired leases included) before a row is dead-lettered.",
        c"",
        &MAX_ATTEMPTS,
        1,
        1000,
        GucContext::Sighup,
        GucFlags::default(),
    );
    GucRegistry::define_int_guc(
        c"orphan_cleanup.retry_backoff",
        c"How long a failed delete (or an expired lease) waits before its first retry; each further attempt waits twice as long, at most 1 hour.",
        c"Jittered by +-20% so rows that failed together do not come back together.",
        &RETRY_BACKOFF,
        1,
        3600,
        GucContext::Sighup,
        GucFlags::UNIT_S,
    );
    GucRegistry::define_int_guc(
        c"orphan_cleanup.history_retention",
        c"Finished queue rows, audit and cycle history older than this are pruned.",
        c"",
        &HISTORY_RETENTION,
        3600,
        20 * 365 * DAY,
        GucContext::Sighup,
        GucFlags::UNIT_S,
    );
    GucRegistry::define_int_guc(
        c"orphan_cleanup.full_sweep_interval",
        c"How often a cycle re-examines the whole jobs table instead of only new jobs.",
        c"Catches jobs that completed late and rejected URLs that new settings now allow. 0 sweeps every cycle.",
        &FULL_SWEEP_INTERVAL,
        0,
        365 * DAY,
        GucContext::Sighup,
        GucFlags::UNIT_S,
    );
    GucRegistry::define_float_guc(
        c"orphan_cleanup.breaker_factor",
        c"A cycle that would enqueue more than this many times the median of recent cycles trips the circuit breaker.",
        c"0 turns this check off. The median is over the last 10 cycles that were not working off a backlog.",
        &BREAKER_FACTOR,
        0.0,
        1_000_000.0,
        GucContext::Sighup,
        GucFlags::default(),
    );
    GucRegistry::define_int_guc(
        c"orphan_cleanup.breaker_min_rows",
        c"The circuit breaker never trips on a cycle that would enqueue fewer rows than this.",
        c"",
        &BREAKER_MIN_ROWS,
        0,
        10_000_000,
        GucContext::Sighup,
        GucFlags::default(),
    );
    GucRegistry::define_float_guc(
        c"orphan_cleanup.breaker_max_fraction",
        c"A cycle that would enqueue more than this fraction of the completed jobs with an output URL trips the circuit breaker.",
        c"Estimated from the planner's row counts (reltuples), not counted. 1 turns this check off.",
        &BREAKER_MAX_FRACTION,
        0.0,
        1.0,
        GucContext::Sighup,
        GucFlags::default(),
    );
    GucRegistry::define_int_guc(
        c"orphan_cleanup.stray_min_age",
        c"How old an object in storage must be before it can count as a stray (named by no job).",
        c"Covers a render service that uploads a file before it writes the job naming it. At least 1h; 7 days by default.",
        &STRAY_MIN_AGE,
        3600,
        3650 * DAY,
        GucContext::Sighup,
        GucFlags::UNIT_S,
    );
    GucRegistry::define_bool_guc(
        c"orphan_cleanup.reclaim_strays",
        c"Strays (objects in storage no job names) may be queued and deleted.",
        c"Off by default: look at preview_strays() first.",
        &RECLAIM_STRAYS,
        GucContext::Sighup,
        GucFlags::default(),
    );
    GucRegistry::define_float_guc(
        c"orphan_cleanup.storage_price_per_gb_month",
        c"Storage price in dollars per GB per month, for the projected saving in savings_report().",
        c"Supabase's published price past the plan's included storage is 0.021 (supabase.com/pricing).",
        &STORAGE_PRICE_PER_GB_MONTH,
        0.0,
        1000.0,
        GucContext::Sighup,
        GucFlags::default(),
    );
    GucRegistry::define_string_guc(
        c"orphan_cleanup.pause_points",
        c"For tests: named points (e.g. cycle) where work waits while a session holds the point's advisory lock.",
        c"Empty in production. A named point waits only while someone holds pg_advisory_lock(7310247, hashtext('<point>')).",
        &PAUSE_POINTS,
        GucContext::Sighup,
        GucFlags::default(),
    );
}

/// The text of a string setting, empty when unset.
pub fn text(setting: &GucSetting<Option<CString>>) -> String {
    setting
        .get()
        .map(|c| c.to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// The allow-lists as the shared parser understands them. A cycle checks one URL per row, so
/// the parsed lists are kept until a reload changes the settings' text.
pub fn policy() -> Result<object_url::Policy, object_url::PolicyError> {
    type Cached = (
        [String; 3],
        Result<object_url::Policy, object_url::PolicyError>,
    );
    thread_local! {
        static CACHE: std::cell::RefCell<Option<Cached>> = const { std::cell::RefCell::new(None) };
    }
    let key = [
        text(&ALLOWED_BUCKETS),
        text(&ALLOWED_PREFIXES),
        text(&ALLOWED_HOSTS),
    ];
    CACHE.with(|cache| {
        let mut cache = cache.borrow_mut();
        match cache.as_ref() {
            Some((k, parsed)) if *k == key => parsed.clone(),
            _ => {
                let parsed = object_url::Policy::from_lists(&key[0], &key[1], &key[2]);
                *cache = Some((key, parsed.clone()));
                parsed
            }
        }
    })
}

/// Refuses a setting value with `detail` shown to whoever reloaded or ran ALTER SYSTEM.
unsafe fn refuse(detail: String) -> bool {
    let detail = CString::new(detail).unwrap_or_else(|_| CString::from(c"invalid value"));
    unsafe {
        pg_sys::GUC_check_errdetail_string = pg_sys::pstrdup(detail.as_ptr());
    }
    false
}

unsafe fn new_value<'a>(newval: *mut *mut c_char) -> &'a str {
    unsafe {
        if newval.is_null() || (*newval).is_null() {
            return "";
        }
        CStr::from_ptr(*newval).to_str().unwrap_or("\u{FFFD}")
    }
}

/// Checks one allow-list setting with the same parser the cycle and the reaper use.
unsafe fn check_list(
    newval: *mut *mut c_char,
    setting: &str,
    example: &str,
    parse: fn(&str) -> Result<object_url::Policy, object_url::PolicyError>,
) -> bool {
    let v = unsafe { new_value(newval) };
    match parse(v) {
        Ok(_) => true,
        Err(e) => unsafe {
            refuse(format!(
                "orphan_cleanup.{setting}: {e}. Example: '{example}'."
            ))
        },
    }
}

unsafe extern "C-unwind" fn check_buckets(
    newval: *mut *mut c_char,
    _: *mut *mut c_void,
    _: pg_sys::GucSource::Type,
) -> bool {
    unsafe {
        check_list(newval, "allowed_buckets", "renders,thumbnails", |v| {
            object_url::Policy::from_lists(v, "", "")
        })
    }
}

unsafe extern "C-unwind" fn check_prefixes(
    newval: *mut *mut c_char,
    _: *mut *mut c_void,
    _: pg_sys::GucSource::Type,
) -> bool {
    unsafe {
        check_list(newval, "allowed_prefixes", "renders/,previews/", |v| {
            object_url::Policy::from_lists("", v, "")
        })
    }
}

unsafe extern "C-unwind" fn check_hosts(
    newval: *mut *mut c_char,
    _: *mut *mut c_void,
    _: pg_sys::GucSource::Type,
) -> bool {
    unsafe {
        check_list(
            newval,
            "allowed_hosts",
            "abcd.supabase.co,cdn.example.com",
            |v| object_url::Policy::from_lists("", "", v),
        )
    }
}

unsafe extern "C-unwind" fn check_table_name(
    newval: *mut *mut c_char,
    _: *mut *mut c_void,
    _: pg_sys::GucSource::Type,
) -> bool {
    let v = unsafe { new_value(newval) };
    match split_qualified_name(v) {
        Some(parts) if !parts.is_empty() && parts.len() <= 2 => true,
        _ => unsafe {
            refuse(format!("{v:?} is not a table name; use schema.table, e.g. public.render_jobs (double-quote mixed-case names)."))
        },
    }
}

unsafe extern "C-unwind" fn check_column(
    newval: *mut *mut c_char,
    _: *mut *mut c_void,
    _: pg_sys::GucSource::Type,
) -> bool {
    let v = unsafe { new_value(newval) };
    match split_qualified_name(v) {
        Some(parts) if parts.len() == 1 => true,
        _ => unsafe {
            refuse(format!(
                "{v:?} is not a column name; use e.g. created_at or completed_at."
            ))
        },
    }
}

/// Splits `a.b` / `"A"."b.c"` into its identifiers, as PostgreSQL would read them.
/// Returns `None` for anything that is not a dotted list of identifiers.
pub fn split_qualified_name(s: &str) -> Option<Vec<String>> {
    let mut parts = Vec::new();
    let mut chars = s.trim().chars().peekable();
    loop {
        let mut ident = String::new();
        if chars.peek() == Some(&'"') {
            chars.next();
            loop {
                match chars.next()? {
                    '"' if chars.peek() == Some(&'"') => {
                        chars.next();
                        ident.push('"');
                    }
                    '"' => break,
                    c => ident.push(c),
                }
            }
            if ident.is_empty() {
                return None;
            }
        } else {
            while let Some(&c) = chars.peek() {
                if c.is_alphanumeric() || c == '_' || c == '$' {
                    ident.push(c.to_ascii_lowercase());
                    chars.next();
                } else {
                    break;
                }
            }
            let first = ident.chars().next()?;
            if first.is_ascii_digit() || first == '$' {
                return None;
            }
        }
        parts.push(ident);
        match chars.next() {
            None => return Some(parts),
            Some('.') => continue,
            Some(_) => return None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::split_qualified_name;

    #[test]
    fn qualified_names() {
        assert_eq!(
            split_qualified_name("public.render_jobs"),
            Some(vec!["public".into(), "render_jobs".into()])
        );
        assert_eq!(
            split_qualified_name("Render_Jobs"),
            Some(vec!["render_jobs".into()])
        );
        assert_eq!(
            split_qualified_name("\"My Schema\".\"Jobs\"\"x\""),
            Some(vec!["My Schema".into(), "Jobs\"x".into()])
        );
        assert_eq!(split_qualified_name("public.jobs; drop table x"), None);
        assert_eq!(split_qualified_name(""), None);
        assert_eq!(split_qualified_name("a..b"), None);
        assert_eq!(split_qualified_name("1abc"), None);
    }
}
