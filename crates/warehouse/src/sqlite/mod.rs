//! The embedded SQLite warehouse: one database file per schema in the warehouse
//! directory (`<dir>/<schema>.sqlite`), so `activecampaign.email_delivered` works once
//! the file is attached under its schema name — in Tributary's own queries and in any
//! SQLite-aware tool, while the server keeps loading (WAL).
//!
//! Layout of a schema file: the loaded tables, `tributary_discards`, and
//! `tributary_state` (the loader position committed with that file's rows). The
//! directory also holds `tributary-state.sqlite` (a hyphenated name no schema can
//! take) with the global low-water mark the loader restarts from.
//!
//! Invariants: writes happen on blocking threads (`spawn_blocking`) through one
//! connection per file, serialized by a mutex; every commit is `synchronous=FULL`, so
//! a schema file's rows and position are durable together and the global mark never
//! gets ahead of a schema file, even across power loss. Reads use fresh read-only
//! connections and never block the loader.

mod load;
mod read;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::{DateTime, Utc};
use rusqlite::types::{ToSqlOutput, Value as SqlValue};
use rusqlite::{Connection, ErrorCode, OptionalExtension, ToSql};

use crate::evolve::{LoadBatch, SchemaState, TableSchema};
use crate::naming::{DISCARDS_TABLE, STATE_TABLE, quote};
use crate::outcome::{ApplyStats, CONSUMER, Claim, LoadError};
use crate::types::{Cell, ColumnType, format_timestamp, parse_timestamp};
use crate::{QueryResult, SchemaStatus, TableData, WarehouseConfig, WarehouseError};

/// File holding the global loader position.
const STATE_FILE: &str = "tributary-state.sqlite";
/// Extension of schema files.
const SCHEMA_EXT: &str = "sqlite";

/// The SQLite backend.
pub(crate) struct SqliteBackend {
    dir: PathBuf,
    writer: Arc<Mutex<Writer>>,
    query_timeout: Duration,
    query_max_rows: usize,
    query_max_bytes: usize,
}

/// The loader's connections: the state file and one per schema file.
#[derive(Default)]
struct Writer {
    state: Option<Connection>,
    schemas: HashMap<String, Connection>,
    /// The `consumer` key of the loader's position ([`crate::outcome::StateKey::sqlite_consumer`]),
    /// set by `init`.
    consumer: String,
}

impl Writer {
    fn state(&mut self, dir: &Path) -> rusqlite::Result<&mut Connection> {
        if self.state.is_none() {
            let conn = open_write(&dir.join(STATE_FILE))?;
            conn.execute_batch(
                "CREATE TABLE IF NOT EXISTS loader_state (
                    consumer TEXT NOT NULL PRIMARY KEY,
                    seq BIGINT NOT NULL,
                    updated_at TIMESTAMP NOT NULL
                );",
            )?;
            self.state = Some(conn);
        }
        match self.state.as_mut() {
            Some(c) => Ok(c),
            None => Err(rusqlite::Error::InvalidQuery),
        }
    }

    fn schema(&mut self, dir: &Path, schema: &str) -> rusqlite::Result<&mut Connection> {
        if !self.schemas.contains_key(schema) {
            let conn = open_write(&schema_path(dir, schema))?;
            conn.execute_batch(&system_tables_sql())?;
            self.schemas.insert(schema.to_string(), conn);
        }
        match self.schemas.get_mut(schema) {
            Some(c) => Ok(c),
            None => Err(rusqlite::Error::InvalidQuery),
        }
    }
}

fn system_tables_sql() -> String {
    let counters = crate::stats::Scope::sqlite("").ddl();
    format!(
        "CREATE TABLE IF NOT EXISTS {d} (
            \"table_name\" TEXT NOT NULL,
            \"column_name\" TEXT NOT NULL,
            \"column_value\" TEXT,
            \"reason\" TEXT NOT NULL,
            \"row_id\" TEXT,
            \"received_at\" TIMESTAMP,
            \"uuid_ts\" TIMESTAMP NOT NULL
        );
        CREATE TABLE IF NOT EXISTS {s} (
            \"consumer\" TEXT NOT NULL PRIMARY KEY,
            \"seq\" BIGINT NOT NULL,
            \"updated_at\" TIMESTAMP NOT NULL
        );
        {counters}",
        d = quote(DISCARDS_TABLE),
        s = quote(STATE_TABLE),
    )
}

/// Renames the pre-migration `warehouse` position rows to `key`: every schema
/// file's, then the state file's.
fn adopt_legacy(w: &mut Writer, dir: &Path, key: &str) -> rusqlite::Result<()> {
    let mut schemas = Vec::new();
    if let Ok(entries) = std::fs::read_dir(dir) {
        for entry in entries.flatten() {
            let path = entry.path();
            if path.extension().and_then(|e| e.to_str()) == Some(SCHEMA_EXT)
                && path.file_name().and_then(|n| n.to_str()) != Some(STATE_FILE)
                && let Some(stem) = path.file_stem().and_then(|s| s.to_str())
            {
                schemas.push(stem.to_string());
            }
        }
    }
    for schema in schemas {
        w.schema(dir, &schema)?.execute(
            &format!(
                "UPDATE {} SET consumer = ?1 WHERE consumer = ?2",
                quote(STATE_TABLE)
            ),
            [key, CONSUMER],
        )?;
    }
    w.state(dir)?.execute(
        "UPDATE loader_state SET consumer = ?1 WHERE consumer = ?2",
        [key, CONSUMER],
    )?;
    Ok(())
}

pub(crate) fn schema_path(dir: &Path, schema: &str) -> PathBuf {
    dir.join(format!("{schema}.{SCHEMA_EXT}"))
}

fn open_write(path: &Path) -> rusqlite::Result<Connection> {
    let conn = Connection::open(path)?;
    conn.busy_timeout(Duration::from_secs(5))?;
    conn.pragma_update(None, "journal_mode", "WAL")?;
    conn.pragma_update(None, "synchronous", "FULL")?;
    Ok(conn)
}

/// SQLite declared type of a column type.
pub(crate) fn sql_type(ty: ColumnType) -> &'static str {
    match ty {
        ColumnType::Timestamp => "TIMESTAMP",
        ColumnType::Bigint => "BIGINT",
        ColumnType::Double => "DOUBLE PRECISION",
        ColumnType::Boolean => "BOOLEAN",
        ColumnType::Text => "TEXT",
    }
}

/// Column type of a declared SQLite type (ours, or a hand-made table's).
pub(crate) fn column_type(decl: &str) -> ColumnType {
    let d = decl.to_ascii_uppercase();
    if d.contains("TIMESTAMP") || d.contains("DATE") {
        ColumnType::Timestamp
    } else if d.contains("BOOL") {
        ColumnType::Boolean
    } else if d.contains("INT") {
        ColumnType::Bigint
    } else if d.contains("DOUB") || d.contains("REAL") || d.contains("FLOA") || d.contains("NUM") {
        ColumnType::Double
    } else {
        ColumnType::Text
    }
}

impl ToSql for Cell {
    fn to_sql(&self) -> rusqlite::Result<ToSqlOutput<'_>> {
        Ok(match self {
            Cell::Null => ToSqlOutput::Owned(SqlValue::Null),
            Cell::Bigint(i) => ToSqlOutput::Owned(SqlValue::Integer(*i)),
            Cell::Double(f) => ToSqlOutput::Owned(SqlValue::Real(*f)),
            Cell::Boolean(b) => ToSqlOutput::Owned(SqlValue::Integer(i64::from(*b))),
            Cell::Text(s) => ToSqlOutput::Borrowed(rusqlite::types::ValueRef::Text(s.as_bytes())),
            Cell::Timestamp(t) => ToSqlOutput::Owned(SqlValue::Text(format_timestamp(t))),
        })
    }
}

/// Transient: the file is busy, locked, full, unreadable or cannot be opened — retry.
/// Everything else (constraint, type, too big, SQL error) is permanent.
pub(crate) fn classify(e: rusqlite::Error) -> LoadError {
    let transient = matches!(
        e.sqlite_error_code(),
        Some(
            ErrorCode::DatabaseBusy
                | ErrorCode::DatabaseLocked
                | ErrorCode::DiskFull
                | ErrorCode::SystemIoFailure
                | ErrorCode::CannotOpen
                | ErrorCode::OutOfMemory
                | ErrorCode::FileLockingProtocolFailed
                | ErrorCode::ReadOnly
                | ErrorCode::PermissionDenied
                | ErrorCode::DatabaseCorrupt
                | ErrorCode::NotADatabase
        )
    );
    if transient {
        LoadError::Transient(e.to_string())
    } else {
        LoadError::Permanent(e.to_string())
    }
}

/// Columns of a table in file order: (name, declared type).
pub(crate) fn table_columns(
    conn: &Connection,
    table: &str,
) -> rusqlite::Result<Vec<(String, String)>> {
    let mut stmt = conn.prepare_cached("SELECT name, type FROM pragma_table_info(?1)")?;
    let rows = stmt.query_map([table], |r| {
        Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?))
    })?;
    rows.collect()
}

/// Loaded tables of a schema file (system tables excluded).
fn describe_conn(conn: &Connection) -> rusqlite::Result<SchemaState> {
    let mut stmt = conn.prepare(
        "SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite\\_%' ESCAPE '\\'",
    )?;
    let names: Vec<String> = stmt
        .query_map([], |r| r.get(0))?
        .collect::<Result<_, _>>()?;
    let mut tables = HashMap::new();
    for name in names {
        if name == DISCARDS_TABLE || name == STATE_TABLE || crate::stats::is_counter_table(&name) {
            continue;
        }
        let cols = table_columns(conn, &name)?;
        tables.insert(
            name,
            TableSchema::from_columns(cols.into_iter().map(|(n, t)| (n, column_type(&t)))),
        );
    }
    Ok(SchemaState {
        exists: true,
        tables,
    })
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, LoadError> + Send + 'static,
) -> Result<T, LoadError> {
    match tokio::task::spawn_blocking(f).await {
        Ok(r) => r,
        Err(e) => Err(LoadError::Transient(format!("blocking task failed: {e}"))),
    }
}

impl SqliteBackend {
    pub(crate) async fn open(
        dir: PathBuf,
        config: &WarehouseConfig,
    ) -> Result<Self, WarehouseError> {
        let d = dir.clone();
        tokio::task::spawn_blocking(move || std::fs::create_dir_all(&d))
            .await
            .map_err(|e| WarehouseError::InvalidConfig(e.to_string()))?
            .map_err(|e| {
                WarehouseError::InvalidConfig(format!(
                    "cannot create warehouse directory {}: {e}",
                    dir.display()
                ))
            })?;
        Ok(SqliteBackend {
            dir,
            writer: Arc::new(Mutex::new(Writer::default())),
            query_timeout: config.query_timeout,
            query_max_rows: config.query_max_rows,
            query_max_bytes: config.query_max_bytes,
        })
    }

    fn lock(writer: &Mutex<Writer>) -> std::sync::MutexGuard<'_, Writer> {
        // A panic while holding the lock cannot leave a transaction open (rusqlite
        // rolls back on drop), so a poisoned lock is safe to reuse.
        writer.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Finds the position of the claimed log: its own row, else the pre-migration
    /// `warehouse` row if [`Claim::adopts_legacy`] (renamed in every schema file
    /// first and in the state file last, so a crash in between repeats the same
    /// adoption), else 0.
    pub(crate) async fn init(&self, claim: &Claim) -> Result<u64, LoadError> {
        let (dir, writer, claim) = (self.dir.clone(), self.writer.clone(), claim.clone());
        blocking(move || {
            let mut w = Self::lock(&writer);
            let key = claim.key.sqlite_consumer();
            let read = |conn: &Connection, consumer: &str| {
                conn.query_row(
                    "SELECT seq FROM loader_state WHERE consumer = ?1",
                    [consumer],
                    |r| r.get::<_, i64>(0),
                )
                .optional()
                .map(|s| s.map(|s| s.max(0) as u64))
            };
            let conn = w.state(&dir).map_err(classify)?;
            let mut seq = read(conn, &key).map_err(classify)?;
            if seq.is_none()
                && let Some(legacy) = read(conn, CONSUMER).map_err(classify)?
                && claim.adopts_legacy(legacy)
            {
                adopt_legacy(&mut w, &dir, &key).map_err(classify)?;
                tracing::info!(position = legacy, log_id = %claim.key.log_id,
                    "warehouse position from before log ids adopted by this log");
                seq = Some(legacy);
            }
            if let Some(epoch) = claim.epoch {
                let conn = w.state(&dir).map_err(classify)?;
                if load::recorded_epoch(conn, "loader_state", &key).map_err(classify)? > epoch {
                    return Err(LoadError::Fenced(format!(
                        "partition {} claimed by a newer lease than epoch {epoch}",
                        claim.key.partition
                    )));
                }
                conn.execute(
                    "INSERT INTO loader_state (consumer, seq, updated_at) VALUES (?1, ?2, ?3)
                     ON CONFLICT (consumer) DO UPDATE SET seq = excluded.seq",
                    rusqlite::params![
                        load::fence_row(&key),
                        epoch as i64,
                        format_timestamp(&Utc::now())
                    ],
                )
                .map_err(classify)?;
            }
            w.consumer = key;
            Ok(seq.unwrap_or(0))
        })
        .await
    }

    pub(crate) async fn describe(&self, schema: &str) -> Result<SchemaState, LoadError> {
        let (dir, writer, schema) = (self.dir.clone(), self.writer.clone(), schema.to_string());
        blocking(move || {
            if !schema_path(&dir, &schema).exists() {
                return Ok(SchemaState::default());
            }
            let mut w = Self::lock(&writer);
            let conn = w.schema(&dir, &schema).map_err(classify)?;
            describe_conn(conn).map_err(classify)
        })
        .await
    }

    pub(crate) async fn apply(&self, batch: LoadBatch) -> Result<ApplyStats, LoadError> {
        let (dir, writer) = (self.dir.clone(), self.writer.clone());
        blocking(move || {
            let mut w = Self::lock(&writer);
            load::apply(&mut w, &dir, batch)
        })
        .await
    }

    pub(crate) async fn status(
        &self,
    ) -> Result<(Vec<SchemaStatus>, Option<DateTime<Utc>>), WarehouseError> {
        let dir = self.dir.clone();
        read::run(move || read::status(&dir)).await
    }

    pub(crate) async fn events_on(
        &self,
        day: &str,
    ) -> Result<HashMap<String, u64>, WarehouseError> {
        let (dir, day) = (self.dir.clone(), day.to_string());
        read::run(move || read::events_on(&dir, &day)).await
    }

    pub(crate) async fn table(
        &self,
        schema: &str,
        table: &str,
        limit: usize,
    ) -> Result<TableData, WarehouseError> {
        let (dir, schema, table) = (self.dir.clone(), schema.to_string(), table.to_string());
        read::run(move || read::table(&dir, &schema, &table, limit)).await
    }

    pub(crate) async fn query(&self, sql: &str) -> Result<QueryResult, WarehouseError> {
        let (dir, sql) = (self.dir.clone(), sql.to_string());
        let limits = crate::query::Limits {
            timeout: self.query_timeout,
            max_rows: self.query_max_rows,
            max_bytes: self.query_max_bytes,
        };
        let runtime = tokio::runtime::Handle::current();
        read::run(move || read::query(&dir, &sql, limits, &runtime)).await
    }

    pub(crate) async fn columns(
        &self,
        schema: &str,
        tables: &[String],
    ) -> Result<HashMap<String, std::collections::HashSet<String>>, WarehouseError> {
        let (dir, schema, tables) = (self.dir.clone(), schema.to_string(), tables.to_vec());
        read::run(move || read::columns(&dir, &schema, &tables)).await
    }

    pub(crate) async fn read_rows(
        &self,
        schema: &str,
        sqls: Vec<String>,
    ) -> Result<Vec<Vec<Vec<serde_json::Value>>>, WarehouseError> {
        let (dir, schema) = (self.dir.clone(), schema.to_string());
        read::run(move || read::read_rows(&dir, &schema, &sqls)).await
    }

    pub(crate) async fn close(&self) {
        let writer = self.writer.clone();
        let _ = tokio::task::spawn_blocking(move || {
            let mut w = Self::lock(&writer);
            w.schemas.clear();
            w.state = None;
        })
        .await;
    }
}

/// Parses a stored timestamp text back (for `last_load_at`).
pub(crate) fn stored_timestamp(s: &str) -> Option<DateTime<Utc>> {
    parse_timestamp(s)
}
