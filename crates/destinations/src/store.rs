//! The engine's own SQLite file: destination configurations, delivery statistics,
//! dead letters, and the per-batch markers that make restarts precise.
//!
//! Durability: WAL with `synchronous=NORMAL`, so a committed write survives a
//! process crash (SIGKILL) — the case the markers exist for. The markers:
//! - before a batch is sent, its live sequence numbers are recorded as *in flight*;
//! - when it ends (delivered, skipped or dead-lettered), the row becomes *done* in
//!   the same transaction that adds its counts to the statistics and writes its dead
//!   letters, so counts and dead letters are exactly-once with respect to the batch;
//! - rows at or below the destination's committed log cursor are pruned.
//!
//! After a crash, *done* events above the cursor are not sent again, and *in
//! flight* ones are sent again and counted as `redelivered` (the only duplicates
//! delivery can produce). Blocking SQLite calls run on the blocking pool, never on
//! the async workers.

use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use chrono::{DateTime, TimeZone, Utc};
use rusqlite::{Connection, OptionalExtension, params};
use tributary_eventlog::{CallType, Record};

use crate::api::DeadLetter;
use crate::error::DestinationError;
use crate::filter::Filters;

/// A stored destination definition.
#[derive(Debug, Clone, PartialEq)]
pub struct DestinationRow {
    /// Stable id (`dst_…`).
    pub id: String,
    /// Name.
    pub name: String,
    /// `DestinationConfig` as JSON.
    pub config: String,
    /// The sources it takes events from.
    pub source_ids: Vec<String>,
    /// Which events it takes.
    pub filters: Filters,
    /// Whether it delivers.
    pub enabled: bool,
    /// Creation time, ms since the Unix epoch.
    pub created_at_ms: i64,
    /// Last change, ms since the Unix epoch (also the version nodes compare).
    pub updated_at_ms: i64,
}

/// Persisted counters of one destination.
#[derive(Debug, Clone, Default)]
pub(crate) struct StoredStats {
    pub delivered: u64,
    pub redelivered: u64,
    pub skipped: u64,
    pub dead_letters: u64,
    pub last_success_ms: Option<i64>,
    pub last_error: Option<String>,
    pub last_error_ms: Option<i64>,
}

pub(crate) use crate::ledger::NewDeadLetter;

/// Everything that happened to one batch, written in one transaction.
#[derive(Debug, Default)]
pub(crate) struct BatchEnd {
    /// The marker row to mark done (None when the batch had no live events).
    pub batch_id: Option<u64>,
    pub delivered: u64,
    pub redelivered: u64,
    pub skipped: u64,
    pub success_ms: Option<i64>,
    pub error: Option<(String, i64)>,
    pub dead: Vec<NewDeadLetter>,
    /// Dead letters whose replay succeeded (deleted).
    pub replayed_ok: Vec<i64>,
}

pub(crate) use crate::ledger::Recovery;

/// Handle to the engine's SQLite file.
#[derive(Clone)]
pub(crate) struct Store {
    conn: Arc<Mutex<Connection>>,
    next_batch: Arc<AtomicU64>,
}

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS destinations (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    config TEXT NOT NULL,
    source_ids TEXT NOT NULL,
    filters TEXT NOT NULL,
    enabled INTEGER NOT NULL,
    created_at INTEGER NOT NULL,
    updated_at INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS stats (
    dest_id TEXT PRIMARY KEY,
    delivered INTEGER NOT NULL DEFAULT 0,
    redelivered INTEGER NOT NULL DEFAULT 0,
    skipped INTEGER NOT NULL DEFAULT 0,
    last_success_at INTEGER,
    last_error TEXT,
    last_error_at INTEGER
);
CREATE TABLE IF NOT EXISTS dead_letters (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    dest_id TEXT NOT NULL,
    seq INTEGER NOT NULL,
    source_id TEXT NOT NULL,
    message_id TEXT NOT NULL,
    call_type TEXT NOT NULL,
    event TEXT,
    received_at INTEGER NOT NULL,
    payload TEXT NOT NULL,
    attempts INTEGER NOT NULL,
    last_status INTEGER,
    last_response TEXT,
    error TEXT NOT NULL,
    first_attempt_at INTEGER NOT NULL,
    failed_at INTEGER NOT NULL,
    replaying INTEGER NOT NULL DEFAULT 0,
    UNIQUE (dest_id, seq)
);
CREATE TABLE IF NOT EXISTS batches (
    dest_id TEXT NOT NULL,
    batch_id INTEGER NOT NULL,
    done INTEGER NOT NULL,
    max_seq INTEGER NOT NULL,
    seqs TEXT NOT NULL,
    PRIMARY KEY (dest_id, batch_id)
) WITHOUT ROWID;
";

fn now_ms() -> i64 {
    Utc::now().timestamp_millis()
}

/// Milliseconds since the epoch as a UTC time.
pub fn ms_to_time(ms: i64) -> DateTime<Utc> {
    Utc.timestamp_millis_opt(ms)
        .single()
        .unwrap_or(DateTime::<Utc>::UNIX_EPOCH)
}

impl Store {
    /// Opens (creating if needed) the store at `path`.
    pub(crate) async fn open(path: &Path) -> Result<Store, DestinationError> {
        let path = path.to_path_buf();
        let (conn, next) = tokio::task::spawn_blocking(move || -> rusqlite::Result<_> {
            if let Some(dir) = path.parent()
                && !dir.as_os_str().is_empty()
            {
                let _ = std::fs::create_dir_all(dir);
            }
            let conn = Connection::open(&path)?;
            conn.pragma_update(None, "journal_mode", "WAL")?;
            conn.pragma_update(None, "synchronous", "NORMAL")?;
            conn.busy_timeout(std::time::Duration::from_secs(5))?;
            conn.execute_batch(SCHEMA)?;
            // Replays do not survive a restart; their dead letters become eligible again.
            conn.execute(
                "UPDATE dead_letters SET replaying = 0 WHERE replaying = 1",
                [],
            )?;
            let max: i64 =
                conn.query_row("SELECT COALESCE(MAX(batch_id), 0) FROM batches", [], |r| {
                    r.get(0)
                })?;
            Ok((conn, max as u64 + 1))
        })
        .await
        .map_err(|e| DestinationError::Internal(format!("store open task: {e}")))??;
        Ok(Store {
            conn: Arc::new(Mutex::new(conn)),
            next_batch: Arc::new(AtomicU64::new(next)),
        })
    }

    async fn call<T, F>(&self, f: F) -> Result<T, DestinationError>
    where
        T: Send + 'static,
        F: FnOnce(&mut Connection) -> rusqlite::Result<T> + Send + 'static,
    {
        let conn = self.conn.clone();
        tokio::task::spawn_blocking(move || {
            let mut c = conn.lock().unwrap_or_else(|p| p.into_inner());
            f(&mut c)
        })
        .await
        .map_err(|e| DestinationError::Internal(format!("store task: {e}")))?
        .map_err(DestinationError::from)
    }

    /// A fresh batch id (unique in this file).
    pub(crate) fn next_batch_id(&self) -> u64 {
        self.next_batch.fetch_add(1, Ordering::Relaxed)
    }

    pub(crate) async fn insert_destination(
        &self,
        row: DestinationRow,
    ) -> Result<(), DestinationError> {
        self.call(move |c| {
            let tx = c.transaction()?;
            tx.execute(
                "INSERT INTO destinations (id, name, config, source_ids, filters, enabled, created_at, updated_at)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
                params![
                    row.id,
                    row.name,
                    row.config,
                    json(&row.source_ids),
                    json(&row.filters),
                    row.enabled,
                    row.created_at_ms,
                    row.updated_at_ms
                ],
            )?;
            tx.execute(
                "INSERT OR IGNORE INTO stats (dest_id) VALUES (?1)",
                params![row.id],
            )?;
            tx.commit()
        })
        .await
    }

    pub(crate) async fn update_destination(
        &self,
        row: DestinationRow,
    ) -> Result<(), DestinationError> {
        self.call(move |c| {
            c.execute(
                "UPDATE destinations SET name = ?2, config = ?3, source_ids = ?4, filters = ?5,
                 enabled = ?6, updated_at = ?7 WHERE id = ?1",
                params![
                    row.id,
                    row.name,
                    row.config,
                    json(&row.source_ids),
                    json(&row.filters),
                    row.enabled,
                    row.updated_at_ms
                ],
            )
            .map(|_| ())
        })
        .await
    }

    pub(crate) async fn delete_destination(&self, id: &str) -> Result<bool, DestinationError> {
        let id = id.to_string();
        self.call(move |c| {
            let tx = c.transaction()?;
            let n = tx.execute("DELETE FROM destinations WHERE id = ?1", params![id])?;
            for table in ["stats", "dead_letters", "batches"] {
                tx.execute(
                    &format!("DELETE FROM {table} WHERE dest_id = ?1"),
                    params![id],
                )?;
            }
            tx.commit()?;
            Ok(n > 0)
        })
        .await
    }

    /// Drops what this file keeps about a destination besides its definition
    /// (statistics, dead letters, markers).
    pub(crate) async fn forget(&self, id: &str) -> Result<(), DestinationError> {
        let id = id.to_string();
        self.call(move |c| {
            let tx = c.transaction()?;
            for table in ["destinations", "stats", "dead_letters", "batches"] {
                let col = if table == "destinations" {
                    "id"
                } else {
                    "dest_id"
                };
                tx.execute(
                    &format!("DELETE FROM {table} WHERE {col} = ?1"),
                    params![id],
                )?;
            }
            tx.commit()
        })
        .await
    }

    pub(crate) async fn destinations(&self) -> Result<Vec<DestinationRow>, DestinationError> {
        self.call(|c| {
            let mut st = c.prepare(
                "SELECT id, name, config, source_ids, filters, enabled, created_at, updated_at
                 FROM destinations ORDER BY created_at, id",
            )?;
            st.query_map([], row_to_destination)?.collect()
        })
        .await
    }

    pub(crate) async fn destination(
        &self,
        id: &str,
    ) -> Result<Option<DestinationRow>, DestinationError> {
        let id = id.to_string();
        self.call(move |c| {
            c.query_row(
                "SELECT id, name, config, source_ids, filters, enabled, created_at, updated_at
                 FROM destinations WHERE id = ?1",
                params![id],
                row_to_destination,
            )
            .optional()
        })
        .await
    }

    pub(crate) async fn stats(&self, id: &str) -> Result<StoredStats, DestinationError> {
        let id = id.to_string();
        self.call(move |c| {
            let mut s = c
                .query_row(
                    "SELECT delivered, redelivered, skipped, last_success_at, last_error, last_error_at
                     FROM stats WHERE dest_id = ?1",
                    params![id],
                    |r| {
                        Ok(StoredStats {
                            delivered: r.get::<_, i64>(0)? as u64,
                            redelivered: r.get::<_, i64>(1)? as u64,
                            skipped: r.get::<_, i64>(2)? as u64,
                            dead_letters: 0,
                            last_success_ms: r.get(3)?,
                            last_error: r.get(4)?,
                            last_error_ms: r.get(5)?,
                        })
                    },
                )
                .optional()?
                .unwrap_or_default();
            s.dead_letters = c.query_row(
                "SELECT COUNT(*) FROM dead_letters WHERE dest_id = ?1",
                params![id],
                |r| r.get::<_, i64>(0),
            )? as u64;
            Ok(s)
        })
        .await
    }

    /// Records that a batch with these live events is about to be sent.
    pub(crate) async fn batch_started(
        &self,
        dest: &str,
        batch_id: u64,
        seqs: Vec<u64>,
    ) -> Result<(), DestinationError> {
        let dest = dest.to_string();
        self.call(move |c| {
            let max = seqs.iter().copied().max().unwrap_or(0);
            c.execute(
                "INSERT OR REPLACE INTO batches (dest_id, batch_id, done, max_seq, seqs) VALUES (?1, ?2, 0, ?3, ?4)",
                params![dest, batch_id as i64, max as i64, join_seqs(&seqs)],
            )
            .map(|_| ())
        })
        .await
    }

    /// Records the end of a batch: marker done, counters, dead letters, in one
    /// transaction.
    pub(crate) async fn batch_finished(
        &self,
        dest: &str,
        end: BatchEnd,
    ) -> Result<(), DestinationError> {
        let dest = dest.to_string();
        self.call(move |c| {
            let tx = c.transaction()?;
            if let Some(b) = end.batch_id {
                tx.execute(
                    "UPDATE batches SET done = 1 WHERE dest_id = ?1 AND batch_id = ?2",
                    params![dest, b as i64],
                )?;
            }
            tx.execute("INSERT OR IGNORE INTO stats (dest_id) VALUES (?1)", params![dest])?;
            tx.execute(
                "UPDATE stats SET delivered = delivered + ?2, redelivered = redelivered + ?3,
                 skipped = skipped + ?4,
                 last_success_at = COALESCE(?5, last_success_at),
                 last_error = COALESCE(?6, last_error),
                 last_error_at = COALESCE(?7, last_error_at)
                 WHERE dest_id = ?1",
                params![
                    dest,
                    end.delivered as i64,
                    end.redelivered as i64,
                    end.skipped as i64,
                    end.success_ms,
                    end.error.as_ref().map(|e| e.0.clone()),
                    end.error.as_ref().map(|e| e.1)
                ],
            )?;
            {
                let mut ins = tx.prepare_cached(
                    "INSERT INTO dead_letters (dest_id, seq, source_id, message_id, call_type, event,
                        received_at, payload, attempts, last_status, last_response, error,
                        first_attempt_at, failed_at, replaying)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, 0)
                     ON CONFLICT (dest_id, seq) DO UPDATE SET
                        attempts = attempts + excluded.attempts,
                        last_status = excluded.last_status,
                        last_response = excluded.last_response,
                        error = excluded.error,
                        failed_at = excluded.failed_at,
                        replaying = 0",
                )?;
                let now = now_ms();
                for d in &end.dead {
                    let r = &d.record;
                    ins.execute(params![
                        dest,
                        r.seq as i64,
                        r.source_id,
                        r.message_id,
                        r.call_type.as_str(),
                        r.event,
                        r.received_at_ms,
                        r.payload,
                        d.attempts,
                        d.last_status,
                        d.last_response,
                        d.error,
                        d.first_attempt_ms,
                        now
                    ])?;
                }
                let mut del = tx.prepare_cached("DELETE FROM dead_letters WHERE id = ?1")?;
                for id in &end.replayed_ok {
                    del.execute(params![id])?;
                }
            }
            tx.commit()
        })
        .await
    }

    /// Forgets a batch that stopped without an outcome (shutdown). When the last
    /// attempt may have reached the receiver the marker stays, so a resend after
    /// restart is counted as a possible duplicate.
    pub(crate) async fn batch_abandoned(
        &self,
        dest: &str,
        batch_id: u64,
        maybe_delivered: bool,
    ) -> Result<(), DestinationError> {
        if maybe_delivered {
            return Ok(());
        }
        let dest = dest.to_string();
        self.call(move |c| {
            c.execute(
                "DELETE FROM batches WHERE dest_id = ?1 AND batch_id = ?2",
                params![dest, batch_id as i64],
            )
            .map(|_| ())
        })
        .await
    }

    /// Markers above `cursor`, for a restarting worker.
    pub(crate) async fn recovery(
        &self,
        dest: &str,
        cursor: u64,
    ) -> Result<Recovery, DestinationError> {
        let dest = dest.to_string();
        self.call(move |c| {
            let mut st =
                c.prepare("SELECT done, seqs FROM batches WHERE dest_id = ?1 AND max_seq > ?2")?;
            let rows: Vec<(bool, String)> = st
                .query_map(params![dest, cursor as i64], |r| Ok((r.get(0)?, r.get(1)?)))?
                .collect::<rusqlite::Result<_>>()?;
            Ok(Recovery::from_markers(
                rows.into_iter()
                    .map(|(done, seqs)| (done, split_seqs(&seqs).collect())),
                cursor,
            ))
        })
        .await
    }

    /// Drops markers wholly at or below the committed cursor.
    pub(crate) async fn prune_batches(
        &self,
        dest: &str,
        cursor: u64,
    ) -> Result<(), DestinationError> {
        let dest = dest.to_string();
        self.call(move |c| {
            c.execute(
                "DELETE FROM batches WHERE dest_id = ?1 AND max_seq <= ?2",
                params![dest, cursor as i64],
            )
            .map(|_| ())
        })
        .await
    }

    pub(crate) async fn dead_letters(
        &self,
        dest: &str,
        limit: usize,
    ) -> Result<Vec<DeadLetter>, DestinationError> {
        let dest = dest.to_string();
        self.call(move |c| {
            let mut st = c.prepare(
                "SELECT id, seq, message_id, payload, attempts, last_status, last_response, error,
                        first_attempt_at, failed_at, replaying
                 FROM dead_letters WHERE dest_id = ?1 ORDER BY seq LIMIT ?2",
            )?;
            st.query_map(params![dest, limit as i64], |r| {
                let payload: String = r.get(3)?;
                Ok(DeadLetter {
                    id: r.get(0)?,
                    seq: r.get::<_, i64>(1)? as u64,
                    message_id: r.get(2)?,
                    event: serde_json::from_str(&payload)
                        .unwrap_or(serde_json::Value::String(payload)),
                    attempts: r.get(4)?,
                    last_status: r.get(5)?,
                    last_response: r.get(6)?,
                    error: r.get(7)?,
                    first_attempt_at: ms_to_time(r.get(8)?),
                    failed_at: ms_to_time(r.get(9)?),
                    replaying: r.get(10)?,
                })
            })?
            .collect()
        })
        .await
    }

    /// Marks every idle dead letter of `dest` as replaying; their ids, by seq.
    pub(crate) async fn start_replay(&self, dest: &str) -> Result<Vec<i64>, DestinationError> {
        let dest = dest.to_string();
        self.call(move |c| {
            let tx = c.transaction()?;
            let ids: Vec<i64> = {
                let mut st = tx.prepare(
                    "SELECT id FROM dead_letters WHERE dest_id = ?1 AND replaying = 0 ORDER BY seq",
                )?;
                st.query_map(params![dest], |r| r.get(0))?
                    .collect::<rusqlite::Result<_>>()?
            };
            tx.execute(
                "UPDATE dead_letters SET replaying = 1 WHERE dest_id = ?1 AND replaying = 0",
                params![dest],
            )?;
            tx.commit()?;
            Ok(ids)
        })
        .await
    }

    /// Makes every dead letter of `dest` eligible for replay again (a starting
    /// worker has no queued replays, so none of them is being replayed).
    pub(crate) async fn reset_replaying(&self, dest: &str) -> Result<(), DestinationError> {
        let dest = dest.to_string();
        self.call(move |c| {
            c.execute(
                "UPDATE dead_letters SET replaying = 0 WHERE dest_id = ?1 AND replaying = 1",
                params![dest],
            )
            .map(|_| ())
        })
        .await
    }

    /// The records of these dead letters, with their ids.
    pub(crate) async fn dead_letter_records(
        &self,
        ids: Vec<i64>,
    ) -> Result<Vec<(i64, Record)>, DestinationError> {
        self.call(move |c| {
            let mut st = c.prepare_cached(
                // The routing ids are the payload's (dead letters keep the record's
                // columns that predate them).
                "SELECT id, seq, source_id, message_id, call_type, event, received_at, payload,
                        CAST(json_extract(payload, '$.userId') AS TEXT),
                        CAST(json_extract(payload, '$.anonymousId') AS TEXT)
                 FROM dead_letters WHERE id = ?1",
            )?;
            let mut out = Vec::with_capacity(ids.len());
            for id in ids {
                let row = st
                    .query_row(params![id], |r| {
                        Ok((
                            r.get::<_, i64>(0)?,
                            Record {
                                partition: 0,
                                seq: r.get::<_, i64>(1)? as u64,
                                source_id: r.get(2)?,
                                message_id: r.get(3)?,
                                call_type: {
                                    let t: String = r.get(4)?;
                                    CallType::parse(&t).ok_or_else(|| {
                                        rusqlite::Error::FromSqlConversionFailure(
                                            4,
                                            rusqlite::types::Type::Text,
                                            format!("unknown call type {t:?}").into(),
                                        )
                                    })?
                                },
                                event: r.get(5)?,
                                user_id: r.get(8)?,
                                anonymous_id: r.get(9)?,
                                received_at_ms: r.get(6)?,
                                payload: r.get(7)?,
                            },
                        ))
                    })
                    .optional()?;
                out.extend(row);
            }
            Ok(out)
        })
        .await
    }
}

fn json<T: serde::Serialize>(v: &T) -> String {
    serde_json::to_string(v).unwrap_or_else(|_| "null".into())
}

fn row_to_destination(r: &rusqlite::Row<'_>) -> rusqlite::Result<DestinationRow> {
    let sources: String = r.get(3)?;
    let filters: String = r.get(4)?;
    Ok(DestinationRow {
        id: r.get(0)?,
        name: r.get(1)?,
        config: r.get(2)?,
        source_ids: serde_json::from_str(&sources).unwrap_or_default(),
        filters: serde_json::from_str(&filters).unwrap_or_default(),
        enabled: r.get(5)?,
        created_at_ms: r.get(6)?,
        updated_at_ms: r.get(7)?,
    })
}

fn join_seqs(seqs: &[u64]) -> String {
    let mut s = String::with_capacity(seqs.len() * 8);
    for (i, q) in seqs.iter().enumerate() {
        if i > 0 {
            s.push(',');
        }
        s.push_str(&q.to_string());
    }
    s
}

fn split_seqs(s: &str) -> impl Iterator<Item = u64> + '_ {
    s.split(',').filter_map(|p| p.parse().ok())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    fn record(seq: u64) -> Arc<Record> {
        Arc::new(Record {
            partition: 0,
            seq,
            source_id: "s".into(),
            message_id: format!("m{seq}"),
            call_type: tributary_eventlog::CallType::Track,
            user_id: None,
            anonymous_id: None,
            event: Some("E".into()),
            received_at_ms: 1,
            payload: "{\"type\":\"track\"}".into(),
        })
    }

    #[tokio::test]
    async fn markers_drive_recovery() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("d.db")).await.unwrap();
        store.batch_started("d", 1, vec![3, 5]).await.unwrap();
        store.batch_started("d", 2, vec![4, 6]).await.unwrap();
        store
            .batch_finished(
                "d",
                BatchEnd {
                    batch_id: Some(2),
                    delivered: 2,
                    ..Default::default()
                },
            )
            .await
            .unwrap();
        let rec = store.recovery("d", 3).await.unwrap();
        assert_eq!(rec.maybe, HashSet::from([5]));
        assert_eq!(rec.done, HashSet::from([4, 6]));
        store.prune_batches("d", 6).await.unwrap();
        let rec = store.recovery("d", 0).await.unwrap();
        assert!(rec.maybe.is_empty() && rec.done.is_empty());
        assert_eq!(store.stats("d").await.unwrap().delivered, 2);
    }

    #[tokio::test]
    async fn dead_letters_upsert_and_replay() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("d.db")).await.unwrap();
        let dead = |attempts| NewDeadLetter {
            record: record(7),
            attempts,
            last_status: Some(400),
            last_response: Some("bad".into()),
            error: "receiver answered HTTP 400".into(),
            first_attempt_ms: 5,
        };
        for a in [1, 2] {
            store
                .batch_finished(
                    "d",
                    BatchEnd {
                        dead: vec![dead(a)],
                        ..Default::default()
                    },
                )
                .await
                .unwrap();
        }
        let list = store.dead_letters("d", 10).await.unwrap();
        assert_eq!(list.len(), 1);
        assert_eq!(list[0].attempts, 3);
        let ids = store.start_replay("d").await.unwrap();
        assert_eq!(ids, vec![list[0].id]);
        assert!(store.start_replay("d").await.unwrap().is_empty());
        let recs = store.dead_letter_records(ids.clone()).await.unwrap();
        assert_eq!(recs[0].1.seq, 7);
        store
            .batch_finished(
                "d",
                BatchEnd {
                    replayed_ok: ids,
                    delivered: 1,
                    ..Default::default()
                },
            )
            .await
            .unwrap();
        assert!(store.dead_letters("d", 10).await.unwrap().is_empty());
    }
}
