//! Destinations' delivery markers and statistics in the control database: the
//! cluster's [`Ledger`], so the next owner of a partition knows what its
//! predecessors sent (module `tributary_destinations::ledger`).
//!
//! Two tables of the control schema:
//! - `delivery_markers`: one row per batch with live events, keyed by
//!   `(dest_id, partition, epoch, batch_id)`, naming its events (`seqs`), whether it
//!   ended (`done`), the node that sent it and when the row last changed;
//! - `delivery_stats`: the counts of every node, one row per destination.
//!
//! **Every write is fenced by the lease epoch, under a lock.** A write is one
//! statement (never a transaction held open across round trips: a node stopped
//! between two statements would hold the lock and block the takeover) that takes a
//! `FOR SHARE` lock on the partition's lease row *with the writer's epoch* — a marker
//! for a new batch also needs the lease unexpired. The grant that passes the
//! partition to another node updates that row, so it waits for writes in progress
//! and every write after it finds the row changed and stores nothing (`false`). The
//! new owner reads the markers after its grant committed, so it sees every batch
//! its predecessors started or ended, and nothing they do later.

use async_trait::async_trait;
use deadpool_postgres::Pool;
use tributary_destinations::{BatchCounts, BatchKey, DestinationError, Ledger, Recovery, Tally};

use super::pg;

/// The ledger's tables (created with the control schema's other tables).
const TABLES: &str = "
CREATE TABLE IF NOT EXISTS {s}.delivery_markers (
    dest_id text NOT NULL, partition integer NOT NULL, epoch bigint NOT NULL,
    batch_id bigint NOT NULL, done boolean NOT NULL, max_seq bigint NOT NULL,
    seqs bigint[] NOT NULL, node_id text NOT NULL,
    updated_at timestamptz NOT NULL DEFAULT clock_timestamp(),
    PRIMARY KEY (dest_id, partition, epoch, batch_id));
CREATE INDEX IF NOT EXISTS delivery_markers_seq
    ON {s}.delivery_markers (dest_id, partition, max_seq);
CREATE TABLE IF NOT EXISTS {s}.delivery_stats (
    dest_id text PRIMARY KEY, delivered bigint NOT NULL DEFAULT 0,
    redelivered bigint NOT NULL DEFAULT 0, skipped bigint NOT NULL DEFAULT 0,
    last_success_at bigint, last_error text, last_error_at bigint);
";

/// Creates the ledger's tables when missing (idempotent; serialized with the
/// control schema's migration by the same advisory lock).
pub async fn migrate(
    client: &mut tokio_postgres::Client,
    schema: &str,
) -> Result<(), tokio_postgres::Error> {
    super::pg::migrate_tables(client, schema, TABLES).await
}

/// Delivery markers and statistics in `<schema>.delivery_markers` and
/// `<schema>.delivery_stats`.
pub struct PgLedger {
    pool: Pool,
    schema: String,
    node_id: String,
}

fn failed(e: impl std::error::Error + 'static) -> DestinationError {
    DestinationError::Internal(format!("control database: {}", pg::error_text(&e)))
}

/// The lease consumer of a destination (as its workers compete for it).
fn consumer(dest: &str) -> String {
    format!("destination:{dest}")
}

impl PgLedger {
    /// A ledger on `pool` with its tables in `schema` (see [`migrate`]); markers
    /// name `node_id` as their writer.
    pub fn new(pool: Pool, schema: &str, node_id: &str) -> PgLedger {
        PgLedger {
            pool,
            schema: format!("\"{schema}\""),
            node_id: node_id.to_string(),
        }
    }
}

#[async_trait]
impl Ledger for PgLedger {
    async fn batch_started(&self, key: &BatchKey, seqs: &[u64]) -> Result<bool, DestinationError> {
        let s = &self.schema;
        let client = self.pool.get().await.map_err(failed)?;
        let seqs: Vec<i64> = seqs.iter().map(|q| *q as i64).collect();
        let max = seqs.iter().copied().max().unwrap_or(0);
        let row = client
            .query_opt(
                &format!(
                    "INSERT INTO {s}.delivery_markers AS m
                        (dest_id, partition, epoch, batch_id, done, max_seq, seqs, node_id, updated_at)
                     SELECT $1, $2, $3, $4, false, $5, $6, $7, clock_timestamp()
                     FROM {s}.leases l
                     WHERE l.consumer = $8 AND l.partition = $2 AND l.epoch = $3
                       AND l.expires_at > clock_timestamp()
                     FOR SHARE OF l
                     ON CONFLICT (dest_id, partition, epoch, batch_id) DO UPDATE
                     SET done = false, seqs = excluded.seqs, max_seq = excluded.max_seq,
                         node_id = excluded.node_id, updated_at = excluded.updated_at
                     RETURNING 1"
                ),
                &[
                    &key.dest,
                    &(key.partition as i32),
                    &(key.epoch as i64),
                    &(key.id as i64),
                    &max,
                    &seqs,
                    &self.node_id,
                    &consumer(&key.dest),
                ],
            )
            .await
            .map_err(failed)?;
        Ok(row.is_some())
    }

    async fn batch_finished(
        &self,
        key: &BatchKey,
        marked: bool,
        counts: &BatchCounts,
    ) -> Result<bool, DestinationError> {
        let s = &self.schema;
        let client = self.pool.get().await.map_err(failed)?;
        let anything = counts.delivered + counts.redelivered + counts.skipped > 0
            || counts.success_ms.is_some()
            || counts.error.is_some();
        // One statement, so the lease row's lock is never held across a round trip
        // (a node stopped between statements would block the takeover).
        let row = client
            .query_one(
                &format!(
                    "WITH lease AS (
                        SELECT 1 FROM {s}.leases
                        WHERE consumer = $8 AND partition = $2 AND epoch = $3 FOR SHARE),
                     marker AS (
                        UPDATE {s}.delivery_markers SET done = true, updated_at = clock_timestamp()
                        WHERE $9 AND dest_id = $1 AND partition = $2 AND epoch = $3 AND batch_id = $4
                          AND EXISTS (SELECT 1 FROM lease)
                        RETURNING 1),
                     counted AS (
                        INSERT INTO {s}.delivery_stats AS t
                            (dest_id, delivered, redelivered, skipped, last_success_at, last_error, last_error_at)
                        SELECT $1::text, $5::bigint, $6::bigint, $7::bigint, $10::bigint, $11::text, $12::bigint
                        WHERE $13 AND EXISTS (SELECT 1 FROM lease)
                        ON CONFLICT (dest_id) DO UPDATE SET
                            delivered = t.delivered + excluded.delivered,
                            redelivered = t.redelivered + excluded.redelivered,
                            skipped = t.skipped + excluded.skipped,
                            last_success_at = COALESCE(excluded.last_success_at, t.last_success_at),
                            last_error = COALESCE(excluded.last_error, t.last_error),
                            last_error_at = COALESCE(excluded.last_error_at, t.last_error_at)
                        RETURNING 1)
                     SELECT EXISTS (SELECT 1 FROM lease),
                            (SELECT count(*) FROM marker), (SELECT count(*) FROM counted)"
                ),
                &[
                    &key.dest,
                    &(key.partition as i32),
                    &(key.epoch as i64),
                    &(key.id as i64),
                    &(counts.delivered as i64),
                    &(counts.redelivered as i64),
                    &(counts.skipped as i64),
                    &consumer(&key.dest),
                    &marked,
                    &counts.success_ms,
                    &counts.error.as_ref().map(|e| e.0.as_str()),
                    &counts.error.as_ref().map(|e| e.1),
                    &anything,
                ],
            )
            .await
            .map_err(failed)?;
        Ok(row.get::<_, bool>(0))
    }

    async fn batch_abandoned(&self, key: &BatchKey) -> Result<(), DestinationError> {
        let s = &self.schema;
        let client = self.pool.get().await.map_err(failed)?;
        client
            .execute(
                &format!(
                    "DELETE FROM {s}.delivery_markers
                     WHERE dest_id = $1 AND partition = $2 AND epoch = $3 AND batch_id = $4
                       AND EXISTS (SELECT 1 FROM {s}.leases l
                           WHERE l.consumer = $5 AND l.partition = $2 AND l.epoch = $3
                           FOR SHARE OF l)"
                ),
                &[
                    &key.dest,
                    &(key.partition as i32),
                    &(key.epoch as i64),
                    &(key.id as i64),
                    &consumer(&key.dest),
                ],
            )
            .await
            .map_err(failed)?;
        Ok(())
    }

    async fn recovery(
        &self,
        dest: &str,
        partition: u32,
        cursor: u64,
    ) -> Result<Recovery, DestinationError> {
        let client = self.pool.get().await.map_err(failed)?;
        let rows = client
            .query(
                &format!(
                    "SELECT done, seqs FROM {}.delivery_markers
                     WHERE dest_id = $1 AND partition = $2 AND max_seq > $3",
                    self.schema
                ),
                &[&dest, &(partition as i32), &(cursor as i64)],
            )
            .await
            .map_err(failed)?;
        Ok(Recovery::from_markers(
            rows.iter().map(|r| {
                let seqs: Vec<i64> = r.get(1);
                (
                    r.get::<_, bool>(0),
                    seqs.into_iter().map(|q| q as u64).collect(),
                )
            }),
            cursor,
        ))
    }

    async fn prune(
        &self,
        dest: &str,
        partition: u32,
        epoch: u64,
        cursor: u64,
    ) -> Result<(), DestinationError> {
        let s = &self.schema;
        let client = self.pool.get().await.map_err(failed)?;
        client
            .execute(
                &format!(
                    "DELETE FROM {s}.delivery_markers
                     WHERE dest_id = $1 AND partition = $2 AND max_seq <= $3
                       AND EXISTS (SELECT 1 FROM {s}.leases l
                           WHERE l.consumer = $4 AND l.partition = $2 AND l.epoch = $5
                           FOR SHARE OF l)"
                ),
                &[
                    &dest,
                    &(partition as i32),
                    &(cursor as i64),
                    &consumer(dest),
                    &(epoch as i64),
                ],
            )
            .await
            .map_err(failed)?;
        Ok(())
    }

    async fn tally(&self, dest: &str) -> Result<Tally, DestinationError> {
        let client = self.pool.get().await.map_err(failed)?;
        let row = client
            .query_opt(
                &format!(
                    "SELECT delivered, redelivered, skipped, last_success_at, last_error, last_error_at
                     FROM {}.delivery_stats WHERE dest_id = $1",
                    self.schema
                ),
                &[&dest],
            )
            .await
            .map_err(failed)?;
        Ok(row
            .map(|r| Tally {
                delivered: r.get::<_, i64>(0) as u64,
                redelivered: r.get::<_, i64>(1) as u64,
                skipped: r.get::<_, i64>(2) as u64,
                last_success_ms: r.get(3),
                last_error: r.get(4),
                last_error_ms: r.get(5),
            })
            .unwrap_or_default())
    }

    async fn forget(&self, dest: &str) -> Result<(), DestinationError> {
        let mut client = self.pool.get().await.map_err(failed)?;
        let tx = client.transaction().await.map_err(failed)?;
        for table in ["delivery_markers", "delivery_stats"] {
            tx.execute(
                &format!("DELETE FROM {}.\"{table}\" WHERE dest_id = $1", self.schema),
                &[&dest],
            )
            .await
            .map_err(failed)?;
        }
        tx.commit().await.map_err(failed)
    }
}
