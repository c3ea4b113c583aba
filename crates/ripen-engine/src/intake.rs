//! Synchronous intake: validate, guard the idempotency key while in flight,
//! and commit through the store (which groups concurrent commits).

use std::collections::HashSet;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use ripen_store::{EntityId, IntakeOutcome, NewEntity, Store, StoreError};
use tokio::sync::Notify;

use crate::blobs::Payloads;
use crate::limits::{JsonLimit, JsonLimits};
use crate::registry::Registry;
use crate::schema::{self, PayloadError, Violation};
use crate::time::Clock;
use crate::validation::{PoolRefusal, ValidationPool};

/// The longest idempotency key accepted.
pub const IDEMPOTENCY_KEY_LEN_MAX: usize = 255;

#[derive(Debug, thiserror::Error)]
pub enum SubmitError {
    #[error("unknown entity type {0:?}")]
    UnknownType(String),
    #[error("{0}")]
    Malformed(String),
    /// Past one of intake's JSON limits, named by `limit`.
    #[error("{message}")]
    JsonLimit { limit: JsonLimit, message: String },
    #[error("the payload does not satisfy the schema of its type")]
    Invalid(Vec<Violation>),
    /// Validating the payload cost more than intake spends on one.
    #[error("{0}")]
    TooCostly(String),
    /// Intake has no room for the submission now; the caller may retry.
    #[error("{0}")]
    Overloaded(String),
    #[error("the idempotency key must be 1 to {IDEMPOTENCY_KEY_LEN_MAX} visible ASCII characters")]
    BadKey,
    #[error("a request with this idempotency key is still being processed")]
    KeyInFlight,
    /// A reference field does not name an entity id.
    #[error(transparent)]
    BadReference(#[from] crate::deps::BadReference),
    /// A referenced entity is missing, of another type, failed or
    /// cancelled, or has too many dependents waiting.
    #[error("{0}")]
    ReferenceRefused(ripen_store::deps::ReferenceRefusal),
    /// The blob store did not take a large payload: nothing was stored.
    #[error("the blob store did not take the payload: {0}")]
    BlobStore(ripen_blobs::BlobError),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Submissions in flight at once from which intake counts as busy.
pub const INTAKE_BUSY_IN_FLIGHT: usize = 4;
/// How long intake still counts as busy after it last was. Between two
/// waves of a burst the count dips for a moment; without this, the
/// scheduler took those moments to claim hundreds of steps at once, and
/// the submissions behind that commit waited 80–100 ms.
pub const INTAKE_BUSY_LINGER_MS: u64 = 100;

/// How many submissions are being accepted right now. The scheduler reads it
/// to give intake the machine while a burst of submissions lasts.
///
/// Only a node on the embedded store puts intake first. On a shared store
/// every claim is a database round trip, so holding results back from
/// claiming what they unblock costs the pipelines far more than it gives
/// intake (W5 on PostgreSQL fell from 925 to 532 entities/s), and other
/// nodes share the pipeline work anyway.
#[derive(Debug)]
pub struct IntakeLoad {
    in_flight: std::sync::atomic::AtomicUsize,
    first: bool,
    /// Milliseconds since `since` when intake was last seen busy, plus one
    /// (0: never).
    busy_at_ms: std::sync::atomic::AtomicU64,
    since: std::time::Instant,
}

impl Default for IntakeLoad {
    fn default() -> IntakeLoad {
        IntakeLoad::new(false)
    }
}

impl IntakeLoad {
    /// A counter whose [`IntakeLoad::busy`] holds pipeline work back only if
    /// `intake_first`.
    pub fn new(intake_first: bool) -> IntakeLoad {
        IntakeLoad {
            in_flight: Default::default(),
            first: intake_first,
            busy_at_ms: Default::default(),
            since: std::time::Instant::now(),
        }
    }

    /// Whether enough submissions are in flight that pipeline work should
    /// wait: see [`INTAKE_BUSY_IN_FLIGHT`].
    pub fn busy(&self) -> bool {
        use std::sync::atomic::Ordering::Relaxed;
        if !self.first {
            return false;
        }
        let now_ms = self.since.elapsed().as_millis() as u64 + 1;
        if self.in_flight.load(Relaxed) >= INTAKE_BUSY_IN_FLIGHT {
            self.busy_at_ms.store(now_ms, Relaxed);
            return true;
        }
        let at = self.busy_at_ms.load(Relaxed);
        at != 0 && now_ms.saturating_sub(at) < INTAKE_BUSY_LINGER_MS
    }

    fn enter(&self) -> Entered<'_> {
        self.in_flight
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        // Seen busy now, so that a burst counts even if nobody asks while
        // it peaks.
        let _ = self.busy();
        Entered(self)
    }
}

/// One submission in flight; counted until dropped.
struct Entered<'a>(&'a IntakeLoad);

impl Drop for Entered<'_> {
    fn drop(&mut self) {
        self.0
            .in_flight
            .fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
    }
}

/// The intake side of the engine. Cheap to clone.
#[derive(Clone)]
pub struct Intake {
    load: Arc<IntakeLoad>,
    store: Arc<dyn Store>,
    /// The type versions new entities are validated against.
    registry: Arc<Registry>,
    in_flight: Arc<Mutex<HashSet<(String, String, String)>>>,
    wake_scheduler: Arc<Notify>,
    clock: Arc<dyn Clock>,
    /// Where costly validations run.
    pool: Arc<ValidationPool>,
    json_limits: JsonLimits,
    /// Where large payloads are written before their commit.
    payloads: Payloads,
}

/// Removes a key from the in-flight set when its request ends, however it ends.
struct InFlight<'a> {
    set: &'a Mutex<HashSet<(String, String, String)>>,
    key: Option<(String, String, String)>,
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        if let Some(key) = self.key.take() {
            self.set
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .remove(&key);
        }
    }
}

impl Intake {
    pub fn new(
        store: Arc<dyn Store>,
        registry: Arc<Registry>,
        wake_scheduler: Arc<Notify>,
        clock: Arc<dyn Clock>,
        load: Arc<IntakeLoad>,
        limits: &crate::limits::Limits,
        payloads: Payloads,
    ) -> Intake {
        Intake {
            load,
            store,
            registry,
            in_flight: Arc::default(),
            wake_scheduler,
            clock,
            pool: Arc::new(ValidationPool::start(
                limits.validation_threads,
                limits.validation_queue_max,
                limits.validation_timeout,
            )),
            json_limits: limits.json,
            payloads,
        }
    }

    /// Validates and durably stores one submission.
    pub async fn submit(
        &self,
        tenant: &str,
        type_name: &str,
        body: Bytes,
        idempotency_key: Option<&str>,
    ) -> Result<IntakeOutcome, SubmitError> {
        let _entered = self.load.enter();
        // New entities are pinned to the type's latest version.
        let entry = self
            .registry
            .latest(type_name)
            .ok_or_else(|| SubmitError::UnknownType(type_name.to_owned()))?;
        if let Some(key) = idempotency_key {
            let visible = key.bytes().all(|b| (0x21..=0x7e).contains(&b));
            if key.is_empty() || key.len() > IDEMPOTENCY_KEY_LEN_MAX || !visible {
                return Err(SubmitError::BadKey);
            }
        }
        let validated = if ValidationPool::wants(entry.schema.as_deref(), body.len()) {
            self.pool
                .validate(
                    (type_name, entry.version),
                    body.clone(),
                    entry.schema.clone(),
                    self.json_limits,
                )
                .await
                .map_err(|r| match r {
                    PoolRefusal::Overloaded(m) => SubmitError::Overloaded(m),
                    PoolRefusal::TooCostly(m) => SubmitError::TooCostly(m),
                })?
        } else {
            schema::validate(&body, entry.schema.as_deref(), &self.json_limits)
        };
        validated.map_err(|e| match e {
            PayloadError::Malformed(m) => SubmitError::Malformed(m),
            PayloadError::Limit { limit, message } => SubmitError::JsonLimit { limit, message },
            PayloadError::Invalid(v) => SubmitError::Invalid(v),
            PayloadError::TooCostly(m) => SubmitError::TooCostly(m),
        })?;
        let raw = std::str::from_utf8(&body)
            .map_err(|_| SubmitError::Malformed("the body is not UTF-8".into()))?;
        let refs = crate::deps::references(&entry.references, raw)?;
        let _guard = match idempotency_key {
            None => None,
            Some(key) => {
                let k = (tenant.to_owned(), type_name.to_owned(), key.to_owned());
                let mut set = self.in_flight.lock().unwrap_or_else(|p| p.into_inner());
                if !set.insert(k.clone()) {
                    return Err(SubmitError::KeyInFlight);
                }
                Some(InFlight {
                    set: &self.in_flight,
                    key: Some(k),
                })
            }
        };
        let id = EntityId::new_v7();
        // A large payload is in the blob store, synced, before its entity
        // is committed: an acknowledged entity always has its blob.
        let payload = self
            .payloads
            .keep(id, body)
            .await
            .map_err(SubmitError::BlobStore)?;
        let entity = NewEntity {
            id,
            tenant: tenant.to_owned(),
            type_name: type_name.to_owned(),
            version: entry.version,
            payload,
            idempotency_key: idempotency_key.map(str::to_owned),
            refs,
        };
        let stored = crate::blobs::is_blob(&entity.payload).then(|| entity.payload.clone());
        let outcome = self.store.create(entity, self.clock.now_us()).await?;
        if let (Some(stored), false) = (&stored, matches!(outcome, IntakeOutcome::Created(_))) {
            self.payloads.discard(stored, id).await;
        }
        if let IntakeOutcome::ReferenceRefused(refusal) = outcome {
            return Err(SubmitError::ReferenceRefused(refusal));
        }
        if matches!(outcome, IntakeOutcome::Created(_)) {
            self.wake_scheduler.notify_one();
        }
        Ok(outcome)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn intake_is_busy_from_four_submissions_and_for_a_while_after() {
        let load = IntakeLoad::new(true);
        assert!(!load.busy(), "nothing in flight");
        let first: Vec<Entered<'_>> = (0..INTAKE_BUSY_IN_FLIGHT - 1)
            .map(|_| load.enter())
            .collect();
        assert!(!load.busy(), "three in flight is not a burst");
        let fourth = load.enter();
        assert!(load.busy());
        drop((first, fourth));
        assert!(load.busy(), "a dip between waves still counts as the burst");
        std::thread::sleep(std::time::Duration::from_millis(INTAKE_BUSY_LINGER_MS + 20));
        assert!(!load.busy(), "the burst ended");
    }

    #[test]
    fn a_shared_store_never_holds_the_pipelines_back() {
        let load = IntakeLoad::new(false);
        let entered: Vec<Entered<'_>> = (0..10).map(|_| load.enter()).collect();
        assert!(!load.busy());
        drop(entered);
    }
}
