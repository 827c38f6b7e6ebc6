//! The closed set of destination types: one tagged enum, one `build` match.
//!
//! A [`DestinationConfig`] is what the store keeps (as JSON, `{"type":…, …settings}`)
//! and what a worker is built from. It is validated before it is stored, so every
//! stored configuration builds; adding a type means adding a variant here and a
//! directory beside `webhook/`, `segment/` and `activecampaign/`.

use std::sync::Arc;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::activecampaign::{ActivecampaignSettings, ActivecampaignSink};
use crate::error::DestinationError;
use crate::segment::{SegmentSettings, SegmentSink};
use crate::sink::Sink;
use crate::webhook::{WebhookSettings, WebhookSink};

/// What secret settings look like in API views. Patching a secret field with this
/// exact value keeps the stored secret.
pub const REDACTED: &str = "********";

/// A destination's type and settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum DestinationConfig {
    /// POST events as JSON to a URL.
    Webhook(WebhookSettings),
    /// Forward to a Segment-compatible Tracking API.
    Segment(SegmentSettings),
    /// ActiveCampaign contacts and event tracking.
    Activecampaign(ActivecampaignSettings),
}

/// The `type` strings, for messages.
pub const TYPES: [&str; 3] = ["webhook", "segment", "activecampaign"];

impl DestinationConfig {
    /// Parses and validates `settings` for the destination type `kind`.
    pub fn from_parts(kind: &str, settings: Value) -> Result<DestinationConfig, DestinationError> {
        if !TYPES.contains(&kind) {
            return Err(DestinationError::Invalid(format!(
                "unknown destination type {kind:?} (expected one of {})",
                TYPES.join(", ")
            )));
        }
        let Value::Object(mut map) = settings else {
            return Err(DestinationError::Invalid(
                "settings must be a JSON object".into(),
            ));
        };
        if map.contains_key("type") {
            return Err(DestinationError::Invalid(
                "settings must not contain \"type\"".into(),
            ));
        }
        map.insert("type".into(), Value::String(kind.to_string()));
        let config: DestinationConfig = serde_json::from_value(Value::Object(map))
            .map_err(|e| DestinationError::Invalid(format!("{kind} settings: {e}")))?;
        config.validate().map_err(DestinationError::Invalid)?;
        Ok(config)
    }

    /// Checks the settings; the message is client-safe.
    pub fn validate(&self) -> Result<(), String> {
        match self {
            DestinationConfig::Webhook(s) => s.validate(),
            DestinationConfig::Segment(s) => s.validate(),
            DestinationConfig::Activecampaign(s) => s.validate(),
        }
    }

    /// The `type` string.
    pub fn kind(&self) -> &'static str {
        match self {
            DestinationConfig::Webhook(_) => "webhook",
            DestinationConfig::Segment(_) => "segment",
            DestinationConfig::Activecampaign(_) => "activecampaign",
        }
    }

    /// The name Segment's catalog uses for this type, also honoured as a key of the
    /// `integrations` object.
    pub fn catalog_name(&self) -> &'static str {
        match self {
            DestinationConfig::Webhook(_) => "Webhooks",
            DestinationConfig::Segment(_) => "Segment",
            DestinationConfig::Activecampaign(_) => "ActiveCampaign",
        }
    }

    /// The settings object (without `type`).
    pub fn settings(&self) -> Value {
        strip_type(serde_json::to_value(self).unwrap_or(Value::Null))
    }

    /// The settings object with secrets masked, for API views.
    pub fn redacted_settings(&self) -> Value {
        let redacted = match self {
            DestinationConfig::Webhook(s) => DestinationConfig::Webhook(s.redacted()),
            DestinationConfig::Segment(s) => DestinationConfig::Segment(s.redacted()),
            DestinationConfig::Activecampaign(s) => DestinationConfig::Activecampaign(s.redacted()),
        };
        redacted.settings()
    }

    /// Applies a JSON merge patch to the settings (`null` removes a key; a value
    /// equal to [`REDACTED`] keeps the stored secret) and validates the result.
    pub fn patched(&self, patch: &Value) -> Result<DestinationConfig, DestinationError> {
        let Value::Object(changes) = patch else {
            return Err(DestinationError::Invalid(
                "settings must be a JSON object".into(),
            ));
        };
        let mut settings = match self.settings() {
            Value::Object(m) => m,
            _ => serde_json::Map::new(),
        };
        for (k, v) in changes {
            match v {
                Value::Null => {
                    settings.remove(k);
                }
                Value::String(s) if s == REDACTED => {}
                other => {
                    settings.insert(k.clone(), other.clone());
                }
            }
        }
        DestinationConfig::from_parts(self.kind(), Value::Object(settings))
    }

    /// Builds the outbound side. The one place that knows every type.
    pub(crate) fn build(&self) -> Result<Arc<dyn Sink>, DestinationError> {
        let sink: Arc<dyn Sink> = match self {
            DestinationConfig::Webhook(s) => {
                Arc::new(WebhookSink::new(s.clone()).map_err(DestinationError::Internal)?)
            }
            DestinationConfig::Segment(s) => {
                Arc::new(SegmentSink::new(s.clone()).map_err(DestinationError::Internal)?)
            }
            DestinationConfig::Activecampaign(s) => {
                Arc::new(ActivecampaignSink::new(s.clone()).map_err(DestinationError::Internal)?)
            }
        };
        Ok(sink)
    }
}

/// Where a new destination starts reading the log (`"start"` when it is created):
/// `"now"` (the default: only events appended after its creation), `"beginning"`
/// (every event the log still keeps) or an RFC 3339 time (events received at or
/// after it). Only creation reads it; afterwards the destination's cursor rules.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Start {
    /// After the log's current head.
    #[default]
    Now,
    /// From the oldest retained event.
    Beginning,
    /// From the first event received at or after this time.
    At(DateTime<Utc>),
}

impl std::str::FromStr for Start {
    type Err = String;

    fn from_str(s: &str) -> Result<Start, String> {
        match s.trim() {
            "now" => Ok(Start::Now),
            "beginning" => Ok(Start::Beginning),
            t => DateTime::parse_from_rfc3339(t)
                .map(|d| Start::At(d.with_timezone(&Utc)))
                .map_err(|_| {
                    format!(
                        "start must be \"now\", \"beginning\" or an RFC 3339 time such as \
                         \"2026-01-31T00:00:00Z\", not {t:?}"
                    )
                }),
        }
    }
}

impl std::fmt::Display for Start {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Start::Now => f.write_str("now"),
            Start::Beginning => f.write_str("beginning"),
            Start::At(t) => f.write_str(&t.to_rfc3339()),
        }
    }
}

impl Serialize for Start {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Start {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Start, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

fn strip_type(v: Value) -> Value {
    match v {
        Value::Object(mut m) => {
            m.remove("type");
            Value::Object(m)
        }
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn from_parts_validates_per_type() {
        let c = DestinationConfig::from_parts("webhook", json!({"url": "http://127.0.0.1:9/h"}))
            .unwrap();
        assert_eq!(c.kind(), "webhook");
        assert_eq!(
            serde_json::to_value(&c).unwrap()["type"],
            json!("webhook"),
            "stored form is internally tagged"
        );
        let e = DestinationConfig::from_parts("webhook", json!({})).unwrap_err();
        assert!(matches!(e, DestinationError::Invalid(ref m) if m.contains("url")));
        let e = DestinationConfig::from_parts("kafka", json!({})).unwrap_err();
        assert!(matches!(e, DestinationError::Invalid(ref m) if m.contains("kafka")));
        let e = DestinationConfig::from_parts("segment", json!([])).unwrap_err();
        assert!(matches!(e, DestinationError::Invalid(_)));
    }

    #[test]
    fn start_reads_now_beginning_or_a_time() {
        assert_eq!("now".parse::<Start>(), Ok(Start::Now));
        assert_eq!("beginning".parse::<Start>(), Ok(Start::Beginning));
        let at: Start = "2026-01-31T01:00:00+01:00".parse().unwrap();
        assert_eq!(at.to_string(), "2026-01-31T00:00:00+00:00");
        let e = "yesterday".parse::<Start>().unwrap_err();
        assert!(
            e.contains("\"beginning\"") && e.contains("yesterday"),
            "{e}"
        );
        assert_eq!(Start::default(), Start::Now);
    }

    #[test]
    fn redaction_and_patch_keep_secrets() {
        let c = DestinationConfig::from_parts(
            "webhook",
            json!({"url": "http://h/x", "secret": "s3cret", "batch_size": 10}),
        )
        .unwrap();
        let view = c.redacted_settings();
        assert_eq!(view["secret"], json!(REDACTED));
        assert_eq!(view["batch_size"], json!(10));
        let p = c
            .patched(&json!({"secret": REDACTED, "batch_size": 20}))
            .unwrap();
        assert_eq!(p.settings()["secret"], json!("s3cret"));
        assert_eq!(p.settings()["batch_size"], json!(20));
        let p = c.patched(&json!({"secret": null})).unwrap();
        assert!(p.settings().get("secret").is_none());
        assert!(c.patched(&json!({"batch_size": 0})).is_err());
    }
}
