//! Column and table names of planned rows: [`Name`] (fixed or shared) and
//! [`Names`], the per-thread cache that snake-cases each distinct path once.
//! Invariant: a cached name is exactly what `naming` computes for the same input.

use std::collections::HashMap;
use std::sync::Arc;

use crate::naming::{column_name_by, event_table};
use crate::types::ColumnType;

/// A column name in a planned row: a fixed column's `'static` name, or a property's
/// or context's name shared by every row that has it (interned by [`Names`], so a
/// row costs no allocation per column name). One pointer wide, so a row's values
/// stay small allocations.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Name {
    /// A fixed column.
    Fixed(&'static &'static str),
    /// A name computed once per planning thread and batch.
    Shared(Arc<String>),
}

impl std::ops::Deref for Name {
    type Target = str;
    fn deref(&self) -> &str {
        match self {
            Name::Fixed(s) => s,
            Name::Shared(s) => s,
        }
    }
}

impl AsRef<str> for Name {
    fn as_ref(&self) -> &str {
        self
    }
}

impl PartialEq<str> for Name {
    fn eq(&self, other: &str) -> bool {
        &**self == other
    }
}

impl PartialEq<&str> for Name {
    fn eq(&self, other: &&str) -> bool {
        &**self == *other
    }
}

impl From<String> for Name {
    fn from(s: String) -> Self {
        Name::Shared(Arc::new(s))
    }
}

impl From<&str> for Name {
    fn from(s: &str) -> Self {
        Name::Shared(Arc::new(s.to_string()))
    }
}

impl std::fmt::Display for Name {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self)
    }
}

/// Flattened path → column name.
type NameMap = HashMap<Box<str>, Arc<String>>;

/// Column and table names already computed by one planning thread: snake-casing and
/// collision rules run once per distinct path, not once per row.
#[derive(Default)]
pub struct Names {
    /// Per (fixed columns of the table kind, is context): flattened path → column.
    columns: Vec<(usize, bool, NameMap)>,
    /// Event name → table name.
    tables: HashMap<Box<str>, Arc<String>>,
    /// Scratch buffer for flattened paths.
    pub(super) path: String,
}

impl Names {
    /// The column of flattened `path` in a table with `fixed` columns.
    pub(super) fn column(
        &mut self,
        fixed: &'static [(&'static str, ColumnType)],
        is_context: bool,
        path: &str,
    ) -> Arc<String> {
        let id = fixed.as_ptr() as usize;
        let at = match self
            .columns
            .iter()
            .position(|(f, c, _)| *f == id && *c == is_context)
        {
            Some(at) => at,
            None => {
                self.columns.push((id, is_context, HashMap::new()));
                self.columns.len() - 1
            }
        };
        let map = &mut self.columns[at].2;
        if let Some(name) = map.get(path) {
            return name.clone();
        }
        let name = Arc::new(column_name_by(
            path,
            |n| fixed.iter().any(|(f, _)| *f == n),
            is_context,
        ));
        map.insert(path.into(), name.clone());
        name
    }

    /// The table of an event name.
    pub(super) fn event_table(&mut self, event: &str) -> Arc<String> {
        if let Some(t) = self.tables.get(event) {
            return t.clone();
        }
        let t = Arc::new(event_table(event));
        self.tables.insert(event.into(), t.clone());
        t
    }
}
