//! The HTTP step executor: the step contract (docs/api.md).
//!
//! `POST <url>` with `{"entity_id", "type", "version", "step", "attempt",
//! "payload", "outputs"}` and the headers `Idempotency-Key: {entity_id}:{step}`
//! and `traceparent`. A 2xx succeeds and its JSON body is the output; 408,
//! 425, 429, 5xx, timeouts and connection errors are retried (honouring
//! `Retry-After`); any other status fails the step for good.
//!
//! `https://` URLs are called over rustls (`ripen-tls`): the system's roots
//! or the configured `ca_file`, and a client certificate where one is set.
//! A certificate that is not trusted, or a client certificate the server
//! refuses, fails the step for good: the next attempt would meet the same
//! certificate.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::header::{HeaderValue, CONTENT_TYPE, RETRY_AFTER};
use hyper::{Request, StatusCode, Uri};
use hyper_rustls::{HttpsConnector, HttpsConnectorBuilder};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use ripen_core::{Executor, StepSpec};
use ripen_store::{Attempt, Outcome};
use ripen_tls::{ClientFiles, FileError};

use super::{ExecutorKind, StepExecutor};
use crate::config::HttpTls;

/// The largest step output accepted; a larger one fails the attempt for good.
pub const OUTPUT_BYTES_MAX: usize = 1024 * 1024;
/// How much of an error answer's body is kept as the step's error.
const ERROR_BODY_CHARS_MAX: usize = 256;

type HttpsClient = Client<HttpsConnector<HttpConnector>, Full<Bytes>>;

#[derive(Clone)]
pub struct HttpExecutor {
    client: HttpsClient,
    /// The clients of the steps with TLS settings of their own, by type and
    /// step name. Steps with the same settings share a client.
    step_clients: Arc<HashMap<String, HashMap<String, HttpsClient>>>,
    /// `engine.node`, sent as `ripen-node` with every call when set.
    node: Option<HeaderValue>,
}

impl HttpExecutor {
    /// `idle_per_host_max` bounds the keep-alive connections kept per
    /// downstream. `https` URLs trust the system's root certificates.
    pub fn new(idle_per_host_max: usize) -> HttpExecutor {
        HttpExecutor::with_tls(idle_per_host_max, &HttpTls::default())
            .expect("the system's roots need no file")
    }

    /// Like [`HttpExecutor::new`], with the TLS settings of the
    /// configuration; fails if one of its files cannot be used.
    pub fn with_tls(idle_per_host_max: usize, tls: &HttpTls) -> Result<HttpExecutor, FileError> {
        let client = https_client(idle_per_host_max, &tls.default)?;
        let mut shared: HashMap<&ClientFiles, HttpsClient> = HashMap::new();
        let mut step_clients: HashMap<String, HashMap<String, HttpsClient>> = HashMap::new();
        for ((type_name, step), files) in &tls.steps {
            let client = match shared.get(files) {
                Some(client) => client.clone(),
                None => {
                    let client = https_client(idle_per_host_max, files)?;
                    shared.insert(files, client.clone());
                    client
                }
            };
            step_clients
                .entry(type_name.clone())
                .or_default()
                .insert(step.clone(), client);
        }
        Ok(HttpExecutor {
            client,
            step_clients: Arc::new(step_clients),
            node: None,
        })
    }

    /// Names this node in the `ripen-node` header of every call
    /// (`engine.node`), so that a downstream service or its logs can tell
    /// which node called.
    pub fn with_node(mut self, node: Option<&str>) -> HttpExecutor {
        self.node = node.and_then(|n| HeaderValue::from_str(n).ok());
        self
    }

    /// The client of one attempt's step.
    fn client_for(&self, a: &Attempt) -> &HttpsClient {
        if self.step_clients.is_empty() {
            return &self.client;
        }
        self.step_clients
            .get(&a.type_name)
            .and_then(|steps| steps.get(&a.step_name))
            .unwrap_or(&self.client)
    }

    /// Posts one attempt to `url` under its timeout. Never fails: every
    /// problem is an outcome.
    pub async fn post(&self, url: &str, attempt: &Attempt, timeout_ms: u64) -> Outcome {
        let call = self.call(self.client_for(attempt), url, attempt);
        match tokio::time::timeout(Duration::from_millis(timeout_ms), call).await {
            Ok(outcome) => outcome,
            Err(_) => Outcome::Failed {
                error: format!("timed out after {timeout_ms} ms"),
                retryable: true,
                retry_after_ms: None,
            },
        }
    }

    async fn call(&self, client: &HttpsClient, url: &str, a: &Attempt) -> Outcome {
        let request = match build_request(url, a, self.node.as_ref()) {
            Ok(r) => r,
            Err(e) => return failed(format!("cannot build the request: {e}"), false, None),
        };
        let response = match client.request(request).await {
            Ok(r) => r,
            Err(e) => return request_failed(url, &e),
        };
        let status = response.status();
        let retry_after_ms = response
            .headers()
            .get(RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| retry_after_ms(v, SystemTime::now()));
        let body = match Limited::new(response.into_body(), OUTPUT_BYTES_MAX)
            .collect()
            .await
        {
            Ok(b) => b.to_bytes(),
            Err(e) => {
                // An oversized body will not shrink on retry; a cut connection may heal.
                let too_big = e
                    .downcast_ref::<http_body_util::LengthLimitError>()
                    .is_some();
                return failed(format!("reading the answer failed: {e}"), !too_big, None);
            }
        };
        if status.is_success() {
            let output = if body.iter().all(u8::is_ascii_whitespace) {
                None
            } else {
                match serde_json::from_slice::<serde::de::IgnoredAny>(&body) {
                    Ok(_) => Some(String::from_utf8_lossy(&body).into_owned()),
                    Err(_) => {
                        tracing::debug!(step = %a.step_name, "step answered 2xx with a body that is not JSON; no output kept");
                        None
                    }
                }
            };
            return Outcome::Succeeded { output };
        }
        let text: String = String::from_utf8_lossy(&body)
            .chars()
            .take(ERROR_BODY_CHARS_MAX)
            .collect();
        let error = if text.is_empty() {
            format!("HTTP {}", status.as_u16())
        } else {
            format!("HTTP {}: {}", status.as_u16(), text.trim())
        };
        failed(error, is_retryable(status), retry_after_ms)
    }
}

#[async_trait::async_trait]
impl StepExecutor for HttpExecutor {
    async fn run(&self, step: &StepSpec, attempt: &Attempt) -> Outcome {
        match &step.executor {
            Executor::Http { url } => self.post(url, attempt, step.timeout_ms).await,
            // The registry routes by kind, so this is a wiring mistake; it
            // would fail the same way on every attempt.
            other => failed(
                format!(
                    "the http executor was handed a {} step",
                    ExecutorKind::of(other).as_str()
                ),
                false,
                None,
            ),
        }
    }
}

/// `Retry-After` as delay-seconds or as an HTTP-date (RFC 9110 section 10.2.3).
pub fn retry_after_ms(value: &str, now: SystemTime) -> Option<u64> {
    let value = value.trim();
    if let Ok(seconds) = value.parse::<u64>() {
        return Some(seconds.saturating_mul(1_000));
    }
    let at = httpdate::parse_http_date(value).ok()?;
    Some(at.duration_since(now).map_or(0, |d| d.as_millis() as u64))
}

fn failed(error: String, retryable: bool, retry_after_ms: Option<u64>) -> Outcome {
    Outcome::Failed {
        error,
        retryable,
        retry_after_ms,
    }
}

/// 408, 425, 429 and 5xx may succeed later; other statuses will not.
pub fn is_retryable(status: StatusCode) -> bool {
    matches!(status.as_u16(), 408 | 425 | 429) || status.is_server_error()
}

/// A client that calls `http://` and `https://` URLs, the latter with the
/// trust and the client certificate of `files`.
fn https_client(idle_per_host_max: usize, files: &ClientFiles) -> Result<HttpsClient, FileError> {
    let tls = files.client_config()?;
    let mut connector = HttpConnector::new();
    connector.set_nodelay(true);
    connector.set_connect_timeout(Some(Duration::from_secs(5)));
    // The TLS layer above takes the https URLs.
    connector.enforce_http(false);
    let connector = HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_or_http()
        .enable_http1()
        .wrap_connector(connector);
    Ok(Client::builder(TokioExecutor::new())
        .pool_idle_timeout(Duration::from_secs(60))
        .pool_max_idle_per_host(idle_per_host_max)
        .build(connector))
}

/// A request that got no answer. A TLS failure that would happen again
/// (an untrusted certificate, a refused client) fails for good; every
/// other failure, a refused connection say, may heal.
fn request_failed(url: &str, e: &hyper_util::client::legacy::Error) -> Outcome {
    if let Some(tls) = ripen_tls::find_tls_error(e) {
        let host = url
            .parse::<Uri>()
            .ok()
            .and_then(|u| u.host().map(str::to_owned))
            .unwrap_or_else(|| url.to_owned());
        return failed(
            format!(
                "TLS handshake with {host} failed: {}",
                ripen_tls::describe(tls)
            ),
            !ripen_tls::is_permanent(tls),
            None,
        );
    }
    failed(format!("request failed: {}", error_chain(e)), true, None)
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut source = e.source();
    while let Some(inner) = source {
        s.push_str(": ");
        s.push_str(&inner.to_string());
        source = inner.source();
    }
    s
}

/// The step contract body, assembled from the raw JSON the store holds so
/// that payload and outputs are never parsed again.
pub fn request_body(a: &Attempt) -> String {
    let mut body = String::with_capacity(a.payload.len() + 256);
    body.push_str("{\"entity_id\":\"");
    body.push_str(&a.entity_id.to_string());
    body.push_str("\",\"type\":");
    body.push_str(&json_string(&a.type_name));
    body.push_str(",\"version\":");
    body.push_str(&a.version.to_string());
    body.push_str(",\"step\":");
    body.push_str(&json_string(&a.step_name));
    body.push_str(",\"attempt\":");
    body.push_str(&a.attempt.to_string());
    body.push_str(",\"payload\":");
    body.push_str(&a.payload);
    body.push_str(",\"outputs\":{");
    for (i, (name, output)) in a.outputs.iter().enumerate() {
        if i > 0 {
            body.push(',');
        }
        body.push_str(&json_string(name));
        body.push(':');
        body.push_str(output);
    }
    body.push_str("}}");
    body
}

fn json_string(s: &str) -> String {
    serde_json::to_string(s).unwrap_or_else(|_| "\"\"".into())
}

/// A W3C trace context: one trace per entity (its id), one span per attempt.
pub fn traceparent(a: &Attempt) -> String {
    let span = crate::trace::attempt_span_id(a.entity_id, a.step, a.epoch);
    crate::trace::traceparent_of(a.entity_id, span)
}

fn build_request(
    url: &str,
    a: &Attempt,
    node: Option<&HeaderValue>,
) -> Result<Request<Full<Bytes>>, hyper::http::Error> {
    let key = format!("{}:{}", a.entity_id, a.step_name);
    let mut request = Request::post(url)
        .header(CONTENT_TYPE, HeaderValue::from_static("application/json"))
        .header("idempotency-key", key)
        .header("traceparent", traceparent(a));
    if let Some(node) = node {
        request = request.header("ripen-node", node.clone());
    }
    request.body(Full::new(Bytes::from(request_body(a))))
}

#[cfg(test)]
mod tests {
    use super::*;
    use ripen_store::EntityId;

    #[test]
    fn body_is_the_step_contract() {
        let a = Attempt {
            entity_id: "0193c5b2-0000-7000-8000-000000000001"
                .parse::<EntityId>()
                .unwrap(),
            type_name: "merchant".into(),
            version: 2,
            step: 3,
            step_name: "d".into(),
            attempt: 1,
            epoch: 1,
            lease_expires_at_us: 0,
            payload: r#"{"name":"Ada \"A\""}"#.into(),
            outputs: vec![("b".into(), r#"{"x":1}"#.into()), ("c".into(), "[]".into())],
        };
        let v: serde_json::Value = serde_json::from_str(&request_body(&a)).unwrap();
        assert_eq!(
            v,
            serde_json::json!({
                "entity_id": "0193c5b2-0000-7000-8000-000000000001",
                "type": "merchant", "version": 2, "step": "d", "attempt": 1,
                "payload": {"name": "Ada \"A\""},
                "outputs": {"b": {"x": 1}, "c": []}
            })
        );
        let tp = traceparent(&a);
        assert_eq!(tp.len(), 55);
        assert!(tp.starts_with("00-0193c5b200007000800000000000000"));
    }

    #[test]
    fn retry_after_forms() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        assert_eq!(retry_after_ms("3", now), Some(3_000));
        assert_eq!(retry_after_ms(" 0 ", now), Some(0));
        let later = httpdate::fmt_http_date(now + Duration::from_secs(5));
        assert_eq!(retry_after_ms(&later, now), Some(5_000));
        let earlier = httpdate::fmt_http_date(now - Duration::from_secs(5));
        assert_eq!(retry_after_ms(&earlier, now), Some(0));
        assert_eq!(retry_after_ms("soon", now), None);
        assert_eq!(retry_after_ms("-1", now), None);
    }

    #[test]
    fn retryable_statuses() {
        for s in [408, 425, 429, 500, 502, 503, 504] {
            assert!(is_retryable(StatusCode::from_u16(s).unwrap()), "{s}");
        }
        for s in [400, 401, 403, 404, 409, 410, 422] {
            assert!(!is_retryable(StatusCode::from_u16(s).unwrap()), "{s}");
        }
    }
}
