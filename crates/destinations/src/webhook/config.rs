//! Settings of the `webhook` destination type and their validation.
//!
//! Validation runs when a destination is created or patched, so a stored webhook
//! configuration always builds; messages are client-safe and name the field.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Largest `batch_size` accepted.
pub const MAX_BATCH_SIZE: usize = 1000;
/// Default request timeout in seconds.
pub const DEFAULT_TIMEOUT_SECS: f64 = 10.0;

/// `{"type":"webhook"}` settings: POST events as JSON to a URL.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WebhookSettings {
    /// The `http://` or `https://` URL events are POSTed to.
    pub url: String,
    /// Extra request headers (e.g. an `Authorization` the receiver expects).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub headers: BTreeMap<String, String>,
    /// When set, each request carries `X-Tributary-Signature: sha256=<hex>`, the
    /// HMAC-SHA256 of the exact body bytes under this secret.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret: Option<String>,
    /// Events per request. 1 (the default) POSTs each event as its own JSON object;
    /// more POSTs `{"batch":[…]}` with up to this many events.
    #[serde(default = "default_batch_size")]
    pub batch_size: usize,
    /// Request timeout in seconds (default 10).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout: Option<f64>,
}

fn default_batch_size() -> usize {
    1
}

impl WebhookSettings {
    /// Checks every field; the message is client-safe.
    pub fn validate(&self) -> Result<(), String> {
        let url = reqwest::Url::parse(&self.url)
            .map_err(|_| "webhook settings: url is not a valid URL".to_string())?;
        if !matches!(url.scheme(), "http" | "https") || url.host_str().is_none() {
            return Err("webhook settings: url must be an http:// or https:// URL".into());
        }
        for (name, value) in &self.headers {
            reqwest::header::HeaderName::from_bytes(name.as_bytes())
                .map_err(|_| format!("webhook settings: invalid header name {name:?}"))?;
            reqwest::header::HeaderValue::from_str(value)
                .map_err(|_| format!("webhook settings: invalid value for header {name:?}"))?;
        }
        if self.secret.as_deref() == Some("") {
            return Err("webhook settings: secret must not be empty".into());
        }
        if !(1..=MAX_BATCH_SIZE).contains(&self.batch_size) {
            return Err(format!(
                "webhook settings: batch_size must be between 1 and {MAX_BATCH_SIZE}"
            ));
        }
        if let Some(t) = self.timeout
            && !(t.is_finite() && t > 0.0 && t <= 300.0)
        {
            return Err("webhook settings: timeout must be > 0 and ≤ 300 seconds".into());
        }
        Ok(())
    }

    /// The request timeout.
    pub fn timeout(&self) -> Duration {
        Duration::from_secs_f64(self.timeout.unwrap_or(DEFAULT_TIMEOUT_SECS))
    }

    /// The settings with the secret masked, for API views.
    pub fn redacted(&self) -> WebhookSettings {
        let mut s = self.clone();
        if s.secret.is_some() {
            s.secret = Some(crate::config::REDACTED.to_string());
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(json: &str) -> Result<WebhookSettings, String> {
        let s: WebhookSettings = serde_json::from_str(json).map_err(|e| e.to_string())?;
        s.validate().map(|_| s)
    }

    #[test]
    fn defaults_and_validation() {
        let s = settings(r#"{"url":"https://example.com/hook"}"#).unwrap();
        assert_eq!(s.batch_size, 1);
        assert_eq!(s.timeout(), Duration::from_secs(10));
        assert!(settings(r#"{"url":"ftp://x"}"#).is_err());
        assert!(settings(r#"{"url":"not a url"}"#).is_err());
        assert!(settings(r#"{"url":"http://x","batch_size":0}"#).is_err());
        assert!(settings(r#"{"url":"http://x","batch_size":1001}"#).is_err());
        assert!(settings(r#"{"url":"http://x","timeout":0}"#).is_err());
        assert!(settings(r#"{"url":"http://x","headers":{"bad name":"v"}}"#).is_err());
        assert!(settings(r#"{"url":"http://x","bogus":1}"#).is_err());
        assert!(settings(r#"{"url":"http://x","headers":{"X-Key":"v"},"timeout":2.5}"#).is_ok());
    }
}
