//! What every backend's `POST /api/v1/query` path shares: the statement allowlist
//! ([`guard`]) and the answer's budget ([`Budget`]).
//!
//! Invariants: an answer holds at most `max_rows` rows and at most `max_bytes` bytes
//! of rows as JSON renders them (cells, commas and brackets; the column list is not
//! counted); the first row that would cross either limit is not added, reading stops
//! there and the answer says `truncated` with the [`TruncatedReason`]. Memory held
//! is bounded too: each cell also costs the size of a `serde_json::Value`, and the
//! answer stops (`max_bytes`) when that reaches twice `max_bytes` (plus 1 MiB) — an answer of
//! many tiny cells (`select 1, 1, …` × 10,000 rows) holds far more than it renders. One cell is
//! never longer than [`cell_cap`] bytes (backends cut it where the value is
//! read, on PostgreSQL in the server), so a row of cut cells always fits.

pub mod guard;

use std::time::Duration;

use serde::Serialize;
use serde_json::Value;

/// The bounds of one query.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Limits {
    /// Longest run.
    pub timeout: Duration,
    /// Most rows.
    pub max_rows: usize,
    /// Most rendered bytes of rows.
    pub max_bytes: usize,
}

/// Why an answer holds fewer rows (or shorter cells) than the statement produced.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum TruncatedReason {
    /// [`crate::WarehouseConfig::query_max_rows`] rows were returned.
    MaxRows,
    /// The answer reached [`crate::WarehouseConfig::query_max_bytes`]: rows stopped,
    /// or a cell was cut.
    MaxBytes,
}

/// The longest a cell may be, in bytes, in a result of `columns` columns:
/// half the byte budget shared by the columns (at least 64), so one row of cut
/// ASCII cells always fits in the answer.
pub(crate) fn cell_cap(max_bytes: usize, columns: usize) -> usize {
    (max_bytes / (2 * columns.max(1))).max(64)
}

/// Counts the rows and rendered bytes of an answer as it is built.
#[derive(Debug)]
pub(crate) struct Budget {
    max_rows: usize,
    max_bytes: usize,
    rows: usize,
    bytes: usize,
    /// Rendered bytes plus one `Value` per cell: what the answer holds in memory.
    held: usize,
    stopped: bool,
    /// Set when a row was refused or a cell cut.
    pub(crate) truncated: Option<TruncatedReason>,
}

impl Budget {
    pub(crate) fn new(max_rows: usize, max_bytes: usize) -> Budget {
        Budget {
            max_rows,
            max_bytes,
            rows: 0,
            bytes: 2,
            held: 0,
            stopped: false,
            truncated: None,
        }
    }

    /// Records that a cell was cut to [`cell_cap`].
    pub(crate) fn cell_cut(&mut self) {
        self.truncated.get_or_insert(TruncatedReason::MaxBytes);
    }

    /// Admits the next `row` if it fits; `false` (reason set) means stop reading.
    pub(crate) fn admit(&mut self, row: &[Value]) -> bool {
        if self.stopped {
            return false;
        }
        if self.rows >= self.max_rows {
            self.stopped = true;
            self.truncated.get_or_insert(TruncatedReason::MaxRows);
            return false;
        }
        let mut n = 2 + row.len().saturating_sub(1) + usize::from(self.rows > 0);
        for v in row {
            n += rendered_len(v);
        }
        let held = n + std::mem::size_of_val(row);
        if self.bytes + n > self.max_bytes
            || self.held + held > self.max_bytes.saturating_mul(2).saturating_add(1 << 20)
        {
            self.stopped = true;
            self.truncated = Some(TruncatedReason::MaxBytes);
            return false;
        }
        self.bytes += n;
        self.held += held;
        self.rows += 1;
        true
    }
}

/// Bytes of `v` as compact JSON, without building the text.
pub(crate) fn rendered_len(v: &Value) -> usize {
    struct Count(usize);
    impl std::io::Write for Count {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0 += buf.len();
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let mut c = Count(0);
    let _ = serde_json::to_writer(&mut c, v);
    c.0
}

/// `s` cut to at most `cap` bytes on a character boundary; `None` when it is not
/// longer.
pub(crate) fn cut_str(s: &str, cap: usize) -> Option<&str> {
    if s.len() <= cap {
        return None;
    }
    let mut end = cap;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    Some(&s[..end])
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn counts_rows_as_rendered_and_stops_at_the_cap() {
        // [["abc",1]] is 11 bytes.
        let mut b = Budget::new(100, 2 + 9 + 10);
        assert!(b.admit(&[json!("abc"), json!(1)]));
        assert_eq!(b.truncated, None);
        // ,["abc",1] is 10 more: exactly at the cap.
        assert!(b.admit(&[json!("abc"), json!(1)]));
        assert!(!b.admit(&[json!("a")]));
        assert_eq!(b.truncated, Some(TruncatedReason::MaxBytes));
        assert_eq!(
            serde_json::to_string(&vec![vec![json!("abc"), json!(1)]; 2])
                .unwrap()
                .len(),
            21
        );
    }

    #[test]
    fn stops_at_the_row_cap() {
        let mut b = Budget::new(2, 1 << 20);
        assert!(b.admit(&[json!(1)]));
        assert!(b.admit(&[json!(2)]));
        assert!(!b.admit(&[json!(3)]));
        assert_eq!(b.truncated, Some(TruncatedReason::MaxRows));
    }

    #[test]
    fn a_cut_cell_marks_the_answer_but_rows_go_on() {
        let mut b = Budget::new(10, 1 << 20);
        b.cell_cut();
        assert!(b.admit(&[json!("x")]));
        assert_eq!(b.truncated, Some(TruncatedReason::MaxBytes));
    }

    #[test]
    fn many_tiny_cells_stop_at_twice_the_cap_in_memory() {
        let mut b = Budget::new(usize::MAX, 1 << 20);
        let row = vec![json!(1); 100];
        let mut rows = 0;
        while b.admit(&row) {
            rows += 1;
        }
        // 100 cells render as ~200 bytes but hold 100 Values.
        let held = rows * 100 * std::mem::size_of::<Value>();
        assert!(held <= 3 << 20 && held > 2 << 20, "{rows} rows");
        assert_eq!(b.truncated, Some(TruncatedReason::MaxBytes));
    }

    #[test]
    fn escapes_are_counted() {
        assert_eq!(rendered_len(&json!("\u{1}")), 8);
        assert_eq!(rendered_len(&json!(null)), 4);
    }

    #[test]
    fn cuts_on_character_boundaries() {
        assert_eq!(cut_str("héllo", 3), Some("hé"));
        assert_eq!(cut_str("héllo", 2), Some("h"));
        assert_eq!(cut_str("hé", 3), None);
        assert_eq!(cell_cap(16 << 20, 1), 8 << 20);
        assert_eq!(cell_cap(1000, 100), 64);
    }
}
