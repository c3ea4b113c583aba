//! Live streams through the real binary: `GET /v1/events` (all status
//! changes, or one type's), its resumption with `Last-Event-ID` across a
//! restart, a slow reader that is cut off, a thousand subscribers at once,
//! and `/data?wait=`.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use common::*;
use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

/// One server-sent event.
#[derive(Debug, Clone)]
struct SseEvent {
    id: Option<String>,
    event: String,
    data: Value,
}

/// A stream read over a plain HTTP/1.0 connection, so that its body is the
/// bytes of the stream itself.
struct Sse {
    reader: BufReader<TcpStream>,
}

impl Sse {
    async fn open(addr: &str, path: &str, last_event_id: Option<&str>) -> Sse {
        let stream = TcpStream::connect(addr).await.expect("connect");
        Sse::open_on(stream, addr, path, last_event_id).await
    }

    async fn open_on(
        mut stream: TcpStream,
        addr: &str,
        path: &str,
        last_event_id: Option<&str>,
    ) -> Sse {
        let resume = last_event_id
            .map(|id| format!("Last-Event-ID: {id}\r\n"))
            .unwrap_or_default();
        let head = format!(
            "GET {path} HTTP/1.0\r\nHost: {addr}\r\nAccept: text/event-stream\r\n{resume}\r\n"
        );
        stream.write_all(head.as_bytes()).await.expect("send");
        let mut reader = BufReader::new(stream);
        let mut status = String::new();
        reader.read_line(&mut status).await.expect("status line");
        assert!(status.contains(" 200 "), "GET {path}: {status}");
        loop {
            let mut line = String::new();
            reader.read_line(&mut line).await.expect("header");
            if line == "\r\n" || line.is_empty() {
                break;
            }
        }
        Sse { reader }
    }

    /// The next event, or `None` when the stream ended or `timeout` passed.
    async fn next(&mut self, timeout: Duration) -> Option<SseEvent> {
        let deadline = tokio::time::Instant::now() + timeout;
        let (mut id, mut event, mut data) = (None, String::from("message"), String::new());
        loop {
            let mut line = String::new();
            let n = tokio::time::timeout_at(deadline, self.reader.read_line(&mut line))
                .await
                .ok()?
                .ok()?;
            if n == 0 {
                return None;
            }
            let line = line.trim_end_matches(['\r', '\n']);
            if line.is_empty() {
                if data.is_empty() {
                    continue;
                }
                let data = serde_json::from_str(&data).unwrap_or(Value::String(data));
                return Some(SseEvent { id, event, data });
            }
            if line.starts_with(':') {
                continue;
            }
            let (field, value) = line.split_once(':').unwrap_or((line, ""));
            let value = value.strip_prefix(' ').unwrap_or(value);
            match field {
                "id" => id = Some(value.to_owned()),
                "event" => event = value.to_owned(),
                "data" => data.push_str(value),
                _ => {}
            }
        }
    }

    /// Reads until `n` events came, or fails.
    async fn take(&mut self, n: usize, timeout: Duration) -> Vec<SseEvent> {
        let deadline = Instant::now() + timeout;
        let mut got = Vec::new();
        while got.len() < n {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.next(left).await {
                Some(e) => got.push(e),
                None => panic!("got {} of {n} events: {got:#?}", got.len()),
            }
        }
        got
    }
}

fn entity_of(e: &SseEvent) -> String {
    e.data["data"]["id"].as_str().unwrap_or("").to_owned()
}

fn pos(e: &SseEvent) -> u64 {
    e.id.as_deref().and_then(|i| i.parse().ok()).unwrap_or(0)
}

fn two_types(ds: &Downstream) -> Config {
    Config::new()
        .with_type(single("merchant", ds))
        .with_type(single("store", ds))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_status_change_streams_live_and_by_type() {
    let ds = Downstream::start().await;
    let server = Server::start(&two_types(&ds)).await;
    let mut all = Sse::open(&server.addr(), "/v1/events", None).await;
    let mut stores = Sse::open(&server.addr(), "/v1/events?type=store", None).await;
    let mut ready = Sse::open(&server.addr(), "/v1/events?status=ready", None).await;
    let mut merchants = BTreeSet::new();
    for i in 0..3 {
        merchants.insert(server.submit_ok("merchant", &json!({"n": i})).await);
    }
    let store = server.submit_ok("store", &json!({})).await;
    let got = all.take(8, Duration::from_secs(20)).await;
    assert!(
        got.windows(2).all(|w| pos(&w[0]) < pos(&w[1])),
        "ids grow: {got:#?}"
    );
    let mut per_entity: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for e in &got {
        assert_eq!(e.data["type"], e.event, "the event name is the data's type");
        assert!(e.data["timestamp"]
            .as_str()
            .is_some_and(|t| t.ends_with('Z')));
        assert_eq!(e.data["data"]["degraded"], false);
        per_entity
            .entry(entity_of(e))
            .or_default()
            .push(e.event.clone());
    }
    for kinds in per_entity.values() {
        assert_eq!(kinds, &vec!["entity.created", "entity.ready"]);
    }
    assert_eq!(per_entity.len(), 4);
    let typed = stores.take(2, Duration::from_secs(10)).await;
    assert!(typed
        .iter()
        .all(|e| entity_of(e) == store && e.data["data"]["type"] == "store"));
    let readies = ready.take(4, Duration::from_secs(10)).await;
    assert!(readies.iter().all(|e| e.event == "entity.ready"));
    // Nothing else is on the typed stream.
    assert!(stores.next(Duration::from_millis(300)).await.is_none());
    // Bad filters are refused before the stream starts.
    assert_problem(&server.get("/v1/events?type=nope").await, 404);
    assert_problem(&server.get("/v1/events?status=odd").await, 400);
    assert_problem(&server.get("/v1/events?extra=1").await, 400);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_resumes_from_last_event_id_across_a_restart() {
    let ds = Downstream::start().await;
    let mut server = Server::start(&two_types(&ds)).await;
    let mut live = Sse::open(&server.addr(), "/v1/events", None).await;
    for i in 0..3 {
        server.submit_ok("merchant", &json!({"n": i})).await;
    }
    let seen = live.take(6, Duration::from_secs(20)).await;
    let last = seen.last().and_then(|e| e.id.clone()).expect("an id");
    drop(live);
    // Missed while away: more changes, and a crash.
    let mut missed = BTreeSet::new();
    for i in 0..4 {
        missed.insert(server.submit_ok("merchant", &json!({"m": i})).await);
    }
    for id in &missed {
        server.wait_terminal(id, Duration::from_secs(20)).await;
    }
    server.kill();
    server.restart().await;
    let mut resumed = Sse::open(&server.addr(), "/v1/events", Some(&last)).await;
    let got = resumed.take(8, Duration::from_secs(20)).await;
    let entities: BTreeSet<String> = got.iter().map(entity_of).collect();
    assert_eq!(entities, missed, "exactly what came after {last}");
    assert!(got.iter().all(|e| pos(e) > last.parse::<u64>().unwrap()));
    assert!(got.windows(2).all(|w| pos(&w[0]) < pos(&w[1])));
    // And it goes on live after the catch-up.
    let next = server.submit_ok("merchant", &json!({})).await;
    let live = resumed.take(2, Duration::from_secs(20)).await;
    assert!(live.iter().all(|e| entity_of(e) == next), "{live:#?}");
    let r = server
        .request(
            hyper::Method::GET,
            "/v1/events",
            &[
                ("accept", "text/event-stream"),
                ("last-event-id", "not-a-number"),
            ],
            None,
        )
        .await;
    assert_problem(&r, 400);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reader_that_falls_behind_is_told_and_cut_off() {
    let ds = Downstream::start().await;
    // Intake only: every entity is one `created` notification.
    let cfg = Config::new()
        .with_type(single("merchant", &ds))
        .execute(false)
        .notify("stream_buffer = 256");
    let server = Server::start(&cfg).await;
    // A reader that does not read, behind a small receive window.
    let socket = tokio::net::TcpSocket::new_v4().expect("socket");
    socket.set_recv_buffer_size(2048).expect("recv buffer");
    let stream = socket
        .connect(server.addr().parse().expect("addr"))
        .await
        .expect("connect");
    let mut slow = Sse::open_on(stream, &server.addr(), "/v1/events", None).await;
    // More than the kernel's buffers of one connection hold (about 1.5 MB
    // on loopback) plus the stream buffer.
    const N: usize = 10_000;
    const CLIENTS: usize = 8;
    let submitting: Vec<_> = (0..CLIENTS)
        .map(|c| {
            let api = server.api().clone();
            tokio::spawn(async move {
                for i in (c..N).step_by(CLIENTS) {
                    api.submit_ok("merchant", &json!({"n": i})).await;
                }
            })
        })
        .collect();
    for s in submitting {
        s.await.expect("submit");
    }
    // The slow one now reads what its socket held, then the notice.
    let mut lagged = None;
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut read = 0;
    while Instant::now() < deadline {
        match slow.next(Duration::from_secs(5)).await {
            Some(e) if e.event == "lagged" => {
                lagged = Some(e);
                break;
            }
            Some(_) => read += 1,
            None => break,
        }
    }
    let lagged = lagged.unwrap_or_else(|| panic!("no lagged event after {read} events"));
    assert!(read < N, "it fell behind");
    assert!(
        lagged.data["last_event_id"].as_u64().is_some(),
        "{lagged:?}"
    );
    assert!(
        slow.next(Duration::from_secs(5)).await.is_none(),
        "then the stream ends"
    );
}

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_subscribers_each_get_every_change() {
    let ds = Downstream::start().await;
    let server = Server::start(&two_types(&ds)).await;
    let pid = server.pid().expect("pid");
    let before = rss_kib(pid);
    const SUBSCRIBERS: usize = 1_000;
    const ENTITIES: usize = 20;
    let mut readers = Vec::with_capacity(SUBSCRIBERS);
    for _ in 0..SUBSCRIBERS {
        readers.push(Sse::open(&server.addr(), "/v1/events", None).await);
    }
    let opened = rss_kib(pid);
    let tasks: Vec<_> = readers
        .into_iter()
        .map(|mut r| {
            tokio::spawn(async move { r.take(2 * ENTITIES, Duration::from_secs(60)).await.len() })
        })
        .collect();
    for i in 0..ENTITIES {
        server.submit_ok("merchant", &json!({"n": i})).await;
    }
    let mut total = 0;
    for t in tasks {
        total += t.await.expect("reader");
    }
    let after = rss_kib(pid);
    println!(
        "server RSS: {} MiB before, {} MiB with {SUBSCRIBERS} streams open, {} MiB after {} events each",
        before / 1024,
        opened / 1024,
        after / 1024,
        2 * ENTITIES
    );
    assert_eq!(total, SUBSCRIBERS * 2 * ENTITIES);
    // A stream costs a connection and a cursor, not a copy of each event.
    assert!(
        after.saturating_sub(before) < 200 * 1024,
        "{SUBSCRIBERS} streams grew the server by {} MiB",
        after.saturating_sub(before) / 1024
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn data_can_wait_for_the_entity_to_settle() {
    let ds = Downstream::start().await;
    ds.set(
        &step_path("merchant", "only"),
        Behavior::sleep(Duration::from_millis(800), json!({"ok": true})),
    );
    let server = Server::start(&Config::new().with_type(single("merchant", &ds))).await;
    let id = server.submit_ok("merchant", &json!({})).await;
    let started = Instant::now();
    let r = server
        .get(&format!("/v1/entities/{id}/data?wait=10s"))
        .await;
    assert_eq!(r.status, 200, "{r}");
    assert_eq!(r.json()["outputs"]["only"]["ok"], true);
    assert!(
        started.elapsed() < Duration::from_secs(8),
        "answered once ready"
    );
    // Already settled: at once.
    let r = server
        .get(&format!("/v1/entities/{id}/data?wait=30s"))
        .await;
    assert_eq!(r.status, 200);
    // Still pending when the wait ends: the usual 409.
    ds.set(
        &step_path("merchant", "only"),
        Behavior::sleep(Duration::from_secs(3), json!({})),
    );
    let slow = server.submit_ok("merchant", &json!({})).await;
    let started = Instant::now();
    let r = server
        .get(&format!("/v1/entities/{slow}/data?wait=300ms"))
        .await;
    let p = assert_problem(&r, 409);
    assert_eq!(p["entity_status"], "pending");
    assert!(started.elapsed() >= Duration::from_millis(300));
    for bad in ["wait=forever", "wait=31s", "other=1"] {
        assert_problem(
            &server.get(&format!("/v1/entities/{id}/data?{bad}")).await,
            400,
        );
    }
    let unknown = "01900000-0000-7000-8000-000000000000";
    assert_problem(
        &server
            .get(&format!("/v1/entities/{unknown}/data?wait=1s"))
            .await,
        404,
    );
}
