//! `SafeClient` against real local servers: what reaches them, what never
//! does (refused addresses, redirect targets, rebound names), timeouts, and
//! TLS with the host name as SNI.

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use ripen_notify::client::{PostError, SafeClient, Stage, SNIPPET_BYTES_MAX};
use ripen_notify::ssrf::{check, Lookup, Policy, Resolve, SystemResolver, TableResolver};
use ripen_tls::rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use ripen_tls::rustls::{RootCertStore, ServerConfig};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

const SECOND: Duration = Duration::from_secs(1);

/// A request as the server read it off the socket.
#[derive(Clone, Debug)]
struct Seen {
    head: String,
    body: Vec<u8>,
    /// The SNI name of a TLS connection.
    sni: Option<String>,
}

impl Seen {
    fn header(&self, name: &str) -> Option<&str> {
        self.head.lines().skip(1).find_map(|line| {
            let (n, v) = line.split_once(':')?;
            n.eq_ignore_ascii_case(name).then(|| v.trim())
        })
    }
}

/// A tiny HTTP/1.1 server on a real socket: it counts connections, records
/// requests and answers each with `reply` (or never, if `reply` is `None`).
struct Server {
    addr: SocketAddr,
    connections: Arc<AtomicUsize>,
    seen: Arc<Mutex<Vec<Seen>>>,
    task: JoinHandle<()>,
}

impl Server {
    async fn start(bind: &str, reply: Option<String>) -> Server {
        Server::start_tls(bind, reply, None).await
    }

    async fn start_tls(bind: &str, reply: Option<String>, tls: Option<ServerConfig>) -> Server {
        let listener = TcpListener::bind(bind).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let connections = Arc::new(AtomicUsize::new(0));
        let seen = Arc::new(Mutex::new(Vec::new()));
        let acceptor = tls.map(|c| tokio_rustls::TlsAcceptor::from(Arc::new(c)));
        let task = tokio::spawn({
            let (connections, seen) = (connections.clone(), seen.clone());
            async move {
                loop {
                    let Ok((stream, _)) = listener.accept().await else {
                        return;
                    };
                    connections.fetch_add(1, Ordering::SeqCst);
                    let (seen, reply, acceptor) = (seen.clone(), reply.clone(), acceptor.clone());
                    tokio::spawn(async move {
                        match acceptor {
                            None => serve(stream, None, seen, reply).await,
                            Some(acceptor) => {
                                // A failed handshake is the client's refusal.
                                if let Ok(tls) = acceptor.accept(stream).await {
                                    let sni = tls.get_ref().1.server_name().map(str::to_owned);
                                    serve(tls, sni, seen, reply).await;
                                }
                            }
                        }
                    });
                }
            }
        });
        Server {
            addr,
            connections,
            seen,
            task,
        }
    }

    fn connections(&self) -> usize {
        self.connections.load(Ordering::SeqCst)
    }

    fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn serve<S: AsyncRead + AsyncWrite + Unpin>(
    mut stream: S,
    sni: Option<String>,
    seen: Arc<Mutex<Vec<Seen>>>,
    reply: Option<String>,
) {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    let head_end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        match stream.read(&mut chunk).await {
            Ok(0) | Err(_) => return,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
    let length: usize = head
        .lines()
        .find_map(|l| {
            let (n, v) = l.split_once(':')?;
            n.eq_ignore_ascii_case("content-length")
                .then(|| v.trim().parse().ok())?
        })
        .unwrap_or(0);
    while buf.len() < head_end + length {
        match stream.read(&mut chunk).await {
            Ok(0) | Err(_) => break,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
    let body = buf[head_end..].to_vec();
    seen.lock().unwrap().push(Seen { head, body, sni });
    match reply {
        Some(reply) => {
            let _ = stream.write_all(reply.as_bytes()).await;
            let _ = stream.shutdown().await;
        }
        None => std::future::pending::<()>().await,
    }
}

fn ok_reply(body: &str) -> Option<String> {
    Some(format!(
        "HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    ))
}

fn ip(text: &str) -> IpAddr {
    text.parse().unwrap()
}

fn loopback_allowed() -> Policy {
    Policy::new(&["127.0.0.0/8".into()]).unwrap()
}

fn client(policy: Policy, resolver: impl Resolve + 'static) -> SafeClient {
    SafeClient::new(
        policy,
        Arc::new(resolver),
        ripen_notify::client::default_tls(),
    )
}

#[tokio::test]
async fn an_allowed_post_reaches_the_server_with_its_headers_and_body() {
    let server = Server::start("127.0.0.1:0", ok_reply("thanks")).await;
    let resolver = TableResolver::new().with("hooks.test", &[ip("127.0.0.1")]);
    let client = client(loopback_allowed(), resolver);
    let url = format!("http://Hooks.Test:{}/in?team=7", server.addr.port());
    let body = Bytes::from_static(br#"{"entity":"m-1","status":"ready"}"#);
    let answer = client
        .post(
            &url,
            &[
                ("Content-Type", "application/json"),
                ("X-Ripen-Signature", "t=1,v1=abc"),
            ],
            body.clone(),
            5 * SECOND,
        )
        .await
        .unwrap();
    assert_eq!(answer.status, 200);
    assert_eq!(answer.body_snippet, "thanks");
    assert_eq!(answer.retry_after, None);

    let seen = server.seen();
    assert_eq!(seen.len(), 1);
    let request = &seen[0];
    assert!(
        request.head.starts_with("POST /in?team=7 HTTP/1.1\r\n"),
        "{}",
        request.head
    );
    let host = format!("hooks.test:{}", server.addr.port());
    assert_eq!(request.header("host"), Some(host.as_str()));
    assert_eq!(request.header("content-type"), Some("application/json"));
    assert_eq!(request.header("x-ripen-signature"), Some("t=1,v1=abc"));
    assert!(request.header("user-agent").unwrap().starts_with("ripen/"));
    assert_eq!(request.body, body.to_vec());
}

#[tokio::test]
async fn without_the_allowance_the_post_is_refused_and_nothing_connects() {
    let server = Server::start("127.0.0.1:0", ok_reply("")).await;
    let port = server.addr.port();
    let resolver = TableResolver::new().with("hooks.test", &[ip("127.0.0.1")]);
    let client = client(Policy::default(), resolver);
    for url in [
        format!("http://127.0.0.1:{port}/"),
        format!("http://0x7f.1:{port}/"),
        format!("http://hooks.test:{port}/"),
    ] {
        let e = client
            .post(&url, &[], Bytes::new(), 5 * SECOND)
            .await
            .unwrap_err();
        match &e {
            PostError::Refused(refusal) => assert_eq!(refusal.code(), "loopback", "{url}"),
            other => panic!("{url}: {other:?}"),
        }
        assert!(e.to_string().contains("notify.allow_networks"), "{e}");
    }
    assert_eq!(server.connections(), 0);
}

#[tokio::test]
async fn a_redirect_is_answered_not_followed() {
    let elsewhere = Server::start("127.0.0.1:0", ok_reply("")).await;
    let location = format!("http://127.0.0.1:{}/stolen", elsewhere.addr.port());
    let redirecting = Server::start(
        "127.0.0.1:0",
        Some(format!(
            "HTTP/1.1 302 Found\r\nlocation: {location}\r\ncontent-length: 0\r\n\r\n"
        )),
    )
    .await;
    let client = client(loopback_allowed(), TableResolver::new());
    let url = format!("http://127.0.0.1:{}/hook", redirecting.addr.port());
    let answer = client
        .post(&url, &[], Bytes::from_static(b"{}"), 5 * SECOND)
        .await
        .unwrap();
    assert_eq!(answer.status, 302);
    assert_eq!(redirecting.seen().len(), 1);
    assert_eq!(elsewhere.connections(), 0);
}

#[tokio::test]
async fn retry_after_and_a_long_body_are_read_within_limits() {
    let long = "é".repeat(2000);
    let server = Server::start(
        "127.0.0.1:0",
        Some(format!(
            "HTTP/1.1 503 Service Unavailable\r\nretry-after: 30\r\ncontent-length: {}\r\n\r\n{long}",
            long.len()
        )),
    )
    .await;
    let client = client(loopback_allowed(), TableResolver::new());
    let url = format!("http://127.0.0.1:{}/", server.addr.port());
    let answer = client
        .post(&url, &[], Bytes::new(), 5 * SECOND)
        .await
        .unwrap();
    assert_eq!(answer.status, 503);
    assert_eq!(answer.retry_after, Some(Duration::from_secs(30)));
    assert_eq!(answer.body_snippet, "é".repeat(SNIPPET_BYTES_MAX / 2));
}

/// Answers from a script, one answer per lookup, and counts lookups.
struct Rebinding {
    answers: Vec<Vec<SocketAddr>>,
    lookups: AtomicUsize,
}

impl Resolve for Rebinding {
    fn resolve<'a>(&'a self, _host: &'a str, _port: u16) -> Lookup<'a> {
        let i = self.lookups.fetch_add(1, Ordering::SeqCst);
        let answer = self.answers.get(i).cloned().ok_or_else(|| {
            io::Error::new(io::ErrorKind::NotFound, "the script has no more answers")
        });
        Box::pin(std::future::ready(answer))
    }
}

#[tokio::test]
async fn a_rebound_name_never_reaches_the_address_it_rebinds_to() {
    // The name answers a public address first and 127.0.0.1 afterwards.
    // The client connects only where its own check said, so the loopback
    // server is never reached, and the next call is refused.
    let victim = Server::start("127.0.0.1:0", ok_reply("")).await;
    let port = victim.addr.port();
    let resolver = Arc::new(Rebinding {
        answers: vec![
            vec![SocketAddr::new(ip("93.184.215.14"), port)],
            vec![SocketAddr::new(ip("93.184.215.14"), port)],
            vec![SocketAddr::new(ip("127.0.0.1"), port)],
        ],
        lookups: AtomicUsize::new(0),
    });
    let client = SafeClient::new(
        Policy::default(),
        resolver.clone(),
        ripen_notify::client::default_tls(),
    );
    let url = format!("http://rebind.test:{port}/");
    // Registration: the name looks public.
    assert!(client.check(&url).await.is_ok());
    // Delivery: checked again, public again; the attempt goes to the public
    // address (unreachable from here, or not listening), never to loopback.
    let e = client
        .post(&url, &[], Bytes::new(), SECOND)
        .await
        .unwrap_err();
    assert!(
        matches!(e, PostError::Connect(_) | PostError::Timeout { .. }),
        "{e:?}"
    );
    // Next delivery: the name now answers 127.0.0.1, and is refused.
    let e = client
        .post(&url, &[], Bytes::new(), SECOND)
        .await
        .unwrap_err();
    match e {
        PostError::Refused(refusal) => assert_eq!(refusal.code(), "loopback"),
        other => panic!("{other:?}"),
    }
    assert_eq!(resolver.lookups.load(Ordering::SeqCst), 3);
    assert_eq!(victim.connections(), 0);
}

#[tokio::test]
async fn one_post_connects_to_the_address_its_check_approved() {
    // 127.0.0.1 is allowed, 127.0.0.2 is not, and both listen on the same
    // port. The name answers .1 first and .2 on any later lookup: a client
    // that looked the name up again to connect would reach .2.
    let approved = Server::start("127.0.0.1:0", ok_reply("approved")).await;
    let port = approved.addr.port();
    let Ok(other) = TcpListener::bind(("127.0.0.2", port)).await else {
        // The port is taken on 127.0.0.2; nothing to compare against.
        return;
    };
    drop(other);
    let rebound = Server::start(&format!("127.0.0.2:{port}"), ok_reply("rebound")).await;
    let resolver = Arc::new(Rebinding {
        answers: vec![
            vec![SocketAddr::new(ip("127.0.0.1"), port)],
            vec![SocketAddr::new(ip("127.0.0.2"), port)],
        ],
        lookups: AtomicUsize::new(0),
    });
    let client = SafeClient::new(
        Policy::new(&["127.0.0.1/32".into()]).unwrap(),
        resolver.clone(),
        ripen_notify::client::default_tls(),
    );
    let url = format!("http://rebind.test:{port}/");
    let answer = client
        .post(&url, &[], Bytes::new(), 5 * SECOND)
        .await
        .unwrap();
    assert_eq!(answer.body_snippet, "approved");
    assert_eq!(resolver.lookups.load(Ordering::SeqCst), 1);
    let e = client
        .post(&url, &[], Bytes::new(), 5 * SECOND)
        .await
        .unwrap_err();
    assert!(matches!(e, PostError::Refused(_)), "{e:?}");
    assert_eq!(approved.connections(), 1);
    assert_eq!(rebound.connections(), 0);
}

#[tokio::test]
async fn a_server_that_never_answers_hits_the_timeout() {
    let server = Server::start("127.0.0.1:0", None).await;
    let client = client(loopback_allowed(), TableResolver::new());
    let url = format!("http://127.0.0.1:{}/", server.addr.port());
    let started = Instant::now();
    let e = client
        .post(
            &url,
            &[],
            Bytes::from_static(b"{}"),
            Duration::from_millis(300),
        )
        .await
        .unwrap_err();
    let took = started.elapsed();
    assert_eq!(
        e,
        PostError::Timeout {
            after: Duration::from_millis(300),
            during: Stage::Answer
        }
    );
    assert!(
        took >= Duration::from_millis(300) && took < 3 * SECOND,
        "{took:?}"
    );
    // The request was sent; only the answer never came.
    assert_eq!(server.seen().len(), 1);
}

#[tokio::test]
async fn a_closed_port_is_a_connect_error_naming_the_address() {
    let port = {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        listener.local_addr().unwrap().port()
    };
    let client = client(loopback_allowed(), TableResolver::new());
    let e = client
        .post(
            &format!("http://127.0.0.1:{port}/"),
            &[],
            Bytes::new(),
            5 * SECOND,
        )
        .await
        .unwrap_err();
    match e {
        PostError::Connect(message) => {
            assert!(
                message.starts_with(&format!(
                    "cannot connect to 127.0.0.1 port {port}: 127.0.0.1:{port}: "
                )),
                "{message}"
            )
        }
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn the_system_resolver_sees_localhost_as_loopback() {
    let refused = check("http://localhost/", &Policy::default(), &SystemResolver).await;
    assert_eq!(refused.map(|_| ()).map_err(|r| r.code()), Err("loopback"));
}

fn tls_server_config(name: &str) -> (ServerConfig, CertificateDer<'static>) {
    let certified = rcgen::generate_simple_self_signed(vec![name.to_owned()]).unwrap();
    let cert = certified.cert.der().clone();
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(certified.key_pair.serialize_der()));
    let config = ServerConfig::builder_with_provider(ripen_tls::provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(vec![cert.clone()], key)
        .unwrap();
    (config, cert)
}

#[tokio::test]
async fn https_sends_the_host_name_as_sni_and_checks_the_certificate() {
    let (config, cert) = tls_server_config("hooks.test");
    let server = Server::start_tls("127.0.0.1:0", ok_reply("over tls"), Some(config)).await;
    let port = server.addr.port();
    let mut roots = RootCertStore::empty();
    roots.add(cert).unwrap();
    let trusting =
        ripen_tls::client_config_verifying(ripen_tls::Verify::ChainAndName, Arc::new(roots));
    let resolver = Arc::new(
        TableResolver::new()
            .with("hooks.test", &[ip("127.0.0.1")])
            .with("other.test", &[ip("127.0.0.1")]),
    );
    let client = SafeClient::new(loopback_allowed(), resolver.clone(), trusting);
    let answer = client
        .post(
            &format!("https://hooks.test:{port}/in"),
            &[],
            Bytes::from_static(b"{}"),
            5 * SECOND,
        )
        .await
        .unwrap();
    assert_eq!(answer.status, 200);
    assert_eq!(answer.body_snippet, "over tls");
    assert_eq!(server.seen()[0].sni.as_deref(), Some("hooks.test"));

    // The certificate does not name other.test.
    let e = client
        .post(
            &format!("https://other.test:{port}/in"),
            &[],
            Bytes::new(),
            5 * SECOND,
        )
        .await
        .unwrap_err();
    assert!(
        matches!(&e, PostError::Tls(m) if m.contains("other.test")),
        "{e:?}"
    );

    // A client with the system's roots does not trust the certificate.
    let system = SafeClient::new(
        loopback_allowed(),
        resolver,
        ripen_notify::client::default_tls(),
    );
    let e = system
        .post(
            &format!("https://hooks.test:{port}/in"),
            &[],
            Bytes::new(),
            5 * SECOND,
        )
        .await
        .unwrap_err();
    assert!(
        matches!(&e, PostError::Tls(m) if m.contains("invalid peer certificate")),
        "{e:?}"
    );
    assert_eq!(server.seen().len(), 1);
}

#[test]
fn the_post_future_can_be_spawned() {
    fn assert_send<T: Send>(_: &T) {}
    let client = client(Policy::default(), TableResolver::new());
    let future = client.post("http://public.test/", &[], Bytes::new(), SECOND);
    assert_send(&future);
}
