//! The debugger of one source: the newest stored events (server-rendered, filtered,
//! each row expanding to its normalized JSON; works without JavaScript), a live
//! feed over server-sent events on top of [`crate::live`] (accepted, rejected with
//! their reason, unmapped ActiveCampaign types; Pause with an "N new" counter;
//! resume with `Last-Event-ID`), and for any one event its **fate** from
//! [`crate::fate`]: stored at which seq, loaded into which table or discarded and
//! why, and what each destination did with it.
//!
//! The stream needs a console session (the cookie); `/api/v1` has its own stream
//! with bearer auth. Nothing here writes: a watcher costs ingest one cheap check
//! when nobody watches (see `live`).

use std::sync::Arc;

use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use maud::{Markup, html};
use serde::Deserialize;
use serde_json::Value;

use super::layout::{self, Nav, badge, when};
use super::session::Signed;
use super::{error_page, html};
use crate::AppState;
use crate::error::ApiError;

/// Stored events the page shows before the live feed starts.
const RECENT: usize = 50;

const CALL_TYPES: [&str; 6] = ["track", "identify", "page", "screen", "group", "alias"];

/// The filters (a GET form: they work without JavaScript and are kept in the URL).
#[derive(Deserialize, Default)]
pub(crate) struct Filters {
    #[serde(default)]
    event: String,
    #[serde(default, rename = "type")]
    call_type: String,
    #[serde(default)]
    who: String,
    #[serde(default)]
    status: String,
}

/// One row of the feed, from a stored event or an unmapped webhook.
struct Row {
    status: &'static str,
    at: String,
    call_type: String,
    event: String,
    who: String,
    message_id: String,
    reason: Option<String>,
    json: String,
}

fn s(v: &Value, k: &str) -> String {
    v.get(k).and_then(Value::as_str).unwrap_or("").to_string()
}

fn row_of(v: &Value) -> Row {
    let unmapped = v.get("type").and_then(Value::as_str) == Some("unmapped");
    let email = v
        .pointer("/context/traits/email")
        .or_else(|| v.pointer("/traits/email"))
        .and_then(Value::as_str)
        .unwrap_or("");
    let user = s(v, "userId");
    let anon = s(v, "anonymousId");
    let who = [user.as_str(), email, anon.as_str()]
        .into_iter()
        .filter(|x| !x.is_empty())
        .collect::<Vec<_>>()
        .join(" · ");
    let event = if unmapped {
        s(v, "activecampaign_type")
    } else {
        let e = s(v, "event");
        if e.is_empty() { s(v, "name") } else { e }
    };
    Row {
        status: if unmapped { "unmapped" } else { "accepted" },
        at: s(v, "receivedAt"),
        call_type: if unmapped {
            "webhook".into()
        } else {
            s(v, "type")
        },
        event,
        who,
        message_id: s(v, "messageId"),
        reason: unmapped.then(|| {
            "ActiveCampaign webhook type Tributary does not map (acknowledged, not stored)".into()
        }),
        json: serde_json::to_string_pretty(v).unwrap_or_default(),
    }
}

fn keep(r: &Row, f: &Filters) -> bool {
    let has = |hay: &str, needle: &str| {
        needle.is_empty() || hay.to_lowercase().contains(&needle.to_lowercase())
    };
    has(&r.event, &f.event)
        && (f.call_type.is_empty() || r.call_type == f.call_type)
        && (f.who.is_empty() || has(&r.who, &f.who) || has(&r.message_id, &f.who))
        && (f.status.is_empty() || r.status == f.status)
}

fn status_badge(status: &str) -> Markup {
    match status {
        "accepted" => badge("ok", "accepted"),
        "rejected" => badge("bad", "rejected"),
        _ => badge("warn", status),
    }
}

fn select(id: &str, label: &str, current: &str, options: &[(&str, &str)]) -> Markup {
    html! {
        div.field {
            label for=(id) { (label) }
            select id=(id) name=(id) {
                @for (v, l) in options { option value=(v) selected[*v == current] { (l) } }
            }
        }
    }
}

/// `GET /sources/{id}/debugger`.
pub(crate) async fn page(
    State(state): State<Arc<AppState>>,
    signed: Signed,
    Path(id): Path<String>,
    Query(f): Query<Filters>,
) -> Response {
    let Some(src) = state.control.source(&id) else {
        return error_page(
            &signed,
            ApiError::NotFound(format!("There is no source with the id {id:?}.")),
        );
    };
    let records = match state.log.latest(&id, RECENT).await {
        Ok(r) => r,
        Err(e) => return error_page(&signed, ApiError::from(e)),
    };
    let mut values: Vec<Value> = records
        .iter()
        .filter_map(|r| serde_json::from_str(&r.payload).ok())
        .collect();
    values.extend(crate::webhook::unmapped_for(&state, &id).unwrap_or_default());
    values.sort_by_key(|v| std::cmp::Reverse(s(v, "receivedAt")));
    values.truncate(RECENT);
    let rows: Vec<Row> = values.iter().map(row_of).filter(|r| keep(r, &f)).collect();
    let mut types: Vec<(&str, &str)> = vec![("", "Any type")];
    types.extend(CALL_TYPES.iter().map(|t| (*t, *t)));
    types.push(("webhook", "webhook (unmapped)"));
    let body = html! {
        h1 { (src.name) " — debugger" }
        p { a href={ "/sources/" (src.id) } { "Back to the overview" } }
        form.filters method="get" action={ "/sources/" (src.id) "/debugger" } role="search" aria-label="Filter events" {
            div.field { label for="event" { "Event name" } input #event type="search" name="event" value=(f.event); }
            (select("type", "Type", &f.call_type, &types))
            div.field { label for="who" { "userId, email or messageId" } input #who type="search" name="who" value=(f.who); }
            (select("status", "Status", &f.status, &[("", "Any status"), ("accepted", "accepted"), ("rejected", "rejected"), ("unmapped", "unmapped")]))
            button type="submit" { "Filter" }
        }
        section #live aria-labelledby="live-h"
            data-stream={ "/sources/" (src.id) "/debugger/stream" }
            data-fate={ "/sources/" (src.id) "/debugger/fate" } {
            h2 #live-h { "Events" }
            p.no-js { "The live feed needs JavaScript; below are the newest stored events. Reload for newer ones." }
            div.actions.js-only {
                button #pause type="button" aria-pressed="false" { "Pause" }
                span #live-state role="status" aria-live="polite" { "Connecting…" }
                span #new-count role="status" aria-live="polite" {}
                span #skipped-count role="status" aria-live="polite" {}
            }
            p.hint { "Rejected messages appear in the live feed only: they were never stored." }
            div.table-wrap tabindex="0" role="region" aria-label="Table, scrolls sideways on narrow screens" {
                table #feed {
                    caption.visually-hidden { "Events, newest first" }
                    thead { tr {
                        th scope="col" { "Received" } th scope="col" { "Status" } th scope="col" { "Type" }
                        th scope="col" { "Event" } th scope="col" { "Who" } th scope="col" { "Details" }
                    } }
                    tbody {
                        @for r in &rows { (feed_row(&src.id, r)) }
                    }
                }
            }
            @if rows.is_empty() { p #feed-empty { "No events yet match." } }
        }
    };
    html(
        StatusCode::OK,
        layout::page(
            Some(&signed),
            Nav::Sources,
            &format!("{} — debugger", src.name),
            body,
        ),
    )
}

fn feed_row(source_id: &str, r: &Row) -> Markup {
    html! {
        tr.feed-row data-status=(r.status) data-type=(r.call_type) data-mid=(r.message_id)
            data-event=(r.event) data-who={ (r.who) " " (r.message_id) } {
            td { (when(&r.at)) }
            td { (status_badge(r.status)) }
            td { (r.call_type) }
            td { (r.event) }
            td { (r.who) }
            td {
                @if let Some(reason) = &r.reason { p { (reason) } }
                details {
                    summary { "JSON" span.visually-hidden { " of " (r.message_id) } }
                    pre { (r.json) }
                }
                @if r.status == "accepted" && !r.message_id.is_empty() {
                    a href={ "/sources/" (source_id) "/debugger/fate?message_id="
                        (form_urlencoded::byte_serialize(r.message_id.as_bytes()).collect::<String>()) } {
                        "Fate" span.visually-hidden { " of " (r.message_id) }
                    }
                }
            }
        }
    }
}

/// `GET /sources/{id}/debugger/stream`: the live feed as server-sent events.
pub(crate) async fn stream(
    State(state): State<Arc<AppState>>,
    _signed: Signed,
    Path(id): Path<String>,
    crate::error::Checked(Query(q)): crate::error::Checked<Query<crate::live::StreamQuery>>,
    headers: HeaderMap,
) -> Response {
    if state.control.source(&id).is_none() {
        return ApiError::NotFound(format!("no source with id {id:?}")).into_response();
    }
    let (filter, after) = match q.parse() {
        Ok(p) => p,
        Err(e) => return e.into_response(),
    };
    let last_id = crate::live::last_event_id(&headers).or(after);
    let mut resp = crate::live::sse(&state, &id, last_id, filter).into_response();
    resp.headers_mut()
        .insert("x-accel-buffering", HeaderValue::from_static("no"));
    resp
}

#[derive(Deserialize)]
pub(crate) struct FateQuery {
    #[serde(default)]
    message_id: String,
}

fn fate_badge(state: &str) -> Markup {
    let kind = match state {
        "loaded" | "delivered" => "ok",
        "pending" | "retrying" | "paused" => "warn",
        "discarded" | "dead_lettered" => "bad",
        _ => "idle",
    };
    badge(kind, &state.replace('_', " "))
}

/// `GET /sources/{id}/debugger/fate?message_id=…`: one event's fate on one screen.
pub(crate) async fn fate(
    State(state): State<Arc<AppState>>,
    signed: Signed,
    Path(id): Path<String>,
    Query(q): Query<FateQuery>,
) -> Response {
    let f = match crate::fate::fate(&state, &id, &q.message_id).await {
        Ok(f) => f,
        Err(e) => return error_page(&signed, e),
    };
    let back = format!("/sources/{id}/debugger");
    let w = &f.warehouse;
    let body = html! {
        h1 { "Fate of " code { (f.message_id) } }
        p { a href=(back) { "Back to the debugger" } }
        section.card aria-labelledby="stored-h" {
            h2 #stored-h { "1. Stored" }
            dl.facts {
                dt { "Log position" } dd { "seq " (f.stored.seq) }
                dt { "Received" } dd { (when(&f.stored.received_at)) }
                dt { "Type" } dd { (f.stored.call_type) }
                @if let Some(e) = &f.stored.event { dt { "Event" } dd { (e) } }
            }
        }
        section.card aria-labelledby="wh-h" {
            h2 #wh-h { "2. Warehouse" }
            p { (fate_badge(w.state)) " " (w.detail) }
            @if !w.tables.is_empty() {
                p { "Loaded into: "
                    @for (i, t) in w.tables.iter().enumerate() {
                        @if i > 0 { ", " }
                        @let schema = w.schema.clone().unwrap_or_default();
                        a href={ "/warehouse/" (schema) "/" (t) } { code { (schema) "." (t) } }
                    }
                }
            }
            @if !w.discards.is_empty() {
                div.table-wrap tabindex="0" role="region" aria-label="Table, scrolls sideways on narrow screens" { table {
                    caption { "Values loaded as NULL (kept in tributary_discards)" }
                    thead { tr { th scope="col" { "Table" } th scope="col" { "Column" } th scope="col" { "Value" } th scope="col" { "Why" } } }
                    tbody { @for d in &w.discards { tr {
                        td { (d.table) } td { (d.column) } td { (d.value.as_deref().unwrap_or("")) } td { (d.reason) }
                    } } }
                } }
            }
        }
        section.card aria-labelledby="dst-h" {
            h2 #dst-h { "3. Destinations" }
            @if f.destinations.is_empty() { p { "No destinations are set up." } } @else {
                div.table-wrap tabindex="0" role="region" aria-label="Table, scrolls sideways on narrow screens" { table {
                    caption.visually-hidden { "Delivery per destination" }
                    thead { tr { th scope="col" { "Destination" } th scope="col" { "State" } th scope="col" { "Details" } } }
                    tbody { @for d in &f.destinations { tr {
                        th scope="row" { a href={ "/destinations/" (d.id) } { (d.name) } " (" (d.kind) ")" }
                        td { (fate_badge(d.state)) }
                        td {
                            (d.detail)
                            @if let Some(e) = &d.last_error { br; "Last answer: " (e) }
                            @if let Some(s) = d.last_status { br; "HTTP " (s) }
                            @if let Some(a) = d.attempts { br; (a) " attempts" }
                            @if let Some(r) = &d.last_response { pre { (r) } }
                        }
                    } } }
                } }
            }
        }
        details {
            summary { "The stored event (JSON)" }
            pre { (serde_json::to_string_pretty(&f.event).unwrap_or_default()) }
        }
    };
    html(
        StatusCode::OK,
        layout::page(
            Some(&signed),
            Nav::Sources,
            &format!("Fate of {}", f.message_id),
            body,
        ),
    )
}
