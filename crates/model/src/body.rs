//! Parsing a Tracking API request body into messages — pure, so it can be fuzzed.
//!
//! [`parse_body`] reads the JSON of a single-call or batch request into a
//! [`RawBody`]: the write key found in the body, batch-level `sentAt`, `context` and
//! `integrations`, and each message as an [`Item`] — its members' text borrowed
//! from the body ([`Split`], the common case) or, for unusual input, a JSON tree —
//! or a per-message [`Rejection`] (too large, not JSON). [`RawBody::normalize_all`]
//! then validates and normalizes every message. The server authenticates between
//! the two steps. Nothing here panics or allocates beyond the (already size-capped)
//! input.

use serde::Deserialize;
use serde_json::value::RawValue;
use serde_json::{Map, Value};

use crate::normalize::{
    CallType, NormalizeContext, Normalized, RejectCode, Rejection, normalize, normalize_members,
};
use crate::splice::{Spliced, Split};

/// Limits applied while parsing.
#[derive(Debug, Clone, Copy)]
pub struct BodyLimits {
    /// Largest single message in bytes.
    pub max_message_bytes: usize,
    /// Most messages in a batch.
    pub max_batch_messages: usize,
}

/// Why a whole body was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BodyError {
    /// Not valid JSON (also invalid UTF-8, or nesting deeper than 128 levels).
    #[error("the body is not valid JSON: {0}")]
    InvalidJson(String),
    /// A single-call body that is not an object.
    #[error("the body must be a JSON object")]
    NotObject,
    /// A batch body without a `batch` array.
    #[error("the body has no `batch` array")]
    NoBatch,
    /// `batch` is not an array.
    #[error("`batch` must be an array of messages")]
    BatchNotArray,
    /// `batch` is empty.
    #[error("the batch contains no messages")]
    EmptyBatch,
    /// More messages than allowed.
    #[error("a batch may hold at most {max} messages; this one has {got}")]
    TooManyMessages {
        /// The limit.
        max: usize,
        /// How many were sent.
        got: usize,
    },
    /// Batch-level `context` or `integrations` is not an object.
    #[error("batch `{0}` must be an object")]
    NotAnObject(&'static str),
}

impl BodyError {
    /// The reason code sent to clients.
    pub fn code(&self) -> &'static str {
        match self {
            BodyError::InvalidJson(_) => "invalid_json",
            BodyError::NotObject | BodyError::BatchNotArray => "bad_request",
            BodyError::NoBatch | BodyError::EmptyBatch => "empty_batch",
            BodyError::TooManyMessages { .. } => "too_many_messages",
            BodyError::NotAnObject(_) => "context_not_object",
        }
    }
}

/// One message of a body, before normalization.
#[derive(Debug, Clone)]
pub enum Item<'a> {
    /// Checked and split into its members' text (see [`crate::splice`]).
    Split(Split<'a>),
    /// Anything the spliced form does not take, parsed as a tree: normalized (or
    /// refused) exactly as before.
    Tree(Value),
}

impl Item<'_> {
    /// The message as a tree.
    pub fn into_value(self) -> Value {
        match self {
            Item::Split(s) => s.into_value(),
            Item::Tree(v) => v,
        }
    }
}

/// A hook that adjusts a message object before validation (see
/// [`RawBody::normalize_all`]).
pub type Prepare<'a> = dyn FnMut(&mut Map<String, Value>) + 'a;

/// A parsed body, before authentication and normalization.
#[derive(Debug, Clone, Default)]
pub struct RawBody<'a> {
    /// `writeKey` from the body, if any.
    pub write_key: Option<String>,
    /// The call type fixed by the endpoint (`None` for batches).
    pub call_type: Option<CallType>,
    /// Batch-level `sentAt`.
    pub sent_at: Option<Value>,
    /// Batch-level `context`.
    pub context: Option<Map<String, Value>>,
    /// Batch-level `integrations`.
    pub integrations: Option<Map<String, Value>>,
    /// Each message, or why it was refused before normalization.
    pub items: Vec<Result<Item<'a>, Rejection>>,
}

#[derive(Deserialize)]
struct BatchBody<'a> {
    #[serde(borrow)]
    batch: Option<Items<'a>>,
    #[serde(rename = "sentAt")]
    sent_at: Option<Value>,
    context: Option<Value>,
    integrations: Option<Value>,
    #[serde(rename = "writeKey")]
    write_key: Option<Value>,
}

/// The `batch` member, split into its messages' raw JSON in the same pass that
/// parses the body (one scan of the bytes instead of two); anything but an array is
/// [`Items::NotArray`].
enum Items<'a> {
    Array(Vec<&'a RawValue>),
    NotArray,
}

impl<'de: 'a, 'a> Deserialize<'de> for Items<'a> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V<'a>(std::marker::PhantomData<&'a ()>);
        impl<'de: 'a, 'a> serde::de::Visitor<'de> for V<'a> {
            type Value = Items<'a>;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("any JSON value")
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(
                self,
                mut seq: A,
            ) -> Result<Items<'a>, A::Error> {
                let mut items = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(1024));
                while let Some(raw) = seq.next_element::<&'de RawValue>()? {
                    items.push(raw);
                }
                Ok(Items::Array(items))
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut map: A,
            ) -> Result<Items<'a>, A::Error> {
                while map
                    .next_entry::<serde::de::IgnoredAny, serde::de::IgnoredAny>()?
                    .is_some()
                {}
                Ok(Items::NotArray)
            }
            fn visit_bool<E>(self, _: bool) -> Result<Items<'a>, E> {
                Ok(Items::NotArray)
            }
            fn visit_i64<E>(self, _: i64) -> Result<Items<'a>, E> {
                Ok(Items::NotArray)
            }
            fn visit_u64<E>(self, _: u64) -> Result<Items<'a>, E> {
                Ok(Items::NotArray)
            }
            fn visit_f64<E>(self, _: f64) -> Result<Items<'a>, E> {
                Ok(Items::NotArray)
            }
            fn visit_str<E>(self, _: &str) -> Result<Items<'a>, E> {
                Ok(Items::NotArray)
            }
            fn visit_unit<E>(self) -> Result<Items<'a>, E> {
                Ok(Items::NotArray)
            }
        }
        d.deserialize_any(V(std::marker::PhantomData))
    }
}

fn key_of(v: Option<&Value>) -> Option<String> {
    match v {
        Some(Value::String(s)) if !s.is_empty() => Some(s.clone()),
        _ => None,
    }
}

fn object(v: Option<Value>, what: &'static str) -> Result<Option<Map<String, Value>>, BodyError> {
    match v {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Object(m)) => Ok(Some(m)),
        Some(_) => Err(BodyError::NotAnObject(what)),
    }
}

/// Parses a body: `call_type` is the endpoint's type, or `None` for a batch.
pub fn parse_body(
    bytes: &[u8],
    call_type: Option<CallType>,
    limits: BodyLimits,
) -> Result<RawBody<'_>, BodyError> {
    let json_err = |e: serde_json::Error| BodyError::InvalidJson(e.to_string());
    if let Some(call) = call_type {
        if let Ok(text) = std::str::from_utf8(bytes)
            && let Some(split) = Split::parse(text)
        {
            return Ok(RawBody {
                write_key: key_of(split.get("writeKey").as_ref()),
                call_type: Some(call),
                items: vec![Ok(Item::Split(split))],
                ..Default::default()
            });
        }
        let value: Value = serde_json::from_slice(bytes).map_err(json_err)?;
        let Value::Object(obj) = value else {
            return Err(BodyError::NotObject);
        };
        return Ok(RawBody {
            write_key: key_of(obj.get("writeKey")),
            call_type: Some(call),
            items: vec![Ok(Item::Tree(Value::Object(obj)))],
            ..Default::default()
        });
    }
    let parsed: BatchBody<'_> = serde_json::from_slice(bytes).map_err(json_err)?;
    let write_key = key_of(parsed.write_key.as_ref());
    let raw_items: Vec<&RawValue> = match parsed.batch {
        None => return Err(BodyError::NoBatch),
        Some(Items::NotArray) => return Err(BodyError::BatchNotArray),
        Some(Items::Array(items)) => items,
    };
    if raw_items.is_empty() {
        return Err(BodyError::EmptyBatch);
    }
    if raw_items.len() > limits.max_batch_messages {
        return Err(BodyError::TooManyMessages {
            max: limits.max_batch_messages,
            got: raw_items.len(),
        });
    }
    let items = raw_items
        .into_iter()
        .map(|raw| {
            if raw.get().len() > limits.max_message_bytes {
                return Err(Rejection::new(
                    RejectCode::MessageTooLarge,
                    format!(
                        "a message may be at most {} bytes",
                        limits.max_message_bytes
                    ),
                ));
            }
            match Split::parse(raw.get()) {
                Some(split) => Ok(Item::Split(split)),
                None => serde_json::from_str::<Value>(raw.get())
                    .map(Item::Tree)
                    .map_err(|e| Rejection::new(RejectCode::InvalidJson, e.to_string())),
            }
        })
        .collect();
    Ok(RawBody {
        write_key,
        call_type: None,
        sent_at: parsed.sent_at,
        context: object(parsed.context, "context")?,
        integrations: object(parsed.integrations, "integrations")?,
        items,
    })
}

impl RawBody<'_> {
    /// Validates and normalizes every message. `prepare`, when given, adjusts each
    /// message object first (the server fills ActiveCampaign identities there); the
    /// messages then take the tree path.
    pub fn normalize_all(
        self,
        received_at: chrono::DateTime<chrono::Utc>,
        peer_ip: Option<String>,
        mut prepare: Option<&mut Prepare<'_>>,
    ) -> Vec<Result<Normalized, Rejection>> {
        let ctx = NormalizeContext {
            received_at,
            call_type: self.call_type,
            batch_sent_at: self.sent_at.as_ref(),
            batch_context: self.context.as_ref(),
            batch_integrations: self.integrations.as_ref(),
            peer_ip,
        };
        self.items
            .into_iter()
            .map(|item| match (item?, prepare.as_mut()) {
                (Item::Split(split), None) => normalize_members(Spliced::from(split), &ctx),
                (item, prepare) => {
                    let mut v = item.into_value();
                    if let (Value::Object(obj), Some(prepare)) = (&mut v, prepare) {
                        prepare(obj);
                    }
                    normalize(v, &ctx)
                }
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMITS: BodyLimits = BodyLimits {
        max_message_bytes: 100,
        max_batch_messages: 3,
    };

    #[test]
    fn batch_items_are_parsed_one_by_one() {
        let body = br#"{"writeKey":"k","sentAt":"2026-01-01T00:00:00Z","batch":[
            {"type":"track","userId":"u","event":"E"}, 5,
            {"type":"track","userId":"u","event":"E","properties":{"pad":"xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx"}}]}"#;
        let raw = parse_body(body, None, LIMITS).unwrap();
        assert_eq!(raw.write_key.as_deref(), Some("k"));
        let out = raw.normalize_all(chrono::Utc::now(), None, None);
        assert!(out[0].is_ok());
        assert_eq!(out[1].as_ref().unwrap_err().code, RejectCode::BadRequest);
        assert_eq!(
            out[2].as_ref().unwrap_err().code,
            RejectCode::MessageTooLarge
        );
    }

    #[test]
    fn whole_body_errors() {
        let p = |b: &[u8]| parse_body(b, None, LIMITS).unwrap_err();
        assert_eq!(p(b"nope").code(), "invalid_json");
        assert_eq!(p(b"{}"), BodyError::NoBatch);
        assert_eq!(p(br#"{"batch":{}}"#), BodyError::BatchNotArray);
        assert_eq!(p(br#"{"batch":{"a":[1]}}"#), BodyError::BatchNotArray);
        assert_eq!(p(br#"{"batch":"x"}"#), BodyError::BatchNotArray);
        assert_eq!(p(br#"{"batch":7}"#), BodyError::BatchNotArray);
        assert_eq!(p(br#"{"batch":true}"#), BodyError::BatchNotArray);
        assert_eq!(p(br#"{"batch":null}"#), BodyError::NoBatch);
        assert_eq!(p(br#"{"batch":[1,}"#).code(), "invalid_json");
        assert_eq!(p(br#"{"batch":[]}"#), BodyError::EmptyBatch);
        assert_eq!(p(br#"{"batch":[1,2,3,4]}"#).code(), "too_many_messages");
        assert_eq!(
            p(br#"{"batch":[1],"context":3}"#).code(),
            "context_not_object"
        );
        assert_eq!(
            parse_body(b"[1]", Some(CallType::Track), LIMITS).unwrap_err(),
            BodyError::NotObject
        );
    }
}
