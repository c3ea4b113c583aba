//! Remote workers: the pull side of a worker queue.
//!
//! A step with `worker = "billing"` waits in the queue `worker:billing`. No
//! scheduler claims it; a worker process does, over HTTP, with a long poll:
//! [`Workers::claim`] claims at once when something is due, and otherwise
//! waits until a commit names the queue (the store's work watcher, which on
//! PostgreSQL hears every node's commits), until the queue's next timer (a
//! backoff ending, a lease running out), or until the wait is over. Nothing
//! polls in a loop.
//!
//! Each task carries a lease: its token holds the attempt's epoch, which fences
//! a worker whose lease ran out and whose step another worker took over.
//! `heartbeat` extends the lease; `complete` and `fail` record the result
//! like any executor's, and a stale token changes nothing.

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::str::FromStr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ripen_core::{Catalog, UnixMicros};
use ripen_store::{
    Attempt, Claim, Completion, CompletionResult, EntityId, Heartbeat, Outcome, Store, StoreError,
};
use tokio::sync::Notify;

use crate::metrics::outcome_label;
use crate::time::Clock;
use crate::trace::{self, Span, Tracer};

/// The most tasks one claim returns.
pub const CLAIM_MAX: usize = 100;
/// The longest a claim may wait for work.
pub const WAIT_MAX_MS: u64 = 60_000;
/// The longest worker id kept.
pub const WORKER_ID_LEN_MAX: usize = 128;
/// The most expired leases one pass of [`Workers::expire_leases`] loses per queue.
const EXPIRE_BATCH_MAX: usize = 1_000;
/// The longest error text a worker may report; longer ones are refused.
pub const ERROR_LEN_MAX: usize = 4_096;

/// The queue of a worker step named `name` in the configuration.
pub fn queue_of(name: &str) -> String {
    format!("worker:{name}")
}

/// Names a task: one step of one entity. Retries of the step keep the task
/// id and get a new lease.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TaskId {
    pub entity_id: EntityId,
    pub step: usize,
}

impl fmt::Display for TaskId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}", self.entity_id, self.step)
    }
}

impl FromStr for TaskId {
    type Err = ();
    fn from_str(s: &str) -> Result<TaskId, ()> {
        let (entity, step) = s.rsplit_once('.').ok_or(())?;
        let step: usize = step.parse().map_err(|_| ())?;
        if step >= ripen_core::SLOTS_MAX || step.to_string().len() != s.len() - entity.len() - 1 {
            return Err(());
        }
        Ok(TaskId {
            entity_id: entity.parse().map_err(|_| ())?,
            step,
        })
    }
}

/// A lease token, as a worker holds it: the attempt's epoch, then when it
/// was claimed (Unix milliseconds, for the attempt's trace span).
pub fn lease_token(epoch: u64, claimed_at_ms: u64) -> String {
    format!("{epoch}.{claimed_at_ms}")
}

/// The epoch of a lease token, and when it was claimed if it says.
fn parse_lease(lease: &str) -> Option<(u64, Option<u64>)> {
    let digits = |s: &str| {
        (!s.is_empty() && s.len() <= 20 && s.bytes().all(|b| b.is_ascii_digit()))
            .then(|| s.parse::<u64>().ok())
            .flatten()
    };
    match lease.split_once('.') {
        None => Some((digits(lease)?, None)),
        Some((epoch, at)) => Some((digits(epoch)?, Some(digits(at)?))),
    }
}

/// A claimed task, as handed to a worker.
#[derive(Clone, Debug)]
pub struct Task {
    pub id: TaskId,
    pub lease: String,
    pub attempt: Attempt,
}

#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    #[error("no step of any entity type uses the worker queue {0:?}")]
    UnknownQueue(String),
    #[error("this node already holds {0} waiting claims; try again shortly or elsewhere")]
    TooManyWaiting(usize),
    #[error("the node is shutting down; claim from another node")]
    ShuttingDown,
    #[error("the lease no longer holds: it expired, or another attempt took the task over")]
    StaleLease,
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// The queues of the worker steps of every pipeline of `catalog`.
fn worker_queues(catalog: &Catalog) -> HashSet<String> {
    catalog
        .pipelines()
        .flat_map(|p| {
            (0..p.len())
                .filter(|&i| p.is_remote(i))
                .map(|i| p.queue(i).to_owned())
                .collect::<Vec<_>>()
        })
        .collect()
}

/// The worker queues of one node, and the claims waiting on them.
pub struct Workers {
    store: Arc<dyn Store>,
    clock: Arc<dyn Clock>,
    /// Every worker queue some pipeline uses (`worker:{name}`); grows when
    /// the type registry reads new versions ([`Workers::learn`]).
    known: std::sync::RwLock<HashSet<String>>,
    waiting: Mutex<HashMap<String, Arc<Notify>>>,
    open: AtomicUsize,
    open_max: usize,
    closing: AtomicBool,
    closed: Notify,
    /// Wakes this node's scheduler: a worker's result may make one of its
    /// steps runnable.
    scheduler: Arc<Notify>,
    /// Exports a span per reported attempt when set.
    tracer: Option<Tracer>,
    /// Reads a task's payload from the blob store when it is there.
    payloads: crate::blobs::Payloads,
}

impl Workers {
    pub fn new(
        store: Arc<dyn Store>,
        catalog: &Catalog,
        clock: Arc<dyn Clock>,
        open_max: usize,
        scheduler: Arc<Notify>,
        tracer: Option<Tracer>,
        payloads: crate::blobs::Payloads,
    ) -> Arc<Workers> {
        Arc::new(Workers {
            store,
            clock,
            known: std::sync::RwLock::new(worker_queues(catalog)),
            waiting: Mutex::new(HashMap::new()),
            open: AtomicUsize::new(0),
            open_max,
            closing: AtomicBool::new(false),
            closed: Notify::new(),
            scheduler,
            tracer,
            payloads,
        })
    }

    /// Whether no pipeline has a worker step.
    pub fn is_empty(&self) -> bool {
        self.known_queues().is_empty()
    }

    /// Whether `queue` (`worker:{name}`) is served here.
    pub fn is_worker_queue(&self, queue: &str) -> bool {
        self.known
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .contains(queue)
    }

    /// Serves the worker queues of `catalog` too: the pipelines of versions
    /// registered since the node started.
    pub fn learn(&self, catalog: &Catalog) {
        let queues = worker_queues(catalog);
        let mut known = self.known.write().unwrap_or_else(|e| e.into_inner());
        known.extend(queues);
    }

    /// The worker queues served here, sorted.
    fn known_queues(&self) -> Vec<String> {
        let mut queues: Vec<String> = self
            .known
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .cloned()
            .collect();
        queues.sort();
        queues
    }

    /// Claims waiting right now, across queues.
    pub fn waiting_claims(&self) -> usize {
        self.open.load(Ordering::Relaxed)
    }

    /// Wakes the claims waiting on `queue` (`None`: on every queue).
    pub fn wake(&self, queue: Option<&str>) {
        let waiting = self.waiting.lock().unwrap_or_else(|e| e.into_inner());
        match queue {
            Some(q) => {
                if let Some(n) = waiting.get(q) {
                    n.notify_waiters();
                }
            }
            None => waiting.values().for_each(|n| n.notify_waiters()),
        }
    }

    /// Ends every waiting claim (they answer with what they have) and
    /// refuses new ones: the node is draining.
    pub fn close(&self) {
        self.closing.store(true, Ordering::SeqCst);
        self.closed.notify_waiters();
    }

    fn notify_of(&self, queue: &str) -> Arc<Notify> {
        self.waiting
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(queue.to_owned())
            .or_default()
            .clone()
    }

    /// Claims up to `max` tasks of worker queue `name` for `worker`,
    /// waiting up to `wait` for the first one.
    pub async fn claim(
        &self,
        name: &str,
        worker: Option<&str>,
        max: usize,
        wait: Duration,
    ) -> Result<Vec<Task>, WorkerError> {
        let queue = queue_of(name);
        if !self.is_worker_queue(&queue) {
            return Err(WorkerError::UnknownQueue(name.to_owned()));
        }
        if self.closing.load(Ordering::SeqCst) {
            return Err(WorkerError::ShuttingDown);
        }
        let max = max.clamp(1, CLAIM_MAX);
        let wait = wait.min(Duration::from_millis(WAIT_MAX_MS));
        let _open = if wait.is_zero() {
            None
        } else {
            let open = self.open.fetch_add(1, Ordering::SeqCst);
            let guard = OpenClaim(&self.open);
            if open >= self.open_max {
                return Err(WorkerError::TooManyWaiting(self.open_max));
            }
            Some(guard)
        };
        let deadline = tokio::time::Instant::now() + wait;
        let notify = self.notify_of(&queue);
        loop {
            // Registered before the claim, so that a commit between the
            // claim and the wait still wakes this one.
            let woken = notify.notified();
            let closed = self.closed.notified();
            tokio::pin!(woken);
            tokio::pin!(closed);
            woken.as_mut().enable();
            closed.as_mut().enable();
            let claim = Claim::by(&queue, max, worker);
            let batch = self.store.claim_due(claim, self.clock.now_us()).await?;
            if !batch.attempts.is_empty() {
                let tasks = self.with_payloads_read(batch.attempts).await?;
                if !tasks.is_empty() {
                    return Ok(tasks);
                }
                continue;
            }
            let now = tokio::time::Instant::now();
            if now >= deadline || self.closing.load(Ordering::SeqCst) {
                return Ok(Vec::new());
            }
            let mut until = deadline;
            if let Some(due) = batch.next_due_us {
                let wait_us = (due - self.clock.now_us()).max(0) as u64;
                // A timer of the queue: a backoff ends, a lease runs out.
                until = until.min(now + Duration::from_micros(wait_us));
            }
            tokio::select! {
                _ = &mut woken => {}
                _ = &mut closed => {}
                _ = tokio::time::sleep_until(until) => {}
            }
        }
    }

    /// The tasks of `attempts`, their payloads read from the blob store
    /// where they are there. An attempt whose blob is lost or cannot be
    /// read now is recorded as failed (for good, or for its retry policy)
    /// and handed to no worker.
    async fn with_payloads_read(&self, attempts: Vec<Attempt>) -> Result<Vec<Task>, WorkerError> {
        let mut tasks = Vec::with_capacity(attempts.len());
        let mut failed = Vec::new();
        for a in attempts {
            if !crate::blobs::is_blob(&a.payload) {
                tasks.push(task(a));
                continue;
            }
            match self.payloads.attempt(&a).await {
                Ok(read) => tasks.push(task(read.into_owned())),
                Err(e) => failed.push(Completion {
                    entity_id: a.entity_id,
                    step: a.step,
                    epoch: a.epoch,
                    outcome: Outcome::Failed {
                        error: e.to_string(),
                        retryable: e.is_transient(),
                        retry_after_ms: None,
                    },
                }),
            }
        }
        if !failed.is_empty() {
            self.store
                .complete(failed, None, self.clock.now_us())
                .await?;
            self.scheduler.notify_one();
        }
        Ok(tasks)
    }

    /// Every `every`, loses the attempts of worker queues whose lease
    /// expired, so that a silent worker's task is retried (or fails for
    /// good) even while no worker claims from its queue. A waiting claim
    /// does the same for its own queue at once.
    pub async fn expire_leases(self: Arc<Self>, every: Duration) {
        loop {
            tokio::time::sleep(every).await;
            if self.closing.load(Ordering::SeqCst) {
                return;
            }
            for queue in &self.known_queues() {
                let claim = Claim::expiring(queue, EXPIRE_BATCH_MAX);
                if let Err(e) = self.store.claim_due(claim, self.clock.now_us()).await {
                    tracing::warn!(queue = %queue, error = %e, "expire the leases of a worker queue");
                }
            }
        }
    }

    /// Extends the lease of task `id`; the new expiry.
    pub async fn heartbeat(&self, id: TaskId, lease: &str) -> Result<UnixMicros, WorkerError> {
        let (epoch, _) = parse_lease(lease).ok_or(WorkerError::StaleLease)?;
        let beat = Heartbeat {
            entity_id: id.entity_id,
            step: id.step,
            epoch,
        };
        let mut answers = self
            .store
            .heartbeat(vec![beat], self.clock.now_us())
            .await?;
        answers.pop().flatten().ok_or(WorkerError::StaleLease)
    }

    /// Records a worker's result for task `id`.
    pub async fn report(
        &self,
        id: TaskId,
        lease: &str,
        outcome: Outcome,
    ) -> Result<(), WorkerError> {
        let (epoch, claimed_at_ms) = parse_lease(lease).ok_or(WorkerError::StaleLease)?;
        let label = outcome_label(&outcome);
        let error = match &outcome {
            Outcome::Failed { error, .. } => Some(error.clone()),
            Outcome::Succeeded { .. } => None,
        };
        let completion = Completion {
            entity_id: id.entity_id,
            step: id.step,
            epoch,
            outcome,
        };
        let committing = std::time::SystemTime::now();
        let batch = self
            .store
            .complete(vec![completion], None, self.clock.now_us())
            .await?;
        let applied = batch.results.first() == Some(&CompletionResult::Applied);
        if applied {
            // Steps of this node's queues may have become runnable.
            self.scheduler.notify_one();
        }
        if let (Some(tracer), Some(at)) = (&self.tracer, claimed_at_ms) {
            let step = self.step_name(id).await;
            let start = std::time::UNIX_EPOCH + Duration::from_millis(at);
            let attempt = trace::attempt_span_id(id.entity_id, id.step, epoch);
            tracer.record(Span {
                trace_id: trace::trace_id(id.entity_id),
                span_id: attempt,
                parent: Some(trace::root_span_id(id.entity_id)),
                name: format!("attempt {step}"),
                kind: trace::Kind::Consumer,
                start,
                end: committing,
                attributes: vec![
                    (
                        "ripen.entity_id",
                        trace::Value::Str(id.entity_id.to_string()),
                    ),
                    ("ripen.step", trace::Value::Str(step)),
                    ("ripen.executor", trace::Value::Str("worker".into())),
                    ("ripen.outcome", trace::Value::Str(label.into())),
                ],
                error,
                links: Vec::new(),
            });
            tracer.record(trace::commit_span(
                id.entity_id,
                id.step,
                epoch,
                applied,
                1,
                (committing, std::time::SystemTime::now()),
            ));
        }
        if applied {
            Ok(())
        } else {
            Err(WorkerError::StaleLease)
        }
    }

    /// The name of a task's step, for its span; read only when tracing.
    async fn step_name(&self, id: TaskId) -> String {
        match self
            .store
            .get(ripen_store::DEFAULT_TENANT, id.entity_id)
            .await
        {
            Ok(Some(r)) => r
                .steps
                .get(id.step)
                .map(|s| s.name.clone())
                .unwrap_or_default(),
            _ => format!("step {}", id.step),
        }
    }
}

/// Counts a waiting claim while it lives.
struct OpenClaim<'a>(&'a AtomicUsize);

impl Drop for OpenClaim<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

fn task(attempt: Attempt) -> Task {
    let claimed_at_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0);
    Task {
        id: TaskId {
            entity_id: attempt.entity_id,
            step: attempt.step,
        },
        lease: lease_token(attempt.epoch, claimed_at_ms),
        attempt,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn task_ids_round_trip_and_refuse_anything_else() {
        let id = TaskId {
            entity_id: EntityId::new_v7(),
            step: 12,
        };
        assert_eq!(id.to_string().parse::<TaskId>(), Ok(id));
        let entity = id.entity_id;
        for bad in [
            String::new(),
            format!("{entity}"),
            format!("{entity}."),
            format!("{entity}.x"),
            format!("{entity}.+1"),
            format!("{entity}.01"),
            format!("{entity}.128"),
            format!("{entity}.99999999999999999999999"),
            "nope.1".to_string(),
        ] {
            assert!(bad.parse::<TaskId>().is_err(), "{bad:?}");
        }
    }

    #[test]
    fn leases_hold_an_epoch_and_a_claim_time() {
        assert_eq!(parse_lease(&lease_token(7, 1_700)), Some((7, Some(1_700))));
        assert_eq!(parse_lease("7"), Some((7, None)));
        for bad in [
            "7.",
            ".7",
            "7.x",
            "7.1.2",
            "",
            "-1",
            "1.-0",
            " 1",
            "a",
            "99999999999999999999999",
        ] {
            assert_eq!(parse_lease(bad), None, "{bad:?}");
        }
    }
}
