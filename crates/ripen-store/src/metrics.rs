//! What the store's decisions count, and how long its calls take.
//!
//! [`DecisionMetrics`] is fed by the [`Decider`](crate::working::Decider),
//! the one place where every backend decides: attempts by outcome, retries,
//! lease expiries, stale completions, status changes and the time from
//! submission to `ready`. [`Instrumented`] wraps any [`Store`] and measures
//! each call's latency and errors. Both register into a Prometheus
//! [`Registry`] that the runtime serves.
//!
//! Labels are bounded: entity type, step, outcome, status, call. Never an
//! entity id.

use async_trait::async_trait;
use prometheus::{
    Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, Opts, Registry,
};
use ripen_core::{EntityStatus, Event, LostReason, Pipeline, UnixMicros};

use crate::history::HistoryEvent;
use crate::{
    Claim, ClaimBatch, CommandOutcome, CompleteBatch, Completion, EntityData, EntityId,
    EntityRecord, Heartbeat, IntakeOutcome, ListQuery, NewEntity, OutboxEntry, Result, Store,
    StoreError, WorkWatcher,
};

/// Buckets of latencies from a millisecond to a few minutes, in seconds.
pub const LATENCY_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0,
];

/// Counters of the store's decisions.
#[derive(Clone)]
pub struct DecisionMetrics {
    attempts: IntCounterVec,
    retries: IntCounterVec,
    lease_expiries: IntCounterVec,
    stale: IntCounter,
    status_changes: IntCounterVec,
    ready_seconds: HistogramVec,
    compensations: IntCounterVec,
}

impl std::fmt::Debug for DecisionMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("DecisionMetrics")
    }
}

impl Default for DecisionMetrics {
    fn default() -> DecisionMetrics {
        DecisionMetrics::new()
    }
}

fn counter_vec(name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    IntCounterVec::new(Opts::new(name, help), labels).expect("a valid metric")
}

impl DecisionMetrics {
    pub fn new() -> DecisionMetrics {
        DecisionMetrics {
            attempts: counter_vec(
                "ripen_step_attempts_total",
                "Step attempts that ended, by entity type, step and outcome (succeeded, retryable_error, permanent_error, lease_expired, node_restarted).",
                &["type", "step", "outcome"],
            ),
            retries: counter_vec(
                "ripen_retries_scheduled_total",
                "Retries scheduled after a failed or lost attempt, by entity type and step.",
                &["type", "step"],
            ),
            lease_expiries: counter_vec(
                "ripen_lease_expiries_total",
                "Attempts lost because their lease expired before a result, by entity type and step.",
                &["type", "step"],
            ),
            stale: IntCounter::new(
                "ripen_stale_completions_total",
                "Results and heartbeats refused because their lease no longer held.",
            )
            .expect("a valid metric"),
            status_changes: counter_vec(
                "ripen_entity_status_changes_total",
                "Status changes of entities, by entity type and the status reached (pending: an operator retry; degraded: a non-critical step failed for good). Submissions are ripen_intake_requests_total.",
                &["type", "status"],
            ),
            ready_seconds: HistogramVec::new(
                HistogramOpts::new(
                    "ripen_submit_to_ready_seconds",
                    "Time from an entity's submission to its becoming ready, by entity type.",
                )
                .buckets(LATENCY_BUCKETS.to_vec()),
                &["type"],
            )
            .expect("a valid metric"),
            compensations: counter_vec(
                "ripen_compensations_total",
                "Compensations of failed or cancelled entities, by entity type and what happened (started, done, failed: a compensation step failed for good and waits for an operator retry).",
                &["type", "outcome"],
            ),
        }
    }

    /// Adds every family to `registry`.
    pub fn register(&self, registry: &Registry) -> prometheus::Result<()> {
        registry.register(Box::new(self.attempts.clone()))?;
        registry.register(Box::new(self.retries.clone()))?;
        registry.register(Box::new(self.lease_expiries.clone()))?;
        registry.register(Box::new(self.stale.clone()))?;
        registry.register(Box::new(self.status_changes.clone()))?;
        registry.register(Box::new(self.ready_seconds.clone()))?;
        registry.register(Box::new(self.compensations.clone()))?;
        Ok(())
    }

    pub fn stale(&self) {
        self.stale.inc();
    }

    pub fn stale_count(&self) -> u64 {
        self.stale.get()
    }

    /// Counts what `events` of one entity of `pipeline` say happened.
    pub fn observe(
        &self,
        pipeline: &Pipeline,
        record: &EntityRecord,
        ready_at_us: Option<UnixMicros>,
        events: &[Event],
    ) {
        let t = record.type_name.as_str();
        let name = |step: usize| pipeline.step(step).name.as_str();
        for e in events {
            match e {
                Event::StepSucceeded { step, .. } => {
                    self.attempts
                        .with_label_values(&[t, name(*step), "succeeded"])
                        .inc();
                }
                Event::AttemptFailed {
                    step,
                    retryable,
                    lost,
                    ..
                } => {
                    let outcome = match (lost, retryable) {
                        (Some(LostReason::LeaseExpired), _) => {
                            self.lease_expiries
                                .with_label_values(&[t, name(*step)])
                                .inc();
                            "lease_expired"
                        }
                        (Some(LostReason::NodeRestarted), _) => "node_restarted",
                        (None, true) => "retryable_error",
                        (None, false) => "permanent_error",
                    };
                    self.attempts
                        .with_label_values(&[t, name(*step), outcome])
                        .inc();
                }
                Event::RetryScheduled { step, .. } => {
                    self.retries.with_label_values(&[t, name(*step)]).inc();
                }
                Event::StatusChanged { to, .. } => {
                    self.status_changes
                        .with_label_values(&[t, to.as_str()])
                        .inc();
                    if *to == EntityStatus::Ready {
                        if let Some(ready) = ready_at_us {
                            let us = (ready - record.created_at_us).max(0);
                            self.ready_seconds
                                .with_label_values(&[t])
                                .observe(us as f64 / 1e6);
                        }
                    }
                }
                Event::Degraded { .. } => {
                    self.status_changes
                        .with_label_values(&[t, "degraded"])
                        .inc();
                }
                Event::CompensationStarted => {
                    self.compensations.with_label_values(&[t, "started"]).inc();
                }
                Event::CompensationDone => {
                    self.compensations.with_label_values(&[t, "done"]).inc();
                }
                Event::CompensationFailed { .. } => {
                    self.compensations.with_label_values(&[t, "failed"]).inc();
                }
                Event::StepStarted { .. }
                | Event::StepFailed { .. }
                | Event::StepSkipped { .. }
                | Event::StepRequeued { .. }
                | Event::DependencyReady { .. }
                | Event::DependencyFailed { .. } => {}
            }
        }
    }
}

/// How a backend's commits go: `ripen_store_commit_seconds` (the time from
/// the start of a transaction to its durable commit) and
/// `ripen_store_commit_batch_size` (the commands one commit carried).
#[derive(Clone)]
pub struct CommitMetrics {
    seconds: Histogram,
    batch: Histogram,
}

impl Default for CommitMetrics {
    fn default() -> CommitMetrics {
        CommitMetrics {
            seconds: Histogram::with_opts(
                HistogramOpts::new(
                    "ripen_store_commit_seconds",
                    "Time from the start of a write transaction to its durable commit.",
                )
                .buckets(LATENCY_BUCKETS.to_vec()),
            )
            .expect("a valid metric"),
            batch: Histogram::with_opts(
                HistogramOpts::new(
                    "ripen_store_commit_batch_size",
                    "Write commands (submissions, claims, results) committed by one transaction.",
                )
                .buckets(vec![
                    1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0,
                ]),
            )
            .expect("a valid metric"),
        }
    }
}

impl CommitMetrics {
    pub fn observe(&self, seconds: f64, commands: usize) {
        self.seconds.observe(seconds);
        self.batch.observe(commands as f64);
    }

    pub fn register(&self, registry: &Registry) -> prometheus::Result<()> {
        registry.register(Box::new(self.seconds.clone()))?;
        registry.register(Box::new(self.batch.clone()))
    }
}

// ---------------------------------------------------------------------------
// The instrumented store

/// A [`Store`] whose every call is timed and whose errors are counted, by
/// call: `ripen_store_call_duration_seconds{call}` and
/// `ripen_store_errors_total{call, kind}`.
pub struct Instrumented<S> {
    inner: S,
    calls: HistogramVec,
    errors: IntCounterVec,
}

impl<S: Store> Instrumented<S> {
    pub fn new(inner: S) -> Instrumented<S> {
        Instrumented {
            inner,
            calls: HistogramVec::new(
                HistogramOpts::new(
                    "ripen_store_call_duration_seconds",
                    "Latency of the store's calls, by call; a write's includes its wait for the shared commit.",
                )
                .buckets(LATENCY_BUCKETS.to_vec()),
                &["call"],
            )
            .expect("a valid metric"),
            errors: counter_vec(
                "ripen_store_errors_total",
                "Failed store calls, by call and kind (unavailable, unknown_pipeline, internal).",
                &["call", "kind"],
            ),
        }
    }

    pub fn inner(&self) -> &S {
        &self.inner
    }

    async fn timed<T>(
        &self,
        call: &str,
        f: impl std::future::Future<Output = Result<T>>,
    ) -> Result<T> {
        let timer = Timer::start(self.calls.with_label_values(&[call]));
        let result = f.await;
        timer.stop();
        if let Err(e) = &result {
            let kind = match e {
                StoreError::Unavailable(_) => "unavailable",
                StoreError::Overloaded(_) => "overloaded",
                StoreError::UnknownPipeline { .. } => "unknown_pipeline",
                StoreError::Internal(_) => "internal",
            };
            self.errors.with_label_values(&[call, kind]).inc();
        }
        result
    }
}

/// Observes the time from `start` to `stop` (or to its drop, for a call
/// whose future was dropped).
struct Timer {
    histogram: Histogram,
    started: std::time::Instant,
    done: bool,
}

impl Timer {
    fn start(histogram: Histogram) -> Timer {
        Timer {
            histogram,
            started: std::time::Instant::now(),
            done: false,
        }
    }

    fn stop(mut self) {
        self.observe();
    }

    fn observe(&mut self) {
        if !self.done {
            self.done = true;
            self.histogram.observe(self.started.elapsed().as_secs_f64());
        }
    }
}

impl Drop for Timer {
    fn drop(&mut self) {
        self.observe();
    }
}

#[async_trait]
impl<S: Store> Store for Instrumented<S> {
    async fn create(&self, entity: NewEntity, now_us: UnixMicros) -> Result<IntakeOutcome> {
        self.timed("create", self.inner.create(entity, now_us))
            .await
    }
    async fn claim_due(&self, claim: Claim<'_>, now_us: UnixMicros) -> Result<ClaimBatch> {
        self.timed("claim_due", self.inner.claim_due(claim, now_us))
            .await
    }
    async fn heartbeat(
        &self,
        beats: Vec<Heartbeat>,
        now_us: UnixMicros,
    ) -> Result<Vec<Option<UnixMicros>>> {
        self.timed("heartbeat", self.inner.heartbeat(beats, now_us))
            .await
    }
    async fn complete(
        &self,
        completions: Vec<Completion>,
        claim_queue: Option<&str>,
        now_us: UnixMicros,
    ) -> Result<CompleteBatch> {
        self.timed(
            "complete",
            self.inner.complete(completions, claim_queue, now_us),
        )
        .await
    }
    async fn recover(&self, now_us: UnixMicros) -> Result<u64> {
        self.timed("recover", self.inner.recover(now_us)).await
    }
    async fn cancel(
        &self,
        tenant: &str,
        id: EntityId,
        now_us: UnixMicros,
    ) -> Result<CommandOutcome> {
        self.timed("cancel", self.inner.cancel(tenant, id, now_us))
            .await
    }
    async fn retry(
        &self,
        tenant: &str,
        id: EntityId,
        now_us: UnixMicros,
    ) -> Result<CommandOutcome> {
        self.timed("retry", self.inner.retry(tenant, id, now_us))
            .await
    }
    async fn get(&self, tenant: &str, id: EntityId) -> Result<Option<EntityRecord>> {
        self.timed("get", self.inner.get(tenant, id)).await
    }
    async fn get_data(&self, tenant: &str, id: EntityId) -> Result<Option<EntityData>> {
        self.timed("get_data", self.inner.get_data(tenant, id))
            .await
    }
    async fn list(&self, tenant: &str, query: ListQuery) -> Result<Vec<EntityRecord>> {
        self.timed("list", self.inner.list(tenant, query)).await
    }
    async fn events(
        &self,
        tenant: &str,
        id: EntityId,
        after_seq: u64,
        limit: u32,
    ) -> Result<Option<Vec<HistoryEvent>>> {
        self.timed("events", self.inner.events(tenant, id, after_seq, limit))
            .await
    }
    async fn outbox(&self, after_id: u64, limit: u32) -> Result<Vec<OutboxEntry>> {
        self.timed("outbox", self.inner.outbox(after_id, limit))
            .await
    }
    async fn outbox_head(&self) -> Result<u64> {
        self.timed("outbox_head", self.inner.outbox_head()).await
    }
    async fn resolve_dependencies(&self, now_us: UnixMicros) -> Result<crate::deps::Resolved> {
        self.timed(
            "resolve_dependencies",
            self.inner.resolve_dependencies(now_us),
        )
        .await
    }
    async fn fan_out(&self, limit: u32, now_us: UnixMicros) -> Result<crate::FanOut> {
        self.timed("fan_out", self.inner.fan_out(limit, now_us))
            .await
    }
    async fn prune(&self, prune: crate::Prune, now_us: UnixMicros) -> Result<crate::Pruned> {
        self.timed("prune", self.inner.prune(prune, now_us)).await
    }
    async fn stats(&self) -> Result<crate::StoreStats> {
        self.inner.stats().await
    }
    async fn payloads_kept(&self, ids: Vec<EntityId>) -> Result<Vec<EntityId>> {
        self.inner.payloads_kept(ids).await
    }
    async fn prune_outbox(&self, before_us: UnixMicros, limit: u32) -> Result<u64> {
        self.timed("prune_outbox", self.inner.prune_outbox(before_us, limit))
            .await
    }
    async fn put_subscription(&self, sub: crate::Subscription) -> Result<crate::Subscription> {
        self.timed("put_subscription", self.inner.put_subscription(sub))
            .await
    }
    async fn subscriptions(
        &self,
        tenant: Option<&str>,
    ) -> Result<Vec<(crate::Subscription, crate::DeliveryCounts)>> {
        self.timed("subscriptions", self.inner.subscriptions(tenant))
            .await
    }
    async fn subscription_list(&self) -> Result<Vec<crate::Subscription>> {
        self.timed("subscription_list", self.inner.subscription_list())
            .await
    }
    async fn delete_subscription(&self, tenant: &str, id: &str) -> Result<bool> {
        self.timed(
            "delete_subscription",
            self.inner.delete_subscription(tenant, id),
        )
        .await
    }
    async fn claim_deliveries(
        &self,
        claim: crate::DeliveryClaim,
        now_us: UnixMicros,
    ) -> Result<Vec<crate::Delivery>> {
        self.timed(
            "claim_deliveries",
            self.inner.claim_deliveries(claim, now_us),
        )
        .await
    }
    async fn finish_deliveries(
        &self,
        results: Vec<crate::DeliveryResult>,
        now_us: UnixMicros,
    ) -> Result<()> {
        self.timed(
            "finish_deliveries",
            self.inner.finish_deliveries(results, now_us),
        )
        .await
    }
    async fn deliveries(
        &self,
        subscription_id: &str,
        query: crate::DeliveryQuery,
    ) -> Result<Vec<crate::Delivery>> {
        self.timed("deliveries", self.inner.deliveries(subscription_id, query))
            .await
    }
    async fn redeliver(
        &self,
        tenant: &str,
        delivery_id: u64,
        now_us: UnixMicros,
    ) -> Result<crate::RedeliverOutcome> {
        self.timed(
            "redeliver",
            self.inner.redeliver(tenant, delivery_id, now_us),
        )
        .await
    }
    async fn counts(&self, now_us: UnixMicros) -> Result<crate::Counts> {
        self.timed("counts", self.inner.counts(now_us)).await
    }
    async fn register_type(
        &self,
        version: crate::NewTypeVersion,
        now_us: UnixMicros,
    ) -> Result<crate::Registered> {
        let call = self.inner.register_type(version, now_us);
        self.timed("register_type", call).await
    }
    async fn type_heads(&self) -> Result<Vec<crate::TypeHead>> {
        self.timed("type_heads", self.inner.type_heads()).await
    }
    async fn type_versions(&self, type_name: Option<&str>) -> Result<Vec<crate::TypeVersion>> {
        self.timed("type_versions", self.inner.type_versions(type_name))
            .await
    }
    async fn live_entities(&self, tenant: &str, type_name: &str) -> Result<Vec<(u32, u64)>> {
        let call = self.inner.live_entities(tenant, type_name);
        self.timed("live_entities", call).await
    }
    async fn put_key(&self, key: crate::ApiKey) -> Result<()> {
        self.timed("put_key", self.inner.put_key(key)).await
    }
    async fn key_by_hash(&self, hash: &str) -> Result<Option<crate::ApiKey>> {
        self.timed("key_by_hash", self.inner.key_by_hash(hash))
            .await
    }
    async fn keys(&self, tenant: Option<&str>) -> Result<Vec<crate::ApiKey>> {
        self.timed("keys", self.inner.keys(tenant)).await
    }
    async fn revoke_key(
        &self,
        tenant: Option<&str>,
        id: &str,
        now_us: UnixMicros,
    ) -> Result<Option<crate::ApiKey>> {
        let call = self.inner.revoke_key(tenant, id, now_us);
        self.timed("revoke_key", call).await
    }
    async fn reseal(&self, values: Vec<crate::Reseal>) -> Result<u64> {
        self.timed("reseal", self.inner.reseal(values)).await
    }
    async fn any_keys(&self) -> Result<bool> {
        self.timed("any_keys", self.inner.any_keys()).await
    }
    async fn fail_unrunnable(
        &self,
        ids: Vec<EntityId>,
        now_us: UnixMicros,
    ) -> Result<Vec<crate::EntityRecord>> {
        let call = self.inner.fail_unrunnable(ids, now_us);
        self.timed("fail_unrunnable", call).await
    }
    async fn ping(&self) -> Result<()> {
        self.timed("ping", self.inner.ping()).await
    }
    async fn clock_us(&self) -> Result<UnixMicros> {
        self.timed("clock", self.inner.clock_us()).await
    }
    fn stale_completions(&self) -> u64 {
        self.inner.stale_completions()
    }
    fn is_shared(&self) -> bool {
        self.inner.is_shared()
    }
    fn watch_work(&self, watcher: WorkWatcher) {
        self.inner.watch_work(watcher)
    }
    fn watch_changes(&self, watcher: crate::ChangeWatcher) {
        self.inner.watch_changes(watcher)
    }
    fn register_metrics(&self, registry: &Registry) -> prometheus::Result<()> {
        registry.register(Box::new(self.calls.clone()))?;
        registry.register(Box::new(self.errors.clone()))?;
        self.inner.register_metrics(registry)
    }
}
