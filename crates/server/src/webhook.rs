//! ActiveCampaign webhooks: `POST /v1/webhooks/activecampaign?writeKey=KEY` and
//! `/v1/webhooks/activecampaign/KEY`, form-encoded, one event per request.
//!
//! The request does only parse + map + identity lookup + durable append, so it answers
//! in milliseconds. It never answers 410 (ActiveCampaign disables a webhook for good
//! on 410): a bad key is 401, a disabled source 403, a body that is not a webhook 400.
//! Types we do not map are acknowledged with 200, counted in
//! `tributary_activecampaign_unmapped_total`, shown in the source's debugger (kept in
//! memory, the newest 100 per source) and not loaded.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, OnceLock};

use axum::extract::{Path, Query, Request, State};
use axum::response::{IntoResponse, Response};
use chrono::Utc;
use serde::Deserialize;
use serde_json::{Value, json};
use tributary_activecampaign::{Mapped, Settings, WebhookError, parse_webhook};
use tributary_model::{NormalizeContext, normalize};

use crate::AppState;
use crate::accept::{KeyPlace, append, authenticate, basic_auth_key, reserve};
use crate::control::LastEvent;
use crate::error::{ApiError, Checked};

/// Largest webhook body accepted (ActiveCampaign's are a few KiB).
const MAX_WEBHOOK_BYTES: usize = 256 * 1024;
const UNMAPPED_KEPT: usize = 100;

type UnmappedLog = Mutex<HashMap<String, VecDeque<Value>>>;

fn unmapped_log() -> &'static UnmappedLog {
    static LOG: OnceLock<UnmappedLog> = OnceLock::new();
    LOG.get_or_init(Default::default)
}

/// The newest unmapped webhooks of a source (newest first), for the debugger.
pub fn unmapped_for(source_id: &str) -> Vec<Value> {
    unmapped_log()
        .lock()
        .ok()
        .and_then(|m| m.get(source_id).map(|q| q.iter().rev().cloned().collect()))
        .unwrap_or_default()
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

fn label(raw_type: &str) -> String {
    let t: String = raw_type
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || *c == '_')
        .take(32)
        .collect::<String>()
        .to_ascii_lowercase();
    if t.is_empty() { "empty".into() } else { t }
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
    let settings: Settings = serde_json::from_value(source.settings.clone()).unwrap_or_default();
    let webhook = parse_webhook(&bytes, &settings).map_err(|e| {
        metrics::counter!("tributary_activecampaign_invalid_total").increment(1);
        let code = match e {
            WebhookError::Parse(_) => "invalid_form",
            WebhookError::Map(_) => "invalid_webhook",
        };
        ApiError::bad(code, e.to_string())
    })?;
    let received_at = Utc::now();
    let received = tributary_model::normalize::format_ts(received_at);
    let (mut message, email) = match webhook.mapped {
        Mapped::Track { message, email } | Mapped::Identify { message, email } => (message, email),
        Mapped::Unmapped => {
            metrics::counter!("tributary_activecampaign_unmapped_total", "type" => label(&webhook.raw_type))
                .increment(1);
            let fields: serde_json::Map<String, Value> =
                tributary_activecampaign::parse_form(&bytes)
                    .map(|p| {
                        p.iter()
                            .map(|(k, v)| (k.to_string(), Value::String(v.to_string())))
                            .collect()
                    })
                    .unwrap_or_default();
            if let Ok(mut m) = unmapped_log().lock() {
                let q = m.entry(source.id.clone()).or_default();
                q.push_back(json!({
                    "type": "unmapped",
                    "activecampaign_type": webhook.raw_type,
                    "receivedAt": received,
                    "fields": fields,
                }));
                while q.len() > UNMAPPED_KEPT {
                    q.pop_front();
                }
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
    // Identity: a configured contact field already set userId; otherwise an earlier
    // identify with this email (on any source) gives it.
    if !message.contains_key("userId")
        && let Some(uid) = email
            .as_deref()
            .and_then(|e| state.control.user_id_for_email(e))
    {
        message.insert("userId".into(), Value::String(uid));
        message.remove("anonymousId");
    }
    let ctx = NormalizeContext {
        received_at,
        ..Default::default()
    };
    let normalized = normalize(Value::Object(message), &ctx).map_err(|r| {
        metrics::counter!("tributary_activecampaign_invalid_total").increment(1);
        ApiError::bad(r.code.as_str(), r.message)
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
