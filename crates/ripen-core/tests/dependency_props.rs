//! Property tests of dependent entities: a world of entities that reference
//! earlier ones, run by the core machine and by a model of what the store
//! does around it.
//!
//! The model of the store is the design of docs/dependencies.md, written
//! down small: a new entity is refused if an entity it references has
//! failed or was cancelled, waits for those not ready yet, and is indexed
//! under each one it waits for; every status change is appended to an
//! outbox; a resolver reads the outbox after its durable cursor and, for
//! each row of an entity that settled, visits its waiting dependents one at
//! a time: in each dependent's own transaction it reads what that entity is
//! now and hands the dependent `DependencyReady` or `DependencyFailed` (an
//! entity retried since its failure is pending again, and a later row will
//! say how it ends). Only then does the resolver move its cursor. It crashes
//! at random between those steps (so rows are read again and dependents
//! visited twice), visits come from stale snapshots of the index, steps
//! succeed or fail at random, and operators cancel and retry entities (a
//! retry of a dependent re-checks what it references, as the store does).
//!
//! Whatever happens, once the world is left to run: every entity settles,
//! none is left waiting, the index is empty and the resolver has caught up;
//! no entity ever started a step before every entity it depends on was
//! ready; an entity became ready only after each of those did; and one
//! failed by a dependency names an entity that failed or was cancelled
//! before.

use std::collections::BTreeSet;

use proptest::prelude::*;
use proptest::test_runner::{Config, TestCaseError};

use ripen_core::{
    apply, Ctx, Dependency, EntityState, EntityStatus, Event, Executor, Input, Pipeline, Refusal,
    RetryPolicy, StepDef, StepStatus, UnixMicros,
};

type TestResult<T = ()> = Result<T, TestCaseError>;

const T0: UnixMicros = 1_700_000_000_000_000;
/// The most inputs the drain may take before the world counts as stuck.
const DRAIN_OPS_MAX: usize = 100_000;

fn config(cases: u32) -> Config {
    let cases = std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(cases);
    Config {
        cases,
        failure_persistence: None,
        ..Config::default()
    }
}

/// A pipeline of `n` steps: a chain when `chain`, else independent ones;
/// every step is critical and has one attempt, so that a failure is final
/// until an operator retries.
fn pipeline(n: usize, chain: bool) -> Pipeline {
    let defs = (0..n)
        .map(|i| StepDef {
            name: format!("s{i}"),
            needs: if chain && i > 0 {
                vec![format!("s{}", i - 1)]
            } else {
                Vec::new()
            },
            critical: true,
            timeout_ms: 10,
            retry: RetryPolicy {
                max_attempts: 1,
                initial_backoff_ms: 0,
                max_backoff_ms: 0,
            },
            executor: Executor::Http {
                url: format!("http://127.0.0.1:1/s{i}"),
            },
            compensate: None,
        })
        .collect();
    Pipeline::new(defs).expect("a valid pipeline")
}

/// One entity of the world: what it references (indexes of earlier
/// entities, possibly twice the same) and its pipeline's shape.
#[derive(Clone, Debug)]
struct Spec {
    refs: Vec<usize>,
    steps: usize,
    chain: bool,
}

fn world() -> impl Strategy<Value = Vec<Spec>> {
    (2usize..=10).prop_flat_map(|n| {
        let specs: Vec<_> = (0..n)
            .map(|k| {
                let refs = if k == 0 {
                    Just(Vec::new()).boxed()
                } else {
                    prop::collection::vec(0..k, 0..=3).boxed()
                };
                (refs, 1usize..=3, any::<bool>()).prop_map(|(refs, steps, chain)| Spec {
                    refs,
                    steps,
                    chain,
                })
            })
            .collect();
        specs
    })
}

/// A chain: each entity references the one before.
fn chain(n: usize) -> Vec<Spec> {
    (0..n)
        .map(|k| Spec {
            refs: if k == 0 { Vec::new() } else { vec![k - 1] },
            steps: 1,
            chain: false,
        })
        .collect()
}

#[derive(Clone, Copy, Debug)]
enum Op {
    /// Submit the next entity of the world.
    Submit,
    /// Claim a runnable step of some entity.
    Claim(u8),
    /// End a running attempt: success, or a failure for good.
    Finish(u8, bool),
    /// The resolver handles up to this many dependents of its next row.
    Resolve(u8),
    /// The resolver crashes: what it read but did not commit is lost.
    Crash,
    /// A dependent from a stale read of the index is visited again.
    Replay(u8),
    Cancel(u8),
    Retry(u8),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        8 => Just(Op::Submit),
        10 => any::<u8>().prop_map(Op::Claim),
        10 => (any::<u8>(), prop::bool::weighted(0.15)).prop_map(|(e, f)| Op::Finish(e, f)),
        10 => (1u8..=3).prop_map(Op::Resolve),
        2 => Just(Op::Crash),
        3 => any::<u8>().prop_map(Op::Replay),
        1 => any::<u8>().prop_map(Op::Cancel),
        3 => any::<u8>().prop_map(Op::Retry),
    ]
}

/// One stored entity.
struct Entity {
    pipeline: Pipeline,
    state: EntityState,
    /// The logical time it became ready, if it did.
    ready_at: Option<u64>,
    /// The logical time it first started a step.
    started_at: Option<u64>,
}

/// What the resolver has read and not committed yet.
struct Reading {
    /// The outbox row it is on.
    row: usize,
    /// The dependents of that row's entity it read from the index.
    dependents: Vec<usize>,
}

struct World {
    specs: Vec<Spec>,
    /// Index by spec: the stored entity, `None` before it is submitted or
    /// when it was refused.
    entities: Vec<Option<Entity>>,
    submitted: usize,
    refused: BTreeSet<usize>,
    /// Every status change to ready, failed or cancelled: (entity, status).
    outbox: Vec<(usize, EntityStatus)>,
    /// The resolver's durable position: rows before it are handled.
    cursor: usize,
    reading: Option<Reading>,
    /// Every visit the resolver made: (parent, dependent).
    visited: Vec<(usize, usize)>,
    clock: u64,
    log: Vec<String>,
}

fn id(k: usize) -> u128 {
    k as u128 + 1
}

fn index(parent: u128) -> usize {
    parent as usize - 1
}

impl World {
    fn new(specs: Vec<Spec>) -> World {
        let n = specs.len();
        World {
            specs,
            entities: (0..n).map(|_| None).collect(),
            submitted: 0,
            refused: BTreeSet::new(),
            outbox: Vec::new(),
            cursor: 0,
            reading: None,
            visited: Vec::new(),
            clock: 0,
            log: Vec::new(),
        }
    }

    fn fail(&self, msg: String) -> TestCaseError {
        TestCaseError::fail(format!(
            "{msg}\n  specs: {:?}\n  history:\n    {}",
            self.specs,
            self.log.join("\n    ")
        ))
    }

    fn ctx(&self) -> Ctx {
        Ctx {
            now_us: T0 + self.clock as i64,
            jitter: 0.5,
            lease_grace_ms: 0,
        }
    }

    /// The index of the store: (parent, dependent) for every entity that
    /// awaits another, derived from the states as the store maintains it.
    fn waiting_on(&self, parent: usize) -> Vec<usize> {
        self.entities
            .iter()
            .enumerate()
            .filter_map(|(k, e)| {
                let e = e.as_ref()?;
                e.state.awaited().any(|p| p == id(parent)).then_some(k)
            })
            .collect()
    }

    /// Applies one input to entity `k` and checks what holds for every
    /// state; records the outbox rows and times it calls for.
    fn apply(&mut self, k: usize, input: Input) -> TestResult<Result<(), Refusal>> {
        self.clock += 1;
        let ctx = self.ctx();
        let clock = self.clock;
        let Some(e) = self.entities[k].as_mut() else {
            return Ok(Err(Refusal::NotRunnable));
        };
        let before = e.state.clone();
        let line = format!("#{k} {input:?}");
        let result = apply(&e.pipeline, &mut e.state, input, ctx);
        let events = match result {
            Err(r) => {
                if e.state != before {
                    let msg = format!("a refused input changed entity {k}");
                    return Err(self.fail(msg));
                }
                self.log.push(format!("{line} -> refused {r:?}"));
                return Ok(Err(r));
            }
            Ok(t) => t.events,
        };
        self.log.push(format!("{line} -> {events:?}"));
        for ev in &events {
            if let Event::StatusChanged { to, .. } = ev {
                if *to == EntityStatus::Ready {
                    e.ready_at = Some(clock);
                }
                if to.is_terminal() {
                    self.outbox.push((k, *to));
                }
            }
            if let Event::StepStarted { .. } = ev {
                e.started_at.get_or_insert(clock);
            }
        }
        self.check_entity(k)?;
        Ok(Ok(()))
    }

    /// What holds for entity `k` at any time.
    fn check_entity(&self, k: usize) -> TestResult {
        let Some(e) = &self.entities[k] else {
            return Ok(());
        };
        let parents: BTreeSet<usize> = e.state.deps.iter().map(|d| index(d.parent)).collect();
        for &p in &parents {
            let parent = self.entities[p].as_ref();
            let parent_ready_at = parent.and_then(|p| p.ready_at);
            if let Some(started) = e.started_at {
                // Guarantee 4: it started only after each parent was ready.
                if parent_ready_at.is_none_or(|at| at >= started) {
                    return Err(self.fail(format!(
                        "entity {k} started at {started} before entity {p} was ready ({parent_ready_at:?})"
                    )));
                }
            }
            if let Some(ready) = e.ready_at {
                if parent_ready_at.is_none_or(|at| at >= ready) {
                    return Err(self.fail(format!(
                        "entity {k} ready at {ready} before entity {p} ({parent_ready_at:?})"
                    )));
                }
            }
        }
        if e.state.is_waiting() && e.state.steps.iter().any(|s| s.due_at_us.is_some()) {
            return Err(self.fail(format!("waiting entity {k} has a step due")));
        }
        Ok(())
    }

    fn pick(&self, sel: u8, ok: impl Fn(&Entity) -> bool) -> Option<usize> {
        let ks: Vec<usize> = (0..self.entities.len())
            .filter(|&k| self.entities[k].as_ref().is_some_and(&ok))
            .collect();
        (!ks.is_empty()).then(|| ks[usize::from(sel) % ks.len()])
    }

    /// Intake: refused if a referenced entity failed or was cancelled;
    /// else created, awaiting those not ready.
    fn submit(&mut self) -> TestResult {
        let k = self.submitted;
        if k >= self.specs.len() {
            return Ok(());
        }
        self.submitted += 1;
        let spec = self.specs[k].clone();
        let mut deps = Vec::new();
        for &p in &spec.refs {
            let status = match &self.entities[p] {
                None => {
                    self.log
                        .push(format!("#{k} refused: entity {p} does not exist"));
                    self.refused.insert(k);
                    return Ok(());
                }
                Some(parent) => parent.state.status,
            };
            if matches!(status, EntityStatus::Failed | EntityStatus::Cancelled) {
                self.log
                    .push(format!("#{k} refused: entity {p} is {status:?}"));
                self.refused.insert(k);
                return Ok(());
            }
            deps.push(Dependency {
                parent: id(p),
                status,
            });
        }
        let pipeline = pipeline(spec.steps, spec.chain);
        let state = EntityState::depending(&pipeline, T0, deps);
        self.log.push(format!("#{k} created: {:?}", state.deps));
        self.entities[k] = Some(Entity {
            pipeline,
            state,
            ready_at: None,
            started_at: None,
        });
        self.check_entity(k)
    }

    fn claim(&mut self, sel: u8) -> TestResult {
        let runnable = |e: &Entity| e.state.steps.iter().any(|s| s.status == StepStatus::Queued);
        let Some(k) = self.pick(sel, runnable) else {
            return Ok(());
        };
        let e = self.entities[k].as_ref().expect("picked");
        let step = e
            .state
            .steps
            .iter()
            .position(|s| s.status == StepStatus::Queued)
            .expect("runnable");
        let _ = self.apply(k, Input::Claim { step, holder: None })?;
        Ok(())
    }

    fn finish(&mut self, sel: u8, fail: bool) -> TestResult {
        let running = |e: &Entity| {
            e.state
                .steps
                .iter()
                .any(|s| s.status == StepStatus::Running)
        };
        let Some(k) = self.pick(sel, running) else {
            return Ok(());
        };
        let e = self.entities[k].as_ref().expect("picked");
        let (step, s) = e
            .state
            .steps
            .iter()
            .enumerate()
            .find(|(_, s)| s.status == StepStatus::Running)
            .expect("running");
        let epoch = s.epoch;
        let input = if fail {
            Input::Failed {
                step,
                epoch,
                error: "400".into(),
                retryable: false,
                retry_after_ms: None,
            }
        } else {
            Input::Succeeded { step, epoch }
        };
        let _ = self.apply(k, input)?;
        Ok(())
    }

    /// What the store's resolver hands a dependent, given what the entity
    /// it depends on is now.
    fn wake(parent: usize, status: EntityStatus) -> Option<Input> {
        let parent = id(parent);
        match status {
            EntityStatus::Ready => Some(Input::DependencyReady { parent }),
            EntityStatus::Failed | EntityStatus::Cancelled => {
                Some(Input::DependencyFailed { parent, status })
            }
            EntityStatus::Pending => None,
        }
    }

    /// One resolver pass over its next row: read the dependents once, hand
    /// up to `budget` of them their input, and move the cursor when none is
    /// left.
    fn resolve(&mut self, budget: usize) -> TestResult {
        if self.reading.is_none() {
            let Some(&(parent, _)) = self.outbox.get(self.cursor) else {
                return Ok(());
            };
            let dependents = self.waiting_on(parent);
            self.reading = Some(Reading {
                row: self.cursor,
                dependents,
            });
        }
        let reading = self.reading.as_mut().expect("set above");
        let (parent, _) = self.outbox[reading.row];
        let take = budget.min(reading.dependents.len());
        let batch: Vec<usize> = reading.dependents.drain(..take).collect();
        let done = reading.dependents.is_empty();
        for d in batch {
            self.visit(parent, d)?;
        }
        if done {
            self.cursor += 1;
            self.reading = None;
        }
        Ok(())
    }

    /// One dependent's transaction: what `parent` is now decides the input.
    /// A dependent that no longer awaits it refuses, unchanged.
    fn visit(&mut self, parent: usize, d: usize) -> TestResult {
        self.visited.push((parent, d));
        let now = self.entities[parent]
            .as_ref()
            .map_or(EntityStatus::Pending, |p| p.state.status);
        let awaited = self.entities[d]
            .as_ref()
            .is_some_and(|e| e.state.awaited().any(|p| p == id(parent)));
        let Some(input) = World::wake(parent, now) else {
            return Ok(());
        };
        let applied = self.apply(d, input.clone())?.is_ok();
        if applied != awaited {
            return Err(self.fail(format!(
                "{input:?} to entity {d} applied: {applied}, though it awaited: {awaited}"
            )));
        }
        Ok(())
    }

    /// Visits an earlier pair again, as a resolver that read a stale index
    /// or crashed after a dependent's commit would.
    fn replay(&mut self, sel: u8) -> TestResult {
        if self.visited.is_empty() {
            return Ok(());
        }
        let (parent, d) = self.visited[usize::from(sel) % self.visited.len()];
        self.visit(parent, d)
    }

    fn cancel(&mut self, sel: u8) -> TestResult {
        if let Some(k) = self.pick(sel, |e| e.state.status == EntityStatus::Pending) {
            let _ = self.apply(k, Input::Cancel)?;
        }
        Ok(())
    }

    /// An operator retry as the store runs it: refused while something the
    /// entity depends on is failed or cancelled; otherwise the entity is
    /// retried and told at once of what is ready by now.
    fn retry(&mut self, sel: u8) -> TestResult {
        let Some(k) = self.pick(sel, |e| e.state.status == EntityStatus::Failed) else {
            return Ok(());
        };
        let deps = self.entities[k]
            .as_ref()
            .expect("picked")
            .state
            .deps
            .clone();
        let unseen: BTreeSet<u128> = deps
            .iter()
            .filter(|d| d.status != EntityStatus::Ready)
            .map(|d| d.parent)
            .collect();
        let now: Vec<(u128, EntityStatus)> = unseen
            .into_iter()
            .map(|parent| {
                let status = self.entities[index(parent)]
                    .as_ref()
                    .map_or(EntityStatus::Failed, |p| p.state.status);
                (parent, status)
            })
            .collect();
        if now
            .iter()
            .any(|(_, s)| matches!(s, EntityStatus::Failed | EntityStatus::Cancelled))
        {
            self.log.push(format!("#{k} retry refused: {now:?}"));
            return Ok(());
        }
        if self.apply(k, Input::Retry)?.is_err() {
            return Err(self.fail(format!("the retry of failed entity {k} was refused")));
        }
        for (parent, status) in now {
            if status == EntityStatus::Ready {
                self.apply(k, Input::DependencyReady { parent })?
                    .map_err(|r| self.fail(format!("a retried entity refused {r:?}")))?;
            }
        }
        Ok(())
    }

    fn run(&mut self, op: Op) -> TestResult {
        match op {
            Op::Submit => self.submit(),
            Op::Claim(sel) => self.claim(sel),
            Op::Finish(sel, fail) => self.finish(sel, fail),
            Op::Resolve(budget) => self.resolve(usize::from(budget)),
            Op::Crash => {
                self.log.push("resolver crash".into());
                self.reading = None;
                Ok(())
            }
            Op::Replay(sel) => self.replay(sel),
            Op::Cancel(sel) => self.cancel(sel),
            Op::Retry(sel) => self.retry(sel),
        }
    }

    /// Submits what is left, then lets every step end as `fail` says and
    /// the resolver catch up, until nothing more happens.
    fn drain(&mut self, fail: &mut dyn FnMut(usize) -> bool) -> TestResult {
        while self.submitted < self.specs.len() {
            self.submit()?;
        }
        for n in 0.. {
            if n > DRAIN_OPS_MAX {
                return Err(self.fail("the world did not settle".into()));
            }
            let has = |e: &Option<Entity>, status: StepStatus| {
                e.as_ref()
                    .is_some_and(|e| e.state.steps.iter().any(|s| s.status == status))
            };
            if self.entities.iter().any(|e| has(e, StepStatus::Queued)) {
                self.claim(0)?;
                continue;
            }
            // `finish(0, ..)` ends an attempt of the first entity running one.
            if let Some(k) = self
                .entities
                .iter()
                .position(|e| has(e, StepStatus::Running))
            {
                self.finish(0, fail(k))?;
                continue;
            }
            if self.cursor < self.outbox.len() {
                self.resolve(2)?;
                continue;
            }
            break;
        }
        Ok(())
    }

    /// What holds once nothing more happens.
    fn check_settled(&self) -> TestResult {
        for (k, e) in self.entities.iter().enumerate() {
            let Some(e) = e else {
                continue;
            };
            let s = &e.state;
            if !s.status.is_terminal() || s.has_live_steps() {
                return Err(self.fail(format!("entity {k} is stuck: {s:?}")));
            }
            if s.is_waiting() {
                return Err(self.fail(format!("entity {k} still waits: {s:?}")));
            }
            for d in &s.deps {
                if matches!(d.status, EntityStatus::Failed | EntityStatus::Cancelled) {
                    let p = index(d.parent);
                    if !self.outbox.contains(&(p, d.status)) {
                        return Err(self.fail(format!(
                            "entity {k} failed by entity {p}, which never was {:?}",
                            d.status
                        )));
                    }
                    if s.status != EntityStatus::Failed {
                        return Err(self.fail(format!("entity {k} outlived a failed dependency")));
                    }
                }
            }
            if s.status == EntityStatus::Ready {
                for d in &s.deps {
                    let p = index(d.parent);
                    let parent = self.entities[p].as_ref().map(|p| p.state.status);
                    if parent != Some(EntityStatus::Ready) {
                        return Err(
                            self.fail(format!("entity {k} is ready but entity {p} is {parent:?}"))
                        );
                    }
                }
            }
        }
        for p in 0..self.entities.len() {
            if !self.waiting_on(p).is_empty() {
                return Err(self.fail(format!("entity {p} still has waiting dependents")));
            }
        }
        if self.cursor != self.outbox.len() || self.reading.is_some() {
            return Err(self.fail("the resolver did not catch up".into()));
        }
        Ok(())
    }
}

proptest! {
    #![proptest_config(config(512))]

    /// Random parent outcomes, resolver crashes, replays, cancels and
    /// retries never leave a dependent stuck or started early.
    #[test]
    fn no_dependent_is_left_stuck_or_started_early(
        specs in world(),
        ops in prop::collection::vec(op(), 0..=120),
        failures in any::<u64>(),
    ) {
        let mut w = World::new(specs);
        for op in ops {
            w.run(op)?;
        }
        // Then the world runs by itself; some steps still fail for good.
        let mut bits = failures;
        w.drain(&mut |_| {
            bits = bits.rotate_left(7) ^ 0x9e37_79b9_7f4a_7c15;
            bits % 11 == 0
        })?;
        w.check_settled()?;
    }

    /// Where every step succeeds, every entity ends ready, each after all
    /// of those it depends on.
    #[test]
    fn without_failures_every_dependent_ends_ready(
        specs in world(),
        ops in prop::collection::vec(
            prop_oneof![
                4 => Just(Op::Submit),
                4 => any::<u8>().prop_map(Op::Claim),
                4 => any::<u8>().prop_map(|e| Op::Finish(e, false)),
                4 => (1u8..=3).prop_map(Op::Resolve),
                1 => Just(Op::Crash),
                2 => any::<u8>().prop_map(Op::Replay),
            ],
            0..=80,
        ),
    ) {
        let mut w = World::new(specs);
        for op in ops {
            w.run(op)?;
        }
        w.drain(&mut |_| false)?;
        w.check_settled()?;
        prop_assert!(w.refused.is_empty(), "nothing failed, so nothing is refused");
        for (k, e) in w.entities.iter().enumerate() {
            let e = e.as_ref().expect("every entity was created");
            prop_assert_eq!(e.state.status, EntityStatus::Ready, "entity {}", k);
        }
    }
}

/// A long chain, submitted before anything runs, settles in order, one link
/// after the other.
#[test]
fn a_chain_settles_in_order() -> TestResult {
    let n = 200;
    let mut w = World::new(chain(n));
    w.drain(&mut |_| false)?;
    w.check_settled()?;
    let ready: Vec<u64> = w
        .entities
        .iter()
        .map(|e| e.as_ref().and_then(|e| e.ready_at).expect("ready"))
        .collect();
    prop_assert!(ready.windows(2).all(|p| p[0] < p[1]), "in chain order");
    Ok(())
}

/// A failure at the head of a chain fails every link after it with
/// `dependency_failed`, and a retry of the head, once ready, revives none.
#[test]
fn a_failure_cascades_and_a_parent_retry_revives_nothing() -> TestResult {
    let n = 20;
    let mut w = World::new(chain(n));
    w.drain(&mut |k| k == 0)?;
    w.check_settled()?;
    for k in 1..n {
        let e = w.entities[k].as_ref().expect("created");
        prop_assert_eq!(e.state.status, EntityStatus::Failed);
        prop_assert_eq!(
            e.state.deps[0].status,
            EntityStatus::Failed,
            "entity {} failed by its dependency",
            k
        );
        prop_assert!(e.started_at.is_none(), "entity {} never started", k);
    }
    // The operator retries the head, which now succeeds.
    w.retry(0)?;
    w.drain(&mut |_| false)?;
    w.check_settled()?;
    prop_assert_eq!(
        w.entities[0].as_ref().map(|e| e.state.status),
        Some(EntityStatus::Ready)
    );
    for k in 1..n {
        prop_assert_eq!(
            w.entities[k].as_ref().map(|e| e.state.status),
            Some(EntityStatus::Failed),
            "entity {} stays failed",
            k
        );
    }
    // Retrying the next link re-checks its reference: it runs now.
    let sel = 0; // the first failed entity is link 1
    w.retry(sel)?;
    w.drain(&mut |_| false)?;
    prop_assert_eq!(
        w.entities[1].as_ref().map(|e| e.state.status),
        Some(EntityStatus::Ready)
    );
    prop_assert_eq!(
        w.entities[2].as_ref().map(|e| e.state.status),
        Some(EntityStatus::Failed),
        "only the retried link runs"
    );
    Ok(())
}
