//! How an ActiveCampaign API call fails, classified once: retryable (try again
//! later: rate limits, 5xx, timeouts, a connection that failed) or permanent (the
//! key is refused, the URL is not an ActiveCampaign API, an answer we cannot read).
//!
//! Messages are fit to show the user (the sync state's `error`, a 400 on the
//! settings) and never contain the API key.

use std::time::Duration;

/// A failed ActiveCampaign API call.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ApiError {
    /// 401/403: the key is wrong or lacks access.
    #[error(
        "ActiveCampaign refused the API key (HTTP {status}): copy the key from Settings → Developer in ActiveCampaign"
    )]
    Unauthorized {
        /// The HTTP status.
        status: u16,
    },
    /// 429 (or 503, which ActiveCampaign also answers at the limit), still after the
    /// client's own waits.
    #[error("ActiveCampaign kept answering HTTP {status} (rate limited) after {attempts} tries")]
    RateLimited {
        /// The HTTP status.
        status: u16,
        /// Attempts made.
        attempts: u32,
        /// The last `Retry-After`, when given.
        retry_after: Option<Duration>,
    },
    /// Any other non-2xx answer.
    #[error("ActiveCampaign answered HTTP {status} to {what}: {detail}")]
    Status {
        /// The HTTP status.
        status: u16,
        /// The call (e.g. `GET /api/3/campaigns`).
        what: String,
        /// The start of the answer's error text.
        detail: String,
    },
    /// No answer at all: DNS, connection refused, TLS, timeout.
    #[error("cannot reach ActiveCampaign at {url}: {detail}")]
    Unreachable {
        /// The API URL (no key).
        url: String,
        /// What failed.
        detail: String,
    },
    /// A 2xx answer that is not what the API documents (not JSON, wrong shape).
    #[error("ActiveCampaign's answer to {what} is not the documented shape: {detail}")]
    BadResponse {
        /// The call.
        what: String,
        /// What is wrong with it.
        detail: String,
    },
    /// The configured URL cannot be an API URL.
    #[error(
        "invalid ActiveCampaign API URL {url:?}: use the URL from Settings → Developer, e.g. https://ACCOUNT.api-us1.com"
    )]
    InvalidUrl {
        /// The URL as configured.
        url: String,
    },
}

impl ApiError {
    /// Whether the same call may succeed later (rate limits, 5xx, 408, no answer).
    pub fn is_retriable(&self) -> bool {
        match self {
            ApiError::RateLimited { .. } | ApiError::Unreachable { .. } => true,
            ApiError::Status { status, .. } => is_retriable_status(*status),
            ApiError::Unauthorized { .. }
            | ApiError::BadResponse { .. }
            | ApiError::InvalidUrl { .. } => false,
        }
    }
}

/// Statuses worth retrying: 408, 425, 429 and every 5xx.
pub fn is_retriable_status(status: u16) -> bool {
    matches!(status, 408 | 425 | 429) || (500..600).contains(&status)
}

/// Parses `Retry-After`: delta-seconds (`"2"`, `"1.5"`) or an HTTP-date relative to
/// `now`; a date in the past is zero, anything else `None`.
pub fn parse_retry_after(value: &str, now: chrono::DateTime<chrono::Utc>) -> Option<Duration> {
    let value = value.trim();
    if value.is_empty() {
        return None;
    }
    if let Ok(secs) = value.parse::<f64>() {
        return (secs.is_finite() && secs >= 0.0).then(|| Duration::from_secs_f64(secs));
    }
    let when = chrono::DateTime::parse_from_rfc2822(value).ok()?;
    Some(
        (when.with_timezone(&chrono::Utc) - now)
            .to_std()
            .unwrap_or(Duration::ZERO),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classifies_retryable_and_permanent() {
        assert!(!ApiError::Unauthorized { status: 401 }.is_retriable());
        let status = |s| ApiError::Status {
            status: s,
            what: "x".into(),
            detail: String::new(),
        };
        assert!(status(500).is_retriable());
        assert!(status(503).is_retriable());
        assert!(!status(404).is_retriable());
        assert!(!status(422).is_retriable());
        assert!(
            ApiError::Unreachable {
                url: "u".into(),
                detail: "d".into()
            }
            .is_retriable()
        );
    }

    #[test]
    fn retry_after_forms() {
        let now = chrono::DateTime::parse_from_rfc3339("2015-10-21T07:28:00Z")
            .unwrap()
            .with_timezone(&chrono::Utc);
        assert_eq!(parse_retry_after("2", now), Some(Duration::from_secs(2)));
        assert_eq!(
            parse_retry_after("0.5", now),
            Some(Duration::from_millis(500))
        );
        assert_eq!(
            parse_retry_after("Wed, 21 Oct 2015 07:28:03 GMT", now),
            Some(Duration::from_secs(3))
        );
        assert_eq!(
            parse_retry_after("Wed, 21 Oct 2015 07:27:00 GMT", now),
            Some(Duration::ZERO)
        );
        assert_eq!(parse_retry_after("soon", now), None);
        assert_eq!(parse_retry_after("-1", now), None);
    }
}
