//! Settings of the `segment` destination type and their validation.
//!
//! Validation runs when a destination is created or patched, so a stored segment
//! configuration always builds; messages are client-safe and name the field.

use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Segment's own Tracking API, the default `host`.
pub const DEFAULT_HOST: &str = "https://api.segment.io";

/// `{"type":"segment"}` settings: forward to a Segment-compatible Tracking API.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SegmentSettings {
    /// The write key of the receiving source, sent as HTTP Basic `base64(key:)`.
    pub write_key: String,
    /// Base URL of the Tracking API (Segment, RudderStack's data plane, another
    /// Tributary); events go to `{host}/v1/batch`. Default `https://api.segment.io`.
    #[serde(default = "default_host")]
    pub host: String,
    /// Request timeout in seconds (default 10).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout: Option<f64>,
}

fn default_host() -> String {
    DEFAULT_HOST.to_string()
}

impl SegmentSettings {
    /// Checks every field; the message is client-safe.
    pub fn validate(&self) -> Result<(), String> {
        if self.write_key.trim().is_empty() {
            return Err("segment settings: write_key is required".into());
        }
        let url = reqwest::Url::parse(&self.batch_url())
            .map_err(|_| "segment settings: host is not a valid URL".to_string())?;
        if !matches!(url.scheme(), "http" | "https") || url.host_str().is_none() {
            return Err("segment settings: host must be an http:// or https:// URL".into());
        }
        if let Some(t) = self.timeout
            && !(t.is_finite() && t > 0.0 && t <= 300.0)
        {
            return Err("segment settings: timeout must be > 0 and ≤ 300 seconds".into());
        }
        Ok(())
    }

    /// `{host}/v1/batch`, accepting a host given with or without a trailing `/v1`.
    pub fn batch_url(&self) -> String {
        let host = self.host.trim().trim_end_matches('/');
        let host = host.strip_suffix("/v1").unwrap_or(host);
        format!("{host}/v1/batch")
    }

    /// The request timeout.
    pub fn timeout(&self) -> Duration {
        Duration::from_secs_f64(self.timeout.unwrap_or(10.0))
    }

    /// The settings with the write key masked, for API views.
    pub fn redacted(&self) -> SegmentSettings {
        SegmentSettings {
            write_key: crate::config::REDACTED.to_string(),
            ..self.clone()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batch_url_normalizes_host() {
        for host in [
            "http://h:1",
            "http://h:1/",
            "http://h:1/v1",
            "http://h:1/v1/",
        ] {
            let s = SegmentSettings {
                write_key: "k".into(),
                host: host.into(),
                timeout: None,
            };
            assert_eq!(s.batch_url(), "http://h:1/v1/batch");
            assert!(s.validate().is_ok());
        }
    }

    #[test]
    fn requires_write_key_and_valid_host() {
        let s: SegmentSettings = serde_json::from_str(r#"{"write_key":""}"#).unwrap();
        assert!(s.validate().is_err());
        let s: SegmentSettings = serde_json::from_str(r#"{"write_key":"k"}"#).unwrap();
        assert_eq!(s.batch_url(), "https://api.segment.io/v1/batch");
        let s: SegmentSettings =
            serde_json::from_str(r#"{"write_key":"k","host":"nope"}"#).unwrap();
        assert!(s.validate().is_err());
    }
}
