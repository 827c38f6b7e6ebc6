//! The contract between the delivery engine and a destination type.
//!
//! A [`Sink`] turns a batch of events into outbound requests and classifies the
//! result. It keeps no delivery state: retries, ordering, cursors and dead letters
//! belong to the engine ([`crate::worker`]), so every type gets the same
//! at-least-once guarantee. A sink must be safe to call again with the same batch
//! after any failure (the engine retries whole batches).

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use serde::Deserialize;
use serde_json::Value;
use serde_json::value::RawValue;

use tributary_eventlog::Record;

use crate::retry::DeliveryError;

/// One event on its way to a destination.
///
/// The engine routes on log columns (call type, event name, `userId`,
/// `anonymousId`); only `integrations` comes from the payload, which is parsed for it
/// only when it has that key. The payload itself stays the stored string, which JSON
/// sinks splice into request bodies verbatim. Sinks that transform events parse it
/// themselves ([`Item::value`]).
#[derive(Debug, Clone)]
pub(crate) struct Item {
    /// The log record (its `payload` is sent verbatim by JSON sinks).
    pub record: Arc<Record>,
    /// The payload's `integrations` object, when it has one.
    pub integrations: Option<Arc<Value>>,
    /// The ordering key: one user's events are delivered in log order.
    pub user: Arc<str>,
    /// Read from the live cursor (false for replays).
    pub live: bool,
    /// May already have reached the receiver before a crash.
    pub maybe_dup: bool,
    /// The dead letter this item replays, if any.
    pub dead_letter_id: Option<i64>,
}

/// The routing fields of a payload, borrowed from it; everything else is skipped
/// unparsed but still checked to be JSON. (Skipped parts get a syntax check only:
/// serde_json neither range-checks numbers nor pairs `\u` surrogates it skips.
/// Payloads in the log are written by serde_json, so never differ on that.)
#[derive(Deserialize)]
struct Routing<'a> {
    #[serde(borrow, default)]
    integrations: Option<&'a RawValue>,
}

impl Item {
    /// Builds an item from a log record: its ordering key from the record's ids,
    /// its `integrations` from the payload when the payload names them. `None` when
    /// such a payload is not JSON (ingest writes every payload with serde_json, so
    /// one without `integrations` is not parsed at all).
    pub(crate) fn from_record(r: Record, live: bool) -> Option<Item> {
        let user = key_from_ids(
            r.user_id.clone().filter(|u| !u.is_empty()),
            r.anonymous_id.clone().filter(|a| !a.is_empty()),
            &r.message_id,
        );
        let integrations = if r.payload.contains("\"integrations\"") {
            integrations_of(&r.payload)?
        } else {
            None
        };
        Some(Item {
            user: user.into(),
            record: Arc::new(r),
            integrations: integrations.map(Arc::new),
            live,
            maybe_dup: false,
            dead_letter_id: None,
        })
    }

    /// Position in the log.
    pub(crate) fn seq(&self) -> u64 {
        self.record.seq
    }

    /// The payload as stored.
    pub(crate) fn raw(&self) -> &str {
        &self.record.payload
    }

    /// The payload, parsed (for sinks that transform events).
    pub(crate) fn value(&self) -> serde_json::Result<Value> {
        serde_json::from_str(self.raw())
    }

    /// Bytes this item adds to a request body.
    pub(crate) fn size(&self) -> usize {
        self.record.payload.len() + 1
    }
}

/// The ordering key of an event: its userId, else its anonymousId, else its own
/// messageId (an event with no identity is ordered with nothing).
#[cfg(test)]
pub(crate) fn user_key(v: &Value, message_id: &str) -> String {
    fn id(v: Option<&Value>) -> Option<String> {
        match v? {
            Value::String(s) if !s.is_empty() => Some(s.clone()),
            Value::Number(n) => Some(n.to_string()),
            _ => None,
        }
    }
    key_from_ids(id(v.get("userId")), id(v.get("anonymousId")), message_id)
}

fn key_from_ids(user: Option<String>, anonymous: Option<String>, message_id: &str) -> String {
    if let Some(u) = user {
        format!("u:{u}")
    } else if let Some(a) = anonymous {
        format!("a:{a}")
    } else {
        format!("m:{message_id}")
    }
}

/// The payload's `integrations` object (`Some(None)` when it has none or it is not an
/// object); `None` when the payload is not JSON.
fn integrations_of(payload: &str) -> Option<Option<Value>> {
    match serde_json::from_str::<Routing<'_>>(payload) {
        Ok(route) if payload.trim_start().starts_with('{') => Some(
            route
                .integrations
                .filter(|raw| raw.get().starts_with('{'))
                .and_then(|raw| serde_json::from_str::<Value>(raw.get()).ok()),
        ),
        // Not an object, a repeated key, or not JSON: the general (slow) path
        // decides, exactly as for any other payload.
        _ => {
            let value: Value = serde_json::from_str(payload).ok()?;
            Some(value.get("integrations").filter(|v| v.is_object()).cloned())
        }
    }
}

/// What a sink did with a batch that did not fail as a whole.
#[derive(Debug, Default)]
pub(crate) struct SendReport {
    /// Indexes (into the batch) of events the destination does not take (e.g. an
    /// ActiveCampaign identify without an email). Counted as skipped.
    pub skipped: Vec<usize>,
    /// Indexes of events the receiver refused for good, with why. Dead letters.
    pub rejected: Vec<(usize, DeliveryError)>,
}

/// A destination type's outbound side.
#[async_trait]
pub(crate) trait Sink: Send + Sync + 'static {
    /// Most events in one call to [`Sink::send`].
    fn max_batch(&self) -> usize;
    /// Most payload bytes in one call (a batch always holds at least one event).
    fn max_batch_bytes(&self) -> usize {
        usize::MAX
    }
    /// Most concurrent calls to [`Sink::send`] for one destination.
    fn max_in_flight(&self) -> usize;
    /// Delivers a batch. `Err` means the whole batch failed (and is retried when
    /// the error is retriable).
    async fn send(&self, items: &[Item]) -> Result<SendReport, DeliveryError>;
}

/// The HTTP client every sink uses: no redirects (a 3xx is a permanent failure,
/// never a silent re-POST), the given timeout, rustls with the ring provider.
pub(crate) fn http_client(timeout: Duration) -> Result<reqwest::Client, String> {
    install_crypto_provider();
    reqwest::Client::builder()
        .timeout(timeout)
        .connect_timeout(timeout.min(Duration::from_secs(10)))
        .redirect(reqwest::redirect::Policy::none())
        .user_agent(concat!("tributary/", env!("CARGO_PKG_VERSION")))
        .pool_max_idle_per_host(32)
        .build()
        .map_err(|e| format!("http client: {e}"))
}

/// Installs rustls' ring provider once per process (reqwest is built without one).
pub(crate) fn install_crypto_provider() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        // Another crate may already have installed one; either is fine.
        let _ = rustls::crypto::ring::default_provider().install_default();
    });
}

/// Sends a prepared request and turns a non-2xx answer or a transport failure into
/// a classified [`DeliveryError`]; on 2xx returns the body.
pub(crate) async fn execute(req: reqwest::RequestBuilder) -> Result<Vec<u8>, DeliveryError> {
    let resp = req
        .send()
        .await
        .map_err(|e| DeliveryError::from_transport(&e))?;
    let status = resp.status();
    let retry_after = crate::retry::retry_after_header(resp.headers());
    let body = resp
        .bytes()
        .await
        .map_err(|e| DeliveryError::from_transport(&e))?;
    if status.is_success() {
        Ok(body.to_vec())
    } else {
        Err(DeliveryError::from_status(
            status.as_u16(),
            retry_after,
            &body,
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn user_key_prefers_user_then_anonymous_then_message() {
        assert_eq!(
            user_key(&json!({"userId":"u1","anonymousId":"a"}), "m"),
            "u:u1"
        );
        assert_eq!(
            user_key(&json!({"userId":"","anonymousId":"a"}), "m"),
            "a:a"
        );
        assert_eq!(user_key(&json!({"userId": 42}), "m"), "u:42");
        assert_eq!(user_key(&json!({}), "m1"), "m:m1");
    }

    /// A record as ingest writes it: the ids are the payload's (as `user_key` reads
    /// them), in their own columns.
    fn record(payload: &str) -> Record {
        let v: Option<Value> = serde_json::from_str(payload).ok();
        let id = |k: &str| match v.as_ref().and_then(|v| v.get(k)) {
            Some(Value::String(s)) => Some(s.clone()),
            Some(Value::Number(n)) => Some(n.to_string()),
            _ => None,
        };
        Record {
            partition: 0,
            seq: 1,
            source_id: "s".into(),
            message_id: "m1".into(),
            call_type: tributary_eventlog::CallType::Track,
            event: None,
            user_id: id("userId"),
            anonymous_id: id("anonymousId"),
            received_at_ms: 0,
            payload: payload.into(),
        }
    }

    /// Routing from the record's columns and the payload's `integrations` matches
    /// a full parse of the payload.
    #[test]
    fn routing_fields_match_a_full_parse() {
        for payload in [
            r#"{"userId":"u1","anonymousId":"a"}"#,
            r#"{"userId":"","anonymousId":"a"}"#,
            r#"{"userId":null,"anonymousId":7}"#,
            r#"{"userId":42}"#,
            r#"{"userId":-1.50e3}"#,
            r#"{"userId":1e2,"integrations":{"All":false,"X":{"a":[1]}}}"#,
            r#"{"userId":"a\"b\u00e9\n","properties":{"x":[1,{"y":"z"}]}}"#,
            r#"{"userId":{"nested":1},"anonymousId":["a"],"integrations":null}"#,
            r#"{"userId":true,"anonymousId":"\ud83d\ude00","integrations":[1]}"#,
            r#" { "userId" : "sp" , "integrations" : { "All" : true } } "#,
            r#"{"userId":"first","userId":"second"}"#,
            r#"{}"#,
            r#"[1,2]"#,
            r#""just a string""#,
            r#"12"#,
        ] {
            let item = Item::from_record(record(payload), true).unwrap();
            let v: Value = serde_json::from_str(payload).unwrap();
            assert_eq!(&*item.user, user_key(&v, "m1"), "{payload}");
            assert_eq!(
                item.integrations.as_deref(),
                v.get("integrations").filter(|i| i.is_object()),
                "{payload}"
            );
            assert_eq!(item.raw(), payload);
            assert_eq!(item.value().unwrap(), v);
        }
        for bad in [
            r#"{"integrations":{"#,
            r#"{"integrations":{}} x"#,
            r#"{"integrations":tru}"#,
        ] {
            assert!(Item::from_record(record(bad), true).is_none(), "{bad}");
        }
    }
}
