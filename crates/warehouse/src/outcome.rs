//! What a backend's load returns: [`LoadError`] (transient or permanent) and
//! [`ApplyStats`], and the loader's consumer name. Shared by `backend`, `sqlite`,
//! `postgres` and `loader` so that no backend imports `backend` (which imports them).

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
