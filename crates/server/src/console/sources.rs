//! Source pages: the list, "Add source" (type cards, nickname, schema name checked
//! as you type by the server's own rule), a source's Overview (write key and
//! webhook URL with copy buttons, the ActiveCampaign steps, waiting/receiving, the
//! Last event box, enable/disable, re-issue key, delete). Forms post to their page's
//! path; creation, patching and key rotation go through `Control` with the admin
//! API's checks.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use maud::{Markup, html};
use serde::Deserialize;
use serde_json::{Value, json};

use super::layout::{self, Field, Nav, ago, badge};
use super::session::{Form, Signed, check_form};
use super::{error_page, html, see_other};
use crate::AppState;
use crate::control::{LastEvent, Source, SourceType};
use crate::error::ApiError;

/// Newest events read to count "events today" when there is no warehouse (the list
/// shows "100+" past it).
const TODAY_SAMPLE: usize = 100;

fn type_label(kind: SourceType) -> &'static str {
    match kind {
        SourceType::Activecampaign => "ActiveCampaign",
        SourceType::Http => "HTTP (Segment format)",
    }
}

/// "open · 2 minutes ago", or `None` before the first event.
fn last_event_text(last: Option<&LastEvent>, now: chrono::DateTime<chrono::Utc>) -> Option<String> {
    let l = last?;
    let what = l.event.clone().unwrap_or_else(|| l.kind.clone());
    let at = chrono::DateTime::parse_from_rfc3339(&l.received_at)
        .map(|t| ago(t.with_timezone(&chrono::Utc), now))
        .unwrap_or_else(|_| l.received_at.clone());
    Some(format!("{what} · {at}"))
}

/// (badge kind, text) of a source's status.
fn status_of(s: &Source, last: Option<&LastEvent>) -> (&'static str, &'static str) {
    if !s.enabled {
        ("bad", "Disabled")
    } else if last.is_some() {
        ("ok", "Receiving")
    } else {
        ("idle", "Waiting for the first event")
    }
}

/// "Events today" of every source: the warehouse loader's per-day counter of the
/// source's schema (exact as of the last load, about a second behind ingest; kept
/// by the loader so ingest pays nothing). Without a warehouse, or for a schema whose
/// counters are not built yet, the newest [`TODAY_SAMPLE`] log records are counted.
async fn events_today(state: &AppState, sources: &[Arc<Source>]) -> Vec<String> {
    let today = state.clock.now().date_naive();
    let counted = match state.warehouse.as_ref() {
        Some(w) => w.events_on(today).await.unwrap_or_default(),
        None => Default::default(),
    };
    let start = today
        .and_hms_opt(0, 0, 0)
        .map(|t| t.and_utc().timestamp_millis())
        .unwrap_or(0);
    futures::future::join_all(sources.iter().map(|s| {
        let counted = counted.get(&s.schema).copied();
        async move {
            if let Some(n) = counted {
                return n.to_string();
            }
            match state.log.latest(&s.id, TODAY_SAMPLE).await {
                Ok(records) => {
                    let n = records.iter().filter(|r| r.received_at_ms >= start).count();
                    if n >= TODAY_SAMPLE {
                        format!("{TODAY_SAMPLE}+")
                    } else {
                        n.to_string()
                    }
                }
                Err(_) => "unknown".to_string(),
            }
        }
    }))
    .await
}

/// `GET /`: the sources (signing in first when needed).
pub(crate) async fn home(state: State<Arc<AppState>>, signed: Signed) -> Response {
    list(state, signed).await
}

/// `GET /sources`.
pub(crate) async fn list(State(state): State<Arc<AppState>>, signed: Signed) -> Response {
    let sources = state.control.sources();
    let now = state.clock.now();
    let counts = events_today(&state, &sources).await;
    let body = html! {
        h1 { "Sources" }
        p.actions { a.button.primary href="/sources/new" { "Add source" } }
        @if sources.is_empty() {
            p { "No sources yet. Add one to get a write key and a webhook URL." }
        } @else {
            div.table-wrap tabindex="0" role="region" aria-label="Table, scrolls sideways on narrow screens" {
                table {
                    caption { (sources.len()) " sources" }
                    thead { tr {
                        th scope="col" { "Name" } th scope="col" { "Type" }
                        th scope="col" { "Schema" } th scope="col" { "Status" }
                        th scope="col" { "Last event" } th.num scope="col" { "Events today" }
                    } }
                    tbody {
                        @for (s, today) in sources.iter().zip(counts.iter()) {
                            @let last = state.control.last_event(&s.id);
                            @let (k, t) = status_of(s, last.as_ref());
                            tr {
                                th scope="row" { a href={ "/sources/" (s.id) } { (s.name) } }
                                td { (type_label(s.kind)) }
                                td { code { (s.schema) } }
                                td { (badge(k, t)) }
                                td { (last_event_text(last.as_ref(), now).unwrap_or_else(|| "none yet".into())) }
                                td.num { (today) }
                            }
                        }
                    }
                }
            }
        }
    };
    html(
        StatusCode::OK,
        layout::page(Some(&signed), Nav::Sources, "Sources", body),
    )
}

#[derive(Deserialize, Default)]
pub(crate) struct NewQuery {
    #[serde(default, rename = "type")]
    kind: String,
}

struct NewForm<'a> {
    kind: &'a str,
    name: &'a str,
    schema: &'a str,
    name_error: Option<String>,
    schema_error: Option<String>,
    type_error: Option<String>,
}

fn suggested_schema(kind: &str) -> &'static str {
    if kind == "http" {
        "website"
    } else {
        "activecampaign"
    }
}

fn new_form(signed: &Signed, f: &NewForm) -> Markup {
    let mut errors = Vec::new();
    if let Some(e) = &f.type_error {
        errors.push(("type-activecampaign", e.clone()));
    }
    if let Some(e) = &f.name_error {
        errors.push(("name", e.clone()));
    }
    if let Some(e) = &f.schema_error {
        errors.push(("schema", e.clone()));
    }
    let mut name = Field::text("name", "Nickname", f.name);
    name.hint = Some("Shown in the console, e.g. \"Newsletter account\".");
    name.error = f.name_error.as_deref();
    let schema_hint = format!(
        "The warehouse schema its tables go into: lowercase letters, digits and _, \
         starting with a letter or _. Recommended: {}.",
        suggested_schema(f.kind)
    );
    let types = [
        (
            "activecampaign",
            "ActiveCampaign",
            "Email events from ActiveCampaign webhooks and its Segment-format stream.",
        ),
        (
            "http",
            "HTTP (Segment format)",
            "Any Segment or RudderStack SDK, or curl, sending track, identify and page calls.",
        ),
    ];
    html! {
        h1 { "Add source" }
        (layout::error_summary(&errors))
        form method="post" action="/sources" novalidate {
            input type="hidden" name="csrf" value=(signed.csrf);
            fieldset aria-describedby="type-error" {
                legend { "Source type" }
                div.cards {
                    @for (value, label, about) in types {
                        div.card.choice {
                            input type="radio" name="type" id={ "type-" (value) } value=(value)
                                data-schema=(suggested_schema(value))
                                checked[f.kind == value];
                            label for={ "type-" (value) } { strong { (label) } (about) }
                        }
                    }
                }
                p.error id="type-error" { @if let Some(e) = &f.type_error { (e) } }
            }
            (name.render())
            div.field {
                label for="schema" { "Schema name" }
                p.hint id="schema-hint" { (schema_hint) }
                input id="schema" name="schema" type="text" value=(f.schema) required
                    autocomplete="off" spellcheck="false" data-check="/sources/new/check"
                    aria-invalid=[f.schema_error.as_ref().map(|_| "true")]
                    aria-describedby="schema-hint schema-error";
                p.error id="schema-error" aria-live="polite" {
                    @if let Some(e) = &f.schema_error { (e) }
                }
            }
            button.primary type="submit" { "Create source" }
        }
    }
}

/// `GET /sources/new[?type=activecampaign|http]`.
pub(crate) async fn new_page(signed: Signed, Query(q): Query<NewQuery>) -> Response {
    let kind = if q.kind == "http" {
        "http"
    } else {
        "activecampaign"
    };
    let f = NewForm {
        kind,
        name: "",
        schema: suggested_schema(kind),
        name_error: None,
        schema_error: None,
        type_error: None,
    };
    html(
        StatusCode::OK,
        layout::page(
            Some(&signed),
            Nav::Sources,
            "Add source",
            new_form(&signed, &f),
        ),
    )
}

/// The schema rule the form applies: the server's `validate_schema`, and not taken.
fn schema_problem(state: &AppState, schema: &str) -> Option<String> {
    if let Err(e) = crate::control::validate_schema(schema) {
        return Some(e.to_string());
    }
    if let Some(other) = state.control.sources().iter().find(|s| s.schema == schema) {
        return Some(format!(
            "The schema {schema:?} is already used by the source {:?}.",
            other.name
        ));
    }
    None
}

#[derive(Deserialize)]
pub(crate) struct CheckQuery {
    #[serde(default)]
    schema: String,
}

/// `GET /sources/new/check?schema=…` → `{"ok":bool,"message":…}` (live validation).
pub(crate) async fn check_schema(
    State(state): State<Arc<AppState>>,
    _signed: Signed,
    Query(q): Query<CheckQuery>,
) -> Response {
    match schema_problem(&state, &q.schema) {
        None => axum::Json(json!({"ok": true})).into_response(),
        Some(m) => axum::Json(json!({"ok": false, "message": m})).into_response(),
    }
}

/// `POST /sources`: creates a source, then shows its Overview.
pub(crate) async fn create(
    State(state): State<Arc<AppState>>,
    signed: Signed,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let form = Form::parse(&body);
    if let Err(r) = check_form(&headers, &signed, &form) {
        return r.into_response();
    }
    let (kind_s, name, schema) = (
        form.get("type"),
        form.get("name"),
        form.get("schema").trim(),
    );
    let kind = match kind_s {
        "activecampaign" => Some(SourceType::Activecampaign),
        "http" => Some(SourceType::Http),
        _ => None,
    };
    let mut f = NewForm {
        kind: kind_s,
        name,
        schema,
        name_error: crate::admin::check_name(name).err().map(|e| e.to_string()),
        schema_error: schema_problem(&state, schema),
        type_error: kind.is_none().then(|| "Choose a source type.".to_string()),
    };
    if let (Some(kind), None, None) = (kind, &f.name_error, &f.schema_error) {
        match state.control.create(kind, name.trim(), schema, json!({})) {
            Ok(s) => {
                tracing::info!(source = %s.id, schema = %s.schema, "source created in the console");
                return see_other(&format!("/sources/{}?created=1", s.id));
            }
            Err(ApiError::Conflict(m)) => f.schema_error = Some(m),
            Err(e) => return error_page(&signed, e),
        }
    }
    let status = if f
        .schema_error
        .as_deref()
        .is_some_and(|m| m.contains("already used"))
    {
        StatusCode::CONFLICT
    } else {
        StatusCode::BAD_REQUEST
    };
    html(
        status,
        layout::page(
            Some(&signed),
            Nav::Sources,
            "Add source: fix the form",
            new_form(&signed, &f),
        ),
    )
}

fn find(state: &AppState, id: &str) -> Result<Arc<Source>, ApiError> {
    state
        .control
        .source(id)
        .ok_or_else(|| ApiError::NotFound(format!("There is no source with the id {id:?}.")))
}

#[derive(Deserialize, Default)]
pub(crate) struct OverviewQuery {
    #[serde(default)]
    created: Option<String>,
    #[serde(default)]
    done: Option<String>,
}

fn copy_box(id: &str, label: &str, value: &str, hint: Option<&str>) -> Markup {
    let hint_id = format!("{id}-hint");
    html! {
        div.field {
            label for=(id) { (label) }
            @if let Some(h) = hint { p.hint id=(hint_id) { (h) } }
            div.copy-row {
                input id=(id) type="text" readonly value=(value) spellcheck="false"
                    aria-describedby=[hint.map(|_| hint_id.as_str())];
                button type="button" data-copy=(id) hidden { "Copy " (label.to_lowercase()) }
            }
            p.hint id={ (id) "-copied" } role="status" {}
        }
    }
}

/// `GET /sources/{id}`: the Overview.
pub(crate) async fn overview(
    State(state): State<Arc<AppState>>,
    signed: Signed,
    Path(id): Path<String>,
    Query(q): Query<OverviewQuery>,
) -> Response {
    let s = match find(&state, &id) {
        Ok(s) => s,
        Err(e) => return error_page(&signed, e),
    };
    let public = state.config.public_url();
    let last = state.control.last_event(&s.id);
    let (k, t) = status_of(&s, last.as_ref());
    let webhook = format!(
        "{public}/v1/webhooks/activecampaign?writeKey={}",
        s.write_key
    );
    let test_cmd = format!(
        "curl -u '{}:' -H 'Content-Type: application/json' -d '{{\"userId\":\"test-user\",\"event\":\"Test Event\"}}' {public}/v1/track",
        s.write_key
    );
    let notice = match (q.created.is_some(), q.done.as_deref()) {
        (true, _) => Some("The source was created. Its write key and URLs are below."),
        (_, Some("rotated")) => Some("A new write key was issued. The old key no longer works."),
        (_, Some("enabled")) => Some("The source is enabled: it accepts events again."),
        (_, Some("disabled")) => Some("The source is disabled: its write key is refused (403)."),
        (_, Some("sync_started")) => {
            Some("The API backfill started. Its progress is below; reload to follow it.")
        }
        _ => None,
    };
    let last_text = last_event_text(last.as_ref(), state.clock.now());
    let sync_status = if s.settings.get("api").is_some() {
        let control = state.control.clone();
        let sid = s.id.clone();
        tokio::task::spawn_blocking(move || crate::sync::status_of(&control, &sid))
            .await
            .ok()
            .and_then(Result::ok)
    } else {
        None
    };
    let body = html! {
        h1 { (s.name) }
        @if let Some(n) = notice { p.notice role="status" { (n) } }
        div data-poll-scope {
            dl.facts {
                dt { "Type" } dd { (type_label(s.kind)) }
                dt { "Schema" } dd { code { (s.schema) } }
                dt { "Status" } dd {
                    (layout::badge_field(k, t, Some("status")))
                }
            }
            section.card.last-event aria-labelledby="last-event-h" data-poll={ "/sources/" (s.id) "/last-event" } {
                h2 #last-event-h { "Last event" }
                p aria-live="polite" data-field="last_event" {
                    (last_text.clone().unwrap_or_else(|| "Waiting for the first event…".into()))
                }
            }
        }
        p.actions {
            a href={ "/sources/" (s.id) "/debugger" } { "Open the debugger" }
            a href={ "/reports/email?source=" (s.id) } { "Email report" }
        }
        section aria-labelledby="connect-h" {
            h2 #connect-h { "Connect" }
            (copy_box("write-key", "Write key", &s.write_key, Some("Send it as HTTP Basic user name (no password), or writeKey in the body.")))
            @if s.kind == SourceType::Activecampaign {
                (copy_box("webhook-url", "Webhook URL", &webhook, Some("Paste this into ActiveCampaign's webhook form.")))
            }
            (copy_box("segment-endpoint", "Segment-format endpoint", &format!("{public}/v1/batch"),
                Some("For Segment SDKs and ActiveCampaign's Segment-format stream: host and write key above.")))
            div.field {
                label for="test-command" { "Test command" }
                div.copy-row {
                    input id="test-command" type="text" readonly value=(test_cmd) spellcheck="false";
                    button type="button" data-copy="test-command" hidden { "Copy test command" }
                }
                p.hint id="test-command-copied" role="status" {}
            }
        }
        @if s.kind == SourceType::Activecampaign {
            section aria-labelledby="ac-steps-h" {
                h2 #ac-steps-h { "Set up ActiveCampaign" }
                ol {
                    li { "In ActiveCampaign, open " strong { "Settings → Developer → Webhooks" } " and choose " strong { "Add" } "." }
                    li { "Name it, e.g. Tributary, and paste the " strong { "Webhook URL" } " above into the URL field." }
                    li { "Tick the events: Opens, Clicks, Bounces, Unsubscribes, Replies, Forwards, Shares, Subscribes, Contact updates." }
                    li { "Tick every initiator (contact, admin, API, system) and save." }
                    li { "Open or click a campaign email: the Last event box above changes within seconds." }
                }
                p { "ActiveCampaign sends webhooks only to port 443 over HTTPS: put Tributary behind a TLS proxy and set TRIBUTARY_PUBLIC_URL." }
                @if let Some(api) = s.settings.get("api") {
                    h3 { "API sync" }
                    dl.facts {
                        dt { "API URL" } dd { (api.get("url").and_then(Value::as_str).unwrap_or("")) }
                        dt { "Polls every" } dd { (api.get("poll_minutes").and_then(Value::as_u64).unwrap_or(15)) " minutes" }
                        @if let Some(st) = &sync_status {
                            dt { "State" } dd data-field="sync_state" { (sync_state_text(st)) }
                            dt { "Campaigns" } dd { (st.campaigns_done) " of " (st.campaigns_total) " read" }
                            dt { "Events stored" } dd { (st.events) }
                            @if let Some(f) = st.finished_at { dt { "Last run finished" } dd { (f.format("%Y-%m-%d %H:%M UTC")) } }
                            @if let Some(n) = st.next_poll_at { dt { "Next poll" } dd { (n.format("%Y-%m-%d %H:%M UTC")) } }
                            @if let Some(e) = &st.error { dt { "Last error" } dd.error { (e) } }
                        }
                    }
                    form method="post" action={ "/sources/" (s.id) } {
                        input type="hidden" name="csrf" value=(signed.csrf);
                        input type="hidden" name="action" value="sync";
                        div.field {
                            label for="sync-since" { "Backfill since (optional; default 60 days ago)" }
                            input id="sync-since" name="since" type="date" aria-describedby="sync-since-hint";
                            p.hint id="sync-since-hint" { "Reads every campaign sent since then: Delivered for each recipient without a bounce, opens, clicks, bounces, unsubscribes." }
                        }
                        button type="submit" { "Start backfill" }
                    }
                }
            }
        }
        section aria-labelledby="manage-h" {
            h2 #manage-h { "Manage" }
            form.inline method="post" action={ "/sources/" (s.id) } {
                input type="hidden" name="csrf" value=(signed.csrf);
                @if s.enabled {
                    input type="hidden" name="action" value="disable";
                    button type="submit" { "Disable source" }
                } @else {
                    input type="hidden" name="action" value="enable";
                    button type="submit" { "Enable source" }
                }
            }
            details {
                summary { "Re-issue write key…" }
                form method="post" action={ "/sources/" (s.id) } {
                    input type="hidden" name="csrf" value=(signed.csrf);
                    input type="hidden" name="action" value="rotate";
                    p { "The current key stops working at once: every SDK and the ActiveCampaign webhook must get the new key and URL." }
                    button.danger type="submit" { "Yes, re-issue the write key" }
                }
            }
            details {
                summary { "Delete source…" }
                form method="post" action={ "/sources/" (s.id) } {
                    input type="hidden" name="csrf" value=(signed.csrf);
                    input type="hidden" name="action" value="delete";
                    p { "Its write key stops working. Loaded warehouse tables stay." }
                    button.danger type="submit" { "Yes, delete " (s.name) }
                }
            }
        }
    };
    html(
        StatusCode::OK,
        layout::page(
            Some(&signed),
            Nav::Sources,
            &format!("{} — overview", s.name),
            body,
        ),
    )
}

/// `GET /sources/{id}/last-event` → `{last_event, status}` for the Overview's box.
pub(crate) async fn last_event_json(
    State(state): State<Arc<AppState>>,
    _signed: Signed,
    Path(id): Path<String>,
) -> Response {
    let Some(s) = state.control.source(&id) else {
        return ApiError::NotFound(format!("no source with id {id:?}")).into_response();
    };
    let last = state.control.last_event(&s.id);
    let (k, t) = status_of(&s, last.as_ref());
    axum::Json(json!({
        "last_event": last_event_text(last.as_ref(), state.clock.now())
            .unwrap_or_else(|| "Waiting for the first event…".into()),
        "status": t,
        "status_class": format!("badge badge-{k}"),
        "status_symbol": format!("{} ", layout::symbol(k)),
        "raw": last,
    }))
    .into_response()
}

/// `POST /sources/{id}`: `action=enable|disable|rotate|delete`.
pub(crate) async fn action(
    State(state): State<Arc<AppState>>,
    signed: Signed,
    headers: HeaderMap,
    Path(id): Path<String>,
    body: Bytes,
) -> Response {
    let form = Form::parse(&body);
    if let Err(r) = check_form(&headers, &signed, &form) {
        return r.into_response();
    }
    let done = match form.get("action") {
        "enable" => state
            .control
            .patch(&id, None, Some(true), None)
            .map(|_| "enabled"),
        "disable" => state
            .control
            .patch(&id, None, Some(false), None)
            .map(|_| "disabled"),
        "rotate" => state.control.rotate_key(&id).map(|s| {
            tracing::info!(source = %s.id, "write key re-issued in the console");
            "rotated"
        }),
        "sync" => {
            let since = Some(form.get("since")).filter(|v| !v.trim().is_empty());
            crate::sync::begin(&state, &id, since)
                .await
                .map(|_| "sync_started")
        }
        "delete" => {
            return match state.control.delete(&id) {
                Ok(()) => see_other("/sources"),
                Err(e) => error_page(&signed, e),
            };
        }
        other => Err(ApiError::bad(
            "invalid_action",
            format!("unknown action {other:?}"),
        )),
    };
    match done {
        Ok(d) => see_other(&format!("/sources/{id}?done={d}")),
        Err(e) => error_page(&signed, e),
    }
}

/// A sync state in words (never by colour alone).
fn sync_state_text(st: &crate::sync::SyncStatus) -> &'static str {
    match st.state {
        crate::sync::SyncState::Idle if st.finished_at.is_none() => "Not run yet",
        crate::sync::SyncState::Idle => "Idle (polling)",
        crate::sync::SyncState::Running => "Running",
        crate::sync::SyncState::Failed => "Failed",
    }
}
