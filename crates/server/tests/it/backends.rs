//! Issue #12's backends through the router: the live stream over SSE (an event
//! posted after subscribing arrives; a reconnect with `Last-Event-ID` gets what it
//! missed; rejected messages and unmapped ActiveCampaign types are in it), the email
//! report's refusals, and the fate route's 404s.

use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::http::{Request, StatusCode};
use http_body_util::BodyExt;
use serde_json::{Value, json};
use tower::ServiceExt;
use tributary_server::control::SourceType;
use tributary_server::{AppState, Config, open_state, router};

/// The full state on a temporary data dir with the embedded warehouse.
async fn state() -> (Arc<AppState>, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let config = Config {
        data_dir: dir.path().to_path_buf(),
        admin_token: Some("t".into()),
        ..Default::default()
    };
    (open_state(config).await.unwrap(), dir)
}

async fn close(state: &AppState) {
    state.shutdown.trigger();
    if let Some(w) = &state.warehouse {
        w.shutdown().await;
    }
    state.destinations.shutdown().await;
    state.log.close().await;
}

async fn get(app: &axum::Router, path: &str, token: Option<&str>) -> (StatusCode, Value) {
    let mut req = Request::get(path);
    if let Some(t) = token {
        req = req.header("authorization", format!("Bearer {t}"));
    }
    let resp = app
        .clone()
        .oneshot(req.body(Body::empty()).unwrap())
        .await
        .unwrap();
    let status = resp.status();
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    (status, serde_json::from_slice(&body).unwrap_or(Value::Null))
}

async fn track(app: &axum::Router, key: &str, body: Value) -> StatusCode {
    let mut body = body;
    body["writeKey"] = json!(key);
    let req = Request::post("/v1/track")
        .header("content-type", "application/json")
        .body(Body::from(body.to_string()))
        .unwrap();
    app.clone().oneshot(req).await.unwrap().status()
}

/// An SSE response body, read event by event.
struct Events {
    body: Body,
    buf: String,
}

/// One parsed SSE event.
#[derive(Debug)]
struct Sse {
    id: u64,
    event: String,
    data: Value,
}

impl Events {
    async fn open(app: &axum::Router, source: &str, last_id: Option<u64>) -> Events {
        let mut req = Request::get(format!("/api/v1/sources/{source}/events/stream"))
            .header("authorization", "Bearer t");
        if let Some(id) = last_id {
            req = req.header("last-event-id", id.to_string());
        }
        let resp = app
            .clone()
            .oneshot(req.body(Body::empty()).unwrap())
            .await
            .unwrap();
        assert_eq!(resp.status(), StatusCode::OK);
        assert_eq!(
            resp.headers()["content-type"].to_str().unwrap(),
            "text/event-stream"
        );
        Events {
            body: resp.into_body(),
            buf: String::new(),
        }
    }

    /// The next event (comments skipped), waiting at most 5 s.
    async fn next(&mut self) -> Sse {
        loop {
            if let Some(end) = self.buf.find("\n\n") {
                let block: String = self.buf.drain(..end + 2).collect();
                let (mut id, mut event, mut data) = (None, String::new(), String::new());
                for line in block.lines() {
                    if let Some(v) = line.strip_prefix("id:") {
                        id = v.trim().parse().ok();
                    } else if let Some(v) = line.strip_prefix("event:") {
                        event = v.trim().to_string();
                    } else if let Some(v) = line.strip_prefix("data:") {
                        data.push_str(v.trim_start());
                    }
                }
                if let Some(id) = id {
                    return Sse {
                        id,
                        event,
                        data: serde_json::from_str(&data).unwrap(),
                    };
                }
                continue;
            }
            let frame = tokio::time::timeout(Duration::from_secs(5), self.body.frame())
                .await
                .expect("no SSE event within 5 s")
                .expect("the stream ended")
                .unwrap();
            if let Ok(data) = frame.into_data() {
                self.buf.push_str(std::str::from_utf8(&data).unwrap());
            }
        }
    }
}

#[tokio::test]
async fn the_live_stream_shows_accepted_and_rejected_messages_and_resumes_with_last_event_id() {
    let (state, _dir) = state().await;
    let src = state
        .control
        .create(SourceType::Http, "web", "web", json!({}))
        .unwrap();
    let other = state
        .control
        .create(SourceType::Http, "app", "app", json!({}))
        .unwrap();
    let app = router(state.clone());
    assert!(!state.live.watched(), "nobody watches yet");

    let mut events = Events::open(&app, &src.id, None).await;
    assert_eq!(state.live.watchers(), 1);
    let first = json!({"userId": "u1", "event": "Signed Up", "messageId": "m-1",
                       "context": {"traits": {"email": "u1@example.com"}}});
    assert_eq!(track(&app, &src.write_key, first).await, StatusCode::OK);
    // Another source's events are not in this source's stream.
    let noise = json!({"userId": "u9", "event": "Elsewhere"});
    assert_eq!(track(&app, &other.write_key, noise).await, StatusCode::OK);
    let missing_event = json!({"userId": "u2"});
    assert_eq!(
        track(&app, &src.write_key, missing_event).await,
        StatusCode::BAD_REQUEST
    );

    let a = events.next().await;
    assert_eq!(a.event, "accepted");
    assert_eq!(a.data["kind"], "accepted");
    assert_eq!(a.data["source_id"], src.id.as_str());
    assert_eq!(a.data["event"], "Signed Up");
    assert_eq!(a.data["call_type"], "track");
    assert_eq!(a.data["message_id"], "m-1");
    assert_eq!(a.data["user_id"], "u1");
    assert_eq!(a.data["email"], "u1@example.com");
    assert_eq!(a.data["body"]["messageId"], "m-1");
    assert!(a.data["body"]["receivedAt"].is_string(), "normalized body");
    let r = events.next().await;
    assert!(r.id > a.id);
    assert_eq!(r.event, "rejected");
    assert_eq!(
        r.data["reason"]["code"], "event_not_defined",
        "{:?}",
        r.data
    );
    assert_eq!(r.data["call_type"], "track");
    assert!(r.data["body"].get("writeKey").is_none(), "no secret shown");
    assert!(r.data["reason"]["message"].is_string());
    assert_eq!(r.data["body"]["userId"], "u2", "the message as sent");

    // The watcher goes away; an event arrives meanwhile; the reconnect resumes.
    drop(events);
    let second = json!({"userId": "u1", "event": "Second", "messageId": "m-2"});
    assert_eq!(track(&app, &src.write_key, second).await, StatusCode::OK);
    let mut events = Events::open(&app, &src.id, Some(a.id)).await;
    let again = events.next().await;
    assert_eq!((again.id, again.event.as_str()), (r.id, "rejected"));
    let missed = events.next().await;
    assert_eq!(missed.data["event"], "Second");
    // …and then live entries.
    let third = json!({"userId": "u1", "event": "Third"});
    assert_eq!(track(&app, &src.write_key, third).await, StatusCode::OK);
    assert_eq!(events.next().await.data["event"], "Third");
    drop(events);
    close(&state).await;
}

#[tokio::test]
async fn a_batch_is_streamed_message_by_message_with_its_rejections_and_resumes_inside_it() {
    let (state, _dir) = state().await;
    let src = state
        .control
        .create(SourceType::Http, "web", "web", json!({}))
        .unwrap();
    let app = router(state.clone());
    let mut events = Events::open(&app, &src.id, None).await;
    let batch: Vec<Value> = (0..5)
        .map(|i| {
            if i == 2 {
                // No event name: refused, shown with its reason.
                json!({"type": "track", "userId": "u2", "messageId": "b-2"})
            } else {
                json!({"type": "identify", "userId": format!("u{i}"), "messageId": format!("b-{i}"),
                       "traits": {"email": format!("u{i}@example.com"), "name": "<b>x</b>\n\"q\""}})
            }
        })
        .collect();
    let body = json!({"writeKey": src.write_key, "batch": batch}).to_string();
    let req = Request::post("/v1/batch")
        .header("content-type", "application/json")
        .body(Body::from(body))
        .unwrap();
    assert_eq!(
        app.clone().oneshot(req).await.unwrap().status(),
        StatusCode::OK
    );
    let mut got = Vec::new();
    for _ in 0..5 {
        got.push(events.next().await);
    }
    let rejected: Vec<&Sse> = got.iter().filter(|e| e.event == "rejected").collect();
    assert_eq!(rejected.len(), 1, "{got:?}");
    assert_eq!(rejected[0].data["message_id"], "b-2");
    assert!(rejected[0].data["body"].get("writeKey").is_none());
    assert_eq!(rejected[0].data["body"]["userId"], "u2", "as sent");
    let accepted: Vec<&Sse> = got.iter().filter(|e| e.event == "accepted").collect();
    assert_eq!(
        accepted
            .iter()
            .map(|e| e.data["message_id"].as_str().unwrap())
            .collect::<Vec<_>>(),
        vec!["b-0", "b-1", "b-3", "b-4"],
        "in order, one event per message"
    );
    let ids: Vec<u64> = accepted.iter().map(|e| e.id).collect();
    assert!(
        ids.windows(2).all(|w| w[1] == w[0] + 1),
        "consecutive ids: {ids:?}"
    );
    for e in &accepted {
        assert_eq!(e.data["id"], e.id, "the JSON carries the SSE id");
        assert_eq!(e.data["call_type"], "identify");
        assert_eq!(e.data["source_id"], src.id.as_str());
        let uid = e.data["user_id"].as_str().unwrap();
        assert_eq!(e.data["email"], format!("{uid}@example.com"));
        assert_eq!(
            e.data["body"]["traits"]["name"], "<b>x</b>\n\"q\"",
            "raw body intact"
        );
        assert!(e.data["body"]["receivedAt"].is_string(), "normalized body");
    }
    // A reconnect from the middle of the batch gets the rest of it only.
    drop(events);
    let mut events = Events::open(&app, &src.id, Some(ids[1])).await;
    let rest: Vec<String> = [events.next().await, events.next().await]
        .iter()
        .map(|e| e.data["message_id"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(rest, vec!["b-3", "b-4"]);
    drop(events);
    close(&state).await;
}

#[tokio::test]
async fn unmapped_activecampaign_types_are_in_the_live_stream() {
    let (state, _dir) = state().await;
    let src = state
        .control
        .create(SourceType::Activecampaign, "ac", "ac", json!({}))
        .unwrap();
    let app = router(state.clone());
    let mut events = Events::open(&app, &src.id, None).await;
    let req = Request::post(format!(
        "/v1/webhooks/activecampaign?writeKey={}",
        src.write_key
    ))
    .header("content-type", "application/x-www-form-urlencoded")
    .body(Body::from(
        "type=deal_add&date_time=2024-02-28T07%3A04%3A13-06%3A00&deal%5Bid%5D=5",
    ))
    .unwrap();
    assert_eq!(
        app.clone().oneshot(req).await.unwrap().status(),
        StatusCode::OK
    );
    let e = events.next().await;
    assert_eq!(e.event, "unmapped");
    assert_eq!(e.data["event"], "deal_add");
    assert_eq!(e.data["body"]["fields"]["deal[id]"], "5", "{:?}", e.data);
    drop(events);
    close(&state).await;
}

#[tokio::test]
async fn the_live_stream_and_fate_need_the_admin_token_and_a_known_source() {
    let (state, _dir) = state().await;
    let src = state
        .control
        .create(SourceType::Http, "web", "web", json!({}))
        .unwrap();
    let app = router(state.clone());
    let stream = format!("/api/v1/sources/{}/events/stream", src.id);
    assert_eq!(get(&app, &stream, None).await.0, StatusCode::UNAUTHORIZED);
    let (st, e) = get(&app, "/api/v1/sources/src_nope/events/stream", Some("t")).await;
    assert_eq!(st, StatusCode::NOT_FOUND);
    assert_eq!(e["code"], "not_found");
    let (st, e) = get(
        &app,
        &format!("/api/v1/sources/{}/events/m-404", src.id),
        Some("t"),
    )
    .await;
    assert_eq!(st, StatusCode::NOT_FOUND, "{e}");
    assert!(e["message"].as_str().unwrap().contains("m-404"), "{e}");
    let (st, _) = get(&app, "/api/v1/sources/src_nope/events/m-1", Some("t")).await;
    assert_eq!(st, StatusCode::NOT_FOUND);
    close(&state).await;
}

#[tokio::test]
async fn the_email_report_refuses_bad_input_clearly() {
    let (state, _dir) = state().await;
    let src = state
        .control
        .create(SourceType::Activecampaign, "ac", "ac", json!({}))
        .unwrap();
    let app = router(state.clone());
    let base = format!("/api/v1/reports/email?source={}", src.id);
    assert_eq!(get(&app, &base, None).await.0, StatusCode::UNAUTHORIZED);
    let (st, r) = get(&app, &base, Some("t")).await;
    assert_eq!(st, StatusCode::OK, "{r}");
    assert_eq!(
        r["campaigns"],
        json!([]),
        "nothing loaded yet: an empty report"
    );
    assert!(r["definitions"]["click_to_open_rate"].is_string());
    for (path, code) in [
        ("/api/v1/reports/email".to_string(), "invalid_query"),
        (format!("{base}&from=yesterday"), "invalid_query"),
        (format!("{base}&to=2026-13-01"), "invalid_query"),
        (
            format!("{base}&from=2026-03-02&to=2026-03-01"),
            "invalid_query",
        ),
    ] {
        let (st, e) = get(&app, &path, Some("t")).await;
        assert_eq!(st, StatusCode::BAD_REQUEST, "{path}: {e}");
        assert_eq!(e["code"], code, "{path}: {e}");
        assert!(e["message"].is_string());
    }
    let (st, e) = get(&app, "/api/v1/reports/email?source=src_nope", Some("t")).await;
    assert_eq!(st, StatusCode::NOT_FOUND, "{e}");
    close(&state).await;
}

/// The live bus's cost on ingest: the same batches through the router with no
/// watcher and with 10 SSE watchers reading (a no-op log and no warehouse, so the
/// bus's share is as large as it can be). Prints the times; run with
/// `cargo test -p tributary-server --test it -- --ignored live_cost --nocapture`
/// (a release build gives the real figures).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "measurement, prints numbers"]
async fn live_cost() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = Config {
        data_dir: dir.path().to_path_buf(),
        admin_token: Some("t".into()),
        ..Default::default()
    };
    config.warehouse.url = "off".into();
    let parts = tributary_server::Parts {
        log: Some(Arc::new(crate::refusals::AckLog::default())),
        ..Default::default()
    };
    let state = tributary_server::open_state_with(config, parts)
        .await
        .unwrap();
    let src = state
        .control
        .create(SourceType::Http, "web", "web", json!({}))
        .unwrap();
    let app = router(state.clone());
    let batch: Vec<Value> = (0..20)
        .map(|i| {
            json!({"type": "track", "userId": format!("u{i}"), "event": "Email Opened",
                   "properties": {"campaign_id": "42", "campaign_name": "March newsletter",
                                  "email_subject": "Spring is here", "link_url": "https://shop.example.com/spring"},
                   "context": {"traits": {"email": format!("u{i}@example.com")}}})
        })
        .collect();
    let body = json!({"writeKey": src.write_key, "batch": batch}).to_string();
    let run = |n: usize| {
        let app = app.clone();
        let body = body.clone();
        async move {
            let t = std::time::Instant::now();
            for _ in 0..n {
                let req = Request::post("/v1/batch")
                    .header("content-type", "application/json")
                    .body(Body::from(body.clone()))
                    .unwrap();
                assert_eq!(
                    app.clone().oneshot(req).await.unwrap().status(),
                    StatusCode::OK
                );
            }
            t.elapsed()
        }
    };
    run(200).await;
    let (mut idle, mut ring, mut raw, mut watched) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for _ in 0..3 {
        // Let the ring's linger window close so "idle" really has no watcher.
        tokio::time::sleep(tributary_server::live::LINGER + Duration::from_millis(100)).await;
        assert!(!state.live.watched());
        idle.push(run(1000).await);
        // Entries built and kept in the ring, nobody receiving.
        state.live.linger();
        ring.push(run(1000).await);
        // Ten receivers on the bus itself (no HTTP).
        let mut readers = Vec::new();
        for _ in 0..10 {
            let (_, mut rx) = state.live.subscribe_after(None);
            readers.push(tokio::spawn(async move {
                while let Ok(Ok(_) | Err(tokio::sync::broadcast::error::RecvError::Lagged(_))) =
                    tokio::time::timeout(Duration::from_millis(500), rx.recv()).await
                {
                }
            }));
        }
        raw.push(run(1000).await);
        for r in readers {
            r.abort();
        }
        // Ten SSE watchers.
        let mut readers = Vec::new();
        for _ in 0..10 {
            let mut ev = Events::open(&app, &src.id, None).await;
            readers.push(tokio::spawn(async move {
                while let Ok(Some(Ok(_))) =
                    tokio::time::timeout(Duration::from_millis(500), ev.body.frame()).await
                {
                }
            }));
        }
        watched.push(run(1000).await);
        for r in readers {
            r.abort();
        }
    }
    let best = |v: &[Duration]| v.iter().min().copied().unwrap();
    let pct = |v: &[Duration]| (best(v).as_secs_f64() / best(&idle).as_secs_f64() - 1.0) * 100.0;
    eprintln!(
        "live_cost: 1000 batches of 20 messages, best of 3: idle {:?}; ring only {:?} ({:+.1} %); 10 bus receivers {:?} ({:+.1} %); 10 SSE watchers {:?} ({:+.1} %)",
        best(&idle),
        best(&ring),
        pct(&ring),
        best(&raw),
        pct(&raw),
        best(&watched),
        pct(&watched),
    );
    close(&state).await;
}

async fn batch(app: &axum::Router, key: &str, messages: Vec<Value>) {
    let body = json!({"writeKey": key, "batch": messages});
    let req = Request::post("/v1/batch")
        .header("content-type", "application/json")
        .body(Body::from(body.to_string()))
        .unwrap();
    let resp = app.clone().oneshot(req).await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
}

/// Waits until the warehouse loaded everything the log holds.
async fn wait_loaded(state: &AppState) {
    let w = state.warehouse.as_ref().expect("warehouse");
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    while w.lag().events > 0 || w.lag().loaded_seq == 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "loader behind: {:?}",
            w.lag()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// An event with more than the debugger's 10,000-event window of newer events of
/// its source is still found, through its warehouse row; the sources list counts
/// every event of today, not the newest 100.
#[tokio::test]
async fn the_fate_of_an_event_older_than_ten_thousand_newer_ones_is_found() {
    let (state, _dir) = state().await;
    let src = state
        .control
        .create(SourceType::Http, "web", "web", json!({}))
        .unwrap();
    let app = router(state.clone());
    let old =
        json!({"type": "track", "event": "Signed Up", "userId": "u-old", "messageId": "m-old"});
    batch(&app, &src.write_key, vec![old]).await;
    for b in 0..5 {
        let newer: Vec<Value> = (0..2001)
            .map(|i| {
                json!({"type": "track", "event": "Page Viewed", "userId": format!("u{i}"),
                            "messageId": format!("m-{b}-{i}")})
            })
            .collect();
        batch(&app, &src.write_key, newer).await;
    }
    wait_loaded(&state).await;
    let (st, fate) = get(
        &app,
        &format!("/api/v1/sources/{}/events/m-old", src.id),
        Some("t"),
    )
    .await;
    assert_eq!(st, StatusCode::OK, "{fate}");
    assert_eq!(fate["message_id"], "m-old");
    assert_eq!(fate["stored"]["seq"], 1);
    assert_eq!(fate["stored"]["event"], "Signed Up");
    assert_eq!(fate["warehouse"]["state"], "loaded", "{fate}");
    assert!(
        fate["warehouse"]["tables"]
            .as_array()
            .unwrap()
            .contains(&json!("signed_up")),
        "{fate}"
    );
    // The newest is found too (the same path), and an unknown id is still a 404.
    let (st, _) = get(
        &app,
        &format!("/api/v1/sources/{}/events/m-4-2000", src.id),
        Some("t"),
    )
    .await;
    assert_eq!(st, StatusCode::OK);
    let (st, _) = get(
        &app,
        &format!("/api/v1/sources/{}/events/m-never", src.id),
        Some("t"),
    )
    .await;
    assert_eq!(st, StatusCode::NOT_FOUND);
    // The warehouse page's counts and the API's agree with the load: 10,006 tracks.
    let (st, wh) = get(&app, "/api/v1/warehouse", Some("t")).await;
    assert_eq!(st, StatusCode::OK);
    let tracks = wh["schemas"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["name"] == "web")
        .and_then(|s| {
            s["tables"]
                .as_array()
                .unwrap()
                .iter()
                .find(|t| t["name"] == "tracks")
        })
        .cloned()
        .unwrap();
    assert_eq!(tracks["rows"], 10_006, "{tracks}");
    assert!(tracks["last_load_at"].is_string(), "{tracks}");
    let events_today = state
        .warehouse
        .as_ref()
        .unwrap()
        .events_on(chrono::Utc::now().date_naive())
        .await
        .unwrap();
    assert_eq!(events_today.get("web").copied(), Some(10_006));
    close(&state).await;
}
