//! Control-plane state: sources, their write keys and settings, the last event each
//! source received, and the email → userId map used to resolve ActiveCampaign
//! recipients. Kept behind one storage trait ([`ControlStore`]): embedded, in
//! `<data-dir>/control.db` (SQLite, WAL, [`SqliteStore`]); in cluster mode in a
//! PostgreSQL schema shared by every node (`TRIBUTARY_CONTROL=postgres://…`,
//! [`PgControlStore`]). Either way an in-memory copy serves the hot path.
//!
//! **Cluster: every node sees a change within a second.** The PostgreSQL store
//! sends a `NOTIFY` in the same transaction as each change of a source (committed
//! together, delivered on commit); every node `LISTEN`s and reloads its copy when
//! told, reloads it on every (re)connection (notifications sent while a node was
//! disconnected are lost), and reloads sources every `control.reload_interval`
//! (default 1 s) anyway. A reload that raced a local change is discarded (the
//! change's own notification brings a fresh one), so a node never goes back to an
//! older copy than what it wrote itself. Identities learnt on one node travel in
//! their notification's payload and are fully reloaded on reconnection and every
//! 30 reload intervals.
//!
//! Write keys are 192-bit random secrets. Ingest looks them up by a keyed hash
//! (SipHash under a random per-process key, see [`key_hash`]) in a hash map and then
//! compares the stored key in constant time, so neither the lookup nor the
//! comparison leaks a key through timing. Rotating a key replaces the
//! map entry in the same critical section: the old key stops working at once.
//!
//! `last_event` changes on every event; it is updated in memory and written to the
//! database by a background flush once a second (and on shutdown). A crash can lose
//! at most that last second of *display* state; events themselves are in the event
//! log. A failed flush re-queues what it could not write.
//!
//! **Identities are durable before the 200.** The email → userId map learnt from an
//! `identify` is written to the control store (one transaction per request; SQLite
//! with `synchronous = FULL`, so committed = fsynced) after the log append and before the answer: a
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
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock, Weak};
use std::time::Duration;

use base64::Engine as _;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::error::ApiError;

mod postgres;
mod sqlite;

pub use postgres::PgControlStore;
pub use sqlite::SqliteStore;

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

/// How a console session id is stored: its SHA-256 in hex, so a copy of the
/// control database does not hold a usable session.
pub fn session_hash(id: &str) -> String {
    use std::fmt::Write as _;
    Sha256::digest(id.as_bytes())
        .iter()
        .fold(String::with_capacity(64), |mut out, b| {
            let _ = write!(out, "{b:02x}");
            out
        })
}

/// The key of a write key in the lookup map: SipHash-1-3 under a random 128-bit key
/// drawn once per process. The lookup needs no collision resistance against someone
/// who cannot compute the hash, only that its timing tells nothing about stored keys
/// (it cannot: nobody outside knows the hash key); the constant-time comparison of
/// the key itself decides. ~150 instructions where SHA-256 cost ~4,400 per request
/// (issue #15). Two sources whose keys share a 64-bit hash (odds ~n²/2⁶⁵ for n
/// random keys) would shadow each other; that is not worth a bucket list.
fn key_hash(key: &str) -> u64 {
    static HASHER: std::sync::LazyLock<std::hash::RandomState> =
        std::sync::LazyLock::new(std::hash::RandomState::new);
    std::hash::BuildHasher::hash_one(&*HASHER, key.as_bytes())
}

/// `[control]`: where control-plane state lives (`TRIBUTARY_CONTROL_<FIELD>`;
/// `TRIBUTARY_CONTROL` is the URL).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ControlConfig {
    /// Empty (the default): `<data_dir>/control.db`. `postgres://…`: the cluster's
    /// shared control database (sources, keys, identities, leases, destinations'
    /// positions).
    pub url: String,
    /// The PostgreSQL schema that holds the control tables (default
    /// `tributary_control`), created on first start.
    pub schema: String,
    /// How often every node reloads sources from PostgreSQL even without a
    /// notification (default `1s`).
    #[serde(with = "tributary_model::duration")]
    pub reload_interval: Duration,
}

impl Default for ControlConfig {
    fn default() -> Self {
        ControlConfig {
            url: String::new(),
            schema: "tributary_control".into(),
            reload_interval: Duration::from_secs(1),
        }
    }
}

impl ControlConfig {
    /// Whether the control plane is the cluster's PostgreSQL database.
    pub fn is_postgres(&self) -> bool {
        let u = self.url.trim();
        u.starts_with("postgres://") || u.starts_with("postgresql://")
    }

    /// Checks the URL's scheme and the schema name.
    pub fn validate(&self) -> Result<(), String> {
        let u = self.url.trim();
        if !u.is_empty() && !self.is_postgres() {
            return Err(format!(
                "control.url must be empty (embedded) or postgres://…, not {:?}",
                u.split(':').next().unwrap_or("")
            ));
        }
        crate::cluster::pg::validate_schema(&self.schema)?;
        if self.reload_interval.is_zero() {
            return Err("control.reload_interval must be more than zero".into());
        }
        Ok(())
    }
}

/// Everything the hot path keeps in memory, as read from a store.
#[derive(Debug, Default)]
pub struct Snapshot {
    /// Every source with its stored last event.
    pub sources: Vec<(Source, Option<LastEvent>)>,
    /// Every email → userId pair, when asked for.
    pub identities: Option<Vec<(String, String)>>,
}

/// Where control-plane state is stored. Calls are blocking (they may wait for a
/// database): call them off the async runtime, as [`Control`]'s callers do for the
/// write paths. Every write is committed when it returns `Ok`.
pub trait ControlStore: Send + Sync + 'static {
    /// `sqlite` or `postgres`.
    fn kind(&self) -> &'static str;
    /// Reads every source (and the identities when `identities`).
    fn load(&self, identities: bool) -> Result<Snapshot, ApiError>;
    /// Stores a new source (a taken schema or key → `Conflict`).
    fn insert_source(&self, source: &Source) -> Result<(), ApiError>;
    /// Stores a source's name, key, enabled flag and settings (`NotFound` when it
    /// is gone).
    fn update_source(&self, source: &Source) -> Result<(), ApiError>;
    /// Deletes a source, its unmapped webhooks and its API sync state.
    fn delete_source(&self, id: &str) -> Result<(), ApiError>;
    /// Upserts email → userId pairs in one transaction (emails unique in `pairs`).
    fn write_identities(&self, pairs: &[(String, String)]) -> Result<(), ApiError>;
    /// Stores sources' last events (display state: `(source id, JSON)`).
    fn write_last_events(&self, events: &[(String, String)]) -> Result<(), ApiError>;
    /// Keeps an unmapped webhook, dropping the source's entries beyond the newest
    /// `keep`.
    fn record_unmapped(&self, source_id: &str, entry: &Value, keep: usize) -> Result<(), ApiError>;
    /// The newest `limit` unmapped webhooks of a source, newest first.
    fn unmapped(&self, source_id: &str, limit: usize) -> Result<Vec<Value>, ApiError>;
    /// Whether a source with this id is stored.
    fn exists(&self, id: &str) -> Result<bool, ApiError>;
    /// The ActiveCampaign API sync's state of a source (JSON text), if any.
    fn sync_state(&self, source_id: &str) -> Result<Option<String>, ApiError>;
    /// Replaces the API sync state of a source; committed when it returns `Ok`.
    fn save_sync_state(&self, source_id: &str, state: &str) -> Result<(), ApiError>;
    /// Stores a console session under `hash` (the SHA-256 of its id, hex; the id
    /// itself is never stored) with its CSRF token, expiring `ttl` from now, and
    /// deletes expired sessions on the way.
    fn create_session(&self, hash: &str, csrf: &str, ttl: Duration) -> Result<(), ApiError>;
    /// The CSRF token of the unexpired session stored under `hash`.
    fn session(&self, hash: &str) -> Result<Option<String>, ApiError>;
    /// Deletes the session stored under `hash` (sign-out).
    fn delete_session(&self, hash: &str) -> Result<(), ApiError>;
    /// `Err(reason)` while the store cannot be reached (for `/ready`).
    fn health(&self) -> Result<(), String> {
        Ok(())
    }
    /// Starts telling `sink` about changes made elsewhere (other nodes); a store
    /// that only this process writes has none to tell.
    fn watch(&self, sink: Weak<dyn ChangeSink>) {
        let _ = sink;
    }
}

/// What a reload read against: the local write generations when it started.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReloadToken {
    sources: u64,
    identities: u64,
}

/// Receives changes made by other nodes ([`Control`] implements it).
pub trait ChangeSink: Send + Sync {
    /// Taken before a reload reads the store.
    fn reload_token(&self) -> ReloadToken;
    /// Replaces the in-memory copy with `snapshot`, unless a local change happened
    /// since `token` was taken or is happening now (then that change's notification
    /// brings a newer reload). Must not block: it runs on the store's own thread.
    fn apply(&self, token: ReloadToken, snapshot: Snapshot);
    /// Identities another node learnt.
    fn learn_identities(&self, pairs: Vec<(String, String)>);
    /// Something else changed (`destinations`), or the listener reconnected and
    /// anything may have; must not block.
    fn notified(&self, topic: &str) {
        let _ = topic;
    }
}

#[derive(Default)]
struct Cache {
    by_id: HashMap<String, Arc<Source>>,
    by_key: HashMap<u64, Arc<Source>>,
}

impl Cache {
    fn of(sources: impl IntoIterator<Item = Source>) -> Cache {
        let mut cache = Cache::default();
        for s in sources {
            let s = Arc::new(s);
            cache.by_key.insert(key_hash(&s.write_key), s.clone());
            cache.by_id.insert(s.id.clone(), s);
        }
        cache
    }
}

/// Unmapped webhooks kept per source for the debugger.
pub const UNMAPPED_KEPT: usize = 100;

/// The control-plane store.
pub struct Control {
    store: Box<dyn ControlStore>,
    /// Orders local writes with each other and with reloads.
    writes: Mutex<()>,
    sources_gen: AtomicU64,
    identities_gen: AtomicU64,
    cache: RwLock<Cache>,
    last_events: Mutex<HashMap<String, LastEvent>>,
    dirty_events: Mutex<HashSet<String>>,
    identities: RwLock<HashMap<String, String>>,
    dirty_identities: Mutex<HashMap<String, String>>,
    destination_changes: tokio::sync::watch::Sender<u64>,
}

fn internal(e: impl std::fmt::Display) -> ApiError {
    ApiError::Internal(e.to_string())
}

impl Control {
    /// Opens (or creates) `control.db` in `dir` and loads the caches.
    pub fn open(dir: &Path) -> Result<Control, ApiError> {
        Control::with_store(Box::new(SqliteStore::open(&dir.join("control.db"))?))
    }

    /// Connects to the cluster's control database (`config.url`, schema created
    /// when missing), loads the caches and starts following other nodes' changes.
    /// Connections are named after `node_id` (`application_name`).
    pub fn open_postgres(config: &ControlConfig, node_id: &str) -> Result<Arc<Control>, ApiError> {
        let store = PgControlStore::connect(config, node_id)?;
        let control = Arc::new(Control::with_store(Box::new(store))?);
        let weak: Weak<Control> = Arc::downgrade(&control);
        control.store.watch(weak);
        Ok(control)
    }

    /// A control plane on `store`, caches loaded.
    pub fn with_store(store: Box<dyn ControlStore>) -> Result<Control, ApiError> {
        let control = Control {
            store,
            writes: Mutex::new(()),
            sources_gen: AtomicU64::new(0),
            identities_gen: AtomicU64::new(0),
            cache: RwLock::new(Cache::default()),
            last_events: Mutex::new(HashMap::new()),
            dirty_events: Mutex::new(HashSet::new()),
            identities: RwLock::new(HashMap::new()),
            dirty_identities: Mutex::new(HashMap::new()),
            destination_changes: tokio::sync::watch::channel(0).0,
        };
        let token = control.reload_token();
        let snapshot = control.store.load(true)?;
        control.apply(token, snapshot);
        Ok(control)
    }

    /// Starts a console session: stores the hash of `id` with `csrf`, expiring
    /// after `ttl` (blocking: call it off the runtime).
    pub fn create_session(&self, id: &str, csrf: &str, ttl: Duration) -> Result<(), ApiError> {
        self.store.create_session(&session_hash(id), csrf, ttl)
    }

    /// The CSRF token of an unexpired console session (blocking).
    pub fn session(&self, id: &str) -> Result<Option<String>, ApiError> {
        self.store.session(&session_hash(id))
    }

    /// Ends a console session on every node (blocking).
    pub fn delete_session(&self, id: &str) -> Result<(), ApiError> {
        self.store.delete_session(&session_hash(id))
    }

    /// `sqlite` (embedded) or `postgres` (cluster).
    pub fn kind(&self) -> &'static str {
        self.store.kind()
    }

    /// `Err(reason)` while the control database cannot be reached (`/ready`).
    pub fn health(&self) -> Result<(), String> {
        self.store.health()
    }

    /// Changes whenever the control database says destinations may have changed
    /// elsewhere (cluster mode; never changes when embedded).
    pub fn destination_changes(&self) -> tokio::sync::watch::Receiver<u64> {
        self.destination_changes.subscribe()
    }

    /// Finds the source a write key belongs to. Lookup is by the key's keyed hash
    /// and the final comparison is constant-time.
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
        let _w = self.writes.lock().map_err(internal)?;
        if self
            .cache
            .read()
            .map_err(internal)?
            .by_id
            .values()
            .any(|s| s.schema == schema)
        {
            return Err(ApiError::Conflict(format!(
                "schema {schema:?} is already used by another source"
            )));
        }
        self.store.insert_source(&source)?;
        let s = Arc::new(source);
        let mut cache = self.cache.write().map_err(internal)?;
        cache.by_key.insert(key_hash(&s.write_key), s.clone());
        cache.by_id.insert(s.id.clone(), s.clone());
        self.sources_gen.fetch_add(1, Ordering::AcqRel);
        Ok(s)
    }

    fn replace(&self, updated: Source) -> Result<Arc<Source>, ApiError> {
        let _w = self.writes.lock().map_err(internal)?;
        let old = self
            .cache
            .read()
            .map_err(internal)?
            .by_id
            .get(&updated.id)
            .cloned()
            .ok_or_else(|| ApiError::NotFound(format!("no source {:?}", updated.id)))?;
        self.store.update_source(&updated)?;
        let mut cache = self.cache.write().map_err(internal)?;
        cache.by_key.remove(&key_hash(&old.write_key));
        let s = Arc::new(updated);
        cache.by_key.insert(key_hash(&s.write_key), s.clone());
        cache.by_id.insert(s.id.clone(), s.clone());
        self.sources_gen.fetch_add(1, Ordering::AcqRel);
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

    /// Issues a new write key; the old one stops working at once (on every node
    /// within a second in cluster mode).
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
        let _w = self.writes.lock().map_err(internal)?;
        if self.source(id).is_none() {
            return Err(ApiError::NotFound(format!("no source {id:?}")));
        }
        self.store.delete_source(id)?;
        {
            let mut cache = self.cache.write().map_err(internal)?;
            if let Some(old) = cache.by_id.remove(id) {
                cache.by_key.remove(&key_hash(&old.write_key));
            }
        }
        self.sources_gen.fetch_add(1, Ordering::AcqRel);
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
    /// win) and commits the new or changed ones to the control store in one
    /// durable transaction before returning. Blocking: call it off the async
    /// runtime. On a failed write the pairs are still used in memory and stay
    /// queued for [`Control::flush`], and the error is returned so the caller does
    /// not acknowledge.
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
        // The write lock orders concurrent writers: memory and the store agree on
        // which of two racing identifies came last.
        let _w = self.writes.lock().map_err(internal)?;
        let written = self.store.write_identities(&changed);
        if let Ok(mut m) = self.identities.write() {
            m.extend(changed.iter().cloned());
        }
        self.identities_gen.fetch_add(1, Ordering::AcqRel);
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
    /// to the store. What it cannot write is queued again for the next flush,
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
        if !events.is_empty() {
            self.store.write_last_events(&events)?;
        }
        if !ids.is_empty() {
            let _w = self.writes.lock().map_err(internal)?;
            self.store.write_identities(ids)?;
        }
        Ok(())
    }

    /// Keeps an unmapped webhook for the debugger (durably, before returning), and
    /// drops the source's entries beyond the newest [`UNMAPPED_KEPT`]. Blocking.
    pub fn record_unmapped(&self, source_id: &str, entry: &Value) -> Result<(), ApiError> {
        self.store.record_unmapped(source_id, entry, UNMAPPED_KEPT)
    }

    /// The kept unmapped webhooks of a source, newest first.
    pub fn unmapped(&self, source_id: &str) -> Result<Vec<Value>, ApiError> {
        self.store.unmapped(source_id, UNMAPPED_KEPT)
    }

    /// The API sync's durable state of a source (its checkpoint and status, as the
    /// sync wrote it with [`Control::save_sync_state`]), if any. Blocking.
    pub fn sync_state(&self, source_id: &str) -> Result<Option<Value>, ApiError> {
        let text = self.store.sync_state(source_id)?;
        Ok(text.and_then(|t| serde_json::from_str(&t).ok()))
    }

    /// Replaces the API sync state of a source; durable (committed, fsynced) when it
    /// returns `Ok`, so a checkpoint written after an append survives a crash.
    /// Blocking.
    pub fn save_sync_state(&self, source_id: &str, state: &Value) -> Result<(), ApiError> {
        self.store.save_sync_state(source_id, &state.to_string())
    }

    /// Whether a source with this id exists in the database (bypassing the cache).
    pub fn exists_in_db(&self, id: &str) -> bool {
        self.store.exists(id).unwrap_or(false)
    }
}

impl ChangeSink for Control {
    fn reload_token(&self) -> ReloadToken {
        ReloadToken {
            sources: self.sources_gen.load(Ordering::Acquire),
            identities: self.identities_gen.load(Ordering::Acquire),
        }
    }

    fn apply(&self, token: ReloadToken, snapshot: Snapshot) {
        // Never wait for a local write here: it may be waiting for the very store
        // thread that delivers this snapshot. A write in progress makes the
        // snapshot stale anyway, and its own notification brings the next one.
        let Ok(_w) = self.writes.try_lock() else {
            return;
        };
        if self.sources_gen.load(Ordering::Acquire) == token.sources {
            let mut stored = Vec::with_capacity(snapshot.sources.len());
            let mut sources = Vec::with_capacity(snapshot.sources.len());
            for (s, le) in snapshot.sources {
                if let Some(le) = le {
                    stored.push((s.id.clone(), le));
                }
                sources.push(s);
            }
            let cache = Cache::of(sources);
            if let (Ok(mut l), Ok(dirty)) = (self.last_events.lock(), self.dirty_events.lock()) {
                // Ours, not yet flushed, wins; otherwise the newer of ours and the
                // stored one (another node's).
                for (id, le) in stored {
                    if dirty.contains(&id) {
                        continue;
                    }
                    let newer = l.get(&id).is_none_or(|m| m.received_at < le.received_at);
                    if newer {
                        l.insert(id, le);
                    }
                }
                l.retain(|id, _| cache.by_id.contains_key(id));
            }
            if let Ok(mut c) = self.cache.write() {
                *c = cache;
            }
        }
        if let Some(ids) = snapshot.identities
            && self.identities_gen.load(Ordering::Acquire) == token.identities
        {
            let mut map: HashMap<String, String> = ids.into_iter().collect();
            if let Ok(d) = self.dirty_identities.lock() {
                map.extend(d.iter().map(|(e, u)| (e.clone(), u.clone())));
            }
            if let Ok(mut m) = self.identities.write() {
                *m = map;
            }
        }
    }

    fn learn_identities(&self, pairs: Vec<(String, String)>) {
        if let Ok(mut m) = self.identities.write() {
            m.extend(pairs);
        }
    }

    fn notified(&self, topic: &str) {
        if topic == "destinations" {
            self.destination_changes.send_modify(|n| *n += 1);
        }
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
        // Another connection to the file, as an operator's tool would be.
        let other = rusqlite::Connection::open(dir.path().join("control.db")).unwrap();
        other
            .execute_batch("ALTER TABLE identities RENAME TO identities_away")
            .unwrap();
        assert!(c.remember_identity("ann@example.com", "u1").is_err());
        assert_eq!(
            c.user_id_for_email("ann@example.com").as_deref(),
            Some("u1")
        );
        assert!(c.flush().is_err(), "table still missing");
        other
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
