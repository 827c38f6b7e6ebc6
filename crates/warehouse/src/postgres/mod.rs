//! The PostgreSQL warehouse (also the shape for Postgres-compatible engines).
//!
//! One PostgreSQL schema per source schema; the loader's own tables live in the state
//! schema (default `tributary`): `migrations` (versions applied, under an advisory
//! lock so several nodes can start at once) and `loader_state` (the position, one row
//! per `(consumer, log_id, log_partition)`; a row from before positions named their
//! log has `log_id = ''` until the log that wrote it adopts it, see
//! [`crate::outcome::Claim::adopts_legacy`]).
//! Two connection pools: one for loading, one for reads whose sessions default to
//! read-only transactions.
//!
//! Invariants: a batch is one transaction — schema DDL, rows (inserted only if their
//! `id` is absent: a binary `COPY` straight into the table inside a savepoint when no
//! id is there yet, else `COPY` into a temporary table and `INSERT … SELECT … ON
//! CONFLICT ("id") DO NOTHING`; `users` upserted), discards and the position
//! (`SELECT … FOR UPDATE` at the start, so two loaders serialize and the second skips
//! what the first committed). Nothing is written outside it. Connection failures,
//! server restarts, full disks and lock timeouts are transient (retried); data and
//! statement errors are permanent.

mod copy;
mod load;
mod query_role;
mod read;

#[cfg(test)]
pub(crate) use copy::encode_for_test;
pub use query_role::role_name as query_role_name;

use std::str::FromStr;
use std::time::Duration;

use bytes::BytesMut;
use chrono::{DateTime, Utc};
use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod, Runtime};
use tokio_postgres::NoTls;
use tokio_postgres::error::SqlState;
use tokio_postgres::types::{IsNull, ToSql, Type, to_sql_checked};

use crate::evolve::{LoadBatch, SchemaState, TableSchema};
use crate::naming::{DISCARDS_TABLE, quote};
use crate::outcome::{ApplyStats, CONSUMER, Claim, LoadError, StateKey};
use crate::types::{Cell, ColumnType};
use crate::{QueryResult, SchemaStatus, TableData, WarehouseConfig, WarehouseError};

/// The PostgreSQL backend.
pub(crate) struct PostgresBackend {
    load_pool: Pool,
    read_pool: Pool,
    state_schema: String,
    query_timeout: Duration,
    query_max_rows: usize,
    query_max_bytes: usize,
    /// Who `query` runs as (never the loader's role).
    query_role: Box<query_role::QueryRole>,
    /// The log whose position `apply` commits, set by `init`.
    key: std::sync::RwLock<StateKey>,
}

/// PostgreSQL type of a column type.
pub(crate) fn sql_type(ty: ColumnType) -> &'static str {
    match ty {
        ColumnType::Timestamp => "timestamptz",
        ColumnType::Bigint => "bigint",
        ColumnType::Double => "double precision",
        ColumnType::Boolean => "boolean",
        ColumnType::Text => "text",
    }
}

/// Column type of an `information_schema.columns.data_type`.
pub(crate) fn column_type(data_type: &str) -> ColumnType {
    match data_type {
        "timestamp with time zone" | "timestamp without time zone" | "date" => {
            ColumnType::Timestamp
        }
        "bigint" | "integer" | "smallint" => ColumnType::Bigint,
        "double precision" | "real" | "numeric" => ColumnType::Double,
        "boolean" => ColumnType::Boolean,
        _ => ColumnType::Text,
    }
}

impl ToSql for Cell {
    fn to_sql(
        &self,
        ty: &Type,
        out: &mut BytesMut,
    ) -> Result<IsNull, Box<dyn std::error::Error + Sync + Send>> {
        match (self, ty) {
            (Cell::Null, _) => Ok(IsNull::Yes),
            (Cell::Bigint(i), &Type::INT8) => i.to_sql(ty, out),
            (Cell::Double(f), &Type::FLOAT8) => f.to_sql(ty, out),
            (Cell::Boolean(b), &Type::BOOL) => b.to_sql(ty, out),
            (Cell::Text(s), &Type::TEXT) => s.to_sql(ty, out),
            (Cell::Timestamp(t), &Type::TIMESTAMPTZ) => t.to_sql(ty, out),
            (cell, ty) => Err(format!("cannot write {cell:?} as {ty}").into()),
        }
    }

    fn accepts(ty: &Type) -> bool {
        matches!(
            *ty,
            Type::INT8 | Type::FLOAT8 | Type::BOOL | Type::TEXT | Type::TIMESTAMPTZ
        )
    }

    to_sql_checked!();
}

/// Classifies a PostgreSQL error by its SQLSTATE (see `outcome`):
/// - configuration (will not heal by retrying soon): unknown database (`3D000`),
///   authentication (`28000`, `28P01`), missing privilege (`42501`);
/// - too large: `53200 out of shared memory` from the lock table (the hint names
///   `max_locks_per_transaction`) — one transaction touched too many tables;
/// - transient: no SQLSTATE (I/O, refused or closed connection), connection
///   exceptions (08), transaction rollbacks (40: serialization, deadlock), other
///   insufficient resources (53: disk full, too many connections), object not in
///   prerequisite state (55: lock not available), operator intervention (57:
///   shutdown, cancel, timeout) and system errors (58);
/// - permanent (the data is refused): everything else — 22 data, 23 constraint, 42
///   syntax/undefined/too long, 54 program limits.
///
/// The message is PostgreSQL's own (`3D000: database "x" does not exist`), with its
/// detail and hint, or for errors without SQLSTATE the whole chain of causes
/// (`error connecting to server: Connection refused (os error 111)`).
pub(crate) fn classify(e: tokio_postgres::Error) -> LoadError {
    let text = describe(&e);
    let Some(db) = e.as_db_error() else {
        return LoadError::Transient(text);
    };
    let code = db.code();
    let lock_table = *code == SqlState::OUT_OF_MEMORY
        && (db
            .hint()
            .is_some_and(|h| h.contains("max_locks_per_transaction"))
            || db.message().contains("shared memory"));
    if lock_table {
        return LoadError::TooLarge(text);
    }
    if [
        SqlState::INVALID_CATALOG_NAME,
        SqlState::INVALID_AUTHORIZATION_SPECIFICATION,
        SqlState::INVALID_PASSWORD,
        SqlState::INSUFFICIENT_PRIVILEGE,
    ]
    .contains(code)
    {
        return LoadError::Config(text);
    }
    let c = code.code();
    if ["08", "40", "53", "55", "57", "58"]
        .iter()
        .any(|p| c.starts_with(p))
    {
        LoadError::Transient(text)
    } else {
        LoadError::Permanent(text)
    }
}

/// A PostgreSQL error as a person needs it: `SQLSTATE: message` with detail and hint
/// for server errors, the error and its causes otherwise (tokio-postgres's own
/// `Display` says only `db error` or `error connecting to server`).
pub(crate) fn describe(e: &tokio_postgres::Error) -> String {
    if let Some(db) = e.as_db_error() {
        let mut text = format!("{}: {}", db.code().code(), db.message());
        if let Some(detail) = db.detail() {
            text.push_str(&format!(" ({detail})"));
        }
        if let Some(hint) = db.hint() {
            text.push_str(&format!("; hint: {hint}"));
        }
        return text;
    }
    let mut text = e.to_string();
    let mut source = std::error::Error::source(e);
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

fn pool_error(e: deadpool_postgres::PoolError) -> LoadError {
    use deadpool_postgres::PoolError;
    match e {
        PoolError::Backend(e) => classify(e).context("cannot connect to PostgreSQL: "),
        PoolError::Timeout(_) => LoadError::Transient(
            "cannot connect to PostgreSQL: no connection within the time limit".into(),
        ),
        other => LoadError::Transient(format!("cannot get a connection: {other}")),
    }
}

const MIGRATIONS: &[(i32, &str)] = &[
    (
        1,
        "CREATE TABLE {state}.loader_state (
        consumer text PRIMARY KEY,
        seq bigint NOT NULL,
        updated_at timestamptz NOT NULL DEFAULT now()
    )",
    ),
    // Positions name their log: existing rows keep `log_id = ''` until adopted.
    (
        2,
        "ALTER TABLE {state}.loader_state ADD COLUMN log_id text NOT NULL DEFAULT '';
         ALTER TABLE {state}.loader_state ADD COLUMN log_partition integer NOT NULL DEFAULT 0;
         ALTER TABLE {state}.loader_state DROP CONSTRAINT loader_state_pkey;
         ALTER TABLE {state}.loader_state ADD PRIMARY KEY (consumer, log_id, log_partition)",
    ),
    // Cluster mode: the lease epoch of the last holder that claimed or committed the
    // row; a commit under a lower one is refused (fencing).
    (
        3,
        "ALTER TABLE {state}.loader_state ADD COLUMN epoch bigint NOT NULL DEFAULT 0",
    ),
];

fn build_pool(cfg: tokio_postgres::Config, size: usize) -> Result<Pool, WarehouseError> {
    let manager = Manager::from_config(
        cfg,
        NoTls,
        ManagerConfig {
            recycling_method: RecyclingMethod::Fast,
        },
    );
    Pool::builder(manager)
        .max_size(size)
        .runtime(Runtime::Tokio1)
        .create_timeout(Some(Duration::from_secs(10)))
        .wait_timeout(Some(Duration::from_secs(30)))
        .build()
        .map_err(|e| WarehouseError::InvalidConfig(format!("postgres pool: {e}")))
}

impl PostgresBackend {
    pub(crate) fn open(url: &str, config: &WarehouseConfig) -> Result<Self, WarehouseError> {
        let mut cfg = tokio_postgres::Config::from_str(url)
            .map_err(|e| WarehouseError::InvalidConfig(format!("postgres url: {e}")))?;
        if cfg.get_connect_timeout().is_none() {
            cfg.connect_timeout(Duration::from_secs(5));
        }
        if cfg.get_application_name().is_none() {
            cfg.application_name("tributary-warehouse");
        }
        // A peer that vanishes without closing the connection (partition, VM gone) is
        // noticed within about a minute instead of hanging a load.
        cfg.keepalives(true)
            .keepalives_idle(Duration::from_secs(30))
            .keepalives_interval(Duration::from_secs(10))
            .keepalives_retries(3)
            .tcp_user_timeout(Duration::from_secs(60));
        let base_options = cfg.get_options().unwrap_or_default().to_string();
        let with = |extra: &str| {
            if base_options.is_empty() {
                extra.to_string()
            } else {
                format!("{base_options} {extra}")
            }
        };
        let mut read_cfg = cfg.clone();
        read_cfg.options(with("-c default_transaction_read_only=on"));
        // Loads never wait long for a lock a reader holds (an `ALTER TABLE` queued
        // behind a long BI query would also block every reader queued behind it):
        // the load fails as transient and is retried.
        cfg.options(with(
            "-c lock_timeout=30000 -c idle_in_transaction_session_timeout=600000",
        ));
        // `tributary` is reserved for sources precisely so it can be the default here.
        if config.state_schema != "tributary" {
            crate::naming::validate_schema_name(&config.state_schema)
                .map_err(|e| WarehouseError::InvalidConfig(format!("state_schema: {e}")))?;
        }
        let read_pool = build_pool(read_cfg.clone(), 4)?;
        let query_role = Box::new(query_role::QueryRole::new(
            read_pool.clone(),
            read_cfg,
            config.query_url.as_deref(),
            &config.state_schema,
        )?);
        Ok(PostgresBackend {
            load_pool: build_pool(cfg, 2)?,
            read_pool,
            state_schema: config.state_schema.clone(),
            query_timeout: config.query_timeout,
            query_max_rows: config.query_max_rows,
            query_max_bytes: config.query_max_bytes,
            query_role,
            key: std::sync::RwLock::new(StateKey::default()),
        })
    }

    fn state(&self) -> String {
        quote(&self.state_schema)
    }

    /// Applies the state-schema migrations and returns the loader position in the
    /// claimed log (adopting the pre-migration row when it is this log's). Runs under
    /// the migrations lock, so two nodes never both adopt or insert.
    pub(crate) async fn init(&self, claim: &Claim) -> Result<u64, LoadError> {
        let mut client = self.load_pool.get().await.map_err(pool_error)?;
        let tx = client.transaction().await.map_err(classify)?;
        tx.execute(
            "SELECT pg_advisory_xact_lock(hashtext('tributary-warehouse-migrations'))",
            &[],
        )
        .await
        .map_err(classify)?;
        let state = self.state();
        tx.batch_execute(&format!(
            "CREATE SCHEMA IF NOT EXISTS {state};
             CREATE TABLE IF NOT EXISTS {state}.migrations (
                 version integer PRIMARY KEY,
                 applied_at timestamptz NOT NULL DEFAULT now()
             );"
        ))
        .await
        .map_err(classify)?;
        let applied: Vec<i32> = tx
            .query(&format!("SELECT version FROM {state}.migrations"), &[])
            .await
            .map_err(classify)?
            .iter()
            .map(|r| r.get(0))
            .collect();
        for (version, sql) in MIGRATIONS {
            if applied.contains(version) {
                continue;
            }
            tx.batch_execute(&sql.replace("{state}", &state))
                .await
                .map_err(classify)?;
            tx.execute(
                &format!("INSERT INTO {state}.migrations (version) VALUES ($1)"),
                &[version],
            )
            .await
            .map_err(classify)?;
            tracing::info!(version, "warehouse state schema migrated");
        }
        // The loader's counters (module `stats`), idempotent.
        tx.batch_execute(&crate::stats::Scope::postgres("", &state).ddl())
            .await
            .map_err(classify)?;
        let key = &claim.key;
        let partition = key.partition as i32;
        let own = tx
            .query_opt(
                &format!(
                    "SELECT seq FROM {state}.loader_state
                     WHERE consumer = $1 AND log_id = $2 AND log_partition = $3"
                ),
                &[&CONSUMER, &key.log_id, &partition],
            )
            .await
            .map_err(classify)?
            .map(|r| r.get::<_, i64>(0));
        let seq = match own {
            Some(seq) => seq,
            None => {
                let legacy = tx
                    .query_opt(
                        &format!(
                            "SELECT seq FROM {state}.loader_state
                             WHERE consumer = $1 AND log_id = '' AND log_partition = $2"
                        ),
                        &[&CONSUMER, &partition],
                    )
                    .await
                    .map_err(classify)?
                    .map(|r| r.get::<_, i64>(0));
                match legacy {
                    Some(seq) if claim.adopts_legacy(seq.max(0) as u64) => {
                        tx.execute(
                            &format!(
                                "UPDATE {state}.loader_state SET log_id = $2
                                 WHERE consumer = $1 AND log_id = '' AND log_partition = $3"
                            ),
                            &[&CONSUMER, &key.log_id, &partition],
                        )
                        .await
                        .map_err(classify)?;
                        tracing::info!(position = seq, log_id = %key.log_id,
                            "warehouse position from before log ids adopted by this log");
                        seq
                    }
                    _ => {
                        tx.execute(
                            &format!(
                                "INSERT INTO {state}.loader_state (consumer, log_id, log_partition, seq)
                                 VALUES ($1, $2, $3, 0)"
                            ),
                            &[&CONSUMER, &key.log_id, &partition],
                        )
                        .await
                        .map_err(classify)?;
                        0
                    }
                }
            }
        };
        if let Some(epoch) = claim.epoch {
            // Claim the row for this lease: older holders are fenced from now on.
            let claimed = tx
                .execute(
                    &format!(
                        "UPDATE {state}.loader_state SET epoch = $4
                         WHERE consumer = $1 AND log_id = $2 AND log_partition = $3 AND epoch <= $4"
                    ),
                    &[&CONSUMER, &key.log_id, &partition, &(epoch as i64)],
                )
                .await
                .map_err(classify)?;
            if claimed == 0 {
                tx.rollback().await.map_err(classify)?;
                return Err(LoadError::Fenced(format!(
                    "partition {} claimed by a newer lease than epoch {epoch}",
                    key.partition
                )));
            }
        }
        tx.commit().await.map_err(classify)?;
        *self.key.write().unwrap_or_else(|p| p.into_inner()) = key.clone();
        Ok(seq.max(0) as u64)
    }

    pub(crate) async fn describe(&self, schema: &str) -> Result<SchemaState, LoadError> {
        let client = self.load_pool.get().await.map_err(pool_error)?;
        let rows = client
            .query(
                "SELECT table_name::text, column_name::text, data_type::text
                 FROM information_schema.columns
                 WHERE table_schema = $1
                 ORDER BY table_name, ordinal_position",
                &[&schema],
            )
            .await
            .map_err(classify)?;
        let mut state = SchemaState::default();
        for row in rows {
            let table: String = row.get(0);
            if table == DISCARDS_TABLE {
                state.exists = true;
                continue;
            }
            let column: String = row.get(1);
            let data_type: String = row.get(2);
            state
                .tables
                .entry(table)
                .or_insert_with(TableSchema::default)
                .push(column, column_type(&data_type));
        }
        Ok(state)
    }

    /// Commits a batch and the position `batch.last_seq`; with `ahead`, commits only
    /// rows whose `id` is absent and leaves the position alone (module `loader`'s
    /// express lane: the same records are committed again, as no-ops, in order).
    pub(crate) async fn apply(
        &self,
        batch: LoadBatch,
        ahead: bool,
    ) -> Result<ApplyStats, LoadError> {
        let mut client = self.load_pool.get().await.map_err(pool_error)?;
        let key = match &batch.fence {
            Some(f) => f.key.clone(),
            None => self.key.read().unwrap_or_else(|p| p.into_inner()).clone(),
        };
        let result = load::apply(&mut client, &self.state(), &key, &batch, ahead).await;
        if matches!(result, Err(LoadError::Transient(_))) {
            // The session may be broken; do not return it to the pool.
            let _ = deadpool_postgres::Object::take(client);
        }
        // Freeing a batch's rows takes milliseconds: do it off the loader's path (the
        // next commit waits on this one returning).
        tokio::task::spawn_blocking(move || drop(batch));
        result
    }

    pub(crate) async fn status(
        &self,
    ) -> Result<(Vec<SchemaStatus>, Option<DateTime<Utc>>), WarehouseError> {
        read::status(&self.read_pool, &self.state(), self.query_timeout).await
    }

    pub(crate) fn stats_scope(&self, schema: &str) -> crate::stats::Scope {
        crate::stats::Scope::postgres(schema, &self.state())
    }

    pub(crate) async fn events_on(
        &self,
        day: &str,
    ) -> Result<std::collections::HashMap<String, u64>, WarehouseError> {
        read::events_on(&self.read_pool, &self.state(), day).await
    }

    pub(crate) async fn table(
        &self,
        schema: &str,
        table: &str,
        limit: usize,
    ) -> Result<TableData, WarehouseError> {
        read::table(&self.read_pool, schema, table, limit, self.query_timeout).await
    }

    pub(crate) async fn query(
        &self,
        sql: &str,
        kind: crate::query::guard::StatementKind,
    ) -> Result<QueryResult, WarehouseError> {
        let limits = crate::query::Limits {
            timeout: self.query_timeout,
            max_rows: self.query_max_rows,
            max_bytes: self.query_max_bytes,
        };
        read::query(&self.query_role, sql, kind, limits).await
    }

    pub(crate) async fn columns(
        &self,
        schema: &str,
        tables: &[String],
    ) -> Result<std::collections::HashMap<String, std::collections::HashSet<String>>, WarehouseError>
    {
        read::columns(&self.read_pool, schema, tables).await
    }

    pub(crate) async fn read_rows(
        &self,
        sqls: Vec<String>,
    ) -> Result<Vec<Vec<Vec<serde_json::Value>>>, WarehouseError> {
        read::read_rows(&self.read_pool, &sqls, self.query_timeout).await
    }

    pub(crate) fn close(&self) {
        self.load_pool.close();
        self.read_pool.close();
        self.query_role.close();
    }
}
