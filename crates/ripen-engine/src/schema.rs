//! JSON Schemas of entity types (draft 2020-12 unless the schema says
//! otherwise) and the validated payload that only this module can build.

use std::path::Path;

use serde_json::Value;

/// The most violations reported for one submission.
pub const VIOLATIONS_MAX: usize = 64;

pub struct Schema {
    validator: jsonschema::Validator,
}

impl std::fmt::Debug for Schema {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Schema")
    }
}

/// One schema violation: where in the payload, and what is wrong.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Violation {
    /// A JSON pointer into the payload (RFC 6901); empty for the whole payload.
    pub pointer: String,
    pub message: String,
}

/// A payload that parsed as a JSON object and satisfied its type's schema.
#[derive(Debug)]
pub struct ValidatedPayload {
    raw: String,
}

impl ValidatedPayload {
    pub fn into_raw(self) -> String {
        self.raw
    }
}

impl Schema {
    pub fn load(path: &Path) -> Result<Schema, String> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
        let value: Value = serde_json::from_str(&text)
            .map_err(|e| format!("{} is not JSON: {e}", path.display()))?;
        Schema::from_value(&value).map_err(|e| format!("{}: {e}", path.display()))
    }

    pub fn from_value(schema: &Value) -> Result<Schema, String> {
        let validator = jsonschema::validator_for(schema)
            .map_err(|e| format!("not a valid JSON Schema: {e}"))?;
        Ok(Schema { validator })
    }

    fn violations(&self, instance: &Value) -> Vec<Violation> {
        self.validator
            .iter_errors(instance)
            .take(VIOLATIONS_MAX)
            .map(|e| Violation {
                pointer: e.instance_path.to_string(),
                message: e.to_string(),
            })
            .collect()
    }
}

/// Why a body is not a payload.
#[derive(Debug, PartialEq, Eq)]
pub enum PayloadError {
    /// Not JSON at all (or nested too deep, or not UTF-8).
    Malformed(String),
    /// JSON, but not an object or not matching the schema.
    Invalid(Vec<Violation>),
}

/// Parses the body, checks it is a JSON object and validates it.
pub fn validate(body: &[u8], schema: Option<&Schema>) -> Result<ValidatedPayload, PayloadError> {
    let raw = std::str::from_utf8(body)
        .map_err(|_| PayloadError::Malformed("the body is not UTF-8".into()))?;
    // serde_json refuses nesting deeper than 128 levels, which bounds the
    // work a hostile body can cause.
    let value: Value = serde_json::from_str(raw)
        .map_err(|e| PayloadError::Malformed(format!("the body is not JSON: {e}")))?;
    if !value.is_object() {
        return Err(PayloadError::Invalid(vec![Violation {
            pointer: String::new(),
            message: "the payload must be a JSON object".into(),
        }]));
    }
    if let Some(schema) = schema {
        let violations = schema.violations(&value);
        if !violations.is_empty() {
            return Err(PayloadError::Invalid(violations));
        }
    }
    Ok(ValidatedPayload {
        raw: raw.to_owned(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn payloads() {
        let schema = Schema::from_value(&json!({
            "type": "object",
            "required": ["name"],
            "properties": {"name": {"type": "string"}, "age": {"type": "integer", "minimum": 0}}
        }))
        .unwrap();
        assert!(validate(br#"{"name":"a"}"#, Some(&schema)).is_ok());
        assert!(matches!(
            validate(b"{", Some(&schema)),
            Err(PayloadError::Malformed(_))
        ));
        assert!(matches!(
            validate(b"\xff", None),
            Err(PayloadError::Malformed(_))
        ));
        let deep = "[".repeat(10_000);
        assert!(matches!(
            validate(deep.as_bytes(), None),
            Err(PayloadError::Malformed(_))
        ));
        let Err(PayloadError::Invalid(v)) = validate(b"[1]", None) else {
            panic!("an array is not a payload")
        };
        assert_eq!(v[0].pointer, "");
        let Err(PayloadError::Invalid(v)) = validate(br#"{"name":"a","age":-1}"#, Some(&schema))
        else {
            panic!("age below minimum")
        };
        assert_eq!(v.len(), 1);
        assert_eq!(v[0].pointer, "/age");
    }

    #[test]
    fn bad_schema_is_refused() {
        assert!(Schema::from_value(&json!({"type": 17})).is_err());
    }
}
