//! OpenTelemetry traces: one trace per entity, exported over OTLP/HTTP
//! (protobuf) when `OTEL_EXPORTER_OTLP_ENDPOINT` (or
//! `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`) is set and `OTEL_SDK_DISABLED` is
//! not `true`.
//!
//! The trace id of an entity is its id, as in the `traceparent` every step
//! call carries. The intake span is the root; its span id is derived from
//! the entity id, so that every later span names it as parent without
//! storing it. Each attempt this node runs is a child span whose id is
//! derived from the entity, the step and the lease epoch: the same id the
//! step call's `traceparent` carries, so a downstream's spans hang below the
//! attempt that called it. An incoming `traceparent` on intake becomes a
//! span link.
//!
//! Spans leave through a bounded channel to one exporter task that batches
//! them; when the channel is full, spans are dropped (and counted in the
//! log), never waited for. Without an endpoint nothing is built at all.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http_body_util::Full;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use ripen_store::EntityId;
use tokio::sync::mpsc;

/// Spans waiting for the exporter, at most.
const QUEUE_MAX: usize = 8_192;
/// Spans per export request, at most.
const BATCH_MAX: usize = 512;
/// How long a span waits for its batch to fill.
const BATCH_DELAY: Duration = Duration::from_millis(500);
const EXPORT_TIMEOUT: Duration = Duration::from_secs(10);

/// `SpanKind` of OTLP.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Internal = 1,
    Server = 2,
    Client = 3,
    /// A notification sent to a subscriber.
    Producer = 4,
    /// A remote worker's attempt: it pulled the work.
    Consumer = 5,
}

#[derive(Clone, Debug, PartialEq)]
pub enum Value {
    Str(String),
    Int(i64),
    Bool(bool),
}

/// One finished span.
#[derive(Clone, Debug)]
pub struct Span {
    pub trace_id: [u8; 16],
    pub span_id: [u8; 8],
    pub parent: Option<[u8; 8]>,
    pub name: String,
    pub kind: Kind,
    pub start: SystemTime,
    pub end: SystemTime,
    pub attributes: Vec<(&'static str, Value)>,
    /// `Some(message)`: the span's status is an error.
    pub error: Option<String>,
    /// Other spans this one relates to: `(trace id, span id)`.
    pub links: Vec<([u8; 16], [u8; 8])>,
}

/// The trace of an entity: its id.
pub fn trace_id(entity: EntityId) -> [u8; 16] {
    *entity.as_bytes()
}

/// The span id of an entity's intake span, the root of its trace.
pub fn root_span_id(entity: EntityId) -> [u8; 8] {
    span_id_of(&[entity.as_bytes().as_slice(), b"intake"])
}

/// The span id of an attempt: the one its step call's `traceparent` carries.
pub fn attempt_span_id(entity: EntityId, step: usize, epoch: u64) -> [u8; 8] {
    span_id_of(&[
        entity.as_bytes().as_slice(),
        &(step as u64).to_le_bytes(),
        &epoch.to_le_bytes(),
    ])
}

/// The span id of the store commit that recorded an attempt's result.
pub fn commit_span_id(entity: EntityId, step: usize, epoch: u64) -> [u8; 8] {
    span_id_of(&[
        entity.as_bytes().as_slice(),
        &(step as u64).to_le_bytes(),
        &epoch.to_le_bytes(),
        b"commit",
    ])
}

/// The span id of the store commit that claimed an attempt.
pub fn claim_span_id(entity: EntityId, step: usize, epoch: u64) -> [u8; 8] {
    span_id_of(&[
        entity.as_bytes().as_slice(),
        &(step as u64).to_le_bytes(),
        &epoch.to_le_bytes(),
        b"claim",
    ])
}

/// The span of the store commit that recorded the result of attempt
/// `epoch` of `step` (`recorded`: it was not stale), one of `batch`: a
/// child of the attempt's span.
pub fn commit_span(
    entity: EntityId,
    step: usize,
    epoch: u64,
    recorded: bool,
    batch: usize,
    (start, end): (SystemTime, SystemTime),
) -> Span {
    Span {
        trace_id: trace_id(entity),
        span_id: commit_span_id(entity, step, epoch),
        parent: Some(attempt_span_id(entity, step, epoch)),
        name: "store commit".to_owned(),
        kind: Kind::Internal,
        start,
        end,
        attributes: vec![
            ("ripen.entity_id", Value::Str(entity.to_string())),
            ("ripen.recorded", Value::Bool(recorded)),
            ("ripen.batch_size", Value::Int(batch as i64)),
        ],
        error: (!recorded).then(|| "the result was stale: its lease no longer held".to_owned()),
        links: Vec::new(),
    }
}

/// The span id of one attempt to deliver a notification: the one the
/// webhook's `traceparent` carries.
pub fn delivery_span_id(entity: EntityId, delivery: u64, attempt: u32) -> [u8; 8] {
    span_id_of(&[
        entity.as_bytes().as_slice(),
        &delivery.to_le_bytes(),
        &attempt.to_le_bytes(),
        b"delivery",
    ])
}

/// A W3C `traceparent` for a span of an entity's trace.
pub fn traceparent_of(entity: EntityId, span: [u8; 8]) -> String {
    format!(
        "00-{}-{:016x}-01",
        entity.0.simple(),
        u64::from_be_bytes(span)
    )
}

/// A non-zero span id from a hash (FNV-1a, then a finaliser) of `parts`.
fn span_id_of(parts: &[&[u8]]) -> [u8; 8] {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for part in parts {
        for &b in *part {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
        h ^= 0xff;
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h ^= h >> 33;
    h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
    h ^= h >> 33;
    (h | 1).to_be_bytes()
}

/// A W3C `traceparent`: `00-{trace}-{span}-{flags}`, if well formed.
pub fn parse_traceparent(header: &str) -> Option<([u8; 16], [u8; 8])> {
    let mut parts = header.trim().split('-');
    let (version, trace, span, flags) =
        (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
    if version.len() != 2 || version == "ff" || flags.len() != 2 {
        return None;
    }
    let trace: [u8; 16] = hex(trace)?.try_into().ok()?;
    let span: [u8; 8] = hex(span)?.try_into().ok()?;
    if trace == [0; 16] || span == [0; 8] {
        return None;
    }
    Some((trace, span))
}

fn hex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2)
        || !s
            .bytes()
            .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
    {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).ok())
        .collect()
}

/// Where spans go; `None` when tracing is off.
#[derive(Clone)]
pub struct Tracer {
    spans: mpsc::Sender<Span>,
}

impl Tracer {
    /// A tracer from the standard OpenTelemetry variables, and its exporter
    /// task to run; `None` when no endpoint is set or the SDK is disabled.
    pub fn from_env() -> Option<(Tracer, impl std::future::Future<Output = ()>)> {
        if !cfg!(feature = "otel") {
            return None;
        }
        let var = |k: &str| std::env::var(k).ok().filter(|v| !v.trim().is_empty());
        if var("OTEL_SDK_DISABLED").is_some_and(|v| v.trim().eq_ignore_ascii_case("true")) {
            return None;
        }
        let url = match var("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") {
            Some(url) => url,
            None => format!(
                "{}/v1/traces",
                var("OTEL_EXPORTER_OTLP_ENDPOINT")?.trim_end_matches('/')
            ),
        };
        let service = var("OTEL_SERVICE_NAME").unwrap_or_else(|| "ripen".to_owned());
        let uri: hyper::Uri = match url.parse() {
            Ok(uri) => uri,
            Err(e) => {
                tracing::warn!(%url, error = %e, "the OTLP endpoint is not a URL; traces are off");
                return None;
            }
        };
        if uri.scheme_str() != Some("http") {
            tracing::warn!(%url, "only http:// OTLP endpoints are supported; traces are off");
            return None;
        }
        let (spans, rx) = mpsc::channel(QUEUE_MAX);
        tracing::info!(%url, %service, "exporting traces over OTLP/HTTP");
        Some((Tracer { spans }, export(uri, service, rx)))
    }

    /// Hands a finished span to the exporter; drops it when the exporter is
    /// behind.
    pub fn record(&self, span: Span) {
        if self.spans.try_send(span).is_err() {
            tracing::debug!("the trace exporter is behind: a span was dropped");
        }
    }
}

/// Sends batches of spans until every tracer is gone.
async fn export(uri: hyper::Uri, service: String, mut rx: mpsc::Receiver<Span>) {
    let client: Client<HttpConnector, Full<Bytes>> =
        Client::builder(TokioExecutor::new()).build(HttpConnector::new());
    let mut batch = Vec::with_capacity(BATCH_MAX);
    loop {
        let Some(first) = rx.recv().await else {
            return;
        };
        batch.push(first);
        let deadline = tokio::time::Instant::now() + BATCH_DELAY;
        while batch.len() < BATCH_MAX {
            match tokio::time::timeout_at(deadline, rx.recv()).await {
                Ok(Some(span)) => batch.push(span),
                Ok(None) | Err(_) => break,
            }
        }
        let body = encode_request(&service, &batch);
        let n = batch.len();
        batch.clear();
        let request = hyper::Request::post(uri.clone())
            .header(hyper::header::CONTENT_TYPE, "application/x-protobuf")
            .body(Full::new(Bytes::from(body)));
        let Ok(request) = request else {
            continue;
        };
        match tokio::time::timeout(EXPORT_TIMEOUT, client.request(request)).await {
            Ok(Ok(answer)) if answer.status().is_success() => {}
            Ok(Ok(answer)) => {
                tracing::warn!(
                    status = answer.status().as_u16(),
                    spans = n,
                    "the trace collector refused a batch"
                )
            }
            Ok(Err(e)) => tracing::warn!(error = %e, spans = n, "export traces"),
            Err(_) => tracing::warn!(spans = n, "export traces: timed out"),
        }
    }
}

// ---------------------------------------------------------------------------
// OTLP protobuf, written by hand: the few messages of
// `ExportTraceServiceRequest` that Ripen fills.

fn varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

fn key(out: &mut Vec<u8>, field: u32, wire: u8) {
    varint(out, (u64::from(field) << 3) | u64::from(wire));
}

fn bytes_field(out: &mut Vec<u8>, field: u32, b: &[u8]) {
    key(out, field, 2);
    varint(out, b.len() as u64);
    out.extend_from_slice(b);
}

fn message(out: &mut Vec<u8>, field: u32, write: impl FnOnce(&mut Vec<u8>)) {
    let mut inner = Vec::new();
    write(&mut inner);
    bytes_field(out, field, &inner);
}

fn fixed64(out: &mut Vec<u8>, field: u32, v: u64) {
    key(out, field, 1);
    out.extend_from_slice(&v.to_le_bytes());
}

fn key_value(out: &mut Vec<u8>, field: u32, k: &str, v: &Value) {
    message(out, field, |kv| {
        bytes_field(kv, 1, k.as_bytes());
        message(kv, 2, |any| match v {
            Value::Str(s) => bytes_field(any, 1, s.as_bytes()),
            Value::Bool(b) => {
                key(any, 2, 0);
                varint(any, u64::from(*b));
            }
            Value::Int(i) => {
                key(any, 3, 0);
                varint(any, *i as u64);
            }
        });
    });
}

fn unix_nanos(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}

/// An `ExportTraceServiceRequest` with one resource (`service.name`) and
/// one scope (`ripen`).
pub fn encode_request(service: &str, spans: &[Span]) -> Vec<u8> {
    let mut out = Vec::with_capacity(128 + spans.len() * 160);
    message(&mut out, 1, |rs| {
        message(rs, 1, |resource| {
            key_value(resource, 1, "service.name", &Value::Str(service.to_owned()));
        });
        message(rs, 2, |ss| {
            message(ss, 1, |scope| {
                bytes_field(scope, 1, b"ripen");
                bytes_field(scope, 2, env!("CARGO_PKG_VERSION").as_bytes());
            });
            for span in spans {
                message(ss, 2, |s| encode_span(s, span));
            }
        });
    });
    out
}

fn encode_span(out: &mut Vec<u8>, s: &Span) {
    bytes_field(out, 1, &s.trace_id);
    bytes_field(out, 2, &s.span_id);
    if let Some(parent) = &s.parent {
        bytes_field(out, 4, parent);
    }
    bytes_field(out, 5, s.name.as_bytes());
    key(out, 6, 0);
    varint(out, s.kind as u64);
    fixed64(out, 7, unix_nanos(s.start));
    fixed64(out, 8, unix_nanos(s.end));
    for (k, v) in &s.attributes {
        key_value(out, 9, k, v);
    }
    for (trace, span) in &s.links {
        message(out, 13, |link| {
            bytes_field(link, 1, trace);
            bytes_field(link, 2, span);
        });
    }
    message(out, 15, |status| match &s.error {
        Some(m) => {
            bytes_field(status, 2, m.as_bytes());
            key(status, 3, 0);
            varint(status, 2);
        }
        None => {
            key(status, 3, 0);
            varint(status, 1);
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn span_ids_are_stable_distinct_and_non_zero() {
        let e = EntityId::new_v7();
        assert_eq!(root_span_id(e), root_span_id(e));
        assert_ne!(root_span_id(e), attempt_span_id(e, 0, 1));
        assert_ne!(attempt_span_id(e, 0, 1), attempt_span_id(e, 0, 2));
        assert_ne!(attempt_span_id(e, 0, 1), attempt_span_id(e, 1, 1));
        assert_ne!(attempt_span_id(e, 0, 1), [0; 8]);
    }

    #[test]
    fn traceparents_parse_only_when_well_formed() {
        let ok = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let (trace, span) = parse_traceparent(ok).expect("valid");
        assert_eq!(trace[0], 0x4b);
        assert_eq!(span[7], 0xb7);
        for bad in [
            "",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e47-00f067aa0ba902b7-01",
        ] {
            assert_eq!(parse_traceparent(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn varints_and_fields_follow_the_protobuf_encoding() {
        let mut out = Vec::new();
        varint(&mut out, 300);
        assert_eq!(out, [0xac, 0x02]);
        let mut out = Vec::new();
        bytes_field(&mut out, 5, b"hi");
        assert_eq!(out, [0x2a, 2, b'h', b'i']);
        let mut out = Vec::new();
        fixed64(&mut out, 7, 1);
        assert_eq!(out, [0x39, 1, 0, 0, 0, 0, 0, 0, 0]);
    }
}
