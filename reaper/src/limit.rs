//! `--max-deletes-per-hour`: the reaper's own blast-radius limit, beside the extension's circuit
//! breaker. Whatever the queue holds, this reaper sends at most that many objects for deletion
//! in any sliding hour.
//!
//! Rows count when they are claimed, since a claimed row may be deleted at any moment after, and
//! are given back to the budget when they are released unsent. Counting at claim time keeps the
//! limit exact with a batch claimed ahead.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

const HOUR: Duration = Duration::from_secs(3600);

#[derive(Debug)]
pub struct HourlyLimit {
    max: u64,
    /// (when, rows): claims count positive, rows released unsent negative.
    spent: VecDeque<(Instant, i64)>,
}

impl HourlyLimit {
    pub fn new(max: u64) -> HourlyLimit {
        HourlyLimit {
            max,
            spent: VecDeque::new(),
        }
    }

    pub fn max(&self) -> u64 {
        self.max
    }

    fn forget_older_than_an_hour(&mut self, now: Instant) {
        while self
            .spent
            .front()
            .is_some_and(|(at, _)| now.duration_since(*at) >= HOUR)
        {
            self.spent.pop_front();
        }
    }

    /// Rows that may still be claimed now.
    pub fn available(&mut self, now: Instant) -> u64 {
        self.forget_older_than_an_hour(now);
        let used: i64 = self.spent.iter().map(|(_, n)| n).sum();
        self.max.saturating_sub(used.max(0) as u64)
    }

    pub fn claimed(&mut self, rows: u64, now: Instant) {
        self.spent.push_back((now, rows as i64));
    }

    /// Rows given back without being sent to storage.
    pub fn released(&mut self, rows: u64, now: Instant) {
        self.spent.push_back((now, -(rows as i64)));
    }

    /// When some of the budget comes back, if none is left now.
    pub fn next_room(&mut self, now: Instant) -> Duration {
        self.forget_older_than_an_hour(now);
        self.spent
            .front()
            .map(|(at, _)| HOUR.saturating_sub(now.duration_since(*at)))
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
        let mut l = HourlyLimit::new(10);
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
        let mut l = HourlyLimit::new(10);
        l.claimed(8, t0);
        l.released(5, t0);
        assert_eq!(l.available(t0), 7);
    }
}
