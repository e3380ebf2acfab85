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
extension_sql_file!("../sql/pause.sql", name = "pause", requires = ["schema"]);
extension_sql_file!(
    "../sql/detect.sql",
    name = "detect",
    requires = [
        "schema",
        "pause",
        urls::check_output_url,
        urls::object_key,
        urls::object_keys,
        urls::redact_url,
        config::_config
    ]
);
extension_sql_file!(
    "../sql/guard.sql",
    name = "guard",
    requires = [
        "detect",
        refusals::_note_refusal,
        refusals::_take_refusals,
        urls::_route_count,
        urls::_reading_size
    ]
);
extension_sql_file!(
    "../sql/queue.sql",
    name = "queue",
    requires = ["guard", config::_allowed_hosts, config::_normalize_hosts]
);
extension_sql_file!("../sql/breaker.sql", name = "breaker", requires = ["queue"]);
extension_sql_file!(
    "../sql/reports.sql",
    name = "reports",
    requires = ["breaker"]
);
extension_sql_file!(
    "../sql/inventory.sql",
    name = "inventory",
    requires = ["reports"]
);
extension_sql_file!(
    "../sql/references.sql",
    name = "references",
    requires = ["inventory"]
);
extension_sql_file!(
    "../sql/partitions.sql",
    name = "partitions",
    requires = ["references"]
);
extension_sql_file!(
    "../sql/strays.sql",
    name = "strays",
    requires = ["partitions"]
);
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
mod tests {
    use pgrx::prelude::*;

    #[pg_test]
    fn job_ref_key_reads_every_spelling_of_a_uuid() {
        for spelling in [
            "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11",
            "A0EEBC99-9C0B-4EF8-BB6D-6BB9BD380A11",
            " {a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11} ",
            "a0eebc999c0b4ef8bb6d6bb9bd380a11",
            "\ta0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11\n",
            "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11\u{a0}",
            "urn:uuid:a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11",
            "\"a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11\"",
            "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11x",
        ] {
            let key = Spi::get_one_with_args::<String>(
                "SELECT orphan_cleanup.job_ref_key($1)",
                &[spelling.into()],
            );
            assert_eq!(
                key,
                Ok(Some("a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11".to_string())),
                "{spelling:?}"
            );
        }
        for junk in ["", "not-a-uuid", "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a1"] {
            let key = Spi::get_one_with_args::<String>(
                "SELECT orphan_cleanup.job_ref_key($1)",
                &[junk.into()],
            );
            assert_eq!(key, Ok(None), "{junk:?}");
        }
    }

    #[pg_test(error = "parameter \"orphan_cleanup.jobs_table\" cannot be changed now")]
    fn settings_cannot_be_set_in_a_session() {
        Spi::run("SET orphan_cleanup.jobs_table = 'public.other'").unwrap();
    }

    #[pg_test(error = "pg_orphan_cleanup is not attached to any tables, so claim() cannot run")]
    fn claims_refuse_before_attach() {
        Spi::run("SELECT * FROM orphan_cleanup.claim('w1')").unwrap();
    }

    #[pg_test]
    fn parse_output_url_names_the_problem() {
        let err = Spi::get_one::<String>(
            "SELECT error FROM orphan_cleanup.parse_output_url('renders/a%2Fb.png')",
        );
        assert_eq!(
            err,
            Ok(Some(
                "character '%' is not allowed in a storage object name".to_string()
            ))
        );
        let form = Spi::get_one::<String>(
            "SELECT form FROM orphan_cleanup.parse_output_url('https://x.supabase.co/storage/v1/render/image/public/r/a.png?width=10')",
        );
        assert_eq!(form, Ok(Some("render_image".to_string())));
    }
}

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
