//! Validation and normalization of one Segment message, as the Tracking API receives it.
//!
//! [`normalize`] takes the raw JSON object a client sent plus what the server knows
//! (receive time, the endpoint's call type, batch-level `sentAt`/`context`/
//! `integrations`, the peer address) and returns either the message in its stored
//! form or a [`Rejection`] with one of Segment's ingest reason codes
//! (`reference/segment-spec.md` §1.4). It never panics on input.
//!
//! The stored form always has `messageId` (assigned `api-<uuid>` when absent, at most
//! 100 characters), `type`, `receivedAt`, `originalTimestamp` and `timestamp`, all
//! timestamps ISO-8601 UTC with milliseconds. `timestamp` is corrected for the client's
//! clock skew: `receivedAt - (sentAt - originalTimestamp)` when `sentAt` is known
//! (per message, else batch-level), `originalTimestamp` when it is not, and
//! `receivedAt` when the client gave no time at all (segment-spec §1.8). The write key
//! is never stored.

use std::borrow::Cow;

use chrono::{DateTime, SecondsFormat, TimeZone, Utc};
use serde_json::{Map, Value};

/// A `messageId` for a message that came without one: `api-` and a UUIDv7 of the
/// receive time. Its 74 random bits come from a per-thread SplitMix64 generator
/// seeded once from the OS (`Uuid::new_v4`), not from a `getrandom` call per message
/// as `Uuid::now_v7` makes (issue #15). The ids need to be unique, not secret: a
/// 64-bit random seed per thread and a full-period generator keep ids of one thread
/// distinct and those of two threads (or two runs) apart but for chance collisions
/// of 74 bits within the same millisecond.
fn generated_message_id(received_at: DateTime<Utc>) -> String {
    use std::cell::Cell;
    thread_local! {
        static STATE: Cell<u64> = Cell::new(uuid::Uuid::new_v4().as_u64_pair().0);
    }
    fn splitmix(state: &Cell<u64>) -> u64 {
        let s = state.get().wrapping_add(0x9e37_79b9_7f4a_7c15);
        state.set(s);
        let mut z = s;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    let (a, b) = STATE.with(|s| (splitmix(s), splitmix(s)));
    let mut random = [0u8; 10];
    random[..8].copy_from_slice(&a.to_le_bytes());
    random[8..].copy_from_slice(&b.to_le_bytes()[..2]);
    let ms = u64::try_from(received_at.timestamp_millis()).unwrap_or_default();
    let id = uuid::Builder::from_unix_timestamp_millis(ms, &random).into_uuid();
    let mut out = String::with_capacity(36);
    out.push_str("api-");
    out.push_str(id.simple().encode_lower(&mut uuid::Uuid::encode_buffer()));
    out
}

/// The six Segment call types.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CallType {
    /// `track`: an action with an `event` name.
    Track,
    /// `identify`: who the user is, with `traits`.
    Identify,
    /// `page`: a web page view.
    Page,
    /// `screen`: a mobile screen view.
    Screen,
    /// `group`: the user's account or organisation.
    Group,
    /// `alias`: merge two identities.
    Alias,
}

impl CallType {
    /// The wire name (`"track"`, …).
    pub fn as_str(self) -> &'static str {
        match self {
            CallType::Track => "track",
            CallType::Identify => "identify",
            CallType::Page => "page",
            CallType::Screen => "screen",
            CallType::Group => "group",
            CallType::Alias => "alias",
        }
    }

    /// Parses a wire name; `None` for anything else.
    pub fn parse(s: &str) -> Option<CallType> {
        Some(match s {
            "track" => CallType::Track,
            "identify" => CallType::Identify,
            "page" => CallType::Page,
            "screen" => CallType::Screen,
            "group" => CallType::Group,
            "alias" => CallType::Alias,
            _ => return None,
        })
    }
}

/// Why a message was refused: Segment's ingest discard reasons plus a few of ours.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RejectCode {
    /// The body or message is malformed in a way no finer code describes.
    BadRequest,
    /// Invalid JSON.
    InvalidJson,
    /// A batch with no messages.
    EmptyBatch,
    /// Neither `userId` nor `anonymousId`.
    NoUserAnonId,
    /// `userId`/`anonymousId` empty or not a string.
    IdNotString,
    /// Track without `event`.
    EventNotDefined,
    /// Track `event` empty or not a string.
    EventNotString,
    /// `properties` is not an object.
    PropertiesNotObject,
    /// `traits` is not an object.
    TraitsNotObject,
    /// Page/screen `name` empty or not a string.
    NameNotString,
    /// Page/screen `category` empty or not a string.
    CategoryNotString,
    /// `type` missing or not one of the six call types.
    InvalidType,
    /// Group without `groupId`.
    GroupIdRequired,
    /// Alias without `previousId` or `userId`.
    PreviousIdRequired,
    /// `messageId` longer than 100 characters, not a string, or containing NUL.
    MessageIdInvalid,
    /// A timestamp field that is not an ISO-8601 date (or epoch milliseconds).
    TimestampInvalid,
    /// `context` or `integrations` is not an object.
    ContextNotObject,
    /// One message larger than 32 KiB.
    MessageTooLarge,
}

impl RejectCode {
    /// The code as sent to clients and used as a metrics label.
    pub fn as_str(self) -> &'static str {
        match self {
            RejectCode::BadRequest => "bad_request",
            RejectCode::InvalidJson => "invalid_json",
            RejectCode::EmptyBatch => "empty_batch",
            RejectCode::NoUserAnonId => "no_user_anon_id",
            RejectCode::IdNotString => "id_not_string",
            RejectCode::EventNotDefined => "event_not_defined",
            RejectCode::EventNotString => "event_not_string",
            RejectCode::PropertiesNotObject => "properties_not_object",
            RejectCode::TraitsNotObject => "traits_not_object",
            RejectCode::NameNotString => "name_not_string",
            RejectCode::CategoryNotString => "category_not_string",
            RejectCode::InvalidType => "invalid_type",
            RejectCode::GroupIdRequired => "group_id_required",
            RejectCode::PreviousIdRequired => "previous_id_required",
            RejectCode::MessageIdInvalid => "message_id_invalid",
            RejectCode::TimestampInvalid => "timestamp_invalid",
            RejectCode::ContextNotObject => "context_not_object",
            RejectCode::MessageTooLarge => "message_too_large",
        }
    }
}

/// A refused message: a code and a sentence a developer can act on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejection {
    /// The reason code.
    pub code: RejectCode,
    /// Human-readable explanation.
    pub message: String,
}

impl Rejection {
    /// Builds a rejection.
    pub fn new(code: RejectCode, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
        }
    }
}

/// What the server knows about a message beyond its body.
#[derive(Debug, Clone, Default)]
pub struct NormalizeContext<'a> {
    /// Server receive time.
    pub received_at: DateTime<Utc>,
    /// The call type fixed by the endpoint (`/v1/track` …); `None` in a batch, where
    /// each message carries its own `type`.
    pub call_type: Option<CallType>,
    /// Batch-level `sentAt`, used when the message has none.
    pub batch_sent_at: Option<&'a Value>,
    /// Batch-level `context`, merged under the message's own.
    pub batch_context: Option<&'a Map<String, Value>>,
    /// Batch-level `integrations`, merged under the message's own.
    pub batch_integrations: Option<&'a Map<String, Value>>,
    /// The client's address, stored as `context.ip` when the message has none.
    pub peer_ip: Option<String>,
}

/// A message in its stored form, with its key fields pulled out.
#[derive(Debug, Clone, PartialEq)]
pub struct Normalized {
    /// `messageId`.
    pub message_id: String,
    /// Call type.
    pub call_type: CallType,
    /// Track `event`, or page/screen `name`.
    pub event: Option<String>,
    /// `userId`, if any.
    pub user_id: Option<String>,
    /// `anonymousId`, if any.
    pub anonymous_id: Option<String>,
    /// `receivedAt` in epoch milliseconds.
    pub received_at_ms: i64,
    /// Identify's `traits.email`, when it is a string (the identity map learns
    /// `email → userId` from it); `None` for other calls.
    pub traits_email: Option<String>,
    /// The whole normalized message: the JSON text the log stores.
    pub payload: String,
}

impl Normalized {
    /// The stored message parsed back into a tree (the debugger, tests).
    pub fn body(&self) -> Map<String, Value> {
        serde_json::from_str(&self.payload).unwrap_or_default()
    }
}

/// Formats a time as Segment does: ISO-8601, UTC, milliseconds, `Z`.
///
/// Four of these per message: the digits are written directly (years 0–9999, no
/// leap second), which costs a tenth of `to_rfc3339_opts`; anything else goes
/// through chrono, so the text is always exactly chrono's.
pub fn format_ts(t: DateTime<Utc>) -> String {
    use chrono::{Datelike, Timelike};
    let year = t.year();
    let nanos = t.nanosecond();
    if !(0..=9999).contains(&year) || nanos >= 1_000_000_000 {
        return t.to_rfc3339_opts(SecondsFormat::Millis, true);
    }
    utc_millis_text(
        year as u32,
        t.month(),
        t.day(),
        t.hour(),
        t.minute(),
        t.second(),
        nanos / 1_000_000,
    )
}

/// `YYYY-MM-DDTHH:MM:SS.mmmZ` from its fields (each already in range; the year
/// below 10000), without `fmt`.
pub fn utc_millis_text(
    year: u32,
    month: u32,
    day: u32,
    hour: u32,
    minute: u32,
    second: u32,
    millis: u32,
) -> String {
    fn push(out: &mut String, v: u32, width: u32) {
        let mut div = 10u32.pow(width - 1);
        for _ in 0..width {
            out.push(char::from(b'0' + ((v / div) % 10) as u8));
            div /= 10;
        }
    }
    let mut out = String::with_capacity(24);
    push(&mut out, year, 4);
    out.push('-');
    push(&mut out, month, 2);
    out.push('-');
    push(&mut out, day, 2);
    out.push('T');
    push(&mut out, hour, 2);
    out.push(':');
    push(&mut out, minute, 2);
    out.push(':');
    push(&mut out, second, 2);
    out.push('.');
    push(&mut out, millis, 3);
    out.push('Z');
    out
}

/// Parses a Segment timestamp: ISO-8601/RFC 3339 with any offset (converted to UTC),
/// a naive date-time taken as UTC, a date alone, or epoch milliseconds as a number.
pub fn parse_ts(v: &Value) -> Option<DateTime<Utc>> {
    match v {
        Value::String(s) => parse_ts_str(s),
        Value::Number(n) => {
            let ms = n.as_i64().or_else(|| n.as_f64().map(|f| f as i64))?;
            Utc.timestamp_millis_opt(ms).single()
        }
        _ => None,
    }
}

/// String form of [`parse_ts`].
pub fn parse_ts_str(s: &str) -> Option<DateTime<Utc>> {
    let s = s.trim();
    if let Ok(t) = DateTime::parse_from_rfc3339(s) {
        return Some(t.with_timezone(&Utc));
    }
    for f in ["%Y-%m-%dT%H:%M:%S%.f%z", "%Y-%m-%d %H:%M:%S%.f%z"] {
        if let Ok(t) = DateTime::parse_from_str(s, f) {
            return Some(t.with_timezone(&Utc));
        }
    }
    for f in ["%Y-%m-%dT%H:%M:%S%.f", "%Y-%m-%d %H:%M:%S%.f"] {
        if let Ok(t) = chrono::NaiveDateTime::parse_from_str(s, f) {
            return Some(t.and_utc());
        }
    }
    if let Ok(d) = chrono::NaiveDate::parse_from_str(s, "%Y-%m-%d") {
        return d.and_hms_opt(0, 0, 0).map(|t| t.and_utc());
    }
    None
}

/// Deep-merges `base` under `over`: keys of `over` win; objects on both sides merge.
pub fn merge_under(over: &mut Map<String, Value>, base: &Map<String, Value>) {
    for (k, bv) in base {
        match over.get_mut(k) {
            None => {
                over.insert(k.clone(), bv.clone());
            }
            Some(Value::Object(o)) => {
                if let Value::Object(b) = bv {
                    merge_under(o, b);
                }
            }
            Some(_) => {}
        }
    }
}

/// What a message member is, as far as validation cares.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    /// `null`.
    Null,
    /// A JSON object.
    Object,
    /// Anything else.
    Other,
}

impl Kind {
    fn of(v: &Value) -> Kind {
        match v {
            Value::Null => Kind::Null,
            Value::Object(_) => Kind::Object,
            _ => Kind::Other,
        }
    }
}

/// The members of one message object as normalization reads and changes them: a
/// `serde_json::Map` (the tree path, [`normalize`]) or the spliced form of
/// [`crate::splice`] (the request path). Both follow `Map`'s order rules (the
/// `preserve_order` feature): inserting a present key keeps its place, a new key
/// goes last, and removing a key moves the last member into its place
/// (`swap_remove`) — so both produce the same members in the same order.
pub(crate) trait Members {
    /// Whether `k` is present.
    fn contains(&self, k: &str) -> bool;
    /// The value of `k` (parsed on demand in the spliced form).
    fn get(&self, k: &str) -> Option<Cow<'_, Value>>;
    /// The kind of `k`'s value, without parsing it.
    fn kind(&self, k: &str) -> Option<Kind>;
    /// Sets `k` (in place when present, else last).
    fn insert(&mut self, k: &'static str, v: Value);
    /// Removes `k` (the last member takes its place).
    fn remove(&mut self, k: &str);
    /// Moves the value of `from`, when present, to a new key `to` (last).
    fn rename(&mut self, from: &str, to: &'static str);
    /// The kind of `context.traits`, when `context` is an object holding `traits`.
    fn context_traits_kind(&self) -> Option<Kind>;
    /// `traits.email`, when it is a string.
    fn traits_email(&self) -> Option<String>;
    /// The last step: `context` and `integrations` merged with the batch's (moved
    /// last), then the JSON text of the whole message.
    fn finish(self, ctx: &NormalizeContext<'_>) -> String;
}

impl Members for Map<String, Value> {
    fn contains(&self, k: &str) -> bool {
        self.contains_key(k)
    }
    fn get(&self, k: &str) -> Option<Cow<'_, Value>> {
        Map::get(self, k).map(Cow::Borrowed)
    }
    fn kind(&self, k: &str) -> Option<Kind> {
        Map::get(self, k).map(Kind::of)
    }
    fn insert(&mut self, k: &'static str, v: Value) {
        Map::insert(self, k.into(), v);
    }
    fn remove(&mut self, k: &str) {
        Map::remove(self, k);
    }
    fn rename(&mut self, from: &str, to: &'static str) {
        if let Some(v) = Map::remove(self, from) {
            Map::insert(self, to.into(), v);
        }
    }
    fn context_traits_kind(&self) -> Option<Kind> {
        match Map::get(self, "context") {
            Some(Value::Object(c)) => c.get("traits").map(Kind::of),
            _ => None,
        }
    }
    fn traits_email(&self) -> Option<String> {
        Map::get(self, "traits")
            .and_then(|t| t.get("email"))
            .and_then(Value::as_str)
            .map(str::to_string)
    }
    fn finish(mut self, ctx: &NormalizeContext<'_>) -> String {
        let context = match Map::remove(&mut self, "context") {
            Some(Value::Object(c)) => c,
            _ => Map::new(),
        };
        Map::insert(
            &mut self,
            "context".into(),
            Value::Object(merged_context(context, ctx)),
        );
        let integrations = match Map::remove(&mut self, "integrations") {
            Some(Value::Object(i)) => i,
            _ => Map::new(),
        };
        let integrations = merged_integrations(integrations, ctx);
        if !integrations.is_empty() {
            Map::insert(
                &mut self,
                "integrations".into(),
                Value::Object(integrations),
            );
        }
        serde_json::to_string(&self).unwrap_or_default()
    }
}

/// A message's `context` with the batch's merged under it and `ip` filled.
pub(crate) fn merged_context(
    mut context: Map<String, Value>,
    ctx: &NormalizeContext<'_>,
) -> Map<String, Value> {
    if let Some(bc) = ctx.batch_context {
        merge_under(&mut context, bc);
    }
    if !context.contains_key("ip")
        && let Some(ip) = &ctx.peer_ip
    {
        context.insert("ip".into(), Value::String(ip.clone()));
    }
    context
}

/// A message's `integrations` with the batch's merged under it.
pub(crate) fn merged_integrations(
    mut integrations: Map<String, Value>,
    ctx: &NormalizeContext<'_>,
) -> Map<String, Value> {
    if let Some(bi) = ctx.batch_integrations {
        merge_under(&mut integrations, bi);
    }
    integrations
}

/// Reads an id field (`userId`, `anonymousId`, `groupId`, `previousId`): strings and
/// numbers are accepted (numbers as their decimal text), `null` is absent, an empty
/// string or any other type is an error.
fn id_field(body: &impl Members, key: &str) -> Result<Option<String>, ()> {
    match body.get(key).as_deref() {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) if !s.trim().is_empty() => Ok(Some(s.clone())),
        Some(Value::Number(n)) => Ok(Some(n.to_string())),
        Some(_) => Err(()),
    }
}

fn ensure_kind(kind: Option<Kind>, key: &str, code: RejectCode) -> Result<(), Rejection> {
    match kind {
        None | Some(Kind::Null) | Some(Kind::Object) => Ok(()),
        Some(Kind::Other) => Err(Rejection::new(
            code,
            format!("`{key}` must be a JSON object"),
        )),
    }
}

fn optional_string(
    body: &impl Members,
    key: &str,
    code: RejectCode,
) -> Result<Option<String>, Rejection> {
    match body.get(key).as_deref() {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) if !s.is_empty() => Ok(Some(s.clone())),
        Some(_) => Err(Rejection::new(
            code,
            format!("`{key}` must be a non-empty string when present"),
        )),
    }
}

fn timestamp_field(body: &impl Members, key: &str) -> Result<Option<DateTime<Utc>>, Rejection> {
    match body.get(key).as_deref() {
        None | Some(Value::Null) => Ok(None),
        Some(v) => parse_ts(v).map(Some).ok_or_else(|| {
            Rejection::new(
                RejectCode::TimestampInvalid,
                format!("`{key}` must be an ISO-8601 date-time (or epoch milliseconds)"),
            )
        }),
    }
}

/// Validates and normalizes one message given as a JSON tree (the webhook and API
/// sync paths, and the request path's fallback for unusual input). See the module
/// documentation.
pub fn normalize(raw: Value, ctx: &NormalizeContext<'_>) -> Result<Normalized, Rejection> {
    let Value::Object(body) = raw else {
        return Err(Rejection::new(
            RejectCode::BadRequest,
            "a message must be a JSON object",
        ));
    };
    normalize_members(body, ctx)
}

/// The rules of [`normalize`] on either form of a message.
pub(crate) fn normalize_members<M: Members>(
    mut body: M,
    ctx: &NormalizeContext<'_>,
) -> Result<Normalized, Rejection> {
    // Legacy spellings still sent by old libraries.
    if !body.contains("type") {
        body.rename("action", "type");
    }
    if !body.contains("userId") {
        body.rename("user_id", "userId");
    }
    body.remove("writeKey");

    let call_type = match ctx.call_type {
        Some(t) => t,
        None => match body.get("type").as_deref() {
            Some(Value::String(s)) => CallType::parse(s).ok_or_else(|| {
                Rejection::new(
                    RejectCode::InvalidType,
                    format!(
                        "unknown `type` {s:?}; expected identify, track, page, screen, group or alias"
                    ),
                )
            })?,
            _ => {
                return Err(Rejection::new(
                    RejectCode::InvalidType,
                    "every message in a batch needs a `type`: identify, track, page, screen, group or alias",
                ));
            }
        },
    };
    // Re-inserting an equal value changes nothing (a key keeps its place), so the
    // common case skips the allocation and the insert.
    if !matches!(body.get("type").as_deref(), Some(Value::String(s)) if s == call_type.as_str()) {
        body.insert("type", Value::String(call_type.as_str().into()));
    }

    let id_err = |k: &str| {
        Rejection::new(
            RejectCode::IdNotString,
            format!("`{k}` must be a non-empty string"),
        )
    };
    let user_id = id_field(&body, "userId").map_err(|_| id_err("userId"))?;
    let anonymous_id = id_field(&body, "anonymousId").map_err(|_| id_err("anonymousId"))?;
    for (k, v) in [("userId", &user_id), ("anonymousId", &anonymous_id)] {
        match v {
            Some(s) => {
                if !matches!(body.get(k).as_deref(), Some(Value::String(old)) if old == s) {
                    body.insert(k, Value::String(s.clone()));
                }
            }
            None => {
                body.remove(k);
            }
        }
    }

    let mut event = None;
    match call_type {
        CallType::Alias => {
            let prev = id_field(&body, "previousId").map_err(|_| id_err("previousId"))?;
            match (prev, &user_id) {
                (Some(p), Some(_)) => {
                    body.insert("previousId", Value::String(p));
                }
                _ => {
                    return Err(Rejection::new(
                        RejectCode::PreviousIdRequired,
                        "alias needs both `previousId` and `userId`",
                    ));
                }
            }
        }
        _ if user_id.is_none() && anonymous_id.is_none() => {
            return Err(Rejection::new(
                RejectCode::NoUserAnonId,
                "every message needs a `userId` or an `anonymousId`",
            ));
        }
        _ => {}
    }
    match call_type {
        CallType::Track => match body.get("event").as_deref() {
            None | Some(Value::Null) => {
                return Err(Rejection::new(
                    RejectCode::EventNotDefined,
                    "track needs an `event` name",
                ));
            }
            Some(Value::String(s)) if !s.trim().is_empty() => event = Some(s.clone()),
            Some(_) => {
                return Err(Rejection::new(
                    RejectCode::EventNotString,
                    "`event` must be a non-empty string",
                ));
            }
        },
        CallType::Page | CallType::Screen => {
            event = optional_string(&body, "name", RejectCode::NameNotString)?;
            optional_string(&body, "category", RejectCode::CategoryNotString)?;
        }
        CallType::Group => match id_field(&body, "groupId") {
            Ok(Some(g)) => {
                body.insert("groupId", Value::String(g));
            }
            Ok(None) => {
                return Err(Rejection::new(
                    RejectCode::GroupIdRequired,
                    "group needs a `groupId`",
                ));
            }
            Err(()) => return Err(id_err("groupId")),
        },
        CallType::Identify | CallType::Alias => {}
    }
    ensure_kind(
        body.kind("properties"),
        "properties",
        RejectCode::PropertiesNotObject,
    )?;
    ensure_kind(body.kind("traits"), "traits", RejectCode::TraitsNotObject)?;
    ensure_kind(
        body.kind("context"),
        "context",
        RejectCode::ContextNotObject,
    )?;
    ensure_kind(
        body.kind("integrations"),
        "integrations",
        RejectCode::ContextNotObject,
    )?;
    ensure_kind(
        body.context_traits_kind(),
        "traits",
        RejectCode::TraitsNotObject,
    )?;

    let message_id = match body.get("messageId").as_deref() {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) if s.is_empty() => None,
        // NUL cannot be stored in PostgreSQL text: a row with it would never load.
        Some(Value::String(s)) if s.contains('\0') => {
            return Err(Rejection::new(
                RejectCode::MessageIdInvalid,
                "`messageId` must not contain NUL (\\u0000)",
            ));
        }
        Some(Value::String(s)) if s.chars().count() <= 100 => Some(s.clone()),
        Some(Value::Number(n)) => Some(n.to_string()),
        Some(Value::String(_)) => {
            return Err(Rejection::new(
                RejectCode::MessageIdInvalid,
                "`messageId` is limited to 100 characters",
            ));
        }
        Some(_) => {
            return Err(Rejection::new(
                RejectCode::MessageIdInvalid,
                "`messageId` must be a string",
            ));
        }
    }
    .unwrap_or_else(|| generated_message_id(ctx.received_at));
    if !matches!(body.get("messageId").as_deref(), Some(Value::String(old)) if *old == message_id) {
        body.insert("messageId", Value::String(message_id.clone()));
    }

    // Timestamps (segment-spec §1.8): an incoming `timestamp` becomes
    // `originalTimestamp`; `timestamp` is recomputed.
    let received_at = ctx.received_at;
    let original = match timestamp_field(&body, "timestamp")? {
        Some(t) => Some(t),
        None => timestamp_field(&body, "originalTimestamp")?,
    };
    let sent_at = match timestamp_field(&body, "sentAt")? {
        Some(t) => Some(t),
        None => match ctx.batch_sent_at {
            Some(v) if !v.is_null() => Some(parse_ts(v).ok_or_else(|| {
                Rejection::new(
                    RejectCode::TimestampInvalid,
                    "batch `sentAt` must be an ISO-8601 date-time",
                )
            })?),
            _ => None,
        },
    };
    let timestamp = match (original, sent_at) {
        (None, _) => received_at,
        (Some(o), None) => o,
        (Some(o), Some(s)) => received_at - (s - o),
    };
    body.insert(
        "originalTimestamp",
        Value::String(format_ts(original.unwrap_or(received_at))),
    );
    body.insert("timestamp", Value::String(format_ts(timestamp)));
    match sent_at {
        Some(s) => body.insert("sentAt", Value::String(format_ts(s))),
        None => body.remove("sentAt"),
    };
    body.insert("receivedAt", Value::String(format_ts(received_at)));

    let traits_email = if call_type == CallType::Identify {
        body.traits_email()
    } else {
        None
    };
    // Context and integrations: batch-level values merged under the message's own.
    let payload = body.finish(ctx);

    Ok(Normalized {
        message_id,
        call_type,
        event,
        user_id,
        anonymous_id,
        received_at_ms: received_at.timestamp_millis(),
        traits_email,
        payload,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn now() -> DateTime<Utc> {
        parse_ts_str("2026-11-27T12:00:00.000Z").unwrap()
    }

    fn ctx() -> NormalizeContext<'static> {
        NormalizeContext {
            received_at: now(),
            ..Default::default()
        }
    }

    fn code(v: Value) -> RejectCode {
        normalize(v, &ctx()).unwrap_err().code
    }

    #[test]
    fn format_ts_matches_chrono() {
        for s in [
            "2026-11-27T12:00:00.000Z",
            "1970-01-01T00:00:00.001Z",
            "0001-02-03T04:05:06.789Z",
            "9999-12-31T23:59:59.999Z",
            "2024-02-29T23:59:59.5+01:00",
        ] {
            let t = parse_ts_str(s).unwrap();
            assert_eq!(format_ts(t), t.to_rfc3339_opts(SecondsFormat::Millis, true));
        }
        // Out of the fast path's range: chrono's text.
        let far = Utc.with_ymd_and_hms(12000, 1, 1, 0, 0, 0).unwrap();
        assert_eq!(
            format_ts(far),
            far.to_rfc3339_opts(SecondsFormat::Millis, true)
        );
        let every_ms = Utc.timestamp_millis_opt(1_764_000_000_123).unwrap();
        for i in 0..2000i64 {
            let t = every_ms + chrono::Duration::milliseconds(i * 37_777);
            assert_eq!(format_ts(t), t.to_rfc3339_opts(SecondsFormat::Millis, true));
        }
    }

    #[test]
    fn generated_message_ids_are_distinct_uuid_v7s_of_the_receive_time() {
        let mut seen = std::collections::HashSet::new();
        let at = ctx().received_at;
        for _ in 0..10_000 {
            let n = normalize(json!({"type":"track","event":"E","userId":"u1"}), &ctx()).unwrap();
            let id = n.message_id.strip_prefix("api-").expect("api- prefix");
            let uuid = uuid::Uuid::parse_str(id).expect("a UUID");
            assert_eq!(uuid.get_version_num(), 7);
            let (secs, nanos) = uuid.get_timestamp().expect("v7 has a time").to_unix();
            assert_eq!(
                secs as i64 * 1000 + i64::from(nanos / 1_000_000),
                at.timestamp_millis()
            );
            assert!(
                seen.insert(n.message_id.clone()),
                "repeated {}",
                n.message_id
            );
        }
        // Another thread draws from its own seed, not the same sequence.
        let other = std::thread::spawn(|| {
            normalize(json!({"type":"track","event":"E","userId":"u1"}), &ctx())
                .unwrap()
                .message_id
        })
        .join()
        .unwrap();
        assert!(!seen.contains(&other));
    }

    #[test]
    fn track_gets_ids_and_times() {
        let n = normalize(
            json!({"type":"track","event":"Email Opened","userId":"u1","properties":{"a":1}}),
            &ctx(),
        )
        .unwrap();
        assert_eq!(n.call_type, CallType::Track);
        assert_eq!(n.event.as_deref(), Some("Email Opened"));
        assert!(n.message_id.starts_with("api-"));
        assert!(n.message_id.len() <= 100);
        assert_eq!(n.body()["receivedAt"], "2026-11-27T12:00:00.000Z");
        assert_eq!(n.body()["timestamp"], "2026-11-27T12:00:00.000Z");
        assert_eq!(n.body()["originalTimestamp"], "2026-11-27T12:00:00.000Z");
        assert!(n.body().get("sentAt").is_none());
    }

    #[test]
    fn clock_skew_is_corrected_with_batch_sent_at() {
        // The device clock is 1 hour behind; the event happened 10 s before sending.
        let sent = json!("2026-11-27T11:00:10.000Z");
        let c = NormalizeContext {
            received_at: now(),
            batch_sent_at: Some(&sent),
            ..Default::default()
        };
        let n = normalize(
            json!({"type":"track","event":"E","anonymousId":"a","timestamp":"2026-11-27T11:00:00Z"}),
            &c,
        )
        .unwrap();
        assert_eq!(n.body()["originalTimestamp"], "2026-11-27T11:00:00.000Z");
        assert_eq!(n.body()["sentAt"], "2026-11-27T11:00:10.000Z");
        assert_eq!(n.body()["timestamp"], "2026-11-27T11:59:50.000Z");
    }

    #[test]
    fn offsets_and_epoch_millis_become_utc() {
        let n = normalize(
            json!({"type":"track","event":"E","anonymousId":"a","timestamp":"2024-02-28T07:04:13-06:00"}),
            &ctx(),
        )
        .unwrap();
        assert_eq!(n.body()["timestamp"], "2024-02-28T13:04:13.000Z");
        let n = normalize(
            json!({"type":"track","event":"E","anonymousId":"a","timestamp":1436569200000i64}),
            &ctx(),
        )
        .unwrap();
        assert_eq!(n.body()["timestamp"], "2015-07-10T23:00:00.000Z");
    }

    #[test]
    fn batch_context_merges_under_message_context_and_ip_is_filled() {
        let bc = json!({"library":{"name":"analytics-go","version":"3"},"locale":"en-US"});
        let c = NormalizeContext {
            received_at: now(),
            batch_context: bc.as_object(),
            peer_ip: Some("10.0.0.1".into()),
            ..Default::default()
        };
        let n = normalize(
            json!({"type":"identify","userId":"u","context":{"library":{"version":"4"}},"writeKey":"secret"}),
            &c,
        )
        .unwrap();
        assert_eq!(
            n.body()["context"]["library"],
            json!({"version":"4","name":"analytics-go"})
        );
        assert_eq!(n.body()["context"]["locale"], "en-US");
        assert_eq!(n.body()["context"]["ip"], "10.0.0.1");
        assert!(n.body().get("writeKey").is_none());
    }

    #[test]
    fn legacy_action_and_user_id_are_accepted() {
        let n = normalize(json!({"action":"track","event":"E","user_id":"u"}), &ctx()).unwrap();
        assert_eq!(n.call_type, CallType::Track);
        assert_eq!(n.user_id.as_deref(), Some("u"));
        assert_eq!(n.body()["userId"], "u");
    }

    #[test]
    fn endpoint_type_wins_over_body_type() {
        let c = NormalizeContext {
            received_at: now(),
            call_type: Some(CallType::Identify),
            ..Default::default()
        };
        let n = normalize(json!({"type":"track","userId":"u"}), &c).unwrap();
        assert_eq!(n.body()["type"], "identify");
    }

    #[test]
    fn rejections_carry_segment_reason_codes() {
        assert_eq!(code(json!([1])), RejectCode::BadRequest);
        assert_eq!(
            code(json!({"event":"E","userId":"u"})),
            RejectCode::InvalidType
        );
        assert_eq!(
            code(json!({"type":"nope","userId":"u"})),
            RejectCode::InvalidType
        );
        assert_eq!(
            code(json!({"type":"track","event":"E"})),
            RejectCode::NoUserAnonId
        );
        assert_eq!(
            code(json!({"type":"track","event":"E","userId":""})),
            RejectCode::IdNotString
        );
        assert_eq!(
            code(json!({"type":"track","event":"E","userId":{}})),
            RejectCode::IdNotString
        );
        assert_eq!(
            code(json!({"type":"track","userId":"u"})),
            RejectCode::EventNotDefined
        );
        assert_eq!(
            code(json!({"type":"track","event":5,"userId":"u"})),
            RejectCode::EventNotString
        );
        assert_eq!(
            code(json!({"type":"track","event":"E","userId":"u","properties":[1]})),
            RejectCode::PropertiesNotObject
        );
        assert_eq!(
            code(json!({"type":"identify","userId":"u","traits":"x"})),
            RejectCode::TraitsNotObject
        );
        assert_eq!(
            code(json!({"type":"page","userId":"u","name":""})),
            RejectCode::NameNotString
        );
        assert_eq!(
            code(json!({"type":"screen","userId":"u","category":3})),
            RejectCode::CategoryNotString
        );
        assert_eq!(
            code(json!({"type":"group","userId":"u"})),
            RejectCode::GroupIdRequired
        );
        assert_eq!(
            code(json!({"type":"alias","userId":"u"})),
            RejectCode::PreviousIdRequired
        );
        assert_eq!(
            code(json!({"type":"track","event":"E","userId":"u","messageId":"x".repeat(101)})),
            RejectCode::MessageIdInvalid
        );
        assert_eq!(
            code(json!({"type":"track","event":"E","userId":"u","timestamp":"yesterday"})),
            RejectCode::TimestampInvalid
        );
        assert_eq!(
            code(json!({"type":"track","event":"E","userId":"u","context":"x"})),
            RejectCode::ContextNotObject
        );
    }

    #[test]
    fn alias_and_group_keep_their_ids() {
        let n = normalize(
            json!({"type":"alias","userId":"u","previousId":"a"}),
            &ctx(),
        )
        .unwrap();
        assert_eq!(n.body()["previousId"], "a");
        let n = normalize(json!({"type":"group","userId":"u","groupId":42}), &ctx()).unwrap();
        assert_eq!(n.body()["groupId"], "42");
    }

    #[test]
    fn message_id_with_nul_is_refused() {
        assert_eq!(
            code(json!({"type":"track","event":"E","userId":"u","messageId":"a\u{0}b"})),
            RejectCode::MessageIdInvalid
        );
    }

    #[test]
    fn client_message_id_is_kept() {
        let n = normalize(
            json!({"type":"page","anonymousId":"a","messageId":"ajs-1","name":"Home"}),
            &ctx(),
        )
        .unwrap();
        assert_eq!(n.message_id, "ajs-1");
        assert_eq!(n.event.as_deref(), Some("Home"));
    }
}
