//! The HTTP client of one ActiveCampaign account: v3 (`/api/3/…`, header
//! `Api-Token`) and the v1 report actions (`/admin/api.php?api_action=…`, same
//! header), every request through the account's one [`RateLimiter`].
//!
//! Retries inside a call: a 429 (or 503) waits for `Retry-After` (default 1 s, at
//! most [`MAX_RETRY_AFTER`]) and pauses the whole account's limiter for that long;
//! other retryable failures (5xx, no answer) back off 0.5 s, 1 s, 2 s. After
//! [`ATTEMPTS`] tries the classified [`ApiError`] is returned, and the caller (the
//! sync) keeps its checkpoint and tries again later.
//!
//! Metrics: `tributary_activecampaign_api_requests_total{status}` (the HTTP status,
//! or `error` when there was no answer) and
//! `tributary_activecampaign_api_rate_limited_total`. The key is never logged, put
//! in a URL, or in a metric.

use std::sync::Arc;
use std::time::Duration;

use serde_json::{Map, Value};

use super::error::{ApiError, parse_retry_after};
use super::ratelimit::{self, ACCOUNT_REQUESTS_PER_SECOND, RateLimiter};

/// Tries per call before its failure is returned.
pub const ATTEMPTS: u32 = 5;
/// The longest `Retry-After` honoured in one wait.
pub const MAX_RETRY_AFTER: Duration = Duration::from_secs(60);
/// The page size of v3 lists (ActiveCampaign's maximum).
pub const V3_PAGE: usize = 100;

/// A v3 list page: its items and `meta.total`.
#[derive(Debug, Clone, PartialEq)]
pub struct Page {
    /// The items, as ActiveCampaign sent them.
    pub items: Vec<Map<String, Value>>,
    /// `meta.total` (a string in ActiveCampaign's answers; a number in some).
    pub total: u64,
}

/// A v1 report page: the rows (the objects under `"0"`, `"1"`, …), or `done` when
/// `result_code` is 0 ("nothing is returned": the end of paging).
#[derive(Debug, Clone, PartialEq)]
pub struct V1Page {
    /// The rows in key order.
    pub rows: Vec<Map<String, Value>>,
    /// `result_code` was 0.
    pub done: bool,
}

/// One account's API.
#[derive(Clone)]
pub struct Client {
    base: String,
    key: String,
    http: reqwest::Client,
    limiter: Arc<RateLimiter>,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("base", &self.base)
            .finish_non_exhaustive()
    }
}

impl Client {
    /// A client for the account at `url` (as in Settings → Developer, with or
    /// without `/api/3`) with `key`, sharing the account's process-wide limiter.
    pub fn new(url: &str, key: &str, timeout: Duration) -> Result<Client, ApiError> {
        let base = url.trim().trim_end_matches('/');
        let base = base
            .strip_suffix("/api/3")
            .unwrap_or(base)
            .trim_end_matches('/');
        let valid = (base.starts_with("https://") || base.starts_with("http://"))
            && reqwest::Url::parse(base).is_ok_and(|u| u.host_str().is_some_and(|h| !h.is_empty()));
        if !valid {
            return Err(ApiError::InvalidUrl { url: url.into() });
        }
        static ONCE: std::sync::Once = std::sync::Once::new();
        ONCE.call_once(|| {
            let _ = rustls::crypto::ring::default_provider().install_default();
        });
        let http = reqwest::Client::builder()
            .timeout(timeout)
            .connect_timeout(timeout.min(Duration::from_secs(10)))
            .redirect(reqwest::redirect::Policy::none())
            .user_agent(concat!("tributary/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| ApiError::Unreachable {
                url: base.into(),
                detail: e.to_string(),
            })?;
        Ok(Client {
            limiter: ratelimit::for_account(base, ACCOUNT_REQUESTS_PER_SECOND),
            base: base.to_owned(),
            key: key.trim().to_owned(),
            http,
        })
    }

    /// The API base URL (no key).
    pub fn base(&self) -> &str {
        &self.base
    }

    /// One GET of `path` (from the base, e.g. `/api/3/users/me`) with the retries
    /// described in the module docs; the answer's JSON.
    pub async fn get(&self, path: &str, query: &[(&str, String)]) -> Result<Value, ApiError> {
        let what = format!("GET {path}");
        let mut attempt = 0;
        loop {
            attempt += 1;
            self.limiter.acquire().await;
            let sent = self
                .http
                .get(format!("{}{path}", self.base))
                .query(query)
                .header("Api-Token", &self.key)
                .header(reqwest::header::ACCEPT, "application/json")
                .send()
                .await;
            let resp = match sent {
                Ok(r) => r,
                Err(e) => {
                    metrics::counter!("tributary_activecampaign_api_requests_total", "status" => "error")
                        .increment(1);
                    let err = ApiError::Unreachable {
                        url: self.base.clone(),
                        detail: transport_detail(&e),
                    };
                    if attempt >= ATTEMPTS.min(3) {
                        return Err(err);
                    }
                    tokio::time::sleep(backoff(attempt)).await;
                    continue;
                }
            };
            let status = resp.status().as_u16();
            metrics::counter!("tributary_activecampaign_api_requests_total", "status" => status.to_string())
                .increment(1);
            if status == 429 || status == 503 {
                metrics::counter!("tributary_activecampaign_api_rate_limited_total").increment(1);
                let retry_after = resp
                    .headers()
                    .get(reqwest::header::RETRY_AFTER)
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| parse_retry_after(v, chrono::Utc::now()));
                if attempt >= ATTEMPTS {
                    return Err(ApiError::RateLimited {
                        status,
                        attempts: attempt,
                        retry_after,
                    });
                }
                let wait = retry_after
                    .unwrap_or(Duration::from_secs(1))
                    .min(MAX_RETRY_AFTER);
                tracing::debug!(
                    status,
                    wait_ms = wait.as_millis() as u64,
                    "activecampaign rate limited"
                );
                self.limiter.pause(wait);
                continue;
            }
            let body = resp.bytes().await.map_err(|e| ApiError::Unreachable {
                url: self.base.clone(),
                detail: transport_detail(&e),
            });
            let body = match body {
                Ok(b) => b,
                Err(e) if attempt < ATTEMPTS.min(3) => {
                    tracing::debug!(error = %e, "activecampaign answer cut off; retrying");
                    tokio::time::sleep(backoff(attempt)).await;
                    continue;
                }
                Err(e) => return Err(e),
            };
            if status == 401 || status == 403 {
                return Err(ApiError::Unauthorized { status });
            }
            if !(200..300).contains(&status) {
                let err = ApiError::Status {
                    status,
                    what: what.clone(),
                    detail: error_detail(&body),
                };
                if err.is_retriable() && attempt < ATTEMPTS.min(3) {
                    tokio::time::sleep(backoff(attempt)).await;
                    continue;
                }
                return Err(err);
            }
            return serde_json::from_slice(&body).map_err(|e| ApiError::BadResponse {
                what,
                detail: format!("not JSON ({e})"),
            });
        }
    }

    /// Checks the URL and key: `GET /api/3/users/me` must answer a user.
    pub async fn check(&self) -> Result<(), ApiError> {
        let v = self.get("/api/3/users/me", &[]).await?;
        if v.get("user").is_some_and(Value::is_object) {
            Ok(())
        } else {
            Err(ApiError::BadResponse {
                what: "GET /api/3/users/me".into(),
                detail: "no `user` object: is this the account's API URL?".into(),
            })
        }
    }

    /// One page of v3 `campaigns` (`limit` 100, newest send first).
    pub async fn campaigns(&self, offset: usize) -> Result<Page, ApiError> {
        let v = self
            .get(
                "/api/3/campaigns",
                &[
                    ("limit", V3_PAGE.to_string()),
                    ("offset", offset.to_string()),
                    ("orders[sdate]", "DESC".into()),
                ],
            )
            .await?;
        v3_page(&v, "campaigns", "GET /api/3/campaigns")
    }

    /// The campaign's links (`campaigns/{id}/links`): the rows carry its message id.
    pub async fn campaign_links(
        &self,
        campaign_id: &str,
    ) -> Result<Vec<Map<String, Value>>, ApiError> {
        let path = format!("/api/3/campaigns/{}/links", path_part(campaign_id));
        let v = self.get(&path, &[]).await?;
        Ok(v3_page(&v, "links", &format!("GET {path}"))?.items)
    }

    /// A message (`messages/{id}`), for its subject.
    pub async fn message(&self, message_id: &str) -> Result<Map<String, Value>, ApiError> {
        let path = format!("/api/3/messages/{}", path_part(message_id));
        let v = self.get(&path, &[]).await?;
        v.get("message")
            .and_then(Value::as_object)
            .cloned()
            .ok_or_else(|| ApiError::BadResponse {
                what: format!("GET {path}"),
                detail: "no `message` object".into(),
            })
    }

    /// Page `page` (from 1) of a v1 report action for a campaign.
    pub async fn v1_report(
        &self,
        action: &str,
        campaign_id: &str,
        page: u32,
    ) -> Result<V1Page, ApiError> {
        let v = self
            .get(
                "/admin/api.php",
                &[
                    ("api_action", action.to_owned()),
                    ("api_output", "json".into()),
                    ("campaignid", campaign_id.to_owned()),
                    ("page", page.to_string()),
                ],
            )
            .await?;
        v1_page(&v, action)
    }
}

fn path_part(id: &str) -> String {
    id.chars().filter(char::is_ascii_alphanumeric).collect()
}

fn backoff(attempt: u32) -> Duration {
    Duration::from_millis(500u64 << attempt.saturating_sub(1).min(4))
}

fn transport_detail(e: &reqwest::Error) -> String {
    use std::error::Error as _;
    let mut s = if e.is_timeout() {
        "timed out".to_owned()
    } else if e.is_connect() {
        "connection failed".to_owned()
    } else {
        "request failed".to_owned()
    };
    let mut src = e.source();
    while let Some(inner) = src {
        s.push_str(": ");
        s.push_str(&inner.to_string());
        src = inner.source();
    }
    s
}

/// `errors[0].title`/`detail` or `message` of an error body, else its first 200 bytes.
fn error_detail(body: &[u8]) -> String {
    if let Ok(v) = serde_json::from_slice::<Value>(body) {
        if let Some(e) = v.get("errors").and_then(|e| e.get(0)) {
            let t = [e.get("title"), e.get("detail")]
                .into_iter()
                .flatten()
                .filter_map(Value::as_str)
                .collect::<Vec<_>>()
                .join(": ");
            if !t.is_empty() {
                return t;
            }
        }
        if let Some(m) = v.get("message").and_then(Value::as_str) {
            return m.to_owned();
        }
    }
    let s = String::from_utf8_lossy(&body[..body.len().min(200)]).into_owned();
    if s.trim().is_empty() {
        "(empty answer)".into()
    } else {
        s
    }
}

/// A v3 collection: `{<key>: [...], meta: {total}}`.
pub fn v3_page(v: &Value, key: &str, what: &str) -> Result<Page, ApiError> {
    let items = v
        .get(key)
        .and_then(Value::as_array)
        .ok_or_else(|| ApiError::BadResponse {
            what: what.into(),
            detail: format!("no `{key}` array"),
        })?
        .iter()
        .filter_map(|i| i.as_object().cloned())
        .collect::<Vec<_>>();
    let total = v
        .get("meta")
        .and_then(|m| m.get("total"))
        .and_then(|t| match t {
            Value::String(s) => s.trim().parse().ok(),
            Value::Number(n) => n.as_u64(),
            _ => None,
        })
        .unwrap_or(items.len() as u64);
    Ok(Page { items, total })
}

/// A v1 answer: `result_code` 1 with rows under `"0"`, `"1"`, …, or 0 for the end.
/// An answer saying the key is not authorized is [`ApiError::Unauthorized`].
pub fn v1_page(v: &Value, action: &str) -> Result<V1Page, ApiError> {
    let what = || format!("v1 {action}");
    let obj = v.as_object().ok_or_else(|| ApiError::BadResponse {
        what: what(),
        detail: "not a JSON object".into(),
    })?;
    let code = match obj.get("result_code") {
        Some(Value::Number(n)) => n.as_i64(),
        Some(Value::String(s)) => s.trim().parse().ok(),
        _ => None,
    }
    .ok_or_else(|| ApiError::BadResponse {
        what: what(),
        detail: "no `result_code`".into(),
    })?;
    if code == 0 {
        let msg = obj
            .get("result_message")
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_ascii_lowercase();
        if msg.contains("not authorized") || msg.contains("api key") {
            return Err(ApiError::Unauthorized { status: 200 });
        }
        return Ok(V1Page {
            rows: Vec::new(),
            done: true,
        });
    }
    let mut rows: Vec<(u64, Map<String, Value>)> = obj
        .iter()
        .filter_map(|(k, v)| Some((k.parse::<u64>().ok()?, v.as_object()?.clone())))
        .collect();
    rows.sort_by_key(|(i, _)| *i);
    Ok(V1Page {
        done: rows.is_empty(),
        rows: rows.into_iter().map(|(_, r)| r).collect(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn v1_rows_in_numeric_key_order_and_end_of_paging() {
        let v = json!({"1": {"email": "b"}, "0": {"email": "a"}, "10": {"email": "c"},
            "result_code": 1, "result_message": "Success", "result_output": "json"});
        let p = v1_page(&v, "campaign_report_open_list").unwrap();
        let emails: Vec<&str> = p
            .rows
            .iter()
            .map(|r| r["email"].as_str().unwrap())
            .collect();
        assert_eq!(emails, ["a", "b", "c"]);
        assert!(!p.done);
        let end = json!({"result_code": 0, "result_message": "Nothing is returned"});
        assert!(v1_page(&end, "x").unwrap().done);
        let denied = json!({"result_code": "0", "result_message": "You are not authorized to access this file"});
        assert_eq!(
            v1_page(&denied, "x"),
            Err(ApiError::Unauthorized { status: 200 })
        );
        assert!(matches!(
            v1_page(&json!([1]), "x"),
            Err(ApiError::BadResponse { .. })
        ));
    }

    #[test]
    fn v3_total_as_string_or_number() {
        let v = json!({"campaigns": [{"id": "1"}], "meta": {"total": "250"}});
        assert_eq!(v3_page(&v, "campaigns", "x").unwrap().total, 250);
        let v = json!({"campaigns": [{"id": "1"}], "meta": {"total": 3}});
        assert_eq!(v3_page(&v, "campaigns", "x").unwrap().total, 3);
        assert!(v3_page(&json!({}), "campaigns", "x").is_err());
    }

    #[test]
    fn refuses_urls_that_cannot_be_an_api() {
        for bad in ["", "acct.api-us1.com", "ftp://x", "https://"] {
            assert!(
                matches!(
                    Client::new(bad, "k", Duration::from_secs(1)),
                    Err(ApiError::InvalidUrl { .. })
                ),
                "{bad:?}"
            );
        }
        let c = Client::new(
            "https://acct.api-us1.com/api/3/",
            "k",
            Duration::from_secs(1),
        )
        .unwrap();
        assert_eq!(c.base(), "https://acct.api-us1.com");
        assert!(!format!("{c:?}").contains("\"k\""));
    }
}
