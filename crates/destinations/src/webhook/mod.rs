//! The `webhook` destination type: POST events as JSON to a URL.
//!
//! With `batch_size` 1 the body is the event itself (the normalized Segment JSON as
//! stored in the log, byte for byte); with a larger `batch_size` it is
//! `{"batch":[…]}`. When a secret is set, `X-Tributary-Signature: sha256=<hex>` is
//! the HMAC-SHA256 of the body under it, so receivers can authenticate us. A 2xx
//! means every event of the request was accepted; anything else fails the whole
//! request (the engine retries or dead-letters it). Receivers must tolerate
//! duplicates: delivery is at-least-once, and the events keep their `messageId` for
//! deduplication.

pub mod config;

use async_trait::async_trait;
use hmac::{Hmac, Mac};
use sha2::Sha256;

pub use config::WebhookSettings;

use crate::retry::DeliveryError;
use crate::sink::{Item, SendReport, Sink, execute, http_client};

/// The signature header.
pub const SIGNATURE_HEADER: &str = "X-Tributary-Signature";

/// Requests in flight per webhook destination.
const MAX_IN_FLIGHT: usize = 8;

/// The outbound side of a webhook destination.
pub(crate) struct WebhookSink {
    settings: WebhookSettings,
    client: reqwest::Client,
    headers: reqwest::header::HeaderMap,
}

impl WebhookSink {
    /// Builds the sink from validated settings.
    pub(crate) fn new(settings: WebhookSettings) -> Result<WebhookSink, String> {
        let client = http_client(settings.timeout())?;
        let mut headers = reqwest::header::HeaderMap::new();
        headers.insert(
            reqwest::header::CONTENT_TYPE,
            reqwest::header::HeaderValue::from_static("application/json"),
        );
        for (k, v) in &settings.headers {
            let name = reqwest::header::HeaderName::from_bytes(k.as_bytes())
                .map_err(|_| format!("invalid header name {k:?}"))?;
            let value = reqwest::header::HeaderValue::from_str(v)
                .map_err(|_| format!("invalid header value for {k:?}"))?;
            headers.insert(name, value);
        }
        Ok(WebhookSink {
            settings,
            client,
            headers,
        })
    }
}

/// `sha256=<hex>` of the HMAC-SHA256 of `body` under `secret`.
pub fn signature(secret: &str, body: &[u8]) -> String {
    let mut mac =
        Hmac::<Sha256>::new_from_slice(secret.as_bytes()).expect("hmac takes any key length");
    mac.update(body);
    format!("sha256={}", hex::encode(mac.finalize().into_bytes()))
}

/// The request body for a batch: the event itself when batching is off, else
/// `{"batch":[…]}`. Payloads are spliced in verbatim (they are JSON objects).
pub(crate) fn body(items: &[Item], batched: bool) -> Vec<u8> {
    if !batched && items.len() == 1 {
        return items[0].raw().as_bytes().to_vec();
    }
    let mut out = Vec::with_capacity(items.iter().map(Item::size).sum::<usize>() + 16);
    out.extend_from_slice(b"{\"batch\":[");
    for (i, item) in items.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        out.extend_from_slice(item.raw().as_bytes());
    }
    out.extend_from_slice(b"]}");
    out
}

#[async_trait]
impl Sink for WebhookSink {
    fn max_batch(&self) -> usize {
        self.settings.batch_size
    }

    fn max_in_flight(&self) -> usize {
        MAX_IN_FLIGHT
    }

    async fn send(&self, items: &[Item]) -> Result<SendReport, DeliveryError> {
        let body = body(items, self.settings.batch_size > 1);
        let mut req = self
            .client
            .post(&self.settings.url)
            .headers(self.headers.clone());
        if let Some(secret) = &self.settings.secret {
            req = req.header(SIGNATURE_HEADER, signature(secret, &body));
        }
        execute(req.body(body)).await?;
        Ok(SendReport::default())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signature_is_hmac_sha256_hex() {
        // RFC 4231 test case 2.
        assert_eq!(
            signature("Jefe", b"what do ya want for nothing?"),
            "sha256=5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
    }
}
