//! Step executors: how a claimed attempt is run, behind one trait.
//!
//! The scheduler never knows how a step runs. It looks up the executor of the
//! step's kind in an [`ExecutorRegistry`] and awaits its [`Outcome`]. The
//! registry also says which queues this node consumes: the scheduler claims
//! from exactly those, so a kind with no local executor (a remote worker
//! queue, say) is left to whoever serves it.

pub mod builtin;
pub mod http;

use std::sync::Arc;

use async_trait::async_trait;
use ripen_core::{Executor, StepSpec};
use ripen_store::{Attempt, Outcome};

pub use builtin::BuiltinExecutor;
pub use http::HttpExecutor;

pub use ripen_core::{BUILTIN_QUEUE, HTTP_QUEUE};

/// Runs one attempt of one step.
#[async_trait]
pub trait StepExecutor: Send + Sync {
    /// Runs `attempt` of `step`, which holds a lease. Never fails: every
    /// problem, a timeout included, is an [`Outcome`].
    async fn run(&self, step: &StepSpec, attempt: &Attempt) -> Outcome;
}

/// The kinds of executor a step may name, one per [`Executor`] variant.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ExecutorKind {
    Http,
    Worker,
    Builtin,
}

impl ExecutorKind {
    pub fn of(executor: &Executor) -> ExecutorKind {
        match executor {
            Executor::Http { .. } => ExecutorKind::Http,
            Executor::Worker { .. } => ExecutorKind::Worker,
            Executor::Builtin { .. } => ExecutorKind::Builtin,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            ExecutorKind::Http => "http",
            ExecutorKind::Worker => "worker",
            ExecutorKind::Builtin => "builtin",
        }
    }
}

struct Entry {
    kind: ExecutorKind,
    /// The queues whose steps this executor runs on this node.
    queues: Vec<String>,
    executor: Arc<dyn StepExecutor>,
}

/// The executors of this node, keyed by kind.
#[derive(Default)]
pub struct ExecutorRegistry {
    entries: Vec<Entry>,
    /// Reads an attempt's payload from the blob store when it is there,
    /// before any executor sees it.
    payloads: crate::blobs::Payloads,
}

impl ExecutorRegistry {
    /// A registry with no executor: this node runs no step.
    pub fn empty() -> ExecutorRegistry {
        ExecutorRegistry::default()
    }

    /// This registry, reading blob-backed payloads through `payloads`.
    pub fn with_payloads(mut self, payloads: crate::blobs::Payloads) -> ExecutorRegistry {
        self.payloads = payloads;
        self
    }

    /// The executors every node has: HTTP, consuming the `http` queue.
    /// `concurrency` bounds the keep-alive connections kept per downstream.
    pub fn standard(concurrency: usize) -> ExecutorRegistry {
        let mut registry = ExecutorRegistry::empty();
        registry.register(
            ExecutorKind::Http,
            [HTTP_QUEUE],
            Arc::new(HttpExecutor::new(concurrency)),
        );
        registry
    }

    /// Like [`ExecutorRegistry::standard`], with the TLS settings of the
    /// configuration for `https` steps.
    pub fn standard_with_tls(
        concurrency: usize,
        tls: &crate::config::HttpTls,
    ) -> Result<ExecutorRegistry, ripen_tls::FileError> {
        let mut registry = ExecutorRegistry::empty();
        registry.register(
            ExecutorKind::Http,
            [HTTP_QUEUE],
            Arc::new(HttpExecutor::with_tls(concurrency, tls)?),
        );
        Ok(registry)
    }

    /// Makes `executor` run every step of `kind`, and this node consume
    /// `queues`. A second registration of a kind replaces the first.
    pub fn register<Q: Into<String>>(
        &mut self,
        kind: ExecutorKind,
        queues: impl IntoIterator<Item = Q>,
        executor: Arc<dyn StepExecutor>,
    ) {
        self.entries.retain(|e| e.kind != kind);
        self.entries.push(Entry {
            kind,
            queues: queues.into_iter().map(Into::into).collect(),
            executor,
        });
    }

    pub fn get(&self, kind: ExecutorKind) -> Option<&Arc<dyn StepExecutor>> {
        self.entries
            .iter()
            .find(|e| e.kind == kind)
            .map(|e| &e.executor)
    }

    /// The queues this node claims from, in registration order.
    pub fn local_queues(&self) -> Vec<&str> {
        self.entries
            .iter()
            .flat_map(|e| e.queues.iter().map(String::as_str))
            .collect()
    }

    /// The queue whose newly runnable steps a completion claims in its own
    /// transaction: the first local one. Steps of the other local queues are
    /// left to the claim loop, which the completer wakes.
    pub fn completion_queue(&self) -> Option<&str> {
        self.local_queues().first().copied()
    }

    /// Runs one attempt with the executor of its step's kind. A kind with no
    /// executor here fails the step for good: trying again on this node
    /// would fail the same way.
    pub async fn run(&self, step: &StepSpec, attempt: &Attempt) -> Outcome {
        let kind = ExecutorKind::of(&step.executor);
        match self.get(kind) {
            Some(executor) => match self.payloads.attempt(attempt).await {
                Ok(attempt) => executor.run(step, &attempt).await,
                // A lost blob fails the step for good; an unreachable store
                // is the step's retry policy's to handle.
                Err(e) => Outcome::Failed {
                    error: e.to_string(),
                    retryable: e.is_transient(),
                    retry_after_ms: None,
                },
            },
            None => Outcome::Failed {
                error: format!(
                    "step {:?} uses the {} executor, which this node does not have",
                    step.name,
                    kind.as_str()
                ),
                retryable: false,
                retry_after_ms: None,
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ripen_core::RetryPolicy;
    use ripen_store::EntityId;
    use std::sync::atomic::{AtomicUsize, Ordering};

    fn spec(executor: Executor) -> StepSpec {
        StepSpec {
            name: "billing".into(),
            needs: Vec::new(),
            critical: true,
            timeout_ms: 1_000,
            retry: RetryPolicy::default(),
            executor,
            compensates: None,
        }
    }

    fn attempt() -> Attempt {
        Attempt {
            entity_id: EntityId::new_v7(),
            type_name: "merchant".into(),
            version: 1,
            step: 0,
            step_name: "billing".into(),
            attempt: 1,
            epoch: 1,
            lease_expires_at_us: 0,
            payload: "{}".into(),
            outputs: Vec::new(),
        }
    }

    /// Counts its calls and succeeds.
    #[derive(Default)]
    struct Counting(AtomicUsize);

    #[async_trait]
    impl StepExecutor for Counting {
        async fn run(&self, _step: &StepSpec, _attempt: &Attempt) -> Outcome {
            self.0.fetch_add(1, Ordering::SeqCst);
            Outcome::Succeeded { output: None }
        }
    }

    #[tokio::test]
    async fn a_kind_without_executor_fails_for_good_and_says_why() {
        let registry = ExecutorRegistry::standard(1);
        let worker = spec(Executor::Worker {
            queue: "billing".into(),
        });
        match registry.run(&worker, &attempt()).await {
            Outcome::Failed {
                error,
                retryable,
                retry_after_ms,
            } => {
                assert_eq!(
                    error,
                    "step \"billing\" uses the worker executor, which this node does not have"
                );
                assert!(!retryable);
                assert_eq!(retry_after_ms, None);
            }
            other => panic!("expected a failure, got {other:?}"),
        }
    }

    #[tokio::test]
    async fn steps_run_on_the_executor_of_their_kind() {
        let http = Arc::new(Counting::default());
        let worker = Arc::new(Counting::default());
        let mut registry = ExecutorRegistry::empty();
        registry.register(ExecutorKind::Http, [HTTP_QUEUE], http.clone());
        registry.register(ExecutorKind::Worker, ["worker:billing"], worker.clone());
        let http_step = spec(Executor::Http {
            url: "http://127.0.0.1:9/x".into(),
        });
        let worker_step = spec(Executor::Worker {
            queue: "billing".into(),
        });
        for step in [&http_step, &worker_step, &worker_step] {
            let outcome = registry.run(step, &attempt()).await;
            assert_eq!(outcome, Outcome::Succeeded { output: None });
        }
        assert_eq!(http.0.load(Ordering::SeqCst), 1);
        assert_eq!(worker.0.load(Ordering::SeqCst), 2);
        assert_eq!(registry.local_queues(), ["http", "worker:billing"]);
        assert_eq!(registry.completion_queue(), Some("http"));
    }

    #[test]
    fn queues_and_registration() {
        assert_eq!(Executor::Http { url: "u".into() }.queue(), "http");
        assert_eq!(
            Executor::Worker {
                queue: "billing".into()
            }
            .queue(),
            "worker:billing"
        );
        let builtin = Executor::Builtin {
            connector: "redis_set".into(),
            config: "{}".into(),
        };
        assert_eq!(builtin.queue(), "builtin");
        assert_eq!(ExecutorKind::of(&builtin), ExecutorKind::Builtin);
        let mut registry = ExecutorRegistry::standard(1);
        assert_eq!(registry.local_queues(), ["http"]);
        // A second registration of a kind replaces the first, queues included.
        registry.register(
            ExecutorKind::Http,
            ["http", "http-slow"],
            Arc::new(Counting::default()),
        );
        assert_eq!(registry.local_queues(), ["http", "http-slow"]);
        assert!(ExecutorRegistry::empty().local_queues().is_empty());
        assert_eq!(ExecutorRegistry::empty().completion_queue(), None);
    }
}
