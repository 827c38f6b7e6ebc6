//! The embedded event log: one SQLite database in WAL mode, written by one thread
//! with group commit.
//!
//! Appends from every request go through a bounded channel to a single writer
//! thread. The writer takes everything that is waiting (up to a cap), inserts it in
//! one transaction and commits it to the WAL; a syncer thread then fsyncs the WAL
//! (one fsync covers every group committed before it started, and two can be in
//! flight while the writer commits the next group, see [`sync`]); only then is each
//! caller answered and the head — all that readers see — advanced. A full channel means
//! the disk cannot keep up: callers wait a bounded time, then get
//! [`LogError::Saturated`] (429) — memory stays bounded.
//!
//! What keeps the writer fast is that it only ever appends: records go to the end
//! of the table in `seq` order and both indexes grow at their right edge.
//! - Dedupe does not use a unique index on random message ids (every insert would
//!   touch a random page, a cost that grows with the log); the writer keeps an
//!   in-memory index of 64-bit keys instead, see [`crate::dedupe`]. A repeated
//!   message is acknowledged ([`AppendStatus::Duplicate`]) without a second row for
//!   as long as the first is retained (the retention window, default 7 days, is the
//!   dedupe window).
//! - Sequence numbers are assigned by the writer; their high-water mark is stored
//!   by every retention delete (at open the last seq is the larger of it and the
//!   highest retained seq), so they are never reused, even after retention deletes
//!   the newest rows.
//! - The WAL is checkpointed by a thread of its own (`PASSIVE`, so it never blocks
//!   the writer), not inline in a commit.
//!
//! Reads use a small pool of read-only connections; WAL lets them run beside the
//! writer.

mod checkpoint;
mod open;
mod read;
mod sync;
#[cfg(test)]
mod tests;
mod writer;

use std::sync::atomic::{AtomicI64, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use rusqlite::Connection;
use tokio::sync::{mpsc, oneshot, watch};

pub use crate::config::LogConfig;
use crate::{
    AppendStatus, ConsumerState, EventLog, LogError, LogStats, NewRecord, Position, Record,
};
use checkpoint::Checkpointer;
use open::{open_reader, open_writer};
use writer::{ConsumerChange, Request, Retention, writer_loop};

/// The embedded log's settings: the `[log]` section ([`LogConfig`]), of which it reads
/// the SQLite fields.
pub type SqliteLogConfig = LogConfig;

/// The embedded, SQLite-backed [`EventLog`].
pub struct SqliteLog {
    tx: Mutex<Option<mpsc::Sender<Request>>>,
    readers: Arc<Vec<Mutex<Connection>>>,
    next_reader: AtomicUsize,
    head: watch::Receiver<u64>,
    writer: Mutex<Option<std::thread::JoinHandle<()>>>,
    checkpointer: Mutex<Option<Checkpointer>>,
    config: SqliteLogConfig,
    log_id: String,
    dropped: Arc<AtomicU64>,
}

fn unavailable(e: impl std::fmt::Display) -> LogError {
    LogError::Unavailable(e.to_string())
}

impl SqliteLog {
    /// Opens (or creates) the log and starts its writer and checkpointer threads.
    pub async fn open(config: SqliteLogConfig) -> Result<SqliteLog, LogError> {
        if let Some(dir) = config.path.parent()
            && !dir.as_os_str().is_empty()
        {
            std::fs::create_dir_all(dir).map_err(unavailable)?;
        }
        let path = config.path.clone();
        let cfg = config.clone();
        let (writer_conn, state, readers) = tokio::task::spawn_blocking(move || {
            let (writer, state) = open_writer(&path)?;
            let mut readers = Vec::new();
            for _ in 0..cfg.readers.max(1) {
                readers.push(Mutex::new(open_reader(&path)?));
            }
            Ok::<_, rusqlite::Error>((writer, state, readers))
        })
        .await
        .map_err(unavailable)?
        .map_err(unavailable)?;

        let wal_frames = Arc::new(AtomicI64::new(0));
        let checkpointer =
            Checkpointer::start(&config.path, config.checkpoint_interval, wal_frames.clone())?;
        let (tx, rx) = mpsc::channel(config.queue_capacity.max(1));
        let (head_tx, head_rx) = watch::channel(state.last_seq);
        let max_group = config.max_group_records.max(1);
        let dropped = Arc::new(AtomicU64::new(0));
        let retention = Retention {
            age: config.retention,
            interval: config.prune_interval,
            max_bytes: config.max_bytes,
            dropped: dropped.clone(),
        };
        let log_id = state.log_id.clone();
        // Wakes the writer for retention while no appends arrive; holds only a weak
        // sender, so it never keeps the log open.
        let ticker = tx.downgrade();
        let every = config.prune_interval.max(Duration::from_millis(100));
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            tick.tick().await;
            loop {
                tick.tick().await;
                let Some(tx) = ticker.upgrade() else { break };
                let _ = tx.try_send(Request::Tick);
            }
        });
        // The WAL exists from the writer's first transaction on and keeps its inode
        // while any connection is open (a restart or truncation rewrites it in place).
        let mut wal_path = config.path.clone().into_os_string();
        wal_path.push("-wal");
        let wal = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&wal_path)
            .map_err(unavailable)?;
        let syncers = sync::Syncers::start(wal, head_tx).map_err(unavailable)?;
        let writer = std::thread::Builder::new()
            .name("eventlog-writer".into())
            .spawn(move || {
                writer_loop(
                    writer_conn,
                    state,
                    rx,
                    syncers,
                    (max_group, wal_frames),
                    retention,
                )
            })
            .map_err(unavailable)?;
        Ok(SqliteLog {
            tx: Mutex::new(Some(tx)),
            readers: Arc::new(readers),
            next_reader: AtomicUsize::new(0),
            head: head_rx,
            writer: Mutex::new(Some(writer)),
            checkpointer: Mutex::new(Some(checkpointer)),
            config,
            log_id,
            dropped,
        })
    }

    fn sender(&self) -> Result<mpsc::Sender<Request>, LogError> {
        self.tx
            .lock()
            .map_err(|_| LogError::Closed)?
            .clone()
            .ok_or(LogError::Closed)
    }

    async fn send(&self, req: Request) -> Result<(), LogError> {
        let tx = self.sender()?;
        match tx.try_send(req) {
            Ok(()) => Ok(()),
            Err(mpsc::error::TrySendError::Closed(_)) => Err(LogError::Closed),
            Err(mpsc::error::TrySendError::Full(req)) => {
                match tokio::time::timeout(self.config.enqueue_timeout, tx.send(req)).await {
                    Ok(Ok(())) => Ok(()),
                    Ok(Err(_)) => Err(LogError::Closed),
                    Err(_) => Err(LogError::Saturated),
                }
            }
        }
    }

    async fn change(&self, change: ConsumerChange) -> Result<(), LogError> {
        let (reply, rx) = oneshot::channel();
        self.send(Request::Consumer { change, reply }).await?;
        rx.await.map_err(|_| LogError::Closed)?
    }

    /// Refuses a position of another log or partition.
    fn check(&self, position: &Position) -> Result<(), LogError> {
        if position.log_id == self.log_id && position.partition == 0 {
            Ok(())
        } else {
            Err(LogError::ForeignPosition(position.to_string()))
        }
    }
}

#[async_trait]
impl EventLog for SqliteLog {
    async fn append(&self, batch: Vec<NewRecord>) -> Result<Vec<AppendStatus>, LogError> {
        if batch.is_empty() {
            return Ok(Vec::new());
        }
        let (reply, rx) = oneshot::channel();
        self.send(Request::Append { batch, reply }).await?;
        rx.await.map_err(|_| LogError::Closed)?
    }

    fn log_id(&self) -> &str {
        &self.log_id
    }

    async fn read(&self, after: &Position, limit: usize) -> Result<Vec<Record>, LogError> {
        self.check(after)?;
        self.read_after(after.seq, limit).await
    }

    async fn first_retained(&self, partition: u32) -> Result<u64, LogError> {
        if partition != 0 {
            return Err(LogError::ForeignPosition(format!("partition {partition}")));
        }
        let head = *self.head.borrow();
        let min = self.read_first_seq().await?;
        Ok(min.unwrap_or(head + 1))
    }

    async fn latest(&self, source_id: &str, limit: usize) -> Result<Vec<Record>, LogError> {
        self.read_latest(source_id, limit).await
    }

    async fn find_at(
        &self,
        source_id: &str,
        message_id: &str,
        received_at_ms: i64,
    ) -> Result<Option<Record>, LogError> {
        self.read_at(source_id, message_id, received_at_ms).await
    }

    async fn read_range(
        &self,
        from_ms: i64,
        to_ms: i64,
        after: u64,
        limit: usize,
    ) -> Result<Vec<Record>, LogError> {
        self.read_time_range(from_ms, to_ms, after, limit).await
    }

    async fn get(&self, seqs: &[u64]) -> Result<Vec<Record>, LogError> {
        self.read_seqs(seqs).await
    }

    async fn cursor(&self, consumer: &str, partition: u32) -> Result<Position, LogError> {
        let start = self.start(partition);
        self.check(&start)?;
        let seq = self.read_cursor(consumer).await?;
        Ok(start.at(seq))
    }

    async fn commit(&self, consumer: &str, position: &Position) -> Result<(), LogError> {
        self.check(position)?;
        self.change(ConsumerChange::Commit {
            consumer: consumer.to_string(),
            seq: position.seq,
        })
        .await
    }

    async fn unpin(&self, consumer: &str) -> Result<(), LogError> {
        self.change(ConsumerChange::Unpin(consumer.to_string()))
            .await
    }

    async fn remove_consumer(&self, consumer: &str) -> Result<(), LogError> {
        self.change(ConsumerChange::Remove(consumer.to_string()))
            .await
    }

    async fn consumers(&self) -> Result<Vec<ConsumerState>, LogError> {
        self.read_consumers().await
    }

    fn subscribe(&self) -> watch::Receiver<u64> {
        self.head.clone()
    }

    async fn stats(&self) -> Result<LogStats, LogError> {
        let head = *self.head.borrow();
        let path = self.config.path.clone();
        // Two separate MIN/MAX sub-queries are index lookups; a single
        // `SELECT MIN(seq), MAX(seq)` scans the whole table.
        let (min, max): (i64, i64) = self
            .with_reader(|c| {
                c.query_row(
                    "SELECT COALESCE((SELECT MIN(seq) FROM events), 0), COALESCE((SELECT MAX(seq) FROM events), 0)",
                    [],
                    |r| Ok((r.get(0)?, r.get(1)?)),
                )
            })
            .await?;
        let mut bytes = 0u64;
        for suffix in ["", "-wal"] {
            let mut p = path.clone().into_os_string();
            p.push(suffix);
            bytes += std::fs::metadata(&p).map(|m| m.len()).unwrap_or(0);
        }
        // Sequence numbers are dense except where retention deleted a prefix, so
        // max - min + 1 counts the retained records without a table scan.
        let records = if max == 0 { 0 } else { (max - min + 1) as u64 };
        Ok(LogStats {
            head,
            records,
            bytes,
            unconsumed_dropped: self.dropped.load(Ordering::Relaxed),
        })
    }

    async fn close(&self) {
        let checkpointer = self.checkpointer.lock().ok().and_then(|mut g| g.take());
        if let Some(c) = checkpointer {
            let _ = tokio::task::spawn_blocking(move || c.stop()).await;
        }
        let tx = self.tx.lock().ok().and_then(|mut g| g.take());
        drop(tx);
        let handle = self.writer.lock().ok().and_then(|mut g| g.take());
        if let Some(h) = handle {
            let _ = tokio::task::spawn_blocking(move || h.join()).await;
        }
    }
}
