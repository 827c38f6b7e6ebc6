//! The read side of the SQLite warehouse: status, table browsing and read-only SQL.
//!
//! Every call opens fresh `SQLITE_OPEN_READ_ONLY` connections on a blocking thread;
//! WAL lets them read a consistent snapshot while the loader writes. A query runs on an
//! in-memory read-only connection with every schema file attached under its schema
//! name (SQLite attaches at most 10 files per connection; with more schemas only the
//! ones the SQL mentions are attached). Attached files inherit the read-only flag, a
//! statement SQLite does not report as read-only (`VACUUM INTO`, writes) is refused,
//! only one statement is accepted, and a timer interrupts it at the time limit.
//!
//! Invariants of the query connection, set after Tributary's own attaches and before
//! the caller's SQL is prepared: an authorizer ([`authorize`]) allows only reads,
//! `SELECT`, recursive CTEs, functions of [`ALLOWED_FUNCTIONS`] and the introspection
//! pragmas of [`ALLOWED_PRAGMAS`], and denies everything else — `ATTACH` and
//! `DETACH` above all, so a query cannot probe the server's files; and
//! `SQLITE_LIMIT_LENGTH` is the answer's byte cap, so no single value (a
//! `zeroblob(1e9)`) can grow past it. Rows are read one at a time into the answer
//! under its [`Budget`](crate::query::Budget); cells are cut to
//! [`cell_cap`](crate::query::cell_cap).

use std::collections::HashSet;
use std::path::Path;
use std::time::Duration;

use chrono::{DateTime, Utc};
use rusqlite::hooks::{AuthAction, AuthContext, Authorization};
use rusqlite::limits::Limit;
use rusqlite::types::ValueRef;
use rusqlite::{Connection, ErrorCode, OpenFlags, OptionalExtension};
use serde_json::Value;

use super::{column_type, schema_path, stored_timestamp, table_columns};
use crate::naming::{STATE_TABLE, quote, validate_schema_name};
use crate::query::{Budget, Limits, cell_cap};
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
    Ok(names
        .into_iter()
        .filter(|n| n != STATE_TABLE && !crate::stats::is_counter_table(n))
        .collect())
}

pub(super) fn status(
    dir: &Path,
) -> Result<(Vec<SchemaStatus>, Option<DateTime<Utc>>), WarehouseError> {
    let mut schemas = Vec::new();
    for schema in list_schemas(dir)? {
        let conn = open_ro(&schema_path(dir, &schema)).map_err(unavailable)?;
        // The loader's counters (module `stats`); a file loaded before they existed
        // is counted until its next load builds them.
        let counted = counters(&conn, &schema).map_err(unavailable)?;
        let mut tables = Vec::new();
        for name in user_tables(&conn).map_err(unavailable)? {
            let (rows, last_load_at) = match &counted {
                Some(c) => c.get(&name).cloned().unwrap_or((0, None)),
                None => {
                    let n: i64 = conn
                        .query_row(&format!("SELECT count(*) FROM {}", quote(&name)), [], |r| {
                            r.get(0)
                        })
                        .map_err(unavailable)?;
                    (n.max(0) as u64, None)
                }
            };
            tables.push(TableStatus {
                name,
                rows,
                approximate: false,
                last_load_at,
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
        // The loader creates the file before its table: until the table exists
        // there was no load (a status read in between must not fail).
        let has_table: bool = conn
            .query_row(
                "SELECT count(*) > 0 FROM sqlite_master WHERE type = 'table' AND name = 'loader_state'",
                [],
                |r| r.get(0),
            )
            .map_err(unavailable)?;
        // The newest load of any log this warehouse has loaded.
        if !has_table {
            return Ok((schemas, None));
        }
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

/// Per table: its counted rows and last load.
type Counted = std::collections::HashMap<String, (u64, Option<String>)>;

/// The counted rows and last load of every table of a schema file, `None` when the
/// file has no counters yet.
fn counters(conn: &Connection, schema: &str) -> rusqlite::Result<Option<Counted>> {
    let scope = crate::stats::Scope::sqlite(schema);
    let has: i64 = conn.query_row(
        "SELECT count(*) FROM sqlite_master WHERE type = 'table' AND name = ?1",
        [format!("{}stats_meta", crate::stats::SQLITE_PREFIX)],
        |r| r.get(0),
    )?;
    if has == 0 || conn.query_row(&scope.is_built(), [], |r| r.get::<_, i64>(0))? == 0 {
        return Ok(None);
    }
    let mut stmt = conn.prepare(&scope.table_reads())?;
    let rows = stmt.query_map([], |r| {
        Ok((
            r.get::<_, String>(0)?,
            (
                r.get::<_, i64>(1)?.max(0) as u64,
                r.get::<_, Option<String>>(2)?,
            ),
        ))
    })?;
    Ok(Some(rows.collect::<Result<_, _>>()?))
}

/// Events of `day` (`YYYY-MM-DD`) loaded into each schema, from the loader's
/// counters; a schema without counters yet is left out.
pub(super) fn events_on(
    dir: &Path,
    day: &str,
) -> Result<std::collections::HashMap<String, u64>, WarehouseError> {
    let mut out = std::collections::HashMap::new();
    for schema in list_schemas(dir)? {
        let conn = open_ro(&schema_path(dir, &schema)).map_err(unavailable)?;
        let scope = crate::stats::Scope::sqlite(&schema);
        let has: i64 = conn
            .query_row(
                "SELECT count(*) FROM sqlite_master WHERE type = 'table' AND name = ?1",
                [format!("{}stats_meta", crate::stats::SQLITE_PREFIX)],
                |r| r.get(0),
            )
            .map_err(unavailable)?;
        if has == 0
            || conn
                .query_row(&scope.is_built(), [], |r| r.get::<_, i64>(0))
                .map_err(unavailable)?
                == 0
        {
            continue;
        }
        let n: i64 = conn
            .query_row(&scope.day_read(day), [], |r| r.get(0))
            .optional()
            .map_err(unavailable)?
            .unwrap_or(0);
        out.insert(schema, n.max(0) as u64);
    }
    Ok(out)
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

/// Functions a query may call: SQLite's core scalar, aggregate, window, date, math
/// and JSON functions.
pub(crate) const ALLOWED_FUNCTIONS: &[&str] = &[
    "abs",
    "char",
    "coalesce",
    "concat",
    "concat_ws",
    "format",
    "glob",
    "hex",
    "ifnull",
    "iif",
    "if",
    "instr",
    "length",
    "like",
    "likelihood",
    "likely",
    "lower",
    "ltrim",
    "max",
    "min",
    "nullif",
    "octet_length",
    "printf",
    "quote",
    "random",
    "randomblob",
    "replace",
    "round",
    "rtrim",
    "sign",
    "soundex",
    "substr",
    "substring",
    "trim",
    "typeof",
    "unhex",
    "unicode",
    "unlikely",
    "upper",
    "zeroblob",
    "sqlite_version",
    "date",
    "time",
    "datetime",
    "julianday",
    "unixepoch",
    "strftime",
    "timediff",
    "avg",
    "count",
    "group_concat",
    "string_agg",
    "sum",
    "total",
    "median",
    "row_number",
    "rank",
    "dense_rank",
    "percent_rank",
    "cume_dist",
    "ntile",
    "lag",
    "lead",
    "first_value",
    "last_value",
    "nth_value",
    "acos",
    "acosh",
    "asin",
    "asinh",
    "atan",
    "atan2",
    "atanh",
    "ceil",
    "ceiling",
    "cos",
    "cosh",
    "degrees",
    "exp",
    "floor",
    "ln",
    "log",
    "log10",
    "log2",
    "mod",
    "pi",
    "pow",
    "power",
    "radians",
    "sin",
    "sinh",
    "sqrt",
    "tan",
    "tanh",
    "trunc",
    "json",
    "jsonb",
    "json_array",
    "jsonb_array",
    "json_array_length",
    "json_error_position",
    "json_extract",
    "jsonb_extract",
    "json_insert",
    "jsonb_insert",
    "json_object",
    "jsonb_object",
    "json_patch",
    "jsonb_patch",
    "json_pretty",
    "json_remove",
    "jsonb_remove",
    "json_replace",
    "jsonb_replace",
    "json_set",
    "jsonb_set",
    "json_type",
    "json_valid",
    "json_quote",
    "json_group_array",
    "jsonb_group_array",
    "json_group_object",
    "jsonb_group_object",
];

/// Pragmas a query may use (as table-valued functions): introspection only, none
/// that changes a setting or a file.
pub(crate) const ALLOWED_PRAGMAS: &[&str] = &[
    "table_info",
    "table_xinfo",
    "table_list",
    "index_list",
    "index_info",
    "index_xinfo",
    "foreign_key_list",
    "database_list",
    "collation_list",
    "function_list",
    "pragma_list",
];

/// The query connection's authorizer: reads only (see the module docs).
pub(crate) fn authorize(ctx: AuthContext<'_>) -> Authorization {
    let allowed = match ctx.action {
        AuthAction::Select | AuthAction::Read { .. } | AuthAction::Recursive => true,
        AuthAction::Function { function_name } => ALLOWED_FUNCTIONS
            .iter()
            .any(|f| f.eq_ignore_ascii_case(function_name)),
        AuthAction::Pragma { pragma_name, .. } => ALLOWED_PRAGMAS
            .iter()
            .any(|p| p.eq_ignore_ascii_case(pragma_name)),
        _ => false,
    };
    if allowed {
        Authorization::Allow
    } else {
        Authorization::Deny
    }
}

/// Locks a query connection down: the authorizer and the value-length limit. Call
/// after Tributary's own `ATTACH`es.
pub(crate) fn lock_down(conn: &mut Connection, max_bytes: usize) -> rusqlite::Result<()> {
    let length = i32::try_from(max_bytes.max(1024 * 1024)).unwrap_or(i32::MAX);
    conn.set_limit(Limit::SQLITE_LIMIT_LENGTH, length)?;
    conn.authorizer(Some(authorize))
}

fn query_error(e: rusqlite::Error, limits: &Limits) -> WarehouseError {
    let timeout = limits.timeout;
    match e.sqlite_error_code() {
        Some(ErrorCode::TooBig) => WarehouseError::BadQuery(format!(
            "a value in this query is larger than the answer's limit of {} bytes",
            limits.max_bytes.max(1024 * 1024)
        )),
        Some(ErrorCode::AuthorizationForStatementDenied) => WarehouseError::NotAllowed(
            "the query uses a function, pragma or statement that is not allowed".into(),
        ),
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
    limits: Limits,
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
    let mut conn = Connection::open_with_flags(
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
    lock_down(&mut conn, limits.max_bytes).map_err(unavailable)?;

    let interrupt = conn.get_interrupt_handle();
    let timeout = limits.timeout;
    let timer = runtime.spawn(async move {
        tokio::time::sleep(timeout).await;
        interrupt.interrupt();
    });
    let result = run_query(&conn, sql, &limits);
    timer.abort();
    result
}

fn run_query(conn: &Connection, sql: &str, limits: &Limits) -> Result<QueryResult, WarehouseError> {
    let mut stmt = conn.prepare(sql).map_err(|e| query_error(e, limits))?;
    if !stmt.readonly() {
        return Err(WarehouseError::BadQuery(
            "only read-only statements are allowed".into(),
        ));
    }
    let declared: Vec<(String, Option<ColumnType>)> = stmt
        .columns()
        .map(|c| (c.name().to_string(), c.decl_type().map(column_type)))
        .collect();
    let cap = cell_cap(limits.max_bytes, declared.len());
    let mut budget = Budget::new(limits.max_rows, limits.max_bytes);
    let mut inferred: Vec<Option<&'static str>> = vec![None; declared.len()];
    let mut out = Vec::new();
    let mut rows = stmt.query([]).map_err(|e| query_error(e, limits))?;
    while let Some(row) = rows.next().map_err(|e| query_error(e, limits))? {
        let mut values = Vec::with_capacity(declared.len());
        for (i, (_, ty)) in declared.iter().enumerate() {
            let v = row.get_ref(i).map_err(|e| query_error(e, limits))?;
            if inferred[i].is_none() {
                inferred[i] = match v {
                    ValueRef::Null => None,
                    ValueRef::Integer(_) => Some("bigint"),
                    ValueRef::Real(_) => Some("double"),
                    ValueRef::Text(_) => Some("text"),
                    ValueRef::Blob(_) => Some("blob"),
                };
            }
            let (v, cut) = cut_value(v, cap);
            if cut {
                budget.cell_cut();
            }
            values.push(json_value(v, *ty));
        }
        if !budget.admit(&values) {
            break;
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
        truncated: budget.truncated.is_some(),
        truncated_reason: budget.truncated,
    })
}

/// `v` cut to at most `cap` bytes at a character boundary (text) or `cap / 2`
/// bytes (blobs, which render as hex); true when it was cut.
fn cut_value(v: ValueRef<'_>, cap: usize) -> (ValueRef<'_>, bool) {
    match v {
        ValueRef::Text(t) if t.len() > cap => {
            let mut n = cap;
            // Back up over UTF-8 continuation bytes (at most 3).
            while n > 0 && n > cap.saturating_sub(3) && (t[n] & 0xC0) == 0x80 {
                n -= 1;
            }
            (ValueRef::Text(&t[..n]), true)
        }
        ValueRef::Blob(b) if b.len() > cap / 2 => (ValueRef::Blob(&b[..cap / 2]), true),
        other => (other, false),
    }
}

/// Columns of the given tables of a schema (tables that do not exist are left
/// out; a schema without a file has none).
pub(super) fn columns(
    dir: &Path,
    schema: &str,
    tables: &[String],
) -> Result<std::collections::HashMap<String, HashSet<String>>, WarehouseError> {
    let path = schema_path(dir, schema);
    let mut out = std::collections::HashMap::new();
    if !path.exists() {
        return Ok(out);
    }
    let conn = open_ro(&path).map_err(unavailable)?;
    for t in tables {
        let cols = table_columns(&conn, t).map_err(unavailable)?;
        if !cols.is_empty() {
            out.insert(t.clone(), cols.into_iter().map(|(n, _)| n).collect());
        }
    }
    Ok(out)
}

/// Runs Tributary's own read-only statements on a schema file (tables unqualified)
/// and returns each one's rows as JSON. An absent schema file has no rows.
pub(super) fn read_rows(
    dir: &Path,
    schema: &str,
    sqls: &[String],
) -> Result<Vec<Vec<Vec<Value>>>, WarehouseError> {
    let path = schema_path(dir, schema);
    if !path.exists() {
        return Ok(sqls.iter().map(|_| Vec::new()).collect());
    }
    let conn = open_ro(&path).map_err(unavailable)?;
    let mut out = Vec::with_capacity(sqls.len());
    for sql in sqls {
        let mut stmt = conn.prepare(sql).map_err(unavailable)?;
        let n = stmt.column_count();
        let mut rows = stmt.query([]).map_err(unavailable)?;
        let mut result = Vec::new();
        while let Some(row) = rows.next().map_err(unavailable)? {
            let mut values = Vec::with_capacity(n);
            for i in 0..n {
                values.push(json_value(row.get_ref(i).map_err(unavailable)?, None));
            }
            result.push(values);
        }
        out.push(result);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The authorizer on its own (the parser's allowlist refuses these first).
    #[test]
    fn the_authorizer_denies_attach_write_pragmas_and_unknown_functions() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("s.sqlite");
        let w = Connection::open(&file).expect("create");
        w.execute_batch("create table t (a text); insert into t values ('x')")
            .expect("write");
        drop(w);
        let mut conn = Connection::open_with_flags(
            ":memory:",
            OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )
        .expect("open");
        // Tributary's own attach, before the lock-down.
        conn.execute("ATTACH DATABASE ?1 AS s", [file.to_str().expect("path")])
            .expect("attach");
        lock_down(&mut conn, 1024 * 1024).expect("lock down");

        let other = dir.path().join("other.sqlite");
        for sql in [
            format!("ATTACH DATABASE '{}' AS x", file.display()),
            format!("ATTACH DATABASE '{}' AS x", other.display()),
            "ATTACH DATABASE ':memory:' AS x".to_string(),
            "DETACH DATABASE s".to_string(),
            "PRAGMA s.user_version = 5".to_string(),
            "PRAGMA s.journal_mode = delete".to_string(),
            "PRAGMA writable_schema = 1".to_string(),
            "PRAGMA s.user_version".to_string(),
            "SELECT load_extension('x')".to_string(),
            "SELECT fts3_tokenizer('simple')".to_string(),
            "SELECT sqlite_compileoption_get(0)".to_string(),
            "CREATE TEMP TABLE tt (a)".to_string(),
        ] {
            let r = conn.prepare(&sql).map(|_| ());
            assert!(
                r.as_ref()
                    .is_err_and(|e| e.to_string().contains("not authorized")),
                "{sql}: {r:?}"
            );
        }
        assert!(!other.exists());
        let (n, h, j): (i64, String, String) = conn
            .query_row(
                "SELECT count(*), hex(randomblob(2)), json_array(upper(a)) FROM s.t",
                [],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
            )
            .expect("reads and allowed functions work");
        assert_eq!((n, h.len(), j.as_str()), (1, 4, "[\"X\"]"));
        let cols: i64 = conn
            .query_row("SELECT count(*) FROM s.pragma_table_info('t')", [], |r| {
                r.get(0)
            })
            .expect("introspection pragmas work");
        assert_eq!(cols, 1);
        // The length limit bounds any one value.
        let big = conn.query_row("SELECT zeroblob(2000000)", [], |r| r.get::<_, Vec<u8>>(0));
        assert_eq!(
            big.map_err(|e| e.sqlite_error_code()).err(),
            Some(Some(ErrorCode::TooBig))
        );
    }
}
