//! Destinations' positions in the control database: the cluster's
//! [`ConsumerRegistry`].
//!
//! One row per `(consumer, log_id, partition)` in `<schema>.positions` holds the
//! committed sequence number and the epoch it was committed under. **A commit is
//! fenced twice, in one statement**: it is refused when a higher epoch already
//! committed for that partition (`WHERE positions.epoch <= $epoch`), and when the
//! partition's lease has since been granted with a higher epoch
//! (`<schema>.leases`, see [`super::lease`]) — so a node that lost its lease commits
//! nothing even before the new owner's first commit. A refused commit returns
//! `false` and stores nothing; the caller must stop consuming that partition.
//!
//! Committed means committed: the statement runs in its own transaction on the
//! control database (synchronous commit as the server is configured).

use async_trait::async_trait;
use deadpool_postgres::Pool;
use tributary_eventlog::{ConsumerRegistry, ConsumerState, Gap, LogError, Position};

use super::pg;

/// Consumers' positions in the control database.
#[derive(Clone)]
pub struct PgRegistry {
    pool: Pool,
    schema: String,
}

fn unavailable(e: impl std::error::Error + 'static) -> LogError {
    LogError::Unavailable(format!("control database: {}", pg::error_text(&e)))
}

impl PgRegistry {
    /// A registry on `pool` with its table in `schema` (migrated by the caller).
    pub fn new(pool: Pool, schema: &str) -> PgRegistry {
        PgRegistry {
            pool,
            schema: format!("\"{schema}\""),
        }
    }
}

#[async_trait]
impl ConsumerRegistry for PgRegistry {
    async fn cursor(
        &self,
        consumer: &str,
        log_id: &str,
        partition: u32,
    ) -> Result<Option<Position>, LogError> {
        let client = self.pool.get().await.map_err(unavailable)?;
        let row = client
            .query_opt(
                &format!(
                    "SELECT seq FROM {}.positions
                     WHERE consumer = $1 AND log_id = $2 AND partition = $3",
                    self.schema
                ),
                &[&consumer, &log_id, &(partition as i32)],
            )
            .await
            .map_err(unavailable)?;
        Ok(row.map(|r| Position::new(log_id, partition, r.get::<_, i64>(0) as u64)))
    }

    async fn commit(
        &self,
        consumer: &str,
        position: &Position,
        epoch: u64,
    ) -> Result<bool, LogError> {
        let client = self.pool.get().await.map_err(unavailable)?;
        let s = &self.schema;
        let row = client
            .query_opt(
                &format!(
                    "INSERT INTO {s}.positions AS p (consumer, log_id, partition, seq, epoch, pinned, updated_at)
                     SELECT $1, $2, $3, $4, $5, true, now()
                     WHERE NOT EXISTS (SELECT 1 FROM {s}.leases l
                         WHERE l.consumer = $1 AND l.partition = $3 AND l.epoch > $5)
                     ON CONFLICT (consumer, log_id, partition) DO UPDATE
                     SET seq = excluded.seq, epoch = excluded.epoch, pinned = true,
                         updated_at = excluded.updated_at
                     WHERE p.epoch <= excluded.epoch
                     RETURNING 1"
                ),
                &[
                    &consumer,
                    &position.log_id,
                    &(position.partition as i32),
                    &(position.seq as i64),
                    &(epoch as i64),
                ],
            )
            .await
            .map_err(unavailable)?;
        if row.is_none() {
            tracing::warn!(consumer, position = %position, epoch, "commit refused: a newer lease holder owns the partition");
            metrics::counter!("tributary_lease_fenced_commits_total").increment(1);
        }
        Ok(row.is_some())
    }

    async fn unpin(&self, consumer: &str) -> Result<(), LogError> {
        let client = self.pool.get().await.map_err(unavailable)?;
        client
            .execute(
                &format!(
                    "UPDATE {}.positions SET pinned = false WHERE consumer = $1",
                    self.schema
                ),
                &[&consumer],
            )
            .await
            .map_err(unavailable)?;
        Ok(())
    }

    async fn remove(&self, consumer: &str) -> Result<(), LogError> {
        let client = self.pool.get().await.map_err(unavailable)?;
        client
            .execute(
                &format!("DELETE FROM {}.positions WHERE consumer = $1", self.schema),
                &[&consumer],
            )
            .await
            .map_err(unavailable)?;
        Ok(())
    }

    async fn list(&self) -> Result<Vec<ConsumerState>, LogError> {
        let client = self.pool.get().await.map_err(unavailable)?;
        let rows = client
            .query(
                &format!(
                    "SELECT consumer, log_id, partition, seq, pinned, dropped, gap_from, gap_to, gap_at
                     FROM {}.positions ORDER BY consumer, log_id, partition",
                    self.schema
                ),
                &[],
            )
            .await
            .map_err(unavailable)?;
        Ok(rows
            .into_iter()
            .map(|r| ConsumerState {
                name: r.get(0),
                position: Position::new(
                    r.get::<_, String>(1),
                    r.get::<_, i32>(2) as u32,
                    r.get::<_, i64>(3) as u64,
                ),
                pinned: r.get(4),
                dropped: r.get::<_, i64>(5) as u64,
                gap: match (r.get::<_, Option<i64>>(6), r.get::<_, Option<i64>>(7)) {
                    (Some(from), Some(to)) => Some(Gap {
                        partition: r.get::<_, i32>(2) as u32,
                        from: from as u64,
                        to: to as u64,
                    }),
                    _ => None,
                },
                gap_at_ms: r.get(8),
            })
            .collect())
    }

    async fn record_loss(
        &self,
        consumer: &str,
        log_id: &str,
        gap: Gap,
        lost: u64,
        at_ms: i64,
    ) -> Result<(), LogError> {
        let client = self.pool.get().await.map_err(unavailable)?;
        client
            .execute(
                &format!(
                    // A consumer without a position in the partition (it held all
                    // of it) gets one at the beginning, which is where it was.
                    "INSERT INTO {s}.positions AS p (consumer, log_id, partition, seq, epoch, pinned,
                         dropped, gap_from, gap_to, gap_at)
                     VALUES ($1, $2, $3, 0, 0, true, $4, $5, $6, $7)
                     ON CONFLICT (consumer, log_id, partition) DO UPDATE
                     SET dropped = p.dropped + excluded.dropped, gap_from = excluded.gap_from,
                         gap_to = excluded.gap_to, gap_at = excluded.gap_at",
                    s = self.schema
                ),
                &[
                    &consumer,
                    &log_id,
                    &(gap.partition as i32),
                    &(lost as i64),
                    &(gap.from as i64),
                    &(gap.to as i64),
                    &at_ms,
                ],
            )
            .await
            .map_err(unavailable)?;
        Ok(())
    }
}
