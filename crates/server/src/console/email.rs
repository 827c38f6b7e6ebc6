//! The email report page: per campaign the counts and rates of DESIGN.md §5
//! ([`crate::report::email_report`], computed from the warehouse), the definitions
//! printed under the table, each campaign's links with clicks and unique clickers,
//! and a chart over time as inline SVG (`role="img"` with a title) followed by the
//! same numbers as a data table, its text alternative. A GET form picks the source
//! and the window, so the page works without JavaScript.

use std::sync::Arc;

use axum::extract::{Query, State};
use axum::http::StatusCode;
use axum::response::Response;
use chrono::{DateTime, NaiveDate, Utc};
use maud::{Markup, html};
use serde::Deserialize;

use super::layout::{self, Nav, when};
use super::session::Signed;
use super::{error_page, html};
use crate::AppState;
use crate::control::SourceType;
use crate::error::ApiError;
use crate::report::{CampaignReport, DayCounts};

/// Gmail's sender guideline: keep the spam complaint rate below 0.3 %.
const SPAM_LIMIT: f64 = 0.003;

#[derive(Deserialize, Default)]
pub(crate) struct ReportQuery {
    #[serde(default)]
    source: String,
    #[serde(default)]
    from: String,
    #[serde(default)]
    to: String,
}

fn pct(r: Option<f64>) -> String {
    match r {
        Some(r) => format!("{:.1} %", r * 100.0),
        None => "—".to_string(),
    }
}

/// A date (`YYYY-MM-DD`, as `<input type=date>` sends it) or an RFC 3339 time.
fn parse_time(s: &str, field: &str) -> Result<Option<DateTime<Utc>>, ApiError> {
    let s = s.trim();
    if s.is_empty() {
        return Ok(None);
    }
    if let Ok(d) = NaiveDate::parse_from_str(s, "%Y-%m-%d") {
        return Ok(d.and_hms_opt(0, 0, 0).map(|t| t.and_utc()));
    }
    DateTime::parse_from_rfc3339(s)
        .map(|t| Some(t.with_timezone(&Utc)))
        .map_err(|_| {
            ApiError::bad(
                "invalid_time",
                format!("`{field}` must be a date like 2026-12-01"),
            )
        })
}

/// Series of the chart: (field, label, css class).
const SERIES: [(&str, &str, &str); 6] = [
    ("delivered", "Delivered", "s-delivered"),
    ("opened", "Opened", "s-opened"),
    ("clicked", "Clicked", "s-clicked"),
    ("bounced", "Bounced", "s-bounced"),
    ("unsubscribed", "Unsubscribed", "s-unsubscribed"),
    ("spam", "Spam", "s-spam"),
];

fn value(d: &DayCounts, field: &str) -> u64 {
    match field {
        "delivered" => d.delivered,
        "opened" => d.opened,
        "clicked" => d.clicked,
        "bounced" => d.bounced,
        "unsubscribed" => d.unsubscribed,
        _ => d.spam,
    }
}

/// The chart: one polyline per series over the days, axes with the maximum and
/// the first and last day.
fn chart(c: &CampaignReport, idx: usize) -> Markup {
    let (w, h, pad) = (640.0_f64, 240.0_f64, 40.0_f64);
    let days = &c.daily;
    let max = days
        .iter()
        .flat_map(|d| SERIES.iter().map(move |(f, _, _)| value(d, f)))
        .max()
        .unwrap_or(0)
        .max(1) as f64;
    let n = days.len().max(1);
    let x = |i: usize| {
        if n == 1 {
            pad + (w - 2.0 * pad) / 2.0
        } else {
            pad + (w - 2.0 * pad) * i as f64 / (n - 1) as f64
        }
    };
    let y = |v: u64| h - pad - (h - 2.0 * pad) * v as f64 / max;
    let title_id = format!("chart-{idx}-title");
    let desc_id = format!("chart-{idx}-desc");
    let name = c
        .campaign_name
        .clone()
        .unwrap_or_else(|| c.campaign_id.clone());
    html! {
        figure.chart {
            svg viewBox={ "0 0 " (w) " " (h) } role="img" aria-labelledby={ (title_id) " " (desc_id) } {
                title id=(title_id) { "Daily recipients of " (name) }
                desc id=(desc_id) { "Delivered, opened, clicked, bounced, unsubscribed and spam per UTC day; the table below has the numbers." }
                line.axis x1=(pad) y1=(h - pad) x2=(w - pad) y2=(h - pad) stroke-width="1" {}
                line.axis x1=(pad) y1=(pad) x2=(pad) y2=(h - pad) stroke-width="1" {}
                text x="4" y=(pad + 4.0) font-size="12" fill="#1a1a1a" { (max as u64) }
                text x="4" y=(h - pad) font-size="12" fill="#1a1a1a" { "0" }
                @if let Some(first) = days.first() {
                    text x=(pad) y=(h - pad + 18.0) font-size="12" fill="#1a1a1a" { (first.date) }
                }
                @if let (true, Some(last)) = (days.len() > 1, days.last()) {
                    text x=(w - pad) y=(h - pad + 18.0) font-size="12" fill="#1a1a1a" text-anchor="end" { (last.date) }
                }
                @for (field, _, class) in SERIES {
                    @let points = days.iter().enumerate().map(|(i, d)| format!("{:.1},{:.1}", x(i), y(value(d, field)))).collect::<Vec<_>>().join(" ");
                    g class=(class) {
                        polyline points=(points) fill="none" stroke="currentColor" stroke-width="2.5" {}
                        @for (i, d) in days.iter().enumerate() {
                            circle cx=(format!("{:.1}", x(i))) cy=(format!("{:.1}", y(value(d, field)))) r="3" fill="currentColor" {}
                        }
                    }
                }
            }
            figcaption {
                ul.legend { @for (_, label, class) in SERIES { li class=(class) { span { (label) } } } }
            }
        }
        div.table-wrap tabindex="0" role="region" aria-label="Table, scrolls sideways on narrow screens" { table {
            caption { "Daily recipients of " (name) " (the chart's data)" }
            thead { tr { th scope="col" { "Day (UTC)" } @for (_, label, _) in SERIES { th.num scope="col" { (label) } } } }
            tbody { @for d in days { tr {
                th scope="row" { (d.date) }
                @for (field, _, _) in SERIES { td.num { (value(d, field)) } }
            } } }
        } }
    }
}

/// `GET /reports/email?source=…[&from=…&to=…]`.
pub(crate) async fn page(
    State(state): State<Arc<AppState>>,
    signed: Signed,
    Query(q): Query<ReportQuery>,
) -> Response {
    let mut sources = state.control.sources();
    sources.sort_by_key(|s| s.kind != SourceType::Activecampaign);
    let chosen = if q.source.is_empty() {
        sources.first().map(|s| s.id.clone())
    } else {
        Some(q.source.clone())
    };
    let times = parse_time(&q.from, "from").and_then(|f| Ok((f, parse_time(&q.to, "to")?)));
    let (report, error) = match (&chosen, times) {
        (_, Err(e)) => (None, Some(e)),
        (None, _) => (None, None),
        (Some(id), Ok((from, to))) => match crate::report::email_report(&state, id, from, to).await
        {
            Ok(r) => (Some(r), None),
            Err(e @ (ApiError::BadRequest { .. } | ApiError::NotFound(_))) => (None, Some(e)),
            Err(e) => return error_page(&signed, e),
        },
    };
    let status = error.as_ref().map(|e| e.status()).unwrap_or(StatusCode::OK);
    let source_name = chosen
        .as_deref()
        .and_then(|id| state.control.source(id))
        .map(|s| s.name.clone());
    let body = html! {
        h1 { "Email report" @if let Some(n) = &source_name { ": " (n) } }
        form.filters method="get" action="/reports/email" aria-label="Report options" {
            div.field {
                label for="source" { "Source" }
                select #source name="source" {
                    @for s in &sources {
                        option value=(s.id) selected[chosen.as_deref() == Some(s.id.as_str())] { (s.name) " (" (s.schema) ")" }
                    }
                }
            }
            div.field { label for="from" { "From (UTC day)" } input #from type="date" name="from" value=(q.from); }
            div.field { label for="to" { "To (exclusive)" } input #to type="date" name="to" value=(q.to); }
            button type="submit" { "Show report" }
        }
        @if let Some(e) = &error { p.notice.bad role="alert" { (e.to_string()) } }
        @if sources.is_empty() { p { "No sources yet. " a href="/sources/new" { "Add an ActiveCampaign source" } "." } }
        @if let Some(r) = &report {
            @if r.campaigns.is_empty() {
                p { "No email events loaded for this source yet. Events appear here about a second after they arrive." }
            } @else {
                div.table-wrap tabindex="0" role="region" aria-label="Table, scrolls sideways on narrow screens" { table #campaigns {
                    caption { "Campaigns (distinct recipients)" }
                    thead { tr {
                        th scope="col" { "Campaign" }
                        th.num scope="col" { "Delivered" } th.num scope="col" { "Bounced" }
                        th.num scope="col" { "Opened" } th.num scope="col" { "Clicked" }
                        th.num scope="col" { "Unsubscribed" } th.num scope="col" { "Spam" }
                        th.num scope="col" { "Open rate" } th.num scope="col" { "Click rate" }
                        th.num scope="col" { "Click-to-open" } th.num scope="col" { "Bounce rate" }
                        th.num scope="col" { "Unsubscribe rate" } th.num scope="col" { "Spam rate" }
                    } }
                    tbody { @for c in &r.campaigns { tr {
                        th scope="row" { a href={ "#campaign-" (c.campaign_id) } { (c.campaign_name.as_deref().unwrap_or(&c.campaign_id)) } }
                        td.num data-count="delivered" { (c.delivered) } td.num data-count="bounced" { (c.bounced) }
                        td.num data-count="opened" { (c.opened) } td.num data-count="clicked" { (c.clicked) }
                        td.num data-count="unsubscribed" { (c.unsubscribed) } td.num data-count="spam" { (c.spam) }
                        td.num { (pct(c.open_rate)) } td.num { (pct(c.click_rate)) }
                        td.num { (pct(c.click_to_open_rate)) } td.num { (pct(c.bounce_rate)) }
                        td.num { (pct(c.unsubscribe_rate)) }
                        td.num {
                            (pct(c.spam_rate))
                            @if c.spam_rate.is_some_and(|s| s >= SPAM_LIMIT) { " " span.badge.badge-bad { "above 0.3 %" } }
                        }
                    } } }
                } }
                section aria-labelledby="defs-h" {
                    h2 #defs-h { "Definitions" }
                    dl.facts {
                        @for (k, v) in &r.definitions { dt { (k.replace('_', " ")) } dd { (v) } }
                        dt { "open rate note" }
                        dd { "Since 2022 ActiveCampaign counts Apple Mail Privacy Protection opens by default, which raises open rates." }
                        dt { "spam limit" }
                        dd { "Keep the spam rate below 0.3 %, ideally 0.1 % (Gmail's sender guidelines); rates at or above 0.3 % are marked." }
                    }
                }
                @for (i, c) in r.campaigns.iter().enumerate() {
                    section id={ "campaign-" (c.campaign_id) } aria-labelledby={ "campaign-h-" (i) } {
                        h2 id={ "campaign-h-" (i) } { (c.campaign_name.as_deref().unwrap_or(&c.campaign_id)) }
                        p.hint { "Campaign id " (c.campaign_id)
                            @if let Some(at) = &c.first_event_at { " · first event " (when(at)) } }
                        @if c.links.is_empty() { p { "No link clicks." } } @else {
                            div.table-wrap tabindex="0" role="region" aria-label="Table, scrolls sideways on narrow screens" { table {
                                caption { "Links" }
                                thead { tr { th scope="col" { "URL" } th.num scope="col" { "Clicks" } th.num scope="col" { "Unique clickers" } } }
                                tbody { @for l in &c.links { tr {
                                    td { code { (l.url) } } td.num { (l.clicks) } td.num { (l.unique_clickers) }
                                } } }
                            } }
                        }
                        @if !c.daily.is_empty() { (chart(c, i)) }
                    }
                }
            }
        }
    };
    html(
        status,
        layout::page(Some(&signed), Nav::Report, "Email report", body),
    )
}
