//! Whether the drain loop makes progress, for `/livez`. Every step of the loop says how long it
//! may take (each is bounded: a database call by --db-timeout, a batch by its lease, a wait by
//! its length); a step that runs past that means the loop is stuck where no timeout reaches,
//! and a supervisor should restart the process. A loop that retries a failing database or
//! storage is alive: it is `/readyz` that reports those.

use std::sync::Mutex;
use std::time::{Duration, Instant};

pub struct Liveness {
    step: Mutex<Step>,
}

#[derive(Clone, Copy)]
struct Step {
    what: &'static str,
    since: Instant,
    may_take: Duration,
}

/// Beyond its own bound, how long a step may run before the loop counts as stuck.
const SLACK: Duration = Duration::from_secs(10);

impl Liveness {
    pub fn new() -> Liveness {
        Liveness {
            step: Mutex::new(Step {
                what: "starting",
                since: Instant::now(),
                may_take: Duration::from_secs(60),
            }),
        }
    }

    /// The loop begins `what`, which may take up to `may_take`.
    pub fn step(&self, what: &'static str, may_take: Duration) {
        *self.step.lock().unwrap() = Step {
            what,
            since: Instant::now(),
            may_take,
        };
    }

    /// Why the loop counts as stuck at `now`, if it does.
    pub fn stuck(&self, now: Instant) -> Option<String> {
        let s = *self.step.lock().unwrap();
        let running = now.saturating_duration_since(s.since);
        (running > s.may_take + SLACK).then(|| {
            format!(
                "the drain loop has been {} for {:.0} s, longer than the {:.0} s that step may take",
                s.what,
                running.as_secs_f64(),
                s.may_take.as_secs_f64()
            )
        })
    }
}

impl Default for Liveness {
    fn default() -> Liveness {
        Liveness::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_step_past_its_bound_is_stuck_and_the_next_step_is_not() {
        let live = Liveness::new();
        live.step("claiming", Duration::from_secs(30));
        let t = Instant::now();
        assert_eq!(live.stuck(t + Duration::from_secs(39)), None);
        let stuck = live.stuck(t + Duration::from_secs(45)).expect("stuck");
        assert!(stuck.contains("claiming for 45 s"), "{stuck}");
        live.step("waiting", Duration::from_secs(300));
        assert_eq!(live.stuck(Instant::now() + Duration::from_secs(45)), None);
    }
}
