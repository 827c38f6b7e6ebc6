//! The loader: the event-log consumer that turns records into warehouse rows.
//!
//! One task per warehouse. It waits on the log's head ([`EventLog::subscribe`]), loads
//! at most once per `batch_interval` (sooner when `batch_max` records wait), and for
//! each batch: maps records to schemas through the [`SchemaCatalog`], plans and types
//! the rows against what it knows of the warehouse schema, and has the backend commit
//! rows and position together. What it knows of the schema is a cache: it is adopted
//! only after a commit and dropped after any failure, so it is re-read from the
//! warehouse before the retry.
//!
//! Pipelining: while a batch commits and a full batch already waits in the log (a
//! backlog), the next batch is read, planned and typed against the schema cache as
//! the commit will leave it. It is kept only if the commit succeeded and used only if
//! the cache is then exactly the one it was typed against (no `already_loaded`, no
//! failure, no split); otherwise it is rebuilt. It is a batch like any other: its
//! rows and its position are committed together in its own transaction, after the
//! previous one. Planning and typing of a large batch use two threads.
//!
//! Bounded transactions: the records read are first cut into consecutive parts that
//! touch at most [`MAX_TABLES_PER_LOAD`] tables each (counted from the log's columns:
//! source, call type, event name — an over-estimate, never an under-estimate), so a
//! batch of thousands of distinct event names cannot exhaust PostgreSQL's lock table
//! (`53200 out of shared memory`). Each part is one backend transaction that commits
//! its rows *and the position of its last record*; the last part commits the
//! position of the whole read. Exactly once still holds: parts are consecutive and in
//! log order, so after a crash between two parts the stored position is the end of
//! the last committed part and loading resumes right after it; rows at or below the
//! position are skipped inside each transaction as before.
//!
//! Express lane (PostgreSQL): while such a large read is loaded part by part, after
//! each part the records of the *other* schemas (those not making the read large),
//! later in the read or newly appended, are committed ahead of the position without
//! moving it (see [`Loader::express`]), so other sources keep loading within seconds
//! while one source's thousands of new tables are created. Exactly once for them
//! rests on the second guard (`id` inserted only if absent): the regular pass commits
//! them again as no-ops when the position reaches them.
//!
//! Positions: the loader reads from a [`Position`] of its log and the backend keeps
//! one position per log ([`crate::outcome::Claim`]), so a log the warehouse has not
//! seen loads from its beginning (the `id` key stops rows another log loaded). At
//! start, before the warehouse answers, the loader pins its position in the log's
//! consumer registry so retention keeps what it has not loaded; after each commit the
//! log's copy moves. Records found missing ([`read_checked`]: the log's first retained
//! record is past the next one expected) are a gap: reported (error line,
//! `tributary_log_gap_records_total{consumer="warehouse"}`, the warehouse status),
//! never skipped silently.
//!
//! Invariants: the position only moves after the backend committed (exactly once is
//! the backend's transaction; see the crate docs); records are loaded in log order;
//! a transient failure retries the same records with exponential backoff and jitter
//! (until shutdown) — nothing is skipped; a batch too large for the warehouse is
//! split in halves (a single record still too large is retried as transient); a
//! permanent failure is retried once with a fresh schema, then the batch is split in
//! halves until the refused record is alone, and that record is committed as a
//! discard so one bad record cannot stop the pipeline; a configuration failure
//! (unknown database, authentication) is reported ([`crate::Warehouse::health`],
//! `/ready`) and retried every [`CONFIG_RETRY`] instead of in a hot loop. Shutdown
//! never interrupts a commit; it only cuts a backoff short.

use std::collections::{BTreeSet, HashMap, HashSet, VecDeque};
use std::ops::Range;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use tokio::sync::watch;
use tributary_eventlog::{EventLog, Gap, Lease, LogError, Position, Record, read_checked};

use crate::backend::Backend;
use crate::evolve::{Discard, LoadBatch, SchemaLoad, SchemaState, TableSchema, prepare};
use crate::naming::validate_schema_name;
use crate::outcome::{CONSUMER, Claim, Fence, LoadError, StateKey};
use crate::plan::{Names, Planned, Skip, plan_record_with};
use crate::{HealthState, Lag, SchemaCatalog, WarehouseConfig, WarehouseHealth};

/// Most tables one load transaction writes. PostgreSQL's shared lock table holds
/// `max_locks_per_transaction` (default 64) × connections entries for the whole
/// server, and creating or copying into a table takes several (table, index, TOAST):
/// 100 tables stay far below it even beside other sessions.
pub(crate) const MAX_TABLES_PER_LOAD: usize = 100;

/// How often a configuration failure (unknown database, authentication) is retried.
pub(crate) const CONFIG_RETRY: Duration = Duration::from_secs(60);

/// Loader progress shared with [`crate::Warehouse::lag`].
pub(crate) struct Shared {
    head: watch::Receiver<u64>,
    loaded_seq: AtomicU64,
    /// `received_at` (ms) of the oldest record not committed yet, as last seen; 0
    /// when none is known.
    pending_since_ms: AtomicI64,
    retrying: AtomicBool,
    /// The newest gap found in the log, and when (ms).
    gap: std::sync::Mutex<Option<(Gap, i64)>>,
    /// The current run of failed attempts, if the last attempt failed.
    failure: Mutex<Option<Failure>>,
}

/// A run of failed attempts to reach or load the warehouse.
#[derive(Debug, Clone)]
struct Failure {
    since: DateTime<Utc>,
    error: String,
    config: bool,
    attempts: u64,
    next_attempt: DateTime<Utc>,
}

impl Shared {
    pub(crate) fn new(head: watch::Receiver<u64>) -> Self {
        Shared {
            head,
            loaded_seq: AtomicU64::new(0),
            pending_since_ms: AtomicI64::new(0),
            retrying: AtomicBool::new(false),
            gap: std::sync::Mutex::new(None),
            failure: Mutex::new(None),
        }
    }

    /// Records a failed attempt; the next one comes after `delay`.
    fn failed(&self, error: &LoadError, delay: Duration) {
        self.retrying.store(true, Ordering::Release);
        let now = Utc::now();
        let next_attempt = now + chrono::Duration::from_std(delay).unwrap_or_default();
        let mut failure = self.failure.lock().unwrap_or_else(|p| p.into_inner());
        let f = failure.get_or_insert(Failure {
            since: now,
            error: String::new(),
            config: false,
            attempts: 0,
            next_attempt,
        });
        f.error = error.to_string();
        f.config = matches!(error, LoadError::Config(_));
        f.attempts += 1;
        f.next_attempt = next_attempt;
    }

    /// Records a successful attempt: the failure run is over.
    fn succeeded(&self) {
        self.retrying.store(false, Ordering::Release);
        *self.failure.lock().unwrap_or_else(|p| p.into_inner()) = None;
    }

    pub(crate) fn health(&self) -> WarehouseHealth {
        let failure = self
            .failure
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        match failure {
            None => WarehouseHealth {
                state: HealthState::Ok,
                failing_since: None,
                last_error: None,
                failed_attempts: 0,
                next_attempt_at: None,
            },
            Some(f) => WarehouseHealth {
                state: if f.config {
                    HealthState::Failed
                } else {
                    HealthState::Retrying
                },
                failing_since: Some(crate::types::format_timestamp(&f.since)),
                last_error: Some(f.error),
                failed_attempts: f.attempts,
                next_attempt_at: Some(crate::types::format_timestamp(&f.next_attempt)),
            },
        }
    }

    /// The newest gap the loader found in the log and when (ms since the epoch).
    pub(crate) fn gap(&self) -> Option<(Gap, i64)> {
        *self.gap.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Reports records missing from the log: an error line, a counter, the status
    /// (once per gap: a retried read finds the same one again).
    fn report_gap(&self, gap: Gap) {
        if self.gap().is_some_and(|(last, _)| last == gap) {
            return;
        }
        metrics::counter!("tributary_log_gap_records_total", "consumer" => CONSUMER)
            .increment(gap.len());
        tracing::error!(
            consumer = CONSUMER,
            partition = gap.partition,
            from = gap.from,
            to = gap.to,
            records = gap.len(),
            "records left the event log before the warehouse loaded them"
        );
        *self.gap.lock().unwrap_or_else(|p| p.into_inner()) =
            Some((gap, Utc::now().timestamp_millis()));
    }

    pub(crate) fn lag(&self) -> Lag {
        let head = *self.head.borrow();
        let loaded_seq = self.loaded_seq.load(Ordering::Acquire);
        let events = head.saturating_sub(loaded_seq);
        let since = self.pending_since_ms.load(Ordering::Acquire);
        let seconds = if events == 0 || since == 0 {
            0.0
        } else {
            ((Utc::now().timestamp_millis() - since).max(0) as f64) / 1000.0
        };
        Lag {
            events,
            seconds,
            loaded_seq,
            head,
            retrying: self.retrying.load(Ordering::Acquire),
        }
    }

    fn publish(&self) {
        let lag = self.lag();
        metrics::gauge!("tributary_warehouse_lag_events").set(lag.events as f64);
        metrics::gauge!("tributary_warehouse_lag_seconds").set(lag.seconds);
    }
}

/// Delay before retry number `attempt` (0-based): model's backoff rule
/// ([`tributary_model::backoff::delay`]), from 250 ms doubling to a 30 s ceiling, full
/// jitter by `jitter` ∈ [0, 1).
pub(crate) fn backoff(attempt: u32, jitter: f64) -> Duration {
    tributary_model::backoff::delay(
        attempt.saturating_add(1),
        Duration::from_millis(250),
        Duration::from_secs(30),
        jitter,
    )
}

fn jitter() -> f64 {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    f64::from(nanos % 1_000_000) / 1_000_000.0
}

/// The loader task's state.
pub(crate) struct Loader {
    log: Arc<dyn EventLog>,
    catalog: Arc<dyn SchemaCatalog>,
    backend: Arc<Backend>,
    config: WarehouseConfig,
    shared: Arc<Shared>,
    known: HashMap<String, SchemaState>,
    /// The next batch, read and built while the previous one committed.
    ahead: Option<Ahead>,
    /// The log partition this loader reads (0 in the embedded mode).
    partition: u32,
    /// The lease epoch it commits under (cluster mode); `None`: unfenced.
    epoch: Option<u64>,
}

/// The records after position `after`, read (and if possible built) while the batch
/// ending at `after` committed. Used only if the loader's position is then `after`.
struct Ahead {
    after: Position,
    records: Arc<Vec<Record>>,
    batch: Option<Prebuilt>,
}

/// A batch built ahead, and the schema cache it was typed against.
struct Prebuilt {
    known: HashMap<String, SchemaState>,
    batch: LoadBatch,
}

/// The schema each table of a batch has once the batch is committed.
type SchemaChanges = Vec<(String, Vec<(String, TableSchema)>)>;

fn schema_changes(batch: &LoadBatch) -> SchemaChanges {
    batch
        .schemas
        .iter()
        .map(|s| {
            (
                s.schema.clone(),
                s.tables
                    .iter()
                    .map(|t| (t.table.clone(), t.after.clone()))
                    .collect(),
            )
        })
        .collect()
}

/// Applies a committed batch's schema changes to the loader's cache.
fn adopt(known: &mut HashMap<String, SchemaState>, changes: &SchemaChanges) {
    for (schema, tables) in changes {
        let state = known.entry(schema.clone()).or_default();
        state.exists = true;
        for (table, columns) in tables {
            state.tables.insert(table.clone(), columns.clone());
        }
    }
}

/// Reads the records after `after` and, when every schema they load into is in
/// `known` (nothing to describe), plans and types them against it. `None` when
/// nothing could be read.
async fn build_ahead(
    log: Arc<dyn EventLog>,
    catalog: Arc<dyn SchemaCatalog>,
    after: Position,
    max: usize,
    known: HashMap<String, SchemaState>,
) -> Option<Ahead> {
    let (records, gap) = read_log(log.as_ref(), &after, max).await.ok()?;
    if gap.is_some() {
        // Read again (and reported) on the loader's own path.
        return None;
    }
    let records = Arc::new(records);
    let last_seq = records.last()?.seq;
    let now = Utc::now();
    let input = records.clone();
    let batch = blocking(move || {
        let (planned, schemas) = plan_records(catalog.as_ref(), &input, now);
        if !schemas.iter().all(|s| known.contains_key(s)) {
            return None;
        }
        let batch = prepare(&known, planned, last_seq, now);
        Some(Prebuilt { known, batch })
    })
    .await
    .ok()
    .flatten();
    Some(Ahead {
        after,
        records,
        batch,
    })
}

/// Below this many records a batch is planned on the calling thread only.
const PARALLEL_MIN_RECORDS: usize = 2000;

/// Plans the rows of `records`: `(schema, row)` in log order, and the schemas seen.
/// Records without a usable schema or that cannot be planned are skipped (counted and
/// logged). Planning is per record, so a large batch is planned in two halves on two
/// threads and the halves are joined in order.
fn plan_records(
    catalog: &dyn SchemaCatalog,
    records: &[Record],
    now: DateTime<Utc>,
) -> (Vec<(Arc<str>, Planned)>, BTreeSet<String>) {
    let uuid_ts = crate::types::format_timestamp(&now);
    if records.len() < PARALLEL_MIN_RECORDS {
        return plan_slice(catalog, records, &uuid_ts);
    }
    let (first, second) = records.split_at(records.len() / 2);
    let ((mut planned, mut schemas), other) = std::thread::scope(|s| {
        let other = s.spawn(|| plan_slice(catalog, second, &uuid_ts));
        (plan_slice(catalog, first, &uuid_ts), other.join())
    });
    match other {
        Ok((more, more_schemas)) => {
            planned.extend(more);
            schemas.extend(more_schemas);
        }
        Err(panic) => std::panic::resume_unwind(panic),
    }
    (planned, schemas)
}

fn plan_slice(
    catalog: &dyn SchemaCatalog,
    records: &[Record],
    uuid_ts: &str,
) -> (Vec<(Arc<str>, Planned)>, BTreeSet<String>) {
    let mut planned = Vec::with_capacity(records.len() * 2);
    let mut schemas = BTreeSet::new();
    // Consecutive records mostly come from one source: its schema is looked up once
    // per run and shared by the rows.
    let mut last: Option<(&str, Arc<str>)> = None;
    let mut names = Names::default();
    // A record's rows, reused from record to record.
    let mut rows = Vec::with_capacity(2);
    for record in records {
        let schema = match &last {
            Some((source, schema)) if *source == record.source_id => schema.clone(),
            _ => {
                let Some(schema) = schema_of(catalog, record) else {
                    continue;
                };
                let schema: Arc<str> = schema.into();
                last = Some((record.source_id.as_str(), schema.clone()));
                schema
            }
        };
        rows.clear();
        match plan_record_with(record, uuid_ts, &mut names, &mut rows) {
            Ok(()) => {
                if !schemas.contains(&*schema) {
                    schemas.insert(schema.to_string());
                }
                planned.extend(rows.drain(..).map(|p| (schema.clone(), p)));
            }
            Err(skip) => {
                metrics::counter!("tributary_warehouse_skipped_total").increment(1);
                let reason = match skip {
                    Skip::BadPayload(r) => r,
                    Skip::UnknownType(t) => format!("unknown call type {t:?}"),
                };
                tracing::warn!(seq = record.seq, message_id = %record.message_id, %reason, "record not loaded");
            }
        }
    }
    (planned, schemas)
}

/// Why loading a chunk of records stopped.
enum ChunkError {
    /// The warehouse refuses these records.
    Permanent(String),
    /// These records (more than one) are too many for one transaction.
    TooLarge(String),
    /// Shutdown was requested during a backoff.
    Stopped,
}

fn stopped(stop: &watch::Receiver<bool>) -> bool {
    *stop.borrow() || stop.has_changed().is_err()
}

/// Sleeps `d` unless shutdown comes first; true when shutdown came.
async fn sleep_or_stop(d: Duration, stop: &mut watch::Receiver<bool>) -> bool {
    if stopped(stop) {
        return true;
    }
    tokio::select! {
        _ = tokio::time::sleep(d) => stopped(stop),
        _ = stop.changed() => true,
    }
}

impl Loader {
    pub(crate) fn new(
        log: Arc<dyn EventLog>,
        catalog: Arc<dyn SchemaCatalog>,
        backend: Arc<Backend>,
        config: WarehouseConfig,
        shared: Arc<Shared>,
    ) -> Self {
        Loader {
            log,
            catalog,
            backend,
            config,
            shared,
            known: HashMap::new(),
            ahead: None,
            partition: 0,
            epoch: None,
        }
    }

    /// This loader for one partition under a lease: it reads only that partition,
    /// claims the position row for the lease's epoch at start and commits every
    /// batch fenced by it (module `crate::partitioned`).
    pub(crate) fn for_lease(mut self, lease: Lease) -> Self {
        self.partition = lease.partition;
        self.epoch = Some(lease.epoch);
        self
    }

    /// Records the log's copy of the position (what retention reads), under this
    /// loader's lease epoch when it holds one: a cluster's registry refuses an
    /// unfenced commit for a partition that has leases, and a zombie's is refused.
    async fn record_position(&self, position: &Position) -> Result<(), LogError> {
        match self.epoch {
            Some(epoch) => self
                .log
                .commit_fenced(CONSUMER, position, epoch)
                .await
                .map(|_| ()),
            None => self.log.commit(CONSUMER, position).await,
        }
    }

    /// The fence of this loader's commits, when it holds a lease.
    fn fence(&self) -> Option<Fence> {
        self.epoch.map(|epoch| Fence {
            key: StateKey {
                log_id: self.log.log_id().to_string(),
                partition: self.partition,
            },
            epoch,
        })
    }

    pub(crate) async fn run(mut self, mut stop: watch::Receiver<bool>) {
        let hint = self.estimate_position().await;
        let Some(seq) = self.init(&hint, &mut stop).await else {
            return;
        };
        let mut cursor = hint.at(seq);
        self.shared.loaded_seq.store(cursor.seq, Ordering::Release);
        self.shared.pending_since_ms.store(0, Ordering::Release);
        // The log's copy follows the warehouse's (lower for a warehouse that has not
        // loaded this log yet), so retention keeps what is still to load.
        if cursor != hint
            && let Err(e) = self.record_position(&cursor).await
        {
            tracing::warn!(error = %e, "could not record the warehouse position in the log");
        }
        self.shared.publish();
        tracing::info!(position = %cursor, kind = ?self.backend.kind(), "warehouse loader started");

        let mut head_rx = self.log.subscribe();
        let mut last_load: Option<Instant> = None;
        let interval = self.config.batch_interval;
        loop {
            if stopped(&stop) {
                break;
            }
            let head = *head_rx.borrow_and_update();
            if head > cursor.seq && self.shared.pending_since_ms.load(Ordering::Acquire) == 0 {
                // Records wait: lag in seconds counts from the oldest of them.
                self.note_oldest(&cursor).await;
            }
            self.shared.publish();
            if head <= cursor.seq {
                tokio::select! {
                    r = head_rx.changed() => {
                        if r.is_err() && sleep_or_stop(interval, &mut stop).await {
                            break;
                        }
                    }
                    _ = stop.changed() => {}
                }
                continue;
            }
            let waiting = head - cursor.seq;
            if let Some(t) = last_load {
                let elapsed = t.elapsed();
                if elapsed < interval && waiting < self.config.batch_max as u64 {
                    tokio::select! {
                        _ = tokio::time::sleep(interval - elapsed) => {}
                        r = head_rx.changed() => {
                            if r.is_err() && sleep_or_stop(interval - elapsed, &mut stop).await {
                                break;
                            }
                        }
                        _ = stop.changed() => {}
                    }
                    continue;
                }
            }
            let ahead = match self.ahead.take() {
                Some(a) if a.after == cursor => Some(a),
                _ => None,
            };
            let mut gap = None;
            let (records, prebuilt) = match ahead {
                Some(a) => (Ok(a.records), a.batch),
                None => (
                    read_log(self.log.as_ref(), &cursor, self.config.batch_max)
                        .await
                        .map(|(records, found)| {
                            if let Some(found) = found {
                                self.shared.report_gap(found);
                                gap = Some(found);
                            }
                            Arc::new(records)
                        }),
                    None,
                ),
            };
            let records = match records {
                Ok(r) => r,
                Err(e) => {
                    tracing::warn!(error = %e, "warehouse loader cannot read the event log");
                    if sleep_or_stop(backoff(3, jitter()), &mut stop).await {
                        break;
                    }
                    continue;
                }
            };
            let Some(last) = records.last().map(|r| r.seq) else {
                if let Some(gap) = gap {
                    // Everything after the position is gone (reported above): the
                    // position moves past the gap, in the warehouse's transaction.
                    let past = LoadBatch {
                        schemas: Vec::new(),
                        last_seq: gap.to,
                        loaded_at: Utc::now(),
                        fence: None,
                    };
                    if self.commit(past).await.is_ok() {
                        cursor = cursor.at(gap.to);
                        self.shared.pending_since_ms.store(0, Ordering::Release);
                        continue;
                    }
                }
                // The head moved but nothing is readable yet; look again shortly.
                if sleep_or_stop(interval.max(Duration::from_millis(50)), &mut stop).await {
                    break;
                }
                continue;
            };
            last_load = Some(Instant::now());
            self.shared
                .pending_since_ms
                .store(records[0].received_at_ms.max(1), Ordering::Release);
            match self.load(records, prebuilt, &mut stop).await {
                true => {
                    cursor = cursor.at(last);
                    self.shared.pending_since_ms.store(0, Ordering::Release);
                }
                false => break,
            }
        }
        self.shared.publish();
        tracing::info!(position = %cursor, "warehouse loader stopped");
    }

    /// Until the warehouse answers, reports lag from the log's copy of the position (a
    /// hint written after each commit) so `/ready` and `/metrics` are meaningful even
    /// when the warehouse is down at startup. Pins that copy in the log's consumer
    /// registry (registering the loader at the log's beginning if it never
    /// committed), so retention keeps every record the warehouse may still need.
    /// Returns the log's copy.
    async fn estimate_position(&self) -> Position {
        let hint = match self.log.cursor(CONSUMER, self.partition).await {
            Ok(p) => p,
            Err(_) => self.log.start(self.partition),
        };
        if let Err(e) = self.record_position(&hint).await {
            tracing::warn!(error = %e, "could not register the warehouse with the event log");
        }
        self.shared.loaded_seq.store(hint.seq, Ordering::Release);
        self.note_oldest(&hint).await;
        hint
    }

    /// Remembers `received_at` of the first record after `after` as the oldest one
    /// waiting (lag in seconds counts from it).
    async fn note_oldest(&self, after: &Position) {
        if let Ok(next) = self.log.read(after, 1).await
            && let Some(r) = next.first()
        {
            self.shared
                .pending_since_ms
                .store(r.received_at_ms.max(1), Ordering::Release);
        }
    }

    /// Prepares the backend and finds the position of this log in it; retries until
    /// it works or shutdown. `hint` is the log's copy of the position.
    async fn init(&self, hint: &Position, stop: &mut watch::Receiver<bool>) -> Option<u64> {
        let mut attempt = 0;
        loop {
            let claim = Claim {
                key: StateKey {
                    log_id: hint.log_id.clone(),
                    partition: hint.partition,
                },
                head: *self.shared.head.borrow(),
                hint: hint.seq,
                epoch: self.epoch,
            };
            match self.backend.init(&claim).await {
                Ok(seq) => {
                    self.shared.succeeded();
                    return Some(seq);
                }
                Err(LoadError::Fenced(e)) => {
                    tracing::info!(partition = self.partition, error = %e, "warehouse partition owned by a newer lease; not loading it");
                    return None;
                }
                Err(e) => {
                    metrics::counter!("tributary_warehouse_load_errors_total").increment(1);
                    let delay = self.retry_after(&e, attempt, "warehouse not ready");
                    // Events keep arriving while the warehouse is down: their age is
                    // the lag.
                    if self.shared.pending_since_ms.load(Ordering::Acquire) == 0 {
                        self.note_oldest(hint).await;
                    }
                    self.shared.publish();
                    if sleep_or_stop(delay, stop).await {
                        return None;
                    }
                    attempt = attempt.saturating_add(1);
                }
            }
        }
    }

    /// Loads `records` (in order), starting from `prebuilt` when it was built ahead
    /// (see [`Ahead`]). Returns false when shutdown interrupted it before everything
    /// was committed.
    async fn load(
        &mut self,
        records: Arc<Vec<Record>>,
        prebuilt: Option<Prebuilt>,
        stop: &mut watch::Receiver<bool>,
    ) -> bool {
        let mut prebuilt = prebuilt;
        let mut chunks = split_by_tables(&records, MAX_TABLES_PER_LOAD);
        if chunks.len() > 1 {
            tracing::info!(
                records = records.len(),
                parts = chunks.len(),
                max_tables = MAX_TABLES_PER_LOAD,
                "batch touches many tables; loading it in parts"
            );
        }
        // Schemas that make this read large; the others may take the express lane.
        let express = chunks.len() > 1 && self.backend.kind() == crate::BackendKind::Postgres;
        let heavy = express.then(|| heavy_schemas(self.catalog.as_ref(), &records));
        let mut expressed = 0u64;
        while let Some(chunk) = chunks.pop_front() {
            match self
                .load_chunk(&records, chunk.clone(), prebuilt.take(), stop)
                .await
            {
                Ok(()) => {
                    if let Some(heavy) = &heavy
                        && !chunks.is_empty()
                        && !stopped(stop)
                    {
                        let after = records[chunk.end - 1].seq.max(expressed);
                        expressed = self.express(&records, after, heavy).await;
                    }
                }
                Err(ChunkError::Stopped) => return false,
                Err(ChunkError::TooLarge(e)) => {
                    tracing::warn!(error = %e, records = chunk.len(), "batch too large for the warehouse; splitting it");
                    let mid = chunk.start + chunk.len() / 2;
                    chunks.push_front(mid..chunk.end);
                    chunks.push_front(chunk.start..mid);
                }
                Err(ChunkError::Permanent(e)) if chunk.len() > 1 => {
                    tracing::warn!(error = %e, records = chunk.len(), "warehouse refused a batch; isolating the record");
                    let mid = chunk.start + chunk.len() / 2;
                    chunks.push_front(mid..chunk.end);
                    chunks.push_front(chunk.start..mid);
                }
                Err(ChunkError::Permanent(e)) => {
                    if !self.reject(&records[chunk.start], &e, stop).await {
                        return false;
                    }
                }
            }
        }
        true
    }

    /// The express lane: while a large read is loaded part by part, the records of
    /// the other schemas after `after` — in the rest of the read and newly appended to
    /// the log — are committed ahead of the position ([`Backend::apply_ahead`]), at most
    /// one bounded part at a time, so one source's flood of event names does not hold
    /// up every other source for the minutes its table creations take. The position
    /// does not move: the regular pass commits those records again, in order, as
    /// no-ops (rows go in only if their `id` is absent; discards follow inserted rows),
    /// so exactly once holds. Records of a schema are expressed only after every
    /// earlier record of it was committed (the part before), so `users` still sees
    /// each schema's identifies in log order. A failure here is only logged: the
    /// regular pass loads the records anyway. Returns the highest seq considered.
    async fn express(&mut self, records: &[Record], after: u64, heavy: &HashSet<String>) -> u64 {
        let read_end = records.last().map_or(after, |r| r.seq);
        let mut candidates: Vec<Record> =
            records.iter().filter(|r| r.seq > after).cloned().collect();
        let from = after.max(read_end);
        let from = Position::new(self.log.log_id(), self.partition, from);
        if let Ok(more) = self.log.read(&from, self.config.batch_max).await {
            candidates.extend(more);
        }
        let Some(last) = candidates.last().map(|r| r.seq) else {
            return after;
        };
        let mut schemas: HashMap<String, Option<String>> = HashMap::new();
        let mut light: Vec<Record> = Vec::new();
        for r in candidates {
            let schema = schemas
                .entry(r.source_id.clone())
                .or_insert_with(|| schema_of(self.catalog.as_ref(), &r));
            if schema.as_ref().is_some_and(|s| !heavy.contains(s)) {
                light.push(r);
            }
        }
        let considered = match split_by_tables(&light, MAX_TABLES_PER_LOAD).pop_front() {
            None => return last,
            Some(first) if first.end < light.len() => {
                light.truncate(first.end);
                light[first.end - 1].seq
            }
            Some(_) => last,
        };
        let n = light.len();
        let batch = match self.build(Arc::new(light), 0..n).await {
            Ok(mut b) => {
                b.fence = self.fence();
                b
            }
            Err(e) => {
                self.known.clear();
                tracing::debug!(error = %e, "express lane: cannot build; the regular pass will load these records");
                return after;
            }
        };
        let changes = schema_changes(&batch);
        match self.backend.apply_ahead(batch).await {
            None => u64::MAX,
            Some(Ok(stats)) => {
                adopt(&mut self.known, &changes);
                metrics::counter!("tributary_warehouse_rows_loaded_total").increment(stats.rows);
                tracing::debug!(
                    records = n,
                    rows = stats.rows,
                    "express lane: committed ahead of a large batch"
                );
                considered
            }
            Some(Err(e)) => {
                self.known.clear();
                tracing::debug!(error = %e, "express lane failed; the regular pass will load these records");
                after
            }
        }
    }

    /// Loads one chunk, retrying transient failures. A `prebuilt` batch is used for the
    /// first attempt only, and only if it was typed against exactly the schema the
    /// loader knows now; otherwise the chunk is built afresh.
    async fn load_chunk(
        &mut self,
        records: &Arc<Vec<Record>>,
        chunk: Range<usize>,
        prebuilt: Option<Prebuilt>,
        stop: &mut watch::Receiver<bool>,
    ) -> Result<(), ChunkError> {
        let mut attempt = 0u32;
        let mut permanent = 0u32;
        let mut prebuilt =
            prebuilt.filter(|p| chunk == (0..records.len()) && p.known == self.known);
        loop {
            let batch = match prebuilt.take() {
                Some(p) => Ok(p.batch),
                None => self.build(records.clone(), chunk.clone()).await,
            };
            let result = match batch {
                Ok(batch) if chunk == (0..records.len()) => {
                    self.commit_and_build_ahead(batch).await
                }
                Ok(batch) => self.commit(batch).await,
                Err(e) => Err(e),
            };
            match result {
                Ok(()) => return Ok(()),
                Err(LoadError::Fenced(e)) => {
                    tracing::warn!(partition = self.partition, error = %e, "warehouse partition taken over by a newer lease; this loader stops");
                    return Err(ChunkError::Stopped);
                }
                Err(LoadError::TooLarge(e)) if chunk.len() > 1 => {
                    self.known.clear();
                    metrics::counter!("tributary_warehouse_load_errors_total").increment(1);
                    return Err(ChunkError::TooLarge(e));
                }
                Err(
                    e @ (LoadError::Transient(_) | LoadError::TooLarge(_) | LoadError::Config(_)),
                ) => {
                    self.known.clear();
                    metrics::counter!("tributary_warehouse_load_errors_total").increment(1);
                    let delay = self.retry_after(&e, attempt, "warehouse load failed");
                    if sleep_or_stop(delay, stop).await {
                        return Err(ChunkError::Stopped);
                    }
                    attempt = attempt.saturating_add(1);
                }
                Err(LoadError::Permanent(e)) => {
                    self.known.clear();
                    metrics::counter!("tributary_warehouse_load_errors_total").increment(1);
                    permanent += 1;
                    if permanent >= 2 {
                        return Err(ChunkError::Permanent(e));
                    }
                    tracing::warn!(error = %e, "warehouse refused a load; retrying with a fresh schema");
                }
            }
        }
    }

    /// Commits a whole batch and, while the warehouse works on it, reads, plans and
    /// types the next one when a full batch already waits in the log (a backlog), so
    /// the next commit can start as soon as this one ends. The batch built ahead is
    /// typed against the schema as it will be *if this commit succeeds*; it is kept
    /// only on success, and [`Loader::load_chunk`] uses it only if the loader's schema
    /// cache is then exactly that (no `already_loaded`, no failure in between).
    async fn commit_and_build_ahead(&mut self, batch: LoadBatch) -> Result<(), LoadError> {
        self.ahead = None;
        let after = self.log.start(self.partition).at(batch.last_seq);
        let head = *self.shared.head.borrow();
        let max = self.config.batch_max;
        if head.saturating_sub(after.seq) < max as u64 {
            return self.commit(batch).await;
        }
        let mut known = self.known.clone();
        adopt(&mut known, &schema_changes(&batch));
        let next = build_ahead(self.log.clone(), self.catalog.clone(), after, max, known);
        let (result, ahead) = tokio::join!(self.commit(batch), next);
        if result.is_ok() {
            self.ahead = ahead;
        }
        result
    }

    /// Plans and types a chunk of records. The CPU work (JSON parsing, naming, typing)
    /// runs on a blocking thread, never on the async runtime.
    async fn build(
        &mut self,
        records: Arc<Vec<Record>>,
        chunk: Range<usize>,
    ) -> Result<LoadBatch, LoadError> {
        let now = Utc::now();
        let last_seq = records[chunk.end - 1].seq;
        let catalog = self.catalog.clone();
        let (planned, schemas) =
            blocking(move || plan_records(catalog.as_ref(), &records[chunk], now)).await?;
        self.describe(schemas).await?;
        let known = std::mem::take(&mut self.known);
        let (batch, known) = blocking(move || {
            let batch = prepare(&known, planned, last_seq, now);
            (batch, known)
        })
        .await?;
        self.known = known;
        Ok(batch)
    }

    async fn describe(&mut self, schemas: BTreeSet<String>) -> Result<(), LoadError> {
        for schema in schemas {
            if !self.known.contains_key(&schema) {
                let state = self.backend.describe(&schema).await?;
                self.known.insert(schema, state);
            }
        }
        Ok(())
    }

    /// Commits a batch and adopts its schema changes.
    async fn commit(&mut self, mut batch: LoadBatch) -> Result<(), LoadError> {
        let started = Instant::now();
        let last_seq = batch.last_seq;
        let changes = schema_changes(&batch);
        batch.fence = self.fence();
        let stats = self.backend.apply(batch).await?;
        if stats.fenced {
            self.known.clear();
            metrics::counter!("tributary_warehouse_fenced_commits_total").increment(1);
            return Err(LoadError::Fenced(format!(
                "commit of partition {} at epoch {} refused",
                self.partition,
                self.epoch.unwrap_or(0)
            )));
        }
        if stats.already_loaded {
            // Another loader (or an earlier attempt) committed it; the cache may be
            // behind that loader's DDL.
            self.known.clear();
        } else {
            adopt(&mut self.known, &changes);
        }
        self.shared.loaded_seq.store(last_seq, Ordering::Release);
        self.shared.succeeded();
        metrics::counter!("tributary_warehouse_rows_loaded_total").increment(stats.rows);
        metrics::counter!("tributary_warehouse_discards_total").increment(stats.discards);
        metrics::histogram!("tributary_warehouse_batch_seconds")
            .record(started.elapsed().as_secs_f64());
        // The log's copy of the position is informational (retention, tooling); the
        // warehouse's own copy is authoritative, so a failure here is harmless.
        if let Err(e) = self
            .record_position(&self.log.start(self.partition).at(last_seq))
            .await
        {
            tracing::debug!(error = %e, "could not record the warehouse position in the log");
        }
        Ok(())
    }

    /// Records a failed attempt (health, log) and returns how long to wait before the
    /// next: backoff with jitter, or [`CONFIG_RETRY`] for a configuration failure,
    /// which is logged as an error naming the cause.
    fn retry_after(&self, e: &LoadError, attempt: u32, what: &str) -> Duration {
        let delay = match e {
            LoadError::Config(_) => CONFIG_RETRY,
            _ => backoff(attempt, jitter()),
        };
        self.shared.failed(e, delay);
        let delay_ms = delay.as_millis() as u64;
        match e {
            LoadError::Config(_) => {
                tracing::error!(error = %e, attempt, delay_ms, "{what}: the warehouse configuration must be fixed; retrying slowly")
            }
            _ => tracing::warn!(error = %e, attempt, delay_ms, "{what}; retrying"),
        }
        delay
    }

    /// Commits a record the warehouse refuses as a discard (so the loader moves on).
    /// Returns false on shutdown.
    async fn reject(
        &mut self,
        record: &Record,
        error: &str,
        stop: &mut watch::Receiver<bool>,
    ) -> bool {
        metrics::counter!("tributary_warehouse_rejected_records_total").increment(1);
        tracing::error!(seq = record.seq, message_id = %record.message_id, %error, "warehouse refused a record; recorded in tributary_discards");
        let now = Utc::now();
        let mut attempt = 0u32;
        loop {
            let schema = schema_of(self.catalog.as_ref(), record);
            let batch = rejection_batch(schema, record, error, now);
            match self.commit(batch).await {
                Ok(()) => return true,
                Err(LoadError::Fenced(_)) => return false,
                Err(e) => {
                    self.known.clear();
                    let delay = self.retry_after(&e, attempt, "could not record a refused record");
                    if sleep_or_stop(delay, stop).await {
                        return false;
                    }
                    attempt = attempt.saturating_add(1);
                }
            }
        }
    }
}

/// Cuts `records` into consecutive ranges that each write at most `max` tables
/// (a range of one record is never cut further). A record's tables are counted from
/// its log columns by (source, call type, event name): sources sharing a schema and
/// event names that name one table are counted apart, so the count is never below
/// the real one.
fn split_by_tables(records: &[Record], max: usize) -> VecDeque<Range<usize>> {
    let mut out = VecDeque::new();
    let mut tables: HashSet<(&str, &str, &str)> = HashSet::new();
    let mut start = 0;
    for (i, r) in records.iter().enumerate() {
        let source = r.source_id.as_str();
        let keys: [(&str, &str, &str); 2] = match r.call_type.as_str() {
            "track" => [
                (source, "tracks", ""),
                (source, "event", r.event.as_deref().unwrap_or("")),
            ],
            "identify" => [(source, "identifies", ""), (source, "users", "")],
            other => [(source, other, ""), (source, other, "")],
        };
        // Every schema also gets its discards table.
        let mut keys = vec![keys[0], keys[1], (source, "tributary_discards", "")];
        keys.sort_unstable();
        keys.dedup();
        let new = keys.iter().filter(|k| !tables.contains(*k)).count();
        if i > start && tables.len() + new > max {
            out.push_back(start..i);
            start = i;
            tables.clear();
        }
        tables.extend(keys);
    }
    if start < records.len() {
        out.push_back(start..records.len());
    }
    out
}

/// The schemas that write more than a quarter of [`MAX_TABLES_PER_LOAD`] tables in
/// `records` (counted as [`split_by_tables`] counts): the ones that make a read large.
fn heavy_schemas(catalog: &dyn SchemaCatalog, records: &[Record]) -> HashSet<String> {
    let mut by_source: HashMap<&str, HashSet<(&str, &str)>> = HashMap::new();
    for r in records {
        let tables = by_source.entry(r.source_id.as_str()).or_default();
        match r.call_type.as_str() {
            "track" => tables.insert(("event", r.event.as_deref().unwrap_or(""))),
            other => tables.insert((other, "")),
        };
    }
    let mut tables_per_schema: HashMap<String, usize> = HashMap::new();
    for (source, tables) in by_source {
        if let Some(schema) = catalog.schema_for(source) {
            *tables_per_schema.entry(schema).or_default() += tables.len();
        }
    }
    tables_per_schema
        .into_iter()
        .filter(|(_, n)| *n > MAX_TABLES_PER_LOAD / 4)
        .map(|(schema, _)| schema)
        .collect()
}

/// Reads up to `max` records after `cursor`, and the gap before them if records the
/// loader expected next are gone.
async fn read_log(
    log: &dyn EventLog,
    cursor: &Position,
    max: usize,
) -> Result<(Vec<Record>, Option<Gap>), LogError> {
    let first = read_checked(log, cursor, max).await?;
    let mut out = first.records;
    while !out.is_empty() && out.len() < max {
        let after = cursor.at(out.last().map_or(cursor.seq, |r| r.seq));
        let more = log.read(&after, max - out.len()).await?;
        // Records missing in between are found (and reported) by the next read.
        if more.first().is_none_or(|r| r.seq != after.seq + 1) {
            break;
        }
        out.extend(more);
    }
    Ok((out, first.gap))
}

/// The schema a record loads into, if its source has a usable one.
fn schema_of(catalog: &dyn SchemaCatalog, record: &Record) -> Option<String> {
    let schema = catalog.schema_for(&record.source_id)?;
    match validate_schema_name(&schema) {
        Ok(()) => Some(schema),
        Err(e) => {
            metrics::counter!("tributary_warehouse_skipped_total").increment(1);
            tracing::warn!(source_id = %record.source_id, schema = %schema, error = %e, "source has an unusable schema name; record not loaded");
            None
        }
    }
}

/// Runs CPU-bound work on a blocking thread.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<T, LoadError> {
    // A panic here would be a bug triggered by some record: permanent, so the loader
    // isolates the record instead of retrying forever.
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| LoadError::Permanent(format!("planning task failed: {e}")))
}

/// A batch that only records `record` as refused and moves the position past it.
fn rejection_batch(
    schema: Option<String>,
    record: &Record,
    error: &str,
    now: DateTime<Utc>,
) -> LoadBatch {
    // From the log's columns only: the payload may be what cannot be processed.
    let table = match record.call_type.as_str() {
        "track" => record
            .event
            .as_deref()
            .map_or_else(|| "tracks".to_string(), crate::naming::event_table),
        "identify" => "identifies".into(),
        "page" => "pages".into(),
        "screen" => "screens".into(),
        "group" => "groups".into(),
        "alias" => "aliases".into(),
        _ => String::new(),
    };
    let schemas = schema
        .map(|schema| SchemaLoad {
            schema,
            known_to_exist: false,
            tables: Vec::new(),
            discards: vec![Discard {
                seq: record.seq,
                table,
                column: String::new(),
                value: record.payload.clone(),
                reason: format!("record refused by the warehouse: {error}"),
                row_id: record.message_id.clone(),
                received_at: DateTime::from_timestamp_millis(record.received_at_ms),
            }],
        })
        .into_iter()
        .collect();
    LoadBatch {
        schemas,
        last_seq: record.seq,
        loaded_at: now,
        fence: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Plans, types and encodes batches of bench-like events and prints the CPU time
    /// per 10,000 (`cargo test --release -p tributary-warehouse --lib -- --ignored
    /// --nocapture cpu_per_batch`): a quick measure of the loader's own work, without
    /// PostgreSQL.
    #[test]
    #[ignore]
    fn cpu_per_batch() {
        let records: Vec<Record> = (0..10_000u64)
            .map(|seq| {
                let payload = serde_json::json!({
                    "type": "track", "event": "Bench Event", "messageId": format!("t-1-{seq:08}"),
                    "userId": format!("user-{}", seq % 10_000),
                    "context": {"library": {"name": "tributary-bench", "version": "1.0.0"}},
                    "properties": {
                        "sent_us": 1_800_000_000_000_000u64 + seq, "seq": seq,
                        "price": 19.99 + (seq % 100) as f64, "currency": "USD",
                        "sku": format!("SKU-{}", seq % 5000), "in_stock": seq % 3 != 0,
                        "note": "a bench event with a few properties of each type",
                    },
                    "receivedAt": "2026-11-27T05:10:54.123Z",
                    "sentAt": "2026-11-27T05:10:54.100Z",
                    "originalTimestamp": "2026-11-27T05:10:54.000Z",
                    "timestamp": "2026-11-27T05:10:54.023Z",
                });
                Record {
                    partition: 0,
                    seq: seq + 1,
                    source_id: "src".into(),
                    message_id: format!("t-1-{seq:08}"),
                    call_type: tributary_eventlog::CallType::Track,
                    event: Some("Bench Event".into()),
                    user_id: Some(format!("user-{}", seq % 10_000)),
                    anonymous_id: None,
                    received_at_ms: 1_800_000_000_000,
                    payload: payload.to_string(),
                }
            })
            .collect();
        let catalog = |_: &str| Some("bench".to_string());
        // The process's CPU time (all threads), ms; 0 where there is no /proc (Linux
        // clock ticks of 10 ms assumed).
        fn cpu_ms() -> f64 {
            let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
            let after = stat.rsplit(')').next().unwrap_or("");
            let f: Vec<f64> = after
                .split_whitespace()
                .map(|x| x.parse().unwrap_or(0.0))
                .collect();
            match (f.get(11), f.get(12)) {
                (Some(user), Some(system)) => (user + system) * 10.0,
                _ => 0.0,
            }
        }
        let mut known: HashMap<String, SchemaState> = HashMap::new();
        let rounds = 20;
        let mut cpu = [0.0f64; 4];
        for _ in 0..rounds {
            let c0 = cpu_ms();
            let (planned, _) = plan_records(&catalog, &records, Utc::now());
            let c1 = cpu_ms();
            let batch = prepare(&known, planned, 10_000, Utc::now());
            let c2 = cpu_ms();
            let mut bytes = 0usize;
            for t in &batch.schemas[0].tables {
                bytes += crate::postgres::encode_for_test(t);
            }
            assert!(bytes > 0);
            let c3 = cpu_ms();
            for t in &batch.schemas[0].tables {
                known
                    .entry("bench".into())
                    .or_default()
                    .tables
                    .insert(t.table.clone(), t.after.clone());
            }
            drop(batch);
            let c4 = cpu_ms();
            for (i, d) in [c1 - c0, c2 - c1, c3 - c2, c4 - c3].into_iter().enumerate() {
                cpu[i] += d;
            }
        }
        let r = f64::from(rounds);
        println!(
            "CPU ms per 10,000 events: plan {:.0} type {:.0} encode {:.0} drop {:.0} total {:.0}",
            cpu[0] / r,
            cpu[1] / r,
            cpu[2] / r,
            cpu[3] / r,
            cpu.iter().sum::<f64>() / r
        );
    }

    #[test]
    fn backoff_doubles_with_jitter_and_caps() {
        assert_eq!(backoff(0, 0.0), Duration::from_millis(250));
        assert_eq!(backoff(0, 1.0), Duration::from_millis(250));
        assert_eq!(backoff(1, 1.0), Duration::from_millis(500));
        assert_eq!(backoff(2, 0.5), Duration::from_millis(625));
        for attempt in [7, 8, 20, 63, u32::MAX] {
            assert_eq!(backoff(attempt, 1.0), Duration::from_secs(30));
            assert_eq!(backoff(attempt, 0.0), Duration::from_millis(250));
        }
    }

    #[test]
    fn a_batch_of_many_event_names_is_cut_into_parts_of_bounded_tables() {
        let record = |seq: u64, source: &str, event: &str| Record {
            partition: 0,
            seq,
            source_id: source.into(),
            message_id: format!("m-{seq}"),
            call_type: tributary_eventlog::CallType::Track,
            event: Some(event.into()),
            user_id: None,
            anonymous_id: None,
            received_at_ms: 1_800_000_000_000,
            payload: String::new(),
        };
        // One event name, many records: one part.
        let same: Vec<Record> = (1..=5000).map(|i| record(i, "a", "Order")).collect();
        assert_eq!(Vec::from(split_by_tables(&same, 100)), vec![0..5000usize]);
        // 2,500 names: consecutive parts, each within 100 tables, covering everything.
        let many: Vec<Record> = (1..=2500)
            .map(|i| record(i, "a", &format!("E{i}")))
            .collect();
        let parts = split_by_tables(&many, 100);
        assert!(parts.len() >= 25, "{parts:?}");
        let mut next = 0;
        for p in &parts {
            assert_eq!(p.start, next);
            next = p.end;
            // tracks + tributary_discards + one table per name.
            assert!(p.len() + 2 <= 100, "{p:?}");
        }
        assert_eq!(next, many.len());
        assert!(split_by_tables(&[], 100).is_empty());
    }

    #[test]
    fn a_refused_record_becomes_a_discard_that_moves_the_position() {
        let record = Record {
            partition: 0,
            seq: 42,
            source_id: "src".into(),
            message_id: "m-42".into(),
            call_type: tributary_eventlog::CallType::Track,
            event: Some("Email Delivered".into()),
            user_id: None,
            anonymous_id: Some("a-42".into()),
            received_at_ms: 1_800_000_000_000,
            payload: r#"{"type":"track","event":"Email Delivered","messageId":"m-42"}"#.into(),
        };
        let now = Utc::now();
        let b = rejection_batch(Some("ac".into()), &record, "row is too big", now);
        assert_eq!(b.last_seq, 42);
        assert_eq!(b.row_count(), 0);
        let d = &b.schemas[0].discards[0];
        assert_eq!(d.table, "email_delivered");
        assert_eq!(d.row_id, "m-42");
        assert!(d.reason.contains("row is too big"));
        assert_eq!(d.value, record.payload);
        // No schema (source deleted): only the position moves.
        assert!(rejection_batch(None, &record, "x", now).schemas.is_empty());
    }
}
