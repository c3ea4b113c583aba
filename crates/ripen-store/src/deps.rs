//! Entities that depend on others: the records the store keeps of their
//! references and the decisions around them, once, for every backend
//! (docs/dependencies.md).
//!
//! - A new entity names the entities it references ([`Reference`], from
//!   its type's `references` and its payload). Its create transaction reads
//!   them (on PostgreSQL under a share lock, so that none settles unseen)
//!   and [`check_references`] decides: refused ([`ReferenceRefusal`]) when
//!   one is missing, of another type, failed or cancelled, or already has
//!   [`WAITING_DEPENDENTS_MAX`] dependents waiting; otherwise created, ready
//!   to run when every one is ready, else waiting for the others.
//! - An entity's dependencies live in its own row ([`DependencyRecord`],
//!   encoded by [`encode`]), with the status it last saw of each. The
//!   `dependencies` table indexes `(parent, dependent)` for every entity
//!   that waits, written by the same flush that changes its state.
//! - A resolver reads the outbox after its cursor; for each entity that
//!   settled, it visits the dependents indexed under it, each in a
//!   transaction of its own, where what the parent is *now* decides
//!   ([`Decider::wake`]): ready releases the dependent (once the last one
//!   it awaits is), failed or cancelled fails it, pending (retried since)
//!   changes nothing, as a later row will tell how it ends. Visiting twice
//!   is harmless: the core refuses news for what a dependent no longer
//!   awaits.
//! - An operator retry of a dependent re-checks what it references
//!   ([`Decider::retry_checked`]).
//!
//! Architecture invariant: nothing here does I/O; the backends read the
//! rows these functions decide on and bind what they return.

use std::collections::HashMap;
use std::fmt;

use ripen_core::{Dependency, EntityState, EntityStatus, Input, Refusal, UnixMicros};
use serde::{Deserialize, Serialize};

use crate::working::{Decider, Working};
use crate::{CommandOutcome, EntityId, Result, StoreError};

/// The most references a type may declare.
pub const REFERENCES_MAX: usize = 16;
/// The most entities that may wait for one entity at once: what one
/// entity's settling costs the resolver is bounded by it.
pub const WAITING_DEPENDENTS_MAX: u64 = 1_000;
/// The most dependents one resolver round visits; a parent with more is
/// finished by the next rounds.
pub const RESOLVE_VISITS_MAX: usize = 256;
/// The outbox rows one resolver round reads at most.
pub const RESOLVE_ROWS_MAX: u32 = 512;
/// The outbox positions one resolver round passes at most. Of those, it
/// reads only the rows of entities that some entity waits for (an index
/// probe each), so a busy outbox with few dependents costs little.
pub const RESOLVE_SCAN_MAX: u64 = 65_536;
/// While no entity waits, the resolver leaves its cursor behind the outbox
/// head by up to this many rows instead of writing it every round: a round
/// is then one read, and the commits of a busy node pay nothing for a
/// feature they do not use.
pub const IDLE_LAG_MAX: u64 = 4_096;
/// The resolver's position in the `cursors` table.
pub const CURSOR: &str = "dependencies";

/// A reference of a new entity: the payload field that holds another
/// entity's id, and the type that entity must have.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Reference {
    pub field: String,
    pub type_name: String,
    pub id: EntityId,
}

/// One of an entity's dependencies as stored: its reference and the
/// status this entity last saw of the other one (`pending` while it waits).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DependencyRecord {
    pub field: String,
    pub type_name: String,
    pub id: EntityId,
    pub status: EntityStatus,
}

/// Why a reference does not hold.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RefusalReason {
    /// No entity of this tenant has that id.
    NotFound,
    /// The entity is of another type (named here).
    WrongType(String),
    /// The entity failed or was cancelled.
    Settled(EntityStatus),
    /// As many entities as allowed already wait for it.
    TooManyDependents,
}

impl RefusalReason {
    /// A short name for machines: `not_found`, `wrong_type`, `failed`,
    /// `cancelled`, `too_many_dependents`.
    pub fn as_str(&self) -> &'static str {
        match self {
            RefusalReason::NotFound => "not_found",
            RefusalReason::WrongType(_) => "wrong_type",
            RefusalReason::Settled(EntityStatus::Cancelled) => "cancelled",
            RefusalReason::Settled(_) => "failed",
            RefusalReason::TooManyDependents => "too_many_dependents",
        }
    }
}

/// A reference that does not hold, naming its field.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReferenceRefusal {
    pub field: String,
    pub type_name: String,
    pub id: EntityId,
    pub reason: RefusalReason,
}

impl fmt::Display for ReferenceRefusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (field, t, id) = (&self.field, &self.type_name, self.id);
        match &self.reason {
            RefusalReason::NotFound => write!(f, "{field}: there is no {t} with id {id}"),
            RefusalReason::WrongType(found) => {
                write!(f, "{field}: entity {id} is a {found}, not a {t}")
            }
            RefusalReason::Settled(status) => write!(
                f,
                "{field}: {t} {id} is {}; an entity can only depend on one that may still become ready",
                status.as_str()
            ),
            RefusalReason::TooManyDependents => write!(
                f,
                "{field}: {WAITING_DEPENDENTS_MAX} entities already wait for {t} {id}; submit this one once it is ready"
            ),
        }
    }
}

/// What a create transaction read of a referenced entity.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Parent {
    pub tenant: String,
    pub type_name: String,
    pub status: EntityStatus,
    /// How many entities wait for it.
    pub waiting: u64,
}

/// Decides a new entity's dependencies from what its create transaction
/// read of the entities it references (`parents`, by id; missing ones are
/// absent). `added` counts the dependents that earlier creates of the same
/// transaction made wait, and is updated. The first reference that does
/// not hold refuses the entity.
pub fn check_references(
    tenant: &str,
    refs: &[Reference],
    parents: &HashMap<EntityId, Parent>,
    added: &mut HashMap<EntityId, u64>,
) -> Result<Vec<DependencyRecord>, ReferenceRefusal> {
    let refuse = |r: &Reference, reason| ReferenceRefusal {
        field: r.field.clone(),
        type_name: r.type_name.clone(),
        id: r.id,
        reason,
    };
    let mut deps = Vec::with_capacity(refs.len());
    let mut waits: Vec<EntityId> = Vec::new();
    for r in refs {
        let Some(p) = parents.get(&r.id).filter(|p| p.tenant == tenant) else {
            return Err(refuse(r, RefusalReason::NotFound));
        };
        if p.type_name != r.type_name {
            return Err(refuse(r, RefusalReason::WrongType(p.type_name.clone())));
        }
        match p.status {
            EntityStatus::Failed | EntityStatus::Cancelled => {
                return Err(refuse(r, RefusalReason::Settled(p.status)));
            }
            EntityStatus::Pending if !waits.contains(&r.id) => {
                let earlier = added.get(&r.id).copied().unwrap_or(0);
                if p.waiting + earlier >= WAITING_DEPENDENTS_MAX {
                    return Err(refuse(r, RefusalReason::TooManyDependents));
                }
                waits.push(r.id);
            }
            EntityStatus::Pending | EntityStatus::Ready => {}
        }
        deps.push(DependencyRecord {
            field: r.field.clone(),
            type_name: r.type_name.clone(),
            id: r.id,
            status: p.status,
        });
    }
    for id in waits {
        *added.entry(id).or_default() += 1;
    }
    Ok(deps)
}

/// The core's view of stored dependencies.
pub fn core_deps(deps: &[DependencyRecord]) -> Vec<Dependency> {
    deps.iter()
        .map(|d| Dependency {
            parent: d.id.0.as_u128(),
            status: d.status,
        })
        .collect()
}

/// The entities `state` waits for, each once.
pub fn awaited(state: &EntityState) -> Vec<EntityId> {
    let mut ids: Vec<EntityId> = state
        .awaited()
        .map(|p| EntityId(uuid::Uuid::from_u128(p)))
        .collect();
    ids.sort_unstable();
    ids.dedup();
    ids
}

/// The entities an entity of status `status` with dependencies `deps`
/// waits for, each once: those it has not seen ready while it is pending.
pub fn awaited_by(status: EntityStatus, deps: &[DependencyRecord]) -> Vec<EntityId> {
    let mut ids: Vec<EntityId> = Vec::new();
    if status != EntityStatus::Pending {
        return ids;
    }
    for d in deps.iter().filter(|d| d.status == EntityStatus::Pending) {
        if !ids.contains(&d.id) {
            ids.push(d.id);
        }
    }
    ids
}

/// One row of the `dependencies` index: `dependent` waits for `parent`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WaitRow {
    pub parent: EntityId,
    pub dependent: EntityId,
}

/// The `deps` column: `[[field, type, id, status], ...]`.
#[derive(Serialize, Deserialize)]
struct Column(String, String, String, String);

/// The `deps` column of an entity; `None` (NULL) for one without
/// dependencies.
pub fn encode(deps: &[DependencyRecord]) -> Option<String> {
    if deps.is_empty() {
        return None;
    }
    let columns: Vec<Column> = deps
        .iter()
        .map(|d| {
            Column(
                d.field.clone(),
                d.type_name.clone(),
                d.id.to_string(),
                d.status.as_str().to_owned(),
            )
        })
        .collect();
    serde_json::to_string(&columns).ok()
}

/// Reads the `deps` column of entity `id`.
pub fn decode(id: EntityId, text: Option<&str>) -> Result<Vec<DependencyRecord>> {
    let Some(text) = text else {
        return Ok(Vec::new());
    };
    let bad = |what: String| StoreError::Internal(format!("entity {id}: the deps column {what}"));
    let columns: Vec<Column> =
        serde_json::from_str(text).map_err(|e| bad(format!("is malformed: {e}")))?;
    columns
        .into_iter()
        .map(|Column(field, type_name, parent, status)| {
            Ok(DependencyRecord {
                field,
                type_name,
                id: parent
                    .parse()
                    .map_err(|_| bad(format!("holds {parent:?}, which is no entity id")))?,
                status: EntityStatus::parse(&status)
                    .ok_or_else(|| bad(format!("holds an unknown status {status:?}")))?,
            })
        })
        .collect()
}

/// Whether an outbox row of kind `kind` with history detail `detail`
/// announces that its entity settled: what makes the resolver look at the
/// entity's dependents.
pub fn settles(kind: &str, detail: &str) -> bool {
    if kind != "status_changed" {
        return false;
    }
    #[derive(Deserialize)]
    struct Change<'a> {
        to: &'a str,
    }
    serde_json::from_str::<Change<'_>>(detail)
        .is_ok_and(|c| matches!(c.to, "ready" | "failed" | "cancelled"))
}

/// [`settles`] for an outbox row whose body is a notification
/// (`{"kind", "detail", ...}`), as PostgreSQL stores it.
pub fn body_settles(kind: &str, body: &str) -> bool {
    #[derive(Deserialize)]
    struct Body<'a> {
        #[serde(borrow)]
        detail: &'a serde_json::value::RawValue,
    }
    serde_json::from_str::<Body<'_>>(body).is_ok_and(|b| settles(kind, b.detail.get()))
}

/// What a dependent is told of `parent` given what it is now: ready
/// releases, failed or cancelled fails, pending (retried since it settled)
/// tells nothing.
pub fn wake_input(parent: EntityId, now: EntityStatus) -> Option<Input> {
    let parent = parent.0.as_u128();
    match now {
        EntityStatus::Ready => Some(Input::DependencyReady { parent }),
        EntityStatus::Failed | EntityStatus::Cancelled => Some(Input::DependencyFailed {
            parent,
            status: now,
        }),
        EntityStatus::Pending => None,
    }
}

/// The `dependencies` row a visit leaves behind for removal: once a
/// dependent was told that its parent settled, it never waits for that
/// parent again (a retry sees it ready at once, or is refused), so the row
/// goes even if the dependent had stopped waiting for other reasons.
pub fn visited(parent: EntityId, dependent: EntityId, now: EntityStatus) -> Option<WaitRow> {
    (now != EntityStatus::Pending).then_some(WaitRow { parent, dependent })
}

/// What one resolver round did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Resolved {
    /// Outbox rows it passed.
    pub rows: usize,
    /// Dependents it visited.
    pub visited: usize,
    /// Dependents it changed (released or failed).
    pub changed: usize,
    /// Dependents whose steps it made runnable.
    pub released: usize,
    /// Its cursor after the round.
    pub last_pos: u64,
    /// More is waiting: call again at once.
    pub more: bool,
    /// A dependent's pipeline is unknown to this node: the round stopped
    /// before the row that names its parent, so that a node that knows the
    /// pipeline tells it (the cursor is shared).
    pub stalled: bool,
}

/// The resolver's plan for one outbox row: how many of the dependents
/// read under its entity to visit now, and whether the row is finished
/// (the cursor may pass it). `read` is what the backend read, at most
/// `budget + 1` dependents.
pub fn plan_visits(read: usize, budget: usize) -> (usize, bool) {
    if read > budget {
        (budget, false)
    } else {
        (read, true)
    }
}

/// Why a dependent cannot be retried now: the first of its dependencies
/// not seen ready whose entity is failed, cancelled or gone (`now` holds
/// what each is now).
pub fn retry_blocker(
    deps: &[DependencyRecord],
    now: &HashMap<EntityId, EntityStatus>,
) -> Option<ReferenceRefusal> {
    deps.iter()
        .filter(|d| d.status != EntityStatus::Ready)
        .find_map(|d| {
            let reason = match now.get(&d.id) {
                None => RefusalReason::NotFound,
                Some(s @ (EntityStatus::Failed | EntityStatus::Cancelled)) => {
                    RefusalReason::Settled(*s)
                }
                Some(_) => return None,
            };
            Some(ReferenceRefusal {
                field: d.field.clone(),
                type_name: d.type_name.clone(),
                id: d.id,
                reason,
            })
        })
}

impl Decider {
    /// Tells a dependent what `parent` is now (`None`: gone, which never
    /// happens to a stored entity and counts as pending). True when it
    /// changed the dependent; a dependent that does not await `parent`
    /// (any more) is left as it is.
    pub fn wake<X>(
        &self,
        w: &mut Working<X>,
        parent: EntityId,
        now: Option<EntityStatus>,
        now_us: UnixMicros,
    ) -> bool {
        let Some(input) = now.and_then(|status| wake_input(parent, status)) else {
            return false;
        };
        self.apply_input(w, input, now_us).is_ok()
    }

    /// An operator retry of an entity that may depend on others: refused
    /// while one it has not seen ready is failed, cancelled or gone (`now`
    /// holds what each of them is now); otherwise retried, and told at once
    /// of those ready by now. Those still pending are awaited again.
    pub fn retry_checked<X>(
        &self,
        w: &mut Working<X>,
        now: &HashMap<EntityId, EntityStatus>,
        now_us: UnixMicros,
    ) -> Result<Option<CommandOutcome>> {
        // A pruned payload cannot feed the steps again
        // (`Decider::command` refuses the retry).
        if w.record().payload_pruned_at_us.is_some() {
            if let Some(status) = self.command(w, Input::Retry, now_us)? {
                return Ok(Some(w.refusal(status)));
            }
        }
        // A compensation is retried or waited for whatever the references
        // say: it undoes, and needs nothing of them.
        match w.compensation() {
            Some(ripen_core::Compensation::Running) => {
                return Ok(Some(CommandOutcome::Compensating(w.state().status)));
            }
            Some(ripen_core::Compensation::Failed) => {
                return Ok(self
                    .command(w, Input::Retry, now_us)?
                    .map(CommandOutcome::Conflict));
            }
            Some(ripen_core::Compensation::Done) | None => {}
        }
        if w.state().status != EntityStatus::Failed {
            return Ok(Some(CommandOutcome::Conflict(w.state().status)));
        }
        if let Some(blocker) = retry_blocker(&w.record().deps, now) {
            return Ok(Some(CommandOutcome::DependencyNotReady(blocker)));
        }
        if let Some(status) = self.command(w, Input::Retry, now_us)? {
            return Ok(Some(CommandOutcome::Conflict(status)));
        }
        let mut told: Vec<EntityId> = Vec::new();
        for d in w.record().deps.clone() {
            if d.status == EntityStatus::Ready || told.contains(&d.id) {
                continue;
            }
            told.push(d.id);
            if now.get(&d.id) == Some(&EntityStatus::Ready) {
                let parent = d.id.0.as_u128();
                match self.apply_input(w, Input::DependencyReady { parent }, now_us) {
                    Ok(()) | Err(Refusal::NotAwaited) => {}
                    Err(r) => {
                        return Err(StoreError::Internal(format!(
                            "entity {}: a retried entity refused news of {}: {r}",
                            w.id(),
                            d.id
                        )))
                    }
                }
            }
        }
        Ok(None)
    }
}

#[cfg(test)]
mod tests;
