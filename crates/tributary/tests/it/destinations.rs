//! Destinations through the running binary: events sent to Tributary reach a webhook
//! receiver on 127.0.0.1, and a `segment` destination forwards into a second running
//! Tributary, end to end.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::HeaderMap;
use axum::routing::post;
use reqwest::Method;
use serde_json::{Value, json};

use crate::harness::{Server, key_id};

type Received = Arc<Mutex<Vec<(HeaderMap, Value)>>>;

async fn receiver() -> (String, Received) {
    let got: Received = Arc::default();
    async fn hook(State(got): State<Received>, headers: HeaderMap, body: Bytes) -> &'static str {
        let v: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
        got.lock().unwrap().push((headers, v));
        "ok"
    }
    let app = Router::new()
        .route("/hook", post(hook))
        .with_state(got.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/hook", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (url, got)
}

fn message_ids(got: &Received) -> Vec<String> {
    let mut ids = Vec::new();
    for (_, v) in got.lock().unwrap().iter() {
        let items = match v.get("batch") {
            Some(Value::Array(a)) => a.clone(),
            _ => vec![v.clone()],
        };
        for i in items {
            if let Some(id) = i["messageId"].as_str() {
                ids.push(id.to_string());
            }
        }
    }
    ids
}

async fn wait_for(mut done: impl FnMut() -> bool, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn events_reach_a_webhook_destination_signed_and_only_from_its_sources() {
    let (url, got) = receiver().await;
    let s = Server::start();
    let (key, id) = key_id(
        &s.create_source("activecampaign", "AC", "activecampaign")
            .await,
    );
    let (other_key, _) = key_id(&s.create_source("http", "Other", "other").await);
    let (st, dest) = s
        .admin(
            Method::POST,
            "/destinations",
            Some(json!({"type":"webhook","name":"My Hook","source_ids":[id],
                "settings":{"url": url, "secret":"s3cret", "headers":{"X-Team":"growth"}}})),
        )
        .await;
    assert_eq!(st, 201, "{dest}");
    let (st, v) = s
        .admin(Method::POST, "/destinations", Some(json!({"type":"webhook","name":"x","source_ids":["src_nope"],"settings":{"url":url}})))
        .await;
    assert_eq!((st, v["code"].as_str()), (400, Some("invalid_destination")));
    for i in 0..5 {
        s.post(
            "/v1/track",
            &key,
            json!({"userId":"u","event":"Email Opened","messageId":format!("d-{i}")}),
        )
        .await;
    }
    s.post(
        "/v1/track",
        &other_key,
        json!({"userId":"u","event":"Elsewhere","messageId":"other-1"}),
    )
    .await;
    wait_for(|| message_ids(&got).len() >= 5, "5 deliveries").await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut ids = message_ids(&got);
    ids.sort();
    assert_eq!(
        ids,
        (0..5).map(|i| format!("d-{i}")).collect::<Vec<_>>(),
        "only the AC source's events, once each"
    );
    let (headers, _) = got.lock().unwrap()[0].clone();
    assert_eq!(headers["x-team"], "growth");
    assert!(
        headers
            .iter()
            .any(|(k, v)| k.as_str().contains("signature")
                && v.to_str().unwrap().contains("sha256=")),
        "signed: {headers:?}"
    );
    let dest_id = dest["id"].as_str().unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (_, d) = s
            .admin(Method::GET, &format!("/destinations/{dest_id}"), None)
            .await;
        if d["stats"]["delivered"] == 5 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "stats never showed 5 delivered: {d}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn a_segment_destination_forwards_into_a_second_tributary() {
    let downstream = Server::start();
    let (down_key, down_id) = key_id(
        &downstream
            .create_source("http", "From upstream", "upstream")
            .await,
    );
    let upstream = Server::start();
    let (up_key, _) = key_id(&upstream.create_source("http", "Web", "web").await);
    let (st, v) = upstream
        .admin(
            Method::POST,
            "/destinations",
            Some(json!({"type":"segment","name":"Downstream","settings":{"write_key": down_key, "host": downstream.url}})),
        )
        .await;
    assert_eq!(st, 201, "{v}");
    let batch: Vec<Value> = (0..20)
        .map(|i| json!({"type":"track","userId":format!("u{}", i % 3),"event":"Signed Up","messageId":format!("fw-{i}"),"properties":{"n":i}}))
        .collect();
    let (st, _) = upstream
        .post("/v1/batch", &up_key, json!({"batch": batch}))
        .await;
    assert_eq!(st, 200);
    let deadline = Instant::now() + Duration::from_secs(20);
    let events = loop {
        let ev = downstream.events(&down_id, 100).await;
        if ev.len() >= 20 || Instant::now() > deadline {
            break ev;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(events.len(), 20, "downstream got {} of 20", events.len());
    let e = events.iter().find(|e| e["messageId"] == "fw-7").unwrap();
    assert_eq!(e["event"], "Signed Up");
    assert_eq!(e["userId"], "u1");
    assert_eq!(e["properties"]["n"], 7);
}

#[tokio::test]
async fn a_new_destination_starts_now_by_default_or_from_the_beginning_or_a_time() {
    let s = Server::start();
    let (key, id) = key_id(&s.create_source("http", "Web", "web").await);
    for i in 0..3 {
        let (st, _) = s
            .post(
                "/v1/track",
                &key,
                json!({"userId":"u","event":"Old","messageId":format!("old-{i}")}),
            )
            .await;
        assert_eq!(st, 200);
        // Distinct receive times, so a start time can fall between two events.
        tokio::time::sleep(Duration::from_millis(30)).await;
    }
    let events = s.events(&id, 10).await;
    let old_1 = events.iter().find(|e| e["messageId"] == "old-1").unwrap();
    let at = old_1["receivedAt"].as_str().unwrap().to_string();

    let mut receivers = Vec::new();
    for (name, start) in [
        ("Default", None),
        ("Now", Some(json!("now"))),
        ("Beginning", Some(json!("beginning"))),
        ("At", Some(json!(at))),
    ] {
        let (url, got) = receiver().await;
        let mut body = json!({"type":"webhook","name":name,"settings":{"url": url}});
        if let Some(st) = start {
            body["start"] = st;
        }
        let (st, v) = s.admin(Method::POST, "/destinations", Some(body)).await;
        assert_eq!(st, 201, "{name}: {v}");
        receivers.push((name, got));
    }
    let (st, v) = s
        .admin(
            Method::POST,
            "/destinations",
            Some(json!({"type":"webhook","name":"Bad","start":"yesterday",
                "settings":{"url":"http://127.0.0.1:9/h"}})),
        )
        .await;
    assert_eq!(st, 400, "{v}");
    assert!(
        v["message"].as_str().unwrap_or("").contains("beginning"),
        "{v}"
    );

    let (st, _) = s
        .post(
            "/v1/track",
            &key,
            json!({"userId":"u","event":"New","messageId":"new-0"}),
        )
        .await;
    assert_eq!(st, 200);
    let expected = |name: &str| -> Vec<&str> {
        match name {
            "Beginning" => vec!["new-0", "old-0", "old-1", "old-2"],
            "At" => vec!["new-0", "old-1", "old-2"],
            _ => vec!["new-0"],
        }
    };
    for (name, got) in &receivers {
        let want = expected(name);
        wait_for(|| message_ids(got).len() >= want.len(), name).await;
    }
    // Anything extra would have arrived with the rest; give it a moment anyway.
    tokio::time::sleep(Duration::from_millis(300)).await;
    for (name, got) in &receivers {
        let mut ids = message_ids(got);
        ids.sort();
        assert_eq!(ids, expected(name), "destination {name}");
    }
}
