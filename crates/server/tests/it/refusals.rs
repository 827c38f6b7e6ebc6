//! Refusals seen through the router: a bad key costs no body memory and no body
//! read, unauthenticated bodies cannot take the budget of authenticated ones, a
//! stalled body gets 408, and every admin-API extractor error is `{code,message}`.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use axum::body::Body;
use axum::http::{Request, StatusCode};
use http_body_util::BodyExt;
use serde_json::{Value, json};
use tokio::sync::watch;
use tower::ServiceExt;
use tributary_eventlog::{
    AppendStatus, ConsumerState, EventLog, LogError, LogStats, NewRecord, Position, Record,
};
use tributary_server::control::SourceType;
use tributary_server::{Config, Parts, open_state_with, router};

/// A log that stores nothing but acknowledges every append.
#[derive(Default)]
pub(crate) struct AckLog {
    next: AtomicU64,
    head: Option<watch::Sender<u64>>,
}

#[async_trait]
impl EventLog for AckLog {
    async fn append(&self, b: Vec<NewRecord>) -> Result<Vec<AppendStatus>, LogError> {
        Ok(b.iter()
            .map(|_| AppendStatus::Stored(self.next.fetch_add(1, Ordering::Relaxed) + 1))
            .collect())
    }
    fn log_id(&self) -> &str {
        "ack"
    }
    async fn read(&self, _a: &Position, _l: usize) -> Result<Vec<Record>, LogError> {
        Ok(vec![])
    }
    async fn first_retained(&self, _p: u32) -> Result<u64, LogError> {
        Ok(1)
    }
    async fn latest(&self, _s: &str, _l: usize) -> Result<Vec<Record>, LogError> {
        Ok(vec![])
    }
    async fn read_range(&self, _: i64, _: i64, _: u64, _: usize) -> Result<Vec<Record>, LogError> {
        Ok(vec![])
    }
    async fn get(&self, _s: &[u64]) -> Result<Vec<Record>, LogError> {
        Ok(vec![])
    }
    async fn cursor(&self, _c: &str, partition: u32) -> Result<Position, LogError> {
        Ok(self.start(partition))
    }
    async fn commit(&self, _c: &str, _p: &Position) -> Result<(), LogError> {
        Ok(())
    }
    async fn unpin(&self, _c: &str) -> Result<(), LogError> {
        Ok(())
    }
    async fn remove_consumer(&self, _c: &str) -> Result<(), LogError> {
        Ok(())
    }
    async fn consumers(&self) -> Result<Vec<ConsumerState>, LogError> {
        Ok(vec![])
    }
    fn subscribe(&self) -> watch::Receiver<u64> {
        match &self.head {
            Some(h) => h.subscribe(),
            None => watch::channel(0).1,
        }
    }
    async fn stats(&self) -> Result<LogStats, LogError> {
        Ok(LogStats::default())
    }
    async fn close(&self) {}
}

struct App {
    router: axum::Router,
    key: String,
    _dir: tempfile::TempDir,
}

async fn app_with(mut config: Config) -> App {
    let dir = tempfile::tempdir().unwrap();
    config.data_dir = dir.path().to_path_buf();
    config.admin_token = Some("admin".into());
    config.warehouse.url = "off".into();
    let log = Arc::new(AckLog {
        head: Some(watch::channel(0).0),
        ..Default::default()
    });
    let parts = Parts {
        log: Some(log),
        ..Parts::default()
    };
    let state = open_state_with(config, parts).await.unwrap();
    let src = state
        .control
        .create(SourceType::Http, "web", "web", json!({}))
        .unwrap();
    App {
        router: router(state),
        key: src.write_key.clone(),
        _dir: dir,
    }
}

/// A body that sends `head` and then never another byte.
fn stalled_body(head: &'static str) -> Body {
    let first = futures::stream::once(async move { Ok::<_, std::io::Error>(head.as_bytes()) });
    Body::from_stream(futures::StreamExt::chain(first, futures::stream::pending()))
}

fn basic(key: &str) -> String {
    use base64::Engine as _;
    format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(format!("{key}:"))
    )
}

/// Sends a request and reads the answer, failing (not hanging) after 5 s.
async fn send(
    app: &axum::Router,
    req: Request<Body>,
) -> (StatusCode, axum::http::HeaderMap, Value) {
    let resp = tokio::time::timeout(Duration::from_secs(5), app.clone().oneshot(req))
        .await
        .expect("the server did not answer within 5 s")
        .unwrap();
    let status = resp.status();
    let headers = resp.headers().clone();
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    let v = serde_json::from_slice(&body)
        .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&body).into_owned()));
    (status, headers, v)
}

#[tokio::test]
async fn a_bad_header_key_is_refused_without_reading_the_body() {
    let app = app_with(Config::default()).await;
    let req = Request::post("/v1/batch")
        .header("authorization", basic("wk_not_a_key"))
        .header("content-length", "400000")
        .body(stalled_body("{\"batch\":["))
        .unwrap();
    let (status, _, body) = send(&app.router, req).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "{body}");
    assert_eq!(body["code"], "unauthorized");
}

/// A body that sends `first` and then never another byte.
fn stalled_after(first: Vec<u8>) -> Body {
    let head = futures::stream::once(async move { Ok::<_, std::io::Error>(first) });
    Body::from_stream(futures::StreamExt::chain(head, futures::stream::pending()))
}

#[tokio::test]
async fn stalled_bodies_without_a_key_hold_only_what_they_sent() {
    let mut config = Config::default();
    // Room for four batch bodies in all; another 500 kB for bodies without a key.
    config.limits.max_inflight_bytes = 2_000_000;
    let app = app_with(config).await;
    let mut stalled = Vec::new();
    for _ in 0..40 {
        let req = Request::post("/v1/batch")
            .header("content-type", "application/json")
            .header("content-length", "400000")
            .body(stalled_body("{\"batch\":["))
            .unwrap();
        stalled.push(tokio::spawn(app.router.clone().oneshot(req)));
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    // Authenticated batches and analytics.js-style calls (key in the body) alike
    // still answer 200 at once.
    for i in 0..3 {
        let msg = json!({"type":"track","userId":"u","event":"E","messageId":format!("ok-{i}")});
        for (auth, body) in [
            (Some(basic(&app.key)), json!({"batch": [msg.clone()]})),
            (None, json!({"writeKey": app.key, "batch": [msg.clone()]})),
        ] {
            let mut req = Request::post("/v1/batch").header("content-type", "text/plain");
            if let Some(a) = auth {
                req = req.header("authorization", a);
            }
            let started = std::time::Instant::now();
            let (status, _, v) = send(&app.router, req.body(Body::from(v_to(body))).unwrap()).await;
            assert_eq!(status, StatusCode::OK, "{v}");
            assert!(started.elapsed() < Duration::from_millis(900));
        }
    }
    for h in &stalled {
        assert!(
            !h.is_finished(),
            "a stalled body was answered before its timeout"
        );
    }
    for h in stalled {
        h.abort();
    }
}

fn v_to(v: Value) -> String {
    v.to_string()
}

#[tokio::test]
async fn bodies_without_a_key_are_bounded_by_their_own_budget() {
    let mut config = Config::default();
    config.limits.max_inflight_bytes = 2_000_000;
    let app = app_with(config).await;
    // 300 kB each, then a stall: the keyless budget (500 kB) has room for one.
    let chunk = {
        let mut c = b"{\"batch\":[".to_vec();
        c.resize(300_000, b' ');
        c
    };
    let first = Request::post("/v1/batch")
        .header("content-type", "application/json")
        .body(stalled_after(chunk.clone()))
        .unwrap();
    let holder = tokio::spawn(app.router.clone().oneshot(first));
    tokio::time::sleep(Duration::from_millis(200)).await;
    let second = Request::post("/v1/batch")
        .header("content-type", "application/json")
        .body(stalled_after(chunk))
        .unwrap();
    let (status, headers, body) = send(&app.router, second).await;
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS, "{body}");
    assert_eq!(headers["retry-after"], "1");
    // …and an authenticated request is not affected.
    let req = Request::post("/v1/track")
        .header("authorization", basic(&app.key))
        .header("content-type", "application/json")
        .body(Body::from(json!({"userId":"u","event":"E"}).to_string()))
        .unwrap();
    let (status, _, v) = send(&app.router, req).await;
    assert_eq!(status, StatusCode::OK, "{v}");
    holder.abort();
}

#[tokio::test]
async fn a_stalled_body_is_answered_408_and_closes_the_connection() {
    let mut config = Config::default();
    config.http.body_timeout = Duration::from_millis(300);
    let app = app_with(config).await;
    let req = Request::post("/v1/track")
        .header("authorization", basic(&app.key))
        .header("content-length", "2000")
        .body(stalled_body("{\"userId\":"))
        .unwrap();
    let started = std::time::Instant::now();
    let (status, headers, body) = send(&app.router, req).await;
    assert_eq!(status, StatusCode::REQUEST_TIMEOUT, "{body}");
    assert_eq!(body["code"], "request_timeout");
    assert!(body["message"].as_str().unwrap().contains("did not arrive"));
    assert_eq!(headers["connection"], "close");
    assert!(started.elapsed() < Duration::from_secs(2));
}

#[tokio::test]
async fn a_nul_in_message_id_is_refused_with_a_reason() {
    let app = app_with(Config::default()).await;
    let req = Request::post("/v1/track")
        .header("authorization", basic(&app.key))
        .header("content-type", "application/json")
        .body(Body::from(
            r#"{"userId":"u","event":"E","messageId":"m-\u0000-1"}"#,
        ))
        .unwrap();
    let (status, _, body) = send(&app.router, req).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    assert_eq!(body["code"], "message_id_invalid");
    assert!(body["message"].as_str().unwrap().contains("NUL"), "{body}");
}

#[tokio::test]
async fn the_webhook_without_a_key_says_to_add_the_write_key_query() {
    let app = app_with(Config::default()).await;
    let req = Request::post("/v1/webhooks/activecampaign")
        .header("content-type", "application/x-www-form-urlencoded")
        .body(Body::from("type=open&contact[email]=a@example.com"))
        .unwrap();
    let (status, _, body) = send(&app.router, req).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "{body}");
    let message = body["message"].as_str().unwrap();
    assert!(message.contains("?writeKey="), "{message}");
    assert!(!message.contains("Basic"), "{message}");
}

fn admin(method: &str, path: &str, body: &'static str) -> Request<Body> {
    Request::builder()
        .method(method)
        .uri(path)
        .header("authorization", "Bearer admin")
        .header("content-type", "application/json")
        .body(Body::from(body))
        .unwrap()
}

#[tokio::test]
async fn every_admin_api_extractor_error_is_a_json_code_and_message() {
    let app = app_with(Config::default()).await;
    let cases = [
        (
            admin("POST", "/api/v1/sources", "{not json"),
            400,
            "invalid_json",
        ),
        (
            admin("POST", "/api/v1/sources", r#"{"type":"http"}"#),
            400,
            "invalid_request",
        ),
        (
            admin("GET", "/api/v1/sources/src_x/events?limit=abc", ""),
            400,
            "invalid_query",
        ),
        (
            admin("GET", "/api/v1/destinations/d1/dead-letters?limit=-1", ""),
            400,
            "invalid_query",
        ),
        (admin("GET", "/api/v1/nothing-here", ""), 404, "not_found"),
        (
            admin("PUT", "/api/v1/sources", ""),
            405,
            "method_not_allowed",
        ),
        (
            admin("GET", "/api/v1/warehouse/a/b?limit=x", ""),
            400,
            "invalid_query",
        ),
    ];
    for (req, want_status, want_code) in cases {
        let what = format!("{} {}", req.method(), req.uri());
        let (status, headers, body) = send(&app.router, req).await;
        assert_eq!(status.as_u16(), want_status, "{what}: {body}");
        assert_eq!(
            headers["content-type"], "application/json",
            "{what}: {body}"
        );
        assert_eq!(body["code"], want_code, "{what}: {body}");
        assert!(
            body["message"].as_str().is_some_and(|m| !m.is_empty()),
            "{what}: {body}"
        );
    }
}
