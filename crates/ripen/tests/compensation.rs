//! Compensation through the real binary: an entity that fails for good or
//! is cancelled undoes its succeeded steps, in reverse dependency order,
//! with their own retries; a compensation that fails for good waits for an
//! operator; a node killed mid-compensation runs it again after restart.
//! Runs on SQLite, and on PostgreSQL with `RIPEN_TEST_STORAGE=postgres`.

mod common;

use std::time::Duration;

use common::*;
use serde_json::{json, Value};

const PATIENCE: Duration = Duration::from_secs(30);

/// `order`: `reserve`, then `charge` after it, then `ship` after `charge`.
/// `reserve` and `charge` undo themselves at `/undo/{step}`; `ship` has
/// nothing to undo.
fn order(ds: &Downstream) -> TypeDef {
    TypeDef::new(
        "order",
        vec![
            Step::http("reserve", ds.url("/order/reserve")).compensate(ds.url("/undo/reserve")),
            Step::http("charge", ds.url("/order/charge"))
                .needs(&["reserve"])
                .compensate(ds.url("/undo/charge")),
            Step::http("ship", ds.url("/order/ship")).needs(&["charge"]),
        ],
    )
}

async fn serve(ds: &Downstream) -> Server {
    ds.set("/order/reserve", Behavior::ok(json!({"held": true})));
    ds.set("/order/charge", Behavior::ok(json!({"charged": 12})));
    ds.set("/undo/reserve", Behavior::ok(json!({"released": true})));
    ds.set("/undo/charge", Behavior::ok(json!({"refunded": 12})));
    Server::start(&Config::new().with_type(order(ds))).await
}

fn compensation(view: &Value) -> &str {
    view["compensation"]["status"].as_str().unwrap_or("")
}

async fn wait_compensation(server: &Server, id: &str, want: &str) -> Value {
    server
        .wait_until(id, PATIENCE, &format!("compensation {want}"), |v| {
            compensation(v) == want
        })
        .await
}

fn kinds(events: &[Value]) -> Vec<String> {
    events.iter().map(|e| event_kind(e).to_owned()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failure_undoes_the_succeeded_steps_from_the_last_back() {
    let ds = Downstream::start().await;
    ds.set("/order/ship", Behavior::always(400));
    let server = serve(&ds).await;
    let id = server.submit_ok("order", &json!({"sku": "A-1"})).await;
    let view = wait_compensation(&server, &id, "done").await;
    assert_eq!(view["status"], "failed", "{view:#}");
    // Only the steps proper are listed as steps; the compensations have
    // their own list.
    let names: Vec<&str> = view["steps"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["reserve", "charge", "ship"], "{view:#}");
    let undone: Vec<(&str, &str)> = view["compensation"]["steps"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| (s["name"].as_str().unwrap(), s["status"].as_str().unwrap()))
        .collect();
    assert_eq!(
        undone,
        [
            ("reserve:compensate", "succeeded"),
            ("charge:compensate", "succeeded")
        ],
        "{view:#}"
    );
    // charge is undone before reserve, each once, with its own key and the
    // step contract's body.
    let charge = ds.calls_for("/undo/charge", &id);
    let reserve = ds.calls_for("/undo/reserve", &id);
    assert_eq!((charge.len(), reserve.len()), (1, 1));
    assert!(
        charge[0].replied_at.expect("answered") <= reserve[0].received_at,
        "reserve was undone before charge"
    );
    assert_eq!(
        charge[0].header("idempotency-key"),
        Some(format!("{id}:charge:compensate").as_str())
    );
    let body = charge[0].body.as_ref().expect("a JSON body");
    assert_eq!(body["step"], "charge:compensate");
    assert_eq!(body["payload"], json!({"sku": "A-1"}));
    assert_eq!(body["outputs"]["charge"], json!({"charged": 12}));
    // The history tells the story; the data of a failed entity stays hidden.
    let events = server.events(&id).await;
    let k = kinds(&events);
    let at = |kind: &str| k.iter().position(|x| x == kind).unwrap_or(usize::MAX);
    assert!(
        at("status_changed") < at("compensation_started")
            && at("compensation_started") < at("compensation_done")
            && at("compensation_done") != usize::MAX,
        "{k:?}"
    );
    assert_lifecycle(&events);
    let data = server.get(&format!("/v1/entities/{id}/data")).await;
    assert_problem(&data, 409);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancelled_entity_undoes_what_it_did() {
    let ds = Downstream::start().await;
    // ship never answers in time: the entity stays pending until cancelled.
    ds.set(
        "/order/ship",
        Behavior::sleep(Duration::from_secs(60), json!({})),
    );
    let server = serve(&ds).await;
    let id = server.submit_ok("order", &json!({"sku": "B-2"})).await;
    server
        .wait_until(&id, PATIENCE, "shipping", |v| {
            step(v, "ship")["status"] == "running"
        })
        .await;
    let r = server
        .post_empty(&format!("/v1/entities/{id}/cancel"))
        .await;
    assert_eq!(r.status, 202, "{r}");
    let view = wait_compensation(&server, &id, "done").await;
    assert_eq!(view["status"], "cancelled", "{view:#}");
    assert_eq!(ds.calls_for("/undo/charge", &id).len(), 1);
    assert_eq!(ds.calls_for("/undo/reserve", &id).len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_compensation_is_told_and_waits_for_an_operator() {
    let ds = Downstream::start().await;
    ds.set("/order/ship", Behavior::always(400));
    let server = serve(&ds).await;
    ds.set("/undo/charge", Behavior::always(500));
    let id = server.submit_ok("order", &json!({"sku": "C-3"})).await;
    let view = wait_compensation(&server, &id, "failed").await;
    let undone: Vec<(String, String)> = view["compensation"]["steps"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| {
            (
                s["name"].as_str().unwrap().to_owned(),
                s["status"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    assert_eq!(
        undone,
        [
            ("reserve:compensate".to_owned(), "skipped".to_owned()),
            ("charge:compensate".to_owned(), "failed".to_owned())
        ],
        "reserve waits for charge: {view:#}"
    );
    // Three attempts, as the step's retry policy says; reserve untouched.
    assert_eq!(ds.calls_for("/undo/charge", &id).len(), 3);
    assert!(ds.calls_for("/undo/reserve", &id).is_empty());
    let events = server.events(&id).await;
    let failed = events
        .iter()
        .find(|e| event_kind(e) == "compensation_failed")
        .unwrap_or_else(|| panic!("no compensation_failed in {events:#?}"));
    assert_eq!(event_step(failed), Some("charge:compensate"));
    // The operator mends the service and retries: the compensation runs
    // again, in order, and finishes.
    ds.set("/undo/charge", Behavior::ok(json!({"refunded": 12})));
    let r = server.post_empty(&format!("/v1/entities/{id}/retry")).await;
    assert_eq!(r.status, 202, "{r}");
    let view = wait_compensation(&server, &id, "done").await;
    assert_eq!(view["status"], "failed", "{view:#}");
    assert_eq!(ds.calls_for("/undo/reserve", &id).len(), 1);
    // A retry of the compensated entity runs the whole pipeline again.
    ds.set("/order/ship", Behavior::ok(json!({"shipped": true})));
    let r = server.post_empty(&format!("/v1/entities/{id}/retry")).await;
    assert_eq!(r.status, 202, "{r}");
    let view = server.wait_settled(&id, PATIENCE).await;
    assert_eq!(view["status"], "ready", "{view:#}");
    assert!(view.get("compensation").is_none(), "{view:#}");
    assert_eq!(ds.calls_for("/order/reserve", &id).len(), 2);
    let data = server.get(&format!("/v1/entities/{id}/data")).await;
    assert_eq!(data.status, 200, "{data}");
    let outputs = data.json()["outputs"].clone();
    assert_eq!(
        outputs,
        json!({"reserve": {"held": true}, "charge": {"charged": 12}, "ship": {"shipped": true}}),
        "no compensation output is part of the entity"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_while_compensating_is_refused() {
    let ds = Downstream::start().await;
    ds.set("/order/ship", Behavior::always(400));
    let server = serve(&ds).await;
    ds.set(
        "/undo/charge",
        Behavior::sleep(Duration::from_secs(3), json!({})),
    );
    let id = server.submit_ok("order", &json!({"sku": "D-4"})).await;
    wait_compensation(&server, &id, "running").await;
    let r = server.post_empty(&format!("/v1/entities/{id}/retry")).await;
    let problem = assert_problem(&r, 409);
    assert_eq!(
        problem["type"], "urn:ripen:problem:compensation-running",
        "{problem:#}"
    );
    assert_eq!(problem["entity_status"], "failed");
    wait_compensation(&server, &id, "done").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_during_a_compensation_runs_it_again_with_the_same_key() {
    let ds = Downstream::start().await;
    ds.set("/order/ship", Behavior::always(400));
    let mut server = serve(&ds).await;
    // The first call to undo charge hangs; the node dies while it does.
    ds.set(
        "/undo/charge",
        Behavior::sleep_first(1, Duration::from_secs(60), json!({"refunded": 12})),
    );
    let id = server.submit_ok("order", &json!({"sku": "E-5"})).await;
    let deadline = std::time::Instant::now() + PATIENCE;
    while ds.calls_for("/undo/charge", &id).is_empty() {
        assert!(
            std::time::Instant::now() < deadline,
            "charge was never undone"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    server.kill();
    server.restart().await;
    let view = wait_compensation(&server, &id, "done").await;
    assert_eq!(view["status"], "failed", "{view:#}");
    let calls = ds.calls_for("/undo/charge", &id);
    assert!(
        calls.len() >= 2,
        "run again after the restart: {}",
        calls.len()
    );
    let keys: Vec<Option<&str>> = calls.iter().map(|c| c.header("idempotency-key")).collect();
    assert!(
        keys.iter()
            .all(|k| *k == Some(format!("{id}:charge:compensate").as_str())),
        "{keys:?}"
    );
    assert!(calls.last().unwrap().succeeded());
    assert_eq!(ds.calls_for("/undo/reserve", &id).len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_compensate_is_refused_at_load() {
    let ds = Downstream::start().await;
    for (compensate, says) in [
        ("42", "expected a URL or a table"),
        ("{ http = \"ftp://x/y\" }", "must start with http"),
        ("{ http = \"http://x/y\", worker = \"q\" }", "one executor"),
        ("{ builtin = true }", "this step has no builtin"),
        ("{ nope = 1 }", "unknown field"),
        (
            "{ worker = \"q\", timeout = \"0s\" }",
            r#""reserve:compensate": timeout must be more than zero"#,
        ),
    ] {
        let cfg = Config::new().with_type(TypeDef::new(
            "order",
            vec![Step::http("reserve", ds.url("/order/reserve")).compensate_with(compensate)],
        ));
        let dir = ripen_testkit::TempDir::new("ripen-comp-").expect("a temp dir");
        let path = cfg
            .write(dir.path(), &ripen_testkit::sqlite_url(dir.path()))
            .expect("write the config");
        // A refused configuration stops `serve` at once; one accepted would
        // run until it is killed.
        let mut child = std::process::Command::new(RIPEN)
            .args(["serve", "--config"])
            .arg(&path)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("run ripen serve");
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        while child.try_wait().expect("wait for ripen serve").is_none() {
            if std::time::Instant::now() > deadline {
                let _ = child.kill();
                panic!("{compensate}: accepted");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let out = child.wait_with_output().expect("read its output");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{compensate}: accepted");
        assert!(
            stderr.contains("types.order.steps") && stderr.contains(says),
            "{compensate}: {stderr}"
        );
    }
}
