//! The email report (DESIGN.md §3 "Email report", §5 "Email report counts"): per
//! campaign of one source, delivered, bounced, opened, clicked, unsubscribed and
//! spam recipients, the six rates, clicks per link, and the counts per day for the
//! console's chart.
//!
//! It is computed from the warehouse (SQL on SQLite or PostgreSQL, see
//! `tributary_warehouse::report`), so it shows what was loaded: an event accepted a
//! moment ago appears once the loader committed it (about a second). Nothing here
//! writes. Counts are distinct recipients (userId, else anonymousId) per
//! `campaign_id`; a rate whose denominator is zero is `null`, never a division by
//! zero. The `definitions` of the answer state every rule in words, and the
//! console and the CLI print them under the table.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use axum::Router;
use axum::extract::{Query, State};
use axum::routing::get;
use chrono::{DateTime, NaiveDate, Utc};
use serde::{Deserialize, Serialize};
use tributary_warehouse::report::{EmailFacts, EmailMetric};

use crate::AppState;
use crate::error::{ApiError, Checked};

/// The report of one source.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct EmailReport {
    /// The source.
    pub source_id: String,
    /// Start of the window (inclusive, by the events' `timestamp`), if given.
    pub from: Option<DateTime<Utc>>,
    /// End of the window (exclusive), if given.
    pub to: Option<DateTime<Utc>>,
    /// One entry per campaign, the newest first (by its first event).
    pub campaigns: Vec<CampaignReport>,
    /// What every count and rate means, in words.
    pub definitions: BTreeMap<String, String>,
}

/// One campaign's counts and rates.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct CampaignReport {
    /// `campaign_id` as text.
    pub campaign_id: String,
    /// `campaign_name` of its events, when they carried one.
    pub campaign_name: Option<String>,
    /// Its earliest email event in the window (ISO-8601 UTC).
    pub first_event_at: Option<String>,
    /// Distinct recipients with Email Delivered.
    pub delivered: u64,
    /// Distinct recipients with Email Bounced.
    pub bounced: u64,
    /// Distinct recipients who opened or clicked.
    pub opened: u64,
    /// Distinct recipients who clicked.
    pub clicked: u64,
    /// Distinct recipients who unsubscribed.
    pub unsubscribed: u64,
    /// Distinct recipients who marked it as spam.
    pub spam: u64,
    /// opened / delivered.
    pub open_rate: Option<f64>,
    /// clicked / delivered.
    pub click_rate: Option<f64>,
    /// clicked / opened.
    pub click_to_open_rate: Option<f64>,
    /// bounced / (delivered + bounced).
    pub bounce_rate: Option<f64>,
    /// unsubscribed / delivered.
    pub unsubscribe_rate: Option<f64>,
    /// spam / delivered.
    pub spam_rate: Option<f64>,
    /// Clicks per link, most clicked first.
    pub links: Vec<LinkReport>,
    /// The counts per UTC day, oldest first (the chart).
    pub daily: Vec<DayCounts>,
}

/// Clicks of one link.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct LinkReport {
    /// `link_url`.
    pub url: String,
    /// Email Link Clicked events.
    pub clicks: u64,
    /// Distinct recipients who clicked it.
    pub unique_clickers: u64,
}

/// One campaign's counts on one UTC day (distinct recipients that day).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct DayCounts {
    /// `YYYY-MM-DD`.
    pub date: String,
    /// Delivered that day.
    pub delivered: u64,
    /// Opened or clicked that day.
    pub opened: u64,
    /// Clicked that day.
    pub clicked: u64,
    /// Bounced that day.
    pub bounced: u64,
    /// Unsubscribed that day.
    pub unsubscribed: u64,
    /// Marked as spam that day.
    pub spam: u64,
}

/// The definitions printed under the report.
pub fn definitions() -> BTreeMap<String, String> {
    [
        ("recipient", "a recipient is the event's userId, or its anonymousId (the email) when it has no userId; every count is of distinct recipients per campaign_id"),
        ("delivered", "recipients with an Email Delivered event"),
        ("bounced", "recipients with an Email Bounced event"),
        ("opened", "recipients with an Email Opened or an Email Link Clicked event (a click implies an open)"),
        ("clicked", "recipients with an Email Link Clicked event"),
        ("unsubscribed", "recipients with an Email Unsubscribed event"),
        ("spam", "recipients with an Email Marked as Spam event"),
        ("open_rate", "opened / delivered"),
        ("click_rate", "clicked / delivered"),
        ("click_to_open_rate", "clicked / opened"),
        ("bounce_rate", "bounced / (delivered + bounced)"),
        ("unsubscribe_rate", "unsubscribed / delivered"),
        ("spam_rate", "spam / delivered"),
        ("rates", "rates are fractions from 0 to 1; a rate whose denominator is 0 is null (shown as \u{2014})"),
        ("links", "clicks = Email Link Clicked events per link_url; unique_clickers = distinct recipients who clicked it"),
        ("window", "from (inclusive) and to (exclusive) select events by their timestamp; the daily counts are per UTC day"),
        ("source", "computed from the warehouse: events appear once loaded (about a second after they are accepted)"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect()
}

fn rate(num: u64, den: u64) -> Option<f64> {
    (den > 0).then(|| num as f64 / den as f64)
}

/// Builds the report from the warehouse's counts (pure; unit-tested).
pub fn build(
    source_id: &str,
    from: Option<DateTime<Utc>>,
    to: Option<DateTime<Utc>>,
    facts: EmailFacts,
) -> EmailReport {
    #[derive(Default)]
    struct Acc {
        name: Option<String>,
        first: Option<String>,
        counts: HashMap<EmailMetric, u64>,
        days: BTreeMap<String, DayCounts>,
        links: Vec<LinkReport>,
    }
    let mut by: BTreeMap<String, Acc> = BTreeMap::new();
    for t in facts.totals {
        let a = by.entry(t.campaign_id).or_default();
        if a.name.is_none() {
            a.name = t.campaign_name;
        }
        if let Some(f) = t.first_event_at
            && a.first.as_ref().is_none_or(|cur| f < *cur)
        {
            a.first = Some(f);
        }
        a.counts.insert(t.metric, t.recipients);
    }
    for d in facts.daily {
        let a = by.entry(d.campaign_id).or_default();
        let day = a.days.entry(d.date.clone()).or_insert_with(|| DayCounts {
            date: d.date.clone(),
            ..Default::default()
        });
        let slot = match d.metric {
            EmailMetric::Delivered => &mut day.delivered,
            EmailMetric::Bounced => &mut day.bounced,
            EmailMetric::Opened => &mut day.opened,
            EmailMetric::Clicked => &mut day.clicked,
            EmailMetric::Unsubscribed => &mut day.unsubscribed,
            EmailMetric::Spam => &mut day.spam,
        };
        *slot = d.recipients;
    }
    for l in facts.links {
        by.entry(l.campaign_id).or_default().links.push(LinkReport {
            url: l.url,
            clicks: l.clicks,
            unique_clickers: l.unique_clickers,
        });
    }
    let mut campaigns: Vec<CampaignReport> = by
        .into_iter()
        .map(|(id, mut a)| {
            let n = |m| a.counts.get(&m).copied().unwrap_or(0);
            let (delivered, bounced, opened, clicked, unsubscribed, spam) = (
                n(EmailMetric::Delivered),
                n(EmailMetric::Bounced),
                n(EmailMetric::Opened),
                n(EmailMetric::Clicked),
                n(EmailMetric::Unsubscribed),
                n(EmailMetric::Spam),
            );
            a.links
                .sort_by(|x, y| y.clicks.cmp(&x.clicks).then(x.url.cmp(&y.url)));
            CampaignReport {
                campaign_id: id,
                campaign_name: a.name,
                first_event_at: a.first,
                delivered,
                bounced,
                opened,
                clicked,
                unsubscribed,
                spam,
                open_rate: rate(opened, delivered),
                click_rate: rate(clicked, delivered),
                click_to_open_rate: rate(clicked, opened),
                bounce_rate: rate(bounced, delivered + bounced),
                unsubscribe_rate: rate(unsubscribed, delivered),
                spam_rate: rate(spam, delivered),
                links: a.links,
                daily: a.days.into_values().collect(),
            }
        })
        .collect();
    // Newest campaign first; ties (and campaigns without a time) by id.
    campaigns.sort_by(|a, b| {
        b.first_event_at
            .cmp(&a.first_event_at)
            .then_with(|| a.campaign_id.cmp(&b.campaign_id))
    });
    EmailReport {
        source_id: source_id.to_string(),
        from,
        to,
        campaigns,
        definitions: definitions(),
    }
}

/// The email report of a source for events whose `timestamp` is in `[from, to)`.
/// 404 for an unknown source or when the warehouse is off.
pub async fn email_report(
    state: &AppState,
    source_id: &str,
    from: Option<DateTime<Utc>>,
    to: Option<DateTime<Utc>>,
) -> Result<EmailReport, ApiError> {
    let source = state
        .control
        .source(source_id)
        .ok_or_else(|| ApiError::NotFound(format!("no source with id {source_id:?}")))?;
    if let (Some(f), Some(t)) = (from, to)
        && f > t
    {
        return Err(ApiError::bad(
            "invalid_query",
            "`from` must not be after `to`",
        ));
    }
    let warehouse = state.warehouse.as_ref().ok_or_else(|| {
        ApiError::NotFound("the warehouse is off (TRIBUTARY_WAREHOUSE=off)".into())
    })?;
    let facts = warehouse.email_facts(&source.schema, from, to).await?;
    Ok(build(&source.id, from, to, facts))
}

/// Parses a `from`/`to` value: RFC 3339 (`2026-03-01T00:00:00Z`) or a date
/// (`2026-03-01`, midnight UTC). The error names the parameter.
pub fn parse_time(name: &str, value: &str) -> Result<DateTime<Utc>, ApiError> {
    let v = value.trim();
    if let Ok(t) = DateTime::parse_from_rfc3339(v) {
        return Ok(t.with_timezone(&Utc));
    }
    if let Ok(d) = NaiveDate::parse_from_str(v, "%Y-%m-%d")
        && let Some(t) = d.and_hms_opt(0, 0, 0)
    {
        return Ok(t.and_utc());
    }
    Err(ApiError::bad(
        "invalid_query",
        format!(
            "`{name}` must be an RFC 3339 time (2026-03-01T00:00:00Z) or a date (2026-03-01), not {value:?}"
        ),
    ))
}

#[derive(Deserialize)]
struct ReportQuery {
    source: Option<String>,
    from: Option<String>,
    to: Option<String>,
}

async fn email_report_route(
    State(state): State<Arc<AppState>>,
    Checked(Query(q)): Checked<Query<ReportQuery>>,
) -> Result<axum::Json<EmailReport>, ApiError> {
    let source = q.source.filter(|s| !s.trim().is_empty()).ok_or_else(|| {
        ApiError::bad(
            "invalid_query",
            "`source` is required: /api/v1/reports/email?source=<source id>",
        )
    })?;
    let time = |name: &str, v: Option<String>| {
        v.filter(|s| !s.trim().is_empty())
            .map(|s| parse_time(name, &s))
            .transpose()
    };
    let from = time("from", q.from)?;
    let to = time("to", q.to)?;
    Ok(axum::Json(email_report(&state, &source, from, to).await?))
}

/// The `/api/v1/reports/email` route (without the auth layer, which the app adds).
pub fn routes() -> Router<Arc<AppState>> {
    Router::new().route("/reports/email", get(email_report_route))
}

#[cfg(test)]
mod tests {
    use super::*;
    use tributary_warehouse::report::{EmailDaily, EmailLink, EmailTotal};

    fn total(metric: EmailMetric, c: &str, n: u64) -> EmailTotal {
        EmailTotal {
            metric,
            campaign_id: c.into(),
            campaign_name: Some(format!("Campaign {c}")),
            recipients: n,
            first_event_at: Some("2026-03-01T10:00:00.000Z".into()),
        }
    }

    #[test]
    fn rates_follow_the_definitions_and_zero_denominators_are_null() {
        let facts = EmailFacts {
            totals: vec![
                total(EmailMetric::Delivered, "1", 4),
                total(EmailMetric::Bounced, "1", 1),
                total(EmailMetric::Opened, "1", 2),
                total(EmailMetric::Clicked, "1", 1),
                total(EmailMetric::Spam, "2", 1),
            ],
            daily: vec![EmailDaily {
                metric: EmailMetric::Opened,
                campaign_id: "1".into(),
                date: "2026-03-01".into(),
                recipients: 2,
            }],
            links: vec![EmailLink {
                campaign_id: "1".into(),
                url: "https://x".into(),
                clicks: 3,
                unique_clickers: 1,
            }],
        };
        let r = build("src", None, None, facts);
        let c1 = r.campaigns.iter().find(|c| c.campaign_id == "1").unwrap();
        assert_eq!(c1.open_rate, Some(0.5));
        assert_eq!(c1.click_rate, Some(0.25));
        assert_eq!(c1.click_to_open_rate, Some(0.5));
        assert_eq!(c1.bounce_rate, Some(0.2));
        assert_eq!(c1.unsubscribe_rate, Some(0.0));
        assert_eq!(c1.links[0].clicks, 3);
        assert_eq!(c1.daily[0].opened, 2);
        let c2 = r.campaigns.iter().find(|c| c.campaign_id == "2").unwrap();
        assert_eq!(c2.spam, 1);
        assert_eq!(c2.open_rate, None);
        assert_eq!(c2.click_to_open_rate, None);
        assert_eq!(c2.bounce_rate, None);
        assert!(r.definitions["rates"].contains("null"));
    }

    #[test]
    fn times_are_rfc3339_or_dates() {
        assert_eq!(
            parse_time("from", "2026-03-01").unwrap().to_rfc3339(),
            "2026-03-01T00:00:00+00:00"
        );
        assert!(parse_time("from", "2026-03-01T01:00:00+01:00").is_ok());
        let e = parse_time("to", "yesterday").unwrap_err();
        assert_eq!(e.code(), "invalid_query");
        assert!(e.to_string().contains("`to`"));
    }
}
