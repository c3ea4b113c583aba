//! OpenTelemetry traces through the real binary: a test OTLP/HTTP receiver
//! (`support/otlp_receiver.py`, decoding with the official
//! `opentelemetry-proto` definitions) gets one trace per entity whose id is
//! the entity id: the intake span (linked to the caller's trace) and one
//! child span per attempt, with its outcome, HTTP status and error.
//!
//! The receiver needs a Python with `opentelemetry-proto`: `scripts/test`
//! makes a virtual environment and passes it in `RIPEN_TEST_PYTHON`.

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use serde_json::{json, Value};

struct Receiver {
    child: Child,
    port: u16,
    spans: std::path::PathBuf,
    _dir: TempDir,
}

impl Drop for Receiver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start_receiver() -> Receiver {
    let python = std::env::var("RIPEN_TEST_PYTHON").unwrap_or_else(|_| "python3".into());
    let probe = Command::new(&python)
        .args([
            "-c",
            "import opentelemetry.proto.collector.trace.v1.trace_service_pb2",
        ])
        .output();
    assert!(
        probe.is_ok_and(|o| o.status.success()),
        "{python} cannot import opentelemetry-proto: run scripts/test, which makes a \
         virtual environment with it, or set RIPEN_TEST_PYTHON to a Python that has it"
    );
    let dir = TempDir::new("ripen-otlp-").expect("temp dir");
    let spans = dir.path().join("spans.jsonl");
    let script = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/support/otlp_receiver.py"
    );
    let mut child = Command::new(&python)
        .arg(script)
        .arg(&spans)
        .stdout(Stdio::piped())
        .spawn()
        .expect("start the OTLP receiver");
    let mut line = String::new();
    BufReader::new(child.stdout.take().expect("stdout"))
        .read_line(&mut line)
        .expect("read the receiver's port");
    let port = line
        .trim()
        .strip_prefix("listening ")
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("the receiver said {line:?}"));
    Receiver {
        child,
        port,
        spans,
        _dir: dir,
    }
}

fn spans_of(receiver: &Receiver, trace_id: &str) -> Vec<Value> {
    std::fs::read_to_string(&receiver.spans)
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).expect("a span"))
        .filter(|s| s["trace_id"] == trace_id)
        .collect()
}

#[tokio::test]
async fn one_entity_with_a_retry_is_one_trace_of_intake_and_attempts() {
    let receiver = start_receiver();
    // This binary holds this one test: the server inherits these.
    std::env::set_var(
        "OTEL_EXPORTER_OTLP_ENDPOINT",
        format!("http://127.0.0.1:{}", receiver.port),
    );
    std::env::set_var("OTEL_SERVICE_NAME", "ripen-under-test");
    let ds = Downstream::start().await;
    ds.set(
        &step_path("t", "a"),
        Behavior::fail_first(503, 1, json!({"ok": true})),
    );
    let cfg = Config::new()
        .with_type(TypeDef::new(
            "t",
            vec![Step::http("a", ds.url(&step_path("t", "a")))],
        ))
        .with_type(TypeDef::new("w", vec![Step::worker("bill", "billing")]))
        .notify("allow_networks = [\"127.0.0.0/8\"]");
    let server = Server::start(&cfg).await;
    // A webhook for the entity's `ready`: its delivery is a span too.
    let r = server
        .post(
            "/v1/subscriptions",
            &json!({"url": ds.url("/hook"), "events": ["entity.ready"], "types": ["t"]}),
        )
        .await;
    assert_eq!(r.status, 201, "{r}");
    let caller = ("4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7");
    let traceparent = format!("00-{}-{}-01", caller.0, caller.1);
    let r = server
        .request(
            hyper::Method::POST,
            "/v1/entities/t",
            &[("traceparent", traceparent.as_str())],
            Some(br#"{"n": 1}"#.to_vec()),
        )
        .await;
    assert_eq!(r.status, 202, "{r}");
    let id = r.json()["id"].as_str().expect("id").to_owned();
    let view = server.wait_terminal(&id, Duration::from_secs(10)).await;
    assert_eq!(view["status"], "ready");
    let trace_id = id.replace('-', "");

    let deadline = Instant::now() + Duration::from_secs(15);
    let spans = loop {
        let spans = spans_of(&receiver, &trace_id);
        if spans.len() >= 8 || Instant::now() > deadline {
            break spans;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    // Intake, two attempts, and the commits that claimed each attempt and
    // recorded each result. (The second attempt may also be claimed by the
    // commit of the first result; then it has no claim span of its own.)
    let claims = spans
        .iter()
        .filter(|s| {
            s["name"]
                .as_str()
                .is_some_and(|n| n.starts_with("store commit: claim"))
        })
        .count();
    assert!((1..=2).contains(&claims), "{spans:#?}");
    assert_eq!(spans.len(), 6 + claims, "{spans:#?}");
    for s in &spans {
        assert_eq!(s["path"], "/v1/traces");
        assert_eq!(s["content_type"], "application/x-protobuf");
        assert_eq!(s["resource"]["service.name"], "ripen-under-test");
        assert_eq!(s["scope"], "ripen");
        assert!(s["end"].as_u64() >= s["start"].as_u64());
    }
    let intake = spans
        .iter()
        .find(|s| s["parent_span_id"] == "")
        .expect("a root span");
    assert_eq!(intake["name"], "intake t");
    assert_eq!(intake["kind"], 2, "server");
    assert_eq!(intake["attributes"]["ripen.entity_id"], id.as_str());
    assert_eq!(intake["links"], json!([[caller.0, caller.1]]));
    let mut attempts: Vec<&Value> = spans
        .iter()
        .filter(|s| s["parent_span_id"] == intake["span_id"])
        .collect();
    let notify: Vec<&Value> = attempts
        .iter()
        .copied()
        .filter(|s| s["name"] == "notify entity.ready")
        .collect();
    assert_eq!(notify.len(), 1, "{spans:#?}");
    assert_eq!(notify[0]["kind"], 4, "producer");
    assert_eq!(notify[0]["attributes"]["ripen.outcome"], "delivered");
    assert_eq!(notify[0]["attributes"]["ripen.sink"], "webhook");
    assert_eq!(notify[0]["attributes"]["http.response.status_code"], 200);
    let hook = ds.calls_to("/hook");
    assert_eq!(hook.len(), 1);
    assert_eq!(
        hook[0].header("traceparent"),
        Some(
            format!(
                "00-{trace_id}-{}-01",
                notify[0]["span_id"].as_str().unwrap()
            )
            .as_str()
        ),
        "the webhook carries its delivery's span"
    );
    assert!(hook[0]
        .header("webhook-signature")
        .is_some_and(|s| s.starts_with("v1,")));
    attempts.retain(|s| s["name"] == "attempt a");
    attempts.sort_by_key(|s| s["attributes"]["ripen.attempt"].as_i64());
    assert_eq!(attempts.len(), 2, "{spans:#?}");
    let (first, second) = (attempts[0], attempts[1]);
    assert_eq!(first["name"], "attempt a");
    assert_eq!(first["kind"], 3, "client");
    assert_eq!(first["attributes"]["ripen.outcome"], "retryable_error");
    assert_eq!(first["attributes"]["http.response.status_code"], 503);
    assert_eq!(first["status_code"], 2, "error");
    assert!(first["status_message"].as_str().unwrap().contains("503"));
    assert_eq!(second["attributes"]["ripen.outcome"], "succeeded");
    assert_eq!(second["status_code"], 1, "ok");
    assert!(second["start"].as_u64() >= first["end"].as_u64());
    for attempt in [first, second] {
        let commits: Vec<&Value> = spans
            .iter()
            .filter(|s| s["parent_span_id"] == attempt["span_id"])
            .collect();
        assert_eq!(commits.len(), 1, "{spans:#?}");
        assert_eq!(commits[0]["name"], "store commit");
        assert_eq!(commits[0]["attributes"]["ripen.recorded"], true);
        assert!(commits[0]["start"].as_u64() >= attempt["end"].as_u64());
    }

    // Each call's traceparent names its attempt's span, so the service's
    // own spans hang below it.
    let calls = ds.calls_to(&step_path("t", "a"));
    assert_eq!(calls.len(), 2);
    let mut sent: Vec<String> = calls
        .iter()
        .map(|c| c.header("traceparent").expect("traceparent").to_owned())
        .collect();
    sent.sort();
    let mut want: Vec<String> = attempts
        .iter()
        .map(|s| format!("00-{trace_id}-{}-01", s["span_id"].as_str().unwrap()))
        .collect();
    want.sort();
    assert_eq!(sent, want);

    // A worker step: its span runs from the claim to the report, and the
    // commit that recorded the result hangs below it.
    let wid = server.submit_ok("w", &json!({})).await;
    let claimed = server
        .post("/v1/queues/billing/claim", &json!({"wait_ms": 5_000}))
        .await;
    let task = claimed.json()["tasks"][0].clone();
    let task_id = task["task_id"].as_str().expect("a task");
    let done = server
        .post(
            &format!("/v1/tasks/{task_id}/complete"),
            &json!({"lease": task["lease"], "output": {"ok": 1}}),
        )
        .await;
    assert_eq!(done.status, 200, "{done}");
    let wtrace = wid.replace('-', "");
    let deadline = Instant::now() + Duration::from_secs(15);
    let spans = loop {
        let spans = spans_of(&receiver, &wtrace);
        if spans.len() >= 3 || Instant::now() > deadline {
            break spans;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(spans.len(), 3, "{spans:#?}");
    let root = spans
        .iter()
        .find(|s| s["parent_span_id"] == "")
        .expect("intake");
    let bill = spans
        .iter()
        .find(|s| s["name"] == "attempt bill")
        .expect("the worker's attempt");
    assert_eq!(bill["parent_span_id"], root["span_id"]);
    assert_eq!(bill["kind"], 5, "consumer");
    assert_eq!(bill["attributes"]["ripen.executor"], "worker");
    assert_eq!(bill["attributes"]["ripen.outcome"], "succeeded");
    assert!(bill["start"].as_u64() <= bill["end"].as_u64());
    let commit = spans
        .iter()
        .find(|s| s["name"] == "store commit")
        .expect("the commit");
    assert_eq!(commit["parent_span_id"], bill["span_id"]);
    assert_eq!(commit["attributes"]["ripen.recorded"], true);
}
