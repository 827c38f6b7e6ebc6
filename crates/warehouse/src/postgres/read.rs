//! The read side of the PostgreSQL warehouse: status, table browsing and read-only SQL.
//!
//! Status and table browsing use the loader's credentials on their own pool whose
//! sessions default to read-only transactions, and run only Tributary's SQL.
//!
//! A caller's query (already through [`guard`](crate::query::guard)) runs on a
//! session of the query role ([`super::query_role`]), never the loader's: the
//! session's role is checked first, then `BEGIN READ ONLY; SET LOCAL
//! statement_timeout …; <statement>; ROLLBACK; DISCARD ALL` — so no setting, advisory
//! lock, `LISTEN` or prepared statement outlives it; a session where any of that
//! fails is closed, not reused. The statement is first prepared alone (PostgreSQL
//! refuses several statements in a prepared one, and it yields the columns), then a
//! query is run through a wrapper that cuts every cell in the server —
//! `SELECT left(q.c1::text, cap + 1), … FROM (<statement>) AS q(c1, …) LIMIT
//! max_rows + 1` — so no huge cell crosses the wire (a cell is then cut to `cap`
//! bytes on a character boundary); `EXPLAIN` runs as it is. Rows
//! are streamed (`query_raw`) into the answer's [`Budget`]; when it is full the
//! statement is cancelled server-side and reading stops. Values are turned into
//! JSON by the original column type. A session whose statement was cancelled is
//! closed, not reused.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use chrono::{DateTime, NaiveDateTime, Utc};
use deadpool_postgres::{Object, Pool};
use futures::{StreamExt, pin_mut};
use serde_json::Value;
use tokio_postgres::SimpleQueryMessage;
use tokio_postgres::types::{FromSql, Type};

use super::column_type;
use super::query_role::{QueryRole, check_session};
use crate::naming::{DISCARDS_TABLE, quote};
use crate::outcome::CONSUMER;
use crate::query::guard::StatementKind;
use crate::query::{Budget, Limits, cell_cap, cut_str};
use crate::types::format_timestamp;
use crate::{Column, QueryResult, SchemaStatus, TableData, TableStatus, WarehouseError};

/// Tables above this many rows (planner estimate) report the estimate, not a count
/// (only schemas whose counters are not built yet).
const EXACT_COUNT_LIMIT: f64 = 1_000_000.0;

fn unavailable(e: impl std::fmt::Display) -> WarehouseError {
    WarehouseError::Unavailable(e.to_string())
}

/// A failed statement of Tributary's own, with the server's message.
fn pg(e: tokio_postgres::Error) -> WarehouseError {
    match e.as_db_error() {
        Some(db) => WarehouseError::Unavailable(format!("{}: {}", db.code().code(), db.message())),
        None => unavailable(e),
    }
}

/// Maps an error of the caller's statement: their SQL (400) or the server (503).
fn read_error(e: tokio_postgres::Error) -> WarehouseError {
    let Some(db) = e.as_db_error() else {
        return unavailable(e);
    };
    let code = db.code().code();
    if code == "57014" {
        WarehouseError::BadQuery("query exceeded the time limit or was canceled".into())
    } else if code == "25006" {
        WarehouseError::BadQuery("only read-only statements are allowed".into())
    } else if ["08", "53", "57", "58", "XX"]
        .iter()
        .any(|p| code.starts_with(p))
    {
        unavailable(db.message())
    } else {
        WarehouseError::BadQuery(db.message().to_string())
    }
}

async fn client(pool: &Pool) -> Result<Object, WarehouseError> {
    pool.get().await.map_err(unavailable)
}

/// Runs `f` on a pooled read connection; a connection that failed is not reused.
async fn with_client<T>(
    pool: &Pool,
    f: impl AsyncFnOnce(&Object) -> Result<T, WarehouseError>,
) -> Result<T, WarehouseError> {
    let c = client(pool).await?;
    let result = f(&c).await;
    if matches!(result, Err(WarehouseError::Unavailable(_))) || c.is_closed() {
        let _ = Object::take(c);
    }
    result
}

pub(super) async fn status(
    pool: &Pool,
    state: &str,
    timeout: Duration,
) -> Result<(Vec<SchemaStatus>, Option<DateTime<Utc>>), WarehouseError> {
    with_client(pool, async |c| {
        let schemas: Vec<String> = c
            .query(
                "SELECT table_schema::text FROM information_schema.tables
                 WHERE table_name = $1 ORDER BY 1",
                &[&DISCARDS_TABLE],
            )
            .await
            .map_err(unavailable)?
            .iter()
            .map(|r| r.get(0))
            .collect();
        let tables = c
            .query(
                "SELECT n.nspname::text, c.relname::text, c.reltuples::float8
                 FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
                 WHERE n.nspname = ANY($1) AND c.relkind IN ('r', 'p')
                 ORDER BY 1, 2",
                &[&schemas],
            )
            .await
            .map_err(unavailable)?;
        let mut out: Vec<SchemaStatus> = schemas
            .iter()
            .map(|s| SchemaStatus {
                name: s.clone(),
                tables: Vec::new(),
            })
            .collect();
        // The loader's counters (module `stats`) for the schemas that have them; a
        // schema loaded before they existed is counted until its next load builds
        // them (the state tables are absent before the loader's first start).
        let built: HashSet<String> = c
            .query(
                &format!("SELECT schema_name FROM {state}.stats_meta WHERE key = 'built'"),
                &[],
            )
            .await
            .map(|rows| rows.iter().map(|r| r.get(0)).collect())
            .unwrap_or_default();
        let mut counted: HashMap<(String, String), (i64, Option<String>)> = HashMap::new();
        if !built.is_empty() {
            for r in c
                .query(
                    &format!(
                        "SELECT schema_name, table_name, rows, last_load_at FROM {state}.table_stats
                         WHERE schema_name = ANY($1)"
                    ),
                    &[&schemas],
                )
                .await
                .map_err(unavailable)?
            {
                counted.insert((r.get(0), r.get(1)), (r.get(2), r.get(3)));
            }
        }
        let mut counts = Vec::new();
        for row in &tables {
            let schema: String = row.get(0);
            let table: String = row.get(1);
            let estimate: f64 = row.get(2);
            let Some(si) = schemas.iter().position(|s| *s == schema) else {
                continue;
            };
            if built.contains(&schema) {
                let (rows, last_load_at) = counted
                    .remove(&(schema.clone(), table.clone()))
                    .unwrap_or((0, None));
                out[si].tables.push(TableStatus {
                    name: table,
                    rows: rows.max(0) as u64,
                    approximate: false,
                    last_load_at,
                });
                continue;
            }
            let approximate = estimate >= EXACT_COUNT_LIMIT;
            if !approximate {
                counts.push((
                    si,
                    out[si].tables.len(),
                    format!("SELECT count(*) FROM {}.{}", quote(&schema), quote(&table)),
                ));
            }
            out[si].tables.push(TableStatus {
                name: table,
                rows: estimate.max(0.0) as u64,
                approximate,
                last_load_at: None,
            });
        }
        if !counts.is_empty() {
            c.batch_execute(&format!(
                "BEGIN READ ONLY; SET LOCAL statement_timeout = {}",
                timeout.as_millis()
            ))
            .await
            .map_err(unavailable)?;
            // One round trip for every count.
            let sql = counts
                .iter()
                .enumerate()
                .map(|(i, (_, _, q))| format!("SELECT {i}::int, ({q})::bigint"))
                .collect::<Vec<_>>()
                .join(" UNION ALL ");
            let result = c.query(&sql, &[]).await;
            let _ = c.batch_execute("ROLLBACK").await;
            match result {
                Ok(rows) => {
                    for row in rows {
                        let i: i32 = row.get(0);
                        let n: i64 = row.get(1);
                        if let Some((si, ti, _)) = counts.get(i as usize) {
                            out[*si].tables[*ti].rows = n.max(0) as u64;
                        }
                    }
                }
                // A table dropped between the listing and the count (another
                // loader's schema, a DBA's DROP) must not fail the whole status:
                // count one by one and keep the estimate for any that vanished.
                Err(e) if e.code().is_some() => {
                    for (si, ti, q) in &counts {
                        if let Ok(row) = c.query_one(q.as_str(), &[]).await {
                            let n: i64 = row.get(0);
                            out[*si].tables[*ti].rows = n.max(0) as u64;
                        }
                    }
                }
                Err(e) => return Err(unavailable(e)),
            }
        }
        let last: Option<DateTime<Utc>> = c
            .query_opt(
                &format!(
                    "SELECT max(updated_at) FROM {state}.loader_state WHERE consumer = $1 AND seq > 0
                     HAVING max(updated_at) IS NOT NULL"
                ),
                &[&CONSUMER],
            )
            .await
            .ok()
            .flatten()
            .map(|r| r.get(0));
        Ok((out, last))
    })
    .await
}

/// Events of `day` per schema from the loader's counters (schemas with counters).
pub(super) async fn events_on(
    pool: &Pool,
    state: &str,
    day: &str,
) -> Result<HashMap<String, u64>, WarehouseError> {
    with_client(pool, async |c| {
        let rows = c
            .query(
                &format!(
                    "SELECT m.schema_name, COALESCE(d.events, 0) FROM {state}.stats_meta m
                     LEFT JOIN {state}.day_stats d ON d.schema_name = m.schema_name AND d.day = $1
                     WHERE m.key = 'built'"
                ),
                &[&day],
            )
            .await
            .map_err(unavailable)?;
        Ok(rows
            .iter()
            .map(|r| (r.get::<_, String>(0), r.get::<_, i64>(1).max(0) as u64))
            .collect())
    })
    .await
}

pub(super) async fn table(
    pool: &Pool,
    schema: &str,
    table: &str,
    limit: usize,
    timeout: Duration,
) -> Result<TableData, WarehouseError> {
    with_client(pool, async |c| {
        let cols: Vec<(String, String)> = c
            .query(
                // Warehouse schemas only (they hold the discards table): never the
                // state schema, whose `query_role` holds a password.
                "SELECT column_name::text, data_type::text FROM information_schema.columns
                 WHERE table_schema = $1 AND table_name = $2
                   AND EXISTS (SELECT 1 FROM pg_class d JOIN pg_namespace n
                               ON n.oid = d.relnamespace
                               WHERE n.nspname = $1 AND d.relname = 'tributary_discards')
                 ORDER BY ordinal_position",
                &[&schema, &table],
            )
            .await
            .map_err(unavailable)?
            .iter()
            .map(|r| (r.get(0), r.get(1)))
            .collect();
        if cols.is_empty() {
            return Err(WarehouseError::NotFound(format!("table {schema}.{table}")));
        }
        let order = if cols.iter().any(|(n, _)| n == "received_at") {
            " ORDER BY \"received_at\" DESC NULLS LAST"
        } else {
            ""
        };
        let list = cols
            .iter()
            .map(|(n, _)| quote(n))
            .collect::<Vec<_>>()
            .join(", ");
        let sql = format!(
            "SELECT {list} FROM {}.{}{order} LIMIT {limit}",
            quote(schema),
            quote(table)
        );
        let result = run_read(c, &sql, timeout, limit).await?;
        Ok(TableData {
            columns: cols
                .iter()
                .map(|(n, t)| Column {
                    name: n.clone(),
                    ty: column_type(t).as_str().to_string(),
                })
                .collect(),
            rows: result.rows,
        })
    })
    .await
}

/// Columns of the given tables of a warehouse schema (absent tables left out).
pub(super) async fn columns(
    pool: &Pool,
    schema: &str,
    tables: &[String],
) -> Result<std::collections::HashMap<String, std::collections::HashSet<String>>, WarehouseError> {
    with_client(pool, async |c| {
        let rows = c
            .query(
                "SELECT table_name::text, column_name::text FROM information_schema.columns
                 WHERE table_schema = $1 AND table_name = ANY($2)
                   AND EXISTS (SELECT 1 FROM pg_class d JOIN pg_namespace n
                               ON n.oid = d.relnamespace
                               WHERE n.nspname = $1 AND d.relname = 'tributary_discards')",
                &[&schema, &tables],
            )
            .await
            .map_err(unavailable)?;
        let mut out: std::collections::HashMap<String, std::collections::HashSet<String>> =
            std::collections::HashMap::new();
        for r in rows {
            out.entry(r.get(0)).or_default().insert(r.get(1));
        }
        Ok(out)
    })
    .await
}

/// Runs Tributary's own read-only statements (tables schema-qualified) in one
/// read-only transaction each, and returns each one's rows as JSON.
pub(super) async fn read_rows(
    pool: &Pool,
    sqls: &[String],
    timeout: Duration,
) -> Result<Vec<Vec<Vec<Value>>>, WarehouseError> {
    with_client(pool, async |c| {
        let mut out = Vec::with_capacity(sqls.len());
        for sql in sqls {
            out.push(run_read(c, sql, timeout, usize::MAX).await?.rows);
        }
        Ok(out)
    })
    .await
}

/// Runs Tributary's own read (table browsing) in a read-only transaction that is
/// always rolled back.
async fn run_read(
    c: &Object,
    sql: &str,
    timeout: Duration,
    max_rows: usize,
) -> Result<TableRows, WarehouseError> {
    c.batch_execute(&format!(
        "BEGIN READ ONLY; SET LOCAL statement_timeout = {}; SET LOCAL TimeZone = 'UTC'",
        timeout.as_millis().max(1)
    ))
    .await
    .map_err(unavailable)?;
    let result = run_statement(c, sql, max_rows).await;
    if let Err(e) = c.batch_execute("ROLLBACK").await {
        return Err(unavailable(e));
    }
    result
}

struct TableRows {
    rows: Vec<Vec<Value>>,
}

async fn run_statement(
    c: &Object,
    sql: &str,
    max_rows: usize,
) -> Result<TableRows, WarehouseError> {
    let stmt = c.prepare(sql).await.map_err(read_error)?;
    let types: Vec<Type> = stmt.columns().iter().map(|c| c.type_().clone()).collect();
    let stream = c.simple_query_raw(sql).await.map_err(read_error)?;
    pin_mut!(stream);
    let mut rows = Vec::new();
    while let Some(message) = stream.next().await {
        if let SimpleQueryMessage::Row(row) = message.map_err(read_error)? {
            if rows.len() == max_rows {
                break;
            }
            let values = (0..row.len())
                .map(|i| {
                    let text = row.try_get(i).ok().flatten();
                    text_value(text, types.get(i).unwrap_or(&Type::TEXT))
                })
                .collect();
            rows.push(values);
        }
    }
    Ok(TableRows { rows })
}

pub(super) async fn query(
    role: &QueryRole,
    sql: &str,
    kind: StatementKind,
    limits: Limits,
) -> Result<QueryResult, WarehouseError> {
    let (pool, _, loader_role) = role.pool().await?;
    let c = client(&pool).await?;
    let mut reuse = true;
    let result = async {
        check_session(&c, &loader_role).await?;
        c.batch_execute(&format!(
            "BEGIN READ ONLY; SET LOCAL statement_timeout = {}; SET LOCAL TimeZone = 'UTC'",
            limits.timeout.as_millis().max(1)
        ))
        .await
        .map_err(pg)?;
        let (result, complete) = match run_query(&c, sql, kind, &limits).await {
            Ok((r, complete)) => (Ok(r), complete),
            Err(e) => (Err(e), true),
        };
        if !complete {
            // The statement was cancelled mid-answer; the cancel could still land on
            // a later statement of this session, so the session is closed (which
            // also ends its transaction) instead of cleaned.
            reuse = false;
            return result;
        }
        c.batch_execute("ROLLBACK").await.map_err(pg)?;
        // Alone: DISCARD ALL cannot run in the implicit transaction of a batch.
        c.batch_execute("DISCARD ALL").await.map_err(pg)?;
        // DISCARD ALL also dropped the client's cached type-lookup statements.
        c.clear_type_cache();
        result
    }
    .await;
    if !reuse
        || matches!(
            result,
            Err(WarehouseError::Unavailable(_) | WarehouseError::QueryRoleUnsafe(_))
        )
        || c.is_closed()
    {
        // The session may be mid-transaction or hold session state: never reuse it.
        let _ = Object::take(c);
    }
    result
}

/// Any value's wire bytes (text types, `json`, and everything the wrapper made text).
struct Raw<'a>(&'a [u8]);

impl<'a> FromSql<'a> for Raw<'a> {
    fn from_sql(
        _ty: &Type,
        raw: &'a [u8],
    ) -> Result<Self, Box<dyn std::error::Error + Sync + Send>> {
        Ok(Raw(raw))
    }

    fn accepts(_ty: &Type) -> bool {
        true
    }
}

/// Runs the caller's statement; the flag is false when reading stopped early and the
/// statement was cancelled.
async fn run_query(
    c: &Object,
    sql: &str,
    kind: StatementKind,
    limits: &Limits,
) -> Result<(QueryResult, bool), WarehouseError> {
    let user = c.prepare(sql).await.map_err(read_error)?;
    let types: Vec<Type> = user.columns().iter().map(|c| c.type_().clone()).collect();
    let columns: Vec<Column> = user
        .columns()
        .iter()
        .map(|c| Column {
            name: c.name().to_string(),
            ty: type_name(c.type_()),
        })
        .collect();
    drop(user);
    let cap = cell_cap(limits.max_bytes, types.len());
    let stmt = match kind {
        StatementKind::Explain => c.prepare(sql).await.map_err(read_error)?,
        StatementKind::Query => c
            .prepare(&wrapped(sql, types.len(), cap, limits.max_rows))
            .await
            .map_err(read_error)?,
    };
    // Boxed, not pinned on the stack: it is dropped before the cancel below.
    let mut stream = Box::pin(
        c.query_raw(&stmt, std::iter::empty::<i32>())
            .await
            .map_err(read_error)?,
    );
    let mut budget = Budget::new(limits.max_rows, limits.max_bytes);
    let mut rows = Vec::new();
    let mut complete = true;
    while let Some(row) = stream.next().await {
        let row = row.map_err(read_error)?;
        let mut values = Vec::with_capacity(types.len());
        for (i, ty) in types.iter().enumerate() {
            let raw: Option<Raw<'_>> = row.try_get(i).map_err(unavailable)?;
            let Some(Raw(bytes)) = raw else {
                values.push(Value::Null);
                continue;
            };
            // jsonb's binary form is a version byte and its text.
            let bytes = match (kind, ty) {
                (StatementKind::Explain, &Type::JSONB) => bytes.get(1..).unwrap_or_default(),
                _ => bytes,
            };
            let text = String::from_utf8_lossy(bytes);
            let text = match cut_str(&text, cap) {
                Some(prefix) => {
                    budget.cell_cut();
                    prefix
                }
                None => &text,
            };
            values.push(text_value(Some(text), ty));
        }
        if !budget.admit(&values) {
            complete = false;
            break;
        }
        rows.push(values);
    }
    drop(stream);
    if !complete {
        // Unread rows would still be paged through the session: stop the server.
        let _ = c.cancel_token().cancel_query(tokio_postgres::NoTls).await;
    }
    Ok((
        QueryResult {
            columns,
            rows,
            truncated: budget.truncated.is_some(),
            truncated_reason: budget.truncated,
        },
        complete,
    ))
}

/// The caller's query as a subquery whose cells are cut to `cap + 1` characters in
/// the server (one more than kept, so a cut is seen) and whose rows stop one past
/// `max_rows`. The query ends on its own line, so a trailing `--` comment cannot
/// swallow the closing parenthesis.
fn wrapped(sql: &str, columns: usize, cap: usize, max_rows: usize) -> String {
    let body = sql.trim_end_matches(|c: char| c.is_whitespace() || c == ';');
    let limit = max_rows.saturating_add(1);
    if columns == 0 {
        return format!("SELECT FROM (\n{body}\n) AS q LIMIT {limit}");
    }
    let list = (1..=columns)
        .map(|i| format!("left(q.c{i}::text, {})", cap.saturating_add(1)))
        .collect::<Vec<_>>()
        .join(", ");
    let names = (1..=columns)
        .map(|i| format!("c{i}"))
        .collect::<Vec<_>>()
        .join(", ");
    format!("SELECT {list} FROM (\n{body}\n) AS q({names}) LIMIT {limit}")
}

/// The API type name of a PostgreSQL type.
fn type_name(ty: &Type) -> String {
    match *ty {
        Type::BOOL => "boolean",
        Type::INT2 | Type::INT4 | Type::INT8 | Type::OID => "bigint",
        Type::FLOAT4 | Type::FLOAT8 => "double",
        Type::TIMESTAMPTZ | Type::TIMESTAMP => "timestamp",
        Type::TEXT | Type::VARCHAR | Type::BPCHAR | Type::NAME | Type::UNKNOWN => "text",
        _ => return ty.name().to_string(),
    }
    .to_string()
}

/// A value in PostgreSQL's text format as JSON, by type.
fn text_value(text: Option<&str>, ty: &Type) -> Value {
    let Some(s) = text else { return Value::Null };
    let string = || Value::String(s.to_string());
    match *ty {
        Type::BOOL => match s {
            "t" | "true" => Value::Bool(true),
            "f" | "false" => Value::Bool(false),
            _ => string(),
        },
        Type::INT2 | Type::INT4 | Type::INT8 | Type::OID => {
            s.parse::<i64>().map_or_else(|_| string(), Value::from)
        }
        Type::FLOAT4 | Type::FLOAT8 => s
            .parse::<f64>()
            .ok()
            .and_then(serde_json::Number::from_f64)
            .map_or_else(string, Value::Number),
        Type::NUMERIC => match s.parse::<i64>() {
            Ok(i) => Value::from(i),
            Err(_) => s
                .parse::<f64>()
                .ok()
                .and_then(serde_json::Number::from_f64)
                .map_or_else(string, Value::Number),
        },
        Type::JSON | Type::JSONB => serde_json::from_str(s).unwrap_or_else(|_| string()),
        Type::TIMESTAMPTZ => DateTime::parse_from_str(s, "%Y-%m-%d %H:%M:%S%.f%#z")
            .map(|t| Value::String(format_timestamp(&t.with_timezone(&Utc))))
            .unwrap_or_else(|_| string()),
        Type::TIMESTAMP => NaiveDateTime::parse_from_str(s, "%Y-%m-%d %H:%M:%S%.f")
            .map(|t| Value::String(format_timestamp(&t.and_utc())))
            .unwrap_or_else(|_| string()),
        _ => string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn converts_text_values_by_type() {
        assert_eq!(text_value(None, &Type::TEXT), Value::Null);
        assert_eq!(text_value(Some("t"), &Type::BOOL), json!(true));
        assert_eq!(text_value(Some("f"), &Type::BOOL), json!(false));
        assert_eq!(text_value(Some("42"), &Type::INT8), json!(42));
        assert_eq!(text_value(Some("2.5"), &Type::FLOAT8), json!(2.5));
        assert_eq!(text_value(Some("3"), &Type::FLOAT8), json!(3.0));
        assert_eq!(text_value(Some("7"), &Type::NUMERIC), json!(7));
        assert_eq!(text_value(Some("NaN"), &Type::FLOAT8), json!("NaN"));
        assert_eq!(text_value(Some("12.50"), &Type::NUMERIC), json!(12.5));
        assert_eq!(text_value(Some("{\"a\":1}"), &Type::JSONB), json!({"a": 1}));
        assert_eq!(
            text_value(Some("2026-11-27 05:10:53.123+00"), &Type::TIMESTAMPTZ),
            json!("2026-11-27T05:10:53.123Z")
        );
        assert_eq!(
            text_value(Some("2026-11-27 05:10:53+00"), &Type::TIMESTAMPTZ),
            json!("2026-11-27T05:10:53.000Z")
        );
        assert_eq!(
            text_value(Some("infinity"), &Type::TIMESTAMPTZ),
            json!("infinity")
        );
        assert_eq!(text_value(Some("x"), &Type::INTERVAL), json!("x"));
    }

    #[test]
    fn names_types_like_the_api() {
        assert_eq!(type_name(&Type::INT8), "bigint");
        assert_eq!(type_name(&Type::TIMESTAMPTZ), "timestamp");
        assert_eq!(type_name(&Type::NUMERIC), "numeric");
        assert_eq!(type_name(&Type::VARCHAR), "text");
    }
}
