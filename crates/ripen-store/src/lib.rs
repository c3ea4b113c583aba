//! Ripen's storage: the [`Store`] trait every backend implements, the records
//! it speaks in, and the SQLite backend.
//!
//! A backend owns the SQL and the transactions; every decision is made in
//! [`working`], the one backend-agnostic working set that applies
//! `ripen_core::apply` and turns its result into rows. The conformance suite
//! in [`suite`] is the contract: every backend runs it.
//!
//! Architecture invariant: every write that changes an entity writes, in the
//! same transaction, the new state, one history event per core event, and one
//! outbox row per status change. Nothing is acknowledged before that
//! transaction is durable.

mod decode;
pub mod deps;
pub mod history;
pub mod keys;
pub mod metrics;
pub mod notify;
pub mod postgres;
pub mod registry;
pub mod sqlite;
pub mod suite;
pub mod working;

use std::fmt;
use std::str::FromStr;

use async_trait::async_trait;
use ripen_core::{EntityState, EntityStatus, StepState, UnixMicros};
use uuid::Uuid;

pub use history::HistoryEvent;
pub use keys::ApiKey;
pub use metrics::{DecisionMetrics, Instrumented};
pub use notify::{
    Delivery, DeliveryClaim, DeliveryCounts, DeliveryOutcome, DeliveryQuery, DeliveryResult,
    DeliveryStatus, FanOut, Notification, RedeliverOutcome, SinkKind, Subscription,
};
pub use postgres::{PostgresOptions, PostgresStore};
pub use registry::{NewTypeVersion, Pipelines, Registered, Reseal, TypeHead, TypeVersion};
pub use sqlite::{SqliteOptions, SqliteStore};

/// The tenant of every request until API keys arrive.
pub const DEFAULT_TENANT: &str = "default";

/// The primary id of an entity: a UUIDv7, so ids sort by creation time.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct EntityId(pub Uuid);

impl EntityId {
    pub fn new_v7() -> EntityId {
        EntityId(Uuid::now_v7())
    }

    pub fn as_bytes(&self) -> &[u8; 16] {
        self.0.as_bytes()
    }

    pub fn from_slice(b: &[u8]) -> Option<EntityId> {
        Uuid::from_slice(b).ok().map(EntityId)
    }

    /// The lowest UUIDv7 minted in the millisecond of `at_us`: every id
    /// minted at or after that millisecond is at least this one, every id
    /// minted before it is lower. Times before 1970 count as 1970, and
    /// times past the 48-bit millisecond range as its end.
    pub fn first_minted_at(at_us: UnixMicros) -> EntityId {
        let ms = u64::try_from(at_us.div_euclid(1_000)).unwrap_or(0);
        let ms = ms.min((1 << 48) - 1);
        let mut bytes = [0u8; 16];
        bytes[..6].copy_from_slice(&ms.to_be_bytes()[2..]);
        // Version 7, RFC 4122 variant, and nothing else: the least id of
        // that millisecond.
        bytes[6] = 0x70;
        bytes[8] = 0x80;
        EntityId(Uuid::from_bytes(bytes))
    }
}

impl fmt::Display for EntityId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.hyphenated().fmt(f)
    }
}

impl FromStr for EntityId {
    type Err = uuid::Error;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Uuid::parse_str(s).map(EntityId)
    }
}

/// A validated submission, ready to be stored.
#[derive(Clone, Debug)]
pub struct NewEntity {
    pub id: EntityId,
    pub tenant: String,
    pub type_name: String,
    pub version: u32,
    /// The raw JSON payload exactly as submitted.
    pub payload: String,
    pub idempotency_key: Option<String>,
    /// The entities it references (its type's `references`, read from the
    /// payload); empty for most types.
    pub refs: Vec<deps::Reference>,
}

#[derive(Clone, Debug, PartialEq)]
pub struct StepRecord {
    pub name: String,
    pub critical: bool,
    pub state: StepState,
}

/// An entity as stored, without its payload.
#[derive(Clone, Debug, PartialEq)]
pub struct EntityRecord {
    pub id: EntityId,
    pub tenant: String,
    pub type_name: String,
    pub version: u32,
    pub status: EntityStatus,
    pub degraded: bool,
    pub created_at_us: UnixMicros,
    pub updated_at_us: UnixMicros,
    pub ready_at_us: Option<UnixMicros>,
    /// When the pruner removed its raw payload ([`Store::prune`]); `None`
    /// while it is kept.
    pub payload_pruned_at_us: Option<UnixMicros>,
    pub steps: Vec<StepRecord>,
    /// The entities it depends on, with the status it last saw of each.
    pub deps: Vec<deps::DependencyRecord>,
}

impl EntityRecord {
    /// The state the core machine works on.
    pub fn state(&self) -> EntityState {
        EntityState {
            status: self.status,
            degraded: self.degraded,
            ready_at_us: self.ready_at_us,
            steps: self.steps.iter().map(|s| s.state.clone()).collect(),
            deps: deps::core_deps(&self.deps),
        }
    }

    /// The dependency it waits for now, if any: the first one it has not
    /// seen ready while it is pending.
    pub fn waiting_for(&self) -> Option<&deps::DependencyRecord> {
        if self.status != EntityStatus::Pending {
            return None;
        }
        self.deps.iter().find(|d| d.status == EntityStatus::Pending)
    }

    /// The dependency whose failure (or cancellation) failed it, if any.
    pub fn failed_dependency(&self) -> Option<&deps::DependencyRecord> {
        if self.status != EntityStatus::Failed {
            return None;
        }
        self.deps
            .iter()
            .find(|d| matches!(d.status, EntityStatus::Failed | EntityStatus::Cancelled))
    }
}

/// The consumable entity: payload and the outputs of succeeded steps.
#[derive(Clone, Debug, PartialEq)]
pub struct EntityData {
    pub record: EntityRecord,
    /// `None` once the pruner removed it (`record.payload_pruned_at_us`).
    pub payload: Option<String>,
    /// `(step name, raw JSON output)` of every succeeded step that returned one.
    pub outputs: Vec<(String, String)>,
}

#[derive(Clone, Debug, PartialEq)]
pub enum IntakeOutcome {
    /// A new entity was committed durably.
    Created(EntityRecord),
    /// The key was used before with the same body: the entity it created.
    Replayed(EntityRecord),
    /// The key was used before with another body.
    KeyReused { entity_id: EntityId },
    /// A reference does not hold (see [`deps::check_references`]): nothing
    /// was written.
    ReferenceRefused(deps::ReferenceRefusal),
}

/// A claimed attempt: everything an executor needs to run it.
#[derive(Clone, Debug, PartialEq)]
pub struct Attempt {
    pub entity_id: EntityId,
    pub type_name: String,
    pub version: u32,
    pub step: usize,
    pub step_name: String,
    pub attempt: u32,
    pub epoch: u64,
    pub lease_expires_at_us: UnixMicros,
    pub payload: String,
    pub outputs: Vec<(String, String)>,
}

/// What a claim asks for: up to `limit` due steps of `queue`, leased to
/// `holder` when it names itself (a remote worker's id).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Claim<'a> {
    pub queue: &'a str,
    pub limit: usize,
    pub holder: Option<&'a str>,
    /// Only lose the attempts of `queue` whose lease expired (up to
    /// `limit`), and claim nothing: what keeps a worker queue's leases
    /// honest while no worker claims from it.
    pub expire_only: bool,
}

impl<'a> Claim<'a> {
    /// A claim by this node's own scheduler.
    pub fn local(queue: &'a str, limit: usize) -> Claim<'a> {
        Claim {
            queue,
            limit,
            holder: None,
            expire_only: false,
        }
    }

    /// A claim for a remote worker that names itself (or not).
    pub fn by(queue: &'a str, limit: usize, holder: Option<&'a str>) -> Claim<'a> {
        Claim {
            holder,
            ..Claim::local(queue, limit)
        }
    }

    /// See [`Claim::expire_only`].
    pub fn expiring(queue: &'a str, limit: usize) -> Claim<'a> {
        Claim {
            expire_only: true,
            ..Claim::local(queue, limit)
        }
    }
}

/// The holder of a running attempt is alive and keeps its lease.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Heartbeat {
    pub entity_id: EntityId,
    pub step: usize,
    pub epoch: u64,
}

/// Called with a queue's name whenever a commit may have made a step of
/// that queue runnable (here, or on another node sharing the store); with
/// `None` when any queue may have (say, after notifications were missed).
pub type WorkWatcher = std::sync::Arc<dyn Fn(Option<&str>) + Send + Sync>;

/// The watchers a store calls after its commits: see [`Store::watch_work`].
#[derive(Default)]
pub struct WorkWatchers(std::sync::RwLock<Vec<WorkWatcher>>);

impl WorkWatchers {
    pub fn add(&self, watcher: WorkWatcher) {
        self.0
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .push(watcher);
    }

    /// Tells every watcher that `queue` (`None`: any queue) may have
    /// runnable work.
    pub fn wake(&self, queue: Option<&str>) {
        let watchers = self
            .0
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        for w in watchers.iter() {
            w(queue);
        }
    }

    pub fn is_empty(&self) -> bool {
        self.0
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .is_empty()
    }
}

/// What a commit changed, as a store tells its change watchers.
#[derive(Clone, Copy, Debug)]
pub struct Changes<'a> {
    /// The entities whose history grew; `None` when any entity may have
    /// changed (another node committed, notifications were missed).
    pub entities: Option<&'a [EntityId]>,
    /// Outbox rows were written that wait for a fan-out.
    pub outbox_written: bool,
    /// New outbox positions are readable.
    pub sequenced: bool,
    /// API keys were created or revoked (by any node), or notifications
    /// may have been missed: what a node remembers of keys is stale.
    pub keys: bool,
}

/// Called by a store after commits: see [`Store::watch_changes`].
pub type ChangeWatcher = std::sync::Arc<dyn Fn(&Changes<'_>) + Send + Sync>;

/// The change watchers of a store.
#[derive(Default)]
pub struct ChangeWatchers(std::sync::RwLock<Vec<ChangeWatcher>>);

impl ChangeWatchers {
    pub fn add(&self, watcher: ChangeWatcher) {
        self.0
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .push(watcher);
    }

    pub fn tell(&self, changes: &Changes<'_>) {
        let watchers = self
            .0
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        for w in watchers.iter() {
            w(changes);
        }
    }

    pub fn is_empty(&self) -> bool {
        self.0
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .is_empty()
    }
}

impl fmt::Debug for ChangeWatchers {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ChangeWatchers")
    }
}

impl fmt::Debug for WorkWatchers {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("WorkWatchers")
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct ClaimBatch {
    pub attempts: Vec<Attempt>,
    /// The earliest time at which some step will need the scheduler again
    /// (a backoff ending, a lease expiring), if any.
    pub next_due_us: Option<UnixMicros>,
}

#[derive(Clone, Debug, PartialEq)]
pub enum Outcome {
    /// `output` is the raw JSON the step returned, if any.
    Succeeded { output: Option<String> },
    Failed {
        error: String,
        retryable: bool,
        retry_after_ms: Option<u64>,
    },
}

#[derive(Clone, Debug, PartialEq)]
pub struct Completion {
    pub entity_id: EntityId,
    pub step: usize,
    pub epoch: u64,
    pub outcome: Outcome,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CompletionResult {
    Applied,
    /// The epoch no longer holds (or the entity is gone): nothing changed.
    Stale,
}

#[derive(Clone, Debug, Default, PartialEq)]
pub struct CompleteBatch {
    /// One result per completion, in order.
    pub results: Vec<CompletionResult>,
    /// Steps these completions made runnable, already claimed in the same
    /// transaction, to be dispatched at once.
    pub claimed: Vec<Attempt>,
}

/// One notification waiting in the outbox: a status change or a
/// degradation, written in the same transaction as the change.
#[derive(Clone, Debug, PartialEq)]
pub struct OutboxEntry {
    /// The row's position: grows in the order rows become readable, so a
    /// reader resumes after the last one it saw (see [`notify`]).
    pub id: u64,
    pub entity_id: EntityId,
    /// The seq of the history event it announces.
    pub seq: u64,
    pub at_us: UnixMicros,
    pub kind: String,
    /// The notification as JSON: entity id, tenant, type, version, seq,
    /// time, kind and the event's detail.
    pub body: String,
    /// The entity's status when the row was read.
    pub status: Option<String>,
    /// Whether the entity had been degraded by this row's event.
    pub degraded: bool,
}

#[derive(Clone, Debug, PartialEq)]
pub enum CommandOutcome {
    Applied(EntityRecord),
    NotFound,
    /// The entity's status does not allow the command.
    Conflict(EntityStatus),
    /// A retry refused: the entity (failed or cancelled) is still
    /// compensating.
    Compensating(EntityStatus),
    /// A retry refused: an entity it depends on and has not seen ready is
    /// failed, cancelled or gone.
    DependencyNotReady(deps::ReferenceRefusal),
    /// A retry refused: the entity's raw payload was pruned, so its steps
    /// could not run again.
    PayloadPruned {
        at_us: UnixMicros,
    },
}

/// What one pass of the pruner asks for (see docs/retention.md). Each
/// `*_before_us` is a bound in store time: `None` prunes nothing of that
/// kind. A pass removes at most `limit` rows of each kind.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Prune {
    /// Raw payloads of settled entities (ready, failed, cancelled) with no
    /// live step, last changed before this.
    pub payload_before_us: Option<UnixMicros>,
    /// Idempotency keys stored before this; a pruned key is free for reuse.
    pub keys_before_us: Option<UnixMicros>,
    /// Settled entities with no live step, last changed before this, are
    /// deleted entirely (row, steps, outputs, history, payload). Only
    /// entities that no outbox row and no waiting dependent names, and only
    /// while the keys pass of the same call left no due key (its bound is
    /// no earlier than this one and it was not full): a key is stored when
    /// its entity is created, so every key of a deleted entity is gone.
    pub entities_before_us: Option<UnixMicros>,
    pub limit: u32,
    /// Count what a pass would remove, and remove nothing.
    pub dry_run: bool,
}

/// What `ripen store stats` shows: each table, and what retention keeps.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct StoreStats {
    /// Every table of the store, by name.
    pub tables: Vec<TableStats>,
    /// The size of the database: the file on SQLite, the database on
    /// PostgreSQL.
    pub total_bytes: Option<u64>,
    /// Bytes of free pages SQLite keeps for reuse; `None` on PostgreSQL.
    pub free_bytes: Option<u64>,
    /// The last change of the oldest settled entity whose payload is kept:
    /// what the pruner removes next.
    pub oldest_kept_payload_us: Option<UnixMicros>,
}

#[derive(Clone, Debug, Default, PartialEq)]
pub struct TableStats {
    pub name: String,
    pub rows: u64,
    /// Its size with its indexes, where the backend can say (SQLite needs
    /// its `dbstat` table compiled in).
    pub bytes: Option<u64>,
}

/// What one pass removed (or, dry, would remove).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Pruned {
    pub payloads: u64,
    pub keys: u64,
    pub entities: u64,
}

impl Pruned {
    pub fn total(&self) -> u64 {
        self.payloads + self.keys + self.entities
    }
}

impl Prune {
    /// Whether this pass may delete entities, given how many keys its keys
    /// pass removed (see [`Prune::entities_before_us`]).
    pub fn entities_due(&self, keys_pruned: u64) -> Option<UnixMicros> {
        let before = self.entities_before_us?;
        let keys_before = self.keys_before_us?;
        (keys_before >= before && keys_pruned < u64::from(self.limit)).then_some(before)
    }
}

#[derive(Clone, Debug, Default, PartialEq)]
pub struct ListQuery {
    pub type_name: Option<String>,
    pub status: Option<EntityStatus>,
    /// At most this many items; the caller bounds it.
    pub limit: u32,
    /// Only entities older than this one (the cursor of the previous page).
    pub after: Option<EntityId>,
    /// Only entities whose `degraded` flag is this.
    pub degraded: Option<bool>,
    /// Only entities whose id was minted at or after this time. Ids are
    /// UUIDv7, so this is a bound on the id (millisecond precision) and
    /// walks the same index ranges as `after`.
    pub created_after_us: Option<UnixMicros>,
    /// Only entities whose id was minted before this time (millisecond
    /// precision, like `created_after_us`).
    pub created_before_us: Option<UnixMicros>,
    /// Only the entity this idempotency key created; needs `type_name`
    /// (keys are unique per tenant and type), and is one key lookup.
    pub key: Option<String>,
}

impl ListQuery {
    /// The exclusive upper bound on ids: the cursor or `created_before_us`,
    /// whichever is lower.
    pub fn id_below(&self) -> Option<EntityId> {
        let before = self.created_before_us.map(EntityId::first_minted_at);
        match (self.after, before) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// The inclusive lower bound on ids, from `created_after_us`.
    pub fn id_from(&self) -> Option<EntityId> {
        self.created_after_us.map(EntityId::first_minted_at)
    }

    /// Whether `record` passes every filter of the query (the idempotency
    /// key excepted): what a backend checks on the one entity a key names.
    pub fn matches(&self, record: &EntityRecord) -> bool {
        self.type_name
            .as_ref()
            .is_none_or(|t| *t == record.type_name)
            && self.status.is_none_or(|s| s == record.status)
            && self.degraded.is_none_or(|d| d == record.degraded)
            && self.id_below().is_none_or(|below| record.id < below)
            && self.id_from().is_none_or(|from| record.id >= from)
    }
}

/// What the gauges of the metrics show, counted by the database.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Counts {
    /// Stored entities by type and status, every tenant's summed.
    pub entities: Vec<(String, EntityStatus, u64)>,
    /// Stored entities by tenant, type and status.
    pub by_tenant: Vec<(String, String, EntityStatus, u64)>,
    /// Entities with a step due now, by queue: the work waiting for a
    /// consumer of that queue.
    pub due: Vec<(String, u64)>,
}

impl Counts {
    /// Adds `n` entities of `tenant`'s `type_name` in `status`.
    pub fn add_entities(
        &mut self,
        tenant: String,
        type_name: String,
        status: EntityStatus,
        n: i64,
    ) {
        let n = u64::try_from(n).unwrap_or(0);
        match self
            .entities
            .iter_mut()
            .find(|(t, s, _)| *t == type_name && *s == status)
        {
            Some((_, _, total)) => *total += n,
            None => self.entities.push((type_name.clone(), status, n)),
        }
        self.by_tenant.push((tenant, type_name, status, n));
    }

    /// The counts of one tenant's entities; no queue is anyone's own.
    pub fn of_tenant(&self, tenant: &str) -> Counts {
        let mut own = Counts::default();
        for (t, type_name, status, n) in &self.by_tenant {
            if t == tenant {
                own.add_entities(t.clone(), type_name.clone(), *status, *n as i64);
            }
        }
        own
    }
}

#[derive(Clone, Debug, thiserror::Error)]
pub enum StoreError {
    /// The database cannot be reached or written now; the caller may retry later.
    #[error("store unavailable: {0}")]
    Unavailable(String),
    /// Too many writes wait already; the caller may retry shortly. Nothing
    /// was written.
    #[error("store overloaded: {0}")]
    Overloaded(String),
    #[error("no pipeline for entity type {type_name:?} version {version}")]
    UnknownPipeline { type_name: String, version: u32 },
    #[error("store failure: {0}")]
    Internal(String),
}

pub type Result<T, E = StoreError> = std::result::Result<T, E>;

/// The storage of entities, their steps, history, idempotency keys and outbox.
///
/// Time always comes from the caller (`now_us`), so that tests can drive it.
#[async_trait]
pub trait Store: Send + Sync + 'static {
    /// Commits one new entity (row, payload, step rows, idempotency key,
    /// `created` event and outbox row) and returns only once it is durable.
    /// Concurrent calls may share one commit.
    async fn create(&self, entity: NewEntity, now_us: UnixMicros) -> Result<IntakeOutcome>;

    /// Claims up to `claim.limit` runnable steps of `claim.queue` (queued,
    /// or retrying with backoff elapsed) and first turns expired leases
    /// into lost attempts. `next_due_us` is the earliest due time left in
    /// that queue.
    async fn claim_due(&self, claim: Claim<'_>, now_us: UnixMicros) -> Result<ClaimBatch>;

    /// Extends the leases of running attempts whose holders are alive. One
    /// answer per beat: the new lease expiry, or `None` when that lease no
    /// longer holds (a stale epoch, an expired lease, an unknown entity).
    async fn heartbeat(
        &self,
        beats: Vec<Heartbeat>,
        now_us: UnixMicros,
    ) -> Result<Vec<Option<UnixMicros>>>;

    /// Records attempt results; a result whose epoch no longer holds is
    /// refused and changes nothing. The steps of `claim_queue` these results
    /// made runnable are claimed in the same transaction.
    async fn complete(
        &self,
        completions: Vec<Completion>,
        claim_queue: Option<&str>,
        now_us: UnixMicros,
    ) -> Result<CompleteBatch>;

    /// Called once when a single-node store opens: every running attempt
    /// belongs to a process that is gone, so it is lost now. Returns how many.
    async fn recover(&self, now_us: UnixMicros) -> Result<u64>;

    async fn cancel(
        &self,
        tenant: &str,
        id: EntityId,
        now_us: UnixMicros,
    ) -> Result<CommandOutcome>;
    async fn retry(&self, tenant: &str, id: EntityId, now_us: UnixMicros)
        -> Result<CommandOutcome>;

    async fn get(&self, tenant: &str, id: EntityId) -> Result<Option<EntityRecord>>;
    async fn get_data(&self, tenant: &str, id: EntityId) -> Result<Option<EntityData>>;
    /// Newest first.
    async fn list(&self, tenant: &str, query: ListQuery) -> Result<Vec<EntityRecord>>;
    /// History events with `seq > after_seq`, oldest first; `None` for an unknown entity.
    async fn events(
        &self,
        tenant: &str,
        id: EntityId,
        after_seq: u64,
        limit: u32,
    ) -> Result<Option<Vec<HistoryEvent>>>;
    /// Outbox rows with a position after `after_pos`, oldest first: what
    /// live streams read. On a shared store only rows a fan-out has
    /// positioned are read.
    async fn outbox(&self, after_pos: u64, limit: u32) -> Result<Vec<OutboxEntry>>;

    /// The newest outbox position, 0 when there is none.
    async fn outbox_head(&self) -> Result<u64>;

    /// Hands up to `limit` outbox rows not yet fanned out to the
    /// subscriptions they match, as pending deliveries, in one transaction;
    /// on a shared store it first gives them positions. One node fans out
    /// at a time; a node that finds another one doing it returns at once.
    async fn fan_out(&self, limit: u32, now_us: UnixMicros) -> Result<FanOut>;

    /// Deletes outbox rows older than `before_us` that the fan-out has
    /// passed and the dependency resolver needs no more (it passed them,
    /// or no entity waits), at most `limit`, never the newest row. Returns
    /// how many.
    async fn prune_outbox(&self, before_us: UnixMicros, limit: u32) -> Result<u64>;

    /// One pass of the pruner, in one transaction: see [`Prune`]. The
    /// rows are chosen by the times given, oldest first; what intake and
    /// the scheduler need (pending entities, live steps) is never touched.
    async fn prune(&self, prune: Prune, now_us: UnixMicros) -> Result<Pruned>;

    /// Counts and sizes per table, for operators (`ripen store stats`):
    /// counts every row, so it is not for the hot path.
    async fn stats(&self) -> Result<StoreStats>;

    /// Of `ids`, those whose entity exists and keeps its raw payload: the
    /// blobs the blob sweep must leave alone.
    async fn payloads_kept(&self, ids: Vec<EntityId>) -> Result<Vec<EntityId>>;

    /// Stores a subscription, or replaces the one with its id (keeping its
    /// start). Its start is the outbox head now: it hears what the fan-out
    /// reaches afterwards. Returns it as stored.
    async fn put_subscription(&self, sub: Subscription) -> Result<Subscription>;

    /// The subscriptions of `tenant` (every one for `None`), oldest first,
    /// with their delivery counts.
    async fn subscriptions(
        &self,
        tenant: Option<&str>,
    ) -> Result<Vec<(Subscription, DeliveryCounts)>>;

    /// Every subscription of every tenant, oldest first, without counts:
    /// what the dispatcher sends to. Cheap however many deliveries there
    /// are.
    async fn subscription_list(&self) -> Result<Vec<Subscription>>;

    /// Deletes a subscription and its deliveries; false if there was none.
    async fn delete_subscription(&self, tenant: &str, id: &str) -> Result<bool>;

    /// Claims due deliveries for `claim.lease_us`. A delivery is due when it
    /// is pending, its time has come, and no earlier notification of the
    /// same entity to the same subscription is still pending: per-entity
    /// order.
    async fn claim_deliveries(
        &self,
        claim: DeliveryClaim,
        now_us: UnixMicros,
    ) -> Result<Vec<Delivery>>;

    /// Records attempt results; one whose claim is no longer current
    /// changes nothing.
    async fn finish_deliveries(
        &self,
        results: Vec<DeliveryResult>,
        now_us: UnixMicros,
    ) -> Result<()>;

    /// The deliveries of one subscription, newest first.
    async fn deliveries(
        &self,
        subscription_id: &str,
        query: DeliveryQuery,
    ) -> Result<Vec<Delivery>>;

    /// Queues a dead delivery of `tenant`'s subscriptions again.
    async fn redeliver(
        &self,
        tenant: &str,
        delivery_id: u64,
        now_us: UnixMicros,
    ) -> Result<RedeliverOutcome>;

    /// Registers a version of an entity type, unless the latest version has
    /// the same digest or is not the one the caller checked against: see
    /// [`registry::decide`]. Versions are never deleted.
    async fn register_type(
        &self,
        version: NewTypeVersion,
        now_us: UnixMicros,
    ) -> Result<Registered>;

    /// Every registered type with its latest version, by name.
    async fn type_heads(&self) -> Result<Vec<TypeHead>>;

    /// The versions of `type_name` (of every type for `None`), by type and
    /// then version.
    async fn type_versions(&self, type_name: Option<&str>) -> Result<Vec<TypeVersion>>;

    /// How many pending entities of `tenant` each version of `type_name`
    /// has: `(version, count)`, versions without any left out.
    async fn live_entities(&self, tenant: &str, type_name: &str) -> Result<Vec<(u32, u64)>>;

    /// Stores a new API key. Every node hears of it ([`Changes::keys`]).
    async fn put_key(&self, key: ApiKey) -> Result<()>;

    /// The key whose secret hashes to `hash`, revoked or not.
    async fn key_by_hash(&self, hash: &str) -> Result<Option<ApiKey>>;

    /// The keys of `tenant` (of every tenant for `None`), oldest first.
    async fn keys(&self, tenant: Option<&str>) -> Result<Vec<ApiKey>>;

    /// Revokes a key of `tenant` (of any tenant for `None`) and returns it;
    /// revoking a revoked key keeps its first revocation time. `None` when
    /// there is no such key. Every node hears of it ([`Changes::keys`]).
    async fn revoke_key(
        &self,
        tenant: Option<&str>,
        id: &str,
        now_us: UnixMicros,
    ) -> Result<Option<ApiKey>>;

    /// Whether the store has ever held a key, revoked ones included.
    async fn any_keys(&self) -> Result<bool>;

    /// Writes sealed values again, each only if its row still holds what
    /// was read (a rotation of the master key, docs/security.md). Returns
    /// how many rows changed.
    async fn reseal(&self, values: Vec<Reseal>) -> Result<u64>;

    /// Fails each pending entity among `ids` whose pipeline this node cannot
    /// run, with the cause in its history and steps, and skips the live
    /// steps of such a ready one, which becomes degraded
    /// ([`registry::abandon`]); the others are left as they are. Returns the
    /// entities it changed.
    async fn fail_unrunnable(
        &self,
        ids: Vec<EntityId>,
        now_us: UnixMicros,
    ) -> Result<Vec<EntityRecord>>;

    /// Entities by type and status, and entities with due steps by queue.
    /// Served from indexes; the caller bounds how often it asks.
    async fn counts(&self, now_us: UnixMicros) -> Result<Counts>;

    /// One round of the dependency resolver (see [`deps`]): reads the
    /// outbox after the resolver's cursor and, for each entity that
    /// settled, tells the entities waiting for it, each in a transaction of
    /// its own; then moves the cursor. Any node may run it at any time.
    async fn resolve_dependencies(&self, now_us: UnixMicros) -> Result<deps::Resolved>;

    /// Succeeds when the store can serve requests.
    async fn ping(&self) -> Result<()>;

    /// The store's clock. Leases expire by it, so a backend shared by many
    /// nodes answers with the database's clock; an embedded one with the
    /// local clock. The runtime reads it now and then and keeps the offset.
    async fn clock_us(&self) -> Result<UnixMicros>;

    /// Completions refused as stale since the store opened.
    fn stale_completions(&self) -> u64;

    /// Adds the store's metric families (its decisions, its commits) to
    /// `registry`.
    fn register_metrics(&self, registry: &prometheus::Registry) -> prometheus::Result<()>;

    /// Whether the store is shared by several nodes. A single-node store
    /// lets its owner `recover` attempts at start; a shared one never does,
    /// since another node may hold those leases.
    fn is_shared(&self) -> bool {
        false
    }

    /// Asks the store to call `watcher` with a queue's name whenever a
    /// commit, by this node or another one sharing the store, may have made
    /// a step of that queue runnable. Calls are cheap hints; a watcher must
    /// not block.
    fn watch_work(&self, watcher: WorkWatcher);

    /// Asks the store to call `watcher` after each commit with what it
    /// changed, and, on a shared store, when other nodes' notifications
    /// arrive. Calls are cheap hints; a watcher must not block.
    fn watch_changes(&self, watcher: ChangeWatcher);
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An id minted at `ms` with random bits, as `Uuid::now_v7` makes them.
    fn minted(ms: u64) -> EntityId {
        let mut rand = [0u8; 10];
        fastrand::fill(&mut rand);
        EntityId(uuid::Builder::from_unix_timestamp_millis(ms, &rand).into_uuid())
    }

    #[test]
    fn the_first_id_of_a_millisecond_bounds_every_id_minted_around_it() {
        for _ in 0..10_000 {
            let ms = fastrand::u64(1..1 << 47);
            let bound = EntityId::first_minted_at(ms as i64 * 1_000 + fastrand::i64(0..1_000));
            assert!(minted(ms) >= bound, "same millisecond");
            assert!(minted(ms + fastrand::u64(1..1_000)) > bound, "later");
            assert!(
                minted(ms - fastrand::u64(1..=ms.min(1_000))) < bound,
                "earlier"
            );
            assert_eq!(bound.0.get_version_num(), 7);
        }
        assert_eq!(EntityId::first_minted_at(-5), EntityId::first_minted_at(0));
    }

    #[test]
    fn the_id_bounds_combine_the_cursor_and_the_creation_times() {
        let early = minted(1_000);
        let late = minted(5_000);
        let q = ListQuery {
            after: Some(late),
            created_before_us: Some(2_000_000),
            created_after_us: Some(500_000),
            ..ListQuery::default()
        };
        assert_eq!(q.id_below(), Some(EntityId::first_minted_at(2_000_000)));
        assert!(q.matches(&record(early)));
        assert!(!q.matches(&record(late)));
        let q = ListQuery {
            after: Some(early),
            created_before_us: Some(2_000_000),
            ..ListQuery::default()
        };
        assert_eq!(q.id_below(), Some(early));
        assert!(!q.matches(&record(early)), "the cursor is exclusive");
        let q = ListQuery {
            created_after_us: Some(1_000_000),
            ..ListQuery::default()
        };
        assert!(q.matches(&record(early)), "created_after is inclusive");
        assert!(!q.matches(&record(minted(999))));
    }

    fn record(id: EntityId) -> EntityRecord {
        EntityRecord {
            id,
            tenant: DEFAULT_TENANT.into(),
            type_name: "t".into(),
            version: 1,
            status: EntityStatus::Pending,
            degraded: false,
            created_at_us: 0,
            updated_at_us: 0,
            ready_at_us: None,
            payload_pruned_at_us: None,
            steps: Vec::new(),
            deps: Vec::new(),
        }
    }
}
