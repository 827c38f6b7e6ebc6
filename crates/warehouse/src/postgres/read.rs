//! The read side of the PostgreSQL warehouse: status, table browsing and read-only SQL.
//!
//! Reads use their own pool whose sessions default to read-only transactions. A query
//! runs as `BEGIN READ ONLY; SET LOCAL statement_timeout …; <statement>; ROLLBACK` —
//! always rolled back, so not even a `set_config` survives it. The statement is first
//! prepared (which also refuses several statements in one string and yields the column
//! types), then executed in the text protocol so every type, including ones this crate
//! has no decoder for, comes back readable; values are turned into JSON by type.
//! Results are cut at the row limit while streaming.

use std::time::Duration;

use chrono::{DateTime, NaiveDateTime, Utc};
use deadpool_postgres::{Object, Pool};
use futures::{StreamExt, pin_mut};
use serde_json::Value;
use tokio_postgres::SimpleQueryMessage;
use tokio_postgres::types::Type;

use super::column_type;
use crate::naming::{DISCARDS_TABLE, quote};
use crate::outcome::CONSUMER;
use crate::types::format_timestamp;
use crate::{Column, QueryResult, SchemaStatus, TableData, TableStatus, WarehouseError};

/// Tables above this many rows (planner estimate) report the estimate, not a count.
const EXACT_COUNT_LIMIT: f64 = 1_000_000.0;

fn unavailable(e: impl std::fmt::Display) -> WarehouseError {
    WarehouseError::Unavailable(e.to_string())
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
        let mut counts = Vec::new();
        for row in &tables {
            let schema: String = row.get(0);
            let table: String = row.get(1);
            let estimate: f64 = row.get(2);
            let Some(si) = schemas.iter().position(|s| *s == schema) else {
                continue;
            };
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
                "SELECT column_name::text, data_type::text FROM information_schema.columns
                 WHERE table_schema = $1 AND table_name = $2 ORDER BY ordinal_position",
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

pub(super) async fn query(
    pool: &Pool,
    sql: &str,
    timeout: Duration,
    max_rows: usize,
) -> Result<QueryResult, WarehouseError> {
    with_client(pool, async |c| run_read(c, sql, timeout, max_rows).await).await
}

/// Runs one statement in a read-only transaction that is always rolled back.
async fn run_read(
    c: &Object,
    sql: &str,
    timeout: Duration,
    max_rows: usize,
) -> Result<QueryResult, WarehouseError> {
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

async fn run_statement(
    c: &Object,
    sql: &str,
    max_rows: usize,
) -> Result<QueryResult, WarehouseError> {
    let stmt = c.prepare(sql).await.map_err(read_error)?;
    let types: Vec<Type> = stmt.columns().iter().map(|c| c.type_().clone()).collect();
    let columns: Vec<Column> = stmt
        .columns()
        .iter()
        .map(|c| Column {
            name: c.name().to_string(),
            ty: type_name(c.type_()),
        })
        .collect();
    let stream = c.simple_query_raw(sql).await.map_err(read_error)?;
    pin_mut!(stream);
    let mut rows = Vec::new();
    let mut truncated = false;
    while let Some(message) = stream.next().await {
        if let SimpleQueryMessage::Row(row) = message.map_err(read_error)? {
            if rows.len() == max_rows {
                truncated = true;
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
    Ok(QueryResult {
        columns,
        rows,
        truncated,
    })
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
            "t" => Value::Bool(true),
            "f" => Value::Bool(false),
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
