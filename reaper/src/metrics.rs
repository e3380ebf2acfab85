//! Prometheus metrics, served on `/metrics` by `reaper run --metrics-addr`.

use std::sync::atomic::{AtomicI64, AtomicU64};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabel {
    pub outcome: &'static str,
}

/// What a reclaimed object was: a job's orphan, or a stray no job names.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabel {
    pub kind: &'static str,
}

pub struct Metrics {
    registry: Registry,
    /// Objects by outcome: deleted, absent, failed, dead_lettered, released, refused.
    pub objects: Family<OutcomeLabel, Counter>,
    pub bytes_deleted: Counter,
    /// Seconds per bulk delete request.
    pub batch_seconds: Histogram,
    pub queue_depth: Gauge,
    pub last_success: Gauge<f64, AtomicU64>,
    /// 1 while storage refuses the reaper's URL or key.
    pub config_error: Gauge,
    /// 1 while storage asks the reaper to slow down.
    pub overloaded: Gauge,
    /// The bulk limit storage answered with, when lower than --batch-size (0: none seen).
    pub bulk_limit: Gauge,
    /// 1 while storage cannot be reached or answers nothing usable (an outage).
    pub storage_unreachable: Gauge,
    /// 1 while "already absent" answers are contradicted or cannot be checked: a key that
    /// silently deletes nothing, or a proxy answering for storage.
    pub nothing_deleted: Gauge<i64, AtomicI64>,
    /// 1 while --max-deletes-per-hour holds the reaper back.
    pub held_back: Gauge,
    /// Ready rows that no active reaper serves (queue_status().unserved).
    pub unserved: Gauge,
    /// 1 while the database names this reaper as leaving rows to others or refusing rows.
    pub misconfigured: Gauge,
    /// Dead-lettered rows in the queue (queue_status().dead): each waits for a DBA.
    pub queue_dead: Gauge,
    /// 1 while the circuit breaker stops cycles.
    pub breaker_tripped: Gauge,
    /// Saves the save guard refused since installation (the database's counter).
    pub refused_saves: Gauge,
    /// health() at its worst: 0 ok, 1 warning, 2 critical.
    pub database_health: Gauge,
    /// Bytes reclaimed since installation, by kind (queue_status(), for every reaper alike).
    pub reclaimed_bytes: Family<KindLabel, Gauge<f64, AtomicU64>>,
    /// Bytes of the objects still queued, where storage.objects is in the database (NaN where
    /// unknown); read every 10 minutes (savings_report()), since it joins the queue to storage.
    pub queued_bytes: Gauge<f64, AtomicU64>,
}

impl Metrics {
    pub fn new() -> Metrics {
        let mut registry = Registry::with_prefix("reaper");
        let objects = Family::<OutcomeLabel, Counter>::default();
        registry.register("objects", "Queue rows handled, by outcome", objects.clone());
        let bytes_deleted = Counter::default();
        registry.register(
            "deleted_bytes",
            "Bytes of the objects deleted (as storage reported them)",
            bytes_deleted.clone(),
        );
        let batch_seconds = Histogram::new(exponential_buckets(0.005, 2.0, 14));
        registry.register(
            "batch_seconds",
            "Duration of one bulk delete request",
            batch_seconds.clone(),
        );
        let queue_depth = Gauge::default();
        registry.register(
            "queue_depth",
            "Pending rows in the deletion queue",
            queue_depth.clone(),
        );
        let last_success = Gauge::<f64, AtomicU64>::default();
        registry.register(
            "last_success_timestamp_seconds",
            "Unix time of the last successful bulk delete",
            last_success.clone(),
        );
        let config_error = Gauge::default();
        registry.register(
            "config_error",
            "1 while storage refuses the reaper's URL or key",
            config_error.clone(),
        );
        let overloaded = Gauge::default();
        registry.register(
            "overloaded",
            "1 while storage asks the reaper to slow down",
            overloaded.clone(),
        );
        let bulk_limit = Gauge::default();
        registry.register(
            "bulk_limit",
            "Names per bulk delete that storage said it accepts, when fewer than --batch-size (0: none seen)",
            bulk_limit.clone(),
        );
        let storage_unreachable = Gauge::default();
        registry.register(
            "storage_unreachable",
            "1 while storage cannot be reached or answers nothing usable; rows wait with no attempt counted",
            storage_unreachable.clone(),
        );
        let nothing_deleted = Gauge::<i64, AtomicI64>::default();
        registry.register(
            "nothing_deleted_suspected",
            "1 while storage says objects are already absent that it still has, or that cannot be checked",
            nothing_deleted.clone(),
        );
        let held_back = Gauge::default();
        registry.register(
            "held_back",
            "1 while --max-deletes-per-hour holds the reaper back",
            held_back.clone(),
        );
        let unserved = Gauge::default();
        registry.register(
            "queue_unserved",
            "Ready rows in the queue that no active reaper serves (their bucket or host)",
            unserved.clone(),
        );
        let misconfigured = Gauge::default();
        registry.register(
            "misconfigured",
            "1 while the database names this reaper as leaving ready rows to other reapers or refusing rows",
            misconfigured.clone(),
        );
        let queue_dead = Gauge::default();
        registry.register(
            "queue_dead",
            "Dead-lettered rows in the deletion queue, each waiting for a DBA (requeue_dead() or cancel())",
            queue_dead.clone(),
        );
        let breaker_tripped = Gauge::default();
        registry.register(
            "breaker_tripped",
            "1 while the circuit breaker stops cleanup cycles (reset_breaker() lifts it)",
            breaker_tripped.clone(),
        );
        let refused_saves = Gauge::default();
        registry.register(
            "refused_saves",
            "Saves the save guard refused since installation (orphan_cleanup.refused_saves)",
            refused_saves.clone(),
        );
        let database_health = Gauge::default();
        registry.register(
            "database_health",
            "orphan_cleanup.health() at its worst: 0 ok, 1 warning, 2 critical",
            database_health.clone(),
        );
        let reclaimed_bytes = Family::<KindLabel, Gauge<f64, AtomicU64>>::default();
        registry.register(
            "reclaimed_bytes",
            "Bytes of the objects cleanup deleted since installation, by kind (orphan: a job's file; stray: a file no job names), as storage reported them",
            reclaimed_bytes.clone(),
        );
        let queued_bytes = Gauge::<f64, AtomicU64>::default();
        queued_bytes.set(f64::NAN);
        registry.register(
            "queued_bytes",
            "Bytes of the objects still in the deletion queue (NaN where storage.objects is not in the database)",
            queued_bytes.clone(),
        );
        Metrics {
            registry,
            objects,
            bytes_deleted,
            batch_seconds,
            queue_depth,
            last_success,
            config_error,
            overloaded,
            storage_unreachable,
            bulk_limit,
            nothing_deleted,
            held_back,
            unserved,
            misconfigured,
            queue_dead,
            breaker_tripped,
            refused_saves,
            database_health,
            reclaimed_bytes,
            queued_bytes,
        }
    }

    pub fn count(&self, outcome: &'static str, n: usize) {
        self.objects
            .get_or_create(&OutcomeLabel { outcome })
            .inc_by(n as u64);
    }

    pub fn encode(&self) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)
            .expect("writing to a String cannot fail");
        out
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}
