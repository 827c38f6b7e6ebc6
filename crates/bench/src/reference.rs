//! The parse-only reference server (issue #15, item 1): the least an HTTP ingest
//! endpoint can do on the product's stack, so every ingest figure can be read as a
//! fraction of "the wire and the parser" on the same machine in the same run.
//!
//! It runs as `tributary-bench reference-server` (a child process, like the real
//! server) on the same HTTP stack as the product — axum on hyper's HTTP/1.1 server,
//! a multi-threaded tokio runtime, mimalloc — and per request does only:
//! - `/v1/{method}`: the Basic-auth write-key check (base64 decode, compare), then
//!   `serde_json::from_slice::<Value>` of the whole body; answers
//!   `200 {"success":true}` (401 on a wrong key, 400 on invalid JSON);
//! - `/v1/webhooks/activecampaign?writeKey=…`: the key check, then the form body
//!   decoded into `(name, value)` pairs — the webhook's equivalent of the parse;
//! - nothing is stored, validated, normalized or fsynced. It counts accepted events
//!   in `tributary_events_accepted_total` on `/metrics` so the bench's end-of-run
//!   check works unchanged, and answers the admin call that creates a source with its
//!   one fixed write key.
//!
//! Durability, exactly-once: none — that is the point of a reference. It keeps
//! nothing and may lose everything; it exists only inside the bench.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use base64::Engine as _;
use serde_json::{Value, json};

struct Ref {
    key: String,
    events: AtomicU64,
}

/// Serves the reference on `listen` until the process is killed.
pub fn serve(listen: SocketAddr, write_key: String) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let state = Arc::new(Ref {
            key: write_key,
            events: AtomicU64::new(0),
        });
        let app = Router::new()
            .route("/health", get(|| async { "ok" }))
            .route("/metrics", get(metrics))
            .route("/api/v1/sources", post(create_source))
            .route("/v1/webhooks/activecampaign", post(webhook))
            .route("/v1/{method}", post(tracking))
            .layer(axum::extract::DefaultBodyLimit::max(16 * 1024 * 1024))
            .with_state(state);
        let listener = tokio::net::TcpListener::bind(listen).await?;
        axum::serve(listener, app).await?;
        anyhow::Ok(())
    })
}

async fn metrics(State(s): State<Arc<Ref>>) -> String {
    format!(
        "# TYPE tributary_events_accepted_total counter\ntributary_events_accepted_total {}\n",
        s.events.load(Ordering::Relaxed)
    )
}

async fn create_source(State(s): State<Arc<Ref>>) -> Response {
    (StatusCode::CREATED, axum::Json(json!({"write_key": s.key}))).into_response()
}

fn error(status: StatusCode, code: &str) -> Response {
    (status, axum::Json(json!({"code": code, "message": code}))).into_response()
}

fn success() -> Response {
    axum::Json(json!({"success": true})).into_response()
}

/// The Basic-auth write key check of the product (`key:` or `key`, base64).
fn key_ok(headers: &HeaderMap, key: &str) -> bool {
    let Some(v) = headers
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
    else {
        return false;
    };
    let Some((scheme, rest)) = v.trim().split_once(' ') else {
        return false;
    };
    if !scheme.eq_ignore_ascii_case("basic") {
        return false;
    }
    let Ok(decoded) = base64::engine::general_purpose::STANDARD.decode(rest.trim()) else {
        return false;
    };
    let Ok(text) = std::str::from_utf8(&decoded) else {
        return false;
    };
    text.split_once(':').map(|(k, _)| k).unwrap_or(text) == key
}

async fn tracking(
    State(s): State<Arc<Ref>>,
    Path(method): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    if !key_ok(&headers, &s.key) {
        return error(StatusCode::UNAUTHORIZED, "unauthorized");
    }
    let Ok(v) = serde_json::from_slice::<Value>(&body) else {
        return error(StatusCode::BAD_REQUEST, "invalid_json");
    };
    let events = match method.as_str() {
        "batch" | "import" | "b" => v["batch"].as_array().map_or(0, |a| a.len() as u64),
        _ => 1,
    };
    s.events.fetch_add(events, Ordering::Relaxed);
    success()
}

#[derive(serde::Deserialize)]
struct KeyQuery {
    #[serde(rename = "writeKey")]
    write_key: Option<String>,
}

async fn webhook(State(s): State<Arc<Ref>>, Query(q): Query<KeyQuery>, body: Bytes) -> Response {
    if q.write_key.as_deref() != Some(s.key.as_str()) {
        return error(StatusCode::UNAUTHORIZED, "unauthorized");
    }
    let pairs: Vec<(String, String)> = form_urlencoded::parse(&body).into_owned().collect();
    if pairs.is_empty() {
        return error(StatusCode::BAD_REQUEST, "empty");
    }
    s.events.fetch_add(1, Ordering::Relaxed);
    success()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checks_basic_auth_like_the_product() {
        let mut h = HeaderMap::new();
        assert!(!key_ok(&h, "k"));
        h.insert("authorization", "Basic azo=".parse().unwrap()); // "k:"
        assert!(key_ok(&h, "k"));
        h.insert("authorization", "Basic aw==".parse().unwrap()); // "k"
        assert!(key_ok(&h, "k"));
        assert!(!key_ok(&h, "other"));
        h.insert("authorization", "Bearer aw==".parse().unwrap());
        assert!(!key_ok(&h, "k"));
    }
}
