//! The Supabase Storage API as the reaper uses it: bulk delete, plus the upload that the
//! start-up probe needs. Every response is classified by its body as well as its status,
//! because the server answers almost every error with HTTP 400 and the real status in the body.

use std::collections::HashMap;
use std::time::Duration;

use serde_json::Value;
use thiserror::Error;

use crate::secret::ServiceKey;

/// Why a bulk request failed. A bulk request fails as a whole, so these describe the process
/// (its URL, key, the server's load), never one row.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum StorageError {
    /// Retrying cannot help: wrong URL, wrong key, unknown route, any other 4xx.
    #[error("storage refused the request (HTTP {http}, statusCode {status}, {code}): {message}")]
    Config {
        http: u16,
        status: String,
        code: String,
        message: String,
    },
    /// The server is overloaded (429 SlowDown, 544 database timeout): slow down, no attempt lost.
    #[error("storage is overloaded (HTTP {http}, {code})")]
    Overload { http: u16, code: String },
    /// 5xx, timeouts, dropped connections, answers that are not JSON: nothing is known about
    /// the rows. The reaper asks whether storage answers at all (an outage costs no attempt),
    /// and otherwise splits the request to find the names it fails on.
    #[error("storage request failed: {0}")]
    Retryable(String),
    /// Refused for what the request carries, before the storage server saw it or before any
    /// work: a proxy or web firewall's own 403 or 413 page (not the server's JSON), or a body too
    /// large. The reaper splits the request until the name it refuses is alone.
    #[error("the request was refused for what it carries (HTTP {http}): {message}")]
    Refused { http: u16, message: String },
    /// The project limits bulk deletes to fewer names than were sent (`limited to N objects`).
    #[error("storage limits bulk deletes to {0} names per request")]
    BulkLimit(usize),
    /// The project is over its quota: every delete is refused (HTTP 402) until its plan or spend
    /// cap changes. Nothing a retry can fix soon.
    #[error("the project is over its storage quota (HTTP {http}): {message}")]
    OverQuota { http: u16, message: String },
}

impl StorageError {
    /// Whether the answer proves that nothing was deleted: the key was refused (HTTP 401 or 403,
    /// or HTTP 400 with `statusCode` 401 or 403), or the body was refused as too large (413).
    /// Authentication and the body's size are checked before any work. Any other error may come
    /// after part of the request was done (the server deletes a bulk request in sub-batches,
    /// each committed on its own), and so proves nothing: a 429, a 544, a 400 of another kind, a
    /// 5xx, a timeout, a dropped connection.
    pub fn deleted_nothing(&self) -> bool {
        match self {
            StorageError::Config { http, status, .. } => {
                matches!(http, 401 | 403 | 413)
                    || (*http == 400 && matches!(status.as_str(), "401" | "403"))
            }
            // A proxy's refusal never reached the server; the bulk limit and the body's size are
            // checked before the first delete.
            StorageError::Refused { .. } | StorageError::BulkLimit(_) => true,
            StorageError::Overload { .. }
            | StorageError::Retryable(_)
            | StorageError::OverQuota { .. } => false,
        }
    }

    /// The same error with every occurrence of `secret` in its text replaced.
    pub fn without(self, secret: &str) -> StorageError {
        if secret.is_empty() {
            return self;
        }
        let cut = |s: String| s.replace(secret, "<the key, redacted>");
        match self {
            StorageError::Config {
                http,
                status,
                code,
                message,
            } => StorageError::Config {
                http,
                status: cut(status),
                code: cut(code),
                message: cut(message),
            },
            StorageError::Overload { http, code } => StorageError::Overload {
                http,
                code: cut(code),
            },
            StorageError::Retryable(m) => StorageError::Retryable(cut(m)),
            StorageError::Refused { http, message } => StorageError::Refused {
                http,
                message: cut(message),
            },
            StorageError::BulkLimit(n) => StorageError::BulkLimit(n),
            StorageError::OverQuota { http, message } => StorageError::OverQuota {
                http,
                message: cut(message),
            },
        }
    }

    /// Whether the failure may be caused by one of the names the request carried, so that
    /// splitting the request can find it.
    pub fn may_be_a_name(&self) -> bool {
        matches!(
            self,
            StorageError::Retryable(_) | StorageError::Refused { .. }
        )
    }
}

/// What a successful bulk delete says: the names it deleted, with their sizes where known.
#[derive(Debug, Default, Clone)]
pub struct Deleted {
    pub names: HashMap<String, Option<u64>>,
}

#[derive(Clone)]
pub struct StorageClient {
    http: reqwest::Client,
    base: url::Url,
    key: ServiceKey,
}

impl std::fmt::Debug for StorageClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StorageClient")
            .field("base", &self.base.as_str())
            .field("key", &self.key)
            .finish()
    }
}

impl StorageClient {
    pub fn new(base: url::Url, key: ServiceKey, timeout: Duration) -> StorageClient {
        // No redirects: reqwest would follow one to another host with the custom `apikey`
        // header (it strips only Authorization), and re-send the delete there.
        // No proxy from the environment either (HTTP_PROXY, ALL_PROXY): the key would go to it,
        // in cleartext for an http:// SUPABASE_URL.
        let http = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .no_proxy()
            .timeout(timeout)
            .pool_max_idle_per_host(64)
            .user_agent(concat!(
                "pg_orphan_cleanup-reaper/",
                env!("CARGO_PKG_VERSION")
            ))
            .build()
            .expect("a reqwest client with rustls always builds");
        StorageClient { http, base, key }
    }

    fn url(&self, path: &str) -> url::Url {
        self.base
            .join(path)
            .expect("relative storage paths always join")
    }

    fn authorized(&self, req: reqwest::RequestBuilder) -> reqwest::RequestBuilder {
        let req = req.header("apikey", self.key.expose());
        if self.key.is_jwt() {
            req.bearer_auth(self.key.expose())
        } else {
            req
        }
    }

    /// `DELETE /object/{bucket}` with `{"prefixes": names}` (at most 1000 names); see
    /// [`StorageClient::bulk_delete_raw`].
    pub async fn bulk_delete(
        &self,
        bucket: &str,
        names: &[String],
    ) -> Result<Deleted, StorageError> {
        self.scrub(self.bulk_delete_raw(bucket, names).await)
    }

    /// Whether storage answers a plain read; see [`StorageClient::answers_raw`].
    pub async fn answers(&self, bucket: &str) -> Result<(), StorageError> {
        self.scrub(self.answers_raw(bucket).await)
    }

    /// Whether an object exists; see [`StorageClient::exists_raw`].
    pub async fn exists(&self, bucket: &str, name: &str) -> Result<bool, StorageError> {
        self.scrub(self.exists_raw(bucket, name).await)
    }

    /// Uploads (upserts) a small object; see [`StorageClient::upload_raw`].
    pub async fn upload(
        &self,
        bucket: &str,
        path: &str,
        bytes: Vec<u8>,
        content_type: &str,
    ) -> Result<(), StorageError> {
        self.scrub(self.upload_raw(bucket, path, bytes, content_type).await)
    }

    /// The names of the objects (not folders) directly in `folder` (ending in `/`), up to 1000.
    pub async fn list_folder(
        &self,
        bucket: &str,
        folder: &str,
    ) -> Result<Vec<String>, StorageError> {
        self.scrub(self.list_folder_raw(bucket, folder).await)
    }

    async fn list_folder_raw(
        &self,
        bucket: &str,
        folder: &str,
    ) -> Result<Vec<String>, StorageError> {
        Ok(self
            .list_page_raw(bucket, folder, 1000, 0)
            .await?
            .iter()
            .filter(|o| !o.get("id").is_none_or(Value::is_null))
            .filter_map(|o| o.get("name").and_then(Value::as_str).map(str::to_string))
            .collect())
    }

    /// One page of `POST /object/list/{bucket}`: the entries directly under `prefix` (a folder
    /// ending in `/`, or empty for the bucket's root), sorted by name, `limit` of them from
    /// `offset`. Folders come back with `id: null`; names are relative to the prefix.
    pub async fn list_page(
        &self,
        bucket: &str,
        prefix: &str,
        limit: usize,
        offset: usize,
    ) -> Result<Vec<Value>, StorageError> {
        self.scrub(self.list_page_raw(bucket, prefix, limit, offset).await)
    }

    async fn list_page_raw(
        &self,
        bucket: &str,
        prefix: &str,
        limit: usize,
        offset: usize,
    ) -> Result<Vec<Value>, StorageError> {
        let url = self.url(&format!("object/list/{}", encode_segment(bucket)));
        let req = self
            .authorized(self.http.post(url))
            .json(&serde_json::json!({
                "prefix": prefix, "limit": limit, "offset": offset,
                "sortBy": {"column": "name", "order": "asc"},
            }));
        let response = send(req).await?;
        let http = response.status().as_u16();
        let body = self.cleaned(read_capped(response).await?);
        if http != 200 {
            return Err(classify(http, &body));
        }
        json_array(&body)
    }

    /// A body with the key cut out, before any of it is cut short into a message.
    fn cleaned(&self, body: Vec<u8>) -> Vec<u8> {
        let key = self.key.expose().as_bytes();
        if key.is_empty() || body.len() < key.len() || !body.windows(key.len()).any(|w| w == key) {
            return body;
        }
        String::from_utf8_lossy(&body)
            .replace(self.key.expose(), "<the key, redacted>")
            .into_bytes()
    }

    /// Whatever an upstream says goes into logs and the audit log: if it echoes the key (a
    /// proxy's debug page, a reflected header), the key is cut out first.
    fn scrub<T>(&self, result: Result<T, StorageError>) -> Result<T, StorageError> {
        result.map_err(|e| e.without(self.key.expose()))
    }

    /// `DELETE /object/{bucket}` with `{"prefixes": names}` (at most 1000 names).
    async fn bulk_delete_raw(
        &self,
        bucket: &str,
        names: &[String],
    ) -> Result<Deleted, StorageError> {
        debug_assert!(!names.is_empty() && names.len() <= 1000);
        let url = self.url(&format!("object/{}", encode_segment(bucket)));
        let req = self
            .authorized(self.http.delete(url))
            .json(&serde_json::json!({ "prefixes": names }));
        let response = send(req).await?;
        let http = response.status().as_u16();
        let body = self.cleaned(read_capped(response).await?);
        if http == 200 {
            let items: Vec<Value> = json_array(&body)?;
            return deleted_objects(bucket, names, &items);
        }
        Err(classify(http, &body))
    }

    /// Whether storage itself answers: `POST /object/list/{bucket}` for one object, a read with no
    /// effect that goes through the same gateway, server and database as a delete. Asked when
    /// every delete of a batch failed, to tell an outage (the rows are not at fault: no attempt
    /// counted) from requests that fail because of what they carry.
    async fn answers_raw(&self, bucket: &str) -> Result<(), StorageError> {
        let url = self.url(&format!("object/list/{}", encode_segment(bucket)));
        let req = self
            .authorized(self.http.post(url))
            .json(&serde_json::json!({ "prefix": "", "limit": 1, "offset": 0 }));
        let response = send(req).await?;
        let http = response.status().as_u16();
        let body = self.cleaned(read_capped(response).await?);
        if http == 200 {
            json_array(&body).map(|_| ())
        } else {
            Err(classify(http, &body))
        }
    }

    /// Whether `name` exists in `bucket`, as `GET /object/info/authenticated/{bucket}/{name}`
    /// says: 200 with the object's info, or the server's 400 with `statusCode` 404 (`NoSuchKey`,
    /// or `NoSuchBucket`: a bucket must be empty to be deleted). Row-level security answers the
    /// same 404 for an object the key may not see: only a key shown to see objects (the
    /// reaper's canary, [`crate::reaper`]) makes a "no" mean absent.
    async fn exists_raw(&self, bucket: &str, name: &str) -> Result<bool, StorageError> {
        let url = self.url(&format!(
            "object/info/authenticated/{}/{}",
            encode_segment(bucket),
            encode_path(name)
        ));
        let response = send(self.authorized(self.http.get(url))).await?;
        let http = response.status().as_u16();
        let body = self.cleaned(read_capped(response).await?);
        if http == 200 {
            let info: Value = serde_json::from_slice(&body).map_err(|e| {
                StorageError::Retryable(format!("HTTP 200 with object info that is not JSON ({e})"))
            })?;
            if info.get("name").and_then(Value::as_str) != Some(name) {
                return Err(StorageError::Config {
                    http,
                    status: "200".into(),
                    code: "UnverifiableAnswer".into(),
                    message: format!(
                        "the info of {bucket}/{name} names another object, so the answer cannot be believed; \
                         is SUPABASE_URL this project's storage itself (no proxy or cache answering for it)?"
                    ),
                });
            }
            return Ok(true);
        }
        let e = classify(http, &body);
        match &e {
            StorageError::Config { status, code, .. }
                if status == "404" && matches!(code.as_str(), "NoSuchKey" | "NoSuchBucket") =>
            {
                Ok(false)
            }
            _ => Err(e),
        }
    }

    /// `POST /object/{bucket}/{path}` (upsert): the probe's tiny object.
    async fn upload_raw(
        &self,
        bucket: &str,
        path: &str,
        bytes: Vec<u8>,
        content_type: &str,
    ) -> Result<(), StorageError> {
        let url = self.url(&format!(
            "object/{}/{}",
            encode_segment(bucket),
            encode_path(path)
        ));
        let req = self
            .authorized(self.http.post(url))
            .header("x-upsert", "true")
            .header("content-type", content_type)
            .body(bytes);
        let response = send(req).await?;
        let http = response.status().as_u16();
        let body = self.cleaned(read_capped(response).await?);
        if http == 200 {
            Ok(())
        } else {
            Err(classify(http, &body))
        }
    }
}

/// The most of an answer the reaper reads: a bulk delete of 1000 names answers about 600 KB. A
/// broken upstream (an endless error page, a stream that never ends) must not exhaust memory.
pub const MAX_BODY: usize = 8 << 20;

/// Reads a response body, refusing one longer than [`MAX_BODY`] as an unusable answer.
async fn read_capped(mut response: reqwest::Response) -> Result<Vec<u8>, StorageError> {
    if response
        .content_length()
        .is_some_and(|n| n > MAX_BODY as u64)
    {
        return Err(too_long());
    }
    let mut body = Vec::new();
    while let Some(chunk) = response.chunk().await.map_err(transport)? {
        if body.len() + chunk.len() > MAX_BODY {
            return Err(too_long());
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body)
}

fn too_long() -> StorageError {
    StorageError::Retryable(format!(
        "the answer is longer than {} MiB, which no storage answer is; not read",
        MAX_BODY >> 20
    ))
}

/// A `200` body that must be a JSON array. Anything else (a CDN's HTML error page, a truncated
/// body) says nothing about the rows: it is treated like a failed request.
fn json_array(body: &[u8]) -> Result<Vec<Value>, StorageError> {
    serde_json::from_slice(body).map_err(|e| {
        let start = String::from_utf8_lossy(&body[..body.len().min(80)]).into_owned();
        StorageError::Retryable(format!(
            "HTTP 200 with a body that is not a JSON array ({e}; it starts {start:?})"
        ))
    })
}

fn transport(e: reqwest::Error) -> StorageError {
    let kind = if e.is_timeout() {
        "timed out"
    } else if e.is_connect() {
        "could not connect"
    } else {
        "transport error"
    };
    // reqwest errors carry the URL, never headers: no key can leak through them.
    StorageError::Retryable(format!("{kind}: {e}"))
}

/// What a `200` answer to a bulk delete of `names` in `bucket` says was deleted, if it can be
/// believed: every item must be an object (a JSON object with a string `name`) of that bucket
/// (`bucket_id`), and one of the names sent. Any other answer (bare strings, another bucket's
/// objects, names never asked for) comes from something that is not this project's storage
/// doing the work: a proxy, a cache, another server. Believing it would confirm every name it
/// leaves out as already absent, deleting job rows whose files stay in storage for good. It is
/// a configuration error instead, and the rows go back.
fn deleted_objects(
    bucket: &str,
    names: &[String],
    items: &[Value],
) -> Result<Deleted, StorageError> {
    let unverifiable = |i: usize, why: String| {
        StorageError::Config {
        http: 200,
        status: "200".into(),
        code: "UnverifiableAnswer".into(),
        message: format!(
            "item {i} of the answer {why}, so the answer cannot be believed and nothing is confirmed; \
             is SUPABASE_URL this project's storage itself (no proxy or cache answering for it)?"
        ),
    }
    };
    let sent: std::collections::HashSet<&str> = names.iter().map(String::as_str).collect();
    let mut deleted = Deleted::default();
    for (i, item) in items.iter().enumerate() {
        let Some(name) = item.get("name").and_then(Value::as_str) else {
            return Err(unverifiable(i, "is not an object with a name".into()));
        };
        match item.get("bucket_id").and_then(Value::as_str) {
            Some(b) if b == bucket => {}
            Some(b) => {
                return Err(unverifiable(
                    i,
                    format!("is an object of bucket {b:?}, not {bucket:?}"),
                ))
            }
            None => return Err(unverifiable(i, "names no bucket_id".into())),
        }
        if !sent.contains(name) {
            return Err(unverifiable(
                i,
                format!("names {name:?}, which was not asked for"),
            ));
        }
        let size = item.pointer("/metadata/size").and_then(Value::as_u64);
        deleted.names.insert(name.to_string(), size);
    }
    Ok(deleted)
}

/// Sends a request, refusing a redirect as an answer (the client follows none).
async fn send(req: reqwest::RequestBuilder) -> Result<reqwest::Response, StorageError> {
    let response = req.send().await.map_err(transport)?;
    if response.status().is_redirection() {
        return Err(redirected(response.status().as_u16(), response.headers()));
    }
    Ok(response)
}

/// A redirect is never followed: it would carry the key and the delete to wherever it points.
/// It says the reaper's SUPABASE_URL is not the storage server itself (a proxy in between, a
/// moved project, a host someone else controls), which no retry can fix.
fn redirected(http: u16, headers: &reqwest::header::HeaderMap) -> StorageError {
    let location = headers
        .get(reqwest::header::LOCATION)
        .and_then(|v| v.to_str().ok())
        .map(object_url::redact)
        .unwrap_or_else(|| "nowhere (no Location header)".into());
    StorageError::Config {
        http,
        status: http.to_string(),
        code: "Redirect".into(),
        message: format!(
            "storage answered with a redirect to {location}; the reaper follows no redirects (the key and the delete would go there): set SUPABASE_URL to the address that answers itself"
        ),
    }
}

/// Classifies an error response by HTTP status and by the `statusCode` string in its body.
pub fn classify(http: u16, body: &[u8]) -> StorageError {
    let parsed: Option<Value> = serde_json::from_slice(body).ok();
    let field = |k: &str| {
        parsed
            .as_ref()
            .and_then(|v| v.get(k))
            .and_then(Value::as_str)
            .map(str::to_string)
    };
    let status = field("statusCode").unwrap_or_else(|| http.to_string());
    let code = field("code").or_else(|| field("error")).unwrap_or_default();
    let message = field("message")
        .unwrap_or_else(|| String::from_utf8_lossy(&body[..body.len().min(200)]).into_owned());
    let real = status.parse::<u16>().unwrap_or(http);
    if http == 402 || real == 402 {
        return StorageError::OverQuota { http, message };
    }
    if http == 400 && status == "400" {
        if let Some(n) = bulk_limit(&message) {
            return StorageError::BulkLimit(n);
        }
    }
    // The server's own errors are JSON with a statusCode; a bare 403 or 413 page is a proxy's.
    if http == 413 || real == 413 || (http == 403 && parsed.is_none()) {
        return StorageError::Refused {
            http,
            message: if parsed.is_none() {
                format!(
                    "a proxy or web firewall answered {}",
                    message.split_whitespace().collect::<Vec<_>>().join(" ")
                )
            } else {
                message
            },
        };
    }
    if http == 429 || http == 544 || real == 429 || real == 544 || code == "SlowDown" {
        return StorageError::Overload {
            http,
            code: if code.is_empty() {
                real.to_string()
            } else {
                code
            },
        };
    }
    if http >= 500 || real >= 500 {
        return StorageError::Retryable(format!(
            "HTTP {http} (statusCode {status}, {code}): {message}"
        ));
    }
    StorageError::Config {
        http,
        status,
        code,
        message,
    }
}

/// The limit in "Bulk object requests are limited to N objects per request."
fn bulk_limit(message: &str) -> Option<usize> {
    let rest = message.split("limited to ").nth(1)?;
    let n: usize = rest.split_whitespace().next()?.parse().ok()?;
    (rest.contains("objects") && n > 0).then_some(n)
}

/// Percent-encodes each segment of an object name, keeping its slashes.
pub fn encode_path(name: &str) -> String {
    name.split('/')
        .map(encode_segment)
        .collect::<Vec<_>>()
        .join("/")
}

/// Percent-encodes one path segment the way `encodeURIComponent` does.
pub fn encode_segment(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-_.!~*'()".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classifies_by_body_and_status() {
        let auth = br#"{"statusCode":"403","error":"Unauthorized","code":"AccessDenied","message":"signature verification failed"}"#;
        assert!(
            matches!(classify(400, auth), StorageError::Config { ref status, .. } if status == "403")
        );
        let missing = br#"{"statusCode":"400","error":"Error","code":"InvalidRequest","message":"headers must have required property 'authorization'"}"#;
        assert!(matches!(
            classify(400, missing),
            StorageError::Config { .. }
        ));
        assert!(matches!(classify(404, br#"{"statusCode":"404","code":"InvalidRequest","message":"Route DELETE:/x not found"}"#), StorageError::Config { .. }));
        assert!(
            matches!(classify(401, b"Unauthorized"), StorageError::Config { .. }),
            "a gateway's 401"
        );
        assert!(matches!(
            classify(429, br#"{"statusCode":"429","code":"SlowDown"}"#),
            StorageError::Overload { .. }
        ));
        // A 200 answer is believed only when every item is an object of the bucket, asked for.
        let names = vec!["a.png".to_string(), "b.png".to_string()];
        let ok = deleted_objects("renders", &names, &[serde_json::json!({"name": "a.png", "bucket_id": "renders", "metadata": {"size": 3}})]).unwrap();
        assert_eq!(ok.names.get("a.png"), Some(&Some(3)));
        for bad in [
            serde_json::json!("a.png"),
            serde_json::json!({"name": "a.png"}),
            serde_json::json!({"name": "a.png", "bucket_id": "other"}),
            serde_json::json!({"name": "c.png", "bucket_id": "renders"}),
        ] {
            let e = deleted_objects("renders", &names, std::slice::from_ref(&bad)).unwrap_err();
            assert!(
                matches!(e, StorageError::Config { http: 200, .. }),
                "{bad}: {e:?}"
            );
            assert!(
                !e.deleted_nothing(),
                "an answer we cannot believe proves nothing"
            );
        }
        // Only a refused key or a refused body proves that nothing was deleted.
        let refused_key = classify(400, br#"{"statusCode":"403","error":"Unauthorized","code":"AccessDenied","message":"invalid signature"}"#);
        assert!(refused_key.deleted_nothing(), "{refused_key:?}");
        assert!(classify(413, b"Request Entity Too Large").deleted_nothing());
        assert!(matches!(
            classify(413, b"<html>413</html>"),
            StorageError::Refused { .. }
        ));
        assert!(matches!(
            classify(403, b"<html>403 Forbidden</html>"),
            StorageError::Refused { .. }
        ));
        assert!(matches!(
            classify(
                403,
                br#"{"statusCode":"403","code":"AccessDenied","message":"x"}"#
            ),
            StorageError::Config { .. }
        ));
        assert_eq!(classify(400, br#"{"statusCode":"400","error":"InvalidRequest","code":"InvalidRequest","message":"Bulk object requests are limited to 250 objects per request."}"#), StorageError::BulkLimit(250));
        assert!(matches!(
            classify(402, br#"{"statusCode":"402","message":"over quota"}"#),
            StorageError::OverQuota { .. }
        ));
        assert!(!classify(402, b"").deleted_nothing());
        for (http, body) in [
            (
                400,
                &br#"{"statusCode":"400","code":"InvalidRequest","message":"x"}"#[..],
            ),
            (400, br#"{"statusCode":"544","code":"DatabaseTimeout"}"#),
            (429, br#"{"statusCode":"429","code":"SlowDown"}"#),
            (500, br#"{"statusCode":"500","code":"InternalError"}"#),
        ] {
            let e = classify(http, body);
            assert!(
                !e.deleted_nothing(),
                "{e:?} may come after part of a request was done"
            );
        }
        assert!(matches!(
            classify(544, br#"{"statusCode":"544","code":"DatabaseTimeout"}"#),
            StorageError::Overload { .. }
        ));
        assert!(matches!(
            classify(500, br#"{"statusCode":"500","code":"InternalError"}"#),
            StorageError::Retryable(_)
        ));
        assert!(matches!(
            classify(502, b"<html>bad gateway</html>"),
            StorageError::Retryable(_)
        ));
    }

    #[test]
    fn a_key_echoed_across_the_cut_of_a_message_leaves_no_part_of_it() {
        let key = "sb_secret_abcdefghijklmnopqrstuvwxyz0123456789";
        let client = StorageClient::new(
            url::Url::parse("http://127.0.0.1:1/storage/v1/").unwrap(),
            ServiceKey::new(key.to_string()),
            Duration::from_secs(1),
        );
        let body = format!("<html>{}{key}{}</html>", "x".repeat(180), "y".repeat(100));
        let e = classify(502, &client.cleaned(body.into_bytes()));
        assert!(!e.to_string().contains("sb_secret_abc"), "{e}");
    }

    #[test]
    fn an_upstream_that_echoes_the_key_has_it_cut_out() {
        let key = "sb_secret_abcdefghijklmnop";
        let e = classify(
            400,
            format!(r#"{{"statusCode":"403","message":"bad apikey {key}"}}"#).as_bytes(),
        );
        let e = e.without(key);
        assert!(!format!("{e} {e:?}").contains(key), "{e:?}");
        assert!(e.to_string().contains("<the key, redacted>"));
    }

    #[test]
    fn encodes_segments_like_encode_uri_component() {
        assert_eq!(encode_segment("a b/c?.png"), "a%20b%2Fc%3F.png");
        assert_eq!(encode_segment("renders"), "renders");
    }
}
