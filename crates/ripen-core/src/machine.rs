//! The entity state machine: `(state, input, ctx) -> (state', events)`.
//!
//! Architecture invariant: this module does no I/O and reads no clock. The
//! time and the jitter sample come in through [`Ctx`]; the caller persists the
//! new state together with the returned events in one transaction, and only
//! then acts on it.

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
    Retry,
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
/// events say how; on `Err` nothing changed.
pub fn apply(
    pipeline: &Pipeline,
    state: &mut EntityState,
    input: Input,
    ctx: Ctx,
) -> Result<Vec<Event>, Refusal> {
    debug_assert_eq!(pipeline.len(), state.steps.len());
    let mut events = Vec::new();
    match input {
        Input::Claim { step } => {
            let spec = pipeline.steps().get(step).ok_or(Refusal::NoSuchStep)?;
            let s = &mut state.steps[step];
            let runnable = match s.status {
                StepStatus::Queued => true,
                StepStatus::Retrying => s.due_at_us.is_some_and(|due| due <= ctx.now_us),
                _ => false,
            };
            if !runnable || matches!(state.status, EntityStatus::Failed | EntityStatus::Cancelled) {
                return Err(Refusal::NotRunnable);
            }
            let lease_ms = spec.timeout_ms.saturating_add(ctx.lease_grace_ms);
            let lease_expires_at_us = ctx
                .now_us
                .saturating_add(i64::try_from(lease_ms.saturating_mul(1_000)).unwrap_or(i64::MAX));
            s.status = StepStatus::Running;
            s.attempts += 1;
            s.epoch += 1;
            s.due_at_us = Some(lease_expires_at_us);
            events.push(Event::StepStarted {
                step,
                attempt: s.attempts,
                epoch: s.epoch,
                lease_expires_at_us,
            });
        }
        Input::Succeeded { step, epoch } => {
            check_live_attempt(state, step, epoch)?;
            let s = &mut state.steps[step];
            s.status = StepStatus::Succeeded;
            s.due_at_us = None;
            s.last_error = None;
            events.push(Event::StepSucceeded {
                step,
                attempt: s.attempts,
            });
            for &d in pipeline.dependents(step) {
                let unblocked = state.steps[d].status == StepStatus::Blocked
                    && pipeline
                        .step(d)
                        .needs
                        .iter()
                        .all(|&n| state.steps[n].status == StepStatus::Succeeded);
                if unblocked {
                    state.steps[d].status = StepStatus::Queued;
                    state.steps[d].due_at_us = Some(ctx.now_us);
                }
            }
            settle(pipeline, state, ctx, &mut events);
        }
        Input::Failed {
            step,
            epoch,
            error,
            retryable,
            retry_after_ms,
        } => {
            check_live_attempt(state, step, epoch)?;
            fail_attempt(
                pipeline,
                state,
                step,
                cut(error),
                retryable,
                retry_after_ms,
                ctx,
                &mut events,
            );
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
            fail_attempt(
                pipeline,
                state,
                step,
                error.to_owned(),
                true,
                None,
                ctx,
                &mut events,
            );
        }
        Input::Cancel => {
            if state.status != EntityStatus::Pending {
                return Err(Refusal::WrongStatus(state.status));
            }
            change_status(state, EntityStatus::Cancelled, &mut events);
            skip_all_live(state, &mut events);
        }
        Input::Retry => {
            if state.status != EntityStatus::Failed {
                return Err(Refusal::WrongStatus(state.status));
            }
            change_status(state, EntityStatus::Pending, &mut events);
            state.degraded = false;
            for (i, spec) in pipeline.steps().iter().enumerate() {
                let s = &state.steps[i];
                if !matches!(s.status, StepStatus::Failed | StepStatus::Skipped) {
                    continue;
                }
                let ready = spec
                    .needs
                    .iter()
                    .all(|&n| state.steps[n].status == StepStatus::Succeeded);
                let s = &mut state.steps[i];
                s.attempts = 0;
                if ready {
                    s.status = StepStatus::Queued;
                    s.due_at_us = Some(ctx.now_us);
                } else {
                    s.status = StepStatus::Blocked;
                    s.due_at_us = None;
                }
                events.push(Event::StepRequeued { step: i });
            }
            // A failed entity keeps no live steps, so everything re-queued
            // above is either runnable or waits on something re-queued too.
            settle(pipeline, state, ctx, &mut events);
        }
    }
    Ok(events)
}

fn check_live_attempt(state: &EntityState, step: usize, epoch: u64) -> Result<(), Refusal> {
    let s = state.steps.get(step).ok_or(Refusal::NoSuchStep)?;
    if s.status != StepStatus::Running || s.epoch != epoch {
        return Err(Refusal::Stale);
    }
    Ok(())
}

#[allow(clippy::too_many_arguments)]
fn fail_attempt(
    pipeline: &Pipeline,
    state: &mut EntityState,
    step: usize,
    error: String,
    retryable: bool,
    retry_after_ms: Option<u64>,
    ctx: Ctx,
    events: &mut Vec<Event>,
) {
    let spec = pipeline.step(step);
    let s = &mut state.steps[step];
    events.push(Event::AttemptFailed {
        step,
        attempt: s.attempts,
        error: error.clone(),
        retryable,
    });
    s.last_error = Some(error);
    if retryable && s.attempts < spec.retry.max_attempts {
        let delay_ms = backoff_ms(&spec.retry, s.attempts, ctx.jitter, retry_after_ms);
        let due_at_us = ctx
            .now_us
            .saturating_add(i64::try_from(delay_ms.saturating_mul(1_000)).unwrap_or(i64::MAX));
        s.status = StepStatus::Retrying;
        s.due_at_us = Some(due_at_us);
        events.push(Event::RetryScheduled {
            step,
            next_attempt: s.attempts + 1,
            due_at_us,
        });
        return;
    }
    s.status = StepStatus::Failed;
    s.due_at_us = None;
    events.push(Event::StepFailed {
        step,
        attempts: s.attempts,
    });
    if spec.critical {
        if state.status == EntityStatus::Pending {
            change_status(state, EntityStatus::Failed, events);
        }
        skip_all_live(state, events);
    } else {
        state.degraded = true;
        skip_dependents(pipeline, state, step, events);
    }
}

/// Skips every step that transitively needs `step`.
fn skip_dependents(
    pipeline: &Pipeline,
    state: &mut EntityState,
    step: usize,
    events: &mut Vec<Event>,
) {
    let mut stack = pipeline.dependents(step).to_vec();
    while let Some(d) = stack.pop() {
        let s = &mut state.steps[d];
        if s.status.is_terminal() {
            continue;
        }
        s.status = StepStatus::Skipped;
        s.due_at_us = None;
        events.push(Event::StepSkipped { step: d });
        stack.extend_from_slice(pipeline.dependents(d));
    }
}

/// Skips every step that has not finished. A running attempt's result will
/// then be refused as stale.
fn skip_all_live(state: &mut EntityState, events: &mut Vec<Event>) {
    for (i, s) in state.steps.iter_mut().enumerate() {
        if !s.status.is_terminal() {
            s.status = StepStatus::Skipped;
            s.due_at_us = None;
            events.push(Event::StepSkipped { step: i });
        }
    }
}

/// Marks a pending entity ready once every critical step has succeeded.
fn settle(pipeline: &Pipeline, state: &mut EntityState, ctx: Ctx, events: &mut Vec<Event>) {
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
        change_status(state, EntityStatus::Ready, events);
    }
}

fn change_status(state: &mut EntityState, to: EntityStatus, events: &mut Vec<Event>) {
    let from = state.status;
    assert!(from.may_become(to), "illegal transition {from:?} -> {to:?}");
    state.status = to;
    events.push(Event::StatusChanged { from, to });
}
