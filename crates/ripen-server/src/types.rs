//! The type registry over HTTP: `GET /v1/types`, `GET /v1/types/{type}`,
//! `GET /v1/types/{type}/versions`, `GET /v1/types/{type}/versions/{n}`
//! (`n` may be `latest`) and `POST /v1/types/{type}/versions`.

use axum::extract::rejection::PathRejection;
use axum::extract::{Extension, Path, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::Response;
use ripen_core::Pipeline;
use ripen_engine::registry::{Definition, RegisterError, Registration, Version};
use ripen_engine::time::rfc3339;
use ripen_store::TypeVersion;
use serde_json::{json, Value};

use crate::auth::Caller;
use crate::{check_declared_length, json_response, read_body, store_problem, Problem, Shared};

/// The steps of a pipeline as the dashboard draws them.
fn pipeline_steps(p: &Pipeline) -> Vec<Value> {
    p.steps()[..p.forward_len()]
        .iter()
        .enumerate()
        .map(|(i, s)| {
            let compensate = p.compensation(i).map(|c| {
                let undo = p.step(c);
                json!({
                    "executor": ripen_engine::ExecutorKind::of(&undo.executor).as_str(),
                    "queue": p.queue(c),
                })
            });
            let needs: Vec<&str> = s.needs.iter().map(|&n| p.step(n).name.as_str()).collect();
            let mut step = json!({
                "name": s.name,
                "needs": needs,
                "critical": s.critical,
                "executor": ripen_engine::ExecutorKind::of(&s.executor).as_str(),
                "queue": p.queue(i),
                "timeout_ms": s.timeout_ms,
                "max_attempts": s.retry.max_attempts,
            });
            // Only a step that declares one has a compensation.
            if let Some(undo) = compensate {
                step["compensate"] = undo;
            }
            step
        })
        .collect()
}

/// A type with its latest version: `{"type", "latest_version", "versions",
/// "created_at", "steps", "references"}`.
fn type_view(v: &Version, versions: u32) -> Value {
    json!({
        "type": v.type_name,
        "latest_version": v.version,
        "versions": versions,
        "created_at": rfc3339(v.created_at_us),
        "steps": pipeline_steps(&v.pipeline),
        "references": v.definition.references,
    })
}

/// One version as stored, whether or not it builds here.
fn version_view(row: &TypeVersion, live: u64, builds: Result<(), &str>) -> Value {
    let definition: Value = serde_json::from_str(&row.definition).unwrap_or(Value::Null);
    let incompatibilities: Value =
        serde_json::from_str(&row.incompatibilities).unwrap_or_else(|_| json!([]));
    let mut steps = definition
        .get("steps")
        .cloned()
        .unwrap_or_else(|| json!([]));
    for step in steps.as_array_mut().into_iter().flatten() {
        if let Some(settings) = step.get_mut("builtin") {
            redact(settings);
        }
    }
    let mut view = json!({
        "type": row.type_name,
        "version": row.version,
        "schema": definition.get("schema").cloned().unwrap_or(Value::Null),
        "steps": steps,
        "references": definition.get("references").cloned().unwrap_or_else(|| json!({})),
        "digest": row.digest,
        "created_at": rfc3339(row.created_at_us),
        "forced": row.forced,
        "incompatibilities": incompatibilities,
        "live_entities": live,
    });
    if let Err(why) = builds {
        view["unrunnable"] = json!(why);
    }
    view
}

/// Hides the password of every URL in a connector's settings: a view is
/// not where credentials are read back.
fn redact(value: &mut Value) {
    match value {
        Value::String(s) => {
            if let Some(hidden) = without_password(s) {
                *s = hidden;
            }
        }
        Value::Array(items) => items.iter_mut().for_each(redact),
        Value::Object(m) => m.values_mut().for_each(redact),
        _ => {}
    }
}

/// `scheme://user:secret@host/…` as `scheme://user:***@host/…`; `None` for
/// a string without a password.
fn without_password(s: &str) -> Option<String> {
    let start = s.find("://")? + 3;
    let authority_end = s[start..]
        .find(['/', '?', '#'])
        .map_or(s.len(), |i| start + i);
    let at = s[start..authority_end].rfind('@')? + start;
    let colon = s[start..at].find(':')? + start;
    Some(format!("{}***{}", &s[..=colon], &s[at..]))
}

fn type_name(p: Result<Path<String>, PathRejection>) -> Result<String, Problem> {
    p.map(|Path(s)| s)
        .map_err(|e| Problem::bad_request(format!("bad path: {}", e.body_text())))
}

fn no_type(t: &str) -> Problem {
    Problem::not_found(format!("no entity type named {t:?} is registered"))
}

/// `GET /v1/types`: every registered type with its latest version.
pub async fn list(State(state): Shared) -> Response {
    let registry = state.engine.registry();
    let heads = registry.heads();
    let items: Vec<Value> = registry
        .types()
        .iter()
        .map(|v| {
            let count = heads
                .iter()
                .find(|h| h.type_name == v.type_name)
                .map_or(1, |h| h.versions);
            type_view(v, count)
        })
        .collect();
    json_response(StatusCode::OK, json!({ "items": items }))
}

/// `GET /v1/types/{type}`: one type with its latest version.
pub async fn get(
    State(state): Shared,
    p: Result<Path<String>, PathRejection>,
) -> Result<Response, Problem> {
    let t = type_name(p)?;
    let registry = state.engine.registry();
    let latest = registry.latest(&t).ok_or_else(|| no_type(&t))?;
    let count = registry.versions(&t).len() as u32;
    Ok(json_response(StatusCode::OK, type_view(&latest, count)))
}

/// `GET /v1/types/{type}/versions`: every version of a type, oldest first,
/// with its pending entities.
pub async fn versions(
    State(state): Shared,
    Extension(caller): Extension<Caller>,
    p: Result<Path<String>, PathRejection>,
) -> Result<Response, Problem> {
    let t = type_name(p)?;
    let registry = state.engine.registry();
    let versions = registry.versions(&t);
    if versions.is_empty() {
        return Err(no_type(&t));
    }
    let live = registry
        .live_entities(&caller.tenant, &t)
        .await
        .map_err(store_problem)?;
    let items: Vec<Value> = versions
        .iter()
        .map(|(row, built)| {
            json!({
                "version": row.version,
                "digest": row.digest,
                "created_at": rfc3339(row.created_at_us),
                "forced": row.forced,
                "live_entities": live.get(&row.version).copied().unwrap_or(0),
                "runnable": built.is_ok(),
            })
        })
        .collect();
    Ok(json_response(
        StatusCode::OK,
        json!({"type": t, "items": items}),
    ))
}

/// `GET /v1/types/{type}/versions/{n}`: one version, `latest` for the
/// latest.
pub async fn version(
    State(state): Shared,
    Extension(caller): Extension<Caller>,
    p: Result<Path<(String, String)>, PathRejection>,
) -> Result<Response, Problem> {
    let (t, n) = p
        .map(|Path(p)| p)
        .map_err(|e| Problem::bad_request(format!("bad path: {}", e.body_text())))?;
    let registry = state.engine.registry();
    let versions = registry.versions(&t);
    if versions.is_empty() {
        return Err(no_type(&t));
    }
    let found = if n == "latest" {
        versions.last()
    } else {
        let number: u32 = n.parse().map_err(|_| {
            Problem::not_found(format!(
                "{n:?} is not a version number (or \"latest\") of type {t:?}"
            ))
        })?;
        versions.iter().find(|(row, _)| row.version == number)
    };
    let Some((row, built)) = found else {
        return Err(Problem::not_found(format!(
            "type {t:?} has no version {n}; its versions are {}",
            versions
                .iter()
                .map(|(r, _)| r.version.to_string())
                .collect::<Vec<_>>()
                .join(", ")
        )));
    };
    let live = registry
        .live_entities(&caller.tenant, &t)
        .await
        .map_err(store_problem)?;
    let count = live.get(&row.version).copied().unwrap_or(0);
    let builds = built.as_ref().map(|_| ()).map_err(String::as_str);
    Ok(json_response(
        StatusCode::OK,
        version_view(row, count, builds),
    ))
}

/// `POST /v1/types/{type}/versions` `{"schema", "steps", "references",
/// "force"}`: `201` and the new version; `200` and the latest version when
/// it has this content already; `409` with `incompatibilities` when the
/// schema is not compatible with the latest version (unless `force`);
/// `422` with `errors` when the version is not valid.
pub async fn register(
    State(state): Shared,
    Extension(caller): Extension<Caller>,
    p: Result<Path<String>, PathRejection>,
    request: axum::extract::Request,
) -> Result<Response, Problem> {
    let t = type_name(p)?;
    if !caller.is_operator() {
        // Types are shared by every tenant: only the operator changes them.
        return Err(Problem::forbidden(
            "type versions are registered by an admin of the default tenant",
        ));
    }
    let (parts, body) = request.into_parts();
    let limit = state.engine.config().body_limit_bytes;
    check_declared_length(&parts.headers, limit)?;
    let bytes = read_body(&state, body, limit).await?;
    let body: Value = serde_json::from_slice(&bytes).map_err(|e| {
        Problem::new(
            StatusCode::BAD_REQUEST,
            "malformed-json",
            "Malformed JSON",
            format!("the body is not JSON: {e}"),
        )
    })?;
    let invalid = |errors: Vec<Value>| {
        Problem::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid-version",
            "Invalid type version",
            "the version is not valid: see errors",
        )
        .with("errors", json!(errors))
    };
    let (built, force) = Definition::from_request(&body).map_err(|problems| {
        invalid(
            problems
                .iter()
                .map(|p| json!({"pointer": p.pointer, "message": p.message}))
                .collect(),
        )
    })?;
    let registration = state
        .engine
        .register_type(&t, &built, force)
        .await
        .map_err(|e| match e {
            RegisterError::Invalid(problems) => invalid(
                problems
                    .iter()
                    .map(|p| json!({"pointer": p.pointer, "message": p.message}))
                    .collect(),
            ),
            RegisterError::BadName => invalid(vec![json!({"pointer": "", "message": format!("{t:?}: {e}")})]),
            RegisterError::Incompatible {
                latest,
                incompatibilities,
            } => Problem::new(
                StatusCode::CONFLICT,
                "incompatible-version",
                "Incompatible type version",
                format!(
                    "the schema is not compatible with version {latest} of type {t:?} ({} incompatibilities); fix them, or send \"force\": true to register it anyway",
                    incompatibilities.len()
                ),
            )
            .with("latest_version", json!(latest))
            .with("incompatibilities", json!(incompatibilities)),
            RegisterError::Contended => Problem::unavailable(e.to_string()).retry_after(1),
            RegisterError::Store(e) => store_problem(e),
        })?;
    let (status, v) = match &registration {
        Registration::Created(v) => (StatusCode::CREATED, v),
        Registration::Unchanged(v) => (StatusCode::OK, v),
    };
    let row = registry_row(v);
    let live = state
        .engine
        .registry()
        .live_entities(&caller.tenant, &t)
        .await
        .map_err(store_problem)?;
    let count = live.get(&v.version).copied().unwrap_or(0);
    let mut response = json_response(status, version_view(&row, count, Ok(())));
    let location = format!("/v1/types/{}/versions/{}", v.type_name, v.version);
    if let Ok(value) = HeaderValue::from_str(&location) {
        response.headers_mut().insert(header::LOCATION, value);
    }
    Ok(response)
}

/// The stored form of a built version, for its view.
fn registry_row(v: &Version) -> TypeVersion {
    TypeVersion {
        type_name: v.type_name.clone(),
        version: v.version,
        definition: v.definition.canonical(),
        digest: v.digest.clone(),
        created_at_us: v.created_at_us,
        forced: v.forced,
        incompatibilities: v.incompatibilities.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_in_urls_are_hidden() {
        let cases = [
            (
                "postgres://ripen:s3cret@db:5432/app",
                Some("postgres://ripen:***@db:5432/app"),
            ),
            (
                "redis://:pw@127.0.0.1:6379/0",
                Some("redis://:***@127.0.0.1:6379/0"),
            ),
            ("redis://user@127.0.0.1", None),
            ("postgres://db/app?user=a@b", None),
            ("/payload/name", None),
            ("http://a:b@h", Some("http://a:***@h")),
        ];
        for (url, hidden) in cases {
            assert_eq!(without_password(url).as_deref(), hidden, "{url}");
        }
        let mut settings = json!({"postgres_upsert": {"url": "postgres://u:p@h/d", "columns": {"a": "/payload/a"}}});
        redact(&mut settings);
        assert_eq!(settings["postgres_upsert"]["url"], "postgres://u:***@h/d");
        assert_eq!(settings["postgres_upsert"]["columns"]["a"], "/payload/a");
    }
}
