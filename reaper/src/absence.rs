//! Telling "already absent" from "invisible". A bulk delete lists only what it deleted, so a
//! name it leaves out may be gone, or may be there and out of the key's reach: an anon key, a key
//! without delete rights, a proxy or cache answering `200 []` all look exactly like "already
//! gone", and confirming that deletes job rows whose files then stay in storage for good.
//!
//! Where `storage.objects` is in the database, `confirm()` checks there (the reaper asks
//! `verifies_absence()` once per connection). Elsewhere the reaper asks storage itself, name by
//! name (`GET /object/info/authenticated/...`), after showing that the same key, through the same
//! URL, sees and deletes objects of that bucket: it uploads a tiny canary, must find it by the
//! same request, and must see a bulk delete list it. A "no" is believed only then. A few of the
//! names the same answers said were deleted are looked up too: an upstream that forges "deleted"
//! for names it never deleted is caught the same way.
//!
//! Each check has a canary of its own (`.pg_orphan_cleanup-probe/<worker>-<random>.png`, a
//! 1x1 PNG, which buckets limited to images accept), so checks running at once, in this reaper
//! or another, never touch each other's. A canary storage refused to delete is removed by the
//! next check of the same reaper that works.

use std::collections::HashSet;

use futures::StreamExt;

use crate::storage::{StorageClient, StorageError};

/// A transparent 1x1 PNG.
const CANARY_PNG: &[u8] = &[
    0x89, 0x50, 0x4e, 0x47, 0x0d, 0x0a, 0x1a, 0x0a, 0x00, 0x00, 0x00, 0x0d, 0x49, 0x48, 0x44, 0x52,
    0x00, 0x00, 0x00, 0x01, 0x00, 0x00, 0x00, 0x01, 0x08, 0x06, 0x00, 0x00, 0x00, 0x1f, 0x15, 0xc4,
    0x89, 0x00, 0x00, 0x00, 0x0b, 0x49, 0x44, 0x41, 0x54, 0x78, 0x9c, 0x63, 0x60, 0x00, 0x02, 0x00,
    0x00, 0x05, 0x00, 0x01, 0x7a, 0x5e, 0xab, 0x3f, 0x00, 0x00, 0x00, 0x00, 0x49, 0x45, 0x4e, 0x44,
    0xae, 0x42, 0x60, 0x82,
];

/// The folder of the reaper's own objects.
pub const CANARY_FOLDER: &str = ".pg_orphan_cleanup-probe/";

/// How a worker's canaries start, inside [`CANARY_FOLDER`].
fn canary_stem(worker: &str) -> String {
    format!("{}-", worker.replace(['/', ':'], "_"))
}

/// A new canary's name for `worker`: `.pg_orphan_cleanup-probe/<worker>-<random>.png`.
pub fn canary_name(worker: &str) -> String {
    format!(
        "{CANARY_FOLDER}{}{:016x}.png",
        canary_stem(worker),
        rand::random::<u64>()
    )
}

/// Uploads a canary (upsert).
pub async fn upload_canary(
    storage: &StorageClient,
    bucket: &str,
    canary: &str,
) -> Result<(), StorageError> {
    storage
        .upload(bucket, canary, CANARY_PNG.to_vec(), "image/png")
        .await
}

/// What a check found: the names storage still has, and those it could not be asked about (a
/// lookup that kept failing): neither kind may be confirmed gone.
#[derive(Debug, Default)]
pub struct Checked {
    pub present: HashSet<String>,
    pub unchecked: HashSet<String>,
}

/// A call that may fail for a moment (a 5xx, a timeout, a 429), tried three times in all.
async fn patiently<T, F, Fut>(mut call: F) -> Result<T, StorageError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, StorageError>>,
{
    let mut pause = std::time::Duration::from_millis(200);
    let mut tries = 1;
    loop {
        match call().await {
            Err(StorageError::Retryable(_) | StorageError::Overload { .. }) if tries < 3 => {
                tokio::time::sleep(pause).await;
                pause *= 3;
                tries += 1;
            }
            result => return result,
        }
    }
}

/// Of `names` (reported absent by bulk deletes in `bucket`, and a sample of those reported
/// deleted), which storage still has, and which could not be looked up. An error when the key
/// cannot be shown to see and delete objects there, or storage does not answer that far. Each
/// request is tried three times before it counts as failed, and one name's failed lookup leaves
/// only that name unchecked.
pub async fn still_there(
    storage: &StorageClient,
    bucket: &str,
    worker: &str,
    names: &[String],
    concurrency: usize,
) -> Result<Checked, StorageError> {
    let canary = canary_name(worker);
    patiently(|| upload_canary(storage, bucket, &canary)).await?;
    if !patiently(|| storage.exists(bucket, &canary)).await? {
        return Err(unverifiable(format!(
            "the key cannot see {bucket}/{canary}, which it has just uploaded, so it cannot tell an absent object from one it may not see"
        )));
    }
    let answers: Vec<(&String, Result<bool, StorageError>)> = futures::stream::iter(names)
        .map(|name| async move { (name, patiently(|| storage.exists(bucket, name)).await) })
        .buffer_unordered(concurrency)
        .collect()
        .await;
    let mut checked = Checked::default();
    for (name, answer) in answers {
        match answer {
            Ok(true) => {
                checked.present.insert(name.clone());
            }
            Ok(false) => {}
            // An answer that cannot be believed says something about the upstream, not the name.
            Err(e @ StorageError::Config { .. }) => return Err(e),
            Err(_) => {
                checked.unchecked.insert(name.clone());
            }
        }
    }
    let deleted = patiently(|| storage.bulk_delete(bucket, std::slice::from_ref(&canary))).await?;
    if !deleted.names.contains_key(&canary) {
        return Err(unverifiable(format!(
            "a bulk delete of {bucket}/{canary} did not delete it, so its \"nothing to delete\" answers cannot be believed (a key without delete rights, or something other than this project's storage answering at SUPABASE_URL)"
        )));
    }
    remove_leftovers(storage, bucket, worker).await;
    Ok(checked)
}

/// How a canary's upload-then-bulk-delete went wrong.
#[derive(Debug)]
pub enum RoundTrip {
    Upload(StorageError),
    Delete(StorageError),
    /// The bulk delete answered, and did not list the canary: the key deletes nothing.
    NotDeleted,
}

/// Uploads `canary` to `bucket` and deletes it in bulk, which must list it: the start-up probe,
/// and [`deletes_work`].
pub async fn round_trip(
    storage: &StorageClient,
    bucket: &str,
    canary: &str,
) -> Result<(), RoundTrip> {
    upload_canary(storage, bucket, canary)
        .await
        .map_err(RoundTrip::Upload)?;
    let deleted = storage
        .bulk_delete(bucket, &[canary.to_string()])
        .await
        .map_err(RoundTrip::Delete)?;
    if deleted.names.contains_key(canary) {
        Ok(())
    } else {
        Err(RoundTrip::NotDeleted)
    }
}

/// Whether a bulk delete works in `bucket` for a canary of the reaper's own: asked when a
/// request carrying one name fails and nothing else of its chunk succeeded, to tell a name that
/// storage fails on from a delete path that fails for every name.
pub async fn deletes_work(storage: &StorageClient, bucket: &str, worker: &str) -> bool {
    round_trip(storage, bucket, &canary_name(worker))
        .await
        .is_ok()
}

/// Deletes this worker's canaries that an earlier check could not (storage refused then). Best
/// effort: a failure leaves them for the next check.
async fn remove_leftovers(storage: &StorageClient, bucket: &str, worker: &str) {
    let stem = canary_stem(worker);
    let Ok(names) = storage.list_folder(bucket, CANARY_FOLDER).await else {
        return;
    };
    let mine: Vec<String> = names
        .into_iter()
        .filter(|n| n.starts_with(&stem) && n.ends_with(".png"))
        .map(|n| format!("{CANARY_FOLDER}{n}"))
        .take(1000)
        .collect();
    if !mine.is_empty() {
        let _ = storage.bulk_delete(bucket, &mine).await;
    }
}

fn unverifiable(message: String) -> StorageError {
    StorageError::Config {
        http: 200,
        status: "200".into(),
        code: "UnverifiableAbsence".into(),
        message,
    }
}
