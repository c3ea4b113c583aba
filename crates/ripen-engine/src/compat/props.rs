//! Property tests of the compatibility check on generated schemas: a schema
//! is always compatible with itself, whatever of it the pipeline reads; one
//! with a constraint keyword removed everywhere (a widening) is compatible
//! too; and a new required property is always reported where it was added.

use proptest::prelude::*;
use serde_json::{json, Map, Value};

use super::{check, pointer, Rule};

/// A JSON object from optional members.
fn object_of(members: Vec<(&str, Option<Value>)>) -> Value {
    let map: Map<String, Value> = members
        .into_iter()
        .filter_map(|(k, v)| v.map(|v| (k.to_owned(), v)))
        .collect();
    Value::Object(map)
}

fn leaf() -> impl Strategy<Value = Value> {
    let string = (
        prop::option::of(1u64..50),
        prop::option::of(0u64..3),
        prop::option::of(prop::sample::select(vec!["^[a-z]+$", "^m_[0-9]+$", "x"])),
        prop::option::of(prop::sample::select(vec!["email", "date", "uuid"])),
        any::<bool>(),
    )
        .prop_map(|(max, min, pattern, format, nullable)| {
            object_of(vec![
                (
                    "type",
                    Some(if nullable {
                        json!(["string", "null"])
                    } else {
                        json!("string")
                    }),
                ),
                ("maxLength", max.map(Value::from)),
                ("minLength", min.map(Value::from)),
                ("pattern", pattern.map(Value::from)),
                ("format", format.map(Value::from)),
            ])
        });
    let number = (
        prop::sample::select(vec!["integer", "number"]),
        prop::option::of(-100i64..100),
        prop::option::of(-100i64..100),
        prop::option::of(-10.5f64..10.5),
        prop::option::of(1u64..12),
    )
        .prop_map(|(kind, min, max, exclusive_max, multiple)| {
            object_of(vec![
                ("type", Some(json!(kind))),
                ("minimum", min.map(Value::from)),
                ("maximum", max.map(Value::from)),
                ("exclusiveMaximum", exclusive_max.map(Value::from)),
                ("multipleOf", multiple.map(Value::from)),
            ])
        });
    prop_oneof![
        string,
        number,
        prop::collection::btree_set("[a-z]{1,4}", 1..4)
            .prop_map(|values| json!({"enum": values.into_iter().collect::<Vec<_>>()})),
        (0i64..5).prop_map(|c| json!({"const": c})),
        Just(json!({"type": "boolean"})),
        Just(json!(true)),
        Just(json!({"description": "anything"})),
        Just(json!({"$ref": "#/$defs/d0"})),
        Just(json!({"$ref": "#/$defs/d1"})),
    ]
}

fn object(inner: impl Strategy<Value = Value>) -> impl Strategy<Value = Value> {
    (
        prop::collection::btree_map("[a-e]{1,3}", inner, 0..5),
        prop::collection::vec(any::<bool>(), 5),
        prop::option::of(any::<bool>()),
        prop::option::of(0u64..3),
    )
        .prop_map(|(properties, required, additional, min_properties)| {
            let required: Vec<&String> = properties
                .keys()
                .zip(required)
                .filter(|(_, r)| *r)
                .map(|(k, _)| k)
                .collect();
            object_of(vec![
                ("type", Some(json!("object"))),
                ("required", Some(json!(required))),
                ("properties", Some(json!(properties))),
                ("additionalProperties", additional.map(Value::from)),
                ("minProperties", min_properties.map(Value::from)),
            ])
        })
}

fn subschema() -> impl Strategy<Value = Value> {
    leaf().prop_recursive(4, 40, 5, |inner| {
        prop_oneof![
            object(inner.clone()),
            (inner, prop::option::of(0u64..4), any::<bool>()).prop_map(|(items, max, unique)| {
                object_of(vec![
                    ("type", Some(json!("array"))),
                    ("items", Some(items)),
                    ("maxItems", max.map(Value::from)),
                    ("uniqueItems", unique.then_some(Value::Bool(true))),
                ])
            }),
        ]
    })
}

/// A whole schema: an object, with two definitions its `$ref`s may name.
fn schema() -> impl Strategy<Value = Value> {
    // Definitions hold no references, so that none loops.
    let def = || leaf().prop_filter("no ref in a definition", |v| v.get("$ref").is_none());
    (object(subschema()), def(), object(def())).prop_map(|(mut root, d0, d1)| {
        root["$defs"] = json!({"d0": d0, "d1": d1});
        root
    })
}

/// Every payload pointer a schema declares, following its definitions; an
/// array item is read by index 0.
fn declared(root: &Value, schema: &Value, path: &mut Vec<String>, out: &mut Vec<String>) {
    let schema = match schema.get("$ref").and_then(Value::as_str) {
        Some(r) => root.pointer(&r[1..]).unwrap_or(&Value::Null),
        None => schema,
    };
    if let Some(Value::Object(properties)) = schema.get("properties") {
        for (name, child) in properties {
            path.push(name.clone());
            out.push(pointer(path));
            declared(root, child, path, out);
            path.pop();
        }
    }
    if let Some(items) = schema.get("items") {
        path.push("0".into());
        declared(root, items, path, out);
        path.pop();
    }
}

/// Every object node written in the schema itself (not in definitions):
/// where it is in the schema document, and its payload path.
fn object_nodes(
    schema: &Value,
    at: String,
    path: &mut Vec<String>,
    out: &mut Vec<(String, String)>,
) {
    if schema.get("type") == Some(&json!("object")) {
        out.push((at.clone(), pointer(path)));
    }
    if let Some(Value::Object(properties)) = schema.get("properties") {
        for (name, child) in properties {
            path.push(name.clone());
            let escaped = name.replace('~', "~0").replace('/', "~1");
            object_nodes(child, format!("{at}/properties/{escaped}"), path, out);
            path.pop();
        }
    }
    if let Some(items) = schema.get("items") {
        path.push("*".into());
        object_nodes(items, format!("{at}/items"), path, out);
        path.pop();
    }
}

/// Removes `keyword` from every subschema of `schema` (not from data such
/// as `enum` values or property names).
fn remove_everywhere(schema: &mut Value, keyword: &str) {
    let Value::Object(map) = schema else {
        return;
    };
    map.remove(keyword);
    for (k, v) in map.iter_mut() {
        match k.as_str() {
            "properties" | "$defs" => {
                if let Value::Object(children) = v {
                    children
                        .values_mut()
                        .for_each(|c| remove_everywhere(c, keyword));
                }
            }
            "items" | "additionalProperties" => remove_everywhere(v, keyword),
            _ => {}
        }
    }
}

/// Keywords whose removal only widens what a schema accepts.
const CONSTRAINTS: [&str; 17] = [
    "type",
    "required",
    "enum",
    "const",
    "maxLength",
    "minLength",
    "pattern",
    "format",
    "minimum",
    "maximum",
    "exclusiveMaximum",
    "multipleOf",
    "maxItems",
    "uniqueItems",
    "additionalProperties",
    "minProperties",
    "items",
];

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn a_schema_is_compatible_with_itself(s in schema()) {
        let mut reads = Vec::new();
        declared(&s, &s, &mut Vec::new(), &mut reads);
        let got = check(&s, &s, &reads);
        prop_assert!(got.is_empty(), "{s:#}\nreads {reads:?}\n{got:#?}");
    }

    #[test]
    fn a_widening_is_compatible(s in schema(), keyword in prop::sample::select(&CONSTRAINTS[..])) {
        let mut new = s.clone();
        remove_everywhere(&mut new, keyword);
        let got = check(&s, &new, &[]);
        prop_assert!(got.is_empty(), "without {keyword}: {s:#}\n{got:#?}");
    }

    #[test]
    fn a_new_required_property_is_reported(s in schema(), pick in any::<prop::sample::Index>()) {
        let mut nodes = Vec::new();
        object_nodes(&s, String::new(), &mut Vec::new(), &mut nodes);
        let (at, path) = nodes[pick.index(nodes.len())].clone();
        let mut new = s.clone();
        let node = new.pointer_mut(&at).expect("the node is in the schema");
        let required = node["required"].as_array_mut().expect("object nodes list required");
        required.push(json!("zz_new"));
        let got = check(&s, &new, &[]);
        let expected = format!("{path}/zz_new");
        prop_assert!(
            got.iter().any(|i| i.pointer == expected && i.rule == Rule::NewRequired),
            "{s:#}\nat {at:?}: expected {expected} in {got:#?}"
        );
        prop_assert!(got.iter().all(|i| i.rule == Rule::NewRequired), "{got:#?}");
    }
}
