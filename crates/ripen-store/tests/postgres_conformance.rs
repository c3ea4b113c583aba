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
