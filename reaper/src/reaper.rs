//! The drain loop: claim a batch of the rows this reaper serves, give back what its own
//! allow-list still refuses, group by bucket, delete up to `batch_size` names per request with
//! several requests in flight, then confirm, fail or release every row.
//!
//! Claiming is pipelined: while one batch is deleted and confirmed on the main connection, the
//! next batch is claimed on a second one. The database side (the claim's re-check, the confirm's
//! audit rows and job-row cleanup) costs more than the bulk deletes, and two backends do it on
//! two cores at once. A prefetched batch is claimed like any other: a crash leaves it to its
//! lease, a shutdown or a storage problem releases it without counting an attempt.
//!
//! Nothing is lost at any moment: a crash leaves rows claimed, and their leases bring them back;
//! a repeated delete is harmless (the object is reported absent). A bulk request fails as a whole,
//! so its errors say something about the process (URL, key, load), and never cost a row an
//! attempt unless the server itself failed.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use futures::StreamExt;
use tokio_util::sync::CancellationToken;

use crate::config::Settings;
use crate::limit::HourlyLimit;
use crate::metrics::Metrics;
use crate::queue::{Claimed, LeaseToken, Queue, QueueError, Recorder, Sent, WorkerIdLock};
use crate::storage::{StorageClient, StorageError};

mod evidence;
mod outcomes;
mod split;

use outcomes::{Confirmed, Outcomes};

/// `drain` stops when the queue has nothing ready; `run` waits for more.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Drain,
    Run,
}

/// What a drain did, for its final summary.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Summary {
    pub deleted: u64,
    pub absent: u64,
    pub failed: u64,
    pub dead_lettered: u64,
    pub refused: u64,
    pub released: u64,
    pub lease_lost: u64,
    /// Rows given back unsent because their lease was too close to expiry (the reaper stalled).
    pub late: u64,
    pub bytes: u64,
    /// Set when storage refused the reaper's configuration: `drain` exits non-zero.
    pub config_error: Option<String>,
    /// Set when storage could not be reached at all: `drain` stops and exits non-zero.
    pub outage: Option<String>,
    /// Set when --max-deletes-per-hour (this value) stopped the drain or holds the daemon back.
    pub held_back: Option<u64>,
    /// The bulk limit storage answered with, when lower than --batch-size.
    pub bulk_limit: Option<usize>,
}

impl std::fmt::Display for Summary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "deleted {}, already absent {}, failed {}, dead-lettered {}, refused {}, released {}, bytes reclaimed {}",
            self.deleted, self.absent, self.failed, self.dead_lettered, self.refused, self.released, self.bytes
        )?;
        if self.lease_lost > 0 {
            write!(f, ", leases lost {}", self.lease_lost)?;
        }
        if self.late > 0 {
            write!(f, ", not sent (lease too close to expiry) {}", self.late)?;
        }
        if let Some(n) = self.bulk_limit {
            write!(
                f,
                "\nstorage limits bulk deletes to {n} names per request: set --batch-size {n}"
            )?;
        }
        if let Some(max) = self.held_back {
            write!(
                f,
                "\nHELD BACK: --max-deletes-per-hour {max} reached; the rest of the queue waits"
            )?;
        }
        if let Some(e) = &self.config_error {
            write!(f, "\nCONFIGURATION ERROR: {e}")?;
        }
        if let Some(e) = &self.outage {
            write!(
                f,
                "\nSTORAGE UNREACHABLE: {e}; the rows were given back with no attempt counted"
            )?;
        }
        Ok(())
    }
}

/// How often an idle reaper reads queue_status() for its metrics.
const STATUS_EVERY: Duration = Duration::from_secs(30);

/// How often the reaper reads the bytes still queued for `reaper_queued_bytes`: that joins every
/// queued row to storage.objects, so not on every status read.
const QUEUED_BYTES_EVERY: Duration = Duration::from_secs(600);

pub struct Reaper {
    pub settings: Settings,
    pub storage: StorageClient,
    pub metrics: Arc<Metrics>,
    pub shutdown: CancellationToken,
    /// Readiness for /readyz: database reachable, storage accepting the key.
    pub db_ok: AtomicBool,
    pub storage_ok: AtomicBool,
    /// For /livez: the loop's current step and how long it may take.
    pub live: crate::live::Liveness,
    /// The last database error, for /readyz, until a connection works again.
    pub db_error: Mutex<Option<String>>,
    summary: Mutex<Summary>,
    /// Whether --max-deletes-per-hour has been started from the audit log.
    seeded: AtomicBool,
    /// Whether a request of the last batch got a usable answer.
    answered_last: AtomicBool,
    /// Names per bulk request: --batch-size, or less once storage says its limit is lower.
    bulk_limit: std::sync::atomic::AtomicUsize,
    /// When queue_status() was last read for the metrics (it scans the ready rows).
    status_read: Mutex<Option<Instant>>,
    queued_bytes_read: tokio::sync::Mutex<Option<Instant>>,
    progress: Option<ProgressFn>,
    limit: Option<Mutex<HourlyLimit>>,
}

/// Receives the running totals after every batch.
type ProgressFn = Box<dyn Fn(&Summary) + Send + Sync>;

/// A claimed batch, and the last moment a delete of it may be sent.
///
/// The lease is the database's promise that no one else deletes or saves these objects until
/// it runs out. A reaper that stalls (a long pause, SIGSTOP, a partition from the database) must
/// not act on a lease that may be over: another reaper may have the rows by now, and the rows
/// may be retired. So the reaper keeps its own deadline, on its own monotonic clock, started
/// before the claim was sent (the database's lease starts later, when the claim runs): the lease,
/// less a tenth of it as a safety margin, less the longest a request may take. A chunk whose
/// request could end after that is not sent; its rows are released for a later claim.
///
/// The batch's lease token proves the claim to the database; without it no one can confirm, fail
/// or give back these rows.
pub struct Batch {
    rows: Vec<Claimed>,
    lease: Option<LeaseToken>,
    send_by: Instant,
    /// When the claim was counted against --max-deletes-per-hour: its refunds go there.
    claimed_at: Instant,
    /// The lease's end on this reaper's clock, less a tenth as a margin: results are recorded
    /// before it (retried past a slow call until then).
    lease_end: Instant,
}

impl Batch {
    /// The deadline of a batch whose claim was sent at `claim_sent`.
    fn send_by(claim_sent: Instant, lease: Duration, request_timeout: Duration) -> Instant {
        claim_sent
            + lease
                .saturating_sub(lease / 10)
                .saturating_sub(request_timeout)
    }
}

impl Reaper {
    pub fn new(settings: Settings, metrics: Arc<Metrics>, shutdown: CancellationToken) -> Reaper {
        let storage = StorageClient::new(
            settings.storage_base.clone(),
            settings.key.clone(),
            settings.request_timeout,
        );
        let limit = settings
            .max_deletes_per_hour
            .map(|max| Mutex::new(HourlyLimit::new(max, settings.lease)));
        let batch_size = settings.batch_size;
        let settings_has_no_limit = settings.max_deletes_per_hour.is_none();
        Reaper {
            settings,
            storage,
            metrics,
            shutdown,
            db_ok: AtomicBool::new(false),
            storage_ok: AtomicBool::new(false),
            live: crate::live::Liveness::new(),
            db_error: Mutex::new(None),
            summary: Mutex::new(Summary::default()),
            bulk_limit: std::sync::atomic::AtomicUsize::new(batch_size),
            seeded: AtomicBool::new(settings_has_no_limit),
            answered_last: AtomicBool::new(false),
            status_read: Mutex::new(None),
            queued_bytes_read: tokio::sync::Mutex::new(None),
            progress: None,
            limit,
        }
    }

    /// Called after every batch with the running totals (the progress bar or lines).
    pub fn on_progress(&mut self, f: impl Fn(&Summary) + Send + Sync + 'static) {
        self.progress = Some(Box::new(f));
    }

    pub fn summary(&self) -> Summary {
        self.summary.lock().unwrap().clone()
    }

    fn buckets(&self) -> Vec<String> {
        self.settings.policy.buckets.clone()
    }

    /// Proves the key can delete: uploads one tiny object into the first allowed bucket and
    /// deletes it in bulk. An anon key cannot upload; a key that can upload but not delete gets
    /// `200 []`. Either way the reaper would report every object "already absent" forever.
    pub async fn probe(&self) -> Result<(), String> {
        let bucket = self
            .buckets()
            .into_iter()
            .next()
            .ok_or("no bucket to probe")?;
        let name = crate::absence::canary_name(&self.settings.worker_id);
        use crate::absence::RoundTrip;
        crate::absence::round_trip(&self.storage, &bucket, &name)
            .await
            .map_err(|e| match e {
                RoundTrip::Upload(e) => format!(
                    "the start-up probe could not upload {bucket}/{name}: {e}{}",
                    probe_fix(&e)
                ),
                RoundTrip::Delete(e) => format!(
                    "the start-up probe could not delete {bucket}/{name}: {e}{}",
                    probe_fix(&e)
                ),
                RoundTrip::NotDeleted => format!(
                    "the start-up probe uploaded {bucket}/{name} but a bulk delete did not delete it: this key cannot delete objects \
                     (is it the service_role key?)"
                ),
            })?;
        self.storage_ok.store(true, Ordering::SeqCst);
        Ok(())
    }

    /// Drains the queue until it is empty (`Mode::Drain`) or until shutdown (`Mode::Run`).
    pub async fn drain(&self, mode: Mode) -> Result<Summary, QueueError> {
        let mut queue: Option<Queue> = None;
        // The second connection, for claiming ahead, and the batch it claimed.
        let mut claimer: Option<Queue> = None;
        let mut prefetched: Option<Batch> = None;
        let mut reconnect = Backoff::new(Duration::from_millis(500), Duration::from_secs(30));
        let mut cooldown = Backoff::new(Duration::from_secs(2), Duration::from_secs(300));
        // A database error that ends a drain, once what it claimed ahead is given back.
        let mut failure: Option<QueueError> = None;
        while !self.shutdown.is_cancelled() {
            // A connection makes a handful of bounded calls (settings, version, LISTEN, checks).
            self.live
                .step("connecting to the database", self.db_call() * 6);
            let q = match queue.take().filter(|q| !q.is_closed()) {
                Some(q) => q,
                None => match Queue::connect(
                    &self.settings.database,
                    &self.settings.worker_id,
                    mode == Mode::Run,
                    self.settings.db_timeout,
                )
                .await
                {
                    Ok(q) => match self.own_worker_id(&q).await {
                        Ok(()) => {
                            if mode == Mode::Run {
                                self.say_how_work_arrives(&q);
                            }
                            self.db_ok.store(true, Ordering::SeqCst);
                            *self.db_error.lock().unwrap() = None;
                            reconnect.reset();
                            q
                        }
                        Err(e) => {
                            self.db_down(&e);
                            if mode == Mode::Drain {
                                failure = Some(e);
                                break;
                            }
                            tracing::error!(error = %e, "not claiming");
                            self.sleep(reconnect.next_delay()).await;
                            continue;
                        }
                    },
                    Err(e) => {
                        self.db_down(&e);
                        if mode == Mode::Drain {
                            failure = Some(e);
                            break;
                        }
                        let wait = reconnect.next_delay();
                        if matches!(e, QueueError::NotInstalled | QueueError::TooOld(_)) {
                            tracing::error!(error = %e, retry_in_s = wait.as_secs_f64(), "the database cannot serve this reaper; retrying");
                        } else {
                            tracing::warn!(error = %e, retry_in_s = wait.as_secs_f64(), "database unreachable; retrying");
                        }
                        self.sleep(wait).await;
                        continue;
                    }
                },
            };
            if !self.seeded.load(Ordering::SeqCst) {
                self.live.step("reading the hourly budget", self.db_call());
                // The hourly budget is not known yet: claim nothing until it is.
                if let Err(e) = self.seed_limit(&q).await {
                    self.db_down(&e);
                    if mode == Mode::Drain {
                        failure = Some(e);
                        break;
                    }
                    tracing::warn!(error = %e, "cannot read what this reaper sent in the last hour; claiming nothing until it can");
                    self.sleep(reconnect.next_delay()).await;
                    continue;
                }
            }
            self.live.step("claiming", self.db_call());
            let claimed = match prefetched.take() {
                Some(b) => Ok(Some(b)),
                None => self.claim(&q).await,
            };
            let batch = match claimed {
                Ok(Some(b)) => b,
                Ok(None) => {
                    // --max-deletes-per-hour reached: drain stops, run waits for room.
                    if mode == Mode::Drain {
                        break;
                    }
                    let wait = self.next_room();
                    tracing::warn!(
                        max_deletes_per_hour = self.settings.max_deletes_per_hour,
                        resume_in_s = wait.as_secs(),
                        "holding back: --max-deletes-per-hour reached"
                    );
                    self.sleep(wait).await;
                    queue = Some(q);
                    continue;
                }
                Err(e) => {
                    if mode == Mode::Drain && !q.is_closed() {
                        queue = Some(q);
                        failure = Some(e);
                        break;
                    }
                    self.db_down(&e);
                    let wait = reconnect.next_delay();
                    tracing::warn!(error = %e, retry_in_s = wait.as_secs_f64(), "claim failed; reconnecting");
                    self.sleep(wait).await;
                    continue;
                }
            };
            if batch.rows.is_empty() {
                if mode == Mode::Drain {
                    break;
                }
                self.read_status(&q).await;
                let poll = self.settings.poll_interval;
                self.live.step("waiting for work", poll);
                tokio::select! {
                    _ = q.wait(poll) => {}
                    _ = self.shutdown.cancelled() => {}
                }
                queue = Some(q);
                continue;
            }
            // Delete and confirm this batch while the next one is claimed on the other connection.
            self.live
                .step("deleting and confirming a batch", self.batch_bound());
            let (outcome, next) =
                tokio::join!(self.process(&q, batch), self.claim_ahead(&mut claimer));
            prefetched = next;
            let storage_trouble = match outcome {
                Ok(trouble) => {
                    self.db_ok.store(true, Ordering::SeqCst);
                    trouble
                }
                Err(e) => {
                    // Rows stay claimed; their leases bring them back. Reconnect and go on.
                    self.db_down(&e);
                    tracing::warn!(error = %e, "database error while recording results; the leases will return the rows");
                    if mode == Mode::Drain && !q.is_closed() {
                        queue = Some(q);
                        failure = Some(e);
                        break;
                    }
                    self.sleep(reconnect.next_delay()).await;
                    continue;
                }
            };
            if storage_trouble != Trouble::None {
                // The reaper is about to stop or wait: the batch claimed ahead goes back now,
                // not when its lease runs out (which would count an attempt).
                if let Some(ahead) = prefetched.take() {
                    self.give_back(&q, &ahead).await;
                }
            }
            // The queue's depth for the metrics, during a backlog too (at most every 30 s).
            self.read_status(&q).await;
            if self.answered_last.swap(false, Ordering::SeqCst) {
                // Storage deleted something in this batch, whatever else went wrong: what
                // follows is a fresh trouble, not the next step of a long one.
                cooldown.reset();
            }
            match storage_trouble {
                Trouble::None => {
                    cooldown.reset();
                    self.metrics.overloaded.set(0);
                    self.metrics.config_error.set(0);
                    self.metrics.storage_unreachable.set(0);
                }
                Trouble::Config(message) => {
                    self.metrics.config_error.set(1);
                    self.storage_ok.store(false, Ordering::SeqCst);
                    if mode == Mode::Drain {
                        self.summary.lock().unwrap().config_error = Some(message);
                        break;
                    }
                    let wait = cooldown.next_delay();
                    tracing::error!(error = %message, retry_in_s = wait.as_secs_f64(),
                        "storage refuses this reaper's configuration, or answers what cannot be believed; claims released, no attempts counted");
                    self.sleep(wait).await;
                }
                Trouble::Overload => {
                    self.metrics.overloaded.set(1);
                    let wait = cooldown.next_delay();
                    tracing::warn!(
                        retry_in_s = wait.as_secs_f64(),
                        "storage is overloaded; slowing down"
                    );
                    self.sleep(wait).await;
                }
                Trouble::Outage(message) => {
                    self.metrics.storage_unreachable.set(1);
                    self.storage_ok.store(false, Ordering::SeqCst);
                    if mode == Mode::Drain {
                        self.summary.lock().unwrap().outage = Some(message);
                        break;
                    }
                    let wait = cooldown.next_delay();
                    tracing::error!(error = %message, retry_in_s = wait.as_secs_f64(),
                        "storage is unreachable or answers nothing usable; rows released with no attempt counted, backing off");
                    self.sleep(wait).await;
                }
            }
            queue = Some(q);
        }
        // The batch claimed ahead goes back, unsent, whatever ended the loop. (Rows of a batch
        // whose results could not be recorded stay claimed: the leases return them.)
        if let Some(ahead) = prefetched.take() {
            if let Some(c) = claimer.as_ref().filter(|c| !c.is_closed()) {
                self.give_back(c, &ahead).await;
            } else if let Some(q) = queue.as_ref().filter(|q| !q.is_closed()) {
                self.give_back(q, &ahead).await;
            }
        }
        match failure {
            Some(e) => Err(e),
            None => Ok(self.summary()),
        }
    }

    /// How many rows the next claim asks for: enough for every request in flight, within what
    /// --max-deletes-per-hour leaves. `None` when that limit leaves nothing: the reaper holds
    /// back, says so in its summary and metrics, and the rest of the queue waits.
    fn claim_budget(&self) -> Option<usize> {
        let want = (self.settings.batch_size * self.settings.concurrency).min(10_000);
        let Some(limit) = &self.limit else {
            return Some(want);
        };
        let (available, max) = {
            let mut limit = limit.lock().unwrap();
            (limit.available(Instant::now()), limit.max())
        };
        if available == 0 {
            self.metrics.held_back.set(1);
            self.add(|s| s.held_back = Some(max));
            return None;
        }
        self.metrics.held_back.set(0);
        Some(want.min(available as usize))
    }

    /// How long until --max-deletes-per-hour leaves room again.
    fn next_room(&self) -> Duration {
        self.limit
            .as_ref()
            .map(|l| l.lock().unwrap().next_room(Instant::now()))
            .unwrap_or(Duration::from_secs(1))
    }

    /// Claims on `q` as much as the next batch needs and --max-deletes-per-hour allows, and
    /// counts what it got against that limit. `Ok(None)`: the limit leaves nothing now.
    async fn claim(&self, q: &Queue) -> Result<Option<Batch>, QueueError> {
        let Some(want) = self.claim_budget() else {
            return Ok(None);
        };
        // What it serves: --buckets, the hosts of SUPABASE_URL and --storage-hosts, its own host.
        let serves = crate::queue::Serves {
            buckets: &self.settings.policy.buckets,
            hosts: &self.settings.policy.hosts,
            home: &self.settings.home_host,
        };
        let claim_sent = Instant::now();
        let claim = q.claim(want, self.settings.lease, &serves).await?;
        let claimed_at = Instant::now();
        if let Some(limit) = &self.limit {
            limit
                .lock()
                .unwrap()
                .claimed(claim.rows.len() as u64, claimed_at);
        }
        let send_by = Batch::send_by(
            claim_sent,
            self.settings.lease,
            self.settings.request_timeout,
        );
        Ok(Some(Batch {
            rows: claim.rows,
            lease: claim.lease,
            send_by,
            claimed_at,
            lease_end: claim_sent + self.settings.lease - self.settings.lease / 10,
        }))
    }

    /// Rows of the claim made at `claimed_at` given back unsent no longer count against
    /// --max-deletes-per-hour. (Rows given back after a request that may have deleted them
    /// still count.)
    fn refund(&self, rows: u64, claimed_at: Instant) {
        if let Some(limit) = &self.limit {
            limit.lock().unwrap().released(rows, claimed_at);
        }
    }

    /// Says, on every (re)connection, whether a NOTIFY wakes this reaper or only polling does.
    fn say_how_work_arrives(&self, q: &Queue) {
        let poll = humantime::format_duration(self.settings.poll_interval);
        if q.listening() {
            tracing::info!(
                channel = crate::queue::CHANNEL,
                "listening for NOTIFY; polling every {poll} as well"
            );
        } else {
            tracing::warn!("NOTIFY does not reach this reaper: its connection is no session of its own (a transaction-mode pooler such as Supavisor's port 6543 or PgBouncer's pool_mode = transaction); polling every {poll} instead (--poll-interval), or connect through the pooler's session mode");
        }
    }

    /// With --max-deletes-per-hour, this reaper's id is its alone while it runs (the budget is
    /// kept under the id).
    ///
    /// Through a transaction-mode pooler no lock can be held (a session lock would stay on a
    /// server connection other clients share): the reaper says so and goes on.
    async fn own_worker_id(&self, q: &Queue) -> Result<(), QueueError> {
        if self.limit.is_none() {
            return Ok(());
        }
        let id = &self.settings.worker_id;
        match q.hold_worker_id().await? {
            WorkerIdLock::Held => Ok(()),
            WorkerIdLock::NotPossible => {
                tracing::warn!(worker = %id, "this connection is no session of its own (a transaction-mode pooler?), so the reaper cannot hold the lock on --worker-id {id} that keeps a second reaper with the same id from doubling --max-deletes-per-hour; make sure each reaper has an id of its own, or connect through the pooler's session mode");
                Ok(())
            }
            WorkerIdLock::HeldElsewhere => Err(QueueError::Db(format!(
                "another reaper is running with --worker-id {id} and --max-deletes-per-hour: the hourly budget is kept per id, so each reaper needs an id of its own"
            ))),
        }
    }

    /// Starts --max-deletes-per-hour from what this reaper (its --worker-id) sent within the
    /// last hour and lease, as the audit log says. Until that is known, nothing is claimed.
    async fn seed_limit(&self, q: &Queue) -> Result<(), QueueError> {
        let Some(limit) = &self.limit else {
            return Ok(());
        };
        let hold = limit.lock().unwrap().hold();
        let sent = q.sent_by_reaper(hold).await?;
        let total: u64 = sent.iter().map(|(_, n)| n).sum();
        limit.lock().unwrap().seed(&sent, Instant::now());
        self.seeded.store(true, Ordering::SeqCst);
        tracing::info!(
            sent_recently = total,
            "--max-deletes-per-hour starts from what the audit log says this reaper sent in the last hour"
        );
        Ok(())
    }

    /// Claims the next batch on the second connection, (re)connecting it when needed. Returns
    /// `None` when there is nothing ready or the connection fails: the main loop then claims on
    /// its own connection, as without pipelining. Nothing is claimed once shutdown has begun.
    async fn claim_ahead(&self, claimer: &mut Option<Queue>) -> Option<Batch> {
        if self.shutdown.is_cancelled() {
            return None;
        }
        if claimer.as_ref().is_none_or(Queue::is_closed) {
            match Queue::connect(
                &self.settings.database,
                &self.settings.worker_id,
                false,
                self.settings.db_timeout,
            )
            .await
            {
                Ok(q) => *claimer = Some(q),
                Err(e) => {
                    tracing::debug!(error = %e, "no second connection for claiming ahead; claiming in turn");
                    *claimer = None;
                    return None;
                }
            }
        }
        let c = claimer.as_ref()?;
        match self.claim(c).await {
            Ok(Some(b)) if !b.rows.is_empty() => Some(b),
            Ok(_) => None,
            Err(e) => {
                tracing::debug!(error = %e, "claiming ahead failed; claiming in turn");
                *claimer = None;
                None
            }
        }
    }

    /// The database failed a call: /readyz says so, with why, until a connection works again.
    fn db_down(&self, e: &QueueError) {
        self.db_ok.store(false, Ordering::SeqCst);
        *self.db_error.lock().unwrap() = Some(e.to_string());
    }

    /// The longest one database call may take before the reaper gives up on it.
    fn db_call(&self) -> Duration {
        self.settings.db_timeout + Duration::from_secs(10)
    }

    /// The longest one batch may take: its deletes are sent only within the lease, and each
    /// takes at most --request-timeout; then a handful of bounded database calls record it.
    fn batch_bound(&self) -> Duration {
        self.settings.lease + self.settings.request_timeout + self.db_call() * 8
    }

    /// Releases a batch this reaper will not process now, without counting an attempt. Nothing
    /// of it was sent, so its objects count as never handed out.
    async fn give_back(&self, q: &Queue, batch: &Batch) {
        self.live.step("giving back a batch", self.db_call());
        let Some(lease) = &batch.lease else { return };
        let ids: Vec<i64> = batch.rows.iter().map(|r| r.id).collect();
        match q.release(lease, Some(&ids), None, Sent::Nothing).await {
            Ok(n) => {
                self.refund(n as u64, batch.claimed_at);
                self.add(|s| s.released += n as u64);
                self.metrics.count("released", n as usize);
            }
            Err(e) => {
                tracing::warn!(error = %e, rows = ids.len(), "could not release the batch claimed ahead; its lease will return it")
            }
        }
    }

    async fn sleep(&self, d: Duration) {
        self.live.step("waiting", d);
        tokio::select! {
            _ = tokio::time::sleep(d) => {}
            _ = self.shutdown.cancelled() => {}
        }
    }

    fn add(&self, f: impl FnOnce(&mut Summary)) {
        let mut s = self.summary.lock().unwrap();
        f(&mut s);
        if let Some(p) = &self.progress {
            p(&s);
        }
    }

    /// Deletes one claimed batch and records every row's fate. Returns the storage trouble seen.
    async fn process(&self, q: &Queue, batch: Batch) -> Result<Trouble, QueueError> {
        let (send_by, claimed_at, lease_end) = (batch.send_by, batch.claimed_at, batch.lease_end);
        let Some(lease) = batch.lease else {
            return Ok(Trouble::None);
        };
        let db_down = |e: &QueueError| self.db_down(e);
        let rec = Recorder {
            queue: q,
            lease: &lease,
            until: batch.lease_end,
            on_timeout: &db_down,
        };
        // Each row's object, for the absence checks.
        let objects: HashMap<i64, (String, String)> = batch
            .rows
            .iter()
            .filter_map(|r| Some((r.id, (r.bucket.clone()?, r.object_path.clone()?))))
            .collect();
        // 1. The reaper's own allow-list, whatever the database said.
        let mut refused: BTreeMap<String, Vec<i64>> = BTreeMap::new();
        let mut by_bucket: BTreeMap<String, Vec<Claimed>> = BTreeMap::new();
        for row in batch.rows {
            match allowed(&self.settings.policy, &row) {
                Ok(bucket) => by_bucket.entry(bucket).or_default().push(row),
                Err(reason) => refused.entry(reason).or_default().push(row.id),
            }
        }
        for (reason, ids) in &refused {
            // claim() hands out only rows of this reaper's buckets and hosts, so this is rare:
            // a row the database and this reaper judge differently. It is the reaper's problem,
            // not the row's: give it back for another reaper, costing it no attempt.
            tracing::warn!(worker = %self.settings.worker_id, rows = ids.len(), reason = %reason,
                "rows refused by this reaper's allow-list; given back for another reaper, never sent to storage");
            let results = rec.refuse(ids, reason).await?;
            let back = results.iter().filter(|(_, r)| r == "given back").count();
            self.metrics.count("refused", back);
            self.metrics.misconfigured.set(1);
            self.refund(back as u64, claimed_at);
            self.add(|s| s.refused += back as u64);
        }

        // 2. Bulk deletes, several in flight.
        let mut chunks: Vec<(String, Vec<Claimed>)> = Vec::new();
        for (bucket, rows) in by_bucket {
            for chunk in rows.chunks(self.bulk_limit.load(Ordering::SeqCst)) {
                chunks.push((bucket.clone(), chunk.to_vec()));
            }
        }
        let results: Vec<split::Piece> = futures::stream::iter(chunks)
            .map(|(bucket, rows)| async move { self.delete_chunk(&bucket, rows, send_by).await })
            .buffer_unordered(self.settings.concurrency)
            .collect::<Vec<_>>()
            .await
            .into_iter()
            .flatten()
            .collect();

        // 3. What the answers say about every row, checked before anything is recorded.
        let mut out = Outcomes::sort(results);
        self.answered_last.store(out.answered, Ordering::SeqCst);
        if out.answered {
            self.storage_ok.store(true, Ordering::SeqCst);
            self.metrics.last_success.set(unix_now());
        }
        self.check_answers(q, &objects, lease_end, &mut out).await;

        // 4. Record it.
        let confirmed = self.record_confirms(&rec, &mut out).await?;
        let (mut failed, mut dead) = self.record_failures(&rec, &out.retry, true).await?;
        let (f, d) = self.record_failures(&rec, &out.dead, false).await?;
        failed += f;
        dead += d;
        let mut released = rec.release(&out.release_ids, None, Sent::Nothing).await?;
        let mut unsent = released;
        if !out.late_ids.is_empty() {
            let overdue = Instant::now().saturating_duration_since(send_by);
            tracing::warn!(rows = out.late_ids.len(), overdue_s = overdue.as_secs_f64(),
                "rows not sent: their lease too close to expiry (did this reaper stall?); given back unsent");
            let reason = format!(
                "not sent: the lease was too close to expiry ({:.1} s past this reaper's deadline for sending; it stalled)",
                overdue.as_secs_f64()
            );
            let n = rec
                .release(&out.late_ids, Some(&reason), Sent::Nothing)
                .await?;
            released += n;
            unsent += n;
        }
        for ((reason, sent), ids) in &out.release_with_reason {
            let n = rec.release(ids, Some(reason), *sent).await?;
            released += n;
            if *sent == Sent::Nothing {
                unsent += n;
            }
        }
        self.refund(unsent as u64, claimed_at);

        // Only what this claim confirmed: a row whose lease was lost is the other reaper's.
        self.metrics.count("deleted", confirmed.deleted);
        self.metrics.count("absent", confirmed.absent);
        self.metrics.count("failed", failed);
        self.metrics.count("dead_lettered", dead);
        self.metrics.count("released", released as usize);
        self.metrics.bytes_deleted.inc_by(out.bytes);
        self.add(|s| {
            s.deleted += confirmed.deleted as u64;
            s.absent += confirmed.absent as u64;
            s.failed += failed as u64;
            s.dead_lettered += dead as u64;
            s.released += released as u64;
            s.lease_lost += confirmed.lost as u64;
            s.late += out.late_ids.len() as u64;
            s.bytes += out.bytes;
        });
        Ok(out.trouble)
    }

    /// Confirms what storage deleted and what it found absent. A row the database does not
    /// confirm because storage.objects still lists its object goes back (the delete did not
    /// happen, whatever the answer said) and is a configuration error.
    async fn record_confirms(
        &self,
        rec: &Recorder<'_>,
        out: &mut Outcomes,
    ) -> Result<Confirmed, QueueError> {
        let deleted = rec.confirm(&out.deleted_ids, "deleted", &out.sizes).await?;
        let absent = rec
            .confirm(&out.absent_ids, "absent", &HashMap::new())
            .await?;
        let confirmed = |r: &[(i64, String)]| r.iter().filter(|(_, r)| r == "confirmed").count();
        let (n_deleted, n_absent) = (confirmed(&deleted), confirmed(&absent));
        let mut results = deleted;
        results.extend(absent);
        let stored: Vec<i64> = results
            .iter()
            .filter(|(_, r)| r.starts_with("not confirmed: still in storage.objects"))
            .map(|(id, _)| *id)
            .collect();
        let lost = results.iter().filter(|(_, r)| r != "confirmed").count() - stored.len();
        if lost > 0 {
            tracing::warn!(rows = lost, "some rows were no longer ours to confirm (lease expired and taken over); the other reaper records them");
        }
        if !stored.is_empty() {
            let example = results
                .iter()
                .find(|(_, r)| r.starts_with("not confirmed: still in storage.objects"))
                .map(|(_, r)| r.trim_start_matches("not confirmed: ").to_string())
                .unwrap_or_default();
            let why = format!(
                "storage's answer is contradicted by storage.objects for {} objects (e.g. {example}): the key may lack delete \
                 rights, or something other than this project's storage answers at SUPABASE_URL",
                stored.len()
            );
            tracing::error!(rows = stored.len(), "{why}");
            out.deleted_ids.retain(|id| !stored.contains(id));
            out.absent_ids.retain(|id| !stored.contains(id));
            rec.release(&stored, Some(&format!("not confirmed: {why}")), Sent::Maybe)
                .await?;
            self.add(|s| s.released += stored.len() as u64);
            self.metrics.count("released", stored.len());
            out.trouble = std::mem::take(&mut out.trouble).worst(Trouble::Config(why));
        }
        Ok(Confirmed {
            deleted: n_deleted,
            absent: n_absent,
            lost,
        })
    }

    /// Fails rows whose requests failed for what they carried: an attempt each, back-off, and
    /// the dead-letter state once out of attempts (at once when not `retryable`). Returns
    /// (failed, dead-lettered).
    async fn record_failures(
        &self,
        rec: &Recorder<'_>,
        failures: &HashMap<String, Vec<i64>>,
        retryable: bool,
    ) -> Result<(usize, usize), QueueError> {
        let (mut failed, mut dead) = (0, 0);
        for (error, ids) in failures {
            tracing::warn!(rows = ids.len(), error = %error, retryable, "bulk delete failed for these rows while storage handles others");
            let results = rec.fail(ids, error, retryable).await?;
            failed += ids.len();
            let dead_ids: Vec<i64> = results
                .iter()
                .filter(|(_, r)| r == "dead-lettered")
                .map(|(id, _)| *id)
                .collect();
            if !dead_ids.is_empty() {
                tracing::warn!(rows = dead_ids.len(), ids = ?dead_ids, last_error = %error,
                    "rows dead-lettered: out of attempts; they keep their object until a DBA runs SELECT orphan_cleanup.requeue_dead()");
            }
            dead += dead_ids.len();
        }
        Ok((failed, dead))
    }

    /// Whether to read queue_status() on this idle poll: at most every [`STATUS_EVERY`], since
    /// it reads every ready row, and an idle reaper beside a backlog it does not serve polls often.
    fn status_due(&self) -> bool {
        let mut last = self.status_read.lock().unwrap();
        let due = last.is_none_or(|t| t.elapsed() >= STATUS_EVERY);
        if due {
            *last = Some(Instant::now());
        }
        due
    }

    /// Reads queue_status() for the metrics when it is due (every [`STATUS_EVERY`]), and the
    /// bytes still queued when those are (every [`QUEUED_BYTES_EVERY`]).
    async fn read_status(&self, q: &Queue) {
        if !self.status_due() {
            return;
        }
        self.live.step("reading queue_status()", self.db_call());
        if let Ok(status) = q.status().await {
            self.watch_status(&status);
        }
        let mut last = self.queued_bytes_read.lock().await;
        if last.is_none_or(|t| t.elapsed() >= QUEUED_BYTES_EVERY) {
            *last = Some(Instant::now());
            self.live.step("reading savings_report()", self.db_call());
            if let Ok(today) = q.savings_report("day", 1).await {
                let queued = today.first().and_then(|p| p.bytes_still_queued);
                self.metrics
                    .queued_bytes
                    .set(queued.map_or(f64::NAN, |b| b as f64));
            }
        }
    }

    /// What queue_status() says, as metrics; and whether it names this reaper as one that leaves
    /// ready rows to others (its buckets or hosts do not cover them) or refused rows.
    fn watch_status(&self, status: &crate::queue::Status) {
        self.metrics.queue_depth.set(status.pending);
        self.metrics.unserved.set(status.unserved);
        self.metrics.queue_dead.set(status.dead);
        self.metrics
            .breaker_tripped
            .set(i64::from(status.breaker_tripped));
        self.metrics.refused_saves.set(status.refused_saves);
        for (kind, bytes) in [
            ("orphan", status.reclaimed_orphan_bytes),
            ("stray", status.reclaimed_stray_bytes),
        ] {
            self.metrics
                .reclaimed_bytes
                .get_or_create(&crate::metrics::KindLabel { kind })
                .set(bytes);
        }
        self.metrics
            .database_health
            .set(match status.health.as_str() {
                "ok" => 0,
                "warning" => 1,
                _ => 2,
            });
        let named = status.names(&self.settings.worker_id);
        let was = self.metrics.misconfigured.get() == 1;
        self.metrics.misconfigured.set(i64::from(named));
        if named && !was {
            tracing::warn!(
                worker = %self.settings.worker_id,
                buckets = ?self.settings.policy.buckets,
                hosts = ?self.settings.policy.hosts,
                detail = status.misconfigured_reapers.as_deref().unwrap_or(""),
                "the database says this reaper leaves ready rows it does not serve to other reapers: if no other reaper serves them, \
                 fix SUPABASE_URL, --storage-hosts or --buckets to match orphan_cleanup.allowed_hosts and allowed_buckets"
            );
        }
    }
}

/// The reaper's own check of a row, whatever the database said: the bucket is in --buckets and
/// the host, if any, is this project's. Returns the bucket, or why the row is refused.
pub fn allowed(policy: &object_url::Policy, row: &Claimed) -> Result<String, String> {
    let (Some(bucket), Some(key)) = (row.bucket.clone(), row.object_path.clone()) else {
        return Err("the row names no bucket or object".into());
    };
    let obj = object_url::ObjectRef {
        host: row.host.clone(),
        bucket: bucket.clone(),
        key,
        form: object_url::UrlForm::Bare,
    };
    policy.check(&obj).map_err(|r| r.to_string())?;
    Ok(bucket)
}

fn unix_now() -> f64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

#[derive(Debug, Clone, PartialEq, Eq, Default)]
enum Trouble {
    #[default]
    None,
    Config(String),
    Overload,
    /// Storage did not answer at all (transport errors, 5xx, unusable bodies) on every request
    /// of a batch, and not to a plain read either: no row is at fault.
    Outage(String),
}

impl Trouble {
    /// Keeps the worse of two: a configuration error over an outage over overload.
    fn worst(self, other: Trouble) -> Trouble {
        let rank = |t: &Trouble| match t {
            Trouble::None => 0,
            Trouble::Overload => 1,
            Trouble::Outage(_) => 2,
            Trouble::Config(_) => 3,
        };
        if rank(&other) > rank(&self) {
            other
        } else {
            self
        }
    }
}

/// Exponential back-off with jitter.
pub struct Backoff {
    base: Duration,
    max: Duration,
    current: Duration,
}

impl Backoff {
    pub fn new(base: Duration, max: Duration) -> Backoff {
        Backoff {
            base,
            max,
            current: base,
        }
    }

    pub fn next_delay(&mut self) -> Duration {
        let d = self.current;
        self.current = (self.current * 2).min(self.max);
        d.mul_f64(0.8 + rand::random::<f64>() * 0.4)
    }

    pub fn reset(&mut self) {
        self.current = self.base;
    }
}

/// What to check when the start-up probe fails, by the kind of failure.
fn probe_fix(e: &StorageError) -> &'static str {
    match e {
        StorageError::Config { http, status, .. }
            if *http == 401 || *http == 403 || status == "401" || status == "403" =>
        {
            "; check SUPABASE_SERVICE_ROLE_KEY: it must be this project's service_role key or a secret key (sb_secret_...)"
        }
        StorageError::Config { http, status, .. } if *http == 415 || status == "415" => {
            "; the bucket's allowed MIME types refuse the probe's 1x1 image/png: allow image/png in the bucket, or run with --no-probe (absences are then checked the same way, and fail the same way)"
        }
        StorageError::Config { .. } => {
            "; check SUPABASE_URL (the project's URL) and that the bucket exists"
        }
        StorageError::Overload { .. } => "; storage is overloaded: start the reaper again later",
        StorageError::Retryable(_) => {
            "; check SUPABASE_URL and that storage is reachable from this host"
        }
        StorageError::Refused { .. } => {
            "; a proxy or firewall between this host and storage refuses the request: let it pass DELETE /storage/v1/object/*"
        }
        StorageError::BulkLimit(_) => "; the project's bulk limit refused a single name",
        StorageError::OverQuota { .. } => {
            "; the project is over its quota: raise the plan or spend cap, then start the reaper again"
        }
    }
}
