//! The writer thread: group commit of appends and of consumer registry changes
//! (their fsync and answers are the syncers', see [`super::sync`]), and retention.
//!
//! Retention deletes only a prefix of the log (oldest seq first), so "everything
//! below the first retained seq is gone" holds and consumers can detect gaps. By age
//! it never passes the lowest position of a pinned consumer; the size cap
//! (`max_bytes`) may, and then every pinned consumer it passes gets the deleted range
//! recorded as its gap, an error line and `tributary_log_unconsumed_dropped_total`.

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use rusqlite::{Connection, OptionalExtension, params};
use tokio::sync::{mpsc, oneshot};

use super::checkpoint::WAL_RESTART_FRAMES;
use super::open::WriterState;
use super::sync::{Answer, Committed, FAILED, Syncers};
use super::unavailable;
use crate::dedupe::DedupeIndex;
use crate::{AppendStatus, LogError, NewRecord};

pub(super) enum Request {
    Append {
        batch: Vec<NewRecord>,
        reply: oneshot::Sender<Result<Vec<AppendStatus>, LogError>>,
    },
    /// A change of the consumer registry, applied in the group's transaction.
    Consumer {
        change: ConsumerChange,
        reply: oneshot::Sender<Result<(), LogError>>,
    },
    /// Wakes the writer so retention runs while no appends arrive.
    Tick,
}

/// A change of the consumer registry.
pub(super) enum ConsumerChange {
    /// The consumer processed everything up to `seq`; it is pinned.
    Commit { consumer: String, seq: u64 },
    /// The consumer keeps its position but no longer bounds retention.
    Unpin(String),
    /// The consumer is forgotten.
    Remove(String),
}

/// What retention keeps.
pub(super) struct Retention {
    /// Records older than this may go (once every pinned consumer is past them).
    pub(super) age: Duration,
    /// How often retention runs.
    pub(super) interval: Duration,
    /// The size cap of the database's used pages, if any.
    pub(super) max_bytes: Option<u64>,
    /// Records the size cap deleted before a pinned consumer read them (for stats).
    pub(super) dropped: Arc<AtomicU64>,
}
pub(super) fn writer_loop(
    mut conn: Connection,
    mut state: WriterState,
    mut rx: mpsc::Receiver<Request>,
    syncers: Syncers,
    (max_group, wal_frames): (usize, Arc<AtomicI64>),
    retention: Retention,
) {
    let mut last_prune = Instant::now();
    let mut pending: Vec<Request> = Vec::new();
    metrics::gauge!("tributary_log_dedupe_keys").set(state.dedupe.len() as f64);
    while let Some(first) = rx.blocking_recv() {
        pending.push(first);
        let mut records = 0usize;
        if let Some(Request::Append { batch, .. }) = pending.last() {
            records += batch.len();
        }
        while records < max_group {
            match rx.try_recv() {
                Ok(req) => {
                    if let Request::Append { batch, .. } = &req {
                        records += batch.len();
                    }
                    pending.push(req);
                }
                Err(_) => break,
            }
        }
        if syncers.failed() {
            // The WAL's state on disk is unknown: acknowledge nothing more.
            for req in pending.drain(..) {
                if let Some(answer) = answer_of(req, Vec::new()) {
                    answer.fail(FAILED);
                }
            }
            continue;
        }
        let started = Instant::now();
        let result = write_group(&mut conn, &mut state, &pending);
        metrics::histogram!("tributary_log_group_commit_seconds")
            .record(started.elapsed().as_secs_f64());
        metrics::histogram!("tributary_log_group_commit_records").record(records as f64);
        match result {
            Ok(statuses) => {
                // Committed but not yet fsynced: the syncers answer after the fsync.
                let answers: Vec<Answer> = pending
                    .drain(..)
                    .zip(statuses)
                    .filter_map(|(req, status)| answer_of(req, status))
                    .collect();
                if !answers.is_empty() {
                    syncers.push(Committed {
                        answers,
                        last_seq: state.last_seq,
                    });
                }
            }
            Err(e) => {
                tracing::error!(error = %e, "event log group commit failed");
                let why = unavailable(&e).to_string();
                for req in pending.drain(..) {
                    if let Some(answer) = answer_of(req, Vec::new()) {
                        answer.fail(&why);
                    }
                }
            }
        }
        if wal_frames.load(Ordering::Relaxed) >= WAL_RESTART_FRAMES {
            wal_frames.store(0, Ordering::Relaxed);
            if let Err(e) = conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |_| Ok(())) {
                tracing::warn!(error = %e, "event log checkpoint failed");
            }
        }
        if last_prune.elapsed() >= retention.interval {
            last_prune = Instant::now();
            prune(&mut conn, &mut state.dedupe, state.last_seq, &retention);
        }
        metrics::gauge!("tributary_log_dedupe_keys").set(state.dedupe.len() as f64);
    }
    // Channel closed: everything sent is answered once its fsync returned; then
    // checkpoint the WAL.
    syncers.stop();
    let _ = conn.execute_batch("PRAGMA wal_checkpoint(TRUNCATE);");
}

/// The answer a request waits for (a tick waits for none).
fn answer_of(req: Request, statuses: Vec<AppendStatus>) -> Option<Answer> {
    match req {
        Request::Append { reply, .. } => Some(Answer::Append(reply, statuses)),
        Request::Consumer { reply, .. } => Some(Answer::Consumer(reply)),
        Request::Tick => None,
    }
}

/// Deletes what retention allows: by age up to the lowest pinned position, then
/// (with a size cap) the oldest records until the used size is under the cap.
fn prune(conn: &mut Connection, dedupe: &mut DedupeIndex, last_seq: u64, retention: &Retention) {
    let cutoff = chrono_now_ms() - retention.age.as_millis() as i64;
    if let Err(e) = prune_by_age(conn, dedupe, last_seq, cutoff) {
        tracing::warn!(error = %e, "event log retention failed");
    }
    if let Some(max) = retention.max_bytes
        && let Err(e) = prune_to_size(conn, dedupe, last_seq, max, &retention.dropped)
    {
        tracing::warn!(error = %e, "event log size cap failed");
    }
}

/// The lowest committed position of a pinned consumer, if any.
fn lowest_pinned(conn: &Connection) -> rusqlite::Result<Option<i64>> {
    conn.query_row("SELECT MIN(seq) FROM consumers WHERE pinned = 1", [], |r| {
        r.get(0)
    })
}

/// Deletes the prefix of records at or below `end`; returns their `(seq, dedupe
/// key)`, to be forgotten by the dedupe index once the transaction committed.
///
/// The seq high-water mark is stored here, in the deleting transaction, and not
/// with every group: at open the last seq is the larger of it and the highest
/// retained seq, and only a delete can take the newest rows away (and their seqs
/// must never come back). Storing it per group cost an upsert and one more WAL page
/// per commit, the most of a single-event group's write (issue #15).
fn delete_through(
    tx: &rusqlite::Transaction<'_>,
    end: i64,
    last_seq: u64,
) -> rusqlite::Result<Vec<(u64, u64)>> {
    tx.prepare_cached(
        "INSERT INTO meta (key, value) VALUES ('last_seq', ?1)
         ON CONFLICT (key) DO UPDATE SET value = MAX(value, excluded.value)",
    )?
    .execute(params![last_seq as i64])?;
    let rows = tx
        .prepare_cached("DELETE FROM events WHERE seq <= ?1 RETURNING seq, dkey")?
        .query_map(params![end], |r| {
            Ok((r.get::<_, i64>(0)? as u64, r.get::<_, i64>(1)? as u64))
        })?
        .collect::<rusqlite::Result<Vec<_>>>()?;
    Ok(rows)
}

fn forget(dedupe: &mut DedupeIndex, rows: &[(u64, u64)]) {
    for (seq, key) in rows {
        dedupe.remove(*key, *seq);
    }
}

/// Deletes, in slices so the writer is never blocked for long, the oldest records
/// received before `cutoff`, never past the lowest pinned consumer. Stops at the
/// first record that is young enough, so what is deleted is always a prefix.
fn prune_by_age(
    conn: &mut Connection,
    dedupe: &mut DedupeIndex,
    last_seq: u64,
    cutoff: i64,
) -> rusqlite::Result<()> {
    const SLICE: usize = 10_000;
    loop {
        let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        let bound = lowest_pinned(&tx)?.unwrap_or(i64::MAX);
        let slice: Vec<(i64, i64)> = tx
            .prepare_cached(
                "SELECT seq, received_at FROM events WHERE seq <= ?1 ORDER BY seq LIMIT ?2",
            )?
            .query_map(params![bound, SLICE as i64], |r| Ok((r.get(0)?, r.get(1)?)))?
            .collect::<rusqlite::Result<_>>()?;
        let old = slice.iter().take_while(|(_, at)| *at < cutoff).count();
        let Some(&(end, _)) = old.checked_sub(1).and_then(|i| slice.get(i)) else {
            return Ok(());
        };
        let rows = delete_through(&tx, end, last_seq)?;
        tx.commit()?;
        forget(dedupe, &rows);
        if old < slice.len() || slice.len() < SLICE {
            return Ok(());
        }
    }
}

/// Bytes of the database in use (pages not on the free list).
fn used_bytes(conn: &Connection) -> rusqlite::Result<u64> {
    let pages: i64 = conn.query_row("PRAGMA page_count", [], |r| r.get(0))?;
    let free: i64 = conn.query_row("PRAGMA freelist_count", [], |r| r.get(0))?;
    let size: i64 = conn.query_row("PRAGMA page_size", [], |r| r.get(0))?;
    Ok(((pages - free).max(0) * size) as u64)
}

/// Deletes the oldest records, whoever still needs them, until the database's used
/// size is at most `max`. Every pinned consumer passed gets the loss recorded.
fn prune_to_size(
    conn: &mut Connection,
    dedupe: &mut DedupeIndex,
    last_seq: u64,
    max: u64,
    dropped: &AtomicU64,
) -> rusqlite::Result<()> {
    // Small slices: the cap is met closely, not overshot by a large slice.
    const SLICE: i64 = 100;
    let mut stalled = 0;
    let mut used = used_bytes(conn)?;
    while used > max {
        let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        let end: Option<i64> = tx.query_row(
            "SELECT MAX(seq) FROM (SELECT seq FROM events ORDER BY seq LIMIT ?1)",
            params![SLICE],
            |r| r.get(0),
        )?;
        let Some(end) = end else {
            return Ok(());
        };
        let passed: Vec<(String, i64)> = tx
            .prepare_cached("SELECT name, seq FROM consumers WHERE pinned = 1 AND seq < ?1")?
            .query_map(params![end], |r| Ok((r.get(0)?, r.get(1)?)))?
            .collect::<rusqlite::Result<_>>()?;
        let rows = delete_through(&tx, end, last_seq)?;
        let now = chrono_now_ms();
        let mut losses = Vec::new();
        for (name, seq) in passed {
            let lost = rows.iter().filter(|(s, _)| *s as i64 > seq).count() as u64;
            if lost == 0 {
                continue;
            }
            tx.execute(
                "UPDATE consumers SET dropped = dropped + ?2, gap_from = ?3, gap_to = ?4, gap_at = ?5
                 WHERE name = ?1",
                params![name, lost as i64, seq + 1, end, now],
            )?;
            losses.push((name, lost, seq + 1));
        }
        tx.commit()?;
        forget(dedupe, &rows);
        for (consumer, lost, from) in losses {
            dropped.fetch_add(lost, Ordering::Relaxed);
            metrics::counter!("tributary_log_unconsumed_dropped_total", "consumer" => consumer.clone())
                .increment(lost);
            tracing::error!(%consumer, from, to = end, records = lost, max_bytes = max,
                "event log size cap deleted records a consumer had not read");
        }
        let now_used = used_bytes(conn)?;
        // Deleting must free pages; if it stops doing so, stop rather than empty the log.
        stalled = if now_used < used { 0 } else { stalled + 1 };
        if stalled >= 5 {
            tracing::warn!(
                used = now_used,
                max_bytes = max,
                "event log size cap cannot free more pages"
            );
            return Ok(());
        }
        used = now_used;
    }
    Ok(())
}

pub(super) fn chrono_now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// Writes one group in one transaction. On error nothing of it is stored and the
/// writer's state is as before.
pub(super) fn write_group(
    conn: &mut Connection,
    state: &mut WriterState,
    pending: &[Request],
) -> rusqlite::Result<Vec<Vec<AppendStatus>>> {
    let before = state.last_seq;
    let mut added: Vec<(u64, u64)> = Vec::new();
    let result = write_group_tx(conn, state, pending, &mut added);
    if result.is_err() {
        state.last_seq = before;
        for (key, seq) in added {
            state.dedupe.remove(key, seq);
        }
    }
    result
}

/// One group's transaction. `BEGIN IMMEDIATE` and `COMMIT` are cached statements
/// (rusqlite's `Transaction` parses both anew on every group: with one request per
/// group that was a tenth of the writer's instructions); any error rolls back, as
/// dropping a `Transaction` would.
fn write_group_tx(
    conn: &mut Connection,
    state: &mut WriterState,
    pending: &[Request],
    added: &mut Vec<(u64, u64)>,
) -> rusqlite::Result<Vec<Vec<AppendStatus>>> {
    conn.prepare_cached("BEGIN IMMEDIATE")?.execute([])?;
    let result = write_group_body(conn, state, pending, added).and_then(|out| {
        conn.prepare_cached("COMMIT")?.execute([])?;
        Ok(out)
    });
    if result.is_err() && !conn.is_autocommit() {
        let _ = conn.execute_batch("ROLLBACK");
    }
    result
}

fn write_group_body(
    tx: &Connection,
    state: &mut WriterState,
    pending: &[Request],
    added: &mut Vec<(u64, u64)>,
) -> rusqlite::Result<Vec<Vec<AppendStatus>>> {
    let mut out = Vec::with_capacity(pending.len());
    {
        let mut insert = tx.prepare_cached(
            "INSERT INTO events (seq, source_id, message_id, call_type, event, received_at, payload, dkey,
                                 user_id, anonymous_id)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)",
        )?;
        let mut same = tx.prepare_cached(
            "SELECT source_id = ?2 AND message_id = ?3 FROM events WHERE seq = ?1",
        )?;
        let mut commit = tx.prepare_cached(
            "INSERT INTO consumers (name, seq, pinned) VALUES (?1, ?2, 1)
             ON CONFLICT (name) DO UPDATE SET seq = excluded.seq, pinned = 1",
        )?;
        for req in pending {
            match req {
                Request::Append { batch, .. } => {
                    let mut statuses = Vec::with_capacity(batch.len());
                    for r in batch {
                        let key = state.dedupe.key(&r.source_id, &r.message_id);
                        let mut duplicate = false;
                        for seq in state.dedupe.candidates(key) {
                            let hit: Option<bool> = same
                                .query_row(params![seq as i64, r.source_id, r.message_id], |row| {
                                    row.get(0)
                                })
                                .optional()?;
                            if hit == Some(true) {
                                duplicate = true;
                                break;
                            }
                        }
                        if duplicate {
                            statuses.push(AppendStatus::Duplicate);
                            continue;
                        }
                        let seq = state.last_seq + 1;
                        insert.execute(params![
                            seq as i64,
                            r.source_id,
                            r.message_id,
                            r.call_type.as_str(),
                            r.event,
                            r.received_at_ms,
                            r.payload,
                            key as i64,
                            r.user_id,
                            r.anonymous_id
                        ])?;
                        state.last_seq = seq;
                        state.dedupe.insert(key, seq);
                        added.push((key, seq));
                        statuses.push(AppendStatus::Stored(seq));
                    }
                    out.push(statuses);
                }
                Request::Consumer { change, .. } => {
                    match change {
                        ConsumerChange::Commit { consumer, seq } => {
                            commit.execute(params![consumer, *seq as i64])?;
                        }
                        ConsumerChange::Unpin(consumer) => {
                            tx.execute(
                                "UPDATE consumers SET pinned = 0 WHERE name = ?1",
                                params![consumer],
                            )?;
                        }
                        ConsumerChange::Remove(consumer) => {
                            tx.execute("DELETE FROM consumers WHERE name = ?1", params![consumer])?;
                        }
                    }
                    out.push(Vec::new());
                }
                Request::Tick => out.push(Vec::new()),
            }
        }
    }
    Ok(out)
}
