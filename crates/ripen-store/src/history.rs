//! History events as stored and served: the core's events with step names
//! resolved, shared by every backend.

use ripen_core::{Event, Pipeline, UnixMicros};
use serde_json::{json, Value};

/// One entry of an entity's history.
#[derive(Clone, Debug, PartialEq)]
pub struct HistoryEvent {
    /// 1 for `created`, then one more per event of this entity.
    pub seq: u64,
    pub at_us: UnixMicros,
    pub kind: String,
    pub step: Option<String>,
    pub attempt: Option<u32>,
    /// Kind-specific fields (status change, error, retry time...).
    pub detail: Value,
}

impl HistoryEvent {
    /// Whether this event is a status change, a degradation or a
    /// compensation that failed for good, which also go to the outbox.
    pub fn is_notable(&self) -> bool {
        matches!(
            self.kind.as_str(),
            "created" | "status_changed" | "degraded" | "compensation_failed"
        )
    }
}

/// The first event of every entity.
pub fn created(at_us: UnixMicros) -> HistoryEvent {
    HistoryEvent {
        seq: 1,
        at_us,
        kind: "created".into(),
        step: None,
        attempt: None,
        detail: json!({"status": "pending"}),
    }
}

/// Turns core events into history rows numbered from `next_seq` on.
pub fn from_core(
    pipeline: &Pipeline,
    events: &[Event],
    at_us: UnixMicros,
    next_seq: u64,
) -> Vec<HistoryEvent> {
    let name = |i: usize| Some(pipeline.step(i).name.clone());
    events
        .iter()
        .enumerate()
        .map(|(k, e)| {
            let (kind, step, attempt, detail) = match e {
                // A failure caused by a dependency says so, for every reader
                // of the status change (history, streams, webhooks).
                Event::StatusChanged { from, to } => match k.checked_sub(1).map(|p| &events[p]) {
                    Some(Event::DependencyFailed { parent, status })
                        if *to == ripen_core::EntityStatus::Failed =>
                    {
                        (
                            "status_changed",
                            None,
                            None,
                            json!({
                                "from": from.as_str(),
                                "to": to.as_str(),
                                "cause": "dependency_failed",
                                "dependency": {"id": uuid::Uuid::from_u128(*parent).to_string(), "status": status.as_str()},
                            }),
                        )
                    }
                    _ => (
                        "status_changed",
                        None,
                        None,
                        json!({"from": from.as_str(), "to": to.as_str()}),
                    ),
                },
                Event::DependencyReady { parent } => (
                    "dependency_ready",
                    None,
                    None,
                    json!({"entity_id": uuid::Uuid::from_u128(*parent).to_string()}),
                ),
                Event::DependencyFailed { parent, status } => (
                    "dependency_failed",
                    None,
                    None,
                    json!({
                        "entity_id": uuid::Uuid::from_u128(*parent).to_string(),
                        "status": status.as_str(),
                    }),
                ),
                Event::StepStarted {
                    step,
                    attempt,
                    epoch,
                    lease_expires_at_us,
                    holder,
                } => (
                    "step_started",
                    name(*step),
                    Some(*attempt),
                    match holder {
                        None => json!({"epoch": epoch, "lease_expires_at_us": lease_expires_at_us}),
                        Some(worker) => json!({
                            "epoch": epoch,
                            "lease_expires_at_us": lease_expires_at_us,
                            "worker": worker,
                        }),
                    },
                ),
                Event::StepSucceeded { step, attempt } => {
                    ("step_succeeded", name(*step), Some(*attempt), json!({}))
                }
                Event::AttemptFailed {
                    step,
                    attempt,
                    error,
                    retryable,
                    lost,
                } => (
                    "attempt_failed",
                    name(*step),
                    Some(*attempt),
                    match lost {
                        None => json!({"error": error, "retryable": retryable}),
                        Some(reason) => {
                            json!({"error": error, "retryable": retryable, "lost": reason})
                        }
                    },
                ),
                Event::RetryScheduled {
                    step,
                    next_attempt,
                    due_at_us,
                } => (
                    "retry_scheduled",
                    name(*step),
                    Some(*next_attempt),
                    json!({"due_at_us": due_at_us}),
                ),
                Event::StepFailed { step, attempts } => {
                    ("step_failed", name(*step), Some(*attempts), json!({}))
                }
                Event::StepSkipped { step } => ("step_skipped", name(*step), None, json!({})),
                Event::StepRequeued { step } => ("step_requeued", name(*step), None, json!({})),
                Event::Degraded { step } => (
                    "degraded",
                    None,
                    None,
                    json!({"degraded": true, "step": pipeline.step(*step).name}),
                ),
                Event::CompensationStarted => ("compensation_started", None, None, json!({})),
                Event::CompensationDone => ("compensation_done", None, None, json!({})),
                Event::CompensationFailed { step } => {
                    let undone = pipeline.step(*step).compensates.map(|s| pipeline.step(s));
                    (
                        "compensation_failed",
                        name(*step),
                        None,
                        json!({"undoes": undone.map(|s| s.name.as_str())}),
                    )
                }
            };
            HistoryEvent {
                seq: next_seq + k as u64,
                at_us,
                kind: kind.into(),
                step,
                attempt,
                detail,
            }
        })
        .collect()
}
