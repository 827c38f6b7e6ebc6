//! ActiveCampaign webhooks: the body as ActiveCampaign posts it
//! (`application/x-www-form-urlencoded`, one event per request) turned into one
//! Segment message.
//!
//! The path is [`parse_form`] (bytes → [`FormPairs`]) then [`map_webhook`]
//! ([`FormPairs`] → [`Webhook`]); [`parse_webhook`] does both. Everything here is pure:
//! no I/O, no clock, no randomness, so the server can run it inside the request and
//! answer within milliseconds, and a repeated delivery maps to the identical message
//! (same `messageId`), which the event log then drops as a duplicate.
//!
//! Invariants: no function here panics on any input (property-tested and fuzzed);
//! errors carry messages fit to return to the sender in a `400 {code,message}`.

mod dedupe;
mod form;
mod map;
mod time;

pub use dedupe::{DedupeKey, MESSAGE_ID_PREFIX};
pub use form::{FormPairs, MAX_PAIRS, ParseError, parse_form};
pub use map::{
    AUTOMATION_TYPE, Activity, ActivityKind, CAMPAIGN_ANONYMOUS_ID_PREFIX,
    CONTACT_ANONYMOUS_ID_PREFIX, DELIVERED_TYPE, EMAIL_CAMPAIGN_SENT, EMAIL_FORWARDED,
    EMAIL_REPLIED, EMAIL_SHARED, INTEGRATION_NAME, LIBRARY_NAME, LIBRARY_VERSION, MapError, Mapped,
    Settings, Webhook, is_spam_complaint, map_activity, map_webhook,
};
pub use time::{parse_date_time, parse_date_time_in, segment_timestamp};

/// Either way a webhook body can be refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WebhookError {
    /// The body is not form data.
    #[error(transparent)]
    Parse(#[from] ParseError),
    /// The form cannot be mapped.
    #[error(transparent)]
    Map(#[from] MapError),
}

/// [`parse_form`] then [`map_webhook`].
///
/// ```
/// use tributary_activecampaign::{Settings, parse_webhook};
/// let body = b"type=open&date_time=2024-02-28T07%3A04%3A13-06%3A00\
///              &contact%5Bid%5D=36&contact%5Bemail%5D=ann%40example.com&campaign%5Bid%5D=42";
/// let webhook = parse_webhook(body, &Settings::default()).unwrap();
/// assert_eq!(webhook.raw_type, "open");
/// assert_eq!(webhook.mapped.event(), Some("Email Opened"));
/// assert_eq!(webhook.email(), Some("ann@example.com"));
/// let message = webhook.message().unwrap();
/// assert_eq!(message["anonymousId"], "ann@example.com");
/// assert_eq!(message["timestamp"], "2024-02-28T13:04:13.000Z");
/// assert_eq!(message["properties"]["campaign_id"], "42");
/// ```
pub fn parse_webhook(body: &[u8], settings: &Settings) -> Result<Webhook, WebhookError> {
    Ok(map_webhook(&parse_form(body)?, settings)?)
}
