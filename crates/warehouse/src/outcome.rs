//! What a backend's load returns: [`LoadError`] and [`ApplyStats`], the loader's
//! consumer name and the key and claim of its position ([`StateKey`], [`Claim`]). Shared by `backend`, `sqlite`, `postgres` and `loader` so that no
//! backend imports `backend` (which imports them).
//!
//! The four classes of failure decide what the loader does (module `loader`):
//! transient → retry the same records with backoff; too large → split the batch (a
//! single record that is still too large is retried as transient); permanent → split
//! down to the refused record and record it in `tributary_discards`; configuration →
//! will not heal by retrying soon (unknown database, authentication, privileges): the
//! warehouse reports the error and retries about once a minute. Messages carry the
//! warehouse's own text (PostgreSQL's message, SQLSTATE and hint).

/// Name of the loader's position in the warehouse state tables and in the log.
pub(crate) const CONSUMER: &str = "warehouse";

/// Which log (and partition) a loader position belongs to. The warehouse keeps one
/// position per `(consumer, log id, partition)`, so a second log loading into the same
/// warehouse (a new data dir beside an old PostgreSQL) starts from its own beginning.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub(crate) struct StateKey {
    /// The log's id (empty only for a row written before positions named their log).
    pub log_id: String,
    /// The log partition.
    pub partition: u32,
}

impl StateKey {
    /// The `consumer` value of this key in the SQLite state tables (which key by one
    /// text column): `warehouse@<log id>/<partition>`. A row written before
    /// positions named their log is plain `warehouse`.
    pub(crate) fn sqlite_consumer(&self) -> String {
        format!("{CONSUMER}@{}/{}", self.log_id, self.partition)
    }
}

/// The lease a loader commits under (cluster mode): the position row it writes and
/// its epoch. A backend refuses (rolls back) a commit whose epoch is lower than the
/// one recorded for that row, inside the load transaction, so a loader that lost its
/// lease — a stalled node waking up — commits nothing once the new owner claimed it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Fence {
    /// The position row (log and partition).
    pub key: StateKey,
    /// The lease's epoch.
    pub epoch: u64,
}

/// What a backend needs at start to find (or adopt) the loader's position.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Claim {
    /// The log this loader reads.
    pub key: StateKey,
    /// The log's head sequence number.
    pub head: u64,
    /// The log's own copy of the warehouse position (written after every commit).
    pub hint: u64,
    /// The lease epoch this loader holds (cluster mode): recorded on the position
    /// row at init so older holders are fenced from then on; init fails with
    /// [`LoadError::Fenced`] when a newer epoch is already recorded.
    pub epoch: Option<u64>,
}

impl Claim {
    /// Whether a position row written before positions named their log (seq
    /// `legacy`) was written by this log. The log keeps its own copy of the position,
    /// written after each warehouse commit, so the log that wrote the row has a copy
    /// at most one batch behind it: it is adopted when `0 < hint ≤ legacy ≤ head`. A
    /// new log (no copy, or a head below the row) never adopts it and loads from its
    /// beginning instead — duplicates of records the old log had loaded are then
    /// stopped by the `id` key.
    pub(crate) fn adopts_legacy(&self, legacy: u64) -> bool {
        self.hint > 0 && self.hint <= legacy && legacy <= self.head
    }
}

/// Why a load failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum LoadError {
    /// The warehouse is unreachable, busy, full or restarting: retry later.
    #[error("transient: {0}")]
    Transient(String),
    /// The warehouse refused the data or the statement: retrying will not help.
    #[error("permanent: {0}")]
    Permanent(String),
    /// The batch as a whole exceeds a warehouse resource (PostgreSQL's lock table,
    /// `53200 out of shared memory`): smaller batches will load.
    #[error("batch too large: {0}")]
    TooLarge(String),
    /// The warehouse configuration is wrong (unknown database, authentication,
    /// privileges): retrying soon will not help; it heals when an operator fixes it.
    #[error("configuration: {0}")]
    Config(String),
    /// A newer lease holder has committed this partition: this loader must stop.
    #[error("fenced: {0}")]
    Fenced(String),
}

impl LoadError {
    /// The same class with `context` before the message.
    pub(crate) fn context(self, context: &str) -> LoadError {
        let with = |m: String| format!("{context}{m}");
        match self {
            LoadError::Transient(m) => LoadError::Transient(with(m)),
            LoadError::Permanent(m) => LoadError::Permanent(with(m)),
            LoadError::TooLarge(m) => LoadError::TooLarge(with(m)),
            LoadError::Config(m) => LoadError::Config(with(m)),
            LoadError::Fenced(m) => LoadError::Fenced(with(m)),
        }
    }
}

/// What a committed batch did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct ApplyStats {
    /// Rows inserted (or upserted into `users`).
    pub rows: u64,
    /// Discards recorded.
    pub discards: u64,
    /// The batch had been committed before (position already past it).
    pub already_loaded: bool,
    /// Refused and rolled back: a newer lease epoch owns the position.
    pub fenced: bool,
}
