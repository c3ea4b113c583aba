//! The worker endpoints (docs/api.md, "Workers"): long-poll claims,
//! heartbeats and results of remote workers.

use std::time::Duration;

use axum::extract::rejection::PathRejection;
use axum::extract::{Path, Request, State};
use axum::http::StatusCode;
use axum::response::Response;
use ripen_engine::executor::http::{request_body, OUTPUT_BYTES_MAX};
use ripen_engine::time::rfc3339;
use ripen_engine::workers::{ERROR_LEN_MAX, WORKER_ID_LEN_MAX};
use ripen_engine::{Task, TaskId, WorkerError};
use ripen_store::Outcome;
use serde::de::DeserializeOwned;
use serde::Deserialize;
use serde_json::json;

use crate::{check_declared_length, json_response, json_text, path_param, read_body};
use crate::{store_problem, Problem, Shared};

/// The longest body a worker sends, an output included.
const WORKER_BODY_MAX: usize = OUTPUT_BYTES_MAX + 64 * 1024;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ClaimRequest {
    max: Option<u64>,
    wait_ms: Option<u64>,
    worker_id: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct HeartbeatRequest {
    lease: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CompleteRequest {
    lease: String,
    output: Option<Box<serde_json::value::RawValue>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FailRequest {
    lease: String,
    error: String,
    retryable: Option<bool>,
    retry_after_ms: Option<u64>,
}

/// `POST /v1/queues/{queue}/claim`.
pub async fn claim(
    State(state): Shared,
    p: Result<Path<String>, PathRejection>,
    request: Request,
) -> Result<Response, Problem> {
    let queue = path_param(p)?;
    let body: ClaimRequest = read_json(&state, request).await?;
    let max = body.max.unwrap_or(1);
    if max == 0 || max > ripen_engine::workers::CLAIM_MAX as u64 {
        return Err(invalid(format!(
            "max must be between 1 and {}",
            ripen_engine::workers::CLAIM_MAX
        )));
    }
    let wait_ms = body.wait_ms.unwrap_or(0);
    if wait_ms > ripen_engine::workers::WAIT_MAX_MS {
        return Err(invalid(format!(
            "wait_ms is at most {}",
            ripen_engine::workers::WAIT_MAX_MS
        )));
    }
    if let Some(w) = &body.worker_id {
        if w.is_empty() || w.len() > WORKER_ID_LEN_MAX || w.chars().any(char::is_control) {
            return Err(invalid(format!(
                "worker_id must be 1 to {WORKER_ID_LEN_MAX} bytes without control characters"
            )));
        }
    }
    let tasks = state
        .engine
        .claim_tasks(
            &queue,
            body.worker_id.as_deref(),
            max as usize,
            Duration::from_millis(wait_ms),
        )
        .await
        .map_err(worker_problem)?;
    let mut out = String::from("{\"tasks\":[");
    for (i, t) in tasks.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        write_task(&mut out, t);
    }
    out.push_str("]}");
    Ok(json_text(StatusCode::OK, out))
}

/// One task: its id, lease and expiry, its idempotency key, and the fields
/// of the HTTP step contract, from the raw JSON the store holds.
fn write_task(out: &mut String, t: &Task) {
    let a = &t.attempt;
    let key = format!("{}:{}", a.entity_id, a.step_name);
    out.push_str(
        &json!({
            "task_id": t.id.to_string(),
            "lease": t.lease,
            "lease_expires_at": rfc3339(a.lease_expires_at_us),
            "idempotency_key": key,
        })
        .to_string(),
    );
    // Both are objects: splice the contract's fields into the first one.
    out.pop();
    out.push(',');
    out.push_str(&request_body(a)[1..]);
}

/// `POST /v1/tasks/{task}/heartbeat`.
pub async fn heartbeat(
    State(state): Shared,
    p: Result<Path<String>, PathRejection>,
    request: Request,
) -> Result<Response, Problem> {
    let id = task_id(p)?;
    let body: HeartbeatRequest = read_json(&state, request).await?;
    let expires = state
        .engine
        .heartbeat_task(id, &body.lease)
        .await
        .map_err(worker_problem)?;
    Ok(json_response(
        StatusCode::OK,
        json!({"lease_expires_at": rfc3339(expires)}),
    ))
}

/// `POST /v1/tasks/{task}/complete`.
pub async fn complete(
    State(state): Shared,
    p: Result<Path<String>, PathRejection>,
    request: Request,
) -> Result<Response, Problem> {
    let id = task_id(p)?;
    let body: CompleteRequest = read_json(&state, request).await?;
    let output = body
        .output
        .map(|o| o.get().to_owned())
        .filter(|o| o != "null");
    if output.as_ref().is_some_and(|o| o.len() > OUTPUT_BYTES_MAX) {
        return Err(Problem::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "output-too-large",
            "Output too large",
            format!("a step output is at most {OUTPUT_BYTES_MAX} bytes"),
        )
        .with("limit_bytes", json!(OUTPUT_BYTES_MAX)));
    }
    state
        .engine
        .report_task(id, &body.lease, Outcome::Succeeded { output })
        .await
        .map_err(worker_problem)?;
    Ok(json_response(StatusCode::OK, json!({"recorded": true})))
}

/// `POST /v1/tasks/{task}/fail`.
pub async fn fail(
    State(state): Shared,
    p: Result<Path<String>, PathRejection>,
    request: Request,
) -> Result<Response, Problem> {
    let id = task_id(p)?;
    let body: FailRequest = read_json(&state, request).await?;
    if body.error.len() > ERROR_LEN_MAX {
        return Err(invalid(format!("error is at most {ERROR_LEN_MAX} bytes")));
    }
    let report = Outcome::Failed {
        error: body.error,
        retryable: body.retryable.unwrap_or(true),
        retry_after_ms: body.retry_after_ms,
    };
    state
        .engine
        .report_task(id, &body.lease, report)
        .await
        .map_err(worker_problem)?;
    Ok(json_response(StatusCode::OK, json!({"recorded": true})))
}

fn task_id(p: Result<Path<String>, PathRejection>) -> Result<TaskId, Problem> {
    let raw = path_param(p)?;
    raw.parse::<TaskId>()
        .map_err(|()| Problem::not_found(format!("no task with id {raw:?}")))
}

pub(crate) fn invalid(detail: String) -> Problem {
    Problem::new(
        StatusCode::UNPROCESSABLE_ENTITY,
        "invalid-request",
        "Invalid request",
        detail,
    )
}

/// Reads a JSON request body of a worker endpoint; an empty body reads as `{}`.
pub(crate) async fn read_json<T: DeserializeOwned>(
    state: &crate::AppState,
    request: Request,
) -> Result<T, Problem> {
    let limit = state.engine.config().body_limit_bytes.max(WORKER_BODY_MAX);
    let (parts, body) = request.into_parts();
    check_declared_length(&parts.headers, limit)?;
    let bytes = read_body(state, body, limit).await?;
    let text: &[u8] = if bytes.iter().all(u8::is_ascii_whitespace) {
        b"{}"
    } else {
        &bytes
    };
    serde_json::from_slice(text).map_err(|e| {
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
    })
}

fn worker_problem(e: WorkerError) -> Problem {
    match e {
        WorkerError::UnknownQueue(_) => Problem::not_found(e.to_string()),
        WorkerError::TooManyWaiting(_) | WorkerError::ShuttingDown => {
            Problem::unavailable(e.to_string())
        }
        WorkerError::StaleLease => Problem::new(
            StatusCode::CONFLICT,
            "stale-lease",
            "Stale lease",
            e.to_string(),
        ),
        WorkerError::Store(e) => store_problem(e),
    }
}
