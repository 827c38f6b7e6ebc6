//! Binary `COPY … FROM STDIN` written straight into large buffers.
//!
//! PostgreSQL's binary copy format is a header, one tuple per row (a 16-bit field
//! count, then per field a 32-bit length, `-1` for NULL, and the value in its binary
//! send format) and a `-1` trailer. Rows are encoded here directly into a buffer that
//! is handed to the connection in chunks of [`CHUNK_BYTES`] — no per-value
//! allocation, no per-row flush — so the server starts inserting the first chunk
//! while the next one is encoded.
//!
//! Invariants: a cell is written only into a column of its own type (the typing step
//! guarantees it; a mismatch is refused as a permanent error before anything is sent);
//! the trailer is written only after every row, so a failure midway leaves the `COPY`
//! incomplete and it is aborted with its transaction.

use bytes::{BufMut, Bytes, BytesMut};
use chrono::{DateTime, NaiveDate, Utc};
use futures::SinkExt;

use crate::naming::quote;
use crate::types::{Cell, ColumnType};

type Tx<'a> = deadpool_postgres::Transaction<'a>;

/// Bytes encoded before they are sent as one `CopyData` message.
const CHUNK_BYTES: usize = 512 * 1024;

const HEADER: &[u8] = b"PGCOPY\n\xff\r\n\0";

/// Why a `COPY` failed: the server's error (whose SQLSTATE the caller may inspect),
/// or a row the encoder refused.
#[derive(Debug)]
pub(super) enum CopyError {
    /// The server or the connection failed.
    Db(tokio_postgres::Error),
    /// A row does not fit its columns (a bug upstream): permanent.
    Encode(String),
}

/// Binary `COPY` of `rows` into `target` (already quoted) for `columns`; returns the
/// rows written.
pub(super) async fn copy_rows<'r>(
    tx: &Tx<'_>,
    target: &str,
    columns: &[(String, ColumnType)],
    rows: impl Iterator<Item = &'r [Cell]>,
) -> Result<u64, CopyError> {
    let list = columns
        .iter()
        .map(|(n, _)| quote(n))
        .collect::<Vec<_>>()
        .join(", ");
    let types: Vec<ColumnType> = columns.iter().map(|(_, t)| *t).collect();
    let sink = tx
        .copy_in::<_, Bytes>(&format!(
            "COPY {target} ({list}) FROM STDIN (FORMAT binary)"
        ))
        .await
        .map_err(CopyError::Db)?;
    futures::pin_mut!(sink);
    let mut buf = BytesMut::with_capacity(CHUNK_BYTES + 64 * 1024);
    buf.put_slice(HEADER);
    buf.put_i32(0); // flags
    buf.put_i32(0); // header extension length
    for cells in rows {
        encode_row(&mut buf, &types, cells).map_err(CopyError::Encode)?;
        if buf.len() >= CHUNK_BYTES {
            let chunk = buf.split().freeze();
            sink.send(chunk).await.map_err(CopyError::Db)?;
            buf.reserve(CHUNK_BYTES + 64 * 1024);
        }
    }
    buf.put_i16(-1);
    sink.send(buf.freeze()).await.map_err(CopyError::Db)?;
    sink.as_mut().finish().await.map_err(CopyError::Db)
}

/// Encodes `rows` as [`copy_rows`] does; returns the bytes (for timing).
#[cfg(test)]
pub(crate) fn encode_for_test(table: &crate::evolve::TableLoad) -> usize {
    let columns = &table.columns;
    let types: Vec<ColumnType> = columns.iter().map(|(_, t)| *t).collect();
    let mut buf = BytesMut::with_capacity(CHUNK_BYTES + 64 * 1024);
    let mut total = 0;
    for row in &table.rows {
        encode_row(&mut buf, &types, table.cells_of(row)).expect("encodes");
        if buf.len() >= CHUNK_BYTES {
            total += buf.len();
            buf.clear();
        }
    }
    total + buf.len()
}

/// Appends one tuple.
fn encode_row(buf: &mut BytesMut, types: &[ColumnType], cells: &[Cell]) -> Result<(), String> {
    if cells.len() != types.len() {
        return Err(format!(
            "row has {} values for {} columns",
            cells.len(),
            types.len()
        ));
    }
    let fields = i16::try_from(cells.len()).map_err(|_| "too many columns".to_string())?;
    buf.put_i16(fields);
    for (cell, ty) in cells.iter().zip(types) {
        match (cell, ty) {
            (Cell::Null, _) => buf.put_i32(-1),
            (Cell::Text(s), ColumnType::Text) => {
                let len = i32::try_from(s.len()).map_err(|_| "text value too long".to_string())?;
                buf.put_i32(len);
                buf.put_slice(s.as_bytes());
            }
            (Cell::Bigint(i), ColumnType::Bigint) => {
                buf.put_i32(8);
                buf.put_i64(*i);
            }
            (Cell::Double(f), ColumnType::Double) => {
                buf.put_i32(8);
                buf.put_f64(*f);
            }
            (Cell::Boolean(b), ColumnType::Boolean) => {
                buf.put_i32(1);
                buf.put_u8(u8::from(*b));
            }
            (Cell::Timestamp(t), ColumnType::Timestamp) => {
                buf.put_i32(8);
                buf.put_i64(pg_micros(t)?);
            }
            (cell, ty) => return Err(format!("cannot write {cell:?} as {ty}")),
        }
    }
    Ok(())
}

/// Microseconds since 2000-01-01 UTC, PostgreSQL's `timestamptz` on the wire.
fn pg_micros(t: &DateTime<Utc>) -> Result<i64, String> {
    let epoch = NaiveDate::from_ymd_opt(2000, 1, 1)
        .and_then(|d| d.and_hms_opt(0, 0, 0))
        .map(|d| d.and_utc())
        .ok_or_else(|| "no PostgreSQL epoch".to_string())?;
    t.signed_duration_since(epoch)
        .num_microseconds()
        .ok_or_else(|| "timestamp out of range".to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::BytesMut;
    use tokio_postgres::types::{ToSql, Type};

    /// The encoder writes each value exactly as `tokio-postgres` would.
    #[test]
    fn encodes_values_like_to_sql() {
        let t = DateTime::parse_from_rfc3339("2026-11-27T05:10:53.123Z")
            .expect("valid")
            .with_timezone(&Utc);
        let cases: Vec<(Cell, ColumnType, Type)> = vec![
            (Cell::Text("héllo".into()), ColumnType::Text, Type::TEXT),
            (Cell::Bigint(-42), ColumnType::Bigint, Type::INT8),
            (Cell::Double(2.5), ColumnType::Double, Type::FLOAT8),
            (Cell::Boolean(true), ColumnType::Boolean, Type::BOOL),
            (Cell::Timestamp(t), ColumnType::Timestamp, Type::TIMESTAMPTZ),
        ];
        for (cell, ty, wire) in cases {
            let mut ours = BytesMut::new();
            encode_row(&mut ours, &[ty], std::slice::from_ref(&cell)).expect("encodes");
            let mut theirs = BytesMut::new();
            cell.to_sql(&wire, &mut theirs).expect("to_sql");
            let mut expected = BytesMut::new();
            expected.put_i16(1);
            expected.put_i32(theirs.len() as i32);
            expected.put_slice(&theirs);
            assert_eq!(ours, expected, "{cell:?}");
        }
        let mut null = BytesMut::new();
        encode_row(&mut null, &[ColumnType::Text], &[Cell::Null]).expect("encodes");
        assert_eq!(&null[..], &[0, 1, 0xff, 0xff, 0xff, 0xff]);
    }

    #[test]
    fn refuses_mismatched_rows() {
        let mut buf = BytesMut::new();
        assert!(encode_row(&mut buf, &[ColumnType::Bigint], &[Cell::Text("x".into())]).is_err());
        assert!(encode_row(&mut buf, &[ColumnType::Bigint], &[]).is_err());
    }
}
