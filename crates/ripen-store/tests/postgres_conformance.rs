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
