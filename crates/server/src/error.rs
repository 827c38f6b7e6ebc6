//! The one API error type: every refusal the server sends maps here to a status code
//! and a `{"code","message"}` body. Internal error text is logged, never sent.

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
    /// 429: the log is saturated; retry after a second.
    #[error("server is saturated, retry shortly")]
    Saturated,
    /// 503: the log (or another store) cannot take writes.
    #[error("service unavailable")]
    Unavailable(String),
    /// 500: a bug or an unexpected failure (details logged).
    #[error("internal error")]
    Internal(String),
}

impl ApiError {
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
            ApiError::Saturated => StatusCode::TOO_MANY_REQUESTS,
            ApiError::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
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
            ApiError::Saturated => "rate_limited",
            ApiError::Unavailable(_) => "unavailable",
            ApiError::Internal(_) => "internal",
        }
    }
}

impl From<tributary_eventlog::LogError> for ApiError {
    fn from(e: tributary_eventlog::LogError) -> Self {
        match e {
            tributary_eventlog::LogError::Saturated => ApiError::Saturated,
            other => ApiError::Unavailable(other.to_string()),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = self.status();
        let message = match &self {
            ApiError::Unavailable(detail) => {
                tracing::error!(detail = %detail, "answering 503");
                "the event log cannot take writes right now; retry later".to_string()
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
        resp
    }
}
