//! JSON Schemas of entity types (draft 2020-12 unless the schema says
//! otherwise) and the validated payload that only this module can build.

use std::path::Path;

use serde_json::Value;

/// The most violations reported for one submission.
pub const VIOLATIONS_MAX: usize = 64;
/// The deepest nesting of arrays and objects a payload may have: what
/// serde_json accepts when it builds a value, so that every stored payload
/// can be parsed again by anyone who reads it.
pub const JSON_DEPTH_MAX: usize = 127;

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
///
/// Without a schema the body is only checked, never built into a value: the
/// check allocates nothing, and intake keeps the raw text anyway.
pub fn validate(body: &[u8], schema: Option<&Schema>) -> Result<ValidatedPayload, PayloadError> {
    let raw = std::str::from_utf8(body)
        .map_err(|_| PayloadError::Malformed("the body is not UTF-8".into()))?;
    let not_an_object = || {
        PayloadError::Invalid(vec![Violation {
            pointer: String::new(),
            message: "the payload must be a JSON object".into(),
        }])
    };
    match schema {
        Some(schema) => {
            // serde_json refuses nesting deeper than JSON_DEPTH_MAX, which
            // bounds the work a hostile body can cause.
            let value: Value = serde_json::from_str(raw)
                .map_err(|e| PayloadError::Malformed(format!("the body is not JSON: {e}")))?;
            if !value.is_object() {
                return Err(not_an_object());
            }
            let violations = schema.violations(&value);
            if !violations.is_empty() {
                return Err(PayloadError::Invalid(violations));
            }
        }
        None => {
            if nesting_exceeds(raw.as_bytes(), JSON_DEPTH_MAX) {
                return Err(PayloadError::Malformed(format!(
                    "the body is not JSON: nested deeper than {JSON_DEPTH_MAX} levels"
                )));
            }
            serde_json::from_str::<serde::de::IgnoredAny>(raw)
                .map_err(|e| PayloadError::Malformed(format!("the body is not JSON: {e}")))?;
            if !raw.trim_start().starts_with('{') {
                return Err(not_an_object());
            }
        }
    }
    Ok(ValidatedPayload {
        raw: raw.to_owned(),
    })
}

/// Whether arrays and objects nest deeper than `max` anywhere in `json`
/// (brackets inside strings do not count). Linear, and allocates nothing.
fn nesting_exceeds(json: &[u8], max: usize) -> bool {
    let mut depth = 0usize;
    let mut in_string = false;
    let mut escaped = false;
    for &b in json {
        if in_string {
            if escaped {
                escaped = false;
            } else if b == b'\\' {
                escaped = true;
            } else if b == b'"' {
                in_string = false;
            }
            continue;
        }
        match b {
            b'"' => in_string = true,
            b'[' | b'{' => {
                depth += 1;
                if depth > max {
                    return true;
                }
            }
            b']' | b'}' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    false
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
    fn without_a_schema_the_check_matches_a_full_parse() {
        let nested = |depth: usize| {
            format!(
                "{{\"a\":{}{}}}",
                "[".repeat(depth - 1),
                "]".repeat(depth - 1)
            )
        };
        let cases = [
            r#"{"a":1}"#.to_owned(),
            r#"  {"a":"[[[{{{\"]]]"}  "#.to_owned(),
            r#"{"a":1} x"#.to_owned(),
            r#"{"a":}"#.to_owned(),
            "[1]".to_owned(),
            "\"text\"".to_owned(),
            "17".to_owned(),
            String::new(),
            "{".to_owned(),
            nested(JSON_DEPTH_MAX - 1),
            nested(JSON_DEPTH_MAX),
            nested(JSON_DEPTH_MAX + 1),
            nested(JSON_DEPTH_MAX + 2),
        ];
        for case in &cases {
            let full = match serde_json::from_str::<Value>(case) {
                Err(_) => "malformed",
                Ok(v) if v.is_object() => "ok",
                Ok(_) => "invalid",
            };
            let quick = match validate(case.as_bytes(), None) {
                Err(PayloadError::Malformed(_)) => "malformed",
                Err(PayloadError::Invalid(_)) => "invalid",
                Ok(_) => "ok",
            };
            assert_eq!(quick, full, "{case:?}");
        }
    }

    #[test]
    fn bad_schema_is_refused() {
        assert!(Schema::from_value(&json!({"type": 17})).is_err());
    }
}
