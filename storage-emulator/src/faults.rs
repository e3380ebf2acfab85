//! Fault injection, switchable at start (flags) and at run time (`PUT /__emulator/faults`):
//! failure rates per status, added latency and latency spikes, hanging requests, responses lost
//! after the work was done, and failing after N requests.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::RwLock;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::error::ApiError;

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(default)]
pub struct Faults {
    /// Fraction of object requests answered HTTP 500.
    pub rate_500: f64,
    /// Fraction answered HTTP 429 SlowDown (database pool exhausted).
    pub rate_429: f64,
    /// Fraction answered HTTP 544 (database timeout).
    pub rate_544: f64,
    /// Fraction that never answer (the client's timeout decides).
    pub hang_rate: f64,
    /// Fraction carried out (objects deleted) whose response never comes: what a client sees
    /// when a proxy or the network drops the answer. The retry then finds the objects gone.
    pub lost_response_rate: f64,
    /// Added to every object request.
    pub latency_ms: u64,
    /// Fraction of object requests delayed by a further `spike_ms`.
    pub spike_rate: f64,
    pub spike_ms: u64,
    /// After this many object requests, every further one fails with HTTP 500.
    pub fail_after: Option<u64>,
    /// Every object request is answered `302 Found` with this `Location` (the same path under
    /// it): what a misconfigured proxy, a moved project or a hostile middlebox does.
    pub redirect_to: Option<String>,
    /// Every bulk delete is answered `200` with this body, and nothing is deleted: a server,
    /// proxy or cache that answers without doing the work (the answer the reaper must not believe).
    pub bulk_answer: Option<serde_json::Value>,
    /// With `bulk_answer`: only bulk deletes carrying a name that contains this text get the
    /// canned answer; the others are carried out (a proxy with rules for some paths).
    pub bulk_answer_names: Option<String>,
    /// Every bulk delete carrying a name that contains this text is refused as a whole, before
    /// anything is deleted, with `reject_http`: 500 (the server fails on that name), or 403 or
    /// 413 as a proxy or web firewall in front of the server answers (an HTML page, not the
    /// server's JSON). Other requests go through.
    pub reject_names: Option<String>,
    pub reject_http: Option<u16>,
    /// With `reject_names`: only the first this many such requests are refused (a blip).
    pub reject_times: Option<u64>,
    /// With `reject_names` and `reject_times`: the first request carrying the name after the
    /// refusals is carried out and its answer never comes (a resend that times out, which the
    /// client cannot tell from one that did nothing).
    pub then_lose_once: bool,
    /// Every object request is answered `200` with a CDN's HTML error page: an outage behind a
    /// CDN that answers for the server.
    pub answer_html: bool,
    /// A project's own bulk limit, lower than 1000: more names get the server's 400 "Bulk object
    /// requests are limited to N objects per request."
    pub bulk_limit: Option<usize>,
    /// The project is over its quota: every delete is answered 402 and nothing is deleted.
    pub over_quota: bool,
}

pub struct FaultState {
    faults: RwLock<Faults>,
    requests: AtomicU64,
    /// Requests refused for `reject_names` since the faults were set.
    rejected: AtomicU64,
}

/// What `reject_names` does to a bulk delete.
pub enum Rejection {
    /// Refuse it whole with this HTTP status.
    Refuse(u16),
    /// Carry it out, and never answer.
    Lose,
}

/// What to do with one request.
pub enum Verdict {
    Proceed,
    /// Carry the request out, then never answer.
    ProceedThenHang,
    Fail(ApiError),
    Hang,
    /// Answer `302 Found` with `Location: <base><path>`.
    Redirect(String),
    /// Answer `200` with an HTML page.
    Html,
}

impl FaultState {
    pub fn new(faults: Faults) -> FaultState {
        FaultState {
            faults: RwLock::new(faults),
            requests: AtomicU64::new(0),
            rejected: AtomicU64::new(0),
        }
    }

    pub fn get(&self) -> Faults {
        self.faults.read().unwrap().clone()
    }

    /// Replaces the faults and restarts the fail-after count.
    pub fn set(&self, faults: Faults) {
        *self.faults.write().unwrap() = faults;
        self.requests.store(0, Ordering::SeqCst);
        self.rejected.store(0, Ordering::SeqCst);
    }

    /// Whether a bulk delete carrying `names` is refused (`reject_names`, `reject_times`), or
    /// carried out with its answer lost (`then_lose_once`).
    pub fn rejects(&self, names: &[String]) -> Option<Rejection> {
        let f = self.get();
        let pattern = f.reject_names?;
        if !names.iter().any(|n| n.contains(pattern.as_str())) {
            return None;
        }
        let n = self.rejected.fetch_add(1, Ordering::SeqCst);
        match f.reject_times {
            Some(times) if n == times && f.then_lose_once => Some(Rejection::Lose),
            Some(times) if n >= times => None,
            _ => Some(Rejection::Refuse(f.reject_http.unwrap_or(500))),
        }
    }

    pub async fn judge(&self) -> Verdict {
        let f = self.get();
        let n = self.requests.fetch_add(1, Ordering::SeqCst) + 1;
        let mut delay = f.latency_ms;
        if f.spike_rate > 0.0 && rand::random::<f64>() < f.spike_rate {
            delay += f.spike_ms;
        }
        if delay > 0 {
            tokio::time::sleep(Duration::from_millis(delay)).await;
        }
        if let Some(base) = f.redirect_to {
            return Verdict::Redirect(base);
        }
        if f.answer_html {
            return Verdict::Html;
        }
        if f.fail_after.is_some_and(|limit| n > limit) {
            return Verdict::Fail(internal());
        }
        let roll: f64 = rand::random();
        let mut edge = f.hang_rate;
        if roll < edge {
            return Verdict::Hang;
        }
        edge += f.rate_500;
        if roll < edge {
            return Verdict::Fail(internal());
        }
        edge += f.rate_429;
        if roll < edge {
            return Verdict::Fail(ApiError::new(
                429,
                "429",
                "too_many_requests",
                "SlowDown",
                "We encountered an internal error. Please try again.",
            ));
        }
        edge += f.rate_544;
        if roll < edge {
            return Verdict::Fail(ApiError::new(
                544,
                "544",
                "DatabaseTimeout",
                "DatabaseTimeout",
                "The connection to the database timed out",
            ));
        }
        edge += f.lost_response_rate;
        if roll < edge {
            return Verdict::ProceedThenHang;
        }
        Verdict::Proceed
    }
}

fn internal() -> ApiError {
    ApiError::new(
        500,
        "500",
        "internal",
        "InternalError",
        "Internal Server Error",
    )
}
