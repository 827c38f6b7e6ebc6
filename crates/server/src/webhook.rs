//! ActiveCampaign webhooks: `POST /v1/webhooks/activecampaign?writeKey=KEY` and
//! `/v1/webhooks/activecampaign/KEY`, form-encoded, one event per request.
//!
//! The request does only parse + map + identity lookup + durable append, so it answers
//! in milliseconds. It never answers 410 (ActiveCampaign disables a webhook for good
//! on 410): a bad key is 401, a disabled source 403, a body that is not a webhook 400.
//! Types we do not map are acknowledged with 200, counted in
//! `tributary_activecampaign_unmapped_total`, kept for the source's debugger (in
//! `control.db`, the newest [`crate::control::UNMAPPED_KEPT`] per source, written
//! before the 200 so they survive a restart) and not loaded. An automation "Webhook"
//! action (contact fields, no `type`) is mapped to an identify.

use std::sync::Arc;

use axum::extract::{Path, Query, Request, State};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::{Value, json};
use tributary_activecampaign::{Mapped, Settings, WebhookError, parse_webhook};
use tributary_model::{NormalizeContext, normalize};

use crate::AppState;
use crate::accept::{KeyPlace, append, authenticate, basic_auth_key, reserve};
use crate::control::LastEvent;
use crate::error::{ApiError, Checked};
use crate::live::{LiveKind, NewLiveEvent};

/// Largest webhook body accepted (ActiveCampaign's are a few KiB).
const MAX_WEBHOOK_BYTES: usize = 256 * 1024;

/// The kept unmapped webhooks of a source (newest first), for the debugger.
pub fn unmapped_for(state: &AppState, source_id: &str) -> Result<Vec<Value>, ApiError> {
    state.control.unmapped(source_id)
}

/// The `?writeKey=` query.
#[derive(Deserialize)]
pub struct KeyQuery {
    /// The source's write key.
    #[serde(rename = "writeKey")]
    pub write_key: Option<String>,
}

/// `POST /v1/webhooks/activecampaign?writeKey=KEY`.
pub async fn activecampaign(
    State(state): State<Arc<AppState>>,
    Checked(Query(q)): Checked<Query<KeyQuery>>,
    request: Request,
) -> Result<Response, ApiError> {
    let key = q.write_key.or_else(|| basic_auth_key(request.headers()));
    handle(state, key, request).await
}

/// `POST /v1/webhooks/activecampaign/KEY`.
pub async fn activecampaign_keyed(
    State(state): State<Arc<AppState>>,
    Checked(Path(key)): Checked<Path<String>>,
    request: Request,
) -> Result<Response, ApiError> {
    handle(state, Some(key), request).await
}

/// The form fields of a webhook body, as strings (empty when it is not a form).
fn form_fields(bytes: &[u8]) -> serde_json::Map<String, Value> {
    tributary_activecampaign::parse_form(bytes)
        .map(|p| {
            p.iter()
                .map(|(k, v)| (k.to_string(), Value::String(v.to_string())))
                .collect()
        })
        .unwrap_or_default()
}

fn label(raw_type: &str) -> String {
    let t: String = raw_type
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || *c == '_')
        .take(32)
        .collect::<String>()
        .to_ascii_lowercase();
    if t.is_empty() { "empty".into() } else { t }
}

/// What a mapped ActiveCampaign message becomes before its append, on every path
/// (webhook and API sync): the identity rule (a configured contact field already set
/// `userId`; otherwise an earlier identify with this email, on any source, gives it)
/// then ingest's normalization.
pub fn prepare(
    state: &AppState,
    mut message: serde_json::Map<String, Value>,
    email: Option<&str>,
    received_at: chrono::DateTime<chrono::Utc>,
) -> Result<tributary_model::Normalized, ApiError> {
    if !message.contains_key("userId")
        && let Some(uid) = email.and_then(|e| state.control.user_id_for_email(e))
    {
        message.insert("userId".into(), Value::String(uid));
        message.remove("anonymousId");
    }
    let ctx = NormalizeContext {
        received_at,
        ..Default::default()
    };
    normalize(Value::Object(message), &ctx).map_err(|r| ApiError::bad(r.code.as_str(), r.message))
}

async fn handle(
    state: Arc<AppState>,
    key: Option<String>,
    request: Request,
) -> Result<Response, ApiError> {
    // The key is in the URL: check it before reserving memory or reading the body.
    let source = authenticate(&state, key.as_deref(), KeyPlace::Webhook)?;
    let (parts, body) = request.into_parts();
    let _reserved = reserve(&state, MAX_WEBHOOK_BYTES).await?;
    let bytes =
        crate::body::read_body(&parts.headers, body, MAX_WEBHOOK_BYTES, &state.config.http).await?;
    // Read from the borrowed `Value` (no clone of the settings per request).
    let settings = Settings::deserialize(&source.settings).unwrap_or_default();
    let webhook = parse_webhook(&bytes, &settings).map_err(|e| {
        metrics::counter!("tributary_activecampaign_invalid_total").increment(1);
        let code = match e {
            WebhookError::Parse(_) => "invalid_form",
            WebhookError::Map(_) => "invalid_webhook",
        };
        let message = e.to_string();
        crate::accept::publish_rejected(
            &state,
            &source.id,
            code,
            &message,
            || json!({"fields": form_fields(&bytes)}),
        );
        ApiError::bad(code, message)
    })?;
    let received_at = state.clock.now();
    let received = tributary_model::normalize::format_ts(received_at);
    let (message, email) = match webhook.mapped {
        Mapped::Track { message, email } | Mapped::Identify { message, email } => (message, email),
        Mapped::Unmapped => {
            metrics::counter!("tributary_activecampaign_unmapped_total", "type" => label(&webhook.raw_type))
                .increment(1);
            let fields = form_fields(&bytes);
            let entry = json!({
                "type": "unmapped",
                "activecampaign_type": webhook.raw_type,
                "receivedAt": received,
                "fields": fields,
            });
            let control = state.control.clone();
            let source_id = source.id.clone();
            let live = state.live.watched().then(|| entry.clone());
            tokio::task::spawn_blocking(move || control.record_unmapped(&source_id, &entry))
                .await
                .map_err(|e| ApiError::Internal(e.to_string()))??;
            if let Some(body) = live {
                let mut e =
                    NewLiveEvent::from_body(&source.id, LiveKind::Unmapped, received_at, body);
                e.event = Some(webhook.raw_type.clone());
                e.call_type = None;
                state.live.publish(e);
            }
            state.control.set_last_event(
                &source.id,
                LastEvent {
                    event: Some(webhook.raw_type.clone()),
                    kind: "unmapped".into(),
                    received_at: received,
                    message_id: String::new(),
                },
            );
            return Ok(axum::Json(json!({"success": true, "mapped": false})).into_response());
        }
    };
    let sent = state.live.watched().then(|| Value::Object(message.clone()));
    let normalized = prepare(&state, message, email.as_deref(), received_at).inspect_err(|e| {
        metrics::counter!("tributary_activecampaign_invalid_total").increment(1);
        if let (Some(body), ApiError::BadRequest { code, message, .. }) = (sent, e) {
            crate::accept::publish_rejected(&state, &source.id, code, message, || body);
        }
    })?;
    let last = LastEvent {
        event: Some(webhook.raw_type.clone()),
        kind: normalized.call_type.as_str().to_string(),
        received_at: received,
        message_id: normalized.message_id.clone(),
    };
    metrics::counter!("tributary_activecampaign_webhooks_total", "type" => label(&webhook.raw_type)).increment(1);
    append(&state, &source, vec![normalized], Some(last)).await?;
    Ok(axum::Json(json!({"success": true})).into_response())
}
