//! Reading schemas for the compatibility check: following local `$ref`s,
//! telling annotations from assertions, deciding whether two subschemas are
//! the same, and compiling what the check validates with.

use std::borrow::Cow;
use std::collections::BTreeSet;

use serde_json::{Map, Value};

use super::Cx;

/// The schema that accepts everything.
pub(super) static TRUE: Value = Value::Bool(true);

/// How many `$ref`s in a row the check follows before it calls them a loop.
const REF_HOPS_MAX: usize = 32;
/// How deep [`Cx::same`] goes before it gives up (and answers "not the
/// same", which only makes the check look closer).
const SAME_DEPTH_MAX: usize = 256;

/// A subschema with its `$ref`s followed.
pub(super) enum Sub<'v> {
    /// `true`, or only annotations.
    Any,
    /// `false`.
    Nothing,
    Obj(Cow<'v, Map<String, Value>>),
}

pub(super) struct Resolved<'v> {
    pub sub: Sub<'v>,
    /// The address of the subschema reached, to recognise recursion; 0 when
    /// it was built here (a `$ref` merged with keywords beside it).
    pub id: usize,
    /// Whether a `$ref` was followed to get here.
    pub via_ref: bool,
}

/// Keywords that never change what a schema accepts. Content keywords are
/// annotations; `format` is not listed here: the check compares it as a
/// constraint, whether or not a validator asserts it.
pub(super) fn is_annotation(keyword: &str) -> bool {
    matches!(
        keyword,
        "title"
            | "description"
            | "$comment"
            | "default"
            | "examples"
            | "deprecated"
            | "readOnly"
            | "writeOnly"
            | "contentEncoding"
            | "contentMediaType"
            | "contentSchema"
            | "$schema"
            | "$id"
            | "$anchor"
            | "$dynamicAnchor"
            | "$vocabulary"
            | "$defs"
            | "definitions"
    )
}

/// Follows `schema`'s `$ref`s inside `root`. Refuses, with the reason,
/// what the check cannot read: a reference outside the document, one that
/// points at nothing, a loop of references, a value that is no schema.
pub(super) fn resolve<'v>(root: &'v Value, schema: &'v Value) -> Result<Resolved<'v>, String> {
    resolve_hops(root, schema, 0)
}

fn resolve_hops<'v>(
    root: &'v Value,
    schema: &'v Value,
    hops: usize,
) -> Result<Resolved<'v>, String> {
    let mut current = schema;
    let mut via_ref = hops > 0;
    for hop in hops..REF_HOPS_MAX {
        let map = match current {
            Value::Bool(true) => return Ok(plain(Sub::Any, current, via_ref)),
            Value::Bool(false) => return Ok(plain(Sub::Nothing, current, via_ref)),
            Value::Object(map) => map,
            other => return Err(format!("{} is not a JSON Schema", super::show(other))),
        };
        let Some(reference) = map.get("$ref") else {
            if map.keys().all(|k| is_annotation(k)) {
                return Ok(plain(Sub::Any, current, via_ref));
            }
            return Ok(plain(Sub::Obj(Cow::Borrowed(map)), current, via_ref));
        };
        let reference = reference
            .as_str()
            .ok_or_else(|| "a `$ref` that is not a string".to_owned())?;
        let target = local_target(root, reference)?;
        via_ref = true;
        let beside: Map<String, Value> = map
            .iter()
            .filter(|(k, _)| *k != "$ref" && !is_annotation(k))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        if beside.is_empty() {
            current = target;
            continue;
        }
        // Keywords beside a `$ref` apply together with its target.
        let target = resolve_hops(root, target, hop + 1)?;
        let merged = match target.sub {
            Sub::Nothing => return Ok(target),
            Sub::Any => beside,
            Sub::Obj(target) => {
                let mut merged = target.into_owned();
                for (k, v) in beside {
                    match merged.get(&k) {
                        Some(there) if *there != v => {
                            return Err(format!(
                                "`{k}` both beside `$ref` {reference} and in its target"
                            ))
                        }
                        _ => {
                            merged.insert(k, v);
                        }
                    }
                }
                merged
            }
        };
        return Ok(Resolved {
            sub: Sub::Obj(Cow::Owned(merged)),
            id: 0,
            via_ref: true,
        });
    }
    Err(format!(
        "more than {REF_HOPS_MAX} `$ref`s in a row (a loop?)"
    ))
}

fn plain<'v>(sub: Sub<'v>, at: &Value, via_ref: bool) -> Resolved<'v> {
    Resolved {
        sub,
        id: at as *const Value as usize,
        via_ref,
    }
}

/// The subschema a local reference (`#`, `#/$defs/name`,
/// `#/definitions/name`, or any `#/...` pointer) names in `root`.
fn local_target<'v>(root: &'v Value, reference: &str) -> Result<&'v Value, String> {
    let Some(fragment) = reference.strip_prefix('#') else {
        return Err(format!(
            "`$ref` {reference:?} is not a local reference (`#/$defs/...`)"
        ));
    };
    let fragment = percent_decode(fragment)
        .ok_or_else(|| format!("`$ref` {reference:?} is not a valid URI fragment"))?;
    if !fragment.is_empty() && !fragment.starts_with('/') {
        return Err(format!(
            "`$ref` {reference:?} names an anchor, which the check does not follow"
        ));
    }
    root.pointer(&fragment)
        .ok_or_else(|| format!("`$ref` {reference:?} points at nothing in the schema"))
}

fn percent_decode(text: &str) -> Option<String> {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = text.get(i + 1..i + 3)?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

/// Whether `value` has a reference anywhere in it.
pub(super) fn has_ref(value: &Value) -> bool {
    match value {
        Value::Object(map) => map.iter().any(|(k, v)| {
            matches!(k.as_str(), "$ref" | "$dynamicRef" | "$recursiveRef") || has_ref(v)
        }),
        Value::Array(items) => items.iter().any(has_ref),
        _ => false,
    }
}

/// Whether every reference in `value` is to `#/$defs/...` or
/// `#/definitions/...`, and none is dynamic.
fn refs_are_to_defs(value: &Value) -> bool {
    match value {
        Value::Object(map) => map.iter().all(|(k, v)| match k.as_str() {
            "$ref" => v
                .as_str()
                .is_some_and(|r| r.starts_with("#/$defs/") || r.starts_with("#/definitions/")),
            "$dynamicRef" | "$recursiveRef" => false,
            _ => refs_are_to_defs(v),
        }),
        Value::Array(items) => items.iter().all(refs_are_to_defs),
        _ => true,
    }
}

/// JSON equality as JSON Schema sees it: `1` and `1.0` are equal.
pub(super) fn json_eq(a: &Value, b: &Value) -> bool {
    match (a, b) {
        (Value::Number(x), Value::Number(y)) => match (x.as_i64(), y.as_i64()) {
            (Some(x), Some(y)) => x == y,
            _ => match (x.as_u64(), y.as_u64()) {
                (Some(x), Some(y)) => x == y,
                _ => x.as_f64() == y.as_f64(),
            },
        },
        (Value::Array(x), Value::Array(y)) => {
            x.len() == y.len() && x.iter().zip(y).all(|(x, y)| json_eq(x, y))
        }
        (Value::Object(x), Value::Object(y)) => {
            x.len() == y.len()
                && x.iter()
                    .all(|(k, v)| y.get(k).is_some_and(|w| json_eq(v, w)))
        }
        _ => a == b,
    }
}

/// The values a subschema with `enum` or `const` can accept at most.
pub(super) fn finite_values(map: &Map<String, Value>) -> Option<Vec<&Value>> {
    match (map.get("const"), map.get("enum")) {
        (Some(c), Some(Value::Array(e))) => {
            Some(e.iter().filter(|v| json_eq(v, c)).take(1).collect())
        }
        (Some(c), _) => Some(vec![c]),
        (None, Some(Value::Array(e))) => Some(e.iter().collect()),
        _ => None,
    }
}

/// What a keyword's value is made of, for [`Cx::same`].
enum Holds {
    Schema,
    /// A map of names to schemas.
    SchemaMap,
    /// A list of schemas.
    SchemaList,
    /// A schema, or (in older drafts) a list of schemas.
    SchemaOrList,
    /// Names to a list of names or a schema (draft 7's `dependencies`).
    Dependencies,
    /// Plain JSON, compared as such.
    Data,
}

fn holds(keyword: &str) -> Holds {
    match keyword {
        "additionalProperties"
        | "additionalItems"
        | "contains"
        | "propertyNames"
        | "not"
        | "if"
        | "then"
        | "else"
        | "unevaluatedItems"
        | "unevaluatedProperties" => Holds::Schema,
        "properties" | "patternProperties" | "dependentSchemas" => Holds::SchemaMap,
        "allOf" | "anyOf" | "oneOf" | "prefixItems" => Holds::SchemaList,
        "items" => Holds::SchemaOrList,
        "dependencies" => Holds::Dependencies,
        _ => Holds::Data,
    }
}

impl Cx<'_> {
    /// Whether the old subschema `old` and the new `new` accept the same
    /// payloads because they say the same thing: equal up to annotations,
    /// with references compared by what they point at. `false` only means
    /// "not shown to be the same".
    pub(super) fn same(&mut self, old: &Value, new: &Value) -> bool {
        if old == new && !has_ref(old) {
            return true;
        }
        if self.same_depth >= SAME_DEPTH_MAX || !self.spend() {
            return false;
        }
        let (Ok(o), Ok(n)) = (resolve(self.old_root, old), resolve(self.new_root, new)) else {
            return false;
        };
        match (&o.sub, &n.sub) {
            (Sub::Any, Sub::Any) | (Sub::Nothing, Sub::Nothing) => true,
            (Sub::Obj(a), Sub::Obj(b)) => {
                let key = (o.id, n.id);
                let tracked = (o.via_ref || n.via_ref) && o.id != 0 && n.id != 0;
                if tracked && !self.assumed_same.insert(key) {
                    return true;
                }
                self.same_depth += 1;
                let same = self.same_maps(a, b);
                self.same_depth -= 1;
                if tracked {
                    self.assumed_same.remove(&key);
                }
                same
            }
            _ => false,
        }
    }

    fn same_maps(&mut self, a: &Map<String, Value>, b: &Map<String, Value>) -> bool {
        let keys = |m: &Map<String, Value>| -> BTreeSet<String> {
            m.keys().filter(|k| !is_annotation(k)).cloned().collect()
        };
        let ka = keys(a);
        if ka != keys(b) {
            return false;
        }
        ka.iter().all(|k| self.same_keyword(k, &a[k], &b[k]))
    }

    /// [`Cx::same`] for the values of one keyword; absent on both sides is
    /// the same.
    pub(super) fn same_opt(&mut self, keyword: &str, a: Option<&Value>, b: Option<&Value>) -> bool {
        match (a, b) {
            (None, None) => true,
            (Some(a), Some(b)) => self.same_keyword(keyword, a, b),
            _ => false,
        }
    }

    fn same_keyword(&mut self, keyword: &str, a: &Value, b: &Value) -> bool {
        match (holds(keyword), a, b) {
            (Holds::Schema, _, _) => self.same(a, b),
            (Holds::SchemaMap, Value::Object(x), Value::Object(y)) => {
                x.len() == y.len()
                    && x.iter()
                        .all(|(k, v)| y.get(k).is_some_and(|w| self.same(v, w)))
            }
            (Holds::SchemaList | Holds::SchemaOrList, Value::Array(x), Value::Array(y)) => {
                x.len() == y.len() && x.iter().zip(y).all(|(v, w)| self.same(v, w))
            }
            (Holds::SchemaOrList, Value::Array(_), _)
            | (Holds::SchemaOrList, _, Value::Array(_)) => false,
            (Holds::SchemaOrList, _, _) => self.same(a, b),
            (Holds::Dependencies, Value::Object(x), Value::Object(y)) => {
                x.len() == y.len()
                    && x.iter().all(|(k, v)| {
                        y.get(k).is_some_and(|w| match (v, w) {
                            (Value::Array(_), _) | (_, Value::Array(_)) => v == w,
                            _ => self.same(v, w),
                        })
                    })
            }
            _ => a == b,
        }
    }

    /// A validator for the subschema `map` of `root`, if it can stand alone:
    /// its references may only point into `root`'s `$defs` or
    /// `definitions`, which come along. Formats are validated.
    pub(super) fn local_validator(
        root: &Value,
        map: &Map<String, Value>,
    ) -> Option<jsonschema::Validator> {
        let mut schema = map.clone();
        let value = Value::Object(map.clone());
        if !refs_are_to_defs(&value) {
            return None;
        }
        if has_ref(&value) {
            for defs in ["$defs", "definitions"] {
                if let Some(d) = root.get(defs) {
                    match schema.get(defs) {
                        Some(there) if there != d => return None,
                        _ => {
                            schema.insert(defs.into(), d.clone());
                        }
                    }
                }
            }
        }
        if let (Some(draft), false) = (root.get("$schema"), schema.contains_key("$schema")) {
            schema.insert("$schema".into(), draft.clone());
        }
        jsonschema::options()
            .should_validate_formats(true)
            .build(&Value::Object(schema))
            .ok()
    }

    /// Whether the property name `name` matches the `patternProperties`
    /// pattern `pattern`, as the validator matches it. A pattern that does
    /// not compile matches nothing.
    pub(super) fn pattern_matches(&mut self, pattern: &str, name: &str) -> bool {
        let validator = self.patterns.entry(pattern.to_owned()).or_insert_with(|| {
            jsonschema::validator_for(&serde_json::json!({"pattern": pattern})).ok()
        });
        validator
            .as_ref()
            .is_some_and(|v| v.is_valid(&Value::String(name.to_owned())))
    }
}
