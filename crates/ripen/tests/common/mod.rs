//! The end-to-end test harness: the real `ripen` binary on a temporary
//! directory (through `ripen_testkit::ServerProcess`), the fake downstream
//! and the config writer of `ripen_testkit`, and a panicking veneer over
//! `ripen_client` that keeps each test to its assertions.
//!
//! Every test binary includes this module with `mod common;`, and each uses a
//! different subset of it.
#![allow(dead_code)]

use std::fmt;
use std::io::{Read, Write};
use std::ops::Deref;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use anyhow::Result;
use bytes::Bytes;
use hyper::Method;
use ripen_client::Client;
use serde_json::Value;

// Each test binary uses a different subset.
#[allow(unused_imports)]
pub use ripen_testkit::{
    single, step_path, tail_of_file, w5, Behavior, Call, Config, Downstream, Reply, Step, TempDir,
    TypeDef,
};

/// The binary under test.
pub const RIPEN: &str = env!("CARGO_BIN_EXE_ripen");

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

/// The storage of a test server: a SQLite file in its directory, or, with
/// `RIPEN_TEST_STORAGE=postgres`, a fresh database on this test binary's
/// private PostgreSQL cluster.
pub fn storage_url(dir: &Path) -> String {
    match std::env::var("RIPEN_TEST_STORAGE").as_deref() {
        Ok("postgres") => ripen_testkit::PgCluster::shared().create_database(),
        Ok("sqlite") | Err(_) => ripen_testkit::sqlite_url(dir),
        Ok(other) => panic!("RIPEN_TEST_STORAGE={other:?}: use sqlite or postgres"),
    }
}

// ---------------------------------------------------------------------------
// Answers and the client
// ---------------------------------------------------------------------------

/// One answer, fully read, with its status as a number for terse asserts;
/// the client's answer (headers, body, `header`, `text`) is behind it.
#[derive(Clone)]
pub struct Resp {
    pub status: u16,
    answer: ripen_client::Response,
}

impl From<ripen_client::Response> for Resp {
    fn from(answer: ripen_client::Response) -> Resp {
        Resp {
            status: answer.status.as_u16(),
            answer,
        }
    }
}

impl Deref for Resp {
    type Target = ripen_client::Response;
    fn deref(&self) -> &ripen_client::Response {
        &self.answer
    }
}

impl Resp {
    /// The body as JSON; panics with the whole answer if it is not JSON.
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("answer is not JSON ({e}): {self}"))
    }
}

impl fmt::Display for Resp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let as_client = ripen_client::Response {
            status: hyper::StatusCode::from_u16(self.status).map_err(|_| fmt::Error)?,
            headers: self.headers.clone(),
            body: self.body.clone(),
        };
        fmt::Display::fmt(&as_client, f)
    }
}

impl fmt::Debug for Resp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// A client of one server whose calls panic with the whole answer when a
/// test's expectation fails. Clones share the base URL, so that a restart on
/// another port is seen by every clone.
#[derive(Clone)]
pub struct Api {
    client: Client,
}

impl Api {
    pub fn new(base: &str) -> Api {
        Api::of(&Client::new(base))
    }

    /// A veneer over `client`, sharing its base URL and connections.
    pub fn of(client: &Client) -> Api {
        Api {
            client: client.clone().with_timeout(REQUEST_TIMEOUT),
        }
    }

    pub fn client(&self) -> &Client {
        &self.client
    }

    /// The root URL, such as `http://127.0.0.1:4321`.
    pub fn base(&self) -> String {
        self.client.base()
    }

    /// `host:port` of the server.
    pub fn addr(&self) -> String {
        self.client.authority()
    }

    pub async fn try_request(
        &self,
        method: Method,
        path: &str,
        headers: &[(&str, &str)],
        body: Option<Vec<u8>>,
    ) -> Result<Resp> {
        let resp = self
            .client
            .request(method, path, headers, body.map(Bytes::from))
            .await?;
        Ok(resp.into())
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

    /// Sends bytes as they are on a fresh connection (see
    /// `ripen_client::Client::raw_request`).
    pub async fn raw_request(
        &self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: Vec<u8>,
    ) -> Result<Resp> {
        let resp = self.client.raw_request(method, path, headers, body).await?;
        Ok(resp.into())
    }
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
    process: ripen_testkit::ServerProcess,
    /// Removed after the process is killed (fields drop in order).
    dir: TempDir,
}

impl Deref for Server {
    type Target = Api;
    fn deref(&self) -> &Api {
        &self.api
    }
}

impl Server {
    pub async fn start(cfg: &Config) -> Server {
        Server::start_with(|dir| cfg.render_on(dir, &storage_url(dir))).await
    }

    /// Starts a server on the given storage URL, such as a PostgreSQL
    /// database that other servers of the test share.
    pub async fn start_on(cfg: &Config, storage_url: &str) -> Server {
        Server::start_with(|dir| cfg.render_on(dir, storage_url)).await
    }

    /// Starts a server on the configuration text `render` writes for its
    /// directory.
    pub async fn start_with(render: impl FnOnce(&Path) -> std::io::Result<String>) -> Server {
        let dir = TempDir::new("ripen-e2e-").expect("create a temporary directory");
        let config_path = dir.path().join("ripen.toml");
        let toml = render(dir.path()).expect("render the configuration");
        std::fs::write(&config_path, &toml).expect("write ripen.toml");
        let log_path = dir.path().join("server.log");
        match ripen_testkit::ServerProcess::start(Path::new(RIPEN), &config_path, &log_path).await {
            Ok(process) => Server {
                api: Api::of(process.client()),
                process,
                dir,
            },
            Err(e) => panic!("start ripen serve: {e}\nconfig:\n{toml}"),
        }
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
        self.process.kill();
    }

    /// Sends SIGTERM and waits up to `timeout` for the server to exit by
    /// itself; `None` if it had to be killed.
    pub async fn terminate(&mut self, timeout: Duration) -> Option<ExitStatus> {
        self.process.terminate(timeout).await
    }

    /// Starts the server again on the same data directory (killing it first
    /// if it runs).
    pub async fn restart(&mut self) {
        if let Err(e) = self.process.restart().await {
            panic!("restart ripen serve: {e}");
        }
    }

    /// Sets `name` to `value` in the server's environment from its next
    /// start on.
    pub fn set_env(&mut self, name: &str, value: &str) {
        self.process.set_env(name, value);
    }

    /// Like [`Server::restart`], but a start that fails is returned, for a
    /// test that counts failed starts rather than stopping at the first.
    pub async fn try_restart(&mut self) -> std::io::Result<()> {
        self.process.restart().await
    }

    /// `/readyz` 200 within `timeout`, or why not.
    pub async fn try_wait_ready(&self, timeout: Duration) -> std::io::Result<Duration> {
        self.process.wait_ready(timeout).await
    }

    /// Waits until `/readyz` answers 200; returns how long that took.
    pub async fn wait_ready(&self, timeout: Duration) -> Duration {
        match self.process.wait_ready(timeout).await {
            Ok(took) => took,
            Err(e) => panic!("{e}; log tail:\n{}", self.log_tail(40)),
        }
    }

    /// `Some(status)` when the process has exited.
    pub fn exited(&mut self) -> Option<ExitStatus> {
        self.process.exited()
    }

    pub fn log_tail(&self, lines: usize) -> String {
        self.process.log_tail(lines)
    }

    /// The whole server log (standard error and output of every start).
    pub fn log(&self) -> String {
        self.process.log()
    }

    /// The process id of the running server, if it runs.
    pub fn pid(&self) -> Option<u32> {
        self.process.pid()
    }

    /// Asks the server to stop (SIGTERM) without waiting for it.
    pub fn sigterm(&self) {
        self.process.sigterm();
    }

    /// Freezes the server process (SIGSTOP): it keeps its sockets and its
    /// leases but does nothing until [`Server::sigcont`].
    pub fn sigstop(&self) {
        self.process.sigstop();
    }

    /// Lets a process frozen by [`Server::sigstop`] run again (SIGCONT).
    pub fn sigcont(&self) {
        self.process.sigcont();
    }
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
    let dir = TempDir::new("ripen-badcfg-").expect("create a temporary directory");
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
