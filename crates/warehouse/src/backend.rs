//! The closed set of warehouse backends and what the loader needs from each.
//!
//! [`Backend`] is a tagged enum (`sqlite`, `postgres`) chosen from the URL scheme, with
//! one `match` per operation — no registry. Every backend implements the same
//! contract: [`Backend::apply`] commits a whole [`LoadBatch`] and the new loader
//! position atomically (per schema file on SQLite), skipping rows at or below the
//! position it reads inside its transaction; failures are classified as
//! [`LoadError::Transient`] (retry the same batch later) or [`LoadError::Permanent`]
//! (the data is refused; the loader isolates the record).
//!
//! Imports go one way: this module uses `sqlite` and `postgres`, which use only
//! `outcome` (the load contract's result types), never this module.

use std::path::PathBuf;

use chrono::{DateTime, Utc};

use crate::evolve::{LoadBatch, SchemaState};
use crate::outcome::{ApplyStats, Claim, LoadError};
use crate::postgres::PostgresBackend;
use crate::sqlite::SqliteBackend;
use crate::{BackendKind, QueryResult, SchemaStatus, TableData, WarehouseConfig, WarehouseError};

/// A configured backend.
pub(crate) enum Backend {
    /// Embedded SQLite.
    Sqlite(SqliteBackend),
    /// PostgreSQL.
    Postgres(PostgresBackend),
}

/// Where a URL points.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Target {
    Sqlite(PathBuf),
    Postgres(String),
}

/// Parses `sqlite://<dir>` or `postgres://…` / `postgresql://…`.
pub(crate) fn parse_url(url: &str) -> Result<Target, WarehouseError> {
    if let Some(dir) = url.strip_prefix("sqlite://") {
        if dir.is_empty() {
            return Err(WarehouseError::InvalidConfig(
                "sqlite:// needs a directory, e.g. sqlite://./tributary-data/warehouse".into(),
            ));
        }
        Ok(Target::Sqlite(PathBuf::from(dir)))
    } else if url.starts_with("postgres://") || url.starts_with("postgresql://") {
        Ok(Target::Postgres(url.to_string()))
    } else {
        Err(WarehouseError::InvalidConfig(
            "warehouse url must start with sqlite:// or postgres://".into(),
        ))
    }
}

impl Backend {
    pub(crate) async fn open(config: &WarehouseConfig) -> Result<Backend, WarehouseError> {
        match parse_url(&config.url)? {
            Target::Sqlite(dir) => Ok(Backend::Sqlite(SqliteBackend::open(dir, config).await?)),
            Target::Postgres(url) => Ok(Backend::Postgres(PostgresBackend::open(&url, config)?)),
        }
    }

    pub(crate) fn kind(&self) -> BackendKind {
        match self {
            Backend::Sqlite(_) => BackendKind::Sqlite,
            Backend::Postgres(_) => BackendKind::Postgres,
        }
    }

    /// Prepares the state tables and returns the loader's committed position in the
    /// claimed log (adopting a pre-migration row if [`Claim::adopts_legacy`]); later
    /// [`Backend::apply`] calls commit positions of that log.
    pub(crate) async fn init(&self, claim: &Claim) -> Result<u64, LoadError> {
        match self {
            Backend::Sqlite(b) => b.init(claim).await,
            Backend::Postgres(b) => b.init(claim).await,
        }
    }

    /// Reads the tables and column types of a schema.
    pub(crate) async fn describe(&self, schema: &str) -> Result<SchemaState, LoadError> {
        match self {
            Backend::Sqlite(b) => b.describe(schema).await,
            Backend::Postgres(b) => b.describe(schema).await,
        }
    }

    /// Commits a batch and the loader position `batch.last_seq` (of the log claimed
    /// by [`Backend::init`]).
    pub(crate) async fn apply(&self, batch: LoadBatch) -> Result<ApplyStats, LoadError> {
        match self {
            Backend::Sqlite(b) => b.apply(batch).await,
            Backend::Postgres(b) => b.apply(batch, false).await,
        }
    }

    /// Commits the rows of a batch ahead of the position, without moving it (the
    /// loader's express lane). `None` when the backend has no such lane (SQLite: a
    /// new table costs no fsync there, so a large batch does not hold others up).
    pub(crate) async fn apply_ahead(
        &self,
        batch: LoadBatch,
    ) -> Option<Result<ApplyStats, LoadError>> {
        match self {
            Backend::Sqlite(_) => None,
            Backend::Postgres(b) => Some(b.apply(batch, true).await),
        }
    }

    pub(crate) async fn status(
        &self,
    ) -> Result<(Vec<SchemaStatus>, Option<DateTime<Utc>>), WarehouseError> {
        match self {
            Backend::Sqlite(b) => b.status().await,
            Backend::Postgres(b) => b.status().await,
        }
    }

    pub(crate) async fn table(
        &self,
        schema: &str,
        table: &str,
        limit: usize,
    ) -> Result<TableData, WarehouseError> {
        match self {
            Backend::Sqlite(b) => b.table(schema, table, limit).await,
            Backend::Postgres(b) => b.table(schema, table, limit).await,
        }
    }

    pub(crate) async fn query(
        &self,
        sql: &str,
        kind: crate::query::guard::StatementKind,
    ) -> Result<QueryResult, WarehouseError> {
        match self {
            Backend::Sqlite(b) => b.query(sql).await,
            Backend::Postgres(b) => b.query(sql, kind).await,
        }
    }

    /// Columns of the given tables of `schema` (absent tables left out).
    pub(crate) async fn columns(
        &self,
        schema: &str,
        tables: &[String],
    ) -> Result<std::collections::HashMap<String, std::collections::HashSet<String>>, WarehouseError>
    {
        match self {
            Backend::Sqlite(b) => b.columns(schema, tables).await,
            Backend::Postgres(b) => b.columns(schema, tables).await,
        }
    }

    /// Runs Tributary's own read-only statements on `schema` (built by
    /// `crate::report` with every identifier quoted; on SQLite tables are
    /// unqualified, on PostgreSQL schema-qualified).
    pub(crate) async fn read_rows(
        &self,
        schema: &str,
        sqls: Vec<String>,
    ) -> Result<Vec<Vec<Vec<serde_json::Value>>>, WarehouseError> {
        match self {
            Backend::Sqlite(b) => b.read_rows(schema, sqls).await,
            Backend::Postgres(b) => b.read_rows(sqls).await,
        }
    }

    /// Events of `day` per schema, from the loader's counters.
    pub(crate) async fn events_on(
        &self,
        day: &str,
    ) -> Result<std::collections::HashMap<String, u64>, WarehouseError> {
        match self {
            Backend::Sqlite(b) => b.events_on(day).await,
            Backend::Postgres(b) => b.events_on(day).await,
        }
    }

    /// Where the loader's counters of `schema` live (module `stats`).
    pub(crate) fn stats_scope(&self, schema: &str) -> crate::stats::Scope {
        match self {
            Backend::Sqlite(_) => crate::stats::Scope::sqlite(schema),
            Backend::Postgres(b) => b.stats_scope(schema),
        }
    }

    /// Whether the loader's counters of `schema` exist (a schema loaded before they
    /// did has none until its next load); reads use the raw tables until then.
    pub(crate) async fn email_counters_built(&self, schema: &str) -> Result<bool, WarehouseError> {
        let scope = self.stats_scope(schema);
        if let Backend::Sqlite(_) = self {
            let exists = self
                .read_rows(
                    schema,
                    vec![format!(
                        "SELECT count(*) FROM sqlite_master WHERE type = 'table' AND name = {}",
                        crate::report::literal(&format!(
                            "{}stats_meta",
                            crate::stats::SQLITE_PREFIX
                        ))
                    )],
                )
                .await?;
            if !first_count(&exists) {
                return Ok(false);
            }
        }
        let built = self.read_rows(schema, vec![scope.is_built()]).await?;
        Ok(first_count(&built))
    }

    pub(crate) async fn close(&self) {
        match self {
            Backend::Sqlite(b) => b.close().await,
            Backend::Postgres(b) => b.close(),
        }
    }
}

/// True when the first statement's first cell is a count above zero.
fn first_count(rows: &[Vec<Vec<serde_json::Value>>]) -> bool {
    rows.first()
        .and_then(|r| r.first())
        .and_then(|r| r.first())
        .and_then(serde_json::Value::as_i64)
        .is_some_and(|n| n > 0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::outcome::StateKey;

    #[test]
    fn parses_warehouse_urls() {
        assert_eq!(
            parse_url("sqlite://./data/warehouse").ok(),
            Some(Target::Sqlite(PathBuf::from("./data/warehouse")))
        );
        assert_eq!(
            parse_url("sqlite:///var/lib/tributary/warehouse").ok(),
            Some(Target::Sqlite(PathBuf::from(
                "/var/lib/tributary/warehouse"
            )))
        );
        assert_eq!(
            parse_url("postgres://u@db:5432/w").ok(),
            Some(Target::Postgres("postgres://u@db:5432/w".into()))
        );
        assert!(parse_url("postgresql://db/w").is_ok());
        assert!(parse_url("sqlite://").is_err());
        assert!(parse_url("mysql://db").is_err());
        assert!(parse_url("").is_err());
    }

    #[test]
    fn a_pre_migration_position_is_adopted_only_by_the_log_that_wrote_it() {
        let claim = |head, hint| Claim {
            key: StateKey {
                log_id: "l".into(),
                partition: 0,
            },
            head,
            hint,
            epoch: None,
        };
        // The log that loaded up to 500 (its copy may lag one batch).
        assert!(claim(800, 500).adopts_legacy(500));
        assert!(claim(800, 400).adopts_legacy(500));
        // A new log: no copy of the position, or a head below the row.
        assert!(!claim(0, 0).adopts_legacy(500));
        assert!(!claim(800, 0).adopts_legacy(500));
        assert!(!claim(300, 300).adopts_legacy(500));
        // A log whose copy is past the row loaded elsewhere since.
        assert!(!claim(800, 600).adopts_legacy(500));
        assert_eq!(claim(1, 1).key.sqlite_consumer(), "warehouse@l/0");
    }
}
