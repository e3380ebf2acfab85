//! Command line and environment. The usual Supabase names come first (`DATABASE_URL`,
//! `SUPABASE_URL`, `SUPABASE_SERVICE_ROLE_KEY`); every setting is checked at start, and a bad
//! one stops the reaper with a message that names the setting and the fix.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};
use thiserror::Error;

use crate::database::Database;
use crate::secret::ServiceKey;

#[derive(Parser, Debug)]
#[command(
    name = "reaper",
    version,
    about = "Deletes the objects pg_orphan_cleanup queued, from Supabase Storage, in bulk."
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
    /// Log format: human-readable text, or one JSON object per line.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text, env = "REAPER_LOG_FORMAT")]
    pub log_format: LogFormat,
}

#[derive(Copy, Clone, Debug, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// The daemon: drain continuously, wake on NOTIFY, poll as a fallback, serve metrics.
    Run(RunArgs),
    /// Drain what is queued now, print a summary, and exit (non-zero on a configuration error).
    Drain(RunArgs),
    /// Queue depth, health and the last cleanup cycle, from the database.
    Status(DbArgs),
    /// What the cleanup reclaimed per day or week: objects, bytes, orphans found, the leak rate
    /// and the projected monthly saving (orphan_cleanup.savings_report()).
    Report(ReportArgs),
    /// Remove regular files older than --temp-max-age under --temp-dir, once, and exit.
    SweepTemp(TempArgs),
    /// List the allowed buckets through the Storage API into the database's object_inventory,
    /// where storage.objects is not in that database: strays are then reconciled against it.
    /// Run it now and then (e.g. daily, from cron); a stray waits for the listing after its upload.
    Inventory(InventoryArgs),
}

#[derive(Args, Debug, Clone)]
pub struct InventoryArgs {
    /// The same settings as `reaper run` (the database, SUPABASE_URL, the key, --buckets).
    #[command(flatten)]
    pub run: RunArgs,
    /// Entries per list request (1 to 1500, the list route's cap).
    #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u16).range(1..=1500))]
    pub page_size: u16,
}

#[derive(Args, Debug, Clone)]
pub struct DbArgs {
    /// PostgreSQL connection string of the reaper's role (a member of orphan_cleanup_reaper).
    #[arg(long, env = "DATABASE_URL", hide_env_values = true)]
    pub database_url: Option<String>,
    /// The longest any database call may take, lock waits included (statement_timeout and
    /// lock_timeout of the reaper's sessions); past it the call fails, the reaper reconnects and
    /// backs off, and /readyz says so.
    #[arg(long, env = "REAPER_DB_TIMEOUT", default_value = "30s")]
    pub db_timeout: String,
}

impl DbArgs {
    pub fn timeout(&self) -> Result<Duration, ConfigError> {
        let t = parse_duration("--db-timeout", &self.db_timeout)?;
        if t < Duration::from_secs(1) || t > Duration::from_secs(3600) {
            return Err(invalid(
                "--db-timeout",
                self.db_timeout.clone(),
                "use 1s to 1h (the default is 30s)",
            ));
        }
        Ok(t)
    }
}

#[derive(Args, Debug, Clone)]
pub struct RunArgs {
    #[command(flatten)]
    pub db: DbArgs,
    /// The project's base URL, e.g. https://abcd.supabase.co (the Storage API is under /storage/v1).
    #[arg(long, env = "SUPABASE_URL")]
    pub supabase_url: Option<String>,
    /// The service-role key. Prefer SUPABASE_SERVICE_ROLE_KEY_FILE in production.
    #[arg(long, env = "SUPABASE_SERVICE_ROLE_KEY", hide_env_values = true)]
    pub service_role_key: Option<String>,
    /// A file holding the service-role key (e.g. a mounted secret).
    #[arg(long, env = "SUPABASE_SERVICE_ROLE_KEY_FILE")]
    pub service_role_key_file: Option<PathBuf>,
    /// Comma-separated buckets this reaper may delete from; rows for other buckets are refused.
    #[arg(long, env = "REAPER_BUCKETS")]
    pub buckets: Option<String>,
    /// Comma-separated hosts that also mean this project (a custom domain), besides SUPABASE_URL's.
    #[arg(long, env = "REAPER_STORAGE_HOSTS", default_value = "")]
    pub storage_hosts: String,
    /// Names per bulk delete request (at most 1000, the API's limit).
    #[arg(long, env = "REAPER_BATCH_SIZE", default_value_t = 1000)]
    pub batch_size: usize,
    /// Bulk delete requests in flight at once.
    #[arg(long, env = "REAPER_CONCURRENCY", default_value_t = 4)]
    pub concurrency: usize,
    /// How long a claim lasts before another reaper may take the row (e.g. 5m, 300s).
    #[arg(long, env = "REAPER_LEASE", default_value = "5m")]
    pub lease: String,
    /// Timeout of one storage request.
    #[arg(long, env = "REAPER_REQUEST_TIMEOUT", default_value = "30s")]
    pub request_timeout: String,
    /// How often to look at the queue when no NOTIFY arrives.
    #[arg(long, env = "REAPER_POLL_INTERVAL", default_value = "10s")]
    pub poll_interval: String,
    /// Most objects this reaper sends for deletion in any hour; past it, it holds back (run) or
    /// stops (drain). A blast-radius limit beside the extension's circuit breaker. Default: none.
    #[arg(long, env = "REAPER_MAX_DELETES_PER_HOUR")]
    pub max_deletes_per_hour: Option<u64>,
    /// Allow an http:// SUPABASE_URL to a host other than this machine: the key then crosses
    /// the network in cleartext. Only for a network you trust (a private link, a sidecar).
    #[arg(long, env = "REAPER_ALLOW_PLAIN_HTTP")]
    pub allow_plain_http: bool,
    /// This reaper's id in the queue (default: host:pid:random, since containers all run as pid 1).
    #[arg(long, env = "REAPER_WORKER_ID")]
    pub worker_id: Option<String>,
    /// Claim nothing and delete nothing: print what would be deleted (from peek()).
    #[arg(long)]
    pub dry_run: bool,
    /// Skip the start-up probe that uploads and deletes one tiny object to prove the key can delete.
    #[arg(long, env = "REAPER_NO_PROBE")]
    pub no_probe: bool,
    /// Also run a cleanup cycle (orphan_cleanup.run_cycle()) this often (run only), e.g. 3min:
    /// for a database with no scheduler (the managed edition without pg_cron). Needs
    /// GRANT EXECUTE ON FUNCTION orphan_cleanup.run_cycle() TO orphan_cleanup_reaper.
    #[arg(long, env = "REAPER_CYCLE_EVERY")]
    pub cycle_every: Option<String>,
    /// Serve /metrics, /livez and /readyz here (run only), e.g. 127.0.0.1:9187.
    #[arg(long, env = "REAPER_METRICS_ADDR")]
    pub metrics_addr: Option<SocketAddr>,
    #[command(flatten)]
    pub temp: TempArgs,
}

#[derive(Args, Debug, Clone)]
pub struct ReportArgs {
    #[command(flatten)]
    pub db: DbArgs,
    /// One row per day or per week (weeks start on Monday, UTC).
    #[arg(long, value_enum, default_value_t = ReportPeriod::Week)]
    pub period: ReportPeriod,
    /// How many periods, the current one last (1 to 3660).
    #[arg(long, default_value_t = 8, value_parser = clap::value_parser!(i32).range(1..=3660))]
    pub periods: i32,
    /// table (with the totals in words), json or csv.
    #[arg(long, value_enum, default_value_t = ReportFormat::Table)]
    pub format: ReportFormat,
    /// Also write the report as one self-contained HTML page with charts (no external assets:
    /// it opens offline and can be attached to a ticket).
    #[arg(long, value_name = "FILE")]
    pub html: Option<PathBuf>,
}

#[derive(Copy, Clone, Debug, PartialEq, Eq, ValueEnum)]
pub enum ReportPeriod {
    Day,
    Week,
}

impl ReportPeriod {
    /// savings_report()'s name for it.
    pub fn as_str(self) -> &'static str {
        match self {
            ReportPeriod::Day => "day",
            ReportPeriod::Week => "week",
        }
    }
}

#[derive(Copy, Clone, Debug, PartialEq, Eq, ValueEnum)]
pub enum ReportFormat {
    Table,
    Json,
    Csv,
}

#[derive(Args, Debug, Clone)]
pub struct TempArgs {
    /// A local directory of temporary render files to keep clean (the guide's TEMP_DIR cleanup).
    #[arg(long, env = "REAPER_TEMP_DIR")]
    pub temp_dir: Option<PathBuf>,
    /// Regular files older than this under --temp-dir are removed.
    #[arg(long, env = "REAPER_TEMP_MAX_AGE", default_value = "1h")]
    pub temp_max_age: String,
    /// How often `run` sweeps --temp-dir.
    #[arg(long, env = "REAPER_TEMP_INTERVAL", default_value = "1h")]
    pub temp_interval: String,
}

/// A setting that cannot work, with the fix.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum ConfigError {
    #[error("{name} is not set: {fix}")]
    Missing {
        name: &'static str,
        fix: &'static str,
    },
    #[error("{name} is invalid ({problem}): {fix}")]
    Invalid {
        name: &'static str,
        problem: String,
        fix: &'static str,
    },
}

fn invalid(name: &'static str, problem: impl Into<String>, fix: &'static str) -> ConfigError {
    ConfigError::Invalid {
        name,
        problem: problem.into(),
        fix,
    }
}

pub fn parse_duration(name: &'static str, text: &str) -> Result<Duration, ConfigError> {
    let text = text.trim();
    let parsed = if text.chars().all(|c| c.is_ascii_digit()) && !text.is_empty() {
        text.parse::<u64>()
            .map(Duration::from_secs)
            .map_err(|e| e.to_string())
    } else {
        humantime::parse_duration(text).map_err(|e| e.to_string())
    };
    parsed.map_err(|e| {
        invalid(
            name,
            format!("{text:?}: {e}"),
            "use a duration such as 30s, 5m or 1h",
        )
    })
}

/// Everything `run` and `drain` need, checked.
#[derive(Debug, Clone)]
pub struct Settings {
    pub database: Database,
    pub db_timeout: Duration,
    /// Base URL of the Storage API, ending in `/storage/v1`.
    pub storage_base: url::Url,
    pub key: ServiceKey,
    pub policy: object_url::Policy,
    /// SUPABASE_URL's host, as the parser spells it: the project this reaper deletes in. The
    /// database hands nothing to a reaper whose home is not one of its
    /// `orphan_cleanup.allowed_hosts` (it would delete another project's objects).
    pub home_host: String,
    pub batch_size: usize,
    pub concurrency: usize,
    pub lease: Duration,
    pub request_timeout: Duration,
    pub poll_interval: Duration,
    pub worker_id: String,
    pub max_deletes_per_hour: Option<u64>,
    pub dry_run: bool,
    pub probe: bool,
    pub metrics_addr: Option<SocketAddr>,
    pub temp: Option<TempSettings>,
    /// --cycle-every: how often this reaper runs a cleanup cycle itself.
    pub cycle_every: Option<Duration>,
}

#[derive(Debug, Clone)]
pub struct TempSettings {
    pub dir: PathBuf,
    pub max_age: Duration,
    pub interval: Duration,
}

/// DATABASE_URL, checked, with its TLS settings (and PGSSLMODE, PGSSLROOTCERT) applied.
pub fn database(db: &DbArgs) -> Result<Database, ConfigError> {
    let url = db.database_url.clone().filter(|u| !u.trim().is_empty()).ok_or(ConfigError::Missing {
        name: "DATABASE_URL",
        fix: "set it to the reaper role's connection string, e.g. postgres://reaper:...@db-host:5432/postgres?sslmode=verify-full&sslrootcert=/etc/reaper/ca.crt",
    })?;
    Database::new(&url, &|name| std::env::var(name).ok())
}

/// Whether a URL's host is this machine (localhost, 127.0.0.0/8, ::1).
fn is_loopback(url: &url::Url) -> bool {
    match url.host() {
        Some(url::Host::Domain(d)) => d.eq_ignore_ascii_case("localhost"),
        Some(url::Host::Ipv4(ip)) => ip.is_loopback(),
        Some(url::Host::Ipv6(ip)) => ip.is_loopback(),
        None => false,
    }
}

impl TempArgs {
    pub fn settings(&self) -> Result<Option<TempSettings>, ConfigError> {
        let Some(dir) = &self.temp_dir else {
            return Ok(None);
        };
        if !dir.is_dir() {
            return Err(invalid(
                "--temp-dir",
                format!("{} is not a directory", dir.display()),
                "point it at an existing directory",
            ));
        }
        let max_age = parse_duration("--temp-max-age", &self.temp_max_age)?;
        if max_age.is_zero() {
            return Err(invalid(
                "--temp-max-age",
                self.temp_max_age.clone(),
                "use e.g. 1h: 0 would remove files that are being written",
            ));
        }
        let interval = parse_duration("--temp-interval", &self.temp_interval)?;
        if interval.is_zero() {
            return Err(invalid(
                "--temp-interval",
                self.temp_interval.clone(),
                "use e.g. 1h: 0 would sweep without pause",
            ));
        }
        Ok(Some(TempSettings {
            dir: dir.clone(),
            max_age,
            interval,
        }))
    }
}

impl RunArgs {
    pub fn settings(&self) -> Result<Settings, ConfigError> {
        let database = database(&self.db)?;
        let raw_url = self
            .supabase_url
            .clone()
            .filter(|u| !u.trim().is_empty())
            .ok_or(ConfigError::Missing {
                name: "SUPABASE_URL",
                fix: "set it to your project's URL, e.g. https://abcd.supabase.co",
            })?;
        let base = url::Url::parse(raw_url.trim()).map_err(|e| {
            invalid(
                "SUPABASE_URL",
                format!("{raw_url:?}: {e}"),
                "use the project URL, e.g. https://abcd.supabase.co",
            )
        })?;
        if base.scheme() != "https" && base.scheme() != "http" {
            return Err(invalid(
                "SUPABASE_URL",
                format!("scheme {:?}", base.scheme()),
                "use an https:// URL",
            ));
        }
        let host = base.host_str().ok_or_else(|| {
            invalid(
                "SUPABASE_URL",
                "no host",
                "use e.g. https://abcd.supabase.co",
            )
        })?;
        if base.scheme() == "http" && !is_loopback(&base) && !self.allow_plain_http {
            return Err(invalid(
                "SUPABASE_URL",
                format!("http://{host} is not this machine, and the key would cross the network in cleartext"),
                "use the https:// URL, or pass --allow-plain-http if the network to it is private and trusted",
            ));
        }
        let path = base.path().trim_end_matches('/');
        if !(path.is_empty() || path == "/storage/v1") {
            return Err(invalid(
                "SUPABASE_URL",
                format!("unexpected path {path:?}"),
                "give the project's base URL without a path",
            ));
        }
        let storage_base = url::Url::parse(&format!(
            "{}/storage/v1/",
            base.origin().ascii_serialization()
        ))
        .map_err(|e| invalid("SUPABASE_URL", e.to_string(), "use the project URL"))?;
        let own_host = match base.port() {
            Some(p) => format!("{host}:{p}"),
            None => host.to_string(),
        };

        let key = match (&self.service_role_key, &self.service_role_key_file) {
            (Some(k), _) if !k.trim().is_empty() => ServiceKey::new(k.clone()),
            (_, Some(path)) => {
                let text = std::fs::read_to_string(path).map_err(|e| {
                    invalid("SUPABASE_SERVICE_ROLE_KEY_FILE", format!("{}: {e}", path.display()), "point it at a readable file holding the key")
                })?;
                if text.trim().is_empty() {
                    return Err(invalid("SUPABASE_SERVICE_ROLE_KEY_FILE", format!("{} is empty", path.display()), "put the service-role key in it"));
                }
                ServiceKey::new(text)
            }
            _ => {
                return Err(ConfigError::Missing {
                    name: "SUPABASE_SERVICE_ROLE_KEY",
                    fix: "set it (or SUPABASE_SERVICE_ROLE_KEY_FILE) to the project's service_role key (Project Settings > API)",
                })
            }
        };
        if key.is_publishable_key() {
            return Err(invalid(
                "SUPABASE_SERVICE_ROLE_KEY",
                "it is a publishable key (sb_publishable_...), which row-level security lets delete nothing",
                "use a secret key (sb_secret_...) or the service_role key (Project Settings > API)",
            ));
        }
        if !key.is_jwt() && !key.is_secret_key() {
            return Err(invalid(
                "SUPABASE_SERVICE_ROLE_KEY",
                "it is neither a JWT (eyJ...) nor a secret key (sb_secret_...)",
                "copy the service_role key or a secret key from Project Settings > API, whole",
            ));
        }
        if let Some(role) = key.jwt_role() {
            if role != "service_role" {
                return Err(invalid(
                    "SUPABASE_SERVICE_ROLE_KEY",
                    format!(
                        "the key's role is {role:?}, and row-level security lets it delete nothing"
                    ),
                    "use the service_role key, not the anon key",
                ));
            }
        }

        let buckets = self
            .buckets
            .clone()
            .filter(|b| !b.trim().is_empty())
            .ok_or(ConfigError::Missing {
                name: "--buckets",
                fix: "list the buckets this reaper may delete from, e.g. --buckets renders",
            })?;
        let hosts = format!("{own_host},{}", self.storage_hosts);
        let policy = object_url::Policy::from_lists(&buckets, "", &hosts)
            .map_err(|e| invalid("--buckets/--storage-hosts", e.to_string(), "fix the list"))?;
        // The first host of the list is SUPABASE_URL's, spelled as the parser spells hosts.
        let home_host = policy.hosts[0].clone();

        if !(1..=1000).contains(&self.batch_size) {
            return Err(invalid(
                "--batch-size",
                self.batch_size.to_string(),
                "use 1 to 1000 (the API refuses more than 1000 names)",
            ));
        }
        if !(1..=64).contains(&self.concurrency) {
            return Err(invalid(
                "--concurrency",
                self.concurrency.to_string(),
                "use 1 to 64",
            ));
        }
        let lease = parse_duration("--lease", &self.lease)?;
        if lease < Duration::from_secs(10) || lease > Duration::from_secs(86_400) {
            return Err(invalid(
                "--lease",
                self.lease.clone(),
                "use 10s to 1d; longer than a batch takes to delete",
            ));
        }
        let request_timeout = parse_duration("--request-timeout", &self.request_timeout)?;
        // A batch may be sent until the lease less a tenth of it less one request's timeout has
        // passed (reaper::Batch): at least half the lease must be left for sending.
        if request_timeout.is_zero() || request_timeout > lease / 2 {
            return Err(invalid(
                "--request-timeout",
                self.request_timeout.clone(),
                "use more than 0 and at most half of --lease (a batch is sent only while its lease has a request's time and a tenth of itself left)",
            ));
        }
        let poll_interval = parse_duration("--poll-interval", &self.poll_interval)?;
        if poll_interval.is_zero() {
            return Err(invalid(
                "--poll-interval",
                self.poll_interval.clone(),
                "use e.g. 10s",
            ));
        }
        if self.max_deletes_per_hour == Some(0) {
            return Err(invalid(
                "--max-deletes-per-hour",
                "0",
                "use at least 1, or leave it unset for no limit",
            ));
        }
        if self.max_deletes_per_hour.is_some() && self.worker_id.is_none() {
            return Err(invalid(
                "--max-deletes-per-hour",
                "set without --worker-id",
                "give this reaper a stable --worker-id (REAPER_WORKER_ID): the hourly budget is kept per id in the audit log, so that a restart, or a new container, does not reset it",
            ));
        }
        let worker_id = match &self.worker_id {
            Some(w) if w.trim().is_empty() || w.len() > 200 => {
                return Err(invalid(
                    "--worker-id",
                    w.clone(),
                    "use a non-empty id of at most 200 characters",
                ))
            }
            Some(w) => w.clone(),
            None => format!(
                "{}:{}:{:06x}",
                gethostname::gethostname().to_string_lossy(),
                std::process::id(),
                rand::random::<u32>() & 0xff_ffff
            ),
        };
        Ok(Settings {
            database,
            db_timeout: self.db.timeout()?,
            storage_base,
            key,
            policy,
            home_host,
            batch_size: self.batch_size,
            concurrency: self.concurrency,
            lease,
            request_timeout,
            poll_interval,
            worker_id,
            max_deletes_per_hour: self.max_deletes_per_hour,
            dry_run: self.dry_run,
            probe: !self.no_probe,
            metrics_addr: self.metrics_addr,
            temp: self.temp.settings()?,
            cycle_every: self
                .cycle_every
                .as_deref()
                .filter(|v| !v.trim().is_empty())
                .map(|v| {
                    let every = parse_duration("--cycle-every", v)?;
                    if every < Duration::from_secs(1) {
                        return Err(invalid(
                            "--cycle-every",
                            v.to_string(),
                            "give an interval of at least 1s, e.g. 3min",
                        ));
                    }
                    Ok(every)
                })
                .transpose()?,
        })
    }
}
