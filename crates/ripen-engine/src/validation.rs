//! The validation pool: costly payload validations run here, on a few
//! threads of their own, so that no schema and no body can hold the async
//! threads that serve every other request.
//!
//! Every validation is bounded: it waits for a thread at most
//! `limits.validation_timeout` (then the request is answered 503
//! overloaded), and it may run that long (then the request is refused as
//! too costly). A validation cannot be interrupted, so one that ran out of
//! time keeps its thread until it ends; meanwhile its type version is
//! refused at once, so that one costly schema costs one request, not the
//! node.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{self, Receiver, SyncSender, TrySendError};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::oneshot;

use crate::limits::JsonLimits;
use crate::schema::{self, PayloadError, Schema};

/// Bodies from this size on are validated on the pool even without a
/// costly schema: reading them costs more than a thread hop.
pub const POOL_BODY_BYTES_MIN: usize = 16 * 1024;

/// Why the pool did not validate a payload.
#[derive(Debug, PartialEq, Eq)]
pub enum PoolRefusal {
    /// Every thread is busy and the queue is full, or the validation
    /// waited for a thread longer than the timeout.
    Overloaded(String),
    /// The validation ran longer than the timeout, or another validation of
    /// the same type version still does.
    TooCostly(String),
}

type Job = Box<dyn FnOnce() + Send>;

/// A type version: validations that ran out of time are counted under it.
type VersionKey = (String, u32);

pub struct ValidationPool {
    jobs: SyncSender<Job>,
    /// Validations admitted and not ended: running or queued.
    admitted: Arc<AtomicUsize>,
    /// How many may be admitted: the threads and the queue.
    admitted_max: usize,
    timeout: Duration,
    /// Validations that ran out of time and still run, per type version.
    runaway: Arc<Mutex<HashMap<VersionKey, usize>>>,
}

impl std::fmt::Debug for ValidationPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ValidationPool")
            .field("timeout", &self.timeout)
            .finish_non_exhaustive()
    }
}

/// What one job's caller and its thread both see.
#[derive(Default)]
struct JobState {
    /// Its caller stopped waiting for it.
    abandoned: bool,
    /// Its thread ended it.
    finished: bool,
}

impl ValidationPool {
    /// Starts `threads` threads that take validations from a queue of at
    /// most `queue_max` waiting ones.
    pub fn start(threads: usize, queue_max: usize, timeout: Duration) -> ValidationPool {
        let threads = threads.max(1);
        let admitted_max = threads + queue_max;
        // Never full: admission is counted before a job is sent.
        let (jobs, queue) = mpsc::sync_channel::<Job>(admitted_max);
        let queue = Arc::new(Mutex::new(queue));
        for i in 0..threads {
            let queue = queue.clone();
            let spawned = std::thread::Builder::new()
                .name(format!("ripen-validate-{i}"))
                .spawn(move || run(&queue));
            if let Err(e) = spawned {
                tracing::error!(error = %e, "start a validation thread");
            }
        }
        ValidationPool {
            jobs,
            admitted: Arc::default(),
            admitted_max,
            timeout,
            runaway: Arc::default(),
        }
    }

    /// Whether a payload of `body_len` bytes for `schema` goes to the pool.
    pub fn wants(schema: Option<&Schema>, body_len: usize) -> bool {
        body_len >= POOL_BODY_BYTES_MIN || schema.is_some_and(Schema::costly)
    }

    /// Validates `body` against `schema` of type version `key` on the pool.
    pub async fn validate(
        &self,
        key: (&str, u32),
        body: bytes::Bytes,
        schema: Option<Arc<Schema>>,
        limits: JsonLimits,
    ) -> Result<Result<(), PayloadError>, PoolRefusal> {
        let version: VersionKey = (key.0.to_owned(), key.1);
        if self.runaway_count(&version) > 0 {
            return Err(PoolRefusal::TooCostly(format!(
                "a validation against the schema of type {:?} version {} ran longer than {} ms and still runs; payloads of this version are refused until it ends",
                key.0,
                key.1,
                self.timeout.as_millis()
            )));
        }
        if self.admitted.fetch_add(1, Ordering::AcqRel) >= self.admitted_max {
            self.admitted.fetch_sub(1, Ordering::AcqRel);
            return Err(PoolRefusal::Overloaded(
                "every validation thread is busy and the validation queue is full".into(),
            ));
        }
        let admission = Admitted(self.admitted.clone());
        let state = Arc::new(Mutex::new(JobState::default()));
        let (started_tx, started) = oneshot::channel::<()>();
        let (done_tx, done) = oneshot::channel();
        let job: Job = {
            let state = state.clone();
            let runaway = self.runaway.clone();
            let version = version.clone();
            Box::new(move || {
                let _admission = admission;
                if lock(&state).abandoned {
                    return;
                }
                let _ = started_tx.send(());
                let result = schema::validate(&body, schema.as_deref(), &limits);
                let mut s = lock(&state);
                s.finished = true;
                if s.abandoned {
                    let mut runaway = lock(&runaway);
                    if let Some(n) = runaway.get_mut(&version) {
                        *n -= 1;
                        if *n == 0 {
                            runaway.remove(&version);
                        }
                    }
                    return;
                }
                drop(s);
                let _ = done_tx.send(result);
            })
        };
        match self.jobs.try_send(job) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) => {
                return Err(PoolRefusal::Overloaded(
                    "every validation thread is busy and the validation queue is full".into(),
                ))
            }
            Err(TrySendError::Disconnected(_)) => {
                return Err(PoolRefusal::Overloaded(
                    "the validation threads have stopped".into(),
                ))
            }
        }
        let waited = Instant::now();
        if tokio::time::timeout(self.timeout, started).await.is_err() {
            lock(&state).abandoned = true;
            return Err(PoolRefusal::Overloaded(format!(
                "no validation thread was free within {} ms",
                waited.elapsed().as_millis()
            )));
        }
        match tokio::time::timeout(self.timeout, done).await {
            Ok(Ok(result)) => Ok(result),
            Ok(Err(_)) => Err(PoolRefusal::Overloaded(
                "the validation thread stopped before answering".into(),
            )),
            Err(_) => {
                let mut s = lock(&state);
                if !s.finished {
                    s.abandoned = true;
                    *lock(&self.runaway).entry(version).or_default() += 1;
                }
                Err(PoolRefusal::TooCostly(format!(
                    "validating the payload against the schema of type {:?} version {} took longer than {} ms, the most intake spends on one payload",
                    key.0,
                    key.1,
                    self.timeout.as_millis()
                )))
            }
        }
    }

    fn runaway_count(&self, version: &VersionKey) -> usize {
        lock(&self.runaway).get(version).copied().unwrap_or(0)
    }
}

/// One admitted validation, counted until its job ends (or is dropped
/// unrun).
struct Admitted(Arc<AtomicUsize>);

impl Drop for Admitted {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// How much less the validation threads weigh than the threads that serve
/// requests, as a nice value: when a costly validation and a request want
/// the same core, the request wins.
const VALIDATION_NICE: i32 = 10;

/// Lowers the calling thread's scheduling priority (Linux: per thread).
fn lower_priority() {
    #[cfg(target_os = "linux")]
    // SAFETY: gettid and setpriority only read their integer arguments;
    // on Linux a thread id names that one thread.
    unsafe {
        let tid = libc::syscall(libc::SYS_gettid) as libc::id_t;
        if libc::setpriority(libc::PRIO_PROCESS, tid, VALIDATION_NICE) != 0 {
            tracing::debug!("could not lower the priority of a validation thread");
        }
    }
}

/// One validation thread: takes jobs until the pool is dropped.
fn run(queue: &Mutex<Receiver<Job>>) {
    lower_priority();
    loop {
        let job = match lock(queue).recv() {
            Ok(job) => job,
            Err(_) => return,
        };
        job();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn schema(v: serde_json::Value) -> Option<Arc<Schema>> {
        Some(Arc::new(Schema::from_value(&v).unwrap()))
    }

    /// An `anyOf` that branches in two at each of `levels` levels, through
    /// `$ref`s, and that no value satisfies: its cost doubles per level.
    fn branching(levels: usize) -> serde_json::Value {
        let mut defs = serde_json::Map::new();
        for i in 0..levels {
            let next = format!("#/$defs/d{}", i + 1);
            defs.insert(
                format!("d{i}"),
                json!({"anyOf": [{"$ref": next}, {"$ref": next}]}),
            );
        }
        defs.insert(format!("d{levels}"), json!({"type": "string"}));
        json!({"type": "object", "properties": {"a": {"$ref": "#/$defs/d0"}}, "$defs": defs})
    }

    #[test]
    fn costly_schemas_and_large_bodies_go_to_the_pool() {
        let plain = schema(json!({"type": "object", "properties": {"a": {"type": "string"}}}));
        let pattern = schema(json!({"properties": {"a": {"pattern": "^a+$"}}}));
        assert!(!ValidationPool::wants(plain.as_deref(), 100));
        assert!(!ValidationPool::wants(None, 100));
        assert!(ValidationPool::wants(pattern.as_deref(), 100));
        assert!(ValidationPool::wants(schema(branching(2)).as_deref(), 100));
        assert!(ValidationPool::wants(None, POOL_BODY_BYTES_MIN));
    }

    #[tokio::test]
    async fn a_plain_validation_answers() {
        let pool = ValidationPool::start(1, 4, Duration::from_secs(5));
        let s = schema(json!({"type": "object", "required": ["a"]}));
        let ok = pool
            .validate(
                ("t", 1),
                bytes::Bytes::from_static(br#"{"a":1}"#),
                s.clone(),
                JsonLimits::default(),
            )
            .await
            .unwrap();
        assert!(ok.is_ok());
        let invalid = pool
            .validate(
                ("t", 1),
                bytes::Bytes::from_static(b"{}"),
                s,
                JsonLimits::default(),
            )
            .await
            .unwrap();
        assert!(matches!(invalid, Err(PayloadError::Invalid(_))));
    }

    #[tokio::test]
    async fn a_backtracking_pattern_is_refused_fast() {
        let pool = ValidationPool::start(1, 4, Duration::from_secs(5));
        let s = schema(
            json!({"properties": {"a": {"type": "string", "pattern": "^(?=\\w)(\\w+\\s?)+$"}}}),
        );
        let body = json!({"a": format!("{}!", "a".repeat(300))}).to_string();
        let started = Instant::now();
        let got = pool
            .validate(("t", 1), body.into_bytes().into(), s, JsonLimits::default())
            .await
            .unwrap();
        assert!(matches!(got, Err(PayloadError::TooCostly(_))), "{got:?}");
        assert!(started.elapsed() < Duration::from_secs(1));
    }

    #[tokio::test]
    async fn a_runaway_validation_costs_its_request_and_refuses_its_version_meanwhile() {
        let pool = ValidationPool::start(2, 0, Duration::from_millis(100));
        let s = schema(branching(40));
        let body = bytes::Bytes::from_static(br#"{"a": 1}"#);
        let first = pool
            .validate(("slow", 1), body.clone(), s.clone(), JsonLimits::default())
            .await;
        assert!(matches!(first, Err(PoolRefusal::TooCostly(_))), "{first:?}");
        let started = Instant::now();
        let second = pool
            .validate(("slow", 1), body, s, JsonLimits::default())
            .await;
        assert!(
            matches!(second, Err(PoolRefusal::TooCostly(_))),
            "{second:?}"
        );
        assert!(
            started.elapsed() < Duration::from_millis(50),
            "refused at once"
        );
        // Another type still validates on the other thread.
        let other = pool
            .validate(
                ("other", 1),
                bytes::Bytes::from_static(br#"{"a": 1}"#),
                schema(json!({"type": "object"})),
                JsonLimits::default(),
            )
            .await
            .unwrap();
        assert!(other.is_ok());
    }

    #[tokio::test]
    async fn a_full_pool_is_overloaded() {
        let pool = ValidationPool::start(1, 0, Duration::from_millis(200));
        let s = schema(branching(40));
        let busy = pool.validate(
            ("slow", 1),
            bytes::Bytes::from_static(br#"{"a": 1}"#),
            s,
            JsonLimits::default(),
        );
        let (busy, other) = tokio::join!(busy, async {
            tokio::time::sleep(Duration::from_millis(50)).await;
            pool.validate(
                ("other", 1),
                bytes::Bytes::from_static(br#"{"a": 1}"#),
                schema(json!({"type": "object"})),
                JsonLimits::default(),
            )
            .await
        });
        assert!(matches!(busy, Err(PoolRefusal::TooCostly(_))), "{busy:?}");
        assert!(
            matches!(other, Err(PoolRefusal::Overloaded(_))),
            "{other:?}"
        );
    }
}
