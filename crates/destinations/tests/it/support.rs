//! Shared test fixtures: a real `SqliteLog`, an `Engine` with fast retries, and
//! scriptable HTTP receivers on 127.0.0.1.

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};
use tributary_destinations::{CreateDestination, DestinationView, Engine, EngineOptions};
use tributary_eventlog::{CallType, EventLog, NewRecord, SqliteLog, SqliteLogConfig};

/// The source every test event comes from.
pub const SOURCE: &str = "src_test";

/// Engine options for tests: quick retries.
pub fn fast_options() -> EngineOptions {
    EngineOptions {
        retry_min_backoff: Duration::from_millis(50),
        retry_max_backoff: Duration::from_millis(400),
        ..EngineOptions::default()
    }
}

/// A log and an engine in a temporary directory.
pub struct Harness {
    pub dir: tempfile::TempDir,
    pub log: Arc<SqliteLog>,
    pub engine: Engine,
}

pub async fn open_log(dir: &Path) -> Arc<SqliteLog> {
    Arc::new(
        SqliteLog::open(SqliteLogConfig {
            path: dir.join("events.db"),
            ..Default::default()
        })
        .await
        .expect("open log"),
    )
}

pub fn engine_db(dir: &Path) -> PathBuf {
    dir.join("destinations.db")
}

pub async fn open_engine(dir: &Path, log: Arc<SqliteLog>, options: EngineOptions) -> Engine {
    Engine::open(engine_db(dir), log, options)
        .await
        .expect("open engine")
}

impl Harness {
    pub async fn new() -> Harness {
        Harness::with_options(fast_options()).await
    }

    pub async fn with_options(options: EngineOptions) -> Harness {
        let dir = tempfile::tempdir().expect("tempdir");
        let log = open_log(dir.path()).await;
        let engine = open_engine(dir.path(), log.clone(), options).await;
        Harness { dir, log, engine }
    }

    pub async fn create(&self, kind: &str, name: &str, settings: Value) -> DestinationView {
        self.engine
            .create(CreateDestination {
                kind: kind.into(),
                name: name.into(),
                source_ids: vec![SOURCE.into()],
                settings,
                enabled: true,
                start: Default::default(),
                filters: Default::default(),
            })
            .await
            .expect("create destination")
    }

    pub async fn append(&self, events: Vec<Value>) {
        append(&*self.log, events).await;
    }

    /// Waits until the destination's cursor reached the log head with nothing in
    /// flight.
    pub async fn wait_idle(&self, id: &str) {
        let head = *self.log.subscribe().borrow();
        wait_for(Duration::from_secs(20), "destination idle", || async {
            let v = self.engine.get(id).await.unwrap();
            v.stats.cursor >= head && v.stats.in_flight == 0
        })
        .await;
    }
}

/// Appends normalized Segment messages to the log.
pub async fn append(log: &dyn EventLog, events: Vec<Value>) {
    let now = chrono::Utc::now().timestamp_millis();
    let batch = events
        .into_iter()
        .map(|e| NewRecord {
            source_id: e
                .get("_source")
                .and_then(Value::as_str)
                .unwrap_or(SOURCE)
                .to_string(),
            message_id: e["messageId"].as_str().unwrap().to_string(),
            call_type: CallType::parse(e["type"].as_str().unwrap()).unwrap(),
            user_id: id(&e["userId"]),
            anonymous_id: id(&e["anonymousId"]),
            event: e
                .get("event")
                .or(e.get("name"))
                .and_then(Value::as_str)
                .map(str::to_string),
            received_at_ms: now,
            payload: {
                let mut e = e;
                e.as_object_mut().unwrap().remove("_source");
                e.to_string()
            },
        })
        .collect();
    log.append(batch).await.expect("append");
}

/// A track call of `user` with index `i` (in `properties.i`).
pub fn track(user: &str, i: usize) -> Value {
    json!({
        "type": "track",
        "event": "Item Viewed",
        "userId": user,
        "messageId": format!("{user}-{i}"),
        "properties": {"i": i},
        "timestamp": "2026-01-01T00:00:00.000Z",
        "receivedAt": "2026-01-01T00:00:00.000Z",
    })
}

/// Polls `cond` until it holds, failing the test after `timeout`.
pub async fn wait_for<F, Fut>(timeout: Duration, what: &str, mut cond: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if cond().await {
            return;
        }
        if tokio::time::Instant::now() > deadline {
            panic!("timed out waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// One request a receiver got.
#[derive(Debug, Clone)]
pub struct Request {
    pub method: Method,
    pub uri: Uri,
    pub headers: HeaderMap,
    pub body: Bytes,
    /// When it arrived.
    pub at: std::time::Instant,
}

impl Request {
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body).expect("json body")
    }

    /// The events of a webhook or `/v1/batch` body.
    pub fn events(&self) -> Vec<Value> {
        let v = self.json();
        match v.get("batch").and_then(Value::as_array) {
            Some(b) => b.clone(),
            None => vec![v],
        }
    }

    pub fn header(&self, name: &str) -> Option<String> {
        self.headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
    }

    pub fn form(&self) -> HashMap<String, String> {
        form_urlencoded::parse(&self.body).into_owned().collect()
    }
}

/// What a handler answers.
pub struct Reply {
    pub status: StatusCode,
    pub headers: Vec<(&'static str, String)>,
    pub body: String,
    pub delay: Duration,
}

impl Reply {
    pub fn ok() -> Reply {
        Reply::status(200)
    }

    pub fn status(code: u16) -> Reply {
        Reply {
            status: StatusCode::from_u16(code).unwrap(),
            headers: Vec::new(),
            body: String::new(),
            delay: Duration::ZERO,
        }
    }

    pub fn json(code: u16, body: Value) -> Reply {
        Reply {
            body: body.to_string(),
            headers: vec![("content-type", "application/json".into())],
            ..Reply::status(code)
        }
    }

    pub fn body(mut self, body: &str) -> Reply {
        self.body = body.to_string();
        self
    }

    pub fn after(mut self, delay: Duration) -> Reply {
        self.delay = delay;
        self
    }
}

type Handler = Arc<dyn Fn(&Request) -> Reply + Send + Sync>;

#[derive(Clone)]
struct RecvState {
    handler: Handler,
    log: Arc<Mutex<Vec<(Request, u16)>>>,
}

/// An HTTP server on 127.0.0.1 recording every request and the status it got.
pub struct Receiver {
    pub addr: SocketAddr,
    log: Arc<Mutex<Vec<(Request, u16)>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Receiver {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn handle(
    State(state): State<RecvState>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let req = Request {
        method,
        uri,
        headers,
        body,
        at: std::time::Instant::now(),
    };
    let reply = (state.handler)(&req);
    if !reply.delay.is_zero() {
        tokio::time::sleep(reply.delay).await;
    }
    state.log.lock().unwrap().push((req, reply.status.as_u16()));
    let mut resp = (reply.status, reply.body).into_response();
    for (k, v) in reply.headers {
        resp.headers_mut().insert(k, v.parse().unwrap());
    }
    resp
}

impl Receiver {
    pub async fn start(handler: impl Fn(&Request) -> Reply + Send + Sync + 'static) -> Receiver {
        let log = Arc::new(Mutex::new(Vec::new()));
        let state = RecvState {
            handler: Arc::new(handler),
            log: log.clone(),
        };
        let app = axum::Router::new().fallback(handle).with_state(state);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Receiver { addr, log, task }
    }

    /// A receiver answering 200 to everything.
    pub async fn ok() -> Receiver {
        Receiver::start(|_| Reply::ok()).await
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    /// Every request so far, with the status it was answered.
    pub fn requests(&self) -> Vec<(Request, u16)> {
        self.log.lock().unwrap().clone()
    }

    /// Events of requests answered 2xx, in the order they were answered.
    pub fn accepted(&self) -> Vec<Value> {
        self.requests()
            .into_iter()
            .filter(|(_, s)| (200..300).contains(s))
            .flat_map(|(r, _)| r.events())
            .collect()
    }

    /// messageIds of accepted events.
    pub fn accepted_ids(&self) -> Vec<String> {
        self.accepted()
            .iter()
            .map(|e| e["messageId"].as_str().unwrap().to_string())
            .collect()
    }
}

/// Asserts every id in `expected` was accepted exactly once.
pub fn assert_exactly_once(got: &[String], expected: &[String]) {
    let mut counts: HashMap<&str, usize> = HashMap::new();
    for g in got {
        *counts.entry(g.as_str()).or_default() += 1;
    }
    for e in expected {
        assert_eq!(counts.get(e.as_str()), Some(&1), "{e} delivered once");
    }
    assert_eq!(got.len(), expected.len(), "no unexpected deliveries");
}

/// An id as ingest keeps it in the log's column: a string, or a number as text.
fn id(v: &Value) -> Option<String> {
    match v {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        _ => None,
    }
}
