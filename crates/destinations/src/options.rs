//! Retry timing shared by the engine and its workers.

use std::time::Duration;

/// Retry timing of every destination.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EngineOptions {
    /// Smallest delay before a retry (default 1 s; the server reads
    /// `TRIBUTARY_RETRY_MIN_BACKOFF`).
    pub retry_min_backoff: Duration,
    /// Largest delay before a retry (default 5 min).
    pub retry_max_backoff: Duration,
    /// How long a batch is retried after its first attempt before its events become
    /// dead letters (default 4 h, as Segment).
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

impl EngineOptions {
    /// Parses a duration as the server's environment gives it
    /// (`TRIBUTARY_RETRY_MIN_BACKOFF` and friends): `250ms`, `1s`, `1.5s`, `5m`,
    /// `4h`, or a bare number of seconds.
    pub fn parse_duration(value: &str) -> Result<Duration, String> {
        let v = value.trim();
        let (num, unit) = match v.find(|c: char| c.is_ascii_alphabetic()) {
            Some(i) => (&v[..i], &v[i..]),
            None => (v, "s"),
        };
        let n: f64 = num
            .trim()
            .parse()
            .map_err(|_| format!("invalid duration {value:?}"))?;
        let secs = match unit.trim() {
            "ms" => n / 1000.0,
            "s" => n,
            "m" => n * 60.0,
            "h" => n * 3600.0,
            _ => return Err(format!("invalid duration unit in {value:?} (ms, s, m, h)")),
        };
        Duration::try_from_secs_f64(secs).map_err(|_| format!("invalid duration {value:?}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_durations() {
        let p = EngineOptions::parse_duration;
        assert_eq!(p("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(p("2"), Ok(Duration::from_secs(2)));
        assert_eq!(p("1.5s"), Ok(Duration::from_millis(1500)));
        assert_eq!(p("5m"), Ok(Duration::from_secs(300)));
        assert_eq!(p("4h"), Ok(Duration::from_secs(4 * 3600)));
        assert!(p("-1s").is_err());
        assert!(p("fast").is_err());
        assert!(p("3d").is_err());
    }

    #[test]
    fn defaults_match_segment() {
        let o = EngineOptions::default();
        assert_eq!(o.retry_min_backoff, Duration::from_secs(1));
        assert_eq!(o.retry_max_backoff, Duration::from_secs(300));
        assert_eq!(o.retry_window, Duration::from_secs(4 * 3600));
    }
}
