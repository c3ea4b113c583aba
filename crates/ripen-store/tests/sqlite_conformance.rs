//! The conformance suite against SQLite, one fresh database file per test,
//! plus what only a file-backed store can show.

use std::sync::Arc;

use ripen_core::{Catalog, EntityStatus, StepStatus};
use ripen_store::suite::{catalog, Guarded, T0};
use ripen_store::{
    CommandOutcome, EntityId, IntakeOutcome, NewEntity, SqliteOptions, SqliteStore, Store,
    DEFAULT_TENANT,
};
use tempfile::TempDir;

async fn sqlite_store(catalog: Arc<Catalog>) -> Guarded<SqliteStore, TempDir> {
    let dir = tempfile::tempdir().expect("create a temp dir");
    let store = SqliteStore::open(SqliteOptions::new(dir.path().join("ripen.db")), catalog)
        .expect("open the sqlite store");
    Guarded { store, guard: dir }
}

ripen_store::store_test_suite!(sqlite_store);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn data_survives_reopening_the_file() {
    let dir = tempfile::tempdir().expect("create a temp dir");
    let path = dir.path().join("ripen.db");
    let payload = r#"{"name": "durable"}"#;
    let mut entity = NewEntity {
        id: EntityId::new_v7(),
        tenant: DEFAULT_TENANT.into(),
        type_name: "single".into(),
        version: 1,
        payload: payload.into(),
        idempotency_key: Some("k".into()),
        refs: Vec::new(),
    };

    let store = SqliteStore::open(SqliteOptions::new(&path), catalog()).expect("open");
    let IntakeOutcome::Created(created) = store.create(entity.clone(), T0).await.expect("create")
    else {
        panic!("expected Created");
    };
    let claimed = store
        .claim_due(ripen_store::Claim::local(ripen_core::HTTP_QUEUE, 10), T0)
        .await
        .expect("claim");
    assert_eq!(claimed.attempts.len(), 1);
    let cancelled_id = {
        let other = NewEntity {
            id: EntityId::new_v7(),
            idempotency_key: None,
            ..entity.clone()
        };
        let id = other.id;
        store.create(other, T0).await.expect("create");
        assert!(matches!(
            store.cancel(DEFAULT_TENANT, id, T0).await.expect("cancel"),
            CommandOutcome::Applied(_)
        ));
        id
    };
    let before = store.get(DEFAULT_TENANT, created.id).await.expect("get");
    let history = store
        .events(DEFAULT_TENANT, created.id, 0, 100)
        .await
        .expect("events");
    drop(store);

    let store = SqliteStore::open(SqliteOptions::new(&path), catalog()).expect("reopen");
    assert_eq!(
        store.get(DEFAULT_TENANT, created.id).await.expect("get"),
        before
    );
    assert_eq!(
        store
            .events(DEFAULT_TENANT, created.id, 0, 100)
            .await
            .expect("events"),
        history
    );
    let data = store
        .get_data(DEFAULT_TENANT, created.id)
        .await
        .expect("get_data")
        .expect("found");
    assert_eq!(data.payload.as_deref(), Some(payload));
    let cancelled = store
        .get(DEFAULT_TENANT, cancelled_id)
        .await
        .expect("get")
        .expect("found");
    assert_eq!(cancelled.status, EntityStatus::Cancelled);

    // The idempotency key survives too.
    entity.id = EntityId::new_v7();
    assert!(matches!(
        store.create(entity, T0).await.expect("replay"),
        IntakeOutcome::Replayed(r) if r.id == created.id
    ));

    // The attempt running when the store closed is lost on recovery.
    assert_eq!(store.recover(T0 + 1).await.expect("recover"), 1);
    let recovered = store
        .get(DEFAULT_TENANT, created.id)
        .await
        .expect("get")
        .expect("found");
    assert_eq!(recovered.steps[0].state.status, StepStatus::Retrying);
}

#[tokio::test]
async fn opening_a_newer_schema_is_refused() {
    let dir = tempfile::tempdir().expect("create a temp dir");
    let path = dir.path().join("ripen.db");
    drop(SqliteStore::open(SqliteOptions::new(&path), catalog()).expect("open"));
    let conn = rusqlite::Connection::open(&path).expect("open raw");
    conn.pragma_update(None, "user_version", 99)
        .expect("bump version");
    drop(conn);
    let err = SqliteStore::open(SqliteOptions::new(&path), catalog()).expect_err("newer schema");
    assert!(err.to_string().contains("schema version 99"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn claims_skip_entities_of_an_unknown_pipeline() {
    let dir = tempfile::tempdir().expect("create a temp dir");
    let path = dir.path().join("ripen.db");
    let full = SqliteStore::open(SqliteOptions::new(&path), catalog()).expect("open");
    let partial = SqliteStore::open(
        SqliteOptions::new(&path),
        ripen_store::suite::catalog_without_w5(),
    )
    .expect("open again");
    ripen_store::suite::claims_skip_entities_of_an_unknown_pipeline(
        Arc::new(full),
        Arc::new(partial),
    )
    .await;
}

/// Two stores on one file, the second with other pipelines than the first.
fn two_stores(other: Arc<Catalog>) -> (TempDir, SqliteStore, SqliteStore) {
    let dir = tempfile::tempdir().expect("create a temp dir");
    let path = dir.path().join("ripen.db");
    let full = SqliteStore::open(SqliteOptions::new(&path), catalog()).expect("open");
    let partial = SqliteStore::open(SqliteOptions::new(&path), other).expect("open again");
    (dir, full, partial)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unrunnable_entities_fail_once_with_their_cause() {
    let (_dir, full, partial) = two_stores(ripen_store::suite::catalog_without_w5());
    ripen_store::suite::unrunnable_entities_fail_once_with_their_cause(
        Arc::new(full),
        Arc::new(partial),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn entities_whose_steps_differ_fail_with_the_difference() {
    let (_dir, full, renamed) = two_stores(ripen_store::suite::catalog_with_w5_renamed());
    ripen_store::suite::entities_whose_steps_differ_fail_with_the_difference(
        Arc::new(full),
        Arc::new(renamed),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ready_entity_with_live_steps_becomes_degraded() {
    let (_dir, full, partial) = two_stores(ripen_store::suite::catalog_without_w5());
    ripen_store::suite::a_ready_entity_with_live_steps_becomes_degraded(
        Arc::new(full),
        Arc::new(partial),
    )
    .await;
}
