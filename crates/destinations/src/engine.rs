//! The delivery engine: destination configurations, one worker per enabled
//! destination, and the admin operations (create, patch, delete, dead letters,
//! replay).
//!
//! Invariants: a destination has at most one running worker, and a stored
//! configuration is always valid (validated before it is written). Changing a
//! destination stops its worker gracefully (requests on the wire finish, the cursor
//! is committed) before the new one starts from the same cursor, so a change never
//! loses or skips events. Deleting a destination stops its worker, drops its
//! dead letters and markers and removes its cursor from the log's consumer registry.
//!
//! Retention: an enabled destination's cursor holds records back from the log's
//! retention (the log's consumer registry pins it). A disabled destination must not
//! hold the log forever, so disabling it unpins its cursor: records it has not read
//! may then age out, and when it is enabled again it resumes from its cursor and
//! reports what is gone as a gap (stats `gap`, an error line, a counter).

use std::collections::{HashMap, VecDeque};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use chrono::Utc;
use tokio::sync::Mutex;
use tributary_eventlog::EventLog;

use crate::api::{
    CreateDestination, DeadLetter, DestinationStats, DestinationView, GapView, PatchDestination,
    ReplayOutcome, ReplayRequest,
};
use crate::config::{DestinationConfig, Start};
use crate::definitions::Definitions;
use crate::error::DestinationError;
use crate::filter::Selector;
use crate::ledger::Ledger;
use crate::options::EngineOptions;
use crate::sink::Item;
use crate::store::{DestinationRow, Store, ms_to_time};
use crate::worker::{ReplayJob, WorkerHandle};

/// Most dead letters one listing returns.
pub const MAX_DEAD_LETTER_LIMIT: usize = 1000;
/// Longest accepted name.
const MAX_NAME_CHARS: usize = 200;

/// The delivery engine.
pub struct Engine {
    inner: Arc<Inner>,
}

struct Inner {
    store: Store,
    /// Where definitions live: `store` when embedded, the control database in a
    /// cluster.
    defs: Arc<dyn Definitions>,
    /// The definition version (`updated_at_ms`) each running worker was started
    /// from, so [`Engine::sync_definitions`] can tell what changed elsewhere.
    versions: std::sync::Mutex<HashMap<String, i64>>,
    log: Arc<dyn EventLog>,
    options: EngineOptions,
    workers: Mutex<HashMap<String, WorkerHandle>>,
    /// Serializes changes (create, patch, delete, shutdown) so a destination never
    /// has two workers, without holding `workers` while a worker drains.
    changes: Mutex<()>,
    closed: AtomicBool,
    /// Cluster mode: partition leases, and each partition owner's dedupe window.
    ownership: Option<(Arc<dyn tributary_eventlog::Ownership>, std::time::Duration)>,
    /// Cluster mode: delivery markers and statistics shared by every node.
    ledger: Option<Arc<dyn Ledger>>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        // Dropped without `shutdown`: stop every worker now (nothing is lost; the
        // cursors only cover what ended).
        for w in self.workers.get_mut().values() {
            w.abort();
        }
    }
}

/// Puts a destination's worker in the map. There is never a second one: a worker
/// replaced here would run on unseen, delivering every event a second time
/// (uncounted) — so one found is a bug, logged and stopped at once.
fn install(workers: &mut HashMap<String, WorkerHandle>, id: &str, worker: WorkerHandle) {
    if let Some(old) = workers.insert(id.to_string(), worker) {
        tracing::error!(destination = %id, "a second worker was started for a destination; stopping the first");
        old.abort();
        tokio::spawn(old.stop());
    }
}

/// The destination's name in the log's consumer registry.
fn consumer_name(id: &str) -> String {
    format!("destination:{id}")
}

fn new_id() -> String {
    let mut bytes = [0u8; 10];
    if getrandom::fill(&mut bytes).is_err() {
        let nanos = Utc::now().timestamp_nanos_opt().unwrap_or_default();
        bytes[..8].copy_from_slice(&nanos.to_le_bytes());
    }
    format!("dst_{}", hex::encode(bytes))
}

fn check_name(name: &str) -> Result<(), DestinationError> {
    if name.trim().is_empty() {
        return Err(DestinationError::Invalid("name is required".into()));
    }
    if name.chars().count() > MAX_NAME_CHARS {
        return Err(DestinationError::Invalid(format!(
            "name must be at most {MAX_NAME_CHARS} characters"
        )));
    }
    Ok(())
}

fn check_sources(ids: &[String]) -> Result<(), DestinationError> {
    if ids.iter().any(|s| s.trim().is_empty()) {
        return Err(DestinationError::Invalid(
            "source_ids must not contain empty ids".into(),
        ));
    }
    Ok(())
}

fn parse_config(row: &DestinationRow) -> Result<DestinationConfig, DestinationError> {
    serde_json::from_str(&row.config).map_err(|e| {
        DestinationError::Internal(format!("stored config of {} unreadable: {e}", row.id))
    })
}

fn selector(row: &DestinationRow, config: &DestinationConfig) -> Selector {
    Selector::new(
        &row.name,
        config.catalog_name(),
        &row.source_ids,
        &row.filters,
    )
}

impl Engine {
    /// Opens the engine's store at `db_path` (created if absent) and starts one
    /// worker per enabled destination, each resuming from its cursor.
    pub async fn open(
        db_path: PathBuf,
        log: Arc<dyn EventLog>,
        options: EngineOptions,
    ) -> Result<Engine, DestinationError> {
        Engine::open_owned_with(db_path, log, options, None, None, None).await
    }

    /// [`Engine::open`], with destination definitions kept in `definitions` (the
    /// cluster's control database) instead of the engine's file; statistics, dead
    /// letters and markers stay in the file at `db_path`.
    pub async fn open_with(
        db_path: PathBuf,
        log: Arc<dyn EventLog>,
        options: EngineOptions,
        definitions: Option<Arc<dyn Definitions>>,
    ) -> Result<Engine, DestinationError> {
        Engine::open_owned_with(db_path, log, options, definitions, None, None).await
    }

    /// [`Engine::open_with`] for a partitioned log: with `ownership` (leases and each
    /// partition owner's dedupe window), each destination runs one worker per log
    /// partition this node owns (module `worker`), sending and committing only
    /// under its lease, and skipping a `(source, messageId)` seen in the partition
    /// within the window. With a `ledger` (cluster mode: the control database), the
    /// delivery markers and statistics live there instead of the file, written
    /// fenced by each partition's lease (module [`crate::ledger`]), so a partition's
    /// next owner re-sends only what was in flight; dead letters stay in the file.
    pub async fn open_owned_with(
        db_path: PathBuf,
        log: Arc<dyn EventLog>,
        options: EngineOptions,
        definitions: Option<Arc<dyn Definitions>>,
        ownership: Option<(Arc<dyn tributary_eventlog::Ownership>, std::time::Duration)>,
        ledger: Option<Arc<dyn Ledger>>,
    ) -> Result<Engine, DestinationError> {
        crate::sink::install_crypto_provider();
        let store = Store::open(&db_path).await?;
        let defs: Arc<dyn Definitions> = match definitions {
            Some(d) => d,
            None => Arc::new(store.clone()),
        };
        let engine = Engine {
            inner: Arc::new(Inner {
                store,
                defs,
                versions: std::sync::Mutex::new(HashMap::new()),
                log,
                options,
                workers: Mutex::new(HashMap::new()),
                changes: Mutex::new(()),
                closed: AtomicBool::new(false),
                ownership,
                ledger,
            }),
        };
        let rows = engine.inner.defs.list().await?;
        engine.reconcile_consumers(&rows).await;
        let mut workers = engine.inner.workers.lock().await;
        for row in rows.iter().filter(|r| r.enabled) {
            match engine.spawn_worker(row) {
                Ok(w) => {
                    install(&mut workers, &row.id, w);
                }
                Err(e) => {
                    tracing::error!(destination = %row.id, error = %e.detail(), "cannot start destination");
                }
            }
        }
        drop(workers);
        Ok(engine)
    }

    /// Makes the log's consumer registry match the destinations: disabled ones do
    /// not pin, deleted ones (before the registry knew about deletes) are removed.
    async fn reconcile_consumers(&self, rows: &[DestinationRow]) {
        let Ok(consumers) = self.inner.log.consumers().await else {
            return;
        };
        for c in consumers {
            let Some(id) = c.name.strip_prefix("destination:") else {
                continue;
            };
            let result = match rows.iter().find(|r| r.id == id) {
                None => self.inner.log.remove_consumer(&c.name).await,
                Some(r) if !r.enabled && c.pinned => self.inner.log.unpin(&c.name).await,
                Some(_) => Ok(()),
            };
            if let Err(e) = result {
                tracing::warn!(consumer = %c.name, error = %e, "cannot update the log's consumer registry");
            }
        }
    }

    fn spawn_worker(&self, row: &DestinationRow) -> Result<WorkerHandle, DestinationError> {
        let config = parse_config(row)?;
        let sink = config.build()?;
        self.inner
            .versions
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(row.id.clone(), row.updated_at_ms);
        if let Some((ownership, window)) = &self.inner.ownership {
            return Ok(WorkerHandle::spawn_owned(
                row.id.clone(),
                sink,
                selector(row, &config),
                self.inner.options.clone(),
                self.inner.store.clone(),
                self.inner.log.clone(),
                ownership.clone(),
                *window,
                self.inner.ledger.clone(),
            ));
        }
        Ok(WorkerHandle::spawn(
            row.id.clone(),
            sink,
            selector(row, &config),
            self.inner.options.clone(),
            self.inner.store.clone(),
            self.inner.log.clone(),
        ))
    }

    fn check_open(&self) -> Result<(), DestinationError> {
        if self.inner.closed.load(Ordering::Acquire) {
            Err(DestinationError::Closed)
        } else {
            Ok(())
        }
    }

    async fn row(&self, id: &str) -> Result<DestinationRow, DestinationError> {
        self.inner
            .defs
            .get(id)
            .await?
            .ok_or(DestinationError::NotFound)
    }

    async fn view(&self, row: DestinationRow) -> Result<DestinationView, DestinationError> {
        let config = parse_config(&row)?;
        let mut stored = self.inner.store.stats(&row.id).await?;
        if let Some(ledger) = &self.inner.ledger {
            // Cluster mode: the counts and dead letters of every node.
            let t = ledger.tally(&row.id).await?;
            stored.dead_letters = t.dead_letters;
            stored.delivered = t.delivered;
            stored.redelivered = t.redelivered;
            stored.skipped = t.skipped;
            stored.last_success_ms = t.last_success_ms;
            if t.last_error_ms >= stored.last_error_ms {
                stored.last_error = t.last_error;
                stored.last_error_ms = t.last_error_ms;
            }
        }
        let mut stats = DestinationStats {
            delivered: stored.delivered,
            redelivered: stored.redelivered,
            skipped: stored.skipped,
            dead_letters: stored.dead_letters,
            last_success_at: stored.last_success_ms.map(ms_to_time),
            last_error: stored.last_error,
            last_error_at: stored.last_error_ms.map(ms_to_time),
            ..DestinationStats::default()
        };
        let head = *self.inner.log.subscribe().borrow();
        let consumer = consumer_name(&row.id);
        let mut found_gap = None;
        let workers = self.inner.workers.lock().await;
        let cursor = match workers.get(&row.id) {
            Some(w) => {
                let live = w.live();
                stats.retrying = live.retrying.load(Ordering::Relaxed);
                stats.in_flight = live.in_flight.load(Ordering::Relaxed);
                let last = live
                    .last_error
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .clone();
                if let Some((msg, at)) = last
                    && stored.last_error_ms.is_none_or(|s| at > s)
                {
                    stats.last_error = Some(msg);
                    stats.last_error_at = Some(ms_to_time(at));
                }
                found_gap = *live.gap.lock().unwrap_or_else(|p| p.into_inner());
                live.cursor.load(Ordering::Relaxed)
            }
            None => {
                drop(workers);
                self.inner.log.cursor(&consumer, 0).await?.seq
            }
        };
        // The size cap's record of this consumer (persistent), and what the worker
        // found itself; the newer gap is shown.
        let registry = self
            .inner
            .log
            .consumers()
            .await
            .ok()
            .and_then(|c| tributary_eventlog::ConsumerState::merged(c, &consumer));
        let logged = registry
            .as_ref()
            .and_then(|c| c.gap.map(|g| (g, c.gap_at_ms.unwrap_or(0))));
        let gap = match (logged, found_gap) {
            (Some(a), Some(b)) => Some(if a.1 > b.1 { a } else { b }),
            (a, b) => a.or(b),
        };
        stats.gap = gap.map(|(g, at)| GapView {
            from: g.from,
            to: g.to,
            records: g.len(),
            at: Some(ms_to_time(at)),
        });
        stats.unconsumed_dropped = registry.map_or(0, |c| c.dropped);
        stats.cursor = cursor;
        stats.backlog = head.saturating_sub(cursor);
        Ok(DestinationView {
            id: row.id,
            kind: config.kind().to_string(),
            name: row.name,
            source_ids: row.source_ids,
            settings: config.redacted_settings(),
            filters: row.filters,
            enabled: row.enabled,
            created_at: ms_to_time(row.created_at_ms),
            updated_at: ms_to_time(row.updated_at_ms),
            stats,
        })
    }

    /// Creates a destination (settings validated per type → `Invalid`) and, when
    /// enabled, starts delivering to it from where `req.start` says: by default the
    /// current head of the log, so it receives events appended after its creation;
    /// `beginning` or a time sends the retained history first.
    pub async fn create(
        &self,
        req: CreateDestination,
    ) -> Result<DestinationView, DestinationError> {
        // Held until the worker is in the map: a definitions sync running meanwhile
        // (this very insert notifies it) would otherwise start a second worker.
        let _changes = self.inner.changes.lock().await;
        self.check_open()?;
        check_name(&req.name)?;
        check_sources(&req.source_ids)?;
        req.filters.validate().map_err(DestinationError::Invalid)?;
        let config = DestinationConfig::from_parts(&req.kind, req.settings)?;
        let now = Utc::now().timestamp_millis();
        let row = DestinationRow {
            id: new_id(),
            name: req.name.trim().to_string(),
            config: serde_json::to_string(&config)
                .map_err(|e| DestinationError::Internal(e.to_string()))?,
            source_ids: req.source_ids,
            filters: req.filters,
            enabled: req.enabled,
            created_at_ms: now,
            updated_at_ms: now,
        };
        // Where `start` says (default: the head; history is then the business of
        // replay) — in every partition: a partition without a committed position
        // would start at its beginning and deliver its whole history.
        for partition in 0..self.inner.log.partitions() {
            let initial = self.initial_cursor(req.start, partition).await?;
            let start = self.inner.log.start(partition).at(initial);
            self.inner
                .log
                .commit(&consumer_name(&row.id), &start)
                .await?;
        }
        if !row.enabled {
            self.inner.log.unpin(&consumer_name(&row.id)).await?;
        }
        // Build first so a sink that cannot be built is never stored.
        config.build()?;
        self.inner.defs.insert(row.clone()).await?;
        if row.enabled {
            let worker = self.spawn_worker(&row)?;
            install(&mut *self.inner.workers.lock().await, &row.id, worker);
        }
        tracing::info!(destination = %row.id, kind = config.kind(), "destination created");
        self.view(row).await
    }

    /// The sequence number a new destination starts after (it delivers every event
    /// after it): the head for [`Start::Now`], just before the oldest retained event
    /// for [`Start::Beginning`] (so pruned history is not reported as a gap), and for
    /// a time just before the first event received at or after it (the head when
    /// none is). Sequence numbers of a partitioned log are the stream's (increasing
    /// over all partitions), so the head and a time's first record hold for every
    /// partition; the oldest retained record is per partition.
    async fn initial_cursor(&self, start: Start, partition: u32) -> Result<u64, DestinationError> {
        let head = *self.inner.log.subscribe().borrow();
        Ok(match start {
            Start::Now => head,
            Start::Beginning => self
                .inner
                .log
                .first_retained(partition)
                .await?
                .saturating_sub(1),
            Start::At(t) => {
                let first = self
                    .inner
                    .log
                    .read_range(t.timestamp_millis(), i64::MAX, 0, 1)
                    .await?;
                first.first().map_or(head, |r| r.seq.saturating_sub(1))
            }
        })
    }

    /// Every destination, oldest first, with statistics.
    pub async fn list(&self) -> Result<Vec<DestinationView>, DestinationError> {
        let rows = self.inner.defs.list().await?;
        let mut out = Vec::with_capacity(rows.len());
        for row in rows {
            out.push(self.view(row).await?);
        }
        Ok(out)
    }

    /// One destination with statistics.
    pub async fn get(&self, id: &str) -> Result<DestinationView, DestinationError> {
        let row = self.row(id).await?;
        self.view(row).await
    }

    /// Changes a destination; its worker restarts from its cursor when delivery
    /// is affected.
    pub async fn patch(
        &self,
        id: &str,
        patch: PatchDestination,
    ) -> Result<DestinationView, DestinationError> {
        let _changes = self.inner.changes.lock().await;
        self.check_open()?;
        let mut row = self.row(id).await?;
        let mut config = parse_config(&row)?;
        if let Some(name) = patch.name {
            check_name(&name)?;
            row.name = name.trim().to_string();
        }
        if let Some(sources) = patch.source_ids {
            check_sources(&sources)?;
            row.source_ids = sources;
        }
        if let Some(filters) = patch.filters {
            filters.validate().map_err(DestinationError::Invalid)?;
            row.filters = filters;
        }
        if let Some(settings) = &patch.settings {
            config = config.patched(settings)?;
            config.build()?;
            row.config = serde_json::to_string(&config)
                .map_err(|e| DestinationError::Internal(e.to_string()))?;
        }
        if let Some(enabled) = patch.enabled {
            row.enabled = enabled;
        }
        row.updated_at_ms = Utc::now().timestamp_millis();
        let old = self.inner.workers.lock().await.remove(id);
        if let Some(old) = old {
            old.stop().await;
        }
        if !self.inner.defs.update(row.clone()).await? {
            return Err(DestinationError::NotFound);
        }
        if !row.enabled {
            // A disabled destination does not hold the log back (see module docs).
            self.inner.log.unpin(&consumer_name(&row.id)).await?;
        }
        if row.enabled {
            let worker = self.spawn_worker(&row)?;
            install(&mut *self.inner.workers.lock().await, &row.id, worker);
        }
        self.view(row).await
    }

    /// Deletes a destination, its dead letters and statistics.
    pub async fn delete(&self, id: &str) -> Result<(), DestinationError> {
        let _changes = self.inner.changes.lock().await;
        self.check_open()?;
        self.row(id).await?;
        let old = self.inner.workers.lock().await.remove(id);
        if let Some(old) = old {
            old.stop().await;
        }
        if !self.inner.defs.delete(id).await? {
            return Err(DestinationError::NotFound);
        }
        self.inner.store.forget(id).await?;
        if let Some(ledger) = &self.inner.ledger {
            ledger.forget(id).await?;
        }
        self.forget_version(id);
        if let Err(e) = self.inner.log.remove_consumer(&consumer_name(id)).await {
            tracing::warn!(destination = %id, error = %e, "cannot remove the destination's cursor from the log");
        }
        tracing::info!(destination = %id, "destination deleted");
        Ok(())
    }

    /// The destination's dead letters, oldest event first (at most `limit`, capped
    /// at [`MAX_DEAD_LETTER_LIMIT`]).
    pub async fn dead_letters(
        &self,
        id: &str,
        limit: usize,
    ) -> Result<Vec<DeadLetter>, DestinationError> {
        self.row(id).await?;
        let limit = limit.clamp(1, MAX_DEAD_LETTER_LIMIT);
        match &self.inner.ledger {
            None => self.inner.store.dead_letters(id, limit).await,
            Some(ledger) => ledger.dead_letters(id, limit).await,
        }
    }

    /// Queues a replay: every dead letter (`{"dead_letters": true}`) or every event
    /// of a time range (`{"from": …, "to": …}`) that the destination takes. Events
    /// are sent in the background; the destination must be enabled.
    pub async fn replay(
        &self,
        id: &str,
        req: ReplayRequest,
    ) -> Result<ReplayOutcome, DestinationError> {
        self.check_open()?;
        let row = self.row(id).await?;
        if req.dead_letters == req.from.is_some() {
            return Err(DestinationError::Invalid(
                "replay takes either {\"dead_letters\": true} or {\"from\": …, \"to\": …}".into(),
            ));
        }
        if req.dead_letters && req.to.is_some() {
            return Err(DestinationError::Invalid(
                "\"to\" only applies to a range replay".into(),
            ));
        }
        if !row.enabled {
            return Err(DestinationError::Invalid(
                "destination is disabled; enable it to replay".into(),
            ));
        }
        let (job, queued) = if req.dead_letters {
            let ids = match &self.inner.ledger {
                None => self.inner.store.start_replay(id).await?,
                Some(ledger) => ledger.start_replay(id).await?,
            };
            let n = ids.len() as u64;
            (ReplayJob::DeadLetters(VecDeque::from(ids)), n)
        } else {
            let from = req.from.unwrap_or_default().timestamp_millis();
            let to = req.to.unwrap_or_else(Utc::now).timestamp_millis();
            if to <= from {
                return Err(DestinationError::Invalid(
                    "replay range is empty: \"to\" must be after \"from\"".into(),
                ));
            }
            let seqs = self.range_seqs(&row, from, to).await?;
            let n = seqs.len() as u64;
            (ReplayJob::Seqs(seqs), n)
        };
        if queued > 0 {
            let workers = self.inner.workers.lock().await;
            let sent = workers.get(id).is_some_and(|w| w.replay(job));
            if !sent {
                return Err(DestinationError::Closed);
            }
        }
        tracing::info!(destination = %id, queued, "replay queued");
        Ok(ReplayOutcome { queued })
    }

    /// Sequence numbers of the events in `[from, to)` the destination takes.
    async fn range_seqs(
        &self,
        row: &DestinationRow,
        from: i64,
        to: i64,
    ) -> Result<VecDeque<u64>, DestinationError> {
        let config = parse_config(row)?;
        let selector = selector(row, &config);
        let mut seqs = VecDeque::new();
        let mut after = 0u64;
        loop {
            let page = self.inner.log.read_range(from, to, after, 1000).await?;
            let Some(last) = page.last() else { break };
            after = last.seq;
            for r in page {
                let seq = r.seq;
                if !selector.accepts_record(&r.source_id, r.call_type.as_str(), r.event.as_deref())
                {
                    continue;
                }
                if let Some(item) = Item::from_record(r, false)
                    && selector.accepts_integrations(item.integrations.as_deref())
                {
                    seqs.push_back(seq);
                }
            }
        }
        Ok(seqs)
    }

    fn forget_version(&self, id: &str) {
        self.inner
            .versions
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(id);
    }

    /// Makes this node's workers match the stored definitions after another node
    /// changed them (cluster mode): a new enabled destination gets a worker, a
    /// changed one restarts from its cursor, a disabled or deleted one stops (its
    /// cursor is unpinned or removed as if the change had been made here). Returns
    /// how many workers it started, restarted or stopped.
    pub async fn sync_definitions(&self) -> Result<usize, DestinationError> {
        let _changes = self.inner.changes.lock().await;
        self.check_open()?;
        let rows = self.inner.defs.list().await?;
        let versions = self
            .inner
            .versions
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let running: Vec<String> = self.inner.workers.lock().await.keys().cloned().collect();
        let mut changed = 0;
        for id in &running {
            let keep = rows
                .iter()
                .find(|r| &r.id == id)
                .is_some_and(|r| r.enabled && versions.get(id) == Some(&r.updated_at_ms));
            if keep {
                continue;
            }
            let old = self.inner.workers.lock().await.remove(id);
            if let Some(old) = old {
                old.stop().await;
                changed += 1;
            }
            self.forget_version(id);
            if !rows.iter().any(|r| &r.id == id)
                && let Err(e) = self.inner.store.forget(id).await
            {
                tracing::warn!(destination = %id, error = %e.detail(), "cannot drop a deleted destination's statistics");
            }
        }
        self.reconcile_consumers(&rows).await;
        for row in rows.iter().filter(|r| r.enabled) {
            if self.inner.workers.lock().await.contains_key(&row.id) {
                continue;
            }
            match self.spawn_worker(row) {
                Ok(w) => {
                    install(&mut *self.inner.workers.lock().await, &row.id, w);
                    changed += 1;
                    tracing::info!(destination = %row.id, "destination changed elsewhere: worker (re)started");
                }
                Err(e) => {
                    tracing::error!(destination = %row.id, error = %e.detail(), "cannot start destination");
                }
            }
        }
        Ok(changed)
    }

    /// Stops every worker gracefully (requests on the wire finish, cursors are
    /// committed). Later calls that change state answer `Closed`.
    pub async fn shutdown(&self) {
        let _changes = self.inner.changes.lock().await;
        self.inner.closed.store(true, Ordering::Release);
        let workers: Vec<WorkerHandle> = {
            let mut map = self.inner.workers.lock().await;
            map.drain().map(|(_, w)| w).collect()
        };
        let stops: Vec<_> = workers
            .into_iter()
            .map(|w| tokio::spawn(w.stop()))
            .collect();
        for s in stops {
            let _ = s.await;
        }
    }
}
