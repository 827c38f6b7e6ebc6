//! Operations endpoints and cross-cutting HTTP concerns: `/health`, `/ready`,
//! `/metrics` (Prometheus), per-route request metrics, and CORS for the Tracking
//! API so analytics.js can post from any web page.
//!
//! Invariant: every counter the server increments without a per-object label is
//! registered at zero when the recorder is installed, so `/metrics` shows it right
//! after a (re)start and `rate()`/`increase()` see the reset instead of a gap.

use std::sync::{Arc, OnceLock};

use axum::extract::{MatchedPath, Request, State};
use axum::http::{HeaderValue, Method, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use serde_json::json;

use tributary_model::RejectCode;

use crate::AppState;

static PROMETHEUS: OnceLock<Option<PrometheusHandle>> = OnceLock::new();

/// Installs the process-wide Prometheus recorder once.
pub fn install_metrics() {
    PROMETHEUS.get_or_init(|| {
        let builder = PrometheusBuilder::new()
            .set_buckets(&[
                0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
            ])
            .ok()?
            .set_buckets_for_metric(
                Matcher::Full("tributary_log_group_commit_records".into()),
                &[
                    1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0, 200.0, 500.0, 1000.0, 5000.0, 20000.0,
                ],
            )
            .ok()?;
        builder.install_recorder().ok()
    });
    register_at_zero();
}

/// Counters (and their fixed label values) that exist from the start, at zero.
const ZERO_COUNTERS: [(&str, &str); 10] = [
    (
        "tributary_events_accepted_total",
        "events stored in the log",
    ),
    (
        "tributary_events_duplicate_total",
        "events acknowledged as duplicates of a stored messageId",
    ),
    (
        "tributary_ingest_saturated_total",
        "requests refused with 429 because ingest held too many body bytes",
    ),
    (
        "tributary_activecampaign_invalid_total",
        "ActiveCampaign webhook bodies that could not be parsed",
    ),
    (
        "tributary_warehouse_rows_loaded_total",
        "rows loaded into the warehouse",
    ),
    (
        "tributary_warehouse_load_errors_total",
        "warehouse loads that failed and are retried",
    ),
    (
        "tributary_warehouse_discards_total",
        "property values kept in tributary_discards instead of their column",
    ),
    (
        "tributary_warehouse_skipped_total",
        "log records the warehouse loader skipped",
    ),
    (
        "tributary_warehouse_rejected_records_total",
        "log records the warehouse loader could not plan",
    ),
    (
        "tributary_events_rejected_total",
        "messages refused with 4xx, by reason code",
    ),
];

/// Every reason code of `tributary_events_rejected_total`.
const REJECT_CODES: [RejectCode; 18] = [
    RejectCode::BadRequest,
    RejectCode::InvalidJson,
    RejectCode::EmptyBatch,
    RejectCode::NoUserAnonId,
    RejectCode::IdNotString,
    RejectCode::EventNotDefined,
    RejectCode::EventNotString,
    RejectCode::PropertiesNotObject,
    RejectCode::TraitsNotObject,
    RejectCode::NameNotString,
    RejectCode::CategoryNotString,
    RejectCode::InvalidType,
    RejectCode::GroupIdRequired,
    RejectCode::PreviousIdRequired,
    RejectCode::MessageIdInvalid,
    RejectCode::TimestampInvalid,
    RejectCode::ContextNotObject,
    RejectCode::MessageTooLarge,
];

/// Registers [`ZERO_COUNTERS`] (the rejected counter once per reason, append
/// failures once per reason) with their help text. Idempotent: adding zero.
fn register_at_zero() {
    for (name, help) in ZERO_COUNTERS {
        metrics::describe_counter!(name, help);
        match name {
            "tributary_events_rejected_total" => {
                for code in REJECT_CODES {
                    metrics::counter!(name, "reason" => code.as_str()).increment(0);
                }
            }
            _ => metrics::counter!(name).increment(0),
        }
    }
    metrics::describe_counter!(
        "tributary_append_failures_total",
        "appends the log refused (saturated) or could not write (unavailable)"
    );
    for reason in ["saturated", "unavailable"] {
        metrics::counter!("tributary_append_failures_total", "reason" => reason).increment(0);
    }
}

/// `GET /health`: the process is up.
pub async fn health() -> impl IntoResponse {
    axum::Json(json!({"status": "ok"}))
}

/// How long a loss by the log's size cap keeps `/ready` degraded.
const LOSS_DEGRADES_FOR_MS: i64 = 24 * 3600 * 1000;

/// Reasons the log degrades readiness: a consumer lost records it had not read to
/// the size cap (`log.max_bytes`) within the last day. The log's consumer registry
/// keeps when, so a restart does not hide it.
pub(crate) async fn log_degraded(
    log: &dyn tributary_eventlog::EventLog,
    now_ms: i64,
) -> Vec<String> {
    let Ok(consumers) = log.consumers().await else {
        return Vec::new();
    };
    consumers
        .into_iter()
        .filter_map(|c| {
            let gap = c.gap?;
            let at = c.gap_at_ms?;
            (now_ms - at < LOSS_DEGRADES_FOR_MS).then(|| {
                format!(
                    "the event log's size cap deleted {} records {} had not read (seq {} to {})",
                    gap.len(),
                    c.name,
                    gap.from,
                    gap.to
                )
            })
        })
        .collect()
}

/// `GET /ready`: the control store is reachable (cluster: its PostgreSQL) and the
/// log can be read; reports its head and size, and `degraded`
/// with reasons when data was lost (see [`log_degraded`]).
pub async fn ready(State(state): State<Arc<AppState>>) -> Response {
    if let Err(reason) = state.control.health() {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            axum::Json(json!({"status": "unavailable", "reason": reason, "store": "control"})),
        )
            .into_response();
    }
    let warehouse = state.warehouse.as_ref().map(|w| w.lag());
    if let Err(e) = state.log.healthy().await {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            axum::Json(json!({"status": "unavailable", "reason": e.to_string()})),
        )
            .into_response();
    }
    match state.log.stats().await {
        Ok(s) => {
            let reasons =
                log_degraded(state.log.as_ref(), chrono::Utc::now().timestamp_millis()).await;
            let body = json!({
                "status": if reasons.is_empty() { "ready" } else { "degraded" },
                "reasons": reasons,
                "log": {"head": s.head, "records": s.records, "bytes": s.bytes,
                        "unconsumed_dropped": s.unconsumed_dropped},
                "warehouse": warehouse.map(|l| json!({
                    "lag_events": l.events, "lag_seconds": l.seconds,
                    "loaded_seq": l.loaded_seq, "retrying": l.retrying,
                })),
            });
            with_warehouse_health(&state, body)
        }
        Err(e) => (
            StatusCode::SERVICE_UNAVAILABLE,
            axum::Json(json!({"status": "unavailable", "reason": e.to_string()})),
        )
            .into_response(),
    }
}

/// `/ready`'s answer: 200 with `body`, or while the warehouse loader is failing 503
/// `degraded` with the warehouse's own error first in `reasons` (also as `reason`)
/// and its health under `warehouse.health` (events are still accepted; the log keeps
/// them).
fn with_warehouse_health(state: &AppState, mut body: serde_json::Value) -> Response {
    let health = state.warehouse.as_ref().map(|w| w.health());
    let Some(health) = health.filter(|h| h.is_failing()) else {
        return axum::Json(body).into_response();
    };
    let reason = format!("warehouse: {}", health.last_error.as_deref().unwrap_or(""));
    body["status"] = json!("degraded");
    body["reason"] = json!(reason);
    if let Some(reasons) = body["reasons"].as_array_mut() {
        reasons.insert(0, json!(reason));
    } else {
        body["reasons"] = json!([reason]);
    }
    if body["warehouse"].is_object() {
        body["warehouse"]["health"] = json!(health);
    }
    (StatusCode::SERVICE_UNAVAILABLE, axum::Json(body)).into_response()
}

/// `GET /metrics`: Prometheus text format.
pub async fn metrics(State(state): State<Arc<AppState>>) -> Response {
    if let Ok(s) = state.log.stats().await {
        metrics::gauge!("tributary_log_head").set(s.head as f64);
        metrics::gauge!("tributary_log_records").set(s.records as f64);
        metrics::gauge!("tributary_log_bytes").set(s.bytes as f64);
    }
    metrics::gauge!("tributary_sources").set(state.control.sources().len() as f64);
    if let Some(w) = &state.warehouse {
        let lag = w.lag();
        metrics::gauge!("tributary_warehouse_lag_events").set(lag.events as f64);
        metrics::gauge!("tributary_warehouse_lag_seconds").set(lag.seconds);
        metrics::gauge!("tributary_warehouse_loaded_seq").set(lag.loaded_seq as f64);
        metrics::gauge!("tributary_warehouse_retrying").set(if lag.retrying { 1.0 } else { 0.0 });
    }
    let text = PROMETHEUS
        .get()
        .and_then(|h| h.as_ref())
        .map(|h| h.render())
        .unwrap_or_default();
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], text).into_response()
}

/// How often a node refreshes `tributary_consumer_lag_records`.
const LAG_EVERY: std::time::Duration = std::time::Duration::from_secs(2);

/// Cluster mode (the JetStream log): every node, every [`LAG_EVERY`], sets
/// `tributary_consumer_lag_records{consumer,partition}` — the records of each
/// partition stored after each registered consumer's committed position (the
/// warehouse's and each destination's, from the control database's registry; the
/// count is the stream's) — so any node's `/metrics` shows every consumer's lag,
/// whichever node owns the partition. A consumer that leaves the registry is set to
/// 0. Ends when `stop` turns true.
pub(crate) fn spawn_lag_metrics(
    log: Arc<tributary_eventlog::JetStreamLog>,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    tokio::spawn(async move {
        let mut seen: std::collections::BTreeSet<(String, u32)> = Default::default();
        loop {
            match log.lag().await {
                Ok(lags) => {
                    let mut now = std::collections::BTreeSet::new();
                    for l in lags {
                        metrics::gauge!("tributary_consumer_lag_records",
                            "consumer" => l.consumer.clone(), "partition" => l.partition.to_string())
                        .set(l.records as f64);
                        now.insert((l.consumer, l.partition));
                    }
                    for (consumer, partition) in seen.difference(&now) {
                        metrics::gauge!("tributary_consumer_lag_records",
                            "consumer" => consumer.clone(), "partition" => partition.to_string())
                        .set(0.0);
                    }
                    seen = now;
                }
                Err(e) => tracing::debug!(error = %e, "cannot compute consumer lag"),
            }
            tokio::select! {
                _ = tokio::time::sleep(LAG_EVERY) => {}
                r = stop.changed() => if r.is_err() || *stop.borrow() { return },
            }
        }
    });
}

/// `OPTIONS /v1/*`: CORS preflight.
pub async fn preflight() -> StatusCode {
    StatusCode::NO_CONTENT
}

/// Middleware: counts requests by route and status; adds CORS headers on `/v1/`.
pub async fn observe(request: Request, next: Next) -> Response {
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map(|p| p.as_str().to_string())
        .unwrap_or_else(|| "unmatched".to_string());
    let is_tracking = request.uri().path().starts_with("/v1/");
    let is_options = request.method() == Method::OPTIONS;
    let mut resp = next.run(request).await;
    if is_tracking {
        let h = resp.headers_mut();
        h.insert(
            header::ACCESS_CONTROL_ALLOW_ORIGIN,
            HeaderValue::from_static("*"),
        );
        if is_options {
            h.insert(
                header::ACCESS_CONTROL_ALLOW_METHODS,
                HeaderValue::from_static("POST, OPTIONS"),
            );
            h.insert(
                header::ACCESS_CONTROL_ALLOW_HEADERS,
                HeaderValue::from_static("Content-Type, Authorization, Content-Encoding"),
            );
            h.insert(
                header::ACCESS_CONTROL_MAX_AGE,
                HeaderValue::from_static("86400"),
            );
        }
    }
    metrics::counter!(
        "tributary_http_requests_total",
        "route" => route,
        "status" => resp.status().as_u16().to_string()
    )
    .increment(1);
    resp
}
