//! `GET /v1/stats`: what the dashboard's overview shows. Entity counts by
//! type and status, counted by the store (at most once per
//! [`COUNTS_MAX_AGE`], however often it is asked), and the intake and ready
//! rates of the last [`BUCKETS`] × [`BUCKET_SECONDS`] seconds, from a sampler
//! of the engine's activity counters that costs no store call.
//!
//! The rates are this node's: the entities its intake created and those its
//! decisions made ready. The counts are the store's, every node included.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::Response;
use ripen_core::EntityStatus;
use ripen_engine::Activity;
use ripen_store::Counts;
use serde_json::{json, Map, Value};

use crate::{json_response, store_problem, AppState, Problem, Shared};

/// The width of one rate bucket.
pub const BUCKET_SECONDS: u64 = 10;
/// How many buckets the rates cover, the one in progress included.
pub const BUCKETS: usize = 30;
/// How long counts are served before the store is asked again.
pub const COUNTS_MAX_AGE: Duration = Duration::from_secs(2);

/// The activity totals at the last bucket boundaries, oldest first: the
/// rates are their differences. Pure, so that it is tested on its own.
#[derive(Clone, Debug)]
pub struct Rates {
    /// At most [`BUCKETS`] samples, one per boundary.
    samples: VecDeque<Activity>,
}

impl Rates {
    /// Rates that start counting from `now`.
    pub fn new(now: Activity) -> Rates {
        let mut samples = VecDeque::with_capacity(BUCKETS);
        samples.push_back(now);
        Rates { samples }
    }

    /// Closes the bucket in progress at totals `now`; the oldest bucket
    /// falls out of the window.
    pub fn sample(&mut self, now: Activity) {
        if self.samples.len() == BUCKETS {
            self.samples.pop_front();
        }
        self.samples.push_back(now);
    }

    /// `(created, ready)` per bucket, oldest first, [`BUCKETS`] each; the
    /// last is the bucket in progress, up to totals `now`. Buckets from
    /// before the sampler started are zero.
    pub fn buckets(&self, now: Activity) -> (Vec<u64>, Vec<u64>) {
        let mut created = vec![0; BUCKETS - self.samples.len()];
        let mut ready = created.clone();
        let ends = self.samples.iter().skip(1).chain(std::iter::once(&now));
        for (start, end) in self.samples.iter().zip(ends) {
            // Counters only grow; saturate rather than trust that.
            created.push(end.created.saturating_sub(start.created));
            ready.push(end.ready.saturating_sub(start.ready));
        }
        (created, ready)
    }
}

/// The stats of one server: its rates and its last counts.
pub struct Stats {
    rates: Mutex<Rates>,
    /// The last counts, when they were read, and that time as the page
    /// reads it (Unix microseconds).
    counted: tokio::sync::Mutex<Option<(Instant, i64, Counts)>>,
}

/// A panic while the rates are locked cannot leave them half written (each
/// critical section is one push), so a poisoned lock is used as it is.
fn lock(rates: &Mutex<Rates>) -> MutexGuard<'_, Rates> {
    rates.lock().unwrap_or_else(|e| e.into_inner())
}

impl Stats {
    pub fn new(now: Activity) -> Stats {
        Stats {
            rates: Mutex::new(Rates::new(now)),
            counted: tokio::sync::Mutex::new(None),
        }
    }
}

/// Closes a rate bucket every [`BUCKET_SECONDS`] until the server stops.
pub async fn sample(state: Arc<AppState>, mut stopping: tokio::sync::watch::Receiver<bool>) {
    let period = Duration::from_secs(BUCKET_SECONDS);
    let mut ticks = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = ticks.tick() => lock(&state.stats.rates).sample(state.engine.activity()),
            _ = stopping.wait_for(|stop| *stop) => return,
        }
    }
}

/// `GET /v1/stats`.
pub async fn get(
    State(state): Shared,
    axum::extract::Extension(caller): axum::extract::Extension<crate::auth::Caller>,
) -> Result<Response, Problem> {
    let (counted_at_us, counts) = {
        // One count at a time: requests that arrive meanwhile wait for it
        // and share it.
        let mut counted = state.stats.counted.lock().await;
        match &*counted {
            Some((at, at_us, counts)) if at.elapsed() < COUNTS_MAX_AGE => (*at_us, counts.clone()),
            _ => {
                let at_us = ripen_engine::time::local_now_us();
                let counts = state.engine.counts().await.map_err(store_problem)?;
                *counted = Some((Instant::now(), at_us, counts.clone()));
                (at_us, counts)
            }
        }
    };
    let configured: Vec<&str> = state
        .engine
        .config()
        .types
        .iter()
        .map(|t| t.name.as_str())
        .collect();
    // A tenant sees its own entities. The rates are the node's, every
    // tenant's together: only the default tenant sees them.
    let counts = counts.of_tenant(&caller.tenant);
    let rates = caller.is_default_tenant().then(|| {
        let (created, ready) = lock(&state.stats.rates).buckets(state.engine.activity());
        json!({
            "bucket_seconds": BUCKET_SECONDS,
            "created": created,
            "ready": ready,
        })
    });
    Ok(json_response(
        StatusCode::OK,
        json!({
            "types": types_json(&configured, &counts),
            "counted_at": ripen_engine::time::rfc3339(counted_at_us),
            "rates": rates,
        }),
    ))
}

/// One entry per configured type, in configuration order, then one per
/// other type the store holds (a type since removed from the
/// configuration), by name; every status is present.
pub fn types_json(configured: &[&str], counts: &Counts) -> Value {
    let mut names: Vec<&str> = configured.to_vec();
    let mut others: Vec<&str> = counts
        .entities
        .iter()
        .map(|(t, _, _)| t.as_str())
        .filter(|t| !configured.contains(t))
        .collect();
    others.sort_unstable();
    others.dedup();
    names.extend(others);
    let items: Vec<Value> = names
        .into_iter()
        .map(|name| {
            let mut by_status = Map::new();
            for status in EntityStatus::ALL {
                let n: u64 = counts
                    .entities
                    .iter()
                    .filter(|(t, s, _)| t == name && *s == status)
                    .map(|(_, _, n)| n)
                    .sum();
                by_status.insert(status.as_str().to_owned(), json!(n));
            }
            json!({"type": name, "counts": by_status})
        })
        .collect();
    Value::Array(items)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn at(created: u64, ready: u64) -> Activity {
        Activity { created, ready }
    }

    proptest! {
        /// Against a model that keeps every bucket's increments: the
        /// window is always the last buckets, the one in progress last.
        #[test]
        fn buckets_are_the_increments_of_the_last_boundaries(
            steps in proptest::collection::vec((0u64..50, 0u64..50, any::<bool>()), 0..80),
            start in (0u64..1_000, 0u64..1_000),
        ) {
            let mut totals = at(start.0, start.1);
            let mut rates = Rates::new(totals);
            // Every bucket's increments so far; the last is in progress.
            let mut model: Vec<(u64, u64)> = vec![(0, 0)];
            for (c, r, close) in steps {
                totals = at(totals.created + c, totals.ready + r);
                if let Some(last) = model.last_mut() {
                    last.0 += c;
                    last.1 += r;
                }
                if close {
                    rates.sample(totals);
                    model.push((0, 0));
                }
            }
            let (created, ready) = rates.buckets(totals);
            prop_assert_eq!(created.len(), BUCKETS);
            prop_assert_eq!(ready.len(), BUCKETS);
            let window: Vec<(u64, u64)> = model.iter().rev().take(BUCKETS).rev().copied().collect();
            let pad = BUCKETS - window.len();
            prop_assert!(created[..pad].iter().all(|&n| n == 0));
            prop_assert!(ready[..pad].iter().all(|&n| n == 0));
            let got: Vec<(u64, u64)> = created[pad..].iter().copied().zip(ready[pad..].iter().copied()).collect();
            prop_assert_eq!(got, window);
        }
    }

    #[test]
    fn counts_list_every_configured_type_then_the_others() {
        let mut counts = Counts::default();
        counts.add_entities("default".into(), "merchant".into(), EntityStatus::Ready, 3);
        counts.add_entities("default".into(), "merchant".into(), EntityStatus::Failed, 1);
        counts.add_entities("default".into(), "old".into(), EntityStatus::Cancelled, 2);
        let v = types_json(&["order", "merchant"], &counts);
        assert_eq!(
            v,
            json!([
                {"type": "order", "counts": {"pending": 0, "ready": 0, "failed": 0, "cancelled": 0}},
                {"type": "merchant", "counts": {"pending": 0, "ready": 3, "failed": 1, "cancelled": 0}},
                {"type": "old", "counts": {"pending": 0, "ready": 0, "failed": 0, "cancelled": 2}},
            ])
        );
    }
}
