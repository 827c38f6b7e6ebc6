//! Fuzzes the ActiveCampaign webhook path the server runs inside each request:
//! `parse_form` then `map_webhook`, on arbitrary bytes. The first byte picks the
//! source settings (no `user_id_field`, a numeric field id, a perstag), the rest is
//! the body. Beyond "never panics", it checks the invariants the server relies on:
//! every mapped message has a 35-character `ac-` messageId, exactly one of
//! `userId`/`anonymousId`, and serializes to JSON.

#![no_main]

use libfuzzer_sys::fuzz_target;
use serde_json::Value;
use tributary_activecampaign::{Settings, map_webhook, parse_form};

fuzz_target!(|data: &[u8]| {
    let (selector, body) = data.split_first().map_or((0, data), |(b, rest)| (*b, rest));
    let settings = Settings {
        user_id_field: match selector % 3 {
            0 => None,
            1 => Some("32".to_owned()),
            _ => Some("%EXTERNAL_ID%".to_owned()),
        },
    };
    let Ok(pairs) = parse_form(body) else { return };
    let Ok(webhook) = map_webhook(&pairs, &settings) else { return };
    let Some(message) = webhook.message() else { return };

    let id = message.get("messageId").and_then(Value::as_str).unwrap_or("");
    assert!(id.starts_with("ac-") && id.len() == 35, "bad messageId {id:?}");
    let has = |k: &str| {
        message
            .get(k)
            .and_then(Value::as_str)
            .is_some_and(|s| !s.trim().is_empty())
    };
    assert!(has("userId") ^ has("anonymousId"), "identity: {message:?}");
    assert!(serde_json::to_vec(message).is_ok());
});
