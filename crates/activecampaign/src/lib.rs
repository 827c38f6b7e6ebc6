//! ActiveCampaign for Tributary: its webhook bodies parsed and mapped to Segment
//! messages ([`webhook`]), and Segment's Email events as ActiveCampaign sends them to a
//! Segment write key ([`segment`]).
//!
//! It also holds ActiveCampaign's API ([`api`]): the client the API sync and the
//! ActiveCampaign destination share (one rate limiter per account), and its reports
//! read as activities that go through the webhook's own mapping ([`map_activity`]).
//!
//! This crate owns *what* an ActiveCampaign event means as a Segment call; apart from
//! the API client it does no I/O. The server owns the HTTP route, write keys, the email → userId lookup and the
//! durable append. Invariants: every function is pure and deterministic (a repeated
//! ActiveCampaign delivery maps to the same message with the same `messageId`), and no
//! input makes any of them panic.

pub mod api;
pub mod segment;
pub mod webhook;

pub use segment::{EMAIL_EVENTS, email_of, is_email_event, looks_like_email};
pub use webhook::{
    AUTOMATION_TYPE, Activity, ActivityKind, DELIVERED_TYPE, DedupeKey, FormPairs, MapError,
    Mapped, ParseError, Settings, Webhook, WebhookError, is_spam_complaint, map_activity,
    map_webhook, parse_form, parse_webhook,
};
