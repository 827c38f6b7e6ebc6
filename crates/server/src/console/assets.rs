//! The console's one stylesheet and one script, embedded in the binary and served
//! with a one-year immutable cache under a `?v=<content hash>` URL (a new build with
//! changed assets gets a new URL, so browsers never run a stale script).

use std::sync::LazyLock;

use axum::http::{HeaderValue, header};
use axum::response::{IntoResponse, Response};
use sha2::{Digest, Sha256};

const CSS: &str = include_str!("static/console.css");
const JS: &str = include_str!("static/console.js");

fn short_hash(text: &str) -> String {
    let d = Sha256::digest(text.as_bytes());
    d.iter().take(6).map(|b| format!("{b:02x}")).collect()
}

static CSS_HREF: LazyLock<String> =
    LazyLock::new(|| format!("/assets/console.css?v={}", short_hash(CSS)));
static JS_HREF: LazyLock<String> =
    LazyLock::new(|| format!("/assets/console.js?v={}", short_hash(JS)));

/// The stylesheet's versioned URL.
pub fn css_href() -> &'static str {
    &CSS_HREF
}

/// The script's versioned URL.
pub fn js_href() -> &'static str {
    &JS_HREF
}

fn asset(body: &'static str, kind: &'static str) -> Response {
    (
        [
            (header::CONTENT_TYPE, HeaderValue::from_static(kind)),
            (
                header::CACHE_CONTROL,
                HeaderValue::from_static("public, max-age=31536000, immutable"),
            ),
        ],
        body,
    )
        .into_response()
}

/// `GET /assets/console.css`.
pub(crate) async fn css() -> Response {
    asset(CSS, "text/css; charset=utf-8")
}

/// `GET /assets/console.js`.
pub(crate) async fn js() -> Response {
    asset(JS, "text/javascript; charset=utf-8")
}
