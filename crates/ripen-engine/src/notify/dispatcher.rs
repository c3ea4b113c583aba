//! The dispatcher: reads the outbox into deliveries (the fan-out), sends
//! each delivery through its sink, and records what came of it.
//!
//! - Woken by commits that wrote outbox rows, and every poll interval.
//! - At most `per_subscription` deliveries of one subscription are in
//!   flight, and `IN_FLIGHT_MAX` in all, so a slow receiver holds only its
//!   own places and never delays the pipeline or the other subscribers.
//! - A failed attempt is retried with exponential backoff and full jitter
//!   until the delivery has been failing for `retry_for`; then it is dead,
//!   until an operator redelivers it.
//! - Deliveries are leased for the attempt timeout plus a grace: a node
//!   that dies mid-delivery leaves them to be sent again (at least once),
//!   with the same `webhook-id`.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use prometheus::{HistogramOpts, HistogramVec, IntCounterVec, IntGauge, Opts, Registry};
use ripen_core::{retry::backoff_ms, RetryPolicy, UnixMicros};
use ripen_store::{
    Delivery, DeliveryClaim, DeliveryOutcome, DeliveryResult, SinkKind, Store, Subscription,
};
use tokio::sync::mpsc;

use super::hub::Hub;
use crate::config::NotifyConfig;
use crate::time::Clock;

/// Deliveries in flight on one node, at most.
pub const IN_FLIGHT_MAX: usize = 256;
/// Outbox rows one fan-out round takes.
const FAN_OUT_BATCH: u32 = 512;
/// Outbox rows and delivered deliveries one pruning round deletes.
const PRUNE_BATCH: u32 = 1_000;
/// How often pruning runs, at most; a shorter `outbox_retention` prunes as
/// often as it names (see [`prune_every`]).
const PRUNE_EVERY: Duration = Duration::from_secs(60);
/// How often pruning runs, at least.
const PRUNE_EVERY_MIN: Duration = Duration::from_secs(1);

/// How often the dispatcher prunes the outbox: every minute, or every
/// `outbox_retention` when that is shorter (but not more than once a
/// second), so that rows are kept about as long as configured and no
/// longer: outbox rows keep their entity from `retention.entities`.
fn prune_every(outbox_retention_ms: u64) -> Duration {
    Duration::from_millis(outbox_retention_ms).clamp(PRUNE_EVERY_MIN, PRUNE_EVERY)
}
/// How long the subscriptions a node knows are trusted before it reads them
/// again (a new or deleted one is noticed by then).
const SUBSCRIPTIONS_MAX_AGE: Duration = Duration::from_secs(2);
/// A lease outlives the attempt timeout by this much.
const LEASE_GRACE_US: i64 = 5_000_000;

/// What one attempt to deliver came to, as the sink saw it.
#[derive(Clone, Debug, PartialEq)]
pub struct Attempted {
    /// The receiver's HTTP status or SMTP reply code, when it answered.
    pub code: Option<u16>,
    pub failure: Option<Failure>,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Failure {
    pub error: String,
    /// False when trying again cannot help (a refused address, a mail
    /// without a recipient): the delivery is dead at once.
    pub retryable: bool,
    /// The receiver's `Retry-After`, a lower bound on the backoff.
    pub retry_after_ms: Option<u64>,
}

impl Attempted {
    pub fn delivered(code: Option<u16>) -> Attempted {
        Attempted {
            code,
            failure: None,
        }
    }

    pub fn failed(code: Option<u16>, error: String, retryable: bool) -> Attempted {
        Attempted {
            code,
            failure: Some(Failure {
                error,
                retryable,
                retry_after_ms: None,
            }),
        }
    }
}

/// Sends one delivery.
#[async_trait]
pub trait Sink: Send + Sync {
    async fn deliver(&self, sub: &Subscription, delivery: &Delivery) -> Attempted;
}

/// What an attempt's result does to its delivery: delivered; retried after a
/// backoff while it has been failing for less than `retry_for_ms`; dead
/// otherwise. Pure; `jitter` is a draw in `[0, 1)`.
pub fn decide(
    attempted: &Attempted,
    delivery: &Delivery,
    config: &NotifyConfig,
    now_us: UnixMicros,
    jitter: f64,
) -> DeliveryOutcome {
    let Some(failure) = &attempted.failure else {
        return DeliveryOutcome::Delivered {
            code: attempted.code,
        };
    };
    let failing_for_ms = (now_us - delivery.created_at_us).max(0) as u64 / 1_000;
    if !failure.retryable || failing_for_ms >= config.retry_for_ms {
        return DeliveryOutcome::Dead {
            error: failure.error.clone(),
            code: attempted.code,
        };
    }
    let policy = RetryPolicy {
        max_attempts: u32::MAX,
        initial_backoff_ms: config.initial_backoff_ms,
        max_backoff_ms: config.max_backoff_ms,
    };
    let wait_ms = backoff_ms(&policy, delivery.attempts, jitter, failure.retry_after_ms);
    // The last try comes no later than the end of the retry period.
    let wait_ms = wait_ms.min(config.retry_for_ms - failing_for_ms);
    DeliveryOutcome::Retry {
        at_us: now_us + wait_ms as i64 * 1_000,
        error: failure.error.clone(),
        code: attempted.code,
    }
}

/// The dispatcher's metric families.
#[derive(Clone)]
pub struct DispatchMetrics {
    attempts: IntCounterVec,
    lag: HistogramVec,
    outbox_lag: IntGauge,
}

impl DispatchMetrics {
    pub fn new(registry: &Registry) -> prometheus::Result<DispatchMetrics> {
        let attempts = IntCounterVec::new(
            Opts::new(
                "ripen_notification_attempts_total",
                "Notification delivery attempts on this node, by sink (webhook, email) and outcome (delivered, retry, dead).",
            ),
            &["sink", "outcome"],
        )?;
        let lag = HistogramVec::new(
            HistogramOpts::new(
                "ripen_notification_lag_seconds",
                "Time from a status change's commit to its delivery, by sink.",
            )
            .buckets(vec![
                0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0,
                3600.0,
            ]),
            &["sink"],
        )?;
        let outbox_lag = IntGauge::new(
            "ripen_outbox_lag_seconds",
            "Age of the oldest outbox row this node found not yet fanned out (0 when it caught up).",
        )?;
        registry.register(Box::new(attempts.clone()))?;
        registry.register(Box::new(lag.clone()))?;
        registry.register(Box::new(outbox_lag.clone()))?;
        Ok(DispatchMetrics {
            attempts,
            lag,
            outbox_lag,
        })
    }
}

pub struct Dispatcher {
    pub store: Arc<dyn Store>,
    pub hub: Arc<Hub>,
    pub clock: Arc<dyn Clock>,
    pub config: NotifyConfig,
    pub poll: Duration,
    pub webhook: Arc<dyn Sink>,
    pub email: Option<Arc<dyn Sink>>,
    pub metrics: DispatchMetrics,
    /// Each attempt is a span of its entity's trace.
    pub tracer: Option<crate::trace::Tracer>,
}

/// A finished attempt, on its way back to the dispatcher loop.
struct Done {
    subscription: String,
    kind: SinkKind,
    delivery: Delivery,
    attempted: Attempted,
    /// When the attempt began and ended, for its span.
    took: (std::time::SystemTime, std::time::SystemTime),
}

impl Dispatcher {
    /// Runs as long as the engine: when it stops, deliveries in flight are
    /// left to their leases.
    pub async fn run(self: Arc<Dispatcher>) {
        let (done_tx, mut done_rx) = mpsc::unbounded_channel::<Done>();
        let mut in_flight: HashMap<String, u32> = HashMap::new();
        let mut total = 0usize;
        let mut subs: HashMap<String, Arc<Subscription>> = HashMap::new();
        let mut subs_read: Option<tokio::time::Instant> = None;
        let mut last_prune = tokio::time::Instant::now();
        let every = prune_every(self.config.outbox_retention_ms);
        loop {
            let mut results = Vec::new();
            while let Ok(done) = done_rx.try_recv() {
                total -= 1;
                if let Some(n) = in_flight.get_mut(&done.subscription) {
                    *n -= 1;
                    if *n == 0 {
                        in_flight.remove(&done.subscription);
                    }
                }
                results.push(self.record(&done));
            }
            if subs_read.is_none_or(|at| at.elapsed() > SUBSCRIPTIONS_MAX_AGE) {
                if let Some(read) = self.subscriptions().await {
                    (subs, subs_read) = (read, Some(tokio::time::Instant::now()));
                }
            }
            let per = self.config.per_subscription;
            let claim = DeliveryClaim {
                limit: IN_FLIGHT_MAX.saturating_sub(total) as u32,
                lease_us: self.config.attempt_timeout_ms as i64 * 1_000 + LEASE_GRACE_US,
                per_subscription: per,
                room: in_flight
                    .iter()
                    .map(|(s, n)| (s.clone(), per.saturating_sub(*n)))
                    .collect(),
            };
            let limit = claim.limit;
            // The three go to the store together, so that on SQLite they
            // share the writer's next commit. A claim that runs before this
            // round's fan-out or results is repeated at once below.
            let now = self.clock.now_us();
            let (fanned, (), claimed) = tokio::join!(
                self.fan_out(),
                async {
                    if results.is_empty() {
                        return;
                    }
                    if let Err(e) = self.store.finish_deliveries(results, now).await {
                        // Their leases run out and they are sent again.
                        tracing::warn!(error = %e, "record notification deliveries");
                    }
                },
                async {
                    if limit == 0 {
                        return Ok(Vec::new());
                    }
                    self.store.claim_deliveries(claim, now).await
                },
            );
            let claimed = match claimed {
                Ok(claimed) => claimed,
                Err(e) => {
                    tracing::warn!(error = %e, "claim notification deliveries");
                    Vec::new()
                }
            };
            if claimed
                .iter()
                .any(|d| !subs.contains_key(&d.subscription_id))
            {
                // Created since this node last looked.
                if let Some(read) = self.subscriptions().await {
                    (subs, subs_read) = (read, Some(tokio::time::Instant::now()));
                }
            }
            let full = claimed.len() as u32 >= limit;
            for delivery in claimed {
                let Some(sub) = subs.get(&delivery.subscription_id).cloned() else {
                    // Deleted since: its lease runs out, and the row goes
                    // with the subscription.
                    continue;
                };
                let sink = match sub.kind {
                    SinkKind::Webhook => self.webhook.clone(),
                    SinkKind::Email => match &self.email {
                        Some(sink) => sink.clone(),
                        None => continue,
                    },
                };
                total += 1;
                *in_flight.entry(sub.id.clone()).or_default() += 1;
                let done_tx = done_tx.clone();
                tokio::spawn(async move {
                    let start = std::time::SystemTime::now();
                    let attempted = sink.deliver(&sub, &delivery).await;
                    let _ = done_tx.send(Done {
                        subscription: sub.id.clone(),
                        kind: sub.kind,
                        delivery,
                        attempted,
                        took: (start, std::time::SystemTime::now()),
                    });
                });
            }
            if last_prune.elapsed() >= every {
                last_prune = tokio::time::Instant::now();
                self.prune().await;
            }
            // New deliveries, or a claim that took all it could, may leave
            // more to take now rather than at the next wake-up.
            if (fanned > 0 || full) && total < IN_FLIGHT_MAX {
                continue;
            }
            tokio::select! {
                _ = self.hub.written.notified() => {}
                _ = tokio::time::sleep(self.poll) => {}
                Some(done) = done_rx.recv() => {
                    // Put it back for the next round: handled above.
                    let _ = done_tx.send(done);
                }
            }
        }
    }

    /// Every subscription by id, or `None` (logged) when the store cannot
    /// say; the dispatcher then keeps what it had.
    async fn subscriptions(&self) -> Option<HashMap<String, Arc<Subscription>>> {
        match self.store.subscription_list().await {
            Ok(list) => Some(
                list.into_iter()
                    .map(|s| (s.id.clone(), Arc::new(s)))
                    .collect(),
            ),
            Err(e) => {
                tracing::warn!(error = %e, "read the subscriptions");
                None
            }
        }
    }

    /// Fans out everything waiting, and says how many deliveries that
    /// made; the outbox lag gauge follows.
    async fn fan_out(&self) -> usize {
        let mut made = 0;
        loop {
            match self.store.fan_out(FAN_OUT_BATCH, self.clock.now_us()).await {
                Ok(round) if round.rows >= FAN_OUT_BATCH as usize => {
                    made += round.deliveries;
                    // More waits: show how far behind this node found it.
                    if let Ok(next) = self.store.outbox(round.last_pos, 1).await {
                        if let Some(oldest) = next.first() {
                            let age = (self.clock.now_us() - oldest.at_us).max(0) / 1_000_000;
                            self.metrics.outbox_lag.set(age);
                        }
                    }
                }
                Ok(round) => {
                    self.metrics.outbox_lag.set(0);
                    return made + round.deliveries;
                }
                Err(e) => {
                    tracing::warn!(error = %e, "fan the outbox out to subscriptions");
                    return made;
                }
            }
        }
    }

    fn record(&self, done: &Done) -> DeliveryResult {
        let now = self.clock.now_us();
        let outcome = decide(
            &done.attempted,
            &done.delivery,
            &self.config,
            now,
            fastrand::f64(),
        );
        let sink = done.kind.as_str();
        let n = &done.delivery.notification;
        let label = match &outcome {
            DeliveryOutcome::Delivered { .. } => {
                let lag = (now - n.at_us).max(0) as f64 / 1e6;
                self.metrics.lag.with_label_values(&[sink]).observe(lag);
                "delivered"
            }
            DeliveryOutcome::Retry { error, .. } => {
                tracing::info!(
                    subscription = %done.subscription,
                    delivery = done.delivery.id,
                    entity_id = %n.entity_id,
                    event = %n.event,
                    attempt = done.delivery.attempts,
                    error = %error,
                    "notification delivery failed; it will be retried"
                );
                "retry"
            }
            DeliveryOutcome::Dead { error, .. } => {
                tracing::warn!(
                    subscription = %done.subscription,
                    delivery = done.delivery.id,
                    entity_id = %n.entity_id,
                    event = %n.event,
                    attempt = done.delivery.attempts,
                    error = %error,
                    "notification delivery is dead; redeliver it once the receiver is fixed"
                );
                "dead"
            }
        };
        self.metrics
            .attempts
            .with_label_values(&[sink, label])
            .inc();
        if let Some(tracer) = &self.tracer {
            tracer.record(delivery_span(done, sink, label));
        }
        DeliveryResult {
            id: done.delivery.id,
            attempts: done.delivery.attempts,
            outcome,
        }
    }

    async fn prune(&self) {
        let before = self.clock.now_us() - self.config.outbox_retention_ms as i64 * 1_000;
        loop {
            match self.store.prune_outbox(before, PRUNE_BATCH).await {
                Ok(n) if n >= u64::from(PRUNE_BATCH) => tokio::task::yield_now().await,
                Ok(_) => return,
                Err(e) => {
                    tracing::warn!(error = %e, "prune the outbox");
                    return;
                }
            }
        }
    }
}

/// The span of one delivery attempt: a child of its entity's intake span.
fn delivery_span(done: &Done, sink: &str, outcome: &str) -> crate::trace::Span {
    use crate::trace::{self, Kind, Value};
    let n = &done.delivery.notification;
    let mut attributes = vec![
        ("ripen.entity_id", Value::Str(n.entity_id.to_string())),
        ("ripen.entity_type", Value::Str(n.type_name.clone())),
        ("ripen.event", Value::Str(n.event.clone())),
        ("ripen.subscription", Value::Str(done.subscription.clone())),
        ("ripen.sink", Value::Str(sink.to_owned())),
        ("ripen.delivery", Value::Int(done.delivery.id as i64)),
        (
            "ripen.attempt",
            Value::Int(i64::from(done.delivery.attempts)),
        ),
        ("ripen.outcome", Value::Str(outcome.to_owned())),
    ];
    if let Some(code) = done.attempted.code {
        attributes.push(("http.response.status_code", Value::Int(i64::from(code))));
    }
    trace::Span {
        trace_id: trace::trace_id(n.entity_id),
        span_id: trace::delivery_span_id(n.entity_id, done.delivery.id, done.delivery.attempts),
        parent: Some(trace::root_span_id(n.entity_id)),
        name: format!("notify {}", n.event),
        kind: Kind::Producer,
        start: done.took.0,
        end: done.took.1,
        attributes,
        error: done.attempted.failure.as_ref().map(|f| f.error.clone()),
        links: Vec::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ripen_store::{DeliveryStatus, EntityId, Notification};

    #[test]
    fn a_short_outbox_retention_prunes_as_often() {
        assert_eq!(prune_every(24 * 3_600_000), Duration::from_secs(60));
        assert_eq!(prune_every(10_000), Duration::from_secs(10));
        assert_eq!(prune_every(0), Duration::from_secs(1));
    }

    fn delivery(attempts: u32, created_at_us: UnixMicros) -> Delivery {
        Delivery {
            id: 1,
            subscription_id: "s".into(),
            notification: Notification {
                pos: 1,
                entity_id: EntityId::new_v7(),
                tenant: "t".into(),
                type_name: "m".into(),
                version: 1,
                seq: 1,
                at_us: 0,
                event: "entity.ready".into(),
                status: "ready".into(),
                degraded: false,
            },
            status: DeliveryStatus::Pending,
            attempts,
            next_at_us: None,
            last_error: None,
            last_code: None,
            created_at_us,
            updated_at_us: created_at_us,
        }
    }

    fn config() -> NotifyConfig {
        NotifyConfig {
            retry_for_ms: 60_000,
            initial_backoff_ms: 1_000,
            max_backoff_ms: 8_000,
            ..NotifyConfig::default()
        }
    }

    #[test]
    fn results_become_deliveries_retries_and_deaths() {
        let c = config();
        let d = delivery(1, 0);
        assert_eq!(
            decide(&Attempted::delivered(Some(204)), &d, &c, 5, 0.5),
            DeliveryOutcome::Delivered { code: Some(204) }
        );
        let failed = Attempted::failed(Some(503), "HTTP 503".into(), true);
        // Full jitter: the draw scales the ceiling, which doubles per attempt.
        for (attempts, jitter, wait_ms) in [
            (1, 1.0, 1_000),
            (2, 1.0, 2_000),
            (3, 0.5, 2_000),
            (9, 1.0, 8_000),
        ] {
            let outcome = decide(&failed, &delivery(attempts, 0), &c, 1_000_000, jitter);
            assert_eq!(
                outcome,
                DeliveryOutcome::Retry {
                    at_us: 1_000_000 + wait_ms * 1_000,
                    error: "HTTP 503".into(),
                    code: Some(503)
                },
                "attempt {attempts}"
            );
        }
        // Never past the end of the period; dead once it is over.
        let near_end = decide(&failed, &delivery(9, 0), &c, 59_000_000, 1.0);
        assert!(
            matches!(
                near_end,
                DeliveryOutcome::Retry {
                    at_us: 60_000_000,
                    ..
                }
            ),
            "{near_end:?}"
        );
        let over = decide(&failed, &delivery(9, 0), &c, 60_000_000, 1.0);
        assert!(matches!(over, DeliveryOutcome::Dead { .. }), "{over:?}");
        // A refusal is dead at once; a Retry-After is a floor.
        let refused = Attempted::failed(None, "refused".into(), false);
        assert!(matches!(
            decide(&refused, &d, &c, 5, 0.5),
            DeliveryOutcome::Dead { .. }
        ));
        let mut later = Attempted::failed(Some(429), "HTTP 429".into(), true);
        later.failure.as_mut().expect("failure").retry_after_ms = Some(30_000);
        assert!(matches!(
            decide(&later, &d, &c, 0, 0.0),
            DeliveryOutcome::Retry {
                at_us: 30_000_000,
                ..
            }
        ));
    }
}
