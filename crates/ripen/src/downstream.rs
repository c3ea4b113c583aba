//! Fake downstream services for the demo and the bench: an HTTP server on
//! loopback that answers the step calls of Ripen's `http` executor.
//!
//! It checks each call against the HTTP step contract of DESIGN.md (the JSON
//! body and the `Idempotency-Key: {entity_id}:{step}` header) and counts what it
//! saw, so that a bench or a demo can tell a wrong call from a slow one.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::header::{HeaderValue, CONTENT_TYPE, RETRY_AFTER};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use serde::de::IgnoredAny;
use tokio::net::TcpListener;

/// How a fake downstream behaves.
#[derive(Debug, Clone)]
pub struct Profile {
    /// Each answer is delayed by a uniformly drawn time in this range, in
    /// milliseconds (inclusive).
    pub latency_ms: (u64, u64),
    /// The share of calls (0.0 to 1.0) answered with a transient 503; a quarter
    /// of those carry `Retry-After: 1`.
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

/// What a fake downstream saw, shared with the task that serves it.
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
}

impl Stats {
    /// Every request received, whatever its answer.
    pub fn requests(&self) -> u64 {
        self.inner.requests.load(Ordering::Relaxed)
    }

    /// The 503s the profile injected.
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

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A panic while holding this lock cannot leave the string half-written.
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Starts a fake downstream on `127.0.0.1` with a free port and serves it on a
/// spawned task until the runtime shuts down.
pub async fn spawn(profile: Profile) -> Result<(SocketAddr, Stats)> {
    let listener = TcpListener::bind(("127.0.0.1", 0))
        .await
        .context("bind the fake downstream")?;
    let addr = listener
        .local_addr()
        .context("read the fake downstream's address")?;
    let stats = Stats::default();
    let profile = Arc::new(profile);
    tokio::spawn(accept_loop(listener, profile, stats.clone()));
    Ok((addr, stats))
}

async fn accept_loop(listener: TcpListener, profile: Arc<Profile>, stats: Stats) {
    loop {
        let (stream, _) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(error) => {
                // Running out of file descriptors is the usual cause; back off
                // rather than spin.
                tracing::warn!(%error, "fake downstream: accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let profile = profile.clone();
        let stats = stats.clone();
        tokio::spawn(async move {
            let service = service_fn(move |request| {
                let profile = profile.clone();
                let stats = stats.clone();
                async move { Ok::<_, Infallible>(answer(request, &profile, &stats).await) }
            });
            // A client closing its keep-alive connection is not an error
            // worth reporting.
            let _ = http1::Builder::new()
                .keep_alive(true)
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

async fn answer(
    request: Request<Incoming>,
    profile: &Profile,
    stats: &Stats,
) -> Response<Full<Bytes>> {
    stats.inner.requests.fetch_add(1, Ordering::Relaxed);
    if request.method() != Method::POST {
        stats.violation(format!(
            "{} {}: the step contract uses POST",
            request.method(),
            request.uri()
        ));
        return reply(StatusCode::METHOD_NOT_ALLOWED, Bytes::from_static(b"{}"));
    }
    let path = request.uri().path().to_owned();
    let idempotency_key = request
        .headers()
        .get("idempotency-key")
        .and_then(|value| value.to_str().ok())
        .map(str::to_owned);
    let body = match request.into_body().collect().await {
        Ok(body) => body.to_bytes(),
        Err(_) => return reply(StatusCode::BAD_REQUEST, Bytes::from_static(b"{}")),
    };
    let step = check_contract(&path, idempotency_key.as_deref(), &body, stats);

    let (low, high) = profile.latency_ms;
    if high > 0 {
        let delay_ms = fastrand::u64(low..=high.max(low));
        tokio::time::sleep(Duration::from_millis(delay_ms)).await;
    }
    if profile.transient_failure_rate > 0.0 && fastrand::f64() < profile.transient_failure_rate {
        stats
            .inner
            .injected_failures
            .fetch_add(1, Ordering::Relaxed);
        let mut response = reply(
            StatusCode::SERVICE_UNAVAILABLE,
            Bytes::from_static(b"{\"error\":\"temporarily unavailable\"}"),
        );
        if fastrand::u8(0..4) == 0 {
            response
                .headers_mut()
                .insert(RETRY_AFTER, HeaderValue::from_static("1"));
        }
        return response;
    }
    if profile.is_noop() {
        return reply(StatusCode::OK, Bytes::from_static(b"{}"));
    }
    let output = serde_json::json!({
        "ok": true,
        "step": step,
        "reference": format!("{:016x}", fastrand::u64(..)),
    });
    reply(StatusCode::OK, Bytes::from(output.to_string()))
}

/// The fields of a step call that the contract requires. The payload and the
/// outputs are checked to be JSON but not built: the bench shares the
/// machine's cores with the server, so its downstream must stay cheap.
#[derive(serde::Deserialize)]
struct Call<'a> {
    #[serde(borrow)]
    entity_id: Option<std::borrow::Cow<'a, str>>,
    #[serde(rename = "type")]
    type_name: Option<IgnoredAny>,
    version: Option<IgnoredAny>,
    #[serde(borrow)]
    step: Option<std::borrow::Cow<'a, str>>,
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
    let call: Call<'_> = match serde_json::from_slice(body) {
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

fn reply(status: StatusCode, body: Bytes) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(body));
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    response
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::client::Client;

    fn call(entity_id: &str, step: &str) -> String {
        serde_json::json!({
            "entity_id": entity_id, "type": "w5", "version": 1, "step": step,
            "attempt": 1, "payload": {"x": 1}, "outputs": {}
        })
        .to_string()
    }

    #[tokio::test]
    async fn noop_answers_empty_object_and_counts() {
        let (addr, stats) = spawn(Profile::noop()).await.unwrap();
        let client = Client::new(&format!("http://{addr}"));
        let reply = client
            .post("/a", &[("Idempotency-Key", "e1:a")], call("e1", "a"))
            .await
            .unwrap();
        assert_eq!(reply.status, StatusCode::OK);
        assert_eq!(&reply.body[..], b"{}");
        assert_eq!(stats.requests(), 1);
        assert_eq!(stats.contract_violations(), 0);
    }

    #[tokio::test]
    async fn realistic_output_names_the_step_and_flags_a_wrong_key() {
        let profile = Profile {
            latency_ms: (1, 2),
            transient_failure_rate: 0.0,
        };
        let (addr, stats) = spawn(profile).await.unwrap();
        let client = Client::new(&format!("http://{addr}"));
        let reply = client
            .post(
                "/kyc",
                &[("Idempotency-Key", "e1:billing")],
                call("e1", "kyc"),
            )
            .await
            .unwrap();
        assert_eq!(reply.status, StatusCode::OK);
        let output = reply.json().unwrap();
        assert_eq!(output["ok"], true);
        assert_eq!(output["step"], "kyc");
        assert_eq!(stats.contract_violations(), 1);
        assert!(stats
            .first_violation()
            .unwrap()
            .contains("expected \"e1:kyc\""));
    }

    #[test]
    fn contract_check_names_what_is_missing() {
        let stats = Stats::default();
        let step = check_contract("/a", Some("e1:a"), call("e1", "a").as_bytes(), &stats);
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

    #[tokio::test]
    async fn failing_profile_answers_503() {
        let profile = Profile {
            latency_ms: (0, 0),
            transient_failure_rate: 1.0,
        };
        let (addr, stats) = spawn(profile).await.unwrap();
        let client = Client::new(&format!("http://{addr}"));
        let reply = client
            .post("/a", &[("Idempotency-Key", "e1:a")], call("e1", "a"))
            .await
            .unwrap();
        assert_eq!(reply.status, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(stats.injected_failures(), 1);
    }
}
