//! End-to-end tests of the HTTP API (docs/api.md, "Entities" and "Operations")
//! against the real binary, with a real downstream over loopback.

mod common;

use std::collections::HashSet;
use std::time::{Duration, Instant};

use common::*;
use hyper::Method;
use serde_json::{json, Value};

/// How long a short pipeline may take to settle in a debug build.
const SETTLE: Duration = Duration::from_secs(20);

// ---------------------------------------------------------------------------
// Intake
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn submit_answers_202_with_location_and_a_pending_view() {
    let ds = Downstream::start().await;
    // `a` is slow so the entity stays pending while we look at it.
    ds.set(
        "/w5/a",
        Behavior::sleep(Duration::from_secs(3), json!({"from": "a"})),
    );
    let srv = Server::start(&Config::new().with_type(w5("w5", &ds))).await;

    let payload = json!({"name": "acme", "n": 1});
    let r = srv.submit("w5", &payload, None).await;
    assert_eq!(r.status, 202, "{r}");
    let ct = r.header("content-type").unwrap_or_default();
    assert!(ct.starts_with("application/json"), "content-type: {r}");
    let view = r.json();
    let id = view["id"].as_str().expect("the view has an id").to_owned();
    let uuid = uuid::Uuid::parse_str(&id).expect("the id is a UUID");
    assert_eq!(uuid.get_version_num(), 7, "the id is a UUIDv7: {id}");
    let location = r.header("location").expect("a Location header");
    assert!(
        location == format!("/v1/entities/{id}")
            || location.ends_with(&format!("/v1/entities/{id}")),
        "Location {location:?} for id {id}"
    );
    assert_eq!(
        r.header("idempotent-replayed")
            .as_deref()
            .unwrap_or("false"),
        "false"
    );

    assert_eq!(view["type"], "w5", "{view:#}");
    assert_eq!(view["version"], 1, "{view:#}");
    assert_eq!(view["status"], "pending", "{view:#}");
    assert_eq!(view["degraded"], false, "{view:#}");
    assert!(view["created_at"].is_string(), "{view:#}");
    assert!(view["updated_at"].is_string(), "{view:#}");
    assert!(view["ready_at"].is_null(), "{view:#}");
    let steps = view["steps"].as_array().expect("steps is an array");
    let names: HashSet<&str> = steps
        .iter()
        .map(|s| s["name"].as_str().unwrap_or(""))
        .collect();
    assert_eq!(names, HashSet::from(["a", "b", "c", "d", "e"]), "{view:#}");
    for s in steps {
        let status = s["status"].as_str().unwrap_or("");
        assert!(STEP_STATUSES.contains(&status), "bad step status: {s}");
        assert!(s["attempts"].is_u64(), "attempts: {s}");
        assert!(
            s.get("last_error").is_some_and(|e| e.is_null()),
            "last_error: {s}"
        );
        let expected_critical = s["name"] != "e";
        assert_eq!(s["critical"], expected_critical, "critical: {s}");
    }
    for name in ["b", "c", "d", "e"] {
        let s = step(&view, name);
        assert_eq!(
            s["status"], "blocked",
            "{name} waits on its needs: {view:#}"
        );
        assert_eq!(s["attempts"], 0, "{view:#}");
    }

    // GET shows the same entity, still pending.
    let got = srv.entity(&id).await;
    assert_eq!(got["id"], id.as_str());
    assert_eq!(got["status"], "pending", "{got:#}");
    assert_eq!(got["type"], "w5");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idempotency_key_replays_the_same_entity() {
    let ds = Downstream::start().await;
    let srv = Server::start(
        &Config::new()
            .with_type(w5("w5", &ds))
            .with_type(single("other", &ds)),
    )
    .await;
    let body = json!({"name": "x"});

    let first = srv.submit("w5", &body, Some("key-1")).await;
    assert_eq!(first.status, 202, "{first}");
    assert_ne!(
        first.header("idempotent-replayed").as_deref(),
        Some("true"),
        "{first}"
    );
    let id = first.json()["id"].as_str().unwrap().to_owned();

    let again = srv.submit("w5", &body, Some("key-1")).await;
    assert_eq!(again.status, 202, "{again}");
    assert_eq!(
        again.header("idempotent-replayed").as_deref(),
        Some("true"),
        "{again}"
    );
    assert_eq!(again.json()["id"], id.as_str(), "{again}");
    assert_eq!(again.header("location"), first.header("location"));

    let other_body = srv.submit("w5", &json!({"name": "y"}), Some("key-1")).await;
    assert_problem(&other_body, 422);

    // Without a key, every submission is a new entity.
    let a = srv.submit_ok("w5", &body).await;
    let b = srv.submit_ok("w5", &body).await;
    assert_ne!(a, b);
    assert_ne!(a, id);

    // Keys are scoped by entity type.
    let scoped = srv.submit("other", &body, Some("key-1")).await;
    assert_eq!(scoped.status, 202, "{scoped}");
    assert_ne!(
        scoped.header("idempotent-replayed").as_deref(),
        Some("true"),
        "{scoped}"
    );
    assert_ne!(scoped.json()["id"], id.as_str());

    // The key still answers once the entity is ready.
    srv.wait_terminal(&id, SETTLE).await;
    let late = srv.submit("w5", &body, Some("key-1")).await;
    assert_eq!(late.status, 202, "{late}");
    assert_eq!(
        late.header("idempotent-replayed").as_deref(),
        Some("true"),
        "{late}"
    );
    assert_eq!(late.json()["id"], id.as_str());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_submissions_with_one_key_make_one_entity() {
    let ds = Downstream::start().await;
    let srv = Server::start(&Config::new().with_type(w5("w5", &ds))).await;
    let body = json!({"name": "race", "pad": "x".repeat(2000)});

    let mut tasks = Vec::new();
    for _ in 0..20 {
        let api = srv.api().clone();
        let body = body.clone();
        tasks.push(tokio::spawn(async move {
            api.submit("w5", &body, Some("same-key")).await
        }));
    }
    let mut ids = HashSet::new();
    let mut accepted = 0;
    for t in tasks {
        let r = t.await.unwrap();
        match r.status {
            202 => {
                accepted += 1;
                ids.insert(r.json()["id"].as_str().unwrap().to_owned());
            }
            409 => {
                assert_problem(&r, 409);
            }
            _ => panic!("concurrent submission with one key: expected 202 or 409, got {r}"),
        }
    }
    assert!(accepted >= 1, "no submission was accepted");
    assert_eq!(ids.len(), 1, "one key made several entities: {ids:?}");
    let id = ids.into_iter().next().unwrap();

    let replay = srv.submit("w5", &body, Some("same-key")).await;
    assert_eq!(replay.status, 202, "{replay}");
    assert_eq!(
        replay.header("idempotent-replayed").as_deref(),
        Some("true")
    );
    assert_eq!(replay.json()["id"], id.as_str());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bodies_that_are_not_json_objects_are_refused() {
    let ds = Downstream::start().await;
    let srv = Server::start(&Config::new().with_type(single("t", &ds))).await;

    for body in [&b"{not json"[..], b"", b"{\"a\": 1", b"\xff\xfe"] {
        let r = srv.post_bytes("/v1/entities/t", body.to_vec()).await;
        assert_problem(&r, 400);
    }
    for body in ["[1, 2]", "42", "\"text\"", "null", "true"] {
        let r = srv
            .post_bytes("/v1/entities/t", body.as_bytes().to_vec())
            .await;
        assert_problem_in(&r, &[400, 422]);
    }
    // Nothing was created.
    let list = srv.get("/v1/entities?type=t").await;
    assert_eq!(list.status, 200, "{list}");
    assert_eq!(list.json()["items"], json!([]), "{list}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn schema_violations_are_422_with_json_pointers() {
    let ds = Downstream::start().await;
    let schema = json!({
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "type": "object",
        "required": ["name"],
        "properties": {
            "name": {"type": "string"},
            "age": {"type": "integer", "minimum": 0},
            "address": {
                "type": "object",
                "properties": {"zip": {"type": "string", "pattern": "^[0-9]{5}$"}}
            }
        }
    });
    let srv = Server::start(&Config::new().with_type(single("person", &ds).schema(schema))).await;

    let pointers = |r: &Resp| -> Vec<String> {
        let p = assert_problem(r, 422);
        let errors = p["errors"]
            .as_array()
            .unwrap_or_else(|| panic!("422 without an `errors` array: {r}"));
        assert!(!errors.is_empty(), "{r}");
        errors
            .iter()
            .map(|e| {
                assert!(
                    e["message"].as_str().is_some_and(|m| !m.is_empty()),
                    "error without a message: {e}"
                );
                e["pointer"]
                    .as_str()
                    .unwrap_or_else(|| panic!("error without a pointer: {e}"))
                    .to_owned()
            })
            .collect()
    };

    let r = srv
        .submit(
            "person",
            &json!({"name": "x", "age": -1, "address": {"zip": "abc"}}),
            None,
        )
        .await;
    let ps = pointers(&r);
    assert!(ps.contains(&"/age".to_owned()), "pointers {ps:?}");
    assert!(ps.contains(&"/address/zip".to_owned()), "pointers {ps:?}");

    let r = srv.submit("person", &json!({"name": 5}), None).await;
    let ps = pointers(&r);
    assert_eq!(ps, vec!["/name".to_owned()], "{r}");

    // A missing required field: the pointer is the object that lacks it, or
    // the field itself.
    let r = srv.submit("person", &json!({"age": 3}), None).await;
    let ps = pointers(&r);
    assert!(
        ps.iter().any(|p| p.is_empty() || p == "/name"),
        "pointers {ps:?}"
    );

    let ok = srv
        .submit(
            "person",
            &json!({"name": "x", "age": 3, "address": {"zip": "12345"}}),
            None,
        )
        .await;
    assert_eq!(ok.status, 202, "{ok}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_type_is_404() {
    let ds = Downstream::start().await;
    let srv = Server::start(&Config::new().with_type(single("t", &ds))).await;
    let r = srv.submit("no_such_type", &json!({"a": 1}), None).await;
    assert_problem(&r, 404);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_payload_that_is_not_declared_json_gets_415() {
    let ds = Downstream::start().await;
    let srv = Server::start(&Config::new().with_type(single("t", &ds))).await;
    let body = serde_json::to_vec(&json!({"name": "Ada"})).unwrap();
    for declared in [
        "text/plain",
        "image/png",
        "application/x-www-form-urlencoded",
        "application/jsonx",
        "json",
    ] {
        let r = srv
            .raw_request(
                "POST",
                "/v1/entities/t",
                &[("content-type", declared)],
                body.clone(),
            )
            .await
            .expect("an answer");
        let p = assert_problem(&r, 415);
        assert_eq!(
            p["type"], "urn:ripen:problem:unsupported-media-type",
            "{declared}: {p:#}"
        );
        assert!(
            p["detail"].as_str().unwrap_or("").contains(declared),
            "{declared}: {p:#}"
        );
    }
    let listed = srv.get("/v1/entities?type=t").await.json();
    assert_eq!(listed["items"], json!([]), "nothing refused was stored");
    // JSON in any of its spellings, or no declaration at all, is taken.
    let accepted: [&[(&str, &str)]; 4] = [
        &[("content-type", "application/json; charset=utf-8")],
        &[("content-type", "Application/JSON")],
        &[("content-type", "application/merchant+json")],
        &[],
    ];
    for headers in accepted {
        let r = srv
            .raw_request("POST", "/v1/entities/t", headers, body.clone())
            .await
            .expect("an answer");
        assert_eq!(r.status, 202, "{headers:?}: {r}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn configured_body_limit_gives_413() {
    let ds = Downstream::start().await;
    let srv = Server::start(&Config::new().with_type(single("t", &ds)).body_limit(4096)).await;

    let small = serde_json::to_vec(&json!({"pad": "x".repeat(3000)})).unwrap();
    let r = srv.post_bytes("/v1/entities/t", small).await;
    assert_eq!(r.status, 202, "a body under the limit is accepted: {r}");

    // Exactly at the limit is accepted; one byte more is not.
    let sized = |n: usize| {
        let overhead = serde_json::to_vec(&json!({"pad": ""})).unwrap().len();
        let body = serde_json::to_vec(&json!({"pad": "z".repeat(n - overhead)})).unwrap();
        assert_eq!(body.len(), n);
        body
    };
    let r = srv.post_bytes("/v1/entities/t", sized(4096)).await;
    assert_eq!(
        r.status, 202,
        "a body of exactly body_limit_bytes is accepted: {r}"
    );
    let r = srv
        .raw_request("POST", "/v1/entities/t", &[], sized(4097))
        .await
        .expect("an answer to a body one byte over the limit");
    assert_problem(&r, 413);

    let big = serde_json::to_vec(&json!({"pad": "x".repeat(5000)})).unwrap();
    let r = srv
        .raw_request("POST", "/v1/entities/t", &[], big.clone())
        .await
        .expect("an answer to an oversized body");
    assert_problem(&r, 413);

    // The limit holds without a Content-Length too.
    let mut chunked = Vec::new();
    for piece in big.chunks(1000) {
        chunked.extend_from_slice(format!("{:x}\r\n", piece.len()).as_bytes());
        chunked.extend_from_slice(piece);
        chunked.extend_from_slice(b"\r\n");
    }
    chunked.extend_from_slice(b"0\r\n\r\n");
    let r = srv
        .raw_request(
            "POST",
            "/v1/entities/t",
            &[("transfer-encoding", "chunked")],
            chunked,
        )
        .await
        .expect("an answer to an oversized chunked body");
    assert_problem(&r, 413);

    let health = srv.get("/healthz").await;
    assert_eq!(health.status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn default_body_limit_is_one_mib() {
    let ds = Downstream::start().await;
    let srv = Server::start(&Config::new().with_type(single("t", &ds))).await;

    let big = serde_json::to_vec(&json!({"pad": "x".repeat(2 * 1024 * 1024)})).unwrap();
    let r = srv
        .raw_request("POST", "/v1/entities/t", &[], big)
        .await
        .expect("an answer to a 2 MiB body");
    assert_problem(&r, 413);

    let under = serde_json::to_vec(&json!({"pad": "y".repeat(900 * 1024)})).unwrap();
    let r = srv.post_bytes("/v1/entities/t", under).await;
    assert_eq!(
        r.status, 202,
        "a 900 KiB body is under the default limit: {r}"
    );
    let id = r.json()["id"].as_str().unwrap().to_owned();
    let view = srv.wait_terminal(&id, SETTLE).await;
    assert_eq!(view["status"], "ready", "{view:#}");
    let data = srv.get(&format!("/v1/entities/{id}/data")).await;
    assert_eq!(data.status, 200, "{data}");
    assert_eq!(
        data.json()["payload"]["pad"].as_str().map(|s| s.len()),
        Some(900 * 1024)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deeply_nested_json_is_a_client_error() {
    let ds = Downstream::start().await;
    let srv = Server::start(&Config::new().with_type(single("t", &ds))).await;

    let bodies = [
        format!("{{\"a\":{}{}}}", "[".repeat(10_000), "]".repeat(10_000)),
        "[".repeat(10_000),
        format!("{}1{}", "{\"a\":".repeat(10_000), "}".repeat(10_000)),
    ];
    for body in bodies {
        let r = srv.post_bytes("/v1/entities/t", body.into_bytes()).await;
        assert!(
            (400..500).contains(&r.status),
            "deep JSON must be a 4xx, got {r}"
        );
        assert_problem_in(&r, &[r.status]);
        // Valid JSON, only too deep: the problem says so and names the limit.
        let p = r.json();
        assert_eq!(p["type"], "urn:ripen:problem:json-too-deep", "{p:#}");
        assert_eq!(p["depth_max"], 127, "{p:#}");
    }
    let mut srv = srv;
    assert!(srv.exited().is_none(), "the server died on deep JSON");
    assert_eq!(srv.get("/healthz").await.status, 200);
}

// ---------------------------------------------------------------------------
// Pipelines
// ---------------------------------------------------------------------------

fn is_hex(s: &str, len: usize) -> bool {
    s.len() == len
        && s.bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// Parses a W3C `traceparent`; returns the trace id.
fn trace_id(traceparent: &str) -> String {
    let parts: Vec<&str> = traceparent.split('-').collect();
    assert_eq!(parts.len(), 4, "traceparent {traceparent:?}");
    assert!(
        is_hex(parts[0], 2) && parts[0] != "ff",
        "version in {traceparent:?}"
    );
    assert!(
        is_hex(parts[1], 32) && parts[1] != "0".repeat(32),
        "trace id in {traceparent:?}"
    );
    assert!(
        is_hex(parts[2], 16) && parts[2] != "0".repeat(16),
        "parent id in {traceparent:?}"
    );
    assert!(is_hex(parts[3], 2), "flags in {traceparent:?}");
    parts[1].to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn w5_pipeline_reaches_ready_and_calls_the_downstream_by_contract() {
    let ds = Downstream::start().await;
    let out = |s: &str| json!({"from": s, "value": format!("{s}-output")});
    for s in ["a", "d", "e"] {
        ds.set(&step_path("w5", s), Behavior::ok(out(s)));
    }
    for s in ["b", "c"] {
        ds.set(
            &step_path("w5", s),
            Behavior::sleep(Duration::from_millis(300), out(s)),
        );
    }
    let srv = Server::start(&Config::new().with_type(w5("w5", &ds))).await;
    let payload = json!({
        "name": "acme",
        "nested": {"list": [1, 2.5, -3, null, true]},
        "unicode": "名前 🍎 ünïcödé",
        "escapes": "quote \" backslash \\ newline \n tab \t nul \u{0000}",
    });
    let id = srv.submit_ok("w5", &payload).await;

    let view = srv.wait_settled(&id, SETTLE).await;
    assert_eq!(view["status"], "ready", "{view:#}");
    assert_eq!(view["degraded"], false, "{view:#}");
    assert!(view["ready_at"].is_string(), "ready_at: {view:#}");
    let time = |field: &str| {
        humantime::parse_rfc3339_weak(view[field].as_str().unwrap())
            .unwrap_or_else(|e| panic!("{field} is not RFC 3339 ({e}): {view:#}"))
    };
    assert!(time("created_at") <= time("ready_at"), "{view:#}");
    assert!(time("ready_at") <= time("updated_at"), "{view:#}");
    for name in ["a", "b", "c", "d", "e"] {
        let s = step(&view, name);
        assert_eq!(s["status"], "succeeded", "{view:#}");
        assert_eq!(s["attempts"], 1, "{view:#}");
        assert!(s["last_error"].is_null(), "{view:#}");
    }

    // Every step was called once, by contract.
    let mut traces = HashSet::new();
    let mut call = std::collections::HashMap::new();
    for name in ["a", "b", "c", "d", "e"] {
        let calls = ds.calls_to(&step_path("w5", name));
        assert_eq!(calls.len(), 1, "step {name} called {} times", calls.len());
        let c = calls.into_iter().next().unwrap();
        assert_eq!(c.method, "POST");
        assert!(
            c.header("content-type").unwrap_or("").contains("json"),
            "content-type of the step call: {:?}",
            c.headers
        );
        let body = c
            .body
            .clone()
            .unwrap_or_else(|| panic!("step {name}: body is not JSON: {:?}", c.raw));
        assert_eq!(body["entity_id"], id.as_str(), "{body:#}");
        assert_eq!(body["type"], "w5", "{body:#}");
        assert_eq!(body["version"], 1, "{body:#}");
        assert_eq!(body["step"], name, "{body:#}");
        assert_eq!(body["attempt"], 1, "{body:#}");
        assert_eq!(body["payload"], payload, "{body:#}");
        assert!(body["outputs"].is_object(), "{body:#}");
        assert_eq!(
            c.header("idempotency-key"),
            Some(format!("{id}:{name}").as_str()),
            "headers {:?}",
            c.headers
        );
        let tp = c
            .header("traceparent")
            .unwrap_or_else(|| panic!("step {name}: no traceparent in {:?}", c.headers));
        traces.insert(trace_id(tp));
        call.insert(name, c);
    }
    assert_eq!(traces.len(), 1, "one trace per entity, got {traces:?}");

    // Outputs flow to later steps.
    let outputs_of = |name: &str| call[name].body.as_ref().unwrap()["outputs"].clone();
    assert_eq!(
        outputs_of("a"),
        json!({}),
        "a needs nothing, has no outputs"
    );
    assert_eq!(outputs_of("b")["a"], out("a"));
    assert_eq!(outputs_of("c")["a"], out("a"));
    let d_outputs = outputs_of("d");
    assert_eq!(d_outputs["a"], out("a"), "{d_outputs:#}");
    assert_eq!(d_outputs["b"], out("b"), "{d_outputs:#}");
    assert_eq!(d_outputs["c"], out("c"), "{d_outputs:#}");

    // Order: nothing starts before its needs answered; b and c overlap.
    let done = |name: &str| call[name].replied_at.expect("answered");
    let start = |name: &str| call[name].received_at;
    for s in ["b", "c", "e"] {
        assert!(start(s) >= done("a"), "{s} started before a succeeded");
    }
    assert!(start("d") >= done("b"), "d started before b succeeded");
    assert!(start("d") >= done("c"), "d started before c succeeded");
    assert!(
        start("b") < done("c") && start("c") < done("b"),
        "b and c did not run in parallel: b {:?}..{:?}, c {:?}..{:?} after a",
        start("b") - done("a"),
        done("b") - done("a"),
        start("c") - done("a"),
        done("c") - done("a"),
    );
    let gap = start("d") - done("a");
    assert!(
        gap < Duration::from_millis(550),
        "d started {gap:?} after a finished"
    );

    // The consumable form.
    let data = srv.get(&format!("/v1/entities/{id}/data")).await;
    assert_eq!(data.status, 200, "{data}");
    let data = data.json();
    assert_eq!(data["id"], id.as_str());
    assert_eq!(data["type"], "w5");
    assert_eq!(data["version"], 1);
    assert_eq!(data["payload"], payload);
    for s in ["a", "b", "c", "d", "e"] {
        assert_eq!(data["outputs"][s], out(s), "{data:#}");
    }

    // The history tells the same story in order.
    let events = srv.events(&id).await;
    assert_events_well_formed(&events);
    assert_eq!(event_kind(&events[0]), "created", "{events:#?}");
    let pos = |kind: &str, step_name: &str| {
        events
            .iter()
            .position(|e| event_kind(e) == kind && event_step(e) == Some(step_name))
            .unwrap_or_else(|| panic!("no {kind} event for step {step_name}: {events:#?}"))
    };
    for s in ["a", "b", "c", "d", "e"] {
        assert!(pos("step_started", s) < pos("step_succeeded", s));
    }
    assert!(pos("step_started", "d") > pos("step_succeeded", "b"));
    assert!(pos("step_started", "d") > pos("step_succeeded", "c"));
    assert!(
        events
            .iter()
            .any(|e| event_kind(e) == "status_changed" && e.to_string().contains("\"ready\"")),
        "no status_changed to ready: {events:#?}"
    );
    assert_lifecycle(&events);
    assert_eq!(
        status_changes(&events).last().map(String::as_str),
        Some("ready")
    );
}

/// Checks the shape of a history: increasing `seq`, a time, a kind.
fn assert_events_well_formed(events: &[Value]) {
    assert!(!events.is_empty(), "empty history");
    let mut last_seq = None;
    let mut last_at: Option<std::time::SystemTime> = None;
    for e in events {
        let seq = e["seq"]
            .as_u64()
            .unwrap_or_else(|| panic!("event without a numeric seq: {e}"));
        if let Some(prev) = last_seq {
            assert!(seq > prev, "seq not increasing: {events:#?}");
        }
        last_seq = Some(seq);
        assert!(!event_kind(e).is_empty(), "event without a kind: {e}");
        let at = match &e["at"] {
            Value::String(s) => humantime::parse_rfc3339_weak(s)
                .unwrap_or_else(|err| panic!("event `at` is not RFC 3339 ({err}): {e}")),
            Value::Number(n) => {
                std::time::UNIX_EPOCH + Duration::from_millis(n.as_u64().expect("at in ms"))
            }
            _ => panic!("event without a time `at`: {e}"),
        };
        if let Some(prev) = last_at {
            assert!(at >= prev, "event times go backwards: {events:#?}");
        }
        last_at = Some(at);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retryable_errors_are_retried_until_success() {
    let ds = Downstream::start().await;
    ds.set("/w5/a", Behavior::fail_first(503, 2, json!({"a": 1})));
    let srv = Server::start(&Config::new().with_type(w5("w5", &ds))).await;
    let id = srv.submit_ok("w5", &json!({"n": 1})).await;

    let view = srv.wait_terminal(&id, SETTLE).await;
    assert_eq!(view["status"], "ready", "{view:#}");
    assert_eq!(step(&view, "a")["attempts"], 3, "{view:#}");
    assert_eq!(step(&view, "a")["status"], "succeeded", "{view:#}");

    let calls = ds.calls_for("/w5/a", &id);
    assert_eq!(calls.len(), 3, "calls to a");
    let attempts: Vec<Option<u64>> = calls.iter().map(|c| c.attempt()).collect();
    assert_eq!(attempts, vec![Some(1), Some(2), Some(3)]);
    for c in &calls {
        assert_eq!(
            c.header("idempotency-key"),
            Some(format!("{id}:a").as_str())
        );
    }
    // b ran only after the third attempt of a succeeded.
    let b = ds.calls_for("/w5/b", &id);
    assert_eq!(b.len(), 1);
    assert!(b[0].received_at >= calls[2].replied_at.unwrap());

    let events = srv.events(&id).await;
    assert_events_well_formed(&events);
    let kinds: Vec<&str> = events.iter().map(event_kind).collect();
    let failed = events
        .iter()
        .filter(|e| event_kind(e) == "attempt_failed" && event_step(e) == Some("a"))
        .count();
    assert_eq!(failed, 2, "attempt_failed events for a: {kinds:?}");
    let scheduled = events
        .iter()
        .filter(|e| event_kind(e) == "retry_scheduled" && event_step(e) == Some("a"))
        .count();
    assert_eq!(scheduled, 2, "retry_scheduled events for a: {kinds:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_400_fails_the_step_at_once_and_skips_its_dependents() {
    let ds = Downstream::start().await;
    ds.set("/w5/a", Behavior::always(400));
    let srv = Server::start(&Config::new().with_type(w5("w5", &ds))).await;
    let id = srv.submit_ok("w5", &json!({"n": 1})).await;

    let view = srv.wait_settled(&id, SETTLE).await;
    assert_eq!(view["status"], "failed", "{view:#}");
    let a = step(&view, "a");
    assert_eq!(a["status"], "failed", "{view:#}");
    assert_eq!(a["attempts"], 1, "a 400 is not retried: {view:#}");
    assert!(
        a["last_error"].as_str().is_some_and(|e| !e.is_empty()) || a["last_error"].is_object(),
        "last_error is set: {view:#}"
    );
    for s in ["b", "c", "d", "e"] {
        assert_eq!(step(&view, s)["status"], "skipped", "{view:#}");
        assert_eq!(step(&view, s)["attempts"], 0, "{view:#}");
    }
    assert_eq!(ds.calls_to("/w5/a").len(), 1);
    for s in ["b", "c", "d", "e"] {
        assert!(
            ds.calls_to(&step_path("w5", s)).is_empty(),
            "{s} was called"
        );
    }

    let data = srv.get(&format!("/v1/entities/{id}/data")).await;
    let p = assert_problem(&data, 409);
    assert_eq!(p["entity_status"], "failed", "{data}");

    let events = srv.events(&id).await;
    assert_events_well_formed(&events);
    let kinds: HashSet<&str> = events.iter().map(event_kind).collect();
    for k in [
        "created",
        "step_started",
        "step_failed",
        "step_skipped",
        "status_changed",
    ] {
        assert!(kinds.contains(k), "no {k} event: {events:#?}");
    }
    assert!(
        events
            .iter()
            .any(|e| event_kind(e) == "status_changed" && e.to_string().contains("\"failed\"")),
        "no status_changed to failed: {events:#?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_step_that_always_fails_gives_up_after_max_attempts() {
    let ds = Downstream::start().await;
    ds.set("/t/only", Behavior::always(500));
    let srv = Server::start(&Config::new().with_type(single("t", &ds))).await;
    let id = srv.submit_ok("t", &json!({"n": 1})).await;

    let view = srv.wait_terminal(&id, SETTLE).await;
    assert_eq!(view["status"], "failed", "{view:#}");
    let s = step(&view, "only");
    assert_eq!(s["status"], "failed", "{view:#}");
    assert_eq!(s["attempts"], 3, "{view:#}");
    assert!(!s["last_error"].is_null(), "{view:#}");
    // Give a runaway retry loop the time to show itself.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(ds.calls_to("/t/only").len(), 3);
    assert_eq!(
        srv.entity(&id).await["status"],
        "failed",
        "a terminal status never changes by itself"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_timeout_is_a_retryable_failure() {
    let ds = Downstream::start().await;
    ds.set(
        "/t/only",
        Behavior::sleep_first(1, Duration::from_millis(2000), json!({"late": true})),
    );
    let srv = Server::start(
        &Config::new().with_type(single("t", &ds).map_step("only", |s| s.timeout("200ms"))),
    )
    .await;
    let id = srv.submit_ok("t", &json!({"n": 1})).await;

    let view = srv.wait_terminal(&id, SETTLE).await;
    assert_eq!(view["status"], "ready", "{view:#}");
    assert_eq!(step(&view, "only")["attempts"], 2, "{view:#}");
    let calls = ds.calls_to("/t/only");
    assert_eq!(calls.len(), 2);
    let gap = calls[1].received_at - calls[0].received_at;
    assert!(
        gap < Duration::from_millis(1500),
        "the second attempt came {gap:?} after the first: the 200ms timeout was not enforced"
    );
    let events = srv.events(&id).await;
    assert!(
        events.iter().any(|e| event_kind(e) == "attempt_failed"),
        "no attempt_failed for the timeout: {events:#?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_step_that_always_times_out_fails_after_max_attempts() {
    let ds = Downstream::start().await;
    ds.set(
        "/slow/only",
        Behavior::sleep(Duration::from_secs(5), json!({"never": true})),
    );
    let srv = Server::start(
        &Config::new()
            .with_type(single("slow", &ds).map_step("only", |s| s.timeout("200ms").attempts(3))),
    )
    .await;
    let started = Instant::now();
    let id = srv.submit_ok("slow", &json!({"n": 1})).await;
    let view = srv.wait_terminal(&id, SETTLE).await;
    let took = started.elapsed();
    assert_eq!(view["status"], "failed", "{view:#}");
    let s = step(&view, "only");
    assert_eq!(s["attempts"], 3, "{view:#}");
    assert!(
        s["last_error"].to_string().to_lowercase().contains("time"),
        "last_error should say it timed out: {view:#}"
    );
    assert!(
        took < Duration::from_secs(4),
        "3 attempts of 200ms took {took:?}: the timeout was not enforced"
    );
    assert_eq!(ds.calls_to("/slow/only").len(), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retry_after_is_honoured() {
    let ds = Downstream::start().await;
    ds.set("/ra/x", Behavior::retry_after(503, 1, 1, json!({"x": 1})));
    ds.set("/ra/y", Behavior::retry_after(429, 1, 1, json!({"y": 1})));
    let t = TypeDef::new(
        "ra",
        vec![
            Step::http("x", ds.url("/ra/x")),
            Step::http("y", ds.url("/ra/y")),
        ],
    );
    let srv = Server::start(&Config::new().with_type(t)).await;
    let id = srv.submit_ok("ra", &json!({"n": 1})).await;

    let view = srv.wait_terminal(&id, SETTLE).await;
    assert_eq!(view["status"], "ready", "{view:#}");
    for path in ["/ra/x", "/ra/y"] {
        let calls = ds.calls_to(path);
        assert_eq!(calls.len(), 2, "{path}");
        let wait = calls[1].received_at - calls[0].replied_at.unwrap();
        assert!(
            wait >= Duration::from_millis(900),
            "{path}: retried {wait:?} after `Retry-After: 1` (backoff is 10-50ms)"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retry_after_as_an_http_date_is_honoured() {
    // RFC 9110: Retry-After is delay-seconds or an HTTP-date.
    let ds = Downstream::start().await;
    let until = std::time::SystemTime::now() + Duration::from_secs(3);
    ds.set(
        "/rd/only",
        Behavior::script(
            vec![Reply::error(503).header("retry-after", &http_date(until))],
            Reply::ok(&json!({"ok": 1})),
        ),
    );
    let srv = Server::start(&Config::new().with_type(single("rd", &ds))).await;
    let id = srv.submit_ok("rd", &json!({"n": 1})).await;
    let view = srv.wait_terminal(&id, SETTLE).await;
    assert_eq!(view["status"], "ready", "{view:#}");
    let calls = ds.calls_to("/rd/only");
    assert_eq!(calls.len(), 2);
    let wait = calls[1].received_at - calls[0].replied_at.unwrap();
    assert!(
        wait >= Duration::from_millis(1000),
        "retried {wait:?} after `Retry-After: {}` (about 2-3 s ahead; backoff is 10-50ms)",
        http_date(until)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_non_critical_failure_makes_the_entity_degraded() {
    let ds = Downstream::start().await;
    ds.set("/w5/e", Behavior::always(400));
    let srv = Server::start(&Config::new().with_type(w5("w5", &ds))).await;
    let id = srv.submit_ok("w5", &json!({"n": 1})).await;

    let view = srv.wait_settled(&id, SETTLE).await;
    assert_eq!(view["status"], "ready", "{view:#}");
    assert_eq!(view["degraded"], true, "{view:#}");
    assert_eq!(step(&view, "e")["status"], "failed", "{view:#}");
    assert_eq!(step(&view, "e")["critical"], false, "{view:#}");
    for s in ["a", "b", "c", "d"] {
        assert_eq!(step(&view, s)["status"], "succeeded", "{view:#}");
    }
    let data = srv.get(&format!("/v1/entities/{id}/data")).await;
    assert_eq!(data.status, 200, "a degraded entity is consumable: {data}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_2xx_without_a_json_body_succeeds() {
    // "A 2xx succeeds; its JSON body (if any) is the step's output."
    let ds = Downstream::start().await;
    ds.set("/nj/text", Behavior::non_json(200, "OK, not JSON"));
    ds.set("/nj/empty", Behavior::script(vec![], Reply::text(204, "")));
    ds.set("/nj/json", Behavior::ok(json!({"later": true})));
    let t = TypeDef::new(
        "nj",
        vec![
            Step::http("text", ds.url("/nj/text")),
            Step::http("empty", ds.url("/nj/empty")),
            Step::http("json", ds.url("/nj/json")).needs(&["text", "empty"]),
        ],
    );
    let srv = Server::start(&Config::new().with_type(t)).await;
    let id = srv.submit_ok("nj", &json!({"n": 1})).await;
    let view = srv.wait_terminal(&id, SETTLE).await;
    assert_eq!(view["status"], "ready", "{view:#}");
    for s in ["text", "empty", "json"] {
        assert_eq!(step(&view, s)["status"], "succeeded", "{view:#}");
        assert_eq!(step(&view, s)["attempts"], 1, "{view:#}");
    }
    // Later steps and the consumable entity still get valid JSON.
    let json_call = &ds.calls_to("/nj/json")[0];
    assert!(json_call.body.is_some(), "not JSON: {:?}", json_call.raw);
    let data = srv.get(&format!("/v1/entities/{id}/data")).await;
    assert_eq!(data.status, 200, "{data}");
    assert_eq!(data.json()["outputs"]["json"], json!({"later": true}));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn answers_are_classified_retryable_or_not_by_status() {
    // 408, 425, 429, 5xx and connection errors are retried; other 4xx fail
    // the step at once. Each case is a non-critical step of its own, so one
    // entity shows them all.
    let ds = Downstream::start().await;
    let closed_port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let retried = [408u16, 425, 429, 500, 502, 503, 504];
    let fatal = [400u16, 401, 403, 404, 409, 410, 422];
    let mut steps = vec![Step::http("anchor", ds.url("/codes/anchor"))];
    for code in retried {
        let name = format!("r{code}");
        ds.set(
            &format!("/codes/{name}"),
            Behavior::fail_first(code, 1, json!({"code": code})),
        );
        steps.push(Step::http(&name, ds.url(&format!("/codes/{name}"))).non_critical());
    }
    for code in fatal {
        let name = format!("f{code}");
        ds.set(&format!("/codes/{name}"), Behavior::always(code));
        steps.push(Step::http(&name, ds.url(&format!("/codes/{name}"))).non_critical());
    }
    steps.push(
        Step::http("refused", format!("http://127.0.0.1:{closed_port}/refused"))
            .non_critical()
            .attempts(2),
    );
    let srv = Server::start(&Config::new().with_type(TypeDef::new("codes", steps))).await;
    let id = srv.submit_ok("codes", &json!({"n": 1})).await;

    let view = srv.wait_settled(&id, SETTLE).await;
    assert_eq!(view["status"], "ready", "{view:#}");
    assert_eq!(view["degraded"], true, "{view:#}");
    let mut wrong = Vec::new();
    for code in retried {
        let s = step(&view, &format!("r{code}"));
        if s["status"] != "succeeded" || s["attempts"] != 2 {
            wrong.push(format!(
                "{code}: expected retried once then succeeded, got {s}"
            ));
        }
    }
    for code in fatal {
        let s = step(&view, &format!("f{code}"));
        if s["status"] != "failed" || s["attempts"] != 1 {
            wrong.push(format!("{code}: expected failed after 1 attempt, got {s}"));
        }
    }
    let s = step(&view, "refused");
    if s["status"] != "failed" || s["attempts"] != 2 {
        wrong.push(format!(
            "connection refused: expected 2 attempts then failed, got {s}"
        ));
    }
    assert!(
        wrong.is_empty(),
        "misclassified answers:\n{}",
        wrong.join("\n")
    );
}

// ---------------------------------------------------------------------------
// Reading
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn data_is_409_while_pending() {
    let ds = Downstream::start().await;
    ds.set(
        "/t/only",
        Behavior::sleep(Duration::from_millis(1500), json!({"done": true})),
    );
    let srv = Server::start(&Config::new().with_type(single("t", &ds))).await;
    let id = srv.submit_ok("t", &json!({"n": 1})).await;

    let r = srv.get(&format!("/v1/entities/{id}/data")).await;
    let p = assert_problem(&r, 409);
    assert_eq!(p["entity_status"], "pending", "{r}");
    assert!(
        r.header("retry-after").is_some(),
        "no Retry-After while pending: {r}"
    );

    srv.wait_terminal(&id, SETTLE).await;
    let r = srv.get(&format!("/v1/entities/{id}/data")).await;
    assert_eq!(r.status, 200, "{r}");
    assert_eq!(r.json()["outputs"]["only"], json!({"done": true}));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn list_filters_and_paginates_newest_first() {
    let ds = Downstream::start().await;
    ds.set("/lb/only", Behavior::always(400));
    let srv = Server::start(
        &Config::new()
            .with_type(single("la", &ds))
            .with_type(single("lb", &ds)),
    )
    .await;

    let mut all = Vec::new();
    let mut la = Vec::new();
    let mut lb = Vec::new();
    for i in 0..9 {
        let t = if i == 2 || i == 6 { "lb" } else { "la" };
        let id = srv.submit_ok(t, &json!({"i": i})).await;
        if t == "la" {
            la.push(id.clone());
        } else {
            lb.push(id.clone());
        }
        all.push(id);
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    for id in &all {
        srv.wait_terminal(id, SETTLE).await;
    }
    let newest_first = |ids: &[String]| ids.iter().rev().cloned().collect::<Vec<_>>();

    // Pages of 3 visit every entity of the type once, newest first.
    let mut seen = Vec::new();
    let mut pages = 0;
    let mut url = "/v1/entities?type=la&limit=3".to_owned();
    loop {
        let r = srv.get(&url).await;
        assert_eq!(r.status, 200, "{r}");
        let page = r.json();
        let items = page["items"]
            .as_array()
            .unwrap_or_else(|| panic!("no items: {page}"));
        assert!(items.len() <= 3, "limit not honoured: {page:#}");
        for item in items {
            assert_eq!(item["type"], "la", "{item}");
            assert!(item["steps"].is_array(), "items are entity views: {item}");
            seen.push(item["id"].as_str().unwrap().to_owned());
        }
        pages += 1;
        assert!(pages <= 10, "pagination does not end");
        match &page["next"] {
            Value::Null => break,
            Value::String(cursor) => {
                url = format!(
                    "/v1/entities?type=la&limit=3&after={}",
                    encode_query(cursor)
                );
            }
            other => panic!("next is neither null nor a string: {other}"),
        }
    }
    assert_eq!(seen, newest_first(&la), "paging type=la by 3");
    assert!(pages >= 3, "7 items by 3 need at least 3 pages");

    // Without a type filter, everything, newest first.
    let r = srv.get("/v1/entities?limit=100").await;
    assert_eq!(r.status, 200, "{r}");
    let ids: Vec<String> = r.json()["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["id"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(ids, newest_first(&all));

    // Status filters.
    let ids_of = |r: &Resp| -> Vec<String> {
        assert_eq!(r.status, 200, "{r}");
        r.json()["items"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v["id"].as_str().unwrap().to_owned())
            .collect()
    };
    assert_eq!(
        ids_of(&srv.get("/v1/entities?status=failed").await),
        newest_first(&lb)
    );
    assert_eq!(
        ids_of(&srv.get("/v1/entities?type=la&status=ready&limit=50").await),
        newest_first(&la)
    );
    let none = srv.get("/v1/entities?type=la&status=failed").await;
    assert_eq!(ids_of(&none), Vec::<String>::new());
    assert!(none.json()["next"].is_null(), "{none}");
    assert_eq!(
        ids_of(&srv.get("/v1/entities?type=nope").await),
        Vec::<String>::new()
    );

    // A cursor is stable while new entities arrive: paging by 2 and
    // submitting between pages still visits each older entity once.
    let mut seen = Vec::new();
    let mut url = "/v1/entities?type=la&limit=2".to_owned();
    for round in 0..20 {
        let page = srv.get(&url).await;
        assert_eq!(page.status, 200, "{page}");
        let page = page.json();
        for item in page["items"].as_array().unwrap() {
            seen.push(item["id"].as_str().unwrap().to_owned());
        }
        srv.submit_ok("la", &json!({"round": round})).await;
        match page["next"].as_str() {
            Some(cursor) => {
                url = format!(
                    "/v1/entities?type=la&limit=2&after={}",
                    encode_query(cursor)
                )
            }
            None => break,
        }
    }
    assert_eq!(seen, newest_first(&la), "paging while submitting");

    // Bad parameters.
    for q in [
        "status=bogus",
        "limit=abc",
        "limit=-1",
        "after=not-a-cursor",
    ] {
        let r = srv.get(&format!("/v1/entities?{q}")).await;
        assert_problem(&r, 400);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_record_every_attempt_in_order() {
    let ds = Downstream::start().await;
    ds.set("/ev/first", Behavior::fail_first(503, 1, json!({"ok": 1})));
    ds.set("/ev/extra", Behavior::always(400));
    let t = TypeDef::new(
        "ev",
        vec![
            Step::http("first", ds.url("/ev/first")),
            Step::http("second", ds.url("/ev/second")).needs(&["first"]),
            Step::http("extra", ds.url("/ev/extra")).non_critical(),
        ],
    );
    let srv = Server::start(&Config::new().with_type(t)).await;
    let id = srv.submit_ok("ev", &json!({"n": 1})).await;
    let view = srv.wait_settled(&id, SETTLE).await;
    assert_eq!(view["status"], "ready", "{view:#}");

    let events = srv.events(&id).await;
    assert_events_well_formed(&events);
    assert_eq!(event_kind(&events[0]), "created", "{events:#?}");
    let kinds: HashSet<&str> = events.iter().map(event_kind).collect();
    for k in [
        "created",
        "step_started",
        "attempt_failed",
        "retry_scheduled",
        "step_succeeded",
        "step_failed",
        "status_changed",
    ] {
        assert!(kinds.contains(k), "no {k} event: {events:#?}");
    }
    let of = |kind: &str, s: &str| -> Vec<usize> {
        events
            .iter()
            .enumerate()
            .filter(|(_, e)| event_kind(e) == kind && event_step(e) == Some(s))
            .map(|(i, _)| i)
            .collect()
    };
    assert_eq!(of("step_started", "first").len(), 2, "{events:#?}");
    assert_eq!(of("step_succeeded", "first").len(), 1, "{events:#?}");
    assert_eq!(of("step_failed", "extra").len(), 1, "{events:#?}");
    assert!(of("attempt_failed", "first")[0] < of("retry_scheduled", "first")[0]);
    assert!(of("retry_scheduled", "first")[0] < of("step_started", "first")[1]);
    assert!(of("step_succeeded", "first")[0] < of("step_started", "second")[0]);
    // The history is stable: reading it again gives the same prefix.
    let again = srv.events(&id).await;
    assert_eq!(&again[..events.len()], &events[..]);
}

// ---------------------------------------------------------------------------
// Operator actions
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_a_pending_entity() {
    let ds = Downstream::start().await;
    ds.set(
        "/w5/a",
        Behavior::sleep(Duration::from_secs(3), json!({"slow": true})),
    );
    let srv = Server::start(&Config::new().with_type(w5("w5", &ds))).await;
    let id = srv.submit_ok("w5", &json!({"n": 1})).await;

    let r = srv.post_empty(&format!("/v1/entities/{id}/retry")).await;
    assert_problem(&r, 409);

    let r = srv.post_empty(&format!("/v1/entities/{id}/cancel")).await;
    assert_eq!(r.status, 202, "{r}");
    let view = srv.wait_terminal(&id, Duration::from_secs(5)).await;
    assert_eq!(view["status"], "cancelled", "{view:#}");

    let r = srv.post_empty(&format!("/v1/entities/{id}/cancel")).await;
    assert_problem(&r, 409);
    let r = srv.post_empty(&format!("/v1/entities/{id}/retry")).await;
    assert_problem(&r, 409);
    let r = srv.get(&format!("/v1/entities/{id}/data")).await;
    let p = assert_problem(&r, 409);
    assert_eq!(p["entity_status"], "cancelled", "{r}");
    let events = srv.events(&id).await;
    assert_events_well_formed(&events);
    assert_lifecycle(&events);
    assert_eq!(
        status_changes(&events).last().map(String::as_str),
        Some("cancelled"),
        "{events:#?}"
    );

    // A cancelled entity stays cancelled, and its blocked steps never run.
    tokio::time::sleep(Duration::from_millis(3500)).await;
    assert_eq!(srv.entity(&id).await["status"], "cancelled");
    for s in ["b", "c", "d", "e"] {
        assert!(
            ds.calls_to(&step_path("w5", s)).is_empty(),
            "{s} ran after cancel"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retry_a_failed_entity_reruns_only_what_failed() {
    let ds = Downstream::start().await;
    // b fails for good the first time (after c had the time to succeed),
    // and succeeds the second time.
    ds.set(
        "/w5/b",
        Behavior::script(
            vec![Reply::error(400).delay(Duration::from_millis(200))],
            Reply::ok(&json!({"b": "second time"})),
        ),
    );
    let srv = Server::start(&Config::new().with_type(w5("w5", &ds))).await;
    let id = srv.submit_ok("w5", &json!({"n": 1})).await;

    let failed = srv.wait_settled(&id, SETTLE).await;
    assert_eq!(failed["status"], "failed", "{failed:#}");
    assert_eq!(step(&failed, "b")["status"], "failed", "{failed:#}");
    assert_eq!(step(&failed, "d")["status"], "skipped", "{failed:#}");
    let succeeded_before: Vec<String> = failed["steps"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|s| s["status"] == "succeeded")
        .map(|s| s["name"].as_str().unwrap().to_owned())
        .collect();
    assert!(succeeded_before.contains(&"a".to_owned()), "{failed:#}");

    let r = srv.post_empty(&format!("/v1/entities/{id}/retry")).await;
    assert_eq!(r.status, 202, "{r}");
    let view = srv.wait_settled(&id, SETTLE).await;
    assert_eq!(view["status"], "ready", "{view:#}");
    for s in ["a", "b", "c", "d", "e"] {
        assert_eq!(step(&view, s)["status"], "succeeded", "{view:#}");
    }
    for s in &succeeded_before {
        assert_eq!(
            ds.calls_to(&step_path("w5", s)).len(),
            1,
            "step {s} had succeeded and must not run again"
        );
    }
    assert_eq!(ds.calls_to("/w5/b").len(), 2);
    assert_eq!(ds.calls_to("/w5/d").len(), 1);
    let d = &ds.calls_to("/w5/d")[0];
    assert_eq!(
        d.body.as_ref().unwrap()["outputs"]["b"],
        json!({"b": "second time"})
    );

    let events = srv.events(&id).await;
    assert_events_well_formed(&events);
    assert_lifecycle(&events);
    let changes = status_changes(&events);
    let changes: Vec<&str> = changes
        .iter()
        .map(String::as_str)
        .skip_while(|s| *s == "pending")
        .collect();
    assert_eq!(changes, vec!["failed", "pending", "ready"], "{events:#?}");

    let r = srv.post_empty(&format!("/v1/entities/{id}/retry")).await;
    assert_problem(&r, 409);
    let r = srv.post_empty(&format!("/v1/entities/{id}/cancel")).await;
    assert_problem(&r, 409);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_and_malformed_ids() {
    let ds = Downstream::start().await;
    let srv = Server::start(&Config::new().with_type(single("t", &ds))).await;
    // A real entity, so the store is not empty.
    srv.submit_ok("t", &json!({"n": 1})).await;

    let unknown = uuid::Uuid::now_v7().to_string();
    for path in [
        format!("/v1/entities/{unknown}"),
        format!("/v1/entities/{unknown}/data"),
        format!("/v1/entities/{unknown}/events"),
    ] {
        assert_problem(&srv.get(&path).await, 404);
    }
    for action in ["retry", "cancel"] {
        let r = srv
            .post_empty(&format!("/v1/entities/{unknown}/{action}"))
            .await;
        assert_problem(&r, 404);
    }
    for bad in ["not-a-uuid", "123", "0193c5b2"] {
        assert_problem_in(&srv.get(&format!("/v1/entities/{bad}")).await, &[400, 404]);
        assert_problem_in(
            &srv.get(&format!("/v1/entities/{bad}/data")).await,
            &[400, 404],
        );
        let r = srv.post_empty(&format!("/v1/entities/{bad}/cancel")).await;
        assert_problem_in(&r, &[400, 404]);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_readiness_and_unknown_routes() {
    let ds = Downstream::start().await;
    let srv = Server::start(&Config::new().with_type(single("t", &ds))).await;
    assert_eq!(srv.get("/healthz").await.status, 200);
    assert_eq!(srv.get("/readyz").await.status, 200);
    for path in ["/nope", "/v1/nope", "/v1/entities/t/x/y/z"] {
        assert_problem(&srv.get(path).await, 404);
    }
    let r = srv
        .request(Method::POST, "/v1/nope", &[], Some(b"{}".to_vec()))
        .await;
    assert_problem(&r, 404);
    // A known path with a method it does not support.
    let id = uuid::Uuid::now_v7();
    let r = srv
        .request(Method::DELETE, &format!("/v1/entities/{id}"), &[], None)
        .await;
    assert_problem_in(&r, &[404, 405]);
    let r = srv.request(Method::PUT, "/v1/entities/t", &[], None).await;
    assert_problem_in(&r, &[404, 405]);
}

// ---------------------------------------------------------------------------
// Configuration errors
// ---------------------------------------------------------------------------

const BASE_TOML: &str = r#"
[server]
listen = "127.0.0.1:0"

[storage]
url = "sqlite://@DIR@/ripen.db"
"#;

async fn assert_config_refused(types: &str, files: &[(&str, &str)], must_mention: &[&[&str]]) {
    let toml = format!("{BASE_TOML}\n{types}");
    let (out, _dir) = serve_bad_config(&toml, files).await;
    assert!(
        out.status.is_some(),
        "ripen serve kept running with a bad config:\n{toml}\n{out}"
    );
    assert!(
        !out.success(),
        "ripen serve exited 0 with a bad config:\n{toml}\n{out}"
    );
    assert!(
        !out.stdout.contains("listening on"),
        "ripen serve listened with a bad config:\n{out}"
    );
    let stderr = out.stderr.to_lowercase();
    assert!(
        stderr.contains("ripen.toml"),
        "the message does not name the file:\n{out}"
    );
    for alternatives in must_mention {
        assert!(
            alternatives
                .iter()
                .any(|w| stderr.contains(&w.to_lowercase())),
            "the message mentions none of {alternatives:?}:\n{toml}\n{out}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn config_with_unknown_needs_is_refused() {
    let types = r#"
[[types.shop.steps]]
name = "alpha"
http = "http://127.0.0.1:9/alpha"

[[types.shop.steps]]
name = "beta"
needs = ["ghost_step"]
http = "http://127.0.0.1:9/beta"
"#;
    assert_config_refused(types, &[], &[&["ghost_step"]]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn config_with_a_cycle_is_refused() {
    let types = r#"
[[types.shop.steps]]
name = "alpha"
needs = ["gamma"]
http = "http://127.0.0.1:9/alpha"

[[types.shop.steps]]
name = "beta"
needs = ["alpha"]
http = "http://127.0.0.1:9/beta"

[[types.shop.steps]]
name = "gamma"
needs = ["beta"]
http = "http://127.0.0.1:9/gamma"
"#;
    assert_config_refused(types, &[], &[&["cycl"], &["alpha", "beta", "gamma"]]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn config_with_duplicate_step_names_is_refused() {
    let types = r#"
[[types.shop.steps]]
name = "twin_step"
http = "http://127.0.0.1:9/one"

[[types.shop.steps]]
name = "twin_step"
http = "http://127.0.0.1:9/two"
"#;
    assert_config_refused(types, &[], &[&["twin_step"]]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn config_with_an_unknown_key_is_refused() {
    let types = r#"
[[types.shop.steps]]
name = "alpha"
http = "http://127.0.0.1:9/alpha"
colour = "red"
"#;
    assert_config_refused(types, &[], &[&["colour"]]).await;

    let (out, _dir) = serve_bad_config(
        "[server]\nlisten = \"127.0.0.1:0\"\nlistn_typo = 1\n\n[storage]\nurl = \"sqlite://@DIR@/ripen.db\"\n\n[[types.shop.steps]]\nname = \"alpha\"\nhttp = \"http://127.0.0.1:9/a\"\n",
        &[],
    )
    .await;
    assert!(out.status.is_some() && !out.success(), "{out}");
    assert!(out.stderr.contains("listn_typo"), "{out}");
    assert!(out.stderr.contains("ripen.toml"), "{out}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn config_with_a_missing_schema_file_is_refused() {
    let types = r#"
[types.shop]
schema = "schemas/absent.json"

[[types.shop.steps]]
name = "alpha"
http = "http://127.0.0.1:9/alpha"
"#;
    assert_config_refused(types, &[], &[&["absent.json"]]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn config_with_an_invalid_schema_file_is_refused() {
    let types = r#"
[types.shop]
schema = "schemas/broken.json"

[[types.shop.steps]]
name = "alpha"
http = "http://127.0.0.1:9/alpha"
"#;
    assert_config_refused(
        types,
        &[("schemas/broken.json", "{ this is not json")],
        &[&["broken.json"]],
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_valid_config_starts_and_another_start_on_the_same_data_works() {
    // The control case for the refusals above: the same shape, valid, starts.
    let ds = Downstream::start().await;
    let mut srv = Server::start(&Config::new().with_type(w5("w5", &ds))).await;
    let id = srv.submit_ok("w5", &json!({"n": 1})).await;
    srv.wait_terminal(&id, SETTLE).await;
    let started = Instant::now();
    srv.restart().await;
    assert!(started.elapsed() < Duration::from_secs(10));
    let view = srv.entity(&id).await;
    assert_eq!(
        view["status"], "ready",
        "state survives a restart: {view:#}"
    );
}
