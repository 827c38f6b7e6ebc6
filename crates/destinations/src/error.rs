//! The error the engine's public API returns, and how it maps to HTTP.
//!
//! Invariant: only [`DestinationError::Invalid`] carries text meant for clients
//! (it explains what is wrong with their request). Internal failures keep their
//! detail for logs only; their `Display` is a fixed phrase so nothing about files,
//! SQL or peers leaks into an API response.

use tributary_eventlog::LogError;

/// Why an engine call failed.
#[derive(Debug, thiserror::Error)]
pub enum DestinationError {
    /// The request is wrong (bad settings, unknown type, bad replay range): 400.
    /// The message is safe to show to the client.
    #[error("{0}")]
    Invalid(String),
    /// No destination has this id: 404.
    #[error("destination not found")]
    NotFound,
    /// The engine has been shut down: 503.
    #[error("destination engine is shut down")]
    Closed,
    /// The event log could not serve the request: 503. Detail is for logs only.
    #[error("event log unavailable")]
    Log(#[source] LogError),
    /// Anything else (store I/O, a bug): 500. Detail is for logs only.
    #[error("internal destination error")]
    Internal(String),
}

impl DestinationError {
    /// The HTTP status the admin API should answer with.
    pub fn status_code(&self) -> u16 {
        match self {
            DestinationError::Invalid(_) => 400,
            DestinationError::NotFound => 404,
            DestinationError::Closed | DestinationError::Log(_) => 503,
            DestinationError::Internal(_) => 500,
        }
    }

    /// A stable machine-readable code for `{"code": …}` bodies.
    pub fn code(&self) -> &'static str {
        match self {
            DestinationError::Invalid(_) => "invalid_destination",
            DestinationError::NotFound => "not_found",
            DestinationError::Closed => "unavailable",
            DestinationError::Log(_) => "log_unavailable",
            DestinationError::Internal(_) => "internal",
        }
    }

    /// Internal detail for logging (never for clients).
    pub fn detail(&self) -> String {
        match self {
            DestinationError::Log(e) => e.to_string(),
            DestinationError::Internal(d) => d.clone(),
            other => other.to_string(),
        }
    }
}

impl From<LogError> for DestinationError {
    fn from(e: LogError) -> Self {
        DestinationError::Log(e)
    }
}

impl From<rusqlite::Error> for DestinationError {
    fn from(e: rusqlite::Error) -> Self {
        DestinationError::Internal(format!("destination store: {e}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn internal_detail_never_in_display() {
        let e = DestinationError::Internal("disk I/O error at /secret/path".into());
        assert_eq!(e.to_string(), "internal destination error");
        assert_eq!(e.status_code(), 500);
        assert!(e.detail().contains("/secret/path"));
    }

    #[test]
    fn invalid_maps_to_400_with_message() {
        let e = DestinationError::Invalid("url is required".into());
        assert_eq!(e.status_code(), 400);
        assert_eq!(e.to_string(), "url is required");
    }
}
