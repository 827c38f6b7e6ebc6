//! Destination definitions in the control database: the cluster's
//! [`Definitions`], so every node serves and delivers the same destinations.
//!
//! Each write is one transaction that also `NOTIFY`s the control schema's channel
//! with `destinations`; every node's control listener passes that on
//! ([`crate::control::Control::destination_changes`]) and the server then calls
//! [`tributary_destinations::Engine::sync_definitions`] (also periodically and after
//! every reconnection, since notifications can be lost). Delivery markers and
//! statistics and dead letters are in the control database too ([`super::PgLedger`]).

use async_trait::async_trait;
use deadpool_postgres::Pool;
use tributary_destinations::{Definitions, DestinationError, DestinationRow};

use super::pg;

/// Destination definitions in `<schema>.destinations`.
pub struct PgDefinitions {
    pool: Pool,
    schema: String,
    channel: String,
}

fn failed(e: impl std::error::Error + 'static) -> DestinationError {
    DestinationError::Internal(format!("control database: {}", pg::error_text(&e)))
}

const COLS: &str = "id, name, config, source_ids, filters, enabled, created_at, updated_at";

fn row(r: &tokio_postgres::Row) -> DestinationRow {
    let sources: String = r.get(3);
    let filters: String = r.get(4);
    DestinationRow {
        id: r.get(0),
        name: r.get(1),
        config: r.get(2),
        source_ids: serde_json::from_str(&sources).unwrap_or_default(),
        filters: serde_json::from_str(&filters).unwrap_or_default(),
        enabled: r.get(5),
        created_at_ms: r.get(6),
        updated_at_ms: r.get(7),
    }
}

impl PgDefinitions {
    /// Definitions on `pool`, tables in `schema` (migrated by the caller).
    pub fn new(pool: Pool, schema: &str) -> PgDefinitions {
        PgDefinitions {
            pool,
            schema: format!("\"{schema}\""),
            channel: schema.to_string(),
        }
    }

    /// Runs one statement and the notification in one transaction; rows affected.
    async fn write(
        &self,
        sql: &str,
        params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
    ) -> Result<u64, DestinationError> {
        let mut client = self.pool.get().await.map_err(failed)?;
        let tx = client.transaction().await.map_err(failed)?;
        let n = tx.execute(sql, params).await.map_err(failed)?;
        tx.execute("SELECT pg_notify($1, 'destinations')", &[&self.channel])
            .await
            .map_err(failed)?;
        tx.commit().await.map_err(failed)?;
        Ok(n)
    }
}

#[async_trait]
impl Definitions for PgDefinitions {
    async fn insert(&self, r: DestinationRow) -> Result<(), DestinationError> {
        let sources = serde_json::to_string(&r.source_ids).unwrap_or_else(|_| "[]".into());
        let filters = serde_json::to_string(&r.filters).unwrap_or_else(|_| "{}".into());
        self.write(
            &format!(
                "INSERT INTO {}.destinations ({COLS}) VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
                self.schema
            ),
            &[
                &r.id,
                &r.name,
                &r.config,
                &sources,
                &filters,
                &r.enabled,
                &r.created_at_ms,
                &r.updated_at_ms,
            ],
        )
        .await
        .map(|_| ())
    }

    async fn update(&self, r: DestinationRow) -> Result<bool, DestinationError> {
        let sources = serde_json::to_string(&r.source_ids).unwrap_or_else(|_| "[]".into());
        let filters = serde_json::to_string(&r.filters).unwrap_or_else(|_| "{}".into());
        let n = self
            .write(
                &format!(
                    "UPDATE {}.destinations SET name = $2, config = $3, source_ids = $4,
                     filters = $5, enabled = $6, updated_at = $7 WHERE id = $1",
                    self.schema
                ),
                &[
                    &r.id,
                    &r.name,
                    &r.config,
                    &sources,
                    &filters,
                    &r.enabled,
                    &r.updated_at_ms,
                ],
            )
            .await?;
        Ok(n > 0)
    }

    async fn delete(&self, id: &str) -> Result<bool, DestinationError> {
        let n = self
            .write(
                &format!("DELETE FROM {}.destinations WHERE id = $1", self.schema),
                &[&id],
            )
            .await?;
        Ok(n > 0)
    }

    async fn list(&self) -> Result<Vec<DestinationRow>, DestinationError> {
        let client = self.pool.get().await.map_err(failed)?;
        let rows = client
            .query(
                &format!(
                    "SELECT {COLS} FROM {}.destinations ORDER BY created_at, id",
                    self.schema
                ),
                &[],
            )
            .await
            .map_err(failed)?;
        Ok(rows.iter().map(row).collect())
    }

    async fn get(&self, id: &str) -> Result<Option<DestinationRow>, DestinationError> {
        let client = self.pool.get().await.map_err(failed)?;
        let r = client
            .query_opt(
                &format!(
                    "SELECT {COLS} FROM {}.destinations WHERE id = $1",
                    self.schema
                ),
                &[&id],
            )
            .await
            .map_err(failed)?;
        Ok(r.as_ref().map(row))
    }
}
