//! The pure core of Ripen.
//!
//! Everything the engine decides lives here: which steps of an entity may run,
//! what the result of an attempt does to the entity, when a retry is due and
//! what status the entity has. The core performs no I/O and reads no clock:
//! the caller passes the time and the jitter in, and persists and acts on what
//! comes back. Storage backends and the runtime are built around it.

pub mod machine;
pub mod pipeline;
pub mod retry;
pub mod state;

pub use machine::{
    apply, compensation, Action, Compensation, Ctx, Event, Input, LostReason, Refusal, Transition,
};
pub use pipeline::{
    Catalog, CompensationDef, Executor, Pipeline, PipelineError, RetryPolicy, StepDef, StepSpec,
    BUILTIN_QUEUE, COMPENSATE_SUFFIX, HTTP_QUEUE, SLOTS_MAX, STEPS_MAX,
};
pub use state::{Dependency, EntityState, EntityStatus, StepState, StepStatus};

/// A point in time as microseconds since the Unix epoch.
pub type UnixMicros = i64;
