//! Writing a batch into PostgreSQL in one transaction.
//!
//! Order inside the transaction: lock the position row (`FOR UPDATE`) and stop if it
//! is already at or past the batch; per schema, create the schema and its discards
//! table when the loader does not know them, then per table run its DDL
//! (`CREATE TABLE IF NOT EXISTS`, `ADD COLUMN IF NOT EXISTS`, `ALTER COLUMN … TYPE
//! double precision`) and insert the rows newer than the position if their `id` is
//! absent: first a binary `COPY` straight into the table inside a savepoint (the
//! common case: no id is there yet, so every row goes in); if that meets a unique
//! violation the savepoint is rolled back and the rows are copied into a temporary
//! table (`ON COMMIT DROP`) and inserted with `INSERT … SELECT … ON CONFLICT ("id")
//! DO NOTHING RETURNING "id"`. `users` gets one merged row per user, upserted with
//! `COALESCE(EXCLUDED.c, u.c)` so later non-null traits win and nulls never erase;
//! discards of inserted rows are copied into `tributary_discards`; finally the
//! position moves and everything commits at once.
//!
//! Ahead (the loader's express lane for schemas stuck behind another schema's large
//! batch): the position is read without locking and not moved, nothing is skipped
//! as already loaded, and schema-level discards (table cap) are left to the regular
//! pass; rows go in only if their `id` is absent, as always, so when the regular pass
//! reaches these records it inserts nothing and records no discard twice.

use std::collections::{HashMap, HashSet};

use sha2::{Digest, Sha256};
use tokio_postgres::error::SqlState;

use super::copy::{self, CopyError};
use super::{classify, sql_type};
use crate::evolve::{Discard, LoadBatch, LoadRow, TableLoad, merge_users};
use crate::naming::{DISCARDS_TABLE, quote};
use crate::outcome::{ApplyStats, CONSUMER, LoadError, StateKey};
use crate::plan::TableKind;
use crate::stats::{PRIMARY_TABLES, Scope, day_of, email_needs_rebuild, is_email_table};
use crate::types::{Cell, ColumnType};

type Tx<'a> = deadpool_postgres::Transaction<'a>;

pub(super) async fn apply(
    client: &mut deadpool_postgres::Object,
    state: &str,
    key: &StateKey,
    batch: &LoadBatch,
    ahead: bool,
) -> Result<ApplyStats, LoadError> {
    let tx = client.transaction().await.map_err(classify)?;
    let lock = if ahead { "" } else { " FOR UPDATE" };
    let partition = key.partition as i32;
    let row = tx
        .query_one(
            &format!(
                "SELECT seq, epoch FROM {state}.loader_state
                 WHERE consumer = $1 AND log_id = $2 AND log_partition = $3{lock}"
            ),
            &[&CONSUMER, &key.log_id, &partition],
        )
        .await
        .map_err(classify)?;
    let position = row.get::<_, i64>(0).max(0) as u64;
    let recorded_epoch = row.get::<_, i64>(1).max(0) as u64;
    let mut stats = ApplyStats::default();
    if let Some(fence) = &batch.fence
        && recorded_epoch > fence.epoch
    {
        // A newer lease holder claimed this partition: this loader is a zombie.
        tx.rollback().await.map_err(classify)?;
        stats.fenced = true;
        return Ok(stats);
    }
    if !ahead && position >= batch.last_seq {
        tx.rollback().await.map_err(classify)?;
        stats.already_loaded = !batch.schemas.is_empty();
        return Ok(stats);
    }

    let mut temp_tables = 0usize;
    for load in &batch.schemas {
        let schema = quote(&load.schema);
        if !load.known_to_exist {
            tx.batch_execute(&format!(
                "CREATE SCHEMA IF NOT EXISTS {schema};
                 CREATE TABLE IF NOT EXISTS {schema}.{d} (
                     \"table_name\" text NOT NULL,
                     \"column_name\" text NOT NULL,
                     \"column_value\" text,
                     \"reason\" text NOT NULL,
                     \"row_id\" text,
                     \"received_at\" timestamptz,
                     \"uuid_ts\" timestamptz NOT NULL
                 );",
                d = quote(DISCARDS_TABLE)
            ))
            .await
            .map_err(classify)?;
        }
        // The counters (module `stats`): a schema without them is counted from its
        // raw tables at the end, else they move by what is inserted.
        let scope = Scope::postgres(&load.schema, state);
        let must_build = tx
            .execute(&scope.claim_built(), &[])
            .await
            .map_err(classify)?
            > 0;
        let mut email_rebuild = false;
        let mut email_tables: HashMap<String, HashSet<String>> = HashMap::new();
        let mut counts: Vec<(String, u64)> = Vec::new();
        let mut days: HashMap<String, u64> = HashMap::new();
        let mut new_ids: Vec<String> = Vec::new();
        let mut identifies_inserted: HashSet<String> = HashSet::new();
        let mut discards: Vec<Discard> = Vec::new();
        for table in &load.tables {
            ddl(&tx, &schema, table).await?;
            let temp = quote(&format!("tributary_load_{temp_tables}"));
            temp_tables += 1;
            if table.kind == TableKind::Users {
                let (rows, d) = merge_users(table, &identifies_inserted);
                if !rows.is_empty() {
                    create_temp(&tx, &temp, &table.columns).await?;
                    copy_rows(
                        &tx,
                        &temp,
                        &table.columns,
                        rows.iter().map(|(_, c)| c.as_slice()),
                    )
                    .await?;
                    let (changed, new) = upsert_users(&tx, &schema, table, &temp).await?;
                    stats.rows += changed;
                    if new > 0 {
                        counts.push((table.table.clone(), new));
                    }
                }
                discards.extend(d);
                continue;
            }
            let rows: Vec<&LoadRow> = table.rows.iter().filter(|r| r.seq > position).collect();
            if rows.is_empty() {
                continue;
            }
            let target = format!("{schema}.{}", quote(&table.table));
            let (n, inserted) = match insert_direct(&tx, &target, table, &rows).await? {
                // Every row went in: every id was absent.
                Some(n) => (n, Inserted::All),
                None => insert_if_absent(&tx, &target, &temp, table, &rows).await?,
            };
            stats.rows += n;
            let is_inserted = |key: &str| match &inserted {
                Inserted::All => true,
                Inserted::Some(ids) => ids.contains(key),
                Inserted::Count => false,
            };
            if n > 0 {
                counts.push((table.table.clone(), n));
            }
            if PRIMARY_TABLES.contains(&table.table.as_str())
                && let Some(i) = table.columns.iter().position(|(c, _)| c == "received_at")
            {
                for row in rows.iter().filter(|r| is_inserted(&r.key)) {
                    if let Some(day) = day_of(&table.cells_of(row)[i]) {
                        *days.entry(day).or_default() += 1;
                    }
                }
            }
            if is_email_table(&table.table) {
                email_rebuild |= email_needs_rebuild(&table.add, &table.widen);
                email_tables.insert(
                    table.table.clone(),
                    table
                        .after
                        .columns()
                        .iter()
                        .map(|(c, _)| c.clone())
                        .collect(),
                );
                new_ids.extend(
                    rows.iter()
                        .filter(|r| is_inserted(&r.key))
                        .map(|r| r.key.to_string()),
                );
            }
            if table.kind == TableKind::Identifies {
                identifies_inserted.extend(
                    rows.iter()
                        .filter(|r| is_inserted(&r.key))
                        .map(|r| r.key.to_string()),
                );
            }
            // Discards of rows that were inserted, once per id (the first row of an id).
            if rows.iter().any(|r| !r.discards.is_empty()) {
                let mut seen: HashSet<&str> = HashSet::new();
                for row in &rows {
                    if is_inserted(&row.key) && seen.insert(&*row.key) {
                        discards.extend(row.discards.iter().cloned());
                    }
                }
            }
        }
        if !ahead {
            discards.extend(load.discards.iter().filter(|d| d.seq > position).cloned());
        }
        if !discards.is_empty() {
            stats.discards += discards.len() as u64;
            let columns = discard_columns();
            let loaded_at = Cell::Timestamp(batch.loaded_at);
            let rows: Vec<Vec<Cell>> = discards
                .into_iter()
                .map(|d| {
                    // PostgreSQL text cannot hold NUL (a discarded value may).
                    let text = |s: String| Cell::Text(s.replace('\0', "\u{FFFD}"));
                    vec![
                        text(d.table),
                        text(d.column),
                        text(d.value),
                        text(d.reason),
                        text(d.row_id),
                        d.received_at.map_or(Cell::Null, Cell::Timestamp),
                        loaded_at.clone(),
                    ]
                })
                .collect();
            copy_rows(
                &tx,
                &format!("{schema}.{}", quote(DISCARDS_TABLE)),
                &columns,
                rows.iter().map(Vec::as_slice),
            )
            .await?;
            counts.push((DISCARDS_TABLE.to_string(), rows.len() as u64));
        }
        let mut statements = Vec::new();
        if must_build {
            statements.extend(scope.rebuild_all(&live_tables(&tx, &load.schema).await?));
        } else {
            statements.extend(scope.bump_tables(&counts, &batch.loaded_at));
            statements.extend(scope.bump_days(&days));
            if email_rebuild {
                let all = live_tables(&tx, &load.schema).await?;
                statements.extend(
                    scope.email_rebuild(
                        &all.into_iter().filter(|(t, _)| is_email_table(t)).collect(),
                    ),
                );
            } else if !new_ids.is_empty() {
                tx.batch_execute(&scope.new_ids_ddl())
                    .await
                    .map_err(classify)?;
                tx.execute(
                    &format!(
                        "INSERT INTO {} SELECT unnest($1::text[]) ON CONFLICT DO NOTHING",
                        scope.new_ids()
                    ),
                    &[&new_ids],
                )
                .await
                .map_err(classify)?;
                statements.extend(scope.email_update(&email_tables, true));
            }
        }
        for sql in statements {
            tx.batch_execute(&sql).await.map_err(classify)?;
        }
    }
    if !ahead {
        let epoch = batch.fence.as_ref().map_or(recorded_epoch, |f| f.epoch) as i64;
        tx.execute(
            &format!(
                "UPDATE {state}.loader_state SET seq = $2, epoch = $5, updated_at = now()
                 WHERE consumer = $1 AND log_id = $3 AND log_partition = $4"
            ),
            &[
                &CONSUMER,
                &(batch.last_seq as i64),
                &key.log_id,
                &partition,
                &epoch,
            ],
        )
        .await
        .map_err(classify)?;
    }
    tx.commit().await.map_err(classify)?;
    Ok(stats)
}

fn discard_columns() -> Vec<(String, ColumnType)> {
    [
        ("table_name", ColumnType::Text),
        ("column_name", ColumnType::Text),
        ("column_value", ColumnType::Text),
        ("reason", ColumnType::Text),
        ("row_id", ColumnType::Text),
        ("received_at", ColumnType::Timestamp),
        ("uuid_ts", ColumnType::Timestamp),
    ]
    .into_iter()
    .map(|(n, t)| (n.to_string(), t))
    .collect()
}

fn column_list(columns: &[(String, ColumnType)]) -> String {
    columns
        .iter()
        .map(|(n, _)| quote(n))
        .collect::<Vec<_>>()
        .join(", ")
}

fn column_defs(columns: &[(String, ColumnType)]) -> Vec<String> {
    columns
        .iter()
        .map(|(n, t)| {
            if n == "id" {
                format!("{} {} NOT NULL", quote(n), sql_type(*t))
            } else {
                format!("{} {}", quote(n), sql_type(*t))
            }
        })
        .collect()
}

/// The primary key's constraint (and index) name: indexes share the schema's namespace
/// with tables, so it must not be a name a table can get; snake-cased names never
/// contain `__` followed by a letter.
fn pk_name(table: &str) -> String {
    let digest = Sha256::digest(table.as_bytes());
    format!("tributary__pk_{}", hex::encode(&digest[..8]))
}

/// Runs the table's DDL (idempotent: safe when another loader already ran it).
async fn ddl(tx: &Tx<'_>, schema: &str, table: &TableLoad) -> Result<(), LoadError> {
    let t = format!("{schema}.{}", quote(&table.table));
    let mut statements = Vec::new();
    if table.create {
        let mut defs = column_defs(table.after.columns());
        defs.push(format!(
            "CONSTRAINT {} PRIMARY KEY (\"id\")",
            quote(&pk_name(&table.table))
        ));
        statements.push(format!(
            "CREATE TABLE IF NOT EXISTS {t} ({})",
            defs.join(", ")
        ));
    }
    if !table.add.is_empty() {
        let adds: Vec<String> = table
            .add
            .iter()
            .map(|(n, ty)| format!("ADD COLUMN IF NOT EXISTS {} {}", quote(n), sql_type(*ty)))
            .collect();
        statements.push(format!("ALTER TABLE {t} {}", adds.join(", ")));
    }
    for column in &table.widen {
        if table.after.get(column) == Some(ColumnType::Double) {
            let c = quote(column);
            statements.push(format!(
                "ALTER TABLE {t} ALTER COLUMN {c} TYPE double precision USING {c}::double precision"
            ));
        }
    }
    if statements.is_empty() {
        return Ok(());
    }
    tx.batch_execute(&statements.join(";\n"))
        .await
        .map_err(classify)
}

async fn create_temp(
    tx: &Tx<'_>,
    temp: &str,
    columns: &[(String, ColumnType)],
) -> Result<(), LoadError> {
    let defs: Vec<String> = columns
        .iter()
        .map(|(n, t)| format!("{} {}", quote(n), sql_type(*t)))
        .collect();
    tx.batch_execute(&format!(
        "CREATE TEMP TABLE {temp} ({}) ON COMMIT DROP",
        defs.join(", ")
    ))
    .await
    .map_err(classify)
}

/// Binary `COPY` of `rows` into `target` (already quoted).
async fn copy_rows<'r>(
    tx: &Tx<'_>,
    target: &str,
    columns: &[(String, ColumnType)],
    rows: impl Iterator<Item = &'r [Cell]>,
) -> Result<u64, LoadError> {
    copy::copy_rows(tx, target, columns, rows)
        .await
        .map_err(copy_error)
}

fn copy_error(e: CopyError) -> LoadError {
    match e {
        CopyError::Db(e) => classify(e),
        CopyError::Encode(e) => LoadError::Permanent(e),
    }
}

/// Which rows of a table an insert put in.
enum Inserted {
    /// All of them (no id was present).
    All,
    /// Those with these ids.
    Some(HashSet<String>),
    /// Only counted (nothing needs to know which).
    Count,
}

const DIRECT: &str = "tributary_direct";

/// The common case first: when none of the ids is in the table yet, the rows are
/// copied straight into it, inside a savepoint. `None` when an id was present (a
/// unique violation; the savepoint is rolled back and nothing of this table is
/// written), so the caller inserts only the absent rows.
async fn insert_direct(
    tx: &Tx<'_>,
    target: &str,
    table: &TableLoad,
    rows: &[&LoadRow],
) -> Result<Option<u64>, LoadError> {
    tx.batch_execute(&format!("SAVEPOINT {DIRECT}"))
        .await
        .map_err(classify)?;
    let copied = copy::copy_rows(
        tx,
        target,
        &table.columns,
        rows.iter().map(|r| table.cells_of(r)),
    )
    .await;
    match copied {
        Ok(n) => {
            tx.batch_execute(&format!("RELEASE SAVEPOINT {DIRECT}"))
                .await
                .map_err(classify)?;
            Ok(Some(n))
        }
        Err(CopyError::Db(e)) if e.code() == Some(&SqlState::UNIQUE_VIOLATION) => {
            tx.batch_execute(&format!("ROLLBACK TO SAVEPOINT {DIRECT}"))
                .await
                .map_err(classify)?;
            Ok(None)
        }
        Err(e) => Err(copy_error(e)),
    }
}

/// Inserts the rows whose id is absent: `COPY` into a temporary table, then `INSERT …
/// SELECT … ON CONFLICT ("id") DO NOTHING`. Returns the count and, when `identifies`
/// or discards need them, the ids inserted.
async fn insert_if_absent(
    tx: &Tx<'_>,
    target: &str,
    temp: &str,
    table: &TableLoad,
    rows: &[&LoadRow],
) -> Result<(u64, Inserted), LoadError> {
    create_temp(tx, temp, &table.columns).await?;
    copy_rows(
        tx,
        temp,
        &table.columns,
        rows.iter().map(|r| table.cells_of(r)),
    )
    .await?;
    let cols = column_list(&table.columns);
    let insert = format!(
        "INSERT INTO {target} ({cols}) SELECT {cols} FROM {temp}
         ON CONFLICT (\"id\") DO NOTHING"
    );
    // Which ids were inserted matters only for `users` (fed by identifies) and for
    // discards; otherwise the count is enough.
    let need_ids = table.kind == TableKind::Identifies
        || PRIMARY_TABLES.contains(&table.table.as_str())
        || is_email_table(&table.table)
        || rows.iter().any(|r| !r.discards.is_empty());
    if !need_ids {
        let n = tx.execute(&insert, &[]).await.map_err(classify)?;
        return Ok((n, Inserted::Count));
    }
    let inserted: HashSet<String> = tx
        .query(&format!("{insert} RETURNING \"id\""), &[])
        .await
        .map_err(classify)?
        .iter()
        .map(|r| r.get::<_, String>(0))
        .collect();
    Ok((inserted.len() as u64, Inserted::Some(inserted)))
}

/// Upserts `users` from `temp`; returns the rows changed and how many are new.
async fn upsert_users(
    tx: &Tx<'_>,
    schema: &str,
    table: &TableLoad,
    temp: &str,
) -> Result<(u64, u64), LoadError> {
    let cols = column_list(&table.columns);
    let updates: Vec<String> = table
        .columns
        .iter()
        .filter(|(n, _)| n != "id")
        .map(|(n, _)| format!("{q} = COALESCE(EXCLUDED.{q}, u.{q})", q = quote(n)))
        .collect();
    let conflict = if updates.is_empty() {
        "DO NOTHING".to_string()
    } else {
        format!("DO UPDATE SET {}", updates.join(", "))
    };
    // `xmax = 0` only on a row this statement inserted (an update sets it).
    let rows = tx
        .query(
            &format!(
                "INSERT INTO {schema}.{t} AS u ({cols}) SELECT {cols} FROM {temp}
                 ON CONFLICT (\"id\") {conflict} RETURNING (u.xmax = 0)",
                t = quote(&table.table)
            ),
            &[],
        )
        .await
        .map_err(classify)?;
    let new = rows.iter().filter(|r| r.get::<_, bool>(0)).count() as u64;
    Ok((rows.len() as u64, new))
}

/// Every table of `schema` with its columns (inside the load transaction).
async fn live_tables(
    tx: &Tx<'_>,
    schema: &str,
) -> Result<HashMap<String, HashSet<String>>, LoadError> {
    let rows = tx
        .query(
            "SELECT table_name::text, column_name::text FROM information_schema.columns
             WHERE table_schema = $1",
            &[&schema],
        )
        .await
        .map_err(classify)?;
    let mut out: HashMap<String, HashSet<String>> = HashMap::new();
    for r in rows {
        out.entry(r.get(0)).or_default().insert(r.get(1));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn primary_key_names_cannot_be_table_names() {
        let name = pk_name("tracks");
        assert!(name.starts_with("tributary__pk_"));
        assert_eq!(name.len(), 14 + 16);
        assert_ne!(pk_name("tracks"), pk_name("pages"));
        // Any event table name is snake case: never `__` followed by letters.
        assert_ne!(crate::naming::event_table(&name), name);
    }
}
