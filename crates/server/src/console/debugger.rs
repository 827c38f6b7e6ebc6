//! The debugger (filled in once the live backend lands).

use std::sync::Arc;

use axum::extract::State;
use axum::response::Response;

use super::session::Signed;
use crate::AppState;

/// `GET /sources/{id}/debugger`.
pub(crate) async fn page(State(_state): State<Arc<AppState>>, _signed: Signed) -> Response {
    super::see_other("/sources")
}
/// `GET /sources/{id}/debugger/stream`.
pub(crate) async fn stream(State(_state): State<Arc<AppState>>, _signed: Signed) -> Response {
    super::see_other("/sources")
}
/// `GET /sources/{id}/debugger/fate`.
pub(crate) async fn fate(State(_state): State<Arc<AppState>>, _signed: Signed) -> Response {
    super::see_other("/sources")
}
