//! Reading the fields of a message planning uses: a borrowed one-pass parse that
//! keeps nested objects as text, and the general parse (a `serde_json::Value`) whose
//! rules are the reference (the last of repeated keys wins).

use serde::Deserialize;
use serde_json::value::RawValue;
use serde_json::{Map, Value};

use super::Skip;

/// The top-level fields of a message that planning reads, in one pass over the
/// payload: scalars as values, the nested objects borrowed as text (every other field
/// is skipped without being built).
#[derive(Deserialize)]
struct RawMessage<'a> {
    #[serde(rename = "type", default)]
    call_type: Option<Value>,
    #[serde(rename = "messageId", default)]
    message_id: Option<Value>,
    #[serde(rename = "receivedAt", default)]
    received_at: Option<Value>,
    #[serde(default)]
    event: Option<Value>,
    #[serde(rename = "userId", default)]
    user_id: Option<Value>,
    #[serde(rename = "anonymousId", default)]
    anonymous_id: Option<Value>,
    #[serde(rename = "sentAt", default)]
    sent_at: Option<Value>,
    #[serde(default)]
    timestamp: Option<Value>,
    #[serde(rename = "originalTimestamp", default)]
    original_timestamp: Option<Value>,
    #[serde(default)]
    name: Option<Value>,
    #[serde(default)]
    category: Option<Value>,
    #[serde(rename = "groupId", default)]
    group_id: Option<Value>,
    #[serde(rename = "previousId", default)]
    previous_id: Option<Value>,
    #[serde(borrow, default)]
    context: Option<&'a RawValue>,
    #[serde(borrow, default)]
    properties: Option<&'a RawValue>,
    #[serde(borrow, default)]
    traits: Option<&'a RawValue>,
}

/// A nested object of a message (`context`, `properties`, `traits`): its text as
/// the borrowed parse found it, flattened into columns without building a map, or the
/// map the general parse built.
#[derive(Debug, Clone)]
pub(super) enum Object<'a> {
    Raw(&'a RawValue),
    Map(Map<String, Value>),
}

/// The fields of a message planning reads (absent and `null` alike are `None`).
#[derive(Debug, Default)]
#[cfg_attr(test, derive(PartialEq))]
pub(super) struct Msg<'a> {
    pub(super) call_type: Option<Value>,
    pub(super) message_id: Option<Value>,
    pub(super) received_at: Option<Value>,
    pub(super) event: Option<Value>,
    pub(super) user_id: Option<Value>,
    pub(super) anonymous_id: Option<Value>,
    pub(super) sent_at: Option<Value>,
    pub(super) timestamp: Option<Value>,
    pub(super) original_timestamp: Option<Value>,
    pub(super) name: Option<Value>,
    pub(super) category: Option<Value>,
    pub(super) group_id: Option<Value>,
    pub(super) previous_id: Option<Value>,
    pub(super) context: Option<Object<'a>>,
    pub(super) properties: Option<Object<'a>>,
    pub(super) traits: Option<Object<'a>>,
}

/// Objects compare as the maps they are (the borrowed and the general parse agree).
#[cfg(test)]
impl PartialEq for Object<'_> {
    fn eq(&self, other: &Self) -> bool {
        fn map(o: &Object<'_>) -> Map<String, Value> {
            match o {
                Object::Raw(r) => serde_json::from_str(r.get()).expect("an object"),
                Object::Map(m) => m.clone(),
            }
        }
        map(self) == map(other)
    }
}

impl<'a> Msg<'a> {
    /// Parses a payload. The borrowed parse reads only the fields above; a payload it
    /// cannot take (not an object, a repeated field, invalid JSON) goes through the
    /// general parse, whose rules (the last of repeated keys wins) are the reference.
    #[cfg(test)]
    pub(super) fn parse(payload: &'a str) -> Result<Msg<'a>, Skip> {
        match Msg::parse_borrowed(payload) {
            Some(msg) => Ok(msg),
            None => Msg::parse_general(payload),
        }
    }

    pub(super) fn parse_borrowed(payload: &'a str) -> Option<Msg<'a>> {
        if !payload.trim_start().starts_with('{') {
            return None;
        }
        let raw = serde_json::from_str::<RawMessage<'_>>(payload).ok()?;
        Some(Msg::from_raw(raw))
    }

    pub(super) fn parse_general(payload: &str) -> Result<Msg<'a>, Skip> {
        let payload: Value = serde_json::from_str(payload)
            .map_err(|e| Skip::BadPayload(format!("payload is not JSON: {e}")))?;
        let Value::Object(mut m) = payload else {
            return Err(Skip::BadPayload("payload is not a JSON object".into()));
        };
        let mut field = |key: &str| m.remove(key).filter(|v| !v.is_null());
        let (call_type, message_id, received_at, event) = (
            field("type"),
            field("messageId"),
            field("receivedAt"),
            field("event"),
        );
        let (user_id, anonymous_id, sent_at, timestamp) = (
            field("userId"),
            field("anonymousId"),
            field("sentAt"),
            field("timestamp"),
        );
        let (original_timestamp, name, category, group_id, previous_id) = (
            field("originalTimestamp"),
            field("name"),
            field("category"),
            field("groupId"),
            field("previousId"),
        );
        let mut object = |key: &str| match m.remove(key) {
            Some(Value::Object(o)) => Some(Object::Map(o)),
            _ => None,
        };
        let (context, properties, traits) =
            (object("context"), object("properties"), object("traits"));
        Ok(Msg {
            call_type,
            message_id,
            received_at,
            event,
            user_id,
            anonymous_id,
            sent_at,
            timestamp,
            original_timestamp,
            name,
            category,
            group_id,
            previous_id,
            context,
            properties,
            traits,
        })
    }

    /// The message from its one-pass read (`null` already reads as `None`). Objects
    /// are kept as text: one that turns out not to parse while it is flattened sends
    /// the record to the general parse then.
    fn from_raw(raw: RawMessage<'a>) -> Msg<'a> {
        fn object(r: Option<&RawValue>) -> Option<Object<'_>> {
            r.filter(|r| r.get().starts_with('{')).map(Object::Raw)
        }
        Msg {
            call_type: raw.call_type,
            message_id: raw.message_id,
            received_at: raw.received_at,
            event: raw.event,
            user_id: raw.user_id,
            anonymous_id: raw.anonymous_id,
            sent_at: raw.sent_at,
            timestamp: raw.timestamp,
            original_timestamp: raw.original_timestamp,
            name: raw.name,
            category: raw.category,
            group_id: raw.group_id,
            previous_id: raw.previous_id,
            context: object(raw.context),
            properties: object(raw.properties),
            traits: object(raw.traits),
        }
    }
}

/// A string-valued field (`event`, `name`, `category`).
pub(super) fn text_field(v: &Option<Value>) -> Option<String> {
    match v {
        Some(Value::String(s)) => Some(s.clone()),
        Some(Value::Number(n)) => Some(n.to_string()),
        Some(Value::Bool(b)) => Some(b.to_string()),
        _ => None,
    }
}

/// [`text_field`] of a value the caller owns (a string is moved, not copied).
pub(super) fn text_owned(v: Option<Value>) -> Option<String> {
    match v {
        Some(Value::String(s)) => Some(s),
        other => text_field(&other),
    }
}

/// An identifier field (`userId`, …): strings as they are, numbers as their text
/// (analytics libraries accept numeric ids); empty strings are absent.
pub(super) fn id_field(v: &Option<Value>) -> Option<String> {
    text_field(v).filter(|s| !s.is_empty())
}

/// [`id_field`] of a value the caller owns (a string is moved, not copied).
pub(super) fn id_owned(v: Option<Value>) -> Option<String> {
    match v {
        Some(Value::String(s)) => Some(s).filter(|s| !s.is_empty()),
        other => id_field(&other),
    }
}
