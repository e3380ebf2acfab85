//! No object counts as gone without evidence ([`crate::absence`]). Where the database checks
//! storage.objects, `confirm()` does. Elsewhere storage is asked about every name a bulk delete
//! reported already absent, and, in the same round, about a few names the batch's answers said
//! were deleted (an upstream forging "deleted" is caught when it also answers "absent"; one that
//! forges only well-formed "deleted" answers is not, see the README). A name still there goes back
//! (the delete did not happen, whatever the answer said) and is a configuration error; so is an
//! answer that cannot be checked because the key is not shown to see and delete objects. A check
//! that cannot finish (storage slow or failing, the lease running out, shutdown) gives its absent
//! rows back for later, and costs nothing else: the deleted rows stand on their answer's shape.

use std::collections::{BTreeMap, HashMap};
use std::time::Instant;

use super::outcomes::Outcomes;
use super::{Reaper, Trouble};
use crate::queue::{Queue, Sent};
use crate::storage::StorageError;

/// "Deleted" names looked up per bucket, beside the absent ones.
const DELETED_SAMPLE: usize = 3;

/// The names to look up in one bucket.
#[derive(Default)]
struct Asked<'a> {
    absent: Vec<(i64, &'a String)>,
    deleted: Vec<(i64, &'a String)>,
}

impl Reaper {
    pub(super) async fn check_answers(
        &self,
        q: &Queue,
        objects: &HashMap<i64, (String, String)>,
        lease_end: Instant,
        out: &mut Outcomes,
    ) {
        if q.verifies_absence() {
            return;
        }
        if out.absent_ids.is_empty() {
            return;
        }
        let mut by_bucket: BTreeMap<&str, Asked> = BTreeMap::new();
        for id in &out.absent_ids {
            if let Some((bucket, name)) = objects.get(id) {
                by_bucket
                    .entry(bucket)
                    .or_default()
                    .absent
                    .push((*id, name));
            }
        }
        for id in &out.deleted_ids {
            if let Some((bucket, name)) = objects.get(id) {
                if let Some(asked) = by_bucket.get_mut(bucket.as_str()) {
                    asked.deleted.push((*id, name));
                }
            }
        }
        let mut back: Vec<i64> = Vec::new();
        for (bucket, asked) in by_bucket {
            let sample = sample(&asked.deleted);
            let names: Vec<String> = asked
                .absent
                .iter()
                .chain(&sample)
                .map(|(_, n)| (*n).clone())
                .collect();
            let (ids, why, trouble) = match self.look_up(bucket, &names, lease_end).await {
                Ok(checked) => {
                    if let Some((_, forged)) =
                        sample.iter().find(|(_, n)| checked.present.contains(*n))
                    {
                        // A "deleted" answer that is not true: none of this bucket's answers is.
                        let why = format!(
                            "storage answered that it deleted {bucket}/{forged}, but it still has it: its answers cannot be believed \
                             (something other than this project's storage answers at SUPABASE_URL?)"
                        );
                        let ids: Vec<i64> = asked
                            .absent
                            .iter()
                            .chain(&asked.deleted)
                            .map(|(id, _)| *id)
                            .collect();
                        (ids, why.clone(), Trouble::Config(why))
                    } else if asked
                        .absent
                        .iter()
                        .any(|(_, n)| checked.present.contains(*n))
                    {
                        let ids: Vec<i64> = asked
                            .absent
                            .iter()
                            .filter(|(_, n)| {
                                checked.present.contains(*n) || checked.unchecked.contains(*n)
                            })
                            .map(|(id, _)| *id)
                            .collect();
                        let why = format!(
                            "storage answered that objects of {bucket} were already absent, but it still has them (e.g. {}): \
                             the key may lack delete rights, or something other than this project's storage answers at SUPABASE_URL",
                            checked.present.iter().next().map(String::as_str).unwrap_or_default()
                        );
                        (ids, why.clone(), Trouble::Config(why))
                    } else {
                        let ids: Vec<i64> = asked
                            .absent
                            .iter()
                            .filter(|(_, n)| checked.unchecked.contains(*n))
                            .map(|(id, _)| *id)
                            .collect();
                        if ids.is_empty() {
                            continue;
                        }
                        let why = format!(
                            "{} \"already absent\" answers of {bucket} could not be checked (their lookups kept failing)",
                            ids.len()
                        );
                        (ids, why, Trouble::None)
                    }
                }
                Err(e) => {
                    let ids: Vec<i64> = asked.absent.iter().map(|(id, _)| *id).collect();
                    if ids.is_empty() {
                        continue;
                    }
                    let why = format!(
                        "{} \"already absent\" answers of {bucket} could not be checked: {e}",
                        ids.len()
                    );
                    // Only a key that cannot be shown to see and delete is the reaper's trouble;
                    // a check cut short by load, an outage, time or shutdown is retried later.
                    let trouble = match e {
                        StorageError::Config { .. } => Trouble::Config(why.clone()),
                        StorageError::Overload { .. } => Trouble::Overload,
                        _ => Trouble::None,
                    };
                    (ids, why, trouble)
                }
            };
            if trouble == Trouble::None {
                tracing::warn!(bucket, rows = ids.len(), "{why}; given back for later");
            } else {
                tracing::error!(bucket, rows = ids.len(), "{why}");
                self.metrics.nothing_deleted.set(1);
            }
            out.release_with_reason
                .entry((format!("not confirmed: {why}"), Sent::Maybe))
                .or_default()
                .extend(&ids);
            back.extend(ids);
            out.trouble = std::mem::take(&mut out.trouble).worst(trouble);
        }
        if back.is_empty() {
            self.metrics.nothing_deleted.set(0);
        }
        out.absent_ids.retain(|id| !back.contains(id));
        out.deleted_ids.retain(|id| !back.contains(id));
    }

    /// Looks `names` up in `bucket`, within half the time the batch's lease has left (the rest
    /// is for recording), and not at all once shutdown has begun.
    async fn look_up(
        &self,
        bucket: &str,
        names: &[String],
        lease_end: Instant,
    ) -> Result<crate::absence::Checked, StorageError> {
        let left = lease_end.saturating_duration_since(Instant::now());
        let check = crate::absence::still_there(
            &self.storage,
            bucket,
            &self.settings.worker_id,
            names,
            self.settings.concurrency * 4,
        );
        tokio::select! {
            r = check => r,
            _ = tokio::time::sleep(left / 2) => Err(StorageError::Retryable(
                "the checks could not finish in time (the batch's lease runs out)".into(),
            )),
            _ = self.shutdown.cancelled() => Err(StorageError::Retryable(
                "not checked: shutting down".into(),
            )),
        }
    }
}

/// Up to [`DELETED_SAMPLE`] of `rows`, picked at random.
fn sample<'a>(rows: &[(i64, &'a String)]) -> Vec<(i64, &'a String)> {
    if rows.len() <= DELETED_SAMPLE {
        return rows.to_vec();
    }
    rand::seq::index::sample(&mut rand::rng(), rows.len(), DELETED_SAMPLE)
        .into_iter()
        .map(|i| rows[i])
        .collect()
}
