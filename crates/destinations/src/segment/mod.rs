//! The `segment` destination type: forward events to any Segment-compatible
//! Tracking API through `{host}/v1/batch`.
//!
//! Each request is `{"batch":[…],"sentAt":…}` with at most 100 events and at most
//! ~475 KB (Segment's documented 500 KB limit, with room for the envelope), sent
//! with HTTP Basic auth `base64(write_key:)`. Events are forwarded verbatim, keeping
//! their `messageId`, so a receiver that deduplicates (Segment, Tributary) turns our
//! at-least-once delivery into exactly-once storage. A 200 whose body lists
//! `"rejected":[{"index":i,…}]` (Tributary's partial-batch answer) dead-letters just
//! those events.

pub mod config;

use async_trait::async_trait;
use chrono::{SecondsFormat, Utc};
use serde_json::Value;

pub use config::SegmentSettings;

use crate::retry::DeliveryError;
use crate::sink::{Item, SendReport, Sink, execute, http_client};

/// Events per request.
const MAX_BATCH: usize = 100;
/// Payload bytes per request.
const MAX_BATCH_BYTES: usize = 475_000;
/// Requests in flight per segment destination.
const MAX_IN_FLIGHT: usize = 4;

/// The outbound side of a segment destination.
pub(crate) struct SegmentSink {
    settings: SegmentSettings,
    url: String,
    client: reqwest::Client,
}

impl SegmentSink {
    /// Builds the sink from validated settings.
    pub(crate) fn new(settings: SegmentSettings) -> Result<SegmentSink, String> {
        Ok(SegmentSink {
            url: settings.batch_url(),
            client: http_client(settings.timeout())?,
            settings,
        })
    }
}

/// The `/v1/batch` body: payloads spliced in verbatim plus `sentAt`.
pub(crate) fn body(items: &[Item], sent_at: &str) -> Vec<u8> {
    let mut out = Vec::with_capacity(items.iter().map(Item::size).sum::<usize>() + 64);
    out.extend_from_slice(b"{\"batch\":[");
    for (i, item) in items.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        out.extend_from_slice(item.raw().as_bytes());
    }
    out.extend_from_slice(b"],\"sentAt\":");
    out.extend_from_slice(Value::String(sent_at.to_string()).to_string().as_bytes());
    out.push(b'}');
    out
}

/// Reads `"rejected":[{"index":i,"code":…,"message":…}]` from a 200 answer.
fn rejections(resp: &[u8], n: usize) -> Vec<(usize, DeliveryError)> {
    let Ok(v) = serde_json::from_slice::<Value>(resp) else {
        return Vec::new();
    };
    let Some(list) = v.get("rejected").and_then(Value::as_array) else {
        return Vec::new();
    };
    list.iter()
        .filter_map(|r| {
            let index = r.get("index")?.as_u64()? as usize;
            (index < n).then(|| {
                let code = r.get("code").and_then(Value::as_str).unwrap_or("rejected");
                let message = r.get("message").and_then(Value::as_str).unwrap_or("");
                let text = format!("receiver rejected the event: {code} {message}");
                (
                    index,
                    DeliveryError::rejected(text.trim_end(), Some(r.to_string().as_bytes())),
                )
            })
        })
        .collect()
}

#[async_trait]
impl Sink for SegmentSink {
    fn max_batch(&self) -> usize {
        MAX_BATCH
    }

    fn max_batch_bytes(&self) -> usize {
        MAX_BATCH_BYTES
    }

    fn max_in_flight(&self) -> usize {
        MAX_IN_FLIGHT
    }

    async fn send(&self, items: &[Item]) -> Result<SendReport, DeliveryError> {
        let sent_at = Utc::now().to_rfc3339_opts(SecondsFormat::Millis, true);
        let req = self
            .client
            .post(&self.url)
            .basic_auth(&self.settings.write_key, Some(""))
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .body(body(items, &sent_at));
        let resp = execute(req).await?;
        Ok(SendReport {
            skipped: Vec::new(),
            rejected: rejections(&resp, items.len()),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_partial_rejections() {
        let r = rejections(
            br#"{"success":true,"rejected":[{"index":1,"code":"event_not_defined","message":"no event"},{"index":9}]}"#,
            3,
        );
        assert_eq!(r.len(), 1);
        assert_eq!(r[0].0, 1);
        assert!(!r[0].1.is_retriable());
        assert!(r[0].1.message.contains("event_not_defined"));
        assert!(rejections(b"{\"success\":true}", 3).is_empty());
        assert!(rejections(b"not json", 3).is_empty());
    }
}
