//! The structural half of the compatibility check: walks the previous and
//! the new schema side by side and reports each place where the new one
//! refuses a payload the previous one accepted.
//!
//! Each keyword is checked on its own ("every instance the old keywords
//! accept, the new keyword accepts too"), which is sound: a report may be
//! one the schemas do not strictly need, but a narrowing is never missed
//! among the keywords the check knows, and the others are `unknown`.

use std::collections::{BTreeMap, BTreeSet};

use jsonschema::error::ValidationErrorKind;
use serde_json::{Map, Value};

use super::resolve::{finite_values, json_eq, resolve, Sub, TRUE};
use super::{show, subject, subject_cap, Cx, Rule, DEPTH_MAX};

/// JSON types as a bit set.
type Types = u8;
const NULL: Types = 1;
const BOOLEAN: Types = 2;
const OBJECT: Types = 4;
const ARRAY: Types = 8;
const NUMBER: Types = 16;
const INTEGER: Types = 32;
const STRING: Types = 64;
const ALL: Types = 127;
const TYPE_NAMES: [(Types, &str); 7] = [
    (NULL, "null"),
    (BOOLEAN, "boolean"),
    (OBJECT, "object"),
    (ARRAY, "array"),
    (NUMBER, "number"),
    (INTEGER, "integer"),
    (STRING, "string"),
];

/// The types a subschema's `type` accepts (all without one); `number`
/// includes `integer`.
fn types_of(map: &Map<String, Value>) -> Types {
    let one = |name: &str| {
        TYPE_NAMES
            .iter()
            .find(|(_, n)| *n == name)
            .map_or(0, |(t, _)| *t)
    };
    let types = match map.get("type") {
        Some(Value::String(name)) => one(name),
        Some(Value::Array(names)) => names
            .iter()
            .filter_map(Value::as_str)
            .map(one)
            .fold(0, |a, b| a | b),
        _ => ALL,
    };
    if types & NUMBER != 0 {
        types | INTEGER
    } else {
        types
    }
}

/// "null, string"; `number` stands for `integer` too.
fn type_list(types: Types) -> String {
    let shown = if types & NUMBER != 0 {
        types & !INTEGER
    } else {
        types
    };
    let names: Vec<&str> = TYPE_NAMES
        .iter()
        .filter(|(t, _)| shown & t != 0)
        .map(|(_, n)| *n)
        .collect();
    if names.is_empty() {
        "nothing".into()
    } else {
        names.join(", ")
    }
}

/// A number as written in a message.
fn num(v: f64) -> String {
    if v.fract() == 0.0 && v.abs() < 1e15 {
        format!("{}", v as i64)
    } else {
        format!("{v}")
    }
}

/// One end of a numeric range.
#[derive(Clone, Copy)]
struct Bound {
    value: f64,
    exclusive: bool,
}

/// The tightest upper (`upper`) or lower bound of a subschema, with both
/// `maximum` and `exclusiveMaximum` (a number, or draft 4's boolean). For
/// integers, a bound is turned into the inclusive integer one.
fn bound(map: &Map<String, Value>, upper: bool, integers: bool) -> Option<Bound> {
    let (inclusive, exclusive) = if upper {
        ("maximum", "exclusiveMaximum")
    } else {
        ("minimum", "exclusiveMinimum")
    };
    let draft4_exclusive = map.get(exclusive).and_then(Value::as_bool) == Some(true);
    let mut candidates = Vec::new();
    if let Some(v) = map.get(inclusive).and_then(Value::as_f64) {
        candidates.push(Bound {
            value: v,
            exclusive: draft4_exclusive,
        });
    }
    if let Some(v) = map.get(exclusive).and_then(Value::as_f64) {
        candidates.push(Bound {
            value: v,
            exclusive: true,
        });
    }
    let tighter = |a: Bound, b: Bound| {
        let better = if upper {
            a.value < b.value
        } else {
            a.value > b.value
        };
        if better || (a.value == b.value && a.exclusive) {
            a
        } else {
            b
        }
    };
    let b = candidates.into_iter().reduce(tighter)?;
    if !integers {
        return Some(b);
    }
    let value = match (upper, b.exclusive) {
        (true, true) => b.value.ceil() - 1.0,
        (true, false) => b.value.floor(),
        (false, true) => b.value.floor() + 1.0,
        (false, false) => b.value.ceil(),
    };
    Some(Bound {
        value,
        exclusive: false,
    })
}

/// Whether the bound `new` lets through everything `old` let through.
fn at_least_as_loose(new: Bound, old: Bound, upper: bool) -> bool {
    let wider = if upper {
        new.value > old.value
    } else {
        new.value < old.value
    };
    wider || (new.value == old.value && (!new.exclusive || old.exclusive))
}

fn describe_bound(b: Bound, upper: bool) -> String {
    let v = num(b.value);
    match (upper, b.exclusive) {
        (true, false) => format!("at most {v}"),
        (true, true) => format!("below {v}"),
        (false, false) => format!("at least {v}"),
        (false, true) => format!("above {v}"),
    }
}

/// Whether `divisor` divides `multiple` (both positive).
fn divides(divisor: f64, multiple: f64) -> bool {
    let ratio = multiple / divisor;
    ratio >= 1.0 - 1e-9 && (ratio - ratio.round()).abs() <= 1e-9 * ratio.max(1.0)
}

fn strings(value: Option<&Value>) -> BTreeSet<&str> {
    value
        .and_then(Value::as_array)
        .map(|a| a.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default()
}

/// The item schemas of an array subschema: the positional ones
/// (`prefixItems`, or an older draft's `items` list) and the one for the
/// rest (`items`, or an older draft's `additionalItems`).
fn item_schemas(map: &Map<String, Value>) -> (&[Value], &Value) {
    match map.get("items") {
        Some(Value::Array(prefix)) => (prefix, map.get("additionalItems").unwrap_or(&TRUE)),
        rest => (
            map.get("prefixItems")
                .and_then(Value::as_array)
                .map_or(&[][..], Vec::as_slice),
            rest.unwrap_or(&TRUE),
        ),
    }
}

/// The rule a validation failure of a value the old schema accepted falls
/// under.
fn rule_of(kind: &ValidationErrorKind) -> Rule {
    use ValidationErrorKind as K;
    match kind {
        K::Enum { .. } | K::Constant { .. } => Rule::RemovedEnumValue,
        K::Type { .. } | K::FalseSchema => Rule::NarrowedType,
        K::Required { .. } => Rule::NewRequired,
        K::AdditionalProperties { .. } => Rule::ClosedProperties,
        K::Maximum { .. }
        | K::Minimum { .. }
        | K::ExclusiveMaximum { .. }
        | K::ExclusiveMinimum { .. }
        | K::MultipleOf { .. }
        | K::MaxLength { .. }
        | K::MinLength { .. }
        | K::Pattern { .. }
        | K::Format { .. }
        | K::MaxItems { .. }
        | K::MinItems { .. }
        | K::MaxProperties { .. }
        | K::MinProperties { .. }
        | K::UniqueItems => Rule::TightenedBound,
        _ => Rule::Unknown,
    }
}

impl Cx<'_> {
    /// Compares the two documents from the top. A missing schema (`null`)
    /// accepts any object.
    pub(super) fn compare_root(&mut self) {
        let old = if self.old_root.is_null() {
            &TRUE
        } else {
            self.old_root
        };
        let new = if self.new_root.is_null() {
            &TRUE
        } else {
            self.new_root
        };
        self.compare(old, new, &mut Vec::new());
    }

    /// Reports what `new` refuses of what `old` accepts at `path`.
    fn compare(&mut self, old: &Value, new: &Value, path: &mut Vec<String>) {
        if !self.spend() || self.same(old, new) {
            return;
        }
        if path.len() > DEPTH_MAX {
            let message = format!(
                "{} is nested more than {DEPTH_MAX} levels deep; the check does not look further, so it cannot prove it compatible",
                subject_cap(path)
            );
            self.report(path, Rule::Unknown, message);
            return;
        }
        let o = match resolve(self.old_root, old) {
            Ok(o) => o,
            Err(why) => {
                let message = format!(
                    "the previous version's schema for {} cannot be followed ({why}), so the check cannot prove the change compatible",
                    subject(path)
                );
                return self.report(path, Rule::Unknown, message);
            }
        };
        let n = match resolve(self.new_root, new) {
            Ok(n) => n,
            Err(why) => {
                let message = format!(
                    "the new schema for {} cannot be followed ({why}), so the check cannot prove it compatible",
                    subject(path)
                );
                return self.report(path, Rule::Unknown, message);
            }
        };
        let empty = Map::new();
        let (om, nm) = match (&o.sub, &n.sub) {
            (Sub::Nothing, _) | (_, Sub::Any) => return,
            (_, Sub::Nothing) => {
                let message = format!(
                    "{} no longer accepts any value (its new schema is `false`); the previous version accepted some",
                    subject_cap(path)
                );
                return self.report(path, Rule::NarrowedType, message);
            }
            (Sub::Any, Sub::Obj(nm)) => (&empty, &**nm),
            (Sub::Obj(om), Sub::Obj(nm)) => (&**om, &**nm),
        };
        let key = (o.id, n.id);
        let tracked = (o.via_ref || n.via_ref) && o.id != 0 && n.id != 0;
        if tracked && !self.comparing.insert(key) {
            // Recursion: this pair is being compared further up.
            return;
        }
        self.compare_maps(om, nm, path);
        if tracked {
            self.comparing.remove(&key);
        }
    }

    fn compare_maps(
        &mut self,
        o: &Map<String, Value>,
        n: &Map<String, Value>,
        path: &mut Vec<String>,
    ) {
        if self.compare_finite(o, n, path) {
            return;
        }
        // The payload itself is always an object.
        let domain = if path.is_empty() { OBJECT } else { ALL };
        let old_types = types_of(o) & domain;
        let new_types = types_of(n);
        let lost = old_types & !new_types;
        if lost != 0 {
            let message = format!(
                "{} no longer accepts {}; the new version accepts only {}",
                subject_cap(path),
                type_list(lost),
                type_list(new_types)
            );
            self.report(path, Rule::NarrowedType, message);
        }
        let types = old_types & new_types;
        if types == 0 {
            return;
        }
        self.compare_enum(o, n, types, path);
        if types & (NUMBER | INTEGER) != 0 {
            self.compare_numbers(o, n, types & NUMBER == 0, path);
        }
        if types & STRING != 0 {
            self.compare_strings(o, n, path);
        }
        if types & ARRAY != 0 {
            self.compare_arrays(o, n, path);
        }
        if types & OBJECT != 0 {
            self.compare_objects(o, n, path);
        }
        for keyword in [
            "allOf",
            "anyOf",
            "oneOf",
            "not",
            "$dynamicRef",
            "$recursiveRef",
        ] {
            self.changed_unknown(o, n, &[keyword], path);
        }
        self.changed_unknown(o, n, &["if", "then", "else"], path);
    }

    /// When the previous subschema accepts only listed values (`enum`,
    /// `const`), checks each of them against the new subschema with the
    /// validator. False when the new subschema cannot be validated on its
    /// own (then the keywords are compared instead).
    fn compare_finite(
        &mut self,
        o: &Map<String, Value>,
        n: &Map<String, Value>,
        path: &[String],
    ) -> bool {
        let Some(values) = finite_values(o) else {
            return false;
        };
        let Some(new) = Cx::local_validator(self.new_root, n) else {
            return false;
        };
        let old = Cx::local_validator(self.old_root, o);
        let mut refused: BTreeMap<Rule, (Vec<String>, String)> = BTreeMap::new();
        for value in values {
            if path.is_empty() && !value.is_object() {
                continue;
            }
            if old.as_ref().is_some_and(|old| !old.is_valid(value)) {
                continue;
            }
            if let Some(error) = new.iter_errors(value).next() {
                let entry = refused
                    .entry(rule_of(&error.kind))
                    .or_insert_with(|| (Vec::new(), error.to_string()));
                entry.0.push(show(value));
            }
        }
        for (rule, (values, first_error)) in refused {
            let values = values.join(", ");
            let message = match rule {
                Rule::RemovedEnumValue => format!(
                    "{} no longer accepts {values}, which the previous version accepted",
                    subject_cap(path)
                ),
                _ => format!(
                    "{} no longer accepts {values}, which the previous version accepted ({first_error})",
                    subject_cap(path)
                ),
            };
            self.report(path, rule, message);
        }
        true
    }

    fn compare_enum(
        &mut self,
        o: &Map<String, Value>,
        n: &Map<String, Value>,
        types: Types,
        path: &[String],
    ) {
        let old_values = finite_values(o);
        if let Some(c) = n.get("const") {
            let kept = old_values
                .as_ref()
                .is_some_and(|vs| vs.iter().all(|v| json_eq(v, c)));
            if !kept {
                let message = match o.get("const") {
                    Some(was) => format!(
                        "{} must now be {}; the previous version required {}",
                        subject_cap(path),
                        show(c),
                        show(was)
                    ),
                    None => format!(
                        "{} must now be {} (a new `const`); the previous version accepted other values",
                        subject_cap(path),
                        show(c)
                    ),
                };
                self.report(path, Rule::RemovedEnumValue, message);
            }
        }
        let Some(Value::Array(allowed)) = n.get("enum") else {
            return;
        };
        let is_allowed = |v: &Value| allowed.iter().any(|a| json_eq(a, v));
        match old_values {
            Some(values) => {
                let removed: Vec<String> = values
                    .into_iter()
                    .filter(|v| !is_allowed(v))
                    .map(show)
                    .collect();
                if !removed.is_empty() {
                    let message = format!(
                        "{} no longer accepts {}, which the previous version accepted",
                        subject_cap(path),
                        removed.join(", ")
                    );
                    self.report(path, Rule::RemovedEnumValue, message);
                }
            }
            None => {
                // Only null and booleans have few enough values to list.
                let mut every = Vec::new();
                if types & NULL != 0 {
                    every.push(Value::Null);
                }
                if types & BOOLEAN != 0 {
                    every.extend([Value::Bool(false), Value::Bool(true)]);
                }
                let all_listed = types & !(NULL | BOOLEAN) == 0 && every.iter().all(is_allowed);
                if !all_listed {
                    let message = format!(
                        "{} now accepts only {} (a new `enum`); the previous version accepted other values",
                        subject_cap(path),
                        show(&Value::Array(allowed.clone()))
                    );
                    self.report(path, Rule::RemovedEnumValue, message);
                }
            }
        }
    }

    fn compare_numbers(
        &mut self,
        o: &Map<String, Value>,
        n: &Map<String, Value>,
        integers: bool,
        path: &[String],
    ) {
        for upper in [true, false] {
            let Some(new) = bound(n, upper, integers) else {
                continue;
            };
            let old = bound(o, upper, integers);
            if old.is_some_and(|old| at_least_as_loose(new, old, upper)) {
                continue;
            }
            let was = match old {
                Some(old) => format!(
                    "the previous version allowed {}",
                    describe_bound(old, upper)
                ),
                None => format!(
                    "the previous version had no {} bound",
                    if upper { "upper" } else { "lower" }
                ),
            };
            let message = format!(
                "{} must now be {}; {was}",
                subject_cap(path),
                describe_bound(new, upper)
            );
            self.report(path, Rule::TightenedBound, message);
        }
        if let Some(m) = n
            .get("multipleOf")
            .and_then(Value::as_f64)
            .filter(|m| *m > 0.0)
        {
            let old = o
                .get("multipleOf")
                .and_then(Value::as_f64)
                .filter(|m| *m > 0.0)
                .or(integers.then_some(1.0));
            if !old.is_some_and(|old| divides(m, old)) {
                let was = match o.get("multipleOf") {
                    Some(was) => format!("the previous version required multiples of {was}"),
                    None => "the previous version had no `multipleOf`".into(),
                };
                let message = format!(
                    "{} must now be a multiple of {}; {was}",
                    subject_cap(path),
                    num(m)
                );
                self.report(path, Rule::TightenedBound, message);
            }
        }
    }

    /// Reports a `maxLength`-like keyword that is lower or newly set, or a
    /// `minLength`-like one that is higher or newly set.
    fn compare_count(
        &mut self,
        o: &Map<String, Value>,
        n: &Map<String, Value>,
        keyword: &str,
        upper: bool,
        what: &str,
        path: &[String],
    ) {
        let Some(new) = n.get(keyword).and_then(Value::as_f64) else {
            return;
        };
        let old = o.get(keyword).and_then(Value::as_f64);
        let tighter = match old {
            Some(old) => {
                if upper {
                    new < old
                } else {
                    new > old
                }
            }
            None => upper || new > 0.0,
        };
        if !tighter {
            return;
        }
        let change = match old {
            Some(old) => format!("`{keyword}` went from {} to {}", num(old), num(new)),
            None => format!("`{keyword}` is newly set to {}", num(new)),
        };
        let message = format!(
            "{}: {change}; payloads the previous version accepted may have {what} there",
            subject_cap(path)
        );
        self.report(path, Rule::TightenedBound, message);
    }

    fn compare_strings(&mut self, o: &Map<String, Value>, n: &Map<String, Value>, path: &[String]) {
        self.compare_count(o, n, "maxLength", true, "longer strings", path);
        self.compare_count(o, n, "minLength", false, "shorter strings", path);
        for keyword in ["pattern", "format"] {
            let Some(new) = n.get(keyword) else {
                continue;
            };
            let old = o.get(keyword);
            if old == Some(new) {
                continue;
            }
            let was = match old {
                Some(old) => format!("it was {old}"),
                None => "the previous version had none".into(),
            };
            let message = format!(
                "{}: the new `{keyword}` {new} may refuse strings the previous version accepted ({was})",
                subject_cap(path)
            );
            self.report(path, Rule::TightenedBound, message);
        }
    }

    fn compare_arrays(
        &mut self,
        o: &Map<String, Value>,
        n: &Map<String, Value>,
        path: &mut Vec<String>,
    ) {
        self.compare_count(o, n, "maxItems", true, "more items", path);
        self.compare_count(o, n, "minItems", false, "fewer items", path);
        if n.get("uniqueItems") == Some(&Value::Bool(true))
            && o.get("uniqueItems") != Some(&Value::Bool(true))
        {
            let message = format!(
                "{}: items must now be unique (`uniqueItems`); payloads the previous version accepted may repeat them",
                subject_cap(path)
            );
            self.report(path, Rule::TightenedBound, message);
        }
        let (old_prefix, old_rest) = item_schemas(o);
        let (new_prefix, new_rest) = item_schemas(n);
        let positions = old_prefix.len().max(new_prefix.len());
        for i in 0..=positions {
            // Position `positions` stands for every later item.
            let (old_item, new_item) = if i < positions {
                (
                    old_prefix.get(i).unwrap_or(old_rest),
                    new_prefix.get(i).unwrap_or(new_rest),
                )
            } else {
                (old_rest, new_rest)
            };
            let accepts_nothing = |root: &Value, s: &Value| matches!(resolve(root, s), Ok(r) if matches!(r.sub, Sub::Nothing));
            if accepts_nothing(self.old_root, old_item) {
                continue;
            }
            if accepts_nothing(self.new_root, new_item) {
                let message = format!(
                    "{} may now have at most {i} item{}; payloads the previous version accepted may have more",
                    subject_cap(path),
                    if i == 1 { "" } else { "s" }
                );
                self.report(path, Rule::TightenedBound, message);
                break;
            }
            path.push(if i < positions {
                i.to_string()
            } else {
                "*".into()
            });
            self.compare(old_item, new_item, path);
            path.pop();
        }
        for keyword in ["contains", "minContains", "maxContains", "unevaluatedItems"] {
            self.changed_unknown(o, n, &[keyword], path);
        }
    }

    /// The subschemas that apply to the property `name` of an object:
    /// its `properties` entry and the `patternProperties` it matches, or
    /// else `additionalProperties`.
    fn governing<'m>(&mut self, map: &'m Map<String, Value>, name: &str) -> Vec<&'m Value> {
        let mut out = Vec::new();
        if let Some(s) = map.get("properties").and_then(|p| p.get(name)) {
            out.push(s);
        }
        if let Some(Value::Object(patterns)) = map.get("patternProperties") {
            for (pattern, s) in patterns {
                if self.pattern_matches(pattern, name) {
                    out.push(s);
                }
            }
        }
        if out.is_empty() {
            out.push(map.get("additionalProperties").unwrap_or(&TRUE));
        }
        out
    }

    fn compare_objects(
        &mut self,
        o: &Map<String, Value>,
        n: &Map<String, Value>,
        path: &mut Vec<String>,
    ) {
        let old_required = strings(o.get("required"));
        for name in strings(n.get("required")).difference(&old_required) {
            path.push((*name).to_owned());
            let message = format!(
                "{} is newly required; payloads the previous version accepted may lack it",
                subject_cap(path)
            );
            self.report(path, Rule::NewRequired, message);
            path.pop();
        }
        if let Some(Value::Object(dependent)) = n.get("dependentRequired") {
            for (trigger, names) in dependent {
                let before = strings(o.get("dependentRequired").and_then(|d| d.get(trigger)));
                for name in strings(Some(names)) {
                    if before.contains(name) || old_required.contains(name) {
                        continue;
                    }
                    path.push(trigger.clone());
                    let when = subject(path);
                    path.pop();
                    path.push(name.to_owned());
                    let message = format!(
                        "{} is newly required when {when} is present; payloads the previous version accepted may lack it",
                        subject_cap(path)
                    );
                    self.report(path, Rule::NewRequired, message);
                    path.pop();
                }
            }
        }
        self.compare_count(o, n, "maxProperties", true, "more properties", path);
        self.compare_count(o, n, "minProperties", false, "fewer properties", path);

        let names_of = |m: &Map<String, Value>| -> BTreeSet<String> {
            m.get("properties")
                .and_then(Value::as_object)
                .map(|p| p.keys().cloned().collect())
                .unwrap_or_default()
        };
        let (old_names, new_names) = (names_of(o), names_of(n));
        for name in old_names.union(&new_names) {
            let old_governing = self.governing(o, name);
            let new_governing = self.governing(n, name);
            path.push(name.clone());
            self.compare_property(
                &old_governing,
                &new_governing,
                old_names.contains(name),
                new_names.contains(name),
                path,
            );
            path.pop();
        }

        let old_extra = o.get("additionalProperties").unwrap_or(&TRUE);
        let new_extra = n.get("additionalProperties").unwrap_or(&TRUE);
        let new_patterns = n
            .get("patternProperties")
            .and_then(Value::as_object)
            .filter(|p| !p.is_empty());
        if !self.same_opt(
            "patternProperties",
            o.get("patternProperties"),
            n.get("patternProperties"),
        ) {
            let new_extra_any =
                matches!(resolve(self.new_root, new_extra), Ok(r) if matches!(r.sub, Sub::Any));
            if new_patterns.is_some() || !new_extra_any {
                let message = format!(
                    "{}: `patternProperties` changed, and the check cannot prove that every property the previous version accepted is still accepted",
                    subject_cap(path)
                );
                self.report(path, Rule::Unknown, message);
                return;
            }
        }
        let old_nothing =
            matches!(resolve(self.old_root, old_extra), Ok(r) if matches!(r.sub, Sub::Nothing));
        let new_nothing =
            matches!(resolve(self.new_root, new_extra), Ok(r) if matches!(r.sub, Sub::Nothing));
        path.push("*".into());
        if !old_nothing && new_nothing {
            let named: Vec<String> = new_names.iter().map(|n| format!("`{n}`")).collect();
            let others = if named.is_empty() {
                "any property".into()
            } else {
                format!("properties other than {}", named.join(", "))
            };
            let message = format!(
                "{} no longer accepts {others} (`{}`); payloads the previous version accepted may carry others",
                subject_cap(&path[..path.len() - 1]),
                super::pointer(path)
            );
            self.report(path, Rule::ClosedProperties, message);
        } else {
            self.compare(old_extra, new_extra, path);
        }
        path.pop();
        for keyword in [
            "propertyNames",
            "unevaluatedProperties",
            "dependentSchemas",
            "dependencies",
        ] {
            self.changed_unknown(o, n, &[keyword], path);
        }
    }

    fn compare_property(
        &mut self,
        old: &[&Value],
        new: &[&Value],
        declared_before: bool,
        declared_now: bool,
        path: &mut Vec<String>,
    ) {
        let nothing = |root: &Value, s: &Value| matches!(resolve(root, s), Ok(r) if matches!(r.sub, Sub::Nothing));
        if old.iter().any(|s| nothing(self.old_root, s)) {
            // Payloads of the previous version never had it.
            return;
        }
        if new.iter().any(|s| nothing(self.new_root, s)) {
            let message = if declared_before && !declared_now {
                format!(
                    "{} was removed, and the new version refuses properties it does not name; payloads the previous version accepted may carry it",
                    subject_cap(path)
                )
            } else {
                format!(
                    "{} is no longer allowed; payloads the previous version accepted may carry it",
                    subject_cap(path)
                )
            };
            return self.report(path, Rule::RemovedProperty, message);
        }
        let Some(primary) = old.first() else {
            return;
        };
        for n in new {
            if old.iter().any(|o| self.same(o, n)) {
                continue;
            }
            self.compare(primary, n, path);
        }
    }

    /// Reports `unknown` when the new subschema has one of `keywords` and
    /// they are not what the previous one had. Removing them only widens.
    fn changed_unknown(
        &mut self,
        o: &Map<String, Value>,
        n: &Map<String, Value>,
        keywords: &[&str],
        path: &[String],
    ) {
        if !keywords.iter().any(|k| n.contains_key(*k)) {
            return;
        }
        if keywords
            .iter()
            .all(|k| self.same_opt(k, o.get(*k), n.get(*k)))
        {
            return;
        }
        let shown: Vec<String> = keywords.iter().map(|k| format!("`{k}`")).collect();
        let message = format!(
            "{}: {} changed, and the check cannot prove that every payload the previous version accepted still passes it",
            subject_cap(path),
            shown.join("/")
        );
        self.report(path, Rule::Unknown, message);
    }
}
