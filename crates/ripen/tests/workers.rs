//! Remote workers through the real binary: the pull protocol (claim with a
//! long poll, heartbeat, complete, fail), leases that fence stale workers,
//! the limits, and a worker in another language (`examples/worker.py`).
//! With `RIPEN_TEST_STORAGE=postgres` every test runs on PostgreSQL.

mod common;

use std::time::{Duration, Instant};

use common::*;
use serde_json::{json, Value};

const TYPE: &str = "merchant";

/// `a` over HTTP, then `bill` on worker queue `billing`, then `c` over HTTP.
fn billing(ds: &Downstream, bill_timeout: &str) -> Config {
    let url = |step: &str| ds.url(&step_path(TYPE, step));
    Config::new().with_type(TypeDef::new(
        TYPE,
        vec![
            Step::http("a", url("a")),
            Step::worker("bill", "billing")
                .needs(&["a"])
                .timeout(bill_timeout),
            Step::http("c", url("c")).needs(&["bill"]),
        ],
    ))
}

/// A type whose only step runs on worker queue `billing`.
fn worker_only(timeout: &str, attempts: u32) -> Config {
    Config::new().with_type(TypeDef::new(
        TYPE,
        vec![Step::worker("bill", "billing")
            .timeout(timeout)
            .attempts(attempts)],
    ))
}

async fn claim(api: &Api, body: Value) -> Vec<Value> {
    let r = api.post("/v1/queues/billing/claim", &body).await;
    assert_eq!(r.status, 200, "claim: {r}");
    r.json()["tasks"].as_array().expect("tasks").clone()
}

/// Claims one task, waiting up to 10 s for it.
async fn claim_one(api: &Api, worker: &str) -> Value {
    let tasks = claim(api, json!({"wait_ms": 10_000, "worker_id": worker})).await;
    assert_eq!(tasks.len(), 1, "one task: {tasks:#?}");
    tasks[0].clone()
}

async fn task_call(api: &Api, task: &Value, verb: &str, extra: Value) -> Resp {
    let mut body = json!({"lease": task["lease"]});
    if let (Value::Object(b), Value::Object(e)) = (&mut body, extra) {
        b.extend(e);
    }
    let id = task["task_id"].as_str().expect("task_id");
    api.post(&format!("/v1/tasks/{id}/{verb}"), &body).await
}

#[tokio::test]
async fn a_worker_step_runs_through_claim_heartbeat_and_complete() {
    let ds = Downstream::start().await;
    ds.set(
        &step_path(TYPE, "a"),
        Behavior::ok(json!({"kyc": "passed"})),
    );
    let server = Server::start(&billing(&ds, "2s")).await;
    let id = server
        .submit_ok(TYPE, &json!({"name": "Zoë", "amount": 12}))
        .await;

    // The long poll answers once `a` succeeded and `bill` became runnable.
    let task = claim_one(&server, "w-1").await;
    assert_eq!(task["entity_id"], id.as_str());
    assert_eq!(task["type"], TYPE);
    assert_eq!(task["version"], 1);
    assert_eq!(task["step"], "bill");
    assert_eq!(task["attempt"], 1);
    assert_eq!(task["payload"], json!({"name": "Zoë", "amount": 12}));
    assert_eq!(task["outputs"], json!({"a": {"kyc": "passed"}}));
    assert_eq!(task["idempotency_key"], format!("{id}:bill"));
    assert!(task["lease"].as_str().is_some_and(|l| !l.is_empty()));

    let view = server.entity(&id).await;
    let bill = step(&view, "bill");
    assert_eq!(bill["status"], "running");
    assert_eq!(bill["executor"], "worker");
    assert_eq!(bill["worker"], "w-1");
    assert_eq!(bill["lease_expires_at"], task["lease_expires_at"]);
    assert_eq!(step(&view, "a")["executor"], "http");

    tokio::time::sleep(Duration::from_millis(50)).await;
    let beat = task_call(&server, &task, "heartbeat", json!({})).await;
    assert_eq!(beat.status, 200, "heartbeat: {beat}");
    let extended = beat.json()["lease_expires_at"]
        .as_str()
        .expect("expiry")
        .to_owned();
    assert!(
        extended.as_str() > task["lease_expires_at"].as_str().unwrap(),
        "{extended} extends {}",
        task["lease_expires_at"]
    );
    assert_eq!(
        step(&server.entity(&id).await, "bill")["lease_expires_at"],
        extended.as_str()
    );

    let done = task_call(
        &server,
        &task,
        "complete",
        json!({"output": {"invoice": "inv-1", "amount": 12.50}}),
    )
    .await;
    assert_eq!(done.status, 200, "complete: {done}");
    let view = server.wait_terminal(&id, Duration::from_secs(10)).await;
    assert_eq!(view["status"], "ready", "{view:#}");
    let bill = step(&view, "bill");
    assert_eq!(
        (bill["status"].as_str(), bill["attempts"].as_u64()),
        (Some("succeeded"), Some(1))
    );
    assert!(bill.get("worker").is_none(), "no lease is held any more");
    let data = server.get(&format!("/v1/entities/{id}/data")).await.json();
    assert_eq!(
        data["outputs"]["bill"],
        json!({"invoice": "inv-1", "amount": 12.50})
    );
    // `c` saw the worker's output, as every later step does.
    let c = ds.calls_to(&step_path(TYPE, "c"));
    assert_eq!(c.len(), 1);
    let body = c[0].body.as_ref().expect("a JSON body");
    assert_eq!(body["outputs"]["bill"]["invoice"], "inv-1");

    // A second result for the same lease is stale: the step is done.
    let again = task_call(&server, &task, "complete", json!({"output": 2})).await;
    assert_problem(&again, 409);
    let history = server.events(&id).await;
    let started = history
        .iter()
        .find(|e| event_kind(e) == "step_started" && event_step(e) == Some("bill"))
        .expect("bill started");
    assert_eq!(started["worker"], "w-1");
}

#[tokio::test]
async fn a_stale_lease_is_refused_and_changes_nothing() {
    let mut cfg = worker_only("1s", 3);
    cfg = cfg.lease_grace("100ms");
    let server = Server::start(&cfg).await;
    let id = server.submit_ok(TYPE, &json!({"n": 1})).await;
    let first = claim_one(&server, "w-1").await;
    // w-1 goes quiet past its lease; w-2's claim takes the task over.
    let second = claim_one(&server, "w-2").await;
    assert_eq!(second["task_id"], first["task_id"], "the same step");
    assert_eq!(second["attempt"], 2, "the lost attempt counts");
    assert_ne!(second["lease"], first["lease"]);
    let view = server.entity(&id).await;
    assert_eq!(step(&view, "bill")["worker"], "w-2");

    for verb in ["heartbeat", "complete", "fail"] {
        let extra = match verb {
            "complete" => json!({"output": {"by": "w-1"}}),
            "fail" => json!({"error": "late"}),
            _ => json!({}),
        };
        let r = task_call(&server, &first, verb, extra).await;
        let problem = assert_problem(&r, 409);
        assert!(
            problem["detail"].as_str().unwrap().contains("lease"),
            "{problem:#}"
        );
    }
    let r = task_call(
        &server,
        &second,
        "complete",
        json!({"output": {"by": "w-2"}}),
    )
    .await;
    assert_eq!(r.status, 200, "{r}");
    let view = server.wait_terminal(&id, Duration::from_secs(10)).await;
    assert_eq!(view["status"], "ready");
    assert_eq!(step(&view, "bill")["attempts"], 2);
    let data = server.get(&format!("/v1/entities/{id}/data")).await.json();
    assert_eq!(data["outputs"]["bill"], json!({"by": "w-2"}));
    let lost = server
        .events(&id)
        .await
        .into_iter()
        .filter(|e| event_kind(e) == "attempt_failed")
        .collect::<Vec<_>>();
    assert_eq!(lost.len(), 1);
    assert_eq!(lost[0]["lost"], "lease_expired");
}

#[tokio::test]
async fn fail_retries_by_the_policy_unless_it_says_not_to() {
    let server = Server::start(&worker_only("5s", 3)).await;
    let id = server.submit_ok(TYPE, &json!({})).await;
    let task = claim_one(&server, "w").await;
    let r = task_call(
        &server,
        &task,
        "fail",
        json!({"error": "card processor busy"}),
    )
    .await;
    assert_eq!(r.status, 200, "{r}");
    let retry = claim_one(&server, "w").await;
    assert_eq!(retry["attempt"], 2, "a retryable failure runs again");
    let r = task_call(
        &server,
        &retry,
        "fail",
        json!({"error": "card declined", "retryable": false}),
    )
    .await;
    assert_eq!(r.status, 200, "{r}");
    let view = server.wait_terminal(&id, Duration::from_secs(10)).await;
    assert_eq!(view["status"], "failed");
    let bill = step(&view, "bill");
    assert_eq!(bill["status"], "failed");
    assert_eq!(bill["attempts"], 2, "no attempt after a permanent failure");
    assert_eq!(bill["last_error"], "card declined");
}

#[tokio::test]
async fn bad_worker_requests_get_clear_problems() {
    let server = Server::start(&worker_only("5s", 3)).await;
    let unknown = server.post("/v1/queues/nope/claim", &json!({})).await;
    let p = assert_problem(&unknown, 404);
    assert!(p["detail"].as_str().unwrap().contains("nope"), "{p:#}");
    for (body, what) in [
        (json!({"max": 0}), "max"),
        (json!({"max": 101}), "max"),
        (json!({"wait_ms": 60_001}), "wait_ms"),
        (json!({"worker_id": ""}), "worker_id"),
        (json!({"worker_id": "x".repeat(129)}), "worker_id"),
        (json!({"max": "ten"}), "ten"),
        (json!({"maximum": 1}), "maximum"),
    ] {
        let r = server.post("/v1/queues/billing/claim", &body).await;
        let p = assert_problem(&r, 422);
        assert!(
            p["detail"].as_str().unwrap().contains(what),
            "{body}: {p:#}"
        );
    }
    let r = server
        .post_bytes("/v1/queues/billing/claim", b"{\"max\": ".to_vec())
        .await;
    assert_problem(&r, 400);
    // An empty body is an empty request: claim one, without waiting.
    let r = server.post_empty("/v1/queues/billing/claim").await;
    assert_eq!(r.status, 200, "{r}");
    assert_eq!(r.json(), json!({"tasks": []}));

    let id = server.submit_ok(TYPE, &json!({})).await;
    let task = claim_one(&server, "w").await;
    let task_id = task["task_id"].as_str().unwrap();
    for bad in ["nope", "1.2.3", id.as_str(), &format!("{id}.128")] {
        let r = server
            .post(
                &format!("/v1/tasks/{bad}/heartbeat"),
                &json!({"lease": "1"}),
            )
            .await;
        assert_problem(&r, 404);
    }
    for lease in ["", "abc", "-1", "99999999999999999999999"] {
        let r = server
            .post(
                &format!("/v1/tasks/{task_id}/heartbeat"),
                &json!({"lease": lease}),
            )
            .await;
        assert_problem(&r, 409);
    }
    let r = server
        .post(&format!("/v1/tasks/{task_id}/complete"), &json!({}))
        .await;
    let p = assert_problem(&r, 422);
    assert!(p["detail"].as_str().unwrap().contains("lease"), "{p:#}");
    let huge = "x".repeat(1024 * 1024 + 1);
    let r = task_call(&server, &task, "complete", json!({"output": huge})).await;
    assert_problem_in(&r, &[413]);
    let r = task_call(&server, &task, "fail", json!({"error": "e".repeat(5_000)})).await;
    assert_problem(&r, 422);
    // None of that touched the task.
    let view = server.entity(&id).await;
    assert_eq!(step(&view, "bill")["status"], "running");
    assert_eq!(step(&view, "bill")["attempts"], 1);
}

/// A claim waiting on an empty queue answers as soon as a submission makes
/// a worker step runnable: woken by the commit, not by a poll.
#[tokio::test]
async fn a_waiting_claim_wakes_as_soon_as_work_arrives() {
    let server = Server::start(&worker_only("5s", 3)).await;
    let mut latencies = Vec::new();
    for _ in 0..10 {
        let waiting = {
            let api = (*server).clone();
            tokio::spawn(async move {
                let tasks = claim(&api, json!({"wait_ms": 10_000})).await;
                (Instant::now(), tasks)
            })
        };
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(
            !waiting.is_finished(),
            "the claim waits while nothing is due"
        );
        let id = server.submit_ok(TYPE, &json!({})).await;
        let acked = Instant::now();
        let (answered, tasks) = waiting.await.expect("claim task");
        assert_eq!(tasks.len(), 1);
        assert_eq!(tasks[0]["entity_id"], id.as_str());
        latencies.push(answered.saturating_duration_since(acked));
        let r = task_call(&server, &tasks[0], "complete", json!({})).await;
        assert_eq!(r.status, 200, "{r}");
    }
    latencies.sort();
    println!(
        "long-poll wake-up after the 202: p50 {:?}, max {:?}",
        latencies[latencies.len() / 2],
        latencies[latencies.len() - 1]
    );
    // Far below the 10 s wait and the 1 s poll interval: the commit woke it.
    assert!(
        latencies[latencies.len() - 1] < Duration::from_millis(500),
        "{latencies:?}"
    );
    // With nothing due, the claim waits out `wait_ms` and answers empty.
    let started = Instant::now();
    let tasks = claim(&server, json!({"wait_ms": 300})).await;
    assert!(tasks.is_empty());
    assert!(started.elapsed() >= Duration::from_millis(300));
}

/// A claim also wakes when a retry's backoff ends, without any commit.
#[tokio::test]
async fn a_waiting_claim_wakes_when_a_backoff_ends() {
    let cfg = Config::new().with_type(TypeDef::new(
        TYPE,
        vec![Step::worker("bill", "billing").backoff("400ms", "400ms")],
    ));
    let server = Server::start(&cfg).await;
    server.submit_ok(TYPE, &json!({})).await;
    let task = claim_one(&server, "w").await;
    let r = task_call(&server, &task, "fail", json!({"error": "busy"})).await;
    assert_eq!(r.status, 200);
    let started = Instant::now();
    let again = claim_one(&server, "w").await;
    assert_eq!(again["attempt"], 2);
    let waited = started.elapsed();
    // Full jitter: anywhere in [0, 400 ms], then answered at once.
    assert!(waited < Duration::from_millis(1_500), "{waited:?}");
}

#[tokio::test]
async fn waiting_claims_are_bounded_and_end_when_the_node_stops() {
    // The config writer does not know the key: add it, and start again.
    let mut server = Server::start(&worker_only("5s", 3)).await;
    let path = server.dir().join("ripen.toml");
    let toml = std::fs::read_to_string(&path).expect("read ripen.toml");
    assert!(toml.contains("\n[engine]\n"), "{toml}");
    let toml = toml.replacen("\n[engine]\n", "\n[engine]\nwaiting_claims_max = 2\n", 1);
    std::fs::write(&path, toml).expect("write ripen.toml");
    server.restart().await;

    let spawn_claim = |api: Api| {
        tokio::spawn(async move {
            api.post("/v1/queues/billing/claim", &json!({"wait_ms": 20_000}))
                .await
        })
    };
    let first = spawn_claim((*server).clone());
    let second = spawn_claim((*server).clone());
    tokio::time::sleep(Duration::from_millis(300)).await;
    let third = server
        .post("/v1/queues/billing/claim", &json!({"wait_ms": 20_000}))
        .await;
    let p = assert_problem(&third, 503);
    assert!(p["detail"].as_str().unwrap().contains('2'), "{p:#}");
    assert!(third.header("retry-after").is_some(), "{third}");
    // A claim that does not wait is never refused.
    let now = server.post("/v1/queues/billing/claim", &json!({})).await;
    assert_eq!(now.status, 200, "{now}");

    // Stopping: the waiting claims answer at once (empty), so that their
    // workers claim from another node.
    let stopping = Instant::now();
    server.sigterm();
    for waiting in [first, second] {
        let r = waiting.await.expect("claim task");
        assert_eq!(r.status, 200, "{r}");
        assert_eq!(r.json(), json!({"tasks": []}));
    }
    assert!(stopping.elapsed() < Duration::from_secs(5));
}

/// An embedded node that restarts keeps a remote worker's lease: the worker
/// was not part of the process, and its result still counts.
#[tokio::test]
async fn a_restart_keeps_the_leases_of_remote_workers() {
    let mut server = Server::start(&worker_only("10s", 3)).await;
    let id = server.submit_ok(TYPE, &json!({})).await;
    let task = claim_one(&server, "w").await;
    server.restart().await;
    let r = task_call(&server, &task, "complete", json!({"output": {"ok": true}})).await;
    assert_eq!(r.status, 200, "{r}");
    let view = server.wait_terminal(&id, Duration::from_secs(10)).await;
    assert_eq!(view["status"], "ready");
    assert_eq!(step(&view, "bill")["attempts"], 1);
}

/// `examples/worker.py`, standard library only, serves a queue.
#[tokio::test]
async fn the_python_example_worker_runs_a_pipeline() {
    let ds = Downstream::start().await;
    let server = Server::start(&billing(&ds, "5s")).await;
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../../examples/worker.py");
    let worker = std::process::Command::new("python3")
        .arg(script)
        .arg("billing")
        .env("RIPEN_URL", server.base())
        .stdout(std::process::Stdio::null())
        .spawn()
        .expect("start python3 examples/worker.py");
    let mut worker = KillOnDrop(worker);
    let mut ids = Vec::new();
    for amount in 0..5 {
        ids.push(server.submit_ok(TYPE, &json!({"amount": amount})).await);
    }
    for (amount, id) in ids.iter().enumerate() {
        let view = server.wait_terminal(id, Duration::from_secs(20)).await;
        assert_eq!(view["status"], "ready", "{view:#}");
        let data = server.get(&format!("/v1/entities/{id}/data")).await.json();
        assert_eq!(
            data["outputs"]["bill"],
            json!({"invoice": format!("inv-{id}"), "amount": amount})
        );
        let started = server
            .events(id)
            .await
            .into_iter()
            .find(|e| event_kind(e) == "step_started" && event_step(e) == Some("bill"))
            .expect("bill started");
        assert!(
            started["worker"]
                .as_str()
                .is_some_and(|w| w.starts_with("py-")),
            "{started:#}"
        );
    }
    assert!(
        worker.0.try_wait().expect("poll worker").is_none(),
        "the worker still runs"
    );
}

/// A child process killed when the test ends, however it ends.
struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A worker that goes silent loses its lease at expiry even when no worker
/// claims from the queue any more: the attempt counts, and with no attempt
/// left the entity fails instead of staying pending.
#[tokio::test]
async fn a_silent_worker_loses_its_lease_without_any_claim() {
    let cfg = worker_only("500ms", 1)
        .lease_grace("100ms")
        .poll_interval("100ms");
    let server = Server::start(&cfg).await;
    let id = server.submit_ok(TYPE, &json!({})).await;
    let task = claim_one(&server, "w").await;
    let view = server.wait_terminal(&id, Duration::from_secs(10)).await;
    assert_eq!(view["status"], "failed", "{view:#}");
    let bill = step(&view, "bill");
    assert_eq!(bill["attempts"], 1);
    assert!(bill.get("worker").is_none());
    let late = task_call(&server, &task, "complete", json!({})).await;
    assert_problem(&late, 409);
    let log = server.log();
    let lost = log
        .lines()
        .find(|l| l.contains("attempt lost") && l.contains(id.as_str()))
        .unwrap_or_else(|| panic!("no log line of the lost attempt:\n{log}"));
    assert!(
        lost.contains("WARN") && lost.contains("lease_expired"),
        "{lost}"
    );
}
