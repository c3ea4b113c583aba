//! Ripen's HTTP API (docs/api.md): intake, entity reads, operator commands and
//! health, with every error as RFC 9457 problem+json.

mod auth;
mod conn;
mod dashboard;
mod deps;
mod keys;
mod limits;
mod notify;
mod openapi;
mod problem;
mod stats;
mod stream;
mod types;
mod view;
mod workers;

use std::future::Future;
use std::sync::Arc;

use anyhow::{Context, Result};
use axum::extract::rejection::{PathRejection, QueryRejection};
use axum::extract::{Extension, Path, Query, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use ripen_core::EntityStatus;
use ripen_engine::{Config, Engine, SubmitError};
use ripen_store::{CommandOutcome, EntityId, IntakeOutcome, ListQuery, StoreError};
use serde::Deserialize;
use serde_json::{json, Value};

pub use auth::{rule, Access};
pub use problem::Problem;

use auth::Caller;

/// The largest page of the list endpoint.
pub const PAGE_LIMIT_MAX: u32 = 1_000;
pub const PAGE_LIMIT_DEFAULT: u32 = 50;
/// The most history events one answer carries.
pub const EVENTS_MAX: u32 = 10_000;

pub(crate) struct AppState {
    engine: Engine,
    /// Turns true when the server begins to shut down; live streams end then.
    stopping: tokio::sync::watch::Receiver<bool>,
    /// The rates and counts of `GET /v1/stats`.
    stats: stats::Stats,
    /// Who may call what.
    auth: Arc<auth::Auth>,
    /// How many intake requests and streams may be open at once.
    gates: limits::Gates,
}

type Shared = State<Arc<AppState>>;

/// How long open HTTP requests may take to finish once the engine has
/// drained; connections still open then are dropped.
const HTTP_CLOSE_MAX: std::time::Duration = std::time::Duration::from_secs(1);

/// Starts the engine, listens, prints `listening on http://ADDR` (or
/// `https://` with `server.tls_cert_file`) on standard output, and serves
/// until `shutdown` completes.
///
/// Then the engine drains (see [`Engine::shutdown`]) while HTTP keeps
/// serving, so that clients can still submit and read and `/readyz` tells
/// balancers to go elsewhere. Once the engine has drained, live streams end
/// and open requests get one more second to finish.
pub async fn serve(
    config: Config,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<()> {
    let listen = config.listen.clone();
    let tls = match &config.server_tls {
        Some(t) => Some(Arc::new(
            ripen_tls::server_config(&t.cert_file, &t.key_file)
                .map_err(|e| anyhow::anyhow!("{}: server: {e}", config.path.display()))?,
        )),
        None => None,
    };
    let engine = Engine::start(config).await?;
    let listener = tokio::net::TcpListener::bind(&listen)
        .await
        .with_context(|| format!("listen on {listen}"))?;
    let addr = listener.local_addr()?;
    {
        use std::io::Write;
        let mut out = std::io::stdout().lock();
        let scheme = if tls.is_some() { "https" } else { "http" };
        writeln!(out, "listening on {scheme}://{addr}")?;
        out.flush()?;
    }
    let auth = auth::Auth::start(&engine, addr).await?;
    tracing::info!(%addr, "serving");
    let (stop_tx, stopping) = tokio::sync::watch::channel(false);
    let stop_http = stop_tx.subscribe();
    let stats = stats::Stats::new(engine.activity());
    let gates = limits::Gates::new(&engine.config().limits);
    let state = Arc::new(AppState {
        engine,
        stopping,
        stats,
        auth,
        gates,
    });
    let sampler = tokio::spawn(stats::sample(state.clone(), stop_tx.subscribe()));
    let closer = tokio::spawn(auth::stay_open(state.clone()));
    let http = conn::serve(
        listener,
        router(state.clone()),
        state.engine.config().limits.clone(),
        tls,
        stop_http,
    );
    tokio::pin!(http);
    let failed = tokio::select! {
        served = &mut http => Some(served),
        () = shutdown => None,
    };
    state.engine.shutdown().await;
    sampler.abort();
    closer.abort();
    if let Some(served) = failed {
        // HTTP ended without being asked to, so it cannot be closed gracefully.
        return served.context("serve HTTP");
    }
    let _ = stop_tx.send(true);
    match tokio::time::timeout(HTTP_CLOSE_MAX, http).await {
        Ok(served) => served.context("serve HTTP")?,
        Err(_) => tracing::info!(
            "requests still open {} ms after the drain are dropped",
            HTTP_CLOSE_MAX.as_millis()
        ),
    }
    Ok(())
}

fn router(state: Arc<AppState>) -> Router {
    Router::new()
        .merge(dashboard::routes())
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .route("/openapi.json", get(openapi::document))
        .route("/v1/entities", get(list))
        .route("/v1/entities:retry", post(retry_many))
        .route("/v1/stats", get(stats::get))
        .route("/v1/types", get(types::list))
        .route("/v1/types/{type}", get(types::get))
        .route(
            "/v1/types/{type}/versions",
            get(types::versions).post(types::register),
        )
        .route("/v1/types/{type}/versions/{n}", get(types::version))
        .route("/v1/entities/{key}", post(submit).get(get_entity))
        .route("/v1/entities/{id}/data", get(get_data))
        .route("/v1/entities/{id}/events", get(events))
        .route("/v1/entities/{id}/retry", post(retry))
        .route("/v1/entities/{id}/cancel", post(cancel))
        .route("/v1/events", get(notify::stream))
        .route("/v1/subscriptions", post(notify::create).get(notify::list))
        .route(
            "/v1/subscriptions/{id}",
            get(notify::get).delete(notify::delete),
        )
        .route("/v1/subscriptions/{id}/deliveries", get(notify::deliveries))
        .route("/v1/deliveries/{id}/redeliver", post(notify::redeliver))
        .route("/v1/queues/{queue}/claim", post(workers::claim))
        .route("/v1/tasks/{task}/heartbeat", post(workers::heartbeat))
        .route("/v1/tasks/{task}/complete", post(workers::complete))
        .route("/v1/tasks/{task}/fail", post(workers::fail))
        .route("/v1/keys", post(keys::create).get(keys::list))
        .route("/v1/keys/{id}", axum::routing::delete(keys::revoke))
        .route_layer(axum::middleware::from_fn_with_state(
            state.clone(),
            auth::authorize,
        ))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .with_state(state)
}

async fn not_found() -> Problem {
    Problem::not_found("no such resource")
}

async fn method_not_allowed() -> Problem {
    Problem::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "method-not-allowed",
        "Method not allowed",
        "this resource does not support that method",
    )
}

async fn healthz() -> Response {
    json_response(StatusCode::OK, json!({"status": "ok"}))
}

async fn readyz(State(state): Shared) -> Response {
    match state.engine.readiness().await {
        Ok(()) => json_response(StatusCode::OK, json!({"status": "ready"})),
        Err(e) => Problem::unavailable(e.to_string()).into_response(),
    }
}

/// Prometheus text exposition (version 0.0.4), whatever the scraper asks
/// for: every Prometheus reads it.
async fn metrics(State(state): Shared) -> Response {
    let mut r = (StatusCode::OK, state.engine.metrics_text().await).into_response();
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static(ripen_engine::metrics::CONTENT_TYPE),
    );
    r
}

fn json_response(status: StatusCode, body: Value) -> Response {
    json_text(status, body.to_string())
}

fn json_text(status: StatusCode, body: String) -> Response {
    let mut r = (status, body).into_response();
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    r
}

fn store_problem(e: StoreError) -> Problem {
    match e {
        StoreError::Unavailable(m) => Problem::unavailable(m),
        StoreError::Overloaded(m) => limits::overloaded(m, "write_queue_max"),
        // An entity pinned to a version this node cannot run: nothing can
        // be done to its steps (see docs/types.md).
        StoreError::UnknownPipeline { type_name, version } => Problem::new(
            StatusCode::CONFLICT,
            "unrunnable-version",
            "Version cannot run",
            format!(
                "the entity is pinned to type {type_name:?} version {version}, whose pipeline cannot run on this node; submit it again to run it on the type's latest version"
            ),
        ),
        other => {
            tracing::error!(error = %other, "store failure");
            Problem::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal",
                "Internal error",
                "the store failed; see the server log",
            )
        }
    }
}

fn path_param(p: Result<Path<String>, PathRejection>) -> Result<String, Problem> {
    p.map(|Path(s)| s)
        .map_err(|e| Problem::bad_request(format!("bad path: {}", e.body_text())))
}

fn entity_id(p: Result<Path<String>, PathRejection>) -> Result<EntityId, Problem> {
    let raw = path_param(p)?;
    raw.parse::<EntityId>()
        .map_err(|_| Problem::not_found(format!("no entity with id {raw:?}")))
}

fn no_entity(id: EntityId) -> Problem {
    Problem::not_found(format!("no entity with id {id}"))
}

async fn submit(
    State(state): Shared,
    Extension(caller): Extension<Caller>,
    p: Result<Path<String>, PathRejection>,
    request: axum::extract::Request,
) -> Result<Response, Problem> {
    let type_name = path_param(p)?;
    let _slot = state.gates.intake.enter()?;
    // The request is taken whole so that its headers are read in place
    // rather than copied.
    let (parts, body) = request.into_parts();
    let headers = &parts.headers;
    // A node with a blob store takes larger submissions: those go there.
    let config = state.engine.config();
    let limit = config
        .blobs
        .as_ref()
        .map_or(config.body_limit_bytes, |b| b.body_max);
    check_declared_length(headers, limit)?;
    check_json_media_type(headers)?;
    let key = match headers.get("idempotency-key") {
        None => None,
        Some(v) => Some(v.to_str().map_err(|_| {
            Problem::bad_request("the Idempotency-Key header is not visible ASCII")
        })?),
    };
    let bytes = read_body(&state, body, limit).await?;
    let trace_parent = headers
        .get("traceparent")
        .and_then(|v| v.to_str().ok())
        .and_then(ripen_engine::trace::parse_traceparent);
    let outcome = state
        .engine
        .submit_traced(&caller.tenant, &type_name, bytes, key, trace_parent)
        .await
        .map_err(|e| match e {
            SubmitError::UnknownType(t) => {
                let known = state.engine.registry().type_names();
                Problem::not_found(format!(
                    "no entity type named {t:?}; the types are {}",
                    known.join(", ")
                ))
                .with("known_types", json!(known))
            }
            SubmitError::Malformed(m) => Problem::new(
                StatusCode::BAD_REQUEST,
                "malformed-json",
                "Malformed JSON",
                m,
            ),
            SubmitError::JsonLimit {
                limit: ripen_engine::limits::JsonLimit::Depth,
                message,
            } => Problem::new(
                StatusCode::BAD_REQUEST,
                "json-too-deep",
                "JSON nested too deeply",
                message,
            )
            .with("limit", json!("json_depth_max"))
            .with(
                "depth_max",
                json!(state.engine.config().limits.json.depth_max),
            ),
            SubmitError::JsonLimit { limit, message } => Problem::new(
                StatusCode::BAD_REQUEST,
                "json-limit",
                "JSON past a limit",
                message,
            )
            .with("limit", json!(limit.key()))
            .with(
                "limit_max",
                json!(limit.max(&state.engine.config().limits.json)),
            ),
            SubmitError::TooCostly(m) => Problem::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "validation-too-costly",
                "Validation too costly",
                m,
            ),
            SubmitError::Overloaded(m) => limits::overloaded(m, "validation_queue_max"),
            SubmitError::Invalid(violations) => {
                let errors: Vec<Value> = violations
                    .iter()
                    .map(|v| json!({"pointer": v.pointer, "message": v.message}))
                    .collect();
                Problem::new(
                    StatusCode::UNPROCESSABLE_ENTITY,
                    "schema-violation",
                    "Payload does not match the schema",
                    format!(
                        "{} violation(s) of the schema of type {type_name:?}",
                        errors.len()
                    ),
                )
                .with("errors", json!(errors))
            }
            SubmitError::BadKey => Problem::bad_request(e.to_string()),
            SubmitError::KeyInFlight => Problem::new(
                StatusCode::CONFLICT,
                "request-in-flight",
                "Request in flight",
                "a request with this idempotency key is still being processed; try again shortly",
            )
            .retry_after(1),
            SubmitError::BadReference(e) => deps::bad_reference(&e),
            SubmitError::ReferenceRefused(r) => deps::refused(&r),
            SubmitError::BlobStore(e) => Problem::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "blob-store-unavailable",
                "Blob store unavailable",
                format!("the payload was not accepted: {e}"),
            )
            .retry_after(1),
            SubmitError::Store(e) => store_problem(e),
        })?;
    let (record, replayed) = match outcome {
        IntakeOutcome::Created(r) => (r, false),
        IntakeOutcome::Replayed(r) => (r, true),
        IntakeOutcome::KeyReused { entity_id } => {
            return Err(Problem::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "idempotency-key-reused",
                "Idempotency key reused",
                "this idempotency key was used before with another body",
            )
            .with("entity_id", json!(entity_id.to_string())))
        }
        IntakeOutcome::ReferenceRefused(r) => return Err(deps::refused(&r)),
    };
    let mut response = json_text(
        StatusCode::ACCEPTED,
        view::entity_json(
            &record,
            state
                .engine
                .pipeline(&record.type_name, record.version)
                .as_deref(),
        ),
    );
    let h = response.headers_mut();
    if let Ok(loc) = HeaderValue::from_str(&format!("/v1/entities/{}", record.id)) {
        h.insert(header::LOCATION, loc);
    }
    if replayed {
        h.insert("idempotent-replayed", HeaderValue::from_static("true"));
    }
    Ok(response)
}

fn too_large(limit: usize) -> Problem {
    Problem::new(
        StatusCode::PAYLOAD_TOO_LARGE,
        "payload-too-large",
        "Payload too large",
        format!("the body exceeds the limit of {limit} bytes"),
    )
    .with("limit_bytes", json!(limit))
}

/// A payload says it is JSON, or says nothing: `application/json` or any
/// `application/…+json`, with any parameters, in any case. A request
/// without `Content-Type` is read as JSON; one that declares another type
/// (a form, text, an image) is refused with 415 rather than guessed at.
fn check_json_media_type(headers: &HeaderMap) -> Result<(), Problem> {
    let Some(value) = headers.get(axum::http::header::CONTENT_TYPE) else {
        return Ok(());
    };
    let essence = value
        .to_str()
        .ok()
        .and_then(|v| v.split(';').next())
        .map(|v| v.trim().to_ascii_lowercase());
    let json = essence.as_deref().is_some_and(|t| {
        t == "application/json" || (t.starts_with("application/") && t.ends_with("+json"))
    });
    if json {
        return Ok(());
    }
    Err(Problem::new(
        StatusCode::UNSUPPORTED_MEDIA_TYPE,
        "unsupported-media-type",
        "Unsupported media type",
        format!(
            "an entity's payload is JSON: send Content-Type: application/json, not {:?}",
            String::from_utf8_lossy(value.as_bytes())
        ),
    ))
}

/// Refuses a body whose declared length is over `limit` before reading it.
fn check_declared_length(headers: &HeaderMap, limit: usize) -> Result<(), Problem> {
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit as u64) {
        return Err(too_large(limit));
    }
    Ok(())
}

/// Reads a whole body of at most `limit` bytes, within
/// `limits.body_timeout` (408 past it).
/// Reads a body of at most `limit` bytes into one buffer, sized by
/// `Content-Length` when the client sent one, so that a large body is held
/// once while it arrives rather than in pieces and then again whole.
async fn collect_body(
    body: axum::body::Body,
    limit: usize,
) -> Result<axum::body::Bytes, axum::Error> {
    use http_body_util::BodyExt;
    let mut body = http_body_util::Limited::new(body, limit);
    let hint = axum::body::HttpBody::size_hint(&body).exact();
    let capacity = hint.map_or(8 * 1024, |n| n.min(limit as u64) as usize);
    let mut buf = bytes::BytesMut::with_capacity(capacity);
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(axum::Error::new)?;
        if let Ok(data) = frame.into_data() {
            buf.extend_from_slice(&data);
        }
    }
    Ok(buf.freeze())
}

async fn read_body(
    state: &AppState,
    body: axum::body::Body,
    limit: usize,
) -> Result<axum::body::Bytes, Problem> {
    let timeout = state.engine.config().limits.body_timeout;
    let read = tokio::time::timeout(timeout, collect_body(body, limit));
    let Ok(read) = read.await else {
        return Err(Problem::new(
            StatusCode::REQUEST_TIMEOUT,
            "body-timeout",
            "Body too slow",
            format!(
                "the body did not arrive whole within {} ms (limits.body_timeout)",
                timeout.as_millis()
            ),
        ));
    };
    read.map_err(|e| {
        let inner = e.into_inner();
        let mut source: Option<&(dyn std::error::Error + 'static)> = Some(inner.as_ref());
        while let Some(err) = source {
            if err.is::<http_body_util::LengthLimitError>() {
                return too_large(limit);
            }
            source = err.source();
        }
        Problem::bad_request(format!("reading the body failed: {inner}"))
    })
}

async fn get_entity(
    State(state): Shared,
    Extension(caller): Extension<Caller>,
    p: Result<Path<String>, PathRejection>,
) -> Result<Response, Problem> {
    let id = entity_id(p)?;
    match state
        .engine
        .get(&caller.tenant, id)
        .await
        .map_err(store_problem)?
    {
        Some(r) => Ok(json_text(
            StatusCode::OK,
            view::entity_json(
                &r,
                state.engine.pipeline(&r.type_name, r.version).as_deref(),
            ),
        )),
        None => Err(no_entity(id)),
    }
}

/// The longest `/data?wait=`.
pub const DATA_WAIT_MAX: std::time::Duration = std::time::Duration::from_secs(30);

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct DataParams {
    wait: Option<String>,
}

async fn get_data(
    State(state): Shared,
    Extension(caller): Extension<Caller>,
    p: Result<Path<String>, PathRejection>,
    q: Result<Query<DataParams>, QueryRejection>,
) -> Result<Response, Problem> {
    let id = entity_id(p)?;
    let Query(q) = q.map_err(|e| Problem::bad_request(format!("bad query: {}", e.body_text())))?;
    let wait = match q.wait.as_deref().filter(|w| !w.is_empty()) {
        None => None,
        Some(w) => {
            let d = humantime::parse_duration(w).map_err(|_| {
                Problem::bad_request(format!("wait {w:?} is not a duration such as \"10s\""))
            })?;
            if d > DATA_WAIT_MAX {
                return Err(Problem::bad_request(format!(
                    "wait is at most {}s",
                    DATA_WAIT_MAX.as_secs()
                )));
            }
            Some(d)
        }
    };
    let found = match wait {
        Some(wait) => {
            let mut stopping = state.stopping.clone();
            tokio::select! {
                found = state.engine.wait_settled(&caller.tenant, id, wait) => found,
                () = async move { let _ = stopping.wait_for(|s| *s).await.is_ok(); } => {
                    state.engine.get_data(&caller.tenant, id).await
                }
            }
        }
        None => state.engine.get_data(&caller.tenant, id).await,
    };
    let Some(d) = found.map_err(store_problem)? else {
        return Err(no_entity(id));
    };
    let status = d.record.status;
    if status != EntityStatus::Ready {
        let mut problem = Problem::new(
            StatusCode::CONFLICT,
            "entity-not-ready",
            "Entity not ready",
            format!(
                "the entity is {}; its data is served only when it is ready",
                status.as_str()
            ),
        )
        .with("entity_status", json!(status.as_str()));
        if status == EntityStatus::Pending {
            problem = problem.retry_after(1);
        }
        return Err(problem);
    }
    Ok(json_text(StatusCode::OK, view::data(&d)))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ListParams {
    #[serde(rename = "type")]
    type_name: Option<String>,
    status: Option<String>,
    limit: Option<u32>,
    after: Option<String>,
    degraded: Option<String>,
    created_after: Option<String>,
    created_before: Option<String>,
    key: Option<String>,
}

/// A time query parameter: RFC 3339; empty counts as absent.
fn time_param(name: &str, value: Option<&str>) -> Result<Option<i64>, Problem> {
    match value.filter(|v| !v.is_empty()) {
        None => Ok(None),
        Some(v) => parse_rfc3339(v).map(Some).ok_or_else(|| {
            Problem::bad_request(format!(
                "{name} {v:?} is not an RFC 3339 time such as 2026-12-01T22:08:27Z"
            ))
        }),
    }
}

async fn list(
    State(state): Shared,
    Extension(caller): Extension<Caller>,
    q: Result<Query<ListParams>, QueryRejection>,
) -> Result<Response, Problem> {
    let Query(q) = q.map_err(|e| Problem::bad_request(format!("bad query: {}", e.body_text())))?;
    let status = match q.status.as_deref().filter(|s| !s.is_empty()) {
        None => None,
        Some(s) => Some(EntityStatus::parse(s).ok_or_else(|| {
            Problem::bad_request(format!(
                "status {s:?} is not one of pending, ready, failed, cancelled"
            ))
        })?),
    };
    let limit = q.limit.unwrap_or(PAGE_LIMIT_DEFAULT);
    if limit == 0 || limit > PAGE_LIMIT_MAX {
        return Err(Problem::bad_request(format!(
            "limit must be between 1 and {PAGE_LIMIT_MAX}"
        )));
    }
    let after = match q.after.as_deref().filter(|s| !s.is_empty()) {
        None => None,
        Some(a) => Some(a.parse::<EntityId>().map_err(|_| {
            Problem::bad_request(format!("after {a:?} is not a cursor from a previous page"))
        })?),
    };
    let degraded = match q.degraded.as_deref().filter(|s| !s.is_empty()) {
        None => None,
        Some("true") => Some(true),
        Some("false") => Some(false),
        Some(d) => {
            return Err(Problem::bad_request(format!(
                "degraded {d:?} is not true or false"
            )))
        }
    };
    let created_after_us = time_param("created_after", q.created_after.as_deref())?;
    let created_before_us = time_param("created_before", q.created_before.as_deref())?;
    let type_name = q.type_name.filter(|t| !t.is_empty());
    let key = q.key.filter(|k| !k.is_empty());
    if key.is_some() && type_name.is_none() {
        return Err(Problem::bad_request(
            "key needs type: an idempotency key belongs to one entity type",
        ));
    }
    let mut items = state
        .engine
        .list(
            &caller.tenant,
            ListQuery {
                type_name,
                status,
                limit: limit + 1,
                after,
                degraded,
                created_after_us,
                created_before_us,
                key,
            },
        )
        .await
        .map_err(store_problem)?;
    let next = if items.len() > limit as usize {
        items.truncate(limit as usize);
        items.last().map(|r| r.id.to_string())
    } else {
        None
    };
    // {"items": [...], "next": ...}, keys in serde_json's order.
    let mut body = String::with_capacity(64 + 700 * items.len());
    body.push_str("{\"items\":[");
    for (i, r) in items.iter().enumerate() {
        if i > 0 {
            body.push(',');
        }
        view::write_entity(
            &mut body,
            r,
            state.engine.pipeline(&r.type_name, r.version).as_deref(),
        );
    }
    body.push_str("],\"next\":");
    body.push_str(&Value::from(next).to_string());
    body.push('}');
    Ok(json_text(StatusCode::OK, body))
}

async fn events(
    State(state): Shared,
    Extension(caller): Extension<Caller>,
    p: Result<Path<String>, PathRejection>,
    headers: HeaderMap,
) -> Result<Response, Problem> {
    let id = entity_id(p)?;
    let wants_stream = headers
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.contains("text/event-stream"));
    if wants_stream {
        let slot = state.gates.streams.enter()?;
        // Resume after the last event the client saw, if it says so.
        let after_seq = headers
            .get("last-event-id")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<u64>().ok())
            .unwrap_or(0);
        let Some(feed) = state
            .engine
            .follow(&caller.tenant, id, after_seq)
            .await
            .map_err(store_problem)?
        else {
            return Err(no_entity(id));
        };
        return Ok(stream::entity_events(feed, state.stopping.clone(), slot).into_response());
    }
    let Some(events) = state
        .engine
        .events(&caller.tenant, id, 0, EVENTS_MAX)
        .await
        .map_err(store_problem)?
    else {
        return Err(no_entity(id));
    };
    let items: Vec<Value> = events.iter().map(view::event).collect();
    Ok(json_response(StatusCode::OK, Value::Array(items)))
}

async fn retry(
    State(state): Shared,
    Extension(caller): Extension<Caller>,
    p: Result<Path<String>, PathRejection>,
) -> Result<Response, Problem> {
    let id = entity_id(p)?;
    let outcome = state.engine.retry(&caller.tenant, id).await;
    command_answer(
        &state.engine,
        id,
        outcome,
        "retry",
        "only a failed entity can be retried",
    )
}

async fn cancel(
    State(state): Shared,
    Extension(caller): Extension<Caller>,
    p: Result<Path<String>, PathRejection>,
) -> Result<Response, Problem> {
    let id = entity_id(p)?;
    let outcome = state.engine.cancel(&caller.tenant, id).await;
    command_answer(
        &state.engine,
        id,
        outcome,
        "cancel",
        "only a pending entity can be cancelled",
    )
}

fn command_answer(
    engine: &Engine,
    id: EntityId,
    outcome: Result<CommandOutcome, StoreError>,
    verb: &str,
    rule: &str,
) -> Result<Response, Problem> {
    match outcome.map_err(store_problem)? {
        CommandOutcome::Applied(r) => Ok(json_text(
            StatusCode::ACCEPTED,
            view::entity_json(&r, engine.pipeline(&r.type_name, r.version).as_deref()),
        )),
        CommandOutcome::NotFound => Err(no_entity(id)),
        CommandOutcome::Conflict(status) => Err(Problem::new(
            StatusCode::CONFLICT,
            "wrong-status",
            "Conflict",
            format!("cannot {verb}: the entity is {}; {rule}", status.as_str()),
        )
        .with("entity_status", json!(status.as_str()))),
        CommandOutcome::DependencyNotReady(r) => Err(deps::retry_blocked(&r)),
        CommandOutcome::PayloadPruned { at_us } => Err(Problem::new(
            StatusCode::CONFLICT,
            "payload-pruned",
            "Payload pruned",
            format!(
                "cannot {verb}: the entity's raw payload was pruned at {} (see retention.payload), so its steps cannot run again; submit it anew",
                ripen_engine::time::rfc3339(at_us)
            ),
        )
        .with("payload_pruned_at", json!(ripen_engine::time::rfc3339(at_us)))),
        CommandOutcome::Compensating(status) => Err(Problem::new(
            StatusCode::CONFLICT,
            "compensation-running",
            "Compensation running",
            format!(
                "cannot {verb}: the entity is {} and its compensation is still running; retry once it is done or has failed",
                status.as_str()
            ),
        )
        .with("entity_status", json!(status.as_str()))),
    }
}

/// The most entities one bulk retry names or re-queues.
pub const BULK_RETRY_MAX: u32 = 1_000;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct BulkRetry {
    #[serde(rename = "type")]
    type_name: String,
    ids: Option<Vec<String>>,
    status: Option<String>,
    limit: Option<u32>,
}

fn invalid(detail: impl Into<String>) -> Problem {
    Problem::new(
        StatusCode::UNPROCESSABLE_ENTITY,
        "invalid-request",
        "Invalid request",
        detail,
    )
}

/// `POST /v1/entities:retry`: `{"type", "ids": [...]}` retries the failed
/// ones among those entities; `{"type", "status": "failed", "limit"}` the
/// newest `limit` failed entities of the type. Answers `{"requeued": n}`.
async fn retry_many(
    State(state): Shared,
    Extension(caller): Extension<Caller>,
    request: axum::extract::Request,
) -> Result<Response, Problem> {
    let (parts, body) = request.into_parts();
    let limit = state.engine.config().body_limit_bytes;
    check_declared_length(&parts.headers, limit)?;
    let bytes = read_body(&state, body, limit).await?;
    let body: BulkRetry = serde_json::from_slice(&bytes).map_err(|e| {
        if e.is_data() {
            invalid(format!("the request does not fit: {e}"))
        } else {
            Problem::new(
                StatusCode::BAD_REQUEST,
                "malformed-json",
                "Malformed JSON",
                format!("the body is not JSON: {e}"),
            )
        }
    })?;
    let known = state.engine.registry().type_names();
    if !known.contains(&body.type_name) {
        return Err(invalid(format!(
            "no entity type named {:?}; the types are {}",
            body.type_name,
            known.join(", ")
        ))
        .with("known_types", json!(known)));
    }
    let requeued = match (body.ids, body.status) {
        (Some(ids), None) => {
            if body.limit.is_some() {
                return Err(invalid("limit goes with status, not with ids"));
            }
            if ids.len() > BULK_RETRY_MAX as usize {
                return Err(invalid(format!(
                    "ids names {} entities; at most {BULK_RETRY_MAX}",
                    ids.len()
                )));
            }
            let ids = ids
                .iter()
                .map(|raw| {
                    raw.parse::<EntityId>()
                        .map_err(|_| invalid(format!("{raw:?} in ids is not an entity id")))
                })
                .collect::<Result<Vec<_>, _>>()?;
            state
                .engine
                .retry_many(&caller.tenant, &body.type_name, &ids)
                .await
        }
        (None, Some(status)) => {
            if status != "failed" {
                return Err(invalid(format!(
                    "status {status:?}: only failed entities can be retried"
                )));
            }
            let limit = body.limit.unwrap_or(BULK_RETRY_MAX);
            if limit == 0 || limit > BULK_RETRY_MAX {
                return Err(invalid(format!(
                    "limit must be between 1 and {BULK_RETRY_MAX}"
                )));
            }
            state
                .engine
                .retry_failed(&caller.tenant, &body.type_name, limit)
                .await
        }
        _ => {
            return Err(invalid(
                "name the entities with ids, or select them with \"status\": \"failed\" (one of the two)",
            ))
        }
    }
    .map_err(store_problem)?;
    Ok(json_response(
        StatusCode::ACCEPTED,
        json!({"requeued": requeued}),
    ))
}

/// Reads an RFC 3339 time (`2026-12-01T22:08:27.680670Z`, or with an offset
/// such as `+02:00`) as Unix microseconds; digits past the microsecond are
/// dropped. `None` for anything else, or a time before year 1 or after 9999.
pub fn parse_rfc3339(s: &str) -> Option<i64> {
    let b = s.as_bytes();
    let num = |from: usize, len: usize| -> Option<i64> {
        let digits = b.get(from..from + len)?;
        digits.iter().try_fold(0i64, |n, &d| {
            d.is_ascii_digit().then(|| n * 10 + i64::from(d - b'0'))
        })
    };
    let sep = |at: usize, allowed: &[u8]| b.get(at).is_some_and(|c| allowed.contains(c));
    if !(sep(4, b"-") && sep(7, b"-") && sep(10, b"Tt ") && sep(13, b":") && sep(16, b":")) {
        return None;
    }
    let (year, month, day) = (num(0, 4)?, num(5, 2)?, num(8, 2)?);
    let (hour, minute, second) = (num(11, 2)?, num(14, 2)?, num(17, 2)?);
    let leap = year % 4 == 0 && (year % 100 != 0 || year % 400 == 0);
    let month_days = [
        31,
        if leap { 29 } else { 28 },
        31,
        30,
        31,
        30,
        31,
        31,
        30,
        31,
        30,
        31,
    ];
    if year == 0
        || !(1..=12).contains(&month)
        || day < 1
        || day > month_days[(month - 1) as usize]
        || hour > 23
        || minute > 59
        || second > 59
    {
        return None;
    }
    let mut at = 19;
    let mut micros = 0i64;
    if sep(at, b".") {
        at += 1;
        let digits = b[at..].iter().take_while(|c| c.is_ascii_digit()).count();
        if digits == 0 {
            return None;
        }
        for k in 0..6 {
            micros = micros * 10 + if k < digits { num(at + k, 1)? } else { 0 };
        }
        at += digits;
    }
    let offset_s = match b.get(at..)? {
        b"Z" | b"z" => 0,
        [sign @ (b'+' | b'-'), _, _, b':', _, _] => {
            let (h, m) = (num(at + 1, 2)?, num(at + 4, 2)?);
            if h > 23 || m > 59 {
                return None;
            }
            let off = h * 3_600 + m * 60;
            if *sign == b'+' {
                off
            } else {
                -off
            }
        }
        _ => return None,
    };
    // Days since 1970-01-01 of a civil date (H. Hinnant's algorithm).
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (month + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    let secs = days * 86_400 + hour * 3_600 + minute * 60 + second - offset_s;
    Some(secs * 1_000_000 + micros)
}

#[cfg(test)]
mod tests {
    use super::parse_rfc3339;
    use proptest::prelude::*;
    use ripen_engine::time::rfc3339;

    proptest! {
        /// Whatever Ripen writes, it reads back; an offset shifts the time.
        #[test]
        fn times_read_back_what_ripen_writes(
            us in 0i64..253_402_300_799_999_999,
            offset_min in -(23 * 60 + 59)..=(23 * 60 + 59i64),
        ) {
            let written = rfc3339(us);
            prop_assert_eq!(parse_rfc3339(&written), Some(us));
            let base = written.trim_end_matches('Z');
            let (sign, abs) = if offset_min < 0 { ('-', -offset_min) } else { ('+', offset_min) };
            let shifted = format!("{base}{sign}{:02}:{:02}", abs / 60, abs % 60);
            prop_assert_eq!(parse_rfc3339(&shifted), Some(us - offset_min * 60_000_000));
        }

        #[test]
        fn anything_else_is_refused_without_a_panic(s in "\\PC{0,40}") {
            let _ = parse_rfc3339(&s);
        }
    }

    /// Found by the `ids` fuzz target: a time before 1970 reads as
    /// negative microseconds (Ripen writes none), and as a list bound it is
    /// the start of all ids, like 1970 itself.
    #[test]
    fn a_time_before_1970_bounds_a_list_from_the_start() {
        let us = parse_rfc3339("1013-12-01T02:08:27.0+02:00");
        assert_eq!(us, Some(-30_171_138_693_000_000));
        let first = ripen_store::EntityId::first_minted_at(0);
        assert_eq!(ripen_store::EntityId::first_minted_at(us.unwrap()), first);
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00.000000Z");
    }

    #[test]
    fn the_forms_of_rfc_3339() {
        assert_eq!(parse_rfc3339("1970-01-01T00:00:00Z"), Some(0));
        assert_eq!(parse_rfc3339("1970-01-01t00:00:01z"), Some(1_000_000));
        assert_eq!(parse_rfc3339("1970-01-01 00:00:00.5Z"), Some(500_000));
        assert_eq!(
            parse_rfc3339("1970-01-01T00:00:00.123456789Z"),
            Some(123_456)
        );
        assert_eq!(parse_rfc3339("1970-01-01T01:00:00+01:00"), Some(0));
        assert_eq!(
            parse_rfc3339("2024-02-29T00:00:00Z"),
            Some(1_709_164_800_000_000)
        );
        for bad in [
            "",
            "2024-02-30T00:00:00Z",
            "2023-02-29T00:00:00Z",
            "2024-13-01T00:00:00Z",
            "2024-01-01T24:00:00Z",
            "2024-01-01T00:00:00",
            "2024-01-01T00:00:00.Z",
            "2024-01-01T00:00:00+0100",
            "2024-01-01T00:00:00Zjunk",
            "0000-01-01T00:00:00Z",
            "2024-1-01T00:00:00Z",
        ] {
            assert_eq!(parse_rfc3339(bad), None, "{bad:?}");
        }
    }
}
