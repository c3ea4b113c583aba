//! Intake's payload check from any bytes, against any schema: the input is
//! a JSON Schema, a NUL byte, then the body. Besides never panicking, a
//! schema that accepts everything refuses exactly what no schema refuses,
//! with the same kind of problem (docs/api.md: a type without a schema
//! refuses exactly what a typed one refuses).
#![no_main]

use libfuzzer_sys::fuzz_target;
use ripen_engine::schema::{validate, PayloadError, Schema};

fn kind(r: &Result<ripen_engine::schema::ValidatedPayload, PayloadError>) -> &'static str {
    match r {
        Ok(_) => "ok",
        Err(PayloadError::Malformed(_)) => "malformed",
        Err(PayloadError::TooDeep(_)) => "too deep",
        Err(PayloadError::Invalid(_)) => "invalid",
    }
}

fuzz_target!(|data: &[u8]| {
    let (schema, body) = match data.iter().position(|&b| b == 0) {
        Some(at) => (&data[..at], &data[at + 1..]),
        None => (&b"{}"[..], data),
    };
    let untyped = validate(body, None);
    let open = Schema::from_value(&serde_json::json!({})).expect("the empty schema");
    let typed = validate(body, Some(&open));
    assert_eq!(
        kind(&untyped),
        kind(&typed),
        "{:?}",
        String::from_utf8_lossy(body)
    );
    if let Ok(p) = &untyped {
        assert_eq!(
            p.raw().as_bytes(),
            body,
            "the payload is kept byte for byte"
        );
    }
    if let Ok(value) = serde_json::from_slice::<serde_json::Value>(schema) {
        if let Ok(schema) = Schema::from_value(&value) {
            let checked = validate(body, Some(&schema));
            if let Err(PayloadError::Invalid(violations)) = &checked {
                assert!(!violations.is_empty());
            }
            // A schema can refuse a payload, never accept a body that is
            // not a JSON object.
            if checked.is_ok() {
                assert!(untyped.is_ok());
            }
        }
    }
});
