//! What the answers to one batch's requests say about each of its rows: deleted, absent, given
//! back (and with what said about what was sent), charged an attempt, or dead-lettered; and the
//! trouble the batch met, for the drain loop.

use std::collections::HashMap;

use super::split::{ChunkResult, Piece};
use super::Trouble;
use crate::queue::Sent;
use crate::storage::StorageError;

/// Rows the database confirmed, and how many were no longer this claim's.
pub(super) struct Confirmed {
    pub deleted: usize,
    pub absent: usize,
    pub lost: usize,
}

#[derive(Default)]
pub(super) struct Outcomes {
    pub deleted_ids: Vec<i64>,
    pub absent_ids: Vec<i64>,
    /// Never sent (shutdown): given back.
    pub release_ids: Vec<i64>,
    /// Never sent: the lease was too close to expiry.
    pub late_ids: Vec<i64>,
    /// Given back with a reason, and what was sent.
    pub release_with_reason: HashMap<(String, Sent), Vec<i64>>,
    /// Failed, by error: an attempt each.
    pub retry: HashMap<String, Vec<i64>>,
    /// Failed for good, by error: dead-lettered at once.
    pub dead: HashMap<String, Vec<i64>>,
    pub bytes: u64,
    /// The size storage's answer gave each deleted row's object, for the savings ledger.
    pub sizes: HashMap<i64, u64>,
    /// Whether any request got a usable answer.
    pub answered: bool,
    pub trouble: Trouble,
}

impl Outcomes {
    pub fn sort(pieces: Vec<Piece>) -> Outcomes {
        let mut out = Outcomes {
            answered: pieces
                .iter()
                .any(|p| matches!(p.result, ChunkResult::Done(_))),
            ..Outcomes::default()
        };
        for Piece {
            rows,
            result,
            maybe_sent,
        } in pieces
        {
            let ids: Vec<i64> = rows.iter().map(|r| r.id).collect();
            match result {
                ChunkResult::Done(d) => {
                    for row in &rows {
                        let name = row.object_path.as_deref().unwrap_or_default();
                        match d.names.get(name) {
                            Some(size) => {
                                out.bytes += size.unwrap_or(0);
                                if let Some(size) = size {
                                    out.sizes.insert(row.id, *size);
                                }
                                out.deleted_ids.push(row.id);
                            }
                            None => out.absent_ids.push(row.id),
                        }
                    }
                }
                ChunkResult::NotSent if maybe_sent => out.give_back(
                    "not sent again (shutting down); an earlier request carrying it may have been carried out",
                    Sent::Maybe,
                    ids,
                ),
                ChunkResult::NotSent => out.release_ids.extend(ids),
                ChunkResult::Late if maybe_sent => out.give_back(
                    "not sent again: the lease was too close to expiry; an earlier request carrying it may have been carried out",
                    Sent::Maybe,
                    ids,
                ),
                ChunkResult::Late => out.late_ids.extend(ids),
                ChunkResult::Isolated(e) => out.blame(e, ids),
                ChunkResult::Outage(e) => out.outage(e, ids),
                ChunkResult::Failed(e) => {
                    let sent = if maybe_sent { Sent::Maybe } else { sent_by(&e) };
                    out.failed(e, sent, ids);
                }
            }
        }
        out
    }

    fn give_back(&mut self, reason: &str, sent: Sent, ids: Vec<i64>) {
        self.release_with_reason
            .entry((reason.to_string(), sent))
            .or_default()
            .extend(ids);
    }

    fn worse(&mut self, trouble: Trouble) {
        self.trouble = std::mem::take(&mut self.trouble).worst(trouble);
    }

    /// A request carrying only this row fails while storage handles others: the row's failure.
    fn blame(&mut self, e: StorageError, ids: Vec<i64>) {
        match e {
            StorageError::Refused { .. } => self
                .dead
                .entry(format!(
                    "{e}; every request carrying this name is refused, so the reaper will not delete it: \
                     let it through the proxy or firewall and requeue it, or delete it by hand"
                ))
                .or_default()
                .extend(ids),
            e => self.retry.entry(e.to_string()).or_default().extend(ids),
        }
    }

    fn outage(&mut self, e: StorageError, ids: Vec<i64>) {
        let why = format!("storage is unreachable or answers nothing usable ({e})");
        self.give_back(&format!("not attempted: {why}"), Sent::Maybe, ids);
        self.worse(Trouble::Outage(why));
    }

    /// Every request for these rows failed in a way that says nothing against them.
    fn failed(&mut self, e: StorageError, sent: Sent, ids: Vec<i64>) {
        let (reason, trouble) = match e {
            StorageError::Config {
                http,
                status,
                code,
                message,
            } => {
                let why = format!("HTTP {http}, statusCode {status} ({code}): {message}");
                (
                    format!("storage refused the reaper's configuration or its answer cannot be believed: {why}"),
                    Trouble::Config(why),
                )
            }
            StorageError::Overload { http, code } => (
                format!("storage is overloaded (HTTP {http}, {code}); the reaper slows down"),
                Trouble::Overload,
            ),
            e @ StorageError::Retryable(_) => return self.outage(e, ids),
            e @ StorageError::Refused { .. } => {
                let why = format!("{e}, and every request of the batch was refused: a proxy or firewall in front of storage refuses the reaper's deletes; let DELETE /storage/v1/object/* through");
                (format!("not deleted: {why}"), Trouble::Config(why))
            }
            e @ StorageError::BulkLimit(_) => {
                let why = format!(
                    "{e}, even for one name: storage accepts no bulk delete from this reaper"
                );
                (format!("not deleted: {why}"), Trouble::Config(why))
            }
            e @ StorageError::OverQuota { .. } => {
                let why = format!("{e}; deletes are refused until the project's plan or spend cap allows them, the reaper pauses");
                (format!("not deleted: {why}"), Trouble::Config(why))
            }
        };
        self.give_back(&reason, sent, ids);
        self.worse(trouble);
    }
}

/// What a failed bulk request says about the deletes it carried.
fn sent_by(e: &StorageError) -> Sent {
    if e.deleted_nothing() {
        Sent::Nothing
    } else {
        Sent::Maybe
    }
}
