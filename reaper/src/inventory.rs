//! `reaper inventory`: lists buckets through the Storage API into the extension's
//! `object_inventory`, for the databases that do not hold `storage.objects` (storage keeps its
//! metadata elsewhere). Cycles then reconcile strays against that listing as they would against
//! `storage.objects` (see `sql/inventory.sql`).
//!
//! The list route answers one folder at a time (`POST /object/list/{bucket}` with a prefix),
//! a page at a time, with folders as entries whose `id` is null: a listing walks the folders
//! breadth first and records each page's objects under their full names as it goes.
//!
//! What a listing must never do is record an object under a name it does not have: the list
//! route matches the prefix as an ILIKE pattern (`prefix%`), without regard to case and with
//! `_` matching any one character, so the listing of `out/` also holds the objects of a sibling
//! folder `OUT/`, and the listing of `a_b/` those of `aXb/`, named as if they were in `out/` or
//! `a_b/`. Folders that such a pattern confuses with a sibling are therefore not walked (their
//! objects are not recorded, so they are never strays), and the listing says so.

use std::collections::VecDeque;

use serde_json::Value;

use crate::queue::{Queue, QueueError};
use crate::storage::{StorageClient, StorageError};

/// What listing one bucket found.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Listed {
    pub bucket: String,
    /// Objects recorded.
    pub objects: u64,
    /// Folders walked, the bucket's root included.
    pub folders: u64,
    /// Rows of objects an earlier listing saw and this one did not (gone from storage).
    pub removed: i64,
    /// Folders left out: their names differ from a sibling's only in case.
    pub ambiguous: Vec<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum InventoryError {
    #[error(transparent)]
    Queue(#[from] QueueError),
    #[error("listing {bucket}/{prefix} through the Storage API failed: {source}")]
    Storage {
        bucket: String,
        prefix: String,
        source: Box<StorageError>,
    },
    #[error("the Storage API listed an entry of {bucket}/{prefix} without a name: {entry}")]
    Nameless {
        bucket: String,
        prefix: String,
        entry: String,
    },
}

/// Lists `bucket` into the database's inventory, `page` entries per request (at most 1500, the
/// route's cap). A listing that fails half-way stays open: the objects it recorded stay, and
/// the next complete listing of the bucket forgets the ones it does not see.
pub async fn list_bucket(
    queue: &Queue,
    storage: &StorageClient,
    bucket: &str,
    page: usize,
) -> Result<Listed, InventoryError> {
    let listing = queue.inventory_begin(bucket).await?;
    let mut listed = Listed {
        bucket: bucket.to_string(),
        ..Listed::default()
    };
    let mut folders = VecDeque::from([String::new()]);
    while let Some(prefix) = folders.pop_front() {
        listed.folders += 1;
        let mut subfolders = Vec::new();
        let mut offset = 0;
        loop {
            let entries = storage
                .list_page(bucket, &prefix, page, offset)
                .await
                .map_err(|source| InventoryError::Storage {
                    bucket: bucket.to_string(),
                    prefix: prefix.clone(),
                    source: Box::new(source),
                })?;
            let (objects, dirs) = split_page(bucket, &prefix, &entries)?;
            subfolders.extend(dirs);
            if !objects.is_empty() {
                let n = queue.inventory_add(listing, &Value::Array(objects)).await?;
                listed.objects += u64::try_from(n).unwrap_or(0);
            }
            if entries.len() < page {
                break;
            }
            offset += entries.len();
        }
        let (walk, ambiguous) = unambiguous(&prefix, subfolders);
        for folder in &ambiguous {
            tracing::warn!(bucket, folder = %folder, "not listed: another folder's name differs from it only in case, and the list route would mix their objects");
        }
        listed.ambiguous.extend(ambiguous);
        folders.extend(walk);
    }
    listed.removed = queue.inventory_finish(listing).await?;
    Ok(listed)
}

/// A page's objects, with their full names, as `inventory_add()` takes them, and its folders'
/// names (relative to `prefix`).
fn split_page(
    bucket: &str,
    prefix: &str,
    entries: &[Value],
) -> Result<(Vec<Value>, Vec<String>), InventoryError> {
    let mut objects = Vec::new();
    let mut dirs = Vec::new();
    for entry in entries {
        let name = entry
            .get("name")
            .and_then(Value::as_str)
            .filter(|n| !n.is_empty())
            .ok_or_else(|| InventoryError::Nameless {
                bucket: bucket.to_string(),
                prefix: prefix.to_string(),
                entry: entry.to_string().chars().take(200).collect(),
            })?;
        if entry.get("id").is_none_or(Value::is_null) {
            dirs.push(name.to_string());
        } else {
            let mut object = entry.clone();
            object["name"] = Value::String(format!("{prefix}{name}"));
            objects.push(object);
        }
    }
    Ok((objects, dirs))
}

/// The folders under `prefix` to walk (as prefixes ending in `/`), and those left out because
/// the list route's pattern for one would also match another (see the module's comment).
fn unambiguous(prefix: &str, dirs: Vec<String>) -> (Vec<String>, Vec<String>) {
    let mut walk = Vec::new();
    let mut ambiguous = Vec::new();
    for (i, d) in dirs.iter().enumerate() {
        let confused = dirs
            .iter()
            .enumerate()
            .any(|(j, o)| i != j && (ilike_prefix(d, o) || ilike_prefix(o, d)));
        let folder = format!("{prefix}{d}/");
        if confused {
            ambiguous.push(folder);
        } else {
            walk.push(folder);
        }
    }
    (walk, ambiguous)
}

/// Whether the list route's pattern for folder `pattern` (`pattern/%`, ILIKE) matches folder
/// `name`'s objects: equal lengths, each character equal regardless of ASCII case or `_` in the
/// pattern. (`%` and `\\` cannot occur: object names are ASCII without them.)
fn ilike_prefix(pattern: &str, name: &str) -> bool {
    pattern.len() == name.len()
        && pattern
            .bytes()
            .zip(name.bytes())
            .all(|(p, n)| p == b'_' || p.eq_ignore_ascii_case(&n))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn objects_get_their_full_names_and_folders_are_walked_later() {
        let page = vec![
            json!({"name": "2026", "id": null}),
            json!({"name": "a.png", "id": "6f1c1d8e-0000-4000-8000-000000000001", "created_at": "2026-11-01T00:00:00Z"}),
        ];
        let (objects, dirs) = split_page("renders", "out/", &page).unwrap();
        assert_eq!(objects.len(), 1);
        assert_eq!(objects[0]["name"], "out/a.png");
        assert_eq!(objects[0]["created_at"], "2026-11-01T00:00:00Z");
        assert_eq!(dirs, vec!["2026".to_string()]);
    }

    #[test]
    fn an_entry_without_a_name_is_an_error_naming_the_folder() {
        let err = split_page("renders", "out/", &[json!({"id": null})]).unwrap_err();
        assert_eq!(
            err.to_string(),
            r#"the Storage API listed an entry of renders/out/ without a name: {"id":null}"#
        );
    }

    #[test]
    fn folders_differing_only_in_case_are_not_walked() {
        let (walk, ambiguous) = unambiguous("", vec!["out".into(), "OUT".into(), "thumbs".into()]);
        assert_eq!(walk, vec!["thumbs/".to_string()]);
        assert_eq!(ambiguous, vec!["out/".to_string(), "OUT/".to_string()]);
    }

    #[test]
    fn a_folder_whose_underscore_matches_a_sibling_is_not_walked() {
        let (walk, ambiguous) = unambiguous(
            "out/",
            vec!["a_b".into(), "aXb".into(), "a_bc".into(), "ab".into()],
        );
        assert_eq!(walk, vec!["out/a_bc/".to_string(), "out/ab/".to_string()]);
        assert_eq!(
            ambiguous,
            vec!["out/a_b/".to_string(), "out/aXb/".to_string()]
        );
    }
}
