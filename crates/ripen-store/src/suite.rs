//! The conformance suite every [`Store`] backend passes.
//!
//! The test bodies are plain `pub async fn`s taking an `Arc<dyn Store>`, so
//! the same code runs against every backend; [`store_test_suite!`] turns
//! them into `#[tokio::test]`s for one backend:
//!
//! ```text
//! async fn make_store(catalog: Arc<Catalog>) -> impl Store {
//!     let dir = tempfile::tempdir().unwrap();
//!     let store = SqliteStore::open(SqliteOptions::new(dir.path().join("ripen.db")), catalog).unwrap();
//!     Guarded { store, guard: dir }
//! }
//! ripen_store::store_test_suite!(make_store);
//! ```
//!
//! `$make` receives [`catalog()`] and must return a fresh, empty store. Time
//! is driven explicitly through `now_us`, starting at [`T0`].

use std::collections::BTreeSet;
use std::sync::Arc;

use async_trait::async_trait;
use ripen_core::{
    Catalog, EntityStatus, Executor, Pipeline, RetryPolicy, StepDef, StepStatus, UnixMicros,
    HTTP_QUEUE,
};
use serde_json::json;

use crate::Heartbeat;
use crate::{
    Attempt, Claim, ClaimBatch, CommandOutcome, CompleteBatch, Completion, CompletionResult,
    EntityData, EntityId, EntityRecord, HistoryEvent, IntakeOutcome, ListQuery, NewEntity, Outcome,
    Result, Store, StoreError, WorkWatcher, DEFAULT_TENANT,
};

/// Generates one `#[tokio::test]` per conformance test, each on a fresh store
/// from `$make`: an async fn or closure taking `Arc<ripen_core::Catalog>` and
/// returning something that implements [`Store`](crate::Store).
#[macro_export]
macro_rules! store_test_suite {
    ($make:expr) => {
        $crate::store_test_suite!(@tests $make;
            create_then_get,
            create_with_unknown_pipeline_fails,
            idempotent_replay_and_key_reuse,
            idempotency_keys_are_scoped_by_type_and_tenant,
            claim_returns_only_runnable_steps_and_respects_limit,
            stale_completion_changes_nothing,
            success_unblocks_dependents_and_claims_them,
            w5_pipeline_runs_to_ready,
            critical_permanent_failure_fails_the_entity,
            non_critical_failure_gives_ready_and_degraded,
            retryable_failure_waits_out_its_backoff,
            expired_lease_is_a_lost_attempt,
            recover_loses_every_running_attempt,
            cancel_transitions_and_conflicts,
            retry_requeues_failed_and_skipped_steps,
            list_filters_newest_first_with_cursor,
            list_filters_by_degraded_creation_time_and_key,
            events_are_numbered_without_gaps,
            tenants_are_isolated,
            get_data_returns_payload_and_outputs,
            concurrent_creates_all_commit,
            ping_succeeds,
            outbox_holds_every_notable_event_in_order,
            history_times_never_go_back,
            claims_are_per_queue,
            degraded_after_ready_is_an_event,
            draining_records_results_without_claiming_more,
            worker_leases_are_held_extended_and_fenced,
            recover_keeps_the_leases_of_remote_workers,
            watchers_hear_which_queue_got_work,
            counts_and_metrics_follow_the_decisions,
            expiring_loses_expired_leases_and_claims_nothing,
            outbox_positions_grow_and_resume,
            fan_out_delivers_what_subscriptions_match,
            deliveries_keep_each_entitys_order,
            deliveries_retry_die_and_are_redelivered,
            claimed_deliveries_come_back_when_their_lease_ends,
            no_subscription_takes_more_than_its_room,
            subscriptions_hear_from_their_creation_on,
            pruning_keeps_the_newest_and_what_is_not_fanned_out,
            change_watchers_hear_commits,
            dependents_wait_then_run_once_their_parent_is_ready,
            references_that_do_not_hold_are_refused,
            a_failed_parent_fails_its_dependents_down_a_chain,
            a_retried_dependent_checks_its_references_again,
            a_cancelled_parent_fails_its_dependents,
            pruning_keeps_what_the_resolver_has_not_read,
            the_dependents_waiting_for_one_entity_are_bounded,
            registry_numbers_versions_and_keeps_them,
            concurrent_registrations_are_serialized,
            live_entities_count_pending_by_version,
            keys_are_stored_found_by_hash_listed_and_revoked,
            sealed_values_are_written_again_only_where_unchanged,
            tenants_never_see_each_other_in_random_histories,
            payloads_are_pruned_when_settled_and_due,
            a_live_step_keeps_its_payload,
            keys_expire_at_their_time_and_are_free_after,
            stats_count_tables_and_the_oldest_kept_payload,
            settled_entities_are_deleted_when_due,
            payloads_kept_names_what_keeps_its_payload,
        );
    };
    (@tests $make:expr; $($test:ident),* $(,)?) => {
        $(
            #[::tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $test() {
                let store = ($make)($crate::suite::catalog()).await;
                $crate::suite::$test(::std::sync::Arc::new(store)).await;
            }
        )*
    };
}

mod deps;
mod notify;
pub use deps::*;
mod keys;
mod registry;
mod retention;
mod tenants;
pub use keys::*;
pub use notify::*;
pub use registry::*;
pub use retention::*;
pub use tenants::*;

/// The start of time in every test.
pub const T0: UnixMicros = 1_700_000_000_000_000;
pub const SECOND_US: i64 = 1_000_000;
/// The step timeout of every pipeline of [`catalog()`].
pub const TIMEOUT_MS: u64 = 1_000;
const TENANT: &str = DEFAULT_TENANT;
const OTHER_TENANT: &str = "other";
const BODY: &str = r#"{"name": "Zoë & Co",  "n": [1, 2.50]}"#;

/// The pipelines the suite uses:
/// - `w5`: `a`; `b`, `c` after `a`; `d` after `b`, `c`; `e` non-critical after
///   `a`. 3 attempts, backoff 1 s to 4 s.
/// - `single`: one step `only`, 3 attempts without backoff, so that a failed
///   or lost attempt is due again at once (deterministic despite jitter).
/// - `backoff`: one step `only`, 3 attempts, backoff ceiling 1 s; the tests
///   pass `retry_after_ms` to pin the delay.
/// - `mixed`: `fetch` over HTTP; `score` after it, run by remote workers of
///   queue `scoring`; `publish` over HTTP after `score`. No backoff.
pub fn catalog() -> Arc<Catalog> {
    fn step(name: &str, needs: &[&str], critical: bool, retry: RetryPolicy) -> StepDef {
        StepDef {
            name: name.into(),
            needs: needs.iter().map(|n| n.to_string()).collect(),
            critical,
            timeout_ms: TIMEOUT_MS,
            retry,
            executor: Executor::Http {
                url: format!("http://127.0.0.1:9/{name}"),
            },
            compensate: None,
        }
    }
    let w5_retry = RetryPolicy {
        max_attempts: 3,
        initial_backoff_ms: 1_000,
        max_backoff_ms: 4_000,
    };
    let no_backoff = RetryPolicy {
        max_attempts: 3,
        initial_backoff_ms: 0,
        max_backoff_ms: 0,
    };
    let short_backoff = RetryPolicy {
        max_attempts: 3,
        initial_backoff_ms: 1_000,
        max_backoff_ms: 1_000,
    };
    let mut catalog = Catalog::default();
    let w5 = Pipeline::new(vec![
        step("a", &[], true, w5_retry),
        step("b", &["a"], true, w5_retry),
        step("c", &["a"], true, w5_retry),
        step("d", &["b", "c"], true, w5_retry),
        step("e", &["a"], false, w5_retry),
    ])
    .expect("w5 is a valid pipeline");
    catalog.insert("w5", 1, w5);
    let single = Pipeline::new(vec![step("only", &[], true, no_backoff)]).expect("valid");
    catalog.insert("single", 1, single);
    let backoff = Pipeline::new(vec![step("only", &[], true, short_backoff)]).expect("valid");
    catalog.insert("backoff", 1, backoff);
    let worker = |name: &str, needs: &[&str]| StepDef {
        executor: Executor::Worker {
            queue: "scoring".into(),
        },
        ..step(name, needs, true, no_backoff)
    };
    let mixed = Pipeline::new(vec![
        step("fetch", &[], true, no_backoff),
        worker("score", &["fetch"]),
        step("publish", &["score"], true, no_backoff),
    ])
    .expect("valid");
    catalog.insert("mixed", 1, mixed);
    Arc::new(catalog)
}

/// A store that keeps `guard` (a temp dir, a scratch database) alive as long
/// as the store, for test harnesses.
pub struct Guarded<S, G> {
    pub store: S,
    pub guard: G,
}

#[async_trait]
impl<S: Store, G: Send + Sync + 'static> Store for Guarded<S, G> {
    async fn create(&self, entity: NewEntity, now_us: UnixMicros) -> Result<IntakeOutcome> {
        self.store.create(entity, now_us).await
    }
    async fn claim_due(&self, claim: Claim<'_>, now_us: UnixMicros) -> Result<ClaimBatch> {
        self.store.claim_due(claim, now_us).await
    }
    async fn heartbeat(
        &self,
        beats: Vec<Heartbeat>,
        now_us: UnixMicros,
    ) -> Result<Vec<Option<UnixMicros>>> {
        self.store.heartbeat(beats, now_us).await
    }
    async fn complete(
        &self,
        completions: Vec<Completion>,
        claim_queue: Option<&str>,
        now_us: UnixMicros,
    ) -> Result<CompleteBatch> {
        self.store.complete(completions, claim_queue, now_us).await
    }
    async fn recover(&self, now_us: UnixMicros) -> Result<u64> {
        self.store.recover(now_us).await
    }
    async fn cancel(
        &self,
        tenant: &str,
        id: EntityId,
        now_us: UnixMicros,
    ) -> Result<CommandOutcome> {
        self.store.cancel(tenant, id, now_us).await
    }
    async fn retry(
        &self,
        tenant: &str,
        id: EntityId,
        now_us: UnixMicros,
    ) -> Result<CommandOutcome> {
        self.store.retry(tenant, id, now_us).await
    }
    async fn get(&self, tenant: &str, id: EntityId) -> Result<Option<EntityRecord>> {
        self.store.get(tenant, id).await
    }
    async fn get_data(&self, tenant: &str, id: EntityId) -> Result<Option<EntityData>> {
        self.store.get_data(tenant, id).await
    }
    async fn list(&self, tenant: &str, query: ListQuery) -> Result<Vec<EntityRecord>> {
        self.store.list(tenant, query).await
    }
    async fn events(
        &self,
        tenant: &str,
        id: EntityId,
        after_seq: u64,
        limit: u32,
    ) -> Result<Option<Vec<HistoryEvent>>> {
        self.store.events(tenant, id, after_seq, limit).await
    }
    async fn outbox(&self, after_id: u64, limit: u32) -> Result<Vec<crate::OutboxEntry>> {
        self.store.outbox(after_id, limit).await
    }
    async fn ping(&self) -> Result<()> {
        self.store.ping().await
    }
    async fn outbox_head(&self) -> Result<u64> {
        self.store.outbox_head().await
    }
    async fn resolve_dependencies(&self, now_us: UnixMicros) -> Result<crate::deps::Resolved> {
        self.store.resolve_dependencies(now_us).await
    }
    async fn fan_out(&self, limit: u32, now_us: UnixMicros) -> Result<crate::FanOut> {
        self.store.fan_out(limit, now_us).await
    }
    async fn prune(&self, prune: crate::Prune, now_us: UnixMicros) -> Result<crate::Pruned> {
        self.store.prune(prune, now_us).await
    }
    async fn stats(&self) -> Result<crate::StoreStats> {
        self.store.stats().await
    }
    async fn payloads_kept(&self, ids: Vec<EntityId>) -> Result<Vec<EntityId>> {
        self.store.payloads_kept(ids).await
    }
    async fn prune_outbox(&self, before_us: UnixMicros, limit: u32) -> Result<u64> {
        self.store.prune_outbox(before_us, limit).await
    }
    async fn put_subscription(&self, sub: crate::Subscription) -> Result<crate::Subscription> {
        self.store.put_subscription(sub).await
    }
    async fn subscriptions(
        &self,
        tenant: Option<&str>,
    ) -> Result<Vec<(crate::Subscription, crate::DeliveryCounts)>> {
        self.store.subscriptions(tenant).await
    }
    async fn subscription_list(&self) -> Result<Vec<crate::Subscription>> {
        self.store.subscription_list().await
    }
    async fn delete_subscription(&self, tenant: &str, id: &str) -> Result<bool> {
        self.store.delete_subscription(tenant, id).await
    }
    async fn claim_deliveries(
        &self,
        claim: crate::DeliveryClaim,
        now_us: UnixMicros,
    ) -> Result<Vec<crate::Delivery>> {
        self.store.claim_deliveries(claim, now_us).await
    }
    async fn finish_deliveries(
        &self,
        results: Vec<crate::DeliveryResult>,
        now_us: UnixMicros,
    ) -> Result<()> {
        self.store.finish_deliveries(results, now_us).await
    }
    async fn deliveries(
        &self,
        subscription_id: &str,
        query: crate::DeliveryQuery,
    ) -> Result<Vec<crate::Delivery>> {
        self.store.deliveries(subscription_id, query).await
    }
    async fn redeliver(
        &self,
        tenant: &str,
        delivery_id: u64,
        now_us: UnixMicros,
    ) -> Result<crate::RedeliverOutcome> {
        self.store.redeliver(tenant, delivery_id, now_us).await
    }
    async fn clock_us(&self) -> Result<UnixMicros> {
        self.store.clock_us().await
    }
    fn stale_completions(&self) -> u64 {
        self.store.stale_completions()
    }
    async fn counts(&self, now_us: UnixMicros) -> Result<crate::Counts> {
        self.store.counts(now_us).await
    }
    async fn register_type(
        &self,
        version: crate::NewTypeVersion,
        now_us: UnixMicros,
    ) -> Result<crate::Registered> {
        self.store.register_type(version, now_us).await
    }
    async fn type_heads(&self) -> Result<Vec<crate::TypeHead>> {
        self.store.type_heads().await
    }
    async fn type_versions(&self, type_name: Option<&str>) -> Result<Vec<crate::TypeVersion>> {
        self.store.type_versions(type_name).await
    }
    async fn live_entities(&self, tenant: &str, type_name: &str) -> Result<Vec<(u32, u64)>> {
        self.store.live_entities(tenant, type_name).await
    }
    async fn put_key(&self, key: crate::ApiKey) -> Result<()> {
        self.store.put_key(key).await
    }
    async fn key_by_hash(&self, hash: &str) -> Result<Option<crate::ApiKey>> {
        self.store.key_by_hash(hash).await
    }
    async fn keys(&self, tenant: Option<&str>) -> Result<Vec<crate::ApiKey>> {
        self.store.keys(tenant).await
    }
    async fn revoke_key(
        &self,
        tenant: Option<&str>,
        id: &str,
        now_us: UnixMicros,
    ) -> Result<Option<crate::ApiKey>> {
        self.store.revoke_key(tenant, id, now_us).await
    }
    async fn reseal(&self, values: Vec<crate::Reseal>) -> Result<u64> {
        self.store.reseal(values).await
    }
    async fn any_keys(&self) -> Result<bool> {
        self.store.any_keys().await
    }
    async fn fail_unrunnable(
        &self,
        ids: Vec<EntityId>,
        now_us: UnixMicros,
    ) -> Result<Vec<EntityRecord>> {
        self.store.fail_unrunnable(ids, now_us).await
    }
    fn register_metrics(&self, registry: &prometheus::Registry) -> prometheus::Result<()> {
        self.store.register_metrics(registry)
    }
    fn is_shared(&self) -> bool {
        self.store.is_shared()
    }
    fn watch_work(&self, watcher: WorkWatcher) {
        self.store.watch_work(watcher)
    }
    fn watch_changes(&self, watcher: crate::ChangeWatcher) {
        self.store.watch_changes(watcher)
    }
}

// ---------------------------------------------------------------------------
// Helpers

/// A submission of `type_name` for the default tenant, without a key.
pub fn new_entity(type_name: &str, payload: &str) -> NewEntity {
    NewEntity {
        id: EntityId::new_v7(),
        tenant: TENANT.into(),
        type_name: type_name.into(),
        version: 1,
        payload: payload.into(),
        idempotency_key: None,
        refs: Vec::new(),
    }
}

/// A UUIDv7 id minted at `ms` past [`T0`], so that tests fix the id order.
fn id_at(ms: u64) -> EntityId {
    let unix_ms = (T0 / 1_000) as u64 + ms;
    EntityId(uuid::Builder::from_unix_timestamp_millis(unix_ms, &random_bytes()).into_uuid())
}

fn random_bytes() -> [u8; 10] {
    let mut bytes = [0; 10];
    fastrand::fill(&mut bytes);
    bytes
}

async fn create(store: &dyn Store, entity: NewEntity, now_us: UnixMicros) -> EntityRecord {
    match store.create(entity, now_us).await.expect("create") {
        IntakeOutcome::Created(record) => record,
        other => panic!("expected Created, got {other:?}"),
    }
}

async fn get(store: &dyn Store, id: EntityId) -> EntityRecord {
    store
        .get(TENANT, id)
        .await
        .expect("get")
        .unwrap_or_else(|| panic!("entity {id} not found"))
}

async fn events(store: &dyn Store, id: EntityId) -> Vec<HistoryEvent> {
    store
        .events(TENANT, id, 0, 10_000)
        .await
        .expect("events")
        .unwrap_or_else(|| panic!("entity {id} not found"))
}

async fn claim(store: &dyn Store, now_us: UnixMicros, limit: usize) -> ClaimBatch {
    store
        .claim_due(Claim::local(HTTP_QUEUE, limit), now_us)
        .await
        .expect("claim_due")
}

fn succeeded(output: Option<serde_json::Value>) -> Outcome {
    Outcome::Succeeded {
        output: output.map(|o| o.to_string()),
    }
}

fn failed(error: &str, retryable: bool, retry_after_ms: Option<u64>) -> Outcome {
    Outcome::Failed {
        error: error.into(),
        retryable,
        retry_after_ms,
    }
}

fn completion(attempt: &Attempt, outcome: Outcome) -> Completion {
    Completion {
        entity_id: attempt.entity_id,
        step: attempt.step,
        epoch: attempt.epoch,
        outcome,
    }
}

async fn complete(
    store: &dyn Store,
    completions: Vec<Completion>,
    now_us: UnixMicros,
) -> CompleteBatch {
    store
        .complete(completions, Some(HTTP_QUEUE), now_us)
        .await
        .expect("complete")
}

/// Completes one attempt and asserts that the result was applied.
async fn finish(
    store: &dyn Store,
    attempt: &Attempt,
    outcome: Outcome,
    now_us: UnixMicros,
) -> Vec<Attempt> {
    let batch = complete(store, vec![completion(attempt, outcome)], now_us).await;
    assert_eq!(
        batch.results,
        vec![CompletionResult::Applied],
        "completing {attempt:?}"
    );
    batch.claimed
}

fn step<'a>(record: &'a EntityRecord, name: &str) -> &'a crate::StepRecord {
    record
        .steps
        .iter()
        .find(|s| s.name == name)
        .unwrap_or_else(|| panic!("no step {name} in {record:?}"))
}

fn statuses(record: &EntityRecord) -> Vec<(&str, StepStatus)> {
    record
        .steps
        .iter()
        .map(|s| (s.name.as_str(), s.state.status))
        .collect()
}

fn names(attempts: &[Attempt]) -> BTreeSet<&str> {
    attempts.iter().map(|a| a.step_name.as_str()).collect()
}

fn by_name<'a>(attempts: &'a [Attempt], name: &str) -> &'a Attempt {
    attempts
        .iter()
        .find(|a| a.step_name == name)
        .unwrap_or_else(|| panic!("no attempt of {name} in {attempts:?}"))
}

/// Creates a `w5` entity at `T0` and claims its first step.
async fn w5_with_a_running(store: &dyn Store) -> (EntityRecord, Attempt) {
    let record = create(store, new_entity("w5", BODY), T0).await;
    let batch = claim(store, T0, 10).await;
    assert_eq!(batch.attempts.len(), 1, "{batch:?}");
    let attempt = batch.attempts.into_iter().next().expect("one attempt");
    assert_eq!(attempt.entity_id, record.id);
    (record, attempt)
}

fn kinds(events: &[HistoryEvent]) -> Vec<&str> {
    events.iter().map(|e| e.kind.as_str()).collect()
}

fn status_changes(events: &[HistoryEvent]) -> Vec<(String, String)> {
    events
        .iter()
        .filter(|e| e.kind == "status_changed")
        .map(|e| {
            (
                e.detail["from"].as_str().unwrap_or_default().to_owned(),
                e.detail["to"].as_str().unwrap_or_default().to_owned(),
            )
        })
        .collect()
}

// ---------------------------------------------------------------------------
// The tests

pub async fn create_then_get(store: Arc<dyn Store>) {
    let store = &*store;
    let entity = new_entity("w5", BODY);
    let created = create(store, entity.clone(), T0).await;
    assert_eq!(created.id, entity.id);
    assert_eq!(created.tenant, TENANT);
    assert_eq!(created.type_name, "w5");
    assert_eq!(created.version, 1);
    assert_eq!(created.status, EntityStatus::Pending);
    assert!(!created.degraded);
    assert_eq!(created.created_at_us, T0);
    assert_eq!(created.updated_at_us, T0);
    assert_eq!(created.ready_at_us, None);
    let shape: Vec<(&str, bool)> = created
        .steps
        .iter()
        .map(|s| (s.name.as_str(), s.critical))
        .collect();
    assert_eq!(
        shape,
        vec![
            ("a", true),
            ("b", true),
            ("c", true),
            ("d", true),
            ("e", false)
        ]
    );
    let a = &step(&created, "a").state;
    assert_eq!(
        (a.status, a.attempts, a.epoch, a.due_at_us),
        (StepStatus::Queued, 0, 0, Some(T0))
    );
    for s in &created.steps[1..] {
        assert_eq!(s.state.status, StepStatus::Blocked, "{s:?}");
        assert_eq!(s.state.due_at_us, None);
        assert_eq!(s.state.last_error, None);
    }

    assert_eq!(get(store, entity.id).await, created);
    let data = store
        .get_data(TENANT, entity.id)
        .await
        .expect("get_data")
        .expect("found");
    assert_eq!(data.record, created);
    assert_eq!(
        data.payload.as_deref(),
        Some(BODY),
        "the payload is stored byte for byte"
    );
    assert!(data.outputs.is_empty());

    let history = events(store, entity.id).await;
    assert_eq!(history.len(), 1);
    assert_eq!(history[0].seq, 1);
    assert_eq!(history[0].kind, "created");
    assert_eq!(history[0].at_us, T0);
    assert!(history[0].is_notable());

    assert_eq!(
        store.get(TENANT, EntityId::new_v7()).await.expect("get"),
        None
    );
}

pub async fn create_with_unknown_pipeline_fails(store: Arc<dyn Store>) {
    let store = &*store;
    let unknown_type = new_entity("no-such-type", BODY);
    let err = store
        .create(unknown_type.clone(), T0)
        .await
        .expect_err("unknown type");
    assert!(matches!(err, StoreError::UnknownPipeline { .. }), "{err:?}");
    let mut unknown_version = new_entity("w5", BODY);
    unknown_version.version = 2;
    let err = store
        .create(unknown_version.clone(), T0)
        .await
        .expect_err("unknown version");
    assert!(
        matches!(&err, StoreError::UnknownPipeline { type_name, version: 2 } if type_name == "w5"),
        "{err:?}"
    );
    assert_eq!(store.get(TENANT, unknown_type.id).await.expect("get"), None);
    assert_eq!(
        store.get(TENANT, unknown_version.id).await.expect("get"),
        None
    );
}

pub async fn idempotent_replay_and_key_reuse(store: Arc<dyn Store>) {
    let store = &*store;
    let mut first = new_entity("w5", BODY);
    first.idempotency_key = Some("key-1".into());
    let created = create(store, first.clone(), T0).await;

    let mut again = new_entity("w5", BODY);
    again.idempotency_key = Some("key-1".into());
    match store
        .create(again.clone(), T0 + SECOND_US)
        .await
        .expect("replay")
    {
        IntakeOutcome::Replayed(record) => assert_eq!(record, created),
        other => panic!("expected Replayed, got {other:?}"),
    }
    assert_eq!(
        store.get(TENANT, again.id).await.expect("get"),
        None,
        "a replay creates nothing"
    );

    // Equal JSON written differently is another body: the comparison is byte for byte.
    let mut other_body = new_entity("w5", r#"{"name":"Zoë & Co","n":[1,2.50]}"#);
    other_body.idempotency_key = Some("key-1".into());
    assert_eq!(
        store.create(other_body.clone(), T0).await.expect("reuse"),
        IntakeOutcome::KeyReused {
            entity_id: created.id
        }
    );
    assert_eq!(store.get(TENANT, other_body.id).await.expect("get"), None);

    // A replay after the entity moved on returns the entity as it is now.
    let batch = claim(store, T0 + 2 * SECOND_US, 10).await;
    assert_eq!(batch.attempts.len(), 1);
    let now = get(store, created.id).await;
    assert_ne!(now, created);
    let mut later = new_entity("w5", BODY);
    later.idempotency_key = Some("key-1".into());
    assert_eq!(
        store
            .create(later, T0 + 3 * SECOND_US)
            .await
            .expect("replay"),
        IntakeOutcome::Replayed(now)
    );

    // Without a key, the same body makes a new entity every time.
    let one = create(store, new_entity("w5", BODY), T0).await;
    let two = create(store, new_entity("w5", BODY), T0).await;
    assert_ne!(one.id, two.id);
}

pub async fn idempotency_keys_are_scoped_by_type_and_tenant(store: Arc<dyn Store>) {
    let store = &*store;
    let mut w5 = new_entity("w5", BODY);
    w5.idempotency_key = Some("shared".into());
    let w5 = create(store, w5, T0).await;

    let mut single = new_entity("single", r#"{"other": true}"#);
    single.idempotency_key = Some("shared".into());
    let single = create(store, single, T0).await;
    assert_ne!(single.id, w5.id);

    let mut other_tenant = new_entity("w5", r#"{"other": "tenant"}"#);
    other_tenant.tenant = OTHER_TENANT.into();
    other_tenant.idempotency_key = Some("shared".into());
    let other_tenant = create(store, other_tenant, T0).await;
    assert_ne!(other_tenant.id, w5.id);
    assert_eq!(other_tenant.tenant, OTHER_TENANT);

    // Each scope still replays its own entity.
    let mut replay = new_entity("single", r#"{"other": true}"#);
    replay.idempotency_key = Some("shared".into());
    assert_eq!(
        store.create(replay, T0).await.expect("replay"),
        IntakeOutcome::Replayed(single)
    );
    let mut reuse = new_entity("w5", r#"{"other": "tenant"}"#);
    reuse.idempotency_key = Some("shared".into());
    assert_eq!(
        store.create(reuse, T0).await.expect("reuse"),
        IntakeOutcome::KeyReused { entity_id: w5.id }
    );
}

pub async fn claim_returns_only_runnable_steps_and_respects_limit(store: Arc<dyn Store>) {
    let store = &*store;
    let mut ids = BTreeSet::new();
    for _ in 0..3 {
        ids.insert(create(store, new_entity("w5", BODY), T0).await.id);
    }

    let early = claim(store, T0 - 1, 10).await;
    assert!(
        early.attempts.is_empty(),
        "nothing is due before it was queued: {early:?}"
    );
    assert_eq!(early.next_due_us, Some(T0));

    let first = claim(store, T0, 2).await;
    assert_eq!(first.attempts.len(), 2, "{first:?}");
    let second = claim(store, T0, 10).await;
    assert_eq!(second.attempts.len(), 1, "{second:?}");
    let all: Vec<Attempt> = first.attempts.into_iter().chain(second.attempts).collect();
    let claimed: BTreeSet<EntityId> = all.iter().map(|a| a.entity_id).collect();
    assert_eq!(claimed, ids, "each entity's first step is claimed once");
    for a in &all {
        assert_eq!(
            (a.step, a.step_name.as_str()),
            (0, "a"),
            "only `a` is runnable: {a:?}"
        );
        assert_eq!((a.attempt, a.epoch), (1, 1));
        assert_eq!((a.type_name.as_str(), a.version), ("w5", 1));
        assert!(
            a.lease_expires_at_us >= T0 + TIMEOUT_MS as i64 * 1_000,
            "{a:?}"
        );
        assert_eq!(a.payload, BODY);
        assert!(a.outputs.is_empty());
    }

    let none = claim(store, T0, 10).await;
    assert!(none.attempts.is_empty(), "{none:?}");
    let earliest_lease = all.iter().map(|a| a.lease_expires_at_us).min();
    assert_eq!(
        none.next_due_us, earliest_lease,
        "the next wake-up is the first lease expiry"
    );
    assert!(claim(store, T0, 0).await.attempts.is_empty());

    let a = &all[0];
    let record = get(store, a.entity_id).await;
    assert_eq!(record.status, EntityStatus::Pending);
    assert_eq!(record.updated_at_us, T0);
    let s = &step(&record, "a").state;
    assert_eq!(
        (s.status, s.attempts, s.epoch, s.due_at_us),
        (StepStatus::Running, 1, 1, Some(a.lease_expires_at_us))
    );
    let history = events(store, a.entity_id).await;
    assert_eq!(kinds(&history), vec!["created", "step_started"]);
    assert_eq!(history[1].step.as_deref(), Some("a"));
    assert_eq!(history[1].attempt, Some(1));
}

pub async fn stale_completion_changes_nothing(store: Arc<dyn Store>) {
    let store = &*store;
    let (record, attempt) = w5_with_a_running(store).await;
    let before = get(store, record.id).await;
    let history_before = events(store, record.id).await;

    let wrong_epoch = Completion {
        epoch: attempt.epoch + 1,
        ..completion(&attempt, succeeded(None))
    };
    let not_running = Completion {
        step: 1,
        epoch: 0,
        ..completion(&attempt, succeeded(None))
    };
    let no_such_step = Completion {
        step: 99,
        ..completion(&attempt, succeeded(None))
    };
    let unknown_entity = Completion {
        entity_id: EntityId::new_v7(),
        ..completion(&attempt, succeeded(None))
    };
    let old_epoch_failure = Completion {
        epoch: 0,
        ..completion(&attempt, failed("boom", false, None))
    };
    let batch = complete(
        store,
        vec![
            wrong_epoch,
            not_running,
            no_such_step,
            unknown_entity,
            old_epoch_failure,
        ],
        T0 + 9 * SECOND_US,
    )
    .await;
    assert_eq!(batch.results, vec![CompletionResult::Stale; 5]);
    assert!(batch.claimed.is_empty());
    assert_eq!(
        get(store, record.id).await,
        before,
        "a stale result changes nothing"
    );
    assert_eq!(events(store, record.id).await, history_before);

    // The live epoch applies once; the same result again is stale.
    let right = completion(&attempt, succeeded(Some(json!({"ok": true}))));
    let batch = complete(store, vec![right.clone(), right], T0 + SECOND_US).await;
    assert_eq!(
        batch.results,
        vec![CompletionResult::Applied, CompletionResult::Stale]
    );
    let after = get(store, record.id).await;
    assert_eq!(step(&after, "a").state.status, StepStatus::Succeeded);
    assert_eq!(after.updated_at_us, T0 + SECOND_US);
}

pub async fn success_unblocks_dependents_and_claims_them(store: Arc<dyn Store>) {
    let store = &*store;
    let (record, a) = w5_with_a_running(store).await;
    let claimed = finish(
        store,
        &a,
        succeeded(Some(json!({"kyc": "ok"}))),
        T0 + SECOND_US,
    )
    .await;
    assert_eq!(names(&claimed), BTreeSet::from(["b", "c", "e"]));
    for attempt in &claimed {
        assert_eq!(attempt.entity_id, record.id);
        assert_eq!((attempt.attempt, attempt.epoch), (1, 1));
        assert_eq!(attempt.payload, BODY);
        assert_eq!(
            attempt.outputs,
            vec![("a".to_owned(), json!({"kyc": "ok"}).to_string())],
            "an attempt sees the outputs of the steps before it"
        );
        assert!(attempt.lease_expires_at_us >= T0 + SECOND_US + TIMEOUT_MS as i64 * 1_000);
    }
    let now = get(store, record.id).await;
    assert_eq!(
        statuses(&now),
        vec![
            ("a", StepStatus::Succeeded),
            ("b", StepStatus::Running),
            ("c", StepStatus::Running),
            ("d", StepStatus::Blocked),
            ("e", StepStatus::Running),
        ]
    );
    assert_eq!(now.status, EntityStatus::Pending);
    let again = claim(store, T0 + SECOND_US, 10).await;
    assert!(
        again.attempts.is_empty(),
        "claimed steps are not claimed twice: {again:?}"
    );
}

pub async fn w5_pipeline_runs_to_ready(store: Arc<dyn Store>) {
    let store = &*store;
    let (record, a) = w5_with_a_running(store).await;
    let t1 = T0 + SECOND_US;
    let claimed = finish(store, &a, succeeded(Some(json!({"step": "a"}))), t1).await;
    let (b, c, e) = (
        by_name(&claimed, "b"),
        by_name(&claimed, "c"),
        by_name(&claimed, "e"),
    );

    let t2 = t1 + SECOND_US;
    let batch = complete(
        store,
        vec![
            completion(b, succeeded(Some(json!({"step": "b"})))),
            completion(c, succeeded(Some(json!({"step": "c"})))),
        ],
        t2,
    )
    .await;
    assert_eq!(batch.results, vec![CompletionResult::Applied; 2]);
    assert_eq!(
        names(&batch.claimed),
        BTreeSet::from(["d"]),
        "d waits for both b and c"
    );
    let d = &batch.claimed[0];
    let seen: Vec<&str> = d.outputs.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(seen, vec!["a", "b", "c"]);

    let t3 = t2 + SECOND_US;
    assert!(finish(store, d, succeeded(Some(json!({"step": "d"}))), t3)
        .await
        .is_empty());
    let ready = get(store, record.id).await;
    assert_eq!(
        ready.status,
        EntityStatus::Ready,
        "non-critical e does not hold readiness back"
    );
    assert_eq!(ready.ready_at_us, Some(t3));
    assert!(!ready.degraded);
    assert_eq!(step(&ready, "e").state.status, StepStatus::Running);

    let t4 = t3 + SECOND_US;
    finish(store, e, succeeded(Some(json!({"step": "e"}))), t4).await;
    let done = get(store, record.id).await;
    assert_eq!(done.status, EntityStatus::Ready);
    assert_eq!(done.ready_at_us, Some(t3));
    assert_eq!(done.updated_at_us, t4);
    assert!(done
        .steps
        .iter()
        .all(|s| s.state.status == StepStatus::Succeeded));
    assert!(done.steps.iter().all(|s| s.state.due_at_us.is_none()));

    let data = store
        .get_data(TENANT, record.id)
        .await
        .expect("get_data")
        .expect("found");
    let outputs: Vec<(&str, serde_json::Value)> = data
        .outputs
        .iter()
        .map(|(n, o)| (n.as_str(), serde_json::from_str(o).expect("json output")))
        .collect();
    assert_eq!(
        outputs,
        ["a", "b", "c", "d", "e"]
            .map(|n| (n, json!({"step": n})))
            .to_vec()
    );
    let history = events(store, record.id).await;
    assert_eq!(
        status_changes(&history),
        vec![("pending".to_owned(), "ready".to_owned())]
    );
    assert!(claim(store, t4 + 3_600 * SECOND_US, 10)
        .await
        .next_due_us
        .is_none());
}

pub async fn critical_permanent_failure_fails_the_entity(store: Arc<dyn Store>) {
    let store = &*store;
    let (record, a) = w5_with_a_running(store).await;
    let t1 = T0 + SECOND_US;
    let claimed = finish(store, &a, failed("400 bad request", false, None), t1).await;
    assert!(claimed.is_empty());
    let now = get(store, record.id).await;
    assert_eq!(now.status, EntityStatus::Failed);
    assert_eq!(now.ready_at_us, None);
    assert_eq!(now.updated_at_us, t1);
    let a = &step(&now, "a").state;
    assert_eq!((a.status, a.attempts), (StepStatus::Failed, 1));
    assert_eq!(a.last_error.as_deref(), Some("400 bad request"));
    for name in ["b", "c", "d", "e"] {
        assert_eq!(step(&now, name).state.status, StepStatus::Skipped, "{name}");
    }
    assert!(now.steps.iter().all(|s| s.state.due_at_us.is_none()));
    let later = claim(store, t1 + 3_600 * SECOND_US, 10).await;
    assert!(later.attempts.is_empty());
    assert_eq!(
        later.next_due_us, None,
        "a failed entity has nothing left to schedule"
    );
    let history = events(store, record.id).await;
    assert_eq!(
        status_changes(&history),
        vec![("pending".to_owned(), "failed".to_owned())]
    );
    let failure = history
        .iter()
        .find(|e| e.kind == "attempt_failed")
        .expect("attempt_failed");
    assert_eq!(failure.step.as_deref(), Some("a"));
    assert_eq!(failure.detail["error"], "400 bad request");
    assert_eq!(failure.detail["retryable"], false);
}

pub async fn non_critical_failure_gives_ready_and_degraded(store: Arc<dyn Store>) {
    let store = &*store;
    let (record, a) = w5_with_a_running(store).await;
    let t1 = T0 + SECOND_US;
    let claimed = finish(store, &a, succeeded(None), t1).await;
    let e = by_name(&claimed, "e");
    assert!(finish(store, e, failed("422 no", false, None), t1)
        .await
        .is_empty());
    let now = get(store, record.id).await;
    assert_eq!(
        now.status,
        EntityStatus::Pending,
        "a non-critical failure does not fail the entity"
    );
    assert!(now.degraded);
    assert_eq!(step(&now, "e").state.status, StepStatus::Failed);

    let t2 = t1 + SECOND_US;
    let batch = complete(
        store,
        vec![
            completion(by_name(&claimed, "b"), succeeded(None)),
            completion(by_name(&claimed, "c"), succeeded(None)),
        ],
        t2,
    )
    .await;
    let d = by_name(&batch.claimed, "d");
    finish(store, d, succeeded(None), t2).await;
    let done = get(store, record.id).await;
    assert_eq!(done.status, EntityStatus::Ready);
    assert!(done.degraded);
    assert_eq!(done.ready_at_us, Some(t2));
    assert_eq!(step(&done, "e").state.last_error.as_deref(), Some("422 no"));
}

pub async fn retryable_failure_waits_out_its_backoff(store: Arc<dyn Store>) {
    let store = &*store;
    let record = create(store, new_entity("backoff", BODY), T0).await;
    let first = claim(store, T0, 10).await.attempts;
    assert_eq!(first.len(), 1);
    let t1 = T0 + SECOND_US;
    // Retry-After is a floor above the 1 s ceiling, which pins the delay at 2 s.
    let claimed = finish(store, &first[0], failed("503 busy", true, Some(2_000)), t1).await;
    assert!(
        claimed.is_empty(),
        "a retrying step is not claimed before its backoff"
    );
    let due = t1 + 2 * SECOND_US;
    let now = get(store, record.id).await;
    let s = &step(&now, "only").state;
    assert_eq!(
        (s.status, s.attempts, s.due_at_us),
        (StepStatus::Retrying, 1, Some(due))
    );
    assert_eq!(s.last_error.as_deref(), Some("503 busy"));
    assert_eq!(now.status, EntityStatus::Pending);

    let waiting = claim(store, t1, 10).await;
    assert!(waiting.attempts.is_empty());
    assert_eq!(waiting.next_due_us, Some(due));
    assert!(claim(store, due - 1, 10).await.attempts.is_empty());
    let second = claim(store, due, 10).await.attempts;
    assert_eq!(second.len(), 1);
    assert_eq!((second[0].attempt, second[0].epoch), (2, 2));

    // The first attempt's epoch no longer holds.
    let stale = complete(store, vec![completion(&first[0], succeeded(None))], due).await;
    assert_eq!(stale.results, vec![CompletionResult::Stale]);

    let t2 = due + SECOND_US;
    finish(store, &second[0], failed("503 busy", true, Some(2_000)), t2).await;
    let third = claim(store, t2 + 2 * SECOND_US, 10).await.attempts;
    assert_eq!((third[0].attempt, third[0].epoch), (3, 3));
    let t3 = t2 + 3 * SECOND_US;
    finish(
        store,
        &third[0],
        failed("503 still busy", true, Some(2_000)),
        t3,
    )
    .await;
    let done = get(store, record.id).await;
    assert_eq!(
        done.status,
        EntityStatus::Failed,
        "retries are exhausted after max_attempts"
    );
    let s = &step(&done, "only").state;
    assert_eq!(
        (s.status, s.attempts, s.due_at_us),
        (StepStatus::Failed, 3, None)
    );
    let history = events(store, record.id).await;
    let scheduled: Vec<_> = history
        .iter()
        .filter(|e| e.kind == "retry_scheduled")
        .collect();
    assert_eq!(scheduled.len(), 2);
    assert_eq!(scheduled[0].detail["due_at_us"], json!(due));
    assert_eq!(scheduled[0].attempt, Some(2));
}

pub async fn expired_lease_is_a_lost_attempt(store: Arc<dyn Store>) {
    let store = &*store;
    let record = create(store, new_entity("single", BODY), T0).await;
    let first = claim(store, T0, 10).await.attempts;
    assert_eq!(first.len(), 1);
    let lease = first[0].lease_expires_at_us;

    let before = claim(store, lease - 1, 10).await;
    assert!(
        before.attempts.is_empty(),
        "a live lease is not taken over: {before:?}"
    );
    assert_eq!(before.next_due_us, Some(lease));

    // `single` retries without backoff, so the lost attempt is retried at once.
    let second = claim(store, lease, 10).await.attempts;
    assert_eq!(
        second.len(),
        1,
        "the expired lease is lost and the step claimed again"
    );
    assert_eq!((second[0].attempt, second[0].epoch), (2, 2));
    let now = get(store, record.id).await;
    let s = &step(&now, "only").state;
    assert_eq!((s.status, s.attempts, s.epoch), (StepStatus::Running, 2, 2));
    assert!(
        s.last_error
            .as_deref()
            .unwrap_or_default()
            .contains("lease"),
        "{s:?}"
    );
    let history = events(store, record.id).await;
    let lost = history
        .iter()
        .find(|e| e.kind == "attempt_failed")
        .expect("attempt_failed");
    assert_eq!(lost.attempt, Some(1));
    assert_eq!(lost.detail["retryable"], true);

    let late = complete(store, vec![completion(&first[0], succeeded(None))], lease).await;
    assert_eq!(
        late.results,
        vec![CompletionResult::Stale],
        "the lost attempt's result is refused"
    );

    // Lost attempts count: the third expiry exhausts the three attempts.
    let third = claim(store, second[0].lease_expires_at_us, 10)
        .await
        .attempts;
    assert_eq!(third[0].attempt, 3);
    let last = claim(store, third[0].lease_expires_at_us, 10).await;
    assert!(last.attempts.is_empty());
    let done = get(store, record.id).await;
    assert_eq!(done.status, EntityStatus::Failed);
    assert_eq!(step(&done, "only").state.attempts, 3);
    assert_eq!(last.next_due_us, None);
}

pub async fn recover_loses_every_running_attempt(store: Arc<dyn Store>) {
    let store = &*store;
    let one = create(store, new_entity("single", BODY), T0).await;
    let two = create(store, new_entity("single", BODY), T0).await;
    let first = claim(store, T0, 10).await.attempts;
    assert_eq!(first.len(), 2);
    let waiting = create(store, new_entity("single", BODY), T0).await;

    let t1 = T0 + 1;
    assert_eq!(store.recover(t1).await.expect("recover"), 2);
    for id in [one.id, two.id] {
        let record = get(store, id).await;
        let s = &step(&record, "only").state;
        assert_eq!(
            (s.status, s.attempts, s.due_at_us),
            (StepStatus::Retrying, 1, Some(t1))
        );
        assert!(s.last_error.is_some());
        assert_eq!(record.updated_at_us, t1);
    }
    assert_eq!(
        step(&get(store, waiting.id).await, "only").state.status,
        StepStatus::Queued
    );
    assert_eq!(
        store.recover(t1).await.expect("recover"),
        0,
        "nothing is running any more"
    );

    let late = complete(store, vec![completion(&first[0], succeeded(None))], t1).await;
    assert_eq!(late.results, vec![CompletionResult::Stale]);
    let again = claim(store, t1, 10).await.attempts;
    let mut attempts: Vec<(EntityId, u32)> =
        again.iter().map(|a| (a.entity_id, a.attempt)).collect();
    attempts.sort();
    let mut want = vec![(one.id, 2), (two.id, 2), (waiting.id, 1)];
    want.sort();
    assert_eq!(attempts, want);
}

pub async fn cancel_transitions_and_conflicts(store: Arc<dyn Store>) {
    let store = &*store;
    let queued = create(store, new_entity("w5", BODY), T0).await;
    let t1 = T0 + SECOND_US;
    let cancelled = match store.cancel(TENANT, queued.id, t1).await.expect("cancel") {
        CommandOutcome::Applied(record) => record,
        other => panic!("expected Applied, got {other:?}"),
    };
    assert_eq!(cancelled.status, EntityStatus::Cancelled);
    assert_eq!(cancelled.updated_at_us, t1);
    assert!(cancelled
        .steps
        .iter()
        .all(|s| s.state.status == StepStatus::Skipped));
    assert_eq!(get(store, queued.id).await, cancelled);
    assert_eq!(
        store.cancel(TENANT, queued.id, t1).await.expect("cancel"),
        CommandOutcome::Conflict(EntityStatus::Cancelled)
    );
    assert_eq!(
        store.retry(TENANT, queued.id, t1).await.expect("retry"),
        CommandOutcome::Conflict(EntityStatus::Cancelled)
    );
    let history = events(store, queued.id).await;
    assert_eq!(
        status_changes(&history),
        vec![("pending".to_owned(), "cancelled".to_owned())]
    );

    // A running attempt of a cancelled entity is refused when it reports.
    let (running, a) = w5_with_a_running(store).await;
    assert!(matches!(
        store.cancel(TENANT, running.id, t1).await.expect("cancel"),
        CommandOutcome::Applied(_)
    ));
    let late = complete(store, vec![completion(&a, succeeded(None))], t1).await;
    assert_eq!(late.results, vec![CompletionResult::Stale]);
    let later = claim(store, t1 + 3_600 * SECOND_US, 10).await;
    assert!(later.attempts.is_empty());
    assert_eq!(later.next_due_us, None);

    let pending = create(store, new_entity("w5", BODY), t1).await;
    assert_eq!(
        store.retry(TENANT, pending.id, t1).await.expect("retry"),
        CommandOutcome::Conflict(EntityStatus::Pending)
    );
    assert_eq!(
        get(store, pending.id).await,
        pending,
        "a refused command changes nothing"
    );

    let unknown = EntityId::new_v7();
    assert_eq!(
        store.cancel(TENANT, unknown, t1).await.expect("cancel"),
        CommandOutcome::NotFound
    );
    assert_eq!(
        store.retry(TENANT, unknown, t1).await.expect("retry"),
        CommandOutcome::NotFound
    );
}

pub async fn retry_requeues_failed_and_skipped_steps(store: Arc<dyn Store>) {
    let store = &*store;
    let (record, a) = w5_with_a_running(store).await;
    let t1 = T0 + SECOND_US;
    let claimed = finish(store, &a, succeeded(Some(json!({"a": 1}))), t1).await;
    let b = by_name(&claimed, "b");
    let c = by_name(&claimed, "c");
    finish(store, b, failed("400", false, None), t1).await;
    let failed_now = get(store, record.id).await;
    assert_eq!(failed_now.status, EntityStatus::Failed);
    assert_eq!(step(&failed_now, "c").state.status, StepStatus::Skipped);
    let late = complete(store, vec![completion(c, succeeded(None))], t1).await;
    assert_eq!(
        late.results,
        vec![CompletionResult::Stale],
        "skipped c's attempt is stale"
    );
    assert_eq!(
        store.cancel(TENANT, record.id, t1).await.expect("cancel"),
        CommandOutcome::Conflict(EntityStatus::Failed)
    );

    let t2 = t1 + SECOND_US;
    let retried = match store.retry(TENANT, record.id, t2).await.expect("retry") {
        CommandOutcome::Applied(record) => record,
        other => panic!("expected Applied, got {other:?}"),
    };
    assert_eq!(retried.status, EntityStatus::Pending);
    assert!(!retried.degraded);
    assert_eq!(retried.updated_at_us, t2);
    assert_eq!(
        statuses(&retried),
        vec![
            ("a", StepStatus::Succeeded),
            ("b", StepStatus::Queued),
            ("c", StepStatus::Queued),
            ("d", StepStatus::Blocked),
            ("e", StepStatus::Queued),
        ]
    );
    assert_eq!(step(&retried, "b").state.attempts, 0);
    assert_eq!(step(&retried, "b").state.due_at_us, Some(t2));
    assert_eq!(get(store, record.id).await, retried);

    let again = claim(store, t2, 10).await.attempts;
    assert_eq!(names(&again), BTreeSet::from(["b", "c", "e"]));
    let b2 = by_name(&again, "b");
    assert_eq!(b2.attempt, 1, "attempts restart after an operator retry");
    assert!(b2.epoch > b.epoch, "epochs never go back");
    assert_eq!(
        b2.outputs,
        vec![("a".to_owned(), json!({"a": 1}).to_string())]
    );
    let history = events(store, record.id).await;
    assert_eq!(
        status_changes(&history),
        vec![
            ("pending".to_owned(), "failed".to_owned()),
            ("failed".to_owned(), "pending".to_owned())
        ]
    );
    assert_eq!(
        history.iter().filter(|e| e.kind == "step_requeued").count(),
        4
    );
}

pub async fn list_filters_newest_first_with_cursor(store: Arc<dyn Store>) {
    let store = &*store;
    // Ids minted 1..=6 ms apart: 1, 3, 4, 6 are w5; 2 and 5 are single.
    let mut ids = Vec::new();
    for (ms, type_name) in [
        (1, "w5"),
        (2, "single"),
        (3, "w5"),
        (4, "w5"),
        (5, "single"),
        (6, "w5"),
    ] {
        let mut entity = new_entity(type_name, BODY);
        entity.id = id_at(ms);
        ids.push(create(store, entity, T0).await.id);
    }
    let id = |n: usize| ids[n - 1];
    assert!(matches!(
        store.cancel(TENANT, id(3), T0).await.expect("cancel"),
        CommandOutcome::Applied(_)
    ));
    let mut other = new_entity("w5", BODY);
    other.tenant = OTHER_TENANT.into();
    other.id = id_at(7);
    create(store, other, T0).await;

    let list = |type_name: Option<&str>,
                status: Option<EntityStatus>,
                limit: u32,
                after: Option<EntityId>| {
        let query = ListQuery {
            type_name: type_name.map(str::to_owned),
            status,
            limit,
            after,
            ..ListQuery::default()
        };
        async move {
            store
                .list(TENANT, query)
                .await
                .expect("list")
                .into_iter()
                .map(|r| r.id)
                .collect::<Vec<_>>()
        }
    };
    assert_eq!(
        list(None, None, 100, None).await,
        vec![id(6), id(5), id(4), id(3), id(2), id(1)]
    );
    assert_eq!(
        list(Some("w5"), None, 100, None).await,
        vec![id(6), id(4), id(3), id(1)]
    );
    assert_eq!(
        list(Some("single"), None, 100, None).await,
        vec![id(5), id(2)]
    );
    assert_eq!(list(Some("nothing"), None, 100, None).await, vec![]);
    assert_eq!(
        list(None, Some(EntityStatus::Cancelled), 100, None).await,
        vec![id(3)]
    );
    assert_eq!(
        list(None, Some(EntityStatus::Pending), 100, None).await,
        vec![id(6), id(5), id(4), id(2), id(1)]
    );
    assert_eq!(
        list(Some("w5"), Some(EntityStatus::Pending), 100, None).await,
        vec![id(6), id(4), id(1)]
    );
    assert_eq!(
        list(None, Some(EntityStatus::Ready), 100, None).await,
        vec![]
    );

    assert_eq!(list(None, None, 2, None).await, vec![id(6), id(5)]);
    assert_eq!(list(None, None, 2, Some(id(5))).await, vec![id(4), id(3)]);
    assert_eq!(list(None, None, 2, Some(id(3))).await, vec![id(2), id(1)]);
    assert_eq!(list(None, None, 2, Some(id(1))).await, vec![]);
    assert_eq!(
        list(Some("w5"), None, 3, None).await,
        vec![id(6), id(4), id(3)]
    );
    assert_eq!(list(Some("w5"), None, 3, Some(id(3))).await, vec![id(1)]);
    assert_eq!(
        list(Some("w5"), Some(EntityStatus::Pending), 1, Some(id(6))).await,
        vec![id(4)]
    );
    assert_eq!(list(None, None, 0, None).await, vec![]);

    let records = store
        .list(
            TENANT,
            ListQuery {
                limit: 100,
                ..ListQuery::default()
            },
        )
        .await
        .expect("list");
    for record in records {
        assert_eq!(
            get(store, record.id).await,
            record,
            "list returns full records"
        );
    }
}

pub async fn list_filters_by_degraded_creation_time_and_key(store: Arc<dyn Store>) {
    let store = &*store;
    // w5 entities minted 1..=4 ms after T0 with keys k1..k4, and a single
    // one at 5 ms whose key k1 belongs to its own type.
    let mut ids = Vec::new();
    for (ms, type_name, key) in [
        (1, "w5", "k1"),
        (2, "w5", "k2"),
        (3, "w5", "k3"),
        (4, "w5", "k4"),
        (5, "single", "k1"),
    ] {
        let mut entity = new_entity(type_name, BODY);
        entity.id = id_at(ms);
        entity.idempotency_key = Some(key.into());
        ids.push(create(store, entity, T0).await.id);
    }
    let id = |n: usize| ids[n - 1];
    let mut other = new_entity("w5", BODY);
    other.tenant = OTHER_TENANT.into();
    other.id = id_at(6);
    other.idempotency_key = Some("k4".into());
    create(store, other, T0).await;
    // Entity 2 degrades: its non-critical step `e` fails for good.
    let first = claim(store, T0, 10).await.attempts;
    let a2 = first
        .iter()
        .find(|a| a.entity_id == id(2))
        .expect("entity 2's first step is claimed");
    let claimed = finish(store, a2, succeeded(None), T0 + 1).await;
    finish(
        store,
        by_name(&claimed, "e"),
        failed("422 no", false, None),
        T0 + 2,
    )
    .await;
    assert!(get(store, id(2)).await.degraded);

    let at = |ms: i64| Some(T0 + ms * 1_000);
    let list = |query: ListQuery| async move {
        let query = ListQuery {
            limit: if query.limit == 0 { 100 } else { query.limit },
            ..query
        };
        store
            .list(TENANT, query)
            .await
            .expect("list")
            .into_iter()
            .map(|r| r.id)
            .collect::<Vec<_>>()
    };
    let typed = |t: &str| Some(t.to_owned());
    let key = |k: &str| Some(k.to_owned());

    assert_eq!(
        list(ListQuery {
            degraded: Some(true),
            ..ListQuery::default()
        })
        .await,
        vec![id(2)]
    );
    assert_eq!(
        list(ListQuery {
            degraded: Some(false),
            ..ListQuery::default()
        })
        .await,
        vec![id(5), id(4), id(3), id(1)]
    );
    assert_eq!(
        list(ListQuery {
            type_name: typed("w5"),
            status: Some(EntityStatus::Pending),
            degraded: Some(true),
            ..ListQuery::default()
        })
        .await,
        vec![id(2)]
    );
    assert_eq!(
        list(ListQuery {
            status: Some(EntityStatus::Ready),
            degraded: Some(true),
            ..ListQuery::default()
        })
        .await,
        vec![]
    );

    // Creation times bound the ids: after is inclusive, before exclusive,
    // at millisecond precision.
    assert_eq!(
        list(ListQuery {
            created_after_us: at(3),
            ..ListQuery::default()
        })
        .await,
        vec![id(5), id(4), id(3)]
    );
    assert_eq!(
        list(ListQuery {
            created_before_us: at(3),
            ..ListQuery::default()
        })
        .await,
        vec![id(2), id(1)]
    );
    assert_eq!(
        list(ListQuery {
            created_after_us: Some(T0 + 2_500),
            created_before_us: at(4),
            ..ListQuery::default()
        })
        .await,
        vec![id(3), id(2)],
        "a time inside a millisecond names that millisecond"
    );
    assert_eq!(
        list(ListQuery {
            type_name: typed("w5"),
            created_after_us: at(2),
            limit: 1,
            after: Some(id(3)),
            ..ListQuery::default()
        })
        .await,
        vec![id(2)]
    );
    assert_eq!(
        list(ListQuery {
            created_after_us: at(2),
            created_before_us: at(2),
            ..ListQuery::default()
        })
        .await,
        vec![]
    );
    assert_eq!(
        list(ListQuery {
            created_after_us: at(2),
            degraded: Some(false),
            ..ListQuery::default()
        })
        .await,
        vec![id(5), id(4), id(3)]
    );

    // A key names one entity of its type and tenant; the other filters
    // still apply to it.
    let by_key = |t: &str, k: &str| ListQuery {
        type_name: typed(t),
        key: key(k),
        limit: 10,
        ..ListQuery::default()
    };
    assert_eq!(list(by_key("w5", "k1")).await, vec![id(1)]);
    assert_eq!(list(by_key("single", "k1")).await, vec![id(5)]);
    assert_eq!(list(by_key("w5", "k9")).await, vec![]);
    assert_eq!(list(by_key("nothing", "k1")).await, vec![]);
    assert_eq!(
        list(by_key("w5", "k4")).await,
        vec![id(4)],
        "another tenant's key is not seen"
    );
    assert_eq!(
        list(ListQuery {
            degraded: Some(true),
            ..by_key("w5", "k2")
        })
        .await,
        vec![id(2)]
    );
    for filtered in [
        ListQuery {
            degraded: Some(false),
            ..by_key("w5", "k2")
        },
        ListQuery {
            status: Some(EntityStatus::Ready),
            ..by_key("w5", "k2")
        },
        ListQuery {
            after: Some(id(2)),
            ..by_key("w5", "k2")
        },
        ListQuery {
            created_after_us: at(3),
            ..by_key("w5", "k2")
        },
        ListQuery {
            created_before_us: at(2),
            ..by_key("w5", "k2")
        },
        ListQuery {
            key: key("k1"),
            ..ListQuery::default()
        },
    ] {
        assert_eq!(list(filtered.clone()).await, vec![], "{filtered:?}");
    }
    let records = store
        .list(TENANT, by_key("w5", "k2"))
        .await
        .expect("list by key");
    assert_eq!(records, vec![get(store, id(2)).await], "full records");
}

pub async fn events_are_numbered_without_gaps(store: Arc<dyn Store>) {
    let store = &*store;
    let (record, a) = w5_with_a_running(store).await;
    let t1 = T0 + SECOND_US;
    let claimed = finish(store, &a, succeeded(None), t1).await;
    // b fails once; w5's first backoff ceiling is 1 s, so Retry-After 1 s pins it.
    let b = by_name(&claimed, "b");
    finish(store, b, failed("timeout", true, Some(1_000)), t1).await;
    let t2 = t1 + SECOND_US;
    let b2 = claim(store, t2, 10).await.attempts;
    assert_eq!(names(&b2), BTreeSet::from(["b"]));
    let batch = complete(
        store,
        vec![
            completion(&b2[0], succeeded(None)),
            completion(by_name(&claimed, "c"), succeeded(None)),
            completion(by_name(&claimed, "e"), succeeded(None)),
        ],
        t2,
    )
    .await;
    finish(store, by_name(&batch.claimed, "d"), succeeded(None), t2).await;
    assert_eq!(get(store, record.id).await.status, EntityStatus::Ready);

    let history = events(store, record.id).await;
    let seqs: Vec<u64> = history.iter().map(|e| e.seq).collect();
    assert_eq!(
        seqs,
        (1..=history.len() as u64).collect::<Vec<_>>(),
        "numbered 1.. without gaps"
    );
    assert_eq!(history[0].kind, "created");
    assert!(
        history.windows(2).all(|w| w[0].at_us <= w[1].at_us),
        "in time order"
    );
    let count = |kind: &str| history.iter().filter(|e| e.kind == kind).count();
    assert_eq!(count("created"), 1);
    assert_eq!(count("step_started"), 6, "a, b twice, c, d, e");
    assert_eq!(count("step_succeeded"), 5);
    assert_eq!(count("attempt_failed"), 1);
    assert_eq!(count("retry_scheduled"), 1);
    assert_eq!(count("status_changed"), 1);
    assert_eq!(
        history.last().map(|e| e.kind.as_str()),
        Some("status_changed")
    );
    let started_b: Vec<Option<u32>> = history
        .iter()
        .filter(|e| e.kind == "step_started" && e.step.as_deref() == Some("b"))
        .map(|e| e.attempt)
        .collect();
    assert_eq!(started_b, vec![Some(1), Some(2)]);
    let first_start = history
        .iter()
        .find(|e| e.kind == "step_started")
        .expect("started");
    assert_eq!(first_start.detail["epoch"], json!(1));

    let page = store
        .events(TENANT, record.id, 2, 3)
        .await
        .expect("events")
        .expect("found");
    assert_eq!(
        page.iter().map(|e| e.seq).collect::<Vec<_>>(),
        vec![3, 4, 5]
    );
    assert_eq!(page, history[2..5].to_vec());
    let end = store
        .events(TENANT, record.id, history.len() as u64, 10)
        .await
        .expect("events");
    assert_eq!(end, Some(vec![]));
    assert_eq!(
        store
            .events(TENANT, EntityId::new_v7(), 0, 10)
            .await
            .expect("events"),
        None
    );
}

pub async fn tenants_are_isolated(store: Arc<dyn Store>) {
    let store = &*store;
    let mine = create(store, new_entity("w5", BODY), T0).await;
    let mut theirs = new_entity("w5", BODY);
    theirs.tenant = OTHER_TENANT.into();
    let theirs = create(store, theirs, T0).await;

    assert_eq!(store.get(OTHER_TENANT, mine.id).await.expect("get"), None);
    assert_eq!(
        store
            .get_data(OTHER_TENANT, mine.id)
            .await
            .expect("get_data"),
        None
    );
    assert_eq!(
        store
            .events(OTHER_TENANT, mine.id, 0, 10)
            .await
            .expect("events"),
        None
    );
    assert_eq!(
        store
            .cancel(OTHER_TENANT, mine.id, T0)
            .await
            .expect("cancel"),
        CommandOutcome::NotFound
    );
    assert_eq!(
        store.retry(OTHER_TENANT, mine.id, T0).await.expect("retry"),
        CommandOutcome::NotFound
    );
    assert_eq!(
        get(store, mine.id).await,
        mine,
        "another tenant's commands change nothing"
    );

    let all = ListQuery {
        limit: 100,
        ..ListQuery::default()
    };
    let listed: Vec<EntityId> = store
        .list(TENANT, all.clone())
        .await
        .expect("list")
        .iter()
        .map(|r| r.id)
        .collect();
    assert_eq!(listed, vec![mine.id]);
    let listed: Vec<EntityId> = store
        .list(OTHER_TENANT, all.clone())
        .await
        .expect("list")
        .iter()
        .map(|r| r.id)
        .collect();
    assert_eq!(listed, vec![theirs.id]);
    assert!(store.list("nobody", all).await.expect("list").is_empty());
    assert_eq!(store.get(TENANT, theirs.id).await.expect("get"), None);
    assert_eq!(
        store.get(OTHER_TENANT, theirs.id).await.expect("get"),
        Some(theirs)
    );
}

pub async fn get_data_returns_payload_and_outputs(store: Arc<dyn Store>) {
    let store = &*store;
    let (record, a) = w5_with_a_running(store).await;
    let t1 = T0 + SECOND_US;
    let output = r#"{"id": "acct_1",  "tier": "gold"}"#;
    let claimed = finish(
        store,
        &a,
        Outcome::Succeeded {
            output: Some(output.into()),
        },
        t1,
    )
    .await;
    // c returns nothing, e fails: neither has an output.
    finish(store, by_name(&claimed, "c"), succeeded(None), t1).await;
    finish(store, by_name(&claimed, "e"), failed("no", false, None), t1).await;
    let data = store
        .get_data(TENANT, record.id)
        .await
        .expect("get_data")
        .expect("found");
    assert_eq!(data.payload.as_deref(), Some(BODY));
    assert_eq!(
        data.outputs,
        vec![("a".to_owned(), output.to_owned())],
        "raw output, byte for byte"
    );
    assert_eq!(data.record, get(store, record.id).await);
}

pub async fn concurrent_creates_all_commit(store: Arc<dyn Store>) {
    const CLIENTS: usize = 200;
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..CLIENTS {
        let store = store.clone();
        tasks.spawn(async move {
            let mut entity = new_entity(
                if i % 2 == 0 { "w5" } else { "single" },
                &format!("{{\"i\": {i}}}"),
            );
            if i % 3 == 0 {
                entity.idempotency_key = Some(format!("key-{i}"));
            }
            let id = entity.id;
            let outcome = store.create(entity, T0 + i as i64).await.expect("create");
            assert!(
                matches!(outcome, IntakeOutcome::Created(ref r) if r.id == id),
                "{outcome:?}"
            );
            (i, id)
        });
    }
    let mut created = Vec::with_capacity(CLIENTS);
    while let Some(joined) = tasks.join_next().await {
        created.push(joined.expect("create task"));
    }
    assert_eq!(created.len(), CLIENTS);
    for (i, id) in &created {
        let data = store
            .get_data(TENANT, *id)
            .await
            .expect("get_data")
            .expect("readable");
        assert_eq!(data.payload, Some(format!("{{\"i\": {i}}}")));
        assert_eq!(data.record.created_at_us, T0 + *i as i64);
    }
    let listed = store
        .list(
            TENANT,
            ListQuery {
                limit: 1_000,
                ..ListQuery::default()
            },
        )
        .await
        .expect("list");
    assert_eq!(listed.len(), CLIENTS);
    let batch = claim(&*store, T0 + SECOND_US, 1_000).await;
    assert_eq!(
        batch.attempts.len(),
        CLIENTS,
        "every entity's first step is runnable"
    );
}

pub async fn ping_succeeds(store: Arc<dyn Store>) {
    store.ping().await.expect("ping");
}

// ---------------------------------------------------------------------------
// The outbox, time, queues, degradation and draining

/// Every status change and degradation is in the outbox, in commit order,
/// with the seq of its history event and a body that names the entity.
pub async fn outbox_holds_every_notable_event_in_order(store: Arc<dyn Store>) {
    let store = &*store;
    let first = create(store, new_entity("single", BODY), T0).await;
    let second = create(store, new_entity("single", BODY), T0).await;
    let attempt = claim(store, T0, 10).await.attempts;
    let mine = attempt
        .iter()
        .find(|a| a.entity_id == first.id)
        .expect("first claimed");
    finish(store, mine, succeeded(None), T0 + SECOND_US).await;
    store
        .cancel(TENANT, second.id, T0 + SECOND_US)
        .await
        .expect("cancel");

    // A shared store positions its rows in the fan-out.
    store.fan_out(100, T0 + SECOND_US).await.expect("fan out");
    let entries = store.outbox(0, 100).await.expect("outbox");
    let seen: Vec<(EntityId, &str)> = entries
        .iter()
        .map(|o| (o.entity_id, o.kind.as_str()))
        .collect();
    assert_eq!(
        seen,
        vec![
            (first.id, "created"),
            (second.id, "created"),
            (first.id, "status_changed"),
            (second.id, "status_changed"),
        ]
    );
    assert!(entries.windows(2).all(|w| w[0].id < w[1].id), "ids grow");
    for o in &entries {
        let history = events(store, o.entity_id).await;
        let event = history
            .iter()
            .find(|e| e.seq == o.seq)
            .expect("the announced event is in the history");
        assert!(event.is_notable());
        assert_eq!(
            (event.kind.as_str(), event.at_us),
            (o.kind.as_str(), o.at_us)
        );
        let body: serde_json::Value = serde_json::from_str(&o.body).expect("json body");
        assert_eq!(body["entity_id"], o.entity_id.to_string());
        assert_eq!(body["seq"], o.seq);
        assert_eq!(body["type"], "single");
        assert_eq!(body["tenant"], TENANT);
        assert_eq!(body["detail"], event.detail);
    }
    // A reader resumes after the last id it saw.
    let rest = store.outbox(entries[1].id, 100).await.expect("outbox");
    assert_eq!(rest, entries[2..].to_vec());
    assert_eq!(store.outbox(0, 1).await.expect("outbox").len(), 1);
    // History rows that are not notable stay out of it.
    let history = events(store, first.id).await;
    assert_eq!(
        history.iter().filter(|e| e.is_notable()).count(),
        entries.iter().filter(|o| o.entity_id == first.id).count()
    );
}

/// A change whose caller read the clock before an earlier-committed change
/// does not move the entity's history back in time.
pub async fn history_times_never_go_back(store: Arc<dyn Store>) {
    let store = &*store;
    let record = create(store, new_entity("single", BODY), T0).await;
    let later = T0 + 5 * SECOND_US;
    let attempt = claim(store, later, 10).await.attempts;
    finish(store, &attempt[0], succeeded(None), T0 + SECOND_US).await;
    let history = events(store, record.id).await;
    assert!(
        history.windows(2).all(|w| w[0].at_us <= w[1].at_us),
        "{history:?}"
    );
    assert_eq!(history.last().expect("events").at_us, later);
    let now = get(store, record.id).await;
    assert_eq!(now.updated_at_us, later);
}

/// Each queue is its own consumer's: an HTTP claim never takes a worker
/// step, a result claims only steps of the queue it names, and the next due
/// time is per queue.
pub async fn claims_are_per_queue(store: Arc<dyn Store>) {
    let store = &*store;
    let scoring = "worker:scoring";
    let record = create(store, new_entity("mixed", BODY), T0).await;
    let none = store
        .claim_due(Claim::local(scoring, 10), T0)
        .await
        .expect("claim");
    assert!(none.attempts.is_empty());
    assert_eq!(none.next_due_us, None, "nothing waits in the worker queue");
    let fetch = claim(store, T0, 10).await.attempts;
    assert_eq!(names(&fetch), BTreeSet::from(["fetch"]));
    let claimed = finish(store, &fetch[0], succeeded(Some(json!({"f": 1}))), T0).await;
    assert!(claimed.is_empty(), "score belongs to the workers");
    assert_eq!(
        step(&get(store, record.id).await, "score").state.status,
        StepStatus::Queued
    );
    assert!(claim(store, T0, 10).await.attempts.is_empty());
    let score = store
        .claim_due(Claim::local(scoring, 10), T0)
        .await
        .expect("claim");
    assert_eq!(names(&score.attempts), BTreeSet::from(["score"]));
    let a = &score.attempts[0];
    assert_eq!(
        a.outputs,
        vec![("fetch".to_owned(), r#"{"f":1}"#.to_owned())]
    );
    let batch = store
        .complete(vec![completion(a, succeeded(None))], Some(scoring), T0)
        .await
        .expect("complete");
    assert_eq!(batch.results, vec![CompletionResult::Applied]);
    assert!(batch.claimed.is_empty(), "publish is an HTTP step");
    let publish = claim(store, T0, 10).await.attempts;
    assert_eq!(names(&publish), BTreeSet::from(["publish"]));
    finish(store, &publish[0], succeeded(None), T0).await;
    assert_eq!(get(store, record.id).await.status, EntityStatus::Ready);
}

/// A non-critical step that fails for good after the entity became ready
/// degrades it: an event in the history and a row in the outbox.
pub async fn degraded_after_ready_is_an_event(store: Arc<dyn Store>) {
    let store = &*store;
    let (record, a) = w5_with_a_running(store).await;
    let t1 = T0 + SECOND_US;
    let claimed = finish(store, &a, succeeded(None), t1).await;
    let batch = complete(
        store,
        vec![
            completion(by_name(&claimed, "b"), succeeded(None)),
            completion(by_name(&claimed, "c"), succeeded(None)),
        ],
        t1,
    )
    .await;
    finish(store, by_name(&batch.claimed, "d"), succeeded(None), t1).await;
    assert_eq!(get(store, record.id).await.status, EntityStatus::Ready);
    store.fan_out(1_000, t1).await.expect("fan out");
    let before = store.outbox(0, 1_000).await.expect("outbox").len();

    let t2 = t1 + SECOND_US;
    finish(
        store,
        by_name(&claimed, "e"),
        failed("422 no", false, None),
        t2,
    )
    .await;
    let now = get(store, record.id).await;
    assert_eq!((now.status, now.degraded), (EntityStatus::Ready, true));
    let history = events(store, record.id).await;
    let degraded = history.last().expect("events");
    assert_eq!(degraded.kind, "degraded");
    assert_eq!(degraded.at_us, t2);
    assert_eq!(degraded.detail, json!({"degraded": true, "step": "e"}));
    store.fan_out(1_000, t2).await.expect("fan out");
    let outbox = store.outbox(0, 1_000).await.expect("outbox");
    assert_eq!(outbox.len(), before + 1);
    let last = outbox.last().expect("outbox");
    assert_eq!((last.entity_id, last.seq), (record.id, degraded.seq));
    assert_eq!(last.kind, "degraded");
}

/// A node that drains records its running attempts' results without claiming
/// what they unblock: that work stays queued for whoever claims next.
pub async fn draining_records_results_without_claiming_more(store: Arc<dyn Store>) {
    let store = &*store;
    let (record, a) = w5_with_a_running(store).await;
    let batch = store
        .complete(vec![completion(&a, succeeded(None))], None, T0)
        .await
        .expect("complete");
    assert_eq!(batch.results, vec![CompletionResult::Applied]);
    assert!(batch.claimed.is_empty());
    let now = get(store, record.id).await;
    for name in ["b", "c", "e"] {
        assert_eq!(step(&now, name).state.status, StepStatus::Queued, "{name}");
    }
    let next = claim(store, T0, 10).await;
    assert_eq!(names(&next.attempts), BTreeSet::from(["b", "c", "e"]));
}

/// Run by each backend with two stores on one database, the second opened
/// with a catalog that lacks the `w5` type: its claims pass over the entity
/// they cannot schedule and still serve the others.
pub async fn claims_skip_entities_of_an_unknown_pipeline(
    full: Arc<dyn Store>,
    without_w5: Arc<dyn Store>,
) {
    let orphan = create(&*full, new_entity("w5", BODY), T0).await;
    let fine = create(&*full, new_entity("single", BODY), T0 + 1).await;
    let batch = claim(&*without_w5, T0 + 2, 10).await;
    let ids: Vec<EntityId> = batch.attempts.iter().map(|a| a.entity_id).collect();
    assert_eq!(ids, vec![fine.id]);
    let again = claim(&*without_w5, T0 + 3, 10).await;
    assert!(again.attempts.is_empty(), "nothing else is claimable");
    assert_eq!(
        step(&get(&*full, orphan.id).await, "a").state.status,
        StepStatus::Queued,
        "the orphan is left as it was"
    );
    // The store that knows the type still runs it.
    let claimed = claim(&*full, T0 + 4, 10).await;
    assert_eq!(names(&claimed.attempts), BTreeSet::from(["a"]));
}

/// The suite's catalog without the `w5` type.
pub fn catalog_without_w5() -> Arc<Catalog> {
    let full = catalog();
    let mut partial = Catalog::default();
    for (name, version) in [("single", 1), ("backoff", 1), ("mixed", 1)] {
        let pipeline = full.get(name, version).expect("in the suite catalog");
        partial.insert(name, version, Pipeline::clone(pipeline));
    }
    Arc::new(partial)
}

/// Creates a `mixed` entity, runs `fetch`, and claims `score` for worker
/// `w1` at `T0`.
async fn score_claimed_by_w1(store: &dyn Store) -> (EntityRecord, Attempt) {
    let record = create(store, new_entity("mixed", BODY), T0).await;
    let fetch = claim(store, T0, 10).await.attempts;
    finish(store, &fetch[0], succeeded(None), T0).await;
    let claim = Claim::by("worker:scoring", 100, Some("w1"));
    let mut batch = store.claim_due(claim, T0).await.expect("claim");
    let score = batch.attempts.pop().expect("score");
    assert_eq!(score.step_name, "score");
    (record, score)
}

/// A worker's claim names its holder, which the entity shows while the
/// attempt runs; a heartbeat extends the lease (never after it expired);
/// a result or heartbeat with a stale epoch changes nothing.
pub async fn worker_leases_are_held_extended_and_fenced(store: Arc<dyn Store>) {
    let store = &*store;
    let (record, score) = score_claimed_by_w1(store).await;
    // Claimed at T0: the lease is the step's timeout plus the store's grace.
    let lease_us = score.lease_expires_at_us - T0;
    assert!(lease_us >= (TIMEOUT_MS as i64) * 1_000);
    let s = step(&get(store, record.id).await, "score").state.clone();
    assert_eq!(s.holder.as_deref(), Some("w1"));
    assert_eq!(s.due_at_us, Some(score.lease_expires_at_us));
    let started = events(store, record.id)
        .await
        .into_iter()
        .filter(|e| e.kind == "step_started" && e.step.as_deref() == Some("score"))
        .collect::<Vec<_>>();
    assert_eq!(started.len(), 1);
    assert_eq!(started[0].detail["worker"], "w1");

    let beat = Heartbeat {
        entity_id: record.id,
        step: score.step,
        epoch: score.epoch,
    };
    let t1 = T0 + SECOND_US / 2;
    let before = events(store, record.id).await.len();
    let leases = store.heartbeat(vec![beat], t1).await.expect("heartbeat");
    assert_eq!(leases, vec![Some(t1 + lease_us)]);
    let s = step(&get(store, record.id).await, "score").state.clone();
    assert_eq!(s.due_at_us, Some(t1 + lease_us), "the lease moved");
    assert_eq!(s.holder.as_deref(), Some("w1"));
    assert_eq!(events(store, record.id).await.len(), before, "no history");
    // The old expiry passed, the new one not: nothing to take over.
    let scoring = Claim::local("worker:scoring", 10);
    let early = store
        .claim_due(scoring, score.lease_expires_at_us)
        .await
        .expect("claim");
    assert!(early.attempts.is_empty(), "the extended lease holds");
    assert_eq!(early.next_due_us, Some(t1 + lease_us));

    let stale = Heartbeat {
        epoch: score.epoch + 1,
        ..beat
    };
    let unknown = Heartbeat {
        entity_id: EntityId::new_v7(),
        ..beat
    };
    let answers = store
        .heartbeat(vec![stale, unknown], t1)
        .await
        .expect("heartbeat");
    assert_eq!(answers, vec![None, None]);

    // Past the lease, a heartbeat no longer holds; another claim takes over.
    let expired = t1 + lease_us;
    let late = store
        .heartbeat(vec![beat], expired)
        .await
        .expect("heartbeat");
    assert_eq!(late, vec![None]);
    let other = Claim {
        holder: Some("w2"),
        ..scoring
    };
    let taken = store
        .claim_due(other, expired)
        .await
        .expect("claim")
        .attempts;
    assert_eq!(taken.len(), 1);
    assert_eq!((taken[0].attempt, taken[0].epoch), (2, score.epoch + 1));
    let s = step(&get(store, record.id).await, "score").state.clone();
    assert_eq!(s.holder.as_deref(), Some("w2"));
    let refused = complete(store, vec![completion(&score, succeeded(None))], expired).await;
    assert_eq!(refused.results, vec![CompletionResult::Stale]);
    finish(store, &taken[0], succeeded(None), expired).await;
    let s = step(&get(store, record.id).await, "score").state.clone();
    assert_eq!((s.status, s.holder), (StepStatus::Succeeded, None));
}

/// A node that restarts loses its own running attempts, not those of
/// remote workers: they outlive it, and their leases expire by themselves.
pub async fn recover_keeps_the_leases_of_remote_workers(store: Arc<dyn Store>) {
    let store = &*store;
    let (record, score) = score_claimed_by_w1(store).await;
    if store.is_shared() {
        // A shared store never recovers; nothing to check.
        return;
    }
    assert_eq!(store.recover(T0 + 1).await.expect("recover"), 0);
    let s = step(&get(store, record.id).await, "score").state.clone();
    assert_eq!(s.status, StepStatus::Running);
    finish(store, &score, succeeded(None), T0 + 2).await;
}

/// Every commit that makes a step runnable tells the watchers its queue,
/// whichever consumer made it.
pub async fn watchers_hear_which_queue_got_work(store: Arc<dyn Store>) {
    let heard = Arc::new(std::sync::Mutex::new(BTreeSet::new()));
    let notify = Arc::new(tokio::sync::Notify::new());
    let (h, n) = (heard.clone(), notify.clone());
    store.watch_work(Arc::new(move |queue: Option<&str>| {
        // `None`: any queue (a shared store's listener, once it listens).
        h.lock()
            .expect("heard")
            .insert(queue.unwrap_or("*").to_owned());
        n.notify_one();
    }));
    let hears = |queue: &'static str| {
        let (heard, notify) = (heard.clone(), notify.clone());
        async move {
            let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
            loop {
                if heard.lock().expect("heard").remove(queue) {
                    return true;
                }
                if tokio::time::timeout_at(deadline, notify.notified())
                    .await
                    .is_err()
                {
                    return false;
                }
            }
        }
    };
    let store = &*store;
    if store.is_shared() {
        // Commits before the listener listens are not heard (it wakes
        // every queue once it does), so wait for it.
        assert!(hears("*").await, "the listener listens");
    }
    let record = create(store, new_entity("mixed", BODY), T0).await;
    assert!(
        hears(HTTP_QUEUE).await,
        "a create names the queue of its first step"
    );
    let fetch = claim(store, T0, 10).await.attempts;
    finish(store, &fetch[0], succeeded(None), T0).await;
    assert!(
        hears("worker:scoring").await,
        "a result names the queue it fed"
    );
    let _ = record;
}

/// The value of the sample of `family` whose labels are exactly `labels`,
/// in what `store` registered; 0 when there is none.
pub fn metric(store: &dyn Store, family: &str, labels: &[(&str, &str)]) -> f64 {
    let registry = prometheus::Registry::new();
    store.register_metrics(&registry).expect("register");
    for f in registry.gather() {
        if f.name() != family {
            continue;
        }
        for m in f.get_metric() {
            let got: Vec<(&str, &str)> = m
                .get_label()
                .iter()
                .map(|l| (l.name(), l.value()))
                .collect();
            if got.len() == labels.len() && labels.iter().all(|l| got.contains(l)) {
                return match f.get_field_type() {
                    prometheus::proto::MetricType::HISTOGRAM => {
                        m.get_histogram().get_sample_count() as f64
                    }
                    _ => m.get_counter().get_value(),
                };
            }
        }
    }
    0.0
}

/// The gauges' counts follow the entities, and the decision counters count
/// each attempt's outcome once, by type, step and outcome.
pub async fn counts_and_metrics_follow_the_decisions(store: Arc<dyn Store>) {
    let store = &*store;
    let one = create(store, new_entity("single", BODY), T0).await;
    create(store, new_entity("single", BODY), T0).await;
    create(store, new_entity("w5", BODY), T0).await;
    let counts = store.counts(T0).await.expect("counts");
    let mut entities = counts.entities.clone();
    entities.sort_by(|a, b| a.0.cmp(&b.0));
    assert_eq!(
        entities,
        vec![
            ("single".to_owned(), EntityStatus::Pending, 2),
            ("w5".to_owned(), EntityStatus::Pending, 1),
        ]
    );
    assert_eq!(counts.due, vec![(HTTP_QUEUE.to_owned(), 3)]);

    let attempts = claim(store, T0, 10).await.attempts;
    let only = attempts
        .iter()
        .find(|a| a.entity_id == one.id)
        .expect("one's attempt");
    finish(store, only, failed("503", true, None), T0).await;
    let again = claim(store, T0, 10).await.attempts;
    assert_eq!(again.len(), 1, "no backoff: due again at once");
    finish(store, &again[0], failed("400", false, None), T0).await;
    let w5_a = by_name(&attempts, "a");
    finish(store, w5_a, succeeded(None), T0).await;

    let m = |outcome: &str, ty: &str, step: &str| {
        metric(
            store,
            "ripen_step_attempts_total",
            &[("type", ty), ("step", step), ("outcome", outcome)],
        )
    };
    assert_eq!(m("retryable_error", "single", "only"), 1.0);
    assert_eq!(m("permanent_error", "single", "only"), 1.0);
    assert_eq!(m("succeeded", "w5", "a"), 1.0);
    assert_eq!(m("succeeded", "single", "only"), 0.0);
    let retries = metric(
        store,
        "ripen_retries_scheduled_total",
        &[("type", "single"), ("step", "only")],
    );
    assert_eq!(retries, 1.0);
    let failed_entities = metric(
        store,
        "ripen_entity_status_changes_total",
        &[("type", "single"), ("status", "failed")],
    );
    assert_eq!(failed_entities, 1.0);
    let counts = store.counts(T0).await.expect("counts");
    assert!(counts
        .entities
        .contains(&("single".to_owned(), EntityStatus::Failed, 1)));
}

/// An expire-only claim loses the attempts whose lease ran out and takes
/// nothing: the step is retried by the next real claim.
pub async fn expiring_loses_expired_leases_and_claims_nothing(store: Arc<dyn Store>) {
    let store = &*store;
    let (record, score) = score_claimed_by_w1(store).await;
    let scoring = "worker:scoring";
    let early = store
        .claim_due(Claim::expiring(scoring, 10), score.lease_expires_at_us - 1)
        .await
        .expect("expire");
    assert!(early.attempts.is_empty());
    let s = step(&get(store, record.id).await, "score").state.clone();
    assert_eq!(s.status, StepStatus::Running, "the lease still holds");
    let at = score.lease_expires_at_us;
    let swept = store
        .claim_due(Claim::expiring(scoring, 10), at)
        .await
        .expect("expire");
    assert!(swept.attempts.is_empty(), "nothing is claimed");
    let s = step(&get(store, record.id).await, "score").state.clone();
    assert_eq!(
        (s.status, s.attempts, s.holder),
        (StepStatus::Retrying, 1, None)
    );
    let lost = events(store, record.id)
        .await
        .into_iter()
        .filter(|e| e.kind == "attempt_failed")
        .collect::<Vec<_>>();
    assert_eq!(lost.len(), 1);
    assert_eq!(lost[0].detail["lost"], "lease_expired");
    // A retrying step is not running: expiring again changes nothing.
    let again = store
        .claim_due(Claim::expiring(scoring, 10), at)
        .await
        .expect("expire");
    assert!(again.attempts.is_empty());
    let taken = store
        .claim_due(Claim::by(scoring, 10, Some("w2")), at)
        .await
        .expect("claim")
        .attempts;
    assert_eq!(taken.len(), 1);
    assert_eq!(taken[0].attempt, 2);
}
