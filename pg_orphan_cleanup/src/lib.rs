//! pg_orphan_cleanup: finds orphaned render outputs and queues their storage objects for
//! deletion, without ever touching a file that a saved asset points to.
//!
//! The Rust half holds what SQL cannot do well: the settings (`guc`), the URL parser shared
//! with the reaper (`urls`), the background worker (`worker`), and the shared-memory notes that
//! let a refused save be audited although its transaction rolls back (`refusals`). Detection,
//! the queue and the save guard are SQL in `sql/*.sql`, because their correctness is about locks
//! and snapshots, and that reads best as the statements themselves.

// Set-returning SQL functions spell their columns as TableIterator tuples; that is pgrx's idiom.
#![allow(clippy::type_complexity)]

use pgrx::prelude::*;

mod config;
mod guc;
mod refusals;
mod urls;
mod worker;

::pgrx::pg_module_magic!();

extension_sql_file!("../sql/schema.sql", name = "schema", bootstrap);
extension_sql_file!(
    "../sql/detect.sql",
    name = "detect",
    requires = [
        "schema",
        urls::check_output_url,
        urls::object_key,
        urls::redact_url,
        config::_config
    ]
);
extension_sql_file!(
    "../sql/guard.sql",
    name = "guard",
    requires = ["detect", refusals::_note_refusal, refusals::_take_refusals]
);
extension_sql_file!("../sql/queue.sql", name = "queue", requires = ["guard"]);
extension_sql_file!("../sql/reports.sql", name = "reports", requires = ["queue"]);
extension_sql_file!("../sql/grants.sql", name = "grants", finalize);

#[pg_guard]
pub extern "C-unwind" fn _PG_init() {
    guc::init();
    if unsafe { pg_sys::process_shared_preload_libraries_in_progress } {
        refusals::init();
        worker::register();
    }
}

#[cfg(any(test, feature = "pg_test"))]
#[pg_schema]
mod tests {}

/// Required by `cargo pgrx test`.
#[cfg(test)]
pub mod pg_test {
    pub fn setup(_options: Vec<&str>) {}

    pub fn postgresql_conf_options() -> Vec<&'static str> {
        vec![
            "shared_preload_libraries = 'pg_orphan_cleanup'",
            "orphan_cleanup.enabled = off",
        ]
    }
}
