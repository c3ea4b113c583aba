//! TLS to PostgreSQL, on a private cluster with `ssl = on` whose server
//! certificate names `localhost` only: each `sslmode` checks what it says,
//! every connection of the store (the LISTEN one too) is encrypted, and a
//! certificate that is not trusted is a clear error, not "unavailable".

use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use ripen_store::suite::{catalog, new_entity, T0};
use ripen_store::{PostgresOptions, PostgresStore, Store, StoreError};
use ripen_testkit::{PgCluster, TempDir};

struct Fixture {
    cluster: PgCluster,
    /// `ca.pem` signed the server's certificate; `other-ca.pem` did not.
    dir: TempDir,
}

/// One TLS cluster for this test binary.
fn fixture() -> &'static Fixture {
    static FIXTURE: OnceLock<Fixture> = OnceLock::new();
    FIXTURE.get_or_init(|| {
        let dir = TempDir::new("ripen-pg-tls-").expect("a temp dir");
        let (ca, ca_key) = make_ca("Ripen test CA");
        let (other, _) = make_ca("Another CA");
        let server_key = rcgen::KeyPair::generate().unwrap();
        let server = rcgen::CertificateParams::new(vec!["localhost".into()])
            .unwrap()
            .signed_by(&server_key, &ca, &ca_key)
            .unwrap();
        std::fs::write(dir.path().join("ca.pem"), ca.pem()).unwrap();
        std::fs::write(dir.path().join("other-ca.pem"), other.pem()).unwrap();
        let cluster = PgCluster::start_tls(&server.pem(), &server_key.serialize_pem());
        Fixture { cluster, dir }
    })
}

fn make_ca(name: &str) -> (rcgen::Certificate, rcgen::KeyPair) {
    let key = rcgen::KeyPair::generate().unwrap();
    let mut params = rcgen::CertificateParams::new(Vec::new()).unwrap();
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, name);
    (params.self_signed(&key).unwrap(), key)
}

/// A fresh database's URL on `host`, with `params` appended.
fn db_url(host: &str, params: &str) -> (String, String) {
    let f = fixture();
    let plain = f.cluster.create_database();
    let db = plain.rsplit('/').next().unwrap().to_owned();
    let url = format!(
        "postgres://postgres@{host}:{}/{db}?{params}",
        f.cluster.port()
    );
    (url, db)
}

fn root(name: &str) -> PathBuf {
    fixture().dir.path().join(name)
}

fn path(p: &Path) -> String {
    p.display().to_string()
}

async fn connect(url: &str) -> Result<PostgresStore, StoreError> {
    PostgresStore::connect(PostgresOptions::new(url), catalog()).await
}

/// Whether each connection to `db` (other than this query's own) is
/// encrypted, as the server sees it.
async fn ssl_of_connections(db: &str) -> Vec<(bool, String)> {
    let admin = fixture().cluster.url("postgres");
    let (client, connection) = tokio_postgres::connect(&admin, tokio_postgres::NoTls)
        .await
        .expect("connect to the admin database");
    let driver = tokio::spawn(connection);
    let rows = client
        .query(
            "SELECT s.ssl, a.query FROM pg_stat_ssl s JOIN pg_stat_activity a USING (pid) \
             WHERE a.datname = $1",
            &[&db],
        )
        .await
        .expect("read pg_stat_ssl");
    drop(client);
    let _ = driver.await;
    rows.iter().map(|r| (r.get(0), r.get(1))).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_full_with_the_right_root_encrypts_every_connection() {
    let ca = path(&root("ca.pem"));
    let (url, db) = db_url(
        "localhost",
        &format!("sslmode=verify-full&sslrootcert={ca}"),
    );
    let store = connect(&url)
        .await
        .expect("verify-full with the right root");
    store.watch_work(Arc::new(|_: Option<&str>| {}));
    let created = store.create(new_entity("single", "{}"), T0).await;
    assert!(created.is_ok(), "{created:?}");
    // The listener connects on its own task; wait for its LISTEN.
    let mut connections = Vec::new();
    for _ in 0..100 {
        connections = ssl_of_connections(&db).await;
        if connections.iter().any(|(_, q)| q.starts_with("LISTEN")) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        connections.iter().any(|(_, q)| q.starts_with("LISTEN")),
        "the LISTEN connection: {connections:?}"
    );
    assert!(connections.len() >= 2, "{connections:?}");
    assert!(
        connections.iter().all(|(ssl, _)| *ssl),
        "every connection is encrypted: {connections:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_root_that_did_not_sign_the_server_certificate_is_refused_for_good() {
    let other = path(&root("other-ca.pem"));
    let (url, _) = db_url(
        "localhost",
        &format!("sslmode=verify-full&sslrootcert={other}"),
    );
    match connect(&url).await {
        Err(StoreError::Internal(e)) => {
            assert!(
                e.contains("TLS handshake with localhost failed (sslmode=verify-full)"),
                "{e}"
            );
            assert!(e.contains("UnknownIssuer"), "{e}");
        }
        other => panic!("expected a TLS error, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_full_checks_the_name_and_verify_ca_does_not() {
    let ca = path(&root("ca.pem"));
    // The certificate names localhost, not 127.0.0.1.
    let (url, _) = db_url(
        "127.0.0.1",
        &format!("sslmode=verify-full&sslrootcert={ca}"),
    );
    match connect(&url).await {
        Err(StoreError::Internal(e)) => {
            assert!(e.contains("TLS handshake with 127.0.0.1 failed"), "{e}");
            assert!(e.contains("not valid for name"), "{e}");
        }
        other => panic!("expected a name mismatch, got {other:?}"),
    }
    let (url, _) = db_url("127.0.0.1", &format!("sslmode=verify-ca&sslrootcert={ca}"));
    connect(&url).await.expect("verify-ca ignores the name");
    // verify-ca still checks the chain.
    let other = path(&root("other-ca.pem"));
    let (url, _) = db_url(
        "127.0.0.1",
        &format!("sslmode=verify-ca&sslrootcert={other}"),
    );
    let e = connect(&url)
        .await
        .expect_err("verify-ca with the wrong root");
    assert!(e.to_string().contains("UnknownIssuer"), "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn require_encrypts_without_checking_and_disable_does_not_encrypt() {
    let (url, db) = db_url("127.0.0.1", "sslmode=require");
    let store = connect(&url).await.expect("require trusts any certificate");
    let connections = ssl_of_connections(&db).await;
    assert!(
        !connections.is_empty() && connections.iter().all(|(ssl, _)| *ssl),
        "{connections:?}"
    );
    drop(store);
    let (url, db) = db_url("127.0.0.1", "sslmode=disable");
    let _store = connect(&url).await.expect("disable");
    let connections = ssl_of_connections(&db).await;
    assert!(
        !connections.is_empty() && connections.iter().all(|(ssl, _)| !*ssl),
        "{connections:?}"
    );
}
