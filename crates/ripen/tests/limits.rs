//! `[limits]` through the real binary (docs/security.md, "Limits"): the
//! header, body and idle timeouts over raw TCP, the connection cap and the
//! intake gate answering 503 `overloaded` and recovering at once, costly
//! schemas costing their own requests and never `/healthz`, and each JSON
//! limit answering its problem.

mod common;

use std::time::{Duration, Instant};

use common::*;
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Reads from `stream` until it is closed (or `patience` passes); returns
/// what was read and how long the read waited.
async fn read_until_closed(stream: &mut TcpStream, patience: Duration) -> (Vec<u8>, Duration) {
    let started = Instant::now();
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let left = patience.saturating_sub(started.elapsed());
        match tokio::time::timeout(left, stream.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return (got, started.elapsed()),
            Ok(Ok(n)) => got.extend_from_slice(&buf[..n]),
            Err(_) => panic!(
                "still open after {patience:?}; read {:?}",
                String::from_utf8_lossy(&got)
            ),
        }
    }
}

/// Reads one response of `Content-Length` framing: its status and body.
async fn read_response(stream: &mut TcpStream) -> (u16, String, String) {
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let text = String::from_utf8_lossy(&got).to_string();
        if let Some(end) = text.find("\r\n\r\n") {
            let head = text[..end].to_owned();
            let length: usize = head
                .lines()
                .find_map(|l| {
                    let (k, v) = l.split_once(':')?;
                    k.eq_ignore_ascii_case("content-length")
                        .then(|| v.trim().parse().ok())?
                })
                .unwrap_or(0);
            if got.len() >= end + 4 + length {
                let status = head[9..12].parse().expect("a status");
                let body = String::from_utf8_lossy(&got[end + 4..end + 4 + length]).to_string();
                return (status, head, body);
            }
        }
        let n = tokio::time::timeout(Duration::from_secs(10), stream.read(&mut buf))
            .await
            .expect("an answer within 10 s")
            .expect("read");
        assert!(n > 0, "closed before a whole answer: {text:?}");
        got.extend_from_slice(&buf[..n]);
    }
}

fn limits(lines: &str) -> String {
    format!("[limits]\n{lines}\n")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_heads_slow_bodies_and_idle_connections_are_cut() {
    let ds = Downstream::start().await;
    let cfg = Config::new().with_type(single("plain", &ds)).extra(&limits(
        "header_timeout = \"1s\"\nbody_timeout = \"1s\"\nidle_timeout = \"1s\"",
    ));
    let srv = Server::start(&cfg).await;
    let addr = srv.addr();

    // Slowloris: half a head, then nothing. Closed within the timeout,
    // well before three of them.
    let mut slow = TcpStream::connect(&addr).await.unwrap();
    slow.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Slow: ")
        .await
        .unwrap();
    let (answer, waited) = read_until_closed(&mut slow, Duration::from_secs(3)).await;
    assert!(
        waited >= Duration::from_millis(900),
        "closed after {waited:?}, before the timeout"
    );
    assert!(answer.is_empty() || String::from_utf8_lossy(&answer).starts_with("HTTP/1.1 "));

    // A connection that sends nothing at all is held to the same timeout.
    let mut silent = TcpStream::connect(&addr).await.unwrap();
    let (_, waited) = read_until_closed(&mut silent, Duration::from_secs(3)).await;
    assert!(waited >= Duration::from_millis(900), "{waited:?}");

    // A short body: 408 problem+json within the body timeout.
    let mut short = TcpStream::connect(&addr).await.unwrap();
    short
        .write_all(
            b"POST /v1/entities/plain HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{\"a\":",
        )
        .await
        .unwrap();
    let sent = Instant::now();
    let (status, head, body) = read_response(&mut short).await;
    let took = sent.elapsed();
    assert_eq!(status, 408, "{head}\n{body}");
    assert!(head
        .to_ascii_lowercase()
        .contains("content-type: application/problem+json"));
    let problem: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(problem["type"], "urn:ripen:problem:body-timeout");
    assert!(
        took >= Duration::from_millis(900) && took < Duration::from_secs(3),
        "{took:?}"
    );

    // Idle keep-alive: one request served, then the connection is closed
    // once it has been idle for the timeout.
    let mut idle = TcpStream::connect(&addr).await.unwrap();
    idle.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let (status, _, _) = read_response(&mut idle).await;
    assert_eq!(status, 200);
    let (rest, waited) = read_until_closed(&mut idle, Duration::from_secs(3)).await;
    assert!(rest.is_empty());
    assert!(waited >= Duration::from_millis(900), "{waited:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_event_stream_outlives_the_idle_and_body_timeouts() {
    let ds = Downstream::start().await;
    let cfg = Config::new().with_type(single("plain", &ds)).extra(&limits(
        "header_timeout = \"500ms\"\nbody_timeout = \"500ms\"\nidle_timeout = \"500ms\"",
    ));
    let srv = Server::start(&cfg).await;
    let mut stream = TcpStream::connect(srv.addr()).await.unwrap();
    stream
        .write_all(b"GET /v1/events HTTP/1.1\r\nHost: x\r\nAccept: text/event-stream\r\n\r\n")
        .await
        .unwrap();
    let mut buf = [0u8; 4096];
    let n = stream.read(&mut buf).await.unwrap();
    assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200"));
    // Three idle timeouts later, a submission still reaches the stream.
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    let id = srv.submit_ok("plain", &json!({"n": 1})).await;
    let mut seen = String::new();
    let deadline = Instant::now() + Duration::from_secs(10);
    while !seen.contains(&id) {
        let left = deadline.saturating_duration_since(Instant::now());
        let n = tokio::time::timeout(left, stream.read(&mut buf))
            .await
            .expect("the event within 10 s")
            .unwrap();
        assert!(n > 0, "the stream was closed: {seen}");
        seen.push_str(&String::from_utf8_lossy(&buf[..n]));
    }
}

/// Sends `count` submissions at once over fresh connections; returns the
/// answers' statuses, with `Retry-After` checked on every 503.
async fn burst(srv: &Server, count: usize, body: Value) -> Vec<u16> {
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..count {
        let api = Api::new(&srv.api().base());
        let body = body.clone();
        tasks.spawn(async move {
            let r = api
                .try_request(
                    hyper::Method::POST,
                    "/v1/entities/slow",
                    &[],
                    Some(serde_json::to_vec(&json!({"i": i, "b": body})).unwrap()),
                )
                .await;
            match r {
                Ok(r) => {
                    if r.status == 503 {
                        let p = assert_problem(&r, 503);
                        assert_eq!(p["type"], "urn:ripen:problem:overloaded", "{r}");
                        assert_eq!(r.header("retry-after").as_deref(), Some("1"), "{r}");
                    }
                    r.status
                }
                // A connection closed at once over the cap.
                Err(_) => 0,
            }
        });
    }
    let mut statuses = Vec::new();
    while let Some(s) = tasks.join_next().await {
        statuses.push(s.unwrap());
    }
    statuses
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn overload_answers_503_and_recovers_at_once() {
    let ds = Downstream::start().await;
    let cfg = Config::new()
        .with_type(single("slow", &ds))
        .extra(&limits("intake_in_flight_max = 2"));
    let srv = Server::start(&cfg).await;
    // Two submissions in flight: their bodies are slow to come.
    let mut held = Vec::new();
    for _ in 0..2 {
        let mut c = TcpStream::connect(srv.addr()).await.unwrap();
        c.write_all(
            b"POST /v1/entities/slow HTTP/1.1\r\nHost: x\r\nContent-Length: 50\r\n\r\n{\"a\":",
        )
        .await
        .unwrap();
        held.push(c);
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let statuses = burst(&srv, 20, json!("x")).await;
    assert!(statuses.iter().all(|s| *s == 503), "{statuses:?}");
    // Reads are not intake: still served.
    assert_eq!(srv.get("/v1/entities").await.status, 200);
    // Once the two end, submissions are served at once.
    drop(held);
    // (The server sees the two connections close.)
    tokio::time::sleep(Duration::from_millis(100)).await;
    let statuses = burst(&srv, 2, json!("x")).await;
    assert_eq!(statuses, vec![202, 202]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_past_the_cap_get_503_and_the_cap_frees_up() {
    let ds = Downstream::start().await;
    let cfg = Config::new()
        .with_type(single("plain", &ds))
        .extra(&limits("connections_max = 4\nheader_timeout = \"3s\""));
    let srv = Server::start(&cfg).await;
    let addr = srv.addr();
    // Four connections hold the cap (each sent half a head).
    let mut held = Vec::new();
    for _ in 0..4 {
        let mut c = TcpStream::connect(&addr).await.unwrap();
        c.write_all(b"GET /healthz HTTP/1.1\r\n").await.unwrap();
        held.push(c);
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut over = TcpStream::connect(&addr).await.unwrap();
    over.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let (status, head, body) = read_response(&mut over).await;
    assert_eq!(status, 503, "{head}\n{body}");
    assert!(
        head.to_ascii_lowercase().contains("retry-after: 1"),
        "{head}"
    );
    let problem: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(problem["type"], "urn:ripen:problem:overloaded");
    assert_eq!(problem["limit"], "connections_max");
    // The held connections go; the next request is served.
    drop(held);
    tokio::time::sleep(Duration::from_millis(200)).await;
    let r = srv.get("/healthz").await;
    assert_eq!(r.status, 200, "{r}");
}

/// The `/healthz` latencies measured while `load` runs, sorted.
async fn healthz_latencies_during(
    srv: &Server,
    load: impl std::future::Future<Output = Vec<Resp>>,
) -> (Vec<Duration>, Vec<Resp>) {
    let api = Api::new(&srv.api().base());
    // A warm connection, as a balancer's probe has.
    assert_eq!(api.get("/healthz").await.status, 200);
    let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let probe = {
        let done = done.clone();
        tokio::spawn(async move {
            let mut latencies = Vec::new();
            while !done.load(std::sync::atomic::Ordering::Relaxed) {
                let started = Instant::now();
                let r = api.get("/healthz").await;
                latencies.push(started.elapsed());
                assert_eq!(r.status, 200);
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            latencies
        })
    };
    let answers = load.await;
    done.store(true, std::sync::atomic::Ordering::Relaxed);
    let mut latencies = probe.await.unwrap();
    latencies.sort();
    (latencies, answers)
}

fn p99(sorted: &[Duration]) -> Duration {
    assert!(!sorted.is_empty());
    sorted[(sorted.len() * 99).div_ceil(100) - 1]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn costly_schemas_cost_their_requests_never_healthz() {
    let ds = Downstream::start().await;
    let backtracking = json!({
        "type": "object",
        "properties": {"v": {"type": "string", "pattern": "^(?=\\w)(\\w+\\s?)+$"}}
    });
    // An anyOf that branches in two at each of 28 levels, and that no
    // value satisfies: 2^28 paths for one small payload.
    let mut defs = serde_json::Map::new();
    for i in 0..28 {
        defs.insert(
            format!("d{i}"),
            json!({"anyOf": [{"$ref": format!("#/$defs/d{}", i + 1)}, {"$ref": format!("#/$defs/d{}", i + 1)}]}),
        );
    }
    defs.insert("d28".into(), json!({"type": "string"}));
    let branching = json!({
        "type": "object",
        "properties": {"v": {"$ref": "#/$defs/d0"}},
        "$defs": defs
    });
    let cfg = Config::new()
        .with_type(single("pattern", &ds).schema(backtracking))
        .with_type(single("branching", &ds).schema(branching))
        .with_type(single("plain", &ds));
    let srv = Server::start(&cfg).await;

    // 80 backtracking submissions, 16 at a time.
    let value = format!("{}!", "a".repeat(300));
    let api = Api::new(&srv.api().base());
    let load = async {
        let mut answers = Vec::new();
        for _ in 0..5 {
            let mut wave = tokio::task::JoinSet::new();
            for _ in 0..16 {
                let api = Api::new(&api.base());
                let body = serde_json::to_vec(&json!({"v": value})).unwrap();
                wave.spawn(async move { api.post_bytes("/v1/entities/pattern", body).await });
            }
            while let Some(r) = wave.join_next().await {
                answers.push(r.unwrap());
            }
        }
        answers
    };
    let (latencies, answers) = healthz_latencies_during(&srv, load).await;
    for r in &answers {
        let p = assert_problem_in(r, &[422, 503]);
        if r.status == 422 {
            assert_eq!(p["type"], "urn:ripen:problem:validation-too-costly", "{r}");
        } else {
            assert_eq!(p["type"], "urn:ripen:problem:overloaded", "{r}");
        }
    }
    assert!(
        answers.iter().filter(|r| r.status == 422).count() >= 16,
        "most submissions are validated and refused, not shed"
    );
    let p = p99(&latencies);
    eprintln!(
        "/healthz during 80 backtracking submissions: {} probes, median {:?}, p99 {p:?}",
        latencies.len(),
        latencies[latencies.len() / 2]
    );
    assert!(
        p < Duration::from_millis(20),
        "/healthz p99 {p:?} over {} probes while patterns ran",
        latencies.len()
    );
    // A matching value of the same type is accepted.
    let r = srv
        .post("/v1/entities/pattern", &json!({"v": "hello world"}))
        .await;
    assert_eq!(r.status, 202, "{r}");

    // The branching schema costs the one request: refused after the
    // validation timeout, while /healthz stays fast; the next one of the
    // same version is refused at once; other types are served.
    let one = async {
        let started = Instant::now();
        let r = api.post("/v1/entities/branching", &json!({"v": 1})).await;
        let took = started.elapsed();
        assert!(took < Duration::from_secs(5), "{took:?}");
        vec![r]
    };
    let (latencies, answers) = healthz_latencies_during(&srv, one).await;
    let p = assert_problem(&answers[0], 422);
    assert_eq!(p["type"], "urn:ripen:problem:validation-too-costly");
    let slowest = latencies.last().copied().unwrap_or_default();
    assert!(
        slowest < Duration::from_millis(100),
        "/healthz took {slowest:?} while the branching schema ran"
    );
    let started = Instant::now();
    let again = srv.post("/v1/entities/branching", &json!({"v": 2})).await;
    assert_problem(&again, 422);
    assert!(started.elapsed() < Duration::from_millis(500));
    let r = srv.post("/v1/entities/plain", &json!({"n": 1})).await;
    assert_eq!(r.status, 202, "{r}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_json_limit_names_itself() {
    let ds = Downstream::start().await;
    let cfg = Config::new()
        .with_type(single("plain", &ds))
        .with_type(single("typed", &ds).schema(json!({"type": "object"})))
        .extra(&limits(
            "json_depth_max = 8\njson_object_keys_max = 5\njson_keys_total_max = 12\njson_string_bytes_max = 16\njson_array_items_max = 4",
        ));
    let srv = Server::start(&cfg).await;
    let keys = |n: usize| {
        let members: Vec<String> = (0..n).map(|i| format!("\"k{i}\":{i}")).collect();
        format!("{{{}}}", members.join(","))
    };
    let cases: Vec<(String, &str, &str)> = vec![
        (
            format!("{{\"a\":{}{}}}", "[".repeat(8), "]".repeat(8)),
            "json-too-deep",
            "json_depth_max",
        ),
        (keys(6), "json-limit", "json_object_keys_max"),
        (
            format!("{{\"a\":{},\"b\":{},\"c\":{}}}", keys(4), keys(4), keys(4)),
            "json-limit",
            "json_keys_total_max",
        ),
        (
            json!({"s": "x".repeat(17)}).to_string(),
            "json-limit",
            "json_string_bytes_max",
        ),
        (
            json!({"x".repeat(17): 1}).to_string(),
            "json-limit",
            "json_string_bytes_max",
        ),
        (
            json!({"list": [1, 2, 3, 4, 5]}).to_string(),
            "json-limit",
            "json_array_items_max",
        ),
    ];
    for (body, kind, key) in &cases {
        for t in ["plain", "typed"] {
            let r = srv
                .post_bytes(&format!("/v1/entities/{t}"), body.clone().into_bytes())
                .await;
            let p = assert_problem(&r, 400);
            assert_eq!(
                p["type"],
                format!("urn:ripen:problem:{kind}"),
                "{body}: {r}"
            );
            assert_eq!(p["limit"], *key, "{body}: {r}");
        }
    }
    // At each limit exactly, a body is accepted.
    for body in [
        format!("{{\"a\":{}{}}}", "[".repeat(7), "]".repeat(7)),
        keys(5),
        json!({"s": "x".repeat(16), "list": [1, 2, 3, 4]}).to_string(),
    ] {
        let r = srv
            .post_bytes("/v1/entities/typed", body.into_bytes())
            .await;
        assert_eq!(r.status, 202, "{r}");
    }
    // The body size is its own limit: 413.
    let big = json!({"s": "x".repeat(2 * 1024 * 1024)}).to_string();
    // Sent raw: the answer comes before the body is read, and the client
    // may still be writing when the server closes.
    let r = srv
        .raw_request("POST", "/v1/entities/plain", &[], big.into_bytes())
        .await
        .expect("an answer to an oversized body");
    let p = assert_problem(&r, 413);
    assert_eq!(p["type"], "urn:ripen:problem:payload-too-large");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_limit_out_of_range_names_its_key() {
    let (out, _dir) = serve_bad_config(
        "[storage]\nurl = \"sqlite://r.db\"\n[limits]\nconnections_max = 0\n\n[types.t]\n[[types.t.steps]]\nname = \"a\"\nhttp = \"http://127.0.0.1:9/a\"\n",
        &[],
    )
    .await;
    assert!(!out.success());
    assert!(out.stderr.contains("limits.connections_max"), "{out}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_past_streams_max_get_503_until_one_ends() {
    let ds = Downstream::start().await;
    let cfg = Config::new()
        .with_type(single("plain", &ds))
        .extra(&limits("streams_max = 1"));
    let srv = Server::start(&cfg).await;
    let open = |addr: String| async move {
        let mut c = TcpStream::connect(&addr).await.unwrap();
        c.write_all(b"GET /v1/events HTTP/1.1\r\nHost: x\r\nAccept: text/event-stream\r\n\r\n")
            .await
            .unwrap();
        let mut buf = [0u8; 4096];
        let n = c.read(&mut buf).await.unwrap();
        (c, String::from_utf8_lossy(&buf[..n]).to_string())
    };
    let (first, head) = open(srv.addr()).await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    let (_, head) = open(srv.addr()).await;
    assert!(head.starts_with("HTTP/1.1 503"), "{head}");
    assert!(
        head.to_ascii_lowercase().contains("retry-after: 1"),
        "{head}"
    );
    assert!(head.contains("streams_max"), "{head}");
    drop(first);
    // The server notices the closed stream at its next write or read; a
    // new stream is served as soon as it has.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (_c, head) = open(srv.addr()).await;
        if head.starts_with("HTTP/1.1 200") {
            break;
        }
        assert!(Instant::now() < deadline, "still refused: {head}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
