//! The read side of the SQLite warehouse: status, table browsing and read-only SQL.
//!
//! Every call opens fresh `SQLITE_OPEN_READ_ONLY` connections on a blocking thread;
//! WAL lets them read a consistent snapshot while the loader writes. A query runs on an
//! in-memory read-only connection with every schema file attached under its schema
//! name (SQLite attaches at most 10 files per connection; with more schemas only the
//! ones the SQL mentions are attached). Attached files inherit the read-only flag, a
//! statement SQLite does not report as read-only (`VACUUM INTO`, writes) is refused,
//! only one statement is accepted, and a timer interrupts it at the time limit.

use std::collections::HashSet;
use std::path::Path;
use std::time::Duration;

use chrono::{DateTime, Utc};
use rusqlite::types::ValueRef;
use rusqlite::{Connection, ErrorCode, OpenFlags, OptionalExtension};
use serde_json::Value;

use super::{column_type, schema_path, stored_timestamp, table_columns};
use crate::naming::{STATE_TABLE, quote, validate_schema_name};
use crate::types::ColumnType;
use crate::{Column, QueryResult, SchemaStatus, TableData, TableStatus, WarehouseError};

/// SQLite's default `SQLITE_MAX_ATTACHED`.
const MAX_ATTACHED: usize = 10;

pub(super) async fn run<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, WarehouseError> + Send + 'static,
) -> Result<T, WarehouseError> {
    match tokio::task::spawn_blocking(f).await {
        Ok(r) => r,
        Err(e) => Err(WarehouseError::Unavailable(format!(
            "read task failed: {e}"
        ))),
    }
}

fn unavailable(e: impl std::fmt::Display) -> WarehouseError {
    WarehouseError::Unavailable(e.to_string())
}

fn open_ro(path: &Path) -> rusqlite::Result<Connection> {
    let conn = Connection::open_with_flags(
        path,
        OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )?;
    conn.busy_timeout(Duration::from_secs(5))?;
    Ok(conn)
}

/// Schema names that have a file in `dir`, sorted.
fn list_schemas(dir: &Path) -> Result<Vec<String>, WarehouseError> {
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(unavailable(e)),
    };
    let mut out = Vec::new();
    for entry in entries {
        let entry = entry.map_err(unavailable)?;
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        if let Some(schema) = name.strip_suffix(".sqlite")
            && validate_schema_name(schema).is_ok()
        {
            out.push(schema.to_string());
        }
    }
    out.sort();
    Ok(out)
}

fn user_tables(conn: &Connection) -> rusqlite::Result<Vec<String>> {
    let mut stmt = conn.prepare(
        "SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite\\_%' ESCAPE '\\' ORDER BY name",
    )?;
    let names: Vec<String> = stmt
        .query_map([], |r| r.get(0))?
        .collect::<Result<_, _>>()?;
    Ok(names.into_iter().filter(|n| n != STATE_TABLE).collect())
}

pub(super) fn status(
    dir: &Path,
) -> Result<(Vec<SchemaStatus>, Option<DateTime<Utc>>), WarehouseError> {
    let mut schemas = Vec::new();
    for schema in list_schemas(dir)? {
        let conn = open_ro(&schema_path(dir, &schema)).map_err(unavailable)?;
        let mut tables = Vec::new();
        for name in user_tables(&conn).map_err(unavailable)? {
            let rows: i64 = conn
                .query_row(&format!("SELECT count(*) FROM {}", quote(&name)), [], |r| {
                    r.get(0)
                })
                .map_err(unavailable)?;
            tables.push(TableStatus {
                name,
                rows: rows.max(0) as u64,
                approximate: false,
            });
        }
        schemas.push(SchemaStatus {
            name: schema,
            tables,
        });
    }
    let state = dir.join(super::STATE_FILE);
    let last_load_at = if state.exists() {
        let conn = open_ro(&state).map_err(unavailable)?;
        // The newest load of any log this warehouse has loaded.
        conn.query_row("SELECT MAX(updated_at) FROM loader_state", [], |r| {
            r.get::<_, Option<String>>(0)
        })
        .optional()
        .map_err(unavailable)?
        .flatten()
        .and_then(|s| stored_timestamp(&s))
    } else {
        None
    };
    Ok((schemas, last_load_at))
}

pub(super) fn table(
    dir: &Path,
    schema: &str,
    table: &str,
    limit: usize,
) -> Result<TableData, WarehouseError> {
    let path = schema_path(dir, schema);
    if !path.exists() {
        return Err(WarehouseError::NotFound(format!("schema {schema:?}")));
    }
    let conn = open_ro(&path).map_err(unavailable)?;
    let cols = if table == STATE_TABLE {
        Vec::new()
    } else {
        table_columns(&conn, table).map_err(unavailable)?
    };
    if cols.is_empty() {
        return Err(WarehouseError::NotFound(format!("table {schema}.{table}")));
    }
    let types: Vec<ColumnType> = cols.iter().map(|(_, t)| column_type(t)).collect();
    let order = if cols.iter().any(|(n, _)| n == "received_at") {
        " ORDER BY \"received_at\" DESC"
    } else {
        ""
    };
    let list = cols
        .iter()
        .map(|(n, _)| quote(n))
        .collect::<Vec<_>>()
        .join(", ");
    let sql = format!("SELECT {list} FROM {}{order} LIMIT ?1", quote(table));
    let mut stmt = conn.prepare(&sql).map_err(unavailable)?;
    let limit = i64::try_from(limit).unwrap_or(i64::MAX);
    let mut rows_out = Vec::new();
    let mut rows = stmt.query([limit]).map_err(unavailable)?;
    while let Some(row) = rows.next().map_err(unavailable)? {
        let mut out = Vec::with_capacity(types.len());
        for (i, ty) in types.iter().enumerate() {
            out.push(json_value(row.get_ref(i).map_err(unavailable)?, Some(*ty)));
        }
        rows_out.push(out);
    }
    Ok(TableData {
        columns: cols
            .iter()
            .zip(&types)
            .map(|((n, _), t)| Column {
                name: n.clone(),
                ty: t.as_str().to_string(),
            })
            .collect(),
        rows: rows_out,
    })
}

/// A stored value as JSON; `ty` is the column's declared type when known.
fn json_value(v: ValueRef<'_>, ty: Option<ColumnType>) -> Value {
    match v {
        ValueRef::Null => Value::Null,
        ValueRef::Integer(i) if ty == Some(ColumnType::Boolean) => Value::Bool(i != 0),
        ValueRef::Integer(i) => Value::from(i),
        ValueRef::Real(f) => serde_json::Number::from_f64(f).map_or(Value::Null, Value::Number),
        ValueRef::Text(t) => Value::String(String::from_utf8_lossy(t).into_owned()),
        ValueRef::Blob(b) => Value::String(hex::encode(b)),
    }
}

/// Lowercased identifier-like words of `sql`.
fn words(sql: &str) -> HashSet<String> {
    sql.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
        .filter(|w| !w.is_empty())
        .map(str::to_ascii_lowercase)
        .collect()
}

fn query_error(e: rusqlite::Error, timeout: Duration) -> WarehouseError {
    match e.sqlite_error_code() {
        Some(ErrorCode::OperationInterrupted) => WarehouseError::BadQuery(format!(
            "query exceeded the time limit of {} s",
            timeout.as_secs_f64()
        )),
        Some(
            ErrorCode::DatabaseBusy
            | ErrorCode::DatabaseLocked
            | ErrorCode::SystemIoFailure
            | ErrorCode::CannotOpen
            | ErrorCode::OutOfMemory,
        ) => unavailable(e),
        _ => match e {
            rusqlite::Error::MultipleStatement => {
                WarehouseError::BadQuery("only one statement is allowed".into())
            }
            rusqlite::Error::SqliteFailure(_, Some(msg)) => WarehouseError::BadQuery(msg),
            other => WarehouseError::BadQuery(other.to_string()),
        },
    }
}

pub(super) fn query(
    dir: &Path,
    sql: &str,
    timeout: Duration,
    max_rows: usize,
    runtime: &tokio::runtime::Handle,
) -> Result<QueryResult, WarehouseError> {
    let mut schemas = list_schemas(dir)?;
    if schemas.len() > MAX_ATTACHED {
        let mentioned = words(sql);
        schemas.retain(|s| mentioned.contains(s));
        if schemas.len() > MAX_ATTACHED {
            return Err(WarehouseError::BadQuery(format!(
                "a query can use at most {MAX_ATTACHED} schemas"
            )));
        }
    }
    let conn = Connection::open_with_flags(
        ":memory:",
        OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
    .map_err(unavailable)?;
    conn.busy_timeout(Duration::from_secs(5))
        .map_err(unavailable)?;
    for schema in &schemas {
        let path = schema_path(dir, schema);
        let Some(path) = path.to_str() else { continue };
        conn.execute(&format!("ATTACH DATABASE ?1 AS {}", quote(schema)), [path])
            .map_err(unavailable)?;
    }

    let interrupt = conn.get_interrupt_handle();
    let timer = runtime.spawn(async move {
        tokio::time::sleep(timeout).await;
        interrupt.interrupt();
    });
    let result = run_query(&conn, sql, timeout, max_rows);
    timer.abort();
    result
}

fn run_query(
    conn: &Connection,
    sql: &str,
    timeout: Duration,
    max_rows: usize,
) -> Result<QueryResult, WarehouseError> {
    let mut stmt = conn.prepare(sql).map_err(|e| query_error(e, timeout))?;
    if !stmt.readonly() {
        return Err(WarehouseError::BadQuery(
            "only read-only statements are allowed".into(),
        ));
    }
    let declared: Vec<(String, Option<ColumnType>)> = stmt
        .columns()
        .map(|c| (c.name().to_string(), c.decl_type().map(column_type)))
        .collect();
    let mut inferred: Vec<Option<&'static str>> = vec![None; declared.len()];
    let mut out = Vec::new();
    let mut truncated = false;
    let mut rows = stmt.query([]).map_err(|e| query_error(e, timeout))?;
    while let Some(row) = rows.next().map_err(|e| query_error(e, timeout))? {
        if out.len() == max_rows {
            truncated = true;
            break;
        }
        let mut values = Vec::with_capacity(declared.len());
        for (i, (_, ty)) in declared.iter().enumerate() {
            let v = row.get_ref(i).map_err(|e| query_error(e, timeout))?;
            if inferred[i].is_none() {
                inferred[i] = match v {
                    ValueRef::Null => None,
                    ValueRef::Integer(_) => Some("bigint"),
                    ValueRef::Real(_) => Some("double"),
                    ValueRef::Text(_) => Some("text"),
                    ValueRef::Blob(_) => Some("blob"),
                };
            }
            values.push(json_value(v, *ty));
        }
        out.push(values);
    }
    let columns = declared
        .into_iter()
        .zip(inferred)
        .map(|((name, ty), inferred)| Column {
            name,
            ty: ty
                .map(ColumnType::as_str)
                .or(inferred)
                .unwrap_or("text")
                .to_string(),
        })
        .collect();
    Ok(QueryResult {
        columns,
        rows: out,
        truncated,
    })
}
