//! Test harness: a real `SqliteLog` in a temporary directory, a source → schema
//! catalog, and a warehouse URL (a SQLite directory, or the local PostgreSQL with a
//! per-run schema prefix that is dropped afterwards).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use tempfile::TempDir;
use tributary_eventlog::{AppendStatus, CallType, EventLog, NewRecord, SqliteLog, SqliteLogConfig};
use tributary_warehouse::{QueryResult, SchemaCatalog, Warehouse, WarehouseConfig};

pub const PG_URL: &str = "postgres://postgres@127.0.0.1:5432/test";

/// Source id → schema, changeable while the warehouse runs.
#[derive(Default)]
pub struct MapCatalog(Mutex<HashMap<String, String>>);

impl SchemaCatalog for MapCatalog {
    fn schema_for(&self, source_id: &str) -> Option<String> {
        self.0.lock().expect("catalog lock").get(source_id).cloned()
    }
}

pub struct Harness {
    pub dir: TempDir,
    pub log: Arc<SqliteLog>,
    pub catalog: Arc<MapCatalog>,
    pub url: String,
    /// Prepended to every schema name (empty on SQLite).
    pub prefix: String,
    pub state_schema: String,
    pub postgres: bool,
}

impl Harness {
    pub async fn sqlite() -> Harness {
        let dir = tempfile::tempdir().expect("tempdir");
        let url = format!("sqlite://{}", dir.path().join("warehouse").display());
        Self::new(dir, url, String::new(), "tributary".into(), false).await
    }

    /// The local PostgreSQL, or `None` after printing why the test is skipped
    /// (panics instead when `TRIBUTARY_TEST_REQUIRE=all`).
    pub async fn postgres(test: &str) -> Option<Harness> {
        if let Err(e) = pg_connect().await {
            if std::env::var("TRIBUTARY_TEST_REQUIRE").as_deref() == Ok("all") {
                panic!(
                    "{test}: PostgreSQL not reachable at 127.0.0.1:5432 ({e}) and TRIBUTARY_TEST_REQUIRE=all"
                );
            }
            // Straight to stderr, not `println!`: libtest's capture would hide it.
            use std::io::Write;
            let _ = writeln!(
                std::io::stderr().lock(),
                "SKIP {test}: PostgreSQL not reachable at 127.0.0.1:5432 ({e})"
            );
            return None;
        }
        let dir = tempfile::tempdir().expect("tempdir");
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .expect("clock")
            .as_nanos();
        let prefix = format!("it{}_{}_", std::process::id(), nanos % 1_000_000_000);
        let state = format!("{prefix}state");
        Some(Self::new(dir, PG_URL.to_string(), prefix, state, true).await)
    }

    async fn new(
        dir: TempDir,
        url: String,
        prefix: String,
        state_schema: String,
        postgres: bool,
    ) -> Harness {
        let log = SqliteLog::open(SqliteLogConfig {
            path: dir.path().join("events.db"),
            ..Default::default()
        })
        .await
        .expect("open log");
        Harness {
            dir,
            log: Arc::new(log),
            catalog: Arc::new(MapCatalog::default()),
            url,
            prefix,
            state_schema,
            postgres,
        }
    }

    /// Another data dir's log (a new, empty `SqliteLog` with its own id) loading into
    /// the same warehouse, with the same catalog.
    pub async fn with_new_log(&self) -> Harness {
        let dir = tempfile::tempdir().expect("tempdir");
        let log = SqliteLog::open(SqliteLogConfig {
            path: dir.path().join("events.db"),
            ..Default::default()
        })
        .await
        .expect("open log");
        Harness {
            dir,
            log: Arc::new(log),
            catalog: self.catalog.clone(),
            url: self.url.clone(),
            prefix: self.prefix.clone(),
            state_schema: self.state_schema.clone(),
            postgres: self.postgres,
        }
    }

    pub fn config(&self) -> WarehouseConfig {
        let mut c = WarehouseConfig::new(self.url.clone());
        c.batch_interval = Duration::from_millis(50);
        c.state_schema = self.state_schema.clone();
        c
    }

    /// The schema name a test calls `base`.
    pub fn schema(&self, base: &str) -> String {
        format!("{}{base}", self.prefix)
    }

    /// Routes `source` to the schema called `base`.
    pub fn source(&self, source: &str, base: &str) {
        self.catalog
            .0
            .lock()
            .expect("catalog lock")
            .insert(source.to_string(), self.schema(base));
    }

    pub async fn open(&self) -> Warehouse {
        self.open_with(self.config()).await
    }

    pub async fn open_with(&self, config: WarehouseConfig) -> Warehouse {
        let log: Arc<dyn EventLog> = self.log.clone();
        let catalog: Arc<dyn SchemaCatalog> = self.catalog.clone();
        Warehouse::open(config, log, catalog)
            .await
            .expect("open warehouse")
    }

    /// Appends normalized messages of one source; returns the highest seq stored.
    pub async fn append(&self, source: &str, messages: Vec<Value>) -> u64 {
        let batch = messages
            .into_iter()
            .map(|m| NewRecord {
                source_id: source.to_string(),
                message_id: m["messageId"].as_str().expect("messageId").to_string(),
                call_type: m["type"].as_str().and_then(CallType::parse).expect("type"),
                user_id: m["userId"].as_str().map(str::to_string),
                anonymous_id: m["anonymousId"].as_str().map(str::to_string),
                event: m
                    .get("event")
                    .or_else(|| m.get("name"))
                    .and_then(Value::as_str)
                    .map(str::to_string),
                received_at_ms: 1_795_000_000_000,
                payload: m.to_string(),
            })
            .collect();
        let statuses = self.log.append(batch).await.expect("append");
        statuses
            .iter()
            .filter_map(|s| match s {
                AppendStatus::Stored(seq) => Some(*seq),
                AppendStatus::Duplicate => None,
            })
            .max()
            .unwrap_or(0)
    }

    /// Waits until the warehouse has committed everything up to `seq`.
    pub async fn wait_loaded(&self, wh: &Warehouse, seq: u64) {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let lag = wh.lag();
            if lag.loaded_seq >= seq {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "the loader did not reach seq {seq} (lag {lag:?})"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    pub async fn query(&self, wh: &Warehouse, sql: &str) -> QueryResult {
        match wh.query(sql).await {
            Ok(r) => r,
            Err(e) => panic!("query {sql:?} failed: {e}"),
        }
    }

    pub async fn rows(&self, wh: &Warehouse, sql: &str) -> Vec<Vec<Value>> {
        self.query(wh, sql).await.rows
    }

    pub async fn count(&self, wh: &Warehouse, table: &str) -> i64 {
        let rows = self
            .rows(wh, &format!("select count(*) from {table}"))
            .await;
        rows[0][0].as_i64().expect("count")
    }

    /// Drops this run's PostgreSQL schemas.
    pub async fn cleanup(&self) {
        if !self.postgres {
            return;
        }
        let Ok(client) = pg_connect().await else {
            return;
        };
        let schemas: Vec<String> = client
            .query(
                "SELECT nspname::text FROM pg_namespace WHERE starts_with(nspname, $1)",
                &[&self.prefix],
            )
            .await
            .map(|rows| rows.iter().map(|r| r.get(0)).collect())
            .unwrap_or_default();
        for s in schemas {
            let _ = client
                .batch_execute(&format!("DROP SCHEMA IF EXISTS \"{s}\" CASCADE"))
                .await;
        }
    }
}

pub async fn pg_connect() -> Result<tokio_postgres::Client, String> {
    let mut cfg: tokio_postgres::Config = PG_URL.parse().map_err(|e| format!("{e}"))?;
    cfg.connect_timeout(Duration::from_secs(3));
    let (client, conn) = cfg
        .connect(tokio_postgres::NoTls)
        .await
        .map_err(|e| e.to_string())?;
    tokio::spawn(conn);
    Ok(client)
}

/// A normalized track message as ingest stores it.
pub fn track(message_id: &str, event: &str, properties: Value) -> Value {
    json!({
        "type": "track",
        "messageId": message_id,
        "event": event,
        "anonymousId": "anon-1",
        "properties": properties,
        "context": {"library": {"name": "analytics-node", "version": "6.0.0"}, "ip": "203.0.113.9"},
        "integrations": {},
        "timestamp": "2026-11-27T05:10:53.123Z",
        "originalTimestamp": "2026-11-27T05:10:53.000Z",
        "sentAt": "2026-11-27T05:10:53.100Z",
        "receivedAt": "2026-11-27T05:10:54.000Z"
    })
}

/// Runs a PostgreSQL scenario and drops its schemas whatever happens.
pub async fn with_postgres<F>(test: &str, body: impl FnOnce(Arc<Harness>) -> F)
where
    F: std::future::Future<Output = ()>,
{
    use futures::FutureExt;
    let Some(h) = Harness::postgres(test).await else {
        return;
    };
    let h = Arc::new(h);
    let result = std::panic::AssertUnwindSafe(body(h.clone()))
        .catch_unwind()
        .await;
    h.cleanup().await;
    if let Err(panic) = result {
        std::panic::resume_unwind(panic);
    }
}
