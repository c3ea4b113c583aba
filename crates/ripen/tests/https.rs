//! `https` steps through the real binary: a TLS downstream whose certificate
//! a test CA signed, the CA given (or not) as `ca_file`, and a downstream
//! that demands a client certificate. A certificate problem fails the step
//! for good, with one handshake and one attempt; a refused connection is
//! still retried.

mod common;

use std::path::PathBuf;
use std::time::Duration;

use common::*;
use ripen_testkit::tls::server_config;
use ripen_testkit::TlsFiles;
use serde_json::{json, Value};

const WAIT: Duration = Duration::from_secs(30);

/// A CA, the certificate it signed for the downstream (`localhost`), a
/// client certificate it signed, and a CA that signed nothing, as PEM text
/// and as files.
struct Pki {
    dir: TempDir,
    server_cert: String,
    server_key: String,
    ca_cert: String,
}

impl Pki {
    fn new() -> Pki {
        let dir = TempDir::new("ripen-https-").expect("a temp dir");
        let (ca, ca_key) = make_ca("Ripen test CA");
        let (other, _) = make_ca("A CA that signed nothing here");
        let server_key = rcgen::KeyPair::generate().unwrap();
        let server = rcgen::CertificateParams::new(vec!["localhost".into()])
            .unwrap()
            .signed_by(&server_key, &ca, &ca_key)
            .unwrap();
        let client_key = rcgen::KeyPair::generate().unwrap();
        let mut client_params = rcgen::CertificateParams::new(Vec::new()).unwrap();
        client_params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "ripen");
        client_params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth];
        let client = client_params.signed_by(&client_key, &ca, &ca_key).unwrap();
        for (name, text) in [
            ("ca.pem", ca.pem()),
            ("other-ca.pem", other.pem()),
            ("client.pem", client.pem()),
            ("client.key", client_key.serialize_pem()),
        ] {
            std::fs::write(dir.path().join(name), text).unwrap();
        }
        Pki {
            dir,
            server_cert: server.pem(),
            server_key: server_key.serialize_pem(),
            ca_cert: ca.pem(),
        }
    }

    fn file(&self, name: &str) -> String {
        let path: PathBuf = self.dir.path().join(name);
        path.display().to_string()
    }

    /// A downstream serving https with the CA's certificate for localhost;
    /// with `mtls`, it demands a client certificate the CA signed.
    async fn downstream(&self, mtls: bool) -> Downstream {
        let ca = mtls.then_some(self.ca_cert.as_str());
        Downstream::start_tls(server_config(&self.server_cert, &self.server_key, ca)).await
    }
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

/// The step's last error, after asserting that it failed for good on its
/// first attempt.
fn failed_once(view: &Value) -> String {
    assert_eq!(view["status"], "failed", "{view:#}");
    let only = step(view, "only");
    assert_eq!(only["status"], "failed", "{view:#}");
    assert_eq!(only["attempts"], 1, "not retried: {view:#}");
    only["last_error"]
        .as_str()
        .unwrap_or_else(|| panic!("no last_error: {view:#}"))
        .to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_https_step_trusts_the_configured_ca_and_a_step_may_name_its_own() {
    let pki = Pki::new();
    let ds = pki.downstream(false).await;
    assert!(ds.base().starts_with("https://localhost:"));
    // `good` trusts the CA of [tls]; `bad` replaces it with one that did not
    // sign the downstream's certificate.
    let cfg = Config::new()
        .tls(TlsFiles::default().ca_file(pki.file("ca.pem")))
        .with_type(single("good", &ds))
        .with_type(single("bad", &ds).map_step("only", |s| {
            s.tls(TlsFiles::default().ca_file(pki.file("other-ca.pem")))
        }));
    let server = Server::start(&cfg).await;

    let good = server.submit_ok("good", &json!({"n": 1})).await;
    let view = server.wait_terminal(&good, WAIT).await;
    assert_eq!(view["status"], "ready", "{view:#}");
    let calls = ds.calls_to(&step_path("good", "only"));
    assert_eq!(calls.len(), 1, "the downstream saw the call");
    assert_eq!(calls[0].entity_id(), Some(good.as_str()));
    assert_eq!(ds.stats().tls_failures(), 0);

    let handshakes_before = ds.stats().tls_handshakes();
    let bad = server.submit_ok("bad", &json!({"n": 2})).await;
    let view = server.wait_terminal(&bad, WAIT).await;
    let error = failed_once(&view);
    assert!(
        error.starts_with("TLS handshake with localhost failed: invalid peer certificate"),
        "{error}"
    );
    assert!(error.contains("UnknownIssuer"), "{error}");
    assert!(ds.calls_to(&step_path("bad", "only")).is_empty());
    // A retry would have shaken hands again; give it the time to.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(ds.stats().tls_handshakes() - handshakes_before, 1);
    assert_eq!(ds.stats().tls_failures(), 1);
    // The history tells the same.
    let events = serde_json::to_string(&server.events(&bad).await).unwrap();
    assert!(
        events.contains("TLS handshake with localhost failed"),
        "{events}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_ca_file_the_system_roots_do_not_trust_a_private_ca() {
    let pki = Pki::new();
    let ds = pki.downstream(false).await;
    let server = Server::start(&Config::new().with_type(single("t", &ds))).await;
    let id = server.submit_ok("t", &json!({})).await;
    let error = failed_once(&server.wait_terminal(&id, WAIT).await);
    assert!(
        error.starts_with(
            "TLS handshake with localhost failed: invalid peer certificate: UnknownIssuer"
        ),
        "{error}"
    );
    assert_eq!(ds.stats().tls_handshakes(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_downstream_that_demands_a_client_certificate_gets_the_configured_one() {
    let pki = Pki::new();
    let ds = pki.downstream(true).await;
    let ca = TlsFiles::default().ca_file(pki.file("ca.pem"));
    let cfg = Config::new()
        .tls(ca.clone())
        .with_type(single("with", &ds).map_step("only", |s| {
            s.tls(
                ca.clone()
                    .client(pki.file("client.pem"), pki.file("client.key")),
            )
        }))
        .with_type(single("without", &ds));
    let server = Server::start(&cfg).await;

    let with = server.submit_ok("with", &json!({})).await;
    let view = server.wait_terminal(&with, WAIT).await;
    assert_eq!(view["status"], "ready", "{view:#}");
    assert_eq!(ds.calls_to(&step_path("with", "only")).len(), 1);
    assert_eq!(ds.stats().tls_failures(), 0);

    let without = server.submit_ok("without", &json!({})).await;
    let error = failed_once(&server.wait_terminal(&without, WAIT).await);
    assert!(
        error.starts_with("TLS handshake with localhost failed: received fatal alert"),
        "{error}"
    );
    assert!(error.contains("client certificate"), "{error}");
    assert!(ds.calls_to(&step_path("without", "only")).is_empty());
    assert_eq!(
        ds.stats().tls_failures(),
        1,
        "{:?}",
        ds.stats().last_tls_failure()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_https_connection_is_still_retried() {
    // A port that was free a moment ago: nothing listens there.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let url = format!("https://127.0.0.1:{port}/t/only");
    let cfg = Config::new().with_type(TypeDef::new("t", vec![Step::http("only", url)]));
    let server = Server::start(&cfg).await;
    let id = server.submit_ok("t", &json!({})).await;
    let view = server.wait_terminal(&id, WAIT).await;
    assert_eq!(view["status"], "failed", "{view:#}");
    let only = step(&view, "only");
    assert_eq!(only["attempts"], 3, "retried up to max_attempts: {view:#}");
    let error = only["last_error"].as_str().unwrap_or_default();
    assert!(error.starts_with("request failed"), "{error}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_on_postgres_over_verified_tls() {
    let pki = Pki::new();
    let cluster = ripen_testkit::PgCluster::start_tls(&pki.server_cert, &pki.server_key);
    let database = |root: &str| {
        let plain = cluster.create_database();
        let db = plain.rsplit('/').next().unwrap().to_owned();
        format!(
            "postgres://postgres@localhost:{}/{db}?sslmode=verify-full&sslrootcert={}",
            cluster.port(),
            pki.file(root)
        )
    };
    let ds = Downstream::start().await;
    let cfg = Config::new().with_type(single("t", &ds));

    let server = Server::start_on(&cfg, &database("ca.pem")).await;
    let id = server.submit_ok("t", &json!({})).await;
    let view = server.wait_terminal(&id, WAIT).await;
    assert_eq!(view["status"], "ready", "{view:#}");
    drop(server);

    // A root that did not sign the server's certificate stops the server at
    // once, saying why.
    let toml = format!(
        "[storage]\nurl = {}\n\n[[types.t.steps]]\nname = \"only\"\nhttp = \"http://127.0.0.1:9/x\"\n",
        ripen_testkit::toml_str(&database("other-ca.pem"))
    );
    let started = std::time::Instant::now();
    let (out, _dir) = serve_bad_config(&toml, &[]).await;
    assert!(!out.success(), "{out}");
    assert!(
        started.elapsed() < Duration::from_secs(15),
        "not waited for like an unreachable database: {out}"
    );
    assert!(
        out.stderr
            .contains("TLS handshake with localhost failed (sslmode=verify-full)")
            && out.stderr.contains("UnknownIssuer"),
        "{out}"
    );
}

/// A GET of `path` over TLS to 127.0.0.1:`port`, checking the server as
/// `localhost` against the CA in `ca_file`: the whole answer, or the
/// handshake's error.
async fn https_get(port: u16, ca_file: &str, path: &str) -> Result<String, String> {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let roots = ripen_tls::read_ca_file(std::path::Path::new(ca_file))?;
    let config = ripen_tls::client_config_verifying(
        ripen_tls::Verify::ChainAndName,
        std::sync::Arc::new(roots),
    );
    let connector = tokio_rustls::TlsConnector::from(std::sync::Arc::new(config));
    let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .map_err(|e| e.to_string())?;
    let name = ripen_tls::rustls::pki_types::ServerName::try_from("localhost").expect("a name");
    let mut tls = connector
        .connect(name, tcp)
        .await
        .map_err(|e| e.to_string())?;
    let request = format!("GET {path} HTTP/1.1\r\nhost: localhost\r\nconnection: close\r\n\r\n");
    tls.write_all(request.as_bytes())
        .await
        .map_err(|e| e.to_string())?;
    let mut answer = Vec::new();
    let _ = tls.read_to_end(&mut answer).await;
    Ok(String::from_utf8_lossy(&answer).into_owned())
}

/// With `server.tls_cert_file` and `server.tls_key_file` the API itself is
/// HTTPS: a client that trusts the CA gets its answers, one that trusts
/// another CA fails its handshake, and plain HTTP gets no answer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_api_can_be_served_over_https() {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let pki = Pki::new();
    std::fs::write(pki.dir.path().join("api.pem"), &pki.server_cert).unwrap();
    std::fs::write(pki.dir.path().join("api.key"), &pki.server_key).unwrap();
    let (cert, key) = (pki.file("api.pem"), pki.file("api.key"));
    let ds = Downstream::start().await;
    let cfg = Config::new().with_type(single("merchant", &ds));
    let server = Server::start_with(move |dir| {
        let toml = cfg.render_on(dir, &storage_url(dir))?;
        Ok(toml.replacen(
            "[server]\n",
            &format!(
                "[server]\ntls_cert_file = {}\ntls_key_file = {}\n",
                ripen_testkit::toml_str(&cert),
                ripen_testkit::toml_str(&key)
            ),
            1,
        ))
    })
    .await;
    assert!(
        server.log().contains("listening on https://"),
        "{}",
        server.log()
    );
    let port: u16 = server
        .addr()
        .rsplit(':')
        .next()
        .and_then(|p| p.parse().ok())
        .expect("a port");

    let answer = https_get(port, &pki.file("ca.pem"), "/healthz")
        .await
        .expect("a client that trusts the CA");
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(answer.contains("\"ok\""), "{answer}");
    let answer = https_get(port, &pki.file("ca.pem"), "/v1/nothing-here")
        .await
        .expect("a client that trusts the CA");
    assert!(answer.starts_with("HTTP/1.1 404"), "{answer}");
    assert!(answer.contains("application/problem+json"), "{answer}");

    let refused = https_get(port, &pki.file("other-ca.pem"), "/healthz").await;
    assert!(
        refused.as_ref().is_err_and(|e| e.contains("UnknownIssuer")),
        "{refused:?}"
    );

    let mut plain = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .expect("connect");
    plain
        .write_all(b"GET /healthz HTTP/1.1\r\nhost: localhost\r\nconnection: close\r\n\r\n")
        .await
        .expect("write");
    let mut got = Vec::new();
    let _ = tokio::time::timeout(WAIT, plain.read_to_end(&mut got)).await;
    assert!(
        !String::from_utf8_lossy(&got).contains("200 OK"),
        "plain HTTP is served: {:?}",
        String::from_utf8_lossy(&got)
    );
}
