//! `reaper run | drain | status | report | sweep-temp | inventory`. See `reaper --help`.

use std::io::IsTerminal;
use std::process::ExitCode;
use std::sync::Arc;

use clap::Parser;
use indicatif::{ProgressBar, ProgressStyle};
use reaper::config::{Cli, Command, InventoryArgs, LogFormat, ReportFormat, RunArgs};
use reaper::metrics::Metrics;
use reaper::reaper::{Mode, Reaper};

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(cli.log_format);
    let code = match run(cli.command).await {
        Ok(code) => code,
        Err(e) => {
            eprintln!("reaper: {e:#}");
            ExitCode::from(2)
        }
    };
    // Exit here rather than return: dropping the runtime would wait for a temp sweep still
    // running on a blocking thread, with the signal handlers gone (a second SIGTERM could then
    // not end it). Everything worth finishing has finished: the drain has returned.
    let status = if code == ExitCode::SUCCESS {
        0
    } else if code == ExitCode::FAILURE {
        1
    } else {
        2
    };
    let _ = std::io::Write::flush(&mut std::io::stdout());
    std::process::exit(status)
}

fn init_logging(format: LogFormat) {
    let filter =
        tracing_subscriber::EnvFilter::try_from_env("REAPER_LOG").unwrap_or_else(|_| "info".into());
    // Colours only on a terminal: escape codes in a journal or a log file break every grep.
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Text => builder.init(),
    }
}

async fn run(command: Command) -> anyhow::Result<ExitCode> {
    match command {
        Command::Status(db) => {
            let database = reaper::config::database(&db)?;
            let queue =
                reaper::queue::Queue::connect(&database, "status", false, db.timeout()?).await?;
            println!("{}", queue.status().await?);
            Ok(ExitCode::SUCCESS)
        }
        Command::Report(args) => {
            let database = reaper::config::database(&args.db)?;
            let queue =
                reaper::queue::Queue::connect(&database, "report", false, args.db.timeout()?)
                    .await?;
            let periods = queue
                .savings_report(args.period.as_str(), args.periods)
                .await?;
            let unit = args.period.as_str();
            if let Some(file) = &args.html {
                let when = humantime::format_rfc3339_seconds(std::time::SystemTime::now());
                std::fs::write(
                    file,
                    reaper::report::page(&periods, unit, &when.to_string()),
                )
                .map_err(|e| anyhow::anyhow!("cannot write --html {}: {e}", file.display()))?;
                eprintln!("wrote {} ({} {unit}s)", file.display(), periods.len());
            }
            print!(
                "{}",
                match args.format {
                    ReportFormat::Table => reaper::report::table(&periods, unit),
                    ReportFormat::Json => reaper::report::json(&periods) + "\n",
                    ReportFormat::Csv => reaper::report::csv(&periods),
                }
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::SweepTemp(args) => {
            let temp = args.settings()?.ok_or_else(|| {
                anyhow::anyhow!("--temp-dir is not set: name the directory to sweep")
            })?;
            let report = reaper::temp::sweep(&temp.dir, temp.max_age);
            println!(
                "removed {} files ({} bytes), kept {}, errors {}",
                report.removed, report.bytes, report.kept, report.errors
            );
            Ok(if report.errors == 0 {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            })
        }
        Command::Inventory(args) => inventory(args).await,
        Command::Drain(args) => drain_or_run(args, Mode::Drain).await,
        Command::Run(args) => drain_or_run(args, Mode::Run).await,
    }
}

/// `reaper inventory`: each bucket the database allows and this reaper serves, listed through
/// the Storage API into the database. Exits 1 when a bucket could not be listed.
async fn inventory(args: InventoryArgs) -> anyhow::Result<ExitCode> {
    let settings = args.run.settings()?;
    let queue = reaper::queue::Queue::connect(
        &settings.database,
        &settings.worker_id,
        false,
        settings.db_timeout,
    )
    .await?;
    let storage = reaper::storage::StorageClient::new(
        settings.storage_base.clone(),
        settings.key.clone(),
        settings.request_timeout,
    );
    let mut failed = false;
    for bucket in queue.inventory_buckets().await? {
        if !settings.policy.buckets.contains(&bucket) {
            eprintln!("{bucket}: not listed: orphan_cleanup.allowed_buckets names it, and this reaper's --buckets does not");
            failed = true;
            continue;
        }
        let page = usize::from(args.page_size);
        match reaper::inventory::list_bucket(&queue, &storage, &bucket, page).await {
            Ok(l) => {
                println!(
                    "{}: {} objects listed in {} folders; {} no longer in storage forgotten",
                    l.bucket, l.objects, l.folders, l.removed
                );
                if !l.ambiguous.is_empty() {
                    println!(
                        "{}: not listed, names differing only in case: {}",
                        l.bucket,
                        l.ambiguous.join(", ")
                    );
                }
            }
            Err(e) => {
                eprintln!("{bucket}: {e}");
                failed = true;
            }
        }
    }
    Ok(if failed {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    })
}

async fn drain_or_run(args: RunArgs, mode: Mode) -> anyhow::Result<ExitCode> {
    let settings = args.settings()?;
    if mode == Mode::Drain && settings.cycle_every.is_some() {
        anyhow::bail!("--cycle-every is for `reaper run` (the daemon); a drain runs no cycles");
    }
    tracing::info!(
        worker = %settings.worker_id,
        storage = %settings.storage_base,
        buckets = ?settings.policy.buckets,
        hosts = ?settings.policy.hosts,
        batch_size = settings.batch_size,
        concurrency = settings.concurrency,
        "reaper starting"
    );
    if settings.dry_run {
        return dry_run(&settings).await;
    }
    let shutdown = reaper::shutdown::on_signals();
    let metrics = Arc::new(Metrics::new());
    let mut reaper = Reaper::new(settings.clone(), metrics, shutdown.clone());
    if mode == Mode::Drain {
        // The bar's length: what is ready now (others may add to it or take from it meanwhile).
        let ready = match reaper::queue::Queue::connect(
            &settings.database,
            &settings.worker_id,
            false,
            settings.db_timeout,
        )
        .await
        {
            Ok(q) => q.status().await.ok().map(|s| s.ready.max(0) as u64),
            Err(_) => None,
        };
        attach_progress(&mut reaper, ready);
    }
    let reaper = Arc::new(reaper);
    if settings.probe {
        if let Err(e) = reaper.probe().await {
            anyhow::bail!("{e}");
        }
        tracing::info!("start-up probe passed: the key can delete objects");
    }
    if let (Mode::Run, Some(addr)) = (mode, settings.metrics_addr) {
        let r = reaper.clone();
        tokio::spawn(async move {
            if let Err(e) = reaper::http::serve(addr, r).await {
                tracing::error!(error = %e, %addr, "cannot serve metrics");
            }
        });
    }
    if let (Mode::Run, Some(every)) = (mode, settings.cycle_every) {
        tokio::spawn(reaper::cycles::run(
            settings.database.clone(),
            every,
            settings.db_timeout,
            shutdown.clone(),
        ));
    }
    if let (Mode::Run, Some(temp)) = (mode, settings.temp.clone()) {
        // Pinned now: a directory put in its place later is not swept.
        let root = reaper::temp::TempRoot::new(&temp.dir)
            .map_err(|e| anyhow::anyhow!("--temp-dir {}: {e}", temp.dir.display()))?;
        let token = shutdown.clone();
        tokio::spawn(async move {
            loop {
                let root = root.clone();
                let report = tokio::task::spawn_blocking(move || root.sweep(temp.max_age))
                    .await
                    .unwrap_or_default();
                tracing::info!(
                    removed = report.removed,
                    bytes = report.bytes,
                    kept = report.kept,
                    errors = report.errors,
                    "temp directory swept"
                );
                tokio::select! {
                    _ = tokio::time::sleep(temp.interval) => {}
                    _ = token.cancelled() => break,
                }
            }
        });
    }
    let summary = reaper.drain(mode).await?;
    println!("{summary}");
    Ok(
        if summary.config_error.is_some() || summary.outage.is_some() {
            ExitCode::FAILURE
        } else {
            ExitCode::SUCCESS
        },
    )
}

/// A progress bar on a terminal, plain lines otherwise.
fn attach_progress(reaper: &mut Reaper, total: Option<u64>) {
    if std::io::stderr().is_terminal() {
        let bar = match total {
            Some(n) => ProgressBar::new(n).with_style(
                ProgressStyle::with_template("{bar:40} {pos}/{len} rows {per_sec} eta {eta} {msg}")
                    .expect("valid template"),
            ),
            None => ProgressBar::new_spinner().with_style(
                ProgressStyle::with_template("{spinner} {elapsed} {msg}").expect("valid template"),
            ),
        };
        bar.enable_steady_tick(std::time::Duration::from_millis(200));
        reaper.on_progress(move |s| {
            bar.set_position(s.deleted + s.absent + s.failed + s.refused);
            bar.set_message(format!(
                "deleted {} absent {} failed {} dead {}",
                s.deleted, s.absent, s.failed, s.dead_lettered
            ));
        });
    } else {
        let of = total.map(|n| format!(" of {n} ready")).unwrap_or_default();
        reaper.on_progress(move |s| {
            eprintln!(
                "progress: {} handled{of}: deleted {} absent {} failed {} dead-lettered {}",
                s.deleted + s.absent + s.failed + s.refused,
                s.deleted,
                s.absent,
                s.failed,
                s.dead_lettered
            )
        });
    }
}

async fn dry_run(settings: &reaper::config::Settings) -> anyhow::Result<ExitCode> {
    let queue = reaper::queue::Queue::connect(
        &settings.database,
        &settings.worker_id,
        false,
        settings.db_timeout,
    )
    .await?;
    let rows = queue.peek(10_000).await?;
    for row in &rows {
        let name = format!(
            "{}/{}",
            row.bucket.as_deref().unwrap_or(""),
            row.object_path.as_deref().unwrap_or("")
        );
        match reaper::reaper::allowed(&settings.policy, row) {
            Ok(_) => println!(
                "would delete {name} (queue row {}, {})",
                row.id,
                row.job_id
                    .as_deref()
                    .map_or("a stray: no job".to_string(), |j| format!("job {j}"))
            ),
            Err(r) => println!("would refuse queue row {} ({name}): {r}", row.id),
        }
    }
    println!(
        "dry run: {} queued rows, nothing claimed or deleted",
        rows.len()
    );
    Ok(ExitCode::SUCCESS)
}
