//! `GET /v1/projects/{writeKey}/settings`: the settings document analytics.js
//! (`@segment/analytics-next`) fetches from its CDN at load, so a page needs only
//! `AnalyticsBrowser.load({writeKey, cdnURL: "<public URL>"})`.
//!
//! Invariants: the document sends analytics.js's events back to this server
//! (`integrations["Segment.io"]`: `apiHost` is the public URL's `host[:port][/path]`
//! plus `/v1`, `protocol` its scheme) and to nothing else — no other integrations
//! (so no device-mode destinations are loaded), an empty `plan`, no remote plugins or
//! middleware, and remote metrics sampled at 0 (analytics.js would otherwise report
//! its own metrics to Segment). An unknown write key is a 404 `{code,message}`. CORS
//! comes from [`crate::ops::observe`] like every `/v1/` route.

use std::sync::Arc;

use axum::extract::{Path, State};
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};

use crate::AppState;
use crate::error::ApiError;

/// `GET /v1/projects/{writeKey}/settings`.
pub async fn project_settings(
    State(state): State<Arc<AppState>>,
    Path(key): Path<String>,
) -> Result<Response, ApiError> {
    if state.control.source_by_key(&key).is_none() {
        return Err(ApiError::NotFound(
            "no source has this write key (copy it from `tributary sources show`)".into(),
        ));
    }
    Ok(axum::Json(document(&key, &state.config.public_url())).into_response())
}

/// `(protocol, apiHost)` for a public URL: `https://t.example.com/x` →
/// `("https", "t.example.com/x/v1")`. A URL without a scheme is taken as `http`.
pub fn api_host(public_url: &str) -> (String, String) {
    let (protocol, rest) = match public_url.split_once("://") {
        Some((p, r)) => (p.to_ascii_lowercase(), r),
        None => ("http".to_string(), public_url),
    };
    (protocol, format!("{}/v1", rest.trim_end_matches('/')))
}

/// The settings document for `write_key` on a server reached at `public_url`.
pub fn document(write_key: &str, public_url: &str) -> Value {
    let (protocol, api_host) = api_host(public_url);
    json!({
        "integrations": {
            "Segment.io": {
                "apiKey": write_key,
                "apiHost": api_host,
                "protocol": protocol,
                "unbundledIntegrations": [],
                "addBundledMetadata": true,
                "maybeBundledConfigIds": {},
            }
        },
        "plan": {},
        "remotePlugins": [],
        "enabledMiddleware": {},
        "middlewareSettings": {},
        "legacyVideoPluginsEnabled": false,
        "metrics": {"sampleRate": 0},
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn api_host_is_the_public_url_host_and_path_plus_v1() {
        assert_eq!(
            api_host("http://127.0.0.1:8088"),
            ("http".into(), "127.0.0.1:8088/v1".into())
        );
        assert_eq!(
            api_host("https://t.example.com/collect/"),
            ("https".into(), "t.example.com/collect/v1".into())
        );
    }

    #[test]
    fn the_document_routes_only_to_this_server() {
        let d = document("wk_1", "https://t.example.com");
        let ints = d["integrations"].as_object().unwrap();
        assert_eq!(ints.len(), 1, "only Segment.io: {d}");
        assert_eq!(ints["Segment.io"]["apiKey"], "wk_1");
        assert_eq!(ints["Segment.io"]["apiHost"], "t.example.com/v1");
        assert_eq!(ints["Segment.io"]["protocol"], "https");
        assert_eq!(d["plan"], json!({}));
        assert_eq!(d["metrics"]["sampleRate"], 0);
    }
}
