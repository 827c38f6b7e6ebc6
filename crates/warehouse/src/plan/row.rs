//! Building one planned row: the common columns, nested objects flattened by
//! model's rule, and keys that snake-case to the same column resolved (the first
//! value kept, the others reported). Invariant: a row never holds two values for one
//! column.

use chrono::{DateTime, Utc};
use serde_json::value::RawValue;
use serde_json::{Map, Value};
use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use super::parse::Object;
use super::text::FlattenText;
use super::{Name, Names, PlannedRow, TableKind, Unplanned};
use crate::types::{ColumnType, value_text};

pub(super) struct Base<'a> {
    pub(super) seq: u64,
    pub(super) message_id: Arc<str>,
    /// The messageId for the first row's `id` column (moved there).
    pub(super) id: Option<String>,
    pub(super) received_at: Option<DateTime<Utc>>,
    pub(super) received_at_text: Option<String>,
    pub(super) uuid_ts: &'a str,
    pub(super) anonymous_id: Option<String>,
    pub(super) user_id: Option<String>,
    pub(super) sent_at: Option<Value>,
    pub(super) timestamp: Option<Value>,
    pub(super) original_timestamp: Option<Value>,
}

impl Base<'_> {
    /// A row with the common columns filled and room for `leaves` more values. The
    /// common values move into it: called once per record.
    pub(super) fn row(&mut self, kind: TableKind, leaves: usize) -> RowBuilder {
        let mut b = RowBuilder::new(kind, self, self.message_id.clone(), leaves);
        let id = self
            .id
            .take()
            .unwrap_or_else(|| self.message_id.to_string());
        b.push(&"id", Value::String(id));
        b.push(
            &"anonymous_id",
            self.anonymous_id.take().map_or(Value::Null, Value::String),
        );
        b.push(
            &"user_id",
            self.user_id.take().map_or(Value::Null, Value::String),
        );
        b.push(
            &"received_at",
            self.received_at_text
                .clone()
                .map_or(Value::Null, Value::String),
        );
        b.push(&"sent_at", self.sent_at.take().unwrap_or(Value::Null));
        b.push(&"timestamp", self.timestamp.take().unwrap_or(Value::Null));
        b.push(
            &"original_timestamp",
            self.original_timestamp.take().unwrap_or(Value::Null),
        );
        b.push(&"uuid_ts", Value::String(self.uuid_ts.to_string()));
        b
    }
}

pub(super) struct RowBuilder {
    fixed: &'static [(&'static str, ColumnType)],
    row: PlannedRow,
    /// An object was flattened from text (repeated keys are not merged then).
    from_text: bool,
    /// An object's text did not parse.
    failed: bool,
}

impl RowBuilder {
    /// A row with room for its fixed columns and `leaves` more values: rows are
    /// allocated once, at their size (a small allocation, not a growing one).
    pub(super) fn new(kind: TableKind, base: &Base<'_>, key: Arc<str>, leaves: usize) -> Self {
        let fixed = kind.fixed_columns();
        RowBuilder {
            fixed,
            row: PlannedRow {
                seq: base.seq,
                message_id: base.message_id.clone(),
                key,
                received_at: base.received_at,
                values: Vec::with_capacity(fixed.len() + leaves),
                dropped: Vec::new(),
            },
            from_text: false,
            failed: false,
        }
    }

    /// Continues from a copy of a finished row (the event table starts as the
    /// `tracks` row), with room for `leaves` more values.
    pub(super) fn from_row(row: &PlannedRow, kind: TableKind, leaves: usize) -> Self {
        let mut values = Vec::with_capacity(row.values.len() + leaves);
        values.extend(row.values.iter().cloned());
        RowBuilder {
            fixed: kind.fixed_columns(),
            row: PlannedRow {
                seq: row.seq,
                message_id: row.message_id.clone(),
                key: row.key.clone(),
                received_at: row.received_at,
                values,
                dropped: row.dropped.clone(),
            },
            from_text: false,
            failed: false,
        }
    }

    /// Sets a fixed column.
    pub(super) fn push(&mut self, column: &'static &'static str, value: Value) {
        self.row.values.push((Name::Fixed(column), value));
    }

    /// Adds the `context_*` columns.
    pub(super) fn context(&mut self, context: Option<Object<'_>>, names: &mut Names) {
        match context {
            Some(Object::Map(ctx)) => self.flatten(ctx, "context", true, names),
            Some(Object::Raw(ctx)) => self.flatten_text(ctx, "context", true, names),
            None => {}
        }
    }

    /// Adds the un-prefixed columns of `properties` or `traits`.
    pub(super) fn object(&mut self, object: Option<Object<'_>>, names: &mut Names) {
        match object {
            Some(Object::Map(object)) => self.flatten(object, "", false, names),
            Some(Object::Raw(object)) => self.flatten_text(object, "", false, names),
            None => {}
        }
    }

    /// [`RowBuilder::flatten`] reading the object's text directly: no map is built,
    /// keys without escapes are not copied, and only leaves are allocated. A key
    /// repeated in an object (the general parse keeps the last value) or text that
    /// does not parse sends the record to the general parse.
    pub(super) fn flatten_text(
        &mut self,
        object: &RawValue,
        prefix: &str,
        is_context: bool,
        names: &mut Names,
    ) {
        self.from_text = true;
        let mut path = std::mem::take(&mut names.path);
        path.clear();
        path.push_str(prefix);
        let mut flatten = FlattenText {
            out: &mut self.row.values,
            fixed: self.fixed,
            is_context,
            names,
            path: &mut path,
            depth: 0,
        };
        if flatten.object(object.get()).is_err() {
            self.failed = true;
        }
        names.path = path;
    }

    /// Adds one column per leaf of `object` by model's one flattening rule
    /// ([`tributary_model::flatten::flatten_owned`]: depth first, keys joined with `_`,
    /// arrays as JSON text, empty objects nothing), each joined path named once per
    /// batch through `names`. The text path (module `text`) is held equal to this
    /// rule by the planner's proptests.
    fn flatten(
        &mut self,
        object: Map<String, Value>,
        prefix: &str,
        is_context: bool,
        names: &mut Names,
    ) {
        let fixed = self.fixed;
        for (path, leaf) in tributary_model::flatten::flatten_owned(object, prefix) {
            let col = names.column(fixed, is_context, &path);
            self.row.values.push((Name::Shared(col), leaf));
        }
    }

    /// Resolves keys that snake-cased to the same column: the first non-null value is
    /// kept, any other non-null value is reported in `dropped`. An object flattened
    /// from text with such keys (maybe a repeated key) or that did not parse asks for
    /// the general parse instead.
    pub(super) fn finish(mut self) -> Result<PlannedRow, Unplanned> {
        if self.failed {
            return Err(Unplanned::General);
        }
        let values = &mut self.row.values;
        if !has_duplicate_names(values) {
            return Ok(self.row);
        }
        if self.from_text {
            return Err(Unplanned::General);
        }
        let mut duplicates: Vec<(usize, usize)> = Vec::new();
        {
            let mut first: HashMap<&str, usize> = HashMap::with_capacity(values.len());
            for (i, (col, _)) in values.iter().enumerate() {
                if let Some(&j) = first.get(col.as_ref()) {
                    duplicates.push((i, j));
                } else {
                    first.insert(col.as_ref(), i);
                }
            }
        }
        for &(i, j) in &duplicates {
            if values[j].1.is_null() {
                values[j].1 = std::mem::take(&mut values[i].1);
            } else if !values[i].1.is_null() {
                let value = value_text(&values[i].1);
                self.row.dropped.push((
                    values[i].0.to_string(),
                    value,
                    "another key of the message has the same column name".into(),
                ));
            }
        }
        let remove: HashSet<usize> = duplicates.iter().map(|(i, _)| *i).collect();
        let kept = std::mem::take(values)
            .into_iter()
            .enumerate()
            .filter(|(i, _)| !remove.contains(i))
            .map(|(_, v)| v)
            .collect();
        self.row.values = kept;
        Ok(self.row)
    }
}

/// How many columns an object flattens into (at most: empty objects give none; for
/// text, the number of `:` — every key has one, and a few strings do).
pub(super) fn leaves(object: &Option<Object<'_>>) -> usize {
    fn count(m: &Map<String, Value>) -> usize {
        m.values()
            .map(|v| match v {
                Value::Object(child) => count(child),
                _ => 1,
            })
            .sum()
    }
    match object {
        None => 0,
        Some(Object::Map(m)) => count(m),
        Some(Object::Raw(r)) => r.get().bytes().filter(|&b| b == b':').count(),
    }
}

/// Whether two values of a row have the same column name. Rows rarely have
/// duplicates: small rows are compared pairwise without allocating.
fn has_duplicate_names(values: &[(Name, Value)]) -> bool {
    if values.len() <= 48 {
        return values
            .iter()
            .enumerate()
            .any(|(i, (a, _))| values[i + 1..].iter().any(|(b, _)| **a == **b));
    }
    let mut sorted: Vec<&str> = values.iter().map(|(c, _)| c.as_ref()).collect();
    sorted.sort_unstable();
    sorted.windows(2).any(|w| w[0] == w[1])
}
