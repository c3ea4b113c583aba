//! The one JSON reader of intake, shared by typed and schema-less types so
//! that both refuse the same bodies: text that is not JSON, numbers out of
//! range (`1e400`), lone surrogates (`"\ud800"`), nesting deeper than
//! [`JSON_DEPTH_MAX`](super::JSON_DEPTH_MAX), and duplicate keys at any
//! depth.
//!
//! One pass over the text does it all. The reader either keeps nothing (a
//! type without a schema: only the root's kind and the keys of the objects
//! being read are held, borrowed from the text where they have no escapes)
//! or builds the [`Value`] the schema validates. Both go through the same
//! visitor, so they cannot drift apart.

use std::borrow::Cow;
use std::collections::HashSet;
use std::fmt;

use serde::de::{self, DeserializeSeed, MapAccess, SeqAccess, Visitor};
use serde_json::{Map, Number, Value};

/// Reads `raw` as a JSON text and says whether it is an object, keeping
/// nothing of it.
pub(super) fn read_plain(raw: &str) -> Result<bool, Refused> {
    read(raw, Skip::default()).map(|kind| kind == Kind::Object)
}

/// Reads `raw` as a JSON text into a value.
pub(super) fn read_value(raw: &str) -> Result<Value, Refused> {
    read(raw, Build)
}

/// Why a text is refused: not JSON by intake's rules, or nested deeper than
/// intake reads.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Refused {
    Malformed(String),
    TooDeep(String),
}

fn read<'de, K: Keep<'de>>(raw: &'de str, keep: K) -> Result<K::Value, Refused> {
    let mut state = State { keep, dup: None };
    let mut de = serde_json::Deserializer::from_str(raw);
    // serde_json refuses nesting deeper than JSON_DEPTH_MAX on this path,
    // which also bounds the stack a hostile body can use.
    let read = Node(&mut state)
        .deserialize(&mut de)
        .and_then(|value| de.end().map(|()| value));
    read.map_err(|e| match state.dup.take() {
        Some(dup) => Refused::Malformed(dup.message()),
        // serde_json's own words for its depth limit.
        None if e.to_string().starts_with("recursion limit exceeded") => {
            Refused::TooDeep(format!(
                "the body nests objects and arrays deeper than {} levels, the most intake reads (line {}, column {})",
                super::JSON_DEPTH_MAX,
                e.line(),
                e.column()
            ))
        }
        None => Refused::Malformed(format!("the body is not JSON: {e}")),
    })
}

/// A key seen twice in one object, and where that object is.
struct Duplicate {
    key: String,
    /// The path to the object, innermost segment first (it is collected
    /// while the error unwinds).
    path_rev: Vec<String>,
}

impl Duplicate {
    fn message(&self) -> String {
        let key = Value::from(self.key.as_str());
        if self.path_rev.is_empty() {
            return format!(
                "duplicate key {key} in the top-level object: a key may appear only once in an object"
            );
        }
        let mut pointer = String::new();
        for segment in self.path_rev.iter().rev() {
            pointer.push('/');
            pointer.push_str(&segment.replace('~', "~0").replace('/', "~1"));
        }
        format!("duplicate key {key} at {pointer}: a key may appear only once in an object")
    }
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
    dup: Option<Duplicate>,
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
    fn visit_str<E>(self, s: &str) -> Result<K::Value, E> {
        Ok(self.0.keep.string(s))
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<K::Value, A::Error> {
        let mut array = self.0.keep.array();
        let mut index = 0usize;
        loop {
            match seq.next_element_seed(Node(&mut *self.0)) {
                Ok(Some(value)) => self.0.keep.element(&mut array, value),
                Ok(None) => break,
                Err(e) => {
                    if let Some(dup) = &mut self.0.dup {
                        dup.path_rev.push(index.to_string());
                    }
                    return Err(e);
                }
            }
            index += 1;
        }
        Ok(self.0.keep.end_array(array))
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<K::Value, A::Error> {
        let mut object = self.0.keep.object();
        while let Some(key) = map.next_key_seed(KeySeed)? {
            let value = match map.next_value_seed(Node(&mut *self.0)) {
                Ok(value) => value,
                Err(e) => {
                    if let Some(dup) = &mut self.0.dup {
                        dup.path_rev.push(key.into_owned());
                    }
                    return Err(e);
                }
            };
            if let Err(key) = self.0.keep.member(&mut object, key, value) {
                self.0.dup = Some(Duplicate {
                    key: key.into_owned(),
                    path_rev: Vec::new(),
                });
                return Err(de::Error::custom("duplicate key"));
            }
        }
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
