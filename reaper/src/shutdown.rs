//! SIGTERM and Ctrl-C cancel one token. The drain loop stops claiming, lets the requests in
//! flight finish, confirms them, releases the rest and returns; the process then exits 0.

use tokio_util::sync::CancellationToken;

pub fn on_signals() -> CancellationToken {
    let token = CancellationToken::new();
    let t = token.clone();
    tokio::spawn(async move {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("SIGTERM handler");
        tokio::select! {
            _ = tokio::signal::ctrl_c() => tracing::info!("Ctrl-C: finishing the requests in flight, then stopping"),
            _ = term.recv() => tracing::info!("SIGTERM: finishing the requests in flight, then stopping"),
        }
        t.cancel();
    });
    token
}
