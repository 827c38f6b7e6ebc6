//! Destinations: forwarding every source's events to webhooks, Segment-compatible
//! Tracking APIs and ActiveCampaign.
//!
//! The [`Engine`] owns a SQLite file of its own (destination configurations, dead
//! letters, statistics, delivery markers — in cluster mode the definitions, markers
//! and statistics are in the control database instead, see [`Definitions`] and
//! [`Ledger`]) and runs one worker per enabled
//! destination. Each worker reads the event log from its own cursor
//! (`destination:<id>`), delivers in order per user with bounded concurrency, retries
//! retriable failures with exponential backoff and full jitter, and keeps what can
//! never be delivered as dead letters that can be inspected and replayed.
//!
//! Guarantee: **at-least-once** per destination. A cursor only passes events whose
//! outcome (delivered, skipped by the destination type, or dead letter) is durable,
//! so nothing accepted by the log is lost by a crash; the only duplicates are
//! events that were on the wire at the crash, and they are counted
//! (`stats.redelivered`). Events keep their `messageId`, so receivers that
//! deduplicate (Segment, Tributary) see each event once.
//!
//! Destination types form a closed set ([`DestinationConfig`]), one directory
//! each: [`webhook`], [`segment`], [`activecampaign`].

pub mod activecampaign;
mod api;
mod config;
pub mod definitions;
mod engine;
mod error;
mod filter;
pub mod ledger;
mod options;
pub mod retry;
pub mod segment;
mod sink;
mod store;
pub mod webhook;
mod worker;

pub use activecampaign::ActivecampaignSettings;
pub use api::{
    CreateDestination, DeadLetter, DestinationStats, DestinationView, PatchDestination,
    ReplayOutcome, ReplayRequest,
};
pub use config::{DestinationConfig, REDACTED, Start, TYPES};
pub use definitions::{Definitions, DestinationRow};
pub use engine::{Engine, MAX_DEAD_LETTER_LIMIT};
pub use error::DestinationError;
pub use filter::{CALL_TYPES, Filters};
pub use ledger::{BatchCounts, BatchKey, Ledger, LetterChanges, NewDeadLetter, Recovery, Tally};
pub use options::EngineOptions;
pub use retry::{DeliveryError, FailureKind};
pub use segment::SegmentSettings;
pub use store::ms_to_time;
pub use webhook::WebhookSettings;
