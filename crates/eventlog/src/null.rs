//! A log that keeps nothing: appends succeed at once and reads are empty.
//!
//! Only for the bench harness's no-op mode, which measures the server without the
//! cost of durability so the durable figure can be given as a ratio to it. Built
//! only with the `bench` feature, so a production build cannot select it.

use std::sync::atomic::{AtomicU64, Ordering};

use async_trait::async_trait;
use tokio::sync::watch;

use crate::{
    AppendStatus, ConsumerState, EventLog, LogError, LogStats, NewRecord, Position, Record,
};

/// The no-op log (bench only).
pub struct NullLog {
    seq: AtomicU64,
    head: watch::Sender<u64>,
}

impl Default for NullLog {
    fn default() -> Self {
        Self {
            seq: AtomicU64::new(0),
            head: watch::channel(0).0,
        }
    }
}

#[async_trait]
impl EventLog for NullLog {
    fn log_id(&self) -> &str {
        "null"
    }
    async fn append(&self, batch: Vec<NewRecord>) -> Result<Vec<AppendStatus>, LogError> {
        let start = self.seq.fetch_add(batch.len() as u64, Ordering::Relaxed);
        Ok((1..=batch.len() as u64)
            .map(|i| AppendStatus::Stored(start + i))
            .collect())
    }
    async fn read(&self, _after: &Position, _limit: usize) -> Result<Vec<Record>, LogError> {
        Ok(Vec::new())
    }
    async fn first_retained(&self, _partition: u32) -> Result<u64, LogError> {
        Ok(self.seq.load(Ordering::Relaxed) + 1)
    }
    async fn latest(&self, _source_id: &str, _limit: usize) -> Result<Vec<Record>, LogError> {
        Ok(Vec::new())
    }
    async fn read_range(&self, _: i64, _: i64, _: u64, _: usize) -> Result<Vec<Record>, LogError> {
        Ok(Vec::new())
    }
    async fn get(&self, _seqs: &[u64]) -> Result<Vec<Record>, LogError> {
        Ok(Vec::new())
    }
    async fn cursor(&self, _consumer: &str, partition: u32) -> Result<Position, LogError> {
        Ok(self.start(partition))
    }
    async fn commit(&self, _consumer: &str, _position: &Position) -> Result<(), LogError> {
        Ok(())
    }
    async fn unpin(&self, _consumer: &str) -> Result<(), LogError> {
        Ok(())
    }
    async fn remove_consumer(&self, _consumer: &str) -> Result<(), LogError> {
        Ok(())
    }
    async fn consumers(&self) -> Result<Vec<ConsumerState>, LogError> {
        Ok(Vec::new())
    }
    fn subscribe(&self) -> watch::Receiver<u64> {
        self.head.subscribe()
    }
    async fn stats(&self) -> Result<LogStats, LogError> {
        Ok(LogStats::default())
    }
    async fn close(&self) {}
}
