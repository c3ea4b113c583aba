//! Gates: how many intake requests and event streams a node serves at
//! once. One more than a gate holds is answered 503 `overloaded` with
//! `Retry-After: 1` before any work is done for it, and a slot is free
//! again the moment its request or stream ends, so recovery after a burst
//! is immediate.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use axum::http::StatusCode;
use serde_json::json;

use crate::problem::Problem;

/// The 503 every overload answers: what is full, and which `[limits]` key
/// sets it.
pub fn overloaded(detail: impl Into<String>, key: &'static str) -> Problem {
    Problem::new(
        StatusCode::SERVICE_UNAVAILABLE,
        "overloaded",
        "Overloaded",
        detail,
    )
    .with("limit", json!(key))
    .retry_after(1)
}

/// Counts what is open of one kind, up to `max`.
#[derive(Debug)]
pub struct Gate {
    /// What it counts, for answers: "intake requests", "event streams".
    what: &'static str,
    /// The `[limits]` key of `max`.
    key: &'static str,
    max: usize,
    open: AtomicUsize,
}

/// One open request or stream, counted until dropped.
#[derive(Debug)]
pub struct Slot(Arc<Gate>);

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.open.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Gate {
    pub fn new(what: &'static str, key: &'static str, max: usize) -> Arc<Gate> {
        Arc::new(Gate {
            what,
            key,
            max,
            open: AtomicUsize::new(0),
        })
    }

    /// A slot, or `None` when `max` are open.
    pub fn try_enter(self: &Arc<Gate>) -> Option<Slot> {
        let mut open = self.open.load(Ordering::Acquire);
        loop {
            if open >= self.max {
                return None;
            }
            match self.open.compare_exchange_weak(
                open,
                open + 1,
                Ordering::AcqRel,
                Ordering::Acquire,
            ) {
                Ok(_) => return Some(Slot(self.clone())),
                Err(now) => open = now,
            }
        }
    }

    /// A slot, or the 503 that says this gate is full.
    pub fn enter(self: &Arc<Gate>) -> Result<Slot, Problem> {
        self.try_enter().ok_or_else(|| {
            overloaded(
                format!(
                    "this node serves at most {} {} at once; try again shortly",
                    self.max, self.what
                ),
                self.key,
            )
        })
    }

    #[cfg(test)]
    pub fn open(&self) -> usize {
        self.open.load(Ordering::Acquire)
    }
}

/// The gates of one server.
#[derive(Debug)]
pub struct Gates {
    pub intake: Arc<Gate>,
    pub streams: Arc<Gate>,
}

impl Gates {
    pub fn new(limits: &ripen_engine::limits::Limits) -> Gates {
        Gates {
            intake: Gate::new(
                "intake requests",
                "intake_in_flight_max",
                limits.intake_in_flight_max,
            ),
            streams: Gate::new("event streams", "streams_max", limits.streams_max),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::response::IntoResponse;

    #[test]
    fn a_gate_holds_max_and_frees_a_slot_when_it_drops() {
        let gate = Gate::new("things", "things_max", 2);
        let a = gate.try_enter().expect("first");
        let b = gate.try_enter().expect("second");
        assert!(gate.try_enter().is_none(), "full");
        assert_eq!(gate.open(), 2);
        drop(a);
        let c = gate.try_enter().expect("a freed slot is free at once");
        drop((b, c));
        assert_eq!(gate.open(), 0);
    }

    #[test]
    fn a_zero_gate_refuses_everything() {
        let gate = Gate::new("things", "things_max", 0);
        assert!(gate.try_enter().is_none());
    }

    #[test]
    fn a_full_gate_answers_503_overloaded_with_retry_after() {
        let gate = Gate::new("event streams", "streams_max", 0);
        let response = gate.enter().unwrap_err().into_response();
        assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(response.headers()["retry-after"], "1");
        assert_eq!(
            response.headers()["content-type"],
            "application/problem+json"
        );
    }

    #[test]
    fn many_threads_never_pass_max() {
        let gate = Gate::new("things", "things_max", 8);
        let peak = Arc::new(AtomicUsize::new(0));
        std::thread::scope(|s| {
            for _ in 0..8 {
                s.spawn(|| {
                    for _ in 0..10_000 {
                        if let Some(slot) = gate.try_enter() {
                            peak.fetch_max(gate.open(), Ordering::Relaxed);
                            drop(slot);
                        }
                    }
                });
            }
        });
        assert!(peak.load(Ordering::Relaxed) <= 8);
        assert_eq!(gate.open(), 0);
    }
}
