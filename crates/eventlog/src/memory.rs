//! An in-memory [`ConsumerRegistry`]: positions per `(consumer, log, partition)` with
//! epoch fencing, kept in this process only.
//!
//! Nothing here is durable: it is for tests and for a single node trying the
//! JetStream log without a control database (a restart then replays from the
//! beginning; the warehouse still loads exactly once because it keeps its own
//! position in its transaction, and destinations deliver at least once). A cluster
//! uses the PostgreSQL registry of the control database.

use std::collections::BTreeMap;
use std::sync::Mutex;

use async_trait::async_trait;

use crate::{ConsumerRegistry, ConsumerState, Gap, LogError, Position};

#[derive(Debug, Clone)]
struct Entry {
    position: Position,
    epoch: u64,
    pinned: bool,
    dropped: u64,
    gap: Option<(Gap, i64)>,
}

/// Positions in memory, fenced by epoch.
#[derive(Debug, Default)]
pub struct MemoryRegistry {
    entries: Mutex<BTreeMap<(String, String, u32), Entry>>,
}

impl MemoryRegistry {
    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<(String, String, u32), Entry>> {
        self.entries.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The epoch last committed for `(consumer, log_id, partition)`, if any (tests).
    pub fn epoch(&self, consumer: &str, log_id: &str, partition: u32) -> Option<u64> {
        self.lock()
            .get(&(consumer.to_string(), log_id.to_string(), partition))
            .map(|e| e.epoch)
    }
}

#[async_trait]
impl ConsumerRegistry for MemoryRegistry {
    async fn cursor(
        &self,
        consumer: &str,
        log_id: &str,
        partition: u32,
    ) -> Result<Option<Position>, LogError> {
        Ok(self
            .lock()
            .get(&(consumer.to_string(), log_id.to_string(), partition))
            .map(|e| e.position.clone()))
    }

    async fn commit(
        &self,
        consumer: &str,
        position: &Position,
        epoch: u64,
    ) -> Result<bool, LogError> {
        let mut entries = self.lock();
        let key = (
            consumer.to_string(),
            position.log_id.clone(),
            position.partition,
        );
        if let Some(e) = entries.get(&key)
            && e.epoch > epoch
        {
            return Ok(false);
        }
        let e = entries.entry(key).or_insert_with(|| Entry {
            position: position.clone(),
            epoch,
            pinned: true,
            dropped: 0,
            gap: None,
        });
        e.position = position.clone();
        e.epoch = epoch;
        e.pinned = true;
        Ok(true)
    }

    async fn unpin(&self, consumer: &str) -> Result<(), LogError> {
        for (k, e) in self.lock().iter_mut() {
            if k.0 == consumer {
                e.pinned = false;
            }
        }
        Ok(())
    }

    async fn remove(&self, consumer: &str) -> Result<(), LogError> {
        self.lock().retain(|k, _| k.0 != consumer);
        Ok(())
    }

    async fn list(&self) -> Result<Vec<ConsumerState>, LogError> {
        Ok(self
            .lock()
            .iter()
            .map(|(k, e)| ConsumerState {
                name: k.0.clone(),
                position: e.position.clone(),
                pinned: e.pinned,
                dropped: e.dropped,
                gap: e.gap.map(|(g, _)| g),
                gap_at_ms: e.gap.map(|(_, at)| at),
            })
            .collect())
    }

    async fn record_loss(
        &self,
        consumer: &str,
        log_id: &str,
        gap: Gap,
        lost: u64,
        at_ms: i64,
    ) -> Result<(), LogError> {
        let key = (consumer.to_string(), log_id.to_string(), gap.partition);
        if let Some(e) = self.lock().get_mut(&key) {
            e.dropped += lost;
            e.gap = Some((gap, at_ms));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_lower_epoch_cannot_commit_over_a_higher_one() {
        let r = MemoryRegistry::default();
        let p = Position::new("log", 3, 10);
        assert!(r.commit("warehouse", &p, 1).await.unwrap());
        assert!(r.commit("warehouse", &p.at(20), 2).await.unwrap());
        // The zombie at epoch 1 wakes up: refused, and the position stays.
        assert!(!r.commit("warehouse", &p.at(30), 1).await.unwrap());
        assert_eq!(
            r.cursor("warehouse", "log", 3).await.unwrap(),
            Some(p.at(20))
        );
        assert_eq!(r.cursor("warehouse", "log", 4).await.unwrap(), None);
        r.unpin("warehouse").await.unwrap();
        assert!(!r.list().await.unwrap()[0].pinned);
        r.remove("warehouse").await.unwrap();
        assert!(r.list().await.unwrap().is_empty());
    }
}
