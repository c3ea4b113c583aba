//! The end-to-end test harness: the real `ripen` binary in a temporary
//! directory, a programmable downstream HTTP service that records every call,
//! and a small HTTP client.
//!
//! Every test binary includes this module with `mod common;`, and each uses a
//! different subset of it.
#![allow(dead_code)]

use std::collections::HashMap;
use std::convert::Infallible;
use std::fmt;
use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::SocketAddr;
use std::ops::Deref;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::header::{HeaderMap, HeaderName, HeaderValue};
use hyper::service::service_fn;
use hyper::{Method, Request, Response};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde_json::{json, Value};
use tempfile::TempDir;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// The binary under test.
pub const RIPEN: &str = env!("CARGO_BIN_EXE_ripen");

/// How long a server may take to print its `listening on` line.
const STARTUP_TIMEOUT: Duration = Duration::from_secs(30);

/// How long one HTTP exchange with the server may take in a test.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(15);

pub const TERMINAL_STATUSES: [&str; 3] = ["ready", "failed", "cancelled"];
pub const STEP_STATUSES: [&str; 7] = [
    "blocked",
    "queued",
    "running",
    "retrying",
    "succeeded",
    "failed",
    "skipped",
];
pub const TERMINAL_STEP_STATUSES: [&str; 3] = ["succeeded", "failed", "skipped"];

// ---------------------------------------------------------------------------
// Configuration
// ---------------------------------------------------------------------------

/// One `[[types.T.steps]]` entry with an `http` executor.
#[derive(Clone, Debug)]
pub struct Step {
    pub name: String,
    pub url: String,
    pub needs: Vec<String>,
    pub critical: bool,
    pub timeout: String,
    pub max_attempts: u32,
    pub initial_backoff: String,
    pub max_backoff: String,
}

impl Step {
    /// A critical step with small timeouts and backoffs, so tests stay fast.
    pub fn http(name: &str, url: impl Into<String>) -> Step {
        Step {
            name: name.to_owned(),
            url: url.into(),
            needs: Vec::new(),
            critical: true,
            timeout: "5s".to_owned(),
            max_attempts: 3,
            initial_backoff: "10ms".to_owned(),
            max_backoff: "50ms".to_owned(),
        }
    }

    pub fn needs(mut self, needs: &[&str]) -> Step {
        self.needs = needs.iter().map(|s| s.to_string()).collect();
        self
    }

    pub fn non_critical(mut self) -> Step {
        self.critical = false;
        self
    }

    pub fn timeout(mut self, timeout: &str) -> Step {
        self.timeout = timeout.to_owned();
        self
    }

    pub fn attempts(mut self, max_attempts: u32) -> Step {
        self.max_attempts = max_attempts;
        self
    }

    pub fn backoff(mut self, initial: &str, max: &str) -> Step {
        self.initial_backoff = initial.to_owned();
        self.max_backoff = max.to_owned();
        self
    }
}

/// One `[types.NAME]` table.
#[derive(Clone, Debug)]
pub struct TypeDef {
    pub name: String,
    pub schema: Option<Value>,
    pub steps: Vec<Step>,
}

impl TypeDef {
    pub fn new(name: &str, steps: Vec<Step>) -> TypeDef {
        TypeDef {
            name: name.to_owned(),
            schema: None,
            steps,
        }
    }

    pub fn schema(mut self, schema: Value) -> TypeDef {
        self.schema = Some(schema);
        self
    }

    /// Changes one step, which must exist.
    pub fn map_step(mut self, name: &str, f: impl FnOnce(Step) -> Step) -> TypeDef {
        let i = self
            .steps
            .iter()
            .position(|s| s.name == name)
            .unwrap_or_else(|| panic!("no step {name} in type {}", self.name));
        let step = self.steps.remove(i);
        self.steps.insert(i, f(step));
        self
    }

    /// Changes every step.
    pub fn map_steps(mut self, f: impl Fn(Step) -> Step) -> TypeDef {
        self.steps = self.steps.into_iter().map(f).collect();
        self
    }
}

/// The path the downstream serves for one step of one type.
pub fn step_path(type_name: &str, step: &str) -> String {
    format!("/{type_name}/{step}")
}

/// The five-step pipeline of the performance targets: `a`; `b` and `c` after
/// `a`; `d` after `b` and `c`; `e`, non-critical, after `a`. Each step calls
/// `/{type}/{step}` on the downstream.
pub fn w5(type_name: &str, ds: &Downstream) -> TypeDef {
    let url = |step: &str| ds.url(&step_path(type_name, step));
    TypeDef::new(
        type_name,
        vec![
            Step::http("a", url("a")),
            Step::http("b", url("b")).needs(&["a"]),
            Step::http("c", url("c")).needs(&["a"]),
            Step::http("d", url("d")).needs(&["b", "c"]),
            Step::http("e", url("e")).needs(&["a"]).non_critical(),
        ],
    )
}

/// A one-step pipeline calling `/{type}/only`.
pub fn single(type_name: &str, ds: &Downstream) -> TypeDef {
    TypeDef::new(
        type_name,
        vec![Step::http("only", ds.url(&step_path(type_name, "only")))],
    )
}

/// A whole `ripen.toml`, rendered into a temporary directory by the harness.
#[derive(Clone, Debug)]
pub struct Config {
    pub types: Vec<TypeDef>,
    pub body_limit_bytes: Option<u64>,
    pub poll_interval: Option<String>,
    pub lease_grace: Option<String>,
    /// `[engine] execute`; `None` leaves the server's default (true).
    pub execute: Option<bool>,
}

impl Default for Config {
    fn default() -> Config {
        Config::new()
    }
}

/// The storage of a test server: a SQLite file in its directory, or, with
/// `RIPEN_TEST_STORAGE=postgres`, a fresh database on this test binary's
/// private PostgreSQL cluster.
pub fn storage_url(dir: &Path) -> String {
    match std::env::var("RIPEN_TEST_STORAGE").as_deref() {
        Ok("postgres") => ripen_testkit::PgCluster::shared().create_database(),
        Ok("sqlite") | Err(_) => format!("sqlite://{}", dir.join("ripen.db").display()),
        Ok(other) => panic!("RIPEN_TEST_STORAGE={other:?}: use sqlite or postgres"),
    }
}

impl Config {
    pub fn new() -> Config {
        Config {
            types: Vec::new(),
            body_limit_bytes: None,
            poll_interval: Some("100ms".to_owned()),
            lease_grace: Some("1s".to_owned()),
            execute: None,
        }
    }

    pub fn with_type(mut self, t: TypeDef) -> Config {
        self.types.push(t);
        self
    }

    pub fn body_limit(mut self, bytes: u64) -> Config {
        self.body_limit_bytes = Some(bytes);
        self
    }

    pub fn lease_grace(mut self, grace: &str) -> Config {
        self.lease_grace = Some(grace.to_owned());
        self
    }

    pub fn poll_interval(mut self, interval: &str) -> Config {
        self.poll_interval = Some(interval.to_owned());
        self
    }

    /// `[engine] execute`: `false` makes an intake-only node.
    pub fn execute(mut self, execute: bool) -> Config {
        self.execute = Some(execute);
        self
    }

    /// Writes the schema files into `dir` and returns the TOML text.
    pub fn render(&self, dir: &Path) -> Result<String> {
        self.render_on(dir, &storage_url(dir))
    }

    /// Like [`Config::render`], on the given storage URL (for instance a
    /// PostgreSQL database shared by several servers).
    pub fn render_on(&self, dir: &Path, storage_url: &str) -> Result<String> {
        let mut out = String::new();
        out.push_str("[server]\nlisten = \"127.0.0.1:0\"\n");
        if let Some(limit) = self.body_limit_bytes {
            out.push_str(&format!("body_limit_bytes = {limit}\n"));
        }
        out.push_str(&format!("\n[storage]\nurl = {}\n", toml_str(storage_url)));
        if self.poll_interval.is_some() || self.lease_grace.is_some() || self.execute.is_some() {
            out.push_str("\n[engine]\n");
            if let Some(execute) = self.execute {
                out.push_str(&format!("execute = {execute}\n"));
            }
            if let Some(p) = &self.poll_interval {
                out.push_str(&format!("poll_interval = {}\n", toml_str(p)));
            }
            if let Some(g) = &self.lease_grace {
                out.push_str(&format!("lease_grace = {}\n", toml_str(g)));
            }
        }
        for t in &self.types {
            out.push_str(&format!("\n[types.{}]\n", t.name));
            if let Some(schema) = &t.schema {
                std::fs::create_dir_all(dir.join("schemas"))?;
                let rel = format!("schemas/{}.json", t.name);
                std::fs::write(dir.join(&rel), serde_json::to_vec_pretty(schema)?)?;
                out.push_str(&format!("schema = {}\n", toml_str(&rel)));
            }
            for s in &t.steps {
                out.push_str(&format!("\n[[types.{}.steps]]\n", t.name));
                out.push_str(&format!("name = {}\n", toml_str(&s.name)));
                out.push_str(&format!("http = {}\n", toml_str(&s.url)));
                let needs: Vec<String> = s.needs.iter().map(|n| toml_str(n)).collect();
                out.push_str(&format!("needs = [{}]\n", needs.join(", ")));
                out.push_str(&format!("critical = {}\n", s.critical));
                out.push_str(&format!("timeout = {}\n", toml_str(&s.timeout)));
                out.push_str(&format!(
                    "retry = {{ max_attempts = {}, initial_backoff = {}, max_backoff = {} }}\n",
                    s.max_attempts,
                    toml_str(&s.initial_backoff),
                    toml_str(&s.max_backoff)
                ));
            }
        }
        Ok(out)
    }
}

/// A TOML basic string; JSON string escapes are valid TOML escapes.
fn toml_str(s: &str) -> String {
    serde_json::to_string(s).expect("a string serializes")
}

// ---------------------------------------------------------------------------
// HTTP client
// ---------------------------------------------------------------------------

/// One answer, fully read.
#[derive(Clone)]
pub struct Resp {
    pub status: u16,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Resp {
    pub fn header(&self, name: &str) -> Option<String> {
        self.headers
            .get(name)
            .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// The body as JSON; panics with the whole answer if it is not JSON.
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("answer is not JSON ({e}): {self}"))
    }
}

impl fmt::Display for Resp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut text = self.text();
        if text.len() > 2000 {
            let mut cut = 2000;
            while !text.is_char_boundary(cut) {
                cut -= 1;
            }
            text.truncate(cut);
            text.push('…');
        }
        write!(
            f,
            "status {}, headers {:?}, body {}",
            self.status, self.headers, text
        )
    }
}

impl fmt::Debug for Resp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// A client of one server; the base URL is shared, so that a restart on
/// another port is seen by every clone.
#[derive(Clone)]
pub struct Api {
    base: Arc<RwLock<String>>,
    client: Client<HttpConnector, Full<Bytes>>,
}

impl Api {
    pub fn new(base: &str) -> Api {
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        connector.set_connect_timeout(Some(Duration::from_secs(5)));
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(10))
            .pool_max_idle_per_host(64)
            .build(connector);
        Api {
            base: Arc::new(RwLock::new(base.trim_end_matches('/').to_owned())),
            client,
        }
    }

    /// The root URL, such as `http://127.0.0.1:4321`.
    pub fn base(&self) -> String {
        self.base.read().unwrap().clone()
    }

    fn set_base(&self, base: &str) {
        *self.base.write().unwrap() = base.trim_end_matches('/').to_owned();
    }

    /// `host:port` of the server.
    pub fn addr(&self) -> String {
        let base = self.base();
        base.trim_start_matches("http://").to_owned()
    }

    pub async fn try_request(
        &self,
        method: Method,
        path: &str,
        headers: &[(&str, &str)],
        body: Option<Vec<u8>>,
    ) -> Result<Resp> {
        let uri = format!("{}{}", self.base(), path);
        let mut req = Request::builder().method(method.clone()).uri(&uri);
        let has_content_type = headers
            .iter()
            .any(|(k, _)| k.eq_ignore_ascii_case("content-type"));
        if body.is_some() && !has_content_type {
            req = req.header("content-type", "application/json");
        }
        for (name, value) in headers {
            req = req.header(
                HeaderName::from_bytes(name.as_bytes())?,
                HeaderValue::from_str(value)?,
            );
        }
        let req = req.body(Full::new(Bytes::from(body.unwrap_or_default())))?;
        let exchange = async {
            let resp = self
                .client
                .request(req)
                .await
                .with_context(|| format!("send {method} {uri}"))?;
            let (parts, body) = resp.into_parts();
            let body = body
                .collect()
                .await
                .with_context(|| format!("read the answer to {method} {uri}"))?
                .to_bytes();
            Ok::<Resp, anyhow::Error>(Resp {
                status: parts.status.as_u16(),
                headers: parts.headers,
                body,
            })
        };
        tokio::time::timeout(REQUEST_TIMEOUT, exchange)
            .await
            .map_err(|_| anyhow!("{method} {uri}: no answer within {REQUEST_TIMEOUT:?}"))?
    }

    pub async fn request(
        &self,
        method: Method,
        path: &str,
        headers: &[(&str, &str)],
        body: Option<Vec<u8>>,
    ) -> Resp {
        match self.try_request(method.clone(), path, headers, body).await {
            Ok(r) => r,
            Err(e) => panic!("{method} {path} failed: {e:#}"),
        }
    }

    pub async fn get(&self, path: &str) -> Resp {
        self.request(Method::GET, path, &[("accept", "application/json")], None)
            .await
    }

    pub async fn post(&self, path: &str, body: &Value) -> Resp {
        self.request(
            Method::POST,
            path,
            &[],
            Some(serde_json::to_vec(body).unwrap()),
        )
        .await
    }

    /// `POST` with an empty body.
    pub async fn post_empty(&self, path: &str) -> Resp {
        self.request(Method::POST, path, &[], None).await
    }

    pub async fn post_bytes(&self, path: &str, body: Vec<u8>) -> Resp {
        self.request(Method::POST, path, &[], Some(body)).await
    }

    pub async fn try_submit(
        &self,
        type_name: &str,
        payload: &Value,
        key: Option<&str>,
    ) -> Result<Resp> {
        let mut headers = Vec::new();
        if let Some(key) = key {
            headers.push(("idempotency-key", key));
        }
        self.try_request(
            Method::POST,
            &format!("/v1/entities/{type_name}"),
            &headers,
            Some(serde_json::to_vec(payload).unwrap()),
        )
        .await
    }

    /// `POST /v1/entities/{type}`, whatever the answer.
    pub async fn submit(&self, type_name: &str, payload: &Value, key: Option<&str>) -> Resp {
        match self.try_submit(type_name, payload, key).await {
            Ok(r) => r,
            Err(e) => panic!("submit {type_name} failed: {e:#}"),
        }
    }

    /// Submits and asserts a 202; returns the entity id.
    pub async fn submit_ok(&self, type_name: &str, payload: &Value) -> String {
        let r = self.submit(type_name, payload, None).await;
        assert_eq!(r.status, 202, "submit {type_name}: {r}");
        let view = r.json();
        view["id"]
            .as_str()
            .unwrap_or_else(|| panic!("no id in {view}"))
            .to_owned()
    }

    /// `GET /v1/entities/{id}`, asserting 200.
    pub async fn entity(&self, id: &str) -> Value {
        let r = self.get(&format!("/v1/entities/{id}")).await;
        assert_eq!(r.status, 200, "GET entity {id}: {r}");
        r.json()
    }

    /// Polls the entity every 20 ms until `pred` holds.
    pub async fn wait_until(
        &self,
        id: &str,
        timeout: Duration,
        what: &str,
        pred: impl Fn(&Value) -> bool,
    ) -> Value {
        let deadline = Instant::now() + timeout;
        loop {
            let view = self.entity(id).await;
            if pred(&view) {
                return view;
            }
            if Instant::now() > deadline {
                panic!("entity {id} did not become {what} within {timeout:?}; last view: {view:#}");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Waits for `ready`, `failed` or `cancelled`.
    pub async fn wait_terminal(&self, id: &str, timeout: Duration) -> Value {
        self.wait_until(id, timeout, "terminal", is_terminal).await
    }

    /// Waits for a terminal status and for every step to be settled too (a
    /// non-critical step may still run when the entity is already `ready`).
    pub async fn wait_settled(&self, id: &str, timeout: Duration) -> Value {
        self.wait_until(id, timeout, "settled", |v| {
            is_terminal(v)
                && v["steps"].as_array().is_some_and(|steps| {
                    steps.iter().all(|s| {
                        TERMINAL_STEP_STATUSES.contains(&s["status"].as_str().unwrap_or(""))
                    })
                })
        })
        .await
    }

    /// `GET /v1/entities/{id}/events` as a JSON array, asserting 200.
    pub async fn events(&self, id: &str) -> Vec<Value> {
        let r = self.get(&format!("/v1/entities/{id}/events")).await;
        assert_eq!(r.status, 200, "GET events of {id}: {r}");
        match r.json() {
            Value::Array(items) => items,
            other => panic!("events of {id} are not a JSON array: {other:#}"),
        }
    }

    /// Sends one request on a fresh connection, writing the body while it
    /// reads the answer, so that a server that answers before it has read
    /// the whole body (413) is still heard.
    pub async fn raw_request(
        &self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: Vec<u8>,
    ) -> Result<Resp> {
        let addr = self.addr();
        let exchange = async {
            let stream = TcpStream::connect(&addr).await?;
            stream.set_nodelay(true)?;
            let (mut rd, mut wr) = stream.into_split();
            let mut head =
                format!("{method} {path} HTTP/1.1\r\nhost: {addr}\r\nconnection: close\r\n");
            // With `transfer-encoding` the caller has framed the body itself.
            if !headers
                .iter()
                .any(|(k, _)| k.eq_ignore_ascii_case("transfer-encoding"))
            {
                head.push_str(&format!("content-length: {}\r\n", body.len()));
            }
            if !headers
                .iter()
                .any(|(k, _)| k.eq_ignore_ascii_case("content-type"))
            {
                head.push_str("content-type: application/json\r\n");
            }
            for (k, v) in headers {
                head.push_str(&format!("{k}: {v}\r\n"));
            }
            head.push_str("\r\n");
            let writer = tokio::spawn(async move {
                // A server may stop reading and close early; that is fine.
                if wr.write_all(head.as_bytes()).await.is_ok() {
                    let _ = wr.write_all(&body).await;
                    let _ = wr.flush().await;
                }
                wr
            });
            let mut buf = Vec::new();
            let mut chunk = vec![0u8; 64 * 1024];
            loop {
                if let Some(resp) = parse_http_response(&buf, false)? {
                    writer.abort();
                    return Ok(resp);
                }
                match rd.read(&mut chunk).await {
                    Ok(0) => break,
                    Ok(n) => buf.extend_from_slice(&chunk[..n]),
                    Err(e) => {
                        if buf.is_empty() {
                            writer.abort();
                            return Err(anyhow!("read the answer from {addr}: {e}"));
                        }
                        break;
                    }
                }
            }
            writer.abort();
            parse_http_response(&buf, true)?
                .ok_or_else(|| anyhow!("incomplete answer: {:?}", String::from_utf8_lossy(&buf)))
        };
        tokio::time::timeout(REQUEST_TIMEOUT, exchange)
            .await
            .map_err(|_| anyhow!("{method} {path}: no answer within {REQUEST_TIMEOUT:?}"))?
    }
}

/// Parses one HTTP/1.1 response; `None` while incomplete. At `eof` a body
/// without a length runs to the end.
fn parse_http_response(buf: &[u8], eof: bool) -> Result<Option<Resp>> {
    let Some(head_end) = buf.windows(4).position(|w| w == b"\r\n\r\n") else {
        return Ok(None);
    };
    let head = std::str::from_utf8(&buf[..head_end]).context("response head is not UTF-8")?;
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or("");
    let status: u16 = status_line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| anyhow!("bad status line {status_line:?}"))?;
    let mut headers = HeaderMap::new();
    for line in lines {
        if let Some((k, v)) = line.split_once(':') {
            headers.append(
                HeaderName::from_bytes(k.trim().as_bytes())?,
                HeaderValue::from_str(v.trim())?,
            );
        }
    }
    let rest = &buf[head_end + 4..];
    let chunked = headers
        .get("transfer-encoding")
        .is_some_and(|v| v.to_str().unwrap_or("").contains("chunked"));
    let body = if chunked {
        let mut body = Vec::new();
        let mut pos = 0;
        loop {
            let Some(line_end) = rest[pos..].windows(2).position(|w| w == b"\r\n") else {
                return Ok(None);
            };
            let size_text = std::str::from_utf8(&rest[pos..pos + line_end])?;
            let size = usize::from_str_radix(size_text.split(';').next().unwrap().trim(), 16)
                .with_context(|| format!("bad chunk size {size_text:?}"))?;
            pos += line_end + 2;
            if size == 0 {
                break;
            }
            if rest.len() < pos + size + 2 {
                return Ok(None);
            }
            body.extend_from_slice(&rest[pos..pos + size]);
            pos += size + 2;
        }
        body
    } else if let Some(len) = headers.get("content-length") {
        let len: usize = len.to_str()?.trim().parse()?;
        if rest.len() < len {
            return Ok(None);
        }
        rest[..len].to_vec()
    } else if status == 204 || status == 304 || (100..200).contains(&status) {
        Vec::new()
    } else if eof {
        rest.to_vec()
    } else {
        return Ok(None);
    };
    Ok(Some(Resp {
        status,
        headers,
        body: Bytes::from(body),
    }))
}

// ---------------------------------------------------------------------------
// Assertions on answers and views
// ---------------------------------------------------------------------------

/// Asserts an RFC 9457 problem with the given status; returns its body.
pub fn assert_problem(r: &Resp, status: u16) -> Value {
    assert_eq!(r.status, status, "expected a {status} problem, got: {r}");
    assert_problem_shape(r)
}

/// Asserts an RFC 9457 problem with one of the given statuses.
pub fn assert_problem_in(r: &Resp, statuses: &[u16]) -> Value {
    assert!(
        statuses.contains(&r.status),
        "expected a problem with status in {statuses:?}, got: {r}"
    );
    assert_problem_shape(r)
}

fn assert_problem_shape(r: &Resp) -> Value {
    let ct = r.header("content-type").unwrap_or_default();
    assert!(
        ct.starts_with("application/problem+json"),
        "content-type of an error must be application/problem+json: {r}"
    );
    let p = r.json();
    for field in ["type", "title", "detail"] {
        assert!(p[field].is_string(), "problem has no string `{field}`: {r}");
    }
    assert_eq!(
        p["status"].as_u64(),
        Some(r.status as u64),
        "problem `status` must equal the HTTP status: {r}"
    );
    p
}

pub fn is_terminal(view: &Value) -> bool {
    TERMINAL_STATUSES.contains(&view["status"].as_str().unwrap_or(""))
}

/// The step named `name` in an entity view.
pub fn step<'a>(view: &'a Value, name: &str) -> &'a Value {
    view["steps"]
        .as_array()
        .and_then(|steps| steps.iter().find(|s| s["name"] == name))
        .unwrap_or_else(|| panic!("no step {name} in view {view:#}"))
}

/// The step name an event is about, wherever the server put it.
pub fn event_step(e: &Value) -> Option<&str> {
    for holder in [e, &e["data"], &e["detail"], &e["details"], &e["payload"]] {
        if let Some(s) = holder["step"].as_str() {
            return Some(s);
        }
    }
    None
}

pub fn event_kind(e: &Value) -> &str {
    e["kind"].as_str().unwrap_or("")
}

/// The new status of a `status_changed` event, wherever the server put it.
pub fn event_to(e: &Value) -> Option<&str> {
    for holder in [e, &e["data"], &e["detail"], &e["details"], &e["payload"]] {
        for field in ["to", "status", "new_status"] {
            if let Some(s) = holder[field].as_str() {
                return Some(s);
            }
        }
    }
    None
}

/// The statuses an entity moved to, in history order.
pub fn status_changes(events: &[Value]) -> Vec<String> {
    events
        .iter()
        .filter(|e| event_kind(e) == "status_changed")
        .map(|e| {
            event_to(e)
                .unwrap_or_else(|| panic!("status_changed without a new status: {e}"))
                .to_owned()
        })
        .collect()
}

/// Asserts that the history's status changes follow the lifecycle:
/// pending -> ready | failed | cancelled, failed -> pending (retry).
pub fn assert_lifecycle(events: &[Value]) {
    let mut current = "pending".to_owned();
    for (i, to) in status_changes(events).into_iter().enumerate() {
        if i == 0 && to == "pending" {
            // A history may record the initial status as a change too.
            continue;
        }
        let allowed = matches!(
            (current.as_str(), to.as_str()),
            ("pending", "ready")
                | ("pending", "failed")
                | ("pending", "cancelled")
                | ("failed", "pending")
        );
        assert!(
            allowed,
            "status moved {current} -> {to}, outside the lifecycle: {events:#?}"
        );
        current = to;
    }
}

/// An IMF-fixdate (RFC 9110), such as `Sun, 06 Nov 1994 08:49:37 GMT`.
pub fn http_date(t: std::time::SystemTime) -> String {
    let secs = t.duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() as i64;
    let days = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400);
    let (h, m, sec) = (rem / 3600, rem % 3600 / 60, rem % 60);
    // Civil date from days since 1970-01-01 (H. Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    let weekday = ["Thu", "Fri", "Sat", "Sun", "Mon", "Tue", "Wed"][days.rem_euclid(7) as usize];
    let month_name = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ][(month - 1) as usize];
    format!("{weekday}, {day:02} {month_name} {year} {h:02}:{m:02}:{sec:02} GMT")
}

/// Percent-encodes a query value.
pub fn encode_query(s: &str) -> String {
    let mut out = String::new();
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

// ---------------------------------------------------------------------------
// The server under test
// ---------------------------------------------------------------------------

/// A running `ripen serve` on a temporary data directory. Killed on drop;
/// when the test is panicking, the tail of its log is printed.
pub struct Server {
    api: Api,
    dir: TempDir,
    config_path: PathBuf,
    log_path: PathBuf,
    child: Option<Child>,
    starts: u32,
}

impl Deref for Server {
    type Target = Api;
    fn deref(&self) -> &Api {
        &self.api
    }
}

impl Server {
    pub async fn start(cfg: &Config) -> Server {
        Server::start_with(|dir| cfg.render(dir)).await
    }

    /// Starts a server on the given storage URL, such as a PostgreSQL
    /// database that other servers of the test share.
    pub async fn start_on(cfg: &Config, storage_url: &str) -> Server {
        Server::start_with(|dir| cfg.render_on(dir, storage_url)).await
    }

    async fn start_with(render: impl FnOnce(&Path) -> Result<String>) -> Server {
        let dir = tempfile::Builder::new()
            .prefix("ripen-e2e-")
            .tempdir()
            .expect("create a temporary directory");
        let config_path = dir.path().join("ripen.toml");
        let toml = render(dir.path()).expect("render the configuration");
        std::fs::write(&config_path, toml).expect("write ripen.toml");
        let log_path = dir.path().join("server.log");
        let mut server = Server {
            api: Api::new("http://127.0.0.1:1"),
            dir,
            config_path,
            log_path,
            child: None,
            starts: 0,
        };
        if let Err(e) = server.spawn().await {
            panic!(
                "start ripen serve: {e:#}\nconfig:\n{}\nlog tail:\n{}",
                std::fs::read_to_string(&server.config_path).unwrap_or_default(),
                server.log_tail(80)
            );
        }
        server
    }

    /// A clonable client whose base URL follows restarts.
    pub fn api(&self) -> &Api {
        &self.api
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Kills the server with SIGKILL and reaps it.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts the server again on the same data directory.
    pub async fn restart(&mut self) {
        self.kill();
        if let Err(e) = self.spawn().await {
            panic!(
                "restart ripen serve: {e:#}\nlog tail:\n{}",
                self.log_tail(80)
            );
        }
    }

    /// `Some(status)` when the process has exited.
    pub fn exited(&mut self) -> Option<ExitStatus> {
        match self.child.as_mut() {
            Some(child) => child.try_wait().ok().flatten(),
            None => None,
        }
    }

    pub fn log_tail(&self, lines: usize) -> String {
        tail_of_file(&self.log_path, lines)
    }

    /// The whole server log (standard error of every start).
    pub fn log(&self) -> String {
        std::fs::read(&self.log_path)
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default()
    }

    /// The process id of the running server, if it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    /// Freezes the server process (SIGSTOP): it keeps its sockets and its
    /// leases but does nothing until [`Server::sigcont`].
    pub fn sigstop(&self) {
        self.signal(libc::SIGSTOP);
    }

    /// Lets a process frozen by [`Server::sigstop`] run again (SIGCONT).
    pub fn sigcont(&self) {
        self.signal(libc::SIGCONT);
    }

    fn signal(&self, signal: libc::c_int) {
        let pid = self.pid().expect("the server is not running");
        let pid = libc::pid_t::try_from(pid).expect("a pid fits pid_t");
        // SAFETY: kill(2) has no memory-safety preconditions. `pid` is our
        // own child, reaped only by `kill` (which drops it) or `exited`.
        let rc = unsafe { libc::kill(pid, signal) };
        assert_eq!(
            rc,
            0,
            "kill({pid}, {signal}): {}",
            std::io::Error::last_os_error()
        );
    }

    async fn spawn(&mut self) -> Result<()> {
        self.starts += 1;
        let mut log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log_path)?;
        writeln!(log, "===== ripen serve, start #{} =====", self.starts)?;
        let mut child = Command::new(RIPEN)
            .arg("serve")
            .arg("--config")
            .arg(&self.config_path)
            .current_dir(self.dir.path())
            .env_remove("RIPEN_SERVER")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::from(log))
            .spawn()
            .context("spawn ripen serve")?;
        let stdout = child.stdout.take().expect("piped stdout");
        let mut stdout_log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("stdout.log"))?;
        let (tx, rx) = tokio::sync::oneshot::channel::<String>();
        std::thread::spawn(move || {
            // Keep draining stdout for the life of the child, so it never
            // blocks on a full pipe.
            let mut tx = Some(tx);
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                let _ = writeln!(stdout_log, "{line}");
                if let Some(pos) = line.find("listening on ") {
                    let url = line[pos + "listening on ".len()..]
                        .split_whitespace()
                        .next()
                        .unwrap_or("")
                        .to_owned();
                    if let Some(tx) = tx.take() {
                        let _ = tx.send(url);
                    }
                }
            }
        });
        self.child = Some(child);
        match tokio::time::timeout(STARTUP_TIMEOUT, rx).await {
            Ok(Ok(url)) => {
                if !url.starts_with("http://") {
                    bail!("the `listening on` line has no http URL: {url:?}");
                }
                self.api.set_base(&url);
                Ok(())
            }
            Ok(Err(_)) => {
                let status = self.child.as_mut().and_then(|c| c.wait().ok());
                self.child = None;
                bail!("ripen serve closed its stdout without `listening on` (exit: {status:?})")
            }
            Err(_) => {
                self.kill();
                bail!("ripen serve printed no `listening on` line within {STARTUP_TIMEOUT:?}")
            }
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.kill();
        if std::thread::panicking() {
            eprintln!(
                "----- ripen serve log tail ({}) -----\n{}\n----- end of log -----",
                self.log_path.display(),
                self.log_tail(60)
            );
        }
    }
}

pub fn tail_of_file(path: &Path, lines: usize) -> String {
    let mut text = String::new();
    if let Ok(mut f) = File::open(path) {
        let mut bytes = Vec::new();
        let _ = f.read_to_end(&mut bytes);
        text = String::from_utf8_lossy(&bytes).into_owned();
    }
    let all: Vec<&str> = text.lines().collect();
    let start = all.len().saturating_sub(lines);
    all[start..].join("\n")
}

// ---------------------------------------------------------------------------
// Running the binary as a command
// ---------------------------------------------------------------------------

#[derive(Debug)]
pub struct CmdOutput {
    /// `None` when it was killed after the timeout.
    pub status: Option<ExitStatus>,
    pub stdout: String,
    pub stderr: String,
}

impl CmdOutput {
    pub fn success(&self) -> bool {
        self.status.is_some_and(|s| s.success())
    }
}

impl fmt::Display for CmdOutput {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "exit: {:?}\n--- stdout ---\n{}\n--- stderr ---\n{}",
            self.status, self.stdout, self.stderr
        )
    }
}

/// Runs `ripen ARGS` in `dir` with a timeout (then kills it), off the async
/// runtime.
pub async fn run_ripen(args: Vec<String>, dir: PathBuf, timeout: Duration) -> CmdOutput {
    run_ripen_with_stdin(args, dir, timeout, None).await
}

/// Like [`run_ripen`], writing `stdin` to the command's standard input.
pub async fn run_ripen_with_stdin(
    args: Vec<String>,
    dir: PathBuf,
    timeout: Duration,
    stdin: Option<Vec<u8>>,
) -> CmdOutput {
    tokio::task::spawn_blocking(move || run_ripen_blocking(&args, &dir, timeout, stdin))
        .await
        .expect("join the command runner")
}

fn run_ripen_blocking(
    args: &[String],
    dir: &Path,
    timeout: Duration,
    stdin: Option<Vec<u8>>,
) -> CmdOutput {
    let mut child = Command::new(RIPEN)
        .args(args)
        .current_dir(dir)
        .env_remove("RIPEN_SERVER")
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn ripen");
    if let Some(input) = stdin {
        let mut pipe = child.stdin.take().unwrap();
        std::thread::spawn(move || {
            let _ = pipe.write_all(&input);
            // Dropping the pipe closes it: the command sees the end of input.
        });
    }
    let mut out = child.stdout.take().unwrap();
    let mut err = child.stderr.take().unwrap();
    let out_reader = std::thread::spawn(move || {
        let mut s = Vec::new();
        let _ = out.read_to_end(&mut s);
        String::from_utf8_lossy(&s).into_owned()
    });
    let err_reader = std::thread::spawn(move || {
        let mut s = Vec::new();
        let _ = err.read_to_end(&mut s);
        String::from_utf8_lossy(&s).into_owned()
    });
    let deadline = Instant::now() + timeout;
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break Some(status),
            Ok(None) if Instant::now() > deadline => {
                let _ = child.kill();
                let _ = child.wait();
                break None;
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(20)),
            Err(_) => break None,
        }
    };
    CmdOutput {
        status,
        stdout: out_reader.join().unwrap_or_default(),
        stderr: err_reader.join().unwrap_or_default(),
    }
}

/// Writes `toml` (with `@DIR@` replaced by a fresh temporary directory) and
/// the extra files there, and runs `ripen serve` on it, expecting it to stop
/// by itself. Returns the output and the directory (kept alive).
pub async fn serve_bad_config(toml: &str, files: &[(&str, &str)]) -> (CmdOutput, TempDir) {
    let dir = tempfile::Builder::new()
        .prefix("ripen-badcfg-")
        .tempdir()
        .unwrap();
    let text = toml.replace("@DIR@", &dir.path().display().to_string());
    std::fs::write(dir.path().join("ripen.toml"), text).unwrap();
    for (name, content) in files {
        let path = dir.path().join(name);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, content).unwrap();
    }
    let args = vec![
        "serve".to_owned(),
        "--config".to_owned(),
        dir.path().join("ripen.toml").display().to_string(),
    ];
    let out = run_ripen(args, dir.path().to_owned(), Duration::from_secs(20)).await;
    (out, dir)
}

// ---------------------------------------------------------------------------
// The downstream service
// ---------------------------------------------------------------------------

/// One canned answer of the downstream.
#[derive(Clone, Debug)]
pub struct Reply {
    pub status: u16,
    pub content_type: String,
    pub body: Bytes,
    pub headers: Vec<(String, String)>,
    pub delay: Duration,
}

impl Reply {
    pub fn json(status: u16, body: &Value) -> Reply {
        Reply {
            status,
            content_type: "application/json".to_owned(),
            body: Bytes::from(serde_json::to_vec(body).unwrap()),
            headers: Vec::new(),
            delay: Duration::ZERO,
        }
    }

    pub fn ok(output: &Value) -> Reply {
        Reply::json(200, output)
    }

    pub fn error(status: u16) -> Reply {
        Reply::json(status, &json!({"error": format!("scripted {status}")}))
    }

    pub fn text(status: u16, body: &str) -> Reply {
        Reply {
            status,
            content_type: "text/plain".to_owned(),
            body: Bytes::from(body.to_owned()),
            headers: Vec::new(),
            delay: Duration::ZERO,
        }
    }

    pub fn header(mut self, name: &str, value: &str) -> Reply {
        self.headers.push((name.to_owned(), value.to_owned()));
        self
    }

    pub fn delay(mut self, delay: Duration) -> Reply {
        self.delay = delay;
        self
    }
}

/// What the downstream does on one path. Calls are counted per path and
/// `Idempotency-Key`, that is per entity and step.
#[derive(Clone, Debug)]
pub enum Behavior {
    /// The first calls get `first[n]`, every later one gets `then`.
    Script { first: Vec<Reply>, then: Reply },
    /// Random latency up to `max_delay_ms`; `fail_percent` of the calls get
    /// 503; the others succeed with `ok`.
    Flaky {
        max_delay_ms: u64,
        fail_percent: u32,
        ok: Value,
    },
}

impl Behavior {
    pub fn ok(output: Value) -> Behavior {
        Behavior::Script {
            first: Vec::new(),
            then: Reply::ok(&output),
        }
    }

    /// Fails with `status` for the first `k` calls, then succeeds.
    pub fn fail_first(status: u16, k: usize, output: Value) -> Behavior {
        Behavior::Script {
            first: vec![Reply::error(status); k],
            then: Reply::ok(&output),
        }
    }

    pub fn always(status: u16) -> Behavior {
        Behavior::Script {
            first: Vec::new(),
            then: Reply::error(status),
        }
    }

    /// Answers `status` with `Retry-After: secs` for the first `k` calls.
    pub fn retry_after(status: u16, secs: u32, k: usize, output: Value) -> Behavior {
        Behavior::Script {
            first: vec![Reply::error(status).header("retry-after", &secs.to_string()); k],
            then: Reply::ok(&output),
        }
    }

    /// Succeeds after `delay`, every time.
    pub fn sleep(delay: Duration, output: Value) -> Behavior {
        Behavior::Script {
            first: Vec::new(),
            then: Reply::ok(&output).delay(delay),
        }
    }

    /// Sleeps `delay` on the first `k` calls, then succeeds at once.
    pub fn sleep_first(k: usize, delay: Duration, output: Value) -> Behavior {
        Behavior::Script {
            first: vec![Reply::ok(&output).delay(delay); k],
            then: Reply::ok(&output),
        }
    }

    pub fn non_json(status: u16, body: &str) -> Behavior {
        Behavior::Script {
            first: Vec::new(),
            then: Reply::text(status, body),
        }
    }

    pub fn script(first: Vec<Reply>, then: Reply) -> Behavior {
        Behavior::Script { first, then }
    }

    fn reply(&self, n: usize) -> Reply {
        match self {
            Behavior::Script { first, then } => first.get(n - 1).unwrap_or(then).clone(),
            Behavior::Flaky {
                max_delay_ms,
                fail_percent,
                ok,
            } => {
                let delay = Duration::from_millis(fastrand::u64(0..=*max_delay_ms));
                if fastrand::u32(0..100) < *fail_percent {
                    Reply::error(503).delay(delay)
                } else {
                    Reply::ok(ok).delay(delay)
                }
            }
        }
    }
}

/// One request the downstream received.
#[derive(Clone, Debug)]
pub struct Call {
    pub path: String,
    pub method: String,
    /// Lower-case names.
    pub headers: HashMap<String, String>,
    pub raw: Bytes,
    pub body: Option<Value>,
    /// 1 for the first call with this path and idempotency key.
    pub n: usize,
    pub received_at: Instant,
    /// When the answer was handed to the connection; `None` if the caller
    /// gave up first.
    pub replied_at: Option<Instant>,
    pub status: u16,
}

impl Call {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .get(&name.to_ascii_lowercase())
            .map(|s| s.as_str())
    }

    pub fn entity_id(&self) -> Option<&str> {
        self.body.as_ref()?.get("entity_id")?.as_str()
    }

    pub fn attempt(&self) -> Option<u64> {
        self.body.as_ref()?.get("attempt")?.as_u64()
    }

    pub fn succeeded(&self) -> bool {
        self.replied_at.is_some() && (200..300).contains(&self.status)
    }
}

#[derive(Default)]
struct DsInner {
    behaviors: HashMap<String, Behavior>,
    counts: HashMap<(String, String), usize>,
    calls: Vec<Call>,
}

/// A real HTTP server on loopback whose paths behave as the test says.
/// Unknown paths succeed with `{"from": path}`.
pub struct Downstream {
    addr: SocketAddr,
    inner: Arc<Mutex<DsInner>>,
    task: tokio::task::JoinHandle<()>,
}

impl Downstream {
    pub async fn start() -> Downstream {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind the downstream");
        let addr = listener.local_addr().unwrap();
        let inner = Arc::new(Mutex::new(DsInner::default()));
        let shared = inner.clone();
        let task = tokio::spawn(async move {
            loop {
                let stream = match listener.accept().await {
                    Ok((stream, _)) => stream,
                    Err(_) => {
                        tokio::time::sleep(Duration::from_millis(10)).await;
                        continue;
                    }
                };
                let _ = stream.set_nodelay(true);
                let shared = shared.clone();
                tokio::spawn(async move {
                    let svc = service_fn(move |req| handle(shared.clone(), req));
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
        Downstream { addr, inner, task }
    }

    pub fn base(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{}", self.base(), path)
    }

    pub fn set(&self, path: &str, behavior: Behavior) {
        self.inner
            .lock()
            .unwrap()
            .behaviors
            .insert(path.to_owned(), behavior);
    }

    pub fn calls(&self) -> Vec<Call> {
        self.inner.lock().unwrap().calls.clone()
    }

    pub fn calls_to(&self, path: &str) -> Vec<Call> {
        self.calls()
            .into_iter()
            .filter(|c| c.path == path)
            .collect()
    }

    /// Calls to `path` about one entity, oldest first.
    pub fn calls_for(&self, path: &str, entity_id: &str) -> Vec<Call> {
        self.calls()
            .into_iter()
            .filter(|c| c.path == path && c.entity_id() == Some(entity_id))
            .collect()
    }
}

impl Drop for Downstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn handle(
    shared: Arc<Mutex<DsInner>>,
    req: Request<Incoming>,
) -> std::result::Result<Response<Full<Bytes>>, Infallible> {
    let received_at = Instant::now();
    let (parts, body) = req.into_parts();
    let raw = match body.collect().await {
        Ok(c) => c.to_bytes(),
        Err(_) => Bytes::new(),
    };
    let path = parts.uri.path().to_owned();
    let headers: HashMap<String, String> = parts
        .headers
        .iter()
        .map(|(k, v)| {
            (
                k.as_str().to_ascii_lowercase(),
                String::from_utf8_lossy(v.as_bytes()).into_owned(),
            )
        })
        .collect();
    let key = headers.get("idempotency-key").cloned().unwrap_or_default();
    let parsed = serde_json::from_slice::<Value>(&raw).ok();
    let (reply, index) = {
        let mut inner = shared.lock().unwrap();
        let count = inner.counts.entry((path.clone(), key)).or_insert(0);
        *count += 1;
        let n = *count;
        let reply = match inner.behaviors.get(&path) {
            Some(b) => b.reply(n),
            None => Reply::ok(&json!({ "from": path })),
        };
        inner.calls.push(Call {
            path: path.clone(),
            method: parts.method.to_string(),
            headers,
            raw,
            body: parsed,
            n,
            received_at,
            replied_at: None,
            status: reply.status,
        });
        (reply, inner.calls.len() - 1)
    };
    if !reply.delay.is_zero() {
        tokio::time::sleep(reply.delay).await;
    }
    shared.lock().unwrap().calls[index].replied_at = Some(Instant::now());
    let mut resp = Response::builder()
        .status(reply.status)
        .header("content-type", reply.content_type.as_str());
    for (k, v) in &reply.headers {
        resp = resp.header(k.as_str(), v.as_str());
    }
    Ok(resp.body(Full::new(reply.body)).unwrap())
}
