//! The scheduler: claims runnable steps, runs them, records their results.
//!
//! Three kinds of task cooperate:
//! - the claim loop asks the store for due steps of this node's queues
//!   whenever it is woken (an intake commit, a freed slot) or the earliest
//!   due time arrives (a backoff ending, a lease expiring). That one deadline
//!   is the only timer: there is no per-entity sleep and no polling loop
//!   beyond a slow fallback.
//! - one task per attempt runs the executor and sends the outcome on. The
//!   scheduler owns these tasks, so that a shutdown can wait for them;
//! - the completer drains outcomes in batches, records them in one store
//!   call, and dispatches at once the steps that this commit made runnable.
//!
//! Intake goes first. While a burst of submissions is being accepted
//! ([`IntakeLoad::busy`]), the scheduler keeps at most
//! [`ATTEMPTS_WHILE_INTAKE_BUSY`] attempts running and results claim nothing
//! more, so that acknowledging submissions gets the cores; the pipelines
//! catch up once the burst ends, and a trickle keeps them moving meanwhile.
//!
//! A shutdown drains: the claim loop stops, nothing new starts, the running
//! attempts get until the grace period ends to finish, and the completer
//! records every result they produced before it ends. An attempt still
//! running after the grace is abandoned; its lease expires and the step runs
//! again, as after a crash.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use ripen_store::Pipelines;
use ripen_store::{Attempt, Claim, Completion, CompletionResult, Outcome, Store};

use crate::metrics::{outcome_label, EngineMetrics};
use crate::trace::{self, Span, Tracer};
use tokio::sync::{mpsc, watch, Notify, Semaphore};
use tokio::task::JoinSet;
use tokio::time::Instant;

use crate::config::EngineConfig;
use crate::executor::ExecutorRegistry;
use crate::intake::IntakeLoad;
use crate::time::Clock;

/// The most steps claimed in one store call.
const CLAIM_BATCH_MAX: usize = 512;
/// The most results recorded in one store call.
const COMPLETE_BATCH_MAX: usize = 1024;
/// The most store calls recording results at once.
const COMPLETE_IN_FLIGHT_MAX: usize = 4;
/// How long to wait before asking a failing store again.
const STORE_RETRY_MS: u64 = 200;
/// Attempts running at once while intake is busy: enough to keep every
/// pipeline moving (against a fast downstream, four attempts still run
/// thousands of steps a second), few enough to leave the cores to intake.
/// Measured with the bench on 2 cores, with claims in handfuls and results
/// gathered: 16 gave burst intake 5,200–8,300 acks/s and W5 2,500–2,700
/// entities/s at 0.50 ms of CPU each; 4 gave 5,300–5,600 acks/s and W5
/// 3,070–3,150/s at 0.41 ms, the pipeline's work being cheaper in the
/// large batches of the catch-up than trickled beside intake.
pub const ATTEMPTS_WHILE_INTAKE_BUSY: usize = 4;

/// How long results wait for company before they are recorded while intake
/// is busy.
const RESULTS_GATHER_WHILE_BUSY: Duration = Duration::from_millis(5);

/// How long a shutdown waits, after the attempts have ended, for their
/// results to be recorded. A healthy store takes milliseconds; this bounds a
/// failing one.
const FINAL_RECORD_MAX: Duration = Duration::from_secs(2);

/// What a shutdown did with the attempts this node held.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Drained {
    /// Attempts that ended within the grace period; their results were
    /// handed to the completer, which records them before it ends.
    pub finished: usize,
    /// Attempts still running when the grace period ended. They were cut
    /// short; their leases expire and their steps run again.
    pub abandoned: usize,
    /// Claimed attempts that never started because the node was stopping.
    /// Their leases expire and their steps run again, without a downstream
    /// call having happened here.
    pub unstarted: usize,
}

/// The attempt tasks of one scheduler.
struct Attempts {
    /// `None` once a shutdown has begun: nothing new starts then.
    tasks: Mutex<Option<JoinSet<Ran>>>,
    draining: AtomicBool,
    /// Attempts claimed after the shutdown began, which were never started.
    refused: AtomicUsize,
}

/// Whether an attempt task ran its executor.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Ran {
    Yes,
    /// The node began to stop while the attempt waited for a slot.
    No,
}

struct Shared {
    store: Arc<dyn Store>,
    /// The pipelines of every type version this node can run.
    pipelines: Pipelines,
    executors: Arc<ExecutorRegistry>,
    clock: Arc<dyn Clock>,
    /// Bounds the attempts in flight.
    slots: Arc<Semaphore>,
    /// `engine.concurrency`, the permits of `slots`.
    concurrency: usize,
    /// Submissions being accepted; while it is busy, pipeline work waits.
    intake: Arc<IntakeLoad>,
    metrics: Arc<EngineMetrics>,
    tracer: Option<Tracer>,
    wake: Arc<Notify>,
    results: mpsc::Sender<Completion>,
    attempts: Attempts,
}

/// The long-lived tasks, taken by the shutdown that joins them.
struct Loops {
    claim: JoinSet<()>,
    completer: JoinSet<()>,
}

/// What the scheduler tells about the attempts it runs.
pub struct Observers {
    pub metrics: Arc<EngineMetrics>,
    /// Exports a span per attempt when set.
    pub tracer: Option<Tracer>,
}

pub struct Scheduler {
    shared: Arc<Shared>,
    /// Stops the claim loop.
    stop: watch::Sender<bool>,
    /// Tells the completer to record what is left and end.
    finish: watch::Sender<bool>,
    loops: Mutex<Option<Loops>>,
}

impl Scheduler {
    /// Starts claiming from the queues of `executors` and running what it claims.
    pub fn start(
        store: Arc<dyn Store>,
        pipelines: impl Into<Pipelines>,
        executors: Arc<ExecutorRegistry>,
        clock: Arc<dyn Clock>,
        intake: Arc<IntakeLoad>,
        observers: Observers,
        config: &EngineConfig,
    ) -> Scheduler {
        let Observers { metrics, tracer } = observers;
        let (results_tx, results_rx) = mpsc::channel(config.concurrency.max(COMPLETE_BATCH_MAX));
        let shared = Arc::new(Shared {
            store,
            pipelines: pipelines.into(),
            executors,
            clock,
            slots: Arc::new(Semaphore::new(config.concurrency)),
            concurrency: config.concurrency,
            intake,
            metrics,
            tracer,
            wake: Arc::new(Notify::new()),
            results: results_tx,
            attempts: Attempts {
                tasks: Mutex::new(Some(JoinSet::new())),
                draining: AtomicBool::new(false),
                refused: AtomicUsize::new(0),
            },
        });
        let (stop, stop_rx) = watch::channel(false);
        let (finish, finish_rx) = watch::channel(false);
        let mut loops = Loops {
            claim: JoinSet::new(),
            completer: JoinSet::new(),
        };
        let scheduler = |loops| Scheduler {
            shared: shared.clone(),
            stop,
            finish,
            loops: Mutex::new(Some(loops)),
        };
        if !config.execute {
            tracing::info!("engine.execute is off: this node runs no steps");
            return scheduler(loops);
        }
        if shared.executors.local_queues().is_empty() {
            tracing::info!("no executor consumes a queue here: this node runs no steps");
            return scheduler(loops);
        }
        loops.claim.spawn(claim_loop(
            shared.clone(),
            Duration::from_millis(config.poll_interval_ms),
            stop_rx,
        ));
        loops
            .completer
            .spawn(complete_loop(shared.clone(), results_rx, finish_rx));
        scheduler(loops)
    }

    /// Wakes the claim loop: new work may be runnable.
    pub fn waker(&self) -> Arc<Notify> {
        self.shared.wake.clone()
    }

    /// Stops claiming, gives the running attempts `grace` to finish, records
    /// their results, and ends every task of the scheduler. A second call
    /// finds nothing left to do.
    pub async fn shutdown(&self, grace: Duration) -> Drained {
        let deadline = Instant::now() + grace;
        let Some(mut loops) = lock(&self.loops).take() else {
            return Drained::default();
        };
        // The claim loop ends first, so that what it is claiming right now
        // still starts and is waited for, rather than left to expire.
        let _ = self.stop.send(true);
        while loops.claim.join_next().await.is_some() {}

        let attempts = &self.shared.attempts;
        attempts.draining.store(true, Ordering::SeqCst);
        let mut running = lock(&attempts.tasks).take().unwrap_or_default();
        tracing::info!(
            attempts = running.len(),
            grace_ms = grace.as_millis() as u64,
            "stopped claiming; waiting for running attempts"
        );
        let mut drained = Drained::default();
        let all_ended = tokio::time::timeout_at(deadline, async {
            while let Some(ended) = running.join_next().await {
                match ended {
                    Ok(Ran::Yes) => drained.finished += 1,
                    Ok(Ran::No) => drained.unstarted += 1,
                    Err(e) => tracing::error!(error = %e, "an attempt task failed"),
                }
            }
        })
        .await;
        if all_ended.is_err() {
            drained.abandoned = running.len();
            running.shutdown().await;
        }
        drained.unstarted += attempts.refused.load(Ordering::SeqCst);

        // Every result is in the channel now; the completer records them all
        // before it ends.
        let _ = self.finish.send(true);
        let recorded = tokio::time::timeout(FINAL_RECORD_MAX, async {
            while loops.completer.join_next().await.is_some() {}
        })
        .await;
        if recorded.is_err() {
            tracing::warn!(
                "the results of finished attempts could not be recorded in time; their leases will expire"
            );
        }
        if drained.abandoned > 0 {
            tracing::warn!(
                finished = drained.finished,
                abandoned = drained.abandoned,
                unstarted = drained.unstarted,
                "drained; attempts still running after the grace were abandoned and will run again once their leases expire"
            );
        } else {
            tracing::info!(
                finished = drained.finished,
                unstarted = drained.unstarted,
                "drained every running attempt"
            );
        }
        drained
    }
}

/// Locks a mutex that is never held across an await; a panic while it was
/// held leaves its data consistent, so poisoning is ignored.
fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

async fn claim_loop(shared: Arc<Shared>, poll: Duration, mut stop: watch::Receiver<bool>) {
    let queues: Vec<String> = shared
        .executors
        .local_queues()
        .into_iter()
        .map(str::to_owned)
        .collect();
    loop {
        if *stop.borrow() {
            return;
        }
        let mut sleep_for = poll;
        let mut filled = false;
        for queue in &queues {
            let free = free_slots(&shared);
            if free == 0 {
                break;
            }
            let started = std::time::Instant::now();
            let wall = std::time::SystemTime::now();
            match shared
                .store
                .claim_due(Claim::local(queue, free), shared.clock.now_us())
                .await
            {
                Ok(batch) => {
                    filled |= batch.attempts.len() >= free;
                    if let Some(tracer) = &shared.tracer {
                        let end = wall + started.elapsed();
                        for a in &batch.attempts {
                            tracer.record(claim_span(a, batch.attempts.len(), wall, end));
                        }
                    }
                    for attempt in batch.attempts {
                        dispatch(&shared, attempt);
                    }
                    if let Some(due) = batch.next_due_us {
                        let wait_us = (due - shared.clock.now_us()).max(0) as u64;
                        sleep_for = sleep_for.min(Duration::from_micros(wait_us));
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %e, queue, "claiming due steps failed; will try again");
                    sleep_for = sleep_for.min(Duration::from_millis(STORE_RETRY_MS));
                }
            }
        }
        // A full batch means more may be due at once: ask again without sleeping.
        if filled {
            continue;
        }
        tokio::select! {
            _ = shared.wake.notified() => {}
            _ = tokio::time::sleep(sleep_for) => {}
            _ = stop.changed() => {}
        }
    }
}

/// How many more attempts may start now: the free slots, or fewer while
/// intake is busy.
fn free_slots(shared: &Shared) -> usize {
    let available = shared.slots.available_permits();
    let free = available.min(CLAIM_BATCH_MAX);
    if !shared.intake.busy() {
        return free;
    }
    let running = shared.concurrency.saturating_sub(available);
    let cap = ATTEMPTS_WHILE_INTAKE_BUSY.min(shared.concurrency);
    let free = free.min(cap.saturating_sub(running));
    // Each claim is a store command of its own, which costs the writer as
    // much as a handful of submissions; while intake is busy, claim in
    // handfuls rather than at every freed slot (burst intake: 5,300 ->
    // 7,500 acks/s).
    if free < (cap / 2).max(1) {
        0
    } else {
        free
    }
}

/// Runs one claimed attempt on a task the scheduler owns. The attempt
/// already holds a lease, so it runs even if it must wait for a free slot;
/// once a shutdown has begun it does not start at all.
fn dispatch(shared: &Arc<Shared>, attempt: Attempt) {
    let mut guard = lock(&shared.attempts.tasks);
    let Some(tasks) = guard.as_mut() else {
        shared.attempts.refused.fetch_add(1, Ordering::Relaxed);
        return;
    };
    // Finished tasks stay in the set until they are reaped; reaping here
    // keeps the set as small as the attempts in flight.
    while let Some(ended) = tasks.try_join_next() {
        if let Err(e) = ended {
            tracing::error!(error = %e, "an attempt task failed");
        }
    }
    tasks.spawn(run_and_report(shared.clone(), attempt));
}

async fn run_and_report(shared: Arc<Shared>, attempt: Attempt) -> Ran {
    let Ok(slot) = shared.slots.clone().acquire_owned().await else {
        return Ran::No;
    };
    if shared.attempts.draining.load(Ordering::SeqCst) {
        return Ran::No;
    }
    let started = std::time::Instant::now();
    let wall = std::time::SystemTime::now();
    let outcome = run_attempt(&shared, &attempt).await;
    report(&shared, &attempt, &outcome, started.elapsed());
    if let Some(tracer) = &shared.tracer {
        tracer.record(attempt_span(&attempt, &outcome, wall, started.elapsed()));
    }
    let completion = Completion {
        entity_id: attempt.entity_id,
        step: attempt.step,
        epoch: attempt.epoch,
        outcome,
    };
    // The slot is freed before the result is recorded, so that the claim
    // loop can refill it while the completer batches; the completer wakes
    // the loop once the result is committed.
    drop(slot);
    if shared.results.send(completion).await.is_err() {
        tracing::debug!("the completer has ended; the result is dropped and its lease will expire");
    }
    Ran::Yes
}

/// The span of one attempt: a child of the entity's intake span, with the
/// id its step call's `traceparent` carried.
fn attempt_span(
    a: &Attempt,
    outcome: &Outcome,
    start: std::time::SystemTime,
    took: Duration,
) -> Span {
    let mut attributes = vec![
        (
            "ripen.entity_id",
            trace::Value::Str(a.entity_id.to_string()),
        ),
        ("ripen.entity_type", trace::Value::Str(a.type_name.clone())),
        ("ripen.step", trace::Value::Str(a.step_name.clone())),
        ("ripen.attempt", trace::Value::Int(i64::from(a.attempt))),
    ];
    let error = match outcome {
        Outcome::Succeeded { .. } => None,
        Outcome::Failed { error, .. } => {
            // The HTTP executor's errors start with the answer's status.
            if let Some(code) = error
                .strip_prefix("HTTP ")
                .and_then(|r| r.get(..3))
                .and_then(|c| c.parse::<i64>().ok())
            {
                attributes.push(("http.response.status_code", trace::Value::Int(code)));
            }
            Some(error.clone())
        }
    };
    let label = outcome_label(outcome);
    attributes.push(("ripen.outcome", trace::Value::Str(label.to_owned())));
    Span {
        trace_id: trace::trace_id(a.entity_id),
        span_id: trace::attempt_span_id(a.entity_id, a.step, a.epoch),
        parent: Some(trace::root_span_id(a.entity_id)),
        name: format!("attempt {}", a.step_name),
        kind: trace::Kind::Client,
        start,
        end: start + took,
        attributes,
        error,
        links: Vec::new(),
    }
}

/// The span of the store commit that claimed an attempt: a child of the
/// entity's intake span, just before the attempt's own.
fn claim_span(
    a: &Attempt,
    batch: usize,
    start: std::time::SystemTime,
    end: std::time::SystemTime,
) -> Span {
    Span {
        trace_id: trace::trace_id(a.entity_id),
        span_id: trace::claim_span_id(a.entity_id, a.step, a.epoch),
        parent: Some(trace::root_span_id(a.entity_id)),
        name: format!("store commit: claim {}", a.step_name),
        kind: trace::Kind::Internal,
        start,
        end,
        attributes: vec![
            (
                "ripen.entity_id",
                trace::Value::Str(a.entity_id.to_string()),
            ),
            ("ripen.step", trace::Value::Str(a.step_name.clone())),
            ("ripen.attempt", trace::Value::Int(i64::from(a.attempt))),
            ("ripen.batch_size", trace::Value::Int(batch as i64)),
        ],
        error: None,
        links: Vec::new(),
    }
}

/// Counts and logs how an attempt ended. The store decides what the result
/// does to the entity; this only says what the executor saw.
fn report(shared: &Shared, a: &Attempt, outcome: &Outcome, elapsed: Duration) {
    let label = outcome_label(outcome);
    shared
        .metrics
        .attempt(&a.type_name, &a.step_name, label, elapsed);
    if let Outcome::Failed {
        error, retryable, ..
    } = outcome
    {
        let trace_id = a.entity_id.0.simple();
        if *retryable {
            tracing::info!(entity_id = %a.entity_id, r#type = %a.type_name, step = %a.step_name, attempt = a.attempt, %trace_id, error = %error, "attempt failed; the step's retry policy decides what follows");
        } else {
            tracing::warn!(entity_id = %a.entity_id, r#type = %a.type_name, step = %a.step_name, attempt = a.attempt, %trace_id, error = %error, "attempt failed for good");
        }
    }
}

async fn run_attempt(shared: &Shared, a: &Attempt) -> Outcome {
    let Some(pipeline) = shared.pipelines.get(&a.type_name, a.version) else {
        return Outcome::Failed {
            error: format!("no pipeline for {} version {}", a.type_name, a.version),
            retryable: false,
            retry_after_ms: None,
        };
    };
    shared.executors.run(pipeline.step(a.step), a).await
}

async fn complete_loop(
    shared: Arc<Shared>,
    mut results: mpsc::Receiver<Completion>,
    mut finish: watch::Receiver<bool>,
) {
    // Several batches may be recorded at once: a shared store runs them on
    // separate connections, an embedded one folds them into one group commit.
    let mut recording = JoinSet::new();
    loop {
        let mut batch = Vec::with_capacity(COMPLETE_BATCH_MAX);
        tokio::select! {
            n = results.recv_many(&mut batch, COMPLETE_BATCH_MAX) => {
                if n == 0 {
                    break;
                }
            }
            _ = finish.changed() => break,
        }
        // While intake is busy, each record is a store command competing
        // with submissions: let a few more results join it first.
        if shared.intake.busy() && batch.len() < ATTEMPTS_WHILE_INTAKE_BUSY / 2 {
            let gather = results.recv_many(&mut batch, COMPLETE_BATCH_MAX);
            let _ = tokio::time::timeout(RESULTS_GATHER_WHILE_BUSY, gather).await;
        }
        while recording.len() >= COMPLETE_IN_FLIGHT_MAX {
            recording.join_next().await;
        }
        recording.spawn(record(shared.clone(), batch));
    }
    // The shutdown asks to finish only once every attempt task has ended, so
    // what is in the channel now is every result there will be.
    results.close();
    loop {
        let mut batch = Vec::with_capacity(COMPLETE_BATCH_MAX);
        if results.recv_many(&mut batch, COMPLETE_BATCH_MAX).await == 0 {
            break;
        }
        while recording.len() >= COMPLETE_IN_FLIGHT_MAX {
            recording.join_next().await;
        }
        recording.spawn(record(shared.clone(), batch));
    }
    while recording.join_next().await.is_some() {}
}

/// Records one batch of results, trying again while the store is down: the
/// attempts' leases would expire meanwhile, so a result recorded late is
/// refused as stale rather than lost. A shutdown bounds how long it tries.
async fn record(shared: Arc<Shared>, batch: Vec<Completion>) {
    loop {
        // A stopping node starts nothing, and a node busy with intake
        // leaves what these results unblock to the claim loop's trickle.
        let claim_queue = if shared.attempts.draining.load(Ordering::SeqCst) || shared.intake.busy()
        {
            None
        } else {
            shared.executors.completion_queue()
        };
        let started = std::time::Instant::now();
        let wall = std::time::SystemTime::now();
        match shared
            .store
            .complete(batch.clone(), claim_queue, shared.clock.now_us())
            .await
        {
            Ok(done) => {
                if let Some(tracer) = &shared.tracer {
                    let end = wall + started.elapsed();
                    for (c, result) in batch.iter().zip(&done.results) {
                        tracer.record(trace::commit_span(
                            c.entity_id,
                            c.step,
                            c.epoch,
                            *result == CompletionResult::Applied,
                            batch.len(),
                            (wall, end),
                        ));
                    }
                }
                let stale = done
                    .results
                    .iter()
                    .filter(|r| **r == CompletionResult::Stale)
                    .count();
                if stale > 0 {
                    tracing::info!(stale, "refused results of stale attempts");
                }
                for attempt in done.claimed {
                    dispatch(&shared, attempt);
                }
                // These results freed slots and may have scheduled retries
                // earlier than the claim loop's current deadline.
                shared.wake.notify_one();
                return;
            }
            Err(e) => {
                tracing::warn!(error = %e, results = batch.len(), "recording results failed; will try again");
                tokio::time::sleep(Duration::from_millis(STORE_RETRY_MS)).await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicUsize;

    use async_trait::async_trait;
    use ripen_core::{Executor, Pipeline, RetryPolicy, StepDef, StepSpec, StepStatus};
    use ripen_store::{EntityId, NewEntity, SqliteOptions, SqliteStore, DEFAULT_TENANT};

    use super::*;
    use crate::executor::{ExecutorKind, StepExecutor, HTTP_QUEUE};
    use crate::time::ManualClock;

    /// Counts the attempts it starts and answers each after `delay`, or
    /// never when it is `None`.
    struct Slow {
        delay: Option<Duration>,
        started: AtomicUsize,
        started_b: AtomicUsize,
    }

    #[async_trait]
    impl StepExecutor for Slow {
        async fn run(&self, step: &StepSpec, _attempt: &Attempt) -> Outcome {
            if step.name == "b" {
                self.started_b.fetch_add(1, Ordering::SeqCst);
            } else {
                self.started.fetch_add(1, Ordering::SeqCst);
            }
            match self.delay {
                Some(delay) => tokio::time::sleep(delay).await,
                None => std::future::pending().await,
            }
            Outcome::Succeeded { output: None }
        }
    }

    struct Rig {
        store: Arc<dyn Store>,
        executor: Arc<Slow>,
        scheduler: Scheduler,
        ids: Vec<EntityId>,
        _dir: tempfile::TempDir,
    }

    /// A scheduler on a fresh embedded store, with `entities` entities of a
    /// pipeline `a` then `b`, and `a` running on every one of them that a
    /// slot allows.
    async fn rig(delay: Option<Duration>, concurrency: usize, entities: usize) -> Rig {
        let step = |name: &str, needs: &[&str]| StepDef {
            name: name.into(),
            needs: needs.iter().map(|n| n.to_string()).collect(),
            critical: true,
            timeout_ms: 60_000,
            retry: RetryPolicy::default(),
            executor: Executor::Http {
                url: "http://127.0.0.1:9/unused".into(),
            },
            compensate: None,
        };
        let pipeline = Pipeline::new(vec![step("a", &[]), step("b", &["a"])]).unwrap();
        let mut catalog = ripen_core::Catalog::default();
        catalog.insert("t", 1, pipeline);
        let catalog = Arc::new(catalog);
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn Store> = Arc::new(
            SqliteStore::open(SqliteOptions::new(dir.path().join("t.db")), catalog.clone())
                .unwrap(),
        );
        let executor = Arc::new(Slow {
            delay,
            started: AtomicUsize::new(0),
            started_b: AtomicUsize::new(0),
        });
        let mut executors = ExecutorRegistry::empty();
        executors.register(ExecutorKind::Http, [HTTP_QUEUE], executor.clone());
        let clock = Arc::new(ManualClock::new(1_700_000_000_000_000));
        let mut ids = Vec::new();
        for _ in 0..entities {
            let id = EntityId::new_v7();
            let entity = NewEntity {
                id,
                tenant: DEFAULT_TENANT.into(),
                type_name: "t".into(),
                version: 1,
                payload: "{}".into(),
                idempotency_key: None,
                refs: Vec::new(),
            };
            store.create(entity, clock.now_us()).await.unwrap();
            ids.push(id);
        }
        let config = EngineConfig {
            execute: true,
            concurrency,
            lease_grace_ms: 5_000,
            poll_interval_ms: 50,
            shutdown_grace_ms: 0,
            waiting_claims_max: 10,
            node: None,
        };
        let scheduler = Scheduler::start(
            store.clone(),
            catalog,
            Arc::new(executors),
            clock,
            Arc::default(),
            Observers {
                metrics: Arc::new(EngineMetrics::new(store.as_ref()).expect("metrics")),
                tracer: None,
            },
            &config,
        );
        let running = entities.min(concurrency);
        let deadline = Instant::now() + Duration::from_secs(10);
        while executor.started.load(Ordering::SeqCst) < running {
            assert!(Instant::now() < deadline, "the attempts never started");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        Rig {
            store,
            executor,
            scheduler,
            ids,
            _dir: dir,
        }
    }

    async fn status_of_a(rig: &Rig, id: EntityId) -> StepStatus {
        let record = rig.store.get(DEFAULT_TENANT, id).await.unwrap().unwrap();
        record.steps[0].state.status
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn shutdown_waits_for_running_attempts_and_records_their_results() {
        let rig = rig(Some(Duration::from_millis(300)), 8, 3).await;
        let began = Instant::now();
        let drained = rig.scheduler.shutdown(Duration::from_secs(10)).await;
        assert!(began.elapsed() < Duration::from_secs(5));
        assert_eq!(drained.finished, 3);
        assert_eq!(drained.abandoned, 0);
        for &id in &rig.ids {
            assert_eq!(status_of_a(&rig, id).await, StepStatus::Succeeded);
        }
        // The results made `b` runnable, but a stopping node starts nothing.
        assert_eq!(rig.executor.started_b.load(Ordering::SeqCst), 0);
        // A second shutdown finds nothing left to do.
        assert_eq!(
            rig.scheduler.shutdown(Duration::from_secs(1)).await,
            Drained::default()
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn attempts_still_running_after_the_grace_are_abandoned() {
        let rig = rig(None, 8, 2).await;
        let began = Instant::now();
        let drained = rig.scheduler.shutdown(Duration::from_millis(100)).await;
        let took = began.elapsed();
        assert!(took >= Duration::from_millis(100), "{took:?}");
        assert!(took < Duration::from_secs(2), "{took:?}");
        assert_eq!(
            drained,
            Drained {
                finished: 0,
                abandoned: 2,
                unstarted: 0
            }
        );
        // Nothing was recorded: the leases stand until they expire.
        for &id in &rig.ids {
            assert_eq!(status_of_a(&rig, id).await, StepStatus::Running);
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn attempts_waiting_for_a_slot_do_not_start_once_draining() {
        let rig = rig(Some(Duration::from_millis(200)), 1, 3).await;
        let drained = rig.scheduler.shutdown(Duration::from_secs(10)).await;
        assert_eq!(drained.finished, 1);
        assert_eq!(drained.abandoned, 0);
        assert_eq!(rig.executor.started.load(Ordering::SeqCst), 1);
        let mut succeeded = 0;
        for &id in &rig.ids {
            if status_of_a(&rig, id).await == StepStatus::Succeeded {
                succeeded += 1;
            }
        }
        assert_eq!(succeeded, 1);
    }
}
