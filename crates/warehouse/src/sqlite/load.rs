//! Writing a batch into SQLite schema files.
//!
//! Per schema file, one `BEGIN IMMEDIATE` transaction: read the file's position
//! (`tributary_state`), make the tables match the batch (create, `ADD COLUMN`, widen
//! by rebuilding the table — SQLite cannot change a column's declared type), insert
//! rows newer than the position with `ON CONFLICT ("id") DO NOTHING`, upsert `users`
//! from the `identifies` rows actually inserted, record discards of inserted rows,
//! write the new position, commit. Then the global low-water mark moves.
//!
//! Invariants: rows and position of a schema commit together; a row at or below the
//! position is never written again; the table shape is checked against the live file
//! inside the transaction, so a stale loader cache cannot break a load.

use std::collections::{HashMap, HashSet};
use std::path::Path;

use rusqlite::{Transaction, TransactionBehavior, params_from_iter};

use super::{Writer, classify, sql_type, table_columns};
use crate::evolve::{Discard, LoadBatch, SchemaLoad, TableLoad, merge_users};
use crate::naming::{DISCARDS_TABLE, STATE_TABLE, quote};
use crate::outcome::{ApplyStats, LoadError};
use crate::plan::TableKind;
use crate::stats::{
    PRIMARY_TABLES, Scope, day_of, email_needs_rebuild, is_counter_table, is_email_table,
};
use crate::types::{ColumnType, format_timestamp};

pub(super) fn apply(w: &mut Writer, dir: &Path, batch: LoadBatch) -> Result<ApplyStats, LoadError> {
    let mut stats = ApplyStats::default();
    let loaded_at = format_timestamp(&batch.loaded_at);
    let mut all_loaded_before = true;
    let consumer = match &batch.fence {
        Some(f) => f.key.sqlite_consumer(),
        None => w.consumer.clone(),
    };
    let epoch = batch.fence.as_ref().map(|f| f.epoch);
    if let Some(epoch) = epoch {
        // The claim a newer holder recorded at its start (state file).
        let state = w.state(dir).map_err(classify)?;
        if recorded_epoch(state, "loader_state", &consumer).map_err(classify)? > epoch {
            stats.fenced = true;
            return Ok(stats);
        }
    }
    for schema in &batch.schemas {
        let conn = w.schema(dir, &schema.schema).map_err(classify)?;
        let fresh = apply_schema(
            conn,
            &consumer,
            schema,
            (batch.last_seq, epoch),
            &loaded_at,
            &mut stats,
        )
        .map_err(classify)?;
        match fresh {
            Some(fresh) => all_loaded_before &= !fresh,
            None => {
                stats.fenced = true;
                return Ok(stats);
            }
        }
    }
    let state = w.state(dir).map_err(classify)?;
    state
        .execute(
            "INSERT INTO loader_state (consumer, seq, updated_at) VALUES (?1, ?2, ?3)
             ON CONFLICT (consumer) DO UPDATE SET seq = excluded.seq, updated_at = excluded.updated_at
             WHERE excluded.seq > loader_state.seq",
            rusqlite::params![consumer, batch.last_seq as i64, loaded_at],
        )
        .map_err(classify)?;
    stats.already_loaded = !batch.schemas.is_empty() && all_loaded_before;
    Ok(stats)
}

/// The row of `table` that records the lease epoch of `consumer`'s position (cluster
/// mode): `<consumer>#epoch`, its `seq` the epoch. Kept beside the positions so no
/// table changes shape.
pub(super) fn fence_row(consumer: &str) -> String {
    format!("{consumer}#epoch")
}

/// The epoch recorded for `consumer` in `table` (0 when none).
pub(super) fn recorded_epoch(
    conn: &rusqlite::Connection,
    table: &str,
    consumer: &str,
) -> rusqlite::Result<u64> {
    use rusqlite::OptionalExtension;
    Ok(conn
        .query_row(
            &format!("SELECT seq FROM {table} WHERE consumer = ?1"),
            [fence_row(consumer)],
            |r| r.get::<_, i64>(0),
        )
        .optional()?
        .map_or(0, |s| s.max(0) as u64))
}

/// Loads one schema's part of the batch; `Some(false)` when the file was already past
/// it, `None` (rolled back) when a newer lease epoch than `epoch` committed to it.
fn apply_schema(
    conn: &mut rusqlite::Connection,
    consumer: &str,
    load: &SchemaLoad,
    (last_seq, epoch): (u64, Option<u64>),
    loaded_at: &str,
    stats: &mut ApplyStats,
) -> rusqlite::Result<Option<bool>> {
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    if let Some(epoch) = epoch {
        if recorded_epoch(&tx, &quote(STATE_TABLE), consumer)? > epoch {
            return Ok(None);
        }
        tx.execute(
            &format!(
                "INSERT INTO {} (consumer, seq, updated_at) VALUES (?1, ?2, ?3)
                 ON CONFLICT (consumer) DO UPDATE SET seq = excluded.seq",
                quote(STATE_TABLE)
            ),
            rusqlite::params![fence_row(consumer), epoch as i64, loaded_at],
        )?;
    }
    let position: u64 = tx
        .query_row(
            &format!("SELECT seq FROM {} WHERE consumer = ?1", quote(STATE_TABLE)),
            [consumer],
            |r| r.get::<_, i64>(0),
        )
        .map(|s| s.max(0) as u64)
        .or_else(|e| match e {
            rusqlite::Error::QueryReturnedNoRows => Ok(0),
            e => Err(e),
        })?;
    if position >= last_seq {
        return Ok(Some(false));
    }

    // The counters (module `stats`): a file without them is counted from its raw
    // tables at the end of this transaction, else they move by what is inserted.
    let scope = Scope::sqlite(&load.schema);
    let must_build = tx.execute(&scope.claim_built(), [])? > 0;
    let mut email_rebuild = false;
    let mut email_tables: HashMap<String, HashSet<String>> = HashMap::new();
    let mut counts: Vec<(String, u64)> = Vec::new();
    let mut days: HashMap<String, u64> = HashMap::new();
    let mut new_ids = None;

    let mut identifies_inserted: HashSet<String> = HashSet::new();
    let mut discards: Vec<&Discard> = Vec::new();
    let mut merged_discards: Vec<Discard> = Vec::new();
    for table in &load.tables {
        ensure_table(&tx, table)?;
        if table.kind == TableKind::Users {
            let (rows, d) = merge_users(table, &identifies_inserted);
            let (changed, new) = upsert_users(&tx, table, &rows)?;
            stats.rows += changed;
            if new > 0 {
                counts.push((table.table.clone(), new));
            }
            merged_discards.extend(d);
            continue;
        }
        let email = is_email_table(&table.table);
        if email {
            email_rebuild |= email_needs_rebuild(&table.add, &table.widen);
            email_tables.insert(
                table.table.clone(),
                table
                    .after
                    .columns()
                    .iter()
                    .map(|(n, _)| n.clone())
                    .collect(),
            );
            if new_ids.is_none() {
                tx.execute_batch(&scope.new_ids_ddl())?;
                new_ids = Some(());
            }
        }
        let mut add_id = if email {
            Some(tx.prepare(&format!(
                "INSERT INTO {} (\"id\") VALUES (?1) ON CONFLICT DO NOTHING",
                scope.new_ids()
            ))?)
        } else {
            None
        };
        let day_at = PRIMARY_TABLES
            .contains(&table.table.as_str())
            .then(|| table.columns.iter().position(|(n, _)| n == "received_at"))
            .flatten();
        let sql = insert_sql(table);
        let mut stmt = tx.prepare(&sql)?;
        let mut inserted = 0u64;
        for row in table.rows.iter().filter(|r| r.seq > position) {
            let cells = table.cells_of(row);
            if stmt.execute(params_from_iter(cells.iter()))? > 0 {
                inserted += 1;
                discards.extend(row.discards.iter());
                if table.kind == TableKind::Identifies {
                    identifies_inserted.insert(row.message_id.to_string());
                }
                if let Some(day) = day_at.and_then(|i| day_of(&cells[i])) {
                    *days.entry(day).or_default() += 1;
                }
                if let Some(add) = add_id.as_mut() {
                    add.execute([&*row.key])?;
                }
            }
        }
        stats.rows += inserted;
        if inserted > 0 {
            counts.push((table.table.clone(), inserted));
        }
    }
    discards.extend(merged_discards.iter());
    discards.extend(load.discards.iter().filter(|d| d.seq > position));
    if !discards.is_empty() {
        let mut stmt = tx.prepare(&format!(
            "INSERT INTO {} (\"table_name\", \"column_name\", \"column_value\", \"reason\", \"row_id\", \"received_at\", \"uuid_ts\")
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
            quote(DISCARDS_TABLE)
        ))?;
        for d in &discards {
            stmt.execute(rusqlite::params![
                d.table,
                d.column,
                d.value,
                d.reason,
                d.row_id,
                d.received_at.as_ref().map(format_timestamp),
                loaded_at,
            ])?;
        }
        stats.discards += discards.len() as u64;
        counts.push((DISCARDS_TABLE.to_string(), discards.len() as u64));
    }
    if must_build {
        for sql in scope.rebuild_all(&live_tables(&tx)?) {
            tx.execute_batch(&sql)?;
        }
    } else {
        if let Some(sql) = scope.bump_tables(&counts, &load_time(loaded_at)) {
            tx.execute_batch(&sql)?;
        }
        if let Some(sql) = scope.bump_days(&days) {
            tx.execute_batch(&sql)?;
        }
        let email = if email_rebuild {
            let all = live_tables(&tx)?;
            scope.email_rebuild(&all.into_iter().filter(|(t, _)| is_email_table(t)).collect())
        } else {
            scope.email_update(&email_tables, true)
        };
        for sql in email {
            tx.execute_batch(&sql)?;
        }
    }
    tx.execute(
        &format!(
            "INSERT INTO {} (consumer, seq, updated_at) VALUES (?1, ?2, ?3)
             ON CONFLICT (consumer) DO UPDATE SET seq = excluded.seq, updated_at = excluded.updated_at",
            quote(STATE_TABLE)
        ),
        rusqlite::params![consumer, last_seq as i64, loaded_at],
    )?;
    tx.commit()?;
    Ok(Some(true))
}

fn column_list(columns: &[(String, ColumnType)]) -> String {
    columns
        .iter()
        .map(|(n, _)| quote(n))
        .collect::<Vec<_>>()
        .join(", ")
}

fn placeholders(n: usize) -> String {
    (1..=n)
        .map(|i| format!("?{i}"))
        .collect::<Vec<_>>()
        .join(", ")
}

fn insert_sql(table: &TableLoad) -> String {
    format!(
        "INSERT INTO {} ({}) VALUES ({}) ON CONFLICT (\"id\") DO NOTHING",
        quote(&table.table),
        column_list(&table.columns),
        placeholders(table.columns.len())
    )
}

/// Every table of the schema file (counter tables excluded) with its columns.
fn live_tables(tx: &Transaction<'_>) -> rusqlite::Result<HashMap<String, HashSet<String>>> {
    let mut stmt = tx.prepare(
        "SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite\\_%' ESCAPE '\\'",
    )?;
    let names: Vec<String> = stmt
        .query_map([], |r| r.get(0))?
        .collect::<Result<_, _>>()?;
    let mut out = HashMap::new();
    for name in names {
        if name == STATE_TABLE || is_counter_table(&name) {
            continue;
        }
        let cols = table_columns(tx, &name)?;
        out.insert(name, cols.into_iter().map(|(n, _)| n).collect());
    }
    Ok(out)
}

/// The batch's load time back from its stored text.
fn load_time(loaded_at: &str) -> chrono::DateTime<chrono::Utc> {
    super::stored_timestamp(loaded_at).unwrap_or_else(chrono::Utc::now)
}

/// Upserts `users`; returns the rows changed and how many of them are new.
fn upsert_users(
    tx: &Transaction<'_>,
    table: &TableLoad,
    rows: &[(String, Vec<crate::types::Cell>)],
) -> rusqlite::Result<(u64, u64)> {
    if rows.is_empty() {
        return Ok((0, 0));
    }
    let updates: Vec<String> = table
        .columns
        .iter()
        .filter(|(n, _)| n != "id")
        .map(|(n, _)| format!("{q} = COALESCE(excluded.{q}, {q})", q = quote(n)))
        .collect();
    let conflict = if updates.is_empty() {
        "DO NOTHING".to_string()
    } else {
        format!("DO UPDATE SET {}", updates.join(", "))
    };
    let sql = format!(
        "INSERT INTO {} ({}) VALUES ({}) ON CONFLICT (\"id\") {conflict}",
        quote(&table.table),
        column_list(&table.columns),
        placeholders(table.columns.len())
    );
    let mut stmt = tx.prepare(&sql)?;
    let mut exists = tx.prepare(&format!(
        "SELECT count(*) FROM {} WHERE \"id\" = ?1",
        quote(&table.table)
    ))?;
    let (mut n, mut new) = (0, 0);
    for (id, cells) in rows {
        let present: i64 = exists.query_row([id], |r| r.get(0))?;
        n += stmt.execute(params_from_iter(cells.iter()))? as u64;
        if present == 0 {
            new += 1;
        }
    }
    Ok((n, new))
}

/// `CREATE TABLE` text for `name` with these columns; `id` is the primary key under a
/// constraint name no table can have (snake-cased names never contain `__`).
pub(crate) fn create_table_sql(name: &str, columns: &[(String, ColumnType)]) -> String {
    let mut defs: Vec<String> = columns
        .iter()
        .map(|(n, t)| {
            if n == "id" {
                format!("{} {} NOT NULL", quote(n), sql_type(*t))
            } else {
                format!("{} {}", quote(n), sql_type(*t))
            }
        })
        .collect();
    defs.push("CONSTRAINT \"tributary__pk\" PRIMARY KEY (\"id\")".to_string());
    format!("CREATE TABLE {} ({})", quote(name), defs.join(", "))
}

/// Makes the live table match `table.after`: create, add columns, widen.
fn ensure_table(tx: &Transaction<'_>, table: &TableLoad) -> rusqlite::Result<()> {
    let live = table_columns(tx, &table.table)?;
    if live.is_empty() {
        tx.execute_batch(&create_table_sql(&table.table, table.after.columns()))?;
        return Ok(());
    }
    let live_types: std::collections::HashMap<&str, ColumnType> = live
        .iter()
        .map(|(n, t)| (n.as_str(), super::column_type(t)))
        .collect();
    let mut widen = false;
    for (name, ty) in table.after.columns() {
        match live_types.get(name.as_str()) {
            None => tx.execute_batch(&format!(
                "ALTER TABLE {} ADD COLUMN {} {}",
                quote(&table.table),
                quote(name),
                sql_type(*ty)
            ))?,
            Some(ColumnType::Bigint) if *ty == ColumnType::Double => widen = true,
            Some(_) => {}
        }
    }
    if widen {
        rebuild_widened(tx, table)?;
    }
    Ok(())
}

/// Rebuilds a table with its `bigint` columns that `table.after` says are `double`
/// declared `DOUBLE PRECISION`; existing integers become reals on the copy.
fn rebuild_widened(tx: &Transaction<'_>, table: &TableLoad) -> rusqlite::Result<()> {
    // Re-read: columns added just now are part of the table.
    let live_now = table_columns(tx, &table.table)?;
    let columns: Vec<(String, ColumnType)> = live_now
        .iter()
        .map(|(n, t)| {
            let live_ty = super::column_type(t);
            let ty = match (live_ty, table.after.get(n)) {
                (ColumnType::Bigint, Some(ColumnType::Double)) => ColumnType::Double,
                _ => live_ty,
            };
            (n.clone(), ty)
        })
        .collect();
    let tmp = format!("{}__tributary_widen", table.table);
    tx.execute_batch(&format!("DROP TABLE IF EXISTS {}", quote(&tmp)))?;
    let has_id = columns.iter().any(|(n, _)| n == "id");
    let create = if has_id {
        create_table_sql(&tmp, &columns)
    } else {
        format!(
            "CREATE TABLE {} ({})",
            quote(&tmp),
            columns
                .iter()
                .map(|(n, t)| format!("{} {}", quote(n), sql_type(*t)))
                .collect::<Vec<_>>()
                .join(", ")
        )
    };
    let cols = column_list(&columns);
    tx.execute_batch(&format!(
        "{create};
         INSERT INTO {tmp} ({cols}) SELECT {cols} FROM {t};
         DROP TABLE {t};
         ALTER TABLE {tmp} RENAME TO {t};",
        tmp = quote(&tmp),
        t = quote(&table.table),
    ))?;
    Ok(())
}
