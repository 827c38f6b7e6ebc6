//! The event log: the durable, ordered record of every accepted message.
//!
//! Ingest appends normalized messages here and answers HTTP 200 only after
//! [`EventLog::append`] has returned `Ok` — at that point the batch is on disk
//! (fsync'd). Consumers (the warehouse loader, each destination) read the log in
//! sequence order from their own [`Position`] and commit it when they are done with a
//! prefix, so a crash replays at most what was not yet committed.
//!
//! **Positions name their log.** Every log has a random id fixed when it is created
//! ([`EventLog::log_id`]); a [`Position`] is `(log id, partition, seq)`, so a consumer
//! that keeps its position elsewhere (the warehouse keeps it in its own transaction)
//! can tell a log it has never seen from one it has loaded: a new data dir beside an
//! old warehouse starts from its beginning instead of below an old log's position.
//! The embedded log has one partition (0); a partitioned log (JetStream) numbers its
//! sequences per partition.
//!
//! **Consumers bound retention.** Consumers commit their positions to the log
//! ([`EventLog::commit`]); that registry is what retention reads: pruning by age never
//! deletes a record above the lowest committed position of a *pinned* consumer. A
//! consumer that should not hold records back (a disabled destination) is unpinned
//! ([`EventLog::unpin`]) and pins again with its next commit; a deleted one is removed
//! ([`EventLog::remove_consumer`]). Only a hard size cap may delete records a pinned
//! consumer has not read, and then the log says so: an error line,
//! `tributary_log_unconsumed_dropped_total{consumer}` and the gap in
//! [`ConsumerState::gap`].
//!
//! **Gaps are never skipped silently.** [`read_checked`] reads after a position and
//! reports the positions that are gone ([`Gap`]) when the log's first retained
//! record is past the one the consumer expected next.
//!
//! Invariants every implementation keeps:
//! - `seq` is assigned by the log, strictly increasing within a partition, never
//!   reused; records leave a partition only as a prefix (oldest first).
//! - A message whose `(source_id, message_id)` is already in the log within the
//!   dedupe window is acknowledged but not stored again ([`AppendStatus::Duplicate`]).
//! - `append` either makes the whole batch durable or returns an error and
//!   stores none of it.

mod config;
mod dedupe;
#[cfg(feature = "jetstream")]
pub mod jetstream;
pub mod memory;
#[cfg(feature = "bench")]
pub mod null;
pub mod ownership;
pub mod partition;
pub mod sqlite;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};

pub use tributary_model::CallType;

pub use config::LogConfig;
#[cfg(feature = "jetstream")]
pub use jetstream::JetStreamLog;
pub use memory::MemoryRegistry;
#[cfg(feature = "bench")]
pub use null::NullLog;
pub use ownership::{ConsumerRegistry, Lease, Ownership, Sole};
pub use partition::{PartitionDedupe, partition_of};
pub use sqlite::{SqliteLog, SqliteLogConfig};

/// A message to append: already validated and normalized by ingest.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NewRecord {
    /// The source (by id) the message arrived on.
    pub source_id: String,
    /// Segment `messageId` (≤ 100 chars), the dedupe key within a source.
    pub message_id: String,
    /// Call type.
    #[serde(with = "call_type_name")]
    pub call_type: CallType,
    /// Track event name or page/screen name, when there is one.
    pub event: Option<String>,
    /// `userId`, when the message has one.
    pub user_id: Option<String>,
    /// `anonymousId`, when the message has one.
    pub anonymous_id: Option<String>,
    /// `receivedAt` in milliseconds since the Unix epoch.
    pub received_at_ms: i64,
    /// The normalized Segment JSON of the message.
    pub payload: String,
}

/// A message as stored in the log.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Record {
    /// Position in the log; strictly increasing within its partition.
    pub seq: u64,
    /// The partition the record is in (0 in the embedded log).
    #[serde(default)]
    pub partition: u32,
    /// The source (by id) the message arrived on.
    pub source_id: String,
    /// Segment `messageId`.
    pub message_id: String,
    /// Call type.
    #[serde(with = "call_type_name")]
    pub call_type: CallType,
    /// Track event name or page/screen name.
    pub event: Option<String>,
    /// `userId`, when the message has one.
    pub user_id: Option<String>,
    /// `anonymousId`, when the message has one.
    pub anonymous_id: Option<String>,
    /// `receivedAt` in milliseconds since the Unix epoch.
    pub received_at_ms: i64,
    /// The normalized Segment JSON of the message.
    pub payload: String,
}

impl Record {
    /// This record's position in its partition of log `log_id`.
    pub fn position_in(&self, log_id: &str) -> Position {
        Position::new(log_id, self.partition, self.seq)
    }
}

/// Where a consumer is in a log: everything up to and including `seq` of
/// `partition` in log `log_id` has been processed. `seq` 0 is the beginning.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Position {
    /// The id of the log ([`EventLog::log_id`]), fixed when it was created.
    pub log_id: String,
    /// The partition (always 0 for the embedded log).
    pub partition: u32,
    /// The last sequence number processed in that partition (0: none).
    pub seq: u64,
}

impl Position {
    /// A position in a log.
    pub fn new(log_id: impl Into<String>, partition: u32, seq: u64) -> Position {
        Position {
            log_id: log_id.into(),
            partition,
            seq,
        }
    }

    /// The same log and partition at another sequence number.
    pub fn at(&self, seq: u64) -> Position {
        Position {
            log_id: self.log_id.clone(),
            partition: self.partition,
            seq,
        }
    }
}

impl std::fmt::Display for Position {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}@{}", self.log_id, self.partition, self.seq)
    }
}

/// Positions a consumer expected that are no longer in the log: sequence numbers
/// `from..=to` of `partition`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Gap {
    /// The partition.
    pub partition: u32,
    /// First missing sequence number.
    pub from: u64,
    /// Last missing sequence number (inclusive).
    pub to: u64,
}

impl Gap {
    /// How many positions are missing.
    pub fn len(&self) -> u64 {
        self.to.saturating_sub(self.from) + 1
    }

    /// Never true: a gap has at least one position (here for clippy's sake).
    pub fn is_empty(&self) -> bool {
        false
    }
}

/// A consumer as the log's registry knows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConsumerState {
    /// Its name (`warehouse`, `destination:<id>`).
    pub name: String,
    /// Its committed position.
    pub position: Position,
    /// Whether it holds records back from retention.
    pub pinned: bool,
    /// Records it had not read that the size cap (`max_bytes`) deleted, in total.
    pub dropped: u64,
    /// The newest range the size cap deleted before this consumer read it.
    pub gap: Option<Gap>,
    /// When that happened (ms since the Unix epoch).
    pub gap_at_ms: Option<i64>,
}

impl ConsumerState {
    /// The entries of consumer `name` (one per partition in a partitioned log) as
    /// one: the lowest position, pinned if any entry is, the losses summed and the
    /// newest gap. `None` when the consumer has no entry.
    pub fn merged(entries: Vec<ConsumerState>, name: &str) -> Option<ConsumerState> {
        entries
            .into_iter()
            .filter(|c| c.name == name)
            .reduce(|mut a, b| {
                if b.position.seq < a.position.seq {
                    a.position = b.position.clone();
                }
                a.pinned |= b.pinned;
                a.dropped += b.dropped;
                if b.gap.is_some() && b.gap_at_ms.unwrap_or(0) >= a.gap_at_ms.unwrap_or(0) {
                    a.gap = b.gap;
                    a.gap_at_ms = b.gap_at_ms;
                }
                a
            })
    }
}

/// What [`read_checked`] found after a position.
#[derive(Debug, Clone, PartialEq)]
pub struct ReadOutcome {
    /// Up to `limit` records after the position, in sequence order.
    pub records: Vec<Record>,
    /// Positions between the one asked for and the first record returned that the
    /// log no longer has (deleted by retention or the size cap before this read).
    pub gap: Option<Gap>,
}

/// Reads up to `limit` records after `after` and reports a [`Gap`] when records the
/// consumer expected next are gone: the first retained sequence number of the
/// partition is past `after.seq + 1`. Costs one more (index) lookup only when the
/// first record returned is not the next one expected.
pub async fn read_checked(
    log: &dyn EventLog,
    after: &Position,
    limit: usize,
) -> Result<ReadOutcome, LogError> {
    if !log.dense() {
        return log.read_checked_sparse(after, limit).await;
    }
    let records = log.read(after, limit).await?;
    let expected = after.seq + 1;
    let caught_up = records.is_empty() && *log.subscribe().borrow() <= after.seq;
    if caught_up || records.first().is_some_and(|r| r.seq == expected) {
        return Ok(ReadOutcome { records, gap: None });
    }
    // Retained records form a suffix of the partition: everything below the first
    // retained one (asked for after the read, so it covers any prune since) is gone.
    let first = log.first_retained(after.partition).await?;
    let end = records.first().map_or(first, |r| r.seq.min(first));
    let gap = (end > expected).then(|| Gap {
        partition: after.partition,
        from: expected,
        to: end - 1,
    });
    Ok(ReadOutcome { records, gap })
}

/// Serde for [`CallType`] as its wire name.
mod call_type_name {
    use serde::{Deserialize, Deserializer, Serializer};
    use tributary_model::CallType;

    pub fn serialize<S: Serializer>(t: &CallType, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(t.as_str())
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<CallType, D::Error> {
        let name = String::deserialize(d)?;
        CallType::parse(&name)
            .ok_or_else(|| serde::de::Error::custom(format!("unknown call type {name:?}")))
    }
}

/// The no-op log of the bench harness (`TRIBUTARY_BENCH_NULL_LOG=1`), when this build
/// has the `bench` feature (the bench crate enables it; `cargo build -p tributary`
/// alone does not), else `None`.
pub fn bench_log() -> Option<std::sync::Arc<dyn EventLog>> {
    #[cfg(feature = "bench")]
    {
        Some(std::sync::Arc::new(NullLog::default()))
    }
    #[cfg(not(feature = "bench"))]
    {
        None
    }
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
    /// A position of another log (or a partition this log does not have) was given.
    #[error("position {0} does not belong to this event log")]
    ForeignPosition(String),
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
    /// Records the size cap (`max_bytes`) deleted before a pinned consumer read them,
    /// since the log was opened.
    pub unconsumed_dropped: u64,
}

/// The durable event log. Implementations: [`SqliteLog`] (embedded) and, later,
/// JetStream (cluster).
#[async_trait]
pub trait EventLog: Send + Sync + 'static {
    /// The log's id: random, fixed when the log was created, kept with its data.
    fn log_id(&self) -> &str;

    /// How many partitions the log has (sequence numbers are per partition).
    fn partitions(&self) -> u32 {
        1
    }

    /// The beginning of `partition` (nothing processed yet).
    fn start(&self, partition: u32) -> Position {
        Position::new(self.log_id(), partition, 0)
    }

    /// Appends a batch and returns once it is durable, one status per record in
    /// input order. Either all new records are stored or none is.
    async fn append(&self, batch: Vec<NewRecord>) -> Result<Vec<AppendStatus>, LogError>;

    /// Reads up to `limit` records after `after`, in sequence order.
    /// [`LogError::ForeignPosition`] when `after` names another log. Consumers use
    /// [`read_checked`], which also reports gaps.
    async fn read(&self, after: &Position, limit: usize) -> Result<Vec<Record>, LogError>;

    /// The lowest sequence number still retained in `partition`; the head + 1 when
    /// the partition is empty.
    async fn first_retained(&self, partition: u32) -> Result<u64, LogError>;

    /// Reads the newest `limit` records of one source, newest first (debugger).
    async fn latest(&self, source_id: &str, limit: usize) -> Result<Vec<Record>, LogError>;

    /// The record of `message_id` of a source that was received at `received_at_ms`
    /// (the debugger's fate, which learns the time from the event's warehouse row),
    /// if the log still has it. The default reads that millisecond's records.
    async fn find_at(
        &self,
        source_id: &str,
        message_id: &str,
        received_at_ms: i64,
    ) -> Result<Option<Record>, LogError> {
        let around = self
            .read_range(received_at_ms, received_at_ms + 1, 0, 100_000)
            .await?;
        Ok(around
            .into_iter()
            .find(|r| r.source_id == source_id && r.message_id == message_id))
    }

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

    /// The committed position of a named consumer in `partition` (the beginning
    /// when it never committed).
    async fn cursor(&self, consumer: &str, partition: u32) -> Result<Position, LogError>;

    /// Durably records that `consumer` has processed everything up to `position`,
    /// and pins it: retention keeps every record after its position.
    async fn commit(&self, consumer: &str, position: &Position) -> Result<(), LogError>;

    /// Keeps `consumer`'s position but stops it from holding records back (a
    /// disabled destination); its next [`EventLog::commit`] pins it again.
    async fn unpin(&self, consumer: &str) -> Result<(), LogError>;

    /// Forgets `consumer` (a deleted destination).
    async fn remove_consumer(&self, consumer: &str) -> Result<(), LogError>;

    /// Every registered consumer.
    async fn consumers(&self) -> Result<Vec<ConsumerState>, LogError>;

    /// A receiver that changes whenever new records are appended; its value is the
    /// head sequence number. Consumers wait on it instead of polling.
    fn subscribe(&self) -> tokio::sync::watch::Receiver<u64>;

    /// Current head, record count and size.
    async fn stats(&self) -> Result<LogStats, LogError>;

    /// Flushes and stops accepting appends; pending appends complete first.
    async fn close(&self);

    /// Whether sequence numbers are dense within a partition (every number from the
    /// first retained to the head is a record of that partition). True for the
    /// embedded log; false for JetStream, whose numbers are the stream's, shared by
    /// all partitions. [`read_checked`] detects gaps by density when true and asks
    /// [`EventLog::read_checked_sparse`] when false.
    fn dense(&self) -> bool {
        true
    }

    /// [`read_checked`] for a log whose sequence numbers are not dense per
    /// partition. Only called when [`EventLog::dense`] is false; the default reads
    /// without gap detection.
    async fn read_checked_sparse(
        &self,
        after: &Position,
        limit: usize,
    ) -> Result<ReadOutcome, LogError> {
        Ok(ReadOutcome {
            records: self.read(after, limit).await?,
            gap: None,
        })
    }

    /// Commits `position` for `consumer` under lease `epoch` (fencing): `Ok(false)`,
    /// and nothing stored, when a higher epoch already committed for that partition
    /// — the caller lost its lease and must stop. The embedded log has no leases:
    /// it commits as [`EventLog::commit`] and returns true.
    async fn commit_fenced(
        &self,
        consumer: &str,
        position: &Position,
        epoch: u64,
    ) -> Result<bool, LogError> {
        let _ = epoch;
        self.commit(consumer, position).await?;
        Ok(true)
    }

    /// Whether this log is reachable right now (`/ready`); the embedded log always is.
    async fn healthy(&self) -> Result<(), LogError> {
        Ok(())
    }
}
