//! Segment's Email events, as the server's "Segment path" sees them: ActiveCampaign's
//! own "send email events to Segment" stream (or any email tool) posting `track` calls
//! with an ActiveCampaign source's write key.
//!
//! This module owns the six event names and how to find a recipient email in such a
//! call. It only reads messages; it never changes them.
//!
//! Invariants:
//! - [`is_email_event`] is an exact, case-sensitive match on the six names (Segment
//!   event names are case-sensitive, and ActiveCampaign sends them exactly).
//! - [`email_of`] returns only strings that pass [`looks_like_email`], trimmed.

use serde_json::{Map, Value};

/// `Email Delivered`: the receiving server accepted the message.
pub const EMAIL_DELIVERED: &str = "Email Delivered";
/// `Email Opened`: the recipient opened the message.
pub const EMAIL_OPENED: &str = "Email Opened";
/// `Email Link Clicked`: the recipient clicked a link in the message.
pub const EMAIL_LINK_CLICKED: &str = "Email Link Clicked";
/// `Email Unsubscribed`: the recipient unsubscribed.
pub const EMAIL_UNSUBSCRIBED: &str = "Email Unsubscribed";
/// `Email Bounced`: the receiving server refused the message.
pub const EMAIL_BOUNCED: &str = "Email Bounced";
/// `Email Marked as Spam`: the recipient complained that the message is spam.
pub const EMAIL_MARKED_AS_SPAM: &str = "Email Marked as Spam";

/// The six Email events ActiveCampaign's Segment source documents, in its order.
pub const EMAIL_EVENTS: [&str; 6] = [
    EMAIL_DELIVERED,
    EMAIL_OPENED,
    EMAIL_LINK_CLICKED,
    EMAIL_UNSUBSCRIBED,
    EMAIL_BOUNCED,
    EMAIL_MARKED_AS_SPAM,
];

/// True for exactly the six Email event names in [`EMAIL_EVENTS`].
///
/// Segment's generic spec name `Unsubscribed` is deliberately not included: the
/// ActiveCampaign source (and this crate) say `Email Unsubscribed`.
pub fn is_email_event(name: &str) -> bool {
    EMAIL_EVENTS.contains(&name)
}

/// The recipient email of a Segment call, looked up in order in
/// `context.traits.email`, `properties.email`, `traits.email` and finally
/// `anonymousId` (ActiveCampaign sends the email as the `anonymousId` when it knows no
/// `userId`). Only values that [`looks_like_email`] count; the result is trimmed and
/// keeps its case (compare case-insensitively).
pub fn email_of(message: &Map<String, Value>) -> Option<String> {
    let nested = |outer: &str, inner: &str, key: &str| {
        message
            .get(outer)
            .and_then(Value::as_object)
            .and_then(|o| o.get(inner))
            .and_then(Value::as_object)
            .and_then(|o| o.get(key))
    };
    let field = |outer: &str, key: &str| {
        message
            .get(outer)
            .and_then(Value::as_object)
            .and_then(|o| o.get(key))
    };
    [
        nested("context", "traits", "email"),
        field("properties", "email"),
        field("traits", "email"),
        message.get("anonymousId"),
    ]
    .into_iter()
    .flatten()
    .filter_map(Value::as_str)
    .map(str::trim)
    .find(|s| looks_like_email(s))
    .map(str::to_owned)
}

/// A cheap plausibility check, not RFC 5322: one `@` with a non-empty local part before
/// it, a domain after it that has a dot not at either end, no whitespace or control
/// characters, at most 254 bytes. Enough to tell an email from a device id or UUID.
pub fn looks_like_email(s: &str) -> bool {
    if s.is_empty() || s.len() > 254 || s.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return false;
    }
    let Some((local, domain)) = s.split_once('@') else {
        return false;
    };
    !local.is_empty()
        && !domain.contains('@')
        && domain.contains('.')
        && !domain.starts_with('.')
        && !domain.ends_with('.')
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn obj(v: Value) -> Map<String, Value> {
        match v {
            Value::Object(m) => m,
            _ => Map::new(),
        }
    }

    #[test]
    fn knows_the_six_email_events_exactly() {
        for name in EMAIL_EVENTS {
            assert!(is_email_event(name), "{name}");
        }
        for name in [
            "email opened",
            "Email Opened ",
            "Unsubscribed",
            "Email Replied",
            "Email Campaign Sent",
            "",
        ] {
            assert!(!is_email_event(name), "{name:?}");
        }
    }

    #[test]
    fn finds_email_in_context_traits_first() {
        let m = obj(json!({
            "type": "track", "event": "Email Delivered", "anonymousId": "b@example.com",
            "properties": {"email": "c@example.com"},
            "context": {"traits": {"email": " Ann@Example.com "}}
        }));
        assert_eq!(email_of(&m).as_deref(), Some("Ann@Example.com"));
    }

    #[test]
    fn falls_back_to_properties_then_anonymous_id() {
        let m =
            obj(json!({"anonymousId": "b@example.com", "properties": {"email": "c@example.com"}}));
        assert_eq!(email_of(&m).as_deref(), Some("c@example.com"));
        let m = obj(json!({"anonymousId": "b@example.com", "properties": {"email": 7}}));
        assert_eq!(email_of(&m).as_deref(), Some("b@example.com"));
    }

    #[test]
    fn ignores_ids_that_are_not_emails() {
        let m = obj(json!({
            "anonymousId": "0b6a4d0e-9d7f-4a5e-8f0e-2f3c1c1d2e3f",
            "userId": "a@example.com",
            "context": {"traits": {"email": "not an email"}}
        }));
        assert_eq!(email_of(&m), None);
        assert_eq!(email_of(&Map::new()), None);
    }

    #[test]
    fn email_plausibility() {
        for ok in [
            "a@b.co",
            "first.last+tag@sub.example.org",
            "josé@exämple.com",
        ] {
            assert!(looks_like_email(ok), "{ok}");
        }
        for bad in [
            "", "a@b", "@b.co", "a@.co", "a@b.co.", "a@@b.co", "a b@c.co", "abc",
        ] {
            assert!(!looks_like_email(bad), "{bad}");
        }
    }
}
