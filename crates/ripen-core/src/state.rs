//! The state of one entity as the engine sees it: its status and one record
//! per step of its pipeline.

use serde::{Deserialize, Serialize};

use crate::pipeline::Pipeline;
use crate::UnixMicros;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EntityStatus {
    Pending,
    Ready,
    Failed,
    Cancelled,
}

impl EntityStatus {
    pub const ALL: [EntityStatus; 4] = [
        EntityStatus::Pending,
        EntityStatus::Ready,
        EntityStatus::Failed,
        EntityStatus::Cancelled,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            EntityStatus::Pending => "pending",
            EntityStatus::Ready => "ready",
            EntityStatus::Failed => "failed",
            EntityStatus::Cancelled => "cancelled",
        }
    }

    pub fn parse(s: &str) -> Option<EntityStatus> {
        EntityStatus::ALL.into_iter().find(|v| v.as_str() == s)
    }

    pub fn is_terminal(self) -> bool {
        self != EntityStatus::Pending
    }

    /// The entity lifecycle (docs/concepts.md): pending -> ready | failed |
    /// cancelled, and failed -> pending by an explicit retry.
    pub fn may_become(self, next: EntityStatus) -> bool {
        use EntityStatus::*;
        matches!(
            (self, next),
            (Pending, Ready) | (Pending, Failed) | (Pending, Cancelled) | (Failed, Pending)
        )
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StepStatus {
    /// Waiting for the steps it needs.
    Blocked,
    /// Runnable now.
    Queued,
    /// An attempt holds a lease.
    Running,
    /// Waiting out backoff before the next attempt.
    Retrying,
    Succeeded,
    Failed,
    Skipped,
    /// A compensation step that has not been asked to run: its entity has
    /// not failed or been cancelled after its step succeeded.
    Dormant,
}

impl StepStatus {
    pub const ALL: [StepStatus; 8] = [
        StepStatus::Blocked,
        StepStatus::Queued,
        StepStatus::Running,
        StepStatus::Retrying,
        StepStatus::Succeeded,
        StepStatus::Failed,
        StepStatus::Skipped,
        StepStatus::Dormant,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            StepStatus::Blocked => "blocked",
            StepStatus::Queued => "queued",
            StepStatus::Running => "running",
            StepStatus::Retrying => "retrying",
            StepStatus::Succeeded => "succeeded",
            StepStatus::Failed => "failed",
            StepStatus::Skipped => "skipped",
            StepStatus::Dormant => "dormant",
        }
    }

    pub fn parse(s: &str) -> Option<StepStatus> {
        StepStatus::ALL.into_iter().find(|v| v.as_str() == s)
    }

    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            StepStatus::Succeeded | StepStatus::Failed | StepStatus::Skipped | StepStatus::Dormant
        )
    }

    /// The step lifecycle: blocked -> queued when its needs succeeded;
    /// queued or retrying -> running by a claim; running -> succeeded,
    /// retrying or failed by a result (or a lost lease); any live status ->
    /// skipped when the step can no longer run; failed or skipped -> queued
    /// or blocked by an operator retry. A succeeded step changes only when
    /// an operator retry runs a compensated entity again. A compensation
    /// step leaves `dormant` when its entity compensates, and goes back to
    /// it when the entity runs again.
    pub fn may_become(self, next: StepStatus) -> bool {
        use StepStatus::*;
        matches!(
            (self, next),
            (Blocked, Queued)
                | (Queued, Running)
                | (Retrying, Running)
                | (Running, Succeeded)
                | (Running, Retrying)
                | (Running, Failed)
                | (Blocked | Queued | Running | Retrying, Skipped)
                | (Failed | Skipped, Queued | Blocked)
                | (Dormant, Blocked)
                | (Succeeded, Queued | Blocked | Dormant)
                | (Failed | Skipped, Dormant)
        )
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StepState {
    pub status: StepStatus,
    /// Attempts started so far (since the last operator retry).
    pub attempts: u32,
    /// The fencing token of the latest attempt; only a result carrying it counts.
    pub epoch: u64,
    /// When the scheduler must next look at this step: now for `queued`, the
    /// end of backoff for `retrying`, the lease expiry for `running`; `None`
    /// otherwise. One index over this column serves claims and timers alike.
    pub due_at_us: Option<UnixMicros>,
    pub last_error: Option<String>,
    /// Who holds the lease of the running attempt, when it says: the id a
    /// remote worker sent with its claim. `None` whenever the step is not
    /// running.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub holder: Option<String>,
}

impl StepState {
    fn new(status: StepStatus, now_us: UnixMicros) -> StepState {
        StepState {
            status,
            attempts: 0,
            epoch: 0,
            due_at_us: (status == StepStatus::Queued).then_some(now_us),
            last_error: None,
            holder: None,
        }
    }
}

/// An entity this one depends on (a reference of its type), as this entity
/// last saw it. `parent` is the other entity's id as the store names it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Dependency {
    pub parent: u128,
    /// `Pending` while it is awaited; `Ready` once it was; `Failed` or
    /// `Cancelled` when it settled so and failed this entity.
    pub status: EntityStatus,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct EntityState {
    pub status: EntityStatus,
    /// A non-critical step failed for good.
    pub degraded: bool,
    pub ready_at_us: Option<UnixMicros>,
    pub steps: Vec<StepState>,
    /// The entities this one depends on, in the order of its references.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub deps: Vec<Dependency>,
}

impl EntityState {
    /// A freshly submitted entity: steps without `needs` are queued, the rest blocked.
    pub fn new(pipeline: &Pipeline, now_us: UnixMicros) -> EntityState {
        let steps = pipeline
            .steps()
            .iter()
            .map(|s| {
                let status = if s.compensates.is_some() {
                    StepStatus::Dormant
                } else if s.needs.is_empty() {
                    StepStatus::Queued
                } else {
                    StepStatus::Blocked
                };
                StepState::new(status, now_us)
            })
            .collect();
        EntityState {
            status: EntityStatus::Pending,
            degraded: false,
            ready_at_us: None,
            steps,
            deps: Vec::new(),
        }
    }

    /// A freshly submitted entity that depends on `deps`. Every dependency
    /// not `Ready` is awaited (its status becomes `Pending`), and while one
    /// is, every step is blocked and nothing is due: the entity waits
    /// without a timer until the last one is ready.
    pub fn depending(
        pipeline: &Pipeline,
        now_us: UnixMicros,
        deps: Vec<Dependency>,
    ) -> EntityState {
        let mut state = EntityState::new(pipeline, now_us);
        state.deps = deps
            .into_iter()
            .map(|d| Dependency {
                parent: d.parent,
                status: if d.status == EntityStatus::Ready {
                    EntityStatus::Ready
                } else {
                    EntityStatus::Pending
                },
            })
            .collect();
        if state.is_waiting() {
            for s in state.steps[..pipeline.forward_len()].iter_mut() {
                s.status = StepStatus::Blocked;
                s.due_at_us = None;
            }
        }
        state
    }

    /// True while the entity is pending and some entity it depends on is not
    /// ready yet: none of its steps may start.
    pub fn is_waiting(&self) -> bool {
        self.status == EntityStatus::Pending
            && self.deps.iter().any(|d| d.status == EntityStatus::Pending)
    }

    /// The entities it waits for now (none unless it [is waiting](Self::is_waiting)).
    pub fn awaited(&self) -> impl Iterator<Item = u128> + '_ {
        let waiting = self.status == EntityStatus::Pending;
        self.deps
            .iter()
            .filter(move |d| waiting && d.status == EntityStatus::Pending)
            .map(|d| d.parent)
    }

    /// True while some step may still run: the engine has work for this entity.
    pub fn has_live_steps(&self) -> bool {
        self.steps.iter().any(|s| !s.status.is_terminal())
    }
}
