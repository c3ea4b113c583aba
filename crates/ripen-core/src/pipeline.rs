//! Pipelines: the validated DAG of steps of one entity type version.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use serde::{Deserialize, Serialize};

/// The most steps one pipeline may have.
pub const STEPS_MAX: usize = 64;
/// The longest step name.
pub const STEP_NAME_LEN_MAX: usize = 64;
/// The most steps of a pipeline with its compensations: every step may
/// have one, numbered after the steps themselves.
pub const SLOTS_MAX: usize = 2 * STEPS_MAX;
/// A compensation step is named after the step it undoes, with this
/// suffix, which no step name can contain.
pub const COMPENSATE_SUFFIX: &str = ":compensate";

/// How a step is executed.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Executor {
    /// Ripen POSTs the step contract to this URL.
    Http { url: String },
    /// Remote workers pull the step from a named queue over HTTP.
    Worker { queue: String },
    /// A connector built into Ripen that writes to a store itself.
    /// `connector` names it (`postgres_upsert`, `redis_set`); `config` is its
    /// settings as canonical JSON, which the engine reads.
    Builtin { connector: String, config: String },
}

/// The queue of the steps this node runs itself over HTTP.
pub const HTTP_QUEUE: &str = "http";
/// The queue of the steps this node runs with a built-in connector.
pub const BUILTIN_QUEUE: &str = "builtin";

impl Executor {
    /// The queue a runnable step of this executor waits in: whoever consumes
    /// that queue (this node's scheduler, a remote worker) claims it.
    pub fn queue(&self) -> String {
        match self {
            Executor::Http { .. } => HTTP_QUEUE.to_owned(),
            Executor::Worker { queue } => format!("worker:{queue}"),
            Executor::Builtin { .. } => BUILTIN_QUEUE.to_owned(),
        }
    }

    /// Whether a process other than the node runs the step: its lease then
    /// outlives a restart of the node.
    pub fn is_remote(&self) -> bool {
        matches!(self, Executor::Worker { .. })
    }
}

/// When and how often a failed attempt is tried again.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RetryPolicy {
    /// Attempts in all, the first one included. At least 1.
    pub max_attempts: u32,
    pub initial_backoff_ms: u64,
    pub max_backoff_ms: u64,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            max_attempts: 5,
            initial_backoff_ms: 100,
            max_backoff_ms: 10_000,
        }
    }
}

/// A step as written in the configuration: `needs` by name.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StepDef {
    pub name: String,
    pub needs: Vec<String>,
    pub critical: bool,
    pub timeout_ms: u64,
    pub retry: RetryPolicy,
    pub executor: Executor,
    /// How the step's effect is undone when its entity fails for good or
    /// is cancelled after the step succeeded.
    pub compensate: Option<CompensationDef>,
}

/// The compensation of a step: run like a step, by its own executor, under
/// its own timeout and retry policy.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CompensationDef {
    pub executor: Executor,
    pub timeout_ms: u64,
    pub retry: RetryPolicy,
}

/// A validated step: `needs` resolved to indexes into the pipeline.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StepSpec {
    pub name: String,
    pub needs: Vec<usize>,
    pub critical: bool,
    pub timeout_ms: u64,
    pub retry: RetryPolicy,
    pub executor: Executor,
    /// Set on a compensation step: the step whose effect it undoes. A
    /// compensation step has no `needs` and is not critical; it runs only
    /// while its entity compensates.
    pub compensates: Option<usize>,
}

/// Why a list of step definitions is not a pipeline.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PipelineError {
    #[error("a pipeline needs at least one step")]
    Empty,
    #[error("a pipeline has at most {STEPS_MAX} steps, this one has {0}")]
    TooManySteps(usize),
    #[error("step name {0:?} is invalid: use 1 to {STEP_NAME_LEN_MAX} characters of a-z, A-Z, 0-9, '_' and '-'")]
    InvalidName(String),
    #[error("step {0:?} is defined twice")]
    DuplicateStep(String),
    #[error("step {step:?} needs {need:?}, which is not a step of this pipeline")]
    UnknownNeed { step: String, need: String },
    #[error("step {0:?} needs itself")]
    SelfNeed(String),
    #[error("steps {0:?} form a cycle through their `needs`")]
    Cycle(Vec<String>),
    #[error("critical step {step:?} needs non-critical step {need:?}; a critical step may only need critical steps")]
    CriticalNeedsNonCritical { step: String, need: String },
    #[error("a pipeline needs at least one critical step")]
    NoCriticalStep,
    #[error("step {0:?}: retry.max_attempts must be at least 1")]
    NoAttempts(String),
    #[error("step {0:?}: timeout must be more than zero")]
    NoTimeout(String),
    #[error("step {0:?}: retry.initial_backoff must not exceed retry.max_backoff")]
    BackoffOrder(String),
}

/// The validated DAG of steps of one entity type version.
///
/// Architecture invariant: a `Pipeline` is acyclic, its step names are unique,
/// every `needs` index points at another step, and no critical step needs a
/// non-critical one (so a non-critical failure can never block readiness),
/// and at least one step is critical.
///
/// The steps as defined come first (`forward_len` of them); after them,
/// one compensation step for each step that declares `compensate`, in step
/// order, named `{step}:compensate`. They are steps like the others for
/// claims, leases, retries and executors; the state machine starts them only
/// when the entity fails for good or is cancelled.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Pipeline {
    steps: Vec<StepSpec>,
    /// For each step, the steps that need it.
    dependents: Vec<Vec<usize>>,
    /// For each step, the queue it waits in when runnable.
    queues: Vec<String>,
    /// The steps as defined, before the compensation steps.
    forward: usize,
    /// For each step as defined, its compensation step.
    compensation: Vec<Option<usize>>,
}

fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= STEP_NAME_LEN_MAX
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

impl Pipeline {
    pub fn new(defs: Vec<StepDef>) -> Result<Pipeline, PipelineError> {
        if defs.is_empty() {
            return Err(PipelineError::Empty);
        }
        if defs.len() > STEPS_MAX {
            return Err(PipelineError::TooManySteps(defs.len()));
        }
        let mut index = HashMap::new();
        for (i, def) in defs.iter().enumerate() {
            if !valid_name(&def.name) {
                return Err(PipelineError::InvalidName(def.name.clone()));
            }
            if index.insert(def.name.as_str(), i).is_some() {
                return Err(PipelineError::DuplicateStep(def.name.clone()));
            }
        }
        let mut steps = Vec::with_capacity(defs.len());
        for def in &defs {
            if def.retry.max_attempts == 0 {
                return Err(PipelineError::NoAttempts(def.name.clone()));
            }
            if def.timeout_ms == 0 {
                return Err(PipelineError::NoTimeout(def.name.clone()));
            }
            if def.retry.initial_backoff_ms > def.retry.max_backoff_ms {
                return Err(PipelineError::BackoffOrder(def.name.clone()));
            }
            let mut needs = Vec::with_capacity(def.needs.len());
            for need in &def.needs {
                if need == &def.name {
                    return Err(PipelineError::SelfNeed(def.name.clone()));
                }
                let Some(&j) = index.get(need.as_str()) else {
                    return Err(PipelineError::UnknownNeed {
                        step: def.name.clone(),
                        need: need.clone(),
                    });
                };
                if def.critical && !defs[j].critical {
                    return Err(PipelineError::CriticalNeedsNonCritical {
                        step: def.name.clone(),
                        need: need.clone(),
                    });
                }
                if !needs.contains(&j) {
                    needs.push(j);
                }
            }
            steps.push(StepSpec {
                name: def.name.clone(),
                needs,
                critical: def.critical,
                timeout_ms: def.timeout_ms,
                retry: def.retry,
                executor: def.executor.clone(),
                compensates: None,
            });
        }
        let forward = steps.len();
        let mut compensation = vec![None; forward];
        for (i, def) in defs.iter().enumerate() {
            let Some(c) = &def.compensate else { continue };
            let name = format!("{}{COMPENSATE_SUFFIX}", def.name);
            if c.retry.max_attempts == 0 {
                return Err(PipelineError::NoAttempts(name));
            }
            if c.timeout_ms == 0 {
                return Err(PipelineError::NoTimeout(name));
            }
            if c.retry.initial_backoff_ms > c.retry.max_backoff_ms {
                return Err(PipelineError::BackoffOrder(name));
            }
            compensation[i] = Some(steps.len());
            steps.push(StepSpec {
                name,
                needs: Vec::new(),
                critical: false,
                timeout_ms: c.timeout_ms,
                retry: c.retry,
                executor: c.executor.clone(),
                compensates: Some(i),
            });
        }
        if !steps.iter().any(|s| s.critical) {
            return Err(PipelineError::NoCriticalStep);
        }
        let mut dependents = vec![Vec::new(); steps.len()];
        for (i, step) in steps.iter().enumerate() {
            for &j in &step.needs {
                dependents[j].push(i);
            }
        }
        // Kahn's algorithm: whatever is never freed lies on or behind a cycle.
        let mut waiting: Vec<usize> = steps.iter().map(|s| s.needs.len()).collect();
        let mut free: Vec<usize> = (0..steps.len()).filter(|&i| waiting[i] == 0).collect();
        let mut seen = 0;
        while let Some(i) = free.pop() {
            seen += 1;
            for &d in &dependents[i] {
                waiting[d] -= 1;
                if waiting[d] == 0 {
                    free.push(d);
                }
            }
        }
        if seen != steps.len() {
            let stuck = (0..steps.len())
                .filter(|&i| waiting[i] > 0)
                .map(|i| steps[i].name.clone())
                .collect();
            return Err(PipelineError::Cycle(stuck));
        }
        let queues = steps.iter().map(|s| s.executor.queue()).collect();
        Ok(Pipeline {
            steps,
            dependents,
            queues,
            forward,
            compensation,
        })
    }

    /// How many steps the pipeline has as defined; the compensation steps
    /// follow them.
    pub fn forward_len(&self) -> usize {
        self.forward
    }

    /// The compensation step of step `i`, if it declares one.
    pub fn compensation(&self, i: usize) -> Option<usize> {
        self.compensation.get(i).copied().flatten()
    }

    /// The compensation steps, in step order.
    pub fn compensations(&self) -> std::ops::Range<usize> {
        self.forward..self.steps.len()
    }

    /// Every step that needs step `i`, directly or through other steps: the
    /// steps whose compensation runs before `i`'s.
    pub fn downstream(&self, i: usize) -> Vec<usize> {
        let mut seen = vec![false; self.steps.len()];
        let mut todo = self.dependents[i].clone();
        while let Some(j) = todo.pop() {
            if !std::mem::replace(&mut seen[j], true) {
                todo.extend_from_slice(&self.dependents[j]);
            }
        }
        (0..seen.len()).filter(|&j| seen[j]).collect()
    }

    pub fn steps(&self) -> &[StepSpec] {
        &self.steps
    }

    pub fn step(&self, i: usize) -> &StepSpec {
        &self.steps[i]
    }

    pub fn len(&self) -> usize {
        self.steps.len()
    }

    pub fn is_empty(&self) -> bool {
        self.steps.is_empty()
    }

    /// The steps that list step `i` in their `needs`.
    pub fn dependents(&self, i: usize) -> &[usize] {
        &self.dependents[i]
    }

    /// Every step that step `i` needs, directly or through other steps, in
    /// step order: the steps whose outputs it can be sure to see.
    pub fn upstream(&self, i: usize) -> Vec<usize> {
        let mut seen = vec![false; self.steps.len()];
        let mut todo = self.steps[i].needs.clone();
        while let Some(j) = todo.pop() {
            if !std::mem::replace(&mut seen[j], true) {
                todo.extend_from_slice(&self.steps[j].needs);
            }
        }
        (0..seen.len()).filter(|&j| seen[j]).collect()
    }

    /// The queue step `i` waits in when it is runnable.
    pub fn queue(&self, i: usize) -> &str {
        &self.queues[i]
    }

    /// Whether step `i` runs outside the node (see [`Executor::is_remote`]).
    pub fn is_remote(&self, i: usize) -> bool {
        self.steps[i].executor.is_remote()
    }

    pub fn index_of(&self, name: &str) -> Option<usize> {
        self.steps.iter().position(|s| s.name == name)
    }
}

/// Every pipeline the node knows, by entity type and version.
#[derive(Clone, Debug, Default)]
pub struct Catalog {
    pipelines: BTreeMap<(String, u32), Arc<Pipeline>>,
}

impl Catalog {
    pub fn insert(&mut self, type_name: &str, version: u32, pipeline: Pipeline) {
        self.pipelines
            .insert((type_name.to_owned(), version), Arc::new(pipeline));
    }

    pub fn get(&self, type_name: &str, version: u32) -> Option<&Arc<Pipeline>> {
        self.pipelines.get(&(type_name.to_owned(), version))
    }

    /// Every pipeline, by type name and then version.
    pub fn pipelines(&self) -> impl Iterator<Item = &Arc<Pipeline>> {
        self.pipelines.values()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn def(name: &str, needs: &[&str], critical: bool) -> StepDef {
        StepDef {
            name: name.into(),
            needs: needs.iter().map(|s| s.to_string()).collect(),
            critical,
            timeout_ms: 1_000,
            retry: RetryPolicy::default(),
            executor: Executor::Http {
                url: "http://127.0.0.1:1/x".into(),
            },
            compensate: None,
        }
    }

    fn undone(mut d: StepDef) -> StepDef {
        d.compensate = Some(CompensationDef {
            executor: Executor::Worker {
                queue: "undo".into(),
            },
            timeout_ms: 500,
            retry: RetryPolicy::default(),
        });
        d
    }

    #[test]
    fn compensations_follow_the_steps() {
        let p = Pipeline::new(vec![
            undone(def("a", &[], true)),
            def("b", &["a"], true),
            undone(def("c", &["b"], true)),
        ])
        .unwrap();
        assert_eq!(p.forward_len(), 3);
        assert_eq!(p.len(), 5);
        assert_eq!(p.compensation(0), Some(3));
        assert_eq!(p.compensation(1), None);
        assert_eq!(p.compensation(2), Some(4));
        assert_eq!(p.compensations(), 3..5);
        assert_eq!(p.step(3).name, "a:compensate");
        assert_eq!(p.step(3).compensates, Some(0));
        assert_eq!(p.step(4).timeout_ms, 500);
        assert_eq!(p.queue(4), "worker:undo");
        assert!(p.step(4).needs.is_empty() && !p.step(4).critical);
        assert_eq!(p.index_of("c:compensate"), Some(4));
        assert_eq!(p.downstream(0), vec![1, 2]);
        assert!(p.downstream(2).is_empty());
        let mut bad = undone(def("a", &[], true));
        bad.compensate.as_mut().unwrap().timeout_ms = 0;
        assert_eq!(
            Pipeline::new(vec![bad]),
            Err(PipelineError::NoTimeout("a:compensate".into()))
        );
    }

    #[test]
    fn w5_is_a_pipeline() {
        let p = Pipeline::new(vec![
            def("a", &[], true),
            def("b", &["a"], true),
            def("c", &["a"], true),
            def("d", &["b", "c"], true),
            def("e", &["a"], false),
        ])
        .unwrap();
        assert_eq!(p.dependents(0), &[1, 2, 4]);
        assert_eq!(p.step(3).needs, vec![1, 2]);
        assert_eq!(p.upstream(3), vec![0, 1, 2]);
        assert_eq!(p.upstream(4), vec![0]);
        assert!(p.upstream(0).is_empty());
    }

    #[test]
    fn rejects_bad_graphs() {
        let cases: Vec<(Vec<StepDef>, PipelineError)> = vec![
            (vec![], PipelineError::Empty),
            (
                vec![def("a", &[], true), def("a", &[], true)],
                PipelineError::DuplicateStep("a".into()),
            ),
            (
                vec![def("a", &["zz"], true)],
                PipelineError::UnknownNeed {
                    step: "a".into(),
                    need: "zz".into(),
                },
            ),
            (
                vec![def("a", &["a"], true)],
                PipelineError::SelfNeed("a".into()),
            ),
            (
                vec![
                    def("a", &["c"], true),
                    def("b", &["a"], true),
                    def("c", &["b"], true),
                    def("d", &[], true),
                ],
                PipelineError::Cycle(vec!["a".into(), "b".into(), "c".into()]),
            ),
            (
                vec![def("a", &[], false), def("b", &["a"], true)],
                PipelineError::CriticalNeedsNonCritical {
                    step: "b".into(),
                    need: "a".into(),
                },
            ),
            (
                vec![def("no spaces", &[], true)],
                PipelineError::InvalidName("no spaces".into()),
            ),
        ];
        for (defs, want) in cases {
            assert_eq!(Pipeline::new(defs), Err(want));
        }
        let many = (0..=STEPS_MAX)
            .map(|i| def(&format!("s{i}"), &[], true))
            .collect();
        assert_eq!(
            Pipeline::new(many),
            Err(PipelineError::TooManySteps(STEPS_MAX + 1))
        );
    }
}
