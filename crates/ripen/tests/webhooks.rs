//! Signed webhooks through the real binary: a real receiver process checks
//! every signature with the reference Standard Webhooks library, and the
//! tests cover order, a receiver that is down and comes back, one that
//! always fails (dead, then redelivered), `kill -9` during a delivery, the
//! SSRF refusal at creation, and two nodes sharing PostgreSQL.
//!
//! The receiver needs a Python with `standardwebhooks`: `scripts/test` makes
//! a virtual environment with it and passes it in `RIPEN_TEST_PYTHON`.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use common::*;
use hyper::Method;
use serde_json::{json, Value};

/// The receiver process, killed on drop.
struct Receiver {
    child: Child,
    api: Api,
    _dir: TempDir,
}

impl Drop for Receiver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Receiver {
    async fn start() -> Receiver {
        let python = std::env::var("RIPEN_TEST_PYTHON").unwrap_or_else(|_| "python3".into());
        let probe = Command::new(&python)
            .args(["-c", "import standardwebhooks.webhooks"])
            .output();
        assert!(
            probe.is_ok_and(|o| o.status.success()),
            "{python} cannot import standardwebhooks: run scripts/test, which makes a \
             virtual environment with it, or set RIPEN_TEST_PYTHON to a Python that has it"
        );
        let dir = TempDir::new("ripen-hooks-").expect("temp dir");
        let port_file = dir.path().join("port");
        let script = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/support/webhook_receiver.py"
        );
        let child = Command::new(&python)
            .arg(script)
            .arg(&port_file)
            .spawn()
            .expect("start the webhook receiver");
        let deadline = Instant::now() + Duration::from_secs(20);
        let port = loop {
            if let Ok(p) = std::fs::read_to_string(&port_file) {
                if let Ok(p) = p.trim().parse::<u16>() {
                    break p;
                }
            }
            assert!(Instant::now() < deadline, "the receiver did not start");
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        Receiver {
            child,
            api: Api::new(&format!("http://127.0.0.1:{port}")),
            _dir: dir,
        }
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.api.base())
    }

    async fn set(&self, what: &str, value: &str) {
        let r = self
            .api
            .request(
                Method::PUT,
                &format!("/_{what}"),
                &[],
                Some(value.as_bytes().to_vec()),
            )
            .await;
        assert_eq!(r.status, 204, "set {what}: {r}");
    }

    async fn received(&self) -> Vec<Value> {
        match self.api.get("/_received").await.json() {
            Value::Array(items) => items,
            other => panic!("received: {other}"),
        }
    }

    /// Waits until `done` holds for what was received.
    async fn wait_for(
        &self,
        what: &str,
        timeout: Duration,
        done: impl Fn(&[Value]) -> bool,
    ) -> Vec<Value> {
        let deadline = Instant::now() + timeout;
        loop {
            let got = self.received().await;
            if done(&got) {
                return got;
            }
            assert!(
                Instant::now() < deadline,
                "timed out waiting for {what}; received {}: {:#}",
                got.len(),
                Value::Array(got.into_iter().rev().take(5).collect())
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// A server that may reach loopback receivers, with fast retries, sealing
/// secrets with the key in `key` (nodes that share a database share it).
fn config(ds: &Downstream, key: &TempDir, extra_notify: &[&str]) -> Config {
    let key_file = key.path().join("master.key");
    let mut c = Config::new()
        .with_type(single("merchant", ds))
        .with_type(single("store", ds))
        .notify("allow_networks = [\"127.0.0.0/8\"]")
        .notify("initial_backoff = \"50ms\"")
        .notify("max_backoff = \"200ms\"")
        .notify(&format!(
            "master_key_file = {}",
            ripen_testkit::toml_str(&key_file.to_string_lossy())
        ));
    for line in extra_notify {
        c = c.notify(line);
    }
    c
}

/// Creates a subscription and hands its secret to the receiver.
async fn subscribe(server: &Api, receiver: &Receiver, body: Value) -> Value {
    let r = server.post("/v1/subscriptions", &body).await;
    assert_eq!(r.status, 201, "create a subscription: {r}");
    let sub = r.json();
    let secret = sub["secret"].as_str().expect("a secret").to_owned();
    assert!(secret.starts_with("whsec_"), "{secret}");
    receiver.set("secret", &secret).await;
    sub
}

fn key() -> TempDir {
    TempDir::new("ripen-key-").expect("temp dir")
}

fn entity_of(d: &Value) -> &str {
    d["payload"]["data"]["id"].as_str().unwrap_or("")
}

fn verified_ok(got: &[Value]) -> Vec<&Value> {
    got.iter()
        .filter(|d| d["verified"] == true && d["answered"] == 200)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deliveries_are_signed_filtered_and_in_entity_order() {
    let ds = Downstream::start().await;
    let receiver = Receiver::start().await;
    let k = key();
    let server = Server::start(&config(&ds, &k, &[])).await;
    let sub = subscribe(
        &server,
        &receiver,
        json!({"url": receiver.url("/hooks"), "types": ["merchant"]}),
    )
    .await;
    assert_eq!(sub["events"], json!([]), "every event");
    assert!(sub.get("deliveries").is_none());
    const N: usize = 20;
    let mut ids = BTreeSet::new();
    for i in 0..N {
        ids.insert(server.submit_ok("merchant", &json!({"n": i})).await);
    }
    // Another type's entities are not for this subscription.
    let other = server.submit_ok("store", &json!({})).await;
    for id in &ids {
        server.wait_terminal(id, Duration::from_secs(20)).await;
    }
    server.wait_terminal(&other, Duration::from_secs(20)).await;
    let got = receiver
        .wait_for(
            "created and ready of every merchant",
            Duration::from_secs(30),
            |got| verified_ok(got).len() >= 2 * N,
        )
        .await;
    let _ = got;
    // Anything more (a duplicate, another type's) would come soon after.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let got = receiver.received().await;
    for d in &got {
        assert_eq!(
            d["verified"], true,
            "a signature that does not verify: {d:#}"
        );
        assert_eq!(d["path"], "/hooks");
        assert_ne!(entity_of(d), other, "a store entity was sent: {d:#}");
    }
    let mut per_entity: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
    for d in &got {
        per_entity
            .entry(entity_of(d))
            .or_default()
            .push(d["payload"]["type"].as_str().unwrap_or(""));
        let id = d["id"].as_str().unwrap_or("");
        let seq = d["payload"]["data"]["seq"].as_u64().unwrap_or(0);
        assert_eq!(
            id,
            format!("evt_{}_{seq}", entity_of(d).replace('-', "")),
            "webhook-id names the entity and the change"
        );
        assert_eq!(d["payload"]["data"]["type"], "merchant");
        assert!(d["payload"]["timestamp"]
            .as_str()
            .is_some_and(|t| t.ends_with('Z')));
    }
    assert_eq!(per_entity.len(), N);
    for (id, kinds) in &per_entity {
        assert_eq!(
            kinds,
            &vec!["entity.created", "entity.ready"],
            "{id}: each entity's notifications in order, once each"
        );
    }
    let r = server
        .get(&format!(
            "/v1/subscriptions/{}",
            sub["id"].as_str().unwrap()
        ))
        .await;
    assert_eq!(r.status, 200, "{r}");
    let view = r.json();
    assert_eq!(view["deliveries"]["delivered"], 2 * N);
    assert!(
        view.get("secret").is_none(),
        "the secret is shown once: {view}"
    );
    let list = server.get("/v1/subscriptions").await.json();
    assert_eq!(list["items"].as_array().map(Vec::len), Some(1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_receiver_that_is_down_then_back_gets_everything() {
    let ds = Downstream::start().await;
    let receiver = Receiver::start().await;
    receiver.set("status", "503").await;
    let k = key();
    let server = Server::start(&config(&ds, &k, &[])).await;
    let sub = subscribe(
        &server,
        &receiver,
        json!({"url": receiver.url("/down"), "events": ["entity.ready"]}),
    )
    .await;
    let sub_id = sub["id"].as_str().unwrap().to_owned();
    let mut ids = BTreeSet::new();
    for i in 0..5 {
        ids.insert(server.submit_ok("merchant", &json!({"n": i})).await);
    }
    receiver
        .wait_for("failed attempts", Duration::from_secs(20), |got| {
            got.len() >= 10
        })
        .await;
    let pending = server
        .get(&format!(
            "/v1/subscriptions/{sub_id}/deliveries?status=pending"
        ))
        .await
        .json();
    let items = pending["items"].as_array().expect("items");
    assert_eq!(items.len(), 5, "{pending:#}");
    assert!(items
        .iter()
        .all(|d| d["last_code"] == 503 && d["attempts"].as_u64() >= Some(1)));
    receiver.set("status", "200").await;
    let got = receiver
        .wait_for("every ready, delivered", Duration::from_secs(30), |got| {
            let delivered: BTreeSet<&str> = verified_ok(got).iter().map(|d| entity_of(d)).collect();
            delivered.len() == 5
        })
        .await;
    let delivered: BTreeSet<String> = verified_ok(&got)
        .iter()
        .map(|d| entity_of(d).to_owned())
        .collect();
    assert_eq!(delivered, ids);
    assert!(got.iter().all(|d| d["payload"]["type"] == "entity.ready"));
    // Every retry of one notification carried the same webhook-id.
    let mut ids_per_entity: BTreeMap<&str, BTreeSet<&str>> = BTreeMap::new();
    for d in &got {
        ids_per_entity
            .entry(entity_of(d))
            .or_default()
            .insert(d["id"].as_str().unwrap_or(""));
    }
    assert!(
        ids_per_entity.values().all(|s| s.len() == 1),
        "{ids_per_entity:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_receiver_that_always_fails_goes_dead_and_is_redelivered() {
    let ds = Downstream::start().await;
    let receiver = Receiver::start().await;
    receiver.set("status", "500").await;
    let k = key();
    let server = Server::start(&config(&ds, &k, &["retry_for = \"1s\""])).await;
    let sub = subscribe(
        &server,
        &receiver,
        json!({"url": receiver.url("/dead"), "events": ["entity.created"]}),
    )
    .await;
    let sub_id = sub["id"].as_str().unwrap().to_owned();
    let id = server.submit_ok("merchant", &json!({})).await;
    let path = format!("/v1/subscriptions/{sub_id}/deliveries?status=dead");
    let deadline = Instant::now() + Duration::from_secs(20);
    let dead = loop {
        let page = server.get(&path).await.json();
        if let Some(d) = page["items"].as_array().and_then(|i| i.first()).cloned() {
            break d;
        }
        assert!(Instant::now() < deadline, "no dead delivery: {page}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(dead["entity_id"], id);
    assert_eq!(dead["last_code"], 500);
    assert!(
        dead["attempts"].as_u64() >= Some(2),
        "retried first: {dead}"
    );
    let tried = receiver.received().await.len();
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        receiver.received().await.len(),
        tried,
        "a dead delivery is not retried"
    );
    // Redeliver once the receiver is fixed.
    receiver.set("status", "200").await;
    let delivery = dead["id"].as_u64().unwrap();
    let r = server
        .post_empty(&format!("/v1/deliveries/{delivery}/redeliver"))
        .await;
    assert_eq!(r.status, 202, "{r}");
    let again = server
        .post_empty(&format!("/v1/deliveries/{delivery}/redeliver"))
        .await;
    assert_problem_in(&again, &[409]);
    let got = receiver
        .wait_for("the redelivery", Duration::from_secs(20), |got| {
            !verified_ok(got).is_empty()
        })
        .await;
    let ok = verified_ok(&got)[0];
    assert_eq!(ok["id"], dead["webhook_id"], "the same webhook-id");
    assert_problem(
        &server.post_empty("/v1/deliveries/999999/redeliver").await,
        404,
    );
    let delivered = server
        .get(&format!(
            "/v1/subscriptions/{sub_id}/deliveries?status=delivered"
        ))
        .await
        .json();
    assert_eq!(delivered["items"][0]["id"], delivery);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_during_a_delivery_delivers_it_again_with_the_same_id() {
    let ds = Downstream::start().await;
    let receiver = Receiver::start().await;
    receiver.set("delay", "3").await;
    let k = key();
    let mut server = Server::start(&config(&ds, &k, &["timeout = \"1s\""])).await;
    subscribe(
        &server,
        &receiver,
        json!({"url": receiver.url("/slow"), "events": ["entity.created"]}),
    )
    .await;
    let id = server.submit_ok("merchant", &json!({})).await;
    receiver
        .wait_for("the first attempt", Duration::from_secs(20), |got| {
            !got.is_empty()
        })
        .await;
    server.kill();
    receiver.set("delay", "0").await;
    server.restart().await;
    let got = receiver
        .wait_for(
            "a delivery after the restart",
            Duration::from_secs(30),
            |got| {
                got.iter().filter(|d| entity_of(d) == id).count() >= 2
                    && got
                        .iter()
                        .any(|d| d["answered"] == 200 && d["verified"] == true)
            },
        )
        .await;
    let ids: BTreeSet<&str> = got.iter().map(|d| d["id"].as_str().unwrap_or("")).collect();
    assert_eq!(ids.len(), 1, "one notification, one webhook-id: {ids:?}");
}

/// A master key rotation: a start with the new key followed by the old one
/// seals the subscription's secret again, and the new key alone then signs
/// with the same secret, which the receiver still verifies.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rotated_master_key_keeps_signing_with_the_same_secret() {
    let ds = Downstream::start().await;
    let receiver = Receiver::start().await;
    let k = key();
    let key_file = k.path().join("master.key");
    let mut server = Server::start(&config(&ds, &k, &[])).await;
    subscribe(
        &server,
        &receiver,
        json!({"url": receiver.url("/hooks"), "events": ["entity.ready"]}),
    )
    .await;
    let before = server.submit_ok("merchant", &json!({})).await;
    receiver
        .wait_for("the ready of the first", Duration::from_secs(30), |got| {
            verified_ok(got).iter().any(|d| entity_of(d) == before)
        })
        .await;

    let old_key = std::fs::read_to_string(&key_file).expect("read the key file");
    let new_key = "a7".repeat(32);
    server.kill();
    std::fs::write(&key_file, format!("{new_key},{}", old_key.trim())).expect("write the ring");
    server.restart().await;
    let log = server.log();
    let rotated = log
        .lines()
        .find(|l| l.contains("master key rotation"))
        .unwrap_or_else(|| panic!("no rotation line in the log:\n{log}"));
    assert!(rotated.contains("secrets=1"), "{rotated}");
    assert!(rotated.contains("written=1"), "{rotated}");

    server.kill();
    std::fs::write(&key_file, format!("{new_key}\n")).expect("write the new key");
    server.restart().await;
    let after = server.submit_ok("merchant", &json!({})).await;
    let got = receiver
        .wait_for("the ready of the second", Duration::from_secs(30), |got| {
            got.iter().any(|d| entity_of(d) == after)
        })
        .await;
    for d in got.iter().filter(|d| entity_of(d) == after) {
        assert_eq!(d["verified"], true, "signed with the same secret: {d:#}");
        assert_eq!(d["answered"], 200, "{d:#}");
    }
    assert!(
        !server.log().contains("does not open"),
        "{}",
        server.log_tail(20)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscriptions_refuse_private_addresses_and_bad_fields() {
    let ds = Downstream::start().await;
    // No allowed ranges: loopback and private addresses are refused.
    let server = Server::start(&Config::new().with_type(single("merchant", &ds))).await;
    for url in [
        "http://127.0.0.1:9/x",
        "http://2130706433/",
        "http://[::ffff:127.0.0.1]/",
        "http://169.254.169.254/latest/meta-data",
        "http://10.0.0.1/",
        "http://localhost/",
        "http://user@example.com@127.0.0.1/",
        "ftp://example.com/",
        "http:///nohost",
    ] {
        let r = server.post("/v1/subscriptions", &json!({"url": url})).await;
        let p = assert_problem(&r, 422);
        assert!(
            p["detail"].as_str().is_some_and(|d| !d.is_empty()),
            "{url}: {p}"
        );
    }
    let r = server
        .post(
            "/v1/subscriptions",
            &json!({"url": "https://example.com/", "events": ["entity.exploded"]}),
        )
        .await;
    let p = assert_problem(&r, 422);
    assert!(p["detail"].as_str().unwrap_or("").contains("events"), "{p}");
    let r = server
        .post(
            "/v1/subscriptions",
            &json!({"url": "https://example.com/", "types": ["nope"]}),
        )
        .await;
    let p = assert_problem(&r, 422);
    assert!(
        p["detail"].as_str().unwrap_or("").contains("merchant"),
        "names the known types: {p}"
    );
    assert_problem(
        &server.post_bytes("/v1/subscriptions", b"{".to_vec()).await,
        400,
    );
    assert_problem(
        &server.post("/v1/subscriptions", &json!({"url": 5})).await,
        422,
    );
    assert_problem(
        &server.post("/v1/subscriptions", &json!({"nope": 1})).await,
        422,
    );
    assert_problem(&server.get("/v1/subscriptions/sub_nope").await, 404);
    assert_problem(
        &server.get("/v1/subscriptions/sub_nope/deliveries").await,
        404,
    );
    assert_problem(
        &server
            .request(Method::DELETE, "/v1/subscriptions/sub_nope", &[], None)
            .await,
        404,
    );
    assert_problem(&server.post_empty("/v1/deliveries/x/redeliver").await, 404);
}

/// Two nodes share one PostgreSQL database: every notification is delivered,
/// and none twice (the receiver answers at once, so no lease runs out).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_nodes_deliver_each_notification_once() {
    if std::env::var("RIPEN_TEST_STORAGE").as_deref() != Ok("postgres") {
        // One SQLite file has one node; the PostgreSQL run covers this.
        return;
    }
    let ds = Downstream::start().await;
    let receiver = Receiver::start().await;
    let url = ripen_testkit::PgCluster::shared().create_database();
    let shared_key = key();
    let cfg = config(&ds, &shared_key, &[]);
    let a = Server::start_on(&cfg, &url).await;
    let b = Server::start_on(&cfg, &url).await;
    subscribe(&a, &receiver, json!({"url": receiver.url("/two")})).await;
    const N: usize = 30;
    for i in 0..N {
        let node = if i % 2 == 0 { &a } else { &b };
        node.submit_ok("merchant", &json!({"n": i})).await;
    }
    let got = receiver
        .wait_for(
            "created and ready of every entity",
            Duration::from_secs(40),
            |got| verified_ok(got).len() >= 2 * N,
        )
        .await;
    let _ = got;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let got = receiver.received().await;
    let mut seen = BTreeMap::new();
    for d in &got {
        *seen
            .entry(d["id"].as_str().unwrap_or("").to_owned())
            .or_insert(0) += 1;
    }
    assert_eq!(seen.len(), 2 * N);
    assert!(
        seen.values().all(|n| *n == 1),
        "a notification sent twice: {seen:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_manages_subscriptions() {
    let ds = Downstream::start().await;
    let receiver = Receiver::start().await;
    let k = key();
    let server = Server::start(&config(&ds, &k, &[])).await;
    let dir = server.dir().to_owned();
    let ripen = |args: &[&str]| {
        let mut all: Vec<String> = args.iter().map(|a| a.to_string()).collect();
        all.extend(["--server".to_owned(), server.addr()]);
        run_ripen(all, dir.clone(), Duration::from_secs(20))
    };
    let created = ripen(&[
        "subscriptions",
        "create",
        &receiver.url("/cli"),
        "--event",
        "entity.ready",
        "--output",
        "json",
    ])
    .await;
    assert!(created.success(), "{created}");
    let sub: Value = serde_json::from_str(&created.stdout).expect("json");
    let id = sub["id"].as_str().expect("id").to_owned();
    receiver
        .set("secret", sub["secret"].as_str().expect("secret"))
        .await;
    let entity = server.submit_ok("merchant", &json!({})).await;
    receiver
        .wait_for("the ready delivery", Duration::from_secs(20), |got| {
            verified_ok(got).iter().any(|d| entity_of(d) == entity)
        })
        .await;
    let list = ripen(&["subscriptions", "list"]).await;
    assert!(list.success() && list.stdout.contains(&id), "{list}");
    assert!(list.stdout.contains("entity.ready / all"), "{list}");
    let deliveries = ripen(&["subscriptions", "deliveries", &id, "--status", "delivered"]).await;
    assert!(
        deliveries.success() && deliveries.stdout.contains(&entity),
        "{deliveries}"
    );
    let refused = ripen(&["subscriptions", "create", "http://10.1.2.3/x"]).await;
    assert!(!refused.success(), "{refused}");
    assert!(
        refused.stderr.contains("private") && !refused.stderr.contains("panicked"),
        "a friendly refusal: {refused}"
    );
    let redeliver = ripen(&["subscriptions", "redeliver", "424242"]).await;
    assert!(
        !redeliver.success() && redeliver.stderr.contains("404"),
        "{redeliver}"
    );
    let deleted = ripen(&["subscriptions", "delete", &id]).await;
    assert!(deleted.success(), "{deleted}");
    let again = ripen(&["subscriptions", "get", &id]).await;
    assert!(
        !again.success() && again.stderr.contains("no subscription"),
        "{again}"
    );
}
