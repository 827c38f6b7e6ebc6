//! Failure classification and retry timing for outbound deliveries.
//!
//! Every outbound call ends in success or a [`DeliveryError`], whose [`FailureKind`]
//! says whether trying again can help ([`DeliveryError::is_retriable`]): 5xx, 408,
//! 429, timeouts and connection errors are retriable; every other 4xx (and 3xx, since
//! redirects are not followed) is permanent and sends the event to the dead letters
//! at once. The timing functions ([`backoff_ceiling`], [`retry_delay`],
//! [`parse_retry_after`]) are pure so they are unit-tested without clocks; the only
//! randomness (full jitter) comes in as a number in `[0, 1)`.
//!
//! Delivery is at-least-once: a retry re-sends a request whose outcome may be unknown
//! (a timeout after the receiver processed it), so receivers see duplicates only in
//! that case. [`DeliveryError::maybe_delivered`] tells which failures are ambiguous.

use std::time::Duration;

use chrono::{DateTime, Utc};

/// Most bytes of a response body kept for dead letters and error reports.
pub const RESPONSE_SNIPPET_BYTES: usize = 1024;

/// What kind of failure an outbound call ended in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FailureKind {
    /// The receiver answered with this non-success status.
    Status(u16),
    /// No answer within the timeout; the receiver may have processed the request.
    Timeout,
    /// The connection could not be made (refused, DNS, TLS handshake): the request
    /// never reached the receiver.
    Connect,
    /// The connection broke while sending or receiving; outcome unknown.
    Transport,
    /// The receiver answered 2xx but said the request was not accepted (e.g.
    /// ActiveCampaign's `{"success":0}`), or the event cannot be sent at all (e.g. it
    /// is too large). Never retried.
    Rejected,
}

/// A failed delivery, classified.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeliveryError {
    /// What happened.
    pub kind: FailureKind,
    /// `Retry-After` the receiver asked for, if any.
    pub retry_after: Option<Duration>,
    /// A short, client-safe description (no URLs, no secrets).
    pub message: String,
    /// The first KiB of the response body, if there was one.
    pub response: Option<String>,
}

impl DeliveryError {
    /// A failure from an HTTP status, with its `Retry-After` and body.
    pub fn from_status(status: u16, retry_after: Option<Duration>, body: &[u8]) -> Self {
        DeliveryError {
            kind: FailureKind::Status(status),
            retry_after,
            message: format!("receiver answered HTTP {status}"),
            response: (!body.is_empty()).then(|| snippet(body)),
        }
    }

    /// A failure of the HTTP client itself (timeout, connection, protocol).
    pub fn from_transport(err: &reqwest::Error) -> Self {
        let (kind, message) = if err.is_timeout() {
            (FailureKind::Timeout, "request timed out")
        } else if err.is_connect() {
            (FailureKind::Connect, "could not connect to receiver")
        } else if err.is_builder() {
            (FailureKind::Rejected, "request could not be built")
        } else {
            (FailureKind::Transport, "connection to receiver failed")
        };
        DeliveryError {
            kind,
            retry_after: None,
            message: message.to_string(),
            response: None,
        }
    }

    /// A permanent failure that is not an HTTP status (bad event, refused by body).
    pub fn rejected(message: impl Into<String>, response: Option<&[u8]>) -> Self {
        DeliveryError {
            kind: FailureKind::Rejected,
            retry_after: None,
            message: message.into(),
            response: response.filter(|b| !b.is_empty()).map(snippet),
        }
    }

    /// Whether trying again later can succeed.
    pub fn is_retriable(&self) -> bool {
        match self.kind {
            FailureKind::Status(s) => is_retriable_status(s),
            FailureKind::Timeout | FailureKind::Connect | FailureKind::Transport => true,
            FailureKind::Rejected => false,
        }
    }

    /// Whether the receiver may have processed the request despite the failure
    /// (timeouts and broken connections). Used to count possible duplicates.
    pub fn maybe_delivered(&self) -> bool {
        matches!(self.kind, FailureKind::Timeout | FailureKind::Transport)
    }

    /// The HTTP status, when the failure was one.
    pub fn status(&self) -> Option<u16> {
        match self.kind {
            FailureKind::Status(s) => Some(s),
            _ => None,
        }
    }
}

impl std::fmt::Display for DeliveryError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for DeliveryError {}

/// Whether an HTTP status is worth retrying: 408, 429 and every 5xx.
pub fn is_retriable_status(status: u16) -> bool {
    status == 408 || status == 429 || (500..600).contains(&status)
}

/// The exponential ceiling for the `attempt`-th retry (1-based): `min · 2^(attempt-1)`,
/// capped at `max`.
pub fn backoff_ceiling(attempt: u32, min: Duration, max: Duration) -> Duration {
    tributary_model::backoff::ceiling(attempt, min, max)
}

/// The delay before the `attempt`-th retry: full jitter, uniform in
/// `[min, backoff_ceiling(attempt)]` with `unit` in `[0, 1)`, then raised to the
/// receiver's `Retry-After` when that is longer, and never more than `max`.
pub fn retry_delay(
    attempt: u32,
    min: Duration,
    max: Duration,
    retry_after: Option<Duration>,
    unit: f64,
) -> Duration {
    let jittered = tributary_model::backoff::delay(attempt, min, max, unit);
    match retry_after {
        Some(ra) => jittered.max(ra).min(max),
        None => jittered,
    }
}

/// Parses a `Retry-After` header: delta-seconds (`"120"`) or an HTTP-date
/// (`"Wed, 21 Oct 2015 07:28:00 GMT"`), relative to `now`. A date in the past is
/// zero; anything unparsable is `None`.
pub fn parse_retry_after(value: &str, now: DateTime<Utc>) -> Option<Duration> {
    let value = value.trim();
    if value.is_empty() {
        return None;
    }
    if value.bytes().all(|b| b.is_ascii_digit()) {
        return value.parse::<u64>().ok().map(Duration::from_secs);
    }
    if let Ok(secs) = value.parse::<f64>() {
        return (secs.is_finite() && secs >= 0.0).then(|| Duration::from_secs_f64(secs));
    }
    let when = DateTime::parse_from_rfc2822(value).ok()?;
    let delta = when.with_timezone(&Utc) - now;
    Some(delta.to_std().unwrap_or(Duration::ZERO))
}

/// The `Retry-After` of a response, parsed against the current time.
pub fn retry_after_header(headers: &reqwest::header::HeaderMap) -> Option<Duration> {
    headers
        .get(reqwest::header::RETRY_AFTER)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| parse_retry_after(v, Utc::now()))
}

/// The first KiB of a body as text (lossy UTF-8, cut on a character boundary).
pub fn snippet(body: &[u8]) -> String {
    let cut = &body[..body.len().min(RESPONSE_SNIPPET_BYTES)];
    let text = String::from_utf8_lossy(cut);
    let mut s = text.into_owned();
    if s.len() > RESPONSE_SNIPPET_BYTES {
        let mut end = RESPONSE_SNIPPET_BYTES;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        s.truncate(end);
    }
    s
}

/// A uniform random number in `[0, 1)` for jitter.
pub(crate) fn random_unit() -> f64 {
    let bits = getrandom::u64().unwrap_or(0x9e37_79b9_7f4a_7c15);
    (bits >> 11) as f64 / (1u64 << 53) as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: Duration = Duration::from_secs(1);
    const MAX: Duration = Duration::from_secs(300);

    #[test]
    fn retriable_statuses() {
        for s in [408, 429, 500, 502, 503, 504, 599] {
            assert!(is_retriable_status(s), "{s}");
        }
        for s in [301, 400, 401, 403, 404, 410, 413, 422] {
            assert!(!is_retriable_status(s), "{s}");
        }
    }

    #[test]
    fn classification_is_a_type() {
        assert!(DeliveryError::from_status(503, None, b"").is_retriable());
        assert!(!DeliveryError::from_status(400, None, b"bad").is_retriable());
        assert!(!DeliveryError::rejected("too big", None).is_retriable());
        let e = DeliveryError::from_status(400, None, b"{\"error\":\"bad\"}");
        assert_eq!(e.status(), Some(400));
        assert_eq!(e.response.as_deref(), Some("{\"error\":\"bad\"}"));
        assert!(!e.maybe_delivered());
    }

    #[test]
    fn ceiling_doubles_and_caps() {
        assert_eq!(backoff_ceiling(1, S, MAX), S);
        assert_eq!(backoff_ceiling(2, S, MAX), 2 * S);
        assert_eq!(backoff_ceiling(5, S, MAX), 16 * S);
        assert_eq!(backoff_ceiling(9, S, MAX), 256 * S);
        assert_eq!(backoff_ceiling(10, S, MAX), MAX);
        assert_eq!(backoff_ceiling(1000, S, MAX), MAX);
        assert_eq!(backoff_ceiling(0, S, MAX), S);
    }

    #[test]
    fn jitter_spans_min_to_ceiling() {
        assert_eq!(retry_delay(3, S, MAX, None, 0.0), S);
        assert_eq!(retry_delay(3, S, MAX, None, 1.0), 4 * S);
        let mid = retry_delay(3, S, MAX, None, 0.5);
        assert_eq!(mid, Duration::from_millis(2500));
        assert_eq!(retry_delay(3, S, MAX, None, f64::NAN), S);
    }

    #[test]
    fn retry_after_raises_delay_but_not_past_max() {
        let d = retry_delay(1, S, MAX, Some(Duration::from_secs(30)), 0.3);
        assert_eq!(d, Duration::from_secs(30));
        let d = retry_delay(1, S, MAX, Some(Duration::from_secs(3600)), 0.3);
        assert_eq!(d, MAX);
        let d = retry_delay(6, S, MAX, Some(Duration::from_millis(10)), 1.0);
        assert_eq!(d, 32 * S);
    }

    #[test]
    fn parses_retry_after_seconds_and_dates() {
        let now = DateTime::parse_from_rfc3339("2015-10-21T07:27:00Z")
            .unwrap()
            .with_timezone(&Utc);
        assert_eq!(
            parse_retry_after("120", now),
            Some(Duration::from_secs(120))
        );
        assert_eq!(parse_retry_after(" 0 ", now), Some(Duration::ZERO));
        assert_eq!(
            parse_retry_after("1.5", now),
            Some(Duration::from_millis(1500))
        );
        assert_eq!(
            parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT", now),
            Some(Duration::from_secs(60))
        );
        assert_eq!(
            parse_retry_after("Wed, 21 Oct 2015 07:00:00 GMT", now),
            Some(Duration::ZERO)
        );
        assert_eq!(parse_retry_after("soon", now), None);
        assert_eq!(parse_retry_after("-5", now), None);
        assert_eq!(parse_retry_after("", now), None);
    }

    #[test]
    fn snippet_is_one_kib_on_char_boundary() {
        let body = "é".repeat(1000);
        let s = snippet(body.as_bytes());
        assert!(s.len() <= RESPONSE_SNIPPET_BYTES);
        assert!(s.chars().all(|c| c == 'é'));
        assert_eq!(snippet(b"short"), "short");
    }

    #[test]
    fn random_unit_in_range() {
        for _ in 0..100 {
            let u = random_unit();
            assert!((0.0..1.0).contains(&u));
        }
    }
}
