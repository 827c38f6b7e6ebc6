//! Destinations' delivery markers and statistics in the control database: the
//! cluster's [`Ledger`], so the next owner of a partition knows what its
//! predecessors sent (module `tributary_destinations::ledger`).
//!
//! Two tables of the control schema:
//! - `delivery_markers`: one row per batch with live events, keyed by
//!   `(dest_id, partition, epoch, batch_id)`, naming its events (`seqs`), whether it
//!   ended (`done`), the node that sent it and when the row last changed;
//! - `delivery_stats`: the counts of every node, one row per destination;
//! - `delivery_dead_letters`: every node's dead letters, one row per
//!   `(dest_id, seq)`, with the event, the last failure and the replay claim (the
//!   node replaying it, and since when).
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
use tributary_destinations::{
    BatchCounts, BatchKey, DeadLetter, DestinationError, Ledger, LetterChanges, Recovery, Tally,
    ms_to_time,
};
use tributary_eventlog::{CallType, Record};

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
CREATE TABLE IF NOT EXISTS {s}.delivery_dead_letters (
    id bigserial PRIMARY KEY, dest_id text NOT NULL, partition integer NOT NULL,
    seq bigint NOT NULL, source_id text NOT NULL, message_id text NOT NULL,
    call_type text NOT NULL, event text, user_id text, anonymous_id text,
    received_at bigint NOT NULL, payload text NOT NULL, attempts integer NOT NULL,
    last_status integer, last_response text, error text NOT NULL,
    first_attempt_at bigint NOT NULL, failed_at bigint NOT NULL,
    replaying_node text, replaying_since timestamptz,
    UNIQUE (dest_id, seq));
";

/// A replay claim this old is taken for lost (its node stopped mid-replay).
const CLAIM_LOST_AFTER: &str = "interval '1 hour'";

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
        letters: LetterChanges<'_>,
    ) -> Result<bool, DestinationError> {
        let s = &self.schema;
        let client = self.pool.get().await.map_err(failed)?;
        let dead = DeadColumns::of(letters);
        let now = chrono::Utc::now().timestamp_millis();
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
                        RETURNING 1),
                     dead AS (
                        INSERT INTO {s}.delivery_dead_letters AS d
                            (dest_id, partition, seq, source_id, message_id, call_type, event,
                             user_id, anonymous_id, received_at, payload, attempts, last_status,
                             last_response, error, first_attempt_at, failed_at)
                        SELECT $1, u.* , $27::bigint
                        FROM unnest($14::int[], $15::bigint[], $16::text[], $17::text[], $18::text[],
                            $19::text[], $20::text[], $21::text[], $22::bigint[], $23::text[],
                            $24::int[], $25::int[], $26::text[], $28::text[], $29::bigint[])
                            AS u(partition, seq, source_id, message_id, call_type, event, user_id,
                                 anonymous_id, received_at, payload, attempts, last_status,
                                 last_response, error, first_attempt_at)
                        WHERE EXISTS (SELECT 1 FROM lease)
                        ON CONFLICT (dest_id, seq) DO UPDATE SET
                            attempts = d.attempts + excluded.attempts,
                            last_status = excluded.last_status,
                            last_response = excluded.last_response,
                            error = excluded.error, failed_at = excluded.failed_at,
                            replaying_node = NULL, replaying_since = NULL
                        RETURNING 1),
                     replayed AS (
                        DELETE FROM {s}.delivery_dead_letters
                        WHERE dest_id = $1 AND id = ANY($30::bigint[]) AND EXISTS (SELECT 1 FROM lease)
                        RETURNING 1)
                     SELECT EXISTS (SELECT 1 FROM lease),
                            (SELECT count(*) FROM marker), (SELECT count(*) FROM counted),
                            (SELECT count(*) FROM dead), (SELECT count(*) FROM replayed)"
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
                    &dead.partition,
                    &dead.seq,
                    &dead.source_id,
                    &dead.message_id,
                    &dead.call_type,
                    &dead.event,
                    &dead.user_id,
                    &dead.anonymous_id,
                    &dead.received_at,
                    &dead.payload,
                    &dead.attempts,
                    &dead.last_status,
                    &dead.last_response,
                    &now,
                    &dead.error,
                    &dead.first_attempt_at,
                    &letters.replayed_ok,
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
        let mut tally = row
            .map(|r| Tally {
                delivered: r.get::<_, i64>(0) as u64,
                redelivered: r.get::<_, i64>(1) as u64,
                skipped: r.get::<_, i64>(2) as u64,
                last_success_ms: r.get(3),
                last_error: r.get(4),
                last_error_ms: r.get(5),
                dead_letters: 0,
            })
            .unwrap_or_default();
        let dead = client
            .query_one(
                &format!(
                    "SELECT count(*) FROM {}.delivery_dead_letters WHERE dest_id = $1",
                    self.schema
                ),
                &[&dest],
            )
            .await
            .map_err(failed)?;
        tally.dead_letters = dead.get::<_, i64>(0) as u64;
        Ok(tally)
    }

    async fn forget(&self, dest: &str) -> Result<(), DestinationError> {
        let mut client = self.pool.get().await.map_err(failed)?;
        let tx = client.transaction().await.map_err(failed)?;
        for table in [
            "delivery_markers",
            "delivery_stats",
            "delivery_dead_letters",
        ] {
            tx.execute(
                &format!("DELETE FROM {}.\"{table}\" WHERE dest_id = $1", self.schema),
                &[&dest],
            )
            .await
            .map_err(failed)?;
        }
        tx.commit().await.map_err(failed)
    }

    async fn dead_letters(
        &self,
        dest: &str,
        limit: usize,
    ) -> Result<Vec<DeadLetter>, DestinationError> {
        let client = self.pool.get().await.map_err(failed)?;
        let rows = client
            .query(
                &format!(
                    "SELECT id, seq, message_id, payload, attempts, last_status, last_response, error,
                            first_attempt_at, failed_at,
                            replaying_node IS NOT NULL
                              AND replaying_since > clock_timestamp() - {CLAIM_LOST_AFTER}
                     FROM {}.delivery_dead_letters WHERE dest_id = $1 ORDER BY seq LIMIT $2",
                    self.schema
                ),
                &[&dest, &(limit as i64)],
            )
            .await
            .map_err(failed)?;
        Ok(rows
            .iter()
            .map(|r| {
                let payload: String = r.get(3);
                DeadLetter {
                    id: r.get(0),
                    seq: r.get::<_, i64>(1) as u64,
                    message_id: r.get(2),
                    event: serde_json::from_str(&payload)
                        .unwrap_or(serde_json::Value::String(payload)),
                    attempts: r.get::<_, i32>(4) as u32,
                    last_status: r.get::<_, Option<i32>>(5).map(|s| s as u16),
                    last_response: r.get(6),
                    error: r.get(7),
                    first_attempt_at: ms_to_time(r.get(8)),
                    failed_at: ms_to_time(r.get(9)),
                    replaying: r.get(10),
                }
            })
            .collect())
    }

    async fn start_replay(&self, dest: &str) -> Result<Vec<i64>, DestinationError> {
        let client = self.pool.get().await.map_err(failed)?;
        // One statement: two nodes asked at once claim disjoint sets.
        let rows = client
            .query(
                &format!(
                    "UPDATE {}.delivery_dead_letters
                     SET replaying_node = $2, replaying_since = clock_timestamp()
                     WHERE dest_id = $1 AND (replaying_node IS NULL
                        OR replaying_since <= clock_timestamp() - {CLAIM_LOST_AFTER})
                     RETURNING id, seq",
                    self.schema
                ),
                &[&dest, &self.node_id],
            )
            .await
            .map_err(failed)?;
        let mut ids: Vec<(i64, i64)> = rows.iter().map(|r| (r.get(1), r.get(0))).collect();
        ids.sort_unstable();
        Ok(ids.into_iter().map(|(_, id)| id).collect())
    }

    async fn end_replay(&self, dest: &str, ids: Option<&[i64]>) -> Result<(), DestinationError> {
        let client = self.pool.get().await.map_err(failed)?;
        let s = &self.schema;
        match ids {
            None => {
                client
                    .execute(
                        &format!(
                            "UPDATE {s}.delivery_dead_letters
                             SET replaying_node = NULL, replaying_since = NULL
                             WHERE dest_id = $1 AND replaying_node = $2"
                        ),
                        &[&dest, &self.node_id],
                    )
                    .await
            }
            Some(ids) => {
                client
                    .execute(
                        &format!(
                            "UPDATE {s}.delivery_dead_letters
                             SET replaying_node = NULL, replaying_since = NULL
                             WHERE dest_id = $1 AND replaying_node = $2 AND id = ANY($3)"
                        ),
                        &[&dest, &self.node_id, &ids],
                    )
                    .await
            }
        }
        .map_err(failed)?;
        Ok(())
    }

    async fn dead_letter_records(
        &self,
        ids: &[i64],
    ) -> Result<Vec<(i64, Record)>, DestinationError> {
        let client = self.pool.get().await.map_err(failed)?;
        let rows = client
            .query(
                &format!(
                    "SELECT id, partition, seq, source_id, message_id, call_type, event, user_id,
                            anonymous_id, received_at, payload
                     FROM {}.delivery_dead_letters WHERE id = ANY($1) ORDER BY seq",
                    self.schema
                ),
                &[&ids],
            )
            .await
            .map_err(failed)?;
        let mut out = Vec::with_capacity(rows.len());
        for r in rows {
            let t: String = r.get(5);
            let Some(call_type) = CallType::parse(&t) else {
                tracing::warn!(dead_letter = r.get::<_, i64>(0), call_type = %t, "dead letter of an unknown call type; skipped");
                continue;
            };
            out.push((
                r.get(0),
                Record {
                    partition: r.get::<_, i32>(1) as u32,
                    seq: r.get::<_, i64>(2) as u64,
                    source_id: r.get(3),
                    message_id: r.get(4),
                    call_type,
                    event: r.get(6),
                    user_id: r.get(7),
                    anonymous_id: r.get(8),
                    received_at_ms: r.get(9),
                    payload: r.get(10),
                },
            ));
        }
        Ok(out)
    }
}

/// A batch's dead letters as one array per column (written with `unnest`).
#[derive(Default)]
struct DeadColumns {
    partition: Vec<i32>,
    seq: Vec<i64>,
    source_id: Vec<String>,
    message_id: Vec<String>,
    call_type: Vec<&'static str>,
    event: Vec<Option<String>>,
    user_id: Vec<Option<String>>,
    anonymous_id: Vec<Option<String>>,
    received_at: Vec<i64>,
    payload: Vec<String>,
    attempts: Vec<i32>,
    last_status: Vec<Option<i32>>,
    last_response: Vec<Option<String>>,
    error: Vec<String>,
    first_attempt_at: Vec<i64>,
}

impl DeadColumns {
    fn of(letters: LetterChanges<'_>) -> DeadColumns {
        let mut c = DeadColumns::default();
        for d in letters.dead {
            let r = &d.record;
            c.partition.push(r.partition as i32);
            c.seq.push(r.seq as i64);
            c.source_id.push(r.source_id.clone());
            c.message_id.push(r.message_id.clone());
            c.call_type.push(r.call_type.as_str());
            c.event.push(r.event.clone());
            c.user_id.push(r.user_id.clone());
            c.anonymous_id.push(r.anonymous_id.clone());
            c.received_at.push(r.received_at_ms);
            c.payload.push(r.payload.clone());
            c.attempts.push(d.attempts as i32);
            c.last_status.push(d.last_status.map(i32::from));
            c.last_response.push(d.last_response.clone());
            c.error.push(d.error.clone());
            c.first_attempt_at.push(d.first_attempt_ms);
        }
        c
    }
}
