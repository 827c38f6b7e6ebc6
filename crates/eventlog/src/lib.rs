//! The event log: the durable, ordered record of every accepted message.
//!
//! Ingest appends normalized messages here and answers HTTP 200 only after
//! [`EventLog::append`] has returned `Ok` — at that point the batch is on disk
//! (fsync'd). Consumers (the warehouse loader, each destination) read the log in
//! sequence order from their own cursor and commit the cursor when they are
//! done with a prefix, so a crash replays at most what was not yet committed.
//!
//! Invariants every implementation keeps:
//! - `seq` is assigned by the log, strictly increasing, never reused.
//! - A message whose `(source_id, message_id)` is already in the log within the
//!   dedupe window is acknowledged but not stored again ([`AppendStatus::Duplicate`]).
//! - `append` either makes the whole batch durable or returns an error and
//!   stores none of it.

mod dedupe;
pub mod null;
pub mod sqlite;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};

pub use null::NullLog;
pub use sqlite::{SqliteLog, SqliteLogConfig};

/// A message to append: already validated and normalized by ingest.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NewRecord {
    /// The source (by id) the message arrived on.
    pub source_id: String,
    /// Segment `messageId` (≤ 100 chars), the dedupe key within a source.
    pub message_id: String,
    /// Call type: `track`, `identify`, `page`, `screen`, `group` or `alias`.
    pub call_type: String,
    /// Track event name or page/screen name, when there is one.
    pub event: Option<String>,
    /// `receivedAt` in milliseconds since the Unix epoch.
    pub received_at_ms: i64,
    /// The normalized Segment JSON of the message.
    pub payload: String,
}

/// A message as stored in the log.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Record {
    /// Position in the log; strictly increasing.
    pub seq: u64,
    /// The source (by id) the message arrived on.
    pub source_id: String,
    /// Segment `messageId`.
    pub message_id: String,
    /// Call type.
    pub call_type: String,
    /// Track event name or page/screen name.
    pub event: Option<String>,
    /// `receivedAt` in milliseconds since the Unix epoch.
    pub received_at_ms: i64,
    /// The normalized Segment JSON of the message.
    pub payload: String,
}

/// What happened to one message of an appended batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AppendStatus {
    /// Stored at this sequence number.
    Stored(u64),
    /// Already in the log within the dedupe window; acknowledged, not stored again.
    Duplicate,
}

/// Why the log could not take or serve a request.
#[derive(Debug, thiserror::Error)]
pub enum LogError {
    /// Too many appends are waiting; the caller should answer 429.
    #[error("event log is saturated")]
    Saturated,
    /// The log cannot write (disk full, I/O error); the caller should answer 503.
    #[error("event log unavailable: {0}")]
    Unavailable(String),
    /// The log has been shut down.
    #[error("event log is closed")]
    Closed,
}

/// Sizes and counts for `/metrics` and status pages.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct LogStats {
    /// Highest sequence number assigned so far (0 when empty).
    pub head: u64,
    /// Number of records retained.
    pub records: u64,
    /// Bytes on disk used by the log.
    pub bytes: u64,
}

/// The durable event log. Implementations: [`SqliteLog`] (embedded) and, later,
/// JetStream (cluster).
#[async_trait]
pub trait EventLog: Send + Sync + 'static {
    /// Appends a batch and returns once it is durable, one status per record in
    /// input order. Either all new records are stored or none is.
    async fn append(&self, batch: Vec<NewRecord>) -> Result<Vec<AppendStatus>, LogError>;

    /// Reads up to `limit` records with `seq > after`, in sequence order.
    async fn read(&self, after: u64, limit: usize) -> Result<Vec<Record>, LogError>;

    /// Reads the newest `limit` records of one source, newest first (debugger).
    async fn latest(&self, source_id: &str, limit: usize) -> Result<Vec<Record>, LogError>;

    /// Reads records of the given sources received in `[from_ms, to_ms)`, in
    /// sequence order, starting after `after` (replay).
    async fn read_range(
        &self,
        from_ms: i64,
        to_ms: i64,
        after: u64,
        limit: usize,
    ) -> Result<Vec<Record>, LogError>;

    /// Reads specific records by sequence number (dead-letter replay).
    async fn get(&self, seqs: &[u64]) -> Result<Vec<Record>, LogError>;

    /// The committed cursor of a named consumer (0 when it never committed).
    async fn cursor(&self, consumer: &str) -> Result<u64, LogError>;

    /// Durably records that `consumer` has processed everything up to `seq`.
    async fn commit(&self, consumer: &str, seq: u64) -> Result<(), LogError>;

    /// A receiver that changes whenever new records are appended; its value is the
    /// head sequence number. Consumers wait on it instead of polling.
    fn subscribe(&self) -> tokio::sync::watch::Receiver<u64>;

    /// Current head, record count and size.
    async fn stats(&self) -> Result<LogStats, LogError>;

    /// Flushes and stops accepting appends; pending appends complete first.
    async fn close(&self);
}
