//! SIGTERM and Ctrl-C cancel one token. The drain loop stops claiming, lets the requests in
//! flight finish, confirms them, releases the rest and returns; the process then exits 0. Every
//! call it waits on is bounded (--request-timeout, --db-timeout), so that takes at most their
//! sum. A second SIGTERM or Ctrl-C exits at once: what this reaper holds then comes back when
//! its lease ends, as after a crash.

use tokio::signal::unix::{signal, SignalKind};
use tokio_util::sync::CancellationToken;

/// The exit status after a second signal: 128 + SIGTERM, as a shell reports a killed process.
pub const HARD_EXIT: i32 = 143;

pub fn on_signals() -> CancellationToken {
    let token = CancellationToken::new();
    let t = token.clone();
    tokio::spawn(async move {
        let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
        let mut int = signal(SignalKind::interrupt()).expect("SIGINT handler");
        tokio::select! {
            _ = int.recv() => tracing::info!("Ctrl-C: finishing the requests in flight, then stopping (again to exit at once)"),
            _ = term.recv() => tracing::info!("SIGTERM: finishing the requests in flight, then stopping (again to exit at once)"),
        }
        t.cancel();
        tokio::select! {
            _ = int.recv() => {}
            _ = term.recv() => {}
        }
        tracing::warn!(
            "second signal: exiting at once; the rows this reaper holds come back when their lease ends"
        );
        std::process::exit(HARD_EXIT);
    });
    token
}
