//! `storage-emulator`: serve a local Supabase Storage, or print keys for it.

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand};
use storage_emulator::faults::Faults;
use storage_emulator::store::Store;

#[derive(Parser)]
#[command(
    version,
    about = "A local Supabase Storage server for tests, the demo and benchmarks"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

// Parsed once at start: the size of the `serve` variant does not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Subcommand)]
enum Command {
    /// Serve the storage API on --listen until stopped.
    Serve {
        /// Address to listen on; port 0 picks a free port (printed on stdout).
        #[arg(long, default_value = "127.0.0.1:54321")]
        listen: SocketAddr,
        /// Where buckets (directories) and objects (files) live.
        #[arg(long)]
        data_dir: PathBuf,
        /// The project's JWT secret: keys must be signed with it.
        #[arg(long, env = "STORAGE_EMULATOR_JWT_SECRET")]
        jwt_secret: String,
        /// Accept more than 1000 names per bulk delete (self-hosted servers without hard limits).
        #[arg(long)]
        no_hard_limits: bool,
        /// Fraction of storage requests answered HTTP 500.
        #[arg(long, default_value_t = 0.0)]
        rate_500: f64,
        /// Fraction answered HTTP 429 SlowDown.
        #[arg(long, default_value_t = 0.0)]
        rate_429: f64,
        /// Fraction answered HTTP 544 (database timeout).
        #[arg(long, default_value_t = 0.0)]
        rate_544: f64,
        /// Fraction of requests that hang.
        #[arg(long, default_value_t = 0.0)]
        hang_rate: f64,
        /// Fraction of requests carried out whose response is never sent.
        #[arg(long, default_value_t = 0.0)]
        lost_response_rate: f64,
        /// Latency added to every storage request, in milliseconds.
        #[arg(long, default_value_t = 0)]
        latency_ms: u64,
        /// Fraction of requests delayed by a further --spike-ms.
        #[arg(long, default_value_t = 0.0)]
        spike_rate: f64,
        #[arg(long, default_value_t = 0)]
        spike_ms: u64,
        /// Fail every storage request after this many.
        #[arg(long)]
        fail_after: Option<u64>,
        /// An opaque secret key (sb_secret_...) the gateway accepts in `apikey` as the service role.
        #[arg(long, env = "STORAGE_EMULATOR_SECRET_KEY")]
        secret_key: Option<String>,
        /// An opaque publishable key (sb_publishable_...) the gateway accepts in `apikey` as anon.
        #[arg(long, env = "STORAGE_EMULATOR_PUBLISHABLE_KEY")]
        publishable_key: Option<String>,
        /// Keep `storage.objects` and `storage.buckets` in this database as the real server
        /// does (created when missing; synced with the data directory at start).
        #[arg(long, env = "STORAGE_EMULATOR_DATABASE_URL")]
        database_url: Option<String>,
    },
    /// Print a service-role key, an anon key and a key without a role claim, signed with the secret.
    Keys {
        #[arg(long, env = "STORAGE_EMULATOR_JWT_SECRET")]
        jwt_secret: String,
    },
    /// Create objects directly in a data directory (before `serve`), from lines
    /// `bucket/key<TAB>size` on stdin: fast seeding for the demo and benchmarks.
    Seed {
        #[arg(long)]
        data_dir: PathBuf,
    },
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .init();
    match Cli::parse().command {
        Command::Seed { data_dir } => {
            let mut n = 0u64;
            for line in std::io::stdin().lines() {
                let line = line?;
                let (path, size) = line.split_once('\t').unwrap_or((line.as_str(), "0"));
                let (bucket, key) = path
                    .split_once('/')
                    .with_context(|| format!("{path:?} is not bucket/key"))?;
                anyhow::ensure!(
                    storage_emulator::store::valid_bucket(bucket)
                        && storage_emulator::store::valid_key(key),
                    "{path:?} is not a valid object name"
                );
                let file = data_dir.join(bucket).join(key);
                std::fs::create_dir_all(file.parent().expect("a key has a parent directory"))?;
                let size: usize = size
                    .trim()
                    .parse()
                    .with_context(|| format!("bad size in {line:?}"))?;
                std::fs::write(&file, vec![b'.'; size])?;
                n += 1;
            }
            println!("seeded {n} objects into {}", data_dir.display());
            Ok(())
        }
        Command::Keys { jwt_secret } => {
            println!(
                "SERVICE_ROLE_KEY={}",
                storage_emulator::auth::mint("service_role", &jwt_secret)
            );
            println!(
                "ANON_KEY={}",
                storage_emulator::auth::mint("anon", &jwt_secret)
            );
            // Signed, but with no role claim: a client cannot tell what it may do.
            println!(
                "NO_ROLE_KEY={}",
                storage_emulator::auth::mint("", &jwt_secret)
            );
            Ok(())
        }
        Command::Serve {
            listen,
            data_dir,
            jwt_secret,
            no_hard_limits,
            rate_500,
            rate_429,
            rate_544,
            hang_rate,
            lost_response_rate,
            latency_ms,
            spike_rate,
            spike_ms,
            fail_after,
            secret_key,
            publishable_key,
            database_url,
        } => {
            let store = Store::open(&data_dir)
                .with_context(|| format!("cannot open data directory {}", data_dir.display()))?;
            let faults = Faults {
                rate_500,
                rate_429,
                rate_544,
                hang_rate,
                lost_response_rate,
                latency_ms,
                spike_rate,
                spike_ms,
                fail_after,
                ..Faults::default()
            };
            let mut opaque = std::collections::HashMap::new();
            if let Some(k) = secret_key {
                opaque.insert(k, storage_emulator::auth::Role::Service);
            }
            if let Some(k) = publishable_key {
                opaque.insert(k, storage_emulator::auth::Role::Other);
            }
            let catalog = match database_url {
                Some(url) => {
                    let catalog = storage_emulator::catalog::Catalog::open(&url).await?;
                    let (buckets, objects) = store.snapshot();
                    catalog
                        .sync(&buckets, &objects)
                        .await
                        .context("cannot sync storage.objects with the data directory")?;
                    tracing::info!(
                        objects = objects.len(),
                        "storage.objects kept in the database"
                    );
                    Some(catalog)
                }
                None => None,
            };
            let emu = storage_emulator::Emulator::with_catalog(
                store,
                jwt_secret,
                !no_hard_limits,
                faults,
                opaque,
                catalog,
            );
            let listener = tokio::net::TcpListener::bind(listen)
                .await
                .with_context(|| format!("cannot listen on {listen}"))?;
            let addr = listener.local_addr()?;
            println!("storage-emulator listening on http://{addr}");
            tracing::info!(%addr, data_dir = %data_dir.display(), "storage emulator ready");
            axum::serve(listener, storage_emulator::router(emu))
                .with_graceful_shutdown(async {
                    let _ = tokio::signal::ctrl_c().await;
                })
                .await?;
            Ok(())
        }
    }
}
