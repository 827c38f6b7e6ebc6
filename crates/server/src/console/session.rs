//! Console sessions, sign-in/sign-out and CSRF checks.
//!
//! A session is a random 256-bit id in a cookie (`HttpOnly`, `SameSite=Strict`,
//! `Secure` when the request came over TLS or through a proxy saying
//! `X-Forwarded-Proto: https`). The control store keeps only the id's SHA-256,
//! with the session's CSRF token and expiry ([`crate::control::ControlStore`]:
//! `control.db` when embedded, the PostgreSQL control database in cluster mode),
//! so a session started on one node works on every node, sign-out ends it on every
//! node at once, and a restart keeps everyone signed in. Nothing is cached in
//! memory: every signed-in request reads the store (one indexed lookup), so a
//! sign-out or an expiry is honoured at once everywhere. Expired rows are deleted
//! whenever a session starts. The admin token is only compared (in constant time)
//! at sign-in and never stored in the cookie.
//!
//! Sign-in is rate-limited per client address ([`SignInLimit`]): after
//! [`SIGN_IN_FAILURES`] wrong tokens within [`SIGN_IN_WINDOW`], the form answers
//! 429 with `Retry-After` until the window has passed, even for the right token.
//! The count is kept in each node's memory.
//!
//! Every state-changing console form goes through [`check_form`]: the browser's
//! `Sec-Fetch-Site` must be `same-origin` when sent, an `Origin` header must match
//! the `Host`, and the form's `csrf` field must equal the session's token.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::{ConnectInfo, FromRequestParts, Query, State};
use axum::http::request::Parts;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use base64::Engine as _;
use maud::html;
use serde::Deserialize;
use subtle::ConstantTimeEq;

use super::layout::{self, Nav};
use super::{html, see_other};
use crate::AppState;
use crate::error::ApiError;

/// How long a session lasts after sign-in.
pub const SESSION_TTL: Duration = Duration::from_secs(12 * 3600);

/// The session cookie's name.
pub const COOKIE: &str = "tributary_session";

/// Wrong admin tokens from one client address within [`SIGN_IN_WINDOW`] before
/// sign-in answers 429.
pub const SIGN_IN_FAILURES: u32 = 10;

/// The window of [`SIGN_IN_FAILURES`]; also the longest `Retry-After`.
pub const SIGN_IN_WINDOW: Duration = Duration::from_secs(15 * 60);

/// Client addresses whose failures are remembered at most; beyond it the
/// oldest windows are forgotten first.
const LIMIT_ADDRESSES: usize = 10_000;

/// Failed sign-ins per client address (fixed windows, in this node's memory).
pub struct SignInLimit {
    failures: u32,
    window: Duration,
    map: Mutex<HashMap<Option<IpAddr>, (Instant, u32)>>,
}

impl SignInLimit {
    /// At most `failures` wrong tokens per address within `window`.
    pub fn new(failures: u32, window: Duration) -> Self {
        SignInLimit {
            failures: failures.max(1),
            window,
            map: Mutex::new(HashMap::new()),
        }
    }

    /// `Some(wait)` while `addr` may not try again.
    pub fn blocked(&self, addr: Option<IpAddr>) -> Option<Duration> {
        let map = self.map.lock().unwrap_or_else(|p| p.into_inner());
        let (start, n) = map.get(&addr)?;
        let age = start.elapsed();
        (*n >= self.failures && age < self.window).then(|| self.window - age)
    }

    /// Counts a wrong token from `addr`.
    pub fn failed(&self, addr: Option<IpAddr>) {
        let mut map = self.map.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        if map.len() >= LIMIT_ADDRESSES {
            let window = self.window;
            map.retain(|_, (start, _)| now.duration_since(*start) < window);
            if map.len() >= LIMIT_ADDRESSES
                && let Some(oldest) = map.iter().min_by_key(|(_, (t, _))| *t).map(|(k, _)| *k)
            {
                map.remove(&oldest);
            }
        }
        let e = map.entry(addr).or_insert((now, 0));
        if now.duration_since(e.0) >= self.window {
            *e = (now, 0);
        }
        e.1 += 1;
    }

    /// Forgets `addr`'s failures (a successful sign-in).
    pub fn succeeded(&self, addr: Option<IpAddr>) {
        self.map
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&addr);
    }
}

/// The console's session settings: their lifetime and the sign-in limit. The
/// sessions themselves live in the control store.
pub struct Sessions {
    ttl: Duration,
    limit: SignInLimit,
}

fn random_id() -> String {
    let mut buf = [0u8; 32];
    getrandom::fill(&mut buf).expect("the OS random source is available");
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(buf)
}

/// Runs a blocking control-store call off the runtime.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, ApiError> + Send + 'static,
) -> Result<T, ApiError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| ApiError::Internal(e.to_string()))?
}

impl Sessions {
    /// Sessions that last `ttl`, with the default sign-in limit.
    pub fn new(ttl: Duration) -> Self {
        Sessions::with_limit(ttl, SignInLimit::new(SIGN_IN_FAILURES, SIGN_IN_WINDOW))
    }

    /// Sessions that last `ttl`, with a given sign-in limit (tests).
    pub fn with_limit(ttl: Duration, limit: SignInLimit) -> Self {
        Sessions { ttl, limit }
    }

    /// Starts a session in the control store: returns its id and CSRF token.
    pub async fn create(&self, state: &AppState) -> Result<(String, String), ApiError> {
        let id = random_id();
        let csrf = random_id();
        let control = state.control.clone();
        let ttl = self.ttl;
        let (i, c) = (id.clone(), csrf.clone());
        blocking(move || control.create_session(&i, &c, ttl)).await?;
        Ok((id, csrf))
    }

    /// The CSRF token of a live session; `None` when unknown, expired or signed
    /// out (on any node).
    pub async fn lookup(&self, state: &AppState, id: &str) -> Result<Option<String>, ApiError> {
        let control = state.control.clone();
        let id = id.to_string();
        blocking(move || control.session(&id)).await
    }

    /// Ends a session everywhere.
    pub async fn remove(&self, state: &AppState, id: &str) -> Result<(), ApiError> {
        let control = state.control.clone();
        let id = id.to_string();
        blocking(move || control.delete_session(&id)).await
    }
}

/// A signed-in request: extracting it redirects to `/login` when there is no live
/// session.
#[derive(Debug, Clone)]
pub struct Signed {
    /// The session id.
    pub id: String,
    /// The session's CSRF token, put into every form.
    pub csrf: String,
}

fn cookie_value(headers: &HeaderMap, name: &str) -> Option<String> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .find_map(|kv| {
            let (k, v) = kv.trim().split_once('=')?;
            (k == name).then(|| v.to_string())
        })
}

fn sessions_of(parts: &Parts) -> Option<Arc<Sessions>> {
    parts.extensions.get::<Arc<Sessions>>().cloned()
}

impl FromRequestParts<Arc<AppState>> for Signed {
    type Rejection = Response;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &Arc<AppState>,
    ) -> Result<Self, Self::Rejection> {
        let sessions = sessions_of(parts).ok_or_else(|| {
            (
                StatusCode::INTERNAL_SERVER_ERROR,
                "console sessions missing",
            )
                .into_response()
        })?;
        if let Some(id) = cookie_value(&parts.headers, COOKIE) {
            match sessions.lookup(state, &id).await {
                Ok(Some(csrf)) => return Ok(Signed { id, csrf }),
                Ok(None) => {}
                Err(e) => return Err(unavailable_page(e)),
            }
        }
        let target = parts
            .uri
            .path_and_query()
            .map(|p| p.as_str())
            .unwrap_or("/");
        let next: String = form_urlencoded::byte_serialize(target.as_bytes()).collect();
        Err(see_other(&format!("/login?next={next}")))
    }
}

/// The page answered when the session store cannot be read (cluster mode: the
/// control database is down): 503, not a sign-in form that could not work.
fn unavailable_page(e: ApiError) -> Response {
    tracing::warn!(error = %e, "console session store unavailable");
    let mut resp = html(
        StatusCode::SERVICE_UNAVAILABLE,
        layout::page(
            None,
            Nav::None,
            "Console unavailable",
            html! {
                h1 { "The console cannot check your session right now" }
                p { "The control database does not answer. Try again in a moment." }
            },
        ),
    );
    resp.headers_mut()
        .insert(header::RETRY_AFTER, HeaderValue::from_static("5"));
    resp
}

/// A form body as name/value pairs.
pub struct Form(pub Vec<(String, String)>);

impl Form {
    /// Parses an `application/x-www-form-urlencoded` body.
    pub fn parse(body: &Bytes) -> Form {
        Form(form_urlencoded::parse(body).into_owned().collect())
    }

    /// The first value of a field ("" when absent).
    pub fn get(&self, name: &str) -> &str {
        self.0
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
            .unwrap_or("")
    }

    /// Every value of a field (checkboxes).
    pub fn all(&self, name: &str) -> Vec<String> {
        self.0
            .iter()
            .filter(|(k, _)| k == name)
            .map(|(_, v)| v.clone())
            .collect()
    }
}

/// Whether the request's `Sec-Fetch-Site` / `Origin` say it came from this site.
/// Non-browser clients send neither; they still need the session's token.
pub fn same_origin(headers: &HeaderMap) -> bool {
    if let Some(site) = headers.get("sec-fetch-site").and_then(|v| v.to_str().ok())
        && site != "same-origin"
    {
        return false;
    }
    if let Some(origin) = headers.get(header::ORIGIN).and_then(|v| v.to_str().ok()) {
        let host = headers
            .get(header::HOST)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("");
        let origin_host = origin.split_once("://").map(|(_, rest)| rest).unwrap_or("");
        return !host.is_empty() && origin_host.eq_ignore_ascii_case(host);
    }
    true
}

/// The refusal of a cross-site or stale form.
pub fn csrf_refusal() -> Response {
    html(
        StatusCode::FORBIDDEN,
        layout::page(
            None,
            Nav::None,
            "Form refused",
            html! {
                h1 { "This form was refused" }
                p { "It came from another site, or the page was open for too long. "
                    "Go back, reload the page and try again." }
                p { a href="/sources" { "Back to the sources" } }
            },
        ),
    )
}

/// A refused form (cross-site, or without the session's token): answered 403.
#[derive(Debug)]
pub struct Refused;

impl IntoResponse for Refused {
    fn into_response(self) -> Response {
        csrf_refusal()
    }
}

/// Checks a state-changing form of a signed-in session: same origin and the
/// session's CSRF token.
pub fn check_form(headers: &HeaderMap, signed: &Signed, form: &Form) -> Result<(), Refused> {
    let token = form.get("csrf");
    if !same_origin(headers) || !bool::from(token.as_bytes().ct_eq(signed.csrf.as_bytes())) {
        return Err(Refused);
    }
    Ok(())
}

fn secure_request(state: &AppState, headers: &HeaderMap) -> bool {
    headers
        .get("x-forwarded-proto")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.eq_ignore_ascii_case("https"))
        || state.config.public_url().starts_with("https://")
}

/// Where to go after signing in: a local path only (never `//host` or a URL).
fn safe_next(next: &str) -> &str {
    if next.starts_with('/') && !next.starts_with("//") && !next.starts_with("/\\") {
        next
    } else {
        "/sources"
    }
}

#[derive(Deserialize)]
pub(crate) struct LoginQuery {
    #[serde(default)]
    next: String,
}

fn login_form(next: &str, error: Option<&str>) -> maud::Markup {
    let mut field = layout::Field::text("token", "Admin token", "");
    field.kind = "password";
    field.hint =
        Some("Printed when the server first started, and saved in the data dir as admin-token.");
    field.error = error;
    layout::page(
        None,
        Nav::None,
        "Sign in",
        html! {
            h1 { "Sign in to Tributary" }
            @if let Some(e) = error {
                (layout::error_summary(&[("token", e.to_string())]))
            }
            form.card method="post" action="/login" {
                input type="hidden" name="next" value=(next);
                (field.render())
                button.primary type="submit" { "Sign in" }
            }
        },
    )
}

/// `GET /login`.
pub(crate) async fn login_page(Query(q): Query<LoginQuery>) -> Response {
    html(StatusCode::OK, login_form(safe_next(&q.next), None))
}

/// `POST /login`: checks the token, starts a session. Wrong tokens are counted
/// per client address; past the limit the form answers 429 with `Retry-After`.
pub(crate) async fn login(
    State(state): State<Arc<AppState>>,
    axum::Extension(sessions): axum::Extension<Arc<Sessions>>,
    peer: Option<axum::Extension<ConnectInfo<SocketAddr>>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    if !same_origin(&headers) {
        return csrf_refusal();
    }
    let form = Form::parse(&body);
    let next = safe_next(form.get("next")).to_string();
    let addr = crate::ingest::client_ip(&state, &headers, peer.map(|c| (c.0).0));
    if let Some(wait) = sessions.limit.blocked(addr) {
        return too_many(&next, wait);
    }
    let token = form.get("token").trim();
    if token.is_empty() || !bool::from(token.as_bytes().ct_eq(state.admin_token.as_bytes())) {
        if !token.is_empty() {
            sessions.limit.failed(addr);
            tracing::info!(client = ?addr, "console sign-in refused: wrong admin token");
            if let Some(wait) = sessions.limit.blocked(addr) {
                metrics::counter!("tributary_console_sign_in_limited_total").increment(1);
                return too_many(&next, wait);
            }
        }
        let msg = if token.is_empty() {
            "Enter the admin token."
        } else {
            "That admin token is not right. Check for missing characters and try again."
        };
        return html(StatusCode::UNAUTHORIZED, login_form(&next, Some(msg)));
    }
    sessions.limit.succeeded(addr);
    let id = match sessions.create(&state).await {
        Ok((id, _)) => id,
        Err(e) => return unavailable_page(e),
    };
    let mut cookie = format!(
        "{COOKIE}={id}; Path=/; HttpOnly; SameSite=Strict; Max-Age={}",
        sessions.ttl.as_secs()
    );
    if secure_request(&state, &headers) {
        cookie.push_str("; Secure");
    }
    let mut resp = see_other(&next);
    if let Ok(v) = HeaderValue::from_str(&cookie) {
        resp.headers_mut().insert(header::SET_COOKIE, v);
    }
    resp
}

/// The sign-in form, refused for now: 429 with `Retry-After` and a message that
/// says how long to wait.
fn too_many(next: &str, wait: Duration) -> Response {
    let secs = wait.as_secs().max(1);
    let minutes = secs.div_ceil(60);
    let msg = format!(
        "Too many wrong admin tokens from your address. Sign-in is paused: try again in {} {}.",
        minutes,
        if minutes == 1 { "minute" } else { "minutes" }
    );
    let mut resp = html(StatusCode::TOO_MANY_REQUESTS, login_form(next, Some(&msg)));
    if let Ok(v) = HeaderValue::from_str(&secs.to_string()) {
        resp.headers_mut().insert(header::RETRY_AFTER, v);
    }
    resp
}

/// `POST /logout`: ends the session (on every node) and clears the cookie.
pub(crate) async fn logout(
    State(state): State<Arc<AppState>>,
    axum::Extension(sessions): axum::Extension<Arc<Sessions>>,
    signed: Signed,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let form = Form::parse(&body);
    if let Err(r) = check_form(&headers, &signed, &form) {
        return r.into_response();
    }
    if let Err(e) = sessions.remove(&state, &signed.id).await {
        return unavailable_page(e);
    }
    let mut resp = see_other("/login");
    resp.headers_mut().insert(
        header::SET_COOKIE,
        HeaderValue::from_static(
            "tributary_session=; Path=/; HttpOnly; SameSite=Strict; Max-Age=0",
        ),
    );
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sign_in_is_limited_per_address_within_the_window() {
        let limit = SignInLimit::new(3, Duration::from_millis(200));
        let (a, b) = (
            Some("10.0.0.1".parse().unwrap()),
            Some("10.0.0.2".parse().unwrap()),
        );
        for _ in 0..2 {
            limit.failed(a);
        }
        assert_eq!(limit.blocked(a), None, "two failures are allowed");
        limit.failed(a);
        let wait = limit.blocked(a).expect("the third failure blocks");
        assert!(wait <= Duration::from_millis(200));
        assert_eq!(limit.blocked(b), None, "another address is not blocked");
        std::thread::sleep(Duration::from_millis(250));
        assert_eq!(limit.blocked(a), None, "the window passed");
        limit.failed(a);
        assert_eq!(limit.blocked(a), None, "a new window starts from one");
        limit.failed(b);
        limit.succeeded(b);
        limit.failed(b);
        limit.failed(b);
        assert_eq!(limit.blocked(b), None, "a sign-in clears the count");
    }

    #[test]
    fn next_is_a_local_path_only() {
        assert_eq!(safe_next("/sources/x"), "/sources/x");
        assert_eq!(safe_next("//evil.example"), "/sources");
        assert_eq!(safe_next("https://evil.example"), "/sources");
        assert_eq!(safe_next("/\\evil"), "/sources");
    }

    #[test]
    fn cross_site_requests_are_not_same_origin() {
        let mut h = HeaderMap::new();
        h.insert(header::HOST, HeaderValue::from_static("127.0.0.1:8088"));
        assert!(same_origin(&h));
        h.insert(
            header::ORIGIN,
            HeaderValue::from_static("http://127.0.0.1:8088"),
        );
        assert!(same_origin(&h));
        h.insert(
            header::ORIGIN,
            HeaderValue::from_static("http://evil.example"),
        );
        assert!(!same_origin(&h));
        let mut h = HeaderMap::new();
        h.insert("sec-fetch-site", HeaderValue::from_static("cross-site"));
        assert!(!same_origin(&h));
    }
}
