//! Sending one chunk of names, and finding the names a failing request fails on.
//!
//! A request that fails in a way one name could cause (a 5xx, a timeout, an unusable answer, a
//! proxy's refusal) is split in halves, and the halves again, until the names it fails on are
//! alone: those rows alone carry the failure, and the rest are deleted. A name is blamed only
//! when storage deleted something else meanwhile: another part of the chunk, or, for a chunk of
//! one name, the reaper's own canary. Nothing is blamed on a
//! name while storage itself does not answer (asked with a plain read before splitting, and again
//! after every run of failures), nor once [`SPLIT_BUDGET`] requests in a row have failed: then
//! every request fails, whatever it carries, and that is an outage or a configuration, not a row.
//!
//! Rows carried by a request that may have been carried out (any failure but a refused key or
//! body) stay "maybe sent" in every part they are split into, so that giving them back later
//! never lifts their hand-out: a save of such a job stays refused while its file may be gone.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use super::Reaper;
use crate::queue::Claimed;
use crate::storage::{Deleted, StorageError};

/// What the requests for some of a chunk's rows came to.
#[derive(Clone)]
pub(super) enum ChunkResult {
    Done(Deleted),
    Failed(StorageError),
    /// Only a request carrying this one row's name fails, while storage handles the others.
    Isolated(StorageError),
    /// Storage does not answer at all: no row is at fault.
    Outage(StorageError),
    /// Not sent (shutdown).
    NotSent,
    /// Not sent: the batch's lease could run out before the request ends.
    Late,
}

/// Some rows of a chunk, what came of them, and whether a request that may have been carried
/// out carried them before.
pub(super) struct Piece {
    pub rows: Vec<Claimed>,
    pub result: ChunkResult,
    pub maybe_sent: bool,
}

/// Failed requests in a row, with none succeeding in between, after which no name is blamed.
/// One poisoned name among 1000 costs about 2 x log2(1000) = 20 requests to find.
pub(super) const SPLIT_BUDGET: usize = 24;

/// After this many failures in a row, storage is asked again whether it answers at all.
const RECHECK_EVERY: usize = 8;

/// Rows still to send.
struct Part {
    rows: Vec<Claimed>,
    maybe_sent: bool,
}

impl Part {
    /// These rows, and what came of them.
    fn came_to(self, result: ChunkResult) -> Piece {
        Piece {
            rows: self.rows,
            result,
            maybe_sent: self.maybe_sent,
        }
    }
}

impl Reaper {
    /// Deletes one chunk's names (see the module's documentation).
    pub(super) async fn delete_chunk(
        &self,
        bucket: &str,
        rows: Vec<Claimed>,
        send_by: Instant,
    ) -> Vec<Piece> {
        let mut todo = vec![Part {
            rows,
            maybe_sent: false,
        }];
        let mut done = Vec::new();
        let mut suspects: Vec<(Claimed, StorageError, bool)> = Vec::new();
        let (mut answered, mut failed_in_a_row) = (0usize, 0usize);
        let mut storage_answers: Option<bool> = None;
        while let Some(part) = todo.pop() {
            if self.shutdown.is_cancelled() {
                done.push(part.came_to(ChunkResult::NotSent));
                continue;
            }
            if Instant::now() >= send_by {
                done.push(part.came_to(ChunkResult::Late));
                continue;
            }
            let limit = self.bulk_limit.load(Ordering::SeqCst);
            if part.rows.len() > limit {
                todo.extend(part.rows.chunks(limit).map(|rows| Part {
                    rows: rows.to_vec(),
                    ..part
                }));
                continue;
            }
            match self.send_chunk(bucket, &part.rows).await {
                Ok(d) => {
                    answered += 1;
                    failed_in_a_row = 0;
                    done.push(part.came_to(ChunkResult::Done(d)));
                }
                Err(StorageError::BulkLimit(n)) if part.rows.len() > 1 => {
                    let limit = if n < part.rows.len() {
                        n
                    } else {
                        part.rows.len() / 2
                    };
                    self.lower_bulk_limit(limit.max(1));
                    todo.push(part);
                }
                Err(e) if e.may_be_a_name() => {
                    failed_in_a_row += 1;
                    let maybe_sent = part.maybe_sent || !e.deleted_nothing();
                    if storage_answers.is_none() || failed_in_a_row % RECHECK_EVERY == 0 {
                        storage_answers = Some(self.storage.answers(bucket).await.is_ok());
                    }
                    if storage_answers == Some(false) || failed_in_a_row > SPLIT_BUDGET {
                        let why = if storage_answers == Some(false) {
                            ChunkResult::Outage(e.clone())
                        } else {
                            no_name_to_blame(e.clone())
                        };
                        done.push(Piece {
                            rows: part.rows,
                            result: why.clone(),
                            maybe_sent,
                        });
                        for rest in todo.drain(..) {
                            done.push(rest.came_to(why.clone()));
                        }
                        for (row, _, sent) in suspects.drain(..) {
                            done.push(Piece {
                                rows: vec![row],
                                result: why.clone(),
                                maybe_sent: sent,
                            });
                        }
                        break;
                    }
                    match part.rows.as_slice() {
                        [row] => suspects.push((row.clone(), e, maybe_sent)),
                        rows => {
                            let (a, b) = rows.split_at(rows.len() / 2);
                            for half in [b, a] {
                                todo.push(Part {
                                    rows: half.to_vec(),
                                    maybe_sent,
                                });
                            }
                        }
                    }
                }
                Err(e) => done.push(part.came_to(ChunkResult::Failed(e))),
            }
        }
        // Blamed when storage handled other names of this chunk, or, when nothing of it
        // succeeded, when a delete of the reaper's own canary works: then it is the names.
        let blame = answered > 0
            || (!suspects.is_empty()
                && crate::absence::deletes_work(&self.storage, bucket, &self.settings.worker_id)
                    .await);
        for (row, e, maybe_sent) in suspects {
            let (result, maybe_sent) = if !blame {
                (no_name_to_blame(e), maybe_sent)
            } else {
                // A blip (a pod restarting, a rate rule) must not be pinned on a name: it is sent
                // again, twice, after a pause, before the row is charged.
                let resent = self.send_again(bucket, &row, send_by).await;
                let result = resent_result(resent.result, self.shutdown.is_cancelled());
                if let ChunkResult::Isolated(e) = &result {
                    tracing::warn!(bucket, name = row.object_path.as_deref().unwrap_or_default(), queue_id = row.id, error = %e,
                        "a request carrying this name fails, three times, while storage handles others: the row carries the failure");
                }
                (result, maybe_sent || resent.maybe_sent)
            };
            done.push(Piece {
                rows: vec![row],
                result,
                maybe_sent,
            });
        }
        done
    }

    /// Sends one name again, after 0.5 s and after 2 s more, while the batch may still be sent:
    /// the first success, or the last failure once both were sent (`None` when they could not
    /// both be sent: shutdown, or the lease too close to expiry; then nothing is blamed), and
    /// whether a resend that failed may have been carried out all the same (a timeout, a 5xx):
    /// a row given back after such a resend must not say that nothing was sent (the twelfth
    /// review: the file may be gone, and its job must stay unsavable).
    async fn send_again(&self, bucket: &str, row: &Claimed, send_by: Instant) -> Resent {
        let mut resent = Resent {
            result: None,
            maybe_sent: false,
        };
        for pause in [Duration::from_millis(500), Duration::from_secs(2)] {
            if self.shutdown.is_cancelled() || Instant::now() + pause >= send_by {
                resent.result = None;
                return resent;
            }
            tokio::time::sleep(pause).await;
            match self.send_chunk(bucket, std::slice::from_ref(row)).await {
                Ok(d) => {
                    resent.result = Some(Ok(d));
                    return resent;
                }
                Err(e) => {
                    resent.maybe_sent |= !e.deleted_nothing();
                    resent.result = Some(Err(e));
                }
            }
        }
        resent
    }

    /// One bulk request, timed.
    async fn send_chunk(&self, bucket: &str, rows: &[Claimed]) -> Result<Deleted, StorageError> {
        let names: Vec<String> = rows.iter().filter_map(|r| r.object_path.clone()).collect();
        let started = Instant::now();
        let result = self.storage.bulk_delete(bucket, &names).await;
        self.metrics
            .batch_seconds
            .observe(started.elapsed().as_secs_f64());
        result
    }

    /// Storage limits bulk deletes to `n` names: send no more from now on, and say so once.
    fn lower_bulk_limit(&self, n: usize) {
        let before = self.bulk_limit.fetch_min(n, Ordering::SeqCst);
        if n < before {
            tracing::warn!(limit = n, was = before,
                "storage limits bulk deletes to fewer names than --batch-size (a project's own limit): sending {n} per request from now on; set --batch-size {n} to start there");
            self.metrics.bulk_limit.set(n as i64);
            self.add(|s| s.bulk_limit = Some(n));
        }
    }
}

/// What the resends of a suspect name came to.
struct Resent {
    result: Option<Result<Deleted, StorageError>>,
    maybe_sent: bool,
}

/// A suspect row's result after its resends: not sent (shutdown) or late when they could not
/// both be sent, done at the first success, else the last failure, pinned on the name when it
/// may be the name's.
fn resent_result(
    resent: Option<Result<Deleted, StorageError>>,
    shutting_down: bool,
) -> ChunkResult {
    match resent {
        None if shutting_down => ChunkResult::NotSent,
        None => ChunkResult::Late,
        Some(Ok(d)) => ChunkResult::Done(d),
        Some(Err(e)) if e.may_be_a_name() => ChunkResult::Isolated(e),
        Some(Err(e)) => ChunkResult::Failed(e),
    }
}

/// Failures of every request of a chunk, with no name to blame: for a 5xx or a timeout on
/// every delete, an outage of the delete path; for a proxy's refusal of everything, its
/// configuration.
fn no_name_to_blame(e: StorageError) -> ChunkResult {
    match e {
        StorageError::Retryable(_) => ChunkResult::Outage(e),
        e => ChunkResult::Failed(e),
    }
}
