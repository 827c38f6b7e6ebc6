//! Control-plane state: sources, their write keys and settings, the last event each
//! source received, and the email → userId map used to resolve ActiveCampaign
//! recipients. Kept in `<data-dir>/control.db` (SQLite, WAL) with an in-memory copy
//! for the hot path.
//!
//! Write keys are 192-bit random secrets. Ingest looks them up by their SHA-256 in
//! a hash map and then compares the stored key in constant time, so neither the
//! lookup nor the comparison leaks a key through timing. Rotating a key replaces the
//! map entry in the same critical section: the old key stops working at once.
//!
//! `last_event` changes on every event; it is updated in memory and written to the
//! database by a background flush once a second (and on shutdown). A crash can lose
//! at most that last second of *display* state; events themselves are in the event
//! log. A failed flush re-queues what it could not write.
//!
//! **Identities are durable before the 200.** The email → userId map learnt from an
//! `identify` is written to `control.db` (one transaction per request, `synchronous =
//! FULL`, so committed = fsynced) after the log append and before the answer: a
//! crash right after the 200 cannot lose it. Only new or changed pairs are written,
//! so a request repeating known identities costs no fsync. Chosen over rebuilding the
//! map from the log at start because it needs nothing from the log's read API or its
//! retention (a mapping outlives the record that taught it) and keeps start-up time
//! independent of the log's size. If the write fails the request fails (the record
//! is in the log; the client's retry is a duplicate that writes the identity again),
//! and the pairs stay queued for the background flush.
//!
//! **Unmapped ActiveCampaign webhooks** are kept in `unmapped_webhooks`, the newest
//! [`UNMAPPED_KEPT`] per source, written before the webhook's 200, so the debugger
//! shows them after a restart. They are never in the event log: no consumer has to
//! skip them.
//!
//! **API sync state** (checkpoint and status per ActiveCampaign source) is in
//! `api_sync`, written by [`Control::save_sync_state`] after each durable append of
//! a page, so a killed sync resumes after its last stored page.

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::sync::{Arc, Mutex, RwLock};

use base64::Engine as _;
use chrono::{DateTime, Utc};
use rusqlite::{Connection, OptionalExtension, params};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::error::ApiError;

/// Kinds of source.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SourceType {
    /// ActiveCampaign: webhooks and its Segment stream become Email events.
    Activecampaign,
    /// Any Segment SDK or HTTP client.
    Http,
}

impl SourceType {
    fn as_str(self) -> &'static str {
        match self {
            SourceType::Activecampaign => "activecampaign",
            SourceType::Http => "http",
        }
    }
    fn parse(s: &str) -> Option<Self> {
        match s {
            "activecampaign" => Some(SourceType::Activecampaign),
            "http" => Some(SourceType::Http),
            _ => None,
        }
    }
}

/// The last event a source received, as its overview shows it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LastEvent {
    /// Event name (track), page/screen name, or for ActiveCampaign webhooks the raw
    /// webhook type (e.g. `unsubscribe`).
    pub event: Option<String>,
    /// Call type (`track`, `identify`, …) or `webhook` for ActiveCampaign webhooks.
    #[serde(rename = "type")]
    pub kind: String,
    /// When it arrived.
    pub received_at: String,
    /// Its messageId.
    pub message_id: String,
}

/// A source as stored.
#[derive(Debug, Clone)]
pub struct Source {
    /// Stable id (`src_…`).
    pub id: String,
    /// Kind.
    pub kind: SourceType,
    /// Nickname.
    pub name: String,
    /// Warehouse schema name.
    pub schema: String,
    /// Current write key.
    pub write_key: String,
    /// Whether events are accepted.
    pub enabled: bool,
    /// Type-specific settings (an object).
    pub settings: Value,
    /// Creation time.
    pub created_at: DateTime<Utc>,
}

/// Checks a warehouse schema name by the warehouse's one rule
/// ([`tributary_warehouse::validate_schema_name`]: `[a-z_][a-z0-9_]*`, at most 63
/// bytes, not a reserved word).
pub fn validate_schema(s: &str) -> Result<(), ApiError> {
    tributary_warehouse::validate_schema_name(s).map_err(|e| ApiError::bad("invalid_schema", e))
}

fn random_token(bytes: usize) -> String {
    let mut buf = vec![0u8; bytes];
    getrandom::fill(&mut buf).expect("the OS random source is available");
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(buf)
}

/// A new write key: 192 random bits, URL-safe.
pub fn new_write_key() -> String {
    format!("wk_{}", random_token(24))
}

/// A new admin token: 256 random bits, URL-safe.
pub fn new_admin_token() -> String {
    format!("adm_{}", random_token(32))
}

fn key_hash(key: &str) -> [u8; 32] {
    Sha256::digest(key.as_bytes()).into()
}

#[derive(Default)]
struct Cache {
    by_id: HashMap<String, Arc<Source>>,
    by_key: HashMap<[u8; 32], Arc<Source>>,
}

/// Unmapped webhooks kept per source for the debugger.
pub const UNMAPPED_KEPT: usize = 100;

/// The control-plane store.
pub struct Control {
    conn: Mutex<Connection>,
    cache: RwLock<Cache>,
    last_events: Mutex<HashMap<String, LastEvent>>,
    dirty_events: Mutex<HashSet<String>>,
    identities: RwLock<HashMap<String, String>>,
    dirty_identities: Mutex<HashMap<String, String>>,
}

fn internal(e: impl std::fmt::Display) -> ApiError {
    ApiError::Internal(e.to_string())
}

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

/// Upserts identities in one transaction (committed = fsynced, see `open`).
fn write_identities(conn: &mut Connection, ids: &[(String, String)]) -> Result<(), ApiError> {
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

const SOURCE_COLS: &str = "id, type, name, schema, write_key, enabled, settings, created_at";

impl Control {
    /// Opens (or creates) `control.db` in `dir` and loads the caches.
    pub fn open(dir: &Path) -> Result<Control, ApiError> {
        let conn = Connection::open(dir.join("control.db")).map_err(internal)?;
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
        let control = Control {
            conn: Mutex::new(conn),
            cache: RwLock::new(Cache::default()),
            last_events: Mutex::new(HashMap::new()),
            dirty_events: Mutex::new(HashSet::new()),
            identities: RwLock::new(HashMap::new()),
            dirty_identities: Mutex::new(HashMap::new()),
        };
        control.reload()?;
        Ok(control)
    }

    fn reload(&self) -> Result<(), ApiError> {
        let conn = self.conn.lock().map_err(internal)?;
        let mut st = conn
            .prepare(&format!("SELECT {SOURCE_COLS}, last_event FROM sources"))
            .map_err(internal)?;
        let rows = st
            .query_map([], |r| {
                let le: Option<String> = r.get(8)?;
                Ok((row_to_source(r)?, le))
            })
            .map_err(internal)?;
        let mut cache = Cache::default();
        let mut last = HashMap::new();
        for row in rows {
            let (s, le) = row.map_err(internal)?;
            if let Some(le) = le.and_then(|t| serde_json::from_str::<LastEvent>(&t).ok()) {
                last.insert(s.id.clone(), le);
            }
            let s = Arc::new(s);
            cache.by_key.insert(key_hash(&s.write_key), s.clone());
            cache.by_id.insert(s.id.clone(), s);
        }
        let mut ids = HashMap::new();
        let mut st = conn
            .prepare("SELECT email, user_id FROM identities")
            .map_err(internal)?;
        for row in st
            .query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?)))
            .map_err(internal)?
        {
            let (e, u) = row.map_err(internal)?;
            ids.insert(e, u);
        }
        *self.cache.write().map_err(internal)? = cache;
        *self.last_events.lock().map_err(internal)? = last;
        *self.identities.write().map_err(internal)? = ids;
        Ok(())
    }

    /// Finds the source a write key belongs to. Lookup is by the key's SHA-256 and
    /// the final comparison is constant-time.
    pub fn source_by_key(&self, key: &str) -> Option<Arc<Source>> {
        let cache = self.cache.read().ok()?;
        let s = cache.by_key.get(&key_hash(key))?;
        if bool::from(s.write_key.as_bytes().ct_eq(key.as_bytes())) {
            Some(s.clone())
        } else {
            None
        }
    }

    /// A source by id.
    pub fn source(&self, id: &str) -> Option<Arc<Source>> {
        self.cache.read().ok()?.by_id.get(id).cloned()
    }

    /// All sources, oldest first.
    pub fn sources(&self) -> Vec<Arc<Source>> {
        let mut v: Vec<_> = self
            .cache
            .read()
            .map(|c| c.by_id.values().cloned().collect())
            .unwrap_or_default();
        v.sort_by(|a, b| a.created_at.cmp(&b.created_at).then(a.id.cmp(&b.id)));
        v
    }

    /// The schema of a source, for the warehouse loader.
    pub fn schema_of(&self, id: &str) -> Option<String> {
        self.source(id).map(|s| s.schema.clone())
    }

    /// Creates a source with a fresh write key.
    pub fn create(
        &self,
        kind: SourceType,
        name: &str,
        schema: &str,
        settings: Value,
    ) -> Result<Arc<Source>, ApiError> {
        validate_schema(schema)?;
        let source = Source {
            id: format!("src_{}", uuid::Uuid::now_v7().simple()),
            kind,
            name: name.to_string(),
            schema: schema.to_string(),
            write_key: new_write_key(),
            enabled: true,
            settings,
            created_at: Utc::now(),
        };
        let conn = self.conn.lock().map_err(internal)?;
        let mut cache = self.cache.write().map_err(internal)?;
        if cache.by_id.values().any(|s| s.schema == schema) {
            return Err(ApiError::Conflict(format!(
                "schema {schema:?} is already used by another source"
            )));
        }
        conn.execute(
            &format!("INSERT INTO sources ({SOURCE_COLS}) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)"),
            params![
                source.id,
                kind.as_str(),
                source.name,
                source.schema,
                source.write_key,
                1,
                source.settings.to_string(),
                source.created_at.to_rfc3339()
            ],
        )
        .map_err(ApiError::from)?;
        let s = Arc::new(source);
        cache.by_key.insert(key_hash(&s.write_key), s.clone());
        cache.by_id.insert(s.id.clone(), s.clone());
        Ok(s)
    }

    fn replace(&self, updated: Source) -> Result<Arc<Source>, ApiError> {
        let conn = self.conn.lock().map_err(internal)?;
        let mut cache = self.cache.write().map_err(internal)?;
        let old = cache
            .by_id
            .get(&updated.id)
            .cloned()
            .ok_or_else(|| ApiError::NotFound(format!("no source {:?}", updated.id)))?;
        conn.execute(
            "UPDATE sources SET name = ?2, write_key = ?3, enabled = ?4, settings = ?5 WHERE id = ?1",
            params![
                updated.id,
                updated.name,
                updated.write_key,
                updated.enabled as i64,
                updated.settings.to_string()
            ],
        )
        .map_err(ApiError::from)?;
        cache.by_key.remove(&key_hash(&old.write_key));
        let s = Arc::new(updated);
        cache.by_key.insert(key_hash(&s.write_key), s.clone());
        cache.by_id.insert(s.id.clone(), s.clone());
        Ok(s)
    }

    /// Changes name, enabled and/or settings.
    pub fn patch(
        &self,
        id: &str,
        name: Option<String>,
        enabled: Option<bool>,
        settings: Option<Value>,
    ) -> Result<Arc<Source>, ApiError> {
        let mut s = (*self
            .source(id)
            .ok_or_else(|| ApiError::NotFound(format!("no source {id:?}")))?)
        .clone();
        if let Some(n) = name {
            s.name = n;
        }
        if let Some(e) = enabled {
            s.enabled = e;
        }
        if let Some(v) = settings {
            s.settings = v;
        }
        self.replace(s)
    }

    /// Issues a new write key; the old one stops working at once.
    pub fn rotate_key(&self, id: &str) -> Result<Arc<Source>, ApiError> {
        let mut s = (*self
            .source(id)
            .ok_or_else(|| ApiError::NotFound(format!("no source {id:?}")))?)
        .clone();
        s.write_key = new_write_key();
        self.replace(s)
    }

    /// Deletes a source (its events stay in the log until retention removes them).
    pub fn delete(&self, id: &str) -> Result<(), ApiError> {
        let conn = self.conn.lock().map_err(internal)?;
        let mut cache = self.cache.write().map_err(internal)?;
        let old = cache
            .by_id
            .remove(id)
            .ok_or_else(|| ApiError::NotFound(format!("no source {id:?}")))?;
        cache.by_key.remove(&key_hash(&old.write_key));
        conn.execute("DELETE FROM sources WHERE id = ?1", params![id])
            .map_err(ApiError::from)?;
        conn.execute(
            "DELETE FROM unmapped_webhooks WHERE source_id = ?1",
            params![id],
        )
        .map_err(ApiError::from)?;
        conn.execute("DELETE FROM api_sync WHERE source_id = ?1", params![id])
            .map_err(ApiError::from)?;
        if let Ok(mut l) = self.last_events.lock() {
            l.remove(id);
        }
        Ok(())
    }

    /// Records the last event of a source (in memory; flushed by [`Control::flush`]).
    pub fn set_last_event(&self, source_id: &str, ev: LastEvent) {
        if let Ok(mut l) = self.last_events.lock() {
            l.insert(source_id.to_string(), ev);
        }
        if let Ok(mut d) = self.dirty_events.lock() {
            d.insert(source_id.to_string());
        }
    }

    /// The last event of a source.
    pub fn last_event(&self, source_id: &str) -> Option<LastEvent> {
        self.last_events.lock().ok()?.get(source_id).cloned()
    }

    /// Remembers that `email` (case-insensitive) belongs to `user_id`; durable when
    /// it returns `Ok` (see [`Control::remember_identities`]).
    pub fn remember_identity(&self, email: &str, user_id: &str) -> Result<(), ApiError> {
        self.remember_identities(&[(email.to_string(), user_id.to_string())])
    }

    /// Remembers email → userId pairs (emails compared case-insensitively; later pairs
    /// win) and commits the new or changed ones to `control.db` in one fsynced
    /// transaction before returning. Blocking: call it off the async runtime. On a
    /// failed write the pairs are still used in memory and stay queued for
    /// [`Control::flush`], and the error is returned so the caller does not
    /// acknowledge.
    pub fn remember_identities(&self, pairs: &[(String, String)]) -> Result<(), ApiError> {
        let mut changed: Vec<(String, String)> = Vec::new();
        {
            let known = self.identities.read().map_err(internal)?;
            for (email, user_id) in pairs {
                let email = email.trim().to_lowercase();
                if email.is_empty() || user_id.is_empty() {
                    continue;
                }
                changed.retain(|(e, _)| *e != email);
                if known.get(&email) != Some(user_id) {
                    changed.push((email, user_id.clone()));
                }
            }
        }
        if changed.is_empty() {
            return Ok(());
        }
        // The connection lock orders concurrent writers: memory and disk agree on
        // which of two racing identifies came last.
        let mut conn = self.conn.lock().map_err(internal)?;
        let written = write_identities(&mut conn, &changed);
        if let Ok(mut m) = self.identities.write() {
            m.extend(changed.iter().cloned());
        }
        if written.is_err()
            && let Ok(mut d) = self.dirty_identities.lock()
        {
            d.extend(changed);
        }
        written
    }

    /// The userId last identified with this email, if any.
    pub fn user_id_for_email(&self, email: &str) -> Option<String> {
        self.identities
            .read()
            .ok()?
            .get(&email.trim().to_lowercase())
            .cloned()
    }

    /// Writes changed last events (and identities whose synchronous write failed)
    /// to the database. What it cannot write is queued again for the next flush,
    /// unless a newer value was queued meanwhile.
    pub fn flush(&self) -> Result<(), ApiError> {
        let dirty: Vec<String> = self
            .dirty_events
            .lock()
            .map(|mut d| d.drain().collect())
            .unwrap_or_default();
        let ids: Vec<(String, String)> = self
            .dirty_identities
            .lock()
            .map(|mut d| d.drain().collect())
            .unwrap_or_default();
        if dirty.is_empty() && ids.is_empty() {
            return Ok(());
        }
        let result = self.write_dirty(&dirty, &ids);
        if result.is_err() {
            if let Ok(mut d) = self.dirty_events.lock() {
                d.extend(dirty);
            }
            if let Ok(mut d) = self.dirty_identities.lock() {
                for (email, uid) in ids {
                    d.entry(email).or_insert(uid);
                }
            }
        }
        result
    }

    fn write_dirty(&self, dirty: &[String], ids: &[(String, String)]) -> Result<(), ApiError> {
        let events: Vec<(String, String)> = {
            let l = self.last_events.lock().map_err(internal)?;
            dirty
                .iter()
                .filter_map(|id| {
                    l.get(id)
                        .and_then(|e| serde_json::to_string(e).ok())
                        .map(|t| (id.clone(), t))
                })
                .collect()
        };
        let mut conn = self.conn.lock().map_err(internal)?;
        {
            let tx = conn.transaction().map_err(internal)?;
            for (id, text) in events {
                tx.execute(
                    "UPDATE sources SET last_event = ?2 WHERE id = ?1",
                    params![id, text],
                )
                .map_err(internal)?;
            }
            tx.commit().map_err(internal)?;
        }
        if !ids.is_empty() {
            write_identities(&mut conn, ids)?;
        }
        Ok(())
    }

    /// Keeps an unmapped webhook for the debugger (durably, before returning), and
    /// drops the source's entries beyond the newest [`UNMAPPED_KEPT`]. Blocking.
    pub fn record_unmapped(&self, source_id: &str, entry: &Value) -> Result<(), ApiError> {
        let mut conn = self.conn.lock().map_err(internal)?;
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
            params![source_id, UNMAPPED_KEPT as i64],
        )
        .map_err(internal)?;
        tx.commit().map_err(internal)
    }

    /// The kept unmapped webhooks of a source, newest first.
    pub fn unmapped(&self, source_id: &str) -> Result<Vec<Value>, ApiError> {
        let conn = self.conn.lock().map_err(internal)?;
        let mut st = conn
            .prepare_cached(
                "SELECT entry FROM unmapped_webhooks WHERE source_id = ?1 ORDER BY id DESC LIMIT ?2",
            )
            .map_err(internal)?;
        let rows = st
            .query_map(params![source_id, UNMAPPED_KEPT as i64], |r| {
                r.get::<_, String>(0)
            })
            .map_err(internal)?;
        let mut out = Vec::new();
        for row in rows {
            if let Ok(v) = serde_json::from_str(&row.map_err(internal)?) {
                out.push(v);
            }
        }
        Ok(out)
    }

    /// The API sync's durable state of a source (its checkpoint and status, as the
    /// sync wrote it with [`Control::save_sync_state`]), if any. Blocking.
    pub fn sync_state(&self, source_id: &str) -> Result<Option<Value>, ApiError> {
        let conn = self.conn.lock().map_err(internal)?;
        let text: Option<String> = conn
            .query_row(
                "SELECT state FROM api_sync WHERE source_id = ?1",
                params![source_id],
                |r| r.get(0),
            )
            .optional()
            .map_err(internal)?;
        Ok(text.and_then(|t| serde_json::from_str(&t).ok()))
    }

    /// Replaces the API sync state of a source; durable (committed, fsynced) when it
    /// returns `Ok`, so a checkpoint written after an append survives a crash.
    /// Blocking.
    pub fn save_sync_state(&self, source_id: &str, state: &Value) -> Result<(), ApiError> {
        let conn = self.conn.lock().map_err(internal)?;
        conn.execute(
            "INSERT INTO api_sync (source_id, state, updated_at) VALUES (?1, ?2, ?3)
             ON CONFLICT (source_id) DO UPDATE SET state = excluded.state, updated_at = excluded.updated_at",
            params![source_id, state.to_string(), Utc::now().to_rfc3339()],
        )
        .map_err(internal)?;
        Ok(())
    }

    /// Whether a source with this id exists in the database (bypassing the cache).
    pub fn exists_in_db(&self, id: &str) -> bool {
        self.conn
            .lock()
            .ok()
            .and_then(|c| {
                c.query_row("SELECT 1 FROM sources WHERE id = ?1", params![id], |_| {
                    Ok(())
                })
                .optional()
                .ok()
                .flatten()
            })
            .is_some()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schema_rules() {
        assert!(validate_schema("activecampaign").is_ok());
        assert!(validate_schema("_x9").is_ok());
        for bad in [
            "",
            "9a",
            "Active",
            "a-b",
            "a b",
            "select",
            "main",
            "pg_x",
            &"a".repeat(64),
        ] {
            assert!(validate_schema(bad).is_err(), "{bad} should be refused");
        }
    }

    #[test]
    fn keys_are_long_and_rotation_invalidates_the_old_one() {
        let dir = tempfile::tempdir().unwrap();
        let c = Control::open(dir.path()).unwrap();
        let s = c
            .create(
                SourceType::Activecampaign,
                "AC",
                "activecampaign",
                serde_json::json!({}),
            )
            .unwrap();
        assert!(s.write_key.len() >= 32);
        assert_eq!(c.source_by_key(&s.write_key).unwrap().id, s.id);
        let r = c.rotate_key(&s.id).unwrap();
        assert!(c.source_by_key(&s.write_key).is_none());
        assert_eq!(c.source_by_key(&r.write_key).unwrap().id, s.id);
        assert!(matches!(
            c.create(
                SourceType::Http,
                "dup",
                "activecampaign",
                serde_json::json!({})
            ),
            Err(ApiError::Conflict(_))
        ));
    }

    #[test]
    fn state_survives_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let id;
        {
            let c = Control::open(dir.path()).unwrap();
            id = c
                .create(SourceType::Http, "web", "website", serde_json::json!({}))
                .unwrap()
                .id
                .clone();
            c.set_last_event(
                &id,
                LastEvent {
                    event: Some("Signed Up".into()),
                    kind: "track".into(),
                    received_at: "2026-01-01T00:00:00.000Z".into(),
                    message_id: "m".into(),
                },
            );
            c.remember_identity("Ann@Example.com", "u1").unwrap();
            c.flush().unwrap();
        }
        let c = Control::open(dir.path()).unwrap();
        assert_eq!(
            c.last_event(&id).unwrap().event.as_deref(),
            Some("Signed Up")
        );
        assert_eq!(
            c.user_id_for_email("ann@example.COM").as_deref(),
            Some("u1")
        );
    }

    #[test]
    fn an_identity_is_on_disk_when_remember_returns_without_a_flush() {
        let dir = tempfile::tempdir().unwrap();
        let c = Control::open(dir.path()).unwrap();
        c.remember_identities(&[
            ("Ann@Example.com".into(), "u1".into()),
            ("bob@example.com".into(), "u2".into()),
            ("ann@example.com".into(), "u3".into()),
        ])
        .unwrap();
        // No flush, no drop: a second handle reads the file as a restart would.
        let reopened = Control::open(dir.path()).unwrap();
        assert_eq!(
            reopened.user_id_for_email("ANN@example.com").as_deref(),
            Some("u3")
        );
        assert_eq!(
            reopened.user_id_for_email("bob@example.com").as_deref(),
            Some("u2")
        );
        drop(c);
    }

    #[test]
    fn a_failed_write_keeps_the_identity_queued_for_the_next_flush() {
        let dir = tempfile::tempdir().unwrap();
        let c = Control::open(dir.path()).unwrap();
        c.conn
            .lock()
            .unwrap()
            .execute_batch("ALTER TABLE identities RENAME TO identities_away")
            .unwrap();
        assert!(c.remember_identity("ann@example.com", "u1").is_err());
        assert_eq!(
            c.user_id_for_email("ann@example.com").as_deref(),
            Some("u1")
        );
        assert!(c.flush().is_err(), "table still missing");
        c.conn
            .lock()
            .unwrap()
            .execute_batch("ALTER TABLE identities_away RENAME TO identities")
            .unwrap();
        c.flush().unwrap();
        let reopened = Control::open(dir.path()).unwrap();
        assert_eq!(
            reopened.user_id_for_email("ann@example.com").as_deref(),
            Some("u1")
        );
    }

    #[test]
    fn unmapped_webhooks_survive_reopen_and_are_bounded() {
        let dir = tempfile::tempdir().unwrap();
        {
            let c = Control::open(dir.path()).unwrap();
            for i in 0..(UNMAPPED_KEPT + 5) {
                c.record_unmapped("src_a", &serde_json::json!({"n": i}))
                    .unwrap();
            }
            c.record_unmapped("src_b", &serde_json::json!({"n": 0}))
                .unwrap();
        }
        let c = Control::open(dir.path()).unwrap();
        let a = c.unmapped("src_a").unwrap();
        assert_eq!(a.len(), UNMAPPED_KEPT);
        assert_eq!(a[0]["n"], UNMAPPED_KEPT + 4, "newest first");
        assert_eq!(a[UNMAPPED_KEPT - 1]["n"], 5, "oldest dropped");
        assert_eq!(c.unmapped("src_b").unwrap().len(), 1);
    }
}
