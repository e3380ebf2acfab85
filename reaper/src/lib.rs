//! The reaper: drains pg_orphan_cleanup's deletion queue into Supabase Storage.
//!
//! `main.rs` is a thin shell over this library: `config` reads and checks the settings,
//! `database` the connection string and its TLS (libpq's sslmode),
//! `queue` talks to the extension's SQL API, `cycles` runs cleanup cycles for `run --cycle-every`, `storage` to the Storage API, `absence` checks an "already absent" answer, `reaper` is the drain
//! loop, `limit` its optional hourly cap, `live` whether it makes progress (/livez), `shutdown` turns signals into a clean stop, `metrics`
//! and `http` expose what happens, `report` lays out what the cleanup saved, `inventory` lists buckets for databases without
//! storage.objects, and `temp` is the guide's local temp-file cleanup.

pub mod absence;
pub mod config;
pub mod cycles;
pub mod database;
pub mod http;
pub mod inventory;
pub mod limit;
pub mod live;
pub mod metrics;
pub mod queue;
pub mod reaper;
pub mod report;
pub mod secret;
pub mod shutdown;
pub mod storage;
pub mod temp;
