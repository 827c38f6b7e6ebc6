//! Warehouse pages: schemas and tables with row counts, last load and lag; one
//! table's columns, types and newest rows; and a read-only SQL box whose results
//! are shown as a table or downloaded as CSV. Queries run through
//! `Warehouse::query`, the same guarded read-only path as `POST /api/v1/query`.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use maud::{Markup, html};
use serde_json::Value;
use tributary_warehouse::{QueryResult, Warehouse};

use super::layout::{self, Nav, badge, when};
use super::session::{Form, Signed, check_form};
use super::{error_page, html};
use crate::AppState;
use crate::error::ApiError;

fn warehouse(state: &AppState) -> Result<&Arc<Warehouse>, ApiError> {
    state
        .warehouse
        .as_ref()
        .ok_or_else(|| ApiError::NotFound("The warehouse is off (TRIBUTARY_WAREHOUSE=off).".into()))
}

fn cell(v: &Value) -> String {
    match v {
        Value::Null => String::new(),
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

fn results_table(
    caption: &str,
    columns: &[tributary_warehouse::Column],
    rows: &[Vec<Value>],
) -> Markup {
    html! {
        div.table-wrap tabindex="0" role="region" aria-label="Table, scrolls sideways on narrow screens" { table {
            caption { (caption) }
            thead { tr { @for c in columns { th scope="col" { (c.name) } } } }
            tbody { @for r in rows { tr { @for v in r {
                @if v.is_null() { td { span.hint { "null" } } } @else { td { (cell(v)) } }
            } } } }
        } }
    }
}

fn sql_box(signed: &Signed, sql: &str, error: Option<&str>) -> Markup {
    html! {
        section aria-labelledby="sql-h" {
            h2 #sql-h { "SQL" }
            form method="post" action="/warehouse" {
                input type="hidden" name="csrf" value=(signed.csrf);
                div.field {
                    label for="sql" { "Query" }
                    p.hint id="sql-hint" { "Read-only, as the query API: SELECT over schema.table, e.g. select * from activecampaign.tracks limit 10." }
                    textarea id="sql" name="sql" rows="5" spellcheck="false"
                        aria-describedby="sql-hint sql-error" aria-invalid=[error.map(|_| "true")] { (sql) }
                    p.error id="sql-error" { @if let Some(e) = error { (e) } }
                }
                div.actions {
                    button.primary type="submit" name="format" value="html" { "Run query" }
                    button type="submit" name="format" value="csv" { "Download CSV" }
                }
            }
        }
    }
}

async fn status_section(state: &AppState) -> Result<Markup, ApiError> {
    let w = warehouse(state)?;
    let st = w.status().await?;
    let (k, t) = match st.health.state {
        tributary_warehouse::HealthState::Ok => ("ok", "Loading"),
        tributary_warehouse::HealthState::Retrying => ("warn", "Retrying"),
        tributary_warehouse::HealthState::Failed => ("bad", "Failing"),
    };
    let kind = serde_json::to_value(st.kind)
        .ok()
        .and_then(|v| v.as_str().map(str::to_string))
        .unwrap_or_default();
    Ok(html! {
        dl.facts {
            dt { "Kind" } dd { (kind) }
            dt { "Status" } dd { (badge(k, t)) }
            @if let Some(e) = &st.health.last_error { dt { "Last error" } dd { (e) } }
            dt { "Last load" } dd { (st.last_load_at.as_deref().map(when).unwrap_or_else(|| "never".into())) }
            dt { "Lag" } dd { (st.lag_events) " events, " (format!("{:.1}", st.lag_seconds)) " s" }
        }
        @if st.schemas.is_empty() {
            p { "No schemas yet: tables appear with the first loaded event." }
        }
        @for s in &st.schemas {
            div.table-wrap tabindex="0" role="region" aria-label="Table, scrolls sideways on narrow screens" { table {
                caption { "Schema " code { (s.name) } }
                thead { tr { th scope="col" { "Table" } th.num scope="col" { "Rows" } th scope="col" { "Last load" } } }
                tbody { @for t in &s.tables {
                    tr {
                        th scope="row" { a href={ "/warehouse/" (s.name) "/" (t.name) } { (s.name) "." (t.name) } }
                        td.num { @if t.approximate { "≈ " } (t.rows) }
                        td { (t.last_load_at.as_deref().map(when).unwrap_or_else(|| "\u{2014}".into())) }
                    }
                } }
            } }
        }
    })
}

fn render(
    state_section: Markup,
    signed: &Signed,
    sql: &str,
    error: Option<&str>,
    result: Option<&QueryResult>,
    status: StatusCode,
) -> Response {
    let body = html! {
        h1 { "Warehouse" }
        (state_section)
        (sql_box(signed, sql, error))
        @if let Some(r) = result {
            section aria-labelledby="result-h" {
                h2 #result-h { "Result" }
                p role="status" { (r.rows.len()) " rows" @if r.truncated { " (cut: more rows exist)" } }
                (results_table("Query result", &r.columns, &r.rows))
            }
        }
    };
    html(
        status,
        layout::page(Some(signed), Nav::Warehouse, "Warehouse", body),
    )
}

/// `GET /warehouse`.
pub(crate) async fn page(State(state): State<Arc<AppState>>, signed: Signed) -> Response {
    match status_section(&state).await {
        Ok(s) => render(s, &signed, "", None, None, StatusCode::OK),
        Err(e) => error_page(&signed, e),
    }
}

/// `GET /warehouse/{schema}/{table}`: columns, types and the newest rows.
pub(crate) async fn table(
    State(state): State<Arc<AppState>>,
    signed: Signed,
    Path((schema, table)): Path<(String, String)>,
) -> Response {
    let data = match warehouse(&state) {
        Ok(w) => w.table(&schema, &table, 50).await.map_err(ApiError::from),
        Err(e) => Err(e),
    };
    let data = match data {
        Ok(d) => d,
        Err(e) => return error_page(&signed, e),
    };
    let body = html! {
        h1 { code { (schema) "." (table) } }
        p { a href="/warehouse" { "All tables" } }
        div.table-wrap tabindex="0" role="region" aria-label="Table, scrolls sideways on narrow screens" { table {
            caption { "Columns" }
            thead { tr { th scope="col" { "Column" } th scope="col" { "Type" } } }
            tbody { @for c in &data.columns { tr { th scope="row" { code { (c.name) } } td { (c.ty) } } } }
        } }
        h2 { "Newest rows" }
        (results_table(&format!("Newest {} rows", data.rows.len()), &data.columns, &data.rows))
    };
    html(
        StatusCode::OK,
        layout::page(
            Some(&signed),
            Nav::Warehouse,
            &format!("{schema}.{table}"),
            body,
        ),
    )
}

/// RFC 4180 CSV of a query result.
pub fn to_csv(r: &QueryResult) -> String {
    fn field(s: &str) -> String {
        if s.contains([',', '"', '\n', '\r']) {
            format!("\"{}\"", s.replace('"', "\"\""))
        } else {
            s.to_string()
        }
    }
    let mut out = String::new();
    let head: Vec<String> = r.columns.iter().map(|c| field(&c.name)).collect();
    out.push_str(&head.join(","));
    out.push_str("\r\n");
    for row in &r.rows {
        let line: Vec<String> = row.iter().map(|v| field(&cell(v))).collect();
        out.push_str(&line.join(","));
        out.push_str("\r\n");
    }
    out
}

/// `POST /warehouse`: runs the SQL box (`format=csv` downloads the result).
pub(crate) async fn query(
    State(state): State<Arc<AppState>>,
    signed: Signed,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let form = Form::parse(&body);
    if let Err(r) = check_form(&headers, &signed, &form) {
        return r.into_response();
    }
    let sql = form.get("sql").to_string();
    let result = if sql.trim().is_empty() {
        Err(ApiError::bad("bad_query", "Enter a query."))
    } else {
        match warehouse(&state) {
            Ok(w) => w.query(&sql).await.map_err(ApiError::from),
            Err(e) => Err(e),
        }
    };
    if form.get("format") == "csv"
        && let Ok(r) = &result
    {
        return (
            [
                (
                    header::CONTENT_TYPE,
                    HeaderValue::from_static("text/csv; charset=utf-8"),
                ),
                (
                    header::CONTENT_DISPOSITION,
                    HeaderValue::from_static("attachment; filename=\"query.csv\""),
                ),
            ],
            to_csv(r),
        )
            .into_response();
    }
    let section = match status_section(&state).await {
        Ok(s) => s,
        Err(e) => return error_page(&signed, e),
    };
    match result {
        Ok(r) => render(section, &signed, &sql, None, Some(&r), StatusCode::OK),
        Err(e @ ApiError::BadRequest { .. }) => {
            let msg = e.to_string();
            render(
                section,
                &signed,
                &sql,
                Some(&msg),
                None,
                StatusCode::BAD_REQUEST,
            )
        }
        Err(e) => error_page(&signed, e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn csv_quotes_what_needs_quoting() {
        let r = QueryResult {
            columns: vec![
                tributary_warehouse::Column {
                    name: "a".into(),
                    ty: "text".into(),
                },
                tributary_warehouse::Column {
                    name: "b".into(),
                    ty: "bigint".into(),
                },
            ],
            rows: vec![
                vec![Value::from("x, \"y\"\nz"), Value::from(3)],
                vec![Value::Null, Value::from(true)],
            ],
            truncated: false,
            truncated_reason: None,
        };
        assert_eq!(to_csv(&r), "a,b\r\n\"x, \"\"y\"\"\nz\",3\r\n,true\r\n");
    }
}
