//! A typed client of Ripen's HTTP API (docs/api.md): keep-alive HTTP/1.1
//! connections, the API's views as serde types, one method per call, and a
//! raw request for input that a well-behaved client would never send.
//!
//! The command line, the demo, the bench, the end-to-end tests and worker
//! SDKs all speak to the server through this crate, so that the contract is
//! written down once on the client side too.

mod raw;
mod views;
mod worker;

use std::fmt;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::header::{HeaderName, HeaderValue, AUTHORIZATION, CONTENT_TYPE};
use hyper::Request;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client as HyperClient;
use hyper_util::rt::TokioExecutor;
use serde::de::DeserializeOwned;

pub use hyper::header::HeaderMap;
pub use hyper::{Method, StatusCode};
pub use views::{
    EntityData, EntityStatus, EntityView, Event, ListPage, Problem, StepStatus, StepView,
};
pub use worker::{Failure, TaskView, CLAIM_MAX};

/// How long one exchange may take unless [`Client::with_timeout`] says
/// otherwise: long enough for a server under a bench's full load.
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a TCP connect may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Idle keep-alive connections kept per server; a bench's polling and a
/// test's concurrent clients stay well below it.
const POOL_IDLE_PER_HOST_MAX: usize = 256;
/// How long an idle connection is kept.
const POOL_IDLE_TIMEOUT: Duration = Duration::from_secs(30);
/// The most characters of a body quoted in an error message.
const SNIPPET_CHARS_MAX: usize = 300;

/// What can go wrong talking to the server.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The request could not be sent or its answer not read.
    #[error("{method} {url}: {message}")]
    Transport {
        method: String,
        url: String,
        message: String,
    },
    /// No complete answer within the client's timeout.
    #[error("{method} {url}: no answer within {timeout:?}")]
    Timeout {
        method: String,
        url: String,
        timeout: Duration,
    },
    /// The server refused the request with an RFC 9457 problem.
    #[error("the server answered {}: {problem}", response.status)]
    Problem {
        problem: Problem,
        response: Box<Response>,
    },
    /// The server answered something the contract does not describe: an
    /// unexpected status without a problem body, or a body that is not the
    /// expected view.
    #[error("unexpected answer ({}): {message}; body: {}", response.status, snippet(&response.body))]
    Unexpected {
        message: String,
        response: Box<Response>,
    },
    /// The caller asked for a request that cannot be written (a header name
    /// with a space, for instance).
    #[error("cannot build the request: {0}")]
    InvalidRequest(String),
}

impl Error {
    /// The status of the server's answer, when there was one.
    pub fn status(&self) -> Option<StatusCode> {
        self.response().map(|r| r.status)
    }

    /// The server's answer, when there was one.
    pub fn response(&self) -> Option<&Response> {
        match self {
            Error::Problem { response, .. } | Error::Unexpected { response, .. } => Some(response),
            _ => None,
        }
    }

    /// The problem the server answered with, if it answered with one.
    pub fn problem(&self) -> Option<&Problem> {
        match self {
            Error::Problem { problem, .. } => Some(problem),
            _ => None,
        }
    }

    /// The server's `Retry-After`, in whole seconds, when it sent one.
    pub fn retry_after(&self) -> Option<Duration> {
        let value = self.response()?.header("retry-after")?;
        value.trim().parse::<u64>().ok().map(Duration::from_secs)
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// One answer, fully read.
#[derive(Clone)]
pub struct Response {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Response {
    /// A header as text; a value that is not visible ASCII is read lossily.
    pub fn header(&self, name: &str) -> Option<String> {
        self.headers
            .get(name)
            .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
    }

    /// The body as text, lossily.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// The body decoded as `T`.
    pub fn decode<T: DeserializeOwned>(&self) -> Result<T> {
        serde_json::from_slice(&self.body).map_err(|e| Error::Unexpected {
            message: format!("the body is not the expected JSON: {e}"),
            response: Box::new(self.clone()),
        })
    }

    /// Whether the content type is `application/problem+json`.
    pub fn is_problem(&self) -> bool {
        self.header("content-type")
            .is_some_and(|ct| ct.starts_with("application/problem+json"))
    }

    /// `Ok(self)` when the status is `expected`; the problem (or the
    /// unexpected answer) otherwise.
    pub fn expect(self, expected: StatusCode) -> Result<Response> {
        if self.status == expected {
            return Ok(self);
        }
        Err(self.into_error(format!("expected {expected}")))
    }

    /// The error this answer stands for: its problem if it carries one.
    pub fn into_error(self, message: String) -> Error {
        match serde_json::from_slice::<Problem>(&self.body) {
            Ok(problem) if self.is_problem() => Error::Problem {
                problem,
                response: Box::new(self),
            },
            _ => Error::Unexpected {
                message,
                response: Box::new(self),
            },
        }
    }
}

impl fmt::Display for Response {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        const SHOWN_BYTES_MAX: usize = 2000;
        let mut text = self.text();
        if text.len() > SHOWN_BYTES_MAX {
            let mut cut = SHOWN_BYTES_MAX;
            while !text.is_char_boundary(cut) {
                cut -= 1;
            }
            text.truncate(cut);
            text.push('…');
        }
        write!(
            f,
            "status {}, headers {:?}, body {}",
            self.status.as_u16(),
            self.headers,
            text
        )
    }
}

impl fmt::Debug for Response {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// The answer to a submission.
#[derive(Debug, Clone)]
pub struct Submitted {
    pub view: EntityView,
    /// `Idempotent-Replayed: true`: the key was used before, and the view is
    /// the entity it created.
    pub replayed: bool,
    /// The `Location` header, `/v1/entities/{id}`.
    pub location: Option<String>,
}

/// The filters of `GET /v1/entities`.
#[derive(Debug, Clone, Default)]
pub struct ListQuery<'a> {
    pub type_name: Option<&'a str>,
    pub status: Option<EntityStatus>,
    pub limit: Option<u32>,
    /// The `next` cursor of the previous page.
    pub after: Option<&'a str>,
}

impl ListQuery<'_> {
    /// The path with its query string.
    pub fn path(&self) -> String {
        let mut params = Vec::new();
        if let Some(t) = self.type_name {
            params.push(format!("type={}", percent_encode(t)));
        }
        if let Some(s) = self.status {
            params.push(format!("status={s}"));
        }
        if let Some(l) = self.limit {
            params.push(format!("limit={l}"));
        }
        if let Some(a) = self.after {
            params.push(format!("after={}", percent_encode(a)));
        }
        if params.is_empty() {
            "/v1/entities".to_owned()
        } else {
            format!("/v1/entities?{}", params.join("&"))
        }
    }
}

/// A client of one server. Clones share their connections and their base
/// URL, so that [`Client::set_base`] after a server restart on another port
/// redirects every clone.
#[derive(Clone)]
pub struct Client {
    base: Arc<RwLock<String>>,
    inner: HyperClient<HttpConnector, Full<Bytes>>,
    timeout: Duration,
    /// `Authorization: Bearer {key}` for every request, when an API key is set.
    authorization: Option<HeaderValue>,
}

impl fmt::Debug for Client {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Client")
            .field("base", &self.base())
            .field("timeout", &self.timeout)
            .field("api_key", &self.authorization.as_ref().map(|_| "(set)"))
            .finish_non_exhaustive()
    }
}

impl Client {
    /// `base` is the server's root URL, such as `http://127.0.0.1:8080`.
    pub fn new(base: &str) -> Client {
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        connector.set_connect_timeout(Some(CONNECT_TIMEOUT));
        let inner = HyperClient::builder(TokioExecutor::new())
            .pool_idle_timeout(POOL_IDLE_TIMEOUT)
            .pool_max_idle_per_host(POOL_IDLE_PER_HOST_MAX)
            .build(connector);
        Client {
            base: Arc::new(RwLock::new(trim_base(base))),
            inner,
            timeout: DEFAULT_TIMEOUT,
            authorization: None,
        }
    }

    /// The same client sending `Authorization: Bearer {key}` with every
    /// request (a request that names its own `authorization` keeps it).
    /// Fails for a key that cannot be a header value (a control character).
    pub fn with_api_key(mut self, key: &str) -> Result<Client> {
        let mut value = HeaderValue::from_str(&format!("Bearer {key}")).map_err(|_| {
            Error::InvalidRequest(
                "the API key has a character that cannot be sent in a header".into(),
            )
        })?;
        value.set_sensitive(true);
        self.authorization = Some(value);
        Ok(self)
    }

    /// The same client with another limit on each exchange.
    pub fn with_timeout(mut self, timeout: Duration) -> Client {
        self.timeout = timeout;
        self
    }

    /// The root URL, such as `http://127.0.0.1:4321`.
    pub fn base(&self) -> String {
        self.base.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Points this client and all its clones at another root URL.
    pub fn set_base(&self, base: &str) {
        *self.base.write().unwrap_or_else(|e| e.into_inner()) = trim_base(base);
    }

    /// `host:port` of the server.
    pub fn authority(&self) -> String {
        let base = self.base();
        base.trim_start_matches("http://")
            .trim_start_matches("https://")
            .to_owned()
    }

    /// Sends one request on a pooled keep-alive connection. A body without a
    /// `content-type` header is sent as `application/json`.
    pub async fn request(
        &self,
        method: Method,
        path: &str,
        headers: &[(&str, &str)],
        body: Option<Bytes>,
    ) -> Result<Response> {
        self.request_within(method, path, headers, body, self.timeout)
            .await
    }

    /// [`Client::request`] with its own limit on the exchange, for a call
    /// that the server may hold open on purpose (a long-poll claim).
    async fn request_within(
        &self,
        method: Method,
        path: &str,
        headers: &[(&str, &str)],
        body: Option<Bytes>,
        timeout: Duration,
    ) -> Result<Response> {
        let url = format!("{}{}", self.base(), path);
        let mut req = Request::builder().method(method.clone()).uri(&url);
        let has_content_type = headers
            .iter()
            .any(|(k, _)| k.eq_ignore_ascii_case("content-type"));
        if body.is_some() && !has_content_type {
            req = req.header(CONTENT_TYPE, "application/json");
        }
        if let Some(auth) = &self.authorization {
            if !headers
                .iter()
                .any(|(k, _)| k.eq_ignore_ascii_case("authorization"))
            {
                req = req.header(AUTHORIZATION, auth.clone());
            }
        }
        for (name, value) in headers {
            let name = HeaderName::from_bytes(name.as_bytes())
                .map_err(|e| Error::InvalidRequest(format!("header name {name:?}: {e}")))?;
            let value = HeaderValue::from_str(value)
                .map_err(|e| Error::InvalidRequest(format!("header {name} value: {e}")))?;
            req = req.header(name, value);
        }
        let req = req
            .body(Full::new(body.unwrap_or_default()))
            .map_err(|e| Error::InvalidRequest(e.to_string()))?;
        let transport = |message: String| Error::Transport {
            method: method.to_string(),
            url: url.clone(),
            message,
        };
        let exchange = async {
            let resp = self
                .inner
                .request(req)
                .await
                .map_err(|e| transport(format!("send: {}", error_chain(&e))))?;
            let (parts, body) = resp.into_parts();
            let body = body
                .collect()
                .await
                .map_err(|e| transport(format!("read the answer: {}", error_chain(&e))))?
                .to_bytes();
            Ok(Response {
                status: parts.status,
                headers: parts.headers,
                body,
            })
        };
        match tokio::time::timeout(timeout, exchange).await {
            Ok(result) => result,
            Err(_) => Err(Error::Timeout {
                method: method.to_string(),
                url,
                timeout,
            }),
        }
    }

    /// Sends bytes as they are, on a fresh connection that is closed after
    /// the answer, for tests of hostile input: any method, path and headers,
    /// a body framed by the caller (with `transfer-encoding`) or by a
    /// `content-length` this adds. The body is written while the answer is
    /// read, so that a server that answers before reading it all (413) is
    /// still heard.
    pub async fn raw_request(
        &self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: Vec<u8>,
    ) -> Result<Response> {
        let authority = self.authority();
        let url = format!("{}{}", self.base(), path);
        match tokio::time::timeout(
            self.timeout,
            raw::exchange(&authority, method, path, headers, body),
        )
        .await
        {
            Ok(Ok(resp)) => Ok(resp),
            Ok(Err(message)) => Err(Error::Transport {
                method: method.to_owned(),
                url,
                message,
            }),
            Err(_) => Err(Error::Timeout {
                method: method.to_owned(),
                url,
                timeout: self.timeout,
            }),
        }
    }

    async fn get_raw(&self, path: &str) -> Result<Response> {
        self.request(Method::GET, path, &[("accept", "application/json")], None)
            .await
    }

    /// `POST /v1/entities/{type}` with the payload bytes as they are.
    pub async fn submit(
        &self,
        type_name: &str,
        payload: impl Into<Bytes>,
        idempotency_key: Option<&str>,
    ) -> Result<Submitted> {
        let mut headers = Vec::new();
        if let Some(key) = idempotency_key {
            headers.push(("idempotency-key", key));
        }
        let resp = self
            .request(
                Method::POST,
                &format!("/v1/entities/{}", percent_encode(type_name)),
                &headers,
                Some(payload.into()),
            )
            .await?
            .expect(StatusCode::ACCEPTED)?;
        Ok(Submitted {
            view: resp.decode()?,
            replayed: resp.header("idempotent-replayed").as_deref() == Some("true"),
            location: resp.header("location"),
        })
    }

    /// `GET /v1/entities/{id}`.
    pub async fn get(&self, id: &str) -> Result<EntityView> {
        self.get_raw(&format!("/v1/entities/{}", percent_encode(id)))
            .await?
            .expect(StatusCode::OK)?
            .decode()
    }

    /// `GET /v1/entities/{id}/data`: the consumable entity once `ready`; a
    /// 409 problem with `entity_status` before.
    pub async fn data(&self, id: &str) -> Result<EntityData> {
        self.get_raw(&format!("/v1/entities/{}/data", percent_encode(id)))
            .await?
            .expect(StatusCode::OK)?
            .decode()
    }

    /// `GET /v1/entities?type=&status=&limit=&after=`.
    pub async fn list(&self, query: &ListQuery<'_>) -> Result<ListPage> {
        self.get_raw(&query.path())
            .await?
            .expect(StatusCode::OK)?
            .decode()
    }

    /// `GET /v1/entities/{id}/events`: the history after sequence number
    /// `after`, at most `limit` events. Both are sent as query parameters and
    /// applied here too, so that a server that answers the whole history
    /// gives the same result.
    pub async fn events(
        &self,
        id: &str,
        after: Option<u64>,
        limit: Option<usize>,
    ) -> Result<Vec<Event>> {
        let mut path = format!("/v1/entities/{}/events", percent_encode(id));
        let mut params = Vec::new();
        if let Some(after) = after {
            params.push(format!("after={after}"));
        }
        if let Some(limit) = limit {
            params.push(format!("limit={limit}"));
        }
        if !params.is_empty() {
            path = format!("{path}?{}", params.join("&"));
        }
        let mut events: Vec<Event> = self
            .get_raw(&path)
            .await?
            .expect(StatusCode::OK)?
            .decode()?;
        if let Some(after) = after {
            events.retain(|e| e.seq > after);
        }
        if let Some(limit) = limit {
            events.truncate(limit);
        }
        Ok(events)
    }

    /// `POST /v1/entities/{id}/cancel`: a pending entity becomes `cancelled`.
    pub async fn cancel(&self, id: &str) -> Result<EntityView> {
        self.command(id, "cancel").await
    }

    /// `POST /v1/entities/{id}/retry`: a failed entity's failed and skipped
    /// steps are queued again.
    pub async fn retry(&self, id: &str) -> Result<EntityView> {
        self.command(id, "retry").await
    }

    async fn command(&self, id: &str, verb: &str) -> Result<EntityView> {
        self.request(
            Method::POST,
            &format!("/v1/entities/{}/{verb}", percent_encode(id)),
            &[],
            None,
        )
        .await?
        .expect(StatusCode::ACCEPTED)?
        .decode()
    }

    /// `GET /healthz`: whether the process is up.
    pub async fn healthz(&self) -> Result<bool> {
        Ok(self.get_raw("/healthz").await?.status == StatusCode::OK)
    }

    /// `GET /readyz`: whether the server can reach its store.
    pub async fn readyz(&self) -> Result<bool> {
        Ok(self.get_raw("/readyz").await?.status == StatusCode::OK)
    }
}

fn trim_base(base: &str) -> String {
    base.trim_end_matches('/').to_owned()
}

/// An error and its sources, which hyper keeps apart.
fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(e) = source {
        text.push_str(": ");
        text.push_str(&e.to_string());
        source = e.source();
    }
    text
}

/// The start of a body, for error messages.
pub fn snippet(body: &[u8]) -> String {
    let text = String::from_utf8_lossy(body);
    let mut snippet: String = text.chars().take(SNIPPET_CHARS_MAX).collect();
    if text.chars().count() > SNIPPET_CHARS_MAX {
        snippet.push('…');
    }
    snippet
}

/// Percent-encodes everything but RFC 3986's unreserved characters, for a
/// path segment or a query value.
pub fn percent_encode(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for byte in value.bytes() {
        if byte.is_ascii_alphanumeric() || matches!(byte, b'-' | b'.' | b'_' | b'~') {
            out.push(byte as char);
        } else {
            out.push_str(&format!("%{byte:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn list_query_encodes_its_filters() {
        assert_eq!(ListQuery::default().path(), "/v1/entities");
        let q = ListQuery {
            type_name: Some("w5"),
            status: Some(EntityStatus::Pending),
            limit: Some(10),
            after: Some("a+b"),
        };
        assert_eq!(
            q.path(),
            "/v1/entities?type=w5&status=pending&limit=10&after=a%2Bb"
        );
    }

    #[test]
    fn an_api_key_is_a_bearer_token_that_debug_output_hides() {
        let client = Client::new("http://127.0.0.1:1")
            .with_api_key("k-123")
            .expect("a visible key");
        assert_eq!(
            client.authorization.as_ref().map(|v| v.to_str().ok()),
            Some(Some("Bearer k-123"))
        );
        assert!(!format!("{client:?}").contains("k-123"));
        assert!(Client::new("http://127.0.0.1:1")
            .with_api_key("k\n1")
            .is_err());
    }

    #[test]
    fn percent_encoding_keeps_unreserved() {
        assert_eq!(percent_encode("a-b_c.d~9"), "a-b_c.d~9");
        assert_eq!(percent_encode("x+y/z="), "x%2By%2Fz%3D");
    }

    #[test]
    fn a_problem_answer_becomes_a_problem_error() {
        let mut headers = HeaderMap::new();
        headers.insert(
            "content-type",
            HeaderValue::from_static("application/problem+json"),
        );
        let resp = Response {
            status: StatusCode::NOT_FOUND,
            headers,
            body: Bytes::from_static(
                br#"{"type":"urn:ripen:problem:not-found","title":"Not found","status":404,"detail":"no entity x"}"#,
            ),
        };
        let error = resp.expect(StatusCode::OK).unwrap_err();
        assert_eq!(error.status(), Some(StatusCode::NOT_FOUND));
        assert_eq!(error.problem().unwrap().detail, "no entity x");
    }
}
