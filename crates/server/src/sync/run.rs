//! One source's sync task: resumes a stored run, then sleeps until the next poll
//! (or a POST wakes it), and runs that. See the parent module for the guarantees.
//!
//! **Cluster mode: one node per source.** Every node has a task for every synced
//! source, but only the holder of the source's lease (`sync:<source id>`, partition
//! 0, in the control database's leases) reads its state and calls ActiveCampaign; the
//! others wait for the lease. The holder rereads the stored state at least every
//! [`CLUSTER_RECHECK`], so a backfill started through another node begins within
//! that. When the holder dies or stalls its lease expires (`cluster.lease_ttl`) and
//! another node resumes the run from its last checkpoint; a holder that loses the
//! lease mid-run stops calling at once. So the per-account limit (5 requests/s) holds
//! for the whole cluster, not per node.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use chrono::{FixedOffset, Utc};
use tokio::sync::Notify;
use tributary_activecampaign::api::report::{AccountZone, CampaignInfo, Report};
use tributary_activecampaign::api::{ApiError as AcError, ApiSettings, Client, bounced_emails};
use tributary_activecampaign::{Settings, map_activity};

use super::{Position, Run, Stored, SyncState, api_settings, load_async, save_async};
use crate::AppState;
use crate::control::LastEvent;

/// The most v1 pages read from one report (a guard against an API that never ends).
const MAX_PAGES: u32 = 100_000;
/// Per-request timeout against ActiveCampaign.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// Cluster mode: how often the lease holder rereads a source's stored state.
pub(super) const CLUSTER_RECHECK: Duration = Duration::from_secs(2);

/// The lease a source's sync runs under in cluster mode.
pub(super) fn lease_name(source_id: &str) -> String {
    format!("sync:{source_id}")
}

/// Resolves once `owned` holds no lease (or never, without leases).
async fn lease_lost(
    owned: &mut Option<tokio::sync::watch::Receiver<Vec<tributary_eventlog::Lease>>>,
) {
    match owned {
        Some(rx) => {
            while !rx.borrow_and_update().is_empty() {
                if rx.changed().await.is_err() {
                    std::future::pending::<()>().await;
                }
            }
        }
        None => std::future::pending().await,
    }
}

/// Why a run stopped early.
enum Stop {
    /// ActiveCampaign (or our side) failed: the run is `failed` with this message.
    Failed(String),
    /// The source was deleted or lost its API settings, or the server is stopping.
    Gone,
}

impl From<AcError> for Stop {
    fn from(e: AcError) -> Self {
        Stop::Failed(e.to_string())
    }
}

impl From<crate::error::ApiError> for Stop {
    fn from(e: crate::error::ApiError) -> Self {
        Stop::Failed(format!("storing events failed: {e}"))
    }
}

/// The task loop of one source; ends when the source is gone or at shutdown.
pub(super) async fn source_loop(state: Arc<AppState>, id: String, wake: Arc<Notify>) {
    let cluster = state.leases.is_some();
    let mut owned = cluster.then(|| state.ownership.owned(&lease_name(&id), 1));
    source_loop_leased(&state, &id, &wake, &mut owned).await;
    if owned.is_some()
        && let Err(e) = state.ownership.release(&lease_name(&id)).await
    {
        tracing::warn!(source = %id, error = %e, "cannot release the sync lease");
    }
}

async fn source_loop_leased(
    state: &Arc<AppState>,
    id: &str,
    wake: &Notify,
    owned: &mut Option<tokio::sync::watch::Receiver<Vec<tributary_eventlog::Lease>>>,
) {
    let state = state.clone();
    let id = id.to_owned();
    let shutdown = state.shutdown.clone();
    let mut holding = false;
    loop {
        if shutdown.is_triggered() {
            return;
        }
        let Some(source) = state.control.source(&id) else {
            return;
        };
        if let Some(rx) = owned.as_mut() {
            let held = !rx.borrow_and_update().is_empty();
            if held != holding {
                holding = held;
                tracing::info!(source = %id, holding, "api sync lease {}", if held { "won: this node syncs the source" } else { "not held: another node syncs the source" });
            }
            if !held {
                tokio::select! {
                    r = rx.changed() => if r.is_err() {
                        tokio::time::sleep(CLUSTER_RECHECK).await;
                    },
                    _ = tokio::time::sleep(CLUSTER_RECHECK) => {}
                    _ = shutdown.wait() => return,
                }
                continue;
            }
        }
        let Some(api) = api_settings(&source) else {
            tokio::select! {
                _ = wake.notified() => continue,
                _ = shutdown.wait() => return,
            }
        };
        let lock = state.sync.start_lock(&id);
        let starting = lock.lock().await;
        let mut stored = match load_async(&state.control, &id).await {
            Ok(s) => s,
            Err(e) => {
                drop(starting);
                tracing::warn!(source = %id, error = %e, "cannot read the sync state; retrying in 10s");
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_secs(10)) => continue,
                    _ = shutdown.wait() => return,
                }
            }
        };
        let now = Utc::now();
        let due = stored.status.next_poll_at.is_some_and(|t| t <= now);
        let runnable = match &stored.run {
            Some(_) => stored.status.state == SyncState::Running || due,
            None => due,
        };
        if !runnable {
            drop(starting);
            let mut sleep = stored
                .status
                .next_poll_at
                .map(|t| (t - now).to_std().unwrap_or_default())
                .unwrap_or(Duration::from_secs(24 * 3600));
            if owned.is_some() {
                // A POST on another node only changes the stored state.
                sleep = sleep.min(CLUSTER_RECHECK);
            }
            tokio::select! {
                _ = tokio::time::sleep(sleep) => {}
                _ = wake.notified() => {}
                _ = shutdown.wait() => return,
            }
            continue;
        }
        if stored.run.is_none() {
            // A poll: campaigns sent or changed since the last run started.
            let since = stored
                .polled_from
                .unwrap_or(now - chrono::Duration::days(super::DEFAULT_BACKFILL_DAYS));
            stored.run = Some(Run {
                poll: true,
                since,
                started_at: now,
                campaigns: None,
                zone_secs: None,
                position: Position {
                    page: 1,
                    ..Default::default()
                },
            });
            stored.status = super::SyncStatus {
                state: SyncState::Running,
                since: Some(since),
                started_at: Some(now),
                finished_at: stored.status.finished_at,
                ..Default::default()
            };
        } else {
            stored.status.state = SyncState::Running;
            stored.status.error = None;
        }
        if let Err(e) = save_async(&state.control, &id, &stored).await {
            tracing::warn!(source = %id, error = %e, "cannot write the sync state");
        }
        drop(starting);
        let outcome = tokio::select! {
            r = execute(&state, &id, &api, &mut stored) => r,
            _ = shutdown.wait() => return,
            _ = lease_lost(owned) => {
                // Another node has (or will have) the lease and resumes from the
                // last checkpoint; this node stops calling ActiveCampaign now.
                tracing::warn!(source = %id, "api sync lease lost mid-run; stopping here");
                continue;
            }
        };
        let now = Utc::now();
        let next = now + chrono::Duration::minutes(i64::from(api.poll_minutes));
        match outcome {
            Ok(()) => {
                metrics::counter!("tributary_activecampaign_sync_runs_total", "outcome" => "finished")
                    .increment(1);
                let started = stored.run.take().map(|r| r.started_at);
                stored.polled_from = started.or(stored.polled_from);
                stored.status.state = SyncState::Idle;
                stored.status.finished_at = Some(now);
                stored.status.next_poll_at = Some(next);
                stored.status.error = None;
                tracing::info!(source = %id, events = stored.status.events, "api sync finished");
            }
            Err(Stop::Failed(msg)) => {
                metrics::counter!("tributary_activecampaign_sync_runs_total", "outcome" => "failed")
                    .increment(1);
                tracing::warn!(source = %id, error = %msg, "api sync failed; it resumes at the next poll");
                stored.status.state = SyncState::Failed;
                stored.status.error = Some(msg);
                stored.status.next_poll_at = Some(next);
            }
            Err(Stop::Gone) => return,
        }
        if let Err(e) = save_async(&state.control, &id, &stored).await {
            tracing::warn!(source = %id, error = %e, "cannot write the sync state");
        }
    }
}

/// Runs `stored.run` from its position to the end, checkpointing after each page.
async fn execute(
    state: &Arc<AppState>,
    id: &str,
    api: &ApiSettings,
    stored: &mut Stored,
) -> Result<(), Stop> {
    let client = Client::new(&api.url, &api.key, REQUEST_TIMEOUT)?;
    let configured = api
        .utc_offset
        .as_deref()
        .and_then(AccountZone::parse_offset);
    if stored.run.as_ref().is_some_and(|r| r.campaigns.is_none()) {
        list_campaigns(&client, configured, stored).await?;
        save_async(&state.control, id, stored).await?;
    }
    loop {
        let Some(run) = stored.run.as_mut() else {
            return Ok(());
        };
        let zone = configured.unwrap_or_else(|| {
            run.zone_secs
                .and_then(FixedOffset::east_opt)
                .map(AccountZone)
                .unwrap_or_default()
        });
        let campaigns = run.campaigns.as_mut().ok_or(Stop::Gone)?;
        let pos = run.position;
        let Some(campaign) = campaigns.get_mut(pos.campaign) else {
            return Ok(());
        };
        if campaign.message_id.is_none() {
            describe(&client, campaign).await?;
        }
        let campaign = campaign.clone();
        let mut bounced: HashSet<String> = HashSet::new();
        if pos.report > 0 {
            // Resuming past the bounce list: read it again (no appends) so deliveries
            // still exclude every bounced recipient.
            read_bounces(&client, &campaign.id, &mut bounced).await?;
        }
        for (ri, report) in Report::ALL.iter().enumerate().skip(pos.report) {
            let first = if ri == pos.report { pos.page.max(1) } else { 1 };
            for page in first..=MAX_PAGES {
                let rows = match client.v1_report(report.action(), &campaign.id, page).await {
                    Ok(p) if p.done => break,
                    Ok(p) => p.rows,
                    // Forwards are optional: an account without the action ends it.
                    Err(e) if *report == Report::Forwards && !e.is_retriable() => {
                        tracing::debug!(error = %e, "no forward list; skipped");
                        break;
                    }
                    Err(e) => return Err(e.into()),
                };
                if *report == Report::Bounces {
                    bounced.extend(bounced_emails(&rows));
                }
                let activities = report.activities(&rows, &campaign, &zone, &bounced);
                store(state, id, activities, stored).await?;
                if let Some(run) = stored.run.as_mut() {
                    run.position = Position {
                        campaign: pos.campaign,
                        report: ri,
                        page: page + 1,
                    };
                }
                save_async(&state.control, id, stored).await?;
            }
            if let Some(run) = stored.run.as_mut() {
                run.position = Position {
                    campaign: pos.campaign,
                    report: ri + 1,
                    page: 1,
                };
            }
        }
        if let Some(run) = stored.run.as_mut() {
            run.position = Position {
                campaign: pos.campaign + 1,
                report: 0,
                page: 1,
            };
        }
        stored.status.campaigns_done = (pos.campaign + 1) as u64;
        save_async(&state.control, id, stored).await?;
    }
}

/// Lists the account's campaigns (every v3 page) and keeps those of the run's window,
/// oldest send first; learns the account's offset.
async fn list_campaigns(
    client: &Client,
    configured: Option<AccountZone>,
    stored: &mut Stored,
) -> Result<(), Stop> {
    let mut all = Vec::new();
    let mut offset = 0usize;
    loop {
        let page = client.campaigns(offset).await?;
        let n = page.items.len();
        all.extend(page.items);
        offset += n;
        if n == 0 || offset as u64 >= page.total {
            break;
        }
    }
    let zone = configured
        .or_else(|| AccountZone::learn(&all))
        .unwrap_or_default();
    let run = stored.run.as_mut().ok_or(Stop::Gone)?;
    let since = run.since;
    let mut campaigns: Vec<CampaignInfo> = all
        .iter()
        .filter_map(|c| CampaignInfo::from_v3(c, &zone))
        .filter(|c| {
            let when = if run.poll { c.changed_at } else { c.sent_at };
            c.sent_at.is_some() && when.is_some_and(|t| t >= since)
        })
        .collect();
    campaigns.sort_by(|a, b| a.sent_at.cmp(&b.sent_at).then(a.id.cmp(&b.id)));
    run.zone_secs = Some(zone.0.local_minus_utc());
    stored.status.campaigns_total = campaigns.len() as u64;
    stored.status.campaigns_done = 0;
    run.campaigns = Some(campaigns);
    Ok(())
}

/// The campaign's message id (from its links) and subject (from the message).
async fn describe(client: &Client, campaign: &mut CampaignInfo) -> Result<(), Stop> {
    let links = match client.campaign_links(&campaign.id).await {
        Ok(l) => l,
        // A campaign whose links cannot be read (gone, or a shape we do not know)
        // still has its reports: its events go without a subject.
        Err(e @ (AcError::Status { .. } | AcError::BadResponse { .. })) if !e.is_retriable() => {
            tracing::debug!(error = %e, "campaign links unreadable; no subject");
            Vec::new()
        }
        Err(e) => return Err(e.into()),
    };
    let message_id = links.iter().find_map(|l| match l.get("messageid") {
        Some(serde_json::Value::String(s)) if !s.trim().is_empty() && s.trim() != "0" => {
            Some(s.trim().to_owned())
        }
        Some(serde_json::Value::Number(n)) => Some(n.to_string()),
        _ => None,
    });
    if let Some(mid) = &message_id {
        match client.message(mid).await {
            Ok(m) => {
                campaign.subject = m
                    .get("subject")
                    .and_then(serde_json::Value::as_str)
                    .map(str::trim)
                    .filter(|s| !s.is_empty())
                    .map(str::to_owned);
            }
            Err(e) if !e.is_retriable() => {
                tracing::debug!(error = %e, "campaign message unreadable; no subject");
            }
            Err(e) => return Err(e.into()),
        }
    }
    // An empty id marks "looked up, none found", so a resume does not ask again.
    campaign.message_id = Some(message_id.unwrap_or_default());
    Ok(())
}

async fn read_bounces(
    client: &Client,
    campaign_id: &str,
    into: &mut HashSet<String>,
) -> Result<(), Stop> {
    for page in 1..=MAX_PAGES {
        let p = client
            .v1_report(Report::Bounces.action(), campaign_id, page)
            .await?;
        if p.done {
            break;
        }
        into.extend(bounced_emails(&p.rows));
    }
    Ok(())
}

/// Maps, prepares and durably appends one page's activities; counts what was new.
async fn store(
    state: &Arc<AppState>,
    id: &str,
    activities: Vec<tributary_activecampaign::Activity>,
    stored: &mut Stored,
) -> Result<(), Stop> {
    if activities.is_empty() {
        return Ok(());
    }
    let source = state.control.source(id).ok_or(Stop::Gone)?;
    if !source.enabled {
        // As a webhook gets 403: a disabled source takes no events, from any path.
        return Err(Stop::Failed(
            "the source is disabled: enable it, then sync again".into(),
        ));
    }
    let settings: Settings = serde_json::from_value(source.settings.clone()).unwrap_or_default();
    let now = state.clock.now();
    let mut normalized = Vec::with_capacity(activities.len());
    let mut names = Vec::with_capacity(activities.len());
    for a in &activities {
        // Rows naming no recipient at all cannot be an event of anyone: skipped.
        let Ok(w) = map_activity(a, &settings) else {
            continue;
        };
        let (message, email) = match w.mapped {
            tributary_activecampaign::Mapped::Track { message, email } => (message, email),
            _ => continue,
        };
        match crate::webhook::prepare(state, message, email.as_deref(), now) {
            Ok(n) => {
                names.push(n.event.clone().unwrap_or_default());
                normalized.push(n);
            }
            Err(e) => tracing::debug!(error = %e, "api activity refused by normalization"),
        }
    }
    let Some(last) = normalized.last() else {
        return Ok(());
    };
    let last_event = LastEvent {
        event: last.event.clone(),
        kind: "api".into(),
        received_at: tributary_model::normalize::format_ts(now),
        message_id: last.message_id.clone(),
    };
    let appended = crate::accept::append(state, &source, normalized, Some(last_event)).await?;
    stored.status.events += appended.stored as u64;
    for (name, new) in names.iter().zip(&appended.new) {
        if *new {
            *stored
                .status
                .events_by_type
                .entry(name.clone())
                .or_default() += 1;
            metrics::counter!("tributary_activecampaign_sync_events_total", "event" => metric_label(name))
                .increment(1);
        }
    }
    Ok(())
}

fn metric_label(event: &str) -> &'static str {
    match event {
        "Email Delivered" => "email_delivered",
        "Email Opened" => "email_opened",
        "Email Link Clicked" => "email_link_clicked",
        "Email Bounced" => "email_bounced",
        "Email Unsubscribed" => "email_unsubscribed",
        "Email Marked as Spam" => "email_marked_as_spam",
        "Email Forwarded" => "email_forwarded",
        _ => "other",
    }
}
