//! The writer thread: group commit of appends (and consumer commits), retention.

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::{Duration, Instant};

use rusqlite::{Connection, OptionalExtension, params};
use tokio::sync::{mpsc, oneshot, watch};

use super::checkpoint::WAL_RESTART_FRAMES;
use super::open::WriterState;
use super::unavailable;
use crate::dedupe::DedupeIndex;
use crate::{AppendStatus, LogError, NewRecord};

pub(super) enum Request {
    Append {
        batch: Vec<NewRecord>,
        reply: oneshot::Sender<Result<Vec<AppendStatus>, LogError>>,
    },
    Commit {
        consumer: String,
        seq: u64,
        reply: oneshot::Sender<Result<(), LogError>>,
    },
}
pub(super) fn writer_loop(
    mut conn: Connection,
    mut state: WriterState,
    mut rx: mpsc::Receiver<Request>,
    head: watch::Sender<u64>,
    (max_group, wal_frames): (usize, Arc<AtomicI64>),
    (retention, prune_interval): (Duration, Duration),
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
        let started = Instant::now();
        let result = write_group(&mut conn, &mut state, &pending);
        metrics::histogram!("tributary_log_group_commit_seconds")
            .record(started.elapsed().as_secs_f64());
        metrics::histogram!("tributary_log_group_commit_records").record(records as f64);
        match result {
            Ok(statuses) => {
                if state.last_seq > *head.borrow() {
                    head.send_replace(state.last_seq);
                }
                for (req, status) in pending.drain(..).zip(statuses) {
                    match req {
                        Request::Append { reply, .. } => {
                            let _ = reply.send(Ok(status));
                        }
                        Request::Commit { reply, .. } => {
                            let _ = reply.send(Ok(()));
                        }
                    }
                }
            }
            Err(e) => {
                tracing::error!(error = %e, "event log group commit failed");
                for req in pending.drain(..) {
                    match req {
                        Request::Append { reply, .. } => {
                            let _ = reply.send(Err(unavailable(&e)));
                        }
                        Request::Commit { reply, .. } => {
                            let _ = reply.send(Err(unavailable(&e)));
                        }
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
        if last_prune.elapsed() >= prune_interval {
            last_prune = Instant::now();
            prune(&conn, &mut state.dedupe, retention);
        }
        metrics::gauge!("tributary_log_dedupe_keys").set(state.dedupe.len() as f64);
    }
    // Channel closed: everything sent has been answered; checkpoint the WAL.
    let _ = conn.execute_batch("PRAGMA wal_checkpoint(TRUNCATE);");
}

fn prune(conn: &Connection, dedupe: &mut DedupeIndex, retention: Duration) {
    let cutoff = chrono_now_ms() - retention.as_millis() as i64;
    // Delete in slices so the writer is never blocked for long.
    loop {
        let deleted = conn
            .prepare_cached(
                "DELETE FROM events WHERE seq IN
                   (SELECT seq FROM events WHERE received_at < ?1 ORDER BY received_at LIMIT 10000)
                 RETURNING seq, dkey",
            )
            .and_then(|mut st| {
                st.query_map(params![cutoff], |r| {
                    Ok((r.get::<_, i64>(0)? as u64, r.get::<_, i64>(1)? as u64))
                })?
                .collect::<rusqlite::Result<Vec<_>>>()
            });
        match deleted {
            // The statement committed: forget the keys only now.
            Ok(rows) if !rows.is_empty() => {
                for (seq, key) in rows {
                    dedupe.remove(key, seq);
                }
            }
            Ok(_) => break,
            Err(e) => {
                tracing::warn!(error = %e, "event log retention failed");
                break;
            }
        }
    }
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

fn write_group_tx(
    conn: &mut Connection,
    state: &mut WriterState,
    pending: &[Request],
    added: &mut Vec<(u64, u64)>,
) -> rusqlite::Result<Vec<Vec<AppendStatus>>> {
    let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
    let mut out = Vec::with_capacity(pending.len());
    {
        let mut insert = tx.prepare_cached(
            "INSERT INTO events (seq, source_id, message_id, call_type, event, received_at, payload, dkey)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
        )?;
        let mut same = tx.prepare_cached(
            "SELECT source_id = ?2 AND message_id = ?3 FROM events WHERE seq = ?1",
        )?;
        let mut commit = tx.prepare_cached(
            "INSERT INTO consumers (name, seq) VALUES (?1, ?2)
             ON CONFLICT (name) DO UPDATE SET seq = excluded.seq",
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
                            r.call_type,
                            r.event,
                            r.received_at_ms,
                            r.payload,
                            key as i64
                        ])?;
                        state.last_seq = seq;
                        state.dedupe.insert(key, seq);
                        added.push((key, seq));
                        statuses.push(AppendStatus::Stored(seq));
                    }
                    out.push(statuses);
                }
                Request::Commit { consumer, seq, .. } => {
                    commit.execute(params![consumer, *seq as i64])?;
                    out.push(Vec::new());
                }
            }
        }
        if !added.is_empty() {
            // The high-water mark outlives the rows: retention may delete the
            // newest ones, and their seqs must still never come back.
            tx.execute(
                "INSERT INTO meta (key, value) VALUES ('last_seq', ?1)
                 ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                params![state.last_seq as i64],
            )?;
        }
    }
    tx.commit()?;
    Ok(out)
}
