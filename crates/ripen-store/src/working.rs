//! The per-entity working set: every decision a store makes, once, for every
//! backend.
//!
//! A backend reads entities (under whatever lock it needs), hands them here
//! as [`Stored`], and gets back the rows to write. In between, this module
//! applies the core machine: what to claim next, when a lease counts as lost,
//! how a result becomes a core [`Input`], which running attempts a restart
//! lost, what an operator command does, how a state diff becomes history and
//! outbox rows, and how idempotency keys repeated within one batch resolve.
//! The backend keeps only its SQL, its transactions and the binding of the
//! rows this module produces.
//!
//! Architecture invariant: nothing here does I/O. Time comes in as `now_us`
//! and jitter through [`CtxSource`], so every decision is unit-tested without
//! a database.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::sync::Arc;

use ripen_core::{
    apply, Action, Catalog, Ctx, EntityState, EntityStatus, Event, Input, LostReason, Pipeline,
    Refusal, StepState, StepStatus, UnixMicros,
};

use crate::history::{self, HistoryEvent};
use crate::metrics::DecisionMetrics;
use crate::registry::{self, Pipelines, Unrunnable};
use crate::{
    Attempt, Claim, CommandOutcome, Completion, CompletionResult, EntityId, EntityRecord,
    Heartbeat, IntakeOutcome, NewEntity, Outcome, Result, StepRecord, StoreError,
};

/// A source of jitter samples in `[0, 1)` for backoff. Stores draw from it
/// whenever they apply an input, so that tests can pin the draws.
#[derive(Clone)]
pub struct Jitter(Arc<dyn Fn() -> f64 + Send + Sync>);

impl Jitter {
    /// A uniform draw: what every store uses unless told otherwise.
    pub fn random() -> Jitter {
        Jitter(Arc::new(fastrand::f64))
    }

    /// Always the same sample.
    pub fn fixed(sample: f64) -> Jitter {
        Jitter(Arc::new(move || sample))
    }

    pub fn sample(&self) -> f64 {
        (self.0)()
    }
}

impl Default for Jitter {
    fn default() -> Jitter {
        Jitter::random()
    }
}

impl std::fmt::Debug for Jitter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Jitter")
    }
}

/// Builds the [`Ctx`] of every input a store applies.
#[derive(Clone, Debug)]
pub struct CtxSource {
    pub lease_grace_ms: u64,
    pub jitter: Jitter,
}

impl CtxSource {
    pub fn new(lease_grace_ms: u64, jitter: Jitter) -> CtxSource {
        CtxSource {
            lease_grace_ms,
            jitter,
        }
    }

    pub fn ctx(&self, now_us: UnixMicros) -> Ctx {
        Ctx {
            now_us,
            jitter: self.jitter.sample(),
            lease_grace_ms: self.lease_grace_ms,
        }
    }
}

/// What a store decides with: the pipelines it knows, how it builds each
/// input's context, and its counters. Every backend holds one and calls
/// nothing else to decide.
#[derive(Debug)]
pub struct Decider {
    pipelines: Pipelines,
    ctxs: CtxSource,
    tally: Tally,
}

impl Decider {
    /// A decider on `pipelines`: a catalog of its own, or a handle shared
    /// with the engine, which replaces its pipelines as the registry grows.
    pub fn new(pipelines: impl Into<Pipelines>, lease_grace_ms: u64, jitter: Jitter) -> Decider {
        Decider {
            pipelines: pipelines.into(),
            ctxs: CtxSource::new(lease_grace_ms, jitter),
            tally: Tally::default(),
        }
    }

    /// The pipeline of a type version, for a new entity of it.
    pub fn pipeline(&self, type_name: &str, version: u32) -> Result<Arc<Pipeline>> {
        self.pipelines
            .get(type_name, version)
            .ok_or_else(|| StoreError::UnknownPipeline {
                type_name: type_name.to_owned(),
                version,
            })
    }

    /// Loads one stored entity into a working set.
    pub fn working<X>(&self, stored: Stored<X>) -> Result<Working<X>> {
        Working::new(&self.pipelines.known().catalog, stored)
    }

    /// Loads entities to schedule or to record results of. One whose
    /// pipeline this node cannot run (its version is unknown here, or its
    /// steps do not match it) is left alone and reported to the pipelines'
    /// owner ([`Pipelines::miss`]), so that it never holds back the others:
    /// the engine reads the registry again and fails it if it still cannot
    /// run ([`Decider::abandon`]).
    pub fn schedulable<X>(&self, stored: Vec<Stored<X>>) -> Result<Vec<Working<X>>> {
        let known = self.pipelines.known();
        let mut entities = Vec::with_capacity(stored.len());
        for s in stored {
            match registry::resolve(&known, &s.record) {
                Ok(_) => entities.push(Working::new(&known.catalog, s)?),
                Err(why) => self.pipelines.miss(&s.record, &why),
            }
        }
        Ok(entities)
    }

    /// Why `stored` cannot run on this node, if it cannot.
    pub fn unrunnable<X>(&self, stored: &Stored<X>) -> Option<Unrunnable> {
        registry::resolve(&self.pipelines.known(), &stored.record).err()
    }

    /// The rows that fail `stored` because its pipeline cannot run, and the
    /// entity as they leave it; `None` when it can run, or is not pending.
    pub fn abandon<X>(
        &self,
        stored: &Stored<X>,
        now_us: UnixMicros,
    ) -> Option<(EntityRecord, Rows)> {
        let why = self.unrunnable(stored)?;
        registry::abandon(stored, &why.to_string(), now_us)
    }

    /// See [`claim_due`].
    pub fn claim_due<X>(
        &self,
        entities: &mut [Working<X>],
        claim: &Claim<'_>,
        now_us: UnixMicros,
    ) -> usize {
        let claimed = claim_due(entities, claim, &self.ctxs, now_us);
        self.observe(entities);
        claimed
    }

    /// See [`heartbeat`].
    pub fn heartbeat<X>(
        &self,
        entities: &mut [Working<X>],
        beats: &[Heartbeat],
        now_us: UnixMicros,
    ) -> Vec<Option<UnixMicros>> {
        let leases = heartbeat(entities, beats, &self.ctxs, now_us);
        for (b, lease) in beats.iter().zip(&leases) {
            if lease.is_none() {
                self.tally.stale(b.entity_id, b.step, b.epoch);
            }
        }
        leases
    }

    /// Counts the decisions taken on `entities` since they were last
    /// counted: every decision method calls it before the rows are written.
    fn observe<X>(&self, entities: &mut [Working<X>]) {
        for w in entities.iter_mut() {
            let new = &w.events[w.observed..];
            if !new.is_empty() {
                self.tally
                    .metrics
                    .observe(&w.pipeline, &w.record, w.state.ready_at_us, new);
                log_notable(&w.pipeline, &w.record, new);
                w.observed = w.events.len();
            }
        }
    }

    /// The counters of this store's decisions.
    pub fn metrics(&self) -> &DecisionMetrics {
        &self.tally.metrics
    }

    /// See [`complete`].
    pub fn complete<X>(
        &self,
        entities: &mut [Working<X>],
        completions: &[Completion],
        claim_queue: Option<&str>,
        now_us: UnixMicros,
    ) -> Vec<CompletionResult> {
        let (ctxs, tally) = (&self.ctxs, &self.tally);
        let results = complete(entities, completions, claim_queue, ctxs, tally, now_us);
        self.observe(entities);
        results
    }

    /// Loses every running attempt of the entities: their node restarted.
    pub fn recover<X>(&self, entities: &mut [Working<X>], now_us: UnixMicros) -> u64 {
        let lost = entities
            .iter_mut()
            .map(|w| w.recover(&self.ctxs, now_us))
            .sum();
        self.observe(entities);
        lost
    }

    /// Applies an operator command; see [`Working::command`].
    pub fn command<X>(
        &self,
        w: &mut Working<X>,
        input: Input,
        now_us: UnixMicros,
    ) -> Result<Option<EntityStatus>> {
        // A pruned payload cannot feed the steps again: a retry the core
        // would take is refused for that; one it refuses anyway (a ready
        // entity, a running compensation) keeps its own reason.
        w.payload_pruned = matches!(input, Input::Retry)
            && w.record.payload_pruned_at_us.is_some()
            && w.would_take(input.clone(), &self.ctxs, now_us);
        if w.payload_pruned {
            return Ok(Some(w.state.status));
        }
        let refused = w.command(input, &self.ctxs, now_us)?;
        self.observe(std::slice::from_mut(w));
        Ok(refused)
    }

    pub fn stale_completions(&self) -> u64 {
        self.tally.stale_completions()
    }

    /// Applies one input that is neither a result nor an operator command
    /// (news of an entity it depends on), counting what it decided.
    pub fn apply_input<X>(
        &self,
        w: &mut Working<X>,
        input: Input,
        now_us: UnixMicros,
    ) -> Result<(), Refusal> {
        let result = w.apply(input, self.ctxs.ctx(now_us));
        self.observe(std::slice::from_mut(w));
        result
    }
}

/// Logs each status change and degradation of one entity at `info`, and
/// each lost attempt at `warn`.
fn log_notable(pipeline: &Pipeline, record: &EntityRecord, events: &[Event]) {
    for e in events {
        match e {
            Event::StatusChanged { from, to } => tracing::info!(
                entity_id = %record.id,
                r#type = %record.type_name,
                trace_id = %record.id.0.simple(),
                from = from.as_str(),
                to = to.as_str(),
                "entity status changed"
            ),
            Event::AttemptFailed {
                step,
                attempt,
                lost: Some(reason),
                ..
            } => tracing::warn!(
                entity_id = %record.id,
                r#type = %record.type_name,
                step = %pipeline.step(*step).name,
                attempt,
                trace_id = %record.id.0.simple(),
                reason = match reason {
                    LostReason::LeaseExpired => "lease_expired",
                    LostReason::NodeRestarted => "node_restarted",
                },
                "attempt lost: it reported no result before its lease ended"
            ),
            Event::Degraded { step } => tracing::info!(
                entity_id = %record.id,
                r#type = %record.type_name,
                trace_id = %record.id.0.simple(),
                step = %pipeline.step(*step).name,
                "entity degraded: a non-critical step failed for good"
            ),
            _ => {}
        }
    }
}

/// Counters every backend keeps the same way.
#[derive(Debug, Default)]
pub struct Tally {
    metrics: DecisionMetrics,
}

impl Tally {
    pub fn stale_completions(&self) -> u64 {
        self.metrics.stale_count()
    }

    fn stale(&self, entity: EntityId, step: usize, epoch: u64) {
        self.metrics.stale();
        let stale = self.metrics.stale_count();
        tracing::info!(
            entity = %entity,
            step,
            epoch,
            stale_completions = stale,
            "refused a stale completion"
        );
    }
}

/// The pipeline a stored entity was pinned to, checked against its steps.
pub fn pipeline_for(catalog: &Catalog, record: &EntityRecord) -> Result<Arc<Pipeline>> {
    let pipeline = catalog
        .get(&record.type_name, record.version)
        .cloned()
        .ok_or_else(|| StoreError::UnknownPipeline {
            type_name: record.type_name.clone(),
            version: record.version,
        })?;
    let matches = pipeline.len() == record.steps.len()
        && pipeline
            .steps()
            .iter()
            .zip(&record.steps)
            .all(|(spec, s)| spec.name == s.name);
    if !matches {
        return Err(StoreError::Internal(format!(
            "entity {}: its step rows do not match pipeline {} version {}",
            record.id, record.type_name, record.version
        )));
    }
    Ok(pipeline)
}

// ---------------------------------------------------------------------------
// Rows

/// An entity as a backend read it. `extra` is whatever the backend needs to
/// write it back (a payload row id, say).
#[derive(Clone, Debug)]
pub struct Stored<X = ()> {
    pub record: EntityRecord,
    /// The seq of the next history event.
    pub next_seq: u64,
    /// The stored output of each step, in step order.
    pub outputs: Vec<Option<String>>,
    pub extra: X,
}

impl<X> Stored<X> {
    /// `(step name, raw JSON)` of the succeeded steps that returned an
    /// output, in step order: what consumers and later steps see.
    pub fn succeeded_outputs(&self) -> Vec<(String, String)> {
        succeeded_outputs(&self.record.steps, &self.outputs)
    }
}

/// `(step name, raw JSON)` of the succeeded steps that returned an output.
fn succeeded_outputs(steps: &[StepRecord], outputs: &[Option<String>]) -> Vec<(String, String)> {
    steps
        .iter()
        .zip(outputs)
        .filter(|(s, _)| s.state.status == StepStatus::Succeeded)
        .filter_map(|(s, o)| o.as_ref().map(|o| (s.name.clone(), o.clone())))
        .collect()
}

/// A changed step.
#[derive(Clone, Debug, PartialEq)]
pub struct StepRow {
    pub entity_id: EntityId,
    pub idx: usize,
    pub state: StepState,
    /// `Some` when the step's output is to be written (with the step's
    /// result); `None` leaves the stored output as it is.
    pub output: Option<Option<String>>,
}

/// A changed entity.
#[derive(Clone, Debug, PartialEq)]
pub struct EntityRow {
    pub id: EntityId,
    pub status: EntityStatus,
    pub degraded: bool,
    pub ready_at_us: Option<UnixMicros>,
    pub updated_at_us: UnixMicros,
    pub next_seq: u64,
    /// The `deps` column (see [`crate::deps::encode`]).
    pub deps: Option<String>,
}

/// One history row, with its detail already encoded.
#[derive(Clone, Debug, PartialEq)]
pub struct EventRow {
    pub entity_id: EntityId,
    pub event: HistoryEvent,
    pub detail: String,
}

/// One outbox row: a notification subscribers must get.
#[derive(Clone, Debug, PartialEq)]
pub struct OutboxRow {
    pub entity_id: EntityId,
    pub seq: u64,
    pub at_us: UnixMicros,
    pub kind: String,
    pub body: String,
}

/// A change of an entity's earliest due time in one queue, for a backend
/// that indexes one due time per entity and queue.
#[derive(Clone, Debug, PartialEq)]
pub struct DueRow {
    pub entity_id: EntityId,
    pub queue: String,
    /// The earliest due time before the change, if any step was due.
    pub from: Option<UnixMicros>,
    /// The earliest due time after it.
    pub to: Option<UnixMicros>,
}

/// The earliest due time of the steps of each queue, in first-seen order.
pub fn due_by_queue<'a>(
    pipeline: &'a Pipeline,
    steps: impl Iterator<Item = &'a StepState>,
) -> Vec<(&'a str, UnixMicros)> {
    let mut due: Vec<(&str, UnixMicros)> = Vec::new();
    for (i, s) in steps.enumerate() {
        let Some(at) = s.due_at_us else {
            continue;
        };
        let queue = pipeline.queue(i);
        match due.iter_mut().find(|(q, _)| *q == queue) {
            Some((_, min)) => *min = (*min).min(at),
            None => due.push((queue, at)),
        }
    }
    due
}

/// The rows a batch of changes writes, gathered across entities so that a
/// backend writes each table with few statements.
#[derive(Debug, Default)]
pub struct Rows {
    pub steps: Vec<StepRow>,
    pub entities: Vec<EntityRow>,
    pub due: Vec<DueRow>,
    pub events: Vec<EventRow>,
    pub outbox: Vec<OutboxRow>,
    /// The queues in which some step became runnable, now or after a
    /// backoff: whoever consumes them (this node, other nodes sharing the
    /// store, remote workers waiting in a claim) should look.
    pub woken: Vec<String>,
    /// Rows of the `dependencies` index to insert: an entity began waiting
    /// for another one (an operator retry).
    pub waits_added: Vec<crate::deps::WaitRow>,
    /// Rows of the `dependencies` index to delete: an entity no longer
    /// waits for another one (it was told, or it settled).
    pub waits_removed: Vec<crate::deps::WaitRow>,
}

impl Rows {
    fn wake(&mut self, queue: &str) {
        if !self.woken.iter().any(|q| q == queue) {
            self.woken.push(queue.to_owned());
        }
    }
}

impl Rows {
    pub fn is_empty(&self) -> bool {
        self.steps.is_empty() && self.entities.is_empty() && self.events.is_empty()
    }

    /// The history row of a status change or degradation, and its outbox row.
    pub(crate) fn notable(&mut self, record: &EntityRecord, event: HistoryEvent, detail: String) {
        self.outbox.push(OutboxRow {
            entity_id: record.id,
            seq: event.seq,
            at_us: event.at_us,
            kind: event.kind.clone(),
            body: outbox_body(record, &event, &detail),
        });
        self.events.push(EventRow {
            entity_id: record.id,
            event,
            detail,
        });
    }
}

/// The JSON body of an outbox row, written out directly: the same object as
/// `{"entity_id", "tenant", "type", "version", "seq", "at_us", "kind",
/// "detail"}` serialised by serde_json (keys sorted), without building it.
pub fn outbox_body(record: &EntityRecord, e: &HistoryEvent, detail: &str) -> String {
    let subject = Subject {
        id: record.id,
        tenant: &record.tenant,
        type_name: &record.type_name,
        version: record.version,
    };
    notification_body(&subject, e.seq, e.at_us, &e.kind, detail)
}

/// The entity a notification is about.
#[derive(Clone, Copy, Debug)]
pub struct Subject<'a> {
    pub id: EntityId,
    pub tenant: &'a str,
    pub type_name: &'a str,
    pub version: u32,
}

/// The JSON body of a notification (see [`outbox_body`]), for a backend
/// whose outbox rows only point at their history event.
pub fn notification_body(
    subject: &Subject<'_>,
    seq: u64,
    at_us: UnixMicros,
    kind: &str,
    detail: &str,
) -> String {
    let mut body = String::with_capacity(160 + detail.len());
    let _ = write!(
        body,
        "{{\"at_us\":{at_us},\"detail\":{detail},\"entity_id\":\"{}\",\"kind\":{},\"seq\":{seq},\"tenant\":{},\"type\":{},\"version\":{}}}",
        subject.id,
        json_string(kind),
        json_string(subject.tenant),
        json_string(subject.type_name),
        subject.version,
    );
    body
}

fn json_string(s: &str) -> String {
    serde_json::Value::from(s).to_string()
}

// ---------------------------------------------------------------------------
// New entities

/// A new entity's rows, built before it reaches the backend's transaction:
/// its record (every step in its initial state), the queue of each step, its
/// `created` event and outbox row.
#[derive(Clone, Debug)]
pub struct NewRows {
    pub record: EntityRecord,
    /// The queue each step waits in when it is runnable.
    pub queues: Vec<String>,
    pub created: HistoryEvent,
    /// `created.detail` as JSON.
    pub detail: String,
    pub outbox_body: String,
    /// The seq of the event after `created`.
    pub next_seq: u64,
    /// The earliest due time of each queue with a runnable step.
    pub due: Vec<(String, UnixMicros)>,
    /// The `deps` column.
    pub deps: Option<String>,
    /// The rows of the `dependencies` index: the entities it waits for.
    pub waits: Vec<crate::deps::WaitRow>,
}

impl NewRows {
    pub fn new(pipeline: &Pipeline, e: &NewEntity, now_us: UnixMicros) -> NewRows {
        NewRows::depending(pipeline, e, now_us, Vec::new())
    }

    /// The rows of a new entity with dependencies, as
    /// [`crate::deps::check_references`] decided them: while one is not
    /// ready, every step is blocked.
    pub fn depending(
        pipeline: &Pipeline,
        e: &NewEntity,
        now_us: UnixMicros,
        deps: Vec<crate::deps::DependencyRecord>,
    ) -> NewRows {
        let state = if deps.is_empty() {
            EntityState::new(pipeline, now_us)
        } else {
            EntityState::depending(pipeline, now_us, crate::deps::core_deps(&deps))
        };
        let mut deps = deps;
        for (d, core) in deps.iter_mut().zip(&state.deps) {
            d.status = core.status;
        }
        let waits = crate::deps::awaited_by(state.status, &deps)
            .into_iter()
            .map(|parent| crate::deps::WaitRow {
                parent,
                dependent: e.id,
            })
            .collect();
        let record = EntityRecord {
            id: e.id,
            tenant: e.tenant.clone(),
            type_name: e.type_name.clone(),
            version: e.version,
            status: state.status,
            degraded: state.degraded,
            created_at_us: now_us,
            updated_at_us: now_us,
            ready_at_us: state.ready_at_us,
            payload_pruned_at_us: None,
            steps: pipeline
                .steps()
                .iter()
                .zip(state.steps)
                .map(|(spec, state)| StepRecord {
                    name: spec.name.clone(),
                    critical: spec.critical,
                    state,
                })
                .collect(),
            deps,
        };
        let created = history::created(now_us);
        let detail = created.detail.to_string();
        let outbox_body = outbox_body(&record, &created, &detail);
        let queues = (0..pipeline.len())
            .map(|i| pipeline.queue(i).to_owned())
            .collect();
        let next_seq = created.seq + 1;
        let due = due_by_queue(pipeline, record.steps.iter().map(|s| &s.state))
            .into_iter()
            .map(|(q, at)| (q.to_owned(), at))
            .collect();
        NewRows {
            due,
            deps: crate::deps::encode(&record.deps),
            waits,
            record,
            queues,
            created,
            detail,
            outbox_body,
            next_seq,
        }
    }
}

/// For each submission of a batch, the earlier submission of the same batch
/// that holds the same idempotency key (scoped by tenant and type), if any.
/// Such a repeat behaves as if it came after the earlier one committed.
pub fn repeated_keys(entities: &[&NewEntity]) -> Vec<Option<usize>> {
    let mut first: HashMap<(&str, &str, &str), usize> = HashMap::new();
    entities
        .iter()
        .enumerate()
        .map(|(i, e)| {
            let key = e.idempotency_key.as_deref()?;
            let scoped = (e.tenant.as_str(), e.type_name.as_str(), key);
            match first.get(&scoped) {
                Some(&j) => Some(j),
                None => {
                    first.insert(scoped, i);
                    None
                }
            }
        })
        .collect()
}

/// The answer to a submission whose key already names `existing`: a replay
/// when the body is byte-for-byte the same, else a reuse of the key.
///
/// A key whose entity's payload was pruned cannot show the body is the
/// same: it answers as a reused key.
pub fn replay(
    existing: &EntityRecord,
    existing_payload: Option<&str>,
    entity: &NewEntity,
) -> IntakeOutcome {
    if existing_payload == Some(entity.payload.as_str()) {
        IntakeOutcome::Replayed(existing.clone())
    } else {
        IntakeOutcome::KeyReused {
            entity_id: existing.id,
        }
    }
}

// ---------------------------------------------------------------------------
// The working entity

/// One loaded entity: the state the core works on, and what is needed to
/// write its changes back.
#[derive(Debug)]
pub struct Working<X = ()> {
    /// The entity as last written.
    record: EntityRecord,
    next_seq: u64,
    /// Each step's output as written.
    outputs: Vec<Option<String>>,
    pub extra: X,
    pipeline: Arc<Pipeline>,
    /// The working state; differs from `record` until `flush`.
    state: EntityState,
    /// Core events not yet written, and which of them subscribers must hear of.
    events: Vec<Event>,
    notify: Vec<usize>,
    /// Steps the core made runnable since the last claim pass.
    dispatched: Vec<usize>,
    /// Outputs of steps that succeeded since the last flush.
    new_outputs: Vec<(usize, Option<String>)>,
    /// Steps claimed since the last `take_attempts`.
    claimed: Vec<usize>,
    /// How many of `events` the metrics have counted.
    observed: usize,
    /// The state changed without history since the last flush (a lease
    /// moved by a heartbeat).
    touched: bool,
    /// The last operator command was refused because the entity's
    /// compensation is still running.
    compensating: bool,
    /// The last operator command was a retry refused because the raw
    /// payload was pruned.
    payload_pruned: bool,
}

impl<X> Working<X> {
    pub fn new(catalog: &Catalog, stored: Stored<X>) -> Result<Working<X>> {
        let pipeline = pipeline_for(catalog, &stored.record)?;
        if stored.outputs.len() != stored.record.steps.len() {
            return Err(StoreError::Internal(format!(
                "entity {}: {} outputs for {} steps",
                stored.record.id,
                stored.outputs.len(),
                stored.record.steps.len()
            )));
        }
        Ok(Working {
            state: stored.record.state(),
            record: stored.record,
            next_seq: stored.next_seq,
            outputs: stored.outputs,
            extra: stored.extra,
            pipeline,
            events: Vec::new(),
            notify: Vec::new(),
            dispatched: Vec::new(),
            new_outputs: Vec::new(),
            claimed: Vec::new(),
            observed: 0,
            touched: false,
            compensating: false,
            payload_pruned: false,
        })
    }

    pub fn id(&self) -> EntityId {
        self.record.id
    }

    /// The entity as last flushed.
    pub fn record(&self) -> &EntityRecord {
        &self.record
    }

    pub fn into_record(self) -> EntityRecord {
        self.record
    }

    /// Where the entity's compensation stands (see
    /// [`ripen_core::compensation`]).
    pub fn compensation(&self) -> Option<ripen_core::Compensation> {
        ripen_core::compensation(&self.pipeline, &self.state)
    }

    pub fn state(&self) -> &EntityState {
        &self.state
    }

    /// Each step's output as last flushed.
    pub fn outputs(&self) -> &[Option<String>] {
        &self.outputs
    }

    /// Whether something changed since the last flush.
    pub fn is_dirty(&self) -> bool {
        !self.events.is_empty() || self.touched
    }

    fn apply(&mut self, input: Input, ctx: Ctx) -> Result<(), Refusal> {
        let claim = match input {
            Input::Claim { step, .. } => Some(step),
            _ => None,
        };
        let t = apply(&self.pipeline, &mut self.state, input, ctx)?;
        let base = self.events.len();
        for action in t.actions {
            match action {
                Action::Dispatch { step } => self.dispatched.push(step),
                Action::Notify { event } => self.notify.push(base + event),
                // The step's timer is its `due_at`, which the backend
                // indexes; a timer moved without an event must be written.
                Action::WakeAt { .. } => self.touched |= t.events.is_empty(),
            }
        }
        self.events.extend(t.events);
        if let Some(step) = claim {
            self.claimed.push(step);
        }
        Ok(())
    }

    /// The steps of `queue` due by `now_us`, with their due times.
    pub fn due_steps<'a>(
        &'a self,
        queue: &'a str,
        now_us: UnixMicros,
    ) -> impl Iterator<Item = (UnixMicros, usize)> + 'a {
        self.state
            .steps
            .iter()
            .enumerate()
            .filter(move |(i, _)| self.pipeline.queue(*i) == queue)
            .filter_map(move |(i, s)| s.due_at_us.filter(|&at| at <= now_us).map(|at| (at, i)))
    }

    /// Claims a due step. A running step is due when its lease ran out: that
    /// attempt is lost first, and the step claimed again if its backoff
    /// allows (else it stays for a later pass). True when it was claimed.
    pub fn claim_due_step(
        &mut self,
        step: usize,
        holder: Option<&str>,
        ctxs: &CtxSource,
        now_us: UnixMicros,
    ) -> bool {
        let Some(s) = self.state.steps.get(step) else {
            return false;
        };
        if s.status == StepStatus::Running {
            let lost = Input::Lost {
                step,
                epoch: s.epoch,
                reason: LostReason::LeaseExpired,
            };
            if self.apply(lost, ctxs.ctx(now_us)).is_err() {
                return false;
            }
        }
        let holder = holder.map(str::to_owned);
        match self.apply(Input::Claim { step, holder }, ctxs.ctx(now_us)) {
            Ok(()) => true,
            Err(_) => {
                let s = &self.state.steps[step];
                if s.due_at_us.is_some_and(|due| due <= now_us) {
                    // Consistent data never gets here; if it does, the step
                    // would hold back its queue, so say so.
                    tracing::warn!(entity = %self.record.id, step, status = s.status.as_str(), "a due step cannot be claimed");
                }
                false
            }
        }
    }

    /// Loses the attempt of a running step whose lease expired. True when
    /// it did.
    pub fn lose_expired(&mut self, step: usize, ctxs: &CtxSource, now_us: UnixMicros) -> bool {
        let Some(s) = self.state.steps.get(step) else {
            return false;
        };
        let lost = Input::Lost {
            step,
            epoch: s.epoch,
            reason: LostReason::LeaseExpired,
        };
        self.apply(lost, ctxs.ctx(now_us)).is_ok()
    }

    /// Applies one attempt's result. A result that does not belong to the
    /// live attempt (a stale epoch, an unknown step) changes nothing.
    pub fn complete(&mut self, c: &Completion, ctxs: &CtxSource, now_us: UnixMicros) -> bool {
        let (input, output) = match &c.outcome {
            Outcome::Succeeded { output } => (
                Input::Succeeded {
                    step: c.step,
                    epoch: c.epoch,
                },
                Some(output),
            ),
            Outcome::Failed {
                error,
                retryable,
                retry_after_ms,
            } => (
                Input::Failed {
                    step: c.step,
                    epoch: c.epoch,
                    error: error.clone(),
                    retryable: *retryable,
                    retry_after_ms: *retry_after_ms,
                },
                None,
            ),
        };
        if self.apply(input, ctxs.ctx(now_us)).is_err() {
            return false;
        }
        if let Some(output) = output {
            self.new_outputs.push((c.step, output.clone()));
        }
        true
    }

    /// Claims the steps of `queue` that the core made runnable since the last
    /// pass, so that they are dispatched without waiting for a poll.
    pub fn claim_dispatched(&mut self, queue: Option<&str>, ctxs: &CtxSource, now_us: UnixMicros) {
        let dispatched = std::mem::take(&mut self.dispatched);
        let Some(queue) = queue else {
            return;
        };
        for step in dispatched {
            if self.pipeline.queue(step) == queue
                && self.state.steps[step].status == StepStatus::Queued
            {
                let _ = self.apply(Input::Claim { step, holder: None }, ctxs.ctx(now_us));
            }
        }
    }

    /// Extends the lease of a running attempt whose holder is alive. The
    /// new expiry, or `None` when the lease no longer holds (a stale epoch,
    /// an expired lease, a step that is not running).
    pub fn heartbeat(
        &mut self,
        step: usize,
        epoch: u64,
        ctxs: &CtxSource,
        now_us: UnixMicros,
    ) -> Option<UnixMicros> {
        self.apply(Input::Heartbeat { step, epoch }, ctxs.ctx(now_us))
            .ok()?;
        self.state.steps[step].due_at_us
    }

    /// Every running attempt of this node's own executors is lost when the
    /// node restarts; returns how many. A remote worker's attempt is not:
    /// the worker outlives the node, and its lease runs out by itself if
    /// the worker is gone too.
    pub fn recover(&mut self, ctxs: &CtxSource, now_us: UnixMicros) -> u64 {
        let mut lost = 0;
        for step in 0..self.state.steps.len() {
            let s = &self.state.steps[step];
            if s.status != StepStatus::Running || self.pipeline.is_remote(step) {
                continue;
            }
            let input = Input::Lost {
                step,
                epoch: s.epoch,
                reason: LostReason::NodeRestarted,
            };
            if self.apply(input, ctxs.ctx(now_us)).is_ok() {
                lost += 1;
            }
        }
        lost
    }

    /// Whether the core would take `input` now, leaving the entity as it is.
    pub fn would_take(&self, input: Input, ctxs: &CtxSource, now_us: UnixMicros) -> bool {
        let mut state = self.state.clone();
        apply(&self.pipeline, &mut state, input, ctxs.ctx(now_us)).is_ok()
    }

    /// Applies an operator command (cancel or retry). `Ok(true)` when it was
    /// applied, `Ok(false)` when the entity's status refuses it.
    pub fn command(
        &mut self,
        input: Input,
        ctxs: &CtxSource,
        now_us: UnixMicros,
    ) -> Result<Option<EntityStatus>> {
        match self.apply(input, ctxs.ctx(now_us)) {
            Ok(()) => Ok(None),
            Err(Refusal::WrongStatus(status)) => Ok(Some(status)),
            Err(Refusal::Compensating) => {
                self.compensating = true;
                Ok(Some(self.state.status))
            }
            Err(refusal) => Err(StoreError::Internal(format!(
                "entity {}: unexpected refusal of an operator command: {refusal}",
                self.record.id
            ))),
        }
    }

    /// Moves what changed since the last flush into `rows`: the changed
    /// steps, the entity row, its history and its outbox rows. Afterwards the
    /// working set reads as written.
    pub fn flush(&mut self, now_us: UnixMicros, rows: &mut Rows) {
        if !self.is_dirty() {
            return;
        }
        self.touched = false;
        // Callers read the clock before they queue or wait for locks, so a
        // later change may carry an earlier time: an entity's history never
        // goes back in time.
        let now_us = now_us.max(self.record.updated_at_us);
        let id = self.record.id;
        for (i, (stored, now)) in self.record.steps.iter().zip(&self.state.steps).enumerate() {
            let output = self
                .new_outputs
                .iter()
                .position(|(step, _)| *step == i)
                .map(|k| self.new_outputs[k].1.clone());
            if stored.state == *now && output.is_none() {
                continue;
            }
            if stored.state.status != now.status
                && matches!(now.status, StepStatus::Queued | StepStatus::Retrying)
            {
                rows.wake(self.pipeline.queue(i));
            }
            rows.steps.push(StepRow {
                entity_id: id,
                idx: i,
                state: now.clone(),
                output,
            });
        }
        for (step, output) in self.new_outputs.drain(..) {
            self.outputs[step] = output;
        }
        let was = due_by_queue(&self.pipeline, self.record.steps.iter().map(|s| &s.state));
        let is = due_by_queue(&self.pipeline, self.state.steps.iter());
        for &(queue, from) in &was {
            let to = is.iter().find(|(q, _)| *q == queue).map(|&(_, at)| at);
            if to != Some(from) {
                rows.due.push(DueRow {
                    entity_id: id,
                    queue: queue.to_owned(),
                    from: Some(from),
                    to,
                });
            }
        }
        for &(queue, to) in &is {
            if !was.iter().any(|(q, _)| *q == queue) {
                rows.due.push(DueRow {
                    entity_id: id,
                    queue: queue.to_owned(),
                    from: None,
                    to: Some(to),
                });
            }
        }
        let history = history::from_core(&self.pipeline, &self.events, now_us, self.next_seq);
        self.next_seq += history.len() as u64;
        if !self.record.deps.is_empty() {
            let before = crate::deps::awaited_by(self.record.status, &self.record.deps);
            for (stored, now) in self.record.deps.iter_mut().zip(&self.state.deps) {
                stored.status = now.status;
            }
            let after = crate::deps::awaited_by(self.state.status, &self.record.deps);
            let row = |parent| crate::deps::WaitRow {
                parent,
                dependent: id,
            };
            rows.waits_removed.extend(
                before
                    .iter()
                    .filter(|p| !after.contains(p))
                    .map(|&p| row(p)),
            );
            rows.waits_added.extend(
                after
                    .iter()
                    .filter(|p| !before.contains(p))
                    .map(|&p| row(p)),
            );
        }
        let record = &mut self.record;
        record.status = self.state.status;
        record.degraded = self.state.degraded;
        record.ready_at_us = self.state.ready_at_us;
        record.updated_at_us = now_us;
        for (stored, now) in record.steps.iter_mut().zip(&self.state.steps) {
            stored.state.clone_from(now);
        }
        rows.entities.push(EntityRow {
            id,
            status: record.status,
            degraded: record.degraded,
            ready_at_us: record.ready_at_us,
            updated_at_us: now_us,
            next_seq: self.next_seq,
            deps: crate::deps::encode(&record.deps),
        });
        let mut notify = self.notify.drain(..).peekable();
        for (k, event) in history.into_iter().enumerate() {
            // Each detail is encoded once, for the history row and the outbox body.
            let detail = event.detail.to_string();
            if notify.next_if_eq(&k).is_some() {
                rows.notable(&self.record, event, detail);
            } else {
                rows.events.push(EventRow {
                    entity_id: id,
                    event,
                    detail,
                });
            }
        }
        self.events.clear();
        self.observed = 0;
    }

    /// Whether steps were claimed since the last `take_attempts`.
    pub fn has_claims(&self) -> bool {
        !self.claimed.is_empty()
    }

    /// The attempts claimed since the last call, ready to dispatch; call
    /// after `flush`, with the entity's payload.
    pub fn take_attempts(&mut self, payload: &str) -> Result<Vec<Attempt>> {
        let id = self.record.id;
        // After a flush the record holds the working state.
        debug_assert!(self.events.is_empty(), "take_attempts before flush");
        let outputs = succeeded_outputs(&self.record.steps, &self.outputs);
        std::mem::take(&mut self.claimed)
            .into_iter()
            .map(|step| {
                let s = &self.state.steps[step];
                let lease_expires_at_us = s.due_at_us.ok_or_else(|| {
                    StoreError::Internal(format!("entity {id}: a claimed step has no lease expiry"))
                })?;
                Ok(Attempt {
                    entity_id: id,
                    type_name: self.record.type_name.clone(),
                    version: self.record.version,
                    step,
                    step_name: self.record.steps[step].name.clone(),
                    attempt: s.attempts,
                    epoch: s.epoch,
                    lease_expires_at_us,
                    payload: payload.to_owned(),
                    outputs: outputs.clone(),
                })
            })
            .collect()
    }
}

// ---------------------------------------------------------------------------
// Batches

/// Claims up to `claim.limit` due steps of `claim.queue` among `entities`,
/// the earliest due first (expired leases are lost on the way), for
/// `claim.holder`, and returns how many it claimed.
pub fn claim_due<X>(
    entities: &mut [Working<X>],
    claim: &Claim<'_>,
    ctxs: &CtxSource,
    now_us: UnixMicros,
) -> usize {
    let queue = claim.queue;
    let mut due: Vec<(UnixMicros, usize, usize)> = entities
        .iter()
        .enumerate()
        .flat_map(|(k, w)| w.due_steps(queue, now_us).map(move |(at, i)| (at, k, i)))
        .filter(|&(_, k, i)| {
            !claim.expire_only || entities[k].state.steps[i].status == StepStatus::Running
        })
        .collect();
    due.sort_unstable();
    if claim.expire_only {
        due.truncate(claim.limit);
        return due
            .into_iter()
            .filter(|&(_, k, step)| entities[k].lose_expired(step, ctxs, now_us))
            .count();
    }
    due.truncate(claim.limit);
    // Each entity's steps in step order, so that its events read naturally.
    due.sort_unstable_by_key(|&(_, k, i)| (k, i));
    due.into_iter()
        .filter(|&(_, k, step)| entities[k].claim_due_step(step, claim.holder, ctxs, now_us))
        .count()
}

/// Applies `beats`, in order, to the loaded `entities` (a beat for an
/// entity not among them does not hold). One answer per beat: the new lease
/// expiry, or `None`.
pub fn heartbeat<X>(
    entities: &mut [Working<X>],
    beats: &[Heartbeat],
    ctxs: &CtxSource,
    now_us: UnixMicros,
) -> Vec<Option<UnixMicros>> {
    beats
        .iter()
        .map(|b| {
            let w = entities.iter_mut().find(|w| w.id() == b.entity_id)?;
            w.heartbeat(b.step, b.epoch, ctxs, now_us)
        })
        .collect()
}

/// Applies `completions`, in order, to the loaded `entities` (a completion
/// for an entity not among them is stale), then claims the steps of
/// `claim_queue` they made runnable. One result per completion.
pub fn complete<X>(
    entities: &mut [Working<X>],
    completions: &[Completion],
    claim_queue: Option<&str>,
    ctxs: &CtxSource,
    tally: &Tally,
    now_us: UnixMicros,
) -> Vec<CompletionResult> {
    let slots: HashMap<EntityId, usize> = entities
        .iter()
        .enumerate()
        .map(|(k, e)| (e.id(), k))
        .collect();
    let mut results = Vec::with_capacity(completions.len());
    for c in completions {
        let (entity, step, epoch) = (c.entity_id, c.step, c.epoch);
        let applied = match slots.get(&entity) {
            Some(&k) => entities[k].complete(c, ctxs, now_us),
            None => false,
        };
        if !applied {
            tally.stale(entity, step, epoch);
        }
        results.push(if applied {
            CompletionResult::Applied
        } else {
            CompletionResult::Stale
        });
    }
    for entity in entities.iter_mut() {
        entity.claim_dispatched(claim_queue, ctxs, now_us);
    }
    results
}

/// What an operator command did to one entity, once flushed.
/// Whether the pruner may remove the raw payload of `record`: it is
/// settled (ready, failed or cancelled), its payload is still kept, and no
/// step of it is live (queued, retrying or running: a non-critical step of
/// a ready entity, a compensation), since an attempt carries the payload.
/// The backends choose candidates by time; this is the rest of the rule.
pub fn payload_prunable(record: &EntityRecord) -> bool {
    record.status != EntityStatus::Pending
        && record.payload_pruned_at_us.is_none()
        && record.steps.iter().all(|s| s.state.due_at_us.is_none())
}

/// Whether the pruner may delete `record` entirely: it is settled and no
/// step of it is live. (The backends also leave out entities an outbox row
/// or a waiting dependent still names.)
pub fn entity_prunable(record: &EntityRecord) -> bool {
    record.status != EntityStatus::Pending
        && record.steps.iter().all(|s| s.state.due_at_us.is_none())
}

pub fn command_outcome<X>(working: Working<X>, refused: Option<EntityStatus>) -> CommandOutcome {
    match refused {
        None => CommandOutcome::Applied(working.into_record()),
        Some(status) => working.refusal(status),
    }
}

impl<X> Working<X> {
    /// Why the last operator command was refused, the entity being
    /// `status`.
    pub fn refusal(&self, status: EntityStatus) -> CommandOutcome {
        if self.payload_pruned {
            CommandOutcome::PayloadPruned {
                at_us: self.record.payload_pruned_at_us.unwrap_or_default(),
            }
        } else if self.compensating {
            CommandOutcome::Compensating(status)
        } else {
            CommandOutcome::Conflict(status)
        }
    }
}

#[cfg(test)]
mod tests;
