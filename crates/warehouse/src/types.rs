//! Column types: what a JSON value is inferred as, how a value is cast into an existing
//! column, and when a column widens.
//!
//! The five types are [`ColumnType::Timestamp`] (ISO-8601 strings that parse, stored
//! UTC), [`ColumnType::Bigint`], [`ColumnType::Double`], [`ColumnType::Boolean`] and
//! [`ColumnType::Text`]. Rules (DESIGN.md §4):
//! - the first non-null value seen creates the column with its inferred type;
//! - a `bigint` column that meets a fractional number widens to `double` — the only
//!   widening, see [`widens`];
//! - any other value is cast best-effort ([`cast`]): numbers and booleans to text,
//!   numeric strings to numbers, `"true"`/`"false"` to booleans, parseable strings to
//!   timestamps; what cannot be cast is loaded as NULL and reported as a discard reason.
//!
//! Invariants: pure functions, no panics on any JSON; a cast never loses information
//! silently (it either succeeds exactly or yields a reason).

use chrono::{DateTime, NaiveDateTime, SecondsFormat, Utc};
use serde::Serialize;
use serde_json::Value;

/// The type of a warehouse column.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ColumnType {
    /// A point in time, UTC (`timestamptz` on PostgreSQL, ISO-8601 text on SQLite).
    Timestamp,
    /// A 64-bit integer.
    Bigint,
    /// A 64-bit float.
    Double,
    /// `true` / `false` (0/1 on SQLite).
    Boolean,
    /// Text of any length.
    Text,
}

impl ColumnType {
    /// The name used in the admin API (`timestamp|bigint|double|boolean|text`).
    pub fn as_str(self) -> &'static str {
        match self {
            ColumnType::Timestamp => "timestamp",
            ColumnType::Bigint => "bigint",
            ColumnType::Double => "double",
            ColumnType::Boolean => "boolean",
            ColumnType::Text => "text",
        }
    }
}

impl std::fmt::Display for ColumnType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A typed value ready to be written.
#[derive(Debug, Clone, PartialEq)]
pub enum Cell {
    /// SQL NULL.
    Null,
    /// A `bigint` value.
    Bigint(i64),
    /// A `double` value (always finite).
    Double(f64),
    /// A `boolean` value.
    Boolean(bool),
    /// A `text` value.
    Text(String),
    /// A `timestamp` value.
    Timestamp(DateTime<Utc>),
}

impl Cell {
    /// True for [`Cell::Null`].
    pub fn is_null(&self) -> bool {
        matches!(self, Cell::Null)
    }
}

/// The type a column created for `value` gets; `None` for null (no column is created
/// for a null). Arrays and objects are never passed here (flattening turns arrays into
/// JSON text and objects into columns); should one arrive, it is text.
pub fn infer(value: &Value) -> Option<ColumnType> {
    match value {
        Value::Null => None,
        Value::Bool(_) => Some(ColumnType::Boolean),
        Value::Number(n) => Some(if n.is_i64() {
            ColumnType::Bigint
        } else {
            ColumnType::Double
        }),
        Value::String(s) => Some(if parse_timestamp(s).is_some() {
            ColumnType::Timestamp
        } else {
            ColumnType::Text
        }),
        Value::Array(_) | Value::Object(_) => Some(ColumnType::Text),
    }
}

/// Whether a column of type `column` is widened when it meets a value inferred as
/// `value`: only `bigint` meeting `double` (to `double`).
pub fn widens(column: ColumnType, value: ColumnType) -> Option<ColumnType> {
    match (column, value) {
        (ColumnType::Bigint, ColumnType::Double) => Some(ColumnType::Double),
        _ => None,
    }
}

/// Casts `value` into a column of type `ty`. `Err` carries the discard reason.
pub fn cast(value: &Value, ty: ColumnType) -> Result<Cell, String> {
    let fail = || Err(format!("cannot cast {} to {}", kind(value), ty));
    // PostgreSQL text cannot hold NUL; refuse it on every backend alike.
    if let Value::String(s) = value
        && s.contains('\0')
    {
        return Err("text contains a NUL character".into());
    }
    match (ty, value) {
        (_, Value::Null) => Ok(Cell::Null),
        (ColumnType::Text, Value::String(s)) => Ok(Cell::Text(s.clone())),
        (ColumnType::Text, Value::Bool(b)) => Ok(Cell::Text(b.to_string())),
        (ColumnType::Text, Value::Number(n)) => Ok(Cell::Text(n.to_string())),
        (ColumnType::Text, other) => Ok(Cell::Text(tributary_model::flatten::array_text(other))),

        (ColumnType::Bigint, Value::Number(n)) => match n.as_i64() {
            Some(i) => Ok(Cell::Bigint(i)),
            None => fail(),
        },
        (ColumnType::Bigint, Value::String(s)) => match s.trim().parse::<i64>() {
            Ok(i) => Ok(Cell::Bigint(i)),
            Err(_) => fail(),
        },

        (ColumnType::Double, Value::Number(n)) => match n.as_f64() {
            Some(f) if f.is_finite() => Ok(Cell::Double(f)),
            _ => fail(),
        },
        (ColumnType::Double, Value::String(s)) => match s.trim().parse::<f64>() {
            Ok(f) if f.is_finite() => Ok(Cell::Double(f)),
            _ => fail(),
        },

        (ColumnType::Boolean, Value::Bool(b)) => Ok(Cell::Boolean(*b)),
        (ColumnType::Boolean, Value::String(s)) => {
            if s.eq_ignore_ascii_case("true") {
                Ok(Cell::Boolean(true))
            } else if s.eq_ignore_ascii_case("false") {
                Ok(Cell::Boolean(false))
            } else {
                fail()
            }
        }

        (ColumnType::Timestamp, Value::String(s)) => match parse_timestamp(s) {
            Some(t) => Ok(Cell::Timestamp(t)),
            None => fail(),
        },

        _ => fail(),
    }
}

/// [`cast`] for a value the caller owns: strings are moved into the cell. On failure
/// the value comes back with the reason.
pub fn cast_owned(value: Value, ty: ColumnType) -> Result<Cell, (String, Value)> {
    match (ty, value) {
        (ColumnType::Text, Value::String(s)) if !s.contains('\0') => Ok(Cell::Text(s)),
        (_, value) => cast(&value, ty).map_err(|reason| (reason, value)),
    }
}

/// How a value is described in a discard reason.
fn kind(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "boolean",
        Value::Number(n) if n.is_i64() => "bigint",
        Value::Number(_) => "double",
        Value::String(s) if parse_timestamp(s).is_some() => "timestamp",
        Value::String(_) => "text",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    }
}

/// The text stored in `tributary_discards.column_value` for a value.
pub fn value_text(value: &Value) -> String {
    match value {
        Value::String(s) => s.clone(),
        other => tributary_model::flatten::array_text(other),
    }
}

/// Parses an ISO-8601 / RFC 3339 date-time: `2026-11-27T05:10:53.123Z`,
/// `2026-11-27T07:10:53+02:00`, `2026-11-27 05:10:53Z`, or without a zone
/// (`2026-11-27T05:10:53.123`, taken as UTC). Dates alone, times alone, epoch numbers
/// and free text are not timestamps.
pub fn parse_timestamp(s: &str) -> Option<DateTime<Utc>> {
    // Cheap shape check first: every accepted form starts `YYYY-MM-DD?HH:MM`.
    let b = s.as_bytes();
    if let Some(t) = parse_canonical(b) {
        return Some(t);
    }
    if b.len() < 16
        || b.len() > 40
        || !b[..4].iter().all(u8::is_ascii_digit)
        || b[4] != b'-'
        || b[7] != b'-'
        || !matches!(b[10], b'T' | b't' | b' ')
        || b[13] != b':'
    {
        return None;
    }
    if let Ok(t) = DateTime::parse_from_rfc3339(s) {
        return Some(t.with_timezone(&Utc));
    }
    // RFC 3339 requires `T`; accept a space separator too.
    let mut owned = s.to_string();
    owned.replace_range(10..11, "T");
    if let Ok(t) = DateTime::parse_from_rfc3339(&owned) {
        return Some(t.with_timezone(&Utc));
    }
    for fmt in ["%Y-%m-%dT%H:%M:%S%.f", "%Y-%m-%dT%H:%M"] {
        if let Ok(t) = NaiveDateTime::parse_from_str(&owned, fmt) {
            return Some(t.and_utc());
        }
    }
    None
}

/// Fast path for the form ingest stores, `YYYY-MM-DDTHH:MM:SS.sssZ` (also without the
/// milliseconds); anything else goes to the general parser.
fn parse_canonical(b: &[u8]) -> Option<DateTime<Utc>> {
    let millis = match b.len() {
        24 if b[19] == b'.' && b[23] == b'Z' => digits(&b[20..23])?,
        20 if b[19] == b'Z' => 0,
        _ => return None,
    };
    if b[4] != b'-' || b[7] != b'-' || b[10] != b'T' || b[13] != b':' || b[16] != b':' {
        return None;
    }
    let date = chrono::NaiveDate::from_ymd_opt(
        i32::try_from(digits(&b[0..4])?).ok()?,
        digits(&b[5..7])?,
        digits(&b[8..10])?,
    )?;
    let time = date.and_hms_milli_opt(
        digits(&b[11..13])?,
        digits(&b[14..16])?,
        digits(&b[17..19])?,
        millis,
    )?;
    Some(time.and_utc())
}

fn digits(b: &[u8]) -> Option<u32> {
    b.iter().try_fold(0u32, |acc, &c| {
        c.is_ascii_digit().then(|| acc * 10 + u32::from(c - b'0'))
    })
}

/// The canonical text of a timestamp: `2026-11-27T05:10:53.123Z` (UTC, milliseconds).
/// SQLite stores timestamps in this form, which sorts correctly as text and is
/// understood by SQLite's date functions.
pub fn format_timestamp(t: &DateTime<Utc>) -> String {
    use chrono::{Datelike, Timelike};
    let year = t.year();
    if !(0..=9999).contains(&year) {
        return t.to_rfc3339_opts(SecondsFormat::Millis, true);
    }
    // Every timestamp cell of every row is bound as this text: written digit by
    // digit (the profile showed `format!` here as an eighth of the loader's CPU).
    tributary_model::normalize::utc_millis_text(
        year as u32,
        t.month(),
        t.day(),
        t.hour(),
        t.minute(),
        t.second(),
        (t.nanosecond() % 1_000_000_000) / 1_000_000,
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn ts(s: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(s)
            .expect("valid")
            .with_timezone(&Utc)
    }

    #[test]
    fn infers_the_five_types() {
        assert_eq!(infer(&json!(null)), None);
        assert_eq!(infer(&json!(true)), Some(ColumnType::Boolean));
        assert_eq!(infer(&json!(42)), Some(ColumnType::Bigint));
        assert_eq!(infer(&json!(-7)), Some(ColumnType::Bigint));
        assert_eq!(infer(&json!(4.5)), Some(ColumnType::Double));
        assert_eq!(infer(&json!(1e300)), Some(ColumnType::Double));
        // Larger than i64: not representable as bigint.
        assert_eq!(
            infer(&json!(18446744073709551615u64)),
            Some(ColumnType::Double)
        );
        assert_eq!(infer(&json!("hello")), Some(ColumnType::Text));
        assert_eq!(
            infer(&json!("2026-11-27T05:10:53.123Z")),
            Some(ColumnType::Timestamp)
        );
        assert_eq!(infer(&json!("[1,2]")), Some(ColumnType::Text));
        assert_eq!(infer(&json!("42")), Some(ColumnType::Text));
    }

    #[test]
    fn recognises_iso_8601_timestamps_only() {
        let expected = ts("2026-11-27T05:10:53.123Z");
        assert_eq!(parse_timestamp("2026-11-27T05:10:53.123Z"), Some(expected));
        assert_eq!(
            parse_timestamp("2026-11-27T07:10:53.123+02:00"),
            Some(expected)
        );
        assert_eq!(parse_timestamp("2026-11-27 05:10:53.123Z"), Some(expected));
        assert_eq!(parse_timestamp("2026-11-27t05:10:53.123z"), Some(expected));
        assert_eq!(parse_timestamp("2026-11-27T05:10:53.123"), Some(expected));
        assert_eq!(
            parse_timestamp("2026-11-27T05:10"),
            Some(ts("2026-11-27T05:10:00Z"))
        );
        for not in [
            "2026-11-27",
            "05:10:53",
            "1764220253",
            "yesterday",
            "2026-13-45T99:99:99Z",
            "2026-11-27T05:10:53.123Zjunk",
            "",
            "Fri, 27 Nov 2026 05:10:53 GMT",
        ] {
            assert_eq!(parse_timestamp(not), None, "{not:?}");
        }
    }

    #[test]
    fn the_fast_path_agrees_with_the_general_parser() {
        for s in [
            "2026-11-27T05:10:53.123Z",
            "2026-11-27T05:10:53Z",
            "2024-02-29T23:59:59.999Z",
            "0001-01-01T00:00:00.000Z",
        ] {
            let general = DateTime::parse_from_rfc3339(s)
                .expect("valid")
                .with_timezone(&Utc);
            assert_eq!(parse_canonical(s.as_bytes()), Some(general), "{s}");
            assert_eq!(parse_timestamp(s), Some(general), "{s}");
        }
        for s in [
            "2025-02-29T00:00:00.000Z",
            "2026-11-27T25:10:53.123Z",
            "2026-11-27T05:10:53.12xZ",
            "2026-11-27 05:10:53.123Z",
        ] {
            assert_eq!(parse_canonical(s.as_bytes()), None, "{s}");
        }
    }

    #[test]
    fn formats_timestamps_canonically() {
        let t = ts("2026-11-27T05:10:53.123456Z");
        assert_eq!(
            format_timestamp(&t),
            t.to_rfc3339_opts(SecondsFormat::Millis, true)
        );
        let far = chrono::NaiveDate::from_ymd_opt(12026, 1, 1)
            .and_then(|d| d.and_hms_opt(0, 0, 0))
            .expect("valid")
            .and_utc();
        assert_eq!(
            format_timestamp(&far),
            far.to_rfc3339_opts(SecondsFormat::Millis, true)
        );
        assert_eq!(
            format_timestamp(&ts("2026-11-27T07:10:53.1+02:00")),
            "2026-11-27T05:10:53.100Z"
        );
        assert_eq!(
            format_timestamp(&ts("2026-11-27T05:10:53Z")),
            "2026-11-27T05:10:53.000Z"
        );
    }

    #[test]
    fn casts_values_that_fit() {
        assert_eq!(cast(&json!(5), ColumnType::Bigint), Ok(Cell::Bigint(5)));
        assert_eq!(cast(&json!("17"), ColumnType::Bigint), Ok(Cell::Bigint(17)));
        assert_eq!(cast(&json!(5), ColumnType::Double), Ok(Cell::Double(5.0)));
        assert_eq!(
            cast(&json!("2.5"), ColumnType::Double),
            Ok(Cell::Double(2.5))
        );
        assert_eq!(
            cast(&json!(true), ColumnType::Boolean),
            Ok(Cell::Boolean(true))
        );
        assert_eq!(
            cast(&json!("FALSE"), ColumnType::Boolean),
            Ok(Cell::Boolean(false))
        );
        assert_eq!(
            cast(&json!(5), ColumnType::Text),
            Ok(Cell::Text("5".into()))
        );
        assert_eq!(
            cast(&json!(2.5), ColumnType::Text),
            Ok(Cell::Text("2.5".into()))
        );
        assert_eq!(
            cast(&json!(true), ColumnType::Text),
            Ok(Cell::Text("true".into()))
        );
        assert_eq!(
            cast(&json!("2026-11-27T05:10:53.123Z"), ColumnType::Text),
            Ok(Cell::Text("2026-11-27T05:10:53.123Z".into()))
        );
        assert_eq!(
            cast(&json!("2026-11-27T05:10:53.123Z"), ColumnType::Timestamp),
            Ok(Cell::Timestamp(ts("2026-11-27T05:10:53.123Z")))
        );
        for ty in [
            ColumnType::Text,
            ColumnType::Bigint,
            ColumnType::Double,
            ColumnType::Boolean,
            ColumnType::Timestamp,
        ] {
            assert_eq!(cast(&json!(null), ty), Ok(Cell::Null));
        }
    }

    #[test]
    fn refuses_values_that_do_not_fit_with_a_reason() {
        assert_eq!(
            cast(&json!("abc"), ColumnType::Bigint),
            Err("cannot cast text to bigint".into())
        );
        assert_eq!(
            cast(&json!(1.5), ColumnType::Bigint),
            Err("cannot cast double to bigint".into())
        );
        assert_eq!(
            cast(&json!(true), ColumnType::Bigint),
            Err("cannot cast boolean to bigint".into())
        );
        assert_eq!(
            cast(&json!("NaN"), ColumnType::Double),
            Err("cannot cast text to double".into())
        );
        assert_eq!(
            cast(&json!("inf"), ColumnType::Double),
            Err("cannot cast text to double".into())
        );
        assert_eq!(
            cast(&json!(1), ColumnType::Boolean),
            Err("cannot cast bigint to boolean".into())
        );
        assert_eq!(
            cast(&json!("yes"), ColumnType::Boolean),
            Err("cannot cast text to boolean".into())
        );
        assert_eq!(
            cast(&json!("not a date"), ColumnType::Timestamp),
            Err("cannot cast text to timestamp".into())
        );
        assert_eq!(
            cast(&json!(1764220253), ColumnType::Timestamp),
            Err("cannot cast bigint to timestamp".into())
        );
        assert_eq!(
            cast(&json!(18446744073709551615u64), ColumnType::Bigint),
            Err("cannot cast double to bigint".into())
        );
    }

    #[test]
    fn only_bigint_widens_and_only_to_double() {
        assert_eq!(
            widens(ColumnType::Bigint, ColumnType::Double),
            Some(ColumnType::Double)
        );
        let all = [
            ColumnType::Text,
            ColumnType::Bigint,
            ColumnType::Double,
            ColumnType::Boolean,
            ColumnType::Timestamp,
        ];
        for c in all {
            for v in all {
                if (c, v) != (ColumnType::Bigint, ColumnType::Double) {
                    assert_eq!(widens(c, v), None, "{c} meets {v}");
                }
            }
        }
    }

    #[test]
    fn refuses_text_with_nul_characters() {
        for ty in [ColumnType::Text, ColumnType::Bigint, ColumnType::Timestamp] {
            assert_eq!(
                cast(&json!("a\u{0}b"), ty),
                Err("text contains a NUL character".into())
            );
        }
    }

    #[test]
    fn discard_values_are_text() {
        assert_eq!(value_text(&json!("abc")), "abc");
        assert_eq!(value_text(&json!(1.5)), "1.5");
        assert_eq!(value_text(&json!(false)), "false");
    }
}
