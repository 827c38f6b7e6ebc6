//! Reads: a small pool of read-only connections beside the writer (WAL lets them
//! run while it commits). Every query walks an index.

use std::sync::atomic::Ordering;

use rusqlite::{Connection, OptionalExtension, params};

use super::{SqliteLog, unavailable};
use crate::{LogError, Record};

fn row_to_record(row: &rusqlite::Row<'_>) -> rusqlite::Result<Record> {
    Ok(Record {
        seq: row.get::<_, i64>(0)? as u64,
        source_id: row.get(1)?,
        message_id: row.get(2)?,
        call_type: row.get(3)?,
        event: row.get(4)?,
        received_at_ms: row.get(5)?,
        payload: row.get(6)?,
    })
}

const COLUMNS: &str = "seq, source_id, message_id, call_type, event, received_at, payload";

impl SqliteLog {
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
        self.with_reader(move |c| {
            let mut st = c.prepare_cached(&format!(
                "SELECT {COLUMNS} FROM events WHERE seq > ?1 ORDER BY seq LIMIT ?2"
            ))?;
            st.query_map(params![after as i64, limit as i64], row_to_record)?
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
        self.with_reader(move |c| {
            // `events_source` walks this source's records newest first.
            let mut st = c.prepare_cached(&format!(
                "SELECT {COLUMNS} FROM events WHERE source_id = ?1 ORDER BY seq DESC LIMIT ?2"
            ))?;
            st.query_map(params![source_id, limit as i64], row_to_record)?
                .collect()
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
        self.with_reader(move |c| {
            let mut st = c.prepare_cached(&format!(
                "SELECT {COLUMNS} FROM events WHERE seq > ?1 AND received_at >= ?2 AND received_at < ?3
                 ORDER BY seq LIMIT ?4"
            ))?;
            st.query_map(
                params![after as i64, from_ms, to_ms, limit as i64],
                row_to_record,
            )?
            .collect()
        })
        .await
    }

    pub(super) async fn read_seqs(&self, seqs: &[u64]) -> Result<Vec<Record>, LogError> {
        let seqs = seqs.to_vec();
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
}
