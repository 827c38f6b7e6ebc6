//! Router tests: the axum app driven with `tower::ServiceExt::oneshot` over the full
//! server state (`open_state_with`), with fake event logs injected to show how the
//! API answers when the log is saturated or cannot write, and a pinned clock.
//! (Real-socket end-to-end tests live in the `tributary` crate.)

use std::sync::Arc;

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
use tributary_server::clock::FixedClock;
use tributary_server::control::SourceType;
use tributary_server::{AppState, Config, Parts, open_state_with, router};

/// A log whose appends always fail the same way.
struct FailingLog {
    error: fn() -> LogError,
    head: watch::Sender<u64>,
}

#[async_trait]
impl EventLog for FailingLog {
    async fn append(&self, _b: Vec<NewRecord>) -> Result<Vec<AppendStatus>, LogError> {
        Err((self.error)())
    }
    fn log_id(&self) -> &str {
        "failing"
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
        self.head.subscribe()
    }
    async fn stats(&self) -> Result<LogStats, LogError> {
        Err((self.error)())
    }
    async fn close(&self) {}
}

/// The full state on a temporary data dir (warehouse off), with `parts` injected.
async fn state(mut config: Config, parts: Parts) -> (Arc<AppState>, String, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    config.data_dir = dir.path().to_path_buf();
    config.admin_token = Some("t".into());
    config.warehouse.url = "off".into();
    let state = open_state_with(config, parts).await.unwrap();
    let src = state
        .control
        .create(SourceType::Http, "web", "web", json!({}))
        .unwrap();
    (state, src.write_key.clone(), dir)
}

fn failing(error: fn() -> LogError) -> Parts {
    Parts {
        log: Some(Arc::new(FailingLog {
            error,
            head: watch::channel(0).0,
        })),
        ..Parts::default()
    }
}

async fn app(error: fn() -> LogError) -> (axum::Router, String, tempfile::TempDir) {
    let (state, key, dir) = state(Config::default(), failing(error)).await;
    (router(state), key, dir)
}

async fn track(app: axum::Router, key: &str) -> (StatusCode, Option<String>, Value) {
    let req = Request::post("/v1/track")
        .header("content-type", "application/json")
        .body(Body::from(
            json!({"writeKey": key, "userId": "u", "event": "E"}).to_string(),
        ))
        .unwrap();
    let resp = app.oneshot(req).await.unwrap();
    let status = resp.status();
    let retry = resp
        .headers()
        .get("retry-after")
        .map(|v| v.to_str().unwrap().to_string());
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    (status, retry, serde_json::from_slice(&body).unwrap())
}

#[tokio::test]
async fn answers_429_with_retry_after_when_the_log_is_saturated() {
    let (app, key, _dir) = app(|| LogError::Saturated).await;
    let (status, retry, body) = track(app, &key).await;
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(retry.as_deref(), Some("1"));
    assert_eq!(body["code"], "rate_limited");
}

#[tokio::test]
async fn answers_503_without_internal_detail_when_the_log_cannot_write() {
    let (app, key, _dir) = app(|| LogError::Unavailable("database or disk is full".into())).await;
    let (status, _, body) = track(app.clone(), &key).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(body["code"], "unavailable");
    assert!(!body["message"].as_str().unwrap().contains("disk is full"));
    let ready = app
        .oneshot(Request::get("/ready").body(Body::empty()).unwrap())
        .await
        .unwrap();
    assert_eq!(ready.status(), StatusCode::SERVICE_UNAVAILABLE);
}

#[tokio::test]
async fn answers_429_when_request_bodies_would_exceed_the_memory_budget() {
    let mut config = Config::default();
    // Room for less than one single-message body (32 KiB): nothing fits.
    config.limits.max_inflight_bytes = 1024;
    config.limits.max_batch_bytes = 1024;
    let (state, key, _dir) = state(config, failing(|| LogError::Closed)).await;
    // With the key in Basic auth the worst case is reserved before reading. (A key
    // in the body reserves as bytes arrive: see `refusals`.)
    use base64::Engine as _;
    let auth = base64::engine::general_purpose::STANDARD.encode(format!("{key}:"));
    let req = Request::post("/v1/track")
        .header("content-type", "application/json")
        .header("authorization", format!("Basic {auth}"))
        .body(Body::from(json!({"userId": "u", "event": "E"}).to_string()))
        .unwrap();
    let resp = router(state).oneshot(req).await.unwrap();
    let status = resp.status();
    let retry = resp
        .headers()
        .get("retry-after")
        .map(|v| v.to_str().unwrap().to_string());
    let body: Value =
        serde_json::from_slice(&resp.into_body().collect().await.unwrap().to_bytes()).unwrap();
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(retry.as_deref(), Some("1"));
    assert_eq!(body["code"], "rate_limited");
}

#[tokio::test]
async fn ingest_stamps_received_at_from_the_states_clock() {
    let at = chrono::DateTime::parse_from_rfc3339("2030-05-06T07:08:09.123Z")
        .unwrap()
        .with_timezone(&chrono::Utc);
    let clock = Arc::new(FixedClock::new(at));
    let parts = Parts {
        clock: Some(clock.clone()),
        ..Parts::default()
    };
    let (state, key, _dir) = state(Config::default(), parts).await;
    let (status, _, body) = track(router(state.clone()), &key).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let source = state.control.source_by_key(&key).unwrap();
    let stored = state.log.latest(&source.id, 1).await.unwrap();
    let payload: Value = serde_json::from_str(&stored[0].payload).unwrap();
    assert_eq!(payload["receivedAt"], "2030-05-06T07:08:09.123Z");
    state.shutdown.trigger();
    state.log.close().await;
}

mod backends;
mod console;
mod control_pg;
mod leases;
mod ledger;
mod refusals;
