//! Admin routes for the warehouse: status, a table's newest rows, and read-only SQL.
//! A thin HTTP layer over [`tributary_warehouse::Warehouse`], which owns loading,
//! schema evolution and the read-only query connection.

use std::sync::Arc;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde::Deserialize;
use tributary_warehouse::Warehouse;

use crate::AppState;
use crate::admin::json_body;
use crate::error::{ApiError, Checked};

fn warehouse(state: &AppState) -> Result<&Arc<Warehouse>, ApiError> {
    state
        .warehouse
        .as_ref()
        .ok_or_else(|| ApiError::NotFound("the warehouse is off (TRIBUTARY_WAREHOUSE=off)".into()))
}

async fn status(State(state): State<Arc<AppState>>) -> Result<Response, ApiError> {
    Ok(axum::Json(warehouse(&state)?.status().await?).into_response())
}

#[derive(Deserialize)]
struct LimitQuery {
    limit: Option<usize>,
}

async fn table(
    State(state): State<Arc<AppState>>,
    Checked(Path((schema, table))): Checked<Path<(String, String)>>,
    Checked(Query(q)): Checked<Query<LimitQuery>>,
) -> Result<Response, ApiError> {
    let limit = q.limit.unwrap_or(100).clamp(1, 10_000);
    Ok(axum::Json(warehouse(&state)?.table(&schema, &table, limit).await?).into_response())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct QueryBody {
    sql: String,
}

async fn query(
    State(state): State<Arc<AppState>>,
    Checked(body): Checked<Bytes>,
) -> Result<Response, ApiError> {
    let q: QueryBody = json_body(&body)?;
    if q.sql.trim().is_empty() {
        return Err(ApiError::bad("bad_query", "`sql` is empty"));
    }
    Ok(axum::Json(warehouse(&state)?.query(&q.sql).await?).into_response())
}

/// The `/api/v1/warehouse` and `/api/v1/query` routes.
pub fn routes() -> Router<Arc<AppState>> {
    Router::new()
        .route("/warehouse", get(status))
        .route("/warehouse/{schema}/{table}", get(table))
        .route("/query", post(query))
}
