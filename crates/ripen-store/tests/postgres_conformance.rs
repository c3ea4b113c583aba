//! The conformance suite against PostgreSQL: one cluster per test binary
//! (started by `ripen-testkit`), one fresh database per test.

use std::sync::Arc;

use ripen_core::Catalog;
use ripen_store::{PostgresOptions, PostgresStore};
use ripen_testkit::PgCluster;

async fn pg_store(catalog: Arc<Catalog>) -> PostgresStore {
    let url = PgCluster::shared().create_database();
    PostgresStore::connect(PostgresOptions::new(url), catalog)
        .await
        .expect("connect the postgres store")
}

ripen_store::store_test_suite!(pg_store);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn claims_skip_entities_of_an_unknown_pipeline() {
    let url = PgCluster::shared().create_database();
    let full = PostgresStore::connect(PostgresOptions::new(&url), ripen_store::suite::catalog())
        .await
        .expect("connect");
    let partial = PostgresStore::connect(
        PostgresOptions::new(&url),
        ripen_store::suite::catalog_without_w5(),
    )
    .await
    .expect("connect again");
    ripen_store::suite::claims_skip_entities_of_an_unknown_pipeline(
        Arc::new(full),
        Arc::new(partial),
    )
    .await;
}

/// Two stores on one database, the second with other pipelines.
async fn two_stores(other: Arc<Catalog>) -> (PostgresStore, PostgresStore) {
    let url = PgCluster::shared().create_database();
    let full = PostgresStore::connect(PostgresOptions::new(&url), ripen_store::suite::catalog())
        .await
        .expect("connect");
    let partial = PostgresStore::connect(PostgresOptions::new(&url), other)
        .await
        .expect("connect again");
    (full, partial)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unrunnable_entities_fail_once_with_their_cause() {
    let (full, partial) = two_stores(ripen_store::suite::catalog_without_w5()).await;
    ripen_store::suite::unrunnable_entities_fail_once_with_their_cause(
        Arc::new(full),
        Arc::new(partial),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn entities_whose_steps_differ_fail_with_the_difference() {
    let (full, renamed) = two_stores(ripen_store::suite::catalog_with_w5_renamed()).await;
    ripen_store::suite::entities_whose_steps_differ_fail_with_the_difference(
        Arc::new(full),
        Arc::new(renamed),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ready_entity_with_live_steps_becomes_degraded() {
    let (full, partial) = two_stores(ripen_store::suite::catalog_without_w5()).await;
    ripen_store::suite::a_ready_entity_with_live_steps_becomes_degraded(
        Arc::new(full),
        Arc::new(partial),
    )
    .await;
}
