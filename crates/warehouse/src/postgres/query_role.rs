//! The role `POST /api/v1/query` runs as on PostgreSQL, and its pool.
//!
//! Invariants:
//! - A query never runs as the loader's role. It runs on its own pool, logged in
//!   either as [`WarehouseConfig::query_url`](crate::WarehouseConfig::query_url)'s
//!   user, or — without one — as a role Tributary creates (idempotently, under the
//!   migrations' advisory lock): `tributary_query_<16 hex>` (a hash of the database
//!   and the state schema, so warehouses sharing a cluster never share one), `LOGIN
//!   NOSUPERUSER NOCREATEDB NOCREATEROLE NOREPLICATION NOBYPASSRLS NOINHERIT`, member
//!   of no role, with a random 256-bit password kept in `<state>.query_role` (readable
//!   by the loader's role only: `REVOKE ALL … FROM PUBLIC`). Its attributes and
//!   password are re-asserted whenever the pool is built.
//! - Before every query, every warehouse schema (a schema holding
//!   `tributary_discards`) where the query role lacks `USAGE` or `SELECT` on a table
//!   is granted `USAGE`, `SELECT ON ALL TABLES` and `ALTER DEFAULT PRIVILEGES … GRANT
//!   SELECT ON TABLES` (so tables the loader creates later are readable). Nothing
//!   else is granted; the state schema is not. A schema the loader's role may not
//!   grant is logged and skipped.
//! - Before every query, the session's role is checked: a superuser, a role with
//!   `CREATEROLE`/`CREATEDB`/`REPLICATION`/`BYPASSRLS`, a member of any `pg_*` role
//!   (`pg_read_server_files`, `pg_execute_server_program`, `pg_database_owner`, …)
//!   or the loader's own role gets [`WarehouseError::QueryRoleUnsafe`] and the query
//!   is not run.

use std::fmt::Write as _;

use deadpool_postgres::Pool;
use sha2::{Digest, Sha256};
use tokio::sync::Mutex;

use super::build_pool;
use crate::WarehouseError;
use crate::naming::quote;

fn unavailable(e: impl std::fmt::Display) -> WarehouseError {
    WarehouseError::Unavailable(e.to_string())
}

/// A failed statement of Tributary's own, with the server's message.
fn pg(e: tokio_postgres::Error) -> WarehouseError {
    WarehouseError::Unavailable(db_message(&e))
}

fn db_message(e: &tokio_postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => format!("{}: {}", db.code().code(), db.message()),
        None => e.to_string(),
    }
}

/// Who queries run as, and the pool of their sessions once it is built.
pub(crate) struct QueryRole {
    /// The loader's credentials, read-only sessions: used to set the role up.
    admin: Pool,
    /// Sessions for queries: `query_url`'s, or the loader's target with the role's
    /// user and password filled in.
    config: tokio_postgres::Config,
    /// Whether Tributary creates the role (no `query_url`).
    managed: bool,
    state_schema: String,
    ready: Mutex<Option<Ready>>,
}

#[derive(Clone)]
struct Ready {
    pool: Pool,
    role: String,
    loader_role: String,
}

impl QueryRole {
    /// `reader` is the loader's target with read-only sessions; `query_url` the
    /// separate login, if configured.
    pub(crate) fn new(
        admin: Pool,
        reader: tokio_postgres::Config,
        query_url: Option<&str>,
        state_schema: &str,
    ) -> Result<QueryRole, WarehouseError> {
        let (config, managed) = match query_url {
            Some(url) => {
                let mut cfg: tokio_postgres::Config = url
                    .parse()
                    .map_err(|e| WarehouseError::InvalidConfig(format!("query_url: {e}")))?;
                if cfg.get_user().is_none() {
                    return Err(WarehouseError::InvalidConfig(
                        "query_url must name its user".into(),
                    ));
                }
                if cfg.get_connect_timeout().is_none() {
                    cfg.connect_timeout(std::time::Duration::from_secs(5));
                }
                let options = cfg.get_options().unwrap_or_default().to_string();
                cfg.options(format!("{options} -c default_transaction_read_only=on").trim());
                (cfg, false)
            }
            None => (reader, true),
        };
        let mut config = config;
        config.application_name("tributary-query");
        Ok(QueryRole {
            admin,
            config,
            managed,
            state_schema: state_schema.to_string(),
            ready: Mutex::new(None),
        })
    }

    /// The pool of query sessions (built on first use; a failure is retried on the
    /// next call), with the warehouse schemas granted to the role.
    pub(crate) async fn pool(&self) -> Result<(Pool, String, String), WarehouseError> {
        let ready = {
            let mut guard = self.ready.lock().await;
            match guard.as_ref() {
                Some(r) => r.clone(),
                None => {
                    let r = self.build().await?;
                    *guard = Some(r.clone());
                    r
                }
            }
        };
        self.grant(&ready.role).await?;
        Ok((ready.pool, ready.role, ready.loader_role))
    }

    /// Closes the query pool, if built.
    pub(crate) fn close(&self) {
        if let Ok(guard) = self.ready.try_lock()
            && let Some(r) = guard.as_ref()
        {
            r.pool.close();
        }
    }

    async fn build(&self) -> Result<Ready, WarehouseError> {
        let mut client = self.admin.get().await.map_err(unavailable)?;
        let loader_role: String = client
            .query_one("SELECT current_user::text", &[])
            .await
            .map_err(pg)?
            .get(0);
        let mut config = self.config.clone();
        let role = if self.managed {
            let (role, password) = self.ensure_role(&mut client).await?;
            config.user(&role).password(password);
            role
        } else {
            config.get_user().unwrap_or_default().to_string()
        };
        let pool = build_pool(config, 4)?;
        Ok(Ready {
            pool,
            role,
            loader_role,
        })
    }

    /// Creates (or re-asserts) the managed role; returns its name and password.
    async fn ensure_role(
        &self,
        client: &mut deadpool_postgres::Object,
    ) -> Result<(String, String), WarehouseError> {
        let state = quote(&self.state_schema);
        let tx = client
            .build_transaction()
            .read_only(false)
            .start()
            .await
            .map_err(pg)?;
        tx.execute(
            "SELECT pg_advisory_xact_lock(hashtext('tributary-warehouse-migrations'))",
            &[],
        )
        .await
        .map_err(pg)?;
        let database: String = tx
            .query_one("SELECT current_database()::text", &[])
            .await
            .map_err(pg)?
            .get(0);
        let role = role_name(&database, &self.state_schema);
        tx.batch_execute(&format!(
            "CREATE SCHEMA IF NOT EXISTS {state};
             CREATE TABLE IF NOT EXISTS {state}.query_role (
                 role text PRIMARY KEY,
                 password text NOT NULL
             );
             REVOKE ALL ON {state}.query_role FROM PUBLIC;"
        ))
        .await
        .map_err(|e| setup_error(&e))?;
        let stored: Option<String> = tx
            .query_opt(
                &format!("SELECT password FROM {state}.query_role WHERE role = $1"),
                &[&role],
            )
            .await
            .map_err(pg)?
            .map(|r| r.get(0));
        let password = match stored {
            Some(p) if p.len() == 64 && p.bytes().all(|b| b.is_ascii_hexdigit()) => p,
            _ => {
                let p = random_password()?;
                tx.execute(
                    &format!(
                        "INSERT INTO {state}.query_role (role, password) VALUES ($1, $2)
                         ON CONFLICT (role) DO UPDATE SET password = EXCLUDED.password"
                    ),
                    &[&role, &p],
                )
                .await
                .map_err(pg)?;
                p
            }
        };
        let exists = tx
            .query_opt("SELECT 1 FROM pg_roles WHERE rolname = $1", &[&role])
            .await
            .map_err(pg)?
            .is_some();
        let verb = if exists { "ALTER" } else { "CREATE" };
        // The password is 64 hex digits: safe inside a literal.
        tx.batch_execute(&format!(
            "{verb} ROLE {r} WITH LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE NOREPLICATION
                 NOBYPASSRLS NOINHERIT PASSWORD '{password}';
             GRANT CONNECT ON DATABASE {db} TO {r};",
            r = quote(&role),
            db = quote(&database),
        ))
        .await
        .map_err(|e| setup_error(&e))?;
        if exists {
            // A role found from an earlier state: take back any membership.
            let granted: Vec<String> = tx
                .query(
                    "SELECT g.rolname::text FROM pg_auth_members m
                     JOIN pg_roles g ON g.oid = m.roleid
                     JOIN pg_roles r ON r.oid = m.member
                     WHERE r.rolname = $1",
                    &[&role],
                )
                .await
                .map_err(pg)?
                .iter()
                .map(|r| r.get(0))
                .collect();
            for g in granted {
                tx.batch_execute(&format!("REVOKE {} FROM {}", quote(&g), quote(&role)))
                    .await
                    .map_err(|e| setup_error(&e))?;
            }
        }
        tx.commit().await.map_err(pg)?;
        tracing::info!(role = %role, "warehouse query role ready");
        Ok((role, password))
    }

    /// Grants the warehouse schemas the role cannot fully read yet. Another node (or
    /// another warehouse in the same database) may grant or drop a schema at the same
    /// moment: grants are serialized by a transaction-level advisory lock, and a schema
    /// dropped between the listing and the grant (`3F000`) or a concurrent default-ACL
    /// insert (`23505`) just lists again, a few times.
    async fn grant(&self, role: &str) -> Result<(), WarehouseError> {
        let mut attempt = 0;
        loop {
            match self.grant_once(role).await {
                Err(GrantRace(e)) if attempt < 4 => {
                    attempt += 1;
                    tracing::debug!(error = %db_message(&e), attempt, "query role grant raced; listing again");
                }
                Err(GrantRace(e)) => return Err(pg(e)),
                Ok(r) => return r,
            }
        }
    }

    async fn grant_once(&self, role: &str) -> Result<Result<(), WarehouseError>, GrantRace> {
        let mut client = match self.admin.get().await {
            Ok(c) => c,
            Err(e) => return Ok(Err(unavailable(e))),
        };
        macro_rules! try_pg {
            ($e:expr) => {
                match $e {
                    Ok(v) => v,
                    Err(e) if is_grant_race(&e) => return Err(GrantRace(e)),
                    Err(e) => return Ok(Err(pg(e))),
                }
            };
        }
        let schemas: Vec<String> = try_pg!(
            client
                .query(
                    "SELECT n.nspname::text FROM pg_namespace n
                     WHERE EXISTS (SELECT 1 FROM pg_class d WHERE d.relnamespace = n.oid
                                   AND d.relname = 'tributary_discards')
                       AND (NOT has_schema_privilege($1, n.oid, 'USAGE')
                            OR EXISTS (SELECT 1 FROM pg_class c WHERE c.relnamespace = n.oid
                                       AND c.relkind IN ('r', 'p', 'v', 'm')
                                       AND NOT has_table_privilege($1, c.oid, 'SELECT')))
                     ORDER BY 1",
                    &[&role],
                )
                .await
        )
        .iter()
        .map(|r| r.get(0))
        .collect();
        if schemas.is_empty() {
            return Ok(Ok(()));
        }
        let r = quote(role);
        let mut sql = String::new();
        for s in &schemas {
            let s = quote(s);
            let _ = write!(
                sql,
                "ALTER DEFAULT PRIVILEGES IN SCHEMA {s} GRANT SELECT ON TABLES TO {r};
                 GRANT USAGE ON SCHEMA {s} TO {r};
                 GRANT SELECT ON ALL TABLES IN SCHEMA {s} TO {r};"
            );
        }
        let tx = try_pg!(client.build_transaction().read_only(false).start().await);
        try_pg!(
            tx.execute("SELECT pg_advisory_xact_lock($1)", &[&GRANT_LOCK_KEY])
                .await
        );
        match tx.batch_execute(&sql).await {
            Ok(()) => try_pg!(tx.commit().await),
            Err(e) if is_grant_race(&e) => return Err(GrantRace(e)),
            // A schema the loader's role does not own cannot be granted by it: the
            // query role cannot read it, which is no reason to refuse every query.
            Err(e) if e.code().is_some_and(|c| c.code().starts_with("42")) => {
                tracing::warn!(error = %db_message(&e), ?schemas, "cannot grant the query role");
            }
            Err(e) => return Ok(Err(pg(e))),
        }
        Ok(Ok(()))
    }
}

/// The advisory-lock key that serializes query-role grants (`"tributary grants"`).
const GRANT_LOCK_KEY: i64 = 0x7472_6962_6772_6e74;

/// A grant that lost a race with a concurrent grant or schema drop; listing again heals it.
struct GrantRace(tokio_postgres::Error);

/// A GRANT updates catalog rows (`pg_namespace`, `pg_class`, `pg_default_acl`) that the
/// loader's DDL or a concurrent `DROP SCHEMA` may change at the same time: PostgreSQL
/// then fails with "tuple concurrently updated/deleted" (`XX000`) rather than waiting.
fn is_grant_race(e: &tokio_postgres::Error) -> bool {
    match e.as_db_error() {
        Some(db) => match db.code().code() {
            "3F000" | "23505" | "40P01" | "40001" | "42P01" => true,
            "XX000" => db.message().contains("concurrently"),
            _ => false,
        },
        None => false,
    }
}

/// A setup statement the loader's role may not run (no `CREATEROLE`, not the owner).
fn setup_error(e: &tokio_postgres::Error) -> WarehouseError {
    match e.code().map(|c| c.code()) {
        Some(c) if c.starts_with("42") => WarehouseError::QueryRoleUnsafe(format!(
            "cannot set up the read-only query role with the loader's credentials ({}); \
             give the loader CREATEROLE or set warehouse.query_url to a read-only login",
            db_message(e)
        )),
        _ => WarehouseError::Unavailable(db_message(e)),
    }
}

/// The managed query role's name for a database and state schema.
pub fn role_name(database: &str, state_schema: &str) -> String {
    let digest = Sha256::digest(format!("{database}\0{state_schema}").as_bytes());
    format!("tributary_query_{}", &hex::encode(digest)[..16])
}

fn random_password() -> Result<String, WarehouseError> {
    let mut bytes = [0u8; 32];
    getrandom::fill(&mut bytes)
        .map_err(|e| WarehouseError::Unavailable(format!("no randomness: {e}")))?;
    Ok(hex::encode(bytes))
}

/// Refuses a session whose role can do more than read (see the module docs).
pub(crate) async fn check_session(
    client: &tokio_postgres::Client,
    loader_role: &str,
) -> Result<(), WarehouseError> {
    let row = client
        .query_one(
            "SELECT current_user::text, r.rolsuper, r.rolcreaterole, r.rolcreatedb,
                    r.rolreplication, r.rolbypassrls,
                    ARRAY(SELECT g.rolname::text FROM pg_roles g
                          WHERE g.rolname LIKE 'pg\\_%' AND g.oid <> r.oid
                            AND pg_has_role(r.oid, g.oid, 'MEMBER') ORDER BY 1)
             FROM pg_roles r WHERE r.rolname = current_user",
            &[],
        )
        .await
        .map_err(pg)?;
    let user: String = row.get(0);
    let mut bad = Vec::new();
    for (i, what) in [
        (1, "SUPERUSER"),
        (2, "CREATEROLE"),
        (3, "CREATEDB"),
        (4, "REPLICATION"),
        (5, "BYPASSRLS"),
    ] {
        if row.get::<_, bool>(i) {
            bad.push(what.to_string());
        }
    }
    let roles: Vec<String> = row.get(6);
    if !roles.is_empty() {
        bad.push(format!("member of {}", roles.join(", ")));
    }
    if user == loader_role {
        bad.push("the loader's own role".into());
    }
    if bad.is_empty() {
        Ok(())
    } else {
        Err(WarehouseError::QueryRoleUnsafe(format!(
            "queries would run as {user:?}, which is {}; queries are refused until \
             warehouse.query_url names a login that may only read the warehouse",
            bad.join(", ")
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn role_names_differ_by_database_and_state_schema() {
        let a = role_name("test", "tributary");
        assert!(a.starts_with("tributary_query_"));
        assert_eq!(a.len(), 32);
        assert_eq!(a, role_name("test", "tributary"));
        assert_ne!(a, role_name("test", "it1_state"));
        assert_ne!(a, role_name("other", "tributary"));
    }
}
