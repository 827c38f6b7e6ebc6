//! Retention of the JetStream log: by age, never past what an active consumer still
//! needs; by size only explicitly.
//!
//! **Why not JetStream's own limits.** A stream with `max_age` deletes by age whoever
//! still needs the records, and one with `max_bytes` and `discard: old` deletes the
//! oldest records silently. So the stream has **no `max_age`**, and its `max_bytes`
//! (`log.max_bytes`, optional) uses **`discard: new`**: JetStream itself never deletes
//! a record. Every deletion is made here, by one node at a time (the holder of the
//! lease [`RETENTION_LEASE`], partition 0, through the same [`Ownership`] as the
//! consumers), which knows what it deletes:
//!
//! - **By age** (every `log.prune_interval`, default 60 s): for each partition `p`, the
//!   records of `p` below `bound_p = min(first record of p stored within
//!   log.retention, min over pinned consumers of (committed position in p) + 1)` are
//!   purged with JetStream's purge-by-subject-up-to-sequence (`filter:
//!   tributary.events.<p>.>`, `seq: bound_p`). A pinned consumer (the warehouse while
//!   loading is on, each enabled destination) that has no position in `p` counts as
//!   position 0: it holds all of `p`. A consumer behind therefore keeps its records
//!   however old; one that is caught up lets them go once they are older than the
//!   retention. Records younger than the retention always stay (they are the
//!   partition owners' dedupe window).
//! - **By size** (checked every second): when the stream holds more than 90 % of
//!   `log.max_bytes` the oldest records of the stream are purged until it holds at
//!   most 80 %, whoever needs them. Before each purge every pinned consumer that had
//!   not read a deleted record gets the loss recorded, counted exactly (records of
//!   its partition above its position and below the purge bound): an error line,
//!   `tributary_log_unconsumed_dropped_total{consumer}`, and in the registry its
//!   `dropped` count and newest gap (from, to) with the time — which `/ready` reports
//!   as degraded and the consumer's status shows. Between two checks a full stream
//!   refuses publishes (`discard: new`): ingest retries within `log.publish_retry`
//!   and answers 503, never a 200 for an unstored event.
//!
//! **Floors.** Before purging a partition the task raises that partition's *floor*,
//! kept in the stream's metadata (`tributary_floor_<p>`): every record of `p` below
//! it may be gone. A consumer reading `p` after position `s` reports a gap exactly when
//! the floor is past `s + 1` ([`JetStreamLog::read_checked_sparse`]): a pinned consumer
//! never sees one from age retention (its position bounds the floor), a consumer that
//! was unpinned (a disabled destination) or was overrun by the size cap does. The gap
//! is given in stream sequence numbers (an upper bound: other partitions' numbers
//! are in between); the exact count of a size-cap loss is the registry's `dropped`.
//!
//! **Migration.** A stream made by an older version has `max_age` = the retention and
//! `discard: old`. At start [`JetStreamLog::open`] updates it in place: `max_age`
//! removed, `discard: new`, and every partition's floor set to the stream's first
//! retained sequence number (what age retention may already have deleted). From then
//! on this task is the stream's retention; nothing is copied or recreated.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::watch;

use super::{
    JetStreamLog, SUBJECT_PREFIX, now_ms, partition_filter, partition_of_subject, unavailable,
};
use crate::{EventLog, Gap, LogError, Ownership};

/// The lease (consumer name, partition 0) whose holder runs retention.
pub const RETENTION_LEASE: &str = "log-retention";

/// Stream metadata key of partition `p`'s floor.
pub(super) fn floor_key(p: u32) -> String {
    format!("tributary_floor_{p}")
}

/// Every partition's floor from the stream metadata (0: nothing deleted).
pub(super) fn floors(metadata: &HashMap<String, String>, partitions: u32) -> Vec<u64> {
    (0..partitions)
        .map(|p| {
            metadata
                .get(&floor_key(p))
                .and_then(|v| v.parse().ok())
                .unwrap_or(0)
        })
        .collect()
}

/// Start purging by size above this share of `max_bytes`…
const CAP_HIGH: f64 = 0.9;
/// …down to this share.
const CAP_LOW: f64 = 0.8;
/// Most prefix purges of one size check.
const CAP_ROUNDS: usize = 50;
/// How often the lease holder checks the size.
const CAP_CHECK: Duration = Duration::from_secs(1);

/// What one retention pass did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct RetentionReport {
    /// Records purged by age.
    pub aged_out: u64,
    /// Records purged by the size cap.
    pub capped: u64,
    /// Losses the size cap caused: (consumer, gap, records it had not read).
    pub losses: Vec<(String, Gap, u64)>,
}

/// One consumer's lag in one partition, in records.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PartitionLag {
    /// The consumer (`warehouse`, `destination:<id>`).
    pub consumer: String,
    /// The partition.
    pub partition: u32,
    /// Records of the partition after the consumer's committed position.
    pub records: u64,
}

impl JetStreamLog {
    /// Positions of this log's consumers: (pinned names, (name, partition) → seq,
    /// every name).
    async fn positions(
        &self,
    ) -> Result<
        (
            BTreeSet<String>,
            BTreeMap<(String, u32), u64>,
            BTreeSet<String>,
        ),
        LogError,
    > {
        let mut pinned = BTreeSet::new();
        let mut all = BTreeSet::new();
        let mut at = BTreeMap::new();
        for c in self.registry.list().await? {
            if c.position.log_id != self.log_id || c.position.partition >= self.partitions {
                continue;
            }
            if c.pinned {
                pinned.insert(c.name.clone());
            }
            all.insert(c.name.clone());
            at.insert((c.name, c.position.partition), c.position.seq);
        }
        Ok((pinned, at, all))
    }

    /// Raises floors in the stream's metadata (never lowers one), together with
    /// every floor raised before by this node, and reads them back.
    ///
    /// A stream update is a whole-config write: a node starting meanwhile that
    /// brings the stream to its configuration ([`JetStreamLog::open`]) can write
    /// back metadata it read before this raise. So the floors are read back until
    /// they hold (a purge never runs on a floor that is not stored), and every
    /// retention pass writes this node's raised floors again, which repairs an
    /// overwrite that came after the read-back.
    async fn raise_floors(&self, raise: &BTreeMap<u32, u64>) -> Result<(), LogError> {
        let wanted: BTreeMap<u32, u64> = {
            let mut raised = self.raised.lock().unwrap_or_else(|p| p.into_inner());
            for (&p, &floor) in raise {
                let f = raised.entry(p).or_insert(0);
                *f = (*f).max(floor);
            }
            raised.clone()
        };
        if wanted.is_empty() {
            return Ok(());
        }
        for _ in 0..5 {
            let info = self.stream.get_info().await.map_err(unavailable)?;
            let mut config = info.config.clone();
            let have = floors(&config.metadata, self.partitions);
            let mut changed = false;
            for (&p, &floor) in &wanted {
                if p < self.partitions && floor > have[p as usize] {
                    config.metadata.insert(floor_key(p), floor.to_string());
                    changed = true;
                }
            }
            if !changed {
                return Ok(());
            }
            self.js.update_stream(config).await.map_err(unavailable)?;
        }
        Err(LogError::Unavailable(
            "the stream's floors did not hold after 5 writes: its configuration keeps changing; retention retries".into(),
        ))
    }

    /// One retention pass: by age when `by_age`, then by size when the stream is
    /// over its cap's high-water mark. Run by the lease holder ([`run_retention`]);
    /// safe to run twice at once (each purge only deletes what was already allowed).
    pub async fn enforce_retention(&self, by_age: bool) -> Result<RetentionReport, LogError> {
        let mut report = RetentionReport::default();
        // Floors raised before are still stored (or written again).
        self.raise_floors(&BTreeMap::new()).await?;
        if by_age {
            report.aged_out = self.purge_by_age().await?;
        }
        if let Some(max) = self.config.max_bytes {
            self.purge_to_size(max, &mut report).await?;
        }
        Ok(report)
    }

    async fn purge_by_age(&self) -> Result<u64, LogError> {
        let info = self.stream.get_info().await.map_err(unavailable)?;
        let head = info.state.last_sequence;
        let (pinned, at, _) = self.positions().await?;
        let cutoff = now_ms() - self.config.retention.as_millis() as i64;
        let mut bounds = BTreeMap::new();
        for p in 0..self.partitions {
            let first = self.first_retained(p).await?;
            if first > head {
                continue;
            }
            let need = pinned
                .iter()
                .map(|n| at.get(&(n.clone(), p)).copied().unwrap_or(0) + 1)
                .min()
                .unwrap_or(u64::MAX);
            if need <= first {
                continue;
            }
            let young = self
                .batch_get()
                .since_time(cutoff, &partition_filter(p), 1)
                .await?
                .first()
                .map_or(head + 1, |g| g.seq);
            let bound = need.min(young).min(head + 1);
            if bound > first {
                bounds.insert(p, bound);
            }
        }
        // Floors first: a reader never finds a purged record without its floor.
        self.raise_floors(&bounds).await?;
        let mut purged = 0;
        for (&p, &bound) in &bounds {
            let r = self
                .stream
                .purge()
                .filter(partition_filter(p))
                .sequence(bound)
                .await
                .map_err(unavailable)?;
            if r.purged > 0 {
                tracing::debug!(
                    partition = p,
                    below = bound,
                    records = r.purged,
                    "log retention purged records older than log.retention that every consumer had read"
                );
            }
            purged += r.purged;
        }
        if purged > 0 {
            metrics::counter!("tributary_log_retention_purged_total", "reason" => "age")
                .increment(purged);
        }
        Ok(purged)
    }

    async fn purge_to_size(&self, max: u64, report: &mut RetentionReport) -> Result<(), LogError> {
        let all = format!("{SUBJECT_PREFIX}.>");
        for _ in 0..CAP_ROUNDS {
            let info = self.stream.get_info().await.map_err(unavailable)?;
            let (bytes, messages) = (info.state.bytes, info.state.messages);
            let over_high = bytes as f64 > max as f64 * CAP_HIGH;
            let over_low = bytes as f64 > max as f64 * CAP_LOW;
            // Keep going down to the low-water mark once started.
            if messages == 0 || !over_low || (report.capped == 0 && !over_high) {
                return Ok(());
            }
            let excess = bytes as f64 - max as f64 * CAP_LOW;
            let avg = (bytes as f64 / messages as f64).max(1.0);
            let n = ((excess / avg).ceil() as usize).clamp(1, 1000);
            let first = info.state.first_sequence;
            let doomed = self.batch_get().next_by_subject(first, &all, n).await?;
            let Some(last) = doomed.last().map(|g| g.seq) else {
                return Ok(());
            };
            let bound = last + 1;
            // Who loses what: records of each partition above a pinned consumer's
            // position, counted exactly.
            let (pinned, at, _) = self.positions().await?;
            let mut by_partition: BTreeMap<u32, Vec<u64>> = BTreeMap::new();
            for g in &doomed {
                if let Some(p) = partition_of_subject(&g.subject) {
                    by_partition.entry(p).or_default().push(g.seq);
                }
            }
            let now = now_ms();
            let mut losses = Vec::new();
            for name in &pinned {
                for (&p, seqs) in &by_partition {
                    let s = at.get(&(name.clone(), p)).copied().unwrap_or(0);
                    let lost: Vec<u64> = seqs.iter().copied().filter(|&q| q > s).collect();
                    if let (Some(&from), Some(&to)) = (lost.first(), lost.last()) {
                        losses.push((
                            name.clone(),
                            Gap {
                                partition: p,
                                from,
                                to,
                            },
                            lost.len() as u64,
                        ));
                    }
                }
            }
            let raise: BTreeMap<u32, u64> = by_partition.keys().map(|&p| (p, bound)).collect();
            self.raise_floors(&raise).await?;
            for (consumer, gap, lost) in &losses {
                self.registry
                    .record_loss(consumer, &self.log_id, *gap, *lost, now)
                    .await?;
            }
            let r = self
                .stream
                .purge()
                .sequence(bound)
                .await
                .map_err(unavailable)?;
            report.capped += r.purged;
            metrics::counter!("tributary_log_retention_purged_total", "reason" => "size")
                .increment(r.purged);
            for (consumer, gap, lost) in losses {
                self.dropped
                    .fetch_add(lost, std::sync::atomic::Ordering::Relaxed);
                metrics::counter!("tributary_log_unconsumed_dropped_total", "consumer" => consumer.clone())
                    .increment(lost);
                tracing::error!(%consumer, partition = gap.partition, from = gap.from, to = gap.to,
                    records = lost, max_bytes = max,
                    "event log size cap deleted records a consumer had not read");
                report.losses.push((consumer, gap, lost));
            }
        }
        Ok(())
    }

    /// Every registered consumer's lag in every partition: the records of the
    /// partition stored after its committed position (a consumer without a position
    /// in a partition: all of the partition's records). Asked of the stream now, one
    /// direct get per (consumer, partition).
    pub async fn lag(&self) -> Result<Vec<PartitionLag>, LogError> {
        let (_, at, names) = self.positions().await?;
        let mut out = Vec::new();
        for name in &names {
            for p in 0..self.partitions {
                let s = at.get(&(name.clone(), p)).copied().unwrap_or(0);
                let records = self
                    .batch_get()
                    .count_from(s + 1, &partition_filter(p))
                    .await?;
                out.push(PartitionLag {
                    consumer: name.clone(),
                    partition: p,
                    records,
                });
            }
        }
        Ok(out)
    }
}

/// Runs retention on this node whenever it holds [`RETENTION_LEASE`]: the size check
/// every second, age retention every `log.prune_interval`. Ends when `stop` turns
/// true (or its sender is dropped), releasing the lease.
pub async fn run_retention(
    log: Arc<JetStreamLog>,
    ownership: Arc<dyn Ownership>,
    mut stop: watch::Receiver<bool>,
) {
    let mut owned = ownership.owned(RETENTION_LEASE, 1);
    let every = log.config.prune_interval.max(Duration::from_millis(100));
    let mut last_age: Option<Instant> = None;
    let mut held = false;
    let mut changes_end = false;
    loop {
        if *stop.borrow() {
            break;
        }
        let lease = owned.borrow_and_update().first().copied();
        match lease {
            Some(lease) => {
                if !held {
                    tracing::info!(
                        epoch = lease.epoch,
                        "this node runs the event log's retention"
                    );
                    held = true;
                    last_age = None;
                }
                if ownership
                    .holds(RETENTION_LEASE, lease)
                    .await
                    .unwrap_or(false)
                {
                    let by_age = last_age.is_none_or(|t| t.elapsed() >= every);
                    match log.enforce_retention(by_age).await {
                        Ok(_) if by_age => last_age = Some(Instant::now()),
                        Ok(_) => {}
                        Err(e) => {
                            tracing::warn!(error = %e, "event log retention failed; retrying")
                        }
                    }
                }
            }
            None => held = false,
        }
        let pause = if held {
            CAP_CHECK.min(every)
        } else {
            Duration::from_secs(3600)
        };
        tokio::select! {
            _ = tokio::time::sleep(pause) => {}
            r = owned.changed(), if !changes_end => {
                if r.is_err() {
                    changes_end = true;
                }
            }
            r = stop.changed() => {
                if r.is_err() {
                    break;
                }
            }
        }
    }
    if let Err(e) = ownership.release(RETENTION_LEASE).await {
        tracing::warn!(error = %e, "cannot release the retention lease");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn floors_read_from_metadata() {
        let mut m = HashMap::new();
        m.insert(floor_key(1), "42".to_string());
        m.insert(floor_key(3), "junk".to_string());
        assert_eq!(floors(&m, 4), vec![0, 42, 0, 0]);
    }
}
