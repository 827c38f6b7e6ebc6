//! The warehouse: Segment's schema (`tracks`, one table per event, `identifies`,
//! `users`, `pages`, `screens`, `groups`, `aliases`), loaded from the event log in
//! micro-batches into SQLite (embedded, one file per schema) or PostgreSQL.
//!
//! [`Warehouse::open`] starts the loader, a consumer of the [`EventLog`]: it waits on
//! [`EventLog::subscribe`], reads up to [`WarehouseConfig::batch_max`] records at most
//! once per [`WarehouseConfig::batch_interval`], plans their rows (module `plan`), types
//! them and evolves the schema (module `evolve`: new columns online, `bigint` → `double`
//! widening, uncastable values to `<schema>.tributary_discards`) and hands the batch to
//! the backend. When a backlog waits, the next batch is read, planned and typed while
//! the previous one commits; it is used only if that commit succeeded and left the
//! schema as the batch assumed, and it commits in its own transaction (module
//! `loader`).
//!
//! **Exactly once.** The loader's position (the last log sequence number loaded) is
//! stored in the warehouse and written in the *same transaction* as the rows: on
//! PostgreSQL one transaction covers every schema of the batch and
//! `tributary.loader_state`; on SQLite each schema file carries its own position in
//! `tributary_state`, committed with that file's rows, and a global low-water mark in
//! `tributary-state.sqlite` is advanced only after every schema committed. A backend
//! reads the position inside its transaction (locking it) and skips rows at or below
//! it, so a crash, a retry or a second loader never loads a record twice; `id`
//! (messageId) is the primary key and rows are inserted only if absent, a second guard
//! that also collapses messages repeated beyond the log's dedupe window. `users` is
//! upserted only from `identifies` rows that were actually inserted. A read that
//! touches more than 100 tables is committed in consecutive parts, each with its own
//! position; on PostgreSQL the other schemas' records may meanwhile be committed
//! ahead of the position (module `loader`, express lane), relying on that second
//! guard, and are committed again as no-ops when the position reaches them.
//!
//! Limits: identifiers are at most 63 bytes ([`naming`]), a table gets at most
//! [`MAX_COLUMNS`] columns and a schema at most [`MAX_TABLES`] tables; what does not
//! fit is kept in `tributary_discards`, never dropped silently and never failing a batch.
//!
//! Faults: a warehouse that is down, full or restarting makes the loader retry with
//! exponential backoff (the log keeps accepting events; [`Warehouse::lag`] grows); a
//! batch the warehouse rejects for its data is split until the offending record is
//! isolated, and that record is recorded in `tributary_discards` instead of blocking
//! the loader. One load transaction writes at most 100 tables (a batch of many event
//! names is loaded in consecutive parts, each with its position), and a batch too
//! large for PostgreSQL's lock table is split, so no single request can wedge the
//! loader. A warehouse that will not work until an operator acts (unknown database,
//! bad password) is reported by [`Warehouse::health`] and retried once a minute.

mod backend;
mod evolve;
mod loader;
pub mod naming;
mod outcome;
mod partitioned;
mod plan;
mod postgres;
pub mod query;
pub mod report;
mod sqlite;
mod stats;
pub mod types;

use std::sync::Arc;
use std::time::Duration;

use serde::Serialize;
use tokio::sync::watch;
use tributary_eventlog::EventLog;

use crate::backend::Backend;
use crate::loader::{Loader, Shared};

pub use crate::evolve::{MAX_COLUMNS, MAX_TABLES};
pub use crate::naming::validate_schema_name;
#[cfg(feature = "fuzz")]
#[doc(hidden)]
pub use crate::plan::fuzz_plan_differential;
/// The name of the PostgreSQL query role Tributary manages for a database and state
/// schema (for tests and operators who drop a warehouse).
pub use crate::postgres::query_role_name;
pub use crate::query::TruncatedReason;
pub use crate::types::ColumnType;

/// Maps a source to the warehouse schema its events are loaded into.
pub trait SchemaCatalog: Send + Sync + 'static {
    /// Schema name of a source, `None` if the source is deleted or unknown (its
    /// records are skipped). Names should pass [`validate_schema_name`]; records of a
    /// source whose schema does not are skipped with a warning.
    fn schema_for(&self, source_id: &str) -> Option<String>;
}

impl<F> SchemaCatalog for F
where
    F: Fn(&str) -> Option<String> + Send + Sync + 'static,
{
    fn schema_for(&self, source_id: &str) -> Option<String> {
        self(source_id)
    }
}

/// Settings of the warehouse. Deserializes as the `[warehouse]` section of the
/// server's configuration (durations in `tributary_model::duration` syntax); an empty
/// `url` (the default) lets the server choose its embedded warehouse.
#[derive(Debug, Clone, serde::Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct WarehouseConfig {
    /// `sqlite://<dir>` (one file per schema in `<dir>`) or `postgres://…` /
    /// `postgresql://…` (a libpq-style URL; TLS is not supported).
    pub url: String,
    /// Loads happen at most this often (default 1 s) unless `batch_max` records wait.
    #[serde(with = "tributary_model::duration")]
    pub batch_interval: Duration,
    /// Most records per load (default 4,000). Under a backlog the loader holds two
    /// batches (one committing, the next built ahead) at ~4.5 KiB per record of
    /// planned and typed rows, so this bounds the warehouse's memory: 10,000 took
    /// the server to ~200 MiB at saturation (issue #15).
    pub batch_max: usize,
    /// Longest a read-only query may run (default 30 s).
    #[serde(with = "tributary_model::duration")]
    pub query_timeout: Duration,
    /// Most rows a query returns; more set `truncated` (default 10,000).
    pub query_max_rows: usize,
    /// Most bytes of rows (as rendered JSON) a query returns; more set `truncated`
    /// and long cells are cut (default 16 MiB).
    pub query_max_bytes: usize,
    /// PostgreSQL only: the login queries run as, a role that is not a superuser and
    /// may only read the warehouse schemas. `None`: Tributary creates and grants
    /// such a role itself (see the `postgres` module).
    pub query_url: Option<String>,
    /// PostgreSQL schema of the loader's own tables (default `tributary`).
    pub state_schema: String,
}

impl WarehouseConfig {
    /// A configuration for `url` with every other setting at its default.
    pub fn new(url: impl Into<String>) -> Self {
        WarehouseConfig {
            url: url.into(),
            batch_interval: Duration::from_secs(1),
            batch_max: 4_000,
            query_timeout: Duration::from_secs(30),
            query_max_rows: 10_000,
            query_max_bytes: 16 * 1024 * 1024,
            query_url: None,
            state_schema: "tributary".into(),
        }
    }
}

impl Default for WarehouseConfig {
    /// Every setting at its default and an empty `url`.
    fn default() -> Self {
        WarehouseConfig::new("")
    }
}

/// Why a warehouse call failed.
#[derive(Debug, thiserror::Error)]
pub enum WarehouseError {
    /// The configuration cannot be used (bad URL, unusable directory).
    #[error("invalid warehouse configuration: {0}")]
    InvalidConfig(String),
    /// The schema or table does not exist (→ 404).
    #[error("not found: {0}")]
    NotFound(String),
    /// The SQL is invalid, not read-only, or ran too long (→ 400). The message is
    /// about the caller's query and may be shown to them.
    #[error("bad query: {0}")]
    BadQuery(String),
    /// Valid SQL, but not a statement the query endpoint runs: more than one
    /// statement, not a query, or a denied function (→ 400 `query_not_allowed`).
    #[error("query not allowed: {0}")]
    NotAllowed(String),
    /// The role queries would run as has privileges beyond reading the warehouse
    /// (superuser, role or database creation, replication, `pg_*` roles), or is the
    /// loader's own: queries are refused until it is fixed (→ 503
    /// `query_role_unsafe`).
    #[error("query role unsafe: {0}")]
    QueryRoleUnsafe(String),
    /// The warehouse cannot be reached or is shut down (→ 503).
    #[error("warehouse unavailable: {0}")]
    Unavailable(String),
}

/// Which backend a warehouse uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum BackendKind {
    /// Embedded SQLite files.
    Sqlite,
    /// PostgreSQL (or a compatible engine).
    Postgres,
}

/// `GET /api/v1/warehouse`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct WarehouseStatus {
    /// `sqlite` or `postgres`.
    pub kind: BackendKind,
    /// Schemas with their tables, by name.
    pub schemas: Vec<SchemaStatus>,
    /// When the loader last committed (ISO-8601 UTC), if ever.
    pub last_load_at: Option<String>,
    /// Log records not loaded yet.
    pub lag_events: u64,
    /// Age of the oldest record not loaded yet, in seconds (0 when caught up).
    pub lag_seconds: f64,
    /// Whether loads are failing, since when and why.
    pub health: WarehouseHealth,
    /// The newest range of log records the warehouse never loaded because they left
    /// the log first (pruned by the size cap or before this warehouse first read the
    /// log); `null` when none is known.
    pub gap: Option<GapStatus>,
    /// Records the log's size cap (`log.max_bytes`) deleted before the warehouse
    /// loaded them, in total.
    pub unconsumed_dropped: u64,
}

/// A range of log positions a consumer never got, in [`WarehouseStatus`].
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct GapStatus {
    /// The log partition.
    pub partition: u32,
    /// First missing sequence number.
    pub from: u64,
    /// Last missing sequence number (inclusive).
    pub to: u64,
    /// How many records.
    pub records: u64,
    /// When it was found (ISO-8601 UTC).
    pub at: Option<String>,
}

impl GapStatus {
    /// A gap found at `at_ms` (ms since the epoch).
    pub fn new(gap: tributary_eventlog::Gap, at_ms: Option<i64>) -> GapStatus {
        GapStatus {
            partition: gap.partition,
            from: gap.from,
            to: gap.to,
            records: gap.len(),
            at: at_ms
                .and_then(chrono::DateTime::from_timestamp_millis)
                .map(|t| types::format_timestamp(&t)),
        }
    }
}

/// Whether the loader can reach and load the warehouse.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum HealthState {
    /// The last attempt succeeded (or none failed yet).
    Ok,
    /// The last attempt failed with an error that may heal (unreachable, busy,
    /// restarting): retried with backoff.
    Retrying,
    /// The last attempt failed with an error that will not heal by retrying soon
    /// (unknown database, authentication, privileges): retried about once a minute
    /// until an operator fixes the warehouse. Nothing is lost: the log keeps events.
    Failed,
}

/// The loader's health (`GET /api/v1/warehouse`, `/ready`).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct WarehouseHealth {
    /// `ok`, `retrying` or `failed`.
    pub state: HealthState,
    /// When the current run of failed attempts began (ISO-8601 UTC).
    pub failing_since: Option<String>,
    /// The last attempt's error, with the warehouse's own message (for PostgreSQL
    /// its SQLSTATE and text, e.g. `3D000: database "x" does not exist`).
    pub last_error: Option<String>,
    /// Failed attempts in the current run.
    pub failed_attempts: u64,
    /// When the next attempt is due (ISO-8601 UTC).
    pub next_attempt_at: Option<String>,
}

impl WarehouseHealth {
    /// True while loads are failing.
    pub fn is_failing(&self) -> bool {
        self.state != HealthState::Ok
    }
}

/// One schema in [`WarehouseStatus`].
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SchemaStatus {
    /// Schema name.
    pub name: String,
    /// Its tables (including `tributary_discards`), by name.
    pub tables: Vec<TableStatus>,
}

/// One table in [`SchemaStatus`].
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TableStatus {
    /// Table name.
    pub name: String,
    /// Row count.
    pub rows: u64,
    /// True when `rows` is an estimate, not an exact count. Counts come from the
    /// loader's own counters and are exact; kept for API compatibility.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub approximate: bool,
    /// When rows were last loaded into this table (ISO-8601 UTC), if known (a
    /// table counted before the loader kept counters has none until its next load).
    pub last_load_at: Option<String>,
}

/// A result column.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Column {
    /// Column name.
    pub name: String,
    /// `timestamp|bigint|double|boolean|text` for warehouse columns; for computed
    /// query columns the engine's type name when it is none of those.
    #[serde(rename = "type")]
    pub ty: String,
}

/// `GET /api/v1/warehouse/{schema}/{table}`: the newest rows of a table.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TableData {
    /// The table's columns, in table order.
    pub columns: Vec<Column>,
    /// Rows, newest `received_at` first; timestamps as ISO-8601 UTC strings.
    pub rows: Vec<Vec<serde_json::Value>>,
}

/// `POST /api/v1/query`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct QueryResult {
    /// Result columns.
    pub columns: Vec<Column>,
    /// Result rows (at most [`WarehouseConfig::query_max_rows`]).
    pub rows: Vec<Vec<serde_json::Value>>,
    /// True when more rows existed than were returned, or a cell was cut.
    pub truncated: bool,
    /// Why `truncated` is set; absent when it is not.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub truncated_reason: Option<TruncatedReason>,
}

/// How far the warehouse is behind the log (for `/ready` and `/metrics`).
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Lag {
    /// Log records not loaded yet.
    pub events: u64,
    /// Age of the oldest record not loaded yet, in seconds (0 when caught up).
    pub seconds: f64,
    /// The last log sequence number loaded.
    pub loaded_seq: u64,
    /// The log's head sequence number.
    pub head: u64,
    /// True while the loader is retrying after a warehouse failure.
    pub retrying: bool,
}

/// The warehouse: its loader task and the read side (status, tables, queries).
pub struct Warehouse {
    backend: Arc<Backend>,
    log: Arc<dyn EventLog>,
    shared: Arc<Shared>,
    stop: watch::Sender<bool>,
    task: tokio::sync::Mutex<Option<tokio::task::JoinHandle<()>>>,
}

impl Warehouse {
    /// Opens the warehouse at `config.url` and starts the loader, which consumes
    /// `log` from the position stored in the warehouse. PostgreSQL is not contacted
    /// here: an unreachable server delays loading (with retries), not startup.
    pub async fn open(
        config: WarehouseConfig,
        log: Arc<dyn EventLog>,
        catalog: Arc<dyn SchemaCatalog>,
    ) -> Result<Warehouse, WarehouseError> {
        if config.batch_max == 0 {
            return Err(WarehouseError::InvalidConfig(
                "batch_max must be at least 1".into(),
            ));
        }
        let backend = Arc::new(Backend::open(&config).await?);
        let shared = Arc::new(Shared::new(log.subscribe()));
        let (stop, stop_rx) = watch::channel(false);
        let loader = Loader::new(
            log.clone(),
            catalog,
            backend.clone(),
            config,
            shared.clone(),
        );
        let task = tokio::spawn(loader.run(stop_rx));
        Ok(Warehouse {
            backend,
            log,
            shared,
            stop,
            task: tokio::sync::Mutex::new(Some(task)),
        })
    }

    /// [`Warehouse::open`] for a cluster: the loader runs one reader per partition
    /// this node owns through `ownership` (consumer `warehouse`), each committing its
    /// partition's position with the lease epoch, so a node that lost a lease commits
    /// nothing (module `partitioned`).
    pub async fn open_owned(
        config: WarehouseConfig,
        log: Arc<dyn EventLog>,
        catalog: Arc<dyn SchemaCatalog>,
        ownership: Arc<dyn tributary_eventlog::Ownership>,
    ) -> Result<Warehouse, WarehouseError> {
        if config.batch_max == 0 {
            return Err(WarehouseError::InvalidConfig(
                "batch_max must be at least 1".into(),
            ));
        }
        let backend = Arc::new(Backend::open(&config).await?);
        let shared = Arc::new(Shared::new(log.subscribe()));
        let (stop, stop_rx) = watch::channel(false);
        let make = {
            let (log, backend, shared) = (log.clone(), backend.clone(), shared.clone());
            move || {
                Loader::new(
                    log.clone(),
                    catalog.clone(),
                    backend.clone(),
                    config.clone(),
                    shared.clone(),
                )
            }
        };
        let task = tokio::spawn(partitioned::supervise(
            ownership,
            log.clone(),
            make,
            stop_rx,
        ));
        Ok(Warehouse {
            backend,
            log,
            shared,
            stop,
            task: tokio::sync::Mutex::new(Some(task)),
        })
    }

    /// Which backend this warehouse uses.
    pub fn kind(&self) -> BackendKind {
        self.backend.kind()
    }

    /// Schemas, tables with row counts, last load, lag and health. While loads are
    /// failing and the warehouse cannot be read either, the status still answers:
    /// no schemas, and the health naming the error.
    pub async fn status(&self) -> Result<WarehouseStatus, WarehouseError> {
        let health = self.health();
        let (schemas, last_load_at) = match self.backend.status().await {
            Ok(s) => s,
            Err(WarehouseError::Unavailable(_)) if health.is_failing() => (Vec::new(), None),
            Err(e) => return Err(e),
        };
        let lag = self.lag();
        // What the log recorded for this consumer (the size cap), and what the loader
        // found itself; the newer gap is shown.
        let registry = self
            .log
            .consumers()
            .await
            .ok()
            .and_then(|c| tributary_eventlog::ConsumerState::merged(c, outcome::CONSUMER));
        let logged = registry
            .as_ref()
            .and_then(|c| c.gap.map(|g| (g, c.gap_at_ms.unwrap_or(0))));
        let found = self.shared.gap();
        let gap = match (logged, found) {
            (Some(a), Some(b)) => Some(if a.1 > b.1 { a } else { b }),
            (a, b) => a.or(b),
        };
        Ok(WarehouseStatus {
            kind: self.backend.kind(),
            schemas,
            last_load_at: last_load_at.map(|t| types::format_timestamp(&t)),
            lag_events: lag.events,
            lag_seconds: lag.seconds,
            health,
            gap: gap.map(|(g, at)| GapStatus::new(g, Some(at))),
            unconsumed_dropped: registry.map_or(0, |c| c.dropped),
        })
    }

    /// Whether loads are failing, since when and why (no warehouse round trip).
    pub fn health(&self) -> WarehouseHealth {
        self.shared.health()
    }

    /// The newest `limit` rows of `schema.table` with its column types.
    pub async fn table(
        &self,
        schema: &str,
        table: &str,
        limit: usize,
    ) -> Result<TableData, WarehouseError> {
        if validate_schema_name(schema).is_err() {
            return Err(WarehouseError::NotFound(format!("schema {schema:?}")));
        }
        self.backend.table(schema, table, limit).await
    }

    /// Runs one read-only SQL statement that passes [`query::guard::check`]
    /// (SQLite: a read-only connection with every schema attached under its name and
    /// an authorizer; PostgreSQL: as the query role, in a `READ ONLY` transaction
    /// with a statement timeout, always rolled back, then `DISCARD ALL`). The answer
    /// is bounded by [`WarehouseConfig::query_max_rows`] and
    /// [`WarehouseConfig::query_max_bytes`].
    pub async fn query(&self, sql: &str) -> Result<QueryResult, WarehouseError> {
        let dialect = match self.backend.kind() {
            BackendKind::Sqlite => query::guard::Dialect::Sqlite,
            BackendKind::Postgres => query::guard::Dialect::Postgres,
        };
        let kind = query::guard::check(sql, dialect).map_err(|e| match e {
            query::guard::Refusal::Syntax(m) => WarehouseError::BadQuery(m),
            query::guard::Refusal::NotAllowed(m) => WarehouseError::NotAllowed(m),
        })?;
        self.backend.query(sql, kind).await
    }

    /// The email report's counts of `schema` (DESIGN.md §5) for events whose
    /// `timestamp` is in `[from, to)`; email tables not loaded yet count as empty.
    pub async fn email_facts(
        &self,
        schema: &str,
        from: Option<chrono::DateTime<chrono::Utc>>,
        to: Option<chrono::DateTime<chrono::Utc>>,
    ) -> Result<report::EmailFacts, WarehouseError> {
        if validate_schema_name(schema).is_err() {
            return Err(WarehouseError::NotFound(format!("schema {schema:?}")));
        }
        report::email_facts(&self.backend, schema, from, to).await
    }

    /// When the event `id` (a messageId) of `schema` was received, read from its
    /// row by the `id` key (or its discard), `None` when the warehouse has no row.
    /// The debugger's fate uses it to find an event in the log at any depth.
    pub async fn received_at_of(
        &self,
        schema: &str,
        id: &str,
    ) -> Result<Option<chrono::DateTime<chrono::Utc>>, WarehouseError> {
        if validate_schema_name(schema).is_err() {
            return Err(WarehouseError::NotFound(format!("schema {schema:?}")));
        }
        report::received_at_of(&self.backend, schema, id).await
    }

    /// Events loaded per schema whose `received_at` falls on `day` (UTC), from the
    /// loader's counters (exact as of the last load; the sources list's "events
    /// today"). A schema whose counters are not built yet is absent.
    pub async fn events_on(
        &self,
        day: chrono::NaiveDate,
    ) -> Result<std::collections::HashMap<String, u64>, WarehouseError> {
        self.backend
            .events_on(&day.format("%Y-%m-%d").to_string())
            .await
    }

    /// Which of `tables` of `schema` hold the row `id` (a messageId), and what of it
    /// went to `tributary_discards`.
    pub async fn row_presence(
        &self,
        schema: &str,
        tables: &[String],
        id: &str,
    ) -> Result<report::RowPresence, WarehouseError> {
        if validate_schema_name(schema).is_err() {
            return Err(WarehouseError::NotFound(format!("schema {schema:?}")));
        }
        report::row_presence(&self.backend, schema, tables, id).await
    }

    /// The loader's lag behind the log.
    pub fn lag(&self) -> Lag {
        self.shared.lag()
    }

    /// Lets the loader finish the batch it is writing, stops it and closes the
    /// backend. Records not loaded stay in the log for the next start.
    pub async fn shutdown(&self) {
        let _ = self.stop.send(true);
        if let Some(task) = self.task.lock().await.take() {
            let _ = task.await;
        }
        self.backend.close().await;
    }
}

impl Drop for Warehouse {
    fn drop(&mut self) {
        // The loader stops after its current batch; nothing committed is lost.
        let _ = self.stop.send(true);
    }
}
