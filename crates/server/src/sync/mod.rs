//! ActiveCampaign API sync: for an `activecampaign` source with `settings.api`, a
//! backfill of campaign activity since a time (`POST /api/v1/sources/{id}/sync`,
//! default 60 days), then a poll every `poll_minutes` for campaigns sent or changed
//! since the last run started. State: `GET /api/v1/sources/{id}/sync` ([`SyncStatus`]).
//!
//! **Durable and exactly once.** Events go through the webhook's path
//! ([`crate::webhook::prepare`] then [`crate::accept::append`]): the same mapping,
//! identity rule, normalization and durable append, so they are deduped on their
//! content-derived `messageId` (a webhook and the API give the same id for the same
//! event) and loaded like any other. The run's position (campaign, report, page) is
//! checkpointed in `control.db` ([`Control::save_sync_state`]) after each page's
//! append is durable: a run killed between the two repeats that one page, whose
//! events are duplicates the log drops — no gap, no duplicate row. At start every
//! source with a stored run resumes it, and every synced source keeps polling.
//!
//! Failures: a call's retryable failures are retried inside the client (429 with
//! `Retry-After`, 5xx, no answer); what still fails puts the run in `failed` with
//! the message in `error`, keeps its position, and is tried again at the next poll
//! (or by a new POST). The API key is never returned (`"…last4"`), logged, or put
//! in a metric.
//!
//! Metrics: `tributary_activecampaign_sync_events_total{event}` (stored events by
//! name), `tributary_activecampaign_sync_runs_total{outcome}`, and the client's
//! `tributary_activecampaign_api_requests_total{status}` and
//! `tributary_activecampaign_api_rate_limited_total`.

mod run;

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};

use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use tokio::sync::Notify;
use tributary_activecampaign::api::report::CampaignInfo;
use tributary_activecampaign::api::{ApiError as AcError, ApiSettings, Client};

use crate::AppState;
use crate::control::{Control, Source, SourceType};
use crate::error::{ApiError, Checked};

/// A backfill without `since` reads this many days back.
pub const DEFAULT_BACKFILL_DAYS: i64 = 60;

/// What a sync is doing.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SyncState {
    /// Not running (never run, or finished and waiting for the next poll).
    #[default]
    Idle,
    /// A run is in progress (or resumes at start).
    Running,
    /// The last run stopped on an error (see `error`); it resumes at the next poll.
    Failed,
}

/// The sync state of a source, as `GET /api/v1/sources/{id}/sync` shows it
/// (DESIGN.md §3), plus the stored events by name.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct SyncStatus {
    /// Idle, running or failed.
    pub state: SyncState,
    /// The start of the window the current (or last) run reads.
    pub since: Option<DateTime<Utc>>,
    /// Campaigns of the run read completely.
    pub campaigns_done: u64,
    /// Campaigns of the run (known once they are listed).
    pub campaigns_total: u64,
    /// Events the run stored (repeats of stored events are not counted).
    pub events: u64,
    /// Stored events of the run by event name.
    #[serde(default)]
    pub events_by_type: BTreeMap<String, u64>,
    /// When the run started.
    pub started_at: Option<DateTime<Utc>>,
    /// When the last run finished.
    pub finished_at: Option<DateTime<Utc>>,
    /// When the next poll starts (after the first run).
    pub next_poll_at: Option<DateTime<Utc>>,
    /// Why the last run failed.
    pub error: Option<String>,
}

/// The sync status of a source (idle with nothing set when it never synced), for
/// the admin API and the console. Blocking (reads `control.db`).
pub fn status_of(control: &Control, source_id: &str) -> Result<SyncStatus, ApiError> {
    Ok(load(control, source_id)?.status)
}

/// Where a run is: the next page to read.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
struct Position {
    /// Index into the run's campaigns.
    campaign: usize,
    /// Index into [`tributary_activecampaign::api::Report::ALL`].
    report: usize,
    /// v1 page, from 1.
    page: u32,
}

/// A run in progress.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Run {
    /// A poll reads campaigns changed since `since`; a backfill campaigns sent since.
    poll: bool,
    since: DateTime<Utc>,
    started_at: DateTime<Utc>,
    /// The campaigns, once listed (`None` before).
    campaigns: Option<Vec<CampaignInfo>>,
    /// The account's UTC offset in seconds, once known.
    zone_secs: Option<i32>,
    position: Position,
}

/// What `control.db` keeps per source.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
struct Stored {
    status: SyncStatus,
    run: Option<Run>,
    /// The start of the last finished run: the next poll reads changes since then.
    polled_from: Option<DateTime<Utc>>,
}

fn load(control: &Control, source_id: &str) -> Result<Stored, ApiError> {
    Ok(control
        .sync_state(source_id)?
        .and_then(|v| serde_json::from_value(v).ok())
        .unwrap_or_default())
}

fn save(control: &Control, source_id: &str, stored: &Stored) -> Result<(), ApiError> {
    let v = serde_json::to_value(stored).map_err(|e| ApiError::Internal(e.to_string()))?;
    control.save_sync_state(source_id, &v)
}

async fn load_async(control: &Arc<Control>, id: &str) -> Result<Stored, ApiError> {
    let (c, id) = (control.clone(), id.to_owned());
    tokio::task::spawn_blocking(move || load(&c, &id))
        .await
        .map_err(|e| ApiError::Internal(e.to_string()))?
}

async fn save_async(control: &Arc<Control>, id: &str, stored: &Stored) -> Result<(), ApiError> {
    let (c, id, s) = (control.clone(), id.to_owned(), stored.clone());
    tokio::task::spawn_blocking(move || save(&c, &id, &s))
        .await
        .map_err(|e| ApiError::Internal(e.to_string()))?
}

/// The sync's per-source tasks (one per source that has synced), each woken by a
/// POST or its poll time.
#[derive(Default)]
pub struct Syncer {
    tasks: Mutex<HashMap<String, Task>>,
    /// Per source: held while a run is decided and marked `running` (by a POST or by
    /// the poller), so two never start at once. Once `running` is stored, a POST is
    /// refused, so the run's own checkpoints have no other writer.
    starts: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
}

/// A source's task and what wakes it.
type Task = (Arc<Notify>, tokio::task::JoinHandle<()>);

impl Syncer {
    /// Starts (or wakes) the task of a source.
    fn wake(&self, state: &Arc<AppState>, source_id: &str) {
        let Ok(mut tasks) = self.tasks.lock() else {
            return;
        };
        if let Some((notify, handle)) = tasks.get(source_id)
            && !handle.is_finished()
        {
            notify.notify_one();
            return;
        }
        let notify = Arc::new(Notify::new());
        let handle = tokio::spawn(run::source_loop(
            state.clone(),
            source_id.to_owned(),
            notify.clone(),
        ));
        tasks.insert(source_id.to_owned(), (notify, handle));
    }

    /// Starts the task of a source unless it has a running one (cluster mode: every
    /// node keeps one per synced source, waiting for the source's lease).
    fn ensure(&self, state: &Arc<AppState>, source_id: &str) {
        let running = self
            .tasks
            .lock()
            .map(|t| t.get(source_id).is_some_and(|(_, h)| !h.is_finished()))
            .unwrap_or(true);
        if !running {
            self.wake(state, source_id);
        }
    }

    /// The start lock of a source (see `starts`).
    fn start_lock(&self, source_id: &str) -> Arc<tokio::sync::Mutex<()>> {
        self.starts
            .lock()
            .map(|mut m| m.entry(source_id.to_owned()).or_default().clone())
            .unwrap_or_default()
    }

    /// Waits for every task to stop (they stop when the shutdown token triggers).
    pub async fn join(&self) {
        let handles: Vec<_> = self
            .tasks
            .lock()
            .map(|mut t| t.drain().map(|(_, (_, h))| h).collect())
            .unwrap_or_default();
        for h in handles {
            let _ = h.await;
        }
    }
}

/// Starts the task of every ActiveCampaign source with API settings and a stored
/// sync state: runs resume, polls continue.
///
/// In cluster mode every node starts a task for every ActiveCampaign source with API
/// settings (now, and for sources added later, within [`run::CLUSTER_RECHECK`]); each
/// task syncs only while this node holds the source's lease (see [`run`]).
pub async fn start(state: &Arc<AppState>) {
    if state.leases.is_some() {
        let state = state.clone();
        tokio::spawn(async move {
            loop {
                for s in state.control.sources() {
                    if s.kind == SourceType::Activecampaign && api_settings(&s).is_some() {
                        state.sync.ensure(&state, &s.id);
                    }
                }
                tokio::select! {
                    _ = tokio::time::sleep(run::CLUSTER_RECHECK) => {}
                    _ = state.shutdown.wait() => return,
                }
            }
        });
        return;
    }
    for s in state.control.sources() {
        if s.kind != SourceType::Activecampaign || api_settings(&s).is_none() {
            continue;
        }
        match load_async(&state.control, &s.id).await {
            Ok(stored) if stored.run.is_some() || stored.status.next_poll_at.is_some() => {
                state.sync.wake(state, &s.id);
            }
            Ok(_) => {}
            Err(e) => tracing::warn!(source = %s.id, error = %e, "cannot read the sync state"),
        }
    }
}

/// `settings.api` of a source, when present and well-formed.
pub fn api_settings(source: &Source) -> Option<ApiSettings> {
    serde_json::from_value(source.settings.get("api")?.clone()).ok()
}

/// Checks `settings.api` on create/patch: the shape, then (unless URL and key are
/// those already stored) that the account answers and accepts the key. A masked
/// key (`"…last4"`, as shown back) is replaced by the stored one. Returns the
/// settings to store.
pub async fn check_settings(
    previous: Option<&Source>,
    mut settings: Value,
) -> Result<Value, ApiError> {
    let Some(api) = settings.get_mut("api") else {
        return Ok(settings);
    };
    let old = previous.and_then(api_settings);
    if let (Some(old), Some(key)) = (&old, api.get("key").and_then(Value::as_str))
        && key.starts_with('…')
        && key == ApiSettings::masked_key(&old.key)
    {
        api["key"] = Value::String(old.key.clone());
    }
    let parsed: ApiSettings = serde_json::from_value(api.clone()).map_err(|e| {
        ApiError::bad(
            "invalid_settings",
            format!("invalid settings.api (expected {{\"url\", \"key\", \"poll_minutes\"?}}): {e}"),
        )
    })?;
    parsed
        .validate()
        .map_err(|m| ApiError::bad("invalid_settings", m))?;
    if old
        .as_ref()
        .is_some_and(|o| o.url == parsed.url && o.key == parsed.key)
    {
        return Ok(settings);
    }
    let client = Client::new(&parsed.url, &parsed.key, std::time::Duration::from_secs(10))
        .map_err(|e| ApiError::bad("invalid_settings", e.to_string()))?;
    client.check().await.map_err(|e| {
        let code = match e {
            AcError::Unauthorized { .. } => "invalid_api_key",
            AcError::Unreachable { .. } => "api_unreachable",
            _ => "api_check_failed",
        };
        ApiError::bad(code, e.to_string())
    })?;
    Ok(settings)
}

/// The settings as shown back: `api.key` masked.
pub fn redact_settings(settings: &Value) -> Value {
    let mut v = settings.clone();
    if let Some(key) = v
        .get_mut("api")
        .and_then(|a| a.get_mut("key"))
        .filter(|k| k.is_string())
    {
        *key = Value::String(ApiSettings::masked_key(key.as_str().unwrap_or_default()));
    }
    v
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct StartSync {
    since: Option<String>,
}

/// Parses `since`: RFC 3339, in the past.
fn parse_since(raw: &str, now: DateTime<Utc>) -> Result<DateTime<Utc>, ApiError> {
    let raw_t = raw.trim();
    // An RFC 3339 time, or a date (the console's date field) read as its UTC midnight.
    let t = DateTime::parse_from_rfc3339(raw_t)
        .map(|t| t.with_timezone(&Utc))
        .or_else(|_| {
            chrono::NaiveDate::parse_from_str(raw_t, "%Y-%m-%d")
                .map(|d| d.and_time(chrono::NaiveTime::MIN).and_utc())
        })
        .map_err(|_| {
            ApiError::bad(
                "invalid_since",
                format!(
                    "`since` {raw:?} is not an RFC 3339 time like \"2024-01-31T00:00:00Z\" or a date like \"2024-01-31\""
                ),
            )
        })?;
    if t > now {
        return Err(ApiError::bad(
            "invalid_since",
            format!("`since` {raw:?} is in the future"),
        ));
    }
    Ok(t)
}

fn api_source(state: &AppState, id: &str) -> Result<(Arc<Source>, ApiSettings), ApiError> {
    let s = state
        .control
        .source(id)
        .ok_or_else(|| ApiError::NotFound(format!("no source with id {id:?}")))?;
    if s.kind != SourceType::Activecampaign {
        return Err(ApiError::bad(
            "not_activecampaign",
            "API sync is for activecampaign sources",
        ));
    }
    let api = api_settings(&s).ok_or_else(|| {
        ApiError::bad(
            "no_api_settings",
            "the source has no settings.api: PATCH it with {\"settings\":{\"api\":{\"url\":…,\"key\":…}}} first",
        )
    })?;
    Ok((s, api))
}

async fn start_sync(
    State(state): State<Arc<AppState>>,
    Checked(Path(id)): Checked<Path<String>>,
    Checked(body): Checked<Bytes>,
) -> Result<Response, ApiError> {
    let req: StartSync = if body.iter().all(u8::is_ascii_whitespace) {
        StartSync::default()
    } else {
        crate::admin::json_body(&body)?
    };
    let status = begin(&state, &id, req.since.as_deref()).await?;
    Ok((StatusCode::ACCEPTED, axum::Json(status)).into_response())
}

/// Starts a backfill of source `id` from `since` (RFC 3339 or a date; default 60
/// days back), as `POST /api/v1/sources/{id}/sync` and the console's "Start backfill"
/// do: 400 for a bad `since` or a source without API settings, 409 while a run is
/// going. Returns once the run's start is durable; the run itself goes on in the
/// background.
pub async fn begin(
    state: &Arc<AppState>,
    id: &str,
    since: Option<&str>,
) -> Result<SyncStatus, ApiError> {
    let now = Utc::now();
    let since = match since {
        Some(s) => parse_since(s, now)?,
        None => now - chrono::Duration::days(DEFAULT_BACKFILL_DAYS),
    };
    let (source, _) = api_source(state, id)?;
    let lock = state.sync.start_lock(&source.id);
    let _starting = lock.lock().await;
    let mut stored = load_async(&state.control, &source.id).await?;
    if stored.status.state == SyncState::Running {
        return Err(ApiError::Conflict(
            "a sync of this source is running; wait for it to finish (GET …/sync)".into(),
        ));
    }
    stored.run = Some(Run {
        poll: false,
        since,
        started_at: now,
        campaigns: None,
        zone_secs: None,
        position: Position {
            page: 1,
            ..Default::default()
        },
    });
    stored.status = SyncStatus {
        state: SyncState::Running,
        since: Some(since),
        started_at: Some(now),
        finished_at: stored.status.finished_at,
        next_poll_at: None,
        ..Default::default()
    };
    save_async(&state.control, &source.id, &stored).await?;
    tracing::info!(source = %source.id, since = %since, "api sync started");
    state.sync.wake(state, &source.id);
    Ok(stored.status)
}

async fn get_sync(
    State(state): State<Arc<AppState>>,
    Checked(Path(id)): Checked<Path<String>>,
) -> Result<axum::Json<SyncStatus>, ApiError> {
    state
        .control
        .source(&id)
        .ok_or_else(|| ApiError::NotFound(format!("no source with id {id:?}")))?;
    Ok(axum::Json(load_async(&state.control, &id).await?.status))
}

/// `POST|GET /sources/{id}/sync` (the app adds the admin auth layer).
pub fn routes() -> Router<Arc<AppState>> {
    Router::new().route("/sources/{id}/sync", get(get_sync).post(start_sync))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn since_must_be_rfc3339_or_a_date_in_the_past() {
        let now: DateTime<Utc> = "2024-03-01T00:00:00Z".parse().unwrap();
        assert!(parse_since("2024-01-01T00:00:00Z", now).is_ok());
        assert!(parse_since("2024-01-01T00:00:00-05:00", now).is_ok());
        // A date (the console's date field) is its UTC midnight.
        assert_eq!(
            parse_since("2024-01-01", now).unwrap(),
            "2024-01-01T00:00:00Z".parse::<DateTime<Utc>>().unwrap()
        );
        for bad in [
            "yesterday",
            "2024-13-01",
            "",
            "2025-01-01T00:00:00Z",
            "2025-01-01",
        ] {
            assert!(parse_since(bad, now).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn redacts_only_the_key() {
        let v = json!({"user_id_field": "32", "api": {"url": "https://a.api-us1.com", "key": "secret-abcd"}});
        let r = redact_settings(&v);
        assert_eq!(r["api"]["key"], "…abcd");
        assert_eq!(r["api"]["url"], "https://a.api-us1.com");
        assert_eq!(r["user_id_field"], "32");
        assert!(!r.to_string().contains("secret"));
    }

    #[test]
    fn stored_state_round_trips() {
        let s = Stored {
            status: SyncStatus {
                state: SyncState::Running,
                ..Default::default()
            },
            run: Some(Run {
                poll: false,
                since: Utc::now(),
                started_at: Utc::now(),
                campaigns: Some(vec![CampaignInfo {
                    id: "1".into(),
                    ..Default::default()
                }]),
                zone_secs: Some(-18000),
                position: Position {
                    campaign: 0,
                    report: 2,
                    page: 3,
                },
            }),
            polled_from: None,
        };
        let v = serde_json::to_value(&s).unwrap();
        assert_eq!(serde_json::from_value::<Stored>(v).unwrap(), s);
    }
}
