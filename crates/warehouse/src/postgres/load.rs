//! Writing a batch into PostgreSQL in one transaction.
//!
//! Order inside the transaction: lock the position row (`FOR UPDATE`) and stop if it
//! is already at or past the batch; per schema, create the schema and its discards
//! table when the loader does not know them, then per table run its DDL
//! (`CREATE TABLE IF NOT EXISTS`, `ADD COLUMN IF NOT EXISTS`, `ALTER COLUMN … TYPE
//! double precision`), binary-`COPY` the rows newer than the position into a
//! temporary table (`ON COMMIT DROP`) and `INSERT … SELECT … ON CONFLICT ("id") DO
//! NOTHING RETURNING "id"`; `users` gets one merged row per user, upserted with
//! `COALESCE(EXCLUDED.c, u.c)` so later non-null traits win and nulls never erase;
//! discards of inserted rows are copied into `tributary_discards`; finally the
//! position moves and everything commits at once.

use std::collections::HashSet;

use futures::pin_mut;
use sha2::{Digest, Sha256};
use tokio_postgres::binary_copy::BinaryCopyInWriter;
use tokio_postgres::types::Type;

use super::{classify, sql_type, wire_type};
use crate::backend::{ApplyStats, CONSUMER, LoadError};
use crate::evolve::{Discard, LoadBatch, LoadRow, TableLoad, merge_users};
use crate::naming::{DISCARDS_TABLE, quote};
use crate::plan::TableKind;
use crate::types::{Cell, ColumnType};

type Tx<'a> = deadpool_postgres::Transaction<'a>;

pub(super) async fn apply(
    client: &mut deadpool_postgres::Object,
    state: &str,
    batch: &LoadBatch,
) -> Result<ApplyStats, LoadError> {
    let tx = client.transaction().await.map_err(classify)?;
    let position: i64 = tx
        .query_one(
            &format!("SELECT seq FROM {state}.loader_state WHERE consumer = $1 FOR UPDATE"),
            &[&CONSUMER],
        )
        .await
        .map_err(classify)?
        .get(0);
    let position = position.max(0) as u64;
    let mut stats = ApplyStats::default();
    if position >= batch.last_seq {
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
                    stats.rows += upsert_users(&tx, &schema, table, &temp).await?;
                }
                discards.extend(d);
                continue;
            }
            let rows: Vec<&LoadRow> = table.rows.iter().filter(|r| r.seq > position).collect();
            if rows.is_empty() {
                continue;
            }
            create_temp(&tx, &temp, &table.columns).await?;
            copy_rows(
                &tx,
                &temp,
                &table.columns,
                rows.iter().map(|r| r.cells.as_slice()),
            )
            .await?;
            let cols = column_list(&table.columns);
            let insert = format!(
                "INSERT INTO {schema}.{t} ({cols}) SELECT {cols} FROM {temp}
                 ON CONFLICT (\"id\") DO NOTHING",
                t = quote(&table.table)
            );
            // Which ids were inserted matters only for `users` (fed by identifies) and
            // for discards; otherwise the count is enough.
            let need_ids =
                table.kind == TableKind::Identifies || rows.iter().any(|r| !r.discards.is_empty());
            if !need_ids {
                stats.rows += tx.execute(&insert, &[]).await.map_err(classify)?;
                continue;
            }
            let inserted: HashSet<String> = tx
                .query(&format!("{insert} RETURNING \"id\""), &[])
                .await
                .map_err(classify)?
                .iter()
                .map(|r| r.get::<_, String>(0))
                .collect();
            stats.rows += inserted.len() as u64;
            if table.kind == TableKind::Identifies {
                identifies_inserted.extend(inserted.iter().cloned());
            }
            // Discards of rows that were inserted, once per id.
            let mut pending = inserted;
            for row in rows {
                if pending.remove(&row.key) {
                    discards.extend(row.discards.iter().cloned());
                }
            }
        }
        discards.extend(load.discards.iter().filter(|d| d.seq > position).cloned());
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
        }
    }
    tx.execute(
        &format!(
            "UPDATE {state}.loader_state SET seq = $2, updated_at = now() WHERE consumer = $1"
        ),
        &[&CONSUMER, &(batch.last_seq as i64)],
    )
    .await
    .map_err(classify)?;
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
    let sink = tx
        .copy_in(&format!(
            "COPY {target} ({}) FROM STDIN (FORMAT binary)",
            column_list(columns)
        ))
        .await
        .map_err(classify)?;
    let types: Vec<Type> = columns.iter().map(|(_, t)| wire_type(*t)).collect();
    let writer = BinaryCopyInWriter::new(sink, &types);
    pin_mut!(writer);
    for cells in rows {
        if cells.len() != types.len() {
            return Err(LoadError::Permanent(format!(
                "row has {} values for {} columns",
                cells.len(),
                types.len()
            )));
        }
        writer
            .as_mut()
            .write_raw(cells.iter())
            .await
            .map_err(classify)?;
    }
    writer.finish().await.map_err(classify)
}

async fn upsert_users(
    tx: &Tx<'_>,
    schema: &str,
    table: &TableLoad,
    temp: &str,
) -> Result<u64, LoadError> {
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
    tx.execute(
        &format!(
            "INSERT INTO {schema}.{t} AS u ({cols}) SELECT {cols} FROM {temp}
             ON CONFLICT (\"id\") {conflict}",
            t = quote(&table.table)
        ),
        &[],
    )
    .await
    .map_err(classify)
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
