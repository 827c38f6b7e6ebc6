//! A stand-in for ActiveCampaign's API, answering the documented shapes
//! (`docs/reference/activecampaign.md` §3): v3 `users/me`, `campaigns` (paged by
//! `limit` ≤ 100 / `offset`, `meta.total` as a string), `campaigns/{id}/links`,
//! `messages/{id}`, and the v1 `campaign_report_*_list` actions (rows under `"0"`,
//! `"1"`, … with `result_code` 1, pages of [`V1_PAGE`] rows, `result_code` 0 past the
//! end). It answers 429 with `Retry-After: 1` every [`Faults::rate_limit_every`]th
//! request, one 500 at request [`Faults::fail_at`], 401 for a wrong or revoked key,
//! and records every request's arrival time so tests can check the 5 requests/s
//! limit. Timestamps come with offsets (`sdate`, some `tstamp_iso`) and without
//! (`tstamp`, naive in the account's zone −06:00; bounce dates date-only).
//!
//! The data: [`CAMPAIGNS`] campaigns × `recipients` recipients `r{i}@example.com`
//! (contact id `i + 1`), with rules (see [`Recipient`]) the tests recompute to know
//! exactly who must be in each table.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use axum::Router;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use chrono::{DateTime, Duration, FixedOffset, Utc};
use serde_json::{Map, Value, json};

/// Campaigns in the account.
pub const CAMPAIGNS: usize = 3;
/// Rows per v1 page.
pub const V1_PAGE: usize = 100;
/// The account's zone: US Central standard time.
pub const ZONE_SECS: i32 = -6 * 3600;

/// The API key the stand-in accepts.
pub const KEY: &str = "standin-key-0123456789abcdef-4242";

/// Fault injection.
#[derive(Default)]
pub struct Faults {
    /// Answer 429 + `Retry-After: 1` to every n-th request (0: never).
    pub rate_limit_every: usize,
    /// Answer 500 once, to this request number (1-based; 0: never).
    pub fail_at: usize,
}

/// What one recipient of one campaign did.
#[derive(Debug, Clone)]
pub struct Recipient {
    /// Index.
    pub i: usize,
    /// Email.
    pub email: String,
    /// Bounced (hard when `i % 50 == 0`, else soft).
    pub bounced: bool,
    /// Opened.
    pub opened: bool,
    /// Clicked link 1 / link 2.
    pub clicks: Vec<usize>,
    /// Unsubscribed with this reason.
    pub unsubscribed: Option<&'static str>,
}

/// The rules: bounced when `i % 25 == 0`; opened when not bounced and `i` even;
/// clicked link 1 when opened and `i % 6 == 0`, link 2 too when `i % 12 == 0`;
/// unsubscribed when `i % 40 == 1`, as spam when `i % 80 == 1`.
pub fn recipient(i: usize) -> Recipient {
    let bounced = i.is_multiple_of(25);
    let opened = !bounced && i.is_multiple_of(2);
    let mut clicks = Vec::new();
    if opened && i.is_multiple_of(6) {
        clicks.push(1);
    }
    if opened && i.is_multiple_of(12) {
        clicks.push(2);
    }
    let unsubscribed = (i % 40 == 1).then_some(if i % 80 == 1 {
        "The emails are spam"
    } else {
        "Too many emails"
    });
    Recipient {
        i,
        email: format!("r{i}@example.com"),
        bounced,
        opened,
        clicks,
        unsubscribed,
    }
}

/// Campaign `c` (0-based) id, message id and send time.
pub fn campaign_id(c: usize) -> String {
    format!("{}", 10 + c)
}

fn message_id(c: usize) -> String {
    format!("{}", 100 + c)
}

fn zone() -> FixedOffset {
    FixedOffset::east_opt(ZONE_SECS).unwrap()
}

/// The instant recipient `i` opened campaign `c` (whole seconds).
pub fn open_at(base: DateTime<Utc>, c: usize, i: usize) -> DateTime<Utc> {
    sent_at(base, c) + Duration::seconds(600 + i as i64 * 7)
}

/// Campaign `c`'s send time: `base` minus (CAMPAIGNS − c) days, whole seconds.
pub fn sent_at(base: DateTime<Utc>, c: usize) -> DateTime<Utc> {
    let t = base - Duration::days((CAMPAIGNS - c) as i64);
    DateTime::from_timestamp(t.timestamp(), 0).unwrap()
}

fn naive(t: DateTime<Utc>) -> String {
    t.with_timezone(&zone())
        .format("%Y-%m-%d %H:%M:%S")
        .to_string()
}

fn iso(t: DateTime<Utc>) -> String {
    t.with_timezone(&zone())
        .format("%Y-%m-%dT%H:%M:%S%:z")
        .to_string()
}

/// The open webhook ActiveCampaign would post for recipient `i` of campaign `c`.
pub fn open_webhook(base: DateTime<Utc>, c: usize, i: usize) -> Vec<(String, String)> {
    let r = recipient(i);
    [
        ("type", "open".to_string()),
        ("date_time", iso(open_at(base, c, i))),
        ("initiated_from", "public".into()),
        ("campaign[id]", campaign_id(c)),
        ("campaign[name]", format!("Campaign {c}")),
        ("campaign[type]", "single".into()),
        ("campaign[message][id]", message_id(c)),
        ("campaign[message][subject]", format!("Subject {c}")),
        ("contact[id]", (i + 1).to_string()),
        ("contact[email]", r.email),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect()
}

/// The stand-in's state.
pub struct StandIn {
    /// Base URL (`http://127.0.0.1:PORT`).
    pub url: String,
    /// Recipients per campaign.
    pub recipients: usize,
    /// "Now" of the data: campaigns were sent 1..=CAMPAIGNS days before it.
    pub base: DateTime<Utc>,
    /// When set, every key is refused with 401.
    pub revoked: AtomicBool,
    /// Arrival times of every request.
    pub arrivals: Mutex<Vec<Instant>>,
    /// Requests by path (+ v1 action).
    pub by_path: Mutex<HashMap<String, usize>>,
    /// 429s answered.
    pub limited: AtomicUsize,
    /// 500s answered.
    pub failed: AtomicUsize,
    faults: Faults,
    count: AtomicUsize,
}

impl StandIn {
    /// Starts a stand-in on a free port.
    pub async fn start(recipients: usize, faults: Faults) -> Arc<StandIn> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let state = Arc::new(StandIn {
            url,
            recipients,
            base: Utc::now(),
            revoked: AtomicBool::new(false),
            arrivals: Mutex::new(Vec::new()),
            by_path: Mutex::new(HashMap::new()),
            limited: AtomicUsize::new(0),
            failed: AtomicUsize::new(0),
            faults,
            count: AtomicUsize::new(0),
        });
        let app = Router::new()
            .route("/api/3/users/me", get(users_me))
            .route("/api/3/campaigns", get(campaigns))
            .route("/api/3/campaigns/{id}/links", get(links))
            .route("/api/3/messages/{id}", get(message))
            .route("/admin/api.php", get(v1))
            .with_state(state.clone());
        tokio::spawn(async move {
            axum::serve(listener, app).await.unwrap();
        });
        state
    }

    /// The most requests that arrived within any one second.
    pub fn max_per_second(&self) -> usize {
        self.max_within(std::time::Duration::from_secs(1))
    }

    /// The most requests that arrived within any `window`.
    pub fn max_within(&self, window: std::time::Duration) -> usize {
        let mut t = self.arrivals.lock().unwrap().clone();
        t.sort();
        let mut best = 0;
        let mut j = 0;
        for i in 0..t.len() {
            while t[i].duration_since(t[j]) >= window {
                j += 1;
            }
            best = best.max(i - j + 1);
        }
        best
    }

    /// Requests so far.
    pub fn requests(&self) -> usize {
        self.count.load(Ordering::SeqCst)
    }

    /// Counts the request; answers the injected fault or the key check, if any.
    fn gate(&self, headers: &HeaderMap, what: String) -> Option<Response> {
        let n = self.count.fetch_add(1, Ordering::SeqCst) + 1;
        self.arrivals.lock().unwrap().push(Instant::now());
        *self.by_path.lock().unwrap().entry(what).or_default() += 1;
        if self.faults.rate_limit_every > 0 && n.is_multiple_of(self.faults.rate_limit_every) {
            self.limited.fetch_add(1, Ordering::SeqCst);
            return Some(
                (
                    StatusCode::TOO_MANY_REQUESTS,
                    [("retry-after", "1")],
                    axum::Json(json!({"message": "Too Many Requests"})),
                )
                    .into_response(),
            );
        }
        if n == self.faults.fail_at {
            self.failed.fetch_add(1, Ordering::SeqCst);
            return Some(
                (
                    StatusCode::INTERNAL_SERVER_ERROR,
                    axum::Json(json!({"errors": [{"title": "Internal Server Error"}]})),
                )
                    .into_response(),
            );
        }
        let key = headers.get("api-token").and_then(|v| v.to_str().ok());
        if key != Some(KEY) || self.revoked.load(Ordering::SeqCst) {
            return Some(
                (
                    StatusCode::UNAUTHORIZED,
                    axum::Json(json!({"message": "No Result found for Subscriber with id 0"})),
                )
                    .into_response(),
            );
        }
        None
    }

    fn campaign_json(&self, c: usize) -> Value {
        let sent = sent_at(self.base, c);
        json!({
            "id": campaign_id(c),
            "name": format!("Campaign {c}"),
            "type": "single",
            "status": "5",
            "cdate": iso(sent - Duration::hours(2)),
            "mdate": iso(sent),
            "sdate": iso(sent),
            "ldate": iso(sent),
            "send_amt": self.recipients.to_string(),
            "links": {"campaignMessage": format!("{}/api/3/campaigns/{}/campaignMessage", self.url, campaign_id(c))},
        })
    }
}

async fn users_me(State(s): State<Arc<StandIn>>, headers: HeaderMap) -> Response {
    if let Some(r) = s.gate(&headers, "users/me".into()) {
        return r;
    }
    axum::Json(json!({"user": {"id": "1", "username": "admin", "email": "admin@example.com"}}))
        .into_response()
}

async fn campaigns(
    State(s): State<Arc<StandIn>>,
    headers: HeaderMap,
    Query(q): Query<HashMap<String, String>>,
) -> Response {
    if let Some(r) = s.gate(&headers, "campaigns".into()) {
        return r;
    }
    let limit: usize = q
        .get("limit")
        .and_then(|l| l.parse().ok())
        .unwrap_or(20)
        .min(100);
    let offset: usize = q.get("offset").and_then(|l| l.parse().ok()).unwrap_or(0);
    // An old draft that was never sent, plus the sent campaigns.
    let mut all: Vec<Value> = (0..CAMPAIGNS).map(|c| s.campaign_json(c)).collect();
    all.push(
        json!({"id": "99", "name": "Draft", "type": "single", "status": "0",
        "cdate": iso(s.base), "mdate": iso(s.base), "sdate": null, "ldate": "0000-00-00 00:00:00"}),
    );
    let page: Vec<Value> = all.iter().skip(offset).take(limit).cloned().collect();
    axum::Json(json!({"campaigns": page, "meta": {"total": all.len().to_string()}})).into_response()
}

fn campaign_index(id: &str) -> Option<usize> {
    (0..CAMPAIGNS).find(|c| campaign_id(*c) == id)
}

async fn links(
    State(s): State<Arc<StandIn>>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Response {
    if let Some(r) = s.gate(&headers, "campaigns/links".into()) {
        return r;
    }
    let Some(c) = campaign_index(&id) else {
        return (
            StatusCode::NOT_FOUND,
            axum::Json(json!({"message": "No Result found"})),
        )
            .into_response();
    };
    let cid = campaign_id(c);
    let mid = message_id(c);
    axum::Json(json!({"links": [
        {"campaignid": cid, "messageid": mid, "link": "open", "name": "Read Tracker", "ref": "", "tracked": "1", "id": format!("{}0", c + 1)},
        {"campaignid": cid, "messageid": mid, "link": "https://example.com/one", "name": "One", "ref": "", "tracked": "1", "id": format!("{}1", c + 1)},
        {"campaignid": cid, "messageid": mid, "link": "https://example.com/two", "name": "Two", "ref": "", "tracked": "1", "id": format!("{}2", c + 1)},
    ]}))
    .into_response()
}

async fn message(
    State(s): State<Arc<StandIn>>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Response {
    if let Some(r) = s.gate(&headers, "messages".into()) {
        return r;
    }
    let Some(c) = (0..CAMPAIGNS).find(|c| message_id(*c) == id) else {
        return (
            StatusCode::NOT_FOUND,
            axum::Json(json!({"message": "No Result found"})),
        )
            .into_response();
    };
    axum::Json(
        json!({"message": {"id": id, "subject": format!("Subject {c}"), "fromname": "Shop"}}),
    )
    .into_response()
}

fn v1_rows(rows: Vec<Value>, page: usize) -> Value {
    let start = (page.max(1) - 1) * V1_PAGE;
    let chunk: Vec<Value> = rows.into_iter().skip(start).take(V1_PAGE).collect();
    if chunk.is_empty() {
        return json!({"result_code": 0, "result_message": "Nothing is returned", "result_output": "json"});
    }
    let mut out = Map::new();
    for (k, r) in chunk.into_iter().enumerate() {
        out.insert(k.to_string(), r);
    }
    out.insert("result_code".into(), json!(1));
    out.insert(
        "result_message".into(),
        json!("Success: Something is returned"),
    );
    out.insert("result_output".into(), json!("json"));
    Value::Object(out)
}

async fn v1(
    State(s): State<Arc<StandIn>>,
    headers: HeaderMap,
    Query(q): Query<HashMap<String, String>>,
) -> Response {
    let action = q.get("api_action").cloned().unwrap_or_default();
    if let Some(r) = s.gate(&headers, format!("v1/{action}")) {
        return r;
    }
    let page: usize = q.get("page").and_then(|p| p.parse().ok()).unwrap_or(1);
    let Some(c) = q.get("campaignid").and_then(|id| campaign_index(id)) else {
        return axum::Json(v1_rows(Vec::new(), 1)).into_response();
    };
    let sent = sent_at(s.base, c);
    let people: Vec<Recipient> = (0..s.recipients).map(recipient).collect();
    let contact = |r: &Recipient| (r.i + 1).to_string();
    let rows: Vec<Value> = match action.as_str() {
        "campaign_report_bounce_list" => people
            .iter()
            .filter(|r| r.bounced)
            .map(|r| json!({"id": r.i.to_string(), "email": r.email, "subscriberid": contact(r),
                "listid": "1", "campaignid": campaign_id(c), "messageid": message_id(c),
                "tstamp": sent.with_timezone(&zone()).format("%Y-%m-%d").to_string(),
                "type": if r.i % 50 == 0 { "hard" } else { "soft" }, "code": "5.1.1", "counted": "1",
                "descript": "mailbox unavailable"}))
            .collect(),
        "campaign_report_open_list" => people
            .iter()
            .filter(|r| r.opened)
            .map(|r| {
                let at = open_at(s.base, c, r.i);
                // Half the rows carry tstamp_iso (with offset); all carry the naive tstamp.
                let mut row = json!({"subscriberid": contact(r), "email": r.email, "times": "1", "tstamp": naive(at)});
                if r.i % 4 == 0 {
                    row["tstamp_iso"] = json!(iso(at));
                }
                row
            })
            .collect(),
        "campaign_report_unopen_list" => people
            .iter()
            .filter(|r| !r.opened)
            .map(|r| json!({"subscriberid": contact(r), "email": r.email, "campaignid": campaign_id(c),
                "messageid": message_id(c), "tstamp": naive(sent), "tstamp_iso": iso(sent)}))
            .collect(),
        "campaign_report_link_list" => (1..=2)
            .map(|l| {
                let info: Vec<Value> = people
                    .iter()
                    .filter(|r| r.clicks.contains(&l))
                    .map(|r| {
                        let at = open_at(s.base, c, r.i) + Duration::seconds(30 * l as i64);
                        json!({"subscriberid": contact(r), "email": r.email, "tstamp": naive(at), "times": "2"})
                    })
                    .collect();
                json!({"id": format!("{}{l}", c + 1), "name": format!("Link {l}"),
                    "link": if l == 1 { "https://example.com/one" } else { "https://example.com/two" },
                    "tracked": "1", "a_unique": info.len().to_string(), "a_total": (info.len() * 2).to_string(), "info": info})
            })
            .chain(std::iter::once(json!({"id": format!("{}0", c + 1), "name": "Read Tracker", "link": "open",
                "info": [{"subscriberid": "1", "email": "r0@example.com", "tstamp": naive(sent)}]})))
            .collect(),
        "campaign_report_unsubscription_list" => people
            .iter()
            .filter_map(|r| r.unsubscribed.map(|why| (r, why)))
            .map(|(r, why)| {
                let at = open_at(s.base, c, r.i) + Duration::seconds(5);
                json!({"subscriberid": contact(r), "email": r.email, "campaignid": campaign_id(c),
                    "unsubreason": why, "tstamp": naive(at), "tstamp_iso": iso(at), "udate": "0000-00-00 00:00:00"})
            })
            .collect(),
        _ => Vec::new(),
    };
    axum::Json(v1_rows(rows, page)).into_response()
}
