//! The one API error type: every refusal the server sends maps here to a status code
//! and a `{"code","message"}` body. Internal error text is logged, never sent.
//!
//! Invariants:
//! - Every conversion from a store's error (`From<…> for ApiError`) lives in this
//!   file, and a store outage names that store: a warehouse outage on `/query` is
//!   `warehouse_unavailable`, never "the event log cannot take writes".
//! - A full disk under the control store (or the destination store) is
//!   `507 storage_full`, not a 500. The event log's own outages stay
//!   `503 unavailable` (SDKs retry those).
//! - Extractor rejections (bad JSON, bad path or query parameters) are answered as
//!   `{code,message}` JSON too ([`Rejected`]), never axum's plain text.

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::json;

/// An error answered to a client.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// 400: the request or message is invalid.
    #[error("{message}")]
    BadRequest {
        /// Reason code.
        code: &'static str,
        /// Explanation.
        message: String,
        /// Per-message rejections of a batch, when every message was refused.
        rejected: Option<serde_json::Value>,
    },
    /// 401: no or unknown write key / admin token.
    #[error("{0}")]
    Unauthorized(&'static str),
    /// 403: the source is disabled.
    #[error("source is disabled")]
    SourceDisabled,
    /// 404: no such thing.
    #[error("{0}")]
    NotFound(String),
    /// 409: conflicts with existing state (e.g. schema taken).
    #[error("{0}")]
    Conflict(String),
    /// 413: body or message too large.
    #[error("{message}")]
    TooLarge {
        /// Reason code.
        code: &'static str,
        /// Explanation.
        message: String,
    },
    /// 408: the request body did not arrive in time; the connection is closed.
    #[error("{0}")]
    RequestTimeout(String),
    /// 429: the log is saturated; retry after a second.
    #[error("server is saturated, retry shortly")]
    Saturated,
    /// 503: a store cannot serve the request right now (detail logged, not sent).
    #[error("{store} unavailable")]
    Unavailable {
        /// Which store.
        store: Store,
        /// Internal detail, for the log only.
        detail: String,
    },
    /// 507: the disk under a store is full (detail logged, not sent).
    #[error("{store}: disk full")]
    StorageFull {
        /// Which store.
        store: Store,
        /// Internal detail, for the log only.
        detail: String,
    },
    /// 503: warehouse queries are refused because the role they would run as can do
    /// more than read the warehouse (the message says why and is sent).
    #[error("{0}")]
    QueryRoleUnsafe(String),
    /// 500: a bug or an unexpected failure (details logged).
    #[error("internal error")]
    Internal(String),
}

/// The stores behind the API, named in outage answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Store {
    /// The durable event log (`events.db`).
    EventLog,
    /// Sources, write keys and identities (`control.db`).
    Control,
    /// The warehouse (SQLite files or PostgreSQL).
    Warehouse,
    /// The destination engine and its store (`destinations.db`).
    Destinations,
}

impl std::fmt::Display for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Store::EventLog => "event log",
            Store::Control => "control store",
            Store::Warehouse => "warehouse",
            Store::Destinations => "destination engine",
        })
    }
}

impl ApiError {
    /// A 503 naming `store`, with `detail` for the log.
    pub fn unavailable(store: Store, detail: impl Into<String>) -> Self {
        ApiError::Unavailable {
            store,
            detail: detail.into(),
        }
    }

    /// A 400 with a reason code.
    pub fn bad(code: &'static str, message: impl Into<String>) -> Self {
        ApiError::BadRequest {
            code,
            message: message.into(),
            rejected: None,
        }
    }

    /// The status code this error is answered with.
    pub fn status(&self) -> StatusCode {
        match self {
            ApiError::BadRequest { .. } => StatusCode::BAD_REQUEST,
            ApiError::Unauthorized(_) => StatusCode::UNAUTHORIZED,
            ApiError::SourceDisabled => StatusCode::FORBIDDEN,
            ApiError::NotFound(_) => StatusCode::NOT_FOUND,
            ApiError::Conflict(_) => StatusCode::CONFLICT,
            ApiError::TooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::RequestTimeout(_) => StatusCode::REQUEST_TIMEOUT,
            ApiError::Saturated => StatusCode::TOO_MANY_REQUESTS,
            ApiError::Unavailable { .. } | ApiError::QueryRoleUnsafe(_) => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            ApiError::StorageFull { .. } => StatusCode::INSUFFICIENT_STORAGE,
            ApiError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// The reason code sent to clients.
    pub fn code(&self) -> &'static str {
        match self {
            ApiError::BadRequest { code, .. } | ApiError::TooLarge { code, .. } => code,
            ApiError::Unauthorized(_) => "unauthorized",
            ApiError::SourceDisabled => "source_disabled",
            ApiError::NotFound(_) => "not_found",
            ApiError::Conflict(_) => "conflict",
            ApiError::RequestTimeout(_) => "request_timeout",
            ApiError::Saturated => "rate_limited",
            ApiError::Unavailable { store, .. } => match store {
                Store::EventLog => "unavailable",
                Store::Control => "control_unavailable",
                Store::Warehouse => "warehouse_unavailable",
                Store::Destinations => "destinations_unavailable",
            },
            ApiError::StorageFull { .. } => "storage_full",
            ApiError::QueryRoleUnsafe(_) => "query_role_unsafe",
            ApiError::Internal(_) => "internal",
        }
    }
}

impl From<tributary_eventlog::LogError> for ApiError {
    fn from(e: tributary_eventlog::LogError) -> Self {
        match e {
            tributary_eventlog::LogError::Saturated => ApiError::Saturated,
            other => ApiError::unavailable(Store::EventLog, other.to_string()),
        }
    }
}

/// SQLite's "disk full" (`SQLITE_FULL`), as text when a store hands its error over
/// as a string.
fn says_disk_full(detail: &str) -> bool {
    detail.contains("database or disk is full")
}

/// Errors of `control.db`: a full disk is 507, a busy or unreadable database 503,
/// anything else a 500.
impl From<rusqlite::Error> for ApiError {
    fn from(e: rusqlite::Error) -> Self {
        use rusqlite::ErrorCode;
        match e.sqlite_error_code() {
            Some(ErrorCode::DiskFull) => ApiError::StorageFull {
                store: Store::Control,
                detail: e.to_string(),
            },
            Some(
                ErrorCode::DatabaseBusy
                | ErrorCode::DatabaseLocked
                | ErrorCode::SystemIoFailure
                | ErrorCode::CannotOpen
                | ErrorCode::ReadOnly,
            ) => ApiError::unavailable(Store::Control, e.to_string()),
            _ => ApiError::Internal(e.to_string()),
        }
    }
}

/// Errors of the PostgreSQL control database: a unique violation is a conflict
/// (409), a full disk 507, a lost or refused connection and the server's own
/// "cannot serve now" classes (08, 53, 57) a 503, anything else a 500.
impl From<tokio_postgres::Error> for ApiError {
    fn from(e: tokio_postgres::Error) -> Self {
        use tokio_postgres::error::SqlState;
        let detail = crate::cluster::pg::error_text(&e);
        let Some(code) = e.code() else {
            // No SQLSTATE: the connection itself failed or closed.
            return ApiError::unavailable(Store::Control, detail);
        };
        if *code == SqlState::UNIQUE_VIOLATION {
            ApiError::Conflict("conflicts with an existing entry".into())
        } else if *code == SqlState::DISK_FULL {
            ApiError::StorageFull {
                store: Store::Control,
                detail,
            }
        } else if ["08", "53", "57"]
            .iter()
            .any(|c| code.code().starts_with(c))
        {
            ApiError::unavailable(Store::Control, detail)
        } else {
            ApiError::Internal(detail)
        }
    }
}

impl From<tributary_warehouse::WarehouseError> for ApiError {
    fn from(e: tributary_warehouse::WarehouseError) -> Self {
        use tributary_warehouse::WarehouseError;
        match e {
            WarehouseError::NotFound(m) => ApiError::NotFound(format!("not found: {m}")),
            WarehouseError::BadQuery(m) => ApiError::bad("bad_query", m),
            WarehouseError::NotAllowed(m) => ApiError::bad("query_not_allowed", m),
            WarehouseError::QueryRoleUnsafe(m) => ApiError::QueryRoleUnsafe(m),
            WarehouseError::Unavailable(m) => ApiError::unavailable(Store::Warehouse, m),
            WarehouseError::InvalidConfig(m) => ApiError::Internal(m),
        }
    }
}

impl From<tributary_destinations::DestinationError> for ApiError {
    fn from(e: tributary_destinations::DestinationError) -> Self {
        use tributary_destinations::DestinationError;
        match e {
            DestinationError::Invalid(m) => ApiError::bad("invalid_destination", m),
            DestinationError::NotFound => ApiError::NotFound("no such destination".into()),
            DestinationError::Log(l) => ApiError::from(l),
            DestinationError::Closed => ApiError::unavailable(Store::Destinations, e.detail()),
            DestinationError::Internal(d) if says_disk_full(&d) => ApiError::StorageFull {
                store: Store::Destinations,
                detail: d,
            },
            DestinationError::Internal(d) => ApiError::Internal(d),
        }
    }
}

/// Any axum extractor rejection (JSON body, path, query, raw body) as a
/// `{code,message}` answer with the rejection's own status.
#[derive(Debug)]
pub struct Rejected(pub axum::response::Response);

impl IntoResponse for Rejected {
    fn into_response(self) -> Response {
        self.0
    }
}

/// Wraps an extractor so its rejection is answered as JSON:
/// `Json(x): Json<X>` becomes `Checked(Json(x)): Checked<Json<X>>`.
#[derive(Debug)]
pub struct Checked<E>(pub E);

fn rejection_code(status: StatusCode, kind: &str) -> &'static str {
    match (status, kind) {
        (StatusCode::UNSUPPORTED_MEDIA_TYPE, _) => "unsupported_media_type",
        (StatusCode::PAYLOAD_TOO_LARGE, _) => "body_too_large",
        (_, "path") => "invalid_path",
        (_, "query") => "invalid_query",
        (_, "json") => "invalid_json",
        _ => "invalid_request",
    }
}

fn rejected(status: StatusCode, kind: &str, text: String) -> Rejected {
    let body = json!({"code": rejection_code(status, kind), "message": text});
    Rejected((status, axum::Json(body)).into_response())
}

macro_rules! checked_extractor {
    ($ty:ident, $kind:literal, $($bound:tt)*) => {
        impl<S, T> axum::extract::FromRequestParts<S> for Checked<axum::extract::$ty<T>>
        where
            S: Send + Sync,
            $($bound)*
        {
            type Rejection = Rejected;

            async fn from_request_parts(
                parts: &mut axum::http::request::Parts,
                state: &S,
            ) -> Result<Self, Self::Rejection> {
                match axum::extract::$ty::<T>::from_request_parts(parts, state).await {
                    Ok(v) => Ok(Checked(v)),
                    Err(r) => Err(rejected(r.status(), $kind, r.body_text())),
                }
            }
        }
    };
}

checked_extractor!(Path, "path", T: serde::de::DeserializeOwned + Send);

impl<S> axum::extract::FromRequest<S> for Checked<axum::body::Bytes>
where
    S: Send + Sync,
{
    type Rejection = Rejected;

    async fn from_request(req: axum::extract::Request, state: &S) -> Result<Self, Self::Rejection> {
        match axum::body::Bytes::from_request(req, state).await {
            Ok(v) => Ok(Checked(v)),
            Err(r) => Err(rejected(r.status(), "body", r.body_text())),
        }
    }
}
checked_extractor!(Query, "query", T: serde::de::DeserializeOwned);

impl<S, T> axum::extract::FromRequest<S> for Checked<axum::Json<T>>
where
    S: Send + Sync,
    T: serde::de::DeserializeOwned,
{
    type Rejection = Rejected;

    async fn from_request(req: axum::extract::Request, state: &S) -> Result<Self, Self::Rejection> {
        match axum::Json::<T>::from_request(req, state).await {
            Ok(v) => Ok(Checked(v)),
            Err(r) => Err(rejected(r.status(), "json", r.body_text())),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = self.status();
        let message = match &self {
            ApiError::Unavailable { store, detail } => {
                tracing::error!(%store, detail = %detail, "answering 503");
                match store {
                    Store::EventLog => "the event log cannot take writes right now; retry later",
                    Store::Control => {
                        "the control store (sources and write keys) cannot be used right now; retry later"
                    }
                    Store::Warehouse => "the warehouse cannot be reached right now; retry later",
                    Store::Destinations => {
                        "the destination engine is not running right now; retry later"
                    }
                }
                .to_string()
            }
            ApiError::StorageFull { store, detail } => {
                tracing::error!(%store, detail = %detail, "answering 507: disk full");
                format!("the disk under the {store} is full; free space on the data dir and retry")
            }
            ApiError::Internal(detail) => {
                tracing::error!(detail = %detail, "answering 500");
                "internal error".to_string()
            }
            other => other.to_string(),
        };
        let mut body = json!({"code": self.code(), "message": message});
        if let ApiError::BadRequest {
            rejected: Some(r), ..
        } = &self
        {
            body["rejected"] = r.clone();
        }
        let mut resp = (status, axum::Json(body)).into_response();
        if matches!(self, ApiError::Saturated) {
            resp.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        }
        if matches!(self, ApiError::RequestTimeout(_)) {
            resp.headers_mut()
                .insert(header::CONNECTION, HeaderValue::from_static("close"));
        }
        resp
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;

    async fn answer(e: ApiError) -> (StatusCode, serde_json::Value) {
        let resp = e.into_response();
        let status = resp.status();
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        (status, serde_json::from_slice(&body).unwrap())
    }

    #[tokio::test]
    async fn a_warehouse_outage_names_the_warehouse_not_the_event_log() {
        let e = ApiError::from(tributary_warehouse::WarehouseError::Unavailable(
            "connection refused".into(),
        ));
        let (status, body) = answer(e).await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(body["code"], "warehouse_unavailable");
        let m = body["message"].as_str().unwrap();
        assert!(m.contains("warehouse"), "{m}");
        assert!(!m.contains("event log"), "{m}");
        assert!(!m.contains("refused"), "internal detail leaked: {m}");
    }

    #[tokio::test]
    async fn a_full_disk_under_the_control_store_is_507_storage_full() {
        let e = ApiError::from(rusqlite::Error::SqliteFailure(
            rusqlite::ffi::Error::new(rusqlite::ffi::SQLITE_FULL),
            Some("database or disk is full".into()),
        ));
        let (status, body) = answer(e).await;
        assert_eq!(status, StatusCode::INSUFFICIENT_STORAGE);
        assert_eq!(body["code"], "storage_full");
        assert!(body["message"].as_str().unwrap().contains("control store"));
    }

    #[tokio::test]
    async fn each_store_outage_has_its_own_code() {
        let mut codes = Vec::new();
        for store in [
            Store::EventLog,
            Store::Control,
            Store::Warehouse,
            Store::Destinations,
        ] {
            let (status, body) = answer(ApiError::unavailable(store, "x")).await;
            assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
            codes.push(body["code"].as_str().unwrap().to_string());
        }
        codes.sort();
        codes.dedup();
        assert_eq!(codes.len(), 4, "{codes:?}");
    }
}
