//! The entity state machine: `(state, input, ctx) -> (state', events, actions)`.
//!
//! Architecture invariant: this module does no I/O and reads no clock. The
//! time and the jitter sample come in through [`Ctx`]; the caller persists the
//! new state together with the returned events in one transaction, and only
//! then performs the returned actions.

use serde::{Deserialize, Serialize};

use crate::pipeline::Pipeline;
use crate::retry::backoff_ms;
use crate::state::{EntityState, EntityStatus, StepStatus};
use crate::UnixMicros;

/// The longest error text kept for a step; longer texts are cut.
pub const ERROR_LEN_MAX: usize = 1_024;

/// What the caller knows about the world when it applies an input.
#[derive(Clone, Copy, Debug)]
pub struct Ctx {
    pub now_us: UnixMicros,
    /// A uniform sample in `[0, 1)` for backoff jitter.
    pub jitter: f64,
    /// How long a lease outlives the step's timeout, so that a slow but live
    /// attempt is not taken over.
    pub lease_grace_ms: u64,
}

/// Why an attempt ended without a result.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LostReason {
    /// The lease ran out; only valid once the lease has expired.
    LeaseExpired,
    /// The node that ran the attempt restarted. Valid at any time; used when
    /// the store knows that no live node can hold the lease.
    NodeRestarted,
}

#[derive(Clone, Debug, PartialEq)]
pub enum Input {
    /// Start an attempt of a queued step, or of a retrying one whose backoff elapsed.
    Claim {
        step: usize,
        /// Who takes the lease, if it says (a remote worker's id).
        holder: Option<String>,
    },
    /// The holder of a running attempt is alive: its lease is extended to
    /// the step's timeout (plus grace) from now. An expired lease is not
    /// revived.
    Heartbeat {
        step: usize,
        epoch: u64,
    },
    Succeeded {
        step: usize,
        epoch: u64,
    },
    Failed {
        step: usize,
        epoch: u64,
        error: String,
        retryable: bool,
        retry_after_ms: Option<u64>,
    },
    Lost {
        step: usize,
        epoch: u64,
        reason: LostReason,
    },
    /// Operator: stop a pending entity.
    Cancel,
    /// Operator: re-queue the failed and skipped steps of a failed entity.
    /// The entities it depends on that it has not seen ready are awaited
    /// again: until each is announced ready, its steps stay blocked.
    ///
    /// On an entity whose compensation failed (failed or cancelled), the
    /// compensation is retried instead; on one whose compensation is done,
    /// the whole pipeline runs again, every step from the start.
    Retry,
    /// An entity this one awaits became ready. The last one releases the
    /// steps whose needs are met.
    DependencyReady {
        parent: u128,
    },
    /// An entity this one awaits failed or was cancelled (`status`): this
    /// one fails too.
    DependencyFailed {
        parent: u128,
        status: EntityStatus,
    },
}

/// What the caller must do once the transition is durable.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    /// The step became runnable now: hand it to whoever consumes its queue
    /// ([`Pipeline::queue`]).
    Dispatch { step: usize },
    /// Look at the step again at `at_us`: its backoff ends or its lease runs
    /// out then.
    WakeAt { step: usize, at_us: UnixMicros },
    /// Tell subscribers about `events[event]`: the entity's status changed,
    /// it became degraded, or a compensation failed for good.
    Notify { event: usize },
}

/// What one accepted input did: the history events, in order, and the
/// actions they call for.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Transition {
    pub events: Vec<Event>,
    pub actions: Vec<Action>,
}

impl Transition {
    fn event(&mut self, event: Event) {
        if matches!(
            event,
            Event::StatusChanged { .. } | Event::Degraded { .. } | Event::CompensationFailed { .. }
        ) {
            self.actions.push(Action::Notify {
                event: self.events.len(),
            });
        }
        self.events.push(event);
    }

    fn act(&mut self, action: Action) {
        self.actions.push(action);
    }
}

/// A history event: what changed, in the order it changed.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Event {
    StatusChanged {
        from: EntityStatus,
        to: EntityStatus,
    },
    StepStarted {
        step: usize,
        attempt: u32,
        epoch: u64,
        lease_expires_at_us: UnixMicros,
        /// Who took the lease, if it said.
        holder: Option<String>,
    },
    StepSucceeded {
        step: usize,
        attempt: u32,
    },
    AttemptFailed {
        step: usize,
        attempt: u32,
        error: String,
        retryable: bool,
        /// Set when the attempt ended without a result, and why.
        lost: Option<LostReason>,
    },
    RetryScheduled {
        step: usize,
        next_attempt: u32,
        due_at_us: UnixMicros,
    },
    StepFailed {
        step: usize,
        attempts: u32,
    },
    StepSkipped {
        step: usize,
    },
    StepRequeued {
        step: usize,
    },
    /// A non-critical step failed for good: the entity carries
    /// `degraded: true` from now on (until an operator retry).
    Degraded {
        step: usize,
    },
    /// An awaited entity became ready.
    DependencyReady {
        parent: u128,
    },
    /// An awaited entity failed or was cancelled; the status change to
    /// `failed` follows.
    DependencyFailed {
        parent: u128,
        status: EntityStatus,
    },
    /// The entity failed for good or was cancelled with succeeded steps
    /// that declare a compensation (or an operator retried a failed
    /// compensation): their compensation steps run, in reverse dependency
    /// order.
    CompensationStarted,
    /// Every compensation that ran has succeeded.
    CompensationDone,
    /// A compensation step failed for good; the compensations that must
    /// come after it will not run until an operator retries.
    CompensationFailed {
        step: usize,
    },
}

/// Where an entity's compensation stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Compensation {
    Running,
    Done,
    Failed,
}

impl Compensation {
    pub fn as_str(self) -> &'static str {
        match self {
            Compensation::Running => "running",
            Compensation::Done => "done",
            Compensation::Failed => "failed",
        }
    }
}

/// Where the entity's compensation stands: `None` when none was asked for
/// (every compensation step is dormant).
pub fn compensation(pipeline: &Pipeline, state: &EntityState) -> Option<Compensation> {
    let mut started = false;
    let mut failed = false;
    for c in pipeline.compensations() {
        match state.steps[c].status {
            StepStatus::Dormant => {}
            StepStatus::Succeeded => started = true,
            StepStatus::Failed | StepStatus::Skipped => {
                started = true;
                failed = true;
            }
            _ => return Some(Compensation::Running),
        }
    }
    match (started, failed) {
        (false, _) => None,
        (true, true) => Some(Compensation::Failed),
        (true, false) => Some(Compensation::Done),
    }
}

/// Why an input was refused. A refused input leaves the state untouched.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("the attempt is stale: its lease epoch no longer holds")]
    Stale,
    #[error("the step is not runnable now")]
    NotRunnable,
    #[error("the lease has not expired yet")]
    LeaseLive,
    #[error("the entity is {0:?}, which does not allow this")]
    WrongStatus(EntityStatus),
    #[error("no such step")]
    NoSuchStep,
    #[error("the entity does not wait for that entity")]
    NotAwaited,
    #[error("a dependency fails only when its entity failed or was cancelled")]
    NotAFailure,
    #[error("the entity's compensation is still running")]
    Compensating,
}

fn cut(mut s: String) -> String {
    if s.len() > ERROR_LEN_MAX {
        let mut end = ERROR_LEN_MAX;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        s.truncate(end);
    }
    s
}

/// Applies one input to an entity. On `Ok` the state has moved and the
/// transition says how and what to do next; on `Err` nothing changed.
pub fn apply(
    pipeline: &Pipeline,
    state: &mut EntityState,
    input: Input,
    ctx: Ctx,
) -> Result<Transition, Refusal> {
    debug_assert_eq!(pipeline.len(), state.steps.len());
    let mut t = Transition::default();
    match input {
        Input::Claim { step, holder } => {
            let spec = pipeline.steps().get(step).ok_or(Refusal::NoSuchStep)?;
            let s = &state.steps[step];
            let runnable = match s.status {
                StepStatus::Queued => true,
                StepStatus::Retrying => s.due_at_us.is_some_and(|due| due <= ctx.now_us),
                _ => false,
            };
            // Only compensation steps run once the entity has stopped; they
            // are queued only then.
            let stopped = matches!(state.status, EntityStatus::Failed | EntityStatus::Cancelled)
                && spec.compensates.is_none();
            if !runnable || stopped || state.is_waiting() {
                return Err(Refusal::NotRunnable);
            }
            let lease_ms = spec.timeout_ms.saturating_add(ctx.lease_grace_ms);
            let lease_expires_at_us = after_ms(ctx.now_us, lease_ms);
            set_step(state, step, StepStatus::Running, Some(lease_expires_at_us));
            let s = &mut state.steps[step];
            s.attempts += 1;
            s.epoch += 1;
            s.holder = holder.clone();
            let (attempt, epoch) = (s.attempts, s.epoch);
            t.event(Event::StepStarted {
                step,
                attempt,
                epoch,
                lease_expires_at_us,
                holder,
            });
            t.act(Action::WakeAt {
                step,
                at_us: lease_expires_at_us,
            });
        }
        Input::Heartbeat { step, epoch } => {
            check_live_attempt(state, step, epoch)?;
            if state.steps[step]
                .due_at_us
                .is_some_and(|due| due <= ctx.now_us)
            {
                return Err(Refusal::Stale);
            }
            let spec = pipeline.step(step);
            let lease_ms = spec.timeout_ms.saturating_add(ctx.lease_grace_ms);
            let lease_expires_at_us = after_ms(ctx.now_us, lease_ms);
            // A heartbeat never shortens a lease.
            let at_us = state.steps[step]
                .due_at_us
                .map_or(lease_expires_at_us, |due| due.max(lease_expires_at_us));
            if state.steps[step].due_at_us != Some(at_us) {
                state.steps[step].due_at_us = Some(at_us);
                t.act(Action::WakeAt { step, at_us });
            }
        }
        Input::Succeeded { step, epoch } => {
            check_live_attempt(state, step, epoch)?;
            set_step(state, step, StepStatus::Succeeded, None);
            let s = &mut state.steps[step];
            s.last_error = None;
            let attempt = s.attempts;
            t.event(Event::StepSucceeded { step, attempt });
            if pipeline.step(step).compensates.is_some() {
                advance_compensation(pipeline, state, ctx, &mut t);
                return Ok(t);
            }
            for &d in pipeline.dependents(step) {
                let unblocked = state.steps[d].status == StepStatus::Blocked
                    && pipeline
                        .step(d)
                        .needs
                        .iter()
                        .all(|&n| state.steps[n].status == StepStatus::Succeeded);
                if unblocked {
                    set_step(state, d, StepStatus::Queued, Some(ctx.now_us));
                    t.act(Action::Dispatch { step: d });
                }
            }
            settle(pipeline, state, ctx, &mut t);
        }
        Input::Failed {
            step,
            epoch,
            error,
            retryable,
            retry_after_ms,
        } => {
            check_live_attempt(state, step, epoch)?;
            let failure = Failure {
                error: cut(error),
                retryable,
                retry_after_ms,
                lost: None,
            };
            fail_attempt(pipeline, state, step, failure, ctx, &mut t);
        }
        Input::Lost {
            step,
            epoch,
            reason,
        } => {
            check_live_attempt(state, step, epoch)?;
            let error = match reason {
                LostReason::LeaseExpired => {
                    let due = state.steps[step].due_at_us;
                    if due.is_some_and(|due| due > ctx.now_us) {
                        return Err(Refusal::LeaseLive);
                    }
                    "lease expired before the attempt reported a result"
                }
                LostReason::NodeRestarted => "the node running the attempt restarted",
            };
            // The attempt may have had its effect downstream: it counts, and is
            // retried like a timeout.
            let failure = Failure {
                error: error.to_owned(),
                retryable: true,
                retry_after_ms: None,
                lost: Some(reason),
            };
            fail_attempt(pipeline, state, step, failure, ctx, &mut t);
        }
        Input::Cancel => {
            if state.status != EntityStatus::Pending {
                return Err(Refusal::WrongStatus(state.status));
            }
            change_status(state, EntityStatus::Cancelled, &mut t);
            skip_all_live(state, &mut t);
            begin_compensation(pipeline, state, ctx, &mut t);
        }
        Input::Retry => {
            match compensation(pipeline, state) {
                Some(Compensation::Running) => return Err(Refusal::Compensating),
                Some(Compensation::Failed) => {
                    retry_compensation(pipeline, state, ctx, &mut t);
                    return Ok(t);
                }
                Some(Compensation::Done) | None => {}
            }
            if state.status != EntityStatus::Failed {
                return Err(Refusal::WrongStatus(state.status));
            }
            // Compensated steps were undone: they run again, and their
            // compensations wait for the next failure.
            let rerun = compensation(pipeline, state) == Some(Compensation::Done);
            if rerun {
                for c in pipeline.compensations() {
                    if state.steps[c].status != StepStatus::Dormant {
                        set_step(state, c, StepStatus::Dormant, None);
                        let s = &mut state.steps[c];
                        s.attempts = 0;
                        s.last_error = None;
                    }
                }
            }
            change_status(state, EntityStatus::Pending, &mut t);
            state.degraded = false;
            for d in &mut state.deps {
                if d.status != EntityStatus::Ready {
                    d.status = EntityStatus::Pending;
                }
            }
            let waiting = state.is_waiting();
            let forward = pipeline.forward_len();
            let again: Vec<bool> = state.steps[..forward]
                .iter()
                .map(|s| match s.status {
                    StepStatus::Failed | StepStatus::Skipped => true,
                    StepStatus::Succeeded => rerun,
                    _ => false,
                })
                .collect();
            for (i, spec) in pipeline.steps()[..forward].iter().enumerate() {
                if !again[i] {
                    continue;
                }
                let ready = !waiting
                    && spec
                        .needs
                        .iter()
                        .all(|&n| !again[n] && state.steps[n].status == StepStatus::Succeeded);
                state.steps[i].attempts = 0;
                if ready {
                    set_step(state, i, StepStatus::Queued, Some(ctx.now_us));
                } else {
                    set_step(state, i, StepStatus::Blocked, None);
                }
                t.event(Event::StepRequeued { step: i });
                if ready {
                    t.act(Action::Dispatch { step: i });
                }
            }
            // A failed entity keeps no live steps, so everything re-queued
            // above is either runnable, waits on something re-queued too, or
            // waits for the entities it depends on.
            settle(pipeline, state, ctx, &mut t);
        }
        Input::DependencyReady { parent } => {
            check_awaited(state, parent)?;
            for d in state.deps.iter_mut().filter(|d| d.parent == parent) {
                d.status = EntityStatus::Ready;
            }
            t.event(Event::DependencyReady { parent });
            if !state.is_waiting() {
                release(pipeline, state, ctx, &mut t);
            }
        }
        Input::DependencyFailed { parent, status } => {
            if !matches!(status, EntityStatus::Failed | EntityStatus::Cancelled) {
                return Err(Refusal::NotAFailure);
            }
            check_awaited(state, parent)?;
            for d in state.deps.iter_mut().filter(|d| d.parent == parent) {
                d.status = status;
            }
            t.event(Event::DependencyFailed { parent, status });
            change_status(state, EntityStatus::Failed, &mut t);
            skip_all_live(state, &mut t);
            begin_compensation(pipeline, state, ctx, &mut t);
        }
    }
    Ok(t)
}

/// Refuses a dependency input for an entity that does not await `parent`
/// (it is settled, it never depended on it, or it has seen it settle).
fn check_awaited(state: &EntityState, parent: u128) -> Result<(), Refusal> {
    if state.status != EntityStatus::Pending {
        return Err(Refusal::WrongStatus(state.status));
    }
    if !state.awaited().any(|p| p == parent) {
        return Err(Refusal::NotAwaited);
    }
    Ok(())
}

/// The last awaited entity is ready: every blocked step whose needs have
/// succeeded becomes runnable.
fn release(pipeline: &Pipeline, state: &mut EntityState, ctx: Ctx, t: &mut Transition) {
    for (i, spec) in pipeline.steps().iter().enumerate() {
        let unblocked = state.steps[i].status == StepStatus::Blocked
            && spec
                .needs
                .iter()
                .all(|&n| state.steps[n].status == StepStatus::Succeeded);
        if unblocked {
            set_step(state, i, StepStatus::Queued, Some(ctx.now_us));
            t.act(Action::Dispatch { step: i });
        }
    }
    settle(pipeline, state, ctx, t);
}

/// `now_us` plus `ms` milliseconds, saturating.
fn after_ms(now_us: UnixMicros, ms: u64) -> UnixMicros {
    now_us.saturating_add(i64::try_from(ms.saturating_mul(1_000)).unwrap_or(i64::MAX))
}

/// Moves a step along its lifecycle and sets its one timer.
fn set_step(state: &mut EntityState, step: usize, to: StepStatus, due_at_us: Option<UnixMicros>) {
    let s = &mut state.steps[step];
    assert!(
        s.status.may_become(to),
        "illegal step transition {:?} -> {to:?}",
        s.status
    );
    s.status = to;
    s.due_at_us = due_at_us;
    if to != StepStatus::Running {
        s.holder = None;
    }
}

fn check_live_attempt(state: &EntityState, step: usize, epoch: u64) -> Result<(), Refusal> {
    let s = state.steps.get(step).ok_or(Refusal::NoSuchStep)?;
    if s.status != StepStatus::Running || s.epoch != epoch {
        return Err(Refusal::Stale);
    }
    Ok(())
}

/// How an attempt ended without success.
struct Failure {
    error: String,
    retryable: bool,
    retry_after_ms: Option<u64>,
    lost: Option<LostReason>,
}

fn fail_attempt(
    pipeline: &Pipeline,
    state: &mut EntityState,
    step: usize,
    failure: Failure,
    ctx: Ctx,
    t: &mut Transition,
) {
    let spec = pipeline.step(step);
    let attempts = state.steps[step].attempts;
    t.event(Event::AttemptFailed {
        step,
        attempt: attempts,
        error: failure.error.clone(),
        retryable: failure.retryable,
        lost: failure.lost,
    });
    state.steps[step].last_error = Some(failure.error);
    if failure.retryable && attempts < spec.retry.max_attempts {
        let delay_ms = backoff_ms(&spec.retry, attempts, ctx.jitter, failure.retry_after_ms);
        let due_at_us = after_ms(ctx.now_us, delay_ms);
        set_step(state, step, StepStatus::Retrying, Some(due_at_us));
        t.event(Event::RetryScheduled {
            step,
            next_attempt: attempts + 1,
            due_at_us,
        });
        t.act(Action::WakeAt {
            step,
            at_us: due_at_us,
        });
        return;
    }
    set_step(state, step, StepStatus::Failed, None);
    t.event(Event::StepFailed { step, attempts });
    if let Some(undone) = spec.compensates {
        t.event(Event::CompensationFailed { step });
        // What had to wait for this compensation cannot run now.
        for s in pipeline.upstream(undone) {
            if let Some(c) = pipeline.compensation(s) {
                if state.steps[c].status == StepStatus::Blocked {
                    set_step(state, c, StepStatus::Skipped, None);
                    t.event(Event::StepSkipped { step: c });
                }
            }
        }
        return;
    }
    if spec.critical {
        let failing = state.status == EntityStatus::Pending;
        if failing {
            change_status(state, EntityStatus::Failed, t);
        }
        skip_all_live(state, t);
        if failing {
            begin_compensation(pipeline, state, ctx, t);
        }
    } else {
        if !state.degraded {
            state.degraded = true;
            t.event(Event::Degraded { step });
        }
        skip_dependents(pipeline, state, step, t);
    }
}

/// The entity has just failed for good or been cancelled: the compensation
/// of every step that had succeeded is asked for, and those with nothing to
/// wait for are queued.
fn begin_compensation(pipeline: &Pipeline, state: &mut EntityState, ctx: Ctx, t: &mut Transition) {
    let mut started = false;
    for s in 0..pipeline.forward_len() {
        if let Some(c) = pipeline.compensation(s) {
            if state.steps[s].status == StepStatus::Succeeded {
                set_step(state, c, StepStatus::Blocked, None);
                started = true;
            }
        }
    }
    if started {
        t.event(Event::CompensationStarted);
        advance_compensation(pipeline, state, ctx, t);
    }
}

/// An operator retried a failed compensation: its failed and skipped
/// compensation steps are asked for again.
fn retry_compensation(pipeline: &Pipeline, state: &mut EntityState, ctx: Ctx, t: &mut Transition) {
    t.event(Event::CompensationStarted);
    for c in pipeline.compensations() {
        if matches!(
            state.steps[c].status,
            StepStatus::Failed | StepStatus::Skipped
        ) {
            state.steps[c].attempts = 0;
            set_step(state, c, StepStatus::Blocked, None);
            t.event(Event::StepRequeued { step: c });
        }
    }
    advance_compensation(pipeline, state, ctx, t);
}

/// Queues each asked-for compensation whose turn has come: in reverse
/// dependency order, a step is undone once every step that needed it,
/// directly or not, is undone (or had nothing to undo). Says when the last
/// one is done.
fn advance_compensation(
    pipeline: &Pipeline,
    state: &mut EntityState,
    ctx: Ctx,
    t: &mut Transition,
) {
    for s in 0..pipeline.forward_len() {
        let Some(c) = pipeline.compensation(s) else {
            continue;
        };
        if state.steps[c].status != StepStatus::Blocked {
            continue;
        }
        let turn = pipeline.downstream(s).into_iter().all(|d| {
            pipeline.compensation(d).is_none_or(|cd| {
                matches!(
                    state.steps[cd].status,
                    StepStatus::Dormant | StepStatus::Succeeded
                )
            })
        });
        if turn {
            set_step(state, c, StepStatus::Queued, Some(ctx.now_us));
            t.act(Action::Dispatch { step: c });
        }
    }
    if compensation(pipeline, state) == Some(Compensation::Done) {
        t.event(Event::CompensationDone);
    }
}

/// Skips every step that transitively needs `step`.
fn skip_dependents(pipeline: &Pipeline, state: &mut EntityState, step: usize, t: &mut Transition) {
    let mut stack = pipeline.dependents(step).to_vec();
    while let Some(d) = stack.pop() {
        if state.steps[d].status.is_terminal() {
            continue;
        }
        set_step(state, d, StepStatus::Skipped, None);
        t.event(Event::StepSkipped { step: d });
        stack.extend_from_slice(pipeline.dependents(d));
    }
}

/// Skips every step that has not finished. A running attempt's result will
/// then be refused as stale.
fn skip_all_live(state: &mut EntityState, t: &mut Transition) {
    for i in 0..state.steps.len() {
        if !state.steps[i].status.is_terminal() {
            set_step(state, i, StepStatus::Skipped, None);
            t.event(Event::StepSkipped { step: i });
        }
    }
}

/// Marks a pending entity ready once every critical step has succeeded.
fn settle(pipeline: &Pipeline, state: &mut EntityState, ctx: Ctx, t: &mut Transition) {
    if state.status != EntityStatus::Pending {
        return;
    }
    let all_critical_done = pipeline
        .steps()
        .iter()
        .zip(&state.steps)
        .all(|(spec, s)| !spec.critical || s.status == StepStatus::Succeeded);
    if all_critical_done {
        state.ready_at_us = Some(ctx.now_us);
        change_status(state, EntityStatus::Ready, t);
    }
}

fn change_status(state: &mut EntityState, to: EntityStatus, t: &mut Transition) {
    let from = state.status;
    assert!(from.may_become(to), "illegal transition {from:?} -> {to:?}");
    state.status = to;
    t.event(Event::StatusChanged { from, to });
}
