//! Entities that depend on others, on the engine's side: the `references`
//! of a type in `ripen.toml`, the references a submission makes, and the
//! resolver task that runs on every node (docs/dependencies.md).
//!
//! The decisions live in the store (`ripen_store::deps`); the resolver only
//! calls `Store::resolve_dependencies` whenever new outbox rows are
//! readable, so an entity that waits costs nothing until the entity it
//! waits for settles.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use ripen_store::deps::{Reference, REFERENCES_MAX};
use ripen_store::{EntityId, Store};
use tokio::sync::Notify;

use crate::time::Clock;

/// The longest field name a reference may use.
pub const REFERENCE_FIELD_LEN_MAX: usize = 128;
/// The resolver looks at the outbox after this long even if it heard of no
/// new row: a safety net for a missed notification (one cheap query per
/// node, whatever the number of waiting entities), not the way news arrives.
pub const RESOLVER_SAFETY_MS: u64 = 5_000;
/// How long the resolver waits after a failed round.
const RESOLVER_RETRY_MS: u64 = 500;

/// Checks a type's `references` table: at most [`REFERENCES_MAX`] fields,
/// each naming a type of this configuration. Errors are (key suffix,
/// problem).
pub fn check_config(
    raw: BTreeMap<String, String>,
    type_names: &[String],
) -> Result<Vec<(String, String)>, (String, String)> {
    if raw.len() > REFERENCES_MAX {
        return Err((
            String::new(),
            format!("at most {REFERENCES_MAX} references per type"),
        ));
    }
    let mut refs = Vec::with_capacity(raw.len());
    for (field, target) in raw {
        if field.is_empty() || field.len() > REFERENCE_FIELD_LEN_MAX {
            return Err((
                format!(".{field:?}"),
                format!("a reference field is 1 to {REFERENCE_FIELD_LEN_MAX} bytes"),
            ));
        }
        if !type_names.contains(&target) {
            return Err((
                format!(".{field}"),
                format!("no entity type {target:?} is defined"),
            ));
        }
        refs.push((field, target));
    }
    Ok(refs)
}

/// A reference field of a submission that does not name an entity.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {problem}")]
pub struct BadReference {
    pub field: String,
    pub problem: String,
}

/// The references a submission of a type with `references` makes: one per
/// field present in the payload (a field left out or null references
/// nothing). `raw` is the validated payload, a JSON object.
pub fn references(
    declared: &[(String, String)],
    raw: &str,
) -> Result<Vec<Reference>, BadReference> {
    if declared.is_empty() {
        return Ok(Vec::new());
    }
    let object: serde_json::Map<String, serde_json::Value> =
        serde_json::from_str(raw).map_err(|_| BadReference {
            field: declared[0].0.clone(),
            problem: "the payload is not a JSON object".into(),
        })?;
    let mut refs = Vec::new();
    for (field, type_name) in declared {
        let bad = |problem: String| BadReference {
            field: field.clone(),
            problem,
        };
        let id = match object.get(field) {
            None | Some(serde_json::Value::Null) => continue,
            Some(serde_json::Value::String(s)) => s
                .parse::<EntityId>()
                .map_err(|_| bad(format!("{s:?} is not an entity id")))?,
            Some(_) => return Err(bad(format!("must be the id of a {type_name}, a string"))),
        };
        refs.push(Reference {
            field: field.clone(),
            type_name: type_name.clone(),
            id,
        });
    }
    Ok(refs)
}

/// Runs resolver rounds whenever `wake` is notified (new outbox rows are
/// readable) and every [`RESOLVER_SAFETY_MS`], as long as the engine.
pub async fn run_resolver(store: Arc<dyn Store>, clock: Arc<dyn Clock>, wake: Arc<Notify>) {
    loop {
        match store.resolve_dependencies(clock.now_us()).await {
            Ok(round) if round.more => continue,
            Ok(round) => {
                if round.changed > 0 {
                    tracing::debug!(
                        visited = round.visited,
                        changed = round.changed,
                        "resolved dependencies"
                    );
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "resolve the dependencies of settled entities");
                tokio::time::sleep(Duration::from_millis(RESOLVER_RETRY_MS)).await;
                continue;
            }
        }
        tokio::select! {
            _ = wake.notified() => {}
            _ = tokio::time::sleep(Duration::from_millis(RESOLVER_SAFETY_MS)) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn declared() -> Vec<(String, String)> {
        vec![("merchant_id".into(), "merchant".into())]
    }

    #[test]
    fn a_payload_references_what_its_fields_name() {
        let id = "0193c5b2-0000-7000-8000-000000000001";
        let cases: Vec<(String, Result<usize, &str>)> = vec![
            (format!(r#"{{"merchant_id":"{id}"}}"#), Ok(1)),
            (r#"{"other":1}"#.into(), Ok(0)),
            (r#"{"merchant_id":null}"#.into(), Ok(0)),
            (
                r#"{"merchant_id":"nope"}"#.into(),
                Err("is not an entity id"),
            ),
            (r#"{"merchant_id":7}"#.into(), Err("a string")),
        ];
        for (payload, want) in cases {
            match (references(&declared(), &payload), want) {
                (Ok(refs), Ok(n)) => assert_eq!(refs.len(), n, "{payload}"),
                (Err(e), Err(text)) => {
                    assert_eq!(e.field, "merchant_id");
                    assert!(e.problem.contains(text), "{payload}: {e}");
                }
                (got, want) => panic!("{payload}: got {got:?}, want {want:?}"),
            }
        }
    }

    #[test]
    fn references_name_defined_types_and_are_bounded() {
        let names = vec!["merchant".to_owned(), "store".to_owned()];
        let one: BTreeMap<String, String> = [("m".to_owned(), "merchant".to_owned())].into();
        assert_eq!(check_config(one, &names).unwrap().len(), 1);
        let unknown: BTreeMap<String, String> = [("m".to_owned(), "shop".to_owned())].into();
        let (key, problem) = check_config(unknown, &names).unwrap_err();
        assert_eq!(key, ".m");
        assert!(problem.contains("\"shop\""), "{problem}");
        let many: BTreeMap<String, String> = (0..=REFERENCES_MAX)
            .map(|i| (format!("f{i}"), "merchant".to_owned()))
            .collect();
        assert!(check_config(many, &names).is_err());
    }
}
