//! One destination's delivery loop: its log cursor, per-user queues, bounded
//! in-flight batches, retries and dead letters.
//!
//! **At-least-once, and why.** The worker reads the log after its committed cursor
//! (consumer `destination:<id>`) and commits only the *low watermark*: the highest
//! sequence number below which every event it accepted has ended (delivered,
//! skipped or dead-lettered). An event is never passed by the cursor before its
//! outcome is durable, so a crash can only re-send, never lose. Events that ended
//! above the watermark are recorded per batch in the engine's store (see
//! [`crate::store`]; in cluster mode the shared [`crate::ledger`]), so after a crash
//! or a takeover only the batches that were actually in flight are sent again — and
//! those are counted as `redelivered` (as is a retry after an attempt that may have
//! arrived).
//!
//! **Ordering.** Events are queued per user (userId, else anonymousId). A user with
//! a batch in flight (or in retry backoff) is *busy*: its later events wait, so one
//! user's events reach the receiver in log order, even across retries. Other users
//! keep flowing in other batches, so a hot or failing user never blocks them; a
//! user's queue holds at most [`PER_USER_QUEUE`] events in memory and the rest as
//! bare sequence numbers, re-read when their turn comes, so one user cannot fill the
//! in-memory window either.
//!
//! **Bounds.** At most [`MAX_PENDING`] events are held in memory, at most
//! `Sink::max_in_flight` requests are outstanding, and each request carries at most
//! `Sink::max_batch` events. A slow destination therefore only falls behind in the
//! log (its backlog grows); it never slows ingest or another destination, which
//! each have their own worker.
//!
//! **Retries.** A batch failing with a retriable error is retried with exponential
//! backoff and full jitter (honouring `Retry-After`) until the retry window has
//! passed since its first attempt; then its events become dead letters. A permanent
//! failure of a multi-event batch is bisected to find the poison events, which
//! become dead letters while the rest are delivered.
//!
//! **Positions and gaps.** The cursor is a [`Position`] of the log (its id and
//! partition with the seq), committed to the log's consumer registry, which also
//! makes it bound retention while the destination is enabled (the engine unpins a
//! disabled one; the worker pins it again when it starts). Records found missing
//! after the cursor (retention or the size cap deleted them first) are a gap:
//! an error line, `tributary_log_gap_records_total{consumer}` and the
//! destination's stats — never skipped silently.
//!
//! **Cluster mode (partitions and leases).** With an [`Ownership`] (PostgreSQL
//! leases), a destination runs one worker per log partition this node owns
//! ([`WorkerHandle::spawn_owned`]): each reads only its partition, in order, so one
//! user's events (always in one partition) still reach the receiver in order. Before
//! each send the batch task checks [`Ownership::holds`]; the cursor is committed with
//! the lease epoch ([`EventLog::commit_fenced`], the control database's registry),
//! and a refused commit or a lost lease stops that partition's worker: its batches
//! not yet ended are re-sent by the next owner (at least once). Dedupe beyond
//! JetStream's window: each partition worker keeps a [`PartitionDedupe`] index in
//! memory (messages received within `dedupe_window`, default the 7-day log
//! retention) and skips a repeated `(source, messageId)`; the index is rebuilt from
//! the log itself when a worker takes a partition (its retained records up to the
//! committed cursor), so it moves with ownership and needs no storage of its own.
//! Replays (dead letters, `POST /replay`) are run by one of this node's partition
//! workers.
//!
//! **Cluster mode: duplicates bounded by what was in flight.** The delivery markers
//! and statistics live in the control database ([`crate::ledger::Ledger`]), keyed by
//! partition and lease epoch and written fenced by the lease: a batch's marker is
//! written before it is sent (refused: the batch is not sent and the worker stops),
//! and its end marks it done with its counts (refused: the next owner sends it
//! again). A partition's next owner reads its predecessors' markers above the
//! committed cursor, skips what ended and re-sends what was in flight, counted as
//! `redelivered` — so a change of owner doubles at most `max_in_flight × max_batch`
//! events of the partition. Before every attempt the batch task checks the lease
//! again when the previous check took longer than a second, so a node that was
//! stopped (SIGSTOP) past its lease learns it before it sends. Dead letters are in
//! the ledger too, written with their batch's end; a replay claims them for this
//! node and gives back what it did not get to.
mod delivery;
mod schedule;

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::Utc;
use tokio::sync::{mpsc, watch};
use tokio::task::{JoinHandle, JoinSet};
use tributary_eventlog::{
    EventLog, Gap, Lease, Ownership, PartitionDedupe, Position, Record, read_checked,
};

use crate::filter::Selector;
use crate::ledger::{BatchKey, Ledger};
use crate::options::EngineOptions;
use crate::retry::DeliveryError;
use crate::sink::{Item, Sink};
use crate::store::{Recovery, Store};
use delivery::run_batch;
use schedule::{Scheduler, Slot};

/// Most events held in memory per destination (queued plus in flight).
pub(crate) const MAX_PENDING: usize = 10_000;
/// Most events of one user held in memory; later ones wait as sequence numbers.
pub(crate) const PER_USER_QUEUE: usize = 1_000;
/// Most events waiting as bare sequence numbers before reading pauses.
pub(crate) const MAX_DEFERRED: usize = 1_000_000;
/// Records per log read.
const READ_PAGE: usize = 1_000;
/// Records per re-read of deferred or replayed events.
const LOAD_CHUNK: usize = 500;
/// How often the cursor is committed.
const COMMIT_EVERY: Duration = Duration::from_millis(200);
/// How long a stopping worker lets requests already on the wire finish.
const GRACE: Duration = Duration::from_secs(5);

/// Stop phases, sent on the worker's watch channel.
pub(crate) const RUNNING: u8 = 0;
/// No new batches and no more retries; requests on the wire may finish.
pub(crate) const DRAINING: u8 = 1;
/// Abandon everything now.
pub(crate) const ABORT: u8 = 2;

/// In-memory statistics of a running worker.
#[derive(Debug, Default)]
pub(crate) struct LiveStats {
    /// Events in batches waiting for a retry.
    pub retrying: AtomicU64,
    /// Events in dispatched batches.
    pub in_flight: AtomicU64,
    /// The committed cursor.
    pub cursor: AtomicU64,
    /// The newest gap found after the cursor, and when (ms).
    pub gap: Mutex<Option<(Gap, i64)>>,
    /// The last failure seen (message, ms), before it is persisted.
    pub last_error: Mutex<Option<(String, i64)>>,
}

/// Something to re-send, queued by the engine.
#[derive(Debug)]
pub(crate) enum ReplayJob {
    /// Dead letters by id.
    DeadLetters(VecDeque<i64>),
    /// Log records by sequence number.
    Seqs(VecDeque<u64>),
}

/// Everything a worker and its batch tasks share.
pub(crate) struct Shared {
    pub id: String,
    pub consumer: String,
    pub sink: Arc<dyn Sink>,
    pub selector: Selector,
    pub options: EngineOptions,
    pub store: Store,
    pub log: Arc<dyn EventLog>,
    pub live: Arc<LiveStats>,
    pub stop: watch::Sender<u8>,
    /// The lease this worker sends and commits under (cluster mode).
    pub lease: Option<(Arc<dyn Ownership>, Lease)>,
    /// Cluster mode: markers and statistics in the control database, shared by
    /// every node (None: both in `store`, the embedded mode).
    pub ledger: Option<Arc<dyn Ledger>>,
    /// Set by a batch task whose fenced write was refused: the worker stops.
    pub fenced: AtomicBool,
}

impl Shared {
    /// Whether this worker may still send and commit: true without a lease; with
    /// one, whether it is still held (a failed check counts as lost).
    pub(crate) async fn holds(&self) -> bool {
        match &self.lease {
            None => true,
            Some((ownership, lease)) => ownership
                .holds(&self.consumer, *lease)
                .await
                .unwrap_or(false),
        }
    }
}

impl Shared {
    /// The key of a new batch of this worker (partition and epoch of its lease).
    pub(crate) fn batch_key(&self) -> BatchKey {
        let (partition, epoch) = self
            .lease
            .as_ref()
            .map_or((0, 0), |(_, l)| (l.partition, l.epoch));
        let id = match self.ledger {
            None => self.store.next_batch_id(),
            // A node restarted under the same id may renew its old leases at the
            // same epoch: batch ids must not repeat across processes.
            Some(_) => cluster_batch_id(),
        };
        BatchKey {
            dest: self.id.clone(),
            partition,
            epoch,
            id,
        }
    }

    /// Notes that a fenced write was refused: a newer lease holder owns the
    /// partition, so this worker stops (its batches not ended are the next owner's).
    pub(crate) fn fence(&self, what: &str) {
        if !self.fenced.swap(true, Ordering::Relaxed) {
            let partition = self.lease.as_ref().map(|(_, l)| l.partition);
            tracing::warn!(destination = %self.id, partition, "{what} refused: a newer lease holder owns the partition; stopping its worker");
        }
        metrics::counter!("tributary_lease_fenced_commits_total").increment(1);
    }

    fn note_error(&self, e: &DeliveryError) -> (String, i64) {
        let entry = (e.message.clone(), Utc::now().timestamp_millis());
        *self
            .live
            .last_error
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = Some(entry.clone());
        entry
    }
}

/// A batch id unique across this node's processes: counted up from the process's
/// start time in microseconds.
fn cluster_batch_id() -> u64 {
    static NEXT: std::sync::OnceLock<AtomicU64> = std::sync::OnceLock::new();
    NEXT.get_or_init(|| {
        let micros = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(1, |d| d.as_micros() as u64);
        // Stored as a PostgreSQL bigint.
        AtomicU64::new(micros & (i64::MAX as u64))
    })
    .fetch_add(1, Ordering::Relaxed)
}

/// A running worker.
pub(crate) struct WorkerHandle {
    commands: mpsc::UnboundedSender<ReplayJob>,
    shared: Arc<Shared>,
    join: JoinHandle<()>,
}

impl WorkerHandle {
    /// Starts a worker for one destination.
    pub(crate) fn spawn(
        id: String,
        sink: Arc<dyn Sink>,
        selector: Selector,
        options: EngineOptions,
        store: Store,
        log: Arc<dyn EventLog>,
    ) -> WorkerHandle {
        let (stop, stop_rx) = watch::channel(RUNNING);
        let (commands, cmd_rx) = mpsc::unbounded_channel();
        let head_rx = log.subscribe();
        let log_start = log.start(0);
        let shared = Arc::new(Shared {
            consumer: format!("destination:{id}"),
            id,
            sink,
            selector,
            options,
            store,
            log,
            live: Arc::new(LiveStats::default()),
            stop,
            lease: None,
            ledger: None,
            fenced: AtomicBool::new(false),
        });
        let worker = Worker::new(shared.clone(), log_start, head_rx, None);
        let join = tokio::spawn(worker.run(cmd_rx, stop_rx));
        WorkerHandle {
            commands,
            shared,
            join,
        }
    }

    /// Starts a destination in cluster mode: one worker per partition this node
    /// owns through `ownership` (consumer `destination:<id>`), each under its lease;
    /// workers start and stop as leases come and go. `dedupe_window` bounds each
    /// partition's dedupe index. With a `ledger` (the control database), delivery
    /// markers and statistics are kept there, fenced by each partition's lease.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn spawn_owned(
        id: String,
        sink: Arc<dyn Sink>,
        selector: Selector,
        options: EngineOptions,
        store: Store,
        log: Arc<dyn EventLog>,
        ownership: Arc<dyn Ownership>,
        dedupe_window: Duration,
        ledger: Option<Arc<dyn Ledger>>,
    ) -> WorkerHandle {
        let (stop, stop_rx) = watch::channel(RUNNING);
        let (commands, cmd_rx) = mpsc::unbounded_channel();
        let shared = Arc::new(Shared {
            consumer: format!("destination:{id}"),
            id,
            sink,
            selector,
            options,
            store,
            log,
            live: Arc::new(LiveStats::default()),
            stop,
            lease: None,
            ledger,
            fenced: AtomicBool::new(false),
        });
        let join = tokio::spawn(supervise(
            shared.clone(),
            ownership,
            dedupe_window,
            cmd_rx,
            stop_rx,
        ));
        WorkerHandle {
            commands,
            shared,
            join,
        }
    }

    /// Its live statistics.
    pub(crate) fn live(&self) -> &LiveStats {
        &self.shared.live
    }

    /// Queues a replay; false when the worker has stopped.
    pub(crate) fn replay(&self, job: ReplayJob) -> bool {
        self.commands.send(job).is_ok()
    }

    /// Stops gracefully: no new work, requests on the wire finish (up to a grace
    /// period), the cursor is committed.
    pub(crate) async fn stop(self) {
        self.shared.stop.send_if_modified(|p| {
            let changed = *p < DRAINING;
            *p = (*p).max(DRAINING);
            changed
        });
        let _ = self.join.await;
    }

    /// Tells the worker to abandon everything now (no waiting).
    pub(crate) fn abort(&self) {
        let _ = self.shared.stop.send_replace(ABORT);
    }
}

/// One partition's worker as the supervisor sees it.
struct PartitionWorker {
    lease: Lease,
    shared: Arc<Shared>,
    commands: mpsc::UnboundedSender<ReplayJob>,
    join: JoinHandle<()>,
}

/// Runs a worker per owned partition of `dest` until the destination stops: leases
/// won start one (under the lease, with a dedupe index rebuilt from the log), leases
/// lost stop it; replays go to one of them; the destination's stop phases are passed
/// on to every one.
async fn supervise(
    dest: Arc<Shared>,
    ownership: Arc<dyn Ownership>,
    dedupe_window: Duration,
    mut commands: mpsc::UnboundedReceiver<ReplayJob>,
    mut stop: watch::Receiver<u8>,
) {
    // No replay of this destination runs on this node yet: its claims from before
    // (a restart, a stop) are given back.
    if let Some(ledger) = &dest.ledger
        && let Err(e) = ledger.end_replay(&dest.id, None).await
    {
        tracing::warn!(destination = %dest.id, error = %e.detail(), "cannot give back earlier replay claims");
    }
    let mut owned = ownership.owned(&dest.consumer, dest.log.partitions());
    let mut running: std::collections::BTreeMap<u32, PartitionWorker> = Default::default();
    // Workers told to stop whose requests on the wire are still finishing: their
    // partition gets no new worker until they are done, or two workers of this node
    // would send the same events (a lease won back at the same epoch passes both
    // their lease checks).
    let mut draining: std::collections::BTreeMap<u32, (Arc<Shared>, JoinHandle<()>)> =
        Default::default();
    let mut changes_end = false;
    loop {
        draining.retain(|_, (_, j)| !j.is_finished());
        let leases = owned.borrow_and_update().clone();
        let gone: Vec<u32> = running
            .iter()
            .filter(|(_, w)| !leases.contains(&w.lease) || w.join.is_finished())
            .map(|(p, _)| *p)
            .collect();
        for p in gone {
            if let Some(w) = running.remove(&p) {
                tracing::info!(destination = %dest.id, partition = p, "destination lease lost; stopping the partition's worker");
                let _ = w.shared.stop.send_replace(DRAINING);
                draining.insert(p, (w.shared, w.join));
            }
        }
        if *stop.borrow() == RUNNING {
            for lease in &leases {
                if running.contains_key(&lease.partition) || draining.contains_key(&lease.partition)
                {
                    continue;
                }
                tracing::info!(destination = %dest.id, partition = lease.partition, epoch = lease.epoch, "destination lease won; delivering the partition");
                let (pstop, pstop_rx) = watch::channel(RUNNING);
                let (ptx, prx) = mpsc::unbounded_channel();
                let shared = Arc::new(Shared {
                    id: dest.id.clone(),
                    consumer: dest.consumer.clone(),
                    sink: dest.sink.clone(),
                    selector: dest.selector.clone(),
                    options: dest.options.clone(),
                    store: dest.store.clone(),
                    log: dest.log.clone(),
                    live: dest.live.clone(),
                    stop: pstop,
                    lease: Some((ownership.clone(), *lease)),
                    ledger: dest.ledger.clone(),
                    fenced: AtomicBool::new(false),
                });
                let start = dest.log.start(lease.partition);
                let head_rx = dest.log.subscribe();
                let worker = Worker::new(
                    shared.clone(),
                    start,
                    head_rx,
                    Some(PartitionDedupe::new(dedupe_window)),
                );
                running.insert(
                    lease.partition,
                    PartitionWorker {
                        lease: *lease,
                        shared,
                        commands: ptx,
                        join: tokio::spawn(worker.run(prx, pstop_rx)),
                    },
                );
            }
        }
        let phase = *stop.borrow();
        if phase != RUNNING {
            for w in running.values() {
                let _ = w.shared.stop.send_replace(phase);
            }
            for (shared, _) in draining.values() {
                let _ = shared.stop.send_replace(phase.max(DRAINING));
            }
            if phase >= ABORT
                || (running.values().all(|w| w.join.is_finished()) && draining.is_empty())
            {
                break;
            }
        }
        tokio::select! {
            r = owned.changed(), if !changes_end => {
                if r.is_err() {
                    changes_end = true;
                }
            }
            job = commands.recv() => {
                if let Some(job) = job {
                    let refused = match running.values().next() {
                        Some(w) => w.commands.send(job).err().map(|e| e.0),
                        None => Some(job),
                    };
                    if let Some(job) = refused {
                        tracing::warn!(destination = %dest.id, "replay dropped: this node delivers no partition of the destination now");
                        if let (Some(ledger), ReplayJob::DeadLetters(ids)) = (&dest.ledger, job) {
                            let ids = Vec::from(ids);
                            if let Err(e) = ledger.end_replay(&dest.id, Some(&ids)).await {
                                tracing::warn!(destination = %dest.id, error = %e.detail(), "cannot give back a dropped replay");
                            }
                        }
                    }
                }
            }
            _ = stop.changed() => {}
            _ = tokio::time::sleep(Duration::from_millis(500)) => {}
        }
    }
    for (_, w) in running {
        let _ = w.shared.stop.send_replace((*stop.borrow()).max(DRAINING));
        let _ = w.join.await;
    }
    for (_, (shared, j)) in draining {
        let _ = shared.stop.send_replace((*stop.borrow()).max(DRAINING));
        let _ = j.await;
    }
    if let Err(e) = ownership.release(&dest.consumer).await {
        tracing::warn!(destination = %dest.id, error = %e, "cannot release destination leases");
    }
}

struct Worker {
    shared: Arc<Shared>,
    sched: Scheduler,
    /// Accepted live events not yet ended (queued, deferred or in flight).
    outstanding: BTreeSet<u64>,
    /// Highest sequence number read from the log.
    read_pos: u64,
    /// The committed cursor.
    committed: Position,
    recovery: Recovery,
    jobs: VecDeque<ReplayJob>,
    tasks: JoinSet<bool>,
    inflight: HashMap<tokio::task::Id, Vec<Item>>,
    head_rx: watch::Receiver<u64>,
    log_closed: bool,
    /// Cluster mode: messages this partition's owner has seen (dedupe beyond
    /// JetStream's window), rebuilt from the log at start.
    dedupe: Option<PartitionDedupe>,
    /// Cluster mode: the lease was found lost or a commit was refused.
    lost: bool,
}

impl Worker {
    fn new(
        shared: Arc<Shared>,
        start: Position,
        head_rx: watch::Receiver<u64>,
        dedupe: Option<PartitionDedupe>,
    ) -> Worker {
        Worker {
            shared,
            sched: Scheduler::default(),
            outstanding: BTreeSet::new(),
            read_pos: 0,
            committed: start,
            recovery: Recovery::default(),
            jobs: VecDeque::new(),
            tasks: JoinSet::new(),
            inflight: HashMap::new(),
            head_rx,
            log_closed: false,
            dedupe,
            lost: false,
        }
    }

    async fn run(
        mut self,
        mut commands: mpsc::UnboundedReceiver<ReplayJob>,
        mut stop: watch::Receiver<u8>,
    ) {
        let id = self.shared.id.clone();
        if !self.start(&mut stop).await {
            return;
        }
        tracing::info!(destination = %id, cursor = %self.committed, "destination worker started");
        let mut tick = tokio::time::interval(COMMIT_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            if *stop.borrow() != RUNNING || self.lost || self.shared.fenced.load(Ordering::Relaxed)
            {
                break;
            }
            self.load_deferred().await;
            self.fill_live().await;
            self.fill_replay().await;
            self.dispatch();
            let can_read = self.can_read();
            tokio::select! {
                job = commands.recv() => match job {
                    Some(job) => self.jobs.push_back(job),
                    None => break,
                },
                Some(res) = self.tasks.join_next_with_id(), if !self.tasks.is_empty() => {
                    self.on_task(res);
                }
                r = self.head_rx.changed(), if can_read => {
                    if r.is_err() {
                        self.log_closed = true;
                    }
                }
                _ = tick.tick() => self.commit().await,
                _ = stop.changed() => {}
            }
        }
        // Draining: requests on the wire may finish; escalate after the grace period.
        if *stop.borrow() == RUNNING {
            let _ = self.shared.stop.send_replace(DRAINING);
        }
        let deadline = tokio::time::sleep(GRACE);
        tokio::pin!(deadline);
        while !self.tasks.is_empty() {
            tokio::select! {
                Some(res) = self.tasks.join_next_with_id() => self.on_task(res),
                _ = &mut deadline, if *stop.borrow() != ABORT => {
                    let _ = self.shared.stop.send_replace(ABORT);
                }
            }
        }
        self.commit().await;
        self.give_back_replays().await;
        tracing::info!(destination = %id, cursor = %self.committed, "destination worker stopped");
    }

    /// Reads the cursor and the recovery markers; false if stopped meanwhile.
    async fn start(&mut self, stop: &mut watch::Receiver<u8>) -> bool {
        loop {
            let res = self
                .shared
                .log
                .cursor(&self.shared.consumer, self.committed.partition)
                .await;
            match res {
                Ok(c) => {
                    // Enabled again: hold records back from retention from here on.
                    if let Some((_, lease)) = &self.shared.lease {
                        match self
                            .shared
                            .log
                            .commit_fenced(&self.shared.consumer, &c, lease.epoch)
                            .await
                        {
                            Ok(true) => {}
                            Ok(false) => {
                                tracing::info!(destination = %self.shared.id, partition = lease.partition, "partition owned by a newer lease; not delivering it");
                                return false;
                            }
                            Err(e) => {
                                tracing::warn!(destination = %self.shared.id, error = %e, "cannot pin destination cursor");
                            }
                        }
                        if let Some(d) = &self.dedupe {
                            let window = d.window();
                            match PartitionDedupe::rebuild(self.shared.log.as_ref(), &c, window)
                                .await
                            {
                                Ok(index) => {
                                    tracing::info!(destination = %self.shared.id, partition = lease.partition, messages = index.len(), "dedupe index rebuilt from the log");
                                    self.dedupe = Some(index);
                                }
                                Err(e) => {
                                    tracing::warn!(destination = %self.shared.id, error = %e, "cannot rebuild the dedupe index; retrying");
                                    tokio::select! {
                                        _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                                        _ = stop.changed() => return false,
                                    }
                                    continue;
                                }
                            }
                        }
                    } else if let Err(e) = self.shared.log.commit(&self.shared.consumer, &c).await {
                        tracing::warn!(destination = %self.shared.id, error = %e, "cannot pin destination cursor");
                    }
                    self.read_pos = c.seq;
                    self.shared.live.cursor.store(c.seq, Ordering::Relaxed);
                    self.committed = c;
                    break;
                }
                Err(e) => {
                    tracing::warn!(destination = %self.shared.id, error = %e, "cannot read destination cursor; retrying");
                    tokio::select! {
                        _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                        _ = stop.changed() => return false,
                    }
                }
            }
        }
        // Embedded: a starting worker has no queued replay, so no dead letter is
        // being replayed. Cluster mode: the supervisor gave back this node's claims
        // when it started (other partitions' workers may be replaying now).
        if self.shared.ledger.is_none()
            && let Err(e) = self.shared.store.reset_replaying(&self.shared.id).await
        {
            tracing::warn!(destination = %self.shared.id, error = %e.detail(), "cannot reset replay flags");
        }
        loop {
            let recovery = match &self.shared.ledger {
                None => {
                    self.shared
                        .store
                        .recovery(&self.shared.id, self.committed.seq)
                        .await
                }
                Some(ledger) => {
                    ledger
                        .recovery(
                            &self.shared.id,
                            self.committed.partition,
                            self.committed.seq,
                        )
                        .await
                }
            };
            match recovery {
                Ok(r) => {
                    if !r.maybe.is_empty() {
                        tracing::warn!(destination = %self.shared.id, partition = self.committed.partition,
                            events = r.maybe.len(), "events were in flight at the last stop or takeover; re-sending them");
                    }
                    self.recovery = r;
                    break;
                }
                Err(e) if self.shared.ledger.is_some() => {
                    // Without the markers every event above the cursor would be
                    // sent again uncounted: wait for the control database.
                    tracing::warn!(destination = %self.shared.id, error = %e.detail(),
                        "cannot read delivery markers; retrying");
                    tokio::select! {
                        _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                        _ = stop.changed() => return false,
                    }
                }
                Err(e) => {
                    tracing::error!(destination = %self.shared.id, error = %e.detail(),
                        "cannot read delivery markers; events above the cursor will be re-sent");
                    break;
                }
            }
        }
        true
    }

    /// Cluster mode: the dead letters of queued replays this worker did not get to
    /// become claimable again (another node, or this one, can replay them).
    async fn give_back_replays(&mut self) {
        let Some(ledger) = &self.shared.ledger else {
            return;
        };
        let ids: Vec<i64> = self
            .jobs
            .drain(..)
            .flat_map(|job| match job {
                ReplayJob::DeadLetters(ids) => Vec::from(ids),
                ReplayJob::Seqs(_) => Vec::new(),
            })
            .collect();
        if ids.is_empty() {
            return;
        }
        if let Err(e) = ledger.end_replay(&self.shared.id, Some(&ids)).await {
            tracing::warn!(destination = %self.shared.id, error = %e.detail(), dead_letters = ids.len(),
                "cannot give back unfinished replays (they are claimable again after an hour)");
        }
    }

    fn can_read(&self) -> bool {
        !self.log_closed && self.sched.loaded < MAX_PENDING && self.sched.deferred < MAX_DEFERRED
    }

    fn watermark(&self) -> u64 {
        match self.outstanding.first() {
            Some(s) => s - 1,
            None => self.read_pos,
        }
    }

    /// Takes one live record: skips what ended before a crash and what the
    /// filters refuse, queues the rest.
    fn accept_live(&mut self, r: Record) {
        let seq = r.seq;
        self.read_pos = self.read_pos.max(seq);
        // Observed even when it ended before (a later repeat of it is a repeat).
        let repeated = self.dedupe.as_mut().is_some_and(|d| !d.observe(&r));
        if self.recovery.done.remove(&seq) {
            return;
        }
        if repeated {
            metrics::counter!("tributary_destination_duplicates_skipped_total").increment(1);
            tracing::debug!(destination = %self.shared.id, seq, message_id = %r.message_id, "repeated message skipped");
            return;
        }
        let maybe_dup = self.recovery.maybe.remove(&seq);
        if !self.shared.selector.accepts_record(
            &r.source_id,
            r.call_type.as_str(),
            r.event.as_deref(),
        ) {
            return;
        }
        let Some(mut item) = Item::from_record(r, true) else {
            tracing::warn!(destination = %self.shared.id, seq, "log record is not JSON; skipped");
            return;
        };
        if !self
            .shared
            .selector
            .accepts_integrations(item.integrations.as_deref())
        {
            return;
        }
        item.maybe_dup = maybe_dup;
        self.outstanding.insert(seq);
        self.sched.push(item, PER_USER_QUEUE);
    }

    async fn fill_live(&mut self) {
        while self.can_read() {
            let head = *self.head_rx.borrow_and_update();
            if self.read_pos >= head {
                break;
            }
            let room = (MAX_PENDING - self.sched.loaded).clamp(1, READ_PAGE);
            let after = self.committed.at(self.read_pos);
            match read_checked(self.shared.log.as_ref(), &after, room).await {
                Ok(read) => {
                    if let Some(gap) = read.gap {
                        self.report_gap(gap);
                    }
                    if read.records.is_empty() {
                        if let Some(gap) = read.gap {
                            self.read_pos = self.read_pos.max(gap.to);
                        }
                        break;
                    }
                    for r in read.records {
                        self.accept_live(r);
                    }
                }
                Err(e) => {
                    tracing::warn!(destination = %self.shared.id, error = %e, "cannot read event log");
                    break;
                }
            }
        }
    }

    /// Re-reads deferred events of users whose turn has come.
    async fn load_deferred(&mut self) {
        let mut users = std::mem::take(&mut self.sched.needs_load).into_iter();
        while let Some(user) = users.next() {
            let wanted: Vec<(u64, bool)> = match self.sched.users.get(&user) {
                Some(q) if !q.busy => q
                    .slots
                    .iter()
                    .take(LOAD_CHUNK)
                    .map_while(|s| match s {
                        Slot::Deferred { seq, maybe_dup } => Some((*seq, *maybe_dup)),
                        Slot::Ready(_) => None,
                    })
                    .collect(),
                _ => continue,
            };
            if wanted.is_empty() {
                if let Some(q) = self.sched.users.get(&user)
                    && matches!(q.slots.front(), Some(Slot::Ready(_)))
                {
                    self.sched.ready.push_back(user);
                }
                continue;
            }
            let seqs: Vec<u64> = wanted.iter().map(|w| w.0).collect();
            let records = match self.shared.log.get(&seqs).await {
                Ok(r) => r,
                Err(e) => {
                    tracing::warn!(destination = %self.shared.id, error = %e, "cannot re-read deferred events");
                    self.sched.needs_load.push(user);
                    self.sched.needs_load.extend(users);
                    return;
                }
            };
            let mut by_seq: HashMap<u64, Record> =
                records.into_iter().map(|r| (r.seq, r)).collect();
            let Some(q) = self.sched.users.get_mut(&user) else {
                continue;
            };
            let mut loaded = Vec::with_capacity(wanted.len());
            for (seq, maybe_dup) in &wanted {
                q.slots.pop_front();
                self.sched.deferred -= 1;
                match by_seq.remove(seq).and_then(|r| Item::from_record(r, true)) {
                    Some(mut item) => {
                        item.maybe_dup = *maybe_dup;
                        loaded.push(item);
                    }
                    None => {
                        // Gone from the log (retention) or unreadable: nothing to send.
                        tracing::warn!(destination = %self.shared.id, seq, "deferred event no longer in the log");
                        self.outstanding.remove(seq);
                    }
                }
            }
            for item in loaded.into_iter().rev() {
                q.slots.push_front(Slot::Ready(item));
                q.loaded += 1;
                self.sched.loaded += 1;
            }
            match q.slots.front() {
                Some(Slot::Ready(_)) => self.sched.ready.push_back(user),
                Some(Slot::Deferred { .. }) => self.sched.needs_load.push(user),
                None => {
                    self.sched.users.remove(&user);
                }
            }
        }
    }

    /// Loads the next chunk of queued replays when there is room.
    async fn fill_replay(&mut self) {
        while self.sched.loaded < MAX_PENDING {
            let Some(job) = self.jobs.front_mut() else {
                return;
            };
            let items: Vec<Item> = match job {
                ReplayJob::DeadLetters(ids) => {
                    let n = ids.len().min(LOAD_CHUNK);
                    let chunk: Vec<i64> = ids.drain(..n).collect();
                    let rows = match &self.shared.ledger {
                        None => self.shared.store.dead_letter_records(chunk).await,
                        Some(ledger) => ledger.dead_letter_records(&chunk).await,
                    };
                    match rows {
                        Ok(rows) => rows
                            .into_iter()
                            .filter_map(|(id, r)| {
                                let mut item = Item::from_record(r, false)?;
                                item.dead_letter_id = Some(id);
                                Some(item)
                            })
                            .collect(),
                        Err(e) => {
                            tracing::error!(destination = %self.shared.id, error = %e.detail(), "cannot load dead letters for replay");
                            Vec::new()
                        }
                    }
                }
                ReplayJob::Seqs(seqs) => {
                    let n = seqs.len().min(LOAD_CHUNK);
                    let chunk: Vec<u64> = seqs.drain(..n).collect();
                    match self.shared.log.get(&chunk).await {
                        Ok(records) => records
                            .into_iter()
                            .filter_map(|r| Item::from_record(r, false))
                            .collect(),
                        Err(e) => {
                            tracing::error!(destination = %self.shared.id, error = %e, "cannot read events for replay");
                            Vec::new()
                        }
                    }
                }
            };
            let empty = match self.jobs.front() {
                Some(ReplayJob::DeadLetters(ids)) => ids.is_empty(),
                Some(ReplayJob::Seqs(seqs)) => seqs.is_empty(),
                None => true,
            };
            if empty {
                self.jobs.pop_front();
            }
            for item in items {
                self.sched.push(item, usize::MAX);
            }
        }
    }

    fn dispatch(&mut self) {
        let sink = self.shared.sink.clone();
        while self.tasks.len() < sink.max_in_flight().max(1) {
            let Some(items) = self
                .sched
                .next_batch(sink.max_batch().max(1), sink.max_batch_bytes())
            else {
                break;
            };
            self.shared
                .live
                .in_flight
                .fetch_add(items.len() as u64, Ordering::Relaxed);
            let shared = self.shared.clone();
            let batch = items.clone();
            let handle = self.tasks.spawn(run_batch(shared, batch));
            self.inflight.insert(handle.id(), items);
        }
    }

    fn on_task(&mut self, res: Result<(tokio::task::Id, bool), tokio::task::JoinError>) {
        let (id, completed) = match res {
            Ok((id, completed)) => (id, Some(completed)),
            Err(e) => (e.id(), None),
        };
        let Some(items) = self.inflight.remove(&id) else {
            return;
        };
        self.shared
            .live
            .in_flight
            .fetch_sub(items.len() as u64, Ordering::Relaxed);
        match completed {
            Some(true) => {
                for item in items.iter().filter(|i| i.live) {
                    self.outstanding.remove(&item.seq());
                }
                self.sched.release(&items);
            }
            Some(false) => {
                // Abandoned while stopping: the events stay outstanding, so the
                // cursor does not pass them and the next start sends them again.
                self.sched.release(&items);
            }
            None => {
                tracing::error!(destination = %self.shared.id, events = items.len(),
                    "delivery task failed; re-queueing its events");
                self.sched.release(&items);
                let n = items.len();
                // `release` dropped them from the in-memory count; requeue adds them back.
                self.sched.loaded += n;
                let users: Vec<Arc<str>> = items.iter().map(|i| i.user.clone()).collect();
                self.sched.requeue(items);
                for u in users {
                    if let Some(q) = self.sched.users.get(&u)
                        && !q.busy
                        && !self.sched.ready.contains(&u)
                    {
                        self.sched.ready.push_back(u);
                    }
                }
            }
        }
    }

    /// Reports records missing from the log after the cursor: an error line, a
    /// counter, the destination's stats. They are past: reading goes on after them.
    fn report_gap(&self, gap: Gap) {
        metrics::counter!("tributary_log_gap_records_total", "consumer" => self.shared.consumer.clone())
            .increment(gap.len());
        tracing::error!(destination = %self.shared.id, partition = gap.partition, from = gap.from,
            to = gap.to, records = gap.len(), "events left the log before this destination read them");
        *self
            .shared
            .live
            .gap
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = Some((gap, Utc::now().timestamp_millis()));
    }

    async fn commit(&mut self) {
        let wm = self.watermark();
        let head = *self.head_rx.borrow();
        metrics::gauge!("tributary_destination_backlog", "destination" => self.shared.id.clone())
            .set(head.saturating_sub(wm) as f64);
        if wm <= self.committed.seq {
            return;
        }
        let position = self.committed.at(wm);
        let result = match &self.shared.lease {
            None => self
                .shared
                .log
                .commit(&self.shared.consumer, &position)
                .await
                .map(|()| true),
            Some((_, lease)) => {
                if self.shared.holds().await {
                    self.shared
                        .log
                        .commit_fenced(&self.shared.consumer, &position, lease.epoch)
                        .await
                } else {
                    Ok(false)
                }
            }
        };
        match result {
            Ok(false) => {
                tracing::warn!(destination = %self.shared.id, partition = position.partition, "destination lease lost; the partition's worker stops without committing");
                self.lost = true;
            }
            Ok(true) => {
                self.committed = position;
                self.shared.live.cursor.store(wm, Ordering::Relaxed);
                let pruned = match &self.shared.ledger {
                    None => self.shared.store.prune_batches(&self.shared.id, wm).await,
                    Some(ledger) => {
                        ledger
                            .prune(
                                &self.shared.id,
                                self.committed.partition,
                                self.shared.lease.as_ref().map_or(0, |(_, l)| l.epoch),
                                wm,
                            )
                            .await
                    }
                };
                if let Err(e) = pruned {
                    tracing::warn!(destination = %self.shared.id, error = %e.detail(), "cannot prune delivery markers");
                }
            }
            Err(e) => {
                tracing::warn!(destination = %self.shared.id, error = %e, "cannot commit destination cursor");
            }
        }
    }
}
