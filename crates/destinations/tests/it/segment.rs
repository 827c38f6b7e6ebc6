//! The `segment` destination against a Segment-compatible receiver.

use std::time::Duration;

use base64::Engine as _;
use serde_json::{Value, json};

use crate::support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forwards_batches_with_basic_auth_and_honours_partial_rejections() {
    let h = Harness::new().await;
    let expected_auth = format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode("wk_123:")
    );
    let auth = expected_auth.clone();
    let rx = Receiver::start(move |req| {
        if req.header("authorization").as_deref() != Some(auth.as_str()) {
            return Reply::json(401, json!({"code": "unknown_source", "message": "bad key"}));
        }
        if req.uri.path() != "/v1/batch" {
            return Reply::status(404);
        }
        // Reject events without a userId, like a Tributary answering a partial batch.
        let rejected: Vec<Value> = req
            .events()
            .iter()
            .enumerate()
            .filter(|(_, e)| e["properties"]["bad"] == json!(true))
            .map(|(i, _)| json!({"index": i, "code": "event_not_defined", "message": "no"}))
            .collect();
        Reply::json(200, json!({"success": true, "rejected": rejected}))
    })
    .await;
    let dest = h
        .create(
            "segment",
            "downstream",
            json!({"write_key": "wk_123", "host": rx.url("/")}),
        )
        .await;
    assert_eq!(
        dest.settings["write_key"],
        json!(tributary_destinations::REDACTED)
    );
    let mut events: Vec<Value> = (0..250)
        .map(|i| track(&format!("u{}", i % 10), i))
        .collect();
    events[42]["properties"]["bad"] = json!(true);
    h.append(events.clone()).await;
    wait_for(Duration::from_secs(10), "forwarded", || async {
        rx.accepted().len() >= 250
    })
    .await;
    h.wait_idle(&dest.id).await;

    let reqs = rx.requests();
    assert!(
        reqs.iter().all(|(_, s)| *s == 200),
        "auth and path accepted"
    );
    assert!(reqs.len() >= 3, "batched, at most 100 per request");
    for (req, _) in &reqs {
        assert_eq!(req.method, axum::http::Method::POST);
        let body = req.json();
        let batch = body["batch"].as_array().unwrap();
        assert!(!batch.is_empty() && batch.len() <= 100);
        assert!(body["sentAt"].as_str().unwrap().ends_with('Z'));
        for e in batch {
            // Forwarded verbatim: messageId kept for the receiver's dedupe.
            assert!(e["messageId"].is_string());
            assert_eq!(e["type"], json!("track"));
        }
    }
    let ids: Vec<String> = events
        .iter()
        .map(|e| e["messageId"].as_str().unwrap().to_string())
        .collect();
    assert_exactly_once(&rx.accepted_ids(), &ids);
    let dead = h.engine.dead_letters(&dest.id, 10).await.unwrap();
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].message_id, ids[42]);
    assert!(dead[0].error.contains("event_not_defined"));
    let v = h.engine.get(&dest.id).await.unwrap();
    assert_eq!(v.stats.delivered, 249);
    h.engine.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_write_key_dead_letters_at_once() {
    let h = Harness::new().await;
    let rx = Receiver::start(|_| Reply::json(401, json!({"code": "unknown_source"}))).await;
    let dest = h
        .create(
            "segment",
            "bad key",
            json!({"write_key": "nope", "host": rx.url("")}),
        )
        .await;
    h.append((0..3).map(|i| track("u", i)).collect()).await;
    wait_for(Duration::from_secs(10), "dead letters", || async {
        h.engine.get(&dest.id).await.unwrap().stats.dead_letters == 3
    })
    .await;
    let dead = h.engine.dead_letters(&dest.id, 10).await.unwrap();
    assert!(
        dead.iter()
            .all(|d| d.last_status == Some(401) && d.attempts == 1)
    );
    h.engine.shutdown().await;
}
