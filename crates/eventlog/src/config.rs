//! The `[log]` section of the configuration: one tree for both logs.
//!
//! `url` chooses the log: empty (the default) is the embedded SQLite file under the
//! data dir; `nats://host:4222[,host2:4222…]` is the JetStream stream of a cluster
//! (`TRIBUTARY_LOG=nats://…`). Each log reads its own fields and ignores the other's;
//! `retention` and `max_bytes` mean the same in both.

use std::path::PathBuf;
use std::time::Duration;

/// Settings of the event log. Deserializes as the `[log]` section of the server's
/// configuration (durations in `tributary_model::duration` syntax); `path` is set by
/// the server from its data directory.
#[derive(Debug, Clone, serde::Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    /// Which log: empty for the embedded SQLite log, or the NATS servers of a
    /// JetStream cluster, `nats://h1:4222,h2:4222` (`TRIBUTARY_LOG`).
    pub url: String,
    /// The database file of the embedded log (created if absent).
    #[serde(skip)]
    pub path: PathBuf,
    /// How long records are kept; also the dedupe window (embedded: of the log; in
    /// a cluster: of each partition owner, beyond JetStream's `duplicate_window`).
    /// In JetStream it is applied by the retention task (the stream has no `max_age`),
    /// never past a pinned consumer's position. Default 7 days.
    #[serde(with = "tributary_model::duration")]
    pub retention: Duration,
    /// Append requests that may wait for the writer before callers are told the
    /// log is saturated. Default 4096.
    pub queue_capacity: usize,
    /// How long an append may wait for room in the queue before `Saturated`.
    /// Default 2 s.
    #[serde(with = "tributary_model::duration")]
    pub enqueue_timeout: Duration,
    /// Most records one group commit takes. Default 50,000.
    pub max_group_records: usize,
    /// Read connections in the pool. Default 4.
    pub readers: usize,
    /// How often the writer (JetStream: the retention lease holder) deletes records
    /// older than `retention` (also while no appends arrive). Default 60 s.
    #[serde(with = "tributary_model::duration")]
    pub prune_interval: Duration,
    /// Hard cap on the log's size in bytes; past it the oldest records are deleted
    /// even if a consumer has not read them (each such loss is reported). In
    /// JetStream it is the stream's `max_bytes` with `discard: new`, and the retention
    /// task purges the oldest records above 90 % of it, recording each consumer's loss.
    /// `None` (the default): no cap.
    pub max_bytes: Option<u64>,
    /// How often the checkpointer copies the WAL into the database. Default 100 ms.
    #[serde(with = "tributary_model::duration")]
    pub checkpoint_interval: Duration,
    /// JetStream: the stream's name (created when absent). Default `TRIBUTARY`.
    pub stream: String,
    /// JetStream: the stream's replicas (1, 3 or 5; 3 in production, needs as many
    /// NATS servers). Default 3.
    pub replicas: usize,
    /// JetStream: the number of partitions, fixed when the stream is created
    /// (changing it needs a drain: a stream made with another count is refused).
    /// Default 16.
    pub partitions: u32,
    /// JetStream: how long one append retries publishes that get no ack ("no
    /// responders" during a stream leader election, timeouts while a server is
    /// down) before ingest answers 503. Default 15 s (an election takes ~8 s).
    #[serde(with = "tributary_model::duration")]
    pub publish_retry: Duration,
    /// JetStream: the stream's `duplicate_window`, in which JetStream itself drops
    /// a repeated `Nats-Msg-Id` (its index is in memory, ~290 bytes per id: keep it
    /// minutes; partition owners dedupe the rest of `retention`). Default 2 min.
    #[serde(with = "tributary_model::duration")]
    pub duplicate_window: Duration,
}

impl Default for LogConfig {
    fn default() -> Self {
        Self {
            url: String::new(),
            path: PathBuf::from("events.db"),
            retention: Duration::from_secs(7 * 24 * 3600),
            queue_capacity: 4096,
            enqueue_timeout: Duration::from_secs(2),
            max_group_records: 50_000,
            readers: 4,
            prune_interval: Duration::from_secs(60),
            max_bytes: None,
            checkpoint_interval: Duration::from_millis(100),
            stream: "TRIBUTARY".into(),
            replicas: 3,
            partitions: 16,
            publish_retry: Duration::from_secs(15),
            duplicate_window: Duration::from_secs(120),
        }
    }
}

impl LogConfig {
    /// Whether this configuration selects the JetStream log (`url` is `nats://…`).
    pub fn is_jetstream(&self) -> bool {
        let u = self.url.trim();
        u.starts_with("nats://") || u.starts_with("tls://")
    }

    /// The NATS server addresses of `url` (`nats://h1:4222,h2:4222` →
    /// `["nats://h1:4222", "nats://h2:4222"]`).
    pub fn nats_servers(&self) -> Vec<String> {
        let u = self.url.trim();
        let (scheme, rest) = u.split_once("://").unwrap_or(("nats", u));
        rest.split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(|s| {
                if s.contains("://") {
                    s.to_string()
                } else {
                    format!("{scheme}://{s}")
                }
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nats_url_lists_every_server_with_its_scheme() {
        let c = LogConfig {
            url: "nats://h1:4222, h2:4223,nats://h3:4224".into(),
            ..Default::default()
        };
        assert!(c.is_jetstream());
        assert_eq!(
            c.nats_servers(),
            vec!["nats://h1:4222", "nats://h2:4223", "nats://h3:4224"]
        );
        assert!(!LogConfig::default().is_jetstream());
    }
}
