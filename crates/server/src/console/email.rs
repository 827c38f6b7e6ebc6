//! The email report page (filled in once the report backend lands).

use std::sync::Arc;

use axum::extract::State;
use axum::response::Response;

use super::session::Signed;
use crate::AppState;

/// `GET /reports/email`.
pub(crate) async fn page(State(_state): State<Arc<AppState>>, _signed: Signed) -> Response {
    super::see_other("/sources")
}
