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
//!
//! Layout: `layout` (table kinds and their fixed columns), `names` (interned column
//! and table names), `parse` (the message fields planning reads, borrowed or general),
//! `row` (building one row: common columns, flattening maps, collisions), `text`
//! (flattening an object straight from its JSON text); this module plans a record
//! into rows from those parts.

#[cfg(any(test, feature = "fuzz"))]
mod fuzz;
mod layout;
mod names;
mod parse;
mod row;
#[cfg(test)]
mod tests;
mod text;

use chrono::{DateTime, Utc};
use serde_json::Value;
use std::sync::Arc;
use tributary_eventlog::Record;

use crate::types::format_timestamp;

#[cfg(any(test, feature = "fuzz"))]
pub use fuzz::fuzz_plan_differential;
pub use layout::TableKind;
pub use names::{Name, Names};
use parse::{Msg, id_field, id_owned, text_field, text_owned};
use row::{Base, RowBuilder, leaves};

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
