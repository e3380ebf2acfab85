//! The deletion queue, through pg_orphan_cleanup's SQL API (`claim`, `confirm`, `fail`,
//! `release`, `refuse`, `peek`, `queue_status`): the reaper's role may call nothing else.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use thiserror::Error;
use tokio::sync::Notify;
use tokio_postgres::types::{ToSql, Type};
use tokio_postgres::{AsyncMessage, Client, Row};

use crate::database::{explain_tls, Database};

/// The channel pg_orphan_cleanup notifies when it queues rows.
pub const CHANNEL: &str = "orphan_cleanup_queue";

/// The oldest extension this reaper works with: 0.2.0 brought `claim(..., hosts)` and
/// `refuse()`, without which a reaper is handed rows of hosts it does not serve.
pub const MIN_EXTENSION: (u32, u32, u32) = (0, 2, 0);

#[derive(Debug, Error)]
pub enum QueueError {
    #[error("cannot connect to the database: {0}; check DATABASE_URL (host, port, database, user, password) and that PostgreSQL accepts connections from this host")]
    Connect(String),
    #[error("database error: {0}")]
    Db(String),
    #[error("pg_orphan_cleanup is not installed in this database; run CREATE EXTENSION pg_orphan_cleanup there (or, where native extensions cannot be loaded, install the managed edition: make managed, then psql -f dist/pg_orphan_cleanup_managed--<version>.sql), or point DATABASE_URL at the database that has it")]
    NotInstalled,
    #[error("pg_orphan_cleanup {0} is installed, and this reaper needs {min} or later; run ALTER EXTENSION pg_orphan_cleanup UPDATE in the database", min = min_extension())]
    TooOld(String),
    /// A call took longer than --db-timeout: the server cancelled it (statement or lock
    /// timeout), or no answer came at all (a partition, a stopped server).
    #[error("the database did not answer within --db-timeout ({0}); a lock held on the orphan_cleanup tables (see pg_locks), an overloaded server or a network partition")]
    Timeout(String),
    /// The server rolled the call back for a deadlock or a serialization failure: safe to retry.
    #[error("the database rolled the call back to resolve a conflict ({0})")]
    Conflict(String),
}

fn min_extension() -> String {
    let (a, b, c) = MIN_EXTENSION;
    format!("{a}.{b}.{c}")
}

/// Whether an `extversion` is at least [`MIN_EXTENSION`]: `0.2.0`, `0.2`, `1.0.0-rc1`. A
/// pre-release of a version counts as that version's predecessor (`0.2.0-rc1` is not 0.2.0).
/// A version that starts with no number (a developer's build) is accepted: the SQL calls then
/// say what is missing.
pub fn supported(version: &str) -> bool {
    let (release, pre) = match version.split_once('-') {
        Some((r, _)) => (r, true),
        None => (version, false),
    };
    let parts: Vec<Option<u32>> = release.split('.').map(|p| p.parse().ok()).collect();
    if parts.is_empty() || parts.iter().any(Option::is_none) || parts.len() > 3 {
        return true;
    }
    let n = |i: usize| parts.get(i).copied().flatten().unwrap_or(0);
    let v = (n(0), n(1), n(2));
    v > MIN_EXTENSION || (v == MIN_EXTENSION && !pre)
}

impl From<tokio_postgres::Error> for QueueError {
    fn from(e: tokio_postgres::Error) -> QueueError {
        // 57014: cancelled by statement_timeout; 55P03: lock_timeout.
        match e.code().map(|c| c.code()) {
            Some("57014") | Some("55P03") => QueueError::Timeout(describe(&e)),
            Some("40P01") | Some("40001") => QueueError::Conflict(describe(&e)),
            _ => QueueError::Db(describe(&e)),
        }
    }
}

/// The server's message with its detail and hint, or the client-side error.
pub fn describe(e: &tokio_postgres::Error) -> String {
    match e.as_db_error() {
        Some(d) => {
            let mut s = format!("{} (SQLSTATE {})", d.message(), d.code().code());
            if let Some(h) = d.hint() {
                s.push_str(&format!("; hint: {h}"));
            }
            s
        }
        None => {
            // "error connecting to server" alone does not say why; the cause is the source.
            let mut s = e.to_string();
            let mut source = std::error::Error::source(e);
            while let Some(cause) = source {
                let text = cause.to_string();
                if !s.contains(&text) {
                    s.push_str(&format!(": {text}"));
                }
                source = cause.source();
            }
            s
        }
    }
}

/// What a reaper says, when it gives rows back, about the deletes it sent for them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Sent {
    /// A delete may have reached storage (it was sent, and its answer, if any, does not prove
    /// that nothing was deleted): the objects stay handed out, and no job naming them can be
    /// saved.
    Maybe,
    /// No delete of these rows was sent, or storage's answer proves that nothing was deleted
    /// (a refused key or body: [`crate::storage::StorageError::deleted_nothing`]). The objects
    /// count as never handed out: saves of jobs naming them go through again.
    Nothing,
}

/// What a reaper serves, as claim() takes it.
pub struct Serves<'a> {
    pub buckets: &'a [String],
    pub hosts: &'a [String],
    pub home: &'a str,
}

/// A claim's lease token: the secret that proves this reaper holds the rows one `claim()` gave
/// it (a fencing token). `confirm`, `fail`, `release` and `refuse` need it, so no one who merely
/// knows this reaper's worker id can act on its claims, and a stalled reaper cannot act on rows
/// claimed again since. The database keeps only its hash. Never printed: `Debug` hides it.
#[derive(Clone, PartialEq, Eq)]
pub struct LeaseToken(String);

impl std::fmt::Debug for LeaseToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("LeaseToken(<secret>)")
    }
}

/// What one `claim()` handed out: its rows and their lease token (none when no rows).
#[derive(Debug)]
pub struct Claim {
    pub rows: Vec<Claimed>,
    pub lease: Option<LeaseToken>,
}

/// One claimed row: the object to delete.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Claimed {
    pub id: i64,
    /// None for a stray: an object in storage that no job names.
    pub job_id: Option<String>,
    pub host: Option<String>,
    pub bucket: Option<String>,
    pub object_path: Option<String>,
    pub attempts: i32,
}

impl Claimed {
    /// From a row of `id, job_id::text, host, bucket, object_path, attempts`.
    fn from_row(r: &tokio_postgres::Row) -> Claimed {
        Claimed {
            id: r.get(0),
            job_id: r.get(1),
            host: r.get(2),
            bucket: r.get(3),
            object_path: r.get(4),
            attempts: r.get(5),
        }
    }
}

pub struct Queue {
    /// One call at a time: each is a transaction of its own (see [`Queue::call`]).
    client: tokio::sync::Mutex<Client>,
    database: Database,
    /// --db-timeout: how long any call may take.
    timeout: Duration,
    worker: String,
    /// Whether confirm() checks every reported deletion against storage.objects here.
    verifies_absence: bool,
    /// Whether this connection is a server session of its own (see [`Queue::own_session`]);
    /// found out once, when first needed.
    own_session: tokio::sync::OnceCell<bool>,
    /// Whether this connection LISTENs to the queue's channel.
    listening: bool,
    closed: Arc<AtomicBool>,
    notified: Arc<Notify>,
    probed: Arc<Probes>,
}

/// The probe channels' notifications that reached one connection, so that
/// [`Queue::own_session`] waits for its own channel's alone.
///
/// Through a transaction-mode pooler a server connection that some reaper LISTENed on hands
/// that reaper's probe notification to whichever client holds it at that moment: any
/// notification on some probe channel says nothing about this connection. (Waking on any of
/// them let a reaper behind PgBouncer in transaction mode believe it had a session of its own
/// and leave its --worker-id lock on a shared server connection.)
#[derive(Default)]
struct Probes {
    arrived: std::sync::Mutex<std::collections::HashSet<String>>,
    wake: Notify,
}

impl Probes {
    fn arrived(&self, channel: &str) {
        self.arrived.lock().unwrap().insert(channel.to_string());
        self.wake.notify_waiters();
    }

    /// Whether a notification on `channel` arrives within `wait`.
    async fn wait_for(&self, channel: &str, wait: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            let woken = self.wake.notified();
            tokio::pin!(woken);
            woken.as_mut().enable();
            if self.arrived.lock().unwrap().remove(channel) {
                return true;
            }
            if tokio::time::timeout_at(deadline, woken).await.is_err() {
                return false;
            }
        }
    }

    fn forget(&self, channel: &str) {
        self.arrived.lock().unwrap().remove(channel);
    }
}

/// The prefix of the channels [`Queue::own_session`] notifies itself on.
const PROBE_CHANNEL: &str = "orphan_cleanup_probe_";

/// How long [`Queue::own_session`] waits for its own NOTIFY. Through a session it arrives in a
/// millisecond or two; through a transaction-mode pooler it never does.
const PROBE_WAIT: Duration = Duration::from_secs(2);

/// What [`Queue::hold_worker_id`] could do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WorkerIdLock {
    /// This connection holds the lock for its life.
    Held,
    /// Another connection holds it: another reaper runs with this id.
    HeldElsewhere,
    /// This connection is no session of its own (a transaction-mode pooler): a session lock
    /// would stay behind on a server connection that other clients share, so none is taken.
    NotPossible,
}

impl Queue {
    /// Connects and, when `listen`, subscribes to the queue's NOTIFY channel, once it has made
    /// sure a NOTIFY can reach this connection at all ([`Queue::own_session`]); otherwise the
    /// reaper polls ([`Queue::listening`]).
    ///
    /// Every call is bounded by `timeout`: the server cancels a statement or a lock wait that
    /// takes longer (statement_timeout, lock_timeout), and the reaper gives up on a call whose
    /// answer does not come a few seconds after that (the connection is then dropped). TCP
    /// keepalives keep an idle connection from going half-open behind a NAT or a firewall.
    pub async fn connect(
        database: &Database,
        worker: &str,
        listen: bool,
        timeout: Duration,
    ) -> Result<Queue, QueueError> {
        let closed = Arc::new(AtomicBool::new(false));
        let notified = Arc::new(Notify::new());
        let probed = Arc::new(Probes::default());
        let client = open(database, timeout, &closed, &notified, &probed).await?;
        let mut queue = Queue {
            client: tokio::sync::Mutex::new(client),
            database: database.clone(),
            timeout,
            worker: worker.to_string(),
            verifies_absence: false,
            own_session: tokio::sync::OnceCell::new(),
            listening: false,
            closed,
            notified,
            probed,
        };
        let version = queue.installed_version().await?;
        match version {
            None => return Err(QueueError::NotInstalled),
            Some(v) if !supported(&v) => return Err(QueueError::TooOld(v)),
            Some(_) => {}
        }
        queue.verifies_absence = queue
            .call("SELECT orphan_cleanup.verifies_absence()", &[])
            .await?
            .first()
            .is_some_and(|r| r.get(0));
        if listen && queue.own_session().await? {
            queue.simple(&format!("LISTEN {CHANNEL}")).await?;
            queue.listening = true;
        }
        Ok(queue)
    }

    /// Runs `sql` in a transaction of its own, with `statement_timeout` and `lock_timeout`
    /// set to --db-timeout for that transaction alone, as an unnamed statement.
    ///
    /// Nothing outlives the call, so it works the same through a transaction-mode pooler
    /// (Supavisor, PgBouncer), where the next call may run on another server connection that
    /// other clients share: a session `SET` would stay on that connection and time out other
    /// clients' statements, and a named prepared statement would be missing on the next
    /// connection, or already there from another client.
    ///
    /// `BEGIN`, the statement and `COMMIT` are sent together, before any answer is read
    /// (pipelined): the server commits as soon as the statement ends, as it commits a
    /// statement of its own. A reaper that stalls after sending a claim (a pause, a stop, a
    /// long GC-like hiccup of its host) holds no transaction open: its claim commits without it
    /// and its lease runs from then, as the lease checks expect.
    async fn call(
        &self,
        sql: &str,
        params: &[(&(dyn ToSql + Sync), Type)],
    ) -> Result<Vec<Row>, QueueError> {
        self.call_within(sql, params, self.timeout).await
    }

    /// [`Queue::call`] with a timeout of its own.
    async fn call_within(
        &self,
        sql: &str,
        params: &[(&(dyn ToSql + Sync), Type)],
        timeout: Duration,
    ) -> Result<Vec<Row>, QueueError> {
        let client = self.client.lock().await;
        let ms = timeout.as_millis();
        // READ COMMITTED whatever the role's or database's default: the queue functions are
        // written for it, and claim() refuses any other level. A reaper frozen between sending
        // the statement and its COMMIT (the pipeline may be flushed in pieces) cannot hold the
        // transaction open past --db-timeout either.
        let begin = format!(
            "BEGIN ISOLATION LEVEL READ COMMITTED, READ WRITE; SET LOCAL statement_timeout = {ms}; \
             SET LOCAL lock_timeout = {ms}; SET LOCAL idle_in_transaction_session_timeout = {ms}"
        );
        let call = async {
            // A failed statement aborts the transaction; its COMMIT then rolls back.
            let (begun, rows, committed) = tokio::join!(
                client.batch_execute(&begin),
                client.query_typed(sql, params),
                client.batch_execute("COMMIT"),
            );
            begun?;
            let rows = rows?;
            committed?;
            Ok(rows)
        };
        bounded(timeout, &self.closed, call).await
    }

    /// The installed version: the extension's, or the managed edition's (which has no
    /// pg_extension row). `None` when neither is installed here.
    async fn installed_version(&self) -> Result<Option<String>, QueueError> {
        let found: Option<String> = self
            .call(
                "SELECT coalesce(
                     (SELECT extversion FROM pg_catalog.pg_extension WHERE extname = 'pg_orphan_cleanup'),
                     CASE WHEN pg_catalog.to_regprocedure('orphan_cleanup.managed_version()') IS NOT NULL
                          THEN 'managed' END)",
                &[],
            )
            .await?
            .first()
            .and_then(|r| r.get(0));
        if found.as_deref() != Some("managed") {
            return Ok(found);
        }
        Ok(self
            .call("SELECT orphan_cleanup.managed_version()", &[])
            .await?
            .first()
            .map(|r| r.get(0)))
    }

    /// Runs one cleanup cycle (`run_cycle()`), for `reaper run --cycle-every` where no other
    /// scheduler runs them. A cycle keeps to its own time budget (cycle_time_budget, after any
    /// ANALYZE it needs), so it gets up to `within`, beyond --db-timeout.
    pub async fn run_cycle(&self, within: Duration) -> Result<Cycle, QueueError> {
        let rows = self
            .call_within(
                "SELECT cycle_id, status, found, enqueued, rejected, duration_ms::float8
                 FROM orphan_cleanup.run_cycle()",
                &[],
                within.max(self.timeout),
            )
            .await?;
        let r = one(&rows)?;
        Ok(Cycle {
            id: r.get(0),
            status: r.get(1),
            found: r.get(2),
            enqueued: r.get(3),
            rejected: r.get(4),
            duration_ms: r.get(5),
        })
    }

    /// One statement with no parameters, outside any explicit transaction (LISTEN).
    async fn simple(&self, sql: &str) -> Result<(), QueueError> {
        let client = self.client.lock().await;
        self.bounded(client.batch_execute(sql)).await
    }

    /// Runs one call within --db-timeout (and a little more, for the server's own timeout to
    /// answer first). A call with no answer at all closes this connection: its state is unknown.
    async fn bounded<T>(
        &self,
        call: impl std::future::Future<Output = Result<T, tokio_postgres::Error>>,
    ) -> Result<T, QueueError> {
        bounded(self.timeout, &self.closed, call).await
    }

    /// Whether this connection is a server session of its own, which keeps a `LISTEN` and a
    /// session lock between calls; through a transaction-mode pooler it is not. Found out by
    /// trying: this connection listens on a channel of its own, a second connection notifies
    /// it, and the notification must arrive here within [`PROBE_WAIT`]. (A pooler cannot be
    /// asked its mode, and the same server process answering two calls proves nothing: a
    /// transaction pooler often hands one client the same connection again.) When the second
    /// connection cannot be made, the answer is no: polling and no lock always work.
    pub async fn own_session(&self) -> Result<bool, QueueError> {
        self.own_session
            .get_or_try_init(|| self.probe_session())
            .await
            .copied()
    }

    async fn probe_session(&self) -> Result<bool, QueueError> {
        let channel = format!("{PROBE_CHANNEL}{:016x}", rand::random::<u64>());
        self.simple(&format!("LISTEN {channel}")).await?;
        // The second connection's own flags: nothing listens on it.
        let closed = Arc::new(AtomicBool::new(false));
        let (quiet, unheard) = (Arc::new(Notify::new()), Arc::new(Probes::default()));
        let sent = match open(&self.database, self.timeout, &closed, &quiet, &unheard).await {
            Ok(other) => {
                let notify = format!("NOTIFY {channel}");
                bounded(self.timeout, &closed, other.batch_execute(&notify))
                    .await
                    .map_err(|e| tracing::warn!(error = %e, "could not check whether NOTIFY reaches this reaper"))
                    .is_ok()
            }
            Err(e) => {
                tracing::warn!(error = %e, "could not open a second connection to check whether NOTIFY reaches this reaper");
                false
            }
        };
        let arrived = sent && self.probed.wait_for(&channel, PROBE_WAIT).await;
        self.simple(&format!("UNLISTEN {channel}")).await?;
        self.probed.forget(&channel);
        Ok(arrived)
    }

    /// Whether this connection LISTENs to the queue's channel. When not (a transaction-mode
    /// pooler), only --poll-interval brings new rows.
    pub fn listening(&self) -> bool {
        self.listening
    }

    /// Holds, for this connection's life, a lock on this reaper's id: two processes running with
    /// one --worker-id would each spend the whole hourly budget kept under it.
    pub async fn hold_worker_id(&self) -> Result<WorkerIdLock, QueueError> {
        if !self.own_session().await? {
            return Ok(WorkerIdLock::NotPossible);
        }
        let held: bool = self
            .call(
                "SELECT pg_catalog.pg_try_advisory_lock(7310249, pg_catalog.hashtext($1))",
                &[(&self.worker, Type::TEXT)],
            )
            .await?
            .first()
            .is_some_and(|r| r.get(0));
        Ok(if held {
            WorkerIdLock::Held
        } else {
            WorkerIdLock::HeldElsewhere
        })
    }

    /// Whether this database checks what storage reports deleted or absent against
    /// storage.objects (a Supabase database): then an "already absent" answer is verified there.
    pub fn verifies_absence(&self) -> bool {
        self.verifies_absence
    }

    pub fn is_closed(&self) -> bool {
        self.closed.load(Ordering::SeqCst) || self.client.try_lock().is_ok_and(|c| c.is_closed())
    }

    /// Waits for a NOTIFY, the connection to drop, or `timeout`.
    pub async fn wait(&self, timeout: Duration) {
        let _ = tokio::time::timeout(timeout, self.notified.notified()).await;
    }

    /// Claims up to `max_rows` rows this reaper serves: objects in `buckets`, named through one
    /// of `hosts` or through no host (bare `bucket/key` rows). Nothing at all when `home`
    /// (SUPABASE_URL's host) is not this database's project. Rows of other buckets and hosts wait
    /// for a reaper that serves them.
    pub async fn claim(
        &self,
        max_rows: usize,
        lease: Duration,
        serves: &Serves<'_>,
    ) -> Result<Claim, QueueError> {
        let lease = format!("{} seconds", lease.as_secs());
        let rows = self
            .call(
                "SELECT id, job_id::text, host, bucket, object_path, attempts, lease_token
                 FROM orphan_cleanup.claim($1, $2, $3::text::interval, $4, $5, $6)",
                &[
                    (&self.worker, Type::TEXT),
                    (&(max_rows as i32), Type::INT4),
                    (&lease, Type::TEXT),
                    (&serves.buckets, Type::TEXT_ARRAY),
                    (&serves.hosts, Type::TEXT_ARRAY),
                    (&serves.home, Type::TEXT),
                ],
            )
            .await?;
        Ok(Claim {
            lease: rows.first().map(|r| LeaseToken(r.get(6))),
            rows: rows.iter().map(Claimed::from_row).collect(),
        })
    }

    /// Confirms rows as `deleted` or `absent`; returns each id with its result. `sizes` gives
    /// the bytes of the objects storage's answer said it deleted, for the savings ledger.
    pub async fn confirm(
        &self,
        lease: &LeaseToken,
        ids: &[i64],
        outcome: &str,
        sizes: &HashMap<i64, u64>,
    ) -> Result<Vec<(i64, String)>, QueueError> {
        let sizes: Vec<Option<i64>> = ids
            .iter()
            .map(|id| sizes.get(id).and_then(|&s| i64::try_from(s).ok()))
            .collect();
        self.per_row(
            "confirm($1, $2, $3, $4, $5)",
            lease,
            ids,
            &[(&outcome, Type::TEXT), (&sizes, Type::INT8_ARRAY)],
        )
        .await
    }

    pub async fn fail(
        &self,
        lease: &LeaseToken,
        ids: &[i64],
        error: &str,
        retryable: bool,
    ) -> Result<Vec<(i64, String)>, QueueError> {
        self.per_row(
            "fail($1, $2, $3, $4, $5)",
            lease,
            ids,
            &[(&error, Type::TEXT), (&retryable, Type::BOOL)],
        )
        .await
    }

    /// Gives back rows this reaper's own allow-list refuses, for another reaper: no attempt is
    /// counted, they are not handed to this reaper again, and health() names it. They were never
    /// sent to storage, so their objects count as never handed out.
    pub async fn refuse(
        &self,
        lease: &LeaseToken,
        ids: &[i64],
        reason: &str,
    ) -> Result<Vec<(i64, String)>, QueueError> {
        self.per_row(
            "refuse($1, $2, $3, $4)",
            lease,
            ids,
            &[(&reason, Type::TEXT)],
        )
        .await
    }

    /// Calls one of the queue functions that take (worker, lease_token, ids, ...) and answer a
    /// result per id.
    async fn per_row(
        &self,
        call: &str,
        lease: &LeaseToken,
        ids: &[i64],
        rest: &[(&(dyn ToSql + Sync), Type)],
    ) -> Result<Vec<(i64, String)>, QueueError> {
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let ids = ids.to_vec();
        let mut params: Vec<(&(dyn ToSql + Sync), Type)> = vec![
            (&self.worker, Type::TEXT),
            (&lease.0, Type::TEXT),
            (&ids, Type::INT8_ARRAY),
        ];
        params.extend_from_slice(rest);
        let sql = format!("SELECT id, result FROM orphan_cleanup.{call}");
        let rows = self.call(&sql, &params).await?;
        Ok(rows.iter().map(|r| (r.get(0), r.get(1))).collect())
    }

    /// Gives claims back without counting an attempt; `None` releases all of the claim's rows.
    /// A `reason` is audited and shows in `queue_status()` and `health()`. What was [`Sent`]
    /// decides whether the objects still count as handed out.
    pub async fn release(
        &self,
        lease: &LeaseToken,
        ids: Option<&[i64]>,
        reason: Option<&str>,
        sent: Sent,
    ) -> Result<i64, QueueError> {
        if ids.is_some_and(|i| i.is_empty()) {
            return Ok(0);
        }
        let ids: Option<Vec<i64>> = ids.map(<[i64]>::to_vec);
        let nothing_sent = sent == Sent::Nothing;
        let rows = self
            .call(
                "SELECT orphan_cleanup.release($1, $2, $3, $4, $5)",
                &[
                    (&self.worker, Type::TEXT),
                    (&lease.0, Type::TEXT),
                    (&ids, Type::INT8_ARRAY),
                    (&reason, Type::TEXT),
                    (&nothing_sent, Type::BOOL),
                ],
            )
            .await?;
        Ok(one(&rows)?.get(0))
    }

    /// What this reaper sent for deletion within the last `within`: `(how long ago, rows)` per
    /// second of claiming.
    pub async fn sent_by_reaper(
        &self,
        within: Duration,
    ) -> Result<Vec<(Duration, u64)>, QueueError> {
        let within = format!("{} seconds", within.as_secs());
        let rows = self
            .call(
                "SELECT age_s, objects FROM orphan_cleanup.sent_by_reaper($1, $2::text::interval)",
                &[(&self.worker, Type::TEXT), (&within, Type::TEXT)],
            )
            .await?;
        Ok(rows
            .iter()
            .map(|r| {
                let age: f64 = r.get(0);
                let n: i64 = r.get(1);
                (Duration::from_secs_f64(age.max(0.0)), n.max(0) as u64)
            })
            .collect())
    }

    /// What a claim would hand out, for --dry-run.
    pub async fn peek(&self, max_rows: i32) -> Result<Vec<Claimed>, QueueError> {
        let rows = self
            .call(
                "SELECT id, job_id::text, host, bucket, object_path, attempts FROM orphan_cleanup.peek($1)",
                &[(&max_rows, Type::INT4)],
            )
            .await?;
        Ok(rows.iter().map(Claimed::from_row).collect())
    }

    /// `savings_report(period, periods)`: what the cleanup reclaimed, one row per period.
    pub async fn savings_report(
        &self,
        period: &str,
        periods: i32,
    ) -> Result<Vec<crate::report::Period>, QueueError> {
        let rows = self
            .call(
                "SELECT period_start::text, objects_reclaimed, bytes_reclaimed::bigint, orphans_found,
                        leak_bytes_per_day::float8, bytes_still_queued::bigint, monthly_saving::float8,
                        queue_depth, strays_found
                 FROM orphan_cleanup.savings_report($1, $2)",
                &[(&period, Type::TEXT), (&periods, Type::INT4)],
            )
            .await?;
        Ok(rows
            .iter()
            .map(|r| crate::report::Period {
                period_start: r.get(0),
                objects_reclaimed: r.get(1),
                bytes_reclaimed: r.get(2),
                orphans_found: r.get(3),
                leak_bytes_per_day: r.get(4),
                bytes_still_queued: r.get(5),
                monthly_saving: r.get(6),
                queue_depth: r.get(7),
                strays_found: r.get(8),
            })
            .collect())
    }

    /// `inventory_buckets()`: the buckets `reaper inventory` lists (the allowed ones); refused
    /// where storage.objects is in the database.
    pub async fn inventory_buckets(&self) -> Result<Vec<String>, QueueError> {
        let rows = self
            .call("SELECT b FROM orphan_cleanup.inventory_buckets() AS b", &[])
            .await?;
        Ok(rows.iter().map(|r| r.get(0)).collect())
    }

    /// `inventory_begin(worker, bucket)`: a new listing of `bucket`, by its id.
    pub async fn inventory_begin(&self, bucket: &str) -> Result<i64, QueueError> {
        let rows = self
            .call(
                "SELECT orphan_cleanup.inventory_begin($1, $2)",
                &[(&self.worker, Type::TEXT), (&bucket, Type::TEXT)],
            )
            .await?;
        Ok(rows[0].get(0))
    }

    /// `inventory_add(listing, objects)`: one page of objects, as the list route answered them
    /// with their full names; returns how many were recorded.
    pub async fn inventory_add(
        &self,
        listing: i64,
        objects: &serde_json::Value,
    ) -> Result<i32, QueueError> {
        let objects = objects.to_string();
        let rows = self
            .call(
                "SELECT orphan_cleanup.inventory_add($1, $2::jsonb)",
                &[(&listing, Type::INT8), (&objects, Type::TEXT)],
            )
            .await?;
        Ok(rows[0].get(0))
    }

    /// `inventory_finish(listing)`: the listing is complete; returns the rows of objects no
    /// longer in storage that it removed.
    pub async fn inventory_finish(&self, listing: i64) -> Result<i64, QueueError> {
        let rows = self
            .call(
                "SELECT orphan_cleanup.inventory_finish($1)",
                &[(&listing, Type::INT8)],
            )
            .await?;
        Ok(rows[0].get(0))
    }

    pub async fn status(&self) -> Result<Status, QueueError> {
        let rows = self
            .call(
                "SELECT pending, ready, claimed, dead, rejected, deleted, absent, oldest_pending::text,
                        last_cycle_at::text, last_cycle_status, last_cycle_error, health, reaping_enabled, attached,
                        reaper_alert, reaper_alert_at::text,
                        reapers, unserved, refused_by_reapers, misconfigured_reapers,
                        breaker_tripped, refused_saves,
                        reclaimed_orphan_bytes::float8, reclaimed_stray_bytes::float8
                 FROM orphan_cleanup.queue_status()",
                &[],
            )
            .await?;
        let r = one(&rows)?;
        Ok(Status {
            pending: r.get(0),
            ready: r.get(1),
            claimed: r.get(2),
            dead: r.get(3),
            rejected: r.get(4),
            deleted: r.get(5),
            absent: r.get(6),
            oldest_pending: r.get(7),
            last_cycle_at: r.get(8),
            last_cycle_status: r.get(9),
            last_cycle_error: r.get(10),
            health: r.get(11),
            reaping_enabled: r.get(12),
            attached: r.get(13),
            reaper_alert: r.get(14),
            reaper_alert_at: r.get(15),
            reapers: r.get(16),
            unserved: r.get(17),
            refused_by_reapers: r.get(18),
            misconfigured_reapers: r.get(19),
            breaker_tripped: r.get(20),
            refused_saves: r.get(21),
            reclaimed_orphan_bytes: r.get(22),
            reclaimed_stray_bytes: r.get(23),
        })
    }
}

type BoxFuture<'a, T> = std::pin::Pin<Box<dyn std::future::Future<Output = T> + Send + 'a>>;

/// The calls that record a batch's results, retried while the batch's lease lasts when the
/// server cancels one for taking longer than --db-timeout (a lock held for a while, a burst of
/// load). The cancelled statement changed nothing, so the retry is safe; without it the rows
/// would wait for their lease to run out, and its expiry costs each an attempt. A call with no
/// answer at all is not retried: its connection is dropped, its outcome unknown.
pub struct Recorder<'a> {
    pub queue: &'a Queue,
    pub lease: &'a LeaseToken,
    /// The last moment a call may be retried: the lease's end, less a margin.
    pub until: std::time::Instant,
    /// Told of every timeout, retried or not (the reaper's /readyz reports it).
    pub on_timeout: &'a (dyn Fn(&QueueError) + Sync),
}

impl Recorder<'_> {
    async fn retried<T, F, Fut>(&self, what: &str, mut call: F) -> Result<T, QueueError>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Result<T, QueueError>>,
    {
        let mut wait = Duration::from_millis(250);
        loop {
            let result = call().await;
            if let Err(e @ QueueError::Timeout(_)) = &result {
                (self.on_timeout)(e);
            }
            match result {
                Err(QueueError::Timeout(e) | QueueError::Conflict(e))
                    if !self.queue.is_closed()
                        && std::time::Instant::now() + wait + self.queue.timeout < self.until =>
                {
                    tracing::warn!(error = %e, retry_in_s = wait.as_secs_f64(), "{what} was cancelled (a timeout or a conflict); retrying while the lease lasts");
                    tokio::time::sleep(wait).await;
                    wait = (wait * 2).min(Duration::from_secs(5));
                }
                result => return result,
            }
        }
    }

    /// Confirms rows. A confirm cancelled for taking longer than --db-timeout (the job rows'
    /// cleanup runs the app's triggers and cascades, which can be slow) is retried in halves,
    /// so that each part fits, rather than whole again.
    pub fn confirm<'s>(
        &'s self,
        ids: &'s [i64],
        outcome: &'s str,
        sizes: &'s HashMap<i64, u64>,
    ) -> BoxFuture<'s, Result<Vec<(i64, String)>, QueueError>> {
        Box::pin(async move {
            if ids.len() <= 1 {
                return self
                    .retried("confirm()", || {
                        self.queue.confirm(self.lease, ids, outcome, sizes)
                    })
                    .await;
            }
            match self.queue.confirm(self.lease, ids, outcome, sizes).await {
                Err(e @ QueueError::Timeout(_))
                    if !self.queue.is_closed()
                        && std::time::Instant::now() + self.queue.timeout < self.until =>
                {
                    (self.on_timeout)(&e);
                    tracing::warn!(error = %e, rows = ids.len(), "confirm() took longer than --db-timeout; confirming in halves");
                    let (a, b) = ids.split_at(ids.len() / 2);
                    let mut results = self.confirm(a, outcome, sizes).await?;
                    results.extend(self.confirm(b, outcome, sizes).await?);
                    Ok(results)
                }
                Err(QueueError::Conflict(_)) => {
                    self.retried("confirm()", || {
                        self.queue.confirm(self.lease, ids, outcome, sizes)
                    })
                    .await
                }
                result => result,
            }
        })
    }

    pub async fn fail(
        &self,
        ids: &[i64],
        error: &str,
        retryable: bool,
    ) -> Result<Vec<(i64, String)>, QueueError> {
        self.retried("fail()", || {
            self.queue.fail(self.lease, ids, error, retryable)
        })
        .await
    }

    pub async fn refuse(
        &self,
        ids: &[i64],
        reason: &str,
    ) -> Result<Vec<(i64, String)>, QueueError> {
        self.retried("refuse()", || self.queue.refuse(self.lease, ids, reason))
            .await
    }

    pub async fn release(
        &self,
        ids: &[i64],
        reason: Option<&str>,
        sent: Sent,
    ) -> Result<i64, QueueError> {
        self.retried("release()", || {
            self.queue.release(self.lease, Some(ids), reason, sent)
        })
        .await
    }
}

/// Beyond --db-timeout, how long to wait for the server's own cancellation to arrive.
const GRACE: Duration = Duration::from_secs(5);

async fn bounded<T>(
    timeout: Duration,
    closed: &AtomicBool,
    call: impl std::future::Future<Output = Result<T, tokio_postgres::Error>>,
) -> Result<T, QueueError> {
    match tokio::time::timeout(timeout + GRACE, call).await {
        Ok(result) => result.map_err(QueueError::from),
        Err(_) => {
            closed.store(true, Ordering::SeqCst);
            Err(QueueError::Timeout(format!(
                "no answer within {}s; the connection is dropped",
                (timeout + GRACE).as_secs()
            )))
        }
    }
}

/// The one row a call answers.
fn one(rows: &[Row]) -> Result<&Row, QueueError> {
    rows.first()
        .ok_or_else(|| QueueError::Db("the call answered no row".into()))
}

/// Opens a connection whose NOTIFYs wake `notified` (the queue's channel) or `probed` (a
/// [`PROBE_CHANNEL`]), and whose end sets `closed`.
async fn open(
    database: &Database,
    timeout: Duration,
    closed: &Arc<AtomicBool>,
    notified: &Arc<Notify>,
    probed: &Arc<Probes>,
) -> Result<Client, QueueError> {
    let mut config = database.config().clone();
    if config.get_connect_timeout().is_none() {
        config.connect_timeout(timeout.min(Duration::from_secs(10)));
    }
    if config.get_application_name().is_none() {
        // A startup parameter, which poolers pass on to every server connection they use for
        // this client (a session SET would stay on one of them).
        config.application_name("pg_orphan_cleanup reaper");
    }
    let (client, mut connection) =
        tokio::time::timeout(timeout + GRACE, config.connect(database.tls()))
            .await
            .map_err(|_| {
                QueueError::Connect(format!("no answer within {}s", (timeout + GRACE).as_secs()))
            })?
            .map_err(|e| {
                QueueError::Connect(explain_tls(&e, database).unwrap_or_else(|| describe(&e)))
            })?;
    let (c, n, p) = (closed.clone(), notified.clone(), probed.clone());
    tokio::spawn(async move {
        let mut messages = futures::stream::poll_fn(move |cx| connection.poll_message(cx));
        while let Some(message) = messages.next().await {
            match message {
                Ok(AsyncMessage::Notification(m)) if m.channel().starts_with(PROBE_CHANNEL) => {
                    p.arrived(m.channel())
                }
                Ok(AsyncMessage::Notification(_)) => n.notify_one(),
                Ok(_) => {}
                Err(e) => {
                    tracing::warn!(error = %describe(&e), "database connection lost");
                    break;
                }
            }
        }
        c.store(true, Ordering::SeqCst);
        n.notify_one();
    });
    Ok(client)
}

/// What one `run_cycle()` did.
#[derive(Debug, Clone)]
pub struct Cycle {
    pub id: i64,
    pub status: String,
    pub found: i64,
    pub enqueued: i64,
    pub rejected: i64,
    pub duration_ms: f64,
}

/// `queue_status()`, one row.
#[derive(Debug, Clone)]
pub struct Status {
    pub pending: i64,
    pub ready: i64,
    pub claimed: i64,
    pub dead: i64,
    pub rejected: i64,
    pub deleted: i64,
    pub absent: i64,
    pub oldest_pending: Option<String>,
    pub last_cycle_at: Option<String>,
    pub last_cycle_status: Option<String>,
    pub last_cycle_error: Option<String>,
    pub health: String,
    pub reaping_enabled: bool,
    pub attached: bool,
    /// The latest reason a reaper released claims for, within the last hour.
    pub reaper_alert: Option<String>,
    pub reaper_alert_at: Option<String>,
    /// Reapers that claimed in the last 15 minutes.
    pub reapers: i32,
    /// Ready rows that none of those reapers serves (their bucket or host).
    pub unserved: i64,
    /// Rows reapers refused (gave back) in the last hour.
    pub refused_by_reapers: i64,
    /// The reapers that left ready rows to others or refused rows, with their lists.
    pub misconfigured_reapers: Option<String>,
    /// Whether the circuit breaker has stopped cycles.
    pub breaker_tripped: bool,
    /// Saves the save guard refused, ever (the refused_saves counter).
    pub refused_saves: i64,
    /// Bytes reclaimed since installation: job orphans' files, and strays'.
    pub reclaimed_orphan_bytes: f64,
    pub reclaimed_stray_bytes: f64,
}

impl Status {
    /// Whether `worker` is among the reapers queue_status() names as misconfigured.
    pub fn names(&self, worker: &str) -> bool {
        self.misconfigured_reapers
            .as_deref()
            .is_some_and(|m| m.contains(&format!("reaper {worker} (")))
    }
}

impl std::fmt::Display for Status {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(f, "health:          {}", self.health)?;
        let reaping = if self.reaping_enabled {
            "enabled"
        } else {
            "DISABLED (orphan_cleanup.reaping_enabled = off)"
        };
        writeln!(f, "reaping:         {reaping}")?;
        let attached = if self.attached {
            "yes"
        } else {
            "NO: run SELECT * FROM orphan_cleanup.attach()"
        };
        writeln!(f, "attached:        {attached}")?;
        writeln!(
            f,
            "queue:           {} pending ({} ready), {} claimed, {} dead-lettered, {} rejected",
            self.pending, self.ready, self.claimed, self.dead, self.rejected
        )?;
        writeln!(
            f,
            "done:            {} deleted, {} already absent",
            self.deleted, self.absent
        )?;
        writeln!(
            f,
            "oldest pending:  {}",
            self.oldest_pending.as_deref().unwrap_or("-")
        )?;
        writeln!(
            f,
            "reapers:         {} active in the last 15 minutes; {} ready rows none of them serves; {} rows refused in the last hour",
            self.reapers, self.unserved, self.refused_by_reapers
        )?;
        if let Some(m) = &self.misconfigured_reapers {
            writeln!(f, "misconfigured:   {m}")?;
        }
        if let Some(alert) = &self.reaper_alert {
            writeln!(
                f,
                "reaper alert:    {} ({})",
                alert,
                self.reaper_alert_at.as_deref().unwrap_or("")
            )?;
        }
        write!(
            f,
            "last cycle:      {} {}",
            self.last_cycle_status.as_deref().unwrap_or("none yet"),
            self.last_cycle_at.as_deref().unwrap_or("")
        )?;
        if let Some(e) = &self.last_cycle_error {
            write!(f, "\n  error: {e}")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::{supported, Probes};
    use std::time::Duration;

    #[tokio::test]
    async fn a_probe_waits_for_its_own_channel_and_no_other() {
        let probes = Probes::default();
        probes.arrived("orphan_cleanup_probe_other");
        assert!(
            !probes
                .wait_for("orphan_cleanup_probe_mine", Duration::from_millis(50))
                .await,
            "another reaper's probe, handed over by a transaction pooler, proves nothing"
        );
        probes.arrived("orphan_cleanup_probe_mine");
        assert!(
            probes
                .wait_for("orphan_cleanup_probe_mine", Duration::from_millis(50))
                .await
        );
        let probes = std::sync::Arc::new(probes);
        let later = probes.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(20)).await;
            later.arrived("orphan_cleanup_probe_late");
        });
        assert!(
            probes
                .wait_for("orphan_cleanup_probe_late", Duration::from_secs(5))
                .await,
            "a notification that comes while waiting wakes the wait"
        );
    }

    #[test]
    fn extension_versions_from_0_2_0_on_are_supported() {
        assert!(!supported("0.1.0"));
        assert!(supported("0.2.0"));
        assert!(supported("0.10.0"));
        assert!(supported("1.0.0"));
        assert!(supported("0.3.0-dev"));
        assert!(supported("0.2"));
        assert!(!supported("0.1"));
        assert!(!supported("0.1.0-rc1"));
        assert!(
            !supported("0.2.0-rc1"),
            "a pre-release of 0.2.0 is older than 0.2.0"
        );
        assert!(supported("dev"), "no number: the SQL calls tell");
    }
}
