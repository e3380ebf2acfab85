//! A local Supabase Storage server for the tests, the demo and the benchmarks.
//!
//! It serves the routes pg_orphan_cleanup uses, under the gateway prefix `/storage/v1`, over files
//! on disk, and answers exactly as the real server does (see `shared/notes/supabase-storage-api.md`):
//! errors are HTTP 400 with the real status as a string in the body, a bulk delete answers
//! `200` with the objects it deleted and leaves unknown names out, an anon key deletes nothing,
//! more than 1000 names are refused. On top of that: fault injection, and a request log, both
//! under `/__emulator/` for tests.

pub mod auth;
pub mod catalog;
pub mod error;
pub mod faults;
pub mod gate;
pub mod store;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use axum::body::Bytes;
use axum::extract::{Path, Query, Request, State};
use axum::http::{HeaderMap, Method, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post, put};
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use crate::auth::{authorize, Role};
use crate::catalog::Catalog;
use crate::error::ApiError;
use crate::faults::{FaultState, Faults, Verdict};
use crate::gate::{Gate, GateSetting, GateState};
use crate::store::{valid_bucket, valid_key, Store, StoreError};

/// How many names one bulk request may carry (hosted projects enforce it).
pub const BULK_LIMIT: usize = 1000;
/// The JSON body limit of the real server.
pub const JSON_BODY_LIMIT: usize = 1024 * 1024;
/// Request log entries kept (oldest dropped first).
const LOG_CAPACITY: usize = 200_000;

pub struct Emulator {
    pub store: Store,
    pub jwt_secret: String,
    /// Opaque API keys the gateway maps to a role (`sb_secret_...` keys: service role,
    /// `sb_publishable_...` keys: anon). They travel in `apikey` only.
    pub opaque_keys: HashMap<String, Role>,
    /// Refuse more than [`BULK_LIMIT`] names, as hosted projects do.
    pub hard_limits: bool,
    pub faults: FaultState,
    /// Holds bulk deletes past a count, for tests that act mid-drain.
    pub gate: Gate,
    /// `storage.objects` in a database (`--database-url`), kept as the real server keeps it.
    /// Held across each change to the store and its rows, so they change in the same order.
    pub catalog: Option<tokio::sync::Mutex<Catalog>>,
    log: Mutex<Vec<LogEntry>>,
}

/// One storage request as the emulator saw it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LogEntry {
    pub method: String,
    pub path: String,
    pub status: u16,
    /// Names in a bulk delete body.
    pub names: usize,
    /// Objects the request deleted.
    pub deleted: usize,
    /// Their names, `bucket/key`: what a checker needs to tell which object went when.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub deleted_names: Vec<String>,
    pub unix_ms: u128,
}

/// A handler's word that its request was carried out and its answer must be lost.
#[derive(Clone, Copy)]
struct LoseAnswer;

/// What a handler adds to its request's log entry.
#[derive(Clone, Default)]
struct LogExtra {
    names: usize,
    deleted: usize,
    deleted_names: Vec<String>,
}

impl Emulator {
    pub fn with_opaque_keys(
        store: Store,
        jwt_secret: String,
        hard_limits: bool,
        faults: Faults,
        opaque_keys: HashMap<String, Role>,
    ) -> Arc<Emulator> {
        Emulator::with_catalog(store, jwt_secret, hard_limits, faults, opaque_keys, None)
    }

    /// Like [`Emulator::with_opaque_keys`], keeping `storage.objects` through `catalog`.
    pub fn with_catalog(
        store: Store,
        jwt_secret: String,
        hard_limits: bool,
        faults: Faults,
        opaque_keys: HashMap<String, Role>,
        catalog: Option<Catalog>,
    ) -> Arc<Emulator> {
        Arc::new(Emulator {
            store,
            jwt_secret,
            opaque_keys,
            hard_limits,
            faults: FaultState::new(faults),
            gate: Gate::default(),
            catalog: catalog.map(tokio::sync::Mutex::new),
            log: Mutex::new(Vec::new()),
        })
    }

    /// The catalog, locked, when there is one.
    async fn catalog(&self) -> Option<tokio::sync::MutexGuard<'_, Catalog>> {
        match &self.catalog {
            Some(c) => Some(c.lock().await),
            None => None,
        }
    }

    fn role(&self, headers: &HeaderMap) -> Result<Role, ApiError> {
        let authorization = headers.get("authorization").and_then(|v| v.to_str().ok());
        if authorization.is_none() {
            // What the gateway does with an opaque key: it turns it into the role's token.
            if let Some(role) = headers
                .get("apikey")
                .and_then(|v| v.to_str().ok())
                .and_then(|k| self.opaque_keys.get(k))
            {
                return Ok(*role);
            }
        }
        authorize(authorization, &self.jwt_secret)
    }
}

pub fn router(emu: Arc<Emulator>) -> Router {
    let storage = Router::new()
        .route("/storage/v1/bucket", post(create_bucket))
        .route("/storage/v1/object/list/{bucket}", post(list_objects))
        .route(
            "/storage/v1/object/info/authenticated/{bucket}/{*path}",
            get(object_info),
        )
        .route("/storage/v1/object/info/{bucket}/{*path}", get(object_info))
        .route("/storage/v1/object/{bucket}", delete(bulk_delete))
        .route(
            "/storage/v1/object/{bucket}/{*path}",
            post(upload).delete(single_delete),
        )
        .layer(middleware::from_fn_with_state(emu.clone(), faults_and_log));
    let admin = Router::new()
        .route("/__emulator/requests", get(get_log).delete(clear_log))
        .route("/__emulator/faults", get(get_faults).put(put_faults))
        .route("/__emulator/gate", get(get_gate).put(put_gate))
        .route("/__emulator/objects", get(all_objects))
        .route("/__emulator/objects.tsv", get(all_objects_tsv))
        .route("/__emulator/objects/created_at", put(set_created_at))
        .route("/__emulator/health", get(|| async { "ok" }));
    storage
        .merge(admin)
        .fallback(unknown_route)
        .layer(axum::extract::DefaultBodyLimit::max(64 * 1024 * 1024))
        .with_state(emu)
}

async fn faults_and_log(State(emu): State<Arc<Emulator>>, req: Request, next: Next) -> Response {
    let method = req.method().to_string();
    let path = req.uri().path().to_string();
    let mut lose_response = false;
    if req.method() == Method::DELETE && is_bulk_delete(&path) {
        emu.gate.pass().await;
    }
    let (req, canned) = if req.method() == Method::DELETE && is_bulk_delete(&path) {
        canned_answer(&emu, req).await
    } else {
        (req, None)
    };
    let response = match emu.faults.judge().await {
        Verdict::Proceed if canned.is_some() => Json(canned.unwrap_or_default()).into_response(),
        Verdict::Proceed => next.run(req).await,
        Verdict::ProceedThenHang => {
            lose_response = true;
            next.run(req).await
        }
        Verdict::Fail(e) => e.into_response(),
        Verdict::Redirect(base) => (
            StatusCode::FOUND,
            [(
                axum::http::header::LOCATION,
                format!("{}{}", base.trim_end_matches('/'), path),
            )],
        )
            .into_response(),
        Verdict::Hang => {
            tokio::time::sleep(Duration::from_secs(3600)).await;
            StatusCode::GATEWAY_TIMEOUT.into_response()
        }
        Verdict::Html => (
            StatusCode::OK,
            [(axum::http::header::CONTENT_TYPE, "text/html")],
            "<!DOCTYPE html><html><head><title>Origin unreachable</title></head><body><h1>Error 523</h1><p>The origin is unreachable.</p></body></html>\n",
        )
            .into_response(),
    };
    lose_response |= response.extensions().get::<LoseAnswer>().is_some();
    let extra = response
        .extensions()
        .get::<LogExtra>()
        .cloned()
        .unwrap_or_default();
    let entry = LogEntry {
        method,
        path,
        status: response.status().as_u16(),
        names: extra.names,
        deleted: extra.deleted,
        deleted_names: extra.deleted_names,
        unix_ms: SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map(|d| d.as_millis())
            .unwrap_or(0),
    };
    {
        let mut log = emu.log.lock().unwrap();
        if log.len() >= LOG_CAPACITY {
            log.remove(0);
        }
        log.push(entry);
    }
    if lose_response {
        // The work is done and logged; the client never hears of it.
        tokio::time::sleep(Duration::from_secs(3600)).await;
        return StatusCode::GATEWAY_TIMEOUT.into_response();
    }
    response
}

/// The canned answer a bulk delete gets (`faults.bulk_answer`), if any: for every bulk delete,
/// or, with `faults.bulk_answer_names`, only for one that carries a name containing that text
/// (the body is read to decide, and handed on).
async fn canned_answer(emu: &Emulator, req: Request) -> (Request, Option<Value>) {
    let faults = emu.faults.get();
    let Some(answer) = faults.bulk_answer else {
        return (req, None);
    };
    let Some(pattern) = faults.bulk_answer_names else {
        return (req, Some(answer));
    };
    let (parts, body) = req.into_parts();
    let bytes = axum::body::to_bytes(body, JSON_BODY_LIMIT * 2)
        .await
        .unwrap_or_default();
    let matches = serde_json::from_slice::<Value>(&bytes)
        .ok()
        .and_then(|v| v.get("prefixes").cloned())
        .and_then(|p| p.as_array().cloned())
        .is_some_and(|names| {
            names
                .iter()
                .any(|n| n.as_str().is_some_and(|n| n.contains(pattern.as_str())))
        });
    let req = Request::from_parts(parts, axum::body::Body::from(bytes));
    (req, matches.then_some(answer))
}

/// `/storage/v1/object/{bucket}`: one segment after `object/`.
fn is_bulk_delete(path: &str) -> bool {
    path.strip_prefix("/storage/v1/object/")
        .is_some_and(|rest| !rest.is_empty() && !rest.contains('/'))
}

async fn get_gate(State(emu): State<Arc<Emulator>>) -> Json<GateState> {
    Json(emu.gate.state())
}

async fn put_gate(
    State(emu): State<Arc<Emulator>>,
    Json(setting): Json<GateSetting>,
) -> Json<GateState> {
    Json(emu.gate.set(setting))
}

async fn unknown_route(method: Method, uri: axum::http::Uri) -> ApiError {
    ApiError::new(
        404,
        "404",
        "Not Found",
        "InvalidRequest",
        &format!("Route {method}:{} not found", uri.path()),
    )
}

#[derive(Deserialize)]
struct NewBucket {
    name: Option<String>,
    id: Option<String>,
    #[serde(default)]
    public: bool,
}

async fn create_bucket(
    State(emu): State<Arc<Emulator>>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Json<Value>, ApiError> {
    if emu.role(&headers)? != Role::Service {
        return Err(rls_denied());
    }
    let b: NewBucket = serde_json::from_slice(&body)
        .map_err(|e| invalid(&format!("body is not valid JSON: {e}")))?;
    let name = b
        .name
        .or(b.id)
        .ok_or_else(|| invalid("body must have required property 'name'"))?;
    if !valid_bucket(&name) {
        return Err(ApiError::new(
            400,
            "400",
            "Invalid Input",
            "InvalidBucketName",
            &format!("Bucket name invalid: {name}"),
        ));
    }
    let catalog = emu.catalog().await;
    match emu.store.create_bucket(&name, b.public) {
        Ok(()) => {
            if let Some(c) = &catalog {
                c.bucket(&name, b.public).await.map_err(internal)?;
            }
            Ok(Json(json!({"name": name})))
        }
        Err(StoreError::Exists) => Err(ApiError::new(
            400,
            "409",
            "Duplicate",
            "BucketAlreadyExists",
            "The resource already exists",
        )),
        Err(e) => Err(internal(e)),
    }
}

async fn upload(
    State(emu): State<Arc<Emulator>>,
    Path((bucket, key)): Path<(String, String)>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Json<Value>, ApiError> {
    if emu.role(&headers)? != Role::Service {
        return Err(rls_denied());
    }
    if !valid_key(&key) {
        return Err(ApiError::new(
            400,
            "400",
            "Invalid Input",
            "InvalidKey",
            &format!("Invalid key: {key}"),
        ));
    }
    let upsert = headers.get("x-upsert").and_then(|v| v.to_str().ok()) == Some("true");
    let mimetype = headers
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("application/octet-stream");
    let catalog = emu.catalog().await;
    match emu.store.put(&bucket, &key, &body, mimetype, upsert) {
        Ok(id) => {
            if let (Some(c), Some(meta)) = (&catalog, emu.store.get(&bucket, &key)) {
                c.put(&bucket, &key, &meta).await.map_err(internal)?;
            }
            Ok(Json(json!({"Key": format!("{bucket}/{key}"), "Id": id})))
        }
        Err(StoreError::NoSuchBucket) => Err(ApiError::new(
            400,
            "404",
            "Bucket not found",
            "NoSuchBucket",
            "Bucket not found",
        )),
        Err(StoreError::Exists) => Err(ApiError::new(
            400,
            "409",
            "Duplicate",
            "KeyAlreadyExists",
            "The resource already exists",
        )),
        Err(e) => Err(internal(e)),
    }
}

async fn bulk_delete(
    State(emu): State<Arc<Emulator>>,
    Path(bucket): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    let role = emu.role(&headers)?;
    if body.len() > JSON_BODY_LIMIT {
        return Err(ApiError::new(
            413,
            "413",
            "Payload Too Large",
            "EntityTooLarge",
            "Request body is too large",
        ));
    }
    let value: Value = serde_json::from_slice(&body)
        .map_err(|e| invalid(&format!("body is not valid JSON: {e}")))?;
    let names: Vec<String> = match value.get("prefixes") {
        None => return Err(invalid("body must have required property 'prefixes'")),
        Some(Value::Array(items)) => items
            .iter()
            .map(|v| {
                v.as_str()
                    .map(str::to_string)
                    .ok_or_else(|| invalid("body/prefixes/0 must be string"))
            })
            .collect::<Result<_, _>>()?,
        Some(_) => return Err(invalid("body/prefixes must be array")),
    };
    if names.is_empty() {
        return Err(invalid("body/prefixes must NOT have fewer than 1 items"));
    }
    let faults = emu.faults.get();
    if faults.over_quota {
        // The body's exact wording is not confirmed against the hosted platform; the reaper
        // reads the 402 from the HTTP status or the body's statusCode.
        return Err(ApiError::new(
            402,
            "402",
            "Payment Required",
            "QuotaExceeded",
            "The project has exceeded its storage quota",
        ));
    }
    if let Some(limit) = faults.bulk_limit.filter(|l| names.len() > *l) {
        return Err(ApiError::new(
            400,
            "400",
            "InvalidRequest",
            "InvalidRequest",
            &format!("Bulk object requests are limited to {limit} objects per request."),
        ));
    }
    let lose = match emu.faults.rejects(&names) {
        Some(faults::Rejection::Refuse(http)) => {
            tracing::debug!(http, "refusing a bulk delete that carries a rejected name");
            return Ok(rejected(http));
        }
        Some(faults::Rejection::Lose) => true,
        None => false,
    };
    if emu.hard_limits && names.len() > BULK_LIMIT {
        return Err(ApiError::new(
            400,
            "400",
            "InvalidRequest",
            "InvalidRequest",
            "Bulk object requests are limited to 1000 objects per request.",
        ));
    }
    // Row-level security hides every row from a non-service key: nothing to delete, no error.
    let catalog = emu.catalog().await;
    let deleted = if role == Role::Service {
        emu.store.delete_many(&bucket, &names)
    } else {
        Vec::new()
    };
    if let Some(c) = &catalog {
        let gone: Vec<String> = deleted.iter().map(|(name, _)| name.clone()).collect();
        c.delete(&bucket, &gone).await.map_err(internal)?;
    }
    drop(catalog);
    let body: Vec<Value> = deleted
        .iter()
        .map(|(name, meta)| meta.to_json(&bucket, name))
        .collect();
    let mut response = Json(body).into_response();
    if lose {
        response.extensions_mut().insert(LoseAnswer);
    }
    response.extensions_mut().insert(LogExtra {
        names: names.len(),
        deleted: deleted.len(),
        deleted_names: deleted
            .iter()
            .map(|(name, _)| format!("{bucket}/{name}"))
            .collect(),
    });
    Ok(response)
}

async fn single_delete(
    State(emu): State<Arc<Emulator>>,
    Path((bucket, key)): Path<(String, String)>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let role = emu.role(&headers)?;
    let catalog = emu.catalog().await;
    let deleted = if role == Role::Service {
        emu.store.delete_many(&bucket, std::slice::from_ref(&key))
    } else {
        Vec::new()
    };
    if let Some(c) = &catalog {
        let gone: Vec<String> = deleted.iter().map(|(name, _)| name.clone()).collect();
        c.delete(&bucket, &gone).await.map_err(internal)?;
    }
    drop(catalog);
    if deleted.is_empty() {
        return Err(ApiError::new(
            400,
            "404",
            "not_found",
            "NoSuchKey",
            "Object not found",
        ));
    }
    let mut response = Json(json!({"message": "Successfully deleted"})).into_response();
    response.extensions_mut().insert(LogExtra {
        names: 1,
        deleted: 1,
        deleted_names: vec![format!("{bucket}/{key}")],
    });
    Ok(response)
}

/// `GET /object/info/authenticated/{bucket}/{path}` (and `/object/info/{bucket}/{path}`): the
/// object's info, as the server's InfoRenderer gives it. A missing bucket or object is the
/// server's 400 with `statusCode` 404. Row-level security hides the objects of a private bucket
/// from a key that is not the service role, exactly as if they were absent; a public bucket's
/// objects are visible to any key.
async fn object_info(
    State(emu): State<Arc<Emulator>>,
    Path((bucket, key)): Path<(String, String)>,
    headers: HeaderMap,
) -> Result<Json<Value>, ApiError> {
    let role = emu.role(&headers)?;
    let Some(public) = emu.store.is_public(&bucket) else {
        return Err(ApiError::new(
            400,
            "404",
            "Bucket not found",
            "NoSuchBucket",
            "Bucket not found",
        ));
    };
    let meta = emu
        .store
        .get(&bucket, &key)
        .filter(|_| public || role == Role::Service)
        .ok_or_else(|| ApiError::new(400, "404", "not_found", "NoSuchKey", "Object not found"))?;
    Ok(Json(json!({
        "id": meta.id,
        "name": key,
        "version": uuid::Uuid::new_v4(),
        "size": meta.size,
        "content_type": meta.mimetype,
        "cache_control": "no-cache",
        "etag": format!("\"{}\"", meta.id.simple()),
        "metadata": null,
        "created_at": meta.created_at,
    })))
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct ListBody {
    prefix: String,
    limit: Option<usize>,
    offset: usize,
}

async fn list_objects(
    State(emu): State<Arc<Emulator>>,
    Path(bucket): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Json<Vec<Value>>, ApiError> {
    let role = emu.role(&headers)?;
    let b: ListBody = serde_json::from_slice(&body)
        .map_err(|e| invalid(&format!("body is not valid JSON: {e}")))?;
    let limit = b.limit.unwrap_or(100).min(1500);
    let public = emu.store.is_public(&bucket).unwrap_or(false);
    if role != Role::Service && !public {
        return Ok(Json(Vec::new()));
    }
    Ok(Json(emu.store.list(&bucket, &b.prefix, limit, b.offset)))
}

async fn get_log(State(emu): State<Arc<Emulator>>) -> Json<Vec<LogEntry>> {
    Json(emu.log.lock().unwrap().clone())
}

async fn clear_log(State(emu): State<Arc<Emulator>>) -> StatusCode {
    emu.log.lock().unwrap().clear();
    StatusCode::NO_CONTENT
}

async fn get_faults(State(emu): State<Arc<Emulator>>) -> Json<Faults> {
    Json(emu.faults.get())
}

async fn put_faults(State(emu): State<Arc<Emulator>>, Json(faults): Json<Faults>) -> Json<Faults> {
    emu.faults.set(faults.clone());
    Json(faults)
}

/// `PUT /__emulator/objects/created_at` with `{"bucket", "prefix", "created_at"}` (RFC 3339):
/// the upload time the list route gives those objects. Answers `{"changed": n}`.
async fn set_created_at(State(emu): State<Arc<Emulator>>, Json(b): Json<Value>) -> Json<Value> {
    let field = |k: &str| b.get(k).and_then(Value::as_str).unwrap_or("").to_string();
    let n = emu
        .store
        .set_created_at(&field("bucket"), &field("prefix"), &field("created_at"));
    Json(json!({ "changed": n }))
}

async fn all_objects(
    State(emu): State<Arc<Emulator>>,
    Query(q): Query<HashMap<String, String>>,
) -> Json<Vec<Value>> {
    let objects = emu.store.all_objects(q.get("bucket").map(String::as_str));
    Json(
        objects
            .into_iter()
            .map(|(bucket, key, size)| json!({"bucket": bucket, "name": key, "size": size}))
            .collect(),
    )
}

/// `bucket/key<TAB>size` lines, easy to load with `COPY`.
async fn all_objects_tsv(State(emu): State<Arc<Emulator>>) -> String {
    let mut out = String::new();
    for (bucket, key, size) in emu.store.all_objects(None) {
        out.push_str(&format!("{bucket}/{key}\t{size}\n"));
    }
    out
}

/// What row-level security answers a key that may not write.
/// The answer to a request carrying a rejected name: the server's own 500, or a proxy's page.
fn rejected(http: u16) -> Response {
    match http {
        403 | 413 => {
            let status = StatusCode::from_u16(http).unwrap_or(StatusCode::FORBIDDEN);
            let page = format!(
                "<html><head><title>{status}</title></head><body><center><h1>{status}</h1></center><hr><center>nginx</center></body></html>\n"
            );
            (
                status,
                [(axum::http::header::CONTENT_TYPE, "text/html")],
                page,
            )
                .into_response()
        }
        _ => ApiError::new(
            500,
            "500",
            "internal",
            "InternalError",
            "Internal Server Error",
        )
        .into_response(),
    }
}

fn rls_denied() -> ApiError {
    ApiError::new(
        400,
        "403",
        "Unauthorized",
        "AccessDenied",
        "new row violates row-level security policy",
    )
}

fn invalid(message: &str) -> ApiError {
    ApiError::new(400, "400", "Error", "InvalidRequest", message)
}

fn internal(e: impl std::fmt::Display) -> ApiError {
    ApiError::new(500, "500", "internal", "InternalError", &e.to_string())
}
