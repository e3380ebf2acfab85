//! Buckets and objects: bytes in files under the data directory, metadata in memory (rebuilt
//! from the files at start). One lock per store is plenty: deletes are an unlink each.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::RwLock;
use std::time::SystemTime;

use serde_json::{json, Value};
use uuid::Uuid;

#[derive(Debug, Clone)]
pub struct ObjectMeta {
    pub id: Uuid,
    pub size: u64,
    pub mimetype: String,
    pub created_at: String,
}

impl ObjectMeta {
    /// The object as the bulk delete route lists it.
    pub fn to_json(&self, bucket: &str, name: &str) -> Value {
        json!({
            "name": name,
            "bucket_id": bucket,
            "owner": null,
            "owner_id": null,
            "id": self.id,
            "version": Uuid::new_v4(),
            "updated_at": self.created_at,
            "created_at": self.created_at,
            "last_accessed_at": self.created_at,
            "metadata": {"size": self.size, "mimetype": self.mimetype, "eTag": format!("\"{}\"", self.id.simple())},
        })
    }
}

#[derive(Debug, Default)]
struct Bucket {
    public: bool,
    objects: BTreeMap<String, ObjectMeta>,
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("Bucket not found")]
    NoSuchBucket,
    #[error("The resource already exists")]
    Exists,
    #[error("io error: {0}")]
    Io(#[from] std::io::Error),
}

pub struct Store {
    root: PathBuf,
    buckets: RwLock<HashMap<String, Bucket>>,
}

/// Object names Supabase Storage accepts: ASCII letters, digits and `_/!.*'() &$=@;:+,?-`,
/// with no empty, `.` or `..` segment.
pub fn valid_key(key: &str) -> bool {
    !key.is_empty()
        && key.len() <= 1024
        && key
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "_/!.*'() &$=@;:+,?-".contains(c))
        && key
            .split('/')
            .all(|s| !s.is_empty() && s != "." && s != "..")
}

pub fn valid_bucket(name: &str) -> bool {
    !name.is_empty()
        && name != "."
        && name != ".."
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "_!.*'() &$=@;:+,?-".contains(c))
}

fn now_rfc3339() -> String {
    let secs = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    // Civil time from the Unix epoch (UTC), enough for metadata timestamps.
    let days = secs / 86_400;
    let (h, m, s) = ((secs % 86_400) / 3600, (secs % 3600) / 60, secs % 60);
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let mo = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(mo <= 2);
    format!("{y:04}-{mo:02}-{d:02}T{h:02}:{m:02}:{s:02}.000Z")
}

impl Store {
    /// Opens the store, loading every bucket (a directory) and object (a file) under `root`.
    pub fn open(root: &Path) -> std::io::Result<Store> {
        std::fs::create_dir_all(root)?;
        let mut buckets = HashMap::new();
        for entry in std::fs::read_dir(root)? {
            let entry = entry?;
            if !entry.file_type()?.is_dir() {
                continue;
            }
            let name = entry.file_name().to_string_lossy().into_owned();
            let mut bucket = Bucket {
                public: true,
                ..Default::default()
            };
            load_dir(&entry.path(), "", &mut bucket.objects)?;
            buckets.insert(name, bucket);
        }
        Ok(Store {
            root: root.to_path_buf(),
            buckets: RwLock::new(buckets),
        })
    }

    pub fn create_bucket(&self, name: &str, public: bool) -> Result<(), StoreError> {
        let mut buckets = self.buckets.write().unwrap();
        if buckets.contains_key(name) {
            return Err(StoreError::Exists);
        }
        std::fs::create_dir_all(self.root.join(name))?;
        buckets.insert(
            name.to_string(),
            Bucket {
                public,
                objects: BTreeMap::new(),
            },
        );
        Ok(())
    }

    pub fn put(
        &self,
        bucket: &str,
        key: &str,
        bytes: &[u8],
        mimetype: &str,
        upsert: bool,
    ) -> Result<Uuid, StoreError> {
        let mut buckets = self.buckets.write().unwrap();
        let b = buckets.get_mut(bucket).ok_or(StoreError::NoSuchBucket)?;
        if b.objects.contains_key(key) && !upsert {
            return Err(StoreError::Exists);
        }
        let path = self.root.join(bucket).join(key);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent)?;
        }
        std::fs::write(&path, bytes)?;
        let meta = ObjectMeta {
            id: Uuid::new_v4(),
            size: bytes.len() as u64,
            mimetype: mimetype.to_string(),
            created_at: now_rfc3339(),
        };
        let id = meta.id;
        b.objects.insert(key.to_string(), meta);
        Ok(id)
    }

    /// Deletes the named objects that exist; returns them (name, metadata). Unknown bucket: none.
    pub fn delete_many(&self, bucket: &str, names: &[String]) -> Vec<(String, ObjectMeta)> {
        let mut buckets = self.buckets.write().unwrap();
        let Some(b) = buckets.get_mut(bucket) else {
            return Vec::new();
        };
        let mut deleted = Vec::new();
        for name in names {
            if let Some(meta) = b.objects.remove(name) {
                let _ = std::fs::remove_file(self.root.join(bucket).join(name));
                deleted.push((name.clone(), meta));
            }
        }
        deleted
    }

    /// An object's metadata, if it exists.
    pub fn get(&self, bucket: &str, key: &str) -> Option<ObjectMeta> {
        self.buckets
            .read()
            .unwrap()
            .get(bucket)
            .and_then(|b| b.objects.get(key).cloned())
    }

    pub fn exists(&self, bucket: &str, key: &str) -> bool {
        self.buckets
            .read()
            .unwrap()
            .get(bucket)
            .is_some_and(|b| b.objects.contains_key(key))
    }

    pub fn bucket_exists(&self, bucket: &str) -> bool {
        self.buckets.read().unwrap().contains_key(bucket)
    }

    /// Sets the upload time of the objects of `bucket` whose names start with `prefix`, as
    /// time passing would have made it (for tests of listings through the API; a `storage.objects`
    /// kept in a database is aged there). Returns how many objects it changed.
    pub fn set_created_at(&self, bucket: &str, prefix: &str, created_at: &str) -> usize {
        let mut buckets = self.buckets.write().unwrap();
        let Some(b) = buckets.get_mut(bucket) else {
            return 0;
        };
        let mut n = 0;
        for (name, meta) in b.objects.iter_mut() {
            if name.starts_with(prefix) {
                meta.created_at = created_at.to_string();
                n += 1;
            }
        }
        n
    }

    /// The folder listing of the list route: immediate children of `prefix` (matched without
    /// regard to case), folders with `id: null`, sorted by name, `offset`/`limit` applied.
    pub fn list(&self, bucket: &str, prefix: &str, limit: usize, offset: usize) -> Vec<Value> {
        let buckets = self.buckets.read().unwrap();
        let Some(b) = buckets.get(bucket) else {
            return Vec::new();
        };
        let folder = prefix.trim_end_matches('/').to_lowercase();
        let folder = if folder.is_empty() {
            String::new()
        } else {
            format!("{folder}/")
        };
        let mut entries: BTreeMap<String, Value> = BTreeMap::new();
        for (name, meta) in &b.objects {
            if !name.to_lowercase().starts_with(&folder) {
                continue;
            }
            let rest = &name[folder.len()..];
            match rest.split_once('/') {
                Some((dir, _)) => {
                    entries.entry(dir.to_string()).or_insert_with(|| {
                        json!({"name": dir, "id": null, "updated_at": null, "created_at": null, "last_accessed_at": null, "metadata": null})
                    });
                }
                None => {
                    entries.insert(
                        rest.to_string(),
                        json!({
                            "name": rest, "id": meta.id, "updated_at": meta.created_at, "created_at": meta.created_at,
                            "last_accessed_at": meta.created_at,
                            "metadata": {"size": meta.size, "mimetype": meta.mimetype, "eTag": format!("\"{}\"", meta.id.simple())},
                        }),
                    );
                }
            }
        }
        entries.into_values().skip(offset).take(limit).collect()
    }

    /// Every object of a bucket (or of all buckets) as `bucket/key`, for tests and the demo.
    pub fn all_objects(&self, bucket: Option<&str>) -> Vec<(String, String, u64)> {
        let buckets = self.buckets.read().unwrap();
        let mut out = Vec::new();
        for (name, b) in buckets
            .iter()
            .filter(|(n, _)| bucket.is_none_or(|want| want == n.as_str()))
        {
            for (key, meta) in &b.objects {
                out.push((name.clone(), key.clone(), meta.size));
            }
        }
        out.sort();
        out
    }

    /// Every bucket (name, public) and object (bucket, name, metadata): what `storage.objects`
    /// must hold.
    #[allow(clippy::type_complexity)]
    pub fn snapshot(&self) -> (Vec<(String, bool)>, Vec<(String, String, ObjectMeta)>) {
        let buckets = self.buckets.read().unwrap();
        let mut names = Vec::new();
        let mut objects = Vec::new();
        for (name, b) in buckets.iter() {
            names.push((name.clone(), b.public));
            for (key, meta) in &b.objects {
                objects.push((name.clone(), key.clone(), meta.clone()));
            }
        }
        (names, objects)
    }

    pub fn is_public(&self, bucket: &str) -> Option<bool> {
        self.buckets.read().unwrap().get(bucket).map(|b| b.public)
    }
}

fn load_dir(
    dir: &Path,
    prefix: &str,
    objects: &mut BTreeMap<String, ObjectMeta>,
) -> std::io::Result<()> {
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let name = format!("{prefix}{}", entry.file_name().to_string_lossy());
        if entry.file_type()?.is_dir() {
            load_dir(&entry.path(), &format!("{name}/"), objects)?;
        } else {
            let size = entry.metadata()?.len();
            objects.insert(
                name,
                ObjectMeta {
                    id: Uuid::new_v4(),
                    size,
                    mimetype: "application/octet-stream".into(),
                    created_at: now_rfc3339(),
                },
            );
        }
    }
    Ok(())
}
