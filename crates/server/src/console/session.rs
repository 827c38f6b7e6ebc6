//! Console sessions, sign-in/sign-out and CSRF checks.
//!
//! A session is a random 256-bit id in a cookie (`HttpOnly`, `SameSite=Strict`,
//! `Secure` when the request came over TLS or through a proxy saying
//! `X-Forwarded-Proto: https`), mapped in memory to its CSRF token and expiry. The
//! admin token is only compared (in constant time) at sign-in and never stored in
//! the cookie. Sessions are not durable on purpose: a restart signs everyone out.
//! Storage sits behind [`Sessions::create`], [`Sessions::lookup`] and
//! [`Sessions::remove`], so a shared store (the PostgreSQL control plane) can
//! replace the map without touching the handlers.
//!
//! Every state-changing console form goes through [`check_form`]: the browser's
//! `Sec-Fetch-Site` must be `same-origin` when sent, an `Origin` header must match
//! the `Host`, and the form's `csrf` field must equal the session's token.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::{FromRequestParts, Query, State};
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

/// How long a session lasts after sign-in.
pub const SESSION_TTL: Duration = Duration::from_secs(12 * 3600);

/// The session cookie's name.
pub const COOKIE: &str = "tributary_session";

/// At most this many live sessions; the oldest goes first.
const MAX_SESSIONS: usize = 10_000;

struct Entry {
    csrf: String,
    expires: Instant,
}

/// The console's sessions (in memory).
pub struct Sessions {
    ttl: Duration,
    map: Mutex<HashMap<String, Entry>>,
}

fn random_id() -> String {
    let mut buf = [0u8; 32];
    getrandom::fill(&mut buf).expect("the OS random source is available");
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(buf)
}

impl Sessions {
    /// An empty store whose sessions last `ttl`.
    pub fn new(ttl: Duration) -> Self {
        Sessions {
            ttl,
            map: Mutex::new(HashMap::new()),
        }
    }

    /// Starts a session: returns its id and CSRF token.
    pub fn create(&self) -> (String, String) {
        let id = random_id();
        let csrf = random_id();
        let now = Instant::now();
        let mut map = self.map.lock().unwrap_or_else(|p| p.into_inner());
        map.retain(|_, e| e.expires > now);
        if map.len() >= MAX_SESSIONS
            && let Some(oldest) = map
                .iter()
                .min_by_key(|(_, e)| e.expires)
                .map(|(k, _)| k.clone())
        {
            map.remove(&oldest);
        }
        map.insert(
            id.clone(),
            Entry {
                csrf: csrf.clone(),
                expires: now + self.ttl,
            },
        );
        (id, csrf)
    }

    /// The CSRF token of a live session; `None` when unknown or expired.
    pub fn lookup(&self, id: &str) -> Option<String> {
        let mut map = self.map.lock().unwrap_or_else(|p| p.into_inner());
        match map.get(id) {
            Some(e) if e.expires > Instant::now() => Some(e.csrf.clone()),
            Some(_) => {
                map.remove(id);
                None
            }
            None => None,
        }
    }

    /// Ends a session.
    pub fn remove(&self, id: &str) {
        self.map
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(id);
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

impl<S: Send + Sync> FromRequestParts<S> for Signed {
    type Rejection = Response;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
        let sessions = sessions_of(parts).ok_or_else(|| {
            (
                StatusCode::INTERNAL_SERVER_ERROR,
                "console sessions missing",
            )
                .into_response()
        })?;
        if let Some(id) = cookie_value(&parts.headers, COOKIE)
            && let Some(csrf) = sessions.lookup(&id)
        {
            return Ok(Signed { id, csrf });
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

/// `POST /login`: checks the token, starts a session.
pub(crate) async fn login(
    State(state): State<Arc<AppState>>,
    axum::Extension(sessions): axum::Extension<Arc<Sessions>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    if !same_origin(&headers) {
        return csrf_refusal();
    }
    let form = Form::parse(&body);
    let next = safe_next(form.get("next")).to_string();
    let token = form.get("token").trim();
    if token.is_empty() || !bool::from(token.as_bytes().ct_eq(state.admin_token.as_bytes())) {
        tracing::info!("console sign-in refused: wrong admin token");
        let msg = if token.is_empty() {
            "Enter the admin token."
        } else {
            "That admin token is not right. Check for missing characters and try again."
        };
        return html(StatusCode::UNAUTHORIZED, login_form(&next, Some(msg)));
    }
    let (id, _) = sessions.create();
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

/// `POST /logout`: ends the session and clears the cookie.
pub(crate) async fn logout(
    axum::Extension(sessions): axum::Extension<Arc<Sessions>>,
    signed: Signed,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let form = Form::parse(&body);
    if let Err(r) = check_form(&headers, &signed, &form) {
        return r.into_response();
    }
    sessions.remove(&signed.id);
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
    fn sessions_expire_and_end() {
        let s = Sessions::new(Duration::from_millis(50));
        let (id, csrf) = s.create();
        assert_eq!(s.lookup(&id).as_deref(), Some(csrf.as_str()));
        std::thread::sleep(Duration::from_millis(80));
        assert_eq!(s.lookup(&id), None, "expired");
        let s = Sessions::new(Duration::from_secs(60));
        let (id, _) = s.create();
        s.remove(&id);
        assert_eq!(s.lookup(&id), None, "signed out");
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
