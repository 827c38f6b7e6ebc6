//! The web console: server-rendered HTML pages for everything the admin API does
//! (sources, destinations, warehouse, email report, the live debugger), served by the
//! binary itself at `/` with no CDN and no build step.
//!
//! **Templates** are [`maud`] macros: HTML checked at compile time, every
//! interpolated value escaped by default (a source named
//! `<script>alert(1)</script>` renders as text), no template files to ship or find at
//! run time, and one small proc-macro crate rather than askama's parser and
//! derive stack. **Assets** are one stylesheet and one script, embedded with
//! `include_str!` and served under a `?v=<hash>` path with a one-year immutable cache;
//! the Content-Security-Policy allows scripts only from `'self'` (no inline script or
//! handlers), and every page but the live debugger works with JavaScript off.
//!
//! **Auth**: the sign-in form takes the admin token (constant-time check) and sets a
//! random session id cookie (`HttpOnly`, `SameSite=Strict`, `Secure` over TLS); the
//! token itself never leaves the server again. Sessions live in the control store
//! (only the id's SHA-256; `control.db`, or the PostgreSQL control database in
//! cluster mode, so one sign-in works on every node and a sign-out ends it on all
//! of them), and sign-in is rate-limited per client address
//! ([`session::Sessions`]). Every state-changing form checks `Sec-Fetch-Site` /
//! `Origin` and a per-session CSRF token ([`session::check_form`]). `/api/v1` keeps
//! bearer auth only: the cookie is never accepted there.
//!
//! Pages call the same functions as the admin API (`Control`, the destination
//! engine, the warehouse, `admin::check_name`, `control::validate_schema`), so a
//! rule is written once.

mod assets;
mod debugger;
mod destinations;
mod email;
mod layout;
pub mod session;
mod sources;
mod warehouse;

use std::sync::Arc;

use axum::Router;
use axum::extract::Request;
use axum::http::{HeaderValue, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};

use crate::AppState;

pub use session::Sessions;

/// The Content-Security-Policy of every console page.
pub const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; \
img-src 'self' data:; connect-src 'self'; form-action 'self'; frame-ancestors 'none'; \
base-uri 'none'";

/// The console's routes (pages, forms, assets, the debugger stream), with their own
/// session store; merged into the app router beside `/api/v1`.
pub fn router() -> Router<Arc<AppState>> {
    router_with(Arc::new(Sessions::new(session::SESSION_TTL)))
}

/// [`router`] with a given session store (tests use a short lifetime).
pub fn router_with(sessions: Arc<Sessions>) -> Router<Arc<AppState>> {
    Router::new()
        .route("/", get(sources::home))
        .route("/login", get(session::login_page).post(session::login))
        .route("/logout", post(session::logout))
        .route("/sources", get(sources::list).post(sources::create))
        .route("/sources/new", get(sources::new_page))
        .route("/sources/new/check", get(sources::check_schema))
        .route(
            "/sources/{id}",
            get(sources::overview).post(sources::action),
        )
        .route("/sources/{id}/last-event", get(sources::last_event_json))
        .route("/sources/{id}/debugger", get(debugger::page))
        .route("/sources/{id}/debugger/stream", get(debugger::stream))
        .route("/sources/{id}/debugger/fate", get(debugger::fate))
        .route(
            "/destinations",
            get(destinations::list).post(destinations::create),
        )
        .route("/destinations/new", get(destinations::new_page))
        .route(
            "/destinations/{id}",
            get(destinations::show).post(destinations::action),
        )
        .route("/destinations/{id}/stats", get(destinations::stats_json))
        .route("/warehouse", get(warehouse::page).post(warehouse::query))
        .route("/warehouse/{schema}/{table}", get(warehouse::table))
        .route("/reports/email", get(email::page))
        .route("/assets/console.css", get(assets::css))
        .route("/assets/console.js", get(assets::js))
        .layer(axum::middleware::from_fn(security_headers))
        .layer(axum::Extension(sessions))
}

/// Adds the CSP and the other hardening headers to every console answer; pages are
/// never cached (they show secrets such as write keys), assets keep their own
/// long-cache header.
async fn security_headers(request: Request, next: Next) -> Response {
    let mut resp = next.run(request).await;
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CSP),
    );
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("same-origin"),
    );
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    h.entry(header::CACHE_CONTROL)
        .or_insert(HeaderValue::from_static("no-store"));
    resp
}

/// An HTML answer.
pub(crate) fn html(status: axum::http::StatusCode, markup: maud::Markup) -> Response {
    (
        status,
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/html; charset=utf-8"),
        )],
        markup.into_string(),
    )
        .into_response()
}

/// A 303 redirect (after a form post, so a reload does not post again).
pub(crate) fn see_other(to: &str) -> Response {
    axum::response::Redirect::to(to).into_response()
}

/// An error as a page: the status of the API error, its client-safe message (an
/// outage or internal failure shows a generic text; the detail is logged).
pub(crate) fn error_page(signed: &session::Signed, e: crate::error::ApiError) -> Response {
    use crate::error::ApiError;
    let status = e.status();
    let message = match &e {
        ApiError::Unavailable { store, detail } => {
            tracing::error!(%store, detail = %detail, "console page: store unavailable");
            format!("The {store} cannot be used right now. Try again in a moment.")
        }
        ApiError::StorageFull { store, detail } => {
            tracing::error!(%store, detail = %detail, "console page: disk full");
            format!("The disk under the {store} is full.")
        }
        ApiError::Internal(detail) => {
            tracing::error!(detail = %detail, "console page: internal error");
            "Something went wrong on the server; the details are in its log.".to_string()
        }
        other => other.to_string(),
    };
    let title = if status == axum::http::StatusCode::NOT_FOUND {
        "Not found"
    } else {
        "Something went wrong"
    };
    html(
        status,
        layout::page(
            Some(signed),
            layout::Nav::None,
            title,
            maud::html! {
                h1 { (title) }
                p role="alert" { (message) }
                p { a href="/sources" { "Back to the sources" } }
            },
        ),
    )
}
