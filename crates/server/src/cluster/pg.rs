//! PostgreSQL plumbing shared by the control plane and the leases: connection
//! settings (every connection names its node in `application_name`, so an operator
//! — or a test — can find and terminate one node's backends), pools, and the one
//! idempotent migration of the control schema.
//!
//! The migration runs under a transaction-scoped advisory lock, so nodes that start
//! together do not race each other's `CREATE TABLE` (which PostgreSQL answers with a
//! unique violation on its catalog).

use std::str::FromStr;
use std::time::Duration;

use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod, Runtime};
use tokio_postgres::NoTls;

/// Checks a control schema name: `[a-z_][a-z0-9_]*`, at most 48 bytes (so derived
/// names such as the notification channel stay under PostgreSQL's 63).
pub fn validate_schema(schema: &str) -> Result<(), String> {
    let ok = !schema.is_empty()
        && schema.len() <= 48
        && schema
            .bytes()
            .next()
            .is_some_and(|b| b.is_ascii_lowercase() || b == b'_')
        && schema
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
        && !schema.starts_with("pg_");
    if ok {
        Ok(())
    } else {
        Err(format!(
            "control schema {schema:?} must match [a-z_][a-z0-9_]* (at most 48 bytes, not pg_…)"
        ))
    }
}

/// The connection settings of `url`, named `tributary <node_id>` for
/// `pg_stat_activity`, with a connect timeout and TCP keepalives (a peer that
/// vanishes without closing the connection is noticed within a minute).
pub fn pg_config(url: &str, node_id: &str) -> Result<tokio_postgres::Config, String> {
    let mut cfg = tokio_postgres::Config::from_str(url).map_err(|e| format!("control url: {e}"))?;
    if cfg.get_connect_timeout().is_none() {
        cfg.connect_timeout(Duration::from_secs(3));
    }
    cfg.application_name(application_name(node_id));
    cfg.keepalives(true)
        .keepalives_idle(Duration::from_secs(10))
        .keepalives_interval(Duration::from_secs(5))
        .keepalives_retries(3)
        .tcp_user_timeout(Duration::from_secs(20));
    Ok(cfg)
}

/// The `application_name` of a node's connections.
pub fn application_name(node_id: &str) -> String {
    let mut name = format!("tributary {node_id}");
    // PostgreSQL truncates at 63 bytes; do it on a char boundary ourselves.
    while name.len() > 63 {
        name.pop();
    }
    name
}

/// A pool of `size` connections. Broken connections (a terminated backend, a
/// restarted server) are noticed on checkout and replaced.
pub fn pool(cfg: tokio_postgres::Config, size: usize) -> Result<Pool, String> {
    let manager = Manager::from_config(
        cfg,
        NoTls,
        ManagerConfig {
            recycling_method: RecyclingMethod::Fast,
        },
    );
    Pool::builder(manager)
        .max_size(size)
        .runtime(Runtime::Tokio1)
        .create_timeout(Some(Duration::from_secs(3)))
        .wait_timeout(Some(Duration::from_secs(5)))
        .recycle_timeout(Some(Duration::from_secs(2)))
        .build()
        .map_err(|e| format!("control pool: {e}"))
}

/// An error's text with its causes (tokio-postgres puts the server's message in
/// the source chain).
pub fn error_text(e: &(dyn std::error::Error + 'static)) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        let c = cause.to_string();
        if !text.contains(&c) {
            text.push_str(": ");
            text.push_str(&c);
        }
        source = cause.source();
    }
    text
}

/// The control schema's tables: sources, identities, unmapped webhooks, API sync state,
/// destination definitions (the control plane), leases and members (ownership), positions (the destinations'
/// consumer registry, with what the log's size cap deleted before each consumer read it).
const TABLES: &str = "
CREATE TABLE IF NOT EXISTS {s}.sources (
    id text PRIMARY KEY, type text NOT NULL, name text NOT NULL,
    schema text NOT NULL UNIQUE, write_key text NOT NULL UNIQUE,
    enabled boolean NOT NULL, settings text NOT NULL, created_at text NOT NULL,
    last_event text);
CREATE TABLE IF NOT EXISTS {s}.identities (
    email text PRIMARY KEY, user_id text NOT NULL,
    updated_at timestamptz NOT NULL DEFAULT now());
CREATE TABLE IF NOT EXISTS {s}.unmapped_webhooks (
    id bigserial PRIMARY KEY, source_id text NOT NULL, entry text NOT NULL);
CREATE INDEX IF NOT EXISTS unmapped_webhooks_source ON {s}.unmapped_webhooks (source_id, id);
CREATE TABLE IF NOT EXISTS {s}.api_sync (
    source_id text PRIMARY KEY, state text NOT NULL,
    updated_at timestamptz NOT NULL DEFAULT now());
CREATE TABLE IF NOT EXISTS {s}.leases (
    consumer text NOT NULL, partition integer NOT NULL, owner text NOT NULL,
    epoch bigint NOT NULL, expires_at timestamptz NOT NULL,
    PRIMARY KEY (consumer, partition));
CREATE TABLE IF NOT EXISTS {s}.members (
    consumer text NOT NULL, node_id text NOT NULL, seen_at timestamptz NOT NULL,
    PRIMARY KEY (consumer, node_id));
CREATE TABLE IF NOT EXISTS {s}.destinations (
    id text PRIMARY KEY, name text NOT NULL, config text NOT NULL,
    source_ids text NOT NULL, filters text NOT NULL, enabled boolean NOT NULL,
    created_at bigint NOT NULL, updated_at bigint NOT NULL);
CREATE TABLE IF NOT EXISTS {s}.positions (
    consumer text NOT NULL, log_id text NOT NULL, partition integer NOT NULL,
    seq bigint NOT NULL, epoch bigint NOT NULL, pinned boolean NOT NULL,
    updated_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (consumer, log_id, partition));
ALTER TABLE {s}.positions ADD COLUMN IF NOT EXISTS dropped bigint NOT NULL DEFAULT 0;
ALTER TABLE {s}.positions ADD COLUMN IF NOT EXISTS gap_from bigint;
ALTER TABLE {s}.positions ADD COLUMN IF NOT EXISTS gap_to bigint;
ALTER TABLE {s}.positions ADD COLUMN IF NOT EXISTS gap_at bigint;
";

/// Creates the control schema and its tables when missing (idempotent; nodes
/// starting together are serialized by an advisory lock).
pub async fn migrate(
    client: &mut tokio_postgres::Client,
    schema: &str,
) -> Result<(), tokio_postgres::Error> {
    migrate_tables(client, schema, TABLES).await
}

/// Runs `tables` (DDL with `{s}` for the quoted schema, idempotent) in the control
/// schema, created when missing, under the advisory lock every part of the control
/// schema migrates under (the leases, the delivery ledger, console sessions), so
/// nodes starting together do not race. `schema` is checked by [`validate_schema`].
pub(crate) async fn migrate_tables(
    client: &mut tokio_postgres::Client,
    schema: &str,
    tables: &str,
) -> Result<(), tokio_postgres::Error> {
    let tx = client.transaction().await?;
    tx.execute(
        "SELECT pg_advisory_xact_lock(hashtext('tributary control ' || $1))",
        &[&schema],
    )
    .await?;
    tx.batch_execute(&format!("CREATE SCHEMA IF NOT EXISTS \"{schema}\""))
        .await?;
    tx.batch_execute(&tables.replace("{s}", &format!("\"{schema}\"")))
        .await?;
    tx.commit().await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schema_names() {
        for ok in ["tributary_control", "_x", "c1"] {
            assert!(validate_schema(ok).is_ok(), "{ok}");
        }
        for bad in ["", "1a", "A", "a-b", "pg_x", "a\"b", &"a".repeat(49)] {
            assert!(validate_schema(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn application_name_is_bounded() {
        assert_eq!(application_name("n1"), "tributary n1");
        assert_eq!(application_name(&"é".repeat(60)).len(), 62);
    }
}
