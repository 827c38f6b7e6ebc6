//! The cluster event log: one NATS JetStream stream, replicated by the NATS servers.
//!
//! **Layout.** One stream (`log.stream`, default `TRIBUTARY`) with Limits retention
//! but no `max_age` (optional `max_bytes` = `log.max_bytes` with `discard: new`), file
//! storage, `log.replicas` replicas (3 in production), direct gets allowed. JetStream
//! itself never deletes a record: retention is this crate's, run by one node at a
//! time, and waits for every active consumer ([`retention`]). A message of source `S` goes to subject `tributary.events.<p>.<S>`, with
//! `p` = [`crate::partition_of`] (source, userId or anonymousId) % `log.partitions`
//! (default 16, fixed when the stream is created and kept in its metadata; a stream
//! made with another count is refused). The partition is the subject's third token —
//! consumers of partition `p` filter on `tributary.events.<p>.>` — and the source its
//! fourth, so the debugger's "newest events of a source" is a server-side filter. The
//! body is the record as JSON ([`crate::NewRecord`]).
//!
//! **Positions.** `seq` is the *stream* sequence number, which JetStream assigns,
//! never reuses and makes strictly increasing over the whole stream — hence within
//! each partition too. Sequence numbers are therefore not dense per partition
//! ([`EventLog::dense`] is false): a partition's records are the stream's records on
//! its subjects, with the other partitions' numbers in between. `get(seqs)` and
//! replay's `after` work on the same numbers without a partition. Gap detection
//! ([`EventLog::read_checked_sparse`]) uses the partition's *floor*, which retention
//! raises in the stream's metadata before it deletes anything of the partition:
//! nothing a consumer of partition `p` expected after position `s` can be gone while
//! the floor is ≤ `s + 1`. When it is past that, the records `s + 1 ..` up to the
//! first one the read returned (or the floor) *may* have included some of `p`: the
//! gap is reported with that range of stream numbers, an upper bound of what was lost
//! (it may count other partitions' records; it is never silent).
//!
//! **Ingest** ([`EventLog::append`]): every message is published with `Nats-Msg-Id =
//! source:messageId` (JetStream drops a repeat within `log.duplicate_window`), all of
//! a batch in flight at once, and the append is `Ok` only when every one is acked
//! (stored on a quorum at R3; fsync'd first when the servers run with
//! `sync_interval: always`). A publish that gets "no responders" (a stream leader
//! election, ~8 s) or no ack in time (a server down) is sent again with the same id
//! until `log.publish_retry` (default 15 s) has passed; then the append fails with
//! [`LogError::Unavailable`] (ingest answers 503, never 200). Unlike the embedded log
//! a failed append may have stored part of the batch: the client's retry of the whole
//! request is deduped by the ids (within the window by JetStream, beyond it by the
//! partition owner, see [`crate::PartitionDedupe`]).
//!
//! **Reads** use JetStream's batched direct get (nats-server ≥ 2.11): one request
//! returns up to 1,000 records of one partition after a sequence number, served by
//! any replica. The head ([`EventLog::subscribe`]) follows the stream's last
//! sequence number: this node's own acks move it at once, and a poll of the stream
//! state every 200 ms sees the other nodes' appends.
//!
//! **Consumer positions** are not in NATS: [`EventLog::cursor`], `commit`,
//! `commit_fenced` and friends go to the [`ConsumerRegistry`] given at open (the
//! control database in a cluster, fenced by lease epoch). JetStream acks and
//! JetStream consumers play no part in exactly-once. The same registry is what
//! retention reads: a pinned consumer's position holds its partition's records back.

mod direct;
pub mod retention;
mod time;

pub use retention::{PartitionLag, RETENTION_LEASE, RetentionReport, run_retention};

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use async_nats::jetstream::{self, message::PublishMessage, stream};
use async_trait::async_trait;
use bytes::Bytes;
use tokio::sync::watch;

use crate::{
    AppendStatus, ConsumerRegistry, ConsumerState, EventLog, Gap, LogConfig, LogError, LogStats,
    NewRecord, Position, ReadOutcome, Record, partition_of,
};
use direct::BatchGet;

/// The subject prefix of every record.
pub const SUBJECT_PREFIX: &str = "tributary.events";

/// Most records one direct get returns.
const READ_BATCH: usize = 1000;

/// How often the head follows the stream's state.
const HEAD_POLL: Duration = Duration::from_millis(200);

/// Stream metadata: the partition count the stream was made with.
const META_PARTITIONS: &str = "tributary_partitions";

fn unavailable(e: impl std::fmt::Display) -> LogError {
    LogError::Unavailable(e.to_string())
}

/// A source id as a subject token: kept when it is `[A-Za-z0-9_-]+` (every id the
/// control plane makes, `src_…`), else hex with an `x` prefix.
fn source_token(source_id: &str) -> String {
    if !source_id.is_empty()
        && source_id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
        && !source_id.starts_with('x')
    {
        source_id.to_string()
    } else {
        let mut s = String::with_capacity(1 + source_id.len() * 2);
        s.push('x');
        for b in source_id.bytes() {
            s.push_str(&format!("{b:02x}"));
        }
        s
    }
}

/// The subject of a record of `source_id` in `partition`.
pub fn subject(partition: u32, source_id: &str) -> String {
    format!("{SUBJECT_PREFIX}.{partition}.{}", source_token(source_id))
}

/// The filter of every subject of `partition`.
fn partition_filter(partition: u32) -> String {
    format!("{SUBJECT_PREFIX}.{partition}.>")
}

/// The partition named by a record's subject.
fn partition_of_subject(subject: &str) -> Option<u32> {
    subject
        .strip_prefix(SUBJECT_PREFIX)?
        .strip_prefix('.')?
        .split('.')
        .next()?
        .parse()
        .ok()
}

/// What the head poller last saw of the stream.
struct Follow {
    head: watch::Sender<u64>,
    /// ms since the epoch of the last successful poll (0: never).
    last_ok_ms: AtomicI64,
    last_error: std::sync::Mutex<Option<String>>,
}

/// The JetStream-backed [`EventLog`] of a cluster.
pub struct JetStreamLog {
    client: async_nats::Client,
    js: jetstream::Context,
    stream: stream::Stream,
    config: LogConfig,
    log_id: String,
    partitions: u32,
    registry: Arc<dyn ConsumerRegistry>,
    follow: Arc<Follow>,
    head_rx: watch::Receiver<u64>,
    poller: std::sync::Mutex<Option<tokio::task::JoinHandle<()>>>,
    /// Records the size cap deleted before a pinned consumer read them, by this
    /// node's retention since the log was opened.
    dropped: AtomicU64,
    /// Every floor this node's retention raised (see `retention`, "Floors"): written
    /// again when a concurrent stream update overwrote the metadata with older floors.
    raised: std::sync::Mutex<std::collections::BTreeMap<u32, u64>>,
}

/// Whether the stream's settings differ from what this node's configuration wants.
fn differs(c: &stream::Config, wanted: &stream::Config) -> bool {
    c.max_age != wanted.max_age
        || c.max_bytes != wanted.max_bytes
        || c.discard != wanted.discard
        || c.num_replicas != wanted.num_replicas
        || c.duplicate_window != wanted.duplicate_window
        || !c.allow_direct
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

impl JetStreamLog {
    /// Connects to the NATS servers of `config.url`, creates the stream when it is
    /// absent (or brings its retention, size cap, replicas and duplicate window to
    /// the configuration), and starts following its head. Consumer positions go to
    /// `registry`. Fails when no server answers within a few seconds, or the stream
    /// was made with another partition count.
    pub async fn open(
        config: LogConfig,
        registry: Arc<dyn ConsumerRegistry>,
    ) -> Result<JetStreamLog, LogError> {
        let servers = config.nats_servers();
        if servers.is_empty() {
            return Err(unavailable("log.url names no NATS server"));
        }
        let partitions = config.partitions.max(1);
        let client = async_nats::ConnectOptions::new()
            .name("tributary")
            .connection_timeout(Duration::from_secs(3))
            .max_reconnects(None)
            // Come back within a second of a server returning (the default backoff
            // grows to several seconds, longer than ingest should answer 503 for).
            .reconnect_delay_callback(|attempts| {
                Duration::from_millis((attempts as u64 * 100).clamp(50, 1000))
            })
            .connect(servers.clone())
            .await
            .map_err(|e| unavailable(format!("connecting to NATS {servers:?}: {e}")))?;
        let js = jetstream::ContextBuilder::new()
            .timeout(Duration::from_secs(2))
            .max_ack_inflight(8192)
            .backpressure_on_inflight(true)
            .build(client.clone());
        let wanted = stream::Config {
            name: config.stream.clone(),
            subjects: vec![format!("{SUBJECT_PREFIX}.>")],
            retention: stream::RetentionPolicy::Limits,
            storage: stream::StorageType::File,
            num_replicas: config.replicas.max(1),
            // No age limit, and a full stream refuses new records instead of deleting
            // old ones: retention is ours (see `retention`).
            max_age: Duration::ZERO,
            max_bytes: config
                .max_bytes
                .map_or(-1, |b| i64::try_from(b).unwrap_or(i64::MAX)),
            discard: stream::DiscardPolicy::New,
            duplicate_window: config.duplicate_window.min(config.retention),
            allow_direct: true,
            metadata: [(META_PARTITIONS.to_string(), partitions.to_string())].into(),
            ..Default::default()
        };
        let stream = Self::ensure_stream(&js, wanted, partitions).await?;
        let info = stream.cached_info().clone();
        // Fixed when the stream was made: a new stream (a new log) gets a new id.
        let log_id = format!(
            "js-{}-{:x}",
            info.config.name,
            info.created.unix_timestamp_nanos()
        );
        let (head_tx, head_rx) = watch::channel(info.state.last_sequence);
        let follow = Arc::new(Follow {
            head: head_tx,
            last_ok_ms: AtomicI64::new(now_ms()),
            last_error: std::sync::Mutex::new(None),
        });
        let poller = tokio::spawn(poll_head(stream.clone(), Arc::downgrade(&follow)));
        tracing::info!(stream = %config.stream, partitions, replicas = info.config.num_replicas, %log_id, "jetstream event log open");
        Ok(JetStreamLog {
            client,
            js,
            stream,
            config,
            log_id,
            partitions,
            registry,
            follow,
            head_rx,
            poller: std::sync::Mutex::new(Some(poller)),
            dropped: AtomicU64::new(0),
            raised: Default::default(),
        })
    }

    async fn ensure_stream(
        js: &jetstream::Context,
        wanted: stream::Config,
        partitions: u32,
    ) -> Result<stream::Stream, LogError> {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let attempt = async {
                match js.get_stream(&wanted.name).await {
                    Ok(mut s) => {
                        let info = s.info().await.map_err(unavailable)?.clone();
                        let have = info.config.metadata.get(META_PARTITIONS).cloned();
                        if let Some(have) = have
                            && have != partitions.to_string()
                        {
                            return Err(LogError::Unavailable(format!(
                                "stream {} has {have} partitions, log.partitions is {partitions}: the count is fixed (drain the stream to change it)",
                                wanted.name
                            )));
                        }
                        let c = &info.config;
                        if differs(c, &wanted) {
                            let mut update = c.clone();
                            if !c.max_age.is_zero() {
                                // An older layout: age retention may have deleted the
                                // stream's prefix, in every partition (see
                                // `retention`, "Migration").
                                let first = info.state.first_sequence;
                                let have = retention::floors(&c.metadata, partitions);
                                for p in 0..partitions {
                                    if first > have[p as usize] {
                                        update
                                            .metadata
                                            .insert(retention::floor_key(p), first.to_string());
                                    }
                                }
                                tracing::info!(stream = %wanted.name, max_age = ?c.max_age, first_sequence = first,
                                    "migrating the stream: max_age removed, retention now waits for consumers");
                            }
                            update.max_age = wanted.max_age;
                            update.max_bytes = wanted.max_bytes;
                            update.discard = wanted.discard;
                            update.num_replicas = wanted.num_replicas;
                            update.duplicate_window = wanted.duplicate_window;
                            update.allow_direct = true;
                            update
                                .metadata
                                .insert(META_PARTITIONS.into(), partitions.to_string());
                            js.update_stream(update).await.map_err(unavailable)?;
                            // A whole-config write: retention raising a floor at the
                            // same moment may have written back the old settings
                            // (and this write may have undone its floor: retention
                            // writes its floors again on its next pass).
                            let now = s.info().await.map_err(unavailable)?.config.clone();
                            if differs(&now, &wanted) {
                                return Err(LogError::Unavailable(format!(
                                    "stream {} was changed while it was updated; updating again",
                                    wanted.name
                                )));
                            }
                        }
                        Ok(s)
                    }
                    Err(_) => js.get_or_create_stream(wanted.clone()).await.map_err(|e| {
                        LogError::Unavailable(format!(
                            "creating stream {} (replicas {}; a single NATS server needs log.replicas = 1): {e}",
                            wanted.name, wanted.num_replicas
                        ))
                    }),
                }
            };
            match attempt.await {
                Ok(s) => return Ok(s),
                Err(e) if Instant::now() >= deadline => return Err(e),
                Err(e) if e.to_string().contains("partitions") => return Err(e),
                Err(e) => {
                    tracing::warn!(error = %e, "jetstream stream not ready; retrying");
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
            }
        }
    }

    /// The NATS client (health, tests).
    pub fn client(&self) -> &async_nats::Client {
        &self.client
    }

    /// The server name of the stream's current leader (`None` during an election).
    pub async fn leader(&self) -> Result<Option<String>, LogError> {
        let info = self.stream.get_info().await.map_err(unavailable)?;
        Ok(info.cluster.and_then(|c| c.leader))
    }

    /// The stream's name.
    pub fn stream_name(&self) -> &str {
        &self.config.stream
    }

    fn check(&self, position: &Position) -> Result<(), LogError> {
        if position.log_id == self.log_id && position.partition < self.partitions {
            Ok(())
        } else {
            Err(LogError::ForeignPosition(position.to_string()))
        }
    }

    fn batch_get(&self) -> BatchGet<'_> {
        BatchGet {
            client: &self.client,
            stream: &self.config.stream,
        }
    }

    /// Partition `p`'s floor (records of `p` below it may be gone), asked of the
    /// stream now.
    async fn floor(&self, partition: u32) -> Result<u64, LogError> {
        let info = self.stream.get_info().await.map_err(unavailable)?;
        Ok(retention::floors(&info.config.metadata, self.partitions)
            .get(partition as usize)
            .copied()
            .unwrap_or(0))
    }

    fn advance_head(&self, seq: u64) {
        self.follow.head.send_if_modified(|h| {
            if seq > *h {
                *h = seq;
                true
            } else {
                false
            }
        });
    }

    /// Publishes every message once; returns the acks, and the indexes to send
    /// again (no responders, timeouts), or a permanent error.
    async fn publish_round(
        &self,
        messages: &[(String, String, Bytes)],
        pending: &[usize],
        results: &mut [Option<AppendStatus>],
        retried: bool,
    ) -> Result<(Vec<usize>, Option<String>), LogError> {
        use async_nats::jetstream::context::PublishErrorKind as K;
        let mut again = Vec::new();
        let mut last_error = None;
        let mut acks = Vec::with_capacity(pending.len());
        for &i in pending {
            let (subject, id, payload) = &messages[i];
            let publish = PublishMessage::build()
                .payload(payload.clone())
                .message_id(id);
            match self.js.send_publish(subject.clone(), publish).await {
                Ok(ack) => acks.push((i, ack)),
                Err(e) if matches!(e.kind(), K::MaxPayloadExceeded) => {
                    return Err(unavailable(format!("message too large for NATS: {e}")));
                }
                Err(e) => {
                    last_error = Some(e.to_string());
                    again.push(i);
                }
            }
        }
        let answers = futures::future::join_all(
            acks.into_iter()
                .map(|(i, ack)| async move { (i, ack.await) }),
        )
        .await;
        for (i, answer) in answers {
            match answer {
                Ok(ack) => {
                    self.advance_head(ack.sequence);
                    // A repeat on a retry is most likely this request's own first
                    // send, stored before its ack was lost.
                    results[i] = Some(if ack.duplicate && !retried {
                        AppendStatus::Duplicate
                    } else {
                        AppendStatus::Stored(ack.sequence)
                    });
                }
                Err(e) => {
                    last_error = Some(e.to_string());
                    again.push(i);
                }
            }
        }
        again.sort_unstable();
        Ok((again, last_error))
    }

    fn decode(&self, m: &direct::Got) -> Result<Record, LogError> {
        let new: NewRecord = serde_json::from_slice(&m.payload).map_err(|e| {
            LogError::Unavailable(format!("undecodable record at seq {}: {e}", m.seq))
        })?;
        Ok(Record {
            seq: m.seq,
            partition: partition_of_subject(&m.subject).unwrap_or(0),
            source_id: new.source_id,
            message_id: new.message_id,
            call_type: new.call_type,
            event: new.event,
            user_id: new.user_id,
            anonymous_id: new.anonymous_id,
            received_at_ms: new.received_at_ms,
            payload: new.payload,
        })
    }

    fn decode_all(&self, got: Vec<direct::Got>) -> Result<Vec<Record>, LogError> {
        got.iter().map(|m| self.decode(m)).collect()
    }
}

/// Follows the stream's last sequence number until the log is dropped.
async fn poll_head(stream: stream::Stream, follow: std::sync::Weak<Follow>) {
    let mut tick = tokio::time::interval(HEAD_POLL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let Some(follow) = follow.upgrade() else {
            break;
        };
        match tokio::time::timeout(Duration::from_secs(2), stream.get_info()).await {
            Ok(Ok(info)) => {
                let last = info.state.last_sequence;
                follow.head.send_if_modified(|h| {
                    if last > *h {
                        *h = last;
                        true
                    } else {
                        false
                    }
                });
                follow.last_ok_ms.store(now_ms(), Ordering::Release);
                *follow.last_error.lock().unwrap_or_else(|p| p.into_inner()) = None;
                metrics::gauge!("tributary_log_head").set(last as f64);
                metrics::gauge!("tributary_nats_up").set(1.0);
            }
            Ok(Err(e)) => {
                *follow.last_error.lock().unwrap_or_else(|p| p.into_inner()) = Some(e.to_string());
                metrics::gauge!("tributary_nats_up").set(0.0);
            }
            Err(_) => {
                *follow.last_error.lock().unwrap_or_else(|p| p.into_inner()) =
                    Some("stream info timed out".into());
                metrics::gauge!("tributary_nats_up").set(0.0);
            }
        }
    }
}

#[async_trait]
impl EventLog for JetStreamLog {
    fn log_id(&self) -> &str {
        &self.log_id
    }

    fn partitions(&self) -> u32 {
        self.partitions
    }

    fn dense(&self) -> bool {
        false
    }

    async fn append(&self, batch: Vec<NewRecord>) -> Result<Vec<AppendStatus>, LogError> {
        if batch.is_empty() {
            return Ok(Vec::new());
        }
        let messages: Vec<(String, String, Bytes)> = batch
            .iter()
            .map(|r| {
                let p = partition_of(
                    &r.source_id,
                    r.user_id.as_deref(),
                    r.anonymous_id.as_deref(),
                    self.partitions,
                );
                let body = serde_json::to_vec(r).map_err(unavailable)?;
                Ok((
                    subject(p, &r.source_id),
                    format!("{}:{}", r.source_id, r.message_id),
                    Bytes::from(body),
                ))
            })
            .collect::<Result<_, LogError>>()?;
        let deadline = Instant::now() + self.config.publish_retry;
        let mut results: Vec<Option<AppendStatus>> = vec![None; messages.len()];
        let mut pending: Vec<usize> = (0..messages.len()).collect();
        let mut round = 0u32;
        loop {
            let (again, error) = self
                .publish_round(&messages, &pending, &mut results, round > 0)
                .await?;
            if again.is_empty() {
                break;
            }
            metrics::counter!("tributary_log_publish_retries_total").increment(again.len() as u64);
            let now = Instant::now();
            if now >= deadline {
                let error = error.unwrap_or_default();
                tracing::error!(unacked = again.len(), %error, "jetstream did not ack the batch within log.publish_retry");
                return Err(LogError::Unavailable(format!(
                    "{} of {} messages not acknowledged by JetStream within {:?}: {error}",
                    again.len(),
                    messages.len(),
                    self.config.publish_retry
                )));
            }
            if round == 0 {
                tracing::warn!(unacked = again.len(), error = %error.unwrap_or_default(), "jetstream publish not acked; retrying");
            }
            let pause = Duration::from_millis((100u64 << round.min(3)).min(1000));
            tokio::time::sleep(pause.min(deadline - now)).await;
            pending = again;
            round += 1;
        }
        Ok(results
            .into_iter()
            .map(|r| r.unwrap_or(AppendStatus::Duplicate))
            .collect())
    }

    async fn read(&self, after: &Position, limit: usize) -> Result<Vec<Record>, LogError> {
        self.check(after)?;
        if limit == 0 {
            return Ok(Vec::new());
        }
        let got = self
            .batch_get()
            .next_by_subject(
                after.seq + 1,
                &partition_filter(after.partition),
                limit.min(READ_BATCH),
            )
            .await?;
        self.decode_all(got)
    }

    async fn read_checked_sparse(
        &self,
        after: &Position,
        limit: usize,
    ) -> Result<ReadOutcome, LogError> {
        let records = self.read(after, limit).await?;
        let expected = after.seq + 1;
        if records.first().is_some_and(|r| r.seq == expected) {
            return Ok(ReadOutcome { records, gap: None });
        }
        // Asked after the read, so it covers any deletion since (retention raises
        // the floor before it deletes).
        let floor = self.floor(after.partition).await?;
        if floor <= expected {
            return Ok(ReadOutcome { records, gap: None });
        }
        let end = match records.first() {
            Some(r) => r.seq.min(floor),
            None => floor,
        };
        let gap = (end > expected).then(|| Gap {
            partition: after.partition,
            from: expected,
            to: end - 1,
        });
        Ok(ReadOutcome { records, gap })
    }

    async fn first_retained(&self, partition: u32) -> Result<u64, LogError> {
        if partition >= self.partitions {
            return Err(LogError::ForeignPosition(format!("partition {partition}")));
        }
        let got = self
            .batch_get()
            .next_by_subject(0, &partition_filter(partition), 1)
            .await?;
        match got.first() {
            Some(m) => Ok(m.seq),
            None => Ok(*self.head_rx.borrow() + 1),
        }
    }

    async fn latest(&self, source_id: &str, limit: usize) -> Result<Vec<Record>, LogError> {
        if limit == 0 {
            return Ok(Vec::new());
        }
        let info = self.stream.get_info().await.map_err(unavailable)?;
        let (first, last) = (info.state.first_sequence, info.state.last_sequence);
        if last == 0 || last < first {
            return Ok(Vec::new());
        }
        let filter = format!("{SUBJECT_PREFIX}.*.{}", source_token(source_id));
        // Windows of stream numbers, newest first, each 4× the last; within one, the
        // server filters by subject and returns matches oldest first.
        let mut newest_first: Vec<direct::Got> = Vec::new();
        let mut window = ((limit as u64) * 64).max(4096);
        let mut end = last;
        loop {
            let start = end.saturating_sub(window - 1).max(first);
            let mut part = Vec::new();
            let mut from = start;
            while from <= end {
                let got = self
                    .batch_get()
                    .next_by_subject(from, &filter, READ_BATCH)
                    .await?;
                let Some(last_got) = got.last().map(|m| m.seq) else {
                    break;
                };
                part.extend(got.into_iter().filter(|m| m.seq <= end));
                if last_got >= end {
                    break;
                }
                from = last_got + 1;
            }
            newest_first.extend(part.into_iter().rev());
            if newest_first.len() >= limit || start <= first {
                break;
            }
            end = start - 1;
            window = window.saturating_mul(4);
        }
        newest_first.truncate(limit);
        self.decode_all(newest_first)
    }

    async fn read_range(
        &self,
        from_ms: i64,
        to_ms: i64,
        after: u64,
        limit: usize,
    ) -> Result<Vec<Record>, LogError> {
        // Stream time is when a server stored the message, a little after ingest's
        // `receivedAt`; start a minute early and stop a minute past `to_ms`, and
        // select by `receivedAt` itself.
        const SLACK_MS: i64 = 60_000;
        let all = format!("{SUBJECT_PREFIX}.>");
        let mut out = Vec::new();
        let mut from_seq = if after > 0 { Some(after + 1) } else { None };
        while out.len() < limit {
            let got = match from_seq {
                Some(seq) => {
                    self.batch_get()
                        .next_by_subject(seq, &all, READ_BATCH)
                        .await?
                }
                None => {
                    self.batch_get()
                        .since_time(from_ms.saturating_sub(SLACK_MS), &all, READ_BATCH)
                        .await?
                }
            };
            let Some(last) = got.last().map(|m| m.seq) else {
                break;
            };
            let mut past = false;
            for r in self.decode_all(got)? {
                if r.received_at_ms >= to_ms.saturating_add(SLACK_MS) {
                    past = true;
                    break;
                }
                if r.seq > after && r.received_at_ms >= from_ms && r.received_at_ms < to_ms {
                    out.push(r);
                    if out.len() >= limit {
                        break;
                    }
                }
            }
            if past {
                break;
            }
            from_seq = Some(last + 1);
        }
        Ok(out)
    }

    async fn get(&self, seqs: &[u64]) -> Result<Vec<Record>, LogError> {
        let mut out = Vec::with_capacity(seqs.len());
        for &seq in seqs {
            if let Some(m) = self.batch_get().by_seq(seq).await? {
                out.push(self.decode(&m)?);
            }
        }
        Ok(out)
    }

    async fn cursor(&self, consumer: &str, partition: u32) -> Result<Position, LogError> {
        let start = self.start(partition);
        self.check(&start)?;
        Ok(self
            .registry
            .cursor(consumer, &self.log_id, partition)
            .await?
            .unwrap_or(start))
    }

    async fn commit(&self, consumer: &str, position: &Position) -> Result<(), LogError> {
        self.check(position)?;
        if !self.registry.commit(consumer, position, 0).await? {
            tracing::debug!(consumer, %position, "unfenced commit refused: a lease holder committed");
        }
        Ok(())
    }

    async fn commit_fenced(
        &self,
        consumer: &str,
        position: &Position,
        epoch: u64,
    ) -> Result<bool, LogError> {
        self.check(position)?;
        self.registry.commit(consumer, position, epoch).await
    }

    async fn unpin(&self, consumer: &str) -> Result<(), LogError> {
        self.registry.unpin(consumer).await
    }

    async fn remove_consumer(&self, consumer: &str) -> Result<(), LogError> {
        self.registry.remove(consumer).await
    }

    async fn consumers(&self) -> Result<Vec<ConsumerState>, LogError> {
        self.registry.list().await
    }

    fn subscribe(&self) -> watch::Receiver<u64> {
        self.head_rx.clone()
    }

    async fn stats(&self) -> Result<LogStats, LogError> {
        let info = self.stream.get_info().await.map_err(unavailable)?;
        self.advance_head(info.state.last_sequence);
        Ok(LogStats {
            head: info.state.last_sequence,
            records: info.state.messages,
            bytes: info.state.bytes,
            unconsumed_dropped: self.dropped.load(Ordering::Relaxed),
        })
    }

    async fn healthy(&self) -> Result<(), LogError> {
        use async_nats::connection::State;
        if self.client.connection_state() != State::Connected {
            return Err(unavailable("not connected to any NATS server"));
        }
        let age = now_ms() - self.follow.last_ok_ms.load(Ordering::Acquire);
        if age > 3_000 {
            let error = self
                .follow
                .last_error
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .clone()
                .unwrap_or_default();
            return Err(unavailable(format!(
                "jetstream stream not answering for {}s: {error}",
                age / 1000
            )));
        }
        Ok(())
    }

    async fn close(&self) {
        if let Some(p) = self.poller.lock().ok().and_then(|mut g| g.take()) {
            p.abort();
        }
        let _ = tokio::time::timeout(Duration::from_secs(2), self.client.flush()).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subjects_carry_partition_and_source() {
        assert_eq!(subject(3, "src_abc"), "tributary.events.3.src_abc");
        assert_eq!(partition_of_subject("tributary.events.3.src_abc"), Some(3));
        assert_eq!(partition_of_subject("other.3.x"), None);
        // Ids that are not subject tokens (dots, spaces, wildcards) are hex-encoded,
        // and so is one that starts with the encoding's own prefix.
        assert_eq!(source_token("a.b"), "x612e62");
        assert_eq!(source_token("x1"), "x7831");
        assert_eq!(source_token(""), "x");
    }
}
