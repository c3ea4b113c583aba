//! Property tests of compensation: random pipelines whose steps may declare
//! a compensation, driven by random results, lost leases, cancels and
//! operator retries. Whatever happens:
//! - a compensation runs only for a step that succeeded, only once the
//!   entity failed for good or was cancelled, and only after the
//!   compensations of every step downstream of it succeeded;
//! - compensation never changes the entity's status;
//! - once the world stops failing, every asked-for compensation ends done,
//!   after operator retries if one had failed for good, and an operator
//!   retry of a compensated entity runs the whole pipeline again to ready.

use proptest::prelude::*;
use ripen_core::{
    apply, compensation, Compensation, CompensationDef, Ctx, EntityState, EntityStatus, Event,
    Executor, Input, LostReason, Pipeline, RetryPolicy, StepDef, StepStatus,
};

#[derive(Clone, Debug)]
struct RawStep {
    /// Which earlier steps it needs, as a bit set over them.
    needs: u8,
    critical: bool,
    compensate: bool,
    attempts: u32,
    undo_attempts: u32,
}

fn raw_step() -> impl Strategy<Value = RawStep> {
    (any::<u8>(), any::<bool>(), any::<bool>(), 1u32..3, 1u32..3).prop_map(
        |(needs, critical, compensate, attempts, undo_attempts)| RawStep {
            needs,
            critical,
            compensate,
            attempts,
            undo_attempts,
        },
    )
}

fn retry(max_attempts: u32) -> RetryPolicy {
    RetryPolicy {
        max_attempts,
        initial_backoff_ms: 10,
        max_backoff_ms: 40,
    }
}

/// A valid pipeline: the first step is critical, and a critical step needs
/// only critical steps.
fn build(raw: &[RawStep]) -> Pipeline {
    let mut defs: Vec<StepDef> = Vec::new();
    for (i, r) in raw.iter().enumerate() {
        let critical = i == 0 || r.critical;
        let needs = (0..i.min(8))
            .filter(|&j| r.needs & (1 << j) != 0)
            .filter(|&j| !critical || defs[j].critical)
            .map(|j| format!("s{j}"))
            .collect();
        defs.push(StepDef {
            name: format!("s{i}"),
            needs,
            critical,
            timeout_ms: 100,
            retry: retry(r.attempts),
            executor: Executor::Http {
                url: format!("http://127.0.0.1:1/s{i}"),
            },
            compensate: r.compensate.then(|| CompensationDef {
                executor: Executor::Worker {
                    queue: "undo".into(),
                },
                timeout_ms: 100,
                retry: retry(r.undo_attempts),
            }),
        });
    }
    Pipeline::new(defs).expect("a valid pipeline")
}

#[derive(Clone, Debug)]
enum Op {
    Claim(u8),
    Succeed(u8),
    Fail {
        step: u8,
        retryable: bool,
    },
    /// Every running lease has run out.
    Expire,
    Cancel,
    Retry,
    /// Time passes: backoffs end.
    Wait,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => any::<u8>().prop_map(Op::Claim),
        3 => any::<u8>().prop_map(Op::Succeed),
        3 => (any::<u8>(), any::<bool>()).prop_map(|(step, retryable)| Op::Fail { step, retryable }),
        1 => Just(Op::Expire),
        1 => Just(Op::Cancel),
        2 => Just(Op::Retry),
        2 => Just(Op::Wait),
    ]
}

struct World {
    pipeline: Pipeline,
    state: EntityState,
    now_us: i64,
}

impl World {
    fn ctx(&self) -> Ctx {
        Ctx {
            now_us: self.now_us,
            jitter: 0.5,
            lease_grace_ms: 0,
        }
    }

    fn pick(&self, sel: u8) -> usize {
        usize::from(sel) % self.pipeline.len()
    }

    /// Applies `input` and checks what every transition must respect.
    fn apply(&mut self, input: Input) -> Result<(), TestCaseError> {
        let before = self.state.clone();
        let claimed = match &input {
            Input::Claim { step, .. } => Some(*step),
            _ => None,
        };
        let ctx = self.ctx();
        let Ok(t) = apply(&self.pipeline, &mut self.state, input.clone(), ctx) else {
            prop_assert_eq!(&self.state, &before, "a refused input changes nothing");
            return Ok(());
        };
        let p = &self.pipeline;
        if let Some(step) = claimed {
            if let Some(undone) = p.step(step).compensates {
                prop_assert!(
                    matches!(
                        self.state.status,
                        EntityStatus::Failed | EntityStatus::Cancelled
                    ),
                    "a compensation runs only for a stopped entity"
                );
                prop_assert_eq!(
                    self.state.steps[undone].status,
                    StepStatus::Succeeded,
                    "a compensation runs only for a step that succeeded"
                );
                for d in p.downstream(undone) {
                    if let Some(cd) = p.compensation(d) {
                        prop_assert!(
                            matches!(
                                self.state.steps[cd].status,
                                StepStatus::Dormant | StepStatus::Succeeded
                            ),
                            "{} is undone after {}",
                            p.step(undone).name,
                            p.step(d).name
                        );
                    }
                }
            }
        }
        let by_compensation = match &input {
            Input::Claim { step, .. }
            | Input::Succeeded { step, .. }
            | Input::Failed { step, .. }
            | Input::Lost { step, .. } => p.step(*step).compensates.is_some(),
            _ => false,
        };
        for ev in &t.events {
            if let Event::StatusChanged { .. } = ev {
                prop_assert!(!by_compensation, "compensation changed the status: {ev:?}");
            }
            if let Event::CompensationFailed { step } = ev {
                prop_assert_eq!(self.state.steps[*step].status, StepStatus::Failed);
            }
        }
        self.check()
    }

    /// What holds in every state.
    fn check(&self) -> Result<(), TestCaseError> {
        let p = &self.pipeline;
        for s in 0..p.forward_len() {
            prop_assert!(
                self.state.steps[s].status != StepStatus::Dormant,
                "a step proper is never dormant"
            );
            let Some(c) = p.compensation(s) else { continue };
            let cs = self.state.steps[c].status;
            if cs == StepStatus::Dormant {
                continue;
            }
            prop_assert!(
                matches!(
                    self.state.status,
                    EntityStatus::Failed | EntityStatus::Cancelled
                ),
                "{} compensates while the entity is {:?}",
                p.step(c).name,
                self.state.status
            );
            prop_assert_eq!(
                self.state.steps[s].status,
                StepStatus::Succeeded,
                "only a succeeded step is compensated"
            );
        }
        Ok(())
    }

    fn run(&mut self, op: &Op) -> Result<(), TestCaseError> {
        match *op {
            Op::Claim(sel) => {
                let step = self.pick(sel);
                self.apply(Input::Claim { step, holder: None })
            }
            Op::Succeed(sel) => {
                let step = self.pick(sel);
                let epoch = self.state.steps[step].epoch;
                self.apply(Input::Succeeded { step, epoch })
            }
            Op::Fail { step, retryable } => {
                let step = self.pick(step);
                let epoch = self.state.steps[step].epoch;
                self.apply(Input::Failed {
                    step,
                    epoch,
                    error: "no".into(),
                    retryable,
                    retry_after_ms: None,
                })
            }
            Op::Expire => {
                self.now_us += 1_000_000;
                for step in 0..self.pipeline.len() {
                    if self.state.steps[step].status == StepStatus::Running {
                        let epoch = self.state.steps[step].epoch;
                        self.apply(Input::Lost {
                            step,
                            epoch,
                            reason: LostReason::LeaseExpired,
                        })?;
                    }
                }
                Ok(())
            }
            Op::Cancel => self.apply(Input::Cancel),
            Op::Retry => self.apply(Input::Retry),
            Op::Wait => {
                self.now_us += 100_000;
                Ok(())
            }
        }
    }

    /// Runs every runnable step to success until nothing is live.
    fn drive(&mut self) -> Result<(), TestCaseError> {
        for _ in 0..1_000 {
            let live: Vec<usize> = (0..self.pipeline.len())
                .filter(|&i| !self.state.steps[i].status.is_terminal())
                .collect();
            if live.is_empty() {
                return Ok(());
            }
            let mut moved = false;
            for step in live {
                let s = &self.state.steps[step];
                match s.status {
                    StepStatus::Running => {
                        let epoch = s.epoch;
                        self.apply(Input::Succeeded { step, epoch })?;
                        moved = true;
                    }
                    StepStatus::Queued => {
                        self.apply(Input::Claim { step, holder: None })?;
                        moved = true;
                    }
                    _ => {}
                }
            }
            if !moved {
                // Only backoffs and blocked steps are left: time passes.
                let due = self
                    .state
                    .steps
                    .iter()
                    .filter(|s| s.status == StepStatus::Retrying)
                    .filter_map(|s| s.due_at_us)
                    .min();
                let Some(due) = due else {
                    prop_assert!(
                        false,
                        "stuck: live steps but nothing can move: {:?}",
                        self.state
                    );
                    unreachable!();
                };
                self.now_us = self.now_us.max(due);
                for step in 0..self.pipeline.len() {
                    if self.state.steps[step].status == StepStatus::Retrying {
                        self.apply(Input::Claim { step, holder: None })?;
                    }
                }
            }
        }
        prop_assert!(false, "did not settle in 1,000 rounds");
        Ok(())
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn compensation_runs_in_reverse_order_and_always_finishes(
        raw in prop::collection::vec(raw_step(), 1..7),
        ops in prop::collection::vec(op(), 0..60),
    ) {
        let pipeline = build(&raw);
        let state = EntityState::new(&pipeline, 0);
        let mut w = World { pipeline, state, now_us: 0 };
        w.check()?;
        for op in &ops {
            w.run(op)?;
        }
        // The world heals: whatever is live runs to success.
        w.drive()?;
        // A compensation that failed for good is retried by an operator
        // until it is done; it never needs more than one retry per step.
        for _ in 0..w.pipeline.len() {
            if compensation(&w.pipeline, &w.state) != Some(Compensation::Failed) {
                break;
            }
            w.apply(Input::Retry)?;
            w.drive()?;
        }
        let status = w.state.status;
        let asked = compensation(&w.pipeline, &w.state);
        prop_assert!(asked.is_none() || asked == Some(Compensation::Done), "{:?}", asked);
        if asked == Some(Compensation::Done) {
            // Every succeeded step with a compensation was undone.
            for s in 0..w.pipeline.forward_len() {
                if let Some(c) = w.pipeline.compensation(s) {
                    if w.state.steps[s].status == StepStatus::Succeeded {
                        prop_assert_eq!(w.state.steps[c].status, StepStatus::Succeeded);
                    }
                }
            }
            if status == EntityStatus::Failed {
                // A retry of a compensated entity runs everything again.
                w.apply(Input::Retry)?;
                prop_assert_eq!(w.state.status, EntityStatus::Pending);
                prop_assert!(w
                    .pipeline
                    .compensations()
                    .all(|c| w.state.steps[c].status == StepStatus::Dormant));
                w.drive()?;
                prop_assert_eq!(w.state.status, EntityStatus::Ready);
            }
        }
    }
}

#[test]
fn a_failure_undoes_the_succeeded_steps_from_the_last_back() {
    // a -> b -> c, each with a compensation; c fails for good.
    let raw: Vec<RawStep> = (0..3)
        .map(|i| RawStep {
            needs: if i == 0 { 0 } else { 1 << (i - 1) },
            critical: true,
            compensate: true,
            attempts: 1,
            undo_attempts: 1,
        })
        .collect();
    let pipeline = build(&raw);
    let mut state = EntityState::new(&pipeline, 0);
    let ctx = Ctx {
        now_us: 0,
        jitter: 0.5,
        lease_grace_ms: 0,
    };
    let run = |state: &mut EntityState, step: usize, ok: bool| {
        apply(&pipeline, state, Input::Claim { step, holder: None }, ctx).expect("claim");
        let epoch = state.steps[step].epoch;
        let input = if ok {
            Input::Succeeded { step, epoch }
        } else {
            Input::Failed {
                step,
                epoch,
                error: "no".into(),
                retryable: false,
                retry_after_ms: None,
            }
        };
        apply(&pipeline, state, input, ctx).expect("result")
    };
    run(&mut state, 0, true);
    run(&mut state, 1, true);
    let t = run(&mut state, 2, false);
    assert_eq!(state.status, EntityStatus::Failed);
    assert!(t.events.contains(&Event::CompensationStarted));
    // b's compensation first (c never succeeded), then a's.
    let (ca, cb, cc) = (
        pipeline.compensation(0).unwrap(),
        pipeline.compensation(1).unwrap(),
        pipeline.compensation(2).unwrap(),
    );
    assert_eq!(state.steps[cc].status, StepStatus::Dormant);
    assert_eq!(state.steps[cb].status, StepStatus::Queued);
    assert_eq!(state.steps[ca].status, StepStatus::Blocked);
    assert_eq!(compensation(&pipeline, &state), Some(Compensation::Running));
    assert_eq!(
        apply(&pipeline, &mut state, Input::Retry, ctx),
        Err(ripen_core::Refusal::Compensating)
    );
    // b's compensation fails for good: a's is skipped, the whole is failed,
    // and subscribers are told.
    let t = run(&mut state, cb, false);
    assert!(t.events.contains(&Event::CompensationFailed { step: cb }));
    assert!(t
        .actions
        .iter()
        .any(|a| matches!(a, ripen_core::Action::Notify { .. })));
    assert_eq!(state.steps[ca].status, StepStatus::Skipped);
    assert_eq!(compensation(&pipeline, &state), Some(Compensation::Failed));
    // An operator retry runs the compensation again, in order.
    apply(&pipeline, &mut state, Input::Retry, ctx).expect("retry the compensation");
    assert_eq!(state.status, EntityStatus::Failed);
    assert_eq!(state.steps[cb].status, StepStatus::Queued);
    assert_eq!(state.steps[ca].status, StepStatus::Blocked);
    run(&mut state, cb, true);
    let t = run(&mut state, ca, true);
    assert!(t.events.contains(&Event::CompensationDone));
    assert_eq!(compensation(&pipeline, &state), Some(Compensation::Done));
    // Then a retry runs the whole pipeline from a.
    apply(&pipeline, &mut state, Input::Retry, ctx).expect("retry the entity");
    assert_eq!(state.status, EntityStatus::Pending);
    assert_eq!(state.steps[0].status, StepStatus::Queued);
    assert_eq!(state.steps[1].status, StepStatus::Blocked);
    assert_eq!(state.steps[2].status, StepStatus::Blocked);
    assert_eq!(compensation(&pipeline, &state), None);
}
