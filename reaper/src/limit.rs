//! `--max-deletes-per-hour`: the reaper's own blast-radius limit, beside the extension's circuit
//! breaker. Whatever the queue holds, this reaper sends at most that many objects for deletion
//! in any sliding hour.
//!
//! Rows count when they are claimed, since a claimed row may be deleted at any moment after (up
//! to a lease later: a claim counts for an hour and a lease, so that no sliding hour of sends
//! holds more than the limit), and
//! are given back to the claim they came from when they are released unsent (a refund dated at
//! the release would let later claims exceed the cap). Counting at claim time keeps the limit
//! exact with a batch claimed ahead. A reaper starts from what the audit log says it sent in the
//! last hour ([`HourlyLimit::seed`]), so a restart does not reset the budget.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

const HOUR: Duration = Duration::from_secs(3600);

#[derive(Debug)]
pub struct HourlyLimit {
    max: u64,
    /// How long a claim counts: an hour, and the lease within which its rows may be sent.
    hold: Duration,
    /// (when claimed, rows still counted), oldest first.
    spent: VecDeque<(Instant, u64)>,
}

impl HourlyLimit {
    pub fn new(max: u64, lease: Duration) -> HourlyLimit {
        HourlyLimit {
            max,
            hold: HOUR + lease,
            spent: VecDeque::new(),
        }
    }

    /// How far back claims count.
    pub fn hold(&self) -> Duration {
        self.hold
    }

    pub fn max(&self) -> u64 {
        self.max
    }

    fn forget_older_than_an_hour(&mut self, now: Instant) {
        while self
            .spent
            .front()
            .is_some_and(|(at, _)| now.duration_since(*at) >= self.hold)
        {
            self.spent.pop_front();
        }
    }

    /// Rows that may still be claimed now.
    pub fn available(&mut self, now: Instant) -> u64 {
        self.forget_older_than_an_hour(now);
        let used: u64 = self.spent.iter().map(|(_, n)| n).sum();
        self.max.saturating_sub(used)
    }

    /// Counts a claim of `rows` made at `at` (the batch keeps `at` for its refunds).
    pub fn claimed(&mut self, rows: u64, at: Instant) {
        self.spent.push_back((at, rows));
    }

    /// Rows of the claim made at `claimed_at` given back without being sent to storage. A claim
    /// already older than an hour no longer counts: nothing to give back.
    pub fn released(&mut self, rows: u64, claimed_at: Instant) {
        if let Some((_, n)) = self.spent.iter_mut().find(|(at, _)| *at == claimed_at) {
            *n = n.saturating_sub(rows);
        }
    }

    /// What was sent in the last hour (and lease) before this process started: `(how long ago, rows)`.
    pub fn seed(&mut self, sent: &[(Duration, u64)], now: Instant) {
        let mut entries: Vec<(Instant, u64)> = sent
            .iter()
            .filter(|(ago, _)| *ago < self.hold)
            .filter_map(|(ago, n)| now.checked_sub(*ago).map(|at| (at, *n)))
            .collect();
        entries.extend(self.spent.drain(..));
        entries.sort_by_key(|(at, _)| *at);
        self.spent = entries.into();
    }

    /// When some of the budget comes back, if none is left now.
    pub fn next_room(&mut self, now: Instant) -> Duration {
        self.forget_older_than_an_hour(now);
        self.spent
            .front()
            .map(|(at, _)| self.hold.saturating_sub(now.duration_since(*at)))
            .unwrap_or(Duration::ZERO)
            .max(Duration::from_secs(1))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn claims_spend_the_budget_and_an_hour_later_it_is_back() {
        let t0 = Instant::now();
        let mut l = HourlyLimit::new(10, Duration::ZERO);
        assert_eq!(l.available(t0), 10);
        l.claimed(4, t0);
        l.claimed(6, t0 + Duration::from_secs(60));
        assert_eq!(l.available(t0 + Duration::from_secs(120)), 0);
        assert_eq!(
            l.next_room(t0 + Duration::from_secs(120)),
            Duration::from_secs(3480)
        );
        assert_eq!(l.available(t0 + HOUR), 4, "the first claim has aged out");
        assert_eq!(l.available(t0 + HOUR + Duration::from_secs(60)), 10);
    }

    #[test]
    fn rows_released_unsent_are_given_back() {
        let t0 = Instant::now();
        let mut l = HourlyLimit::new(10, Duration::ZERO);
        l.claimed(8, t0);
        l.released(5, t0);
        assert_eq!(l.available(t0), 7);
    }

    /// Issue 12, finding 7: a refund was dated at the release, so once its claim aged out it
    /// stayed as a credit and the next hour's claims could exceed the cap (up to twice).
    #[test]
    fn a_refund_late_in_the_hour_lends_nothing_to_the_next_hour() {
        let t0 = Instant::now();
        let mut l = HourlyLimit::new(10, Duration::ZERO);
        l.claimed(10, t0);
        l.released(10, t0); // at t0 + 59 min, say: the refund belongs to the claim at t0
        assert_eq!(l.available(t0 + Duration::from_secs(3540)), 10);
        let t1 = t0 + Duration::from_secs(3550);
        l.claimed(10, t1);
        assert_eq!(
            l.available(t0 + HOUR + Duration::from_secs(1)),
            0,
            "never more than 10 in an hour"
        );
    }

    #[test]
    fn a_restart_starts_from_what_was_sent() {
        let now = Instant::now();
        let mut l = HourlyLimit::new(10, Duration::ZERO);
        l.seed(
            &[
                (Duration::from_secs(600), 6),
                (Duration::from_secs(4000), 9),
            ],
            now,
        );
        assert_eq!(
            l.available(now),
            4,
            "the claim of an hour and more ago no longer counts"
        );
        assert_eq!(l.available(now + Duration::from_secs(3000)), 10);
    }
}
