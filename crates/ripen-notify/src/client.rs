//! [`SafeClient`]: the HTTP client for user-supplied URLs.
//!
//! Every call checks its URL again ([`check`]: a fresh resolution) and then
//! connects to one of exactly the addresses that check approved, so a name
//! that answers differently at connect time (DNS rebinding) is never
//! reached. `https` URLs get TLS with the host name as SNI and as the name
//! the certificate must carry. Redirects are not followed: a 3xx is an
//! [`Answer`] like any other. Each call uses a fresh connection, closed
//! when the call returns, and the whole call is bounded by its timeout.

use std::fmt;
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1;
use hyper::header::{
    HeaderName, HeaderValue, CONNECTION, CONTENT_LENGTH, HOST, RETRY_AFTER, TE, TRANSFER_ENCODING,
    UPGRADE, USER_AGENT,
};
use hyper::{Method, Request};
use hyper_util::rt::TokioIo;
use ripen_tls::rustls::pki_types::ServerName;
use ripen_tls::rustls::ClientConfig;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio::time::Instant;
use tokio_rustls::TlsConnector;

use crate::ssrf::{check, Host, Policy, Refusal, Resolve, Scheme, SystemResolver, Target};

/// How much of an answer's body is kept, in bytes.
pub const SNIPPET_BYTES_MAX: usize = 512;
/// The largest answer head read, in bytes.
const HEAD_BYTES_MAX: usize = 64 * 1024;
const USER_AGENT_VALUE: &str = concat!("ripen/", env!("CARGO_PKG_VERSION"));

/// What the server answered. Any status is an answer, 3xx included: the
/// caller decides what counts as delivered.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Answer {
    pub status: u16,
    /// `Retry-After`, as delay-seconds or an HTTP-date, if the server sent
    /// one; not capped.
    pub retry_after: Option<Duration>,
    /// The first [`SNIPPET_BYTES_MAX`] bytes of the body (less if the
    /// deadline came first), as lossy UTF-8.
    pub body_snippet: String,
}

/// What a call was doing when its time ran out.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stage {
    Resolve,
    Connect,
    Tls,
    Answer,
}

impl fmt::Display for Stage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Stage::Resolve => "resolving the host",
            Stage::Connect => "connecting",
            Stage::Tls => "the TLS handshake",
            Stage::Answer => "waiting for the answer",
        })
    }
}

/// Why a call got no [`Answer`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PostError {
    /// The URL is malformed or the policy forbids an address of its host.
    /// Retrying will not help until the URL or `notify.allow_networks`
    /// changes.
    Refused(Refusal),
    /// The host could not be resolved, or no address accepted a connection.
    Connect(String),
    /// The call took longer than its timeout.
    Timeout { after: Duration, during: Stage },
    /// The TLS handshake failed (an untrusted certificate, among others).
    Tls(String),
    /// The request could not be sent, or the answer was not HTTP/1.
    Protocol(String),
}

impl fmt::Display for PostError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PostError::Refused(refusal) => write!(f, "refused: {refusal}"),
            PostError::Connect(problem) => f.write_str(problem),
            PostError::Timeout { after, during } => {
                write!(f, "no answer within {after:?} (timed out {during})")
            }
            PostError::Tls(problem) => f.write_str(problem),
            PostError::Protocol(problem) => f.write_str(problem),
        }
    }
}

impl std::error::Error for PostError {}

/// The HTTP client for user-supplied URLs; see the module documentation.
/// Cheap to share: calls hold no connection between them.
pub struct SafeClient {
    policy: Policy,
    resolver: Arc<dyn Resolve>,
    tls: TlsConnector,
}

/// A client configuration that trusts the system's roots and checks the
/// server's name: what webhooks use unless told otherwise.
pub fn default_tls() -> ClientConfig {
    ripen_tls::client_config_verifying(ripen_tls::Verify::ChainAndName, ripen_tls::system_roots())
}

impl SafeClient {
    /// `tls` is used as given, except that it offers only HTTP/1.1 (ALPN),
    /// the one protocol the client speaks.
    pub fn new(policy: Policy, resolver: Arc<dyn Resolve>, mut tls: ClientConfig) -> SafeClient {
        tls.alpn_protocols = vec![b"http/1.1".to_vec()];
        SafeClient {
            policy,
            resolver,
            tls: TlsConnector::from(Arc::new(tls)),
        }
    }

    /// The system's resolver and [`default_tls`].
    pub fn with_system_defaults(policy: Policy) -> SafeClient {
        SafeClient::new(policy, Arc::new(SystemResolver), default_tls())
    }

    pub fn policy(&self) -> &Policy {
        &self.policy
    }

    /// [`check`] with this client's policy and resolver: whether `url` may
    /// be called now (for instance when a subscription is registered).
    pub async fn check(&self, url: &str) -> Result<Target, Refusal> {
        check(url, &self.policy, &*self.resolver).await
    }

    /// POSTs `body` to `url` with `headers` (besides `Host`,
    /// `Content-Length`, `Connection: close` and a default `User-Agent`,
    /// which the client sets), and reads the answer's status, `Retry-After`
    /// and the start of its body. Everything, resolution included, happens
    /// within `timeout`.
    pub async fn post(
        &self,
        url: &str,
        headers: &[(&str, &str)],
        body: Bytes,
        timeout: Duration,
    ) -> Result<Answer, PostError> {
        let deadline = Instant::now() + timeout;
        let timed_out = |during| PostError::Timeout {
            after: timeout,
            during,
        };
        let headers = request_headers(headers)?;
        let target = within(deadline, self.check(url))
            .await
            .ok_or(timed_out(Stage::Resolve))?
            .map_err(|refusal| match refusal {
                Refusal::Unresolved { .. } => PostError::Connect(refusal.to_string()),
                refusal => PostError::Refused(refusal),
            })?;
        let request = build_request(&target, headers, body)?;
        let tcp = connect(&target, deadline)
            .await?
            .ok_or(timed_out(Stage::Connect))?;
        match target.url.scheme() {
            Scheme::Http => exchange(tcp, request, deadline, &target)
                .await?
                .ok_or(timed_out(Stage::Answer)),
            Scheme::Https => {
                let name = server_name(target.url.host())?;
                let tls = within(deadline, self.tls.connect(name, tcp))
                    .await
                    .ok_or(timed_out(Stage::Tls))?
                    .map_err(|e| tls_error(&e, &target))?;
                exchange(tls, request, deadline, &target)
                    .await?
                    .ok_or(timed_out(Stage::Answer))
            }
        }
    }
}

/// `future`'s output, or `None` if the deadline came first.
async fn within<F: Future>(deadline: Instant, future: F) -> Option<F::Output> {
    tokio::time::timeout_at(deadline, future).await.ok()
}

/// The caller's headers, checked before anything is sent.
fn request_headers(headers: &[(&str, &str)]) -> Result<Vec<(HeaderName, HeaderValue)>, PostError> {
    headers
        .iter()
        .map(|(name, value)| {
            let name = HeaderName::from_bytes(name.as_bytes())
                .map_err(|_| PostError::Protocol(format!("{name:?} is not a valid header name")))?;
            if [
                HOST,
                CONTENT_LENGTH,
                TRANSFER_ENCODING,
                CONNECTION,
                UPGRADE,
                TE,
            ]
            .contains(&name)
            {
                return Err(PostError::Protocol(format!(
                    "the header {name} is set by the client itself; leave it out"
                )));
            }
            let value = HeaderValue::from_str(value).map_err(|_| {
                PostError::Protocol(format!(
                    "the value of the header {name} has characters a header may not hold \
                     (control characters or non-ASCII)"
                ))
            })?;
            Ok((name, value))
        })
        .collect()
}

fn build_request(
    target: &Target,
    headers: Vec<(HeaderName, HeaderValue)>,
    body: Bytes,
) -> Result<Request<Full<Bytes>>, PostError> {
    let has_user_agent = headers.iter().any(|(name, _)| name == USER_AGENT);
    let mut builder = Request::builder()
        .method(Method::POST)
        .uri(target.url.path_and_query())
        .header(HOST, target.url.authority())
        .header(CONTENT_LENGTH, body.len())
        .header(CONNECTION, "close");
    if !has_user_agent {
        builder = builder.header(USER_AGENT, USER_AGENT_VALUE);
    }
    for (name, value) in headers {
        builder = builder.header(name, value);
    }
    builder
        .body(Full::new(body))
        .map_err(|e| PostError::Protocol(format!("cannot build a request for {}: {e}", target.url)))
}

/// A connection to the first of the target's addresses that accepts one,
/// in order; `Ok(None)` if the deadline came first. Each address gets an
/// equal share of the time left, so one that never answers does not starve
/// the next.
async fn connect(target: &Target, deadline: Instant) -> Result<Option<TcpStream>, PostError> {
    let mut failures = Vec::with_capacity(target.addrs.len());
    for (i, addr) in target.addrs.iter().enumerate() {
        let left = u32::try_from(target.addrs.len() - i).unwrap_or(u32::MAX);
        let share = deadline.saturating_duration_since(Instant::now()) / left;
        match within(Instant::now() + share, TcpStream::connect(addr)).await {
            Some(Ok(stream)) => {
                // Only a latency hint; the request works without it.
                let _ = stream.set_nodelay(true);
                return Ok(Some(stream));
            }
            Some(Err(e)) => failures.push(format!("{addr}: {e}")),
            None if Instant::now() >= deadline => return Ok(None),
            None => failures.push(format!("{addr}: no answer within {share:?}")),
        }
    }
    Err(PostError::Connect(format!(
        "cannot connect to {} port {}: {}",
        target.url.host(),
        target.url.port(),
        failures.join("; ")
    )))
}

fn server_name(host: &Host) -> Result<ServerName<'static>, PostError> {
    match host {
        Host::Ip(ip) => Ok(ServerName::IpAddress((*ip).into())),
        Host::Name(name) => {
            let bare = name.strip_suffix('.').unwrap_or(name);
            ServerName::try_from(bare.to_owned()).map_err(|e| {
                PostError::Tls(format!("the host {name} cannot be a TLS server name: {e}"))
            })
        }
    }
}

fn tls_error(e: &std::io::Error, target: &Target) -> PostError {
    let host = target.url.host();
    match ripen_tls::find_tls_error(e) {
        Some(tls) => PostError::Tls(format!(
            "TLS with {host} failed: {}",
            ripen_tls::describe(tls)
        )),
        None => PostError::Tls(format!("the TLS handshake with {host} failed: {e}")),
    }
}

/// Sends the request over `stream` and reads the answer; `Ok(None)` if the
/// deadline came before the answer's head. A deadline or an error while
/// reading the body only shortens the snippet.
async fn exchange<S>(
    stream: S,
    request: Request<Full<Bytes>>,
    deadline: Instant,
    target: &Target,
) -> Result<Option<Answer>, PostError>
where
    S: AsyncRead + AsyncWrite + Unpin + Send,
{
    let host = target.url.host();
    let protocol = |e: hyper::Error| {
        PostError::Protocol(format!(
            "the exchange with {host} failed: {}",
            describe_hyper(&e)
        ))
    };
    let (mut sender, conn) = http1::Builder::new()
        .max_buf_size(HEAD_BYTES_MAX)
        .handshake::<_, Full<Bytes>>(TokioIo::new(stream))
        .await
        .map_err(protocol)?;
    let mut conn = std::pin::pin!(conn);

    let mut head: Option<(u16, Option<Duration>)> = None;
    let mut snippet: Vec<u8> = Vec::new();
    let finished = {
        let talk = async {
            let response = sender.send_request(request).await?;
            let retry_after = response
                .headers()
                .get(RETRY_AFTER)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| retry_after(v, SystemTime::now()));
            head = Some((response.status().as_u16(), retry_after));
            let mut body = response.into_body();
            while snippet.len() < SNIPPET_BYTES_MAX {
                match body.frame().await {
                    Some(Ok(frame)) => {
                        if let Ok(data) = frame.into_data() {
                            let room = SNIPPET_BYTES_MAX - snippet.len();
                            snippet.extend_from_slice(&data[..data.len().min(room)]);
                        }
                    }
                    // The status is what matters; a broken body ends the
                    // snippet.
                    Some(Err(_)) | None => break,
                }
            }
            Ok::<(), hyper::Error>(())
        };
        let mut talk = std::pin::pin!(talk);
        let driven = async {
            tokio::select! {
                biased;
                done = &mut talk => done,
                ended = &mut conn => match ended {
                    Err(e) => Err(e),
                    // The connection closed cleanly; the request's own
                    // result says what became of it.
                    Ok(()) => talk.await,
                },
            }
        };
        within(deadline, driven).await
    };
    let failed = match finished {
        Some(Err(e)) => Some(e),
        Some(Ok(())) | None => None,
    };
    match (head, failed) {
        (Some((status, retry_after)), _) => Ok(Some(Answer {
            status,
            retry_after,
            body_snippet: String::from_utf8_lossy(&snippet).into_owned(),
        })),
        (None, Some(e)) => Err(protocol(e)),
        (None, None) => Ok(None),
    }
}

/// A hyper error with its causes, which hold the useful part ("connection
/// reset by peer").
fn describe_hyper(e: &hyper::Error) -> String {
    let mut text = if e.is_incomplete_message() {
        "the server closed the connection before answering".to_owned()
    } else {
        e.to_string()
    };
    let mut source = std::error::Error::source(e);
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

/// `Retry-After` as delay-seconds or as an HTTP-date (RFC 9110 section
/// 10.2.3); a date in the past is no delay.
pub fn retry_after(value: &str, now: SystemTime) -> Option<Duration> {
    let value = value.trim();
    if let Ok(seconds) = value.parse::<u64>() {
        return Some(Duration::from_secs(seconds));
    }
    let at = httpdate::parse_http_date(value).ok()?;
    Some(at.duration_since(now).unwrap_or(Duration::ZERO))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_after_forms() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000_000);
        assert_eq!(retry_after(" 7 ", now), Some(Duration::from_secs(7)));
        let later = httpdate::fmt_http_date(now + Duration::from_secs(90));
        assert_eq!(retry_after(&later, now), Some(Duration::from_secs(90)));
        let earlier = httpdate::fmt_http_date(now - Duration::from_secs(90));
        assert_eq!(retry_after(&earlier, now), Some(Duration::ZERO));
        assert_eq!(retry_after("soon", now), None);
        assert_eq!(retry_after("-1", now), None);
    }

    #[test]
    fn headers_the_client_sets_are_refused() {
        for name in ["Host", "content-length", "Transfer-Encoding", "connection"] {
            let e = request_headers(&[(name, "x")]).unwrap_err();
            assert!(e.to_string().contains("set by the client itself"), "{e}");
        }
        let e = request_headers(&[("X-Bad", "a\nb")]).unwrap_err();
        assert!(e.to_string().contains("x-bad"), "{e}");
        let e = request_headers(&[("bad name", "x")]).unwrap_err();
        assert!(e.to_string().contains("not a valid header name"), "{e}");
        assert_eq!(
            request_headers(&[("X-Ripen-Signature", "v1=abc")])
                .unwrap()
                .len(),
            1
        );
    }
}
