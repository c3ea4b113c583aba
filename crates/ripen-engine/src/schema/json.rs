//! The one JSON reader of intake, shared by typed and schema-less types so
//! that both refuse the same bodies: text that is not JSON, numbers out of
//! range (`1e400`), lone surrogates (`"\ud800"`), duplicate keys at any
//! depth, and bodies past a [`JsonLimits`] (nesting, keys per object and in
//! all, bytes of a string, items of an array).
//!
//! One pass over the text does it all. The reader either keeps nothing (a
//! type without a schema: only the root's kind and the keys of the objects
//! being read are held, borrowed from the text where they have no escapes)
//! or builds the [`Value`] the schema validates. Both go through the same
//! visitor, so they cannot drift apart, and every limit is checked before
//! what breaches it is kept.

use std::borrow::Cow;
use std::collections::HashSet;
use std::fmt;

use serde::de::{self, DeserializeSeed, MapAccess, SeqAccess, Visitor};
use serde_json::{Map, Number, Value};

use crate::limits::{JsonLimit, JsonLimits};

/// Reads `raw` as a JSON text and says whether it is an object, keeping
/// nothing of it.
pub(super) fn read_plain(raw: &str, limits: &JsonLimits) -> Result<bool, Refused> {
    read(raw, Skip::default(), limits).map(|kind| kind == Kind::Object)
}

/// Reads `raw` as a JSON text into a value.
pub(super) fn read_value(raw: &str, limits: &JsonLimits) -> Result<Value, Refused> {
    read(raw, Build, limits)
}

/// Why a text is refused: not JSON by intake's rules, or past one of its
/// limits.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Refused {
    Malformed(String),
    /// Past `limit` (nesting deeper than the depth limit included).
    Limit {
        limit: JsonLimit,
        message: String,
    },
}

fn read<'de, K: Keep<'de>>(
    raw: &'de str,
    keep: K,
    limits: &JsonLimits,
) -> Result<K::Value, Refused> {
    let mut state = State {
        keep,
        breach: None,
        limits: *limits,
        depth: 0,
        keys: 0,
    };
    let mut de = serde_json::Deserializer::from_str(raw);
    // serde_json also refuses nesting deeper than JSON_DEPTH_MAX on this
    // path, which bounds the stack a hostile body can use.
    let read = Node(&mut state)
        .deserialize(&mut de)
        .and_then(|value| de.end().map(|()| value));
    let depth = |line: usize, column: usize| {
        Refused::Limit {
        limit: JsonLimit::Depth,
        message: format!(
            "the body nests objects and arrays deeper than {} levels, the most intake reads (line {line}, column {column})",
            limits.depth_max,
        ),
    }
    };
    read.map_err(|e| match state.breach.take() {
        Some(Breach {
            kind: BreachKind::Duplicate(key),
            path_rev,
        }) => Refused::Malformed(duplicate_message(&key, &path_rev)),
        Some(Breach {
            kind: BreachKind::Limit(JsonLimit::Depth),
            ..
        }) => depth(e.line(), e.column()),
        Some(Breach {
            kind: BreachKind::Limit(limit),
            path_rev,
        }) => Refused::Limit {
            limit,
            message: format!(
                "the body has more than {} {} ({} is {}), at {}",
                limit.max(limits),
                limit.what(),
                limit.key(),
                limit.max(limits),
                pointer(&path_rev)
            ),
        },
        // serde_json's own words for its depth limit.
        None if e.to_string().starts_with("recursion limit exceeded") => {
            depth(e.line(), e.column())
        }
        None => Refused::Malformed(format!("the body is not JSON: {e}")),
    })
}

/// Why the reader stopped short of the end, and where: the path to the
/// value, innermost segment first (it is collected while the error
/// unwinds).
struct Breach {
    kind: BreachKind,
    path_rev: Vec<String>,
}

enum BreachKind {
    /// A key seen twice in one object.
    Duplicate(String),
    Limit(JsonLimit),
}

/// The JSON pointer of a reversed path; "the top level" for the root.
fn pointer(path_rev: &[String]) -> String {
    if path_rev.is_empty() {
        return "the top level".into();
    }
    let mut pointer = String::new();
    for segment in path_rev.iter().rev() {
        pointer.push('/');
        pointer.push_str(&segment.replace('~', "~0").replace('/', "~1"));
    }
    pointer
}

fn duplicate_message(key: &str, path_rev: &[String]) -> String {
    let key = Value::from(key);
    if path_rev.is_empty() {
        return format!(
            "duplicate key {key} in the top-level object: a key may appear only once in an object"
        );
    }
    format!(
        "duplicate key {key} at {}: a key may appear only once in an object",
        pointer(path_rev)
    )
}

/// The kind of a value read by [`Skip`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Object,
    Other,
}

/// What a reader keeps of what it reads: the one difference between the
/// schema-less and the typed path.
trait Keep<'de> {
    type Value;
    type Object;
    type Array;
    fn null(&mut self) -> Self::Value;
    fn bool(&mut self, b: bool) -> Self::Value;
    fn number(&mut self, n: Number) -> Self::Value;
    fn string(&mut self, s: &str) -> Self::Value;
    fn array(&mut self) -> Self::Array;
    fn element(&mut self, array: &mut Self::Array, value: Self::Value);
    fn end_array(&mut self, array: Self::Array) -> Self::Value;
    fn object(&mut self) -> Self::Object;
    /// Adds a member; gives the key back if the object already has it.
    fn member(
        &mut self,
        object: &mut Self::Object,
        key: Cow<'de, str>,
        value: Self::Value,
    ) -> Result<(), Cow<'de, str>>;
    fn end_object(&mut self, object: Self::Object) -> Self::Value;
}

/// Objects with more keys than this are checked with a hash set instead of
/// a scan, so that a body of many keys costs linear time.
const SCAN_KEYS_MAX: usize = 16;

/// Keeps only the keys of the objects being read.
#[derive(Default)]
struct Skip<'de> {
    /// The keys of every object being read, outermost object first.
    keys: Vec<Cow<'de, str>>,
}

struct SkipObject<'de> {
    /// Where this object's keys start in [`Skip::keys`].
    start: usize,
    /// This object's keys, once it has more than [`SCAN_KEYS_MAX`].
    index: Option<HashSet<Cow<'de, str>>>,
}

impl<'de> Keep<'de> for Skip<'de> {
    type Value = Kind;
    type Object = SkipObject<'de>;
    type Array = ();
    fn null(&mut self) -> Kind {
        Kind::Other
    }
    fn bool(&mut self, _: bool) -> Kind {
        Kind::Other
    }
    fn number(&mut self, _: Number) -> Kind {
        Kind::Other
    }
    fn string(&mut self, _: &str) -> Kind {
        Kind::Other
    }
    fn array(&mut self) {}
    fn element(&mut self, _: &mut (), _: Kind) {}
    fn end_array(&mut self, _: ()) -> Kind {
        Kind::Other
    }
    fn object(&mut self) -> SkipObject<'de> {
        SkipObject {
            start: self.keys.len(),
            index: None,
        }
    }
    fn member(
        &mut self,
        object: &mut SkipObject<'de>,
        key: Cow<'de, str>,
        _: Kind,
    ) -> Result<(), Cow<'de, str>> {
        if let Some(index) = &mut object.index {
            if index.contains(&key) {
                return Err(key);
            }
            index.insert(key);
            return Ok(());
        }
        if self.keys[object.start..].contains(&key) {
            return Err(key);
        }
        self.keys.push(key);
        if self.keys.len() - object.start > SCAN_KEYS_MAX {
            object.index = Some(self.keys.drain(object.start..).collect());
        }
        Ok(())
    }
    fn end_object(&mut self, object: SkipObject<'de>) -> Kind {
        self.keys.truncate(object.start);
        Kind::Object
    }
}

/// Builds the value.
struct Build;

impl<'de> Keep<'de> for Build {
    type Value = Value;
    type Object = Map<String, Value>;
    type Array = Vec<Value>;
    fn null(&mut self) -> Value {
        Value::Null
    }
    fn bool(&mut self, b: bool) -> Value {
        Value::Bool(b)
    }
    fn number(&mut self, n: Number) -> Value {
        Value::Number(n)
    }
    fn string(&mut self, s: &str) -> Value {
        Value::String(s.to_owned())
    }
    fn array(&mut self) -> Vec<Value> {
        Vec::new()
    }
    fn element(&mut self, array: &mut Vec<Value>, value: Value) {
        array.push(value);
    }
    fn end_array(&mut self, array: Vec<Value>) -> Value {
        Value::Array(array)
    }
    fn object(&mut self) -> Map<String, Value> {
        Map::new()
    }
    fn member(
        &mut self,
        object: &mut Map<String, Value>,
        key: Cow<'de, str>,
        value: Value,
    ) -> Result<(), Cow<'de, str>> {
        match object.entry(key.into_owned()) {
            serde_json::map::Entry::Vacant(slot) => {
                slot.insert(value);
                Ok(())
            }
            serde_json::map::Entry::Occupied(slot) => Err(Cow::Owned(slot.key().clone())),
        }
    }
    fn end_object(&mut self, object: Map<String, Value>) -> Value {
        Value::Object(object)
    }
}

struct State<K> {
    keep: K,
    breach: Option<Breach>,
    limits: JsonLimits,
    /// Arrays and objects open around the value being read.
    depth: usize,
    /// Keys read so far, in all objects.
    keys: usize,
}

impl<K> State<K> {
    /// Records a breached limit; the error that carries it unwinds.
    fn breach<E: de::Error>(&mut self, limit: JsonLimit) -> E {
        self.breach = Some(Breach {
            kind: BreachKind::Limit(limit),
            path_rev: Vec::new(),
        });
        E::custom("limit breached")
    }

    /// Adds `segment` to the path of a breach on the way out.
    fn unwind(&mut self, segment: impl FnOnce() -> String) {
        if let Some(breach) = &mut self.breach {
            breach.path_rev.push(segment());
        }
    }

    fn enter<E: de::Error>(&mut self) -> Result<(), E> {
        if self.depth >= self.limits.depth_max {
            return Err(self.breach(JsonLimit::Depth));
        }
        self.depth += 1;
        Ok(())
    }
}

/// Reads one value of any kind.
struct Node<'s, K>(&'s mut State<K>);

impl<'de, K: Keep<'de>> DeserializeSeed<'de> for Node<'_, K> {
    type Value = K::Value;
    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<K::Value, D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de, K: Keep<'de>> Visitor<'de> for Node<'_, K> {
    type Value = K::Value;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON value")
    }
    fn visit_unit<E>(self) -> Result<K::Value, E> {
        Ok(self.0.keep.null())
    }
    fn visit_bool<E>(self, b: bool) -> Result<K::Value, E> {
        Ok(self.0.keep.bool(b))
    }
    fn visit_i64<E>(self, n: i64) -> Result<K::Value, E> {
        Ok(self.0.keep.number(n.into()))
    }
    fn visit_u64<E>(self, n: u64) -> Result<K::Value, E> {
        Ok(self.0.keep.number(n.into()))
    }
    fn visit_f64<E: de::Error>(self, n: f64) -> Result<K::Value, E> {
        // serde_json refuses what is out of range before it gets here.
        let n = Number::from_f64(n).ok_or_else(|| E::custom("number out of range"))?;
        Ok(self.0.keep.number(n))
    }
    fn visit_str<E: de::Error>(self, s: &str) -> Result<K::Value, E> {
        if s.len() > self.0.limits.string_bytes_max {
            return Err(self.0.breach(JsonLimit::StringBytes));
        }
        Ok(self.0.keep.string(s))
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<K::Value, A::Error> {
        self.0.enter()?;
        let mut array = self.0.keep.array();
        let mut index = 0usize;
        loop {
            let next = seq.next_element_seed(Node(&mut *self.0));
            match next {
                Ok(Some(_)) if index == self.0.limits.array_items_max => {
                    return Err(self.0.breach(JsonLimit::ArrayItems));
                }
                Ok(Some(value)) => self.0.keep.element(&mut array, value),
                Ok(None) => break,
                Err(e) => {
                    self.0.unwind(|| index.to_string());
                    return Err(e);
                }
            }
            index += 1;
        }
        self.0.depth -= 1;
        Ok(self.0.keep.end_array(array))
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<K::Value, A::Error> {
        self.0.enter()?;
        let mut object = self.0.keep.object();
        let mut count = 0usize;
        while let Some(key) = map.next_key_seed(KeySeed)? {
            count += 1;
            self.0.keys += 1;
            if key.len() > self.0.limits.string_bytes_max {
                return Err(self.0.breach(JsonLimit::StringBytes));
            }
            if count > self.0.limits.object_keys_max {
                return Err(self.0.breach(JsonLimit::ObjectKeys));
            }
            if self.0.keys > self.0.limits.keys_total_max {
                return Err(self.0.breach(JsonLimit::KeysTotal));
            }
            let value = match map.next_value_seed(Node(&mut *self.0)) {
                Ok(value) => value,
                Err(e) => {
                    self.0.unwind(|| key.into_owned());
                    return Err(e);
                }
            };
            if let Err(key) = self.0.keep.member(&mut object, key, value) {
                self.0.breach = Some(Breach {
                    kind: BreachKind::Duplicate(key.into_owned()),
                    path_rev: Vec::new(),
                });
                return Err(de::Error::custom("duplicate key"));
            }
        }
        self.0.depth -= 1;
        Ok(self.0.keep.end_object(object))
    }
}

/// Reads an object key, borrowed from the text unless it has escapes.
struct KeySeed;

impl<'de> DeserializeSeed<'de> for KeySeed {
    type Value = Cow<'de, str>;
    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<Cow<'de, str>, D::Error> {
        d.deserialize_str(self)
    }
}

impl<'de> Visitor<'de> for KeySeed {
    type Value = Cow<'de, str>;
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("an object key")
    }
    fn visit_borrowed_str<E>(self, s: &'de str) -> Result<Cow<'de, str>, E> {
        Ok(Cow::Borrowed(s))
    }
    fn visit_str<E>(self, s: &str) -> Result<Cow<'de, str>, E> {
        Ok(Cow::Owned(s.to_owned()))
    }
    fn visit_string<E>(self, s: String) -> Result<Cow<'de, str>, E> {
        Ok(Cow::Owned(s))
    }
}
