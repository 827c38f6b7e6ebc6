//! Table planning: which rows one log record becomes, in which tables, with which
//! (still untyped) column values.
//!
//! Segment's warehouse layout (DESIGN.md §4, segment-spec §3.4):
//! - `track` → a row in `tracks` (common columns and `context_*` only) and a row in the
//!   event's own table `snake(event)` (the same plus one column per property);
//! - `identify` → `identifies` (common + traits) and, when there is a `userId`, an
//!   update of `users` (`id` = the user id, latest non-null traits);
//! - `page` / `screen` → `pages` / `screens` (common + `name`, `category` + properties);
//! - `group` → `groups` (common + `group_id` + traits); `alias` → `aliases` (common +
//!   `previous_id`).
//!
//! Common columns: `id` (messageId), `anonymous_id`, `user_id`, `received_at`,
//! `sent_at`, `timestamp`, `original_timestamp`, `uuid_ts` (load time) and `context_*`.
//! `integrations`, `type`, `channel`, `version` and the write key are never loaded.
//!
//! Invariants: pure and deterministic for a given record and load time; a property
//! never overwrites a fixed column (naming gives it a `_` prefix); two keys that
//! snake-case to the same column in one message keep the first value and report the
//! second as a discard — nothing is dropped silently.

use chrono::{DateTime, Utc};
use serde::Deserialize;
use serde_json::value::RawValue;
use serde_json::{Map, Value};
use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use tributary_eventlog::Record;

use tributary_model::flatten::array_text;

use crate::naming::{column_name_by, event_table};
use crate::types::{ColumnType, format_timestamp, value_text};

/// The kind of a loaded table; decides its fixed columns and how rows are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TableKind {
    /// `tracks`.
    Tracks,
    /// A per-event table.
    Event,
    /// `identifies`.
    Identifies,
    /// `users` (upserted on `id`).
    Users,
    /// `pages`.
    Pages,
    /// `screens`.
    Screens,
    /// `groups`.
    Groups,
    /// `aliases`.
    Aliases,
}

use ColumnType::{Text, Timestamp};

const TRACK_COLUMNS: &[(&str, ColumnType)] = &[
    ("id", Text),
    ("anonymous_id", Text),
    ("user_id", Text),
    ("event", Text),
    ("event_text", Text),
    ("received_at", Timestamp),
    ("sent_at", Timestamp),
    ("timestamp", Timestamp),
    ("original_timestamp", Timestamp),
    ("uuid_ts", Timestamp),
];

const IDENTIFY_COLUMNS: &[(&str, ColumnType)] = &[
    ("id", Text),
    ("anonymous_id", Text),
    ("user_id", Text),
    ("received_at", Timestamp),
    ("sent_at", Timestamp),
    ("timestamp", Timestamp),
    ("original_timestamp", Timestamp),
    ("uuid_ts", Timestamp),
];

const PAGE_COLUMNS: &[(&str, ColumnType)] = &[
    ("id", Text),
    ("anonymous_id", Text),
    ("user_id", Text),
    ("name", Text),
    ("category", Text),
    ("received_at", Timestamp),
    ("sent_at", Timestamp),
    ("timestamp", Timestamp),
    ("original_timestamp", Timestamp),
    ("uuid_ts", Timestamp),
];

const GROUP_COLUMNS: &[(&str, ColumnType)] = &[
    ("id", Text),
    ("anonymous_id", Text),
    ("user_id", Text),
    ("group_id", Text),
    ("received_at", Timestamp),
    ("sent_at", Timestamp),
    ("timestamp", Timestamp),
    ("original_timestamp", Timestamp),
    ("uuid_ts", Timestamp),
];

const ALIAS_COLUMNS: &[(&str, ColumnType)] = &[
    ("id", Text),
    ("anonymous_id", Text),
    ("user_id", Text),
    ("previous_id", Text),
    ("received_at", Timestamp),
    ("sent_at", Timestamp),
    ("timestamp", Timestamp),
    ("original_timestamp", Timestamp),
    ("uuid_ts", Timestamp),
];

const USER_COLUMNS: &[(&str, ColumnType)] = &[
    ("id", Text),
    ("received_at", Timestamp),
    ("uuid_ts", Timestamp),
];

impl TableKind {
    /// The columns every table of this kind has from creation, in order.
    pub fn fixed_columns(self) -> &'static [(&'static str, ColumnType)] {
        match self {
            TableKind::Tracks | TableKind::Event => TRACK_COLUMNS,
            TableKind::Identifies => IDENTIFY_COLUMNS,
            TableKind::Users => USER_COLUMNS,
            TableKind::Pages | TableKind::Screens => PAGE_COLUMNS,
            TableKind::Groups => GROUP_COLUMNS,
            TableKind::Aliases => ALIAS_COLUMNS,
        }
    }
}

/// A column name in a planned row: a fixed column's `'static` name, or a property's
/// or context's name shared by every row that has it (interned by [`Names`], so a
/// row costs no allocation per column name). One pointer wide, so a row's values
/// stay small allocations.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Name {
    /// A fixed column.
    Fixed(&'static &'static str),
    /// A name computed once per planning thread and batch.
    Shared(Arc<String>),
}

impl std::ops::Deref for Name {
    type Target = str;
    fn deref(&self) -> &str {
        match self {
            Name::Fixed(s) => s,
            Name::Shared(s) => s,
        }
    }
}

impl AsRef<str> for Name {
    fn as_ref(&self) -> &str {
        self
    }
}

impl PartialEq<str> for Name {
    fn eq(&self, other: &str) -> bool {
        &**self == other
    }
}

impl PartialEq<&str> for Name {
    fn eq(&self, other: &&str) -> bool {
        &**self == *other
    }
}

impl From<String> for Name {
    fn from(s: String) -> Self {
        Name::Shared(Arc::new(s))
    }
}

impl From<&str> for Name {
    fn from(s: &str) -> Self {
        Name::Shared(Arc::new(s.to_string()))
    }
}

impl std::fmt::Display for Name {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self)
    }
}

/// Flattened path → column name.
type NameMap = HashMap<Box<str>, Arc<String>>;

/// Column and table names already computed by one planning thread: snake-casing and
/// collision rules run once per distinct path, not once per row.
#[derive(Default)]
pub struct Names {
    /// Per (fixed columns of the table kind, is context): flattened path → column.
    columns: Vec<(usize, bool, NameMap)>,
    /// Event name → table name.
    tables: HashMap<Box<str>, Arc<String>>,
    /// Scratch buffer for flattened paths.
    path: String,
}

impl Names {
    /// The column of flattened `path` in a table with `fixed` columns.
    fn column(
        &mut self,
        fixed: &'static [(&'static str, ColumnType)],
        is_context: bool,
        path: &str,
    ) -> Arc<String> {
        let id = fixed.as_ptr() as usize;
        let at = match self
            .columns
            .iter()
            .position(|(f, c, _)| *f == id && *c == is_context)
        {
            Some(at) => at,
            None => {
                self.columns.push((id, is_context, HashMap::new()));
                self.columns.len() - 1
            }
        };
        let map = &mut self.columns[at].2;
        if let Some(name) = map.get(path) {
            return name.clone();
        }
        let name = Arc::new(column_name_by(
            path,
            |n| fixed.iter().any(|(f, _)| *f == n),
            is_context,
        ));
        map.insert(path.into(), name.clone());
        name
    }

    /// The table of an event name.
    fn event_table(&mut self, event: &str) -> Arc<String> {
        if let Some(t) = self.tables.get(event) {
            return t.clone();
        }
        let t = Arc::new(event_table(event));
        self.tables.insert(event.into(), t.clone());
        t
    }
}

/// One row to load, before typing.
#[derive(Debug, Clone, PartialEq)]
pub struct PlannedRow {
    /// Log sequence number of the record the row comes from.
    pub seq: u64,
    /// The record's messageId (the row's `id`, except in `users`), shared by the
    /// record's rows.
    pub message_id: Arc<str>,
    /// The primary key value: the messageId, or the user id in `users`.
    pub key: Arc<str>,
    /// `receivedAt` of the record, for discards.
    pub received_at: Option<DateTime<Utc>>,
    /// Column name → JSON leaf, in column order; nulls included.
    pub values: Vec<(Name, Value)>,
    /// Values dropped while planning (name collisions): (column, value, reason).
    pub dropped: Vec<(String, String, String)>,
}

/// A row with the table it goes to.
#[derive(Debug, Clone, PartialEq)]
pub struct Planned {
    /// Target table name (already a safe identifier).
    pub table: Name,
    /// Its kind.
    pub kind: TableKind,
    /// The row.
    pub row: PlannedRow,
}

/// Why a record produced no rows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Skip {
    /// The payload is not a JSON object.
    BadPayload(String),
    /// The call type is none of the six.
    UnknownType(String),
}

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
enum Object<'a> {
    Raw(&'a RawValue),
    Map(Map<String, Value>),
}

/// The fields of a message planning reads (absent and `null` alike are `None`).
#[derive(Debug, Default)]
#[cfg_attr(test, derive(PartialEq))]
struct Msg<'a> {
    call_type: Option<Value>,
    message_id: Option<Value>,
    received_at: Option<Value>,
    event: Option<Value>,
    user_id: Option<Value>,
    anonymous_id: Option<Value>,
    sent_at: Option<Value>,
    timestamp: Option<Value>,
    original_timestamp: Option<Value>,
    name: Option<Value>,
    category: Option<Value>,
    group_id: Option<Value>,
    previous_id: Option<Value>,
    context: Option<Object<'a>>,
    properties: Option<Object<'a>>,
    traits: Option<Object<'a>>,
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
    fn parse(payload: &'a str) -> Result<Msg<'a>, Skip> {
        match Msg::parse_borrowed(payload) {
            Some(msg) => Ok(msg),
            None => Msg::parse_general(payload),
        }
    }

    fn parse_borrowed(payload: &'a str) -> Option<Msg<'a>> {
        if !payload.trim_start().starts_with('{') {
            return None;
        }
        let raw = serde_json::from_str::<RawMessage<'_>>(payload).ok()?;
        Some(Msg::from_raw(raw))
    }

    fn parse_general(payload: &str) -> Result<Msg<'a>, Skip> {
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

/// Plans the rows of one record. `uuid_ts` is the load time shared by the batch,
/// already formatted (once per batch).
#[cfg(test)]
pub fn plan_record_at(record: &Record, uuid_ts: &str) -> Result<Vec<Planned>, Skip> {
    let mut out = Vec::new();
    plan_record_with(record, uuid_ts, &mut Names::default(), &mut out)?;
    Ok(out)
}

/// [`plan_record_at`] with the names already computed for earlier records; the rows
/// are appended to `out` (nothing is appended when the record is skipped).
///
/// The borrowed parse is tried first; a record it cannot take, or whose objects turn
/// out to need the general rules (a key repeated in an object, where the last value
/// wins; text that does not parse), is planned again from the general parse, whose
/// result is the reference.
pub fn plan_record_with(
    record: &Record,
    uuid_ts: &str,
    names: &mut Names,
    out: &mut Vec<Planned>,
) -> Result<(), Skip> {
    let start = out.len();
    if let Some(msg) = Msg::parse_borrowed(&record.payload) {
        match plan_msg(record, msg, uuid_ts, names, out) {
            Ok(()) => return Ok(()),
            Err(Unplanned::Skip(skip)) => {
                out.truncate(start);
                return Err(skip);
            }
            Err(Unplanned::General) => out.truncate(start),
        }
    }
    let msg = Msg::parse_general(&record.payload)?;
    plan_msg(record, msg, uuid_ts, names, out).map_err(|e| {
        out.truncate(start);
        match e {
            Unplanned::Skip(skip) => skip,
            // Maps never ask for the general parse; should one, the record is refused.
            Unplanned::General => Skip::BadPayload("payload cannot be planned".into()),
        }
    })
}

/// For the `warehouse_plan` fuzz target, not an API: plans `payload` both ways — the
/// fast path [`plan_record_with`] takes and the general parse alone — and describes
/// the first difference.
#[doc(hidden)]
pub fn fuzz_plan_differential(payload: &str) -> Result<(), String> {
    let record = Record {
        seq: 1,
        source_id: "src".into(),
        message_id: "m".into(),
        call_type: tributary_eventlog::CallType::Track,
        event: None,
        user_id: None,
        anonymous_id: None,
        received_at_ms: 1_800_000_000_000,
        payload: payload.into(),
    };
    let uuid_ts = "2027-01-15T08:00:01.000Z";
    let mut fast = Vec::new();
    let fast_result = plan_record_with(&record, uuid_ts, &mut Names::default(), &mut fast);
    let Ok(msg) = Msg::parse_general(payload) else {
        // Text a `serde_json::Value` cannot hold — a number beyond `f64` in a
        // field the loader never reads, say — may still plan on the fast path,
        // which only skips such fields: more lenient, nothing lost. (The log only
        // holds payloads ingest serialized from a `Value`, so none are like this.)
        return Ok(());
    };
    let mut general = Vec::new();
    let general_ok = plan_msg(&record, msg, uuid_ts, &mut Names::default(), &mut general).is_ok();
    if fast_result.is_ok() != general_ok {
        return Err(format!(
            "fast path {fast_result:?}, general parse ok: {general_ok}"
        ));
    }
    if general_ok && fast != general {
        return Err(format!("rows differ:\n{fast:?}\n{general:?}"));
    }
    Ok(())
}

/// Why [`plan_msg`] produced no rows.
enum Unplanned {
    Skip(Skip),
    /// The borrowed parse's objects need the general parse's rules.
    General,
}

impl From<Skip> for Unplanned {
    fn from(skip: Skip) -> Self {
        Unplanned::Skip(skip)
    }
}

fn plan_msg(
    record: &Record,
    mut msg: Msg<'_>,
    uuid_ts: &str,
    names: &mut Names,
    out: &mut Vec<Planned>,
) -> Result<(), Unplanned> {
    // The nested objects are moved out (their leaves are moved into rows, not copied).
    let context = msg.context.take();
    let properties = msg.properties.take();
    let traits = msg.traits.take();

    // The six call types, whatever their case, without building a lowercase copy.
    let given = match &msg.call_type {
        Some(Value::String(s)) => s.as_str(),
        _ => record.call_type.as_str(),
    };
    let call_type = ["track", "identify", "page", "screen", "group", "alias"]
        .into_iter()
        .find(|t| t.eq_ignore_ascii_case(given));
    let message_id = match msg.message_id.take() {
        Some(Value::String(s)) if !s.is_empty() => s,
        _ => record.message_id.clone(),
    };
    let received_at_text = match msg.received_at.take() {
        Some(Value::String(s)) => Some(s),
        _ => DateTime::from_timestamp_millis(record.received_at_ms).map(|t| format_timestamp(&t)),
    };
    let received_at = received_at_text
        .as_deref()
        .and_then(crate::types::parse_timestamp);

    // The common values are moved into the first row (the event row copies them).
    let mut base = Base {
        seq: record.seq,
        message_id: Arc::from(message_id.as_str()),
        id: Some(message_id),
        received_at,
        received_at_text,
        uuid_ts,
        anonymous_id: id_owned(msg.anonymous_id.take()),
        user_id: id_owned(msg.user_id.take()),
        sent_at: msg.sent_at.take(),
        timestamp: msg.timestamp.take(),
        original_timestamp: msg.original_timestamp.take(),
    };
    let text = |v: &Option<Value>| text_field(v).map_or(Value::Null, Value::String);
    let id = |v: &Option<Value>| id_field(v).map_or(Value::Null, Value::String);

    match call_type.unwrap_or_default() {
        "track" => {
            let event_text = text_owned(msg.event.take()).or_else(|| record.event.clone());
            let table = event_text.as_deref().map(|e| names.event_table(e));
            let mut tracks = base.row(TableKind::Tracks, 2 + leaves(&context));
            tracks.push(
                &"event",
                table
                    .as_ref()
                    .map_or(Value::Null, |t| Value::String(t.to_string())),
            );
            tracks.push(&"event_text", event_text.map_or(Value::Null, Value::String));
            tracks.context(context, names);
            let row = tracks.finish()?;
            if let Some(table) = table {
                let mut ev = RowBuilder::from_row(&row, TableKind::Event, leaves(&properties));
                ev.object(properties, names);
                out.push(Planned {
                    table: Name::Fixed(&"tracks"),
                    kind: TableKind::Tracks,
                    row,
                });
                out.push(Planned {
                    table: Name::Shared(table),
                    kind: TableKind::Event,
                    row: ev.finish()?,
                });
            } else {
                out.push(Planned {
                    table: Name::Fixed(&"tracks"),
                    kind: TableKind::Tracks,
                    row,
                });
            }
        }
        "identify" => {
            let user_id = base.user_id.clone();
            let mut row = base.row(TableKind::Identifies, leaves(&context) + leaves(&traits));
            row.context(context, names);
            let (identify_traits, user_traits) = match user_id {
                Some(_) => (traits.clone(), traits),
                None => (traits, None),
            };
            row.object(identify_traits, names);
            out.push(Planned {
                table: Name::Fixed(&"identifies"),
                kind: TableKind::Identifies,
                row: row.finish()?,
            });
            if let Some(user_id) = user_id {
                let mut user = RowBuilder::new(
                    TableKind::Users,
                    &base,
                    Arc::from(user_id.as_str()),
                    leaves(&user_traits),
                );
                user.push(&"id", Value::String(user_id));
                user.push(
                    &"received_at",
                    base.received_at_text
                        .clone()
                        .map_or(Value::Null, Value::String),
                );
                user.push(&"uuid_ts", Value::String(base.uuid_ts.to_string()));
                user.object(user_traits, names);
                out.push(Planned {
                    table: Name::Fixed(&"users"),
                    kind: TableKind::Users,
                    row: user.finish()?,
                });
            }
        }
        "page" | "screen" => {
            let (table, kind): (&'static &'static str, _) = if call_type == Some("page") {
                (&"pages", TableKind::Pages)
            } else {
                (&"screens", TableKind::Screens)
            };
            let mut row = base.row(kind, leaves(&context) + leaves(&properties));
            row.push(&"name", text(&msg.name));
            row.push(&"category", text(&msg.category));
            row.context(context, names);
            row.object(properties, names);
            out.push(Planned {
                table: Name::Fixed(table),
                kind,
                row: row.finish()?,
            });
        }
        "group" => {
            let mut row = base.row(TableKind::Groups, leaves(&context) + leaves(&traits));
            row.push(&"group_id", id(&msg.group_id));
            row.context(context, names);
            row.object(traits, names);
            out.push(Planned {
                table: Name::Fixed(&"groups"),
                kind: TableKind::Groups,
                row: row.finish()?,
            });
        }
        "alias" => {
            let mut row = base.row(TableKind::Aliases, leaves(&context));
            row.push(&"previous_id", id(&msg.previous_id));
            row.context(context, names);
            out.push(Planned {
                table: Name::Fixed(&"aliases"),
                kind: TableKind::Aliases,
                row: row.finish()?,
            });
        }
        _ => return Err(Skip::UnknownType(given.to_ascii_lowercase()).into()),
    }
    Ok(())
}

struct Base<'a> {
    seq: u64,
    message_id: Arc<str>,
    /// The messageId for the first row's `id` column (moved there).
    id: Option<String>,
    received_at: Option<DateTime<Utc>>,
    received_at_text: Option<String>,
    uuid_ts: &'a str,
    anonymous_id: Option<String>,
    user_id: Option<String>,
    sent_at: Option<Value>,
    timestamp: Option<Value>,
    original_timestamp: Option<Value>,
}

impl Base<'_> {
    /// A row with the common columns filled and room for `leaves` more values. The
    /// common values move into it: called once per record.
    fn row(&mut self, kind: TableKind, leaves: usize) -> RowBuilder {
        let mut b = RowBuilder::new(kind, self, self.message_id.clone(), leaves);
        let id = self
            .id
            .take()
            .unwrap_or_else(|| self.message_id.to_string());
        b.push(&"id", Value::String(id));
        b.push(
            &"anonymous_id",
            self.anonymous_id.take().map_or(Value::Null, Value::String),
        );
        b.push(
            &"user_id",
            self.user_id.take().map_or(Value::Null, Value::String),
        );
        b.push(
            &"received_at",
            self.received_at_text
                .clone()
                .map_or(Value::Null, Value::String),
        );
        b.push(&"sent_at", self.sent_at.take().unwrap_or(Value::Null));
        b.push(&"timestamp", self.timestamp.take().unwrap_or(Value::Null));
        b.push(
            &"original_timestamp",
            self.original_timestamp.take().unwrap_or(Value::Null),
        );
        b.push(&"uuid_ts", Value::String(self.uuid_ts.to_string()));
        b
    }
}

struct RowBuilder {
    fixed: &'static [(&'static str, ColumnType)],
    row: PlannedRow,
    /// An object was flattened from text (repeated keys are not merged then).
    from_text: bool,
    /// An object's text did not parse.
    failed: bool,
}

impl RowBuilder {
    /// A row with room for its fixed columns and `leaves` more values: rows are
    /// allocated once, at their size (a small allocation, not a growing one).
    fn new(kind: TableKind, base: &Base<'_>, key: Arc<str>, leaves: usize) -> Self {
        let fixed = kind.fixed_columns();
        RowBuilder {
            fixed,
            row: PlannedRow {
                seq: base.seq,
                message_id: base.message_id.clone(),
                key,
                received_at: base.received_at,
                values: Vec::with_capacity(fixed.len() + leaves),
                dropped: Vec::new(),
            },
            from_text: false,
            failed: false,
        }
    }

    /// Continues from a copy of a finished row (the event table starts as the
    /// `tracks` row), with room for `leaves` more values.
    fn from_row(row: &PlannedRow, kind: TableKind, leaves: usize) -> Self {
        let mut values = Vec::with_capacity(row.values.len() + leaves);
        values.extend(row.values.iter().cloned());
        RowBuilder {
            fixed: kind.fixed_columns(),
            row: PlannedRow {
                seq: row.seq,
                message_id: row.message_id.clone(),
                key: row.key.clone(),
                received_at: row.received_at,
                values,
                dropped: row.dropped.clone(),
            },
            from_text: false,
            failed: false,
        }
    }

    /// Sets a fixed column.
    fn push(&mut self, column: &'static &'static str, value: Value) {
        self.row.values.push((Name::Fixed(column), value));
    }

    /// Adds the `context_*` columns.
    fn context(&mut self, context: Option<Object<'_>>, names: &mut Names) {
        match context {
            Some(Object::Map(ctx)) => self.flatten(ctx, "context", true, names),
            Some(Object::Raw(ctx)) => self.flatten_text(ctx, "context", true, names),
            None => {}
        }
    }

    /// Adds the un-prefixed columns of `properties` or `traits`.
    fn object(&mut self, object: Option<Object<'_>>, names: &mut Names) {
        match object {
            Some(Object::Map(object)) => self.flatten(object, "", false, names),
            Some(Object::Raw(object)) => self.flatten_text(object, "", false, names),
            None => {}
        }
    }

    /// [`RowBuilder::flatten`] reading the object's text directly: no map is built,
    /// keys without escapes are not copied, and only leaves are allocated. A key
    /// repeated in an object (the general parse keeps the last value) or text that
    /// does not parse sends the record to the general parse.
    fn flatten_text(
        &mut self,
        object: &RawValue,
        prefix: &str,
        is_context: bool,
        names: &mut Names,
    ) {
        self.from_text = true;
        let mut path = std::mem::take(&mut names.path);
        path.clear();
        path.push_str(prefix);
        let mut flatten = FlattenText {
            out: &mut self.row.values,
            fixed: self.fixed,
            is_context,
            names,
            path: &mut path,
            depth: 0,
        };
        if flatten.object(object.get()).is_err() {
            self.failed = true;
        }
        names.path = path;
    }

    /// Adds one column per leaf of `object`, as
    /// [`tributary_model::flatten::flatten_owned`] joins and orders them (depth first,
    /// keys joined with `_`, arrays as JSON text, empty objects nothing), with each
    /// joined path named once per batch through `names`.
    fn flatten(
        &mut self,
        object: Map<String, Value>,
        prefix: &str,
        is_context: bool,
        names: &mut Names,
    ) {
        let fixed = self.fixed;
        let mut path = std::mem::take(&mut names.path);
        path.clear();
        path.push_str(prefix);
        let mut stack: Vec<(usize, serde_json::map::IntoIter)> =
            vec![(path.len(), object.into_iter())];
        while let Some((len, iter)) = stack.last_mut() {
            let Some((key, value)) = iter.next() else {
                stack.pop();
                continue;
            };
            path.truncate(*len);
            if !path.is_empty() {
                path.push('_');
            }
            path.push_str(&key);
            let leaf = match value {
                Value::Object(child) => {
                    if !child.is_empty() {
                        stack.push((path.len(), child.into_iter()));
                    }
                    continue;
                }
                Value::Array(_) => Value::String(array_text(&value)),
                scalar => scalar,
            };
            let col = names.column(fixed, is_context, &path);
            self.row.values.push((Name::Shared(col), leaf));
        }
        names.path = path;
    }

    /// Resolves keys that snake-cased to the same column: the first non-null value is
    /// kept, any other non-null value is reported in `dropped`. An object flattened
    /// from text with such keys (maybe a repeated key) or that did not parse asks for
    /// the general parse instead.
    fn finish(mut self) -> Result<PlannedRow, Unplanned> {
        if self.failed {
            return Err(Unplanned::General);
        }
        let values = &mut self.row.values;
        if !has_duplicate_names(values) {
            return Ok(self.row);
        }
        if self.from_text {
            return Err(Unplanned::General);
        }
        let mut duplicates: Vec<(usize, usize)> = Vec::new();
        {
            let mut first: HashMap<&str, usize> = HashMap::with_capacity(values.len());
            for (i, (col, _)) in values.iter().enumerate() {
                if let Some(&j) = first.get(col.as_ref()) {
                    duplicates.push((i, j));
                } else {
                    first.insert(col.as_ref(), i);
                }
            }
        }
        for &(i, j) in &duplicates {
            if values[j].1.is_null() {
                values[j].1 = std::mem::take(&mut values[i].1);
            } else if !values[i].1.is_null() {
                let value = value_text(&values[i].1);
                self.row.dropped.push((
                    values[i].0.to_string(),
                    value,
                    "another key of the message has the same column name".into(),
                ));
            }
        }
        let remove: HashSet<usize> = duplicates.iter().map(|(i, _)| *i).collect();
        let kept = std::mem::take(values)
            .into_iter()
            .enumerate()
            .filter(|(i, _)| !remove.contains(i))
            .map(|(_, v)| v)
            .collect();
        self.row.values = kept;
        Ok(self.row)
    }
}

/// Deepest object nesting flattened from text (serde_json's own parse limit).
const MAX_DEPTH: usize = 128;

/// The state of [`RowBuilder::flatten_text`].
struct FlattenText<'r> {
    out: &'r mut Vec<(Name, Value)>,
    fixed: &'static [(&'static str, ColumnType)],
    is_context: bool,
    names: &'r mut Names,
    /// The joined path of the object being read.
    path: &'r mut String,
    depth: usize,
}

impl FlattenText<'_> {
    /// Adds the leaves of the object whose JSON text is `text`.
    fn object(&mut self, text: &str) -> Result<(), serde_json::Error> {
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

/// How many columns an object flattens into (at most: empty objects give none; for
/// text, the number of `:` — every key has one, and a few strings do).
fn leaves(object: &Option<Object<'_>>) -> usize {
    fn count(m: &Map<String, Value>) -> usize {
        m.values()
            .map(|v| match v {
                Value::Object(child) => count(child),
                _ => 1,
            })
            .sum()
    }
    match object {
        None => 0,
        Some(Object::Map(m)) => count(m),
        Some(Object::Raw(r)) => r.get().bytes().filter(|&b| b == b':').count(),
    }
}

/// Whether two values of a row have the same column name. Rows rarely have
/// duplicates: small rows are compared pairwise without allocating.
fn has_duplicate_names(values: &[(Name, Value)]) -> bool {
    if values.len() <= 48 {
        return values
            .iter()
            .enumerate()
            .any(|(i, (a, _))| values[i + 1..].iter().any(|(b, _)| **a == **b));
    }
    let mut sorted: Vec<&str> = values.iter().map(|(c, _)| c.as_ref()).collect();
    sorted.sort_unstable();
    sorted.windows(2).any(|w| w[0] == w[1])
}

/// A string-valued field (`event`, `name`, `category`).
fn text_field(v: &Option<Value>) -> Option<String> {
    match v {
        Some(Value::String(s)) => Some(s.clone()),
        Some(Value::Number(n)) => Some(n.to_string()),
        Some(Value::Bool(b)) => Some(b.to_string()),
        _ => None,
    }
}

/// [`text_field`] of a value the caller owns (a string is moved, not copied).
fn text_owned(v: Option<Value>) -> Option<String> {
    match v {
        Some(Value::String(s)) => Some(s),
        other => text_field(&other),
    }
}

/// An identifier field (`userId`, …): strings as they are, numbers as their text
/// (analytics libraries accept numeric ids); empty strings are absent.
fn id_field(v: &Option<Value>) -> Option<String> {
    text_field(v).filter(|s| !s.is_empty())
}

/// [`id_field`] of a value the caller owns (a string is moved, not copied).
fn id_owned(v: Option<Value>) -> Option<String> {
    match v {
        Some(Value::String(s)) => Some(s).filter(|s| !s.is_empty()),
        other => id_field(&other),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn record(seq: u64, payload: Value) -> Record {
        Record {
            seq,
            source_id: "src".into(),
            message_id: payload["messageId"].as_str().unwrap_or("m").to_string(),
            call_type: payload["type"]
                .as_str()
                .and_then(tributary_eventlog::CallType::parse)
                .unwrap_or(tributary_eventlog::CallType::Track),
            event: payload["event"].as_str().map(str::to_string),
            user_id: None,
            anonymous_id: None,
            received_at_ms: 1_800_000_000_000,
            payload: payload.to_string(),
        }
    }

    fn now() -> DateTime<Utc> {
        DateTime::from_timestamp(1_800_000_001, 0).expect("valid")
    }

    fn plan_record(record: &Record, uuid_ts: &DateTime<Utc>) -> Result<Vec<Planned>, Skip> {
        plan_record_at(record, &format_timestamp(uuid_ts))
    }

    fn get<'a>(row: &'a PlannedRow, col: &str) -> Option<&'a Value> {
        row.values.iter().find(|(c, _)| c == col).map(|(_, v)| v)
    }

    fn columns(row: &PlannedRow) -> Vec<&str> {
        row.values.iter().map(|(c, _)| c.as_ref()).collect()
    }

    #[test]
    fn a_track_becomes_a_tracks_row_and_an_event_table_row() {
        let out = plan_record(
            &record(
                7,
                json!({
                    "type": "track", "messageId": "m1", "event": "Email Delivered",
                    "userId": "u1", "anonymousId": "a1",
                    "properties": {"email_subject": "Hi", "campaignID": 12, "tags": ["x", "y"],
                                   "link": {"url": "https://e.x", "id": 3}},
                    "context": {"traits": {"email": "a@b.c"}, "library": {"name": "ac"}},
                    "integrations": {"All": true},
                    "timestamp": "2026-11-27T05:10:53.123Z",
                    "originalTimestamp": "2026-11-27T05:10:53.000Z",
                    "sentAt": "2026-11-27T05:10:53.100Z",
                    "receivedAt": "2026-11-27T05:10:54.000Z"
                }),
            ),
            &now(),
        )
        .expect("planned");
        assert_eq!(out.len(), 2);
        let tracks = &out[0];
        assert_eq!(tracks.table, "tracks");
        assert_eq!(
            columns(&tracks.row),
            vec![
                "id",
                "anonymous_id",
                "user_id",
                "received_at",
                "sent_at",
                "timestamp",
                "original_timestamp",
                "uuid_ts",
                "event",
                "event_text",
                "context_traits_email",
                "context_library_name",
            ]
        );
        assert_eq!(get(&tracks.row, "event"), Some(&json!("email_delivered")));
        assert_eq!(
            get(&tracks.row, "event_text"),
            Some(&json!("Email Delivered"))
        );
        assert_eq!(
            get(&tracks.row, "uuid_ts"),
            Some(&json!(format_timestamp(&now())))
        );
        assert_eq!(tracks.row.seq, 7);
        assert_eq!(&*tracks.row.key, "m1");

        let ev = &out[1];
        assert_eq!(ev.table, "email_delivered");
        assert_eq!(ev.kind, TableKind::Event);
        assert_eq!(get(&ev.row, "email_subject"), Some(&json!("Hi")));
        assert_eq!(get(&ev.row, "campaign_id"), Some(&json!(12)));
        assert_eq!(get(&ev.row, "tags"), Some(&json!("[\"x\",\"y\"]")));
        assert_eq!(get(&ev.row, "link_url"), Some(&json!("https://e.x")));
        assert_eq!(get(&ev.row, "link_id"), Some(&json!(3)));
        assert_eq!(get(&ev.row, "context_traits_email"), Some(&json!("a@b.c")));
        assert!(get(&ev.row, "integrations_all").is_none());
        // tracks has no property columns.
        assert!(get(&tracks.row, "email_subject").is_none());
    }

    #[test]
    fn properties_named_like_reserved_columns_are_prefixed_not_dropped() {
        let out = plan_record(
            &record(
                1,
                json!({"type": "track", "messageId": "m1", "event": "Signed Up",
                       "properties": {"user_id": "evil", "timestamp": "x", "id": 5,
                                      "event": "e", "context": {"ip": "1.1.1.1"}, "name": "n"},
                       "context": {"ip": "2.2.2.2"}}),
            ),
            &now(),
        )
        .expect("planned");
        let ev = &out[1].row;
        assert_eq!(get(ev, "user_id"), Some(&Value::Null));
        assert_eq!(get(ev, "_user_id"), Some(&json!("evil")));
        assert_eq!(get(ev, "_timestamp"), Some(&json!("x")));
        assert_eq!(get(ev, "_id"), Some(&json!(5)));
        assert_eq!(get(ev, "_event"), Some(&json!("e")));
        assert_eq!(get(ev, "_context_ip"), Some(&json!("1.1.1.1")));
        assert_eq!(get(ev, "context_ip"), Some(&json!("2.2.2.2")));
        assert_eq!(get(ev, "name"), Some(&json!("n")));
        assert_eq!(get(ev, "id"), Some(&json!("m1")));
    }

    #[test]
    fn keys_that_snake_case_alike_keep_the_first_and_report_the_second() {
        let out = plan_record(
            &record(
                1,
                json!({"type": "track", "messageId": "m1", "event": "E",
                       "properties": {"planName": "a", "plan_name": "b", "plan name": null}}),
            ),
            &now(),
        )
        .expect("planned");
        let ev = &out[1].row;
        assert_eq!(get(ev, "plan_name"), Some(&json!("a")));
        assert_eq!(ev.dropped.len(), 1);
        assert_eq!(ev.dropped[0].0, "plan_name");
        assert_eq!(ev.dropped[0].1, "b");
        assert_eq!(
            ev.values.iter().filter(|(c, _)| c == "plan_name").count(),
            1
        );

        // A null first does not hide a later value.
        let out = plan_record(
            &record(
                1,
                json!({"type": "track", "messageId": "m1", "event": "E",
                       "properties": {"planName": null, "plan_name": "b"}}),
            ),
            &now(),
        )
        .expect("planned");
        assert_eq!(get(&out[1].row, "plan_name"), Some(&json!("b")));
        assert!(out[1].row.dropped.is_empty());
    }

    #[test]
    fn events_with_hostile_names_get_safe_tables() {
        for (event, table) in [
            ("Tracks", "_tracks"),
            ("Users", "_users"),
            ("\"; DROP TABLE tracks; --", "drop_table_tracks"),
            ("Order Completed 🎉", "order_completed"),
        ] {
            let out = plan_record(
                &record(
                    1,
                    json!({"type": "track", "messageId": "m1", "event": event}),
                ),
                &now(),
            )
            .expect("planned");
            assert_eq!(out[1].table, table, "{event:?}");
            assert_eq!(get(&out[0].row, "event"), Some(&json!(table)));
            assert_eq!(get(&out[0].row, "event_text"), Some(&json!(event)));
        }
        let long = "Very Long Event Name ".repeat(15);
        let out = plan_record(
            &record(
                1,
                json!({"type": "track", "messageId": "m1", "event": long}),
            ),
            &now(),
        )
        .expect("planned");
        assert_eq!(out[1].table.len(), 63);
    }

    #[test]
    fn an_identify_becomes_identifies_and_a_users_update() {
        let out = plan_record(
            &record(
                3,
                json!({"type": "identify", "messageId": "m3", "userId": "u1",
                       "traits": {"email": "a@b.c", "plan": "pro", "address": {"city": "Oslo"}, "id": "x"},
                       "receivedAt": "2026-11-27T05:10:54.000Z"}),
            ),
            &now(),
        )
        .expect("planned");
        assert_eq!(out.len(), 2);
        assert_eq!(out[0].table, "identifies");
        assert_eq!(get(&out[0].row, "email"), Some(&json!("a@b.c")));
        assert_eq!(get(&out[0].row, "address_city"), Some(&json!("Oslo")));
        let users = &out[1];
        assert_eq!(users.table, "users");
        assert_eq!(users.kind, TableKind::Users);
        assert_eq!(&*users.row.key, "u1");
        assert_eq!(&*users.row.message_id, "m3");
        assert_eq!(get(&users.row, "id"), Some(&json!("u1")));
        assert_eq!(get(&users.row, "_id"), Some(&json!("x")));
        assert_eq!(get(&users.row, "plan"), Some(&json!("pro")));
        assert!(get(&users.row, "anonymous_id").is_none());
        // Anonymous identify: no users row.
        let out = plan_record(
            &record(
                4,
                json!({"type": "identify", "messageId": "m4", "anonymousId": "a",
                              "traits": {"plan": "x"}}),
            ),
            &now(),
        )
        .expect("planned");
        assert_eq!(out.len(), 1);
    }

    #[test]
    fn pages_screens_groups_and_aliases_have_their_columns() {
        let page = plan_record(
            &record(1, json!({"type": "page", "messageId": "p", "name": "Home", "category": "Docs",
                              "properties": {"title": "Welcome", "url": "https://x", "name": "Home"}})),
            &now(),
        )
        .expect("planned");
        assert_eq!(page[0].table, "pages");
        assert_eq!(get(&page[0].row, "name"), Some(&json!("Home")));
        assert_eq!(get(&page[0].row, "category"), Some(&json!("Docs")));
        assert_eq!(get(&page[0].row, "title"), Some(&json!("Welcome")));
        assert_eq!(get(&page[0].row, "_name"), Some(&json!("Home")));
        let screen = plan_record(
            &record(
                2,
                json!({"type": "screen", "messageId": "s", "name": "Login"}),
            ),
            &now(),
        )
        .expect("planned");
        assert_eq!(screen[0].table, "screens");
        assert_eq!(get(&screen[0].row, "name"), Some(&json!("Login")));
        let group = plan_record(
            &record(
                3,
                json!({"type": "group", "messageId": "g", "groupId": "acme",
                              "traits": {"employees": 40}}),
            ),
            &now(),
        )
        .expect("planned");
        assert_eq!(group[0].table, "groups");
        assert_eq!(get(&group[0].row, "group_id"), Some(&json!("acme")));
        assert_eq!(get(&group[0].row, "employees"), Some(&json!(40)));
        let alias = plan_record(
            &record(
                4,
                json!({"type": "alias", "messageId": "al", "userId": "u2",
                              "previousId": "anon-1"}),
            ),
            &now(),
        )
        .expect("planned");
        assert_eq!(alias[0].table, "aliases");
        assert_eq!(get(&alias[0].row, "previous_id"), Some(&json!("anon-1")));
        assert_eq!(get(&alias[0].row, "user_id"), Some(&json!("u2")));
    }

    #[test]
    fn unknown_types_and_bad_payloads_are_skipped() {
        let mut r = record(1, json!({"type": "launch", "messageId": "x"}));
        assert_eq!(
            plan_record(&r, &now()),
            Err(Skip::UnknownType("launch".into()))
        );
        r.payload = "not json".into();
        assert!(matches!(plan_record(&r, &now()), Err(Skip::BadPayload(_))));
        r.payload = "[1]".into();
        assert!(matches!(plan_record(&r, &now()), Err(Skip::BadPayload(_))));
    }

    #[test]
    fn the_borrowed_parse_agrees_with_the_general_one() {
        for payload in [
            r#"{"type":"track","messageId":"m1","event":"E","userId":42,"anonymousId":"",
               "properties":{"a":{"b":[1,{"c":2}]},"d":null,"e":{}},"context":{"ip":"1.2.3.4"},
               "traits":[1],"timestamp":7,"sentAt":null,"extra":{"x":1},"extra":2}"#,
            r#"{"type":"identify","userId":"u","traits":{"plan":"pro","plan":"max","n":1.5},
               "context":"not an object","name":true,"category":"c","groupId":"g","previousId":0}"#,
            r#" {"type":null,"messageId":null,"receivedAt":"2026-11-27T05:10:54.000Z",
               "properties":{"k\u00e9y":"v\n"},"originalTimestamp":"x"}"#,
            "{}",
        ] {
            let borrowed = Msg::parse_borrowed(payload).expect("borrowed parse");
            let general = Msg::parse_general(payload).expect("general parse");
            assert_eq!(borrowed, general, "{payload}");
        }
        // What the borrowed parse does not take goes to the general one.
        for payload in [
            r#"{"type":"track","type":"page"}"#,
            "[1]",
            " x",
            r#"{"a":}"#,
        ] {
            assert!(Msg::parse_borrowed(payload).is_none(), "{payload}");
        }
        assert_eq!(
            Msg::parse(r#"{"type":"track","type":"page"}"#).map(|m| m.call_type),
            Ok(Some(json!("page")))
        );
    }

    #[test]
    fn objects_read_from_text_plan_like_maps() {
        let payloads = [
            // A repeated key: the last value wins, in the first key's place.
            r#"{"type":"track","messageId":"m1","event":"E",
               "properties":{"a":1,"b":{"c":"x","d":[1,{"e":2}]},"a":2,"k\u00e9y":"v","f":{},"g":null}}"#,
            // Keys that snake-case alike: first kept, second reported.
            r#"{"type":"page","messageId":"m2","properties":{"planName":"a","plan_name":"b"},
               "context":{"ip":"1.2.3.4","library":{"name":"n","version":"1"}}}"#,
            r#"{"type":"identify","messageId":"m3","userId":"u","traits":{"x":{"y":{"z":true}},"n":1.5}}"#,
            r#"{"type":"group","messageId":"m4","groupId":"g","traits":{"n":-7},"context":"not an object"}"#,
            // Numbers and strings as `Value` reads them.
            r#"{"type":"track","messageId":"m5","event":"E","properties":{"u":18446744073709551615,
               "i":-9223372036854775808,"f":1.0,"z":-0.0,"e":1e300,"s":"a\"b\n\u00e9","t":true,
               "arr":[[1,2],{"x":null},"y"],"o":{"p":{"q":{}}},"n":null}}"#,
        ];
        for payload in payloads {
            // Each plans (neither way refuses it), and to the same rows both ways.
            let mut r = record(1, json!({}));
            r.payload = payload.into();
            assert!(plan_record(&r, &now()).is_ok(), "{payload}");
            assert!(Msg::parse_general(payload).is_ok(), "{payload}");
            assert_eq!(fuzz_plan_differential(payload), Ok(()), "{payload}");
        }
        let r = record(1, json!({"type": "track", "messageId": "m1", "event": "E"}));
        let mut dup = r.clone();
        dup.payload =
            r#"{"type":"track","messageId":"m1","event":"E","properties":{"a":1,"a":2}}"#.into();
        let out = plan_record(&dup, &now()).expect("planned");
        assert_eq!(get(&out[1].row, "a"), Some(&json!(2)));
        assert!(out[1].row.dropped.is_empty());
    }

    /// JSON text of a value whose objects may repeat keys (which `Value` cannot hold).
    #[derive(Debug, Clone)]
    enum Text {
        Leaf(String),
        Array(Vec<Text>),
        Object(Vec<(String, Text)>),
    }

    impl Text {
        fn render(&self) -> String {
            match self {
                Text::Leaf(s) => s.clone(),
                Text::Array(items) => format!(
                    "[{}]",
                    items.iter().map(Text::render).collect::<Vec<_>>().join(",")
                ),
                Text::Object(entries) => format!(
                    "{{{}}}",
                    entries
                        .iter()
                        .map(|(k, v)| format!("{}:{}", Value::from(k.as_str()), v.render()))
                        .collect::<Vec<_>>()
                        .join(",")
                ),
            }
        }
    }

    fn text() -> impl proptest::strategy::Strategy<Value = Text> {
        use proptest::prelude::*;
        // Few distinct keys, so repeats and snake-case clashes are common.
        let key = prop_oneof![
            Just("a".to_string()),
            Just("planName".to_string()),
            Just("plan_name".to_string()),
            Just("kéy".to_string()),
            Just("id".to_string()),
            Just("event".to_string()),
            "[a-zA-Z _.-]{0,6}",
        ];
        let leaf = prop_oneof![
            Just("null".to_string()),
            any::<bool>().prop_map(|b| b.to_string()),
            any::<i64>().prop_map(|n| n.to_string()),
            any::<u64>().prop_map(|n| n.to_string()),
            any::<f64>()
                .prop_filter("finite", |f| f.is_finite())
                .prop_map(|f| Value::from(f).to_string()),
            Just("-0.0".to_string()),
            Just("1e300".to_string()),
            Just("\"2026-11-27T05:10:54.123+02:00\"".to_string()),
            "\\PC{0,8}".prop_map(|s| Value::from(s).to_string()),
        ]
        .prop_map(Text::Leaf);
        leaf.prop_recursive(4, 32, 5, move |inner| {
            prop_oneof![
                proptest::collection::vec(inner.clone(), 0..4).prop_map(Text::Array),
                proptest::collection::vec((key.clone(), inner), 0..5).prop_map(Text::Object),
            ]
        })
    }

    proptest::proptest! {
        /// The fast path (objects flattened straight from the text) plans every
        /// message exactly as the general parse does, repeated keys included.
        #[test]
        fn the_text_path_plans_like_the_general_parse(
            call in proptest::sample::select(vec!["track", "identify", "page", "screen", "group", "alias"]),
            properties in text(),
            context in text(),
            traits in text(),
            extra in text(),
        ) {
            let payload = format!(
                r#"{{"type":"{call}","messageId":"m1","event":"Order Done","userId":"u1",
                   "name":"n","groupId":"g","previousId":"p","properties":{},"context":{},
                   "traits":{},"extra":{},"timestamp":"2026-11-27T05:10:54.000Z"}}"#,
                properties.render(),
                context.render(),
                traits.render(),
                extra.render()
            );
            // Valid JSON throughout, so the comparison never takes its lenient exit.
            proptest::prop_assert!(Msg::parse_general(&payload).is_ok(), "{}", payload);
            let compared = fuzz_plan_differential(&payload);
            proptest::prop_assert!(compared.is_ok(), "{:?}", compared);
        }
    }

    #[test]
    fn received_at_falls_back_to_the_log_time() {
        let out = plan_record(
            &record(1, json!({"type": "track", "messageId": "m1", "event": "E"})),
            &now(),
        )
        .expect("planned");
        assert_eq!(
            get(&out[0].row, "received_at"),
            Some(&json!("2027-01-15T08:00:00.000Z"))
        );
    }
}
