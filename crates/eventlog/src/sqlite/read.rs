//! Reads: a small pool of read-only connections beside the writer (WAL lets them
//! run while it commits). Every query walks an index.

use std::sync::atomic::Ordering;

use rusqlite::{Connection, OptionalExtension, params};

use super::{SqliteLog, unavailable};
use crate::{CallType, ConsumerState, Gap, LogError, Position, Record};

/// Reads a row of [`COLUMNS`]. A call type the log does not know (only a database
/// edited by hand could hold one) is a read error, never a guess.
fn row_to_record(row: &rusqlite::Row<'_>) -> rusqlite::Result<Record> {
    let call_type: String = row.get(3)?;
    let call_type = CallType::parse(&call_type).ok_or_else(|| {
        rusqlite::Error::FromSqlConversionFailure(
            3,
            rusqlite::types::Type::Text,
            format!("unknown call type {call_type:?}").into(),
        )
    })?;
    Ok(Record {
        partition: 0,
        seq: row.get::<_, i64>(0)? as u64,
        source_id: row.get(1)?,
        message_id: row.get(2)?,
        call_type,
        event: row.get(4)?,
        received_at_ms: row.get(5)?,
        payload: row.get(6)?,
        user_id: row.get(7)?,
        anonymous_id: row.get(8)?,
    })
}

/// The record columns. Records written before layout version 2 have neither id
/// column set (every message ingest stores has at least one of them), and read them
/// from the payload instead.
const COLUMNS: &str = "seq, source_id, message_id, call_type, event, received_at, payload,
    CASE WHEN user_id IS NULL AND anonymous_id IS NULL
         THEN CAST(json_extract(payload, '$.userId') AS TEXT) ELSE user_id END,
    CASE WHEN user_id IS NULL AND anonymous_id IS NULL
         THEN CAST(json_extract(payload, '$.anonymousId') AS TEXT) ELSE anonymous_id END";

impl SqliteLog {
    /// The highest seq whose group is fsynced. Records above it are committed but may
    /// still be lost in a crash (their callers have no answer yet), so no read returns
    /// them.
    fn durable_head(&self) -> i64 {
        *self.head.borrow() as i64
    }

    pub(super) async fn with_reader<T, F>(&self, f: F) -> Result<T, LogError>
    where
        T: Send + 'static,
        F: FnOnce(&Connection) -> rusqlite::Result<T> + Send + 'static,
    {
        let readers = self.readers.clone();
        let i = self.next_reader.fetch_add(1, Ordering::Relaxed) % readers.len();
        tokio::task::spawn_blocking(move || {
            let conn = readers[i].lock().map_err(|_| LogError::Closed)?;
            f(&conn).map_err(unavailable)
        })
        .await
        .map_err(unavailable)?
    }

    pub(super) async fn read_after(
        &self,
        after: u64,
        limit: usize,
    ) -> Result<Vec<Record>, LogError> {
        let head = self.durable_head();
        self.with_reader(move |c| {
            let mut st = c.prepare_cached(&format!(
                "SELECT {COLUMNS} FROM events WHERE seq > ?1 AND seq <= ?3 ORDER BY seq LIMIT ?2"
            ))?;
            st.query_map(params![after as i64, limit as i64, head], row_to_record)?
                .collect()
        })
        .await
    }

    pub(super) async fn read_latest(
        &self,
        source_id: &str,
        limit: usize,
    ) -> Result<Vec<Record>, LogError> {
        let source_id = source_id.to_string();
        let head = self.durable_head();
        self.with_reader(move |c| {
            // `events_source` walks this source's records newest first.
            let mut st = c.prepare_cached(&format!(
                "SELECT {COLUMNS} FROM events WHERE source_id = ?1 AND seq <= ?3
                 ORDER BY seq DESC LIMIT ?2"
            ))?;
            st.query_map(params![source_id, limit as i64, head], row_to_record)?
                .collect()
        })
        .await
    }

    /// The record of one source's `message_id` received at `received_at_ms`: a
    /// lookup in `events_received` (the planner would otherwise walk the rowid).
    pub(super) async fn read_at(
        &self,
        source_id: &str,
        message_id: &str,
        received_at_ms: i64,
    ) -> Result<Option<Record>, LogError> {
        let (source_id, message_id) = (source_id.to_string(), message_id.to_string());
        self.with_reader(move |c| {
            let mut st = c.prepare_cached(&format!(
                "SELECT {COLUMNS} FROM events INDEXED BY events_received
                 WHERE received_at = ?1 AND source_id = ?2 AND message_id = ?3 LIMIT 1"
            ))?;
            st.query_map(
                params![received_at_ms, source_id, message_id],
                row_to_record,
            )?
            .next()
            .transpose()
        })
        .await
    }

    pub(super) async fn read_time_range(
        &self,
        from_ms: i64,
        to_ms: i64,
        after: u64,
        limit: usize,
    ) -> Result<Vec<Record>, LogError> {
        let head = self.durable_head();
        self.with_reader(move |c| {
            let mut st = c.prepare_cached(&format!(
                "SELECT {COLUMNS} FROM events WHERE seq > ?1 AND seq <= ?5
                 AND received_at >= ?2 AND received_at < ?3
                 ORDER BY seq LIMIT ?4"
            ))?;
            st.query_map(
                params![after as i64, from_ms, to_ms, limit as i64, head],
                row_to_record,
            )?
            .collect()
        })
        .await
    }

    pub(super) async fn read_seqs(&self, seqs: &[u64]) -> Result<Vec<Record>, LogError> {
        let head = self.durable_head() as u64;
        let seqs: Vec<u64> = seqs.iter().copied().filter(|s| *s <= head).collect();
        self.with_reader(move |c| {
            let mut st =
                c.prepare_cached(&format!("SELECT {COLUMNS} FROM events WHERE seq = ?1"))?;
            let mut out = Vec::with_capacity(seqs.len());
            for s in seqs {
                if let Some(r) = st.query_row(params![s as i64], row_to_record).optional()? {
                    out.push(r);
                }
            }
            Ok(out)
        })
        .await
    }

    pub(super) async fn read_cursor(&self, consumer: &str) -> Result<u64, LogError> {
        let consumer = consumer.to_string();
        self.with_reader(move |c| {
            let v: Option<i64> = c
                .query_row(
                    "SELECT seq FROM consumers WHERE name = ?1",
                    params![consumer],
                    |r| r.get(0),
                )
                .optional()?;
            Ok(v.unwrap_or(0) as u64)
        })
        .await
    }

    /// The lowest retained seq, if any record is retained.
    pub(super) async fn read_first_seq(&self) -> Result<Option<u64>, LogError> {
        self.with_reader(|c| {
            c.query_row("SELECT MIN(seq) FROM events", [], |r| {
                r.get::<_, Option<i64>>(0)
            })
            .map(|v| v.map(|s| s as u64))
        })
        .await
    }

    /// The consumer registry.
    pub(super) async fn read_consumers(&self) -> Result<Vec<ConsumerState>, LogError> {
        let log_id = self.log_id.clone();
        self.with_reader(move |c| {
            let mut st = c.prepare_cached(
                "SELECT name, seq, pinned, dropped, gap_from, gap_to, gap_at
                 FROM consumers ORDER BY name",
            )?;
            st.query_map([], |r| {
                let gap = match (r.get::<_, Option<i64>>(4)?, r.get::<_, Option<i64>>(5)?) {
                    (Some(from), Some(to)) => Some(Gap {
                        partition: 0,
                        from: from as u64,
                        to: to as u64,
                    }),
                    _ => None,
                };
                Ok(ConsumerState {
                    name: r.get(0)?,
                    position: Position::new(log_id.clone(), 0, r.get::<_, i64>(1)? as u64),
                    pinned: r.get::<_, i64>(2)? != 0,
                    dropped: r.get::<_, i64>(3)? as u64,
                    gap,
                    gap_at_ms: r.get(6)?,
                })
            })?
            .collect()
        })
        .await
    }
}
