//! The embedded control store: `<data-dir>/control.db` (SQLite, WAL,
//! `synchronous = FULL`, so a committed identity or unmapped webhook is fsynced
//! before the request that taught it is answered). One process writes it; there are
//! no changes from elsewhere to follow.

use std::path::Path;
use std::sync::Mutex;

use chrono::{DateTime, Utc};
use rusqlite::{Connection, OptionalExtension, params};
use serde_json::Value;

use super::{ControlStore, LastEvent, Snapshot, Source, SourceType, internal};
use crate::error::ApiError;

/// `control.db`.
pub struct SqliteStore {
    conn: Mutex<Connection>,
}

const SOURCE_COLS: &str = "id, type, name, schema, write_key, enabled, settings, created_at";

fn row_to_source(r: &rusqlite::Row<'_>) -> rusqlite::Result<Source> {
    let kind: String = r.get(1)?;
    let settings: String = r.get(6)?;
    let created: String = r.get(7)?;
    Ok(Source {
        id: r.get(0)?,
        kind: SourceType::parse(&kind).unwrap_or(SourceType::Http),
        name: r.get(2)?,
        schema: r.get(3)?,
        write_key: r.get(4)?,
        enabled: r.get::<_, i64>(5)? != 0,
        settings: serde_json::from_str(&settings).unwrap_or(Value::Object(Default::default())),
        created_at: DateTime::parse_from_rfc3339(&created)
            .map(|t| t.with_timezone(&Utc))
            .unwrap_or_default(),
    })
}

/// Console sessions: the SHA-256 of the session id (hex), never the id itself.
const SESSIONS_TABLE: &str = "CREATE TABLE IF NOT EXISTS console_sessions (
    id_hash TEXT PRIMARY KEY, csrf TEXT NOT NULL, expires_at_ms INTEGER NOT NULL);
 CREATE INDEX IF NOT EXISTS console_sessions_expiry ON console_sessions (expires_at_ms);";

fn now_ms() -> i64 {
    Utc::now().timestamp_millis()
}

impl SqliteStore {
    /// Opens (or creates) the file at `path`.
    pub fn open(path: &Path) -> Result<SqliteStore, ApiError> {
        let conn = Connection::open(path).map_err(internal)?;
        conn.pragma_update(None, "journal_mode", "WAL")
            .map_err(internal)?;
        // Identities and unmapped webhooks are acknowledged only once committed.
        conn.pragma_update(None, "synchronous", "FULL")
            .map_err(internal)?;
        conn.busy_timeout(std::time::Duration::from_secs(5))
            .map_err(internal)?;
        conn.execute_batch(
            "CREATE TABLE IF NOT EXISTS sources (
                id TEXT PRIMARY KEY, type TEXT NOT NULL, name TEXT NOT NULL,
                schema TEXT NOT NULL UNIQUE, write_key TEXT NOT NULL UNIQUE,
                enabled INTEGER NOT NULL, settings TEXT NOT NULL, created_at TEXT NOT NULL,
                last_event TEXT);
             CREATE TABLE IF NOT EXISTS identities (
                email TEXT PRIMARY KEY, user_id TEXT NOT NULL, updated_at TEXT NOT NULL);
             CREATE TABLE IF NOT EXISTS unmapped_webhooks (
                id INTEGER PRIMARY KEY AUTOINCREMENT, source_id TEXT NOT NULL,
                entry TEXT NOT NULL);
             CREATE INDEX IF NOT EXISTS unmapped_webhooks_source
                ON unmapped_webhooks (source_id, id);
             CREATE TABLE IF NOT EXISTS api_sync (
                source_id TEXT PRIMARY KEY, state TEXT NOT NULL, updated_at TEXT NOT NULL);",
        )
        .map_err(internal)?;
        conn.execute_batch(SESSIONS_TABLE).map_err(internal)?;
        Ok(SqliteStore {
            conn: Mutex::new(conn),
        })
    }

    fn conn(&self) -> Result<std::sync::MutexGuard<'_, Connection>, ApiError> {
        self.conn.lock().map_err(internal)
    }
}

impl ControlStore for SqliteStore {
    fn kind(&self) -> &'static str {
        "sqlite"
    }

    fn load(&self, identities: bool) -> Result<Snapshot, ApiError> {
        let conn = self.conn()?;
        let mut st = conn
            .prepare(&format!("SELECT {SOURCE_COLS}, last_event FROM sources"))
            .map_err(internal)?;
        let rows = st
            .query_map([], |r| {
                let le: Option<String> = r.get(8)?;
                Ok((row_to_source(r)?, le))
            })
            .map_err(internal)?;
        let mut snapshot = Snapshot::default();
        for row in rows {
            let (s, le) = row.map_err(internal)?;
            let le = le.and_then(|t| serde_json::from_str::<LastEvent>(&t).ok());
            snapshot.sources.push((s, le));
        }
        if identities {
            let mut ids = Vec::new();
            let mut st = conn
                .prepare("SELECT email, user_id FROM identities")
                .map_err(internal)?;
            for row in st
                .query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?)))
                .map_err(internal)?
            {
                ids.push(row.map_err(internal)?);
            }
            snapshot.identities = Some(ids);
        }
        Ok(snapshot)
    }

    fn insert_source(&self, source: &Source) -> Result<(), ApiError> {
        self.conn()?
            .execute(
                &format!(
                    "INSERT INTO sources ({SOURCE_COLS}) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)"
                ),
                params![
                    source.id,
                    source.kind.as_str(),
                    source.name,
                    source.schema,
                    source.write_key,
                    source.enabled as i64,
                    source.settings.to_string(),
                    source.created_at.to_rfc3339()
                ],
            )
            .map_err(ApiError::from)?;
        Ok(())
    }

    fn update_source(&self, s: &Source) -> Result<(), ApiError> {
        self.conn()?
            .execute(
                "UPDATE sources SET name = ?2, write_key = ?3, enabled = ?4, settings = ?5 WHERE id = ?1",
                params![s.id, s.name, s.write_key, s.enabled as i64, s.settings.to_string()],
            )
            .map_err(ApiError::from)?;
        Ok(())
    }

    fn delete_source(&self, id: &str) -> Result<(), ApiError> {
        let conn = self.conn()?;
        conn.execute("DELETE FROM sources WHERE id = ?1", params![id])
            .map_err(ApiError::from)?;
        conn.execute(
            "DELETE FROM unmapped_webhooks WHERE source_id = ?1",
            params![id],
        )
        .map_err(ApiError::from)?;
        conn.execute("DELETE FROM api_sync WHERE source_id = ?1", params![id])
            .map_err(ApiError::from)?;
        Ok(())
    }

    fn sync_state(&self, source_id: &str) -> Result<Option<String>, ApiError> {
        self.conn()?
            .query_row(
                "SELECT state FROM api_sync WHERE source_id = ?1",
                params![source_id],
                |r| r.get(0),
            )
            .optional()
            .map_err(internal)
    }

    fn save_sync_state(&self, source_id: &str, state: &str) -> Result<(), ApiError> {
        self.conn()?
            .execute(
                "INSERT INTO api_sync (source_id, state, updated_at) VALUES (?1, ?2, ?3)
                 ON CONFLICT (source_id) DO UPDATE SET state = excluded.state,
                 updated_at = excluded.updated_at",
                params![source_id, state, Utc::now().to_rfc3339()],
            )
            .map_err(internal)?;
        Ok(())
    }

    fn write_identities(&self, ids: &[(String, String)]) -> Result<(), ApiError> {
        let mut conn = self.conn()?;
        let tx = conn.transaction().map_err(internal)?;
        let now = Utc::now().to_rfc3339();
        for (email, uid) in ids {
            tx.execute(
                "INSERT INTO identities (email, user_id, updated_at) VALUES (?1, ?2, ?3)
                 ON CONFLICT (email) DO UPDATE SET user_id = excluded.user_id, updated_at = excluded.updated_at",
                params![email, uid, now],
            )
            .map_err(internal)?;
        }
        tx.commit().map_err(internal)
    }

    fn write_last_events(&self, events: &[(String, String)]) -> Result<(), ApiError> {
        let mut conn = self.conn()?;
        let tx = conn.transaction().map_err(internal)?;
        for (id, text) in events {
            tx.execute(
                "UPDATE sources SET last_event = ?2 WHERE id = ?1",
                params![id, text],
            )
            .map_err(internal)?;
        }
        tx.commit().map_err(internal)
    }

    fn record_unmapped(&self, source_id: &str, entry: &Value, keep: usize) -> Result<(), ApiError> {
        let mut conn = self.conn()?;
        let tx = conn.transaction().map_err(internal)?;
        tx.execute(
            "INSERT INTO unmapped_webhooks (source_id, entry) VALUES (?1, ?2)",
            params![source_id, entry.to_string()],
        )
        .map_err(internal)?;
        tx.execute(
            "DELETE FROM unmapped_webhooks WHERE source_id = ?1 AND id <= (
                SELECT id FROM unmapped_webhooks WHERE source_id = ?1
                ORDER BY id DESC LIMIT 1 OFFSET ?2)",
            params![source_id, keep as i64],
        )
        .map_err(internal)?;
        tx.commit().map_err(internal)
    }

    fn unmapped(&self, source_id: &str, limit: usize) -> Result<Vec<Value>, ApiError> {
        let conn = self.conn()?;
        let mut st = conn
            .prepare_cached(
                "SELECT entry FROM unmapped_webhooks WHERE source_id = ?1 ORDER BY id DESC LIMIT ?2",
            )
            .map_err(internal)?;
        let rows = st
            .query_map(params![source_id, limit as i64], |r| r.get::<_, String>(0))
            .map_err(internal)?;
        let mut out = Vec::new();
        for row in rows {
            if let Ok(v) = serde_json::from_str(&row.map_err(internal)?) {
                out.push(v);
            }
        }
        Ok(out)
    }

    fn create_session(
        &self,
        hash: &str,
        csrf: &str,
        ttl: std::time::Duration,
    ) -> Result<(), ApiError> {
        let mut conn = self.conn()?;
        let tx = conn.transaction().map_err(internal)?;
        let now = now_ms();
        tx.execute(
            "DELETE FROM console_sessions WHERE expires_at_ms <= ?1",
            params![now],
        )
        .map_err(internal)?;
        tx.execute(
            "INSERT INTO console_sessions (id_hash, csrf, expires_at_ms) VALUES (?1, ?2, ?3)",
            params![hash, csrf, now.saturating_add(ttl.as_millis() as i64)],
        )
        .map_err(internal)?;
        tx.commit().map_err(internal)
    }

    fn session(&self, hash: &str) -> Result<Option<String>, ApiError> {
        self.conn()?
            .prepare_cached(
                "SELECT csrf FROM console_sessions WHERE id_hash = ?1 AND expires_at_ms > ?2",
            )
            .map_err(internal)?
            .query_row(params![hash, now_ms()], |r| r.get(0))
            .optional()
            .map_err(internal)
    }

    fn delete_session(&self, hash: &str) -> Result<(), ApiError> {
        self.conn()?
            .execute(
                "DELETE FROM console_sessions WHERE id_hash = ?1",
                params![hash],
            )
            .map_err(internal)?;
        Ok(())
    }

    fn exists(&self, id: &str) -> Result<bool, ApiError> {
        Ok(self
            .conn()?
            .query_row("SELECT 1 FROM sources WHERE id = ?1", params![id], |_| {
                Ok(())
            })
            .optional()
            .map_err(ApiError::from)?
            .is_some())
    }
}
