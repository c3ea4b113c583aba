//! Whether a new version of an entity type's JSON Schema is backward
//! compatible with the latest registered one: [`check`], a pure function.
//!
//! Compatible means two things. Every payload the previous version accepted
//! is still accepted by the new one, so clients keep working; and every
//! field the pipeline reads (its steps and references, given as JSON
//! pointers into the payload) is still declared, so steps keep finding what
//! they read. Each problem found is an [`Incompatibility`]: where in the
//! payload, which [`Rule`], and a message for the person who registers the
//! version. The rules and the pointer notation are described in
//! `docs/compatibility.md`.
//!
//! The check is conservative: what it cannot reason about (remote
//! references, changed `anyOf`, ...) is reported as [`Rule::Unknown`], never
//! passed silently. Identical subschemas always pass.

mod compare;
mod reads;
mod resolve;

#[cfg(test)]
mod props;
#[cfg(test)]
mod tests;

use std::collections::{HashMap, HashSet};

use serde::Serialize;
use serde_json::Value;

/// One way in which a new schema version breaks payloads or readers of the
/// previous one.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Incompatibility {
    /// Where, as a JSON pointer into the payload (not into the schema):
    /// `/address/city`; `*` stands for every item of an array (`/tags/*`)
    /// or every property an object does not name (`/address/*`); empty for
    /// the whole payload.
    pub pointer: String,
    pub rule: Rule,
    /// What changed and what it breaks, for a person.
    pub message: String,
}

/// The rule an [`Incompatibility`] breaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Rule {
    /// A property is newly required (directly, or when another is present).
    NewRequired,
    /// A value's `type` accepts fewer kinds (`["string","null"]` to
    /// `"string"`, `number` to `integer`), or the schema became `false`.
    NarrowedType,
    /// An `enum` lost a value, or an `enum` or `const` was added or changed.
    RemovedEnumValue,
    /// A bound is tighter: a lower maximum, a higher minimum, a new or
    /// changed `pattern` or `format`, `multipleOf`, `uniqueItems`, ...
    TightenedBound,
    /// A property the pipeline reads is no longer declared, or a property
    /// payloads could carry is no longer allowed.
    RemovedProperty,
    /// An object no longer accepts properties it does not name
    /// (`additionalProperties: false`).
    ClosedProperties,
    /// A property the pipeline reads was required and is now optional.
    OptionalRead,
    /// The check cannot prove the change compatible (a remote `$ref`, a
    /// changed `anyOf`, ...).
    Unknown,
}

impl Rule {
    /// The rule's name in reports.
    pub fn as_str(self) -> &'static str {
        match self {
            Rule::NewRequired => "new_required",
            Rule::NarrowedType => "narrowed_type",
            Rule::RemovedEnumValue => "removed_enum_value",
            Rule::TightenedBound => "tightened_bound",
            Rule::RemovedProperty => "removed_property",
            Rule::ClosedProperties => "closed_properties",
            Rule::OptionalRead => "optional_read",
            Rule::Unknown => "unknown",
        }
    }
}

impl std::fmt::Display for Rule {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Checks that `new` is backward compatible with `old` for payloads that
/// `old` accepted and for the fields in `reads` (JSON pointers into the
/// payload, RFC 6901: `/address/city`, `/lines/0/sku`).
///
/// `Value::Null` stands for a version without a schema, which accepts any
/// JSON object. The result is sorted by pointer, then rule; it is empty when
/// `new` is compatible.
pub fn check(old: &Value, new: &Value, reads: &[String]) -> Vec<Incompatibility> {
    let mut cx = Cx::new(old, new);
    cx.compare_root();
    cx.check_reads(reads);
    let mut out = cx.out;
    out.sort_by(|a, b| {
        (a.pointer.as_str(), a.rule.as_str(), a.message.as_str()).cmp(&(
            b.pointer.as_str(),
            b.rule.as_str(),
            b.message.as_str(),
        ))
    });
    out.dedup();
    out
}

/// How many subschema comparisons one check may make: the bound on the work
/// a large or hostile schema causes.
const BUDGET: usize = 100_000;
/// The deepest payload pointer the check follows.
const DEPTH_MAX: usize = 64;

/// The state of one check: both documents (for `$ref`), the report, and
/// what bounds the work.
struct Cx<'a> {
    old_root: &'a Value,
    new_root: &'a Value,
    out: Vec<Incompatibility>,
    budget: usize,
    /// Pairs of referenced subschemas (by address) being compared right
    /// now: meeting one again means a recursive schema, which is assumed
    /// compatible there (the rest of the comparison decides).
    comparing: HashSet<(usize, usize)>,
    /// The same, for [`Cx::same`].
    assumed_same: HashSet<(usize, usize)>,
    /// How deep [`Cx::same`] is.
    same_depth: usize,
    /// Compiled `pattern`s, to see which names `patternProperties` covers.
    patterns: HashMap<String, Option<jsonschema::Validator>>,
}

impl<'a> Cx<'a> {
    fn new(old_root: &'a Value, new_root: &'a Value) -> Cx<'a> {
        Cx {
            old_root,
            new_root,
            out: Vec::new(),
            budget: BUDGET,
            comparing: HashSet::new(),
            assumed_same: HashSet::new(),
            same_depth: 0,
            patterns: HashMap::new(),
        }
    }

    fn report(&mut self, path: &[String], rule: Rule, message: String) {
        self.out.push(Incompatibility {
            pointer: pointer(path),
            rule,
            message,
        });
    }

    /// Takes one unit of work; false (and one `unknown` report) once the
    /// budget is spent.
    fn spend(&mut self) -> bool {
        if self.budget == 0 {
            return false;
        }
        self.budget -= 1;
        if self.budget == 0 {
            self.report(
                &[],
                Rule::Unknown,
                "the schemas are too large or too deeply recursive to compare in full, so the \
                 check cannot prove them compatible"
                    .into(),
            );
            return false;
        }
        true
    }
}

/// The JSON pointer of a payload path; `*` segments are kept as they are.
fn pointer(path: &[String]) -> String {
    let mut out = String::new();
    for segment in path {
        out.push('/');
        out.push_str(&segment.replace('~', "~0").replace('/', "~1"));
    }
    out
}

/// How a message names a place in the payload: "`/address/city`", or "the
/// payload" for the whole of it.
fn subject(path: &[String]) -> String {
    if path.is_empty() {
        "the payload".into()
    } else {
        format!("`{}`", pointer(path))
    }
}

/// [`subject`] at the start of a sentence.
fn subject_cap(path: &[String]) -> String {
    if path.is_empty() {
        "The payload".into()
    } else {
        subject(path)
    }
}

/// A JSON value in a message, shortened if long.
fn show(value: &Value) -> String {
    let text = value.to_string();
    const SHOWN_MAX: usize = 60;
    if text.chars().count() <= SHOWN_MAX {
        return text;
    }
    let cut: String = text.chars().take(SHOWN_MAX).collect();
    format!("{cut}…")
}
