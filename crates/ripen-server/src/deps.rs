//! The problems of entity dependencies (docs/dependencies.md): a reference
//! that does not hold at intake, and a retry refused while an entity it
//! depends on cannot become ready.

use axum::http::StatusCode;
use ripen_engine::deps::BadReference;
use ripen_store::deps::ReferenceRefusal;
use serde_json::json;

use crate::problem::Problem;

/// 422 for a reference field that names no entity id.
pub fn bad_reference(e: &BadReference) -> Problem {
    Problem::new(
        StatusCode::UNPROCESSABLE_ENTITY,
        "invalid-reference",
        "Invalid reference",
        e.to_string(),
    )
    .with("field", json!(e.field))
    .with("reason", json!("not_an_id"))
    .with(
        "errors",
        json!([{"pointer": pointer(&e.field), "message": e.problem}]),
    )
}

/// 422 for a reference to an entity that is missing, of another type,
/// failed or cancelled, or has too many dependents waiting.
pub fn refused(r: &ReferenceRefusal) -> Problem {
    Problem::new(
        StatusCode::UNPROCESSABLE_ENTITY,
        "invalid-reference",
        "Invalid reference",
        r.to_string(),
    )
    .with("field", json!(r.field))
    .with("reason", json!(r.reason.as_str()))
    .with("entity_id", json!(r.id.to_string()))
    .with(
        "errors",
        json!([{"pointer": pointer(&r.field), "message": r.to_string()}]),
    )
}

/// 409 for a retry of an entity that depends on one that cannot become
/// ready.
pub fn retry_blocked(r: &ReferenceRefusal) -> Problem {
    Problem::new(
        StatusCode::CONFLICT,
        "dependency-not-ready",
        "Conflict",
        format!("cannot retry: {r}; retry {} {} first", r.type_name, r.id),
    )
    .with("field", json!(r.field))
    .with("reason", json!(r.reason.as_str()))
    .with("entity_id", json!(r.id.to_string()))
}

/// The JSON pointer (RFC 6901) of a top-level field.
fn pointer(field: &str) -> String {
    format!("/{}", field.replace('~', "~0").replace('/', "~1"))
}
