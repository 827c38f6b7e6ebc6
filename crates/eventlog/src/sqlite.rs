//! The embedded event log: one SQLite database in WAL mode, written by one thread
//! with group commit.
//!
//! Appends from every request go through a bounded channel to a single writer
//! thread. The writer takes everything that is waiting (up to a cap), inserts it in
//! one transaction and commits with `synchronous=FULL`, so one fsync of the WAL makes
//! the whole group durable; only then is each caller answered. A full channel means
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
//! - Sequence numbers are assigned by the writer and their high-water mark is
//!   stored with every group, so they are never reused, even after retention
//!   deletes the newest rows.
//! - The WAL is checkpointed by a thread of its own (`PASSIVE`, so it never blocks
//!   the writer), not inline in a commit.
//!
//! Reads use a small pool of read-only connections; WAL lets them run beside the
//! writer.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicI64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use rusqlite::{Connection, OpenFlags, OptionalExtension, params};
use tokio::sync::{mpsc, oneshot, watch};

use crate::dedupe::DedupeIndex;
use crate::{AppendStatus, EventLog, LogError, LogStats, NewRecord, Record};

/// Settings of the embedded log. Deserializes as the `[log]` section of the server's
/// configuration (durations in `tributary_model::duration` syntax); `path` is set by
/// the server from its data directory.
#[derive(Debug, Clone, serde::Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SqliteLogConfig {
    /// The database file (created if absent).
    #[serde(skip)]
    pub path: PathBuf,
    /// How long records are kept; also the dedupe window. Default 7 days.
    #[serde(with = "tributary_model::duration")]
    pub retention: Duration,
    /// Append requests that may wait for the writer before callers are told the
    /// log is saturated. Default 4096.
    pub queue_capacity: usize,
    /// How long an append may wait for room in the queue before `Saturated`.
    /// Default 2 s.
    #[serde(with = "tributary_model::duration")]
    pub enqueue_timeout: Duration,
    /// Most records one group commit takes. Default 50,000.
    pub max_group_records: usize,
    /// Read connections in the pool. Default 4.
    pub readers: usize,
    /// How often the writer deletes records older than `retention`. Default 60 s.
    #[serde(with = "tributary_model::duration")]
    pub prune_interval: Duration,
    /// How often the checkpointer copies the WAL into the database. Default 100 ms.
    #[serde(with = "tributary_model::duration")]
    pub checkpoint_interval: Duration,
}

impl Default for SqliteLogConfig {
    fn default() -> Self {
        Self {
            path: PathBuf::from("events.db"),
            retention: Duration::from_secs(7 * 24 * 3600),
            queue_capacity: 4096,
            enqueue_timeout: Duration::from_secs(2),
            max_group_records: 50_000,
            readers: 4,
            prune_interval: Duration::from_secs(60),
            checkpoint_interval: Duration::from_millis(100),
        }
    }
}

enum Request {
    Append {
        batch: Vec<NewRecord>,
        reply: oneshot::Sender<Result<Vec<AppendStatus>, LogError>>,
    },
    Commit {
        consumer: String,
        seq: u64,
        reply: oneshot::Sender<Result<(), LogError>>,
    },
}

/// The embedded, SQLite-backed [`EventLog`].
pub struct SqliteLog {
    tx: Mutex<Option<mpsc::Sender<Request>>>,
    readers: Arc<Vec<Mutex<Connection>>>,
    next_reader: AtomicUsize,
    head: watch::Receiver<u64>,
    writer: Mutex<Option<std::thread::JoinHandle<()>>>,
    checkpointer: Mutex<Option<Checkpointer>>,
    config: SqliteLogConfig,
}

/// Layout version in `PRAGMA user_version`. Version 0 had `AUTOINCREMENT` and a
/// unique `(source_id, message_id)` index; [`migrate_v0`] rebuilds it.
const LAYOUT_VERSION: i64 = 1;

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS events (
    seq INTEGER PRIMARY KEY,
    source_id TEXT NOT NULL,
    message_id TEXT NOT NULL,
    call_type TEXT NOT NULL,
    event TEXT,
    received_at INTEGER NOT NULL,
    payload TEXT NOT NULL,
    dkey INTEGER NOT NULL
);
-- Retention and time ranges; with dkey it also covers the dedupe rebuild at start.
CREATE INDEX IF NOT EXISTS events_received ON events (received_at, dkey);
-- The debugger's newest-first view of one source.
CREATE INDEX IF NOT EXISTS events_source ON events (source_id, seq);
CREATE TABLE IF NOT EXISTS consumers (
    name TEXT PRIMARY KEY,
    seq INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS meta (
    key TEXT PRIMARY KEY,
    value NOT NULL
);
";

fn unavailable(e: impl std::fmt::Display) -> LogError {
    LogError::Unavailable(e.to_string())
}

/// The writer's state as read at open.
struct WriterState {
    dedupe: DedupeIndex,
    /// The highest seq ever assigned.
    last_seq: u64,
}

fn open_writer(path: &Path) -> rusqlite::Result<(Connection, WriterState)> {
    let mut conn = Connection::open(path)?;
    conn.busy_timeout(Duration::from_secs(5))?;
    conn.pragma_update(None, "journal_mode", "WAL")?;
    // FULL: every commit fsyncs the WAL, so a committed group survives power loss.
    conn.pragma_update(None, "synchronous", "FULL")?;
    // The checkpointer thread does this, never a commit.
    conn.pragma_update(None, "wal_autocheckpoint", 0)?;
    // A group must fit in the page cache (16 MiB: ~15,000 records): with SQLite's
    // default 2 MiB the writer spilled pages to the WAL mid-transaction and read
    // index pages back from disk, which cost more than the inserts themselves.
    conn.pragma_update(None, "cache_size", -16 * 1024)?;
    // After a checkpoint lets the WAL restart, keep at most this much of its file.
    conn.pragma_update(None, "journal_size_limit", 64 * 1024 * 1024)?;
    let version: i64 = conn.pragma_query_value(None, "user_version", |r| r.get(0))?;
    let old_events = conn
        .query_row(
            "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'events'",
            [],
            |_| Ok(()),
        )
        .optional()?
        .is_some();
    let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
    if old_events && version < 1 {
        // The old indexes would keep their names on the renamed table.
        tx.execute_batch(
            "DROP INDEX IF EXISTS events_dedupe;
             DROP INDEX IF EXISTS events_received;
             ALTER TABLE events RENAME TO events_v0;",
        )?;
    }
    tx.execute_batch(SCHEMA)?;
    tx.execute(
        "INSERT INTO meta (key, value) VALUES ('dedupe_key', randomblob(16))
         ON CONFLICT (key) DO NOTHING",
        [],
    )?;
    let secret: Vec<u8> =
        tx.query_row("SELECT value FROM meta WHERE key = 'dedupe_key'", [], |r| {
            r.get(0)
        })?;
    let k = |i: usize| {
        secret
            .get(i..i + 8)
            .and_then(|b| b.try_into().ok())
            .map(u64::from_le_bytes)
            .unwrap_or_default()
    };
    let mut dedupe = DedupeIndex::new(k(0), k(8));
    if old_events && version < 1 {
        migrate_v0(&tx, &dedupe)?;
    }
    tx.pragma_update(None, "user_version", LAYOUT_VERSION)?;
    tx.commit()?;

    let stored: Option<i64> = conn
        .query_row("SELECT value FROM meta WHERE key = 'last_seq'", [], |r| {
            r.get(0)
        })
        .optional()?;
    let max: i64 = conn.query_row("SELECT COALESCE(MAX(seq), 0) FROM events", [], |r| r.get(0))?;
    let last_seq = stored.unwrap_or(0).max(max) as u64;

    let count: i64 = conn.query_row("SELECT COUNT(*) FROM events", [], |r| r.get(0))?;
    dedupe.reserve(count as usize);
    {
        let mut keys = conn.prepare("SELECT seq, dkey FROM events INDEXED BY events_received")?;
        let mut rows = keys.query([])?;
        while let Some(row) = rows.next()? {
            dedupe.insert(row.get::<_, i64>(1)? as u64, row.get::<_, i64>(0)? as u64);
        }
    }
    Ok((conn, WriterState { dedupe, last_seq }))
}

/// Moves a version-0 log (renamed to `events_v0`) into the current layout, keeping
/// every record and its seq, and the seq high-water mark of `AUTOINCREMENT`.
fn migrate_v0(tx: &rusqlite::Transaction<'_>, dedupe: &DedupeIndex) -> rusqlite::Result<()> {
    {
        let mut read = tx.prepare(
            "SELECT seq, source_id, message_id, call_type, event, received_at, payload
             FROM events_v0 ORDER BY seq",
        )?;
        let mut write = tx.prepare(
            "INSERT INTO events (seq, source_id, message_id, call_type, event, received_at, payload, dkey)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
        )?;
        let mut rows = read.query([])?;
        while let Some(r) = rows.next()? {
            let source_id: String = r.get(1)?;
            let message_id: String = r.get(2)?;
            let key = dedupe.key(&source_id, &message_id) as i64;
            write.execute(params![
                r.get::<_, i64>(0)?,
                source_id,
                message_id,
                r.get::<_, String>(3)?,
                r.get::<_, Option<String>>(4)?,
                r.get::<_, i64>(5)?,
                r.get::<_, String>(6)?,
                key
            ])?;
        }
    }
    let high: Option<i64> = tx
        .query_row(
            "SELECT seq FROM sqlite_sequence WHERE name = 'events_v0'",
            [],
            |r| r.get(0),
        )
        .optional()?;
    if let Some(high) = high {
        tx.execute(
            "INSERT INTO meta (key, value) VALUES ('last_seq', ?1)
             ON CONFLICT (key) DO UPDATE SET value = MAX(value, excluded.value)",
            params![high],
        )?;
    }
    tx.execute_batch("DROP TABLE events_v0;")?;
    tracing::info!("event log migrated to layout version {LAYOUT_VERSION}");
    Ok(())
}

fn open_reader(path: &PathBuf) -> rusqlite::Result<Connection> {
    let conn = Connection::open_with_flags(
        path,
        OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )?;
    conn.busy_timeout(Duration::from_secs(5))?;
    Ok(conn)
}

/// The thread that checkpoints the WAL beside the writer.
struct Checkpointer {
    stop: std::sync::mpsc::Sender<()>,
    handle: std::thread::JoinHandle<()>,
}

/// WAL frames (pages) beyond which the WAL should start over from its beginning:
/// 64 MiB at 4 KiB pages. Under continuous writes a checkpoint on another thread
/// never catches up with the newest frame, and SQLite restarts the WAL only when a
/// write transaction begins with every frame copied; so past this size the writer
/// runs one `PASSIVE` checkpoint itself between two groups (cheap: the checkpointer
/// has copied all but the last group). Past four times this size the checkpointer
/// waits for readers (`RESTART`).
const WAL_RESTART_FRAMES: i64 = 16 * 1024;

impl Checkpointer {
    /// Starts the thread; it publishes the WAL's size in frames to `wal_frames`.
    fn start(
        path: &Path,
        interval: Duration,
        wal_frames: Arc<AtomicI64>,
    ) -> Result<Checkpointer, LogError> {
        let conn = Connection::open(path).map_err(unavailable)?;
        conn.busy_timeout(Duration::from_secs(5))
            .map_err(unavailable)?;
        conn.pragma_update(None, "synchronous", "FULL")
            .map_err(unavailable)?;
        let (stop, stopped) = std::sync::mpsc::channel::<()>();
        let handle = std::thread::Builder::new()
            .name("eventlog-checkpoint".into())
            .spawn(move || {
                // Runs until told to stop or the log is dropped.
                while let Err(std::sync::mpsc::RecvTimeoutError::Timeout) =
                    stopped.recv_timeout(interval)
                {
                    let started = Instant::now();
                    let checkpoint = |mode: &str| {
                        conn.query_row(&format!("PRAGMA wal_checkpoint({mode})"), [], |r| {
                            r.get::<_, i64>(1)
                        })
                    };
                    let result = checkpoint("PASSIVE").and_then(|frames| {
                        if frames >= 4 * WAL_RESTART_FRAMES {
                            checkpoint("RESTART")?;
                        }
                        Ok(frames)
                    });
                    match result {
                        Ok(frames) => {
                            wal_frames.store(frames, Ordering::Relaxed);
                            if frames > 0 {
                                metrics::histogram!("tributary_log_checkpoint_seconds")
                                    .record(started.elapsed().as_secs_f64());
                            }
                        }
                        Err(e) => tracing::warn!(error = %e, "event log checkpoint failed"),
                    }
                }
            })
            .map_err(unavailable)?;
        Ok(Checkpointer { stop, handle })
    }

    fn stop(self) {
        let _ = self.stop.send(());
        let _ = self.handle.join();
    }
}

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
        let retention = (config.retention, config.prune_interval);
        let writer = std::thread::Builder::new()
            .name("eventlog-writer".into())
            .spawn(move || {
                writer_loop(
                    writer_conn,
                    state,
                    rx,
                    head_tx,
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

    async fn with_reader<T, F>(&self, f: F) -> Result<T, LogError>
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
}

fn writer_loop(
    mut conn: Connection,
    mut state: WriterState,
    mut rx: mpsc::Receiver<Request>,
    head: watch::Sender<u64>,
    (max_group, wal_frames): (usize, Arc<AtomicI64>),
    (retention, prune_interval): (Duration, Duration),
) {
    let mut last_prune = Instant::now();
    let mut pending: Vec<Request> = Vec::new();
    metrics::gauge!("tributary_log_dedupe_keys").set(state.dedupe.len() as f64);
    while let Some(first) = rx.blocking_recv() {
        pending.push(first);
        let mut records = 0usize;
        if let Some(Request::Append { batch, .. }) = pending.last() {
            records += batch.len();
        }
        while records < max_group {
            match rx.try_recv() {
                Ok(req) => {
                    if let Request::Append { batch, .. } = &req {
                        records += batch.len();
                    }
                    pending.push(req);
                }
                Err(_) => break,
            }
        }
        let started = Instant::now();
        let result = write_group(&mut conn, &mut state, &pending);
        metrics::histogram!("tributary_log_group_commit_seconds")
            .record(started.elapsed().as_secs_f64());
        metrics::histogram!("tributary_log_group_commit_records").record(records as f64);
        match result {
            Ok(statuses) => {
                if state.last_seq > *head.borrow() {
                    head.send_replace(state.last_seq);
                }
                for (req, status) in pending.drain(..).zip(statuses) {
                    match req {
                        Request::Append { reply, .. } => {
                            let _ = reply.send(Ok(status));
                        }
                        Request::Commit { reply, .. } => {
                            let _ = reply.send(Ok(()));
                        }
                    }
                }
            }
            Err(e) => {
                tracing::error!(error = %e, "event log group commit failed");
                for req in pending.drain(..) {
                    match req {
                        Request::Append { reply, .. } => {
                            let _ = reply.send(Err(unavailable(&e)));
                        }
                        Request::Commit { reply, .. } => {
                            let _ = reply.send(Err(unavailable(&e)));
                        }
                    }
                }
            }
        }
        if wal_frames.load(Ordering::Relaxed) >= WAL_RESTART_FRAMES {
            wal_frames.store(0, Ordering::Relaxed);
            if let Err(e) = conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |_| Ok(())) {
                tracing::warn!(error = %e, "event log checkpoint failed");
            }
        }
        if last_prune.elapsed() >= prune_interval {
            last_prune = Instant::now();
            prune(&conn, &mut state.dedupe, retention);
        }
        metrics::gauge!("tributary_log_dedupe_keys").set(state.dedupe.len() as f64);
    }
    // Channel closed: everything sent has been answered; checkpoint the WAL.
    let _ = conn.execute_batch("PRAGMA wal_checkpoint(TRUNCATE);");
}

fn prune(conn: &Connection, dedupe: &mut DedupeIndex, retention: Duration) {
    let cutoff = chrono_now_ms() - retention.as_millis() as i64;
    // Delete in slices so the writer is never blocked for long.
    loop {
        let deleted = conn
            .prepare_cached(
                "DELETE FROM events WHERE seq IN
                   (SELECT seq FROM events WHERE received_at < ?1 ORDER BY received_at LIMIT 10000)
                 RETURNING seq, dkey",
            )
            .and_then(|mut st| {
                st.query_map(params![cutoff], |r| {
                    Ok((r.get::<_, i64>(0)? as u64, r.get::<_, i64>(1)? as u64))
                })?
                .collect::<rusqlite::Result<Vec<_>>>()
            });
        match deleted {
            // The statement committed: forget the keys only now.
            Ok(rows) if !rows.is_empty() => {
                for (seq, key) in rows {
                    dedupe.remove(key, seq);
                }
            }
            Ok(_) => break,
            Err(e) => {
                tracing::warn!(error = %e, "event log retention failed");
                break;
            }
        }
    }
}

fn chrono_now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// Writes one group in one transaction. On error nothing of it is stored and the
/// writer's state is as before.
fn write_group(
    conn: &mut Connection,
    state: &mut WriterState,
    pending: &[Request],
) -> rusqlite::Result<Vec<Vec<AppendStatus>>> {
    let before = state.last_seq;
    let mut added: Vec<(u64, u64)> = Vec::new();
    let result = write_group_tx(conn, state, pending, &mut added);
    if result.is_err() {
        state.last_seq = before;
        for (key, seq) in added {
            state.dedupe.remove(key, seq);
        }
    }
    result
}

fn write_group_tx(
    conn: &mut Connection,
    state: &mut WriterState,
    pending: &[Request],
    added: &mut Vec<(u64, u64)>,
) -> rusqlite::Result<Vec<Vec<AppendStatus>>> {
    let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
    let mut out = Vec::with_capacity(pending.len());
    {
        let mut insert = tx.prepare_cached(
            "INSERT INTO events (seq, source_id, message_id, call_type, event, received_at, payload, dkey)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
        )?;
        let mut same = tx.prepare_cached(
            "SELECT source_id = ?2 AND message_id = ?3 FROM events WHERE seq = ?1",
        )?;
        let mut commit = tx.prepare_cached(
            "INSERT INTO consumers (name, seq) VALUES (?1, ?2)
             ON CONFLICT (name) DO UPDATE SET seq = excluded.seq",
        )?;
        for req in pending {
            match req {
                Request::Append { batch, .. } => {
                    let mut statuses = Vec::with_capacity(batch.len());
                    for r in batch {
                        let key = state.dedupe.key(&r.source_id, &r.message_id);
                        let mut duplicate = false;
                        for seq in state.dedupe.candidates(key) {
                            let hit: Option<bool> = same
                                .query_row(params![seq as i64, r.source_id, r.message_id], |row| {
                                    row.get(0)
                                })
                                .optional()?;
                            if hit == Some(true) {
                                duplicate = true;
                                break;
                            }
                        }
                        if duplicate {
                            statuses.push(AppendStatus::Duplicate);
                            continue;
                        }
                        let seq = state.last_seq + 1;
                        insert.execute(params![
                            seq as i64,
                            r.source_id,
                            r.message_id,
                            r.call_type,
                            r.event,
                            r.received_at_ms,
                            r.payload,
                            key as i64
                        ])?;
                        state.last_seq = seq;
                        state.dedupe.insert(key, seq);
                        added.push((key, seq));
                        statuses.push(AppendStatus::Stored(seq));
                    }
                    out.push(statuses);
                }
                Request::Commit { consumer, seq, .. } => {
                    commit.execute(params![consumer, *seq as i64])?;
                    out.push(Vec::new());
                }
            }
        }
        if !added.is_empty() {
            // The high-water mark outlives the rows: retention may delete the
            // newest ones, and their seqs must still never come back.
            tx.execute(
                "INSERT INTO meta (key, value) VALUES ('last_seq', ?1)
                 ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                params![state.last_seq as i64],
            )?;
        }
    }
    tx.commit()?;
    Ok(out)
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

    async fn read(&self, after: u64, limit: usize) -> Result<Vec<Record>, LogError> {
        self.with_reader(move |c| {
            let mut st = c.prepare_cached(&format!(
                "SELECT {COLUMNS} FROM events WHERE seq > ?1 ORDER BY seq LIMIT ?2"
            ))?;
            st.query_map(params![after as i64, limit as i64], row_to_record)?
                .collect()
        })
        .await
    }

    async fn latest(&self, source_id: &str, limit: usize) -> Result<Vec<Record>, LogError> {
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

    async fn read_range(
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

    async fn get(&self, seqs: &[u64]) -> Result<Vec<Record>, LogError> {
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

    async fn cursor(&self, consumer: &str) -> Result<u64, LogError> {
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

    async fn commit(&self, consumer: &str, seq: u64) -> Result<(), LogError> {
        let (reply, rx) = oneshot::channel();
        self.send(Request::Commit {
            consumer: consumer.to_string(),
            seq,
            reply,
        })
        .await?;
        rx.await.map_err(|_| LogError::Closed)?
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

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(source: &str, id: &str) -> NewRecord {
        NewRecord {
            source_id: source.into(),
            message_id: id.into(),
            call_type: "track".into(),
            event: Some("Email Opened".into()),
            received_at_ms: chrono_now_ms(),
            payload: format!(r#"{{"messageId":"{id}"}}"#),
        }
    }

    async fn open(dir: &tempfile::TempDir) -> SqliteLog {
        SqliteLog::open(SqliteLogConfig {
            path: dir.path().join("events.db"),
            ..Default::default()
        })
        .await
        .unwrap()
    }

    #[tokio::test]
    async fn appends_and_reads_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let log = open(&dir).await;
        let st = log
            .append(vec![rec("s", "a"), rec("s", "b")])
            .await
            .unwrap();
        assert_eq!(st, vec![AppendStatus::Stored(1), AppendStatus::Stored(2)]);
        let rows = log.read(0, 10).await.unwrap();
        assert_eq!(rows.len(), 2);
        assert_eq!(rows[0].message_id, "a");
        assert_eq!(rows[1].seq, 2);
        assert_eq!(*log.subscribe().borrow(), 2);
    }

    #[tokio::test]
    async fn repeated_message_is_acknowledged_but_stored_once() {
        let dir = tempfile::tempdir().unwrap();
        let log = open(&dir).await;
        log.append(vec![rec("s", "a")]).await.unwrap();
        let st = log
            .append(vec![rec("s", "a"), rec("other", "a"), rec("s", "a")])
            .await
            .unwrap();
        assert_eq!(st[0], AppendStatus::Duplicate);
        assert!(matches!(st[1], AppendStatus::Stored(_)));
        assert_eq!(st[2], AppendStatus::Duplicate);
        assert_eq!(log.read(0, 10).await.unwrap().len(), 2);
    }

    #[tokio::test]
    async fn concurrent_appends_share_commits_and_all_land() {
        let dir = tempfile::tempdir().unwrap();
        let log = Arc::new(open(&dir).await);
        let mut tasks = Vec::new();
        for t in 0..32 {
            let log = log.clone();
            tasks.push(tokio::spawn(async move {
                for i in 0..20 {
                    log.append(vec![rec("s", &format!("{t}-{i}"))])
                        .await
                        .unwrap();
                }
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
        assert_eq!(log.read(0, 10_000).await.unwrap().len(), 640);
        assert_eq!(log.stats().await.unwrap().records, 640);
    }

    #[tokio::test]
    async fn cursors_survive_reopen_and_seq_is_never_reused() {
        let dir = tempfile::tempdir().unwrap();
        {
            let log = open(&dir).await;
            log.append(vec![rec("s", "a"), rec("s", "b")])
                .await
                .unwrap();
            log.commit("warehouse", 2).await.unwrap();
            log.close().await;
        }
        let log = open(&dir).await;
        assert_eq!(log.cursor("warehouse").await.unwrap(), 2);
        assert_eq!(log.cursor("nobody").await.unwrap(), 0);
        assert_eq!(*log.subscribe().borrow(), 2);
        let st = log.append(vec![rec("s", "c")]).await.unwrap();
        assert_eq!(st, vec![AppendStatus::Stored(3)]);
        assert_eq!(log.latest("s", 2).await.unwrap()[0].message_id, "c");
        assert_eq!(log.get(&[1, 3, 99]).await.unwrap().len(), 2);
    }

    #[tokio::test]
    async fn retention_deletes_old_records_and_ends_their_dedupe() {
        let dir = tempfile::tempdir().unwrap();
        let log = SqliteLog::open(SqliteLogConfig {
            path: dir.path().join("events.db"),
            retention: Duration::from_secs(3600),
            prune_interval: Duration::ZERO,
            ..Default::default()
        })
        .await
        .unwrap();
        let mut old = rec("s", "old");
        old.received_at_ms -= 2 * 3600 * 1000;
        log.append(vec![old.clone(), rec("s", "new")])
            .await
            .unwrap();
        // The next group commit prunes what is older than the retention window.
        log.append(vec![rec("s", "trigger")]).await.unwrap();
        let ids: Vec<String> = log
            .read(0, 10)
            .await
            .unwrap()
            .into_iter()
            .map(|r| r.message_id)
            .collect();
        assert_eq!(ids, vec!["new", "trigger"]);
        // Sequence numbers keep growing; the pruned message may be stored again.
        let st = log.append(vec![old]).await.unwrap();
        assert_eq!(st, vec![AppendStatus::Stored(4)]);
    }

    #[tokio::test]
    async fn dedupe_and_seq_survive_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        {
            let log = open(&dir).await;
            log.append(vec![rec("s", "a"), rec("s", "b")])
                .await
                .unwrap();
            log.close().await;
        }
        let log = open(&dir).await;
        let st = log
            .append(vec![rec("s", "b"), rec("s", "c"), rec("t", "a")])
            .await
            .unwrap();
        assert_eq!(
            st,
            vec![
                AppendStatus::Duplicate,
                AppendStatus::Stored(3),
                AppendStatus::Stored(4)
            ]
        );
    }

    #[tokio::test]
    async fn seq_is_not_reused_when_retention_deleted_the_newest_records() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = SqliteLogConfig {
            path: dir.path().join("events.db"),
            retention: Duration::from_secs(3600),
            prune_interval: Duration::ZERO,
            ..Default::default()
        };
        {
            let log = SqliteLog::open(cfg.clone()).await.unwrap();
            let mut old = rec("s", "old");
            old.received_at_ms -= 2 * 3600 * 1000;
            // Stored as seq 1, pruned right after this group commits.
            assert_eq!(
                log.append(vec![old]).await.unwrap(),
                vec![AppendStatus::Stored(1)]
            );
            log.close().await;
        }
        let log = SqliteLog::open(cfg).await.unwrap();
        assert!(log.read(0, 10).await.unwrap().is_empty());
        assert_eq!(
            log.append(vec![rec("s", "new")]).await.unwrap(),
            vec![AppendStatus::Stored(2)]
        );
    }

    #[test]
    fn colliding_keys_never_drop_a_distinct_message() {
        let dir = tempfile::tempdir().unwrap();
        let (mut conn, mut state) = open_writer(&dir.path().join("events.db")).unwrap();
        state.dedupe.all_collide = true;
        let append = |batch: Vec<NewRecord>| {
            let (reply, _rx) = oneshot::channel();
            Request::Append { batch, reply }
        };
        let out = write_group(
            &mut conn,
            &mut state,
            &[append(vec![rec("s", "a"), rec("s", "b"), rec("t", "a")])],
        )
        .unwrap();
        assert_eq!(
            out[0],
            vec![
                AppendStatus::Stored(1),
                AppendStatus::Stored(2),
                AppendStatus::Stored(3)
            ]
        );
        let out = write_group(
            &mut conn,
            &mut state,
            &[append(vec![rec("t", "a"), rec("s", "c"), rec("s", "b")])],
        )
        .unwrap();
        assert_eq!(
            out[0],
            vec![
                AppendStatus::Duplicate,
                AppendStatus::Stored(4),
                AppendStatus::Duplicate
            ]
        );
    }

    #[test]
    fn a_failed_group_leaves_no_trace() {
        let dir = tempfile::tempdir().unwrap();
        let (mut conn, mut state) = open_writer(&dir.path().join("events.db")).unwrap();
        let append = |batch: Vec<NewRecord>| {
            let (reply, _rx) = oneshot::channel();
            Request::Append { batch, reply }
        };
        conn.execute_batch(
            "CREATE TRIGGER fail BEFORE INSERT ON events WHEN NEW.message_id = 'bad'
             BEGIN SELECT RAISE(ABORT, 'refused'); END;",
        )
        .unwrap();
        assert!(
            write_group(
                &mut conn,
                &mut state,
                &[append(vec![rec("s", "a"), rec("s", "bad")])]
            )
            .is_err()
        );
        assert_eq!(state.last_seq, 0);
        assert_eq!(state.dedupe.len(), 0);
        let out = write_group(&mut conn, &mut state, &[append(vec![rec("s", "a")])]).unwrap();
        assert_eq!(out[0], vec![AppendStatus::Stored(1)]);
    }

    #[tokio::test]
    async fn a_log_of_the_first_layout_is_migrated_with_its_records_and_seqs() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("events.db");
        {
            let c = Connection::open(&path).unwrap();
            c.execute_batch(
                "PRAGMA journal_mode = WAL;
                 CREATE TABLE events (
                     seq INTEGER PRIMARY KEY AUTOINCREMENT,
                     source_id TEXT NOT NULL, message_id TEXT NOT NULL,
                     call_type TEXT NOT NULL, event TEXT,
                     received_at INTEGER NOT NULL, payload TEXT NOT NULL);
                 CREATE UNIQUE INDEX events_dedupe ON events (source_id, message_id);
                 CREATE INDEX events_received ON events (received_at);
                 CREATE TABLE consumers (name TEXT PRIMARY KEY, seq INTEGER NOT NULL);
                 INSERT INTO events (source_id, message_id, call_type, event, received_at, payload)
                   VALUES ('s', 'a', 'track', 'E', 1, '{}'), ('s', 'b', 'track', NULL, 2, '{}'),
                          ('s', 'c', 'track', NULL, 3, '{}');
                 DELETE FROM events WHERE seq = 3;
                 INSERT INTO consumers VALUES ('warehouse', 2);",
            )
            .unwrap();
        }
        let log = SqliteLog::open(SqliteLogConfig {
            path: path.clone(),
            ..Default::default()
        })
        .await
        .unwrap();
        let rows = log.read(0, 10).await.unwrap();
        assert_eq!(rows.len(), 2);
        assert_eq!((rows[0].seq, rows[0].event.as_deref()), (1, Some("E")));
        assert_eq!(log.cursor("warehouse").await.unwrap(), 2);
        assert_eq!(*log.subscribe().borrow(), 3);
        // Dedupe holds for migrated records; seq 3 (deleted before) is not reused.
        let st = log
            .append(vec![rec("s", "a"), rec("s", "c")])
            .await
            .unwrap();
        assert_eq!(st, vec![AppendStatus::Duplicate, AppendStatus::Stored(4)]);
        log.close().await;
        let c = Connection::open(&path).unwrap();
        let v: i64 = c
            .pragma_query_value(None, "user_version", |r| r.get(0))
            .unwrap();
        assert_eq!(v, LAYOUT_VERSION);
    }

    #[tokio::test]
    async fn the_checkpointer_moves_the_wal_into_the_database_while_running() {
        let dir = tempfile::tempdir().unwrap();
        let log = open(&dir).await;
        let db = dir.path().join("events.db");
        let initial = std::fs::metadata(&db).unwrap().len();
        for chunk in 0..10 {
            let batch = (0..500)
                .map(|i| {
                    let mut r = rec("s", &format!("{chunk}-{i}"));
                    r.payload = "x".repeat(1000);
                    r
                })
                .collect();
            log.append(batch).await.unwrap();
        }
        // The writer never checkpoints; only the checkpointer grows the main file.
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::fs::metadata(&db).unwrap().len() < initial + 4_000_000 {
            assert!(
                Instant::now() < deadline,
                "WAL not checkpointed: db file {} bytes",
                std::fs::metadata(&db).unwrap().len()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        log.close().await;
    }

    #[tokio::test]
    async fn append_after_close_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let log = open(&dir).await;
        log.close().await;
        assert!(matches!(
            log.append(vec![rec("s", "a")]).await,
            Err(LogError::Closed)
        ));
    }
}
