//! The metrics a node serves at `/metrics`, in the Prometheus text format
//! (version 0.0.4), with HELP and TYPE for every family.
//!
//! The store registers what its decisions count (attempt outcomes, retries,
//! lease expiries, stale results, status changes, submit-to-ready time) and
//! how its calls and commits go; the engine adds intake, attempt durations,
//! the gauges of stored entities, due work and waiting worker claims, and
//! build information. The gauges come from the database's indexes, at most
//! once per [`COUNTS_MAX_AGE`], however often the node is scraped.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use prometheus::{
    Encoder, HistogramOpts, HistogramVec, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry,
    TextEncoder,
};
use ripen_store::metrics::LATENCY_BUCKETS;
use ripen_store::{Counts, Outcome, Store};

use crate::time::Clock;

/// How long the counted gauges are served before the database is asked again.
pub const COUNTS_MAX_AGE: Duration = Duration::from_secs(5);

/// The content type of the classic text exposition format.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// The `outcome` label of an attempt, as an executor or a worker reported it.
/// A counter family of one label registered in `registry`, with a zero
/// series for each of `values`, so that a scrape shows them before the
/// first count.
pub fn labelled_counter(
    registry: &Registry,
    name: &str,
    help: &str,
    label: &str,
    values: &[&str],
) -> prometheus::Result<IntCounterVec> {
    let counter = IntCounterVec::new(Opts::new(name, help), &[label])?;
    registry.register(Box::new(counter.clone()))?;
    for value in values {
        counter.with_label_values(&[value]);
    }
    Ok(counter)
}

pub fn outcome_label(outcome: &Outcome) -> &'static str {
    match outcome {
        Outcome::Succeeded { .. } => "succeeded",
        Outcome::Failed {
            retryable: true, ..
        } => "retryable_error",
        Outcome::Failed { .. } => "permanent_error",
    }
}

pub struct EngineMetrics {
    registry: Registry,
    intake: IntCounterVec,
    intake_seconds: HistogramVec,
    attempt_seconds: HistogramVec,
    entities: IntGaugeVec,
    due: IntGaugeVec,
    waiting_claims: IntGauge,
    counted: Mutex<Option<(Instant, Counts)>>,
}

impl EngineMetrics {
    /// The engine's families, registered with the store's into one registry.
    pub fn new(store: &dyn Store) -> prometheus::Result<EngineMetrics> {
        let registry = Registry::new();
        let intake = IntCounterVec::new(
            Opts::new(
                "ripen_intake_requests_total",
                "Submissions, by entity type (unknown for a type that does not exist) and outcome (created, replayed, key_reused, invalid, malformed, bad_key, in_flight, unknown_type, unavailable, error).",
            ),
            &["type", "outcome"],
        )?;
        let intake_seconds = HistogramVec::new(
            HistogramOpts::new(
                "ripen_intake_duration_seconds",
                "Time to answer a submission, durable commit included, by outcome.",
            )
            .buckets(LATENCY_BUCKETS.to_vec()),
            &["outcome"],
        )?;
        let attempt_seconds = HistogramVec::new(
            HistogramOpts::new(
                "ripen_step_attempt_duration_seconds",
                "Time this node's executors took to run an attempt, by entity type, step and outcome (succeeded, retryable_error, permanent_error).",
            )
            .buckets(LATENCY_BUCKETS.to_vec()),
            &["type", "step", "outcome"],
        )?;
        let entities = IntGaugeVec::new(
            Opts::new(
                "ripen_entities",
                "Stored entities, by entity type and status.",
            ),
            &["type", "status"],
        )?;
        let due = IntGaugeVec::new(
            Opts::new(
                "ripen_queue_due_entities",
                "Entities with a step due now, by queue (http, builtin, worker:NAME): the work waiting for that queue's consumers.",
            ),
            &["queue"],
        )?;
        let waiting_claims = IntGauge::new(
            "ripen_worker_claims_waiting",
            "Worker claims waiting for work on this node (long polls).",
        )?;
        let build = IntGaugeVec::new(
            Opts::new("ripen_build_info", "The build of this node; always 1."),
            &["version"],
        )?;
        build.with_label_values(&[env!("CARGO_PKG_VERSION")]).set(1);
        registry.register(Box::new(intake.clone()))?;
        registry.register(Box::new(intake_seconds.clone()))?;
        registry.register(Box::new(attempt_seconds.clone()))?;
        registry.register(Box::new(entities.clone()))?;
        registry.register(Box::new(due.clone()))?;
        registry.register(Box::new(waiting_claims.clone()))?;
        registry.register(Box::new(build))?;
        store.register_metrics(&registry)?;
        Ok(EngineMetrics {
            registry,
            intake,
            intake_seconds,
            attempt_seconds,
            entities,
            due,
            waiting_claims,
            counted: Mutex::new(None),
        })
    }

    /// The registry every family is in, for the parts that add their own.
    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    pub fn intake(&self, type_name: &str, outcome: &str, elapsed: Duration) {
        self.intake.with_label_values(&[type_name, outcome]).inc();
        self.intake_seconds
            .with_label_values(&[outcome])
            .observe(elapsed.as_secs_f64());
    }

    pub fn attempt(&self, type_name: &str, step: &str, outcome: &str, elapsed: Duration) {
        self.attempt_seconds
            .with_label_values(&[type_name, step, outcome])
            .observe(elapsed.as_secs_f64());
    }

    /// Every family as text. The counted gauges are refreshed first when
    /// they are older than [`COUNTS_MAX_AGE`]; if the store cannot count
    /// now, the last counts are served.
    pub async fn render(&self, store: &dyn Store, clock: &dyn Clock, waiting: usize) -> String {
        let fresh = {
            let counted = self.counted.lock().unwrap_or_else(|e| e.into_inner());
            counted
                .as_ref()
                .is_some_and(|(at, _)| at.elapsed() < COUNTS_MAX_AGE)
        };
        if !fresh {
            match store.counts(clock.now_us()).await {
                Ok(counts) => {
                    self.entities.reset();
                    for (t, status, n) in &counts.entities {
                        self.entities
                            .with_label_values(&[t, status.as_str()])
                            .set(i64::try_from(*n).unwrap_or(i64::MAX));
                    }
                    self.due.reset();
                    for (queue, n) in &counts.due {
                        self.due
                            .with_label_values(&[queue])
                            .set(i64::try_from(*n).unwrap_or(i64::MAX));
                    }
                    *self.counted.lock().unwrap_or_else(|e| e.into_inner()) =
                        Some((Instant::now(), counts));
                }
                Err(e) => tracing::warn!(error = %e, "count entities for the metrics"),
            }
        }
        self.waiting_claims
            .set(i64::try_from(waiting).unwrap_or(i64::MAX));
        let mut out = Vec::new();
        if let Err(e) = TextEncoder::new().encode(&self.registry.gather(), &mut out) {
            tracing::error!(error = %e, "encode the metrics");
        }
        String::from_utf8(out).unwrap_or_default()
    }
}
