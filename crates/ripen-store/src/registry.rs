//! The type registry as the store keeps it, and what the store decides about
//! entities whose pipeline cannot run.
//!
//! Every version of every entity type is a [`TypeVersion`] row: its
//! definition (schema, steps, references) as canonical JSON and the digest
//! of that text, written by the engine, which alone reads definitions.
//! [`decide`] is how a registration resolves against the latest version, the
//! same on every backend.
//!
//! The pipelines a store decides with are a [`Pipelines`] handle, shared with
//! the engine, which replaces its contents whenever it reads the registry.
//! An entity whose version the handle cannot run ([`resolve`] says why) is
//! left alone by claims and reported as a miss; the engine reads the
//! registry again and, if the version still cannot run, asks the store to
//! fail it: [`abandon`] turns it into `failed` rows with the cause in its
//! history and in each skipped step's `last_error`.
//!
//! Architecture note: [`abandon`] is the one change to an entity that does
//! not go through `ripen_core::apply`, because the core needs the pipeline
//! that is missing. It keeps the lifecycles (`pending -> failed`, live steps
//! `-> skipped`) and writes history and outbox rows as the core's changes do.

use std::collections::{BTreeMap, HashSet};
use std::sync::{Arc, Mutex, PoisonError, RwLock};

use ripen_core::{Catalog, EntityStatus, Pipeline, StepStatus, UnixMicros};
use serde_json::json;

use crate::history::HistoryEvent;
use crate::working::{EntityRow, EventRow, Rows, StepRow, Stored};
use crate::{EntityId, EntityRecord};

/// The history event that says why an entity failed without its steps
/// having run to the end.
pub const UNRUNNABLE_EVENT: &str = "unrunnable";

/// The most missed entities kept between two passes of the engine; more are
/// met again by later claims.
pub const MISSED_MAX: usize = 10_000;

/// How many missing type versions a node remembers having logged.
const LOGGED_MAX: usize = 1_024;

/// One registered version of an entity type.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TypeVersion {
    pub type_name: String,
    pub version: u32,
    /// The definition as canonical JSON, as the engine wrote it.
    pub definition: String,
    /// The digest of `definition`: the same content has the same digest.
    pub digest: String,
    pub created_at_us: UnixMicros,
    /// Registered although the compatibility check refused it.
    pub forced: bool,
    /// What the check reported when the version was forced, as a JSON
    /// array of `{pointer, rule, message}`; `[]` otherwise.
    pub incompatibilities: String,
}

/// A version to register.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NewTypeVersion {
    pub type_name: String,
    pub definition: String,
    pub digest: String,
    pub forced: bool,
    pub incompatibilities: String,
    /// The latest version the caller checked it against; `None` when the
    /// type had no version.
    pub after: Option<u32>,
    /// The number to register it under; `None` takes the one after `after`.
    pub version: Option<u32>,
}

/// What a registration did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Registered {
    /// A new version was written.
    Created(TypeVersion),
    /// The latest version has this content already; nothing was written.
    Unchanged(TypeVersion),
    /// The latest version is no longer the one the caller checked against:
    /// check against this one (`None`: the type has none) and try again.
    Moved(Option<TypeVersion>),
    /// The number asked for is not above the latest version's.
    Taken { latest: u32 },
}

/// A sealed value to write again under the current master key, if its row
/// still holds `was` ([`crate::Store::reseal`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Reseal {
    /// A subscription's signing secret.
    Secret {
        subscription_id: String,
        was: Vec<u8>,
        now: Vec<u8>,
    },
    /// The stored definition of a type version, with its connector
    /// passwords.
    Definition {
        type_name: String,
        version: u32,
        was: String,
        now: String,
    },
}

/// A type in the registry: its latest version and how many it has.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TypeHead {
    pub type_name: String,
    pub latest_version: u32,
    pub versions: u32,
}

/// How a registration resolves against the latest stored version.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Decision {
    /// Write the version under this number.
    Insert(u32),
    Unchanged,
    Moved,
    Taken {
        latest: u32,
    },
}

/// Decides a registration given the latest stored version of its type:
/// the same digest as the latest is no change; a latest that is not the
/// one the caller checked is a move; otherwise the version goes after it
/// (under the number asked for, if that is higher).
pub fn decide(latest: Option<&TypeVersion>, new: &NewTypeVersion) -> Decision {
    if latest.is_some_and(|l| l.digest == new.digest) {
        return Decision::Unchanged;
    }
    let latest_number = latest.map(|l| l.version);
    if latest_number != new.after {
        return Decision::Moved;
    }
    let next = latest_number.map_or(1, |n| n.saturating_add(1));
    match new.version {
        None => Decision::Insert(next),
        Some(n) if n >= next => Decision::Insert(n),
        Some(_) => Decision::Taken {
            latest: latest_number.unwrap_or(0),
        },
    }
}

/// The row a [`Decision::Insert`] writes.
pub fn inserted(new: &NewTypeVersion, version: u32, now_us: UnixMicros) -> TypeVersion {
    TypeVersion {
        type_name: new.type_name.clone(),
        version,
        definition: new.definition.clone(),
        digest: new.digest.clone(),
        created_at_us: now_us,
        forced: new.forced,
        incompatibilities: new.incompatibilities.clone(),
    }
}

/// The heads of the types of `versions`, which are sorted by type and
/// version.
pub fn heads(versions: &[TypeVersion]) -> Vec<TypeHead> {
    let mut out: Vec<TypeHead> = Vec::new();
    for v in versions {
        match out.last_mut() {
            Some(h) if h.type_name == v.type_name => {
                h.latest_version = h.latest_version.max(v.version);
                h.versions += 1;
            }
            _ => out.push(TypeHead {
                type_name: v.type_name.clone(),
                latest_version: v.version,
                versions: 1,
            }),
        }
    }
    out
}

// ---------------------------------------------------------------------------
// The pipelines a store decides with

/// What a node can run: a pipeline per type version, and the versions whose
/// stored definition does not build, with why.
#[derive(Clone, Debug, Default)]
pub struct Known {
    pub catalog: Catalog,
    /// `(type, version)` → why its definition cannot be rebuilt.
    pub broken: BTreeMap<(String, u32), String>,
}

/// The pipelines of a node, shared by its store and its engine. The engine
/// replaces them when it reads the registry; the store reads them at each
/// decision and reports the entities it cannot run.
#[derive(Clone, Debug, Default)]
pub struct Pipelines(Arc<Inner>);

#[derive(Debug, Default)]
struct Inner {
    known: RwLock<Arc<Known>>,
    missed: Mutex<Missed>,
    heard: tokio::sync::Notify,
}

#[derive(Debug, Default)]
struct Missed {
    entities: BTreeMap<EntityId, (String, u32)>,
    /// Versions already logged, so that a version is logged once per node
    /// (bounded: past [`LOGGED_MAX`] versions the set starts afresh).
    logged: HashSet<(String, u32)>,
}

impl From<Arc<Catalog>> for Pipelines {
    fn from(catalog: Arc<Catalog>) -> Pipelines {
        Pipelines::new(Known {
            catalog: Catalog::clone(&catalog),
            broken: BTreeMap::new(),
        })
    }
}

impl Pipelines {
    pub fn new(known: Known) -> Pipelines {
        let p = Pipelines::default();
        p.replace(known);
        p
    }

    /// What the node can run now.
    pub fn known(&self) -> Arc<Known> {
        self.0
            .known
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// The pipeline of a type version, if the node can run it.
    pub fn get(&self, type_name: &str, version: u32) -> Option<Arc<Pipeline>> {
        self.known().catalog.get(type_name, version).cloned()
    }

    pub fn replace(&self, known: Known) {
        *self.0.known.write().unwrap_or_else(PoisonError::into_inner) = Arc::new(known);
    }

    /// Reports an entity whose pipeline this node cannot run; see
    /// [`Pipelines::take_missed`].
    pub fn miss(&self, record: &EntityRecord, why: &Unrunnable) {
        let key = (record.type_name.clone(), record.version);
        {
            let mut m = self.0.missed.lock().unwrap_or_else(PoisonError::into_inner);
            if m.logged.len() >= LOGGED_MAX {
                m.logged.clear();
            }
            if m.logged.insert(key.clone()) {
                tracing::info!(entity = %record.id, error = %why, "an entity's pipeline cannot run here; asking the registry");
            }
            if m.entities.len() < MISSED_MAX {
                m.entities.insert(record.id, key);
            }
        }
        self.0.heard.notify_one();
    }

    /// The entities missed since the last call, with their type and version.
    pub fn take_missed(&self) -> Vec<(EntityId, String, u32)> {
        let mut m = self.0.missed.lock().unwrap_or_else(PoisonError::into_inner);
        std::mem::take(&mut m.entities)
            .into_iter()
            .map(|(id, (t, v))| (id, t, v))
            .collect()
    }

    /// Waits until an entity is missed.
    pub async fn missed(&self) {
        self.0.heard.notified().await;
    }
}

/// Why a stored entity cannot run on this node.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Unrunnable {
    #[error("type {type_name:?} version {version} is not in the type registry, so its pipeline cannot run; submit the entity again to run it on the type's latest version")]
    NotRegistered { type_name: String, version: u32 },
    #[error(
        "the stored definition of type {type_name:?} version {version} cannot be rebuilt: {why}"
    )]
    Broken {
        type_name: String,
        version: u32,
        why: String,
    },
    #[error("the entity's steps ({}) do not match the steps of type {type_name:?} version {version} ({}); the version's steps changed after the entity was pinned to it", stored.join(", "), pipeline.join(", "))]
    StepsDiffer {
        type_name: String,
        version: u32,
        stored: Vec<String>,
        pipeline: Vec<String>,
    },
}

/// The pipeline a stored entity was pinned to, checked against its steps;
/// or why it cannot run.
pub fn resolve(known: &Known, record: &EntityRecord) -> Result<Arc<Pipeline>, Unrunnable> {
    let Some(pipeline) = known.catalog.get(&record.type_name, record.version) else {
        let (type_name, version) = (record.type_name.clone(), record.version);
        return Err(match known.broken.get(&(type_name.clone(), version)) {
            Some(why) => Unrunnable::Broken {
                type_name,
                version,
                why: why.clone(),
            },
            None => Unrunnable::NotRegistered { type_name, version },
        });
    };
    let matches = pipeline.len() == record.steps.len()
        && pipeline
            .steps()
            .iter()
            .zip(&record.steps)
            .all(|(spec, s)| spec.name == s.name);
    if !matches {
        return Err(Unrunnable::StepsDiffer {
            type_name: record.type_name.clone(),
            version: record.version,
            stored: record.steps.iter().map(|s| s.name.clone()).collect(),
            pipeline: pipeline.steps().iter().map(|s| s.name.clone()).collect(),
        });
    }
    Ok(pipeline.clone())
}

/// The rows that fail a pending entity that cannot run, and the entity as
/// they leave it: an `unrunnable` event with the cause, each live step
/// `skipped` with the cause as its `last_error`, then the status change to
/// `failed` (with its outbox row). A `ready` entity whose non-critical
/// steps were still live keeps its status: those steps are skipped and it
/// becomes degraded (with its `degraded` event and outbox row), as when a
/// non-critical step fails for good. `None` when nothing of the entity is
/// live.
///
/// The backend writes the rows and drops whatever due times it keeps for
/// the entity: no step of it is due any more.
pub fn abandon<X>(
    stored: &Stored<X>,
    cause: &str,
    now_us: UnixMicros,
) -> Option<(EntityRecord, Rows)> {
    let before = &stored.record;
    let live = before.steps.iter().any(|s| !s.state.status.is_terminal());
    let pending = before.status == EntityStatus::Pending;
    let ready_and_live = before.status == EntityStatus::Ready && live;
    if !(pending || ready_and_live) {
        return None;
    }
    // An entity's history never goes back in time.
    let now_us = now_us.max(before.updated_at_us);
    let mut record = before.clone();
    let mut rows = Rows::default();
    let mut seq = stored.next_seq;
    let mut event = |kind: &str, step: Option<String>, detail: serde_json::Value| {
        let e = HistoryEvent {
            seq,
            at_us: now_us,
            kind: kind.to_owned(),
            step,
            attempt: None,
            detail,
        };
        seq += 1;
        e
    };
    let mut events = vec![event(UNRUNNABLE_EVENT, None, json!({"error": cause}))];
    for (idx, s) in record.steps.iter_mut().enumerate() {
        if s.state.status.is_terminal() {
            continue;
        }
        assert!(s.state.status.may_become(StepStatus::Skipped));
        s.state.status = StepStatus::Skipped;
        s.state.due_at_us = None;
        s.state.holder = None;
        s.state.last_error = Some(cause.to_owned());
        rows.steps.push(StepRow {
            entity_id: record.id,
            idx,
            state: s.state.clone(),
            output: None,
        });
        events.push(event("step_skipped", Some(s.name.clone()), json!({})));
    }
    let first_skipped = rows.steps.first().map(|r| record.steps[r.idx].name.clone());
    let notable = if pending {
        assert!(before.status.may_become(EntityStatus::Failed));
        record.status = EntityStatus::Failed;
        Some(event(
            "status_changed",
            None,
            json!({"from": EntityStatus::Pending.as_str(), "to": EntityStatus::Failed.as_str()}),
        ))
    } else if !record.degraded {
        record.degraded = true;
        Some(event(
            "degraded",
            None,
            json!({"degraded": true, "step": first_skipped}),
        ))
    } else {
        None
    };
    record.updated_at_us = now_us;
    // A failed entity awaits nothing any more.
    if pending {
        let waited = crate::deps::awaited_by(EntityStatus::Pending, &record.deps);
        rows.waits_removed
            .extend(waited.into_iter().map(|parent| crate::deps::WaitRow {
                parent,
                dependent: record.id,
            }));
    }
    rows.entities.push(EntityRow {
        id: record.id,
        status: record.status,
        degraded: record.degraded,
        ready_at_us: record.ready_at_us,
        updated_at_us: now_us,
        next_seq: seq,
        deps: crate::deps::encode(&record.deps),
    });
    for e in events {
        let detail = e.detail.to_string();
        rows.events.push(EventRow {
            entity_id: record.id,
            event: e,
            detail,
        });
    }
    if let Some(changed) = notable {
        let detail = changed.detail.to_string();
        rows.notable(&record, changed, detail);
    }
    Some((record, rows))
}

#[cfg(test)]
mod tests;
