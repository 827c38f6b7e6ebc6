//! Fuzzes the Tracking API body parser and the message normalizer: arbitrary bytes
//! as a single-call body (first byte picks the endpoint) or a batch must never panic,
//! and every message that normalizes has the fields ingest relies on.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tributary_model::CallType;
use tributary_model::body::{BodyLimits, parse_body};

const CALLS: [Option<CallType>; 7] = [
    None,
    Some(CallType::Track),
    Some(CallType::Identify),
    Some(CallType::Page),
    Some(CallType::Screen),
    Some(CallType::Group),
    Some(CallType::Alias),
];

fuzz_target!(|data: &[u8]| {
    let Some((&selector, body)) = data.split_first() else {
        return;
    };
    let call = CALLS[selector as usize % CALLS.len()];
    let limits = BodyLimits {
        max_message_bytes: 32 * 1024,
        max_batch_messages: 2500,
    };
    let Ok(raw) = parse_body(body, call, limits) else {
        return;
    };
    let now = chrono::DateTime::from_timestamp(1_800_000_000, 0).unwrap();
    for n in raw.normalize_all(now, Some("127.0.0.1".into()), None).into_iter().flatten() {
        assert!(!n.message_id.is_empty() && n.message_id.chars().count() <= 100);
        assert!(n.user_id.is_some() || n.anonymous_id.is_some());
        for k in ["timestamp", "originalTimestamp", "receivedAt", "messageId", "type"] {
            assert!(n.body().get(k).and_then(|v| v.as_str()).is_some(), "missing {k}");
        }
        assert!(n.body().get("writeKey").is_none());
        serde_json::from_str::<serde_json::Value>(&n.payload).unwrap();
    }
});
