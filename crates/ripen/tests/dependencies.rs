//! Entity dependencies through the real binary (docs/dependencies.md), on
//! SQLite and on a real PostgreSQL:
//!
//! - a `store` references its `merchant`: it waits (every step `blocked`,
//!   the reason in the view) and runs once the merchant is `ready`;
//! - a merchant that fails or is cancelled fails its stores with cause
//!   `dependency_failed`; a retried merchant does not revive them, and a
//!   retried store checks its reference again;
//! - intake refuses a reference to a missing entity, one of another type,
//!   a failed or a cancelled one, or a field that holds no id (422);
//! - a chain of links (1,000 on SQLite) settles in order, each link
//!   starting after the one it references is ready, and a failure at its
//!   root cascades to its end;
//! - dependents still resolve after a kill -9 of the node while they wait;
//! - two nodes on one PostgreSQL: the merchant claimed on one node, the
//!   store on the other, and the store's worker long-polling the second
//!   node is woken by the first node's commit.
//!
//! Merchants and stores are worker steps that the test itself claims and
//! finishes, so that it decides when each one settles; links are HTTP
//! steps on the fake downstream.

mod common;

use std::time::{Duration, Instant};

use common::*;
use ripen_testkit::PgCluster;
use serde_json::{json, Value};

const SETTLE: Duration = Duration::from_secs(30);
const MERCHANTS: &str = "merchants";
const STORES: &str = "stores";

fn config(ds: &Downstream) -> Config {
    let merchant = TypeDef::new("merchant", vec![Step::worker("kyc", MERCHANTS)]);
    let store = TypeDef::new("store", vec![Step::worker("open", STORES)])
        .references("merchant_id", "merchant");
    let link = single("link", ds)
        .references("prev", "link")
        .references("merchant_id", "merchant");
    Config::new()
        .with_type(merchant)
        .with_type(store)
        .with_type(link)
}

async fn postgres_url() -> String {
    tokio::task::spawn_blocking(|| PgCluster::shared().create_database())
        .await
        .expect("create a database")
}

async fn start(cfg: &Config, url: Option<&str>) -> Server {
    match url {
        None => Server::start_with(|dir| cfg.render_on(dir, &ripen_testkit::sqlite_url(dir))).await,
        Some(url) => Server::start_on(cfg, url).await,
    }
}

/// Claims the task of `entity` in `queue` through `api` (waiting for it to
/// come due) and completes it, or fails it for good.
async fn work(api: &Api, queue: &str, entity: &str, succeed: bool) {
    let deadline = Instant::now() + SETTLE;
    loop {
        assert!(
            Instant::now() < deadline,
            "no task of {entity} came due in {queue}"
        );
        let r = api
            .post(
                &format!("/v1/queues/{queue}/claim"),
                &json!({"max": 1, "wait_ms": 2_000}),
            )
            .await;
        assert_eq!(r.status, 200, "claim: {r}");
        let Some(task) = r.json()["tasks"]
            .as_array()
            .and_then(|t| t.first().cloned())
        else {
            continue;
        };
        assert_eq!(
            task["entity_id"], entity,
            "the only task due in {queue} is {entity}'s: {task}"
        );
        let id = task["task_id"].as_str().expect("task id").to_owned();
        let lease = task["lease"].clone();
        let r = if succeed {
            api.post(
                &format!("/v1/tasks/{id}/complete"),
                &json!({"lease": lease, "output": {"ok": true}}),
            )
            .await
        } else {
            api.post(
                &format!("/v1/tasks/{id}/fail"),
                &json!({"lease": lease, "error": "refused by the test", "retryable": false}),
            )
            .await
        };
        assert_eq!(r.status, 200, "finish the task of {entity}: {r}");
        return;
    }
}

/// Asserts that nothing of `queue` is due now.
async fn nothing_due(api: &Api, queue: &str) {
    let r = api
        .post(
            &format!("/v1/queues/{queue}/claim"),
            &json!({"max": 1, "wait_ms": 300}),
        )
        .await;
    assert_eq!(r.status, 200, "claim: {r}");
    assert_eq!(
        r.json()["tasks"],
        json!([]),
        "nothing may be due in {queue}: {r}"
    );
}

async fn wait_status(api: &Api, id: &str, status: &str) -> Value {
    api.wait_until(id, SETTLE, status, |v| v["status"] == status)
        .await
}

/// Asserts the view of an entity that waits for `parent`.
fn assert_waits_for(view: &Value, kind: &str, parent: &str) {
    assert_eq!(view["status"], "pending", "{view:#}");
    for s in view["steps"].as_array().expect("steps") {
        assert_eq!(s["status"], "blocked", "{view:#}");
        assert_eq!(
            s["reason"],
            format!("waiting for {kind} {parent}"),
            "{view:#}"
        );
    }
}

fn assert_failed_by(view: &Value, parent: &str, status: &str) {
    assert_eq!(view["status"], "failed", "{view:#}");
    assert_eq!(view["failure"]["cause"], "dependency_failed", "{view:#}");
    assert_eq!(view["failure"]["entity_id"], parent, "{view:#}");
    assert_eq!(view["failure"]["status"], status, "{view:#}");
    for s in view["steps"].as_array().expect("steps") {
        assert_eq!(s["status"], "skipped", "{view:#}");
    }
}

// ---------------------------------------------------------------------------
// Waiting, releasing, failing, retrying

async fn parent_ready_then_failed(url: Option<&str>) {
    let ds = Downstream::start().await;
    let srv = start(&config(&ds), url).await;

    // A store waits for its merchant, and runs once the merchant is ready.
    let merchant = srv.submit_ok("merchant", &json!({"name": "m"})).await;
    let r = srv
        .submit("store", &json!({"merchant_id": merchant}), None)
        .await;
    assert_eq!(r.status, 202, "{r}");
    let store = r.json()["id"].as_str().expect("id").to_owned();
    assert_waits_for(&r.json(), "merchant", &merchant);
    assert_eq!(
        r.json()["dependencies"],
        json!([{"entity_id": merchant, "field": "merchant_id", "status": "pending", "type": "merchant"}])
    );
    nothing_due(&srv, STORES).await;
    assert_waits_for(&srv.entity(&store).await, "merchant", &merchant);
    work(&srv, MERCHANTS, &merchant, true).await;
    let ready_at = wait_status(&srv, &merchant, "ready").await["ready_at"].clone();
    work(&srv, STORES, &store, true).await;
    let view = wait_status(&srv, &store, "ready").await;
    assert_eq!(view["dependencies"][0]["status"], "ready");
    let history = srv.events(&store).await;
    let released = history
        .iter()
        .find(|e| event_kind(e) == "dependency_ready")
        .unwrap_or_else(|| panic!("no dependency_ready in {history:#?}"));
    let started = history
        .iter()
        .find(|e| event_kind(e) == "step_started")
        .expect("the store's step started");
    assert!(
        started["at"].as_str() >= ready_at.as_str() && released["at"].as_str() >= ready_at.as_str(),
        "the store started ({started}) before its merchant was ready ({ready_at})"
    );
    assert_lifecycle(&history);

    // A failed merchant fails its stores, naming itself.
    let merchant = srv.submit_ok("merchant", &json!({"name": "bad"})).await;
    let mut stores = Vec::new();
    for _ in 0..3 {
        stores.push(
            srv.submit_ok("store", &json!({"merchant_id": merchant}))
                .await,
        );
    }
    work(&srv, MERCHANTS, &merchant, false).await;
    for s in &stores {
        let view = wait_status(&srv, s, "failed").await;
        assert_failed_by(&view, &merchant, "failed");
        let history = srv.events(s).await;
        let change = history
            .iter()
            .rev()
            .find(|e| event_kind(e) == "status_changed")
            .expect("a status change");
        assert_eq!(change["cause"], "dependency_failed", "{change}");
        assert_eq!(change["dependency"]["id"], merchant, "{change}");
    }
    nothing_due(&srv, STORES).await;

    // A retry of the store is refused while its merchant is failed.
    let r = srv
        .post_empty(&format!("/v1/entities/{}/retry", stores[0]))
        .await;
    let p = assert_problem(&r, 409);
    assert_eq!(p["entity_id"], merchant, "{p}");
    assert_eq!(p["reason"], "failed", "{p}");

    // The merchant, retried and ready, does not revive its stores; a store
    // retried afterwards runs at once.
    let r = srv
        .post_empty(&format!("/v1/entities/{merchant}/retry"))
        .await;
    assert_eq!(r.status, 202, "{r}");
    work(&srv, MERCHANTS, &merchant, true).await;
    wait_status(&srv, &merchant, "ready").await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    for s in &stores {
        assert_eq!(srv.entity(s).await["status"], "failed", "not revived");
    }
    nothing_due(&srv, STORES).await;
    let r = srv
        .post_empty(&format!("/v1/entities/{}/retry", stores[0]))
        .await;
    assert_eq!(r.status, 202, "{r}");
    work(&srv, STORES, &stores[0], true).await;
    wait_status(&srv, &stores[0], "ready").await;

    // A cancelled merchant fails its stores too.
    let merchant = srv.submit_ok("merchant", &json!({"name": "gone"})).await;
    let store = srv
        .submit_ok("store", &json!({"merchant_id": merchant}))
        .await;
    let r = srv
        .post_empty(&format!("/v1/entities/{merchant}/cancel"))
        .await;
    assert_eq!(r.status, 202, "{r}");
    let view = wait_status(&srv, &store, "failed").await;
    assert_failed_by(&view, &merchant, "cancelled");
    assert!(
        !srv.log().contains("panicked"),
        "the server panicked:\n{}",
        srv.log()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn parent_ready_then_failed_sqlite() {
    parent_ready_then_failed(None).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn parent_ready_then_failed_postgres() {
    let url = postgres_url().await;
    parent_ready_then_failed(Some(&url)).await;
}

// ---------------------------------------------------------------------------
// The 422s

async fn references_that_do_not_hold(url: Option<&str>) {
    let ds = Downstream::start().await;
    let srv = start(&config(&ds), url).await;
    let failed = srv.submit_ok("merchant", &json!({})).await;
    work(&srv, MERCHANTS, &failed, false).await;
    wait_status(&srv, &failed, "failed").await;
    let cancelled = srv.submit_ok("merchant", &json!({})).await;
    srv.post_empty(&format!("/v1/entities/{cancelled}/cancel"))
        .await;
    let pending = srv.submit_ok("merchant", &json!({})).await;
    let a_store = srv
        .submit_ok("store", &json!({"merchant_id": pending}))
        .await;
    let missing = "0193c5b2-0000-7000-8000-000000000001";
    let cases = [
        (json!({"merchant_id": missing}), "not_found"),
        (json!({"merchant_id": a_store}), "wrong_type"),
        (json!({"merchant_id": failed}), "failed"),
        (json!({"merchant_id": cancelled}), "cancelled"),
        (json!({"merchant_id": "not-an-id"}), "not_an_id"),
        (json!({"merchant_id": 42}), "not_an_id"),
    ];
    for (i, (body, reason)) in cases.into_iter().enumerate() {
        let key = format!("refused-{i}");
        let r = srv.submit("store", &body, Some(&key)).await;
        let p = assert_problem(&r, 422);
        assert_eq!(p["reason"], reason, "{body}: {p}");
        assert_eq!(p["field"], "merchant_id", "{body}: {p}");
        assert_eq!(p["errors"][0]["pointer"], "/merchant_id", "{body}: {p}");
        assert!(
            p["detail"]
                .as_str()
                .unwrap_or("")
                .starts_with("merchant_id: "),
            "the detail names the field: {p}"
        );
        // Nothing was stored under the key: a good body with it is created.
        let fine = srv
            .submit("store", &json!({"merchant_id": pending}), Some(&key))
            .await;
        assert_eq!(fine.status, 202, "{fine}");
    }
    let listed = srv.get("/v1/entities?type=store&limit=100").await.json();
    assert_eq!(
        listed["items"].as_array().map(Vec::len),
        Some(1 + 6),
        "only the accepted stores exist: {listed:#}"
    );
    let types = srv.get("/v1/types").await.json();
    let store_type = types["items"]
        .as_array()
        .and_then(|t| t.iter().find(|t| t["type"] == "store"))
        .cloned()
        .unwrap_or_else(|| panic!("no store type in {types}"));
    assert_eq!(store_type["references"], json!({"merchant_id": "merchant"}));
    // A reference left out, or null, references nothing.
    let free = srv.submit_ok("link", &json!({"prev": null})).await;
    wait_status(&srv, &free, "ready").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn references_that_do_not_hold_are_422_sqlite() {
    references_that_do_not_hold(None).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn references_that_do_not_hold_are_422_postgres() {
    let url = postgres_url().await;
    references_that_do_not_hold(Some(&url)).await;
}

// ---------------------------------------------------------------------------
// Chains

/// Builds a chain of `n` links behind a pending merchant, releases it and
/// checks that the links ran one after the other, in chain order; then a
/// shorter chain behind a merchant that fails fails to its end.
async fn chain(url: Option<&str>, n: usize) {
    let ds = Downstream::start().await;
    let srv = start(&config(&ds), url).await;
    let merchant = srv.submit_ok("merchant", &json!({})).await;
    let mut links = vec![
        srv.submit_ok("link", &json!({"merchant_id": merchant}))
            .await,
    ];
    for _ in 1..n {
        let prev = links.last().expect("a link").clone();
        links.push(srv.submit_ok("link", &json!({"prev": prev})).await);
    }
    let last = srv.entity(links.last().expect("a link")).await;
    assert_waits_for(&last, "link", &links[n - 2]);
    assert!(
        ds.calls_to(&step_path("link", "only")).is_empty(),
        "nothing ran yet"
    );
    let started = Instant::now();
    work(&srv, MERCHANTS, &merchant, true).await;
    let patience = SETTLE + Duration::from_millis(40 * n as u64);
    let end = srv
        .wait_until(links.last().expect("a link"), patience, "ready", |v| {
            v["status"] == "ready"
        })
        .await;
    eprintln!("a chain of {n} settled in {:?}", started.elapsed());
    assert_eq!(end["status"], "ready");
    let calls: Vec<String> = ds
        .calls_to(&step_path("link", "only"))
        .iter()
        .filter_map(|c| c.entity_id().map(str::to_owned))
        .collect();
    assert_eq!(calls, links, "every link ran once, in chain order");

    // A failure at the root reaches the end of a chain.
    let merchant = srv.submit_ok("merchant", &json!({})).await;
    let mut links = vec![
        srv.submit_ok("link", &json!({"merchant_id": merchant}))
            .await,
    ];
    for _ in 1..5 {
        let prev = links.last().expect("a link").clone();
        links.push(srv.submit_ok("link", &json!({"prev": prev})).await);
    }
    work(&srv, MERCHANTS, &merchant, false).await;
    let mut parent = merchant.clone();
    for link in &links {
        let view = wait_status(&srv, link, "failed").await;
        assert_failed_by(&view, &parent, "failed");
        parent = link.clone();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chain_of_1000_settles_in_order_sqlite() {
    chain(None, 1_000).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chain_settles_in_order_postgres() {
    let url = postgres_url().await;
    chain(Some(&url), 50).await;
}

// ---------------------------------------------------------------------------
// Crashes and several nodes

/// Stores and a chain wait for a merchant; the node is killed with SIGKILL
/// and restarted; releasing the merchant then releases all of them.
async fn kill_9_while_waiting(url: Option<&str>) {
    let ds = Downstream::start().await;
    let mut srv = start(&config(&ds), url).await;
    let merchant = srv.submit_ok("merchant", &json!({})).await;
    let mut stores = Vec::new();
    for _ in 0..10 {
        stores.push(
            srv.submit_ok("store", &json!({"merchant_id": merchant}))
                .await,
        );
    }
    let mut links = vec![
        srv.submit_ok("link", &json!({"merchant_id": merchant}))
            .await,
    ];
    for _ in 1..10 {
        let prev = links.last().expect("a link").clone();
        links.push(srv.submit_ok("link", &json!({"prev": prev})).await);
    }
    srv.kill();
    srv.restart().await;
    for s in &stores {
        assert_waits_for(&srv.entity(s).await, "merchant", &merchant);
    }
    work(&srv, MERCHANTS, &merchant, true).await;
    for s in &stores {
        work(&srv, STORES, s, true).await;
    }
    for id in stores.iter().chain(&links) {
        wait_status(&srv, id, "ready").await;
    }

    // Killed again between the merchant's settling and the release of its
    // dependents: the resolver's cursor is durable and catches up.
    let merchant = srv.submit_ok("merchant", &json!({})).await;
    let store = srv
        .submit_ok("store", &json!({"merchant_id": merchant}))
        .await;
    work(&srv, MERCHANTS, &merchant, false).await;
    srv.kill();
    srv.restart().await;
    let view = wait_status(&srv, &store, "failed").await;
    assert_failed_by(&view, &merchant, "failed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_while_dependents_wait_sqlite() {
    kill_9_while_waiting(None).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_while_dependents_wait_postgres() {
    let url = postgres_url().await;
    kill_9_while_waiting(Some(&url)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_postgres_nodes_release_across_nodes() {
    let url = postgres_url().await;
    let ds = Downstream::start().await;
    let cfg = config(&ds);
    let a = Server::start_on(&cfg, &url).await;
    let b = Server::start_on(&cfg, &url).await;
    for round in 0..3 {
        // The merchant is submitted and claimed on node A, the store on B.
        let merchant = a.submit_ok("merchant", &json!({"round": round})).await;
        let store = b
            .submit_ok("store", &json!({"merchant_id": merchant}))
            .await;
        assert_waits_for(&b.entity(&store).await, "merchant", &merchant);
        // B's worker long-polls before the merchant settles: B hears of the
        // release from A's commit, through the database.
        let waiting = {
            let b = b.api().clone();
            tokio::spawn(async move {
                let started = Instant::now();
                let r = b
                    .post(
                        &format!("/v1/queues/{STORES}/claim"),
                        &json!({"max": 1, "wait_ms": 20_000}),
                    )
                    .await;
                (r, started.elapsed())
            })
        };
        tokio::time::sleep(Duration::from_millis(300)).await;
        work(&a, MERCHANTS, &merchant, true).await;
        let (r, waited) = waiting.await.expect("the claim on B");
        assert_eq!(r.status, 200, "{r}");
        let task = r.json()["tasks"][0].clone();
        assert_eq!(task["entity_id"], store, "B got the released store: {r}");
        assert!(waited < Duration::from_secs(10), "B waited {waited:?}");
        let id = task["task_id"].as_str().expect("task id").to_owned();
        let r = b
            .post(
                &format!("/v1/tasks/{id}/complete"),
                &json!({"lease": task["lease"], "output": {}}),
            )
            .await;
        assert_eq!(r.status, 200, "{r}");
        wait_status(&a, &store, "ready").await;
    }
    // A failure on A reaches a store of B's.
    let merchant = a.submit_ok("merchant", &json!({})).await;
    let store = b
        .submit_ok("store", &json!({"merchant_id": merchant}))
        .await;
    work(&a, MERCHANTS, &merchant, false).await;
    let view = wait_status(&b, &store, "failed").await;
    assert_failed_by(&view, &merchant, "failed");
}
