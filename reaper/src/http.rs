//! `/metrics`, `/livez` (the drain loop makes progress) and `/readyz` (database and storage reachable,
//! credentials accepted, and whether --max-deletes-per-hour holds deletes back), for
//! `reaper run --metrics-addr`.

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;

use crate::reaper::Reaper;

pub async fn serve(addr: SocketAddr, reaper: Arc<Reaper>) -> std::io::Result<()> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    tracing::info!(addr = %listener.local_addr()?, "serving /metrics, /livez, /readyz");
    let shutdown = reaper.shutdown.clone();
    let app = Router::new()
        .route("/metrics", get(metrics))
        .route("/livez", get(livez))
        .route("/readyz", get(readyz))
        .with_state(reaper);
    axum::serve(listener, app)
        .with_graceful_shutdown(async move { shutdown.cancelled().await })
        .await
}

async fn metrics(State(reaper): State<Arc<Reaper>>) -> impl IntoResponse {
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        reaper.metrics.encode(),
    )
}

/// Alive while the drain loop makes progress: each of its steps is bounded, and one that runs
/// far past its bound is stuck where no timeout reaches (restart the process).
async fn livez(State(reaper): State<Arc<Reaper>>) -> impl IntoResponse {
    match reaper.live.stuck(std::time::Instant::now()) {
        None => (StatusCode::OK, "ok\n".to_string()),
        Some(why) => (StatusCode::SERVICE_UNAVAILABLE, format!("stuck: {why}\n")),
    }
}

async fn readyz(State(reaper): State<Arc<Reaper>>) -> impl IntoResponse {
    let db = reaper.db_ok.load(Ordering::SeqCst);
    let storage = reaper.storage_ok.load(Ordering::SeqCst);
    let db_error = reaper.db_error.lock().unwrap().clone();
    let mut body = format!(
        "database: {}\nstorage: {}\n",
        match (db, db_error) {
            (true, _) => "ok".to_string(),
            (false, Some(e)) => format!("unreachable: {e}"),
            (false, None) => "not connected yet".to_string(),
        },
        if storage {
            "ok"
        } else if reaper.metrics.storage_unreachable.get() > 0 {
            "unreachable (an outage: rows wait with no attempt counted)"
        } else {
            "not verified or refusing the key"
        }
    );
    // Held back is not unready: the reaper works, it has only used up its hourly budget.
    if reaper.metrics.held_back.get() > 0 {
        if let Some(max) = reaper.settings.max_deletes_per_hour {
            body.push_str(&format!(
                "deletes: HELD BACK: --max-deletes-per-hour {max} reached; resumes as the hour slides\n"
            ));
        }
    }
    (
        if db && storage {
            StatusCode::OK
        } else {
            StatusCode::SERVICE_UNAVAILABLE
        },
        body,
    )
}
