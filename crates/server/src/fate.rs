//! The fate of one event — "why did my event not arrive?" answered from the stores
//! that know: the event log (stored, at which position), the warehouse (loaded into
//! which tables, what of it went to `tributary_discards`, or still waiting behind
//! the loader's position) and the destination engine (per destination: delivered,
//! retrying with the last answer, dead-lettered with the receiver's answer, pending,
//! filtered out or not subscribed).
//!
//! Read-only, and each part is read from the store that is the truth for it, so the
//! answer is never more optimistic than the stores: "delivered" means the
//! destination's committed cursor is past the event and no dead letter names it
//! (an event a destination type skips, e.g. an ActiveCampaign call without an
//! email, is reported the same way: its cursor passed it). The event is found in
//! the log at any depth through its warehouse row (the `id` key gives its
//! `receivedAt`; the log is read at that millisecond), and, when not loaded yet,
//! among the source's newest [`SCAN`] records.

use std::sync::Arc;

use axum::extract::{Path, State};
use serde::Serialize;
use serde_json::Value;
use tributary_destinations::{DeadLetter, DestinationView, MAX_DEAD_LETTER_LIMIT};
use tributary_eventlog::Record;
use tributary_model::CallType;

use crate::AppState;
use crate::error::{ApiError, Checked};

/// How many of a source's newest events are searched for the messageId.
pub const SCAN: usize = 10_000;

/// Everything known about one event.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Fate {
    /// The source.
    pub source_id: String,
    /// The event's `messageId`.
    pub message_id: String,
    /// Where the log keeps it.
    pub stored: Stored,
    /// What the warehouse did with it.
    pub warehouse: WarehouseFate,
    /// What each destination did with it.
    pub destinations: Vec<DestinationFate>,
    /// The stored event (normalized Segment JSON).
    pub event: Value,
}

/// The event in the log.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Stored {
    /// Its position (sequence number) in the log.
    pub seq: u64,
    /// When the server received it (ISO-8601 UTC).
    pub received_at: String,
    /// `track`, `identify`, …
    #[serde(rename = "type")]
    pub call_type: String,
    /// Track event or page/screen name.
    pub event: Option<String>,
}

/// What the warehouse did with the event.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct WarehouseFate {
    /// `loaded` (in `tables`; `discards` lists values loaded as NULL), `discarded`
    /// (the row was refused and kept in `tributary_discards`), `pending` (after the
    /// loader's position), `not_loaded` (the loader passed it without a row: see
    /// `detail`) or `off` (no warehouse configured).
    pub state: &'static str,
    /// The source's schema.
    pub schema: Option<String>,
    /// Tables holding the event's row.
    pub tables: Vec<String>,
    /// Values of the event the warehouse could not cast (loaded as NULL) or the
    /// whole record when the row was refused.
    pub discards: Vec<tributary_warehouse::report::Discard>,
    /// The last log position the loader committed.
    pub loaded_seq: Option<u64>,
    /// A sentence for the user.
    pub detail: String,
}

/// What one destination did with the event.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct DestinationFate {
    /// Destination id.
    pub id: String,
    /// Its name.
    pub name: String,
    /// `webhook`, `segment` or `activecampaign`.
    #[serde(rename = "type")]
    pub kind: String,
    /// `delivered`, `retrying`, `dead_lettered`, `pending`, `paused` (disabled and
    /// not yet past it), `filtered` (its filters leave the event out) or
    /// `not_subscribed` (it does not take this source).
    pub state: &'static str,
    /// The destination's committed log position.
    pub cursor: u64,
    /// The last delivery failure of the destination (retrying) or of this event
    /// (dead-lettered), client-safe.
    pub last_error: Option<String>,
    /// The receiver's HTTP status (dead-lettered).
    pub last_status: Option<u16>,
    /// The first KiB of the receiver's answer (dead-lettered).
    pub last_response: Option<String>,
    /// Send attempts (dead-lettered).
    pub attempts: Option<u32>,
    /// A sentence for the user.
    pub detail: String,
}

/// Finds the event in the log: by its warehouse row (the `id` key gives its
/// `receivedAt`, and the log looks it up at that millisecond), so an event at any depth
/// is found; else (not loaded yet, or no warehouse) among the source's newest
/// [`SCAN`] records, where pending events are.
async fn find_record(
    state: &AppState,
    source: &crate::control::Source,
    message_id: &str,
) -> Result<Record, ApiError> {
    let matches = |r: &Record| r.source_id == source.id && r.message_id == message_id;
    if let Some(w) = state.warehouse.as_ref()
        && let Some(at) = w.received_at_of(&source.schema, message_id).await?
    {
        let found = state
            .log
            .find_at(&source.id, message_id, at.timestamp_millis())
            .await?;
        if let Some(r) = found {
            return Ok(r);
        }
    }
    let records = state.log.latest(&source.id, SCAN).await?;
    records.into_iter().find(matches).ok_or_else(|| {
        ApiError::NotFound(format!(
            "no event with messageId {message_id:?} in this source: not in the warehouse nor among its newest {SCAN} log records (it was never accepted, or has left the log)"
        ))
    })
}

/// The warehouse tables an event's row goes to.
fn tables_for(r: &Record) -> Vec<String> {
    match r.call_type {
        CallType::Track => {
            let mut t = Vec::new();
            if let Some(e) = r.event.as_deref().filter(|e| !e.is_empty()) {
                t.push(tributary_warehouse::naming::event_table(e));
            }
            t.push("tracks".into());
            t
        }
        CallType::Identify => vec!["identifies".into()],
        CallType::Page => vec!["pages".into()],
        CallType::Screen => vec!["screens".into()],
        CallType::Group => vec!["groups".into()],
        CallType::Alias => vec!["aliases".into()],
    }
}

async fn warehouse_fate(
    state: &AppState,
    schema: &str,
    r: &Record,
) -> Result<WarehouseFate, ApiError> {
    let Some(w) = state.warehouse.as_ref() else {
        return Ok(WarehouseFate {
            state: "off",
            schema: Some(schema.into()),
            tables: Vec::new(),
            discards: Vec::new(),
            loaded_seq: None,
            detail: "the warehouse is off (TRIBUTARY_WAREHOUSE=off)".into(),
        });
    };
    let lag = w.lag();
    let presence = w
        .row_presence(schema, &tables_for(r), &r.message_id)
        .await?;
    let (st, detail) = if !presence.tables.is_empty() {
        let d = if presence.discards.is_empty() {
            format!("loaded into {}", qualified(schema, &presence.tables))
        } else {
            format!(
                "loaded into {}; {} value(s) could not be cast and were loaded as NULL (see {schema}.tributary_discards)",
                qualified(schema, &presence.tables),
                presence.discards.len()
            )
        };
        ("loaded", d)
    } else if !presence.discards.is_empty() {
        (
            "discarded",
            format!("the warehouse refused the row; it is kept in {schema}.tributary_discards"),
        )
    } else if r.seq > lag.loaded_seq {
        (
            "pending",
            format!(
                "waiting to be loaded: the loader is at log position {} and this event is at {}",
                lag.loaded_seq, r.seq
            ),
        )
    } else {
        (
            "not_loaded",
            "the loader passed this event without a row (its source had no schema then, or the row was removed from the warehouse)".to_string(),
        )
    };
    Ok(WarehouseFate {
        state: st,
        schema: Some(schema.into()),
        tables: presence.tables,
        discards: presence.discards,
        loaded_seq: Some(lag.loaded_seq),
        detail,
    })
}

fn qualified(schema: &str, tables: &[String]) -> String {
    tables
        .iter()
        .map(|t| format!("{schema}.{t}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Whether the destination's filters leave the event out.
fn filtered_out(d: &DestinationView, r: &Record) -> bool {
    let f = &d.filters;
    if !f.call_types.is_empty() && !f.call_types.iter().any(|t| t == r.call_type.as_str()) {
        return true;
    }
    if r.call_type == CallType::Track {
        let ev = r.event.as_deref().unwrap_or("");
        if f.deny_events.iter().any(|e| e == ev) {
            return true;
        }
        if !f.allow_events.is_empty() && !f.allow_events.iter().any(|e| e == ev) {
            return true;
        }
    }
    false
}

fn destination_fate(d: &DestinationView, r: &Record, dead: Option<&DeadLetter>) -> DestinationFate {
    let mut out = DestinationFate {
        id: d.id.clone(),
        name: d.name.clone(),
        kind: d.kind.clone(),
        state: "pending",
        cursor: d.stats.cursor,
        last_error: None,
        last_status: None,
        last_response: None,
        attempts: None,
        detail: String::new(),
    };
    if !d.source_ids.is_empty() && !d.source_ids.contains(&r.source_id) {
        out.state = "not_subscribed";
        out.detail = "this destination does not take events of this source".into();
    } else if filtered_out(d, r) {
        out.state = "filtered";
        out.detail = "this destination's filters leave this event out".into();
    } else if let Some(dl) = dead {
        out.state = "dead_lettered";
        out.last_error = Some(dl.error.clone());
        out.last_status = dl.last_status;
        out.last_response = dl.last_response.clone();
        out.attempts = Some(dl.attempts);
        out.detail = match dl.last_status {
            Some(s) => format!(
                "gave up after {} attempt(s): the receiver answered HTTP {s}; replay it from the destination's dead letters",
                dl.attempts
            ),
            None => format!(
                "gave up after {} attempt(s): {}; replay it from the destination's dead letters",
                dl.attempts, dl.error
            ),
        };
    } else if r.seq <= d.stats.cursor {
        out.state = "delivered";
        out.detail = "the destination took this event (its position is past it)".into();
    } else if !d.enabled {
        out.state = "paused";
        out.detail =
            "the destination is disabled; it resumes from its position when enabled".into();
    } else if d.stats.retrying > 0 && d.stats.last_error.is_some() {
        out.state = "retrying";
        out.last_error = d.stats.last_error.clone();
        out.detail = format!(
            "the destination is retrying ({} event(s) waiting for a retry); last answer: {}",
            d.stats.retrying,
            d.stats.last_error.as_deref().unwrap_or("")
        );
    } else {
        out.state = "pending";
        out.detail = format!(
            "not sent yet: the destination is at log position {} and this event is at {}",
            d.stats.cursor, r.seq
        );
    }
    out
}

/// The fate of the event `message_id` of a source.
pub async fn fate(state: &AppState, source_id: &str, message_id: &str) -> Result<Fate, ApiError> {
    let source = state
        .control
        .source(source_id)
        .ok_or_else(|| ApiError::NotFound(format!("no source with id {source_id:?}")))?;
    if message_id.is_empty() || message_id.chars().count() > 100 {
        return Err(ApiError::bad(
            "invalid_message_id",
            "a messageId is 1 to 100 characters",
        ));
    }
    let record = find_record(state, &source, message_id).await?;
    let warehouse = warehouse_fate(state, &source.schema, &record).await?;
    let mut destinations = Vec::new();
    for d in state.destinations.list().await? {
        let subscribed = d.source_ids.is_empty() || d.source_ids.contains(&record.source_id);
        let dead = if subscribed && d.stats.dead_letters > 0 {
            state
                .destinations
                .dead_letters(&d.id, MAX_DEAD_LETTER_LIMIT)
                .await?
                .into_iter()
                .find(|dl| dl.seq == record.seq || dl.message_id == record.message_id)
        } else {
            None
        };
        destinations.push(destination_fate(&d, &record, dead.as_ref()));
    }
    let received_at = chrono::DateTime::from_timestamp_millis(record.received_at_ms)
        .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true))
        .unwrap_or_default();
    Ok(Fate {
        source_id: source.id.clone(),
        message_id: record.message_id.clone(),
        stored: Stored {
            seq: record.seq,
            received_at,
            call_type: record.call_type.as_str().to_string(),
            event: record.event.clone(),
        },
        warehouse,
        destinations,
        event: serde_json::from_str(&record.payload).unwrap_or(Value::Null),
    })
}

/// `GET /api/v1/sources/{id}/events/{message_id}`.
pub async fn fate_route(
    State(state): State<Arc<AppState>>,
    Checked(Path((id, message_id))): Checked<Path<(String, String)>>,
) -> Result<axum::Json<Fate>, ApiError> {
    Ok(axum::Json(fate(&state, &id, &message_id).await?))
}
