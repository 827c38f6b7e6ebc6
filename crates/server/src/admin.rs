//! The admin API under `/api/v1`: sources (create, list, show, patch, delete,
//! re-issue the write key, newest events for the debugger). Every route needs
//! `Authorization: Bearer <admin token>`, compared in constant time.

use std::sync::Arc;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path, Query, Request, State};
use axum::http::StatusCode;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde::Deserialize;
use serde::de::DeserializeOwned;
use serde_json::{Value, json};
use subtle::ConstantTimeEq;

use crate::AppState;
use crate::control::{Source, SourceType};
use crate::error::{ApiError, Checked};

/// Parses a JSON body into `T`, answering a clear 400 otherwise: `invalid_json`
/// when the body is not JSON at all, `invalid_request` when it is JSON of the
/// wrong shape.
pub fn json_body<T: DeserializeOwned>(bytes: &Bytes) -> Result<T, ApiError> {
    serde_json::from_slice(bytes).map_err(|e| {
        let code = if e.is_data() {
            "invalid_request"
        } else {
            "invalid_json"
        };
        ApiError::bad(code, format!("invalid request body: {e}"))
    })
}

/// Middleware: refuses requests without the admin bearer token.
pub async fn require_admin(
    State(state): State<Arc<AppState>>,
    request: Request,
    next: Next,
) -> Response {
    let presented = request
        .headers()
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| {
            let (scheme, token) = v.trim().split_once(' ')?;
            scheme
                .eq_ignore_ascii_case("bearer")
                .then(|| token.trim().to_string())
        });
    match presented {
        None => ApiError::Unauthorized("missing admin token: send Authorization: Bearer <token>")
            .into_response(),
        Some(t) if bool::from(t.as_bytes().ct_eq(state.admin_token.as_bytes())) => {
            next.run(request).await
        }
        Some(_) => ApiError::Unauthorized("wrong admin token").into_response(),
    }
}

/// The JSON view of a source.
pub fn source_view(state: &AppState, s: &Source) -> Value {
    let last_event = state.control.last_event(&s.id);
    let mut v = json!({
        "id": s.id,
        "type": s.kind,
        "name": s.name,
        "schema": s.schema,
        "write_key": s.write_key,
        "enabled": s.enabled,
        "settings": crate::sync::redact_settings(&s.settings),
        "created_at": s.created_at.to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
        "webhook_url": format!("{}/v1/webhooks/activecampaign?writeKey={}", state.config.public_url(), s.write_key),
        "last_event": last_event,
    });
    if s.kind == SourceType::Activecampaign {
        v["status"] = json!(if last_event.is_some() {
            "receiving"
        } else {
            "waiting"
        });
        if crate::sync::api_settings(s).is_some() {
            v["sync"] = crate::sync::status_of(&state.control, &s.id)
                .ok()
                .and_then(|st| serde_json::to_value(st).ok())
                .unwrap_or(Value::Null);
        }
    }
    v
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CreateSource {
    #[serde(rename = "type")]
    kind: String,
    name: String,
    schema: String,
    #[serde(default)]
    settings: Option<Value>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PatchSource {
    name: Option<String>,
    enabled: Option<bool>,
    settings: Option<Value>,
}

/// Checks a source's `settings` for its type (the rule the admin API and the console
/// share).
pub fn check_settings(kind: SourceType, settings: &Value) -> Result<(), ApiError> {
    if !settings.is_object() {
        return Err(ApiError::bad(
            "invalid_settings",
            "`settings` must be an object",
        ));
    }
    if kind == SourceType::Activecampaign {
        serde_json::from_value::<tributary_activecampaign::Settings>(settings.clone()).map_err(
            |e| {
                ApiError::bad(
                    "invalid_settings",
                    format!("invalid ActiveCampaign settings: {e}"),
                )
            },
        )?;
    }
    Ok(())
}

/// Checks a source's display name: 1 to 200 characters, not only blanks.
pub fn check_name(name: &str) -> Result<(), ApiError> {
    if name.trim().is_empty() || name.chars().count() > 200 {
        return Err(ApiError::bad(
            "invalid_name",
            "`name` must be 1 to 200 characters",
        ));
    }
    Ok(())
}

async fn create_source(
    State(state): State<Arc<AppState>>,
    Checked(body): Checked<Bytes>,
) -> Result<Response, ApiError> {
    let req: CreateSource = json_body(&body)?;
    let kind = match req.kind.as_str() {
        "activecampaign" => SourceType::Activecampaign,
        "http" => SourceType::Http,
        other => {
            return Err(ApiError::bad(
                "invalid_type",
                format!("unknown source type {other:?}; expected \"activecampaign\" or \"http\""),
            ));
        }
    };
    check_name(&req.name)?;
    let settings = req.settings.unwrap_or_else(|| json!({}));
    check_settings(kind, &settings)?;
    let settings = if kind == SourceType::Activecampaign {
        crate::sync::check_settings(None, settings).await?
    } else {
        settings
    };
    let s = state
        .control
        .create(kind, req.name.trim(), &req.schema, settings)?;
    tracing::info!(source = %s.id, schema = %s.schema, "source created");
    Ok((StatusCode::CREATED, axum::Json(source_view(&state, &s))).into_response())
}

async fn list_sources(State(state): State<Arc<AppState>>) -> axum::Json<Value> {
    axum::Json(Value::Array(
        state
            .control
            .sources()
            .iter()
            .map(|s| source_view(&state, s))
            .collect(),
    ))
}

fn find(state: &AppState, id: &str) -> Result<Arc<Source>, ApiError> {
    state
        .control
        .source(id)
        .ok_or_else(|| ApiError::NotFound(format!("no source with id {id:?}")))
}

async fn show_source(
    State(state): State<Arc<AppState>>,
    Checked(Path(id)): Checked<Path<String>>,
) -> Result<axum::Json<Value>, ApiError> {
    Ok(axum::Json(source_view(&state, &*find(&state, &id)?)))
}

async fn patch_source(
    State(state): State<Arc<AppState>>,
    Checked(Path(id)): Checked<Path<String>>,
    Checked(body): Checked<Bytes>,
) -> Result<axum::Json<Value>, ApiError> {
    let req: PatchSource = json_body(&body)?;
    let s = find(&state, &id)?;
    if let Some(n) = &req.name {
        check_name(n)?;
    }
    let mut settings = req.settings;
    if let Some(v) = settings.take() {
        check_settings(s.kind, &v)?;
        settings = Some(if s.kind == SourceType::Activecampaign {
            crate::sync::check_settings(Some(&s), v).await?
        } else {
            v
        });
    }
    let s = state.control.patch(
        &id,
        req.name.map(|n| n.trim().to_string()),
        req.enabled,
        settings,
    )?;
    Ok(axum::Json(source_view(&state, &s)))
}

async fn delete_source(
    State(state): State<Arc<AppState>>,
    Checked(Path(id)): Checked<Path<String>>,
) -> Result<StatusCode, ApiError> {
    state.control.delete(&id)?;
    Ok(StatusCode::NO_CONTENT)
}

async fn rotate_key(
    State(state): State<Arc<AppState>>,
    Checked(Path(id)): Checked<Path<String>>,
) -> Result<axum::Json<Value>, ApiError> {
    let s = state.control.rotate_key(&id)?;
    tracing::info!(source = %s.id, "write key re-issued");
    Ok(axum::Json(source_view(&state, &s)))
}

#[derive(Deserialize)]
struct EventsQuery {
    limit: Option<usize>,
}

async fn source_events(
    State(state): State<Arc<AppState>>,
    Checked(Path(id)): Checked<Path<String>>,
    Checked(Query(q)): Checked<Query<EventsQuery>>,
) -> Result<axum::Json<Value>, ApiError> {
    find(&state, &id)?;
    let limit = q.limit.unwrap_or(100).clamp(1, 5000);
    let records = state.log.latest(&id, limit).await?;
    let mut events: Vec<Value> = records
        .into_iter()
        .map(|r| serde_json::from_str(&r.payload).unwrap_or(Value::Null))
        .collect();
    // ActiveCampaign webhooks of types we do not map are not in the log; show them
    // here too, marked `"type": "unmapped"`, in time order.
    let unmapped = crate::webhook::unmapped_for(&state, &id)?;
    if !unmapped.is_empty() {
        events.extend(unmapped);
        let at = |v: &Value| {
            v.get("receivedAt")
                .and_then(Value::as_str)
                .unwrap_or("")
                .to_string()
        };
        events.sort_by_key(|v| std::cmp::Reverse(at(v)));
        events.truncate(limit);
    }
    Ok(axum::Json(Value::Array(events)))
}

/// The `/api/v1` routes (without the auth layer, which the app adds).
pub fn routes() -> Router<Arc<AppState>> {
    Router::new()
        .route("/sources", get(list_sources).post(create_source))
        .route(
            "/sources/{id}",
            get(show_source).patch(patch_source).delete(delete_source),
        )
        .route("/sources/{id}/write-key", post(rotate_key))
        .route("/sources/{id}/events", get(source_events))
        .route("/sources/{id}/events/stream", get(crate::live::api_stream))
        .route(
            "/sources/{id}/events/{message_id}",
            get(crate::fate::fate_route),
        )
        .fallback(no_route)
        .method_not_allowed_fallback(no_method)
}

async fn no_route(uri: axum::http::Uri) -> ApiError {
    ApiError::NotFound(format!("no admin API route {}", uri.path()))
}

async fn no_method(method: axum::http::Method, uri: axum::http::Uri) -> Response {
    let body = json!({
        "code": "method_not_allowed",
        "message": format!("{method} is not allowed on {}", uri.path()),
    });
    (StatusCode::METHOD_NOT_ALLOWED, axum::Json(body)).into_response()
}
