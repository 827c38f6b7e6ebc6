//! The request and response shapes of the engine's public API, as the admin API
//! serializes them (`/api/v1/destinations…`).
//!
//! Requests deny unknown fields so typos are 400s rather than silently ignored.
//! Views never contain secrets: settings are shown with secrets masked
//! ([`crate::REDACTED`]).

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::config::Start;
use crate::filter::Filters;

/// `POST /destinations` body.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateDestination {
    /// `webhook`, `segment` or `activecampaign`.
    #[serde(rename = "type")]
    pub kind: String,
    /// Display name; also the key honoured in a message's `integrations` object.
    pub name: String,
    /// Sources whose events this destination receives; empty means every source.
    #[serde(default)]
    pub source_ids: Vec<String>,
    /// Type-specific settings (see each type's settings struct).
    #[serde(default = "empty_object")]
    pub settings: Value,
    /// Whether events are delivered (default true).
    #[serde(default = "yes")]
    pub enabled: bool,
    /// Call-type and event-name filters (default: everything).
    #[serde(default)]
    pub filters: Filters,
    /// Where delivery starts: `"now"` (default), `"beginning"` or an RFC 3339 time.
    #[serde(default)]
    pub start: Start,
}

fn empty_object() -> Value {
    Value::Object(Default::default())
}

fn yes() -> bool {
    true
}

/// `PATCH /destinations/{id}` body: every field optional.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PatchDestination {
    /// New name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// New source list (replaces the old one).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source_ids: Option<Vec<String>>,
    /// A JSON merge patch of the settings: given keys replace, `null` removes, a
    /// masked secret (`"********"`) keeps the stored one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub settings: Option<Value>,
    /// Enable or pause delivery. A paused destination keeps its cursor and resumes
    /// where it stopped.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub enabled: Option<bool>,
    /// New filters (replace the old ones).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub filters: Option<Filters>,
}

/// A destination as the admin API shows it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DestinationView {
    /// Stable id (`dst_…`).
    pub id: String,
    /// `webhook`, `segment` or `activecampaign`.
    #[serde(rename = "type")]
    pub kind: String,
    /// Display name.
    pub name: String,
    /// Sources it receives from (empty: every source).
    pub source_ids: Vec<String>,
    /// Settings, secrets masked.
    pub settings: Value,
    /// Filters.
    pub filters: Filters,
    /// Whether delivery runs.
    pub enabled: bool,
    /// Creation time.
    pub created_at: DateTime<Utc>,
    /// Last change of the configuration.
    pub updated_at: DateTime<Utc>,
    /// Delivery statistics.
    pub stats: DestinationStats,
}

/// Delivery statistics of one destination.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct DestinationStats {
    /// Events the receiver accepted (every successful send counts, replays too).
    pub delivered: u64,
    /// Of `delivered`, events that may have been delivered before: they were in
    /// flight when the process died and were sent again after the restart.
    pub redelivered: u64,
    /// Events the type does not take (e.g. an ActiveCampaign call without email).
    pub skipped: u64,
    /// Events waiting for a retry right now.
    pub retrying: u64,
    /// Events being sent right now.
    pub in_flight: u64,
    /// Dead letters kept for this destination.
    pub dead_letters: u64,
    /// Log records after this destination's position (not yet delivered, skipped
    /// or dead-lettered; includes records for other sources).
    pub backlog: u64,
    /// The destination's committed position in the event log.
    pub cursor: u64,
    /// Last time a request succeeded.
    pub last_success_at: Option<DateTime<Utc>>,
    /// The last delivery failure, client-safe (e.g. `receiver answered HTTP 503`).
    pub last_error: Option<String>,
    /// When `last_error` happened.
    pub last_error_at: Option<DateTime<Utc>>,
    /// The newest range of log records this destination never got because they
    /// left the log first (the size cap, or retention while it was disabled);
    /// `null` when none is known.
    #[serde(default)]
    pub gap: Option<GapView>,
    /// Records the log's size cap (`log.max_bytes`) deleted before this destination
    /// read them, in total.
    #[serde(default)]
    pub unconsumed_dropped: u64,
}

/// Log positions a consumer never got: `from..=to`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GapView {
    /// First missing sequence number.
    pub from: u64,
    /// Last missing sequence number (inclusive).
    pub to: u64,
    /// How many records.
    pub records: u64,
    /// When it was found.
    pub at: Option<DateTime<Utc>>,
}

/// An event that could not be delivered.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DeadLetter {
    /// Dead-letter id.
    pub id: i64,
    /// The event's position in the log.
    pub seq: u64,
    /// Its `messageId`.
    pub message_id: String,
    /// The event (normalized Segment JSON).
    pub event: Value,
    /// Sends attempted in total (across replays).
    pub attempts: u32,
    /// HTTP status of the last attempt, when it got one.
    pub last_status: Option<u16>,
    /// First KiB of the last response body.
    pub last_response: Option<String>,
    /// Why it failed, client-safe.
    pub error: String,
    /// When it was first attempted.
    pub first_attempt_at: DateTime<Utc>,
    /// When it became (or last became) a dead letter.
    pub failed_at: DateTime<Utc>,
    /// A replay of it is queued or running.
    pub replaying: bool,
}

/// `POST /destinations/{id}/replay` body: either `{"dead_letters": true}` or
/// `{"from": ts, "to": ts}` (RFC 3339; `to` defaults to now). A range replay
/// re-sends every event of the range the destination's sources and filters take,
/// whether or not it was delivered before.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReplayRequest {
    /// Re-send every dead letter of the destination.
    #[serde(default)]
    pub dead_letters: bool,
    /// Start of the range (inclusive), by the time the log received the event.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from: Option<DateTime<Utc>>,
    /// End of the range (exclusive).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub to: Option<DateTime<Utc>>,
}

/// What a replay request queued.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReplayOutcome {
    /// Events queued for re-sending. They are sent in the background; a replayed
    /// dead letter disappears when delivered and is updated when it fails again.
    pub queued: u64,
}
