//! A fake downstream service: a real HTTP/1.1 server on loopback that
//! answers the step calls of Ripen's `http` executor.
//!
//! Each path behaves as its [`Behavior`] says: scripted answers per entity
//! and step (failures, delays, `Retry-After`), random latency and failures,
//! or a synthetic service with a latency profile ([`Profile`]). Every call is
//! checked against the step contract of docs/api.md (a POST with the step
//! call body and `Idempotency-Key: {entity_id}:{step}`) and counted in
//! [`Stats`], so that a bench or a demo can tell a wrong call from a slow one.
//! A recording downstream ([`Downstream::start`], for tests) also keeps every
//! [`Call`]; one started with [`Downstream::with_profile`] keeps nothing, so
//! that a bench's millions of calls cost no memory. One started with
//! [`Downstream::start_tls`] serves `https` and counts its TLS handshakes.

use std::borrow::Cow;
use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use serde::de::IgnoredAny;
use serde_json::{json, Value};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsAcceptor;

/// How long the accept loop waits after a failed accept (usually: out of
/// file descriptors) before it tries again, rather than spin.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(20);

/// One canned answer.
#[derive(Clone, Debug)]
pub struct Reply {
    pub status: u16,
    pub content_type: &'static str,
    pub body: Bytes,
    pub headers: Vec<(String, String)>,
    pub delay: Duration,
}

impl Reply {
    pub fn json(status: u16, body: &Value) -> Reply {
        Reply {
            status,
            content_type: "application/json",
            body: Bytes::from(serde_json::to_vec(body).expect("a value serializes")),
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
            content_type: "text/plain",
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

/// The latency and failure profile of a synthetic downstream.
#[derive(Debug, Clone)]
pub struct Profile {
    /// Each answer is delayed by a uniformly drawn time in this range, in
    /// milliseconds (inclusive).
    pub latency_ms: (u64, u64),
    /// The share of calls (0.0 to 1.0) answered with a transient 503; a
    /// quarter of those carry `Retry-After: 1`.
    pub transient_failure_rate: f64,
}

impl Profile {
    /// Answers 200 `{}` at once: the pipeline's own cost, nothing else.
    pub fn noop() -> Profile {
        Profile {
            latency_ms: (0, 0),
            transient_failure_rate: 0.0,
        }
    }

    /// Answers in 5 to 60 ms and fails about 8% of the calls with a 503, so
    /// that retries and backoff show.
    pub fn realistic() -> Profile {
        Profile {
            latency_ms: (5, 60),
            transient_failure_rate: 0.08,
        }
    }

    fn is_noop(&self) -> bool {
        self.latency_ms == (0, 0) && self.transient_failure_rate <= 0.0
    }
}

/// What one path does. Calls are counted per path and `Idempotency-Key`,
/// that is per entity and step.
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
    /// See [`Behavior::refuse_some`].
    Refuse {
        percent: u32,
        status: u16,
        times: Option<usize>,
        max_delay_ms: u64,
        ok: Value,
    },
    /// A synthetic service: the profile's latency and failures; a success
    /// is `{}` for the no-op profile, else an output naming the step.
    Synthetic(Profile),
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

    /// Refuses `percent` of the entities with `status`: each refused
    /// entity's first `times` calls (every call when `None`), chosen by its
    /// idempotency key so that the same entities are refused on every
    /// attempt. The others succeed with `ok` after up to `max_delay_ms`.
    pub fn refuse_some(
        percent: u32,
        status: u16,
        times: Option<usize>,
        max_delay_ms: u64,
        ok: Value,
    ) -> Behavior {
        Behavior::Refuse {
            percent,
            status,
            times,
            max_delay_ms,
            ok,
        }
    }

    /// Whether the answer depends on how many calls came before.
    fn counts_calls(&self) -> bool {
        matches!(self, Behavior::Script { first, .. } if !first.is_empty())
            || matches!(self, Behavior::Refuse { times: Some(_), .. })
    }

    /// The answer to the `n`th call (from 1) about one entity and step, and
    /// whether it is an injected failure.
    fn reply(&self, n: usize, step: Option<&str>, key: Option<&str>) -> (Reply, bool) {
        match self {
            Behavior::Refuse {
                percent,
                status,
                times,
                max_delay_ms,
                ok,
            } => {
                let delay = Duration::from_millis(fastrand::u64(0..=*max_delay_ms));
                let chosen = key.is_some_and(|k| fnv(k) % 100 < u64::from(*percent));
                if chosen && times.is_none_or(|t| n <= t) {
                    let body = json!({"error": format!("refused by the demo's rule ({status})")});
                    (Reply::json(*status, &body).delay(delay), true)
                } else {
                    (Reply::ok(ok).delay(delay), false)
                }
            }
            Behavior::Script { first, then } => {
                (first.get(n.wrapping_sub(1)).unwrap_or(then).clone(), false)
            }
            Behavior::Flaky {
                max_delay_ms,
                fail_percent,
                ok,
            } => {
                let delay = Duration::from_millis(fastrand::u64(0..=*max_delay_ms));
                if fastrand::u32(0..100) < *fail_percent {
                    (Reply::error(503).delay(delay), true)
                } else {
                    (Reply::ok(ok).delay(delay), false)
                }
            }
            Behavior::Synthetic(profile) => synthetic(profile, step),
        }
    }
}

/// FNV-1a of `s`: a stable choice per idempotency key.
fn fnv(s: &str) -> u64 {
    s.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

fn synthetic(profile: &Profile, step: Option<&str>) -> (Reply, bool) {
    let (low, high) = profile.latency_ms;
    let delay = if high > 0 {
        Duration::from_millis(fastrand::u64(low..=high.max(low)))
    } else {
        Duration::ZERO
    };
    if profile.transient_failure_rate > 0.0 && fastrand::f64() < profile.transient_failure_rate {
        let mut reply = Reply {
            status: 503,
            content_type: "application/json",
            body: Bytes::from_static(b"{\"error\":\"temporarily unavailable\"}"),
            headers: Vec::new(),
            delay,
        };
        if fastrand::u8(0..4) == 0 {
            reply = reply.header("retry-after", "1");
        }
        return (reply, true);
    }
    let body = if profile.is_noop() {
        Bytes::from_static(b"{}")
    } else {
        let output = json!({
            "ok": true,
            "step": step,
            "reference": format!("{:016x}", fastrand::u64(..)),
        });
        Bytes::from(output.to_string())
    };
    let reply = Reply {
        status: 200,
        content_type: "application/json",
        body,
        headers: Vec::new(),
        delay,
    };
    (reply, false)
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

/// What a downstream saw; clones share the counters.
#[derive(Clone, Default)]
pub struct Stats {
    inner: Arc<Counters>,
}

#[derive(Default)]
struct Counters {
    requests: AtomicU64,
    injected_failures: AtomicU64,
    contract_violations: AtomicU64,
    first_violation: Mutex<Option<String>>,
    tls_handshakes: AtomicU64,
    tls_failures: AtomicU64,
    last_tls_failure: Mutex<Option<String>>,
}

impl Stats {
    /// Every request received, whatever its answer.
    pub fn requests(&self) -> u64 {
        self.inner.requests.load(Ordering::Relaxed)
    }

    /// The 503s that a random behavior injected.
    pub fn injected_failures(&self) -> u64 {
        self.inner.injected_failures.load(Ordering::Relaxed)
    }

    /// Calls that broke the HTTP step contract (wrong method, body or
    /// idempotency key).
    pub fn contract_violations(&self) -> u64 {
        self.inner.contract_violations.load(Ordering::Relaxed)
    }

    /// A description of the first contract violation, if any.
    pub fn first_violation(&self) -> Option<String> {
        lock(&self.inner.first_violation).clone()
    }

    /// TLS handshakes a client began (an https downstream only).
    pub fn tls_handshakes(&self) -> u64 {
        self.inner.tls_handshakes.load(Ordering::Relaxed)
    }

    /// TLS handshakes that failed, as the server saw them.
    pub fn tls_failures(&self) -> u64 {
        self.inner.tls_failures.load(Ordering::Relaxed)
    }

    /// Why the last failed TLS handshake failed, as the server saw it.
    pub fn last_tls_failure(&self) -> Option<String> {
        lock(&self.inner.last_tls_failure).clone()
    }

    fn violation(&self, what: String) {
        self.inner
            .contract_violations
            .fetch_add(1, Ordering::Relaxed);
        let mut first = lock(&self.inner.first_violation);
        if first.is_none() {
            *first = Some(what);
        }
    }
}

/// A panic while one of these locks is held cannot leave its data half
/// written (each critical section is one insert or push), so a poisoned lock
/// is used as it is.
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}

#[derive(Default)]
struct Recorded {
    counts: HashMap<(String, String), usize>,
    calls: Vec<Call>,
}

struct Shared {
    behaviors: RwLock<HashMap<String, Behavior>>,
    /// For paths without a behavior; `None` answers `{"from": path}`.
    fallback: Option<Behavior>,
    record: bool,
    recorded: Mutex<Recorded>,
    stats: Stats,
}

/// A fake downstream on `127.0.0.1` with a free port, served until dropped.
pub struct Downstream {
    addr: SocketAddr,
    /// Whether it serves https (on `localhost`).
    tls: bool,
    shared: Arc<Shared>,
    task: tokio::task::JoinHandle<()>,
}

impl Downstream {
    /// A downstream for tests: it records every call, and paths without a
    /// behavior succeed with `{"from": path}`. Panics if it cannot bind.
    pub async fn start() -> Downstream {
        Downstream::spawn(None, true, None)
            .await
            .unwrap_or_else(|e| panic!("start the fake downstream: {e}"))
    }

    /// Like [`Downstream::start`], serving https with `config` (see
    /// [`crate::tls::server_config`]); its URLs name `localhost`, the name
    /// a test's certificate is for.
    pub async fn start_tls(config: Arc<tokio_rustls::rustls::ServerConfig>) -> Downstream {
        Downstream::spawn(None, true, Some(TlsAcceptor::from(config)))
            .await
            .unwrap_or_else(|e| panic!("start the fake https downstream: {e}"))
    }

    /// A downstream where every path is the synthetic service of `profile`,
    /// recording nothing but [`Stats`]: the demo's and the bench's.
    pub async fn with_profile(profile: Profile) -> std::io::Result<Downstream> {
        Downstream::spawn(Some(Behavior::Synthetic(profile)), false, None).await
    }

    async fn spawn(
        fallback: Option<Behavior>,
        record: bool,
        tls: Option<TlsAcceptor>,
    ) -> std::io::Result<Downstream> {
        let listener = TcpListener::bind(("127.0.0.1", 0)).await?;
        let addr = listener.local_addr()?;
        let shared = Arc::new(Shared {
            behaviors: RwLock::new(HashMap::new()),
            fallback,
            record,
            recorded: Mutex::new(Recorded::default()),
            stats: Stats::default(),
        });
        let is_tls = tls.is_some();
        let task = tokio::spawn(accept_loop(listener, shared.clone(), tls));
        Ok(Downstream {
            addr,
            tls: is_tls,
            shared,
            task,
        })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn base(&self) -> String {
        if self.tls {
            format!("https://localhost:{}", self.addr.port())
        } else {
            format!("http://{}", self.addr)
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{}", self.base(), path)
    }

    /// What `path` does from now on.
    pub fn set(&self, path: &str, behavior: Behavior) {
        self.shared
            .behaviors
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .insert(path.to_owned(), behavior);
    }

    pub fn stats(&self) -> &Stats {
        &self.shared.stats
    }

    /// Every call so far, oldest first (none unless recording).
    pub fn calls(&self) -> Vec<Call> {
        lock(&self.shared.recorded).calls.clone()
    }

    pub fn calls_to(&self, path: &str) -> Vec<Call> {
        lock(&self.shared.recorded)
            .calls
            .iter()
            .filter(|c| c.path == path)
            .cloned()
            .collect()
    }

    /// Calls to `path` about one entity, oldest first.
    pub fn calls_for(&self, path: &str, entity_id: &str) -> Vec<Call> {
        lock(&self.shared.recorded)
            .calls
            .iter()
            .filter(|c| c.path == path && c.entity_id() == Some(entity_id))
            .cloned()
            .collect()
    }
}

impl Drop for Downstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn accept_loop(listener: TcpListener, shared: Arc<Shared>, tls: Option<TlsAcceptor>) {
    let mut connections = tokio::task::JoinSet::new();
    loop {
        let stream = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(_) => {
                    tokio::time::sleep(ACCEPT_BACKOFF).await;
                    continue;
                }
            },
            // Reap finished connections so that the set stays small.
            Some(_) = connections.join_next(), if !connections.is_empty() => continue,
        };
        let _ = stream.set_nodelay(true);
        let shared = shared.clone();
        let tls = tls.clone();
        // The connections live in the set, so that aborting this loop (the
        // downstream dropped) closes them too.
        connections.spawn(async move {
            match tls {
                None => serve(TokioIo::new(stream), shared).await,
                Some(acceptor) => serve_tls(acceptor, stream, shared).await,
            }
        });
    }
}

async fn serve_tls(acceptor: TlsAcceptor, stream: TcpStream, shared: Arc<Shared>) {
    let stats = &shared.stats.inner;
    stats.tls_handshakes.fetch_add(1, Ordering::Relaxed);
    match acceptor.accept(stream).await {
        Ok(stream) => serve(TokioIo::new(stream), shared).await,
        Err(e) => {
            stats.tls_failures.fetch_add(1, Ordering::Relaxed);
            *lock(&stats.last_tls_failure) = Some(e.to_string());
        }
    }
}

async fn serve<I>(io: I, shared: Arc<Shared>)
where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let service = service_fn(move |request| {
        let shared = shared.clone();
        async move { Ok::<_, Infallible>(answer(&shared, request).await) }
    });
    // A client closing its keep-alive connection is not an error worth
    // reporting.
    let _ = http1::Builder::new()
        .keep_alive(true)
        .serve_connection(io, service)
        .await;
}

async fn answer(shared: &Shared, request: Request<Incoming>) -> Response<Full<Bytes>> {
    let received_at = Instant::now();
    let stats = &shared.stats;
    stats.inner.requests.fetch_add(1, Ordering::Relaxed);
    let (parts, body) = request.into_parts();
    let raw = match body.collect().await {
        Ok(c) => c.to_bytes(),
        Err(_) => Bytes::new(),
    };
    // A call from a node that names itself is served and recorded under
    // `/{node}{path}`, so that a test can tell the nodes' calls apart.
    let path = match parts
        .headers
        .get("ripen-node")
        .and_then(|v| v.to_str().ok())
    {
        Some(node) => format!("/{node}{}", parts.uri.path()),
        None => parts.uri.path().to_owned(),
    };
    let key = parts
        .headers
        .get("idempotency-key")
        .and_then(|v| v.to_str().ok());
    if parts.method != hyper::Method::POST {
        stats.violation(format!(
            "{} {path}: the step contract uses POST",
            parts.method
        ));
    }
    let step = check_contract(&path, key, &raw, stats);

    let behavior = shared
        .behaviors
        .read()
        .unwrap_or_else(|e| e.into_inner())
        .get(&path)
        .cloned();
    let behavior = behavior.as_ref().or(shared.fallback.as_ref());
    let counts = shared.record || behavior.is_some_and(Behavior::counts_calls);
    let n = if counts {
        let mut recorded = lock(&shared.recorded);
        let count = recorded
            .counts
            .entry((path.clone(), key.unwrap_or_default().to_owned()))
            .or_insert(0);
        *count += 1;
        *count
    } else {
        0
    };
    let (reply, injected) = match behavior {
        Some(b) => b.reply(n, step.as_deref(), key),
        None => (Reply::ok(&json!({ "from": path })), false),
    };
    if injected {
        stats
            .inner
            .injected_failures
            .fetch_add(1, Ordering::Relaxed);
    }
    let index = shared.record.then(|| {
        let headers = parts
            .headers
            .iter()
            .map(|(k, v)| {
                (
                    k.as_str().to_ascii_lowercase(),
                    String::from_utf8_lossy(v.as_bytes()).into_owned(),
                )
            })
            .collect();
        let mut recorded = lock(&shared.recorded);
        recorded.calls.push(Call {
            path: path.clone(),
            method: parts.method.to_string(),
            headers,
            body: serde_json::from_slice::<Value>(&raw).ok(),
            raw: raw.clone(),
            n,
            received_at,
            replied_at: None,
            status: reply.status,
        });
        recorded.calls.len() - 1
    });
    if !reply.delay.is_zero() {
        tokio::time::sleep(reply.delay).await;
    }
    if let Some(index) = index {
        lock(&shared.recorded).calls[index].replied_at = Some(Instant::now());
    }
    let mut resp = Response::builder()
        .status(reply.status)
        .header("content-type", reply.content_type);
    for (k, v) in &reply.headers {
        resp = resp.header(k.as_str(), v.as_str());
    }
    resp.body(Full::new(reply.body))
        .unwrap_or_else(|_| Response::new(Full::new(Bytes::from_static(b"bad scripted reply"))))
}

/// The fields of a step call that the contract requires. The payload and the
/// outputs are checked to be JSON but not built: a bench's downstream shares
/// the machine's cores with the server, so it must stay cheap.
#[derive(serde::Deserialize)]
struct StepCall<'a> {
    #[serde(borrow)]
    entity_id: Option<Cow<'a, str>>,
    #[serde(rename = "type")]
    type_name: Option<IgnoredAny>,
    version: Option<IgnoredAny>,
    #[serde(borrow)]
    step: Option<Cow<'a, str>>,
    attempt: Option<IgnoredAny>,
    payload: Option<IgnoredAny>,
    outputs: Option<IgnoredAny>,
}

/// Checks one call against the HTTP step contract and returns its step name.
/// A required field that is absent or null is missing.
fn check_contract(
    path: &str,
    idempotency_key: Option<&str>,
    body: &[u8],
    stats: &Stats,
) -> Option<String> {
    let call: StepCall<'_> = match serde_json::from_slice(body) {
        Ok(call) => call,
        Err(error) => {
            stats.violation(format!("POST {path}: the body is not a step call: {error}"));
            return None;
        }
    };
    let missing: Vec<&str> = [
        ("entity_id", call.entity_id.is_some()),
        ("type", call.type_name.is_some()),
        ("version", call.version.is_some()),
        ("step", call.step.is_some()),
        ("attempt", call.attempt.is_some()),
        ("payload", call.payload.is_some()),
        ("outputs", call.outputs.is_some()),
    ]
    .into_iter()
    .filter(|(_, present)| !present)
    .map(|(field, _)| field)
    .collect();
    if !missing.is_empty() {
        stats.violation(format!(
            "POST {path}: the body lacks {}",
            missing.join(", ")
        ));
    }
    let entity_id = call.entity_id.as_deref();
    let step = call.step.as_deref();
    if let (Some(entity_id), Some(step)) = (entity_id, step) {
        let expected = format!("{entity_id}:{step}");
        if idempotency_key != Some(expected.as_str()) {
            stats.violation(format!(
                "POST {path}: Idempotency-Key is {idempotency_key:?}, expected {expected:?}"
            ));
        }
    }
    step.map(str::to_owned)
}

#[cfg(test)]
mod tests {
    use super::*;
    use ripen_client::{Client, Method, StatusCode};

    fn call(entity_id: &str, step: &str) -> Bytes {
        Bytes::from(
            json!({
                "entity_id": entity_id, "type": "w5", "version": 1, "step": step,
                "attempt": 1, "payload": {"x": 1}, "outputs": {}
            })
            .to_string(),
        )
    }

    async fn post(ds: &Downstream, path: &str, key: &str, body: Bytes) -> ripen_client::Response {
        Client::new(&ds.base())
            .request(Method::POST, path, &[("idempotency-key", key)], Some(body))
            .await
            .unwrap()
    }

    #[tokio::test]
    async fn noop_answers_empty_object_counts_and_records_nothing() {
        let ds = Downstream::with_profile(Profile::noop()).await.unwrap();
        let reply = post(&ds, "/a", "e1:a", call("e1", "a")).await;
        assert_eq!(reply.status, StatusCode::OK);
        assert_eq!(&reply.body[..], b"{}");
        assert_eq!(ds.stats().requests(), 1);
        assert_eq!(ds.stats().contract_violations(), 0);
        assert!(ds.calls().is_empty());
    }

    #[tokio::test]
    async fn a_synthetic_output_names_the_step_and_a_wrong_key_is_flagged() {
        let profile = Profile {
            latency_ms: (1, 2),
            transient_failure_rate: 0.0,
        };
        let ds = Downstream::with_profile(profile).await.unwrap();
        let reply = post(&ds, "/kyc", "e1:billing", call("e1", "kyc")).await;
        assert_eq!(reply.status, StatusCode::OK);
        let output: Value = reply.decode().unwrap();
        assert_eq!(output["ok"], true);
        assert_eq!(output["step"], "kyc");
        assert_eq!(ds.stats().contract_violations(), 1);
        assert!(ds
            .stats()
            .first_violation()
            .unwrap()
            .contains("expected \"e1:kyc\""));
    }

    #[tokio::test]
    async fn a_failing_profile_answers_503() {
        let profile = Profile {
            latency_ms: (0, 0),
            transient_failure_rate: 1.0,
        };
        let ds = Downstream::with_profile(profile).await.unwrap();
        let reply = post(&ds, "/a", "e1:a", call("e1", "a")).await;
        assert_eq!(reply.status, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(ds.stats().injected_failures(), 1);
    }

    #[tokio::test]
    async fn a_script_answers_per_entity_and_step_and_records_each_call() {
        let ds = Downstream::start().await;
        ds.set(
            "/s",
            Behavior::retry_after(503, 2, 1, json!({"done": true})),
        );
        let first = post(&ds, "/s", "e1:s", call("e1", "s")).await;
        assert_eq!(first.status, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(first.header("retry-after").as_deref(), Some("2"));
        // Another entity starts its own script.
        let other = post(&ds, "/s", "e2:s", call("e2", "s")).await;
        assert_eq!(other.status, StatusCode::SERVICE_UNAVAILABLE);
        let second = post(&ds, "/s", "e1:s", call("e1", "s")).await;
        assert_eq!(second.decode::<Value>().unwrap(), json!({"done": true}));
        let unknown = post(&ds, "/elsewhere", "e1:x", call("e1", "x")).await;
        assert_eq!(
            unknown.decode::<Value>().unwrap(),
            json!({"from": "/elsewhere"})
        );
        let calls = ds.calls_for("/s", "e1");
        assert_eq!(calls.iter().map(|c| c.n).collect::<Vec<_>>(), [1, 2]);
        assert!(calls.iter().all(|c| c.replied_at.is_some()));
        assert_eq!(calls[0].attempt(), Some(1));
        assert_eq!(ds.calls().len(), 4);
    }

    #[test]
    fn contract_check_names_what_is_missing() {
        let stats = Stats::default();
        let step = check_contract("/a", Some("e1:a"), &call("e1", "a"), &stats);
        assert_eq!(step.as_deref(), Some("a"));
        assert_eq!(stats.contract_violations(), 0);
        let partial = r#"{"entity_id":"e1","step":"a","type":"w5","version":1,"payload":null}"#;
        check_contract("/a", Some("e1:a"), partial.as_bytes(), &stats);
        assert_eq!(stats.contract_violations(), 1);
        assert_eq!(
            stats.first_violation().as_deref(),
            Some("POST /a: the body lacks attempt, payload, outputs")
        );
        check_contract("/a", None, b"[1]", &stats);
        assert_eq!(stats.contract_violations(), 2);
    }
}

#[cfg(test)]
mod refuse_tests {
    use super::*;

    #[test]
    fn refuse_some_picks_the_same_entities_and_lets_them_through_after_times() {
        let once = Behavior::refuse_some(50, 422, Some(1), 0, json!({"ok": true}));
        let always = Behavior::refuse_some(50, 400, None, 0, json!({"ok": true}));
        let keys: Vec<String> = (0..200).map(|i| format!("entity-{i}:kyc")).collect();
        let refused: Vec<&String> = keys
            .iter()
            .filter(|k| once.reply(1, None, Some(k.as_str())).1)
            .collect();
        assert!((60..=140).contains(&refused.len()), "{}", refused.len());
        for k in &refused {
            let (reply, injected) = once.reply(1, None, Some(k.as_str()));
            assert!(injected && reply.status == 422);
            assert!(
                !once.reply(2, None, Some(k.as_str())).1,
                "the second call passes"
            );
            assert!(
                always.reply(1, None, Some(k.as_str())).1,
                "the same entities"
            );
            assert!(always.reply(7, None, Some(k.as_str())).1, "every call");
        }
        assert!(once.counts_calls() && !always.counts_calls());
    }
}
