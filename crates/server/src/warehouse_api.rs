//! Admin routes for the warehouse: status, a table's newest rows, and read-only SQL.
//! A thin HTTP layer over [`tributary_warehouse::Warehouse`], which owns loading,
//! schema evolution and the read-only query connection.
//!
//! Every warehouse failure answers `{code, message}` with its own code: 400
//! `bad_query` (the database's message), 400 `query_not_allowed` (not a read-only
//! statement), 404 `not_found`, 503 `warehouse_unavailable` (the warehouse, not the
//! event log, cannot be reached) and 503 `query_role_unsafe` (queries would run with
//! more than read privileges, so none are run).

use std::sync::Arc;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde::Deserialize;
use tributary_warehouse::{Warehouse, WarehouseError};

use crate::AppState;
use crate::admin::json_body;
use crate::error::ApiError;

/// A failure of a warehouse route.
enum WhError {
    Api(ApiError),
    Warehouse(WarehouseError),
}

impl From<ApiError> for WhError {
    fn from(e: ApiError) -> Self {
        WhError::Api(e)
    }
}

impl From<WarehouseError> for WhError {
    fn from(e: WarehouseError) -> Self {
        WhError::Warehouse(e)
    }
}

impl IntoResponse for WhError {
    fn into_response(self) -> Response {
        let (status, code, message) = match self {
            WhError::Api(e) => return e.into_response(),
            WhError::Warehouse(WarehouseError::NotFound(m)) => {
                return ApiError::NotFound(format!("not found: {m}")).into_response();
            }
            WhError::Warehouse(WarehouseError::InvalidConfig(m)) => {
                return ApiError::Internal(m).into_response();
            }
            WhError::Warehouse(WarehouseError::BadQuery(m)) => {
                (StatusCode::BAD_REQUEST, "bad_query", m)
            }
            WhError::Warehouse(WarehouseError::NotAllowed(m)) => {
                (StatusCode::BAD_REQUEST, "query_not_allowed", m)
            }
            WhError::Warehouse(WarehouseError::QueryRoleUnsafe(m)) => {
                tracing::error!(detail = %m, "refusing warehouse queries");
                (StatusCode::SERVICE_UNAVAILABLE, "query_role_unsafe", m)
            }
            WhError::Warehouse(WarehouseError::Unavailable(m)) => {
                tracing::warn!(detail = %m, "warehouse unavailable");
                (
                    StatusCode::SERVICE_UNAVAILABLE,
                    "warehouse_unavailable",
                    format!("the warehouse cannot be reached right now; retry later ({m})"),
                )
            }
        };
        (
            status,
            axum::Json(serde_json::json!({"code": code, "message": message})),
        )
            .into_response()
    }
}

fn warehouse(state: &AppState) -> Result<&Arc<Warehouse>, ApiError> {
    state
        .warehouse
        .as_ref()
        .ok_or_else(|| ApiError::NotFound("the warehouse is off (TRIBUTARY_WAREHOUSE=off)".into()))
}

async fn status(State(state): State<Arc<AppState>>) -> Result<Response, WhError> {
    Ok(axum::Json(warehouse(&state)?.status().await?).into_response())
}

#[derive(Deserialize)]
struct LimitQuery {
    limit: Option<usize>,
}

async fn table(
    State(state): State<Arc<AppState>>,
    Path((schema, table)): Path<(String, String)>,
    Query(q): Query<LimitQuery>,
) -> Result<Response, WhError> {
    let limit = q.limit.unwrap_or(100).clamp(1, 10_000);
    Ok(axum::Json(warehouse(&state)?.table(&schema, &table, limit).await?).into_response())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct QueryBody {
    sql: String,
}

async fn query(State(state): State<Arc<AppState>>, body: Bytes) -> Result<Response, WhError> {
    let q: QueryBody = json_body(&body)?;
    if q.sql.trim().is_empty() {
        return Err(ApiError::bad("bad_query", "`sql` is empty").into());
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
