//! The pipeline half of the compatibility check: every field a step or a
//! reference reads must still be declared by the new schema, and stay
//! required if it was.
//!
//! A read is a JSON pointer into the payload. It is declared by a schema
//! when each segment is a property named in `properties` (or matched by
//! `patternProperties`, or declared by an `allOf`/`anyOf`/`oneOf` member),
//! or an array index (or `*`) into `items`/`prefixItems`. It is required
//! when every property on the way is in its object's `required` (array
//! items never are). A read the previous version did not declare promises
//! nothing, and is not checked.

use std::collections::BTreeSet;

use serde_json::Value;

use super::resolve::{resolve, Sub};
use super::{pointer, Cx, Incompatibility, Rule};

/// How many `allOf`/`anyOf`/`oneOf` members deep a lookup goes at one
/// segment.
const MEMBERS_DEPTH_MAX: usize = 16;

/// Where a read leads in one schema.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Lookup {
    Declared {
        required: bool,
    },
    /// The segment at this index is not declared.
    Missing {
        at: usize,
    },
    /// The schema cannot be followed there (the structural check reports
    /// why).
    Unknown,
}

/// The segments of an RFC 6901 pointer, unescaped.
fn segments(pointer: &str) -> Result<Vec<String>, String> {
    if pointer.is_empty() {
        return Ok(Vec::new());
    }
    let Some(rest) = pointer.strip_prefix('/') else {
        return Err("it must start with `/`".into());
    };
    rest.split('/')
        .map(|segment| {
            let mut out = String::with_capacity(segment.len());
            let mut chars = segment.chars();
            while let Some(c) = chars.next() {
                match (c, c == '~') {
                    (_, false) => out.push(c),
                    (_, true) => match chars.next() {
                        Some('0') => out.push('~'),
                        Some('1') => out.push('/'),
                        _ => return Err("`~` must be followed by 0 or 1".to_owned()),
                    },
                }
            }
            Ok(out)
        })
        .collect()
}

impl Cx<'_> {
    /// Checks each read against both versions.
    pub(super) fn check_reads(&mut self, reads: &[String]) {
        let reads: BTreeSet<&String> = reads.iter().collect();
        for read in reads {
            let segs = match segments(read) {
                Ok(segs) => segs,
                Err(why) => {
                    let message = format!(
                        "the pipeline reads {read:?}, which is not a JSON pointer ({why}); the check cannot tell whether the new version still has it"
                    );
                    self.report_read(read, Rule::Unknown, message);
                    continue;
                }
            };
            if segs.is_empty() {
                continue;
            }
            let old = self.lookup(self.old_root, &segs);
            let new = self.lookup(self.new_root, &segs);
            match (old, new) {
                (Lookup::Declared { .. }, Lookup::Missing { at }) => {
                    let missing = pointer(&segs[..=at]);
                    let message = if at + 1 == segs.len() {
                        format!(
                            "`{read}` is read by the pipeline, but the new version no longer declares it"
                        )
                    } else {
                        format!(
                            "`{read}` is read by the pipeline, but the new version no longer declares `{missing}`"
                        )
                    };
                    self.report_read(read, Rule::RemovedProperty, message);
                }
                (Lookup::Declared { required: true }, Lookup::Declared { required: false }) => {
                    let message = format!(
                        "`{read}` is read by the pipeline and the previous version required it, but the new version does not; payloads of the new version may lack it"
                    );
                    self.report_read(read, Rule::OptionalRead, message);
                }
                _ => {}
            }
        }
    }

    /// Reports a read's problem; it replaces what the structural check said
    /// about the same place under the same rule.
    fn report_read(&mut self, read: &str, rule: Rule, message: String) {
        match self
            .out
            .iter_mut()
            .find(|i| i.pointer == read && i.rule == rule)
        {
            Some(there) => there.message = message,
            None => self.out.push(Incompatibility {
                pointer: read.to_owned(),
                rule,
                message,
            }),
        }
    }

    fn lookup(&mut self, root: &Value, segs: &[String]) -> Lookup {
        if root.is_null() {
            return Lookup::Missing { at: 0 };
        }
        self.lookup_in(root, root, segs, 0, true, false, 0)
    }

    /// Follows `segs[at..]` from `schema`. `required` says whether every
    /// segment before `at` was required, `required_here` whether an
    /// enclosing schema at the same level requires `segs[at]`.
    #[allow(clippy::too_many_arguments)]
    fn lookup_in(
        &mut self,
        root: &Value,
        schema: &Value,
        segs: &[String],
        at: usize,
        required: bool,
        required_here: bool,
        members_depth: usize,
    ) -> Lookup {
        if at == segs.len() {
            return Lookup::Declared { required };
        }
        if members_depth > MEMBERS_DEPTH_MAX || !self.spend() {
            return Lookup::Unknown;
        }
        let Ok(resolved) = resolve(root, schema) else {
            return Lookup::Unknown;
        };
        let Sub::Obj(map) = &resolved.sub else {
            return Lookup::Missing { at };
        };
        let seg = &segs[at];
        let required_here = required_here
            || map
                .get("required")
                .and_then(Value::as_array)
                .is_some_and(|r| r.iter().any(|n| n.as_str() == Some(seg)));
        let next_required = required && required_here;
        if let Some(child) = map.get("properties").and_then(|p| p.get(seg)) {
            return self.lookup_in(root, child, segs, at + 1, next_required, false, 0);
        }
        if let Some(Value::Object(patterns)) = map.get("patternProperties") {
            for (pattern, child) in patterns {
                if self.pattern_matches(pattern, seg) {
                    return self.lookup_in(root, child, segs, at + 1, next_required, false, 0);
                }
            }
        }
        let index = if seg == "*" {
            Some(None)
        } else {
            seg.parse::<usize>().ok().map(Some)
        };
        if let Some(index) = index {
            let (prefix, rest) = match map.get("items") {
                Some(Value::Array(prefix)) => (Some(prefix), map.get("additionalItems")),
                rest => (map.get("prefixItems").and_then(Value::as_array), rest),
            };
            let child = index.and_then(|i| prefix.and_then(|p| p.get(i))).or(rest);
            if let Some(child) = child {
                return self.lookup_in(root, child, segs, at + 1, false, false, 0);
            }
        }
        let mut outcome = Lookup::Missing { at };
        for (keyword, all) in [("allOf", true), ("anyOf", false), ("oneOf", false)] {
            let Some(Value::Array(members)) = map.get(keyword) else {
                continue;
            };
            for member in members {
                let found = self.lookup_in(
                    root,
                    member,
                    segs,
                    at,
                    required && all,
                    required_here && all,
                    members_depth + 1,
                );
                match found {
                    Lookup::Declared { .. } => return found,
                    Lookup::Unknown => outcome = Lookup::Unknown,
                    Lookup::Missing { at: deeper } => {
                        if let Lookup::Missing { at: so_far } = outcome {
                            outcome = Lookup::Missing {
                                at: so_far.max(deeper),
                            };
                        }
                    }
                }
            }
        }
        outcome
    }
}

#[cfg(test)]
mod tests {
    use super::segments;

    #[test]
    fn pointers_are_split_and_unescaped() {
        assert_eq!(segments("").unwrap(), Vec::<String>::new());
        assert_eq!(segments("/a/b").unwrap(), ["a", "b"]);
        assert_eq!(segments("/a~1b/~0/").unwrap(), ["a/b", "~", ""]);
        assert!(segments("a").is_err());
        assert!(segments("/a~2").is_err());
    }
}
