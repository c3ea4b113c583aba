//! The accept loop: every HTTP/1.1 connection of the API, with the
//! timeouts and the cap of `[limits]`.
//!
//! Per connection, one watchdog knows what the connection is doing:
//!
//! - **reading a head**: from the accept, or from the first byte of a next
//!   request, the head must arrive whole within `header_timeout`, or the
//!   connection is closed (a slowloris client holds nothing for long);
//! - **serving**: from the head to the end of the response body no timeout
//!   of this module applies; the handler bounds its body read
//!   (`body_timeout`, 408), and long polls and event streams live as long
//!   as they are meant to;
//! - **idle**: a keep-alive connection with nothing in flight is closed
//!   after `idle_timeout`.
//!
//! The reader and the service only write the phase down (an uncontended
//! lock, no wake-up): the watchdog looks at it when a deadline it armed
//! comes, and at least once every `header_timeout`, so a request costs no
//! timer of its own and every timeout still fires on time (a head that
//! started between two looks is judged by its own start).
//!
//! Past `connections_max` open connections, a new one is answered 503
//! `overloaded` with `Retry-After: 1` and closed; when even those answers
//! are too many at once, it is closed at once.
//!
//! With a TLS configuration every connection is HTTPS: its handshake must
//! end within `header_timeout` too.
//!
//! A graceful shutdown stops accepting, lets every connection finish the
//! request it serves and closes idle ones; the caller bounds how long that
//! may take by dropping the future.

use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::Body;
use axum::response::IntoResponse;
use axum::Router;
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use ripen_engine::limits::Limits;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_rustls::rustls::ServerConfig;
use tokio_rustls::TlsAcceptor;

/// Connections over the cap that may be answered 503 at once; past them a
/// new connection is closed without an answer.
const OVERFLOW_MAX: usize = 64;
/// How long an over-the-cap connection may take to send its head and read
/// its 503.
const OVERFLOW_TIMEOUT: Duration = Duration::from_secs(1);

/// Serves `router` on `listener` (HTTPS with `tls`) until `stop` turns
/// true, then closes every connection gracefully and returns once they are
/// all closed.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    limits: Limits,
    tls: Option<Arc<ServerConfig>>,
    mut stop: watch::Receiver<bool>,
) -> std::io::Result<()> {
    let tls = tls.map(TlsAcceptor::from);
    let open = Arc::new(AtomicUsize::new(0));
    let overflow = Arc::new(AtomicUsize::new(0));
    let limits = Arc::new(limits);
    let mut connections = JoinSet::new();
    loop {
        while connections.try_join_next().is_some() {}
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            _ = stop.wait_for(|s| *s) => break,
        };
        let (stream, _peer) = match accepted {
            Ok(accepted) => accepted,
            Err(e) => {
                // Out of file descriptors, or a connection reset before
                // it was accepted: the listener itself is fine.
                tracing::warn!(error = %e, "accept a connection");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        if open.load(Ordering::Acquire) >= limits.connections_max {
            if overflow.load(Ordering::Acquire) >= OVERFLOW_MAX {
                drop(stream);
                continue;
            }
            let counted = Counted::new(&overflow);
            let tls = tls.clone();
            connections.spawn(async move {
                let _counted = counted;
                let _ = tokio::time::timeout(OVERFLOW_TIMEOUT, async move {
                    match tls {
                        Some(tls) => {
                            if let Ok(stream) = tls.accept(stream).await {
                                refuse(stream).await;
                            }
                        }
                        None => refuse(stream).await,
                    }
                })
                .await;
            });
            continue;
        }
        let counted = Counted::new(&open);
        let router = router.clone();
        let limits = limits.clone();
        let stop = stop.clone();
        let tls = tls.clone();
        connections.spawn(async move {
            let _counted = counted;
            match tls {
                Some(tls) => {
                    let handshake =
                        tokio::time::timeout(limits.header_timeout, tls.accept(stream)).await;
                    match handshake {
                        Ok(Ok(stream)) => serve_connection(stream, router, &limits, stop).await,
                        Ok(Err(e)) => tracing::debug!(error = %e, "TLS handshake failed"),
                        Err(_) => tracing::debug!("TLS handshake timed out"),
                    }
                }
                None => serve_connection(stream, router, &limits, stop).await,
            }
        });
    }
    drop(listener);
    while connections.join_next().await.is_some() {}
    Ok(())
}

/// One connection counted in a counter until dropped.
struct Counted(Arc<AtomicUsize>);

impl Counted {
    fn new(counter: &Arc<AtomicUsize>) -> Counted {
        counter.fetch_add(1, Ordering::AcqRel);
        Counted(counter.clone())
    }
}

impl Drop for Counted {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Answers every request of an over-the-cap connection 503 and closes it.
async fn refuse<S: AsyncRead + AsyncWrite + Unpin + Send + 'static>(stream: S) {
    let service = hyper::service::service_fn(|_request: hyper::Request<Incoming>| async {
        let mut response = crate::limits::overloaded(
            "this node has as many connections open as it serves; try again shortly",
            "connections_max",
        )
        .into_response();
        response.headers_mut().insert(
            axum::http::header::CONNECTION,
            axum::http::HeaderValue::from_static("close"),
        );
        Ok::<_, std::convert::Infallible>(response)
    });
    let conn = hyper::server::conn::http1::Builder::new()
        .keep_alive(false)
        .serve_connection(TokioIo::new(stream), service);
    let _ = conn.await;
}

/// What a connection is doing, as its watchdog sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Waiting for a head that started (or for the first one) at this
    /// instant.
    Head(Instant),
    /// Serving this many requests.
    Serving(usize),
    /// Nothing in flight since this instant.
    Idle(Instant),
}

/// What the watchdog should do now.
#[derive(Debug, PartialEq, Eq)]
enum Verdict {
    Close(&'static str),
    /// Look again at this instant, or when the phase changes.
    WaitUntil(Option<Instant>),
}

impl Phase {
    fn judge(self, now: Instant, header_timeout: Duration, idle_timeout: Duration) -> Verdict {
        match self {
            Phase::Head(since) if now >= since + header_timeout => Verdict::Close("header"),
            Phase::Head(since) => Verdict::WaitUntil(Some(since + header_timeout)),
            Phase::Idle(since) if now >= since + idle_timeout => Verdict::Close("idle"),
            Phase::Idle(since) => Verdict::WaitUntil(Some(since + idle_timeout)),
            Phase::Serving(_) => Verdict::WaitUntil(None),
        }
    }

    /// Bytes arrived.
    fn read(self, now: Instant) -> Phase {
        match self {
            Phase::Idle(_) => Phase::Head(now),
            other => other,
        }
    }

    /// A head arrived whole: a request begins.
    fn begin(self) -> Phase {
        match self {
            Phase::Serving(n) => Phase::Serving(n + 1),
            _ => Phase::Serving(1),
        }
    }

    /// A response was sent whole (or given up).
    fn end(self, now: Instant) -> Phase {
        match self {
            Phase::Serving(n) if n > 1 => Phase::Serving(n - 1),
            Phase::Serving(_) => Phase::Idle(now),
            other => other,
        }
    }
}

/// The phase of one connection, shared by its reader, its service and its
/// watchdog.
struct Watch {
    phase: Mutex<Phase>,
}

impl Watch {
    fn update(&self, f: impl FnOnce(Phase) -> Phase) {
        let mut phase = self.phase.lock().unwrap_or_else(|p| p.into_inner());
        *phase = f(*phase);
    }

    fn get(&self) -> Phase {
        *self.phase.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Ends a request in the watch when the response body is dropped: sent
/// whole, or given up with the connection.
struct Ending(Arc<Watch>);

impl Drop for Ending {
    fn drop(&mut self) {
        self.0.update(|p| p.end(Instant::now()));
    }
}

/// A socket that tells its watch when bytes arrive.
struct Watched<S> {
    stream: S,
    watch: Arc<Watch>,
}

impl<S: AsyncRead + Unpin> AsyncRead for Watched<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.stream).poll_read(cx, buf);
        if matches!(polled, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            self.watch.update(|p| p.read(Instant::now()));
        }
        polled
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Watched<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }
}

async fn serve_connection<S: AsyncRead + AsyncWrite + Unpin + Send + 'static>(
    stream: S,
    router: Router,
    limits: &Limits,
    mut stop: watch::Receiver<bool>,
) {
    let watch = Arc::new(Watch {
        phase: Mutex::new(Phase::Head(Instant::now())),
    });
    let service = {
        let watch = watch.clone();
        hyper::service::service_fn(move |request: hyper::Request<Incoming>| {
            watch.update(Phase::begin);
            let ending = Ending(watch.clone());
            let mut router = router.clone();
            async move {
                let response =
                    tower_service::Service::call(&mut router, request.map(Body::new)).await;
                Ok::<_, std::convert::Infallible>(response.map_or_else(
                    |never| match never {},
                    |r| {
                        r.map(|body| {
                            Body::new(body.map_frame(move |frame| {
                                let _ending = &ending;
                                frame
                            }))
                        })
                    },
                ))
            }
        })
    };
    let io = Watched {
        stream,
        watch: watch.clone(),
    };
    let conn = hyper::server::conn::http1::Builder::new()
        .keep_alive(true)
        .header_read_timeout(None)
        .serve_connection(TokioIo::new(io), service);
    tokio::pin!(conn);
    let look = tokio::time::sleep(limits.header_timeout);
    tokio::pin!(look);
    let mut stopping = false;
    loop {
        let now = Instant::now();
        let verdict = if stopping {
            Verdict::WaitUntil(None)
        } else {
            watch
                .get()
                .judge(now, limits.header_timeout, limits.idle_timeout)
        };
        let until = match verdict {
            Verdict::Close(why) => {
                tracing::debug!(timeout = why, "connection closed");
                return;
            }
            Verdict::WaitUntil(until) => until,
        };
        // Phases change without telling the watchdog, so it looks again
        // within a header timeout whatever it waits for.
        let next = now + limits.header_timeout;
        look.as_mut().reset(until.map_or(next, |at| at.min(next)));
        tokio::select! {
            served = conn.as_mut() => {
                if let Err(e) = served {
                    tracing::debug!(error = %e, "connection ended");
                }
                return;
            }
            () = look.as_mut() => {}
            _ = stop.wait_for(|s| *s), if !stopping => {
                stopping = true;
                conn.as_mut().graceful_shutdown();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HEADER: Duration = Duration::from_secs(10);
    const IDLE: Duration = Duration::from_secs(60);

    #[tokio::test]
    async fn a_head_must_arrive_within_the_header_timeout() {
        let t0 = Instant::now();
        let phase = Phase::Head(t0);
        assert_eq!(
            phase.judge(t0 + Duration::from_secs(9), HEADER, IDLE),
            Verdict::WaitUntil(Some(t0 + HEADER))
        );
        assert_eq!(
            phase.judge(t0 + HEADER, HEADER, IDLE),
            Verdict::Close("header")
        );
    }

    #[tokio::test]
    async fn serving_has_no_timeout_and_idle_has_its_own() {
        let t0 = Instant::now();
        let serving = Phase::Head(t0).begin();
        assert_eq!(serving, Phase::Serving(1));
        assert_eq!(
            serving.judge(t0 + Duration::from_secs(3_600), HEADER, IDLE),
            Verdict::WaitUntil(None)
        );
        let t1 = t0 + Duration::from_secs(5);
        let idle = serving.end(t1);
        assert_eq!(idle, Phase::Idle(t1));
        assert_eq!(
            idle.judge(t1 + HEADER, HEADER, IDLE),
            Verdict::WaitUntil(Some(t1 + IDLE)),
            "an idle connection is not held to the header timeout"
        );
        assert_eq!(idle.judge(t1 + IDLE, HEADER, IDLE), Verdict::Close("idle"));
    }

    #[tokio::test]
    async fn the_first_byte_of_a_next_request_starts_the_header_clock() {
        let t0 = Instant::now();
        let t1 = t0 + Duration::from_secs(30);
        let phase = Phase::Idle(t0).read(t1);
        assert_eq!(phase, Phase::Head(t1));
        assert_eq!(
            phase.judge(t1 + HEADER, HEADER, IDLE),
            Verdict::Close("header")
        );
        // Bytes read while serving (a body, a pipelined head) change nothing.
        assert_eq!(Phase::Serving(1).read(t1), Phase::Serving(1));
    }

    #[tokio::test]
    async fn pipelined_requests_are_counted() {
        let t0 = Instant::now();
        let two = Phase::Head(t0).begin().begin();
        assert_eq!(two, Phase::Serving(2));
        assert_eq!(two.end(t0), Phase::Serving(1));
        assert_eq!(two.end(t0).end(t0), Phase::Idle(t0));
    }
}
