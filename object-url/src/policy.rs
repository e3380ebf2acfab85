//! Which parsed objects this project may delete: the allow-lists shared by the extension
//! (`orphan_cleanup.allowed_*` settings) and the reaper (`--buckets`, `--storage-hosts`).

use crate::ObjectRef;
use thiserror::Error;

/// The allow-lists. Empty `buckets` allows nothing; empty `prefixes` allows whole buckets;
/// empty `hosts` allows only bare `bucket/key` values.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Policy {
    pub buckets: Vec<String>,
    pub prefixes: Vec<String>,
    pub hosts: Vec<String>,
}

/// A configured list entry that can never match anything useful, caught when the list is read.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum PolicyError {
    #[error("bucket {0:?} is not a valid bucket name (letters, digits and _.-! etc., no '/')")]
    BadBucket(String),
    #[error("host {0:?} must be a bare host or host:port, e.g. abcd.supabase.co (no scheme, path or '@')")]
    BadHost(String),
    #[error(
        "prefix {0:?} must be a relative key prefix such as renders/ (no leading '/', no '..')"
    )]
    BadPrefix(String),
}

/// Why an otherwise well-formed object may not be deleted by this project.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum Refusal {
    #[error("no bucket is allowed (the bucket allow-list is empty); add {0:?} to it to allow deletes there")]
    NoBucketsAllowed(String),
    #[error("bucket {0:?} is not in the bucket allow-list")]
    BucketNotAllowed(String),
    #[error("key {0:?} is outside the allowed prefixes")]
    PrefixNotAllowed(String),
    #[error("host {0:?} is not an allowed host of this project; the host allow-list is empty, so only bare bucket/key values are accepted")]
    NoHostsAllowed(String),
    #[error("host {0:?} is not in the host allow-list (it may be another project's)")]
    HostNotAllowed(String),
}

fn split_list(list: &str) -> impl Iterator<Item = &str> {
    list.split(',').map(str::trim).filter(|s| !s.is_empty())
}

impl Policy {
    /// Reads comma-separated lists, as the settings and flags hold them.
    pub fn from_lists(buckets: &str, prefixes: &str, hosts: &str) -> Result<Self, PolicyError> {
        let mut policy = Policy::default();
        for b in split_list(buckets) {
            let ok = b != "."
                && b != ".."
                && b.chars()
                    .all(|c| c.is_ascii_alphanumeric() || "_!.*'() &$=@;:+,?-".contains(c));
            if !ok {
                return Err(PolicyError::BadBucket(b.to_string()));
            }
            policy.buckets.push(b.to_string());
        }
        for p in split_list(prefixes) {
            let ok = !p.starts_with('/')
                && !p.split('/').any(|s| s == "." || s == "..")
                && !p.contains('\\');
            if !ok {
                return Err(PolicyError::BadPrefix(p.to_string()));
            }
            policy.prefixes.push(p.to_string());
        }
        for h in split_list(hosts) {
            // Read as the parser reads a URL's host, so that a listed host can match.
            let host = crate::plain_authority(h, "https")
                .map_err(|_| PolicyError::BadHost(h.to_ascii_lowercase()))?;
            policy.hosts.push(host);
        }
        Ok(policy)
    }

    /// Accepts the object only if its bucket, key prefix and host are all allowed.
    pub fn check(&self, obj: &ObjectRef) -> Result<(), Refusal> {
        if let Some(host) = &obj.host {
            if self.hosts.is_empty() {
                return Err(Refusal::NoHostsAllowed(host.clone()));
            }
            if !self.hosts.iter().any(|h| h == host) {
                return Err(Refusal::HostNotAllowed(host.clone()));
            }
        }
        if self.buckets.is_empty() {
            return Err(Refusal::NoBucketsAllowed(obj.bucket.clone()));
        }
        if !self.buckets.iter().any(|b| b == &obj.bucket) {
            return Err(Refusal::BucketNotAllowed(obj.bucket.clone()));
        }
        if !self.prefixes.is_empty()
            && !self
                .prefixes
                .iter()
                .any(|p| obj.key.starts_with(p.as_str()))
        {
            return Err(Refusal::PrefixNotAllowed(obj.key.clone()));
        }
        Ok(())
    }
}
