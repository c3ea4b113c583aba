//! The key endpoints (docs/security.md): `POST /v1/keys`, `GET /v1/keys`,
//! `DELETE /v1/keys/{id}`. A tenant's admin manages its own tenant's keys;
//! the operator (an admin of the default tenant) manages every tenant's.

use axum::extract::rejection::PathRejection;
use axum::extract::{Extension, Path, Query, Request, State};
use axum::http::StatusCode;
use axum::response::Response;
use ripen_engine::keys::Scopes;
use ripen_engine::time::rfc3339;
use ripen_engine::SubmitError;
use ripen_store::ApiKey;
use serde::Deserialize;
use serde_json::{json, Value};

use crate::auth::Caller;
use crate::workers::{invalid, read_json};
use crate::{json_response, path_param, store_problem, Problem, Shared};

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CreateRequest {
    tenant: Option<String>,
    scopes: ScopeList,
    #[serde(default)]
    name: String,
}

/// `["submit", "read"]` or `"submit,read"`.
#[derive(Deserialize)]
#[serde(untagged)]
enum ScopeList {
    List(Vec<String>),
    Text(String),
}

fn key_view(key: &ApiKey) -> Value {
    json!({
        "id": key.id,
        "tenant": key.tenant,
        "name": key.name,
        "scopes": key.scopes,
        "created_at": rfc3339(key.created_at_us),
        "revoked_at": key.revoked_at_us.map(rfc3339),
    })
}

/// The tenant a request may act on: its own, or any for the operator.
fn tenant_scope(caller: &Caller) -> Option<&str> {
    if caller.is_operator() {
        None
    } else {
        Some(&caller.tenant)
    }
}

pub async fn create(
    State(state): Shared,
    Extension(caller): Extension<Caller>,
    request: Request,
) -> Result<Response, Problem> {
    let body: CreateRequest = read_json(&state, request).await?;
    let tenant = body.tenant.unwrap_or_else(|| caller.tenant.to_string());
    if tenant != *caller.tenant && !caller.is_operator() {
        return Err(Problem::forbidden(
            "only an admin of the default tenant makes keys for other tenants",
        ));
    }
    let scopes = match &body.scopes {
        ScopeList::List(names) => Scopes::parse(names.iter().map(String::as_str)),
        ScopeList::Text(text) => Scopes::parse(text.split(',')),
    }
    .map_err(invalid)?;
    let minted = state
        .engine
        .create_key(&tenant, &body.name, scopes)
        .await
        .map_err(|e| match e {
            SubmitError::Store(e) => store_problem(e),
            other => invalid(other.to_string()),
        })?;
    state.auth.close();
    let mut view = key_view(&minted.key);
    view["key"] = json!(minted.secret);
    Ok(json_response(StatusCode::CREATED, view))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListParams {
    tenant: Option<String>,
}

pub async fn list(
    State(state): Shared,
    Extension(caller): Extension<Caller>,
    params: Result<Query<ListParams>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, Problem> {
    let Query(params) =
        params.map_err(|e| Problem::bad_request(format!("bad query: {}", e.body_text())))?;
    let tenant = match (tenant_scope(&caller), params.tenant.as_deref()) {
        (Some(own), _) => Some(own),
        (None, asked) => asked,
    };
    let keys = state.engine.keys(tenant).await.map_err(store_problem)?;
    let items: Vec<Value> = keys.iter().map(key_view).collect();
    Ok(json_response(StatusCode::OK, json!({ "items": items })))
}

pub async fn revoke(
    State(state): Shared,
    Extension(caller): Extension<Caller>,
    p: Result<Path<String>, PathRejection>,
) -> Result<Response, Problem> {
    let id = path_param(p)?;
    let key = state
        .engine
        .revoke_key(tenant_scope(&caller), &id)
        .await
        .map_err(store_problem)?
        .ok_or_else(|| Problem::not_found(format!("no key with id {id:?}")))?;
    Ok(json_response(StatusCode::OK, key_view(&key)))
}
