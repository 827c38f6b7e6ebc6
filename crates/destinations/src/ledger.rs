//! Where delivery markers and statistics live when several nodes deliver one
//! destination: the [`Ledger`] seam.
//!
//! Embedded, markers and statistics are tables of the engine's own SQLite file
//! (`crate::store`), written in the same transaction as the dead letters. In cluster
//! mode a partition changes hands between nodes, so the markers must be where the
//! next owner can read them: the server implements this trait on the control
//! database, and every write is **fenced by the lease epoch** like the cursor — a
//! write under an epoch that is no longer the partition's current one stores
//! nothing and answers `false`, and the writer stops. So a new owner reads exactly
//! the markers its predecessors wrote while they held the partition: the batches
//! that ended are skipped, the ones started but not ended (in flight at the
//! takeover) are sent again and counted as `redelivered`. Dead letters live there
//! too, written by the same fenced statement that ends their batch, so any node
//! lists and replays them and a zombie cannot write one.
//!
//! A marker is written *before* a batch is sent (a refused write means the batch is
//! not sent), so everything a receiver can have got from a node is either marked
//! done or still marked in flight for the next owner.

use std::collections::HashSet;
use std::sync::Arc;

use async_trait::async_trait;
use tributary_eventlog::Record;

use crate::api::DeadLetter;
use crate::error::DestinationError;

/// A dead letter to write (or to update, when the event already has one).
#[derive(Debug, Clone)]
pub struct NewDeadLetter {
    /// The event as read from the log.
    pub record: Arc<Record>,
    /// Sends attempted in this batch.
    pub attempts: u32,
    /// HTTP status of the last attempt, when it got one.
    pub last_status: Option<u16>,
    /// First KiB of the last response body.
    pub last_response: Option<String>,
    /// Why it failed, client-safe.
    pub error: String,
    /// When it was first attempted (ms).
    pub first_attempt_ms: i64,
}

/// What a batch's end does to the dead letters: the events that died, and the
/// replayed dead letters that got through (removed).
#[derive(Debug, Clone, Copy, Default)]
pub struct LetterChanges<'a> {
    /// Events that became (or stayed) dead letters.
    pub dead: &'a [NewDeadLetter],
    /// Ids of replayed dead letters delivered or skipped this time.
    pub replayed_ok: &'a [i64],
}

/// One batch of one destination's partition, sent under one lease.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BatchKey {
    /// The destination.
    pub dest: String,
    /// The log partition the batch's events come from.
    pub partition: u32,
    /// The lease epoch the batch is sent under (the fencing token).
    pub epoch: u64,
    /// Unique among this worker's batches (with the epoch: unique in the cluster).
    pub id: u64,
}

/// What one ended batch adds to its destination's statistics.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct BatchCounts {
    /// Events the receiver accepted.
    pub delivered: u64,
    /// Of them, events that may have reached the receiver before (in flight at a
    /// crash or takeover, or retried after an attempt that may have arrived).
    pub redelivered: u64,
    /// Events the destination type skipped.
    pub skipped: u64,
    /// When the last event was accepted (ms).
    pub success_ms: Option<i64>,
    /// The last error seen, and when (ms).
    pub error: Option<(String, i64)>,
}

/// A destination's persisted statistics.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Tally {
    /// Events accepted by the receiver.
    pub delivered: u64,
    /// Of them, possible duplicates.
    pub redelivered: u64,
    /// Events skipped by the destination type.
    pub skipped: u64,
    /// Last success (ms).
    pub last_success_ms: Option<i64>,
    /// Last error.
    pub last_error: Option<String>,
    /// When it happened (ms).
    pub last_error_ms: Option<i64>,
    /// Dead letters kept.
    pub dead_letters: u64,
}

/// What a starting partition worker must know about batches above its cursor.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Recovery {
    /// Ended before: not sent again.
    pub done: HashSet<u64>,
    /// Started but not ended (in flight at a crash or takeover): sent again, counted
    /// as redelivered.
    pub maybe: HashSet<u64>,
}

impl Recovery {
    /// Builds a recovery from `(done, seqs)` marker rows, keeping only sequence
    /// numbers above `cursor`; an event both done and in flight (sent again after
    /// an earlier takeover, then ended) is done.
    pub fn from_markers(rows: impl IntoIterator<Item = (bool, Vec<u64>)>, cursor: u64) -> Self {
        let mut rec = Recovery::default();
        for (done, seqs) in rows {
            for s in seqs.into_iter().filter(|s| *s > cursor) {
                if done {
                    rec.done.insert(s);
                } else {
                    rec.maybe.insert(s);
                }
            }
        }
        rec.maybe.retain(|s| !rec.done.contains(s));
        rec
    }
}

/// Delivery markers and statistics shared by every node (cluster mode). Each write
/// is durable when it returns `Ok`; `Ok(false)` means the epoch was fenced (a newer
/// lease holder owns the partition) and nothing was stored.
#[async_trait]
pub trait Ledger: Send + Sync + 'static {
    /// Records that a batch with these live events is about to be sent; `false`
    /// (nothing stored) when the lease is no longer current: the batch must not be
    /// sent.
    async fn batch_started(&self, key: &BatchKey, seqs: &[u64]) -> Result<bool, DestinationError>;

    /// Records the end of a batch: its marker (when `marked`, i.e. it had live
    /// events) becomes done, `counts` are added and `letters` written, in one
    /// transaction; `false` (nothing stored) when fenced — the next owner sends the
    /// batch again.
    async fn batch_finished(
        &self,
        key: &BatchKey,
        marked: bool,
        counts: &BatchCounts,
        letters: LetterChanges<'_>,
    ) -> Result<bool, DestinationError>;

    /// Forgets a batch that stopped before any attempt could have reached the
    /// receiver (nothing when fenced).
    async fn batch_abandoned(&self, key: &BatchKey) -> Result<(), DestinationError>;

    /// The markers of `dest`'s `partition` above `cursor`, from every epoch.
    async fn recovery(
        &self,
        dest: &str,
        partition: u32,
        cursor: u64,
    ) -> Result<Recovery, DestinationError>;

    /// Drops the partition's markers wholly at or below its committed cursor
    /// (nothing when `epoch` is fenced: the next owner may have read an older cursor).
    async fn prune(
        &self,
        dest: &str,
        partition: u32,
        epoch: u64,
        cursor: u64,
    ) -> Result<(), DestinationError>;

    /// The destination's statistics (summed over every node that delivered it).
    async fn tally(&self, dest: &str) -> Result<Tally, DestinationError>;

    /// Drops the destination's markers, statistics and dead letters (it was deleted).
    async fn forget(&self, dest: &str) -> Result<(), DestinationError>;

    /// The destination's dead letters, oldest event first (at most `limit`).
    async fn dead_letters(
        &self,
        dest: &str,
        limit: usize,
    ) -> Result<Vec<DeadLetter>, DestinationError>;

    /// Claims every dead letter of `dest` no replay holds for this node's replay;
    /// their ids, by event. A claim older than an hour counts as lost (its node
    /// stopped or moved the partition mid-replay) and may be claimed again.
    async fn start_replay(&self, dest: &str) -> Result<Vec<i64>, DestinationError>;

    /// Gives back this node's replay claims on `dest`: all of them (`None`: the
    /// destination's worker starts, so none is being replayed here), or these ids
    /// (a partition worker stopped before it replayed them).
    async fn end_replay(&self, dest: &str, ids: Option<&[i64]>) -> Result<(), DestinationError>;

    /// The events of these dead letters, with their ids (ids gone are left out).
    async fn dead_letter_records(
        &self,
        ids: &[i64],
    ) -> Result<Vec<(i64, Record)>, DestinationError>;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recovery_keeps_what_is_above_the_cursor_and_done_wins() {
        let rec = Recovery::from_markers(
            [
                (false, vec![3, 5, 9]),
                (true, vec![4, 6]),
                // Re-sent after an earlier takeover and ended this time.
                (true, vec![9]),
            ],
            3,
        );
        assert_eq!(rec.maybe, HashSet::from([5]));
        assert_eq!(rec.done, HashSet::from([4, 6, 9]));
    }
}
