//! The scheduler: claims runnable steps, runs them, records their results.
//!
//! Three kinds of task cooperate:
//! - the claim loop asks the store for due steps whenever it is woken (an
//!   intake commit, a freed slot) or the earliest due time arrives (a backoff
//!   ending, a lease expiring). That one deadline is the only timer: there is
//!   no per-entity sleep and no polling loop beyond a slow fallback.
//! - one task per attempt runs the executor and sends the outcome on;
//! - the completer drains outcomes in batches, records them in one store
//!   call, and dispatches at once the steps that this commit made runnable.

use std::sync::Arc;
use std::time::Duration;

use ripen_core::{Catalog, UnixMicros};
use ripen_store::{
    Attempt, ClaimBatch, CompleteBatch, Completion, CompletionResult, Outcome, Store, StoreError,
};
use tokio::sync::{mpsc, watch, Notify, Semaphore};
use tokio::task::JoinSet;

use crate::config::EngineConfig;
use crate::executor::ExecutorRegistry;
use crate::time::now_us;

/// The most steps claimed in one store call.
const CLAIM_BATCH_MAX: usize = 512;
/// The most results recorded in one store call.
const COMPLETE_BATCH_MAX: usize = 1024;
/// The most store calls recording results at once.
const COMPLETE_IN_FLIGHT_MAX: usize = 4;
/// How long to wait before asking a failing store again.
const STORE_RETRY_MS: u64 = 200;

struct Shared {
    store: Arc<dyn Store>,
    catalog: Arc<Catalog>,
    executors: Arc<ExecutorRegistry>,
    /// Bounds the attempts in flight.
    slots: Arc<Semaphore>,
    wake: Arc<Notify>,
    results: mpsc::Sender<Completion>,
}

pub struct Scheduler {
    wake: Arc<Notify>,
    stop: watch::Sender<bool>,
    tasks: JoinSet<()>,
}

impl Scheduler {
    /// Starts claiming from the queues of `executors` and running what it claims.
    pub fn start(
        store: Arc<dyn Store>,
        catalog: Arc<Catalog>,
        executors: Arc<ExecutorRegistry>,
        config: &EngineConfig,
    ) -> Scheduler {
        let (results_tx, results_rx) = mpsc::channel(config.concurrency.max(COMPLETE_BATCH_MAX));
        let wake = Arc::new(Notify::new());
        let shared = Arc::new(Shared {
            store,
            catalog,
            executors,
            slots: Arc::new(Semaphore::new(config.concurrency)),
            wake: wake.clone(),
            results: results_tx,
        });
        let (stop, stop_rx) = watch::channel(false);
        let mut tasks = JoinSet::new();
        if !config.execute {
            tracing::info!("engine.execute is off: this node runs no steps");
            return Scheduler { wake, stop, tasks };
        }
        if shared.executors.local_queues().is_empty() {
            tracing::info!("no executor consumes a queue here: this node runs no steps");
            return Scheduler { wake, stop, tasks };
        }
        tasks.spawn(claim_loop(
            shared.clone(),
            Duration::from_millis(config.poll_interval_ms),
            stop_rx.clone(),
        ));
        tasks.spawn(complete_loop(shared, results_rx, stop_rx));
        Scheduler { wake, stop, tasks }
    }

    /// Wakes the claim loop: new work may be runnable.
    pub fn waker(&self) -> Arc<Notify> {
        self.wake.clone()
    }

    pub async fn shutdown(mut self) {
        let _ = self.stop.send(true);
        self.wake.notify_one();
        while self.tasks.join_next().await.is_some() {}
    }
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
            let free = shared.slots.available_permits().min(CLAIM_BATCH_MAX);
            if free == 0 {
                break;
            }
            match claim_due(shared.store.as_ref(), queue, now_us(), free).await {
                Ok(batch) => {
                    filled |= batch.attempts.len() >= free;
                    for attempt in batch.attempts {
                        dispatch(&shared, attempt);
                    }
                    if let Some(due) = batch.next_due_us {
                        let wait_us = (due - now_us()).max(0) as u64;
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

/// Claims the due steps of one queue.
///
/// The store does not take a queue yet: it claims every due step, and every
/// claimable step is an HTTP one. Once claims are queue-aware, `queue` is
/// passed on here and nowhere else changes.
async fn claim_due(
    store: &dyn Store,
    queue: &str,
    now_us: UnixMicros,
    limit: usize,
) -> Result<ClaimBatch, StoreError> {
    let _ = queue;
    store.claim_due(now_us, limit).await
}

/// Records results; the steps they make runnable in `claim_queue` are claimed
/// in the same transaction, and none when it is `None`.
///
/// Today's store always claims what the results made runnable. Once
/// completions take the claim queue, it is passed on here and nowhere else
/// changes.
async fn complete(
    store: &dyn Store,
    completions: Vec<Completion>,
    claim_queue: Option<&str>,
    now_us: UnixMicros,
) -> Result<CompleteBatch, StoreError> {
    let _ = claim_queue;
    store.complete(completions, now_us).await
}

/// Runs one claimed attempt on its own task. The attempt already holds a
/// lease, so it runs even if it must wait for a free slot.
fn dispatch(shared: &Arc<Shared>, attempt: Attempt) {
    let shared = shared.clone();
    tokio::spawn(async move {
        let Ok(_slot) = shared.slots.clone().acquire_owned().await else {
            return;
        };
        let outcome = run_attempt(&shared, &attempt).await;
        let completion = Completion {
            entity_id: attempt.entity_id,
            step: attempt.step,
            epoch: attempt.epoch,
            outcome,
        };
        // The slot is freed before the result is recorded, so that the claim
        // loop can refill it while the completer batches; the completer wakes
        // the loop once the result is committed.
        drop(_slot);
        if shared.results.send(completion).await.is_err() {
            tracing::debug!("scheduler stopped; the result is dropped and its lease will expire");
        }
    });
}

async fn run_attempt(shared: &Shared, a: &Attempt) -> Outcome {
    let Some(pipeline) = shared.catalog.get(&a.type_name, a.version) else {
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
    mut stop: watch::Receiver<bool>,
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
            _ = stop.changed() => break,
        }
        while recording.len() >= COMPLETE_IN_FLIGHT_MAX {
            recording.join_next().await;
        }
        recording.spawn(record(shared.clone(), batch, stop.clone()));
    }
    while recording.join_next().await.is_some() {}
}

/// Records one batch of results, trying again while the store is down: the
/// attempts' leases would expire meanwhile, so a result recorded late is
/// refused as stale rather than lost.
async fn record(shared: Arc<Shared>, batch: Vec<Completion>, stop: watch::Receiver<bool>) {
    loop {
        let claim_queue = shared.executors.completion_queue();
        match complete(shared.store.as_ref(), batch.clone(), claim_queue, now_us()).await {
            Ok(done) => {
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
                if *stop.borrow() {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(STORE_RETRY_MS)).await;
            }
        }
    }
}
