//! ActiveCampaign's API, as the API sync and the ActiveCampaign destination use it:
//! the account's HTTP client ([`Client`]: v3 lists paged with `limit`/`offset` and
//! `meta.total`, v1 report actions paged until `result_code` 0), one rate limiter
//! per account shared by everything in the process ([`ratelimit`]), failures
//! classified retryable vs permanent ([`ApiError`]), and the reports read as
//! activities for the one mapping the webhooks use ([`report`]).
//!
//! Unlike the rest of this crate this module does I/O (the client); everything it
//! decides about formats (pages, rows, times) is in pure functions, unit-tested.

pub mod client;
pub mod error;
pub mod ratelimit;
pub mod report;

pub use client::{Client, Page, V1Page};
pub use error::{ApiError, is_retriable_status, parse_retry_after};
pub use report::{AccountZone, CampaignInfo, Report, bounced_emails};

/// `settings.api` of an ActiveCampaign source.
#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct ApiSettings {
    /// The account's API URL (Settings → Developer), e.g. `https://ACCOUNT.api-us1.com`.
    pub url: String,
    /// The API key (Settings → Developer). Never shown back, logged or exported.
    pub key: String,
    /// Minutes between polls after the first run (default 15, 1 ..= 1440).
    #[serde(default = "default_poll_minutes")]
    pub poll_minutes: u32,
    /// The account's UTC offset for naive timestamps (`"-05:00"`); learnt from the
    /// API when absent (see [`AccountZone`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub utc_offset: Option<String>,
}

fn default_poll_minutes() -> u32 {
    15
}

impl ApiSettings {
    /// The key as shown back: `…` and its last four characters.
    pub fn masked_key(key: &str) -> String {
        let chars: Vec<char> = key.chars().collect();
        let tail: String = chars[chars.len().saturating_sub(4)..].iter().collect();
        format!("…{tail}")
    }

    /// Checks the shape (not the account): a URL, a key, a poll interval in range, a
    /// valid offset. The message is fit for a 400.
    pub fn validate(&self) -> Result<(), String> {
        if self.key.trim().is_empty() {
            return Err(
                "settings.api.key is empty: paste the API key from Settings → Developer".into(),
            );
        }
        if !(1..=1440).contains(&self.poll_minutes) {
            return Err("settings.api.poll_minutes must be 1 to 1440".into());
        }
        if let Some(o) = &self.utc_offset
            && AccountZone::parse_offset(o).is_none()
        {
            return Err(format!(
                "settings.api.utc_offset {o:?} is not an offset like \"-05:00\""
            ));
        }
        Client::new(&self.url, &self.key, std::time::Duration::from_secs(10))
            .map(|_| ())
            .map_err(|e| e.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn masks_all_but_the_last_four() {
        assert_eq!(ApiSettings::masked_key("abcdef123456"), "…3456");
        assert_eq!(ApiSettings::masked_key("ab"), "…ab");
    }

    #[test]
    fn settings_shape() {
        let s: ApiSettings =
            serde_json::from_str(r#"{"url":"https://a.api-us1.com","key":"k1"}"#).unwrap();
        assert_eq!(s.poll_minutes, 15);
        assert!(s.validate().is_ok());
        let bad: ApiSettings =
            serde_json::from_str(r#"{"url":"nope","key":"k1","poll_minutes":0}"#).unwrap();
        assert!(bad.validate().is_err());
        assert!(serde_json::from_str::<ApiSettings>(r#"{"url":"u","key":"k","x":1}"#).is_err());
    }
}
