//! JSON Schemas of entity types (draft 2020-12 unless the schema says
//! otherwise) and the validated payload that only this module can build.

use std::path::Path;

use serde_json::Value;

use crate::limits::{JsonLimit, JsonLimits};

mod json;

/// The most violations reported for one submission.
pub const VIOLATIONS_MAX: usize = 64;
pub use crate::limits::JSON_DEPTH_MAX;

/// How often one `pattern` or `patternProperties` match may backtrack
/// before the payload is refused: a backtracking pattern such as
/// `^(?=\w)(\w+\s?)+$` then costs a request about a millisecond, never
/// seconds.
pub const PATTERN_BACKTRACK_MAX: usize = 20_000;

/// The keywords whose cost grows with more than the payload's size: a
/// schema with any of them is validated off the async threads.
const COSTLY_KEYWORDS: &[&str] = &[
    "pattern",
    "patternProperties",
    "anyOf",
    "oneOf",
    "allOf",
    "not",
    "if",
    "$ref",
    "$dynamicRef",
    "dependentSchemas",
    "contains",
    "uniqueItems",
    "format",
];

pub struct Schema {
    validator: jsonschema::Validator,
    /// Whether it uses a [`COSTLY_KEYWORDS`] keyword anywhere.
    costly: bool,
    /// The schema as written: what the type registry stores and compares.
    source: Value,
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

impl Schema {
    pub fn load(path: &Path) -> Result<Schema, String> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
        let value: Value = serde_json::from_str(&text)
            .map_err(|e| format!("{} is not JSON: {e}", path.display()))?;
        Schema::from_value(&value).map_err(|e| format!("{}: {e}", path.display()))
    }

    pub fn from_value(schema: &Value) -> Result<Schema, String> {
        let validator = jsonschema::options()
            .with_pattern_options(
                jsonschema::PatternOptions::fancy_regex().backtrack_limit(PATTERN_BACKTRACK_MAX),
            )
            .build(schema)
            .map_err(|e| format!("not a valid JSON Schema: {e}"))?;
        Ok(Schema {
            validator,
            costly: uses_costly_keywords(schema),
            source: schema.clone(),
        })
    }

    /// Whether validating against it may cost more than reading the
    /// payload: see [`COSTLY_KEYWORDS`].
    pub fn costly(&self) -> bool {
        self.costly
    }

    /// The schema document it was compiled from.
    pub fn source(&self) -> &Value {
        &self.source
    }

    fn violations(&self, instance: &Value) -> Result<Vec<Violation>, PayloadError> {
        if self.validator.is_valid(instance) {
            return Ok(Vec::new());
        }
        let mut violations = Vec::new();
        for e in self.validator.iter_errors(instance).take(VIOLATIONS_MAX) {
            if let jsonschema::error::ValidationErrorKind::BacktrackLimitExceeded { .. } = e.kind {
                return Err(PayloadError::TooCostly(format!(
                    "matching the pattern at {} against the value at {:?} backtracked more than {PATTERN_BACKTRACK_MAX} times",
                    e.schema_path, e.instance_path.to_string()
                )));
            }
            violations.push(Violation {
                pointer: e.instance_path.to_string(),
                message: e.to_string(),
            });
        }
        Ok(violations)
    }
}

/// Whether a schema document names a costly keyword anywhere (a property
/// merely named like one counts too, which only costs a thread hop).
fn uses_costly_keywords(schema: &Value) -> bool {
    match schema {
        Value::Object(map) => map
            .iter()
            .any(|(k, v)| COSTLY_KEYWORDS.contains(&k.as_str()) || uses_costly_keywords(v)),
        Value::Array(items) => items.iter().any(uses_costly_keywords),
        _ => false,
    }
}

/// Why a body is not a payload.
#[derive(Debug, PartialEq, Eq)]
pub enum PayloadError {
    /// Not JSON at all, or not UTF-8, or refused by intake's JSON rules
    /// (a number out of range, a lone surrogate, nesting too deep, a key
    /// twice in one object). The message says which, and where.
    Malformed(String),
    /// JSON past one of intake's [`JsonLimits`]: nested too deep, too many
    /// keys or items, too long a string.
    Limit { limit: JsonLimit, message: String },
    /// JSON, but not an object or not matching the schema.
    Invalid(Vec<Violation>),
    /// Validating it would cost more than intake spends on one payload (a
    /// pattern that backtracks too much).
    TooCostly(String),
}

impl From<json::Refused> for PayloadError {
    fn from(r: json::Refused) -> PayloadError {
        match r {
            json::Refused::Malformed(m) => PayloadError::Malformed(m),
            json::Refused::Limit { limit, message } => PayloadError::Limit { limit, message },
        }
    }
}

/// Parses the body, checks it is a JSON object and validates it.
///
/// Typed and schema-less types read the body with the same rules (one
/// reader, in `schema/json.rs`): it must be UTF-8 JSON, with numbers in range, no lone
/// surrogates, no nesting deeper than [`JSON_DEPTH_MAX`] and no key twice in
/// one object (`Malformed`), and it must be an object (`Invalid`). Without a
/// schema the body is only read, never built into a value: intake keeps the
/// raw text anyway.
pub fn validate(
    body: &[u8],
    schema: Option<&Schema>,
    limits: &JsonLimits,
) -> Result<(), PayloadError> {
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
            let value = json::read_value(raw, limits)?;
            if !value.is_object() {
                return Err(not_an_object());
            }
            let violations = schema.violations(&value)?;
            if !violations.is_empty() {
                return Err(PayloadError::Invalid(violations));
            }
        }
        None => {
            if !json::read_plain(raw, limits)? {
                return Err(not_an_object());
            }
        }
    }
    Ok(())
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
        assert!(validate(br#"{"name":"a"}"#, Some(&schema), &JsonLimits::default()).is_ok());
        assert!(matches!(
            validate(b"{", Some(&schema), &JsonLimits::default()),
            Err(PayloadError::Malformed(_))
        ));
        assert!(matches!(
            validate(b"\xff", None, &JsonLimits::default()),
            Err(PayloadError::Malformed(_))
        ));
        let deep = "[".repeat(10_000);
        assert!(matches!(
            validate(deep.as_bytes(), None, &JsonLimits::default()),
            Err(PayloadError::Limit {
                limit: JsonLimit::Depth,
                ..
            })
        ));
        let Err(PayloadError::Invalid(v)) = validate(b"[1]", None, &JsonLimits::default()) else {
            panic!("an array is not a payload")
        };
        assert_eq!(v[0].pointer, "");
        let Err(PayloadError::Invalid(v)) = validate(
            br#"{"name":"a","age":-1}"#,
            Some(&schema),
            &JsonLimits::default(),
        ) else {
            panic!("age below minimum")
        };
        assert_eq!(v.len(), 1);
        assert_eq!(v[0].pointer, "/age");
    }

    /// A schema for the typed path that every object satisfies, so that
    /// only the JSON rules can refuse a body.
    fn any_object() -> Schema {
        Schema::from_value(&json!({"type": "object"})).unwrap()
    }

    /// A merchant schema, as a configured type would have.
    fn merchant() -> Schema {
        Schema::from_value(&json!({
            "type": "object",
            "properties": {
                "name": {"type": "string"},
                "address": {"type": "object", "properties": {"city": {"type": "string"}}},
                "tags": {"type": "array", "items": {"type": "string"}}
            }
        }))
        .unwrap()
    }

    /// `ok`, `invalid` or the malformed message.
    fn outcome(body: &str, schema: Option<&Schema>) -> String {
        match validate(body.as_bytes(), schema, &JsonLimits::default()) {
            Ok(_) => "ok".into(),
            Err(PayloadError::Invalid(_)) => "invalid".into(),
            Err(PayloadError::Malformed(m)) => format!("malformed: {m}"),
            // Deeper than serde_json reads is not JSON to it either.
            Err(PayloadError::Limit { message, .. }) => {
                format!("malformed (past a limit): {message}")
            }
            Err(PayloadError::TooCostly(m)) => format!("too costly: {m}"),
        }
    }

    fn nested(depth: usize) -> String {
        format!(
            "{{\"a\":{}{}}}",
            "[".repeat(depth - 1),
            "]".repeat(depth - 1)
        )
    }

    /// Bodies without duplicate keys: both paths agree with a full parse by
    /// serde_json, and with each other to the letter.
    #[test]
    fn both_paths_match_a_full_parse() {
        let cases = [
            r#"{"a":1}"#.to_owned(),
            r#"  {"a":"[[[{{{\"]]]"}  "#.to_owned(),
            r#"{"a":1} x"#.to_owned(),
            r#"{"a":}"#.to_owned(),
            "[1]".to_owned(),
            "\"text\"".to_owned(),
            "17".to_owned(),
            "null".to_owned(),
            String::new(),
            "{".to_owned(),
            r#"{"n":1e400}"#.to_owned(),
            r#"{"n":[-1e400]}"#.to_owned(),
            r#"{"n":18446744073709551616}"#.to_owned(),
            r#"{"n":-9223372036854775809}"#.to_owned(),
            r#"{"n":1e308}"#.to_owned(),
            r#"{"s":"\ud800"}"#.to_owned(),
            r#"{"s":"\udc00"}"#.to_owned(),
            r#"{"s":"\ud800\u0041"}"#.to_owned(),
            r#"{"\ud800":1}"#.to_owned(),
            r#"{"s":"\ud83d\ude00"}"#.to_owned(),
            "{\"s\":\"tab\there\"}".to_owned(),
            r#"{"s":"\x"}"#.to_owned(),
            nested(JSON_DEPTH_MAX - 1),
            nested(JSON_DEPTH_MAX),
            nested(JSON_DEPTH_MAX + 1),
            nested(JSON_DEPTH_MAX + 2),
            "[".repeat(10_000),
        ];
        let typed = any_object();
        for case in &cases {
            let full = match serde_json::from_str::<Value>(case) {
                Err(_) => "malformed",
                Ok(v) if v.is_object() => "ok",
                Ok(_) => "invalid",
            };
            let plain = outcome(case, None);
            assert!(
                plain.starts_with(full),
                "{case:?}: {plain} but a full parse says {full}"
            );
            assert_eq!(outcome(case, Some(&typed)), plain, "{case:?}");
        }
    }

    /// A key twice in one object is refused at any depth, by both paths,
    /// with a message naming the key and the object's pointer.
    #[test]
    fn duplicate_keys_are_refused_with_key_and_pointer() {
        let many: Vec<String> = (0..40).map(|i| format!("\"k{i}\":{i}")).collect();
        let many = many.join(",");
        let cases = [
            (
                r#"{"a":1,"a":2}"#.to_owned(),
                r#""a" in the top-level object"#,
            ),
            (
                r#"{"a":1,"b":2,"a":1}"#.to_owned(),
                r#""a" in the top-level object"#,
            ),
            (
                r#"{"a":1,"\u0061":2}"#.to_owned(),
                r#""a" in the top-level object"#,
            ),
            (
                r#"{"address":{"city":"x","city":"y"}}"#.to_owned(),
                r#""city" at /address"#,
            ),
            (
                r#"{"tags":[{"k":1},{"k":1,"k":2}]}"#.to_owned(),
                r#""k" at /tags/1"#,
            ),
            (
                r#"{"a/b":{"~":{"x":[1,{"q\"":0,"q\"":1}]}}}"#.to_owned(),
                r#""q\"" at /a~1b/~0/x/1"#,
            ),
            (
                format!("{{{many},\"k7\":0}}"),
                r#""k7" in the top-level object"#,
            ),
            (format!("{{\"o\":{{{many},\"k39\":0}}}}"), r#""k39" at /o"#),
            // The first problem in the text is the one reported.
            (
                r#"{"a":1,"a":2,"b":}"#.to_owned(),
                r#""a" in the top-level object"#,
            ),
        ];
        for schema in [None, Some(&merchant()), Some(&any_object())] {
            for (body, said) in &cases {
                let got = outcome(body, schema);
                assert!(
                    got.starts_with("malformed: duplicate key ") && got.contains(said),
                    "{body}: {got}, expected it to name {said}"
                );
            }
        }
        assert!(outcome(r#"{"a":1,"b":}"#, None).starts_with("malformed: the body is not JSON"));
    }

    /// Each JSON limit refuses one past it, on both paths, naming itself
    /// and where; at the limit a body passes.
    #[test]
    fn json_limits_refuse_one_past_and_name_where() {
        let limits = JsonLimits {
            depth_max: 4,
            object_keys_max: 3,
            keys_total_max: 6,
            string_bytes_max: 5,
            array_items_max: 2,
        };
        let cases = [
            (r#"{"a":[[[1]]]}"#, None, ""),
            (r#"{"a":[[[[1]]]]}"#, Some(JsonLimit::Depth), ""),
            (r#"{"a":1,"b":2,"c":3}"#, None, ""),
            (
                r#"{"o":{"a":1,"b":2,"c":3,"d":4}}"#,
                Some(JsonLimit::ObjectKeys),
                "at /o",
            ),
            (r#"{"a":{"b":1,"c":2},"d":{"e":1,"f":2}}"#, None, ""),
            (
                r#"{"a":{"b":1,"c":2},"d":{"e":1,"f":2,"g":3}}"#,
                Some(JsonLimit::KeysTotal),
                "at /d",
            ),
            (r#"{"s":"12345"}"#, None, ""),
            (
                r#"{"s":["123456"]}"#,
                Some(JsonLimit::StringBytes),
                "at /s/0",
            ),
            (
                r#"{"123456":1}"#,
                Some(JsonLimit::StringBytes),
                "at the top level",
            ),
            (r#"{"l":[1,2]}"#, None, ""),
            (r#"{"l":[1,2,3]}"#, Some(JsonLimit::ArrayItems), "at /l"),
        ];
        for schema in [None, Some(&any_object())] {
            for (body, want, at) in cases {
                match (validate(body.as_bytes(), schema, &limits), want) {
                    (Ok(_), None) => {}
                    (Err(PayloadError::Limit { limit, message }), Some(want)) => {
                        assert_eq!(limit, want, "{body}");
                        assert!(message.contains(at), "{body}: {message}");
                        if want != JsonLimit::Depth {
                            assert!(message.contains(want.key()), "{body}: {message}");
                        }
                    }
                    (got, _) => panic!("{body}: {got:?}, expected {want:?}"),
                }
            }
        }
    }

    /// A backtracking pattern is refused as too costly, not as a violation.
    #[test]
    fn a_backtracking_pattern_is_too_costly() {
        let schema = Schema::from_value(&json!({
            "properties": {"v": {"type": "string", "pattern": "^(?=\\w)(\\w+\\s?)+$"}}
        }))
        .unwrap();
        assert!(schema.costly());
        let body = json!({"v": format!("{}!", "a".repeat(300))}).to_string();
        assert!(matches!(
            validate(body.as_bytes(), Some(&schema), &JsonLimits::default()),
            Err(PayloadError::TooCostly(_))
        ));
        let ok = json!({"v": "hello world"}).to_string();
        assert!(validate(ok.as_bytes(), Some(&schema), &JsonLimits::default()).is_ok());
        assert!(!any_object().costly());
    }

    /// The same key in different objects is no duplicate.
    #[test]
    fn repeated_keys_in_different_objects_are_fine() {
        let many: Vec<String> = (0..40)
            .map(|i| format!("\"k{i}\":{{\"k{i}\":{i}}}"))
            .collect();
        let cases = [
            r#"{"x":{"x":{"x":1}}}"#.to_owned(),
            r#"{"a":{"x":1},"b":{"x":2}}"#.to_owned(),
            r#"{"list":[{"a":1},{"a":2}],"a":3}"#.to_owned(),
            r#"{"a":1,"A":2,"a ":3}"#.to_owned(),
            format!("{{{}}}", many.join(",")),
        ];
        for schema in [None, Some(&merchant())] {
            for case in &cases {
                assert_eq!(outcome(case, schema), "ok", "{case}");
            }
        }
    }

    /// A schema-less type and a typed one refuse the same bodies alike: the
    /// same kind of error with the same message.
    #[test]
    fn plain_and_merchant_refuse_the_same_bodies() {
        let bodies = [
            r#"{"name":"a","name":"b"}"#.to_owned(),
            r#"{"address":{"city":"x","city":"y"}}"#.to_owned(),
            r#"{"name":"a","n":1e400}"#.to_owned(),
            r#"{"name":"\ud800"}"#.to_owned(),
            nested(JSON_DEPTH_MAX + 1),
            r#"["name"]"#.to_owned(),
            "\"merchant\"".to_owned(),
            "{\"name\":".to_owned(),
        ];
        let merchant = merchant();
        for body in &bodies {
            let plain = validate(body.as_bytes(), None, &JsonLimits::default()).map(|_| ());
            let typed =
                validate(body.as_bytes(), Some(&merchant), &JsonLimits::default()).map(|_| ());
            assert!(plain.is_err(), "{body}");
            assert_eq!(plain, typed, "{body}");
        }
    }

    /// The typed path builds the value serde_json would.
    #[test]
    fn the_typed_path_builds_what_serde_json_builds() {
        let body = r#"{"a":[1,-2,3.5,1e300,18446744073709551615,true,null,"\u00e9\ud83d\ude00"],"b":{"c":{}},"d":""}"#;
        let ours = json::read_value(body, &JsonLimits::default()).unwrap();
        assert_eq!(ours, serde_json::from_str::<Value>(body).unwrap());
    }

    /// What one read costs, in ns per KiB, for both paths: run with
    /// `--ignored --nocapture`. It checks what it reads, and asserts no
    /// timing.
    #[test]
    #[ignore = "a timing loop; run it by hand"]
    fn cost_per_kib() {
        let items: Vec<String> = (0..2_000)
            .map(|i| {
                format!(
                    r#"{{"id":{i},"name":"merchant {i}","city":"Lyon","tags":["a","b\u00e9"],"score":{i}.5,"ok":true}}"#
                )
            })
            .collect();
        let body = format!(r#"{{"name":"bulk","items":[{}]}}"#, items.join(","));
        let kib = body.len() as f64 / 1024.0;
        // The duplicate is in the last item, so that the whole body is read.
        let at = body.rfind(r#""ok":true"#).unwrap();
        let dup = format!("{}\"ok\":false,{}", &body[..at], &body[at..]);
        let rounds = 50;
        let per_kib = |f: &dyn Fn()| {
            let start = std::time::Instant::now();
            for _ in 0..rounds {
                f();
            }
            start.elapsed().as_nanos() as f64 / rounds as f64 / kib
        };
        let typed = any_object();
        let plain =
            per_kib(&|| assert!(validate(body.as_bytes(), None, &JsonLimits::default()).is_ok()));
        let refused =
            per_kib(&|| assert!(validate(dup.as_bytes(), None, &JsonLimits::default()).is_err()));
        let read = per_kib(&|| assert!(json::read_value(&body, &JsonLimits::default()).is_ok()));
        let whole = per_kib(&|| {
            assert!(validate(body.as_bytes(), Some(&typed), &JsonLimits::default()).is_ok())
        });
        let ignored =
            per_kib(&|| assert!(serde_json::from_str::<serde::de::IgnoredAny>(&body).is_ok()));
        let value = per_kib(&|| assert!(serde_json::from_str::<Value>(&body).is_ok()));
        println!(
            "{kib:.0} KiB body, ns per KiB: schema-less {plain:.0} (a duplicate in the last \
             item: {refused:.0}); typed: read {read:.0}, read + validate {whole:.0}; \
             serde_json in this build: IgnoredAny {ignored:.0}, Value {value:.0}"
        );
    }

    #[test]
    fn bad_schema_is_refused() {
        assert!(Schema::from_value(&json!({"type": 17})).is_err());
    }
}

#[cfg(test)]
mod props {
    //! Property tests of intake's JSON rules on random objects.

    use super::*;
    use proptest::prelude::*;

    fn leaf() -> impl Strategy<Value = Value> {
        prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::Bool),
            any::<i64>().prop_map(Value::from),
            any::<u64>().prop_map(Value::from),
            (-1e300f64..1e300).prop_map(Value::from),
            any::<String>().prop_map(Value::String),
        ]
    }

    fn key() -> impl Strategy<Value = String> {
        prop_oneof!["[a-c]{1,2}".prop_map(String::from), any::<String>(),]
    }

    fn json() -> impl Strategy<Value = Value> {
        leaf().prop_recursive(6, 64, 6, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
                prop::collection::btree_map(key(), inner, 0..24)
                    .prop_map(|m| Value::Object(m.into_iter().collect())),
            ]
        })
    }

    fn object() -> impl Strategy<Value = Value> {
        prop::collection::btree_map(key(), json(), 1..8)
            .prop_map(|m| Value::Object(m.into_iter().collect()))
    }

    /// Writes `value` as serde_json does, except that the `target`-th
    /// non-empty object (in document order) writes its first member twice.
    /// Returns whether there was such an object.
    fn write_with_duplicate(
        value: &Value,
        target: usize,
        seen: &mut usize,
        out: &mut String,
    ) -> bool {
        match value {
            Value::Array(items) => {
                out.push('[');
                let mut done = false;
                for (i, item) in items.iter().enumerate() {
                    if i > 0 {
                        out.push(',');
                    }
                    done |= write_with_duplicate(item, target, seen, out);
                }
                out.push(']');
                done
            }
            Value::Object(map) if !map.is_empty() => {
                let here = *seen == target;
                *seen += 1;
                let mut done = here;
                out.push('{');
                for (i, (k, v)) in map.iter().enumerate() {
                    if i > 0 {
                        out.push(',');
                    }
                    out.push_str(&serde_json::to_string(k).unwrap());
                    out.push(':');
                    done |= write_with_duplicate(v, target, seen, out);
                }
                if here {
                    let (k, v) = map.iter().next().unwrap();
                    out.push(',');
                    out.push_str(&serde_json::to_string(k).unwrap());
                    out.push(':');
                    out.push_str(&serde_json::to_string(v).unwrap());
                }
                out.push('}');
                done
            }
            other => {
                out.push_str(&serde_json::to_string(other).unwrap());
                false
            }
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        /// serde_json's text of a random object is accepted by both paths,
        /// and the typed path reads it as serde_json does (floats need not
        /// round-trip exactly through serde_json's text).
        #[test]
        fn serialised_objects_are_accepted(value in object()) {
            let text = serde_json::to_string(&value).unwrap();
            let typed = Schema::from_value(&serde_json::json!({"type": "object"})).unwrap();
            prop_assert!(validate(text.as_bytes(), None, &JsonLimits::default()).is_ok(), "{text}");
            prop_assert!(validate(text.as_bytes(), Some(&typed), &JsonLimits::default()).is_ok(), "{text}");
            prop_assert_eq!(json::read_value(&text, &JsonLimits::default()).unwrap(), serde_json::from_str::<Value>(&text).unwrap());
        }

        /// The same text with one member of one object written twice is
        /// refused by both paths, alike.
        #[test]
        fn a_duplicated_key_is_refused(value in object(), pick in any::<prop::sample::Index>()) {
            let mut count = 0;
            write_with_duplicate(&value, usize::MAX, &mut count, &mut String::new());
            let mut text = String::new();
            let target = pick.index(count);
            prop_assert!(write_with_duplicate(&value, target, &mut 0, &mut text));
            let typed = Schema::from_value(&serde_json::json!({"type": "object"})).unwrap();
            let plain = validate(text.as_bytes(), None, &JsonLimits::default()).map(|_| ());
            let Err(PayloadError::Malformed(message)) = &plain else {
                return Err(TestCaseError::fail(format!("accepted: {text}")));
            };
            prop_assert!(message.starts_with("duplicate key "), "{message}");
            prop_assert_eq!(&validate(text.as_bytes(), Some(&typed), &JsonLimits::default()).map(|_| ()), &plain);
        }
    }
}
