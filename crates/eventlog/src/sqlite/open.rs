//! Opening the log's database: pragmas, the layout (and its migrations), and the
//! writer's state rebuilt from what is on disk (seq high-water mark, dedupe index).

use std::path::{Path, PathBuf};
use std::time::Duration;

use rusqlite::{Connection, OpenFlags, OptionalExtension, params};

use crate::dedupe::DedupeIndex;

/// Layout version in `PRAGMA user_version`. Version 0 had `AUTOINCREMENT` and a
/// unique `(source_id, message_id)` index; [`migrate_v0`] rebuilds it. Version 1
/// had no `user_id`/`anonymous_id` columns and no consumer registry columns;
/// [`migrate_v1`] adds them (records of version 1 read their ids from the payload).
/// Every version gets a log id the first time it is opened by this code.
pub(super) const LAYOUT_VERSION: i64 = 2;

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS events (
    seq INTEGER PRIMARY KEY,
    source_id TEXT NOT NULL,
    message_id TEXT NOT NULL,
    call_type TEXT NOT NULL,
    event TEXT,
    received_at INTEGER NOT NULL,
    payload TEXT NOT NULL,
    dkey INTEGER NOT NULL,
    user_id TEXT,
    anonymous_id TEXT
);
-- Retention and time ranges; with dkey it also covers the dedupe rebuild at start.
CREATE INDEX IF NOT EXISTS events_received ON events (received_at, dkey);
-- The debugger's newest-first view of one source.
CREATE INDEX IF NOT EXISTS events_source ON events (source_id, seq);
-- The consumer registry: positions, whether they bound retention, and what the
-- size cap deleted before they read it.
CREATE TABLE IF NOT EXISTS consumers (
    name TEXT PRIMARY KEY,
    seq INTEGER NOT NULL,
    pinned INTEGER NOT NULL DEFAULT 1,
    dropped INTEGER NOT NULL DEFAULT 0,
    gap_from INTEGER,
    gap_to INTEGER,
    gap_at INTEGER
);
CREATE TABLE IF NOT EXISTS meta (
    key TEXT PRIMARY KEY,
    value NOT NULL
);
";
/// The writer's state as read at open.
pub(super) struct WriterState {
    /// The log's id.
    pub(super) log_id: String,
    pub(super) dedupe: DedupeIndex,
    /// The highest seq ever assigned.
    pub(super) last_seq: u64,
}

pub(super) fn open_writer(path: &Path) -> rusqlite::Result<(Connection, WriterState)> {
    let mut conn = Connection::open(path)?;
    conn.busy_timeout(Duration::from_secs(5))?;
    conn.pragma_update(None, "journal_mode", "WAL")?;
    // NORMAL: a commit writes the WAL without an fsync; the syncers fsync it before
    // any caller is answered (see `sync`), so a group is still durable before its 200,
    // and the writer commits the next group meanwhile. (Checkpoints and a WAL restart
    // still sync as SQLite does.)
    conn.pragma_update(None, "synchronous", "NORMAL")?;
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
    if version < 2 {
        migrate_v1(&tx)?;
    }
    tx.execute(
        "INSERT INTO meta (key, value) VALUES ('dedupe_key', randomblob(16))
         ON CONFLICT (key) DO NOTHING",
        [],
    )?;
    // The log's identity, fixed once: positions kept by consumers name it.
    tx.execute(
        "INSERT INTO meta (key, value) VALUES ('log_id', lower(hex(randomblob(16))))
         ON CONFLICT (key) DO NOTHING",
        [],
    )?;
    let log_id: String = tx.query_row("SELECT value FROM meta WHERE key = 'log_id'", [], |r| {
        r.get(0)
    })?;
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
    Ok((
        conn,
        WriterState {
            log_id,
            dedupe,
            last_seq,
        },
    ))
}

/// Adds what version 2 has to an older log: the routing ids of a record and the
/// registry columns of a consumer (existing consumers are pinned). Idempotent: a
/// column already there is left alone.
fn migrate_v1(tx: &rusqlite::Transaction<'_>) -> rusqlite::Result<()> {
    for (table, column, decl) in [
        ("events", "user_id", "TEXT"),
        ("events", "anonymous_id", "TEXT"),
        ("consumers", "pinned", "INTEGER NOT NULL DEFAULT 1"),
        ("consumers", "dropped", "INTEGER NOT NULL DEFAULT 0"),
        ("consumers", "gap_from", "INTEGER"),
        ("consumers", "gap_to", "INTEGER"),
        ("consumers", "gap_at", "INTEGER"),
    ] {
        let present = tx
            .prepare(&format!(
                "SELECT 1 FROM pragma_table_info('{table}') WHERE name = ?1"
            ))?
            .exists([column])?;
        if !present {
            tx.execute_batch(&format!("ALTER TABLE {table} ADD COLUMN {column} {decl};"))?;
        }
    }
    tracing::info!("event log migrated to layout version {LAYOUT_VERSION}");
    Ok(())
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

pub(super) fn open_reader(path: &PathBuf) -> rusqlite::Result<Connection> {
    let conn = Connection::open_with_flags(
        path,
        OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )?;
    conn.busy_timeout(Duration::from_secs(5))?;
    Ok(conn)
}
