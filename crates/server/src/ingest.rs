//! The Segment Tracking API: `/v1/{track,identify,page,screen,group,alias}`,
//! `/v1/batch`, `/v1/import` and analytics.js' short paths `/v1/{t,i,p,s,g,a,b}`.
//!
//! Per request: read the body under its cap (gzip inflated under the same cap),
//! find the source by write key (Basic auth with or without the colon, or `writeKey`
//! in the body), validate and normalize each message, append the valid ones to the
//! event log, and answer `200 {"success":true}` only once the log says they are
//! durable. Invalid messages of a batch are listed in `rejected`; a request where
//! nothing is valid is a 400. Nothing accepted is dropped after the 200.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Instant;

use axum::body::Body;
use axum::extract::{ConnectInfo, Path, Request, State};
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use base64::Engine as _;
use serde_json::{Map, Value, json};
use tributary_eventlog::{AppendStatus, NewRecord};
use tributary_model::body::{BodyError, BodyLimits, parse_body};
use tributary_model::{CallType, Normalized, Rejection};

use crate::AppState;
use crate::control::{LastEvent, Source, SourceType};
use crate::error::ApiError;

/// Which endpoint was called.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Endpoint {
    Single(CallType),
    Batch,
}

fn endpoint(method: &str) -> Option<Endpoint> {
    Some(match method {
        "track" | "t" => Endpoint::Single(CallType::Track),
        "identify" | "i" => Endpoint::Single(CallType::Identify),
        "page" | "p" => Endpoint::Single(CallType::Page),
        "screen" | "s" => Endpoint::Single(CallType::Screen),
        "group" | "g" => Endpoint::Single(CallType::Group),
        "alias" | "a" => Endpoint::Single(CallType::Alias),
        "batch" | "import" | "b" => Endpoint::Batch,
        _ => return None,
    })
}

/// The write key from `Authorization: Basic base64(key:)` or `base64(key)`.
pub fn basic_auth_key(headers: &HeaderMap) -> Option<String> {
    let v = headers
        .get(axum::http::header::AUTHORIZATION)?
        .to_str()
        .ok()?;
    let (scheme, rest) = v.trim().split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("basic") {
        return None;
    }
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(rest.trim())
        .ok()?;
    let text = String::from_utf8(decoded).ok()?;
    let key = text.split_once(':').map(|(k, _)| k).unwrap_or(&text);
    (!key.is_empty()).then(|| key.to_string())
}

/// The client address: the peer, or the first `X-Forwarded-For` hop when the peer is
/// a trusted proxy.
pub fn client_ip(
    state: &AppState,
    headers: &HeaderMap,
    peer: Option<SocketAddr>,
) -> Option<IpAddr> {
    let peer = peer?.ip();
    if state.config.trusted_proxies.contains(&peer)
        && let Some(xff) = headers.get("x-forwarded-for").and_then(|v| v.to_str().ok())
        && let Some(first) = xff.split(',').next()
        && let Ok(ip) = first.trim().parse::<IpAddr>()
    {
        return Some(ip);
    }
    Some(peer)
}

/// Resolves a write key to an enabled source.
pub fn authenticate(state: &AppState, key: Option<&str>) -> Result<Arc<Source>, ApiError> {
    let key = key.ok_or(ApiError::Unauthorized(
        "missing write key: use HTTP Basic auth with the write key as user name, or `writeKey` in the body",
    ))?;
    let source = state
        .control
        .source_by_key(key)
        .ok_or(ApiError::Unauthorized("unknown write key"))?;
    if !source.enabled {
        return Err(ApiError::SourceDisabled);
    }
    Ok(source)
}

/// `POST /v1/{method}`.
pub async fn tracking(
    State(state): State<Arc<AppState>>,
    Path(method): Path<String>,
    request: Request,
) -> Result<Response, ApiError> {
    let ep =
        endpoint(&method).ok_or_else(|| ApiError::NotFound(format!("no endpoint /v1/{method}")))?;
    let peer = request
        .extensions()
        .get::<ConnectInfo<SocketAddr>>()
        .map(|c| c.0);
    let (parts, body) = request.into_parts();
    let headers = parts.headers;
    let limits = &state.config.limits;
    let received_at = state.clock.now();
    let peer_ip = client_ip(&state, &headers, peer).map(|ip| ip.to_string());
    let header_key = basic_auth_key(&headers);

    let (call_type, cap, cap_code) = match ep {
        Endpoint::Single(call) => (Some(call), limits.max_message_bytes, "message_too_large"),
        Endpoint::Batch => (None, limits.max_batch_bytes, "batch_too_large"),
    };
    // Memory bound: reserve the body's worst case before reading it.
    let _reserved = reserve(&state, cap).await?;
    let bytes = read_capped(&headers, body, cap, cap_code).await?;
    let body_limits = BodyLimits {
        max_message_bytes: limits.max_message_bytes,
        max_batch_messages: limits.max_batch_messages,
    };
    let raw = parse_body(&bytes, call_type, body_limits).map_err(|e| match e {
        BodyError::TooManyMessages { .. } => ApiError::TooLarge {
            code: e.code(),
            message: e.to_string(),
        },
        e => ApiError::bad(e.code(), e.to_string()),
    })?;
    let key = header_key.or_else(|| raw.write_key.clone());
    let source = authenticate(&state, key.as_deref())?;
    let results = raw.normalize_all(received_at, peer_ip, |obj| prepare(&state, &source, obj));
    let total = results.len();
    let mut accepted = Vec::with_capacity(total);
    let mut rejected = Vec::new();
    for (i, r) in results.into_iter().enumerate() {
        match r {
            Ok(n) => accepted.push(n),
            Err(r) => {
                count_rejection(&r);
                if ep != Endpoint::Batch {
                    return Err(ApiError::bad(r.code.as_str(), r.message));
                }
                rejected.push(json!({"index": i, "code": r.code.as_str(), "message": r.message}));
            }
        }
    }
    if accepted.is_empty() {
        return Err(ApiError::BadRequest {
            code: "invalid_batch",
            message: format!("none of the {total} messages in the batch is valid"),
            rejected: Some(Value::Array(rejected)),
        });
    }
    let stored = append(&state, &source, accepted, None).await?;
    let mut body = json!({"success": true});
    if stored.duplicates > 0 {
        body["duplicates"] = json!(stored.duplicates);
    }
    if !rejected.is_empty() {
        body["rejected"] = Value::Array(rejected);
    }
    Ok(axum::Json(body).into_response())
}

/// Reserves `bytes` of the ingest memory budget, waiting up to a second.
pub async fn reserve(
    state: &AppState,
    bytes: usize,
) -> Result<tokio::sync::SemaphorePermit<'_>, ApiError> {
    let n = u32::try_from(bytes).unwrap_or(u32::MAX);
    match tokio::time::timeout(
        std::time::Duration::from_secs(1),
        state.ingest_budget.acquire_many(n),
    )
    .await
    {
        Ok(Ok(permit)) => Ok(permit),
        _ => {
            metrics::counter!("tributary_ingest_saturated_total").increment(1);
            Err(ApiError::Saturated)
        }
    }
}

async fn read_capped(
    headers: &HeaderMap,
    body: Body,
    limit: usize,
    code: &'static str,
) -> Result<Vec<u8>, ApiError> {
    crate::body::read_body(headers, body, limit)
        .await
        .map_err(|e| match e {
            ApiError::TooLarge { .. } => ApiError::TooLarge {
                code,
                message: if code == "message_too_large" {
                    format!("a message may be at most {limit} bytes")
                } else {
                    format!("a batch body may be at most {limit} bytes")
                },
            },
            other => other,
        })
}

fn count_rejection(r: &Rejection) {
    metrics::counter!("tributary_events_rejected_total", "reason" => r.code.as_str()).increment(1);
}

/// Source-specific touches before validation: for ActiveCampaign sources, a call
/// that carries only an email gets the email as `anonymousId`, and the userId
/// known for that email when there is one (issue: "the Segment path").
fn prepare(state: &AppState, source: &Source, obj: &mut Map<String, Value>) {
    if source.kind != SourceType::Activecampaign {
        return;
    }
    let has = |o: &Map<String, Value>, k: &str| matches!(o.get(k), Some(Value::String(s)) if !s.is_empty());
    if has(obj, "userId") {
        return;
    }
    let Some(email) = tributary_activecampaign::email_of(obj) else {
        return;
    };
    if let Some(uid) = state.control.user_id_for_email(&email) {
        obj.insert("userId".into(), Value::String(uid));
    } else if !has(obj, "anonymousId") {
        obj.insert("anonymousId".into(), Value::String(email));
    }
}

/// What an append did.
pub struct Appended {
    /// Messages stored.
    pub stored: usize,
    /// Messages already in the log (acknowledged, not stored again).
    pub duplicates: usize,
}

/// Appends normalized messages of one source durably, then updates the source's last
/// event, the identity map and metrics. `last_event_override` replaces the event
/// shown on the source (ActiveCampaign shows its raw webhook type).
pub async fn append(
    state: &AppState,
    source: &Source,
    messages: Vec<Normalized>,
    last_event_override: Option<LastEvent>,
) -> Result<Appended, ApiError> {
    let Some(last) = messages.last() else {
        return Ok(Appended {
            stored: 0,
            duplicates: 0,
        });
    };
    let last_event = last_event_override.unwrap_or_else(|| LastEvent {
        event: last.event.clone(),
        kind: last.call_type.as_str().to_string(),
        received_at: last
            .body
            .get("receivedAt")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_string(),
        message_id: last.message_id.clone(),
    });
    let mut identities = Vec::new();
    let records: Vec<NewRecord> = messages
        .into_iter()
        .map(|n| {
            if n.call_type == CallType::Identify
                && let (Some(uid), Some(Value::String(email))) = (
                    n.user_id.as_ref(),
                    n.body.get("traits").and_then(|t| t.get("email")),
                )
            {
                identities.push((email.clone(), uid.clone()));
            }
            NewRecord {
                source_id: source.id.clone(),
                message_id: n.message_id,
                call_type: n.call_type,
                event: n.event,
                user_id: n.user_id,
                anonymous_id: n.anonymous_id,
                received_at_ms: n.received_at_ms,
                payload: Value::Object(n.body).to_string(),
            }
        })
        .collect();
    let started = Instant::now();
    let result = state.log.append(records).await;
    metrics::histogram!("tributary_append_seconds").record(started.elapsed().as_secs_f64());
    let statuses = result.inspect_err(|e| {
        metrics::counter!("tributary_append_failures_total", "reason" => match e {
            tributary_eventlog::LogError::Saturated => "saturated",
            _ => "unavailable",
        })
        .increment(1);
    })?;
    let duplicates = statuses
        .iter()
        .filter(|s| matches!(s, AppendStatus::Duplicate))
        .count();
    let stored = statuses.len() - duplicates;
    metrics::counter!("tributary_events_accepted_total").increment(stored as u64);
    if duplicates > 0 {
        metrics::counter!("tributary_events_duplicate_total").increment(duplicates as u64);
    }
    // Durable before the 200 (see `control`): one fsynced write per request, only
    // for new or changed identities.
    if !identities.is_empty() {
        let control = state.control.clone();
        tokio::task::spawn_blocking(move || control.remember_identities(&identities))
            .await
            .map_err(|e| ApiError::Internal(e.to_string()))??;
    }
    state.control.set_last_event(&source.id, last_event);
    Ok(Appended { stored, duplicates })
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    #[test]
    fn basic_auth_with_and_without_colon() {
        let mut h = HeaderMap::new();
        h.insert(
            "authorization",
            HeaderValue::from_static("Basic YWJjMTIzOg=="),
        );
        assert_eq!(basic_auth_key(&h).as_deref(), Some("abc123"));
        h.insert("authorization", HeaderValue::from_static("Basic YWJjMTIz"));
        assert_eq!(basic_auth_key(&h).as_deref(), Some("abc123"));
        h.insert("authorization", HeaderValue::from_static("Bearer YWJjMTIz"));
        assert_eq!(basic_auth_key(&h), None);
        h.insert("authorization", HeaderValue::from_static("Basic !!!"));
        assert_eq!(basic_auth_key(&h), None);
    }

    #[test]
    fn endpoints_and_short_paths() {
        assert_eq!(endpoint("t"), Some(Endpoint::Single(CallType::Track)));
        assert_eq!(endpoint("import"), Some(Endpoint::Batch));
        assert_eq!(endpoint("b"), Some(Endpoint::Batch));
        assert_eq!(endpoint("x"), None);
    }
}
