//! The request path's form of a message: validated once, never built into a tree,
//! stored by splicing its own bytes (issue #15).
//!
//! [`Split::parse`] checks that a message's text is a JSON object that the tree path
//! ([`crate::normalize::normalize`] on a `serde_json::Value`) would read the same
//! way, and keeps its top-level members as `(key, raw value text)` slices of the
//! request. Normalization then reads only the few members it needs (parsed one by
//! one on demand), sets or removes members, and writes the stored text from the
//! untouched members' own bytes plus the changed ones. The result, parsed as JSON,
//! equals what the tree path stores — same members, same values, same order (the
//! property test below compares both on generated messages).
//!
//! Anything unusual is left to the tree path, which then decides exactly as before
//! (the same rejection, the same error text): text that is not valid JSON, a number
//! out of `f64`'s range, a lone surrogate escape, a key written with escapes, a key
//! repeated in any object (the tree keeps the last; raw text would keep both), or
//! nesting deeper than [`MAX_DEPTH`]. Untouched values keep their text as sent
//! (whitespace, escapes, number spelling), which parses to the same values.

use std::borrow::Cow;

use serde::de::{DeserializeSeed, Error as _, MapAccess, SeqAccess, Visitor};
use serde_json::value::RawValue;
use serde_json::{Map, Value};

use crate::normalize::{Kind, Members, NormalizeContext, merged_context, merged_integrations};

/// Deepest nesting (from the message object, which is level 1) the spliced form
/// takes; deeper messages go to the tree path, whose parser has its own limit.
pub const MAX_DEPTH: u32 = 100;

/// A message as its top-level members' text, checked as described in the module
/// documentation.
#[derive(Debug, Clone)]
pub struct Split<'a> {
    text: &'a str,
    members: Vec<(&'a str, &'a str)>,
    /// The members of `context` and `traits` when they are objects, by their
    /// text, found in the same pass (normalization looks into both).
    inner: Vec<(&'a str, Vec<(&'a str, &'a str)>)>,
}

/// The keys of one object as read (slices of the text), and for the members
/// that are looked into, their own keys.
type Keys<'a> = Vec<(&'a str, Option<Vec<&'a str>>)>;

impl<'a> Split<'a> {
    /// The message's members, or `None` when the text must take the tree path.
    ///
    /// One pass of `serde_json` over the text validates every value as `Value`
    /// would and yields the keys as slices of the text; each value's text is then
    /// the bytes between its key's colon and the next key's comma (or the closing
    /// brace), found by skipping whitespace only.
    pub fn parse(text: &'a str) -> Option<Split<'a>> {
        let mut de = serde_json::Deserializer::from_str(text);
        let keys = serde::Deserializer::deserialize_map(&mut de, Top).ok()?;
        de.end().ok()?;
        let whole = text.trim_matches(is_ws);
        let key_list: Vec<&str> = keys.iter().map(|(k, _)| *k).collect();
        let members = spans(whole, &key_list)?;
        let mut inner = Vec::new();
        for ((_, value), (_, nested)) in members.iter().zip(&keys) {
            if let Some(nested) = nested {
                inner.push((*value, spans(value, nested)?));
            }
        }
        Some(Split {
            text,
            members,
            inner,
        })
    }
    /// The message's whole text as received.
    pub fn text(&self) -> &'a str {
        self.text
    }

    /// A member's value, parsed.
    pub fn get(&self, key: &str) -> Option<Value> {
        let raw = self.members.iter().find(|(k, _)| *k == key)?.1;
        serde_json::from_str(raw).ok()
    }

    /// The message as a tree (for the paths that need one).
    pub fn into_value(self) -> Value {
        serde_json::from_str(self.text).unwrap_or(Value::Null)
    }
}

fn is_ws(c: char) -> bool {
    matches!(c, ' ' | '\t' | '\n' | '\r')
}

/// Each member's value text in `object` (the exact text of one object, braces
/// included, already validated), given its keys as slices of that text.
fn spans<'a>(object: &'a str, keys: &[&'a str]) -> Option<Vec<(&'a str, &'a str)>> {
    let bytes = object.as_bytes();
    let base = object.as_ptr() as usize;
    let offset = |k: &str| {
        let at = (k.as_ptr() as usize).checked_sub(base)?;
        (at + k.len() < bytes.len()).then_some(at)
    };
    let ws = |b: u8| matches!(b, b' ' | b'\t' | b'\n' | b'\r');
    let mut out = Vec::with_capacity(keys.len());
    for (i, k) in keys.iter().enumerate() {
        // After the key's closing quote: whitespace, `:`, whitespace.
        let mut start = offset(k)? + k.len() + 1;
        while start < bytes.len() && ws(bytes[start]) {
            start += 1;
        }
        if bytes.get(start) != Some(&b':') {
            return None;
        }
        start += 1;
        while start < bytes.len() && ws(bytes[start]) {
            start += 1;
        }
        // Before the next key's opening quote: whitespace, `,`, whitespace; or
        // before the closing brace.
        let mut end = match keys.get(i + 1) {
            Some(next) => {
                let mut e = offset(next)?.checked_sub(1)?;
                while e > start && ws(bytes[e - 1]) {
                    e -= 1;
                }
                if bytes.get(e.checked_sub(1)?) != Some(&b',') {
                    return None;
                }
                e - 1
            }
            None => {
                if bytes.last() != Some(&b'}') {
                    return None;
                }
                bytes.len() - 1
            }
        };
        while end > start && ws(bytes[end - 1]) {
            end -= 1;
        }
        out.push((*k, object.get(start..end)?));
    }
    Some(out)
}

/// The message object: keys (no escapes, none repeated) as slices of the text,
/// every value validated; `context`'s and `traits`' keys read in the same pass.
struct Top;

impl<'de> Visitor<'de> for Top {
    type Value = Keys<'de>;
    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("an object")
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Keys<'de>, A::Error> {
        let mut keys: Keys<'de> = Vec::with_capacity(16);
        while let Some(k) = map.next_key_seed(Key)? {
            if keys.iter().any(|(seen, _)| *seen == k) {
                return Err(A::Error::custom("repeated key"));
            }
            let nested = if k == "context" || k == "traits" {
                map.next_value_seed(Inner)?
            } else {
                map.next_value_seed(Valid { depth: 1 })?;
                None
            };
            keys.push((k, nested));
        }
        Ok(keys)
    }
}

/// A member value that is looked into: validated like any, and when it is an
/// object, its keys.
struct Inner;

impl<'de> DeserializeSeed<'de> for Inner {
    type Value = Option<Vec<&'de str>>;
    fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Inner {
    type Value = Option<Vec<&'de str>>;
    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("any JSON value")
    }
    fn visit_bool<E>(self, _: bool) -> Result<Self::Value, E> {
        Ok(None)
    }
    fn visit_i64<E>(self, _: i64) -> Result<Self::Value, E> {
        Ok(None)
    }
    fn visit_u64<E>(self, _: u64) -> Result<Self::Value, E> {
        Ok(None)
    }
    fn visit_f64<E>(self, _: f64) -> Result<Self::Value, E> {
        Ok(None)
    }
    fn visit_str<E>(self, _: &str) -> Result<Self::Value, E> {
        Ok(None)
    }
    fn visit_unit<E>(self) -> Result<Self::Value, E> {
        Ok(None)
    }
    fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<Self::Value, A::Error> {
        Valid { depth: 1 }.visit_seq(seq).map(|()| None)
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let mut keys: Vec<&'de str> = Vec::with_capacity(8);
        while let Some(k) = map.next_key_seed(Key)? {
            if keys.contains(&k) {
                return Err(A::Error::custom("repeated key"));
            }
            keys.push(k);
            map.next_value_seed(Valid { depth: 2 })?;
        }
        Ok(Some(keys))
    }
}

/// The members of an object's text, each value's exact text; `None` when the text
/// is not one object, or a key has escapes or is repeated.
fn split_object(text: &str) -> Option<Vec<(&str, &str)>> {
    struct Members<'a>(Vec<(&'a str, &'a str)>);
    impl<'de> serde::Deserialize<'de> for Members<'de> {
        fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
            struct V;
            impl<'de> Visitor<'de> for V {
                type Value = Members<'de>;
                fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                    f.write_str("an object")
                }
                fn visit_map<A: MapAccess<'de>>(
                    self,
                    mut map: A,
                ) -> Result<Members<'de>, A::Error> {
                    let mut members: Vec<(&'de str, &'de str)> =
                        Vec::with_capacity(map.size_hint().unwrap_or(16));
                    while let Some(k) = map.next_key_seed(Key)? {
                        if members.iter().any(|(seen, _)| *seen == k) {
                            return Err(A::Error::custom("repeated key"));
                        }
                        let raw: &'de RawValue = map.next_value()?;
                        members.push((k, raw.get()));
                    }
                    Ok(Members(members))
                }
            }
            d.deserialize_map(V)
        }
    }
    serde_json::from_str::<Members<'_>>(text).ok().map(|m| m.0)
}

/// A key as its text in the input (no escapes), else an error.
struct Key;

impl<'de> DeserializeSeed<'de> for Key {
    type Value = &'de str;
    fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<&'de str, D::Error> {
        d.deserialize_str(self)
    }
}

impl<'de> Visitor<'de> for Key {
    type Value = &'de str;
    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("a key without escapes")
    }
    fn visit_borrowed_str<E: serde::de::Error>(self, v: &'de str) -> Result<&'de str, E> {
        Ok(v)
    }
}

/// Parses a value as fully as `Value` would (numbers in range, escapes decoded,
/// surrogates paired) without building it; refuses what the spliced form cannot
/// keep (escaped or repeated keys, nesting past [`MAX_DEPTH`]).
struct Valid {
    depth: u32,
}

impl<'de> DeserializeSeed<'de> for Valid {
    type Value = ();
    fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Valid {
    type Value = ();
    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("any JSON value")
    }
    fn visit_bool<E>(self, _: bool) -> Result<(), E> {
        Ok(())
    }
    fn visit_i64<E>(self, _: i64) -> Result<(), E> {
        Ok(())
    }
    fn visit_u64<E>(self, _: u64) -> Result<(), E> {
        Ok(())
    }
    fn visit_f64<E>(self, _: f64) -> Result<(), E> {
        Ok(())
    }
    fn visit_str<E>(self, _: &str) -> Result<(), E> {
        Ok(())
    }
    fn visit_unit<E>(self) -> Result<(), E> {
        Ok(())
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        if self.depth >= MAX_DEPTH {
            return Err(A::Error::custom("too deep"));
        }
        while seq
            .next_element_seed(Valid {
                depth: self.depth + 1,
            })?
            .is_some()
        {}
        Ok(())
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        if self.depth >= MAX_DEPTH {
            return Err(A::Error::custom("too deep"));
        }
        let mut keys: Vec<&'de str> = Vec::new();
        while let Some(k) = map.next_key_seed(Key)? {
            if keys.contains(&k) {
                return Err(A::Error::custom("repeated key"));
            }
            keys.push(k);
            map.next_value_seed(Valid {
                depth: self.depth + 1,
            })?;
        }
        Ok(())
    }
}

/// One member's value: the input's text, or a value normalization set.
#[derive(Debug, Clone)]
enum Piece<'a> {
    /// JSON text: the input's, or one spliced from it.
    Raw(Cow<'a, str>),
    /// A value normalization set.
    Set(Value),
}

impl Piece<'_> {
    fn value(&self) -> Option<Cow<'_, Value>> {
        match self {
            Piece::Raw(raw) => serde_json::from_str(raw).ok().map(Cow::Owned),
            Piece::Set(v) => Some(Cow::Borrowed(v)),
        }
    }

    fn kind(&self) -> Kind {
        match self {
            Piece::Raw(raw) => match raw.as_bytes().first() {
                Some(b'{') => Kind::Object,
                Some(b'n') => Kind::Null,
                _ => Kind::Other,
            },
            Piece::Set(Value::Null) => Kind::Null,
            Piece::Set(Value::Object(_)) => Kind::Object,
            Piece::Set(_) => Kind::Other,
        }
    }

    /// The value as an object (empty when it is not one).
    fn into_object(self) -> Map<String, Value> {
        match self {
            Piece::Raw(raw) => serde_json::from_str(&raw).unwrap_or_default(),
            Piece::Set(Value::Object(m)) => m,
            Piece::Set(_) => Map::new(),
        }
    }
}

/// A message being normalized in its spliced form.
pub(crate) struct Spliced<'a> {
    members: Vec<(&'a str, Piece<'a>)>,
    inner: Vec<(&'a str, Vec<(&'a str, &'a str)>)>,
    len_hint: usize,
}

impl<'a> From<Split<'a>> for Spliced<'a> {
    fn from(s: Split<'a>) -> Self {
        Spliced {
            len_hint: s.text.len(),
            members: s
                .members
                .into_iter()
                .map(|(k, v)| (k, Piece::Raw(Cow::Borrowed(v))))
                .collect(),
            inner: s.inner,
        }
    }
}

impl<'a> Spliced<'a> {
    fn find(&self, k: &str) -> Option<usize> {
        self.members.iter().position(|(key, _)| *key == k)
    }

    fn piece(&self, k: &str) -> Option<&Piece<'a>> {
        self.find(k).map(|i| &self.members[i].1)
    }

    fn take(&mut self, k: &str) -> Option<Piece<'a>> {
        self.find(k).map(|i| self.members.swap_remove(i).1)
    }

    /// The members of an object value's text: those found while parsing, else
    /// split again.
    fn members_of<'p>(&'p self, raw: &'p str) -> Option<Cow<'p, [(&'p str, &'p str)]>> {
        match self
            .inner
            .iter()
            .find(|(t, _)| t.as_ptr() == raw.as_ptr() && t.len() == raw.len())
        {
            Some((_, m)) => Some(Cow::Borrowed(m.as_slice())),
            None => split_object(raw).map(Cow::Owned),
        }
    }

    /// A member of an object value.
    fn member_of<'p>(&'p self, piece: &'p Piece<'a>, key: &str) -> Option<Piece<'p>> {
        match piece {
            Piece::Raw(raw) if raw.starts_with('{') => self
                .members_of(raw)?
                .iter()
                .find(|(k, _)| *k == key)
                .map(|(_, v)| Piece::Raw(Cow::Borrowed(*v))),
            Piece::Set(Value::Object(m)) => m.get(key).cloned().map(Piece::Set),
            _ => None,
        }
    }

    fn put(&mut self, k: &'a str, p: Piece<'a>) {
        match self.find(k) {
            Some(i) => self.members[i].1 = p,
            None => self.members.push((k, p)),
        }
    }
}

/// `context` of a message without batch context: its own text when nothing is
/// added, else its text with `"ip":…` spliced in before the closing brace (where
/// the tree inserts it: last).
fn context_with_ip<'a>(
    body: &Spliced<'a>,
    context: Option<Piece<'a>>,
    ctx: &NormalizeContext<'_>,
) -> Piece<'a> {
    match context {
        Some(Piece::Raw(raw)) if raw.starts_with('{') => {
            let Some(ip) = &ctx.peer_ip else {
                return Piece::Raw(raw);
            };
            let Some(members) = body.members_of(&raw) else {
                return Piece::Set(Value::Object(merged_context(
                    Piece::Raw(raw).into_object(),
                    ctx,
                )));
            };
            if members.iter().any(|(k, _)| *k == "ip") {
                return Piece::Raw(raw);
            }
            let inner = raw[..raw.len() - 1].trim_end();
            let ip_text = serde_json::to_string(ip).unwrap_or_default();
            let mut out = String::with_capacity(raw.len() + ip_text.len() + 6);
            out.push_str(inner);
            if !members.is_empty() {
                out.push(',');
            }
            out.push_str("\"ip\":");
            out.push_str(&ip_text);
            out.push('}');
            Piece::Raw(Cow::Owned(out))
        }
        Some(other) => Piece::Set(Value::Object(merged_context(other.into_object(), ctx))),
        None => Piece::Set(Value::Object(merged_context(Map::new(), ctx))),
    }
}

impl Members for Spliced<'_> {
    fn contains(&self, k: &str) -> bool {
        self.find(k).is_some()
    }
    fn get(&self, k: &str) -> Option<Cow<'_, Value>> {
        self.piece(k)?.value()
    }
    fn kind(&self, k: &str) -> Option<Kind> {
        self.piece(k).map(Piece::kind)
    }
    fn insert(&mut self, k: &'static str, v: Value) {
        self.put(k, Piece::Set(v));
    }
    fn remove(&mut self, k: &str) {
        self.take(k);
    }
    fn rename(&mut self, from: &str, to: &'static str) {
        if let Some(p) = self.take(from) {
            self.put(to, p);
        }
    }
    fn context_traits_kind(&self) -> Option<Kind> {
        let context = self.piece("context")?;
        if context.kind() != Kind::Object {
            return None;
        }
        self.member_of(context, "traits").map(|t| t.kind())
    }
    fn traits_email(&self) -> Option<String> {
        let traits = self.piece("traits")?;
        match self.member_of(traits, "email")?.value()?.as_ref() {
            Value::String(s) => Some(s.clone()),
            _ => None,
        }
    }
    fn finish(mut self, ctx: &NormalizeContext<'_>) -> String {
        let context = self.take("context");
        let context = match ctx.batch_context {
            Some(_) => Piece::Set(Value::Object(merged_context(
                context.map(Piece::into_object).unwrap_or_default(),
                ctx,
            ))),
            None => context_with_ip(&self, context, ctx),
        };
        self.put("context", context);
        let integrations = self.take("integrations");
        let integrations = match (integrations, ctx.batch_integrations) {
            (Some(Piece::Raw(raw)), None) if raw.starts_with('{') => {
                // Empty unless the first thing after `{` is a key.
                let empty = raw[1..].trim_start().starts_with('}');
                (!empty).then_some(Piece::Raw(raw))
            }
            (i, _) => {
                let merged =
                    merged_integrations(i.map(Piece::into_object).unwrap_or_default(), ctx);
                (!merged.is_empty()).then(|| Piece::Set(Value::Object(merged)))
            }
        };
        if let Some(i) = integrations {
            self.put("integrations", i);
        }
        let mut out: Vec<u8> = Vec::with_capacity(self.len_hint + 160);
        out.push(b'{');
        for (i, (k, p)) in self.members.iter().enumerate() {
            if i > 0 {
                out.push(b',');
            }
            // Keys are the input's unescaped text or our own names: written as is.
            out.push(b'"');
            out.extend_from_slice(k.as_bytes());
            out.extend_from_slice(b"\":");
            match p {
                Piece::Raw(raw) => out.extend_from_slice(raw.as_bytes()),
                Piece::Set(v) => {
                    let _ = serde_json::to_writer(&mut out, v);
                }
            }
        }
        out.push(b'}');
        String::from_utf8(out).unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::normalize::{CallType, Normalized, Rejection, normalize, normalize_members};
    use proptest::prelude::*;

    fn at() -> chrono::DateTime<chrono::Utc> {
        crate::normalize::parse_ts_str("2026-11-27T12:00:00.123Z").unwrap()
    }

    /// The tree path, as before splicing: the text parsed into a `Value`.
    fn by_tree(text: &str, ctx: &NormalizeContext<'_>) -> Result<Normalized, Rejection> {
        match serde_json::from_str::<Value>(text) {
            Ok(v) => normalize(v, ctx),
            Err(e) => Err(Rejection::new(
                crate::RejectCode::InvalidJson,
                e.to_string(),
            )),
        }
    }

    /// The request path: spliced when [`Split::parse`] takes the text.
    fn by_splice(text: &str, ctx: &NormalizeContext<'_>) -> Option<Result<Normalized, Rejection>> {
        Split::parse(text).map(|s| normalize_members(Spliced::from(s), ctx))
    }

    /// Both paths agree: same rejection, or the same fields and a stored text that
    /// parses to the same members in the same order. A generated `messageId` is
    /// random, so the spliced one is replaced by the tree's before comparing.
    fn assert_same(text: &str, ctx: &NormalizeContext<'_>) -> bool {
        let tree = by_tree(text, ctx);
        let Some(spliced) = by_splice(text, ctx) else {
            return false;
        };
        match (tree, spliced) {
            (Err(a), Err(b)) => assert_eq!(a, b, "{text}"),
            (Ok(a), Ok(mut b)) => {
                let mut bv: Value = serde_json::from_str(&b.payload)
                    .unwrap_or_else(|e| panic!("{e}: {} from {text}", b.payload));
                if a.message_id != b.message_id
                    && a.message_id.starts_with("api-")
                    && b.message_id.starts_with("api-")
                {
                    bv["messageId"] = Value::String(a.message_id.clone());
                    b.message_id = a.message_id.clone();
                }
                let av: Value = serde_json::from_str(&a.payload).unwrap();
                assert_eq!(
                    serde_json::to_string(&av).unwrap(),
                    serde_json::to_string(&bv).unwrap(),
                    "from {text}"
                );
                b.payload = a.payload.clone();
                assert_eq!(a, b, "{text}");
            }
            (a, b) => panic!("tree {a:?} but spliced {b:?} for {text}"),
        }
        true
    }

    fn plain() -> NormalizeContext<'static> {
        NormalizeContext {
            received_at: at(),
            peer_ip: Some("10.1.2.3".into()),
            ..Default::default()
        }
    }

    #[test]
    fn keeps_untouched_values_as_sent_and_adds_what_the_tree_adds() {
        let text = r#"{ "type" : "track", "event":"Caf\u00e9", "userId": 42,
            "properties": {"big": 1e300, "n": 18446744073709551616, "s": "a\/b \ud83d\ude00"},
            "context": { "library": {"name": "x"} }, "integrations": {} }"#;
        assert!(assert_same(text, &plain()));
        let n = by_splice(text, &plain()).unwrap().unwrap();
        // The untouched properties are the request's own bytes.
        assert!(
            n.payload.contains(r#""s": "a\/b \ud83d\ude00""#),
            "{}",
            n.payload
        );
        assert!(n.payload.contains(r#""ip":"10.1.2.3""#), "{}", n.payload);
        assert!(
            !n.payload.contains("integrations"),
            "empty integrations dropped"
        );
        assert_eq!(n.body()["userId"], "42");
        assert_eq!(n.event.as_deref(), Some("Café"));
    }

    #[test]
    fn unusual_text_is_left_to_the_tree_path() {
        for text in [
            // Repeated keys, at the top and deeper: the tree keeps the last.
            r#"{"type":"track","event":"E","userId":"u","event":"F"}"#,
            r#"{"type":"track","event":"E","userId":"u","properties":{"a":1,"a":2}}"#,
            // A key with an escape.
            r#"{"type":"track","event":"E","userId":"u","properties":{"\u0061":1}}"#,
            r#"{"typ\u0065":"track","event":"E","userId":"u"}"#,
            // Out of f64's range, a lone surrogate: the tree refuses them.
            r#"{"type":"track","event":"E","userId":"u","properties":{"a":1e400}}"#,
            r#"{"type":"track","event":"E","userId":"u","properties":{"a":"\ud800"}}"#,
            // Not an object, not JSON, trailing bytes.
            "[1]",
            "5",
            r#"{"type":"track","#,
            r#"{"type":"track"} x"#,
        ] {
            assert!(Split::parse(text).is_none(), "{text}");
        }
        let deep = format!(
            r#"{{"type":"track","event":"E","userId":"u","properties":{}1{}}}"#,
            "[".repeat(MAX_DEPTH as usize),
            "]".repeat(MAX_DEPTH as usize)
        );
        assert!(Split::parse(&deep).is_none());
        let shallow = format!(
            r#"{{"type":"track","event":"E","userId":"u","properties":{}1{}}}"#,
            "[".repeat(MAX_DEPTH as usize - 2),
            "]".repeat(MAX_DEPTH as usize - 2)
        );
        assert!(assert_same(&shallow, &plain()));
    }

    #[test]
    fn batch_context_and_integrations_merge_as_in_the_tree() {
        let bc = serde_json::json!({"library":{"name":"go","version":"3"},"ip":"1.1.1.1"});
        let bi = serde_json::json!({"All":false});
        let sent = Value::String("2026-11-27T11:00:10Z".into());
        let ctx = NormalizeContext {
            received_at: at(),
            call_type: None,
            batch_sent_at: Some(&sent),
            batch_context: bc.as_object(),
            batch_integrations: bi.as_object(),
            peer_ip: Some("10.0.0.9".into()),
        };
        for text in [
            r#"{"type":"identify","userId":"u","context":{"library":{"version":"4"}},"traits":{"email":"a@b.c"}}"#,
            r#"{"type":"page","anonymousId":"a","name":"Home","integrations":{"x":true},"timestamp":"2026-11-27T11:00:00Z"}"#,
            r#"{"type":"alias","userId":"u","previousId":7,"context":null,"integrations":null}"#,
        ] {
            assert!(assert_same(text, &ctx), "{text}");
        }
    }

    fn json_str(s: &str) -> String {
        serde_json::to_string(s).unwrap()
    }

    /// A value's text: the kinds normalization distinguishes, in varied spellings.
    fn plain_scalar() -> impl Strategy<Value = String> {
        prop_oneof![
            Just("null".to_string()),
            Just("\"\"".to_string()),
            Just("\"  \"".to_string()),
            Just("true".to_string()),
            Just("0".to_string()),
            Just("-12".to_string()),
            Just("1.5e3".to_string()),
            Just("18446744073709551616".to_string()),
            Just("123456789012345678901234567890".to_string()),
            Just("[]".to_string()),
            Just("{}".to_string()),
            Just(r#""a\u0000b""#.to_string()),
            Just(r#""\u00e9\ud83d\ude00""#.to_string()),
            Just(format!("\"{}\"", "x".repeat(101))),
            Just(format!("\"{}\"", "é".repeat(100))),
            "[a-zA-Z0-9 _.@-]{0,12}".prop_map(|s| json_str(&s)),
            any::<String>().prop_map(|s| json_str(&s)),
        ]
    }

    /// A value's text, rarely one the tree path refuses (out of range, a lone
    /// surrogate).
    fn scalar() -> impl Strategy<Value = String> {
        prop_oneof![
            30 => plain_scalar(),
            1 => Just("1e400".to_string()),
            1 => Just(r#""\ud800""#.to_string()),
        ]
    }

    fn timestamp() -> impl Strategy<Value = String> {
        prop_oneof![
            Just("\"2026-11-27T11:00:00Z\"".to_string()),
            Just("\"2026-11-27T11:00:00.5+02:00\"".to_string()),
            Just("\"2024-02-29 23:59:59.999\"".to_string()),
            Just("\"2026-11-27\"".to_string()),
            Just("\"yesterday\"".to_string()),
            Just("1436569200000".to_string()),
            Just("1.4365692e12".to_string()),
            Just("-5".to_string()),
            Just("null".to_string()),
            Just("{}".to_string()),
        ]
    }

    /// A JSON value of some depth, as text with some whitespace and escapes.
    fn nested() -> impl Strategy<Value = String> {
        let leaf = prop_oneof![scalar(), timestamp()];
        leaf.prop_recursive(3, 24, 4, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..4).prop_map(|v| format!("[{}]", v.join(", "))),
                prop::collection::btree_map(
                        prop_oneof![
                            8 => proptest::sample::select(&["email", "ip", "traits", "a", "b"][..]).prop_map(str::to_owned),
                            8 => "[a-z]{1,6}",
                            1 => Just("k\\u0065y".to_string()),
                        ],
                        inner,
                    0..5
                )
                .prop_map(|members| {
                    let body: Vec<String> =
                        members.into_iter().map(|(k, v)| format!("\"{k}\" : {v}")).collect();
                    format!("{{ {} }}", body.join(",\n"))
                }),
            ]
        })
    }

    const KEYS: &[&str] = &[
        "type",
        "action",
        "userId",
        "user_id",
        "anonymousId",
        "messageId",
        "timestamp",
        "originalTimestamp",
        "sentAt",
        "event",
        "name",
        "category",
        "groupId",
        "previousId",
        "writeKey",
        "properties",
        "traits",
        "context",
        "integrations",
        "receivedAt",
        "other",
    ];

    fn member() -> impl Strategy<Value = (String, String)> {
        let key = prop_oneof![
            8 => proptest::sample::select(KEYS).prop_map(str::to_owned),
            1 => Just("ev\\u0065nt".to_string()),
        ];
        let value = prop_oneof![
            3 => proptest::sample::select(&["\"track\"", "\"identify\"", "\"page\"", "\"screen\"", "\"group\"", "\"alias\"", "\"nope\""][..]).prop_map(str::to_owned),
            3 => scalar(),
            2 => timestamp(),
            3 => nested(),
        ];
        (key, value)
    }

    /// An object's text with generated members.
    fn object() -> impl Strategy<Value = String> {
        prop::collection::btree_map(
            prop_oneof![
                Just("email".to_string()),
                Just("ip".to_string()),
                Just("traits".to_string()),
                Just("library".to_string()),
                "[a-z]{1,6}"
            ],
            nested(),
            0..5,
        )
        .prop_map(|members| {
            let body: Vec<String> = members
                .into_iter()
                .map(|(k, v)| format!("\"{k}\":{v}"))
                .collect();
            format!("{{{}}}", body.join(","))
        })
    }

    /// Mostly valid values for a member, sometimes anything.
    fn good(key: &'static str) -> BoxedStrategy<(String, String)> {
        let id = prop_oneof![
            6 => "[a-z0-9]{1,8}".prop_map(|s| json_str(&s)),
            1 => (0u32..1000).prop_map(|n| n.to_string()),
            1 => scalar(),
        ];
        let v: BoxedStrategy<String> = match key {
            "type" | "action" => prop_oneof![
                8 => proptest::sample::select(&["track", "identify", "page", "screen", "group", "alias"][..]).prop_map(json_str),
                1 => scalar(),
            ].boxed(),
            "timestamp" | "originalTimestamp" | "sentAt" => timestamp().boxed(),
            "properties" | "traits" | "context" | "integrations" => prop_oneof![
                6 => object(),
                1 => nested(),
            ].boxed(),
            "event" | "name" | "category" => prop_oneof![
                6 => "[A-Za-z ]{1,12}".prop_map(|s| json_str(&s)),
                1 => scalar(),
            ].boxed(),
            _ => id.boxed(),
        };
        v.prop_map(move |v| (key.to_string(), v)).boxed()
    }

    fn message() -> impl Strategy<Value = String> {
        let base = [
            "type",
            "userId",
            "anonymousId",
            "event",
            "name",
            "category",
            "groupId",
            "previousId",
            "messageId",
            "timestamp",
            "originalTimestamp",
            "sentAt",
            "properties",
            "traits",
            "context",
            "integrations",
            "action",
            "user_id",
            "writeKey",
        ];
        let chosen: Vec<BoxedStrategy<Option<(String, String)>>> = base
            .iter()
            .enumerate()
            .map(|(i, k)| {
                let weight = if i < 4 { 0.8 } else { 0.3 };
                proptest::option::weighted(weight, good(k)).boxed()
            })
            .collect();
        (
            chosen,
            prop::collection::vec(member(), 0..3),
            proptest::sample::select(&["", " ", "\n  "][..]),
        )
            .prop_flat_map(|(chosen, extra, ws)| {
                let members: Vec<(String, String)> =
                    chosen.into_iter().flatten().chain(extra).collect();
                (Just(members).prop_shuffle(), Just(ws))
            })
            .prop_map(|(members, ws)| {
                let body: Vec<String> = members
                    .into_iter()
                    .map(|(k, v)| format!("{ws}\"{k}\"{ws}:{ws}{v}"))
                    .collect();
                format!("{{{}{ws}}}", body.join(","))
            })
    }

    fn call() -> impl Strategy<Value = Option<CallType>> {
        proptest::sample::select(
            &[
                None,
                None,
                Some(CallType::Track),
                Some(CallType::Identify),
                Some(CallType::Page),
                Some(CallType::Group),
                Some(CallType::Alias),
            ][..],
        )
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(3000))]

        #[test]
        fn spliced_and_tree_normalization_agree(
            text in message(),
            call in call(),
            batch_context in proptest::option::of(nested()),
            batch_integrations in proptest::option::of(nested()),
            batch_sent_at in proptest::option::of(timestamp()),
            ip in proptest::option::of(Just("10.9.8.7".to_string())),
        ) {
            let parse = |t: Option<String>| t.and_then(|t| serde_json::from_str::<Value>(&t).ok());
            let bc = parse(batch_context);
            let bi = parse(batch_integrations);
            let sent = parse(batch_sent_at);
            let ctx = NormalizeContext {
                received_at: at(),
                call_type: call,
                batch_sent_at: sent.as_ref(),
                batch_context: bc.as_ref().and_then(Value::as_object),
                batch_integrations: bi.as_ref().and_then(Value::as_object),
                peer_ip: ip,
            };
            assert_same(&text, &ctx);
        }
    }

    /// The generator reaches the spliced path, accepted and refused, often enough
    /// for the property above to mean something.
    #[test]
    fn generated_messages_mostly_take_the_spliced_path() {
        use proptest::strategy::ValueTree;
        let mut runner = proptest::test_runner::TestRunner::deterministic();
        let (mut spliced, mut accepted) = (0, 0);
        for _ in 0..2000 {
            let text = message().new_tree(&mut runner).unwrap().current();
            if let Some(r) = by_splice(&text, &plain()) {
                spliced += 1;
                accepted += usize::from(r.is_ok());
            }
        }
        eprintln!("{spliced} spliced, {accepted} accepted of 2000");
        assert!(spliced > 600, "{spliced} of 2000 spliced");
        assert!(accepted > 250, "{accepted} of 2000 accepted");
    }
}
