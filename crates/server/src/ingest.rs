//! The Segment Tracking API: `/v1/{track,identify,page,screen,group,alias}`,
//! `/v1/batch`, `/v1/import` and analytics.js' short paths `/v1/{t,i,p,s,g,a,b}`.
//!
//! Per request: check a Basic-auth write key (with or without the colon) before
//! anything else, reserve body memory (see [`crate::accept`]), read the body under
//! its cap and its time limit (gzip inflated under the same cap), find the source by
//! `writeKey` in the body when no header key was sent, validate and normalize each message, append the valid ones to the
//! event log, and answer `200 {"success":true}` only once the log says they are
//! durable. Invalid messages of a batch are listed in `rejected`; a request where
//! nothing is valid is a 400. Nothing accepted is dropped after the 200.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use axum::body::Body;
use axum::extract::{ConnectInfo, Path, Request, State};
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use serde_json::{Map, Value, json};
use tributary_model::body::{BodyError, BodyLimits, Item, Prepare, parse_body};
use tributary_model::{CallType, Rejection};

use crate::AppState;
use crate::accept::{KeyPlace, append, authenticate, basic_auth_key, reserve};
use crate::control::{Source, SourceType};
use crate::error::{ApiError, Checked};

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

/// `POST /v1/{method}`.
pub async fn tracking(
    State(state): State<Arc<AppState>>,
    Checked(Path(method)): Checked<Path<String>>,
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
    // A key outside the body is checked before anything is reserved or read, so a
    // client without a valid key holds no memory.
    let checked = match header_key.as_deref() {
        Some(k) => Some(authenticate(&state, Some(k), KeyPlace::Tracking)?),
        None => None,
    };
    let declared = crate::body::declared_length(&headers);
    if declared.is_some_and(|len| len > cap) {
        return Err(too_large(cap, cap_code));
    }
    // Memory bound. A checked key reserves the body's worst case before reading it
    // (its declared length when it is not compressed); a key in the body reserves
    // on the keyless budget as the bytes arrive.
    let (bytes, _reserved) = if checked.is_some() {
        let worst = match declared {
            Some(len) if !crate::body::is_compressed(&headers) => len.min(cap),
            _ => cap,
        };
        let reserved = reserve(&state, worst.max(1)).await?;
        let (bytes, _) = read_capped(&state, &headers, body, cap, cap_code, None).await?;
        (bytes, Some(reserved))
    } else {
        let (bytes, reserved) = read_capped(
            &state,
            &headers,
            body,
            cap,
            cap_code,
            Some(&state.keyless_budget),
        )
        .await?;
        (bytes, reserved)
    };
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
    let source = match checked {
        Some(s) => s,
        None => authenticate(&state, raw.write_key.as_deref(), KeyPlace::Tracking)?,
    };
    // The messages as sent, for the debugger's rejected entries: read again from
    // the request's bytes only when a message is refused while someone watches,
    // so valid messages cost the debugger nothing here.
    let sent_call_type = raw.call_type;
    let mut sent: Option<Vec<Value>> = None;
    let mut sent_item = |i: usize| -> Value {
        let items = sent.get_or_insert_with(|| {
            parse_body(&bytes, sent_call_type, body_limits)
                .map(|raw| {
                    raw.items
                        .into_iter()
                        .map(|i| {
                            let mut v = i.map(Item::into_value).unwrap_or(Value::Null);
                            if let Value::Object(o) = &mut v {
                                // The write key is a secret: never shown, as it is
                                // never stored.
                                o.remove("writeKey");
                                if let Some(call) = sent_call_type {
                                    o.entry("type")
                                        .or_insert_with(|| Value::String(call.as_str().into()));
                                }
                            }
                            v
                        })
                        .collect()
                })
                .unwrap_or_default()
        });
        items.get(i).cloned().unwrap_or(Value::Null)
    };
    // Only ActiveCampaign sources adjust messages before validation; the others
    // keep the spliced path (no JSON tree per message).
    let mut prepare_ac = |obj: &mut Map<String, Value>| prepare(&state, &source, obj);
    let prepare_hook: Option<&mut Prepare<'_>> = if source.kind == SourceType::Activecampaign {
        Some(&mut prepare_ac)
    } else {
        None
    };
    let results = raw.normalize_all(received_at, peer_ip, prepare_hook);
    let total = results.len();
    let mut accepted = Vec::with_capacity(total);
    let mut rejected = Vec::new();
    for (i, r) in results.into_iter().enumerate() {
        match r {
            Ok(n) => accepted.push(n),
            Err(r) => {
                count_rejection(&r);
                crate::accept::publish_rejected(
                    &state,
                    &source.id,
                    r.code.as_str(),
                    &r.message,
                    || sent_item(i),
                );
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

fn too_large(limit: usize, code: &'static str) -> ApiError {
    ApiError::TooLarge {
        code,
        message: if code == "message_too_large" {
            format!("a message may be at most {limit} bytes")
        } else {
            format!("a batch body may be at most {limit} bytes")
        },
    }
}

async fn read_capped<'a>(
    state: &AppState,
    headers: &HeaderMap,
    body: Body,
    limit: usize,
    code: &'static str,
    grow: Option<&'a tokio::sync::Semaphore>,
) -> Result<(Vec<u8>, Option<tokio::sync::SemaphorePermit<'a>>), ApiError> {
    crate::body::read_body_growing(headers, body, limit, &state.config.http, grow)
        .await
        .map_err(|e| match e {
            ApiError::TooLarge { .. } => too_large(limit, code),
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_and_short_paths() {
        assert_eq!(endpoint("t"), Some(Endpoint::Single(CallType::Track)));
        assert_eq!(endpoint("import"), Some(Endpoint::Batch));
        assert_eq!(endpoint("b"), Some(Endpoint::Batch));
        assert_eq!(endpoint("x"), None);
    }
}
