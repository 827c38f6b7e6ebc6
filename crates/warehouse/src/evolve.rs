//! Schema evolution and typing of one micro-batch: from planned rows and the known
//! warehouse schema to the DDL to run and the typed rows to write.
//!
//! For every (schema, table) of the batch, in row order: a column that does not exist
//! yet is created with the type of its first non-null value; a `bigint` column that
//! meets a fractional number is widened to `double`; every value is then cast to its
//! column's final type, and a value that cannot be cast becomes NULL plus a
//! [`Discard`] (`<schema>.tributary_discards`). Tables stop growing at
//! [`MAX_COLUMNS`]; values for further new columns are discarded with that reason.
//! Nothing here fails: a type conflict never fails a batch.
//!
//! Invariants: pure — the known schema is an input ([`SchemaState`]) and the result
//! ([`LoadBatch`]) says what it becomes ([`TableLoad::after`]); the loader adopts it
//! only once the backend committed. Fixed columns (`id`, `received_at`, …) never
//! change type. Rows keep their log sequence numbers so a backend can skip, inside its
//! transaction, rows another loader already committed.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use chrono::{DateTime, Utc};
use serde_json::Value;

use crate::plan::{Planned, TableKind};
use crate::types::{Cell, ColumnType, cast_owned, infer, value_text, widens};

/// Most columns a table gets (PostgreSQL allows 1600; SQLite 2000).
pub const MAX_COLUMNS: usize = 1000;

/// Most loaded tables a schema gets (Segment manages "the first 5,000 collections per
/// source"); events of further event names are still loaded into `tracks`, and their
/// properties are kept in `tributary_discards`.
pub const MAX_TABLES: usize = 5000;

/// The columns of one table, in table order.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct TableSchema {
    columns: Vec<(String, ColumnType)>,
    index: HashMap<String, usize>,
}

impl TableSchema {
    /// A table with these columns.
    pub fn from_columns(columns: impl IntoIterator<Item = (String, ColumnType)>) -> Self {
        let mut t = TableSchema::default();
        for (name, ty) in columns {
            t.push(name, ty);
        }
        t
    }

    /// The fixed columns of a new table of `kind`.
    pub fn for_kind(kind: TableKind) -> Self {
        Self::from_columns(
            kind.fixed_columns()
                .iter()
                .map(|(n, t)| (n.to_string(), *t)),
        )
    }

    /// The type of a column.
    pub fn get(&self, name: &str) -> Option<ColumnType> {
        self.index.get(name).map(|&i| self.columns[i].1)
    }

    /// Appends a column (ignored if it exists).
    pub fn push(&mut self, name: String, ty: ColumnType) {
        if !self.index.contains_key(&name) {
            self.index.insert(name.clone(), self.columns.len());
            self.columns.push((name, ty));
        }
    }

    /// Position of a column.
    pub fn index_of(&self, name: &str) -> Option<usize> {
        self.index.get(name).copied()
    }

    /// The columns in order.
    pub fn columns(&self) -> &[(String, ColumnType)] {
        &self.columns
    }

    /// Number of columns.
    pub fn len(&self) -> usize {
        self.columns.len()
    }
}

/// What the loader knows about one warehouse schema.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SchemaState {
    /// The schema (PostgreSQL schema or SQLite file) and its system tables exist.
    pub exists: bool,
    /// Loaded tables by name (system tables excluded).
    pub tables: HashMap<String, TableSchema>,
}

/// A value that could not be loaded, for `<schema>.tributary_discards`.
#[derive(Debug, Clone, PartialEq)]
pub struct Discard {
    /// Log sequence number of the record the value comes from.
    pub seq: u64,
    /// The table the value was meant for.
    pub table: String,
    /// The column it was meant for (empty when a whole record was rejected).
    pub column: String,
    /// The value as text.
    pub value: String,
    /// Why it was discarded.
    pub reason: String,
    /// The row's `id` (the user id in `users`).
    pub row_id: String,
    /// The record's `receivedAt`.
    pub received_at: Option<DateTime<Utc>>,
}

/// One typed row.
#[derive(Debug, Clone, PartialEq)]
pub struct LoadRow {
    /// Log sequence number of its record.
    pub seq: u64,
    /// The record's messageId (shared with the record's other rows).
    pub message_id: Arc<str>,
    /// Primary key value (`id`; the messageId itself except in `users`).
    pub key: Arc<str>,
    /// The row's place in its table: its cells are [`TableLoad::cells_of`].
    pub at: usize,
    /// Values of this row that were discarded.
    pub discards: Vec<Discard>,
}

/// Everything to do to one table in one batch.
#[derive(Debug, Clone, PartialEq)]
pub struct TableLoad {
    /// Table name.
    pub table: String,
    /// Table kind (`users` is upserted, everything else inserted if absent).
    pub kind: TableKind,
    /// The table does not exist yet: create it with [`TableLoad::after`]'s columns.
    pub create: bool,
    /// Columns to add to an existing table.
    pub add: Vec<(String, ColumnType)>,
    /// Existing `bigint` columns to widen to `double`.
    pub widen: Vec<String>,
    /// The table's columns once the DDL ran.
    pub after: TableSchema,
    /// The columns rows carry values for (a subset of `after`, in its order).
    pub columns: Vec<(String, ColumnType)>,
    /// The rows, in log order.
    pub rows: Vec<LoadRow>,
    /// Every row's cells, one after the other: one per [`TableLoad::columns`] entry
    /// each (one allocation per table, not one per row).
    pub cells: Vec<Cell>,
}

impl TableLoad {
    /// The cells of one of this table's rows, aligned with [`TableLoad::columns`].
    pub fn cells_of(&self, row: &LoadRow) -> &[Cell] {
        let n = self.columns.len();
        &self.cells[row.at * n..(row.at + 1) * n]
    }
}

/// Everything to do to one schema in one batch.
#[derive(Debug, Clone, PartialEq)]
pub struct SchemaLoad {
    /// Schema name.
    pub schema: String,
    /// The loader believes the schema and its system tables exist already.
    pub known_to_exist: bool,
    /// Tables, `users` after `identifies`.
    pub tables: Vec<TableLoad>,
    /// Discards not tied to a loaded row (records refused by the warehouse, events
    /// beyond the table limit); written when their `seq` is past the position.
    pub discards: Vec<Discard>,
}

/// One micro-batch, ready for a backend.
#[derive(Debug, Clone, PartialEq)]
pub struct LoadBatch {
    /// Per schema.
    pub schemas: Vec<SchemaLoad>,
    /// Sequence number the loader's position moves to once the batch is committed.
    pub last_seq: u64,
    /// Load time (`uuid_ts`).
    pub loaded_at: DateTime<Utc>,
    /// The lease the batch commits under (cluster mode); `None`: the backend's
    /// claimed position row, unfenced (embedded mode).
    pub fence: Option<crate::outcome::Fence>,
}

#[cfg(test)]
impl LoadBatch {
    /// Number of rows across all tables (before de-duplication).
    pub fn row_count(&self) -> usize {
        self.schemas
            .iter()
            .flat_map(|s| &s.tables)
            .map(|t| t.rows.len())
            .sum()
    }
}

/// Types a batch of planned rows against the known schemas.
///
/// `planned` is `(schema, row)` in log order. Schemas absent from `known` are treated
/// as empty (everything is created).
pub fn prepare<S: AsRef<str>>(
    known: &HashMap<String, SchemaState>,
    planned: Vec<(S, Planned)>,
    last_seq: u64,
    loaded_at: DateTime<Utc>,
) -> LoadBatch {
    // Group by schema, then table, keeping first-appearance order.
    type Tables = Vec<(String, TableKind, Vec<Planned>)>;
    let mut schemas: Vec<(String, Tables)> = Vec::new();
    let mut schema_index: HashMap<String, usize> = HashMap::new();
    // Per schema: table name → index in its `Tables`.
    let mut table_index: Vec<HashMap<String, usize>> = Vec::new();
    for (schema, p) in planned {
        let si = match schema_index.get(schema.as_ref()) {
            Some(&si) => si,
            None => {
                schemas.push((schema.as_ref().to_string(), Vec::new()));
                table_index.push(HashMap::new());
                schema_index.insert(schema.as_ref().to_string(), schemas.len() - 1);
                schemas.len() - 1
            }
        };
        let tables = &mut schemas[si].1;
        let index = &mut table_index[si];
        let ti = match index.get(&*p.table) {
            Some(&ti) => ti,
            None => {
                index.insert(p.table.to_string(), tables.len());
                tables.push((p.table.to_string(), p.kind, Vec::new()));
                tables.len() - 1
            }
        };
        tables[ti].2.push(p);
    }

    let empty = SchemaState::default();
    let schemas = schemas
        .into_iter()
        .map(|(schema, mut tables)| {
            let state = known.get(&schema).unwrap_or(&empty);
            // `users` depends on which `identifies` rows were inserted: load it last.
            tables.sort_by_key(|(_, kind, _)| *kind == TableKind::Users);
            let mut count = state.tables.len();
            let mut discards = Vec::new();
            let mut jobs = Vec::with_capacity(tables.len());
            for (table, kind, rows) in tables {
                let existing = state.tables.get(&table);
                if existing.is_none() {
                    if kind == TableKind::Event && count >= MAX_TABLES {
                        // The rows stay in `tracks`; their properties go to discards.
                        discards.extend(rows.into_iter().map(|p| table_limit_discard(&table, p)));
                        continue;
                    }
                    count += 1;
                }
                jobs.push((existing, table, kind, rows));
            }
            SchemaLoad {
                schema,
                known_to_exist: state.exists,
                tables: type_tables(jobs),
                discards,
            }
        })
        .collect();
    LoadBatch {
        schemas,
        last_seq,
        loaded_at,
        fence: None,
    }
}

/// The slot of a value whose column would exceed [`MAX_COLUMNS`].
const OVER_CAP: usize = usize::MAX;

/// Below this many rows a schema's tables are typed on the calling thread only.
const PARALLEL_MIN_ROWS: usize = 2000;

/// One table to type: its known schema, name, kind and rows.
type TableJob<'a> = (Option<&'a TableSchema>, String, TableKind, Vec<Planned>);

/// Types the tables of one schema, in order. Tables are independent, so a large batch
/// (`tracks` plus event tables) is typed on two threads: the biggest tables are
/// spread over both, and the results are put back in the input order. Within a table
/// of [`PARALLEL_MIN_ROWS`] rows or more, casting (once the columns are fixed) is
/// split over two threads too.
fn type_tables(jobs: Vec<TableJob<'_>>) -> Vec<TableLoad> {
    let total: usize = jobs.iter().map(|j| j.3.len()).sum();
    if jobs.len() < 2 || total < PARALLEL_MIN_ROWS {
        return jobs
            .into_iter()
            .map(|(existing, table, kind, rows)| type_table(existing, table, kind, rows))
            .collect();
    }
    let n = jobs.len();
    let mut jobs: Vec<(usize, TableJob<'_>)> = jobs.into_iter().enumerate().collect();
    jobs.sort_by_key(|(_, j)| std::cmp::Reverse(j.3.len()));
    let (mut here, mut there) = (Vec::new(), Vec::new());
    let (mut here_rows, mut there_rows) = (0, 0);
    for job in jobs {
        if here_rows <= there_rows {
            here_rows += job.1.3.len();
            here.push(job);
        } else {
            there_rows += job.1.3.len();
            there.push(job);
        }
    }
    let run = |jobs: Vec<(usize, TableJob<'_>)>| -> Vec<(usize, TableLoad)> {
        jobs.into_iter()
            .map(|(i, (existing, table, kind, rows))| (i, type_table(existing, table, kind, rows)))
            .collect()
    };
    let (mut done, other) = std::thread::scope(|s| {
        let other = s.spawn(|| run(there));
        (run(here), other.join())
    });
    match other {
        Ok(other) => done.extend(other),
        Err(panic) => std::panic::resume_unwind(panic),
    }
    debug_assert_eq!(done.len(), n);
    done.sort_by_key(|(i, _)| *i);
    done.into_iter().map(|(_, t)| t).collect()
}

/// The discard for an event row that gets no table (the schema is at [`MAX_TABLES`]):
/// the row's non-null values as a JSON object.
fn table_limit_discard(table: &str, p: Planned) -> Discard {
    let values: serde_json::Map<String, Value> = p
        .row
        .values
        .into_iter()
        .filter(|(_, v)| !v.is_null())
        .map(|(k, v)| (k.to_string(), v))
        .collect();
    Discard {
        seq: p.row.seq,
        table: table.to_string(),
        column: String::new(),
        value: Value::Object(values).to_string(),
        reason: format!("schema has reached the limit of {MAX_TABLES} tables"),
        row_id: p.row.key.to_string(),
        received_at: p.row.received_at,
    }
}

fn type_table(
    existing: Option<&TableSchema>,
    table: String,
    kind: TableKind,
    rows: Vec<Planned>,
) -> TableLoad {
    type_table_split(existing, table, kind, rows, PARALLEL_MIN_ROWS)
}

/// [`type_table`], casting on two threads from `split_at` rows.
fn type_table_split(
    existing: Option<&TableSchema>,
    table: String,
    kind: TableKind,
    rows: Vec<Planned>,
    split_at: usize,
) -> TableLoad {
    let fixed = kind.fixed_columns();
    let mut after = existing
        .cloned()
        .unwrap_or_else(|| TableSchema::for_kind(kind));
    // A table created by hand or by an older release may lack a fixed column.
    for (name, ty) in fixed {
        after.push(name.to_string(), *ty);
    }

    // Pass 1, in row order: resolve every value's column (creating columns and
    // widening as values come), remembering the index so pass 2 needs no lookups.
    let mut used: Vec<bool> = vec![false; after.len()];
    // Every row's slots, one after the other (a row has one per value).
    let mut slots: Vec<usize> = Vec::with_capacity(rows.iter().map(|p| p.row.values.len()).sum());
    // Rows of a table mostly carry the same columns in the same order: the previous
    // row's column at the same position is tried before the (hashing) index lookup.
    let mut previous = 0..0;
    for p in &rows {
        let start = slots.len();
        for (k, (col, value)) in p.row.values.iter().enumerate() {
            let hint = (k < previous.len()).then(|| slots[previous.start + k]);
            let found = match hint {
                Some(i) if i != OVER_CAP && after.columns[i].0 == **col => Some(i),
                _ => after.index_of(col),
            };
            let slot = match found {
                Some(i) => {
                    // Only a bigint column can widen, and only for a fractional number:
                    // skip inference (timestamp parsing) for everything else.
                    if after.columns[i].1 == ColumnType::Bigint
                        && matches!(value, Value::Number(_))
                        && let Some(ty) = infer(value)
                        && let Some(wider) = widens(ColumnType::Bigint, ty)
                        && !fixed.iter().any(|(f, _)| *f == col.as_ref())
                    {
                        after.columns[i].1 = wider;
                    }
                    i
                }
                None => match infer(value) {
                    None => OVER_CAP, // a null never creates a column
                    Some(_) if after.len() >= MAX_COLUMNS => OVER_CAP,
                    Some(ty) => {
                        after.push(col.to_string(), ty);
                        used.push(false);
                        after.len() - 1
                    }
                },
            };
            if slot != OVER_CAP {
                used[slot] = true;
            }
            slots.push(slot);
        }
        previous = start..slots.len();
    }

    // The written columns: those some row has a value (maybe null) for.
    let mut position: Vec<usize> = vec![OVER_CAP; after.len()];
    let mut columns: Vec<(String, ColumnType)> = Vec::new();
    for (i, col) in after.columns().iter().enumerate() {
        if used[i] {
            position[i] = columns.len();
            columns.push(col.clone());
        }
    }

    // Pass 2: cast every value to its column's final type. Rows are independent now:
    // a large table is cast in two halves on two threads (the other table typed at
    // the same time may be narrower and finish first).
    let width = columns.len();
    let mut all_cells: Vec<Cell> = vec![Cell::Null; rows.len() * width];
    let pass = Pass2 {
        table: &table,
        columns: &columns,
        position: &position,
    };
    let typed_rows = if rows.len() >= split_at.max(2) {
        let mut rows = rows;
        let second = rows.split_off(rows.len() / 2);
        let first_slots: usize = rows.iter().map(|p| p.row.values.len()).sum();
        let (slots_a, slots_b) = slots.split_at(first_slots);
        let (cells_a, cells_b) = all_cells.split_at_mut(rows.len() * width);
        let first_len = rows.len();
        let (mut typed, other) = std::thread::scope(|s| {
            let other = s.spawn(|| pass.rows(second, slots_b, cells_b, first_len));
            (pass.rows(rows, slots_a, cells_a, 0), other.join())
        });
        match other {
            Ok(more) => typed.extend(more),
            Err(panic) => std::panic::resume_unwind(panic),
        }
        typed
    } else {
        pass.rows(rows, &slots, &mut all_cells, 0)
    };

    let (create, add, widen) = match existing {
        None => (true, Vec::new(), Vec::new()),
        Some(old) => {
            let add = after
                .columns()
                .iter()
                .filter(|(n, _)| old.get(n).is_none())
                .cloned()
                .collect();
            let widen = after
                .columns()
                .iter()
                .filter(|(n, t)| old.get(n).is_some_and(|o| o != *t))
                .map(|(n, _)| n.clone())
                .collect();
            (false, add, widen)
        }
    };

    TableLoad {
        table,
        kind,
        create,
        add,
        widen,
        after,
        columns,
        rows: typed_rows,
        cells: all_cells,
    }
}

/// What casting a table's rows needs once its columns are final.
struct Pass2<'a> {
    table: &'a str,
    columns: &'a [(String, ColumnType)],
    /// Column slot (pass 1) → position in `columns`.
    position: &'a [usize],
}

impl Pass2<'_> {
    /// Casts `rows` (whose values' slots are `slots`, one after the other) into
    /// `cells` (theirs, one after the other); the first row is the table's row
    /// `first_at`.
    fn rows(
        &self,
        rows: Vec<Planned>,
        slots: &[usize],
        cells: &mut [Cell],
        first_at: usize,
    ) -> Vec<LoadRow> {
        let width = self.columns.len();
        let mut next_slot = 0;
        rows.into_iter()
            .enumerate()
            .map(|(i, p)| {
                let row = p.row;
                let row_slots = &slots[next_slot..next_slot + row.values.len()];
                next_slot += row.values.len();
                let cells = &mut cells[i * width..(i + 1) * width];
                let mut discards = Vec::new();
                let mut discard = |column: String, value: String, reason: String| {
                    discards.push(Discard {
                        seq: row.seq,
                        table: self.table.to_string(),
                        column,
                        value,
                        reason,
                        row_id: row.key.to_string(),
                        received_at: row.received_at,
                    })
                };
                for ((col, value), &slot) in row.values.into_iter().zip(row_slots) {
                    if slot == OVER_CAP {
                        if !value.is_null() {
                            discard(
                                col.to_string(),
                                value_text(&value),
                                format!("table has reached the limit of {MAX_COLUMNS} columns"),
                            );
                        }
                        continue;
                    }
                    let pos = self.position[slot];
                    match cast_owned(value, self.columns[pos].1) {
                        Ok(cell) => cells[pos] = cell,
                        Err((reason, value)) => {
                            discard(col.to_string(), value_text(&value), reason)
                        }
                    }
                }
                for (col, value, reason) in row.dropped {
                    discard(col, value, reason);
                }
                LoadRow {
                    seq: row.seq,
                    message_id: row.message_id,
                    key: row.key,
                    at: first_at + i,
                    discards,
                }
            })
            .collect()
    }
}

/// The `users` rows to upsert: the updates of `load` whose `identifies` row was
/// inserted by this batch (`inserted` holds those messageIds), merged per user in log
/// order so each user gets one row with its latest non-null values. Returns the rows
/// (aligned with `load.columns`) and the discards of the updates that were applied.
pub fn merge_users(
    load: &TableLoad,
    inserted: &HashSet<String>,
) -> (Vec<(String, Vec<Cell>)>, Vec<Discard>) {
    let mut order: Vec<String> = Vec::new();
    let mut merged: HashMap<String, Vec<Cell>> = HashMap::new();
    let mut discards = Vec::new();
    for row in &load.rows {
        if !inserted.contains(&*row.message_id) {
            continue;
        }
        let cells = merged.entry(row.key.to_string()).or_insert_with(|| {
            order.push(row.key.to_string());
            vec![Cell::Null; load.columns.len()]
        });
        for (i, cell) in load.cells_of(row).iter().enumerate() {
            if !cell.is_null() {
                cells[i] = cell.clone();
            }
        }
        discards.extend(row.discards.iter().cloned());
    }
    let rows = order
        .into_iter()
        .filter_map(|k| merged.remove(&k).map(|cells| (k, cells)))
        .collect();
    (rows, discards)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plan::PlannedRow;
    use serde_json::json;

    fn row(seq: u64, table: &str, kind: TableKind, values: Value) -> (String, Planned) {
        let values = values
            .as_object()
            .expect("object")
            .iter()
            .map(|(k, v)| (k.clone().into(), v.clone()))
            .collect();
        (
            "web".to_string(),
            Planned {
                table: table.into(),
                kind,
                row: PlannedRow {
                    seq,
                    message_id: format!("m{seq}").into(),
                    key: format!("m{seq}").into(),
                    received_at: None,
                    values,
                    dropped: vec![],
                },
            },
        )
    }

    fn now() -> DateTime<Utc> {
        DateTime::from_timestamp(1_800_000_000, 0).expect("valid")
    }

    fn col_type(t: &TableLoad, name: &str) -> Option<ColumnType> {
        t.after.get(name)
    }

    #[test]
    fn creates_new_tables_with_fixed_and_inferred_columns() {
        let b = prepare(
            &HashMap::new(),
            vec![row(
                1,
                "order_completed",
                TableKind::Event,
                json!({"id": "m1", "total": 10, "price": 2.5, "coupon": "X", "paid": true,
                       "shipped_at": "2026-11-27T05:10:53.123Z", "note": null}),
            )],
            1,
            now(),
        );
        let t = &b.schemas[0].tables[0];
        assert!(t.create);
        assert_eq!(t.after.columns()[0], ("id".to_string(), ColumnType::Text));
        assert_eq!(col_type(t, "user_id"), Some(ColumnType::Text));
        assert_eq!(col_type(t, "received_at"), Some(ColumnType::Timestamp));
        assert_eq!(col_type(t, "total"), Some(ColumnType::Bigint));
        assert_eq!(col_type(t, "price"), Some(ColumnType::Double));
        assert_eq!(col_type(t, "coupon"), Some(ColumnType::Text));
        assert_eq!(col_type(t, "paid"), Some(ColumnType::Boolean));
        assert_eq!(col_type(t, "shipped_at"), Some(ColumnType::Timestamp));
        // A column is created only once a non-null value arrives.
        assert_eq!(col_type(t, "note"), None);
        assert!(t.rows[0].discards.is_empty());
    }

    #[test]
    fn first_type_wins_and_mismatches_become_discards() {
        let b = prepare(
            &HashMap::new(),
            vec![
                row(1, "e", TableKind::Event, json!({"id": "m1", "plan": 3})),
                row(2, "e", TableKind::Event, json!({"id": "m2", "plan": "pro"})),
                row(3, "e", TableKind::Event, json!({"id": "m3", "plan": "42"})),
            ],
            3,
            now(),
        );
        let t = &b.schemas[0].tables[0];
        assert_eq!(col_type(t, "plan"), Some(ColumnType::Bigint));
        let i = t
            .columns
            .iter()
            .position(|(n, _)| n == "plan")
            .expect("plan");
        assert_eq!(t.cells_of(&t.rows[0])[i], Cell::Bigint(3));
        assert_eq!(t.cells_of(&t.rows[1])[i], Cell::Null);
        assert_eq!(t.cells_of(&t.rows[2])[i], Cell::Bigint(42));
        assert_eq!(
            t.rows[1].discards,
            vec![Discard {
                seq: 2,
                table: "e".into(),
                column: "plan".into(),
                value: "pro".into(),
                reason: "cannot cast text to bigint".into(),
                row_id: "m2".into(),
                received_at: None,
            }]
        );
    }

    #[test]
    fn bigint_widens_to_double_within_a_batch_and_across_batches() {
        // Within one batch: the earlier integer is loaded as a double.
        let b = prepare(
            &HashMap::new(),
            vec![
                row(1, "e", TableKind::Event, json!({"id": "m1", "amount": 3})),
                row(2, "e", TableKind::Event, json!({"id": "m2", "amount": 3.5})),
            ],
            2,
            now(),
        );
        let t = &b.schemas[0].tables[0];
        assert_eq!(col_type(t, "amount"), Some(ColumnType::Double));
        let i = t
            .columns
            .iter()
            .position(|(n, _)| n == "amount")
            .expect("col");
        assert_eq!(t.cells_of(&t.rows[0])[i], Cell::Double(3.0));
        assert_eq!(t.cells_of(&t.rows[1])[i], Cell::Double(3.5));
        assert!(t.widen.is_empty());

        // Across batches: an existing bigint column is widened by DDL.
        let mut known = HashMap::new();
        known.insert(
            "web".to_string(),
            SchemaState {
                exists: true,
                tables: [("e".to_string(), {
                    let mut s = TableSchema::for_kind(TableKind::Event);
                    s.push("amount".into(), ColumnType::Bigint);
                    s
                })]
                .into_iter()
                .collect(),
            },
        );
        let b = prepare(
            &known,
            vec![row(
                3,
                "e",
                TableKind::Event,
                json!({"id": "m3", "amount": 0.25, "new": "x"}),
            )],
            3,
            now(),
        );
        let t = &b.schemas[0].tables[0];
        assert!(!t.create);
        assert_eq!(t.widen, vec!["amount".to_string()]);
        assert_eq!(t.add, vec![("new".to_string(), ColumnType::Text)]);
        // A double column meeting an integer stays double.
        let b = prepare(
            &HashMap::new(),
            vec![
                row(1, "e", TableKind::Event, json!({"id": "m1", "x": 1.5})),
                row(2, "e", TableKind::Event, json!({"id": "m2", "x": 2})),
            ],
            2,
            now(),
        );
        let t = &b.schemas[0].tables[0];
        let i = t.columns.iter().position(|(n, _)| n == "x").expect("col");
        assert_eq!(t.cells_of(&t.rows[1])[i], Cell::Double(2.0));
    }

    #[test]
    fn fixed_columns_never_change_type() {
        let b = prepare(
            &HashMap::new(),
            vec![row(
                1,
                "e",
                TableKind::Event,
                json!({"id": "m1", "sent_at": "last tuesday", "user_id": "u1"}),
            )],
            1,
            now(),
        );
        let t = &b.schemas[0].tables[0];
        assert_eq!(col_type(t, "sent_at"), Some(ColumnType::Timestamp));
        assert_eq!(t.rows[0].discards.len(), 1);
        assert_eq!(t.rows[0].discards[0].column, "sent_at");
        assert_eq!(
            t.rows[0].discards[0].reason,
            "cannot cast text to timestamp"
        );
    }

    #[test]
    fn stops_adding_columns_at_the_limit() {
        let mut props = serde_json::Map::new();
        props.insert("id".into(), json!("m1"));
        for i in 0..(MAX_COLUMNS + 5) {
            props.insert(format!("p{i}"), json!(i));
        }
        let b = prepare(
            &HashMap::new(),
            vec![row(1, "e", TableKind::Event, Value::Object(props))],
            1,
            now(),
        );
        let t = &b.schemas[0].tables[0];
        assert_eq!(t.after.len(), MAX_COLUMNS);
        let over = MAX_COLUMNS + 5 - (MAX_COLUMNS - TableKind::Event.fixed_columns().len());
        assert_eq!(t.rows[0].discards.len(), over);
        assert!(t.rows[0].discards[0].reason.contains("limit"));
    }

    #[test]
    fn event_tables_stop_at_the_limit_and_rows_stay_in_tracks() {
        let mut state = SchemaState {
            exists: true,
            tables: HashMap::new(),
        };
        for i in 0..MAX_TABLES {
            state
                .tables
                .insert(format!("t{i}"), TableSchema::for_kind(TableKind::Event));
        }
        state
            .tables
            .insert("tracks".into(), TableSchema::for_kind(TableKind::Tracks));
        let known: HashMap<String, SchemaState> = [("web".to_string(), state)].into();
        let b = prepare(
            &known,
            vec![
                row(1, "tracks", TableKind::Tracks, json!({"id": "m1"})),
                row(
                    1,
                    "one_more",
                    TableKind::Event,
                    json!({"id": "m1", "x": 1, "y": null}),
                ),
                row(2, "t7", TableKind::Event, json!({"id": "m2", "x": 2})),
            ],
            2,
            now(),
        );
        let s = &b.schemas[0];
        let names: Vec<&str> = s.tables.iter().map(|t| t.table.as_str()).collect();
        assert_eq!(names, vec!["tracks", "t7"]);
        assert_eq!(s.discards.len(), 1);
        assert_eq!(s.discards[0].table, "one_more");
        assert_eq!(s.discards[0].value, r#"{"id":"m1","x":1}"#);
        assert!(s.discards[0].reason.contains("5000 tables"));
    }

    #[test]
    fn a_table_cast_in_two_halves_equals_one_cast_whole() {
        let rows = || -> Vec<Planned> {
            (0..41u64)
                .map(|i| {
                    let v = match i % 4 {
                        0 => json!({"n": i, "s": format!("x{i}"), "t": "2026-11-27T05:10:53.123Z"}),
                        1 => json!({"n": 1.5, "s": null, "t": "not a time"}),
                        2 => json!({"n": "7", "b": true, "t": null}),
                        _ => json!({"s": i, "b": "maybe"}),
                    };
                    row(i + 1, "e", TableKind::Event, v).1
                })
                .collect()
        };
        let whole = type_table_split(None, "e".into(), TableKind::Event, rows(), usize::MAX);
        let halves = type_table_split(None, "e".into(), TableKind::Event, rows(), 1);
        assert_eq!(whole, halves);
        assert!(whole.rows.iter().any(|r| !r.discards.is_empty()));
        assert_eq!(whole.rows.last().map(|r| r.at), Some(40));
    }

    #[test]
    fn users_load_after_identifies_and_merge_latest_non_null() {
        let b = prepare(
            &HashMap::new(),
            vec![
                row(1, "identifies", TableKind::Identifies, json!({"id": "m1"})),
                {
                    let mut r = row(
                        1,
                        "users",
                        TableKind::Users,
                        json!({"id": "u1", "plan": "free", "age": 30}),
                    );
                    r.1.row.key = "u1".into();
                    r
                },
                row(2, "identifies", TableKind::Identifies, json!({"id": "m2"})),
                {
                    let mut r = row(
                        2,
                        "users",
                        TableKind::Users,
                        json!({"id": "u1", "plan": "pro", "age": null}),
                    );
                    r.1.row.key = "u1".into();
                    r
                },
                row(3, "identifies", TableKind::Identifies, json!({"id": "m3"})),
                {
                    let mut r = row(
                        3,
                        "users",
                        TableKind::Users,
                        json!({"id": "u1", "plan": "gold"}),
                    );
                    r.1.row.key = "u1".into();
                    r
                },
            ],
            3,
            now(),
        );
        let tables = &b.schemas[0].tables;
        assert_eq!(tables[0].table, "identifies");
        assert_eq!(tables[1].table, "users");
        let users = &tables[1];
        // m3's identifies row was a duplicate (not inserted): its update is skipped.
        let inserted: HashSet<String> = ["m1".to_string(), "m2".to_string()].into();
        let (rows, _) = merge_users(users, &inserted);
        assert_eq!(rows.len(), 1);
        let cell = |name: &str| {
            let i = users
                .columns
                .iter()
                .position(|(n, _)| n == name)
                .expect("col");
            rows[0].1[i].clone()
        };
        assert_eq!(rows[0].0, "u1");
        assert_eq!(cell("plan"), Cell::Text("pro".into()));
        assert_eq!(cell("age"), Cell::Bigint(30));
    }
}
