//! The Rust SDK of Ripen's remote workers (docs/workers.md).
//!
//! A step with `worker = "billing"` in `ripen.toml` is not run by Ripen: it
//! waits in the worker queue `billing` until a worker claims it. A
//! [`Worker`] long-polls that queue for as many tasks as it has free slots,
//! runs an async handler on each, extends each task's lease with heartbeats
//! while its handler runs, and reports the handler's output (or its error)
//! back. It reconnects with capped, jittered exponential backoff when the
//! server is unreachable or busy, and stops gracefully: no new claims, the
//! handlers in flight get a grace period to finish and report, the rest are
//! abandoned and their leases run out.
//!
//! ```no_run
//! use ripen_worker::{Task, TaskError, Worker};
//! use serde::Deserialize;
//! use serde_json::json;
//!
//! #[derive(Deserialize)]
//! struct Merchant {
//!     name: String,
//! }
//!
//! # async fn example() -> Result<(), ripen_worker::WorkerError> {
//! Worker::new("http://127.0.0.1:8080", "billing")
//!     .concurrency(8)
//!     .worker_id("billing-1")
//!     .run(|task: Task| async move {
//!         let merchant: Merchant = task.payload()?;
//!         if merchant.name.is_empty() {
//!             return Err(TaskError::fatal("a merchant needs a name"));
//!         }
//!         Ok(json!({"invoice": format!("inv-{}", task.entity_id())}))
//!     })
//!     .await
//! # }
//! ```

mod task;
mod time;

use std::fmt;
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use ripen_client::{Client, Failure, StatusCode, TaskView, CLAIM_MAX};
use serde::Serialize;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::task::{AbortHandle, JoinSet};
use tokio::time::Instant;

pub use ripen_client;
pub use task::{Task, TaskError};

/// How long one claim waits for work before it asks again.
pub const DEFAULT_POLL_WAIT: Duration = Duration::from_secs(30);
/// How long the handlers in flight get to finish once a shutdown begins.
pub const DEFAULT_SHUTDOWN_GRACE: Duration = Duration::from_secs(10);
/// The first delay after a failed claim; it doubles with each failure.
pub const DEFAULT_BACKOFF_INITIAL: Duration = Duration::from_millis(100);
/// The longest delay between two claims of an unreachable server.
pub const DEFAULT_BACKOFF_MAX: Duration = Duration::from_secs(10);
/// How long a heartbeat, a report or any call other than a claim may take.
const CALL_TIMEOUT: Duration = Duration::from_secs(10);
/// Heartbeats are sent after this fraction of the lease's remaining time.
const BEAT_FRACTION: u32 = 3;
/// The closest two heartbeats of one task come, whatever the lease says
/// (a lease that seems already gone, on a clock ahead of the server's).
const BEAT_INTERVAL_MIN: Duration = Duration::from_millis(100);
/// How long after its lease ran out a result is still offered to a server
/// that cannot be reached: a lease nobody took over still accepts it.
const REPORT_PATIENCE: Duration = Duration::from_secs(60);
/// The longest worker id the server keeps.
const WORKER_ID_LEN_MAX: usize = 128;

/// Why [`Worker::run`] stopped without being asked to: the server refused
/// the claim itself, which no retry changes.
#[derive(Debug)]
pub enum WorkerError {
    /// No step of the server's configuration uses this worker queue.
    UnknownQueue {
        queue: String,
        error: ripen_client::Error,
    },
    /// The server refused the claim for another reason (an invalid
    /// request).
    Refused(ripen_client::Error),
}

impl fmt::Display for WorkerError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            WorkerError::UnknownQueue { queue, error } => {
                write!(f, "the server has no worker queue {queue:?}: {error}")
            }
            WorkerError::Refused(error) => write!(f, "the server refused the claim: {error}"),
        }
    }
}

impl std::error::Error for WorkerError {}

/// A worker of one queue; see the crate's documentation.
#[derive(Debug, Clone)]
pub struct Worker {
    client: Client,
    queue: String,
    concurrency: usize,
    worker_id: String,
    poll_wait: Duration,
    shutdown_grace: Duration,
    backoff_initial: Duration,
    backoff_max: Duration,
}

type ReadyHook = Box<dyn FnOnce() + Send>;

impl Worker {
    /// A worker of queue `queue` (the `worker = "…"` name of its steps) on
    /// the server at `url`, such as `http://127.0.0.1:8080`: one task at a
    /// time, id `{hostname}-{pid}`. It sends the API key in `RIPEN_API_KEY`,
    /// if the environment has one (a key with the `worker` scope).
    pub fn new(url: &str, queue: &str) -> Worker {
        let client = Client::new(url).with_timeout(CALL_TIMEOUT);
        let client = match std::env::var("RIPEN_API_KEY") {
            Ok(key) if !key.is_empty() => match client.clone().with_api_key(&key) {
                Ok(with_key) => with_key,
                Err(e) => {
                    tracing::warn!(error = %e, "RIPEN_API_KEY is not a usable key; sending none");
                    client
                }
            },
            _ => client,
        };
        Worker::with_client(client, queue)
    }

    /// A worker on a client of the caller's (its timeout bounds heartbeats
    /// and reports; claims wait as long as they need to).
    pub fn with_client(client: Client, queue: &str) -> Worker {
        Worker {
            client,
            queue: queue.to_owned(),
            concurrency: 1,
            worker_id: default_worker_id(),
            poll_wait: DEFAULT_POLL_WAIT,
            shutdown_grace: DEFAULT_SHUTDOWN_GRACE,
            backoff_initial: DEFAULT_BACKOFF_INITIAL,
            backoff_max: DEFAULT_BACKOFF_MAX,
        }
    }

    /// Tasks in flight at once (at least 1); each claim asks for as many as
    /// there are free slots.
    pub fn concurrency(mut self, tasks: usize) -> Worker {
        self.concurrency = tasks.max(1);
        self
    }

    /// The id the server shows as the `worker` of the steps this worker
    /// holds: at most 128 bytes, no control characters (others are cut or
    /// replaced).
    pub fn worker_id(mut self, id: impl Into<String>) -> Worker {
        self.worker_id = clean_worker_id(&id.into());
        self
    }

    /// How long one claim waits for work (the server allows up to 60 s).
    pub fn poll_wait(mut self, wait: Duration) -> Worker {
        self.poll_wait = wait.min(Duration::from_secs(60));
        self
    }

    /// How long the handlers in flight get to finish and report once a
    /// shutdown begins.
    pub fn shutdown_grace(mut self, grace: Duration) -> Worker {
        self.shutdown_grace = grace;
        self
    }

    /// The reconnect backoff: the first delay and the cap.
    pub fn backoff(mut self, initial: Duration, max: Duration) -> Worker {
        self.backoff_initial = initial.max(Duration::from_millis(1));
        self.backoff_max = max.max(self.backoff_initial);
        self
    }

    /// The worker's id.
    pub fn id(&self) -> &str {
        &self.worker_id
    }

    /// Runs until SIGTERM or Ctrl-C, then stops gracefully (see
    /// [`Worker::run_until`]).
    pub async fn run<H, Fut, O>(self, handler: H) -> Result<(), WorkerError>
    where
        H: Fn(Task) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<O, TaskError>> + Send + 'static,
        O: Serialize + Send + 'static,
    {
        let signal = shutdown_signal();
        self.run_until(signal, handler).await
    }

    /// Runs until `shutdown` completes, then stops claiming, gives the
    /// handlers in flight the shutdown grace to finish and report, and
    /// abandons the rest: nothing is reported for them, and their leases
    /// run out on the server. Returns `Ok` after such a stop; an error only
    /// when the server refuses the claim itself (an unknown queue).
    pub async fn run_until<S, H, Fut, O>(self, shutdown: S, handler: H) -> Result<(), WorkerError>
    where
        S: Future<Output = ()> + Send,
        H: Fn(Task) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<O, TaskError>> + Send + 'static,
        O: Serialize + Send + 'static,
    {
        self.serve(shutdown, handler, None).await
    }

    /// [`Worker::run_until`], calling `ready` once, when the server first
    /// answered a claim: the queue exists and the worker is claiming.
    pub async fn run_until_with_ready<S, H, Fut, O>(
        self,
        shutdown: S,
        handler: H,
        ready: impl FnOnce() + Send + 'static,
    ) -> Result<(), WorkerError>
    where
        S: Future<Output = ()> + Send,
        H: Fn(Task) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<O, TaskError>> + Send + 'static,
        O: Serialize + Send + 'static,
    {
        self.serve(shutdown, handler, Some(Box::new(ready))).await
    }

    async fn serve<S, H, Fut, O>(
        self,
        shutdown: S,
        handler: H,
        mut ready: Option<ReadyHook>,
    ) -> Result<(), WorkerError>
    where
        S: Future<Output = ()> + Send,
        H: Fn(Task) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<O, TaskError>> + Send + 'static,
        O: Serialize + Send + 'static,
    {
        let handler = Arc::new(handler);
        let shared = Arc::new(Shared {
            client: self.client.clone(),
            queue: self.queue.clone(),
            backoff_initial: self.backoff_initial,
            backoff_max: self.backoff_max,
        });
        let slots = Arc::new(Semaphore::new(self.concurrency));
        let mut running: JoinSet<()> = JoinSet::new();
        let mut failures: u32 = 0;
        // The first claim does not wait, so that `ready` follows at once.
        let mut first = true;
        tokio::pin!(shutdown);
        let outcome = loop {
            while let Some(done) = running.try_join_next() {
                if let Err(e) = done {
                    tracing::error!(queue = %self.queue, "a task runner ended abnormally: {e}");
                }
            }
            if slots.available_permits() == 0 {
                tokio::select! {
                    _ = &mut shutdown => break Ok(()),
                    permit = slots.acquire() => drop(permit),
                }
                continue;
            }
            let free = slots.available_permits().min(CLAIM_MAX);
            let wait = if first {
                Duration::ZERO
            } else {
                self.poll_wait
            };
            let claim = self
                .client
                .claim(&self.queue, free, wait, Some(&self.worker_id));
            // A shutdown ends a waiting claim at once; a task the server
            // leased in that instant is left to its lease's expiry.
            let answer = tokio::select! {
                _ = &mut shutdown => break Ok(()),
                answer = claim => answer,
            };
            match answer {
                Ok(tasks) => {
                    if failures > 0 {
                        tracing::info!(queue = %self.queue, "claiming again after {failures} failed claims");
                    }
                    failures = 0;
                    first = false;
                    if let Some(ready) = ready.take() {
                        tracing::info!(
                            queue = %self.queue,
                            worker = %self.worker_id,
                            concurrency = self.concurrency,
                            "worker ready: claiming"
                        );
                        ready();
                    }
                    for view in tasks {
                        let permit = slots
                            .clone()
                            .try_acquire_owned()
                            .expect("a claim asks for at most the free slots");
                        running.spawn(run_task(shared.clone(), handler.clone(), view, permit));
                    }
                }
                Err(error) => match error.status() {
                    Some(StatusCode::NOT_FOUND) => {
                        break Err(WorkerError::UnknownQueue {
                            queue: self.queue.clone(),
                            error,
                        })
                    }
                    Some(status) if is_refusal(status) => break Err(WorkerError::Refused(error)),
                    _ => {
                        failures = failures.saturating_add(1);
                        let delay = shared.backoff(failures, error.retry_after());
                        tracing::warn!(
                            queue = %self.queue,
                            "claim failed (attempt {failures}), next in {delay:?}: {error}"
                        );
                        tokio::select! {
                            _ = &mut shutdown => break Ok(()),
                            _ = tokio::time::sleep(delay) => {}
                        }
                    }
                },
            }
        };
        self.drain(running).await;
        outcome
    }

    /// Gives the handlers in flight the shutdown grace, then abandons them.
    async fn drain(&self, mut running: JoinSet<()>) {
        if running.is_empty() {
            tracing::info!(queue = %self.queue, "worker stopped: no task in flight");
            return;
        }
        tracing::info!(
            queue = %self.queue,
            "worker stopping: no new claims; {} tasks in flight get {:?} to finish",
            running.len(),
            self.shutdown_grace
        );
        let all_done = async { while running.join_next().await.is_some() {} };
        if tokio::time::timeout(self.shutdown_grace, all_done)
            .await
            .is_err()
        {
            tracing::warn!(
                queue = %self.queue,
                "worker stopped: abandoned {} tasks still running after the grace; their leases will expire",
                running.len()
            );
            running.shutdown().await;
        } else {
            tracing::info!(queue = %self.queue, "worker stopped: every task in flight reported");
        }
    }
}

/// Statuses of a claim that no retry changes: the request itself is wrong.
fn is_refusal(status: StatusCode) -> bool {
    status.is_client_error()
        && status != StatusCode::TOO_MANY_REQUESTS
        && status != StatusCode::REQUEST_TIMEOUT
}

/// What every task runner of one worker shares.
struct Shared {
    client: Client,
    queue: String,
    backoff_initial: Duration,
    backoff_max: Duration,
}

impl Shared {
    /// The delay after the `failures`-th failure in a row: exponential,
    /// capped, with jitter over its upper half, and never below the
    /// server's `Retry-After`.
    fn backoff(&self, failures: u32, retry_after: Option<Duration>) -> Duration {
        let exp = self
            .backoff_initial
            .saturating_mul(1u32 << failures.saturating_sub(1).min(20));
        let capped = exp.min(self.backoff_max);
        let jittered = capped.mul_f64(0.5 + 0.5 * fastrand::f64());
        jittered.max(retry_after.unwrap_or_default())
    }
}

/// Aborts a spawned handler when its runner is dropped (a shutdown that
/// abandons it).
struct AbortOnDrop(AbortHandle);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// The time until the next heartbeat of a lease that runs out at `expires`.
fn beat_interval(expires: Option<SystemTime>) -> Duration {
    let remaining = expires
        .and_then(|e| e.duration_since(SystemTime::now()).ok())
        .unwrap_or_default();
    (remaining / BEAT_FRACTION).max(BEAT_INTERVAL_MIN)
}

/// One task: the handler on its own task (so that a panic is a failed
/// attempt, not a lost runner), heartbeats until it returns, then the
/// report. The slot is freed when this ends.
async fn run_task<H, Fut, O>(
    shared: Arc<Shared>,
    handler: Arc<H>,
    view: TaskView,
    _slot: OwnedSemaphorePermit,
) where
    H: Fn(Task) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<O, TaskError>> + Send + 'static,
    O: Serialize + Send + 'static,
{
    let id = view.task_id.clone();
    let lease = view.lease.clone();
    let step = view.step.clone();
    let attempt = view.attempt;
    let task = Task::new(view);
    let mut expires = task.lease_expires_at();
    tracing::debug!(queue = %shared.queue, task = %id, step = %step, attempt, "task claimed");
    let mut handle = tokio::spawn(handler(task));
    let _abort = AbortOnDrop(handle.abort_handle());
    let mut lease_held = true;
    let mut next_beat = Instant::now() + beat_interval(expires);
    let result = loop {
        tokio::select! {
            result = &mut handle => break result,
            _ = tokio::time::sleep_until(next_beat), if lease_held => {
                match shared.client.heartbeat(&id, &lease).await {
                    Ok(until) => {
                        expires = time::parse_rfc3339(&until).or(expires);
                        next_beat = Instant::now() + beat_interval(expires);
                    }
                    Err(e) if e.status() == Some(StatusCode::CONFLICT) => {
                        lease_held = false;
                        tracing::warn!(
                            queue = %shared.queue, task = %id, step = %step, attempt,
                            "the lease is gone (it expired, or another worker took the task over): \
                             no more heartbeats, and the server will refuse this attempt's result"
                        );
                    }
                    Err(e) => {
                        // Try again sooner, while the lease may still hold.
                        next_beat = Instant::now() + beat_interval(expires) / 2;
                        tracing::warn!(queue = %shared.queue, task = %id, "heartbeat failed: {e}");
                    }
                }
            }
        }
    };
    let mut report = match result {
        Ok(Ok(output)) => match serde_json::value::to_raw_value(&output) {
            Ok(raw) => Report::Complete(raw),
            Err(e) => Report::Fail(TaskError::fatal(format!(
                "the handler's output does not serialize: {e}"
            ))),
        },
        Ok(Err(error)) => Report::Fail(error),
        Err(e) if e.is_panic() => Report::Fail(TaskError::retryable("the handler panicked")),
        Err(_) => return,
    };
    if !lease_held {
        tracing::warn!(
            queue = %shared.queue, task = %id, step = %step, attempt,
            "the handler finished after its lease was lost: its result is not reported"
        );
        return;
    }
    let give_up = Instant::now()
        + expires
            .and_then(|e| e.duration_since(SystemTime::now()).ok())
            .unwrap_or_default()
        + REPORT_PATIENCE;
    let mut failures = 0;
    loop {
        let sent = match &report {
            Report::Complete(raw) => shared.client.complete(&id, &lease, Some(raw)).await,
            Report::Fail(error) => {
                let failure = Failure {
                    error: error.report_text(),
                    retryable: error.is_retryable(),
                    retry_after_ms: error.retry_after_ms(),
                };
                shared.client.fail(&id, &lease, failure).await
            }
        };
        let error = match sent {
            Ok(()) => {
                match &report {
                    Report::Complete(_) => {
                        tracing::debug!(queue = %shared.queue, task = %id, "task completed")
                    }
                    Report::Fail(e) => {
                        tracing::info!(queue = %shared.queue, task = %id, step = %step, attempt, "task failed ({e})")
                    }
                }
                return;
            }
            Err(error) => error,
        };
        match error.status() {
            Some(StatusCode::CONFLICT) => {
                tracing::warn!(
                    queue = %shared.queue, task = %id, step = %step, attempt,
                    "the server refused the result: the lease no longer holds ({error})"
                );
                return;
            }
            Some(StatusCode::PAYLOAD_TOO_LARGE) if matches!(report, Report::Complete(_)) => {
                report = Report::Fail(TaskError::fatal(format!(
                    "the handler's output is too large for the server: {error}"
                )));
            }
            Some(status) if is_refusal(status) => {
                tracing::error!(queue = %shared.queue, task = %id, "the server refused the result: {error}");
                return;
            }
            _ => {
                failures += 1;
                let delay = shared.backoff(failures, error.retry_after());
                if Instant::now() + delay > give_up {
                    tracing::error!(
                        queue = %shared.queue, task = %id,
                        "giving up on reporting the result; the lease will expire: {error}"
                    );
                    return;
                }
                tracing::warn!(queue = %shared.queue, task = %id, "report failed, next in {delay:?}: {error}");
                tokio::time::sleep(delay).await;
            }
        }
    }
}

enum Report {
    Complete(Box<serde_json::value::RawValue>),
    Fail(TaskError),
}

/// `{hostname}-{pid}`.
fn default_worker_id() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .or_else(|| std::env::var("HOSTNAME").ok())
        .map(|h| h.trim().to_owned())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "worker".to_owned());
    clean_worker_id(&format!("{host}-{}", std::process::id()))
}

/// A worker id the server accepts: control characters become `_`, at most
/// 128 bytes, never empty.
fn clean_worker_id(id: &str) -> String {
    let mut out = String::new();
    for c in id.chars() {
        let c = if c.is_control() { '_' } else { c };
        if out.len() + c.len_utf8() > WORKER_ID_LEN_MAX {
            break;
        }
        out.push(c);
    }
    if out.is_empty() {
        out.push_str("worker");
    }
    out
}

/// Completes on SIGTERM or Ctrl-C. The handlers are installed now, so that
/// a signal that arrives before the future is first polled still counts.
pub fn shutdown_signal() -> impl Future<Output = ()> + Send + 'static {
    #[cfg(unix)]
    let term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
    async move {
        #[cfg(unix)]
        if let Some(mut term) = term {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
            return;
        }
        let _ = tokio::signal::ctrl_c().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_up_to_its_cap_and_honours_retry_after() {
        let shared = Shared {
            client: Client::new("http://127.0.0.1:1"),
            queue: "q".into(),
            backoff_initial: Duration::from_millis(100),
            backoff_max: Duration::from_secs(2),
        };
        for _ in 0..100 {
            let first = shared.backoff(1, None);
            assert!(first >= Duration::from_millis(50) && first <= Duration::from_millis(100));
            let third = shared.backoff(3, None);
            assert!(third >= Duration::from_millis(200) && third <= Duration::from_millis(400));
            let late = shared.backoff(40, None);
            assert!(late >= Duration::from_secs(1) && late <= Duration::from_secs(2));
            let told = shared.backoff(1, Some(Duration::from_secs(1)));
            assert_eq!(told, Duration::from_secs(1));
        }
    }

    #[test]
    fn heartbeats_come_at_a_third_of_the_remaining_lease() {
        let in_3s = SystemTime::now() + Duration::from_secs(3);
        let beat = beat_interval(Some(in_3s));
        assert!(beat > Duration::from_millis(900) && beat <= Duration::from_secs(1));
        let gone = SystemTime::now() - Duration::from_secs(1);
        assert_eq!(beat_interval(Some(gone)), BEAT_INTERVAL_MIN);
        assert_eq!(beat_interval(None), BEAT_INTERVAL_MIN);
    }

    #[test]
    fn worker_ids_fit_the_servers_rules() {
        assert_eq!(clean_worker_id("billing-1"), "billing-1");
        assert_eq!(clean_worker_id("a\nb"), "a_b");
        assert_eq!(clean_worker_id(""), "worker");
        assert_eq!(clean_worker_id(&"é".repeat(100)).len(), 128);
        let id = default_worker_id();
        assert!(id.ends_with(&format!("-{}", std::process::id())), "{id}");
    }
}
