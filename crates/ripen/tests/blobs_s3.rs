//! Large payloads in a real S3-compatible server (moto, from the test
//! venv), through the real binary: round trips, an outage at intake (503,
//! nothing acknowledged) and an outage during a step (the attempt fails,
//! the retry succeeds once S3 is back). The outage is a [`TcpGate`] closed
//! in front of moto, so that moto keeps its objects.

mod common;

use std::time::Duration;

use common::*;
use ripen_testkit::{MotoServer, TcpGate, MOTO_KEY_ID, MOTO_SECRET};
use serde_json::{json, Value};

const WAIT: Duration = Duration::from_secs(60);
const INLINE_MAX: usize = 4_096;

/// moto, a gate in front of it, and a server whose blobs go there.
async fn start(ds: &Downstream) -> (MotoServer, TcpGate, Server) {
    let moto = MotoServer::start("ripen");
    let target = format!("127.0.0.1:{}", moto.port())
        .parse()
        .expect("moto's address");
    let gate = TcpGate::start(target).await.expect("start the gate");
    let cfg = Config::new()
        .with_type(single("doc", ds))
        .with_type(single("held", ds).map_steps(|s| s.attempts(100).backoff("200ms", "200ms")))
        .extra(&format!(
            "[blobs]\nurl = \"s3://ripen/payloads\"\nendpoint = \"{}\"\ninline_max = {INLINE_MAX}\nbody_max = 16777216",
            gate.url()
        ));
    let mut srv = Server::start(&cfg).await;
    srv.set_env("AWS_ACCESS_KEY_ID", MOTO_KEY_ID);
    srv.set_env("AWS_SECRET_ACCESS_KEY", MOTO_SECRET);
    srv.restart().await;
    (moto, gate, srv)
}

fn large(bytes: usize, marker: &str) -> Value {
    let chunk = "0123456789abcdef".repeat(64);
    json!({"marker": marker, "chunks": vec![chunk; bytes / 1024 + 1]})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_payloads_round_trip_through_s3() {
    let ds = Downstream::start().await;
    ds.set(
        &step_path("doc", "only"),
        Behavior::ok(json!({"seen": true})),
    );
    let (moto, _gate, srv) = start(&ds).await;
    let big = large(2 << 20, "big");
    let id = srv.submit_ok("doc", &big).await;
    // The object is there before the answer.
    assert_eq!(moto.keys("payloads/"), vec![format!("payloads/{id}")]);
    let small = srv.submit_ok("doc", &json!({"marker": "small"})).await;
    assert_eq!(
        moto.keys("payloads/").len(),
        1,
        "a small payload stays in the database"
    );
    for id in [&id, &small] {
        assert_eq!(srv.wait_terminal(id, WAIT).await["status"], "ready");
    }
    let calls = ds.calls_for(&step_path("doc", "only"), &id);
    assert_eq!(calls[0].body.as_ref().expect("JSON")["payload"], big);
    let r = srv.get(&format!("/v1/entities/{id}/data")).await;
    assert_eq!(r.status, 200, "{r}");
    assert_eq!(r.json()["payload"], big);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_s3_outage_refuses_intake_and_retries_steps() {
    let ds = Downstream::start().await;
    let path = step_path("held", "only");
    ds.set(&path, Behavior::always(503));
    let (_moto, gate, srv) = start(&ds).await;
    let id = srv.submit_ok("held", &large(20_000, "held")).await;
    srv.wait_until(&id, WAIT, "tried", |v| {
        v["steps"][0]["attempts"].as_u64() >= Some(1)
    })
    .await;

    gate.close();
    // Intake: a large payload is refused, and nothing is acknowledged.
    let before = srv.get("/v1/entities?type=doc").await.json()["items"]
        .as_array()
        .map_or(0, Vec::len);
    let r = srv.submit("doc", &large(20_000, "refused"), None).await;
    let p = assert_problem(&r, 503);
    assert_eq!(p["type"], "urn:ripen:problem:blob-store-unavailable", "{p}");
    assert!(r.header("retry-after").is_some(), "{r}");
    let after = srv.get("/v1/entities?type=doc").await.json()["items"]
        .as_array()
        .map_or(0, Vec::len);
    assert_eq!(after, before, "nothing acknowledged");

    // A step: its attempts fail while S3 is away, and are retried.
    ds.set(&path, Behavior::ok(json!({})));
    let v = srv
        .wait_until(&id, WAIT, "failing on the blob store", |v| {
            v["steps"][0]["last_error"]
                .as_str()
                .is_some_and(|e| e.contains("cannot be read now"))
        })
        .await;
    assert_eq!(v["status"], "pending", "{v}");
    gate.open();
    let v = srv.wait_terminal(&id, WAIT).await;
    assert_eq!(v["status"], "ready", "{v}");
    let last = ds.calls_for(&path, &id).pop().expect("a call");
    assert_eq!(last.body.expect("JSON")["payload"]["marker"], "held");
    assert!(srv
        .log()
        .contains("the blob store did not answer a payload read"));
}
