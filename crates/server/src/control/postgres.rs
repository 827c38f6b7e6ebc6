//! The cluster's control store: the control schema of a PostgreSQL database shared
//! by every node (tables created by [`crate::cluster::pg::migrate`]).
//!
//! Durability: each call is one transaction, committed before it returns `Ok`
//! (PostgreSQL's own `synchronous_commit` decides fsync, `on` by default).
//!
//! Changes of sources and identities `NOTIFY` the schema's channel inside their own
//! transaction, so the notification exists exactly when the change does. One
//! connection per node `LISTEN`s (the *listener*, on a runtime of its own, see
//! below) and hands fresh snapshots to the [`ChangeSink`]; it reloads on every
//! (re)connection, because notifications sent while it was away are lost, and
//! every `reload_interval` anyway. `health()` is `Err` while the listener is
//! disconnected or its last reload is older than three intervals.
//!
//! The [`ControlStore`] calls are blocking (the `Control` API is synchronous and
//! used from request handlers); they run on a dedicated single-thread Tokio runtime
//! owned by this store, and the caller waits for the answer (bounded). So a call
//! works from any thread or runtime flavour and never needs the caller's runtime.

use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use deadpool_postgres::Pool;
use serde_json::Value;
use tokio_postgres::AsyncMessage;

use super::{ChangeSink, ControlConfig, ControlStore, LastEvent, Snapshot, Source, SourceType};
use crate::cluster::pg;
use crate::error::{ApiError, Store};

/// Longest a caller waits for the control database.
const CALL_TIMEOUT: Duration = Duration::from_secs(15);
/// Largest notification payload we send (PostgreSQL's limit is 8000 bytes).
const MAX_PAYLOAD: usize = 7000;
/// Identities are fully reloaded every this many reload intervals.
const IDENTITY_RELOAD_EVERY: u32 = 30;

#[derive(Default)]
struct Health {
    listening: bool,
    last_ok: Option<Instant>,
    last_error: Option<String>,
}

struct Inner {
    rt: tokio::runtime::Handle,
    _stop: tokio::sync::oneshot::Sender<()>,
    pool: Pool,
    cfg: tokio_postgres::Config,
    schema: String,
    channel: String,
    reload_interval: Duration,
    health: Mutex<Health>,
}

/// The PostgreSQL control store.
#[derive(Clone)]
pub struct PgControlStore {
    inner: Arc<Inner>,
}

fn unavailable(detail: impl Into<String>) -> ApiError {
    ApiError::unavailable(Store::Control, detail)
}

fn pool_error(e: deadpool_postgres::PoolError) -> ApiError {
    unavailable(format!("control database: {}", pg::error_text(&e)))
}

const SOURCE_COLS: &str =
    "id, type, name, schema, write_key, enabled, settings, created_at, last_event";

fn row_to_source(r: &tokio_postgres::Row) -> (Source, Option<LastEvent>) {
    let kind: String = r.get(1);
    let settings: String = r.get(6);
    let created: String = r.get(7);
    let le: Option<String> = r.get(8);
    (
        Source {
            id: r.get(0),
            kind: SourceType::parse(&kind).unwrap_or(SourceType::Http),
            name: r.get(2),
            schema: r.get(3),
            write_key: r.get(4),
            enabled: r.get(5),
            settings: serde_json::from_str(&settings).unwrap_or(Value::Object(Default::default())),
            created_at: DateTime::parse_from_rfc3339(&created)
                .map(|t| t.with_timezone(&Utc))
                .unwrap_or_default(),
        },
        le.and_then(|t| serde_json::from_str(&t).ok()),
    )
}

async fn load(
    client: &tokio_postgres::Client,
    schema: &str,
    identities: bool,
) -> Result<Snapshot, tokio_postgres::Error> {
    let rows = client
        .query(&format!("SELECT {SOURCE_COLS} FROM {schema}.sources"), &[])
        .await?;
    let mut snapshot = Snapshot {
        sources: rows.iter().map(row_to_source).collect(),
        identities: None,
    };
    if identities {
        let rows = client
            .query(
                &format!("SELECT email, user_id FROM {schema}.identities"),
                &[],
            )
            .await?;
        snapshot.identities = Some(rows.iter().map(|r| (r.get(0), r.get(1))).collect());
    }
    Ok(snapshot)
}

/// Console sessions, shared by every node: the SHA-256 of the session id (hex),
/// never the id itself; expiry is the database's clock, so nodes agree on it.
const SESSIONS_TABLE: &str = "
CREATE TABLE IF NOT EXISTS {s}.console_sessions (
    id_hash text PRIMARY KEY, csrf text NOT NULL, expires_at timestamptz NOT NULL);
CREATE INDEX IF NOT EXISTS console_sessions_expiry ON {s}.console_sessions (expires_at);
";

/// Creates the sessions table when missing, under the same advisory lock as
/// [`pg::migrate`] (nodes starting together).
async fn migrate_sessions(
    client: &mut tokio_postgres::Client,
    schema: &str,
) -> Result<(), tokio_postgres::Error> {
    pg::migrate_tables(client, schema, SESSIONS_TABLE).await
}

impl PgControlStore {
    /// Connects (schema created when missing). Fails with `Unavailable` when the
    /// database cannot be reached, so a node does not start half-configured.
    pub fn connect(config: &ControlConfig, node_id: &str) -> Result<PgControlStore, ApiError> {
        config.validate().map_err(ApiError::Internal)?;
        let cfg = pg::pg_config(config.url.trim(), node_id).map_err(ApiError::Internal)?;
        let pool = pg::pool(cfg.clone(), 8).map_err(ApiError::Internal)?;
        let (handle_tx, handle_rx) = std::sync::mpsc::sync_channel(1);
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        std::thread::Builder::new()
            .name("control-pg".into())
            .spawn(move || {
                let rt = match tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    Ok(rt) => rt,
                    Err(e) => {
                        let _ = handle_tx.send(Err(e.to_string()));
                        return;
                    }
                };
                let _ = handle_tx.send(Ok(rt.handle().clone()));
                // Runs until the store is dropped; its tasks end with it.
                let _ = rt.block_on(stop_rx);
            })
            .map_err(|e| ApiError::Internal(format!("control runtime thread: {e}")))?;
        let rt = handle_rx
            .recv()
            .map_err(|e| ApiError::Internal(format!("control runtime: {e}")))?
            .map_err(ApiError::Internal)?;
        let schema = config.schema.clone();
        let store = PgControlStore {
            inner: Arc::new(Inner {
                rt,
                _stop: stop_tx,
                pool,
                cfg,
                schema: format!("\"{schema}\""),
                channel: format!("\"{schema}\""),
                reload_interval: config.reload_interval,
                health: Mutex::new(Health::default()),
            }),
        };
        let pool = store.inner.pool.clone();
        store.block(async move {
            let mut client = pool.get().await.map_err(pool_error)?;
            pg::migrate(&mut client, &schema)
                .await
                .map_err(ApiError::from)?;
            migrate_sessions(&mut client, &schema)
                .await
                .map_err(ApiError::from)
        })?;
        Ok(store)
    }

    /// The pool of this store's connections (leases and positions share it).
    pub fn pool(&self) -> Pool {
        self.inner.pool.clone()
    }

    /// Runs `fut` on the store's runtime and waits for it (at most
    /// [`CALL_TIMEOUT`]).
    fn block<T, F>(&self, fut: F) -> Result<T, ApiError>
    where
        T: Send + 'static,
        F: std::future::Future<Output = Result<T, ApiError>> + Send + 'static,
    {
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        self.inner.rt.spawn(async move {
            let _ = tx.send(fut.await);
        });
        rx.recv_timeout(CALL_TIMEOUT)
            .map_err(|_| unavailable("the control database did not answer in time"))?
    }

    /// Runs `f` in one transaction on a pooled connection, then sends
    /// `notify` (if any) on the schema's channel in the same transaction.
    fn transaction<T, F>(&self, notify: Option<String>, f: F) -> Result<T, ApiError>
    where
        T: Send + 'static,
        F: for<'t> FnOnce(
                &'t deadpool_postgres::Transaction<'t>,
                String,
            ) -> std::pin::Pin<
                Box<dyn std::future::Future<Output = Result<T, tokio_postgres::Error>> + Send + 't>,
            > + Send
            + 'static,
    {
        let pool = self.inner.pool.clone();
        let schema = self.inner.schema.clone();
        let channel = self.inner.channel.clone();
        self.block(async move {
            let mut client = pool.get().await.map_err(pool_error)?;
            let tx = client.transaction().await.map_err(ApiError::from)?;
            let out = f(&tx, schema).await.map_err(ApiError::from)?;
            if let Some(payload) = notify {
                tx.execute(
                    "SELECT pg_notify($1, $2)",
                    &[&channel.trim_matches('"'), &payload],
                )
                .await
                .map_err(ApiError::from)?;
            }
            tx.commit().await.map_err(ApiError::from)?;
            Ok(out)
        })
    }

    fn set_health(&self, f: impl FnOnce(&mut Health)) {
        let mut h = self.inner.health.lock().unwrap_or_else(|p| p.into_inner());
        f(&mut h);
        let up = h.listening && h.last_error.is_none();
        metrics::gauge!("tributary_control_postgres_up", "role" => "control").set(if up {
            1.0
        } else {
            0.0
        });
    }

    /// The listener: LISTEN, reload, follow notifications; reconnect when the
    /// connection ends.
    async fn listen(self, sink: Weak<dyn ChangeSink>) {
        let mut backoff = Duration::from_millis(100);
        loop {
            if sink.strong_count() == 0 {
                return;
            }
            match self.listen_once(&sink).await {
                Ok(()) => return,
                Err(e) => {
                    tracing::warn!(error = %e, "control database listener lost; reconnecting");
                    self.set_health(|h| {
                        h.listening = false;
                        h.last_error = Some(e);
                    });
                }
            }
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_secs(2));
        }
    }

    /// One connection's life. `Ok` only when the sink is gone.
    async fn listen_once(&self, sink: &Weak<dyn ChangeSink>) -> Result<(), String> {
        let (client, mut connection) = self
            .inner
            .cfg
            .connect(tokio_postgres::NoTls)
            .await
            .map_err(|e| format!("connect: {}", pg::error_text(&e)))?;
        let (note_tx, mut notes) = tokio::sync::mpsc::unbounded_channel::<String>();
        let driver = tokio::spawn(async move {
            loop {
                match std::future::poll_fn(|cx| connection.poll_message(cx)).await {
                    Some(Ok(AsyncMessage::Notification(n))) => {
                        if note_tx.send(n.payload().to_string()).is_err() {
                            return;
                        }
                    }
                    Some(Ok(_)) => {}
                    Some(Err(e)) => {
                        tracing::debug!(error = %e, "control listener connection ended");
                        return;
                    }
                    None => return,
                }
            }
        });
        let result = self.follow(&client, sink, &mut notes).await;
        driver.abort();
        result
    }

    async fn follow(
        &self,
        client: &tokio_postgres::Client,
        sink: &Weak<dyn ChangeSink>,
        notes: &mut tokio::sync::mpsc::UnboundedReceiver<String>,
    ) -> Result<(), String> {
        let err = |e: tokio_postgres::Error| pg::error_text(&e);
        client
            .batch_execute(&format!("LISTEN {}", self.inner.channel))
            .await
            .map_err(err)?;
        // Whatever changed while we were away: a full reload.
        self.reload(client, sink, true).await?;
        if let Some(s) = sink.upgrade() {
            s.notified("destinations");
        }
        self.set_health(|h| h.listening = true);
        tracing::debug!("control database listener connected");
        let mut tick = tokio::time::interval(self.inner.reload_interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tick.tick().await;
        let mut ticks = 0u32;
        loop {
            if sink.strong_count() == 0 {
                return Ok(());
            }
            tokio::select! {
                note = notes.recv() => {
                    let Some(first) = note else {
                        return Err("the listener connection closed".into());
                    };
                    // Coalesce a burst into one reload.
                    let mut reload_sources = false;
                    let mut reload_identities = false;
                    let mut learnt = Vec::new();
                    let mut next = Some(first);
                    while let Some(payload) = next {
                        match payload.split_once(':') {
                            Some(("identities", json)) => {
                                match serde_json::from_str::<Vec<(String, String)>>(json) {
                                    Ok(pairs) => learnt.extend(pairs),
                                    Err(_) => reload_identities = true,
                                }
                            }
                            _ if payload == "identities" => reload_identities = true,
                            _ if payload == "destinations" => {
                                if let Some(s) = sink.upgrade() {
                                    s.notified("destinations");
                                }
                            }
                            _ => reload_sources = true,
                        }
                        next = notes.try_recv().ok();
                    }
                    if !learnt.is_empty()
                        && let Some(s) = sink.upgrade()
                    {
                        s.learn_identities(learnt);
                    }
                    if reload_sources || reload_identities {
                        self.reload(client, sink, reload_identities).await?;
                    }
                }
                _ = tick.tick() => {
                    ticks += 1;
                    let identities = ticks.is_multiple_of(IDENTITY_RELOAD_EVERY);
                    self.reload(client, sink, identities).await?;
                }
            }
        }
    }

    async fn reload(
        &self,
        client: &tokio_postgres::Client,
        sink: &Weak<dyn ChangeSink>,
        identities: bool,
    ) -> Result<(), String> {
        let Some(s) = sink.upgrade() else {
            return Ok(());
        };
        let token = s.reload_token();
        match load(client, &self.inner.schema, identities).await {
            Ok(snapshot) => {
                s.apply(token, snapshot);
                self.set_health(|h| {
                    h.last_ok = Some(Instant::now());
                    h.last_error = None;
                });
                Ok(())
            }
            Err(e) => Err(format!("reload: {}", pg::error_text(&e))),
        }
    }
}

impl ControlStore for PgControlStore {
    fn kind(&self) -> &'static str {
        "postgres"
    }

    fn load(&self, identities: bool) -> Result<Snapshot, ApiError> {
        let pool = self.inner.pool.clone();
        let schema = self.inner.schema.clone();
        self.block(async move {
            let client = pool.get().await.map_err(pool_error)?;
            load(&client, &schema, identities)
                .await
                .map_err(ApiError::from)
        })
    }

    fn insert_source(&self, source: &Source) -> Result<(), ApiError> {
        let s = source.clone();
        let result = self.transaction(Some("sources".into()), move |tx, schema| {
            Box::pin(async move {
                tx.execute(
                    &format!(
                        "INSERT INTO {schema}.sources (id, type, name, schema, write_key, enabled, settings, created_at)
                         VALUES ($1, $2, $3, $4, $5, $6, $7, $8)"
                    ),
                    &[
                        &s.id,
                        &s.kind.as_str(),
                        &s.name,
                        &s.schema,
                        &s.write_key,
                        &s.enabled,
                        &s.settings.to_string(),
                        &s.created_at.to_rfc3339(),
                    ],
                )
                .await
                .map(|_| ())
            })
        });
        match result {
            Err(ApiError::Conflict(_)) => Err(ApiError::Conflict(format!(
                "schema {:?} is already used by another source",
                source.schema
            ))),
            other => other,
        }
    }

    fn update_source(&self, source: &Source) -> Result<(), ApiError> {
        let s = source.clone();
        let n = self.transaction(Some("sources".into()), move |tx, schema| {
            Box::pin(async move {
                tx.execute(
                    &format!(
                        "UPDATE {schema}.sources SET name = $2, write_key = $3, enabled = $4, settings = $5
                         WHERE id = $1"
                    ),
                    &[&s.id, &s.name, &s.write_key, &s.enabled, &s.settings.to_string()],
                )
                .await
            })
        })?;
        if n == 0 {
            return Err(ApiError::NotFound(format!("no source {:?}", source.id)));
        }
        Ok(())
    }

    fn delete_source(&self, id: &str) -> Result<(), ApiError> {
        let id = id.to_string();
        self.transaction(Some("sources".into()), move |tx, schema| {
            Box::pin(async move {
                tx.execute(
                    &format!("DELETE FROM {schema}.sources WHERE id = $1"),
                    &[&id],
                )
                .await?;
                tx.execute(
                    &format!("DELETE FROM {schema}.unmapped_webhooks WHERE source_id = $1"),
                    &[&id],
                )
                .await?;
                tx.execute(
                    &format!("DELETE FROM {schema}.api_sync WHERE source_id = $1"),
                    &[&id],
                )
                .await
                .map(|_| ())
            })
        })
    }

    fn write_identities(&self, pairs: &[(String, String)]) -> Result<(), ApiError> {
        let payload = format!(
            "identities:{}",
            serde_json::to_string(pairs).unwrap_or_default()
        );
        let payload = if payload.len() <= MAX_PAYLOAD {
            payload
        } else {
            "identities".to_string()
        };
        let emails: Vec<String> = pairs.iter().map(|p| p.0.clone()).collect();
        let users: Vec<String> = pairs.iter().map(|p| p.1.clone()).collect();
        self.transaction(Some(payload), move |tx, schema| {
            Box::pin(async move {
                tx.execute(
                    &format!(
                        "INSERT INTO {schema}.identities (email, user_id, updated_at)
                         SELECT e, u, now() FROM unnest($1::text[], $2::text[]) AS t(e, u)
                         ON CONFLICT (email) DO UPDATE
                         SET user_id = excluded.user_id, updated_at = excluded.updated_at"
                    ),
                    &[&emails, &users],
                )
                .await
                .map(|_| ())
            })
        })
    }

    fn write_last_events(&self, events: &[(String, String)]) -> Result<(), ApiError> {
        let ids: Vec<String> = events.iter().map(|e| e.0.clone()).collect();
        let texts: Vec<String> = events.iter().map(|e| e.1.clone()).collect();
        self.transaction(None, move |tx, schema| {
            Box::pin(async move {
                tx.execute(
                    &format!(
                        "UPDATE {schema}.sources s SET last_event = t.le
                         FROM unnest($1::text[], $2::text[]) AS t(id, le) WHERE s.id = t.id"
                    ),
                    &[&ids, &texts],
                )
                .await
                .map(|_| ())
            })
        })
    }

    fn record_unmapped(&self, source_id: &str, entry: &Value, keep: usize) -> Result<(), ApiError> {
        let id = source_id.to_string();
        let entry = entry.to_string();
        self.transaction(None, move |tx, schema| {
            Box::pin(async move {
                tx.execute(
                    &format!(
                        "INSERT INTO {schema}.unmapped_webhooks (source_id, entry) VALUES ($1, $2)"
                    ),
                    &[&id, &entry],
                )
                .await?;
                tx.execute(
                    &format!(
                        "DELETE FROM {schema}.unmapped_webhooks WHERE source_id = $1 AND id <= (
                            SELECT id FROM {schema}.unmapped_webhooks WHERE source_id = $1
                            ORDER BY id DESC LIMIT 1 OFFSET $2)"
                    ),
                    &[&id, &(keep as i64)],
                )
                .await
                .map(|_| ())
            })
        })
    }

    fn unmapped(&self, source_id: &str, limit: usize) -> Result<Vec<Value>, ApiError> {
        let id = source_id.to_string();
        let rows: Vec<String> = self.transaction(None, move |tx, schema| {
            Box::pin(async move {
                let rows = tx
                    .query(
                        &format!(
                            "SELECT entry FROM {schema}.unmapped_webhooks WHERE source_id = $1
                             ORDER BY id DESC LIMIT $2"
                        ),
                        &[&id, &(limit as i64)],
                    )
                    .await?;
                Ok(rows.iter().map(|r| r.get(0)).collect())
            })
        })?;
        Ok(rows
            .iter()
            .filter_map(|t| serde_json::from_str(t).ok())
            .collect())
    }

    fn sync_state(&self, source_id: &str) -> Result<Option<String>, ApiError> {
        let id = source_id.to_string();
        self.transaction(None, move |tx, schema| {
            Box::pin(async move {
                let row = tx
                    .query_opt(
                        &format!("SELECT state FROM {schema}.api_sync WHERE source_id = $1"),
                        &[&id],
                    )
                    .await?;
                Ok(row.map(|r| r.get(0)))
            })
        })
    }

    fn save_sync_state(&self, source_id: &str, state: &str) -> Result<(), ApiError> {
        let id = source_id.to_string();
        let state = state.to_string();
        self.transaction(None, move |tx, schema| {
            Box::pin(async move {
                tx.execute(
                    &format!(
                        "INSERT INTO {schema}.api_sync (source_id, state, updated_at)
                         VALUES ($1, $2, now())
                         ON CONFLICT (source_id) DO UPDATE
                         SET state = excluded.state, updated_at = excluded.updated_at"
                    ),
                    &[&id, &state],
                )
                .await
                .map(|_| ())
            })
        })
    }

    fn create_session(&self, hash: &str, csrf: &str, ttl: Duration) -> Result<(), ApiError> {
        let (hash, csrf) = (hash.to_string(), csrf.to_string());
        let ttl_secs = ttl.as_secs_f64();
        self.transaction(None, move |tx, schema| {
            Box::pin(async move {
                tx.execute(
                    &format!("DELETE FROM {schema}.console_sessions WHERE expires_at <= now()"),
                    &[],
                )
                .await?;
                tx.execute(
                    &format!(
                        "INSERT INTO {schema}.console_sessions (id_hash, csrf, expires_at)
                         VALUES ($1, $2, now() + make_interval(secs => $3))"
                    ),
                    &[&hash, &csrf, &ttl_secs],
                )
                .await
                .map(|_| ())
            })
        })
    }

    fn session(&self, hash: &str) -> Result<Option<String>, ApiError> {
        let hash = hash.to_string();
        let pool = self.inner.pool.clone();
        let schema = self.inner.schema.clone();
        // One statement on a pooled connection (no transaction round trips): it is
        // asked on every console page.
        self.block(async move {
            let client = pool.get().await.map_err(pool_error)?;
            let st = client
                .prepare_cached(&format!(
                    "SELECT csrf FROM {schema}.console_sessions
                     WHERE id_hash = $1 AND expires_at > now()"
                ))
                .await
                .map_err(ApiError::from)?;
            let row = client
                .query_opt(&st, &[&hash])
                .await
                .map_err(ApiError::from)?;
            Ok(row.map(|r| r.get(0)))
        })
    }

    fn delete_session(&self, hash: &str) -> Result<(), ApiError> {
        let hash = hash.to_string();
        self.transaction(None, move |tx, schema| {
            Box::pin(async move {
                tx.execute(
                    &format!("DELETE FROM {schema}.console_sessions WHERE id_hash = $1"),
                    &[&hash],
                )
                .await
                .map(|_| ())
            })
        })
    }

    fn exists(&self, id: &str) -> Result<bool, ApiError> {
        let id = id.to_string();
        self.transaction(None, move |tx, schema| {
            Box::pin(async move {
                tx.query_opt(
                    &format!("SELECT 1 FROM {schema}.sources WHERE id = $1"),
                    &[&id],
                )
                .await
                .map(|r| r.is_some())
            })
        })
    }

    fn health(&self) -> Result<(), String> {
        let h = self.inner.health.lock().unwrap_or_else(|p| p.into_inner());
        let stale = self.inner.reload_interval.max(Duration::from_secs(1)) * 3;
        if !h.listening {
            return Err(format!(
                "control database unreachable: {}",
                h.last_error.as_deref().unwrap_or("not connected yet")
            ));
        }
        match h.last_ok {
            Some(t) if t.elapsed() <= stale => Ok(()),
            _ => Err(format!(
                "control database: no successful reload for {}s{}",
                h.last_ok.map_or(0, |t| t.elapsed().as_secs()),
                h.last_error
                    .as_deref()
                    .map(|e| format!(" ({e})"))
                    .unwrap_or_default()
            )),
        }
    }

    fn watch(&self, sink: Weak<dyn ChangeSink>) {
        let me = self.clone();
        self.inner.rt.spawn(me.listen(sink));
    }
}
