//! ActiveCampaign for Tributary: its webhook bodies parsed and mapped to Segment
//! messages ([`webhook`]), and Segment's Email events as ActiveCampaign sends them to a
//! Segment write key ([`segment`]).
//!
//! This crate owns *what* an ActiveCampaign event means as a Segment call; it does no
//! I/O. The server owns the HTTP route, write keys, the email → userId lookup and the
//! durable append. Invariants: every function is pure and deterministic (a repeated
//! ActiveCampaign delivery maps to the same message with the same `messageId`), and no
//! input makes any of them panic.

pub mod segment;
pub mod webhook;

pub use segment::{EMAIL_EVENTS, email_of, is_email_event, looks_like_email};
pub use webhook::{
    AUTOMATION_TYPE, DedupeKey, FormPairs, MapError, Mapped, ParseError, Settings, Webhook,
    WebhookError, is_spam_complaint, map_webhook, parse_form, parse_webhook,
};
