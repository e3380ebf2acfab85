//! A gate on bulk deletes, for tests that must act "in the middle of a drain": let exactly N more
//! bulk deletes through, then hold every further one until the gate opens again.
//!
//! `PUT /__emulator/gate {"allow": 3}` lets three through and holds the fourth;
//! `PUT /__emulator/gate {}` (or `{"allow": null}`) opens it. `GET /__emulator/gate` tells how
//! many passed, how many wait now, and how many were ever held. A test that waits for
//! `held_total` to grow knows a request is in flight and the drain cannot finish before it acts:
//! a moment it forced, not one it hoped to catch by polling.

use std::sync::Mutex;

use serde::{Deserialize, Serialize};
use tokio::sync::Notify;

/// What `PUT /__emulator/gate` takes: how many more requests may pass. `None`: open.
#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(default)]
pub struct GateSetting {
    pub allow: Option<u64>,
}

/// What `GET /__emulator/gate` answers.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct GateState {
    /// Requests still allowed through before the gate holds; `None`: open.
    pub allow: Option<u64>,
    /// Requests that went through, ever.
    pub passed: u64,
    /// Requests waiting at the gate now.
    pub held: u64,
    /// Requests that ever had to wait.
    pub held_total: u64,
}

#[derive(Default)]
pub struct Gate {
    state: Mutex<GateState>,
    changed: Notify,
}

impl Gate {
    pub fn state(&self) -> GateState {
        self.state.lock().unwrap().clone()
    }

    pub fn set(&self, setting: GateSetting) -> GateState {
        let state = {
            let mut s = self.state.lock().unwrap();
            s.allow = setting.allow;
            s.clone()
        };
        self.changed.notify_waiters();
        state
    }

    /// Returns when the request may go on. Dropped while waiting (the client went away), it
    /// stops counting as held.
    pub async fn pass(&self) {
        let mut waiting = Waiting {
            gate: self,
            counted: false,
        };
        loop {
            let changed = self.changed.notified();
            tokio::pin!(changed);
            // Registered before the state is read, so a change in between is not missed.
            changed.as_mut().enable();
            {
                let mut s = self.state.lock().unwrap();
                match s.allow {
                    None => {
                        s.passed += 1;
                        break;
                    }
                    Some(n) if n > 0 => {
                        s.allow = Some(n - 1);
                        s.passed += 1;
                        break;
                    }
                    Some(_) if !waiting.counted => {
                        s.held += 1;
                        s.held_total += 1;
                        waiting.counted = true;
                    }
                    Some(_) => {}
                }
            }
            changed.await;
        }
        waiting.leave();
    }
}

/// Keeps `held` right when a waiting request ends, however it ends.
struct Waiting<'a> {
    gate: &'a Gate,
    counted: bool,
}

impl Waiting<'_> {
    fn leave(&mut self) {
        if std::mem::take(&mut self.counted) {
            self.gate.state.lock().unwrap().held -= 1;
        }
    }
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.leave();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::time::Duration;

    #[tokio::test]
    async fn lets_n_through_then_holds_until_opened() {
        let gate = Arc::new(Gate::default());
        gate.set(GateSetting { allow: Some(2) });
        gate.pass().await;
        gate.pass().await;
        let g = gate.clone();
        let third = tokio::spawn(async move { g.pass().await });
        while gate.state().held == 0 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        assert!(!third.is_finished());
        assert_eq!(
            gate.state(),
            GateState {
                allow: Some(0),
                passed: 2,
                held: 1,
                held_total: 1
            }
        );
        gate.set(GateSetting { allow: None });
        third.await.unwrap();
        assert_eq!(gate.state().passed, 3);
        assert_eq!(gate.state().held, 0);
    }

    #[tokio::test]
    async fn a_request_abandoned_at_the_gate_stops_counting_as_held() {
        let gate = Arc::new(Gate::default());
        gate.set(GateSetting { allow: Some(0) });
        let g = gate.clone();
        let waiting = tokio::spawn(async move { g.pass().await });
        while gate.state().held == 0 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        waiting.abort();
        let _ = waiting.await;
        assert_eq!(gate.state().held, 0);
        assert_eq!(gate.state().held_total, 1);
        assert_eq!(gate.state().passed, 0);
    }
}
