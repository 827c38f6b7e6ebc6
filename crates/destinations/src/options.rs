//! Retry timing shared by the engine and its workers.

use std::time::Duration;

/// Retry timing of every destination. Deserializes as the `[destinations]` section of
/// the server's configuration (durations in `tributary_model::duration` syntax).
#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EngineOptions {
    /// Smallest delay before a retry (default 1 s).
    #[serde(with = "tributary_model::duration")]
    pub retry_min_backoff: Duration,
    /// Largest delay before a retry (default 5 min).
    #[serde(with = "tributary_model::duration")]
    pub retry_max_backoff: Duration,
    /// How long a batch is retried after its first attempt before its events become
    /// dead letters (default 4 h, as Segment).
    #[serde(with = "tributary_model::duration")]
    pub retry_window: Duration,
}

impl Default for EngineOptions {
    fn default() -> Self {
        EngineOptions {
            retry_min_backoff: Duration::from_secs(1),
            retry_max_backoff: Duration::from_secs(300),
            retry_window: Duration::from_secs(4 * 3600),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_match_segment() {
        let o = EngineOptions::default();
        assert_eq!(o.retry_min_backoff, Duration::from_secs(1));
        assert_eq!(o.retry_max_backoff, Duration::from_secs(300));
        assert_eq!(o.retry_window, Duration::from_secs(4 * 3600));
    }
}
