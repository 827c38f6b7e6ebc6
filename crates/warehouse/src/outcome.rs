//! What a backend's load returns: [`LoadError`] and [`ApplyStats`], and the loader's
//! consumer name. Shared by `backend`, `sqlite`, `postgres` and `loader` so that no
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
}
