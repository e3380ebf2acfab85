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
use crate::queue::{Claimed, LeaseToken, Queue, QueueError, Sent};
use crate::storage::{StorageClient, StorageError};

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
    /// Set when --max-deletes-per-hour (this value) stopped the drain or holds the daemon back.
    pub held_back: Option<u64>,
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
        if let Some(max) = self.held_back {
            write!(
                f,
                "\nHELD BACK: --max-deletes-per-hour {max} reached; the rest of the queue waits"
            )?;
        }
        if let Some(e) = &self.config_error {
            write!(f, "\nCONFIGURATION ERROR: {e}")?;
        }
        Ok(())
    }
}

/// How often an idle reaper reads queue_status() for its metrics.
const STATUS_EVERY: Duration = Duration::from_secs(30);

/// Names in a row that found nothing to delete, before the reaper suspects its key.
const SUSPICIOUS_ABSENT_RUN: u64 = 5000;

pub struct Reaper {
    pub settings: Settings,
    pub storage: StorageClient,
    pub metrics: Arc<Metrics>,
    pub shutdown: CancellationToken,
    /// Readiness for /readyz: database reachable, storage accepting the key.
    pub db_ok: AtomicBool,
    pub storage_ok: AtomicBool,
    summary: Mutex<Summary>,
    absent_run: Mutex<u64>,
    /// When queue_status() was last read for the metrics (it scans the ready rows).
    status_read: Mutex<Option<Instant>>,
    progress: Option<ProgressFn>,
    limit: Option<Mutex<HourlyLimit>>,
}

/// Receives the running totals after every batch.
type ProgressFn = Box<dyn Fn(&Summary) + Send + Sync>;

/// What one bulk request came to.
enum ChunkResult {
    Done(crate::storage::Deleted),
    Failed(StorageError),
    NotSent,
    /// Not sent: the batch's lease could run out before the request ends.
    Late,
}

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
            .map(|max| Mutex::new(HourlyLimit::new(max)));
        Reaper {
            settings,
            storage,
            metrics,
            shutdown,
            db_ok: AtomicBool::new(false),
            storage_ok: AtomicBool::new(false),
            summary: Mutex::new(Summary::default()),
            absent_run: Mutex::new(0),
            status_read: Mutex::new(None),
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
        let name = format!(
            ".pg_orphan_cleanup-probe/{}.txt",
            self.settings.worker_id.replace(['/', ':'], "_")
        );
        self.storage
            .upload(&bucket, &name, b"pg_orphan_cleanup reaper probe".to_vec())
            .await
            .map_err(|e| {
                format!(
                    "the start-up probe could not upload {bucket}/{name}: {e}{}",
                    probe_fix(&e)
                )
            })?;
        let deleted = self
            .storage
            .bulk_delete(&bucket, std::slice::from_ref(&name))
            .await
            .map_err(|e| {
                format!(
                    "the start-up probe could not delete {bucket}/{name}: {e}{}",
                    probe_fix(&e)
                )
            })?;
        if !deleted.names.contains_key(&name) {
            return Err(format!(
                "the start-up probe uploaded {bucket}/{name} but a bulk delete did not delete it: this key cannot delete objects \
                 (is it the service_role key?)"
            ));
        }
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
        while !self.shutdown.is_cancelled() {
            let q = match queue.take().filter(|q| !q.is_closed()) {
                Some(q) => q,
                None => match Queue::connect(
                    &self.settings.database_url,
                    &self.settings.worker_id,
                    mode == Mode::Run,
                )
                .await
                {
                    Ok(q) => {
                        self.db_ok.store(true, Ordering::SeqCst);
                        reconnect.reset();
                        q
                    }
                    Err(e) => {
                        self.db_ok.store(false, Ordering::SeqCst);
                        if mode == Mode::Drain {
                            return Err(e);
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
                        return Err(e);
                    }
                    self.db_ok.store(false, Ordering::SeqCst);
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
                if self.status_due() {
                    if let Ok(status) = q.status().await {
                        self.watch_status(&status);
                    }
                }
                let poll = self.settings.poll_interval;
                tokio::select! {
                    _ = q.wait(poll) => {}
                    _ = self.shutdown.cancelled() => {}
                }
                queue = Some(q);
                continue;
            }
            // Delete and confirm this batch while the next one is claimed on the other connection.
            let (outcome, next) =
                tokio::join!(self.process(&q, batch), self.claim_ahead(&mut claimer));
            prefetched = next;
            let storage_trouble = match outcome {
                Ok(trouble) => trouble,
                Err(e) => {
                    // Rows stay claimed; their leases bring them back. Reconnect and go on.
                    self.db_ok.store(false, Ordering::SeqCst);
                    tracing::warn!(error = %e, "database error while recording results; the leases will return the rows");
                    if mode == Mode::Drain && !q.is_closed() {
                        return Err(e);
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
            match storage_trouble {
                Trouble::None => {
                    cooldown.reset();
                    self.metrics.overloaded.set(0);
                    self.metrics.config_error.set(0);
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
                        "storage refuses this reaper's configuration; claims released, no attempts counted; fix SUPABASE_URL or the key");
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
            }
            queue = Some(q);
        }
        // Clean shutdown: the batch claimed ahead goes back, unsent. (Rows of a batch whose
        // results could not be recorded stay claimed: the leases return them.)
        if let Some(ahead) = prefetched.take() {
            if let Some(q) = queue.as_ref().filter(|q| !q.is_closed()) {
                self.give_back(q, &ahead).await;
            } else if let Some(c) = claimer.as_ref().filter(|c| !c.is_closed()) {
                self.give_back(c, &ahead).await;
            }
        }
        Ok(self.summary())
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
        if let Some(limit) = &self.limit {
            limit
                .lock()
                .unwrap()
                .claimed(claim.rows.len() as u64, Instant::now());
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
        }))
    }

    /// Rows given back unsent no longer count against --max-deletes-per-hour.
    fn refund(&self, rows: u64) {
        if let Some(limit) = &self.limit {
            limit.lock().unwrap().released(rows, Instant::now());
        }
    }

    /// Claims the next batch on the second connection, (re)connecting it when needed. Returns
    /// `None` when there is nothing ready or the connection fails: the main loop then claims on
    /// its own connection, as without pipelining. Nothing is claimed once shutdown has begun.
    async fn claim_ahead(&self, claimer: &mut Option<Queue>) -> Option<Batch> {
        if self.shutdown.is_cancelled() {
            return None;
        }
        if claimer.as_ref().is_none_or(Queue::is_closed) {
            match Queue::connect(&self.settings.database_url, &self.settings.worker_id, false).await
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

    /// Releases a batch this reaper will not process now, without counting an attempt. Nothing
    /// of it was sent, so its objects count as never handed out.
    async fn give_back(&self, q: &Queue, batch: &Batch) {
        let Some(lease) = &batch.lease else { return };
        let ids: Vec<i64> = batch.rows.iter().map(|r| r.id).collect();
        match q.release(lease, Some(&ids), None, Sent::Nothing).await {
            Ok(n) => {
                self.refund(n as u64);
                self.add(|s| s.released += n as u64);
                self.metrics.count("released", n as usize);
            }
            Err(e) => {
                tracing::warn!(error = %e, rows = ids.len(), "could not release the batch claimed ahead; its lease will return it")
            }
        }
    }

    async fn sleep(&self, d: Duration) {
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
        let send_by = batch.send_by;
        let Some(lease) = batch.lease else {
            return Ok(Trouble::None);
        };
        let lease = &lease;
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
            let results = q.refuse(lease, ids, reason).await?;
            let back = results.iter().filter(|(_, r)| r == "given back").count();
            self.metrics.count("refused", back);
            self.metrics.misconfigured.set(1);
            self.refund(back as u64);
            self.add(|s| s.refused += back as u64);
        }

        // 2. Bulk deletes, several in flight.
        let mut chunks: Vec<(String, Vec<Claimed>)> = Vec::new();
        for (bucket, rows) in by_bucket {
            for chunk in rows.chunks(self.settings.batch_size) {
                chunks.push((bucket.clone(), chunk.to_vec()));
            }
        }
        let results: Vec<(Vec<Claimed>, ChunkResult)> = futures::stream::iter(chunks)
            .map(|(bucket, rows)| async move {
                if self.shutdown.is_cancelled() {
                    return (rows, ChunkResult::NotSent);
                }
                if Instant::now() >= send_by {
                    return (rows, ChunkResult::Late);
                }
                let names: Vec<String> =
                    rows.iter().filter_map(|r| r.object_path.clone()).collect();
                let started = Instant::now();
                let result = self.storage.bulk_delete(&bucket, &names).await;
                self.metrics
                    .batch_seconds
                    .observe(started.elapsed().as_secs_f64());
                match result {
                    Ok(d) => (rows, ChunkResult::Done(d)),
                    Err(e) => (rows, ChunkResult::Failed(e)),
                }
            })
            .buffer_unordered(self.settings.concurrency)
            .collect()
            .await;

        // 3. Record the outcome of every row.
        let mut deleted_ids = Vec::new();
        let mut absent_ids = Vec::new();
        let mut release_ids = Vec::new();
        let mut late_ids = Vec::new();
        let mut release_with_reason: HashMap<(String, Sent), Vec<i64>> = HashMap::new();
        let mut retry: HashMap<String, Vec<i64>> = HashMap::new();
        let mut bytes = 0u64;
        let mut trouble = Trouble::None;
        for (rows, result) in results {
            match result {
                ChunkResult::Done(d) => {
                    for row in rows {
                        let name = row.object_path.clone().unwrap_or_default();
                        match d.names.get(&name) {
                            Some(size) => {
                                bytes += size.unwrap_or(0);
                                deleted_ids.push(row.id);
                            }
                            None => absent_ids.push(row.id),
                        }
                    }
                    self.storage_ok.store(true, Ordering::SeqCst);
                    let now = SystemTime::now()
                        .duration_since(SystemTime::UNIX_EPOCH)
                        .map(|d| d.as_secs_f64())
                        .unwrap_or(0.0);
                    self.metrics.last_success.set(now);
                }
                ChunkResult::NotSent => release_ids.extend(rows.iter().map(|r| r.id)),
                ChunkResult::Late => late_ids.extend(rows.iter().map(|r| r.id)),
                ChunkResult::Failed(
                    ref e @ StorageError::Config {
                        http,
                        ref status,
                        ref code,
                        ref message,
                    },
                ) => {
                    let why = format!("HTTP {http}, statusCode {status} ({code}): {message}");
                    release_with_reason
                        .entry((format!("storage refused the reaper's configuration (fix SUPABASE_URL or the key): {why}"), sent_by(e)))
                        .or_default()
                        .extend(rows.iter().map(|r| r.id));
                    trouble = Trouble::Config(why);
                }
                ChunkResult::Failed(ref e @ StorageError::Overload { http, ref code }) => {
                    release_with_reason
                        .entry((
                            format!(
                                "storage is overloaded (HTTP {http}, {code}); the reaper slows down"
                            ),
                            sent_by(e),
                        ))
                        .or_default()
                        .extend(rows.iter().map(|r| r.id));
                    if trouble == Trouble::None {
                        trouble = Trouble::Overload;
                    }
                }
                ChunkResult::Failed(StorageError::Retryable(e)) => {
                    retry
                        .entry(e)
                        .or_default()
                        .extend(rows.iter().map(|r| r.id));
                }
            }
        }

        let confirmed_deleted = q.confirm(lease, &deleted_ids, "deleted").await?;
        let confirmed_absent = q.confirm(lease, &absent_ids, "absent").await?;
        let lost = confirmed_deleted
            .iter()
            .chain(&confirmed_absent)
            .filter(|(_, r)| r != "confirmed")
            .count();
        if lost > 0 {
            tracing::warn!(rows = lost, "some rows were no longer ours to confirm (lease expired and taken over); the other reaper records them");
        }
        let mut failed = 0;
        let mut dead = 0;
        for (error, ids) in &retry {
            tracing::warn!(rows = ids.len(), error = %error, "bulk delete failed; rows retry with back-off");
            let results = q.fail(lease, ids, error, true).await?;
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
        let mut released = q
            .release(lease, Some(&release_ids), None, Sent::Nothing)
            .await?;
        if !late_ids.is_empty() {
            let overdue = Instant::now().saturating_duration_since(send_by);
            tracing::warn!(rows = late_ids.len(), overdue_s = overdue.as_secs_f64(),
                "rows not sent: their lease too close to expiry (did this reaper stall?); given back unsent");
            let reason = format!(
                "not sent: the lease was too close to expiry ({:.1} s past this reaper's deadline for sending; it stalled)",
                overdue.as_secs_f64()
            );
            released += q
                .release(lease, Some(&late_ids), Some(&reason), Sent::Nothing)
                .await?;
        }
        for ((reason, sent), ids) in &release_with_reason {
            released += q.release(lease, Some(ids), Some(reason), *sent).await?;
        }
        self.refund(released as u64);

        self.metrics.count("deleted", deleted_ids.len());
        self.metrics.count("absent", absent_ids.len());
        self.metrics.count("failed", failed);
        self.metrics.count("dead_lettered", dead);
        self.metrics.count("released", released as usize);
        self.metrics.bytes_deleted.inc_by(bytes);
        self.watch_for_a_key_that_deletes_nothing(
            deleted_ids.len() as u64,
            absent_ids.len() as u64,
        );
        self.add(|s| {
            s.deleted += deleted_ids.len() as u64;
            s.absent += absent_ids.len() as u64;
            s.failed += failed as u64;
            s.dead_lettered += dead as u64;
            s.released += released as u64;
            s.lease_lost += lost as u64;
            s.late += late_ids.len() as u64;
            s.bytes += bytes;
        });
        Ok(trouble)
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

    /// What queue_status() says, as metrics; and whether it names this reaper as one that leaves
    /// ready rows to others (its buckets or hosts do not cover them) or refused rows.
    fn watch_status(&self, status: &crate::queue::Status) {
        self.metrics.queue_depth.set(status.pending);
        self.metrics.unserved.set(status.unserved);
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

    /// A key without delete rights gets `200 []`, which looks exactly like "already gone". The
    /// probe catches that at start; this catches it later (a key rotated under a running reaper).
    fn watch_for_a_key_that_deletes_nothing(&self, deleted: u64, absent: u64) {
        let mut run = self.absent_run.lock().unwrap();
        if deleted > 0 {
            *run = 0;
            self.metrics.nothing_deleted.set(0);
            return;
        }
        let before = *run;
        *run += absent;
        if before < SUSPICIOUS_ABSENT_RUN && *run >= SUSPICIOUS_ABSENT_RUN {
            self.metrics.nothing_deleted.set(1);
            tracing::error!(
                names = *run,
                "the last {} names sent to storage were all already absent: if that is unexpected, the key may lack delete rights \
                 (an anon key deletes nothing and reports nothing); check SUPABASE_SERVICE_ROLE_KEY",
                *run
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

/// What a failed bulk request says about the deletes it carried.
fn sent_by(e: &StorageError) -> Sent {
    if e.deleted_nothing() {
        Sent::Nothing
    } else {
        Sent::Maybe
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Trouble {
    None,
    Config(String),
    Overload,
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
        StorageError::Config { .. } => {
            "; check SUPABASE_URL (the project's URL) and that the bucket exists"
        }
        StorageError::Overload { .. } => "; storage is overloaded: start the reaper again later",
        StorageError::Retryable(_) => {
            "; check SUPABASE_URL and that storage is reachable from this host"
        }
    }
}
