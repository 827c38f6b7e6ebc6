//! Partitioning of a cluster log, and the partition owner's dedupe index.
//!
//! **Partition of a message**: `fnv1a64(source_id ‖ 0xff ‖ userId-or-anonymousId) %
//! partitions` — FNV-1a, a fixed, unkeyed hash, so every node and every release puts
//! one user's messages in the same partition (SipHash with a random key would not).
//! The identity is `userId` when the message has one, else `anonymousId`; a user's
//! messages stay in order within a partition, so per-user order holds for messages
//! with the same identity (an anonymous visitor's events before `identify` may sit
//! in another partition than those after it). Changing the partition count moves
//! users between partitions: it is fixed when the stream is created.
//!
//! **Dedupe beyond JetStream's window** ([`PartitionDedupe`]): JetStream drops a
//! repeated `Nats-Msg-Id` only within its `duplicate_window` (minutes). A message
//! retried later is stored again, in the *same* partition (same source and identity),
//! so the partition's owner sees both copies in order and delivers the first only.
//! The index lives in the owner's memory, one per (consumer, partition), and holds
//! a 128-bit key per message received within the dedupe window (default 7 days, the
//! log retention). It is not kept anywhere: when ownership moves, the new owner
//! rebuilds it from the log itself ([`PartitionDedupe::rebuild`]: the partition's
//! retained records up to the committed position), so the log is the only state.

use std::collections::{HashMap, VecDeque};
use std::hash::Hasher;

use crate::{EventLog, LogError, Position, Record};

/// The partition of a message of `source_id` with these ids, of `partitions`.
pub fn partition_of(
    source_id: &str,
    user_id: Option<&str>,
    anonymous_id: Option<&str>,
    partitions: u32,
) -> u32 {
    if partitions <= 1 {
        return 0;
    }
    const OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
    const PRIME: u64 = 0x0000_0100_0000_01b3;
    let mut h = OFFSET;
    let identity = user_id
        .filter(|s| !s.is_empty())
        .or(anonymous_id)
        .unwrap_or("");
    for b in source_id
        .as_bytes()
        .iter()
        .chain(std::iter::once(&0xff))
        .chain(identity.as_bytes())
    {
        h ^= u64::from(*b);
        h = h.wrapping_mul(PRIME);
    }
    (h % u64::from(partitions)) as u32
}

fn key128(source_id: &str, message_id: &str) -> u128 {
    use siphasher::sip128::{Hasher128, SipHasher13};
    let mut h = SipHasher13::new_with_keys(0x7472_6962_7574_6172, 0x7964_6564_7570_6531);
    h.write(source_id.as_bytes());
    h.write(&[0xff]);
    h.write(message_id.as_bytes());
    h.finish128().as_u128()
}

/// Which messages of one partition an owner has seen within the dedupe window.
#[derive(Debug, Default)]
pub struct PartitionDedupe {
    window_ms: i64,
    /// key → seq of the first copy.
    first: HashMap<u128, u64>,
    /// (received_at_ms, key) in arrival order, for eviction.
    order: VecDeque<(i64, u128)>,
    /// Copies dropped since the index was made.
    pub duplicates: u64,
}

impl PartitionDedupe {
    /// An empty index keeping messages received within `window`.
    pub fn new(window: std::time::Duration) -> Self {
        PartitionDedupe {
            window_ms: window.as_millis().min(i64::MAX as u128) as i64,
            ..Default::default()
        }
    }

    /// The window this index keeps.
    pub fn window(&self) -> std::time::Duration {
        std::time::Duration::from_millis(self.window_ms.max(0) as u64)
    }

    /// Messages indexed.
    pub fn len(&self) -> usize {
        self.first.len()
    }

    /// Whether the index is empty.
    pub fn is_empty(&self) -> bool {
        self.first.is_empty()
    }

    /// Notes `record`; true when it is the first copy of its message (or the same
    /// record seen again after a replay), false when an earlier copy with another
    /// sequence number was seen within the window — the caller skips it.
    pub fn observe(&mut self, record: &Record) -> bool {
        self.evict(record.received_at_ms);
        let key = key128(&record.source_id, &record.message_id);
        match self.first.get(&key) {
            Some(seq) if *seq != record.seq => {
                self.duplicates += 1;
                false
            }
            Some(_) => true,
            None => {
                self.first.insert(key, record.seq);
                self.order.push_back((record.received_at_ms, key));
                true
            }
        }
    }

    fn evict(&mut self, now_ms: i64) {
        let horizon = now_ms.saturating_sub(self.window_ms);
        while let Some((at, key)) = self.order.front().copied() {
            if at >= horizon {
                break;
            }
            self.order.pop_front();
            self.first.remove(&key);
        }
    }

    /// Rebuilds the index of a partition a new owner took at `upto`: reads the
    /// partition's retained records up to and including `upto.seq` (the ones the
    /// previous owners handled) and notes each. Costs one read of the retained
    /// partition prefix.
    pub async fn rebuild(
        log: &dyn EventLog,
        upto: &Position,
        window: std::time::Duration,
    ) -> Result<PartitionDedupe, LogError> {
        let mut index = PartitionDedupe::new(window);
        let mut at = upto.at(0);
        while at.seq < upto.seq {
            let records = log.read(&at, 1000).await?;
            let Some(last) = records.last().map(|r| r.seq) else {
                break;
            };
            for r in records.iter().filter(|r| r.seq <= upto.seq) {
                index.observe(r);
            }
            at = at.at(last);
        }
        index.duplicates = 0;
        Ok(index)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::CallType;

    #[test]
    fn partition_is_stable_and_spreads_users() {
        // Fixed values: a change of hash would move every user to another partition.
        assert_eq!(
            partition_of("src", Some("u1"), None, 16),
            partition_of("src", Some("u1"), Some("a"), 16)
        );
        assert_eq!(
            partition_of("src", None, Some("anon"), 16),
            partition_of("src", Some(""), Some("anon"), 16)
        );
        assert_eq!(partition_of("s", Some("u"), None, 1), 0);
        let golden: Vec<u32> = ["u1", "u2", "u3", "u4"]
            .iter()
            .map(|u| partition_of("src_1", Some(u), None, 16))
            .collect();
        assert_eq!(golden, GOLDEN);
        let mut seen = std::collections::HashSet::new();
        for i in 0..1000 {
            seen.insert(partition_of("src", Some(&format!("user-{i}")), None, 16));
        }
        assert_eq!(seen.len(), 16);
    }
    const GOLDEN: [u32; 4] = [12, 5, 2, 3];

    fn rec(seq: u64, id: &str, at: i64) -> Record {
        Record {
            seq,
            partition: 0,
            source_id: "s".into(),
            message_id: id.into(),
            call_type: CallType::Track,
            event: None,
            user_id: None,
            anonymous_id: None,
            received_at_ms: at,
            payload: "{}".into(),
        }
    }

    #[test]
    fn a_repeated_message_within_the_window_is_seen_once() {
        let mut d = PartitionDedupe::new(std::time::Duration::from_secs(10));
        assert!(d.observe(&rec(1, "m1", 1_000)));
        assert!(d.observe(&rec(1, "m1", 1_000)), "the same record replayed");
        assert!(!d.observe(&rec(5, "m1", 2_000)), "a second copy");
        assert!(d.observe(&rec(6, "m2", 3_000)));
        // Past the window the first copy is forgotten.
        assert!(d.observe(&rec(9, "m1", 20_000)));
        assert_eq!(d.duplicates, 1);
    }
}
