//! Who may consume which partition: the seam between consumers and cluster leases.
//!
//! A consumer (the warehouse loader, each destination) processes a partition only
//! while this node owns it. In the embedded mode one node owns every partition
//! forever ([`Sole`]). In cluster mode ownership is a lease in PostgreSQL, one holder
//! per `(consumer, partition)` at a time: a node that dies or stalls loses it when the
//! lease expires, and the next holder gets a higher [`Lease::epoch`].
//!
//! **The epoch is the fencing token.** A consumer commits its position together with
//! the epoch it holds, and a commit whose epoch is lower than the one already recorded
//! for that `(consumer, partition)` is refused (the warehouse checks it inside its own
//! transaction; the destination position store checks it in its `UPDATE`). A stalled
//! node that wakes up after losing its lease therefore cannot commit: it sees
//! [`Ownership::holds`] turn false or its commit refused, and drops the partition.
//!
//! Where positions live is the other half of that contract ([`ConsumerRegistry`]):
//! the embedded log keeps them in its own file; a cluster keeps destinations'
//! positions in the control database and the warehouse's in the warehouse.

use async_trait::async_trait;
use tokio::sync::watch;

use crate::{ConsumerState, Gap, LogError, Position};

/// The right to consume one partition, as of one grant.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Lease {
    /// The partition.
    pub partition: u32,
    /// Increases every time the partition's lease changes hands (0 in embedded mode).
    pub epoch: u64,
}

/// Grants partitions of named consumers to this node.
#[async_trait]
pub trait Ownership: Send + Sync + 'static {
    /// The partitions (of `partitions` in all) of `consumer` that this node owns
    /// now, sorted by partition; the receiver changes as leases are won and lost.
    /// The first call for a consumer starts competing for its partitions.
    fn owned(&self, consumer: &str, partitions: u32) -> watch::Receiver<Vec<Lease>>;

    /// Whether this node still holds `lease` for `consumer` — checked before a
    /// destination sends and before it commits. `false` once the lease expired or
    /// passed to another node, even if this node has not noticed yet.
    async fn holds(&self, consumer: &str, lease: Lease) -> Result<bool, LogError>;

    /// Stops competing for `consumer`'s partitions and releases what it holds
    /// (a deleted or disabled destination; shutdown).
    async fn release(&self, consumer: &str) -> Result<(), LogError>;
}

/// The embedded mode: this node owns every partition of every consumer at epoch 0.
#[derive(Debug, Default, Clone, Copy)]
pub struct Sole;

#[async_trait]
impl Ownership for Sole {
    fn owned(&self, _consumer: &str, partitions: u32) -> watch::Receiver<Vec<Lease>> {
        let all = (0..partitions.max(1))
            .map(|partition| Lease {
                partition,
                epoch: 0,
            })
            .collect();
        // The sender is dropped: the value never changes, and `changed()` returns an
        // error that callers treat as "no change will ever come".
        watch::channel(all).1
    }

    async fn holds(&self, _consumer: &str, _lease: Lease) -> Result<bool, LogError> {
        Ok(true)
    }

    async fn release(&self, _consumer: &str) -> Result<(), LogError> {
        Ok(())
    }
}

/// Where consumers' committed positions live when the log itself does not keep them
/// (cluster mode: the control database). The embedded log implements the same calls
/// on its own file ([`crate::EventLog::cursor`] and friends).
#[async_trait]
pub trait ConsumerRegistry: Send + Sync + 'static {
    /// The committed position of `consumer` in `partition` of log `log_id`
    /// (`None` when it never committed there).
    async fn cursor(
        &self,
        consumer: &str,
        log_id: &str,
        partition: u32,
    ) -> Result<Option<Position>, LogError>;

    /// Durably records `position` for `consumer` under `epoch`, and pins it. Returns
    /// `false` (and stores nothing) when a higher epoch already committed for that
    /// partition: the caller lost its lease and must stop.
    async fn commit(
        &self,
        consumer: &str,
        position: &Position,
        epoch: u64,
    ) -> Result<bool, LogError>;

    /// Keeps `consumer`'s positions but stops them from holding records back.
    async fn unpin(&self, consumer: &str) -> Result<(), LogError>;

    /// Forgets `consumer`.
    async fn remove(&self, consumer: &str) -> Result<(), LogError>;

    /// Every consumer, one entry per (consumer, partition).
    async fn list(&self) -> Result<Vec<ConsumerState>, LogError>;

    /// Records that the log's size cap deleted `lost` records of `gap.partition`
    /// (sequence numbers `gap.from..=gap.to`) of log `log_id` before `consumer` read
    /// them: its [`ConsumerState::dropped`] grows by `lost`, and `gap` with the time
    /// (`at_ms`) become its newest loss (what `/ready` and its status show).
    async fn record_loss(
        &self,
        consumer: &str,
        log_id: &str,
        gap: Gap,
        lost: u64,
        at_ms: i64,
    ) -> Result<(), LogError>;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn sole_owns_every_partition_at_epoch_zero() {
        let rx = Sole.owned("warehouse", 3);
        let leases = rx.borrow().clone();
        assert_eq!(
            leases
                .iter()
                .map(|l| (l.partition, l.epoch))
                .collect::<Vec<_>>(),
            vec![(0, 0), (1, 0), (2, 0)]
        );
        assert!(Sole.holds("warehouse", leases[2]).await.unwrap());
        // A log without partitions still has partition 0.
        assert_eq!(Sole.owned("d", 0).borrow().len(), 1);
    }
}
