//! Admin routes for destinations: a thin HTTP layer over
//! [`tributary_destinations::Engine`], which owns delivery, retries, dead letters and
//! replay. This module only checks that named sources exist and maps engine errors
//! to API errors.

use std::sync::Arc;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde::Deserialize;
use serde_json::Value;
use tributary_destinations::{CreateDestination, Engine, PatchDestination, ReplayRequest};

use crate::AppState;
use crate::admin::json_body;
use crate::error::{ApiError, Checked};

fn engine(state: &AppState) -> Result<&Arc<Engine>, ApiError> {
    Ok(&state.destinations)
}

fn check_sources(state: &AppState, ids: &[String]) -> Result<(), ApiError> {
    for id in ids {
        if state.control.source(id).is_none() {
            return Err(ApiError::bad(
                "invalid_destination",
                format!("source_ids names an unknown source {id:?}"),
            ));
        }
    }
    Ok(())
}

async fn create(
    State(state): State<Arc<AppState>>,
    Checked(body): Checked<Bytes>,
) -> Result<Response, ApiError> {
    let req: CreateDestination = json_body(&body)?;
    check_sources(&state, &req.source_ids)?;
    let view = engine(&state)?.create(req).await?;
    Ok((StatusCode::CREATED, axum::Json(view)).into_response())
}

async fn list(State(state): State<Arc<AppState>>) -> Result<Response, ApiError> {
    Ok(axum::Json(engine(&state)?.list().await?).into_response())
}

async fn show(
    State(state): State<Arc<AppState>>,
    Checked(Path(id)): Checked<Path<String>>,
) -> Result<Response, ApiError> {
    Ok(axum::Json(engine(&state)?.get(&id).await?).into_response())
}

async fn patch(
    State(state): State<Arc<AppState>>,
    Checked(Path(id)): Checked<Path<String>>,
    Checked(body): Checked<Bytes>,
) -> Result<Response, ApiError> {
    let req: PatchDestination = json_body(&body)?;
    if let Some(ids) = &req.source_ids {
        check_sources(&state, ids)?;
    }
    Ok(axum::Json(engine(&state)?.patch(&id, req).await?).into_response())
}

async fn delete(
    State(state): State<Arc<AppState>>,
    Checked(Path(id)): Checked<Path<String>>,
) -> Result<StatusCode, ApiError> {
    engine(&state)?.delete(&id).await?;
    Ok(StatusCode::NO_CONTENT)
}

#[derive(Deserialize)]
struct LimitQuery {
    limit: Option<usize>,
}

async fn dead_letters(
    State(state): State<Arc<AppState>>,
    Checked(Path(id)): Checked<Path<String>>,
    Checked(Query(q)): Checked<Query<LimitQuery>>,
) -> Result<Response, ApiError> {
    let limit = q
        .limit
        .unwrap_or(100)
        .clamp(1, tributary_destinations::MAX_DEAD_LETTER_LIMIT);
    Ok(axum::Json(engine(&state)?.dead_letters(&id, limit).await?).into_response())
}

async fn replay(
    State(state): State<Arc<AppState>>,
    Checked(Path(id)): Checked<Path<String>>,
    Checked(body): Checked<Bytes>,
) -> Result<Response, ApiError> {
    let req: ReplayRequest = if body.is_empty() {
        ReplayRequest::default()
    } else {
        json_body(&body)?
    };
    let outcome = engine(&state)?.replay(&id, req).await?;
    Ok((
        StatusCode::ACCEPTED,
        axum::Json::<Value>(serde_json::to_value(outcome).unwrap_or_default()),
    )
        .into_response())
}

/// The `/api/v1/destinations` routes.
pub fn routes() -> Router<Arc<AppState>> {
    Router::new()
        .route("/destinations", get(list).post(create))
        .route("/destinations/{id}", get(show).patch(patch).delete(delete))
        .route("/destinations/{id}/dead-letters", get(dead_letters))
        .route("/destinations/{id}/replay", post(replay))
}
