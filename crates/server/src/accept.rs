//! What every way in shares once a request is parsed: finding the source by its
//! write key, reserving body memory, and appending normalized messages durably.
//! The Tracking API ([`crate::ingest`]) and the ActiveCampaign webhook
//! ([`crate::webhook`]) both go through here, so a key is checked, and an append is
//! acknowledged, the same way on every path.
//!
//! Invariants:
//! - A key given outside the body (Basic auth, `?writeKey=`, a path segment) is
//!   checked before any body memory is reserved or any body byte is read.
//! - Body memory comes from one of two budgets: callers whose key was checked
//!   reserve their body's worst case on [`crate::AppState::ingest_budget`] before
//!   reading; callers whose key is in the body reserve on
//!   [`crate::AppState::keyless_budget`] (another quarter of
//!   `limits.max_inflight_bytes`) chunk by chunk as bytes arrive ([`reserve_more`]),
//!   so a stalled body holds only what it really sent, and unauthenticated bodies
//!   can never take the room of authenticated ones.
//! - [`append`] returns only once the log says the records are durable; the
//!   identity map and the source's last event are updated after that.

use std::sync::Arc;
use std::time::Instant;

use axum::http::HeaderMap;
use base64::Engine as _;
use serde_json::Value;
use tributary_eventlog::{AppendStatus, NewRecord};
use tributary_model::{CallType, Normalized};

use crate::AppState;
use crate::control::{LastEvent, Source};
use crate::error::ApiError;
use crate::live::{LiveBody, LiveItem, LiveKind, LiveReason, NewLiveEvent, email_of};

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

/// Where a write key was looked for, so a missing key is explained for that path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyPlace {
    /// The Tracking API: Basic auth or `writeKey` in the body.
    Tracking,
    /// The ActiveCampaign webhook: `?writeKey=` or a key path segment.
    Webhook,
}

/// Resolves a write key to an enabled source; `place` words the missing-key answer.
pub fn authenticate(
    state: &AppState,
    key: Option<&str>,
    place: KeyPlace,
) -> Result<Arc<Source>, ApiError> {
    let key = key.filter(|k| !k.is_empty()).ok_or(ApiError::Unauthorized(match place {
        KeyPlace::Tracking => {
            "missing write key: use HTTP Basic auth with the write key as user name, or `writeKey` in the body"
        }
        KeyPlace::Webhook => {
            "missing write key: add ?writeKey=<the source's write key> to the webhook URL (or use /v1/webhooks/activecampaign/<key>)"
        }
    }))?;
    let source = state
        .control
        .source_by_key(key)
        .ok_or(ApiError::Unauthorized("unknown write key"))?;
    if !source.enabled {
        return Err(ApiError::SourceDisabled);
    }
    Ok(source)
}

/// Reserves `bytes` of the ingest memory budget for a caller whose key was
/// checked, waiting up to a second (then 429).
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
            metrics::counter!("tributary_ingest_saturated_total", "caller" => "authenticated")
                .increment(1);
            Err(ApiError::Saturated)
        }
    }
}

/// Adds `bytes` to a growing reservation on `budget` (see
/// [`crate::body::read_body_growing`]), waiting up to a second for room.
pub async fn reserve_more<'a>(
    budget: &'a tokio::sync::Semaphore,
    held: &mut Option<tokio::sync::SemaphorePermit<'a>>,
    bytes: usize,
) -> Result<(), ApiError> {
    if bytes == 0 {
        return Ok(());
    }
    let n = u32::try_from(bytes).unwrap_or(u32::MAX);
    match tokio::time::timeout(std::time::Duration::from_secs(1), budget.acquire_many(n)).await {
        Ok(Ok(p)) => {
            match held {
                Some(h) => h.merge(p),
                None => *held = Some(p),
            }
            Ok(())
        }
        _ => {
            metrics::counter!("tributary_ingest_saturated_total", "caller" => "key_in_body")
                .increment(1);
            Err(ApiError::Saturated)
        }
    }
}

/// Shows a refused message of `source` in the debugger (a no-op when nobody
/// watches). `body` is the message as sent, when it could be read.
pub fn publish_rejected(
    state: &AppState,
    source_id: &str,
    code: &str,
    message: &str,
    body: impl FnOnce() -> Value,
) {
    if !state.live.watched() {
        return;
    }
    let mut e = NewLiveEvent::from_body(source_id, LiveKind::Rejected, state.clock.now(), body());
    e.reason = Some(LiveReason {
        code: code.to_string(),
        message: message.to_string(),
    });
    state.live.publish(e);
}

/// What an append did.
pub struct Appended {
    /// Messages stored.
    pub stored: usize,
    /// Messages already in the log (acknowledged, not stored again).
    pub duplicates: usize,
    /// Per message, in order: `true` when it was stored, `false` for a duplicate.
    pub new: Vec<bool>,
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
            new: Vec::new(),
        });
    };
    let last_event = last_event_override.unwrap_or_else(|| LastEvent {
        event: last.event.clone(),
        kind: last.call_type.as_str().to_string(),
        received_at: chrono::DateTime::from_timestamp_millis(last.received_at_ms)
            .map(tributary_model::normalize::format_ts)
            .unwrap_or_default(),
        message_id: last.message_id.clone(),
    });
    // The debugger's entries, built only when someone watches (see `live`): the
    // JSON text encoded for the log and the row's fields, no clone of the body.
    let watched = state.live.watched();
    let mut live: Vec<LiveItem> = Vec::new();
    if watched {
        live.reserve_exact(messages.len());
    }
    let mut identities = Vec::new();
    let records: Vec<NewRecord> = messages
        .into_iter()
        .map(|n| {
            if n.call_type == CallType::Identify
                && let (Some(uid), Some(email)) = (n.user_id.as_ref(), n.traits_email.as_ref())
            {
                identities.push((email.clone(), uid.clone()));
            }
            if watched {
                live.push(LiveItem {
                    event: n.event.clone(),
                    call_type: Some(n.call_type.as_str().to_string()),
                    message_id: Some(n.message_id.clone()).filter(|m| !m.is_empty()),
                    user_id: n.user_id.clone(),
                    anonymous_id: n.anonymous_id.clone(),
                    email: email_of(&n.body()),
                    reason: None,
                    body: LiveBody::Text(n.payload.clone()),
                });
            }
            // Written by normalization (spliced from the request's bytes on the
            // tracking path, see `tributary_model::splice`).
            let payload = n.payload;
            NewRecord {
                source_id: source.id.clone(),
                message_id: n.message_id,
                call_type: n.call_type,
                event: n.event,
                user_id: n.user_id,
                anonymous_id: n.anonymous_id,
                received_at_ms: n.received_at_ms,
                payload,
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
    if !live.is_empty() {
        state
            .live
            .publish_batch(&source.id, LiveKind::Accepted, state.clock.now(), live);
    }
    let new = statuses
        .iter()
        .map(|s| !matches!(s, AppendStatus::Duplicate))
        .collect();
    Ok(Appended {
        stored,
        duplicates,
        new,
    })
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
}
