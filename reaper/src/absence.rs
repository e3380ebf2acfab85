//! Telling "already absent" from "invisible". A bulk delete lists only what it deleted, so a
//! name it leaves out may be gone, or may be there and out of the key's reach: an anon key, a key
//! without delete rights, a proxy or cache answering `200 []` all look exactly like "already
//! gone", and confirming that deletes job rows whose files then stay in storage for good.
//!
//! Where `storage.objects` is in the database, `confirm()` checks there (the reaper asks
//! `verifies_absence()` once per connection). Elsewhere the reaper asks storage itself, name by
//! name (`GET /object/info/authenticated/...`), after showing that the same key, through the same
//! URL, sees and deletes objects of that bucket: it uploads a tiny canary, must find it by the
//! same request, and must see a bulk delete list it. A "no" is believed only then.

use std::collections::HashSet;

use futures::StreamExt;

use crate::storage::{StorageClient, StorageError};

const CANARY_BYTES: &[u8] = b"pg_orphan_cleanup reaper canary";

/// The reaper's own object for the start-up probe and the checks: `.pg_orphan_cleanup-probe/<worker>.txt`.
pub fn canary_name(worker: &str) -> String {
    format!(
        ".pg_orphan_cleanup-probe/{}.txt",
        worker.replace(['/', ':'], "_")
    )
}

/// Which of `names`, reported absent by a bulk delete in `bucket`, storage still has. An error
/// when the key cannot be shown to see and delete objects there, or storage does not answer.
pub async fn still_there(
    storage: &StorageClient,
    bucket: &str,
    canary: &str,
    names: &[String],
    concurrency: usize,
) -> Result<HashSet<String>, StorageError> {
    storage
        .upload(bucket, canary, CANARY_BYTES.to_vec())
        .await?;
    if !storage.exists(bucket, canary).await? {
        return Err(unverifiable(format!(
            "the key cannot see {bucket}/{canary}, which it has just uploaded, so it cannot tell an absent object from one it may not see"
        )));
    }
    let answers: Vec<(&String, Result<bool, StorageError>)> = futures::stream::iter(names)
        .map(|name| async move { (name, storage.exists(bucket, name).await) })
        .buffer_unordered(concurrency)
        .collect()
        .await;
    let mut present = HashSet::new();
    for (name, answer) in answers {
        if answer? {
            present.insert(name.clone());
        }
    }
    let deleted = storage.bulk_delete(bucket, &[canary.to_string()]).await?;
    if !deleted.names.contains_key(canary) {
        return Err(unverifiable(format!(
            "a bulk delete of {bucket}/{canary} did not delete it, so its \"nothing to delete\" answers cannot be believed (a key without delete rights, or something other than this project's storage answering at SUPABASE_URL)"
        )));
    }
    Ok(present)
}

/// Whether a bulk delete works in `bucket` for the reaper's own canary (uploaded, then deleted):
/// asked when a request carrying one name fails and nothing else of its chunk succeeded, to
/// tell a name that storage fails on from a delete path that fails for every name.
pub async fn deletes_work(storage: &StorageClient, bucket: &str, canary: &str) -> bool {
    if storage
        .upload(bucket, canary, CANARY_BYTES.to_vec())
        .await
        .is_err()
    {
        return false;
    }
    storage
        .bulk_delete(bucket, &[canary.to_string()])
        .await
        .is_ok_and(|d| d.names.contains_key(canary))
}

fn unverifiable(message: String) -> StorageError {
    StorageError::Config {
        http: 200,
        status: "200".into(),
        code: "UnverifiableAbsence".into(),
        message,
    }
}
