//! Tributary's own reads of loaded data: the email report's counts (DESIGN.md §5)
//! and where one event landed (the debugger's "fate").
//!
//! Every statement is built here from fixed table names and the columns the
//! schema really has, with every identifier quoted ([`quote`]) and every value a
//! literal Tributary formatted itself (timestamps) or escaped (a messageId); it runs
//! read-only (SQLite: a read-only connection; PostgreSQL: the loader's read pool in a
//! `READ ONLY` transaction with the query timeout). A table or column that was never
//! loaded counts as empty, never as an error: a schema that has seen no bounce yet
//! reports zero bounces.

use std::collections::{HashMap, HashSet};

use chrono::{DateTime, Utc};
use serde::Serialize;
use serde_json::Value;

use crate::backend::Backend;
use crate::naming::{DISCARDS_TABLE, event_table, quote};
use crate::types::format_timestamp;
use crate::{BackendKind, WarehouseError};

/// A count of the email report.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum EmailMetric {
    /// Distinct recipients with Email Delivered.
    Delivered,
    /// Distinct recipients with Email Bounced.
    Bounced,
    /// Distinct recipients with Email Opened or Email Link Clicked.
    Opened,
    /// Distinct recipients with Email Link Clicked.
    Clicked,
    /// Distinct recipients with Email Unsubscribed.
    Unsubscribed,
    /// Distinct recipients with Email Marked as Spam.
    Spam,
}

impl EmailMetric {
    fn name(self) -> &'static str {
        match self {
            EmailMetric::Delivered => "delivered",
            EmailMetric::Bounced => "bounced",
            EmailMetric::Opened => "opened",
            EmailMetric::Clicked => "clicked",
            EmailMetric::Unsubscribed => "unsubscribed",
            EmailMetric::Spam => "spam",
        }
    }

    fn parse(s: &str) -> Option<EmailMetric> {
        Some(match s {
            "delivered" => EmailMetric::Delivered,
            "bounced" => EmailMetric::Bounced,
            "opened" => EmailMetric::Opened,
            "clicked" => EmailMetric::Clicked,
            "unsubscribed" => EmailMetric::Unsubscribed,
            "spam" => EmailMetric::Spam,
            _ => return None,
        })
    }
}

/// Which event feeds which count (a click also counts as an open).
const SOURCES: &[(&str, EmailMetric)] = &[
    ("Email Delivered", EmailMetric::Delivered),
    ("Email Bounced", EmailMetric::Bounced),
    ("Email Opened", EmailMetric::Opened),
    ("Email Link Clicked", EmailMetric::Opened),
    ("Email Link Clicked", EmailMetric::Clicked),
    ("Email Unsubscribed", EmailMetric::Unsubscribed),
    ("Email Marked as Spam", EmailMetric::Spam),
];

/// One count of one campaign.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct EmailTotal {
    /// Which count.
    pub metric: EmailMetric,
    /// The campaign (`campaign_id` as text).
    pub campaign_id: String,
    /// The campaign's name, when an event of this count carried one.
    pub campaign_name: Option<String>,
    /// Distinct recipients (userId, else anonymousId).
    pub recipients: u64,
    /// The earliest event of this count (ISO-8601 UTC).
    pub first_event_at: Option<String>,
}

/// One count of one campaign on one UTC day.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct EmailDaily {
    /// Which count.
    pub metric: EmailMetric,
    /// The campaign.
    pub campaign_id: String,
    /// `YYYY-MM-DD` (UTC) of the events' `timestamp`.
    pub date: String,
    /// Distinct recipients that day.
    pub recipients: u64,
}

/// Clicks on one link of one campaign.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct EmailLink {
    /// The campaign.
    pub campaign_id: String,
    /// `link_url`.
    pub url: String,
    /// Email Link Clicked events.
    pub clicks: u64,
    /// Distinct recipients who clicked it.
    pub unique_clickers: u64,
}

/// The raw counts of the email report of one schema, by campaign.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct EmailFacts {
    /// Per count and campaign.
    pub totals: Vec<EmailTotal>,
    /// Per count, campaign and day.
    pub daily: Vec<EmailDaily>,
    /// Per campaign and link.
    pub links: Vec<EmailLink>,
}

/// Where one event is in the warehouse.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct RowPresence {
    /// The asked tables that hold a row with this `id`.
    pub tables: Vec<String>,
    /// Values of this row that could not be cast and were loaded as NULL.
    pub discards: Vec<Discard>,
}

/// A value recorded in `tributary_discards`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Discard {
    /// The table the row went to.
    pub table: String,
    /// The column whose value was discarded.
    pub column: String,
    /// The value as text.
    pub value: Option<String>,
    /// Why (e.g. the column's type and the value's).
    pub reason: String,
}

/// The tables the email report reads.
pub(crate) const EMAIL_TABLES: &[&str] = &[
    "email_delivered",
    "email_bounced",
    "email_opened",
    "email_link_clicked",
    "email_unsubscribed",
    "email_marked_as_spam",
];

/// An SQL string literal.
pub(crate) fn literal(s: &str) -> String {
    format!("'{}'", s.replace('\'', "''"))
}

/// How table names and timestamps are written for one backend and schema.
pub(crate) struct Sql {
    pub(crate) kind: BackendKind,
    pub(crate) schema: String,
}

impl Sql {
    pub(crate) fn table(&self, t: &str) -> String {
        match self.kind {
            BackendKind::Sqlite => quote(t),
            BackendKind::Postgres => format!("{}.{}", quote(&self.schema), quote(t)),
        }
    }

    /// A timestamp column as fixed-width ISO-8601 UTC text (sorts as time).
    pub(crate) fn ts_text(&self, col: &str) -> String {
        match self.kind {
            BackendKind::Sqlite => quote(col),
            BackendKind::Postgres => format!(
                "to_char({} AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.MS\"Z\"')",
                quote(col)
            ),
        }
    }

    fn ts_literal(&self, t: &DateTime<Utc>) -> String {
        let s = literal(&format_timestamp(t));
        match self.kind {
            BackendKind::Sqlite => s,
            BackendKind::Postgres => format!("{s}::timestamptz"),
        }
    }
}

fn text_col(cols: &HashSet<String>, name: &str) -> String {
    if cols.contains(name) {
        format!("CAST({} AS TEXT)", quote(name))
    } else {
        "CAST(NULL AS TEXT)".into()
    }
}

fn as_u64(v: &Value) -> u64 {
    match v {
        Value::Number(n) => n.as_u64().unwrap_or(0),
        Value::String(s) => s.parse().unwrap_or(0),
        _ => 0,
    }
}

fn as_string(v: &Value) -> Option<String> {
    match v {
        Value::Null => None,
        Value::String(s) => Some(s.clone()),
        other => Some(other.to_string()),
    }
}

/// The email report's counts of `schema`, for events whose `timestamp` is in
/// `[from, to)`.
pub(crate) async fn email_facts(
    backend: &Backend,
    schema: &str,
    from: Option<DateTime<Utc>>,
    to: Option<DateTime<Utc>>,
) -> Result<EmailFacts, WarehouseError> {
    let sql = Sql {
        kind: backend.kind(),
        schema: schema.to_string(),
    };
    let tables: Vec<String> = EMAIL_TABLES.iter().map(|t| t.to_string()).collect();
    let mut range = Vec::new();
    if let Some(f) = &from {
        range.push(format!("{} >= {}", quote("timestamp"), sql.ts_literal(f)));
    }
    if let Some(t) = &to {
        range.push(format!("{} < {}", quote("timestamp"), sql.ts_literal(t)));
    }
    if range.is_empty() && backend.email_counters_built(schema).await? {
        // Without a window the loader's counters answer (module `stats`).
        let reads = backend.stats_scope(schema).email_reads();
        return Ok(facts_from(backend.read_rows(schema, reads).await?));
    }
    let columns = backend.columns(schema, &tables).await?;
    let parts = ev_parts(&sql, &columns, None, &range);
    if parts.is_empty() {
        return Ok(EmailFacts::default());
    }
    let cte = format!("WITH ev AS ({}) ", parts.join(" UNION ALL "));
    let statements = vec![
        format!(
            "{cte}SELECT k, c, COUNT(DISTINCT r), MIN(t), MAX(n) FROM ev \
             WHERE r IS NOT NULL GROUP BY k, c ORDER BY c, k"
        ),
        format!(
            "{cte}SELECT k, c, substr(t, 1, 10) AS d, COUNT(DISTINCT r) FROM ev \
             WHERE r IS NOT NULL GROUP BY k, c, substr(t, 1, 10) ORDER BY c, d, k"
        ),
        format!(
            "{cte}SELECT c, u, COUNT(*), COUNT(DISTINCT r) FROM ev \
             WHERE k = 'clicked' AND u IS NOT NULL GROUP BY c, u ORDER BY c, COUNT(*) DESC, u"
        ),
    ];
    Ok(facts_from(backend.read_rows(schema, statements).await?))
}

/// The facts from the three reads' rows (totals, daily, links).
fn facts_from(results: Vec<Vec<Vec<Value>>>) -> EmailFacts {
    let mut results = results.into_iter();
    let (totals, daily, links) = (
        results.next().unwrap_or_default(),
        results.next().unwrap_or_default(),
        results.next().unwrap_or_default(),
    );
    let cell = |row: &Vec<Value>, i: usize| row.get(i).cloned().unwrap_or(Value::Null);
    let metric = |row: &Vec<Value>| {
        row.first()
            .and_then(Value::as_str)
            .and_then(EmailMetric::parse)
    };
    EmailFacts {
        totals: totals
            .iter()
            .filter_map(|r| {
                Some(EmailTotal {
                    metric: metric(r)?,
                    campaign_id: as_string(&cell(r, 1))?,
                    recipients: as_u64(&cell(r, 2)),
                    first_event_at: as_string(&cell(r, 3)),
                    campaign_name: as_string(&cell(r, 4)),
                })
            })
            .collect(),
        daily: daily
            .iter()
            .filter_map(|r| {
                Some(EmailDaily {
                    metric: metric(r)?,
                    campaign_id: as_string(&cell(r, 1))?,
                    date: as_string(&cell(r, 2))?,
                    recipients: as_u64(&cell(r, 3)),
                })
            })
            .collect(),
        links: links
            .iter()
            .filter_map(|r| {
                Some(EmailLink {
                    campaign_id: as_string(&cell(r, 0))?,
                    url: as_string(&cell(r, 1))?,
                    clicks: as_u64(&cell(r, 2)),
                    unique_clickers: as_u64(&cell(r, 3)),
                })
            })
            .collect(),
    }
}

/// The report's rows, one `SELECT` per (email table, count) of the tables in
/// `columns` that have `campaign_id` and `timestamp`: `k` the count, `c` the
/// campaign, `n` its name, `r` the recipient (userId, else anonymousId), `t` the
/// timestamp as ISO-8601 text, `u` the link (clicks). `filter` and `range` are
/// further conditions (the loader's new ids; the report's window). The raw report
/// and the loader's counters (module `stats`) both read through this, so they
/// count the same rows the same way.
pub(crate) fn ev_parts(
    sql: &Sql,
    columns: &HashMap<String, HashSet<String>>,
    filter: Option<&str>,
    range: &[String],
) -> Vec<String> {
    let mut parts = Vec::new();
    for (event, metric) in SOURCES {
        let t = event_table(event);
        let Some(cols) = columns.get(&t) else {
            continue;
        };
        if !cols.contains("campaign_id") || !cols.contains("timestamp") {
            continue;
        }
        let link = if *metric == EmailMetric::Clicked {
            text_col(cols, "link_url")
        } else {
            "CAST(NULL AS TEXT)".into()
        };
        let conditions: String = filter
            .into_iter()
            .chain(range.iter().map(String::as_str))
            .map(|r| format!(" AND {r}"))
            .collect();
        parts.push(format!(
            "SELECT {m} AS k, {c} AS c, {n} AS n, \
             COALESCE(NULLIF({u}, ''), NULLIF({a}, '')) AS r, {ts} AS t, {link} AS u \
             FROM {tab} WHERE {quoted_c} IS NOT NULL{conditions}",
            m = literal(metric.name()),
            c = text_col(cols, "campaign_id"),
            n = text_col(cols, "campaign_name"),
            u = text_col(cols, "user_id"),
            a = text_col(cols, "anonymous_id"),
            ts = sql.ts_text("timestamp"),
            tab = sql.table(&t),
            quoted_c = quote("campaign_id"),
        ));
    }
    parts
}

/// Which of `tables` of `schema` hold the row `id`, and the values of that row
/// recorded in `tributary_discards`.
pub(crate) async fn row_presence(
    backend: &Backend,
    schema: &str,
    tables: &[String],
    id: &str,
) -> Result<RowPresence, WarehouseError> {
    let sql = Sql {
        kind: backend.kind(),
        schema: schema.to_string(),
    };
    let mut asked: Vec<String> = tables.to_vec();
    asked.push(DISCARDS_TABLE.to_string());
    let columns = backend.columns(schema, &asked).await?;
    let id_lit = literal(id);
    let mut found_in = Vec::new();
    let mut checks = Vec::new();
    for t in tables {
        if columns.get(t).is_some_and(|c| c.contains("id")) {
            checks.push(format!(
                "SELECT {} FROM {} WHERE {} = {id_lit}",
                literal(t),
                sql.table(t),
                quote("id")
            ));
            found_in.push(t.clone());
        }
    }
    let mut statements = Vec::new();
    if !checks.is_empty() {
        statements.push(checks.join(" UNION ALL "));
    }
    let has_discards = columns.contains_key(DISCARDS_TABLE);
    if has_discards {
        statements.push(format!(
            "SELECT {t}, {c}, {v}, {r} FROM {d} WHERE {id} = {id_lit} ORDER BY {t}, {c}",
            t = quote("table_name"),
            c = quote("column_name"),
            v = quote("column_value"),
            r = quote("reason"),
            d = sql.table(DISCARDS_TABLE),
            id = quote("row_id"),
        ));
    }
    if statements.is_empty() {
        return Ok(RowPresence::default());
    }
    let mut results = backend.read_rows(schema, statements).await?.into_iter();
    let present: HashSet<String> = if checks.is_empty() {
        HashSet::new()
    } else {
        results
            .next()
            .unwrap_or_default()
            .iter()
            .filter_map(|r| r.first().and_then(as_string))
            .collect()
    };
    let discards = if has_discards {
        results
            .next()
            .unwrap_or_default()
            .iter()
            .map(|r| Discard {
                table: r.first().and_then(as_string).unwrap_or_default(),
                column: r.get(1).and_then(as_string).unwrap_or_default(),
                value: r.get(2).and_then(as_string),
                reason: r.get(3).and_then(as_string).unwrap_or_default(),
            })
            .collect()
    } else {
        Vec::new()
    };
    let order: HashMap<&String, usize> = tables.iter().enumerate().map(|(i, t)| (t, i)).collect();
    let mut tables_found: Vec<String> = found_in
        .into_iter()
        .filter(|t| present.contains(t))
        .collect();
    tables_found.sort_by_key(|t| order.get(t).copied().unwrap_or(usize::MAX));
    Ok(RowPresence {
        tables: tables_found,
        discards,
    })
}

/// `received_at` of the row `id` in the tables that hold one row per event
/// (`tracks`, `identifies`, `pages`, `screens`, `groups`, `aliases`) or, for a
/// refused record, in `tributary_discards`: primary-key lookups (the discards by a
/// scan of that table, small by nature), so an event is found at any depth.
pub(crate) async fn received_at_of(
    backend: &Backend,
    schema: &str,
    id: &str,
) -> Result<Option<DateTime<Utc>>, WarehouseError> {
    let sql = Sql {
        kind: backend.kind(),
        schema: schema.to_string(),
    };
    let mut asked: Vec<String> = crate::stats::PRIMARY_TABLES
        .iter()
        .map(|t| t.to_string())
        .collect();
    asked.push(DISCARDS_TABLE.to_string());
    let columns = backend.columns(schema, &asked).await?;
    let id_lit = literal(id);
    let mut parts = Vec::new();
    for t in crate::stats::PRIMARY_TABLES {
        if columns
            .get(*t)
            .is_some_and(|c| c.contains("id") && c.contains("received_at"))
        {
            parts.push(format!(
                "SELECT {} FROM {} WHERE {} = {id_lit}",
                sql.ts_text("received_at"),
                sql.table(t),
                quote("id")
            ));
        }
    }
    if columns.contains_key(DISCARDS_TABLE) {
        parts.push(format!(
            "SELECT {} FROM {} WHERE {} = {id_lit} AND {} IS NOT NULL",
            sql.ts_text("received_at"),
            sql.table(DISCARDS_TABLE),
            quote("row_id"),
            quote("received_at")
        ));
    }
    if parts.is_empty() {
        return Ok(None);
    }
    let rows = backend
        .read_rows(schema, vec![parts.join(" UNION ALL ")])
        .await?;
    Ok(rows
        .first()
        .and_then(|r| r.iter().find_map(|row| row.first().and_then(as_string)))
        .and_then(|s| DateTime::parse_from_rfc3339(&s).ok())
        .map(|t| t.with_timezone(&Utc)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn literals_are_escaped() {
        assert_eq!(literal("a'b"), "'a''b'");
    }

    #[test]
    fn every_email_event_has_its_table() {
        let tables: Vec<String> = SOURCES.iter().map(|(e, _)| event_table(e)).collect();
        for t in &tables {
            assert!(EMAIL_TABLES.contains(&t.as_str()), "{t}");
        }
        assert!(tables.contains(&"email_marked_as_spam".to_string()));
        assert!(tables.contains(&"email_link_clicked".to_string()));
    }
}
