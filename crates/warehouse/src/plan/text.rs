//! Flattening an object straight from its JSON text in one pass (no map built, keys
//! without escapes borrowed). Invariant: the leaves equal model's `flatten` of the
//! same object, or the pass fails (a repeated key, text that does not parse) and the
//! record takes the general parse.

use serde::Deserialize;
use serde_json::Value;
use std::collections::HashSet;

use tributary_model::flatten::array_text;

use super::{Name, Names};
use crate::types::ColumnType;

/// Deepest object nesting flattened from text (serde_json's own parse limit).
const MAX_DEPTH: usize = 128;

/// The state of [`RowBuilder::flatten_text`].
pub(super) struct FlattenText<'r> {
    pub(super) out: &'r mut Vec<(Name, Value)>,
    pub(super) fixed: &'static [(&'static str, ColumnType)],
    pub(super) is_context: bool,
    pub(super) names: &'r mut Names,
    /// The joined path of the object being read.
    pub(super) path: &'r mut String,
    pub(super) depth: usize,
}

impl FlattenText<'_> {
    /// Adds the leaves of the object whose JSON text is `text`.
    pub(super) fn object(&mut self, text: &str) -> Result<(), serde_json::Error> {
        use serde::de::Deserializer as _;
        let mut de = serde_json::Deserializer::from_str(text);
        (&mut de).deserialize_map(ObjectVisitor(self))?;
        de.end()
    }
}

/// Reads one object's entries, depth first, in document order.
struct ObjectVisitor<'f, 'r>(&'f mut FlattenText<'r>);

impl<'de> serde::de::Visitor<'de> for ObjectVisitor<'_, '_> {
    type Value = ();

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("a JSON object")
    }

    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        use serde::de::Error as _;
        let f = self.0;
        f.depth += 1;
        if f.depth > MAX_DEPTH {
            return Err(A::Error::custom("objects nested too deeply"));
        }
        let len = f.path.len();
        // A key repeated in this object: the general parse keeps the last value,
        // which this single pass cannot (the first may already be flattened, maybe
        // into other columns); fail so the record takes the general parse.
        let mut seen: Vec<std::borrow::Cow<'de, str>> = Vec::new();
        let mut seen_set: HashSet<std::borrow::Cow<'de, str>> = HashSet::new();
        while let Some(Key(key)) = map.next_key::<Key<'de>>()? {
            let repeated = if seen_set.is_empty() && seen.len() < 16 {
                let repeated = seen.contains(&key);
                seen.push(key.clone());
                repeated
            } else {
                seen_set.extend(seen.drain(..));
                !seen_set.insert(key.clone())
            };
            if repeated {
                return Err(A::Error::custom("a repeated key"));
            }
            f.path.truncate(len);
            if !f.path.is_empty() {
                f.path.push('_');
            }
            f.path.push_str(&key);
            map.next_value_seed(Entry(&mut *f))?;
        }
        f.path.truncate(len);
        f.depth -= 1;
        Ok(())
    }
}

impl FlattenText<'_> {
    /// Adds a leaf at the current path.
    fn leaf(&mut self, value: Value) {
        let col = self.names.column(self.fixed, self.is_context, self.path);
        self.out.push((Name::Shared(col), value));
    }
}

/// The value of one object entry, read in the same pass as its key: an object is
/// flattened under the entry's path, an array becomes its JSON text, a scalar is a
/// leaf — the values `serde_json::Value` would hold.
struct Entry<'f, 'r>(&'f mut FlattenText<'r>);

impl<'de> serde::de::DeserializeSeed<'de> for Entry<'_, '_> {
    type Value = ();

    fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> serde::de::Visitor<'de> for Entry<'_, '_> {
    type Value = ();

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("a JSON value")
    }

    fn visit_map<A: serde::de::MapAccess<'de>>(self, map: A) -> Result<(), A::Error> {
        ObjectVisitor(self.0).visit_map(map)
    }

    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, seq: A) -> Result<(), A::Error> {
        let array = Value::deserialize(serde::de::value::SeqAccessDeserializer::new(seq))?;
        self.0.leaf(Value::String(array_text(&array)));
        Ok(())
    }

    fn visit_bool<E>(self, v: bool) -> Result<(), E> {
        self.0.leaf(Value::Bool(v));
        Ok(())
    }

    fn visit_i64<E>(self, v: i64) -> Result<(), E> {
        self.0.leaf(Value::Number(v.into()));
        Ok(())
    }

    fn visit_u64<E>(self, v: u64) -> Result<(), E> {
        self.0.leaf(Value::Number(v.into()));
        Ok(())
    }

    fn visit_f64<E>(self, v: f64) -> Result<(), E> {
        // As `serde_json::Value` reads it.
        self.0
            .leaf(serde_json::Number::from_f64(v).map_or(Value::Null, Value::Number));
        Ok(())
    }

    fn visit_str<E>(self, v: &str) -> Result<(), E> {
        self.0.leaf(Value::String(v.to_string()));
        Ok(())
    }

    fn visit_string<E>(self, v: String) -> Result<(), E> {
        self.0.leaf(Value::String(v));
        Ok(())
    }

    fn visit_unit<E>(self) -> Result<(), E> {
        self.0.leaf(Value::Null);
        Ok(())
    }

    fn visit_none<E>(self) -> Result<(), E> {
        self.0.leaf(Value::Null);
        Ok(())
    }
}

/// An object key, borrowed from the text when it has no escapes.
struct Key<'de>(std::borrow::Cow<'de, str>);

impl<'de> Deserialize<'de> for Key<'de> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = Key<'de>;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a string")
            }
            fn visit_borrowed_str<E>(self, v: &'de str) -> Result<Key<'de>, E> {
                Ok(Key(std::borrow::Cow::Borrowed(v)))
            }
            fn visit_str<E>(self, v: &str) -> Result<Key<'de>, E> {
                Ok(Key(std::borrow::Cow::Owned(v.to_string())))
            }
        }
        d.deserialize_str(V)
    }
}
