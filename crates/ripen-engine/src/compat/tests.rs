//! The table of compatibility cases: a previous schema, a new one, what the
//! pipeline reads, and exactly what the check must report.

use serde_json::{json, Value};

use super::{check, Rule};

struct Case {
    name: &'static str,
    old: Value,
    new: Value,
    reads: &'static [&'static str],
    /// `(pointer, rule)` in the order `check` returns them.
    expect: &'static [(&'static str, &'static str)],
}

fn case(
    name: &'static str,
    old: Value,
    new: Value,
    expect: &'static [(&'static str, &'static str)],
) -> Case {
    Case {
        name,
        old,
        new,
        reads: &[],
        expect,
    }
}

fn reading(
    name: &'static str,
    old: Value,
    new: Value,
    reads: &'static [&'static str],
    expect: &'static [(&'static str, &'static str)],
) -> Case {
    Case {
        name,
        old,
        new,
        reads,
        expect,
    }
}

/// An object schema with the given properties.
fn obj(properties: Value) -> Value {
    json!({"type": "object", "properties": properties})
}

fn merchant() -> Value {
    json!({
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "type": "object",
        "required": ["name", "merchant_id"],
        "properties": {
            "name": {"type": "string", "maxLength": 80, "description": "Legal name"},
            "merchant_id": {"type": "string", "pattern": "^m_[0-9]+$"},
            "plan": {"enum": ["free", "pro"]},
            "address": {"$ref": "#/$defs/address"},
            "tags": {"type": "array", "items": {"type": "string"}, "maxItems": 10}
        },
        "$defs": {
            "address": {
                "type": "object",
                "required": ["city"],
                "properties": {"city": {"type": "string"}, "zip": {"type": ["string", "null"]}}
            }
        }
    })
}

/// `merchant()` with `f` applied.
fn merchant_with(f: impl FnOnce(&mut Value)) -> Value {
    let mut m = merchant();
    f(&mut m);
    m
}

fn node(name_max: u64) -> Value {
    json!({
        "$ref": "#/$defs/node",
        "$defs": {"node": {
            "type": "object",
            "properties": {
                "name": {"type": "string", "maxLength": name_max},
                "children": {"type": "array", "items": {"$ref": "#/$defs/node"}}
            }
        }}
    })
}

fn cases() -> Vec<Case> {
    vec![
        // Identical schemas and annotations.
        case("identical merchant", merchant(), merchant(), &[]),
        case("identical with a recursive ref", node(10), node(10), &[]),
        case(
            "only descriptions and titles change",
            merchant(),
            merchant_with(|m| {
                m["properties"]["name"]["description"] = json!("Registered name");
                m["title"] = json!("Merchant");
            }),
            &[],
        ),
        case(
            "a subschema moved into $defs unchanged",
            obj(json!({"a": {"type": "string", "maxLength": 3}})),
            json!({"type": "object", "properties": {"a": {"$ref": "#/$defs/a"}}, "$defs": {"a": {"type": "string", "maxLength": 3}}}),
            &[],
        ),
        // Widenings pass.
        case(
            "string to string or null",
            obj(json!({"a": {"type": "string"}})),
            obj(json!({"a": {"type": ["string", "null"]}})),
            &[],
        ),
        case(
            "integer to number",
            obj(json!({"n": {"type": "integer"}})),
            obj(json!({"n": {"type": "number"}})),
            &[],
        ),
        case(
            "a required property becomes optional",
            json!({"type": "object", "required": ["a"], "properties": {"a": {"type": "string"}}}),
            obj(json!({"a": {"type": "string"}})),
            &[],
        ),
        case(
            "maxLength raised",
            obj(json!({"a": {"maxLength": 5}})),
            obj(json!({"a": {"maxLength": 9}})),
            &[],
        ),
        case(
            "maxLength removed",
            obj(json!({"a": {"type": "string", "maxLength": 5}})),
            obj(json!({"a": {"type": "string"}})),
            &[],
        ),
        case(
            "minimum lowered",
            obj(json!({"n": {"type": "number", "minimum": 5}})),
            obj(json!({"n": {"type": "number", "minimum": 0}})),
            &[],
        ),
        case(
            "maximum to an equivalent exclusiveMaximum on integers",
            obj(json!({"n": {"type": "integer", "maximum": 10}})),
            obj(json!({"n": {"type": "integer", "exclusiveMaximum": 10.5}})),
            &[],
        ),
        case(
            "an enum value added",
            obj(json!({"p": {"enum": ["a", "b"]}})),
            obj(json!({"p": {"enum": ["a", "b", "c"]}})),
            &[],
        ),
        case(
            "an enum removed",
            obj(json!({"p": {"enum": ["a", "b"]}})),
            obj(json!({"p": {"type": "string"}})),
            &[],
        ),
        case(
            "an enum of short values gains a maxLength they all meet",
            obj(json!({"p": {"enum": ["a", "b"]}})),
            obj(json!({"p": {"type": "string", "maxLength": 1}})),
            &[],
        ),
        case(
            "multipleOf to a divisor",
            obj(json!({"n": {"multipleOf": 10}})),
            obj(json!({"n": {"multipleOf": 5}})),
            &[],
        ),
        case(
            "a pattern removed",
            obj(json!({"z": {"type": "string", "pattern": "^[0-9]+$"}})),
            obj(json!({"z": {"type": "string"}})),
            &[],
        ),
        case(
            "additionalProperties false to true",
            json!({"type": "object", "additionalProperties": false}),
            json!({"type": "object", "additionalProperties": true}),
            &[],
        ),
        case(
            "a new optional property of a closed object",
            json!({"type": "object", "properties": {"a": {"type": "string"}}, "additionalProperties": false}),
            json!({"type": "object", "properties": {"a": {"type": "string"}, "b": {"type": "integer"}}, "additionalProperties": false}),
            &[],
        ),
        case(
            "a forbidden property becomes allowed",
            obj(json!({"x": false})),
            obj(json!({"x": {"type": "string"}})),
            &[],
        ),
        case(
            "an allOf removed",
            json!({"type": "object", "allOf": [{"required": ["a"]}]}),
            json!({"type": "object"}),
            &[],
        ),
        case(
            "keywords of other types do not matter",
            obj(json!({"s": {"type": "string"}})),
            obj(json!({"s": {"type": "string", "minimum": 5, "maxItems": 1}})),
            &[],
        ),
        case(
            "no schema to an object schema",
            Value::Null,
            json!({"type": "object"}),
            &[],
        ),
        case("no schema to true", Value::Null, json!(true), &[]),
        case("a schema to no schema", merchant(), Value::Null, &[]),
        case("true to an empty schema", json!(true), json!({}), &[]),
        case(
            "a property removed from a closed object that a pattern still allows",
            json!({"type": "object", "properties": {"x_a": {"type": "string"}}, "patternProperties": {"^x_": {"type": "string"}}, "additionalProperties": false}),
            json!({"type": "object", "patternProperties": {"^x_": {"type": "string"}}, "additionalProperties": false}),
            &[],
        ),
        // New required properties, at any depth.
        case(
            "a new required property",
            obj(json!({"zip": {"type": "string"}})),
            json!({"type": "object", "required": ["zip"], "properties": {"zip": {"type": "string"}}}),
            &[("/zip", "new_required")],
        ),
        case(
            "a new required property through a $ref",
            merchant(),
            merchant_with(|m| m["$defs"]["address"]["required"] = json!(["city", "zip"])),
            &[("/address/zip", "new_required")],
        ),
        case(
            "a new required property of array items",
            obj(
                json!({"lines": {"type": "array", "items": obj(json!({"sku": {"type": "string"}}))}}),
            ),
            obj(
                json!({"lines": {"type": "array", "items": {"type": "object", "required": ["sku"], "properties": {"sku": {"type": "string"}}}}}),
            ),
            &[("/lines/*/sku", "new_required")],
        ),
        case(
            "a new dependentRequired",
            obj(json!({"a": {}, "b": {}})),
            json!({"type": "object", "properties": {"a": {}, "b": {}}, "dependentRequired": {"a": ["b"]}}),
            &[("/b", "new_required")],
        ),
        // Narrowed types.
        case(
            "string or null to string",
            merchant(),
            merchant_with(|m| m["$defs"]["address"]["properties"]["zip"]["type"] = json!("string")),
            &[("/address/zip", "narrowed_type")],
        ),
        case(
            "number to integer",
            obj(json!({"amount": {"type": "number"}})),
            obj(json!({"amount": {"type": "integer"}})),
            &[("/amount", "narrowed_type")],
        ),
        case(
            "array items narrowed",
            obj(json!({"tags": {"type": "array", "items": {"type": ["string", "number"]}}})),
            obj(json!({"tags": {"type": "array", "items": {"type": "string"}}})),
            &[("/tags/*", "narrowed_type")],
        ),
        case(
            "a new typed property of an open object",
            obj(json!({})),
            obj(json!({"nickname": {"type": "string"}})),
            &[("/nickname", "narrowed_type")],
        ),
        case(
            "true to false",
            json!(true),
            json!(false),
            &[("", "narrowed_type")],
        ),
        // Enums and consts.
        case(
            "an enum value removed",
            merchant(),
            merchant_with(|m| m["properties"]["plan"]["enum"] = json!(["pro"])),
            &[("/plan", "removed_enum_value")],
        ),
        case(
            "a const changed",
            obj(json!({"v": {"const": 1}})),
            obj(json!({"v": {"const": 2}})),
            &[("/v", "removed_enum_value")],
        ),
        case(
            "a const added",
            obj(json!({"v": {"type": "integer"}})),
            obj(json!({"v": {"type": "integer", "const": 2}})),
            &[("/v", "removed_enum_value")],
        ),
        case(
            "an enum where there was none",
            obj(json!({"c": {"type": "string"}})),
            obj(json!({"c": {"enum": ["EUR", "USD"]}})),
            &[("/c", "removed_enum_value")],
        ),
        case(
            "an enum value now too long",
            obj(json!({"code": {"enum": ["a", "bb"]}})),
            obj(json!({"code": {"enum": ["a", "bb"], "maxLength": 1}})),
            &[("/code", "tightened_bound")],
        ),
        // Tightened bounds.
        case(
            "maxLength lowered",
            merchant(),
            merchant_with(|m| m["properties"]["name"]["maxLength"] = json!(40)),
            &[("/name", "tightened_bound")],
        ),
        case(
            "maxLength newly set",
            obj(json!({"a": {"type": "string"}})),
            obj(json!({"a": {"type": "string", "maxLength": 3}})),
            &[("/a", "tightened_bound")],
        ),
        case(
            "minLength newly set",
            obj(json!({"a": {"type": "string"}})),
            obj(json!({"a": {"type": "string", "minLength": 1}})),
            &[("/a", "tightened_bound")],
        ),
        case(
            "minimum raised",
            obj(json!({"age": {"type": "integer", "minimum": 0}})),
            obj(json!({"age": {"type": "integer", "minimum": 18}})),
            &[("/age", "tightened_bound")],
        ),
        case(
            "maximum lowered",
            obj(json!({"n": {"maximum": 10}})),
            obj(json!({"n": {"maximum": 9.5}})),
            &[("/n", "tightened_bound")],
        ),
        case(
            "maximum made exclusive",
            obj(json!({"n": {"type": "number", "maximum": 10}})),
            obj(json!({"n": {"type": "number", "exclusiveMaximum": 10}})),
            &[("/n", "tightened_bound")],
        ),
        case(
            "exclusiveMinimum newly set",
            obj(json!({"n": {"type": "number"}})),
            obj(json!({"n": {"type": "number", "exclusiveMinimum": 0}})),
            &[("/n", "tightened_bound")],
        ),
        case(
            "maxItems lowered",
            merchant(),
            merchant_with(|m| m["properties"]["tags"]["maxItems"] = json!(5)),
            &[("/tags", "tightened_bound")],
        ),
        case(
            "minItems newly set",
            obj(json!({"t": {"type": "array"}})),
            obj(json!({"t": {"type": "array", "minItems": 1}})),
            &[("/t", "tightened_bound")],
        ),
        case(
            "uniqueItems newly set",
            obj(json!({"t": {"type": "array"}})),
            obj(json!({"t": {"type": "array", "uniqueItems": true}})),
            &[("/t", "tightened_bound")],
        ),
        case(
            "maxProperties newly set",
            json!({"type": "object"}),
            json!({"type": "object", "maxProperties": 20}),
            &[("", "tightened_bound")],
        ),
        case(
            "minProperties raised",
            json!({"type": "object", "minProperties": 1}),
            json!({"type": "object", "minProperties": 2}),
            &[("", "tightened_bound")],
        ),
        case(
            "multipleOf to a non-divisor",
            obj(json!({"n": {"multipleOf": 5}})),
            obj(json!({"n": {"multipleOf": 10}})),
            &[("/n", "tightened_bound")],
        ),
        case(
            "a new pattern",
            merchant(),
            merchant_with(|m| {
                m["$defs"]["address"]["properties"]["city"]["pattern"] = json!("^[A-Z]")
            }),
            &[("/address/city", "tightened_bound")],
        ),
        case(
            "a changed pattern",
            merchant(),
            merchant_with(|m| m["properties"]["merchant_id"]["pattern"] = json!("^m_[0-9]{4}$")),
            &[("/merchant_id", "tightened_bound")],
        ),
        case(
            "a new format",
            obj(json!({"email": {"type": "string"}})),
            obj(json!({"email": {"type": "string", "format": "email"}})),
            &[("/email", "tightened_bound")],
        ),
        case(
            "a closed tuple",
            obj(json!({"pair": {"type": "array", "prefixItems": [{"type": "string"}]}})),
            obj(
                json!({"pair": {"type": "array", "prefixItems": [{"type": "string"}], "items": false}}),
            ),
            &[("/pair", "tightened_bound")],
        ),
        case(
            "a tuple position narrowed",
            obj(
                json!({"pair": {"type": "array", "prefixItems": [{"type": ["string", "integer"]}, {}]}}),
            ),
            obj(json!({"pair": {"type": "array", "prefixItems": [{"type": "string"}, {}]}})),
            &[("/pair/0", "narrowed_type")],
        ),
        case(
            "a tightened bound beside a $ref",
            json!({"type": "object", "properties": {"name": {"$ref": "#/$defs/s"}}, "$defs": {"s": {"type": "string"}}}),
            json!({"type": "object", "properties": {"name": {"$ref": "#/$defs/s", "maxLength": 5}}, "$defs": {"s": {"type": "string"}}}),
            &[("/name", "tightened_bound")],
        ),
        case(
            "a draft 7 definition tightened",
            json!({"$schema": "http://json-schema.org/draft-07/schema#", "type": "object", "properties": {"name": {"$ref": "#/definitions/name"}}, "definitions": {"name": {"type": "string", "maxLength": 10}}}),
            json!({"$schema": "http://json-schema.org/draft-07/schema#", "type": "object", "properties": {"name": {"$ref": "#/definitions/name"}}, "definitions": {"name": {"type": "string", "maxLength": 8}}}),
            &[("/name", "tightened_bound")],
        ),
        case(
            "a recursive schema tightened",
            node(10),
            node(5),
            &[("/name", "tightened_bound")],
        ),
        // Additional and removed properties.
        case(
            "additionalProperties turned false",
            obj(json!({"a": {"type": "string"}})),
            json!({"type": "object", "properties": {"a": {"type": "string"}}, "additionalProperties": false}),
            &[("/*", "closed_properties")],
        ),
        case(
            "additionalProperties narrowed to a schema",
            obj(json!({"meta": {"type": "object"}})),
            obj(json!({"meta": {"type": "object", "additionalProperties": {"type": "string"}}})),
            &[("/meta/*", "narrowed_type")],
        ),
        case(
            "a property removed from a closed object",
            json!({"type": "object", "properties": {"a": {}, "legacy": {"type": "string"}}, "additionalProperties": false}),
            json!({"type": "object", "properties": {"a": {}}, "additionalProperties": false}),
            &[("/legacy", "removed_property")],
        ),
        case(
            "a property nobody reads removed from an open object",
            merchant(),
            merchant_with(|m| {
                m["properties"].as_object_mut().unwrap().remove("plan");
            }),
            &[],
        ),
        reading(
            "a property the pipeline reads removed",
            merchant(),
            merchant_with(|m| {
                m["properties"]
                    .as_object_mut()
                    .unwrap()
                    .remove("merchant_id");
                m["required"] = json!(["name"]);
            }),
            &["/merchant_id", "/name"],
            &[("/merchant_id", "removed_property")],
        ),
        reading(
            "the parent of a read removed",
            merchant(),
            merchant_with(|m| {
                m["properties"].as_object_mut().unwrap().remove("address");
            }),
            &["/address/city"],
            &[("/address/city", "removed_property")],
        ),
        reading(
            "a read array item field removed",
            obj(
                json!({"lines": {"type": "array", "items": obj(json!({"sku": {"type": "string"}}))}}),
            ),
            obj(json!({"lines": {"type": "array", "items": {"type": "object"}}})),
            &["/lines/0/sku"],
            &[("/lines/0/sku", "removed_property")],
        ),
        reading(
            "a read removed from a closed object is one report",
            json!({"type": "object", "properties": {"merchant_id": {"type": "string"}}, "additionalProperties": false}),
            json!({"type": "object", "properties": {}, "additionalProperties": false}),
            &["/merchant_id"],
            &[("/merchant_id", "removed_property")],
        ),
        reading(
            "a required read made optional",
            merchant(),
            merchant_with(|m| m["required"] = json!(["name"])),
            &["/merchant_id"],
            &[("/merchant_id", "optional_read")],
        ),
        reading(
            "a read of a field no version declares",
            merchant(),
            merchant(),
            &["/nowhere"],
            &[],
        ),
        reading(
            "reads of an identical schema",
            merchant(),
            merchant(),
            &["/merchant_id", "/address/city", "/tags/0"],
            &[],
        ),
        reading(
            "a read that is not a pointer",
            merchant(),
            merchant(),
            &["merchant_id"],
            &[("merchant_id", "unknown")],
        ),
        // No schema before.
        case(
            "no schema to a required property",
            Value::Null,
            json!({"type": "object", "required": ["a"]}),
            &[("/a", "new_required")],
        ),
        case(
            "no schema to a closed object",
            Value::Null,
            json!({"type": "object", "additionalProperties": false}),
            &[("/*", "closed_properties")],
        ),
        case(
            "no schema to a typed property",
            Value::Null,
            obj(json!({"a": {"type": "string"}})),
            &[("/a", "narrowed_type")],
        ),
        case(
            "no schema to false",
            Value::Null,
            json!(false),
            &[("", "narrowed_type")],
        ),
        // What the check cannot reason about.
        case(
            "a remote $ref",
            obj(json!({"x": {"type": "string"}})),
            obj(json!({"x": {"$ref": "https://example.com/x.json"}})),
            &[("/x", "unknown")],
        ),
        case(
            "an anyOf changed",
            obj(json!({"x": {"anyOf": [{"type": "string"}, {"type": "integer"}]}})),
            obj(json!({"x": {"anyOf": [{"type": "string"}]}})),
            &[("/x", "unknown")],
        ),
        case(
            "a oneOf added",
            obj(json!({"x": {}})),
            obj(json!({"x": {"oneOf": [{"type": "string"}, {"type": "integer"}]}})),
            &[("/x", "unknown")],
        ),
        case(
            "a not added",
            obj(json!({"x": {}})),
            obj(json!({"x": {"not": {"type": "null"}}})),
            &[("/x", "unknown")],
        ),
        case(
            "an if/then changed",
            json!({"type": "object", "if": {"required": ["a"]}, "then": {"required": ["b"]}}),
            json!({"type": "object", "if": {"required": ["a"]}, "then": {"required": ["c"]}}),
            &[("", "unknown")],
        ),
        case(
            "dependentSchemas added",
            json!({"type": "object"}),
            json!({"type": "object", "dependentSchemas": {"a": {"required": ["b"]}}}),
            &[("", "unknown")],
        ),
        case(
            "unevaluatedProperties changed",
            json!({"type": "object"}),
            json!({"type": "object", "unevaluatedProperties": false}),
            &[("", "unknown")],
        ),
        case(
            "patternProperties changed",
            json!({"type": "object", "patternProperties": {"^x_": {"type": "string"}}}),
            json!({"type": "object", "patternProperties": {"^y_": {"type": "string"}}}),
            &[("", "unknown")],
        ),
        case(
            "an identical anyOf passes",
            obj(json!({"x": {"anyOf": [{"type": "string"}, {"type": "integer"}]}})),
            obj(
                json!({"x": {"anyOf": [{"type": "string"}, {"type": "integer"}], "description": "x"}}),
            ),
            &[],
        ),
        // Several at once, in order.
        case(
            "several changes are sorted by pointer, then rule",
            merchant(),
            merchant_with(|m| {
                m["required"] = json!(["name", "merchant_id", "plan"]);
                m["properties"]["plan"]["enum"] = json!(["pro"]);
                m["properties"]["name"]["maxLength"] = json!(10);
                m["additionalProperties"] = json!(false);
            }),
            &[
                ("/*", "closed_properties"),
                ("/name", "tightened_bound"),
                ("/plan", "new_required"),
                ("/plan", "removed_enum_value"),
            ],
        ),
    ]
}

#[test]
fn the_table() {
    let cases = cases();
    assert!(cases.len() >= 40, "{} cases", cases.len());
    let mut failures = Vec::new();
    for c in &cases {
        let reads: Vec<String> = c.reads.iter().map(|r| r.to_string()).collect();
        let got = check(&c.old, &c.new, &reads);
        let pairs: Vec<(&str, &str)> = got
            .iter()
            .map(|i| (i.pointer.as_str(), i.rule.as_str()))
            .collect();
        if pairs != c.expect {
            failures.push(format!(
                "{}: expected {:?}, got {:#?}",
                c.name, c.expect, got
            ));
        }
        for i in &got {
            let named = i.pointer.is_empty()
                || i.message.contains(&format!("`{}`", i.pointer))
                || i.rule == Rule::Unknown;
            if !named || i.message.len() < 20 {
                failures.push(format!(
                    "{}: the message does not name {:?}: {}",
                    c.name, i.pointer, i.message
                ));
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
}

/// Each rule of the table, so that none goes untested.
#[test]
fn every_rule_is_in_the_table() {
    let seen: std::collections::BTreeSet<&str> = cases()
        .iter()
        .flat_map(|c| c.expect.iter().map(|(_, r)| *r))
        .collect();
    for rule in [
        Rule::NewRequired,
        Rule::NarrowedType,
        Rule::RemovedEnumValue,
        Rule::TightenedBound,
        Rule::RemovedProperty,
        Rule::ClosedProperties,
        Rule::OptionalRead,
        Rule::Unknown,
    ] {
        assert!(seen.contains(rule.as_str()), "no case for {rule}");
    }
}

#[test]
fn a_report_serialises_as_pointer_rule_message() {
    let got = check(
        &obj(json!({"zip": {"type": "string"}})),
        &json!({"type": "object", "required": ["zip"], "properties": {"zip": {"type": "string"}}}),
        &[],
    );
    assert_eq!(
        serde_json::to_value(&got).unwrap(),
        json!([{
            "pointer": "/zip",
            "rule": "new_required",
            "message": "`/zip` is newly required; payloads the previous version accepted may lack it"
        }])
    );
}

#[test]
fn a_narrowed_type_says_what_was_lost() {
    let got = check(
        &obj(json!({"a": {"type": ["string", "null"]}})),
        &obj(json!({"a": {"type": "string"}})),
        &[],
    );
    assert_eq!(got.len(), 1);
    assert_eq!(
        got[0].message,
        "`/a` no longer accepts null; the new version accepts only string"
    );
}

#[test]
fn a_huge_recursive_schema_is_cut_short_as_unknown() {
    // 40 definitions, each referring twice to the next: 2^40 paths.
    let mut defs = serde_json::Map::new();
    for i in 0..40 {
        let next = json!({"$ref": format!("#/$defs/d{}", i + 1)});
        defs.insert(format!("d{i}"), obj(json!({"a": next.clone(), "b": next})));
    }
    defs.insert("d40".into(), json!({"type": "string"}));
    let old = json!({"$ref": "#/$defs/d0", "$defs": defs});
    let mut new = old.clone();
    new["$defs"]["d40"] = json!({"type": "integer"});
    let got = check(&old, &new, &[]);
    assert!(got.iter().any(|i| i.rule == Rule::Unknown), "{got:#?}");
}
