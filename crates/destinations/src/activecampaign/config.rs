//! Settings of the `activecampaign` destination type and their validation.
//!
//! Validation runs when a destination is created or patched, so a stored
//! configuration always builds; messages are client-safe and name the field.

use std::time::Duration;

use serde::{Deserialize, Deserializer, Serialize};

/// ActiveCampaign's event tracking endpoint, the default `track_url`.
pub const DEFAULT_TRACK_URL: &str = "https://trackcmp.net/event";
/// ActiveCampaign's documented API limit per account.
pub const DEFAULT_REQUESTS_PER_SECOND: f64 = 5.0;

/// `{"type":"activecampaign"}` settings: identify → contacts, track → events.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ActivecampaignSettings {
    /// The account's API URL from Settings → Developer, e.g.
    /// `https://acct.api-us1.com` (a trailing `/api/3` is accepted).
    pub api_url: String,
    /// The API key (sent as the `Api-Token` header).
    pub api_key: String,
    /// Event-tracking account id (Website → Site Tracking → Event Tracking).
    #[serde(deserialize_with = "string_or_number")]
    pub actid: String,
    /// Event-tracking key (same page as `actid`).
    pub event_key: String,
    /// Where track events are POSTed (default `https://trackcmp.net/event`).
    #[serde(default = "default_track_url")]
    pub track_url: String,
    /// API requests per second for this account (default 5, ActiveCampaign's
    /// limit); shared by every destination on the same `api_url`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub requests_per_second: Option<f64>,
    /// Request timeout in seconds (default 10).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout: Option<f64>,
}

fn default_track_url() -> String {
    DEFAULT_TRACK_URL.to_string()
}

fn string_or_number<'de, D: Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    match serde_json::Value::deserialize(d)? {
        serde_json::Value::String(s) => Ok(s),
        serde_json::Value::Number(n) => Ok(n.to_string()),
        _ => Err(serde::de::Error::custom("expected a string or a number")),
    }
}

fn http_url(s: &str, field: &str) -> Result<(), String> {
    let url = reqwest::Url::parse(s)
        .map_err(|_| format!("activecampaign settings: {field} is not a valid URL"))?;
    if !matches!(url.scheme(), "http" | "https") || url.host_str().is_none() {
        return Err(format!(
            "activecampaign settings: {field} must be an http:// or https:// URL"
        ));
    }
    Ok(())
}

impl ActivecampaignSettings {
    /// Checks every field; the message is client-safe.
    pub fn validate(&self) -> Result<(), String> {
        http_url(&self.api_url, "api_url")?;
        http_url(&self.track_url, "track_url")?;
        for (name, value) in [
            ("api_key", &self.api_key),
            ("actid", &self.actid),
            ("event_key", &self.event_key),
        ] {
            if value.trim().is_empty() {
                return Err(format!("activecampaign settings: {name} is required"));
            }
        }
        if reqwest::header::HeaderValue::from_str(&self.api_key).is_err() {
            return Err("activecampaign settings: api_key has invalid characters".into());
        }
        if let Some(r) = self.requests_per_second
            && !(r.is_finite() && r > 0.0 && r <= 1000.0)
        {
            return Err(
                "activecampaign settings: requests_per_second must be > 0 and ≤ 1000".into(),
            );
        }
        if let Some(t) = self.timeout
            && !(t.is_finite() && t > 0.0 && t <= 300.0)
        {
            return Err("activecampaign settings: timeout must be > 0 and ≤ 300 seconds".into());
        }
        Ok(())
    }

    /// The API base without a trailing `/` or `/api/3`: calls go to
    /// `{base}/api/3/…`.
    pub fn api_base(&self) -> String {
        let base = self.api_url.trim().trim_end_matches('/');
        let base = base.strip_suffix("/api/3").unwrap_or(base);
        base.trim_end_matches('/').to_string()
    }

    /// The request timeout.
    pub fn timeout(&self) -> Duration {
        Duration::from_secs_f64(self.timeout.unwrap_or(10.0))
    }

    /// The settings with the API and event keys masked, for API views.
    pub fn redacted(&self) -> ActivecampaignSettings {
        ActivecampaignSettings {
            api_key: crate::config::REDACTED.to_string(),
            event_key: crate::config::REDACTED.to_string(),
            ..self.clone()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_defaults_and_numeric_actid() {
        let s: ActivecampaignSettings = serde_json::from_str(
            r#"{"api_url":"https://acct.api-us1.com/api/3/","api_key":"k","actid":123,"event_key":"e"}"#,
        )
        .unwrap();
        assert_eq!(s.actid, "123");
        assert_eq!(s.track_url, DEFAULT_TRACK_URL);
        assert_eq!(s.api_base(), "https://acct.api-us1.com");
        assert!(s.validate().is_ok());
    }

    #[test]
    fn rejects_missing_keys() {
        let s: ActivecampaignSettings = serde_json::from_str(
            r#"{"api_url":"https://a.api-us1.com","api_key":" ","actid":"1","event_key":"e"}"#,
        )
        .unwrap();
        assert!(s.validate().unwrap_err().contains("api_key"));
        assert!(
            serde_json::from_str::<ActivecampaignSettings>(r#"{"api_url":"https://a"}"#).is_err()
        );
    }
}
