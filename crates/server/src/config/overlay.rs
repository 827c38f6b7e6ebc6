//! The environment overlay: a serde `Deserializer` over the TOML file's tree that
//! answers each struct field from `TRIBUTARY_<SECTION>_<FIELD>` when that variable is
//! set, and from the file otherwise.
//!
//! Invariants:
//! - The variable name of a setting is derived from its place in the tree and
//!   nothing else: the prefix of a table (`TRIBUTARY_`, `TRIBUTARY_LOG_`, …) plus the
//!   field name in upper case. A field added to any section (in this crate or in a
//!   stage crate) is reachable from the environment without code here.
//! - The environment beats the file; a variable is read as text and converted to the
//!   type the field asks for (numbers, booleans, comma-separated lists, strings,
//!   durations through their own deserializer).
//! - A variable that names no setting is never consumed: after a successful load the
//!   caller lists the unconsumed `TRIBUTARY_*` variables and warns about them. One
//!   that collides with the shape of the tree (`TRIBUTARY_LOG=1` where `log` is a
//!   section, `TRIBUTARY_DATA_DIR_X` where `data_dir` is a value) is reported as
//!   [`OverlayError::NotASetting`] so the loader can drop it and retry.

use std::cell::RefCell;
use std::collections::{BTreeMap, BTreeSet};

use serde::de::{self, DeserializeSeed, IntoDeserializer, MapAccess, SeqAccess, Visitor};

/// Where a bad value came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Origin {
    /// A key of the file, dotted (`log.retention`).
    File(String),
    /// An environment variable.
    Env(String),
}

/// Why the overlay could not produce a value.
#[derive(Debug)]
pub enum OverlayError {
    /// A value does not fit its field.
    Message {
        /// The innermost key or variable the error was raised under.
        origin: Option<Origin>,
        /// Serde's explanation.
        message: String,
    },
    /// These variables name no setting (they collide with a section or a value).
    NotASetting(Vec<String>),
}

impl OverlayError {
    fn at(self, origin: impl FnOnce() -> Origin) -> Self {
        match self {
            OverlayError::Message {
                origin: None,
                message,
            } => OverlayError::Message {
                origin: Some(origin()),
                message,
            },
            e => e,
        }
    }
}

impl std::fmt::Display for OverlayError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            OverlayError::Message { origin, message } => match origin {
                Some(Origin::File(k)) => write!(f, "{k}: {message}"),
                Some(Origin::Env(k)) => write!(f, "{k}: {message}"),
                None => f.write_str(message),
            },
            OverlayError::NotASetting(v) => write!(f, "not a setting: {}", v.join(", ")),
        }
    }
}

impl std::error::Error for OverlayError {}

impl de::Error for OverlayError {
    fn custom<T: std::fmt::Display>(msg: T) -> Self {
        OverlayError::Message {
            origin: None,
            message: msg.to_string(),
        }
    }
}

/// The `TRIBUTARY_*` variables of one load and which of them were read.
pub struct Env {
    vars: BTreeMap<String, String>,
    used: RefCell<BTreeSet<String>>,
}

impl Env {
    /// Wraps the (non-empty) variables to offer.
    pub fn new(vars: BTreeMap<String, String>) -> Self {
        Env {
            vars,
            used: RefCell::new(BTreeSet::new()),
        }
    }

    /// The variables no field read.
    pub fn unused(&self) -> Vec<String> {
        let used = self.used.borrow();
        self.vars
            .keys()
            .filter(|k| !used.contains(*k))
            .cloned()
            .collect()
    }

    /// Removes variables (after [`OverlayError::NotASetting`]).
    pub fn remove(&mut self, names: &[String]) -> Vec<String> {
        names
            .iter()
            .filter(|n| self.vars.remove(*n).is_some())
            .cloned()
            .collect()
    }

    fn get(&self, name: &str) -> Option<&str> {
        let v = self.vars.get(name)?;
        self.used.borrow_mut().insert(name.to_string());
        Some(v)
    }

    fn under(&self, prefix: &str) -> Vec<String> {
        self.vars
            .range(prefix.to_string()..)
            .take_while(|(k, _)| k.starts_with(prefix))
            .map(|(k, _)| k.clone())
            .collect()
    }
}

/// A table of the tree: the file's part (if any) and the variable prefix of its
/// fields.
pub struct Table<'a> {
    /// The file's table at this place.
    pub file: Option<toml::Table>,
    /// Dotted path of this table (`""` at the root).
    pub path: String,
    /// Variable prefix of its fields (`TRIBUTARY_` at the root).
    pub prefix: String,
    /// The environment.
    pub env: &'a Env,
}

enum Node<'a> {
    Table(Table<'a>),
    File { path: String, value: toml::Value },
    Env { name: String, value: String },
}

fn join(path: &str, key: &str) -> String {
    if path.is_empty() {
        key.to_string()
    } else {
        format!("{path}.{key}")
    }
}

impl<'de> de::Deserializer<'de> for Table<'_> {
    type Error = OverlayError;

    fn deserialize_any<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, OverlayError> {
        match self.file {
            Some(t) => toml::Value::Table(t)
                .deserialize_any(visitor)
                .map_err(de::Error::custom),
            // No file part and not asked for as a struct: the variables under this
            // prefix name no setting.
            None => Err(OverlayError::NotASetting(self.env.under(&self.prefix))),
        }
    }

    fn deserialize_option<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, OverlayError> {
        visitor.visit_some(self)
    }

    fn deserialize_newtype_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        visitor: V,
    ) -> Result<V::Value, OverlayError> {
        visitor.visit_newtype_struct(self)
    }

    fn deserialize_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        fields: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, OverlayError> {
        let mut file = self.file.unwrap_or_default();
        let mut entries: Vec<(String, Node<'_>)> = Vec::new();
        for field in fields {
            let name = format!("{}{}", self.prefix, field.to_ascii_uppercase());
            let path = join(&self.path, field);
            let from_file = file.remove(*field);
            if let Some(v) = self.env.get(&name) {
                entries.push((
                    field.to_string(),
                    Node::Env {
                        name,
                        value: v.to_string(),
                    },
                ));
                continue;
            }
            let child_prefix = format!("{name}_");
            match from_file {
                Some(toml::Value::Table(t)) => entries.push((
                    field.to_string(),
                    Node::Table(Table {
                        file: Some(t),
                        path,
                        prefix: child_prefix,
                        env: self.env,
                    }),
                )),
                Some(value) => entries.push((field.to_string(), Node::File { path, value })),
                None if !self.env.under(&child_prefix).is_empty() => entries.push((
                    field.to_string(),
                    Node::Table(Table {
                        file: None,
                        path,
                        prefix: child_prefix,
                        env: self.env,
                    }),
                )),
                None => {}
            }
        }
        // Keys the struct does not know stay, so `deny_unknown_fields` names them.
        for (k, value) in file {
            let path = join(&self.path, &k);
            entries.push((k, Node::File { path, value }));
        }
        visitor.visit_map(Entries {
            iter: entries.into_iter(),
            pending: None,
        })
    }

    serde::forward_to_deserialize_any! {
        bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string
        bytes byte_buf unit unit_struct seq tuple tuple_struct map enum identifier
        ignored_any
    }
}

struct Entries<'a> {
    iter: std::vec::IntoIter<(String, Node<'a>)>,
    pending: Option<Node<'a>>,
}

impl<'de> MapAccess<'de> for Entries<'_> {
    type Error = OverlayError;

    fn next_key_seed<K: DeserializeSeed<'de>>(
        &mut self,
        seed: K,
    ) -> Result<Option<K::Value>, OverlayError> {
        match self.iter.next() {
            None => Ok(None),
            Some((k, node)) => {
                let origin = match &node {
                    Node::Table(t) => Origin::File(t.path.clone()),
                    Node::File { path, .. } => Origin::File(path.clone()),
                    Node::Env { name, .. } => Origin::Env(name.clone()),
                };
                self.pending = Some(node);
                seed.deserialize(k.into_deserializer())
                    .map(Some)
                    .map_err(|e: OverlayError| e.at(|| origin))
            }
        }
    }

    fn next_value_seed<V: DeserializeSeed<'de>>(
        &mut self,
        seed: V,
    ) -> Result<V::Value, OverlayError> {
        match self.pending.take() {
            Some(Node::Table(t)) => {
                let path = t.path.clone();
                seed.deserialize(t).map_err(|e| e.at(|| Origin::File(path)))
            }
            Some(Node::File { path, value }) => seed
                .deserialize(FileValue(value))
                .map_err(|e| e.at(|| Origin::File(path))),
            Some(Node::Env { name, value }) => seed
                .deserialize(EnvValue {
                    name: name.clone(),
                    value,
                })
                .map_err(|e| e.at(|| Origin::Env(name))),
            None => Err(de::Error::custom("value without a key")),
        }
    }
}

/// A value from the file, handed to toml's own deserializer.
struct FileValue(toml::Value);

impl<'de> de::Deserializer<'de> for FileValue {
    type Error = OverlayError;

    fn deserialize_any<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, OverlayError> {
        self.0.deserialize_any(visitor).map_err(de::Error::custom)
    }

    fn deserialize_option<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, OverlayError> {
        visitor.visit_some(self)
    }

    fn deserialize_newtype_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        visitor: V,
    ) -> Result<V::Value, OverlayError> {
        visitor.visit_newtype_struct(self)
    }

    fn deserialize_enum<V: Visitor<'de>>(
        self,
        name: &'static str,
        variants: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, OverlayError> {
        self.0
            .deserialize_enum(name, variants, visitor)
            .map_err(de::Error::custom)
    }

    serde::forward_to_deserialize_any! {
        bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string
        bytes byte_buf unit unit_struct seq tuple tuple_struct map struct identifier
        ignored_any
    }
}

/// A variable's text, converted to what the field asks for.
struct EnvValue {
    name: String,
    value: String,
}

impl EnvValue {
    fn parse<T: std::str::FromStr>(&self, what: &str) -> Result<T, OverlayError> {
        self.value
            .trim()
            .parse()
            .map_err(|_| de::Error::custom(format!("{:?} is not {what}", self.value)))
    }
}

macro_rules! env_number {
    ($($method:ident => $visit:ident: $ty:ty, $what:literal;)*) => {
        $(fn $method<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, OverlayError> {
            let n: $ty = self.parse($what)?;
            visitor.$visit(n)
        })*
    };
}

impl<'de> de::Deserializer<'de> for EnvValue {
    type Error = OverlayError;

    fn deserialize_any<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, OverlayError> {
        visitor.visit_string(self.value)
    }

    fn deserialize_bool<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, OverlayError> {
        match self.value.trim().to_ascii_lowercase().as_str() {
            "1" | "true" | "yes" | "on" => visitor.visit_bool(true),
            "0" | "false" | "no" | "off" => visitor.visit_bool(false),
            _ => Err(de::Error::custom(format!(
                "{:?} is not a boolean (true/false, 1/0)",
                self.value
            ))),
        }
    }

    env_number! {
        deserialize_i8 => visit_i64: i64, "an integer";
        deserialize_i16 => visit_i64: i64, "an integer";
        deserialize_i32 => visit_i64: i64, "an integer";
        deserialize_i64 => visit_i64: i64, "an integer";
        deserialize_u8 => visit_u64: u64, "a non-negative integer";
        deserialize_u16 => visit_u64: u64, "a non-negative integer";
        deserialize_u32 => visit_u64: u64, "a non-negative integer";
        deserialize_u64 => visit_u64: u64, "a non-negative integer";
        deserialize_f32 => visit_f64: f64, "a number";
        deserialize_f64 => visit_f64: f64, "a number";
    }

    fn deserialize_option<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, OverlayError> {
        visitor.visit_some(self)
    }

    fn deserialize_newtype_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        visitor: V,
    ) -> Result<V::Value, OverlayError> {
        visitor.visit_newtype_struct(self)
    }

    fn deserialize_seq<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, OverlayError> {
        let items: Vec<EnvValue> = self
            .value
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(|s| EnvValue {
                name: self.name.clone(),
                value: s.to_string(),
            })
            .collect();
        visitor.visit_seq(EnvSeq(items.into_iter()))
    }

    fn deserialize_enum<V: Visitor<'de>>(
        self,
        _name: &'static str,
        _variants: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, OverlayError> {
        visitor.visit_enum(self.value.trim().to_string().into_deserializer())
    }

    fn deserialize_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        _fields: &'static [&'static str],
        _visitor: V,
    ) -> Result<V::Value, OverlayError> {
        Err(OverlayError::NotASetting(vec![self.name]))
    }

    fn deserialize_map<V: Visitor<'de>>(self, _visitor: V) -> Result<V::Value, OverlayError> {
        Err(OverlayError::NotASetting(vec![self.name]))
    }

    serde::forward_to_deserialize_any! {
        i128 u128 char str string bytes byte_buf unit unit_struct tuple tuple_struct
        identifier ignored_any
    }
}

struct EnvSeq(std::vec::IntoIter<EnvValue>);

impl<'de> SeqAccess<'de> for EnvSeq {
    type Error = OverlayError;

    fn next_element_seed<T: DeserializeSeed<'de>>(
        &mut self,
        seed: T,
    ) -> Result<Option<T::Value>, OverlayError> {
        self.0.next().map(|v| seed.deserialize(v)).transpose()
    }
}
